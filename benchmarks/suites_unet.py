"""The `unet` suite: a whole U-Net forward, fastdiff.UNet2DModel against diffusers' UNet2DModel
(eager and torch.compile) with the same weights, in one run.

GPU: google/ddpm-cifar10-32's config at B256 fp16 and the 256-px config (google/ddpm-*-256) at B8
fp16. CPU (fp32): the embedded digits model's config at B64 and a small CIFAR-like config at
B1 and B16. FLOPs are
counted once per case with torch.utils.flop_counter on diffusers' model (convolutions, linears,
attention matmuls); peak memory is CUDA's max_memory_allocated over one forward above what was
allocated before it (not measured on CPU).
"""
from __future__ import annotations

import time
import warnings

import torch

from .harness import Case, Ctx, Impl, reason
from .suites import SuiteSkip, _esize, suite

CIFAR10 = dict(sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
               down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
               attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False,
               freq_shift=1, norm_eps=1e-6)
PX256 = dict(sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512),
             layers_per_block=2,
             down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
             attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
             norm_eps=1e-6)
CPU_SMALL = dict(sample_size=32, block_out_channels=(32, 64, 64), layers_per_block=1,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False,
                 freq_shift=1, norm_eps=1e-6)

# the embedded digits model's config (fastdiff.train.DEFAULT_UNET_CONFIG, without its class
# embedding: the suite feeds no labels), the model the README's first command samples on CPUs
DIGITS = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
              layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
              up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8,
              attention_head_dim=32)

CASES = {"full": [("cifar10-32", CIFAR10, 256), ("256px", PX256, 8)],
         "quick": [("cifar10-32", CIFAR10, 256), ("256px", PX256, 8)],
         "cpu": [("digits-8", DIGITS, 64), ("small-32", CPU_SMALL, 1), ("small-32", CPU_SMALL, 16)],
         "tiny": [("small-32", CPU_SMALL, 4)]}


def _flops(model, x, t) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, t)
    return int(counter.get_total_flops())


@suite("unet",
       "U-Net forward: fastdiff.UNet2DModel vs diffusers UNet2DModel (eager, torch.compile), same "
       "weights (GPU: CIFAR-10 config B256 fp16, 256-px config B8 fp16; CPU: the embedded digits model's config B64, a small 32-px config B1/B16, fp32)",
       floor="max(read x + weights + write y ÷ copy bandwidth, FLOPs ÷ matmul rate); FLOPs "
             "counted by torch.utils.flop_counter on diffusers' model. eager = diffusers "
             "UNet2DModel, compile = torch.compile of it. peak MiB: CUDA memory above the "
             "inputs and weights during one forward.",
       metric="TFLOP/s")
def unet_suite(ctx: Ctx):
    try:
        import diffusers
        from fastdiff import UNet2DModel
    except Exception as e:  # noqa: BLE001
        raise SuiteSkip(f"needs diffusers and fastdiff.UNet2DModel ({reason(e)})") from None
    default = [torch.float16] if ctx.cuda else [torch.float32]
    for dtype in ctx.dtypes_for(default):
        for name, cfg, B in ctx.shapes(CASES):
            torch.manual_seed(0)
            kw = dict(device=ctx.device, dtype=dtype)
            ref = diffusers.UNet2DModel(**cfg).to(**kw).eval()
            ours = UNet2DModel.from_diffusers(ref)
            S = cfg["sample_size"]

            Cin = cfg.get("in_channels", 3)

            def inputs():
                return (torch.randn(B, Cin, S, S, **kw),
                        torch.randint(0, 1000, (B,), device=ctx.device))

            x0 = inputs()
            flops = _flops(ref, *x0)
            weights = sum(p.numel() for p in ref.parameters()) * _esize(dtype)
            case = Case("unet", name, (B, Cin, S, S), dtype, "NCHW",
                        bytes=2 * B * Cin * S * S * _esize(dtype) + weights, flops=flops)
            if ctx.only and ctx.only not in case.label:
                continue

            def eager(x, t, ref=ref):
                return ref(x, t).sample

            def fast(x, t, ours=ours):
                return ours(x, t).sample

            impls = [Impl("fastdiff UNet2DModel", fast, "fastdiff")]
            compile_s = None
            if ctx.compile:  # compiled here (not by the harness) to time the compile itself
                try:
                    torch._dynamo.reset()
                    cfn = torch.compile(eager, dynamic=False, backend=ctx.compile_backend)
                    t0 = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        cfn(*x0)
                    ctx.sync()
                    compile_s = time.perf_counter() - t0
                    # kind "other" so the harness does not report its own (absent) compile time
                    impls.insert(0, Impl("compile", cfn, "other"))
                except Exception as e:  # noqa: BLE001
                    ctx.skip("unet", case.label, "compile", reason(e))
            del x0
            saved, ctx.compile = ctx.compile, False
            try:
                for row in ctx.run_case(case, inputs, impls, eager):
                    if row["impl"] == "compile":
                        row.update(kind="compile", compile_s=compile_s)
                    yield row
            finally:
                ctx.compile = saved
            del ref, ours, impls
            if ctx.cuda:
                torch.cuda.empty_cache()
