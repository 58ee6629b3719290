// Which compiled variant of the vectorized CPU kernels runs (see vec.h).
#include "cpu/vec.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <atomic>

namespace fastdiff {
namespace cpu {
namespace {

std::atomic<int> g_forced{-1};

// The widest variant compiled in that torch would use on this CPU.
Capability detected() {
  static const Capability c = [] {
    const std::string torch_cap = at::get_cpu_capability();  // "AVX512", "AVX2", "DEFAULT", ...
#if defined(FD_HAVE_AVX512)
    if (torch_cap == "AVX512") return Capability::AVX512;
#endif
#if defined(FD_HAVE_AVX2)
    if (torch_cap == "AVX512" || torch_cap == "AVX2") return Capability::AVX2;
#endif
    return Capability::DEFAULT;
  }();
  return c;
}

}  // namespace

Capability capability() {
  const int f = g_forced.load(std::memory_order_relaxed);
  return f >= 0 ? static_cast<Capability>(f) : detected();
}

const char* capability_name(Capability c) {
  switch (c) {
    case Capability::AVX512: return "AVX512";
    case Capability::AVX2: return "AVX2";
    default: return "DEFAULT";
  }
}

std::vector<std::string> capabilities() {
  std::vector<std::string> out;
  for (int c = 0; c <= static_cast<int>(detected()); ++c)
    out.emplace_back(capability_name(static_cast<Capability>(c)));
  return out;
}

void set_capability(const std::string& name) {
  if (name.empty()) {
    g_forced.store(-1);
    return;
  }
  for (int c = 0; c <= static_cast<int>(detected()); ++c) {
    if (name == capability_name(static_cast<Capability>(c))) {
      g_forced.store(c);
      return;
    }
  }
  TORCH_CHECK_VALUE(false, "set_cpu_capability: ", name, " is not one of the variants this build "
                    "can run on this CPU (", capability_name(detected()), " and narrower), or ''");
}

}  // namespace cpu
}  // namespace fastdiff
