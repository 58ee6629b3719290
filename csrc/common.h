// Shared by the CPU and CUDA kernels: host+device qualifiers, argument-check macros, Philox.
#pragma once
#include <cstdint>
#include <cstring>
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

// The ten round keys (k0 + r W0, k1 + r W1) of a seed: a kernel forms them once per thread,
// outside its loop over groups (in the loop they cost 18 adds a group, which nvcc re-issued in
// every iteration).
struct PhiloxKey { uint32_t k0[10], k1[10]; };

FD_HD PhiloxKey philox_key(uint64_t seed) {
  constexpr uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  PhiloxKey k;
  uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) { k.k0[r] = a; k.k1[r] = b; a += W0; b += W1; }
  return k;
}

#if defined(__CUDA_ARCH__)
// The round keys of a launch's seed, held in registers for the kernel's life: formed once a
// block into shared memory and loaded by every thread (values ptxas cannot recompute, so it
// keeps them rather than re-adding 18 keys in every iteration of the loop over groups). Every
// thread of the block must call it (it has a __syncthreads), before any of them returns.
__device__ __forceinline__ PhiloxKey block_philox_key(uint64_t seed) {
  __shared__ uint32_t sk[20];
  const PhiloxKey k = philox_key(seed);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int r = 0; r < 10; ++r) { sk[r] = k.k0[r]; sk[10 + r] = k.k1[r]; }
  }
  __syncthreads();
  PhiloxKey out;
#pragma unroll
  for (int r = 0; r < 10; ++r) { out.k0[r] = sk[r]; out.k1[r] = sk[10 + r]; }
  return out;
}
#endif

// The 32 x 32 -> 64-bit product a * M as (hi, lo). On the GPU one mul.wide.u32 (one
// IMAD.WIDE.U32): written as a uint64_t product, NVVM widened the whole round to 64-bit
// multiplies and xors, which cost ptxas an extra add on every high word.
template <uint32_t M>
FD_HD void mul_wide(uint32_t a, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  asm("{\n\t.reg .u64 t;\n\tmul.wide.u32 t, %2, %3;\n\tmov.b64 {%0, %1}, t;\n\t}"
      : "=r"(lo), "=r"(hi) : "r"(a), "n"(M));
#else
  const uint64_t p = static_cast<uint64_t>(a) * M;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

FD_HD void philox4x32_10(uint32_t c[4], const PhiloxKey& k) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mul_wide<M0>(c[0], hi0, lo0);
    mul_wide<M1>(c[2], hi1, lo1);
    const uint32_t n0 = hi1 ^ c[1] ^ k.k0[r], n2 = hi0 ^ c[3] ^ k.k1[r];
    c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
  }
}

FD_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  philox4x32_10(c, philox_key((static_cast<uint64_t>(k1) << 32) | k0));
}

// Box-Muller's math, branch-free (the same operations in the same order as kernels/philox.py,
// so the CUDA and Triton kernels draw the same bits; see its docstring for the derivation and
// tests/test_reference.py for the accuracy over every possible input).
FD_HD float fd_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return fmaf(a, b, c);
#else
  return std::fma(a, b, c);  // exact on any host (a libm call without FMA instructions)
#endif
}

FD_HD float bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f; std::memcpy(&f, &b, 4); return f;
#endif
}

FD_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b; std::memcpy(&b, &f, 4); return b;
#endif
}

FD_HD float uniform_from_bits(uint32_t r) {
  // ((r >> 9) + 0.5) 2^-23 = (r >> 9) 2^-23 + 2^-24: in (0, 1), exact in float32 either way
  return fd_fma(static_cast<float>(r >> 9), 1.1920928955078125e-07f, 5.960464477539063e-08f);
}

// The polynomial cores of log_unit and sincos_f32, generic over float and at::vec vectors: fmadd
// is fd_fma here and at::vec::fmadd (found by argument-dependent lookup) for a vector, so the
// CPU's vectorized noise (cpu/noise_vec.h) evaluates the same FMAs in the same order.
FD_HD float fmadd(float a, float b, float c) { return fd_fma(a, b, c); }

// ln(1 + f) + e ln 2 for f in [-1/3, 1/3): f + f^2 Q(f), Q of degree 7 (relative minimax).
template <typename F>
FD_HD F log_poly(F f, F e) {
  F q = fmadd(f, F(0.1402635138498298f), F(-0.15388540944823348f));
  q = fmadd(q, f, F(0.13995808485929315f));
  q = fmadd(q, f, F(-0.1641596054634504f));
  q = fmadd(q, f, F(0.20011168579606942f));
  q = fmadd(q, f, F(-0.2500781890569325f));
  q = fmadd(q, f, F(0.33333198138563097f));
  q = fmadd(q, f, F(-0.49999936078637364f));
  return fmadd(e, F(0.6931471805599453f), fmadd(f * f, q, f));
}

// th = k pi/2 + r (|r| <= pi/4) for th in [0, 2^21): j = k + 1.5 2^23 (the rint trick; its low
// bits are the quadrant), r by three FMAs.
template <typename F>
FD_HD F quadrant_reduce(F th, F& j) {
  j = fmadd(th, F(0.6366197723675814f), F(12582912.0f));
  const F k = j - F(12582912.0f);
  F r = fmadd(k, F(-1.5707963705062866f), th);
  r = fmadd(k, F(4.371138828673793e-08f), r);
  return fmadd(k, F(1.7151245100059532e-15f), r);
}

// sin r = r + r^3 S(r^2) (degree 7), cos r = 1 + r^2 C(r^2) (degree 8), for |r| <= pi/4.
template <typename F>
FD_HD void sincos_poly(F r, F& s, F& c) {
  const F r2 = r * r;
  s = fmadd(fmadd(r2, F(-0.00019515283237537488f), F(0.008332160762279583f)), r2,
            F(-0.1666665460955734f));
  s = fmadd(r * r2, s, r);
  c = fmadd(fmadd(fmadd(r2, F(2.4383567388999716e-05f), F(-0.0013886681648948365f)), r2,
                  F(0.041666620357168664f)), r2, F(-0.49999999694476394f));
  c = fmadd(r2, c, F(1.0f));
}

// ln u for u in (0, 1), never 0 or subnormal: u = m 2^e, m in [2/3, 4/3), ln m by log_poly;
// <= 1.04 ulp over every possible uniform.
FD_HD float log_unit(float u) {
  const int32_t bits = static_cast<int32_t>(float_to_bits(u));
  const int32_t e = (bits - 0x3F2AAAAB) >> 23;
  const float f = bits_to_float(static_cast<uint32_t>(bits - e * (1 << 23))) - 1.0f;  // exact
  return log_poly(f, static_cast<float>(e));
}

// sin and cos of th in [0, 2^21) (the kernels': [0, 2 pi)) from one range reduction; the
// quadrant swaps them and flips signs. <= 1.5 ulp.
struct SinCos { float s, c; };
FD_HD SinCos sincos_f32(float th) {
  float j, s, c;
  sincos_poly(quadrant_reduce(th, j), s, c);
  const uint32_t q = float_to_bits(j);
  const bool swap = (q & 1u) != 0;
  return {bits_to_float(float_to_bits(swap ? c : s) ^ ((q & 2u) << 30)),
          bits_to_float(float_to_bits(swap ? s : c) ^ (((q + 1u) & 2u) << 30))};
}

// sqrt of a positive normal float: rsqrt.approx and one Newton step on the GPU (<= 1 ulp, no
// slow path; Triton's tl.rsqrt is the same instruction), correctly rounded on the host.
FD_HD float sqrt_pos(float x) {
#if defined(__CUDA_ARCH__)
  // .ftz: x is never subnormal here, and rsqrtf's (non-ftz) scaling of subnormal inputs cost
  // four instructions; the same MUFU.RSQ result for every normal x
  float y;
  asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  const float s = x * y;
  return fmaf(fmaf(-s, s, x), 0.5f * y, s);
#else
  return sqrtf(x);
#endif
}

// x / s for a per-sample s > 0 (a dynamic-threshold scale), with inv = 1.0 / double(s) formed
// once per sample: on the GPU float(double(x) * inv), three instructions where a correctly
// rounded float division is ~18 (rcp, corrections, a slow-path check) per element. The same
// float as x / s wherever the quotient is a normal float (and for 0, inf, NaN): with x = X 2^a,
// s = S 2^b (integers X, S < 2^24) and a rounding midpoint m = M 2^c (M odd, 2^24 < M < 2^25),
// x - s m is a nonzero multiple of 2^min(a, b + c) (S M has an odd part > 2^24, X not), so
// x / s lies at least 2^-49 |m| from every midpoint, and the two float64 roundings move it by
// less than 2^-52 of itself: it rounds to the same float. A quotient below 2^-126 (a subnormal
// midpoint can be hit exactly) may differ by one subnormal ulp. The host divides.
FD_HD float div_by_sample(float x, float s, double inv) {
#if defined(__CUDA_ARCH__)
  (void)s;
  return static_cast<float>(static_cast<double>(x) * inv);
#else
  (void)inv;
  return x / s;
#endif
}

// Normals of elements 4g .. 4g+3 of image `image` (its global index) for (seed, step, stream):
// counter (g, image, step, stream), key = the seed's two words (fastdiff/reference.py).
// The key as round keys (philox_key, formed once per thread by the CUDA kernels) or a seed.
FD_HD Normal4 normal4(const PhiloxKey& key, uint32_t image, uint32_t g, uint32_t step,
                      uint32_t stream) {
  uint32_t c[4] = {g, image, step, stream};
  philox4x32_10(c, key);
  constexpr float kTwoPi = 6.2831854820251465f;
  const float rad_a = sqrt_pos(-2.0f * log_unit(uniform_from_bits(c[0])));
  const float rad_b = sqrt_pos(-2.0f * log_unit(uniform_from_bits(c[2])));
  const SinCos a = sincos_f32(kTwoPi * uniform_from_bits(c[1]));
  const SinCos b = sincos_f32(kTwoPi * uniform_from_bits(c[3]));
  Normal4 n;
  n.v[0] = rad_a * a.c; n.v[1] = rad_a * a.s;
  n.v[2] = rad_b * b.c; n.v[3] = rad_b * b.s;
  return n;
}

FD_HD Normal4 normal4(uint64_t seed, uint32_t image, uint32_t g, uint32_t step, uint32_t stream) {
  return normal4(philox_key(seed), image, g, step, stream);
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

// p + off, or null for an absent (null) tensor: the CUDA kernels move their pointers to the
// sample once per sample, so a group's offsets are 4k, not b * per_sample + 4k (a 64-bit
// multiply-add in every iteration).
template <typename T>
FD_HD T* at_sample(T* p, int64_t off) { return p != nullptr ? p + off : p; }

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
