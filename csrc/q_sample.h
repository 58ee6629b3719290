// Forward noising: the per-element math and the per-group body, shared by the CPU and CUDA
// kernels, so the CPU tests run the exact code the GPU runs (only the loop over groups differs).
#pragma once
#include "common.h"

namespace fastdiff {

// Per-sample scalars, gathered once per sample from the schedule tables (t clamped to [0, T)).
struct QSampleCoef { float a, s; };  // sqrt(ab[t]), sqrt(1 - ab[t])

template <typename scalar_t>
FD_HD QSampleCoef q_sample_coef(const scalar_t* sqrt_ab, const scalar_t* sqrt_1mab, int64_t t,
                                int64_t num_t) {
  t = t < 0 ? 0 : (t >= num_t ? num_t - 1 : t);
  return {static_cast<float>(sqrt_ab[t]), static_cast<float>(sqrt_1mab[t])};
}

FD_HD float q_sample_xt(QSampleCoef c, float x0, float eps) { return c.a * x0 + c.s * eps; }
FD_HD float q_sample_v(QSampleCoef c, float x0, float eps) { return c.a * eps - c.s * x0; }

constexpr uint32_t kStreamQSample = 0;  // fastdiff.reference.STREAM_Q_SAMPLE

struct QSampleArgs {
  int64_t per_sample, num_t;
  NoiseKey key;  // seed and first image index (host values or device pointers)
  bool vec;      // per_sample % 4 == 0 and every data pointer Vec4-aligned
  const int64_t* t;
  const float* sqrt_ab;
  const float* sqrt_1mab;
};

// Philox group k of sample b: elements j = 4k .. min(4k + 4, per_sample) - 1 of the sample, at
// memory positions b * per_sample + j. The noise is that of image first + b at the sample's t
// as given (only the schedule index is clamped), as fastdiff.reference defines.
// q_sample_group_at: the same with the sample's t (as given), coefficients, round keys and
// image index already at hand (the CUDA kernel gathers them once per sample, not once per
// group, and passes b = 0 with pointers already at the sample).
template <typename scalar_t, bool kHasNoise, bool kWantV>
FD_HD void q_sample_group_at(int64_t b, int64_t k, int64_t tb, QSampleCoef c,
                             const PhiloxKey& pk, uint32_t image, const QSampleArgs& a,
                             const scalar_t* x0,
                             const scalar_t* noise,
                             scalar_t* x_t, scalar_t* eps, scalar_t* v) {
  const int64_t j0 = 4 * k, i0 = b * a.per_sample + j0;
  const int64_t n = a.per_sample - j0 < 4 ? a.per_sample - j0 : 4;
  Normal4 nz{};
  if (!kHasNoise)
    nz = normal4(pk, image, static_cast<uint32_t>(k),
                 static_cast<uint32_t>(tb), kStreamQSample);
  if (a.vec) {  // a whole group (per_sample % 4 == 0), moved with one access per tensor
    const Vec4<scalar_t> xv = *reinterpret_cast<const Vec4<scalar_t>*>(x0 + i0);
    Vec4<scalar_t> ev, tv, vv;
    if (kHasNoise) ev = *reinterpret_cast<const Vec4<scalar_t>*>(noise + i0);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int e = 0; e < 4; ++e) {
      const float z = kHasNoise ? static_cast<float>(ev.v[e]) : nz.v[e];
      if (!kHasNoise) ev.v[e] = static_cast<scalar_t>(z);
      const float x = static_cast<float>(xv.v[e]);
      tv.v[e] = static_cast<scalar_t>(q_sample_xt(c, x, z));
      if (kWantV) vv.v[e] = static_cast<scalar_t>(q_sample_v(c, x, z));
    }
    if (!kHasNoise) *reinterpret_cast<Vec4<scalar_t>*>(eps + i0) = ev;
    *reinterpret_cast<Vec4<scalar_t>*>(x_t + i0) = tv;
    if (kWantV) *reinterpret_cast<Vec4<scalar_t>*>(v + i0) = vv;
    return;
  }
  for (int64_t e = 0; e < n; ++e) {
    const int64_t i = i0 + e;
    const float z = kHasNoise ? static_cast<float>(noise[i]) : lane(nz, static_cast<uint64_t>(e));
    if (!kHasNoise) eps[i] = static_cast<scalar_t>(z);
    const float x = static_cast<float>(x0[i]);
    x_t[i] = static_cast<scalar_t>(q_sample_xt(c, x, z));
    if (kWantV) v[i] = static_cast<scalar_t>(q_sample_v(c, x, z));
  }
}

template <typename scalar_t, bool kHasNoise, bool kWantV>
FD_HD void q_sample_group(int64_t b, int64_t k, const QSampleArgs& a, const scalar_t* x0,
                          const scalar_t* noise, scalar_t* x_t, scalar_t* eps, scalar_t* v) {
  const int64_t tb = a.t[b];
  q_sample_group_at<scalar_t, kHasNoise, kWantV>(
      b, k, tb, q_sample_coef(a.sqrt_ab, a.sqrt_1mab, tb, a.num_t), philox_key(key_seed(a.key)),
      image_index(key_first(a.key), b), a, x0, noise, x_t, eps, v);
}

}  // namespace fastdiff
