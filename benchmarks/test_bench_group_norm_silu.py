"""group_norm_silu: SiLU(GroupNorm(x)) in one pass vs F.silu(F.group_norm(...)), both layouts."""
import pytest
import torch
import torch.nn.functional as F

from benchmarks import micro

mod = pytest.importorskip("fastdiff.ops.group_norm_silu")
SHAPES = micro.sizes([(16, 128, 32, 32), (2, 320, 32, 32)], [(2, 32, 4, 4)])


@pytest.mark.parametrize("impl", micro.impls("group_norm_silu", mod.IMPLEMENTED))
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_group_norm_silu(benchmark, shape, dtype, layout, impl):
    fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
    x = torch.randn(shape, device=micro.DEVICE, dtype=dtype).contiguous(memory_format=fmt)
    w = 1 + 0.1 * torch.randn(shape[1], device=micro.DEVICE, dtype=dtype)
    b = 0.1 * torch.randn(shape[1], device=micro.DEVICE, dtype=dtype)
    y = micro.run(benchmark, impl, lambda: mod.group_norm_silu(x, w, b, 32),
                  lambda: F.silu(F.group_norm(x, 32, w, b)),
                  f"group_norm_silu {tuple(shape)} {dtype} {layout}")
    assert y.shape == x.shape
