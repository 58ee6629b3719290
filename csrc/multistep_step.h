// One multistep-solver step (DPM-Solver++, its SDE variant, UniPC predictor + corrector): the
// per-step coefficients (float32 casts of one float64 row of the host's table) and the
// per-element update, shared by the CPU and CUDA kernels. The same algebra, in the same order,
// as kernels/multistep_step.py and the CPU vector loop (cpu/multistep_step_vec.cpp):
//   m      = m_u + w (m_c - m_u)                 (classifier-free guidance; else the output)
//   x0     = cx x + cm m,  then clamp(x0, -r, r) or clamp(x0, -s, s) / s      (NaN kept)
//   y      = x                                                       without last_sample
//          = corr_x x + corr_last x_last + corr_new x0 + sum_k corr_hk h_k      with it
//   x_prev = pred_y y + pred_new x0 + sum_k pred_hk h_k + noise z
// then h_{step % K} = x0 (after every read) and x_last = y.
#pragma once
#include "common.h"

#include <type_traits>

namespace fastdiff {

constexpr uint32_t kStreamMultistep = 2;  // fastdiff.reference.STREAM_MULTISTEP
constexpr int kMultistepNcoef = 14;       // fastdiff.ops.multistep_step.NCOEF
constexpr int kMultistepMaxOrder = 3;

// Columns of a coefficient row (fastdiff.ops.multistep_step.COEFS).
enum MultistepColumn : int {
  kColAlpha = 0, kColSigma = 1, kColCorrX = 2, kColCorrLast = 3, kColCorrNew = 4, kColCorrH0 = 5,
  kColPredY = 8, kColPredNew = 9, kColPredH0 = 10, kColNoise = 13
};

// Clip modes and prediction types: fastdiff/ops/multistep_step.py CLIP_* and PREDICTION_TYPES.
enum MultistepClip : int { kMsClipNone = 0, kMsClipRange = 1, kMsClipThreshold = 2 };
enum MultistepPred : int { kMsEpsilon = 0, kMsSample = 1, kMsVPrediction = 2 };
enum MultistepNoise : int { kMsNoiseNone = 0, kMsNoiseGiven = 1, kMsNoiseDrawn = 2 };

struct MultistepCoef {
  float cx, cm;  // x0 = cx x + cm m
  float corr_x, corr_last, corr_new, corr_h[kMultistepMaxOrder];
  float pred_y, pred_new, pred_h[kMultistepMaxOrder], noise;
};

FD_HD int64_t multistep_clamp_step(int64_t step, int64_t num_steps) {
  return step < 0 ? 0 : (step >= num_steps ? num_steps - 1 : step);
}

// The float32 coefficients of one row (cx, cm formed in float64 first).
FD_HD MultistepCoef multistep_coef(const double* row, int pred) {
  const double alpha = row[kColAlpha], sigma = row[kColSigma];
  MultistepCoef c;
  if (pred == kMsEpsilon) {
    c.cx = static_cast<float>(1.0 / alpha);
    c.cm = static_cast<float>(-sigma / alpha);
  } else if (pred == kMsSample) {
    c.cx = 0.0f;
    c.cm = 1.0f;
  } else {
    c.cx = static_cast<float>(alpha);
    c.cm = static_cast<float>(-sigma);
  }
  c.corr_x = static_cast<float>(row[kColCorrX]);
  c.corr_last = static_cast<float>(row[kColCorrLast]);
  c.corr_new = static_cast<float>(row[kColCorrNew]);
  c.pred_y = static_cast<float>(row[kColPredY]);
  c.pred_new = static_cast<float>(row[kColPredNew]);
  for (int k = 0; k < kMultistepMaxOrder; ++k) {
    c.corr_h[k] = static_cast<float>(row[kColCorrH0 + k]);
    c.pred_h[k] = static_cast<float>(row[kColPredH0 + k]);
  }
  c.noise = static_cast<float>(row[kColNoise]);
  return c;
}

// clamp that keeps a NaN, as torch.clamp (fminf/fmaxf would clip a diverged model into an image)
FD_HD float multistep_clamp(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

// thr_inv = 1.0 / double(thr): the GPU's division by the threshold (div_by_sample)
FD_HD float multistep_x0(const MultistepCoef& c, int clip, float clip_range, float thr,
                         double thr_inv, float x, float m) {
  float x0 = c.cx * x + c.cm * m;
  if (clip == kMsClipRange) {
    x0 = multistep_clamp(x0, -clip_range, clip_range);
  } else if (clip == kMsClipThreshold) {
    x0 = div_by_sample(multistep_clamp(x0, -thr, thr), thr, thr_inv);
  }
  return x0;
}

// What a launch needs besides the tensors: the layout (every tensor walked in memory order,
// x_t's), the ring, the options, the noise key.
struct MultistepLayout {
  int64_t per_sample;
  int64_t slot_stride;  // elements between ring slots
  int64_t cond_off;     // > 0: guidance, the conditional half this far after the unconditional
  int K, pred, clip;
  float clip_range;
  NoiseKey key;
  float w;              // guidance scale, when w_ptr is null
  const float* w_ptr;   // a device guidance scale, read by the kernel
  bool vec;             // per_sample % 4 == 0 and every pointer Vec4-aligned
};

FD_HD float multistep_guidance(const MultistepLayout& L) {
  return L.w_ptr != nullptr ? L.w_ptr[0] : L.w;
}

// One element: reads x, m (guided), x_last, h[0..K), z; returns x_prev and sets x0, y. The
// vector loop of the CPU kernel computes the same expressions in the same order.
template <int kK, bool kLast, bool kNoise>
FD_HD float multistep_element(const MultistepCoef& c, int clip, float clip_range, float thr,
                              double thr_inv, float x, float m, float xl, const float* h,
                              float z, float& x0, float& y) {
  x0 = multistep_x0(c, clip, clip_range, thr, thr_inv, x, m);
  if (kLast) {
    y = c.corr_x * x + c.corr_last * xl + c.corr_new * x0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int k = 0; k < kK; ++k) y = y + c.corr_h[k] * h[k];
  } else {
    y = x;
  }
  float out = c.pred_y * y + c.pred_new * x0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int k = 0; k < kK; ++k) out = out + c.pred_h[k] * h[k];
  if (kNoise) out = out + c.noise * z;
  return out;
}

// Philox group k of sample b (elements j = 4k .. min(4k + 4, per_sample) - 1, memory positions
// b * per_sample + j in every tensor; model_output's at b * per_sample + j, its conditional half
// cond_off further): the body shared by the CPU loop's scalar part and the CUDA kernel. key:
// the seed's round keys (philox_key). slot:
// the ring slot that receives x0 (step % K); step: the clamped row, with which noise is drawn;
// thr_inv: 1.0 / double(thr), read by the GPU only (div_by_sample).
template <typename scalar_t, int kNoise, int kK, bool kLast>
FD_HD void multistep_step_part(int64_t b, int64_t k, const MultistepCoef& c, float thr, float w,
                               const PhiloxKey& key, uint32_t image, uint32_t step, int slot,
                               const MultistepLayout& L, const scalar_t* x_t, const scalar_t* mo,
                               const scalar_t* noise, float* ring, float* last, scalar_t* out,
                               double thr_inv = 1.0) {
  constexpr bool kZ = kNoise != kMsNoiseNone;
  const bool guided = L.cond_off != 0;
  Normal4 n{};
  if (kNoise == kMsNoiseDrawn)
    n = normal4(key, image, static_cast<uint32_t>(k), step, kStreamMultistep);
  const int64_t j0 = 4 * k, i0 = b * L.per_sample + j0;
  const int64_t cnt = L.per_sample - j0 < 4 ? L.per_sample - j0 : 4;
  float* const dst = ring + slot * L.slot_stride;
  if (L.vec) {  // a whole group: one access per tensor
    const Vec4<scalar_t> xv = *reinterpret_cast<const Vec4<scalar_t>*>(x_t + i0);
    const Vec4<scalar_t> mv = *reinterpret_cast<const Vec4<scalar_t>*>(mo + i0);
    Vec4<scalar_t> cv{}, zv{}, ov;
    Vec4<float> lv{}, hv[kK > 0 ? kK : 1], x0v, yv;
    if (guided) cv = *reinterpret_cast<const Vec4<scalar_t>*>(mo + i0 + L.cond_off);
    if (kNoise == kMsNoiseGiven) zv = *reinterpret_cast<const Vec4<scalar_t>*>(noise + i0);
    if (kLast) lv = *reinterpret_cast<const Vec4<float>*>(last + i0);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int s = 0; s < kK; ++s) hv[s] = *reinterpret_cast<const Vec4<float>*>(ring + s * L.slot_stride + i0);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int e = 0; e < 4; ++e) {
      float m = static_cast<float>(mv.v[e]);
      if (guided) m = m + w * (static_cast<float>(cv.v[e]) - m);
      float h[kK > 0 ? kK : 1];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int s = 0; s < kK; ++s) h[s] = hv[s].v[e];
      const float z = kNoise == kMsNoiseGiven ? static_cast<float>(zv.v[e]) : n.v[e];
      ov.v[e] = static_cast<scalar_t>(multistep_element<kK, kLast, kZ>(
          c, L.clip, L.clip_range, thr, thr_inv, static_cast<float>(xv.v[e]), m, lv.v[e], h, z,
          x0v.v[e],
          yv.v[e]));
    }
    *reinterpret_cast<Vec4<scalar_t>*>(out + i0) = ov;
    *reinterpret_cast<Vec4<float>*>(dst + i0) = x0v;
    if (kLast) *reinterpret_cast<Vec4<float>*>(last + i0) = yv;
    return;
  }
  for (int64_t e = 0; e < cnt; ++e) {
    const int64_t i = i0 + e;
    float m = static_cast<float>(mo[i]);
    if (guided) m = m + w * (static_cast<float>(mo[i + L.cond_off]) - m);
    float h[kK > 0 ? kK : 1];
    for (int s = 0; s < kK; ++s) h[s] = ring[s * L.slot_stride + i];
    const float z = kNoise == kMsNoiseGiven ? static_cast<float>(noise[i])
                                            : (kNoise == kMsNoiseDrawn ? lane(n, static_cast<uint64_t>(e)) : 0.0f);
    float x0, y;
    const float o = multistep_element<kK, kLast, kZ>(c, L.clip, L.clip_range, thr, thr_inv,
                                                     static_cast<float>(x_t[i]), m,
                                                     kLast ? last[i] : 0.0f, h, z, x0, y);
    out[i] = static_cast<scalar_t>(o);
    dst[i] = x0;
    if (kLast) last[i] = y;
  }
}

// Calls f(noise mode, K, has_last) with compile-time values: the table of variants both
// kernels instantiate.
template <typename F>
void multistep_variants(int noise_mode, int K, bool has_last, F&& f) {
  auto with_k = [&](auto nz) {
    auto with_last = [&](auto kk) {
      if (has_last) f(nz, kk, std::true_type{}); else f(nz, kk, std::false_type{});
    };
    if (K == 1) with_last(std::integral_constant<int, 1>{});
    else if (K == 2) with_last(std::integral_constant<int, 2>{});
    else with_last(std::integral_constant<int, 3>{});
  };
  if (noise_mode == kMsNoiseGiven) with_k(std::integral_constant<int, kMsNoiseGiven>{});
  else if (noise_mode == kMsNoiseDrawn) with_k(std::integral_constant<int, kMsNoiseDrawn>{});
  else with_k(std::integral_constant<int, kMsNoiseNone>{});
}

}  // namespace fastdiff
