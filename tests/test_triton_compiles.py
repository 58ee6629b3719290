"""Every Triton kernel compiles for sm_90 through the real compiler, on a machine without a GPU
(see tests/triton_offline.py). Skipped when this Triton has no NVIDIA backend, and on a machine
with a GPU (there the op tests compile and run the kernels)."""
import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _has_nvidia_backend():
    try:
        import triton.backends.nvidia.driver  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.mark.skipif(not _has_nvidia_backend(), reason="this Triton has no NVIDIA backend")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the op tests compile and "
                    "run every kernel variant for real (the fake driver is for machines without one)")
@pytest.mark.parametrize("op", ["q_sample", "sampler_step", "group_norm_silu", "attention",
                                "multistep_step"])
def test_triton_kernels_compile_for_sm90(op):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(HERE, "triton_offline.py"), op],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, f"compiling the {op} Triton kernels failed:\n{r.stderr[-6000:]}"
    assert "launches compiled" in r.stdout and " 0 launches" not in r.stdout, r.stdout


def _code_properties(mode: str):
    """The JSON rows tests/triton_offline.py MODE prints (one per compiled kernel variant)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(HERE, "triton_offline.py"), mode],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-6000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")], r.stdout


@pytest.mark.skipif(not _has_nvidia_backend(), reason="this Triton has no NVIDIA backend")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the benchmark measures it")
def test_attention_code_at_benchmark_shapes():
    """What the sm_90 code of every benchmark-shape fp16/bf16 attention variant must show:
    only vector global loads (no scalar 2-byte loads: those came from masking a head dim that is
    no multiple of 16, D = 40), K/V tiles moved by cp.async (the software pipeline), and no
    stack or spill bytes (cuobjdump -res-usage)."""
    rows, out = _code_properties("attention_properties")
    assert len(rows) == 22, out
    for row in rows:
        case = f"{row['dtype']} Lq={row['Lq']} Lk={row['Lk']} D={row['D']} {row['layout']}"
        assert row["loads"], case
        scalar = {op: n for op, n in row["loads"].items() if ".v2." not in op and ".v4." not in op}
        assert not scalar, f"{case}: scalar global loads {scalar}"
        assert row["cp_async"] > 0, f"{case}: K/V tiles not pipelined through cp.async"
        assert row["stack"] == 0 and row["local"] == 0, f"{case}: spills {row}"


@pytest.mark.skipif(not _has_nvidia_backend(), reason="this Triton has no NVIDIA backend")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the benchmark measures it")
def test_group_norm_code_at_benchmark_shapes():
    """group_norm_silu's sm_90 code at the benchmark shapes, fp16/bf16, both layouts: the only
    scalar 2-byte load is the group's shift element (one per program), stores are at least 4
    bytes wide, and nothing spills. channels_last used to load and store every element on its
    own (a runtime channels-per-group count); Cg is now a compile-time constant, so a group's
    channels of one pixel move as one vector: 8-16 bytes at Cg = 4, 8, 20; 4 bytes at Cg = 10,
    whose 20-byte runs start only 4-byte aligned."""
    rows, out = _code_properties("group_norm_properties")
    assert len(rows) >= 20, out
    for row in rows:
        case = f"{row['dtype']} {row['shape']} {row['layout']} {row['kernel']}"
        assert row["loads"].get("ld.global.b16", 0) + row["loads"].get("ld.global.u16", 0) <= 1, \
            f"{case}: scalar 2-byte loads {row['loads']}"
        narrow = {op: n for op, n in row["stores"].items() if op.endswith((".b16", ".u16"))}
        if row["kernel"] != "_gn_partial_kernel":  # that one writes only fp32 statistics
            assert not narrow, f"{case}: scalar 2-byte stores {row['stores']}"
        assert row["stack"] == 0 and row["local"] == 0, f"{case}: spills {row}"


@pytest.mark.skipif(not _has_nvidia_backend(), reason="this Triton has no NVIDIA backend")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the benchmark measures it")
def test_multistep_code_at_benchmark_shapes():
    """multistep_step's sm_90 code at its benchmark shapes, fp16/bf16 (2M, 2M SDE with drawn
    noise, UniPC's corrector with guidance and thresholding): every access to the data and the
    float32 state is a 16-byte vector (a thread moves 8 consecutive elements: two Philox groups),
    the only narrower loads are per-program scalars (the float64 coefficient row, the step,
    seed and image index: b64; the threshold: b32; libdevice's sin/cos table with drawn noise:
    nc.b32), and nothing spills. The drawn-noise variants keep an 8-byte stack frame in this
    Triton's ptxas (cuobjdump STACK:8, LOCAL:0; ptxas-blackwell -v: 0 bytes stack, 0 spills)."""
    rows, out = _code_properties("multistep_properties")
    assert len(rows) == 12, out
    for row in rows:
        case = f"{row['dtype']} {row['shape']} {row['case']}"
        narrow = {op: n for op, n in row["loads"].items()
                  if ".v4." not in op and op not in ("ld.global.b64", "ld.global.b32",
                                                     "ld.global.nc.b32")}
        assert not narrow, f"{case}: loads narrower than 16 bytes {row['loads']}"
        assert row["loads"].get("ld.global.b32", 0) <= 1, f"{case}: scalar 4-byte loads {row['loads']}"
        assert "nc.b32" not in str(row["loads"]) or "sde" in row["case"], case
        assert row["stores"] and all(".v4." in op for op in row["stores"]), \
            f"{case}: stores narrower than 16 bytes {row['stores']}"
        assert row["local"] == 0, f"{case}: spills {row}"
        assert row["stack"] <= (8 if "sde" in row["case"] else 0), f"{case}: stack {row}"
