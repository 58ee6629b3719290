"""Training: q_sample (noise drawn in the kernel, v target) -> U-Net -> weighted MSE.

`train(TrainConfig(...))` (or `python -m fastdiff train ...`) runs the loop: AdamW, LR warmup +
cosine, gradient clipping and accumulation, an EMA with diffusers' EMAModel semantics, autocast
(bf16/fp16, a grad scaler for fp16), channels_last (on CUDA; on CPU for fastdiff's U-Net), DDP
under torchrun.

Everything random in a step is a pure function of (seed, step, global image index): the data
order (a permutation per epoch), the timesteps, label dropout, flips, offset noise and the
q_sample noise. So a resumed run draws what the uninterrupted run would have drawn, and K ranks
that each take their shard of a batch draw what one process drew for the whole batch.

The output folder is a diffusers pipeline folder (model_index.json, unet/ with the EMA weights,
scheduler/), plus:
    checkpoints/step-NNNNNNNN/{state.json, state.safetensors}  the resumable state (no pickle)
    checkpoints/latest                                          the name of the newest one
    samples/step-NNNNNNNN.png, loss.png, log.txt, fastdiff.json (class names, null class)
Each checkpoint is written to a temporary folder and renamed into place, then `latest` is
replaced atomically: a run killed while saving keeps its previous checkpoint.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F

from .data import ImageData, load_data
from .ops.q_sample import q_sample
from .schedule import Schedule

OBJECTIVES = ("epsilon", "v_prediction", "sample")
MIXED_PRECISION = ("no", "fp16", "bf16")
TIMESTEP_MODES = ("uniform", "per_batch")
LR_SCHEDULES = ("cosine", "constant")
UNET_IMPLS = ("fastdiff", "diffusers")
DIFFUSERS_VERSION = "0.42.1"  # written into the configs; diffusers reads older/newer ones alike

# The embedded digits model's U-Net (fastdiff/assets/digits): 8x8 -> 4x4 -> 2x2, attention only
# at 2x2, 1.1M parameters. in/out channels, sample_size and num_class_embeds follow the data.
DEFAULT_UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
    "attention_head_dim": 32,
    "num_class_embeds": 11,
}

# Settings that may differ between a run and its resume (they change no weight).
_NOT_FINGERPRINTED = ("out", "resume", "device", "checkpoint_every", "sample_every", "log_every",
                      "progress", "keep_checkpoints", "sample_steps", "guidance_scale",
                      "sample_seed")


@dataclasses.dataclass
class TrainConfig:
    data: str = "digits"                  # "digits" or a folder of images
    out: str = "fastdiff-train"
    steps: int = 1000                     # optimizer steps
    batch_size: int = 64                  # global batch (all ranks, all accumulation micro-steps)
    grad_accum: int = 1
    lr: float = 1e-3
    lr_schedule: str = "cosine"           # warmup then cosine to 0, or warmup then constant
    warmup_steps: int = 100
    adam_betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0  # None: no clipping
    resolution: Optional[int] = None      # None: the data's own size
    flip: bool = False                    # random horizontal flips
    class_conditional: bool = False
    label_dropout: float = 0.0            # probability of the null class (the last embedding)
    objective: str = "epsilon"
    min_snr_gamma: Optional[float] = None
    offset_noise: float = 0.0
    timesteps: str = "uniform"            # one t per image, or one per batch
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    unet_config: Optional[dict] = None    # a diffusers UNet2DModel config; None: DEFAULT_UNET_CONFIG
    unet_impl: str = "fastdiff"           # "diffusers": diffusers' own UNet2DModel (comparison)
    ema_max_decay: float = 0.9999
    ema_min_decay: float = 0.0
    ema_inv_gamma: float = 1.0
    ema_power: float = 2 / 3
    ema_update_after_step: int = 0
    ema_warmup: bool = True
    mixed_precision: str = "no"
    seed: int = 0
    device: Optional[str] = None          # None: cuda:LOCAL_RANK when CUDA is there, else cpu
    checkpoint_every: int = 500           # 0: only at the end
    keep_checkpoints: int = 1
    sample_every: int = 500               # 0: only at the end
    sample_steps: int = 25                # DDIM steps of the sample grid
    guidance_scale: Optional[float] = None  # grid guidance; None: 2.0 with label dropout, else off
    sample_seed: int = 0
    log_every: int = 50
    resume: bool = False
    progress: bool = True


def _positive_int(name, v, zero_ok=False):
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if zero_ok else 1):
        raise ValueError(f"{name} must be a {'non-negative' if zero_ok else 'positive'} int, "
                         f"got {v!r}")


def _choice(name, v, options):
    if v not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {v!r}")


def check_config(cfg: TrainConfig) -> None:
    for n in ("steps", "batch_size", "grad_accum", "num_train_timesteps", "log_every",
              "sample_steps", "keep_checkpoints"):
        _positive_int(n, getattr(cfg, n))
    for n in ("warmup_steps", "checkpoint_every", "sample_every", "ema_update_after_step"):
        _positive_int(n, getattr(cfg, n), zero_ok=True)
    _choice("objective", cfg.objective, OBJECTIVES)
    _choice("mixed_precision", cfg.mixed_precision, MIXED_PRECISION)
    _choice("timesteps", cfg.timesteps, TIMESTEP_MODES)
    _choice("lr_schedule", cfg.lr_schedule, LR_SCHEDULES)
    _choice("unet_impl", cfg.unet_impl, UNET_IMPLS)
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ValueError(f"lr must be a positive number, got {cfg.lr!r}")
    if not 0.0 <= cfg.label_dropout < 1.0:
        raise ValueError(f"label_dropout must be in [0, 1), got {cfg.label_dropout!r}")
    if cfg.label_dropout and not cfg.class_conditional:
        raise ValueError("label_dropout drops class labels: it needs class_conditional "
                         "(--class-conditional)")
    if cfg.min_snr_gamma is not None and not cfg.min_snr_gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0 (or None for plain MSE), got "
                         f"{cfg.min_snr_gamma!r}")
    if cfg.offset_noise < 0:
        raise ValueError(f"offset_noise must be >= 0, got {cfg.offset_noise!r}")
    if cfg.max_grad_norm is not None and not cfg.max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 (or None for no clipping), got "
                         f"{cfg.max_grad_norm!r}")
    if not 0.0 <= cfg.ema_min_decay <= cfg.ema_max_decay < 1.0:
        raise ValueError(f"EMA decays need 0 <= ema_min_decay <= ema_max_decay < 1, got "
                         f"{cfg.ema_min_decay!r}, {cfg.ema_max_decay!r}")


# -- randomness: pure functions of (seed, what, counters) ---------------------------------------
def _mix(*words: int) -> int:
    """splitmix64 over the words: a 63-bit seed for torch.Generator.manual_seed."""
    h = 0x9E3779B97F4A7C15
    for w in words:
        h = (h ^ (int(w) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


_DATA, _STEP, _NOISE, _TORCH = 1, 2, 3, 4


def _gen(*words) -> torch.Generator:
    return torch.Generator().manual_seed(_mix(*words))


def _draw_noised(x0, t, schedule, seed: int, first_index: int, v_target: bool):
    """q_sample with the noise of images first_index, first_index+1, ... of the step's batch: the
    noise of an image is a function of (seed, its index in the batch, t), so a shard (a rank, an
    accumulation micro-batch) draws what one call on the whole batch draws for it."""
    return q_sample(x0, t, schedule, seed=seed, first_index=first_index, v_target=v_target)


# -- learning rate and EMA ----------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig) -> float:
    """LR of optimizer step `step` (0-based): linear warmup to cfg.lr, then cosine to 0 or flat."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    done = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))


class EMA:
    """Exponential moving average of a module's parameters, as diffusers' EMAModel: decay at
    optimization step n is min(max_decay, 1 - (1 + k / inv_gamma) ** -power) (warmup) or
    (1 + k) / (10 + k), with k = n - update_after_step - 1, 0 while k <= 0, at least min_decay.
    Buffers and frozen parameters are copied."""

    def __init__(self, model: torch.nn.Module, max_decay=0.9999, min_decay=0.0, inv_gamma=1.0,
                 power=2 / 3, update_after_step=0, use_warmup=True):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.max_decay, self.min_decay = max_decay, min_decay
        self.inv_gamma, self.power = inv_gamma, power
        self.update_after_step, self.use_warmup = update_after_step, use_warmup
        self.optimization_step = 0

    def decay(self, optimization_step: int) -> float:
        k = max(0, optimization_step - self.update_after_step - 1)
        if k <= 0:
            return 0.0
        d = 1 - (1 + k / self.inv_gamma) ** -self.power if self.use_warmup else (1 + k) / (10 + k)
        return max(min(d, self.max_decay), self.min_decay)

    @torch.no_grad()
    def step(self, model: torch.nn.Module) -> None:
        self.optimization_step += 1
        one_minus = 1.0 - self.decay(self.optimization_step)
        pairs = list(zip(self.module.parameters(), model.parameters()))
        s = [e for e, p in pairs if p.requires_grad]
        p = [p for e, p in pairs if p.requires_grad]
        if s:
            torch._foreach_sub_(s, torch._foreach_sub(s, p), alpha=one_minus)
        for e, q in pairs:
            if not q.requires_grad:
                e.copy_(q)
        for e, q in zip(self.module.buffers(), model.buffers()):
            e.copy_(q)


# -- files: atomic writes -----------------------------------------------------------------------
def _fsync_write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str, data) -> None:
    """Write bytes/str to path through a temporary file in the same folder and os.replace."""
    tmp = f"{path}.tmp-{os.getpid()}"
    _fsync_write(tmp, data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def _json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def _save_tensors(path: str, tensors: dict, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save
    atomic_write(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                            metadata=metadata))


def _load_tensors(path: str) -> dict:
    from safetensors.torch import load_file
    return load_file(path)


def scheduler_config(cfg: TrainConfig) -> dict:
    """diffusers DDPMScheduler config of the run (what the pipeline folder's scheduler gets)."""
    return {"_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
            "num_train_timesteps": cfg.num_train_timesteps, "beta_schedule": cfg.beta_schedule,
            "beta_start": cfg.beta_start, "beta_end": cfg.beta_end, "trained_betas": None,
            "prediction_type": cfg.objective, "variance_type": "fixed_small",
            "clip_sample": True, "clip_sample_range": 1.0, "thresholding": False,
            "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False}


def write_pipeline(out: str, unet_config: dict, ema_state: dict, cfg: TrainConfig,
                   extra: dict) -> None:
    """The diffusers pipeline folder (EMA weights), each file replaced atomically."""
    os.makedirs(os.path.join(out, "unet"), exist_ok=True)
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    _save_tensors(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"), ema_state,
                  {"format": "pt"})
    atomic_write(os.path.join(out, "unet", "config.json"), _json(
        {"_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION, **unet_config}))
    atomic_write(os.path.join(out, "scheduler", "scheduler_config.json"),
                 _json(scheduler_config(cfg)))
    atomic_write(os.path.join(out, "model_index.json"), _json(
        {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
         "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}))
    atomic_write(os.path.join(out, "fastdiff.json"), _json(extra))


# -- images -------------------------------------------------------------------------------------
def save_grid(images: torch.Tensor, path: str, nrow: int, scale: int = 1) -> None:
    """(N, C, H, W) in [-1, 1] -> one PNG, nrow images per row, 1-pixel gaps, nearest upscale."""
    from PIL import Image
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    grid = torch.full((c, rows * (h + 1) + 1, nrow * (w + 1) + 1), 255, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + k * (w + 1):1 + k * (w + 1) + w] = x[i]
    arr = grid[0].numpy() if c == 1 else grid[:3].permute(1, 2, 0).numpy()
    im = Image.fromarray(arr, "L" if c == 1 else "RGB")
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
    _save_image(im, path)


def _save_image(im, path: str) -> None:
    import io
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    atomic_write(path, buf.getvalue())


def save_loss_curve(history: list, path: str, width: int = 640, height: int = 360) -> None:
    """Loss against step on a log axis, drawn with Pillow (no matplotlib)."""
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    pts = [(s, v) for s, v in history if v > 0 and math.isfinite(v)]
    left, right, top, bottom = 64, width - 16, 24, height - 36
    d.rectangle([left, top, right, bottom], outline="black")
    d.text((left, 4), "training loss (log scale) vs step", fill="black")
    if pts:
        s0, s1 = min(p[0] for p in pts), max(p[0] for p in pts)
        lo, hi = math.log10(min(p[1] for p in pts)), math.log10(max(p[1] for p in pts))
        if hi - lo < 1e-6:
            lo, hi = lo - 0.5, hi + 0.5
        sx = lambda s: left + (right - left) * ((s - s0) / (s1 - s0) if s1 > s0 else 0.5)  # noqa
        sy = lambda v: bottom - (bottom - top) * (math.log10(v) - lo) / (hi - lo)  # noqa
        for k in range(5):  # y ticks
            val = lo + (hi - lo) * k / 4
            y = sy(10 ** val)
            d.line([left - 4, y, left, y], fill="black")
            d.text((4, y - 6), f"{10 ** val:.3g}", fill="black")
        for s in (s0, (s0 + s1) // 2, s1):
            d.text((sx(s) - 10, bottom + 6), str(s), fill="black")
        xy = [(sx(s), sy(v)) for s, v in pts]
        if len(xy) == 1:
            d.ellipse([xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2], fill="blue")
        else:
            d.line(xy, fill="blue", width=2)
    _save_image(im, path)


@torch.no_grad()
def ddim_sample(model, schedule: Schedule, shape, *, steps: int, objective: str,
                class_labels=None, null_class: Optional[int] = None, guidance_scale=None,
                seed: int = 0, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Deterministic DDIM (eta 0, 'leading' spacing, x0 clipped to [-1, 1]) with optional
    classifier-free guidance, one fused sampler_step per step. Starts from N(0, 1) drawn with a
    generator seeded by `seed`."""
    from .ops.sampler_step import sampler_step
    T = schedule.num_train_timesteps
    ratio = max(1, T // steps)
    ts = list(range(0, T, ratio))[:steps][::-1]
    x = torch.randn(shape, generator=_gen(seed, _TORCH)).to(device=device, dtype=dtype)
    guided = guidance_scale is not None and class_labels is not None and null_class is not None
    if class_labels is not None:
        class_labels = class_labels.to(device)
        if guided:
            class_labels = torch.cat([torch.full_like(class_labels, null_class), class_labels])
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        inp = torch.cat([x, x]) if guided else x
        tt = torch.full((inp.shape[0],), t, dtype=torch.int64, device=device)
        out = model(inp, tt, class_labels=class_labels).sample.to(dtype)
        if guided:
            u, c = out.chunk(2)
            out = u + guidance_scale * (c - u)
        x = sampler_step(x, out, t, t_prev, schedule, kind="ddim", prediction_type=objective,
                         clip_sample=True, eta=0.0)
    return x


# -- the trainer --------------------------------------------------------------------------------
def _unet_class(impl: str):
    if impl == "diffusers":
        from diffusers import UNet2DModel  # on request only: diffusers is not a library dependency
        return UNet2DModel
    from .unet import UNet2DModel
    return UNet2DModel


def resolve_unet_config(cfg: TrainConfig, data: ImageData) -> dict:
    """The U-Net config: cfg.unet_config (or the default) checked against and completed from the
    data: sample_size = the resolution, channels = the data's, num_class_embeds = the classes
    (+1 null class with label dropout)."""
    user = cfg.unet_config is not None
    conf = {k: v for k, v in (cfg.unet_config if user else DEFAULT_UNET_CONFIG).items()
            if not k.startswith("_")}
    need_classes = data.num_classes + (1 if cfg.label_dropout > 0 else 0)
    if not user:
        conf.update(in_channels=data.channels, out_channels=data.channels)
        if cfg.class_conditional:
            conf["num_class_embeds"] = need_classes
        else:
            conf.pop("num_class_embeds", None)
    for k in ("in_channels", "out_channels"):
        if conf.get(k, 3) != data.channels:
            raise ValueError(f"the U-Net config has {k}={conf.get(k, 3)} but the data "
                             f"({data.name}) has {data.channels} channel(s)")
    if cfg.class_conditional:
        if data.num_classes == 0:
            raise ValueError("class_conditional needs class labels: digits has them, a folder "
                             "gives them by sub-folder")
        have = conf.get("num_class_embeds")
        if have is None or have < need_classes:
            raise ValueError(f"the U-Net config needs num_class_embeds >= {need_classes} "
                             f"({data.num_classes} classes"
                             f"{' + the null class' if cfg.label_dropout else ''}), got {have!r}")
        if conf.get("class_embed_type") not in (None,):
            raise ValueError("class_conditional trains integer labels through num_class_embeds; "
                             f"class_embed_type={conf['class_embed_type']!r} is not supported")
    elif conf.get("num_class_embeds") is not None or conf.get("class_embed_type") is not None:
        raise ValueError("the U-Net config is class-conditional (num_class_embeds / "
                         "class_embed_type) but the run is not: pass --class-conditional")
    conf["sample_size"] = data.resolution
    return conf


class Trainer:
    """One training run. `Trainer(cfg).run()`; under torchrun each process builds its own."""

    def __init__(self, cfg: TrainConfig, data: Optional[ImageData] = None):
        check_config(cfg)
        self.cfg = cfg
        self.rank, self.world, local = _dist_env()
        self.distributed = self.world > 1
        if cfg.device is None:
            self.device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(cfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if cfg.mixed_precision == "fp16" and self.device.type != "cuda":
            raise ValueError("mixed_precision='fp16' needs a CUDA device (bf16 or no on CPU)")
        per = cfg.batch_size // (self.world * cfg.grad_accum)
        if per * self.world * cfg.grad_accum != cfg.batch_size:
            raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of world size "
                             f"{self.world} x grad_accum {cfg.grad_accum}")
        self.micro = per
        if self.distributed and not torch.distributed.is_initialized():
            torch.distributed.init_process_group(
                "nccl" if self.device.type == "cuda" else "gloo")
        self.data = data if data is not None else load_data(cfg.data, cfg.resolution,
                                                            cfg.class_conditional)
        if cfg.resolution is not None and self.data.resolution != cfg.resolution:
            raise ValueError(f"the data's resolution is {self.data.resolution}, "
                             f"cfg.resolution {cfg.resolution}")
        if cfg.class_conditional and self.data.labels is None:
            raise ValueError("class_conditional needs labelled data (digits, or a folder of "
                             "class sub-folders)")
        self.unet_config = resolve_unet_config(cfg, self.data)
        self.null_class = (self.unet_config["num_class_embeds"] - 1
                           if cfg.class_conditional and cfg.label_dropout > 0 else None)
        self.schedule = Schedule(cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start,
                                 cfg.beta_end)
        torch.manual_seed(_mix(cfg.seed, _TORCH))  # initial weights: the same on every rank
        self.model = _unet_class(cfg.unet_impl)(**self.unet_config).to(self.device)
        if self.device.type == "cuda" or cfg.unet_impl == "fastdiff":
            # channels_last on CPU too for fastdiff's U-Net: oneDNN's convolutions then skip the
            # reorders of NCHW (digits B64 step 5-25% faster on a 2-core EPYC, fused GroupNorm
            # channels_last forward and backward kernels; diffusers' own U-Net was not faster)
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = EMA(self.model, cfg.ema_max_decay, cfg.ema_min_decay, cfg.ema_inv_gamma,
                       cfg.ema_power, cfg.ema_update_after_step, cfg.ema_warmup)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=cfg.adam_betas,
                                     eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.mixed_precision == "fp16")
        self.ddp = (torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.distributed else self.model)
        self.step = 0
        self.history: list = []          # (step, mean loss since the previous point)
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._loss_n = 0
        self._perm_cache: dict = {}
        snr = self.schedule.alphas_cumprod / (1 - self.schedule.alphas_cumprod)
        self._snr = snr.to(self.device, torch.float32)
        self._sab = self.schedule.table("sqrt_alphas_cumprod", self.device)
        self._s1mab = self.schedule.table("sqrt_one_minus_alphas_cumprod", self.device)
        self.out = cfg.out
        self.ckpt_dir = os.path.join(self.out, "checkpoints")

    # -- fingerprint, data order ------------------------------------------------------------
    def fingerprint(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k not in _NOT_FINGERPRINTED}
        d["adam_betas"] = list(d["adam_betas"])
        d["unet_config"] = self.unet_config
        d["data"] = {"source": self.cfg.data if self.cfg.data == "digits"
                     else os.path.abspath(self.cfg.data), "images": len(self.data),
                     "channels": self.data.channels, "resolution": self.data.resolution,
                     "classes": self.data.class_names}
        if self.cfg.lr_schedule == "constant":
            d.pop("steps")  # a constant-LR run may be extended
        return json.loads(json.dumps(d))

    def _indices(self, step: int) -> torch.Tensor:
        """Data indices of the global batch of `step`: a stream of per-epoch permutations."""
        B, N = self.cfg.batch_size, len(self.data)
        pos = torch.arange(step * B, (step + 1) * B)
        out = torch.empty(B, dtype=torch.int64)
        for e in torch.unique(pos // N).tolist():
            if e not in self._perm_cache:
                self._perm_cache = {e: torch.randperm(N, generator=_gen(self.cfg.seed, _DATA, e))}
            m = pos // N == e
            out[m] = self._perm_cache[e][pos[m] % N]
        return out

    def _draws(self, step: int) -> dict:
        """Everything random about the global batch of `step` (CPU tensors)."""
        cfg, B = self.cfg, self.cfg.batch_size
        g = _gen(cfg.seed, _STEP, step)
        T = cfg.num_train_timesteps
        t = torch.randint(0, T, (B,) if cfg.timesteps == "uniform" else (1,), generator=g)
        d = {"t": t.expand(B).contiguous(), "noise_seed": _mix(cfg.seed, _NOISE, step),
             "drop": torch.rand(B, generator=g) < cfg.label_dropout,
             "flip": torch.rand(B, generator=g) < 0.5,
             "offset": torch.randn(B, self.data.channels, generator=g) * cfg.offset_noise}
        return d

    # -- one step ---------------------------------------------------------------------------
    def _autocast(self):
        if self.cfg.mixed_precision == "no":
            return contextlib.nullcontext()
        dt = torch.float16 if self.cfg.mixed_precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dt)

    def loss(self, x0, t, labels, noise_seed: int, first_index: int, offset):
        """Weighted MSE of the model on x0 noised to t (a shard of the step's batch)."""
        cfg = self.cfg
        want_v = cfg.objective == "v_prediction"
        out = _draw_noised(x0, t, self.schedule, noise_seed, first_index, want_v)
        x_t, eps = out[0], out[1]
        if cfg.offset_noise > 0:  # eps' = eps + offset per channel, folded in after the kernel
            off = offset[:, :, None, None]
            x_t = x_t + self._s1mab[t].view(-1, 1, 1, 1) * off
            eps = eps + off
        if cfg.objective == "epsilon":
            target = eps
        elif cfg.objective == "v_prediction":
            target = out[2] + (self._sab[t].view(-1, 1, 1, 1) * off if cfg.offset_noise > 0 else 0)
        else:
            target = x0
        with self._autocast():
            pred = self.ddp(x_t, t, class_labels=labels).sample
        per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(
            dim=tuple(range(1, pred.dim())))
        if cfg.min_snr_gamma is not None:
            snr = self._snr[t]
            w = snr.clamp(max=cfg.min_snr_gamma)
            per = per * (w / snr if cfg.objective == "epsilon" else
                         w / (snr + 1) if cfg.objective == "v_prediction" else w)
        return per.mean()

    def train_step(self) -> None:
        cfg, step = self.cfg, self.step
        torch.manual_seed(_mix(cfg.seed, _TORCH, step, self.rank))  # model-internal randomness
        idx, d = self._indices(step), self._draws(step)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        b, W = self.micro, self.world
        for m in range(cfg.grad_accum):
            lo = (m * W + self.rank) * b
            sl = slice(lo, lo + b)
            x0 = self.data.images(idx[sl])
            if cfg.flip:
                x0 = torch.where(d["flip"][sl, None, None, None], x0.flip(-1), x0)
            x0 = x0.to(self.device, non_blocking=True)
            t = d["t"][sl].to(self.device, non_blocking=True)
            labels = None
            if cfg.class_conditional:
                labels = self.data.labels[idx[sl]]
                if self.null_class is not None:
                    labels = torch.where(d["drop"][sl], self.null_class, labels)
                labels = labels.to(self.device, non_blocking=True)
            sync = (m == cfg.grad_accum - 1 or not self.distributed)
            with (contextlib.nullcontext() if sync else self.ddp.no_sync()):
                loss = self.loss(x0, t, labels, d["noise_seed"], lo,
                                 d["offset"][sl].to(self.device))
                self.scaler.scale(loss / cfg.grad_accum).backward()
            self._loss_sum += loss.detach().double() / cfg.grad_accum
        if cfg.max_grad_norm is not None:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.ema.step(self.model)
        self._loss_n += 1
        self.step += 1

    # -- checkpoints ------------------------------------------------------------------------
    def latest_checkpoint(self) -> Optional[str]:
        p = os.path.join(self.ckpt_dir, "latest")
        if not os.path.exists(p):
            return None
        with open(p) as f:
            name = f.read().strip()
        path = os.path.join(self.ckpt_dir, name)
        if not os.path.isfile(os.path.join(path, "state.json")):
            raise ValueError(f"{p} names checkpoint {name!r}, which is missing or incomplete")
        return path

    def save_checkpoint(self) -> None:
        if self.rank == 0:
            self._save_checkpoint()
        if self.distributed:
            torch.distributed.barrier()

    def _save_checkpoint(self) -> None:
        os.makedirs(self.ckpt_dir, exist_ok=True)
        name = f"step-{self.step:08d}"
        final = os.path.join(self.ckpt_dir, name)
        if not os.path.isdir(final):
            tmp = os.path.join(self.ckpt_dir, f".tmp-{name}-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            tensors, meta = self._state()
            _save_tensors(os.path.join(tmp, "state.safetensors"), tensors)
            atomic_write(os.path.join(tmp, "state.json"), _json(meta))
            os.replace(tmp, final)
        atomic_write(os.path.join(self.ckpt_dir, "latest"), name + "\n")
        old = sorted(e.name for e in os.scandir(self.ckpt_dir)
                     if e.is_dir() and e.name.startswith("step-") and e.name != name)
        for n in old[:max(0, len(old) - (self.cfg.keep_checkpoints - 1))]:
            shutil.rmtree(os.path.join(self.ckpt_dir, n), ignore_errors=True)
        write_pipeline(self.out, self.unet_config, self.ema.module.state_dict(), self.cfg,
                       self._pipeline_extra())
        save_loss_curve(self.history, os.path.join(self.out, "loss.png"))

    def _pipeline_extra(self) -> dict:
        return {"trained_steps": self.step, "objective": self.cfg.objective,
                "class_names": self.data.class_names, "null_class_label": self.null_class,
                "guidance_scale": self._grid_guidance(), "resolution": self.data.resolution,
                "channels": self.data.channels, "data": self.cfg.data if self.cfg.data == "digits"
                else os.path.basename(os.path.abspath(self.cfg.data))}

    def _state(self):
        """(tensors, json) of everything a resumed run needs."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in self.ema.module.state_dict().items()})
        osd = self.opt.state_dict()
        for i, st in osd["state"].items():
            for k, v in st.items():
                tensors[f"optim.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        tensors["rng.torch_cpu"] = torch.get_rng_state()
        tensors["loss_sum"] = self._loss_sum.reshape(1)
        meta = {"format": "fastdiff-train-1", "step": self.step,
                "data_position": self.step * self.cfg.batch_size,
                "fingerprint": self.fingerprint(), "optim_param_groups": osd["param_groups"],
                "optim_state_keys": {str(i): sorted(st) for i, st in osd["state"].items()},
                "lr_scheduler": {"kind": self.cfg.lr_schedule, "step": self.step,
                                 "last_lr": [g["lr"] for g in self.opt.param_groups]},
                "ema": {"optimization_step": self.ema.optimization_step},
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "rng": {"rule": "every draw of step s comes from generators seeded by "
                                "(seed, what, s); torch's global generator is reseeded per "
                                "step from (seed, s, rank)", "seed": self.cfg.seed},
                "history": self.history, "loss_n": self._loss_n}
        return tensors, meta

    def load_checkpoint(self, path: str) -> None:
        with open(os.path.join(path, "state.json")) as f:
            meta = json.load(f)
        if meta.get("format") != "fastdiff-train-1":
            raise ValueError(f"{path} is not a fastdiff training checkpoint "
                             f"(format {meta.get('format')!r})")
        mine, theirs = self.fingerprint(), meta["fingerprint"]
        if mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(f"checkpoint {path} is from another config: "
                             + "; ".join(f"{k}: checkpoint {theirs.get(k)!r}, now {mine.get(k)!r}"
                                         for k in diff)
                             + ". Resume with the same settings, or use another --out")
        tensors = _load_tensors(os.path.join(path, "state.safetensors"))
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items()
                                    if k.startswith("model.")}, strict=True)
        self.ema.module.load_state_dict({k[4:]: v for k, v in tensors.items()
                                         if k.startswith("ema.")}, strict=True)
        state = {}
        for i, keys in meta["optim_state_keys"].items():
            state[int(i)] = {k: tensors[f"optim.{i}.{k}"] for k in keys}
        self.opt.load_state_dict({"state": state, "param_groups": meta["optim_param_groups"]})
        if meta["scaler"] is not None:
            self.scaler.load_state_dict(meta["scaler"])
        torch.set_rng_state(tensors["rng.torch_cpu"])
        self.ema.optimization_step = meta["ema"]["optimization_step"]
        self.step = meta["step"]
        self.history = [tuple(h) for h in meta["history"]]
        self._loss_sum.copy_(tensors["loss_sum"][0])
        self._loss_n = meta["loss_n"]

    # -- outputs ----------------------------------------------------------------------------
    def _grid_guidance(self):
        if self.cfg.guidance_scale is not None:
            return self.cfg.guidance_scale
        return 2.0 if self.null_class is not None else None

    def sample_grid(self, path: str) -> None:
        """A grid from the EMA weights: one column per class (up to 10), 4 rows."""
        cfg = self.cfg
        n_cls = min(self.data.num_classes, 10) if cfg.class_conditional else 0
        cols = n_cls or 8
        labels = torch.arange(n_cls).repeat(4) if n_cls else None
        R, C = self.data.resolution, self.data.channels
        x = ddim_sample(self.ema.module, self.schedule, (cols * 4, C, R, R),
                        steps=cfg.sample_steps, objective=cfg.objective, class_labels=labels,
                        null_class=self.null_class, guidance_scale=self._grid_guidance(),
                        seed=cfg.sample_seed, device=self.device)
        save_grid(x, path, nrow=cols, scale=max(1, 64 // R))

    def _log(self, msg: str) -> None:
        if self.rank != 0:
            return
        with open(os.path.join(self.out, "log.txt"), "a") as f:
            f.write(msg + "\n")
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def _flush_loss(self) -> float:
        s = self._loss_sum.clone()
        if self.distributed:
            torch.distributed.all_reduce(s)
            s /= self.world
        v = float(s.item()) / max(1, self._loss_n)  # one host sync per log line
        self._loss_sum.zero_()
        self._loss_n = 0
        return v

    def run(self) -> "Trainer":
        cfg = self.cfg
        if self.rank == 0:
            os.makedirs(self.out, exist_ok=True)
            if os.path.isdir(self.ckpt_dir):
                for e in os.scandir(self.ckpt_dir):  # left by a run killed while saving
                    if e.name.startswith(".tmp-"):
                        shutil.rmtree(e.path, ignore_errors=True)
        if self.distributed:
            torch.distributed.barrier()
        latest = self.latest_checkpoint()
        if latest is not None and not cfg.resume:
            raise ValueError(f"{self.out} already holds a training run ({latest}): pass "
                             "--resume to continue it, or choose another --out")
        self._bar = None
        if latest is not None:
            self.load_checkpoint(latest)
        n_params = sum(p.numel() for p in self.model.parameters())
        self._log(f"{'resumed at' if latest else 'starting'} step {self.step}/{cfg.steps}: "
                  f"{len(self.data)} images {self.data.channels}x{self.data.resolution}x"
                  f"{self.data.resolution} ({self.data.name}), U-Net {n_params / 1e6:.2f}M params "
                  f"({cfg.unet_impl}), batch {cfg.batch_size} = {self.world} rank(s) x "
                  f"{cfg.grad_accum} x {self.micro}, {cfg.objective}, {self.device}, "
                  f"mixed precision {cfg.mixed_precision}")
        if self.rank == 0 and cfg.progress:
            from tqdm import tqdm
            self._bar = tqdm(total=cfg.steps, initial=self.step, desc="train", file=sys.stderr,
                             dynamic_ncols=True)
        self.model.train()
        t_log, s_log = time.perf_counter(), self.step
        while self.step < cfg.steps:
            self.train_step()
            s = self.step
            if self._bar is not None:
                self._bar.update(1)
            if s % cfg.log_every == 0 or s == cfg.steps:
                loss = self._flush_loss()
                self.history.append((s, loss))
                dt = time.perf_counter() - t_log
                sps = (s - s_log) / dt if dt > 0 else float("nan")
                self._log(f"step {s}/{cfg.steps} loss {loss:.5f} lr {lr_at(s - 1, cfg):.3e} "
                          f"{sps:.2f} steps/s {sps * cfg.batch_size:.1f} images/s")
                t_log, s_log = time.perf_counter(), s
            if (cfg.sample_every and s % cfg.sample_every == 0) or s == cfg.steps:
                if self.rank == 0:
                    os.makedirs(os.path.join(self.out, "samples"), exist_ok=True)
                    self.sample_grid(os.path.join(self.out, "samples", f"step-{s:08d}.png"))
                if self.distributed:
                    torch.distributed.barrier()
                t_log = time.perf_counter()  # the grid's time is not training time
            if (cfg.checkpoint_every and s % cfg.checkpoint_every == 0) or s == cfg.steps:
                self.save_checkpoint()
                t_log = time.perf_counter()
        if self.step == cfg.steps and latest is not None and self.rank == 0 \
                and not os.path.exists(os.path.join(self.out, "model_index.json")):
            self._save_checkpoint()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        return self


def _dist_env():
    """(rank, world size, local rank) from torchrun's environment (0, 1, 0 without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def train(cfg: Optional[TrainConfig] = None, **kw) -> Trainer:
    """Run a training: `train(TrainConfig(...))` or `train(data="digits", out=..., ...)`."""
    cfg = dataclasses.replace(cfg or TrainConfig(), **kw)
    return Trainer(cfg).run()
