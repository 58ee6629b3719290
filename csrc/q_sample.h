// Forward noising, per element: shared by the CPU and CUDA kernels.
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

}  // namespace fastdiff
