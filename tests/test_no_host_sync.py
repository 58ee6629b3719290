"""No host sync on the CUDA path of q_sample / sampler_step (issue 15 item 7), on a machine with
no GPU: the calls run under FakeTensorMode with CUDA tensors, where reading a value on the host
(.item(), .tolist(), bool(), int(), nonzero) raises, and a recorder notes every aten op, so a
check that reads a device `t` back fails here. Python-int timesteps are checked in plain Python:
no tensor op at all."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import fastdiff
from fastdiff.ops import _checks


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        devs = {a.device.type for a in args if isinstance(a, torch.Tensor)}
        outs = out if isinstance(out, (tuple, list)) else (out,)
        to_cpu = any(isinstance(o, torch.Tensor) and o.device.type == "cpu" for o in outs)
        self.ops.append((str(func), "cuda" in devs and to_cpu))
        return out


def _run_fake(fn):
    """fn(x, t, t_prev, ...) on fake CUDA tensors; returns the recorded (op, cuda->cpu) pairs."""
    s = fastdiff.Schedule()  # a fresh one: the tables it caches for "cuda" will be fake
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(2, 4, 8, 8, device="cuda")
        t = torch.empty(2, dtype=torch.int64, device="cuda")
        tp = torch.empty(2, dtype=torch.int64, device="cuda")
        seed = torch.empty((), dtype=torch.int64, device="cuda")
        with _Recorder() as rec:
            fn(s, x, t, tp, seed)
    return rec.ops


CALLS = {
    "q_sample": lambda s, x, t, tp, seed: fastdiff.q_sample(x, t, s, seed=3),
    "q_sample device seed/first_index": lambda s, x, t, tp, seed: fastdiff.q_sample(
        x, t, s, seed=seed, first_index=seed, v_target=True),
    "q_sample noise given": lambda s, x, t, tp, seed: fastdiff.q_sample(x, t, s, noise=x),
    "sampler_step ddpm": lambda s, x, t, tp, seed: fastdiff.sampler_step(x, x, t, tp, s, seed=3),
    "sampler_step ddim": lambda s, x, t, tp, seed: fastdiff.sampler_step(
        x, x, t, tp, s, kind="ddim", eta=1.0, seed=seed, return_x0=True),
    "sampler_step int t_prev": lambda s, x, t, tp, seed: fastdiff.sampler_step(
        x, x, t, -1, s, seed=3),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_device_timesteps_checked_without_host_sync(name, monkeypatch):
    monkeypatch.setenv("FASTDIFF_CHECKS", "1")
    ops = _run_fake(CALLS[name])
    names = [op for op, _ in ops]
    assert any("_assert_async" in op for op in names), f"no device-side check ran: {names}"
    assert not any(to_cpu for _, to_cpu in ops), f"a device tensor was copied to the host: {ops}"
    assert not any(op.startswith(("aten._local_scalar_dense", "aten.nonzero")) for op in names), \
        names


def test_the_harness_catches_a_host_read():
    """The test above can fail: a host read of a fake CUDA tensor raises, a copy is recorded."""
    with pytest.raises(Exception):
        _run_fake(lambda s, x, t, tp, seed: t.max().item())
    with pytest.raises(Exception):
        _run_fake(lambda s, x, t, tp, seed: t.tolist())
    assert any(to_cpu for _, to_cpu in _run_fake(lambda s, x, t, tp, seed: t.cpu()))


def test_int_timesteps_checked_in_plain_python():
    """An int t (and t_prev) costs no tensor op for its checks, and errors still name it."""
    with _Recorder() as rec:
        _checks.timestep_values(1000, ("t", 500, 0), ("t_prev", 480, None),
                                ordered="kind='ddpm' needs t_prev < t")
    assert rec.ops == []
    with pytest.raises(ValueError, match="t=1000 is out of range"):
        _checks.timestep_values(1000, ("t", 1000, 0))
    with pytest.raises(ValueError, match="needs t_prev < t: got t_prev=500 >= t=500"):
        _checks.timestep_values(1000, ("t", 500, 0), ("t_prev", 500, None),
                                ordered="kind='ddpm' needs t_prev < t")


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_the_device_side_check_trips_on_bad_values(kind, monkeypatch):
    """The device path's torch._assert_async itself (run on CPU tensors standing in for CUDA
    ones; on the CPU it raises at once): in-range values pass, each out-of-range one (and ddpm's
    order) fails with the message naming what was expected."""
    monkeypatch.setenv("FASTDIFF_CHECKS", "1")
    monkeypatch.setattr(_checks, "_host_readable", lambda t: False)
    s = fastdiff.Schedule()
    x = torch.randn(2, 4, 4)
    T = s.num_train_timesteps
    good_t, good_tp = torch.tensor([5, T - 1]), torch.tensor([4, -1])
    fastdiff.sampler_step(x, torch.randn_like(x), good_t, good_tp, s, kind=kind, seed=1)
    fastdiff.q_sample(x, good_t, s, seed=1)
    bad = [(torch.tensor([5, T]), good_tp), (torch.tensor([-1, 5]), good_tp),
           (good_t, torch.tensor([4, T]))]
    if kind == "ddpm":
        bad.append((good_t, torch.tensor([5, -1])))  # t_prev == t
    for t, tp in bad:
        with pytest.raises(RuntimeError, match="timesteps out of range: expected t in"):
            fastdiff.sampler_step(x, torch.randn_like(x), t, tp, s, kind=kind, seed=1)
    with pytest.raises(RuntimeError, match="timesteps out of range"):
        fastdiff.q_sample(x, torch.tensor([0, T]), s, seed=1)
