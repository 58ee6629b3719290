"""Philox4x32-10 and Box-Muller in Triton: the same normals as fastdiff.reference.philox_normal.

`normal4(seed_lo, seed_hi, g, step, stream)` gives the four normals of philox group g (elements
4g..4g+3). Transcendentals come from libdevice so that the GPU results match the CUDA kernels'
logf/cosf/sinf bit for bit (tl.cos would lower to the approximate sin/cos instructions).
"""
import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

MAX_GRID_Y = 65535  # CUDA's limit on grid axes 1 and 2 (the per-sample kernels put B there)

# The interpreter has no libdevice; numpy's float32 functions stand in there.
USE_LIBDEVICE = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def dev_log(x):  # any float dtype; also the float64 log of sampler_step's coefficients
    if USE_LIBDEVICE:
        return libdevice.log(x)
    else:
        return tl.log(x)


@triton.jit
def _cos(x):
    if USE_LIBDEVICE:
        return libdevice.cos(x)
    else:
        return tl.cos(x)


@triton.jit
def _sin(x):
    if USE_LIBDEVICE:
        return libdevice.sin(x)
    else:
        return tl.sin(x)

PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
TWO_PI = tl.constexpr(6.2831854820251465)  # float32(2 pi)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds on uint32 tensors (broadcastable); returns four uint32 tensors."""
    m0 = tl.full(c0.shape, PHILOX_M0, tl.uint32)
    m1 = tl.full(c0.shape, PHILOX_M1, tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(m0, c0)
        lo0 = m0 * c0
        hi1 = tl.umulhi(m1, c2)
        lo1 = m1 * c2
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def _uniform(r):
    # ((r >> 9) + 0.5) * 2^-23: in (0, 1), exact in float32
    return ((r >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07


@triton.jit
def normal4(seed_lo, seed_hi, g, step, stream):
    """Four standard normals for philox group g (int64 tensor), timestep `step` (int tensor
    broadcastable to g) and stream id. seed_lo/seed_hi: the seed's two 32-bit halves."""
    g = g.to(tl.int64)
    c0 = (g & 0xFFFFFFFF).to(tl.uint32)
    c1 = (g >> 32).to(tl.uint32)
    c2 = (tl.zeros_like(g) + step).to(tl.uint32)
    c3 = (tl.zeros_like(g) + stream).to(tl.uint32)
    k0 = (tl.zeros_like(g) + seed_lo).to(tl.uint32)
    k1 = (tl.zeros_like(g) + seed_hi).to(tl.uint32)
    r0, r1, r2, r3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    # sqrt_rn, not tl.sqrt: tl.sqrt is sqrt.approx.ftz.f32 on the GPU, CUDA's sqrtf (and the
    # CPU's) round correctly, and the normals must match them bit for bit
    rad_a = tl.sqrt_rn(-2.0 * dev_log(_uniform(r0)))
    rad_b = tl.sqrt_rn(-2.0 * dev_log(_uniform(r2)))
    th_a = TWO_PI * _uniform(r1)
    th_b = TWO_PI * _uniform(r3)
    return (rad_a * _cos(th_a), rad_a * _sin(th_a),
            rad_b * _cos(th_b), rad_b * _sin(th_b))


@triton.jit
def normal_at(seed_lo, seed_hi, i, step, stream):
    """The normal of element i (int64 tensor): lane i % 4 of group i // 4. Computes a whole
    Philox block per element; kernels that own aligned groups of 4 should use normal4."""
    n0, n1, n2, n3 = normal4(seed_lo, seed_hi, i >> 2, step, stream)
    lane = i & 3
    return tl.where(lane == 0, n0, tl.where(lane == 1, n1, tl.where(lane == 2, n2, n3)))


@triton.jit
def normal_tile(seed_lo, seed_hi, b, per_sample, rows, i, step, stream, ALIGNED: tl.constexpr):
    """The normals of a (ROWS, 4) tile of sample b: element i = b * per_sample + 4 * row + lane.
    ALIGNED (per_sample % 4 == 0): each row is exactly one Philox group, drawn once; otherwise
    groups straddle samples and each element draws its own lane (normal_at)."""
    if ALIGNED:
        g = b.to(tl.int64) * (per_sample // 4) + rows
        n0, n1, n2, n3 = normal4(seed_lo, seed_hi, g, step, stream)
        lane = tl.arange(0, 4)[None, :]
        return tl.where(lane == 0, n0[:, None],
                        tl.where(lane == 1, n1[:, None], tl.where(lane == 2, n2[:, None], n3[:, None])))
    else:
        return normal_at(seed_lo, seed_hi, i, step, stream)
