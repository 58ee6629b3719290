"""The `train` suite: one optimizer step of fastdiff's Trainer against a plain diffusers step.

Both rows do the same work per step: noise the batch, U-Net forward + backward, MSE, gradient
clipping, AdamW, an EMA update (diffusers' EMAModel for the baseline). fastdiff's step draws the
noise inside q_sample and runs fastdiff.UNet2DModel (fused GroupNorm+SiLU, attention); the
baseline is diffusers' `DDPMScheduler.add_noise` + diffusers' `UNet2DModel` + F.mse_loss, eager
and torch.compile'd by the harness. GPU: the CIFAR-10 U-Net (google/ddpm-cifar10-32's config) at
B128 under bf16 autocast; CPU: the embedded digits model's config at B64, fp32 (the Trainer runs
its U-Net channels_last on both; the baseline stays NCHW on CPU, as diffusers runs it). Each row's
steps/s and images/s are logged; the table's ms column is ms per step. The losses differ (the
noise differs), so rows are timed, not checked.
"""
from __future__ import annotations

import copy
import tempfile

import torch
import torch.nn.functional as F

from .harness import Case, Impl, reason
from .suites import SuiteSkip, suite

CIFAR10_UNET = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
    "block_out_channels": [128, 256, 256, 256],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}


def _synthetic(n, c, r):
    from fastdiff.data import ImageData

    class Synthetic(ImageData):
        def __init__(self):
            super().__init__("synthetic", c, r, None, None)
            self._x = torch.rand(n, c, r, r, generator=torch.Generator().manual_seed(0)) * 2 - 1

        def __len__(self):
            return n

        def images(self, idx):
            return self._x[idx]
    return Synthetic()


@suite("train", "train: one optimizer step (noise, U-Net fwd+bwd, MSE, clip, AdamW, EMA)",
       floor="FLOPs: 3x the forward's (torch's FLOP counter); floor = FLOPs / matmul rate",
       metric="TFLOP/s")
def train_suite(ctx):
    try:
        from fastdiff import UNet2DModel  # noqa: F401
        from fastdiff.train import DEFAULT_UNET_CONFIG, TrainConfig, Trainer
    except ImportError as e:
        raise SuiteSkip(f"fastdiff.train / fastdiff.UNet2DModel not usable ({reason(e)})")
    if ctx.cuda:
        conf, B, dtype, mp = dict(CIFAR10_UNET), 128, torch.bfloat16, "bf16"
    else:
        conf, B, dtype, mp = dict(DEFAULT_UNET_CONFIG), 64, torch.float32, "no"
        conf.pop("num_class_embeds")
    C, R = conf["in_channels"], conf["sample_size"]
    conf["sample_size"] = R
    tmp = tempfile.mkdtemp(prefix="fastdiff-bench-train-")
    cfg = TrainConfig(data="synthetic", out=tmp, steps=10 ** 6, batch_size=B, unet_config=conf,
                      warmup_steps=0, mixed_precision=mp, device=str(ctx.device), progress=False)
    trainer = Trainer(cfg, data=_synthetic(4 * B, C, R))
    trainer.model.train()

    impls, eager = [], None
    try:
        import diffusers
        from diffusers.training_utils import EMAModel
        torch.manual_seed(0)
        ref = diffusers.UNet2DModel(**conf).to(ctx.device).train()
        if ctx.cuda:
            ref = ref.to(memory_format=torch.channels_last)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-4)
        ema = EMAModel(copy.deepcopy(ref).parameters(), decay=0.9999)
        ema.to(ctx.device)
        sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
        sched.alphas_cumprod = sched.alphas_cumprod.to(ctx.device)

        @torch.enable_grad()  # run.py times the suites under no_grad
        def eager(x0, t):
            noise = torch.randn_like(x0)
            x_t = sched.add_noise(x0, noise, t)
            with torch.autocast(ctx.device.type, dtype=dtype, enabled=mp != "no"):
                pred = ref(x_t, t).sample
            loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
            ema.step(ref.parameters())
            return loss.detach()
    except Exception as e:  # noqa: BLE001 - the fastdiff row still runs
        ctx.skip("train", "", "diffusers", f"diffusers not usable ({reason(e)})")

    @torch.enable_grad()
    def fastdiff_step(x0, t):
        trainer.train_step()
        return trainer._loss_sum

    # FLOPs of a step: 3x the forward's (backward ~2x), the forward's counted by torch
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        x = torch.zeros(B, C, R, R, device=ctx.device)
        (ref if eager is not None else trainer.model)(x, torch.zeros(B, dtype=torch.long,
                                                                    device=ctx.device))
    flops = 3 * fc.get_total_flops()

    impls.append(Impl("fastdiff Trainer.train_step", fastdiff_step, "fastdiff", verify=False))
    case = Case("train", "U-Net training step", (B, C, R, R), dtype, "NHWC" if ctx.cuda else "NCHW",
                flops=flops, expect=lambda inputs, out: None)

    def inputs():
        return (torch.rand(B, C, R, R, device=ctx.device) * 2 - 1,
                torch.randint(0, 1000, (B,), device=ctx.device))
    for row in ctx.run_case(case, inputs, impls, eager):
        ctx.log(f"    {row['impl']:<34} {1e3 / row['ms']:8.2f} steps/s "
                f"{B * 1e3 / row['ms']:10.1f} images/s")
        yield row
