"""No host sync on the CUDA path of q_sample / sampler_step / multistep_step (issue 15): with a
device t / t_prev / step / seed / first_index the ops check the values by a device-side assert
and read nothing back (no .item()/.tolist()/.cpu()/.numpy(), no aten._local_scalar_dense, no
nonzero, no device->host copy). There is no GPU in CI, so two harnesses stand in for it:
- CPU tensors sent down the CUDA path (_checks._host_readable made to say False, as
  benchmarks/host_time.py does) with every host read forbidden;
- fake CUDA tensors under FakeTensorMode, where a host read raises and a recorder notes every
  aten op (so a device->host copy is seen).
Python-int timesteps are checked in plain Python: no tensor op at all."""
from unittest import mock

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import fastdiff
from fastdiff.ops import _checks
from fastdiff.ops.multistep_step import NCOEF


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
            lambda: fastdiff.sampler_step(x, torch.randn_like(x), 9, 8, s, seed=1),
            lambda: _multistep_cpu(x, torch.randn_like(x), step=torch.tensor(2),
                                   seed=torch.tensor(5), first_index=torch.tensor([3]))]


@pytest.mark.parametrize("k", range(6))
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


# --- fake CUDA tensors (FakeTensorMode): a host read raises, every aten op is recorded ---

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
    """fn(s, x, t, t_prev, seed) on fake CUDA tensors; returns the recorded (op, cuda->cpu) pairs."""
    s = fastdiff.Schedule()  # a fresh one: the tables it caches for "cuda" will be fake
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(2, 4, 8, 8, device="cuda")
        t = torch.empty(2, dtype=torch.int64, device="cuda")
        tp = torch.empty(2, dtype=torch.int64, device="cuda")
        seed = torch.empty((), dtype=torch.int64, device="cuda")
        with _Recorder() as rec:
            fn(s, x, t, tp, seed)
    return rec.ops


FAKE_CALLS = {
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


@pytest.mark.parametrize("name", list(FAKE_CALLS))
def test_device_timesteps_checked_without_host_sync(name, monkeypatch):
    monkeypatch.setenv("FASTDIFF_CHECKS", "1")
    ops = _run_fake(FAKE_CALLS[name])
    names = [op for op, _ in ops]
    assert any("_assert_async" in op for op in names), f"no device-side check ran: {names}"
    assert not any(to_cpu for _, to_cpu in ops), f"a device tensor was copied to the host: {ops}"
    assert not any(op.startswith(("aten._local_scalar_dense", "aten.nonzero")) for op in names), \
        names


def test_the_fake_harness_catches_a_host_read():
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


# --- device seed / first_index / guidance_scale / step: the ranges the Python numbers get ---

def _scalar_calls(x, **kw):
    s = fastdiff.Schedule()
    guided = "guidance_scale" in kw  # model_output is then [uncond; cond]
    m2 = torch.randn(((2 if guided else 1) * x.shape[0],) + tuple(x.shape[1:]))
    return {
        "q_sample": lambda: fastdiff.q_sample(x, torch.tensor([3, 9]), s, **kw),
        "sampler_step": lambda: fastdiff.sampler_step(x, m2, torch.tensor([9, 7]),
                                                      torch.tensor([8, 6]), s, **kw),
        "multistep_step": lambda: _multistep_cpu(x, m2, **kw),
    }


def _multistep_cpu(x, m2, step=1, **kw):
    coefs = torch.rand(4, NCOEF, dtype=torch.float64)
    ring = torch.randn((2,) + tuple(x.shape))
    return fastdiff.multistep_step(x, m2, ring, coefs, step, **kw)


BAD_SCALARS = [  # (kwargs, ops it applies to, the ValueError (host) / device-assert text)
    (dict(seed=7, first_index=torch.tensor(2 ** 32 - 1)), ("q_sample", "sampler_step", "multistep_step"),
     "first_index"),
    (dict(seed=7, first_index=torch.tensor([-1])), ("q_sample", "sampler_step", "multistep_step"),
     "first_index"),
    (dict(seed=7, guidance_scale=torch.tensor(float("nan"))), ("sampler_step", "multistep_step"),
     "guidance_scale"),
    (dict(seed=7, guidance_scale=torch.tensor([float("inf")])), ("sampler_step", "multistep_step"),
     "guidance_scale"),
    (dict(step=torch.tensor(4)), ("multistep_step",), "step"),
    (dict(step=torch.tensor([-1])), ("multistep_step",), "step"),
]


@pytest.mark.parametrize("device_path", [False, True])
@pytest.mark.parametrize("k", range(len(BAD_SCALARS)))
def test_device_scalars_are_range_checked(k, device_path, monkeypatch):
    """Each documented range of an int/float argument holds for its tensor form too: a CPU
    tensor raises a ValueError naming it (host memory, no sync), a device tensor trips the
    device-side assert (CPU tensors standing in), and in-range tensors pass."""
    monkeypatch.setenv("FASTDIFF_CHECKS", "1")
    if device_path:
        monkeypatch.setattr(_checks, "_host_readable", lambda t: False)
    kw, ops, name = BAD_SCALARS[k]
    x = torch.randn(2, 3, 4, 4)
    good = {key: (torch.tensor(1) if key in ("first_index", "step") else
                  torch.tensor(2.0) if key == "guidance_scale" else v) for key, v in kw.items()}
    for op in ops:
        _scalar_calls(x, **good)[op]()
        exc, msg = (RuntimeError, f"argument out of range: expected .*{name}") if device_path \
            else (ValueError, f"{name} must be")
        with pytest.raises(exc, match=msg):
            _scalar_calls(x, **kw)[op]()


def test_device_scalars_unchecked_where_values_are_trusted(monkeypatch):
    """FASTDIFF_CHECKS=0 skips the value checks (the kernels clamp what they index with)."""
    monkeypatch.setenv("FASTDIFF_CHECKS", "0")
    x = torch.randn(2, 3, 4, 4)
    _scalar_calls(x, seed=7, first_index=torch.tensor(2 ** 32 - 1))["q_sample"]()
