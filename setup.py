"""Build fastdiff and its optional extension fastdiff._C.

The extension is compiled from csrc/: the C++ CPU kernels always, the CUDA kernels when torch was
built with CUDA and nvcc is found. torch must already be installed (install with
`pip install --no-build-isolation .`): an isolated build would fetch a second, CUDA, torch.
If the extension cannot be built, the pure-Python package still installs and works through
Triton and the reference ops.

Switches: FASTDIFF_SKIP_EXT=1 (no extension), FASTDIFF_SKIP_CUDA=1 (CPU part only),
FASTDIFF_CUDA_ARCHS="8.0;9.0" (default: 8.0;9.0, or TORCH_CUDA_ARCH_LIST), MAX_JOBS.
"""
import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def log(msg):
    print(f"fastdiff setup: {msg}", file=sys.stderr)


def extension_modules():
    if os.environ.get("FASTDIFF_SKIP_EXT") == "1":
        log("FASTDIFF_SKIP_EXT=1: not building fastdiff._C")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        log("torch is not importable in the build environment: not building fastdiff._C "
            "(install torch first and use `pip install --no-build-isolation`)")
        return [], {}

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-std=c++17"]
    define_macros = []
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda = (
        os.environ.get("FASTDIFF_SKIP_CUDA") != "1"
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and bool(cuda_sources)
    )
    if torch.version.cuda is None:
        log("torch has no CUDA: building the CPU kernels only")
    elif cpp_extension.CUDA_HOME is None:
        log("nvcc not found (CUDA_HOME unset): building the CPU kernels only")
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST",
                              os.environ.get("FASTDIFF_CUDA_ARCHS", "8.0;9.0"))
        define_macros.append(("FASTDIFF_WITH_CUDA", None))
        ext_cls = cpp_extension.CUDAExtension
        sources += cuda_sources
        extra = {"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17",
                                           "-lineinfo", "--expt-relaxed-constexpr"]}
        log(f"building CPU + CUDA kernels for archs {os.environ['TORCH_CUDA_ARCH_LIST']}")
    else:
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": cxx_flags}
    if sys.platform != "win32":
        extra["cxx"] = extra["cxx"] + ["-fopenmp"]
    ext = ext_cls(
        name="fastdiff._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"] if sys.platform != "win32" else [],
    )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = extension_modules()

setup(
    packages=["fastdiff", "fastdiff.ops", "fastdiff.kernels"],
    package_dir={"fastdiff.kernels": "kernels"},
    # the embedded default model (a diffusers pipeline folder), so a non-editable install has it
    package_data={"fastdiff": ["assets/digits/*.json", "assets/digits/*/*.json",
                               "assets/digits/*/*.safetensors"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
