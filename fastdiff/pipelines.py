"""DDPMPipeline / DDIMPipeline: drop-ins for diffusers' pipelines of the same names.

    # a folder with model_index.json, unet/, scheduler/
    pipe = fastdiff.DDIMPipeline.from_pretrained("path/to/pipeline")
    images = pipe(batch_size=16, num_inference_steps=50, seed=0).images

A pipeline is a U-Net (fastdiff.UNet2DModel) and a sampler; `pipe(...)` is `sampler.sample(...)`
with diffusers' defaults and output types. The folder is diffusers' format both ways. Either
pipeline runs fastdiff.DPMSolverSampler / UniPCSampler (or diffusers' DPMSolverMultistepScheduler /
UniPCMultistepScheduler, converted) as its scheduler unchanged:

    solver = fastdiff.DPMSolverSampler.from_config(os.path.join(path, "scheduler"))
    pipe = fastdiff.DDPMPipeline.from_pretrained(path, scheduler=solver)
    images = pipe(batch_size=16, num_inference_steps=20).images
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .samplers import (DDIMSampler, DDPMSampler, DPMSolverSampler, UniPCSampler,
                       _MultistepSampler, _read_config, _Sampler)

# diffusers' multistep schedulers: a pipeline keeps them (as diffusers' DDPMPipeline does)
MULTISTEP_SAMPLERS = {"DPMSolverMultistepScheduler": DPMSolverSampler,
                      "UniPCMultistepScheduler": UniPCSampler}

# The embedded default model (a diffusers pipeline folder, shipped as package data by the
# training code): what `python -m fastdiff sample` samples without --model.
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "digits")


@dataclass
class ImagePipelineOutput:
    """What a pipeline call returns, as diffusers': `.images` (a list of PIL images, an array
    (B, H, W, C) or a tensor (B, C, H, W), by output_type)."""
    images: object


def read_model_index(path) -> dict:
    """model_index.json of a diffusers pipeline folder, with clear errors for what is missing."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"pipeline folder {path!r} does not exist")
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise FileNotFoundError(f"{path!r} is not a diffusers pipeline folder: no model_index.json")
    with open(index) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{index!r} is not valid JSON ({e})") from None
    for part in ("unet", "scheduler"):
        if part not in cfg or not os.path.isdir(os.path.join(path, part)):
            raise FileNotFoundError(f"pipeline folder {path!r} has no {part}/ (model_index.json "
                                    f"must name it and the folder must exist)")
    return cfg


def load_unet(path, torch_dtype=None, device=None):
    """fastdiff.UNet2DModel from the folder's unet/."""
    from .unet import UNet2DModel
    return UNet2DModel.from_pretrained(path, subfolder="unet", torch_dtype=torch_dtype,
                                       device=device)


def _atomic_json(path, obj):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


class _Pipeline:
    sampler_class = _Sampler

    def __init__(self, unet, scheduler):
        if not callable(unet):
            raise TypeError(f"unet must be a U-Net module, got {type(unet).__name__}")
        if isinstance(scheduler, _MultistepSampler):
            pass  # DPM-Solver++ / UniPC run any pipeline's U-Net as they are
        elif not isinstance(scheduler, _Sampler):  # a diffusers scheduler or a config
            scheduler = self._sampler_class_for(scheduler).from_config(scheduler)
        elif not isinstance(scheduler, self.sampler_class):
            scheduler = self.sampler_class.from_config(scheduler.config)
        self.unet, self.scheduler = unet, scheduler

    def _sampler_class_for(self, scheduler):
        """A diffusers DPMSolverMultistepScheduler / UniPCMultistepScheduler (object or config
        naming it in _class_name) -> fastdiff's solver; any other -> the pipeline's sampler."""
        name = type(scheduler).__name__
        if name not in MULTISTEP_SAMPLERS:
            try:
                name = _read_config(scheduler).get("_class_name")
            except (TypeError, OSError, ValueError):
                name = None
        return MULTISTEP_SAMPLERS.get(name, self.sampler_class)

    @classmethod
    def from_pretrained(cls, path, torch_dtype=None, device=None, unet=None, scheduler=None):
        """From a diffusers pipeline folder (model_index.json, unet/, scheduler/). The scheduler
        of the folder may be any DDPM/DDIM-compatible diffusers scheduler: its options are taken
        over, others ignored (as diffusers' DDIMPipeline does). unet / scheduler: use these
        instead of the folder's."""
        read_model_index(path)
        if unet is None:
            unet = load_unet(path, torch_dtype=torch_dtype, device=device)
        if scheduler is None:
            scheduler = cls.sampler_class.from_config(os.path.join(os.fspath(path), "scheduler"))
        return cls(unet, scheduler)

    def save_pretrained(self, path):
        """Write the pipeline as a diffusers folder (loads in diffusers and in fastdiff)."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        self.unet.save_pretrained(os.path.join(path, "unet"))
        self.scheduler.save_config(os.path.join(path, "scheduler"))
        try:
            from importlib.metadata import version
            dv = version("diffusers")
        except Exception:  # noqa: BLE001 - diffusers is optional; the field is informative
            dv = "0.30.0"
        _atomic_json(os.path.join(path, "model_index.json"), {
            "_class_name": type(self).__name__, "_diffusers_version": dv,
            "scheduler": ["diffusers", self.scheduler.diffusers_class],
            "unet": ["diffusers", "UNet2DModel"]})

    def to(self, device=None, dtype=None):
        self.unet.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def __call__(self, batch_size: Optional[int] = None, num_inference_steps: Optional[int] = None,
                 seed: int = 0, eta: Optional[float] = None, latents=None, class_labels=None,
                 guidance_scale: Optional[float] = None, output_type: str = "pil",
                 return_dict: bool = True, generator: Optional[torch.Generator] = None,
                 first_index: int = 0, progress: bool = True, cuda_graph="auto",
                 callback=None):
        """Sample `batch_size` images (default 1, or latents' batch). output_type "pil"
        (default), "np" or "pt"; num_inference_steps default: DDPM num_train_timesteps, DDIM 50,
        DPM-Solver++ / UniPC 20.

        generator: as diffusers, x_T = torch.randn(..., generator=generator) (so the same
        generator gives diffusers' x_T); the step noise still comes from `seed`. Without it, x_T
        is fastdiff's per-image noise of (seed, first_index + b)."""
        if latents is None and generator is not None:
            C, size = self.unet.config.in_channels, self.unet.config.sample_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            latents = torch.randn((batch_size or 1, C) + size, generator=generator,
                                  device=generator.device, dtype=self.dtype).to(self.device)
        images = self.scheduler.sample(
            self.unet, batch_size=batch_size, num_inference_steps=num_inference_steps, seed=seed,
            first_index=first_index, latents=latents,
            class_labels=class_labels, guidance_scale=guidance_scale, eta=eta,
            progress=progress, cuda_graph=cuda_graph, callback=callback, output_type=output_type)
        return ImagePipelineOutput(images) if return_dict else (images,)


class DDPMPipeline(_Pipeline):
    """diffusers' DDPMPipeline: ancestral sampling, 1000 steps by default."""
    sampler_class = DDPMSampler


class DDIMPipeline(_Pipeline):
    """diffusers' DDIMPipeline: DDIM sampling, 50 steps and eta 0 by default."""
    sampler_class = DDIMSampler
