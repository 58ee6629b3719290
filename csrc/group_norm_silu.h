// GroupNorm + SiLU: the math shared by the CPU and CUDA kernels.
//
// Statistics are fp32 on shifted values d = (x - x_ref) + (add_c - add_ref), where (x_ref,
// add_ref) is the group's first element: GroupNorm is shift-invariant, and the shift keeps
// inputs with |mean| >> std (mean 1e4, std 1) from cancelling. Partial statistics are merged
// with Chan et al.'s pairwise formula; the output (affine, then * (1 + scale) + shift) is folded
// per channel into y = act((x - x_ref) * scale_c + k_c).
#pragma once
#include <cstdint>
#include <cmath>

#include "common.h"

namespace fastdiff {

struct GnStats {
  float n, mean, m2;  // count, mean of d, sum of squared deviations
};

FD_HD GnStats gn_combine(GnStats a, GnStats b) {
  const float nn = a.n + b.n;
  if (nn == 0.f) return a;
  const float delta = b.mean - a.mean;
  const float f = b.n / nn;
  return {nn, a.mean + delta * f, a.m2 + b.m2 + delta * delta * a.n * f};
}

// Statistics of a block from its shifted sums (sum d, sum d^2); the shift keeps mean^2 of the
// order of the variance, so this difference does not cancel badly.
FD_HD GnStats gn_from_sums(float n, float s1, float s2) {
  if (n == 0.f) return {0.f, 0.f, 0.f};
  const float mean = s1 / n;
  return {n, mean, fmaxf(s2 - s1 * mean, 0.f)};
}

FD_HD float gn_rstd(GnStats s, float eps) {
  return 1.0f / sqrtf(fmaxf(s.m2 / s.n, 0.f) + eps);
}

FD_HD float gn_silu(float y) {
  // exp argument clamped so that very negative y gives ~0, not y / inf
  return y / (1.0f + expf(fminf(-y, 80.f)));
}

struct GnCoef {
  float scale, k;
};

// y = (((x - x_ref) + da - mean) * rstd * w + b) * s1 + t  ==  (x - x_ref) * scale + k,
// with s1 = 1 + scale_bc and t = shift_bc (the scale/shift modulation; 1 and 0 without it)
FD_HD GnCoef gn_coef(float mean, float rstd, float w, float b, float da, float s1 = 1.f,
                     float t = 0.f) {
  const float scale = rstd * w;
  return {scale * s1, (b + (da - mean) * scale) * s1 + t};
}

FD_HD float gn_apply(float xr, GnCoef c, bool silu) {
  const float y = xr * c.scale + c.k;
  return silu ? gn_silu(y) : y;
}

// Memory order of a (B, C, *spatial) tensor: 0 if dense as (B, C, *spatial), 1 if dense as
// (B, *spatial, C) (channels_last, any spatial rank), -1 otherwise. Size-1 dims are ignored.
inline int gn_layout(const int64_t* sizes, const int64_t* strides, int ndim) {
  auto dense_in = [&](const int* order) {
    int64_t expected = 1;
    for (int i = ndim - 1; i >= 0; --i) {
      const int d = order[i];
      if (sizes[d] != 1 && strides[d] != expected) return false;
      expected *= sizes[d];
    }
    return true;
  };
  int order[8];
  for (int i = 0; i < ndim; ++i) order[i] = i;
  if (dense_in(order)) return 0;
  order[0] = 0;
  for (int i = 2; i < ndim; ++i) order[i - 1] = i;
  order[ndim - 1] = 1;
  if (dense_in(order)) return 1;
  return -1;
}

}  // namespace fastdiff
