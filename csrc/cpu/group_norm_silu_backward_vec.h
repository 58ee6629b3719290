// The vectorized inner loops of the CPU group_norm_silu backward, one variant per CPU capability
// (group_norm_silu_backward_vec.cpp, see vec.h). Plain pointers and sizes: the work units, the
// statistics and the per-group reductions live in group_norm_silu_backward.cpp.
//
// Per element, for one channel's coefficients (r, q, ws, kb): d = x - ref (ref: the group's first
// element), xhat = d r + q (the normalized value), z = xhat ws + kb (the pre-activation),
// dz = g silu'(z) (or g without SiLU), dx = c1 dz + c2 + c3 xhat.
#pragma once
#include <cstdint>

#include "cpu/group_norm_silu_vec.h"  // GnDtype
#include "cpu/vec.h"

namespace fastdiff {

struct GnBwdCoef {  // per channel
  float ref, r, q, ws, kb;
};

// NCHW-like layouts: one row of n contiguous elements of one channel.
//   row_sums: s1 = sum of d, s2 = sum of d^2
//   row_dz:   dz[i] (stored when dz is not null); a = sum of dz, bx = sum of dz xhat
//   row_dx:   dx[i] (stored when dx is not null); sdx = sum of dx (when not null)
// channels_last: npix pixels ldc elements apart, C contiguous channels of each (x at the first),
// per-channel arrays padded to a multiple of 2W (the lanes past C are computed and ignored), dz
// dense (npix, Cp) with Cp = C rounded up to 2W. The sums are added to s1/s2, a/bx, sdx.
// One channels_last work unit: S pixels ldc elements apart, C contiguous channels of each (whole
// groups of Cg), x/g/dx at the first; w/bias at the unit's first channel, add/scale/shift at its
// (image, first channel) (null when absent). The unit computes its statistics, dz (in `work`),
// the per-channel sums and dx (when dx is not null), and writes A = sum dz, Bx = sum dz xhat,
// dshift, dscale, dadd (each when not null) at its (image, first channel).
// work: gn_bwd_unit_work(C, S) floats.
struct GnBwdUnit {
  const void *x, *g;
  void* dx;
  int64_t ldc, C, S, Cg;
  const float *w, *bias, *add, *scale, *shift;
  float eps;
  bool silu, need_dz;
  float *A, *Bx, *dadd, *dscale, *dshift;
  float* work;
  GnStats (*stats)(const void* x, int64_t n, float ref, const float* da);  // run_unit's
};

struct GnBwdVecKernels {
  void (*row_sums)(const void* x, int64_t n, float ref, float* s1, float* s2);
  void (*row_dz)(const void* x, const void* g, float* dz, int64_t n, GnBwdCoef c, bool silu,
                 float* a, float* bx);
  void (*row_dx)(const void* x, const float* dz, void* dx, int64_t n, GnBwdCoef c, float c1,
                 float c2, float c3, float* sdx);
  void (*cl_sums)(const void* x, int64_t ldc, int64_t C, int64_t npix, const float* ref,
                  float* s1, float* s2);
  void (*cl_dz)(const void* x, const void* g, float* dz, int64_t ldc, int64_t C, int64_t npix,
                const float* ref, const float* r, const float* q, const float* ws,
                const float* kb, bool silu, float* a, float* bx);
  void (*cl_dx)(const void* x, const float* dz, void* dx, int64_t ldc, int64_t C, int64_t npix,
                const float* ref, const float* r, const float* q, const float* c1,
                const float* c2, const float* c3, float* sdx);
  void (*cl_unit)(const GnBwdUnit& u);
  // One NCHW-like group of short rows (C = Cg, ldc unused): its rows as one contiguous run of
  // C S elements, the per-channel coefficients spread per element, so that every pass is whole
  // vectors whatever S; the statistics from u.stats (the forward's run_stats: both see the
  // same numbers). Outputs as cl_unit's. work: gn_bwd_run_work(Cg, S) floats.
  void (*run_unit)(const GnBwdUnit& u);
  // (C, S) row-major block of n-element-apart rows <-> (S, C) dense, for NCHW-like rows too
  // short for SIMD along them (the unit then runs on the transposed copy)
  void (*to_cl)(const void* x, int64_t row_stride, int64_t C, int64_t S, void* out);
  void (*from_cl)(const void* in, int64_t C, int64_t S, void* x, int64_t row_stride);
};

}  // namespace fastdiff

FD_CPU_DECLARE(const ::fastdiff::GnBwdVecKernels& gn_bwd_vec_kernels(::fastdiff::GnDtype dtype))
FD_CPU_DECLARE(int64_t gn_bwd_vec_width())
FD_CPU_DECLARE(int64_t gn_bwd_unit_work(int64_t C, int64_t S))
FD_CPU_DECLARE(int64_t gn_bwd_run_work(int64_t Cg, int64_t S))

namespace fastdiff {

inline const GnBwdVecKernels& gn_bwd_vec_kernels(GnDtype dtype) {
  return FD_CPU_DISPATCH(gn_bwd_vec_kernels, dtype);
}

// 2W: the channel padding of the channels_last arrays for the variant in use
inline int64_t gn_bwd_vec_width() { return FD_CPU_DISPATCH(gn_bwd_vec_width); }

inline int64_t gn_bwd_unit_work(int64_t C, int64_t S) {
  return FD_CPU_DISPATCH(gn_bwd_unit_work, C, S);
}

inline int64_t gn_bwd_run_work(int64_t Cg, int64_t S) {
  return FD_CPU_DISPATCH(gn_bwd_run_work, Cg, S);
}

}  // namespace fastdiff
