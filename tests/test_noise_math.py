"""Box-Muller's own math (kernels/philox.py, csrc/common.h) against float64 on EVERY input the
kernels can form: a Philox uniform is u = (k + 1/2) 2^-23 for k < 2^23, and the angle the float32
product 2pi_f32 * u, so 2^23 values each cover all of them. Bounds in float32 ulp of the float64
value: libdevice's logf is <= 1 ulp and sinf/cosf <= 2 (the CUDA programming guide), the
branch-free versions that replaced them must be as good."""
import numpy as np
import pytest
import torch

from conftest import backends_for
from fastdiff.reference import TWO_PI_F32, image_normal

ALL_U = (np.arange(2 ** 23, dtype=np.float32) + np.float32(0.5)) * np.float32(2.0 ** -23)


def _ulps(got, want):
    want = np.asarray(want, dtype=np.float64)
    ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    return np.abs(np.asarray(got, dtype=np.float64) - want) / ulp


try:
    import triton
    import triton.language as tl

    from fastdiff.kernels import philox
except ImportError:  # no Triton: the C++ half still runs
    triton = None

if triton is not None:
    @triton.jit
    def _math_kernel(u_ptr, log_ptr, sin_ptr, cos_ptr, rad_ptr, N: tl.constexpr):
        offs = tl.program_id(0) * N + tl.arange(0, N)
        x = tl.load(u_ptr + offs)
        lg = philox.log_unit(x)
        s, c = philox.sincos(philox.TWO_PI * x)
        tl.store(log_ptr + offs, lg)
        tl.store(sin_ptr + offs, s)
        tl.store(cos_ptr + offs, c)
        tl.store(rad_ptr + offs, philox.sqrt_pos(-2.0 * lg))

    @triton.jit
    def _uniform_kernel(r_ptr, u_ptr, N: tl.constexpr):
        offs = tl.program_id(0) * N + tl.arange(0, N)
        tl.store(u_ptr + offs, philox._uniform(tl.load(r_ptr + offs)))


def _triton_math(u):
    """log_unit, sincos(2pi u) and sqrt_pos(-2 ln u) of the Triton helpers, run by the
    interpreter (numpy, with a true fused multiply-add: the GPU's FFMA)."""
    x = torch.from_numpy(u)
    outs = [torch.empty_like(x) for _ in range(4)]
    n = 1 << 20  # Triton's largest block
    _math_kernel[(x.numel() // n,)](x, *outs, N=n)
    return [o.numpy() for o in outs]


@pytest.mark.skipif(not backends_for("q_sample", ("triton",)), reason="triton unavailable")
def test_box_muller_math_accuracy_every_uniform():
    lg, sn, cs, rad = _triton_math(ALL_U)
    u = ALL_U.astype(np.float64)
    th = (np.float32(TWO_PI_F32) * ALL_U).astype(np.float64)  # the float32 angle, as the kernels
    assert _ulps(lg, np.log(u)).max() <= 1.1
    assert _ulps(sn, np.sin(th)).max() <= 1.6
    assert _ulps(cs, np.cos(th)).max() <= 1.6
    # rad from the float32 log (its own error counted above): sqrt rounds it once more
    assert _ulps(rad, np.sqrt(-2.0 * lg.astype(np.float64))).max() <= 1.0


@pytest.mark.skipif(not backends_for("q_sample", ("triton",)), reason="triton unavailable")
def test_uniform_exact_every_word():
    """The Triton uniform of a Philox word r (1 + (r >> 9) 2^-23 as bits, minus 1 - 2^-24) is
    exactly (k + 1/2) 2^-23, k = r >> 9, for every k, the low 9 bits all 0 or all 1."""
    k = torch.arange(2 ** 23, dtype=torch.int64)
    n = 1 << 20
    for low in (0, 0x1FF):
        r = ((k << 9) | low).to(torch.int32).view(torch.uint32)
        u = torch.empty(2 ** 23, dtype=torch.float32)
        _uniform_kernel[(k.numel() // n,)](r, u, N=n)
        assert torch.equal(u, torch.from_numpy(ALL_U)), low


@pytest.mark.parametrize("backend, B, per", [
    ("cpu", 1 << 18, 3),       # per_sample 3: no whole group for the vector loop, all scalar
    ("triton", 2, 1 << 15),    # the interpreter: few, large programs
])
def test_kernel_normals_within_a_few_ulp_of_float64(backend, B, per):
    """The whole normal (Philox -> uniform -> log, sqrt, sincos -> product) as the C++ scalar
    body computes it (csrc/common.h, the CUDA kernels' element code) and as the Triton kernel
    does, against the float64 reference on ~800k / 65k draws: within 4 ulp (log 1 +
    sincos 1.5 + the sqrt and product roundings)."""
    import fastdiff
    if backend not in backends_for("q_sample", (backend,)):
        pytest.skip(f"{backend} backend unavailable")
    x0 = torch.zeros(B, per)
    t = torch.full((B,), 7)
    ref = image_normal(12345, torch.arange(B), 7, 0, per).numpy()
    with fastdiff.use_backend(backend):
        _, eps = fastdiff.q_sample(x0, t, fastdiff.Schedule(), seed=12345)
    err = _ulps(eps.numpy(), ref)
    assert err.max() <= 4.0, f"{backend}: {err.max():.2f} ulp"


def test_cpu_vector_normals_are_the_scalar_bits():
    """The CPU vector loop's Philox + Box-Muller (cpu/noise_vec.h) against the scalar body
    (common.h normal4, the CUDA kernels' element code) on the same groups of 16k images: samples
    of 12 elements (3 groups, fewer than a vector block: all scalar) against the first 12 of
    samples of 76 (a vector block, then a scalar tail). The same bits wherever the instruction set
    has FMA (AVX2, AVX-512), within 4 ulp of float64 everywhere."""
    import fastdiff
    if not backends_for("q_sample", ("cpu",)):
        pytest.skip("cpu backend unavailable")
    import fastdiff._C as C
    B = 1 << 14
    t = torch.full((B,), 7)
    ref = image_normal(99, torch.arange(B), 7, 0, 76).numpy()
    for cap in C.cpu_capabilities():
        C.set_cpu_capability(cap)
        try:
            with fastdiff.use_backend("cpu"):
                _, scalar = fastdiff.q_sample(torch.zeros(B, 12), t, fastdiff.Schedule(), seed=99)
                _, eps = fastdiff.q_sample(torch.zeros(B, 76), t, fastdiff.Schedule(), seed=99)
        finally:
            C.set_cpu_capability("")
        if cap != "DEFAULT":
            assert torch.equal(eps[:, :12], scalar), cap
        err = _ulps(eps.numpy(), ref)
        assert err.max() <= 4.0, f"{cap}: {err.max():.2f} ulp"
