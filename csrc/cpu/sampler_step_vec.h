// The vectorized inner loop of the CPU sampler_step kernel, one variant per CPU capability
// (sampler_step_vec.cpp, see cpu/vec.h): whole blocks of W Philox groups (4W elements) of one
// sample whose model output is contiguous with it (every layout but channels_last learned
// variance). Threading, tails and the scalar path (csrc/sampler_step.h, the CUDA kernel's body)
// live in sampler_step.cpp.
#pragma once
#include <cstdint>

#include "cpu/q_sample_vec.h"
#include "sampler_step.h"

namespace fastdiff {

struct SamplerStepBlocks {
  const void* x;      // x_t at element 4k of the sample
  const void* m;      // the prediction (unconditional half with guidance) at the same element
  const void* mc;     // the conditional half, or nullptr: no guidance
  const void* var;    // the predicted variance (std_mode != kStdFixed and noise added)
  const void* noise;  // given z, or nullptr: drawn (when add_noise)
  void* out;
  void* x0;           // nullptr: not asked for
  int64_t nblocks;
  SamplerStepCoef c;
  float thr, clip_range, w;
  int clip, std_mode;
  bool add_noise;
  uint64_t seed;
  uint32_t image, k, step;
};

}  // namespace fastdiff

FD_CPU_DECLARE(void sampler_step_blocks(::fastdiff::VecDtype dtype,
                                        const ::fastdiff::SamplerStepBlocks& r))
