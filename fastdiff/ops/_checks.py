"""Argument checks shared by the public ops: each error names the argument and what was expected."""
from __future__ import annotations

import contextlib
import contextvars
import math

import torch

from ..backends import env_reader

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_ENV_CHECKS = env_reader("FASTDIFF_CHECKS")
_ENV_POISON = env_reader("FASTDIFF_POISON")


def checks_enabled() -> bool:
    return _ENV_CHECKS() != "0"


# Bits of the extension ops' `checks` argument (csrc/value_checks.h): which values the C++/CUDA
# kernel range-checks where it reads them (the CPU kernels on the host, raising a ValueError
# naming the argument; the CUDA kernels by a device-side assert).
CHECK_VALUES = 1       # t (t_prev, ddpm's order), multistep's step, a device guidance_scale
CHECK_FIRST_INDEX = 2  # an int64 device first_index in [0, 2^32 - B]
KERNEL_CHECKED = ("cpu", "cuda")  # the backends whose kernels do


def checked_in_kernel(backend: str, x: torch.Tensor) -> bool:
    """Whether the kernel that runs this call checks the values it reads itself: the extension's
    (cpu, cuda), which run every non-empty float32/16/bf16 call (float64 and empty inputs run the
    reference). The wrapper then issues no check of its own for tensor values (on a GPU: no
    device op, no launch; for a Python int the check stays in plain Python). The torch and
    Triton backends keep the wrapper's checks (a device-side assert chain for device tensors)."""
    return backend in KERNEL_CHECKED and x.dtype != torch.float64 and x.numel() > 0


def kernel_checks(*given, first_index=None, first_t=None) -> int:
    """The `checks` argument of an extension op for this call. given: the arguments whose values
    the kernel is to check, as the caller gave them (t, t_prev, step, guidance_scale...): only
    tensors are (an int was checked in plain Python; on CUDA no check kernel is launched for
    ints). None where values_checked() says values are not checked (FASTDIFF_CHECKS=0,
    trusted_values(), torch.compile tracing); the first_index range only for an int64 tensor
    one (a narrower one is its 32-bit word)."""
    ts = [v for v in given if isinstance(v, torch.Tensor)]
    if first_t is not None and first_index.dtype == torch.int64:
        return (CHECK_VALUES if ts else 0) | CHECK_FIRST_INDEX \
            if values_checked(first_t, *ts) else 0
    return CHECK_VALUES if ts and values_checked(*ts) else 0


def tensor(name: str, x, *, ndim_min: int | None = None, ndim: int | None = None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if ndim_min is not None and x.dim() < ndim_min:
        raise ValueError(f"{name} must have at least {ndim_min} dims, got shape {tuple(x.shape)}")
    return x


_FLOATS = frozenset(FLOAT_DTYPES + (torch.float64,))
# subclasses (FakeTensor, DTensor...) take the op
_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))


def float_tensor(name: str, x, allow_float64: bool = True, ndim_min: int | None = None,
                 ndim: int | None = None):
    # the common case first, in a few attribute reads (an op checks its inputs on every call)
    if type(x) in _PLAIN and allow_float64 and x.dtype in _FLOATS and ndim is None and (
            ndim_min is None or x.dim() >= ndim_min):
        return x
    tensor(name, x, ndim_min=ndim_min, ndim=ndim)
    if allow_float64 and x.dtype in _FLOATS:
        return x
    ok = FLOAT_DTYPES + ((torch.float64,) if allow_float64 else ())
    if x.dtype not in ok:
        raise TypeError(f"{name} must be a floating tensor of dtype "
                        f"{', '.join(str(d).replace('torch.', '') for d in ok)}; got {x.dtype}")
    return x


def same_device(ref_name: str, ref: torch.Tensor, **others):
    for name, x in others.items():
        if x is not None and x.device != ref.device:
            raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; "
                             "move them to the same device")


def same_shape(ref_name: str, ref: torch.Tensor, **others):
    for name, x in others.items():
        if x is not None and x.shape != ref.shape:
            raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, "
                             f"got {tuple(x.shape)}")


def same_dtype(ref_name: str, ref: torch.Tensor, **others):
    for name, x in others.items():
        if x is not None and x.dtype != ref.dtype:
            raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")


# the integer dtypes a tensor t may have (anything but floating, complex and bool)
_INT_DTYPES = frozenset(d for d in vars(torch).values() if isinstance(d, torch.dtype) and not (
    d.is_floating_point or d.is_complex or d == torch.bool))


def timesteps(name: str, t, batch: int, num_timesteps: int, device, allow_negative=False,
              check_values=True):
    """Per-sample timesteps as an int64 tensor of shape (batch,) on `device`.

    Accepts an int (broadcast), or an integer tensor of shape (batch,) or () on the device or on
    the CPU. Values are checked to lie in [0, T) (below T with allow_negative: any negative value
    means "the step after the last", i.e. alpha_cumprod = 1; diffusers' DDIM goes to t - T//n):
    an int in plain Python, a CPU tensor on the host (no sync: host memory), a device tensor by a
    device-side assert (torch._assert_async: no host sync, a failure surfaces as a CUDA error
    at the next synchronising call). Not while torch.compile traces, nor with FASTDIFF_CHECKS=0
    or inside trusted_values(). The kernels clamp the index regardless, so an unchecked value can
    never read outside the schedule. check_values=False leaves the values of a tensor t to the
    caller (timestep_values, to check several at once)."""
    lo = None if allow_negative else 0
    # the common tensor case first: int64 (batch,) already on the device, dense
    if type(t) in _PLAIN and t.dtype == torch.int64 and t.device == device and \
            t.shape == (batch,) and t.is_contiguous():
        if check_values:
            timestep_values(num_timesteps, (name, t, lo))
        return t
    if isinstance(t, bool) or not isinstance(t, (int, torch.Tensor)):
        raise TypeError(f"{name} must be an int or an integer tensor of shape ({batch},), "
                        f"got {type(t).__name__}")
    if isinstance(t, int):
        if not (lo is None or lo <= t) or t >= num_timesteps:
            raise ValueError(f"{name}={t} is out of range {_range_text(lo, num_timesteps)}")
        return int_timesteps(t, batch, device)
    dt = t.dtype
    if dt not in _INT_DTYPES and (dt.is_floating_point or dt.is_complex or dt == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if t.dim() == 0:
        t = t.reshape(1).expand(batch)
    elif t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},) (one timestep per sample), "
                         f"got {tuple(t.shape)}")
    if not isinstance(device, torch.device):
        device = torch.device(device)
    on_device = t.device == device
    if not on_device:  # a CPU t for device data is copied (never while a graph is captured)
        if t.device.type != "cpu":
            raise ValueError(f"{name} is on {t.device} but the data is on {device}")
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise ValueError(f"{name} is a CPU tensor while a CUDA graph is being captured: the "
                             "copy to the GPU cannot be captured; pass a CUDA tensor (or an int)")
    if check_values:
        timestep_values(num_timesteps, (name, t, lo))
    if on_device and dt == torch.int64 and t.is_contiguous():
        return t
    return t.to(device=device, dtype=torch.int64, non_blocking=True).contiguous()


_INT_T = {}  # (t, batch, device) -> int64 tensor (batch,) filled with t; never written, never evicted
_INT_T_MAX = 4096  # entries (bytes each); past it a call makes its own tensor, as before


def int_timesteps(t: int, batch: int, device) -> torch.Tensor:
    """A Python-int t as the int64 tensor (batch,) the kernels read, made once per (t, batch,
    device) and reused: no fill per call (~1.4 us of host time, and a launch on a GPU). No op
    writes it (it never leaves the ops), and no entry is ever dropped, so a CUDA graph may read
    one. Made fresh and not kept while torch.compile traces, under a dispatch mode (FakeTensor...)
    and while a CUDA graph is captured (a captured fill runs only at replay)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return torch.full((batch,), t, dtype=torch.int64, device=device)
    key = (t, batch, device)
    out = _INT_T.get(key)
    if out is not None:
        return out
    if len(_INT_T) >= _INT_T_MAX or (torch.device(device).type == "cuda" and
                                     torch.cuda.is_current_stream_capturing()):
        return torch.full((batch,), t, dtype=torch.int64, device=device)
    with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
        out = torch.full((batch,), t, dtype=torch.int64, device=device)
    _INT_T[key] = out
    return out


def _range_text(lo, num_timesteps: int) -> str:
    if lo is None:
        return f"(-inf, {num_timesteps}) (any negative value is the final step)"
    return f"[{lo}, {num_timesteps})"


def _host_readable(t: torch.Tensor) -> bool:
    """Whether t's values are read on the host to check them (CPU memory: no sync); device
    tensors are checked on the device instead. benchmarks/host_time.py replaces this to time
    the device path's host work with CPU tensors standing in."""
    return t.device.type == "cpu"


def timestep_values(num_timesteps: int, *items, ordered: str | None = None):
    """Range checks of timesteps as the caller gave them, items (name, t, lo) with t an int or a
    tensor already checked by timesteps(check_values=False), t in [lo, num_timesteps) (lo None:
    no lower bound); ordered: the second item must be < the first, sample by sample; the error
    starts with this text.

    Never a host sync: ints are checked in plain Python (no tensor ops), CPU tensors on the
    host, device tensors by one device-side assert (torch._assert_async) over all items; none
    at all where values_checked() says values may not be checked (a device assert is skipped
    too there: FASTDIFF_CHECKS=0, trusted_values(), torch.compile tracing)."""
    tensors = [t for _, t, _ in items if isinstance(t, torch.Tensor)]
    if tensors and not values_checked(*tensors):
        return
    if not tensors:  # plain Python
        for name, t, lo in items:
            if (lo is not None and t < lo) or t >= num_timesteps:
                raise ValueError(f"{name}={t} is out of range {_range_text(lo, num_timesteps)}")
        if ordered and items[1][1] >= items[0][1]:
            (na, a, _), (nb, b, _) = items[0], items[1]
            raise ValueError(f"{ordered}: got {nb}={b} >= {na}={a} for sample 0")
        return
    if any(t.numel() == 0 for t in tensors):
        return
    if not all(_host_readable(t) for t in tensors):
        _device_assert(num_timesteps, items, ordered)
        return
    ts = [(name, t if isinstance(t, torch.Tensor) else torch.tensor(t), lo)
          for name, t, lo in items]
    stats = [s for _, t, _ in ts for s in t.aminmax()]
    if ordered:
        a, b = ts[0][1], ts[1][1]
        stats.append((b >= a).any().to(torch.int64))
    read = torch.stack([s.to(torch.int64) for s in stats]).tolist()  # host memory: no sync
    for k, (name, _, lo) in enumerate(ts):
        tmin, tmax = read[2 * k], read[2 * k + 1]
        if (lo is not None and tmin < lo) or tmax >= num_timesteps:
            raise ValueError(f"{name} has values in [{tmin}, {tmax}], outside "
                             f"{_range_text(lo, num_timesteps)}")
    if ordered and read[-1]:
        (na, a, _), (nb, b, _) = ts[0], ts[1]
        a, b = torch.broadcast_tensors(a.reshape(-1), b.reshape(-1))
        i = int((b >= a).nonzero()[0, 0])
        raise ValueError(f"{ordered}: got {nb}={int(b[i])} >= {na}={int(a[i])} for sample {i}")


def _device_assert(num_timesteps: int, items, ordered):
    """One torch._assert_async over every item's range (and the order): a few tiny kernels on
    the items' device, no host sync. A failure is a device-side assert (a CUDA error raised at
    the next synchronising call, the context unusable after it, as any device assert); its
    message says what was checked."""
    ok = None
    what = []
    # with the order checked, an unbounded-below second item needs no range op of its own:
    # b < a < T already (two fewer kernels per ddpm sampler_step)
    implied = bool(ordered) and isinstance(items[0][1], torch.Tensor) and items[1][2] is None
    for k, (name, t, lo) in enumerate(items):
        if not isinstance(t, torch.Tensor):  # an int beside a tensor: checked here, in Python
            timestep_values(num_timesteps, (name, t, lo))
            continue
        if k == 1 and implied:
            what.append(f"{name} < {num_timesteps} (by the order)")
            continue
        c = (t.clamp(lo, num_timesteps - 1) == t) if lo is not None else (t < num_timesteps)
        ok = c if ok is None else ok & c
        what.append(f"{name} in {_range_text(lo, num_timesteps)}")
    if ordered:
        (na, a, _), (nb, b, _) = items[0], items[1]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            c = b.to(a.device) < a
        else:  # an int stays a Python scalar: no tensor is made (copied) for it
            c = a > b if isinstance(a, torch.Tensor) else b < a
        ok = c if ok is None else ok & c
        what.append(f"{ordered} ({nb} < {na})")
    torch._assert_async(ok.all(), "fastdiff: timesteps out of range: expected " +
                        "; ".join(what))


_TRUSTED = contextvars.ContextVar("fastdiff_trusted_values", default=False)


@contextlib.contextmanager
def trusted_values():
    """Inside, the ops read no timestep values back to check them (no host sync): for loops
    whose timesteps were checked once before the loop (the samplers)."""
    token = _TRUSTED.set(True)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def values_checked(*ts: torch.Tensor) -> bool:
    """Whether t's values are checked at all: not while torch.compile traces, nor with
    FASTDIFF_CHECKS=0 or inside trusted_values(), nor on the meta device. (A CUDA t is checked
    by a device-side assert, which a CUDA graph captures like any kernel.)"""
    # is_compiling() first: Dynamo cannot trace ContextVar.get (it short-circuits before it)
    if torch.compiler.is_compiling() or _TRUSTED.get() or _ENV_CHECKS() == "0":
        return False
    for t in ts:
        if t.is_meta:
            return False
    return True


def dense(x: torch.Tensor) -> torch.Tensor:
    """x itself if its memory is dense with the batch dim outermost (contiguous or channels_last),
    else a contiguous copy. The elementwise kernels walk memory in order."""
    if x.is_contiguous():
        return x
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return x
    return x.contiguous()


def like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """x laid out in memory like `ref` (same strides), copying only if it is not already."""
    if x.stride() == ref.stride():
        return x
    return torch.empty_like(ref, dtype=x.dtype).copy_(x)


def empty_like(ref: torch.Tensor, dtype=None, shape=None) -> torch.Tensor:
    """Output buffer laid out like `ref`. With FASTDIFF_POISON=1 (the test suite sets it) it is
    filled with NaN first, so that an element a kernel forgets to write fails every comparison."""
    if shape is None:
        out = torch.empty_like(ref) if dtype is None else torch.empty_like(ref, dtype=dtype)
    else:
        out = ref.new_empty(shape, dtype=dtype or ref.dtype)
    if _ENV_POISON() == "1":
        out.fill_(float("nan"))
    return out


def seed64(seed: int) -> int:
    """Any int seed as the signed int64 with the same low 64 bits (the kernels use the bits)."""
    seed = int(seed) & (2 ** 64 - 1)
    return seed - 2 ** 64 if seed >= 2 ** 63 else seed


def noise_and_seed(ref_name: str, ref: torch.Tensor, noise, seed):
    """The checks shared by the ops that draw noise: noise (given) or seed (in-kernel), not both;
    noise shaped like the data; seed an int."""
    if noise is not None:
        if seed is not None:
            raise ValueError("give either noise or seed, not both: seed only drives the noise "
                             "drawn in the kernel when noise is None")
        float_tensor("noise", noise)
        same_device(ref_name, ref, noise=noise)
        same_shape(ref_name, ref, noise=noise)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, torch.Tensor))):
        raise TypeError(f"seed must be an int or a 1-element int64 tensor, got "
                        f"{type(seed).__name__}")


def _scalar_tensor(name: str, v: torch.Tensor, device, integer: bool) -> torch.Tensor:
    """A 0-d/1-element tensor argument the kernels read on the device: v itself when it has the
    kernels' dtype (int64 / float32; they read its one element, whatever its shape), else a
    converted copy on the device (no sync)."""
    kind = "an integer" if integer else "a floating"
    if v.numel() != 1:
        raise ValueError(f"{name} must be {kind} tensor of 1 element (0-d or shape (1,)), got "
                         f"shape {tuple(v.shape)}")
    dt = v.dtype
    ok = (not dt.is_floating_point and not dt.is_complex and dt != torch.bool) \
        if integer else dt.is_floating_point
    if not ok:
        raise TypeError(f"{name} must be {kind} tensor, got dtype {v.dtype}")
    vd = v.device
    if vd != device:
        device = torch.device(device)
        if vd != device and not (vd.type == device.type == "cuda" and vd.index is None):
            raise ValueError(f"{name} is on {vd} but the data is on {device}: the kernels read "
                             f"it there (a host copy would be baked into a captured CUDA graph)")
    want = torch.int64 if integer else torch.float32
    return v if dt == want else v.reshape(1).to(want)  # on-device, no sync


def scalar_values(*items):
    """Range checks of 1-element tensors the kernels read (checked by _scalar_tensor), with the
    semantics the ints/floats get in plain Python: items (name, v, lo, hi) for an integer in
    [lo, hi], or (name, v, None, None) for a finite float. A CPU tensor is read on the host (no
    sync) and raises ValueError naming it; device tensors get one torch._assert_async over all
    items (no host sync; a failure is a device-side assert, as for the timesteps). Skipped where
    values_checked() says so."""
    items = [it for it in items if it[1] is not None]
    if not items or not values_checked(*(v for _, v, _, _ in items)):
        return
    if all(_host_readable(v) for _, v, _, _ in items):
        for name, v, lo, hi in items:
            x = v.reshape(()).item()  # host memory: no sync
            if lo is None and not math.isfinite(x):
                raise ValueError(f"{name} must be finite, got {x!r}")
            if lo is not None and not lo <= x <= hi:
                raise ValueError(f"{name} must be in [{lo}, {hi}], got {x}")
        return
    ok, what = None, []
    for name, v, lo, hi in items:
        c = v.isfinite() if lo is None else (v.clamp(lo, hi) == v)
        ok = c if ok is None else ok & c
        what.append(f"{name} finite" if lo is None else f"{name} in [{lo}, {hi}]")
    torch._assert_async(ok.reshape(()), "fastdiff: argument out of range: expected " +
                        "; ".join(what))


def seed_arg(seed, device):
    """(int seed, tensor or None) for the kernels: an int (any, its low 64 bits used) or an
    int64 device tensor of 1 element, read by the kernels (a replayed CUDA graph sees a
    seed_t.fill_())."""
    if type(seed) is int and -2 ** 63 <= seed < 2 ** 63:  # the common case: already the bits
        return seed, None
    if isinstance(seed, torch.Tensor):
        return 0, _scalar_tensor("seed", seed, device, True)
    return seed64(seed), None


MAX_IMAGE_INDEX = 2 ** 32  # the image index is one 32-bit word of the Philox counter


def first_index_arg(first_index, batch: int, device):
    """(int first_index, tensor or None): the global index of sample 0 (Philox counter word 1),
    an int in [0, 2^32 - B] or a 1-element integer tensor on the data's device (the caller
    checks an int64 one's value with scalar_values(first_index_item(...)): no host sync; a
    narrower one is taken mod 2^32)."""
    if type(first_index) is int and 0 <= first_index <= MAX_IMAGE_INDEX - batch:
        return first_index, None  # the common case first
    if isinstance(first_index, torch.Tensor):
        return 0, _scalar_tensor("first_index", first_index, device, True)
    if isinstance(first_index, bool) or not isinstance(first_index, int):
        raise TypeError(f"first_index must be an int or a 1-element int64 tensor, got "
                        f"{type(first_index).__name__}")
    if not 0 <= first_index <= MAX_IMAGE_INDEX - batch:
        raise ValueError(f"first_index must be in [0, 2^32 - B] = [0, {MAX_IMAGE_INDEX - batch}] "
                         f"(the image index is a 32-bit Philox counter word), got {first_index}")
    return first_index, None


def value_checks(in_kernel: bool, given, first_index, first_t, batch: int, *scalars) -> int:
    """The value checks of an op call's tensor arguments, in one place. in_kernel (the
    extension's kernel checks what it reads, checked_in_kernel): the `checks` bits to pass it,
    for `given` (the arguments as the caller gave them: t, t_prev, step, guidance_scale...) and
    first_index. Otherwise 0, after scalar_values has checked the device scalars here: an int64
    first_index and `scalars` ((name, tensor or None, lo, hi) items)."""
    if in_kernel:  # kernel_checks and values_checked, inline (on every call: ~0.6 us less)
        bits = 0
        for v in given:
            if isinstance(v, torch.Tensor):
                if v.is_meta:
                    return 0
                bits = CHECK_VALUES
        if first_t is not None and first_index.dtype == torch.int64:
            if first_t.is_meta:
                return 0
            bits |= CHECK_FIRST_INDEX
        if not bits or torch.compiler.is_compiling() or _TRUSTED.get() or _ENV_CHECKS() == "0":
            return 0
        return bits
    if first_t is not None or any(v is not None for _, v, _, _ in scalars):
        scalar_values(first_index_item(first_index, first_t, batch), *scalars)
    return 0


def first_index_item(first_index, first_t, batch: int):
    """The scalar_values item of a tensor first_index: an int64 one gets the range an int gets;
    a narrower integer tensor (int32...) is its 32-bit word, taken mod 2^32, so has none."""
    if first_t is None or first_index.dtype != torch.int64:
        return ("first_index", None, None, None)
    return ("first_index", first_t, 0, MAX_IMAGE_INDEX - batch)


_SCALARS = frozenset((int, float, bool, str, type(None)))


def run_op(op, body, *args):
    """op(*args), or its Python `body` called straight where that is the same thing: plain CPU/CUDA
    tensors, no autograd to record, no torch.compile tracing, no dispatch mode (FakeTensor,
    TorchDispatchMode) and no functorch transform. Going through the custom-op dispatcher costs
    ~15-20 µs of host time per call (this decision ~3 µs; measured on CPU with tiny tensors),
    which an eager loop not captured in a CUDA graph pays on every op. torch.compile, autograd,
    tensor subclasses and dispatch modes still see the op."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._get_tracing_state() is not None  # torch.jit.trace records the op
            or torch._C._functorch.get_dynamic_layer_stack_depth() > 0):  # vmap, grad...
        return op(*args)
    grad = torch.is_grad_enabled()
    for a in args:  # (the ops pass ~10-30 arguments: the scalars cost a set lookup each)
        ta = type(a)
        if ta in _SCALARS:
            continue
        if ta in _PLAIN:
            if not (a.is_cuda or a.is_cpu) or (grad and a.requires_grad):
                return op(*args)
        elif isinstance(a, torch.Tensor):  # a subclass
            return op(*args)
    return body(*args)


# bound once: each dotted lookup of a torch._C function costs ~0.05 us, and direct() runs on every
# call (torch.compiler.is_compiling stays first: Dynamo knows that function, not the others)
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_tracing_state = torch._C._get_tracing_state
_functorch_depth = torch._C._functorch.get_dynamic_layer_stack_depth
_grad_enabled = torch.is_grad_enabled


def direct(x: torch.Tensor, *others) -> bool:
    """Whether an op's Python body may be called straight instead of the custom op (run_op's
    rule, for a caller that names its tensor arguments): plain CPU/CUDA tensors, no autograd to
    record, no torch.compile tracing, no dispatch mode, no TorchScript trace, no functorch
    transform. x: the data, whose device stands for all (the ops check that the others, None
    entries skipped, are on it); the rest of the arguments are Python scalars/strings."""
    if (_is_compiling() or _dispatch_modes() or _tracing_state() is not None
            or _functorch_depth() or type(x) not in _PLAIN or not (x.is_cuda or x.is_cpu)):
        return False
    if _grad_enabled():
        if x.requires_grad:
            return False
        for a in others:
            if a is not None and (type(a) not in _PLAIN or a.requires_grad):
                return False
        return True
    for a in others:
        if a is not None and type(a) not in _PLAIN:
            return False
    return True


_SPARE = {}  # (dtype, device) -> a 0-element tensor; 0 elements: nothing ever writes it


def spare(x: torch.Tensor) -> torch.Tensor:
    """A shared 0-element tensor of x's dtype and device, for the outputs a call does not ask for
    (the kernels take an empty tensor for them): no allocation per call (~0.7 us). Only for an
    op body called straight (direct()): through the op (autograd, tracing, a dispatch mode) an
    output of its own is made, which autograd may mark or a trace may take."""
    key = (x.dtype, x.device)
    out = _SPARE.get(key)
    if out is None:
        with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
            out = torch.empty(0, dtype=x.dtype, device=x.device)
        if len(_SPARE) < 256:
            _SPARE[key] = out
    return out
