"""`python -m fastdiff sample` / fastdiff.generate: the grid, PNG and npz folders, the manifest,
resume, torchrun sharding (2 gloo processes) and ^C, on CPU with a tiny pipeline folder."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import fastdiff.generate as gen
from fastdiff import cli

diffusers = pytest.importorskip("diffusers")

from test_samplers import tiny_unet  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1")
FASTDIFF = [sys.executable, "-m", "fastdiff"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses run one thread too: the same arithmetic
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe")
    sched = diffusers.DDPMScheduler(num_train_timesteps=100)
    diffusers.DDPMPipeline(unet=tiny_unet(scale=0.3), scheduler=sched).save_pretrained(path)
    return str(path)


def files(d):
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}


def run(*argv, **kw):
    return subprocess.run([*FASTDIFF, *argv], env=ENV, capture_output=True,
                          text=True, timeout=300, **kw)


ARGS = ["--steps", "4", "--n", "7", "--batch-size", "2", "--seed", "5", "--device", "cpu",
        "--no-progress"]


def test_grid_default(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["sample", "--model", folder, *ARGS]) == 0
    assert capsys.readouterr().out.strip() == "samples.png"
    from PIL import Image
    im = Image.open(tmp_path / "samples.png")
    # 7 images, 3 columns, 8x8 images enlarged 4x to 32x32 cells, 2 pixels of padding
    assert im.size == (3 * 34 + 2, 3 * 34 + 2) and im.mode == "RGB"
    grid = np.asarray(im)
    pipe = gen.load_pipeline(folder, "ddim")
    want = (pipe.scheduler.sample(pipe.unet, batch_size=7, num_inference_steps=4, seed=5,
                                  output_type="np", progress=False) * 255).round()
    cell = want[4].astype(np.uint8).repeat(4, axis=0).repeat(4, axis=1)
    np.testing.assert_array_equal(grid[36:68, 36:68], cell)  # row 1, col 1


def test_default_model_grid(tmp_path, monkeypatch):
    # the README's first command: the embedded digits model, two rows of the ten classes, cells
    # enlarged to 32 px, its fastdiff.json's steps and guidance
    monkeypatch.chdir(tmp_path)
    defaults = gen.model_defaults(None)
    assert defaults == {"num_inference_steps": 10, "guidance_scale": 1.5}
    assert cli.main(["sample", "--device", "cpu", "--no-progress"]) == 0
    from PIL import Image
    im = Image.open(tmp_path / "samples.png")
    assert im.size == (10 * 34 + 2, 2 * 34 + 2)


def test_png_folder_resume_and_manifest(folder, tmp_path, capsys):
    out = tmp_path / "imgs"
    assert cli.main(["sample", "--model", folder, *ARGS, "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    first = files(out)
    assert sorted(first) == [f"{i:06d}.png" for i in range(7)] + ["manifest.json"]
    manifest = json.loads(first["manifest.json"])
    assert manifest["seed"] == 5 and manifest["n"] == 7 and manifest["sampler"] == "ddim"
    # image 3 of the run is image 3 whatever the batch it was made in: the per-image noise
    pipe = gen.load_pipeline(folder, "ddim")
    one = pipe.scheduler.sample(pipe.unet, batch_size=2, first_index=2, num_inference_steps=4,
                                seed=5, output_type="np", progress=False)
    from PIL import Image
    np.testing.assert_array_equal(np.asarray(Image.open(out / "000003.png")),
                                  (one[1] * 255).round().astype(np.uint8))
    # resume: removed images and a stale temp file from a killed run; the rest are kept
    for f in ("000002.png", "000006.png", "000000.png"):
        os.remove(out / f)
    (out / "000004.png.tmp-999").write_bytes(b"partial")
    os.utime(out / "000001.png", (1, 1))
    assert cli.main(["sample", "--model", folder, *ARGS, "--out", str(out)]) == 0
    assert files(out) == first
    assert os.stat(out / "000001.png").st_mtime == 1  # not rewritten
    # other settings: a clear error, nothing written
    capsys.readouterr()
    assert cli.main(["sample", "--model", folder, *ARGS[:-3], "--out", str(out),
                     "--seed", "6", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds images made with other settings (seed: folder has 5, asked 6)" in err
    with pytest.raises(gen.ManifestMismatch, match="steps: folder has 4, asked 5"):
        gen.generate(folder, steps=5, n=7, batch_size=2, seed=5, out=str(out), device="cpu",
                     progress=False)
    assert files(out) == first


def test_npz_shards(folder, tmp_path):
    png, npz = tmp_path / "png", tmp_path / "npz"
    kw = dict(steps=4, n=5, batch_size=2, seed=1, device="cpu", progress=True)
    gen.generate(folder, out=str(png), format="png", **kw)
    gen.generate(folder, out=str(npz), format="npz", **kw)
    names = sorted(f for f in os.listdir(npz) if f.endswith(".npz"))
    assert names == ["samples_000000_000002.npz", "samples_000002_000004.npz",
                     "samples_000004_000005.npz"]
    arr = np.concatenate([np.load(npz / f)["arr_0"] for f in names])
    assert arr.dtype == np.uint8 and arr.shape == (5, 8, 8, 3)
    from PIL import Image
    for i in range(5):
        np.testing.assert_array_equal(arr[i], np.asarray(Image.open(png / f"{i:06d}.png")))


def test_torchrun_two_processes_equal_one(folder, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r = run("sample", "--model", folder, *ARGS, "--out", str(one))
    assert r.returncode == 0, r.stderr
    # torchrun's parser takes `--n` for an abbreviation of its own flags: -n / --num-images
    targs = ["--num-images" if a == "--n" else a for a in ARGS]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--master_port=29533", "-m", "fastdiff", "sample", "--model", folder,
                        *targs, "--out", str(two)], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(two)  # printed by rank 0 only
    a, b = files(one), files(two)
    assert sorted(a) == sorted(b)
    assert {k: v for k, v in a.items() if k != "manifest.json"} == \
        {k: v for k, v in b.items() if k != "manifest.json"}


def test_ctrl_c_leaves_whole_images_and_resume_completes(folder, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = ["sample", "--model", folder, "--steps", "30", "--n", "24", "--batch-size", "2",
            "--device", "cpu", "--no-progress", "--sampler", "ddpm"]
    # a suite started in the background (`pytest &`) runs with SIGINT ignored, which children
    # inherit and Python then never turns into KeyboardInterrupt: restore the default for it
    p = subprocess.Popen([*FASTDIFF, *args, "--out", str(out)], env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline and not (out.exists() and
                                          len([f for f in os.listdir(out) if f.endswith(".png")])
                                          >= 4):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "only whole images were written" in err
    left = sorted(os.listdir(out))
    assert 4 <= len(left) - 1 < 24 and not [f for f in left if ".tmp" in f]
    from PIL import Image
    for f in left:
        if f.endswith(".png"):
            Image.open(out / f).load()  # whole files
    assert run(*args, "--out", str(out)).returncode == 0
    assert run(*args, "--out", str(ref)).returncode == 0
    assert files(out) == files(ref)


def test_errors(folder, tmp_path, monkeypatch, capsys):
    kw = dict(steps=2, device="cpu", progress=False)
    with pytest.raises(ValueError, match="n must be a positive int"):
        gen.generate(folder, n=0, **kw)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        gen.generate(folder, batch_size=0, **kw)
    with pytest.raises(ValueError, match="format must be one of"):
        gen.generate(folder, format="jpg", out=str(tmp_path), **kw)
    with pytest.raises(ValueError, match="writes a folder: give out"):
        gen.generate(folder, format="npz", **kw)
    with pytest.raises(ValueError, match="must be a folder for format='png'"):
        gen.generate(folder, format="png", out=str(tmp_path / "a.png"), **kw)
    with pytest.raises(ValueError, match="dtype must be one of"):
        gen.generate(folder, dtype="int8", out=str(tmp_path / "g.png"), **kw)
    with pytest.raises(ValueError, match="eta applies to the ddim sampler only"):
        gen.generate(folder, sampler="ddpm", eta=0.5, out=str(tmp_path / "g.png"), **kw)
    with pytest.raises(ValueError, match="sampler must be one of"):
        gen.generate(folder, sampler="euler", out=str(tmp_path / "g.png"), **kw)
    with pytest.raises(ValueError, match="the model is not class-conditional"):
        gen.generate(folder, class_label=1, out=str(tmp_path / "g.png"), **kw)
    monkeypatch.setattr(gen, "DEFAULT_MODEL", str(tmp_path / "no-model"))
    assert cli.main(["sample", "--out", str(tmp_path / "g.png")]) == 2
    assert "the embedded default model is not in this install" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="with torchrun write a folder"):
        gen.generate(folder, out=str(tmp_path / "g.png"), **kw)
    monkeypatch.delenv("WORLD_SIZE")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{")
    with pytest.raises(gen.ManifestMismatch, match="not valid JSON"):
        gen.generate(folder, out=str(tmp_path / "bad"), **kw)
