// One DDPM / DDIM reverse step: per-sample coefficients (float64 from the float64 alphas_cumprod
// table) and the per-element update (float32), shared by the CPU and CUDA kernels. The same
// algebra as kernels/sampler_step.py:
//   x0   = cx x + cm m                  (m: the model's prediction)
//   x0c  = clamp(x0, -r, r)  or  clamp(x0, -s, s) / s     (clip / dynamic threshold)
//   mean = k0 x0c + kx x + km m         (ddim's epsilon folded in: no per-element division)
//   x_prev = mean + std z               (std = exp(l0 + l1 v) for learned_range, sqrt(v) learned)
// With classifier-free guidance m = m_u + w (m_c - m_u), the two halves of a 2B-batch output.
#pragma once
#include "common.h"

#include <type_traits>

namespace fastdiff {

// Enums: the order of fastdiff/ops/sampler_step.py KINDS, PREDICTION_TYPES, VARIANCE_TYPES.
enum SamplerKind : int { kDDPM = 0, kDDIM = 1 };
enum PredictionType : int { kEpsilon = 0, kSample = 1, kVPrediction = 2 };
enum VarianceType : int {
  kFixedSmall = 0, kFixedSmallLog = 1, kFixedLarge = 2, kFixedLargeLog = 3, kLearnedRange = 4,
  kLearned = 5
};
// How an element's sigma is found (the kernels' template parameter): per sample, or from the
// predicted variance v: exp(l0 + l1 v) (learned_range), sqrt(v) (learned, as diffusers).
enum StdMode : int { kStdFixed = 0, kStdLearnedRange = 1, kStdLearned = 2 };
enum ClipMode : int { kClipNone = 0, kClipRange = 1, kClipThreshold = 2 };

constexpr uint32_t kStreamSamplerStep = 1;  // fastdiff.reference.STREAM_SAMPLER_STEP

struct SamplerStepConfig {
  int kind, pred, var, clip;
  double eta, clip_range;
  bool final_from_table;  // ddim with set_alpha_to_one=False: t_prev < 0 -> alphas_cumprod[0]
  bool use_clipped;       // ddim: epsilon re-derived from the clipped x0
};

struct SamplerStepCoef {
  float cx, cm, k0, kx, km, std, l0, l1;
  bool noise_on;  // never at the last step (t_prev < 0); ddpm: t > 0; ddim: eta > 0
};

FD_HD int64_t clamp_index(int64_t i, int64_t n) { return i < 0 ? 0 : (i >= n ? n - 1 : i); }

// Coefficients of sample with timesteps (t, t_prev); t is clamped to [0, T), t_prev < 0 is the
// final step (alpha_cumprod_prev = 1, or alphas_cumprod[0] for final_from_table).
FD_HD SamplerStepCoef sampler_step_coef(const double* ab, int64_t num_t, int64_t t,
                                        int64_t t_prev, const SamplerStepConfig& cfg) {
  t = clamp_index(t, num_t);
  const double at = ab[t];
  const double ap = t_prev >= 0 ? ab[clamp_index(t_prev, num_t)]
                                : (cfg.final_from_table ? ab[0] : 1.0);
  const double bt = 1.0 - at, bp = 1.0 - ap;
  const double sa = sqrt(at), sb = sqrt(bt);
  double cx, cm;
  if (cfg.pred == kEpsilon) { cx = 1.0 / sa; cm = -sb / sa; }
  else if (cfg.pred == kSample) { cx = 0.0; cm = 1.0; }
  else { cx = sa; cm = -sb; }
  double k0, kx, km = 0.0, sd = 0.0, l0 = 0.0, l1 = 0.0;
  bool noise_on;
  if (cfg.kind == kDDPM) {
    const double cur_alpha = at / ap, cur_beta = 1.0 - cur_alpha;
    k0 = sqrt(ap) * cur_beta / bt;
    kx = sqrt(cur_alpha) * bp / bt;
    double var = bp / bt * cur_beta;
    var = var < 1e-20 ? 1e-20 : var;  // diffusers clamps before taking logs
    if (cfg.var == kFixedSmall || cfg.var == kFixedSmallLog) {
      sd = sqrt(var);  // exp(0.5 log var)
    } else if (cfg.var == kFixedLarge || cfg.var == kFixedLargeLog) {
      sd = sqrt(cur_beta);
    } else if (cfg.var == kLearned) {
      sd = 0.0;  // sqrt of the predicted variance, per element
    } else {  // learned_range: exp(0.5 (frac max_log + (1 - frac) min_log)), frac = (v + 1) / 2
      // cur_beta is 0 only for t == t_prev (reachable unchecked, inside a CUDA graph): clamped
      // like var, so the log-variance stays finite
      const double min_log = log(var), d = log(cur_beta < 1e-20 ? 1e-20 : cur_beta) - min_log;
      l0 = 0.5 * min_log + 0.25 * d;
      l1 = 0.25 * d;
    }
    noise_on = t > 0 && t_prev >= 0;
  } else {
    // < 0 only when stepping forward in t (t_prev > t, DDIM inversion): no noise there
    const double var_raw = bp / bt * (1.0 - at / ap), var = var_raw > 0.0 ? var_raw : 0.0;
    sd = cfg.eta * sqrt(var);
    const double rest = bp - sd * sd;  // >= 0 up to rounding for eta <= 1
    const double dir = sqrt(rest > 0.0 ? rest : 0.0);
    double ex, em, e0 = 0.0;
    if (cfg.pred == kEpsilon) { ex = 0.0; em = 1.0; }
    else if (cfg.pred == kSample) { ex = 1.0 / sb; em = -sa / sb; }
    else { ex = sb; em = sa; }
    if (cfg.use_clipped) { ex = 1.0 / sb; em = 0.0; e0 = -sa / sb; }
    k0 = sqrt(ap) + dir * e0;
    kx = dir * ex;
    km = dir * em;
    noise_on = cfg.eta > 0.0 && t_prev >= 0;
  }
  return {static_cast<float>(cx), static_cast<float>(cm), static_cast<float>(k0),
          static_cast<float>(kx), static_cast<float>(km), static_cast<float>(sd),
          static_cast<float>(l0), static_cast<float>(l1), noise_on};
}

// clamp that keeps a NaN (as torch.clamp; fminf/fmaxf would turn it into a bound, so a diverged
// model would be silently clipped into an image). On sm_80+ max.NaN / min.NaN: two instructions
// where the compare-and-selects are four (the same value, a NaN's payload aside).
FD_HD float clamp_keep_nan(float x, float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float y;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(x), "f"(lo));
  asm("min.NaN.f32 %0, %0, %1;" : "+f"(y) : "f"(hi));
  return y;
#else
  return x < lo ? lo : (x > hi ? hi : x);
#endif
}

// x0 after clipping: clip_range for kClipRange, thresh (the sample's s) for kClipThreshold;
// thresh_inv = 1.0 / double(thresh), the GPU's division (div_by_sample).
FD_HD float sampler_step_x0(const SamplerStepCoef& c, int clip, float clip_range, float thresh,
                            double thresh_inv, float x, float m) {
  float x0 = c.cx * x + c.cm * m;
  if (clip == kClipRange) {
    x0 = clamp_keep_nan(x0, -clip_range, clip_range);
  } else if (clip == kClipThreshold) {
    x0 = div_by_sample(clamp_keep_nan(x0, -thresh, thresh), thresh, thresh_inv);
  }
  return x0;
}

FD_HD float sampler_step_mean(const SamplerStepCoef& c, float x0c, float x, float m) {
  return c.k0 * x0c + c.kx * x + c.km * m;
}

// sigma of the element: per sample, or from the predicted variance v.
template <int kStd>
FD_HD float sampler_step_std(const SamplerStepCoef& c, float v) {
  if (kStd == kStdLearnedRange) return expf(c.l0 + c.l1 * v);
  if (kStd == kStdLearned) return sqrtf(v);
  return c.std;
}

// Classifier-free guidance: m_u + w (m_c - m_u).
FD_HD float sampler_step_guide(float w, float mu, float mc) { return mu + w * (mc - mu); }

enum NoiseMode : int { kNoiseNone = 0, kNoiseGiven = 1, kNoiseDrawn = 2 };

// Where sample b's model prediction for its element j lives: offset b*mo_bs +
// (j / mo_inner)*mo_rs + j % mo_inner (a 2C-channel learned-variance output is read in place:
// rows of `inner` elements every `rs`), its predicted variance var_off further on; with
// guidance (cond_off > 0) that is the unconditional half and the conditional one is cond_off
// further (the variance is read from the conditional half).
struct SamplerStepLayout {
  int64_t per_sample, mo_bs, mo_inner, mo_rs, var_off, cond_off;
  NoiseKey key;
  float w;            // guidance scale, when w_ptr is null
  const float* w_ptr; // a device guidance scale, read by the kernel
  bool vec;  // unsplit layout, per_sample % 4 == 0, every pointer and offset Vec4-aligned
};

FD_HD float guidance_scale(const SamplerStepLayout& L) {
  return L.w_ptr != nullptr ? L.w_ptr[0] : L.w;
}

// Philox group k of sample b (elements j = 4k .. min(4k + 4, per_sample) - 1): the body shared
// by the CPU loop and the CUDA kernel (the CPU tests run the GPU's element code). tb is the
// sample's clamped t, with which the noise is drawn; key the seed's round keys (philox_key);
// image its global index; w the guidance scale (unused unless L.cond_off > 0); thr its
// dynamic-threshold scale (1 when unused), thr_inv = 1.0 / double(thr) (read by the GPU only:
// div_by_sample). kGuide / kX0: guidance on / x0 written as compile-time values (0 or 1: the CUDA
// kernel's whole-group loops, each carrying only its own loads and stores), or -1: read at run
// time from L.cond_off / x0 != nullptr.
template <typename scalar_t, int kNoise, int kStd, bool kSplit, int kGuide = -1, int kX0 = -1>
FD_HD void sampler_step_part(int64_t b, int64_t k, int64_t tb, const PhiloxKey& key, uint32_t image,
                             float w, const SamplerStepCoef& c, float thr, int clip,
                             float clip_range, const SamplerStepLayout& L, const scalar_t* x_t,
                             const scalar_t* mo, const scalar_t* noise, scalar_t* x_prev,
                             scalar_t* x0, double thr_inv = 1.0) {
  const bool add_noise = kNoise != kNoiseNone && c.noise_on;
  const bool guided = kGuide >= 0 ? kGuide == 1 : L.cond_off != 0;
  const bool write_x0 = kX0 >= 0 ? kX0 == 1 : x0 != nullptr;
  // read only where drawn: on the GPU left unset (zero-filling it cost 4 moves a group)
#if defined(__CUDA_ARCH__)
  Normal4 n;
#else
  Normal4 n{};
#endif
  if (kNoise == kNoiseDrawn && add_noise)
    n = normal4(key, image, static_cast<uint32_t>(k), static_cast<uint32_t>(tb), kStreamSamplerStep);
  const int64_t j0 = 4 * k, i0 = b * L.per_sample + j0;
  const int64_t cnt = L.per_sample - j0 < 4 ? L.per_sample - j0 : 4;
  // the variance channels: of the conditional half with guidance
  const int64_t var_at = L.var_off + (guided ? L.cond_off : 0);
  if (!kSplit && L.vec) {  // a whole group: one access per tensor
    const int64_t mo_off = b * L.mo_bs + j0;
    const Vec4<scalar_t> xv = *reinterpret_cast<const Vec4<scalar_t>*>(x_t + i0);
    const Vec4<scalar_t> mv = *reinterpret_cast<const Vec4<scalar_t>*>(mo + mo_off);
    Vec4<scalar_t> cv{}, zv{}, vv{}, ov, x0v;
    if (guided) cv = *reinterpret_cast<const Vec4<scalar_t>*>(mo + mo_off + L.cond_off);
    if (kNoise == kNoiseGiven && add_noise) zv = *reinterpret_cast<const Vec4<scalar_t>*>(noise + i0);
    if (kStd != kStdFixed && add_noise) vv = *reinterpret_cast<const Vec4<scalar_t>*>(mo + mo_off + var_at);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int e = 0; e < 4; ++e) {
      const float x = static_cast<float>(xv.v[e]);
      float m = static_cast<float>(mv.v[e]);
      if (guided) m = sampler_step_guide(w, m, static_cast<float>(cv.v[e]));
      const float x0c = sampler_step_x0(c, clip, clip_range, thr, thr_inv, x, m);
      float out = sampler_step_mean(c, x0c, x, m);
      if (add_noise) {
        const float z = kNoise == kNoiseGiven ? static_cast<float>(zv.v[e]) : n.v[e];
        out += sampler_step_std<kStd>(c, kStd != kStdFixed ? static_cast<float>(vv.v[e]) : 0.0f) * z;
      }
      ov.v[e] = static_cast<scalar_t>(out);
      x0v.v[e] = static_cast<scalar_t>(x0c);
    }
    *reinterpret_cast<Vec4<scalar_t>*>(x_prev + i0) = ov;
    if (write_x0) *reinterpret_cast<Vec4<scalar_t>*>(x0 + i0) = x0v;
    return;
  }
  for (int64_t e = 0; e < cnt; ++e) {
    const int64_t j = j0 + e, i = i0 + e;
    const int64_t mo_off = kSplit ? b * L.mo_bs + (j / L.mo_inner) * L.mo_rs + j % L.mo_inner
                                  : b * L.mo_bs + j;
    const float x = static_cast<float>(x_t[i]);
    float m = static_cast<float>(mo[mo_off]);
    if (guided) m = sampler_step_guide(w, m, static_cast<float>(mo[mo_off + L.cond_off]));
    const float x0c = sampler_step_x0(c, clip, clip_range, thr, thr_inv, x, m);
    float out = sampler_step_mean(c, x0c, x, m);
    if (add_noise) {
      const float z = kNoise == kNoiseGiven ? static_cast<float>(noise[i]) : lane(n, static_cast<uint64_t>(e));
      const float v = kStd != kStdFixed ? static_cast<float>(mo[mo_off + var_at]) : 0.0f;
      out += sampler_step_std<kStd>(c, v) * z;
    }
    x_prev[i] = static_cast<scalar_t>(out);
    if (write_x0) x0[i] = static_cast<scalar_t>(x0c);
  }
}

// Calls f(NoiseMode, StdMode, split) with compile-time values: the one table of variants both
// kernels instantiate. A learned variance is read only for the noise term; without one it is a
// plain mean (still read through the split layout).
template <typename F>
void sampler_step_variants(int noise_mode, int std_mode, bool split, F&& f) {
  using kG = std::integral_constant<int, kNoiseGiven>;
  using kD = std::integral_constant<int, kNoiseDrawn>;
  using kN = std::integral_constant<int, kNoiseNone>;
  using SF = std::integral_constant<int, kStdFixed>;
  using SR = std::integral_constant<int, kStdLearnedRange>;
  using SL = std::integral_constant<int, kStdLearned>;
  using T = std::true_type;
  using N = std::false_type;
  auto with_noise = [&](auto nz) {
    if (std_mode == kStdLearnedRange) {
      if (split) f(nz, SR{}, T{}); else f(nz, SR{}, N{});
    } else if (std_mode == kStdLearned) {
      if (split) f(nz, SL{}, T{}); else f(nz, SL{}, N{});
    } else {
      f(nz, SF{}, N{});
    }
  };
  if (noise_mode == kNoiseGiven) {
    with_noise(kG{});
  } else if (noise_mode == kNoiseDrawn) {
    with_noise(kD{});
  } else if (split) {
    f(kN{}, SF{}, T{});
  } else {
    f(kN{}, SF{}, N{});
  }
}

}  // namespace fastdiff
