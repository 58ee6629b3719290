"""The training loop: steps, exact resume, atomic checkpoints, DDP, pipeline folders, gradients
through the fused ops, EMA/LR semantics, every documented error, and the shipped digits model."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import fastdiff
from fastdiff import train as T
from fastdiff.schedule import Schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSET = os.path.join(ROOT, "fastdiff", "assets", "digits")

TINY = {"sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
        "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 4,
        "attention_head_dim": 8, "num_class_embeds": 11}


def _unet_impl():
    return "fastdiff" if hasattr(fastdiff, "UNet2DModel") else "diffusers"


def cfg(tmp_path, name="run", **kw):
    base = dict(data="digits", out=str(tmp_path / name), steps=4, batch_size=8,
                unet_config=dict(TINY), unet_impl=_unet_impl(), class_conditional=True,
                label_dropout=0.2, warmup_steps=2, checkpoint_every=2, sample_every=0,
                sample_steps=2, log_every=1, progress=False, objective="v_prediction",
                min_snr_gamma=5.0, offset_noise=0.1, flip=True)
    base.update(kw)
    return T.TrainConfig(**base)


def weights(tr):
    return {**{f"m.{k}": v for k, v in tr.model.state_dict().items()},
            **{f"e.{k}": v for k, v in tr.ema.module.state_dict().items()}}


def assert_bitwise(a, b):
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


def test_a_few_steps_write_everything(tmp_path):
    c = cfg(tmp_path, sample_every=2, grad_accum=2)
    tr = T.Trainer(c)
    init = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.run()
    assert tr.step == 4 and len(tr.history) == 4
    assert all(torch.isfinite(torch.tensor(v)) for _, v in tr.history)
    assert any(not torch.equal(init[k], v) for k, v in tr.model.state_dict().items())
    out = c.out
    for f in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
              "scheduler/scheduler_config.json", "loss.png", "log.txt", "fastdiff.json",
              "samples/step-00000002.png", "samples/step-00000004.png",
              "checkpoints/latest", "checkpoints/step-00000004/state.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert not os.path.exists(os.path.join(out, "checkpoints", "step-00000002"))  # keep 1
    from PIL import Image
    assert Image.open(os.path.join(out, "loss.png")).size == (640, 360)
    log = open(os.path.join(out, "log.txt")).read()
    assert "steps/s" in log and "images/s" in log and "lr" in log
    # the pipeline's weights are the EMA's
    from safetensors.torch import load_file
    sd = load_file(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    assert_bitwise(sd, tr.ema.module.state_dict())
    extra = json.load(open(os.path.join(out, "fastdiff.json")))
    assert extra["null_class_label"] == 10 and extra["class_names"] == [str(i) for i in range(10)]


class Killed(Exception):
    pass


def _kill_at(monkeypatch, step):
    real = T.Trainer.train_step

    def step_or_die(self):
        if self.step == step:
            raise Killed
        real(self)
    monkeypatch.setattr(T.Trainer, "train_step", step_or_die)


@pytest.mark.parametrize("kill_at", [3, 5])
def test_exact_resume_bitwise(tmp_path, monkeypatch, kill_at):
    full = T.Trainer(cfg(tmp_path, "full", steps=6, grad_accum=2)).run()
    c = cfg(tmp_path, "killed", steps=6, grad_accum=2)
    with monkeypatch.context() as m:
        _kill_at(m, kill_at)
        with pytest.raises(Killed):
            T.Trainer(c).run()
    resumed = T.Trainer(dataclasses.replace(c, resume=True)).run()
    assert resumed.step == 6
    assert_bitwise(weights(full), weights(resumed))
    so, ro = full.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    for i in so:
        for k in so[i]:
            assert torch.equal(so[i][k], ro[i][k])
    assert full.history == resumed.history


def test_kill_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    full = T.Trainer(cfg(tmp_path, "full", steps=6)).run()
    c = cfg(tmp_path, "killed", steps=6)
    real = T._save_tensors
    calls = {"n": 0}

    def save_then_die(path, tensors, metadata=None):
        if "state.safetensors" in path and calls["n"] == 1:  # the second checkpoint (step 4)
            with open(path, "wb") as f:  # half a file on disk, then the process dies
                f.write(b"\0" * 100)
            raise Killed
        if "state.safetensors" in path:
            calls["n"] += 1
        real(path, tensors, metadata)
    with monkeypatch.context() as m:
        m.setattr(T, "_save_tensors", save_then_die)
        with pytest.raises(Killed):
            T.Trainer(c).run()
    ck = os.path.join(c.out, "checkpoints")
    assert open(os.path.join(ck, "latest")).read().strip() == "step-00000002"
    assert any(n.startswith(".tmp-") for n in os.listdir(ck))  # the torn write
    resumed = T.Trainer(dataclasses.replace(c, resume=True)).run()
    assert not any(n.startswith(".tmp-") for n in os.listdir(ck))
    assert_bitwise(weights(full), weights(resumed))


def test_kill_9_mid_run_then_resume(tmp_path):
    """A real SIGKILL of `python -m fastdiff train` (at whatever point it is), then --resume."""
    cfgfile = tmp_path / "unet.json"
    cfgfile.write_text(json.dumps(TINY))
    args = [sys.executable, "-m", "fastdiff", "train", "--data", "digits", "--config",
            str(cfgfile), "--unet-impl", _unet_impl(), "--class-conditional", "--label-dropout",
            "0.2", "--steps", "5", "--batch-size", "8", "--checkpoint-every", "1",
            "--sample-every", "0", "--log-every", "1", "--warmup-steps", "2", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen(args + ["--out", str(tmp_path / "k")], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if line.startswith("step 2/5"):
            p.kill()
            break
    p.wait()
    r = subprocess.run(args + ["--out", str(tmp_path / "k"), "--resume"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "resumed at step" in r.stdout
    r = subprocess.run(args + ["--out", str(tmp_path / "u")], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "k" / "checkpoints" / "step-00000005" / "state.safetensors"))
    b = load_file(str(tmp_path / "u" / "checkpoints" / "step-00000005" / "state.safetensors"))
    assert_bitwise(a, b)


def test_ddp_two_gloo_processes_match_one(tmp_path):
    cfgfile = tmp_path / "unet.json"
    cfgfile.write_text(json.dumps(TINY))
    common = ["-m", "fastdiff", "train", "--data", "digits", "--config", str(cfgfile),
              "--unet-impl", _unet_impl(), "--class-conditional", "--label-dropout", "0.2",
              "--steps", "3", "--batch-size", "8", "--checkpoint-every", "0", "--sample-every",
              "0", "--log-every", "1", "--warmup-steps", "1", "--objective", "epsilon",
              "--device", "cpu", "--adam-eps", "1e-2", "--no-progress"]
    # Adam's first steps move every weight by ~lr whatever the size of its gradient, so a weight
    # whose gradient is rounding noise (e.g. to_k.bias: softmax ignores it) could step either
    # way; a large eps keeps the update Lipschitz in the gradient, so the two runs' different
    # summation orders stay at rounding level
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0"]
                       + common + ["--out", str(tmp_path / "ddp")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 rank(s) x 1 x 4" in r.stdout
    single = T.Trainer(T.TrainConfig(
        data="digits", out=str(tmp_path / "one"), steps=3, batch_size=8, unet_config=dict(TINY),
        unet_impl=_unet_impl(), class_conditional=True, label_dropout=0.2, checkpoint_every=0,
        sample_every=0, log_every=1, warmup_steps=1, objective="epsilon", adam_eps=1e-2,
        progress=False)).run()
    from safetensors.torch import load_file
    ddp = load_file(str(tmp_path / "ddp" / "checkpoints" / "step-00000003" / "state.safetensors"))
    one = {f"model.{k}": v for k, v in single.model.state_dict().items()}
    init = T.Trainer(dataclasses.replace(single.cfg, out=str(tmp_path / "init"))).model
    moved = 0
    for k, v in one.items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-6, msg=k)
        moved += int(not torch.equal(v, init.state_dict()[k[6:]]))
    assert moved > len(one) // 2  # the runs trained, so their agreement means something
    log = [ln for ln in r.stdout.splitlines() if ln.startswith("step 3/3")]
    assert len(log) == 1  # one writer


def test_shards_draw_the_whole_batch_noise():
    """A micro-batch/rank at first_index k gets the noise of images k.. of the whole batch."""
    s = Schedule("squaredcos_cap_v2", 1000)
    x0 = torch.randn(6, 1, 4, 4)
    t = torch.randint(0, 1000, (6,))
    xt, eps, v = T._draw_noised(x0, t, s, 1234, 0, True)
    xt2, eps2, v2 = T._draw_noised(x0[2:], t[2:], s, 1234, 2, True)
    torch.testing.assert_close(eps2, eps[2:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xt2, xt[2:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v2, v[2:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("objective", T.OBJECTIVES)
def test_loss_matches_plain_pytorch(tmp_path, objective):
    """The trainer's loss (fused q_sample, offset noise folded in after it, min-SNR weights)
    against the textbook formula on the same noise, and their gradients."""
    tr = T.Trainer(cfg(tmp_path, objective=objective))
    x0 = tr.data.images(torch.arange(4))
    t = torch.tensor([0, 10, 500, 999])
    labels = torch.tensor([1, 2, 10, 4])
    off = torch.randn(4, 1) * 0.1
    loss = tr.loss(x0, t, labels, 77, 0, off)
    g = torch.autograd.grad(loss, list(tr.model.parameters()))
    eps = fastdiff.reference.memory_order_normal(77, t, 0, x0)
    ab = tr.schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    e = eps + off[:, :, None, None]
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * e
    target = {"epsilon": e, "v_prediction": ab.sqrt() * e - (1 - ab).sqrt() * x0,
              "sample": x0}[objective]
    pred = tr.model(x_t, t, class_labels=labels).sample
    per = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    snr = (ab / (1 - ab)).flatten()
    w = snr.clamp(max=5.0)
    w = {"epsilon": w / snr, "v_prediction": w / (snr + 1), "sample": w}[objective]
    ref = (per * w).mean()
    g_ref = torch.autograd.grad(ref, list(tr.model.parameters()))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_gradcheck_fused_ops_float64():
    """The U-Net's fused ops under autograd: gradcheck in float64 against finite differences."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.1 * torch.randn(4, dtype=torch.float64)).requires_grad_()
    b = (0.1 * torch.randn(4, dtype=torch.float64)).requires_grad_()
    add = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b, a: fastdiff.group_norm_silu(x, w, b, 2, add=a), (x, w, b, add))
    q, k, v = (torch.randn(1, 2, 5, 32, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    assert torch.autograd.gradcheck(lambda q, k, v: fastdiff.attention(q, k, v), (q, k, v))


def test_ema_matches_diffusers_emamodel():
    from diffusers.training_utils import EMAModel
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ours = T.EMA(net, max_decay=0.99, min_decay=0.1, inv_gamma=2.0, power=0.75,
                 update_after_step=2)
    theirs = EMAModel(net.parameters(), decay=0.99, min_decay=0.1, inv_gamma=2.0, power=0.75,
                      update_after_step=2, use_ema_warmup=True)
    for _ in range(12):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ours.step(net)
        theirs.step(net.parameters())
        assert ours.decay(ours.optimization_step) == theirs.cur_decay_value
    for a, b in zip(ours.module.parameters(), theirs.shadow_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    plain = T.EMA(net, use_warmup=False)
    assert plain.decay(5) == (1 + 4) / (10 + 4) and plain.decay(1) == 0.0


def test_lr_schedule():
    c = T.TrainConfig(steps=110, lr=1.0, warmup_steps=10)
    assert T.lr_at(0, c) == pytest.approx(0.1) and T.lr_at(9, c) == pytest.approx(1.0)
    assert T.lr_at(10, c) == pytest.approx(1.0) and T.lr_at(60, c) == pytest.approx(0.5)
    assert T.lr_at(110, c) == pytest.approx(0.0, abs=1e-12)
    assert T.lr_at(60, dataclasses.replace(c, lr_schedule="constant")) == 1.0


def test_pipeline_folder_loads_in_diffusers_and_fastdiff(tmp_path):
    tr = T.Trainer(cfg(tmp_path, steps=2)).run()
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    pipe = DDPMPipeline.from_pretrained(tr.out)
    assert isinstance(pipe.unet, UNet2DModel) and isinstance(pipe.scheduler, DDPMScheduler)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert_bitwise(pipe.unet.state_dict(), tr.ema.module.state_dict())
    s = Schedule.from_config(os.path.join(tr.out, "scheduler", "scheduler_config.json"))
    torch.testing.assert_close(s.alphas_cumprod, tr.schedule.alphas_cumprod, rtol=0, atol=0)
    if hasattr(fastdiff, "UNet2DModel"):
        m = fastdiff.UNet2DModel.from_pretrained(tr.out, subfolder="unet")
        assert_bitwise(m.state_dict(), tr.ema.module.state_dict())
    if hasattr(fastdiff, "DDPMPipeline"):
        p = fastdiff.DDPMPipeline.from_pretrained(tr.out)
        assert_bitwise(p.unet.state_dict(), tr.ema.module.state_dict())


# -- errors --------------------------------------------------------------------------------
def test_error_resume_from_another_config(tmp_path):
    T.Trainer(cfg(tmp_path, steps=2)).run()
    with pytest.raises(ValueError, match=r"another config: lr: checkpoint 0\.001, now 0\.002"):
        T.Trainer(cfg(tmp_path, steps=2, lr=2e-3, resume=True)).run()


def test_error_existing_run_without_resume(tmp_path):
    T.Trainer(cfg(tmp_path, steps=2)).run()
    with pytest.raises(ValueError, match="already holds a training run.*--resume"):
        T.Trainer(cfg(tmp_path, steps=2)).run()


@pytest.mark.parametrize("kw, match", [
    (dict(batch_size=6, grad_accum=4), "multiple of world size 1 x grad_accum 4"),
    (dict(mixed_precision="fp16", device="cpu"), "fp16' needs a CUDA device"),
    (dict(class_conditional=False), "label_dropout .* needs class_conditional"),
    (dict(label_dropout=0.0, class_conditional=False), "config is class-conditional"),
    (dict(unet_config={**TINY, "num_class_embeds": 10}), "num_class_embeds >= 11"),
    (dict(unet_config={**TINY, "in_channels": 3}), "in_channels=3 but the data"),
    (dict(objective="x0"), "objective must be one of"),
    (dict(mixed_precision="fp8"), "mixed_precision must be one of"),
    (dict(steps=0), "steps must be a positive int"),
    (dict(lr=-1.0), "lr must be a positive number"),
    (dict(label_dropout=1.0), r"label_dropout must be in \[0, 1\)"),
    (dict(min_snr_gamma=0.0), "min_snr_gamma must be > 0"),
    (dict(ema_max_decay=1.0), "EMA decays need"),
    (dict(timesteps="sometimes"), "timesteps must be one of"),
])
def test_errors(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        T.Trainer(cfg(tmp_path, **kw))


def test_cli_flags_and_errors(tmp_path, capsys):
    from fastdiff.cli import main
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit):
        main(["train", "--data", "digits", "--out", str(tmp_path / "o"), "--config", str(bad)])
    assert "cannot read a JSON UNet2DModel config" in capsys.readouterr().err
    good = tmp_path / "unet.json"
    good.write_text(json.dumps(TINY))
    assert main(["train", "--data", "digits", "--out", str(tmp_path / "o"), "--config",
                 str(good), "--unet-impl", _unet_impl(), "--steps", "1", "--batch-size", "4",
                 "--class-conditional", "--label-dropout", "0.1", "--lr", "1e-3",
                 "--objective", "sample", "--seed", "3", "--checkpoint-every", "1",
                 "--sample-every", "1", "--sample-steps", "2", "--mixed-precision", "no",
                 "--device", "cpu", "--resolution", "8", "--no-progress"]) == 0
    assert os.path.isfile(tmp_path / "o" / "samples" / "step-00000001.png")
    assert main(["train", "--data", "digits", "--out", str(tmp_path / "o"), "--config",
                 str(good), "--unet-impl", _unet_impl(), "--steps", "1", "--batch-size", "4",
                 "--class-conditional", "--no-progress"]) == 2
    assert "already holds a training run" in capsys.readouterr().err


# -- the shipped model ---------------------------------------------------------------------
def test_shipped_digits_model_loads_with_expected_config():
    conf = json.load(open(os.path.join(ASSET, "unet", "config.json")))
    assert conf["_class_name"] == "UNet2DModel" and conf["num_class_embeds"] == 11
    assert conf["sample_size"] == 8 and conf["in_channels"] == conf["out_channels"] == 1
    sched = json.load(open(os.path.join(ASSET, "scheduler", "scheduler_config.json")))
    extra = json.load(open(os.path.join(ASSET, "fastdiff.json")))
    assert extra["null_class_label"] == 10 and sched["prediction_type"] == extra["objective"]
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ASSET) for f in fs)
    assert size <= 10 * 2 ** 20
    from diffusers import DDPMPipeline
    pipe = DDPMPipeline.from_pretrained(ASSET)
    assert pipe.unet.config.num_class_embeds == 11
    if hasattr(fastdiff, "UNet2DModel"):
        m = fastdiff.UNet2DModel.from_pretrained(ASSET, subfolder="unet")
        assert_bitwise(m.state_dict(), pipe.unet.state_dict())
    # guided DDIM on the shipped weights gives digit-like images: mostly background (-1), some ink
    x = T.ddim_sample(pipe.unet, Schedule.from_config(sched), (10, 1, 8, 8), steps=10,
                      objective=sched["prediction_type"], class_labels=torch.arange(10),
                      null_class=10, guidance_scale=extra["guidance_scale"])
    ink = (x > 0).float().mean(dim=(1, 2, 3))
    assert ((ink > 0.1) & (ink < 0.7)).all(), ink


def test_wheel_ships_the_digits_model(tmp_path):
    """A non-editable install carries the asset: build a wheel (pure Python) and look inside."""
    env = dict(os.environ, FASTDIFF_SKIP_EXT="1")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path), ROOT], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    import zipfile
    whl = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / whl[0]).namelist()
    for f in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
              "scheduler/scheduler_config.json", "fastdiff.json"):
        assert f"fastdiff/assets/digits/{f}" in names, f
