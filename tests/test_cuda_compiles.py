"""The CUDA kernels compile (nvcc -c against this torch's headers), even on a machine with no GPU
and a CPU-only torch: CI cannot run them, but it can keep them from rotting. Skipped without nvcc,
and where the extension's CUDA kernels are built and a GPU runs them (the op tests cover them)."""
import glob
import os
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


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.skipif(_extension_runs_cuda(), reason="the CUDA kernels were built by nvcc for real "
                    "(fastdiff._C) and run on this GPU in the op tests; compiling them again here "
                    "would take minutes")
@pytest.mark.parametrize("path", CU_FILES, ids=[os.path.basename(p) for p in CU_FILES])
def test_cuda_source_compiles(path, tmp_path):
    tdir = os.path.dirname(torch.__file__)
    # A CPU-only torch ships c10/cuda headers but not the one its CMake generates; an empty
    # stand-in is enough to type-check against them.
    shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    if not os.path.exists(os.path.join(tdir, "include", "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = [NVCC, "-c", path, "-o", str(tmp_path / "k.o"), "-std=c++17", "-O0",
           "-gencode=arch=compute_90,code=compute_90", "--expt-relaxed-constexpr",
           "-DFASTDIFF_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C", "-D_GLIBCXX_USE_CXX11_ABI=1",
           "-I", os.path.join(ROOT, "csrc"), "-I", os.path.join(tdir, "include"),
           "-I", os.path.join(tdir, "include", "torch", "csrc", "api", "include"),
           "-I", sysconfig.get_paths()["include"], "-I", str(tmp_path / "shim"),
           "-Xcompiler", "-fPIC"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"nvcc failed on {os.path.basename(path)}:\n{r.stderr[-6000:]}"
