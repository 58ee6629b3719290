"""Forward noising in one pass: x_t = sqrt(ab[t]) x0 + sqrt(1-ab[t]) eps (+ v = sqrt(ab) eps -
sqrt(1-ab) x0), eps given or drawn in the kernel.

Bytes per element (e = element size): eps given: read 2e, write e (+e for v);
eps drawn: read e, write 2e (+e for v). Philox costs ~40 integer ops per 4 normals.

Grid: (chunks of one sample, B). A program never straddles two samples, so the per-sample
scalars (t, sqrt(ab[t]), ...) are loaded once per program; t is clamped so that an unchecked
t (inside a CUDA graph) can never read outside the schedule. A program covers R = 64 num_warps
Philox groups: every thread owns two whole groups (8 consecutive elements: 16-byte accesses for
fp16/bf16, two for fp32) and draws each of its normals once.
"""
import triton
import triton.language as tl

from . import on_tensor_device

from .philox import MAX_GRID_Y, int32_words, noise_key, normal_flat

STREAM = tl.constexpr(0)  # fastdiff.reference.STREAM_Q_SAMPLE


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "first"])
def _q_sample_kernel(x0_ptr, noise_ptr, t_ptr, sqrt_ab_ptr, sqrt_1mab_ptr,
                     xt_ptr, eps_ptr, v_ptr, per_sample, num_t, seed_lo, seed_hi, first,
                     seed_ptr, first_ptr, b0,
                     HAS_NOISE: tl.constexpr, WANT_V: tl.constexpr, SEED_PTR: tl.constexpr,
                     FIRST_PTR: tl.constexpr, R: tl.constexpr, J64: tl.constexpr,
                     PAIRED: tl.constexpr):
    # each program: the 4R consecutive elements of Philox groups g0 .. g0 + R - 1 of sample b;
    # grid axis 1 holds at most 65535 samples, so larger batches are launched in slices from b0
    b = tl.program_id(1) + b0
    t_raw = tl.load(t_ptr + b)  # the noise's step: t as given (reference, CPU and CUDA alike)
    tb = tl.minimum(tl.maximum(t_raw, 0), num_t - 1)
    a = tl.load(sqrt_ab_ptr + tb).to(tl.float32)
    s = tl.load(sqrt_1mab_ptr + tb).to(tl.float32)

    g0 = tl.program_id(0) * R
    if J64:  # samples of 2^31 elements or more
        j = g0.to(tl.int64) * 4 + tl.arange(0, 4 * R)
    else:    # index within the sample: 32-bit math
        j = g0 * 4 + tl.arange(0, 4 * R)
    mask = j < per_sample
    base = b.to(tl.int64) * per_sample               # the sample's first element in memory
    x0 = tl.load(x0_ptr + base + j, mask=mask, other=0.0).to(tl.float32)
    if HAS_NOISE:
        eps = tl.load(noise_ptr + base + j, mask=mask, other=0.0).to(tl.float32)
    else:
        k0, k1, f = noise_key(seed_lo, seed_hi, first, seed_ptr, first_ptr, SEED_PTR, FIRST_PTR)
        eps = normal_flat(k0, k1, f + b, g0, t_raw, STREAM, R, PAIRED)
        tl.store(eps_ptr + base + j, eps.to(eps_ptr.dtype.element_ty), mask=mask)
    tl.store(xt_ptr + base + j, (a * x0 + s * eps).to(xt_ptr.dtype.element_ty), mask=mask)
    if WANT_V:
        tl.store(v_ptr + base + j, (a * eps - s * x0).to(v_ptr.dtype.element_ty), mask=mask)


def plan(per_sample: int):
    """(R, num_warps): R = 64 num_warps Philox groups per program (two per thread), at most
    256, fewer for small samples so that few threads idle."""
    groups = -(-per_sample // 4)
    warps = 4 if groups > 128 else (2 if groups > 64 else 1)
    return 64 * warps, warps


@on_tensor_device
def q_sample_triton(x0, t, sqrt_ab, sqrt_1mab, noise, seed, seed_t, first_index, first_t,
                    x_t, eps, v):
    """x0, noise (optional), x_t, eps, v: dense tensors with identical strides; t: int64 (B,);
    seed_t / first_t: None or 1-element int64 tensors on x0's device (then seed / first_index
    are ignored)."""
    B = x0.shape[0]
    per_sample = x0.numel() // B
    R, warps = plan(per_sample)
    seed_lo, seed_hi, first = int32_words(seed, first_index)
    for b0 in range(0, B, MAX_GRID_Y):
        grid = (triton.cdiv(triton.cdiv(per_sample, 4), R), min(MAX_GRID_Y, B - b0))
        _q_sample_kernel[grid](
            x0, noise if noise is not None else x0, t, sqrt_ab, sqrt_1mab,
            x_t, eps if noise is None else x_t, v if v.numel() else x_t,
            per_sample, sqrt_ab.numel(), seed_lo, seed_hi, first,
            seed_t if seed_t is not None else t, first_t if first_t is not None else t, b0,
            HAS_NOISE=noise is not None, WANT_V=v.numel() > 0, SEED_PTR=seed_t is not None,
            FIRST_PTR=first_t is not None, R=R, J64=per_sample > 2 ** 31 - 8 * R,
            PAIRED=x0.element_size() == 2,
            num_warps=warps)
