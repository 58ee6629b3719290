"""fastdiff.UNet2DModel: diffusers' UNet2DModel (pixel-space DDPM/DDIM U-Net) on the fused ops.

Same constructor keywords and defaults, module tree and parameter names as diffusers, so a
diffusers state dict loads strictly and `save_pretrained` writes a folder diffusers loads back.
Where the time goes: convolutions/linears (PyTorch), group_norm_silu (every GroupNorm -> SiLU,
time embedding fused in), AttentionBlock. On CUDA the activations are channels_last throughout;
the output takes the caller's layout. The forward reads nothing back to the host, so it can be
captured in a CUDA graph and traced by torch.compile(fullgraph=True).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .nn import (ACT_FNS, AttnDownBlock2D, AttnUpBlock2D, DownBlock2D, GaussianFourierProjection,
                 GroupNormSiLU, TimestepEmbedding, Timesteps, UNetMidBlock2D, UpBlock2D)

WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_BIN = "diffusion_pytorch_model.bin"
CONFIG = "config.json"
DIFFUSERS_FORMAT_VERSION = "0.42.1"  # the diffusers release whose format the tests check

_INT, _NUM, _BOOL, _STR, _OPT_INT = "an int", "a number", "a bool", "a string", "an int or null"
# config key -> (default, expected type, allowed values or None)
CONFIG_KEYS: dict[str, tuple[Any, str, Optional[tuple]]] = {
    "sample_size": (None, "sample_size", None),
    "in_channels": (3, _INT, None),
    "out_channels": (3, _INT, None),
    "center_input_sample": (False, _BOOL, None),
    "time_embedding_type": ("positional", _STR, ("positional", "fourier", "learned")),
    "time_embedding_dim": (None, _OPT_INT, None),
    "freq_shift": (0, _NUM, None),
    "flip_sin_to_cos": (True, _BOOL, None),
    "down_block_types": (("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                         "strings", ("DownBlock2D", "AttnDownBlock2D")),
    "mid_block_type": ("UNetMidBlock2D", "a string or null", ("UNetMidBlock2D", None)),
    "up_block_types": (("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       "strings", ("UpBlock2D", "AttnUpBlock2D")),
    "block_out_channels": ((224, 448, 672, 896), "ints", None),
    "layers_per_block": (2, _INT, None),
    "mid_block_scale_factor": (1, _NUM, None),
    "downsample_padding": (1, _INT, (0, 1)),
    "downsample_type": ("conv", _STR, ("conv", "resnet")),
    "upsample_type": ("conv", _STR, ("conv", "resnet")),
    "dropout": (0.0, _NUM, None),
    "act_fn": ("silu", _STR, ACT_FNS),
    "attention_head_dim": (8, _OPT_INT, None),
    "norm_num_groups": (32, _INT, None),
    "attn_norm_num_groups": (None, _OPT_INT, None),
    "norm_eps": (1e-5, _NUM, None),
    "resnet_time_scale_shift": ("default", _STR, ("default", "scale_shift")),
    "add_attention": (True, _BOOL, None),
    "class_embed_type": (None, "a string or null", (None, "timestep", "identity")),
    "num_class_embeds": (None, _OPT_INT, None),
    "num_train_timesteps": (None, _OPT_INT, None),
}


class FrozenConfig(dict):
    """The model's config: a read-only dict with attribute access (`config.sample_size`), as
    diffusers' FrozenDict."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def _readonly(self, *a, **k):
        raise TypeError("the config of a built model is read-only: build a new model instead")

    def __reduce__(self):  # copy.deepcopy (an EMA copy of the model) and pickle
        return (FrozenConfig, (dict(self),))

    __setitem__ = __delitem__ = __setattr__ = update = pop = popitem = clear = setdefault = \
        _readonly


def _type_ok(value, kind: str) -> bool:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == _INT:
        return is_int
    if kind == _OPT_INT:
        return value is None or is_int
    if kind == _NUM:
        return is_int or isinstance(value, float)
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _STR:
        return isinstance(value, str)
    if kind.endswith("or null"):
        return value is None or isinstance(value, str)
    if kind == "strings":
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    if kind == "ints":
        return isinstance(value, (list, tuple)) and len(value) > 0 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    if kind == "sample_size":
        return value is None or _type_ok(value, _INT) or (
            isinstance(value, (list, tuple)) and len(value) == 2 and all(_type_ok(v, _INT)
                                                                         for v in value))
    raise AssertionError(kind)


def check_config(config: dict) -> dict:
    """The full config (defaults filled in) of a diffusers UNet2DModel config dict; keys that
    start with '_' (diffusers' metadata) are dropped. Unknown keys, values of the wrong type and
    options this model does not implement are a ValueError naming the key and the value."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown UNet2DModel config key(s): {', '.join(unknown)} (known: "
                         f"{', '.join(CONFIG_KEYS)})")
    out = {}
    for key, (default, kind, allowed) in CONFIG_KEYS.items():
        value = config.get(key, default)
        if not _type_ok(value, kind):
            expected = {"strings": "a list of strings", "ints": "a list of positive ints",
                        "sample_size": "an int, a [height, width] pair or null"}.get(kind, kind)
            raise ValueError(f"config key {key!r} must be {expected}, got "
                             f"{type(value).__name__} {value!r}")
        if isinstance(value, list):
            value = tuple(value)
        vals = value if kind == "strings" else (value,)
        for v in vals:
            name = v[7:] if kind == "strings" and v.startswith("UNetRes") else v
            if allowed is not None and name not in allowed:
                raise ValueError(f"{key}={v!r} is not supported by fastdiff.UNet2DModel "
                                 f"(supported: {', '.join(map(repr, allowed))})")
        out[key] = value
    n = len(out["block_out_channels"])
    if len(out["down_block_types"]) != n or len(out["up_block_types"]) != n:
        raise ValueError(f"down_block_types ({len(out['down_block_types'])}), up_block_types "
                         f"({len(out['up_block_types'])}) and block_out_channels ({n}) must "
                         "have the same length")
    G = out["norm_num_groups"]
    for c in out["block_out_channels"]:
        if G <= 0 or c % G:
            raise ValueError(f"norm_num_groups={G} must divide every block_out_channels entry "
                             f"(got {c})")
    if out["time_embedding_type"] == "learned" and not out["num_train_timesteps"]:
        raise ValueError("time_embedding_type='learned' needs num_train_timesteps (the size of "
                         "the embedding table)")
    if out["layers_per_block"] < 1:
        raise ValueError(f"layers_per_block must be >= 1, got {out['layers_per_block']}")
    if not 0 <= out["dropout"] < 1:
        raise ValueError(f"dropout must be in [0, 1), got {out['dropout']}")
    if out["num_class_embeds"] is not None and out["class_embed_type"] is not None:
        raise ValueError(f"num_class_embeds={out['num_class_embeds']} is only used with "
                         f"class_embed_type=None, got class_embed_type="
                         f"{out['class_embed_type']!r} (diffusers would ignore it)")
    return out


@dataclass
class UNet2DOutput:
    """The forward's result, as diffusers': `.sample`, shaped like the input sample."""
    sample: Tensor


class UNet2DModel(nn.Module):
    """Drop-in diffusers UNet2DModel: `UNet2DModel(**config)` takes diffusers' keyword arguments
    and defaults (see CONFIG_KEYS for the supported set).

    Forward: `model(sample, timestep, class_labels=None, return_dict=True)`; sample (B, C, H, W);
    timestep an int, a float, a 0-d tensor or a (B,) tensor (a Python float stays a float, where
    diffusers would truncate it to an integer). Returns UNet2DOutput(sample=...) or a 1-tuple.

    `channels_last` (attribute, not config): None (default) runs channels_last on CUDA only;
    True/False force it on every device.
    """

    def __init__(self, **config):
        super().__init__()
        cfg = check_config(config)
        self._config = FrozenConfig(cfg)
        self.channels_last: Optional[bool] = None
        ch = cfg["block_out_channels"]
        temb_dim = cfg["time_embedding_dim"] or ch[0] * 4
        eps, G = cfg["norm_eps"], cfg["norm_num_groups"]
        self.conv_in = nn.Conv2d(cfg["in_channels"], ch[0], 3, padding=1)
        kind = cfg["time_embedding_type"]
        if kind == "fourier":
            self.time_proj = GaussianFourierProjection(ch[0], scale=16)
            t_in = 2 * ch[0]
        elif kind == "positional":
            self.time_proj = Timesteps(ch[0], cfg["flip_sin_to_cos"], cfg["freq_shift"])
            t_in = ch[0]
        else:
            self.time_proj = nn.Embedding(cfg["num_train_timesteps"], ch[0])
            t_in = ch[0]
        self.time_embedding = TimestepEmbedding(t_in, temb_dim)
        if cfg["class_embed_type"] == "timestep":
            self.class_embedding = TimestepEmbedding(t_in, temb_dim)
        elif cfg["class_embed_type"] == "identity":
            self.class_embedding = nn.Identity()
        elif cfg["num_class_embeds"] is not None:
            self.class_embedding = nn.Embedding(cfg["num_class_embeds"], temb_dim)
        else:
            self.class_embedding = None

        resnet_kw = dict(groups=G, eps=eps, dropout=cfg["dropout"],
                         time_embedding_norm=cfg["resnet_time_scale_shift"])
        self.down_blocks = nn.ModuleList()
        out_c = ch[0]
        for i, name in enumerate(cfg["down_block_types"]):
            in_c, out_c = out_c, ch[i]
            last = i == len(ch) - 1
            attn = name.endswith("AttnDownBlock2D")
            # diffusers: only AttnDownBlock2D honours downsample_type; DownBlock2D is always conv
            down = None if last else (cfg["downsample_type"] if attn else "conv")
            block = AttnDownBlock2D if attn else DownBlock2D
            self.down_blocks.append(block(
                in_c, out_c, temb_dim, cfg["layers_per_block"], downsample_type=down,
                downsample_padding=cfg["downsample_padding"],
                attention_head_dim=cfg["attention_head_dim"] or out_c, **resnet_kw))
        self.mid_block = None if cfg["mid_block_type"] is None else UNetMidBlock2D(
            ch[-1], temb_dim, groups=G, attn_groups=cfg["attn_norm_num_groups"],
            add_attention=cfg["add_attention"],
            attention_head_dim=cfg["attention_head_dim"] or ch[-1], eps=eps,
            output_scale_factor=cfg["mid_block_scale_factor"],
            time_embedding_norm=cfg["resnet_time_scale_shift"], dropout=cfg["dropout"])
        self.up_blocks = nn.ModuleList()
        rev = list(reversed(ch))
        out_c = rev[0]
        for i, name in enumerate(cfg["up_block_types"]):
            prev_c, out_c = out_c, rev[i]
            in_c = rev[min(i + 1, len(ch) - 1)]
            last = i == len(ch) - 1
            attn = name.endswith("AttnUpBlock2D")
            up = None if last else (cfg["upsample_type"] if attn else "conv")
            block = AttnUpBlock2D if attn else UpBlock2D
            self.up_blocks.append(block(
                in_c, prev_c, out_c, temb_dim, cfg["layers_per_block"] + 1, upsample_type=up,
                attention_head_dim=cfg["attention_head_dim"] or out_c, **resnet_kw))
        self.conv_norm_out = GroupNormSiLU(G, ch[0], eps)  # conv_norm_out + conv_act, fused
        self.conv_out = nn.Conv2d(ch[0], cfg["out_channels"], 3, padding=1)

    # -- diffusers' ModelMixin surface ---------------------------------------------------------
    @property
    def config(self) -> FrozenConfig:
        return self._config

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def _timesteps(self, timestep, batch: int, device) -> Tensor:
        if isinstance(timestep, bool) or not isinstance(timestep, (int, float, Tensor)):
            raise TypeError(f"timestep must be an int, a float or a tensor, got "
                            f"{type(timestep).__name__}")
        if not isinstance(timestep, Tensor):  # a fill, not a host->device copy: capturable
            dt = torch.int64 if isinstance(timestep, int) else torch.float32
            return torch.full((batch,), timestep, dtype=dt, device=device)
        if timestep.dim() > 1 or (timestep.dim() == 1 and timestep.shape[0] not in (1, batch)):
            raise ValueError(f"timestep must be 0-d or of shape ({batch},) (one per sample), got "
                             f"shape {tuple(timestep.shape)}")
        return timestep.to(device, non_blocking=True).reshape(-1).expand(batch)

    def _use_channels_last(self, sample: Tensor) -> bool:
        return sample.is_cuda if self.channels_last is None else bool(self.channels_last)

    def forward(self, sample: Tensor, timestep, class_labels: Optional[Tensor] = None,
                return_dict: bool = True):
        cfg = self._config
        if not isinstance(sample, Tensor) or sample.dim() != 4 or \
                sample.shape[1] != cfg["in_channels"]:
            got = tuple(sample.shape) if isinstance(sample, Tensor) else type(sample).__name__
            raise ValueError(f"sample must be a (B, {cfg['in_channels']}, H, W) tensor, got {got}")
        B = sample.shape[0]
        t = self._timesteps(timestep, B, sample.device)
        emb = self.time_embedding(self.time_proj(t).to(self.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels must be given: this model is class-conditional "
                                 f"(class_embed_type={cfg['class_embed_type']!r}, "
                                 f"num_class_embeds={cfg['num_class_embeds']})")
            labels = class_labels.to(sample.device, non_blocking=True)
            if cfg["class_embed_type"] == "timestep":
                labels = self.time_proj(labels)
            emb = emb + self.class_embedding(labels).to(self.dtype)
        elif class_labels is not None:
            raise ValueError("class_labels were given but this model has no class embedding "
                             "(num_class_embeds / class_embed_type are not set)")

        cl = self._use_channels_last(sample)
        x = sample.contiguous(memory_format=torch.channels_last) if cl else sample
        if cfg["center_input_sample"]:
            x = 2 * x - 1.0
        h = self.conv_in(x)
        skips = (h,)
        for block in self.down_blocks:
            h, res = block(h, emb)
            skips += res
        if self.mid_block is not None:
            h = self.mid_block(h, emb)
        for block in self.up_blocks:
            n = len(block.resnets)
            h = block(h, skips[-n:], emb)
            skips = skips[:-n]
        h = self.conv_out(self.conv_norm_out(h))
        if cfg["time_embedding_type"] == "fourier":
            h = h / t.reshape(B, 1, 1, 1)
        if cl and not sample.is_contiguous(memory_format=torch.channels_last):
            h = h.contiguous()  # the caller's layout
        return UNet2DOutput(sample=h) if return_dict else (h,)

    # -- loading and saving --------------------------------------------------------------------
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module.load_state_dict, with every mismatch found before anything is copied when
        strict: missing and unexpected keys listed, shape mismatches with both shapes."""
        if strict:
            _check_state_dict(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @classmethod
    def from_pretrained(cls, path, subfolder: Optional[str] = None, torch_dtype=None,
                        device=None) -> "UNet2DModel":
        """A model from a local diffusers folder: config.json + diffusion_pytorch_model.safetensors
        (or .bin, read with torch.load(weights_only=True)); subfolder="unet" for a pipeline folder.
        torch_dtype: the floating dtype of the parameters (default float32); device: where they
        go (default CPU). Old attention names (query/key/value/proj_attn) are renamed as
        diffusers does. Any problem raises before a model exists (nothing half-loaded)."""
        _check_dtype(torch_dtype)
        folder = os.path.join(os.fspath(path), subfolder) if subfolder else os.fspath(path)
        cfg_path = os.path.join(folder, CONFIG)
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"no {CONFIG} in {folder!r}" + (
                "" if subfolder or not os.path.isdir(os.path.join(folder, "unet")) else
                " (it has a unet/ folder: pass subfolder='unet')"))
        try:
            with open(cfg_path) as f:
                config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{cfg_path} must hold a JSON object, got {type(config).__name__}")
        if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
            raise ValueError(f"{cfg_path} describes a {config['_class_name']}, not a UNet2DModel")
        state = _rename_old_attention(_read_weights(folder))
        return cls._build(config, state, torch_dtype, device)

    @classmethod
    def from_diffusers(cls, module: nn.Module) -> "UNet2DModel":
        """The same config and (copied) weights as a live diffusers UNet2DModel, on its device
        and in its dtype."""
        p = next(module.parameters())
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        return cls._build(dict(module.config), state, p.dtype, p.device)

    @classmethod
    def _build(cls, config: dict, state: dict, torch_dtype, device) -> "UNet2DModel":
        _check_dtype(torch_dtype)
        dtype = torch_dtype or torch.float32
        device = torch.device(device) if device is not None else torch.device("cpu")
        with torch.device("meta"):  # no random init: every parameter comes from `state`
            model = cls(**config)
        _check_state_dict(model, state)
        state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                 for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        model.time_proj.requires_grad_(not isinstance(model.time_proj,
                                                      GaussianFourierProjection))
        return model.eval()

    def save_pretrained(self, path) -> None:
        """Write config.json and diffusion_pytorch_model.safetensors (diffusers' names and
        format) into `path`, each atomically (temp file, then os.replace)."""
        from safetensors.torch import save_file
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        config = {"_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
                  **{k: list(v) if isinstance(v, tuple) else v for k, v in self._config.items()}}
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        _atomic_write(os.path.join(path, WEIGHTS),
                      lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))

        def write_config(tmp):
            with open(tmp, "w") as f:
                json.dump(config, f, indent=2, sort_keys=True)
                f.write("\n")
        _atomic_write(os.path.join(path, CONFIG), write_config)


def _check_dtype(torch_dtype) -> None:
    if torch_dtype is not None and (not isinstance(torch_dtype, torch.dtype)
                                    or not torch_dtype.is_floating_point):
        raise ValueError(f"torch_dtype must be a floating torch.dtype, got {torch_dtype!r}")


def _atomic_write(dest: str, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".tmp-")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_weights(folder: str) -> dict:
    st, binf = os.path.join(folder, WEIGHTS), os.path.join(folder, WEIGHTS_BIN)
    if os.path.isfile(st):
        from safetensors.torch import load_file
        try:
            return load_file(st, device="cpu")
        except Exception as e:  # noqa: BLE001 -- SafetensorError, OSError, ...: all unreadable
            raise ValueError(f"{st} is not a readable safetensors file (corrupt or truncated?): "
                             f"{e}") from None
    if os.path.isfile(binf):
        try:
            state = torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{binf} could not be read with torch.load(weights_only=True): "
                             f"{e}") from None
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError(f"{binf} does not hold a state dict of tensors")
        return state
    raise FileNotFoundError(f"no weights in {folder!r}: expected {WEIGHTS} (or {WEIGHTS_BIN})")


_OLD_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename_old_attention(state: dict) -> dict:
    """Checkpoints from before diffusers' Attention rewrite: attentions.N.query/key/value/
    proj_attn -> to_q/to_k/to_v/to_out.0 (diffusers renames the same keys on load)."""
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if len(parts) >= 4 and parts[-3].isdigit() and parts[-4] == "attentions" and \
                parts[-2] in _OLD_ATTN:
            k = ".".join(parts[:-2] + [_OLD_ATTN[parts[-2]], parts[-1]])
        out[k] = v
    return out


def _check_state_dict(model: nn.Module, state) -> None:
    if not isinstance(state, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state).__name__}")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
              for k in own if k in state and isinstance(state[k], Tensor)
              and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes)}")
    if problems:
        raise ValueError("the checkpoint does not match this UNet2DModel config:\n  "
                         + "\n  ".join(problems))


__all__ = ["UNet2DModel", "UNet2DOutput", "FrozenConfig", "check_config"]
