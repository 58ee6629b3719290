"""group_norm_silu: every backend on this machine against the float64 reference.

Without a GPU the Triton kernels run through the interpreter: shapes stay small, and the looped /
split paths (which need groups larger than a tile at real sizes) are forced with the launcher's
`block` / `split` overrides. On a GPU the `gpu` cases add SD-sized shapes."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, HAS_CUDA, assert_close, backends_for
from fastdiff import backends
from fastdiff.ops.group_norm_silu import IMPLEMENTED, group_norm_silu, group_norm_silu_ref

BACKENDS = backends_for("group_norm_silu", IMPLEMENTED)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (shape, num_groups): batch 1, odd H·W, G = 1, G = C, C/G = 1, 1-D and 3-D spatial,
# H·W larger than one 1-D block of the CPU kernel (1024) and than the fused tile
CASES = [
    ((2, 8, 5, 7), 4),
    ((1, 6, 3, 5), 1),
    ((2, 6, 4, 4), 6),
    ((1, 12, 9), 3),
    ((2, 4, 2, 3, 5), 2),
    ((1, 4, 33, 37), 2),
]


def _inputs(shape, G, dtype, *, add=True, affine=True, mean=0.0, device=DEVICE):
    B, C = shape[:2]
    x = (torch.randn(shape, device=device) * 1.5 + mean).to(dtype)
    w = (torch.randn(C, device=device) * 0.5 + 1.0) if affine else None
    b = torch.randn(C, device=device) if affine else None
    a = torch.randn(B, C, device=device) if add else None
    return x, w, b, a


def _ref64(x, w, b, G, eps=1e-5, add=None, activation="silu", scale=None, shift=None):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return group_norm_silu_ref(d(x), d(w), d(b), G, eps, d(add), activation, d(scale), d(shift))


def _run(backend, x, w, b, G, eps=1e-5, add=None, activation="silu", scale=None, shift=None):
    with backends.use_backend(backend):
        return group_norm_silu(x, w, b, G, eps, add=add, scale=scale, shift=shift,
                               activation=activation)


def _scale_shift(B, C, device=DEVICE):
    return torch.randn(B, C, device=device) * 0.5, torch.randn(B, C, device=device)


def _channels_last(x):
    if x.dim() == 4:
        return x.to(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.to(memory_format=torch.channels_last_3d)
    return x.transpose(1, 2).contiguous().transpose(1, 2)  # (B, L, C) memory, (B, C, L) view


def _is_channels_last(t):
    return t.stride(1) == 1 and t.shape[1] > 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,G", CASES, ids=[f"{s}-G{g}" for s, g in CASES])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_reference(backend, dtype, shape, G, layout, seed):
    x, w, b, a = _inputs(shape, G, dtype)
    if layout == "channels_last":
        x = _channels_last(x)
    y = _run(backend, x, w, b, G, add=a)
    assert y.dtype == dtype and y.stride() == x.stride(), "output must keep x's memory format"
    assert_close(y, _ref64(x, w, b, G, add=a), dtype, scale=4.0, msg=f"{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("add,affine,activation", [
    (False, False, None), (False, True, "silu"), (True, False, "silu"), (True, True, None)])
def test_options(backend, add, affine, activation, seed):
    x, w, b, a = _inputs((2, 8, 6, 5), 2, torch.float32, add=add, affine=affine)
    y = _run(backend, x, w, b, 2, add=a, activation=activation)
    ref = _ref64(x, w, b, 2, add=a, activation=activation)
    assert_close(y, ref, torch.float32, scale=4.0, msg=backend)
    if activation is None and not add:  # and it is torch's GroupNorm
        assert_close(y, F.group_norm(x.double(), 2, None if w is None else w.double(),
                                     None if b is None else b.double()), torch.float32, scale=4.0)


def test_scale_shift_reference_is_the_formula(seed):
    """The reference itself: act(GroupNorm_affine(x + add) * (1 + scale) + shift), written out."""
    x, w, b, a = _inputs((2, 8, 5, 6), 4, torch.float64)
    sc, sh = (t.double() for t in _scale_shift(2, 8))
    per = lambda t: t[:, :, None, None]  # noqa: E731
    want = F.silu(F.group_norm(x + per(a), 4, w.double(), b.double(), 1e-5) * (1 + per(sc))
                  + per(sh))
    assert_close(group_norm_silu_ref(x, w.double(), b.double(), 4, 1e-5, a, "silu", sc, sh),
                 want, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,G", [((2, 8, 5, 7), 4), ((1, 6, 3, 5), 1), ((2, 6, 4, 4), 6),
                                     ((2, 4, 2, 3, 5), 2), ((1, 4, 33, 37), 2)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_scale_shift(backend, dtype, shape, G, layout, seed):
    x, w, b, a = _inputs(shape, G, dtype)
    sc, sh = _scale_shift(*shape[:2])
    if layout == "channels_last":
        x = _channels_last(x)
    y = _run(backend, x, w, b, G, add=a, scale=sc, shift=sh)
    assert y.dtype == dtype and y.stride() == x.stride()
    assert_close(y, _ref64(x, w, b, G, add=a, scale=sc, shift=sh), dtype, scale=4.0, msg=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("add,affine,activation,use_scale,use_shift", [
    (False, True, "silu", True, False), (False, True, "silu", False, True),
    (True, False, None, True, True), (False, False, "silu", True, True)])
def test_scale_shift_options(backend, add, affine, activation, use_scale, use_shift, seed):
    x, w, b, a = _inputs((2, 8, 6, 5), 2, torch.float32, add=add, affine=affine)
    sc, sh = _scale_shift(2, 8)
    kw = dict(add=a, activation=activation, scale=sc if use_scale else None,
              shift=sh if use_shift else None)
    for xx in (x, _channels_last(x)):
        assert_close(_run(backend, xx, w, b, 2, **kw), _ref64(xx, w, b, 2, **kw), torch.float32,
                     scale=4.0, msg=f"{backend} {kw['scale'] is not None} {kw['shift'] is not None}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_shift_strided_and_mixed_dtypes(backend, seed):
    """scale/shift as strided views (diffusers' temb.chunk(2, dim=1)) and in half precision."""
    x, w, b, _ = _inputs((2, 8, 5, 6), 4, torch.bfloat16)
    temb = torch.randn(2, 16, device=DEVICE)
    sc, sh = temb.chunk(2, dim=1)
    assert not sc.is_contiguous()
    y = _run(backend, x, w, b, 4, scale=sc, shift=sh.half())
    assert_close(y, _ref64(x, w, b, 4, scale=sc, shift=sh.half()), torch.bfloat16, scale=4.0,
                 msg=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_mean_no_cancellation(backend, layout, seed):
    """Inputs with mean 1e4 and std 1 (and a large add): fp32 statistics must not cancel."""
    x, w, b, a = _inputs((2, 8, 40, 40), 2, torch.float32, mean=1e4)
    a = a + 3e3
    if layout == "channels_last":
        x = _channels_last(x)
    y = _run(backend, x, w, b, 2, add=a)
    # the fp32 rounding of x itself is in the reference too; what is left is the kernels'
    assert_close(y, _ref64(x, w, b, 2, add=a), torch.float32, scale=4.0, msg=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend, seed):
    x, w, b, a = _inputs((2, 8, 10, 14), 4, torch.float32)
    xs = x[:, :, ::2, 1::2]                          # strided view: copied to contiguous
    y = _run(backend, xs, w, b, 4, add=a)
    assert y.is_contiguous()
    assert_close(y, _ref64(xs, w, b, 4, add=a), torch.float32, scale=4.0, msg=backend)
    xp = x.permute(0, 1, 3, 2)                       # transposed spatial dims
    assert_close(_run(backend, xp, w, b, 4, add=a), _ref64(xp, w, b, 4, add=a), torch.float32,
                 scale=4.0, msg=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,G", [((2, 8, 5, 6), 4), ((2, 8, 5), 2), ((1, 4, 3, 2, 5), 4)])
def test_cropped_channels_last_stays_channels_last(backend, shape, G, seed):
    # a crop of a channels_last map is neither dense order: the copy keeps channels innermost,
    # so y is channels_last like the input (any spatial rank)
    x, w, b, a = _inputs(shape, G, torch.float16)
    xc = _channels_last(x)[(slice(None), slice(None)) + (slice(1, None),) * (x.dim() - 2)]
    y = _run(backend, xc, w, b, G, add=a)
    assert y.stride(1) == 1 and y.shape == xc.shape
    assert_close(y, _ref64(xc, w, b, G, add=a), torch.float16, scale=4.0, msg=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_unaligned_views(backend, layout, seed):
    # dense tensors starting one element past an aligned address: the CUDA kernel's vector loads
    # fall back to narrower ones, the others must not care
    n = 2 * 8 * 5 * 6
    flat = torch.randn(n + 1, device=DEVICE).half()[1:]
    x = flat.view(2, 8, 5, 6) if layout == "contiguous" else \
        flat.view(2, 5, 6, 8).permute(0, 3, 1, 2)
    _, w, b, a = _inputs((2, 8, 5, 6), 4, torch.float16)
    y = _run(backend, x, w, b, 4, add=a)
    assert y.stride() == x.stride()
    assert_close(y, _ref64(x, w, b, 4, add=a), torch.float16, scale=4.0, msg=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_params(backend, seed):
    x, w, b, a = _inputs((2, 8, 5, 5), 4, torch.float32)
    w2, b2 = torch.randn(16, device=DEVICE)[::2], torch.randn(8, 2, device=DEVICE)[:, 1]
    a2 = torch.randn(8, 2, device=DEVICE).t()
    y = _run(backend, x, w2, b2, 4, add=a2)
    assert_close(y, _ref64(x, w2, b2, 4, add=a2), torch.float32, scale=4.0, msg=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_param_dtypes(backend, seed):
    """bf16 activations with fp32 parameters (autocast-style) and an fp16 add."""
    x, w, b, a = _inputs((2, 8, 5, 6), 4, torch.bfloat16)
    a = a.half()
    y = _run(backend, x, w, b, 4, add=a)
    assert y.dtype == torch.bfloat16
    assert_close(y, _ref64(x, w, b, 4, add=a), torch.bfloat16, scale=4.0, msg=backend)


# -- the Triton launcher's looped and split paths, forced on small shapes -----------------------
TRITON_PATHS = [  # (shape, G, block (BC, BS), split)
    ((2, 8, 5, 7), 4, (2, 8), 1),      # one program per group, looping over 3x... tiles
    ((2, 8, 5, 7), 4, (1, 16), 3),     # split: 3 chunks, last one short
    ((1, 6, 9, 11), 1, (4, 32), 2),    # G = 1, tiles straddle channel blocks
    ((1, 6, 7, 9), 6, (1, 16), 4),     # C/G = 1
    ((2, 6, 3, 3, 3), 3, (2, 8), 2),   # 3-D
]


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend not available")
@pytest.mark.parametrize("shape,G,block,split", TRITON_PATHS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_triton_looped_and_split_paths(shape, G, block, split, layout, seed):
    from fastdiff.kernels.group_norm_silu import group_norm_silu_triton
    x, w, b, a = _inputs(shape, G, torch.float32, mean=1e4)  # no cancellation on these paths too
    if layout == "channels_last":
        x = _channels_last(x)
    out = torch.full_like(x, float("nan"))
    group_norm_silu_triton(x, w, b, a, G, 1e-5, "silu", out, block=block, split=split)
    assert_close(out, _ref64(x, w, b, G, add=a), torch.float32, scale=4.0, msg=f"{block} {split}")
    for add, affine, act in ((False, False, None), (True, False, "silu"), (False, True, None)):
        o = torch.full_like(x, float("nan"))
        xa, wa, ba, aa = x, w if affine else None, b if affine else None, a if add else None
        group_norm_silu_triton(xa, wa, ba, aa, G, 1e-5, act, o, block=block, split=split)
        assert_close(o, _ref64(xa, wa, ba, G, add=aa, activation=act), torch.float32, scale=4.0,
                     msg=f"{block} {split} add={add} affine={affine} act={act}")
    sc, sh = _scale_shift(*shape[:2])
    for ss in ((sc, sh), (sc, None), (None, sh)):  # scale/shift on the looped and split paths
        o = torch.full_like(x, float("nan"))
        group_norm_silu_triton(x, w, b, a, G, 1e-5, "silu", o, block=block, split=split,
                               scale=ss[0], shift=ss[1])
        assert_close(o, _ref64(x, w, b, G, add=a, scale=ss[0], shift=ss[1]), torch.float32,
                     scale=4.0, msg=f"{block} {split} scale/shift {[t is not None for t in ss]}")
    out2 = torch.full_like(x, float("nan"))
    group_norm_silu_triton(x, w, b, a, G, 1e-5, "silu", out2, block=block, split=split)
    assert torch.equal(out, out2), "split reduction must be deterministic"


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend not available")
def test_triton_plan_splits_small_batches():
    """The heuristic itself: SD-size groups at batch 2 are split, at batch 16 they are not, and
    a group that fits one tile is read once."""
    from fastdiff.kernels.group_norm_silu import _plan
    dev = torch.device(DEVICE)
    single, BC, BS, K = _plan(2, 32, 10, 64 * 64, False, dev)
    assert not single and K > 1 and BC * BS <= 4096
    assert _plan(64, 32, 10, 64 * 64, False, dev)[3] == 1
    assert _plan(2, 32, 40, 8 * 8, True, dev)[0]
    # a split fills one wave of the (nominal, 132-SM) GPU with even chunks, never a second one
    for B, Cg, S in ((1, 10, 64 * 64), (2, 10, 64 * 64), (2, 20, 32 * 32), (2, 40, 16 * 16)):
        for cl in (False, True):
            _, BC, BS, K = _plan(B, 32, Cg, S, cl, dev)
            ntiles = -(-Cg // BC) * -(-S // BS)
            per_chunk = -(-ntiles // K)
            chunks = -(-ntiles // per_chunk)
            assert K > 1 and B * 32 * chunks <= 132 and ntiles % per_chunk == 0, (B, Cg, S, cl)
    # B·G = 256 >= the SMs: looped, not split (a split's pass 2 re-reads a 134 MB x from DRAM)
    assert _plan(8, 32, 4, 256 * 256, False, dev)[3] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("shape,G", [((2, 320, 64, 64), 32), ((1, 1280, 8, 8), 32),
                                     ((16, 640, 32, 32), 32), ((1, 64, 257, 129), 1)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_sd_shapes(backend, shape, G, layout, dtype, seed):
    x, w, b, a = _inputs(shape, G, dtype)
    if layout == "channels_last":
        x = _channels_last(x)
    y = _run(backend, x, w, b, G, add=a)
    assert y.stride() == x.stride()
    assert_close(y, _ref64(x, w, b, G, add=a), dtype, scale=4.0, msg=backend)
    assert torch.equal(y, _run(backend, x, w, b, G, add=a)), "must be deterministic"
    # the split paths without add / affine / SiLU (separate Triton specialisations)
    for add, affine, act in ((False, False, None), (True, False, "silu"), (False, True, None)):
        aa = a if add else None
        y = _run(backend, x, w if affine else None, b if affine else None, G, add=aa,
                 activation=act)
        ref = _ref64(x, w if affine else None, b if affine else None, G, add=aa, activation=act)
        assert_close(y, ref, dtype, scale=4.0, msg=f"{backend} add={add} affine={affine} {act}")
    sc, sh = _scale_shift(*shape[:2])
    y = _run(backend, x, w, b, G, add=a, scale=sc, shift=sh)
    assert_close(y, _ref64(x, w, b, G, add=a, scale=sc, shift=sh), dtype, scale=4.0,
                 msg=f"{backend} scale/shift")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.skipif(HAS_CUDA and torch.cuda.get_device_properties(0).total_memory < 40 * 2**30,
                    reason="needs ~20 GB of GPU memory")
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gpu_sample_over_2_31_elements(backend, layout, seed):
    # one sample (one group, G = 1) of 32 x 8200 x 8200 > 2^31 elements: offsets within a group
    # (NCHW) or a sample (channels_last) pass int32 (the Triton tiles once computed them in int32)
    C, H = 32, 8200
    x = torch.randn(1, C, H, H, device="cuda", dtype=torch.float16)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    assert x.numel() > 2 ** 31
    w = torch.randn(C, device="cuda") * 0.5 + 1.0
    b = torch.randn(C, device="cuda")
    y = _run(backend, x, w, b, 1)
    n = x.numel()
    mean = sum(x[0, c].double().sum() for c in range(C)) / n
    var = sum(((x[0, c].double() - mean) ** 2).sum() for c in range(C)) / n
    rstd = 1.0 / torch.sqrt(var + 1e-5)
    for c in (0, C // 2, C - 1):  # the first, a middle and the last channel: head and tail pixels
        for sl in (slice(0, 4096), slice(H * H - 4096, H * H)):
            xs = x[0, c].flatten()[sl].double()
            ref = F.silu((xs - mean) * rstd * w[c].double() + b[c].double())
            assert_close(y[0, c].flatten()[sl], ref, torch.float16, scale=4.0,
                         msg=f"{backend} {layout} c={c}")


# -- autograd, module, op registration ----------------------------------------------------------
def test_gradcheck(seed):
    x, w, b, a = (t.double().requires_grad_() for t in _inputs((2, 4, 3, 3), 2, torch.float32))
    f = lambda x, w, b, a: group_norm_silu(x, w, b, 2, add=a)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b, a))


def test_gradcheck_scale_shift(seed):
    x, w, b, a = (t.double().requires_grad_() for t in _inputs((2, 4, 3, 3), 2, torch.float32))
    sc, sh = (t.double().requires_grad_() for t in _scale_shift(2, 4))
    f = lambda x, w, b, a, sc, sh: group_norm_silu(x, w, b, 2, add=a, scale=sc, shift=sh)  # noqa
    assert torch.autograd.gradcheck(f, (x, w, b, a, sc, sh))


def test_grad_path_fp32_channels_last(seed):
    """With grad required the reference runs; grads match autograd of the float64 reference
    and the output keeps x's layout."""
    x, w, b, a = _inputs((2, 8, 4, 5), 4, torch.float32)
    x = x.to(memory_format=torch.channels_last).requires_grad_()
    for t in (w, b, a):
        t.requires_grad_()
    y = group_norm_silu(x, w, b, 4, add=a)
    assert y.stride() == x.stride()
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b, a), g)
    ins64 = [t.detach().double().requires_grad_() for t in (x, w, b, a)]
    r = _ref64(ins64[0], ins64[1], ins64[2], 4, add=ins64[3])
    refs = torch.autograd.grad(r, ins64, g.double())
    for name, got, want in zip(("x", "weight", "bias", "add"), grads, refs):
        assert_close(got, want, torch.float32, scale=10.0, msg=name)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("activation", ["silu", None])
def test_module_loads_groupnorm_state_dict(affine, activation, seed):
    from fastdiff.nn import GroupNormSiLU
    gn = torch.nn.GroupNorm(4, 8, eps=1e-6, affine=affine).to(DEVICE)
    if affine:
        with torch.no_grad():
            gn.weight.normal_()
            gn.bias.normal_()
    m = GroupNormSiLU(4, 8, eps=1e-6, affine=affine, activation=activation).to(DEVICE)
    m.load_state_dict(gn.state_dict())  # strict: same keys
    x = torch.randn(2, 8, 5, 6, device=DEVICE)
    with torch.no_grad():
        p64 = [None if t is None else t.double() for t in (gn.weight, gn.bias)]
        ref = F.group_norm(x.double(), 4, *p64, eps=1e-6)
        ref = F.silu(ref) if activation == "silu" else ref
        assert_close(m(x), ref, torch.float32, scale=4.0)
        a = torch.randn(2, 8, device=DEVICE)
        ref_a = F.group_norm((x + a[:, :, None, None]).double(), 4, *p64, eps=1e-6)
        ref_a = F.silu(ref_a) if activation == "silu" else ref_a
        assert_close(m(x, a), ref_a, torch.float32, scale=10.0)
        sc, sh = _scale_shift(2, 8)
        assert_close(m(x, a, sc, sh), _ref64(x, m.weight, m.bias, 4, 1e-6, a, activation, sc, sh),
                     torch.float32, scale=10.0)
        assert_close(m(x, scale=sc), _ref64(x, m.weight, m.bias, 4, 1e-6, None, activation, sc),
                     torch.float32, scale=10.0)


def test_module_rejects_bad_config():
    from fastdiff.nn import GroupNormSiLU
    with pytest.raises(ValueError, match="num_groups"):
        GroupNormSiLU(3, 8)
    with pytest.raises(ValueError, match="num_groups=0 must be positive"):
        GroupNormSiLU(0, 8)
    with pytest.raises(ValueError, match="activation"):
        GroupNormSiLU(4, 8, activation="gelu")


def test_opcheck(seed):
    x, w, b, a = _inputs((2, 8, 3, 4), 4, torch.float32)
    op = torch.ops.fastdiff.group_norm_silu.default
    torch.library.opcheck(op, (x, w, b, a, 4, 1e-5, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(op, (_channels_last(x), None, None, None, 2, 1e-5, False),
                          test_utils=("test_schema", "test_faketensor"))
    sc, sh = _scale_shift(2, 8)
    torch.library.opcheck(op, (_channels_last(x), w, b, a, 4, 1e-5, True, sc, sh),
                          test_utils=("test_schema", "test_faketensor"))


def test_float64_runs_reference(seed):
    x, w, b, a = _inputs((2, 8, 3, 4), 4, torch.float64)
    assert_close(group_norm_silu(x, w, b, 4, add=a), _ref64(x, w, b, 4, add=a), torch.float64)


def test_empty_batch():
    x = torch.randn(0, 8, 3, 4, device=DEVICE)
    assert group_norm_silu(x, None, None, 4).shape == x.shape


# -- every documented error ---------------------------------------------------------------------
def test_errors():
    x = torch.randn(2, 8, 3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="num_groups=3 .*divide"):
        group_norm_silu(x, None, None, 3)
    with pytest.raises(ValueError, match="num_groups"):
        group_norm_silu(x, None, None, 0)
    with pytest.raises(TypeError, match="num_groups must be an int"):
        group_norm_silu(x, None, None, 4.0)
    with pytest.raises(ValueError, match="weight must have shape"):
        group_norm_silu(x, torch.ones(4, device=DEVICE), None, 4)
    with pytest.raises(ValueError, match="bias must have shape"):
        group_norm_silu(x, None, torch.ones(8, 1, device=DEVICE), 4)
    with pytest.raises(ValueError, match="add must have shape"):
        group_norm_silu(x, None, None, 4, add=torch.ones(2, 8, 1, device=DEVICE))
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        group_norm_silu(x.to(torch.int32), None, None, 4)
    with pytest.raises(TypeError, match="weight must be a floating tensor"):
        group_norm_silu(x, torch.ones(8, dtype=torch.int64, device=DEVICE), None, 4)
    with pytest.raises(TypeError, match="add must be a floating tensor"):
        group_norm_silu(x, None, None, 4, add=torch.ones(2, 8, dtype=torch.int32, device=DEVICE))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        group_norm_silu(x.tolist(), None, None, 4)
    with pytest.raises(ValueError, match="x must have at least 3 dims"):
        group_norm_silu(torch.randn(2, 8, device=DEVICE), None, None, 4)
    with pytest.raises(ValueError, match="1 to 3 spatial dims"):
        group_norm_silu(torch.randn(1, 8, 2, 2, 2, 2, device=DEVICE), None, None, 4)
    with pytest.raises(ValueError, match="activation must be"):
        group_norm_silu(x, None, None, 4, activation="gelu")
    with pytest.raises(ValueError, match="eps"):
        group_norm_silu(x, None, None, 4, eps=-1.0)
    other = "meta"
    with pytest.raises(ValueError, match="weight is on meta"):
        group_norm_silu(x, torch.ones(8, device=other), None, 4)
    with pytest.raises(ValueError, match="add is on meta"):
        group_norm_silu(x, None, None, 4, add=torch.ones(2, 8, device=other))
    with pytest.raises(ValueError, match="bias is on meta"):
        group_norm_silu(x, None, torch.ones(8, device=other), 4)
    with pytest.raises(TypeError, match="bias must be a floating tensor"):
        group_norm_silu(x, None, torch.ones(8, dtype=torch.int32, device=DEVICE), 4)
    with pytest.raises(ValueError, match=r"scale must have shape \(2, 8\)"):
        group_norm_silu(x, None, None, 4, scale=torch.ones(8, device=DEVICE))
    with pytest.raises(ValueError, match=r"shift must have shape \(2, 8\)"):
        group_norm_silu(x, None, None, 4, shift=torch.ones(1, 8, device=DEVICE))
    with pytest.raises(TypeError, match="scale must be a floating tensor"):
        group_norm_silu(x, None, None, 4, scale=torch.ones(2, 8, dtype=torch.int64, device=DEVICE))
    with pytest.raises(TypeError, match="shift must be a torch.Tensor"):
        group_norm_silu(x, None, None, 4, shift=1.0)
    with pytest.raises(ValueError, match="scale is on meta"):
        group_norm_silu(x, None, None, 4, scale=torch.ones(2, 8, device=other))
    with pytest.raises(ValueError, match="shift is on meta"):
        group_norm_silu(x, None, None, 4, shift=torch.ones(2, 8, device=other))


@pytest.mark.skipif(not backends.available("cpu"), reason="extension not built")
def test_cpu_direct_path(monkeypatch, seed):
    """The common eager CPU call goes straight into the C++ kernel: the same bits as the custom
    op; anything else (grad, a dispatch mode, parameters to convert, a shape the kernel rejects)
    goes the general path."""
    import fastdiff._C as C
    import sys
    mod = sys.modules["fastdiff.ops.group_norm_silu"]
    calls = []

    def spy(*a):
        calls.append(a[0].shape)
        return C.group_norm_silu_cpu(*a)
    monkeypatch.setattr(mod, "_cpu_kernel", spy)
    B, Cn = 2, 16
    x, w, b, a = _inputs((B, Cn, 3, 5), 4, torch.float32)
    sc, sh = _scale_shift(B, Cn, device="cpu")
    for layout in ("contiguous", "channels_last"):
        xl = x if layout == "contiguous" else _channels_last(x)
        with torch.no_grad():
            y = group_norm_silu(xl, w, b, 4, add=a, scale=sc, shift=sh)
        assert calls and y.stride() == xl.stride()
        want = torch.empty_like(xl)
        torch.ops.fastdiff_ext.group_norm_silu(xl, w, b, a, sc, sh, 4, 1e-5, True, want)
        assert torch.equal(y, want)
        calls.clear()
    w16 = w.half()  # converted to float32 by the general path
    wg = w.clone().requires_grad_()
    for args in [(x, w16, b), (x.double(), w.double(), b.double()), (x, wg, b),
                 (x[:, :, :, 1:], w, b)]:
        y = group_norm_silu(*args, 4, add=a)
        assert not calls
        assert_close(y, _ref64(*args, 4, add=a), args[0].dtype, scale=4.0)
    with torch.no_grad(), torch._subclasses.fake_tensor.FakeTensorMode() as fake:
        group_norm_silu(fake.from_tensor(x), None, None, 4)
    with torch.no_grad(), torch.profiler.profile() as prof:  # the profiler sees the op
        group_norm_silu(x, w, b, 4)
    assert not calls and any("group_norm_silu" in e.name for e in prof.events())
    with pytest.raises(ValueError, match="weight must have shape"):  # rejected by the kernel
        group_norm_silu(x, torch.ones(8), None, 4)
    assert len(calls) == 1


def test_extension_op_checks_scale_shift():
    """The C++ entry point checks scale/shift too (it is reachable without the Python checks)."""
    if not backends.available("cpu"):
        pytest.skip("the C++ extension is not built")
    x = torch.randn(2, 8, 3, 4)
    out = torch.empty_like(x)
    with pytest.raises(ValueError, match="scale must be a contiguous float32 tensor"):
        torch.ops.fastdiff_ext.group_norm_silu(x, None, None, None, torch.ones(2, 4), None, 4,
                                               1e-5, True, out)
    with pytest.raises(ValueError, match="shift must be a contiguous float32 tensor"):
        torch.ops.fastdiff_ext.group_norm_silu(x, None, None, None, None,
                                               torch.ones(2, 8).half(), 4, 1e-5, True, out)
