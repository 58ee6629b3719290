"""Sample quality against cost on the embedded digits model: the curve a sampling user needs.

    python benchmarks/quality.py                          # the committed curve
    python benchmarks/quality.py --n 200 --rows ddim-10,dpmpp-2m-20 --out /tmp/q

Each row is one sampler at one step count, sampled exactly as `python -m fastdiff sample
--sampler <name> --steps <steps>` samples the embedded model (the folder's scheduler config and
guidance scale, via fastdiff.generate.load_pipeline), and scored by a small CNN classifier:

- the classifier: trained here on scikit-learn's digits (fixed seed, a stratified held-out split
  it never sees; images in the model's [-1, 1] 8x8 scaling, fastdiff.data.DigitsData), its
  held-out accuracy printed in the table's header. Deterministic: one thread, seeded init,
  shuffling and augmentation (random 1-pixel shifts), so every run scores with the same weights.
- per row: (a) accuracy = the fraction of class-conditional samples the classifier puts in the
  requested class (Wilson 95% interval), (b) confidence = the mean of its top softmax
  probability, (c) Fréchet distance between the Gaussians fitted to the classifier's 128-d
  penultimate features of the samples and of the held-out real digits (an FID analogue: small
  numbers are closer to real digits; not comparable to Inception FID; biased by the sample
  count, so compare only rows with the same n; ± is a bootstrap over the samples).
- the cost: model calls (U-Net evaluations per image batch, counted by a hook on the U-Net;
  with classifier-free guidance the conditional and unconditional halves are one batched call)
  and the wall time of the row's sampling on this machine.

Every row uses the same images: image i asks for class i mod 10 (equal counts per class), starts
from the same x_T (the noise fastdiff's samplers draw for image i of seed `--seed`) and, for the
stochastic samplers, gets the same per-image step noise stream. Samples are kept as the uint8
images the command line writes, in a cache folder, one file per batch (written atomically): a
rerun or a longer --n reuses them, after resampling the row's first images to check that this
fastdiff still produces the cached ones (a row that no longer matches is sampled again).

Outputs in --out: quality.md (the table), quality.json (everything, per-class accuracies too),
quality.png (accuracy and Fréchet distance against model calls, drawn with Pillow) and
grid_<sampler>-<steps>.png (the --grid-steps rows next to the anchor row, same x_T per cell).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: `benchmarks` and a checkout's fastdiff
    sys.path.insert(0, str(ROOT))

# The curve: DDPM's full chain as the anchor, DDIM from few to many steps, and the few-step
# solvers (CLI names) at the step counts their authors recommend. A name this install's
# `fastdiff.generate.SAMPLERS` does not know is left out of a default run (and said so).
CURVE = {
    "ddpm": (1000,),
    "ddim": (10, 15, 20, 25, 50, 100),
    "dpmpp-2m": (10, 15, 20, 25),
    "dpmpp-3m": (10, 15, 20, 25),
    "dpmpp-2m-sde": (10, 15, 20, 25),
    "unipc": (10, 15, 20, 25),
}
TITLES = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp-2m": "DPM-Solver++ 2M",
          "dpmpp-3m": "DPM-Solver++ 3M", "dpmpp-2m-sde": "DPM-Solver++ 2M SDE", "unipc": "UniPC"}
ANCHOR = "ddpm-1000"
DEFAULT_N = 1000
HELD_OUT = 600          # real digits the classifier never sees (stratified: 58-61 per class)
VERIFY_IMAGES = 10      # images of a cached row resampled to check the cache
VERIFY_TOL = 2          # uint8 levels: batch composition changes float rounding, not digits
BOOTSTRAP = 50


# -- the classifier ---------------------------------------------------------------------------
class DigitClassifier(nn.Module):
    """Three 3x3 convolutions and a 128-d hidden layer: `features` is the Fréchet space."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, 128)
        self.head = nn.Linear(128, num_classes)

    def features(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x):
        return self.head(self.features(x))


def real_digits(seed: int = 0, held_out: int = HELD_OUT):
    """scikit-learn's digits in the model's scaling, split (stratified, seeded) into the
    classifier's training images and the held-out ones: (x_train, y_train, x_test, y_test)."""
    from sklearn.model_selection import train_test_split

    from fastdiff.data import DigitsData
    d = DigitsData()
    x, y = d.images(torch.arange(len(d))).numpy(), d.labels.numpy()
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=held_out, stratify=y,
                                          random_state=seed)
    return (torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte),
            torch.from_numpy(yte))


def _shift(x, g):
    """Each image moved by -1, 0 or +1 pixel in x and y (background -1 fills the edge)."""
    p = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy = torch.randint(0, 3, (x.shape[0],), generator=g)
    dx = torch.randint(0, 3, (x.shape[0],), generator=g)
    out = torch.empty_like(x)
    for i in range(3):
        for j in range(3):
            m = (dy == i) & (dx == j)
            out[m] = p[m, :, i:i + 8, j:j + 8]
    return out


def train_classifier(x, y, seed: int = 0, epochs: int = 30, batch_size: int = 64,
                     lr: float = 2e-3) -> DigitClassifier:
    """AdamW with a one-cycle learning rate, random 1-pixel shifts; one thread and seeded
    generators, so the weights are the same on every run of this torch build."""
    if x.shape[1:] != (1, 8, 8):
        raise ValueError(f"x must be (N, 1, 8, 8) digits, got {tuple(x.shape)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a reduction split over threads may round differently
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = DigitClassifier()
        g = torch.Generator().manual_seed(seed)
        per_epoch = math.ceil(len(x) / batch_size)
        opt = torch.optim.AdamW(net.parameters(), lr, weight_decay=1e-2)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * per_epoch)
        net.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g)
            for k in range(0, len(x), batch_size):
                idx = perm[k:k + batch_size]
                loss = F.cross_entropy(net(_shift(x[idx], g)), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    finally:
        torch.set_num_threads(threads)
    return net.eval()


@torch.no_grad()
def classify(net, x):
    """(softmax probabilities, penultimate features), float64 numpy, for images in [-1, 1]."""
    x = torch.as_tensor(x, dtype=torch.float32)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    f = net.features(x)
    return net.head(f).softmax(1).double().numpy(), f.double().numpy()


def state_sha256(net) -> str:
    import hashlib
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


# -- statistics -------------------------------------------------------------------------------
def gaussian(f):
    f = np.asarray(f, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, s1, mu2, s2) -> float:
    """|mu1 - mu2|² + tr(S1 + S2 - 2 (S1^½ S2 S1^½)^½): the Fréchet (2-Wasserstein²) distance
    of two Gaussians. Symmetric eigendecompositions in float64 (S1^½ S2 S1^½ is symmetric PSD),
    so no complex square roots and no scipy."""
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


def wilson(k: int, n: int, z: float = 1.96):
    """95% Wilson score interval of a proportion k / n."""
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return c - h, c + h


def score(net, images_u8, labels, real_stats, seed: int = 0, bootstrap: Optional[int] = None):
    """The row's metrics from its uint8 (N, 8, 8) samples and requested labels (bootstrap:
    resamples for the distance's sd, default BOOTSTRAP)."""
    bootstrap = BOOTSTRAP if bootstrap is None else bootstrap
    x = torch.from_numpy(images_u8).float() / 127.5 - 1.0
    probs, feats = classify(net, x)
    labels = np.asarray(labels)
    pred = probs.argmax(1)
    k, n = int((pred == labels).sum()), len(labels)
    lo, hi = wilson(k, n)
    mu, cov = gaussian(feats)
    fd = frechet_distance(mu, cov, *real_stats)
    rng = np.random.default_rng(seed)
    boot = [frechet_distance(*gaussian(feats[rng.integers(0, n, n)]), *real_stats)
            for _ in range(bootstrap)]
    classes = int(labels.max()) + 1
    return dict(accuracy=k / n, accuracy_ci95=[lo, hi], confidence=float(probs.max(1).mean()),
                p_requested=float(probs[np.arange(n), labels].mean()), frechet=fd,
                frechet_bootstrap_sd=float(np.std(boot)) if boot else None,
                per_class_accuracy=[float((pred[labels == c] == c).mean())
                                    for c in range(classes)])


# -- sampling ---------------------------------------------------------------------------------
def parse_row(spec: str):
    """'dpmpp-2m-20' -> ('dpmpp-2m', 20)."""
    name, _, steps = spec.strip().rpartition("-")
    if not name or not steps.isdigit() or int(steps) < 1:
        raise ValueError(f"--rows: {spec!r} is not <sampler>-<steps> (e.g. ddim-50, "
                         f"dpmpp-2m-20)")
    return name, int(steps)


def default_rows(available) -> tuple[list, list]:
    """(rows of CURVE whose sampler this install has, samplers left out)."""
    rows = [(s, n) for s, steps in CURVE.items() if s in available for n in steps]
    return rows, [s for s in CURVE if s not in available]


def _atomic_npz(path, **arrays):
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _atomic_text(path, text):
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class Sampling:
    """The samples of every row: the embedded model (or --model) loaded per sampler as the
    command line loads it, the shared x_T, the call counter, the per-batch cache."""

    def __init__(self, model=None, *, seed=0, guidance=None, batch_size=500, cache=None,
                 log=print):
        from fastdiff.generate import load_pipeline, model_defaults, model_fingerprint
        self.model, self.seed, self.batch_size, self.cache, self.log = (
            model, seed, batch_size, cache, log)
        self.guidance = model_defaults(model).get("guidance_scale") if guidance is None \
            else guidance
        self._load = load_pipeline
        # x_T comes from one sampler for every row (fastdiff's samplers all draw it as
        # q_sample's noise at T - 1; tests/test_quality.py checks each draws this one itself)
        self._noise = load_pipeline(model, "ddpm")
        unet = self._noise.unet
        self.classes = unet.config.num_class_embeds - 1 if getattr(
            unet.config, "num_class_embeds", None) else None
        if not self.classes:
            raise ValueError("the quality curve needs a class-conditional model (config "
                             "num_class_embeds, the last class the null class)")
        self.model_sha256 = model_fingerprint(unet)
        self.prediction_type = self._noise.scheduler.config.get("prediction_type")

    def labels(self, start, end):
        return torch.arange(start, end, dtype=torch.int64) % self.classes

    def latents(self, start, end):
        unet = self._noise.unet
        shape = (end - start, unet.config.in_channels) + (unet.config.sample_size,) * 2
        return self._noise.scheduler.initial_noise(shape, self.seed, start)

    def settings(self, sampler, steps):
        return dict(model_sha256=self.model_sha256, sampler=sampler, steps=steps,
                    seed=self.seed, guidance=self.guidance, batch_size=self.batch_size,
                    torch=torch.__version__, threads=torch.get_num_threads())

    def _sample(self, pipe, steps, start, end):
        calls = [0]
        hook = pipe.unet.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
        try:
            t0 = time.perf_counter()
            x = pipe.scheduler.sample(
                pipe.unet, latents=self.latents(start, end), num_inference_steps=steps,
                seed=self.seed, first_index=start, class_labels=self.labels(start, end),
                guidance_scale=self.guidance, progress=False, output_type="np")
            seconds = time.perf_counter() - t0
        finally:
            hook.remove()
        from fastdiff.generate import _to_uint8
        return _to_uint8(x)[..., 0], seconds, calls[0]

    def row(self, sampler, steps, n):
        """uint8 (n, H, W) samples, their labels, and the cost: {'model_calls', 'seconds',
        'load_avg', 'cached_batches', 'verified'}."""
        pipe = self._load(self.model, sampler)
        folder = None
        if self.cache is not None:
            folder = Path(self.cache) / f"{sampler}-{steps}"
            folder.mkdir(parents=True, exist_ok=True)
            want = self.settings(sampler, steps)
            path = folder / "manifest.json"
            if path.exists():
                have = json.loads(path.read_text())
                if have != json.loads(json.dumps(want)):
                    diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
                    raise ValueError(f"cache {folder} holds samples made with other settings "
                                     f"({', '.join(diff)}); remove it or pass another --cache")
            else:
                _atomic_text(path, json.dumps(want, indent=1) + "\n")
        blocks = [(s, min(s + self.batch_size, n)) for s in range(0, n, self.batch_size)]
        images, seconds, calls, loads, cached = [], 0.0, set(), [], 0
        for start, end in blocks:
            f = folder / f"{start:06d}_{end:06d}.npz" if folder is not None else None
            if f is not None and f.exists():
                with np.load(f) as z:
                    imgs, s, c, la = z["images"], float(z["seconds"]), int(z["calls"]), \
                        float(z["load_avg"])
                cached += 1
            else:
                la = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
                imgs, s, c = self._sample(pipe, steps, start, end)
                if f is not None:
                    _atomic_npz(f, images=imgs, seconds=s, calls=c, load_avg=la)
            images.append(imgs)
            seconds += s
            calls.add(c)
            loads.append(la)
        images = np.concatenate(images)
        verified = None
        if cached:  # the cache must still be what this fastdiff samples
            v = min(VERIFY_IMAGES, n)
            fresh, _, _ = self._sample(pipe, steps, 0, v)
            diff = int(np.abs(fresh.astype(np.int16) - images[:v]).max())
            verified = diff <= VERIFY_TOL
            if not verified:
                self.log(f"  {sampler}-{steps}: cached samples differ from fresh ones by "
                         f"{diff} levels (> {VERIFY_TOL}); sampling the row again")
                for start, end in blocks:
                    (folder / f"{start:06d}_{end:06d}.npz").unlink(missing_ok=True)
                return self.row(sampler, steps, n)
        if len(calls) != 1:
            raise RuntimeError(f"{sampler}-{steps}: batches made different numbers of model "
                               f"calls {sorted(calls)}")
        return images, self.labels(0, n).numpy(), dict(
            model_calls=calls.pop(), seconds=seconds, ms_per_image=1e3 * seconds / n,
            load_avg=float(np.mean(loads)), cached_batches=cached, batches=len(blocks),
            verified=verified, clip_sample=bool(pipe.scheduler.config.get("clip_sample")))


# -- drawing ----------------------------------------------------------------------------------
COLORS = {"ddpm": (0, 0, 0), "ddim": (31, 119, 180), "dpmpp-2m": (214, 39, 40),
          "dpmpp-3m": (255, 127, 14), "dpmpp-2m-sde": (148, 103, 189), "unipc": (44, 160, 44)}
_EXTRA_COLORS = [(140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34)]


def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _color(name, i=0):
    return COLORS.get(name, _EXTRA_COLORS[i % len(_EXTRA_COLORS)])


def plot(rows, path, title):
    """Two panels (accuracy %, Fréchet distance) against model calls on a log axis, one line
    per sampler; the anchor (DDPM-1000) a dashed level across both panels."""
    from PIL import Image, ImageDraw
    W, H, top, bottom, left, gap, right = 1320, 560, 58, 70, 78, 88, 220
    pw = (W - left - gap - right) // 2
    ph = H - top - bottom
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    f, fs, ft = _font(14), _font(12), _font(17)
    d.text((left, 16), title, fill="black", font=ft)
    calls = [r["model_calls"] for r in rows]
    x0, x1 = math.log10(min(calls) / 1.25), math.log10(max(calls) * 1.25)
    names = list(dict.fromkeys(r["sampler"] for r in rows))
    panels = [("accuracy", "accuracy on the requested class (%)", 100.0),
              ("frechet", "Frechet distance to held-out digits (classifier features)", 1.0)]
    for p, (key, label, mult) in enumerate(panels):
        px = left + p * (pw + gap)
        if key == "accuracy":
            vals = [100 * v for r in rows for v in r["accuracy_ci95"]]
            lo, hi = min(vals), max(vals)
            lo, hi = max(0.0, lo - 0.05 * (hi - lo + 1)), min(100.0, hi + 0.05 * (hi - lo + 1))
        else:
            hi = max(r["frechet"] + (r.get("frechet_bootstrap_sd") or 0) for r in rows)
            lo, hi = 0.0, hi * 1.05 if hi > 0 else 1.0
        if hi - lo < 1e-9:
            lo, hi = lo - 1, hi + 1

        def xy(c, v):
            return (px + (math.log10(c) - x0) / (x1 - x0) * pw,
                    top + ph - (v - lo) / (hi - lo) * ph)

        for k in range(6):  # y grid and ticks
            v = lo + (hi - lo) * k / 5
            _, y = xy(10 ** x0, v)
            d.line([px, y, px + pw, y], fill=(225, 225, 225))
            d.text((px - 6, y), f"{v:.1f}" if hi - lo < 50 else f"{v:.0f}", fill="black",
                   font=fs, anchor="rm")
        d.rectangle([px, top, px + pw, top + ph], outline="black")
        for c in sorted(set(calls)):  # x ticks at the measured call counts
            x, _ = xy(c, lo)
            d.line([x, top + ph, x, top + ph + 5], fill="black")
            d.text((x, top + ph + 8), str(c), fill="black", font=fs, anchor="mt")
        d.text((px + pw / 2, top + ph + 30), "model calls (U-Net evaluations, log scale)",
               fill="black", font=f, anchor="mt")
        d.text((px, top - 8), label, fill="black", font=f, anchor="ld")
        for i, name in enumerate(names):
            pts = sorted((r["model_calls"], r[key] * mult) for r in rows if r["sampler"] == name)
            col = _color(name, i)
            if len(pts) == 1 and name == "ddpm":  # the anchor: a dashed level
                _, y = xy(pts[0][0], pts[0][1])
                for xs in range(int(px), int(px + pw), 12):
                    d.line([xs, y, min(xs + 6, px + pw), y], fill=col, width=1)
            for r in rows:  # error bars: the Wilson interval / the bootstrap sd
                if r["sampler"] != name:
                    continue
                lo_e, hi_e = ([100 * v for v in r["accuracy_ci95"]] if key == "accuracy" else
                              [r["frechet"] - (r.get("frechet_bootstrap_sd") or 0),
                               r["frechet"] + (r.get("frechet_bootstrap_sd") or 0)])
                (x, ya), (_, yb) = xy(r["model_calls"], lo_e), xy(r["model_calls"], hi_e)
                d.line([x, ya, x, yb], fill=col, width=1)
            xyz = [xy(c, v) for c, v in pts]
            if len(xyz) > 1:
                d.line(xyz, fill=col, width=3)
            for x, y in xyz:
                d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=col)
    lx, ly = W - right + 18, top + 6
    d.text((lx, ly), "sampler", fill="black", font=f)
    for i, name in enumerate(names):
        y = ly + 26 + 22 * i
        d.line([lx, y + 7, lx + 26, y + 7], fill=_color(name, i), width=3)
        d.ellipse([lx + 9, y + 3, lx + 17, y + 11], fill=_color(name, i))
        d.text((lx + 34, y), TITLES.get(name, name), fill="black", font=fs)
    d.text((lx, ly + 40 + 22 * len(names)), "dashed: the DDPM level\nbars: 95% interval (accuracy),\n"
           "bootstrap sd (distance)\nhigher accuracy and\nlower distance are better", fill=(80, 80, 80), font=fs)
    im.save(path, format="PNG")
    return path


def grid_image(panels, path, classes, rows_per_class=4, scale=4):
    """Side by side, one grid per (caption, uint8 (N, H, W) images): columns are the classes,
    row r holds images r*classes .. (r+1)*classes - 1 (the same x_T in every panel)."""
    from PIL import Image, ImageDraw

    from fastdiff.generate import make_grid
    k = classes * rows_per_class
    grids = [make_grid(imgs[:k, :, :, None], classes, scale=scale)[..., 0] for _, imgs in panels]
    gh, gw = grids[0].shape
    cap, gap = 26, 16
    im = Image.new("L", (len(grids) * gw + (len(grids) - 1) * gap, gh + cap), 255)
    d = ImageDraw.Draw(im)
    for i, ((caption, _), g) in enumerate(zip(panels, grids)):
        x = i * (gw + gap)
        im.paste(Image.fromarray(g, mode="L"), (x, cap))
        d.text((x + 2, 5), caption, fill=0, font=_font(13))
    im.save(path, format="PNG")
    return path


# -- the run ----------------------------------------------------------------------------------
def machine() -> dict:
    from benchmarks.harness import cpu_name, git_commit
    import fastdiff
    return dict(cpu=cpu_name(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, python=platform.python_version(),
                fastdiff=fastdiff.__version__, git_commit=git_commit(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                step_backends=step_backends())


def step_backends() -> dict:
    """The backend each sampler's step op ran on (CPU tensors): an extension built before
    multistep_step existed runs the solvers on the torch reference, which samples the same
    images to rounding (the cache check's tolerance) but slower."""
    import importlib

    from fastdiff import backends
    return {op: backends.pick(op, importlib.import_module(f"fastdiff.ops.{op}").IMPLEMENTED,
                              "cpu") for op in ("sampler_step", "multistep_step")}


def accuracy_delta(r, anchor):
    """(accuracy difference to the anchor, its 95% interval low, high), percentage points:
    Newcombe's hybrid score interval for two independent proportions, built from the rows'
    Wilson intervals, so it stays honest at 100% vs 100% where the normal approximation's is
    zero wide (conservative: the rows share x_T, which correlates them)."""
    p1, p2 = r["accuracy"], anchor["accuracy"]
    (l1, u1), (l2, u2) = r["accuracy_ci95"], anchor["accuracy_ci95"]
    dp = p1 - p2
    lo = dp - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = dp + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return 100 * dp, 100 * lo, 100 * hi


def headline(rows, anchor, steps) -> list:
    """One line per sampler at `steps`: accuracy and distance against the anchor's."""
    out = []
    for r in rows:
        if r["steps"] != steps or r is anchor:
            continue
        dp, lo, hi = accuracy_delta(r, anchor)
        word = ("as recognisable as" if lo <= 0 <= hi else
                "more recognisable than" if dp > 0 else "less recognisable than")
        out.append(f"- **{TITLES.get(r['sampler'], r['sampler'])}, {steps} steps** "
                   f"({r['model_calls']} model calls): accuracy {100 * r['accuracy']:.1f}% vs "
                   f"{100 * anchor['accuracy']:.1f}% ({dp:+.1f} pp, 95% interval {lo:+.1f} to "
                   f"{hi:+.1f}): {word} "
                   f"DDPM-1000's digits by this classifier; Fréchet {r['frechet']:.2f} vs "
                   f"{anchor['frechet']:.2f}; {r['ms_per_image']:.1f} vs "
                   f"{anchor['ms_per_image']:.1f} ms per image.")
    return out


def _fmt_row(r, anchor):
    lo, hi = r["accuracy_ci95"]
    delta = ""
    if anchor is not None and r is not anchor:
        dp, d_lo, d_hi = accuracy_delta(r, anchor)
        delta = f"{dp:+.1f} ({d_lo:+.1f} to {d_hi:+.1f})"
    sd = r.get("frechet_bootstrap_sd")
    return (f"| {TITLES.get(r['sampler'], r['sampler'])} | {r['steps']} | {r['model_calls']} | "
            f"**{100 * r['accuracy']:.1f}** ({100 * lo:.1f}–{100 * hi:.1f}) | {delta} | "
            f"{r['confidence']:.3f} | {r['frechet']:.2f}{f' ± {sd:.2f}' if sd else ''} | "
            f"{r['seconds']:.0f} | {r['ms_per_image']:.1f} |")


def markdown(result) -> str:
    m, c, rows = result["machine"], result["classifier"], result["rows"]
    anchor = next((r for r in rows if r["key"] == ANCHOR), None)
    lines = [
        "# Sample quality against cost: the embedded digits model",
        "",
        f"{m['date']}; {m['cpu']}, {m['cpu_count']} cores, {m['torch_threads']} torch threads; "
        f"torch {m['torch']}, Python {m['python']}; fastdiff {m['fastdiff']} at git "
        f"{m['git_commit']}; step ops on the " + ", ".join(
            f"`{b}` backend ({op})" for op, b in m.get("step_backends", {}).items()) + ".",
        "",
        f"Reproduce: `{result['command']}`",
        "",
        f"Model: {result['model']} (class-conditional, "
        f"{result.get('prediction_type', 'v_prediction')}, "
        f"guidance scale {result['guidance']}; U-Net sha256 {result['model_sha256'][:12]}…), "
        f"each sampler loaded as `python -m fastdiff sample --sampler NAME --steps N` loads it. "
        f"{result['n']} samples per row ({result['n'] // 10} per class, image i asks for class "
        f"i mod 10), seed {result['seed']}: the same x_T and per-image noise stream in every row.",
        "",
        f"Classifier: a 3-conv CNN trained here in {c['train_seconds']:.0f} s (seed "
        f"{c['seed']}, {c['epochs']} epochs, one thread, 1-pixel shift augmentation) on "
        f"{c['n_train']} of scikit-learn's digits; **held-out accuracy {100 * c['held_out_accuracy']:.1f}%** "
        f"on the other {c['n_held_out']} (stratified), mean confidence "
        f"{c['held_out_confidence']:.3f}; weights sha256 {c['sha256'][:12]}…. The diffusion "
        f"model itself was trained on all 1797 digits: held out means held out from the "
        f"classifier.",
        "",
        "Columns: accuracy = samples the classifier puts in the requested class, % (Wilson 95% "
        "interval); Δ vs DDPM-1000 = difference in accuracy, percentage points (Newcombe's 95% "
        "interval from the two Wilson intervals); confidence = mean top softmax probability; "
        "Fréchet = distance between Gaussians "
        "fitted to the classifier's 128-d penultimate features of the samples and of the "
        f"{c['n_held_out']} held-out digits (an FID analogue, lower is closer to real digits; "
        f"not comparable to Inception FID; it grows as n shrinks, so compare rows of one table "
        f"only; ± = sd over {BOOTSTRAP} bootstrap resamples of the samples). For scale: the "
        f"classifier's own {c['n_train']} training digits are at {c['frechet_train_vs_held_out']:.2f} "
        f"from the held-out ones. Model calls = U-Net evaluations per image batch, counted "
        f"(classifier-free guidance: one batched call of conditional + unconditional per step). "
        f"Wall s = sampling the row's {result['n']} images on this CPU in batches of "
        f"{result['batch_size']}; **contended**: 2 cores shared with other jobs (mean 1-minute "
        f"load average while sampling {result['load_avg']:.1f}), so times are indicative only "
        f"and not a speed claim.",
        "",
        "| sampler | steps | model calls | accuracy % (95% CI) | Δ vs DDPM-1000 (pp) | "
        "confidence | Fréchet | wall s | ms / image |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_fmt_row(r, anchor) for r in rows]
    if anchor is not None:
        head = headline(rows, anchor, result["grid_steps"])
        if head:
            lines += ["", f"At {result['grid_steps']} steps against DDPM-1000 (1000 model calls):",
                      ""] + head
            if anchor["accuracy"] >= 0.99:
                lines += ["", "The accuracy is at its ceiling for DDPM-1000 (and most rows): it "
                          "tells a row that loses digits from one that does not, but not finer "
                          "differences; the Fréchet column does, within its bootstrap sd."]
    if any(r.get("clip_sample") for r in rows if r["sampler"] == "ddim"):
        lines += ["", "Clipping: DDIM (and DDPM) inherit `clip_sample=True` from the model's DDPM "
                  "scheduler config, as `python -m fastdiff sample` and diffusers' "
                  "`DDIMScheduler.from_config` do; the solvers have no such option. DDPM's "
                  "posterior mean is built from the clipped x0, but DDIM's step (eta 0, "
                  "`use_clipped_model_output=False`, as diffusers) pairs the clipped x0 with the "
                  "unclipped noise estimate, a push off the ODE that adds up with the number of "
                  "steps: that is why DDIM gets worse with more steps. A side check, not a row of "
                  "this table (the first 200 images, same seed and classifier, "
                  "`fastdiff.DDIMSampler.from_config(cfg, clip_sample=False)`): accuracy DDIM-20 "
                  "98.0% -> 100.0%, DDIM-100 63.5% -> 100.0%."]
    if result.get("left_out"):
        lines += ["", "Not in this table (their sampler is not in this install's "
                  f"`fastdiff.generate.SAMPLERS`): {', '.join(result['left_out'])}."]
    if result.get("grids"):
        lines += ["", "Sample grids (columns: classes 0–9; the same x_T in each cell of both "
                  "panels): " + ", ".join(f"[{g}]({g})" for g in result["grids"]) + "."]
    lines += ["", "Plot: [quality.png](quality.png)."]
    return "\n".join(lines) + "\n"


def run(args, log=print) -> dict:
    from fastdiff.generate import SAMPLERS
    if args.n < 10 or args.n % 10:
        raise ValueError(f"--n must be a positive multiple of 10 (equal counts for the 10 "
                         f"classes), got {args.n}")
    if args.rows:
        rows = [parse_row(s) for s in args.rows.split(",") if s.strip()]
        unknown = sorted({s for s, _ in rows if s not in SAMPLERS})
        if unknown:
            raise ValueError(f"--rows: sampler(s) {unknown} not in this install's "
                             f"fastdiff.generate.SAMPLERS {SAMPLERS}")
        left_out = []
    else:
        rows, left_out = default_rows(SAMPLERS)
    if left_out:
        log(f"left out (not in fastdiff.generate.SAMPLERS): {', '.join(left_out)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache) if args.cache else out / "cache"

    t0 = time.perf_counter()
    xtr, ytr, xte, yte = real_digits(args.seed)
    net = train_classifier(xtr, ytr, args.seed, epochs=args.classifier_epochs)
    train_s = time.perf_counter() - t0
    p_te, f_te = classify(net, xte)
    _, f_tr = classify(net, xtr)
    real_stats = gaussian(f_te)
    clf = dict(seed=args.seed, epochs=args.classifier_epochs, n_train=len(xtr),
               n_held_out=len(xte), held_out_accuracy=float((p_te.argmax(1) == yte.numpy()).mean()),
               held_out_confidence=float(p_te.max(1).mean()), train_seconds=train_s,
               frechet_train_vs_held_out=frechet_distance(*gaussian(f_tr), *real_stats),
               sha256=state_sha256(net))
    log(f"classifier: held-out accuracy {100 * clf['held_out_accuracy']:.2f}% "
        f"({clf['n_held_out']} digits), trained in {train_s:.1f} s")

    sampling = Sampling(args.model, seed=args.seed, guidance=args.guidance,
                        batch_size=args.batch_size, cache=cache, log=log)
    results, images = [], {}
    for sampler, steps in rows:
        key = f"{sampler}-{steps}"
        imgs, labels, cost = sampling.row(sampler, steps, args.n)
        r = dict(key=key, sampler=sampler, steps=steps, n=args.n, **cost,
                 **score(net, imgs, labels, real_stats, args.seed))
        results.append(r)
        images[key] = imgs
        log(f"{key:>16}: {r['model_calls']:4d} calls, accuracy {100 * r['accuracy']:5.1f}%, "
            f"confidence {r['confidence']:.3f}, Fréchet {r['frechet']:7.2f}, "
            f"{r['seconds']:6.1f} s{' (cached)' if cost['cached_batches'] else ''}")

    anchor_key = ANCHOR if ANCHOR in images else rows[0][0] + f"-{rows[0][1]}"
    grids = []
    for key in images:
        sampler, steps = parse_row(key)
        if steps == args.grid_steps and key != anchor_key:
            name = f"grid_{key}.png"
            a_s, a_n = parse_row(anchor_key)
            grid_image([(f"{TITLES.get(a_s, a_s)}, {a_n} steps", images[anchor_key]),
                        (f"{TITLES.get(sampler, sampler)}, {steps} steps", images[key])],
                       out / name, sampling.classes, rows_per_class=min(4, args.n // 10))
            grids.append(name)
    result = dict(machine=machine(), command=args.command, n=args.n, seed=args.seed,
                  guidance=sampling.guidance, batch_size=args.batch_size,
                  model=args.model or "the embedded `fastdiff/assets/digits`",
                  prediction_type=sampling.prediction_type,
                  model_sha256=sampling.model_sha256, classifier=clf,
                  load_avg=float(np.nanmean([r["load_avg"] for r in results])),
                  grid_steps=args.grid_steps,
                  left_out=left_out, grids=grids, rows=results)
    plot(results, out / "quality.png",
         f"Embedded digits model: sample quality against model calls ({args.n} samples per "
         f"row, classifier held-out accuracy {100 * clf['held_out_accuracy']:.1f}%)")
    _atomic_text(out / "quality.json", json.dumps(result, indent=1) + "\n")
    _atomic_text(out / "quality.md", markdown(result))
    log(f"wrote {out / 'quality.md'}, quality.json, quality.png and {len(grids)} grids")
    return result


def parser():
    p = argparse.ArgumentParser(prog="python benchmarks/quality.py", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=DEFAULT_N,
                   help=f"samples per row, a multiple of 10 (default {DEFAULT_N})")
    p.add_argument("--rows", help="comma-separated <sampler>-<steps> (default: the whole curve: "
                   + ", ".join(f"{s} {'/'.join(map(str, v))}" for s, v in CURVE.items()) + ")")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality"))
    p.add_argument("--cache", help="sample cache folder (default OUT/cache)")
    p.add_argument("--model", help="a diffusers pipeline folder (default: the embedded model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, help="default: the model folder's fastdiff.json")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--grid-steps", type=int, default=20,
                   help="rows with this many steps get a grid next to DDPM-1000's (default 20)")
    p.add_argument("--classifier-epochs", type=int, default=30)
    p.add_argument("--threads", type=int, help="torch threads for sampling (default: torch's; "
                   "on a shared machine 1 wastes less time waiting for a descheduled thread)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    for name in ("batch_size", "classifier_epochs", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.command = "python benchmarks/quality.py" + "".join(
        f" {shlex.quote(a)}" for a in argv)
    try:
        run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
