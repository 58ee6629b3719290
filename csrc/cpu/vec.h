// CPU instruction sets: which compiled variant of the vectorized kernels (csrc/cpu/*_vec.cpp) runs.
//
// setup.py compiles every *_vec.cpp once per capability (DEFAULT everywhere; AVX2 and AVX512 on
// x86-64), each with its flags and CPU_CAPABILITY=<name>, so at::vec::Vectorized is SIMD of that
// width and one source serves every CPU (as ATen's own kernels). Each variant defines its
// functions in namespace fastdiff::<CAPABILITY>. At run time the widest variant that torch's own
// dispatch would use (at::get_cpu_capability(): the CPU's features, ATEN_CPU_CAPABILITY) is taken,
// or the one set by set_cpu_capability (tests run every variant this CPU can execute).
#pragma once
#include <string>
#include <vector>

namespace fastdiff {
namespace cpu {

enum class Capability : int { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };

Capability capability();                       // the variant the kernels use now
const char* capability_name(Capability c);
std::vector<std::string> capabilities();       // compiled in and executable on this CPU
// "" restores the automatic choice; raises for a variant that is not in capabilities()
void set_capability(const std::string& name);

}  // namespace cpu
}  // namespace fastdiff

// FD_CPU_DISPATCH(fn, args...): calls fastdiff::<variant>::fn(args...) for the current variant.
#if defined(FD_HAVE_AVX512)
#define FD_CPU_CASE_AVX512(fn, ...) \
  case ::fastdiff::cpu::Capability::AVX512: return ::fastdiff::AVX512::fn(__VA_ARGS__);
#else
#define FD_CPU_CASE_AVX512(fn, ...)
#endif
#if defined(FD_HAVE_AVX2)
#define FD_CPU_CASE_AVX2(fn, ...) \
  case ::fastdiff::cpu::Capability::AVX2: return ::fastdiff::AVX2::fn(__VA_ARGS__);
#else
#define FD_CPU_CASE_AVX2(fn, ...)
#endif
#define FD_CPU_DISPATCH(fn, ...)                             \
  [&]() -> decltype(auto) {                                   \
    switch (::fastdiff::cpu::capability()) {                 \
      FD_CPU_CASE_AVX512(fn, __VA_ARGS__)                    \
      FD_CPU_CASE_AVX2(fn, __VA_ARGS__)                      \
      default: return ::fastdiff::DEFAULT::fn(__VA_ARGS__);  \
    }                                                        \
  }()

// Declares fn in every compiled variant's namespace (use at namespace scope, outside fastdiff).
#if defined(FD_HAVE_AVX512)
#define FD_CPU_DECLARE_AVX512(decl) namespace fastdiff { namespace AVX512 { decl; } }
#else
#define FD_CPU_DECLARE_AVX512(decl)
#endif
#if defined(FD_HAVE_AVX2)
#define FD_CPU_DECLARE_AVX2(decl) namespace fastdiff { namespace AVX2 { decl; } }
#else
#define FD_CPU_DECLARE_AVX2(decl)
#endif
#define FD_CPU_DECLARE(decl)                            \
  namespace fastdiff { namespace DEFAULT { decl; } }    \
  FD_CPU_DECLARE_AVX2(decl) FD_CPU_DECLARE_AVX512(decl)
