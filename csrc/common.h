// Shared by the CPU and CUDA kernels: host+device qualifiers, argument-check macros, Philox.
#pragma once
#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define FD_HD __host__ __device__ __forceinline__
#else
#define FD_HD inline
#endif

#define FD_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)

namespace fastdiff {

#if defined(__CUDACC__)
// SM count of a device, cached (no ATen/cuda/CUDAContext.h: it pulls in cuBLAS/cuSPARSE headers).
inline int sm_count(int device) {
  static int cache[64] = {0};
  if (device < 0 || device >= 64) device = 0;
  if (cache[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device] = n > 0 ? n : 1;
  }
  return cache[device];
}
#endif

// Philox4x32-10 (Salmon et al., SC'11) and Box-Muller: the same normals as
// fastdiff.reference.philox_normal and kernels/philox.py. See reference.py for the definition.
struct Normal4 { float v[4]; };

FD_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

FD_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = mulhi32(M0, c[0]), lo0 = M0 * c[0];
    const uint32_t hi1 = mulhi32(M1, c[2]), lo1 = M1 * c[2];
    const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
    k0 += W0; k1 += W1;
  }
}

FD_HD float uniform_from_bits(uint32_t r) {
  return (static_cast<float>(r >> 9) + 0.5f) * 1.1920928955078125e-07f;  // (0, 1), exact
}

// Normals of elements 4g .. 4g+3 of image `image` (its global index) for (seed, step, stream):
// counter (g, image, step, stream), key = the seed's two words (fastdiff/reference.py).
FD_HD Normal4 normal4(uint64_t seed, uint32_t image, uint32_t g, uint32_t step, uint32_t stream) {
  uint32_t c[4] = {g, image, step, stream};
  philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  constexpr float kTwoPi = 6.2831854820251465f;
  const float rad_a = sqrtf(-2.0f * logf(uniform_from_bits(c[0])));
  const float rad_b = sqrtf(-2.0f * logf(uniform_from_bits(c[2])));
  const float th_a = kTwoPi * uniform_from_bits(c[1]);
  const float th_b = kTwoPi * uniform_from_bits(c[3]);
  Normal4 n;
  n.v[0] = rad_a * cosf(th_a); n.v[1] = rad_a * sinf(th_a);
  n.v[2] = rad_b * cosf(th_b); n.v[3] = rad_b * sinf(th_b);
  return n;
}

// The noise key of a launch: seed and the global index of sample 0, each a host value or, when
// its pointer is set, an int64 the kernel reads on the device (so a replayed CUDA graph sees a
// seed_t.fill_() / first_index_t.fill_()).
struct NoiseKey {
  uint64_t seed;
  int64_t first;
  const int64_t* seed_ptr;
  const int64_t* first_ptr;
};

FD_HD uint64_t key_seed(const NoiseKey& k) {
  return k.seed_ptr != nullptr ? static_cast<uint64_t>(k.seed_ptr[0]) : k.seed;
}
FD_HD uint32_t key_first(const NoiseKey& k) {
  return static_cast<uint32_t>(k.first_ptr != nullptr ? k.first_ptr[0] : k.first);
}
// Philox groups of one sample: group k holds its elements 4k .. 4k+3 (the last may be short);
// groups never straddle samples.
FD_HD int64_t groups_per_sample(int64_t per_sample) { return (per_sample + 3) / 4; }

// Counter word 1 of sample b: its global image index mod 2^32.
FD_HD uint32_t image_index(uint32_t first, int64_t b) {
  return first + static_cast<uint32_t>(b);
}

// Four consecutive elements moved as one 16-byte (fp32) or 8-byte (fp16/bf16) access; only for
// pointers aligned to its size (is_aligned4).
template <typename T>
struct alignas(4 * sizeof(T)) Vec4 { T v[4]; };

template <typename T>
inline bool is_aligned4(const T* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T)) == 0;
}

// Lane k of a Normal4 without indexing the array at run time: a dynamic index would put the
// four floats in local memory (a 48-byte stack frame per thread in ptxas -v); selects stay in
// registers.
FD_HD float lane(const Normal4& n, uint64_t k) {
  k &= 3;
  return k == 0 ? n.v[0] : (k == 1 ? n.v[1] : (k == 2 ? n.v[2] : n.v[3]));
}

// Normal j (position inside its image) of image `image`.
FD_HD float normal_at(uint64_t seed, uint32_t image, int64_t j, uint32_t step, uint32_t stream) {
  return lane(normal4(seed, image, static_cast<uint32_t>(j >> 2), step, stream), static_cast<uint64_t>(j));
}

}  // namespace fastdiff
