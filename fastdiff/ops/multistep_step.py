"""One step of a multistep solver (DPM-Solver++ 1/2/3M, its 2M SDE variant, UniPC's predictor
and corrector) in one pass over memory.

Per element, from x_t, the model output and an x0 history ring of K <= 3 slots:

    m      = model_output                      (guidance: m_u + w (m_c - m_u))
    x0_new = epsilon: (x_t - sigma m) / alpha;  sample: m;  v_prediction: alpha x_t - sigma m
    x0_new = dynamic threshold (per-sample quantile s of |x0_new|, clamp(x0, -s, s) / s) or
             clamp(x0_new, -clip_sample_range, clip_sample_range); a NaN is kept
    y      = x_t                                               without last_sample
           = corr_x x_t + corr_last x_last + corr_new x0_new + sum_k corr_hk ring[k]   with it
    x_prev = pred_y y + pred_new x0_new + sum_k pred_hk ring[k] + noise z

then x0_new goes to ring slot `step % K` (after every read: an order-3 UniPC corrector reads that
slot, the oldest x0, first) and y to last_sample. Every coefficient is a column of one row of a
float64 table (fastdiff.solvers computes it on the host once per schedule): the kernels compute
nothing per step but the row's float32 casts, and read the row index from the device, so a
whole sampling loop captures in one CUDA graph.

Floor: read x_t, model_output (2x with guidance), K ring slots, last_sample; write x_prev, one
ring slot, last_sample (+ noise when given). Thresholding adds a per-sample quantile pass over
x0 (torch ops, on the device).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from .. import backends
from ..reference import STREAM_MULTISTEP, memory_order_normal
from . import _checks
from .sampler_step import (PREDICTION_TYPES, threshold_scale, threshold_scale_topk,
                           x0_and_guidance_args)

IMPLEMENTED = ("torch", "triton", "cuda", "cpu")

# Columns of the coefficient table, in order (fastdiff.solvers writes them, the kernels read them
# by these positions: csrc/multistep_step.h and kernels/multistep_step.py use the same indices).
COEFS = ("alpha", "sigma", "corr_x", "corr_last", "corr_new", "corr_h0", "corr_h1", "corr_h2",
         "pred_y", "pred_new", "pred_h0", "pred_h1", "pred_h2", "noise")
NCOEF = len(COEFS)
MAX_ORDER = 3  # ring slots at most
COL = {name: i for i, name in enumerate(COEFS)}
CLIP_NONE, CLIP_RANGE, CLIP_THRESHOLD = 0, 1, 2


def _math_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def state_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the ring and last_sample for samples x: float32 (float64 for float64 x)."""
    return _math_dtype(x)


def empty_ring(x: Tensor, K: int) -> Tensor:
    """A ring of K slots for samples like x: (K, *x.shape) in the state dtype, each slot with
    x's memory layout (contiguous or channels_last), on x's device. Its contents are unset: a
    solver reads a slot only after a step wrote it."""
    if isinstance(K, bool) or not isinstance(K, int) or not 1 <= K <= MAX_ORDER:
        raise ValueError(f"K must be an int in [1, {MAX_ORDER}], got {K!r}")
    slot = _checks.dense(x)
    ring = torch.empty((K,) + tuple(slot.shape), dtype=state_dtype(x), device=x.device)
    if slot.is_contiguous():
        return ring
    # permute a contiguous buffer so that every slot has the strides of the dense x
    order = sorted(range(slot.dim()), key=lambda d: -slot.stride(d))
    buf = torch.empty((K,) + tuple(slot.shape[d] for d in order), dtype=state_dtype(x),
                      device=x.device)
    inv = [0] * slot.dim()
    for pos, d in enumerate(order):
        inv[d] = pos + 1
    return buf.permute([0] + inv)


def _row(coefs: Tensor, step, mdt: torch.dtype) -> list[Tensor]:
    """The coefficient row of `step` (an int, or a 1-element int64 tensor, clamped into the
    table: no host sync), as NCOEF 0-d tensors in the element math dtype."""
    S = coefs.shape[0]
    if isinstance(step, Tensor):
        idx = step.reshape(1).to(coefs.device, torch.int64).clamp(0, S - 1)
    else:
        idx = torch.tensor([min(max(int(step), 0), S - 1)], device=coefs.device)
    row = coefs.index_select(0, idx).reshape(-1).to(mdt)
    return list(row.unbind(0))


def multistep_step_ref(x_t: Tensor, model_output: Tensor, ring: Tensor, coefs: Tensor, step, *,
                       prediction_type: str = "epsilon", last_sample: Optional[Tensor] = None,
                       thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                       sample_max_value: float = 1.0, clip_sample: bool = False,
                       clip_sample_range: float = 1.0, noise: Optional[Tensor] = None,
                       guidance_scale=None):
    """Plain PyTorch, pure (writes nothing): returns (x_prev, x0_new, y), x_prev in x_t's dtype,
    x0_new and y in the state dtype. Elements in float64 for float64 inputs, else float32 (the
    coefficients rounded to it, as the kernels do). `noise`: the z of `+ noise z` (None: no
    noise term). `step`: an int or a 1-element integer tensor (clamped into the table)."""
    mdt = _math_dtype(x_t)
    view = (-1,) + (1,) * (x_t.dim() - 1)
    c = _row(coefs, step, mdt)
    alpha, sigma = c[COL["alpha"]], c[COL["sigma"]]
    x = x_t.to(mdt)
    m = model_output.to(mdt)
    if guidance_scale is not None:
        w = guidance_scale.to(mdt).reshape(()) if isinstance(guidance_scale, Tensor) \
            else float(guidance_scale)
        m_u, m_c = m.chunk(2)
        m = m_u + w * (m_c - m_u)
    if prediction_type == "epsilon":
        x0 = (x - sigma * m) / alpha
    elif prediction_type == "sample":
        x0 = m
    else:
        x0 = alpha * x - sigma * m
    if thresholding:
        s = threshold_scale(x0, dynamic_thresholding_ratio, sample_max_value).view(view)
        x0 = torch.minimum(torch.maximum(x0, -s), s) / s  # NaN kept
    elif clip_sample:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    K = ring.shape[0]
    hist = [ring[k].to(mdt) for k in range(K)]
    if last_sample is None:
        y = x
    else:
        y = c[COL["corr_x"]] * x + c[COL["corr_last"]] * last_sample.to(mdt) \
            + c[COL["corr_new"]] * x0
        for k in range(K):
            y = y + c[COL["corr_h0"] + k] * hist[k]
    x_prev = c[COL["pred_y"]] * y + c[COL["pred_new"]] * x0
    for k in range(K):
        x_prev = x_prev + c[COL["pred_h0"] + k] * hist[k]
    if noise is not None:
        x_prev = x_prev + c[COL["noise"]] * noise.to(mdt)
    return x_prev.to(x_t.dtype), x0, y


def _x0_coefs(coefs: Tensor, step, prediction_type: str) -> tuple[Tensor, Tensor]:
    """(cx, cm) of x0 = cx x + cm m as the kernels form them: in float64 from the row, then
    float32 (0-d tensors on coefs' device)."""
    c = _row(coefs, step, torch.float64)
    alpha, sigma = c[COL["alpha"]], c[COL["sigma"]]
    if prediction_type == "epsilon":
        cx, cm = 1.0 / alpha, -sigma / alpha
    elif prediction_type == "sample":
        cx, cm = torch.zeros_like(alpha), torch.ones_like(alpha)
    else:
        cx, cm = alpha, -sigma
    return cx.float(), cm.float()


def _slot_index(step: int, step_t: Optional[Tensor], S: int, K: int, device) -> Tensor:
    """(1,) int64: the ring slot the new x0 goes to, step % K of the clamped step, on device."""
    if step_t is not None:
        return step_t.reshape(1).clamp(0, S - 1) % K
    return torch.tensor([min(max(step, 0), S - 1) % K], device=device)


def _multistep_step_body(x_t: Tensor, model_output: Tensor, ring: Tensor, coefs: Tensor,
                         step: int, step_t: Optional[Tensor], last_sample: Optional[Tensor],
                         noise: Optional[Tensor], seed: int, seed_t: Optional[Tensor],
                         first_index: int, first_t: Optional[Tensor], draw_noise: bool,
                         prediction_type: str, thresholding: bool,
                         dynamic_thresholding_ratio: float, sample_max_value: float,
                         clip_sample: bool, clip_sample_range: float, guided: bool,
                         guidance: float, guidance_t: Optional[Tensor], backend: str,
                         out: Tensor, checks: int) -> None:
    """Inputs checked; x_t, ring slots, last_sample, noise and out dense alike. Writes out, ring
    slot step % K and last_sample. Noise: given, or drawn when draw_noise from (seed_t or seed,
    first_t or first_index); backend: the one the wrapper picked, or (under torch.compile)
    "auto" or "use:<name>" to pick here; checks: the values the extension's kernel checks
    (_checks.value_checks)."""
    if x_t.numel() == 0:
        return
    S, K = coefs.shape[0], ring.shape[0]
    name = backend
    if backend == "auto":  # (under torch.compile the wrapper leaves the pick to the op)
        name = backends.pick("multistep_step", IMPLEMENTED, x_t.device)
    elif backend.startswith("use:"):  # forced for this call, as use_backend
        with backends.use_backend(backend[4:]):
            name = backends.pick("multistep_step", IMPLEMENTED, x_t.device)
    w = (guidance if guidance_t is None else guidance_t) if guided else None
    step_v = step if step_t is None else step_t
    if name == "torch" or x_t.dtype == torch.float64:
        if noise is None and draw_noise:
            idx = step_t.reshape(1).clamp(0, S - 1) if step_t is not None else \
                min(max(step, 0), S - 1)
            noise = memory_order_normal(seed if seed_t is None else seed_t, idx,
                                        STREAM_MULTISTEP, x_t.to(_math_dtype(x_t)),
                                        first_index if first_t is None else first_t)
        x_prev, x0, y = multistep_step_ref(
            x_t, model_output, ring, coefs, step_v, prediction_type=prediction_type,
            last_sample=last_sample, thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            sample_max_value=sample_max_value, clip_sample=clip_sample,
            clip_sample_range=clip_sample_range, noise=noise, guidance_scale=w)
        # every read is done: now the writes (out may be x_t itself)
        out.copy_(x_prev)
        ring.index_copy_(0, _slot_index(step, step_t, S, K, ring.device), x0.unsqueeze(0))
        if last_sample is not None:
            last_sample.copy_(y)
        return
    clip_mode = CLIP_THRESHOLD if thresholding else (CLIP_RANGE if clip_sample else CLIP_NONE)
    thresh = None
    if thresholding:  # the quantile needs all of x0 first: a separate pass, on the device
        cx, cm = _x0_coefs(coefs, step_v, prediction_type)
        m = model_output.float()
        if guided:
            m_u, m_c = m.chunk(2)
            m = m_u + (w if guidance_t is None else guidance_t.reshape(())) * (m_c - m_u)
        x0 = cx * x_t.float() + cm * m  # the kernels' expression
        thresh = threshold_scale_topk(x0, dynamic_thresholding_ratio,
                                       sample_max_value).contiguous()
    pred = PREDICTION_TYPES.index(prediction_type)
    cond_off = x_t.numel() if guided else 0
    args = (x_t, model_output, ring, coefs, step, step_t, last_sample, noise, thresh, seed,
            seed_t, first_index, first_t, draw_noise, pred, clip_mode, float(clip_sample_range),
            cond_off, float(guidance), guidance_t if guided else None, out)
    if name == "triton":
        from ..kernels.multistep_step import multistep_step_triton
        multistep_step_triton(*args)
    else:
        torch.ops.fastdiff_ext.multistep_step(*args, checks)


_multistep_step_op = torch.library.custom_op(
    "fastdiff::multistep_step", mutates_args=("ring", "last_sample", "out"))(_multistep_step_body)


@_multistep_step_op.register_fake
def _(x_t, model_output, ring, coefs, step, step_t, last_sample, noise, seed, seed_t,
      first_index, first_t, draw_noise, prediction_type, thresholding, dynamic_thresholding_ratio,
      sample_max_value, clip_sample, clip_sample_range, guided, guidance, guidance_t, backend,
      out, checks):
    return None


def _same_layout(a, strides, shape) -> bool:
    """a's strides (a tensor's, or a tuple of them) are `strides` on every dim longer than 1 (a
    size-1 dim's stride is moot)."""
    sa = a.stride() if isinstance(a, Tensor) else a
    return sa == strides or all(x == y or n == 1 for x, y, n in zip(sa, strides, shape))


# the pairs that must not share memory (out may be x_t itself: in place)
_DISJOINT = (("out", "ring"), ("out", "last_sample"), ("last_sample", "ring"), ("x_t", "ring"),
             ("x_t", "last_sample"))


def _check_disjoint(out, last_sample, ring, x_t) -> None:
    """Raises if a pair of _DISJOINT shares a storage (None and empty tensors skipped). Not
    while torch.compile traces (storages are not traceable: the check runs eagerly)."""
    if torch.compiler.is_compiling():
        return
    ptr = {}  # the storage's address: the data's less the offset (no storage object made)
    for name, v in (("out", out), ("last_sample", last_sample), ("ring", ring), ("x_t", x_t)):
        if v is not None and v.numel():
            ptr[name] = v.data_ptr() - v.storage_offset() * v.element_size()
    for a, b in _DISJOINT:
        if a in ptr and b in ptr and ptr[a] == ptr[b]:
            raise ValueError(f"{a} and {b} must not share memory")


def _state(name: str, v, x_t: Tensor, shape, sdt: torch.dtype):
    """A state tensor (ring, last_sample): its shape, dtype, device and the slots' layout."""
    if type(v) in _checks._PLAIN and v.dtype == sdt and v.device == x_t.device and \
            v.shape == shape:  # the common case in a few reads
        return
    _checks.tensor(name, v)
    _checks.same_device("x_t", x_t, **{name: v})
    if tuple(v.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(v.shape)}")
    if v.dtype != sdt:
        raise TypeError(f"{name} must be {str(sdt).replace('torch.', '')} (the solver state: "
                        f"float32, float64 for float64 x_t), got {v.dtype}")


def multistep_step(x_t: Tensor, model_output: Tensor, ring: Tensor, coefs: Tensor, step, *,
                   prediction_type: str = "epsilon", last_sample: Optional[Tensor] = None,
                   thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                   sample_max_value: float = 1.0, clip_sample: bool = False,
                   clip_sample_range: float = 1.0, noise: Optional[Tensor] = None,
                   seed: Union[int, Tensor, None] = None, first_index: Union[int, Tensor] = 0,
                   guidance_scale: Union[float, Tensor, None] = None,
                   out: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """One multistep-solver step (DPM-Solver++, its SDE variant, UniPC), fused into one kernel.

    Args:
        x_t: (B, ...) current samples, float32/float16/bfloat16 (float64 runs the reference);
            contiguous or channels_last.
        model_output: the model's prediction, x_t's shape and dtype; with guidance_scale batch
            2B: [unconditional half; conditional half].
        ring: (K, *x_t.shape), 1 <= K <= 3, float32 (float64 for float64 x_t), on x_t's device,
            each slot laid out like x_t (`empty_ring(x_t, K)` makes one): earlier steps' x0.
            Columns corr_hk / pred_hk multiply ring[k]. Slot step % K receives the new x0 after
            every read.
        coefs: float64 (S, NCOEF) on x_t's device, one row per solver step, columns COEFS.
        step: the row of coefs: an int in [0, S), or a 1-element integer tensor on x_t's device
            read by the kernel (no host sync; clamped into [0, S)).
        prediction_type: "epsilon", "sample" or "v_prediction".
        last_sample: None, or the previous step's (corrected) input sample, like ring[0]: read,
            then overwritten with y (the corrected sample, UniPC). None: y = x_t.
        thresholding, dynamic_thresholding_ratio, sample_max_value: dynamic thresholding of x0
            (diffusers' _threshold_sample); clip_sample, clip_sample_range: clamp x0. Exclusive.
        noise: z of `+ noise z`, x_t's shape; or seed (an int or a 1-element int64 tensor on
            x_t's device): z drawn in the kernel from stream fastdiff.reference.STREAM_MULTISTEP
            (image first_index + b, step = the step's row index, element = memory position).
            Neither: no noise term.
        first_index: global index of sample 0: an int in [0, 2^32 - B] or a 1-element integer
            tensor on x_t's device.
        guidance_scale: classifier-free guidance w (a float or a 1-element float tensor on
            x_t's device): the prediction is m_u + w (m_c - m_u).
        out: where x_prev goes (x_t's shape, dtype and layout); may be x_t itself.
        backend: None (the rule of fastdiff.backends) or a backend name forced for this call.

    Returns:
        x_prev (out when given), in x_t's dtype and memory layout.
    """
    _checks.float_tensor("x_t", x_t, ndim_min=1)
    if not isinstance(prediction_type, str) or prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, "
                         f"got {prediction_type!r}")
    clip_sample_range, dynamic_thresholding_ratio, sample_max_value, guidance, guidance_t = \
        x0_and_guidance_args(x_t, model_output, clip_sample, clip_sample_range, thresholding,
                             dynamic_thresholding_ratio, sample_max_value, guidance_scale)
    guided = guidance_scale is not None
    B = x_t.shape[0]
    xshape = x_t.shape
    want = xshape if not guided else (2 * B,) + tuple(xshape[1:])
    if model_output.shape != want:
        want = tuple(want)
        extra = (f" (batch 2*B = {2 * B}: [unconditional; conditional] halves for "
                 f"guidance_scale)") if guided else " (x_t's shape)"
        raise ValueError(f"model_output must have shape {want}{extra}, "
                         f"got {tuple(model_output.shape)}")
    # the coefficient table and the step (the common case in a few reads, first)
    device = x_t.device
    if not (type(coefs) in _checks._PLAIN and coefs.dtype == torch.float64 and coefs.dim() == 2
            and coefs.shape[1] == NCOEF and coefs.shape[0] >= 1 and coefs.device == device):
        _checks.tensor("coefs", coefs, ndim=2)
        if coefs.dtype != torch.float64:
            raise TypeError(f"coefs must be float64 (computed in float64 on the host), got "
                            f"{coefs.dtype}")
        if coefs.shape[1] != NCOEF or coefs.shape[0] < 1:
            raise ValueError(f"coefs must have shape (S >= 1, NCOEF = {NCOEF}) (columns "
                             f"{COEFS}), got {tuple(coefs.shape)}")
        _checks.same_device("x_t", x_t, coefs=coefs)
    S = coefs.shape[0]
    step_t = None
    if isinstance(step, Tensor):
        step_t = _checks._scalar_tensor("step", step, device, True)
        step = 0
    elif isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"step must be an int or a 1-element int64 tensor, got "
                        f"{type(step).__name__}")
    elif not 0 <= step < S:
        raise ValueError(f"step={step} is out of range [0, {S}) (the rows of coefs)")
    # state: the ring and last_sample, in the state dtype, laid out like x_t
    sdt = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    if not (type(ring) in _checks._PLAIN and ring.dtype == sdt and ring.device == device
            and ring.dim() == len(xshape) + 1 and 1 <= ring.shape[0] <= MAX_ORDER
            and ring.shape[1:] == xshape):
        _checks.tensor("ring", ring)
        if ring.dim() != x_t.dim() + 1 or not 1 <= ring.shape[0] <= MAX_ORDER:
            raise ValueError(f"ring must have shape (K, *x_t.shape) with 1 <= K <= {MAX_ORDER}, "
                             f"got {tuple(ring.shape)} for x_t {tuple(x_t.shape)}")
        _state("ring", ring, x_t, (ring.shape[0],) + tuple(x_t.shape), sdt)
    K = ring.shape[0]
    if last_sample is not None:
        _state("last_sample", last_sample, x_t, x_t.shape, sdt)
    _checks.noise_and_seed("x_t", x_t, noise, seed)
    first, first_t = _checks.first_index_arg(first_index, B, device)
    if out is not None:
        _checks.tensor("out", out)
        _checks.same_device("x_t", x_t, out=out)
        _checks.same_shape("x_t", x_t, out=out)
        _checks.same_dtype("x_t", x_t, out=out)
    x_in = x_t
    x_t = _checks.dense(x_t)
    strides = x_t.stride()
    n = x_t.numel()
    rs = ring.stride()
    if n and ((rs[1:] != strides and not _same_layout(rs[1:], strides, x_t.shape))
              or (K > 1 and abs(rs[0]) < n)):
        raise ValueError(f"ring's slots must be laid out like x_t (strides {strides}, slots "
                         f"apart; fastdiff.ops.multistep_step.empty_ring makes one), got strides "
                         f"{ring.stride()}")
    if n and last_sample is not None and not _same_layout(last_sample, strides, x_t.shape):
        raise ValueError(f"last_sample must be laid out like x_t (strides {strides}), got "
                         f"{last_sample.stride()}")
    if out is not None and n and not _same_layout(out, strides, x_t.shape):
        raise ValueError(f"out must be laid out like x_t (dense, strides {strides}), got "
                         f"{out.stride()}" + ("" if out is not x_in else
                                              ": in place needs a contiguous or channels_last x_t"))
    # (an out made here shares memory with nothing: only a given one is compared)
    _check_disjoint(out, last_sample, ring, x_t)
    if out is None:
        out = _checks.empty_like(x_t)
    if backend is not None and (not isinstance(backend, str) or backend not in IMPLEMENTED):
        raise ValueError(f"backend must be None or one of {IMPLEMENTED} (the backends of "
                         f"multistep_step), got {backend!r}")
    # picked here (its checks depend on it); while torch.compile traces, inside the op
    if torch.compiler.is_compiling():
        backend = "auto" if backend is None else "use:" + backend
    elif backend is None:
        backend = backends.pick("multistep_step", IMPLEMENTED, device)
    else:
        with backends.use_backend(backend):  # unavailable or on the wrong device raises
            backend = backends.pick("multistep_step", IMPLEMENTED, device)
    # the extension's kernels check the values of tensor arguments themselves (no device op)
    in_kernel = _checks.checked_in_kernel(backend, x_t)
    if guided and x_t.numel():
        model_output = model_output.contiguous(
            memory_format=torch.contiguous_format if x_t.is_contiguous() else (
                torch.channels_last if x_t.dim() == 4 else torch.channels_last_3d))
    else:
        model_output = _checks.like(model_output, x_t)
    if noise is not None:
        noise = _checks.like(noise.to(x_t.dtype), x_t)
    draw = noise is None and seed is not None
    seed, seed_t = _checks.seed_arg(0 if seed is None else seed, device)
    checks = _checks.value_checks(in_kernel, (step_t, guidance_t), first_index, first_t, B,
                                  ("step", step_t, 0, S - 1),
                                  ("guidance_scale", guidance_t, None, None))
    # the body called straight where the op would add nothing (_checks.direct: ~15 us less)
    direct = _checks.direct(x_t, model_output, ring, coefs, step_t, last_sample, noise, seed_t,
                            first_t, guidance_t, out)
    (_multistep_step_body if direct else _multistep_step_op)(
        x_t, model_output, ring, coefs, step, step_t, last_sample, noise, seed, seed_t, first,
        first_t, draw, prediction_type, bool(thresholding), dynamic_thresholding_ratio,
        sample_max_value, bool(clip_sample), clip_sample_range, guided, guidance, guidance_t,
        backend, out, checks)
    return out


# `fastdiff.ops.multistep_step` is this function (the package exports it under the module's
# name), so the table's names are reachable from it too: fastdiff.ops.multistep_step.COEFS.
multistep_step.COEFS, multistep_step.NCOEF, multistep_step.MAX_ORDER = COEFS, NCOEF, MAX_ORDER
multistep_step.empty_ring = empty_ring
