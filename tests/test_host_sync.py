"""No host sync on the CUDA path of q_sample / sampler_step / multistep_step (issue 15): with a
device t / t_prev / step / seed / first_index the ops read nothing back (no
.item()/.tolist()/.cpu()/.numpy(), no aten._local_scalar_dense, no nonzero, no device->host
copy). Who checks the values:
- the extension's kernels (backends cpu and cuda) check the values they read themselves
  (csrc/value_checks.h: the CPU kernels on the host, raising a ValueError naming the argument;
  the CUDA kernels by a device-side assert), so the wrapper issues no check op at all;
- for the torch and Triton backends the wrapper checks a device tensor by one device-side assert
  (torch._assert_async) and a CPU tensor on the host.
There is no GPU in CI, so two harnesses stand in for it:
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
from fastdiff import backends
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
    """The host path (a CPU tensor read on the host by the wrapper: the torch backend) reads
    values: the harness must see it."""
    s = fastdiff.Schedule()
    x = torch.randn(2, 3, 4, 4)
    ps = [mock.patch.object(torch.Tensor, "tolist", _forbid("tolist"))]
    for p in ps:
        p.start()
    try:
        with pytest.raises(AssertionError, match="read back"), fastdiff.use_backend("torch"):
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
    """On the device path of the torch/Triton backends a bad value is a device-side assert
    (torch._assert_async; on a CPU tensor it raises at once, on a GPU at the next synchronising
    call)."""
    s = fastdiff.Schedule()
    x = torch.randn(2, 3, 4, 4)
    with mock.patch.object(_checks, "_host_readable", lambda t: False), \
            fastdiff.use_backend("torch"):
        with pytest.raises(RuntimeError, match="timesteps out of range"):
            fastdiff.sampler_step(x, torch.randn_like(x), torch.tensor(t), torch.tensor(tp), s,
                                  seed=1, **kw)


# --- fake CUDA tensors (FakeTensorMode): a host read raises, every aten op is recorded ---

class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []
        self.calls = []  # (op, args) of the fastdiff ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        devs = {a.device.type for a in args if isinstance(a, torch.Tensor)}
        outs = out if isinstance(out, (tuple, list)) else (out,)
        to_cpu = any(isinstance(o, torch.Tensor) and o.device.type == "cpu" for o in outs)
        self.ops.append((str(func), "cuda" in devs and to_cpu))
        if str(func).startswith("fastdiff."):
            self.calls.append((str(func), args))
        return out


def _run_fake(fn, calls=False):
    """fn(s, x, t, t_prev, seed) on fake CUDA tensors; returns the recorded (op, cuda->cpu) pairs
    (and with calls, the fastdiff ops' (name, args))."""
    s = fastdiff.Schedule()  # a fresh one: the tables it caches for "cuda" will be fake
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(2, 4, 8, 8, device="cuda")
        t = torch.empty(2, dtype=torch.int64, device="cuda")
        tp = torch.empty(2, dtype=torch.int64, device="cuda")
        seed = torch.empty((), dtype=torch.int64, device="cuda")
        if calls:  # the schedule's tables uploaded once first (a copy per schedule, not per call)
            fn(s, x, t, tp, seed)
        with _Recorder() as rec:
            fn(s, x, t, tp, seed)
    return (rec.ops, rec.calls) if calls else rec.ops


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
    """The torch/Triton backends (no CUDA here: auto picks torch for fake CUDA tensors): one
    device-side assert, nothing read back."""
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
    """The device path's torch._assert_async itself (the torch/Triton backends; run on CPU
    tensors standing in for CUDA ones; on the CPU it raises at once): in-range values pass, each
    out-of-range one (and ddpm's order) fails with the message naming what was expected."""
    monkeypatch.setenv("FASTDIFF_CHECKS", "1")
    monkeypatch.setattr(_checks, "_host_readable", lambda t: False)
    monkeypatch.setattr(backends, "requested", lambda: "torch")
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


@pytest.mark.parametrize("path", ["kernel", "host", "device"])
@pytest.mark.parametrize("k", range(len(BAD_SCALARS)))
def test_device_scalars_are_range_checked(k, path, monkeypatch):
    """Each documented range of an int/float argument holds for its tensor form too: a CPU
    tensor raises a ValueError naming it (host memory, no sync: the C++ kernel's check on the
    cpu backend), a device tensor on the torch/Triton backends trips the wrapper's device-side
    assert (CPU tensors standing in), and in-range tensors pass."""
    monkeypatch.setenv("FASTDIFF_CHECKS", "1")
    device_path = path == "device"
    if device_path:
        monkeypatch.setattr(_checks, "_host_readable", lambda t: False)
    if path != "kernel":  # the wrapper's checks (the torch backend standing in for Triton)
        monkeypatch.setattr(backends, "requested", lambda: "torch")
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


# --- the extension's backends (cpu, cuda): the kernels check, the wrapper issues no check op ---

def _pretend_cuda_backend(monkeypatch):
    """auto picks the extension's CUDA kernels for (fake) CUDA tensors, as on a GPU machine."""
    real = backends.available
    monkeypatch.setattr(backends, "available", lambda name: name == "cuda" or real(name))
    monkeypatch.setattr(backends, "_extension_has", lambda op: True)


FAKE_EXT_CALLS = dict(FAKE_CALLS, **{
    "sampler_step guided": lambda s, x, t, tp, seed: fastdiff.sampler_step(
        x, torch.empty((4,) + tuple(x.shape[1:]), device="cuda"), t, tp, s, seed=3,
        first_index=seed, guidance_scale=torch.empty((), device="cuda")),
})
# (multistep_step cannot run on fake tensors: its storage-sharing check reads data pointers;
# test_cpu_backend_wrapper_issues_no_check_ops covers it)
# ops a call may issue besides the kernel: a tensor's device, views and allocations (never a
# check's compare, reduction or assert; each would be a launch on a GPU)
_NOT_CHECKS = ("prim.device", "aten.view", "aten.reshape", "aten._unsafe_view", "aten.expand",
               "aten.alias", "aten.full", "aten.empty", "aten.new_empty")


@pytest.mark.parametrize("name", list(FAKE_EXT_CALLS))
def test_cuda_backend_issues_no_device_check_ops(name, monkeypatch):
    """With the CUDA backend picked, the wrapper hands the range checks to the kernel (its
    `checks` argument: CHECK_VALUES, plus CHECK_FIRST_INDEX for an int64 device first_index) and
    issues no check op of its own: no _assert_async, no compare or reduction, nothing read back."""
    monkeypatch.setenv("FASTDIFF_CHECKS", "1")
    _pretend_cuda_backend(monkeypatch)
    ops, calls = _run_fake(FAKE_EXT_CALLS[name], calls=True)
    assert len(calls) == 1, ops
    op, args = calls[0]
    others = [o for o, _ in ops if not o.startswith(("fastdiff.",) + _NOT_CHECKS)]
    assert others == [], f"{name}: the wrapper issued {others}"
    assert not any(to_cpu for _, to_cpu in ops), ops
    want = _checks.CHECK_VALUES | (_checks.CHECK_FIRST_INDEX if "first_index" in name or
                                   "guided" in name else 0)
    assert (args[-2], args[-1]) == ("cuda", want), (op, args[-2:])


def test_cuda_backend_checks_nothing_for_ints(monkeypatch):
    """Python ints are checked in plain Python: the kernel is told to check nothing (on CUDA: no
    check kernel launched)."""
    monkeypatch.setenv("FASTDIFF_CHECKS", "1")
    _pretend_cuda_backend(monkeypatch)
    for fn in (lambda s, x, t, tp, seed: fastdiff.q_sample(x, 7, s, seed=3),
               lambda s, x, t, tp, seed: fastdiff.sampler_step(x, x, 9, 8, s, seed=3)):
        ops, calls = _run_fake(fn, calls=True)
        assert calls[0][1][-1] == 0
        assert [o for o, _ in ops if not o.startswith(("fastdiff.",) + _NOT_CHECKS)] == []


def test_cuda_backend_checks_off_where_values_are_trusted(monkeypatch):
    """FASTDIFF_CHECKS=0 / trusted_values(): the kernel is told to check nothing."""
    _pretend_cuda_backend(monkeypatch)
    monkeypatch.setenv("FASTDIFF_CHECKS", "0")
    _, calls = _run_fake(FAKE_EXT_CALLS["q_sample"], calls=True)
    assert calls[0][1][-1] == 0
    monkeypatch.setenv("FASTDIFF_CHECKS", "1")
    with _checks.trusted_values():
        _, calls = _run_fake(FAKE_EXT_CALLS["sampler_step ddpm"], calls=True)
    assert calls[0][1][-1] == 0


def _aten_ops(fn):
    """The top-level aten ops fn() issues (torch.profiler: unlike a dispatch mode it leaves the
    call on the path it takes without one)."""
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
        fn()
    return [e.name for e in p.events() if e.name.startswith("aten::") and (
        e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]


def test_cpu_backend_wrapper_issues_no_check_ops(monkeypatch):
    """The cpu backend runs the wrapper code the cuda backend does (the kernels check): tensor
    timesteps, step, first_index and guidance cost no tensor op but the allocations of the
    outputs asked for (those not asked for are one shared empty tensor), and the kernel is
    asked to check them."""
    monkeypatch.setenv("FASTDIFF_CHECKS", "1")
    monkeypatch.delenv("FASTDIFF_POISON", raising=False)  # (the suite's NaN fill: a fill_ each)
    monkeypatch.setattr(backends, "requested", lambda: "cpu")
    seen = []
    for op in ("q_sample", "sampler_step", "multistep_step"):  # the kernel launch, recorded
        monkeypatch.setattr(torch.ops.fastdiff_ext, op,
                            lambda *a, _op=op: seen.append((_op, a[-1])), raising=False)
    x = torch.randn(2, 3, 4, 4)
    m2 = torch.randn(4, 3, 4, 4)
    s = fastdiff.Schedule()
    t, tp, one, w = torch.tensor([7, 9]), torch.tensor([6, 8]), torch.tensor([1]), torch.tensor([2.0])
    coefs = torch.rand(4, NCOEF, dtype=torch.float64)
    ring = torch.randn((2,) + tuple(x.shape))
    calls = {
        "q_sample": (lambda: fastdiff.q_sample(x, t, s, seed=1, first_index=one),
                     ["aten::empty_like", "aten::empty_like"]),
        "sampler_step": (lambda: fastdiff.sampler_step(x, m2, t, tp, s, seed=1, first_index=one,
                                                       guidance_scale=w),
                         ["aten::empty_like"]),
        "multistep_step": (lambda: fastdiff.multistep_step(x, m2, ring, coefs, one, seed=1,
                                                           first_index=one, guidance_scale=w),
                           ["aten::empty_like"]),
    }
    views = ("aten::reshape", "aten::view", "aten::expand", "aten::alias")
    for name, (fn, want) in calls.items():
        seen.clear()
        assert sorted(o for o in _aten_ops(fn) if o not in views) == sorted(want), name
        assert seen[-1] == (name, _checks.CHECK_VALUES | _checks.CHECK_FIRST_INDEX), seen


# --- the C++ CPU kernels' own checks (csrc/value_checks.h): ValueErrors naming the argument ---

CPU_EXT = pytest.mark.skipif(not backends.available("cpu"), reason="the C++ CPU kernels are not built")
ALL = _checks.CHECK_VALUES | _checks.CHECK_FIRST_INDEX


@CPU_EXT
def test_cpu_q_sample_kernel_checks_what_it_reads():
    s = fastdiff.Schedule()
    x0 = torch.randn(2, 3, 4, 4)
    ab = s.table("sqrt_alphas_cumprod", "cpu", torch.float32)
    s1 = s.table("sqrt_one_minus_alphas_cumprod", "cpu", torch.float32)

    noise = torch.randn_like(x0)

    def call(t, first_t=None, checks=ALL):
        x_t, empty = torch.empty_like(x0), x0.new_empty(0)
        torch.ops.fastdiff_ext.q_sample(x0, torch.tensor(t), ab, s1, noise, 7, None, 0, first_t,
                                        x_t, empty, empty, checks)
        return x_t

    call([0, 999])
    with pytest.raises(ValueError, match=r"t has values in \[0, 1000\], outside \[0, 1000\)"):
        call([0, 1000])
    with pytest.raises(ValueError, match=r"t has values in \[-1, 5\], outside \[0, 1000\)"):
        call([5, -1])
    with pytest.raises(ValueError, match=r"first_index must be in \[0, 4294967294\], got 4294967295"):
        call([1, 2], torch.tensor([2 ** 32 - 1]))
    with pytest.raises(ValueError, match=r"first_index must be in .*got -1"):
        call([1, 2], torch.tensor([-1]))
    # unchecked (checks off; or a narrower first_index dtype, its 32-bit word): no error, and
    # the out-of-range t reads the table's ends (the kernels clamp)
    assert torch.equal(call([-5, 5000], checks=0), call([0, 999], checks=0))
    call([1, 2], torch.tensor([-1]), checks=_checks.CHECK_VALUES)


@CPU_EXT
def test_cpu_sampler_step_kernel_checks_what_it_reads():
    s = fastdiff.Schedule()
    B, x = 2, torch.randn(2, 3, 4, 4)
    ps = x[0].numel()
    ab = s.table("alphas_cumprod", "cpu", torch.float64)

    def call(t, tp, kind=0, w=None, first_t=None, checks=ALL):
        mo = torch.randn(2 * B if w is not None else B, 3, 4, 4)
        out, x0 = torch.empty_like(x), x.new_empty(0)
        torch.ops.fastdiff_ext.sampler_step(
            x, mo, torch.tensor(t), torch.tensor(tp), ab, None, None, 7, None, 0, first_t, True,
            kind, 0, 0, 0.0, 0, 1.0, True, False, ps, ps, ps, 0, B * ps if w is not None else 0,
            1.0, None if w is None else torch.tensor([w]), out, x0, checks)

    call([9, 5], [8, -1])
    call([9, 5], [20, 7], kind=1)  # ddim: t_prev > t is the inversion step
    for t, tp, kind, match in (
            ([9, 1000], [8, 7], 0, r"t has values in \[9, 1000\], outside \[0, 1000\)"),
            ([9, 5], [8, 1000], 1, r"t_prev has values in \[8, 1000\], outside \(-inf, 1000\) "
                                   r"\(any negative value is the final step\)"),
            ([9, 5], [8, 5], 0, r"kind='ddpm' needs t_prev < t \(a step towards t = 0\): got "
                                r"t_prev=5 >= t=5 for sample 1")):
        with pytest.raises(ValueError, match=match):
            call(t, tp, kind=kind)
        call(t, tp, kind=kind, checks=0)  # unchecked: clamped, no error
    with pytest.raises(ValueError, match="guidance_scale must be finite, got nan"):
        call([9, 5], [8, 4], w=float("nan"))
    call([9, 5], [8, 4], w=float("nan"), checks=0)
    with pytest.raises(ValueError, match=r"first_index must be in \[0, 4294967294\], got 4294967295"):
        call([9, 5], [8, 4], first_t=torch.tensor([2 ** 32 - 1]))


@CPU_EXT
def test_cpu_multistep_step_kernel_checks_what_it_reads():
    B, x = 2, torch.randn(2, 3, 4, 4)
    coefs = torch.rand(4, NCOEF, dtype=torch.float64) + 0.5
    ring = torch.randn((2,) + tuple(x.shape))

    def call(step, w=None, first_t=None, checks=ALL):
        mo = torch.randn(2 * B if w is not None else B, 3, 4, 4)
        torch.ops.fastdiff_ext.multistep_step(
            x, mo, ring, coefs, 0, torch.tensor([step]), None, None, None, 7, None, 0, first_t,
            True, 0, 0, 1.0, x.numel() if w is not None else 0, 1.0,
            None if w is None else torch.tensor([w]), torch.empty_like(x), checks)

    call(3)
    for step, match in ((4, r"step must be in \[0, 3\], got 4"), (-1, r"step must be in \[0, 3\], got -1")):
        with pytest.raises(ValueError, match=match):
            call(step)
        call(step, checks=0)  # unchecked: clamped into the table
    with pytest.raises(ValueError, match="guidance_scale must be finite, got inf"):
        call(1, w=float("inf"))
    with pytest.raises(ValueError, match=r"first_index must be in \[0, 4294967294\], got 4294967295"):
        call(1, first_t=torch.tensor([2 ** 32 - 1]))
    call(1, first_t=torch.tensor([2 ** 32 - 1]), checks=_checks.CHECK_VALUES)


# --- the host-time shortcuts (benchmarks/host_time.py): none lets through what the checks refuse ---

def test_remembered_options_still_refuse_what_the_checks_refuse():
    """sampler_step/multistep_step remember checked options per (value, type): True == 1.0 as a
    dict key, but a bool is refused where a number is asked for; an unhashable option and an
    invalid combination are refused whatever was remembered before."""
    s = fastdiff.Schedule()
    x = torch.randn(2, 3, 4, 4)
    m = torch.randn_like(x)
    t = torch.tensor([9, 7])

    def step(**kw):
        return fastdiff.sampler_step(x, m, t, t - 1, s, seed=1, **kw)

    def multi(**kw):
        return _multistep_cpu(x, m, seed=1, **kw)

    for _ in range(2):  # the second round hits what the first remembered
        step(kind="ddim", eta=1.0, clip_sample=True, clip_sample_range=1.0)
        step(kind="ddim", eta=1, clip_sample=True, clip_sample_range=1)  # ints are numbers
        multi(clip_sample=True, clip_sample_range=1.0)
        with pytest.raises(TypeError, match="eta must be a number"):
            step(kind="ddim", eta=True)
        with pytest.raises(TypeError, match="clip_sample_range must be a number"):
            step(clip_sample=True, clip_sample_range=True)
        with pytest.raises(TypeError, match="clip_sample_range must be a number"):
            multi(clip_sample=True, clip_sample_range=True)
        with pytest.raises(ValueError, match="exclusive"):
            step(clip_sample=True, thresholding=True)
        with pytest.raises(ValueError, match="exclusive"):
            multi(clip_sample=True, thresholding=True, clip_sample_range=1.0)
        with pytest.raises(ValueError, match="kind must be one of"):
            step(kind=["ddpm"])  # unhashable: not looked up, refused by the check
        with pytest.raises(TypeError, match="sample_max_value must be a number"):
            multi(sample_max_value=[1.0])


def test_direct_takes_the_op_for_what_it_cannot_see():
    """_checks.direct: any argument that autograd, a subclass or a transform must see sends the
    call through the custom op, in any position."""
    x, t = torch.randn(2, 3), torch.tensor([1, 2])
    assert _checks.direct(x, x, t, None)
    assert not _checks.direct(x, None, x.clone().requires_grad_())
    with torch.no_grad():
        assert _checks.direct(x, x.clone().requires_grad_())
    assert not _checks.direct(x, t, torch.nn.Buffer(x).as_subclass(_Sub))
    assert not _checks.direct(x.to("meta"))
    with _Recorder():
        assert not _checks.direct(x)


class _Sub(torch.Tensor):
    pass


def test_spare_outputs_stay_out_of_the_op_path():
    """The shared empty tensor for outputs not asked for is used only where the body is called
    straight: after calls through the op (autograd; a fake-tensor trace) and in inference mode it
    is still a plain tensor, without autograd history, usable in and out of inference mode."""
    s = fastdiff.Schedule()
    x = torch.randn(2, 3, 4, 4)
    m = torch.randn_like(x)
    t = torch.tensor([9, 7])
    _checks._SPARE.clear()
    with torch.inference_mode():
        y_inf = fastdiff.sampler_step(x, m, t, t - 1, s, seed=1)
        fastdiff.q_sample(x, t, s, seed=1)
    y = fastdiff.sampler_step(x, m, t, t - 1, s, seed=1)  # the spare made in inference mode
    fastdiff.q_sample(x, t, s, seed=1)
    y_grad = fastdiff.sampler_step(x.clone().requires_grad_(), m, t, t - 1, s, seed=1)
    assert y_grad.grad_fn is not None  # through the op
    for fn in FAKE_CALLS.values():
        _run_fake(fn)
    assert torch.equal(y, y_inf) and torch.equal(y, y_grad.detach())
    assert _checks._SPARE, "no spare was made"
    for v in _checks._SPARE.values():
        assert type(v) is torch.Tensor and v.numel() == 0
        assert not v.requires_grad and v.grad_fn is None and not v.is_inference()


def test_multistep_fast_checks_fall_back_to_the_named_errors():
    """multistep_step checks coefs, ring and last_sample in a few reads first; anything off the
    common case still gets the error naming it, and the shared-memory pairs (x_t's too) hold."""
    x = torch.randn(2, 3, 4, 4)
    m = torch.randn_like(x)
    coefs = torch.rand(4, NCOEF, dtype=torch.float64)
    ring = torch.randn((2,) + tuple(x.shape))
    last = torch.randn_like(x)
    fastdiff.multistep_step(x, m, ring, coefs, 1, last_sample=last)  # the common case
    for kw, err, match in (
            (dict(coefs=coefs.float()), TypeError, "coefs must be float64"),
            (dict(coefs=coefs[:, :-1]), ValueError, "coefs must have shape"),
            (dict(coefs=coefs[0]), ValueError, "coefs must have 2 dims"),
            (dict(coefs=coefs.to("meta")), ValueError, "coefs is on meta"),
            (dict(ring=ring.double()), TypeError, "ring must be float32"),
            (dict(ring=ring[:, :1]), ValueError, r"ring must have shape \(2, 2, 3, 4, 4\)"),
            (dict(ring=torch.randn((4,) + tuple(x.shape))), ValueError, "1 <= K <= 3"),
            (dict(last_sample=last.double()), TypeError, "last_sample must be float32"),
            (dict(last_sample=last[:1]), ValueError, r"last_sample must have shape \(2, 3, 4, 4\)"),
            (dict(model_output=m.double()), TypeError, "model_output must have the dtype of x_t"),
            (dict(model_output=m[:1]), ValueError, r"model_output must have shape \(2, 3, 4, 4\)"),
            (dict(x_t=ring[0]), ValueError, "x_t and ring must not share memory"),
            (dict(x_t=last), ValueError, "x_t and last_sample must not share memory")):
        a = dict(x_t=x, model_output=m, ring=ring, coefs=coefs, step=1, last_sample=last)
        a.update(kw)
        with pytest.raises(err, match=match):
            fastdiff.multistep_step(**a)


def test_host_time_benchmark_runs(capsys, monkeypatch):
    """benchmarks/host_time.py (not timed here): every case runs on the stubbed path and the
    table lists it."""
    import importlib.util
    import os
    if not backends.available("cpu"):
        pytest.skip("the C++ CPU kernels are not built")
    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "host_time.py")
    spec = importlib.util.spec_from_file_location("host_time", path)
    ht = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ht)
    monkeypatch.setattr(ht, "measure", lambda fn, calls: (fn(), (1.0, 1.0))[1])
    ht.main(["--calls", "1"])
    out = capsys.readouterr().out
    for name, _ in ht.cases():
        assert f"| {name} | 1.0 | 1.0 |" in out
