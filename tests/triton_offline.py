"""Compile (not run) every Triton kernel the public ops launch, for an sm_90 GPU, on a machine
with no GPU: the interpreter accepts code the compiler rejects (non-constexpr globals, dtype
mismatches, libdevice calls), so this is the only pre-GPU check of the real compile path.

Usage: python tests/triton_offline.py OP   (run by tests/test_triton_compiles.py in a subprocess,
because TRITON_INTERPRET must be unset before triton is imported). Prints one line per compiled
kernel variant and exits 0 when every launch compiled."""
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.driver import CudaDriver  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class OfflineDriver(CudaDriver):
    """A CUDA driver that never touches libcuda: enough for JITFunction to compile."""

    def __init__(self):  # noqa: D107 - skip CudaDriver's libcuda setup
        pass

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    @staticmethod
    def is_active():
        return True

    def get_device_interface(self):
        return torch.cuda

    def get_active_torch_device(self):
        return torch.device("cpu")


driver.set_active(OfflineDriver())
_run = JITFunction.run
COMPILED = []


def _compile_only(self, *args, **kwargs):
    kwargs["warmup"] = True  # compile, do not launch
    kernel = _run(self, *args, **kwargs)
    COMPILED.append(f"{self.fn.__name__}: {len(kernel.asm['cubin'])} bytes of sm_90 cubin")
    return kernel


JITFunction.run = _compile_only

import fastdiff  # noqa: E402
from fastdiff import backends  # noqa: E402

# let the triton backend take CPU tensors, as under the interpreter
backends._interpret = lambda: True
backends._triton_import.cache_clear()


def q_sample():
    s = fastdiff.Schedule()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(4, 3, 8, 8).to(dtype)
        t = torch.tensor([1, 2, 3, 4])
        fastdiff.q_sample(x, t, s, seed=1, v_target=True)
        fastdiff.q_sample(x, t, s, noise=torch.randn_like(x))
    fastdiff.q_sample(torch.randn(3, 5), torch.tensor([1, 2, 3]), s, seed=1)  # unaligned
    # seed / first_index read from device tensors, and ints that need all 32/64 bits
    x = torch.randn(4, 3, 8, 8)
    fastdiff.q_sample(x, torch.tensor([1, 2, 3, 4]), s, seed=torch.tensor(7),
                      first_index=torch.tensor([9]))
    fastdiff.q_sample(x, torch.tensor([1, 2, 3, 4]), s, seed=2 ** 63 + 5, first_index=2 ** 31 + 1)


def sampler_step():
    s = fastdiff.Schedule()
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 4, 8, 8).to(dtype)
        t, tp = torch.tensor([10, 5]), torch.tensor([9, -1])
        for pred in ("epsilon", "sample", "v_prediction"):
            fastdiff.sampler_step(x, torch.randn_like(x), t, tp, s, prediction_type=pred,
                                  clip_sample=True, seed=1)
        fastdiff.sampler_step(x, torch.randn(2, 8, 8, 8).to(dtype), t, tp, s,
                              variance_type="learned_range", seed=1)
        fastdiff.sampler_step(x, torch.randn_like(x), t, tp, s, kind="ddim", eta=1.0, seed=1,
                              thresholding=True)
        fastdiff.sampler_step(x, torch.randn_like(x), t, tp, s, noise=torch.randn_like(x),
                              return_x0=True)
        mo2 = torch.rand(4, 8, 8, 8).to(dtype)  # guided ([uncond; cond]) learned variance
        fastdiff.sampler_step(x, mo2, t, tp, s, variance_type="learned", seed=torch.tensor(3),
                              first_index=torch.tensor(5), guidance_scale=3.0)
        fastdiff.sampler_step(x, mo2, t, tp, s, variance_type="learned_range", seed=1,
                              guidance_scale=torch.tensor(2.0))
        fastdiff.sampler_step(x, torch.randn(4, 4, 8, 8).to(dtype), t, tp - 20, s, kind="ddim",
                              eta=0.5, seed=2 ** 40, guidance_scale=1.5, thresholding=True)


def group_norm_silu():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape, G in (((2, 64, 16, 16), 32), ((1, 32, 96, 96), 1), ((4, 8, 5, 7), 8),
                         ((2, 320, 64, 64), 32)):
            x = torch.randn(shape).to(dtype)
            C = shape[1]
            w, b, a = torch.randn(C), torch.randn(C), torch.randn(shape[0], C)
            fastdiff.group_norm_silu(x, w, b, G, add=a)
            fastdiff.group_norm_silu(x.to(memory_format=torch.channels_last), None, None, G,
                                     activation=None)
            sc, sh = torch.randn(shape[0], C), torch.randn(shape[0], C)
            fastdiff.group_norm_silu(x, w, b, G, add=a, scale=sc, shift=sh)
            fastdiff.group_norm_silu(x.to(memory_format=torch.channels_last), w, b, G, scale=sc,
                                     shift=sh)


def attention():
    # every head-dim class in fp16 (full and tail key blocks), one bf16 and one fp32 variant;
    # the launcher's table picks the tiles, so this compiles what the GPU would run
    cases = [(torch.float16, D, 256, 256) for D in (32, 40, 64, 80, 128, 160, 256)]
    cases += [(torch.float16, 40, 4096, 77), (torch.bfloat16, 64, 1024, 1024),
              (torch.float32, 64, 256, 256)]
    for dtype, D, lq, lk in cases:
        q = torch.randn(1, 2, lq, D).to(dtype)
        k = torch.randn(1, 2, lk, D).to(dtype)
        fastdiff.attention(q, k, k)


if __name__ == "__main__":
    with fastdiff.use_backend("triton"):
        globals()[sys.argv[1]]()
    for line in sorted(set(COMPILED)):
        print(line)
    print(f"{len(COMPILED)} launches compiled")
