"""DDPMPipeline / DDIMPipeline: diffusers pipeline folders in, the images diffusers' pipelines give
out (CPU float32, a tiny UNet2DModel)."""
import json

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.pipelines import read_model_index

diffusers = pytest.importorskip("diffusers")

from test_samplers import tiny_unet  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def diffusers_folder(tmp_path, cls="DDIMPipeline", sched=None, **unet_kw):
    unet = tiny_unet(**unet_kw)
    sched = sched or diffusers.DDIMScheduler(clip_sample=False)
    pipe = getattr(diffusers, cls)(unet=unet, scheduler=sched)
    pipe.save_pretrained(tmp_path)
    return pipe


def test_ddim_pipeline_equals_diffusers(tmp_path):
    ref_pipe = diffusers_folder(tmp_path)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(batch_size=16, generator=torch.Generator().manual_seed(0),
                   num_inference_steps=20, output_type="np").images
    x_T = torch.randn((16, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    pipe = fastdiff.DDIMPipeline.from_pretrained(tmp_path)
    out = pipe(batch_size=16, latents=x_T, num_inference_steps=20, output_type="np",
               progress=False).images
    assert out.shape == ref.shape == (16, 8, 8, 3)
    # 2e-5: diffusers computes the DDIM coefficients in float32, fastdiff in float64; over 20
    # steps that alone puts the torch reference backend 1.0e-5 from diffusers' images
    assert np.abs(out - ref).max() <= 2e-5
    # a generator gives diffusers' x_T too; PIL output as diffusers' numpy_to_pil
    pil = pipe(batch_size=16, generator=torch.Generator().manual_seed(0),
               num_inference_steps=20, progress=False).images
    ref_pil = ref_pipe(batch_size=16, generator=torch.Generator().manual_seed(0),
                       num_inference_steps=20).images
    diff = [np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()
            for a, b in zip(pil, ref_pil)]
    assert max(diff) <= 1  # a rounding step at most


def test_ddpm_pipeline_from_ddim_folder_and_defaults(tmp_path):
    diffusers_folder(tmp_path, sched=diffusers.DDIMScheduler(num_train_timesteps=40,
                                                              clip_sample=False))
    pipe = fastdiff.DDPMPipeline.from_pretrained(tmp_path)
    assert isinstance(pipe.scheduler, fastdiff.DDPMSampler)
    assert pipe.scheduler.config["num_train_timesteps"] == 40
    res = pipe(batch_size=2, seed=3, progress=False)
    assert len(res.images) == 2 and res.images[0].size == (8, 8)
    assert pipe.scheduler.num_inference_steps == 40  # DDPM: every timestep by default
    (images,) = pipe(batch_size=2, seed=3, output_type="pt", return_dict=False, progress=False)
    assert images.shape == (2, 3, 8, 8)
    np.testing.assert_array_equal(np.asarray(res.images[1]),
                                  (images[1].permute(1, 2, 0).numpy() * 255).round()
                                  .astype(np.uint8))


def test_save_pretrained_roundtrip_loads_in_diffusers(tmp_path):
    diffusers_folder(tmp_path / "a")
    pipe = fastdiff.DDIMPipeline.from_pretrained(tmp_path / "a")
    pipe.save_pretrained(tmp_path / "b")
    index = json.loads((tmp_path / "b" / "model_index.json").read_text())
    assert index["_class_name"] == "DDIMPipeline"
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    back = diffusers.DDIMPipeline.from_pretrained(tmp_path / "b")
    assert back.scheduler.config.clip_sample is False
    for k, v in pipe.unet.state_dict().items():
        torch.testing.assert_close(back.unet.state_dict()[k], v, rtol=0, atol=0)


def test_class_conditional_guidance_through_the_pipeline(tmp_path):
    unet = tiny_unet(num_class_embeds=4, scale=0.3)
    pipe = fastdiff.DDIMPipeline(unet, diffusers.DDIMScheduler(clip_sample=False))
    x = torch.randn(2, 3, 8, 8)
    kw = dict(latents=x, num_inference_steps=5, output_type="pt", progress=False)
    a = pipe(class_labels=[0, 2], guidance_scale=3.0, **kw).images
    b = pipe.scheduler.sample(unet, class_labels=[0, 2], guidance_scale=3.0, **kw)
    assert torch.equal(a, b)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fastdiff.DDIMPipeline.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        fastdiff.DDIMPipeline.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text("{")
    with pytest.raises(ValueError, match="is not valid JSON"):
        read_model_index(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DModel"]}))
    with pytest.raises(FileNotFoundError, match="has no unet/"):
        read_model_index(tmp_path)
    with pytest.raises(TypeError, match="unet must be a U-Net module"):
        fastdiff.DDPMPipeline(3, fastdiff.DDPMSampler())
