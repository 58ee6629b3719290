"""The `optimize` suite: diffusers models as users have them, before and after fastdiff.optimize.

Rows per case: diffusers eager (the reference), torch.compile of it, and a copy of the same
model (same weights) after `fastdiff.optimize` -- no compile step. Stable Diffusion 1.5's U-Net
(UNet2DConditionModel from its config, random weights, no download) at 512 px (64×64 latents,
77 text tokens of 768) B1 and B8, and its AutoencoderKL decoder at 512 px B1, fp16 on a GPU; on
CPU (the "cpu" size) the same models scaled down (fewer channels, smaller latents) at fp32;
"tiny": two-level models for the harness' smoke test.
"""
from __future__ import annotations

import copy

import torch

from .harness import Case, Ctx, Impl
from .suites import _need, suite

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                 attention_head_dim=8,  # diffusers' name for the number of heads here
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=512,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)
# CPU: the same block structure, heads of 32..64 channels (the fused attention's range)
SMALL_UNET = dict(SD15_UNET, sample_size=16, block_out_channels=(64, 128, 128, 128),
                  cross_attention_dim=64, attention_head_dim=2)
SMALL_VAE = dict(SD15_VAE, block_out_channels=(32, 64, 64, 64), sample_size=64)
# the harness smoke test (--tiny): two levels, a few channels
TINY_UNET = dict(SD15_UNET, sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
                 cross_attention_dim=32, attention_head_dim=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_VAE = dict(SD15_VAE, layers_per_block=1, block_out_channels=(32, 32), sample_size=8,
                down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2)

# model, config, batch, latent side, text tokens
CASES = {"full": [("unet", SD15_UNET, 1, 64, 77), ("unet", SD15_UNET, 8, 64, 77),
                  ("vae_decoder", SD15_VAE, 1, 64, 0)],
         "cpu": [("unet", SMALL_UNET, 1, 16, 77), ("unet", SMALL_UNET, 8, 16, 77),
                 ("vae_decoder", SMALL_VAE, 1, 8, 0)],
         "tiny": [("unet", TINY_UNET, 1, 8, 7), ("vae_decoder", TINY_VAE, 1, 4, 0)]}
CASES["quick"] = CASES["full"]


def _build(kind, cfg, ctx, dtype):
    UNet2DConditionModel, AutoencoderKL = _need("diffusers", "UNet2DConditionModel",
                                                "AutoencoderKL")
    torch.manual_seed(0)
    with torch.device(ctx.device):  # initialised on the device: seconds, not a minute
        m = UNet2DConditionModel(**cfg) if kind == "unet" else AutoencoderKL(**cfg)
    with torch.no_grad():  # off diffusers' init (GroupNorm 1/0), so the norms do work
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return (m if dtype == torch.float32 else m.to(dtype)).eval()


def _flops(fn, args) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn(*args)
    return counter.get_total_flops()


@suite("optimize",
       "diffusers models before and after fastdiff.optimize (SD-1.5 U-Net 512 px B1/B8, "
       "AutoencoderKL decoder 512 px B1; CPU: the same models scaled down, fp32)",
       floor="max(weight bytes ÷ copy bandwidth, FLOPs ÷ matmul rate); FLOPs of the eager "
             "model counted by torch.utils.flop_counter (convolutions, GEMMs, attention). "
             "eager = the diffusers model as built; compile = torch.compile of it; "
             "fastdiff.optimize = a copy of the same model after fastdiff.optimize, eager",
       metric="TFLOP/s")
def optimize_suite(ctx: Ctx):
    _need("diffusers", "UNet2DConditionModel")
    import fastdiff
    default = [torch.float16] if ctx.cuda else [torch.float32]
    for dtype in ctx.dtypes_for(default):
        for kind, cfg, B, S, L in ctx.shapes(CASES):
            label = {id(SD15_UNET): "SD-1.5", id(SD15_VAE): "SD-1.5", id(TINY_UNET): "tiny",
                     id(TINY_VAE): "tiny"}.get(id(cfg), "scaled-down")
            shape = (B, 4, S, S) if kind != "unet" else (B, 4, S, S, L)
            case = Case("optimize", f"{kind} ({label})", shape, dtype, "NCHW")
            if ctx.only and ctx.only not in case.label:
                continue  # before building the model
            model = _build(kind, cfg, ctx, dtype)
            fast = fastdiff.optimize(copy.deepcopy(model))
            kw = dict(device=ctx.device, dtype=dtype)
            if kind == "unet":
                def inputs():
                    return (torch.randn(B, 4, S, S, **kw), torch.full((B,), 500, device=ctx.device),
                            torch.randn(B, L, cfg["cross_attention_dim"], **kw))

                def run(m):
                    return lambda x, t, e: m(x, t, e, return_dict=False)[0]
            else:
                def inputs():
                    return (torch.randn(B, 4, S, S, **kw),)

                def run(m):
                    return lambda z: m.decode(z, return_dict=False)[0]
            eager = run(model)
            case.bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            case.flops = _flops(eager, inputs())
            impls = [Impl("fastdiff.optimize", run(fast), "fastdiff")]
            yield from ctx.run_case(case, inputs, impls, eager)
            rep = fast.fastdiff_report
            ctx.log(f"    optimize: {rep.counts()}, {len(rep.left)} left, "
                    f"{rep.channels_last} parameters to channels_last")
            del model, fast
            if ctx.cuda:
                torch.cuda.empty_cache()
