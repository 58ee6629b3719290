"""DPMSolverSampler / UniPCSampler (fastdiff.solvers + multistep_step): the schedule bit for bit
and whole loops against diffusers' DPMSolverMultistepScheduler / UniPCMultistepScheduler on CPU
float32 with the same model and initial noise (rel <= 1e-4), the cases where diffusers 0.42.1
fails, from_config, pipelines, the command line on the embedded model, and every documented
error.

Most loops use `Smooth`, an analytic stand-in model (a fixed random channel mix through tanh,
t-dependent): the solvers see nothing of a model but its outputs, so a smooth nonlinear map is
enough to exercise every coefficient, and it costs nothing. A few loops use the tiny perturbed
UNet2DModel of test_samplers (guidance, the SDE, UniPC order 3) as a real model."""
import json
import math
import os

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import DDIMSampler, DDPMSampler, DPMSolverSampler, UniPCSampler, solvers
from fastdiff import cli
import fastdiff.generate as gen

from conftest import HAS_CUDA

diffusers = pytest.importorskip("diffusers")
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler  # noqa: E402

from test_samplers import tiny_unet  # noqa: E402

REL = 1e-4  # whole loops: fastdiff's float64 coefficients vs diffusers' float32 ones


pytestmark = pytest.mark.usefixtures("one_thread")


class Smooth:
    """An analytic stand-in for a denoiser: m = tanh(W x + b cos(3 t / T)) + 0.3 x t / T with a
    fixed random channel mix W; t a 0-d tensor (diffusers' loop) or (B,) (fastdiff's)."""

    def __init__(self, C=3, scale=1.0, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(C, C, generator=g) / math.sqrt(C)
        self.b = torch.randn(C, generator=g)
        self.scale = scale

    def __call__(self, x, t, class_labels=None):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1) / 1000.0
        h = torch.einsum("dc,bchw->bdhw", self.W, x) + self.b.view(1, -1, 1, 1) * torch.cos(3 * t)
        return self.scale * (torch.tanh(h) + 0.3 * x * t)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def latents(shape=(2, 3, 5, 4), seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def diffusers_loop(sched, model, x, steps, noises=None, guidance=None, class_labels=None):
    """diffusers' loop, its step counter from 0 (set_begin_index: where Karras timesteps repeat,
    its lookup by timestep would pick other rows). Returns (x_0, failed): failed is None, or the
    exception / "nonfinite" when the LAST step broke (every earlier one finite); x_0 is then the
    limit of the step to sigma = 0 that fastdiff takes: the order-1 step there returns the last
    x0 prediction (alpha = 1, sigma_t / sigma_s = 0), which diffusers' state holds."""
    sched.set_timesteps(steps)
    sched.set_begin_index(0)
    n = len(sched.timesteps)
    with torch.no_grad():
        for k, t in enumerate(sched.timesteps):
            if guidance is None:
                out = model(x, t, class_labels=class_labels)
                out = out.sample if hasattr(out, "sample") else out
            else:
                out = model(torch.cat([x, x]), t, class_labels=class_labels).sample
                u, c = out.chunk(2)
                out = u + guidance * (c - u)
            kw = {} if noises is None else dict(variance_noise=noises[k])
            try:
                x = sched.step(out, t, x, **kw).prev_sample
            except Exception as e:  # noqa: BLE001 - which failure is the test's business
                assert k == n - 1, f"diffusers failed at step {k} of {n}: {e!r}"
                return sched.model_outputs[-1], e
            if not torch.isfinite(x).all():
                assert k == n - 1, f"diffusers non-finite at step {k} of {n}"
                return sched.model_outputs[-1], "nonfinite"
    return x, None


def fastdiff_loop(sampler, model, x, steps, **kw):
    """The raw x_0 of sampler.sample (before to_images' clamp), through its callback."""
    got = {}

    def cb(k, t, xk):
        got["x"] = xk.clone()
    sampler.sample(model, latents=x, num_inference_steps=steps, progress=False, callback=cb, **kw)
    return got["x"]


def compare(cfg, steps, model=None, x=None, expect_failure=False, noises=None):
    """diffusers' loop and fastdiff's (from_config of the same scheduler) from the same x_T;
    UniPC when cfg names a bh solver_type. Returns (sampler, fastdiff's x_0, diffusers' x_0)."""
    unipc = cfg.get("solver_type", "").startswith("bh")
    sched = (UniPCMultistepScheduler if unipc else DPMSolverMultistepScheduler)(**cfg)
    ours = (UniPCSampler if unipc else DPMSolverSampler).from_config(sched.config)
    model = model or Smooth()
    x = latents() if x is None else x
    ref, failed = diffusers_loop(sched, model, x.clone(), steps, noises=noises)
    out = fastdiff_loop(ours, model, x, steps,
                        step_noise=None if noises is None else (lambda k, t, xk: noises[k]))
    assert torch.isfinite(out).all()
    assert (failed is not None) == expect_failure, failed
    assert rel(out, ref) <= REL, (cfg, steps, rel(out, ref))
    return ours, out, ref


# -- the schedule -----------------------------------------------------------------------------
SCHEDULES = [dict(), dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
             dict(beta_schedule="squaredcos_cap_v2"), dict(rescale_betas_zero_snr=True),
             dict(num_train_timesteps=100, trained_betas=np.linspace(1e-4, 0.05, 100).tolist())]


@pytest.mark.parametrize("flavor", ["dpmsolver", "unipc"])
@pytest.mark.parametrize("sched_kw", SCHEDULES, ids=["linear", "scaled", "cosine", "zsnr",
                                                     "trained"])
@pytest.mark.parametrize("spacing, offset, karras", [("linspace", 0, False), ("leading", 0, False),
                                                     ("leading", 1, False), ("trailing", 0, False),
                                                     ("linspace", 0, True)])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_timesteps_and_sigmas_bitwise(flavor, sched_kw, spacing, offset, karras, final):
    cls, ours_cls = ((DPMSolverMultistepScheduler, DPMSolverSampler) if flavor == "dpmsolver"
                     else (UniPCMultistepScheduler, UniPCSampler))
    kw = dict(sched_kw, timestep_spacing=spacing, steps_offset=offset, use_karras_sigmas=karras,
              final_sigmas_type=final)
    d = cls(**kw)
    ours = ours_cls(**kw)
    T = d.config.num_train_timesteps
    for n in (1, 7, 20, 61, T // 2):
        if karras and n == 1:
            continue  # diffusers' Karras ramp of one point divides by zero
        d.set_timesteps(n)
        ts = ours.set_timesteps(n)
        np.testing.assert_array_equal(ts.numpy(), d.timesteps.numpy(), err_msg=f"n={n}")
        np.testing.assert_array_equal(ours.sigmas.numpy(), d.sigmas.numpy(), err_msg=f"n={n}")
        assert ours.coefs.shape == (len(ts), len(fastdiff.ops.multistep_step.COEFS))
        assert ours.coefs.dtype == torch.float64 and torch.isfinite(ours.coefs).all()
    assert torch.equal(ours.alphas_cumprod, d.alphas_cumprod)


def test_lambda_min_clipped_bitwise():
    kw = dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1)
    d, ours = DPMSolverMultistepScheduler(**kw), DPMSolverSampler(**kw)
    for spacing in ("linspace", "leading", "trailing"):
        d.register_to_config(timestep_spacing=spacing)
        ours.config["timestep_spacing"] = spacing
        d.set_timesteps(20)
        np.testing.assert_array_equal(ours.set_timesteps(20).numpy(), d.timesteps.numpy())
        np.testing.assert_array_equal(ours.sigmas.numpy(), d.sigmas.numpy())
    assert ours.timesteps.max() < 999  # clipped


def test_orders_as_diffusers():
    assert solvers.dpmsolver_orders(10, 3) == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]
    assert solvers.dpmsolver_orders(20, 3) == [1, 2] + [3] * 17 + [1]  # zero final sigma: 1
    assert solvers.dpmsolver_orders(20, 3, final_sigmas_type="sigma_min") == [1, 2] + [3] * 18
    assert solvers.dpmsolver_orders(10, 3, lower_order_final=False,
                                    final_sigmas_type="sigma_min") == [1, 2] + [3] * 8
    assert solvers.dpmsolver_orders(20, 2, euler_at_final=True,
                                    final_sigmas_type="sigma_min") == [1] + [2] * 18 + [1]
    assert solvers.unipc_orders(6, 3) == [1, 2, 3, 3, 2, 1]
    assert solvers.unipc_orders(6, 3, lower_order_final=False) == [1, 2, 3, 3, 3, 3]
    sig = np.array([3, 2, 1, 0.5, 0.2, 0.1, 0.0], dtype=np.float32)
    assert solvers.unipc_orders(6, 3, False, sig) == [1, 2, 3, 3, 3, 1]  # to sigma 0: order 1


def test_ring_slots():
    """The x0 of step s is in slot s % K: an order-3 row at step 7 weighs slots 0 (step 6) and
    2 (step 5), never slot 1 (step 4's, overwritten by this step); UniPC's corrector reads it."""
    s = DPMSolverSampler(solver_order=3)
    s.set_timesteps(20)
    col = {n: i for i, n in enumerate(solvers.COEFS)}
    row = s.coefs[7]
    assert row[col["pred_h1"]] == 0 and row[col["pred_h0"]] != 0 and row[col["pred_h2"]] != 0
    u = UniPCSampler(solver_order=3)
    u.set_timesteps(20)
    row = u.coefs[7]
    assert all(row[col[f"corr_h{k}"]] != 0 for k in range(3)) and row[col["pred_h1"]] == 0


# -- whole loops against diffusers ------------------------------------------------------------
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_dpmsolver_loop(order, lower_order_final, prediction_type, spacing):
    compare(dict(solver_order=order, lower_order_final=lower_order_final,
                 prediction_type=prediction_type, timestep_spacing=spacing), 12)


@pytest.mark.parametrize("cfg, steps", [
    (dict(solver_order=2, use_karras_sigmas=True), 20),
    (dict(solver_order=3, use_karras_sigmas=True, beta_schedule="squaredcos_cap_v2"), 12),
    (dict(solver_order=3, final_sigmas_type="sigma_min", lower_order_final=False), 20),
    (dict(solver_order=2, solver_type="heun", prediction_type="sample"), 15),
    (dict(solver_order=2, euler_at_final=True, final_sigmas_type="sigma_min"), 20),
    (dict(solver_order=3, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
          timestep_spacing="leading", steps_offset=1), 25),
    (dict(solver_order=2, rescale_betas_zero_snr=True, timestep_spacing="trailing",
          prediction_type="v_prediction"), 10),
    (dict(solver_order=2, timestep_spacing="trailing"), 61),  # 62 steps, diffusers' arange
    # ... whose timestep -1 repeats sigma_min: an identity last step
    (dict(solver_order=2, timestep_spacing="trailing", final_sigmas_type="sigma_min"), 61),
])
def test_dpmsolver_loop_options(cfg, steps):
    compare(cfg, steps)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_unipc_loop(order, solver_type, prediction_type, spacing):
    # sigma_min final: diffusers' bh1 gives NaN at a zero one (test_unipc_bh1_zero_final_sigma)
    compare(dict(solver_order=order, solver_type=solver_type, prediction_type=prediction_type,
                 timestep_spacing=spacing, final_sigmas_type="sigma_min"), 12)


@pytest.mark.parametrize("cfg, steps", [
    (dict(solver_order=2, solver_type="bh2"), 20),                      # diffusers' defaults
    (dict(solver_order=3, solver_type="bh2", lower_order_final=False,
          final_sigmas_type="sigma_min"), 12),
    (dict(solver_order=2, solver_type="bh2", disable_corrector=[0, 3, 4]), 10),
    (dict(solver_order=3, solver_type="bh2", disable_corrector=list(range(20))), 20),
    (dict(solver_order=2, solver_type="bh2", use_karras_sigmas=True), 15),
    (dict(solver_order=3, solver_type="bh1", use_karras_sigmas=True, sigma_min=0.05,
          sigma_max=40.0, final_sigmas_type="sigma_min"), 12),
    (dict(solver_order=2, solver_type="bh2", prediction_type="sample",
          beta_schedule="squaredcos_cap_v2"), 20),
    (dict(solver_order=2, solver_type="bh1", timestep_spacing="trailing",
          final_sigmas_type="sigma_min"), 61),
])
def test_unipc_loop_options(cfg, steps):
    compare(cfg, steps)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_bh1_zero_final_sigma(order):
    """diffusers 0.42.1: B(h) = h = -inf at the last step times a zero sum: NaN. fastdiff: the
    limit, the last x0 prediction (also the limit of diffusers' own step as sigma -> 0 below)."""
    compare(dict(solver_order=order, solver_type="bh1"), 12, expect_failure=True)


def test_unipc_bh1_limit_is_diffusers_at_vanishing_sigma():
    """The reference of the failing case justified: diffusers' bh1 step with the final sigma
    1e-6 instead of 0 (finite) is within 1e-5 of fastdiff's zero-sigma result."""
    model, x = Smooth(), latents()
    out = fastdiff_loop(UniPCSampler(solver_type="bh1"), model, x, 12)
    d = UniPCMultistepScheduler(solver_type="bh1")
    d.set_timesteps(12)
    d.sigmas[-1] = 1e-6
    d.set_begin_index(0)
    y = x.clone()
    for t in d.timesteps:
        y = d.step(model(y, t), t, y).prev_sample
    assert torch.isfinite(y).all() and rel(out, y) < 1e-5


@pytest.mark.parametrize("order, steps", [(2, 12), (3, 12), (3, 20)])
def test_unipc_no_lower_order_final(order, steps):
    """diffusers 0.42.1, lower_order_final=False and a zero final sigma: the ratios r_k of the
    last step are 0 (h = inf): order 3 is a singular solve (LinAlgError), order 2 divides by 0.
    fastdiff drops the last step to order 1 (the polynomial terms have no finite limit there)."""
    cfg = dict(solver_order=order, solver_type="bh2", lower_order_final=False)
    ours, out, ref = compare(cfg, steps, expect_failure=True)
    assert ours.orders[-1] == 1 and ours.orders[-2] == order
    if order == 3:
        d = UniPCMultistepScheduler(**cfg)
        with pytest.raises(torch.linalg.LinAlgError):
            diffusers_loop_strict(d, Smooth(), latents(), steps)


def diffusers_loop_strict(sched, model, x, steps):
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x).prev_sample
    return x


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [10, 20])
def test_sde_step_noise_equals_diffusers(order, steps):
    g = torch.Generator().manual_seed(7)
    x = latents()
    noises = [torch.randn(x.shape, generator=g) for _ in range(steps)]
    compare(dict(solver_order=order, algorithm_type="sde-dpmsolver++"), steps, x=x,
            noises=noises)


def test_sde_noise_per_image_and_seed():
    """In-kernel noise: image first_index + b gets the same noise in any batch; other seeds
    other images; the ODE solver ignores seeds."""
    model = Smooth()
    s = DPMSolverSampler(algorithm_type="sde-dpmsolver++")
    kw = dict(shape=(3, 4, 4), num_inference_steps=8, progress=False)
    big = s.sample(model, batch_size=3, seed=4, first_index=5, **kw)
    one = s.sample(model, batch_size=1, seed=4, first_index=6, **kw)
    torch.testing.assert_close(one[0], big[1], rtol=0, atol=1e-6)
    other = s.sample(model, batch_size=3, seed=5, first_index=5, **kw)
    assert (other - big).abs().max() > 1e-3
    ode = DPMSolverSampler()
    assert torch.equal(ode.sample(model, batch_size=2, seed=1, latents=big[:2] * 2 - 1, **kw),
                       ode.sample(model, batch_size=2, seed=2, latents=big[:2] * 2 - 1, **kw))


@pytest.mark.parametrize("cls", [DPMSolverSampler, UniPCSampler])
def test_thresholding_pixel_model(cls):
    """Dynamic thresholding (pixel models): x0 predictions far outside [-1, 1] (a large epsilon
    model), per-sample quantile as diffusers' _threshold_sample."""
    cfg = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5,
               solver_order=3, prediction_type="epsilon")
    if cls is UniPCSampler:
        cfg.update(solver_type="bh2")
    model = Smooth(scale=3.0)
    compare(cfg, 12, model=model)
    plain = dict(cfg, thresholding=False)
    assert rel(fastdiff_loop(cls(**plain), model, latents(), 12),
               fastdiff_loop(cls(**cfg), model, latents(), 12)) > 1e-2  # it did something


@pytest.mark.parametrize("cfg", [dict(solver_order=2), dict(solver_order=3, solver_type="bh2"),
                                 dict(solver_order=2, algorithm_type="sde-dpmsolver++")])
def test_unet_guidance_loop(cfg):
    """A real (tiny, perturbed) UNet2DModel, class-conditional, classifier-free guidance."""
    unet = tiny_unet(num_class_embeds=4, scale=0.5)
    x = latents((2, 3, 8, 8), seed=3)
    labels = torch.tensor([0, 2])
    kw = dict(guidance=1.5, class_labels=torch.cat([torch.full((2,), 3), labels]))
    steps = 10
    if cfg.get("algorithm_type", "").startswith("sde"):
        g = torch.Generator().manual_seed(2)
        noises = [torch.randn(x.shape, generator=g) for _ in range(steps)]
        kw["noises"] = noises
    sched_cls = UniPCMultistepScheduler if "solver_type" in cfg else DPMSolverMultistepScheduler
    ours_cls = UniPCSampler if "solver_type" in cfg else DPMSolverSampler
    sched = sched_cls(**cfg, prediction_type="v_prediction")
    ref, failed = diffusers_loop(sched, unet, x.clone(), steps, **kw)
    assert failed is None
    out = fastdiff_loop(ours_cls.from_config(sched.config), unet, x, steps, class_labels=labels,
                        guidance_scale=1.5, step_noise=(lambda k, t, xk: noises[k])
                        if "noises" in kw else None)
    assert rel(out, ref) <= REL


@pytest.mark.parametrize("name", ["dpmpp-2m", "dpmpp-2m-sde", "unipc"])
def test_embedded_model_equals_diffusers(name):
    """The issue's definition of done: from_config(the embedded model's scheduler config) then
    sample(model, latents=x_T) equals diffusers' loop with the same U-Net (diffusers' own
    UNet2DModel loaded from the folder), v-prediction, class labels, guidance 1.5."""
    from fastdiff.pipelines import DEFAULT_MODEL
    unet = diffusers.UNet2DModel.from_pretrained(os.path.join(DEFAULT_MODEL, "unet")).eval()
    cfg_path = os.path.join(DEFAULT_MODEL, "scheduler")
    cls, options = gen.MULTISTEP[name]
    d_cls = UniPCMultistepScheduler if cls is UniPCSampler else DPMSolverMultistepScheduler
    sched = d_cls.from_config(d_cls.load_config(cfg_path), **options)
    ours = cls.from_config(cfg_path, **options)
    x = latents((3, 1, 8, 8), seed=4)
    labels = torch.tensor([1, 4, 7])
    steps = 12
    g = torch.Generator().manual_seed(5)
    noises = [torch.randn(x.shape, generator=g) for _ in range(steps)]
    sde = options.get("algorithm_type") == "sde-dpmsolver++"
    ref, failed = diffusers_loop(sched, unet, x.clone(), steps, noises=noises if sde else None,
                                 guidance=1.5, class_labels=torch.cat([torch.full((3,), 10),
                                                                       labels]))
    assert failed is None
    out = fastdiff_loop(ours, unet, x, steps, class_labels=labels, guidance_scale=1.5,
                        step_noise=(lambda k, t, xk: noises[k]) if sde else None)
    assert rel(out, ref) <= REL


def test_float64_samples():
    """float64 samples keep a float64 ring and agree with the float32 run."""
    model = Smooth()
    x = latents()
    s = UniPCSampler(solver_order=3)
    out32 = fastdiff_loop(s, model, x, 12)
    out64 = fastdiff_loop(s, lambda xx, t, class_labels=None: model(xx.float(), t).double(),
                          x.double(), 12, dtype=torch.float64)
    assert out64.dtype == torch.float64 and rel(out32, out64) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_samples_float32_state(dtype):
    """A half-precision model: samples in its dtype, the solver state (ring, UniPC's last
    sample) float32, so the loop stays near the float32 one."""
    model = Smooth()
    x = latents()
    for s in (DPMSolverSampler(solver_order=3), UniPCSampler(solver_order=3)):
        ref = fastdiff_loop(s, model, x, 12)
        out = fastdiff_loop(s, lambda xx, t, class_labels=None: model(xx.float(), t).to(dtype),
                            x.to(dtype), 12, dtype=dtype)
        assert out.dtype == dtype and rel(out, ref) < 2e-2
        assert s._loop_state(x.to(dtype))["ring"].dtype == torch.float32


# -- from_config, save_config, pipelines ------------------------------------------------------
def test_from_config_round_trip(tmp_path):
    d = DPMSolverMultistepScheduler(solver_order=3, prediction_type="v_prediction",
                                    use_karras_sigmas=True, timestep_spacing="trailing",
                                    lambda_min_clipped=-4.0)
    s = DPMSolverSampler.from_config(d.config)
    path = s.save_config(tmp_path / "a")
    assert json.load(open(path))["_class_name"] == "DPMSolverMultistepScheduler"
    d2 = DPMSolverMultistepScheduler.from_pretrained(tmp_path / "a")
    for k, v in s.config.items():
        assert d2.config[k] == v, k
    s2 = DPMSolverSampler.from_config(tmp_path / "a")  # folder path
    assert s2.config == s.config
    u = UniPCSampler.from_config(UniPCMultistepScheduler(solver_type="bh1",
                                                         disable_corrector=[2]).config)
    u.save_config(tmp_path / "b")
    u2 = UniPCMultistepScheduler.from_pretrained(tmp_path / "b")
    assert u2.config.solver_type == "bh1" and list(u2.config.disable_corrector) == [2]
    assert UniPCSampler.from_config(tmp_path / "b" / "scheduler_config.json").config == u.config


@pytest.mark.parametrize("base", [diffusers.DDPMScheduler, diffusers.DDIMScheduler])
def test_from_ddpm_ddim_config_as_diffusers(base):
    """From a DDPM/DDIM config (the embedded model's kind): the shared options taken over and
    the others ignored, as diffusers' from_config; the same loop."""
    cfg = base(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
               timestep_spacing="leading", clip_sample=True).config
    for d_cls, f_cls in ((DPMSolverMultistepScheduler, DPMSolverSampler),
                         (UniPCMultistepScheduler, UniPCSampler)):
        d, s = d_cls.from_config(cfg), f_cls.from_config(cfg)
        assert s.config["timestep_spacing"] == d.config.timestep_spacing == "leading"
        assert s.config["prediction_type"] == "v_prediction"
        x = latents()
        ref, _ = diffusers_loop(d, Smooth(), x.clone(), 10)
        assert rel(fastdiff_loop(s, Smooth(), x, 10), ref) <= REL
    # and back: DDPM/DDIM samplers from a solver's config ignore the solver's options
    for cfg in (DPMSolverMultistepScheduler(solver_order=3).config,
                UniPCMultistepScheduler(solver_type="bh1").config):
        assert DDIMSampler.from_config(cfg).config["timestep_spacing"] == "linspace"
        assert DDPMSampler.from_config(cfg).config["variance_type"] == "fixed_small"


def test_pipelines_keep_solvers(tmp_path):
    unet = fastdiff.UNet2DModel.from_diffusers(tiny_unet(scale=0.3))
    s = DPMSolverSampler(solver_order=2, num_train_timesteps=100)
    pipe = fastdiff.DDIMPipeline(unet, s)
    assert pipe.scheduler is s
    pipe2 = fastdiff.DDPMPipeline(unet, UniPCMultistepScheduler(num_train_timesteps=100))
    assert isinstance(pipe2.scheduler, UniPCSampler)
    pipe3 = fastdiff.DDPMPipeline(unet, {"_class_name": "DPMSolverMultistepScheduler",
                                         "solver_order": 3})
    assert isinstance(pipe3.scheduler, DPMSolverSampler)
    assert pipe3.scheduler.config["solver_order"] == 3
    a = pipe(batch_size=2, num_inference_steps=5, output_type="pt", progress=False).images
    b = s.sample(unet, batch_size=2, num_inference_steps=5, progress=False)
    assert torch.equal(a, b)
    pipe.save_pretrained(tmp_path / "p")
    back = fastdiff.DDPMPipeline.from_pretrained(
        tmp_path / "p", scheduler=DPMSolverSampler.from_config(tmp_path / "p" / "scheduler"))
    assert torch.equal(back(batch_size=2, num_inference_steps=5, output_type="pt",
                            progress=False).images, a)
    assert diffusers.DDPMPipeline.from_pretrained(tmp_path / "p").scheduler.__class__ \
        is DPMSolverMultistepScheduler


# -- the command line on the embedded model ---------------------------------------------------
@pytest.mark.parametrize("name", ["dpmpp-2m", "dpmpp-3m", "dpmpp-2m-sde", "unipc"])
def test_cli_samples_embedded_model(name, tmp_path, capsys):
    out = tmp_path / "g.png"
    assert cli.main(["sample", "--sampler", name, "--steps", "4", "--n", "3", "--device", "cpu",
                     "--out", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    from PIL import Image
    grid = np.asarray(Image.open(out))
    grid = grid[..., None] if grid.ndim == 2 else grid
    pipe = gen.load_pipeline(None, name)
    cls, options = gen.MULTISTEP[name]
    assert isinstance(pipe.scheduler, cls)
    assert all(pipe.scheduler.config[k] == v for k, v in options.items())
    want = pipe.scheduler.sample(pipe.unet, batch_size=3, num_inference_steps=4, seed=0,
                                 class_labels=torch.arange(3), guidance_scale=1.5,
                                 output_type="np", progress=False)
    cell = (want[1] * 255).round().astype(np.uint8).repeat(4, axis=0).repeat(4, axis=1)
    np.testing.assert_array_equal(grid[2:34, 36:68, 0], cell[..., 0])  # row 0, col 1


def test_cli_default_steps_and_errors(tmp_path, capsys):
    out = tmp_path / "f"
    assert cli.main(["sample", "--sampler", "unipc", "--n", "1", "--device", "cpu", "--out",
                     str(out), "--format", "npz", "--no-progress"]) == 0
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["steps"] == 20 and manifest["sampler"] == "unipc"
    assert manifest["scheduler"]["solver_type"] == "bh2"
    capsys.readouterr()
    assert cli.main(["sample", "--sampler", "dpmpp-2m", "--eta", "0.5", "--device", "cpu",
                     "--no-progress", "--out", str(tmp_path / "x.png")]) == 2
    assert "eta applies to the ddim sampler only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["sample", "--sampler", "dpmpp-4m"])


# -- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, kw, err, msg", [
    (DPMSolverSampler, dict(solver_order=0), ValueError, "solver_order must be an int in"),
    (DPMSolverSampler, dict(solver_order=4), ValueError, "solver_order must be an int in"),
    (UniPCSampler, dict(solver_order=2.0), ValueError, "solver_order must be an int in"),
    (DPMSolverSampler, dict(algorithm_type="dpmsolver"), ValueError, "algorithm_type must be"),
    (DPMSolverSampler, dict(solver_type="euler"), ValueError, "solver_type must be one of"),
    (UniPCSampler, dict(solver_type="bh3"), ValueError, "solver_type must be one of"),
    (DPMSolverSampler, dict(final_sigmas_type="min"), ValueError, "final_sigmas_type must be"),
    (UniPCSampler, dict(final_sigmas_type=None), ValueError, "final_sigmas_type must be"),
    (DPMSolverSampler, dict(lambda_min_clipped="low"), ValueError, "lambda_min_clipped must"),
    (DPMSolverSampler, dict(timestep_spacing="even"), ValueError, "timestep_spacing must be"),
    (UniPCSampler, dict(prediction_type="flow_prediction"), ValueError, "prediction_type must"),
    (UniPCSampler, dict(predict_x0=False), ValueError, "predict_x0=False"),
    (UniPCSampler, dict(disable_corrector="3"), TypeError, "disable_corrector must be a list"),
    (UniPCSampler, dict(disable_corrector=[-1]), ValueError, r"disable_corrector\[\] must be"),
    (UniPCSampler, dict(sigma_min=-1.0), ValueError, "sigma_min must be None or a number > 0"),
    (DPMSolverSampler, dict(beta_schedule="cubic"), ValueError, "beta_schedule must be one of"),
])
def test_constructor_errors(cls, kw, err, msg):
    with pytest.raises(err, match=msg):
        cls(**kw)


def test_config_and_sample_errors():
    with pytest.raises(ValueError, match="use_exponential_sigmas=True is not supported"):
        DPMSolverSampler.from_config({"use_exponential_sigmas": True})
    with pytest.raises(ValueError, match="solver_p=.* is not supported"):
        UniPCSampler.from_config({"solver_p": "x"})
    with pytest.raises(ValueError, match="unknown option"):
        UniPCSampler.from_config({"solver_ordr": 2})
    assert DPMSolverSampler.from_config({"use_exponential_sigmas": False, "variance_type": None})
    s = DPMSolverSampler()
    with pytest.raises(ValueError, match="cannot exceed num_train_timesteps"):
        s.set_timesteps(1001)
    with pytest.raises(ValueError, match="repeats a noise level"):
        s.set_timesteps(1000)  # linspace over 1001 points rounds to repeated timesteps
    with pytest.raises(ValueError, match="steps_offset=999 puts the first timestep"):
        DPMSolverSampler(timestep_spacing="leading", steps_offset=999).set_timesteps(10)
    with pytest.raises(TypeError, match="num_inference_steps must be an int"):
        s.set_timesteps(2.5)
    with pytest.raises(ValueError, match="eta is a DDIM option"):
        s.sample(Smooth(), batch_size=1, shape=(3, 4, 4), num_inference_steps=3, eta=0.0,
                 progress=False)
    with pytest.raises(ValueError, match="eta applies to the ddim sampler only"):
        gen.generate(None, sampler="dpmpp-2m-sde", eta=1.0, device="cpu")
    with pytest.raises(ValueError, match="sampler must be one of"):
        gen.load_pipeline(None, "dpmpp")


def test_solvers_module_errors():
    ac = solvers.multistep_alphas_cumprod()
    with pytest.raises(ValueError, match="flavor must be"):
        solvers.multistep_schedule(ac, 10, flavor="ddim")
    with pytest.raises(ValueError, match="timestep_spacing must be one of"):
        solvers.multistep_schedule(ac, 10, timestep_spacing="even")
    with pytest.raises(ValueError, match="final_sigmas_type must be one of"):
        solvers.multistep_schedule(ac, 10, final_sigmas_type="one")
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        solvers.multistep_alphas_cumprod("cubic")
    sig = np.array([5.0, 2.0, 2.0, 1.0, 0.0], dtype=np.float32)
    for table in (solvers.dpmsolver_table, solvers.unipc_table):
        with pytest.raises(ValueError, match=r"sigmas: the schedule repeats a noise level "
                                             r"\(sigmas\[1\]"):
            table(sig)
        with pytest.raises(ValueError, match="solver_order must be an int in"):
            table(sig[[0, 1, 3, 4]], solver_order=5)
    sig = np.array([5.0, 2.0, 1.0, 1.0], dtype=np.float32)  # a repeated LAST sigma: identity
    for table in (solvers.dpmsolver_table, solvers.unipc_table):
        coefs, _ = table(sig, solver_order=2)
        assert coefs[-1][list(solvers.COEFS).index("pred_y")] == 1.0
        assert np.count_nonzero(coefs[-1][list(solvers.COEFS).index("pred_y"):]) == 1


def test_cross_conversions_as_diffusers():
    """A solver from the other solver's config: diffusers maps solver_type (bh1/bh2 <->
    midpoint) and ignores the other's options; so does fastdiff. A pipeline object converts."""
    u = UniPCMultistepScheduler(solver_type="bh1", use_karras_sigmas=True).config
    d = DPMSolverMultistepScheduler(solver_type="heun", euler_at_final=True).config
    for cfg, d_cls, f_cls in ((u, DPMSolverMultistepScheduler, DPMSolverSampler),
                              (d, UniPCMultistepScheduler, UniPCSampler)):
        ref, ours = d_cls.from_config(cfg), f_cls.from_config(cfg)
        assert ours.config["solver_type"] == ref.config.solver_type
        ref.set_timesteps(15)
        ours.set_timesteps(15)
        np.testing.assert_array_equal(ours.sigmas.numpy(), ref.sigmas.numpy())
    unet = fastdiff.UNet2DModel.from_diffusers(tiny_unet(scale=0.3))
    pipe = fastdiff.DDIMPipeline(unet, DDIMSampler(num_train_timesteps=100))
    conv = gen.load_pipeline(pipe, "dpmpp-2m-sde")
    assert isinstance(conv.scheduler, DPMSolverSampler)
    assert conv.scheduler.config["algorithm_type"] == "sde-dpmsolver++"
    assert conv.scheduler.config["num_train_timesteps"] == 100


def test_repr_and_names():
    s = UniPCSampler(solver_order=3)
    assert "UniPCSampler(" in repr(s) and "solver_order=3" in repr(s)
    assert "clip_sample" not in s.config and "clip_sample" not in UniPCSampler.option_names()
    assert DPMSolverSampler.default_inference_steps(DPMSolverSampler()) == 20


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("cls, kw", [(DPMSolverSampler, dict(algorithm_type="sde-dpmsolver++")),
                                     (UniPCSampler, dict(solver_order=3))])
def test_cuda_graph_equals_eager(cls, kw, capsys):
    """The captured step (model + multistep_step, the ring and last sample its static state)
    replayed equals the eager loop bitwise; a second call with another step count captures its
    own graph and a repeated call reuses the first."""
    unet = tiny_unet(num_class_embeds=4, scale=0.3).cuda()
    s = cls(**kw)
    common = dict(batch_size=5, progress=False, class_labels=[0, 1, 2, 0, 1], guidance_scale=1.5)
    for seed, first, steps in ((0, 0, 10), (3, 17, 12), (0, 0, 10)):
        eager = s.sample(unet, seed=seed, first_index=first, num_inference_steps=steps,
                         cuda_graph=False, **common)
        graph = s.sample(unet, seed=seed, first_index=first, num_inference_steps=steps,
                         cuda_graph=True, **common)
        assert torch.equal(graph, eager), (seed, first, steps)
    assert len(s._graphs) == 2 and "capture failed" not in capsys.readouterr().out
