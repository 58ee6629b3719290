// Forward noising on the CPU: one pass over memory, noise drawn in place (fastdiff::normal4).
#include <ATen/core/Tensor.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <type_traits>

#include "cpu/q_sample_vec.h"
#include "noise_key.h"
#include "q_sample.h"
#include "value_checks.h"

namespace fastdiff {
namespace {

constexpr int64_t kUnit = kVecUnit;

template <typename scalar_t>
void q_sample_cpu_impl(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& sqrt_ab,
                       const at::Tensor& sqrt_1mab, const c10::optional<at::Tensor>& noise,
                       const NoiseKey& key, at::Tensor& x_t, at::Tensor& eps, at::Tensor& v) {
  const scalar_t* x0p = x0.data_ptr<scalar_t>();
  const scalar_t* np = noise ? noise->data_ptr<scalar_t>() : nullptr;
  scalar_t* xtp = x_t.data_ptr<scalar_t>();
  scalar_t* ep = np ? nullptr : eps.data_ptr<scalar_t>();
  scalar_t* vp = v.numel() ? v.data_ptr<scalar_t>() : nullptr;
  const int64_t B = x0.size(0), per_sample = x0.numel() / B;
  const bool vec = per_sample % 4 == 0 && is_aligned4(x0p) && is_aligned4(np) &&
                   is_aligned4(xtp) && is_aligned4(ep) && is_aligned4(vp);
  const QSampleArgs a{per_sample, sqrt_ab.numel(), key, vec, t.data_ptr<int64_t>(),
                      sqrt_ab.data_ptr<float>(), sqrt_1mab.data_ptr<float>()};
  const int64_t gps = groups_per_sample(per_sample), units = (gps + kUnit - 1) / kUnit;
  // the vectorized loop (float, half, bfloat16) takes whole blocks of W groups; the shared
  // scalar body (csrc/q_sample.h, the CUDA kernel's) the rest
  constexpr bool kVecType = has_vec_loop<scalar_t>();
  const int64_t W = FD_CPU_DISPATCH(vec_groups);
  const int64_t full = per_sample / 4;  // groups with all four elements inside the sample
  auto run = [&](auto group) {
    at::parallel_for(0, B * units, std::max<int64_t>(1, 32768 / (4 * kUnit)),
                     [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t b = u / units, k0 = (u % units) * kUnit;
        const int64_t k1 = std::min(k0 + kUnit, gps);
        int64_t k = k0;
        if (kVecType) {
          const int64_t nb = (std::min(k1, full) - k0) / W;
          if (nb > 0) {
            const int64_t tb = a.t[b];
            const QSampleCoef c = q_sample_coef(a.sqrt_ab, a.sqrt_1mab, tb, a.num_t);
            const int64_t i = b * per_sample + 4 * k0;
            const QSampleBlocks r{x0p + i, np ? np + i : nullptr, xtp + i, ep ? ep + i : nullptr,
                                  vp ? vp + i : nullptr, nb, c.a, c.s, key.seed,
                                  image_index(key_first(key), b), static_cast<uint32_t>(k0),
                                  static_cast<uint32_t>(tb)};
            FD_CPU_DISPATCH(q_sample_blocks, vec_dtype<scalar_t>(), r);
            k += nb * W;
          }
        }
        for (; k < k1; ++k) group(b, k, a, x0p, np, xtp, ep, vp);
      }
    });
  };
  if (np) {
    if (vp) run(q_sample_group<scalar_t, true, true>); else run(q_sample_group<scalar_t, true, false>);
  } else {
    if (vp) run(q_sample_group<scalar_t, false, true>); else run(q_sample_group<scalar_t, false, false>);
  }
}

void q_sample_cpu(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& sqrt_ab,
                  const at::Tensor& sqrt_1mab, const c10::optional<at::Tensor>& noise,
                  int64_t seed, const c10::optional<at::Tensor>& seed_t, int64_t first_index,
                  const c10::optional<at::Tensor>& first_t, at::Tensor x_t, at::Tensor eps,
                  at::Tensor v, int64_t checks) {
  FD_CHECK(x0.device().is_cpu() && t.device().is_cpu(), "q_sample (cpu): tensors must be on the CPU");
  FD_CHECK(t.scalar_type() == at::kLong && t.numel() == x0.size(0),
           "q_sample: t must be int64 of shape (B,)");
  FD_CHECK(sqrt_ab.scalar_type() == at::kFloat && sqrt_1mab.scalar_type() == at::kFloat,
           "q_sample: schedule tables must be float32");
  FD_CHECK(x_t.strides() == x0.strides(), "q_sample: x_t must be laid out like x0");
  // the kernel indexes noise, eps and v by x0's memory position, on x0's device
  FD_CHECK(x_t.device() == x0.device() &&
           (!noise || (noise->strides() == x0.strides() && noise->device() == x0.device())) &&
           (noise || (eps.strides() == x0.strides() && eps.device() == x0.device())) &&
           (v.numel() == 0 || (v.strides() == x0.strides() && v.device() == x0.device())),
           "q_sample: noise, x_t, eps and v must be laid out like x0, on its device");
  const NoiseKey key = host_noise_key(seed, seed_t, first_index, first_t, x0, "q_sample");
  const at::Tensor tc = t.contiguous();
  if (checks & kCheckValues)
    check_timesteps_host("t", tc.data_ptr<int64_t>(), tc.numel(), sqrt_ab.numel(), false);
  check_first_index_host(checks, key, x0.size(0));
  if (x0.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "q_sample_cpu", [&] {
    q_sample_cpu_impl<scalar_t>(x0, tc, sqrt_ab.contiguous(), sqrt_1mab.contiguous(),
                                noise, key, x_t, eps, v);
  });
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_FRAGMENT(fastdiff_ext, m) {
  m.def("q_sample(Tensor x0, Tensor t, Tensor sqrt_ab, Tensor sqrt_1mab, Tensor? noise, int seed, "
        "Tensor? seed_t, int first_index, Tensor? first_t, Tensor(a!) x_t, Tensor(b!) eps, "
        "Tensor(c!) v, int checks=0) -> ()");
}

TORCH_LIBRARY_IMPL(fastdiff_ext, CPU, m) { m.impl("q_sample", &fastdiff::q_sample_cpu); }
