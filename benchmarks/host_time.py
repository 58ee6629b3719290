"""Host time per call of q_sample, sampler_step and multistep_step with the argument checks on, for the path a
CUDA call takes, on this CPU (no GPU needed).

The stub, honestly: CPU tensors stand in for CUDA tensors and the cpu backend for the cuda one:
both are the extension's kernels, which range-check the values they read (csrc/value_checks.h),
so the wrapper runs the same code for both (no check op). The extension op
(torch.ops.fastdiff_ext.<op>, the kernel's entry point) is replaced by a no-op: everything the
wrapper does on a CUDA call except the launch itself. Not counted: on CUDA, the entry point's
own host work and, for tensor t/step/guidance values, its one-block check kernel launch
(~2-3 us on a GPU). fastdiff.ops._checks._host_readable is made to say False (it matters only
for the torch/Triton backends' torch._assert_async path).

    python benchmarks/host_time.py [--calls N] [--out benchmarks/results/host_time_<date>.md]
        [--against DIR [--pairs N]]

--against DIR: another checkout (its fastdiff/_C built, e.g. `git worktree add` of main plus a
copy of the .so when csrc/ is unchanged) timed on the same cases, in subprocesses alternating
with this checkout's (A B A B ...: the machine is shared, its load drifts), the medians of the
pairs beside the table: thread CPU time, the measure of a change.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from unittest import mock

import torch

_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the checkout whose fastdiff is timed (a --against worker: the other one)
sys.path.insert(0, os.environ.get("FASTDIFF_HOST_TIME_ROOT") or _HERE)
import fastdiff  # noqa: E402
from fastdiff.ops import _checks  # noqa: E402


def count_ops(fn):
    """The top-level aten ops one call issues (torch.profiler: a dispatch mode would send the
    call down the custom-op path instead of the one it takes without one)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
        fn()
    return [e.name.replace("aten::", "") for e in p.events() if e.name.startswith("aten::") and (
        e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]


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
    last = torch.randn_like(x)  # UniPC's previous sample
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
        ("multistep_step unipc, step tensor, last_sample", lambda: fastdiff.multistep_step(
            x, m, ring, coefs, step, last_sample=last)),
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


def stubbed():
    """The context of every measurement: the launch a no-op, the device path, the cpu backend."""
    noop = lambda *args, **kw: None  # noqa: E731 - the kernel launch, stubbed
    assert fastdiff.backends.available("cpu"), "the C++ extension is not built"
    ext = torch.ops.fastdiff_ext
    ext.q_sample, ext.sampler_step, ext.multistep_step  # resolve (lazy) first
    stack = mock.patch.multiple(torch.ops.fastdiff_ext, q_sample=noop, sampler_step=noop,
                                multistep_step=noop)
    return [mock.patch.object(_checks, "_host_readable", lambda t: False), stack,
            fastdiff.use_backend("cpu")]


def worker(calls: int):
    """--worker: this process's fastdiff (FASTDIFF_HOST_TIME_ROOT) on the cases, as JSON
    {case: thread CPU us}; NaN where that checkout cannot run a case."""
    torch.set_num_threads(1)
    out = {}
    ctx = stubbed()
    for c in ctx:
        c.__enter__()
    for name, fn in cases():
        try:
            fn()
            out[name] = measure(fn, calls)[1]
        except Exception:  # an older checkout without what the case uses
            out[name] = float("nan")
    print(json.dumps({"fastdiff": os.path.dirname(fastdiff.__file__), "cpu_us": out}))


def against(other: str, pairs: int, calls: int) -> dict:
    """{case: (median at other, median here)} over `pairs` alternating worker runs."""
    got = {other: [], _HERE: []}
    for _ in range(pairs):
        for root in (other, _HERE):
            env = dict(os.environ, FASTDIFF_HOST_TIME_ROOT=root)
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker",
                                "--calls", str(calls)], env=env, check=True,
                               capture_output=True, text=True)
            res = json.loads(r.stdout.strip().splitlines()[-1])
            want = os.path.realpath(os.path.join(root, "fastdiff"))
            assert os.path.realpath(res["fastdiff"]) == want, (res["fastdiff"], want)
            got[root].append(res["cpu_us"])
    names = [n for n, _ in cases()]
    med = {root: {n: statistics.median(r[n] for r in rs) for n in names} for root, rs in got.items()}
    return {n: (med[other][n], med[_HERE][n]) for n in names}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000, help="calls per round (7 rounds)")
    ap.add_argument("--out", default=None, help="write the table here (atomically)")
    ap.add_argument("--against", default=None, metavar="DIR",
                    help="another checkout to time alternately with this one")
    ap.add_argument("--pairs", type=int, default=5, help="A/B alternations with --against")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.calls)
    torch.set_num_threads(1)
    rows = []
    ctx = stubbed()
    load0 = os.getloadavg()[0]
    for c in ctx:
        c.__enter__()
    try:
        for name, fn in cases():
            fn()
            ops = count_ops(fn)
            wall, cpu = measure(fn, a.calls)
            rows.append((name, wall, cpu, len(ops), ", ".join(sorted(set(ops)))))
    finally:
        for c in reversed(ctx):
            c.__exit__(None, None, None)
    ab = against(os.path.abspath(a.against), a.pairs, max(a.calls // 4, 100)) if a.against \
        else None
    date = datetime.date.today().isoformat()
    lines = [f"# Host time per call, checks on, CUDA-like path with the launch stubbed ({date})", "",
             f"`python benchmarks/host_time.py` on this machine: {os.cpu_count()} CPU cores, "
             f"load average {load0:.1f} at the start and {os.getloadavg()[0]:.1f} at the end "
             f"(other jobs share the cores), torch {torch.__version__}, 1 thread. Median of 7 "
             f"rounds of {a.calls} calls. CPU tensors stand in for CUDA ones and the cpu backend "
             "for the cuda one (the same wrapper code: the kernels check the values; see the "
             "module docstring); `ops` counts the top-level aten ops a call issues "
             "(allocations; each would be a launch or an allocator call on a GPU).", "",
             "| call | wall µs | thread CPU µs | ops | which |", "|---|---:|---:|---:|---|"]
    lines += [f"| {n} | {w:.1f} | {c:.1f} | {k} | {o} |" for n, w, c, k, o in rows]
    if ab:
        lines += ["", f"Against `{a.against}` (`--against`): thread CPU µs per call, each the "
                  f"median of {a.pairs} runs alternating with this checkout's (subprocesses; "
                  f"a run: the median of 7 rounds of {max(a.calls // 4, 100)} calls); load "
                  f"average {os.getloadavg()[0]:.1f} after.", "",
                  "| call | against µs | this µs | this / against |", "|---|---:|---:|---:|"]
        lines += [f"| {n} | {o:.1f} | {w:.1f} | "
                  f"{'-' if math.isnan(o) else f'{w / o:.2f}'} |" for n, (o, w) in ab.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
