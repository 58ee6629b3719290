"""The `multistep` suite: one solver step, fastdiff.multistep_step against diffusers'
DPMSolverMultistepScheduler.step / UniPCMultistepScheduler.step and a plain PyTorch eager
expression of the same update (and torch.compile of it).

Each case is a mid-schedule step (step 10 of 20, history filled, every solver at full order):
DPM-Solver++ 2M, its SDE variant, and UniPC bh2 order 2 with its corrector (last_sample). The
SDE's noise as in the sampler_step suite: given (every row reads the same z: fastdiff as noise=,
diffusers as variance_noise) or drawn (fastdiff in the kernel from its seed, eager with
torch.randn_like, diffusers with its own randn_tensor, timed but not checked). The coefficient row is derived here in float64 from the scheduler's own sigmas
(its formulas, term by term), so every row, diffusers' included, is checked against the eager
expression before it is timed. On the pixel shape (C = 3) x0 is dynamically thresholded, as a
pixel model's scheduler config asks.

State: fastdiff updates the ring and last_sample in place. Each backend's row works on its own
copy of an input set's state, made at its first call (so the checked first call starts from the
same state as the eager row); later calls rewrite the same slots, which costs the same. The
diffusers rows reset the scheduler's counters and history list (host-side assignments, no tensor
work) before every call, so each call is the same step.
"""
from __future__ import annotations

import math

import torch

from .harness import Case, Impl
from .suites import _esize, _need, fastdiff_impls, suite

M_SHAPES = {"full": [(16, 4, 64, 64), (16, 3, 32, 32)],
            "quick": [(16, 4, 64, 64), (16, 3, 32, 32)],
            "tiny": [(2, 4, 8, 8), (2, 3, 8, 8)],
            "cpu": [(16, 4, 64, 64), (16, 3, 32, 32)]}
STEPS, STEP = 20, 10  # a mid-schedule step of a 20-step schedule
SEED = 1234
SCHED_KW = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                beta_end=0.012, prediction_type="epsilon")
THRESH = dict(thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=1.5)


def _alpha_sigma(s: float):
    alpha = 1.0 / math.sqrt(s * s + 1.0)
    return alpha, s * alpha


def _lam(s: float) -> float:
    a, sg = _alpha_sigma(s)
    return math.log(a) - math.log(sg)


def _row(variant: str, sigmas, i: int, K: int) -> dict:
    """The coefficient columns of step i, float64, from diffusers' formulas (see its
    multistep_dpm_solver_second_order_update and multistep_uni_{c,p}_bh_update). History x0_j
    lives in ring slot j % K."""
    s = [float(v) for v in sigmas]
    a_s0, sg_s0 = _alpha_sigma(s[i])
    a_t, sg_t = _alpha_sigma(s[i + 1])
    c = dict(alpha=a_s0, sigma=sg_s0)
    prev = (i - 1) % K  # slot of x0_{i-1}
    h = _lam(s[i + 1]) - _lam(s[i])
    if variant.startswith("DPM"):
        r0 = (_lam(s[i]) - _lam(s[i - 1])) / h
        if "SDE" in variant:
            e = 1.0 - math.exp(-2.0 * h)
            c.update(pred_y=sg_t / sg_s0 * math.exp(-h), pred_new=a_t * e * (1 + 0.5 / r0),
                     noise=sg_t * math.sqrt(e))
            c[f"pred_h{prev}"] = -0.5 * a_t * e / r0
        else:
            e = math.exp(-h) - 1.0
            c.update(pred_y=sg_t / sg_s0, pred_new=-a_t * e * (1 + 0.5 / r0))
            c[f"pred_h{prev}"] = 0.5 * a_t * e / r0
        return c
    # UniPC bh2, order 2: the corrector of step i (from x_{i-1}: last_sample), then the predictor
    a_c, sg_c = a_s0, sg_s0  # the corrector's t is this step's sigma
    _, sg_cs0 = _alpha_sigma(s[i - 1])
    hc = _lam(s[i]) - _lam(s[i - 1])
    r1 = (_lam(s[i - 2]) - _lam(s[i - 1])) / hc
    hh = -hc
    phi1 = math.expm1(hh)
    bh = math.expm1(hh)
    k1 = phi1 / hh - 1.0
    k2 = k1 / hh - 0.5
    b = torch.tensor([k1 / bh, k2 * 2.0 / bh], dtype=torch.float64)
    R = torch.tensor([[1.0, 1.0], [r1, 1.0]], dtype=torch.float64)
    rho = torch.linalg.solve(R, b).tolist()
    older = i % K  # slot of x0_{i-2}, which the new x0 replaces after this read
    c.update(corr_last=sg_c / sg_cs0, corr_new=-a_c * bh * rho[1])
    c[f"corr_h{prev}"] = -a_c * phi1 + a_c * bh * rho[0] / r1 + a_c * bh * rho[1]
    c[f"corr_h{older}"] = -a_c * bh * rho[0] / r1
    hp = -h
    phi1p = math.expm1(hp)
    r = (_lam(s[i - 1]) - _lam(s[i])) / h
    c.update(pred_y=sg_t / sg_s0, pred_new=-a_t * phi1p + 0.5 * a_t * phi1p / r)
    c[f"pred_h{prev}"] = -0.5 * a_t * phi1p / r
    return c


def _eager(c: dict, K: int, thresholding: bool, has_last: bool, has_noise: bool):
    """The update as plain PyTorch ops (nonzero terms only), float32 state: returns
    (x_prev, x0, y) without touching the inputs."""
    cols = {k: float(v) for k, v in c.items() if v != 0.0}

    def step(x, m, ring, last, z):
        xf, mf = x.float(), m.float()
        x0 = (xf - cols["sigma"] * mf) / cols["alpha"]
        if thresholding:
            a = x0.reshape(x0.shape[0], -1).abs()
            s = torch.quantile(a, THRESH["dynamic_thresholding_ratio"], dim=1)
            s = s.clamp(1.0, THRESH["sample_max_value"]).view(-1, *([1] * (x0.dim() - 1)))
            x0 = torch.clamp(x0, -s, s) / s
        y = xf
        if has_last:
            y = cols.get("corr_last", 0.0) * last + cols.get("corr_new", 0.0) * x0
            for k in range(K):
                if f"corr_h{k}" in cols:
                    y = y + cols[f"corr_h{k}"] * ring[k]
        out = cols["pred_y"] * y + cols["pred_new"] * x0
        for k in range(K):
            if f"pred_h{k}" in cols:
                out = out + cols[f"pred_h{k}"] * ring[k]
        if has_noise:
            out = out + cols["noise"] * z
        return out.to(x.dtype), x0, y
    return step


VARIANTS = {  # name: (K, diffusers class, its config, last_sample?, noise?)
    "DPM-Solver++ 2M": (1, "DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++",
                                                                solver_order=2), False, False),
    "DPM-Solver++ 2M SDE": (1, "DPMSolverMultistepScheduler",
                            dict(algorithm_type="sde-dpmsolver++", solver_order=2), False, True),
    "UniPC bh2 order 2 + corrector": (2, "UniPCMultistepScheduler",
                                      dict(solver_type="bh2", solver_order=2), True, False),
}


def _diffusers_step(sched, K: int, has_last: bool, has_noise: bool):
    """diffusers' step at STEP with the history of the input set: the scheduler's counters and
    history list are reset before each call (host work only), so every call is the same step."""
    t = sched.timesteps[STEP]
    order = sched.config.solver_order

    def step(x, m, ring, last, z):
        sched._step_index = STEP
        sched.lower_order_nums = order
        hist = [ring[(STEP - 1 - j) % K] if j < K else None for j in range(order)][::-1]
        sched.model_outputs = hist  # [..., x0_{i-2}, x0_{i-1}]
        if has_last:
            sched.last_sample = last
            sched.this_order = order
            sched.timestep_list = [sched.timesteps[STEP - order + j] for j in range(order)]
        kw = dict(variance_noise=z) if has_noise else {}
        return sched.step(m, t, x, return_dict=False, **kw)[0]
    return step


@suite("multistep", "multistep: one DPM-Solver++ / UniPC step at mid-schedule (history filled)",
       floor="read x_t, model_output (e each), the K ring slots and last_sample (4 bytes each); "
             "write x_prev (e), one ring slot and last_sample (4 each); read z (4) where the SDE's "
             "noise is given. Thresholding's quantile pass is not in the floor.")
def multistep_suite(ctx):
    multistep_step, implemented, NCOEF, COEFS = _need(
        "fastdiff.ops.multistep_step", "multistep_step", "IMPLEMENTED", "NCOEF", "COEFS")
    from fastdiff import backends
    from fastdiff.reference import STREAM_MULTISTEP, memory_order_normal
    # the schedules (sigmas) are diffusers' own: without diffusers the suite skips
    classes = dict(zip(("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"), _need(
        "diffusers", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler")))
    for dtype in ctx.dtypes_for([torch.float16, torch.float32], cpu=[torch.float32]):
        for shape in ctx.shapes(M_SHAPES):
            pixel = shape[1] == 3
            for variant, (K, cls, cfg, has_last, has_noise) in VARIANTS.items():
                sched = classes[cls](**SCHED_KW, **cfg, **(THRESH if pixel else {}))
                sched.set_timesteps(STEPS, device=ctx.device)
                cols = _row(variant, sched.sigmas.cpu(), STEP, K)
                table = torch.zeros(STEP + 1, NCOEF, dtype=torch.float64)
                for name, v in cols.items():
                    table[STEP, COEFS.index(name)] = v
                coefs = table.to(ctx.device)
                step_t = torch.tensor(STEP, device=ctx.device)
                eager = _eager(cols, K, pixel, has_last, has_noise)
                state = {}  # (backend, input set, noise drawn) -> its own ring / last_sample

                def fd(x, m, ring, last, z, drawn=False, state=state, coefs=coefs,
                       step_t=step_t, pixel=pixel):
                    key = (backends.requested(), id(ring), drawn)
                    st = state.get(key)
                    if st is None:
                        st = state[key] = (ring.clone(), None if last is None else last.clone())
                    return multistep_step(x, m, st[0], coefs, step_t, last_sample=st[1],
                                          noise=None if drawn else z,
                                          seed=SEED if drawn else None,
                                          **(THRESH if pixel else {}))

                def eager_drawn(x, m, ring, last, z, eager=eager):
                    z = torch.randn_like(x, dtype=torch.float32)
                    return eager(x, m, ring, last, z) + (z,)

                def with_eager_noise(inputs, out, eager=eager):  # the z it drew, returned last
                    return eager(*inputs[:4], out[-1])

                def with_kernel_noise(inputs, out, eager=eager):  # z: the kernel's own stream
                    return eager(*inputs)

                diffusers = _diffusers_step(sched, K, has_last, has_noise)
                given, _ = fastdiff_impls(ctx, "multistep_step", implemented, fd, dtype)
                given.append(Impl(f"diffusers {cls}.step", diffusers))
                modes = [("", given, eager, None)]
                if has_noise:  # as sampler_step: every row reads one z, or each draws its own
                    drawn, _ = fastdiff_impls(
                        ctx, "multistep_step", implemented,
                        lambda *a, fd=fd: fd(*a, drawn=True), dtype, expect=with_kernel_noise)
                    drawn.append(Impl(f"diffusers {cls}.step",
                                      lambda *a, d=diffusers: d(*a[:4], None), verify=False))
                    modes = [(", noise given", given, eager, None),
                             (", noise drawn", drawn, eager_drawn, with_eager_noise)]

                def inputs(K=K, has_last=has_last, has_noise=has_noise):
                    from fastdiff.ops.multistep_step import empty_ring
                    x = torch.randn(shape, device=ctx.device, dtype=dtype)
                    m = torch.randn(shape, device=ctx.device, dtype=dtype)
                    ring = empty_ring(x, K).normal_()
                    last = torch.randn(shape, device=ctx.device) if has_last else None
                    z = memory_order_normal(SEED, STEP, STREAM_MULTISTEP, x.float()) \
                        if has_noise else None
                    return x, m, ring, last, z

                e = _esize(dtype)
                n = math.prod(shape)
                for mode, impls, base, expect in modes:
                    nbytes = n * (3 * e + 4 * (K + 1) + (8 if has_last else 0)
                                  + (4 if mode == ", noise given" else 0))
                    case = Case("multistep",
                                variant + (" thresholding" if pixel else "") + mode, shape,
                                dtype, "NCHW", bytes=nbytes, expect=expect)
                    yield from ctx.run_case(case, inputs, impls, base)
