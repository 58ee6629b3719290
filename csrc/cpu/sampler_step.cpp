// One DDPM / DDIM reverse step on the CPU: coefficients once per sample, then one pass over
// memory with the noise drawn in place (fastdiff::normal4, one Philox block per group of 4).
#include <ATen/core/Tensor.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <vector>

#include "cpu/sampler_step_vec.h"
#include "sampler_step_args.h"
#include "value_checks.h"

namespace fastdiff {
namespace {

// Parallel over fixed work units of kVecUnit Philox groups of one sample (groups never
// straddle samples): whole blocks of W groups take the vectorized loop (sampler_step_vec.cpp),
// the rest (sample tails, channels_last learned variances, float64) the shared scalar body
// sampler_step_part (the CUDA kernel's).
template <typename scalar_t, int kNoise, int kStd, bool kSplit>
void sampler_step_cpu_impl(const at::Tensor& x_t, const at::Tensor& mo,
                           const c10::optional<at::Tensor>& noise, const float* thr,
                           const std::vector<SamplerStepCoef>& coef, const int64_t* tp,
                           int64_t num_t, const SamplerStepConfig& cfg, const SamplerStepLayout& L,
                           int64_t B, at::Tensor& x_prev, at::Tensor& x0) {
  const scalar_t* xp = x_t.data_ptr<scalar_t>();
  const scalar_t* mp = mo.data_ptr<scalar_t>();
  const scalar_t* np = noise ? noise->data_ptr<scalar_t>() : nullptr;
  scalar_t* op = x_prev.data_ptr<scalar_t>();
  scalar_t* x0p = x0.numel() ? x0.data_ptr<scalar_t>() : nullptr;
  const float clip_range = static_cast<float>(cfg.clip_range);
  const uint64_t seed = key_seed(L.key);
  const PhiloxKey pk = philox_key(seed);
  const uint32_t first = key_first(L.key);
  const float w = guidance_scale(L);
  const bool guided = L.cond_off != 0;
  const int64_t ps = L.per_sample, gps = groups_per_sample(ps);
  const int64_t units = (gps + kVecUnit - 1) / kVecUnit, full = ps / 4;
  constexpr bool kVec = has_vec_loop<scalar_t>() && !kSplit;
  const int64_t W = FD_CPU_DISPATCH(vec_groups);
  at::parallel_for(0, B * units, std::max<int64_t>(1, 32768 / (4 * kVecUnit)),
                   [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / units, k0 = (u % units) * kVecUnit;
      const int64_t k1 = std::min(k0 + kVecUnit, gps);
      const int64_t tb = clamp_index(tp[b], num_t);
      const float th = thr ? thr[b] : 1.0f;
      const SamplerStepCoef& c = coef[b];
      int64_t k = k0;
      if (kVec) {
        const int64_t nb = (std::min(k1, full) - k0) / W;
        if (nb > 0) {
          const int64_t i = b * ps + 4 * k0, mo_off = b * L.mo_bs + 4 * k0;
          const bool add_noise = kNoise != kNoiseNone && c.noise_on;
          const int64_t var_at = mo_off + L.var_off + (guided ? L.cond_off : 0);
          const SamplerStepBlocks r{
              xp + i, mp + mo_off, guided ? mp + mo_off + L.cond_off : nullptr,
              kStd != kStdFixed ? mp + var_at : nullptr,
              kNoise == kNoiseGiven ? np + i : nullptr, op + i, x0p ? x0p + i : nullptr, nb, c,
              th, clip_range, w, cfg.clip, kStd, add_noise, seed, image_index(first, b),
              static_cast<uint32_t>(k0), static_cast<uint32_t>(tb)};
          FD_CPU_DISPATCH(sampler_step_blocks, vec_dtype<scalar_t>(), r);
          k += nb * W;
        }
      }
      for (; k < k1; ++k) {
        sampler_step_part<scalar_t, kNoise, kStd, kSplit>(
            b, k, tb, pk, image_index(first, b), w, c, th, cfg.clip, clip_range, L, xp, mp,
            np, op, x0p);
      }
    }
  });
}

void sampler_step_cpu(const at::Tensor& x_t, const at::Tensor& model_output, const at::Tensor& t,
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
  FD_CHECK(x_t.device().is_cpu() && model_output.device().is_cpu() && t.device().is_cpu() &&
           t_prev.device().is_cpu() && alphas_cumprod.device().is_cpu(),
           "sampler_step (cpu): tensors must be on the CPU");
  const NoiseKey key = host_noise_key(seed, seed_t, first_index, first_t, x_t, "sampler_step");
  SamplerStepPlan p = sampler_step_plan(
      x_t, model_output, t, t_prev, alphas_cumprod, noise, thresh, key, needs_noise, kind,
      prediction_type, variance_type, eta, clip_mode, clip_sample_range, set_alpha_to_one,
      use_clipped_model_output, mo_batch_stride, mo_inner, mo_row_stride, var_offset,
      cond_offset, guidance, guidance_t, x_prev, x0);
  FD_CHECK((clip_mode != kClipThreshold || thresh->device().is_cpu()) &&
           (!noise || noise->device().is_cpu()) && x_prev.device().is_cpu() &&
           (x0.numel() == 0 || x0.device().is_cpu()),
           "sampler_step (cpu): thresh, noise, x_prev and x0 must be on the CPU");
  const int64_t B = p.B;
  const at::Tensor tc = t.contiguous(), tpc = t_prev.contiguous(), abc = alphas_cumprod.contiguous();
  const int64_t* tp = tc.data_ptr<int64_t>();
  const int64_t* tpp = tpc.data_ptr<int64_t>();
  const int64_t num_t = abc.numel();
  if (checks & kCheckValues) {  // host memory: read here, no sync
    check_timesteps_host("t", tp, B, num_t, false);
    check_timesteps_host("t_prev", tpp, B, num_t, true);
    if (kind == kDDPM) check_ddpm_order_host(tp, tpp, B);
  }
  check_finite_host(checks, "guidance_scale", guidance_t ? guidance_t->data_ptr<float>() : nullptr);
  check_first_index_host(checks, key, B);
  if (p.numel == 0) return;
  const SamplerStepConfig& cfg = p.cfg;
  std::vector<SamplerStepCoef> coef(B);
  for (int64_t b = 0; b < B; ++b) coef[b] = sampler_step_coef(abc.data_ptr<double>(), num_t, tp[b], tpp[b], cfg);
  at::Tensor thr_c;
  if (clip_mode == kClipThreshold) thr_c = thresh->contiguous();
  const float* thr = clip_mode == kClipThreshold ? thr_c.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "sampler_step_cpu", [&] {
    sampler_step_variants(p.noise_mode, p.std_mode, p.split,
                          [&](auto kNoise, auto kStd, auto kSplit) {
      sampler_step_cpu_impl<scalar_t, decltype(kNoise)::value, decltype(kStd)::value,
                            decltype(kSplit)::value>(x_t, model_output, noise, thr, coef, tp,
                                                     num_t, cfg, p.layout, B, x_prev, x0);
    });
  });
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_FRAGMENT(fastdiff_ext, m) {
  m.def("sampler_step(Tensor x_t, Tensor model_output, Tensor t, Tensor t_prev, "
        "Tensor alphas_cumprod, Tensor? noise, Tensor? thresh, int seed, Tensor? seed_t, "
        "int first_index, Tensor? first_t, bool needs_noise, "
        "int kind, int prediction_type, int variance_type, float eta, int clip_mode, "
        "float clip_sample_range, bool set_alpha_to_one, bool use_clipped_model_output, "
        "int mo_batch_stride, int mo_inner, int mo_row_stride, int var_offset, int cond_offset, "
        "float guidance, Tensor? guidance_t, "
        "Tensor(a!) x_prev, Tensor(b!) x0, int checks=0) -> ()");
}

TORCH_LIBRARY_IMPL(fastdiff_ext, CPU, m) { m.impl("sampler_step", &fastdiff::sampler_step_cpu); }
