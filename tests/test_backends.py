"""Backend status, forcing and the dispatch rule."""
import importlib
import subprocess
import sys
import warnings

import pytest
import torch

import fastdiff
from fastdiff import backends


def test_status_reports_every_backend_with_reason():
    st = fastdiff.backend_status()
    assert set(st) == set(backends.BACKENDS)
    assert st["torch"][0]
    for name, (ok, why) in st.items():
        assert isinstance(why, str) and why, name


def test_use_backend_unknown_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        with fastdiff.use_backend("cudnn"):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_use_backend_unavailable_raises_with_reason():
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is not available on this machine: "):
        with fastdiff.use_backend("cuda"):
            pass


def test_use_backend_nests_and_restores():
    assert backends.requested() in backends.BACKENDS + ("auto",)
    before = backends.requested()
    with fastdiff.use_backend("torch"):
        assert backends.requested() == "torch"
        with fastdiff.use_backend("auto"):
            assert backends.requested() == "auto"
        assert backends.requested() == "torch"
    assert backends.requested() == before


def test_env_variable(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "torch")
    assert backends.requested() == "torch"
    assert backends.pick("q_sample", ("torch", "cpu"), "cpu") == "torch"
    monkeypatch.setenv("FASTDIFF_BACKEND", "nope")
    with pytest.raises(ValueError, match="FASTDIFF_BACKEND must be one of"):
        backends.requested()


def test_auto_on_cpu_prefers_cpp_then_reference(monkeypatch):
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    want = "cpu" if backends.available("cpu") else "torch"
    assert backends.pick("q_sample", ("torch", "triton", "cuda", "cpu"), "cpu") == want
    assert backends.pick("attention", ("torch", "triton"), "cpu") == "torch"


def test_forced_backend_the_op_lacks_falls_back_to_auto(monkeypatch):
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    if not backends.available("cpu"):
        pytest.skip("extension not built")
    with fastdiff.use_backend("cpu"):
        assert backends.pick("attention", ("torch", "triton"), "cpu") == "torch"


@pytest.mark.skipif(not backends.available("cpu"), reason="extension not built")
def test_forced_backend_on_wrong_device_raises():
    with fastdiff.use_backend("cpu"):
        with pytest.raises(ValueError, match="backend 'cpu' cannot run q_sample on meta tensors"):
            backends.pick("q_sample", ("torch", "cpu"), "meta")


def test_import_without_triton_and_extension():
    """A missing backend is never an import error."""
    code = (
        "import sys, torch\n"
        "sys.modules['triton'] = None  # makes `import triton` raise ImportError\n"
        "sys.modules['fastdiff._C'] = None\n"
        "import torch, fastdiff\n"
        "st = fastdiff.backend_status()\n"
        "assert not st['triton'][0] and 'triton not importable' in st['triton'][1], st\n"
        "assert not st['cpu'][0] and 'not built' in st['cpu'][1], st\n"
        "s = fastdiff.Schedule()\n"
        "x, e = fastdiff.q_sample(torch.randn(2, 3), torch.tensor([1, 2]), s, seed=0)\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "TRITON_INTERPRET": "0"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_cli_info_runs():
    r = subprocess.run([sys.executable, "-m", "fastdiff", "info"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for name in backends.BACKENDS:
        assert f"  {name}" in r.stdout
    assert "torch " in r.stdout and "device" in r.stdout


def test_auto_order_on_cuda_follows_the_tables(monkeypatch):
    """The rule itself, with every backend pretended available: per-op order, per-dtype
    exceptions (fp32 attention goes to torch's SDPA)."""
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    monkeypatch.setattr(backends, "available", lambda name: True)
    monkeypatch.setattr(backends, "_runs_on", lambda name, device_type: True)
    monkeypatch.setattr(backends, "_extension_has", lambda op: True)
    allb = ("torch", "triton", "cuda", "cpu")
    assert backends.pick("q_sample", allb, "meta") == "torch"  # neither CPU nor CUDA
    for op, order in backends.AUTO_CUDA_ORDER.items():
        impl = allb if op != "attention" else ("torch", "triton")
        assert backends.pick(op, impl, torch.device("cuda"), torch.float16) == order[0]
    assert backends.pick("attention", ("torch", "triton"), torch.device("cuda"), torch.float32) == "torch"
    assert backends.pick("attention", ("torch", "triton"), torch.device("cuda"), torch.bfloat16) == "triton"


def test_run_op_calls_the_body_only_where_that_is_the_same():
    """Plain eager calls skip the custom-op dispatcher (host time); autograd, meta/fake tensors,
    dispatch modes and functorch transforms still go through the op."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from fastdiff.ops._checks import run_op

    def op(*a):
        return "op"

    def body(*a):
        return "body"

    x = torch.randn(2)
    assert run_op(op, body, x, 3, None) == "body"
    with torch.no_grad():  # a module's parameters
        assert run_op(op, body, x, torch.nn.Parameter(torch.randn(2))) == "body"
    traced = []
    with warnings.catch_warnings():  # torch.jit.trace is deprecated, still used
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.trace(lambda r: traced.append(run_op(op, body, r)) or r * 2, (x,),
                        check_trace=False)
    assert traced == ["op"]
    assert run_op(op, body, x.clone().requires_grad_(), 3) == "op"
    with torch.no_grad():
        assert run_op(op, body, x.clone().requires_grad_(), 3) == "body"
    assert run_op(op, body, torch.empty(2, device="meta")) == "op"

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))
    with Mode():
        assert run_op(op, body, x) == "op"
    seen = []
    torch.func.vmap(lambda r: seen.append(run_op(op, body, r)) or r)(torch.randn(3, 2))
    assert seen == ["op"]


def test_triton_launchers_run_on_their_tensors_device(monkeypatch):
    """kernels.on_tensor_device makes the tensors' GPU current around a launch (Triton launches
    on the current device): simulated here with a stand-in for a tensor on cuda:1."""
    pytest.importorskip("triton")
    import contextlib
    from fastdiff.kernels import on_tensor_device
    entered = []

    @contextlib.contextmanager
    def device(d):
        entered.append(d)
        yield
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)

    class OnGPU1:
        is_cuda = True
        device = torch.device("cuda", 1)

    launch = on_tensor_device(lambda first, n: (first, n))
    t = OnGPU1()
    assert launch(t, 3) == (t, 3) and entered == [torch.device("cuda", 1)]
    OnGPU1.device = torch.device("cuda", 0)  # already current: no switch
    launch(t, 3)
    cpu = torch.randn(2)
    assert launch(cpu, 1)[0] is cpu and len(entered) == 1


def test_auto_order_on_cpu_follows_the_cpu_table(monkeypatch):
    """CPU tensors: the op's order in AUTO_CPU_ORDER, its (op, dtype, layout) exceptions first;
    group_norm_silu passes its layout."""
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    monkeypatch.setattr(backends, "available", lambda name: True)
    monkeypatch.setattr(backends, "_extension_has", lambda op: True)
    allb = ("torch", "triton", "cuda", "cpu")
    for op, order in backends.AUTO_CPU_ORDER.items():
        impl = allb if op != "attention" else ("torch", "triton")
        assert backends.pick(op, impl, "cpu", torch.float16) == order[0], op
    assert backends.AUTO_CPU_ORDER["attention"][0] == "torch"  # SDPA; no C++ kernel to prefer
    monkeypatch.setattr(backends, "AUTO_CPU_ORDER_BY", {
        ("group_norm_silu", None, "channels_last"): ("torch", "cpu"),
        ("group_norm_silu", "bfloat16", "contiguous"): ("torch",)})
    pick = backends.pick
    assert pick("group_norm_silu", allb, "cpu", torch.float32, "channels_last") == "torch"
    assert pick("group_norm_silu", allb, "cpu", torch.float32, "contiguous") == "cpu"
    assert pick("group_norm_silu", allb, "cpu", torch.bfloat16, "contiguous") == "torch"
    from fastdiff.ops.group_norm_silu import group_norm_silu
    seen = []
    real = backends.pick
    monkeypatch.setattr(backends, "pick", lambda *a, **k: seen.append(a[3:]) or real(*a, **k))
    x = torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last)
    with torch.no_grad():
        group_norm_silu(x, None, None, 2)
    # (asked twice: by the direct CPU path, which then leaves the call to the general one)
    assert seen and set(seen) == {(torch.float32, "channels_last")}


def test_cli_info_shows_the_cpu_choice():
    r = subprocess.run([sys.executable, "-m", "fastdiff", "info"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "auto choice per op on CPU tensors" in r.stdout
    for op, order in backends.AUTO_CPU_ORDER.items():
        assert f"  {op:<16} {' > '.join(order)}   -> " in r.stdout
    if backends.available("cpu"):
        assert "C++ CPU kernels: " in r.stdout and "DEFAULT" in r.stdout


def test_torch_attention_on_cpu_is_sdpa(monkeypatch, seed):
    """The `torch` backend on CPU tensors runs PyTorch's SDPA (no Lq×Lk matrix), not the
    reference; float64 still runs the reference."""
    import torch.nn.functional as F
    att = importlib.import_module("fastdiff.ops.attention")
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(att.F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))

    def no_ref(*a, **k):
        raise AssertionError("the reference ran")
    monkeypatch.setattr(att, "attention_ref", no_ref)
    q, k, v = (torch.randn(1, 2, 9, 32) for _ in range(3))
    with fastdiff.use_backend("torch"), torch.no_grad():
        o = att.attention(q, k, v)
    assert calls == [torch.float32] and o.shape == q.shape
    monkeypatch.undo()
    assert torch.allclose(o, att.attention_ref(q.double(), k.double(), v.double()).float(),
                          atol=1e-5)
