"""One DDPM / DDIM reverse step in one pass: x0 from the model output, clip or dynamic threshold,
posterior mean, + sigma z with z given or drawn in the kernel (Philox stream 1).

Bytes per element (e = element size): read x_t and model_out (2e; +e for the learned variance,
+e for given noise), write x_prev (e; +e for x0).

Two launches. `_sampler_coef_kernel`, grid (B,): one program per sample computes its
coefficients in float64 from the float64 alphas_cumprod table (t and t_prev clamped: an
unchecked value never reads outside the table) and writes them as NCOEF float32s. Then
`_sampler_step_kernel`, grid (P programs per sample, B): a program never straddles two samples;
it loads its sample's row (NCOEF scalar loads) and loops over tiles p, p + P, ... of R Philox
groups (every thread two whole groups, as kernels/q_sample.py), or, where P is the tile count
(ONE_TILE), is one tile of straight-line code (the loop's bookkeeping and what it keeps in
registers across iterations cost 22 instructions a thread at one tile). Drawn noise takes the
seed's 20 Philox round keys as kernel arguments (philox.round_keys, on the host) unless the
seed is a device tensor. The float64 work (~350-400 instructions, float64 divisions and square
roots) was each program's prologue before: 40-50 instructions per element at one tile per
program, now ~12000 thread-instruction slots (one warp) per sample, once. Per-element math is float32. The same coefficient algebra as
csrc/sampler_step.h:
    x0   = cx x + cm m                    (m: model prediction)
    x0c  = clamp(x0)  or  clamp(x0, -s, s) / s
    mean = k0 x0c + kx x + km m           (ddim's epsilon folded in: no per-element division)
    x_prev = mean + std z                 (std = exp(l0 + l1 v) for learned_range, sqrt(v) learned)
With guidance (GUIDED), m = m_u + w (m_c - m_u), m_c read cond_off further than m_u.
"""
import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import on_tensor_device
from .philox import (MAX_GRID_Y, USE_LIBDEVICE, dev_log, int32_words, noise_key, normal_flat,
                     normal_flat_keys, round_keys)

# Globals read inside @triton.jit must be tl.constexpr; the launcher uses their .value.
STREAM = tl.constexpr(1)  # fastdiff.reference.STREAM_SAMPLER_STEP
# enums: fastdiff/ops/sampler_step.py KINDS / PREDICTION_TYPES / VARIANCE_TYPES / CLIP_*
DDPM, DDIM = tl.constexpr(0), tl.constexpr(1)
EPSILON, SAMPLE, V_PREDICTION = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
FIXED_SMALL, FIXED_SMALL_LOG = tl.constexpr(0), tl.constexpr(1)
FIXED_LARGE, FIXED_LARGE_LOG, LEARNED_RANGE = tl.constexpr(2), tl.constexpr(3), tl.constexpr(4)
LEARNED = tl.constexpr(5)
CLIP_NONE, CLIP_RANGE, CLIP_THRESHOLD = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
NOISE_NONE, NOISE_GIVEN, NOISE_DRAWN = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


# float64 sqrt: libdevice on the GPU (tl.sqrt_rn is float32 only), numpy in the interpreter
@triton.jit
def _sqrt64(x):
    if USE_LIBDEVICE:
        return libdevice.sqrt(x)
    else:
        return tl.sqrt(x)


@triton.jit
def _coef(ab_ptr, num_t, tb, tpb, eta, KIND: tl.constexpr, PRED: tl.constexpr,
          VAR: tl.constexpr, FINAL_FROM_TABLE: tl.constexpr, USE_CLIPPED: tl.constexpr):
    """Per-sample coefficients in float64 (see the module docstring); returns float32 scalars
    cx, cm, k0, kx, km, std, l0, l1. tb is already clamped; tpb < 0 means the final step."""
    at = tl.load(ab_ptr + tb).to(tl.float64)
    ap = tl.load(ab_ptr + tl.minimum(tl.maximum(tpb, 0), num_t - 1)).to(tl.float64)
    if FINAL_FROM_TABLE:
        final = tl.load(ab_ptr).to(tl.float64)
    else:
        final = at * 0.0 + 1.0
    ap = tl.where(tpb >= 0, ap, final)
    bt = 1.0 - at
    bp = 1.0 - ap
    sa = _sqrt64(at)
    sb = _sqrt64(bt)
    if PRED == EPSILON:
        cx = 1.0 / sa
        cm = -sb / sa
    elif PRED == SAMPLE:
        cx = at * 0.0
        cm = at * 0.0 + 1.0
    else:
        cx = sa
        cm = -sb
    zero = at * 0.0
    l0 = zero
    l1 = zero
    if KIND == DDPM:
        cur_alpha = at / ap
        cur_beta = 1.0 - cur_alpha
        k0 = _sqrt64(ap) * cur_beta / bt
        kx = _sqrt64(cur_alpha) * bp / bt
        km = zero
        var = tl.maximum(bp / bt * cur_beta, 1e-20)
        if VAR == FIXED_SMALL or VAR == FIXED_SMALL_LOG:  # exp(0.5 log var) = sqrt(var)
            std = _sqrt64(var)
        elif VAR == FIXED_LARGE or VAR == FIXED_LARGE_LOG:
            std = _sqrt64(cur_beta)
        else:  # learned_range: std = exp(0.5 (frac max_log + (1 - frac) min_log)), frac = (v+1)/2
            min_log = dev_log(var)
            d = dev_log(tl.maximum(cur_beta, 1e-20)) - min_log  # t == t_prev: finite
            l0 = 0.5 * min_log + 0.25 * d
            l1 = 0.25 * d
            std = zero
    else:
        var = tl.maximum(bp / bt * (1.0 - at / ap), 0.0)  # < 0 only for t_prev > t (inversion)
        std = _sqrt64(var) * eta
        direction = _sqrt64(tl.maximum(bp - std * std, 0.0))
        if PRED == EPSILON:
            ex = zero
            em = zero + 1.0
        elif PRED == SAMPLE:
            ex = 1.0 / sb
            em = -sa / sb
        else:
            ex = sb
            em = sa
        e0 = zero
        if USE_CLIPPED:  # epsilon re-derived from the clipped x0
            ex = 1.0 / sb
            em = zero
            e0 = -sa / sb
        k0 = _sqrt64(ap) + direction * e0
        kx = direction * ex
        km = direction * em
    return (cx.to(tl.float32), cm.to(tl.float32), k0.to(tl.float32), kx.to(tl.float32),
            km.to(tl.float32), std.to(tl.float32), l0.to(tl.float32), l1.to(tl.float32))


# A sample's row, 8 int32 words: cx, cm, k0, kx, km as float32 bits, then std (l0 for
# learned_range), l1, and t clamped, complemented (~t < 0) where the step adds no noise
NCOEF = tl.constexpr(8)
COEF_BLOCK = tl.constexpr(32)  # samples per pre-pass program: one lane each


@triton.jit
def _bits(v):
    return v.to(tl.int32, bitcast=True)


@triton.jit
def _sampler_coef_kernel(t_ptr, tp_ptr, ab_ptr, coef_ptr, B, num_t, eta_hi, eta_lo,
                         KIND: tl.constexpr, PRED: tl.constexpr, VAR: tl.constexpr,
                         FINAL_FROM_TABLE: tl.constexpr, USE_CLIPPED: tl.constexpr):
    # lane i of program p: sample 32 p + i (the float64 code once per sample, its divisions and
    # square roots spread over the lanes; plain stores, so the launch is graph-capturable)
    b = tl.program_id(0).to(tl.int64) * COEF_BLOCK + tl.arange(0, COEF_BLOCK)
    live = b < B
    tb = tl.load(t_ptr + b, mask=live, other=0)
    tb = tl.minimum(tl.maximum(tb, 0), num_t - 1)
    tpb = tl.load(tp_ptr + b, mask=live, other=0)
    # eta arrives as two float32s (Triton passes Python floats as float32): their float64 sum is
    # the host's eta to ~2^-48, so std rounds to the same float32 as the C++/CUDA kernels'
    eta = tl.cast(eta_hi, tl.float64) + tl.cast(eta_lo, tl.float64)
    cx, cm, k0, kx, km, std, l0, l1 = _coef(ab_ptr, num_t, tb, tpb, eta, KIND, PRED, VAR,
                                            FINAL_FROM_TABLE, USE_CLIPPED)
    if KIND == DDPM:  # never at the last step (t_prev < 0); ddpm only where t > 0
        noise_on = (tb > 0) & (tpb >= 0)
    else:             # ddim: the host checked eta
        noise_on = tpb >= 0
    t32 = tb.to(tl.int32)
    row = coef_ptr + b * NCOEF
    tl.store(row + 0, _bits(cx), mask=live)
    tl.store(row + 1, _bits(cm), mask=live)
    tl.store(row + 2, _bits(k0), mask=live)
    tl.store(row + 3, _bits(kx), mask=live)
    tl.store(row + 4, _bits(km), mask=live)
    if VAR == LEARNED_RANGE:
        tl.store(row + 5, _bits(l0), mask=live)
    else:
        tl.store(row + 5, _bits(std), mask=live)
    tl.store(row + 6, _bits(l1), mask=live)
    tl.store(row + 7, tl.where(noise_on, t32, ~t32), mask=live)


@triton.jit
def _clamp(x, lo, hi):  # NaN in, NaN out (torch.clamp); lo <= hi
    return tl.minimum(tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL), hi,
                      propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _f32_of(v):
    """v as float32 (exact). bfloat16 as its bits shifted into a float32's top half: the same
    value as .to(float32), but the high element of a loaded pair is then one AND (ptxas made it
    a PRMT and a shift): 8 instructions fewer a thread."""
    if v.dtype == tl.bfloat16:
        w = v.to(tl.int16, bitcast=True).to(tl.uint16).to(tl.uint32)
        return (w << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


@triton.jit
def _coef_at(row, i):
    return tl.load(row + i).to(tl.float32, bitcast=True)


# rk0 .. rk19: the seed's Philox round keys (philox.round_keys; rk0, rk1 are the seed's words),
# 20 scalar arguments rather than one tuple: do_not_specialize does not reach a tuple's items,
# and a key word of 1 or a multiple of 16 would compile another variant
@triton.jit(do_not_specialize=["first"] + [f"rk{i}" for i in range(20)])
def _sampler_step_kernel(x_ptr, mo_ptr, noise_ptr, coef_ptr, thr_ptr,
                         out_ptr, x0_ptr, per_sample, mo_bs, mo_inner, mo_rs, var_off, cond_off,
                         first, rk0, rk1, rk2, rk3, rk4, rk5, rk6, rk7, rk8, rk9, rk10, rk11,
                         rk12, rk13, rk14, rk15, rk16, rk17, rk18, rk19,
                         seed_ptr, first_ptr, w_arg, w_ptr,
                         clip_range, b0, n_tiles,
                         VAR: tl.constexpr, CLIP: tl.constexpr, NOISE: tl.constexpr,
                         SPLIT: tl.constexpr, WANT_X0: tl.constexpr, GUIDED: tl.constexpr,
                         W_PTR: tl.constexpr, SEED_PTR: tl.constexpr, FIRST_PTR: tl.constexpr,
                         R: tl.constexpr, J64: tl.constexpr, PAIRED: tl.constexpr,
                         ONE_TILE: tl.constexpr):
    # program (p, b): tiles p, p + P, ... of sample b, each R Philox groups (4R elements); grid
    # axis 1 holds at most 65535 samples, so larger batches are launched in slices from b0
    b = tl.program_id(1) + b0
    # the sample's row from _sampler_coef_kernel (only the words this variant uses)
    row = coef_ptr + b.to(tl.int64) * NCOEF
    cx = _coef_at(row, 0)
    cm = _coef_at(row, 1)
    k0 = _coef_at(row, 2)
    kx = _coef_at(row, 3)
    km = _coef_at(row, 4)
    if NOISE != NOISE_NONE:
        if VAR == LEARNED_RANGE:
            l0 = _coef_at(row, 5)
            l1 = _coef_at(row, 6)
        elif VAR != LEARNED:
            std = _coef_at(row, 5)
        tcode = tl.load(row + 7)
        noise_on = tcode >= 0
        tb = tl.where(noise_on, tcode, ~tcode)
    if NOISE == NOISE_DRAWN:
        k0s, k1s, f = noise_key(rk0, rk1, first, seed_ptr, first_ptr, SEED_PTR, FIRST_PTR)
        keys = (rk0, rk1, rk2, rk3, rk4, rk5, rk6, rk7, rk8, rk9, rk10, rk11, rk12, rk13, rk14,
                rk15, rk16, rk17, rk18, rk19)
    if CLIP == CLIP_THRESHOLD:
        thr = tl.load(thr_ptr + b).to(tl.float32)
        # -thr for thr >= 1 (the quantile clamped); a NaN thr (a sample holding a NaN) stays
        # thr's NaN, sign included, as the compare-and-select clamp passed it on (-thr would
        # flip the NaN's sign bit in the interpreter)
        thr_lo = 0.0 - thr
    if GUIDED:
        if W_PTR:
            w = tl.load(w_ptr).to(tl.float32)
        else:
            w = w_arg
    base = b.to(tl.int64) * per_sample               # the sample's first element in memory
    mo_base = b.to(tl.int64) * mo_bs
    if ONE_TILE:  # every program one tile (P = tiles): straight-line code, no loop
        tile_end = tl.program_id(0) + 1
        tile_step = 1
    else:
        tile_end = n_tiles
        tile_step = tl.num_programs(0)
    for tile in range(tl.program_id(0), tile_end, tile_step):
        g0 = tile * R
        if J64:  # samples of 2^31 elements or more
            j = g0.to(tl.int64) * 4 + tl.arange(0, 4 * R)
        else:    # index within the sample: 32-bit math
            j = g0 * 4 + tl.arange(0, 4 * R)
        mask = j < per_sample
        if SPLIT:  # learned_range, channels_last: rows of mo_inner predictions, mo_rs apart
            mo = mo_base + (j // mo_inner) * mo_rs + j % mo_inner
        else:
            mo = mo_base + j
        x = _f32_of(tl.load(x_ptr + base + j, mask=mask, other=0.0))
        m = _f32_of(tl.load(mo_ptr + mo, mask=mask, other=0.0))
        if GUIDED:  # classifier-free guidance: m_u + w (m_c - m_u)
            mc = _f32_of(tl.load(mo_ptr + mo + cond_off, mask=mask, other=0.0))
            m = m + w * (mc - m)
        x0 = cx * x + cm * m
        # clamps that keep a NaN, as torch.clamp (a diverged model must not be clipped into an
        # image): max.NaN and min.NaN, two instructions (compares and selects were four)
        if CLIP == CLIP_RANGE:
            x0 = _clamp(x0, -clip_range, clip_range)
        elif CLIP == CLIP_THRESHOLD:
            x0 = _clamp(x0, thr_lo, thr) / thr
        out = k0 * x0 + kx * x + km * m
        if NOISE != NOISE_NONE:
            if NOISE == NOISE_GIVEN:
                z = _f32_of(tl.load(noise_ptr + base + j, mask=mask, other=0.0))
            else:
                if SEED_PTR:  # the seed in device memory: its round keys formed here
                    z = normal_flat(k0s, k1s, f + b, g0, tb, STREAM, R, PAIRED)
                else:
                    z = normal_flat_keys(keys, f + b, g0, tb, STREAM, R, PAIRED)
            if VAR == LEARNED_RANGE or VAR == LEARNED:  # the cond half's variance with guidance
                if GUIDED:
                    v = _f32_of(tl.load(mo_ptr + mo + cond_off + var_off, mask=mask,
                                        other=0.0))
                else:
                    v = _f32_of(tl.load(mo_ptr + mo + var_off, mask=mask, other=0.0))
                if VAR == LEARNED:  # correctly rounded, as the C++/CUDA sqrtf
                    sd = tl.sqrt_rn(v)
                else:
                    sd = tl.exp(l0 + l1 * v)
            else:
                sd = std
            out = tl.where(noise_on, out + sd * z, out)
        tl.store(out_ptr + base + j, out.to(out_ptr.dtype.element_ty), mask=mask)
        if WANT_X0:
            tl.store(x0_ptr + base + j, x0.to(x0_ptr.dtype.element_ty), mask=mask)


PROGRAMS = 1024   # programs to keep in flight (~8 per SM of an H100), when the work allows
MAX_TILES = 8     # tiles per program at most: its prologue (loads of t, the row, the key) spread this far


def plan(B: int, per_sample: int):
    """(R, num_warps, P): tiles of R = 64 num_warps groups (two per thread, as q_sample), P
    programs per sample, each looping over ceil(tiles / P) <= MAX_TILES of them."""
    groups = -(-per_sample // 4)
    warps = 4 if groups > 128 else (2 if groups > 64 else 1)
    R = 64 * warps
    tiles = -(-groups // R)
    P = min(tiles, max(-(-PROGRAMS // max(B, 1)), -(-tiles // MAX_TILES)))
    return R, warps, P


@on_tensor_device
def sampler_step_triton(x_t, mo, t, t_prev, alphas_cumprod, noise, thresh, seed, seed_t,
                        first_index, first_t, needs_noise, kind, pred, var, eta, clip_mode,
                        clip_range, set_alpha_to_one, use_clipped, mo_bs, mo_inner, mo_rs,
                        var_off, cond_off, guidance, guidance_t, x_prev, x0):
    """Checked, laid-out tensors (fastdiff.ops.sampler_step): x_t, noise, x_prev, x0 share
    strides; mo is read at b*mo_bs + (j // mo_inner)*mo_rs + j % mo_inner (+ var_off, + cond_off
    for the conditional half when cond_off > 0); t, t_prev int64 (B,); alphas_cumprod float64;
    thresh float32 (B,) for clip_mode 2; seed_t / first_t / guidance_t: None or 1-element
    device tensors (int64, int64, float32) read by the kernel instead of the int/float."""
    B = x_t.shape[0]
    per_sample = x_t.numel() // B
    R, warps, P = plan(B, per_sample)
    n_tiles = triton.cdiv(triton.cdiv(per_sample, 4), R)
    seed_lo, seed_hi, first = int32_words(seed, first_index)
    eta_hi = float(np.float32(eta))
    noise_mode = (NOISE_GIVEN if noise is not None else
                  (NOISE_DRAWN if needs_noise else NOISE_NONE)).value
    # rk0..rk19: formed once per call, and only where the kernel reads them (drawn noise from
    # an int seed); otherwise rk0, rk1 carry the seed words alone
    keys = (round_keys(seed_lo, seed_hi) if noise_mode == NOISE_DRAWN.value and seed_t is None
            else (seed_lo, seed_hi) + (0,) * 18)
    # allocated per call: the caching allocator makes it a pointer bump, stream-ordered (two
    # calls on two streams never share a row), and inside a CUDA-graph capture it comes from the
    # graph's pool, so a replay writes and reads the same rows (no sync, two plain launches)
    coef = torch.empty((B, NCOEF.value), dtype=torch.int32, device=x_t.device)
    _sampler_coef_kernel[(triton.cdiv(B, COEF_BLOCK.value),)](
        t, t_prev, alphas_cumprod, coef, B, alphas_cumprod.numel(), eta_hi, float(eta) - eta_hi,
        KIND=kind, PRED=pred, VAR=var,
        FINAL_FROM_TABLE=kind == DDIM.value and not set_alpha_to_one,
        USE_CLIPPED=bool(use_clipped), num_warps=1, num_stages=1)
    for b0 in range(0, B, MAX_GRID_Y):
        grid = (P, min(MAX_GRID_Y, B - b0))
        _sampler_step_kernel[grid](
            x_t, mo, noise if noise is not None else x_t, coef,
            thresh if thresh is not None else alphas_cumprod, x_prev,
            x0 if x0.numel() else x_prev, per_sample, mo_bs, mo_inner, mo_rs, var_off, cond_off,
            first, *keys, seed_t if seed_t is not None else t,
            first_t if first_t is not None else t, float(guidance),
            guidance_t if guidance_t is not None else alphas_cumprod,
            float(clip_range), b0, n_tiles,
            VAR=var, CLIP=clip_mode, NOISE=noise_mode,
            SPLIT=mo_inner != per_sample, WANT_X0=x0.numel() > 0, GUIDED=cond_off > 0,
            W_PTR=guidance_t is not None, SEED_PTR=seed_t is not None,
            FIRST_PTR=first_t is not None, R=R, J64=per_sample > 2 ** 31 - 8 * R,
            PAIRED=x_t.element_size() == 2, ONE_TILE=P == n_tiles, num_warps=warps,
            num_stages=1)
