"""Shared by the pytest-benchmark microbenchmarks (benchmarks/test_bench_<op>.py).

Each microbenchmark times one op on small-to-medium shapes with each fastdiff backend that runs
on this machine (on CPU: the `torch` reference and the C++ `cpu` kernels; on CUDA: triton, cuda)
beside the plain eager PyTorch code. FASTDIFF_BENCH_TINY=1 shrinks the shapes (the smoke test).
"""
from __future__ import annotations

import contextlib
import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = os.environ.get("FASTDIFF_BENCH_TINY") == "1"


def sizes(small_medium, tiny):
    return tiny if TINY else small_medium


def impls(op: str, implemented) -> list:
    """'eager' plus the fastdiff backends of `op` that run on DEVICE here (Triton's CPU
    interpreter excepted: it is a test tool, not something to time)."""
    from fastdiff import backends
    status = backends.backend_status()
    has = getattr(backends, "_extension_has", lambda op: True)
    out = ["eager"]
    for b in implemented:
        if not status[b][0] or not backends._runs_on(b, DEVICE) or (
                b == "triton" and DEVICE != "cuda") or (b in ("cpu", "cuda") and not has(op)):
            continue
        out.append(b)
    return out


def run(benchmark, impl: str, fastdiff_fn, eager_fn, group: str):
    """Times eager_fn (impl 'eager') or fastdiff_fn under use_backend(impl); synchronises the
    device after each call so the time covers the kernels, not only their launch."""
    from fastdiff import use_backend
    benchmark.group = group
    fn = eager_fn if impl == "eager" else fastdiff_fn

    def call():
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    ctx = contextlib.nullcontext() if impl == "eager" else use_backend(impl)
    with ctx, torch.no_grad():
        return benchmark(call)
