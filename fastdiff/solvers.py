"""Schedules and per-step coefficient tables of the multistep solvers (DPM-Solver++, UniPC).

Two halves:

1. `multistep_schedule`: the timesteps and sigmas of diffusers 0.42.1's
   DPMSolverMultistepScheduler / UniPCMultistepScheduler `set_timesteps`, bit for bit: the same
   float32 torch betas and alphas_cumprod, the same numpy steps for every spacing (linspace,
   leading, trailing), Karras sigmas, final_sigmas_type and lambda_min_clipped. The sigmas are
   the scheduler's float32 values; everything after them is float64.

2. `dpmsolver_table` / `unipc_table`: one row per solver step, the columns of
   `fastdiff.ops.multistep_step.COEFS`, for `fastdiff.multistep_step`, which per element computes

       x0_new = x0 from the model output with (alpha, sigma) of this step
       y      = corr_x x_t + corr_last x_last + corr_new x0_new + sum_k corr_hk ring[k]
       x_prev = pred_y y + pred_new x0_new + sum_k pred_hk ring[k] + noise z

   and then writes x0_new to ring slot `step % K` (K = solver_order): the x0 of step s lives in
   slot s % K, so the column of an earlier x0 is fixed by the host here. All of it is computed
   in float64 from the float32 sigmas (diffusers computes the same numbers in float32; lambda
   differences and the phi functions lose up to ~1e-5 relative there).

Notation: step i goes from sigmas[i] to sigmas[i + 1]; alpha_i = 1 / sqrt(1 + s_i^2),
sigma_i = s_i alpha_i, lambda_i = log(alpha_i / sigma_i) = -log(s_i); m_j is the x0 prediction
of step j.

Orders as diffusers: order min(solver_order, i + 1) at step i (warm-up), and with
lower_order_final the last steps drop order (DPM-Solver++: under 15 steps, the last step order 1
and the one before at most 2; the last step is order 1 also with euler_at_final or a zero final
sigma. UniPC: the order at step i is at most n - i).

Where diffusers 0.42.1 breaks, these tables do not (see `unipc_table`): a step to a zero final
sigma has lambda = inf, h = inf. UniPC's bh1 has B(h) = -h = -inf and multiplies it by a zero
sum at order 1 (NaN); at order >= 2 the ratios r_k = (lambda_k - lambda_i) / h are 0, the
order-3 predictor solves a singular system, and the order-2 one divides by r = 0 (inf).
The polynomial terms have no finite limit there (their weights grow without bound with h, the
linear one like h / (lambda_i - lambda_{i-1}): extrapolating x0 in lambda out to lambda = inf),
so a step to sigma = 0 is order 1 for UniPC too — exactly what DPM-Solver++ does with a zero
final sigma — and its limit is taken analytically: x_prev = x0_new (sigma_t / sigma_s = 0,
alpha_t = 1, -expm1(-h) = 1), the B(h) term dropped since it multiplies nothing. A repeated
last sigma (diffusers' trailing spacing can end on timestep -1, whose sigma is sigma_min) is
h = 0: that step is the identity, its limit (and diffusers' result where it stays finite).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from .ops.multistep_step import COEFS, MAX_ORDER, NCOEF
from .schedule import BETA_SCHEDULES, Schedule

_COL = {name: i for i, name in enumerate(COEFS)}

SPACINGS = ("linspace", "leading", "trailing")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++")
DPM_SOLVER_TYPES = ("midpoint", "heun")
UNIPC_SOLVER_TYPES = ("bh1", "bh2")


# -- the schedule ---------------------------------------------------------------------------------
def _rescale_zero_terminal_snr_f32(betas: torch.Tensor) -> torch.Tensor:
    """diffusers' rescale_zero_terminal_snr, on its float32 betas (the float32 steps matter)."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    a0, aT = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt -= aT
    abar_sqrt *= a0 / (a0 - aT)
    abar = abar_sqrt ** 2
    return 1 - torch.cat([abar[0:1], abar[1:] / abar[:-1]])


def multistep_alphas_cumprod(beta_schedule: str = "linear", num_train_timesteps: int = 1000,
                             beta_start: float = 0.0001, beta_end: float = 0.02,
                             trained_betas=None, rescale_betas_zero_snr: bool = False
                             ) -> torch.Tensor:
    """alphas_cumprod (float32, CPU) as diffusers' multistep schedulers compute it. "sigmoid"
    and "laplace" (not offered by those schedulers) come from fastdiff.Schedule's float64 betas,
    rounded to float32 and multiplied in float32 like the others."""
    T = num_train_timesteps
    if trained_betas is not None:
        betas = torch.tensor(np.asarray(trained_betas, dtype=np.float64).tolist(),
                             dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float32) ** 2
    elif beta_schedule in BETA_SCHEDULES:  # squaredcos_cap_v2: python floats -> float32, as there
        betas = Schedule(beta_schedule, T, beta_start, beta_end).betas.to(torch.float32)
    else:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
    if rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr_f32(betas)
    ac = torch.cumprod(1.0 - betas, dim=0)
    if rescale_betas_zero_snr:
        ac[-1] = 2 ** -24  # diffusers: a finite sigma at t = T - 1
    return ac


def _sigma_to_t(sigma, log_sigmas):
    """diffusers' _sigma_to_t, step for step (its numpy dtypes decide the rounding)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


def multistep_schedule(alphas_cumprod: torch.Tensor, num_inference_steps: int, *,
                       flavor: str = "dpmsolver", timestep_spacing: str = "linspace",
                       steps_offset: int = 0, use_karras_sigmas: bool = False,
                       final_sigmas_type: str = "zero", lambda_min_clipped: float = -math.inf,
                       sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
                       round_karras_timesteps: bool = True):
    """(timesteps int64 (n,), sigmas float32 (n + 1,)) numpy arrays, as diffusers' set_timesteps
    of DPMSolverMultistepScheduler (flavor "dpmsolver") or UniPCMultistepScheduler ("unipc").

    The flavors differ in three places: DPM-Solver clips the last timestep by
    lambda_min_clipped; its Karras timesteps stay unrounded for squaredcos_cap_v2
    (round_karras_timesteps=False, then truncated to int64 as torch does); UniPC's Karras final
    sigma_min is the last Karras sigma, DPM-Solver's sqrt((1 - ab_0) / ab_0). n may come out one
    larger than asked (trailing spacing, diffusers' np.arange): len(timesteps) is the truth."""
    if flavor not in ("dpmsolver", "unipc"):
        raise ValueError(f"flavor must be 'dpmsolver' or 'unipc', got {flavor!r}")
    if timestep_spacing not in SPACINGS:
        raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {timestep_spacing!r}")
    if final_sigmas_type not in FINAL_SIGMAS_TYPES:
        raise ValueError(f"final_sigmas_type must be one of {FINAL_SIGMAS_TYPES}, got "
                         f"{final_sigmas_type!r}")
    ac = alphas_cumprod
    T = len(ac)
    n = num_inference_steps
    last = T
    if flavor == "dpmsolver":
        lambda_t = torch.log(torch.sqrt(ac)) - torch.log(torch.sqrt(1 - ac))
        clipped = torch.searchsorted(torch.flip(lambda_t, [0]), lambda_min_clipped)
        last = int((T - clipped).numpy().item())
    if timestep_spacing == "linspace":
        ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif timestep_spacing == "leading":
        ratio = last // (n + 1)
        ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
        ts += steps_offset
    else:
        ts = np.arange(last, 0, -T / n).round().copy().astype(np.int64)
        ts -= 1
    sigmas = (((1 - ac) / ac) ** 0.5).numpy()
    sigma_min_table = float((((1 - ac[0]) / ac[0]) ** 0.5).item())
    if use_karras_sigmas:
        log_sigmas = np.log(sigmas)
        flipped = np.flip(sigmas).copy()
        lo = sigma_min if sigma_min is not None else flipped[-1].item()
        hi = sigma_max if sigma_max is not None else flipped[0].item()
        rho = 7.0
        ramp = np.linspace(0, 1, n)
        min_inv_rho, max_inv_rho = lo ** (1 / rho), hi ** (1 / rho)
        sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
        ts = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        if round_karras_timesteps:
            ts = ts.round()
        ts = ts.astype(np.int64)
        if final_sigmas_type == "zero":
            sigma_last = 0.0
        else:
            sigma_last = sigmas[-1] if flavor == "unipc" else sigma_min_table
    else:
        sigmas = np.interp(ts, np.arange(0, len(sigmas)), sigmas)
        sigma_last = 0.0 if final_sigmas_type == "zero" else sigma_min_table
    sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
    return ts.astype(np.int64), sigmas


def _alpha_sigma_lambda(sigmas32: np.ndarray):
    """float64 alpha, sigma, lambda of the float32 sigmas (s = 0: alpha 1, sigma 0, lambda inf)."""
    s = sigmas32.astype(np.float64)
    alpha = 1.0 / np.sqrt(s * s + 1.0)
    with np.errstate(divide="ignore"):
        lam = -np.log(s)
    return alpha, s * alpha, lam


def check_sigmas(sigmas32: np.ndarray, what: str = "num_inference_steps"):
    """Solver steps need distinct, finite sigmas: a repeated one (too many steps for the
    spacing) is h = 0, and the step after it would divide by it. One exception, diffusers'
    own: trailing spacing with an extra timestep -1 and final_sigmas_type "sigma_min" repeats
    the last sigma; that last step is the identity (its limit h -> 0, and diffusers' result).
    (Increasing sigmas are allowed: zero-terminal-SNR schedules have them at the first steps,
    and diffusers steps through them.)"""
    d = np.diff(sigmas32.astype(np.float64))
    bad = (d == 0) | ~np.isfinite(d)
    bad[-1] = not np.isfinite(d[-1])
    if np.any(bad):
        k = int(np.argmax(bad))
        raise ValueError(f"{what}: the schedule repeats a noise level (sigmas[{k}] = "
                         f"{float(sigmas32[k])!r}, sigmas[{k + 1}] = {float(sigmas32[k + 1])!r}); "
                         f"use fewer steps or another timestep_spacing")


def _check_order(solver_order):
    if isinstance(solver_order, bool) or not isinstance(solver_order, (int, np.integer)) \
            or not 1 <= solver_order <= MAX_ORDER:
        raise ValueError(f"solver_order must be an int in [1, {MAX_ORDER}], got {solver_order!r}")
    return int(solver_order)


def _place(row: np.ndarray, prefix: str, i: int, coefs: dict, K: int):
    """Put the weights of m_{i - j} (coefs[j]) into row: j = 0 -> <prefix>_new, j >= 1 -> the
    ring slot (i - j) % K where step i - j wrote it."""
    for j, c in coefs.items():
        if c == 0.0:
            continue
        if j == 0:
            row[_COL[f"{prefix}_new"]] += c
        else:
            if j > i or j > K:
                raise AssertionError(f"step {i}: x0 of step {i - j} is not in a ring of {K}")
            row[_COL[f"{prefix}_h{(i - j) % K}"]] += c


# -- DPM-Solver++ ---------------------------------------------------------------------------------
def _degenerate_step(row, sig_s: float, sig_t: float, a_t: float) -> bool:
    """The predictor of a step whose h is not finite and positive, written into `row`: to sigma
    = 0 (order 1 there) h = inf and x_prev = alpha_t x0_new; sigma_t = sigma_s (only a last step,
    check_sigmas) h = 0 and the step is the identity. False for every other step."""
    if sig_t == 0.0:
        row[_COL["pred_y"]], row[_COL["pred_new"]] = 0.0, a_t
        return True
    if sig_t == sig_s:
        row[_COL["pred_y"]] = 1.0
        return True
    return False


def dpmsolver_orders(n: int, solver_order: int, lower_order_final: bool = True,
                     euler_at_final: bool = False, final_sigmas_type: str = "zero") -> list[int]:
    """The order of each of n steps, diffusers' DPMSolverMultistepScheduler.step logic."""
    orders = []
    for i in range(n):
        done = min(i, solver_order)  # lower_order_nums
        final = i == n - 1 and (euler_at_final or (lower_order_final and n < 15)
                                or final_sigmas_type == "zero")
        second = i == n - 2 and lower_order_final and n < 15
        if solver_order == 1 or done < 1 or final:
            orders.append(1)
        elif solver_order == 2 or done < 2 or second:
            orders.append(2)
        else:
            orders.append(3)
    return orders


def dpmsolver_table(sigmas32: np.ndarray, *, solver_order: int = 2,
                    algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint",
                    lower_order_final: bool = True, euler_at_final: bool = False,
                    final_sigmas_type: str = "zero"):
    """(coefs float64 (n, NCOEF), orders) of multistep DPM-Solver++ (Lu et al. 2022), data
    prediction, ODE ("dpmsolver++") or SDE ("sde-dpmsolver++", the noise column
    sigma_t sqrt(1 - e^{-2h})), over the n + 1 sigmas. No corrector: corr_x = 1."""
    check_sigmas(sigmas32, "sigmas")
    n = len(sigmas32) - 1
    K = _check_order(solver_order)
    alpha, sig, lam = _alpha_sigma_lambda(sigmas32)
    orders = dpmsolver_orders(n, solver_order, lower_order_final, euler_at_final,
                              final_sigmas_type)
    sde = algorithm_type == "sde-dpmsolver++"
    table = np.zeros((n, NCOEF))
    for i, p in enumerate(orders):
        row = table[i]
        row[_COL["alpha"]], row[_COL["sigma"]], row[_COL["corr_x"]] = alpha[i], sig[i], 1.0
        a_t = alpha[i + 1]
        if _degenerate_step(row, sig[i], sig[i + 1], a_t):
            continue
        h = lam[i + 1] - lam[i]
        if sde:
            em2 = -math.expm1(-2.0 * h)                      # 1 - e^{-2h}
            row[_COL["pred_y"]] = sig[i + 1] / sig[i] * math.exp(-h)
            row[_COL["noise"]] = sig[i + 1] * math.sqrt(em2)
            c0 = a_t * em2
            c1_mid, c1_heun = 0.5 * c0, a_t * (1.0 - em2 / (2.0 * h))
            c2 = a_t * ((em2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
        else:
            em = -math.expm1(-h)                             # 1 - e^{-h}
            row[_COL["pred_y"]] = sig[i + 1] / sig[i]
            c0 = a_t * em
            c1_mid, c1_heun = 0.5 * c0, a_t * (1.0 - em / h)
            c2 = -a_t * ((h - em) / h ** 2 - 0.5)
        w = {0: c0}                                          # weights of m_{i - j}
        if p == 2:
            r0 = (lam[i] - lam[i - 1]) / h
            c1 = c1_mid if solver_type == "midpoint" else c1_heun
            w[0] += c1 / r0                                  # D1 = (m0 - m1) / r0
            w[1] = -c1 / r0
        elif p == 3:
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            # D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1, as vectors over (m0, m1, m2)
            d10 = np.array([1.0 / r0, -1.0 / r0, 0.0])
            d11 = np.array([0.0, 1.0 / r1, -1.0 / r1])
            d1 = d10 + r0 / (r0 + r1) * (d10 - d11)
            d2 = (d10 - d11) / (r0 + r1)
            v = c1_heun * d1 + c2 * d2                       # order 3 uses the heun-form c1
            w = {0: c0 + v[0], 1: v[1], 2: v[2]}
        _place(row, "pred", i, w, K)
    return table, orders


# -- UniPC ----------------------------------------------------------------------------------------
def _unipc_rhos(rks: Sequence[float], hh: float, B_h: float, order: int, predictor: bool):
    """UniPC's rho vector (Zhao et al. 2023, diffusers' multistep_uni_p/c_bh_update), float64:
    R[j] = rks^j, b[j] = (j + 1)! phi_{j+2}(hh) hh / B_h built by diffusers' recursion; the
    predictor of order 2 and the corrector of order 1 use the fixed 0.5."""
    if predictor and order == 2:
        return np.array([0.5])
    if not predictor and order == 1:
        return np.array([0.5])
    rks = np.asarray(list(rks) + [1.0], dtype=np.float64)
    h_phi_k = math.expm1(hh) / hh - 1.0
    fact = 1
    R, b = [], []
    for j in range(1, order + 1):
        R.append(rks ** (j - 1))
        b.append(h_phi_k * fact / B_h)
        fact *= j + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    R, b = np.stack(R), np.array(b)
    if predictor:
        R, b = R[:-1, :-1], b[:-1]
    return np.linalg.solve(R, b)


def unipc_orders(n: int, solver_order: int, lower_order_final: bool = True,
                 sigmas32: Optional[np.ndarray] = None) -> list[int]:
    """The predictor order of each of n steps, diffusers' UniPCMultistepScheduler.step logic,
    plus order 1 for a step to sigma = 0 (see the module docstring)."""
    orders = []
    for i in range(n):
        p = min(solver_order, n - i) if lower_order_final else solver_order
        p = min(p, min(i, solver_order) + 1)
        if sigmas32 is not None and sigmas32[i + 1] == 0:
            p = 1
        orders.append(p)
    return orders


def unipc_table(sigmas32: np.ndarray, *, solver_order: int = 2, solver_type: str = "bh2",
                lower_order_final: bool = True, disable_corrector: Sequence[int] = ()):
    """(coefs float64 (n, NCOEF), orders) of UniPC with B(h) = h (bh1) or e^h - 1 (bh2), data
    prediction: the UniP predictor of step i and the UniC corrector of step i - 1's result
    (using this step's x0: applied at the start of step i, to x_t, with x_last the previous
    step's corrected input), so one launch per step does both. The corrector is skipped at step
    0 and at step i when i - 1 is in disable_corrector (corr_x = 1 there).

    Differences from diffusers 0.42.1, where it fails: a step to sigma = 0 is order 1 and its
    B(h) term is dropped (its limit: x_prev = x0_new); diffusers gives NaN (bh1, -inf * 0) or
    a singular solve / inf (order >= 2 with lower_order_final=False)."""
    check_sigmas(sigmas32, "sigmas")
    n = len(sigmas32) - 1
    K = _check_order(solver_order)
    alpha, sig, lam = _alpha_sigma_lambda(sigmas32)
    orders = unipc_orders(n, solver_order, lower_order_final, sigmas32)
    disabled = {int(d) for d in disable_corrector}
    bh1 = solver_type == "bh1"
    table = np.zeros((n, NCOEF))
    for i, p in enumerate(orders):
        row = table[i]
        row[_COL["alpha"]], row[_COL["sigma"]] = alpha[i], sig[i]
        # corrector: y = UniC(x_last = corrected x_{i-1}, m_{i-1}.., m_i) of order orders[i-1]
        if i == 0 or (i - 1) in disabled:
            row[_COL["corr_x"]] = 1.0
        else:
            q, s0 = orders[i - 1], i - 1
            h = lam[i] - lam[s0]
            hh = -h
            h_phi_1 = math.expm1(hh)
            B_h = hh if bh1 else math.expm1(hh)
            rks = [(lam[s0 - k] - lam[s0]) / h for k in range(1, q)]
            rhos = _unipc_rhos(rks, hh, B_h, q, predictor=False)
            a_t = alpha[i]
            row[_COL["corr_last"]] = sig[i] / sig[s0]
            w = {0: -a_t * B_h * rhos[-1],                   # m_i - m_{i-1}, weight rho_last
                 1: -a_t * h_phi_1 + a_t * B_h * rhos[-1]}
            for k, rk in enumerate(rks, start=1):            # D1_k = (m_{i-1-k} - m_{i-1}) / r_k
                w[1] += a_t * B_h * rhos[k - 1] / rk
                w[1 + k] = -a_t * B_h * rhos[k - 1] / rk
            _place(row, "corr", i, w, K)
        # predictor: x_{i+1} = UniP(y, m_i, m_{i-1}, ..) of order p
        a_t = alpha[i + 1]
        if _degenerate_step(row, sig[i], sig[i + 1], a_t):
            continue
        h = lam[i + 1] - lam[i]
        hh = -h
        h_phi_1 = math.expm1(hh)
        B_h = hh if bh1 else math.expm1(hh)
        row[_COL["pred_y"]] = sig[i + 1] / sig[i]
        w = {0: -a_t * h_phi_1}
        if p > 1:
            rks = [(lam[i - k] - lam[i]) / h for k in range(1, p)]
            rhos = _unipc_rhos(rks, hh, B_h, p, predictor=True)
            for k, rk in enumerate(rks, start=1):            # D1_k = (m_{i-k} - m_i) / r_k
                w[0] += a_t * B_h * rhos[k - 1] / rk
                w[k] = -a_t * B_h * rhos[k - 1] / rk
        _place(row, "pred", i, w, K)
    return table, orders
