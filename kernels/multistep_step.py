"""One multistep-solver step (DPM-Solver++, its SDE variant, UniPC) in one pass: x0 from the
model output, clip or dynamic threshold, the corrector (with last_sample), the predictor over
the x0 ring, + noise z given or drawn in the kernel (Philox stream 2); the new x0 into ring slot
step % K, y into last_sample.

Bytes per element (e = element size of x_t): read x_t, model_output (e each, 2e with guidance),
K ring slots and last_sample (4 bytes each, float32 state), noise when given (e); write x_prev
(e), one ring slot and last_sample (4 each).

Grid: (chunks of one sample, B). Each program reads the step's coefficient row once (from the
device when the step is a tensor: `do_not_specialize`, so a new step never recompiles) and
forms the float32 coefficients in float64; per-element math is float32, the algebra and order of
csrc/multistep_step.h. A program's tile is (ROWS, 8): each row two whole Philox groups, so a
thread moves 8 consecutive elements (16-byte accesses for fp16/bf16) and draws each normal once.
"""
import triton
import triton.language as tl

from . import on_tensor_device
from .philox import MAX_GRID_Y, int32_words, noise_key, normal4

# Globals read inside @triton.jit must be tl.constexpr; the launcher uses their .value.
STREAM = tl.constexpr(2)  # fastdiff.reference.STREAM_MULTISTEP
NCOEF = tl.constexpr(14)  # fastdiff.ops.multistep_step.NCOEF (columns: its COEFS)
EPSILON, SAMPLE, V_PREDICTION = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
CLIP_NONE, CLIP_RANGE, CLIP_THRESHOLD = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
NOISE_NONE, NOISE_GIVEN, NOISE_DRAWN = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _normal_tile8(seed_lo, seed_hi, image, rows, step):
    """The normals of a (ROWS, 8) tile of one image: row r holds Philox groups 2r and 2r + 1
    (elements 8r .. 8r + 7), each drawn once."""
    a0, a1, a2, a3 = normal4(seed_lo, seed_hi, image, 2 * rows, step, STREAM)
    b0, b1, b2, b3 = normal4(seed_lo, seed_hi, image, 2 * rows + 1, step, STREAM)
    lane = tl.arange(0, 8)[None, :]
    lo = tl.where(lane == 0, a0[:, None], tl.where(lane == 1, a1[:, None],
                  tl.where(lane == 2, a2[:, None], a3[:, None])))
    hi = tl.where(lane == 4, b0[:, None], tl.where(lane == 5, b1[:, None],
                  tl.where(lane == 6, b2[:, None], b3[:, None])))
    return tl.where(lane < 4, lo, hi)


@triton.jit
def _col(row_ptr, c: tl.constexpr):
    return tl.load(row_ptr + c).to(tl.float32)


@triton.jit(do_not_specialize=["step_arg", "seed_lo", "seed_hi", "first"])
def _multistep_step_kernel(x_ptr, mo_ptr, noise_ptr, ring_ptr, last_ptr, out_ptr, coefs_ptr,
                           step_ptr, thr_ptr, w_ptr, seed_ptr, first_ptr, per_sample,
                           slot_stride, cond_off, num_steps, step_arg, seed_lo, seed_hi, first,
                           w_arg, clip_range, b0,
                           PRED: tl.constexpr, CLIP: tl.constexpr, NOISE: tl.constexpr,
                           K: tl.constexpr, HAS_LAST: tl.constexpr, GUIDED: tl.constexpr,
                           W_PTR: tl.constexpr, STEP_PTR: tl.constexpr, SEED_PTR: tl.constexpr,
                           FIRST_PTR: tl.constexpr, ROWS: tl.constexpr):
    # grid axis 1 holds at most 65535 samples: larger batches are launched in slices from b0
    b = tl.program_id(1) + b0
    if STEP_PTR:
        s = tl.load(step_ptr)
    else:
        s = step_arg.to(tl.int64)
    s = tl.minimum(tl.maximum(s, 0), num_steps - 1)  # an unchecked device step stays in the table
    row = coefs_ptr + s * NCOEF
    alpha = tl.load(row)
    sigma = tl.load(row + 1)
    if PRED == EPSILON:
        cx = (1.0 / alpha).to(tl.float32)
        cm = (-sigma / alpha).to(tl.float32)
    elif PRED == SAMPLE:
        cx = 0.0
        cm = 1.0
    else:
        cx = alpha.to(tl.float32)
        cm = (-sigma).to(tl.float32)
    slot = s % K

    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    lane = tl.arange(0, 8)
    j = rows[:, None] * 8 + lane[None, :]            # index within the sample
    mask = j < per_sample
    i = b.to(tl.int64) * per_sample + j              # index in memory order, in every tensor
    x = tl.load(x_ptr + i, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(mo_ptr + i, mask=mask, other=0.0).to(tl.float32)
    if GUIDED:  # classifier-free guidance: m_u + w (m_c - m_u)
        if W_PTR:
            w = tl.load(w_ptr).to(tl.float32)
        else:
            w = w_arg
        mc = tl.load(mo_ptr + i + cond_off, mask=mask, other=0.0).to(tl.float32)
        m = m + w * (mc - m)
    x0 = cx * x + cm * m
    # clamps that keep a NaN, as torch.clamp (a diverged model must not be clipped into an image)
    if CLIP == CLIP_RANGE:
        x0 = tl.where(x0 < -clip_range, -clip_range, tl.where(x0 > clip_range, clip_range, x0))
    elif CLIP == CLIP_THRESHOLD:
        thr = tl.load(thr_ptr + b).to(tl.float32)
        x0 = tl.where(x0 < -thr, -thr, tl.where(x0 > thr, thr, x0)) / thr
    h0 = tl.load(ring_ptr + i, mask=mask, other=0.0)
    if K > 1:
        h1 = tl.load(ring_ptr + slot_stride + i, mask=mask, other=0.0)
    if K > 2:
        h2 = tl.load(ring_ptr + 2 * slot_stride + i, mask=mask, other=0.0)
    if HAS_LAST:  # UniPC's corrector: y from the previous sample, the new x0 and the ring
        xl = tl.load(last_ptr + i, mask=mask, other=0.0)
        y = _col(row, 2) * x + _col(row, 3) * xl + _col(row, 4) * x0
        y = y + _col(row, 5) * h0
        if K > 1:
            y = y + _col(row, 6) * h1
        if K > 2:
            y = y + _col(row, 7) * h2
    else:
        y = x
    out = _col(row, 8) * y + _col(row, 9) * x0
    out = out + _col(row, 10) * h0
    if K > 1:
        out = out + _col(row, 11) * h1
    if K > 2:
        out = out + _col(row, 12) * h2
    if NOISE != NOISE_NONE:
        if NOISE == NOISE_GIVEN:
            z = tl.load(noise_ptr + i, mask=mask, other=0.0).to(tl.float32)
        else:
            k0s, k1s, f = noise_key(seed_lo, seed_hi, first, seed_ptr, first_ptr, SEED_PTR,
                                    FIRST_PTR)
            z = _normal_tile8(k0s, k1s, f + b, rows, s)
        out = out + _col(row, 13) * z
    # every read is done: the writes (out may be x_t; the slot written may have been read)
    tl.store(out_ptr + i, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(ring_ptr + slot * slot_stride + i, x0, mask=mask)
    if HAS_LAST:
        tl.store(last_ptr + i, y, mask=mask)


@on_tensor_device
def multistep_step_triton(x_t, mo, ring, coefs, step, step_t, last_sample, noise, thresh, seed,
                          seed_t, first_index, first_t, draw_noise, pred, clip_mode, clip_range,
                          cond_off, guidance, guidance_t, out):
    """Checked, laid-out tensors (fastdiff.ops.multistep_step): x_t, noise, out, the ring's
    slots and last_sample share x_t's memory order; mo likewise, its conditional half cond_off
    further when cond_off > 0; coefs float64 (S, 14) contiguous; thresh float32 (B,) for
    clip_mode 2; step_t / seed_t / first_t / guidance_t: None or 1-element device tensors
    (int64, int64, int64, float32) read by the kernel instead of the int/float."""
    B = x_t.shape[0]
    per_sample = x_t.numel() // B
    rows = 128 if per_sample >= 1024 else 16
    seed_lo, seed_hi, first = int32_words(seed, first_index)
    step_lo = int32_words(0, step)[2]  # a checked int step < 2^31: a fixed-width word
    K = ring.shape[0]
    noise_mode = (NOISE_GIVEN if noise is not None else
                  (NOISE_DRAWN if draw_noise else NOISE_NONE)).value
    for b0 in range(0, B, MAX_GRID_Y):
        grid = (triton.cdiv(per_sample, 8 * rows), min(MAX_GRID_Y, B - b0))
        _multistep_step_kernel[grid](
            x_t, mo, noise if noise is not None else x_t, ring,
            last_sample if last_sample is not None else ring, out, coefs,
            step_t if step_t is not None else coefs, thresh if thresh is not None else ring,
            guidance_t if guidance_t is not None else ring,
            seed_t if seed_t is not None else coefs, first_t if first_t is not None else coefs,
            per_sample, ring.stride(0) if K > 1 else 0, cond_off, coefs.shape[0], step_lo,
            seed_lo, seed_hi, first, float(guidance), float(clip_range), b0,
            PRED=pred, CLIP=clip_mode, NOISE=noise_mode, K=K, HAS_LAST=last_sample is not None,
            GUIDED=cond_off > 0, W_PTR=guidance_t is not None, STEP_PTR=step_t is not None,
            SEED_PTR=seed_t is not None, FIRST_PTR=first_t is not None, ROWS=rows, num_warps=4)
