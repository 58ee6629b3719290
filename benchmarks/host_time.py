"""Host time per call of q_sample, sampler_step and multistep_step with the argument checks on, for the path a
CUDA call takes, on this CPU (no GPU needed).

The stub, honestly: CPU tensors stand in for CUDA tensors; fastdiff.ops._checks._host_readable
is made to say False, so a tensor t is checked as a CUDA t is (one torch._assert_async over
the ranges, no host read), and the extension op (torch.ops.fastdiff_ext.<op>, the CUDA kernel's
entry point) is replaced by a no-op: everything the wrapper does on a CUDA call except the
kernel launch itself. The device ops the checks issue run on CPU tensors here; on a GPU each is
a launch instead (~3-6 us of host time), so the table also counts them per call.

    python benchmarks/host_time.py [--calls N] [--out benchmarks/results/host_time_<date>.md]
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastdiff  # noqa: E402
from fastdiff.ops import _checks  # noqa: E402


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def cases():
    s = fastdiff.Schedule()
    x = torch.randn(16, 4, 8, 8)  # small: CPU malloc of big buffers is not what a caching GPU allocator costs
    m = torch.randn_like(x)
    t = torch.full((16,), 500)
    tp = t - 1
    tp20 = t - 20
    coefs = torch.rand(8, fastdiff.ops.multistep_step.NCOEF, dtype=torch.float64)
    ring = torch.randn((2,) + tuple(x.shape))
    step = torch.tensor(3)
    return [
        ("q_sample, t tensor, seed", lambda: fastdiff.q_sample(x, t, s, seed=7)),
        ("q_sample, t int, seed", lambda: fastdiff.q_sample(x, 500, s, seed=7)),
        ("sampler_step ddpm, t tensors, seed", lambda: fastdiff.sampler_step(
            x, m, t, tp, s, clip_sample=True, seed=7)),
        ("sampler_step ddpm, t ints, seed", lambda: fastdiff.sampler_step(
            x, m, 500, 499, s, clip_sample=True, seed=7)),
        ("sampler_step ddim eta=1, t tensors", lambda: fastdiff.sampler_step(
            x, m, t, tp20, s, kind="ddim", eta=1.0, clip_sample=True, seed=7)),
        ("multistep_step, step tensor, seed", lambda: fastdiff.multistep_step(
            x, m, ring, coefs, step, seed=7)),
        ("multistep_step, step int, seed", lambda: fastdiff.multistep_step(
            x, m, ring, coefs, 3, seed=7)),
    ]


def measure(fn, calls: int):
    """(wall, this thread's CPU time) per call in us, medians of 7 rounds: on a contended
    machine the CPU time leaves out the time the thread waited for a core."""
    for _ in range(50):
        fn()
    wall, cpu = [], []
    for _ in range(7):
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(calls):
            fn()
        wall.append((time.perf_counter() - t0) / calls * 1e6)
        cpu.append((time.thread_time() - c0) / calls * 1e6)
    return statistics.median(wall), statistics.median(cpu)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    noop = lambda *args, **kw: None  # noqa: E731 - the kernel launch, stubbed
    rows = []
    assert fastdiff.backends.available("cpu"), "the C++ extension is not built"
    ext = torch.ops.fastdiff_ext
    ext.q_sample, ext.sampler_step, ext.multistep_step  # resolve (lazy) first
    with mock.patch.object(_checks, "_host_readable", lambda t: False), \
            mock.patch.object(torch.ops.fastdiff_ext, "q_sample", noop), \
            mock.patch.object(torch.ops.fastdiff_ext, "sampler_step", noop), \
            mock.patch.object(torch.ops.fastdiff_ext, "multistep_step", noop), \
            fastdiff.use_backend("cpu"):
        for name, fn in cases():
            with CountOps() as c:
                fn()
            wall, cpu = measure(fn, a.calls)
            rows.append((name, wall, cpu, len(c.ops), ", ".join(sorted(set(o.split(".")[1] for o in c.ops)))))
    date = datetime.date.today().isoformat()
    lines = [f"# Host time per call, checks on, CUDA-like path with the launch stubbed ({date})", "",
             "`python benchmarks/host_time.py` on this machine: 2 shared CPU cores, contended by "
             "other jobs while it ran (5 sessions share them), torch "
             f"{torch.__version__}, 1 thread. Median of 7 rounds of {a.calls} calls. CPU "
             "tensors stand in for CUDA ones (see the module docstring); `ops` counts the "
             "aten ops a call issues (allocations and the device-side assert's small kernels; "
             "each is a launch on a GPU).", "",
             f"Load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.", "",
             "| call | wall µs | thread CPU µs | ops | which |", "|---|---:|---:|---:|---|"]
    lines += [f"| {n} | {w:.1f} | {c:.1f} | {k} | {o} |" for n, w, c, k, o in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
