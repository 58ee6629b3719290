"""sampler_step: one DDPM / DDIM step, z drawn in the op (fastdiff) vs the eager math with z."""
import pytest
import torch

from benchmarks import micro

mod = pytest.importorskip("fastdiff.ops.sampler_step")
SHAPES = micro.sizes([(64, 3, 32, 32), (8, 4, 64, 64)], [(2, 3, 8, 8)])


@pytest.mark.parametrize("impl", micro.impls("sampler_step", mod.IMPLEMENTED))
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sampler_step(benchmark, shape, kind, impl):
    from fastdiff import Schedule
    sched = Schedule("linear", 1000)
    dev = micro.DEVICE
    x, eps, z = (torch.randn(shape, device=dev) for _ in range(3))
    t = torch.full((shape[0],), 500, device=dev)
    tp = t - (1 if kind == "ddpm" else 20)
    ab = sched.table("alphas_cumprod", dev)
    at, ap = ab[t].view(-1, 1, 1, 1), ab[tp].view(-1, 1, 1, 1)

    def eager():  # epsilon prediction, clip_sample; DDPM fixed_small / DDIM eta=1 (same sigma)
        x0 = ((x - (1 - at).sqrt() * eps) / at.sqrt()).clamp(-1, 1)
        var = (1 - ap) / (1 - at) * (1 - at / ap)
        if kind == "ddpm":
            mean = (ap.sqrt() * (1 - at / ap) * x0 + (at / ap).sqrt() * (1 - ap) * x) / (1 - at)
            return mean + var.sqrt() * z
        return ap.sqrt() * x0 + (1 - ap - var).sqrt() * eps + var.sqrt() * z

    kw = dict(kind=kind, prediction_type="epsilon", clip_sample=True, seed=1)
    kw.update(variance_type="fixed_small") if kind == "ddpm" else kw.update(eta=1.0)
    out = micro.run(benchmark, impl, lambda: mod.sampler_step(x, eps, t, tp, sched, **kw), eager,
                    f"sampler_step {kind} {tuple(shape)}")
    assert out.shape == x.shape
