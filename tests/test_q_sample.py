"""q_sample on every backend against the float64 reference, with given and in-kernel noise."""
import pytest
import torch

import fastdiff
from fastdiff.ops.q_sample import IMPLEMENTED, q_sample_ref
from fastdiff.reference import STREAM_Q_SAMPLE, memory_order_normal

from conftest import DEVICE, TOL, assert_close, backends_for

BACKENDS = backends_for("q_sample", IMPLEMENTED)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [  # (B, C, H, W)-like shapes that catch indexing bugs
    (1, 3, 8, 8),
    (4, 3, 5, 7),      # per-sample size 105: Philox groups straddle samples
    (3, 4, 33, 33),    # larger than one program
    (2, 5),            # 1-D per sample, not a multiple of 4
    (7, 3),            # samples smaller than a Philox group: one group spans up to 3 samples
    (5, 1),
]


@pytest.fixture(scope="module")
def schedule():
    return fastdiff.Schedule("linear", 1000)


def _ref(x0, t, schedule, noise, v=False):
    ab = schedule.table("sqrt_alphas_cumprod", "cpu", torch.float64)
    s = schedule.table("sqrt_one_minus_alphas_cumprod", "cpu", torch.float64)
    return q_sample_ref(x0.double().cpu(), t.cpu(), ab, s, noise.double().cpu(), v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_given_noise(backend, dtype, shape, schedule):
    x0 = torch.randn(shape, device=DEVICE).to(dtype)
    noise = torch.randn(shape, device=DEVICE).to(dtype)
    t = torch.randint(0, 1000, (shape[0],), device=DEVICE)
    with fastdiff.use_backend(backend):
        x_t, eps, v = fastdiff.q_sample(x0, t, schedule, noise=noise, v_target=True)
    assert eps is noise
    ref_xt, ref_v = _ref(x0, t, schedule, noise, True)
    assert x_t.dtype == dtype and v.dtype == dtype
    assert_close(x_t, ref_xt, dtype, msg=f"{backend} x_t")
    assert_close(v, ref_v, dtype, msg=f"{backend} v")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_drawn_noise_with_v_target(backend, dtype, schedule):
    # the drawn-noise + v_target specialisation of every kernel: v from the returned eps
    shape = (4, 3, 5, 7)
    x0 = torch.randn(shape, device=DEVICE).to(dtype)
    t = torch.randint(0, 1000, (shape[0],), device=DEVICE)
    with fastdiff.use_backend(backend):
        x_t, eps, v = fastdiff.q_sample(x0, t, schedule, seed=77, v_target=True)
    ref_eps = memory_order_normal(77, t.cpu(), STREAM_Q_SAMPLE, x0.double().cpu())
    assert_close(eps, ref_eps, dtype, msg=f"{backend} eps")
    ref_xt, ref_v = _ref(x0, t, schedule, eps, True)
    assert_close(x_t, ref_xt, dtype, msg=f"{backend} x_t")
    assert_close(v, ref_v, dtype, msg=f"{backend} v")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_drawn_noise_matches_reference_stream(backend, dtype, shape, schedule):
    x0 = torch.randn(shape, device=DEVICE).to(dtype)
    t = torch.randint(0, 1000, (shape[0],), device=DEVICE)
    with fastdiff.use_backend(backend):
        x_t, eps = fastdiff.q_sample(x0, t, schedule, seed=2 ** 40 + 17)
    ref_eps = memory_order_normal(2 ** 40 + 17, t.cpu(), STREAM_Q_SAMPLE, x0.double().cpu())
    # the normals themselves: few float32 ulp from the float64 reference of the same stream
    assert_close(eps, ref_eps, dtype, msg=f"{backend} eps")
    assert_close(x_t, _ref(x0, t, schedule, eps), dtype, msg=f"{backend} x_t")


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_keeps_layout_and_memory_order_noise(backend, schedule):
    x0 = torch.randn(2, 6, 5, 3, device=DEVICE).to(memory_format=torch.channels_last)
    noise = torch.randn(2, 6, 5, 3, device=DEVICE)  # contiguous: re-laid out like x0
    t = torch.tensor([3, 999], device=DEVICE)
    with fastdiff.use_backend(backend):
        x_t, _ = fastdiff.q_sample(x0, t, schedule, noise=noise)
        x_t2, eps2 = fastdiff.q_sample(x0, t, schedule, seed=5)
    assert x_t.is_contiguous(memory_format=torch.channels_last)
    assert eps2.is_contiguous(memory_format=torch.channels_last)
    assert_close(x_t, _ref(x0, t, schedule, noise), torch.float32)
    ref_eps = memory_order_normal(5, t.cpu(), STREAM_Q_SAMPLE, x0.double().cpu())
    assert_close(eps2, ref_eps, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend, schedule):
    base = torch.randn(4, 3, 9, 8, device=DEVICE)
    x0 = base[:, :, ::2, 1:]  # strided view
    noise = torch.randn_like(x0)
    t = torch.randint(0, 1000, (4,), device=DEVICE)
    with fastdiff.use_backend(backend):
        x_t, _ = fastdiff.q_sample(x0, t, schedule, noise=noise)
    assert_close(x_t, _ref(x0, t, schedule, noise), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_views(backend, dtype, schedule):
    """Dense views that start one element into their storage: the kernels' 4-element vector
    accesses must fall back to scalar ones (and the results must not change)."""
    shape = (3, 4, 6, 6)
    n = 3 * 4 * 6 * 6
    x0 = torch.randn(n + 1, device=DEVICE).to(dtype)[1:].view(shape)
    noise = torch.randn(n + 3, device=DEVICE).to(dtype)[3:].view(shape)
    t = torch.tensor([0, 400, 999], device=DEVICE)
    with fastdiff.use_backend(backend):
        x_t, _, v = fastdiff.q_sample(x0, t, schedule, noise=noise, v_target=True)
        x_t2, eps2 = fastdiff.q_sample(x0, t, schedule, seed=8)
    ref_xt, ref_v = _ref(x0, t, schedule, noise, True)
    assert_close(x_t, ref_xt, dtype, msg=f"{backend} x_t")
    assert_close(v, ref_v, dtype, msg=f"{backend} v")
    ref_eps = memory_order_normal(8, t.cpu(), STREAM_Q_SAMPLE, x0.double().cpu().contiguous())
    assert_close(eps2, ref_eps, dtype, msg=f"{backend} eps")


def test_same_seed_same_noise_on_every_backend(schedule):
    x0 = torch.randn(3, 3, 7, 5, device=DEVICE)
    t = torch.tensor([0, 500, 999], device=DEVICE)
    outs = {}
    for backend in BACKENDS:
        with fastdiff.use_backend(backend):
            outs[backend] = fastdiff.q_sample(x0, t, schedule, seed=99)[1].double().cpu()
    first = outs[BACKENDS[0]]
    for name, e in outs.items():
        err = (e - first).abs() / first.abs().clamp_min(1.0)
        assert err.max() <= 1e-6, f"{name} differs from {BACKENDS[0]}: {err.max():.3g}"


def test_seed_reproducible_and_t_changes_noise(schedule):
    x0 = torch.randn(2, 4, 4, 4, device=DEVICE)
    a = fastdiff.q_sample(x0, torch.tensor([5, 5]), schedule, seed=1)[1]
    b = fastdiff.q_sample(x0, torch.tensor([5, 5]), schedule, seed=1)[1]
    c = fastdiff.q_sample(x0, torch.tensor([6, 5]), schedule, seed=1)[1]
    d = fastdiff.q_sample(x0, torch.tensor([5, 5]), schedule, seed=2)[1]
    assert torch.equal(a, b)
    assert not torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    assert not torch.equal(a, d)


def test_seed_none_follows_torch_manual_seed(schedule):
    x0 = torch.randn(2, 8, device=DEVICE)
    torch.manual_seed(0)
    a = fastdiff.q_sample(x0, 3, schedule)[1]
    torch.manual_seed(0)
    b = fastdiff.q_sample(x0, 3, schedule)[1]
    assert torch.equal(a, b)


def test_add_noise_parity_with_diffusers(schedule):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    ours = fastdiff.Schedule.from_alphas_cumprod(sched.alphas_cumprod)
    x0 = torch.randn(4, 3, 8, 8)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 10, 500, 999])
    expected = sched.add_noise(x0, noise, t)
    got, _ = fastdiff.q_sample(x0, t, ours, noise=noise)
    rel = (got - expected).abs().max() / expected.abs().max()
    assert rel <= 1e-6, f"max relative error {rel:.3g}"


def test_float64_runs_reference(schedule):
    x0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([1, 2])
    x_t, _ = fastdiff.q_sample(x0, t, schedule, noise=noise)
    assert x_t.dtype == torch.float64
    assert torch.allclose(x_t, _ref(x0, t, schedule, noise), rtol=0, atol=1e-15)


def test_compile_fullgraph_reference_backend(schedule):
    x0 = torch.randn(2, 3, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.tensor([1, 700])
    f = torch.compile(lambda x, n, tt: fastdiff.q_sample(x, tt, schedule, noise=n)[0],
                      fullgraph=True, backend="eager")
    with fastdiff.use_backend("torch"):
        got = f(x0, noise, t)
    assert_close(got, _ref(x0, t, schedule, noise), torch.float32)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(t=torch.tensor([0, 1000])), ValueError, r"t has values in \[0, 1000\], outside \[0, 1000\)"),
    (dict(t=torch.tensor([-1, 3])), ValueError, "outside"),
    (dict(t=torch.tensor([1, 2, 3])), ValueError, r"t must have shape \(2,\)"),
    (dict(t=torch.tensor([1.0, 2.0])), TypeError, "t must be an integer tensor"),
    (dict(t=1000), ValueError, r"t=1000 is out of range"),
    (dict(noise=torch.randn(2, 3, 4, 5)), ValueError, "noise must have the shape of x0"),
    (dict(noise=torch.randn(2, 3, 4, 4), seed=1), ValueError, "either noise or seed"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(seed=torch.tensor(1.0)), TypeError, "seed must be an integer tensor"),
    (dict(seed=torch.tensor([1, 2])), ValueError, "seed must be an integer tensor of 1 element"),
    (dict(seed=torch.tensor(1, device="meta")), ValueError, "seed is on meta but the data is on cpu"),
    (dict(first_index=-1), ValueError, r"first_index must be in \[0, 2\^32 - B\]"),
    (dict(first_index=2 ** 32 - 1), ValueError, r"first_index must be in .* got 4294967295"),
    (dict(first_index=1.0), TypeError, "first_index must be an int or a 1-element int64 tensor"),
    (dict(first_index=True), TypeError, "first_index must be an int"),
    (dict(first_index=torch.tensor([0.5])), TypeError, "first_index must be an integer tensor"),
    (dict(first_index=torch.zeros(2, dtype=torch.int64)), ValueError,
     "first_index must be an integer tensor of 1 element"),
    (dict(schedule="linear"), TypeError, "schedule must be a fastdiff.Schedule"),
    (dict(noise=torch.randn(2, 3, 4, 4, device="meta")), ValueError,
     "noise is on meta but x0 is on cpu"),
    (dict(t=torch.tensor([1, 2], device="meta")), ValueError, "t is on meta but the data is on cpu"),
    (dict(noise=torch.ones(2, 3, 4, 4, dtype=torch.int32)), TypeError,
     "noise must be a floating tensor"),
])
def test_errors(kwargs, err, match, schedule):
    args = dict(x0=torch.randn(2, 3, 4, 4), t=torch.tensor([1, 2]), schedule=schedule)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        fastdiff.q_sample(**args)


def test_integer_x0_rejected(schedule):
    with pytest.raises(TypeError, match="x0 must be a floating tensor"):
        fastdiff.q_sample(torch.ones(2, 3, dtype=torch.int64), torch.tensor([1, 2]), schedule)


def test_kernel_clamps_unchecked_t(schedule, monkeypatch):
    """With checks off (as inside a CUDA graph), an out-of-range t reads the schedule's ends."""
    monkeypatch.setenv("FASTDIFF_CHECKS", "0")
    x0 = torch.randn(2, 8, device=DEVICE)
    noise = torch.randn_like(x0)
    for backend in BACKENDS:
        with fastdiff.use_backend(backend):
            got, _ = fastdiff.q_sample(x0, torch.tensor([-5, 5000], device=DEVICE), schedule,
                                       noise=noise)
        want = _ref(x0, torch.tensor([0, 999]), schedule, noise)
        assert_close(got, want, torch.float32, msg=backend)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "cuda")])
def test_ext_op_rejects_noise_laid_out_unlike_x0(backend, schedule):
    """The kernels index noise/eps/v by x0's memory position: other strides (or, on CUDA, a
    CPU tensor) must be refused, not read out of order or out of bounds."""
    x0 = torch.randn(2, 3, 4, 5, device=DEVICE)
    t = torch.tensor([1, 2], device=DEVICE)
    ab = schedule.table("sqrt_alphas_cumprod", DEVICE, torch.float32)
    s1 = schedule.table("sqrt_one_minus_alphas_cumprod", DEVICE, torch.float32)
    x_t, empty = torch.empty_like(x0), x0.new_empty(0)
    bad = torch.randn(2, 5, 4, 3, device=DEVICE).transpose(1, 3)  # x0's shape, other strides
    with pytest.raises(ValueError, match="laid out like x0"):
        torch.ops.fastdiff_ext.q_sample(x0, t, ab, s1, bad, 0, None, 0, None, x_t, empty, empty)
    with pytest.raises(ValueError, match="laid out like x0"):
        torch.ops.fastdiff_ext.q_sample(x0, t, ab, s1, None, 0, None, 0, None, x_t, bad, empty)
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="laid out like x0"):
            torch.ops.fastdiff_ext.q_sample(x0, t, ab, s1, torch.randn(2, 3, 4, 5), 0, None, 0, None, x_t,
                                            empty, empty)


def test_unchecked_t_draws_noise_with_t_as_given(schedule, monkeypatch):
    """With checks off, an out-of-range t clamps the schedule index, but the noise is drawn with
    t as given (fastdiff.reference), on every backend: Triton once drew it with the clamped t."""
    monkeypatch.setenv("FASTDIFF_CHECKS", "0")
    for shape in ((2, 8), (2, 5)):  # whole Philox groups per sample, and groups straddling two
        x0 = torch.randn(shape, device=DEVICE)
        t = torch.tensor([-5, 5000], device=DEVICE)
        want = memory_order_normal(9, t, STREAM_Q_SAMPLE, x0)
        for backend in BACKENDS:
            with fastdiff.use_backend(backend):
                _, eps = fastdiff.q_sample(x0, t, schedule, seed=9)
            assert_close(eps, want.double(), torch.float32, msg=f"{backend} {shape}")


@pytest.mark.gpu
def test_inside_cuda_graph_same_noise(gpu_backend, schedule):
    """Captured and replayed: no host sync, and the noise equals an eager call's."""
    backend = gpu_backend
    x0 = torch.randn(8, 3, 32, 32, device="cuda")
    t = torch.randint(0, 1000, (8,), device="cuda")
    with fastdiff.use_backend(backend):
        eager = fastdiff.q_sample(x0, t, schedule, seed=3)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fastdiff.q_sample(x0, t, schedule, seed=3)
        g.replay()
        torch.cuda.synchronize()
    assert torch.equal(out[0], eager[0]) and torch.equal(out[1], eager[1])


@pytest.mark.gpu
def test_gpu_over_2_31_elements(gpu_backend, schedule):
    """64-bit indexing: a 2^31 + 12 element fp16 tensor (3 x 4.3 GB), checked at the far end."""
    from fastdiff.reference import philox_normal
    backend = gpu_backend
    B, per = 2, 2 ** 30 + 6
    x0 = torch.ones(B, per, device="cuda", dtype=torch.float16)
    t = torch.tensor([10, 900], device="cuda")
    with fastdiff.use_backend(backend):
        x_t, eps = fastdiff.q_sample(x0, t, schedule, seed=11)
    tail = 4096
    start = B * per - tail
    want_eps = philox_normal(11, 900, STREAM_Q_SAMPLE, tail, image=1, start=per - tail)
    got_eps = eps.flatten()[start:].double().cpu()
    assert_close(got_eps, want_eps, torch.float16)
    a = schedule.sqrt_alphas_cumprod[900].item()
    s = schedule.sqrt_one_minus_alphas_cumprod[900].item()
    assert_close(x_t.flatten()[start:], a + s * got_eps, torch.float16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_beyond_one_grid_axis(backend, schedule, monkeypatch):
    """More samples than grid axis 1 holds (65535): Triton launches the batch in slices from an
    offset; here the slice size is shrunk to 3 so that 7 samples take three launches."""
    if backend == "triton":
        import fastdiff.kernels.q_sample as kq
        monkeypatch.setattr(kq, "MAX_GRID_Y", 3)
    x0 = torch.randn(7, 3, 5, device=DEVICE)
    t = torch.randint(0, 1000, (7,), device=DEVICE)
    with fastdiff.use_backend(backend):
        x_t, eps = fastdiff.q_sample(x0, t, schedule, seed=21)
    ref_eps = memory_order_normal(21, t.cpu(), STREAM_Q_SAMPLE, x0.double().cpu())
    assert_close(eps, ref_eps, torch.float32, msg=backend)
    assert_close(x_t, _ref(x0, t, schedule, eps), torch.float32, msg=backend)


@pytest.mark.gpu
def test_gpu_batch_over_65535(gpu_backend, schedule):
    x0 = torch.randn(70000, 2, device="cuda")
    t = torch.randint(0, 1000, (70000,), device="cuda")
    with fastdiff.use_backend(gpu_backend):
        x_t, eps = fastdiff.q_sample(x0, t, schedule, seed=22)
    ref_eps = memory_order_normal(22, t.cpu(), STREAM_Q_SAMPLE, x0.double().cpu())
    assert_close(eps, ref_eps, torch.float32)
    assert_close(x_t, _ref(x0, t, schedule, eps), torch.float32)


# -- noise per image (issue 11) ----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_image", [(3, 5, 7), (4, 4, 4)])  # odd (short last group), whole
def test_noise_is_per_image_whatever_the_batch(backend, per_image, schedule):
    """Image 12 at t = 321 from batches of 1, 7 and 64, at positions 0 and 5 (first_index 12 and
    7): the same noise bits, equal to the reference's; the other images' noise differs."""
    x1 = torch.randn((1,) + per_image, device=DEVICE)
    want = memory_order_normal(31, 321, STREAM_Q_SAMPLE, x1.double().cpu(), 12)[0]
    got = []
    for B, pos in ((1, 0), (7, 0), (7, 5), (64, 5)):
        x0 = torch.randn((B,) + per_image, device=DEVICE)
        t = torch.randint(0, 1000, (B,), device=DEVICE)
        t[pos] = 321
        with fastdiff.use_backend(backend):
            _, eps = fastdiff.q_sample(x0, t, schedule, seed=31, first_index=12 - pos)
        got.append(eps[pos].cpu())
        if B > 1:
            assert not torch.equal(eps[pos - 1 if pos else 1].cpu(), got[-1])
    assert_close(got[0], want, torch.float32, msg=backend)
    for g in got[1:]:
        assert torch.equal(g, got[0]), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_device_tensor_seed_and_first_index_equal_ints(backend, schedule):
    x0 = torch.randn(3, 3, 5, 7, device=DEVICE)
    t = torch.tensor([4, 500, 999], device=DEVICE)
    for seed, first in ((77, 0), (2 ** 63 + 9, 2 ** 31 + 4), (-3, 1000)):
        s64 = seed & (2 ** 64 - 1)
        seed_t = torch.tensor(s64 - 2 ** 64 if s64 >= 2 ** 63 else s64, device=DEVICE)
        with fastdiff.use_backend(backend):
            a = fastdiff.q_sample(x0, t, schedule, seed=seed, first_index=first, v_target=True)
            b = fastdiff.q_sample(x0, t, schedule, seed=seed_t,
                                  first_index=torch.tensor([first], device=DEVICE), v_target=True)
            # other integer dtypes are converted on the device
            c = fastdiff.q_sample(x0, t, schedule, seed=seed_t.int() if abs(seed) < 2 ** 31 else seed_t,
                                  first_index=torch.tensor(first % 2 ** 31, device=DEVICE,
                                                           dtype=torch.int32) + (first - first % 2 ** 31))
        for u, v in zip(a, b):
            assert torch.equal(u, v), (backend, seed, first)
        assert torch.equal(a[1], c[1])
        ref = memory_order_normal(seed, t.cpu(), STREAM_Q_SAMPLE, x0.double().cpu(), first)
        assert_close(a[1], ref, torch.float32, msg=backend)


@pytest.mark.gpu
def test_cuda_graph_replay_reads_seed_and_first_index(gpu_backend, schedule):
    """A captured q_sample replayed after seed_t.fill_() / first_t.fill_() draws the noise of
    the new values (the kernels read them on the device: nothing baked into the graph)."""
    x0 = torch.randn(4, 3, 16, 16, device="cuda")
    t = torch.randint(0, 1000, (4,), device="cuda")
    seed_t = torch.tensor(1, device="cuda")
    first_t = torch.tensor([0], device="cuda")
    with fastdiff.use_backend(gpu_backend):
        fastdiff.q_sample(x0, t, schedule, seed=seed_t, first_index=first_t)  # warm-up/compile
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fastdiff.q_sample(x0, t, schedule, seed=seed_t, first_index=first_t)
        for seed, first in ((1, 0), (2, 0), (2, 64)):
            seed_t.fill_(seed)
            first_t.fill_(first)
            g.replay()
            eager = fastdiff.q_sample(x0, t, schedule, seed=seed, first_index=first)
            torch.cuda.synchronize()
            assert torch.equal(out[1], eager[1]) and torch.equal(out[0], eager[0]), (seed, first)
