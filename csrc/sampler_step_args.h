// The argument checks and launch plan both sampler_step entry points (CPU and CUDA) share; each
// adds only its device checks. Host code (at::Tensor), kept out of the device header.
#pragma once
#include <ATen/core/Tensor.h>

#include "noise_key.h"
#include "sampler_step.h"

namespace fastdiff {

struct SamplerStepPlan {
  int64_t B, numel;
  bool learned, split;
  int noise_mode, std_mode;
  SamplerStepLayout layout;
  SamplerStepConfig cfg;
};

inline SamplerStepPlan sampler_step_plan(
    const at::Tensor& x_t, const at::Tensor& model_output, const at::Tensor& t,
    const at::Tensor& t_prev, const at::Tensor& alphas_cumprod,
    const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& thresh,
    const NoiseKey& key, bool needs_noise, int64_t kind, int64_t prediction_type, int64_t variance_type, double eta,
    int64_t clip_mode, double clip_sample_range, bool set_alpha_to_one,
    bool use_clipped_model_output, int64_t mo_batch_stride, int64_t mo_inner,
    int64_t mo_row_stride, int64_t var_offset, int64_t cond_offset, double guidance,
    const c10::optional<at::Tensor>& guidance_t, const at::Tensor& x_prev, const at::Tensor& x0) {
  FD_CHECK(x_t.dim() >= 1, "sampler_step: x_t must have a batch dim");
  const int64_t B = x_t.size(0);
  FD_CHECK(t.scalar_type() == at::kLong && t.numel() == B && t_prev.scalar_type() == at::kLong &&
           t_prev.numel() == B, "sampler_step: t and t_prev must be int64 of shape (B,)");
  FD_CHECK(alphas_cumprod.scalar_type() == at::kDouble && alphas_cumprod.numel() > 0,
           "sampler_step: alphas_cumprod must be a non-empty float64 table");
  FD_CHECK(model_output.scalar_type() == x_t.scalar_type(),
           "sampler_step: model_output must have x_t's dtype");
  FD_CHECK(x_prev.strides() == x_t.strides() && x_prev.scalar_type() == x_t.scalar_type(),
           "sampler_step: x_prev must be laid out like x_t");
  FD_CHECK(x0.numel() == 0 || x0.strides() == x_t.strides(), "sampler_step: x0 must be laid out like x_t");
  FD_CHECK(!noise || (noise->strides() == x_t.strides() && noise->scalar_type() == x_t.scalar_type()),
           "sampler_step: noise must be laid out like x_t, in its dtype");
  FD_CHECK(kind == kDDPM || kind == kDDIM, "sampler_step: bad kind ", kind);
  FD_CHECK(prediction_type >= 0 && prediction_type <= 2, "sampler_step: bad prediction_type");
  FD_CHECK(variance_type >= 0 && variance_type <= 5, "sampler_step: bad variance_type");
  FD_CHECK(!guidance_t || (guidance_t->scalar_type() == at::kFloat && guidance_t->numel() == 1 &&
                           guidance_t->device() == x_t.device()),
           "sampler_step: guidance_t must be a float32 tensor of 1 element on x_t's device");
  FD_CHECK(cond_offset >= 0, "sampler_step: bad cond_offset");
  FD_CHECK(clip_mode >= 0 && clip_mode <= 2, "sampler_step: bad clip_mode");
  FD_CHECK(clip_mode != kClipThreshold ||
           (thresh && thresh->scalar_type() == at::kFloat && thresh->numel() == B),
           "sampler_step: thresholding needs thresh, float32 of shape (B,)");
  SamplerStepPlan p{};
  p.B = B;
  p.numel = x_t.numel();
  p.learned = kind == kDDPM && (variance_type == kLearnedRange || variance_type == kLearned);
  p.std_mode = !p.learned ? kStdFixed
                          : (variance_type == kLearned ? kStdLearned : kStdLearnedRange);
  // no noise term at all unless needs_noise (a given noise is then ignored)
  p.noise_mode = !needs_noise ? kNoiseNone : (noise ? kNoiseGiven : kNoiseDrawn);
  p.cfg = SamplerStepConfig{static_cast<int>(kind), static_cast<int>(prediction_type),
                            static_cast<int>(variance_type), static_cast<int>(clip_mode), eta,
                            clip_sample_range, kind == kDDIM && !set_alpha_to_one,
                            use_clipped_model_output};
  if (p.numel == 0) return p;
  const int64_t per_sample = p.numel / B;
  FD_CHECK(mo_inner > 0 && per_sample % mo_inner == 0, "sampler_step: bad model_output layout");
  FD_CHECK(p.learned || mo_inner == per_sample,
           "sampler_step: split model_output layout is for learned_range only");
  // the last element any sample reads must lie inside model_output
  const int64_t last = (B - 1) * mo_batch_stride + (per_sample / mo_inner - 1) * mo_row_stride +
                       mo_inner - 1 + (p.learned ? var_offset : 0) + cond_offset;
  FD_CHECK(mo_batch_stride >= 0 && mo_row_stride >= 0 && var_offset >= 0 &&
           last < model_output.numel(), "sampler_step: model_output layout reads out of bounds");
  p.split = mo_inner != per_sample;
  // Vec4 accesses need every tensor's base and every sample's offset aligned to 4 elements
  const int64_t vbytes = 4 * x_t.element_size();
  auto aligned = [&](const at::Tensor& a) {
    return a.numel() == 0 || reinterpret_cast<uintptr_t>(a.data_ptr()) % vbytes == 0;
  };
  const bool vec = !p.split && per_sample % 4 == 0 && mo_batch_stride % 4 == 0 &&
                   cond_offset % 4 == 0 &&
                   (!p.learned || var_offset % 4 == 0) && aligned(x_t) && aligned(model_output) &&
                   (!noise || aligned(*noise)) && aligned(x_prev) && aligned(x0);
  p.layout = SamplerStepLayout{per_sample, mo_batch_stride, mo_inner, mo_row_stride, var_offset,
                               cond_offset, key, static_cast<float>(guidance),
                               guidance_t ? guidance_t->data_ptr<float>() : nullptr, vec};
  return p;
}

}  // namespace fastdiff
