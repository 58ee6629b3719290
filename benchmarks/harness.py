"""Timing, floors, output checks, result rows and the JSON / markdown / PNG writers the suites share.

Timing (CUDA): `triton.testing.do_bench` -- warm-up, then one CUDA-event pair around each call,
with do_bench's 256 MB memset before each call; the median and the 20th/80th percentiles -- or,
if Triton's timer is missing or fails, the same scheme written out with CUDA events. On top of
that each case rotates through several input sets when its working set is under twice the L2, so
no call finds its inputs L2-hot. Each row also gets a wall-clock time: back-to-back calls timed
on the host with one sync at the end, L2-warm, host overhead included (what an un-captured loop
pays). On CPU: perf_counter around each call (at least CPU_MIN_CALLS calls over CPU_REP_MS), the
median and the minimum kept; the CPU summary table compares minimums (the least-disturbed call on
a shared machine, as the issue's table). Every implementation of a case runs on the same
inputs in the same process, so the ratios are same-run ratios.

Checks: before it is timed, each implementation's output is compared with the eager row's (or
with the case's own expectation, e.g. for noise drawn inside the op); the relative L2 error goes
in the row and a row over its dtype's tolerance is flagged in the tables. A CUDA error that
leaves the context unusable stops the run (the results so far are written, marked incomplete).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32",
           "float": "fp32"}
ROOT = Path(__file__).resolve().parent.parent


def parse_dtypes(s: Optional[str]):
    """'fp16,bf16' -> [torch.float16, torch.bfloat16]; None -> None (each suite's own dtypes)."""
    if not s:
        return None
    out = []
    for name in s.split(","):
        name = ALIASES.get(name.strip().lower(), name.strip().lower())
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; use some of {', '.join(DTYPES)}")
        out.append(DTYPES[name])
    return out


def shape_str(shape) -> str:
    return "x".join(str(s) for s in shape)


def reason(e: BaseException) -> str:
    """One line saying why something failed."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:240] if msg else ''}"


@dataclasses.dataclass
class Impl:
    """One implementation of a case: fn(*inputs) runs it; context() is entered around its
    warm-up and timing (e.g. fastdiff.use_backend, torch's sdpa_kernel). Its output is checked
    against `expect(inputs, out)` when given (e.g. the eager expression with the noise this impl
    draws from its seed), else against the case's expectation; verify=False skips the check
    (a baseline that draws its own noise)."""
    name: str
    fn: Callable
    kind: str = "other"  # eager | compile | fastdiff | other
    context: Callable = contextlib.nullcontext
    expect: Optional[Callable] = None
    verify: bool = True


class SuiteSkip(Exception):
    """The suite cannot run here; the message says why."""


class DeviceLost(RuntimeError):
    """A CUDA error that poisons the context: nothing after it can be measured."""


_FATAL = ("illegal memory access", "device-side assert", "unspecified launch failure",
          "misaligned address", "illegal instruction", "CUDA error: an illegal")

DO_BENCH = "triton.testing.do_bench"

# relative L2 error allowed between an implementation's output and the expectation
CHECK_TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def rel_error(got, want) -> float:
    got, want = first(got), first(want)
    if got.shape != want.shape:
        return float("inf")
    d = (got.double() - want.double()).norm()
    return float(d / want.double().norm().clamp_min(1e-30))


@dataclasses.dataclass
class Case:
    suite: str
    variant: str
    shape: tuple
    dtype: torch.dtype
    layout: str
    bytes: int = 0  # minimal traffic of the op, the same for every implementation
    flops: int = 0  # FLOPs of the op (matmul-shaped work), 0 for the elementwise ops
    # expect(inputs, out) -> the tensor out[0] should equal; None: the eager row's output
    expect: Optional[Callable] = None

    @property
    def label(self) -> str:
        return f"{self.suite} {self.variant} {shape_str(self.shape)} {DTYPE_NAMES[self.dtype]} " \
               f"{self.layout}".replace("  ", " ")


def floor_ms(case_bytes: int, flops: int, bandwidth: float, matmul_rate: float) -> float:
    """The least time the case can take at this run's measured rates (roofline): the larger of
    minimal bytes / copy bandwidth and FLOPs / matmul rate. Rates in bytes/s and FLOP/s; ms."""
    return max(case_bytes / bandwidth, flops / matmul_rate) * 1e3


def make_row(case: Case, impl: Impl, ms: float, base: dict, bandwidth: float,
             matmul_rate: float, extra: Optional[dict] = None) -> dict:
    """The result row of one implementation of one case. base: {'eager': ms, 'compile': ms}.
    extra: p20/p80/wall_ms/err/ok and the like."""
    fl = floor_ms(case.bytes, case.flops, bandwidth, matmul_rate)
    row = dict(suite=case.suite, variant=case.variant, shape=list(case.shape),
               dtype=DTYPE_NAMES[case.dtype], layout=case.layout, impl=impl.name, kind=impl.kind,
               ms=ms, bytes=case.bytes, flops=case.flops,
               gbps=case.bytes / ms / 1e6 if case.bytes else None,
               tflops=case.flops / ms / 1e9 if case.flops else None,
               pct_floor=100.0 * fl / ms,
               x_eager=base["eager"] / ms if base.get("eager") else None,
               x_compile=base["compile"] / ms if base.get("compile") else None)
    row.update(extra or {})
    return row


class Ctx:
    """What a suite needs: the device, the shape set to use, the timer, the floors, and a place
    to record what was skipped and why."""

    def __init__(self, device="cuda", quick=False, compile=True, dtypes=None, only=None,
                 compile_backend="inductor", log=print, tiny=None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        # CPU: the suites' "cpu" shapes (the CPU table), or "tiny" ones (a check of the harness)
        if tiny is None:
            tiny = not self.cuda
        self.size = ("quick" if quick else "full") if self.cuda else ("tiny" if tiny else "cpu")
        self.quick = quick
        self.compile = compile
        self.compile_backend = compile_backend
        self.dtypes = dtypes
        self.only = only
        self.log = log
        self.t0 = time.perf_counter()
        # do_bench's budget per measurement (ms of warm-up, ms of timed calls)
        self.warmup_ms, self.rep_ms = (10, 40) if quick else (25, 100)
        if self.size == "tiny":
            self.warmup_ms, self.rep_ms = (2, 20)
        elif not self.cuda:
            self.warmup_ms, self.rep_ms = (CPU_WARMUP_MS, CPU_REP_MS)
        self.min_calls = CPU_MIN_CALLS if self.size == "cpu" else 10
        props = torch.cuda.get_device_properties(self.device) if self.cuda else None
        self.l2_bytes = 32 * 2 ** 20  # CPU: a typical last-level cache
        if self.cuda:
            self.l2_bytes = getattr(props, "L2_cache_size", 0) or 50 * 2 ** 20
        self.bandwidth = None  # bytes/s, device copy (read + write)
        self.matmul_rate = None  # FLOP/s
        self.floors_info = {}
        self.skipped = []  # dicts: suite, case, impl, reason
        self.deadline = None  # perf_counter time after which no new case starts (--budget-s)
        self.timer = "perf_counter" if not self.cuda else None  # set by the first CUDA timing
        self.lost = None  # why the CUDA context became unusable (DeviceLost), if it did

    # -- helpers for suites -----------------------------------------------------------------
    def shapes(self, table: dict):
        """The shapes of this run's size. A suite takes part in the CPU table by giving its
        table a "cpu" entry; without one it is skipped there (with that reason)."""
        if self.size not in table:
            raise SuiteSkip(f"no {self.size!r} shapes in its shape table (add a {self.size!r} "
                            "entry to run it here)")
        return table[self.size]

    def dtypes_for(self, default, cpu=None):
        """--dtypes if given, else the suite's default (its CPU default on CPU, if it has one)."""
        if self.dtypes:
            return self.dtypes
        return cpu if (cpu is not None and not self.cuda) else default

    def skip(self, suite: str, case: str, impl: str, why: str):
        self.skipped.append(dict(suite=suite, case=case, impl=impl, reason=why))
        self.log(f"    skip {impl}: {why}")

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    # -- timing -----------------------------------------------------------------------------
    def time_ms(self, fn: Callable, sets: list) -> float:
        """Median ms of fn(*sets[i]), cycling through the input sets."""
        return self.measure(fn, sets, wall=False)["ms"]

    def measure(self, fn: Callable, sets: list, wall: bool = True) -> dict:
        """{'ms': median, 'p20', 'p80', 'wall_ms'} of fn(*sets[i]), cycling through the sets.
        wall_ms (CUDA): back-to-back calls, one sync, host overhead included."""
        n, i = len(sets), [0]

        def call():
            args = sets[i[0] % n]
            i[0] += 1
            fn(*args)

        low = None
        if not self.cuda:
            raw = _cpu_times(call, self.warmup_ms, self.rep_ms, min_calls=self.min_calls)
            ts, low = _quantiles(raw), min(raw)
        else:
            ts = self._cuda_quantiles(call)
        out = dict(p20=ts[0], ms=ts[1], p80=ts[2], wall_ms=None)
        if low is not None:
            out["min_ms"] = low
        if wall and self.cuda:
            out["wall_ms"] = _wall_ms(call, ts[1], self.device)
        return out

    def _cuda_quantiles(self, call) -> list:
        """do_bench's quantiles; the timer is chosen once, at the first measurement (the copy of
        the floors): if Triton's do_bench is missing or fails there, the run uses CUDA events
        throughout. Later errors belong to the row being timed."""
        if self.timer in (None, DO_BENCH):
            try:
                from triton.testing import do_bench
                q = do_bench(call, warmup=self.warmup_ms, rep=self.rep_ms,
                             quantiles=[0.2, 0.5, 0.8])
                self.timer = DO_BENCH
                return [float(v) for v in q]
            except Exception as e:  # noqa: BLE001 -- no (working) Triton: the scheme by hand
                if self.timer == DO_BENCH or _fatal(e):  # chosen already: the row's own error
                    raise
                self.timer = f"CUDA events (do_bench unusable: {reason(e)})"
        return _quantiles(_events_times(call, self.warmup_ms, self.rep_ms, self.device))

    def n_sets(self, working_set_bytes: int) -> int:
        """Input sets to rotate through: enough that they fill twice the L2, at most 16."""
        return max(1, min(16, math.ceil(2 * self.l2_bytes / max(working_set_bytes, 1))))

    def measure_floors(self):
        """Device copy bandwidth (bytes read + written per second) and matmul rate, this run."""
        if self.cuda:
            nbytes, N, mdt = 2 ** 30, 8192, torch.bfloat16
        else:
            nbytes, N, mdt = 2 ** 26, 1024, torch.float32
        src = torch.empty(nbytes, dtype=torch.uint8, device=self.device).random_()
        dst = torch.empty_like(src)
        # (CPU: the fastest call, as the CPU table compares; a shared CPU's median is its load's)
        pick = "ms" if self.cuda else "min_ms"
        ms = self.measure(lambda: dst.copy_(src), [()], wall=False)[pick]
        self.bandwidth = 2 * nbytes / (ms * 1e-3)
        del src, dst
        a = torch.randn(N, N, device=self.device, dtype=mdt)
        b = torch.randn(N, N, device=self.device, dtype=mdt)
        ms_mm = self.measure(lambda: torch.mm(a, b), [()], wall=False)[pick]
        self.matmul_rate = 2 * N ** 3 / (ms_mm * 1e-3)
        del a, b
        if self.cuda:
            torch.cuda.empty_cache()
        self.floors_info = dict(
            timer=self.timer,
            copy=f"{nbytes / 2 ** 20:.0f} MiB "
                 + ("device-to-device copy" if self.cuda else "CPU memory copy, fastest call")
                 + ", read + write counted",
            copy_GBps=self.bandwidth / 1e9,
            matmul=f"{DTYPE_NAMES[mdt]} GEMM {N}x{N}x{N}", matmul_TFLOPs=self.matmul_rate / 1e12)
        return self.floors_info

    # -- running a case ---------------------------------------------------------------------
    def compiled(self, case: Case, eager: Callable, args: tuple):
        """Impl for torch.compile(eager), compiled and run once here; None (with the reason
        recorded) if compiling fails."""
        try:
            torch._dynamo.reset()  # one shape per compile: no recompile limits, no dynamic shapes
            cfn = torch.compile(eager, dynamic=False, backend=self.compile_backend)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cfn(*args)
            self.sync()
        except Exception as e:  # noqa: BLE001 -- any compile failure skips the row
            self.skip(case.suite, case.label, "compile", reason(e))
            return None, None
        return Impl("compile", cfn, "compile"), time.perf_counter() - t0

    def run_case(self, case: Case, make_inputs: Callable, impls: list,
                 eager: Optional[Callable] = None):
        """Checks and times eager, torch.compile(eager) and each impl on the same input sets and
        yields one row per implementation that ran (skipped ones are recorded with their
        reason). Raises DeviceLost when a CUDA error leaves nothing else measurable."""
        if self.only and self.only not in case.label:
            return
        if self.deadline is not None and time.perf_counter() > self.deadline:
            self.skip(case.suite, case.label, "(case)", "time budget (--budget-s) spent")
            return
        self.log(f"[{time.perf_counter() - self.t0:7.1f}s]   {case.label}")
        try:
            sets = [make_inputs() for _ in range(self.n_sets(case.bytes or 1))]
        except Exception as e:  # noqa: BLE001 -- e.g. out of memory: skip the case
            self._failed(case, "(inputs)", e)
            return
        todo = ([Impl("eager", eager, "eager")] if eager else []) + list(impls)
        compile_s = None
        if eager and self.compile:
            cimpl, compile_s = self.compiled(case, eager, sets[0])
            if cimpl:
                todo.insert(1, cimpl)
        results, want = {}, None
        tol = CHECK_TOL.get(case.dtype, 1e-3)
        for impl in todo:
            caught = []
            try:
                with impl.context():
                    # warm-up and check: warnings recorded (a failure's reason may be in them)
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        mem0 = self._mem_start()
                        out = impl.fn(*sets[0])
                        self.sync()
                        peak = self._mem_peak(mem0)
                    if impl.expect is not None:
                        expected = impl.expect(sets[0], out)
                    elif case.expect is not None:
                        expected = case.expect(sets[0], out)
                    else:
                        if want is None and impl.kind == "eager":
                            want = first(out)  # the reference of the rows after it
                        expected = want
                    is_ref = impl.kind == "eager" and case.expect is None
                    err = rel_error(out, expected) if (impl.verify and expected is not None
                                                       and not is_ref) else None
                    del expected
                    del out
                    with warnings.catch_warnings():  # timing: no warning machinery per call
                        warnings.simplefilter("ignore")
                        m = self.measure(impl.fn, sets)
            except Exception as e:  # noqa: BLE001 -- a failing impl skips its row, not the run
                # e.g. SDPA's "No viable backend" says why only in the warnings before it
                why = next((str(w.message).splitlines()[0][:200] for w in caught or ()), None)
                self._failed(case, impl.name, e, why)
                continue
            m.update(err=err, ok=None if err is None else bool(err <= tol), peak_mib=peak)
            results[impl.name] = m
            flag = "" if err is None else (f"  err {err:.1e}" + ("" if m["ok"] else "  WRONG"))
            self.log(f"    {impl.name:<34} {m['ms']:10.4f} ms"
                     + (f"  (compiled in {compile_s:.1f} s)" if impl.kind == "compile" else "")
                     + flag)
        if self.size == "cpu":  # more rounds, the implementations interleaved (see _cpu_rounds)
            self._cpu_rounds([i for i in todo if i.name in results], sets, results)
        base = {"eager": results.get("eager", {}).get("ms"),
                "compile": results.get("compile", {}).get("ms")}
        for impl in todo:
            if impl.name in results:
                extra = dict(results[impl.name])
                extra.pop("ms")
                if impl.kind == "compile":
                    extra["compile_s"] = compile_s
                yield make_row(case, impl, results[impl.name]["ms"], base, self.bandwidth,
                               self.matmul_rate, extra)
        del sets, want

    def _mem_start(self) -> Optional[int]:
        if not self.cuda:
            return None
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def _mem_peak(self, mem0: Optional[int]) -> Optional[float]:
        """MiB allocated above what was live before the warm-up call, at its peak (CUDA)."""
        if mem0 is None:
            return None
        return (torch.cuda.max_memory_allocated(self.device) - mem0) / 2 ** 20

    def _cpu_rounds(self, impls: list, sets: list, results: dict):
        """On a CPU other processes share, a burst of load slows whichever row is being timed:
        CPU_ROUNDS - 1 more rounds over every implementation in turn, each row keeping its
        least-disturbed round (lowest median, its quantiles) and its fastest call."""
        for _ in range(CPU_ROUNDS - 1):
            for impl in impls:
                with impl.context(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    m = self.measure(impl.fn, sets)
                r = results[impl.name]
                low = min(r["min_ms"], m["min_ms"])
                if m["ms"] < r["ms"]:
                    r.update(p20=m["p20"], ms=m["ms"], p80=m["p80"])
                r["min_ms"] = low

    def _failed(self, case: Case, impl: str, e: BaseException, warning: Optional[str] = None):
        self.skip(case.suite, case.label, impl, reason(e) + (f" ({warning})" if warning else ""))
        if _fatal(e):
            self.lost = f"{impl} on {case.label}: {reason(e)}"
            raise DeviceLost(self.lost) from e


def _fatal(e: BaseException) -> bool:
    s = str(e)
    return any(k in s for k in _FATAL)


def _quantiles(ts: list) -> list:
    """[p20, median, p80] of a list of times."""
    s = sorted(ts)
    if len(s) == 1:
        return [s[0]] * 3
    q = statistics.quantiles(s, n=10, method="inclusive")
    return [q[1], statistics.median(s), q[7]]


def _wall_ms(call, est_ms: float, device) -> float:
    """ms per call over back-to-back calls (about 20 ms of them), one sync at the end."""
    n = max(5, min(500, int(20 / max(est_ms, 1e-3))))
    call()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        call()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3 / n


CPU_WARMUP_MS, CPU_REP_MS, CPU_MIN_CALLS, CPU_ROUNDS = 50, 300, 30, 5


def _cpu_times(call, warmup_ms, rep_ms, max_calls=1000, min_calls=10) -> list:
    t_end = time.perf_counter() + warmup_ms / 1e3
    call()
    while time.perf_counter() < t_end:
        call()
    ts, t_end = [], time.perf_counter() + rep_ms / 1e3
    while len(ts) < min_calls or (time.perf_counter() < t_end and len(ts) < max_calls):
        t0 = time.perf_counter()
        call()
        ts.append((time.perf_counter() - t0) * 1e3)
    return ts


def _events_times(call, warmup_ms, rep_ms, device) -> list:
    """do_bench's scheme with CUDA events: flush L2 (256 MB memset) before each timed call."""
    flush = torch.empty(2 ** 28, dtype=torch.uint8, device=device)
    call()
    torch.cuda.synchronize(device)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(5):
        flush.zero_()
        call()
    e.record()
    torch.cuda.synchronize(device)
    est = max(s.elapsed_time(e) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        call()
    n = max(1, int(rep_ms / est))
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(n)]
    for a, b in ev:
        flush.zero_()
        a.record()
        call()
        b.record()
    torch.cuda.synchronize(device)
    return [a.elapsed_time(b) for a, b in ev]


# -- environment ----------------------------------------------------------------------------
def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def steady_allocator() -> Optional[str]:
    """On glibc: keep freed memory in the heap (mallopt), so a CPU row's fresh output tensors
    reuse pages rather than faulting new ones in on every call. glibc's own thresholds move with
    the history of frees, and with them a row's time, by up to 3x between two identical runs
    (q_sample with drawn noise: 0.56 or 1.64 ms, 46k or 198k page faults). Every row of the run,
    fastdiff's and the baselines', under the same setting; None where it does not apply."""
    import ctypes
    import ctypes.util
    if platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc":
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    if libc.mallopt(M_MMAP_THRESHOLD, 1 << 28) != 1 or libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) != 1:
        return None
    return "glibc mallopt: mmap threshold 256 MiB, trim threshold 1 GiB (freed outputs reused)"


def git_commit() -> str:
    """Short commit of the checkout (+ '-dirty'); FASTDIFF_GIT_COMMIT when there is no .git
    (e.g. a copied working tree)."""
    if os.environ.get("FASTDIFF_GIT_COMMIT"):
        return os.environ["FASTDIFF_GIT_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, sysctl on macOS), else the platform's."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        r = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                           text=True, timeout=5)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def environment(ctx: Ctx) -> dict:
    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:  # noqa: BLE001 -- not installed or broken
            return None

    import fastdiff
    from fastdiff import backend_status, backends
    env = dict(device=device_name(ctx.device), device_type=ctx.device.type,
               torch=torch.__version__, cuda=torch.version.cuda, triton=version("triton"),
               diffusers=version("diffusers"), fastdiff=fastdiff.__version__,
               git_commit=git_commit(), python=platform.python_version(),
               date=datetime.date.today().isoformat(), quick=ctx.quick, size=ctx.size,
               compile=ctx.compile, compile_backend=ctx.compile_backend,
               fastdiff_checks=os.environ.get("FASTDIFF_CHECKS", "1"),
               backends={k: dict(available=v[0], note=v[1]) for k, v in backend_status().items()})
    env["auto"] = {}
    for op in ("q_sample", "sampler_step", "multistep_step", "group_norm_silu", "attention"):
        try:
            implemented = __import__(f"fastdiff.ops.{op}", fromlist=["IMPLEMENTED"]).IMPLEMENTED
            env["auto"][op] = {name: backends.pick(op, implemented, ctx.device, dt)
                               for name, dt in DTYPES.items()}
            if op == "group_norm_silu":  # its auto order may depend on the layout too
                env["auto"][op].update(
                    {f"{name} NHWC": backends.pick(op, implemented, ctx.device, dt,
                                                   "channels_last")
                     for name, dt in DTYPES.items()})
        except Exception as e:  # noqa: BLE001 -- op not there yet
            env["auto"][op] = f"n/a ({reason(e)})"
    if ctx.cuda:
        p = torch.cuda.get_device_properties(ctx.device)
        env.update(sm_count=p.multi_processor_count, l2_MiB=ctx.l2_bytes / 2 ** 20,
                   cudnn=torch.backends.cudnn.version(),
                   timing="triton.testing.do_bench median: CUDA events around each call, L2 "
                          "flushed (256 MB memset) before each, + input rotation when the working "
                          "set < 2x L2. Device time: an op's host overhead shows only where it "
                          "exceeds the flush's ~0.1 ms")
    else:
        ext = backends.extension()[0]
        env.update(threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                   cpu_capability=getattr(ext, "cpu_capability", lambda: None)(),
                   timing=f"time.perf_counter per call (CPU), at least {ctx.min_calls} calls "
                          f"over {ctx.rep_ms} ms after {ctx.warmup_ms} ms of warm-up; "
                          "ms = median, min = the fastest call")
    return env


# -- writers --------------------------------------------------------------------------------
COLUMNS = ("shape", "dtype", "layout", "impl", "ms", "p20–p80", "wall ms", "rate", "% of floor",
           "× eager", "× compile", "check")


def _fmt(v, spec, suffix=""):
    return "" if v is None else f"{v:{spec}}{suffix}"


SMALL_BYTES = 10 ** 7  # below ~10 MB a case is bound by launch latency, not bandwidth


def format_table(rows: list, metric: str = "GB/s") -> str:
    """Markdown table of result rows (one suite-variant). A GB/s figure of a case under
    SMALL_BYTES carries a † (launch-bound: its GB/s says little)."""
    head = [c if c != "rate" else metric for c in COLUMNS]
    peak = any(r.get("peak_mib") is not None for r in rows)
    if peak:  # the extra memory of a call at its peak (CUDA): a column where it was measured
        head.append("peak MiB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        rate = r["tflops"] if metric == "TFLOP/s" else r["gbps"]
        small = metric != "TFLOP/s" and rate is not None and r["bytes"] < SMALL_BYTES
        ms = r["ms"]
        p20, p80, wall, err = (r.get(k) for k in ("p20", "p80", "wall_ms", "err"))
        check = ("ref" if r["kind"] == "eager" else "") if err is None else \
            (f"{err:.0e}" if r.get("ok") else f"**✗ {err:.1e}**")
        lines.append("| " + " | ".join([
            shape_str(r["shape"]), r["dtype"], r["layout"], r["impl"], _ms(ms),
            "" if p20 is None else f"{_ms(p20)}–{_ms(p80)}", "" if wall is None else _ms(wall),
            _fmt(rate, ".1f", " †" if small else ""),
            _fmt(r["pct_floor"], ".1f"),
            _fmt(r["x_eager"], ".2f", "×"), _fmt(r["x_compile"], ".2f", "×"), check]
            + ([_fmt(r.get("peak_mib"), ".0f")] if peak else [])) + " |")
    return "\n".join(lines)


def _ms(v: float) -> str:
    return f"{v:.4f}" if v < 1 else f"{v:.3f}"


def _groups(rows):
    out = {}
    for r in rows:
        out.setdefault((r["suite"], r["variant"]), []).append(r)
    return out


def format_markdown(result: dict, suites: dict) -> str:
    env, floors = result["env"], result["floors"]
    lines = [f"# fastdiff benchmarks — {env['device']}", "",
             f"{env['date']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
             f"diffusers {env['diffusers']}; fastdiff {env['fastdiff']} at git {env['git_commit']}"
             f"{' (--quick)' if env['quick'] else ''}"
             + (f"; {env.get('threads')} threads of {env.get('cpu_count')} CPUs"
                if env.get("device_type") == "cpu" else "") + ".",
             ""]
    if env.get("loadavg"):  # CPU: other processes on the machine during the run
        lo = env["loadavg"]
        lines += [f"Machine load (1-minute load average) at the start / end of the run: "
                  f"{lo[0]:.1f} / {lo[-1]:.1f} on {env.get('cpu_count')} CPUs"
                  + (" — **contended**: other processes shared the cores, so absolute times "
                     "are inflated; the ratios come from rows of a case timed in interleaved "
                     "rounds (minimum of each), so a burst of load hits both sides alike."
                     if max(lo) > 0.5 * (env.get("cpu_count") or 1) else ".") , ""]
    if env.get("allocator"):
        lines += [f"Allocator: {env['allocator']}.", ""]
    if not env.get("complete", True):
        lines += [f"**Partial results**: written {env.get('wall_s', 0):.0f} s into a run that "
                  "had not finished.", ""]
    if env.get("lost"):
        lines += [f"**The run stopped early**: a CUDA error left the context unusable "
                  f"({env['lost']}); the suites after it were not run.", ""]
    wrong = [r for r in result["rows"] if r.get("ok") is False]
    if wrong:
        lines += [f"**{len(wrong)} row(s) disagree with the eager output** beyond their dtype's "
                  "tolerance (marked ✗ in the check column): their times are not comparable.",
                  ""]
    lines += [
             f"Measured in this run: device copy bandwidth **{floors['copy_GBps']:.0f} GB/s** "
             f"({floors['copy']}); matmul rate **{floors['matmul_TFLOPs']:.3g} TFLOP/s** "
             f"({floors['matmul']}).",
             "",
             f"Timing: {env['timing']}; timer: {floors.get('timer')}. ms = median, p20–p80 = "
             "its 20th and 80th percentiles; wall ms = back-to-back calls timed on the host with "
             "one sync (L2-warm, host overhead included: what a loop that is not captured in a "
             "CUDA graph pays). check = relative L2 error of the row's output against the eager "
             "row's (ref) (noise drawn inside an op: against the same expression with that noise; "
             "diffusers rows that draw their own noise: not checked); tolerance 1e-3 fp32, 1e-2 "
             "fp16, 2e-2 bf16. GB/s = the case's minimal bytes ÷ time (the "
             "same bytes for every implementation, so it is proportional to speed; GB = 10⁹ "
             "bytes, MiB = 2²⁰); † marks cases under 10 MB, bound by launch latency (a few µs), "
             "whose GB/s says little; TFLOP/s = the case's FLOPs ÷ time (10¹² FLOP per s). "
             "% of floor = max(minimal bytes ÷ copy bandwidth, FLOPs ÷ "
             "matmul rate) ÷ time. × eager / × compile = that row's speed-up over the eager and "
             "torch.compile rows of the same case, measured in the same run. peak MiB (CUDA) = "
             "memory allocated during the row's warm-up call above what was live before it, at "
             "its peak. fastdiff backends marked (auto) are the ones `auto` picks; the `torch` "
             "backend is the reference (timed only when auto picks it). FASTDIFF_CHECKS="
             f"{env['fastdiff_checks']}.", "",
             f"fastdiff `auto` picks on {env['device_type']} tensors: "
             + ", ".join(_auto_str(op, b) for op, b in env.get("auto", {}).items()) + ".", ""]
    if env.get("device_type") == "cpu":
        lines += cpu_summary(result)
    skipped = result["skipped"]
    by_suite = {}
    for (suite, variant), rows in _groups(result["rows"]).items():
        by_suite.setdefault(suite, []).append((variant, rows))
    for suite, groups in by_suite.items():
        s = suites.get(suite)
        lines += [f"## {s.title if s else suite}", ""]
        if s and s.floor:
            lines += [f"Floor: {s.floor}", ""]
        for variant, rows in groups:
            if variant:
                lines += [f"### {variant}", ""]
            lines += [format_table(rows, s.metric if s else "GB/s"), ""]
        notes = _skip_notes([k for k in skipped if k["suite"] == suite])
        if notes:
            lines += ["Skipped:", ""] + notes + [""]
    other = _skip_notes([k for k in skipped if k["suite"] not in by_suite])
    if other:
        lines += ["## Not run", ""] + other + [""]
    lines += dispatch_summary(result["rows"])
    return "\n".join(lines)


def _t(r) -> float:
    return r.get("min_ms") or r["ms"]


def cpu_summary(result: dict) -> list:
    """Markdown lines: the CPU side-by-side table. Per case, fastdiff (the backend `auto` picks;
    the fastest fastdiff row where none is marked) against each baseline of the case (the eager
    PyTorch expression, diffusers), minimum times of the same run; rate and % of the floor of
    the fastdiff row."""
    env, floors = result["env"], result["floors"]
    cases = {}
    for r in result["rows"]:
        if r.get("ok") is not False:
            key = (r["suite"], r["variant"], shape_str(r["shape"]), r["dtype"], r["layout"])
            cases.setdefault(key, []).append(r)
    body = []
    for (suite, variant, shape, dtype, layout), rs in cases.items():
        ours = [r for r in rs if r["kind"] == "fastdiff"]
        if not ours:
            continue
        fd = next((r for r in ours if r["impl"].endswith("(auto)")), None) or min(ours, key=_t)
        bases = [r for r in rs if r["kind"] == "eager" or r["impl"].startswith("diffusers")]
        t = _t(fd)
        fl = floor_ms(fd["bytes"], fd["flops"], floors["copy_GBps"] * 1e9,
                      floors["matmul_TFLOPs"] * 1e12)
        rate = (f"{fd['flops'] / t / 1e9:.3g} TFLOP/s" if fd["flops"]
                else f"{fd['bytes'] / t / 1e6:.1f} GB/s")
        case = f"{suite} {variant} {shape} {dtype} {layout}".replace("  ", " ")
        for b in bases:
            name = "PyTorch eager" if b["kind"] == "eager" else b["impl"]
            body.append(f"| {case} | {name} | {_ms(_t(b))} | {fd['impl']} | {_ms(t)} | "
                        f"**{_t(b) / t:.2f}×** | {rate} | {100 * fl / t:.0f}% |")
    if not body:
        return []
    return [f"## CPU side by side ({env.get('threads')} threads, {env['device']})", "",
            f"Minimum of ≥ {CPU_ROUNDS} × {CPU_MIN_CALLS} calls per row (rounds interleaved "
            f"over the rows of a case), every row of a case on the same inputs in one run; ÷ = baseline time ÷ fastdiff time (> 1× means fastdiff is faster). Rate "
            f"and % of floor are the fastdiff row's, against this run's copy bandwidth "
            f"({floors['copy_GBps']:.1f} GB/s) and matmul rate "
            f"({floors['matmul_TFLOPs'] * 1e3:.0f} GFLOP/s). C++ kernels: "
            f"{env.get('cpu_capability')} variant.", "",
            "| case | baseline | baseline ms | fastdiff | fastdiff ms | ÷ | rate | % of floor |",
            "|---|---|---|---|---|---|---|---|"] + body + [""]


def _backend(impl: str) -> Optional[str]:
    """'fastdiff:cuda (auto)' -> 'cuda'; None for other rows (e.g. 'fastdiff AttentionBlock')."""
    m = re.match(r"fastdiff:(\w+)", impl)
    return m.group(1) if m else None


def dispatch_summary(rows: list) -> list:
    """Markdown lines: per case, the backend `auto` picked against the fastest fastdiff backend
    timed, and the fastest fastdiff row against the fastest other row; then, per op and dtype,
    how often each backend was the fastest (what AUTO_CUDA_ORDER in fastdiff/backends.py should
    follow). Rows whose output check failed take no part."""
    cases = {}
    for r in rows:
        if r.get("ok") is not False:
            key = (r["suite"], r["variant"], shape_str(r["shape"]), r["dtype"], r["layout"])
            cases.setdefault(key, []).append(r)
    table, wins = [], {}
    for (suite, variant, shape, dtype, layout), rs in cases.items():
        ours = [r for r in rs if r["kind"] == "fastdiff"]
        others = [r for r in rs if r["kind"] != "fastdiff"]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["ms"])
        auto = next((r for r in ours if r["impl"].endswith("(auto)")), None)
        name = _backend(best["impl"]) or best["impl"]
        wins.setdefault((suite, dtype), {}).setdefault(name, 0)
        wins[(suite, dtype)][name] += 1
        if auto is None:
            auto_s = "—"
        elif auto is best:
            auto_s = f"{_backend(auto['impl'])} ✓"
        else:
            auto_s = f"{_backend(auto['impl'])}: {auto['ms'] / best['ms']:.2f}× slower"
        rival = min(others, key=lambda r: r["ms"]) if others else None
        vs = "" if rival is None else f"{rival['ms'] / best['ms']:.2f}× ({rival['impl']})"
        table.append(f"| {suite} {variant} {shape} {dtype} {layout}".replace("  ", " ")
                     + f" | {name} | {auto_s} | {vs} |")
    if not table:
        return []
    out = ["## Dispatch", "",
           "Per case: the fastest fastdiff backend timed, whether `auto` picked it, and the "
           "fastest fastdiff row against the fastest non-fastdiff row (eager, torch.compile, "
           "SDPA, diffusers) of the same case (> 1× means fastdiff is faster).", "",
           "| case | fastest backend | auto | best fastdiff vs best other |", "|---|---|---|---|"]
    out += table + ["", "Fastest backend, cases won per op and dtype: "
                    + "; ".join(f"{suite} {dtype}: " + ", ".join(
                        f"{b} {n}" for b, n in sorted(w.items(), key=lambda kv: -kv[1]))
                        for (suite, dtype), w in wins.items()) + ".", ""]
    return out


def _auto_str(op: str, by_dtype) -> str:
    """'attention → triton (fp32: torch)' from {'fp16': 'triton', 'bf16': 'triton', ...}."""
    if not isinstance(by_dtype, dict):
        return f"{op} → {by_dtype}"
    common = by_dtype.get("fp16")
    odd = [f"{d}: {b}" for d, b in by_dtype.items() if b != common]
    return f"{op} → {common}" + (f" ({', '.join(odd)})" if odd else "")


def _skip_notes(skipped):
    seen = {}
    for k in skipped:
        seen.setdefault((k["impl"], k["reason"]), []).append(k["case"])
    return [f"- {impl}: {why} ({len(cases)} case{'s' if len(cases) > 1 else ''}"
            f"{', e.g. ' + cases[0] if cases[0] else ''})" for (impl, why), cases in seen.items()]


def plot(result: dict, path: Path) -> Optional[Path]:
    """Bar chart of each fastdiff row's speed-up over eager and compile; None without
    matplotlib or without fastdiff rows."""
    rows = [r for r in result["rows"] if r["kind"] == "fastdiff" and r["x_eager"]]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 -- optional
        return None
    if not rows:
        return None
    labels = [" ".join(str(p) for p in (r["suite"], r["variant"], shape_str(r["shape"]),
                                         r["dtype"], r["layout"], r["impl"]) if p) for r in rows]
    y = range(len(rows))
    fig, ax = plt.subplots(figsize=(11, 0.28 * len(rows) + 1.5))
    ax.barh([i - 0.2 for i in y], [r["x_eager"] for r in rows], height=0.4, label="× eager")
    comp = [(i + 0.2, r["x_compile"]) for i, r in zip(y, rows) if r["x_compile"]]
    if comp:
        ax.barh(*zip(*comp), height=0.4, label="× torch.compile")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speed-up (log scale)")
    ax.set_title(f"fastdiff speed-ups — {result['env']['device']} {result['env']['date']}")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _finite(v):
    """inf/nan floats as strings: strict JSON has no Infinity."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def write_results(result: dict, suites: dict, out_dir, png: bool = True,
                  partial: bool = False) -> list:
    """<out>/<device-slug>_<date>[_quick].{json,md,png}; returns the paths written. partial:
    a checkpoint of a run in progress, written as <stem>_partial.{json,md} (so it never replaces
    a finished run's files); the final write removes it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = result["env"]
    stem = f"{slug(env['device'])}_{env['date']}{'_quick' if env['quick'] else ''}"
    name = stem + ("_partial" if partial else "")
    paths = [out / f"{name}.json", out / f"{name}.md"]
    paths[0].write_text(json.dumps(_finite(result), indent=1, default=str) + "\n")
    paths[1].write_text(format_markdown(result, suites) + "\n")
    if not partial:
        for p in (out / f"{stem}_partial.json", out / f"{stem}_partial.md"):
            p.unlink(missing_ok=True)
    png = plot(result, out / f"{stem}.png") if png and not partial else None
    return paths + ([png] if png else [])
