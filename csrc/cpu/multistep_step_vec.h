// The vectorized inner loop of the CPU multistep_step kernel, one variant per CPU capability
// (multistep_step_vec.cpp, see cpu/vec.h): whole blocks of W Philox groups (4W elements) of one
// sample. Threading, tails and the scalar path (csrc/multistep_step.h, the CUDA kernel's body)
// live in multistep_step.cpp.
#pragma once
#include <cstdint>

#include "cpu/q_sample_vec.h"
#include "multistep_step.h"

namespace fastdiff {

struct MultistepBlocks {
  const void* x;      // x_t at element 4k of the sample (every pointer: the same position)
  const void* m;      // the prediction (unconditional half with guidance)
  const void* mc;     // the conditional half, or nullptr: no guidance
  const void* noise;  // given z, or nullptr: drawn when add_noise
  const float* h[kMultistepMaxOrder];  // ring slots 0 .. K-1
  float* dst;         // the ring slot that receives x0 (one of h, read first)
  float* last;        // last_sample (read, then y written), or nullptr
  void* out;
  int64_t nblocks;
  MultistepCoef c;
  float thr, clip_range, w;
  int clip, K;
  bool add_noise;
  uint64_t seed;
  uint32_t image, k, step;  // Philox counter of the first group
};

}  // namespace fastdiff

FD_CPU_DECLARE(void multistep_step_blocks(::fastdiff::VecDtype dtype,
                                          const ::fastdiff::MultistepBlocks& r))
