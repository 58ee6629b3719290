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
  int64_t numel, per_sample, num_t;
  uint64_t seed;
  bool vec;  // every data pointer is Vec4-aligned
  const int64_t* t;
  const float* sqrt_ab;
  const float* sqrt_1mab;
};

// Elements 4g .. 4g+3 (Philox group g). The group's four normals are drawn once per sample it
// touches: a group that straddles a sample boundary draws with each sample's own t, as
// fastdiff.reference defines (t as given; only the schedule index is clamped).
template <typename scalar_t, bool kHasNoise, bool kWantV>
FD_HD void q_sample_group(int64_t g, const QSampleArgs& a, const scalar_t* x0,
                          const scalar_t* noise, scalar_t* x_t, scalar_t* eps, scalar_t* v) {
  const int64_t end = 4 * g + 4 < a.numel ? 4 * g + 4 : a.numel;
  if (a.vec && end == 4 * g + 4 && (4 * g) / a.per_sample == (4 * g + 3) / a.per_sample) {
    // the common case: a whole group inside one sample, moved with one access per tensor
    const int64_t i = 4 * g, tb = a.t[i / a.per_sample];
    const QSampleCoef c = q_sample_coef(a.sqrt_ab, a.sqrt_1mab, tb, a.num_t);
    const Vec4<scalar_t> xv = *reinterpret_cast<const Vec4<scalar_t>*>(x0 + i);
    Vec4<scalar_t> ev, tv, vv;
    Normal4 n{};
    if (kHasNoise) ev = *reinterpret_cast<const Vec4<scalar_t>*>(noise + i);
    else n = normal4(a.seed, static_cast<uint64_t>(g), static_cast<uint32_t>(tb), kStreamQSample);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int k = 0; k < 4; ++k) {
      const float e = kHasNoise ? static_cast<float>(ev.v[k]) : n.v[k];
      if (!kHasNoise) ev.v[k] = static_cast<scalar_t>(e);
      const float x = static_cast<float>(xv.v[k]);
      tv.v[k] = static_cast<scalar_t>(q_sample_xt(c, x, e));
      if (kWantV) vv.v[k] = static_cast<scalar_t>(q_sample_v(c, x, e));
    }
    if (!kHasNoise) *reinterpret_cast<Vec4<scalar_t>*>(eps + i) = ev;
    *reinterpret_cast<Vec4<scalar_t>*>(x_t + i) = tv;
    if (kWantV) *reinterpret_cast<Vec4<scalar_t>*>(v + i) = vv;
    return;
  }
  for (int64_t i0 = 4 * g; i0 < end;) {
    const int64_t b = i0 / a.per_sample;
    const int64_t i1 = (b + 1) * a.per_sample < end ? (b + 1) * a.per_sample : end;
    const int64_t tb = a.t[b];
    const QSampleCoef c = q_sample_coef(a.sqrt_ab, a.sqrt_1mab, tb, a.num_t);
    Normal4 n{};
    if (!kHasNoise) n = normal4(a.seed, static_cast<uint64_t>(g), static_cast<uint32_t>(tb), kStreamQSample);
    for (int64_t i = i0; i < i1; ++i) {
      const float e = kHasNoise ? static_cast<float>(noise[i]) : lane(n, i);
      if (!kHasNoise) eps[i] = static_cast<scalar_t>(e);
      const float x = static_cast<float>(x0[i]);
      x_t[i] = static_cast<scalar_t>(q_sample_xt(c, x, e));
      if (kWantV) v[i] = static_cast<scalar_t>(q_sample_v(c, x, e));
    }
    i0 = i1;
  }
}

}  // namespace fastdiff
