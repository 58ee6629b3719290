// The Python module fastdiff._C. Importing it registers the ops of every csrc/ file in the
// torch.library namespace `fastdiff_ext` (schemas in cpu/<op>.cpp via TORCH_LIBRARY_FRAGMENT,
// kernels via TORCH_LIBRARY_IMPL for CPU and, when built with CUDA, CUDA).
#include <torch/extension.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastdiff C++/CUDA kernels (ops registered under torch.ops.fastdiff_ext)";
  m.def("with_cuda", []() {
#ifdef FASTDIFF_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True when the CUDA kernels were compiled in.");
}
