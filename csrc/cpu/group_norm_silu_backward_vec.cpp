// group_norm_silu backward's vectorized inner loops. Compiled once per CPU capability (setup.py:
// DEFAULT, AVX2, AVX512, each with CPU_CAPABILITY set), as group_norm_silu_vec.cpp.
//
// Work comes in steps of two float vectors (2W elements: one 16-bit vector converts to two);
// a tail goes through a padded buffer with the same vector code, so every element takes the same
// math. Sums accumulate in fp32 lanes and are reduced in a fixed order: a result depends on its
// data alone, never on the thread that computes it.
#include <algorithm>
#include <cmath>

#include "cpu/group_norm_silu_backward_vec.h"
#include "cpu/vec_io.h"

namespace fastdiff {
namespace CPU_CAPABILITY {
namespace {

// silu'(z) = s (1 + z (1 - s)), s = sigmoid(z) = 1 / (1 + 2^t), t = -z log2(e) clamped to
// [-126, 126] (beyond it s is 0 or 1 to float precision and 1 + 2^t stays finite). AVX2/AVX512:
// 2^t = 2^n 2^f, n = round(t), |f| <= 1/2, 2^f by its degree-6 Taylor polynomial (1.5e-7
// relative), and the hardware reciprocal estimate plus one Newton step (~23 bits) instead of a
// division: about half the instructions of ATen's exp_u20 and a division. Other CPUs: exp_u20
// (about 2e-6 relative; it saturates, so s goes to 0 / 1 without a NaN) and a division.
inline fVec sigmoid(const fVec& z) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
  using V = __m512;
#define FD_OP(name) _mm512_##name
#else
  using V = __m256;
#define FD_OP(name) _mm256_##name
#endif
  const V one = FD_OP(set1_ps)(1.f);
  V t = FD_OP(mul_ps)(z, FD_OP(set1_ps)(-1.4426950408889634f));
  t = FD_OP(min_ps)(FD_OP(max_ps)(t, FD_OP(set1_ps)(-126.f)), FD_OP(set1_ps)(126.f));
#if defined(CPU_CAPABILITY_AVX512)
  const V n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const V n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
  const V f = FD_OP(sub_ps)(t, n);
  // ln(2)^k / k!, k = 6 .. 0
  V p = FD_OP(fmadd_ps)(f, FD_OP(set1_ps)(1.5403530393381606e-4f),
                        FD_OP(set1_ps)(1.3333558146428443e-3f));
  p = FD_OP(fmadd_ps)(f, p, FD_OP(set1_ps)(9.6181291076284772e-3f));
  p = FD_OP(fmadd_ps)(f, p, FD_OP(set1_ps)(5.5504108664821580e-2f));
  p = FD_OP(fmadd_ps)(f, p, FD_OP(set1_ps)(2.4022650695910071e-1f));
  p = FD_OP(fmadd_ps)(f, p, FD_OP(set1_ps)(6.9314718055994531e-1f));
  p = FD_OP(fmadd_ps)(f, p, one);
#if defined(CPU_CAPABILITY_AVX512)
  const V d = _mm512_add_ps(_mm512_scalef_ps(p, n), one);  // 1 + p 2^n
  V r = _mm512_rcp14_ps(d);
#else
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                       _mm256_set1_epi32(127)), 23);
  const V d = _mm256_fmadd_ps(p, _mm256_castsi256_ps(e), one);  // 1 + p 2^n
  V r = _mm256_rcp_ps(d);
#endif
  r = FD_OP(mul_ps)(r, FD_OP(fnmadd_ps)(d, r, FD_OP(set1_ps)(2.f)));
#undef FD_OP
  return fVec(r);
#else
  const fVec one(1.f);
  return one / (one + (fVec(0.f) - z).exp_u20());
#endif
}

inline fVec silu_grad(const fVec& z) {
  const fVec one(1.f);
  const fVec s = sigmoid(z);
  return s * at::vec::fmadd(z, one - s, one);
}

// a fixed order (a shuffle tree), whatever the compiler
inline float lanes_sum(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](const fVec& a, const fVec& b) { return a + b; }, v);
}

// The first n < 2W elements of p as two float vectors, the rest of the lanes from `pad`
// (a value of T, so that the padded lanes are exact: d = pad - ref = 0 for pad = ref).
template <typename T>
inline void load_tail(const T* p, int64_t n, T pad, fVec& a, fVec& b) {
  alignas(64) T buf[2 * W];
  std::fill(buf, buf + 2 * W, pad);
  std::copy(p, p + n, buf);
  Io<T>::load(buf, a, b);
}

// the lanes >= n of (a, b) zeroed (n < 2W)
inline void keep_first(int64_t n, fVec& a, fVec& b) {
  if (n <= W) {
    a = fVec::set(fVec(0.f), a, n);
    b = fVec(0.f);
  } else {
    b = fVec::set(fVec(0.f), b, n - W);
  }
}

// -- NCHW-like rows ---------------------------------------------------------------------------
template <typename T>
void row_sums(const void* xv, int64_t n, float ref, float* s1, float* s2) {
  const T* x = static_cast<const T*>(xv);
  const fVec r(ref);
  fVec t1a(0.f), t1b(0.f), t2a(0.f), t2b(0.f);
  auto body = [&](fVec a, fVec b) {
    a = a - r;
    b = b - r;
    t1a = t1a + a;
    t1b = t1b + b;
    t2a = at::vec::fmadd(a, a, t2a);
    t2b = at::vec::fmadd(b, b, t2b);
  };
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    fVec a, b;
    Io<T>::load(x + i, a, b);
    body(a, b);
  }
  if (i < n) {  // padded with ref (exact in T: it is an element of the group): d = 0 there
    fVec a, b;
    load_tail(x + i, n - i, static_cast<T>(ref), a, b);
    body(a, b);
  }
  *s1 = lanes_sum(t1a + t1b);
  *s2 = lanes_sum(t2a + t2b);
}

template <typename T, bool kSilu>
void row_dz_impl(const T* x, const T* g, float* dz, int64_t n, GnBwdCoef c, float* sa,
                 float* sbx) {
  const fVec ref(c.ref), r(c.r), q(c.q), ws(c.ws), kb(c.kb);
  fVec aa(0.f), ab(0.f), ba(0.f), bb(0.f);
  // returns dz for (x, g); the sums are added by the caller (masked for a tail)
  auto grad = [&](const fVec& xv, const fVec& gv, fVec& xhat) {
    xhat = at::vec::fmadd(xv - ref, r, q);
    if (!kSilu) return gv;
    return gv * silu_grad(at::vec::fmadd(xhat, ws, kb));
  };
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    fVec x0, x1, g0, g1, h0, h1;
    Io<T>::load(x + i, x0, x1);
    Io<T>::load(g + i, g0, g1);
    const fVec d0 = grad(x0, g0, h0), d1 = grad(x1, g1, h1);
    if (dz) {
      d0.store(dz + i);
      d1.store(dz + i + W);
    }
    aa = aa + d0;
    ab = ab + d1;
    ba = at::vec::fmadd(d0, h0, ba);
    bb = at::vec::fmadd(d1, h1, bb);
  }
  if (i < n) {  // g padded with 0: dz = 0 in the padded lanes, which adds nothing
    fVec x0, x1, g0, g1, h0, h1;
    load_tail(x + i, n - i, static_cast<T>(c.ref), x0, x1);
    load_tail(g + i, n - i, static_cast<T>(0.f), g0, g1);
    fVec d0 = grad(x0, g0, h0), d1 = grad(x1, g1, h1);
    keep_first(n - i, d0, d1);  // (0 * inf from an extreme z stays out of the sums)
    if (dz) {
      alignas(64) float buf[2 * W];
      d0.store(buf);
      d1.store(buf + W);
      std::copy(buf, buf + (n - i), dz + i);
    }
    aa = aa + d0;
    ab = ab + d1;
    ba = at::vec::fmadd(d0, h0, ba);
    bb = at::vec::fmadd(d1, h1, bb);
  }
  *sa = lanes_sum(aa + ab);
  *sbx = lanes_sum(ba + bb);
}

template <typename T>
void row_dz(const void* x, const void* g, float* dz, int64_t n, GnBwdCoef c, bool silu, float* a,
            float* bx) {
  if (silu) {
    row_dz_impl<T, true>(static_cast<const T*>(x), static_cast<const T*>(g), dz, n, c, a, bx);
  } else {
    row_dz_impl<T, false>(static_cast<const T*>(x), static_cast<const T*>(g), dz, n, c, a, bx);
  }
}

template <typename T>
void row_dx(const void* xv, const float* dz, void* dxv, int64_t n, GnBwdCoef c, float c1,
            float c2, float c3, float* sdx) {
  const T* x = static_cast<const T*>(xv);
  T* dx = static_cast<T*>(dxv);
  const fVec ref(c.ref), r(c.r), q(c.q), v1(c1), v2(c2), v3(c3);
  fVec sa(0.f), sb(0.f);
  auto grad = [&](const fVec& xv, const fVec& d) {
    const fVec xhat = at::vec::fmadd(xv - ref, r, q);
    return at::vec::fmadd(xhat, v3, at::vec::fmadd(d, v1, v2));
  };
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    fVec x0, x1;
    Io<T>::load(x + i, x0, x1);
    const fVec d0 = grad(x0, fVec::loadu(dz + i)), d1 = grad(x1, fVec::loadu(dz + i + W));
    if (dx) Io<T>::store(dx + i, d0, d1);
    sa = sa + d0;
    sb = sb + d1;
  }
  if (i < n) {
    fVec x0, x1;
    alignas(64) float buf[2 * W] = {};
    std::copy(dz + i, dz + n, buf);
    load_tail(x + i, n - i, static_cast<T>(c.ref), x0, x1);
    fVec d0 = grad(x0, fVec::loadu(buf)), d1 = grad(x1, fVec::loadu(buf + W));
    if (dx) Io<T>::store(dx + i, d0, d1, n - i);
    keep_first(n - i, d0, d1);
    sa = sa + d0;
    sb = sb + d1;
  }
  if (sdx) *sdx = lanes_sum(sa + sb);
}

// -- channels_last: pixels in memory order, 2W channels at a time -----------------------------
// The per-channel accumulators live in the caller's arrays (L1): each pixel loads and stores
// them, as a pixel row holds every channel once. The channel tail (C % 2W) of each pixel goes
// through a padded buffer (its lanes past C are garbage, in padded arrays, and ignored).
template <typename T>
inline void cl_load(const T* p, int64_t c, int64_t C, fVec& a, fVec& b) {
  if (c + 2 * W <= C) {
    Io<T>::load(p + c, a, b);
  } else {
    load_tail(p + c, C - c, static_cast<T>(0.f), a, b);
  }
}

template <typename T>
void cl_sums(const void* xv, int64_t ldc, int64_t C, int64_t npix, const float* ref, float* s1,
             float* s2) {
  const T* x = static_cast<const T*>(xv);
  for (int64_t p = 0; p < npix; ++p) {
    const T* px = x + p * ldc;
    for (int64_t c = 0; c < C; c += 2 * W) {
      fVec a, b;
      cl_load(px, c, C, a, b);
      a = a - fVec::loadu(ref + c);
      b = b - fVec::loadu(ref + c + W);
      (fVec::loadu(s1 + c) + a).store(s1 + c);
      (fVec::loadu(s1 + c + W) + b).store(s1 + c + W);
      at::vec::fmadd(a, a, fVec::loadu(s2 + c)).store(s2 + c);
      at::vec::fmadd(b, b, fVec::loadu(s2 + c + W)).store(s2 + c + W);
    }
  }
}

template <typename T, bool kSilu>
void cl_dz_impl(const T* x, const T* g, float* dz, int64_t ldc, int64_t C, int64_t npix,
                const float* ref, const float* r, const float* q, const float* ws,
                const float* kb, float* a, float* bx) {
  const int64_t Cp = (C + 2 * W - 1) / (2 * W) * (2 * W);
  for (int64_t p = 0; p < npix; ++p) {
    const T* px = x + p * ldc;
    const T* pg = g + p * ldc;
    for (int64_t c = 0; c < C; c += 2 * W) {
      fVec x0, x1, g0, g1;
      cl_load(px, c, C, x0, x1);
      cl_load(pg, c, C, g0, g1);
      const fVec h0 = at::vec::fmadd(x0 - fVec::loadu(ref + c), fVec::loadu(r + c),
                                     fVec::loadu(q + c));
      const fVec h1 = at::vec::fmadd(x1 - fVec::loadu(ref + c + W), fVec::loadu(r + c + W),
                                     fVec::loadu(q + c + W));
      fVec d0 = g0, d1 = g1;
      if (kSilu) {
        d0 = g0 * silu_grad(at::vec::fmadd(h0, fVec::loadu(ws + c), fVec::loadu(kb + c)));
        d1 = g1 * silu_grad(at::vec::fmadd(h1, fVec::loadu(ws + c + W), fVec::loadu(kb + c + W)));
      }
      if (dz) {
        d0.store(dz + p * Cp + c);
        d1.store(dz + p * Cp + c + W);
      }
      (fVec::loadu(a + c) + d0).store(a + c);
      (fVec::loadu(a + c + W) + d1).store(a + c + W);
      at::vec::fmadd(d0, h0, fVec::loadu(bx + c)).store(bx + c);
      at::vec::fmadd(d1, h1, fVec::loadu(bx + c + W)).store(bx + c + W);
    }
  }
}

template <typename T>
void cl_dz(const void* x, const void* g, float* dz, int64_t ldc, int64_t C, int64_t npix,
           const float* ref, const float* r, const float* q, const float* ws, const float* kb,
           bool silu, float* a, float* bx) {
  const T* xt = static_cast<const T*>(x);
  const T* gt = static_cast<const T*>(g);
  if (silu) {
    cl_dz_impl<T, true>(xt, gt, dz, ldc, C, npix, ref, r, q, ws, kb, a, bx);
  } else {
    cl_dz_impl<T, false>(xt, gt, dz, ldc, C, npix, ref, r, q, ws, kb, a, bx);
  }
}

template <typename T>
void cl_dx(const void* xv, const float* dz, void* dxv, int64_t ldc, int64_t C, int64_t npix,
           const float* ref, const float* r, const float* q, const float* c1, const float* c2,
           const float* c3, float* sdx) {
  const T* x = static_cast<const T*>(xv);
  T* dx = static_cast<T*>(dxv);
  const int64_t Cp = (C + 2 * W - 1) / (2 * W) * (2 * W);
  auto grad = [&](const fVec& xv, int64_t c, const float* pdz) {
    const fVec xhat = at::vec::fmadd(xv - fVec::loadu(ref + c), fVec::loadu(r + c),
                                     fVec::loadu(q + c));
    return at::vec::fmadd(xhat, fVec::loadu(c3 + c),
                          at::vec::fmadd(fVec::loadu(pdz + c), fVec::loadu(c1 + c),
                                         fVec::loadu(c2 + c)));
  };
  for (int64_t p = 0; p < npix; ++p) {
    const T* px = x + p * ldc;
    const float* pdz = dz + p * Cp;
    for (int64_t c = 0; c < C; c += 2 * W) {
      fVec x0, x1;
      cl_load(px, c, C, x0, x1);
      const fVec d0 = grad(x0, c, pdz), d1 = grad(x1, c + W, pdz);
      if (dx) {
        if (c + 2 * W <= C) {
          Io<T>::store(dx + p * ldc + c, d0, d1);
        } else {
          Io<T>::store(dx + p * ldc + c, d0, d1, C - c);
        }
      }
      if (sdx) {
        (fVec::loadu(sdx + c) + d0).store(sdx + c);
        (fVec::loadu(sdx + c + W) + d1).store(sdx + c + W);
      }
    }
  }
}

// -- one channels_last unit ----------------------------------------------------------------
// The per-channel steps are plain loops over the channel arrays (vectorized by the compiler for
// this capability): with few pixels per channel (a 2x2 U-Net level) they cost as much as the
// pixels. Statistics: per channel over blocks of kUnitPix pixels (Chan's formula), then per
// group from its channels, which all have the same count.
constexpr int64_t kUnitPix = 256;

inline int64_t pad2w(int64_t C) { return (C + 2 * W - 1) / (2 * W) * (2 * W); }

constexpr int64_t kUnitArrays = 19;

// a unit's per-channel outputs from its sums (sa = sum dz, sbx = sum dz xhat, sdx = sum dx) and
// its w and bias (1 and 0 where absent)
inline void store_unit(const GnBwdUnit& u, int64_t C, const float* sa, const float* sbx,
                       const float* sdx, const float* w, const float* b) {
  for (int64_t c = 0; c < C; ++c) u.A[c] = sa[c];
  for (int64_t c = 0; c < C; ++c) u.Bx[c] = sbx[c];
  if (u.dshift)
    for (int64_t c = 0; c < C; ++c) u.dshift[c] = sa[c];
  if (u.dscale)
    for (int64_t c = 0; c < C; ++c) u.dscale[c] = w[c] * sbx[c] + b[c] * sa[c];
  if (u.dadd)
    for (int64_t c = 0; c < C; ++c) u.dadd[c] = sdx[c];
}

template <typename T>
void cl_unit(const GnBwdUnit& u) {
  const int64_t C = u.C, S = u.S, Cg = u.Cg, Cp = pad2w(C), ldc = u.ldc, G = C / Cg;
  const T* x = static_cast<const T*>(u.x);
  const T* g = static_cast<const T*>(u.g);
  float* f = u.work;
  std::fill(f, f + kUnitArrays * Cp, 0.f);  // the padded lanes stay finite
  float *ref = f, *da = ref + Cp, *s1 = da + Cp, *wv = s1 + Cp, *bv = wv + Cp, *ws = bv + Cp,
        *kb = ws + Cp, *r = kb + Cp, *q = r + Cp, *mean = q + Cp, *m2 = mean + Cp, *t1 = m2 + Cp,
        *t2 = t1 + Cp, *sa = t2 + Cp, *sbx = sa + Cp, *sdx = sbx + Cp, *c1 = sdx + Cp,
        *c2 = c1 + Cp, *c3 = c2 + Cp;
  float* dz = f + kUnitArrays * Cp;
  for (int64_t gi = 0; gi < G; ++gi) {
    const int64_t c0 = gi * Cg;
    const float rf = static_cast<float>(x[c0]);
    const float a0 = u.add ? u.add[c0] : 0.f;
    for (int64_t c = c0; c < c0 + Cg; ++c) {
      ref[c] = rf;
      da[c] = u.add ? u.add[c] - a0 : 0.f;
    }
  }
  for (int64_t c = 0; c < C; ++c) s1[c] = u.scale ? 1.f + u.scale[c] : 1.f;
  for (int64_t c = 0; c < C; ++c) wv[c] = u.w ? u.w[c] : 1.f;
  for (int64_t c = 0; c < C; ++c) bv[c] = u.bias ? u.bias[c] : 0.f;
  for (int64_t c = 0; c < C; ++c) ws[c] = wv[c] * s1[c];
  for (int64_t c = 0; c < C; ++c) kb[c] = bv[c] * s1[c] + (u.shift ? u.shift[c] : 0.f);

  const int64_t nb = (S + kUnitPix - 1) / kUnitPix;
  auto npix = [&](int64_t j) { return std::min(kUnitPix, S - j * kUnitPix); };
  float n = 0.f;
  for (int64_t j = 0; j < nb; ++j) {
    std::fill(t1, t1 + 2 * Cp, 0.f);
    cl_sums<T>(x + j * kUnitPix * ldc, ldc, C, npix(j), ref, t1, t2);
    const float nj = static_cast<float>(npix(j)), inv = 1.f / nj, fr = nj / (n + nj),
                naf = n * fr;
    for (int64_t c = 0; c < C; ++c) {
      const float mb = t1[c] * inv;
      const float m2b = std::max(t2[c] - t1[c] * mb, 0.f);
      const float delta = mb - mean[c];
      mean[c] += delta * fr;
      m2[c] += m2b + delta * delta * naf;
    }
    n += nj;
  }
  const float inv_cg = 1.f / static_cast<float>(Cg), inv_n = 1.f / (n * static_cast<float>(Cg));
  for (int64_t gi = 0; gi < G; ++gi) {
    const int64_t c0 = gi * Cg;
    float sm = 0.f;
    for (int64_t c = c0; c < c0 + Cg; ++c) sm += mean[c] + da[c];
    const float gm = sm * inv_cg;
    float M = 0.f;
    for (int64_t c = c0; c < c0 + Cg; ++c) {
      const float dd = mean[c] + da[c] - gm;
      M += m2[c] + n * dd * dd;
    }
    const float rstd = 1.f / std::sqrt(std::max(M * inv_n, 0.f) + u.eps);
    for (int64_t c = c0; c < c0 + Cg; ++c) {
      r[c] = rstd;
      q[c] = (da[c] - gm) * rstd;
    }
  }

  for (int64_t j = 0; j < nb; ++j) {
    float *ta = nb == 1 ? sa : t1, *tb = nb == 1 ? sbx : t2;
    if (nb > 1) std::fill(t1, t1 + 2 * Cp, 0.f);
    cl_dz<T>(x + j * kUnitPix * ldc, g + j * kUnitPix * ldc,
             u.need_dz ? dz + j * kUnitPix * Cp : nullptr, ldc, C, npix(j), ref, r, q, ws, kb,
             u.silu, ta, tb);
    if (nb > 1) {
      for (int64_t c = 0; c < C; ++c) sa[c] += t1[c];
      for (int64_t c = 0; c < C; ++c) sbx[c] += t2[c];
    }
  }
  if (u.need_dz) {
    for (int64_t gi = 0; gi < G; ++gi) {
      const int64_t c0 = gi * Cg;
      float m1 = 0.f, mx = 0.f;
      for (int64_t c = c0; c < c0 + Cg; ++c) {
        m1 += ws[c] * sa[c];
        mx += ws[c] * sbx[c];
      }
      m1 *= inv_n;
      mx *= inv_n;
      for (int64_t c = c0; c < c0 + Cg; ++c) {
        c1[c] = r[c] * ws[c];
        c2[c] = -r[c] * m1;
        c3[c] = -r[c] * mx;
      }
    }
    T* dx = static_cast<T*>(u.dx);
    for (int64_t j = 0; j < nb; ++j) {
      float* td = nb == 1 ? sdx : t1;
      if (nb > 1) std::fill(t1, t1 + Cp, 0.f);
      cl_dx<T>(x + j * kUnitPix * ldc, dz + j * kUnitPix * Cp,
               dx ? dx + j * kUnitPix * ldc : nullptr, ldc, C, npix(j), ref, r, q, c1, c2, c3,
               u.dadd ? td : nullptr);
      if (nb > 1 && u.dadd)
        for (int64_t c = 0; c < C; ++c) sdx[c] += t1[c];
    }
  }
  store_unit(u, C, sa, sbx, sdx, wv, bv);
}

// -- NCHW-like runs of short rows (the unit's arrays are padded to whole 2W steps) ------------
template <typename T, bool kSilu>
void run_dz_impl(const T* x, const T* g, int64_t n, float ref, float r, const float* q,
                 const float* ws, const float* kb, float* dz, float* xh) {
  const fVec vref(ref), vr(r);
  auto body = [&](int64_t i, const fVec& xv, const fVec& gv) {
    const fVec h = at::vec::fmadd(xv - vref, vr, fVec::loadu(q + i));
    fVec d = gv;
    if (kSilu) d = gv * silu_grad(at::vec::fmadd(h, fVec::loadu(ws + i), fVec::loadu(kb + i)));
    d.store(dz + i);
    h.store(xh + i);
  };
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    fVec x0, x1, g0, g1;
    Io<T>::load(x + i, x0, x1);
    Io<T>::load(g + i, g0, g1);
    body(i, x0, g0);
    body(i + W, x1, g1);
  }
  if (i < n) {  // x padded with ref, g with 0: finite zeros past n, never summed
    fVec x0, x1, g0, g1;
    load_tail(x + i, n - i, static_cast<T>(ref), x0, x1);
    load_tail(g + i, n - i, static_cast<T>(0.f), g0, g1);
    body(i, x0, g0);
    body(i + W, x1, g1);
  }
}

// per row c of S: sa[c] = sum of a, sab[c] = sum of a b (b not null); vectors, then the lanes
// and the row's last S % W elements, in that fixed order
void run_sums(const float* a, const float* b, int64_t S, int64_t Cg, float* sa, float* sab) {
  for (int64_t c = 0; c < Cg; ++c) {
    const float* pa = a + c * S;
    const float* pb = b ? b + c * S : nullptr;
    fVec va(0.f), vb(0.f);
    int64_t i = 0;
    for (; i + W <= S; i += W) {
      const fVec u = fVec::loadu(pa + i);
      va = va + u;
      if (pb) vb = at::vec::fmadd(u, fVec::loadu(pb + i), vb);
    }
    float ta = i ? lanes_sum(va) : 0.f, tb = i && pb ? lanes_sum(vb) : 0.f;
    for (; i < S; ++i) {
      ta += pa[i];
      if (pb) tb += pa[i] * pb[i];
    }
    sa[c] = ta;
    if (pb) sab[c] = tb;
  }
}

template <typename T>
void run_dx(const float* dz, float* xh, T* dx, int64_t n, float r, const float* ws, float c2,
            float c3) {
  const fVec vr(r), v2(c2), v3(c3);
  auto grad = [&](int64_t i) {
    const fVec c1 = vr * fVec::loadu(ws + i);
    const fVec d =
        at::vec::fmadd(fVec::loadu(xh + i), v3, at::vec::fmadd(fVec::loadu(dz + i), c1, v2));
    d.store(xh + i);
    return d;
  };
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const fVec d0 = grad(i), d1 = grad(i + W);
    if (dx) Io<T>::store(dx + i, d0, d1);
  }
  if (i < n) {
    const fVec d0 = grad(i), d1 = grad(i + W);
    if (dx) Io<T>::store(dx + i, d0, d1, n - i);
  }
}

template <typename T>
void run_unit(const GnBwdUnit& u) {
  const int64_t S = u.S, Cg = u.C, n = Cg * S, np = pad2w(n);
  const T* x = static_cast<const T*>(u.x);
  const T* g = static_cast<const T*>(u.g);
  float *eda = u.work, *q = eda + np, *ws = q + np, *kb = ws + np, *dz = kb + np, *xh = dz + np,
        *da = xh + np, *wc = da + Cg, *bc = wc + Cg, *wsc = bc + Cg, *kbc = wsc + Cg,
        *sa = kbc + Cg, *sbx = sa + Cg, *sdx = sbx + Cg;
  const float ref = static_cast<float>(x[0]);
  for (int64_t c = 0; c < Cg; ++c) {
    const float s1 = u.scale ? 1.f + u.scale[c] : 1.f;
    da[c] = u.add ? u.add[c] - u.add[0] : 0.f;
    wc[c] = u.w ? u.w[c] : 1.f;
    bc[c] = u.bias ? u.bias[c] : 0.f;
    wsc[c] = wc[c] * s1;
    kbc[c] = bc[c] * s1 + (u.shift ? u.shift[c] : 0.f);
  }
  auto spread = [&](float* e, auto&& v) {  // row c of e = v(c)
    for (int64_t c = 0; c < Cg; ++c) {
      const float vc = v(c);
      float* row = e + c * S;
      int64_t i = 0;
      for (; i + W <= S; i += W) fVec(vc).store(row + i);
      for (; i < S; ++i) row[i] = vc;
    }
  };
  if (u.add) spread(eda, [&](int64_t c) { return da[c]; });
  const GnStats st = u.stats(u.x, n, ref, u.add ? eda : nullptr);
  const float rstd = gn_rstd(st, u.eps);
  spread(q, [&](int64_t c) { return (da[c] - st.mean) * rstd; });
  spread(ws, [&](int64_t c) { return wsc[c]; });
  spread(kb, [&](int64_t c) { return kbc[c]; });
  if (u.silu) {
    run_dz_impl<T, true>(x, g, n, ref, rstd, q, ws, kb, dz, xh);
  } else {
    run_dz_impl<T, false>(x, g, n, ref, rstd, q, ws, kb, dz, xh);
  }
  run_sums(dz, xh, S, Cg, sa, sbx);
  if (u.need_dz) {
    float m1 = 0.f, m2 = 0.f;
    for (int64_t c = 0; c < Cg; ++c) {
      m1 += wsc[c] * sa[c];
      m2 += wsc[c] * sbx[c];
    }
    const float inv_n = 1.f / st.n;
    run_dx<T>(dz, xh, static_cast<T*>(u.dx), n, rstd, ws, -rstd * (m1 * inv_n),
              -rstd * (m2 * inv_n));
    if (u.dadd) run_sums(xh, nullptr, S, Cg, sdx, nullptr);
  }
  store_unit(u, Cg, sa, sbx, sdx, wc, bc);
}

template <typename T>
void to_cl(const void* xv, int64_t rs, int64_t C, int64_t S, void* outv) {
  const T* x = static_cast<const T*>(xv);
  T* out = static_cast<T*>(outv);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t s = 0; s < S; ++s) out[s * C + c] = x[c * rs + s];
}

template <typename T>
void from_cl(const void* inv, int64_t C, int64_t S, void* xv, int64_t rs) {
  const T* in = static_cast<const T*>(inv);
  T* x = static_cast<T*>(xv);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t s = 0; s < S; ++s) x[c * rs + s] = in[s * C + c];
}

template <typename T>
GnBwdVecKernels make_kernels() {
  return {&row_sums<T>, &row_dz<T>, &row_dx<T>, &cl_sums<T>, &cl_dz<T>, &cl_dx<T>,
          &cl_unit<T>, &run_unit<T>, &to_cl<T>, &from_cl<T>};
}

}  // namespace

const GnBwdVecKernels& gn_bwd_vec_kernels(GnDtype dtype) {
  static const GnBwdVecKernels k[3] = {make_kernels<float>(), make_kernels<c10::Half>(),
                                       make_kernels<c10::BFloat16>()};
  return k[static_cast<int>(dtype)];
}

int64_t gn_bwd_vec_width() { return 2 * W; }

int64_t gn_bwd_unit_work(int64_t C, int64_t S) { return (kUnitArrays + S) * pad2w(C); }

int64_t gn_bwd_run_work(int64_t Cg, int64_t S) { return 6 * pad2w(Cg * S) + 8 * Cg; }

}  // namespace CPU_CAPABILITY
}  // namespace fastdiff
