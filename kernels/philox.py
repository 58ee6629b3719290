"""Philox4x32-10 and Box-Muller in Triton: the same normals as fastdiff.reference.philox_normal.

`normal4(seed_lo, seed_hi, image, g, step, stream)` gives the four normals of Philox group g
(elements 4g..4g+3 inside the image) of image `image` (its global index). Transcendentals come from libdevice so that the GPU results match the CUDA kernels'
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
def normal4(seed_lo, seed_hi, image, g, step, stream):
    """Four standard normals for Philox group g (int tensor: elements 4g..4g+3 of the image) of
    image `image` (its global index), timestep `step` (int, broadcastable to g) and stream id:
    counter (g, image, step, stream). seed_lo/seed_hi: the seed's two 32-bit words."""
    g = g.to(tl.int64)
    c0 = (g & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((tl.zeros_like(g) + image) & 0xFFFFFFFF).to(tl.uint32)
    c2 = ((tl.zeros_like(g) + step) & 0xFFFFFFFF).to(tl.uint32)
    c3 = (tl.zeros_like(g) + stream).to(tl.uint32)
    k0 = ((tl.zeros_like(g) + seed_lo) & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((tl.zeros_like(g) + seed_hi) & 0xFFFFFFFF).to(tl.uint32)
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
def noise_key(seed_lo, seed_hi, first, seed_ptr, first_ptr, SEED_PTR: tl.constexpr,
              FIRST_PTR: tl.constexpr):
    """(seed_lo, seed_hi, first) as int64 scalars: from the int arguments (the launcher passes
    them as signed 32-bit words, never specialised on their values) or, with SEED_PTR /
    FIRST_PTR, read from 1-element int64 device tensors (a replayed CUDA graph sees a fill_)."""
    if SEED_PTR:
        s = tl.load(seed_ptr)
        lo = s & 0xFFFFFFFF
        hi = (s >> 32) & 0xFFFFFFFF
    else:
        lo = seed_lo.to(tl.int64) & 0xFFFFFFFF
        hi = seed_hi.to(tl.int64) & 0xFFFFFFFF
    if FIRST_PTR:
        f = tl.load(first_ptr)
    else:
        f = first.to(tl.int64)
    return lo, hi, f & 0xFFFFFFFF


def int32_words(seed: int, first: int):
    """The launcher's (seed_lo, seed_hi, first) as signed 32-bit ints: Triton types an int
    argument by its value (i32, u32, i64), so fixed-width words keep one compiled kernel."""
    def s32(v):
        v &= 0xFFFFFFFF
        return v - (1 << 32) if v >= 1 << 31 else v
    u = seed & 0xFFFFFFFFFFFFFFFF
    return s32(u), s32(u >> 32), s32(first)


@triton.jit
def normal_tile(seed_lo, seed_hi, image, rows, step, stream):
    """The normals of a (ROWS, 4) tile of one image: element j = 4 * row + lane, so each row is
    exactly one Philox group (groups never straddle images), drawn once."""
    n0, n1, n2, n3 = normal4(seed_lo, seed_hi, image, rows, step, stream)
    lane = tl.arange(0, 4)[None, :]
    return tl.where(lane == 0, n0[:, None],
                    tl.where(lane == 1, n1[:, None], tl.where(lane == 2, n2[:, None], n3[:, None])))
