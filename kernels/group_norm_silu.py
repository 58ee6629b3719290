"""GroupNorm (+ add before, + scale/shift and SiLU after) in Triton:
y = act(GroupNorm(x + add[b, c]) * (1 + scale[b, c]) + shift[b, c]).

Bytes moved (e = element size, N = x.numel()): the floor is read N·e + write N·e (plus
C weights/biases and B·C adds, negligible). Paths:
  * fused, group fits in one tile (padded Cg·S <= FUSED_MAX): one program per (b, g), the group
    is read once into registers, statistics and output come from there: exactly the floor.
  * fused, looped: one program per (b, g) walks the group twice (statistics, then normalize):
    reads 2·N·e, writes N·e; the second read of a group mostly hits L2 (one group in flight per
    program, e.g. 10 channels x 64x64 fp16 = 80 KB).
  * split, when B·G programs would leave SMs idle (batch 1-2 at SD shapes: 64 groups on 132 SMs):
    pass 1 writes the (count, mean, M2) of each of K chunks of a group to a workspace
    (B·G·K·3 floats); pass 2 (grid (B·G, K)) combines the K partials with Chan's parallel formula
    in a fixed order -- deterministic, no atomics -- and normalizes its chunk. Traffic as looped.

Layouts without copies: a group is a (Cg channels) x (S pixels) array with
  NCHW-like  (B, C, *spatial) dense:    offset = c·S + s   (a contiguous span of Cg·S)
  channels_last (B, *spatial, C) dense: offset = s·C + c   (Cg channels every C elements)
and tiles are [BC, BS] blocks of that array, walked in memory order.

Numerics: statistics in fp32 on d = (x - x_ref) + (add_c - add_ref), shifted by the group's first
element (x_ref, add_ref), so mean 1e4 / std 1 inputs do not cancel. Each tile's (mean, M2) is
computed exactly from registers (two-pass), tiles are merged with Chan's formula. The affine,
scale and shift are folded into one per-channel multiply-add on the output.
"""
import torch
import triton
import triton.language as tl

from . import on_tensor_device

FUSED_MAX = 8192     # padded elements of a group held in registers by one program
TILE = 4096          # elements per tile when a group is walked in tiles
_SM_COUNT = {}


@triton.jit
def _silu(y):
    # exp argument clamped: no overflow to inf for very negative y (the result is ~0 there)
    return y / (1.0 + tl.exp(tl.minimum(-y, 80.0)))


@triton.jit
def _group_base(pid, G, C, S, Cg, CL: tl.constexpr):
    """(batch, group, int64 offset of the group's first element)."""
    b = pid // G
    g = pid % G
    if CL:
        base = b.to(tl.int64) * C * S + g * Cg
    else:
        base = b.to(tl.int64) * C * S + g.to(tl.int64) * Cg * S
    return b, g, base


@triton.jit
def _shift(x_ptr, a_ptr, base, b, g, C, Cg, HAS_ADD: tl.constexpr):
    """The shift (x_ref, add_ref): the group's first element, identical in every program."""
    xs = tl.load(x_ptr + base).to(tl.float32)
    a0 = 0.0
    if HAS_ADD:
        a0 = tl.load(a_ptr + b * C + g * Cg).to(tl.float32)
    return xs, a0


@triton.jit
def _tile(t, n_c_tiles, n_s_tiles, C, S, Cg,
          CL: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr):
    """Tile t of a group (tiles numbered in memory order): offsets, mask, channel indices
    within the group, and the number of valid elements."""
    if CL:
        ct = t % n_c_tiles
        st = t // n_c_tiles
    else:
        ct = t // n_s_tiles
        st = t % n_s_tiles
    cl = ct * BC + tl.arange(0, BC)
    s = st * BS + tl.arange(0, BS)
    mask = (cl[:, None] < Cg) & (s[None, :] < S)
    # int64: within one sample (channels_last) or one group (NCHW) the offset reaches C·S or
    # Cg·S, which can pass 2^31 (e.g. a VAE decoder at 4096² with C = 128)
    if CL:
        offs = s[None, :].to(tl.int64) * C + cl[:, None]
    else:
        offs = cl[:, None].to(tl.int64) * S + s[None, :]
    nvalid = (tl.minimum(Cg - ct * BC, BC) * tl.minimum(S - st * BS, BS)).to(tl.float32)
    return offs, mask, cl, nvalid


@triton.jit
def _load_d(x_ptr, a_ptr, base, offs, mask, cl, b, g, C, Cg, xs, a0, HAS_ADD: tl.constexpr):
    """Shifted fp32 values of a tile (0 where masked) and the raw x - x_ref."""
    xr = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32) - xs
    if HAS_ADD:
        da = tl.load(a_ptr + b * C + g * Cg + cl, mask=cl < Cg, other=0.0).to(tl.float32) - a0
        d = xr + da[:, None]
    else:
        d = xr
    return tl.where(mask, d, 0.0), xr


@triton.jit
def _tile_stats(d, mask, nvalid):
    m = tl.sum(tl.sum(d, axis=1), axis=0) / nvalid
    e = tl.where(mask, d - m, 0.0)
    return m, tl.sum(tl.sum(e * e, axis=1), axis=0)


@triton.jit
def _chan(n, mean, m2, nb, mb, m2b):
    """Chan et al.'s pairwise merge of (count, mean, M2) statistics."""
    nn = n + nb
    delta = mb - mean
    f = nb / nn
    return nn, mean + delta * f, m2 + m2b + delta * delta * n * f


@triton.jit
def _normalize_store(y_ptr, w_ptr, bias_ptr, a_ptr, sc_ptr, sh_ptr, base, offs, mask, cl, xr,
                     b, g, C, Cg, a0, mean, rstd, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     HAS_ADD: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                     SILU: tl.constexpr):
    # y = ((x - x_ref) + (add_c - add_ref) - mean) * rstd * w_c + b_c, folded per channel into
    # y = (x - x_ref) * scale_c + k_c
    cm = cl < Cg
    scale = tl.full(cl.shape, 1.0, tl.float32) * rstd
    if HAS_W:
        scale = scale * tl.load(w_ptr + g * Cg + cl, mask=cm, other=0.0).to(tl.float32)
    k = -mean * scale
    if HAS_ADD:
        da = tl.load(a_ptr + b * C + g * Cg + cl, mask=cm, other=0.0).to(tl.float32) - a0
        k = (da - mean) * scale
    if HAS_B:
        k = k + tl.load(bias_ptr + g * Cg + cl, mask=cm, other=0.0).to(tl.float32)
    if HAS_SCALE:  # GN * (1 + s) + t  ==  (x - x_ref) * scale (1 + s) + (k (1 + s) + t)
        s1 = 1.0 + tl.load(sc_ptr + b * C + g * Cg + cl, mask=cm, other=0.0).to(tl.float32)
        scale = scale * s1
        k = k * s1
    if HAS_SHIFT:
        k = k + tl.load(sh_ptr + b * C + g * Cg + cl, mask=cm, other=0.0).to(tl.float32)
    y = xr * scale[:, None] + k[:, None]
    if SILU:
        y = _silu(y)
    tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_fused_kernel(x_ptr, w_ptr, bias_ptr, a_ptr, sc_ptr, sh_ptr, y_ptr, G, C, S, Cg, eps,
                     n_c_tiles, n_s_tiles,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr,
                     HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, CL: tl.constexpr, SINGLE: tl.constexpr,
                     BC: tl.constexpr, BS: tl.constexpr):
    """One program per (b, g). SINGLE: the whole group is one tile, read once."""
    b, g, base = _group_base(tl.program_id(0), G, C, S, Cg, CL)
    xs, a0 = _shift(x_ptr, a_ptr, base, b, g, C, Cg, HAS_ADD)
    if SINGLE:
        offs, mask, cl, nv = _tile(0, 1, 1, C, S, Cg, CL, BC, BS)
        d, xr = _load_d(x_ptr, a_ptr, base, offs, mask, cl, b, g, C, Cg, xs, a0, HAS_ADD)
        mean, m2 = _tile_stats(d, mask, nv)
        rstd = 1.0 / tl.sqrt(m2 / nv + eps)
        _normalize_store(y_ptr, w_ptr, bias_ptr, a_ptr, sc_ptr, sh_ptr, base, offs, mask, cl, xr,
                         b, g, C, Cg, a0, mean, rstd, HAS_W, HAS_B, HAS_ADD, HAS_SCALE,
                         HAS_SHIFT, SILU)
    else:
        ntiles = n_c_tiles * n_s_tiles
        offs, mask, cl, n = _tile(0, n_c_tiles, n_s_tiles, C, S, Cg, CL, BC, BS)
        d, xr = _load_d(x_ptr, a_ptr, base, offs, mask, cl, b, g, C, Cg, xs, a0, HAS_ADD)
        mean, m2 = _tile_stats(d, mask, n)
        for t in range(1, ntiles):
            offs, mask, cl, nv = _tile(t, n_c_tiles, n_s_tiles, C, S, Cg, CL, BC, BS)
            d, xr = _load_d(x_ptr, a_ptr, base, offs, mask, cl, b, g, C, Cg, xs, a0, HAS_ADD)
            tm, tm2 = _tile_stats(d, mask, nv)
            n, mean, m2 = _chan(n, mean, m2, nv, tm, tm2)
        rstd = 1.0 / tl.sqrt(m2 / n + eps)
        for t in range(0, ntiles):
            offs, mask, cl, nv = _tile(t, n_c_tiles, n_s_tiles, C, S, Cg, CL, BC, BS)
            d, xr = _load_d(x_ptr, a_ptr, base, offs, mask, cl, b, g, C, Cg, xs, a0, False)
            _normalize_store(y_ptr, w_ptr, bias_ptr, a_ptr, sc_ptr, sh_ptr, base, offs, mask, cl,
                             xr, b, g, C, Cg, a0, mean, rstd, HAS_W, HAS_B, HAS_ADD, HAS_SCALE,
                             HAS_SHIFT, SILU)


@triton.jit
def _gn_partial_kernel(x_ptr, a_ptr, ws_ptr, G, C, S, Cg, n_c_tiles, n_s_tiles, tiles_per_chunk,
                       K, HAS_ADD: tl.constexpr, CL: tl.constexpr,
                       BC: tl.constexpr, BS: tl.constexpr):
    """Split pass 1, grid (B·G, K): (count, mean, M2) of chunk k of group pid -> workspace."""
    pid = tl.program_id(0)
    k = tl.program_id(1)
    b, g, base = _group_base(pid, G, C, S, Cg, CL)
    xs, a0 = _shift(x_ptr, a_ptr, base, b, g, C, Cg, HAS_ADD)
    t0 = k * tiles_per_chunk
    t1 = tl.minimum(t0 + tiles_per_chunk, n_c_tiles * n_s_tiles)
    offs, mask, cl, n = _tile(t0, n_c_tiles, n_s_tiles, C, S, Cg, CL, BC, BS)
    d, xr = _load_d(x_ptr, a_ptr, base, offs, mask, cl, b, g, C, Cg, xs, a0, HAS_ADD)
    mean, m2 = _tile_stats(d, mask, n)
    for t in range(t0 + 1, t1):
        offs, mask, cl, nv = _tile(t, n_c_tiles, n_s_tiles, C, S, Cg, CL, BC, BS)
        d, xr = _load_d(x_ptr, a_ptr, base, offs, mask, cl, b, g, C, Cg, xs, a0, HAS_ADD)
        tm, tm2 = _tile_stats(d, mask, nv)
        n, mean, m2 = _chan(n, mean, m2, nv, tm, tm2)
    w = ws_ptr + (pid.to(tl.int64) * K + k) * 3
    tl.store(w, n)
    tl.store(w + 1, mean)
    tl.store(w + 2, m2)


@triton.jit
def _gn_apply_kernel(x_ptr, w_ptr, bias_ptr, a_ptr, sc_ptr, sh_ptr, y_ptr, ws_ptr, G, C, S, Cg,
                     eps, n_c_tiles, n_s_tiles, tiles_per_chunk, K,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr,
                     HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, CL: tl.constexpr, KP: tl.constexpr,
                     BC: tl.constexpr, BS: tl.constexpr):
    """Split pass 2, grid (B·G, K): combine the K partials of the group (the same fixed-order
    reduction in every program, so all chunks use bit-identical statistics), normalize chunk k."""
    pid = tl.program_id(0)
    k = tl.program_id(1)
    b, g, base = _group_base(pid, G, C, S, Cg, CL)
    xs, a0 = _shift(x_ptr, a_ptr, base, b, g, C, Cg, HAS_ADD)
    j = tl.arange(0, KP)
    jm = j < K
    w = ws_ptr + pid.to(tl.int64) * K * 3 + j * 3
    ni = tl.load(w, mask=jm, other=0.0)
    mi = tl.load(w + 1, mask=jm, other=0.0)
    m2i = tl.load(w + 2, mask=jm, other=0.0)
    n = tl.sum(ni, axis=0)
    mean = tl.sum(ni * mi, axis=0) / n
    dm = mi - mean
    m2 = tl.sum(m2i + ni * dm * dm, axis=0)
    rstd = 1.0 / tl.sqrt(m2 / n + eps)
    t0 = k * tiles_per_chunk
    t1 = tl.minimum(t0 + tiles_per_chunk, n_c_tiles * n_s_tiles)
    for t in range(t0, t1):
        offs, mask, cl, nv = _tile(t, n_c_tiles, n_s_tiles, C, S, Cg, CL, BC, BS)
        d, xr = _load_d(x_ptr, a_ptr, base, offs, mask, cl, b, g, C, Cg, xs, a0, False)
        _normalize_store(y_ptr, w_ptr, bias_ptr, a_ptr, sc_ptr, sh_ptr, base, offs, mask, cl, xr,
                         b, g, C, Cg, a0, mean, rstd, HAS_W, HAS_B, HAS_ADD, HAS_SCALE,
                         HAS_SHIFT, SILU)


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: a nominal H100, so the split heuristic is exercised too
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _np2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _plan(B, G, Cg, S, channels_last, device, block=None, split=None):
    """(single, BC, BS, K): tile shape and number of chunks per group."""
    if block is None and _np2(Cg) * _np2(S) <= FUSED_MAX:
        return True, _np2(Cg), _np2(S), 1
    if block is not None:
        BC, BS = block
    elif channels_last:  # channels are contiguous: tile spans them, pixels fill the rest
        BC = min(_np2(Cg), 128)
        BS = min(_np2(S), max(TILE // BC, 1))
    else:  # pixels are contiguous
        BS = min(_np2(S), TILE)
        BC = min(_np2(Cg), max(TILE // BS, 1))
    ntiles = triton.cdiv(Cg, BC) * triton.cdiv(S, BS)
    if split is None:
        target = 2 * _sm_count(device)
        split = 1 if B * G >= target else min(ntiles, triton.cdiv(target, B * G))
    split = max(1, min(int(split), ntiles))
    return ntiles == 1 and split == 1, BC, BS, split


@on_tensor_device
def group_norm_silu_triton(x, weight, bias, add, num_groups, eps, activation, out, *,
                           block=None, split=None, channels_last=None, scale=None, shift=None):
    """x, out: (B, C, *spatial), dense in the same order (contiguous or channels_last, any spatial
    rank); weight, bias: (C,) or None; add, scale, shift: (B, C) or None (any float dtypes, loaded
    as fp32).
    `block=(BC, BS)` and `split=K` override the tile shape / chunk count (tests use them to
    exercise every path on small shapes)."""
    from fastdiff.ops.group_norm_silu import _channels_last_flag
    B, C = x.shape[0], x.shape[1]
    S = x.numel() // max(B * C, 1)
    if x.numel() == 0:
        return out
    cl = _channels_last_flag(x) if channels_last is None else channels_last
    if cl is None or _channels_last_flag(out) != cl:
        raise ValueError("group_norm_silu_triton: x and out must be dense in the same order")
    G = num_groups
    if G <= 0 or C % G:  # checked by the public op; this launcher is also reachable directly
        raise ValueError(f"num_groups={G} must be positive and divide C={C}")
    Cg = C // G
    single, BC, BS, K = _plan(B, G, Cg, S, cl, x.device, block, split)
    n_c_tiles, n_s_tiles = triton.cdiv(Cg, BC), triton.cdiv(S, BS)
    # the (B, C) and (C,) tensors may be strided views: the kernels index them densely
    add, scale, shift = (t if t is None or t.is_contiguous() else t.contiguous()
                         for t in (add, scale, shift))
    w = weight if weight is not None else x
    bi = bias if bias is not None else x
    a = add if add is not None else x
    sc = scale if scale is not None else x
    sh = shift if shift is not None else x
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_ADD=add is not None,
                 HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, SILU=activation == "silu", CL=bool(cl), BC=BC, BS=BS)
    warps = 8 if BC * BS >= 2048 else 4
    if weight is not None and not weight.is_contiguous():
        w = weight.contiguous()
    if bias is not None and not bias.is_contiguous():
        bi = bias.contiguous()
    if K == 1:
        _gn_fused_kernel[(B * G,)](x, w, bi, a, sc, sh, out, G, C, S, Cg, float(eps),
                                   n_c_tiles, n_s_tiles, SINGLE=single, num_warps=warps, **flags)
        return out
    ntiles = n_c_tiles * n_s_tiles
    tpc = triton.cdiv(ntiles, K)
    K = triton.cdiv(ntiles, tpc)  # no empty chunk
    ws = torch.empty((B * G, K, 3), device=x.device, dtype=torch.float32)
    _gn_partial_kernel[(B * G, K)](x, a, ws, G, C, S, Cg, n_c_tiles, n_s_tiles, tpc, K,
                                   HAS_ADD=flags["HAS_ADD"], CL=flags["CL"], BC=BC, BS=BS,
                                   num_warps=warps)
    _gn_apply_kernel[(B * G, K)](x, w, bi, a, sc, sh, out, ws, G, C, S, Cg, float(eps),
                                 n_c_tiles, n_s_tiles, tpc, K, KP=_np2(K), num_warps=warps,
                                 **flags)
    return out
