"""DDPMSampler / DDIMSampler: timesteps, from_config and whole loops against diffusers' schedulers
with the same (tiny, perturbed) UNet2DModel weights on CPU float32; noise per image."""
import json

import pytest
import torch

from fastdiff import DDIMSampler, DDPMSampler

from conftest import HAS_CUDA

diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import scheduling_ddpm  # noqa: E402



pytestmark = pytest.mark.usefixtures("one_thread")


SPACINGS = [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)]


def tiny_unet(out_channels=3, num_class_embeds=None, scale=1.0, seed=0):
    """A 2-level UNet2DModel at 8x8 with one attention level; norms perturbed away from (1, 0);
    output scaled by `scale` (a smaller Jacobian keeps long clipped loops well conditioned)."""
    torch.manual_seed(seed)
    m = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=out_channels,
                              block_out_channels=(8, 16), layers_per_block=1,
                              down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                              up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                              attention_head_dim=8, num_class_embeds=num_class_embeds).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.GroupNorm):
                mod.weight.normal_(1, 0.1)
                mod.bias.normal_(0, 0.1)
        m.conv_out.weight.mul_(scale)
        m.conv_out.bias.mul_(scale)
    return m


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def diffusers_loop(sched, unet, x, steps, noises=None, eta=0.0, class_labels=None):
    """diffusers' own loop; noises[k] is the variance noise of step k (None: no noise)."""
    sched.set_timesteps(steps)
    with torch.no_grad():
        for k, t in enumerate(sched.timesteps):
            out = unet(x, t, class_labels=class_labels).sample
            if isinstance(sched, diffusers.DDIMScheduler):
                vn = None if noises is None else noises[k]
                x = sched.step(out, t, x, eta=eta, variance_noise=vn).prev_sample
            else:
                x = sched.step(out, t, x).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


def step_noises(n, shape, final_zero=True):
    """Per-step noise, zero at the last step (fastdiff adds none there; diffusers' DDPM does for
    t > 0)."""
    g = torch.Generator().manual_seed(99)
    z = [torch.randn(shape, generator=g) for _ in range(n)]
    if final_zero:
        z[-1] = torch.zeros(shape)
    return z


@pytest.fixture
def ddpm_noise(monkeypatch):
    """Makes diffusers' DDPMScheduler.step take its variance noise from a list."""
    queue = []

    def fake_randn(shape, generator=None, device=None, dtype=None, **kw):
        return queue.pop(0).to(device=device, dtype=dtype)
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", fake_randn)
    return queue


# -- timesteps and configuration -------------------------------------------------------------
@pytest.mark.parametrize("spacing, offset", SPACINGS)
@pytest.mark.parametrize("n", [1, 7, 50, 333, 1000])
@pytest.mark.parametrize("cls", [DDPMSampler, DDIMSampler])
def test_timesteps_equal_diffusers(cls, n, spacing, offset):
    d = getattr(diffusers, cls.__name__.replace("Sampler", "Scheduler"))(
        timestep_spacing=spacing, steps_offset=offset)
    s = cls.from_config(d.config)
    d.set_timesteps(n)
    T = d.config.num_train_timesteps
    if d.timesteps.max() >= T:  # diffusers accepts it and fails at the step's table lookup
        with pytest.raises(ValueError, match=f"puts the first timestep at {T}"):
            s.set_timesteps(n)
        return
    s.set_timesteps(n)
    assert torch.equal(s.timesteps, d.timesteps)
    if cls is DDIMSampler:
        assert torch.equal(s.prev_timesteps, d.timesteps - T // n)
    else:
        assert torch.equal(s.prev_timesteps, torch.tensor(
            [int(d.previous_timestep(t)) for t in d.timesteps]))


def test_timesteps_errors():
    s = DDIMSampler(num_train_timesteps=100)
    with pytest.raises(ValueError, match="num_inference_steps=101 cannot exceed"):
        s.set_timesteps(101)
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        s.set_timesteps(0)
    with pytest.raises(TypeError, match="num_inference_steps must be an int"):
        s.set_timesteps(2.5)
    with pytest.raises(ValueError, match="steps_offset=1 puts the first timestep at 100"):
        DDIMSampler(num_train_timesteps=100, steps_offset=1).set_timesteps(100)


def test_from_config_dict_object_path(tmp_path):
    d = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                                clip_sample=False, timestep_spacing="trailing")
    d.save_config(tmp_path)
    for cfg in (d, d.config, dict(d.config), tmp_path / "scheduler_config.json", str(tmp_path)):
        s = DDIMSampler.from_config(cfg)
        assert s.config["prediction_type"] == "v_prediction"
        assert s.config["timestep_spacing"] == "trailing"
        assert s.config["beta_schedule"] == "squaredcos_cap_v2"
        assert not s.config["clip_sample"]
    torch.testing.assert_close(s.schedule.alphas_cumprod, d.alphas_cumprod.double(), rtol=1e-4,
                               atol=1e-9)  # diffusers' table is float32
    assert DDIMSampler.from_config(d, eta=0.5).config["eta"] == 0.5


def test_from_config_ignores_other_schedulers_options():
    # a DDPM config in a DDIM sampler, and the reverse, as diffusers allows; an old config key
    s = DDIMSampler.from_config(dict(diffusers.DDPMScheduler(variance_type="fixed_large").config,
                                     tensor_format="pt"))
    assert "variance_type" not in s.config
    p = DDPMSampler.from_config(diffusers.DDIMScheduler(set_alpha_to_one=False).config)
    assert "set_alpha_to_one" not in p.config
    pndm = diffusers.PNDMScheduler(beta_start=0.00085, skip_prk_steps=True)
    assert DDPMSampler.from_config(pndm.config).config["beta_start"] == 0.00085


def test_save_config_loads_in_diffusers(tmp_path):
    s = DDPMSampler(variance_type="fixed_large", prediction_type="sample", steps_offset=1)
    s.save_config(tmp_path)
    d = diffusers.DDPMScheduler.from_pretrained(tmp_path)
    assert d.config.variance_type == "fixed_large" and d.config.steps_offset == 1
    assert DDPMSampler.from_config(tmp_path).config == s.config
    s = DDIMSampler(eta=0.3)
    s.save_config(tmp_path / "ddim")
    cfg = json.loads((tmp_path / "ddim" / "scheduler_config.json").read_text())
    assert cfg["_class_name"] == "DDIMScheduler" and "eta" not in cfg


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['predicton_type'\]"):
        DDIMSampler.from_config({"predicton_type": "epsilon"})
    with pytest.raises(TypeError, match="config must be a dict, a diffusers scheduler or a path"):
        DDPMSampler.from_config(42)
    with pytest.raises(FileNotFoundError, match="no scheduler config at"):
        DDPMSampler.from_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="is not valid JSON"):
        DDPMSampler.from_config(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        DDIMSampler(prediction_type="eps")
    with pytest.raises(ValueError, match="timestep_spacing must be one of"):
        DDIMSampler(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="variance_type must be one of"):
        DDPMSampler(variance_type="fixed")
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        DDPMSampler(beta_schedule="cubic")
    with pytest.raises(ValueError, match="clip_sample and thresholding are exclusive"):
        DDPMSampler(thresholding=True)
    with pytest.raises(ValueError, match="eta must be a number >= 0"):
        DDIMSampler(eta=-1)


# -- whole loops against diffusers -------------------------------------------------------------
def test_ddim_eta0_50_steps_equals_diffusers():
    unet = tiny_unet()
    x = torch.randn(3, 3, 8, 8)
    for clip, model in ((False, unet), (True, tiny_unet(scale=0.1))):
        d = diffusers.DDIMScheduler(clip_sample=clip)
        s = DDIMSampler.from_config(d.config)
        ref = diffusers_loop(d, model, x.clone(), 50)
        out = s.sample(model, latents=x, num_inference_steps=50, progress=False)
        assert rel(out, ref) <= 1e-4, clip


# every spacing with epsilon, every prediction type with leading spacing
LOOP_CASES = [("epsilon", sp, off) for sp, off in SPACINGS] + [
    ("sample", "leading", 0), ("v_prediction", "leading", 0)]


@pytest.mark.parametrize("prediction_type, spacing, offset", LOOP_CASES)
def test_ddim_eta_step_noise_equals_diffusers(prediction_type, spacing, offset):
    unet = tiny_unet(scale=0.3)
    d = diffusers.DDIMScheduler(prediction_type=prediction_type, timestep_spacing=spacing,
                                steps_offset=offset, clip_sample=False, set_alpha_to_one=False)
    s = DDIMSampler.from_config(d.config)
    x, n = torch.randn(3, 3, 8, 8), 10
    z = step_noises(n, x.shape)
    ref = diffusers_loop(d, unet, x.clone(), n, noises=z, eta=0.7)
    out = s.sample(unet, latents=x, num_inference_steps=n, eta=0.7, progress=False,
                   step_noise=lambda k, t, xt: z[k])
    assert rel(out, ref) <= 1e-4


@pytest.mark.parametrize("prediction_type, spacing, offset", LOOP_CASES)
def test_ddpm_step_noise_equals_diffusers(ddpm_noise, prediction_type, spacing, offset):
    unet = tiny_unet(scale=0.3)
    d = diffusers.DDPMScheduler(prediction_type=prediction_type, timestep_spacing=spacing,
                                steps_offset=offset, clip_sample=True)
    s = DDPMSampler.from_config(d.config)
    x, n = torch.randn(3, 3, 8, 8), 12
    z = step_noises(n, x.shape)
    d.set_timesteps(n)
    # diffusers draws noise only where t > 0
    ddpm_noise.extend(zk for zk, t in zip(z, d.timesteps) if t > 0)
    ref = diffusers_loop(d, unet, x.clone(), n)
    out = s.sample(unet, latents=x, num_inference_steps=n, progress=False,
                   step_noise=lambda k, t, xt: z[k])
    assert rel(out, ref) <= 1e-4


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large",
                                           "learned", "learned_range"])
def test_ddpm_variance_types_equal_diffusers(ddpm_noise, variance_type):
    learned = variance_type.startswith("learned")
    unet = tiny_unet(out_channels=6 if learned else 3, scale=0.3)
    d = diffusers.DDPMScheduler(variance_type=variance_type, clip_sample=False)
    s = DDPMSampler.from_config(d.config)
    x, n = torch.randn(2, 3, 8, 8), 12

    def model(xt, t, class_labels=None):  # "learned" predicts the variance itself: keep it > 0
        out = unet(xt, t).sample
        if variance_type == "learned":
            out = torch.cat([out[:, :3], out[:, 3:].abs() * 1e-3 + 1e-4], 1)
        return out
    model.config = unet.config
    z = step_noises(n, x.shape)
    d.set_timesteps(n)
    ddpm_noise.extend(zk for zk, t in zip(z, d.timesteps) if t > 0)
    d.set_timesteps(n)
    with torch.no_grad():
        y = x.clone()
        for t in d.timesteps:
            y = d.step(model(y, t), t, y).prev_sample
    ref = (y / 2 + 0.5).clamp(0, 1)
    out = s.sample(model, latents=x, shape=(3, 8, 8), num_inference_steps=n, progress=False,
                   step_noise=lambda k, t, xt: z[k])
    assert rel(out, ref) <= 1e-4


def test_thresholding_loop_equals_diffusers():
    unet = tiny_unet(scale=0.3)
    d = diffusers.DDIMScheduler(clip_sample=False, thresholding=True, sample_max_value=1.5,
                                dynamic_thresholding_ratio=0.9)
    s = DDIMSampler.from_config(d.config)
    x = torch.randn(2, 3, 8, 8)
    assert rel(s.sample(unet, latents=x, num_inference_steps=10, progress=False),
               diffusers_loop(d, unet, x.clone(), 10)) <= 1e-4


def test_guidance_equals_two_pass_formula():
    unet = tiny_unet(num_class_embeds=5, scale=0.3)
    d = diffusers.DDIMScheduler(clip_sample=False)
    s = DDIMSampler.from_config(d.config)
    x, labels, w, n = torch.randn(3, 3, 8, 8), torch.tensor([0, 3, 1]), 2.5, 10
    d.set_timesteps(n)
    y = x.clone()
    with torch.no_grad():
        for t in d.timesteps:
            eps_u = unet(y, t, class_labels=torch.full((3,), 4)).sample
            eps_c = unet(y, t, class_labels=labels).sample
            y = d.step(eps_u + w * (eps_c - eps_u), t, y).prev_sample
    ref = (y / 2 + 0.5).clamp(0, 1)
    out = s.sample(unet, latents=x, class_labels=labels, guidance_scale=w,
                   num_inference_steps=n, progress=False)
    assert rel(out, ref) <= 1e-4
    cond = s.sample(unet, latents=x, class_labels=labels, guidance_scale=1.0,
                    num_inference_steps=n, progress=False)
    assert rel(cond, diffusers_loop(d, unet, x.clone(), n, class_labels=labels)) <= 1e-4


# -- noise per image ---------------------------------------------------------------------------
def test_noise_per_image_independent_of_batch_and_position():
    """Image i of a run is the same from batch sizes 1, 7 and 64 and from positions 0 and 5 (DDPM:
    x_T and every step's noise drawn in the kernels). The model here mixes nothing across the
    batch, so the images are equal bitwise."""
    s = DDPMSampler(num_train_timesteps=50)

    def model(x, t):  # per-image, deterministic arithmetic, t-dependent
        return torch.tanh(x * 0.5 + t.view(-1, 1, 1, 1) / 50.0)

    kw = dict(shape=(3, 5, 7), num_inference_steps=10, seed=7, progress=False)
    big = s.sample(model, batch_size=64, **kw)
    for first, B in ((0, 1), (0, 7), (5, 7), (12, 1), (60, 4)):
        part = s.sample(model, batch_size=B, first_index=first, **kw)
        assert torch.equal(part, big[first:first + B]), (first, B)
    other = s.sample(model, batch_size=4, **dict(kw, seed=8))
    assert not torch.equal(other, big[:4])


def test_initial_noise_is_q_sample_noise_per_image():
    s = DDIMSampler(num_train_timesteps=20)
    a = s.initial_noise((6, 2, 3, 3), seed=3, first_index=10)
    b = s.initial_noise((2, 2, 3, 3), seed=3, first_index=14)
    assert torch.equal(a[4:], b)
    assert a.is_contiguous() and a.std() > 0.5


# -- the loop's arguments ----------------------------------------------------------------------
def test_outputs_callback_and_defaults():
    unet = tiny_unet(scale=0.3)
    s = DDIMSampler()
    seen = []
    pt = s.sample(unet, batch_size=2, num_inference_steps=4, progress=False,
                  callback=lambda k, t, x: seen.append((k, int(t), tuple(x.shape))))
    assert seen == [(0, 750, (2, 3, 8, 8)), (1, 500, (2, 3, 8, 8)), (2, 250, (2, 3, 8, 8)),
                    (3, 0, (2, 3, 8, 8))]
    assert pt.shape == (2, 3, 8, 8) and pt.min() >= 0 and pt.max() <= 1
    arr = s.sample(unet, batch_size=2, num_inference_steps=4, progress=False, output_type="np")
    assert arr.shape == (2, 8, 8, 3) and arr.dtype.name == "float32"
    torch.testing.assert_close(torch.from_numpy(arr), pt.permute(0, 2, 3, 1))
    pil = s.sample(unet, batch_size=2, num_inference_steps=4, progress=True, output_type="pil")
    assert len(pil) == 2 and pil[0].size == (8, 8) and pil[0].mode == "RGB"
    assert s.timesteps.tolist() == [750, 500, 250, 0]
    assert DDPMSampler(num_train_timesteps=30).default_inference_steps() == 30


def test_sample_errors():
    unet = tiny_unet(scale=0.3)
    cond = tiny_unet(num_class_embeds=3)
    s = DDIMSampler()
    x = torch.randn(2, 3, 8, 8)
    cases = [
        (dict(model=unet, output_type="latent"), ValueError, "output_type must be one of"),
        (dict(model=unet, cuda_graph="yes"), ValueError, "cuda_graph must be 'auto', True or"),
        (dict(model=unet, cuda_graph=True), ValueError, "cuda_graph=True needs a CUDA device"),
        (dict(model=unet, latents=x, batch_size=3), ValueError, "batch_size=3 but latents"),
        (dict(model=unet, latents=x, shape=(3, 4, 4)), ValueError, "shape=.* but latents"),
        (dict(model=unet, latents=x.long()), TypeError, "latents must be a floating tensor"),
        (dict(model=unet, batch_size=0), ValueError, "batch_size must be >= 1"),
        (dict(model=unet, first_index=-1), ValueError, "first_index must be >= 0"),
        (dict(model=unet, seed=1.5), TypeError, "seed must be an int"),
        (dict(model=unet, eta=-0.5), ValueError, "eta must be a number >= 0"),
        (dict(model=unet, dtype=torch.float16), ValueError, "differs from the model's"),
        (dict(model=unet, device="meta"), ValueError, "differs from the model's"),
        (dict(model=lambda x, t: x), ValueError, r"shape \(C, H, W\) is needed"),
        (dict(model=unet, step_noise=3), TypeError, "step_noise must be a callable"),
        (dict(model=unet, callback=3), TypeError, "callback must be a callable"),
        (dict(model=3), TypeError, "model must be callable"),
        (dict(model=lambda x, t: "no", shape=(3, 8, 8)), TypeError, "model must return a tensor"),
        (dict(model=cond), ValueError, "class_labels is needed"),
        (dict(model=cond, class_labels=3), ValueError, r"class_labels must lie in \[0, 3\)"),
        (dict(model=cond, class_labels=[0, 1, 2]), ValueError, r"class_labels must have shape"),
        (dict(model=cond, class_labels=[0.5, 1]), TypeError, "class_labels must be integers"),
        (dict(model=unet, guidance_scale=2.0), ValueError, "guidance_scale needs a class-cond"),
        (dict(model=cond, class_labels=1, guidance_scale="2"), TypeError,
         "guidance_scale must be a float"),
    ]
    for kw, err, msg in cases:
        kw.setdefault("batch_size", None if "latents" in kw else 2)
        with pytest.raises(err, match=msg):
            s.sample(num_inference_steps=2, progress=False, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_cuda_graph_equals_eager(kind, capsys):
    """A captured step replayed equals the eager loop bitwise, and a replay for a new batch
    (seed, first_index filled into the device buffers) draws that batch's noise."""
    unet = tiny_unet(num_class_embeds=4, scale=0.3).cuda()
    s = DDPMSampler() if kind == "ddpm" else DDIMSampler(eta=0.5)
    kw = dict(batch_size=5, num_inference_steps=20, progress=False, class_labels=[0, 1, 2, 0, 1],
              guidance_scale=1.5)
    for seed, first in ((0, 0), (3, 17)):
        eager = s.sample(unet, seed=seed, first_index=first, cuda_graph=False, **kw)
        graph = s.sample(unet, seed=seed, first_index=first, cuda_graph=True, **kw)
        assert torch.equal(graph, eager), (seed, first)
    assert len(s._graphs) == 1 and "capture failed" not in capsys.readouterr().out
