"""fastdiff.UNet2DModel against diffusers' UNet2DModel: same (perturbed) weights, same outputs.

Small configs on CPU (fp32, rel L2 <= 1e-5) on the cpu and torch backends, triton under the
interpreter on a tiny config; loading/saving both ways, inside diffusers' pipelines, every error.
"""
import copy
import json
import os

import pytest
import torch

from conftest import HAS_CUDA, backends_for
from fastdiff import UNet2DModel, backends
from fastdiff.ops.group_norm_silu import IMPLEMENTED

diffusers = pytest.importorskip("diffusers")

CPU_BACKENDS = [b for b in backends_for("group_norm_silu", IMPLEMENTED, "cpu") if b != "triton"]

TINY = dict(sample_size=8, block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None)

CIFAR10 = dict(  # google/ddpm-cifar10-32
    sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    norm_eps=1e-6)

PX256_SMALL = dict(  # the 256-px config (google/ddpm-*-256) scaled down: 6 levels, attention at 1/16
    sample_size=32, block_out_channels=(16, 16, 32, 32, 64, 64), layers_per_block=1,
    norm_num_groups=8,
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    norm_eps=1e-6)

SMALL = dict(sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
             down_block_types=("DownBlock2D", "AttnDownBlock2D"),
             up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def _small(**kw):
    return {**SMALL, **kw}


CASES = {
    "cifar10": (CIFAR10, 1),
    "256px-small": (PX256_SMALL, 2),
    "head_dim-None": (_small(attention_head_dim=None), 2),
    "head_dim-8": (_small(attention_head_dim=8), 2),
    "scale_shift": (_small(resnet_time_scale_shift="scale_shift"), 2),
    "scale_shift-attn_groups": (_small(resnet_time_scale_shift="scale_shift",
                                       attn_norm_num_groups=4), 2),
    "fourier": (_small(time_embedding_type="fourier", flip_sin_to_cos=False), 2),
    "learned": (_small(time_embedding_type="learned", num_train_timesteps=1000), 2),
    "class-num_class_embeds": (_small(num_class_embeds=5), 2),
    "class-timestep": (_small(class_embed_type="timestep"), 2),
    "class-identity": (_small(class_embed_type="identity", time_embedding_dim=16 * 4), 2),
    "no-attention": (_small(add_attention=False), 2),
    "downsample_padding-0": (_small(downsample_padding=0), 2),
    "downsample_padding-1": (_small(downsample_padding=1), 2),
    "resnet-up-down": (_small(downsample_type="resnet", upsample_type="resnet",
                              down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
                              up_block_types=("AttnUpBlock2D", "AttnUpBlock2D")), 2),
    "odd-channels-groups": (dict(sample_size=12, block_out_channels=(9, 15), norm_num_groups=3,
                                 layers_per_block=1, attention_head_dim=4,
                                 down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "AttnUpBlock2D")), 2),
    "batch-1": (_small(), 1),
    "misc-options": (_small(center_input_sample=True, mid_block_scale_factor=1.4142,
                            time_embedding_dim=48, in_channels=2, out_channels=5, dropout=0.1,
                            norm_eps=1e-6, layers_per_block=2), 2),
    "no-mid-block": (_small(mid_block_type=None), 2),
    "rect-sample": (_small(sample_size=(8, 16)), 2),
}


def _perturbed_diffusers(cfg, seed=0):
    torch.manual_seed(seed)
    ref = diffusers.UNet2DModel(**cfg).eval()
    with torch.no_grad():  # every parameter moved off its init (no zeros, no ones)
        for p in ref.parameters():
            p.mul_(1 + 0.1 * torch.randn_like(p)).add_(0.02 * torch.randn_like(p))
    return ref


def _inputs(cfg, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    size = cfg["sample_size"]
    hw = (size, size) if isinstance(size, int) else tuple(size)
    x = torch.randn(batch, cfg.get("in_channels", 3), *hw, generator=g)
    if cfg.get("time_embedding_type") == "fourier":  # sigmas
        t = torch.rand(batch, generator=g) * 50 + 0.01
    else:
        t = torch.randint(0, 1000, (batch,), generator=g)
    labels = None
    if cfg.get("num_class_embeds"):
        labels = torch.randint(0, cfg["num_class_embeds"], (batch,), generator=g)
    elif cfg.get("class_embed_type") == "timestep":
        labels = torch.randint(0, 1000, (batch,), generator=g)
    elif cfg.get("class_embed_type") == "identity":
        labels = torch.randn(batch, cfg["time_embedding_dim"], generator=g)
    return x, t, labels


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def tiny_pair():
    ref = _perturbed_diffusers(TINY)
    return ref, UNet2DModel.from_diffusers(ref)


# the full-size CIFAR-10 model (36M parameters) runs once, on the C++ backend where it is built
PARITY = [(n, b) for n in CASES for b in CPU_BACKENDS if n != "cifar10" or b == CPU_BACKENDS[-1]]


@pytest.mark.parametrize("name,backend", PARITY, ids=[f"{n}-{b}" for n, b in PARITY])
def test_parity_with_diffusers(name, backend):
    cfg, batch = CASES[name]
    ref = _perturbed_diffusers(cfg)
    model = UNet2DModel(**cfg).eval()
    model.load_state_dict(ref.state_dict(), strict=True)  # no renaming
    x, t, labels = _inputs(cfg, batch)
    with torch.no_grad(), backends.use_backend(backend):
        want = ref(x, t, class_labels=labels).sample
        got = model(x, t, class_labels=labels).sample
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    assert _rel(got, want) <= 1e-5, f"{name} {backend}: rel L2 {_rel(got, want):.3g}"


def test_parity_triton_interpreter(tiny_pair):
    """Every fused op through the Triton kernels (the interpreter without a GPU); attention with
    one 32-channel head is in the Triton attention kernel's range."""
    if "triton" not in backends_for("group_norm_silu", IMPLEMENTED, "cpu"):
        pytest.skip("triton backend not available on CPU tensors")
    ref, model = tiny_pair
    x, t, _ = _inputs(TINY, 2)
    with torch.no_grad(), backends.use_backend("triton"):
        got = model(x, t).sample
    with torch.no_grad():
        want = ref(x, t).sample
    assert _rel(got, want) <= 1e-5


def test_channels_last_end_to_end(tiny_pair):
    """channels_last forced on CPU: every 4-D activation inside is channels_last, the output is
    the caller's layout, the numbers the same."""
    ref, model = tiny_pair
    model = copy.deepcopy(model)
    model.channels_last = True
    seen = []

    def hook(mod, inp, out):
        if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[1] > 1 and \
                out.shape[2] * out.shape[3] > 1:
            seen.append((type(mod).__name__, out.is_contiguous(memory_format=torch.channels_last)))
    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    x, t, _ = _inputs(TINY, 2)
    with torch.no_grad():
        y = model(x, t).sample
        want = ref(x, t).sample
        y_cl = model(x.to(memory_format=torch.channels_last), t).sample
    for h in handles:
        h.remove()
    assert seen and all(ok for _, ok in seen), [n for n, ok in seen if not ok]
    assert y.is_contiguous() and y_cl.is_contiguous(memory_format=torch.channels_last)
    assert _rel(y, want) <= 1e-5 and _rel(y_cl, want) <= 1e-5


@pytest.mark.parametrize("timestep", ["int", "0-d", "(1,)", "(B,)", "float"])
def test_timestep_forms(tiny_pair, timestep):
    ref, model = tiny_pair
    x, _, _ = _inputs(TINY, 2)
    t = {"int": 37, "0-d": torch.tensor(37), "(1,)": torch.tensor([37]),
         "(B,)": torch.tensor([37, 37]), "float": 37.0}[timestep]
    with torch.no_grad():
        want = ref(x, torch.tensor([37, 37])).sample
        out = model(x, t)
    assert _rel(out.sample, want) <= 1e-5
    with torch.no_grad():
        tup = model(x, t, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 1 and torch.equal(tup[0], out.sample)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_weights_and_autocast(tiny_pair, dtype):
    ref, model = tiny_pair
    x, t, _ = _inputs(TINY, 2)
    with torch.no_grad():
        want = ref(x, t).sample
        half = copy.deepcopy(model).to(dtype)
        assert half.dtype == dtype
        got = half(x.to(dtype), t).sample
        assert got.dtype == dtype
        assert _rel(got, want) <= 3e-2
        if dtype == torch.bfloat16:  # CPU autocast is bf16
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got_ac = model(x, t).sample
            assert _rel(got_ac, want) <= 3e-2


def test_torch_compile_fullgraph(tiny_pair):
    """Dynamo traces the whole forward with no graph break (backend="eager": the trace is what
    is tested here; inductor's codegen is too slow for CI on 2 cores)."""
    ref, model = tiny_pair
    x, t, _ = _inputs(TINY, 2)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        got = compiled(x, t).sample
        want = ref(x, t).sample
    assert _rel(got, want) <= 1e-5


def test_gradients_flow(tiny_pair):
    _, model = tiny_pair
    m = copy.deepcopy(model).train()
    x, t, _ = _inputs(TINY, 2)
    m(x, t).sample.square().mean().backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["down_blocks.0.resnets.0.norm2.weight"].abs().sum() > 0


# -- inside diffusers' own pipelines ------------------------------------------------------------
@pytest.mark.parametrize("pipe_name", ["DDPMPipeline", "DDIMPipeline"])
def test_runs_inside_diffusers_pipelines(tiny_pair, pipe_name):
    ref, model = tiny_pair
    sched_cls = diffusers.DDPMScheduler if pipe_name == "DDPMPipeline" else diffusers.DDIMScheduler
    out = {}
    for label, unet in (("diffusers", ref), ("fastdiff", model)):
        pipe = getattr(diffusers, pipe_name)(unet=unet, scheduler=sched_cls())
        pipe.set_progress_bar_config(disable=True)
        out[label] = pipe(batch_size=2, num_inference_steps=3, output_type="np",
                          generator=torch.Generator().manual_seed(0)).images
    assert out["fastdiff"].shape == (2, 8, 8, 3)
    assert abs(out["fastdiff"] - out["diffusers"]).max() < 1e-4


# -- loading and saving -------------------------------------------------------------------------
def test_save_pretrained_loads_in_diffusers(tiny_pair, tmp_path):
    ref, model = tiny_pair
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    back = diffusers.UNet2DModel.from_pretrained(tmp_path).eval()
    x, t, _ = _inputs(TINY, 2)
    with torch.no_grad():
        assert torch.equal(back(x, t).sample, ref(x, t).sample)  # the very same weights
    again = UNet2DModel.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(x, t).sample, model(x, t).sample)
    assert dict(again.config) == dict(model.config)


def test_from_pretrained_diffusers_pipeline_folder(tmp_path):
    ref = _perturbed_diffusers(_small(resnet_time_scale_shift="scale_shift"))
    pipe = diffusers.DDPMPipeline(unet=ref, scheduler=diffusers.DDPMScheduler())
    pipe.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="subfolder='unet'"):
        UNet2DModel.from_pretrained(tmp_path)
    model = UNet2DModel.from_pretrained(tmp_path, subfolder="unet")
    assert not model.training
    x, t, _ = _inputs(SMALL, 2)
    with torch.no_grad():
        assert _rel(model(x, t).sample, ref(x, t).sample) <= 1e-5
    bf = UNet2DModel.from_pretrained(tmp_path, subfolder="unet", torch_dtype=torch.bfloat16,
                                     device="cpu")
    assert bf.dtype == torch.bfloat16 and bf.device == torch.device("cpu")
    with torch.no_grad():
        assert _rel(bf(x.bfloat16(), t).sample, ref(x, t).sample) <= 3e-2


def test_from_pretrained_bin_and_old_attention_names(tiny_pair, tmp_path):
    ref, model = tiny_pair
    ref.save_pretrained(tmp_path)
    old = {}
    for k, v in ref.state_dict().items():
        for new, was in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                         ("to_out.0", "proj_attn")):
            k = k.replace(f".{new}.", f".{was}.")
        old[k] = v
    assert any(".proj_attn." in k for k in old)
    os.remove(tmp_path / "diffusion_pytorch_model.safetensors")
    torch.save(old, tmp_path / "diffusion_pytorch_model.bin")
    loaded = UNet2DModel.from_pretrained(tmp_path)
    x, t, _ = _inputs(TINY, 2)
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, model(x, t).sample)


def test_config_attribute_access(tiny_pair):
    _, model = tiny_pair
    assert model.config.sample_size == 8 and model.config.block_out_channels == (32, 32)
    assert model.config["layers_per_block"] == 1 and model.config.act_fn == "silu"
    with pytest.raises(AttributeError, match="no key 'nope'"):
        model.config.nope
    with pytest.raises(TypeError, match="read-only"):
        model.config["sample_size"] = 3
    assert copy.deepcopy(model).config == model.config
    assert model.dtype == torch.float32 and model.device == torch.device("cpu")
    defaults = UNet2DModel(**TINY).config
    ref_cfg = diffusers.UNet2DModel(**TINY).config
    for k, v in defaults.items():  # diffusers' defaults
        assert (tuple(v) if isinstance(v, (list, tuple)) else v) == \
            (tuple(ref_cfg[k]) if isinstance(ref_cfg[k], (list, tuple)) else ref_cfg[k]), k


def test_default_config_matches_diffusers_tree():
    """The default config's parameter names and shapes are diffusers' (meta device: no memory)."""
    with torch.device("meta"):
        ours = UNet2DModel().state_dict()
        theirs = diffusers.UNet2DModel().state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


# -- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(down_block_types=("SkipDownBlock2D", "DownBlock2D")),
     "down_block_types='SkipDownBlock2D' is not supported"),
    (dict(up_block_types=("AttnSkipUpBlock2D", "UpBlock2D")),
     "up_block_types='AttnSkipUpBlock2D' is not supported"),
    (dict(act_fn="gelu"), "act_fn='gelu' is not supported"),
    (dict(time_embedding_type="sinusoidal"), "time_embedding_type='sinusoidal'"),
    (dict(resnet_time_scale_shift="spatial"), "resnet_time_scale_shift='spatial'"),
    (dict(class_embed_type="projection"), "class_embed_type='projection'"),
    (dict(mid_block_type="UNetMidBlock2DCrossAttn"), "mid_block_type="),
    (dict(downsample_type="fir"), "downsample_type='fir'"),
    (dict(upsample_type="fir"), "upsample_type='fir'"),
    (dict(downsample_padding=2), "downsample_padding=2"),
    (dict(cross_attention_dim=64), "unknown UNet2DModel config key.*cross_attention_dim"),
    (dict(layers_per_block="2"), "'layers_per_block' must be an int, got str"),
    (dict(layers_per_block=True), "'layers_per_block' must be an int, got bool"),
    (dict(block_out_channels=(16, "32")), "'block_out_channels' must be a list of positive"),
    (dict(norm_eps="1e-5"), "'norm_eps' must be a number"),
    (dict(sample_size=(8, 8, 8)), "'sample_size' must be an int, a"),
    (dict(add_attention=1), "'add_attention' must be a bool"),
    (dict(block_out_channels=(16, 32, 64)), "same length"),
    (dict(norm_num_groups=5), "norm_num_groups=5 must divide"),
    (dict(time_embedding_type="learned"), "needs num_train_timesteps"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        UNet2DModel(**_small(**kw))


def test_forward_errors(tiny_pair):
    _, model = tiny_pair
    x, t, _ = _inputs(TINY, 2)
    with pytest.raises(ValueError, match=r"sample must be a \(B, 3, H, W\)"):
        model(x[:, :2], t)
    with pytest.raises(ValueError, match="timestep must be 0-d or of shape"):
        model(x, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="timestep must be an int"):
        model(x, "5")
    with pytest.raises(ValueError, match="no class embedding"):
        model(x, t, class_labels=torch.tensor([0, 1]))
    cond = UNet2DModel(**_small(num_class_embeds=3)).eval()
    with pytest.raises(ValueError, match="class_labels must be given"):
        cond(torch.randn(1, 3, 16, 16), 3)


@pytest.fixture
def saved(tiny_pair, tmp_path):
    tiny_pair[1].save_pretrained(tmp_path)
    return tmp_path


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _rewrite_weights(folder, edit):
    from safetensors.torch import load_file, save_file
    path = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)


def test_load_errors_missing_unexpected_shape(saved):
    def drop_add(state):
        state.pop("conv_in.bias")
        state.pop("mid_block.resnets.0.norm1.weight")
        state["extra.weight"] = torch.ones(2)
        state["conv_out.weight"] = torch.ones(4, 32, 3, 3)
    _rewrite_weights(saved, drop_add)
    with pytest.raises(ValueError) as e:
        UNet2DModel.from_pretrained(saved)
    msg = str(e.value)
    assert "missing keys (2): conv_in.bias, mid_block.resnets.0.norm1.weight" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "conv_out.weight: checkpoint (4, 32, 3, 3), model (3, 32, 3, 3)" in msg


def test_load_state_dict_strict_copies_nothing_on_error(tiny_pair):
    _, model = tiny_pair
    m = copy.deepcopy(model)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    bad = {k: torch.zeros_like(v) for k, v in before.items()}
    bad["conv_out.bias"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"conv_out.bias: checkpoint \(7,\), model \(3,\)"):
        m.load_state_dict(bad)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_load_errors_corrupt_safetensors(saved, damage):
    path = saved / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x07" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        UNet2DModel.from_pretrained(saved)


def test_load_errors_config(saved, tmp_path):
    _edit_config(saved, resnet_num_groups=4)
    with pytest.raises(ValueError, match="unknown UNet2DModel config key.*resnet_num_groups"):
        UNet2DModel.from_pretrained(saved)
    _edit_config(saved, resnet_num_groups=None)
    cfg = json.loads((saved / "config.json").read_text())
    cfg.pop("resnet_num_groups")
    cfg["layers_per_block"] = "one"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'layers_per_block' must be an int, got str 'one'"):
        UNet2DModel.from_pretrained(saved)
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        UNet2DModel.from_pretrained(saved)
    (saved / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="describes a AutoencoderKL"):
        UNet2DModel.from_pretrained(saved)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        UNet2DModel.from_pretrained(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(FileNotFoundError, match="no weights"):
        UNet2DModel.from_pretrained(empty)
    with pytest.raises(ValueError, match="torch_dtype must be a floating"):
        UNet2DModel.from_pretrained(saved, torch_dtype=torch.int8)


def test_bin_is_read_weights_only(tiny_pair, tmp_path):
    """A .bin holding anything but tensors is refused by torch.load(weights_only=True)."""
    tiny_pair[1].save_pretrained(tmp_path)
    os.remove(tmp_path / "diffusion_pytorch_model.safetensors")

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))
    torch.save({"x": Evil()}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="weights_only=True"):
        UNet2DModel.from_pretrained(tmp_path)


# -- GPU (skipped without one) ------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["cifar10", "256px-small", "scale_shift", "head_dim-8"])
def test_gpu_fp16_against_diffusers_fp32(name):
    cfg, batch = CASES[name]
    ref = _perturbed_diffusers(cfg).cuda()
    model = UNet2DModel.from_diffusers(ref).half()
    x, t, labels = (None if v is None else v.cuda() for v in _inputs(cfg, max(batch, 4)))
    with torch.no_grad():
        want = ref(x, t, class_labels=labels).sample
        got = model(x.half(), t, class_labels=labels).sample
        assert got.dtype == torch.float16
        assert _rel(got, want) <= 1e-2
        # channels_last inside, caller's layout outside; a CUDA graph replays the same output
        assert got.is_contiguous()
        static_x = x.half().clone()
        torch.cuda.synchronize()
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            model(static_x, t)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = model(static_x, t).sample
        g.replay()
        torch.cuda.synchronize()
        assert _rel(out, got) <= 1e-3
