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
KERNELS = []  # the CompiledKernel of every launch, in order


def _compile_only(self, *args, **kwargs):
    kwargs["warmup"] = True  # compile, do not launch
    kernel = _run(self, *args, **kwargs)
    COMPILED.append(f"{self.fn.__name__}: {len(kernel.asm['cubin'])} bytes of sm_90 cubin")
    KERNELS.append(kernel)
    return kernel


def code_properties(kernel) -> dict:
    """What the compiled code shows: global loads by width, cp.async count (PTX), and registers,
    stack and local (spill) bytes per thread (cuobjdump -res-usage on the cubin)."""
    import collections
    import re
    import subprocess
    import tempfile

    import triton
    ptx = kernel.asm["ptx"]
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    res = {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", usage)}
    return {"loads": dict(collections.Counter(re.findall(r"ld\.global[.\w]*", ptx))),
            "cp_async": len(re.findall(r"cp\.async\.", ptx)),
            "regs": res["REG"], "stack": res["STACK"], "local": res["LOCAL"],
            "warps": kernel.metadata.num_warps, "stages": kernel.metadata.num_stages}


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


def _multistep_inputs(shape, dtype, K, guided=False, channels_last=False):
    from fastdiff.ops.multistep_step import empty_ring
    x = torch.randn(shape).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    mo = torch.randn((2 * shape[0],) + tuple(shape[1:]) if guided else shape).to(dtype)
    ring = empty_ring(x, K).normal_()
    return x, mo, ring, torch.empty_like(ring[0]).normal_()


def multistep_step():
    coefs = torch.rand(8, 14, dtype=torch.float64) + 0.5
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for K in (1, 2, 3):
            x, mo, ring, last = _multistep_inputs((2, 4, 8, 8), dtype, K)
            for pred in ("epsilon", "sample", "v_prediction"):
                fastdiff.multistep_step(x, mo, ring, coefs, 5, prediction_type=pred,
                                        last_sample=last, clip_sample=True)
            fastdiff.multistep_step(x, mo, ring, coefs, torch.tensor(3), seed=1,
                                    thresholding=True)
            fastdiff.multistep_step(x, mo, ring, coefs, 2, noise=torch.randn_like(x), out=x)
        x, mo, ring, last = _multistep_inputs((2, 4, 8, 8), dtype, 3, guided=True,
                                              channels_last=True)
        fastdiff.multistep_step(x, mo, ring, coefs, 7, last_sample=last, seed=torch.tensor(3),
                                first_index=torch.tensor(5), guidance_scale=torch.tensor(2.0))
        fastdiff.multistep_step(x, mo, ring, coefs, 1, seed=2 ** 40, guidance_scale=1.5,
                                thresholding=True)
    x, mo, ring, _ = _multistep_inputs((3, 5), torch.float32, 2)  # unaligned samples
    fastdiff.multistep_step(x, mo, ring, coefs, 0, seed=1)


# multistep_step at its step-time benchmark's shapes (benchmarks/suites_multistep.py)
MULTISTEP_BENCH_SHAPES = [(16, 4, 64, 64), (16, 3, 32, 32)]


def multistep_properties():
    """One JSON line per multistep_step kernel variant the benchmark launches (fp16/bf16, the
    DPM-Solver++ 2M, its SDE variant with drawn noise and UniPC's corrector with guidance and
    thresholding), with its loads/stores by width and its code properties."""
    import collections
    import json
    import re
    coefs = torch.rand(8, 14, dtype=torch.float64) + 0.5
    cases = {"2m": dict(K=2), "2m-sde": dict(K=2, seed=3),
             "unipc-guided-threshold": dict(K=3, last=True, guided=True, thresholding=True)}
    for dtype in (torch.float16, torch.bfloat16):
        for shape in MULTISTEP_BENCH_SHAPES:
            for name, case in cases.items():
                case = dict(case)
                x, mo, ring, last = _multistep_inputs(shape, dtype, case.pop("K"),
                                                      guided=case.pop("guided", False))
                kw = dict(seed=case.pop("seed", None), thresholding=case.pop("thresholding", False),
                          last_sample=last if case.pop("last", False) else None)
                if mo.shape[0] != x.shape[0]:
                    kw["guidance_scale"] = 2.0
                fastdiff.multistep_step(x, mo, ring, coefs, torch.tensor(4), **kw)
                kernel = KERNELS[-1]
                stores = collections.Counter(re.findall(r"st\.global[.\w]*", kernel.asm["ptx"]))
                print(json.dumps({"dtype": str(dtype).split(".")[-1], "shape": shape,
                                  "case": name, "stores": dict(stores),
                                  **code_properties(kernel)}))


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


# The attention shapes of the benchmark (anchors-h100.md) and of Stable Diffusion's
# cross-attention (77 keys): (B, H, Lq, Lk, D). Tile choice depends on D, dtype and short
# lengths only, so B = 1 and H = 2 compile the variant the benchmark runs.
ATTENTION_BENCH_SHAPES = [(256, 256, 256), (1024, 1024, 128), (4096, 4096, 40), (1024, 1024, 80),
                          (4096, 4096, 64), (4096, 77, 40), (1024, 77, 80), (256, 77, 160),
                          (256, 256, 32), (256, 256, 160)]


def attention_properties():
    """One JSON line per benchmark-shape fp16/bf16 attention variant with its code properties."""
    import json
    for dtype in (torch.float16, torch.bfloat16):
        for lq, lk, D in ATTENTION_BENCH_SHAPES:
            q = torch.randn(1, 2, lq, D).to(dtype)
            k = torch.randn(1, 2, lk, D).to(dtype)
            fastdiff.attention(q, k, k)
            props = code_properties(KERNELS[-1])
            print(json.dumps({"dtype": str(dtype).split(".")[-1], "Lq": lq, "Lk": lk, "D": D,
                              "layout": "dense", **props}))
        # AttentionBlock's layout: q, k, v strided views of one packed (B, L, 3, H, D) GEMM
        # output, SD's first level (8 heads of 40)
        qkv = torch.randn(1, 4096, 3, 8, 40).to(dtype)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        fastdiff.attention(q, k, v)
        print(json.dumps({"dtype": str(dtype).split(".")[-1], "Lq": 4096, "Lk": 4096, "D": 40,
                          "layout": "packed qkv", **code_properties(KERNELS[-1])}))


# group_norm_silu at the benchmark's shapes (anchors-h100.md), 32 groups
GROUP_NORM_BENCH_SHAPES = [(256, 128, 32, 32), (256, 256, 16, 16), (2, 320, 64, 64),
                           (2, 640, 32, 32), (8, 128, 256, 256)]


def group_norm_properties():
    """One JSON line per kernel launched by group_norm_silu at the benchmark shapes (fp16/bf16,
    NCHW and channels_last, with the time-embedding add) with its code properties."""
    import collections
    import json
    import re
    for dtype in (torch.float16, torch.bfloat16):
        for shape in GROUP_NORM_BENCH_SHAPES:
            for layout in ("nchw", "channels_last"):
                x = torch.randn(shape).to(dtype)
                if layout == "channels_last":
                    x = x.to(memory_format=torch.channels_last)
                C = shape[1]
                n0 = len(KERNELS)
                fastdiff.group_norm_silu(x, torch.randn(C), torch.randn(C), 32,
                                         add=torch.randn(shape[0], C))
                for kernel in KERNELS[n0:]:
                    stores = collections.Counter(re.findall(r"st\.global[.\w]*",
                                                            kernel.asm["ptx"]))
                    print(json.dumps({"dtype": str(dtype).split(".")[-1], "shape": shape,
                                      "layout": layout, "kernel": kernel.name,
                                      "stores": dict(stores), **code_properties(kernel)}))


def sass_counts(cubin: bytes, tool: str) -> dict:
    """Instructions of a kernel's SASS (cuobjdump -sass), NOPs left out: `main` up to the first
    unpredicated EXIT (what follows are called slow-path subroutines: float64 division and
    sqrt), `loop` the body of its one backward branch (0 when loop-free)."""
    import re
    import subprocess
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    ins = re.findall(r"/\*([0-9a-f]{4,})\*/\s+((?:@!?U?P\w+\s+)?[A-Z][^;]*);", sass)
    ins = [(int(a, 16), text) for a, text in ins if not text.split()[-1].startswith("NOP")
           and not text.startswith("NOP")]
    main, loop = [], 0
    for addr, text in ins:
        main.append(addr)
        m = re.match(r"(?:@!?P\w+\s+)?BRA\s+(?:P\w+,\s*)?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            loop = sum(1 for a, _ in ins if int(m.group(1), 16) <= a <= addr)
        if text.strip() == "EXIT":
            break
    return {"main": len(main), "loop": loop}


# q_sample / sampler_step at the benchmark's shapes (benchmarks/suites.py Q_SHAPES, S_SHAPES)
NOISE_BENCH_SHAPES = [(256, 3, 32, 32), (64, 4, 64, 64), (32, 3, 256, 256), (16, 4, 64, 64),
                      (16, 3, 256, 256)]


def noise_properties():
    """One JSON line per noise-kernel variant at the benchmark shapes (drawn noise; fp32, fp16,
    bf16): its SASS counts, elements a thread handles per tile, tiles a program loops over, and
    for sampler_step the SASS count of its per-sample coefficient pre-pass (`prepass`: one lane
    a sample, COEF_BLOCK samples a warp), included in per_elem."""
    import json
    import triton
    from fastdiff.kernels import q_sample as kq, sampler_step as ks
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    s = fastdiff.Schedule()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape in NOISE_BENCH_SHAPES:
            x = torch.randn(shape).to(dtype)
            B, per = shape[0], x[0].numel()
            t = torch.full((B,), 500)
            rows = []
            n0 = len(KERNELS)
            fastdiff.q_sample(x, t, s, seed=1234)
            R, warps = kq.plan(per)
            rows.append(("q_sample", KERNELS[n0:], R, warps, 1, 6 * x.element_size() // 2))
            for kind, gap, kw in (("ddpm", 1, {}), ("ddim", 20, {"eta": 1.0})):
                n0 = len(KERNELS)
                fastdiff.sampler_step(x, torch.randn_like(x), t, t - gap, s, kind=kind,
                                      clip_sample=True, seed=1234, **kw)
                R, warps, P = ks.plan(B, per)
                tiles = -(-(-(-per // 4)) // R)
                rows.append((f"sampler_step {kind}", KERNELS[n0:], R, warps, -(-tiles // P),
                             6 * x.element_size() // 2))
            for name, launched, R, warps, tpp, nbytes in rows:
                main = [k for k in launched if k.name != "_sampler_coef_kernel"]
                pre = [k for k in launched if k.name == "_sampler_coef_kernel"]
                assert len(main) == 1 and len(pre) == (name != "q_sample"), launched
                kernel = main[0]
                c = sass_counts(kernel.asm["cubin"], tool)
                ept = 4 * R // (32 * warps)
                body = c["loop"] or c["main"]
                rest = c["main"] - c["loop"] if c["loop"] else 0
                # the pre-pass: one warp per COEF_BLOCK samples, every lane issuing its
                # straight-line code: thread-instruction slots per sample, over its elements
                pre_main = sass_counts(pre[0].asm["cubin"], tool)["main"] if pre else 0
                pre_slots = (pre_main * 32 * pre[0].metadata.num_warps / ks.COEF_BLOCK.value
                             if pre else 0)
                print(json.dumps({"op": name, "dtype": str(dtype).split(".")[-1], "shape": shape,
                                  "warps": kernel.metadata.num_warps, "elems_per_thread": ept,
                                  "tiles_per_program": tpp, "bytes_per_elem": nbytes, **c,
                                  "prepass": pre_main,
                                  "per_elem": round(body / ept + rest / (ept * tpp)
                                                    + pre_slots / per, 2),
                                  "shared": kernel.metadata.shared,
                                  **code_properties(kernel)}))


def seed_variants():
    """Compiled variants of the noise kernels over 24 fresh seeds and image offsets (ints of
    every width, both signs) at fixed shapes: one line per kernel with the count."""
    import collections
    import json
    import random
    rng = random.Random(0)
    s = fastdiff.Schedule()
    x = torch.randn(4, 3, 8, 8)
    t = torch.tensor([5, 6, 7, 8])
    for _ in range(24):
        seed = rng.choice([rng.randrange(16), rng.randrange(2 ** 31), rng.randrange(2 ** 64),
                           -rng.randrange(2 ** 63), 16 * rng.randrange(2 ** 20)])
        first = rng.choice([0, 16, rng.randrange(2 ** 31), rng.randrange(2 ** 32 - 4)])
        fastdiff.q_sample(x, t, s, seed=seed, first_index=first)
        fastdiff.sampler_step(x, torch.randn_like(x), t, t - 1, s, seed=seed, first_index=first)
    per = collections.Counter()
    for k in {id(k): k for k in KERNELS}.values():
        per[k.name] += 1
    for name, n in sorted(per.items()):
        print(json.dumps({"kernel": name, "variants": n}))


if __name__ == "__main__":
    with fastdiff.use_backend("triton"):
        globals()[sys.argv[1]]()
    for line in sorted(set(COMPILED)):
        print(line)
    print(f"{len(COMPILED)} launches compiled")
