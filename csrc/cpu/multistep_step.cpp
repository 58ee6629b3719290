// One multistep-solver step on the CPU: the step's coefficient row read once, then one pass
// over memory (the noise drawn in place, one Philox block per group of 4).
#include <ATen/core/Tensor.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>

#include <algorithm>

#include "cpu/multistep_step_vec.h"
#include "multistep_step_args.h"
#include "value_checks.h"

namespace fastdiff {
namespace {

// Parallel over fixed work units of kVecUnit Philox groups of one sample (groups never straddle
// samples, and the split never depends on the thread count, so neither do the bits): whole
// blocks of W groups take the vectorized loop (multistep_step_vec.cpp), sample tails the shared
// scalar body multistep_step_part (the CUDA kernel's).
template <typename scalar_t, int kNoise, int kK, bool kLast>
void multistep_cpu_impl(const at::Tensor& x_t, const at::Tensor& mo, at::Tensor& ring,
                        const c10::optional<at::Tensor>& last_sample,
                        const c10::optional<at::Tensor>& noise, const float* thr,
                        const MultistepCoef& c, uint32_t step, int slot,
                        const MultistepLayout& L, int64_t B, at::Tensor& out) {
  const scalar_t* xp = x_t.data_ptr<scalar_t>();
  const scalar_t* mp = mo.data_ptr<scalar_t>();
  const scalar_t* np = noise ? noise->data_ptr<scalar_t>() : nullptr;
  float* rp = ring.data_ptr<float>();
  float* lp = kLast ? last_sample->data_ptr<float>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  const uint64_t seed = key_seed(L.key);
  const PhiloxKey pk = philox_key(seed);
  const uint32_t first = key_first(L.key);
  const float w = multistep_guidance(L);
  const bool guided = L.cond_off != 0;
  const int64_t ps = L.per_sample, gps = groups_per_sample(ps);
  const int64_t units = (gps + kVecUnit - 1) / kVecUnit, full = ps / 4;
  const int64_t W = FD_CPU_DISPATCH(vec_groups);
  at::parallel_for(0, B * units, std::max<int64_t>(1, 32768 / (4 * kVecUnit)),
                   [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / units, k0 = (u % units) * kVecUnit;
      const int64_t k1 = std::min(k0 + kVecUnit, gps);
      const float th = thr ? thr[b] : 1.0f;
      const uint32_t image = image_index(first, b);
      int64_t k = k0;
      const int64_t nb = (std::min(k1, full) - k0) / W;
      if (nb > 0) {
        const int64_t i = b * ps + 4 * k0;
        MultistepBlocks r{xp + i, mp + i, guided ? mp + i + L.cond_off : nullptr,
                          kNoise == kMsNoiseGiven ? np + i : nullptr, {nullptr, nullptr, nullptr},
                          rp + slot * L.slot_stride + i, lp ? lp + i : nullptr, op + i, nb, c, th,
                          L.clip_range, w, L.clip, kK, kNoise != kMsNoiseNone, seed, image,
                          static_cast<uint32_t>(k0), step};
        for (int s = 0; s < kK; ++s) r.h[s] = rp + s * L.slot_stride + i;
        FD_CPU_DISPATCH(multistep_step_blocks, vec_dtype<scalar_t>(), r);
        k += nb * W;
      }
      for (; k < k1; ++k) {
        multistep_step_part<scalar_t, kNoise, kK, kLast>(b, k, c, th, w, pk, image, step, slot,
                                                         L, xp, mp, np, rp, lp, op);
      }
    }
  });
}

void multistep_step_cpu(const at::Tensor& x_t, const at::Tensor& model_output, at::Tensor ring,
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
  FD_CHECK(x_t.device().is_cpu() && model_output.device().is_cpu() && ring.device().is_cpu() &&
           coefs.device().is_cpu() && out.device().is_cpu() &&
           (!last_sample || last_sample->device().is_cpu()) &&
           (!noise || noise->device().is_cpu()) && (!thresh || thresh->device().is_cpu()),
           "multistep_step (cpu): tensors must be on the CPU");
  const NoiseKey key = host_noise_key(seed, seed_t, first_index, first_t, x_t, "multistep_step");
  const MultistepPlan p = multistep_plan(x_t, model_output, ring, coefs, step_t, last_sample,
                                         noise, thresh, key, draw_noise, prediction_type,
                                         clip_mode, clip_sample_range, cond_offset, guidance,
                                         guidance_t, out);
  // a CPU tensor's value is host memory: read here, no sync
  const int64_t s_in = step_t ? *step_t->data_ptr<int64_t>() : step;
  FD_CHECK(!(checks & kCheckValues) || !step_t || (s_in >= 0 && s_in < p.num_steps),
           "step must be in [0, ", p.num_steps - 1, "], got ", s_in);
  check_finite_host(checks, "guidance_scale", guidance_t ? guidance_t->data_ptr<float>() : nullptr);
  check_first_index_host(checks, key, p.B);
  if (p.numel == 0) return;
  const int64_t s = multistep_clamp_step(s_in, p.num_steps);
  const MultistepCoef c = multistep_coef(coefs.data_ptr<double>() + s * kMultistepNcoef,
                                         static_cast<int>(prediction_type));
  const int slot = static_cast<int>(s % p.layout.K);
  const float* thr = clip_mode == kMsClipThreshold ? thresh->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "multistep_step_cpu", [&] {
    if constexpr (!std::is_same<scalar_t, double>::value) {  // float64 runs the reference
      multistep_variants(p.noise_mode, p.layout.K, p.has_last, [&](auto nz, auto kk, auto kl) {
        multistep_cpu_impl<scalar_t, decltype(nz)::value, decltype(kk)::value, decltype(kl)::value>(
            x_t, model_output, ring, last_sample, noise, thr, c, static_cast<uint32_t>(s), slot,
            p.layout, p.B, out);
      });
    }
  });
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_FRAGMENT(fastdiff_ext, m) {
  m.def("multistep_step(Tensor x_t, Tensor model_output, Tensor(a!) ring, Tensor coefs, int step, "
        "Tensor? step_t, Tensor(b!)? last_sample, Tensor? noise, Tensor? thresh, int seed, "
        "Tensor? seed_t, int first_index, Tensor? first_t, bool draw_noise, int prediction_type, "
        "int clip_mode, float clip_sample_range, int cond_offset, float guidance, "
        "Tensor? guidance_t, Tensor(c!) out, int checks=0) -> ()");
}

TORCH_LIBRARY_IMPL(fastdiff_ext, CPU, m) { m.impl("multistep_step", &fastdiff::multistep_step_cpu); }
