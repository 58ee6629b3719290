"""attention (every backend) and AttentionBlock against float64 references.

Without a GPU the Triton kernel runs under TRITON_INTERPRET=1 on CPU tensors, so the shapes here
keep B·H small; the full sweep (long sequences, many heads) carries the `gpu` marker."""
import pytest
import torch

import fastdiff
from fastdiff.ops.attention import IMPLEMENTED, _attention_op, attention, attention_ref

from conftest import DEVICE, HAS_CUDA, assert_close, backends_for

BACKENDS = backends_for("attention", IMPLEMENTED)
HEAD_DIMS = (32, 40, 64, 80, 128, 160, 256)
LOWP = (torch.float16, torch.bfloat16)
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def make(B, H, Lq, Lk, D, dtype, device=DEVICE):
    q = torch.randn(B, H, Lq, D, device=device, dtype=dtype)
    k = torch.randn(B, H, Lk, D, device=device, dtype=dtype)
    v = torch.randn(B, H, Lk, D, device=device, dtype=dtype)
    return q, k, v


def ref64(q, k, v, scale=None):
    return attention_ref(q.double(), k.double(), v.double(), scale)


def run(backend, q, k, v, scale=None):
    with fastdiff.use_backend(backend):
        return attention(q, k, v, scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOWP + (torch.float32,))
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_head_dims(seed, backend, dtype, D):
    # Lq, Lk are not multiples of any block: both tails masked; 40/80/160 pad BLOCK_D
    q, k, v = make(1, 2, 77, 33, D, dtype)
    out = run(backend, q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, ref64(q, k, v), msg=f"{backend} D={D}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("D", (40, 64))
@pytest.mark.parametrize("Lq, Lk", [(1, 1), (1, 77), (7, 7), (77, 1), (77, 77), (7, 257),
                                    (257, 7), (257, 257)])
def test_lengths(seed, backend, dtype, D, Lq, Lk):
    # 257 = two full 128-query blocks + 1 and four full 64-key blocks + 1; Lk = 77 is the
    # text-encoder context of cross-attention
    q, k, v = make(1, 1, Lq, Lk, D, dtype)
    assert_close(run(backend, q, k, v), ref64(q, k, v), msg=f"{backend} {Lq}x{Lk}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("D, Lq, Lk", [(32, 1000, 1000), (80, 1000, 77), (48, 7, 1000),
                                       (100, 33, 65), (255, 17, 19)])
def test_long_lengths_and_other_head_dims(seed, backend, dtype, D, Lq, Lk):
    # 1000 (the longest odd length) on every backend; head dims off the table (48, 100,
    # 255) are padded like 40/80/160
    q, k, v = make(1, 1, Lq, Lk, D, dtype)
    assert_close(run(backend, q, k, v), ref64(q, k, v), msg=f"{backend} D={D} {Lq}x{Lk}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_rows_far_apart(seed, backend):
    # a key/value row stride of 2^23 elements: BLOCK_N rows span more than 2^31 elements, past
    # a 32-bit offset (the Triton launcher reads such K/V from a dense copy)
    buf = torch.randn(2 * 2 ** 23 + 64, device=DEVICE, dtype=torch.float16)
    k = buf.as_strided((1, 1, 3, 32), (0, 0, 2 ** 23, 1))
    v = buf.as_strided((1, 1, 3, 32), (0, 0, 2 ** 23, 1), 32)
    q = torch.randn(1, 1, 5, 32, device=DEVICE, dtype=torch.float16)
    assert_close(run(backend, q, k, v), ref64(q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_and_heads_are_separate(seed, backend):
    # B, H > 1 with distinct data per (b, h): a wrong batch/head stride reads another head
    q, k, v = make(3, 2, 9, 20, 64, torch.float16)
    assert_close(run(backend, q, k, v), ref64(q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [0.3, 2, 1e-3])
def test_scale(seed, backend, scale):
    q, k, v = make(1, 2, 17, 30, 32, torch.float32)
    out = run(backend, q, k, v, scale)
    assert_close(out, ref64(q, k, v, scale))
    # scale must matter: the default 1/sqrt(32) gives something else
    assert not torch.allclose(out, run(backend, q, k, v), atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOWP)
def test_packed_qkv_views(seed, backend, dtype):
    # q, k, v sliced out of one (B, L, 3, H, D) GEMM output, as AttentionBlock does: strides
    # (L·3·H·D, D, 3·H·D, 1), read in place
    B, L, H, D = 2, 45, 2, 40
    qkv = torch.randn(B, L, 3, H, D, device=DEVICE, dtype=dtype)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    assert not q.is_contiguous()
    assert_close(run(backend, q, k, v), ref64(q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_layouts(seed, backend):
    dt = torch.float16
    q = torch.randn(1, 2, 64, 19, device=DEVICE, dtype=dt).transpose(-1, -2)  # D stride != 1
    k = torch.randn(1, 2, 25, 64, device=DEVICE, dtype=dt)[:, :, ::2]  # every other key
    v = torch.randn(1, 1, 13, 64, device=DEVICE, dtype=dt).expand(1, 2, 13, 64)  # stride 0
    assert_close(run(backend, q, k, v), ref64(q, k, v))
    kb = torch.randn(1, 2, 13, 64, device=DEVICE, dtype=dt).expand(3, 2, 13, 64)  # over batch
    qb = torch.randn(3, 2, 5, 64, device=DEVICE, dtype=dt)
    assert_close(run(backend, qb, kb, kb), ref64(qb, kb, kb))


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_layout_and_no_unwritten(seed, backend):
    # the output is a (B, H, Lq, D) view of a (B, Lq, H, D) buffer (no copy needed to merge
    # heads); the buffer is NaN-poisoned first (conftest), so a row left unwritten fails
    q, k, v = make(2, 3, 130, 70, 80, torch.float16)
    out = run(backend, q, k, v)
    assert out.transpose(1, 2).is_contiguous()
    assert torch.isfinite(out).all()
    assert_close(out, ref64(q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(seed, backend):
    q, k, v = make(1, 2, 70, 130, 64, torch.bfloat16)
    assert torch.equal(run(backend, q, k, v), run(backend, q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_runs_reference(seed, backend):
    q, k, v = make(1, 1, 9, 11, 32, torch.float64)
    assert_close(run(backend, q, k, v), ref64(q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    q, k, v = make(2, 1, 0, 5, 32, torch.float16)
    assert run(backend, q, k, v).shape == (2, 1, 0, 32)
    q, k, v = make(0, 3, 4, 5, 32, torch.float16)
    assert run(backend, q, k, v).shape == (0, 3, 4, 32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_uses_reference(seed, backend):
    q, k, v = make(1, 2, 7, 9, 32, torch.float64)
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    out = run(backend, q32, k32, v32)
    assert out.grad_fn is not None
    g = torch.randn_like(out)
    out.backward(g)
    q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
    attention_ref(q64, k64, v64).backward(g.double())
    for a, b in ((q32, q64), (k32, k64), (v32, v64)):
        assert_close(a.grad, b.grad, torch.float32, scale=10)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend not available here")
def test_config_falls_back_when_it_does_not_fit(seed, monkeypatch):
    # A GPU with less shared memory than the H100 the table is sized for: the launcher must
    # retry with smaller tiles (compile-time OutOfResources), and remember what fit.
    import fastdiff.kernels.attention as ka
    real, tried = ka._attn_fwd_kernel, []

    class SmallGPU:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                tried.append((kw["BLOCK_M"], kw["num_stages"]))
                if kw["BLOCK_M"] > 32:
                    raise ka.OutOfResources(300000, 232448, "shared memory")
                return real[grid](*args, **kw)
            return launch
    monkeypatch.setattr(ka, "_attn_fwd_kernel", SmallGPU())
    monkeypatch.setattr(ka, "_FITS", {})
    q, k, v = make(1, 2, 100, 50, 64, torch.float16)
    assert_close(run("triton", q, k, v), ref64(q, k, v))
    assert tried[0] == (128, 3) and tried[-1][0] == 32
    n = len(tried)
    run("triton", q, k, v)
    assert len(tried) == n + 1  # the config that fit is launched directly the second time


def test_opcheck(seed):
    # schema, fake tensor (shape and strides), and AOT dispatch of the custom op
    q, k, v = make(1, 2, 9, 12, 32, torch.float32)
    torch.library.opcheck(_attention_op, (q, k, v, 0.2))


@pytest.mark.parametrize("dtype", LOWP + (torch.float32,))
def test_compile_traces_op(seed, dtype):
    q, k, v = make(1, 2, 9, 12, 32, dtype)
    f = torch.compile(lambda a, b, c: attention(a, b, c) * 2, fullgraph=True, backend="aot_eager")
    assert_close(f(q, k, v) / 2, ref64(q, k, v))


# ---------------------------------------------------------------------------------------- errors

def _ok():
    return make(1, 2, 4, 5, 32, torch.float16)


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda q, k, v: (q.float(), k, v), TypeError, "k must have the dtype of q"),
    (lambda q, k, v: (q, k, v.to(torch.bfloat16)), TypeError, "v must have the dtype of q"),
    (lambda q, k, v: (q.to(torch.int32), k.to(torch.int32), v.to(torch.int32)), TypeError,
     "q must be a floating tensor"),
    (lambda q, k, v: (q, k.to(torch.int64), v), TypeError, "k must be a floating tensor"),
    (lambda q, k, v: (q.cpu().numpy(), k, v), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v: (q[0], k, v), ValueError, "q must have 4 dims"),
    (lambda q, k, v: (q, k, v[None]), ValueError, "v must have 4 dims"),
    (lambda q, k, v: (q, torch.cat([k, k]), v), ValueError, "k must have the batch size of q"),
    (lambda q, k, v: (q, k, v[:, :1]), ValueError, "v must have the number of heads of q"),
    (lambda q, k, v: (q, k[..., :16], v), ValueError, "k must have the head dim of q"),
    (lambda q, k, v: (q, k, torch.cat([v, v], -1)), ValueError, "v must have the head dim of q"),
    (lambda q, k, v: (q[..., :16], k[..., :16], v[..., :16]), ValueError,
     r"head dim .* must be in \[32, 256\], got 16"),
    (lambda q, k, v: make(1, 1, 2, 3, 264, torch.float16), ValueError,
     r"must be in \[32, 256\], got 264"),
    (lambda q, k, v: (q, k, v[:, :, :3]), ValueError, "v must have as many keys as k"),
    (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), ValueError, "at least one key"),
    (lambda q, k, v: (q, k.to("meta"), v), ValueError, "k is on meta but q is on"),
])
def test_errors(mutate, exc, match):
    q, k, v = mutate(*_ok())
    with pytest.raises(exc, match=match):
        attention(q, k, v)


@pytest.mark.parametrize("scale, exc, match", [
    ("0.1", TypeError, "scale must be a float or None"),
    (True, TypeError, "scale must be a float or None"),
    (torch.tensor(0.1), TypeError, "scale must be a float or None"),
    (float("nan"), ValueError, "scale must be finite"),
    (float("inf"), ValueError, "scale must be finite"),
])
def test_scale_errors(scale, exc, match):
    with pytest.raises(exc, match=match):
        attention(*_ok(), scale)


@pytest.mark.skipif(not HAS_CUDA, reason="mixing devices needs a CUDA device")
def test_mixed_devices():
    q, k, v = _ok()
    with pytest.raises(ValueError, match="v is on cpu but q is on cuda"):
        attention(q, k, v.cpu())


# ------------------------------------------------------------------------------- GPU full sweep

SWEEP_DTYPES = LOWP + (torch.float32,)
SWEEP_LENGTHS = [(1000, 1000), (1000, 77), (4096, 77), (1, 1000), (1024, 1024), (257, 4096)]


def _sweep_cases():
    # Nearly every case is its own Triton compile (~1-2 s each on the GPU machine's host: the
    # lengths and strides change the kernel's specialization), and 126 of them would take
    # minutes. By default a diagonal runs: every head dim with 3 length pairs (one per dtype),
    # every dtype with all 6 pairs; the rest of the grid is marked `slow`
    # (`pytest -m slow -k gpu_sweep` runs it).
    out = []
    for i, dtype in enumerate(SWEEP_DTYPES):
        for j, D in enumerate(HEAD_DIMS):
            for k, (Lq, Lk) in enumerate(SWEEP_LENGTHS):
                diag = k == (j + 2 * i) % len(SWEEP_LENGTHS)
                out.append(pytest.param(dtype, D, Lq, Lk, marks=() if diag else pytest.mark.slow,
                                        id=f"{str(dtype)[6:]}-D{D}-{Lq}x{Lk}"))
    return out


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype, D, Lq, Lk", _sweep_cases())
def test_gpu_sweep(seed, dtype, D, Lq, Lk):
    q, k, v = make(2, 8, Lq, Lk, D, dtype)
    assert_close(run("triton", q, k, v), ref64(q, k, v), msg=f"D={D} {Lq}x{Lk}")


@gpu
@pytest.mark.gpu
def test_gpu_many_heads_and_packed(seed):
    # B·H beyond grid axis-1's 65535 limit, and a packed qkv at U-Net scale
    q, k, v = make(70000, 1, 16, 16, 32, torch.float16)
    assert_close(run("triton", q, k, v), ref64(q, k, v))
    qkv = torch.randn(4, 1024, 3, 8, 80, device=DEVICE, dtype=torch.float16)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    assert_close(run("triton", q, k, v), ref64(q, k, v))


# -------------------------------------------------------------------------------- AttentionBlock

def _diffusers_attention(C, head_dim, groups):
    Attention = pytest.importorskip("diffusers.models.attention_processor").Attention
    # constructed exactly as UNet2DModel's attention blocks are
    return Attention(C, heads=C // head_dim, dim_head=head_dim, rescale_output_factor=1.0,
                     eps=1e-6, norm_num_groups=groups, residual_connection=True, bias=True,
                     upcast_softmax=True, _from_deprecated_attn_block=True)


def _randomize(module, dtype):
    # non-trivial weights (GroupNorm's default affine is 1/0), exactly representable in `dtype`
    # so that the float64 reference and the block see the same numbers
    with torch.no_grad():
        for name, p in module.named_parameters():
            centre = 1.0 if name == "group_norm.weight" else 0.0
            p.copy_((torch.randn_like(p) * 0.2 + centre).to(dtype))
    return module


# (channels, head dim, groups): 2 heads of 32; 2 heads of 40 (padded BLOCK_D); head dim 8
# (UNet2DModel's default attention_head_dim, outside the kernel's range: SDPA fallback)
BLOCK_CASES = [(64, 32, 32), (80, 40, 16), (32, 8, 8)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32,) + LOWP)
@pytest.mark.parametrize("C, head_dim, groups", BLOCK_CASES)
def test_block_matches_diffusers(seed, backend, dtype, C, head_dim, groups):
    from fastdiff.nn import AttentionBlock
    pytest.importorskip("fastdiff.ops.group_norm_silu")
    ref = _randomize(_diffusers_attention(C, head_dim, groups), dtype).double().to(DEVICE)
    x = torch.randn(2, C, 5, 7, device=DEVICE).to(dtype)  # L = 35: odd, below one block
    with torch.no_grad():
        expect = ref(x.double())
    block = AttentionBlock(C, dim_head=head_dim, norm_num_groups=groups, eps=1e-6).to(DEVICE)
    block.load_state_dict(ref.state_dict(), strict=True)
    block.to(dtype)
    with fastdiff.use_backend(backend), torch.no_grad():
        out = block(x.contiguous(memory_format=torch.channels_last))
        out_nchw = block(x)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert out_nchw.is_contiguous()
    torch.testing.assert_close(out_nchw, out, rtol=0, atol=0)
    if dtype == torch.float32:
        assert_close(out, expect)
        return
    # In fp16/bf16 the norm, the GEMMs and the scores all round (scores of ~3 with these
    # weights amplify it through the softmax), so hold the block to diffusers' own error in the
    # same dtype (FlashAttention's criterion): within 2x in norm and 3x at the worst element.
    with torch.no_grad():
        lowp = ref.to(dtype)(x)

    def err(y):
        d = (y.double() - expect).abs()
        return d.max().item(), (d.norm() / expect.norm()).item()
    (ours_max, ours_rel), (theirs_max, theirs_rel) = err(out), err(lowp)
    assert torch.isfinite(out).all()
    assert ours_rel <= 2 * theirs_rel + 1e-4, f"relative norm error {ours_rel:.3g} vs " \
                                              f"diffusers {dtype}: {theirs_rel:.3g}"
    assert ours_max <= 3 * theirs_max + 1e-3, f"max error {ours_max:.3g} vs diffusers " \
                                              f"{dtype}: {theirs_max:.3g}"


def test_block_state_dict_keys():
    from fastdiff.nn import AttentionBlock
    ref = _diffusers_attention(64, 32, 32)
    block = AttentionBlock(64, dim_head=32, norm_num_groups=32, eps=1e-6)
    assert set(block.state_dict()) == set(ref.state_dict())
    ref.load_state_dict(block.state_dict(), strict=True)  # and back


def test_block_from_diffusers_and_weight_updates(seed):
    from fastdiff.nn import AttentionBlock
    pytest.importorskip("fastdiff.ops.group_norm_silu")
    a = _randomize(_diffusers_attention(64, 32, 32), torch.float32).double()
    b = _randomize(_diffusers_attention(64, 32, 32), torch.float32).double()
    block = AttentionBlock.from_diffusers(a)
    assert (block.heads, block.dim_head, block.group_norm.eps) == (2, 32, 1e-6)
    x = torch.randn(1, 64, 4, 3, dtype=torch.float64)
    with torch.no_grad():
        assert_close(block(x), a(x))
        block.load_state_dict(b.state_dict())
        assert_close(block(x), b(x))
        # what an EMA's copy_to does: writes through .data, which bumps no version counter
        b.to_v.weight.data.mul_(2)
        for p, q in zip(block.parameters(), AttentionBlock.from_diffusers(b).parameters()):
            p.data.copy_(q.data)
        assert_close(block(x), b(x))


def test_block_gradients_match_diffusers(seed):
    from fastdiff.nn import AttentionBlock
    pytest.importorskip("fastdiff.ops.group_norm_silu")
    ref = _randomize(_diffusers_attention(64, 32, 32), torch.float32).double()
    block = AttentionBlock.from_diffusers(ref)
    x = torch.randn(2, 64, 3, 5, dtype=torch.float64)
    g = torch.randn(2, 64, 3, 5, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(xa).backward(g)
    block(xb).backward(g)
    assert_close(xb.grad, xa.grad)
    grads = {name: p.grad for name, p in block.named_parameters()}
    assert set(grads) == {n for n, _ in ref.named_parameters()}
    for name, grad in grads.items():
        if name == "to_k.bias":  # softmax ignores a shift shared by all keys: its grad is ~0
            assert grad.abs().max() < 1e-10 and ref.to_k.bias.grad.abs().max() < 1e-10
            continue
        assert_close(grad, ref.get_parameter(name).grad, msg=name)


def test_block_weight_workflows():
    """What PyTorch code does with weights works as on diffusers' module: an EMA that copies
    through state_dict() (timm's ModelEmaV2), a partial non-strict load, meta-device init."""
    from fastdiff.nn import AttentionBlock
    pytest.importorskip("fastdiff.ops.group_norm_silu")
    a = AttentionBlock(64, dim_head=32, norm_num_groups=32).double()
    b = AttentionBlock(64, dim_head=32, norm_num_groups=32).double()
    with torch.no_grad():
        for e, m in zip(a.state_dict().values(), b.state_dict().values()):
            e.copy_(m)
    x = torch.randn(1, 64, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    sd = {k: v for k, v in b.state_dict().items() if k != "to_k.weight"}
    c = AttentionBlock(64, dim_head=32, norm_num_groups=32).double()
    res = c.load_state_dict(sd, strict=False)
    assert res.missing_keys == ["to_k.weight"] and torch.equal(c.to_q.weight, b.to_q.weight)
    m = AttentionBlock(64, dim_head=32, norm_num_groups=32, device="meta")
    m.to_empty(device="cpu")
    for mod in m.modules():
        if hasattr(mod, "reset_parameters") and mod is not m:
            mod.reset_parameters()
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_block_state_dict_saves_with_safetensors(tmp_path):
    from fastdiff.nn import AttentionBlock
    st = pytest.importorskip("safetensors.torch")
    block = AttentionBlock(64, dim_head=32, norm_num_groups=32, eps=1e-6)
    st.save_file(block.state_dict(), tmp_path / "block.safetensors")  # no shared storage
    other = AttentionBlock(64, dim_head=32, norm_num_groups=32, eps=1e-6)
    other.load_state_dict(st.load_file(tmp_path / "block.safetensors"))
    for p, q in zip(block.parameters(), other.parameters()):
        assert torch.equal(p, q)


def test_block_scale_from_diffusers(seed):
    from fastdiff.nn import AttentionBlock
    pytest.importorskip("fastdiff.ops.group_norm_silu")
    Attention = pytest.importorskip("diffusers.models.attention_processor").Attention
    ref = Attention(64, heads=2, dim_head=32, eps=1e-6, norm_num_groups=32, scale_qk=False,
                    residual_connection=True, bias=True, _from_deprecated_attn_block=True)
    ref = _randomize(ref, torch.float32).double()
    block = AttentionBlock.from_diffusers(ref)
    assert block.scale == 1.0
    x = torch.randn(1, 64, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        assert_close(block(x), ref(x))


def test_block_autocast_keeps_the_residual_precision(seed):
    from fastdiff.nn import AttentionBlock
    pytest.importorskip("fastdiff.ops.group_norm_silu")
    ref = _randomize(_diffusers_attention(64, 32, 32), torch.float32)
    block = AttentionBlock.from_diffusers(ref)
    x = 100 + torch.randn(2, 64, 3, 5)  # a large residual: rounding it to bf16 costs ~0.25
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = block(x), ref(x)
    assert ours.dtype == theirs.dtype == torch.float32
    assert (ours - x).abs().max() < 20  # the residual survived
    assert (ours - theirs).abs().max() <= 3 * (theirs - ref(x)).abs().max() + 1e-2


def test_block_rescale_and_no_residual(seed):
    from fastdiff.nn import AttentionBlock
    pytest.importorskip("fastdiff.ops.group_norm_silu")
    Attention = pytest.importorskip("diffusers.models.attention_processor").Attention
    ref = Attention(64, heads=1, dim_head=64, rescale_output_factor=2.5, eps=1e-5,
                    norm_num_groups=8, residual_connection=False, bias=True,
                    _from_deprecated_attn_block=True)
    ref = _randomize(ref, torch.float32).double()
    block = AttentionBlock.from_diffusers(ref)
    assert not block.residual_connection and block.rescale_output_factor == 2.5
    x = torch.randn(1, 64, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        assert_close(block(x), ref(x))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(channels=64, dim_head=48), ValueError, "dim_head=48 must divide channels=64"),
    (dict(channels=64, heads=5), ValueError, "heads=5 must divide channels=64"),
    (dict(channels=64, dim_head=32, attention_head_dim=16), ValueError, "disagree"),
    (dict(channels=64, rescale_output_factor=0), ValueError, "rescale_output_factor"),
])
def test_block_config_errors(kwargs, exc, match):
    from fastdiff.nn import AttentionBlock
    with pytest.raises(exc, match=match):
        AttentionBlock(**kwargs)


def test_block_input_errors():
    from fastdiff.nn import AttentionBlock
    block = AttentionBlock(64, dim_head=32)
    with pytest.raises(ValueError, match=r"x must be \(B, 64, H, W\)"):
        block(torch.randn(1, 32, 4, 4))
    with pytest.raises(ValueError, match=r"x must be \(B, 64, H, W\)"):
        block(torch.randn(64, 16))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        block([1.0])


def test_block_launches_no_copies():
    """channels_last in: one norm, the q/k/v weights concatenated (weights, not activations),
    one q/k/v GEMM, attention, the output GEMM and the residual add; the rest are views (no
    clone/copy of activations: no transposes that copy)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from fastdiff.nn import AttentionBlock
    pytest.importorskip("fastdiff.ops.group_norm_silu")

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    block = AttentionBlock(64, dim_head=32).eval()
    x = torch.randn(2, 64, 4, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), Log() as log:
        block(x)
    views = {"permute", "view", "t", "unbind", "transpose", "reshape", "_unsafe_view"}
    work = [op for op in log.ops if op not in views]
    assert work == ["group_norm_silu", "cat", "cat", "addmm", "attention", "addmm", "add_"], log.ops


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", (40, 80))
def test_unaligned_views(seed, backend, D):
    # a base one element off 16 bytes and an odd row stride: the Triton launcher passes its
    # strides in units of 1 element instead of 8 (no alignment it cannot prove)
    from fastdiff.kernels.attention import stride_unit
    buf = torch.randn(1 + 2 * 37 * (D + 3), device=DEVICE, dtype=torch.float16)
    q = buf[1:].view(2, 37, D + 3)[None, :, :, :D]
    k = torch.randn(1, 2, 21, D, device=DEVICE, dtype=torch.float16)
    v = torch.randn(1, 2, 21, D, device=DEVICE, dtype=torch.float16)
    assert stride_unit(q, k, v) == 1 and stride_unit(k, v) == 8
    assert_close(run(backend, q, k, v), ref64(q, k, v), msg=f"{backend} D={D}")


@pytest.mark.parametrize("D, parts", [(32, (32, 0)), (40, (32, 16)), (48, (32, 16)),
                                      (80, (64, 16)), (96, (64, 32)), (100, (64, 64)),
                                      (160, (128, 32)), (255, (128, 128)), (256, (256, 0))])
def test_head_dim_parts(D, parts):
    pytest.importorskip("triton")
    from fastdiff.kernels.attention import head_dim_parts
    assert head_dim_parts(D) == parts
