"""Modules built on the fused ops (GroupNormSiLU, AttentionBlock, ...)."""
from __future__ import annotations

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
