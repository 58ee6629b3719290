// The noise key (seed, first image index) of a launch from the ops' arguments: each an int, or
// a 1-element int64 tensor on the data's device. Host code (at::Tensor), shared by the CPU and
// CUDA entry points of q_sample and sampler_step.
#pragma once
#include <ATen/core/Tensor.h>

#include "common.h"

namespace fastdiff {

inline void check_key_tensor(const c10::optional<at::Tensor>& k, const at::Tensor& x,
                             const char* op, const char* name) {
  FD_CHECK(!k || (k->scalar_type() == at::kLong && k->numel() == 1 && k->device() == x.device()),
           op, ": ", name, " must be an int64 tensor of 1 element on the data's device");
}

// CPU: the values read here (a CPU tensor is host memory: no sync).
inline NoiseKey host_noise_key(int64_t seed, const c10::optional<at::Tensor>& seed_t,
                               int64_t first, const c10::optional<at::Tensor>& first_t,
                               const at::Tensor& x, const char* op) {
  check_key_tensor(seed_t, x, op, "seed_t");
  check_key_tensor(first_t, x, op, "first_t");
  NoiseKey k{static_cast<uint64_t>(seed), first, nullptr, nullptr};
  if (seed_t) k.seed = static_cast<uint64_t>(*seed_t->data_ptr<int64_t>());
  if (first_t) k.first = *first_t->data_ptr<int64_t>();
  return k;
}

// CUDA: pointers the kernel reads on the device (a captured graph reads them at every replay).
inline NoiseKey device_noise_key(int64_t seed, const c10::optional<at::Tensor>& seed_t,
                                 int64_t first, const c10::optional<at::Tensor>& first_t,
                                 const at::Tensor& x, const char* op) {
  check_key_tensor(seed_t, x, op, "seed_t");
  check_key_tensor(first_t, x, op, "first_t");
  return NoiseKey{static_cast<uint64_t>(seed), first,
                  seed_t ? seed_t->data_ptr<int64_t>() : nullptr,
                  first_t ? first_t->data_ptr<int64_t>() : nullptr};
}

}  // namespace fastdiff
