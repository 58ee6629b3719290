"""Which backends exist on this machine, and the one rule that picks among them.

Backends:
  torch   the plain-PyTorch reference of each op (always available)
  triton  the Triton kernels in fastdiff.kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)
  cuda    the CUDA kernels of the extension fastdiff._C (CUDA tensors)
  cpu     the C++ kernels of the extension fastdiff._C (CPU tensors)

The rule (`pick`):
  * A backend forced with `use_backend(name)` or FASTDIFF_BACKEND=name is used by every op that
    implements it; an op without that implementation (e.g. attention has no `cpu` kernel) uses
    the `auto` choice. A forced backend that cannot run on the tensors' device raises.
  * `auto` on CUDA tensors: the order measured fastest for that op (AUTO_CUDA_ORDER, from
    benchmarks/results); on CPU tensors likewise from the CPU table (AUTO_CPU_ORDER, per op and
    where it differs per dtype / memory layout); the first available backend of the order runs.
    Under TRITON_INTERPRET=1, CPU tensors follow the CPU table (the interpreter is for tests).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading

BACKENDS = ("torch", "triton", "cuda", "cpu")

# Fastest first, per op, on CUDA tensors. Until a benchmark table under benchmarks/results says
# otherwise, the hand-written CUDA kernel is tried before Triton for the elementwise ops (no JIT
# warm-up, lower launch overhead) and Triton first for the reductions and attention.
AUTO_CUDA_ORDER = {
    "q_sample": ("cuda", "triton", "torch"),
    "sampler_step": ("cuda", "triton", "torch"),
    "multistep_step": ("cuda", "triton", "torch"),
    "group_norm_silu": ("triton", "cuda", "torch"),
    "attention": ("triton", "torch"),
}

# Per (op, dtype) exceptions to AUTO_CUDA_ORDER. fp32 attention: the Triton kernel's IEEE fp32
# dots spill 30-70 KB per thread at D=128/256 (ptxas -v, sm_90a), so PyTorch's fused SDPA (the
# `torch` backend on CUDA) goes first until a benchmark table says otherwise.
AUTO_CUDA_ORDER_BY_DTYPE = {
    ("attention", "float32"): ("torch", "triton"),
}

# Fastest first, per op, on CPU tensors: from benchmarks/results/<cpu>_<date>.md (2 threads,
# torch 2.13): the C++ group_norm_silu kernel beats the PyTorch reference in both layouts and every
# dtype; attention has no C++ kernel (the `torch` backend is PyTorch's SDPA, whose CPU flash kernel
# a new one would have to beat); q_sample / sampler_step with in-kernel noise run 10-100x faster
# in C++ than the reference's Philox in PyTorch ops.
AUTO_CPU_ORDER = {
    "q_sample": ("cpu", "torch"),
    "sampler_step": ("cpu", "torch"),
    "multistep_step": ("cpu", "torch"),  # 3-8x the reference, 200-700x with drawn noise (msop)
    "group_norm_silu": ("cpu", "torch"),
    "attention": ("torch",),
}

# Per (op, dtype, layout) exceptions to AUTO_CPU_ORDER (dtype as "float16", layout as
# "channels_last" / "contiguous"; None matches any). Empty: in the 2026-12-02 table at the final
# head every group_norm_silu row, both layouts, fp32 and bf16, is 1.52-2.06x eager, and the only
# other backend there, the `torch` reference, is slower than eager.
AUTO_CPU_ORDER_BY = {}

class _State(threading.local):
    """Per thread: the use_backend() stack (an attribute set in every thread: a missing
    threading.local attribute costs ~0.4 us to look up, on every op call)."""

    def __init__(self):
        self.stack = []


_state = _State()
_DEVICE_TYPES = {}  # torch.device -> its type (device.type makes a new str: ~0.25 us per call)


def env_reader(name: str):
    """A function returning os.environ.get(name), read afresh at every call (a test's
    monkeypatch.setenv, a script's os.environ[...] = ... take effect at once) at a tenth of
    os.environ.get's cost (~0.06 against ~0.6 us: no key encoding, no value decoding but of a
    value that is set): the ops read their switches on every call. Falls back to os.environ.get
    where os.environ is not CPython's os._Environ, or has been replaced."""
    env = os.environ
    data = getattr(env, "_data", None)
    encodekey, decodevalue = getattr(env, "encodekey", None), getattr(env, "decodevalue", None)
    if not isinstance(data, dict) or encodekey is None or decodevalue is None:
        return lambda: os.environ.get(name)
    key = encodekey(name)

    def read():
        if os.environ is not env:
            return os.environ.get(name)
        v = data.get(key)
        return None if v is None else decodevalue(v)
    return read


_ENV_BACKEND = env_reader("FASTDIFF_BACKEND")
_ENV_INTERPRET = env_reader("TRITON_INTERPRET")


def _interpret() -> bool:
    return _ENV_INTERPRET() == "1"


@functools.lru_cache(maxsize=None)
def extension():
    """(module or None, reason). Imports fastdiff._C once; never raises."""
    try:
        mod = importlib.import_module("fastdiff._C")
    except ImportError as e:  # not built, or built against another torch
        return None, f"extension fastdiff._C not built or not loadable ({e})"
    return mod, ""


@functools.lru_cache(maxsize=None)
def _triton_import():
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return False, f"triton not importable ({e.__class__.__name__}: {e})"
    return True, ""


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def backend_status() -> dict[str, tuple[bool, str]]:
    """For each backend: (available, reason it is not / what it runs on). Cached: every op call
    consults it, and nothing it depends on changes in a process but TRITON_INTERPRET."""
    return dict(_status(_interpret()))


@functools.lru_cache(maxsize=None)
def _available(interpret: bool) -> dict:
    # name -> available, for `pick` (a few µs per op call saved: no dict built per call); never
    # handed out, so never mutated
    return {name: ok for name, (ok, _) in _status(interpret)}


@functools.lru_cache(maxsize=None)
def _status(interpret: bool) -> tuple:
    import torch
    status = {"torch": (True, f"reference, torch {torch.__version__}")}
    ok, why = _triton_import()
    if not ok:
        status["triton"] = (False, why)
    elif _cuda_available():
        status["triton"] = (True, "CUDA tensors")
    elif interpret:
        status["triton"] = (True, "CPU tensors through TRITON_INTERPRET=1 (slow; for tests)")
    else:
        status["triton"] = (False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels "
                                   "on CPU tensors through the interpreter)")
    ext, why = extension()
    if ext is None:
        status["cpu"] = (False, why)
        status["cuda"] = (False, why)
    else:
        status["cpu"] = (True, "C++ kernels, CPU tensors")
        if not ext.with_cuda():
            status["cuda"] = (False, "extension built without CUDA (no CUDA torch or no nvcc "
                                     "at build time)")
        elif not _cuda_available():
            status["cuda"] = (False, "extension has CUDA kernels but no CUDA device is visible")
        else:
            status["cuda"] = (True, "CUDA kernels, CUDA tensors")
    return tuple(status.items())


def available(name: str) -> bool:
    return _available(_interpret())[name]


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {name!r}")
    return name


def requested() -> str:
    """The backend asked for right now: innermost use_backend(), else FASTDIFF_BACKEND, else auto."""
    stack = _state.stack
    if stack:
        return stack[-1]
    env = _ENV_BACKEND()
    env = env.strip() if env else ""
    if env:
        try:
            return _check_name(env)
        except ValueError:
            raise ValueError(f"FASTDIFF_BACKEND must be one of {BACKENDS + ('auto',)}, "
                             f"got {env!r}") from None
    return "auto"


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a `with` block. Raises at once if it is not available here."""
    _check_name(name)
    if name != "auto":
        ok, why = backend_status()[name]
        if not ok:
            raise RuntimeError(f"backend {name!r} is not available on this machine: {why}")
    stack = _state.stack
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


@functools.lru_cache(maxsize=None)
def _extension_has(op: str) -> bool:
    """An extension built from older sources may lack an op: then it is not offered for it."""
    import torch
    return extension()[0] is not None and hasattr(torch.ops.fastdiff_ext, op)


def _runs_on(name: str, device_type: str) -> bool:
    if name == "torch":
        return True
    if name == "cpu":
        return device_type == "cpu"
    if name == "cuda":
        return device_type == "cuda"
    if name == "triton":
        return device_type == "cuda" or (device_type == "cpu" and _interpret())
    return False


@functools.lru_cache(maxsize=None)
def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def auto_order(op: str, device_type: str, dtype=None, layout=None) -> tuple:
    """The backends `auto` tries for `op`, fastest first, on that device type (dtype and layout
    pick the tables' exceptions)."""
    dname = _dtype_name(dtype) if dtype is not None else None
    if device_type == "cuda":
        return (AUTO_CUDA_ORDER_BY_DTYPE and AUTO_CUDA_ORDER_BY_DTYPE.get((op, dname))) or \
            AUTO_CUDA_ORDER.get(op, ("triton", "cuda", "torch"))
    if device_type == "cpu":
        if AUTO_CPU_ORDER_BY:  # (empty: no key tuples to build per call)
            for key in ((op, dname, layout), (op, dname, None), (op, None, layout)):
                if key in AUTO_CPU_ORDER_BY:
                    return AUTO_CPU_ORDER_BY[key]
        return AUTO_CPU_ORDER.get(op, ("cpu", "torch"))
    return ("torch",)


def pick(op: str, implemented, device, dtype=None, layout=None) -> str:
    """Name of the backend that runs `op` on tensors on `device` (of `dtype`, in memory `layout`
    "contiguous" / "channels_last", when the auto order depends on them).

    `implemented`: the backends this op has. Raises ValueError/RuntimeError for a forced
    backend that is unavailable or cannot run on this device."""
    device_type = _DEVICE_TYPES.get(device)
    if device_type is None:
        import torch
        device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
        if isinstance(device, torch.device) and len(_DEVICE_TYPES) < 256:
            _DEVICE_TYPES[device] = device_type
    want = requested()
    if want != "auto" and want in implemented:
        ok = available(want)  # (the reason is looked up only to raise)
        why = "" if ok else backend_status()[want][1]
        if ok and want in ("cpu", "cuda") and not _extension_has(op):
            ok, why = False, f"the installed fastdiff._C has no {op} kernel (rebuild the extension)"
        if not ok:
            raise RuntimeError(f"backend {want!r} was requested for {op} but is not available: {why}")
        if not _runs_on(want, device_type):
            raise ValueError(f"backend {want!r} cannot run {op} on {device_type} tensors")
        return want
    for name in auto_order(op, device_type, dtype, layout):
        if name in implemented and available(name) and _runs_on(name, device_type) and (
                name not in ("cpu", "cuda") or _extension_has(op)):
            return name
    return "torch"
