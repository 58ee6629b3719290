"""Counter-based noise: the reference every kernel reproduces.

Noise is keyed per image, never per batch: the normal for element `j` (its position in memory
inside its image) of image `n` (its global index: `first_index + b` for sample b of a batch),
drawn for timestep `step` in stream `stream`, is a pure function of (seed, n, step, stream, j):

    key     = (seed mod 2^32, seed >> 32 mod 2^32)
    counter = (j // 4 mod 2^32, n mod 2^32, step mod 2^32, stream)
    (r0, r1, r2, r3) = Philox4x32-10(key, counter)              (Salmon et al., SC'11)
    u_k   = ((r_k >> 9) + 0.5) * 2^-23                          in (0, 1), exact in float32
    rad_a = sqrt(-2 ln u0),  rad_b = sqrt(-2 ln u2)             (Box-Muller)
    n(4g + 0..3) = rad_a cos(2 pi u1), rad_a sin(2 pi u1), rad_b cos(2 pi u3), rad_b sin(2 pi u3)

So an image's noise does not depend on the batch size, its position in the batch, the number of
processes, the block size, the backend, or whether the launch was captured in a CUDA graph.
Streams keep the ops apart: q_sample draws stream 0, sampler_step stream 1, multistep_step
stream 2. `seed` and the
image index may be int64 tensors (read on their device, no host sync).
"""
from __future__ import annotations

from typing import Union

import torch

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF
TWO_PI_F32 = 6.2831854820251465  # float32(2 pi), the constant the kernels use
STREAM_Q_SAMPLE = 0
STREAM_SAMPLER_STEP = 1
STREAM_MULTISTEP = 2

IntOrTensor = Union[int, torch.Tensor]


def _mulhilo(a: torch.Tensor, m: int):
    p = a * m  # a < 2^32, m < 2^32: the product fits in int64 only as unsigned; split it
    lo = p & MASK32
    # high word without overflow: (a_hi16 * m + ((a_lo16 * m) >> 16)) >> 16
    a_hi, a_lo = a >> 16, a & 0xFFFF
    hi = (a_hi * m + ((a_lo * m) >> 16)) >> 16
    return hi & MASK32, lo


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox4x32 on int64 tensors holding uint32 values (broadcast together); returns four
    int64 tensors."""
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


def split_seed(seed: IntOrTensor):
    """The Philox key words (seed mod 2^32, seed >> 32 mod 2^32) of an int or an int64 tensor."""
    if isinstance(seed, torch.Tensor):
        s = seed.reshape(()).to(torch.int64)
        return s & MASK32, (s >> 32) & MASK32  # arithmetic shift, masked: the bits of seed
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return seed & MASK32, seed >> 32


def uniform_from_bits(r: torch.Tensor) -> torch.Tensor:
    """uint32 bits -> float in (0, 1): ((r >> 9) + 0.5) * 2^-23, exact in float32."""
    return ((r >> 9).double() + 0.5) * (2.0 ** -23)


def _as_int64(v: IntOrTensor, device) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.to(device=device, dtype=torch.int64)
    return torch.tensor(int(v), dtype=torch.int64, device=device)


def image_normal(seed: IntOrTensor, image: IntOrTensor, step: IntOrTensor, stream: int,
                 per_image: int, *, start: int = 0, count: int | None = None,
                 dtype=torch.float64, device="cpu") -> torch.Tensor:
    """The reference normals of elements start .. start+count-1 (count: per_image - start) of
    images `image` at timesteps `step`: shape (N, count) for an image tensor of shape (N,) (step
    an int or a tensor broadcastable to (N,)), (count,) for an int image and int step. float64,
    then cast to `dtype`. `per_image` is unused beyond the default count: the normal of element
    j does not depend on the image's size."""
    count = per_image - start if count is None else count
    j = torch.arange(start, start + count, dtype=torch.int64, device=device)
    img = _as_int64(image, device)
    stp = _as_int64(step, device)
    batched = img.dim() > 0 or stp.dim() > 0
    img, stp = img.reshape(-1, 1), stp.reshape(-1, 1)
    k0, k1 = split_seed(seed.to(device) if isinstance(seed, torch.Tensor) else seed)
    g = j[None, :] >> 2
    r = philox4x32(g & MASK32, img & MASK32, stp & MASK32, torch.full_like(g, stream), k0, k1)
    r = torch.broadcast_tensors(*r)
    u = [uniform_from_bits(x) for x in r]
    rad_a = torch.sqrt(-2.0 * torch.log(u[0]))
    rad_b = torch.sqrt(-2.0 * torch.log(u[2]))
    # the kernels form the angle as one float32 product; so does the reference, so that what is
    # left between them is the rounding of log/cos/sin/sqrt (a few float32 ulp)
    th_a = (TWO_PI_F32 * u[1].float()).double()
    th_b = (TWO_PI_F32 * u[3].float()).double()
    lane = (j & 3)[None, :]
    out = torch.where(lane == 0, rad_a * torch.cos(th_a),
          torch.where(lane == 1, rad_a * torch.sin(th_a),
          torch.where(lane == 2, rad_b * torch.cos(th_b), rad_b * torch.sin(th_b))))
    out = out.to(dtype)
    return out if batched else out[0]


def philox_normal(seed: IntOrTensor, step: IntOrTensor, stream: int, numel: int, *,
                  image: IntOrTensor = 0, start: int = 0, dtype=torch.float64,
                  device="cpu") -> torch.Tensor:
    """The reference normals of elements start .. start+numel-1 of one image (global index
    `image`) at one timestep, shape (numel,)."""
    return image_normal(seed, image, step, stream, start + numel, start=start, dtype=dtype,
                        device=device).reshape(numel)


def memory_order_normal(seed: IntOrTensor, step: IntOrTensor, stream: int, x: torch.Tensor,
                        first_index: IntOrTensor = 0) -> torch.Tensor:
    """The noise the kernels draw for a dense tensor x (contiguous or channels_last) whose
    sample b is image first_index + b: the element at memory position j inside sample b gets
    normal j of that image at step[b] (step: an int or a tensor of shape (B,)). Shaped and
    strided like x, in x's dtype; seed, step and first_index may be device tensors."""
    B = x.shape[0]
    per = x.numel() // B if B else 0
    img = _as_int64(first_index, x.device).reshape(()) + torch.arange(B, device=x.device)
    stp = _as_int64(step, x.device)
    stp = stp.reshape(-1).expand(B) if stp.numel() == 1 else stp
    flat = image_normal(seed, img, stp, stream, per, dtype=x.dtype, device=x.device)
    return torch.as_strided(flat.reshape(-1), x.shape, x.stride())
