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
  * head dims that are not a power of 2 (40, 80, 160) run with BLOCK_D = next power of 2 and masked
    loads along D: the padding lives in registers only, the inputs are never copied.
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
def _attn_step(acc, m_i, l_i, q, kt_ptrs, v_ptrs, start_n, Lk, qk_scale, offs_n, mask_d,
               MASK_N: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
               DOT_F32: tl.constexpr):
    if MASK_N:
        mask_n = (start_n + offs_n) < Lk
        kt = tl.load(kt_ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    elif EVEN_D:
        kt = tl.load(kt_ptrs)
        v = tl.load(v_ptrs)
    else:
        kt = tl.load(kt_ptrs, mask=mask_d[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
    if DOT_F32:
        kt = kt.to(tl.float32)
    s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
    if MASK_N:
        s = tl.where(mask_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    p = p.to(v.dtype)  # the rounding the tensor-core dot sees
    if DOT_F32:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = tl.dot(p, v, acc, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, qk_scale,
                     stride_qb, stride_qh, stride_qm,
                     stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn,
                     stride_ob, stride_oh, stride_om,
                     H, Lq, Lk, D, num_m_blocks,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     EVEN_D: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    # 1-D grid over (Lq blocks, B·H), Lq blocks fastest: the programs running at the same time
    # share one head's K/V in L2, and B·H is not bound by the 65535 limit of grid axis 1.
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    bh = pid // num_m_blocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = O + b * stride_ob + h * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < Lq
    mask_d = offs_d < D
    rows = offs_m.to(tl.int64)
    q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # K is read transposed (BLOCK_D, BLOCK_N) straight from memory (no tl.trans). The pointers
    # advance by one key block per step: pointer arithmetic is 64-bit, so long packed rows
    # (start · stride ≥ 2^31) cannot overflow a 32-bit offset.
    kt_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None]
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]
    n_full = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _attn_step(acc, m_i, l_i, q, kt_ptrs, v_ptrs, start_n, Lk, qk_scale,
                                   offs_n, mask_d, False, EVEN_D, PRECISION, DOT_F32)
        kt_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    if n_full < Lk:
        acc, m_i, l_i = _attn_step(acc, m_i, l_i, q, kt_ptrs, v_ptrs, n_full, Lk, qk_scale,
                                   offs_n, mask_d, True, EVEN_D, PRECISION, DOT_F32)
    # Lk >= 1 (checked by the op), so every row saw at least one finite score and l_i >= 1.
    acc = acc / l_i[:, None]
    tl.store(o_base + rows[:, None] * stride_om + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])


def _pow2_at_least(n: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(n))


def attention_config(D: int, Lq: int, Lk: int, elem_bytes: int = 2):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) for Hopper, from a fixed table.

    D ≤ 64: 128×64 tiles, 4 warps (the fp32 accumulator is small; more warps would idle), 8 for
    a padded D (40);
    D ≤ 128: 128×64, 8 warps, 3 stages (the FlashAttention-2 shape for hdim 128);
    D ≤ 256: 128×32, 8 warps, 2 stages: a 128×256 fp32 accumulator already takes 128 registers
    per thread, and two stages of 32-key K/V tiles keep shared memory under 228 KB.
    fp32 inputs (4-byte tiles) take BLOCK_M 64 so that q and the K/V stages still fit.
    Short sequences shrink the tiles (down to 16, tl.dot's minimum) instead of computing padding.
    """
    BLOCK_D = _pow2_at_least(D, 16)
    if BLOCK_D <= 64:
        # a padded D (40) needs masks along D: with 4 warps that spills ~2 KB per thread
        # (ptxas -v, sm_90a), with 8 it fits
        bm, bn, warps, stages = 128, 64, 4 if D == BLOCK_D else 8, 3
    elif BLOCK_D <= 128:
        bm, bn, warps, stages = 128, 64, 8, 3
    else:
        bm, bn, warps, stages = 128, 32, 8, 2
    if elem_bytes >= 4:
        bm = 64
    bm = min(bm, _pow2_at_least(Lq, 16))
    bn = min(bn, _pow2_at_least(Lk, 16))
    if bm <= 64:
        warps = 4
    return bm, bn, BLOCK_D, warps, stages


def _smaller(cfg):
    """The next config to try when `cfg` does not fit the GPU's shared memory or registers:
    fewer stages first, then half the query block; None when nothing smaller is left."""
    bm, bn, bd, warps, stages = cfg
    if stages > 1:
        return bm, bn, bd, warps, stages - 1
    if bm > 16:
        return bm // 2, bn, bd, 4 if bm // 2 <= 64 else warps, 2
    return None


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
    key = (q.device, q.dtype, table)
    cfg = _FITS.get(key, table)
    # The Triton interpreter multiplies the raw bit patterns of bfloat16 dot operands
    # (triton-lang/triton#11584, unsupported upstream): there, and only there, the bf16 operands
    # are widened to fp32 after the same bf16 rounding, so the CPU tests still check the algorithm.
    dot_f32 = q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"
    while True:
        BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages = cfg
        num_m = triton.cdiv(Lq, BLOCK_M)
        try:
            _attn_fwd_kernel[(num_m * B * H,)](
                q, k, v, o, float(scale) * LOG2E,
                q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                o.stride(0), o.stride(1), o.stride(2),
                H, Lq, Lk, D, num_m,
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, EVEN_D=(D == BLOCK_D),
                PRECISION="ieee" if (q.dtype == torch.float32 or dot_f32) else "tf32",
                DOT_F32=dot_f32, num_warps=num_warps, num_stages=num_stages)
        except OutOfResources:  # raised while compiling, before anything is written
            cfg = _smaller(cfg)
            if cfg is None:
                raise
            continue
        _FITS[key] = cfg
        return o
