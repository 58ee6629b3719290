// group_norm_silu's vectorized inner loops. Compiled once per CPU capability (setup.py: DEFAULT,
// AVX2, AVX512, each with CPU_CAPABILITY set): at::vec::Vectorized<float> is then that width's
// SIMD register (the SiLU takes that width's intrinsics directly). Only at::vec and c10's 16-bit
// types are included, so little else is compiled with the wider instruction sets.
//
// Work comes in units of two float vectors (2W elements: one 16-bit vector converts to two float
// vectors); the statistics accumulate in fp32 lanes and are summed in a fixed order, so a unit's
// result depends on its data alone (never on the thread that computes it).
#include <algorithm>

#include "cpu/group_norm_silu_vec.h"
#include "cpu/vec_io.h"

namespace fastdiff {
namespace CPU_CAPABILITY {
namespace {

// SiLU y * sigmoid(y) = y / (1 + 2^t), t = -y log2(e), clamped to [-126, 126] (beyond it the
// result is y or 0 to float precision, and 1 + 2^t stays finite for the reciprocal's Newton
// step). 2^t = 2^n 2^f, n = round(t), |f| <= 1/2, 2^f a minimax polynomial: degree 6 for float
// outputs (9.6e-8 relative evaluated in float: degree 5's 2.3e-7 drifted a 50-step DDIM loop
// past 1e-5 of diffusers'), degree 3 for 16-bit ones (7.5e-5, under half
// an fp16 ulp). The hardware reciprocal estimate (AVX512: 14 bits, enough for bf16/fp16 output;
// float output and AVX2's 12-bit one: plus one Newton step, ~23 bits) replaces a division,
// which costs ~5 cycles of throughput per register. About half the instructions of ATen's
// exp_u20 + a division.
template <bool kLow>
inline fVec silu(const fVec& y) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
  using V = __m512;
#define FD_OP(name) _mm512_##name
#else
  using V = __m256;
#define FD_OP(name) _mm256_##name
#endif
  const V one = FD_OP(set1_ps)(1.f);
  V t = FD_OP(mul_ps)(y, FD_OP(set1_ps)(-1.4426950408889634f));
  t = FD_OP(min_ps)(FD_OP(max_ps)(t, FD_OP(set1_ps)(-126.f)), FD_OP(set1_ps)(126.f));
#if defined(CPU_CAPABILITY_AVX512)
  const V n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const V n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
  const V f = FD_OP(sub_ps)(t, n);
  V p;
  if (kLow) {
    p = FD_OP(fmadd_ps)(f, FD_OP(set1_ps)(0.05517097935080528f), FD_OP(set1_ps)(0.24260970950126648f));
    p = FD_OP(fmadd_ps)(f, p, FD_OP(set1_ps)(0.6932609677314758f));
    p = FD_OP(fmadd_ps)(f, p, FD_OP(set1_ps)(0.9999281764030457f));
  } else {
    p = FD_OP(fmadd_ps)(f, FD_OP(set1_ps)(0.0001534581242594868f), FD_OP(set1_ps)(0.0013399930903688073f));
    p = FD_OP(fmadd_ps)(f, p, FD_OP(set1_ps)(0.009618489071726799f));
    p = FD_OP(fmadd_ps)(f, p, FD_OP(set1_ps)(0.05550328642129898f));
    p = FD_OP(fmadd_ps)(f, p, FD_OP(set1_ps)(0.24022646248340607f));
    p = FD_OP(fmadd_ps)(f, p, FD_OP(set1_ps)(0.6931471824645996f));
    p = FD_OP(fmadd_ps)(f, p, FD_OP(set1_ps)(1.0f));
  }
#if defined(CPU_CAPABILITY_AVX512)
  const V d = _mm512_add_ps(_mm512_scalef_ps(p, n), one);  // 1 + p 2^n
  V r = _mm512_rcp14_ps(d);
  if (!kLow) r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
#else
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                       _mm256_set1_epi32(127)), 23);
  const V d = _mm256_fmadd_ps(p, _mm256_castsi256_ps(e), one);  // 1 + p 2^n
  V r = _mm256_rcp_ps(d);
  r = _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.f)));
#endif
#undef FD_OP
  return y * fVec(r);
#else
  // other CPUs: ATen's polynomial exp (about 2e-6 relative; it clamps its argument to the finite
  // range itself) and a division
  const fVec e = (fVec(0.f) - y).exp_u20();
  return y / (fVec(1.f) + e);
#endif
}

inline float lanes_sum(const fVec& v) {  // a fixed order, whatever the compiler
  alignas(64) float t[W];
  v.store(t);
  float s = 0.f;
  for (int64_t i = 0; i < W; ++i) s += t[i];
  return s;
}

// Statistics of d = x - ref (+ da[i] with kAdd: a run of short rows, see run_stats) over n
// contiguous elements.
template <typename T, bool kAdd>
GnStats stats_impl(const T* x, int64_t n, float ref, const float* da) {
  const fVec r(ref);
  fVec s1a(0.f), s1b(0.f), s1c(0.f), s1d(0.f), s2a(0.f), s2b(0.f), s2c(0.f), s2d(0.f);
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {  // two units per step: four independent chains
    fVec a, b, c, d;
    Io<T>::load(x + i, a, b);
    Io<T>::load(x + i + 2 * W, c, d);
    a = a - r; b = b - r; c = c - r; d = d - r;
    if (kAdd) {
      a = a + fVec::loadu(da + i); b = b + fVec::loadu(da + i + W);
      c = c + fVec::loadu(da + i + 2 * W); d = d + fVec::loadu(da + i + 3 * W);
    }
    s1a = s1a + a; s1b = s1b + b; s1c = s1c + c; s1d = s1d + d;
    s2a = at::vec::fmadd(a, a, s2a); s2b = at::vec::fmadd(b, b, s2b);
    s2c = at::vec::fmadd(c, c, s2c); s2d = at::vec::fmadd(d, d, s2d);
  }
  for (; i + 2 * W <= n; i += 2 * W) {
    fVec a, b;
    Io<T>::load(x + i, a, b);
    a = a - r; b = b - r;
    if (kAdd) {
      a = a + fVec::loadu(da + i); b = b + fVec::loadu(da + i + W);
    }
    s1a = s1a + a; s1b = s1b + b;
    s2a = at::vec::fmadd(a, a, s2a); s2b = at::vec::fmadd(b, b, s2b);
  }
  float t1 = lanes_sum((s1a + s1b) + (s1c + s1d));
  float t2 = lanes_sum((s2a + s2b) + (s2c + s2d));
  for (; i < n; ++i) {
    const float d = (static_cast<float>(x[i]) - ref) + (kAdd ? da[i] : 0.f);
    t1 += d;
    t2 += d * d;
  }
  return gn_from_sums(static_cast<float>(n), t1, t2);
}

template <typename T>
GnStats row_stats(const void* x, int64_t n, float ref) {
  return stats_impl<T, false>(static_cast<const T*>(x), n, ref, nullptr);
}

template <typename T>
GnStats run_stats(const void* x, int64_t n, float ref, const float* da) {
  const T* xt = static_cast<const T*>(x);
  return da ? stats_impl<T, true>(xt, n, ref, da) : stats_impl<T, false>(xt, n, ref, nullptr);
}

template <typename T, bool kSilu>
void row_apply_impl(const T* x, T* y, int64_t n, float ref, float a, float k) {
  constexpr bool kLow = sizeof(T) == 2;
  const fVec r(ref), va(a), vk(k);
  auto body = [&](fVec& u, fVec& v) {
    u = at::vec::fmadd(u - r, va, vk);
    v = at::vec::fmadd(v - r, va, vk);
    if (kSilu) {
      u = silu<kLow>(u);
      v = silu<kLow>(v);
    }
  };
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    fVec u, v;
    Io<T>::load(x + i, u, v);
    body(u, v);
    Io<T>::store(y + i, u, v);
  }
  if (i < n) {  // the tail through a zero-padded buffer
    alignas(64) T buf[2 * W] = {};
    std::copy(x + i, x + n, buf);
    fVec u, v;
    Io<T>::load(buf, u, v);
    body(u, v);
    Io<T>::store(y + i, u, v, n - i);
  }
}

template <typename T>
void row_apply(const void* xv, void* yv, int64_t n, float ref, float a, float k, bool silu_on) {
  const T* x = static_cast<const T*>(xv);
  T* y = static_cast<T*>(yv);
  if (silu_on) row_apply_impl<T, true>(x, y, n, ref, a, k);
  else row_apply_impl<T, false>(x, y, n, ref, a, k);
}

// A run of short rows: y = act((x - ref) * a[i] + k[i]), the coefficients per element (each
// row's repeated over it, zero-padded to whole units), lane for lane the math of row_apply.
template <typename T, bool kSilu>
void run_apply_impl(const T* x, T* y, int64_t n, float ref, const float* a, const float* k) {
  constexpr bool kLow = sizeof(T) == 2;
  const fVec r(ref);
  auto body = [&](int64_t i, fVec& u, fVec& v) {
    u = at::vec::fmadd(u - r, fVec::loadu(a + i), fVec::loadu(k + i));
    v = at::vec::fmadd(v - r, fVec::loadu(a + i + W), fVec::loadu(k + i + W));
    if (kSilu) {
      u = silu<kLow>(u);
      v = silu<kLow>(v);
    }
  };
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    fVec u, v;
    Io<T>::load(x + i, u, v);
    body(i, u, v);
    Io<T>::store(y + i, u, v);
  }
  if (i < n) {
    alignas(64) T buf[2 * W] = {};
    std::copy(x + i, x + n, buf);
    fVec u, v;
    Io<T>::load(buf, u, v);
    body(i, u, v);
    Io<T>::store(y + i, u, v, n - i);
  }
}

template <typename T>
void run_apply(const void* xv, void* yv, int64_t n, float ref, const float* a, const float* k,
               bool silu_on) {
  const T* x = static_cast<const T*>(xv);
  T* y = static_cast<T*>(yv);
  if (silu_on) run_apply_impl<T, true>(x, y, n, ref, a, k);
  else run_apply_impl<T, false>(x, y, n, ref, a, k);
}

// channels_last: R = 4 rows (pixels) of C channels at a time, one from each quarter of the
// unit's pixels, so the loads are R long sequential streams the hardware prefetchers follow.
// (R adjacent rows, the earlier order, made R streams of one pixel row each, a few lines long:
// 1.4x the NCHW time on Zen 3. Column blocks of a 16-pixel tile, the one before, read 16 rows 4
// lines at a time: every line came from L3 on demand, 2-3x the NCHW time.) The per-channel sums
// live in s1/s2 (L1): R rows are summed in registers first, so each accumulator is loaded and
// stored once per R rows. A channel's sum over a unit is in this fixed order (the npix % R last
// pixels one at a time at the end): a function of the data alone.
constexpr int kSumRows = 4;

template <typename T, int R>
inline void cl_sums_rows(const T* x, int64_t ldc, int64_t C2, const float* ref, float* s1,
                         float* s2) {
  for (int64_t c = 0; c < C2; c += 2 * W) {
    const fVec r0 = fVec::loadu(ref + c), r1 = fVec::loadu(ref + c + W);
    fVec d0[R], d1[R];
    for (int q = 0; q < R; ++q) {
      Io<T>::load(x + q * ldc + c, d0[q], d1[q]);
      d0[q] = d0[q] - r0;
      d1[q] = d1[q] - r1;
    }
    fVec t0 = d0[0], t1 = d1[0], u0 = d0[0] * d0[0], u1 = d1[0] * d1[0];
    for (int q = 1; q < R; ++q) {
      t0 = t0 + d0[q];
      t1 = t1 + d1[q];
      u0 = at::vec::fmadd(d0[q], d0[q], u0);
      u1 = at::vec::fmadd(d1[q], d1[q], u1);
    }
    (fVec::loadu(s1 + c) + t0).store(s1 + c);
    (fVec::loadu(s1 + c + W) + t1).store(s1 + c + W);
    (fVec::loadu(s2 + c) + u0).store(s2 + c);
    (fVec::loadu(s2 + c + W) + u1).store(s2 + c + W);
  }
}

template <typename T>
void cl_sums(const void* xv, int64_t ldc, int64_t C, int64_t npix, const float* ref, float* s1, float* s2) {
  const T* x = static_cast<const T*>(xv);
  const int64_t C2 = C - C % (2 * W);
  const int64_t m = npix / kSumRows;
  for (int64_t q = 0; q < m; ++q)
    cl_sums_rows<T, kSumRows>(x + q * ldc, m * ldc, C2, ref, s1, s2);
  for (int64_t q = kSumRows * m; q < npix; ++q)
    cl_sums_rows<T, 1>(x + q * ldc, ldc, C2, ref, s1, s2);
  for (int64_t c = C2; c < C; ++c) {  // the last C % 2W channels
    float t1 = 0.f, t2 = 0.f;
    for (int64_t p = 0; p < npix; ++p) {
      const float d = static_cast<float>(x[p * ldc + c]) - ref[c];
      t1 += d;
      t2 += d * d;
    }
    s1[c] += t1;
    s2[c] += t2;
  }
}

// One pixel row at a time, in memory order; the coefficients (3 C floats) stay in L1.
template <typename T, bool kSilu>
void cl_apply_impl(const T* x, T* y, int64_t ldc, int64_t C, int64_t npix, const float* ref, const float* a,
                   const float* k) {
  constexpr bool kLow = sizeof(T) == 2;
  const int64_t C2 = C - C % (2 * W);
  for (int64_t q = 0; q < npix; ++q) {
    const T* px = x + q * ldc;
    T* py = y + q * ldc;
    for (int64_t c = 0; c < C2; c += 2 * W) {
      fVec u, w;
      Io<T>::load(px + c, u, w);
      u = at::vec::fmadd(u - fVec::loadu(ref + c), fVec::loadu(a + c), fVec::loadu(k + c));
      w = at::vec::fmadd(w - fVec::loadu(ref + c + W), fVec::loadu(a + c + W),
                         fVec::loadu(k + c + W));
      if (kSilu) {
        u = silu<kLow>(u);
        w = silu<kLow>(w);
      }
      Io<T>::store(py + c, u, w);
    }
    for (int64_t c = C2; c < C; ++c)
      py[c] = static_cast<T>(gn_apply(static_cast<float>(px[c]) - ref[c], GnCoef{a[c], k[c]},
                                      kSilu));
  }
}

template <typename T>
void cl_apply(const void* xv, void* yv, int64_t ldc, int64_t C, int64_t npix, const float* ref,
              const float* a, const float* k, bool silu_on) {
  const T* x = static_cast<const T*>(xv);
  T* y = static_cast<T*>(yv);
  if (silu_on) cl_apply_impl<T, true>(x, y, ldc, C, npix, ref, a, k);
  else cl_apply_impl<T, false>(x, y, ldc, C, npix, ref, a, k);
}

template <typename T>
GnVecKernels make_kernels() {
  return {&row_stats<T>, &row_apply<T>, &run_stats<T>, &run_apply<T>, &cl_sums<T>,
          &cl_apply<T>, 2 * W};
}

}  // namespace

const GnVecKernels& gn_vec_kernels(GnDtype dtype) {
  static const GnVecKernels k[3] = {make_kernels<float>(), make_kernels<c10::Half>(),
                                    make_kernels<c10::BFloat16>()};
  return k[static_cast<int>(dtype)];
}

void gn_cl_fold(int64_t C, float n, float* mean, float* m2, float nb, const float* s1,
                const float* s2) {
  // gn_from_sums then gn_combine (group_norm_silu.h), per channel, W channels at a time; every
  // channel of a block has the same count, so the weights are scalars
  const float nn = n + nb;
  if (nb == 0.f) return;
  const float f = nb / nn, inv_nb = 1.0f / nb, na_f = n * f;
  const fVec vf(f), vinv(inv_nb), vnaf(na_f), zero(0.f);
  int64_t c = 0;
  for (; c + W <= C; c += W) {
    const fVec t1 = fVec::loadu(s1 + c), t2 = fVec::loadu(s2 + c);
    const fVec mb = t1 * vinv;
    const fVec m2b = at::vec::maximum(t2 - t1 * mb, zero);
    const fVec ma = fVec::loadu(mean + c), m2a = fVec::loadu(m2 + c);
    const fVec delta = mb - ma;
    (ma + delta * vf).store(mean + c);
    (m2a + m2b + delta * delta * vnaf).store(m2 + c);
  }
  for (; c < C; ++c) {
    const float mb = s1[c] * inv_nb;
    const float m2b = std::max(s2[c] - s1[c] * mb, 0.f);
    const float delta = mb - mean[c];
    mean[c] = mean[c] + delta * f;
    m2[c] = m2[c] + m2b + delta * delta * na_f;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fastdiff
