"""The CUDA kernels compile (nvcc -c against this torch's headers), even on a machine with no GPU
and a CPU-only torch: CI cannot run them, but it can keep them from rotting. Skipped without nvcc,
and where the extension's CUDA kernels are built and a GPU runs them (the op tests cover them)."""
import glob
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                if os.environ.get("CUDA_HOME") else None)


def _extension_runs_cuda() -> bool:
    from fastdiff import backends
    return backends.available("cuda")


# compiled to sm_90 machine code (once per module, the `cubins` fixture) and read by
# test_noise_cu_resource_usage and test_noise_cu_instruction_budget instead (which also prove
# they compile): these three only here
PROPERTY_FILES = ("q_sample.cu", "sampler_step.cu", "multistep_step.cu")


def _nvcc_cmd(path, tmp_path, *extra):
    tdir = os.path.dirname(torch.__file__)
    # A CPU-only torch ships c10/cuda headers but not the one its CMake generates; an empty
    # stand-in is enough to type-check against them.
    shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True, exist_ok=True)
    if not os.path.exists(os.path.join(tdir, "include", "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n")
    return [NVCC, path, "-std=c++17", "--expt-relaxed-constexpr",
            "-DFASTDIFF_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C", "-D_GLIBCXX_USE_CXX11_ABI=1",
            "-I", os.path.join(ROOT, "csrc"), "-I", os.path.join(tdir, "include"),
            "-I", os.path.join(tdir, "include", "torch", "csrc", "api", "include"),
            "-I", sysconfig.get_paths()["include"], "-I", str(tmp_path / "shim"),
            "-Xcompiler", "-fPIC", *extra]


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.skipif(_extension_runs_cuda(), reason="the CUDA kernels were built by nvcc for real "
                    "(fastdiff._C) and run on this GPU in the op tests; compiling them again here "
                    "would take minutes")
@pytest.mark.parametrize("path", [p for p in CU_FILES if os.path.basename(p) not in PROPERTY_FILES],
                         ids=[os.path.basename(p) for p in CU_FILES
                              if os.path.basename(p) not in PROPERTY_FILES])
def test_cuda_source_compiles(path, tmp_path):
    cmd = _nvcc_cmd(path, tmp_path, "-c", "-o", str(tmp_path / "k.o"), "-O0",
                    "-gencode=arch=compute_90,code=compute_90")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"nvcc failed on {os.path.basename(path)}:\n{r.stderr[-6000:]}"


def _cuobjdump():
    try:
        import triton
    except ImportError:
        triton = None
    tool = shutil.which("cuobjdump")
    if tool is None and triton is not None:  # Triton bundles one
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                            "cuobjdump")
    return tool if tool and os.path.exists(tool) else None


def _functions(sass: str) -> dict:
    """SASS text by mangled function name."""
    out, name = {}, None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            out[name] = []
        elif name is not None:
            out[name].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def cubins(tmp_path_factory):
    """name -> (ptxas -v report, cubin path, SASS by function): each PROPERTY_FILES source
    compiled once per test module as the extension builds it (-O3, sm_90 machine code; 8-20 s
    each on 2 cores), shared by the resource and instruction-budget tests."""
    cache = {}

    def get(name):
        if name not in cache:
            tmp = tmp_path_factory.mktemp(name.replace(".", "_"))
            cubin = tmp / "k.cubin"
            cmd = _nvcc_cmd(os.path.join(ROOT, "csrc", "cuda", name), tmp, "-cubin", "-o",
                            str(cubin), "-O3", "-arch=sm_90", "-Xptxas", "-v")
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            assert r.returncode == 0, f"nvcc failed on {name}:\n{r.stderr[-6000:]}"
            sass = _functions(subprocess.run([_cuobjdump(), "-sass", str(cubin)],
                                             capture_output=True, text=True, check=True).stdout)
            cache[name] = (r.stderr, cubin, sass)
        return cache[name]
    return get


needs_sass = [pytest.mark.skipif(NVCC is None, reason="nvcc not found"),
              pytest.mark.skipif(_cuobjdump() is None, reason="cuobjdump not found"),
              pytest.mark.skipif(_extension_runs_cuda(), reason="the CUDA kernels run on this "
                                 "GPU in the op tests; the benchmark measures them")]


@pytest.mark.parametrize("name", PROPERTY_FILES)
@needs_sass[0]
@needs_sass[1]
@needs_sass[2]
def test_noise_cu_resource_usage(name, cubins):
    """q_sample.cu / sampler_step.cu / multistep_step.cu as the extension builds them (-O3, sm_90
    machine code): every kernel instantiation has no stack frame and no spills (ptxas -v,
    cuobjdump -res-usage: the Normal4 lanes are picked by selects, never by a run-time index),
    at most 80 registers for 32/16-bit elements, 96 for float64 (measured: 40-80, float64 up to
    96; 80 keeps 3 blocks of 256 threads resident, and the kernels' __launch_bounds__ hold it),
    and the whole-group path moves 4 elements per access as the code promises (Vec4: LDG.E.128
    for fp32 and fp64 halves, LDG.E.64 for fp16/bf16; sampler_step's split layout has none)."""
    report, cubin, sass = cubins(name)
    entries = re.findall(r"Compiling entry function '(\S+)'", report)
    assert entries, report[-3000:]
    assert len(re.findall(r"0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads",
                          report)) == len(entries), report[-6000:]
    regs = [int(n) for n in re.findall(r"Used (\d+) registers", report)]
    assert len(regs) == len(entries), report[-6000:]
    for fn, n in zip(entries, regs):  # float64 elements (the reference's dtype) may take more
        assert n <= (96 if _element_size(fn) == 8 else 80), f"{fn}: {n} registers"

    usage = subprocess.run([_cuobjdump(), "-res-usage", str(cubin)], capture_output=True,
                           text=True, check=True).stdout
    assert re.findall(r"STACK:(\d+)", usage) and \
        set(re.findall(r"STACK:(\d+)", usage)) == {"0"}, usage
    assert set(re.findall(r"LOCAL:(\d+)", usage)) == {"0"}, usage
    assert len(sass) == len(entries)
    for fn, code in sass.items():
        if "value_checks_kernel" in fn:  # the one-block range check of tensor arguments
            continue
        if _split_layout(fn):  # sampler_step's split layout: scalar by design
            continue
        want = "LDG.E.64" if _element_size(fn) == 2 else "LDG.E.128"
        assert re.search(want + r"(\.CONSTANT)? ", code), f"{fn}: no {want} (the Vec4 path)"


def _element_size(fn: str) -> int:
    """Bytes per element of a kernel instantiation, from its mangled name (0: no element type:
    the value-check kernel)."""
    m = re.search(r"_kernelI(N3c104HalfE|N3c108BFloat16E|f|d)", fn)
    return {"f": 4, "d": 8}.get(m.group(1), 2) if m else 0


def _split_layout(fn: str) -> bool:
    """A sampler_step kernel of the split (channels_last learned-variance) layout: its
    template arguments <scalar_t, kNoise, kStd, kSplit, kGuide, kX0>."""
    m = re.search(r"sampler_step_kernelI(?:N3c104HalfE|N3c108BFloat16E|f|d)Li\d+ELi\d+ELb(\d)E", fn)
    return bool(m) and m.group(1) == "1"


_BRA = re.compile(r"^(@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+(!?U?P\w+,\s*)?0x([0-9a-f]+)")


def _whole_group_path(code: str, store: str):
    """Instructions a thread issues in one iteration of the group loop on the whole-group (Vec4)
    path, taking every optional branch (its longest path), NOPs left out, or None when the
    kernel has no such path (the split layout). The group loop is the innermost backward
    branch enclosing a Vec4 store (`store`: STG.E.128, or STG.E.64 for 2-byte elements), which
    the scalar tail never executes; the path is the longest one from the loop head to its
    backward branch through such a store (back edges of inner loops dropped), so a runtime
    option (clip mode, guidance, x0) counts at its dearest."""
    ins = []
    for line in code.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+([^;]*);", line)
        if m and not re.match(r"(@!?U?P\w+\s+)?NOP\b", m.group(2).strip()):
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    at = {a: i for i, (a, _) in enumerate(ins)}
    loops = [(at[int(m.group(3), 16)], i) for i, (a, t) in enumerate(ins)
             if (m := _BRA.match(t)) and int(m.group(3), 16) <= a]
    vec = [i for i, (_, t) in enumerate(ins) if re.match(r"(@!?P\w+\s+)?" + re.escape(store) + r"\s", t)]
    around = [lp for lp in loops if any(lp[0] <= i <= lp[1] for i in vec)]
    if not around:
        return None
    # a kernel may hold several copies of the group loop (one per compile-time clip mode):
    # each innermost loop around a Vec4 store is measured, and the dearest counts
    inner = [lp for lp in around
             if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in around)]
    return max(_loop_path(ins, at, vec, head, latch) for head, latch in inner)


def _loop_path(ins, at, vec, head, latch):
    """The longest path from head to latch through a Vec4 store (see _whole_group_path)."""
    def succ(i):
        t, out = ins[i][1], []
        m = _BRA.match(t)
        if m:
            j = at[int(m.group(3), 16)]
            if i < j <= latch:
                out.append(j)
            if m.group(1) is None and m.group(2) is None:  # unconditional
                return out
        if not t.startswith(("EXIT", "RET")) and i < latch:
            out.append(i + 1)
        return out
    low = -10 ** 9
    fwd, bwd = [low] * len(ins), [low] * len(ins)
    fwd[head], bwd[latch] = 1, 1
    for i in range(head, latch + 1):
        for j in succ(i) if fwd[i] > low else ():
            fwd[j] = max(fwd[j], fwd[i] + 1)
    for i in range(latch, head - 1, -1):
        for j in succ(i):
            bwd[i] = max(bwd[i], bwd[j] + 1) if bwd[j] > low else bwd[i]
    return max(fwd[i] + bwd[i] - 1 for i in vec if head <= i <= latch)


# Per-element instruction budget of the .cu kernels, from the sm_90 SASS of the extension's
# build. An H100 SXM issues 132 SMs x 4 schedulers x 32 lanes x ~1.75 GHz ~ 30e12
# thread-instructions/s against ~3e12 B/s of copy bandwidth: ~10 instructions per byte moved
# (as tests/test_triton_compiles.py), so a kernel that is to run at bandwidth issues at most
# 10 x (its bytes per element) per element, noise drawn or not. A thread handles one Philox
# group of 4 elements per iteration of the grid-stride loop (one Vec4 access per tensor), so per
# element = the whole-group path of one iteration (_whole_group_path: every runtime option at
# its dearest) / 4; the per-sample code outside the loop (sampler_step's float64 coefficients:
# one thread a block, ~400 instructions, once per sample a block; q_sample's two table loads;
# multistep's coefficient row) is not counted. Bytes per element (_kernel_variant), e = element
# size, from the kernels' accesses on that path:
#   q_sample: read x0, write x_t and eps (drawn) or read noise (given): 3e, +e with v
#   sampler_step: read x_t, model output, write x_prev: 3e; +e given noise, +e a learned
#     variance, +e guidance's conditional half, +e x0 written (the last two compile-time
#     variants, kGuide / kX0, of the whole-group loop)
#   multistep_step: read x_t, model output, write out: 3e; + the K float32 ring slots read and
#     the slot receiving x0 written (4K + 4 B), + x_last read and y written with kLast (8 B),
#     +e given noise. Guidance is a run-time branch there: its path (and its extra read, not
#     counted in the bytes) is in the count, its budget the plain one.
# Drawn noise: Philox4x32-10 and two Box-Muller pairs are ~39 instructions per element on their
# own (branch-free, the same operations as kernels/philox.py: 40 a group for Philox with round
# keys in registers, ~115 for two logs, two square roots, two sincos and the products), so the
# plain 3e = 6 B fp16/bf16 budget of 60 leaves ~21 for everything else. Measured (this commit,
# python tests/test_cuda_compiles.py: nvcc -O3 -arch=sm_90, cuobjdump -sass; ~3 min):
#   drawn, per element              fp32         fp16/bf16      fp64         (was, fp16/bf16)
#   q_sample (+v)                   44.5-47.75   46.5-50.75     48.25-53.25
#   sampler_step plain              56           59-60          60           (70.5-72.25)
#     x0 written                    58           62-63          61.5
#     guided                        59           63.5-65.25     63.5
#     guided and x0 written         60           65.75-67.25    67
#     learned variance, plain       67-69.25     70.75-74.5     71.5-73      (86.5-88.75)
#     learned, guided and x0        72.25-75.75  77.25-82.5     78.75-80.75
#   multistep_step                  62.5-73.5    66.5-81.25     (budgets 200-360 / 140-300)
#   Noise given or none: q_sample 6.5-14.75, sampler_step 16.5-46.5, multistep_step 22.5-46.25,
#   all under 36% of their budgets. The tight ones: sampler_step drawn fp16/bf16 plain (60 of
#   60), learned plain (74.5 of 80), q_sample drawn fp16/bf16 (47 of 60, 50.75 of 80 with v).
# What took them there: the seed's 20 Philox round keys formed once per block and held in
# registers (block_philox_key; ptxas re-added 18 of them in every iteration), each round's
# products as 32-bit mul.wide.u32 (uint64_t products NVVM widened the whole round to 64-bit
# ops: 20 extra adds a group), rsqrt.approx.ftz (rsqrtf's subnormal scaling: 8 a group), the
# whole-group loop compiled apart from the scalar one, once per clip mode and (sampler_step)
# per guidance / x0 written, the threshold's division as float(double(x) * (1 / s)) with 1 / s
# per sample (csrc/common.h div_by_sample: the correctly rounded quotient, tested below; the
# float division was ~18 an element), sampler_step's NaN-keeping clamp as max.NaN / min.NaN (2
# an element, not 4), its Normal4 left unset where no noise is drawn (4 moves a group), and the
# pointers moved to the sample once per sample. DRAWN_CEILING freezes the drawn variants at
# their measured maxima rounded up (< 1%), so a loosening fails even under the byte budget.
BUDGET_PER_BYTE = 10
# (op, element size) -> ceiling; sampler_step's rows by the variance (fixed / learned), each a
# tuple over (plain, x0 written, guided, guided and x0 written)
DRAWN_CEILING = {
    ("q_sample", 4): 48, ("q_sample", 2): 51, ("q_sample", 8): 53.5,
    ("multistep_step", 4): 73.75, ("multistep_step", 2): 81.5,
    ("sampler_step", 4): (56.25, 58.25, 59.25, 60.25),
    ("sampler_step", 2): (60.25, 63.25, 65.5, 67.5),
    ("sampler_step", 8): (60.25, 61.75, 63.75, 67.25),
    ("sampler_step learned", 4): (69.5, 71.75, 72.25, 76),
    ("sampler_step learned", 2): (74.75, 77.75, 79, 82.75),
    ("sampler_step learned", 8): (73.25, 76.25, 77.5, 81),
}


def _kernel_variant(fn: str):
    """(op, element size, noise drawn?, bytes per element moved) from a mangled kernel name."""
    m = re.search(r"(q_sample|sampler_step|multistep_step)_kernelI(N3c104HalfE|N3c108BFloat16E"
                  r"|f|d)((?:L[bi]\d+E)+)", fn)
    assert m, fn
    op, ty, targs = m.group(1), m.group(2), [int(v) for v in re.findall(r"L[bi](\d+)E", m.group(3))]
    e = {"f": 4, "d": 8}.get(ty, 2)
    if op == "q_sample":      # <kHasNoise, kWantV>
        return op, e, not targs[0], 3 * e + e * targs[1]
    if op == "sampler_step":  # <kNoise, kStd, kSplit, kGuide, kX0>
        noise, std, _, guide, x0 = targs
        return op, e, noise == 2, e * (3 + (noise == 1) + (std != 0) + guide + x0)
    noise, k, last = targs    # multistep_step: <kNoise, kK, kLast>
    return op, e, noise == 2, 3 * e + 4 * k + 4 + 8 * last + e * (noise == 1)


def _drawn_ceiling(fn: str, op: str, e: int) -> float:
    """The DRAWN_CEILING entry of a drawn-noise kernel."""
    m = re.search(r"sampler_step_kernelI(?:N3c104HalfE|N3c108BFloat16E|f|d)Li\d+ELi(\d+)ELb\d"
                  r"ELb(\d)ELb(\d)E", fn)
    if not m:
        return DRAWN_CEILING[(op, e)]
    row = DRAWN_CEILING[("sampler_step learned" if m.group(1) != "0" else op, e)]
    return row[2 * int(m.group(2)) + int(m.group(3))]


@pytest.mark.parametrize("name", PROPERTY_FILES)
@needs_sass[0]
@needs_sass[1]
@needs_sass[2]
def test_noise_cu_instruction_budget(name, cubins):
    """Every kernel instantiation's whole-group iteration within its per-element budget (the
    derivation above): 10 instructions per byte it moves, and with drawn noise under the frozen
    ceiling of its variant too."""
    _, _, sass = cubins(name)
    # the one-block range check of tensor arguments (csrc/value_checks.h) moves no elements
    sass = {fn: code for fn, code in sass.items() if "value_checks_kernel" not in fn}
    counted = 0
    for fn, code in sass.items():
        op, e, drawn, nbytes = _kernel_variant(fn)
        path = _whole_group_path(code, "STG.E.64" if e == 2 else "STG.E.128")
        if path is None:  # the split (channels_last learned-variance) layout: scalar by design
            assert _split_layout(fn), fn
            continue
        counted += 1
        per_elem = path / 4
        assert per_elem <= BUDGET_PER_BYTE * nbytes, \
            f"{fn}: {per_elem} instructions per element > {BUDGET_PER_BYTE} x {nbytes} bytes"
        if drawn:
            ceiling = _drawn_ceiling(fn, op, e)
            assert per_elem <= ceiling, f"{fn}: {per_elem} instructions per element > {ceiling}"
    assert counted >= len(sass) // 2, (counted, len(sass))  # only the split layout skipped


def test_threshold_division_identity():
    """csrc/common.h div_by_sample: the CUDA kernels divide a clamped x0 by its sample's
    dynamic-threshold scale s as float(double(x) * (1.0 / double(s))), which must give the
    correctly rounded float32 x / s the CPU kernels compute (its comment has the proof; here 2M
    pairs over every exponent of s and x, and the neighbours of +-s and of powers of two).
    Quotients below 2^-126 (subnormal) are outside the claim. A float32 reciprocal x * (1 / s)
    differs on these pairs: the check can fail."""
    g = torch.Generator().manual_seed(0)
    n = 1 << 21
    # s: random significands at exponents -30..30, and the floats next to powers of two
    s = torch.rand(n, generator=g, dtype=torch.float64) + 1.0
    s = (s * torch.exp2(torch.randint(-30, 31, (n,), generator=g).double())).float()
    p2 = torch.exp2(torch.randint(-30, 31, (n // 8,), generator=g).float())
    s[: n // 8] = torch.nextafter(p2, p2 * (1 + torch.randint(0, 2, (n // 8,), generator=g) * 2.0))
    # x in [-s, s]: random fractions of s over 40 binades, and the floats next to +-s
    frac = torch.rand(n, generator=g, dtype=torch.float64) * torch.exp2(
        -torch.randint(0, 40, (n,), generator=g).double())
    x = (frac * s.double()).float() * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    x[-n // 8:] = torch.nextafter(s[-n // 8:], torch.zeros(n // 8))
    want = x / s
    keep = want.abs() >= 2.0 ** -126
    got = (x.double() * (1.0 / s.double())).float()
    assert keep.float().mean() > 0.99
    bad = (got != want) & keep
    assert not bad.any(), (x[bad][:4], s[bad][:4])
    assert ((x * (1.0 / s)) != want).any()  # a float32 reciprocal would fail this test


if __name__ == "__main__":  # the counts the budgets hold: python tests/test_cuda_compiles.py
    import pathlib
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        for name in PROPERTY_FILES:
            tmp = pathlib.Path(d) / name.replace(".", "_")
            tmp.mkdir()
            cmd = _nvcc_cmd(os.path.join(ROOT, "csrc", "cuda", name), tmp, "-cubin", "-o",
                            str(tmp / "k.cubin"), "-O3", "-arch=sm_90", "-Xptxas", "-v")
            r = subprocess.run(cmd, capture_output=True, text=True, check=True)
            regs = dict(zip(re.findall(r"Compiling entry function '(\S+)'", r.stderr),
                            re.findall(r"Used (\d+) registers", r.stderr)))
            sass = _functions(subprocess.run([_cuobjdump(), "-sass", str(tmp / "k.cubin")],
                                             capture_output=True, text=True, check=True).stdout)
            for fn, code in sorted(sass.items()):
                if "value_checks_kernel" in fn:
                    continue
                op, e, drawn, nbytes = _kernel_variant(fn)
                path = _whole_group_path(code, "STG.E.64" if e == 2 else "STG.E.128")
                variant = re.sub(r"EEEv.*", "", fn.split("_kernelI", 1)[1])
                print(f"{op:15s} {variant:38s} drawn={int(drawn)} regs={regs.get(fn)} "
                      f"bytes={nbytes} budget={BUDGET_PER_BYTE * nbytes} "
                      f"per_elem={'-' if path is None else path / 4}")
