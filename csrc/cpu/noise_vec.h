// Vectorized Philox4x32-10 + Box-Muller for the *_vec.cpp kernels of q_sample, sampler_step and
// multistep_step (compiled once per CPU capability, see cpu/vec.h; everything here is in
// namespace fastdiff::CPU_CAPABILITY). fastdiff::normal4's arithmetic (common.h) on W lanes, one
// per Philox group: the 32-bit multiply-high done in SIMD lanes (vpmuludq on the even and odd
// lanes), the same log and sin/cos polynomials: the same bits as normal4 (with FMA instructions:
// AVX2, AVX-512, NEON; x86's DEFAULT variant takes libm's log, sin and cos).
#pragma once
#include <cstdint>

#include "common.h"
#include "cpu/vec_io.h"

namespace fastdiff {
namespace CPU_CAPABILITY {

using iVec = at::vec::Vectorized<int32_t>;

// W uint32 lanes (W: the float lanes, cpu/vec_io.h), one per Philox group; a block is W groups,
// 4W elements.
#if defined(CPU_CAPABILITY_AVX512)
struct U32 {
  __m512i v;
  static U32 bcast(uint32_t a) { return {_mm512_set1_epi32(static_cast<int>(a))}; }
  static U32 iota(uint32_t a) {
    return {_mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(a)),
                             _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15))};
  }
};
inline U32 operator^(U32 a, U32 b) { return {_mm512_xor_si512(a.v, b.v)}; }
inline void mulhilo(U32 a, uint32_t m, U32& hi, U32& lo) {
  const __m512i mm = _mm512_set1_epi32(static_cast<int>(m));
  const __m512i even = _mm512_mul_epu32(a.v, mm);                          // lanes 0, 2, ...
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a.v, 32), mm);    // lanes 1, 3, ...
  hi = {_mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd)};
  lo = {_mm512_mullo_epi32(a.v, mm)};
}
inline fVec uniform(U32 r) {  // ((r >> 9) + 0.5) * 2^-23
  return (fVec(_mm512_cvtepi32_ps(_mm512_srli_epi32(r.v, 9))) + fVec(0.5f)) *
         fVec(1.1920928955078125e-07f);
}
inline iVec float_bits(const fVec& f) { return _mm512_castps_si512(f); }
inline fVec bits_float(const iVec& i) { return _mm512_castsi512_ps(i); }
#elif defined(CPU_CAPABILITY_AVX2)
struct U32 {
  __m256i v;
  static U32 bcast(uint32_t a) { return {_mm256_set1_epi32(static_cast<int>(a))}; }
  static U32 iota(uint32_t a) {
    return {_mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(a)),
                             _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))};
  }
};
inline U32 operator^(U32 a, U32 b) { return {_mm256_xor_si256(a.v, b.v)}; }
inline void mulhilo(U32 a, uint32_t m, U32& hi, U32& lo) {
  const __m256i mm = _mm256_set1_epi32(static_cast<int>(m));
  const __m256i even = _mm256_mul_epu32(a.v, mm);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a.v, 32), mm);
  hi = {_mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA)};
  lo = {_mm256_mullo_epi32(a.v, mm)};
}
inline fVec uniform(U32 r) {
  return (fVec(_mm256_cvtepi32_ps(_mm256_srli_epi32(r.v, 9))) + fVec(0.5f)) *
         fVec(1.1920928955078125e-07f);
}
inline iVec float_bits(const fVec& f) { return _mm256_castps_si256(f); }
inline fVec bits_float(const iVec& i) { return _mm256_castsi256_ps(i); }
#else
struct U32 {  // plain lanes (the compiler's own vectorization, or NEON through at::vec's width)
  uint32_t v[W];
  static U32 bcast(uint32_t a) { U32 r; for (int64_t i = 0; i < W; ++i) r.v[i] = a; return r; }
  static U32 iota(uint32_t a) {
    U32 r; for (int64_t i = 0; i < W; ++i) r.v[i] = a + static_cast<uint32_t>(i); return r;
  }
};
inline U32 operator^(U32 a, U32 b) { for (int64_t i = 0; i < W; ++i) a.v[i] ^= b.v[i]; return a; }
inline void mulhilo(U32 a, uint32_t m, U32& hi, U32& lo) {
  for (int64_t i = 0; i < W; ++i) {
    const uint64_t p = static_cast<uint64_t>(a.v[i]) * m;
    hi.v[i] = static_cast<uint32_t>(p >> 32);
    lo.v[i] = static_cast<uint32_t>(p);
  }
}
inline fVec uniform(U32 r) {
  alignas(64) float f[W];
  for (int64_t i = 0; i < W; ++i) f[i] = static_cast<float>(r.v[i] >> 9);
  return (fVec::loadu(f) + fVec(0.5f)) * fVec(1.1920928955078125e-07f);
}
inline iVec float_bits(const fVec& f) { return at::vec::cast<int32_t>(f); }
inline fVec bits_float(const iVec& i) { return at::vec::cast<float>(i); }
#endif

#if defined(CPU_CAPABILITY_DEFAULT) && !defined(__FMA__) && !defined(__ARM_FEATURE_FMA)
// No FMA instructions (x86 below AVX2): the polynomials' range reduction needs exact products,
// so each lane takes libm's log, sin and cos.
inline fVec log_unit(const fVec& u) { return u.log(); }
inline void sincos(const fVec& th, fVec& s, fVec& c) {
  s = th.sin();
  c = th.cos();
}
#else
// log_unit and sincos_f32 (common.h) on W lanes: their polynomials, the bit tricks in int32 lanes.
inline fVec log_unit(const fVec& u) {
  const iVec bits = float_bits(u);
  const iVec e = (bits - iVec(0x3F2AAAAB)) >> iVec(23);
  const fVec f = bits_float(bits - (e << iVec(23))) - fVec(1.0f);  // exact
  return log_poly(f, at::vec::convert_to_fp_of_same_size<float>(e));
}

inline void sincos(const fVec& th, fVec& s, fVec& c) {
  fVec j, ps, pc;
  sincos_poly(quadrant_reduce(th, j), ps, pc);
  const iVec q = float_bits(j), one(1), two(2);
  const fVec swap = bits_float((q & one) == one);
  s = bits_float(float_bits(fVec::blendv(ps, pc, swap)) ^ ((q & two) << iVec(30)));
  c = bits_float(float_bits(fVec::blendv(pc, ps, swap)) ^ (((q + one) & two) << iVec(30)));
}
#endif

// The 4W normals of Philox groups k .. k+W-1 of image `image` (counter (k + lane, image, step,
// stream)), in element order: out[4 * lane + l] = normal l of group k + lane (out 64-byte
// aligned).
inline void normals_block(uint64_t seed, uint32_t image, uint32_t k, uint32_t step,
                          uint32_t stream, float* out) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  U32 c0 = U32::iota(k), c1 = U32::bcast(image), c2 = U32::bcast(step), c3 = U32::bcast(stream);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    U32 hi0, lo0, hi1, lo1;
    mulhilo(c0, M0, hi0, lo0);
    mulhilo(c2, M1, hi1, lo1);
    c0 = hi1 ^ c1 ^ U32::bcast(k0);
    c1 = lo1;
    c2 = hi0 ^ c3 ^ U32::bcast(k1);
    c3 = lo0;
    k0 += W0; k1 += W1;
  }
  const fVec two_pi(6.2831854820251465f), m2(-2.0f);
  const fVec rad_a = (m2 * log_unit(uniform(c0))).sqrt();
  const fVec rad_b = (m2 * log_unit(uniform(c2))).sqrt();
  fVec sa, ca, sb, cb;
  sincos(two_pi * uniform(c1), sa, ca);
  sincos(two_pi * uniform(c3), sb, cb);
  const fVec n0 = rad_a * ca, n1 = rad_a * sa, n2 = rad_b * cb, n3 = rad_b * sb;
#if defined(CPU_CAPABILITY_AVX2)
  // the 4 x 8 transpose in registers: pairs, then quads within each 128-bit half, then halves
  const __m256 t0 = _mm256_unpacklo_ps(n0, n1), t1 = _mm256_unpackhi_ps(n0, n1);
  const __m256 t2 = _mm256_unpacklo_ps(n2, n3), t3 = _mm256_unpackhi_ps(n2, n3);
  const __m256 g0 = _mm256_shuffle_ps(t0, t2, 0x44), g1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 g2 = _mm256_shuffle_ps(t1, t3, 0x44), g3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  _mm256_store_ps(out, _mm256_permute2f128_ps(g0, g1, 0x20));       // groups 0, 1
  _mm256_store_ps(out + 8, _mm256_permute2f128_ps(g2, g3, 0x20));   // 2, 3
  _mm256_store_ps(out + 16, _mm256_permute2f128_ps(g0, g1, 0x31));  // 4, 5
  _mm256_store_ps(out + 24, _mm256_permute2f128_ps(g2, g3, 0x31));  // 6, 7
#else
  alignas(64) float n[4][W];
  n0.store(n[0]);
  n1.store(n[1]);
  n2.store(n[2]);
  n3.store(n[3]);
  for (int64_t i = 0; i < W; ++i) {
    out[4 * i] = n[0][i]; out[4 * i + 1] = n[1][i]; out[4 * i + 2] = n[2][i]; out[4 * i + 3] = n[3][i];
  }
#endif
}

}  // namespace CPU_CAPABILITY
}  // namespace fastdiff
