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
import platform
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def log(msg):
    print(f"fastdiff setup: {msg}", file=sys.stderr)


# csrc/cpu/*_vec.cpp (the SIMD inner loops) are compiled once per CPU capability, as ATen compiles
# its own kernels, and csrc/cpu/vec.cpp picks the variant at run time (csrc/cpu/vec.h). Flags as
# torch's build uses for its AVX2 / AVX512 kernels.
VEC_CAPABILITIES = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def vec_capabilities():
    if sys.platform == "win32" or platform.machine().lower() not in ("x86_64", "amd64"):
        return {"DEFAULT": []}  # elsewhere at::vec's DEFAULT is already that CPU's SIMD (NEON...)
    return VEC_CAPABILITIES


def vec_build_ext(base):
    """build_ext that also compiles the *_vec.cpp sources once per capability and links them."""
    class BuildExt(base):
        def build_extension(self, ext):
            vec = getattr(ext, "vec_sources", [])
            if vec:
                args = ext.extra_compile_args
                cxx = list(args["cxx"] if isinstance(args, dict) else args)
                objects = []
                for cap, flags in vec_capabilities().items():
                    macros = list(ext.define_macros) + [("CPU_CAPABILITY", cap),
                                                        (f"CPU_CAPABILITY_{cap}", None)]
                    post = cxx + flags
                    objects += self.compiler.compile(
                        vec, output_dir=os.path.join(self.build_temp, f"vec_{cap}"),
                        macros=macros, include_dirs=ext.include_dirs, depends=ext.depends,
                        extra_postargs={"cxx": post} if isinstance(args, dict) else post)
                ext.extra_objects = [o for o in (ext.extra_objects or [])
                                     if o not in objects] + objects
            super().build_extension(ext)
    return BuildExt


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

    vec_sources = sorted(glob.glob("csrc/cpu/*_vec.cpp"))
    sources = sorted(s for s in glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")
                     if s not in vec_sources)
    # no fp contraction: GCC would fuse a*b + c into an FMA where its passes happen to see one,
    # so the same expression could round differently in two inlined copies (needs_noise=False
    # vs zero noise) and between the vector loop and the scalar tail. The SIMD loops write their
    # FMAs out (at::vec::fmadd) where they want them.
    cxx_flags = ["-O3", "-std=c++17", "-ffp-contract=off"]
    define_macros = [(f"FD_HAVE_{cap}", None) for cap in vec_capabilities() if cap != "DEFAULT"]
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
    ext.vec_sources = vec_sources
    build_ext = vec_build_ext(cpp_extension.BuildExtension).with_options(use_ninja=True)
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
