"""One reverse-diffusion step: the DDPM posterior or the DDIM update, in one pass over memory.

From the model output (epsilon, sample or v prediction) and x_t, per element: x0, clip or dynamic
threshold, the posterior mean, and + sigma z with z given or drawn in the kernel (stream
STREAM_SAMPLER_STEP, step = the sample's t, element index = memory position, as q_sample).

Floor: read x_t and model_out (2x model_out for learned_range, + noise when given), write x_prev
(+ x0 when asked). Dynamic thresholding adds a per-sample quantile pass over x0 (torch ops).

Per-sample coefficients are computed in float64 from the float64 alphas_cumprod table (not per
element: Triton in a per-sample pre-pass, CUDA once per block), per-element math in float32:
diffusers' float32 `1 - ab_t / ab_prev` loses ~1e-3 relative at small t, this does not.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from .. import backends
from ..reference import STREAM_SAMPLER_STEP, memory_order_normal
from ..schedule import Schedule
from . import _checks
from .q_sample import draw_seed

IMPLEMENTED = ("torch", "triton", "cuda", "cpu")

# The kernels take these as ints; csrc/sampler_step.h and kernels/sampler_step.py use the same.
KINDS = ("ddpm", "ddim")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log",
                  "learned_range", "learned")
LEARNED = ("learned_range", "learned")  # model_output has 2C channels: prediction, variance
CLIP_NONE, CLIP_RANGE, CLIP_THRESHOLD = 0, 1, 2


def _math_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _alphas(alphas_cumprod: Tensor, t: Tensor, t_prev: Tensor, final_from_table: bool):
    """Per-sample (ab_t, ab_prev) in float64, gathered on the device with clamped indices;
    t_prev < 0 gives the final value: alphas_cumprod[0] if final_from_table else 1."""
    n = alphas_cumprod.numel()
    ab = alphas_cumprod.to(torch.float64)
    at = ab[t.clamp(0, n - 1)]
    final = ab[0] if final_from_table else ab.new_ones(())
    ap = torch.where(t_prev >= 0, ab[t_prev.clamp(0, n - 1)], final)
    return at, ap


def _predict_x0(x: Tensor, m: Tensor, at: Tensor, prediction_type: str) -> Tensor:
    """x0 from the model prediction m (diffusers' formulas), in the dtype of x and m."""
    bt = 1.0 - at
    view = (-1,) + (1,) * (x.dim() - 1)
    sa, sb = at.sqrt().to(x.dtype).view(view), bt.sqrt().to(x.dtype).view(view)
    if prediction_type == "epsilon":
        return (x - sb * m) / sa
    if prediction_type == "sample":
        return m
    return sa * x - sb * m


def _quantile_rows(a: Tensor, q: float) -> Tensor:
    """torch.quantile(a, q, dim=1) (linear interpolation) by a sort: torch.quantile refuses
    inputs of more than 2^24 elements."""
    n = a.shape[1]
    s = a.sort(dim=1).values
    rank = q * (n - 1)
    lo, hi = int(math.floor(rank)), int(math.ceil(rank))
    return torch.lerp(s[:, lo], s[:, hi], rank - lo)


def threshold_scale(x0: Tensor, ratio: float, sample_max_value: float) -> Tensor:
    """Dynamic thresholding's per-sample s = clamp(quantile(|x0|, ratio), 1, sample_max_value)
    (Saharia et al. 2022, diffusers' _threshold_sample), shape (B,), in x0's dtype. Device ops
    only: no host sync."""
    if x0.numel() == 0:  # nothing to scale (B = 0 or empty samples)
        return x0.new_ones(x0.shape[0])
    a = x0.reshape(x0.shape[0], -1).abs()
    return _quantile_rows(a, ratio).clamp(min=1.0, max=sample_max_value)


def threshold_scale_topk(x0: Tensor, ratio: float, sample_max_value: float) -> Tensor:
    """threshold_scale (the same order statistics, the same interpolation) from
    the largest n - floor(ratio (n - 1)) values of each sample (torch.topk: a selection, not a
    full sort; at ratio 0.995 under 1% of the sample): the kernels' pre-pass."""
    a = x0.reshape(x0.shape[0], -1).abs()
    n = a.shape[1]
    rank = ratio * (n - 1)
    lo, hi = int(math.floor(rank)), int(math.ceil(rank))
    top = a.topk(n - lo, dim=1, sorted=True).values  # top[:, -1]: ascending rank lo
    q = top[:, -1] if hi == lo else torch.lerp(top[:, -1], top[:, -2], rank - lo)
    return q.clamp(min=1.0, max=sample_max_value)


def sampler_step_ref(x_t: Tensor, model_output: Tensor, t: Tensor, t_prev: Tensor,
                     alphas_cumprod: Tensor, *, kind: str = "ddpm",
                     prediction_type: str = "epsilon", variance_type: str = "fixed_small",
                     eta: float = 0.0, clip_sample: bool = False, clip_sample_range: float = 1.0,
                     thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                     sample_max_value: float = 1.0, set_alpha_to_one: bool = True,
                     use_clipped_model_output: bool = False, noise: Optional[Tensor] = None,
                     return_x0: bool = False, guidance_scale=None):
    """Plain PyTorch, following diffusers' DDPMScheduler.step / DDIMScheduler.step line by line
    with per-sample t and t_prev (B,). Coefficients in float64; elements in float64 for float64
    inputs, else float32. `noise`: the z of `+ sigma z` (None: no noise term). guidance_scale
    (a float or a 1-element tensor): model_output is [uncond; cond] of batch 2B, the prediction
    is m_u + w (m_c - m_u), a learned variance the cond half's. Returns x_prev, or (x_prev, x0)
    with x0 after clipping/thresholding, both in x_t's dtype."""
    mdt = _math_dtype(x_t)
    view = (-1,) + (1,) * (x_t.dim() - 1)
    x = x_t.to(mdt)
    m = model_output.to(mdt)
    v = None
    learned = kind == "ddpm" and variance_type in LEARNED
    if learned:
        m, v = torch.split(m, x.shape[1], dim=1)
    if guidance_scale is not None:
        w = guidance_scale.to(mdt).reshape(()) if isinstance(guidance_scale, Tensor) \
            else float(guidance_scale)
        m_u, m_c = m.chunk(2)
        m = m_u + w * (m_c - m_u)
        v = None if v is None else v.chunk(2)[1]
    at, ap = _alphas(alphas_cumprod, t, t_prev, kind == "ddim" and not set_alpha_to_one)
    bt, bp = 1.0 - at, 1.0 - ap

    def per_sample(c):  # float64 (B,) -> broadcastable, in the element math dtype
        return c.to(mdt).view(view)

    x0 = _predict_x0(x, m, at, prediction_type)
    if thresholding:
        s = threshold_scale(x0, dynamic_thresholding_ratio, sample_max_value).view(view)
        x0c = torch.minimum(torch.maximum(x0, -s), s) / s
    elif clip_sample:
        x0c = x0.clamp(-clip_sample_range, clip_sample_range)
    else:
        x0c = x0

    if kind == "ddpm":
        cur_alpha = at / ap
        cur_beta = 1.0 - cur_alpha
        mean = per_sample(ap.sqrt() * cur_beta / bt) * x0c + per_sample(cur_alpha.sqrt() * bp / bt) * x
        var = (bp / bt * cur_beta).clamp(min=1e-20)
        if variance_type == "fixed_small":
            std = per_sample(var.sqrt())
        elif variance_type == "fixed_small_log":
            std = per_sample(torch.exp(0.5 * torch.log(var)))
        elif variance_type == "fixed_large":
            std = per_sample(cur_beta.sqrt())
        elif variance_type == "fixed_large_log":
            # GLIDE's max_log: log-variance log(beta_t). diffusers takes sqrt of the log (NaN).
            std = per_sample(torch.exp(0.5 * torch.log(cur_beta)))
        elif variance_type == "learned":  # the model predicts the variance itself
            std = v.sqrt()
        else:  # learned_range: interpolate the log-variance between the two bounds
            # cur_beta = 0 only for t == t_prev: clamped like var, so the log stays finite
            min_log = per_sample(torch.log(var))
            max_log = per_sample(torch.log(cur_beta.clamp(min=1e-20)))
            frac = (v + 1) / 2
            std = torch.exp(0.5 * (frac * max_log + (1 - frac) * min_log))
        x_prev = mean
        if noise is not None:
            on = (t > 0) & (t_prev >= 0)  # the last step (t_prev < 0) adds no noise
            x_prev = mean + torch.where(on.view(view), std * noise.to(mdt), 0.0)
    else:
        sa, sb = at.sqrt(), bt.sqrt()
        if prediction_type == "epsilon":
            eps = m
        elif prediction_type == "sample":
            eps = (x - per_sample(sa) * m) / per_sample(sb)
        else:
            eps = per_sample(sa) * m + per_sample(sb) * x
        var = (bp / bt * (1.0 - at / ap)).clamp(min=0.0)  # < 0 only for t_prev > t (inversion)
        std = eta * var.sqrt()
        if use_clipped_model_output:
            eps = (x - per_sample(sa) * x0c) / per_sample(sb)
        # clamp: rounding only for eta <= 1 (1 - ab_prev >= var); for eta > 1 diffusers gives NaN
        direction = (bp - std * std).clamp(min=0.0).sqrt()
        x_prev = per_sample(ap.sqrt()) * x0c + per_sample(direction) * eps
        if eta > 0 and noise is not None:  # not at the last step (t_prev < 0)
            z = per_sample(std) * noise.to(mdt)
            x_prev = x_prev + torch.where((t_prev >= 0).view(view), z, 0.0)
    x_prev = x_prev.to(x_t.dtype)
    return (x_prev, x0c.to(x_t.dtype)) if return_x0 else x_prev


def _model_output_layout(x_t: Tensor, model_output: Tensor, learned: bool, guided: bool):
    """model_output laid out for the kernels, and how element j of a sample of x_t (its memory
    index) finds its prediction: offset b*batch_stride + (j // inner)*row_stride + j % inner, its
    predicted variance var_offset further, and with guidance the conditional half cond_offset
    further. A 2C-channel output is read in place (its first C channels are a strided view):
    NCHW -> one row per sample, channels_last -> one row per pixel. Returns (mo, batch_stride,
    inner, row_stride, var_offset, cond_offset)."""
    B = x_t.shape[0]
    ps = x_t.numel() // B if B else 0
    if not (learned or guided):  # the common case first
        return _checks.like(model_output, x_t), ps, ps, ps, 0, 0
    fmt = torch.contiguous_format if x_t.is_contiguous() else (
        torch.channels_last if x_t.dim() == 4 else torch.channels_last_3d)
    if not learned:
        return model_output.contiguous(memory_format=fmt), ps, ps, ps, 0, B * ps
    C = x_t.shape[1]
    cond = 2 * B * ps if guided else 0
    mo = model_output.contiguous(memory_format=fmt)
    if fmt == torch.contiguous_format:
        return mo, 2 * ps, ps, 2 * ps, ps, cond
    return mo, 2 * ps, C, 2 * C, C, cond


def _sampler_step_body(x_t: Tensor, model_output: Tensor, t: Tensor, t_prev: Tensor,
                       alphas_cumprod: Tensor, noise: Optional[Tensor], seed: int,
                       seed_t: Optional[Tensor], first_index: int, first_t: Optional[Tensor],
                       kind: str, prediction_type: str, variance_type: str, eta: float,
                       clip_sample: bool, clip_sample_range: float, thresholding: bool,
                       dynamic_thresholding_ratio: float, sample_max_value: float,
                       set_alpha_to_one: bool, use_clipped_model_output: bool, guided: bool,
                       guidance: float, guidance_t: Optional[Tensor],
                       want_x0: bool, spare: Optional[Tensor], backend: str,
                       checks: int) -> tuple[Tensor, Tensor]:
    """Returns (x_prev, x0 or empty). Inputs are checked; x_t and noise dense alike. Noise key:
    (seed_t or seed, first_t or first_index); guidance scale (when guided): guidance_t or
    guidance; spare: the shared empty tensor for x0 when not asked for (_checks.spare; None
    through the op: made here); backend: the one the wrapper picked ("auto": pick it here, as
    under torch.compile); checks: the values the extension's kernel checks
    (_checks.value_checks)."""
    x_prev = _checks.empty_like(x_t)
    x0 = _checks.empty_like(x_t) if want_x0 else x_t.new_empty(0) if spare is None else spare
    needs_noise = kind == "ddpm" or eta > 0
    learned = kind == "ddpm" and variance_type in LEARNED
    w = (guidance if guidance_t is None else guidance_t) if guided else None
    if backend == "auto":
        backend = backends.pick("sampler_step", IMPLEMENTED, x_t.device)
    if backend == "torch" or x_t.dtype == torch.float64 or x_t.numel() == 0:
        opts = dict(kind=kind, prediction_type=prediction_type, variance_type=variance_type,
                    eta=eta, clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                    thresholding=thresholding,
                    dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                    sample_max_value=sample_max_value, set_alpha_to_one=set_alpha_to_one,
                    use_clipped_model_output=use_clipped_model_output)
        if noise is None and needs_noise and x_t.numel():
            noise = memory_order_normal(seed if seed_t is None else seed_t,
                                        t.clamp(0, alphas_cumprod.numel() - 1),
                                        STREAM_SAMPLER_STEP, x_t.to(_math_dtype(x_t)),
                                        first_index if first_t is None else first_t)
        out = sampler_step_ref(x_t, model_output, t, t_prev, alphas_cumprod, noise=noise,
                               return_x0=want_x0, guidance_scale=w, **opts)
        x_prev.copy_(out[0] if want_x0 else out)
        if want_x0:
            x0.copy_(out[1])
        return x_prev, x0

    clip_mode = CLIP_THRESHOLD if thresholding else (CLIP_RANGE if clip_sample else CLIP_NONE)
    thresh = None
    if thresholding:  # the quantile needs all of x0 first: a separate reduction, on the device
        m = model_output[:, :x_t.shape[1]] if learned else model_output
        m = m.float()
        if guided:
            m_u, m_c = m.chunk(2)
            m = m_u + (w if guidance_t is None else guidance_t.reshape(())) * (m_c - m_u)
        at = alphas_cumprod.to(torch.float64)[t.clamp(0, alphas_cumprod.numel() - 1)]
        x0f = _predict_x0(x_t.float(), m, at, prediction_type)
        thresh = threshold_scale_topk(x0f, dynamic_thresholding_ratio,
                                      sample_max_value).contiguous()
    mo, bs, inner, rs, var_off, cond_off = _model_output_layout(x_t, model_output, learned, guided)
    if not needs_noise:
        noise = None
    args = (KINDS.index(kind), PREDICTION_TYPES.index(prediction_type),
            VARIANCE_TYPES.index(variance_type) if kind == "ddpm" else 0, float(eta), clip_mode,
            float(clip_sample_range), bool(set_alpha_to_one), bool(use_clipped_model_output),
            bs, inner, rs, var_off, cond_off, float(guidance), guidance_t if guided else None)
    if backend == "triton":
        from ..kernels.sampler_step import sampler_step_triton
        sampler_step_triton(x_t, mo, t, t_prev, alphas_cumprod, noise, thresh, seed, seed_t,
                            first_index, first_t, needs_noise, *args, x_prev, x0)
    else:
        torch.ops.fastdiff_ext.sampler_step(x_t, mo, t, t_prev, alphas_cumprod, noise, thresh,
                                            seed, seed_t, first_index, first_t, needs_noise,
                                            *args, x_prev, x0, checks)
    return x_prev, x0


_sampler_step_op = torch.library.custom_op("fastdiff::sampler_step",
                                           mutates_args=())(_sampler_step_body)


@_sampler_step_op.register_fake
def _(x_t, model_output, t, t_prev, alphas_cumprod, noise, seed, seed_t, first_index, first_t,
      kind, prediction_type, variance_type, eta, clip_sample, clip_sample_range, thresholding,
      dynamic_thresholding_ratio, sample_max_value, set_alpha_to_one, use_clipped_model_output,
      guided, guidance, guidance_t, want_x0, spare, backend, checks):
    return torch.empty_like(x_t), torch.empty_like(x_t) if want_x0 else x_t.new_empty(0)


def _choice(name, value, options):
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


def _number(name, value, *, low=None, low_open=False, high=None):
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) \
            or (high is not None and value > high):
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"<= {high}"
        raise ValueError(f"{name} must be finite{' and ' + lo if lo else ''}"
                         f"{' and ' + hi if hi else ''}, got {value!r}")
    return value


_X0_OPTS = {}  # (the x0 options as given, their types) -> the checked floats; valid ones only
_X0_OPTS_MAX = 256  # entries; past it a call checks its options afresh, as before


def _x0_options_checked(clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio,
                        sample_max_value):
    out = (_number("clip_sample_range", clip_sample_range, low=0.0, low_open=True),
           _number("dynamic_thresholding_ratio", dynamic_thresholding_ratio, low=0.0, high=1.0),
           _number("sample_max_value", sample_max_value, low=0.0, low_open=True))
    if clip_sample and thresholding:
        raise ValueError("clip_sample and thresholding are exclusive: choose one")
    return out


def _x0_options(clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio,
                sample_max_value):
    """(clip_sample_range, dynamic_thresholding_ratio, sample_max_value) checked and as floats,
    remembered per value and type of the options (the types in the key: True == 1.0 as a key,
    but a bool is refused where a number is asked for), so a loop that calls with the same
    options checks them once."""
    if torch.compiler.is_compiling():  # (no global dict for Dynamo to guard on)
        return _x0_options_checked(clip_sample, clip_sample_range, thresholding,
                                   dynamic_thresholding_ratio, sample_max_value)
    key = (clip_sample_range, dynamic_thresholding_ratio, sample_max_value,
           type(clip_sample_range), type(dynamic_thresholding_ratio), type(sample_max_value),
           clip_sample, thresholding)
    try:
        out = _X0_OPTS.get(key)
    except TypeError:  # an unhashable option: checked (and refused) below
        key, out = None, None
    if out is not None:
        return out
    out = _x0_options_checked(clip_sample, clip_sample_range, thresholding,
                              dynamic_thresholding_ratio, sample_max_value)
    if key is not None and len(_X0_OPTS) < _X0_OPTS_MAX and \
            type(clip_sample) is bool and type(thresholding) is bool:
        _X0_OPTS[key] = out
    return out


def x0_and_guidance_args(x_t, model_output, clip_sample, clip_sample_range, thresholding,
                         dynamic_thresholding_ratio, sample_max_value, guidance_scale):
    """The checks sampler_step and multistep_step share: the x0 clipping/thresholding options,
    model_output against x_t (x_t already checked), and guidance_scale (a number, or a device
    scalar read by the kernels). Returns (clip_sample_range, dynamic_thresholding_ratio,
    sample_max_value, guidance, guidance_t) as the kernels take them."""
    clip_sample_range, dynamic_thresholding_ratio, sample_max_value = _x0_options(
        clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio,
        sample_max_value)
    # the common case in three reads; anything else through the checks that name what is wrong
    if not (type(model_output) in _checks._PLAIN and model_output.dtype == x_t.dtype
            and model_output.device == x_t.device):
        _checks.float_tensor("model_output", model_output)
        _checks.same_device("x_t", x_t, model_output=model_output)
        _checks.same_dtype("x_t", x_t, model_output=model_output)
    if guidance_scale is None:
        return clip_sample_range, dynamic_thresholding_ratio, sample_max_value, 0.0, None
    if isinstance(guidance_scale, Tensor):
        return (clip_sample_range, dynamic_thresholding_ratio, sample_max_value, 0.0,
                _checks._scalar_tensor("guidance_scale", guidance_scale, x_t.device, False))
    return (clip_sample_range, dynamic_thresholding_ratio, sample_max_value,
            _number("guidance_scale", guidance_scale), None)


_ORDERED = "kind='ddpm' needs t_prev < t (a step towards t = 0)"
_STEP_OPTS = {}  # (kind, prediction_type, variance_type, eta, type(eta)) -> (learned, eta)


def _step_options(kind, prediction_type, variance_type, eta):
    """The checks of sampler_step's step options, once per (values, eta's type): (learned,
    eta as a float). Valid options only are remembered (at most 256 sets)."""
    compiling = torch.compiler.is_compiling()  # (no global dict for Dynamo to guard on)
    key = None if compiling else (kind, prediction_type, variance_type, eta, type(eta))
    try:
        out = None if key is None else _STEP_OPTS.get(key)
    except TypeError:  # an unhashable option: refused below
        key, out = None, None
    if out is not None:
        return out
    _choice("kind", kind, KINDS)
    _choice("prediction_type", prediction_type, PREDICTION_TYPES)
    _choice("variance_type", variance_type, VARIANCE_TYPES)
    learned = variance_type in LEARNED
    if learned and kind == "ddim":
        raise ValueError(f"variance_type={variance_type!r} needs kind='ddpm': DDIM's variance is "
                         "fixed by eta")
    out = learned, _number("eta", eta, low=0.0)
    if key is not None and len(_STEP_OPTS) < 256:
        _STEP_OPTS[key] = out
    return out


def sampler_step(x_t: Tensor, model_output: Tensor, t, t_prev, schedule: Schedule, *,
                 kind: str = "ddpm", prediction_type: str = "epsilon",
                 variance_type: str = "fixed_small", eta: float = 0.0,
                 clip_sample: bool = False, clip_sample_range: float = 1.0,
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 sample_max_value: float = 1.0, set_alpha_to_one: bool = True,
                 use_clipped_model_output: bool = False, noise: Optional[Tensor] = None,
                 seed: Union[int, Tensor, None] = None, first_index: Union[int, Tensor] = 0,
                 guidance_scale: Union[float, Tensor, None] = None, return_x0: bool = False):
    """One DDPM or DDIM reverse step, t -> t_prev, fused into one kernel.

    The math is diffusers' DDPMScheduler.step (kind="ddpm") / DDIMScheduler.step (kind="ddim"),
    with the previous timestep given instead of derived from num_inference_steps.

    Args:
        x_t: (B, C, ...) current samples, float32/float16/bfloat16 (float64 runs the reference);
            contiguous or channels_last (x_prev keeps x_t's memory format).
        model_output: the model's prediction, x_t's shape and dtype; for variance_type
            "learned_range" / "learned" 2C channels (prediction, then predicted variance: in
            [-1, 1] / the variance itself), read in place in NCHW or channels_last. With
            guidance_scale, batch 2B: [unconditional half; conditional half] (diffusers'
            `eps_u, eps_c = out.chunk(2)` order).
        t, t_prev: per-sample timesteps, int tensors (B,) or ints; t in [0, T), t_prev < T
            where any negative value is the final step (diffusers' DDIM goes to t - T//n, e.g.
            -20; alpha_cumprod_prev = 1 for ddpm; for ddim 1 if set_alpha_to_one else
            alphas_cumprod[0]), which adds no noise. ddpm needs
            t_prev < t. (diffusers' DDPM adds noise whenever t > 0, and its DDIM with
            set_alpha_to_one=False and eta > 0 adds some at the last step: fastdiff never does.)
            ddim with t_prev > t is the deterministic inversion step (sigma = 0).
        schedule: a fastdiff.Schedule.
        kind: "ddpm" or "ddim".
        prediction_type: "epsilon", "sample" or "v_prediction".
        variance_type: ddpm only: "fixed_small", "fixed_small_log", "fixed_large",
            "fixed_large_log" (GLIDE's log(beta_t) log-variance, i.e. std sqrt(beta_t);
            diffusers' own step returns NaN there), "learned_range" (interpolated
            log-variance) or "learned" (std = sqrt of the predicted variance). Ignored by ddim.
        eta: ddim only, >= 0: sigma = eta * sqrt(DDIM variance); noise is added only if eta > 0.
        clip_sample, clip_sample_range: clamp x0 to [-range, range].
        thresholding, dynamic_thresholding_ratio, sample_max_value: dynamic thresholding of x0
            (per-sample quantile of |x0|, clamped to [1, sample_max_value]); exclusive with clip.
        set_alpha_to_one: ddim's final alpha_cumprod (see t_prev).
        use_clipped_model_output: ddim only: re-derive epsilon from the clipped x0.
        noise: z of `+ sigma z`, x_t's shape; None draws it in the kernel from the counter-based
            stream fastdiff.reference.STREAM_SAMPLER_STEP (image = first_index + b, step = the
            sample's t, element = memory position inside the sample). ddpm adds noise only to
            samples with t > 0, neither kind at the last step (t_prev < 0).
        seed: seed of the in-kernel noise: an int, or a 1-element int64 tensor on x_t's device
            read by the kernel (a replayed CUDA graph sees seed_t.fill_()). None: drawn from
            torch's CPU generator.
        first_index: global index of sample 0 (noise is per image, whatever the batch): an int
            in [0, 2^32 - B] or a 1-element int64 tensor on x_t's device (read by the kernel).
        guidance_scale: classifier-free guidance w: None (model_output of batch B), or a float
            or a 1-element float tensor on x_t's device (read by the kernel): the prediction is
            m_u + w (m_c - m_u) of the two halves of a batch-2B model_output; a learned
            variance is taken from the conditional half.
        return_x0: also return x0 after clipping/thresholding (diffusers' pred_original_sample).

    Returns:
        x_prev, or (x_prev, x0) with return_x0.
    """
    _checks.float_tensor("x_t", x_t, ndim_min=1)
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a fastdiff.Schedule, got {type(schedule).__name__}")
    learned, eta = _step_options(kind, prediction_type, variance_type, eta)
    clip_sample_range, dynamic_thresholding_ratio, sample_max_value, guidance, guidance_t = \
        x0_and_guidance_args(x_t, model_output, clip_sample, clip_sample_range, thresholding,
                             dynamic_thresholding_ratio, sample_max_value, guidance_scale)
    guided = guidance_scale is not None
    B = x_t.shape[0]
    if learned and x_t.dim() < 2:
        raise ValueError(f"variance_type={variance_type!r} needs x_t with a channel dim, got "
                         f"shape {tuple(x_t.shape)}")
    want = x_t.shape if not (guided or learned) else ((2 * B if guided else B),) + \
        (((2 * x_t.shape[1],) + tuple(x_t.shape[2:])) if learned else tuple(x_t.shape[1:]))
    if model_output.shape != want:
        want = tuple(want)
        what = []
        if guided:
            what.append(f"batch 2*B = {2 * B} ([unconditional; conditional] halves) for "
                        f"guidance_scale")
        if learned:
            what.append(f"2*C = {2 * x_t.shape[1]} channels (prediction, then variance) for "
                        f"variance_type={variance_type!r}")
        if not what:
            raise ValueError(f"model_output must have the shape of x_t {tuple(x_t.shape)} for "
                             f"variance_type={variance_type!r}, got {tuple(model_output.shape)}")
        raise ValueError(f"model_output must have {' and '.join(what)}: expected shape {want}, "
                         f"got {tuple(model_output.shape)}")
    _checks.noise_and_seed("x_t", x_t, noise, seed)
    T = schedule.num_train_timesteps
    device = x_t.device
    # picked here (its checks depend on it); while torch.compile traces, inside the op
    backend = "auto" if torch.compiler.is_compiling() else backends.pick(
        "sampler_step", IMPLEMENTED, device)
    # the extension's kernels check the values of tensor arguments themselves (no device op)
    in_kernel = _checks.checked_in_kernel(backend, x_t)
    t_dev = _checks.timesteps("t", t, B, T, device, check_values=False)
    tp_dev = _checks.timesteps("t_prev", t_prev, B, T, device, allow_negative=True,
                               check_values=False)
    # ranges (and ddpm's order): plain Python for ints, one device-side assert for CUDA tensors
    # on the backends whose kernels do not check them (in_kernel: the tensors are left to it)
    t_int, tp_int = not isinstance(t, Tensor), not isinstance(t_prev, Tensor)
    if t_int and tp_int:  # ranges checked by timesteps(); ddpm's order left
        if kind == "ddpm" and t_prev >= t:
            _checks.timestep_values(T, ("t", t, 0), ("t_prev", t_prev, None), ordered=_ORDERED)
    elif not in_kernel or t_int or tp_int:  # (tensors both left to the kernel: nothing here)
        items = (("t", t, 0), ("t_prev", t_prev, None))
        ordered = _ORDERED if kind == "ddpm" else None
        if in_kernel:
            items = tuple(it for it in items if not isinstance(it[1], Tensor))
            ordered = ordered if len(items) == 2 else None
        _checks.timestep_values(T, *items, ordered=ordered)
    given = (t, t_prev, guidance_t)  # the values the kernel checks, where tensors
    t, t_prev = t_dev, tp_dev
    x_t = _checks.dense(x_t)
    if noise is not None:
        noise = _checks.like(noise.to(x_t.dtype), x_t)
    first, first_t = _checks.first_index_arg(first_index, B, device)
    needs_noise = kind == "ddpm" or eta > 0
    seed, seed_t = _checks.seed_arg(draw_seed() if (noise is None and seed is None and needs_noise)
                                    else (0 if seed is None else seed), device)
    checks = _checks.value_checks(in_kernel, given, first_index, first_t, B,
                                  ("guidance_scale", guidance_t, None, None))
    ab = schedule.table("alphas_cumprod", device, torch.float64)
    # the body called straight where the op would add nothing (_checks.direct: ~15 us less)
    direct = _checks.direct(x_t, model_output, t, t_prev, noise, seed_t, first_t, guidance_t)
    x_prev, x0 = (_sampler_step_body if direct else _sampler_step_op)(
        x_t, model_output, t, t_prev, ab, noise, seed, seed_t, first, first_t, kind,
        prediction_type, variance_type, eta, bool(clip_sample), clip_sample_range,
        bool(thresholding), dynamic_thresholding_ratio, sample_max_value, bool(set_alpha_to_one),
        bool(use_clipped_model_output), guided, guidance, guidance_t, bool(return_x0),
        _checks.spare(x_t) if direct else None, backend, checks)
    return (x_prev, x0) if return_x0 else x_prev
