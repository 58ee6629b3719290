"""Flash-style attention forward: o = softmax(q kᵀ · scale) v, never materialising the Lq×Lk matrix.

Work and traffic (B batch, H heads, Lq queries, Lk keys, D head dim, e bytes per element):
  FLOPs  4·B·H·Lq·Lk·D          (q kᵀ and p v, 2 FLOPs per multiply-add each)
  bytes  e·B·H·(2·Lq·D + 2·Lk·D) (read q, k, v, write o) — the floor; each program re-reads the
         K/V of its (batch, head) from L2, which is why programs of one head are launched together.
At U-Net shapes (L ≥ 256, D ≥ 32) the op is compute bound: arithmetic intensity ≈ L FLOP/byte.

Scheme (one program = BLOCK_M queries of one (batch, head)):
  * online softmax in base 2: s = (q kᵀ)·scale·log2(e), p = exp2(s − m), running max m and sum l,
    the accumulator rescaled by exp2(m_old − m_new); all in fp32.
  * p is cast to v's dtype before the second dot (as FlashAttention does): fp16/bf16 tensor-core
    dots with fp32 accumulation. fp32 inputs use IEEE fp32 dots (tf32 off), so the result matches
    an fp32 reference to ~1e-6.
  * a head dim that is not a power of 2 is computed as two power-of-2 parts (40 = 32 + 16 with 8
    masked, 80 = 64 + 16, 160 = 128 + 32): two tensor-core dots each, not one padded to the next
    power of 2 (80 padded to 128 wasted 37% of the MMA work). HEAD_D is a compile-time constant
    and the strides come in units of 16 bytes when they allow it, so loads stay 16-byte vectors
    and the K/V tiles are pipelined with cp.async even at D = 40. The inputs are never copied.
  * the key loop runs over the full BLOCK_N blocks without an Lk mask, then one masked tail block.
  * strides are arguments, so q/k/v may be strided views (e.g. slices of one packed qkv GEMM
    output); only the last dim must have unit stride.
Configs come from a small fixed table (by D and the lengths), not an autotune sweep: the launch is
deterministic and needs no warm-up benchmarking. Works with Triton 3.0+ (no TMA descriptors).
"""
import os

import torch
import triton
import triton.language as tl

from . import on_tensor_device

try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # moved in some Triton release: then nothing is retried
    class OutOfResources(Exception):
        pass

LOG2E = 1.4426950408889634


@triton.jit
def _tile(base, rows, stride, mask_r, START: tl.constexpr, WIDTH: tl.constexpr,
          N_VALID: tl.constexpr, ROW_MASK: tl.constexpr, TRANS: tl.constexpr):
    """Head-dim columns START .. START+WIDTH-1 (N_VALID real, the rest read as 0) of `rows`:
    a (rows, WIDTH) tile, or its transpose (WIDTH, rows) addressed directly when TRANS (kᵀ: no
    tl.trans). Every mask is a constexpr shape along D (N_VALID is a multiple of 8 at the head
    dims the table serves), so the compiler still sees whole 16-byte runs."""
    offs = START + tl.arange(0, WIDTH)
    if TRANS:
        ptrs = base + rows[None, :] * stride + offs[:, None]
        cols = (offs < START + N_VALID)[:, None]
        rmask = mask_r[None, :]
    else:
        ptrs = base + rows[:, None] * stride + offs[None, :]
        cols = (offs < START + N_VALID)[None, :]
        rmask = mask_r[:, None]
    if N_VALID < WIDTH:
        if ROW_MASK:
            return tl.load(ptrs, mask=rmask & cols, other=0.0)
        return tl.load(ptrs, mask=cols, other=0.0)
    if ROW_MASK:
        return tl.load(ptrs, mask=rmask, other=0.0)
    return tl.load(ptrs)


@triton.jit
def _attn_step(acc_a, acc_b, m_i, l_i, q_a, q_b, k_blk, v_blk, skn, svn, start_n, Lk,
               qk_scale, offs_n, MASK_N: tl.constexpr, HEAD_D: tl.constexpr,
               DA: tl.constexpr, DB: tl.constexpr, PRECISION: tl.constexpr,
               DOT_F32: tl.constexpr):
    mask_n = (start_n + offs_n) < Lk
    keys = offs_n  # 32-bit: the launcher keeps BLOCK_N · stride < 2^31
    kt = _tile(k_blk, keys, skn, mask_n, 0, DA, DA, MASK_N, True)
    if DOT_F32:
        kt = kt.to(tl.float32)
    s = tl.dot(q_a, kt, input_precision=PRECISION)
    if DB > 0:
        kt_b = _tile(k_blk, keys, skn, mask_n, DA, DB, HEAD_D - DA, MASK_N, True)
        if DOT_F32:
            kt_b = kt_b.to(tl.float32)
        s = tl.dot(q_b, kt_b, s, input_precision=PRECISION)
    s = s * qk_scale
    if MASK_N:
        s = tl.where(mask_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _tile(v_blk, keys, svn, mask_n, 0, DA, DA, MASK_N, False)
    p = p.to(v.dtype)  # the rounding the tensor-core dot sees
    if DOT_F32:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc_a = tl.dot(p, v, acc_a * alpha[:, None], input_precision=PRECISION)
    if DB > 0:
        v_b = _tile(v_blk, keys, svn, mask_n, DA, DB, HEAD_D - DA, MASK_N, False)
        if DOT_F32:
            v_b = v_b.to(tl.float32)
        acc_b = tl.dot(p, v_b, acc_b * alpha[:, None], input_precision=PRECISION)
    return acc_a, acc_b, m_new, l_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, qk_scale,
                     sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                     H, Lq, Lk, num_m_blocks,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
                     DA: tl.constexpr, DB: tl.constexpr, ALIGN: tl.constexpr,
                     PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    # 1-D grid over (Lq blocks, B·H), Lq blocks fastest: the programs running at the same time
    # share one head's K/V in L2, and B·H is not bound by the 65535 limit of grid axis 1.
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    bh = pid // num_m_blocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    # Strides arrive in units of ALIGN elements (16 bytes when the launcher could prove it, else
    # 1): the products tell the compiler every row starts 16-byte aligned, so loads are 16-byte
    # vectors and K/V tiles go to shared memory by cp.async, also when D (40) is no multiple of 16.
    q_base = Q + b * (sqb * ALIGN) + h * (sqh * ALIGN)
    k_base = K + b * (skb * ALIGN) + h * (skh * ALIGN)
    v_base = V + b * (svb * ALIGN) + h * (svh * ALIGN)
    o_base = O + b * (sob * ALIGN) + h * (soh * ALIGN)
    sqm, skn, svn, som = sqm * ALIGN, skn * ALIGN, svn * ALIGN, som * ALIGN

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    # The head dim in two power-of-2 parts DA + DB >= HEAD_D (DB = 0 when HEAD_D is a power of
    # 2): 40 = 32 + 16 (8 masked), 80 = 64 + 16, 160 = 128 + 32. Each part is its own tensor-core
    # dot, so the MMA work is DA + DB wide, not next_power_of_2(HEAD_D).
    offs_a = tl.arange(0, DA)
    offs_b = offs_a  # unused when DB = 0
    if DB > 0:
        offs_b = DA + tl.arange(0, DB)
    mask_m = offs_m < Lq
    rows = offs_m.to(tl.int64)
    q_a = _tile(q_base, rows, sqm, mask_m, 0, DA, DA, True, False)
    q_b = q_a  # placeholders when DB = 0 (never read)
    acc_a = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
    acc_b = acc_a
    if DOT_F32:
        q_a = q_a.to(tl.float32)
    if DB > 0:
        q_b = _tile(q_base, rows, sqm, mask_m, DA, DB, HEAD_D - DA, True, False)
        if DOT_F32:
            q_b = q_b.to(tl.float32)
        acc_b = tl.zeros([BLOCK_M, DB], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Full key blocks without a key mask, then one masked tail block. The pointers advance by
    # one key block per step: 64-bit pointer arithmetic, so long packed rows (start · stride
    # >= 2^31) cannot overflow a 32-bit offset.
    k_blk, v_blk = k_base, v_base
    n_full = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc_a, acc_b, m_i, l_i = _attn_step(acc_a, acc_b, m_i, l_i, q_a, q_b, k_blk, v_blk,
                                            skn, svn, start_n, Lk, qk_scale, offs_n, False, HEAD_D, DA, DB, PRECISION, DOT_F32)
        k_blk += BLOCK_N * skn
        v_blk += BLOCK_N * svn
    if n_full < Lk:
        acc_a, acc_b, m_i, l_i = _attn_step(acc_a, acc_b, m_i, l_i, q_a, q_b, k_blk, v_blk,
                                            skn, svn, n_full, Lk, qk_scale, offs_n, True, HEAD_D, DA, DB, PRECISION, DOT_F32)
    # Lk >= 1 (checked by the op), so every row saw at least one finite score and l_i >= 1.
    out_rows = o_base + rows[:, None] * som
    tl.store(out_rows + offs_a[None, :], (acc_a / l_i[:, None]).to(O.dtype.element_ty),
             mask=mask_m[:, None])
    if DB > 0:
        tl.store(out_rows + offs_b[None, :], (acc_b / l_i[:, None]).to(O.dtype.element_ty),
                 mask=mask_m[:, None] & (offs_b[None, :] < HEAD_D))


def head_dim_parts(D: int) -> tuple[int, int]:
    """(DA, DB): D as a power-of-2 part DA >= 16 plus a second power-of-2 part DB >= 16 (or 0)
    with DA + DB >= D. 40 -> (32, 16), 80 -> (64, 16), 160 -> (128, 32), 64 -> (64, 0)."""
    if D <= 16:
        return 16, 0
    da = 1 << (D.bit_length() - 1)
    if da == D:
        return D, 0
    return da, max(16, triton.next_power_of_2(D - da))


def _pow2_at_least(n: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(n))


def attention_config(D: int, Lq: int, Lk: int, elem_bytes: int = 2):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for Hopper, from a fixed table, by the width
    DA + DB the head dim is computed at (head_dim_parts).

    width ≤ 64: 128×64 tiles, 4 warps (the fp32 accumulator is small; more warps would idle);
    width ≤ 128: 128×64, 8 warps, 3 stages (the FlashAttention-2 shape for hdim 128);
    width ≤ 256: 128×32, 8 warps, 2 stages: a 128×256 fp32 accumulator already takes 128
    registers per thread, and two stages of 32-key K/V tiles keep shared memory under 228 KB.
    fp32 inputs (4-byte tiles) take BLOCK_M 64 so that q and the K/V stages still fit.
    Short sequences shrink the tiles (down to 16, tl.dot's minimum) instead of computing padding.
    """
    width = sum(head_dim_parts(D))
    if width <= 64:
        bm, bn, warps, stages = 128, 64, 4, 3
    elif width <= 128:
        bm, bn, warps, stages = 128, 64, 8, 3
    else:
        bm, bn, warps, stages = 128, 32, 8, 2
    if elem_bytes >= 4:
        bm = 64
    bm = min(bm, _pow2_at_least(Lq, 16))
    bn = min(bn, _pow2_at_least(Lk, 16))
    if bm <= 64:
        warps = 4
    return bm, bn, warps, stages


def _smaller(cfg):
    """The next config to try when `cfg` does not fit the GPU's shared memory or registers:
    fewer stages first, then half the query block; None when nothing smaller is left."""
    bm, bn, warps, stages = cfg
    if stages > 1:
        return bm, bn, warps, stages - 1
    if bm > 16:
        return bm // 2, bn, 4 if bm // 2 <= 64 else warps, 2
    return None


def stride_unit(*tensors) -> int:
    """The largest number of elements, up to 16 bytes' worth, that divides every stride and
    every base address of `tensors` (unit strides of the last dim excepted): the kernel takes its
    strides in these units, which is what proves its rows 16-byte aligned to the compiler."""
    esize = tensors[0].element_size()
    unit = max(1, 16 // esize)
    while unit > 1:
        if all(t.data_ptr() % (unit * esize) == 0 and
               all(st % unit == 0 for st in t.stride()[:-1]) for t in tensors):
            break
        unit //= 2
    return unit


# (device, dtype, table config) -> the config that compiled there. The table is sized for an H100
# (228 KB shared memory per SM); a GPU with less gets the first smaller config that fits, the same
# one on every call, so the launch stays deterministic.
_FITS = {}


@on_tensor_device
def attention_triton(q, k, v, o, scale: float):
    """q (B, H, Lq, D), k/v (B, H, Lk, D), o (B, H, Lq, D): same dtype and device, unit stride
    along D, Lk ≥ 1 (all checked by the caller). Writes o; returns it."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if B * H * Lq == 0:
        return o
    if max(k.stride(2), v.stride(2)) * 256 >= 2 ** 31:
        # key-row offsets inside a block (offs_n · stride, BLOCK_N · stride) are 32-bit products
        # when the stride fits 32 bits: rows that far apart are read from a dense copy instead
        k, v = k.contiguous(), v.contiguous()
    table = attention_config(D, Lq, Lk, q.element_size())
    DA, DB = head_dim_parts(D)
    unit = stride_unit(q, k, v, o)
    key = (q.device, q.dtype, table)
    cfg = _FITS.get(key, table)
    # The Triton interpreter multiplies the raw bit patterns of bfloat16 dot operands
    # (triton-lang/triton#11584, unsupported upstream): there, and only there, the bf16 operands
    # are widened to fp32 after the same bf16 rounding, so the CPU tests still check the algorithm.
    dot_f32 = q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"
    while True:
        BLOCK_M, BLOCK_N, num_warps, num_stages = cfg
        num_m = triton.cdiv(Lq, BLOCK_M)
        try:
            _attn_fwd_kernel[(num_m * B * H,)](
                q, k, v, o, float(scale) * LOG2E,
                *(st // unit for t in (q, k, v, o) for st in t.stride()[:3]),
                H, Lq, Lk, num_m,
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEAD_D=D, DA=DA, DB=DB, ALIGN=unit,
                PRECISION="ieee" if (q.dtype == torch.float32 or dot_f32) else "tf32",
                DOT_F32=dot_f32, num_warps=num_warps, num_stages=num_stages)
        except OutOfResources:  # raised while compiling, before anything is written
            cfg = _smaller(cfg)
            if cfg is None:
                raise
            continue
        _FITS[key] = cfg
        return o
