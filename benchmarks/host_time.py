"""Host time per call of q_sample and sampler_step on the CUDA path, measured on a machine with
no GPU (issue 15 item 7: <= 15 us per call with checks on, no host sync with a device `t`).

    python benchmarks/host_time.py [--calls 3000] [--repeats 7] [--out FILE.md]

What runs is everything the public wrapper does on a CUDA call except the kernel launch:
- backends.pick answers "cuda" (as on a GPU machine), and the extension's op is replaced by a
  function that returns at once: the launch (and the C++ wrapper's own argument checks) is the
  only part not timed;
- tensors live on the CPU, standing in for CUDA ones: _checks._host_readable answers False, so
  the timestep values take the device path (one torch._assert_async), as a CUDA `t` does;
- every other step (argument checks, output allocation, the schedule tables' cache, the
  custom-op bypass) is the real code.
Honest limits: each tensor op the wrapper issues on the device path (the "ops" column: the
device-side range check, torch.full for an int t, empty_like for outputs) is timed as a CPU op
on a tiny tensor; on a GPU it is a kernel launch or a caching-allocator call instead (a launch
costs ~2-5 us of host time), so the device-t rows are a lower bound there. Median over repeats
of the mean of `calls` calls, in this thread's CPU time (time.thread_time: on the shared 2-core
machine, with other jobs beside it, wall time counts their turns too; CPU time does not, but
cache and frequency effects of the contention remain).
"""
import argparse
import contextlib
import os
import platform
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastdiff
from fastdiff import backends
from fastdiff.ops import _checks


class _OpCount(TorchDispatchMode):
    """Counts the aten ops a call issues (each one a kernel launch or allocation on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def cuda_path_stubbed():
    """The wrappers take their CUDA branch with the launch stubbed (see the module docstring)."""
    backends.extension()
    ns = torch.ops.fastdiff_ext
    saved = {name: getattr(ns, name) for name in ("q_sample", "sampler_step")}
    pick, readable = backends.pick, _checks._host_readable
    backends.pick = lambda op, *a, **k: "cuda" if op in saved else pick(op, *a, **k)
    _checks._host_readable = lambda t: False
    for name in saved:
        setattr(ns, name, lambda *a, **k: None)
    try:
        yield
    finally:
        backends.pick, _checks._host_readable = pick, readable
        for name, op in saved.items():
            setattr(ns, name, op)


def cases():
    s = fastdiff.Schedule()
    x = torch.randn(2, 4, 8, 8)
    m = torch.randn_like(x)
    t, tp = torch.tensor([500, 20]), torch.tensor([480, 0])
    seed_t, first_t = torch.tensor(7), torch.tensor([3])
    return [
        ("q_sample, int t, seed int", lambda: fastdiff.q_sample(x, 500, s, seed=7)),
        ("q_sample, device t, seed int", lambda: fastdiff.q_sample(x, t, s, seed=7)),
        ("q_sample, device t, device seed + first_index",
         lambda: fastdiff.q_sample(x, t, s, seed=seed_t, first_index=first_t)),
        ("q_sample, given noise, device t", lambda: fastdiff.q_sample(x, t, s, noise=m)),
        ("sampler_step ddpm, int t / t_prev, seed int",
         lambda: fastdiff.sampler_step(x, m, 500, 480, s, seed=7)),
        ("sampler_step ddpm, device t / t_prev, seed int",
         lambda: fastdiff.sampler_step(x, m, t, tp, s, seed=7)),
        ("sampler_step ddim eta=0, device t / t_prev",
         lambda: fastdiff.sampler_step(x, m, t, tp, s, kind="ddim")),
        ("sampler_step ddpm, device t, device seed, return_x0",
         lambda: fastdiff.sampler_step(x, m, t, tp, s, seed=seed_t, first_index=first_t,
                                       return_x0=True)),
    ]


def time_call(fn, calls, repeats):
    for _ in range(200):
        fn()
    means = []
    for _ in range(repeats):
        t0 = time.thread_time()
        for _ in range(calls):
            fn()
        means.append((time.thread_time() - t0) / calls)
    return statistics.median(means) * 1e6


def count_ops(fn):
    with _OpCount() as c:
        fn()
    return len(c.ops)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None, help="also write the table to this .md file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with cuda_path_stubbed():
        for name, fn in cases():
            os.environ["FASTDIFF_CHECKS"] = "1"
            on, ops_on = time_call(fn, args.calls, args.repeats), count_ops(fn)
            os.environ["FASTDIFF_CHECKS"] = "0"
            off, ops_off = time_call(fn, args.calls, args.repeats), count_ops(fn)
            os.environ.pop("FASTDIFF_CHECKS")
            rows.append((name, on, ops_on, off, ops_off))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"# Host time per call, CUDA path with the launch stubbed ({platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}, 1 thread, CPU time of the calling thread, load average {load:.2f} on a shared 2-core machine)",
             "",
             "`python benchmarks/host_time.py` (see its docstring for what is stubbed). Target "
             "(issue 15): <= 15 us with checks on, no host sync with a device t.",
             "",
             "| call | checks on (us) | ops | FASTDIFF_CHECKS=0 (us) | ops |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {n} | {a:.1f} | {oa} | {b:.1f} | {ob} |" for n, a, oa, b, ob in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
