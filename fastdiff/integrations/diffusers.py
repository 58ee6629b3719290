"""`fastdiff.optimize(model_or_pipeline)`: a diffusers model made fast in place.

Kept: the user's objects, module tree, parameters, state_dict keys, hooks and adapters. Swapped:

* `ResnetBlock2D` → `FusedResnetBlock2D` (a subclass; the instance's class is set, nothing is
  rebuilt): norm1→SiLU and (x + temb)→norm2→SiLU (scale_shift: norm2·(1+scale)+shift→SiLU)
  are one `group_norm_silu` call each.
* A GroupNorm that the forward of a known diffusers class directly follows with a SiLU
  (`conv_norm_out`/`conv_act` of the U-Nets and of the VAE encoder/decoder, `skip_norm`/`act`
  of the skip up-blocks): the GroupNorm becomes `FusedGroupNormSiLU`, the SiLU a `FoldedSiLU`
  that passes its input through. Every other plain nn.GroupNorm (e.g. Transformer2DModel.norm)
  becomes `FastdiffGroupNorm`: `group_norm_silu` without the activation.
* diffusers `Attention` with its default processor (`AttnProcessor2_0` / `AttnProcessor`) gets
  a `FastdiffAttnProcessor` through `Attention.set_processor`: the same projection modules are
  called (LoRA/peft layers on to_q/to_k/to_v/to_out keep working), the attention itself runs
  in `fastdiff.attention` (PyTorch's SDPA called directly where the backend picked is `torch`,
  as on CPU), the processor's GroupNorm in `group_norm_silu`. Head dims outside
  the kernel's 32..256 keep diffusers' processor (SDPA). An `Attention` (not a subclass) that
  gets it also becomes `FastdiffAttention`, whose forward skips diffusers' per-call
  `inspect.signature` of the processor when no cross_attention_kwargs are given.
* On CUDA: 4-D parameters (conv weights) to channels_last, so cuDNN keeps the activations
  channels_last, the layout the fused ops read without copies.

Everything else is left as it is; the report (`model.fastdiff_report`, also logged at INFO on
the `fastdiff.integrations.diffusers` logger) lists what was replaced, and what was left and
why. `restore(model)` sets every class, processor and parameter memory format back;
`optimize` twice changes nothing.

diffusers is imported here only, when first needed; `import fastdiff` does not import it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import types

import torch
import torch.nn.functional as F
from torch import nn

from .. import backends
from ..ops.attention import HEAD_DIM_MAX, HEAD_DIM_MIN, attention
from ..ops.attention import IMPLEMENTED as ATTENTION_BACKENDS
from ..ops.attention import _attention_torch as attention_torch
from ..ops.group_norm_silu import group_norm_silu

logger = logging.getLogger(__name__)

# the scale/shift modulation of group_norm_silu (diffusers' resnet_time_scale_shift="scale_shift")
_HAS_MODULATION = {"scale", "shift"} <= set(inspect.signature(group_norm_silu).parameters)

REPORT_ATTR = "fastdiff_report"
_BACKEND_ATTR = "_fastdiff_backend"
_CHANNELS_LAST_ATTR = "_fastdiff_channels_last"  # names of the parameters optimize converted


_NO_CONTEXT = contextlib.nullcontext()  # reentrant: one for every call


def _forced(backend: str):
    """use_backend(backend) in eager mode. Under torch.compile nothing is entered (no graph
    break): the op picks its backend when the compiled graph runs, so a `fastdiff.use_backend`
    around the compiled call forces one there."""
    if backend == "auto" or torch.compiler.is_compiling():
        return _NO_CONTEXT
    return backends.use_backend(backend)


def _gn(norm: nn.GroupNorm, x, backend: str, activation="silu", **modulation):
    if backend == "auto":  # (no context to enter: this runs ~60 times a U-Net forward)
        return group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps,
                               activation=activation, **modulation)
    with _forced(backend):
        return group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps,
                               activation=activation, **modulation)


class FusedGroupNormSiLU(nn.GroupNorm):
    """An nn.GroupNorm that also applies the SiLU its parent's forward calls right after it
    (that SiLU module is a FoldedSiLU meanwhile)."""

    def forward(self, x):
        if not 3 <= x.dim() <= 5:  # (N, C) is a GroupNorm input the op does not take
            return F.silu(super().forward(x))
        return _gn(self, x, getattr(self, _BACKEND_ATTR, "auto"))


class FastdiffGroupNorm(nn.GroupNorm):
    """An nn.GroupNorm computed by group_norm_silu(activation=None): one pass, both layouts
    without copies (a GroupNorm that no SiLU follows, e.g. Transformer2DModel.norm)."""

    def forward(self, x):
        if not 3 <= x.dim() <= 5:
            return super().forward(x)
        return _gn(self, x, getattr(self, _BACKEND_ATTR, "auto"), activation=None)


class FoldedSiLU(nn.SiLU):
    """An nn.SiLU already applied by the FusedGroupNormSiLU before it: the identity."""

    def forward(self, x):
        return x


class FastdiffAttnProcessor:
    """diffusers attention processor: AttnProcessor2_0's computation (AttnProcessor's, when
    that was the processor: its attn.scale and no q/k norms), with softmax(q kᵀ) v in
    fastdiff.attention and the optional GroupNorm in group_norm_silu. The projections are the
    Attention's own modules. An attention mask, or the deprecated positional/`scale`
    arguments, go to the processor it replaced (`original`), which restore puts back."""

    def __init__(self, original, scale=None, qk_norm=True, backend="auto"):
        self.original = original
        self.scale = scale  # None: 1/sqrt(head dim), as SDPA's default
        self.qk_norm = qk_norm
        self.backend = backend

    def _sdpa(self, x) -> bool:
        """Whether the attention backend picked for x's device and dtype is `torch` (SDPA)."""
        if torch.compiler.is_compiling():  # traced: the op picks when the graph runs
            return False
        with _forced(self.backend):
            return backends.pick("attention", ATTENTION_BACKENDS, x.device, x.dtype) == "torch"

    def _delegate(self, hidden_states) -> bool:
        """CPU tensors whose attention backend is `torch`: PyTorch's SDPA, which
        AttnProcessor2_0 calls itself, so its own code is the faster path there (replacing it
        made a scaled-down SD-1.5 U-Net forward 5-10% slower on 2 cores: per-call Python
        overhead; benchmarks/results/amd-epyc_2026-12-02_cpu-profile.md)."""
        return self.qk_norm and hidden_states.device.type == "cpu" and self._sdpa(hidden_states)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        if attention_mask is not None or args or kwargs.get("scale") is not None or \
                self._delegate(hidden_states):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image = hidden_states.ndim == 4
        if image:
            B, C, H, W = hidden_states.shape
            hidden_states = hidden_states.view(B, C, H * W).transpose(1, 2)
        batch = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[0]
        gn = attn.group_norm
        if gn is not None:  # over the channels of (B, L, C): a channels-innermost (B, C, L) view
            h = hidden_states.transpose(1, 2)
            h = _gn(gn, h, self.backend, activation=None) if type(gn) is nn.GroupNorm else gn(h)
            hidden_states = h.transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        heads = attn.heads
        dh = key.shape[-1] // heads
        q, k, v = (t.view(batch, -1, heads, dh).transpose(1, 2) for t in (query, key, value))
        if self.qk_norm:
            if attn.norm_q is not None:
                q = attn.norm_q(q)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
        # where the backend picked is `torch` (fp32 on CUDA; CPU after AttnProcessor) the op
        # would run PyTorch's SDPA: call it here and skip the op's wrapper (~15 µs a call)
        if self._sdpa(q):
            o = attention_torch(q, k, v, q.shape[-1] ** -0.5 if self.scale is None
                                else self.scale)
        else:
            with _forced(self.backend):
                o = attention(q, k, v, self.scale)
        # o is a (B, H, L, D) view of a (B, L, H, D) buffer: this reshape copies nothing
        o = o.transpose(1, 2).reshape(batch, -1, heads * dh).to(query.dtype)
        o = attn.to_out[1](attn.to_out[0](o))
        if image:
            o = o.transpose(-1, -2).reshape(B, C, H, W)
        if attn.residual_connection:
            o = o + residual
        return o / attn.rescale_output_factor


def _resnet_forward(self, input_tensor, temb, *args, **kwargs):
    """ResnetBlock2D.forward with its two norm→SiLU pairs fused (the temb add, or scale/shift,
    inside the second). Calls diffusers' own forward for what that covers differently: the
    deprecated extra arguments, and a temb that does not fit the block (a missing one where a
    projection exists raises there as it would have)."""
    proj = self.time_emb_proj
    scale_shift = self.time_embedding_norm == "scale_shift"
    if args or kwargs.get("scale") is not None or (proj is None) != (temb is None) or (
            scale_shift and temb is None):
        return super(type(self), self).forward(input_tensor, temb, *args, **kwargs)
    backend = getattr(self, _BACKEND_ATTR, "auto")
    h = _gn(self.norm1, input_tensor, backend)
    if self.upsample is not None:
        if h.shape[0] >= 64:  # as diffusers: upsample_nearest_nhwc fails on large batches
            input_tensor, h = input_tensor.contiguous(), h.contiguous()
        input_tensor, h = self.upsample(input_tensor), self.upsample(h)
    elif self.downsample is not None:
        input_tensor, h = self.downsample(input_tensor), self.downsample(h)
    h = self.conv1(h)
    modulation = {}
    if proj is not None:
        t = proj(temb if self.skip_time_act else self.nonlinearity(temb))
        if scale_shift:
            scale, shift = t.chunk(2, dim=1)
            modulation = dict(scale=scale, shift=shift)
        else:
            modulation = dict(add=t)
    h = _gn(self.norm2, h, backend, **modulation)
    h = self.conv2(self.dropout(h))
    if self.conv_shortcut is not None:
        if self.training:  # as diffusers: DDP's gradient strides
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)
    return (input_tensor + h) / self.output_scale_factor


def _attention_forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None,
                       **cross_attention_kwargs):
    """Attention.forward without its per-call inspect.signature of the processor (~15 µs on
    CPU, twice per transformer block) when there are no cross_attention_kwargs for it to
    filter: then diffusers' forward is exactly this call."""
    if cross_attention_kwargs:
        return super(type(self), self).forward(hidden_states, encoder_hidden_states,
                                               attention_mask, **cross_attention_kwargs)
    return self.processor(self, hidden_states, encoder_hidden_states=encoder_hidden_states,
                          attention_mask=attention_mask)


@functools.lru_cache(maxsize=None)
def _diffusers() -> types.SimpleNamespace:
    """The diffusers classes this module knows, imported on first use, and the fused subclass
    of ResnetBlock2D (a module-level name, so a pickled model finds it)."""
    try:
        import diffusers  # noqa: F401
    except ImportError as e:
        raise ImportError("fastdiff.optimize needs diffusers (pip install diffusers)") from e
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
    from diffusers.models.autoencoders.vae import Decoder, Encoder
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.unets.unet_2d import UNet2DModel
    from diffusers.models.unets.unet_2d_blocks import AttnSkipUpBlock2D, SkipUpBlock2D
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    fused = type("FusedResnetBlock2D", (ResnetBlock2D,), dict(
        forward=_resnet_forward, __module__=__name__, __qualname__="FusedResnetBlock2D",
        __doc__="diffusers ResnetBlock2D with its GroupNorm→SiLU pairs in group_norm_silu "
                "(set by fastdiff.optimize; fastdiff.restore sets ResnetBlock2D back)."))
    globals()["FusedResnetBlock2D"] = fused
    attention = type("FastdiffAttention", (Attention,), dict(
        forward=_attention_forward, __module__=__name__, __qualname__="FastdiffAttention",
        __doc__="diffusers Attention whose forward skips the processor-signature filter when "
                "there is nothing to filter (set by fastdiff.optimize with its processor; "
                "fastdiff.restore sets Attention back)."))
    globals()["FastdiffAttention"] = attention
    # classes whose forward calls `norm` and then, directly, `act` on its output
    pairs = {UNet2DModel: ("conv_norm_out", "conv_act"),
             UNet2DConditionModel: ("conv_norm_out", "conv_act"),
             Encoder: ("conv_norm_out", "conv_act"), Decoder: ("conv_norm_out", "conv_act"),
             SkipUpBlock2D: ("skip_norm", "act"), AttnSkipUpBlock2D: ("skip_norm", "act")}
    return types.SimpleNamespace(
        Attention=Attention, AttnProcessor=AttnProcessor, AttnProcessor2_0=AttnProcessor2_0,
        ResnetBlock2D=ResnetBlock2D, FusedResnetBlock2D=fused, FastdiffAttention=attention,
        pairs=pairs)


def __getattr__(name):  # FusedResnetBlock2D, FastdiffAttention exist once diffusers is imported
    if name in ("FusedResnetBlock2D", "FastdiffAttention"):
        return getattr(_diffusers(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- the report -------------------------------------------------------------------------------
@dataclasses.dataclass
class OptimizeReport:
    """What optimize replaced and what it left, by module path.

    replaced: (path, kind, detail) with kind "ResnetBlock2D", "GroupNorm+SiLU", "GroupNorm"
        (a GroupNorm no SiLU follows, computed by group_norm_silu without the activation) or
        "Attention";
    left: (path, reason) for every ResnetBlock/GroupNorm/attention-like module left as it was;
    changed: modules this call changed (0 when the model was optimized already);
    channels_last: parameters converted to channels_last by optimize (CUDA only)."""
    backend: str = "auto"
    replaced: list = dataclasses.field(default_factory=list)
    left: list = dataclasses.field(default_factory=list)
    changed: int = 0
    channels_last: int = 0
    notes: list = dataclasses.field(default_factory=list)

    def counts(self) -> dict:
        out = {}
        for _, kind, _ in self.replaced:
            out[kind] = out.get(kind, 0) + 1
        return out

    def __str__(self) -> str:
        c = self.counts()
        lines = [f"fastdiff.optimize (backend={self.backend}): replaced "
                 + (", ".join(f"{n} {k}" for k, n in c.items()) or "nothing")
                 + f"; {self.changed} changed by this call; {len(self.left)} left as they were"
                 + f"; {self.channels_last} parameters to channels_last"]
        lines += [f"  replaced {p or '(top)'}: {k} ({d})" for p, k, d in self.replaced]
        lines += [f"  left     {p or '(top)'}: {why}" for p, why in self.left]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# -- optimize / restore -----------------------------------------------------------------------
def _parts(obj, what: str):
    """[(path prefix, nn.Module)] of a model, or of a pipeline's unet and vae."""
    if isinstance(obj, nn.Module):
        return [("", obj)], []
    comps = getattr(obj, "components", None)
    if isinstance(comps, dict):
        parts = [(f"{n}.", obj_) for n in ("unet", "vae")
                 if isinstance(obj_ := getattr(obj, n, None), nn.Module)]
        others = [f"{n}: a pipeline component other than unet/vae" for n, c in comps.items()
                  if n not in ("unet", "vae") and isinstance(c, nn.Module)]
        if parts:
            return parts, others
    raise TypeError(f"{what} expects a diffusers model (UNet2DModel, UNet2DConditionModel, "
                    f"AutoencoderKL, any nn.Module built from diffusers blocks) or a pipeline "
                    f"with a unet or vae, got {type(obj).__name__}")


def _check_backend(backend):
    if not isinstance(backend, str) or backend not in backends.BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {backends.BACKENDS + ('auto',)}, "
                         f"got {backend!r}")
    if backend != "auto":
        with backends.use_backend(backend):  # raises here if it is not available on this machine
            pass


def _resnet_gap(m, d) -> str | None:
    """Why a ResnetBlock2D cannot be fused, or None."""
    for name in ("norm1", "norm2"):
        if type(getattr(m, name)) is not nn.GroupNorm:
            return f"{name} is a {type(getattr(m, name)).__name__}, not an nn.GroupNorm"
    if type(m.nonlinearity) is not nn.SiLU:
        return f"non_linearity is {type(m.nonlinearity).__name__}; group_norm_silu fuses SiLU only"
    if m.time_emb_proj is None:  # no temb: any time_embedding_norm is a plain norm2
        return None
    if m.time_embedding_norm == "scale_shift" and not _HAS_MODULATION:
        return "time_embedding_norm='scale_shift': this group_norm_silu has no scale/shift"
    if m.time_embedding_norm not in ("default", "scale_shift"):
        return f"time_embedding_norm={m.time_embedding_norm!r}"
    return None


def _attention_gap(m, d) -> str | None:
    """Why a diffusers Attention keeps its processor, or None."""
    p = m.processor
    if type(p) not in (d.AttnProcessor2_0, d.AttnProcessor):
        return f"processor {type(p).__name__} (fastdiff replaces AttnProcessor2_0/AttnProcessor)"
    if type(m).forward is not d.Attention.forward:
        return f"{type(m).__name__} overrides Attention.forward"
    if m.added_kv_proj_dim is not None or m.to_k is None or m.to_v is None or m.to_out is None:
        return "added key/value projections or no to_k/to_v/to_out"
    if m.inner_dim != m.inner_kv_dim or m.inner_dim % m.heads:
        return f"inner dims q {m.inner_dim}, kv {m.inner_kv_dim} over {m.heads} heads"
    dh = m.inner_dim // m.heads
    if not HEAD_DIM_MIN <= dh <= HEAD_DIM_MAX:
        return (f"head dim {dh} outside the kernel's {HEAD_DIM_MIN}..{HEAD_DIM_MAX}: "
                f"diffusers' {type(p).__name__} (SDPA) kept")
    return None


def _n_uses(model: nn.Module, sub: nn.Module) -> int:
    return sum(1 for _, x in model.named_modules(remove_duplicate=False) if x is sub)


def _optimize_part(model: nn.Module, prefix: str, backend: str, d, report: OptimizeReport):
    fused_norms = set()  # ids of GroupNorms now computed by group_norm_silu
    listed = set()  # ids of GroupNorms inside a module already reported as left
    mods = list(model.named_modules())
    for name, m in mods:
        path = prefix + name
        if isinstance(m, d.ResnetBlock2D):
            if type(m) is d.FusedResnetBlock2D:
                gap = None
            elif type(m) is d.ResnetBlock2D:
                gap = _resnet_gap(m, d)
            else:
                gap = f"{type(m).__name__} subclasses ResnetBlock2D with its own forward"
            if gap is None:
                if type(m) is not d.FusedResnetBlock2D:
                    m.__class__ = d.FusedResnetBlock2D
                    report.changed += 1
                setattr(m, _BACKEND_ATTR, backend)
                mode = "no temb" if m.time_emb_proj is None else (
                    "scale/shift" if m.time_embedding_norm == "scale_shift" else "+temb add")
                report.replaced.append((path, "ResnetBlock2D",
                                        f"norm1+SiLU, norm2({mode})+SiLU"))
                fused_norms.update((id(m.norm1), id(m.norm2)))
            else:
                report.left.append((path, f"ResnetBlock2D left: {gap}"))
                listed.update(id(x) for x in m.modules())
        elif type(m) in d.pairs:
            nname, aname = d.pairs[type(m)]
            norm, act = getattr(m, nname, None), getattr(m, aname, None)
            done = type(norm) is FusedGroupNormSiLU and type(act) is FoldedSiLU
            if done or (type(norm) is nn.GroupNorm and type(act) is nn.SiLU
                        and _n_uses(model, act) == 1):
                if not done:
                    norm.__class__, act.__class__ = FusedGroupNormSiLU, FoldedSiLU
                    report.changed += 1
                setattr(norm, _BACKEND_ATTR, backend)
                report.replaced.append((f"{path}.{nname}" if path else nname, "GroupNorm+SiLU",
                                        f"{nname} + {aname}"))
                fused_norms.add(id(norm))
            elif norm is not None:
                report.left.append((path, f"{nname}/{aname} are {type(norm).__name__}/"
                                          f"{type(act).__name__} (fused: GroupNorm/SiLU only)"))
        if isinstance(m, d.Attention):
            if isinstance(m.processor, FastdiffAttnProcessor):
                gap = None
            else:
                gap = _attention_gap(m, d)
            if gap is None:
                if not isinstance(m.processor, FastdiffAttnProcessor):
                    orig = m.processor
                    is_v1 = type(orig) is d.AttnProcessor
                    m.set_processor(FastdiffAttnProcessor(orig, scale=m.scale if is_v1 else None,
                                                          qk_norm=not is_v1))
                    report.changed += 1
                m.processor.backend = backend
                if type(m) is d.Attention:  # (a subclass keeps its own forward)
                    m.__class__ = d.FastdiffAttention
                kind = "cross" if m.is_cross_attention else "self"
                report.replaced.append((path, "Attention",
                                        f"{kind}-attention, {m.heads} heads of "
                                        f"{m.inner_dim // m.heads}"
                                        + (", GroupNorm" if m.group_norm is not None else "")))
                if type(m.group_norm) is nn.GroupNorm:
                    fused_norms.add(id(m.group_norm))
            else:
                report.left.append((path, f"Attention left: {gap}"))
                listed.update(id(x) for x in m.modules())
        elif m is not model and not isinstance(m, d.ResnetBlock2D) and (
                type(m).__name__.endswith(("Attention", "ResnetBlockCondNorm2D"))
                or hasattr(m, "set_processor")):
            report.left.append((path, f"{type(m).__name__}: not a module fastdiff replaces"))
            listed.update(id(x) for x in m.modules())
    for name, m in mods:  # the GroupNorms left: plain GroupNorm through group_norm_silu
        if not isinstance(m, nn.GroupNorm) or id(m) in fused_norms | listed:
            continue
        if type(m) in (nn.GroupNorm, FastdiffGroupNorm):
            if type(m) is nn.GroupNorm:
                m.__class__ = FastdiffGroupNorm
                report.changed += 1
            setattr(m, _BACKEND_ATTR, backend)
            report.replaced.append((prefix + name, "GroupNorm", "no SiLU after it: "
                                                                "group_norm_silu(activation=None)"))
        else:
            report.left.append((prefix + name, f"{type(m).__name__}: a GroupNorm subclass"))
    converted = _to_channels_last(model)
    report.channels_last += converted
    if not any(p.is_cuda for p in model.parameters()):
        report.notes.append(f"{prefix or 'model'}: channels_last left off (not on CUDA)")


def _to_channels_last(model: nn.Module) -> int:
    """CUDA conv weights to channels_last (cuDNN then returns channels_last activations);
    remembers which, for restore. Parameter objects stay the same (optimizers keep them)."""
    done = getattr(model, _CHANNELS_LAST_ATTR, [])
    n = 0
    for name, p in model.named_parameters():
        if p.is_cuda and p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last):
            with torch.no_grad():
                p.data = p.data.contiguous(memory_format=torch.channels_last)
            done.append(name)
            n += 1
    if done:
        model.__dict__[_CHANNELS_LAST_ATTR] = done
    return n


def optimize(model, *, backend: str = "auto", enable: bool = True):
    """Accelerate a diffusers model or pipeline in place with fastdiff's fused ops.

    Args:
        model: a diffusers UNet2DModel, UNet2DConditionModel, AutoencoderKL (encoder and
            decoder), any nn.Module built from diffusers blocks, or a pipeline (its `unet` and
            `vae` are optimized).
        backend: "auto" or a fastdiff backend ("torch", "triton", "cuda", "cpu") the fused ops
            use in eager calls (an op without that backend uses auto). Under torch.compile
            the backend is the one in effect when the compiled graph runs (use_backend).
        enable: False undoes a previous optimize (the same as restore).

    Returns the same object, with `fastdiff_report` (an OptimizeReport: what was replaced and
    what left) set on it; the report is also logged at INFO. Idempotent. What it swaps is
    listed in this module's docstring; modules it does not know are left alone.
    """
    if not enable:
        return restore(model)
    _check_backend(backend)
    parts, others = _parts(model, "fastdiff.optimize")
    d = _diffusers()
    report = OptimizeReport(backend=backend)
    report.left += [(o.split(":")[0], o.split(": ", 1)[1]) for o in others]
    for prefix, part in parts:
        _optimize_part(part, prefix, backend, d, report)
    setattr(model, REPORT_ATTR, report)
    logger.info("%s", report)
    return model


def restore(model):
    """Undo optimize in place: every swapped class, attention processor and parameter memory
    format back as it was. A model that was not optimized is returned unchanged."""
    parts, _ = _parts(model, "fastdiff.restore")
    d = _diffusers()
    for _, part in parts:
        for m in part.modules():
            if type(m) in (d.FusedResnetBlock2D, d.FastdiffAttention, FusedGroupNormSiLU,
                           FastdiffGroupNorm, FoldedSiLU):
                m.__class__ = type(m).__bases__[0]
                m.__dict__.pop(_BACKEND_ATTR, None)
            if isinstance(m, d.Attention) and isinstance(m.processor, FastdiffAttnProcessor):
                m.set_processor(m.processor.original)
        params = dict(part.named_parameters())
        for name in part.__dict__.pop(_CHANNELS_LAST_ATTR, []):
            if name in params:
                with torch.no_grad():
                    params[name].data = params[name].data.contiguous()
    if REPORT_ATTR in vars(model):
        delattr(model, REPORT_ATTR)
    return model
