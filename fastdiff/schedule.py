"""Noise schedules and every table derived from them.

Names and defaults follow diffusers' DDPMScheduler/DDIMScheduler. Every table is computed once in
float64 on the CPU; `Schedule.table(name, device, dtype)` hands out a copy cached per
(device, dtype), so a sampling step never recomputes or re-uploads a table, and kernels gather
by `t` themselves (no host sync, capturable in a CUDA graph).
"""
from __future__ import annotations

import json
import math
import os

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")

# Tables a Schedule derives; all indexed by t in [0, T).
TABLES = (
    "betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev",
    "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
)


def _alpha_bar_fn(kind):
    if kind == "cosine":  # Nichol & Dhariwal 2021, s = 0.008
        return lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    if kind == "laplace":
        def f(t):
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))
        return f
    raise ValueError(kind)


def betas_for_alpha_bar(num_timesteps: int, kind: str = "cosine", max_beta: float = 0.999):
    """Betas that discretise a continuous alpha_bar(t), t in [0, 1], capped at max_beta."""
    f = _alpha_bar_fn(kind)
    return torch.tensor([min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), max_beta)
                         for i in range(num_timesteps)], dtype=torch.float64)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so that alpha_bar[T-1] = 0."""
    abar_sqrt = torch.cumprod(1.0 - betas.double(), 0).sqrt()
    a0, aT = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - aT) * (a0 / (a0 - aT))
    abar = abar_sqrt ** 2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


class Schedule:
    """A discrete noise schedule of `num_train_timesteps` steps.

    >>> s = Schedule("linear", 1000, beta_start=1e-4, beta_end=0.02)
    >>> s.alphas_cumprod.dtype        # float64 master tables
    torch.float64
    >>> s.table("sqrt_alphas_cumprod", "cuda", torch.float32)   # cached device copy
    """

    def __init__(self, beta_schedule: str = "linear", num_train_timesteps: int = 1000,
                 beta_start: float = 1e-4, beta_end: float = 0.02, *, trained_betas=None,
                 rescale_betas_zero_snr: bool = False):
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) \
                or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
        T = num_train_timesteps
        if trained_betas is not None:
            betas = torch.as_tensor(trained_betas, dtype=torch.float64).flatten().cpu()
            beta_schedule = "trained"
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        elif beta_schedule == "scaled_linear":  # latent diffusion
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            betas = betas_for_alpha_bar(T, "cosine")
        elif beta_schedule == "laplace":
            betas = betas_for_alpha_bar(T, "laplace")
        elif beta_schedule == "sigmoid":  # GeoDiff
            betas = torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) \
                * (beta_end - beta_start) + beta_start
        else:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.config = dict(beta_schedule=beta_schedule, num_train_timesteps=len(betas),
                           beta_start=beta_start, beta_end=beta_end,
                           rescale_betas_zero_snr=rescale_betas_zero_snr)
        self._set_betas(betas)

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def from_betas(cls, betas) -> "Schedule":
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten().cpu()
        return cls(num_train_timesteps=max(len(betas), 1), trained_betas=betas)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod) -> "Schedule":
        """A schedule whose alphas_cumprod are exactly these (e.g. a diffusers scheduler's)."""
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten().cpu()
        alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
        s = cls.from_betas(1.0 - alphas)
        s._set_betas(1.0 - alphas, alphas_cumprod=ab)
        return s

    @classmethod
    def from_config(cls, config) -> "Schedule":
        """From a dict, a diffusers scheduler (or its .config), or a scheduler_config.json path."""
        if isinstance(config, (str, os.PathLike)):
            with open(config) as f:
                config = json.load(f)
        elif hasattr(config, "config") and not isinstance(config, dict):
            config = config.config
        if not hasattr(config, "get"):
            raise TypeError(f"config must be a dict, a diffusers scheduler or a path to "
                            f"scheduler_config.json, got {type(config).__name__}")
        kw = {k: config[k] for k in ("beta_schedule", "num_train_timesteps", "beta_start",
                                     "beta_end", "trained_betas", "rescale_betas_zero_snr")
              if config.get(k) is not None}
        return cls(**kw)

    # -- tables ------------------------------------------------------------------------------
    def _set_betas(self, betas: torch.Tensor, alphas_cumprod: torch.Tensor | None = None):
        if betas.dim() != 1 or len(betas) < 1:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        if not torch.isfinite(betas).all() or (betas < 0).any() or (betas > 1).any():
            raise ValueError("betas must be finite and lie in [0, 1]")
        alphas = 1.0 - betas
        ab = torch.cumprod(alphas, 0) if alphas_cumprod is None else alphas_cumprod
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        pv = betas * (1.0 - ab_prev) / (1.0 - ab)
        pv = torch.where(torch.isfinite(pv), pv, torch.zeros_like(pv))  # 0/0 when beta_0 = 0
        # log of the posterior variance, clipped: pv[0] = 0, so it takes pv[1] (Ho et al.)
        pv_log = torch.log(torch.cat([pv[1:2], pv[1:]]) if len(pv) > 1 else pv.clamp_min(1e-20))
        self._tables = {
            "betas": betas, "alphas": alphas, "alphas_cumprod": ab, "alphas_cumprod_prev": ab_prev,
            "sqrt_alphas_cumprod": ab.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - ab).sqrt(),
            "sqrt_recip_alphas_cumprod": ab.rsqrt(), "sqrt_recipm1_alphas_cumprod": (1.0 / ab - 1).sqrt(),
            "posterior_variance": pv, "posterior_log_variance_clipped": pv_log,
            "posterior_mean_coef1": betas * ab_prev.sqrt() / (1.0 - ab),
            "posterior_mean_coef2": (1.0 - ab_prev) * alphas.sqrt() / (1.0 - ab),
        }
        self._cache = {}

    @property
    def num_train_timesteps(self) -> int:
        return self._tables["betas"].shape[0]

    def __len__(self) -> int:
        return self.num_train_timesteps

    def __getattr__(self, name):
        tables = self.__dict__.get("_tables")
        if tables is not None and name in tables:
            return tables[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def table(self, name: str, device="cpu", dtype=torch.float32) -> torch.Tensor:
        """Table `name` on `device` in `dtype`, made once and cached (capturable: no upload later)."""
        out = self._cache.get((name, device, dtype))  # as the ops ask: no str(device) per call
        if out is not None:
            return out
        if name not in self._tables:
            raise ValueError(f"table must be one of {TABLES}, got {name!r}")
        key = (name, str(torch.device(device)), dtype)
        out = self._cache.get(key)
        if out is None:
            out = self._tables[name].to(device=device, dtype=dtype).contiguous()
            self._cache[key] = out
        self._cache[(name, device, dtype)] = out  # the same tensor under the caller's spelling
        return out

    def __repr__(self):
        c = self.config
        return (f"Schedule({c['beta_schedule']!r}, num_train_timesteps={self.num_train_timesteps}, "
                f"beta_start={c['beta_start']}, beta_end={c['beta_end']}"
                f"{', rescale_betas_zero_snr=True' if c['rescale_betas_zero_snr'] else ''})")
