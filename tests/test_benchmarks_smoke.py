"""Smoke test of benchmarks/: every microbenchmark body once at a tiny size, and the GPU suite's
machinery (suites, timing loop, floors, rows, JSON/markdown/PNG writers, the no-GPU fallback)
run on CPU. No timing assertions: the numbers only have to exist and be consistent."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import harness, run  # noqa: E402
from benchmarks.suites import SUITES  # noqa: E402


def _clean_env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "FASTDIFF_POISON", "FASTDIFF_BACKEND")}
    env["FASTDIFF_BENCH_TINY"] = "1"
    return env


def test_microbenchmarks_run_once():
    r = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--benchmark-disable",
                        "-q", "-p", "no:cacheprovider"], cwd=ROOT, env=_clean_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "error" not in r.stdout.lower()


def test_micro_runs_the_microbenchmarks(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(run, "_pytest_main", lambda args: calls.append(args) or 0)
    assert run.main(["--micro", "--quick", "--ops", "q_sample,attention"]) == 0
    (args,) = calls
    assert "--benchmark-only" in args and "--benchmark-max-time=0.05" in args
    assert [Path(a).name for a in args if a.endswith(".py")] == ["test_bench_q_sample.py",
                                                                 "test_bench_attention.py"]
    monkeypatch.setattr(run, "_pytest_main", lambda args: 5)  # nothing collected is not a failure
    assert run.main(["--micro"]) == 0


def test_no_gpu_runs_the_cpu_table(monkeypatch, capsys, tmp_path):
    """Without a GPU the suites run on CPU at their "cpu" shapes (the CPU table), at the thread
    count asked, without torch.compile rows unless --compile."""
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(run, "run", lambda args: seen.append(args) or pytest.skip("wired"))
    threads = torch.get_num_threads()
    try:
        run.main(["--threads", "1", "--out", str(tmp_path)])
    except pytest.skip.Exception:
        pass
    assert "No CUDA device is visible" in capsys.readouterr().out
    (args,) = seen
    assert args.device == "cpu" and args.threads == 1 and not args.tiny and not args.compile
    monkeypatch.undo()
    ctx = harness.Ctx("cpu", tiny=False)
    assert ctx.size == "cpu" and ctx.min_calls >= 30
    for name in ("q_sample", "sampler_step", "group_norm_silu", "attention"):
        from benchmarks import suites
        table = {"q_sample": suites.Q_SHAPES, "sampler_step": suites.S_SHAPES,
                 "group_norm_silu": suites.G_SHAPES, "attention": suites.A_SHAPES}[name]
        assert ctx.shapes(table), name
    with pytest.raises(harness.SuiteSkip, match="no 'cpu' shapes"):
        ctx.shapes({"full": [(1,)], "tiny": [(1,)]})
    torch.set_num_threads(threads)


def test_cpu_table_rows(tmp_path):
    """The CPU side-by-side table: one line per case and baseline, the `auto` row against eager
    and diffusers, minimum times; threads and CPU in the header."""
    threads = torch.get_num_threads()
    argv = ["--device", "cpu", "--tiny", "--threads", "1", "--no-compile", "--ops",
            "sampler_step,group_norm_silu", "--only", "2x", "--out", str(tmp_path)]
    result = run.run(run.parse_args(argv))
    torch.set_num_threads(threads)
    assert result["env"]["threads"] == 1 and result["env"]["cpu_capability"] is not None
    assert all(r["min_ms"] <= r["ms"] for r in result["rows"])
    lines = harness.cpu_summary(result)
    assert lines[0].startswith("## CPU side by side (1 threads, ")
    body = [ln for ln in lines if ln.startswith("| sampler_step") or ln.startswith("| group")]
    assert any("| PyTorch eager |" in ln and "(auto)" in ln for ln in body)
    assert any("| diffusers DDPMScheduler.step |" in ln for ln in body)
    assert all(ln.count("×**") == 1 and "GB/s" in ln for ln in body)
    md = harness.format_markdown(result, SUITES)
    assert "## CPU side by side" in md and "threads of" in md
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":  # stated in the header
        assert result["env"]["allocator"].startswith("glibc mallopt")
        assert f"Allocator: {result['env']['allocator']}." in md


def test_suites_on_cpu_write_results(tmp_path, capsys):
    assert run.main(["--device", "cpu", "--tiny", "--no-compile", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    stems = {p.suffix: p for p in tmp_path.iterdir()}
    assert ".json" in stems and ".md" in stems
    result = json.loads(stems[".json"].read_text())
    assert result["floors"]["copy_GBps"] > 0 and result["floors"]["matmul_TFLOPs"] > 0
    assert result["env"]["device_type"] == "cpu" and result["env"]["git_commit"]
    rows = result["rows"]
    for name in SUITES:
        mine = [r for r in rows if r["suite"] == name]
        skipped = [k["reason"] for k in result["skipped"] if k["suite"] == name]
        assert mine, f"suite {name} produced no rows: {skipped}"
        assert any(r["kind"] == "eager" for r in mine), name
        assert any(r["kind"] == "fastdiff" for r in mine), (name, skipped)
    for r in rows:
        assert r["ms"] > 0 and r["pct_floor"] > 0 and r["x_eager"] > 0 and r["x_compile"] is None
        assert (r["gbps"] if r["bytes"] else r["tflops"]) > 0
        if r["kind"] == "eager":
            assert r["x_eager"] == pytest.approx(1.0)
    layouts = {r["layout"] for r in rows if r["suite"] == "group_norm_silu"}
    assert layouts == {"NCHW", "NHWC"}
    assert any(r["impl"].endswith("(auto)") for r in rows if r["suite"] == "group_norm_silu")
    assert any(r["impl"].startswith("sdpa:") for r in rows if r["suite"] == "attention")
    md = stems[".md"].read_text()
    assert "| shape | dtype | layout | impl | ms | p20–p80 | wall ms | GB/s | % of floor | × eager " \
           "| × compile | check |" in md
    # every row was checked against eager (the reference itself and diffusers' own-noise
    # steps excepted), and every check passed
    for r in rows:
        if (r["impl"].startswith("diffusers") and r["variant"].endswith("noise drawn")) \
                or r["suite"] == "train":
            assert r["err"] is None, r  # own noise / a training step's loss: timed, not checked
        elif r["kind"] == "eager" and r["variant"] != "eps drawn (eager: torch.randn_like)" \
                and not r["variant"].endswith("noise drawn"):  # those check their own noise
            assert r["err"] is None, r  # the reference
        else:
            assert r["ok"] is True, r
        assert r["p20"] <= r["ms"] <= r["p80"]
    assert "| ref |" in md and "✗" not in md and not list(tmp_path.glob("*_partial*"))
    assert "## Dispatch" in md and "cases won per op and dtype" in md
    assert "TFLOP/s" in md and "## group_norm_silu" in md and "copy bandwidth" in md
    try:
        import matplotlib  # noqa: F401
        assert ".png" in stems and stems[".png"].stat().st_size > 0
    except ImportError:
        pass
    assert "attention_block" in out  # progress is printed per case


def test_compile_rows_and_compile_failure(tmp_path, monkeypatch):
    argv = ["--device", "cpu", "--tiny", "--ops", "q_sample", "--only", "eps given 2x3x8x8 fp32",
            "--compile-backend", "eager", "--out", str(tmp_path)]
    result = run.run(run.parse_args(argv))
    by_impl = {r["impl"]: r for r in result["rows"]}
    assert by_impl["compile"]["x_compile"] == pytest.approx(1.0)
    assert by_impl["compile"]["compile_s"] > 0 and by_impl["eager"]["x_compile"] > 0

    def broken(*a, **k):
        raise RuntimeError("inductor exploded\nsecond line")
    monkeypatch.setattr(torch, "compile", broken)
    result = run.run(run.parse_args(argv))
    impls = {r["impl"] for r in result["rows"]}
    assert "compile" not in impls and "eager" in impls
    assert {"impl": "compile", "reason": "RuntimeError: inductor exploded"}.items() <= \
        result["skipped"][0].items()


def test_floor_math_rows_and_tables():
    case = harness.Case("q_sample", "eps given", (2, 3), torch.float16, "NCHW", bytes=3_000_000)
    impl = harness.Impl("fastdiff:cuda", None, "fastdiff")
    # 3 MB in 1 µs at a 3e12 B/s copy bandwidth: exactly the floor
    r = harness.make_row(case, impl, 1e-3, {"eager": 4e-3, "compile": 2e-3}, 3e12, 1e15)
    assert r["gbps"] == pytest.approx(3000.0) and r["pct_floor"] == pytest.approx(100.0)
    assert r["x_eager"] == pytest.approx(4.0) and r["x_compile"] == pytest.approx(2.0)
    assert r["tflops"] is None and r["dtype"] == "fp16"
    # roofline: the floor is the larger of the bytes and FLOPs times
    assert harness.floor_ms(3_000_000, 2 * 10 ** 12, 3e12, 1e15) == pytest.approx(2.0)
    assert harness.floor_ms(3_000_000_000, 10 ** 9, 3e12, 1e15) == pytest.approx(1.0)
    att = harness.Case("attention", "", (1, 1, 4, 32), torch.float16, "BHLD", bytes=1,
                       flops=10 ** 12)
    ra = harness.make_row(att, harness.Impl("sdpa:MATH", None), 2.0, {"eager": 1.0}, 3e12, 1e15)
    assert ra["tflops"] == pytest.approx(500.0) and ra["pct_floor"] == pytest.approx(50.0)
    assert ra["x_eager"] == pytest.approx(0.5) and ra["x_compile"] is None
    table = harness.format_table([r, ra], "GB/s").splitlines()
    assert table[0].startswith("| shape | dtype | layout | impl | ms | p20–p80 | wall ms | GB/s |")
    # 3 MB: launch-bound, its GB/s is marked
    assert table[2] == "| 2x3 | fp16 | NCHW | fastdiff:cuda | 0.0010 |  |  | 3000.0 † | 100.0 | " \
                       "4.00× | 2.00× |  |"
    big = dict(r, bytes=30_000_000, gbps=30000.0, p20=9e-4, p80=1.2e-3, wall_ms=5e-3, err=2e-3,
               ok=True)
    assert "| 0.0009–0.0012 | 0.0050 | 30000.0 | 100.0 | 4.00× | 2.00× | 2e-03 |" in \
        harness.format_table([big], "GB/s")
    assert "**✗ 5.0e-02**" in harness.format_table([dict(big, err=5e-2, ok=False)], "GB/s")
    assert table[3].endswith("| 0.50× |  |  |")
    assert harness.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert harness.parse_dtypes("fp16, bfloat16,fp32") == [torch.float16, torch.bfloat16,
                                                           torch.float32]
    assert harness.parse_dtypes(None) is None
    with pytest.raises(ValueError):
        harness.parse_dtypes("fp8")
    notes = harness._skip_notes([dict(impl="x", reason="why", case="a"),
                                 dict(impl="x", reason="why", case="b")])
    assert notes == ["- x: why (2 cases, e.g. a)"]


def test_timer_and_rotation():
    ctx = harness.Ctx("cpu")
    assert ctx.size == "tiny" and ctx.n_sets(10) == 16 and ctx.n_sets(10 ** 12) == 1
    seen = []
    ms = ctx.time_ms(lambda i: seen.append(i), [(0,), (1,), (2,)])
    assert ms > 0 and set(seen) == {0, 1, 2}  # every input set is used
    with pytest.raises(SystemExit):
        run.parse_args(["--ops", "nope"])


def test_cli_bench_wiring(tmp_path):
    cli = pytest.importorskip("fastdiff.cli")
    if not hasattr(cli, "bench"):
        pytest.skip("fastdiff.cli has no bench subcommand yet")
    assert cli.main(["bench", "--device", "cpu", "--tiny", "--ops", "attention", "--no-compile",
                     "--only", "2x1x16x32", "--out", str(tmp_path)]) == 0
    assert any(p.suffix == ".md" for p in tmp_path.iterdir())


def test_wrong_output_is_flagged(tmp_path):
    """An implementation whose output disagrees with eager is timed but marked, in the row, the
    table and the summary at the top."""
    ctx = harness.Ctx("cpu", compile=False)
    ctx.measure_floors()
    case = harness.Case("q_sample", "x", (4, 8), torch.float16, "NCHW", bytes=64)
    good = harness.Impl("good", lambda x: x * 2, "fastdiff")
    bad = harness.Impl("bad", lambda x: x * 2.1, "fastdiff")
    rows = list(ctx.run_case(case, lambda: (torch.randn(4, 8, dtype=torch.float16),),
                             [good, bad], eager=lambda x: x * 2))
    by = {r["impl"]: r for r in rows}
    assert by["eager"]["err"] is None and by["good"]["ok"] is True and by["good"]["err"] < 1e-3
    assert by["bad"]["ok"] is False and by["bad"]["err"] == pytest.approx(0.05, rel=0.05)
    env = harness.environment(ctx)
    md = harness.format_markdown(dict(env=env, floors=ctx.floors_info, rows=rows, skipped=[]),
                                 SUITES)
    assert "**1 row(s) disagree with the eager output**" in md and "**✗ 5.0e-02**" in md


def test_lost_device_stops_the_run(tmp_path, monkeypatch):
    """A CUDA error that poisons the context stops the run: the rows so far are kept and
    written, the rest is listed as not run, and the results say incomplete."""
    from benchmarks import suites

    def broken_suite(ctx):
        case = harness.Case("broken", "", (2,), torch.float32, "NCHW", bytes=8)

        def boom(x):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        yield from ctx.run_case(case, lambda: (torch.randn(2),), [], eager=lambda x: x + 2)
        # the case that breaks the context loses its own rows too (they are suspect)
        yield from ctx.run_case(case, lambda: (torch.randn(2),), [harness.Impl("x", boom)],
                                eager=lambda x: x + 1)
        raise AssertionError("not reached")

    monkeypatch.setitem(SUITES, "broken", suites.Suite("broken", "broken", "", "GB/s",
                                                       broken_suite))
    assert run.main(["--device", "cpu", "--tiny", "--no-compile", "--ops", "broken,q_sample",
                     "--out", str(tmp_path)]) == 1  # an incomplete run is a failure
    (js,) = tmp_path.glob("*.json")
    result = json.loads(js.read_text())
    assert [r["impl"] for r in result["rows"]] == ["eager"]  # the first case's
    assert result["env"]["complete"] is False and "illegal memory access" in result["env"]["lost"]
    assert any(k["suite"] == "q_sample" and "CUDA context was lost" in k["reason"]
               for k in result["skipped"])
    assert "The run stopped early" in (tmp_path / js.name.replace(".json", ".md")).read_text()


def test_default_budget_and_partial_files(tmp_path, monkeypatch):
    args = run.parse_args(["--device", "cpu", "--tiny", "--ops", "q_sample", "--only", "2x3x8x8 fp32",
                           "--no-compile", "--out", str(tmp_path), "--budget-s", "inf"])
    result = run.run(args)
    assert result["env"]["budget_s"] == float("inf") and result["rows"]
    (partial,) = tmp_path.glob("*_partial.json")  # checkpoints of a run in progress
    json.loads(partial.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert run.DEFAULT_BUDGET_S <= 540
    args = run.parse_args(["--device", "cpu", "--tiny", "--ops", "q_sample", "--out", str(tmp_path),
                           "--budget-s", "0"])
    result = run.run(args)
    assert not result["rows"] and all("time budget" in k["reason"] for k in result["skipped"])


def test_dispatch_summary_names_a_wrong_auto_pick():
    def row(impl, ms, kind="fastdiff", ok=True):
        return dict(suite="q_sample", variant="", shape=[2, 3], dtype="fp16", layout="NCHW",
                    impl=impl, kind=kind, ms=ms, ok=ok)
    rows = [row("eager", 3.0, "eager"), row("compile", 1.2, "compile"),
            row("fastdiff:cuda (auto)", 1.5), row("fastdiff:triton", 1.0),
            row("fastdiff:torch", 0.1, ok=False)]  # a failed check never wins
    lines = harness.dispatch_summary(rows)
    assert "| q_sample 2x3 fp16 NCHW | triton | cuda: 1.50× slower | 1.20× (compile) |" in lines
    assert lines[-2].endswith("q_sample fp16: triton 1.")
