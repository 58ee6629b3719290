// Forward noising on the CPU: one pass over memory, noise drawn in place (fastdiff::normal4).
#include <ATen/core/Tensor.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>

#include "q_sample.h"

namespace fastdiff {
namespace {

template <typename scalar_t>
void q_sample_cpu_impl(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& sqrt_ab,
                       const at::Tensor& sqrt_1mab, const c10::optional<at::Tensor>& noise,
                       uint64_t seed, at::Tensor& x_t, at::Tensor& eps, at::Tensor& v) {
  const scalar_t* x0p = x0.data_ptr<scalar_t>();
  const scalar_t* np = noise ? noise->data_ptr<scalar_t>() : nullptr;
  scalar_t* xtp = x_t.data_ptr<scalar_t>();
  scalar_t* ep = np ? nullptr : eps.data_ptr<scalar_t>();
  scalar_t* vp = v.numel() ? v.data_ptr<scalar_t>() : nullptr;
  const bool vec = is_aligned4(x0p) && is_aligned4(np) && is_aligned4(xtp) && is_aligned4(ep) &&
                   is_aligned4(vp);
  const QSampleArgs a{x0.numel(), x0.numel() / x0.size(0), sqrt_ab.numel(), seed, vec,
                      t.data_ptr<int64_t>(), sqrt_ab.data_ptr<float>(), sqrt_1mab.data_ptr<float>()};
  auto run = [&](auto group) {
    at::parallel_for(0, (a.numel + 3) / 4, 2048, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) group(g, a, x0p, np, xtp, ep, vp);
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
                  int64_t seed, at::Tensor x_t, at::Tensor eps, at::Tensor v) {
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
  if (x0.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "q_sample_cpu", [&] {
    q_sample_cpu_impl<scalar_t>(x0, t.contiguous(), sqrt_ab.contiguous(), sqrt_1mab.contiguous(),
                                noise, static_cast<uint64_t>(seed), x_t, eps, v);
  });
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_FRAGMENT(fastdiff_ext, m) {
  m.def("q_sample(Tensor x0, Tensor t, Tensor sqrt_ab, Tensor sqrt_1mab, Tensor? noise, int seed, "
        "Tensor(a!) x_t, Tensor(b!) eps, Tensor(c!) v) -> ()");
}

TORCH_LIBRARY_IMPL(fastdiff_ext, CPU, m) { m.impl("q_sample", &fastdiff::q_sample_cpu); }
