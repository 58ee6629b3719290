"""Forward noising: x_t = sqrt(ab[t]) x0 + sqrt(1 - ab[t]) eps, with eps drawn in-kernel if not given.

Floor: read x0 (and eps when given), write x_t (and eps when drawn, v when asked): with the noise
drawn in the kernel that is 1 read + 2 writes, against 2 reads + 1 write plus a randn pass eager.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .. import backends
from ..reference import STREAM_Q_SAMPLE, memory_order_normal
from ..schedule import Schedule
from . import _checks

IMPLEMENTED = ("torch", "triton", "cuda", "cpu")


def _per_sample(table: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """table[t] shaped to broadcast over a sample, in x's math dtype (float64 for float64)."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    idx = t.clamp(0, table.numel() - 1)
    return table[idx].to(dt).view((-1,) + (1,) * (x.dim() - 1))


def q_sample_ref(x0: Tensor, t: Tensor, sqrt_ab: Tensor, sqrt_1mab: Tensor, noise: Tensor,
                 v_target: bool = False):
    """Plain PyTorch: returns x_t, or (x_t, v) with v = sqrt(ab) eps - sqrt(1 - ab) x0."""
    a, s = _per_sample(sqrt_ab, t, x0), _per_sample(sqrt_1mab, t, x0)
    x, e = x0.to(a.dtype), noise.to(a.dtype)
    x_t = (a * x + s * e).to(x0.dtype)
    if not v_target:
        return x_t
    return x_t, (a * e - s * x).to(x0.dtype)


def _q_sample_body(x0: Tensor, t: Tensor, sqrt_ab: Tensor, sqrt_1mab: Tensor,
                   noise: Optional[Tensor], seed: int, seed_t: Optional[Tensor],
                   first_index: int, first_t: Optional[Tensor],
                   want_v: bool, spare: Optional[Tensor], backend: str,
                   checks: int) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (x_t, eps drawn here or empty, v or empty). Inputs are checked and dense; the
    noise key is (seed_t or seed, first_t or first_index); spare: the shared empty tensor for
    the outputs not asked for (_checks.spare; None through the op: made here); backend: the one
    the wrapper picked ("auto": pick it here, as under torch.compile); checks: the values the
    extension's kernel checks (_checks.value_checks)."""
    x_t = _checks.empty_like(x0)
    eps = _checks.empty_like(x0) if noise is None else \
        x0.new_empty(0) if spare is None else spare
    v = _checks.empty_like(x0) if want_v else x0.new_empty(0) if spare is None else spare
    if backend == "auto":
        backend = backends.pick("q_sample", IMPLEMENTED, x0.device)
    if backend == "torch" or x0.dtype == torch.float64 or x0.numel() == 0:
        if noise is None:
            eps.copy_(memory_order_normal(seed if seed_t is None else seed_t, t, STREAM_Q_SAMPLE,
                                          x0, first_index if first_t is None else first_t))
        out = q_sample_ref(x0, t, sqrt_ab, sqrt_1mab, eps if noise is None else noise, want_v)
        x_t.copy_(out[0] if want_v else out)
        if want_v:
            v.copy_(out[1])
    elif backend == "triton":
        from ..kernels.q_sample import q_sample_triton
        q_sample_triton(x0, t, sqrt_ab, sqrt_1mab, noise, seed, seed_t, first_index, first_t,
                        x_t, eps, v)
    else:
        torch.ops.fastdiff_ext.q_sample(x0, t, sqrt_ab, sqrt_1mab, noise, seed, seed_t,
                                        first_index, first_t, x_t, eps, v, checks)
    return x_t, eps, v


_q_sample_op = torch.library.custom_op("fastdiff::q_sample", mutates_args=())(_q_sample_body)


@_q_sample_op.register_fake
def _(x0, t, sqrt_ab, sqrt_1mab, noise, seed, seed_t, first_index, first_t, want_v, spare,
      backend, checks):
    e = torch.empty_like(x0) if noise is None else x0.new_empty(0)
    return torch.empty_like(x0), e, torch.empty_like(x0) if want_v else x0.new_empty(0)


def draw_seed() -> int:
    """A 63-bit seed from torch's default CPU generator (so torch.manual_seed governs it);
    host-only, no device sync."""
    return int(torch.randint(0, 2 ** 63 - 1, (1,), dtype=torch.int64).item())


def q_sample(x0: Tensor, t, schedule: Schedule, noise: Optional[Tensor] = None,
             seed: Union[int, Tensor, None] = None, *, first_index: Union[int, Tensor] = 0,
             v_target: bool = False):
    """Noise clean samples to timestep t in one kernel.

    Args:
        x0: (B, ...) clean samples, float32/float16/bfloat16 (float64 runs the reference);
            contiguous or channels_last (the outputs keep x0's memory format).
        t: per-sample timesteps, int tensor (B,) (or an int for all samples), in [0, T).
        schedule: a fastdiff.Schedule.
        noise: eps, same shape as x0; None draws it in the kernel from the counter-based stream
            (fastdiff.reference): normal j of sample b is a function of (seed, first_index + b,
            t of the sample, j) only, j its memory position inside the sample.
        seed: seed of the in-kernel noise: an int, or a 1-element int64 tensor on x0's device
            that the kernel reads (a replayed CUDA graph sees seed_t.fill_()). None: drawn from
            torch's CPU generator.
        first_index: global index of sample 0 (the noise is per image, whatever the batch):
            an int in [0, 2^32 - B], or a 1-element int64 tensor on x0's device, read by the
            kernel (an int64 one range-checked as an int, on the device: no host sync; a narrower
            integer dtype is its 32-bit word, taken mod 2^32).
        v_target: also return v = sqrt(ab) eps - sqrt(1 - ab) x0 (v-prediction target).

    Returns:
        (x_t, eps), or (x_t, eps, v) with v_target.
    """
    _checks.float_tensor("x0", x0, ndim_min=1)
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a fastdiff.Schedule, got {type(schedule).__name__}")
    _checks.noise_and_seed("x0", x0, noise, seed)
    device, B = x0.device, x0.shape[0]
    first, first_t = _checks.first_index_arg(first_index, B, device)
    # picked here (its checks depend on it); while torch.compile traces, inside the op
    backend = "auto" if torch.compiler.is_compiling() else backends.pick("q_sample", IMPLEMENTED,
                                                                         device)
    # the extension's kernels check the values of tensor arguments themselves (no device op)
    in_kernel = _checks.checked_in_kernel(backend, x0)
    t_in = t
    t = _checks.timesteps("t", t, B, schedule.num_train_timesteps, device,
                          check_values=not in_kernel)
    x0 = _checks.dense(x0)
    if noise is not None:
        noise = _checks.like(noise.to(x0.dtype), x0)
    seed, seed_t = _checks.seed_arg(draw_seed() if (noise is None and seed is None)
                                    else (0 if seed is None else seed), device)
    checks = _checks.value_checks(in_kernel, (t_in,), first_index, first_t, B)
    tdt = torch.float64 if x0.dtype == torch.float64 else torch.float32
    sqrt_ab = schedule.table("sqrt_alphas_cumprod", device, tdt)
    sqrt_1mab = schedule.table("sqrt_one_minus_alphas_cumprod", device, tdt)
    # the body called straight where the op would add nothing (_checks.direct: ~15 us less)
    if _checks.direct(x0, t, noise, seed_t, first_t):
        x_t, eps, v = _q_sample_body(x0, t, sqrt_ab, sqrt_1mab, noise, seed, seed_t, first,
                                     first_t, bool(v_target), _checks.spare(x0), backend, checks)
    else:
        x_t, eps, v = _q_sample_op(x0, t, sqrt_ab, sqrt_1mab, noise, seed, seed_t, first, first_t,
                                   bool(v_target), None, backend, checks)
    eps = noise if noise is not None else eps
    return (x_t, eps, v) if v_target else (x_t, eps)
