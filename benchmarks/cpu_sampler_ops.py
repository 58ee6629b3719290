"""CPU timing of q_sample and sampler_step against PyTorch eager and diffusers (issue 14's rows).

    python benchmarks/cpu_sampler_ops.py [--threads 2] [--calls 60]

Min of `calls` calls after warm-up, torch.set_num_threads(threads); prints one line per case.
"""
import argparse
import time

import torch

import fastdiff


def bench(fn, calls):
    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


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
    rows.append(("q_sample (16,4,64,64) noise drawn", bench(eager_q, args.calls),
                 bench(lambda: fastdiff.q_sample(x0, t, sched, seed=1), args.calls), "eager"))

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
        rows.append((name, bench(step, args.calls), bench(fd, args.calls), "diffusers"))
    print(f"| case | baseline | baseline ms | fastdiff ms | baseline ÷ fastdiff |")
    print("|---|---|---|---|---|")
    for name, base, ours, what in rows:
        print(f"| {name} | {what} | {base:.3f} | {ours:.3f} | {base / ours:.2f} |")


if __name__ == "__main__":
    main()
