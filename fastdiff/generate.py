"""Many images from a pipeline: a grid PNG, or a folder of PNGs / .npz shards that a rerun
completes and torchrun shards (`python -m fastdiff sample` is a thin layer over `generate`).

Image i of a run is a pure function of (settings, seed, i): batches are the fixed blocks
[k B, (k + 1) B) of the global indices, rank r of K makes the blocks k = r mod K, and a block is
made whole even when some of its images exist already, so a resumed or sharded run writes the
bytes an uninterrupted single-process run writes (same device). Files appear atomically (temp
file + os.replace): an interrupted run leaves only whole images, and the manifest of the
settings turns a rerun with other settings into an error instead of a mixed folder.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
from typing import Optional

import numpy as np
import torch

from . import __version__
from .pipelines import DEFAULT_MODEL, DDIMPipeline, DDPMPipeline, _Pipeline
from .samplers import DPMSolverSampler, UniPCSampler

FORMATS = ("grid", "png", "npz")
# The few-step solvers (default 20 steps) and the options each name sets on the model folder's
# scheduler config (its schedule, prediction type and spacing are kept, as diffusers'
# from_config does): DPM-Solver++ 2M / 3M (lower_order_final), its 2M SDE, UniPC bh2 order 2
# (diffusers' UniPC defaults; bh1 is the authors' choice for unconditional models only).
MULTISTEP = {
    "dpmpp-2m": (DPMSolverSampler, dict(solver_order=2, algorithm_type="dpmsolver++")),
    "dpmpp-3m": (DPMSolverSampler, dict(solver_order=3, algorithm_type="dpmsolver++")),
    "dpmpp-2m-sde": (DPMSolverSampler, dict(solver_order=2, algorithm_type="sde-dpmsolver++")),
    "unipc": (UniPCSampler, dict(solver_order=2, solver_type="bh2")),
}
SAMPLERS = ("ddpm", "ddim") + tuple(MULTISTEP)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
MANIFEST = "manifest.json"
# recorded but not compared: where the model folder lies and which version wrote the folder
_NOT_COMPARED = ("model", "fastdiff_version")


class ManifestMismatch(ValueError):
    """The output folder holds images made with other settings."""


def _dist():
    """(rank, world, local_rank) from torchrun's environment; (0, 1, 0) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def _barrier(world):
    if world > 1:
        torch.distributed.barrier()


def model_fingerprint(unet) -> str:
    """sha256 over the U-Net's state dict (names, dtypes, shapes, bytes): the manifest's model."""
    h = hashlib.sha256()
    for name, t in sorted(unet.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _atomic_write(path, write):
    """write(tmp_path), then rename onto path; the temp file never survives a failure or ^C."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """(B, H, W, C) float in [0, 1] -> uint8, rounded as diffusers' numpy_to_pil."""
    return (images * 255).round().astype(np.uint8)


def _save_png(path, img: np.ndarray):
    from PIL import Image
    im = Image.fromarray(img[..., 0], mode="L") if img.shape[-1] == 1 else Image.fromarray(img)
    _atomic_write(path, lambda tmp: im.save(tmp, format="PNG"))


def _save_npz(path, imgs: np.ndarray):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, arr_0=imgs)
    _atomic_write(path, write)


def make_grid(imgs: np.ndarray, ncols: Optional[int] = None, pad: int = 2,
              scale: int = 1) -> np.ndarray:
    """uint8 (N, H, W, C) -> one (rows*(H·scale+pad)+pad, cols*(W·scale+pad)+pad, C) image,
    black padding; each image enlarged `scale` times (nearest: pixels stay pixels)."""
    if scale > 1:
        imgs = imgs.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = imgs.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), dtype=np.uint8)
    for i, im in enumerate(imgs):
        r, q = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = im
    return grid


def _labels_for(unet, class_label, start, end):
    """Class labels of images start..end-1: class_label for all, or (class-conditional model
    without one) cycling over the real classes 0 .. num_class_embeds - 2 by global index."""
    k = getattr(unet.config, "num_class_embeds", None) if hasattr(unet, "config") else None
    if k is None:
        if class_label is not None:
            raise ValueError("class_label: the model is not class-conditional "
                             "(its config has no num_class_embeds)")
        return None
    if class_label is not None:
        if not 0 <= class_label < k:
            raise ValueError(f"class_label must lie in [0, {k}), got {class_label}")
        return torch.full((end - start,), class_label, dtype=torch.int64)
    return torch.arange(start, end, dtype=torch.int64) % max(k - 1, 1)


GRID_MIN_SIDE = 32  # grid cells are enlarged to at least this many pixels (8x8 digits: 4x)


def model_defaults(model) -> dict:
    """Sampling defaults a model folder recommends in its fastdiff.json (written by
    `python -m fastdiff train`): num_inference_steps and guidance_scale, when present."""
    path = DEFAULT_MODEL if model is None else model
    if not isinstance(path, (str, os.PathLike)):
        return {}
    try:
        with open(os.path.join(path, "fastdiff.json")) as f:
            extra = json.load(f)
    except (OSError, ValueError):
        return {}
    return {k: extra[k] for k in ("num_inference_steps", "guidance_scale") if k in extra}


def load_pipeline(model=None, sampler: str = "ddim", device=None, dtype=None) -> _Pipeline:
    """A pipeline from a diffusers pipeline folder (default: the embedded model) or an existing
    pipeline object, its scheduler converted to `sampler` (one of SAMPLERS; a multistep one is
    made from the folder's scheduler config with the options MULTISTEP names)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    cls = DDPMPipeline if sampler in ("ddpm",) + tuple(MULTISTEP) else DDIMPipeline
    if isinstance(model, _Pipeline):
        if sampler in MULTISTEP:
            solver, options = MULTISTEP[sampler]
            pipe = cls(model.unet, solver.from_config(model.scheduler.config, **options))
        else:
            pipe = cls(model.unet, model.scheduler.config if not isinstance(model, cls)
                       else model.scheduler)
        return pipe.to(device=device, dtype=dtype)
    if model is None:
        if not os.path.isfile(os.path.join(DEFAULT_MODEL, "model_index.json")):
            raise FileNotFoundError(
                f"the embedded default model is not in this install ({DEFAULT_MODEL} has no "
                f"model_index.json); pass --model DIR (a diffusers pipeline folder)")
        model = DEFAULT_MODEL
    scheduler = None
    if sampler in MULTISTEP:
        solver, options = MULTISTEP[sampler]
        scheduler = solver.from_config(os.path.join(os.fspath(model), "scheduler"), **options)
    pipe = cls.from_pretrained(model, torch_dtype=dtype, scheduler=scheduler)
    return pipe.to(device=device, dtype=dtype)


def settings(pipe, *, model, sampler, steps, eta, n, batch_size, seed, class_label, guidance,
             dtype, device, format) -> dict:
    return {"fastdiff_version": __version__, "model": model, "model_sha256":
            model_fingerprint(pipe.unet), "scheduler": pipe.scheduler.config, "sampler": sampler,
            "steps": steps, "eta": eta, "n": n, "batch_size": batch_size, "seed": seed,
            "class_label": class_label, "guidance": guidance, "dtype": str(dtype).replace(
                "torch.", ""), "device_type": torch.device(device).type, "format": format}


def check_manifest(out, want: dict):
    """Write out/manifest.json, or check that the one there has these settings."""
    path = os.path.join(out, MANIFEST)
    if os.path.exists(path):
        with open(path) as f:
            try:
                have = json.load(f)
            except json.JSONDecodeError as e:
                raise ManifestMismatch(f"{path} is not valid JSON ({e}); it is not a folder this "
                                       f"command wrote") from None
        a = json.loads(json.dumps({k: v for k, v in want.items() if k not in _NOT_COMPARED}))
        diff = sorted(k for k in set(a) | set(have) if k not in _NOT_COMPARED
                      and a.get(k) != have.get(k))
        if diff:
            shown = "; ".join(f"{k}: folder has {have.get(k)!r}, asked {a.get(k)!r}"
                              for k in diff if k != "scheduler") or "scheduler options differ"
            raise ManifestMismatch(f"{out} holds images made with other settings ({shown}); "
                                   f"rerun with the folder's settings or choose another --out")
        return
    _atomic_write(path, lambda tmp: open(tmp, "w").write(json.dumps(want, indent=2) + "\n"))


def generate(model=None, *, sampler: str = "ddim", steps: Optional[int] = None,
             eta: Optional[float] = None, n: Optional[int] = None, batch_size: int = 64,
             seed: int = 0,
             class_label: Optional[int] = None, guidance: Optional[float] = None,
             device=None, dtype=None, out: Optional[str] = None, format: Optional[str] = None,
             progress: bool = True, cuda_graph="auto") -> str:
    """Sample n images; returns the path written (the grid PNG or the folder).

    model: a diffusers pipeline folder, a fastdiff pipeline, or None (the embedded model).
    format: "grid" (one PNG, default when out is None or ends in .png; out default
    samples.png), "png" (out/000000.png ...) or "npz" (out/samples_<start>_<end>.npz shards,
    arr_0 uint8 (N, H, W, C), one per batch). Folders resume and shard over torchrun's ranks.
    n: default two images per class of a class-conditional model (a grid row per round of the
    classes), else 16. steps and guidance default to the model folder's fastdiff.json, if any
    (steps for ddpm/ddim only: the solvers of MULTISTEP default to 20).
    """
    defaults = model_defaults(model)
    if sampler not in MULTISTEP:  # a folder's step count is a DDPM/DDIM one: solvers take 20
        steps = defaults.get("num_inference_steps") if steps is None else steps
    guidance = defaults.get("guidance_scale") if guidance is None else guidance
    if n is None:
        n = 16
        if model is None or isinstance(model, (str, os.PathLike)):
            try:
                with open(os.path.join(DEFAULT_MODEL if model is None else model, "unet",
                                       "config.json")) as f:
                    k = json.load(f).get("num_class_embeds")
            except (OSError, ValueError):
                k = None
            if k and k > 1 and class_label is None:
                n = 2 * (k - 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if format is None:
        format = "grid" if out is None or str(out).lower().endswith(".png") else "png"
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "grid":
        out = out or "samples.png"
    elif out is None:
        raise ValueError(f"format={format!r} writes a folder: give out (--out DIR)")
    elif str(out).lower().endswith(".png") or os.path.isfile(out):
        raise ValueError(f"out={out!r} must be a folder for format={format!r}")
    if eta is not None and sampler == "ddpm":
        raise ValueError("eta applies to the ddim sampler only (DDPM's variance is fixed by "
                         "the schedule)")
    if eta is not None and sampler in MULTISTEP:
        raise ValueError(f"eta applies to the ddim sampler only ({sampler} has no eta; "
                         f"dpmpp-2m-sde is the stochastic solver)")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    rank, world, local_rank = _dist()
    if world > 1 and format == "grid":
        raise ValueError("a grid is one file: with torchrun write a folder (--out DIR "
                         "--format png|npz)")
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    started = False
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        started = True
    try:
        pipe = load_pipeline(model, sampler, device=device, dtype=dtype)
        dtype = pipe.dtype
        steps = steps if steps is not None else pipe.scheduler.default_inference_steps()
        if sampler == "ddim":  # the manifest records what is used: --eta 0 equals no --eta
            eta = pipe.scheduler._eta(eta)
        kw = dict(num_inference_steps=steps, seed=seed, eta=eta, guidance_scale=guidance,
                  progress=False, cuda_graph=cuda_graph, output_type="np")
        if format == "grid":
            imgs = []
            for start in range(0, n, batch_size):
                end = min(start + batch_size, n)
                imgs.append(pipe.scheduler.sample(
                    pipe.unet, batch_size=end - start, first_index=start,
                    class_labels=_labels_for(pipe.unet, class_label, start, end), **kw))
            imgs = _to_uint8(np.concatenate(imgs))
            k = getattr(pipe.unet.config, "num_class_embeds", None)
            ncols = k - 1 if k and k > 1 and class_label is None and n >= k - 1 else None
            side = max(imgs.shape[1], imgs.shape[2])
            grid = make_grid(imgs, ncols, scale=max(1, -(-GRID_MIN_SIDE // side)))
            if os.path.dirname(os.path.abspath(out)):
                os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            _save_png(out, grid)
            return out
        want = settings(pipe, model=os.path.abspath(model) if isinstance(model, (str, os.PathLike))
                        else (None if model is None else "<pipeline object>"),
                        sampler=sampler, steps=steps, eta=eta, n=n, batch_size=batch_size,
                        seed=seed, class_label=class_label, guidance=guidance, dtype=dtype,
                        device=device, format=format)
        if rank == 0:
            os.makedirs(out, exist_ok=True)
            for stale in glob.glob(os.path.join(glob.escape(out), "*.tmp-*")):
                os.remove(stale)  # left by a killed run (a ^C removes its own)
            check_manifest(out, want)
        _barrier(world)
        if rank != 0:
            check_manifest(out, want)
        _write_folder(pipe, out, format, n, batch_size, class_label, rank, world, progress, kw)
        _barrier(world)
        return out
    finally:
        if started:
            torch.distributed.destroy_process_group()


def _block_files(out, format, start, end):
    if format == "npz":
        return [os.path.join(out, f"samples_{start:06d}_{end:06d}.npz")]
    return [os.path.join(out, f"{i:06d}.png") for i in range(start, end)]


def _write_folder(pipe, out, format, n, batch_size, class_label, rank, world, progress, kw):
    blocks = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)][rank::world]
    todo = [(s, e) for s, e in blocks
            if not all(os.path.exists(f) for f in _block_files(out, format, s, e))]
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(e - s for s, e in todo), unit="img", unit_scale=True,
                   desc=f"sampling{f' (rank 0 of {world})' if world > 1 else ''}")
    try:
        for start, end in todo:
            imgs = _to_uint8(pipe.scheduler.sample(
                pipe.unet, batch_size=end - start, first_index=start,
                class_labels=_labels_for(pipe.unet, class_label, start, end), **kw))
            if format == "npz":
                _save_npz(_block_files(out, format, start, end)[0], imgs)
            else:
                for path, img in zip(_block_files(out, format, start, end), imgs):
                    if not os.path.exists(path):
                        _save_png(path, img)
            if bar is not None:
                bar.update(end - start)
    finally:
        if bar is not None:
            bar.close()
