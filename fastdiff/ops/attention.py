"""Scaled dot-product attention o = softmax(q kᵀ · scale) v, flash-style (no Lq×Lk matrix).

Floor: read q, k, v once, write o once: e·B·H·(2·Lq + 2·Lk)·D bytes; 4·B·H·Lq·Lk·D FLOPs, so at
U-Net lengths the op is bound by the matmul rate, not by memory.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends
from . import _checks

IMPLEMENTED = ("torch", "triton")
HEAD_DIM_MIN, HEAD_DIM_MAX = 32, 256


def attention_ref(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """Plain PyTorch softmax(q kᵀ · scale) v, materialising the Lq×Lk scores.

    Math in float32 (float64 for float64 inputs); returns q's dtype, contiguous (B, H, Lq, D).
    The `torch` backend, the autograd path, and (on float64 inputs) the tests' reference."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(s, dim=-1), v.to(dt)).to(q.dtype)


def _attention_torch(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """The `torch` backend and the autograd path: PyTorch's fused SDPA (on CUDA its flash,
    memory-efficient or cuDNN kernels; on CPU its flash kernel, blocked over keys with fp32
    accumulation, parallel over batch·heads·query blocks): no Lq×Lk matrix, differentiable.
    The reference for float64 and on other devices."""
    if q.device.type in ("cuda", "cpu") and q.dtype != torch.float64:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return attention_ref(q, k, v, scale)


def _unit_last(x: Tensor) -> Tensor:
    # The kernel takes any batch/head/row strides (zero included: k/v broadcast over the batch)
    # but needs D contiguous; only then is a copy made.
    return x if x.stride(-1) == 1 else x.contiguous()


def _attention_body(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Returns o as a contiguous (B, Lq, H, D) tensor. Inputs are checked."""
    B, H, Lq, D = q.shape
    backend = backends.pick("attention", IMPLEMENTED, q.device, q.dtype)
    if backend == "torch" or q.dtype == torch.float64 or q.numel() == 0:
        r = _attention_torch(q, k, v, scale).transpose(1, 2)
        if r.is_contiguous():  # SDPA's flash kernels (CPU, CUDA) return this layout: no copy
            return r
        return _checks.empty_like(q, shape=(B, Lq, H, D)).copy_(r)
    out = _checks.empty_like(q, shape=(B, Lq, H, D))
    from ..kernels.attention import attention_triton
    # o: the (B, H, Lq, D) view of out that the kernel writes through
    attention_triton(_unit_last(q), _unit_last(k), _unit_last(v), out.transpose(1, 2), scale)
    return out


_attention_op = torch.library.custom_op("fastdiff::attention", mutates_args=())(_attention_body)


@_attention_op.register_fake
def _(q, k, v, scale):
    B, H, Lq, D = q.shape
    return q.new_empty((B, Lq, H, D))


def _check(q, k, v, scale) -> float:
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.float_tensor(name, x, ndim=4)
    _checks.same_device("q", q, k=k, v=v)
    _checks.same_dtype("q", q, k=k, v=v)
    B, H, Lq, D = q.shape
    for name, x in (("k", k), ("v", v)):
        if x.shape[0] != B:
            raise ValueError(f"{name} must have the batch size of q ({B}), got shape "
                             f"{tuple(x.shape)}")
        if x.shape[1] != H:
            raise ValueError(f"{name} must have the number of heads of q ({H}), got shape "
                             f"{tuple(x.shape)}")
        if x.shape[3] != D:
            raise ValueError(f"{name} must have the head dim of q ({D}), got shape "
                             f"{tuple(x.shape)}")
    if not HEAD_DIM_MIN <= D <= HEAD_DIM_MAX:
        raise ValueError(f"head dim (last dim of q, k, v) must be in [{HEAD_DIM_MIN}, "
                         f"{HEAD_DIM_MAX}], got {D}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have as many keys as k ({k.shape[2]}), got shape "
                         f"{tuple(v.shape)}")
    if k.shape[2] == 0:
        raise ValueError("k and v must hold at least one key (softmax over no keys is undefined)")
    if scale is None:
        return D ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """softmax(q kᵀ · scale) v without materialising the Lq×Lk matrix.

    Args:
        q: (B, H, Lq, D) queries.
        k, v: (B, H, Lk, D) keys and values; Lk may differ from Lq (cross-attention, e.g. 77
            text tokens), Lk ≥ 1. Any strides: views sliced from one packed qkv tensor are read
            in place when the last dim has unit stride (otherwise that input is copied once).
        scale: multiplies q kᵀ; None means 1/sqrt(D).
        D (head dim) is 32…256; dims that are not a power of 2 (40, 80, 160) are padded inside
        the kernel, never by copying.

    Dtypes: float16 / bfloat16 run the Triton kernel (fp32 softmax and accumulation; p rounded to
    the input dtype for the second matmul, as FlashAttention does). float32 runs the same kernel
    with IEEE fp32 dots (TF32 off), so it matches an fp32 reference to ~1e-6 but does not use
    tensor cores and spills registers: `auto` sends float32 CUDA inputs to the `torch` backend
    (PyTorch's fused SDPA) instead; for speed, call it with fp16/bf16. float64 always runs the
    reference.
    On CPU tensors the `torch` backend runs PyTorch's SDPA (its CPU flash kernel; a C++ fastdiff
    kernel would have to beat that oneDNN/AVX-512 code and does not exist), unless the `triton`
    backend is forced under TRITON_INTERPRET=1.

    Autograd: when grad is enabled and q, k or v requires grad, the `torch` backend runs instead
    (PyTorch's SDPA, with its fused backward, on CUDA and CPU); a fastdiff backward kernel is
    not implemented.

    Returns:
        o: (B, H, Lq, D) in q's dtype. Without autograd it is a transposed view of a contiguous
        (B, Lq, H, D) buffer (as torch's flash SDPA returns), so `o.transpose(1, 2).reshape(B, Lq,
        H * D)` costs no copy.
    """
    scale = _check(q, k, v, scale)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _attention_torch(q, k, v, scale)
    return _checks.run_op(_attention_op, _attention_body, q, k, v, scale).transpose(1, 2)
