"""GroupNorm (+ per-channel time-embedding bias before it, + scale/shift after it) (+ SiLU) in
one kernel.

    y = act(GroupNorm(x + add[:, :, None, None]; num_groups, weight, bias, eps)
            * (1 + scale[:, :, None, None]) + shift[:, :, None, None])

(scale/shift: the time-embedding modulation of diffusers' resnet_time_scale_shift="scale_shift".)

Floor: read x once and write y once (x read twice when a group does not fit on chip: the second
read then mostly hits L2), against eager's add pass + group_norm (2 reads, 1 write) + silu pass.
Statistics are fp32, taken relative to one element of the group (shifted), so inputs with mean
1e4 and std 1 lose nothing to cancellation.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends
from . import _checks

IMPLEMENTED = ("torch", "triton", "cuda", "cpu")
ACTIVATIONS = ("silu", None)


def _channels_last_flag(x: Tensor) -> Optional[bool]:
    """False if x's memory is dense in (B, C, *spatial) order, True if dense in (B, *spatial, C)
    order (channels_last, for any number of spatial dims), None if neither. Size-1 dims are
    ignored: their strides do not matter for addressing."""
    def dense_in(order) -> bool:
        expected = 1
        for d in reversed(order):
            if x.shape[d] != 1 and x.stride(d) != expected:
                return False
            expected *= x.shape[d]
        return True

    n = x.dim()
    if dense_in(list(range(n))):
        return False
    if dense_in([0] + list(range(2, n)) + [1]):
        return True
    return None


def dense_layout(x: Tensor) -> tuple[Tensor, bool]:
    """(x or a dense copy of it, channels_last flag): the kernels address a dense tensor in
    either order without copying it. A view that is neither (a crop, a strided slice) is copied
    in the order its strides suggest, so y keeps the channels_last-ness of x."""
    # the two common cases first, in C++ (both skip size-1 dims, as _channels_last_flag does):
    # a U-Net forward calls this ~60 times, on small tensors
    if x.is_contiguous():
        return x, False
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x, True
    cl = _channels_last_flag(x)
    if cl is not None:
        return x, cl
    spatial = [x.stride(d) for d in range(2, x.dim()) if x.shape[d] > 1]
    if x.shape[1] > 1 and spatial and x.stride(1) < min(spatial):  # channels innermost
        return x.movedim(1, -1).contiguous().movedim(-1, 1), True
    return x.contiguous(), False


def _out_like(xd: Tensor) -> Tensor:
    # empty_like keeps the exact strides of a dense tensor, so y has x's memory format
    return _checks.empty_like(xd)


def group_norm_silu_ref(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        num_groups: int, eps: float = 1e-5, add: Optional[Tensor] = None,
                        activation: Optional[str] = "silu", scale: Optional[Tensor] = None,
                        shift: Optional[Tensor] = None) -> Tensor:
    """Plain PyTorch: act(F.group_norm(x + add[:, :, None...]) * (1 + scale) + shift). Math in
    float32 for float16/bfloat16/float32 inputs (float64 for float64), result in x's dtype.
    Differentiable."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(dt)
    a = None if add is None else add.to(dt)
    if dt == torch.float32 and h.numel() > 0:
        # GroupNorm is invariant to a per-group shift: subtracting each group's first element
        # (of x and of add, before they are summed) keeps fp32 statistics from cancelling when
        # |mean| >> std (torch's CPU channels_last kernel loses every digit at mean 1e4, std 1)
        Cg = h.shape[1] // num_groups
        sp = (1,) * (h.dim() - 2)
        first = h[(slice(None), slice(None, None, Cg)) + (0,) * (h.dim() - 2)].detach()
        h = h - first.repeat_interleave(Cg, dim=1).view(h.shape[0], h.shape[1], *sp)
        if a is not None:
            a = a - a[:, ::Cg].detach().repeat_interleave(Cg, dim=1)
    if a is not None:
        h = h + a.view(a.shape[0], a.shape[1], *([1] * (x.dim() - 2)))
    y = F.group_norm(h, num_groups, None if weight is None else weight.to(dt),
                     None if bias is None else bias.to(dt), eps)
    per_channel = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    if scale is not None:
        y = y * (1 + scale.to(dt).reshape(per_channel))
    if shift is not None:
        y = y + shift.to(dt).reshape(per_channel)
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype)


def _params_f32(*ts):
    # the extension kernels take the small per-channel tensors as contiguous float32
    return [t if t is None or (t.dtype == torch.float32 and t.is_contiguous())
            else t.to(torch.float32).contiguous() for t in ts]


def _group_norm_silu_body(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                          add: Optional[Tensor], num_groups: int, eps: float, silu: bool,
                          scale: Optional[Tensor] = None,
                          shift: Optional[Tensor] = None) -> Tensor:
    """Inputs are checked; x is dense (contiguous or channels_last in any spatial rank)."""
    xd, cl = dense_layout(x)
    out = _out_like(xd)
    backend = backends.pick("group_norm_silu", IMPLEMENTED, x.device, x.dtype,
                            "channels_last" if cl else "contiguous")
    act = "silu" if silu else None
    if backend == "torch" or x.dtype == torch.float64 or x.numel() == 0:
        out.copy_(group_norm_silu_ref(xd, weight, bias, num_groups, eps, add, act, scale, shift))
    elif backend == "triton":
        from ..kernels.group_norm_silu import group_norm_silu_triton
        group_norm_silu_triton(xd, weight, bias, add, num_groups, eps, act, out,
                               channels_last=cl, scale=scale, shift=shift)
    else:
        w, b, a, sc, sh = _params_f32(weight, bias, add, scale, shift)
        torch.ops.fastdiff_ext.group_norm_silu(xd, w, b, a, sc, sh, num_groups, eps, silu, out)
    return out


_group_norm_silu_op = torch.library.custom_op("fastdiff::group_norm_silu",
                                              mutates_args=())(_group_norm_silu_body)


@_group_norm_silu_op.register_fake
def _(x, weight, bias, add, num_groups, eps, silu, scale=None, shift=None):
    return torch.empty_like(dense_layout(x)[0])


# -- autograd: the fused CPU forward + backward ------------------------------------------------
_BACKWARD_OP = "group_norm_silu_backward"


def _fused_grad(x: Tensor, *params) -> bool:
    """Whether a call under autograd runs _GroupNormSiLUCPU: plain CPU tensors the C++ backend
    takes (not float64, not empty), an extension that has the backward op, and no torch.compile,
    jit tracing, dispatch mode or functorch transform (those see the reference's plain torch
    ops, which they all trace and differentiate)."""
    if (not x.is_cpu or x.dtype == torch.float64 or x.numel() == 0
            or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._get_tracing_state() is not None
            or torch._C._functorch.get_dynamic_layer_stack_depth() > 0):
        return False
    if type(x) not in _checks._PLAIN or any(
            t is not None and (type(t) not in _checks._PLAIN or not t.is_cpu) for t in params):
        return False
    layout = "channels_last" if dense_layout(x)[1] else "contiguous"
    return (backends.pick("group_norm_silu", IMPLEMENTED, x.device, x.dtype, layout) == "cpu"
            and backends._extension_has(_BACKWARD_OP))


class _GroupNormSiLUCPU(torch.autograd.Function):
    """The C++ forward kernel, then fastdiff_ext::group_norm_silu_backward, which recomputes the
    group statistics from x and returns the gradients asked for (float32 for the parameters,
    cast to each one's dtype here). A backward that builds a graph (create_graph=True, for a
    double backward) differentiates the reference instead, on the saved inputs. (Not
    torch.autograd.function.once_differentiable: its wrapper cost ~40 µs of host time per call,
    more than the kernel on a small U-Net's tensors.)"""

    @staticmethod
    def forward(ctx, x, weight, bias, add, scale, shift, num_groups, eps, silu):
        xd = dense_layout(x)[0]
        params = _params_f32(weight, bias, add, scale, shift)
        out = _out_like(xd)
        torch.ops.fastdiff_ext.group_norm_silu(xd, *params, num_groups, eps, silu, out)
        ctx.save_for_backward(x, weight, bias, add, scale, shift)
        ctx.args = (num_groups, eps, silu)
        return out

    @staticmethod
    def backward(ctx, grad):
        ins = ctx.saved_tensors
        need = ctx.needs_input_grad[:6]
        num_groups, eps, silu = ctx.args
        if torch.is_grad_enabled():  # create_graph: a differentiable backward
            want = [t for t, n in zip(ins, need) if n]
            y = group_norm_silu_ref(ins[0], *ins[1:3], num_groups, eps, ins[3],
                                    "silu" if silu else None, *ins[4:])
            got = iter(torch.autograd.grad(y, want, grad, create_graph=True))
            return (*(next(got) if n else None for n in need), None, None, None)
        xd = dense_layout(ins[0])[0]
        params = _params_f32(*ins[1:])
        if grad.dtype != xd.dtype or grad.stride() != xd.stride():
            grad = torch.empty_like(xd).copy_(grad)  # the kernel reads it in x's layout
        dx = _out_like(xd) if need[0] else None
        pg = [_checks.empty_like(p, dtype=torch.float32) if n else None
              for n, p in zip(need[1:], params)]
        torch.ops.fastdiff_ext.group_norm_silu_backward(grad, xd, *params, num_groups, eps, silu,
                                                        dx, *pg)
        pg = [g if g is None or g.dtype == t.dtype else g.to(t.dtype) for g, t in zip(pg, ins[1:])]
        return (dx, *pg, None, None, None)


_PARAM_SHAPES = {"weight": "(C,)", "bias": "(C,)",
                 "add": "(B, C), the per-channel bias added before the norm",
                 "scale": "(B, C), the per-channel scale applied after the norm as (1 + scale)",
                 "shift": "(B, C), the per-channel shift added after the norm"}


def _check(x, weight, bias, num_groups, eps, add, activation, scale=None, shift=None):
    _checks.float_tensor("x", x, ndim_min=3)
    if x.dim() > 5:
        raise ValueError(f"x must be (B, C, *spatial) with 1 to 3 spatial dims, "
                         f"got shape {tuple(x.shape)}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
    C = x.shape[1]
    if num_groups <= 0 or C % num_groups != 0:
        raise ValueError(f"num_groups={num_groups} must be positive and divide the number of "
                         f"channels C={C} (x.shape[1])")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
    BC = (x.shape[0], C)
    for name, t, shape in (("weight", weight, (C,)), ("bias", bias, (C,)), ("add", add, BC),
                           ("scale", scale, BC), ("shift", shift, BC)):
        if t is None:
            continue
        _checks.float_tensor(name, t)
        if t.shape != shape:
            raise ValueError(f"{name} must have shape {shape} = {_PARAM_SHAPES[name]}, "
                             f"got {tuple(t.shape)}")
        if t.device != x.device:
            _checks.same_device("x", x, **{name: t})


_KERNEL_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16))
_cpu_kernel = None  # fastdiff._C.group_norm_silu_cpu, once the first call has found it


def _cpu_direct(x, weight, bias, num_groups, eps, add, scale, shift, activation):
    """The common eager call on CPU tensors straight into the C++ kernel, or None for any other
    call (the general path then checks and runs it). A U-Net forward makes ~60 calls on tensors
    of a few KB, where the general path's Python and the custom op's dispatch (~9 µs together)
    cost more than the kernel: here ~2 µs of Python and a direct pybind call. Taken only when x
    is a plain dense CPU tensor of a kernel dtype, the parameters plain contiguous float32 ones,
    nothing records autograd, no compile/trace/dispatch mode, functorch transform or profiler
    is active, and backends.pick chooses "cpu". The kernel checks shapes and devices itself; a
    call it rejects goes the general path, whose checks name the argument."""
    global _cpu_kernel
    if (not _checks.direct(x, weight, bias, add, scale, shift) or not x.is_cpu
            or x.dtype not in _KERNEL_DTYPES or type(num_groups) is not int
            or type(eps) is not float or not eps >= 0 or not 3 <= x.dim() <= 5
            or (activation != "silu" and activation is not None)
            or torch._C._autograd._profiler_enabled()):  # the profiler records dispatched ops
        return None
    for t in (weight, bias, add, scale, shift):
        if t is not None and (t.dtype != torch.float32 or not t.is_contiguous()):
            return None
    if x.is_contiguous():
        layout = "contiguous"
    elif x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        layout = "channels_last"
    else:
        return None
    if backends.pick("group_norm_silu", IMPLEMENTED, x.device, x.dtype, layout) != "cpu":
        return None
    if _cpu_kernel is None:
        from .. import _C
        if not hasattr(_C, "group_norm_silu_cpu"):  # an extension built before it existed
            return None
        _cpu_kernel = _C.group_norm_silu_cpu
    out = _checks.empty_like(x)
    try:
        _cpu_kernel(x, weight, bias, add, scale, shift, num_groups, eps, activation == "silu", out)
    except ValueError:  # a shape or device the general path's checks will name
        return None
    return out


def group_norm_silu(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int,
                    eps: float = 1e-5, *, add: Optional[Tensor] = None,
                    scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                    activation: Optional[str] = "silu") -> Tensor:
    """act(GroupNorm(x + add) * (1 + scale) + shift) in one kernel.

    Args:
        x: (B, C, *spatial), 1 to 3 spatial dims; float32/float16/bfloat16 (float64 runs the
            reference). Contiguous or channels_last (any spatial rank); y has x's memory
            format. Other views are copied first, channels-innermost ones to channels_last.
        weight, bias: (C,) affine parameters, or None.
        num_groups: G, must divide C (G = 1 and G = C both work).
        eps: added to the group variance.
        add: optional (B, C) per-channel bias added to x before the norm (time embedding).
        scale, shift: optional (B, C) per-channel modulation after the affine norm:
            y = act(GN(x + add) * (1 + scale) + shift) (diffusers' "scale_shift" time embedding).
        activation: "silu" (y = h * sigmoid(h)) or None (plain GroupNorm).

    Statistics are float32 whatever the input dtype. The backend is chosen by
    fastdiff.backends (torch, triton, cuda, cpu).

    Autograd: when grad mode is on and any input requires grad, a call the C++ CPU backend runs
    (plain CPU tensors, float32/16/bf16) takes its fused forward and a fused backward kernel
    (a double backward differentiates the reference). Every other call (the torch, Triton and CUDA
    backends, float64, torch.compile and other tracing) runs the plain-PyTorch reference, whose
    gradients come from autograd of ordinary torch ops.
    """
    y = _cpu_direct(x, weight, bias, num_groups, eps, add, scale, shift, activation)
    if y is not None:
        return y
    _check(x, weight, bias, num_groups, eps, add, activation, scale, shift)
    eps = float(eps)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight, bias, add, scale, shift)):
        if _fused_grad(x, weight, bias, add, scale, shift):
            return _GroupNormSiLUCPU.apply(x, weight, bias, add, scale, shift, num_groups, eps,
                                           activation == "silu")
        y = group_norm_silu_ref(x, weight, bias, num_groups, eps, add, activation, scale, shift)
        xd = dense_layout(x)[0]
        if y.stride() != xd.stride():  # x's memory format, as the kernels give (copy_ is tracked)
            y = torch.empty_like(xd).copy_(y)
        return y
    return _checks.run_op(_group_norm_silu_op, _group_norm_silu_body, x, weight, bias, add,
                          num_groups, eps, activation == "silu", scale, shift)

