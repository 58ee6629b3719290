"""Counter-based noise: the reference every kernel reproduces.

The normal for element `i` (its position in the tensor's memory order) of the draw for timestep
`step` in stream `stream` is a pure function of (seed, step, stream, i):

    key     = (seed mod 2^32, seed >> 32 mod 2^32)
    counter = (g mod 2^32, g >> 32, step mod 2^32, stream)      with g = i // 4
    (r0, r1, r2, r3) = Philox4x32-10(key, counter)              (Salmon et al., SC'11)
    u_k   = ((r_k >> 9) + 0.5) * 2^-23                          in (0, 1), exact in float32
    rad_a = sqrt(-2 ln u0),  rad_b = sqrt(-2 ln u2)             (Box-Muller)
    n(4g + 0..3) = rad_a cos(2 pi u1), rad_a sin(2 pi u1), rad_b cos(2 pi u3), rad_b sin(2 pi u3)

So the noise does not depend on the block size, the number of programs, the backend, or whether
the launch was captured in a CUDA graph. Streams keep the ops apart: q_sample draws stream 0,
sampler_step stream 1.
"""
from __future__ import annotations

import torch

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF
TWO_PI_F32 = 6.2831854820251465  # float32(2 pi), the constant the kernels use
STREAM_Q_SAMPLE = 0
STREAM_SAMPLER_STEP = 1


def _mulhilo(a: torch.Tensor, m: int):
    p = a * m  # a < 2^32, m < 2^32: the product fits in int64 only as unsigned; split it
    lo = p & MASK32
    # high word without overflow: (a_hi16 * m + ((a_lo16 * m) >> 16)) >> 16
    a_hi, a_lo = a >> 16, a & 0xFFFF
    hi = (a_hi * m + ((a_lo * m) >> 16)) >> 16
    return hi & MASK32, lo


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox4x32 on int64 tensors holding uint32 values; returns four int64 tensors."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & MASK32 for c in (c0, c1, c2, c3))
    k0, k1 = (torch.as_tensor(k, dtype=torch.int64) & MASK32 for k in (k0, k1))
    for r in range(rounds):
        if r:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def split_seed(seed: int) -> tuple[int, int]:
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return seed & MASK32, seed >> 32


def uniform_from_bits(r: torch.Tensor) -> torch.Tensor:
    """uint32 bits -> float in (0, 1): ((r >> 9) + 0.5) * 2^-23, exact in float32."""
    return ((r >> 9).double() + 0.5) * (2.0 ** -23)


def philox_normal(seed: int, step, stream: int, numel: int, *, per_sample: int | None = None,
                  dtype=torch.float64, device="cpu", start: int = 0) -> torch.Tensor:
    """The reference normals for elements start .. start+numel-1, in float64 (then cast to
    `dtype`).

    `step` is an int, or an int tensor of shape (B,) giving each sample its own step: element i
    belongs to sample i // per_sample."""
    i = torch.arange(start, start + numel, dtype=torch.int64, device=device)
    g = i >> 2
    if isinstance(step, torch.Tensor) and step.dim() > 0:
        if per_sample is None:
            raise ValueError("per_sample is needed when step has one value per sample")
        s = step.to(device=device, dtype=torch.int64)[i // per_sample]
    else:
        s = torch.full_like(i, int(step))
    k0, k1 = split_seed(seed)
    r = philox4x32(g & MASK32, g >> 32, s & MASK32, torch.full_like(i, stream), k0, k1)
    u = [uniform_from_bits(x) for x in r]
    rad_a = torch.sqrt(-2.0 * torch.log(u[0]))
    rad_b = torch.sqrt(-2.0 * torch.log(u[2]))
    # the kernels form the angle as one float32 product; so does the reference, so that what is
    # left between them is the rounding of log/cos/sin/sqrt (a few float32 ulp)
    th_a = (TWO_PI_F32 * u[1].float()).double()
    th_b = (TWO_PI_F32 * u[3].float()).double()
    lane = i & 3
    out = torch.where(lane == 0, rad_a * torch.cos(th_a),
          torch.where(lane == 1, rad_a * torch.sin(th_a),
          torch.where(lane == 2, rad_b * torch.cos(th_b), rad_b * torch.sin(th_b))))
    return out.to(dtype)


def memory_order_normal(seed: int, step, stream: int, x: torch.Tensor) -> torch.Tensor:
    """The noise the kernels draw for a dense tensor x (contiguous or channels_last): the element
    at memory position i gets normal i; sample b's elements take step[b]. Shaped and strided like
    x, in x's dtype."""
    flat = philox_normal(seed, step, stream, x.numel(), per_sample=x.numel() // max(x.shape[0], 1),
                         dtype=x.dtype, device=x.device)
    return torch.as_strided(flat, x.shape, x.stride())
