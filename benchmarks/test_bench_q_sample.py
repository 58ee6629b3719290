"""q_sample: forward noising, eps drawn in the op (fastdiff) vs randn_like + the expression."""
import pytest
import torch

from benchmarks import micro

mod = pytest.importorskip("fastdiff.ops.q_sample")
SHAPES = micro.sizes([(64, 3, 32, 32), (8, 4, 64, 64)], [(2, 3, 8, 8)])


@pytest.mark.parametrize("impl", micro.impls("q_sample", mod.IMPLEMENTED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_q_sample(benchmark, shape, dtype, impl):
    from fastdiff import Schedule
    sched = Schedule("linear", 1000)
    x0 = torch.randn(shape, device=micro.DEVICE, dtype=dtype)
    t = torch.randint(0, 1000, (shape[0],), device=micro.DEVICE)
    a = sched.table("sqrt_alphas_cumprod", x0.device, dtype)[t].view(-1, 1, 1, 1)
    s = sched.table("sqrt_one_minus_alphas_cumprod", x0.device, dtype)[t].view(-1, 1, 1, 1)

    def eager():
        eps = torch.randn_like(x0)
        return a * x0 + s * eps, eps

    x_t, eps = micro.run(benchmark, impl, lambda: mod.q_sample(x0, t, sched, seed=1), eager,
                         f"q_sample {tuple(shape)} {dtype}")
    assert x_t.shape == x0.shape and eps.shape == x0.shape
