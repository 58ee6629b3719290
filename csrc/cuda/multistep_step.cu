// One multistep-solver step on the GPU. Grid (x: chunks of a sample, y: sample b): every thread
// reads the step's row (from the device when the step is a tensor: a replayed CUDA graph sees
// its fill_()), forms the float32 coefficients once (a dozen flops), then grid-strides over the
// Philox groups of 4 of sample b, body in multistep_step_part (the CPU kernel's scalar body).
// 64-bit indices throughout; round keys, 1 / thresh and the per-clip-mode loops as in
// sampler_step.cu.
#include <ATen/core/Tensor.h>
#include <torch/library.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "multistep_step_args.h"
#include "value_checks.h"

namespace fastdiff {
namespace {

constexpr int kThreads = 256;  // threads per block (the kernels' launch bounds)

// Launch bounds: at most 80 registers (3 blocks of kThreads resident per SM; 96 for float64),
// which the drawn-noise variants, round keys held in registers, exceeded unbounded (up to 96).
template <typename scalar_t, int kNoise, int kK, bool kLast>
__global__ void __launch_bounds__(kThreads, sizeof(scalar_t) == 8 ? 2 : 3)
multistep_step_kernel(const scalar_t* __restrict__ x_t, const scalar_t* __restrict__ mo,
                      const scalar_t* __restrict__ noise, const double* __restrict__ coefs,
                      const int64_t* __restrict__ step_ptr, int64_t step_arg, int64_t num_steps,
                      const float* __restrict__ thresh, float* ring, float* last, scalar_t* out,
                      MultistepLayout L, int64_t B) {
  // ring, last and out carry no __restrict__: out may be x_t (in place), each element is read
  // before it is written by the same thread
  const int64_t s = multistep_clamp_step(step_ptr != nullptr ? __ldg(step_ptr) : step_arg, num_steps);
  const MultistepCoef c = multistep_coef(coefs + s * kMultistepNcoef, L.pred);
  const int slot = static_cast<int>(s % L.K);
  PhiloxKey pk{};
  if (kNoise == kMsNoiseDrawn) pk = block_philox_key(key_seed(L.key));
  const uint32_t first = key_first(L.key);
  const float w = multistep_guidance(L);
  const int64_t gps = groups_per_sample(L.per_sample);
  // The loops over samples and groups, with the clip mode and the whole-group (Vec4) path
  // compile-time values inside (vec: L.vec; clip: L.clip there, so each copy holds only its
  // own clip code; the scalar path keeps clip a runtime value).
  auto loops = [&](auto vec, auto clip_c) {
    constexpr int kClip = decltype(clip_c)::value;
    MultistepLayout Lv = L;
    Lv.vec = decltype(vec)::value;
    if (kClip >= 0) Lv.clip = kClip;
    for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
      const float th = Lv.clip == kMsClipThreshold ? __ldg(thresh + b) : 1.0f;
      // the elements' division by th (a float64 division once per sample, only where used)
      const double th_inv = Lv.clip == kMsClipThreshold ? 1.0 / static_cast<double>(th) : 1.0;
      const uint32_t image = image_index(first, b);
      const int64_t off = b * L.per_sample;  // the sample's first element (b = 0 below)
      for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < gps;
           k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        multistep_step_part<scalar_t, kNoise, kK, kLast>(
            0, k, c, th, w, pk, image, static_cast<uint32_t>(s), slot, Lv, x_t + off, mo + off,
            at_sample(noise, off), ring + off, at_sample(last, off), out + off, th_inv);
      }
    }
  };
  using Runtime = std::integral_constant<int, -1>;
  if (!L.vec) {
    loops(std::false_type{}, Runtime{});
  } else if (L.clip == kMsClipRange) {
    loops(std::true_type{}, std::integral_constant<int, kMsClipRange>{});
  } else if (L.clip == kMsClipThreshold) {
    loops(std::true_type{}, std::integral_constant<int, kMsClipThreshold>{});
  } else {
    loops(std::true_type{}, std::integral_constant<int, kMsClipNone>{});
  }
}

void multistep_step_cuda(const at::Tensor& x_t, const at::Tensor& model_output, at::Tensor ring,
                         const at::Tensor& coefs, int64_t step,
                         const c10::optional<at::Tensor>& step_t,
                         c10::optional<at::Tensor> last_sample,
                         const c10::optional<at::Tensor>& noise,
                         const c10::optional<at::Tensor>& thresh, int64_t seed,
                         const c10::optional<at::Tensor>& seed_t, int64_t first_index,
                         const c10::optional<at::Tensor>& first_t, bool draw_noise,
                         int64_t prediction_type, int64_t clip_mode, double clip_sample_range,
                         int64_t cond_offset, double guidance,
                         const c10::optional<at::Tensor>& guidance_t, at::Tensor out,
                         int64_t checks) {
  FD_CHECK(x_t.is_cuda() && model_output.is_cuda() && ring.is_cuda() && coefs.is_cuda() &&
           out.is_cuda() && (!last_sample || last_sample->is_cuda()) &&
           (!noise || noise->is_cuda()) && (!thresh || thresh->is_cuda()),
           "multistep_step (cuda): tensors must be CUDA tensors");
  const NoiseKey key = device_noise_key(seed, seed_t, first_index, first_t, x_t, "multistep_step");
  const MultistepPlan p = multistep_plan(x_t, model_output, ring, coefs, step_t, last_sample,
                                         noise, thresh, key, draw_noise, prediction_type,
                                         clip_mode, clip_sample_range, cond_offset, guidance,
                                         guidance_t, out);
  if (p.numel == 0) return;
  const int64_t B = p.B;
  const c10::cuda::CUDAGuard guard(x_t.device());
  const int threads = kThreads;
  const int64_t groups = groups_per_sample(p.layout.per_sample);
  const int64_t max_blocks = std::max<int64_t>(1, static_cast<int64_t>(sm_count(x_t.get_device())) * 16 / B);
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((groups + threads - 1) / threads, max_blocks)),
                  static_cast<unsigned>(std::min<int64_t>(B, 65535)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* sp = step_t ? step_t->data_ptr<int64_t>() : nullptr;
  const float* thr = clip_mode == kMsClipThreshold ? thresh->data_ptr<float>() : nullptr;
  float* lp = last_sample ? last_sample->data_ptr<float>() : nullptr;
  launch_value_checks({nullptr, nullptr, B, 0, false, sp, p.num_steps, key.first_ptr,
                       cond_offset != 0 ? p.layout.w_ptr : nullptr}, checks, stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "multistep_step_cuda", [&] {
    if constexpr (!std::is_same<scalar_t, double>::value) {  // float64 runs the reference
      const scalar_t* np = noise ? noise->data_ptr<scalar_t>() : nullptr;
      multistep_variants(p.noise_mode, p.layout.K, p.has_last, [&](auto nz, auto kk, auto kl) {
        multistep_step_kernel<scalar_t, decltype(nz)::value, decltype(kk)::value,
                              decltype(kl)::value><<<grid, threads, 0, stream>>>(
            x_t.data_ptr<scalar_t>(), model_output.data_ptr<scalar_t>(), np,
            coefs.data_ptr<double>(), sp, step, p.num_steps, thr, ring.data_ptr<float>(), lp,
            out.data_ptr<scalar_t>(), p.layout, B);
      });
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff_ext, CUDA, m) { m.impl("multistep_step", &fastdiff::multistep_step_cuda); }
