"""`python -m fastdiff <command>`: info, sample, train, bench."""
from __future__ import annotations

import argparse
import os
import platform
import sys


def _versions() -> list[tuple[str, str]]:
    import torch
    rows = [("fastdiff", __import__("fastdiff").__version__), ("python", platform.python_version()),
            ("torch", torch.__version__), ("torch CUDA", str(torch.version.cuda))]
    try:
        import triton
        rows.append(("triton", triton.__version__))
    except Exception as e:  # noqa: BLE001 - report whatever stops it
        rows.append(("triton", f"not importable ({e.__class__.__name__})"))
    return rows


def info(args=None) -> int:
    """Versions, device, and for each backend whether it is active here and why not."""
    import torch
    from . import backends
    for k, v in _versions():
        print(f"{k:<12} {v}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"{'device':<12} cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, "
                  f"{p.multi_processor_count} SMs, sm_{p.major}{p.minor}")
    else:
        print(f"{'device':<12} cpu only (torch sees no CUDA device)")
    env = {k: os.environ[k] for k in ("FASTDIFF_BACKEND", "TRITON_INTERPRET") if k in os.environ}
    if env:
        print(f"{'env':<12} " + " ".join(f"{k}={v}" for k, v in env.items()))
    print("\nbackends:")
    for name, (ok, why) in backends.backend_status().items():
        print(f"  {name:<7} {'active  ' if ok else 'inactive'}  {why}")
    print("\nauto choice per op on CUDA tensors (first available):")
    for op, order in backends.AUTO_CUDA_ORDER.items():
        print(f"  {op:<16} {' > '.join(order)}{_picked(backends, op)}")
    for (op, dtype), order in backends.AUTO_CUDA_ORDER_BY_DTYPE.items():
        print(f"  {op:<16} {' > '.join(order)}   ({dtype} inputs)")
    print("\nauto choice per op on CPU tensors (first available):")
    for op, order in backends.AUTO_CPU_ORDER.items():
        print(f"  {op:<16} {' > '.join(order)}{_picked(backends, op, 'cpu')}")
    for (op, dtype, layout), order in backends.AUTO_CPU_ORDER_BY.items():
        where = ", ".join(w for w in (dtype and f"{dtype} inputs", layout) if w)
        print(f"  {op:<16} {' > '.join(order)}   ({where})")
    ext, _ = backends.extension()
    if ext is not None and hasattr(ext, "cpu_capability"):
        print(f"  C++ CPU kernels: {ext.cpu_capability()} variant "
              f"(compiled: {', '.join(ext.cpu_capabilities())}), {_threads()} threads")
    print(f"\nrequested now: {backends.requested()}")
    return 0


def _threads() -> int:
    import torch
    return torch.get_num_threads()


def _picked(backends, op: str, device: str = "cuda") -> str:
    """' -> <backend>': what auto runs for op on this machine's GPU or CPU ('' without a GPU)."""
    import torch
    if device == "cuda" and not torch.cuda.is_available():
        return ""
    try:
        implemented = __import__(f"fastdiff.ops.{op}", fromlist=["IMPLEMENTED"]).IMPLEMENTED
        return f"   -> {backends.pick(op, implemented, device)} here"
    except Exception as e:  # noqa: BLE001 - report, never fail `info`
        return f"   -> ? ({e.__class__.__name__}: {e})"


def bench(argv) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "benchmarks", "run.py")
    if not os.path.exists(path):
        print("the benchmark suite lives in the source tree (benchmarks/run.py); run this from a "
              "checkout of fastdiff", file=sys.stderr)
        return 2
    import importlib.util
    spec = importlib.util.spec_from_file_location("fastdiff_benchmarks_run", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return int(mod.main(argv) or 0)


def sample(argv) -> int:
    """`python -m fastdiff sample`: fastdiff.generate.generate with its keywords as flags."""
    from .generate import FORMATS, ManifestMismatch, SAMPLERS, generate
    p = argparse.ArgumentParser(prog="python -m fastdiff sample", description=(
        "Sample images: one PNG grid (default), or --out DIR --n N for a folder of PNGs / .npz "
        "shards that a rerun completes (resume) and `torchrun --nproc_per_node=K -m fastdiff "
        "sample ...` shards over K processes."))
    p.add_argument("--model", help="a diffusers pipeline folder (default: the embedded model)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim", help=(
        "ddim (default), ddpm, or a few-step solver: dpmpp-2m / dpmpp-3m (DPM-Solver++ order "
        "2 / 3), dpmpp-2m-sde (its stochastic variant), unipc (UniPC bh2, order 2)"))
    p.add_argument("--steps", type=int, help="inference steps (default: the model folder's, "
                   "else ddim 50, ddpm all; dpmpp-2m, dpmpp-3m, dpmpp-2m-sde, unipc: 20)")
    p.add_argument("--eta", type=float, help="DDIM eta (default 0: deterministic)")
    p.add_argument("--n", "-n", "--num-images", dest="n", type=int,
                   help="number of images (default: two per class of a class-conditional model, "
                        "else 16); under torchrun write -n or --num-images "
                        "(torchrun's own parser takes --n for an abbreviation of its flags)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class", dest="class_label", type=int,
                   help="class label of every image (default: classes in turn by image index)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    p.add_argument("--device", help="default: cuda (the local rank's) if available, else cpu")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--out", help="grid: a .png path (default samples.png); png/npz: a folder")
    p.add_argument("--format", choices=FORMATS,
                   help="grid (default unless --out is a folder), png or npz")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    a = p.parse_args(argv)
    try:
        path = generate(a.model, sampler=a.sampler, steps=a.steps, eta=a.eta, n=a.n,
                        batch_size=a.batch_size, seed=a.seed, class_label=a.class_label,
                        guidance=a.guidance, device=a.device, dtype=a.dtype, out=a.out,
                        format=a.format, progress=a.progress)
    except KeyboardInterrupt:
        print("interrupted: only whole images were written; the same command resumes",
              file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, ManifestMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(path)
    return 0


def train(argv) -> int:
    """`python -m fastdiff train`: parse the flags into a fastdiff.train.TrainConfig and run it."""
    import json
    from .train import (LR_SCHEDULES, MIXED_PRECISION, OBJECTIVES, TIMESTEP_MODES, UNET_IMPLS,
                        TrainConfig, train as run_training)
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m fastdiff train",
                                description="Train a UNet2DModel; --out becomes a diffusers "
                                "pipeline folder (EMA weights) with resumable checkpoints.")
    a = p.add_argument
    a("--data", required=True, help="'digits' (scikit-learn's bundled 8x8 digits) or a folder "
      "of images (class sub-folders with --class-conditional)")
    a("--out", required=True, help="output folder (pipeline folder + checkpoints/ + samples/)")
    a("--steps", type=int, default=d.steps)
    a("--batch-size", type=int, default=d.batch_size, help="global batch (all ranks)")
    a("--grad-accum", type=int, default=d.grad_accum)
    a("--lr", type=float, default=d.lr)
    a("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule)
    a("--warmup-steps", type=int, default=d.warmup_steps)
    a("--weight-decay", type=float, default=d.weight_decay)
    a("--adam-eps", type=float, default=d.adam_eps)
    a("--max-grad-norm", type=float, default=d.max_grad_norm, help="0: no clipping")
    a("--resolution", type=int, default=None, help="resize + center-crop to RxR")
    a("--flip", action="store_true", help="random horizontal flips")
    a("--objective", choices=OBJECTIVES, default=d.objective)
    a("--min-snr-gamma", type=float, default=None)
    a("--offset-noise", type=float, default=d.offset_noise)
    a("--timesteps", choices=TIMESTEP_MODES, default=d.timesteps)
    a("--class-conditional", action="store_true")
    a("--label-dropout", type=float, default=d.label_dropout,
      help="probability of the null class (the last class embedding), for guidance")
    a("--config", default=None, help="a diffusers UNet2DModel config.json (default: the "
      "embedded digits model's)")
    a("--unet-impl", choices=UNET_IMPLS, default=d.unet_impl)
    a("--num-train-timesteps", type=int, default=d.num_train_timesteps)
    a("--beta-schedule", default=d.beta_schedule)
    a("--ema-max-decay", type=float, default=d.ema_max_decay)
    a("--ema-inv-gamma", type=float, default=d.ema_inv_gamma)
    a("--ema-power", type=float, default=d.ema_power)
    a("--checkpoint-every", type=int, default=d.checkpoint_every)
    a("--sample-every", type=int, default=d.sample_every)
    a("--sample-steps", type=int, default=d.sample_steps)
    a("--guidance-scale", type=float, default=None)
    a("--log-every", type=int, default=d.log_every)
    a("--seed", type=int, default=d.seed)
    a("--resume", action="store_true", help="continue from the last checkpoint in --out")
    a("--device", default=None, help="default: cuda:LOCAL_RANK if CUDA is there, else cpu")
    a("--mixed-precision", choices=MIXED_PRECISION, default=d.mixed_precision)
    a("--no-progress", action="store_true", help="no tqdm bar (log lines only)")
    args = p.parse_args(argv)
    unet_config = None
    if args.config is not None:
        try:
            with open(args.config) as f:
                unet_config = json.load(f)
        except (OSError, ValueError) as e:
            p.error(f"--config {args.config!r}: cannot read a JSON UNet2DModel config ({e})")
        if not isinstance(unet_config, dict):
            p.error(f"--config {args.config!r}: expected a JSON object")
    cfg = TrainConfig(
        data=args.data, out=args.out, steps=args.steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, lr_schedule=args.lr_schedule,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, adam_eps=args.adam_eps,
        max_grad_norm=args.max_grad_norm or None, resolution=args.resolution, flip=args.flip,
        objective=args.objective, min_snr_gamma=args.min_snr_gamma,
        offset_noise=args.offset_noise, timesteps=args.timesteps,
        class_conditional=args.class_conditional, label_dropout=args.label_dropout,
        unet_config=unet_config, unet_impl=args.unet_impl,
        num_train_timesteps=args.num_train_timesteps, beta_schedule=args.beta_schedule,
        ema_max_decay=args.ema_max_decay, ema_inv_gamma=args.ema_inv_gamma,
        ema_power=args.ema_power, checkpoint_every=args.checkpoint_every,
        sample_every=args.sample_every, sample_steps=args.sample_steps,
        guidance_scale=args.guidance_scale, log_every=args.log_every, seed=args.seed,
        resume=args.resume, device=args.device, mixed_precision=args.mixed_precision,
        progress=not args.no_progress)
    try:
        tr = run_training(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"python -m fastdiff train: error: {e}", file=sys.stderr)
        return 2
    if tr.rank == 0:
        print(f"trained {tr.step} steps; pipeline folder: {os.path.abspath(cfg.out)}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m fastdiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and which backends are active and why")
    sub.add_parser("bench", help="the GPU benchmark suite (benchmarks/run.py; its flags follow)",
                   add_help=False)
    sub.add_parser("sample", help="sample images: a grid, or a resumable, shardable folder "
                   "(its flags follow)", add_help=False)
    sub.add_parser("train", help="train a U-Net (fastdiff.train; its flags follow)",
                   add_help=False)
    if argv[:1] == ["bench"]:
        return bench(argv[1:])
    if argv[:1] == ["sample"]:
        return sample(argv[1:])
    if argv[:1] == ["train"]:
        return train(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "info":
        return info(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
