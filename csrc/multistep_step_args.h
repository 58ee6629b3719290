// The argument checks and launch plan both multistep_step entry points (CPU and CUDA) share;
// each adds only its device checks. Host code (at::Tensor), kept out of the device header.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdlib>

#include "multistep_step.h"
#include "noise_key.h"

namespace fastdiff {

struct MultistepPlan {
  int64_t B, numel, num_steps;
  int noise_mode;
  bool has_last;
  MultistepLayout layout;
};

// a's strides are `ref`'s on every dim longer than 1 (a size-1 dim's stride is moot)
inline bool multistep_same_layout(const at::Tensor& a, const at::Tensor& ref) {
  if (a.dim() != ref.dim()) return false;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) != ref.size(d) || (a.size(d) > 1 && a.stride(d) != ref.stride(d))) return false;
  return true;
}

inline MultistepPlan multistep_plan(
    const at::Tensor& x_t, const at::Tensor& model_output, const at::Tensor& ring,
    const at::Tensor& coefs, const c10::optional<at::Tensor>& step_t,
    const c10::optional<at::Tensor>& last_sample, const c10::optional<at::Tensor>& noise,
    const c10::optional<at::Tensor>& thresh, const NoiseKey& key, bool draw_noise,
    int64_t prediction_type, int64_t clip_mode, double clip_sample_range, int64_t cond_offset,
    double guidance, const c10::optional<at::Tensor>& guidance_t, const at::Tensor& out) {
  const char* op = "multistep_step";
  FD_CHECK(x_t.dim() >= 1, op, ": x_t must have a batch dim");
  const auto st = x_t.scalar_type();
  FD_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
           ": x_t must be float32, float16 or bfloat16 (float64 runs the reference)");
  const int64_t B = x_t.size(0), numel = x_t.numel();
  const int64_t per_sample = B ? numel / B : 0;
  FD_CHECK(numel == 0 || (x_t.is_non_overlapping_and_dense() &&
                          (B == 1 || x_t.stride(0) == per_sample)),
           op, ": x_t must be dense with the batch dim outermost (contiguous or channels_last)");
  FD_CHECK(model_output.scalar_type() == st, op, ": model_output must have x_t's dtype");
  FD_CHECK(cond_offset == 0 || cond_offset == numel, op, ": bad cond_offset");
  if (cond_offset == 0) {
    FD_CHECK(multistep_same_layout(model_output, x_t), op, ": model_output must be laid out like x_t");
  } else {
    FD_CHECK(model_output.numel() == 2 * numel && model_output.is_non_overlapping_and_dense() &&
             model_output.size(0) == 2 * B && (2 * B == 1 || model_output.stride(0) == per_sample),
             op, ": a guided model_output must be (2B, ...), dense, laid out like x_t");
    for (int64_t d = 1; d < x_t.dim(); ++d)
      FD_CHECK(model_output.size(d) == x_t.size(d) &&
               (x_t.size(d) == 1 || model_output.stride(d) == x_t.stride(d)),
               op, ": a guided model_output must be laid out like x_t");
  }
  FD_CHECK(ring.scalar_type() == at::kFloat && ring.dim() == x_t.dim() + 1 && ring.size(0) >= 1 &&
           ring.size(0) <= kMultistepMaxOrder, op,
           ": ring must be float32 of shape (K, *x_t.shape), 1 <= K <= 3");
  const int K = static_cast<int>(ring.size(0));
  FD_CHECK(multistep_same_layout(ring.select(0, 0), x_t) &&
           (K == 1 || numel == 0 || std::abs(ring.stride(0)) >= numel),
           op, ": ring's slots must be laid out like x_t");
  FD_CHECK(coefs.scalar_type() == at::kDouble && coefs.dim() == 2 && coefs.size(0) >= 1 &&
           coefs.size(1) == kMultistepNcoef && coefs.is_contiguous(), op,
           ": coefs must be a contiguous float64 table of shape (S >= 1, 14)");
  FD_CHECK(!step_t || (step_t->scalar_type() == at::kLong && step_t->numel() == 1 &&
                       step_t->device() == x_t.device()),
           op, ": step_t must be an int64 tensor of 1 element on x_t's device");
  FD_CHECK(!last_sample || (last_sample->scalar_type() == at::kFloat &&
                            multistep_same_layout(*last_sample, x_t)),
           op, ": last_sample must be float32, laid out like x_t");
  FD_CHECK(!noise || (noise->scalar_type() == st && multistep_same_layout(*noise, x_t)),
           op, ": noise must be laid out like x_t, in its dtype");
  FD_CHECK(out.scalar_type() == st && multistep_same_layout(out, x_t), op,
           ": out must be laid out like x_t, in its dtype");
  FD_CHECK(prediction_type >= 0 && prediction_type <= 2, op, ": bad prediction_type");
  FD_CHECK(clip_mode >= 0 && clip_mode <= 2, op, ": bad clip_mode");
  FD_CHECK(clip_mode != kMsClipThreshold ||
           (thresh && thresh->scalar_type() == at::kFloat && thresh->numel() == B &&
            thresh->is_contiguous()),
           op, ": thresholding needs thresh, contiguous float32 of shape (B,)");
  FD_CHECK(!guidance_t || (guidance_t->scalar_type() == at::kFloat && guidance_t->numel() == 1 &&
                           guidance_t->device() == x_t.device()),
           op, ": guidance_t must be a float32 tensor of 1 element on x_t's device");
  MultistepPlan p{};
  p.B = B;
  p.numel = numel;
  p.num_steps = coefs.size(0);
  p.has_last = last_sample.has_value();
  p.noise_mode = noise ? kMsNoiseGiven : (draw_noise ? kMsNoiseDrawn : kMsNoiseNone);
  // Vec4 accesses need every base pointer, the slot stride and cond_offset aligned
  auto aligned = [](const at::Tensor& a) {
    return a.numel() == 0 ||
           reinterpret_cast<uintptr_t>(a.data_ptr()) % (4 * a.element_size()) == 0;
  };
  const bool vec = numel > 0 && per_sample % 4 == 0 && cond_offset % 4 == 0 &&
                   (K == 1 || ring.stride(0) % 4 == 0) && aligned(x_t) && aligned(model_output) &&
                   aligned(ring) && aligned(out) && (!noise || aligned(*noise)) &&
                   (!last_sample || aligned(*last_sample));
  p.layout = MultistepLayout{per_sample, K > 1 ? ring.stride(0) : 0, cond_offset, K,
                             static_cast<int>(prediction_type), static_cast<int>(clip_mode),
                             static_cast<float>(clip_sample_range), key,
                             static_cast<float>(guidance),
                             guidance_t ? guidance_t->data_ptr<float>() : nullptr, vec};
  return p;
}

}  // namespace fastdiff
