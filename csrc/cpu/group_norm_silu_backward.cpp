// The backward of group_norm_silu on the CPU: y = act(z), z = GN(x + add) (1 + scale) + shift,
// GN(h) = xhat w + bias, xhat = (h - mean) rstd per group. From grad_out g:
//
//   dz = g silu'(z) (g without SiLU)        A[b,c] = sum dz     Bx[b,c] = sum dz xhat
//   dshift = A    dscale = w Bx + bias A    dweight = sum_b (1 + scale) Bx   dbias = sum_b (1 + scale) A
//   dx = rstd (ws dz - m1 - xhat m2),  ws = w (1 + scale),  m1 = mean_group(ws dz),
//        m2 = mean_group(ws dz xhat);   dadd = sum dx over the channel's pixels
//
// The statistics are recomputed (the forward op saves none): fp32, shifted by the group's first
// element as the forward's (group_norm_silu.h), from fixed blocks folded with Chan's formula.
//
// Work units, fixed by the shape alone: (image, group) for NCHW-like layouts: SIMD along rows of
// 4 vector units or more (or groups over kRowBlock elements), else along the group's rows as one
// contiguous run (rows of kRunRowMin or more); otherwise (image, block of whole groups), walked
// in SIMD across the block's channels (channels_last as it is; the shortest NCHW rows on a
// transposed copy of the block). A unit computes its statistics, dz (kept in an fp32 scratch of
// the unit), its per-channel sums, then dx, while its data is in cache; it writes only its own
// channels. dweight/dbias are summed over the images afterwards in image order. No atomics and
// no per-thread partials: the output bits do not depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/group_norm_silu_backward_vec.h"
#include "group_norm_silu.h"

namespace fastdiff {
namespace {

constexpr int64_t kRowBlock = 4096;  // NCHW: elements of one row per statistics block
constexpr int64_t kClAlign = 32;      // channels_last unit: lcm(Cg, 32) channels when C allows
constexpr int64_t kRunRowMin = 8;     // NCHW runs: rows of 8 to 127 elements (fewer per-row
constexpr int64_t kRunRowMax = 128;   // steps than SIMD along them, whatever the vector width)

struct BwdProblem {
  const char *x, *g;
  char* dx;
  int64_t esize;
  GnDtype dtype;
  int64_t B, C, S, G, Cg;
  const float *w, *bias, *add, *scale, *shift;
  float eps;
  bool silu;
  bool need_dz;             // dx or dadd requested: the second pass runs
  float *dadd, *dscale, *dshift;
  float *A, *Bx;            // (B, C) per-channel sums, for dweight/dbias
};

// Per channel of a group: the element coefficients (group_norm_silu_backward_vec.h) from the
// group's statistics; da = add_c - add_first (the shift of add).
struct Chan {
  float ref, da, s1, w, b, ws, kb;
};

Chan chan_params(const BwdProblem& P, int64_t b, int64_t ch, float ref) {
  const int64_t g0 = ch / P.Cg * P.Cg;
  Chan c;
  c.ref = ref;
  c.da = P.add ? P.add[b * P.C + ch] - P.add[b * P.C + g0] : 0.f;
  c.s1 = P.scale ? 1.f + P.scale[b * P.C + ch] : 1.f;
  c.w = P.w ? P.w[ch] : 1.f;
  c.b = P.bias ? P.bias[ch] : 0.f;
  c.ws = c.w * c.s1;
  c.kb = c.b * c.s1 + (P.shift ? P.shift[b * P.C + ch] : 0.f);
  return c;
}

// the (b, ch) outputs from the channel's sums
void store_channel(const BwdProblem& P, int64_t b, int64_t ch, const Chan& c, float a, float bx,
                   float sdx) {
  const int64_t i = b * P.C + ch;
  P.A[i] = a;
  P.Bx[i] = bx;
  if (P.dshift) P.dshift[i] = a;
  if (P.dscale) P.dscale[i] = c.w * bx + c.b * a;
  if (P.dadd) P.dadd[i] = sdx;
}

// -- NCHW-like: a unit is one group, Cg rows of S contiguous elements -------------------------
void bwd_nchw(const BwdProblem& P, const GnBwdVecKernels& K) {
  const int64_t C = P.C, S = P.S, G = P.G, Cg = P.Cg, es = P.esize;
  const int64_t nb = (S + kRowBlock - 1) / kRowBlock;
  auto len = [&](int64_t j) { return std::min(kRowBlock, S - j * kRowBlock); };
  at::parallel_for(0, P.B * G, 1, [&](int64_t u0, int64_t u1) {
    std::vector<Chan> ch(Cg);
    std::vector<float> sa(Cg), sbx(Cg), dz(P.need_dz ? Cg * S : 0);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / G, g = u % G, c0 = g * Cg;
      auto row = [&](int64_t c) { return (b * C + c0 + c) * S * es; };
      const float ref = load_float(P.x + row(0), P.dtype);
      GnStats st{0.f, 0.f, 0.f};
      for (int64_t c = 0; c < Cg; ++c) {
        ch[c] = chan_params(P, b, c0 + c, ref);
        GnStats sc{0.f, 0.f, 0.f};
        for (int64_t j = 0; j < nb; ++j) {
          float s1, s2;
          K.row_sums(P.x + row(c) + j * kRowBlock * es, len(j), ref, &s1, &s2);
          sc = gn_combine(sc, gn_from_sums(static_cast<float>(len(j)), s1, s2));
        }
        sc.mean += ch[c].da;
        st = gn_combine(st, sc);
      }
      const float rstd = gn_rstd(st, P.eps);
      float m1 = 0.f, m2 = 0.f;
      for (int64_t c = 0; c < Cg; ++c) {
        const GnBwdCoef co{ref, rstd, (ch[c].da - st.mean) * rstd, ch[c].ws, ch[c].kb};
        float a = 0.f, bx = 0.f;
        for (int64_t j = 0; j < nb; ++j) {
          float aj, bj;
          K.row_dz(P.x + row(c) + j * kRowBlock * es, P.g + row(c) + j * kRowBlock * es,
                   P.need_dz ? dz.data() + c * S + j * kRowBlock : nullptr, len(j), co, P.silu,
                   &aj, &bj);
          a += aj;
          bx += bj;
        }
        sa[c] = a;
        sbx[c] = bx;
        m1 += ch[c].ws * a;
        m2 += ch[c].ws * bx;
      }
      const float inv_n = 1.f / st.n;
      m1 *= inv_n;
      m2 *= inv_n;
      for (int64_t c = 0; c < Cg; ++c) {
        float sdx = 0.f;
        if (P.need_dz) {
          const GnBwdCoef co{ref, rstd, (ch[c].da - st.mean) * rstd, ch[c].ws, ch[c].kb};
          for (int64_t j = 0; j < nb; ++j) {
            float sj = 0.f;
            K.row_dx(P.x + row(c) + j * kRowBlock * es, dz.data() + c * S + j * kRowBlock,
                     P.dx ? P.dx + row(c) + j * kRowBlock * es : nullptr, len(j), co,
                     rstd * ch[c].ws, -rstd * m1, -rstd * m2, P.dadd ? &sj : nullptr);
            sdx += sj;
          }
        }
        store_channel(P, b, c0 + c, ch[c], sa[c], sbx[c], sdx);
      }
    }
  });
}

// A unit's options and its per-channel inputs and outputs, from channel c0 of image b.
void unit_channels(const BwdProblem& P, int64_t b, int64_t c0, GnBwdUnit& U) {
  const int64_t bc = b * P.C + c0;
  U.w = P.w ? P.w + c0 : nullptr;
  U.bias = P.bias ? P.bias + c0 : nullptr;
  U.add = P.add ? P.add + bc : nullptr;
  U.scale = P.scale ? P.scale + bc : nullptr;
  U.shift = P.shift ? P.shift + bc : nullptr;
  U.eps = P.eps;
  U.silu = P.silu;
  U.need_dz = P.need_dz;
  U.A = P.A + bc;
  U.Bx = P.Bx + bc;
  U.dadd = P.dadd ? P.dadd + bc : nullptr;
  U.dscale = P.dscale ? P.dscale + bc : nullptr;
  U.dshift = P.dshift ? P.dshift + bc : nullptr;
}

// -- NCHW-like short rows: a unit is one group, its Cg rows one contiguous run -------------------
// (as the forward's run_groups, whose statistics kernel it shares): the per-channel coefficients
// spread per element, so every pass is whole vectors over the run, whatever S.
void bwd_runs(const BwdProblem& P, const GnBwdVecKernels& K, const GnVecKernels& F) {
  const int64_t C = P.C, S = P.S, G = P.G, Cg = P.Cg, es = P.esize;
  at::parallel_for(0, P.B * G, 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> work(gn_bwd_run_work(Cg, S), 0.f);  // its padding stays zero
    GnBwdUnit U{};
    U.C = U.Cg = Cg;
    U.S = S;
    U.work = work.data();
    U.stats = F.run_stats;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / G, c0 = u % G * Cg, off = (b * C + c0) * S * es;
      U.x = P.x + off;
      U.g = P.g + off;
      U.dx = P.dx ? P.dx + off : nullptr;
      unit_channels(P, b, c0, U);
      K.run_unit(U);
    }
  });
}

// -- channels_last: a unit is one image's block of whole groups, S pixels of cb channels -----
// (the unit's work is GnBwdVecKernels::cl_unit). NCHW-like rows shorter than kRunRowMin (and
// short rows of groups too large for a run) take the same units on a transposed copy of the
// block: SIMD along a row of 4 elements would be mostly padding.
constexpr int64_t kShortRow = 64;

int64_t gcd64(int64_t a, int64_t b) { return b == 0 ? a : gcd64(b, a % b); }

int64_t block_channels(const BwdProblem& P) {
  const int64_t lcm = P.Cg / gcd64(P.Cg, kClAlign) * kClAlign;
  return lcm < P.C ? lcm : P.C;  // the last block may be narrower (still whole groups)
}

void bwd_units(const BwdProblem& P, const GnBwdVecKernels& K, bool transposed) {
  const int64_t C = P.C, S = P.S, es = P.esize;
  const int64_t cb = block_channels(P);
  const int64_t nblk = (C + cb - 1) / cb;
  at::parallel_for(0, P.B * nblk, 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> work(gn_bwd_unit_work(cb, S));
    std::vector<char> tbuf(transposed ? 3 * S * cb * es : 0);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / nblk, c0 = (u % nblk) * cb, cn = std::min(cb, C - c0);
      GnBwdUnit U{};
      // NCHW-like: the block is cn rows of S; channels_last: S pixels of C, from channel c0
      const int64_t off = (transposed ? (b * C + c0) * S : b * S * C + c0) * es;
      if (transposed) {
        K.to_cl(P.x + off, S, cn, S, tbuf.data());
        K.to_cl(P.g + off, S, cn, S, tbuf.data() + S * cn * es);
        U.x = tbuf.data();
        U.g = tbuf.data() + S * cn * es;
        U.dx = P.dx ? tbuf.data() + 2 * S * cn * es : nullptr;
        U.ldc = cn;
      } else {
        U.x = P.x + off;
        U.g = P.g + off;
        U.dx = P.dx ? P.dx + off : nullptr;
        U.ldc = C;
      }
      U.C = cn;
      U.S = S;
      U.Cg = P.Cg;
      unit_channels(P, b, c0, U);
      U.work = work.data();
      K.cl_unit(U);
      if (transposed && P.dx) K.from_cl(U.dx, cn, S, P.dx + off, S);
    }
  });
}

// dense in (B, C, *spatial) order (0) or channels_last (1), as the forward's gn_layout
int layout_of(const at::Tensor& t) {
  return gn_layout(t.sizes().data(), t.strides().data(), static_cast<int>(t.dim()));
}

void check_f32(const c10::optional<at::Tensor>& t, const char* name, at::IntArrayRef shape,
               const at::Tensor& x) {
  if (!t) return;
  FD_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->sizes() == shape,
           "group_norm_silu_backward: ", name, " must be a contiguous float32 tensor of shape ",
           shape, ", got ", t->scalar_type(), " ", t->sizes(), " (strides ", t->strides(), ")");
  FD_CHECK(t->device() == x.device(), "group_norm_silu_backward: ", name, " is on ", t->device(),
           " but x is on ", x.device());
}

void group_norm_silu_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& add,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
    int64_t num_groups, double eps, bool silu, const c10::optional<at::Tensor>& dx,
    const c10::optional<at::Tensor>& dweight, const c10::optional<at::Tensor>& dbias,
    const c10::optional<at::Tensor>& dadd, const c10::optional<at::Tensor>& dscale,
    const c10::optional<at::Tensor>& dshift) {
  FD_CHECK(x.dim() >= 3 && x.dim() <= 8, "group_norm_silu_backward: x must be (B, C, *spatial), "
           "got ", x.sizes());
  const int64_t B = x.size(0), C = x.size(1);
  FD_CHECK(num_groups > 0 && C % num_groups == 0, "group_norm_silu_backward: num_groups=",
           num_groups, " must divide C=", C);
  FD_CHECK(x.device().is_cpu(), "group_norm_silu_backward: x must be a CPU tensor");
  GnDtype dtype;
  switch (x.scalar_type()) {
    case at::kFloat: dtype = GnDtype::kFloat; break;
    case at::kHalf: dtype = GnDtype::kHalf; break;
    case at::kBFloat16: dtype = GnDtype::kBFloat16; break;
    default:
      FD_CHECK(false, "group_norm_silu_backward: x must be float32, float16 or bfloat16, got ",
               x.scalar_type());
  }
  const int layout = layout_of(x);
  FD_CHECK(layout >= 0, "group_norm_silu_backward: x must be dense ((B, C, *spatial) or "
           "channels_last), got strides ", x.strides());
  auto like_x = [&](const at::Tensor& t, const char* name) {
    FD_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type() &&
             t.device() == x.device(), "group_norm_silu_backward: ", name, " must match x in "
             "shape, dtype and device (", x.sizes(), " ", x.scalar_type(), "), got ", t.sizes(),
             " ", t.scalar_type(), " on ", t.device());
    FD_CHECK(t.numel() <= 1 || t.strides() == x.strides() || layout_of(t) == layout,
             "group_norm_silu_backward: ", name, " must have x's memory layout");
  };
  like_x(grad_out, "grad_out");
  if (dx) like_x(*dx, "dx");
  check_f32(weight, "weight", {C}, x);
  check_f32(bias, "bias", {C}, x);
  check_f32(add, "add", {B, C}, x);
  check_f32(scale, "scale", {B, C}, x);
  check_f32(shift, "shift", {B, C}, x);
  check_f32(dweight, "dweight", {C}, x);
  check_f32(dbias, "dbias", {C}, x);
  check_f32(dadd, "dadd", {B, C}, x);
  check_f32(dscale, "dscale", {B, C}, x);
  check_f32(dshift, "dshift", {B, C}, x);

  BwdProblem P;
  P.x = static_cast<const char*>(x.data_ptr());
  P.g = static_cast<const char*>(grad_out.data_ptr());
  P.dx = dx ? static_cast<char*>(dx->data_ptr()) : nullptr;
  P.esize = x.element_size();
  P.dtype = dtype;
  P.B = B;
  P.C = C;
  P.S = B * C == 0 ? 0 : x.numel() / (B * C);
  P.G = num_groups;
  P.Cg = C / num_groups;
  auto ptr = [](const c10::optional<at::Tensor>& t) -> float* {
    return t ? t->data_ptr<float>() : nullptr;
  };
  P.w = ptr(weight);
  P.bias = ptr(bias);
  P.add = ptr(add);
  P.scale = ptr(scale);
  P.shift = ptr(shift);
  P.eps = static_cast<float>(eps);
  P.silu = silu;
  P.need_dz = dx.has_value() || dadd.has_value();
  P.dadd = ptr(dadd);
  P.dscale = ptr(dscale);
  P.dshift = ptr(dshift);
  if (x.numel() == 0) {  // empty groups: every sum is 0
    for (const auto* t : {&dweight, &dbias, &dadd, &dscale, &dshift})
      if (*t) (*t)->zero_();
    return;
  }
  std::vector<float> A(B * C), Bx(B * C);
  P.A = A.data();
  P.Bx = Bx.data();
  const GnBwdVecKernels& K = gn_bwd_vec_kernels(dtype);
  const GnVecKernels& F = gn_vec_kernels(dtype);
  if (layout != 1 && P.S >= kRunRowMin && P.S < kRunRowMax && P.Cg * P.S <= kRowBlock) {
    bwd_runs(P, K, F);
  } else if (layout == 1 || P.S < kShortRow) {
    bwd_units(P, K, layout != 1);
  } else {
    bwd_nchw(P, K);
  }
  if (dweight || dbias) {  // over the images, in order
    float* dw = ptr(dweight);
    float* db = ptr(dbias);
    for (int64_t c = 0; c < C; ++c) {
      float sw = 0.f, sb = 0.f;
      for (int64_t b = 0; b < B; ++b) {
        const float s1 = P.scale ? 1.f + P.scale[b * C + c] : 1.f;
        sw += s1 * Bx[b * C + c];
        sb += s1 * A[b * C + c];
      }
      if (dw) dw[c] = sw;
      if (db) db[c] = sb;
    }
  }
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_FRAGMENT(fastdiff_ext, m) {
  m.def("group_norm_silu_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor? bias, "
        "Tensor? add, Tensor? scale, Tensor? shift, int num_groups, float eps, bool silu, "
        "Tensor(a!)? dx, Tensor(b!)? dweight, Tensor(c!)? dbias, Tensor(d!)? dadd, "
        "Tensor(e!)? dscale, Tensor(f!)? dshift) -> ()");
}

TORCH_LIBRARY_IMPL(fastdiff_ext, CPU, m) {
  m.impl("group_norm_silu_backward", &fastdiff::group_norm_silu_backward_cpu);
}
