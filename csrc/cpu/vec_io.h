// Loads and stores of 2W consecutive elements of T as two float vectors, for the *_vec.cpp
// kernels (compiled once per CPU capability, see cpu/vec.h; everything here is in namespace
// fastdiff::CPU_CAPABILITY): a 16-bit vector (c10::Half, c10::BFloat16) converts to two float
// vectors; float is two plain vectors.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <tuple>

namespace fastdiff {
namespace CPU_CAPABILITY {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t W = fVec::size();

template <typename T>
struct Io {
  using bVec = at::vec::Vectorized<T>;
  static_assert(bVec::size() == 2 * W, "a 16-bit vector holds two float vectors");
  static void load(const T* p, fVec& a, fVec& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(bVec::loadu(p));
  }
  static void store(T* p, const fVec& a, const fVec& b) {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
  static void store(T* p, const fVec& a, const fVec& b, int64_t n) {  // the first n < 2W
    at::vec::convert_from_float<T>(a, b).store(p, static_cast<int>(n));
  }
};

template <>
struct Io<float> {
  static void load(const float* p, fVec& a, fVec& b) {
    a = fVec::loadu(p);
    b = fVec::loadu(p + W);
  }
  static void store(float* p, const fVec& a, const fVec& b) {
    a.store(p);
    b.store(p + W);
  }
  static void store(float* p, const fVec& a, const fVec& b, int64_t n) {
    if (n > W) {
      a.store(p);
      b.store(p + W, static_cast<int>(n - W));
    } else {
      a.store(p, static_cast<int>(n));
    }
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace fastdiff
