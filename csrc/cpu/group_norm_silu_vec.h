// The vectorized inner loops of the CPU group_norm_silu kernel, one variant per CPU capability
// (group_norm_silu_vec.cpp, see vec.h). Plain pointers and sizes: the threading, the chunking
// and the statistics of each group live in group_norm_silu.cpp.
#pragma once
#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/vec.h"
#include "group_norm_silu.h"

namespace fastdiff {

enum class GnDtype : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

// One element of x as float (the forward and backward read each group's reference this way).
inline float load_float(const char* p, GnDtype dt) {
  switch (dt) {
    case GnDtype::kHalf: return static_cast<float>(*reinterpret_cast<const c10::Half*>(p));
    case GnDtype::kBFloat16: return static_cast<float>(*reinterpret_cast<const c10::BFloat16*>(p));
    default: return *reinterpret_cast<const float*>(p);
  }
}

// NCHW-like layouts: one row of n contiguous elements of one channel.
//   row_stats: statistics of d = x - ref over the row
//   row_apply: y = act((x - ref) * a + k)
// Rows shorter than a unit (2W elements): a group's rows, one contiguous run of n elements,
// with per-element da / a / k (each row's value repeated over it; a and k zero-padded to a
// multiple of `unit`).
//   run_stats: statistics of d = x - ref + da[i] (da may be null: no add)
//   run_apply: y = act((x - ref) * a[i] + k[i])
// channels_last: npix pixels, ldc elements apart; C contiguous channels of each (C <= ldc: a
// slab of the channels), x at the first of them.
//   cl_sums:  s1[c] += sum of d, s2[c] += sum of d^2 over the pixels, d = x[., c] - ref[c]
//   cl_fold:  (n, mean[c], m2[c]) <- Chan's combination with the block (nb, s1[c], s2[c])
//   cl_apply: y[., c] = act((x[., c] - ref[c]) * a[c] + k[c])
struct GnVecKernels {
  GnStats (*row_stats)(const void* x, int64_t n, float ref);
  void (*row_apply)(const void* x, void* y, int64_t n, float ref, float a, float k, bool silu);
  GnStats (*run_stats)(const void* x, int64_t n, float ref, const float* da);
  void (*run_apply)(const void* x, void* y, int64_t n, float ref, const float* a, const float* k,
                    bool silu);
  void (*cl_sums)(const void* x, int64_t ldc, int64_t C, int64_t npix, const float* ref,
                  float* s1, float* s2);
  void (*cl_apply)(const void* x, void* y, int64_t ldc, int64_t C, int64_t npix, const float* ref,
                   const float* a, const float* k, bool silu);
  int64_t unit;  // 2W: the elements of one unit (two float vectors)
};

}  // namespace fastdiff

FD_CPU_DECLARE(const ::fastdiff::GnVecKernels& gn_vec_kernels(::fastdiff::GnDtype dtype))
FD_CPU_DECLARE(void gn_cl_fold(int64_t C, float n, float* mean, float* m2, float nb,
                               const float* s1, const float* s2))

namespace fastdiff {

inline const GnVecKernels& gn_vec_kernels(GnDtype dtype) {
  return FD_CPU_DISPATCH(gn_vec_kernels, dtype);
}

inline void gn_cl_fold(int64_t C, float n, float* mean, float* m2, float nb, const float* s1,
                       const float* s2) {
  FD_CPU_DISPATCH(gn_cl_fold, C, n, mean, m2, nb, s1, s2);
}

}  // namespace fastdiff
