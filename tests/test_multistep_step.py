"""multistep_step: the reference against an independent float64 statement of the formula, then
every backend against the reference (float64 on fresh random data, outputs poisoned), the state
updates (ring slot step % K, last_sample), noise given and drawn, and every documented error."""
import pytest
import torch

import fastdiff
from fastdiff.ops.multistep_step import (COEFS, IMPLEMENTED, MAX_ORDER, NCOEF, empty_ring,
                                         multistep_step_ref)
from fastdiff.ops.sampler_step import PREDICTION_TYPES
from fastdiff.reference import STREAM_MULTISTEP, memory_order_normal

from conftest import DEVICE, TOL, assert_close, backends_for

BACKENDS = backends_for("multistep_step", IMPLEMENTED)
S = 6  # rows of the coefficient tables here
SHAPE = (3, 4, 5, 4)      # 80 elements per sample: whole Philox groups
SHAPE_ODD = (2, 3, 7, 5)  # 105: the last group of each sample is short


def _coefs(seed=0, S=S, device=DEVICE):
    """A random float64 table: alpha in [0.3, 1), sigma in [0.1, 1), the rest in [-1, 1)."""
    g = torch.Generator().manual_seed(1000 + seed)
    c = torch.rand(S, NCOEF, generator=g, dtype=torch.float64) * 2 - 1
    c[:, 0] = 0.3 + 0.7 * torch.rand(S, generator=g, dtype=torch.float64)
    c[:, 1] = 0.1 + 0.9 * torch.rand(S, generator=g, dtype=torch.float64)
    return c.to(device)


def _inputs(shape, K, *, dtype=torch.float32, seed=0, guided=False, last=True,
            channels_last=False):
    """x_t, model_output, a filled ring, last_sample (or None), noise; fresh random data."""
    g = torch.Generator().manual_seed(seed)
    mo_shape = ((2 * shape[0],) + tuple(shape[1:])) if guided else shape
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    x = (2 * torch.randn(shape, generator=g)).to(DEVICE, dtype)  # x0 beyond the clip bounds
    mo = (2 * torch.randn(mo_shape, generator=g)).to(DEVICE, dtype)
    noise = torch.randn(shape, generator=g).to(DEVICE, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        mo = mo.to(memory_format=torch.channels_last)
    ring = empty_ring(x, K)
    ring.copy_(torch.randn((K,) + tuple(shape), generator=g).to(DEVICE, sdt))
    ls = None
    if last:
        ls = torch.empty_like(ring[0])
        ls.copy_(torch.randn(shape, generator=g).to(DEVICE, sdt))
    return x, mo, ring, ls, noise


def _independent(x, mo, ring, coefs, step, last=None, noise=None, pred="epsilon", w=None,
                 clip=None, clip_range=1.0, ratio=0.995, smax=1.0):
    """The formula of the issue, written out again in float64, sample by sample, with
    torch.quantile for the threshold: the reference is checked against this."""
    x, mo, ring = x.double().cpu(), mo.double().cpu(), ring.double().cpu()
    c = {n: float(v) for n, v in zip(COEFS, coefs[step].cpu().tolist())}
    if w is not None:
        B = x.shape[0]
        mo = mo[:B] + float(w) * (mo[B:] - mo[:B])
    out, x0s, ys = [], [], []
    for b in range(x.shape[0]):
        xb, mb = x[b], mo[b]
        if pred == "epsilon":
            x0 = (xb - c["sigma"] * mb) / c["alpha"]
        elif pred == "sample":
            x0 = mb
        else:
            x0 = c["alpha"] * xb - c["sigma"] * mb
        if clip == "threshold":
            s = torch.quantile(x0.abs().flatten(), ratio).clamp(1.0, smax)
            x0 = torch.clamp(x0, -s, s) / s
        elif clip == "clip":
            x0 = torch.clamp(x0, -clip_range, clip_range)
        hist = [ring[k, b] for k in range(ring.shape[0])]
        if last is None:
            y = xb
        else:
            y = c["corr_x"] * xb + c["corr_last"] * last[b].double().cpu() + c["corr_new"] * x0
            y = y + sum(c[f"corr_h{k}"] * h for k, h in enumerate(hist))
        xp = c["pred_y"] * y + c["pred_new"] * x0 + sum(c[f"pred_h{k}"] * h
                                                          for k, h in enumerate(hist))
        if noise is not None:
            xp = xp + c["noise"] * noise[b].double().cpu()
        out.append(xp)
        x0s.append(x0)
        ys.append(y)
    return torch.stack(out), torch.stack(x0s), torch.stack(ys)


def _close(out, ref, tol, msg=""):
    """Max error over max|ref| and ||out - ref|| / ||ref||, both <= tol."""
    o, r = out.double().cpu(), ref.double().cpu()
    assert o.shape == r.shape, msg
    assert torch.isfinite(o).all(), f"{msg}: non-finite output"
    scale = r.abs().max().clamp_min(1e-30)
    elem = ((o - r).abs().max() / scale).item()
    nrm = ((o - r).norm() / r.norm().clamp_min(1e-30)).item()
    assert elem <= tol and nrm <= tol, f"{msg}: max err / max|ref| {elem:.3g}, norm rel {nrm:.3g} > {tol}"


CLIPS = {None: {}, "clip": dict(clip_sample=True, clip_sample_range=1.5),
         "threshold": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5)}


def _ind_kw(clip):
    return dict(clip=clip, clip_range=1.5, ratio=0.9, smax=2.5)


# -- the reference ------------------------------------------------------------------------------

@pytest.mark.parametrize("pred", PREDICTION_TYPES)
@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("clip", [None, "clip", "threshold"])
@pytest.mark.parametrize("last", [False, True])
def test_reference_is_the_formula(pred, K, clip, last):
    x, mo, ring, ls, noise = _inputs(SHAPE_ODD, K, dtype=torch.float64, seed=K, last=last)
    coefs = _coefs(1)
    got = multistep_step_ref(x, mo, ring, coefs, 4, prediction_type=pred, last_sample=ls,
                             noise=noise, **CLIPS[clip])
    want = _independent(x, mo, ring, coefs, 4, ls, noise, pred, **_ind_kw(clip))
    for g, w, what in zip(got, want, ("x_prev", "x0", "y")):
        assert g.dtype == torch.float64, what
        assert torch.allclose(g.cpu(), w, rtol=1e-12, atol=1e-12), what
    if clip:  # the case must actually clip
        bound = 1.5 if clip == "clip" else 1.0
        assert (want[1].abs() >= bound - 1e-9).any() and want[1].abs().max() <= bound + 1e-12


def test_reference_columns_each_matter():
    """Each column changes the result (so the tests can fail): a table with one column
    perturbed at a time."""
    x, mo, ring, ls, noise = _inputs(SHAPE, 3, dtype=torch.float64, seed=5)
    coefs = _coefs(2)
    base = multistep_step_ref(x, mo, ring, coefs, 2, last_sample=ls, noise=noise)
    for j, name in enumerate(COEFS):
        c2 = coefs.clone()
        c2[2, j] += 0.25
        other = multistep_step_ref(x, mo, ring, c2, 2, last_sample=ls, noise=noise)
        assert not torch.allclose(base[0], other[0]), name
    # without last_sample the corrector columns are unused: y is x_t
    c2 = coefs.clone()
    c2[2, 2:8] += 0.5
    a = multistep_step_ref(x, mo, ring, coefs, 2)
    b = multistep_step_ref(x, mo, ring, c2, 2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], x)


# -- every backend against the reference --------------------------------------------------------

def _run(backend, x, mo, ring, coefs, step, ls=None, **kw):
    """The op on copies of the state (the inputs stay as they were); returns (x_prev, ring
    after, last_sample after)."""
    ring2 = ring.clone()  # keeps the layout (preserve_format)
    ls2 = None if ls is None else ls.clone()
    out = fastdiff.multistep_step(x, mo, ring2, coefs, step, last_sample=ls2, backend=backend,
                                  **kw)
    return out, ring2, ls2


def _check_state(ring_in, ring_out, ls_out, step, x0, y, tol, msg):
    K = ring_in.shape[0]
    slot = step % K
    for k in range(K):
        if k == slot:
            _close(ring_out[k], x0, tol, f"{msg} ring slot {k} (new x0)")
        else:
            assert torch.equal(ring_out[k], ring_in[k]), f"{msg} ring slot {k} changed"
    if ls_out is not None:
        _close(ls_out, y, tol, f"{msg} last_sample (y)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pred", PREDICTION_TYPES)
@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("last", [False, True])
def test_backends_against_reference(backend, pred, K, last):
    x, mo, ring, ls, noise = _inputs(SHAPE_ODD, K, seed=10 + K, last=last)
    coefs = _coefs(3)
    step = 5  # slot 5 % K: for K = 3 slot 2, read (pred_h2, corr_h2) before it is written
    out, ring2, ls2 = _run(backend, x, mo, ring, coefs, step, ls, prediction_type=pred,
                           noise=noise)
    want = _independent(x, mo, ring, coefs, step, ls, noise, pred)
    assert out.dtype == x.dtype and out.shape == x.shape
    _close(out, want[0], 1e-5, f"{backend} x_prev")
    _check_state(ring, ring2, ls2, step, want[1], want[2], 1e-5, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", ["clip", "threshold"])
@pytest.mark.parametrize("pred", PREDICTION_TYPES)
def test_clip_and_threshold(backend, clip, pred):
    x, mo, ring, ls, noise = _inputs(SHAPE, 2, seed=20)
    coefs = _coefs(4)
    out, ring2, ls2 = _run(backend, x, mo, ring, coefs, 3, ls, prediction_type=pred,
                           noise=noise, **CLIPS[clip])
    want = _independent(x, mo, ring, coefs, 3, ls, noise, pred, **_ind_kw(clip))
    bound = 1.5 if clip == "clip" else 1.0
    assert (want[1].abs() >= bound - 1e-9).any(), "the case must actually clip"
    _close(out, want[0], 1e-5, f"{backend} x_prev")
    _check_state(ring, ring2, ls2, 3, want[1], want[2], 1e-5, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", ["clip", "threshold"])
def test_clipping_keeps_nan(backend, clip):
    """A diverged model (NaN prediction) gives NaN, as torch.clamp, not an image clipped to the
    bounds; the other sample stays finite."""
    x, mo, ring, ls, _ = _inputs(SHAPE_ODD, 2, seed=21)
    mo[1, 2, 3, 4] = float("nan")
    mo[1, 2, 6, 4] = float("nan")  # the sample's last element
    out, ring2, ls2 = _run(backend, x, mo, ring, _coefs(5), 1, ls, **CLIPS[clip])
    nan = torch.isnan(out)
    assert nan[1, 2, 3, 4] and nan[1, 2, 6, 4] and not nan[0].any(), backend
    assert torch.isnan(ring2[1][1, 2, 3, 4]) and not torch.isnan(ring2[1][0]).any()
    if clip == "clip":
        assert nan.sum() == 2 and torch.isnan(ring2[1]).sum() == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w", [3.0, "tensor"])
def test_guidance(backend, w):
    x, mo, ring, ls, noise = _inputs(SHAPE_ODD, 3, seed=22, guided=True)
    coefs = _coefs(6)
    ws = torch.tensor(2.5, device=DEVICE) if w == "tensor" else w
    out, ring2, ls2 = _run(backend, x, mo, ring, coefs, 0, ls, guidance_scale=ws, noise=noise,
                           prediction_type="v_prediction", **CLIPS["threshold"])
    want = _independent(x, mo, ring, coefs, 0, ls, noise, "v_prediction",
                        w=2.5 if w == "tensor" else w, **_ind_kw("threshold"))
    _close(out, want[0], 1e-5, f"{backend} x_prev")
    _check_state(ring, ring2, ls2, 0, want[1], want[2], 1e-5, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["plain", "guided_threshold"])
def test_half_dtypes_float32_state(backend, dtype, case):
    guided = case != "plain"
    x, mo, ring, ls, noise = _inputs(SHAPE_ODD, 3, dtype=dtype, seed=23, guided=guided)
    coefs = _coefs(7)
    kw = dict(guidance_scale=1.5, **CLIPS["threshold"]) if guided else {}
    out, ring2, ls2 = _run(backend, x, mo, ring, coefs, 2, ls, noise=noise, **kw)
    assert out.dtype == dtype and ring2.dtype == torch.float32
    want = _independent(x, mo, ring, coefs, 2, ls, noise, w=1.5 if guided else None,
                        **(_ind_kw("threshold") if guided else {}))
    assert_close(out, want[0], dtype, scale=float(want[0].abs().max()), msg=backend)
    # the state is float32 math on the (rounded) inputs: float32 tolerances
    _check_state(ring, ring2, ls2, 2, want[1], want[2], 1e-5, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_without_copies(backend):
    x, mo, ring, ls, noise = _inputs((2, 5, 3, 6), 2, seed=24, channels_last=True)
    assert not x.is_contiguous() and ring[0].stride() == x.stride()
    coefs = _coefs(8)
    out, ring2, ls2 = _run(backend, x, mo, ring, coefs, 1, ls, noise=noise)
    assert out.stride() == x.stride() and ring2[0].stride() == x.stride()
    want = _independent(x, mo, ring, coefs, 1, ls, noise)
    _close(out, want[0], 1e-5, backend)
    _check_state(ring, ring2, ls2, 1, want[1], want[2], 1e-5, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_drawn_noise_is_the_reference_stream(backend):
    x, mo, ring, ls, _ = _inputs(SHAPE_ODD, 2, seed=25)
    coefs = _coefs(9)
    seed, first = 2 ** 40 + 17, 7
    out, _, _ = _run(backend, x, mo, ring, coefs, 4, ls, seed=seed, first_index=first)
    z = memory_order_normal(seed, 4, STREAM_MULTISTEP, x.double().cpu(), first)
    want = _independent(x, mo, ring, coefs, 4, ls, z)
    _close(out, want[0], 1e-5, backend)
    # the same with the key and the step as device tensors
    again, _, _ = _run(backend, x, mo, ring, coefs, torch.tensor(4, device=DEVICE), ls,
                       seed=torch.tensor(seed, device=DEVICE),
                       first_index=torch.tensor([first], device=DEVICE))
    assert torch.equal(again, out)
    # another step, seed or image index: other noise; none: no noise term
    for kw in (dict(seed=seed + 1, first_index=first), dict(seed=seed, first_index=first + 1)):
        assert not torch.allclose(_run(backend, x, mo, ring, coefs, 4, ls, **kw)[0], out)
    c2 = coefs.clone()
    c2[3] = c2[4]
    assert not torch.allclose(_run(backend, x, mo, ring, c2, 3, ls, seed=seed,
                                   first_index=first)[0], out)
    quiet, _, _ = _run(backend, x, mo, ring, coefs, 4, ls)
    _close(quiet, _independent(x, mo, ring, coefs, 4, ls, None)[0], 1e-5, f"{backend} no noise")


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_is_per_image_whatever_the_batch(backend):
    x, mo, ring, ls, _ = _inputs((4, 3, 4, 4), 1, seed=26)
    c = torch.zeros(S, NCOEF, dtype=torch.float64, device=DEVICE)
    c[:, 0] = c[:, 1] = 1.0
    c[:, COEFS.index("noise")] = 1.0  # x_prev = z
    whole, _, _ = _run(backend, x, mo, ring, c, 2, seed=5)
    part, _, _ = _run(backend, x[2:], mo[2:], ring[:, 2:], c, 2, seed=5, first_index=2)
    assert torch.equal(whole[2:], part)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_int_and_device_tensor(backend):
    x, mo, ring, ls, noise = _inputs(SHAPE, 3, seed=27)
    coefs = _coefs(10)
    a = _run(backend, x, mo, ring, coefs, 4, ls, noise=noise)
    for st in (torch.tensor(4, device=DEVICE), torch.tensor([4], device=DEVICE),
               torch.tensor([4], device=DEVICE, dtype=torch.int32)):
        b = _run(backend, x, mo, ring, coefs, st, ls, noise=noise)
        for u, v in zip(a, b):
            assert torch.equal(u, v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_step_tensor_is_clamped(backend, monkeypatch):
    """A device step is never read on the host: unchecked (FASTDIFF_CHECKS=0; with checks on it
    trips the range check, tests/test_host_sync.py) out of range it takes the table's last row
    (and its ring slot), never memory outside the table."""
    monkeypatch.setenv("FASTDIFF_CHECKS", "0")
    x, mo, ring, ls, noise = _inputs(SHAPE, 2, seed=28)
    coefs = _coefs(11)
    a = _run(backend, x, mo, ring, coefs, S - 1, ls, noise=noise)
    b = _run(backend, x, mo, ring, coefs, torch.tensor(S + 40, device=DEVICE), ls, noise=noise)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    c = _run(backend, x, mo, ring, coefs, 0, ls, noise=noise)
    d = _run(backend, x, mo, ring, coefs, torch.tensor(-3, device=DEVICE), ls, noise=noise)
    for u, v in zip(c, d):
        assert torch.equal(u, v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_and_in_place(backend):
    x, mo, ring, ls, noise = _inputs(SHAPE_ODD, 2, seed=29)
    coefs = _coefs(12)
    want, ring_w, ls_w = _run(backend, x, mo, ring, coefs, 3, ls, noise=noise)
    out = torch.full_like(x, float("nan"))  # poisoned
    got, _, _ = _run(backend, x, mo, ring, coefs, 3, ls, noise=noise, out=out)
    assert got is out and torch.equal(out, want)
    xi = x.clone()
    r2, l2 = ring.clone(), ls.clone()
    res = fastdiff.multistep_step(xi, mo, r2, coefs, 3, last_sample=l2, noise=noise, out=xi,
                                  backend=backend)
    assert res is xi and torch.equal(xi, want) and torch.equal(r2, ring_w) and torch.equal(l2, ls_w)


def test_backends_agree():
    x, mo, ring, ls, _ = _inputs(SHAPE_ODD, 3, seed=30, guided=True)
    coefs = _coefs(13)
    outs = {b: _run(b, x, mo, ring, coefs, 5, ls, seed=9, guidance_scale=2.0) for b in BACKENDS}
    first = outs[BACKENDS[0]]
    for name, o in outs.items():
        for u, v in zip(o, first):
            _close(u, v, 2e-6, f"{name} vs {BACKENDS[0]}")


def test_float64_runs_the_reference():
    x, mo, ring, ls, noise = _inputs(SHAPE, 3, dtype=torch.float64, seed=31)
    coefs = _coefs(14)
    for backend in BACKENDS:
        out, ring2, ls2 = _run(backend, x, mo, ring, coefs, 1, ls, noise=noise)
        want = _independent(x, mo, ring, coefs, 1, ls, noise)
        assert out.dtype == torch.float64 and ring2.dtype == torch.float64
        assert torch.allclose(out.cpu(), want[0], rtol=1e-12, atol=1e-12), backend
        assert torch.allclose(ring2[1].cpu(), want[1], rtol=1e-12, atol=1e-12), backend
        assert torch.allclose(ls2.cpu(), want[2], rtol=1e-12, atol=1e-12), backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4)])
def test_empty(backend, shape):
    x = torch.randn(shape, device=DEVICE)
    ring = empty_ring(x, 2)
    out = fastdiff.multistep_step(x, torch.randn_like(x), ring, _coefs(0), 1, seed=1,
                                  backend=backend)
    assert out.shape == x.shape


def test_empty_ring_layouts():
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    for K in range(1, MAX_ORDER + 1):
        r = empty_ring(x, K)
        assert r.shape == (K,) + tuple(x.shape) and r.dtype == torch.float32
        assert all(r[k].stride() == x.stride() for k in range(K))
    assert empty_ring(x.double(), 1).dtype == torch.float64
    assert fastdiff.ops.multistep_step.COEFS == COEFS and len(COEFS) == NCOEF == 14
    with pytest.raises(ValueError, match=r"K must be an int in \[1, 3\]"):
        empty_ring(x, 4)


def test_compile_fullgraph_reference_backend():
    x, mo, ring, ls, noise = _inputs(SHAPE, 2, seed=32)
    coefs = _coefs(15)
    want = _run("torch", x, mo, ring, coefs, 3, ls, noise=noise)
    r2, l2 = ring.clone(), ls.clone()
    f = torch.compile(lambda a, m, r, l, n: fastdiff.multistep_step(
        a, m, r, coefs, 3, last_sample=l, noise=n, backend="torch"), fullgraph=True,
        backend="eager")
    got = f(x, mo, r2, l2, noise)
    assert torch.equal(got, want[0]) and torch.equal(r2, want[1]) and torch.equal(l2, want[2])


# -- errors ---------------------------------------------------------------------------------------

def _args():
    x = torch.randn(2, 3, 4, 4)
    return dict(x_t=x, model_output=torch.randn_like(x), ring=empty_ring(x, 2),
                coefs=_coefs(0, device="cpu"), step=1)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(x_t=torch.ones(2, 3, 4, 4, dtype=torch.int64)), TypeError, "x_t must be a floating tensor"),
    (dict(x_t=[1.0]), TypeError, "x_t must be a torch.Tensor"),
    (dict(model_output=torch.randn(2, 3, 4, 5)), ValueError,
     r"model_output must have shape \(2, 3, 4, 4\) \(x_t's shape\)"),
    (dict(model_output=torch.randn(2, 3, 4, 4, dtype=torch.float64)), TypeError,
     "model_output must have the dtype of x_t"),
    (dict(guidance_scale=2.0), ValueError, r"model_output must have shape \(4, 3, 4, 4\) \(batch 2\*B"),
    (dict(guidance_scale="2"), TypeError, "guidance_scale must be a number"),
    (dict(guidance_scale=float("inf"), model_output=torch.randn(4, 3, 4, 4)), ValueError,
     "guidance_scale must be finite"),
    (dict(guidance_scale=torch.tensor([1.0, 2.0]), model_output=torch.randn(4, 3, 4, 4)),
     ValueError, "guidance_scale must be a floating tensor of 1 element"),
    (dict(ring=torch.randn(2, 3, 4, 4)), ValueError, r"ring must have shape \(K, \*x_t.shape\)"),
    (dict(ring=torch.randn(4, 2, 3, 4, 4)), ValueError, r"with 1 <= K <= 3"),
    (dict(ring=torch.randn(0, 2, 3, 4, 4)), ValueError, r"with 1 <= K <= 3"),
    (dict(ring=torch.randn(2, 2, 3, 4, 5)), ValueError, r"ring must have shape \(2, 2, 3, 4, 4\)"),
    (dict(ring=torch.randn(2, 2, 3, 4, 4, dtype=torch.float16)), TypeError, "ring must be float32"),
    (dict(ring=torch.randn(2, 2, 3, 4, 4, dtype=torch.float64)), TypeError, "ring must be float32"),
    (dict(ring=torch.randn(2, 2, 3, 4, 4).transpose(3, 4)), ValueError,
     "ring's slots must be laid out like x_t"),
    (dict(ring=torch.randn(2, 3, 4, 4).expand(2, 2, 3, 4, 4)), ValueError,
     "ring's slots must be laid out like x_t"),
    (dict(ring=torch.randn(2, 2, 3, 4, 4, device="meta")), ValueError, "ring is on meta"),
    (dict(last_sample=torch.randn(2, 3, 4)), ValueError, r"last_sample must have shape \(2, 3, 4, 4\)"),
    (dict(last_sample=torch.randn(2, 3, 4, 4, dtype=torch.float16)), TypeError,
     "last_sample must be float32"),
    (dict(last_sample=torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)), ValueError,
     "last_sample must be laid out like x_t"),
    (dict(coefs=torch.randn(6, 14)), TypeError, "coefs must be float64"),
    (dict(coefs=torch.randn(6, 13, dtype=torch.float64)), ValueError,
     r"coefs must have shape \(S >= 1, NCOEF = 14\)"),
    (dict(coefs=torch.randn(0, 14, dtype=torch.float64)), ValueError, "coefs must have shape"),
    (dict(coefs=torch.randn(14, dtype=torch.float64)), ValueError, "coefs must have 2 dims"),
    (dict(coefs=torch.randn(6, 14, dtype=torch.float64, device="meta")), ValueError, "coefs is on meta"),
    (dict(step=6), ValueError, r"step=6 is out of range \[0, 6\)"),
    (dict(step=-1), ValueError, r"step=-1 is out of range"),
    (dict(step=1.0), TypeError, "step must be an int or a 1-element int64 tensor"),
    (dict(step=True), TypeError, "step must be an int"),
    (dict(step=torch.tensor([1, 2])), ValueError, "step must be an integer tensor of 1 element"),
    (dict(step=torch.tensor(1.0)), TypeError, "step must be an integer tensor"),
    (dict(step=torch.tensor(1, device="meta")), ValueError, "step is on meta but the data is on cpu"),
    (dict(prediction_type="eps"), ValueError, "prediction_type must be one of"),
    (dict(clip_sample=True, thresholding=True), ValueError, "clip_sample and thresholding are exclusive"),
    (dict(clip_sample_range=0.0), ValueError, "clip_sample_range must be finite and > 0"),
    (dict(dynamic_thresholding_ratio=1.5), ValueError, "dynamic_thresholding_ratio must be finite"),
    (dict(sample_max_value=-1.0), ValueError, "sample_max_value must be finite and > 0"),
    (dict(noise=torch.randn(2, 3, 4, 5)), ValueError, "noise must have the shape of x_t"),
    (dict(noise=torch.randn(2, 3, 4, 4), seed=1), ValueError, "either noise or seed"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(seed=torch.tensor([1, 2])), ValueError, "seed must be an integer tensor of 1 element"),
    (dict(first_index=-1), ValueError, r"first_index must be in \[0, 2\^32 - B\]"),
    (dict(first_index="0"), TypeError, "first_index must be an int"),
    (dict(out=torch.randn(2, 3, 4)), ValueError, "out must have the shape of x_t"),
    (dict(out=torch.randn(2, 3, 4, 4, dtype=torch.float64)), TypeError, "out must have the dtype of x_t"),
    (dict(out=torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)), ValueError,
     "out must be laid out like x_t"),
    (dict(backend="fast"), ValueError, "backend must be None or one of"),
])
def test_errors(kwargs, err, match):
    args = _args()
    args.update(kwargs)
    with pytest.raises(err, match=match):
        fastdiff.multistep_step(**args)


def test_errors_aliasing_and_in_place_strided():
    a = _args()
    with pytest.raises(ValueError, match="out and ring must not share memory"):
        fastdiff.multistep_step(**a, out=a["ring"][0])
    ls = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="out and last_sample must not share memory"):
        fastdiff.multistep_step(**a, last_sample=ls, out=ls)
    with pytest.raises(ValueError, match="last_sample and ring must not share memory"):
        fastdiff.multistep_step(**a, last_sample=a["ring"][1])
    base = torch.randn(2, 3, 4, 8)
    xs = base[..., ::2]
    a.update(x_t=xs)
    with pytest.raises(ValueError, match="in place needs a contiguous or channels_last x_t"):
        fastdiff.multistep_step(**a, out=xs)


# -- every vector loop, sample tails, unaligned views, thread counts ------------------------------

def _cpu_capabilities():
    try:
        import fastdiff._C as C
        return list(C.cpu_capabilities())
    except (ImportError, AttributeError):
        return []


@pytest.fixture(params=_cpu_capabilities() or ["none"])
def cpu_capability(request):
    if request.param == "none" or "cpu" not in BACKENDS:
        pytest.skip("the C++ CPU kernels are not built")
    import fastdiff._C as C
    C.set_cpu_capability(request.param)
    yield request.param
    C.set_cpu_capability("")


LONG = (2, 3, 37, 29)  # 3219 per sample: several work units, vector blocks and a scalar tail
VEC_CASES = {
    "2m": dict(K=1, kw=dict(noise="given")),
    "3m-clip": dict(K=2, kw=dict(clip_sample=True, clip_sample_range=1.5, seed=4)),
    "sde-drawn": dict(K=2, kw=dict(seed=2 ** 33 + 5, first_index=3, prediction_type="v_prediction")),
    "unipc-guided-threshold": dict(K=3, last=True, guided=True,
                                   kw=dict(guidance_scale=2.0, prediction_type="sample",
                                           **CLIPS["threshold"])),
}


def _vec_case(name, dtype, shape=LONG, seed=40):
    case = VEC_CASES[name]
    x, mo, ring, ls, noise = _inputs(shape, case["K"], dtype=dtype, seed=seed,
                                     guided=case.get("guided", False),
                                     last=case.get("last", False))
    kw = dict(case["kw"])
    z = None
    if kw.get("noise") == "given":
        kw["noise"] = z = noise
    elif "seed" in kw:
        z = memory_order_normal(kw["seed"], 5, STREAM_MULTISTEP, x.double().cpu(),
                                kw.get("first_index", 0))
    ikw = dict(pred=kw.get("prediction_type", "epsilon"), w=kw.get("guidance_scale"))
    if kw.get("clip_sample"):
        ikw.update(clip="clip", clip_range=kw["clip_sample_range"])
    if kw.get("thresholding"):
        ikw.update(_ind_kw("threshold"))
    return x, mo, ring, ls, kw, z, ikw


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(VEC_CASES))
def test_cpu_vector_loop_every_capability(cpu_capability, dtype, name):
    x, mo, ring, ls, kw, z, ikw = _vec_case(name, dtype)
    coefs = _coefs(20)
    out, ring2, ls2 = _run("cpu", x, mo, ring, coefs, 5, ls, **kw)
    want = _independent(x, mo, ring, coefs, 5, ls, z, **ikw)
    if dtype == torch.float32:
        _close(out, want[0], 1e-5, cpu_capability)
    else:
        assert_close(out, want[0], dtype, scale=float(want[0].abs().max()), msg=cpu_capability)
    _check_state(ring, ring2, ls2, 5, want[1], want[2], 1e-5, cpu_capability)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VEC_CASES))
def test_long_samples(backend, name):
    """Samples of several blocks / programs / work units with a tail, every backend."""
    x, mo, ring, ls, kw, z, ikw = _vec_case(name, torch.float32, seed=41)
    coefs = _coefs(21)
    out, ring2, ls2 = _run(backend, x, mo, ring, coefs, 5, ls, **kw)
    want = _independent(x, mo, ring, coefs, 5, ls, z, **ikw)
    _close(out, want[0], 1e-5, backend)
    _check_state(ring, ring2, ls2, 5, want[1], want[2], 1e-5, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unaligned_views(backend):
    """Dense views one element into their storage: the kernels' 4-element vector accesses fall
    back to scalar ones (the C++ shared body), with the same results."""
    x, mo, ring, ls, noise = _inputs(SHAPE, 3, seed=42, guided=True)

    def shifted(a, k):
        return torch.cat([a.new_zeros(k), a.flatten()])[k:].view(a.shape)

    xs, ms, ns, lss = shifted(x, 1), shifted(mo, 3), shifted(noise, 2), shifted(ls, 1)
    rs = shifted(ring, 1)
    coefs = _coefs(22)
    out, ring2, ls2 = _run(backend, xs, ms, rs, coefs, 4, lss, noise=ns, guidance_scale=1.5)
    want = _independent(x, mo, ring, coefs, 4, ls, noise, w=1.5)
    _close(out, want[0], 1e-5, backend)
    _check_state(ring, ring2, ls2, 4, want[1], want[2], 1e-5, backend)


def test_cpu_same_bits_any_thread_count():
    if "cpu" not in BACKENDS:
        pytest.skip("the C++ CPU kernels are not built")
    x, mo, ring, ls, _ = _inputs((5, 3, 40, 40), 3, seed=43, guided=True)
    coefs = _coefs(23)
    outs = []
    n = torch.get_num_threads()
    try:
        for threads in (1, 2, 3, 8):
            torch.set_num_threads(threads)
            outs.append(_run("cpu", x, mo, ring, coefs, 2, ls, seed=3, guidance_scale=3.0,
                             **CLIPS["threshold"]))
    finally:
        torch.set_num_threads(n)
    for o in outs[1:]:
        for u, v in zip(o, outs[0]):
            assert torch.equal(u, v)


def test_ext_op_checks_its_arguments():
    """The extension op checks what the wrapper guarantees (a direct caller gets an error, not
    a wild read): the ring's dtype, the table's width, the layouts."""
    if "cpu" not in BACKENDS:
        pytest.skip("the C++ CPU kernels are not built")
    x, mo, ring, ls, _ = _inputs(SHAPE, 2, seed=44)
    coefs = _coefs(24)

    def call(**kw):
        a = dict(x_t=x, model_output=mo, ring=ring, coefs=coefs, step=1, step_t=None,
                 last_sample=ls, noise=None, thresh=None, seed=0, seed_t=None, first_index=0,
                 first_t=None, draw_noise=False, prediction_type=0, clip_mode=0,
                 clip_sample_range=1.0, cond_offset=0, guidance=0.0, guidance_t=None,
                 out=torch.empty_like(x))
        a.update(kw)
        torch.ops.fastdiff_ext.multistep_step(*a.values())

    call()  # the base call is valid
    for kw, match in ((dict(ring=ring.double()), "ring must be float32"),
                      (dict(coefs=coefs[:, :13].contiguous()), "coefs must be a contiguous float64"),
                      (dict(x_t=x.double(), model_output=mo.double(), out=x.double()), "float64"),
                      (dict(out=torch.empty_like(x).transpose(2, 3).contiguous().transpose(2, 3)),
                       "out must be laid out like x_t"),
                      (dict(clip_mode=2), "thresholding needs thresh"),
                      (dict(cond_offset=3), "bad cond_offset"),
                      (dict(last_sample=ls[:, :2]), "last_sample must be float32, laid out like x_t")):
        with pytest.raises(ValueError, match=match):
            call(**kw)


def test_inside_cuda_graph_reads_the_device_step_seed_and_guidance(gpu_backend):
    """A captured step, replayed with new device values of step / seed / guidance scale (a
    sampling loop's graph): each replay equals the eager call with those values."""
    x, mo, ring, ls, _ = _inputs(SHAPE_ODD, 2, seed=50, guided=True)
    coefs = _coefs(30)
    step, seed_t = torch.tensor(1, device=DEVICE), torch.tensor(5, device=DEVICE)
    w = torch.tensor(2.0, device=DEVICE)
    r, l, out = ring.clone(), ls.clone(), torch.empty_like(x)

    def call():
        fastdiff.multistep_step(x, mo, r, coefs, step, last_sample=l, seed=seed_t,
                                guidance_scale=w, out=out, backend=gpu_backend)

    call()  # compiles / loads the kernel outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        call()
    for s, sd, ws in ((3, 7, 1.5), (4, 9, 3.0)):
        r.copy_(ring)
        l.copy_(ls)
        step.fill_(s)
        seed_t.fill_(sd)
        w.fill_(ws)
        g.replay()
        torch.cuda.synchronize()
        want = _run(gpu_backend, x, mo, ring, coefs, s, ls, seed=sd, guidance_scale=ws)
        for u, v in zip((out, r, l), want):
            assert torch.equal(u, v), (s, sd, ws)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9, 0.995, 1.0])
@pytest.mark.parametrize("n", [1, 7, 105, 3219])
def test_kernel_threshold_prepass_is_the_reference_quantile(ratio, n):
    """The kernels' per-sample threshold (torch.topk) equals the reference's (a full sort),
    NaN samples included."""
    from fastdiff.ops.sampler_step import threshold_scale, threshold_scale_topk
    g = torch.Generator().manual_seed(n)
    x0 = 3 * torch.randn(3, n, generator=g)
    x0[2, n // 2] = float("nan")
    got = threshold_scale_topk(x0, ratio, 2.5)
    want = threshold_scale(x0, ratio, 2.5)
    assert torch.equal(got[:2], want[:2])
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got[2].nan_to_num(7.0), want[2].nan_to_num(7.0))
