"""group_norm_silu under autograd on the C++ CPU backend: the fused forward + the fused backward
kernel (fastdiff_ext::group_norm_silu_backward), every gradient against autograd of the float64
reference, in every compiled instruction-set variant, both layouts, and the same bits at any
thread count. Outputs are poisoned (conftest sets FASTDIFF_POISON=1: the wrapper's gradient
buffers start as NaN)."""
import importlib

import pytest
import torch

from fastdiff import backends
from fastdiff.ops.group_norm_silu import group_norm_silu, group_norm_silu_ref

gns = importlib.import_module("fastdiff.ops.group_norm_silu")
pytestmark = pytest.mark.skipif(not backends.available("cpu"), reason="extension not built")

NAMES = ("x", "weight", "bias", "add", "scale", "shift")
# (max |err| / max |ref|, ||err|| / ||ref||) per input dtype: the 16-bit ones round dx and the
# forward's z; the reference runs on the same (rounded) inputs in float64
TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (4e-3, 2e-3), torch.bfloat16: (3e-2, 1.5e-2)}


def _ext():
    import fastdiff._C as C
    return C


@pytest.fixture
def capability(request):
    C = _ext()
    C.set_cpu_capability(request.param)
    yield request.param
    C.set_cpu_capability("")


@pytest.fixture
def threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _capabilities():
    return _ext().cpu_capabilities() if backends.available("cpu") else []


def _layout(t, cl):
    return t.movedim(1, -1).contiguous().movedim(-1, 1) if cl else t.contiguous()


def _inputs(shape, dtype, cl, mods, mean=0.5):
    """x (mean offset, std 2), perturbed affine parameters, and (B, C) add/scale/shift as `mods`
    asks ("add", "scale", "shift" letters), all requiring grad; g the upstream gradient."""
    B, C = shape[:2]
    x = _layout(torch.randn(shape) * 2 + mean, cl).to(dtype)
    w = 1 + 0.3 * torch.randn(C)
    b = 0.2 * torch.randn(C)
    add = torch.randn(B, C) if "add" in mods else None
    scale = 0.3 * torch.randn(B, C) if "scale" in mods else None
    shift = 0.3 * torch.randn(B, C) if "shift" in mods else None
    g = _layout(torch.randn(shape), cl).to(dtype)
    ins = [None if t is None else t.requires_grad_() for t in (x, w, b, add, scale, shift)]
    return ins, g


def _grads(ins, g, G, act, eps=1e-5):
    y = group_norm_silu(ins[0], ins[1], ins[2], G, eps, add=ins[3], scale=ins[4], shift=ins[5],
                        activation=act)
    names = [n for n, t in zip(NAMES, ins) if t is not None and t.requires_grad]
    used = [t for t in ins if t is not None and t.requires_grad]
    return y, dict(zip(names, torch.autograd.grad(y, used, g)))


def _ref_grads(ins, g, G, act, eps=1e-5):
    d = [None if t is None else t.detach().double().requires_grad_() for t in ins]
    y = group_norm_silu_ref(d[0], d[1], d[2], G, eps, d[3], act, d[4], d[5])
    used = [t for t in d if t is not None]
    return dict(zip([n for n, t in zip(NAMES, d) if t is not None],
                    torch.autograd.grad(y, used, g.double())))


def _check(got, ref, dtype, shape, msg=""):
    amax, nrel = TOL[dtype]
    S = 1
    for s in shape[2:]:
        S *= s
    for name, r in ref.items():
        o = got[name]
        assert o.shape == r.shape and o.dtype == {"x": dtype}.get(name, torch.float32), \
            f"{msg} {name}: {o.dtype} {tuple(o.shape)}"
        assert torch.isfinite(o).all(), f"{msg} {name}: non-finite (an unwritten, poisoned value?)"
        o = o.double()
        # dadd is the sum of dx over a channel: exactly 0 for one channel per group (G = C), so
        # it is measured against the size of the terms it sums
        scale = r.abs().max().item()
        if name == "add":
            scale = max(scale, S ** 0.5 * ref["x"].abs().max().item())
        err = (o - r).abs().max().item()
        assert err <= amax * scale, f"{msg} {name}: max err {err:.3g} > {amax} x {scale:.3g}"
        if name != "add" or r.norm() > 1e-6 * scale:
            rel = ((o - r).norm() / r.norm().clamp_min(1e-30)).item()
            assert rel <= nrel or err <= amax * scale * 1e-2, f"{msg} {name}: rel err {rel:.3g}"


CASES = [  # (shape, G); the NCHW paths of group_norm_silu_backward.cpp
    ((2, 16, 5, 7), 4),      # rows of 35 (short: a group is one run, with a tail)
    ((2, 32, 9, 9), 8),      # rows of 81 (a run, with a tail)
    ((3, 40, 6, 6), 1),      # G = 1
    ((2, 24, 3, 3), 24),     # G = C
    ((2, 37, 4, 5), 1),      # C not a multiple of any vector width
    ((3, 12, 1, 1), 3),      # HW = 1
    ((2, 12, 3, 4, 5), 6),   # 3 spatial dims
    ((2, 64, 17, 16), 32),   # several units per image in channels_last, 272-pixel blocks
    ((2, 32, 4, 4), 8),      # rows of 16, one vector each (the digits U-Net's 4x4 level)
    ((2, 16, 2, 2), 4),      # rows of 4 (the transposed units)
    ((1, 128, 8, 8), 1),     # short rows, but a group over 4096 elements: SIMD along the rows
]


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}g{c[1]}")
@pytest.mark.parametrize("mods,act", [("", "silu"), ("add", "silu"),
                                      ("add,scale,shift", "silu"), ("add,scale,shift", None),
                                      ("scale", None)])
def test_grads_match_reference_fp32(case, cl, mods, act, seed):
    shape, G = case
    ins, g = _inputs(shape, torch.float32, cl, mods)
    y, got = _grads(ins, g, G, act)
    assert "GroupNormSiLUCPU" in type(y.grad_fn).__name__, "the fused CPU path did not run"
    assert y.stride() == ins[0].stride()
    _check(got, _ref_grads(ins, g, G, act), torch.float32, shape, f"{shape} {mods} {act}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[4], CASES[6]],
                         ids=lambda c: f"{c[0]}g{c[1]}")
def test_grads_match_reference_16bit(case, cl, dtype, seed):
    shape, G = case
    ins, g = _inputs(shape, dtype, cl, "add,scale,shift")
    _, got = _grads(ins, g, G, "silu")
    _check(got, _ref_grads(ins, g, G, "silu"), dtype, shape, f"{shape} {dtype}")


@pytest.mark.parametrize("capability", _capabilities(), indirect=True)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_variant_matches_reference(capability, cl, dtype, seed):
    for shape, G in (CASES[0], CASES[1], CASES[4]):
        ins, g = _inputs(shape, dtype, cl, "add,scale,shift")
        _, got = _grads(ins, g, G, "silu")
        _check(got, _ref_grads(ins, g, G, "silu"), dtype, shape, f"{capability} {shape}")


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_large_mean_keeps_its_digits(cl, seed):
    """Statistics shifted by the group's first element: mean 1e4, std 2 loses nothing."""
    shape = (2, 16, 9, 9)
    ins, g = _inputs(shape, torch.float32, cl, "add", mean=1e4)
    _, got = _grads(ins, g, 4, "silu")
    _check(got, _ref_grads(ins, g, 4, "silu"), torch.float32, shape, "mean 1e4")


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape,G", [((5, 32, 9, 9), 8), ((3, 64, 4, 4), 8), ((1, 96, 20, 20), 3)])
def test_same_bits_at_any_thread_count(shape, G, cl, threads, seed):
    ins, g = _inputs(shape, torch.float32, cl, "add,scale,shift")
    out = []
    for n in (1, 2, 3):
        torch.set_num_threads(n)
        out.append(_grads(ins, g, G, "silu")[1])
    for other in out[1:]:
        for name in out[0]:
            assert torch.equal(out[0][name], other[name]), f"{name} differs across thread counts"


def test_only_the_needed_grads(seed):
    """Inputs that do not require grad get none, and the others still match."""
    shape = (2, 16, 5, 7)
    ins, g = _inputs(shape, torch.float32, False, "add,scale,shift")
    for i in (1, 4, 5):
        ins[i].requires_grad_(False)
    _, got = _grads(ins, g, 4, "silu")
    assert set(got) == {"x", "bias", "add"}
    ref = _ref_grads(ins, g, 4, "silu")
    _check(got, {k: ref[k] for k in got}, torch.float32, shape)
    # only parameter grads: the kernel skips dx
    x = ins[0].detach()
    w = ins[1].detach().requires_grad_()
    dw, = torch.autograd.grad(group_norm_silu(x, w, None, 4), w, g)
    w64 = w.detach().double().requires_grad_()
    dw_ref, = torch.autograd.grad(group_norm_silu_ref(x.double(), w64, None, 4), w64, g.double())
    _check({"weight": dw}, {"weight": dw_ref}, torch.float32, shape)


def test_param_dtypes_and_views(seed):
    """float64 parameters with float32 x get float64 grads; a sliced x (copied to dense first)
    and an expanded upstream gradient (from .sum()) work."""
    shape = (2, 16, 6, 8)
    base = torch.randn(2, 16, 6, 10) + 0.3
    x = base[..., 1:9].requires_grad_()
    w = (1 + 0.3 * torch.randn(16, dtype=torch.float64)).requires_grad_()
    add = torch.randn(2, 16, dtype=torch.float64).requires_grad_()
    y = group_norm_silu(x, w, None, 4, add=add)
    assert "GroupNormSiLUCPU" in type(y.grad_fn).__name__
    got = dict(zip(("x", "weight", "add"), torch.autograd.grad(y.sum(), (x, w, add))))
    assert got["weight"].dtype == got["add"].dtype == torch.float64
    ins64 = [t.detach().double().requires_grad_() for t in (x, w, add)]
    r = group_norm_silu_ref(ins64[0], ins64[1], None, 4, add=ins64[2])
    ref = dict(zip(("x", "weight", "add"), torch.autograd.grad(r.sum(), ins64)))
    got["weight"], got["add"] = got["weight"].float(), got["add"].float()
    _check(got, ref, torch.float32, shape)


def test_other_paths_keep_the_reference(seed):
    """float64, a forced torch backend and torch.compile tracing run the reference's autograd."""
    ins, g = _inputs((2, 8, 3, 3), torch.float32, False, "add")
    y = group_norm_silu(ins[0].double(), ins[1], ins[2], 4, add=ins[3])
    assert "GroupNormSiLUCPU" not in type(y.grad_fn).__name__
    with backends.use_backend("torch"):
        y = group_norm_silu(ins[0], ins[1], ins[2], 4, add=ins[3])
    assert "GroupNormSiLUCPU" not in type(y.grad_fn).__name__

    def f(x, w, b, a):
        return group_norm_silu(x, w, b, 4, add=a)
    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(f, backend="aot_eager")(*ins[:4]), ins[:4], g)
    ref = _ref_grads(ins, g, 4, "silu")
    _check(dict(zip(NAMES, got)), ref, torch.float32, (2, 8, 3, 3), "compiled")


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")
def test_gradcheck_through_the_kernel():
    """torch.autograd.gradcheck on the fused path: float32 inputs, so finite differences in
    float32 (loose tolerances), on a small problem with every input."""
    torch.manual_seed(0)
    ins, _ = _inputs((2, 4, 3, 3), torch.float32, False, "add,scale,shift")

    def f(*t):
        return group_norm_silu(t[0], t[1], t[2], 2, add=t[3], scale=t[4], shift=t[5])
    assert torch.autograd.gradcheck(f, tuple(ins), eps=1e-2, atol=5e-3, rtol=5e-3,
                                    fast_mode=True)


def test_double_backward_matches_reference(seed):
    """create_graph=True: the backward differentiates the reference, so second derivatives are
    there (here d/dx of sum(dx * v)) and match the float64 reference's."""
    shape = (2, 8, 3, 3)
    ins, g = _inputs(shape, torch.float32, False, "add")
    used = [t for t in ins if t is not None]
    v = torch.randn(shape)

    def second(ts, gg, vv):
        y = group_norm_silu(ts[0], ts[1], ts[2], 4, add=ts[3]) if ts[0].dtype == torch.float32 \
            else group_norm_silu_ref(ts[0], ts[1], ts[2], 4, 1e-5, ts[3])
        dx, = torch.autograd.grad(y, ts[0], gg, create_graph=True)
        return torch.autograd.grad((dx * vv).sum(), ts)
    y = group_norm_silu(*ins[:3], 4, add=ins[3])
    assert "GroupNormSiLUCPU" in type(y.grad_fn).__name__
    got = second(used, g, v)
    d = [t.detach().double().requires_grad_() for t in used]
    ref = second(d, g.double(), v.double())
    _check(dict(zip(NAMES, got)), dict(zip(NAMES, ref)), torch.float32, shape, "second")


def test_backward_op_errors_name_the_argument():
    _ext()
    op = torch.ops.fastdiff_ext.group_norm_silu_backward
    x = torch.randn(2, 8, 3, 3)
    g = torch.randn(2, 8, 3, 3)
    dx = torch.empty_like(x)
    args = (None, None, None, None, None, 4, 1e-5, True)
    with pytest.raises(ValueError, match="grad_out must match x"):
        op(torch.randn(2, 8, 3, 4), x, *args, dx, None, None, None, None, None)
    with pytest.raises(ValueError, match="grad_out must have x's memory layout"):
        op(g.to(memory_format=torch.channels_last), x, *args, dx, None, None, None, None, None)
    with pytest.raises(ValueError, match="dx must match x"):
        op(g, x, *args, torch.empty(2, 8, 3, 3, dtype=torch.float16), None, None, None, None,
           None)
    with pytest.raises(ValueError, match="dweight must be a contiguous float32"):
        op(g, x, *args, dx, torch.empty(8, dtype=torch.float64), None, None, None, None)
    with pytest.raises(ValueError, match="dadd must be a contiguous float32 tensor of shape"):
        op(g, x, *args, dx, None, None, torch.empty(8), None, None)
    with pytest.raises(ValueError, match="num_groups=3 must divide C=8"):
        op(g, x, None, None, None, None, None, 3, 1e-5, True, dx, None, None, None, None, None)
    with pytest.raises(ValueError, match="x must be float32, float16 or bfloat16"):
        op(g.double(), x.double(), *args, None, None, None, None, None, None)
    with pytest.raises(ValueError, match="x must be dense"):
        op(g[..., :2], x[..., :2], *args, None, None, None, None, None, None)
    with pytest.raises(ValueError, match="weight must be a contiguous float32"):
        op(g, x, torch.randn(4), None, None, None, None, 4, 1e-5, True, dx, None, None, None,
           None, None)


def test_empty_batch_grads():
    x = torch.randn(0, 8, 3, 3, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    y = group_norm_silu(x, w, None, 4)
    dx, dw = torch.autograd.grad(y, (x, w), torch.randn(0, 8, 3, 3))
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros(8))
