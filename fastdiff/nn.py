"""Modules built on the fused ops (GroupNormSiLU, AttentionBlock, ...)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops.attention import HEAD_DIM_MAX, HEAD_DIM_MIN, attention
from .ops.group_norm_silu import group_norm_silu


class AttentionBlock(nn.Module):
    """U-Net self-attention block: y = (x + to_out(attention(qkv(GroupNorm(x))))) / rescale.

    Weight-compatible with diffusers' `Attention` as UNet2DModel builds it
    (`_from_deprecated_attn_block=True, residual_connection=True, bias=True`): the state-dict keys
    are group_norm.{weight,bias}, to_q/to_k/to_v.{weight,bias}, to_out.0.{weight,bias}, so
    `block.load_state_dict(diffusers_attention.state_dict())` works (or use `from_diffusers`).

    Args (as diffusers names them):
        channels: C of the (B, C, H, W) input (diffusers' query_dim).
        heads, dim_head: number and size of the heads (inner dim = heads · dim_head). Give either
            (the other is C // it) or both; neither means one head of C channels.
        attention_head_dim: alias of dim_head (UNet2DModel's name).
        norm_num_groups: GroupNorm groups; None means no norm.
        eps: GroupNorm eps.
        rescale_output_factor: the output is divided by it.
        residual_connection: add x to the projection output.
        bias: biases on to_q/to_k/to_v; out_bias: bias on to_out.0.

    Storage: to_q, to_k and to_v are plain nn.Linear modules, as in diffusers; the forward
    concatenates their weights (one small copy, 3·inner·C elements) and runs one GEMM for all
    three. Nothing is cached or packed at load: a cache goes stale when an EMA writes through
    `p.data`, and a packed parameter would make state_dict() either copy (an EMA that copies
    through state_dict() would then update nothing) or alias one storage (which safetensors
    refuses to save); plain modules keep every PyTorch weight workflow exact.

    Forward: the attention kernel reads q/k/v as strided views of the packed GEMM's output and
    writes (B, L, heads, dim_head), which the output projection reads without a transpose; the
    residual is added to the projection's output in place (a GEMM can take the bias epilogue or
    the residual as its C operand through torch, not both). channels_last input is the fast
    path (no layout copies, channels_last output); a contiguous NCHW input is converted on the
    way in and the output is returned contiguous NCHW. Head dims outside the attention kernel's
    range [32, 256] (e.g. UNet2DModel's default attention_head_dim=8) use
    torch.nn.functional.scaled_dot_product_attention on the same views. Under autocast the
    output takes the residual's dtype, as diffusers' does.
    """

    def __init__(self, channels: int, heads: Optional[int] = None, dim_head: Optional[int] = None,
                 norm_num_groups: Optional[int] = 32, eps: float = 1e-5,
                 rescale_output_factor: float = 1.0, residual_connection: bool = True,
                 bias: bool = True, out_bias: bool = True, *,
                 attention_head_dim: Optional[int] = None, scale: Optional[float] = None,
                 device=None, dtype=None):
        super().__init__()
        if None not in (dim_head, attention_head_dim) and dim_head != attention_head_dim:
            raise ValueError(f"dim_head={dim_head} and attention_head_dim={attention_head_dim} "
                             "disagree (they are the same setting)")
        dim_head = dim_head if dim_head is not None else attention_head_dim
        if heads is None and dim_head is None:
            heads, dim_head = 1, channels
        elif heads is None or dim_head is None:
            given, name = (dim_head, "dim_head") if heads is None else (heads, "heads")
            if given <= 0 or channels % given != 0:
                raise ValueError(f"{name}={given} must divide channels={channels} when only "
                                 f"{name} is given")
            heads, dim_head = (channels // given, given) if heads is None else (given,
                                                                                channels // given)
        if heads <= 0 or dim_head <= 0:
            raise ValueError(f"heads and dim_head must be positive, got {heads} and {dim_head}")
        if rescale_output_factor == 0:
            raise ValueError("rescale_output_factor must be non-zero (the output is divided by it)")
        if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
            raise ValueError(f"scale must be a positive number or None, got {scale!r}")
        kw = {"device": device, "dtype": dtype}
        self.channels, self.heads, self.dim_head = channels, heads, dim_head
        self.inner_dim = heads * dim_head
        self.scale = dim_head ** -0.5 if scale is None else float(scale)
        self.rescale_output_factor = float(rescale_output_factor)
        self.residual_connection = bool(residual_connection)
        self.group_norm = (None if norm_num_groups is None else
                           nn.GroupNorm(norm_num_groups, channels, eps=eps, affine=True, **kw))
        self.to_q = nn.Linear(channels, self.inner_dim, bias=bias, **kw)
        self.to_k = nn.Linear(channels, self.inner_dim, bias=bias, **kw)
        self.to_v = nn.Linear(channels, self.inner_dim, bias=bias, **kw)
        self.to_out = nn.ModuleList([nn.Linear(self.inner_dim, channels, bias=out_bias, **kw)])

    @classmethod
    def from_diffusers(cls, attn: nn.Module) -> "AttentionBlock":
        """An AttentionBlock with the configuration and weights of a diffusers `Attention`
        (self-attention over (B, C, H, W) maps, as in UNet2DModel)."""
        gn = attn.group_norm
        p = attn.to_q.weight
        block = cls(attn.query_dim, heads=attn.heads, dim_head=attn.inner_dim // attn.heads,
                    norm_num_groups=None if gn is None else gn.num_groups,
                    eps=1e-5 if gn is None else gn.eps,
                    rescale_output_factor=attn.rescale_output_factor,
                    residual_connection=attn.residual_connection,
                    bias=attn.to_q.bias is not None, out_bias=attn.to_out[0].bias is not None,
                    scale=attn.scale, device=p.device, dtype=p.dtype)
        block.load_state_dict(attn.state_dict(), strict=True)
        return block

    def qkv_params(self) -> tuple[Tensor, Optional[Tensor]]:
        """The (3·inner, C) weight and (3·inner,) bias of the one q/k/v GEMM, concatenated from
        to_q/to_k/to_v now (inside autograd when they need grad)."""
        w = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])
        if self.to_q.bias is None:
            return w, None
        return w, torch.cat([self.to_q.bias, self.to_k.bias, self.to_v.bias])

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must be (B, {self.channels}, H, W), got shape {tuple(x.shape)}")
        B, C, Hs, Ws = x.shape
        L = Hs * Ws
        nchw = not x.is_contiguous(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last) if nchw else x
        if self.group_norm is None:
            h = xc
        else:
            gn = self.group_norm
            h = group_norm_silu(xc, gn.weight, gn.bias, gn.num_groups, gn.eps, activation=None)
        # channels_last (B, C, H, W) is (B, H, W, C) in memory: a (B·L, C) matrix, no copy
        h = h.permute(0, 2, 3, 1).reshape(B * L, C)
        qkv = F.linear(h, *self.qkv_params()).view(B, L, 3, self.heads, self.dim_head)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, heads, L, dh) strided views
        if HEAD_DIM_MIN <= self.dim_head <= HEAD_DIM_MAX:
            o = attention(q, k, v, self.scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        o = o.transpose(1, 2).reshape(B * L, self.inner_dim)  # a view for attention()'s layout
        out_proj = self.to_out[0]
        y = F.linear(o, out_proj.weight, out_proj.bias)
        if self.residual_connection:
            res = xc.permute(0, 2, 3, 1).reshape(B * L, C)
            # autocast gives y in half precision: promote to the residual's dtype, as diffusers
            y = y.add_(res) if y.dtype == res.dtype else y + res
        if self.rescale_output_factor != 1.0:
            y = y.div_(self.rescale_output_factor)
        y = y.view(B, Hs, Ws, C).permute(0, 3, 1, 2)  # channels_last (B, C, H, W)
        return y.contiguous() if nchw else y

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, heads={self.heads}, dim_head={self.dim_head}, "
                f"rescale_output_factor={self.rescale_output_factor}, "
                f"residual_connection={self.residual_connection}")


class GroupNormSiLU(nn.Module):
    """act(GroupNorm(x + add) * (1 + scale) + shift) as one fused op
    (fastdiff.ops.group_norm_silu).

    Same parameters and state-dict keys as `torch.nn.GroupNorm` (weight, bias when affine), so
    `m.load_state_dict(group_norm.state_dict())` works. `activation="silu"` (default) or None
    (plain GroupNorm). `forward(x, add=None, scale=None, shift=None)`: optional (B, C)
    per-channel tensors: add (the time embedding) before the norm, scale and shift (the
    "scale_shift" time embedding) after its affine.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 activation: Optional[str] = "silu", device=None, dtype=None):
        super().__init__()
        if num_groups <= 0 or num_channels % num_groups != 0:
            raise ValueError(f"num_groups={num_groups} must be positive and divide "
                             f"num_channels={num_channels}")
        if activation not in ("silu", None):
            raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
        self.num_groups, self.num_channels = num_groups, num_channels
        self.eps, self.affine, self.activation = eps, affine, activation
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: Tensor, add: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                shift: Optional[Tensor] = None) -> Tensor:
        return group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps, add=add,
                               scale=scale, shift=shift, activation=self.activation)

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"activation={self.activation!r}")


# -- U-Net blocks: diffusers' module tree and parameter names (UNet2DModel's subset) ------------
# Every GroupNorm -> SiLU pair is one group_norm_silu call (the time embedding fused into it);
# convolutions and linears are PyTorch's. Each forward keeps its input's memory format, so a
# channels_last input stays channels_last through the whole U-Net.

ACT_FNS = ("silu", "swish")  # diffusers' get_activation: the same function under two names


class Timesteps(nn.Module):
    """Sinusoidal timestep embedding (diffusers' get_timestep_embedding): frequencies
    exp(-ln(max_period) · i / (half - downscale_freq_shift)), [sin, cos] (or [cos, sin] with
    flip_sin_to_cos), zero-padded to an odd num_channels. (B,) timesteps -> (B, num_channels)
    float32. No parameters; the frequencies are computed per call (a few hundred floats) so they
    stay float32 whatever dtype the model is cast to."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float,
                 scale: float = 1.0, max_period: int = 10000):
        super().__init__()
        self.num_channels, self.flip_sin_to_cos = num_channels, flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale, self.max_period = scale, max_period

    def forward(self, t: Tensor) -> Tensor:
        half = self.num_channels // 2
        exponent = -math.log(self.max_period) * torch.arange(half, dtype=torch.float32,
                                                              device=t.device)
        freqs = torch.exp(exponent / (half - self.downscale_freq_shift))
        arg = self.scale * (t[:, None].float() * freqs[None, :])
        emb = torch.cat([torch.cos(arg), torch.sin(arg)] if self.flip_sin_to_cos else
                        [torch.sin(arg), torch.cos(arg)], dim=-1)
        return F.pad(emb, (0, 1)) if self.num_channels % 2 else emb


class GaussianFourierProjection(nn.Module):
    """Fourier features of log(sigma) (diffusers' GaussianFourierProjection with log=True, as
    UNet2DModel's "fourier" embedding builds it): [sin(2π w log t), cos(2π w log t)]; w is a
    fixed (non-trainable) random vector, key `weight`."""

    def __init__(self, embedding_size: int = 256, scale: float = 1.0, log: bool = True,
                 flip_sin_to_cos: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)
        self.log, self.flip_sin_to_cos = log, flip_sin_to_cos

    def forward(self, t: Tensor) -> Tensor:
        t = torch.log(t) if self.log else t
        proj = t[:, None] * self.weight[None, :] * 2 * math.pi
        parts = [torch.cos(proj), torch.sin(proj)] if self.flip_sin_to_cos else \
            [torch.sin(proj), torch.cos(proj)]
        return torch.cat(parts, dim=-1)


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding with its defaults)."""

    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv (key `conv`). padding=0 is diffusers' asymmetric variant: pad one row
    and column at the bottom/right, then convolve without padding."""

    def __init__(self, channels: int, out_channels: Optional[int] = None, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv (key `conv`)."""

    def __init__(self, channels: int, out_channels: Optional[int] = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(_upsample_nearest(x))


def _upsample_nearest(x: Tensor) -> Tensor:
    # indices past 2^31 elements: the channels_last kernel is the one at risk, so go contiguous
    if x.numel() * 4 > 2 ** 31:
        x = x.contiguous()
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D as UNet2DModel builds it:

        h = conv1(silu(norm1(x)))                      [x and h resampled here when up/down]
        h = silu(norm2(h + proj(silu(temb))))          time_embedding_norm="default"
        h = silu(norm2(h) * (1 + scale) + shift)       "scale_shift": (scale, shift) = proj(...)
        y = (shortcut(x) + conv2(dropout(h))) / output_scale_factor

    norm1/norm2 are GroupNormSiLU (nn.GroupNorm's keys), so both norm+SiLU pairs and the time
    embedding are one group_norm_silu call each. up/down: nearest x2 / 2x2 average pool of both
    x and h (the "resnet" up/downsamplers)."""

    def __init__(self, in_channels: int, out_channels: Optional[int] = None, *,
                 temb_channels: int = 512, groups: int = 32, eps: float = 1e-6,
                 dropout: float = 0.0, time_embedding_norm: str = "default",
                 output_scale_factor: float = 1.0, up: bool = False, down: bool = False):
        super().__init__()
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(f"time_embedding_norm must be 'default' or 'scale_shift', "
                             f"got {time_embedding_norm!r}")
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = float(output_scale_factor)
        self.up, self.down = up, down
        self.norm1 = GroupNormSiLU(groups, in_channels, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        proj = 2 * out_channels if time_embedding_norm == "scale_shift" else out_channels
        self.time_emb_proj = nn.Linear(temb_channels, proj)
        self.norm2 = GroupNormSiLU(groups, out_channels, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = (nn.Conv2d(in_channels, out_channels, 1)
                              if in_channels != out_channels else None)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.norm1(x)
        if self.up:
            x, h = _upsample_nearest(x), _upsample_nearest(h)
        elif self.down:
            x, h = F.avg_pool2d(x, 2, 2), F.avg_pool2d(h, 2, 2)
        h = self.conv1(h)
        t = self.time_emb_proj(F.silu(temb))
        if self.time_embedding_norm == "default":
            h = self.norm2(h, add=t)
        else:
            scale, shift = t.chunk(2, dim=1)
            h = self.norm2(h, scale=scale, shift=shift)
        h = self.conv2(self.dropout(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        y = x + h
        return y / self.output_scale_factor if self.output_scale_factor != 1.0 else y


def _attention(channels: int, head_dim: Optional[int], groups: Optional[int], eps: float,
               output_scale_factor: float) -> AttentionBlock:
    # diffusers: heads = C // head_dim (floor), dim_head = head_dim; None = one head of C
    head_dim = channels if head_dim is None else head_dim
    return AttentionBlock(channels, heads=channels // head_dim, dim_head=head_dim,
                          norm_num_groups=groups, eps=eps,
                          rescale_output_factor=output_scale_factor)


class DownBlock2D(nn.Module):
    """num_layers ResnetBlock2D (each followed by an AttentionBlock in AttnDownBlock2D), then an
    optional downsampler; returns (h, the outputs of every layer for the skip connections)."""
    has_attention = False

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int,
                 *, downsample_type: Optional[str] = "conv", downsample_padding: int = 1,
                 attention_head_dim: Optional[int] = None, groups: int = 32, eps: float = 1e-6,
                 output_scale_factor: float = 1.0, **resnet_kw):
        super().__init__()
        kw = dict(temb_channels=temb_channels, groups=groups, eps=eps,
                  output_scale_factor=output_scale_factor, **resnet_kw)
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, **kw)
            for i in range(num_layers)])
        if self.has_attention:
            self.attentions = nn.ModuleList([
                _attention(out_channels, attention_head_dim, groups, eps, output_scale_factor)
                for _ in range(num_layers)])
        if downsample_type == "conv":
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, out_channels,
                                                            downsample_padding)])
        elif downsample_type == "resnet":
            self.downsamplers = nn.ModuleList([ResnetBlock2D(out_channels, out_channels,
                                                             down=True, **kw)])
        else:
            self.downsamplers = None

    def forward(self, h: Tensor, temb: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        outputs = ()
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.has_attention:
                h = self.attentions[i](h)
            outputs += (h,)
        if self.downsamplers is not None:
            down = self.downsamplers[0]
            h = down(h, temb) if isinstance(down, ResnetBlock2D) else down(h)
            outputs += (h,)
        return h, outputs


class AttnDownBlock2D(DownBlock2D):
    has_attention = True


class UpBlock2D(nn.Module):
    """num_layers ResnetBlock2D on [h, skip] concatenated along channels (each followed by an
    AttentionBlock in AttnUpBlock2D), then an optional upsampler. Skips are taken from the end
    of `skips`, as the down path produced them."""
    has_attention = False

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int,
                 temb_channels: int, num_layers: int, *, upsample_type: Optional[str] = "conv",
                 attention_head_dim: Optional[int] = None, groups: int = 32, eps: float = 1e-6,
                 output_scale_factor: float = 1.0, **resnet_kw):
        super().__init__()
        kw = dict(temb_channels=temb_channels, groups=groups, eps=eps,
                  output_scale_factor=output_scale_factor, **resnet_kw)
        self.resnets = nn.ModuleList([
            ResnetBlock2D((prev_output_channel if i == 0 else out_channels)
                          + (in_channels if i == num_layers - 1 else out_channels),
                          out_channels, **kw)
            for i in range(num_layers)])
        if self.has_attention:
            self.attentions = nn.ModuleList([
                _attention(out_channels, attention_head_dim, groups, eps, output_scale_factor)
                for _ in range(num_layers)])
        if upsample_type == "conv":
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels, out_channels)])
        elif upsample_type == "resnet":
            self.upsamplers = nn.ModuleList([ResnetBlock2D(out_channels, out_channels, up=True,
                                                           **kw)])
        else:
            self.upsamplers = None

    def forward(self, h: Tensor, skips: tuple[Tensor, ...], temb: Tensor) -> Tensor:
        for i, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips[-1 - i]], dim=1), temb)
            if self.has_attention:
                h = self.attentions[i](h)
        if self.upsamplers is not None:
            up = self.upsamplers[0]
            h = up(h, temb) if isinstance(up, ResnetBlock2D) else up(h)
        return h


class AttnUpBlock2D(UpBlock2D):
    has_attention = True


class UNetMidBlock2D(nn.Module):
    """resnet, then (attention, resnet) num_layers times. Without add_attention the attentions
    list holds None (as diffusers), so the resnets keep their indices."""

    def __init__(self, in_channels: int, temb_channels: int, *, num_layers: int = 1,
                 groups: Optional[int] = 32, attn_groups: Optional[int] = None,
                 add_attention: bool = True, attention_head_dim: Optional[int] = None,
                 eps: float = 1e-6, output_scale_factor: float = 1.0,
                 time_embedding_norm: str = "default", dropout: float = 0.0):
        super().__init__()
        groups = groups if groups is not None else min(in_channels // 4, 32)
        if attn_groups is None:  # diffusers: no norm before the attention with scale_shift
            attn_groups = groups if time_embedding_norm == "default" else None
        kw = dict(temb_channels=temb_channels, groups=groups, eps=eps, dropout=dropout,
                  output_scale_factor=output_scale_factor,
                  time_embedding_norm=time_embedding_norm)
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels, in_channels, **kw)
                                      for _ in range(num_layers + 1)])
        self.attentions = nn.ModuleList([
            _attention(in_channels, attention_head_dim, attn_groups, eps, output_scale_factor)
            if add_attention else None for _ in range(num_layers)])

    def forward(self, h: Tensor, temb: Tensor) -> Tensor:
        h = self.resnets[0](h, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            if attn is not None:
                h = attn(h)
            h = resnet(h, temb)
        return h
