// One DDPM / DDIM reverse step on the GPU. Grid (x: chunks of a sample, y: sample b): one thread
// of each block computes its sample's coefficients (float64: a few hundred instructions, which
// every thread repeated for its ~1-2 groups before) into shared memory, then the block
// grid-strides over the sample's Philox groups of 4, so each normal is drawn once per sample.
// 64-bit indices throughout. Per launch: the Philox round keys (block_philox_key); per sample:
// 1 / thresh in float64 (div_by_sample); the whole-group loop is compiled once per clip mode
// (in the kernel) and per guidance / x0 written (kernel variants), so none carries another's
// code (the threshold's division was ~18 instructions an element, guidance ~4).
#include <ATen/core/Tensor.h>
#include <torch/library.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include "sampler_step_args.h"
#include "value_checks.h"

namespace fastdiff {
namespace {

constexpr int kThreads = 256;  // threads per block (the kernels' launch bounds)

// grid (chunks, min(B, 65535)): a block works on one sample at a time, so its coefficients are
// computed once per sample; a grid-stride loop over the sample's Philox groups, body in
// sampler_step_part. Batches beyond grid axis y's 65535 stride over samples too. The noise key
// and guidance scale may be device values (read here: a replayed graph sees their updates).
// Launch bounds: at most 80 registers (3 blocks of kThreads resident per SM; 96 for float64),
// which the drawn-noise variants, round keys held in registers, exceeded unbounded (up to 96).
// kGuide / kX0: the whole-group loop reads the guidance's conditional half / writes x0 (compile
// time: the plain loop carries neither's instructions, ~4 an element for guidance); only the
// <false, false> instantiation has the scalar path, where both stay run-time (launch_variant).
template <typename scalar_t, int kNoise, int kStd, bool kSplit, bool kGuide, bool kX0>
__global__ void __launch_bounds__(kThreads, sizeof(scalar_t) == 8 ? 2 : 3)
sampler_step_kernel(const scalar_t* __restrict__ x_t, const scalar_t* __restrict__ mo,
                    const scalar_t* __restrict__ noise, const int64_t* __restrict__ t,
                    const int64_t* __restrict__ t_prev, const double* __restrict__ ab,
                    const float* __restrict__ thresh, scalar_t* __restrict__ x_prev,
                    scalar_t* __restrict__ x0, SamplerStepLayout L, int64_t num_t,
                    SamplerStepConfig cfg, int64_t B) {
  PhiloxKey pk{};
  if (kNoise == kNoiseDrawn) pk = block_philox_key(key_seed(L.key));
  const uint32_t first = key_first(L.key);
  const float w = guidance_scale(L);
  const float clip_range = static_cast<float>(cfg.clip_range);
  const int64_t gps = groups_per_sample(L.per_sample);
  __shared__ SamplerStepCoef coef;
  // The loops over samples and groups, with the clip mode and the whole-group (Vec4) path
  // compile-time values inside (vec: L.vec; clip: cfg.clip there, so each copy holds only its
  // own clip code; the scalar path keeps clip a runtime value).
  auto loops = [&](auto vec, auto clip_c) {
    constexpr bool kVec = decltype(vec)::value;
    constexpr int kClip = decltype(clip_c)::value;
    SamplerStepLayout Lv = L;
    Lv.vec = kVec;
    const int clip = kClip >= 0 ? kClip : cfg.clip;
    for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
      const int64_t tb = clamp_index(__ldg(t + b), num_t);
      if (threadIdx.x == 0) coef = sampler_step_coef(ab, num_t, tb, __ldg(t_prev + b), cfg);
      __syncthreads();
      const SamplerStepCoef c = coef;
      const float s = clip == kClipThreshold ? __ldg(thresh + b) : 1.0f;
      // the elements' division by s (a float64 division once per sample, only where used)
      const double s_inv = clip == kClipThreshold ? 1.0 / static_cast<double>(s) : 1.0;
      const uint32_t image = image_index(first, b);
      // the sample's pointers, formed once per sample (b = 0 below): in the loop, nvcc re-formed
      // b * per_sample and b * mo_bs with 64-bit multiplies in every iteration
      const int64_t off = b * L.per_sample;
      const scalar_t* const xs = x_t + off;
      const scalar_t* const ms = mo + b * L.mo_bs;
      const scalar_t* const ns = at_sample(noise, off);
      scalar_t* const ps = x_prev + off;
      scalar_t* const os = at_sample(x0, off);
      for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < gps;
           k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        // the scalar path: guidance and x0 at run time
        constexpr int kG = kVec ? static_cast<int>(kGuide) : -1, kO = kVec ? static_cast<int>(kX0) : -1;
        sampler_step_part<scalar_t, kNoise, kStd, kSplit, kG, kO>(0, k, tb, pk, image, w, c, s,
                                                                  clip, clip_range, Lv, xs, ms,
                                                                  ns, ps, os, s_inv);
      }
      __syncthreads();  // every thread has read coef before thread 0 writes the next sample's
    }
  };
  using Runtime = std::integral_constant<int, -1>;
  if constexpr (kSplit) {
    loops(std::false_type{}, Runtime{});
  } else {
    // (kGuide, kX0 only launched with L.vec: their kernels hold no scalar path)
    if constexpr (!kGuide && !kX0) {
      if (!L.vec) {
        loops(std::false_type{}, Runtime{});
        return;
      }
    }
    if (cfg.clip == kClipRange) {
      loops(std::true_type{}, std::integral_constant<int, kClipRange>{});
    } else if (cfg.clip == kClipThreshold) {
      loops(std::true_type{}, std::integral_constant<int, kClipThreshold>{});
    } else {
      loops(std::true_type{}, std::integral_constant<int, kClipNone>{});
    }
  }
}

void sampler_step_cuda(const at::Tensor& x_t, const at::Tensor& model_output, const at::Tensor& t,
                       const at::Tensor& t_prev, const at::Tensor& alphas_cumprod,
                       const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& thresh,
                       int64_t seed, const c10::optional<at::Tensor>& seed_t, int64_t first_index,
                       const c10::optional<at::Tensor>& first_t, bool needs_noise, int64_t kind,
                       int64_t prediction_type, int64_t variance_type, double eta,
                       int64_t clip_mode, double clip_sample_range, bool set_alpha_to_one,
                       bool use_clipped_model_output, int64_t mo_batch_stride, int64_t mo_inner,
                       int64_t mo_row_stride, int64_t var_offset, int64_t cond_offset,
                       double guidance, const c10::optional<at::Tensor>& guidance_t,
                       at::Tensor x_prev, at::Tensor x0, int64_t checks) {
  FD_CHECK(x_t.is_cuda() && model_output.is_cuda() && t.is_cuda() && t_prev.is_cuda() &&
           alphas_cumprod.is_cuda(), "sampler_step (cuda): tensors must be CUDA tensors");
  const NoiseKey key = device_noise_key(seed, seed_t, first_index, first_t, x_t, "sampler_step");
  const SamplerStepPlan p = sampler_step_plan(
      x_t, model_output, t, t_prev, alphas_cumprod, noise, thresh, key, needs_noise, kind,
      prediction_type, variance_type, eta, clip_mode, clip_sample_range, set_alpha_to_one,
      use_clipped_model_output, mo_batch_stride, mo_inner, mo_row_stride, var_offset,
      cond_offset, guidance, guidance_t, x_prev, x0);
  // the kernel reads these through raw pointers on the GPU
  FD_CHECK(t.is_contiguous() && t_prev.is_contiguous() && alphas_cumprod.is_contiguous() &&
           (!noise || noise->is_cuda()) && x_prev.is_cuda() && (x0.numel() == 0 || x0.is_cuda()) &&
           (clip_mode != kClipThreshold || (thresh->is_cuda() && thresh->is_contiguous())),
           "sampler_step (cuda): t, t_prev, alphas_cumprod and thresh must be contiguous CUDA "
           "tensors, noise, x_prev and x0 CUDA tensors");
  if (p.numel == 0) return;
  const int64_t B = p.B, per_sample = p.layout.per_sample;
  const c10::cuda::CUDAGuard guard(x_t.device());
  const int threads = kThreads;
  const int64_t groups = groups_per_sample(per_sample);
  const int64_t max_blocks = std::max<int64_t>(1, static_cast<int64_t>(sm_count(x_t.get_device())) * 16 / B);
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((groups + threads - 1) / threads, max_blocks)),
                  static_cast<unsigned>(std::min<int64_t>(B, 65535)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  launch_value_checks({t.data_ptr<int64_t>(), t_prev.data_ptr<int64_t>(), B, alphas_cumprod.numel(),
                       kind == kDDPM, nullptr, 0, key.first_ptr,
                       cond_offset != 0 ? p.layout.w_ptr : nullptr}, checks, stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "sampler_step_cuda", [&] {
    const scalar_t* np = noise ? noise->data_ptr<scalar_t>() : nullptr;
    scalar_t* x0p = x0.numel() ? x0.data_ptr<scalar_t>() : nullptr;
    const float* thr = clip_mode == kClipThreshold ? thresh->data_ptr<float>() : nullptr;
    // guidance / x0 as compile-time variants of the whole-group loop; the split layout and the
    // scalar path (not vec) take them at run time, in the <false, false> kernel
    const bool whole = !p.split && p.layout.vec;
    const int opt = whole ? (p.layout.cond_off != 0 ? 2 : 0) + (x0p != nullptr ? 1 : 0) : 0;
    sampler_step_variants(p.noise_mode, p.std_mode, p.split, [&](auto kNoise, auto kStd, auto kSplit) {
      auto launch = [&](auto guide, auto with_x0) {
        sampler_step_kernel<scalar_t, decltype(kNoise)::value, decltype(kStd)::value,
                            decltype(kSplit)::value, decltype(guide)::value,
                            decltype(with_x0)::value><<<grid, threads, 0, stream>>>(
            x_t.data_ptr<scalar_t>(), model_output.data_ptr<scalar_t>(), np, t.data_ptr<int64_t>(),
            t_prev.data_ptr<int64_t>(), alphas_cumprod.data_ptr<double>(), thr,
            x_prev.data_ptr<scalar_t>(), x0p, p.layout, alphas_cumprod.numel(), p.cfg, B);
      };
      using F = std::false_type;
      using T = std::true_type;
      if constexpr (decltype(kSplit)::value) {
        launch(F{}, F{});
      } else {
        if (opt == 0) launch(F{}, F{});
        else if (opt == 1) launch(F{}, T{});
        else if (opt == 2) launch(T{}, F{});
        else launch(T{}, T{});
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff_ext, CUDA, m) { m.impl("sampler_step", &fastdiff::sampler_step_cuda); }
