"""A device timestep costs no host sync: with a tensor t the ops check it by a device-side assert
and read no value back (no .item()/.tolist()/.cpu()/.numpy(), no aten._local_scalar_dense).
There is no GPU in CI, so CPU tensors stand in for CUDA ones: _checks._host_readable is made to
say False, which sends them down the CUDA path (benchmarks/host_time.py times the same path)."""
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastdiff
from fastdiff.ops import _checks


class NoHostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:  # .item(), int(t), bool(t)
            raise AssertionError("a value read back to the host (a sync on a GPU)")
        return func(*args, **(kwargs or {}))


def _forbid(name):
    def f(*a, **k):
        raise AssertionError(f"Tensor.{name}: a value read back to the host (a sync on a GPU)")
    return f


def _device_path():
    patches = [mock.patch.object(_checks, "_host_readable", lambda t: False)]
    patches += [mock.patch.object(torch.Tensor, n, _forbid(n)) for n in ("tolist", "item", "cpu",
                                                                        "numpy")]
    return patches


def _calls():
    s = fastdiff.Schedule()
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([7, 9])
    return [lambda: fastdiff.q_sample(x, t, s, seed=1),
            lambda: fastdiff.q_sample(x, 7, s, seed=torch.tensor(3)),
            lambda: fastdiff.sampler_step(x, torch.randn_like(x), t, t - 1, s, seed=1),
            lambda: fastdiff.sampler_step(x, torch.randn_like(x), t, t - 20, s, kind="ddim",
                                          eta=1.0, seed=1),
            lambda: fastdiff.sampler_step(x, torch.randn_like(x), 9, 8, s, seed=1)]


@pytest.mark.parametrize("k", range(5))
def test_device_timesteps_read_nothing_back(k):
    call = _calls()[k]
    ps = _device_path()
    for p in ps:
        p.start()
    try:
        with NoHostReads():
            call()
    finally:
        for p in ps:
            p.stop()


def test_the_harness_catches_a_host_read():
    """The host path (a CPU tensor read on the host) reads values: the harness must see it."""
    s = fastdiff.Schedule()
    x = torch.randn(2, 3, 4, 4)
    ps = [mock.patch.object(torch.Tensor, "tolist", _forbid("tolist"))]
    for p in ps:
        p.start()
    try:
        with pytest.raises(AssertionError, match="read back"):
            fastdiff.q_sample(x, torch.tensor([7, 9]), s, seed=1)
    finally:
        for p in ps:
            p.stop()


@pytest.mark.parametrize("kw, t, tp", [
    (dict(), [7, 1000], [6, 5]),            # t >= T
    (dict(), [7, 9], [6, 9]),               # ddpm t_prev >= t
    (dict(kind="ddim", eta=0.0), [-1, 9], [-5, 3]),  # t < 0
])
def test_device_assert_fires_on_bad_values(kw, t, tp):
    """On the device path a bad value is a device-side assert (torch._assert_async; on a CPU
    tensor it raises at once, on a GPU at the next synchronising call)."""
    s = fastdiff.Schedule()
    x = torch.randn(2, 3, 4, 4)
    with mock.patch.object(_checks, "_host_readable", lambda t: False):
        with pytest.raises(RuntimeError, match="timesteps out of range"):
            fastdiff.sampler_step(x, torch.randn_like(x), torch.tensor(t), torch.tensor(tp), s,
                                  seed=1, **kw)
