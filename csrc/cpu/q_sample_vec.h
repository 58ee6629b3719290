// The vectorized inner loop of the CPU q_sample kernel, one variant per CPU capability
// (q_sample_vec.cpp, see cpu/vec.h): whole blocks of W Philox groups (4W elements) of one
// sample. Threading, tails and the scalar path (csrc/q_sample.h, the CUDA kernel's body) live
// in q_sample.cpp.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "cpu/vec.h"

namespace fastdiff {

enum class VecDtype : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

template <typename T> constexpr VecDtype vec_dtype() {
  return std::is_same<T, float>::value ? VecDtype::kFloat
                                       : (std::is_same<T, c10::Half>::value ? VecDtype::kHalf
                                                                            : VecDtype::kBFloat16);
}
// float, half, bfloat16 take the vector loops (double runs the reference, never these kernels)
template <typename T> constexpr bool has_vec_loop() { return !std::is_same<T, double>::value; }

// Work units of kVecUnit Philox groups of one sample: a fixed split (never the thread count's),
// so which element takes the vector loop or the scalar tail, and so its bits, never depend on
// the number of threads.
constexpr int64_t kVecUnit = 256;

struct QSampleBlocks {
  const void* x0;     // element 4 * k of the sample (and the same position in the others)
  const void* noise;  // given eps, or nullptr: drawn (and written to eps)
  void* x_t;
  void* eps;
  void* v;            // nullptr: no v target
  int64_t nblocks;    // blocks of W groups
  float a, s;         // sqrt(ab[t]), sqrt(1 - ab[t])
  uint64_t seed;
  uint32_t image, k, step;  // Philox counter of the first group
};

}  // namespace fastdiff

FD_CPU_DECLARE(int64_t vec_groups())  // W: Philox groups per vector block
FD_CPU_DECLARE(void q_sample_blocks(::fastdiff::VecDtype dtype, const ::fastdiff::QSampleBlocks& r))
