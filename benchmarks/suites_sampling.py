"""The `sampling` suite: whole sampling loops, fastdiff against diffusers' pipelines.

GPU: the CIFAR-10 U-Net (google/ddpm-cifar10-32's config, random weights), batch 256 fp16,
DDPM 1000 steps and DDIM 100 steps (images/s), and batch 16 DDIM (ms/step); diffusers'
DDPMPipeline / DDIMPipeline eager and with a torch.compile'd U-Net, fastdiff's sampler with
fastdiff.UNet2DModel (the same weights), and fastdiff's time to first image (the first call:
CUDA-graph capture included, no compile step). CPU: the same rows for a small U-Net at fp32, fewer steps.

A row's `ms` is one whole loop (the batch's images), the median of rounds interleaved over the
rows after each row's first call (min_ms: the fastest, which the CPU table compares);
img_per_s and ms_per_step are beside it.
Every row's images are checked (relative L2 error, the harness's per-dtype tolerance): DDIM
(eta 0) from the same x_T as diffusers' eager row; fastdiff's DDPM against fastdiff's own loop
driven by diffusers' U-Net with the reference noise of the same seed (fastdiff.reference);
diffusers' DDPM with compile against its eager run from the same generator. clip_sample is off
in both libraries: with random weights a clipped loop is chaotic (1e-6 per step grows to 1e-2).
"""
from __future__ import annotations

import time

import torch

from .harness import CHECK_TOL, Case, Impl, make_row, reason
from .suites import _need, suite

CIFAR = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
             block_out_channels=(128, 256, 256, 256),
             down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
SMALL = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
             block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=16,
             down_block_types=("DownBlock2D", "AttnDownBlock2D"),
             up_block_types=("AttnUpBlock2D", "UpBlock2D"))

# (label, kind, batch, steps) per size; "step" rows report ms/step
CASES = {"full": [("DDPM-1000", "ddpm", 256, 1000), ("DDIM-100", "ddim", 256, 100),
                  ("DDIM-100 step", "ddim", 16, 100)],
         "quick": [("DDPM-1000", "ddpm", 256, 1000), ("DDIM-100 step", "ddim", 16, 100)],
         "cpu": [("DDPM-100", "ddpm", 16, 100), ("DDIM-50", "ddim", 16, 50),
                 ("DDIM-50 step", "ddim", 1, 50)],
         "tiny": [("DDPM-50", "ddpm", 4, 50), ("DDIM-10", "ddim", 4, 10),
                  ("DDIM-10 step", "ddim", 1, 10)]}


def _timed_call(ctx, fn) -> float:
    """Seconds of one call of fn (synchronized)."""
    ctx.sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        fn()
    ctx.sync()
    return time.perf_counter() - t0


def _first_calls(ctx, case, impls, kind, sampler, ref_unet, x_T, steps) -> list:
    """Each row's first call (its time: time to first image, CUDA-graph capture included) and
    its images' error against the reference; a row that fails skips itself, not the suite."""
    runs, ref_img = [], None
    for name, fn, kind_ in impls:
        try:
            ctx.sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                out = fn()
            ctx.sync()
            first = time.perf_counter() - t0
            err = None
            with torch.no_grad():
                if kind_ == "eager":
                    ref_img = out  # diffusers' eager images: the reference of its rows
                elif kind == "ddim" or kind_ == "compile":  # same x_T / same generator
                    err = _rel(out, ref_img)
                else:  # fastdiff DDPM: its drawn noise against the reference noise
                    err = _rel(out, _ddpm_reference(sampler, ref_unet, x_T, steps))
        except Exception as e:  # noqa: BLE001
            ctx.skip("sampling", case.label, name, reason(e))
            continue
        runs.append(dict(name=name, fn=fn, kind=kind_, first=first, err=err, secs=[]))
    return runs


def _rel(got, want) -> float:
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


@suite("sampling", "sampling: whole DDPM/DDIM loops (U-Net + step), images/s and ms/step",
       floor="the U-Net's FLOPs at the matmul rate (the step is ~0)", metric="TFLOP/s")
def sampling_suite(ctx):
    (UNet2DModel, DDPMPipeline, DDIMPipeline, DDPMScheduler, DDIMScheduler) = _need(
        "diffusers", "UNet2DModel", "DDPMPipeline", "DDIMPipeline", "DDPMScheduler",
        "DDIMScheduler")
    import fastdiff
    dtype = torch.float16 if ctx.cuda else torch.float32
    cfg = CIFAR if ctx.cuda else SMALL
    torch.manual_seed(0)
    ref_unet = UNet2DModel(**cfg).to(ctx.device).eval()
    if dtype != torch.float32:
        ref_unet.to(dtype)
    fd_unet, fd_name = fastdiff.UNet2DModel.from_diffusers(ref_unet).eval(), "fastdiff"
    compiled = None
    if ctx.compile:
        try:
            compiled = UNet2DModel(**cfg).to(ctx.device).eval().to(dtype)
            compiled.load_state_dict(ref_unet.state_dict())
            compiled = torch.compile(compiled, backend=ctx.compile_backend)
        except Exception as e:  # noqa: BLE001
            ctx.skip("sampling", "", "diffusers + compile", reason(e))
            compiled = None
    flops_per_img = _unet_flops(ref_unet, cfg, ctx.device, dtype)
    C, S = cfg["in_channels"], cfg["sample_size"]
    for label, kind, B, steps in ctx.shapes(CASES):
        case = Case("sampling", label, (B, C, S, S), dtype, "NCHW",
                    flops=flops_per_img * B * steps)
        if ctx.only and ctx.only not in case.label:
            continue
        if ctx.deadline is not None and time.perf_counter() > ctx.deadline:
            ctx.skip("sampling", case.label, "(case)", "time budget (--budget-s) spent")
            continue
        ctx.log(f"[{time.perf_counter() - ctx.t0:7.1f}s]   {case.label}")
        x_T = torch.randn((B, C, S, S), generator=torch.Generator().manual_seed(0)).to(
            ctx.device, dtype)
        Sched, Pipe = (DDPMScheduler, DDPMPipeline) if kind == "ddpm" else \
            (DDIMScheduler, DDIMPipeline)
        sampler_cls = fastdiff.DDPMSampler if kind == "ddpm" else fastdiff.DDIMSampler
        reps = 1 if (ctx.cuda and kind == "ddpm") else 3 if ctx.cuda else 5

        def diffusers_run(unet, Sched=Sched, Pipe=Pipe, B=B, steps=steps):
            pipe = Pipe(unet=unet, scheduler=Sched(clip_sample=False))
            pipe.set_progress_bar_config(disable=True)
            # a fresh CPU generator per call: every call starts from the x_T fastdiff is given
            return lambda: pipe(batch_size=B, generator=torch.Generator().manual_seed(0),
                                num_inference_steps=steps, output_type="np").images

        sampler = sampler_cls(clip_sample=False)  # fresh: its first call captures the graph
        impls = [("diffusers eager", diffusers_run(ref_unet), "eager")]
        if compiled is not None:
            impls.append(("diffusers + compile", diffusers_run(compiled), "compile"))
        impls.append((fd_name, lambda s=sampler, x=x_T, steps=steps: s.sample(
            fd_unet, latents=x, num_inference_steps=steps, progress=False, output_type="np"),
            "fastdiff"))
        tol = CHECK_TOL.get(dtype, 1e-3)
        runs = _first_calls(ctx, case, impls, kind, sampler, ref_unet, x_T, steps)
        for _ in range(reps):  # rounds interleaved over the rows: a burst of load hits all
            for run in runs:
                run["secs"].append(_timed_call(ctx, run["fn"]))
        results = []
        for run in runs:
            name, fn, kind_, first, err = (run[k] for k in ("name", "fn", "kind", "first", "err"))
            secs = sorted(run["secs"])
            sec = secs[len(secs) // 2]
            extra = dict(img_per_s=B / sec, ms_per_step=sec * 1e3 / steps, first_s=first,
                         p20=secs[0] * 1e3, p80=secs[-1] * 1e3, wall_ms=sec * 1e3,
                         min_ms=secs[0] * 1e3, err=err, ok=None if err is None else err <= tol)
            if kind_ == "compile":
                extra["compile_s"] = first - sec
            ctx.log(f"    {name:<34} {sec * 1e3:10.1f} ms  {B / sec:8.1f} img/s  "
                    f"{sec * 1e3 / steps:7.3f} ms/step  first call {first:.1f} s"
                    + ("" if err is None else f"  err {err:.1e}"))
            results.append((Impl(name, fn, kind_), sec * 1e3, extra))
            if kind_ == "fastdiff":
                results.append((Impl(f"{name}: time to first image", fn, "fastdiff"),
                                first * 1e3, dict(extra, img_per_s=B / first, p20=first * 1e3,
                                                  p80=first * 1e3, wall_ms=first * 1e3,
                                                  min_ms=first * 1e3)))
        base = {k: next((ms for i, ms, _ in results if i.kind == k), None)
                for k in ("eager", "compile")}
        for impl, ms, extra in results:
            yield make_row(case, impl, ms, base, ctx.bandwidth, ctx.matmul_rate, extra)


def _ddpm_reference(sampler, unet, x_T, steps):
    """fastdiff's DDPM loop with diffusers' U-Net and the step noise taken from
    fastdiff.reference (what the kernels must draw for seed 0, images 0..B-1)."""
    from fastdiff.reference import STREAM_SAMPLER_STEP, memory_order_normal

    def noise(k, t, x):
        return memory_order_normal(0, t.reshape(1).expand(x.shape[0]), STREAM_SAMPLER_STEP, x)
    return sampler.sample(unet, latents=x_T, num_inference_steps=steps, progress=False,
                          step_noise=noise, cuda_graph=False, output_type="np")


def _unet_flops(unet, cfg, device, dtype) -> int:
    """FLOPs of one image's U-Net forward (torch's FlopCounterMode), 0 if it cannot count."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
        S = cfg["sample_size"]
        x = torch.randn(1, cfg["in_channels"], S, S, device=device, dtype=dtype)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            unet(x, torch.tensor([10], device=device))
        return int(fc.get_total_flops())
    except Exception:  # noqa: BLE001
        return 0

