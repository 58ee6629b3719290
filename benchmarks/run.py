"""fastdiff benchmark suite: fastdiff against PyTorch eager, torch.compile and diffusers.

    python benchmarks/run.py                         # every suite, every anchor shape (≤ 10 min)
    python benchmarks/run.py --quick --ops attention
    python benchmarks/run.py --only NHWC --dtypes bf16 --no-compile
    python -m fastdiff bench [same options]
    python benchmarks/run.py --threads 2             # no GPU: the CPU table at 2 threads

On a CUDA device: measures the copy bandwidth and matmul rate, then each case of each suite, and
writes benchmarks/results/<gpu>_<date>[_quick].{json,md,png} (and prints the table). A run
starts no new case after --budget-s (default 540 s on a GPU: the whole command stays within
10 minutes; the cases left are listed as not run). Without a GPU (or with `--device cpu`): the
same suites on CPU tensors at their "cpu" shapes, with a side-by-side table first (fastdiff's
`auto` choice against eager PyTorch and diffusers, minimum times, GB/s against the measured CPU
copy bandwidth; thread count and CPU name in the header), written as
benchmarks/results/<cpu>_<date>.{json,md}; torch.compile rows only with --compile there.
`--tiny` runs the suites at tiny shapes instead (a check of the harness, not a measurement to
keep); `--micro` the pytest-benchmark microbenchmarks (`pytest benchmarks --benchmark-only`).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # `python benchmarks/run.py` from anywhere
    sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from benchmarks.harness import (Ctx, DeviceLost, environment, format_markdown,  # noqa: E402
                                parse_dtypes, reason, steady_allocator, write_results)
from benchmarks.suites import SUITES, SuiteSkip  # noqa: E402


DEFAULT_BUDGET_S = 540.0  # + the last case, the floors and the writers: within 10 minutes


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="fastdiff bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=",".join(SUITES),
                   help=f"comma-separated suites (default: all of {', '.join(SUITES)})")
    p.add_argument("--only", metavar="NAME", default=None,
                   help="run only the cases whose label contains NAME, e.g. '2x320x64x64', "
                        "'NHWC', 'DDIM', 'bf16' (labels: '<suite> <variant> <shape> <dtype> "
                        "<layout>')")
    p.add_argument("--quick", action="store_true", help="fewer shapes, fewer repetitions")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated, of fp16,bf16,fp32 (default: each suite's anchor dtypes)")
    p.add_argument("--out", default=str(HERE / "results"), help="output folder")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--compile", action="store_true",
                   help="on CPU: add the torch.compile rows too (off by default there: inductor "
                        "compiles each case for tens of seconds on a small CPU)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads (torch.set_num_threads; default: torch's)")
    p.add_argument("--tiny", action="store_true",
                   help="on CPU: tiny shapes (a check of the harness, not a measurement)")
    p.add_argument("--micro", action="store_true",
                   help="run the pytest-benchmark microbenchmarks instead of the suites")
    p.add_argument("--budget-s", type=float, default=None, metavar="S",
                   help=f"start no new case after S seconds (the cases left are listed as not "
                        f"run; default {DEFAULT_BUDGET_S:.0f} on a GPU, 'inf' for no limit); "
                        "results are written as the run goes (<stem>_partial.*), so a killed "
                        "run leaves them too")
    p.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in args.ops if o not in SUITES]
    if unknown:
        p.error(f"unknown suite(s) {unknown}; choose from {', '.join(SUITES)}")
    try:
        args.dtype_list = parse_dtypes(args.dtypes)
    except ValueError as e:
        p.error(str(e))
    return args


def _pytest_main(args: list) -> int:
    import pytest
    return int(pytest.main(args))


def cpu_microbenchmarks(args) -> int:
    """The pytest-benchmark microbenchmarks of the selected ops, in this process."""
    try:
        import pytest_benchmark  # noqa: F401
    except ImportError as e:
        print(f"pytest-benchmark is not installed ({e}): nothing to run on CPU. "
              "`pip install pytest-benchmark`, or run on a CUDA machine.")
        return 0
    files = [str(f) for op in args.ops if (f := HERE / f"test_bench_{op}.py").exists()]
    if not files:
        print(f"no microbenchmarks for {args.ops}")
        return 0
    extra = ["--benchmark-min-rounds=1", "--benchmark-max-time=0.05",
             "--benchmark-warmup=off"] if args.quick else []
    if args.only:  # every word of the label filter must match a test id
        extra += ["-k", " and ".join(args.only.split())]
    ignored = [flag for flag, on in (("--dtypes", args.dtypes), ("--no-compile", args.no_compile),
                                     ("--budget-s", args.budget_s)) if on]
    if ignored:
        print(f"({', '.join(ignored)}: options of the GPU suite, not used by the CPU "
              "microbenchmarks)")
    rc = _pytest_main(files + ["--benchmark-only", "-q", "-p", "no:cacheprovider",
                               "--rootdir", str(HERE.parent)] + extra)
    return 0 if rc in (0, 5) else rc  # 5: nothing collected (e.g. every op missing)


def run_suite(ctx: Ctx, s, checkpoint=None) -> list:
    if ctx.lost:
        ctx.skip(s.name, "", "(suite)", f"not run: the CUDA context was lost ({ctx.lost})")
        return []
    ctx.log(f"[{time.perf_counter() - ctx.t0:7.1f}s] {s.name}: {s.title}")
    rows = []
    try:
        for row in s.fn(ctx):
            rows.append(row)
            if checkpoint:
                checkpoint(rows)
    except SuiteSkip as e:
        ctx.skip(s.name, "", "(suite)", str(e))
    except DeviceLost as e:  # every later CUDA call would fail too: stop here, keep the rows
        ctx.log(f"    stopping: {e}")
    except Exception as e:  # noqa: BLE001 -- a broken suite must not lose the others' results
        traceback.print_exc()
        ctx.skip(s.name, "", "(suite)", f"stopped by an error: {reason(e)}")
    return rows


def run(args) -> dict:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    cpu = torch.device(args.device).type == "cpu"
    compile_rows = not args.no_compile and (not cpu or getattr(args, "compile", False)
                                            or getattr(args, "tiny", False))
    ctx = Ctx(args.device, quick=args.quick, compile=compile_rows, dtypes=args.dtype_list,
              only=args.only, compile_backend=args.compile_backend,
              tiny=getattr(args, "tiny", False))
    ctx.t0 = time.perf_counter()
    budget = getattr(args, "budget_s", None)
    if budget is None and ctx.cuda:
        budget = DEFAULT_BUDGET_S
    if budget is not None and budget != float("inf"):
        ctx.deadline = ctx.t0 + budget
    env = environment(ctx)
    if cpu:
        env["allocator"] = steady_allocator()
    print(f"fastdiff bench on {env['device']}: torch {env['torch']}, triton {env['triton']}, "
          f"CUDA {env['cuda']}, diffusers {env['diffusers']}, git {env['git_commit']}"
          + (f"; {env['threads']} threads, C++ kernels {env['cpu_capability']}, shapes "
             f"{ctx.size!r}" if not ctx.cuda else ""))
    if ctx.deadline is not None:
        print(f"time budget: no new case after {budget:.0f} s (--budget-s inf for none)")
    floors = ctx.measure_floors()
    print(f"copy bandwidth {floors['copy_GBps']:.0f} GB/s ({floors['copy']}); "
          f"matmul {floors['matmul_TFLOPs']:.3g} TFLOP/s ({floors['matmul']})")
    rows, last = [], [0.0]

    if cpu and hasattr(os, "getloadavg"):
        env["loadavg"] = [os.getloadavg()[0]]

    def result(more=(), complete=True):
        if cpu and hasattr(os, "getloadavg"):
            env["loadavg"] = env["loadavg"][:1] + [os.getloadavg()[0]]
        env.update(wall_s=time.perf_counter() - ctx.t0, complete=complete and not ctx.lost,
                   lost=ctx.lost, budget_s=budget)
        return dict(env=env, floors=floors, rows=rows + list(more), skipped=ctx.skipped,
                    argv=vars(args))

    def checkpoint(suite_rows, force=False):
        # what has been measured so far, on disk (no PNG), at most every 10 s: a run stopped
        # by a time limit still leaves its results under --out
        if getattr(args, "out", None) and (force or time.perf_counter() - last[0] > 10):
            last[0] = time.perf_counter()
            write_results(result(suite_rows, complete=False), SUITES, args.out, png=False,
                          partial=True)

    with torch.no_grad():
        for name in args.ops:
            rows += run_suite(ctx, SUITES[name], checkpoint)
            checkpoint([], force=True)
    return result()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.micro:
        return cpu_microbenchmarks(args)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device == "cpu":
            print("No CUDA device is visible: running the suites on CPU tensors (the CPU table; "
                  "--tiny for a quick check of the harness, --micro for the microbenchmarks).",
                  flush=True)
    elif args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible here.", file=sys.stderr)
        return 2
    # Time the kernels as a CUDA-graph-captured sampling or training step runs them: without the
    # timestep value check, which costs a host sync per call on a CUDA t (recorded in the header;
    # FASTDIFF_CHECKS=1 in the environment times it with the check).
    prev = os.environ.get("FASTDIFF_CHECKS")
    os.environ.setdefault("FASTDIFF_CHECKS", "0")
    try:
        result = run(args)
    finally:  # main() also runs in-process (tests, `python -m fastdiff bench`): leave env as found
        if prev is None:
            os.environ.pop("FASTDIFF_CHECKS", None)
    paths = write_results(result, SUITES, args.out)
    print("\n" + format_markdown(result, SUITES) + "\n")
    print(f"{len(result['rows'])} rows, {len(result['skipped'])} skipped, "
          f"{result['env']['wall_s']:.0f} s; wrote " + ", ".join(str(p) for p in paths))
    if result["env"].get("lost"):
        print(f"incomplete: {result['env']['lost']}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
