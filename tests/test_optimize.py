"""fastdiff.optimize / restore on diffusers models: optimized vs unoptimized outputs, same
(perturbed) weights, fp32 on CPU; idempotence, restore, the report, LoRA, torch.compile."""
import copy
import logging
import pickle
import string
import subprocess
import sys

import pytest
import torch

import fastdiff
from fastdiff import backends
from fastdiff.integrations import diffusers as fd

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402

from conftest import backends_for  # noqa: E402

REL = 1e-5  # fp32: ||optimized - diffusers|| / ||diffusers||
# the backends group_norm_silu has on CPU here (cpu when the extension is built); triton's
# interpreter runs the tiniest model only (test_triton_interpreter)
CPU_BACKENDS = [b for b in ("cpu", "torch") if b in backends_for("group_norm_silu",
                                                                  ("torch", "cpu"), "cpu")]


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def perturbed(model, seed=0, std=0.05):
    """Fresh diffusers init is too regular (GroupNorm weight 1, bias 0): every parameter moved."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def unet2d(kind="plain", **kw):
    torch.manual_seed(0)
    blocks = {"plain": dict(down_block_types=("DownBlock2D", "AttnDownBlock2D",
                                              "ResnetDownsampleBlock2D"),
                            up_block_types=("ResnetUpsampleBlock2D", "AttnUpBlock2D",
                                            "UpBlock2D"),
                            block_out_channels=(32, 64, 64)),
              "skip": dict(down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
                           up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"),
                           block_out_channels=(32, 64))}[kind]
    cfg = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
               norm_num_groups=8, attention_head_dim=32, **blocks)
    cfg.update(kw)
    return perturbed(UNet2DModel(**cfg))


def unet_cond(cross_attention_dim=48, attention_head_dim=(2, 4), **kw):
    torch.manual_seed(0)
    cfg = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
               block_out_channels=(64, 128),
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim,
               norm_num_groups=32)
    cfg.update(kw)
    return perturbed(UNet2DConditionModel(**cfg))


def vae():
    torch.manual_seed(0)
    return perturbed(AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
        latent_channels=4, norm_num_groups=32, layers_per_block=1, sample_size=16))


def unet2d_inputs(B=2, C=3, S=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, C, S, S, generator=g), torch.tensor([3, 700][:B])


def cond_inputs(cross=48, B=2, L=7):
    g = torch.Generator().manual_seed(2)
    return (torch.randn(B, 4, 8, 8, generator=g), torch.tensor([10, 600][:B]),
            torch.randn(B, L, cross, generator=g))


@torch.no_grad()
def before_after(model, run, backend="auto"):
    want = run(model)
    out = run(fastdiff.optimize(model, backend=backend))
    return out, want


# -- parity ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["plain", "skip"])
def test_unet2d(backend, kind):
    m = unet2d(kind)
    x, t = unet2d_inputs()
    out, want = before_after(m, lambda m: m(x, t).sample, backend)
    assert rel(out, want) <= REL
    c = m.fastdiff_report.counts()
    assert c["ResnetBlock2D"] >= 6 and c["Attention"] >= 2 and c["GroupNorm+SiLU"] >= 1
    if kind == "skip":  # the skip up-blocks' skip_norm + act pair is one of them
        assert any(p.endswith("skip_norm") for p, k, _ in m.fastdiff_report.replaced)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unet2d_scale_shift(backend):
    m = unet2d(resnet_time_scale_shift="scale_shift")
    x, t = unet2d_inputs()
    out, want = before_after(m, lambda m: m(x, t).sample, backend)
    assert rel(out, want) <= REL
    rep = m.fastdiff_report
    resnets = [p for p, mod in m.named_modules() if isinstance(mod, ResnetBlock2D)]
    if fd._HAS_MODULATION:
        assert rep.counts()["ResnetBlock2D"] == len(resnets)
    else:  # listed as left, with the reason
        left = {p: why for p, why in rep.left}
        assert all("scale_shift" in left[p] for p in resnets)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cross, heads", [(48, (2, 4)), (96, 2), (32, (1, 2))])
def test_unet2d_condition(backend, cross, heads):
    m = unet_cond(cross, heads)
    x, t, e = cond_inputs(cross)
    out, want = before_after(m, lambda m: m(x, t, e).sample, backend)
    assert rel(out, want) <= REL
    att = [mod for mod in m.modules() if isinstance(mod, Attention)]
    assert att and all(isinstance(a.processor, fd.FastdiffAttnProcessor) for a in att)
    assert {a.is_cross_attention for a in att} == {True, False}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autoencoder_kl(backend):
    m = vae()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))

    def run(m):
        d = m.encode(x).latent_dist
        return d.mean, d.std, m.decode(z).sample

    out, want = before_after(m, run, backend)
    for o, w in zip(out, want):
        assert rel(o, w) <= REL
    paths = [p for p, _, _ in m.fastdiff_report.replaced]
    for p in ("encoder.conv_norm_out", "decoder.conv_norm_out", "encoder.mid_block.attentions.0",
              "decoder.up_blocks.1.resnets.0", "decoder.mid_block.resnets.0"):
        assert p in paths


@pytest.mark.parametrize("time_norm", ["default", "scale_shift"])
def test_triton_interpreter(time_norm):
    """The Triton kernels (interpreted) inside the smallest model with attention."""
    if not backends.available("triton") or torch.cuda.is_available():
        pytest.skip("needs triton under TRITON_INTERPRET=1 on CPU")
    torch.manual_seed(0)
    m = perturbed(UNet2DModel(sample_size=4, in_channels=3, out_channels=3, layers_per_block=1,
                              block_out_channels=(32,), down_block_types=("AttnDownBlock2D",),
                              up_block_types=("AttnUpBlock2D",), norm_num_groups=8,
                              attention_head_dim=32, resnet_time_scale_shift=time_norm))
    x, t = unet2d_inputs(B=1, S=4)
    out, want = before_after(m, lambda m: m(x, t).sample, "triton")
    assert rel(out, want) <= REL


def test_backend_is_used(monkeypatch):
    m = unet_cond()
    x, t, e = cond_inputs()
    fastdiff.optimize(m, backend="torch")
    picked = []
    real = backends.pick

    def spy(op, *a, **k):
        picked.append((op, real(op, *a, **k)))
        return picked[-1][1]

    monkeypatch.setattr(backends, "pick", spy)
    with torch.no_grad():
        m(x, t, e)
    assert {op for op, _ in picked} == {"group_norm_silu", "attention"}
    assert {b for _, b in picked} == {"torch"}


def test_attention_mask_goes_to_original_processor():
    torch.manual_seed(0)
    a = perturbed(Attention(64, cross_attention_dim=32, heads=2, dim_head=32))
    h = torch.randn(2, 9, 64)
    e = torch.randn(2, 5, 32)
    mask = torch.zeros(2, 1, 5)
    mask[0, 0, 3:] = -1e4
    with torch.no_grad():
        want = a(h, e, attention_mask=mask), a(h, e)
        fastdiff.optimize(a)
        out = a(h, e, attention_mask=mask), a(h, e)
    assert rel(out[0], want[0]) <= REL and rel(out[1], want[1]) <= REL
    assert rel(out[0], out[1]) > 1e-3  # the mask mattered


def test_attention_kwargs_go_through_diffusers_forward(monkeypatch):
    """FastdiffAttention skips diffusers' processor-signature filter only when there is nothing
    to filter: cross_attention_kwargs still get diffusers' forward (which drops an unknown one)."""
    torch.manual_seed(0)
    a = perturbed(Attention(64, cross_attention_dim=32, heads=2, dim_head=32))
    h, e = torch.randn(2, 9, 64), torch.randn(2, 5, 32)
    seen = []
    real = Attention.forward
    monkeypatch.setattr(Attention, "forward", lambda self, *a, **k: seen.append(k) or
                        real(self, *a, **k))
    with torch.no_grad():
        want = a(h, e)
        fastdiff.optimize(a)
        assert type(a).__name__ == "FastdiffAttention"
        seen.clear()
        same = a(h, e)
        assert not seen
        got = a(h, e, not_a_processor_argument=1.0)
    assert seen == [{"not_a_processor_argument": 1.0}]
    assert rel(got, want) <= REL and torch.equal(same, got)


@pytest.mark.parametrize("own", [False, True], ids=["cpu-delegates", "own-path"])
@pytest.mark.parametrize("groups, residual, rescale", [(None, False, 1.0), (8, True, 2.0)])
def test_attention_options(groups, residual, rescale, own, monkeypatch):
    """group_norm on/off, residual_connection, rescale_output_factor, 3-D and 4-D input,
    self-attention and cross-attention of another length. On CPU the processor hands the call
    to diffusers' AttnProcessor2_0 (the same SDPA, less Python); `own` runs its own computation
    (the path of CUDA tensors and forced backends) on these CPU tensors."""
    calls = []
    real = AttnProcessor2_0.__call__
    monkeypatch.setattr(AttnProcessor2_0, "__call__",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    if own:
        monkeypatch.setattr(fd.FastdiffAttnProcessor, "_delegate", lambda self, h: False)
    torch.manual_seed(0)
    a = perturbed(Attention(64, heads=1, dim_head=64, norm_num_groups=groups, bias=True,
                            residual_connection=residual, rescale_output_factor=rescale))
    c = perturbed(Attention(64, cross_attention_dim=40, heads=2, dim_head=48))
    x4 = torch.randn(2, 64, 3, 5)
    x3 = torch.randn(2, 15, 64)
    e = torch.randn(2, 11, 40)
    with torch.no_grad():
        want = a(x4), a(x3), c(x3, e)
        fastdiff.optimize(a), fastdiff.optimize(c)
        calls.clear()
        out = a(x4), a(x3), c(x3, e)
    assert isinstance(a.processor, fd.FastdiffAttnProcessor)
    assert len(calls) == (0 if own else 3)
    for o, w in zip(out, want):
        assert rel(o, w) <= REL


def test_small_head_dim_keeps_sdpa():
    m = unet2d(attention_head_dim=8)  # UNet2DModel's default: head dims of 8
    x, t = unet2d_inputs()
    out, want = before_after(m, lambda m: m(x, t).sample)
    assert rel(out, want) <= REL
    att = [(p, mod) for p, mod in m.named_modules() if isinstance(mod, Attention)]
    assert all(type(mod.processor) is AttnProcessor2_0 for _, mod in att)
    left = dict(m.fastdiff_report.left)
    assert all("head dim 8" in left[p] for p, _ in att)


# -- a whole Stable-Diffusion-like pipeline ---------------------------------------------------
def tiny_sd_pipeline():
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase:  # byte-level BPE with no merges: one token per letter
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=12)
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32,
                                        intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=12,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    unet = unet_cond(cross_attention_dim=32, attention_head_dim=(2, 4))
    pipe = StableDiffusionPipeline(vae=vae(), text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe, **kw):
    return torch.from_numpy(pipe("a red cat", num_inference_steps=2, height=16, width=16,
                                 guidance_scale=3.0, output_type="np",
                                 generator=torch.Generator().manual_seed(0), **kw).images)


def test_stable_diffusion_pipeline():
    pipe = tiny_sd_pipeline()
    want = _image(pipe)
    assert fastdiff.optimize(pipe) is pipe
    got = _image(pipe)
    assert got.shape == (1, 16, 16, 3)
    assert rel(got, want) <= REL
    paths = [p for p, _, _ in pipe.fastdiff_report.replaced]
    assert any(p.startswith("unet.") for p in paths) and any(p.startswith("vae.") for p in paths)
    assert any(p.startswith("text_encoder") for p, _ in pipe.fastdiff_report.left)
    fastdiff.restore(pipe)
    assert torch.equal(_image(pipe), want)


def test_lora_scale_still_works():
    peft = pytest.importorskip("peft")
    m = unet_cond()
    x, t, e = cond_inputs()
    m.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                  target_modules=["to_q", "to_k", "to_v", "to_out.0"]))

    def run(m, s):
        return m(x, t, e, cross_attention_kwargs={"scale": s}).sample

    with torch.no_grad():
        want = [run(m, s) for s in (0.0, 1.0)]
        fastdiff.optimize(m)
        out = [run(m, s) for s in (0.0, 1.0)]
    assert rel(out[0], out[1]) > 1e-3  # the adapter scale still changes the output
    for o, w in zip(out, want):
        assert rel(o, w) <= REL
    # an adapter added after optimize lands on the same projections the processor calls
    m2 = fastdiff.optimize(unet_cond())
    with torch.no_grad():
        plain = m2(x, t, e).sample
        m2.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        assert rel(run(m2, 1.0), plain) > 1e-3
        assert rel(run(m2, 0.0), plain) <= REL


# -- idempotence, restore, the report ---------------------------------------------------------
def test_idempotent_and_restore():
    m = unet_cond()
    x, t, e = cond_inputs()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    classes = {n: type(mod) for n, mod in m.named_modules()}
    procs = {n: mod.processor for n, mod in m.named_modules() if isinstance(mod, Attention)}
    with torch.no_grad():
        want = m(x, t, e).sample
        r1 = fastdiff.optimize(m).fastdiff_report
        once = m(x, t, e).sample
        r2 = fastdiff.optimize(m).fastdiff_report
        twice = m(x, t, e).sample
    assert r1.changed > 0 and r2.changed == 0
    assert r2.replaced == r1.replaced and r2.left == r1.left
    assert torch.equal(once, twice)
    assert m.state_dict().keys() == sd.keys()
    assert fastdiff.restore(m) is m
    assert {n: type(mod) for n, mod in m.named_modules()} == classes
    assert all(mod.processor is procs[n] for n, mod in m.named_modules() if n in procs)
    assert not hasattr(m, "fastdiff_report")
    with torch.no_grad():
        assert torch.equal(m(x, t, e).sample, want)
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    fastdiff.restore(m)  # restoring an unoptimized model changes nothing
    assert {n: type(mod) for n, mod in m.named_modules()} == classes


def test_enable_false_restores():
    m = unet2d()
    classes = {n: type(mod) for n, mod in m.named_modules()}
    fastdiff.optimize(m)
    assert {n: type(mod) for n, mod in m.named_modules()} != classes
    assert fastdiff.optimize(m, enable=False) is m
    assert {n: type(mod) for n, mod in m.named_modules()} == classes


def test_report_content(caplog):
    from diffusers.models.resnet import ResnetBlockCondNorm2D

    class Unknown(torch.nn.Module):
        def forward(self, x):
            return x

    m = torch.nn.ModuleDict(dict(
        res=ResnetBlock2D(in_channels=32, temb_channels=16, groups=8),
        gelu=ResnetBlock2D(in_channels=32, temb_channels=16, groups=8, non_linearity="gelu"),
        ada=ResnetBlockCondNorm2D(in_channels=32, temb_channels=16, groups=8,
                                  time_embedding_norm="ada_group"),
        attn=Attention(32, heads=1, dim_head=32, norm_num_groups=8),
        small=Attention(32, heads=4, dim_head=8),
        norm=torch.nn.GroupNorm(4, 32), other=Unknown()))
    with caplog.at_level(logging.INFO, logger="fastdiff.integrations.diffusers"):
        rep = fastdiff.optimize(m).fastdiff_report
    assert rep.counts() == {"ResnetBlock2D": 1, "Attention": 1, "GroupNorm": 1}
    kinds = {p: k for p, k, _ in rep.replaced}
    assert kinds == {"res": "ResnetBlock2D", "attn": "Attention", "norm": "GroupNorm"}
    left = dict(rep.left)
    assert "SiLU only" in left["gelu"] and "ada" in left and "head dim 8" in left["small"]
    assert "other" not in left  # unknown modules are left alone without comment
    assert type(m.other) is Unknown and type(m["gelu"]) is ResnetBlock2D
    assert type(m["ada"]) is ResnetBlockCondNorm2D
    assert "replaced 1 ResnetBlock2D" in str(rep) and "left" in str(rep)
    assert any("fastdiff.optimize" in r.getMessage() for r in caplog.records)


def test_errors():
    m = unet2d()
    with pytest.raises(ValueError, match="backend must be one of"):
        fastdiff.optimize(m, backend="fast")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="not available"):
            fastdiff.optimize(m, backend="cuda")
    with pytest.raises(TypeError, match="expects a diffusers model"):
        fastdiff.optimize(object())
    with pytest.raises(TypeError, match="expects a diffusers model"):
        fastdiff.restore("unet")
    assert not hasattr(m, "fastdiff_report")  # the failed calls changed nothing


def test_copy_and_pickle():
    m = fastdiff.optimize(unet_cond())
    x, t, e = cond_inputs()
    with torch.no_grad():
        want = m(x, t, e).sample
        for c in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
            assert type(c.mid_block.resnets[0]).__name__ == "FusedResnetBlock2D"
            attn = c.mid_block.attentions[0].transformer_blocks[0].attn1
            assert type(attn).__name__ == "FastdiffAttention"
            assert torch.equal(c(x, t, e).sample, want)
            fastdiff.restore(c)
            assert type(c.mid_block.resnets[0]) is ResnetBlock2D
            assert type(attn) is Attention


def test_no_diffusers_import_at_fastdiff_import():
    code = "import sys, fastdiff; fastdiff.optimize; assert 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_compile_fullgraph():
    """No graph break from fastdiff: the optimized U-Net traces whole (aot_eager: dynamo and
    AOTAutograd with the ops' fake kernels, without inductor's slow CPU codegen)."""
    m = fastdiff.optimize(unet_cond())
    x, t, e = cond_inputs()
    torch._dynamo.reset()
    with torch.no_grad():
        want = m(x, t, e).sample
        got = torch.compile(m, fullgraph=True, backend="aot_eager")(x, t, e).sample
    assert rel(got, want) <= REL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fp16_channels_last_and_cuda_graph():
    """On a GPU: fp16 optimized vs fp32 diffusers rel <= 1e-2, conv weights channels_last, and
    the optimized forward captured in a CUDA graph replays what eager computes."""
    m32 = unet_cond().cuda()
    x, t, e = (a.cuda() for a in cond_inputs())
    with torch.no_grad():
        want = m32(x, t, e).sample
        m16 = fastdiff.optimize(copy.deepcopy(m32).half())
        assert m16.fastdiff_report.channels_last > 0
        assert m16.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        assert rel(m16(x.half(), t, e.half()).sample.float(), want) <= 1e-2
        static = [x.half(), t.clone(), e.half()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (Triton compiles) outside the capture
            for _ in range(2):
                m16(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = m16(*static).sample
        static[0].copy_(torch.randn_like(static[0]))
        graph.replay()
        torch.cuda.synchronize()
        assert rel(y.float(), m16(*static).sample.float()) <= 1e-3
    fastdiff.restore(m16)
    assert m16.conv_in.weight.is_contiguous()
