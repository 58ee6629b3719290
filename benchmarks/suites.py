"""The benchmark suites, registered by name. Each is a generator `fn(ctx)` yielding result rows.

A suite builds its cases (the shapes of /work/shared/anchors-h100.md), the obvious eager PyTorch
code for each (the harness adds torch.compile of that same function), one row per fastdiff
backend that can run here, and the other baselines (diffusers, torch SDPA backends), and hands
them to `ctx.run_case`. The op under test is imported inside its suite, so a missing op skips its
suite with the reason. End-to-end suites (U-Net forward, a full sampling loop against a diffusers
pipeline) register the same way: `@suite("unet", ...)`.

Shape tables have a "full" and "quick" set (GPU), "tiny" (the harness check on CPU) and "cpu":
the cases of the CPU side-by-side table that `benchmarks/run.py` prints on a machine without a
GPU (the issue-14 shapes). A suite without a "cpu" entry is skipped there, with that reason; give
it one (shapes a 2-core CPU runs in seconds) to put it in the CPU table, and `ctx.dtypes_for(gpu
dtypes, cpu=[...])` its CPU dtypes.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Callable

import torch
import torch.nn.functional as F

from .harness import Case, Ctx, Impl, SuiteSkip, reason  # noqa: F401 (SuiteSkip: re-exported)

SUITES: dict = {}


@dataclasses.dataclass
class Suite:
    name: str
    title: str
    floor: str
    metric: str  # "GB/s" or "TFLOP/s": the rate column of its tables
    fn: Callable


def suite(name, title, floor="", metric="GB/s"):
    def register(fn):
        SUITES[name] = Suite(name, title, floor, metric, fn)
        return fn
    return register


def _need(module: str, *names):
    try:
        mod = importlib.import_module(module)
        return [getattr(mod, n) for n in names]
    except (ImportError, AttributeError) as e:
        raise SuiteSkip(f"{module} not usable here ({reason(e)})") from None


def fastdiff_impls(ctx: Ctx, op: str, implemented, fn: Callable, dtype=None,
                   expect: Callable = None):
    """One Impl per fastdiff backend of `op` that runs on ctx.device, each forced with
    use_backend; the one `auto` picks for `dtype` is marked. The `torch` backend (the
    reference) is timed only when auto picks it. `expect`: see Impl. Returns (impls, auto)."""
    from fastdiff import backends
    auto = backends.pick(op, implemented, ctx.device, dtype)
    status = backends.backend_status()
    impls = []
    for b in implemented:
        name = f"fastdiff:{b}" + (" (auto)" if b == auto else "")
        if (b == "torch" and b != auto) or not backends._runs_on(b, ctx.device.type) \
                or (b == "triton" and not ctx.cuda):  # Triton's CPU interpreter is no benchmark
            continue
        ok, why = status[b]
        has = getattr(backends, "_extension_has", lambda op: True)
        if ok and b in ("cpu", "cuda") and not has(op):
            ok, why = False, f"the installed fastdiff._C has no {op} kernel (rebuild it)"
        if not ok:
            ctx.skip(op, "", name, why)
            continue
        impls.append(Impl(name, fn, "fastdiff", lambda b=b: backends.use_backend(b), expect))
    return impls, auto


def _esize(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _bcast(table, t):
    return table[t].view(-1, 1, 1, 1)


# -- q_sample -------------------------------------------------------------------------------
Q_SHAPES = {"full": [(256, 3, 32, 32), (64, 4, 64, 64), (32, 3, 256, 256)],
            "quick": [(256, 3, 32, 32), (32, 3, 256, 256)],
            "tiny": [(2, 3, 8, 8), (3, 4, 5, 7)],
            "cpu": [(16, 4, 64, 64)]}


@suite("q_sample", "q_sample: x_t = sqrt(ab[t]) x0 + sqrt(1 - ab[t]) eps (per-sample t)",
       floor="read x0 (and eps when given), write x_t (and eps when drawn): "
             "3 × numel × element size.")
def q_sample_suite(ctx: Ctx):
    q_sample, implemented = _need("fastdiff.ops.q_sample", "q_sample", "IMPLEMENTED")
    from fastdiff import Schedule
    sched = Schedule("linear", 1000)
    a32 = sched.table("sqrt_alphas_cumprod", ctx.device, torch.float32)
    s32 = sched.table("sqrt_one_minus_alphas_cumprod", ctx.device, torch.float32)

    def with_own_noise(inputs, out):  # noise drawn inside: the expression with that noise
        x0, t, _ = inputs
        return _bcast(a32, t) * x0.float() + _bcast(s32, t) * out[1].float()

    for dtype in ctx.dtypes_for([torch.float32, torch.bfloat16], cpu=[torch.float32]):
        given, _ = fastdiff_impls(ctx, "q_sample", implemented,
                                  lambda x0, t, eps: q_sample(x0, t, sched, noise=eps), dtype)
        drawn, _ = fastdiff_impls(ctx, "q_sample", implemented,
                                  lambda x0, t, eps: q_sample(x0, t, sched, seed=1234), dtype)
        # the tables in x's dtype, as diffusers' add_noise does
        a = sched.table("sqrt_alphas_cumprod", ctx.device, dtype)
        s = sched.table("sqrt_one_minus_alphas_cumprod", ctx.device, dtype)

        def eager_given(x0, t, eps):
            return _bcast(a, t) * x0 + _bcast(s, t) * eps

        def eager_drawn(x0, t, eps):
            eps = torch.randn_like(x0)
            return _bcast(a, t) * x0 + _bcast(s, t) * eps, eps

        for shape in ctx.shapes(Q_SHAPES):
            def inputs():
                return (torch.randn(shape, device=ctx.device, dtype=dtype),
                        torch.randint(0, 1000, (shape[0],), device=ctx.device),
                        torch.randn(shape, device=ctx.device, dtype=dtype))
            nbytes = 3 * math.prod(shape) * _esize(dtype)
            for variant, eager, impls, expect in (
                    ("eps given", eager_given, given, None),
                    ("eps drawn (eager: torch.randn_like)", eager_drawn, drawn, with_own_noise)):
                case = Case("q_sample", variant, shape, dtype, "NCHW", bytes=nbytes,
                            expect=expect)
                yield from ctx.run_case(case, inputs, impls, eager)


# -- sampler_step ---------------------------------------------------------------------------
S_SHAPES = {"full": [(256, 3, 32, 32), (16, 4, 64, 64), (16, 3, 256, 256)],
            "quick": [(256, 3, 32, 32), (16, 3, 256, 256)],
            "tiny": [(2, 3, 8, 8)],
            "cpu": [(16, 4, 64, 64)]}
T_STEP, DDIM_STEPS = 500, 50  # DDPM: t 500 -> 499; DDIM (50 of 1000 steps): 500 -> 480


@suite("sampler_step", "sampler_step: one reverse step, epsilon prediction, clip_sample",
       floor="read x_t and model_output (and z when given), write x_prev: 3 × numel × element "
             "size with the noise drawn, 4 × with it given. Noise given: every row reads the "
             "same z. Noise drawn: eager draws z with torch.randn_like, fastdiff in the kernel "
             "(Philox), diffusers with its own randn_tensor.")
def sampler_step_suite(ctx: Ctx):
    (sampler_step,) = _need("fastdiff.ops.sampler_step", "sampler_step")
    from fastdiff import Schedule, backends
    from fastdiff.reference import STREAM_SAMPLER_STEP, memory_order_normal
    mod = importlib.import_module("fastdiff.ops.sampler_step")
    implemented = getattr(mod, "IMPLEMENTED", backends.BACKENDS)
    sched = Schedule("linear", 1000)
    T = sched.num_train_timesteps
    ddim_gap = T // DDIM_STEPS
    try:
        from diffusers import DDIMScheduler, DDPMScheduler
        kw = dict(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                  clip_sample=True, prediction_type="epsilon")
        ddpm = DDPMScheduler(variance_type="fixed_small", **kw)
        ddim = DDIMScheduler(**kw)
        ddim.set_timesteps(DDIM_STEPS)
        diffusers_ok = True
    except Exception as e:  # noqa: BLE001 -- diffusers is optional
        ctx.skip("sampler_step", "", "diffusers", f"diffusers not importable ({reason(e)})")
        diffusers_ok = False

    variants = {
        "DDPM (fixed_small)": dict(
            gap=1, fd=dict(kind="ddpm", prediction_type="epsilon", variance_type="fixed_small",
                           clip_sample=True, seed=1234),
            diffusers=("diffusers DDPMScheduler.step",
                       lambda x, eps: ddpm.step(eps, T_STEP, x, return_dict=False))),
        "DDIM (eta=1)": dict(
            gap=ddim_gap, fd=dict(kind="ddim", prediction_type="epsilon", eta=1.0,
                                  clip_sample=True, seed=1234),
            diffusers=("diffusers DDIMScheduler.step(eta=1)",
                       lambda x, eps: ddim.step(eps, T_STEP, x, eta=1.0, return_dict=False))),
    }
    for dtype in ctx.dtypes_for([torch.float32]):
        f64 = dict(ab=sched.alphas_cumprod, sqrt_ab=sched.alphas_cumprod.sqrt(),
                   sqrt_1mab=(1 - sched.alphas_cumprod).sqrt(), c1=sched.posterior_mean_coef1,
                   c2=sched.posterior_mean_coef2,
                   sigma=sched.posterior_variance.clamp_min(1e-20).sqrt())
        tab = {k: v.to(ctx.device, dtype) for k, v in f64.items()}

        def g(name, t):
            return _bcast(tab[name], t)

        def ddpm_eager(x, eps, z, t, tp):
            x0 = ((x - g("sqrt_1mab", t) * eps) / g("sqrt_ab", t)).clamp(-1, 1)
            return g("c1", t) * x0 + g("c2", t) * x + g("sigma", t) * z

        def ddim_eager(x, eps, z, t, tp):
            ab_t, ab_p = g("ab", t), g("ab", tp)
            x0 = ((x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()).clamp(-1, 1)
            std = ((1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p)).sqrt()  # eta = 1
            return ab_p.sqrt() * x0 + (1 - ab_p - std ** 2).sqrt() * eps + std * z

        eagers = {"DDPM (fixed_small)": ddpm_eager, "DDIM (eta=1)": ddim_eager}
        for name, v in variants.items():
            kw = {k: a for k, a in v["fd"].items() if k != "seed"}

            def fd_given(x, eps, z, t, tp, kw=kw):
                return sampler_step(x, eps, t, tp, sched, noise=z, **kw)

            def fd_drawn(x, eps, z, t, tp, kw=v["fd"]):
                return sampler_step(x, eps, t, tp, sched, **kw)

            def with_own_noise(inputs, out, eager=eagers[name], seed=v["fd"]["seed"]):
                # the eager step with the z the kernel draws from its seed (stream, step = t)
                x, eps, _, t, tp = inputs
                return eager(x, eps, memory_order_normal(seed, t, STREAM_SAMPLER_STEP, x), t, tp)

            def eager_drawn(x, eps, z, t, tp, eager=eagers[name]):
                z = torch.randn_like(x)
                return eager(x, eps, z, t, tp), z

            def with_eager_noise(inputs, out, eager=eagers[name]):
                # eager / compile rows: the step with the z they drew (returned beside x_prev)
                x, eps, _, t, tp = inputs
                return eager(x, eps, out[1], t, tp)
            v["given"], _ = fastdiff_impls(ctx, "sampler_step", implemented, fd_given, dtype)
            v["drawn"], _ = fastdiff_impls(ctx, "sampler_step", implemented, fd_drawn, dtype,
                                           expect=with_own_noise)
            v["eager_drawn"], v["eager_expect"] = eager_drawn, with_eager_noise
            if diffusers_ok:  # draws its own z: timed, not checked
                dname, step = v["diffusers"]
                v["drawn"].append(Impl(dname, lambda x, eps, z, t, tp, step=step: step(x, eps),
                                       verify=False))
        for shape in ctx.shapes(S_SHAPES):
            numel = math.prod(shape)
            for variant, v in variants.items():
                def inputs(gap=v["gap"]):
                    t = torch.full((shape[0],), T_STEP, device=ctx.device, dtype=torch.int64)
                    return tuple(torch.randn(shape, device=ctx.device, dtype=dtype)
                                 for _ in range(3)) + (t, t - gap)
                for noise, impls, eager, n, expect in (
                        ("noise given", v["given"], eagers[variant], 4, None),
                        ("noise drawn", v["drawn"], v["eager_drawn"], 3, v["eager_expect"])):
                    case = Case("sampler_step", f"{variant}, {noise}", shape, dtype, "NCHW",
                                bytes=n * numel * _esize(dtype), expect=expect)
                    yield from ctx.run_case(case, inputs, impls, eager)


# -- group_norm_silu ------------------------------------------------------------------------
G_SHAPES = {"full": [(256, 128, 32, 32), (256, 256, 16, 16), (2, 320, 64, 64), (2, 640, 32, 32),
                     (8, 128, 256, 256)],
            "quick": [(256, 128, 32, 32), (2, 320, 64, 64)],
            "tiny": [(2, 32, 4, 4), (1, 64, 3, 5)],
            "cpu": [(16, 128, 32, 32), (2, 320, 64, 64)]}


@suite("group_norm_silu", "group_norm_silu: SiLU(GroupNorm(x)), 32 groups, NCHW and channels_last",
       floor="read x once, write y once: 2 × numel × element size.")
def group_norm_silu_suite(ctx: Ctx):
    gns, implemented = _need("fastdiff.ops.group_norm_silu", "group_norm_silu", "IMPLEMENTED")
    G = 32

    def eager(x, w, b):
        return F.silu(F.group_norm(x, G, w, b))

    for dtype in ctx.dtypes_for([torch.float16, torch.bfloat16],
                                cpu=[torch.float32, torch.bfloat16]):
        impls, _ = fastdiff_impls(ctx, "group_norm_silu", implemented,
                                  lambda x, w, b: gns(x, w, b, G), dtype)
        for shape in ctx.shapes(G_SHAPES):
            for layout, fmt in (("NCHW", torch.contiguous_format), ("NHWC", torch.channels_last)):
                def inputs():
                    C = shape[1]
                    return (torch.randn(shape, device=ctx.device, dtype=dtype)
                            .contiguous(memory_format=fmt),
                            1 + 0.1 * torch.randn(C, device=ctx.device, dtype=dtype),
                            0.1 * torch.randn(C, device=ctx.device, dtype=dtype))
                case = Case("group_norm_silu", "", shape, dtype, layout,
                            bytes=2 * math.prod(shape) * _esize(dtype))
                yield from ctx.run_case(case, inputs, impls, eager)


# -- attention ------------------------------------------------------------------------------
A_SHAPES = {"full": [(256, 1, 256, 256), (16, 1, 1024, 128), (8, 8, 4096, 40), (8, 8, 1024, 80),
                     (8, 8, 4096, 64)],
            "quick": [(256, 1, 256, 256), (8, 8, 4096, 40)],
            "tiny": [(2, 1, 16, 32), (1, 2, 9, 40)],
            "cpu": [(2, 8, 1024, 40)]}
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


@suite("attention", "attention: softmax(q kᵀ / sqrt(D)) v, q k v (B, H, L, D), self-attention",
       floor="max(read q, k, v + write o ÷ copy bandwidth, 4·B·H·L²·D FLOPs ÷ matmul rate). "
             "eager = F.scaled_dot_product_attention with torch's own backend choice.",
       metric="TFLOP/s")
def attention_suite(ctx: Ctx):
    attention, implemented = _need("fastdiff.ops.attention", "attention", "IMPLEMENTED")
    sdpa_impls = []
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for name in SDPA_BACKENDS:
            if hasattr(SDPBackend, name):
                sdpa_impls.append(Impl(f"sdpa:{name}", sdpa, "other",
                                       lambda be=getattr(SDPBackend, name): sdpa_kernel(be)))
            else:
                ctx.skip("attention", "", f"sdpa:{name}", "not in this torch's SDPBackend")
    except ImportError as e:
        ctx.skip("attention", "", "sdpa backends", reason(e))
    for dtype in ctx.dtypes_for([torch.float16], cpu=[torch.float32]):
        impls, _ = fastdiff_impls(ctx, "attention", implemented,
                                  lambda q, k, v: attention(q, k, v), dtype)
        impls += sdpa_impls
        for B, H, L, D in ctx.shapes(A_SHAPES):
            def inputs():
                return tuple(torch.randn(B, H, L, D, device=ctx.device, dtype=dtype)
                             for _ in range(3))
            case = Case("attention", "", (B, H, L, D), dtype, "BHLD",
                        bytes=4 * B * H * L * D * _esize(dtype), flops=4 * B * H * L * L * D)
            yield from ctx.run_case(case, inputs, impls, sdpa)


# -- the U-Net attention block --------------------------------------------------------------
BLOCK_SHAPES = {"full": [(256, 256, 16, 16, 1, 256), (2, 320, 64, 64, 8, 40)],
                "quick": [(256, 256, 16, 16, 1, 256), (2, 320, 64, 64, 8, 40)],
                "tiny": [(2, 64, 4, 4, 1, 64), (1, 64, 3, 5, 2, 32)],
                "cpu": [(2, 320, 32, 32, 8, 40)]}  # B, C, H, W, heads, dh


@suite("attention_block",
       "U-Net attention block: x + to_out(attention(qkv(GroupNorm(x)))) "
       "(CIFAR: B256 C256 16×16, 1 head of 256; SD-1.5-like: B2 C320 64×64, 8 heads of 40)",
       floor="max(read x + write y ÷ copy bandwidth, FLOPs ÷ matmul rate), FLOPs = q/k/v/out "
             "projections 8·B·L·C·heads·dh + attention 4·B·heads·L²·dh. eager = the same block "
             "written with F.group_norm, F.linear and F.scaled_dot_product_attention.",
       metric="TFLOP/s")
def attention_block_suite(ctx: Ctx):
    (AttentionBlock,) = _need("fastdiff.nn", "AttentionBlock")
    try:
        from diffusers.models.attention_processor import Attention
    except Exception as e:  # noqa: BLE001 -- diffusers is optional
        Attention = None
        ctx.skip("attention_block", "", "diffusers Attention", f"not importable ({reason(e)})")
    for dtype in ctx.dtypes_for([torch.float16], cpu=[torch.float32]):
        for B, C, H, W, heads, dh in ctx.shapes(BLOCK_SHAPES):
            kw = dict(device=ctx.device, dtype=dtype)
            if Attention is not None:
                ref = Attention(query_dim=C, heads=heads, dim_head=dh, norm_num_groups=32, eps=1e-5,
                                residual_connection=True, bias=True, upcast_softmax=True,
                                _from_deprecated_attn_block=True).to(**kw).eval()
                blk = AttentionBlock.from_diffusers(ref).eval()
            else:
                ref, blk = None, AttentionBlock(C, heads=heads, dim_head=dh, **kw).eval()
            with torch.no_grad():  # non-trivial norm parameters (diffusers starts at 1, 0)
                blk.group_norm.weight.normal_(1, 0.1)
                blk.group_norm.bias.normal_(0, 0.1)
                if ref is not None:
                    ref.load_state_dict(blk.state_dict())

            def eager(x, blk=blk):
                B, C, H, W = x.shape
                gn = blk.group_norm
                h = F.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps)
                h = h.flatten(2).transpose(1, 2)  # (B, L, C)
                q, k, v = (F.linear(h, m.weight, m.bias).view(B, H * W, heads, dh).transpose(1, 2)
                           for m in (blk.to_q, blk.to_k, blk.to_v))
                o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, -1)
                y = F.linear(o, blk.to_out[0].weight, blk.to_out[0].bias)
                return x + y.transpose(1, 2).reshape(B, C, H, W)

            L, inner = H * W, heads * dh
            flops = 8 * B * L * C * inner + 4 * B * heads * L * L * dh
            for layout, fmt in (("NCHW", torch.contiguous_format), ("NHWC", torch.channels_last)):
                def inputs():
                    return (torch.randn(B, C, H, W, **kw).contiguous(memory_format=fmt),)
                impls = [Impl("fastdiff AttentionBlock", blk, "fastdiff")]
                if ref is not None and layout == "NCHW":  # diffusers' processor views x as NCHW
                    impls.append(Impl("diffusers Attention", ref))
                case = Case("attention_block", "", (B, C, H, W), dtype, layout,
                            bytes=2 * B * C * L * _esize(dtype), flops=flops)
                yield from ctx.run_case(case, inputs, impls, eager)


from . import suites_optimize  # noqa: E402,F401  (registers the `optimize` suite)
from . import suites_unet  # noqa: E402,F401  (registers the unet suite)
from . import suites_sampling  # noqa: E402,F401  (the `sampling` suite: whole loops)
from . import suites_train  # noqa: E402,F401  (registers the "train" suite)
from . import suites_multistep  # noqa: E402,F401  (the `multistep` suite: one solver step)
