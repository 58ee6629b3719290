"""Samplers: a schedule plus options, and a loop of one model call and one fused step per step.

    sampler = fastdiff.DDIMSampler.from_config("path/to/scheduler_config.json")
    images = sampler.sample(unet, batch_size=64, num_inference_steps=50, seed=0)

DDPMSampler / DDIMSampler step with `sampler_step`; the multistep solvers DPMSolverSampler
(DPM-Solver++ 1-3M, 2M SDE) and UniPCSampler (predictor + corrector) with `multistep_step`, over
an x0 history ring and a per-step coefficient table made once per schedule (fastdiff.solvers).

The timesteps (and tables) are on the device before the loop starts and nothing in a step reads
a value back to the host, so on CUDA the whole step (model + fused step) is captured once in a
CUDA graph and replayed; seed, first image index and guidance scale are device tensors the
kernels read, so a replay for the next batch draws that batch's noise.

Noise per image: image b of a batch is image `first_index + b` of the run, and every normal it
gets (its x_T and the noise of each step) is a pure function of (seed, first_index + b, t), so
an image does not depend on the batch size, its position in the batch, the number of processes
or where a run was resumed. x_T is the noise q_sample would add at t = T - 1 (stream 0), the
step noise sampler_step's (stream 1; the SDE solver's: multistep_step's stream 2, counted by
step index).
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from . import solvers
from .ops._checks import trusted_values
from .ops.multistep_step import multistep_step
from .ops.q_sample import q_sample
from .ops.sampler_step import sampler_step
from .schedule import Schedule

SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log",
                       "learned", "learned_range")
OUTPUT_TYPES = ("pt", "np", "pil")

# Options of diffusers' other schedulers (and old config keys) that a DDPM/DDIM sampler does not
# use: diffusers ignores them when one scheduler is made from another's config, so do we. A key
# neither in this list nor among a sampler's options is an error (a typo must not pass silently).
_FOREIGN_KEYS = frozenset((
    "_class_name", "_diffusers_version", "_use_default_values", "tensor_format",
    "timestep_values", "skip_prk_steps", "set_alpha_to_one", "variance_type", "steps_offset",
    "solver_order", "solver_type", "algorithm_type", "lower_order_final", "euler_at_final",
    "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
    "use_flow_sigmas", "flow_shift", "final_sigmas_type", "lambda_min_clipped",
    "interpolation_type", "sigma_min", "sigma_max", "sigma_data", "sigma_schedule", "rho",
    "timestep_type", "predict_x0", "disable_corrector", "solver_p", "use_dynamic_shifting",
    "time_shift_type", "original_inference_steps", "clip_denoised", "num_train_steps",
    "s_churn", "s_tmin", "s_tmax", "s_noise", "snr_gamma", "trained_betas", "dynamic_thresholding",
    "beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "rescale_betas_zero_snr",
    "clip_sample", "clip_sample_range", "thresholding", "dynamic_thresholding_ratio",
    "sample_max_value", "prediction_type", "timestep_spacing", "eta", "shift_terminal",
))


def _read_config(config) -> dict:
    """A plain dict from a dict, a diffusers scheduler (its .config) or a scheduler_config.json
    path (file or the folder holding it)."""
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "scheduler_config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config: no scheduler config at {path!r}")
        with open(path) as f:
            try:
                config = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"config: {path!r} is not valid JSON ({e})") from None
    elif not isinstance(config, dict) and hasattr(config, "config"):
        config = config.config
    if not hasattr(config, "items"):
        raise TypeError(f"config must be a dict, a diffusers scheduler or a path to "
                        f"scheduler_config.json, got {type(config).__name__}")
    return dict(config.items())


def _model_attr(model, name, default=None):
    cfg = getattr(model, "config", None)
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _model_dtype_device(model):
    dtype, device = getattr(model, "dtype", None), getattr(model, "device", None)
    if (dtype is None or device is None) and isinstance(model, torch.nn.Module):
        p = next(model.parameters(), None)
        if p is not None:
            dtype, device = dtype or p.dtype, device or p.device
    return dtype, device


def _output(out) -> Tensor:
    """The prediction from whatever the model returns: a tensor, .sample (diffusers) or a tuple."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"model must return a tensor, an object with .sample or a tuple, got "
                    f"{type(out).__name__}")


def to_images(x: Tensor, output_type: str = "pt"):
    """Samples in [-1, 1] (B, C, H, W) -> [0, 1]: "pt" (B, C, H, W) tensor, "np" (B, H, W, C)
    float32 array, "pil" a list of PIL images (as diffusers' numpy_to_pil: round(255 x))."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    x = (x / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return x
    arr = x.float().cpu().permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return arr
    from PIL import Image
    u8 = (arr * 255).round().astype("uint8")
    if u8.shape[-1] == 1:
        return [Image.fromarray(a[..., 0], mode="L") for a in u8]
    return [Image.fromarray(a) for a in u8]


def _int_arg(name, value, low=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


class _Sampler:
    kind = ""
    diffusers_class = ""
    default_steps = 50

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001,
                 beta_end: float = 0.02, beta_schedule: str = "linear", trained_betas=None,
                 prediction_type: str = "epsilon", clip_sample: bool = True,
                 clip_sample_range: float = 1.0, thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False, **options):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got "
                             f"{prediction_type!r}")
        if timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got "
                             f"{timestep_spacing!r}")
        if clip_sample and thresholding:
            raise ValueError("clip_sample and thresholding are exclusive: set clip_sample=False "
                             "to use thresholding")
        steps_offset = _int_arg("steps_offset", steps_offset, low=0)
        if isinstance(trained_betas, np.ndarray):
            trained_betas = trained_betas.tolist()
        self.schedule = Schedule(beta_schedule, num_train_timesteps, beta_start, beta_end,
                                 trained_betas=trained_betas,
                                 rescale_betas_zero_snr=rescale_betas_zero_snr)
        self.config = dict(num_train_timesteps=self.schedule.num_train_timesteps,
                           beta_start=beta_start, beta_end=beta_end, beta_schedule=beta_schedule,
                           trained_betas=trained_betas, prediction_type=prediction_type,
                           clip_sample=bool(clip_sample), clip_sample_range=clip_sample_range,
                           thresholding=bool(thresholding),
                           dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                           sample_max_value=sample_max_value, timestep_spacing=timestep_spacing,
                           steps_offset=steps_offset,
                           rescale_betas_zero_snr=bool(rescale_betas_zero_snr), **options)
        self.num_inference_steps = None
        self.timesteps = None
        self._prev = None
        self._graphs = {}

    # -- configuration -----------------------------------------------------------------------
    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        import inspect
        names = []
        for klass in (cls, _Sampler):
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self" and p.name not in names:
                    names.append(p.name)
        return tuple(names)

    @classmethod
    def from_config(cls, config, **overrides):
        """From a diffusers scheduler config: a dict, a scheduler object, or a
        scheduler_config.json path. Options of other diffusers schedulers are ignored (as
        diffusers does when one scheduler is made from another's config); an option no scheduler
        knows is a ValueError. `overrides` replace config values."""
        cfg = _read_config(config)
        cfg.update(overrides)
        names = cls.option_names()
        unknown = sorted(k for k in cfg if k not in names and k not in _FOREIGN_KEYS)
        if unknown:
            raise ValueError(f"{cls.__name__}.from_config: unknown option(s) {unknown}; known: "
                             f"{sorted(names)}")
        return cls(**{k: v for k, v in cfg.items() if k in names})

    def save_config(self, directory):
        """Write scheduler_config.json (diffusers' format, class name included) atomically."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(os.fspath(directory), "scheduler_config.json")
        cfg = {"_class_name": self.diffusers_class, **self._diffusers_config()}
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
        return path

    def _diffusers_config(self) -> dict:
        return dict(self.config)

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config.items())})"

    # -- timesteps ---------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int, device=None):
        """The descending timesteps of an n-step run, diffusers' sequence for every spacing:
        `leading` (multiples of T // n, + steps_offset), `trailing` (from T - 1 down by T / n,
        rounded), `linspace` (round(linspace(0, T - 1, n)) reversed)."""
        T = self.schedule.num_train_timesteps
        n = _int_arg("num_inference_steps", num_inference_steps, low=1)
        if n > T:
            raise ValueError(f"num_inference_steps={n} cannot exceed num_train_timesteps={T}")
        spacing = self.config["timestep_spacing"]
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
        elif spacing == "leading":
            ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + \
                self.config["steps_offset"]
        else:
            ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
        if ts.max() >= T:
            raise ValueError(f"steps_offset={self.config['steps_offset']} puts the first "
                             f"timestep at {int(ts.max())}, outside [0, {T})")
        self.num_inference_steps = n
        self.timesteps = torch.from_numpy(ts.copy()).to(device)
        self._prev = torch.from_numpy(self._previous(ts)).to(device)
        return self.timesteps

    @property
    def prev_timesteps(self) -> Optional[Tensor]:
        """The previous timestep of each entry of .timesteps; negative means the final step."""
        return self._prev

    # -- the loop ----------------------------------------------------------------------------
    def _step_options(self, eta: float) -> dict:
        c = self.config
        return dict(kind=self.kind, prediction_type=c["prediction_type"],
                    clip_sample=c["clip_sample"], clip_sample_range=c["clip_sample_range"],
                    thresholding=c["thresholding"],
                    dynamic_thresholding_ratio=c["dynamic_thresholding_ratio"],
                    sample_max_value=c["sample_max_value"])

    def sample(self, model, batch_size: Optional[int] = None, shape=None,
               num_inference_steps: Optional[int] = None, seed: int = 0, first_index: int = 0,
               latents: Optional[Tensor] = None, class_labels=None,
               guidance_scale: Optional[float] = None, eta: Optional[float] = None,
               step_noise: Optional[Callable] = None, dtype=None, device=None,
               progress: bool = True, cuda_graph="auto", callback: Optional[Callable] = None,
               output_type: str = "pt"):
        """Sample a batch: x_T -> x_0 in `num_inference_steps` steps.

        Args:
            model: a U-Net-like callable `model(x, t, class_labels=None)` returning the prediction
                (a tensor, `.sample` or a tuple); its `.config` (in_channels, sample_size,
                num_class_embeds) gives the defaults below.
            batch_size: images per batch (default: latents' batch, else 1).
            shape: (C, H, W) of one image (default: the model's in_channels and sample_size).
            num_inference_steps: DDPM: default num_train_timesteps; DDIM: default 50.
            seed, first_index: image b of the batch is image first_index + b of the run; its x_T
                and step noise are a function of (seed, first_index + b, t) only.
            latents: x_T (B, C, H, W) to start from instead of the drawn one.
            class_labels: int or int tensor (B,) for class-conditional models.
            guidance_scale: classifier-free guidance w (eps_u + w (eps_c - eps_u)), the null
                class being num_class_embeds - 1; None or 1: the conditional model alone.
            eta: DDIM's eta (default: the sampler's).
            step_noise: `step_noise(step_index, t, x) -> Tensor` noise to use at each step
                instead of the in-kernel draw (parity tests against other implementations).
            dtype, device: of the samples (default: the model's; float32 / CPU for callables).
            progress: a tqdm bar over the steps.
            cuda_graph: "auto" (on CUDA: capture model + step once per shape and dtype, fall back
                to eager with one printed line if capture fails), True (capture or raise),
                False (eager).
            callback: `callback(step_index, t, x)` after every step (t a 0-d device tensor).
            output_type: "pt" (B, C, H, W) in [0, 1], "np" (B, H, W, C) float32, "pil".
        """
        if num_inference_steps is None:
            num_inference_steps = self.default_inference_steps()
        seed = _int_arg("seed", seed)
        first_index = _int_arg("first_index", first_index, low=0)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if cuda_graph not in ("auto", True, False):
            raise ValueError(f"cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
        if step_noise is not None and not callable(step_noise):
            raise TypeError("step_noise must be a callable step_noise(step_index, t, x) -> Tensor")
        if callback is not None and not callable(callback):
            raise TypeError("callback must be a callable callback(step_index, t, x)")
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        eta = self._eta(eta)
        mdtype, mdevice = _model_dtype_device(model)
        dtype = dtype if dtype is not None else (mdtype or torch.float32)
        device = torch.device(device if device is not None else (mdevice or "cpu"))
        if mdtype is not None and dtype != mdtype:
            raise ValueError(f"dtype={dtype} differs from the model's {mdtype}; convert the model "
                             f"(model.to({dtype})) or leave dtype=None")
        if mdevice is not None and torch.device(mdevice) != device:
            raise ValueError(f"device={device} differs from the model's {mdevice}; move the model "
                             f"(model.to({str(device)!r})) or leave device=None")
        B, shape = self._batch_shape(model, batch_size, shape, latents)
        labels, w = self._guidance(model, B, class_labels, guidance_scale, device)
        if cuda_graph is True and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device, got {device}")

        self.set_timesteps(num_inference_steps)
        n = self.num_inference_steps
        # every step's (B,) timesteps, on the device before the loop (rows are views, no upload)
        ts = self.timesteps.to(device).view(n, 1).expand(n, B).contiguous()
        tps = self._step_rows(n, B, device)
        with torch.no_grad():
            if latents is None:
                x = self.initial_noise((B,) + shape, seed, first_index, device=device, dtype=dtype)
            else:
                x = latents.to(device=device, dtype=dtype).contiguous()  # NCHW (contract 2)
            use_graph = (cuda_graph is not False and device.type == "cuda"
                         and step_noise is None)
            run = _Loop(self, model, x, ts, tps, labels, w, eta, seed, first_index)
            if use_graph:
                x = run.graphed(required=cuda_graph is True, progress=progress, callback=callback)
            else:
                x = run.eager(step_noise, progress=progress, callback=callback)
        return to_images(x, output_type)

    def __call__(self, *args, **kwargs):
        return self.sample(*args, **kwargs)

    def default_inference_steps(self) -> int:
        return self.default_steps

    def initial_noise(self, shape, seed: int = 0, first_index: int = 0, *, device="cpu",
                      dtype=torch.float32) -> Tensor:
        """x_T for images first_index .. first_index + B - 1: the noise q_sample draws for them
        at t = T - 1 (stream 0), contiguous NCHW."""
        z = torch.zeros(shape, device=device, dtype=dtype)
        T = self.schedule.num_train_timesteps
        return q_sample(z, T - 1, self.schedule, seed=seed, first_index=first_index)[1]

    def _eta(self, eta):
        return 0.0

    # -- what a step of this sampler needs besides x and t (hooks of _Loop) --------------------
    def _step_rows(self, n: int, B: int, device) -> Tensor:
        """(n, ...) int64 on the device: row k is the second per-step input of step k (here the
        previous timesteps, (B,))."""
        return self._prev.clamp(min=-1).to(device).view(n, 1).expand(n, B).contiguous()

    def _stochastic(self, eta: float) -> bool:
        return self.kind == "ddpm" or eta > 0

    def _loop_state(self, x: Tensor) -> dict:
        """Tensors a whole loop reads and updates in place (none here), made once per sample()."""
        return {}

    def _update(self, x, out, t, t_prev, state, kw):
        """x_t -> x_prev from the model output: one fused op."""
        return sampler_step(x, out, t, t_prev, self.schedule, **kw)

    def _batch_shape(self, model, batch_size, shape, latents):
        if latents is not None:
            if not isinstance(latents, Tensor) or latents.dim() < 2 \
                    or not latents.dtype.is_floating_point:
                raise TypeError("latents must be a floating tensor (B, C, H, W)")
            if batch_size is not None and batch_size != latents.shape[0]:
                raise ValueError(f"batch_size={batch_size} but latents has batch "
                                 f"{latents.shape[0]}")
            if shape is not None and tuple(shape) != tuple(latents.shape[1:]):
                raise ValueError(f"shape={tuple(shape)} but latents has image shape "
                                 f"{tuple(latents.shape[1:])}")
            return latents.shape[0], tuple(latents.shape[1:])
        B = _int_arg("batch_size", 1 if batch_size is None else batch_size, low=1)
        if shape is None:
            C, size = _model_attr(model, "in_channels"), _model_attr(model, "sample_size")
            if C is None or size is None:
                raise ValueError("shape (C, H, W) is needed: the model has no config with "
                                 "in_channels and sample_size")
            size = (size, size) if isinstance(size, int) else tuple(size)
            shape = (C,) + size
        shape = tuple(int(s) for s in shape)
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"shape must be the positive (C, H, W) of one image, got {shape}")
        return B, shape

    def _guidance(self, model, B, class_labels, guidance_scale, device):
        """(labels for the model call, w or None). With guidance the model sees 2B images:
        [null class x B; labels], diffusers' [uncond; cond] order."""
        num_classes = _model_attr(model, "num_class_embeds")
        labels = None
        if class_labels is not None:
            if isinstance(class_labels, bool):
                raise TypeError("class_labels must be an int or an int tensor (B,)")
            if isinstance(class_labels, (int, np.integer)):
                labels = torch.full((B,), int(class_labels), dtype=torch.int64)
            else:
                labels = torch.as_tensor(class_labels)
                if labels.dtype.is_floating_point or labels.dtype == torch.bool:
                    raise TypeError(f"class_labels must be integers, got {labels.dtype}")
                if labels.dim() == 0:
                    labels = labels.expand(B)
                if labels.shape != (B,):
                    raise ValueError(f"class_labels must have shape ({B},), got "
                                     f"{tuple(labels.shape)}")
            if num_classes is not None and labels.device.type == "cpu" and labels.numel() and \
                    (labels.min() < 0 or labels.max() >= num_classes):
                raise ValueError(f"class_labels must lie in [0, {num_classes}) (num_class_embeds),"
                                 f" got [{int(labels.min())}, {int(labels.max())}]")
            labels = labels.to(device=device, dtype=torch.int64)
        elif num_classes is not None:
            raise ValueError(f"class_labels is needed: the model is class-conditional "
                             f"(num_class_embeds={num_classes})")
        if guidance_scale is None or (not isinstance(guidance_scale, Tensor)
                                      and float(guidance_scale) == 1.0):
            return labels, None
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, Tensor)):
            raise TypeError(f"guidance_scale must be a float, got {type(guidance_scale).__name__}")
        if num_classes is None or labels is None:
            raise ValueError("guidance_scale needs a class-conditional model (config."
                             "num_class_embeds, the last class being the null class) and "
                             "class_labels")
        null = torch.full((B,), num_classes - 1, dtype=torch.int64, device=device)
        return torch.cat([null, labels]), guidance_scale


class DDPMSampler(_Sampler):
    """Ancestral DDPM sampling (Ho et al. 2020), diffusers' DDPMScheduler options.

    variance_type: "fixed_small" (default), "fixed_small_log", "fixed_large", "fixed_large_log",
    "learned" (the model predicts the variance: 2C output channels) or "learned_range" (it
    predicts the interpolation between the fixed ones). The previous timestep of each step is
    the next one of .timesteps (-1 after the last), as diffusers'. The last step adds no noise.
    """
    kind = "ddpm"
    diffusers_class = "DDPMScheduler"

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001,
                 beta_end: float = 0.02, beta_schedule: str = "linear", trained_betas=None,
                 variance_type: str = "fixed_small", clip_sample: bool = True,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 steps_offset: int = 0, rescale_betas_zero_snr: bool = False):
        if variance_type is None:  # a DPM-Solver/UniPC config's; diffusers' DDPM: fixed_small
            variance_type = "fixed_small"
        if variance_type not in DDPM_VARIANCE_TYPES:
            raise ValueError(f"variance_type must be one of {DDPM_VARIANCE_TYPES}, got "
                             f"{variance_type!r}")
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                         prediction_type, clip_sample, clip_sample_range, thresholding,
                         dynamic_thresholding_ratio, sample_max_value, timestep_spacing,
                         steps_offset, rescale_betas_zero_snr, variance_type=variance_type)

    def default_inference_steps(self) -> int:
        return self.schedule.num_train_timesteps

    @staticmethod
    def _previous(ts: np.ndarray) -> np.ndarray:
        return np.concatenate([ts[1:], [-1]]).astype(np.int64)

    def _step_options(self, eta):
        return dict(super()._step_options(eta), variance_type=self.config["variance_type"])


class DDIMSampler(_Sampler):
    """DDIM sampling (Song et al. 2021), diffusers' DDIMScheduler options plus eta (0:
    deterministic) and use_clipped_model_output. The previous timestep of t is t - T // n (as
    diffusers, for every spacing); a negative one is the final step, whose alpha_cumprod is 1
    with set_alpha_to_one, else alphas_cumprod[0]."""
    kind = "ddim"
    diffusers_class = "DDIMScheduler"

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001,
                 beta_end: float = 0.02, beta_schedule: str = "linear", trained_betas=None,
                 clip_sample: bool = True, set_alpha_to_one: bool = True, steps_offset: int = 0,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False, eta: float = 0.0,
                 use_clipped_model_output: bool = False):
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                         prediction_type, clip_sample, clip_sample_range, thresholding,
                         dynamic_thresholding_ratio, sample_max_value, timestep_spacing,
                         steps_offset, rescale_betas_zero_snr,
                         set_alpha_to_one=bool(set_alpha_to_one), eta=self._check_eta(eta),
                         use_clipped_model_output=bool(use_clipped_model_output))

    @staticmethod
    def _check_eta(eta):
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta >= 0:
            raise ValueError(f"eta must be a number >= 0, got {eta!r}")
        return float(eta)

    def _eta(self, eta):
        return self.config["eta"] if eta is None else self._check_eta(eta)

    def _previous(self, ts: np.ndarray) -> np.ndarray:
        return ts - self.schedule.num_train_timesteps // self.num_inference_steps

    def _step_options(self, eta):
        return dict(super()._step_options(eta), eta=eta,
                    set_alpha_to_one=self.config["set_alpha_to_one"],
                    use_clipped_model_output=self.config["use_clipped_model_output"])

    def _diffusers_config(self):  # eta and use_clipped_model_output are step arguments there
        return {k: v for k, v in self.config.items()
                if k not in ("eta", "use_clipped_model_output")}


class _MultistepSampler(_Sampler):
    """A multistep solver over diffusers' schedule (fastdiff.solvers): per step one model call
    and one `multistep_step`, whose coefficient row (float64, made on the host by set_timesteps)
    and x0 history ring (K = solver_order slots, float32 state) live on the device for the whole
    loop. The ring (and UniPC's last sample) are made once per sample() call; the step index
    is a device tensor, so on CUDA the step captures in one graph like the DDPM/DDIM ones.

    Rows are indexed by the step counter, not looked up by timestep (diffusers'
    index_for_timestep picks the wrong row where timesteps repeat, as Karras sigmas on
    squaredcos_cap_v2 give; pass set_begin_index(0) there for diffusers' intended loop)."""
    kind = "multistep"
    flavor = ""
    default_steps = 20
    # options of the diffusers class that fastdiff does not implement: name -> accepted values
    # (a config asking for another value is an error, never silently ignored)
    _fixed: dict = {}

    def __init__(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                 solver_order, prediction_type, thresholding, dynamic_thresholding_ratio,
                 sample_max_value, timestep_spacing, steps_offset, rescale_betas_zero_snr,
                 lower_order_final, use_karras_sigmas, final_sigmas_type, **options):
        solver_order = solvers._check_order(solver_order)
        if final_sigmas_type not in solvers.FINAL_SIGMAS_TYPES:
            raise ValueError(f"final_sigmas_type must be one of {solvers.FINAL_SIGMAS_TYPES}, "
                             f"got {final_sigmas_type!r}")
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                         prediction_type, False, 1.0, thresholding, dynamic_thresholding_ratio,
                         sample_max_value, timestep_spacing, steps_offset, rescale_betas_zero_snr,
                         solver_order=solver_order, lower_order_final=bool(lower_order_final),
                         use_karras_sigmas=bool(use_karras_sigmas),
                         final_sigmas_type=final_sigmas_type, **options)
        for k in ("clip_sample", "clip_sample_range"):  # not options of diffusers' solvers
            del self.config[k]
        c = self.config
        # diffusers' float32 alphas_cumprod: the sigmas must be its float32 values, bit for bit
        self.alphas_cumprod = solvers.multistep_alphas_cumprod(
            c["beta_schedule"], c["num_train_timesteps"], c["beta_start"], c["beta_end"],
            c["trained_betas"], c["rescale_betas_zero_snr"])
        self.sigmas = None
        self.orders = None
        self.coefs = None

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        import inspect
        return tuple(p.name for p in inspect.signature(cls.__init__).parameters.values()
                     if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self")

    @classmethod
    def from_config(cls, config, **overrides):
        """From a diffusers scheduler config (a dict, a scheduler, a scheduler_config.json path):
        this solver's own config, or another scheduler's (DDPM, DDIM, ...) whose shared options
        are taken over, as diffusers' from_config does. Options of diffusers' class that fastdiff
        does not implement (exponential/beta/flow sigmas, ...) must have their default value."""
        cfg = _read_config(config)
        cfg.update(overrides)
        for k, accepted in cls._fixed.items():
            if k in cfg and cfg[k] not in accepted:
                raise ValueError(f"{cls.__name__}.from_config: {k}={cfg[k]!r} is not supported "
                                 f"(only {accepted[0]!r})")
            cfg.pop(k, None)
        return super().from_config(cfg)

    def _round_karras(self) -> bool:
        return True

    def _schedule_kw(self) -> dict:
        return {}

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Timesteps and sigmas as diffusers' set_timesteps (fastdiff.solvers.
        multistep_schedule), and the coefficient table of every step (.coefs, float64 CPU,
        .orders the order of each step). Returns .timesteps; num_inference_steps may end one
        larger than asked (trailing spacing, as diffusers)."""
        T = self.schedule.num_train_timesteps
        n = _int_arg("num_inference_steps", num_inference_steps, low=1)
        if n > T:
            raise ValueError(f"num_inference_steps={n} cannot exceed num_train_timesteps={T}")
        c = self.config
        ts, sig = solvers.multistep_schedule(
            self.alphas_cumprod, n, flavor=self.flavor, timestep_spacing=c["timestep_spacing"],
            steps_offset=c["steps_offset"], use_karras_sigmas=c["use_karras_sigmas"],
            final_sigmas_type=c["final_sigmas_type"], round_karras_timesteps=self._round_karras(),
            **self._schedule_kw())
        if ts.max() >= T:
            raise ValueError(f"steps_offset={c['steps_offset']} puts the first timestep at "
                             f"{int(ts.max())}, outside [0, {T})")
        solvers.check_sigmas(sig, f"num_inference_steps={n}")
        table, orders = self._table(sig)
        self.num_inference_steps = len(ts)
        self.timesteps = torch.from_numpy(ts.copy()).to(device)
        self.sigmas = torch.from_numpy(sig)
        self.coefs = torch.from_numpy(table)
        self.orders = orders
        self._prev = torch.from_numpy(np.concatenate([ts[1:], [-1]]).astype(np.int64)).to(device)
        return self.timesteps

    def _eta(self, eta):
        if eta is not None:
            raise ValueError(f"eta is a DDIM option; {type(self).__name__} has none (got "
                             f"eta={eta!r})")
        return 0.0

    def _step_options(self, eta) -> dict:
        c = self.config
        return dict(prediction_type=c["prediction_type"], thresholding=c["thresholding"],
                    dynamic_thresholding_ratio=c["dynamic_thresholding_ratio"],
                    sample_max_value=c["sample_max_value"])

    def _stochastic(self, eta) -> bool:
        return False

    def _step_rows(self, n, B, device):
        """Row k: the step index k, (1,) int64 on the device (the coefficient row and the ring
        slot; the SDE noise counter)."""
        return torch.arange(n, dtype=torch.int64, device=device).view(n, 1)

    def _loop_state(self, x):
        # zeroed: a ring slot not yet written is multiplied by a zero coefficient, and 0 * NaN
        # (whatever torch.empty held) would not be 0
        ring = multistep_step.empty_ring(x, self.config["solver_order"]).zero_()
        state = {"ring": ring, "coefs": self.coefs.to(x.device)}
        if self.flavor == "unipc":
            state["last_sample"] = torch.zeros_like(ring[0])
        return state

    def _update(self, x, out, t, step, state, kw):
        return multistep_step(x, out, state["ring"], state["coefs"], step,
                              last_sample=state.get("last_sample"), **kw)


class DPMSolverSampler(_MultistepSampler):
    """Multistep DPM-Solver++ (Lu et al. 2022), diffusers' DPMSolverMultistepScheduler options:
    data prediction, solver_order 1-3 (2 recommended for guided sampling, 3 unconditional),
    algorithm_type "dpmsolver++" (ODE) or "sde-dpmsolver++" (the 2M SDE: noise per image from
    the in-kernel stream, or `step_noise`), solver_type "midpoint" / "heun" (order 2),
    lower_order_final (under 15 steps the last two steps drop to orders 1 and 2),
    euler_at_final, final_sigmas_type "zero" (the last step returns x0) or "sigma_min",
    use_karras_sigmas, lambda_min_clipped, timestep_spacing (default "linspace", as diffusers),
    thresholding (pixel models). Default 20 steps.

    Beyond diffusers: beta_schedule "sigmoid" and "laplace" as the DDPM/DDIM samplers (diffusers'
    class refuses them). Not implemented (diffusers' deprecated "dpmsolver"/"sde-dpmsolver",
    exponential/beta/Lu/flow sigmas, dynamic shifting): a config that asks for them is an
    error."""
    flavor = "dpmsolver"
    diffusers_class = "DPMSolverMultistepScheduler"
    _fixed = {"use_exponential_sigmas": (False, None), "use_beta_sigmas": (False, None),
              "use_lu_lambdas": (False, None), "use_flow_sigmas": (False, None),
              "use_dynamic_shifting": (False, None)}

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001,
                 beta_end: float = 0.02, beta_schedule: str = "linear", trained_betas=None,
                 solver_order: int = 2, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 sample_max_value: float = 1.0, algorithm_type: str = "dpmsolver++",
                 solver_type: str = "midpoint", lower_order_final: bool = True,
                 euler_at_final: bool = False, use_karras_sigmas: bool = False,
                 final_sigmas_type: str = "zero", lambda_min_clipped: float = -math.inf,
                 timestep_spacing: str = "linspace", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):
        if algorithm_type == "deis":  # diffusers' own mapping
            algorithm_type = "dpmsolver++"
        if algorithm_type not in solvers.ALGORITHM_TYPES:
            raise ValueError(f"algorithm_type must be one of {solvers.ALGORITHM_TYPES} (data "
                             f"prediction; diffusers' deprecated noise-prediction types are not "
                             f"implemented), got {algorithm_type!r}")
        if solver_type in ("logrho", "bh1", "bh2"):  # diffusers' own mapping
            solver_type = "midpoint"
        if solver_type not in solvers.DPM_SOLVER_TYPES:
            raise ValueError(f"solver_type must be one of {solvers.DPM_SOLVER_TYPES}, got "
                             f"{solver_type!r}")
        if isinstance(lambda_min_clipped, bool) or \
                not isinstance(lambda_min_clipped, (int, float)) or math.isnan(lambda_min_clipped):
            raise ValueError(f"lambda_min_clipped must be a number (-inf: no clipping), got "
                             f"{lambda_min_clipped!r}")
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                         solver_order, prediction_type, thresholding, dynamic_thresholding_ratio,
                         sample_max_value, timestep_spacing, steps_offset, rescale_betas_zero_snr,
                         lower_order_final, use_karras_sigmas, final_sigmas_type,
                         algorithm_type=algorithm_type, solver_type=solver_type,
                         euler_at_final=bool(euler_at_final),
                         lambda_min_clipped=float(lambda_min_clipped))

    def _round_karras(self):  # diffusers keeps the fractional timesteps of the cosine schedule
        return self.config["beta_schedule"] != "squaredcos_cap_v2"

    def _schedule_kw(self):
        return dict(lambda_min_clipped=self.config["lambda_min_clipped"])

    def _table(self, sigmas):
        c = self.config
        return solvers.dpmsolver_table(
            sigmas, solver_order=c["solver_order"], algorithm_type=c["algorithm_type"],
            solver_type=c["solver_type"], lower_order_final=c["lower_order_final"],
            euler_at_final=c["euler_at_final"], final_sigmas_type=c["final_sigmas_type"])

    def _stochastic(self, eta):
        return self.config["algorithm_type"] == "sde-dpmsolver++"


class UniPCSampler(_MultistepSampler):
    """UniPC (Zhao et al. 2023), diffusers' UniPCMultistepScheduler options: the UniP predictor
    of solver_order 1-3 and the UniC corrector of the previous step (fused into this step's
    launch, with this step's x0), solver_type "bh1" (B(h) = h) or "bh2" (B(h) = e^h - 1,
    default), disable_corrector (step indices whose result is not corrected),
    lower_order_final (the order at step i is at most n - i), final_sigmas_type,
    use_karras_sigmas (sigma_min / sigma_max override its range), timestep_spacing (default
    "linspace"), thresholding. Default 20 steps.

    Where diffusers 0.42.1 fails this does not (fastdiff.solvers.unipc_table): bh1 with a zero
    final sigma (NaN at the last step) and lower_order_final=False (order 3: a singular solve;
    order 2: inf) take the analytic limit of the step to sigma = 0, x_0 = the last x0
    prediction. Not implemented: predict_x0=False, solver_p, exponential/beta/flow sigmas."""
    flavor = "unipc"
    diffusers_class = "UniPCMultistepScheduler"
    _fixed = {"use_exponential_sigmas": (False, None), "use_beta_sigmas": (False, None),
              "use_flow_sigmas": (False, None), "use_dynamic_shifting": (False, None),
              "solver_p": (None,), "shift_terminal": (None,)}

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001,
                 beta_end: float = 0.02, beta_schedule: str = "linear", trained_betas=None,
                 solver_order: int = 2, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 sample_max_value: float = 1.0, predict_x0: bool = True,
                 solver_type: str = "bh2", lower_order_final: bool = True,
                 disable_corrector=(), use_karras_sigmas: bool = False,
                 timestep_spacing: str = "linspace", steps_offset: int = 0,
                 final_sigmas_type: str = "zero", rescale_betas_zero_snr: bool = False,
                 sigma_min: Optional[float] = None, sigma_max: Optional[float] = None):
        if predict_x0 is not True:
            raise ValueError("predict_x0=False (UniPC on the noise prediction) is not "
                             "implemented: fastdiff's UniPC is the data-prediction one "
                             "(diffusers' default)")
        if solver_type in ("midpoint", "heun", "logrho"):  # diffusers' own mapping
            solver_type = "bh2"
        if solver_type not in solvers.UNIPC_SOLVER_TYPES:
            raise ValueError(f"solver_type must be one of {solvers.UNIPC_SOLVER_TYPES}, got "
                             f"{solver_type!r}")
        if isinstance(disable_corrector, (str, bytes)) or not hasattr(disable_corrector,
                                                                       "__iter__"):
            raise TypeError(f"disable_corrector must be a list of step indices, got "
                            f"{type(disable_corrector).__name__}")
        disable_corrector = [_int_arg("disable_corrector[]", d, low=0)
                             for d in disable_corrector]
        for name, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not v > 0):
                raise ValueError(f"{name} must be None or a number > 0, got {v!r}")
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                         solver_order, prediction_type, thresholding, dynamic_thresholding_ratio,
                         sample_max_value, timestep_spacing, steps_offset, rescale_betas_zero_snr,
                         lower_order_final, use_karras_sigmas, final_sigmas_type,
                         predict_x0=True, solver_type=solver_type,
                         disable_corrector=disable_corrector, sigma_min=sigma_min,
                         sigma_max=sigma_max)

    def _schedule_kw(self):
        return dict(sigma_min=self.config["sigma_min"], sigma_max=self.config["sigma_max"])

    def _table(self, sigmas):
        c = self.config
        return solvers.unipc_table(sigmas, solver_order=c["solver_order"],
                                   solver_type=c["solver_type"],
                                   lower_order_final=c["lower_order_final"],
                                   disable_corrector=c["disable_corrector"])


class _Loop:
    """One sample() call: the step (model + the sampler's fused op) and the eager and CUDA-graph
    loops."""

    def __init__(self, sampler, model, x, ts, tps, labels, w, eta, seed, first_index):
        self.sampler, self.model, self.x = sampler, model, x
        self.ts, self.tps, self.labels, self.w = ts, tps, labels, w
        self.seed, self.first_index = seed, first_index
        self.opts = sampler._step_options(eta)
        self.stochastic = sampler._stochastic(eta)
        self.state = sampler._loop_state(x)
        C = x.shape[1]
        vt = self.opts.get("variance_type")
        self.learned = vt in ("learned", "learned_range")
        self.C = C

    def step(self, x, t, t_prev, seed, first_index, noise=None):
        """x_t -> x_prev: one model call, one fused step (sampler_step or multistep_step). Reads
        no value on the host."""
        if self.w is not None:
            out = _output(self.model(torch.cat([x, x]), torch.cat([t, t]),
                                     class_labels=self.labels))
        elif self.labels is not None:
            out = _output(self.model(x, t, class_labels=self.labels))
        else:
            out = _output(self.model(x, t))
        if not self.learned and out.shape[1] == 2 * self.C:
            out = out[:, :self.C]  # a learned-variance model under DDIM / fixed variances
        kw = dict(self.opts)
        if self.w is not None:
            kw["guidance_scale"] = self.w
        if noise is not None:
            kw["noise"] = noise.to(device=x.device, dtype=x.dtype)
        elif self.stochastic:
            kw.update(seed=seed, first_index=first_index)
        return self.sampler._update(x, out, t, t_prev, self.state, kw)

    def _bar(self, progress):
        if not progress:
            return None
        from tqdm.auto import tqdm
        return tqdm(total=len(self.ts), desc=f"{type(self.sampler).__name__}", unit="step",
                    leave=False)

    def eager(self, step_noise, progress, callback):
        x, bar = self.x, self._bar(progress)
        with trusted_values():  # our own timesteps, checked once by set_timesteps: no syncs
            for k in range(len(self.ts)):
                t, tp = self.ts[k], self.tps[k]
                noise = step_noise(k, t[0], x) if step_noise is not None else None
                x = self.step(x, t, tp, self.seed, self.first_index, noise)
                if callback is not None:
                    callback(k, t[0], x)
                if bar is not None:
                    bar.update()
        if bar is not None:
            bar.close()
        return x

    def graphed(self, required, progress, callback):
        g = self._graph(required)
        if g is None:
            return self.eager(None, progress, callback)
        g.x.copy_(self.x)
        g.seed.fill_(self.seed)
        g.first_index.fill_(self.first_index)
        if g.labels is not None:
            g.labels.copy_(self.labels)
        for name, v in self.state.items():  # this call's fresh state (zeroed ring, its table)
            g.state[name].copy_(v)
        if g.w is not None:
            g.w.fill_(self.w) if not isinstance(self.w, Tensor) else g.w.copy_(self.w)
        bar = self._bar(progress)
        for k in range(len(self.ts)):
            g.t.copy_(self.ts[k])
            g.t_prev.copy_(self.tps[k])
            g.graph.replay()
            g.x.copy_(g.out)
            if callback is not None:
                callback(k, g.t[0], g.x)
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
        return g.x.clone()

    def _graph(self, required):
        """The captured step for this (model, shape, dtype, options), made on first use."""
        key = (id(self.model), tuple(self.x.shape), self.x.dtype, self.x.device,
               tuple(sorted(self.opts.items())), self.w is not None, self.labels is not None,
               tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(self.state.items())))
        cache = self.sampler._graphs
        if key in cache:
            return cache[key]
        try:
            g = _CapturedStep(self)
        except Exception as e:  # noqa: BLE001 - any failure: say why once, then run eagerly
            if required:
                raise RuntimeError(f"CUDA graph capture failed: {e}") from e
            print(f"fastdiff: CUDA graph capture failed ({type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}); sampling eagerly")
            g = None
        cache[key] = g
        return g


class _CapturedStep:
    """Static buffers and a CUDA graph of one step: x, t, t_prev, seed, first_index, labels, w
    in; out = x_prev; state (a multistep solver's x0 ring, last sample and coefficient table)
    updated in place by every replay. The kernels read seed and first_index from the device, so
    a replay after fill_ draws that batch's noise."""

    def __init__(self, loop: _Loop):
        dev = loop.x.device
        self.model = loop.model  # keeps id(model) of the cache key alive
        self.x = loop.x.clone()
        self.t, self.t_prev = loop.ts[0].clone(), loop.tps[0].clone()
        self.seed = torch.zeros((), dtype=torch.int64, device=dev)
        self.first_index = torch.zeros((), dtype=torch.int64, device=dev)
        self.labels = None if loop.labels is None else loop.labels.clone()
        self.w = None
        if loop.w is not None:
            self.w = torch.zeros((), dtype=torch.float32, device=dev)
            self.w.fill_(loop.w) if not isinstance(loop.w, Tensor) else self.w.copy_(loop.w)
        self.state = {k: v.clone() for k, v in loop.state.items()}
        saved = loop.labels, loop.w, loop.state
        loop.labels, loop.w, loop.state = self.labels, self.w, self.state

        def step():
            return loop.step(self.x, self.t, self.t_prev, self.seed, self.first_index)

        try:
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side), trusted_values():  # warm-up: lazy inits, autotuning
                for _ in range(2):
                    step()
            torch.cuda.current_stream(dev).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = step()
        finally:
            loop.labels, loop.w, loop.state = saved
