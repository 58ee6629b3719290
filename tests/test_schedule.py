"""Schedules against diffusers' schedulers and against the papers' formulas in float64."""
import json
import math

import pytest
import torch

import fastdiff
from fastdiff.schedule import TABLES

diffusers = pytest.importorskip("diffusers")

CONFIGS = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="linear", num_train_timesteps=100, beta_start=1e-3, beta_end=0.05),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="sigmoid"),
    dict(beta_schedule="laplace"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
    dict(beta_schedule="linear", rescale_betas_zero_snr=True),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler"])
def test_matches_diffusers(cfg, cls):
    if cls == "DDIMScheduler" and cfg["beta_schedule"] in ("sigmoid", "laplace"):
        pytest.skip(f"diffusers' DDIMScheduler has no {cfg['beta_schedule']} schedule")
    sched = getattr(diffusers, cls)(**cfg)
    ours = fastdiff.Schedule(**cfg)
    # diffusers builds its tables in float32; ours are float64: agreement to float32 rounding.
    # Its zero-SNR rescale recovers betas as 1 - ab[t]/ab[t-1] in float32, which cancels
    # (~6e-8 / beta relative): there only an absolute bound holds.
    zsnr = cfg.get("rescale_betas_zero_snr", False)
    torch.testing.assert_close(ours.betas.float(), sched.betas, rtol=2e-4 if zsnr else 2e-6,
                               atol=3e-7 if zsnr else 1e-8)
    ab = sched.alphas_cumprod.double()
    # its float32 cumprod drifts by ~1e-7 per step; the zero-SNR end is 0 in both
    torch.testing.assert_close(ours.alphas_cumprod, ab, rtol=5e-5, atol=1e-9)


def test_from_config_dict_scheduler_and_json(tmp_path):
    sched = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", num_train_timesteps=500)
    a = fastdiff.Schedule.from_config(sched)
    b = fastdiff.Schedule.from_config(dict(sched.config))
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(dict(sched.config)))
    c = fastdiff.Schedule.from_config(str(path))
    for s in (a, b, c):
        assert s.num_train_timesteps == 500
        torch.testing.assert_close(s.betas, a.betas, rtol=0, atol=0)
    torch.testing.assert_close(a.betas.float(), sched.betas, rtol=2e-6, atol=1e-8)


def test_trained_betas_and_from_betas():
    betas = torch.linspace(1e-4, 0.02, 50, dtype=torch.float64) ** 1.5
    s = fastdiff.Schedule.from_betas(betas)
    assert s.num_train_timesteps == 50
    torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=0, atol=0)
    t = fastdiff.Schedule.from_config({"trained_betas": betas.tolist(), "num_train_timesteps": 50})
    torch.testing.assert_close(t.betas, betas, rtol=0, atol=0)


def test_derived_tables_against_ddpm_paper_formulas():
    """Ho et al. 2020, eq. 6-7, computed here element by element in Python floats."""
    s = fastdiff.Schedule("linear", 1000)
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    ab, acc = [], 1.0
    for b in betas:
        acc *= 1 - b
        ab.append(acc)
    for t in (0, 1, 2, 10, 500, 998, 999):
        ab_prev = ab[t - 1] if t > 0 else 1.0
        pv = betas[t] * (1 - ab_prev) / (1 - ab[t])
        c1 = betas[t] * math.sqrt(ab_prev) / (1 - ab[t])
        c2 = (1 - ab_prev) * math.sqrt(1 - betas[t]) / (1 - ab[t])
        assert s.alphas_cumprod[t].item() == pytest.approx(ab[t], rel=1e-12)
        assert s.sqrt_alphas_cumprod[t].item() == pytest.approx(math.sqrt(ab[t]), rel=1e-12)
        assert s.sqrt_one_minus_alphas_cumprod[t].item() == pytest.approx(math.sqrt(1 - ab[t]), rel=1e-12)
        assert s.sqrt_recip_alphas_cumprod[t].item() == pytest.approx(1 / math.sqrt(ab[t]), rel=1e-12)
        assert s.sqrt_recipm1_alphas_cumprod[t].item() == pytest.approx(math.sqrt(1 / ab[t] - 1), rel=1e-10)
        assert s.posterior_variance[t].item() == pytest.approx(pv, rel=1e-10, abs=1e-300)
        assert s.posterior_mean_coef1[t].item() == pytest.approx(c1, rel=1e-10)
        assert s.posterior_mean_coef2[t].item() == pytest.approx(c2, rel=1e-10, abs=1e-300)
        # the clipped log variance: t = 0 (variance 0) takes t = 1's value
        pv1 = betas[1] * (1 - ab[0]) / (1 - ab[1])
        want = math.log(pv if t > 0 else pv1)
        assert s.posterior_log_variance_clipped[t].item() == pytest.approx(want, rel=1e-10)


def test_cosine_schedule_formula():
    s = fastdiff.Schedule("squaredcos_cap_v2", 1000)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 999):
        want = min(1 - f((t + 1) / 1000) / f(t / 1000), 0.999)
        assert s.betas[t].item() == pytest.approx(want, rel=1e-12)


def test_zero_snr_rescale_ends_at_zero():
    s = fastdiff.Schedule("scaled_linear", 1000, 0.00085, 0.012, rescale_betas_zero_snr=True)
    assert s.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)
    plain = fastdiff.Schedule("scaled_linear", 1000, 0.00085, 0.012)
    assert s.sqrt_alphas_cumprod[0].item() == pytest.approx(plain.sqrt_alphas_cumprod[0].item(), rel=1e-12)


def test_device_tables_cached_float32():
    s = fastdiff.Schedule()
    a = s.table("alphas_cumprod", "cpu", torch.float32)
    assert a.dtype == torch.float32 and a is s.table("alphas_cumprod", "cpu", torch.float32)
    assert set(TABLES) <= set(s._tables)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(beta_schedule="cosine"), ValueError, "beta_schedule must be one of"),
    (dict(num_train_timesteps=0), ValueError, "num_train_timesteps must be a positive int"),
    (dict(num_train_timesteps=10.0), ValueError, "num_train_timesteps must be a positive int"),
    (dict(trained_betas=[0.1, 1.5]), ValueError, r"betas must be finite and lie in \[0, 1\]"),
])
def test_errors(kwargs, err, match):
    with pytest.raises(err, match=match):
        fastdiff.Schedule(**kwargs)


def test_unknown_table_and_bad_config():
    with pytest.raises(ValueError, match="table must be one of"):
        fastdiff.Schedule().table("alpha_bar")
    with pytest.raises(TypeError, match="config must be a dict"):
        fastdiff.Schedule.from_config(42)
