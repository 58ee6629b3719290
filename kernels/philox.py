"""Philox4x32-10 and Box-Muller in Triton: the same normals as fastdiff.reference.philox_normal.

`normal4(seed_lo, seed_hi, image, g, step, stream)` gives the four normals of Philox group g
(elements 4g..4g+3 inside the image) of image `image` (its global index); `normal_flat` the 4R
normals of R consecutive groups as one flat vector (each thread owns whole groups, so loads and
stores beside it can be 16 bytes wide); `normal_flat_keys` the same from the seed's round keys
(`round_keys`, computed on the host).

Box-Muller without libdevice: libdevice's sinf and cosf each reduce the angle on their own (with
a Payne-Hanek slow path), and logf/sqrt.rn carry slow paths too. Here (the same operations, in the
same order, as csrc/common.h's CUDA code, so the two GPU backends draw the same bits):
- ln u for u in (0, 1) (never 0, never subnormal): u = m 2^e with m in [2/3, 4/3), ln(1 + f)
  = f + f^2 Q(f), Q of degree 7 (minimax, relative); <= 1.04 ulp over all 2^23 possible u;
- sin and cos of theta in [0, 2 pi) from ONE reduction: quadrant q = rint(theta 2/pi) by the
  1.5 * 2^23 trick, r = theta - q pi/2 by three FMAs (pi/2 in three float32 parts: exact enough
  near multiples of pi/2), sin r = r + r^3 S(r^2) (degree 7), cos r = 1 + r^2 C(r^2) (degree 8),
  quadrant by a swap and two sign flips; <= 1.5 ulp over every angle the kernels can form;
- sqrt on the GPU: rsqrt.approx and one Newton step (<= 1 ulp; CPU: correctly rounded sqrtf).
tests/test_reference.py::test_box_muller_math_accuracy checks them against float64 on every u.
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
    for _ in tl.static_range(10):
        # one 32 x 32 -> 64-bit product gives both words (mul.wide.u32: one IMAD.WIDE.U32,
        # where umulhi and a low multiply are two instructions)
        p0 = c0.to(tl.uint64) * PHILOX_M0
        p1 = c2.to(tl.uint64) * PHILOX_M1
        hi0, lo0 = (p0 >> 32).to(tl.uint32), p0.to(tl.uint32)
        hi1, lo1 = (p1 >> 32).to(tl.uint32), p1.to(tl.uint32)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def philox4x32_10_keys(c0, c1, c2, c3, keys):
    """philox4x32_10 with the ten rounds' key words given: keys = (k0, k1) of round 0, round 1,
    ... (20 int32 scalars, round_keys' words, passed as kernel arguments: no addition forms
    them in the kernel; ptxas moves them from the constant bank into uniform registers two at
    a time, 9 instructions where the 18 additions were)."""
    for i in tl.static_range(10):
        p0 = c0.to(tl.uint64) * PHILOX_M0
        p1 = c2.to(tl.uint64) * PHILOX_M1
        hi0, lo0 = (p0 >> 32).to(tl.uint32), p0.to(tl.uint32)
        hi1, lo1 = (p1 >> 32).to(tl.uint32), p1.to(tl.uint32)
        c0, c1, c2, c3 = (hi1 ^ c1 ^ keys[2 * i].to(tl.uint32), lo1,
                          hi0 ^ c3 ^ keys[2 * i + 1].to(tl.uint32), lo0)
    return c0, c1, c2, c3


def round_keys(seed_lo: int, seed_hi: int):
    """The 20 key words of Philox4x32-10's rounds for the seed words (int32_words' seed_lo,
    seed_hi), as signed 32-bit ints: round r's (seed_lo + r W0, seed_hi + r W1) mod 2^32."""
    return tuple(_s32(w + r * m) for r in range(10)
                 for w, m in ((seed_lo, PHILOX_W0.value), (seed_hi, PHILOX_W1.value)))


@triton.jit
def _f32(v):  # a constexpr as a float32 scalar (fma wants matching operand types)
    return tl.full((), v, tl.float32)


@triton.jit
def _uniform(r):
    # ((r >> 9) + 0.5) * 2^-23 = (r >> 9) 2^-23 + 2^-24, in (0, 1): the float 1 + (r >> 9) 2^-23
    # (its 23 mantissa bits are r >> 9) minus (1 - 2^-24), exact in float32 (24 significant
    # bits), so the same bits as the int-to-float conversion and FMA, one instruction fewer (the
    # shift and the add are one LEA.HI)
    m = ((r >> 9) + 0x3F800000).to(tl.float32, bitcast=True)
    return m - _f32(0.999999940395355224609375)


# ln(1 + f) = f + f^2 Q(f) on f in [-1/3, 1/3], Q's coefficients from degree 0 up (a
# relative-error minimax fit, rounded to float32); csrc/common.h holds the same numbers
LOG_Q0, LOG_Q1 = tl.constexpr(-0.49999936078637364), tl.constexpr(0.33333198138563097)
LOG_Q2, LOG_Q3 = tl.constexpr(-0.2500781890569325), tl.constexpr(0.20011168579606942)
LOG_Q4, LOG_Q5 = tl.constexpr(-0.1641596054634504), tl.constexpr(0.13995808485929315)
LOG_Q6, LOG_Q7 = tl.constexpr(-0.15388540944823348), tl.constexpr(0.1402635138498298)
LN2 = tl.constexpr(0.6931471805599453)
# sin r = r + r^3 (S0 + S1 r^2 + S2 r^4), cos r = 1 + r^2 (C0 + C1 r^2 + C2 r^4 + C3 r^6)
SIN_S0, SIN_S1 = tl.constexpr(-0.1666665460955734), tl.constexpr(0.008332160762279583)
SIN_S2 = tl.constexpr(-0.00019515283237537488)
COS_C0, COS_C1 = tl.constexpr(-0.49999999694476394), tl.constexpr(0.041666620357168664)
COS_C2, COS_C3 = tl.constexpr(-0.0013886681648948365), tl.constexpr(2.4383567388999716e-05)
TWO_OVER_PI = tl.constexpr(0.6366197723675814)
ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: x + it rounds x to an integer (|x| < 2^22)
PIO2_1, PIO2_2 = tl.constexpr(1.5707963705062866), tl.constexpr(-4.371138828673793e-08)
PIO2_3 = tl.constexpr(-1.7151245100059532e-15)  # pi/2 = PIO2_1 + PIO2_2 + PIO2_3 (+ ~1e-23)


@triton.jit
def log_unit(u):
    """ln u for float32 u in (0, 1), never 0 or subnormal (a Philox uniform): no branch."""
    bits = u.to(tl.int32, bitcast=True)
    e = (bits - 0x3F2AAAAB) >> 23                     # u = m 2^e, m in [2/3, 4/3)
    f = (bits - (e << 23)).to(tl.float32, bitcast=True) - 1.0  # exact (Sterbenz)
    q = tl.fma(f, _f32(LOG_Q7), _f32(LOG_Q6))
    q = tl.fma(q, f, _f32(LOG_Q5))
    q = tl.fma(q, f, _f32(LOG_Q4))
    q = tl.fma(q, f, _f32(LOG_Q3))
    q = tl.fma(q, f, _f32(LOG_Q2))
    q = tl.fma(q, f, _f32(LOG_Q1))
    q = tl.fma(q, f, _f32(LOG_Q0))
    return tl.fma(e.to(tl.float32), _f32(LN2), tl.fma(f * f, q, f))


@triton.jit
def sincos(th):
    """(sin th, cos th) for float32 th in [0, 2^21) from one range reduction (accurate for the
    kernels' th in [0, 2 pi); see the module docstring)."""
    j = tl.fma(th, _f32(TWO_OVER_PI), _f32(ROUND_MAGIC))
    q = j.to(tl.int32, bitcast=True)                  # low bits: the quadrant
    k = j - ROUND_MAGIC
    r = tl.fma(k, _f32(-PIO2_1), th)
    r = tl.fma(k, _f32(-PIO2_2), r)
    r = tl.fma(k, _f32(-PIO2_3), r)
    r2 = r * r
    s = tl.fma(tl.fma(r2, _f32(SIN_S2), _f32(SIN_S1)), r2, _f32(SIN_S0))
    s = tl.fma(r * r2, s, r)
    c = tl.fma(tl.fma(tl.fma(r2, _f32(COS_C3), _f32(COS_C2)), r2, _f32(COS_C1)), r2,
               _f32(COS_C0))
    c = tl.fma(r2, c, _f32(1.0))
    swap = (q & 1) != 0
    sn = tl.where(swap, c, s).to(tl.uint32, bitcast=True) ^ ((q & 2).to(tl.uint32) << 30)
    cs = tl.where(swap, s, c).to(tl.uint32, bitcast=True) ^ (((q + 1) & 2).to(tl.uint32) << 30)
    return sn.to(tl.float32, bitcast=True), cs.to(tl.float32, bitcast=True)


@triton.jit
def sqrt_pos(x):
    """sqrt of a positive normal float32: rsqrt.approx and one Newton step on the GPU (<= 1 ulp,
    no slow path); correctly rounded in the interpreter."""
    if USE_LIBDEVICE:
        y = tl.rsqrt(x)
        s = x * y
        return tl.fma(tl.fma(-s, s, x), 0.5 * y, s)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def box_muller(r0, r1, r2, r3):
    """The four normals of one Philox output (fastdiff/reference.py's formula)."""
    rad_a = sqrt_pos(-2.0 * log_unit(_uniform(r0)))
    rad_b = sqrt_pos(-2.0 * log_unit(_uniform(r2)))
    sa, ca = sincos(TWO_PI * _uniform(r1))
    sb, cb = sincos(TWO_PI * _uniform(r3))
    return rad_a * ca, rad_a * sa, rad_b * cb, rad_b * sb


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
    return box_muller(r0, r1, r2, r3)


@triton.jit
def normal_flat(seed_lo, seed_hi, image, g0, step, stream, R: tl.constexpr,
                PAIRED: tl.constexpr):
    """The 4R normals of groups g0 .. g0 + R - 1 of one image, in element order (a flat vector
    for flat loads and stores: element 4 (g - g0) + lane), each drawn by one thread only for
    R >= 32 num_warps.

    The groups' layout must be the one the accesses beside it get, or the normals move through
    shared memory: 16-byte fp32 accesses are 4 elements (one group) per thread, and a 1-D group
    vector gives a thread groups p and p + R/2; 16-byte fp16/bf16 accesses are 8 elements, so
    with PAIRED the groups are held as a (2, R/2) tensor, group 2p + h at [h, p]: Triton's
    default layout spreads dim 1 over the threads and keeps dim 0 in registers, so thread p
    owns groups 2p and 2p + 1."""
    g = _flat_groups(g0, R, PAIRED)
    one = tl.full(g.shape, 1, tl.uint32)
    r0, r1, r2, r3 = philox4x32_10(g, one * image.to(tl.uint32), one * step.to(tl.uint32),
                                   one * stream, one * seed_lo.to(tl.uint32),
                                   one * seed_hi.to(tl.uint32))
    return _flat_normals(r0, r1, r2, r3, R, PAIRED)


@triton.jit
def normal_flat_keys(keys, image, g0, step, stream, R: tl.constexpr, PAIRED: tl.constexpr):
    """normal_flat with the seed as its 20 round-key words (round_keys, kernel arguments): the
    same normals, without the 18 additions per program that form the keys from the seed."""
    g = _flat_groups(g0, R, PAIRED)
    one = tl.full(g.shape, 1, tl.uint32)
    r0, r1, r2, r3 = philox4x32_10_keys(g, one * image.to(tl.uint32), one * step.to(tl.uint32),
                                        one * stream, keys)
    return _flat_normals(r0, r1, r2, r3, R, PAIRED)


@triton.jit
def _flat_groups(g0, R: tl.constexpr, PAIRED: tl.constexpr):
    """normal_flat's group counters (uint32): a (2, R/2) tensor with PAIRED, else (R,)."""
    if PAIRED:
        e = 2 * tl.arange(0, R // 2)[None, :] + tl.arange(0, 2)[:, None]
    else:
        e = tl.arange(0, R)
    # .to(uint32) keeps the low 32 bits of an int32 or int64 (the counter words mod 2^32)
    return g0.to(tl.uint32) + e.to(tl.uint32)


@triton.jit
def _flat_normals(r0, r1, r2, r3, R: tl.constexpr, PAIRED: tl.constexpr):
    n0, n1, n2, n3 = box_muller(r0, r1, r2, r3)
    n = tl.join(tl.join(n0, n2), tl.join(n1, n3))  # [..., i, k] = lane 2 i + k
    if PAIRED:  # [h, p, i, k] -> [p, h, i, k], flattened: element 4 (2p + h) + lane
        n = tl.permute(n, (1, 0, 2, 3))
    return tl.reshape(n, (4 * R,))


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
    u = seed & 0xFFFFFFFFFFFFFFFF
    return _s32(u), _s32(u >> 32), _s32(first)


def _s32(v: int) -> int:
    """v mod 2^32 as a signed 32-bit int."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


@triton.jit
def normal_tile(seed_lo, seed_hi, image, rows, step, stream):
    """The normals of a (ROWS, 4) tile of one image: element j = 4 * row + lane, so each row is
    exactly one Philox group (groups never straddle images), drawn once."""
    n0, n1, n2, n3 = normal4(seed_lo, seed_hi, image, rows, step, stream)
    lane = tl.arange(0, 4)[None, :]
    return tl.where(lane == 0, n0[:, None],
                    tl.where(lane == 1, n1[:, None], tl.where(lane == 2, n2[:, None], n3[:, None])))
