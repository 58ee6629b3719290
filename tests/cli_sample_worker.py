"""`python -m fastdiff` for the subprocess tests of tests/test_cli_sample.py (torchrun, ^C).

fastdiff's pipelines load fastdiff.UNet2DModel; where this checkout does not have it yet, the
test folders' unet/ is read with diffusers' UNet2DModel (same call signature) instead."""
import sys

import torch

import fastdiff
import fastdiff.cli
import fastdiff.pipelines

if not hasattr(fastdiff, "UNet2DModel"):
    import diffusers

    def load_unet(path, torch_dtype=None, device=None):
        return diffusers.UNet2DModel.from_pretrained(path, subfolder="unet").to(device, torch_dtype)
    fastdiff.pipelines.load_unet = load_unet

torch.set_num_threads(1)
sys.exit(fastdiff.cli.main(sys.argv[1:]))
