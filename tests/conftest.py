"""Shared test setup.

Without a CUDA device the Triton kernels run through the interpreter (TRITON_INTERPRET=1 is set
here, before anything imports triton), on CPU tensors and small shapes. With a GPU the same tests
run the compiled kernels on CUDA tensors. GPU-only cases carry the `gpu` marker and are skipped
without one; nothing queries the GPU at import time beyond torch.cuda.is_available()."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["FASTDIFF_POISON"] = "1"  # output buffers start as NaN (fastdiff.ops._checks.empty_like)

import pytest  # noqa: E402

from fastdiff import backends  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

# Tolerances per dtype: (elementwise atol, elementwise rtol, ||out - ref|| / ||ref||)
TOL = {
    torch.float32: (1e-5, 1e-5, 1e-6),
    torch.float16: (2e-3, 1e-2, 1e-3),
    torch.bfloat16: (1.6e-2, 2e-2, 8e-3),
    torch.float64: (1e-12, 1e-12, 1e-13),
}


def backends_for(op: str, implemented, device: str = DEVICE):
    """The backends of `op` that can run on `device` on this machine (torch always)."""
    out = []
    for name in implemented:
        ok, _ = backends.backend_status()[name]
        if ok and backends._runs_on(name, torch.device(device).type):
            out.append(name)
    return out


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype=None, *, scale: float = 1.0, msg=""):
    """out (any dtype) against a float64 reference: elementwise and relative-norm bounds."""
    dtype = dtype or out.dtype
    atol, rtol, nrel = TOL[dtype]
    o, r = out.double().cpu(), ref.double().cpu()
    assert o.shape == r.shape, f"{msg} shape {tuple(o.shape)} != {tuple(r.shape)}"
    assert torch.isfinite(o).all(), f"{msg} non-finite output"
    err = (o - r).abs()
    bound = atol * scale + rtol * r.abs()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (f"{msg} elementwise: max err {err.max():.3g}; at flat index "
                                  f"{int(worst)}: out {o.flatten()[worst]:.8g} ref {r.flatten()[worst]:.8g}")
    denom = r.norm().clamp_min(1e-30)
    assert (o - r).norm() / denom <= nrel * max(scale, 1.0), \
        f"{msg} relative norm error {(o - r).norm() / denom:.3g} > {nrel}"


@pytest.fixture(params=["triton", "cuda"])
def gpu_backend(request):
    """A GPU backend of this machine (skipped without a CUDA device or that backend)."""
    import fastdiff
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    if not fastdiff.backends.available(request.param):
        pytest.skip(f"{request.param} not available")
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """One thread for a module of tiny models: fastest for them, and on a shared 2-core machine
    two threads wait on each other. Take it with pytestmark = pytest.mark.usefixtures(...)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def seed():
    torch.manual_seed(1234)
    return 1234


def pytest_collection_modifyitems(config, items):
    """On a CUDA machine, `slow` cases (e.g. the full attention sweep: one Triton compile per
    case) are skipped unless asked for with any -m expression or FASTDIFF_SLOW=1, so that a plain
    `pytest tests` fits a GPU session's 10-minute call. Without a GPU nothing changes."""
    if not HAS_CUDA or config.getoption("markexpr") or os.environ.get("FASTDIFF_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow on a GPU machine: `-m slow` or FASTDIFF_SLOW=1 runs it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
