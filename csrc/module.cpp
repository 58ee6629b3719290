// The Python module fastdiff._C. Importing it registers the ops of every csrc/ file in the
// torch.library namespace `fastdiff_ext` (schemas in cpu/<op>.cpp via TORCH_LIBRARY_FRAGMENT,
// kernels via TORCH_LIBRARY_IMPL for CPU and, when built with CUDA, CUDA).
#include <torch/extension.h>

#include "cpu/vec.h"

namespace fastdiff {
void group_norm_silu_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                         const c10::optional<at::Tensor>& bias,
                         const c10::optional<at::Tensor>& add,
                         const c10::optional<at::Tensor>& scale,
                         const c10::optional<at::Tensor>& shift, int64_t num_groups, double eps,
                         bool silu, at::Tensor out);
}  // namespace fastdiff

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastdiff C++/CUDA kernels (ops registered under torch.ops.fastdiff_ext)";
  m.def("with_cuda", []() {
#ifdef FASTDIFF_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True when the CUDA kernels were compiled in.");
  m.def("cpu_capability", []() {
    return std::string(fastdiff::cpu::capability_name(fastdiff::cpu::capability()));
  }, "The instruction set of the vectorized CPU kernels in use (DEFAULT, AVX2, AVX512).");
  m.def("cpu_capabilities", &fastdiff::cpu::capabilities,
        "The variants of the vectorized CPU kernels compiled in that this CPU can run.");
  m.def("group_norm_silu_cpu", &fastdiff::group_norm_silu_cpu,
        "torch.ops.fastdiff_ext.group_norm_silu's CPU kernel, called without the dispatcher.");
  m.def("set_cpu_capability", &fastdiff::cpu::set_capability, pybind11::arg("name"),
        "Run the vectorized CPU kernels of that variant ('' = the widest this CPU runs; tests).");
}
