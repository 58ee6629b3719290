"""The C++ CPU group_norm_silu kernel: every compiled instruction-set variant (DEFAULT, AVX2,
AVX512, as this CPU allows) against the float64 reference, both of its thread plans (one task
per group/image, or every pass split over fixed units), and the same output bits at any thread
count."""
import pytest
import torch

from conftest import assert_close
from fastdiff import backends
from fastdiff.ops.group_norm_silu import group_norm_silu, group_norm_silu_ref

pytestmark = pytest.mark.skipif(not backends.available("cpu"), reason="extension not built")


def _ext():
    import fastdiff._C as C
    return C


def _capabilities():
    return _ext().cpu_capabilities() if backends.available("cpu") else []


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


def _inputs(shape, dtype, cl, mean=0.0, mod=True):
    B, C = shape[:2]
    x = (torch.randn(shape) * 1.5 + mean).to(dtype)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    p = dict(weight=torch.randn(C) * 0.5 + 1.0, bias=torch.randn(C), add=torch.randn(B, C))
    if mod:
        p.update(scale=0.3 * torch.randn(B, C), shift=torch.randn(B, C))
    return x, p


def _run(x, G, p, activation="silu"):
    with backends.use_backend("cpu"):
        return group_norm_silu(x, p["weight"], p["bias"], G, add=p["add"],
                               scale=p.get("scale"), shift=p.get("shift"), activation=activation)


def _ref(x, G, p, activation="silu"):
    d = {k: None if v is None else v.double() for k, v in p.items()}
    return group_norm_silu_ref(x.double(), d["weight"], d["bias"], G, 1e-5, d["add"], activation,
                               d.get("scale"), d.get("shift"))


# C a multiple of the widest vector pair (32 fp32 channels) and not; rows shorter than a vector;
# rows / images of more than one statistics unit (4096 elements per row unit, 32768 per
# channels_last unit)
SHAPES = [((2, 64, 9, 11), 32), ((1, 6, 5, 7), 2), ((3, 40, 3, 3), 4), ((1, 4, 70, 70), 2),
          ((2, 96, 24, 20), 8)]
# NCHW rows under 4 units (S < 4 * 2W = 64 or 128 elements): a group is one run (G = C: one row
# per run; S = 1; a run not a whole number of units), unless the group is over 4096 elements
SHORT_ROWS = [((1, 256, 2, 2), 32), ((2, 64, 1, 1), 32), ((2, 64, 2, 2), 64),
              ((1, 40, 7, 9), 4), ((3, 24, 8, 8), 8), ((1, 12, 11, 11), 3), ((1, 1024, 3, 3), 1)]


@pytest.mark.parametrize("capability", _capabilities(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["NCHW", "NHWC"])
def test_every_variant_matches_reference(capability, dtype, cl, seed):
    for shape, G in SHAPES:
        x, p = _inputs(shape, dtype, cl)
        for act in ("silu", None):
            y = _run(x, G, p, act)
            assert y.stride() == x.stride()
            assert_close(y, _ref(x, G, p, act), dtype, scale=4.0,
                         msg=f"{capability} {shape} {act}")


@pytest.mark.parametrize("capability", _capabilities(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,G", SHORT_ROWS, ids=str)
def test_every_variant_short_rows(capability, dtype, shape, G, seed):
    x, p = _inputs(shape, dtype, False)
    for add in (True, False):
        q = dict(p, add=p["add"] if add else None)
        for mod in (True, False):
            q.update(scale=p["scale"] if mod else None, shift=p["shift"] if mod else None)
            for act in ("silu", None):
                assert_close(_run(x, G, q, act), _ref(x, G, q, act), dtype, scale=4.0,
                             msg=f"{capability} add={add} mod={mod} {act}")


@pytest.mark.parametrize("capability", _capabilities(), indirect=True)
@pytest.mark.parametrize("cl", [False, True], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("shape", [(2, 64, 30, 30), (2, 64, 4, 4)], ids=["rows", "short-rows"])
def test_every_variant_large_mean(capability, cl, shape, seed):
    x, p = _inputs(shape, torch.float32, cl, mean=1e4)
    p["add"] = p["add"] + 3e3
    assert_close(_run(x, 32, p), _ref(x, 32, p), torch.float32, scale=4.0, msg=capability)


@pytest.mark.parametrize("cl", [False, True], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("shape,G", [((2, 8, 70, 70), 2), ((4, 64, 40, 40), 1),
                                     ((1, 4, 33, 37), 4), ((16, 32, 16, 16), 32),
                                     ((2, 64, 4, 4), 32), ((1, 1024, 3, 3), 1)])
def test_same_bits_any_thread_count(threads, shape, G, cl, seed):
    """1 thread: one task per group (NCHW) / image (channels_last) where there are >= 4; more
    threads: the split passes. Both fold the same units in the same order."""
    x, p = _inputs(shape, torch.float32, cl, mean=3.0)
    outs = {}
    for n in (1, 2, 3, 8):
        torch.set_num_threads(n)
        outs[n] = _run(x, G, p)
    for n, y in outs.items():
        assert torch.equal(y, outs[1]), f"{n} threads differ from 1 thread"
    assert_close(outs[1], _ref(x, G, p), torch.float32, scale=4.0)


def test_capability_errors_and_default():
    C = _ext()
    assert C.cpu_capability() in C.cpu_capabilities() and C.cpu_capabilities()[0] == "DEFAULT"
    with pytest.raises(ValueError, match="set_cpu_capability: SSE9 is not one of the variants"):
        C.set_cpu_capability("SSE9")
    C.set_cpu_capability("DEFAULT")
    try:
        assert C.cpu_capability() == "DEFAULT"
    finally:
        C.set_cpu_capability("")
    assert C.cpu_capability() == C.cpu_capabilities()[-1]


@pytest.mark.parametrize("capability", _capabilities(), indirect=True)
@pytest.mark.parametrize("cl", [False, True], ids=["NCHW", "NHWC"])
def test_every_variant_extreme_activations(capability, cl, seed):
    """Normalized values up to ~±1000 (weight 300): SiLU of very negative values is ~0, never
    NaN (the vectorized exp saturates; its reciprocal must not turn that into 0 * inf)."""
    x, p = _inputs((2, 64, 8, 8), torch.float32, cl, mod=False)
    p.update(weight=torch.full((64,), 300.0), bias=torch.zeros(64), add=None)
    y = _run(x, 32, p)
    assert torch.isfinite(y).all()
    assert_close(y, _ref(x, 32, p), torch.float32, scale=300.0, msg=capability)
