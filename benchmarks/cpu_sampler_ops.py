"""CPU timing of q_sample and sampler_step against PyTorch eager and diffusers (issue 14's rows).

    python benchmarks/cpu_sampler_ops.py [--threads 2] [--calls 60]

Min of `calls` calls after warm-up (baseline and fastdiff called in turn), with
torch.set_num_threads(threads); prints a markdown table.
"""
import argparse
import time

import torch

import fastdiff


def bench(fns, calls):
    """Min ms of each function over `calls` calls, the functions called in turn (so that a busy
    moment of a shared machine hits all of them alike)."""
    for f in fns:
        for _ in range(5):
            f()
    best = [float("inf")] * len(fns)
    for _ in range(calls):
        for k, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t0)
    return [b * 1e3 for b in best]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import DDIMScheduler, DDPMScheduler
    import fastdiff._C as C
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"fastdiff CPU kernels {C.cpu_capability()}")
    sched = fastdiff.Schedule("linear", 1000)
    shape = (16, 4, 64, 64)
    x0 = torch.randn(shape)
    t = torch.randint(0, 1000, (16,))
    sa = sched.table("sqrt_alphas_cumprod", "cpu", torch.float32)[t].view(-1, 1, 1, 1)
    s1 = sched.table("sqrt_one_minus_alphas_cumprod", "cpu", torch.float32)[t].view(-1, 1, 1, 1)
    rows = []

    def eager_q():
        eps = torch.randn_like(x0)
        return sa * x0 + s1 * eps, eps
    rows.append(("q_sample (16,4,64,64) noise drawn", *bench(
        [eager_q, lambda: fastdiff.q_sample(x0, t, sched, seed=1)], args.calls), "eager"))

    kw = dict(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    ddpm, ddim = DDPMScheduler(**kw), DDIMScheduler(**kw)
    ddim.set_timesteps(50)
    x, eps = torch.randn(shape), torch.randn(shape)
    for name, step, fd in (
            ("DDPM step (16,4,64,64)", lambda: ddpm.step(eps, 500, x),
             lambda: fastdiff.sampler_step(x, eps, 500, 499, sched, clip_sample=True, seed=1)),
            ("DDIM step eta=1 (16,4,64,64)", lambda: ddim.step(eps, 500, x, eta=1.0),
             lambda: fastdiff.sampler_step(x, eps, 500, 480, sched, kind="ddim", eta=1.0,
                                           clip_sample=True, seed=1)),
            ("DDIM step eta=0 (16,4,64,64)", lambda: ddim.step(eps, 500, x, eta=0.0),
             lambda: fastdiff.sampler_step(x, eps, 500, 480, sched, kind="ddim",
                                           clip_sample=True))):
        rows.append((name, *bench([step, fd], args.calls), "diffusers"))
    # the same DDPM step as plain PyTorch ops: z drawn with randn (fastdiff: in the kernel), and
    # z given to both
    ab = sched.table("alphas_cumprod", "cpu", torch.float64)
    at, ap = ab[500], ab[499]
    c1 = float(ap.sqrt() * (1 - at / ap) / (1 - at))
    c2 = float((at / ap).sqrt() * (1 - ap) / (1 - at))
    sig = float(((1 - ap) / (1 - at) * (1 - at / ap)).sqrt())
    sa5, sb5 = float(at.sqrt()), float((1 - at).sqrt())

    z = torch.randn(shape)

    def eager_ddpm(z=None):
        x0 = ((x - sb5 * eps) / sa5).clamp(-1, 1)
        return c1 * x0 + c2 * x + sig * (torch.randn_like(x) if z is None else z)
    rows.append(("DDPM step (16,4,64,64), noise drawn", *bench(
        [eager_ddpm, lambda: fastdiff.sampler_step(x, eps, 500, 499, sched, clip_sample=True,
                                                   seed=1)], args.calls), "eager"))
    rows.append(("DDPM step (16,4,64,64), noise given", *bench(
        [lambda: eager_ddpm(z), lambda: fastdiff.sampler_step(x, eps, 500, 499, sched,
                                                              clip_sample=True, noise=z)],
        args.calls), "eager"))
    print(f"| case | baseline | baseline ms | fastdiff ms | baseline ÷ fastdiff |")
    print("|---|---|---|---|---|")
    for name, base, ours, what in rows:
        print(f"| {name} | {what} | {base:.3f} | {ours:.3f} | {base / ours:.2f} |")


if __name__ == "__main__":
    main()
