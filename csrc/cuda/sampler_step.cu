// One DDPM / DDIM reverse step on the GPU. Grid (x: chunks of a sample, y: sample b): every
// thread computes its sample's coefficients once (float64, a few dozen flops, no shared memory
// or barrier), then grid-strides over the Philox groups of 4 that overlap sample b, so each
// normal is drawn once per sample (a group straddling two samples is drawn by each sample's
// blocks with its own t, as the reference defines). 64-bit indices throughout.
#include <ATen/core/Tensor.h>
#include <torch/library.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include "sampler_step.h"

namespace fastdiff {
namespace {

enum NoiseMode : int { kNoiseNone = 0, kNoiseGiven = 1, kNoiseDrawn = 2 };

template <typename scalar_t, int kNoise, bool kLearned, bool kSplit>
__global__ void sampler_step_kernel(const scalar_t* __restrict__ x_t, const scalar_t* __restrict__ mo,
                                    const scalar_t* __restrict__ noise, const int64_t* __restrict__ t,
                                    const int64_t* __restrict__ t_prev, const double* __restrict__ ab,
                                    const float* __restrict__ thresh, scalar_t* __restrict__ x_prev,
                                    scalar_t* __restrict__ x0, int64_t per_sample, int64_t mo_bs,
                                    int64_t mo_inner, int64_t mo_rs, int64_t var_off, int64_t num_t,
                                    uint64_t seed, SamplerStepConfig cfg) {
  const int64_t b = blockIdx.y;
  const int64_t tb = clamp_index(__ldg(t + b), num_t);
  const SamplerStepCoef c = sampler_step_coef(ab, num_t, tb, __ldg(t_prev + b), cfg);
  const float s = cfg.clip == kClipThreshold ? __ldg(thresh + b) : 1.0f;
  const float clip_range = static_cast<float>(cfg.clip_range);
  const bool add_noise = kNoise != kNoiseNone && c.noise_on;
  const int64_t first = b * per_sample, last = first + per_sample;  // [first, last) of sample b
  const int64_t g_first = first >> 2, g_end = ((last - 1) >> 2) + 1;
  for (int64_t g = g_first + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < g_end;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Normal4 n{};
    if (kNoise == kNoiseDrawn && add_noise)
      n = normal4(seed, static_cast<uint64_t>(g), static_cast<uint32_t>(tb), kStreamSamplerStep);
    const int64_t i0 = max(4 * g, first), i1 = min(4 * g + 4, last);
#pragma unroll 4
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t j = i - first;
      const int64_t mo_off = kSplit ? b * mo_bs + (j / mo_inner) * mo_rs + j % mo_inner : b * mo_bs + j;
      const float x = static_cast<float>(x_t[i]), m = static_cast<float>(mo[mo_off]);
      const float x0c = sampler_step_x0(c, cfg.clip, clip_range, s, x, m);
      float out = sampler_step_mean(c, x0c, x, m);
      if (add_noise) {
        const float z = kNoise == kNoiseGiven ? static_cast<float>(noise[i]) : lane(n, i);
        const float v = kLearned ? static_cast<float>(mo[mo_off + var_off]) : 0.0f;
        out += sampler_step_std(c, kLearned, v) * z;
      }
      x_prev[i] = static_cast<scalar_t>(out);
      if (x0 != nullptr) x0[i] = static_cast<scalar_t>(x0c);
    }
  }
}

void sampler_step_cuda(const at::Tensor& x_t, const at::Tensor& model_output, const at::Tensor& t,
                       const at::Tensor& t_prev, const at::Tensor& alphas_cumprod,
                       const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& thresh,
                       int64_t seed, bool needs_noise, int64_t kind, int64_t prediction_type,
                       int64_t variance_type, double eta, int64_t clip_mode,
                       double clip_sample_range, bool set_alpha_to_one,
                       bool use_clipped_model_output, int64_t mo_batch_stride, int64_t mo_inner,
                       int64_t mo_row_stride, int64_t var_offset, at::Tensor x_prev, at::Tensor x0) {
  FD_CHECK(x_t.is_cuda() && model_output.is_cuda() && t.is_cuda() && t_prev.is_cuda() &&
           alphas_cumprod.is_cuda(), "sampler_step (cuda): tensors must be CUDA tensors");
  const int64_t B = x_t.dim() ? x_t.size(0) : 0;
  FD_CHECK(t.scalar_type() == at::kLong && t.numel() == B && t.is_contiguous() &&
           t_prev.scalar_type() == at::kLong && t_prev.numel() == B && t_prev.is_contiguous(),
           "sampler_step: t and t_prev must be contiguous int64 of shape (B,)");
  FD_CHECK(alphas_cumprod.scalar_type() == at::kDouble && alphas_cumprod.numel() > 0 &&
           alphas_cumprod.is_contiguous(),
           "sampler_step: alphas_cumprod must be a non-empty contiguous float64 table");
  FD_CHECK(model_output.scalar_type() == x_t.scalar_type(),
           "sampler_step: model_output must have x_t's dtype");
  FD_CHECK(x_prev.strides() == x_t.strides() && x_prev.scalar_type() == x_t.scalar_type(),
           "sampler_step: x_prev must be laid out like x_t");
  FD_CHECK(x0.numel() == 0 || x0.strides() == x_t.strides(), "sampler_step: x0 must be laid out like x_t");
  FD_CHECK(!noise || (noise->strides() == x_t.strides() && noise->scalar_type() == x_t.scalar_type() &&
                      noise->is_cuda()),
           "sampler_step: noise must be laid out like x_t, in its dtype");
  FD_CHECK(kind == kDDPM || kind == kDDIM, "sampler_step: bad kind ", kind);
  FD_CHECK(prediction_type >= 0 && prediction_type <= 2, "sampler_step: bad prediction_type");
  FD_CHECK(variance_type >= 0 && variance_type <= 4, "sampler_step: bad variance_type");
  FD_CHECK(clip_mode >= 0 && clip_mode <= 2, "sampler_step: bad clip_mode");
  FD_CHECK(clip_mode != kClipThreshold ||
           (thresh && thresh->scalar_type() == at::kFloat && thresh->numel() == B &&
            thresh->is_cuda() && thresh->is_contiguous()),
           "sampler_step: thresholding needs thresh, contiguous float32 of shape (B,)");
  FD_CHECK(B <= 65535, "sampler_step: batch size must be at most 65535");
  const int64_t numel = x_t.numel();
  if (numel == 0) return;
  const int64_t per_sample = numel / B;
  FD_CHECK(mo_inner > 0 && per_sample % mo_inner == 0, "sampler_step: bad model_output layout");
  const bool learned = kind == kDDPM && variance_type == kLearnedRange;
  FD_CHECK(learned || mo_inner == per_sample, "sampler_step: split model_output layout is for learned_range only");
  const int64_t last = (B - 1) * mo_batch_stride + (per_sample / mo_inner - 1) * mo_row_stride +
                       mo_inner - 1 + (learned ? var_offset : 0);
  FD_CHECK(mo_batch_stride >= 0 && mo_row_stride >= 0 && var_offset >= 0 &&
           last < model_output.numel(), "sampler_step: model_output layout reads out of bounds");

  const c10::cuda::CUDAGuard guard(x_t.device());
  const SamplerStepConfig cfg{static_cast<int>(kind), static_cast<int>(prediction_type),
                              static_cast<int>(variance_type), static_cast<int>(clip_mode), eta,
                              clip_sample_range, kind == kDDIM && !set_alpha_to_one,
                              use_clipped_model_output};
  const int threads = 256;
  const int64_t groups = (per_sample + 3) / 4 + 1;  // groups overlapping one sample, at most
  const int64_t max_blocks = std::max<int64_t>(1, static_cast<int64_t>(sm_count(x_t.get_device())) * 16 / B);
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((groups + threads - 1) / threads, max_blocks)),
                  static_cast<unsigned>(B));
  auto stream = c10::cuda::getCurrentCUDAStream();
  // as the CPU kernel: no noise term at all unless needs_noise (a given noise is then ignored)
  const int noise_mode = !needs_noise ? kNoiseNone : (noise ? kNoiseGiven : kNoiseDrawn);
  const bool split = mo_inner != per_sample;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "sampler_step_cuda", [&] {
    const scalar_t* np = noise ? noise->data_ptr<scalar_t>() : nullptr;
    scalar_t* x0p = x0.numel() ? x0.data_ptr<scalar_t>() : nullptr;
    const float* thr = clip_mode == kClipThreshold ? thresh->data_ptr<float>() : nullptr;
    auto launch = [&](auto kernel) {
      kernel<<<grid, threads, 0, stream>>>(
          x_t.data_ptr<scalar_t>(), model_output.data_ptr<scalar_t>(), np, t.data_ptr<int64_t>(),
          t_prev.data_ptr<int64_t>(), alphas_cumprod.data_ptr<double>(), thr,
          x_prev.data_ptr<scalar_t>(), x0p, per_sample, mo_batch_stride, mo_inner, mo_row_stride,
          var_offset, alphas_cumprod.numel(), static_cast<uint64_t>(seed), cfg);
    };
    // learned_range reads the variance only for the noise term; without one it is a plain mean
    // (still read through the split model_output layout)
    if (learned && noise_mode != kNoiseNone) {
      if (noise_mode == kNoiseGiven) {
        if (split) launch(sampler_step_kernel<scalar_t, kNoiseGiven, true, true>);
        else launch(sampler_step_kernel<scalar_t, kNoiseGiven, true, false>);
      } else {
        if (split) launch(sampler_step_kernel<scalar_t, kNoiseDrawn, true, true>);
        else launch(sampler_step_kernel<scalar_t, kNoiseDrawn, true, false>);
      }
    } else if (noise_mode == kNoiseGiven) {
      launch(sampler_step_kernel<scalar_t, kNoiseGiven, false, false>);
    } else if (noise_mode == kNoiseDrawn) {
      launch(sampler_step_kernel<scalar_t, kNoiseDrawn, false, false>);
    } else if (split) {
      launch(sampler_step_kernel<scalar_t, kNoiseNone, false, true>);
    } else {
      launch(sampler_step_kernel<scalar_t, kNoiseNone, false, false>);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff_ext, CUDA, m) { m.impl("sampler_step", &fastdiff::sampler_step_cuda); }
