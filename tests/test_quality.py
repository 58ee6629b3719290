"""benchmarks/quality.py: its statistics against closed forms, its classifier, and the whole run
(cache, resume, the cache check, outputs) at tiny counts."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import quality  # noqa: E402
from fastdiff.generate import SAMPLERS, load_pipeline  # noqa: E402

diffusers = pytest.importorskip("diffusers")

from test_samplers import tiny_unet  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny class-conditional pipeline (10 classes + the null class) at the digits' 8x8 with
    v-prediction and clip_sample as the embedded model: the run's plumbing in seconds."""
    path = tmp_path_factory.mktemp("pipe")
    sched = diffusers.DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction",
                                    clip_sample=True)
    diffusers.DDPMPipeline(unet=tiny_unet(num_class_embeds=11, scale=0.3),
                           scheduler=sched).save_pretrained(path)
    (path / "fastdiff.json").write_text(json.dumps({"guidance_scale": 1.5}))
    return str(path)


def _spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    # diagonal (commuting) covariances: |mu1 - mu2|² + sum (sqrt a - sqrt b)²
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = quality.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(want, rel=1e-10)
    s = _spd(rng, 6)
    assert quality.frechet_distance(mu1[:1].repeat(6), s, mu1[:1].repeat(6), s) == \
        pytest.approx(0.0, abs=1e-9)
    # general covariances: against scipy's matrix square root of the product
    scipy_linalg = pytest.importorskip("scipy.linalg")
    s1, s2, m1, m2 = _spd(rng, 6), _spd(rng, 6), rng.standard_normal(6), rng.standard_normal(6)
    root = scipy_linalg.sqrtm(s1 @ s2).real
    want = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * root)
    got = quality.frechet_distance(m1, s1, m2, s2)
    assert got == pytest.approx(want, rel=1e-8)
    assert got == pytest.approx(quality.frechet_distance(m2, s2, m1, s1), rel=1e-10)
    with pytest.raises(ValueError, match="features"):
        quality.gaussian(np.ones((1, 3)))


def test_wilson_interval():
    lo, hi = quality.wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    lo, hi = quality.wilson(100, 100)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.9630, abs=1e-4)


def test_parse_row():
    assert quality.parse_row("dpmpp-2m-sde-20") == ("dpmpp-2m-sde", 20)
    assert quality.parse_row(" ddim-50 ") == ("ddim", 50)
    for bad in ("ddim", "ddim-", "-20", "ddim-x", "ddim-0"):
        with pytest.raises(ValueError, match="<sampler>-<steps>"):
            quality.parse_row(bad)


def test_default_rows_follow_the_install():
    rows, left_out = quality.default_rows(("ddpm", "ddim"))
    assert rows[0] == ("ddpm", 1000) and ("ddim", 100) in rows and len(rows) == 7
    assert left_out == ["dpmpp-2m", "dpmpp-3m", "dpmpp-2m-sde", "unipc"]
    rows, left_out = quality.default_rows(tuple(quality.CURVE))
    assert len(rows) == 1 + 6 + 4 * 4 and not left_out


def test_classifier_is_deterministic_and_accurate():
    xtr, ytr, xte, yte = quality.real_digits(0)
    assert len(xte) == quality.HELD_OUT and set(torch.bincount(yte).tolist()) <= {58, 59, 60, 61}
    assert xtr.min() == -1 and xtr.max() == 1 and xtr.shape[1:] == (1, 8, 8)
    a = quality.train_classifier(xtr, ytr, 0, epochs=1)
    b = quality.train_classifier(xtr, ytr, 0, epochs=1)
    assert quality.state_sha256(a) == quality.state_sha256(b)
    assert quality.state_sha256(a) != quality.state_sha256(quality.train_classifier(
        xtr, ytr, 1, epochs=1))
    # a short training already learns (the table reports the default's held-out accuracy)
    net = quality.train_classifier(xtr, ytr, 0, epochs=4)
    probs, feats = quality.classify(net, xte)
    assert (probs.argmax(1) == yte.numpy()).mean() >= 0.9
    assert feats.shape == (len(xte), 128) and np.allclose(probs.sum(1), 1)
    with pytest.raises(ValueError, match="8, 8"):
        quality.train_classifier(torch.zeros(4, 1, 4, 4), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_the_curve_starts_where_the_command_line_starts(sampler, folder):
    """The x_T the curve passes every row is the one each sampler draws itself for (seed,
    first_index): the curve's samples are `python -m fastdiff sample`'s."""
    s = quality.Sampling(folder, seed=3, batch_size=4)
    assert s.guidance == 1.5 and s.classes == 10
    pipe = load_pipeline(folder, sampler)
    kw = dict(num_inference_steps=2, seed=3, first_index=5, class_labels=s.labels(5, 7),
              guidance_scale=s.guidance, progress=False)
    own = pipe.scheduler.sample(pipe.unet, batch_size=2, **kw)
    ours = pipe.scheduler.sample(pipe.unet, latents=s.latents(5, 7), **kw)
    torch.testing.assert_close(ours, own, rtol=0, atol=0)
    assert s.labels(5, 7).tolist() == [5, 6]


def _run(tmp_path, folder, *extra):
    argv = ["--n", "20", "--rows", "ddpm-6,ddim-2,ddim-3", "--grid-steps", "3",
            "--batch-size", "10", "--classifier-epochs", "1", "--out", str(tmp_path / "out"),
            "--model", folder, *extra]
    assert quality.main(argv) == 0
    return json.loads((tmp_path / "out" / "quality.json").read_text())


def test_run_writes_the_table_plot_and_grids_and_resumes(tmp_path, folder, monkeypatch):
    from PIL import Image
    monkeypatch.setattr(quality, "BOOTSTRAP", 5)  # the distance's sd: a few resamples suffice
    # the four runs train the same classifier (deterministic: tested above): train it once
    trained, train = {}, quality.train_classifier
    monkeypatch.setattr(quality, "train_classifier", lambda x, y, seed=0, epochs=30: trained[
        (seed, epochs)] if (seed, epochs) in trained else trained.setdefault(
        (seed, epochs), train(x, y, seed, epochs=epochs)))
    first = _run(tmp_path, folder)
    out = tmp_path / "out"
    rows = {r["key"]: r for r in first["rows"]}
    assert list(rows) == ["ddpm-6", "ddim-2", "ddim-3"]
    for key, r in rows.items():
        assert r["model_calls"] == r["steps"] and r["n"] == 20 and r["batches"] == 2
        assert r["cached_batches"] == 0 and r["verified"] is None
        assert 0 <= r["accuracy"] <= 1 and r["accuracy_ci95"][0] <= r["accuracy"]
        assert r["frechet"] > 0 and len(r["per_class_accuracy"]) == 10
        assert math.isfinite(r["seconds"]) and r["seconds"] > 0
    assert first["grids"] == ["grid_ddim-3.png"]
    md = (out / "quality.md").read_text()
    assert md.count("\n| DD") == 3 and "held-out accuracy" in md and "contended" in md
    assert "python benchmarks/quality.py --n 20" in md
    assert set(first["machine"]["step_backends"]) == {"sampler_step", "multistep_step"}
    assert "backend (multistep_step)" in md
    with Image.open(out / "quality.png") as im:
        assert im.size == (1320, 560)
    with Image.open(out / "grid_ddim-3.png") as im:  # two panels of 10 x 2 cells of 32 px
        assert im.size[0] == 2 * (10 * 34 + 2) + 16 and im.size[1] == 26 + 2 * 34 + 2

    # a rerun takes every batch from the cache, checks it against fresh samples, same numbers
    again = _run(tmp_path, folder)
    for a, b in zip(first["rows"], again["rows"]):
        assert b["cached_batches"] == 2 and b["verified"] is True
        assert (a["accuracy"], a["frechet"], a["seconds"]) == \
            (b["accuracy"], b["frechet"], b["seconds"])

    # a cache that this fastdiff no longer reproduces is sampled again, not trusted
    f = out / "cache" / "ddim-2" / "000000_000010.npz"
    with np.load(f) as z:
        arrays = dict(z)
    arrays["images"] = 255 - arrays["images"]
    quality._atomic_npz(f, **arrays)
    third = _run(tmp_path, folder)
    r = next(r for r in third["rows"] if r["key"] == "ddim-2")
    assert r["cached_batches"] == 0 and r["accuracy"] == rows["ddim-2"]["accuracy"]
    assert r["frechet"] == pytest.approx(rows["ddim-2"]["frechet"], rel=1e-12)

    # other settings in the same cache folder: an error, not a mixed row
    assert quality.main(["--n", "20", "--rows", "ddim-2", "--guidance", "1.0",
                         "--classifier-epochs", "1", "--out", str(out), "--model", folder]) == 2


def test_errors(capsys, tmp_path):
    base = ["--classifier-epochs", "1", "--out", str(tmp_path)]
    assert quality.main(["--n", "15", *base]) == 2
    assert "multiple of 10" in capsys.readouterr().err
    assert quality.main(["--rows", "nosuch-10", *base]) == 2
    assert "nosuch" in capsys.readouterr().err
    assert quality.main(["--rows", "ddim", *base]) == 2
    assert "<sampler>-<steps>" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        quality.main(["--batch-size", "0", *base])
    with pytest.raises(SystemExit):
        quality.main(["--classifier-epochs", "0", "--out", str(tmp_path)])


def test_accuracy_delta_is_newcombes_interval():
    def row(k, n):
        return dict(accuracy=k / n, accuracy_ci95=list(quality.wilson(k, n)), n=n)
    # Newcombe (1998), Stat. Med. 17:873, table II, example (a): 56/70 - 48/80
    dp, lo, hi = quality.accuracy_delta(row(56, 70), row(48, 80))
    assert dp == pytest.approx(20.0) and lo == pytest.approx(5.24, abs=0.01) and \
        hi == pytest.approx(33.39, abs=0.01)
    # two perfect rows: an interval around 0, not a zero-width one
    dp, lo, hi = quality.accuracy_delta(row(500, 500), row(500, 500))
    assert dp == 0 and lo == pytest.approx(-100 * (1 - quality.wilson(500, 500)[0])) and hi == -lo
