// Range checks of the values a kernel reads (timesteps, the solver step, a device first_index
// and guidance scale), done by the extension rather than by the Python wrapper, so that the
// wrapper issues no device op and no host sync for them (issue 15). The CPU entry points check on
// the host before the loop (a CPU tensor is host memory) and raise a ValueError naming the
// argument, in the words of fastdiff/ops/_checks.py. The CUDA entry points launch one small
// kernel (value_checks_kernel, one block) on the op's stream before the op's kernel: a failure is
// a device-side assert naming the argument (CUDA_KERNEL_ASSERT_MSG; the CUDA error raised at the
// next synchronising call, as torch._assert_async's). Not inside the op's own kernel: a trap's
// call there costs it 20-40 registers (ptxas -v on sampler_step.cu: 54-80 -> 62-120 in every
// variant), a separate launch costs ~2-3 us of host time on a GPU, issued from C++, and none at
// all when nothing is to be checked. Which checks run is the ops' `checks` argument.
#pragma once
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>

#if defined(__CUDACC__)
#include <c10/cuda/CUDAException.h>
#endif

#include "common.h"

namespace fastdiff {

// Bits of the ops' `checks` argument (fastdiff/ops/_checks.py CHECK_VALUES, CHECK_FIRST_INDEX).
constexpr int64_t kCheckValues = 1;      // t (t_prev, ddpm's order), step, guidance_t
constexpr int64_t kCheckFirstIndex = 2;  // an int64 first_t in [0, 2^32 - B]
constexpr int64_t kImageIndexEnd = int64_t{1} << 32;  // the image index is one 32-bit word

// first_index as given (before the kernels take it mod 2^32).
FD_HD int64_t key_first_raw(const NoiseKey& k) {
  return k.first_ptr != nullptr ? k.first_ptr[0] : k.first;
}

#if defined(__CUDACC__)
// What value_checks_kernel checks: each pointer null when there is nothing of its kind to check.
struct DeviceValueChecks {
  const int64_t* t;       // (B,) in [0, num_t)
  const int64_t* t_prev;  // (B,) below num_t, and below t when ddpm
  int64_t B, num_t;
  bool ddpm;
  const int64_t* step;    // 1 element in [0, num_steps)
  int64_t num_steps;
  const int64_t* first;   // 1 element in [0, 2^32 - B]
  const float* w;         // 1 element, finite
};

namespace {
__global__ void value_checks_kernel(DeviceValueChecks c) {
  if (threadIdx.x == 0) {
    if (c.step != nullptr)
      CUDA_KERNEL_ASSERT_MSG(*c.step >= 0 && *c.step < c.num_steps,
                             "fastdiff: step out of range [0, S) (the rows of coefs)");
    if (c.first != nullptr)
      CUDA_KERNEL_ASSERT_MSG(*c.first >= 0 && *c.first <= kImageIndexEnd - c.B,
                             "fastdiff: first_index out of range [0, 2^32 - B]");
    if (c.w != nullptr)
      CUDA_KERNEL_ASSERT_MSG(isfinite(*c.w), "fastdiff: guidance_scale must be finite");
  }
  for (int64_t b = threadIdx.x; b < c.B; b += blockDim.x) {
    if (c.t != nullptr)
      CUDA_KERNEL_ASSERT_MSG(c.t[b] >= 0 && c.t[b] < c.num_t, "fastdiff: t out of range [0, T)");
    if (c.t_prev != nullptr) {
      CUDA_KERNEL_ASSERT_MSG(c.t_prev[b] < c.num_t, "fastdiff: t_prev out of range (-inf, T)");
      if (c.ddpm)
        CUDA_KERNEL_ASSERT_MSG(c.t == nullptr || c.t_prev[b] < c.t[b],
                               "fastdiff: kind='ddpm' needs t_prev < t");
    }
  }
}
}  // namespace

// Launches the checks on `stream` when there is any (checks: the ops' argument; the pointers
// are filled in here from it).
inline void launch_value_checks(DeviceValueChecks c, int64_t checks, cudaStream_t stream) {
  if (!(checks & kCheckValues)) {
    c.t = c.t_prev = c.step = nullptr;
    c.w = nullptr;
  }
  if (!(checks & kCheckFirstIndex)) c.first = nullptr;
  if (!c.t && !c.t_prev && !c.step && !c.first && !c.w) return;
  value_checks_kernel<<<1, 256, 0, stream>>>(c);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

// ---- host: the CPU entry points (values in host memory) ----

// t[0..B) in [0, T), or below T with allow_negative (any negative value: the final step).
inline void check_timesteps_host(const char* name, const int64_t* t, int64_t B, int64_t T,
                                 bool allow_negative) {
  if (B <= 0) return;
  int64_t lo = t[0], hi = t[0];
  for (int64_t b = 1; b < B; ++b) {
    lo = t[b] < lo ? t[b] : lo;
    hi = t[b] > hi ? t[b] : hi;
  }
  FD_CHECK((allow_negative || lo >= 0) && hi < T, name, " has values in [", lo, ", ", hi,
           "], outside ", allow_negative ? "(-inf, " : "[0, ", T, ")",
           allow_negative ? " (any negative value is the final step)" : "");
}

// ddpm: t_prev < t, sample by sample.
inline void check_ddpm_order_host(const int64_t* t, const int64_t* t_prev, int64_t B) {
  for (int64_t b = 0; b < B; ++b) {
    FD_CHECK(t_prev[b] < t[b], "kind='ddpm' needs t_prev < t (a step towards t = 0): got t_prev=",
             t_prev[b], " >= t=", t[b], " for sample ", b);
  }
}

inline void check_first_index_host(int64_t checks, const NoiseKey& k, int64_t B) {
  if (!(checks & kCheckFirstIndex)) return;
  const int64_t f = key_first_raw(k);
  FD_CHECK(f >= 0 && f <= kImageIndexEnd - B, "first_index must be in [0, ", kImageIndexEnd - B,
           "], got ", f);
}

inline void check_finite_host(int64_t checks, const char* name, const float* v) {
  if (!(checks & kCheckValues) || v == nullptr) return;
  FD_CHECK(std::isfinite(*v), name, " must be finite, got ", *v);
}

}  // namespace fastdiff
