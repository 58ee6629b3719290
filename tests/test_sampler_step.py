"""sampler_step on every backend against the float64 reference and against diffusers' DDPM/DDIM
step (run in float64), with given and in-kernel noise, and statistics of the in-kernel noise."""
import math

import pytest
import torch

import fastdiff
from fastdiff.ops.sampler_step import (IMPLEMENTED, LEARNED, PREDICTION_TYPES, VARIANCE_TYPES,
                                       sampler_step_ref)
from fastdiff.reference import STREAM_SAMPLER_STEP, memory_order_normal

from conftest import DEVICE, assert_close, backends_for

BACKENDS = backends_for("sampler_step", IMPLEMENTED)
T = 1000


@pytest.fixture(scope="module")
def schedule():
    return fastdiff.Schedule("linear", T)


def _fill_variance(mo, C, learned, g):
    """The predicted variance channels: in [-1, 1] for learned_range (True means that), the
    variance itself (positive, ~beta) for learned."""
    v = torch.rand(mo[:, C:].shape, generator=g)
    mo[:, C:] = v * 0.02 + 1e-4 if learned == "learned" else v * 2 - 1


def _inputs(shape, t, t_prev, learned=False, dtype=torch.float32, seed=0, channels_last=False,
            guided=False):
    """learned: False, True / "learned_range" or "learned" (2C channels); guided: batch 2B."""
    g = torch.Generator().manual_seed(seed)
    mo_shape = (shape[0], 2 * shape[1]) + tuple(shape[2:]) if learned else shape
    if guided:
        mo_shape = (2 * mo_shape[0],) + tuple(mo_shape[1:])
    x = torch.randn(shape, generator=g)
    mo = torch.randn(mo_shape, generator=g)
    if learned:
        _fill_variance(mo, shape[1], learned, g)
    noise = torch.randn(shape, generator=g)
    x, mo, noise = (a.to(DEVICE, dtype) for a in (x, mo, noise))
    if channels_last:
        x, mo = x.to(memory_format=torch.channels_last), mo.to(memory_format=torch.channels_last)
    tt = torch.tensor(t, device=DEVICE)
    tp = torch.tensor(t_prev, device=DEVICE)
    return x, mo, tt, tp, noise


def _ref(schedule, x, mo, t, tp, noise, **opts):
    ab = schedule.table("alphas_cumprod", "cpu", torch.float64)
    return sampler_step_ref(x.double().cpu(), mo.double().cpu(), t.cpu(), tp.cpu(), ab,
                            noise=None if noise is None else noise.double().cpu(), **opts)


def _close(out, ref, tol, msg=""):
    """Max error over max|ref| and ||out - ref|| / ||ref||, both <= tol."""
    o, r = out.double().cpu(), ref.double().cpu()
    assert o.shape == r.shape, msg
    assert torch.isfinite(o).all(), f"{msg}: non-finite output"
    scale = r.abs().max().clamp_min(1e-30)
    elem = ((o - r).abs().max() / scale).item()
    nrm = ((o - r).norm() / r.norm().clamp_min(1e-30)).item()
    assert elem <= tol and nrm <= tol, f"{msg}: max err / max|ref| {elem:.3g}, norm rel {nrm:.3g} > {tol}"
    return elem, nrm


# t = 0 (ddpm: no noise), t_prev = -1 (final step), small and large t, in one batch
T_PAIRS = ([0, 3, 500, 999], [-1, 2, 480, 979])
SHAPE = (4, 3, 5, 4)  # 60 elements per sample: whole Philox groups
SHAPE_ODD = (4, 3, 5, 3)  # 45 per sample: Philox groups straddle samples


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddpm_given_noise(backend, prediction_type, variance_type, schedule):
    learned = variance_type if variance_type in LEARNED else False
    x, mo, t, tp, noise = _inputs(SHAPE, *T_PAIRS, learned=learned)
    opts = dict(kind="ddpm", prediction_type=prediction_type, variance_type=variance_type)
    with fastdiff.use_backend(backend):
        out, x0 = fastdiff.sampler_step(x, mo, t, tp, schedule, noise=noise, return_x0=True, **opts)
    ref, ref_x0 = _ref(schedule, x, mo, t, tp, noise, return_x0=True, **opts)
    assert out.dtype == torch.float32 and out.shape == x.shape
    _close(out, ref, 2e-6, f"{backend} x_prev")
    _close(x0, ref_x0, 2e-6, f"{backend} x0")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", ["clip", "threshold"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddpm_clip_threshold(backend, prediction_type, clip, schedule):
    x, mo, t, tp, noise = _inputs(SHAPE_ODD, *T_PAIRS, seed=1)
    opts = dict(kind="ddpm", prediction_type=prediction_type, variance_type="fixed_large")
    if clip == "clip":
        opts.update(clip_sample=True, clip_sample_range=1.5)
    else:
        opts.update(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0)
    with fastdiff.use_backend(backend):
        out, x0 = fastdiff.sampler_step(x, mo, t, tp, schedule, noise=noise, return_x0=True, **opts)
    ref, ref_x0 = _ref(schedule, x, mo, t, tp, noise, return_x0=True, **opts)
    bound = 1.5 if clip == "clip" else 1.0
    assert ref_x0.abs().max() <= bound + 1e-12
    assert (ref_x0.abs() >= bound - 1e-9).any(), "the case must actually clip"
    _close(out, ref, 2e-6, f"{backend} x_prev")
    _close(x0, ref_x0, 2e-6, f"{backend} x0")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", ["none", "clip", "threshold"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim(backend, prediction_type, eta, clip, schedule):
    x, mo, t, tp, noise = _inputs(SHAPE, *T_PAIRS, seed=2)
    # alternate the two ddim-only switches over the grid, so each meets every other option
    flip = (PREDICTION_TYPES.index(prediction_type) + int(eta * 2)) % 2 == 1
    opts = dict(kind="ddim", prediction_type=prediction_type, eta=eta,
                use_clipped_model_output=flip, set_alpha_to_one=not flip)
    if clip == "clip":
        opts.update(clip_sample=True)
    elif clip == "threshold":
        opts.update(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=2.0)
    with fastdiff.use_backend(backend):
        out, x0 = fastdiff.sampler_step(x, mo, t, tp, schedule, noise=noise, return_x0=True, **opts)
    ref, ref_x0 = _ref(schedule, x, mo, t, tp, noise, return_x0=True, **opts)
    _close(out, ref, 2e-6, f"{backend} x_prev")
    _close(x0, ref_x0, 2e-6, f"{backend} x0")
    if eta == 0:  # deterministic: the noise is not used at all
        with fastdiff.use_backend(backend):
            again = fastdiff.sampler_step(x, mo, t, tp, schedule, seed=7, **opts)
        assert torch.equal(again.cpu(), out.cpu())


def test_reference_options_matter(schedule):
    """Each option changes the reference's result (so the tests above can fail)."""
    x, mo, t, tp, noise = _inputs(SHAPE, *T_PAIRS, seed=3)
    base = dict(kind="ddim", eta=0.5)
    r0 = _ref(schedule, x, mo, t, tp, noise, **base)
    for extra in [dict(use_clipped_model_output=True, clip_sample=True), dict(set_alpha_to_one=False),
                  dict(eta=1.0), dict(prediction_type="sample"), dict(clip_sample=True),
                  dict(thresholding=True, sample_max_value=2.0)]:
        r1 = _ref(schedule, x, mo, t, tp, noise, **{**base, **extra})
        assert not torch.allclose(r0, r1), extra
    outs = [_ref(schedule, x, mo, t, tp, noise, kind="ddpm", variance_type=v)
            for v in ("fixed_small", "fixed_large")]
    assert not torch.allclose(outs[0], outs[1])
    # fixed_small_log is fixed_small; fixed_large_log (GLIDE's log(beta)) is fixed_large
    for a, b in (("fixed_small", "fixed_small_log"), ("fixed_large", "fixed_large_log")):
        ra, rb = (_ref(schedule, x, mo, t, tp, noise, kind="ddpm", variance_type=v) for v in (a, b))
        assert torch.allclose(ra, rb, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [
    dict(kind="ddpm", prediction_type="epsilon", variance_type="learned_range"),
    dict(kind="ddpm", prediction_type="v_prediction", variance_type="learned"),
    dict(kind="ddim", prediction_type="v_prediction", eta=0.5, thresholding=True,
         sample_max_value=2.0),
])
def test_half_dtypes(backend, dtype, case, schedule):
    learned = case.get("variance_type") if case.get("variance_type") in LEARNED else False
    x, mo, t, tp, noise = _inputs(SHAPE_ODD, [1, 200, 600, 999], [0, 150, 599, 900],
                                  learned=learned, dtype=dtype, seed=4)
    with fastdiff.use_backend(backend):
        out = fastdiff.sampler_step(x, mo, t, tp, schedule, noise=noise, **case)
    assert out.dtype == dtype
    ref = _ref(schedule, x, mo, t, tp, noise, **case)
    assert_close(out, ref, dtype, scale=float(ref.abs().max()), msg=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_learned_range_reads_in_place(backend, schedule):
    x, mo, t, tp, noise = _inputs((2, 3, 5, 3), [700, 1], [600, -1], learned=True, seed=5,
                                  channels_last=True)
    assert not mo.is_contiguous()
    opts = dict(kind="ddpm", variance_type="learned_range", prediction_type="v_prediction")
    with fastdiff.use_backend(backend):
        out = fastdiff.sampler_step(x, mo, t, tp, schedule, noise=noise, **opts)
        drawn = fastdiff.sampler_step(x, mo, t, tp, schedule, seed=11, **opts)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert drawn.is_contiguous(memory_format=torch.channels_last)
    _close(out, _ref(schedule, x, mo, t, tp, noise, **opts), 2e-6, backend)
    z = memory_order_normal(11, t.cpu(), STREAM_SAMPLER_STEP, x.double().cpu())
    _close(drawn, _ref(schedule, x, mo, t, tp, z, **opts), 2e-6, f"{backend} drawn")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nchw_learned_range_and_mixed_layouts(backend, schedule):
    """NCHW 2C output with a channels_last x_t (re-laid out), and a strided x_t view."""
    x, mo, t, tp, noise = _inputs((2, 4, 3, 5), [999, 30], [979, 10], learned=True, seed=6)
    opts = dict(kind="ddpm", variance_type="learned_range")
    xc = x.to(memory_format=torch.channels_last)
    with fastdiff.use_backend(backend):
        a = fastdiff.sampler_step(x, mo, t, tp, schedule, noise=noise, **opts)
        b = fastdiff.sampler_step(xc, mo, t, tp, schedule, noise=noise, **opts)
    ref = _ref(schedule, x, mo, t, tp, noise, **opts)
    _close(a, ref, 2e-6, backend)
    _close(b, ref, 2e-6, f"{backend} channels_last x_t")
    base = torch.randn(2, 3, 9, 8, device=DEVICE)
    xs = base[:, :, ::2, 1:]
    ms, ns = torch.randn_like(xs), torch.randn_like(xs)
    with fastdiff.use_backend(backend):
        c = fastdiff.sampler_step(xs, ms, t, tp, schedule, noise=ns, kind="ddim", eta=1.0)
    _close(c, _ref(schedule, xs, ms, t, tp, ns, kind="ddim", eta=1.0), 2e-6, f"{backend} strided")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("learned", [False, True])
def test_unaligned_views(backend, learned, schedule):
    """Dense views one element into their storage: the kernels' 4-element vector accesses must
    fall back to scalar ones, with the same results (NCHW learned_range included)."""
    x, mo, t, tp, noise = _inputs(SHAPE, *T_PAIRS, learned=learned, seed=9)

    def shifted(a, k):
        return torch.cat([a.new_zeros(k), a.flatten()])[k:].view(a.shape)

    xs, ms, ns = shifted(x, 1), shifted(mo, 3), shifted(noise, 2)
    opts = dict(kind="ddpm", variance_type="learned_range" if learned else "fixed_small",
                prediction_type="v_prediction")
    with fastdiff.use_backend(backend):
        out, x0 = fastdiff.sampler_step(xs, ms, t, tp, schedule, noise=ns, return_x0=True, **opts)
        drawn = fastdiff.sampler_step(xs, ms, t, tp, schedule, seed=4, **opts)
    ref, ref_x0 = _ref(schedule, x, mo, t, tp, noise, return_x0=True, **opts)
    _close(out, ref, 2e-6, f"{backend} x_prev")
    _close(x0, ref_x0, 2e-6, f"{backend} x0")
    with fastdiff.use_backend(backend):
        aligned = fastdiff.sampler_step(x, mo, t, tp, schedule, seed=4, **opts)
    _close(drawn, aligned, 2e-6, f"{backend} drawn noise, unaligned vs aligned")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [SHAPE, SHAPE_ODD, (1, 2, 33, 33), (3, 5)])
def test_drawn_noise_matches_reference_stream(backend, shape, schedule):
    B = shape[0]
    t, tp = [0, 7, 999, 640][:B], [-1, 3, 989, 600][:B]
    x, mo, tt, tpp, _ = _inputs(shape, t, tp, seed=8)
    for opts in (dict(kind="ddpm", variance_type="fixed_large"), dict(kind="ddim", eta=0.7)):
        with fastdiff.use_backend(backend):
            out = fastdiff.sampler_step(x, mo, tt, tpp, schedule, seed=2 ** 40 + 17, **opts)
        z = memory_order_normal(2 ** 40 + 17, tt.cpu(), STREAM_SAMPLER_STEP, x.double().cpu())
        _close(out, _ref(schedule, x, mo, tt, tpp, z, **opts), 2e-6, f"{backend} {opts['kind']}")


def test_same_seed_same_result_on_every_backend(schedule):
    x, mo, t, tp, _ = _inputs(SHAPE_ODD, *T_PAIRS, learned=True, seed=9)
    outs = {}
    for backend in BACKENDS:
        with fastdiff.use_backend(backend):
            outs[backend] = fastdiff.sampler_step(x, mo, t, tp, schedule, seed=99,
                                                  variance_type="learned_range").double().cpu()
    first = outs[BACKENDS[0]]
    for name, o in outs.items():
        _close(o, first, 1e-6, f"{name} vs {BACKENDS[0]}")


def test_seed_reproducible_t_changes_noise_and_ddpm_t0_noiseless(schedule):
    x, mo, _, _, _ = _inputs((2, 3, 4, 4), [0, 0], [0, 0], seed=10)
    run = lambda t, s: fastdiff.sampler_step(x, mo, torch.tensor(t), torch.tensor([0, 0]),
                                             schedule, seed=s, variance_type="fixed_large")
    a, b, c, d = run([5, 5], 1), run([5, 5], 1), run([6, 5], 1), run([5, 5], 2)
    assert torch.equal(a, b)
    assert not torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    assert not torch.equal(a, d)
    run = lambda t, s: fastdiff.sampler_step(x, mo, torch.tensor(t), torch.tensor([-1, 4]),
                                             schedule, seed=s, variance_type="fixed_large")
    e, f = run([0, 5], 1), run([0, 5], 2)  # t = 0 draws nothing: seed-independent
    assert torch.equal(e[0], f[0]) and not torch.equal(e[1], f[1])


def _noise_of(schedule, t, n, backend=None):
    """The in-kernel normals of a step, recovered: x_t = model_output = 0 makes x_prev = std z,
    std = sqrt(beta_t) for fixed_large."""
    x = torch.zeros(1, n, device=DEVICE)
    with fastdiff.use_backend(backend or "auto"):
        out = fastdiff.sampler_step(x, x, t, t - 1, schedule, seed=123, variance_type="fixed_large")
    ab = schedule.alphas_cumprod
    return out.double().cpu().flatten() / math.sqrt(1.0 - float(ab[t] / ab[t - 1]))


def test_in_kernel_noise_statistics(schedule):
    n = 10 ** 6
    z = _noise_of(schedule, 500, n)
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    s = z.sort().values
    cdf = 0.5 * (1 + torch.erf(s / math.sqrt(2)))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert ks < 1.63 / math.sqrt(n), f"KS statistic {ks:.3g} (1% level {1.63 / math.sqrt(n):.3g})"
    # independence: another step's stream, and neighbouring elements within one stream
    z2 = _noise_of(schedule, 501, n)
    for a, b, what in ((z, z2, "t=500 vs t=501"), (z[:-1], z[1:], "lag 1"), (z[:-4], z[4:], "lag 4")):
        r = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        assert abs(r) < 5 / math.sqrt(n), f"{what}: correlation {r:.3g}"


# -- parity with diffusers ------------------------------------------------------------------

DDPM_CASES = [dict(prediction_type=p, variance_type=v) for p in PREDICTION_TYPES
              for v in VARIANCE_TYPES] + \
    [dict(prediction_type=p, variance_type="fixed_small", clip_sample=True) for p in PREDICTION_TYPES] + \
    [dict(prediction_type="epsilon", variance_type="fixed_small", clip_sample=True,
          clip_sample_range=0.5)] + \
    [dict(prediction_type=p, variance_type="fixed_small", thresholding=True,
          dynamic_thresholding_ratio=0.9, sample_max_value=3.0) for p in PREDICTION_TYPES]
DDIM_CASES = [dict(prediction_type=p, eta=e, **c) for p in PREDICTION_TYPES for e in (0.0, 0.5, 1.0)
              for c in (dict(), dict(clip_sample=True),
                        dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0))] + \
    [dict(prediction_type=p, eta=0.5, clip_sample=True, use_clipped_model_output=True,
          set_alpha_to_one=False) for p in PREDICTION_TYPES] + \
    [dict(prediction_type="v_prediction", eta=1.0, clip_sample=True, clip_sample_range=2.0)]


def _case_id(c):
    return "-".join(f"{k[:4]}={v}" for k, v in c.items())


def _diffusers_options(case):
    """The scheduler options both DDPMScheduler and DDIMScheduler take, from a test case."""
    return dict(prediction_type=case["prediction_type"], clip_sample=case.get("clip_sample", False),
                thresholding=case.get("thresholding", False),
                dynamic_thresholding_ratio=case.get("dynamic_thresholding_ratio", 0.995),
                sample_max_value=case.get("sample_max_value", 1.0),
                clip_sample_range=case.get("clip_sample_range", 1.0))


def _diffusers_ddpm(case, x, mo, t, tp, noise, double, monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.schedulers import scheduling_ddpm
    var = case["variance_type"]
    # diffusers' fixed_large_log takes sqrt(log beta) = NaN; GLIDE's meaning is fixed_large's std
    var = "fixed_large" if var == "fixed_large_log" else var
    sched = diffusers.DDPMScheduler(
        num_train_timesteps=T, beta_schedule="linear", variance_type=var,
        **_diffusers_options(case))
    dt = torch.float64 if double else torch.float32
    if double:
        sched.alphas_cumprod = sched.alphas_cumprod.double()
        sched.one = torch.tensor(1.0, dtype=torch.float64)
    outs = []
    for b in range(x.shape[0]):
        tb, pb = int(t[b]), int(tp[b])
        sched.set_timesteps(timesteps=[tb, pb] if pb >= 0 else [tb])
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor",
                            lambda *a, _n=noise[b:b + 1].to(dt), **k: _n)
        outs.append(sched.step(mo[b:b + 1].to(dt), tb, x[b:b + 1].to(dt)).prev_sample)
    return sched, torch.cat(outs)


def _diffusers_ddim(case, x, mo, t, step, noise, double):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=T, beta_schedule="linear",
        set_alpha_to_one=case.get("set_alpha_to_one", True), **_diffusers_options(case))
    dt = torch.float64 if double else torch.float32
    if double:
        sched.alphas_cumprod = sched.alphas_cumprod.double()
        sched.final_alpha_cumprod = sched.final_alpha_cumprod.double()
    sched.set_timesteps(T // step)
    # the last step (t - step < 0) adds no noise in fastdiff; diffusers adds some there when
    # set_alpha_to_one=False and eta > 0: give it zero noise for that step
    outs = [sched.step(mo[b:b + 1].to(dt), int(t[b]), x[b:b + 1].to(dt), eta=case["eta"],
                       use_clipped_model_output=case.get("use_clipped_model_output", False),
                       variance_noise=noise[b:b + 1].to(dt) * (int(t[b]) - step >= 0)).prev_sample
            for b in range(x.shape[0])]
    return sched, torch.cat(outs)


def _parity_inputs(learned=False, seed=12):
    g = torch.Generator().manual_seed(seed)
    C = 3
    x = torch.randn(4, C, 4, 5, generator=g)
    mo = torch.randn(4, 2 * C if learned else C, 4, 5, generator=g)
    if learned:
        _fill_variance(mo, C, learned, g)
    return x, mo, torch.randn(4, C, 4, 5, generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", DDPM_CASES, ids=_case_id)
def test_ddpm_parity_with_diffusers(backend, case, monkeypatch):
    v = case["variance_type"]
    x, mo, noise = _parity_inputs(v if v in LEARNED else False)
    t, tp = torch.tensor([0, 4, 501, 999]), torch.tensor([-1, 1, 500, 950])
    sched, want = _diffusers_ddpm(case, x, mo, t, tp, noise.double(), True, monkeypatch)
    ours = fastdiff.Schedule.from_alphas_cumprod(sched.alphas_cumprod)
    with fastdiff.use_backend(backend):
        got = fastdiff.sampler_step(x.to(DEVICE), mo.to(DEVICE), t.to(DEVICE), tp.to(DEVICE), ours,
                                    noise=noise.to(DEVICE), kind="ddpm", **case)
    _close(got, want, 1e-6, f"{backend} vs diffusers float64")
    # diffusers' own float32 step (measured 2e-5 off its float64 step on these cases)
    _, want32 = _diffusers_ddpm(case, x, mo, t, tp, noise, False, monkeypatch)
    _close(got, want32, 1e-4, f"{backend} vs diffusers float32")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", DDIM_CASES, ids=_case_id)
def test_ddim_parity_with_diffusers(backend, case):
    x, mo, noise = _parity_inputs(seed=13)
    step = 20  # T // num_inference_steps: diffusers derives t_prev = t - step
    t = torch.tensor([999, 501, 21, 15])
    tp = t - step  # negative for the last steps (-5): the final step, as diffusers' -1
    sched, want = _diffusers_ddim(case, x, mo, t, step, noise.double(), True)
    ours = fastdiff.Schedule.from_alphas_cumprod(sched.alphas_cumprod)
    with fastdiff.use_backend(backend):
        got = fastdiff.sampler_step(x.to(DEVICE), mo.to(DEVICE), t.to(DEVICE), tp.to(DEVICE), ours,
                                    noise=noise.to(DEVICE), kind="ddim", **case)
    _close(got, want, 1e-6, f"{backend} vs diffusers float64")
    _, want32 = _diffusers_ddim(case, x, mo, t, step, noise, False)
    _close(got, want32, 1e-4, f"{backend} vs diffusers float32")


def test_diffusers_fixed_large_log_is_nan():
    """Why fixed_large_log is compared with diffusers' fixed_large above: diffusers' own step
    returns sqrt(log(beta_t)) * noise, NaN for every beta_t < 1."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(variance_type="fixed_large_log")
    out = sched.step(torch.randn(1, 2, 3), 500, torch.randn(1, 2, 3)).prev_sample
    assert torch.isnan(out).all()


# -- the rest of the contract ---------------------------------------------------------------

def test_float64_runs_reference(schedule):
    x, mo, t, tp, noise = _inputs(SHAPE, *T_PAIRS, dtype=torch.float64, seed=14)
    out = fastdiff.sampler_step(x, mo, t, tp, schedule, noise=noise)
    assert out.dtype == torch.float64
    ref = _ref(schedule, x, mo, t, tp, noise)
    assert torch.allclose(out.cpu(), ref, rtol=0, atol=1e-13)


def test_int_timesteps_broadcast(schedule):
    x, mo, _, _, noise = _inputs((2, 3, 4), [0, 0], [0, 0], seed=15)
    a = fastdiff.sampler_step(x, mo, 400, 380, schedule, noise=noise, kind="ddim", eta=0.3)
    b = fastdiff.sampler_step(x, mo, torch.tensor([400, 400]), torch.tensor([380, 380]),
                              schedule, noise=noise, kind="ddim", eta=0.3)
    assert torch.equal(a, b)


def test_compile_fullgraph_reference_backend(schedule):
    x, mo, t, tp, noise = _inputs(SHAPE, *T_PAIRS, seed=16)
    f = torch.compile(lambda a, m, n, tt, pp: fastdiff.sampler_step(
        a, m, tt, pp, schedule, noise=n, kind="ddim", eta=0.5, thresholding=True,
        sample_max_value=2.0), fullgraph=True, backend="eager")
    with fastdiff.use_backend("torch"):
        got = f(x, mo, noise, t, tp)
    _close(got, _ref(schedule, x, mo, t, tp, noise, kind="ddim", eta=0.5, thresholding=True,
                     sample_max_value=2.0), 2e-6)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "cuda")])
@pytest.mark.parametrize("learned", [False, True])
def test_ext_op_needs_noise_false_means_no_noise_term(backend, learned, schedule):
    """The extension op's contract, on every device it is built for: needs_noise=False gives no
    noise term, whether noise is given or not (the CUDA kernel once added a given noise anyway,
    and drew noise for learned_range). On the CPU under every compiled instruction set: 189
    elements a sample take each variant's vector loop and its scalar tail (AVX2 once rounded
    the two calls differently, its compiler fusing a different multiply-add in each)."""
    x, mo, t, tp, noise = _inputs((4, 3, 7, 9), [3, 500, 999, 10], [2, 480, 979, 9],
                                  learned=learned)
    ps = x[0].numel()
    bs, inner, rs, var_off = (2 * ps, ps, 2 * ps, ps) if learned else (ps, ps, ps, 0)
    ab = schedule.table("alphas_cumprod", x.device, torch.float64)
    args = (0, 0, 4 if learned else 0, 0.0, 0, 1.0, True, False, bs, inner, rs, var_off)

    def run(nz, needs_noise):
        out, x0 = torch.empty_like(x), x.new_empty(0)
        torch.ops.fastdiff_ext.sampler_step(x, mo, t, tp, ab, nz, None, 7, None, 0, None,
                                            needs_noise, *args, 0, 1.0, None, out, x0)
        return out

    import fastdiff._C as C
    for cap in C.cpu_capabilities() if backend == "cpu" else [""]:
        C.set_cpu_capability(cap)
        try:
            mean = run(torch.zeros_like(x), True)  # + std * 0
            assert torch.equal(run(noise, False), mean), cap
            assert torch.equal(run(None, False), mean), cap
        finally:
            C.set_cpu_capability("")


def test_kernel_clamps_unchecked_t(schedule, monkeypatch):
    """With checks off (as inside a CUDA graph), out-of-range t / t_prev read the table's ends
    (t_prev < 0 stays the final step)."""
    monkeypatch.setenv("FASTDIFF_CHECKS", "0")
    x, mo, _, _, noise = _inputs((2, 8), [0, 0], [0, 0], seed=17)
    for backend in BACKENDS:
        with fastdiff.use_backend(backend):
            got = fastdiff.sampler_step(x, mo, torch.tensor([-5, 5000], device=DEVICE),
                                        torch.tensor([-7, 4000], device=DEVICE), schedule,
                                        noise=noise, kind="ddim", eta=0.5)
        want = _ref(schedule, x, mo, torch.tensor([0, 999]), torch.tensor([-1, 999]), noise,
                    kind="ddim", eta=0.5)
        _close(got, want, 2e-6, backend)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(t=torch.tensor([0, 1000])), ValueError, r"t has values in \[0, 1000\], outside \[0, 1000\)"),
    (dict(t=torch.tensor([-1, 3])), ValueError, "outside"),
    (dict(t_prev=torch.tensor([-2, 1000])), ValueError,
     r"t_prev has values in \[-2, 1000\], outside \(-inf, 1000\) \(any negative value is the final step\)"),
    (dict(t_prev=1000), ValueError, r"t_prev=1000 is out of range"),
    (dict(t=torch.tensor([1, 2, 3])), ValueError, r"t must have shape \(2,\)"),
    (dict(t_prev=torch.tensor([1.0, 2.0])), TypeError, "t_prev must be an integer tensor"),
    (dict(model_output=torch.randn(2, 3, 4, 5)), ValueError, "model_output must have the shape of x_t"),
    (dict(variance_type="learned_range"), ValueError, r"model_output must have 2\*C = 6 channels"),
    (dict(model_output=torch.randn(2, 6, 4, 4)), ValueError, "model_output must have the shape"),
    (dict(model_output=torch.randn(2, 3, 4, 4, dtype=torch.float64)), TypeError,
     "model_output must have the dtype of x_t"),
    (dict(model_output=torch.ones(2, 3, 4, 4, dtype=torch.int32)), TypeError,
     "model_output must be a floating tensor"),
    (dict(noise=torch.randn(2, 3, 4, 5)), ValueError, "noise must have the shape of x_t"),
    (dict(noise=torch.randn(2, 3, 4, 4), seed=1), ValueError, "either noise or seed"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(kind="euler"), ValueError, "kind must be one of"),
    (dict(prediction_type="eps"), ValueError, "prediction_type must be one of"),
    (dict(variance_type="learned_var"), ValueError, "variance_type must be one of"),
    (dict(variance_type="learned"), ValueError, r"model_output must have 2\*C = 6 channels"),
    (dict(kind="ddim", variance_type="learned", model_output=torch.randn(2, 6, 4, 4)),
     ValueError, "'learned' needs kind='ddpm'"),
    (dict(guidance_scale=2.0), ValueError,
     r"model_output must have batch 2\*B = 4 \(\[unconditional; conditional\] halves\) for "
     r"guidance_scale: expected shape \(4, 3, 4, 4\), got \(2, 3, 4, 4\)"),
    (dict(guidance_scale=2.0, variance_type="learned", model_output=torch.randn(4, 3, 4, 4)),
     ValueError, r"batch 2\*B = 4 .* and 2\*C = 6 channels .* expected shape \(4, 6, 4, 4\)"),
    (dict(guidance_scale="2"), TypeError, "guidance_scale must be a number"),
    (dict(guidance_scale=float("nan")), ValueError, "guidance_scale must be finite"),
    (dict(guidance_scale=torch.tensor([1.0, 2.0]), model_output=torch.randn(4, 3, 4, 4)),
     ValueError, "guidance_scale must be a floating tensor of 1 element"),
    (dict(guidance_scale=torch.tensor(2), model_output=torch.randn(4, 3, 4, 4)), TypeError,
     "guidance_scale must be a floating tensor"),
    (dict(guidance_scale=torch.tensor(2.0, device="meta"), model_output=torch.randn(4, 3, 4, 4)),
     ValueError, "guidance_scale is on meta but the data is on cpu"),
    (dict(seed=torch.tensor(1.0)), TypeError, "seed must be an integer tensor"),
    (dict(first_index=-3), ValueError, r"first_index must be in \[0, 2\^32 - B\]"),
    (dict(first_index=2 ** 32 - 1), ValueError, "first_index must be in"),
    (dict(first_index="0"), TypeError, "first_index must be an int"),
    (dict(first_index=torch.tensor([1, 2])), ValueError, "first_index must be an integer tensor of 1 element"),
    (dict(eta=-0.1, kind="ddim"), ValueError, "eta must be finite and >= 0"),
    (dict(eta="1"), TypeError, "eta must be a number"),
    (dict(clip_sample=True, thresholding=True), ValueError, "clip_sample and thresholding are exclusive"),
    (dict(kind="ddim", variance_type="learned_range",
          model_output=torch.randn(2, 6, 4, 4)), ValueError, "learned_range.*needs kind='ddpm'"),
    (dict(dynamic_thresholding_ratio=1.5), ValueError, "dynamic_thresholding_ratio"),
    (dict(clip_sample_range=0.0), ValueError, "clip_sample_range"),
    (dict(schedule="linear"), TypeError, "schedule must be a fastdiff.Schedule"),
    (dict(x_t=torch.ones(2, 3, dtype=torch.int64)), TypeError, "x_t must be a floating tensor"),
    (dict(t_prev=torch.tensor([[0, 1]])), ValueError, r"t_prev must have shape \(2,\)"),
    (dict(t_prev=torch.tensor([0, 2])), ValueError,
     r"kind='ddpm' needs t_prev < t \(a step towards t = 0\): got t_prev=2 >= t=2 for sample 1"),
    (dict(t_prev=5), ValueError, r"t_prev=5 >= t=1 for sample 0"),
    (dict(t=5, t_prev=10), ValueError, r"t_prev=10 >= t=5 for sample 0"),
    (dict(t=torch.tensor(5), t_prev=torch.tensor(5)), ValueError, r"t_prev=5 >= t=5 for sample 0"),
    (dict(x_t=torch.randn(2), model_output=torch.randn(4), variance_type="learned_range"),
     ValueError, "learned_range' needs x_t with a channel dim"),
    (dict(sample_max_value=0.0, thresholding=True), ValueError, "sample_max_value"),
])
def test_errors(kwargs, err, match, schedule):
    args = dict(x_t=torch.randn(2, 3, 4, 4), model_output=torch.randn(2, 3, 4, 4),
                t=torch.tensor([1, 2]), t_prev=torch.tensor([0, 1]), schedule=schedule)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        fastdiff.sampler_step(**args)


def test_device_mismatch(schedule):
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="model_output is on meta but x_t is on cpu"):
        fastdiff.sampler_step(x, torch.randn(2, 3, device="meta"), 5, 4, schedule)
    with pytest.raises(ValueError, match="noise is on meta"):
        fastdiff.sampler_step(x, x, 5, 4, schedule, noise=torch.randn(2, 3, device="meta"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddim_inversion_step(backend, schedule):
    # only ddpm's posterior needs t_prev < t: ddim from t to a later t_prev is the deterministic
    # inversion x' = sqrt(ab') x0 + sqrt(1 - ab') eps (its variance would be < 0: no noise)
    x, mo, _, _, _ = _inputs((2, 3, 4), [0, 0], [0, 0], seed=30)
    with fastdiff.use_backend(backend):
        out = fastdiff.sampler_step(x, mo, torch.tensor([400, 7], device=DEVICE),
                                    torch.tensor([420, 7], device=DEVICE), schedule, kind="ddim",
                                    eta=1.0, seed=3)
    ab = schedule.alphas_cumprod
    x0 = (x.double().cpu() - (1 - ab[400]).sqrt() * mo.double().cpu()) / ab[400].sqrt()
    want0 = ab[420].sqrt() * x0[0] + (1 - ab[420]).sqrt() * mo[0].double().cpu()
    _close(out[0], want0, 2e-6, backend)
    _close(out[1], x[1], 2e-6, backend)  # t_prev = t: the identity


def test_device_mismatch_of_timesteps(schedule):
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="t is on meta but the data is on cpu"):
        fastdiff.sampler_step(x, x, torch.tensor([5, 5], device="meta"), 4, schedule)
    with pytest.raises(ValueError, match="t_prev is on meta but the data is on cpu"):
        fastdiff.sampler_step(x, x, 5, torch.tensor([4, 4], device="meta"), schedule)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", [dict(kind="ddpm", variance_type=v) for v in VARIANCE_TYPES] +
                         [dict(kind="ddim", eta=1.0, set_alpha_to_one=False),
                          dict(kind="ddim", eta=0.7)], ids=_case_id)
def test_last_step_adds_no_noise(backend, opts, schedule):
    """t_prev < 0 is the last step: no noise, whatever t, seed or given noise (diffusers' DDPM
    would add noise for t > 0, and its DDIM with set_alpha_to_one=False and eta > 0)."""
    v = opts.get("variance_type")
    x, mo, t, tp, noise = _inputs(SHAPE_ODD, [10, 500, 999, 1], [-1, -20, -1, -7],
                                  learned=v if v in LEARNED else False,
                                  seed=31)
    with fastdiff.use_backend(backend):
        a = fastdiff.sampler_step(x, mo, t, tp, schedule, seed=1, **opts)
        b = fastdiff.sampler_step(x, mo, t, tp, schedule, seed=2, **opts)
        c = fastdiff.sampler_step(x, mo, t, tp, schedule, noise=noise, **opts)
    assert torch.equal(a, b) and torch.equal(a, c)
    _close(a, _ref(schedule, x, mo, t, tp, None, **opts), 2e-6, backend)


def test_learned_range_t_equal_t_prev_stays_finite(schedule, monkeypatch):
    """Unchecked (as inside a CUDA graph), t = 5000 and t_prev = 4000 both clamp to 999: beta = 0,
    whose log once made the learned log-variance NaN for negative predicted variances."""
    monkeypatch.setenv("FASTDIFF_CHECKS", "0")
    x, mo, _, _, noise = _inputs((2, 3, 4), [0, 0], [0, 0], learned=True, seed=32)
    want = _ref(schedule, x, mo, torch.tensor([999, 7]), torch.tensor([999, 7]), noise,
                variance_type="learned_range")
    assert torch.isfinite(want).all()
    for backend in BACKENDS:
        with fastdiff.use_backend(backend):
            got = fastdiff.sampler_step(x, mo, torch.tensor([5000, 7], device=DEVICE),
                                        torch.tensor([4000, 7], device=DEVICE), schedule,
                                        noise=noise, variance_type="learned_range")
        _close(got, want, 2e-6, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4)])
def test_empty(backend, shape, schedule):
    x = torch.randn(shape, device=DEVICE)
    B = shape[0]
    t = torch.full((B,), 5, device=DEVICE)
    with fastdiff.use_backend(backend):
        for opts in (dict(), dict(thresholding=True), dict(kind="ddim", eta=1.0)):
            out = fastdiff.sampler_step(x, x, t, t - 1, schedule, **opts)
            assert out.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_learned_range_with_thresholding(backend, channels_last, schedule):
    # the thresholding pass reads model_output[:, :C] of a 2C-channel output, in both layouts
    x, mo, t, tp, noise = _inputs((2, 3, 5, 3), [700, 9], [600, 8], learned=True, seed=33,
                                  channels_last=channels_last)
    opts = dict(variance_type="learned_range", thresholding=True, dynamic_thresholding_ratio=0.8,
                sample_max_value=1.5)
    with fastdiff.use_backend(backend):
        got = fastdiff.sampler_step(x, mo, t, tp, schedule, noise=noise, **opts)
    _close(got, _ref(schedule, x, mo, t, tp, noise, **opts), 2e-6, backend)


# -- GPU only --------------------------------------------------------------------------------

@pytest.mark.gpu
def test_inside_cuda_graph_same_output(gpu_backend, schedule):
    """Captured (per-sample CUDA t, noise drawn in the kernel, thresholding's device quantile)
    and replayed: no host sync, and the same result as an eager call."""
    x, mo, _, _, _ = _inputs((8, 3, 32, 32), [0] * 8, [0] * 8, seed=40)
    t = torch.randint(1, 1000, (8,), device="cuda")
    opts = dict(seed=5, thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0)
    with fastdiff.use_backend(gpu_backend):
        eager = fastdiff.sampler_step(x, mo, t, t - 1, schedule, **opts)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fastdiff.sampler_step(x, mo, t, t - 1, schedule, **opts)
        g.replay()
        torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_timesteps_inside_capture_is_a_clear_error(schedule):
    x = torch.randn(2, 3, 8, device="cuda")
    g = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="t is a CPU tensor while a CUDA graph is being captured"):
        with torch.cuda.graph(g):
            fastdiff.sampler_step(x, x, torch.tensor([5, 6]), torch.tensor([4, 5], device="cuda"),
                                  schedule, seed=1)


@pytest.mark.gpu
def test_triton_and_cuda_noise_bitwise(schedule):
    """Both GPU backends draw the same bits (same Philox, same correctly rounded sqrt)."""
    if not (fastdiff.backends.available("triton") and fastdiff.backends.available("cuda")):
        pytest.skip("needs both GPU backends")
    z = {b: _noise_of(schedule, 500, 10 ** 6, backend=b) for b in ("triton", "cuda")}
    assert torch.allclose(z["triton"], z["cuda"], rtol=0, atol=1e-6)
    print(f"bitwise equal: {torch.equal(z['triton'], z['cuda'])}")


@pytest.mark.gpu
def test_gpu_over_2_31_elements(gpu_backend, schedule):
    """64-bit indexing: x_t of 2^31 + 12 fp16 elements (3 x 4.3 GB), checked at the far end."""
    from fastdiff.reference import philox_normal
    B, per = 2, 2 ** 30 + 6
    x = torch.ones(B, per, device="cuda", dtype=torch.float16)
    mo = torch.full_like(x, 0.5)
    t = torch.tensor([10, 900], device="cuda")
    with fastdiff.use_backend(gpu_backend):
        out = fastdiff.sampler_step(x, mo, t, t - 1, schedule, seed=11)
    tail = 4096
    start = B * per - tail
    z = philox_normal(11, 900, STREAM_SAMPLER_STEP, tail, image=1, start=per - tail)
    want = _ref(schedule, x[1:, -tail:], mo[1:, -tail:], t[1:], t[1:] - 1, z.view(1, tail))
    assert_close(out[1:, -tail:], want, torch.float16)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_second_gpu(backend, schedule):
    """Tensors on cuda:1 while cuda:0 is current: each kernel runs on its tensors' device."""
    if not fastdiff.backends.available(backend):
        pytest.skip(f"{backend} not available")
    x, mo, t, tp, noise = (a.to("cuda:1") for a in _inputs(SHAPE_ODD, *T_PAIRS, seed=41))
    with torch.cuda.device(0), fastdiff.use_backend(backend):
        got = fastdiff.sampler_step(x, mo, t, tp, schedule, noise=noise)
    _close(got, _ref(schedule, x, mo, t, tp, noise), 1e-6, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_beyond_one_grid_axis(backend, schedule, monkeypatch):
    """More samples than grid axis 1 holds (65535): Triton launches the batch in slices from an
    offset (shrunk to 3 here: 7 samples, three launches); CUDA strides over samples."""
    if backend == "triton":
        import fastdiff.kernels.sampler_step as ks
        monkeypatch.setattr(ks, "MAX_GRID_Y", 3)
    x, mo, t, tp, _ = _inputs((7, 3, 5), [9, 500, 999, 1, 30, 700, 2],
                              [8, 480, 979, -1, 29, 699, 1], seed=42)
    with fastdiff.use_backend(backend):
        got = fastdiff.sampler_step(x, mo, t, tp, schedule, seed=8)
    z = memory_order_normal(8, t.cpu(), STREAM_SAMPLER_STEP, x.double().cpu())
    _close(got, _ref(schedule, x, mo, t, tp, z), 1e-6, backend)



@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_coefficients_over_many_samples(backend, kind, schedule):
    """37 samples, each its own t and t_prev (some final steps, t = 0 once): the Triton pre-pass
    computes 32 samples' coefficient rows per program, so this spans a full and a partial one,
    and each sample must read its own row (noise flag and t included)."""
    g = torch.Generator().manual_seed(44)
    t = torch.randint(1, 1000, (37,), generator=g)
    tp = (t - torch.randint(1, 40, (37,), generator=g)).clamp(min=-1)
    t[5], tp[5] = 0, -1
    tp[::7] = -1
    x, mo, t, tp, _ = _inputs((37, 3, 5), t.tolist(), tp.tolist(), seed=45)
    kw = dict(kind=kind, clip_sample=True, eta=0.7 if kind == "ddim" else 0.0)
    with fastdiff.use_backend(backend):
        got = fastdiff.sampler_step(x, mo, t, tp, schedule, seed=10, **kw)
    z = memory_order_normal(10, t.cpu(), STREAM_SAMPLER_STEP, x.double().cpu())
    _close(got, _ref(schedule, x, mo, t, tp, z, **kw), 1e-6, backend)

@pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton backend is not available")
@pytest.mark.parametrize("seed", [2 ** 40 + 3, "tensor"])
def test_triton_tiles_per_program_same_bits(seed, schedule, monkeypatch):
    """Triton's grid: one tile per program (straight-line code, ONE_TILE) or programs looping
    over tiles p, p + P, ... (P shrunk here through PROGRAMS / MAX_TILES): 3081 elements a
    sample are 4 tiles of 256 Philox groups, the last one partial. Every split draws the same
    bits, and they are the reference's; with the seed as an int (round keys passed to the
    kernel) and as a device tensor (round keys formed in it)."""
    import fastdiff.kernels.sampler_step as ks
    x, mo, t, tp, _ = _inputs((2, 3, 1027), [640, 7], [620, -1], seed=46)
    sd = torch.tensor(12345, device=DEVICE) if seed == "tensor" else seed
    kw = dict(kind="ddim", eta=0.8, clip_sample=True)
    outs = []
    for programs, max_tiles in ((1024, 8), (1, 8), (1, 2)):  # P = 4 (one tile), 1, 2
        monkeypatch.setattr(ks, "PROGRAMS", programs)
        monkeypatch.setattr(ks, "MAX_TILES", max_tiles)
        assert ks.plan(2, 3081)[2] == {1024: 4, 8: 1, 2: 2}[max_tiles if programs == 1 else 1024]
        with fastdiff.use_backend("triton"):
            outs.append(fastdiff.sampler_step(x, mo, t, tp, schedule, seed=sd, **kw))
    z = memory_order_normal(int(sd), t.cpu(), STREAM_SAMPLER_STEP, x.double().cpu())
    _close(outs[0], _ref(schedule, x, mo, t, tp, z, **kw), 2e-6, "triton")
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


@pytest.mark.gpu
def test_gpu_batch_over_65535(gpu_backend, schedule):
    x, mo, _, _, _ = _inputs((70000, 2), [0] * 70000, [0] * 70000, seed=43)
    t = torch.randint(1, 1000, (70000,), device="cuda")
    with fastdiff.use_backend(gpu_backend):
        got = fastdiff.sampler_step(x, mo, t, t - 1, schedule, seed=9)
    z = memory_order_normal(9, t.cpu(), STREAM_SAMPLER_STEP, x.double().cpu())
    _close(got, _ref(schedule, x, mo, t, t - 1, z), 1e-6, gpu_backend)


# -- issue 11: guidance, any negative t_prev, noise per image, device-tensor keys -------------

GUIDED_CASES = [
    dict(kind="ddpm", prediction_type="epsilon", variance_type="fixed_small"),
    dict(kind="ddpm", prediction_type="v_prediction", variance_type="learned"),
    dict(kind="ddpm", prediction_type="sample", variance_type="learned_range", clip_sample=True),
    dict(kind="ddim", prediction_type="epsilon", eta=0.5, thresholding=True,
         dynamic_thresholding_ratio=0.9, sample_max_value=2.0),
    dict(kind="ddim", prediction_type="v_prediction", eta=0.0),
]


def _two_pass(schedule, x, mo, t, tp, noise, w, opts):
    """The unfused formula: guided = u + w (c - u) in float64 (a learned variance from the cond
    half), then the plain step."""
    C = x.shape[1]
    u, c = mo.double().cpu().chunk(2)
    v = opts.get("variance_type")
    if v in LEARNED and opts.get("kind", "ddpm") == "ddpm":
        guided = torch.cat([u[:, :C] + w * (c[:, :C] - u[:, :C]), c[:, C:]], 1)
    else:
        guided = u + w * (c - u)
    return _ref(schedule, x, guided, t, tp, noise, **opts)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", GUIDED_CASES, ids=_case_id)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_guidance_matches_two_pass_formula(backend, opts, layout, schedule):
    v = opts.get("variance_type")
    x, mo, t, tp, noise = _inputs(SHAPE_ODD, [1, 200, 600, 999], [-1, 150, 599, 900],
                                  learned=v if v in LEARNED else False, seed=50, guided=True,
                                  channels_last=layout == "channels_last")
    w = 3.5
    with fastdiff.use_backend(backend):
        got, x0 = fastdiff.sampler_step(x, mo, t, tp, schedule, noise=noise, guidance_scale=w,
                                        return_x0=True, **opts)
        got_t = fastdiff.sampler_step(x, mo, t, tp, schedule, noise=noise,
                                      guidance_scale=torch.tensor(w, device=DEVICE), **opts)
        drawn = fastdiff.sampler_step(x, mo, t, tp, schedule, seed=6, first_index=3,
                                      guidance_scale=w, **opts)
    want = _two_pass(schedule, x, mo, t, tp, noise, w, {**opts, "return_x0": True})
    _close(got, want[0], 2e-6, f"{backend} x_prev")
    _close(x0, want[1], 2e-6, f"{backend} x0")
    assert torch.equal(got, got_t), "a tensor guidance scale must equal the float"
    z = memory_order_normal(6, t.cpu(), STREAM_SAMPLER_STEP, x.double().cpu(), 3)
    _close(drawn, _two_pass(schedule, x, mo, t, tp, z, w, opts), 2e-6, f"{backend} drawn")
    # w = 0 is the unconditional half alone, w = 1 the conditional half alone
    for w1, half in ((0.0, 0), (1.0, 1)):
        with fastdiff.use_backend(backend):
            g1 = fastdiff.sampler_step(x, mo, t, tp, schedule, noise=noise, guidance_scale=w1,
                                       **opts)
        B = x.shape[0]
        one = mo[half * B:(half + 1) * B]
        if v in LEARNED and w1 == 0.0:  # the variance still comes from the cond half
            one = torch.cat([one[:, :x.shape[1]], mo[B:, x.shape[1]:]], 1)
        _close(g1, _ref(schedule, x, one, t, tp, noise, **opts), 2e-6, f"{backend} w={w1}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_guidance_half_dtype(backend, schedule):
    x, mo, t, tp, noise = _inputs(SHAPE, *T_PAIRS, learned="learned", seed=51, guided=True,
                                  dtype=torch.bfloat16)
    opts = dict(variance_type="learned")
    with fastdiff.use_backend(backend):
        got = fastdiff.sampler_step(x, mo, t, tp, schedule, noise=noise, guidance_scale=2.0, **opts)
    want = _two_pass(schedule, x, mo, t, tp, noise, 2.0, opts)
    assert_close(got, want, torch.bfloat16, scale=float(want.abs().max()), msg=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_any_negative_t_prev_is_the_final_step(backend, schedule):
    """diffusers' DDIM steps to t - T//n, e.g. -20: the same as -1 on every backend."""
    x, mo, t, _, noise = _inputs(SHAPE, [15, 5, 19, 1], [0] * 4, seed=52)
    for opts in (dict(kind="ddim", eta=1.0, set_alpha_to_one=False), dict(kind="ddim"),
                 dict(kind="ddpm", variance_type="fixed_large")):
        with fastdiff.use_backend(backend):
            a = fastdiff.sampler_step(x, mo, t, t - 20, schedule, seed=1, **opts)
            b = fastdiff.sampler_step(x, mo, t, -1, schedule, seed=2, **opts)
            c = fastdiff.sampler_step(x, mo, t, -20, schedule, noise=noise, **opts)
        assert torch.equal(a, b) and torch.equal(a, c), opts
        _close(a, _ref(schedule, x, mo, t, torch.full((4,), -1), None, **opts), 2e-6, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_image", [(3, 5, 3), (2, 4, 4)])
def test_noise_is_per_image_whatever_the_batch(backend, per_image, schedule):
    """Image 12's step (t = 321 -> 320) from batches of 1, 7 and 64, at positions 0 and 5
    (first_index 12 and 7): the same bits, equal to the reference's."""
    g = torch.Generator().manual_seed(53)
    x1, m1 = (torch.randn((1,) + per_image, generator=g).to(DEVICE) for _ in range(2))
    opts = dict(kind="ddpm", variance_type="fixed_large")
    z = memory_order_normal(31, 321, STREAM_SAMPLER_STEP, x1.double().cpu(), 12)
    want = _ref(schedule, x1, m1, torch.tensor([321]), torch.tensor([320]), z, **opts)[0]
    got = []
    for B, pos in ((1, 0), (7, 0), (7, 5), (64, 5)):
        x = torch.randn((B,) + per_image, device=DEVICE)
        mo = torch.randn((B,) + per_image, device=DEVICE)
        x[pos], mo[pos] = x1[0], m1[0]
        t = torch.randint(2, 1000, (B,), device=DEVICE)
        t[pos] = 321
        with fastdiff.use_backend(backend):
            out = fastdiff.sampler_step(x, mo, t, t - 1, schedule, seed=31, first_index=12 - pos,
                                        **opts)
        got.append(out[pos].cpu())
    _close(got[0], want, 2e-6, backend)
    for o in got[1:]:
        assert torch.equal(o, got[0]), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_device_tensor_seed_and_first_index_equal_ints(backend, schedule):
    x, mo, t, tp, _ = _inputs(SHAPE_ODD, *T_PAIRS, learned="learned", seed=54, guided=True)
    opts = dict(variance_type="learned", guidance_scale=1.5)
    for seed, first in ((5, 0), (2 ** 63 + 1, 2 ** 31 + 7)):
        s64 = seed & (2 ** 64 - 1)
        seed_t = torch.tensor(s64 - 2 ** 64 if s64 >= 2 ** 63 else s64, device=DEVICE)
        with fastdiff.use_backend(backend):
            a = fastdiff.sampler_step(x, mo, t, tp, schedule, seed=seed, first_index=first, **opts)
            b = fastdiff.sampler_step(x, mo, t, tp, schedule, seed=seed_t,
                                      first_index=torch.tensor([first], device=DEVICE), **opts)
        assert torch.equal(a, b), (backend, seed, first)
        z = memory_order_normal(seed, t.cpu().clamp(0, T - 1), STREAM_SAMPLER_STEP,
                                x.double().cpu(), first)
        _close(a, _two_pass(schedule, x, mo, t, tp, z, 1.5, dict(variance_type="learned")),
               2e-6, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_learned_parity_with_diffusers_guided(backend, monkeypatch):
    """variance_type="learned" with guidance against diffusers' DDPMScheduler on the two-pass
    output (the variance channels of the cond half, as diffusers' pipelines do)."""
    g = torch.Generator().manual_seed(55)
    x = torch.randn(4, 3, 4, 5, generator=g)
    mo = torch.randn(8, 6, 4, 5, generator=g)
    _fill_variance(mo, 3, "learned", g)
    noise = torch.randn(4, 3, 4, 5, generator=g)
    t, tp = torch.tensor([0, 4, 501, 999]), torch.tensor([-1, 3, 500, 998])
    u, c = mo.double().chunk(2)
    guided = torch.cat([u[:, :3] + 4.0 * (c[:, :3] - u[:, :3]), c[:, 3:]], 1)
    case = dict(prediction_type="epsilon", variance_type="learned")
    sched, want = _diffusers_ddpm(case, x, guided, t, tp, noise.double(), True, monkeypatch)
    ours = fastdiff.Schedule.from_alphas_cumprod(sched.alphas_cumprod)
    with fastdiff.use_backend(backend):
        got = fastdiff.sampler_step(x.to(DEVICE), mo.to(DEVICE), t.to(DEVICE), tp.to(DEVICE),
                                    ours, noise=noise.to(DEVICE), guidance_scale=4.0, **case)
    _close(got, want, 1e-6, f"{backend} vs diffusers float64")


@pytest.mark.gpu
def test_cuda_graph_replay_reads_seed_first_index_and_guidance(gpu_backend, schedule):
    """Captured once, replayed after seed_t / first_t / w_t .fill_(): the eager results of the
    new values (the kernels read them on the device)."""
    x, mo, _, _, _ = _inputs((4, 3, 16, 16), [0] * 4, [0] * 4, seed=56, guided=True)
    t = torch.randint(1, 1000, (4,), device="cuda")
    seed_t = torch.tensor(1, device="cuda")
    first_t = torch.tensor(0, device="cuda")
    w_t = torch.tensor(2.0, device="cuda")
    run = lambda s, f, w: fastdiff.sampler_step(x, mo, t, t - 1, schedule, seed=s, first_index=f,
                                                guidance_scale=w)
    with fastdiff.use_backend(gpu_backend):
        run(seed_t, first_t, w_t)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = run(seed_t, first_t, w_t)
        for s, f, w in ((1, 0, 2.0), (2, 0, 2.0), (2, 8, 2.0), (2, 8, 5.0)):
            seed_t.fill_(s)
            first_t.fill_(f)
            w_t.fill_(w)
            g.replay()
            eager = run(s, f, w)
            torch.cuda.synchronize()
            assert torch.equal(out, eager), (s, f, w)


# -- the CPU kernel's vectorized loop, per instruction set (issue 14) --------------------------

def _cpu_capabilities():
    try:
        import fastdiff._C as C
        return list(C.cpu_capabilities())
    except (ImportError, AttributeError):
        return []


@pytest.fixture(params=_cpu_capabilities() or ["none"])
def cpu_capability(request):
    if request.param == "none" or not fastdiff.backends.available("cpu"):
        pytest.skip("the C++ CPU kernels are not built")
    import fastdiff._C as C
    C.set_cpu_capability(request.param)
    yield request.param
    C.set_cpu_capability("")


VEC_CASES = [
    dict(kind="ddpm", variance_type="fixed_small", clip_sample=True),
    dict(kind="ddpm", variance_type="learned_range", prediction_type="v_prediction"),
    dict(kind="ddpm", variance_type="learned", thresholding=True, sample_max_value=2.0),
    dict(kind="ddpm", variance_type="fixed_large", prediction_type="sample", guided=True),
    dict(kind="ddpm", variance_type="learned", guided=True, clip_sample=True, clip_sample_range=1.5),
    dict(kind="ddim", eta=0.5, thresholding=True, dynamic_thresholding_ratio=0.9,
         sample_max_value=2.0, guided=True),
    dict(kind="ddim", eta=0.0, use_clipped_model_output=True, clip_sample=True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", VEC_CASES, ids=_case_id)
def test_cpu_vector_loop_every_capability(cpu_capability, dtype, case, schedule):
    """Samples of many vector blocks plus a scalar tail (3 x 17 x 9 = 459 elements), drawn and
    given noise, x0 returned: the vectorized loop of each compiled instruction set against the
    float64 reference (and the two-pass formula for guidance)."""
    case = dict(case)
    guided = case.pop("guided", False)
    v = case.get("variance_type")
    # t = 999 would amplify float32 rounding 156x (1/sqrt(ab)): every backend alike
    x, mo, t, tp, noise = _inputs((3, 3, 17, 9), [1, 500, 900], [0, 480, -20], dtype=dtype,
                                  learned=v if v in LEARNED else False, seed=60, guided=guided)
    w = 2.5 if guided else None
    with fastdiff.use_backend("cpu"):
        got, x0 = fastdiff.sampler_step(x, mo, t, tp, schedule, noise=noise, guidance_scale=w,
                                        return_x0=True, **case)
        drawn = fastdiff.sampler_step(x, mo, t, tp, schedule, seed=12, first_index=40,
                                      guidance_scale=w, **case)
    z = memory_order_normal(12, t, STREAM_SAMPLER_STEP, x.double(), 40)
    for out, nz, what in ((got, noise, "given"), (drawn, z, "drawn")):
        if guided:
            want = _two_pass(schedule, x, mo, t, tp, nz, w, {**case, "return_x0": True})
        else:
            want = _ref(schedule, x, mo, t, tp, nz, return_x0=True, **case)
        if dtype == torch.float32:
            # float32 rounding amplified by 1/sqrt(ab[900]) ~ 50 in x0 (every backend alike)
            _close(out, want[0], 2e-5, f"{cpu_capability} {what}")
            if what == "given":
                _close(x0, want[1], 2e-5, f"{cpu_capability} x0")
        else:
            assert_close(out, want[0], dtype, scale=float(want[0].abs().max()),
                         msg=f"{cpu_capability} {what}")


def test_cpu_same_bits_any_thread_count(schedule):
    if not fastdiff.backends.available("cpu"):
        pytest.skip("the C++ CPU kernels are not built")
    x, mo, t, tp, _ = _inputs((5, 3, 40, 40), [5, 50, 500, 900, 999], [4, 49, 499, 899, 998],
                              learned="learned", seed=61, guided=True)
    outs = []
    n = torch.get_num_threads()
    try:
        for threads in (1, 2, 3, 8):
            torch.set_num_threads(threads)
            with fastdiff.use_backend("cpu"):
                outs.append(fastdiff.sampler_step(x, mo, t, tp, schedule, seed=3,
                                                  variance_type="learned", guidance_scale=3.0))
    finally:
        torch.set_num_threads(n)
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", ["clip_sample", "thresholding", "clip_learned_cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clipping_keeps_nan(seed, backend, clip, dtype):
    # a diverged model (NaN prediction) must give NaN, as torch.clamp does, not an image clipped
    # to +-range: every other element is unaffected. (The Triton interpreter's minimum/maximum
    # are numpy's, which keep NaN either way: only a GPU run shows the Triton kernel's rule.)
    x = torch.randn(2, 3, 5, 7, device=DEVICE).to(dtype)
    m = torch.randn_like(x)
    m[1, 2, 3, 4] = float("nan")  # inside the CPU kernel's vector loop
    m[1, 2, 4, 6] = float("nan")  # the sample's last element: its scalar tail (shared with CUDA)
    kw = {"clip_sample": True} if clip != "thresholding" else {"thresholding": True}
    if clip == "clip_learned_cl":  # the CPU kernel's scalar path (the element code CUDA runs)
        x = x.contiguous(memory_format=torch.channels_last)
        m = torch.cat([m, torch.rand_like(m) * 2 - 1], 1).contiguous(
            memory_format=torch.channels_last)
        kw["variance_type"] = "learned_range"
    s = fastdiff.Schedule()
    t, tp = torch.tensor([500, 500], device=DEVICE), torch.tensor([499, 499], device=DEVICE)
    with fastdiff.use_backend(backend):
        out = fastdiff.sampler_step(x, m, t, tp, s, noise=torch.randn_like(x), **kw)
    nan = torch.isnan(out)
    if clip != "thresholding":
        assert nan[1, 2, 3, 4] and nan[1, 2, 4, 6] and nan.sum() == 2, f"{backend}: {nan.sum()}"
    else:  # the NaN enters sample 1's quantile too (torch.quantile's rule): sample 0 is finite
        assert nan[1, 2, 3, 4] and nan[1, 2, 4, 6] and not nan[0].any(), f"{backend}"
