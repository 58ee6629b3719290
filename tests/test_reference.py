"""The counter-based noise: Philox known answers, and the normals' statistics."""
import math

import pytest
import torch

from fastdiff.reference import (MASK32, image_normal, memory_order_normal, philox4x32,
                                philox_normal, split_seed, uniform_from_bits)


@pytest.mark.parametrize("counter, key, want", [
    # Random123 known-answer vectors for philox4x32-10
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter, key, want):
    got = philox4x32(*(torch.tensor(c) for c in counter), *(torch.tensor(k) for k in key))
    assert tuple(int(x) for x in got) == want


def _ks_statistic(x: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance between the sample and N(0, 1)."""
    x, _ = torch.sort(x.double())
    n = x.numel()
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - cdf).max().item(), (cdf - (i - 1) / n).max().item())


@pytest.mark.slow
def test_normals_are_standard_normal():
    n = 1_000_000
    x = philox_normal(7, 3, 0, n)
    assert abs(x.mean().item()) < 5 / math.sqrt(n)                 # ~5 sigma
    assert abs(x.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert _ks_statistic(x) < 1.63 / math.sqrt(n)                  # 1% critical value
    # each of the four Box-Muller lanes on its own, too
    for lane in range(4):
        assert _ks_statistic(x[lane::4]) < 1.63 / math.sqrt(n / 4)


def test_independent_across_steps_streams_seeds_and_lanes():
    n = 200_000
    base = philox_normal(7, 3, 0, n)
    bound = 5 / math.sqrt(n)
    for other in (philox_normal(7, 4, 0, n), philox_normal(7, 3, 1, n), philox_normal(8, 3, 0, n)):
        assert abs(torch.corrcoef(torch.stack([base, other]))[0, 1].item()) < bound
    # neighbouring elements (same Philox block: cos/sin pairs, and the two pairs)
    for lag in (1, 2, 3, 4):
        assert abs(torch.corrcoef(torch.stack([base[:-lag], base[lag:]]))[0, 1].item()) < bound
    # the pair (cos, sin) of one radius is uncorrelated in squares too (Box-Muller is exact)
    a, b = base[0::4] ** 2, base[1::4] ** 2
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5 / math.sqrt(n / 4)


def test_per_sample_steps_and_memory_order():
    x = torch.empty(2, 3, 4, 5).to(memory_format=torch.channels_last)
    steps = torch.tensor([10, 20])
    n = memory_order_normal(1, steps, 0, x, first_index=7)
    assert n.stride() == x.stride()
    # memory position j inside sample b holds normal j of image 7 + b at step[b]
    flat = torch.cat([philox_normal(1, 10, 0, 60, image=7), philox_normal(1, 20, 0, 60, image=8)])
    assert torch.equal(torch.as_strided(n, (120,), (1,)), flat.float())


def test_counter_is_group_image_step_stream():
    """The definition, word by word: counter (j // 4, image, step, stream), key = seed words."""
    seed, image, step, stream = 2 ** 40 + 3, 2 ** 31 + 9, 77, 1
    got = philox_normal(seed, step, stream, 12, image=image, start=8)
    j = torch.arange(8, 20)
    k0, k1 = split_seed(seed)
    r = philox4x32(j >> 2, torch.tensor(image), torch.tensor(step), torch.tensor(stream), k0, k1)
    u = [uniform_from_bits(x) for x in r]
    th_a, th_b = ((6.2831854820251465 * v.float()).double() for v in (u[1], u[3]))
    ra, rb = (-2 * u[0].log()).sqrt(), (-2 * u[2].log()).sqrt()
    want = torch.stack([ra * th_a.cos(), ra * th_a.sin(), rb * th_b.cos(), rb * th_b.sin()], 1)
    want = want.gather(1, (j & 3)[:, None])[:, 0]
    assert torch.equal(got, want)


def test_noise_is_per_image_whatever_the_batch():
    """Image 12's noise from batches of 1, 7 and 64, at positions 0 and 5 (first_index 12 and
    7), in both layouts: equal; its neighbours' differ."""
    want = memory_order_normal(3, 40, 1, torch.empty(1, 3, 4, 5), first_index=12)[0]
    for B, pos in ((1, 0), (7, 0), (7, 5), (64, 5)):
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.empty(B, 3, 4, 5).to(memory_format=fmt)
            n = memory_order_normal(3, 40, 1, x, first_index=12 - pos)
            got = n[pos] if fmt == torch.contiguous_format else \
                torch.as_strided(n, (B, 60), (60, 1))[pos].view(3, 4, 5)
            assert torch.equal(got, want), (B, pos, fmt)
            if B > 1:
                assert not torch.equal(n[pos - 1 if pos else 1], n[pos])


def test_tensor_seed_and_image_index_equal_ints():
    for seed in (5, -1, 2 ** 63 + 11, 2 ** 32 + 1):
        s64 = seed & (2 ** 64 - 1)
        st = torch.tensor(s64 - 2 ** 64 if s64 >= 2 ** 63 else s64)
        a = image_normal(seed, torch.tensor([3, 2 ** 32 - 1]), torch.tensor([4, 5]), 0, 9)
        b = image_normal(st, torch.tensor([3, 2 ** 32 - 1]), torch.tensor([4, 5]), 0, 9)
        assert torch.equal(a, b), seed
    x = torch.empty(3, 10)
    assert torch.equal(memory_order_normal(torch.tensor(4), torch.tensor([1, 2, 3]), 0, x,
                                           torch.tensor([6])),
                       memory_order_normal(4, torch.tensor([1, 2, 3]), 0, x, 6))
    # image index and step are 32-bit counter words
    assert torch.equal(philox_normal(1, 3, 0, 8, image=2 ** 32 + 5), philox_normal(1, 3, 0, 8, image=5))
    assert not torch.equal(philox_normal(1, 3, 0, 8, image=6), philox_normal(1, 3, 0, 8, image=5))
    assert MASK32 == 2 ** 32 - 1


def test_seed_uses_all_64_bits():
    a = philox_normal(1, 0, 0, 16)
    b = philox_normal(1 + 2 ** 32, 0, 0, 16)
    c = philox_normal(-1, 0, 0, 16)
    d = philox_normal(2 ** 64 - 1, 0, 0, 16)
    assert not torch.equal(a, b)
    assert torch.equal(c, d)  # a seed is its low 64 bits
