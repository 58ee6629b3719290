// Forward noising on the GPU: one thread per Philox group of 4 consecutive elements of a sample,
// so each normal is drawn exactly once. Grid (x: chunks of a sample, y: sample b), as
// sampler_step: no per-group division to find a group's sample (two 64-bit divisions per group
// when the groups of all samples were one range), the sample's t and coefficients read once per
// sample; 64-bit element indices (> 2^31 elements). With drawn noise the block forms the seed's
// Philox round keys once (block_philox_key), and the loop over groups is compiled twice, with
// and without the whole-group (Vec4) path, so neither carries the other's index code.
#include <ATen/core/Tensor.h>
#include <torch/library.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include <type_traits>

#include "noise_key.h"
#include "q_sample.h"
#include "value_checks.h"

namespace fastdiff {
namespace {

// One thread per Philox group (4 consecutive elements of one sample; each normal drawn once):
// a grid-stride loop over the groups of sample b (grid axis y, striding over batches beyond
// 65535); the group body is q_sample_group_at, shared with (and tested through) the CPU.
template <typename scalar_t, bool kHasNoise, bool kWantV>
__global__ void q_sample_kernel(QSampleArgs a, int64_t B, const scalar_t* __restrict__ x0,
                                const scalar_t* __restrict__ noise, scalar_t* __restrict__ x_t,
                                scalar_t* __restrict__ eps, scalar_t* __restrict__ v) {
  // a device key read once per thread: q_sample_group_at reads a.key per group, and through a
  // pointer the stores may alias, nvcc reloaded it in every iteration (a dependent load)
  QSampleArgs ak = a;
  PhiloxKey pk{};
  if (!kHasNoise) {
    ak.key = NoiseKey{key_seed(a.key), key_first(a.key), nullptr, nullptr};
    pk = block_philox_key(ak.key.seed);
  }
  const int64_t gps = groups_per_sample(a.per_sample);
  auto groups = [&](auto vec) {  // the loops, with ak.vec a compile-time value inside
    ak.vec = decltype(vec)::value;
    for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
      const int64_t tb = __ldg(a.t + b);
      const QSampleCoef c = q_sample_coef(a.sqrt_ab, a.sqrt_1mab, tb, a.num_t);
      const uint32_t image = image_index(key_first(ak.key), b);
      const int64_t off = b * a.per_sample;  // the sample's first element (b = 0 below)
      for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < gps;
           k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        q_sample_group_at<scalar_t, kHasNoise, kWantV>(
            0, k, tb, c, pk, image, ak, x0 + off, at_sample(noise, off), x_t + off,
            at_sample(eps, off), at_sample(v, off));
      }
    }
  };
  if (a.vec) groups(std::true_type{}); else groups(std::false_type{});
}

void q_sample_cuda(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& sqrt_ab,
                   const at::Tensor& sqrt_1mab, const c10::optional<at::Tensor>& noise,
                   int64_t seed, const c10::optional<at::Tensor>& seed_t, int64_t first_index,
                   const c10::optional<at::Tensor>& first_t, at::Tensor x_t, at::Tensor eps,
                   at::Tensor v, int64_t checks) {
  FD_CHECK(x0.is_cuda() && t.is_cuda() && sqrt_ab.is_cuda() && sqrt_1mab.is_cuda(),
           "q_sample (cuda): x0, t and the schedule tables must be CUDA tensors");
  FD_CHECK(t.scalar_type() == at::kLong && t.numel() == x0.size(0) && t.is_contiguous(),
           "q_sample: t must be contiguous int64 of shape (B,)");
  FD_CHECK(sqrt_ab.scalar_type() == at::kFloat && sqrt_1mab.scalar_type() == at::kFloat,
           "q_sample: schedule tables must be float32");
  FD_CHECK(x_t.strides() == x0.strides(), "q_sample: x_t must be laid out like x0");
  // the kernel indexes noise, eps and v by x0's memory position, on x0's device
  FD_CHECK(x_t.device() == x0.device() &&
           (!noise || (noise->strides() == x0.strides() && noise->device() == x0.device())) &&
           (noise || (eps.strides() == x0.strides() && eps.device() == x0.device())) &&
           (v.numel() == 0 || (v.strides() == x0.strides() && v.device() == x0.device())),
           "q_sample: noise, x_t, eps and v must be laid out like x0, on its device");
  const NoiseKey key = device_noise_key(seed, seed_t, first_index, first_t, x0, "q_sample");
  const int64_t numel = x0.numel();
  if (numel == 0) return;
  const int64_t B = x0.size(0), per_sample = numel / B;
  const c10::cuda::CUDAGuard guard(x0.device());
  const int64_t groups = groups_per_sample(per_sample);
  const int threads = 256;
  // ~16 blocks per SM in all, at least one per sample
  const int64_t max_blocks = std::max<int64_t>(1, static_cast<int64_t>(sm_count(x0.get_device())) * 16 / B);
  const dim3 blocks(static_cast<unsigned>(std::min<int64_t>((groups + threads - 1) / threads, max_blocks)),
                    static_cast<unsigned>(std::min<int64_t>(B, 65535)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  launch_value_checks({t.data_ptr<int64_t>(), nullptr, B, sqrt_ab.numel(), false, nullptr, 0,
                       key.first_ptr, nullptr}, checks, stream);
  const bool has_noise = noise.has_value(), want_v = v.numel() > 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "q_sample_cuda", [&] {
    const scalar_t* np = has_noise ? noise->data_ptr<scalar_t>() : nullptr;
    scalar_t* ep = has_noise ? nullptr : eps.data_ptr<scalar_t>();
    scalar_t* vp = want_v ? v.data_ptr<scalar_t>() : nullptr;
    const bool vec = per_sample % 4 == 0 && is_aligned4(x0.data_ptr<scalar_t>()) &&
                     is_aligned4(np) && is_aligned4(x_t.data_ptr<scalar_t>()) &&
                     is_aligned4(ep) && is_aligned4(vp);
    const QSampleArgs a{per_sample, sqrt_ab.numel(), key, vec, t.data_ptr<int64_t>(),
                        sqrt_ab.data_ptr<float>(), sqrt_1mab.data_ptr<float>()};
    auto launch = [&](auto kernel) {
      kernel<<<blocks, threads, 0, stream>>>(a, B, x0.data_ptr<scalar_t>(), np,
                                             x_t.data_ptr<scalar_t>(), ep, vp);
    };
    if (has_noise) {
      if (want_v) launch(q_sample_kernel<scalar_t, true, true>);
      else launch(q_sample_kernel<scalar_t, true, false>);
    } else {
      if (want_v) launch(q_sample_kernel<scalar_t, false, true>);
      else launch(q_sample_kernel<scalar_t, false, false>);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff_ext, CUDA, m) { m.impl("q_sample", &fastdiff::q_sample_cuda); }
