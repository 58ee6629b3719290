// group_norm_silu's vectorized inner loops. Compiled once per CPU capability (setup.py: DEFAULT,
// AVX2, AVX512, each with CPU_CAPABILITY set): at::vec::Vectorized<float> is then that width's
// SIMD register, exp() that width's vectorized exp (Sleef). Only at::vec and c10's 16-bit types
// are included, so little else is compiled with the wider instruction sets.
//
// Work comes in units of two float vectors (2W elements: one 16-bit vector converts to two float
// vectors); the statistics accumulate in fp32 lanes and are summed in a fixed order, so a unit's
// result depends on its data alone (never on the thread that computes it).
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <tuple>

#include "cpu/group_norm_silu_vec.h"

namespace fastdiff {
namespace CPU_CAPABILITY {
namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t W = fVec::size();

template <typename T>
struct Io {  // c10::Half, c10::BFloat16: one 16-bit vector <-> two float vectors
  using bVec = at::vec::Vectorized<T>;
  static_assert(bVec::size() == 2 * W, "a 16-bit vector holds two float vectors");
  static void load(const T* p, fVec& a, fVec& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(bVec::loadu(p));
  }
  static void store(T* p, const fVec& a, const fVec& b) {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
  static void store(T* p, const fVec& a, const fVec& b, int64_t n) {
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

// 1 / d for d >= 1: a vector division costs ~5 cycles of throughput per register on current x86
// cores, more than the rest of the kernel; the hardware estimate plus one Newton step is ~23 bits.
// d is capped at 1e30 first (an inf would make the Newton step 0 * inf = NaN; 1e-30 is 0 here)
inline fVec reciprocal(const fVec& d) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 dc = _mm512_min_ps(d, _mm512_set1_ps(1e30f));
  const __m512 r = _mm512_rcp14_ps(dc);
  return fVec(_mm512_mul_ps(r, _mm512_fnmadd_ps(dc, r, _mm512_set1_ps(2.f))));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 dc = _mm256_min_ps(d, _mm256_set1_ps(1e30f));
  const __m256 r = _mm256_rcp_ps(dc);
  return fVec(_mm256_mul_ps(r, _mm256_fnmadd_ps(dc, r, _mm256_set1_ps(2.f))));
#else
  return fVec(1.f) / d;
#endif
}

inline fVec silu(const fVec& y) {
  // y * sigmoid(y). exp_u20: ATen's polynomial exp (about 2e-6 relative), several times cheaper
  // than Sleef's; it clamps its argument to the finite range itself (very negative y: e ~ 3e38,
  // y * (1 / e) ~ 0, as gn_silu's clamp gives), so no clamp of our own is spent here
  const fVec e = (fVec(0.f) - y).exp_u20();
  return y * reciprocal(fVec(1.f) + e);
}

inline float lanes_sum(const fVec& v) {  // a fixed order, whatever the compiler
  alignas(64) float t[W];
  v.store(t);
  float s = 0.f;
  for (int64_t i = 0; i < W; ++i) s += t[i];
  return s;
}

template <typename T>
GnStats row_stats(const void* xv, int64_t n, float ref) {
  const T* x = static_cast<const T*>(xv);
  const fVec r(ref);
  fVec s1a(0.f), s1b(0.f), s1c(0.f), s1d(0.f), s2a(0.f), s2b(0.f), s2c(0.f), s2d(0.f);
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {  // two units per step: four independent chains
    fVec a, b, c, d;
    Io<T>::load(x + i, a, b);
    Io<T>::load(x + i + 2 * W, c, d);
    a = a - r; b = b - r; c = c - r; d = d - r;
    s1a = s1a + a; s1b = s1b + b; s1c = s1c + c; s1d = s1d + d;
    s2a = at::vec::fmadd(a, a, s2a); s2b = at::vec::fmadd(b, b, s2b);
    s2c = at::vec::fmadd(c, c, s2c); s2d = at::vec::fmadd(d, d, s2d);
  }
  for (; i + 2 * W <= n; i += 2 * W) {
    fVec a, b;
    Io<T>::load(x + i, a, b);
    a = a - r; b = b - r;
    s1a = s1a + a; s1b = s1b + b;
    s2a = at::vec::fmadd(a, a, s2a); s2b = at::vec::fmadd(b, b, s2b);
  }
  float t1 = lanes_sum((s1a + s1b) + (s1c + s1d));
  float t2 = lanes_sum((s2a + s2b) + (s2c + s2d));
  for (; i < n; ++i) {
    const float d = static_cast<float>(x[i]) - ref;
    t1 += d;
    t2 += d * d;
  }
  return gn_from_sums(static_cast<float>(n), t1, t2);
}

template <typename T>
void row_apply(const void* xv, void* yv, int64_t n, float ref, float a, float k, bool silu_on) {
  const T* x = static_cast<const T*>(xv);
  T* y = static_cast<T*>(yv);
  const fVec r(ref), va(a), vk(k);
  auto body = [&](fVec& u, fVec& v) {
    u = at::vec::fmadd(u - r, va, vk);
    v = at::vec::fmadd(v - r, va, vk);
    if (silu_on) {
      u = silu(u);
      v = silu(v);
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

// channels_last: pixel by pixel, across all C channels, so memory is read in order (the DRAM
// prefetchers follow it; a channel-block-outer order strided by C and ran at half the speed);
// the per-channel accumulators / coefficients stay in L1
template <typename T>
void cl_sums(const void* xv, int64_t C, int64_t npix, const float* ref, float* s1, float* s2) {
  const T* x = static_cast<const T*>(xv);
  const int64_t Cv = C - C % (2 * W);
  for (int64_t q = 0; q < npix; ++q) {
    const T* px = x + q * C;
    for (int64_t c = 0; c < Cv; c += 2 * W) {
      fVec a, b;
      Io<T>::load(px + c, a, b);
      a = a - fVec::loadu(ref + c);
      b = b - fVec::loadu(ref + c + W);
      (fVec::loadu(s1 + c) + a).store(s1 + c);
      (fVec::loadu(s1 + c + W) + b).store(s1 + c + W);
      at::vec::fmadd(a, a, fVec::loadu(s2 + c)).store(s2 + c);
      at::vec::fmadd(b, b, fVec::loadu(s2 + c + W)).store(s2 + c + W);
    }
    for (int64_t c = Cv; c < C; ++c) {
      const float d = static_cast<float>(px[c]) - ref[c];
      s1[c] += d;
      s2[c] += d * d;
    }
  }
}

template <typename T>
void cl_apply(const void* xv, void* yv, int64_t C, int64_t npix, const float* ref,
              const float* a, const float* k, bool silu_on) {
  const T* x = static_cast<const T*>(xv);
  T* y = static_cast<T*>(yv);
  const int64_t Cv = C - C % (2 * W);
  for (int64_t q = 0; q < npix; ++q) {
    const T* px = x + q * C;
    T* py = y + q * C;
    for (int64_t c = 0; c < Cv; c += 2 * W) {
      fVec u, v;
      Io<T>::load(px + c, u, v);
      u = at::vec::fmadd(u - fVec::loadu(ref + c), fVec::loadu(a + c), fVec::loadu(k + c));
      v = at::vec::fmadd(v - fVec::loadu(ref + c + W), fVec::loadu(a + c + W),
                         fVec::loadu(k + c + W));
      if (silu_on) {
        u = silu(u);
        v = silu(v);
      }
      Io<T>::store(py + c, u, v);
    }
    for (int64_t c = Cv; c < C; ++c)
      py[c] = static_cast<T>(gn_apply(static_cast<float>(px[c]) - ref[c], GnCoef{a[c], k[c]},
                                      silu_on));
  }
}

template <typename T>
GnVecKernels make_kernels() {
  return {&row_stats<T>, &row_apply<T>, &cl_sums<T>, &cl_apply<T>};
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
