"""attention: fastdiff's attention (on CPU: its reference) vs F.scaled_dot_product_attention."""
import pytest
import torch
import torch.nn.functional as F

from benchmarks import micro

mod = pytest.importorskip("fastdiff.ops.attention")
SHAPES = micro.sizes([(4, 1, 256, 64), (2, 4, 256, 40)], [(1, 1, 16, 32)])  # B, H, L, D
DTYPE = torch.float16 if micro.DEVICE == "cuda" else torch.float32


@pytest.mark.parametrize("impl", micro.impls("attention", mod.IMPLEMENTED))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention(benchmark, shape, impl):
    q, k, v = (torch.randn(shape, device=micro.DEVICE, dtype=DTYPE) for _ in range(3))
    o = micro.run(benchmark, impl, lambda: mod.attention(q, k, v),
                  lambda: F.scaled_dot_product_attention(q, k, v), f"attention {tuple(shape)}")
    assert o.shape == q.shape
