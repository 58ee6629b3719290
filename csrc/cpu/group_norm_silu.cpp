// GroupNorm (+ add before, + scale/shift and SiLU after) on the CPU, vectorized (group_norm_silu_vec.cpp holds
// the SIMD loops, one variant per instruction set).
//
// The statistics of a group are a fixed function of its data, whatever the thread count: the
// data is cut into fixed units (NCHW-like: blocks of at most kRowBlock elements of one channel's
// row, or a whole group when its rows are short; channels_last: blocks of kClBlockElems / C pixels of one image), each unit's fp32 sums are
// turned into (count, mean, M2), and the units are folded with Chan's formula in one fixed order
// (per channel over its units, then over the group's channels). Shifted values d = x - x_ref
// (x_ref: the group's first element; add enters as add_c - add_ref) keep inputs with |mean| >>
// std from cancelling.
//
// Threads: with enough groups (NCHW) or images (channels_last) for the threads, one task per
// group / image computes its statistics and then normalizes it while it is in cache. With few
// (batch 1-2 against many threads), each pass is split over the units instead: statistics of every
// unit in parallel, the folds (on the calling thread), then the normalization of every unit in
// parallel. Both orders
// compute the same units and fold them the same way, so the output bits do not depend on which
// one ran, nor on the thread count.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if __has_include(<unistd.h>)
#include <unistd.h>  // sysconf: the L2 size
#endif

#include <algorithm>
#include <vector>

#include "cpu/group_norm_silu_vec.h"
#include "group_norm_silu.h"

namespace fastdiff {
namespace {

constexpr int64_t kRowBlock = 4096;       // NCHW: elements of one row per statistics unit
constexpr int64_t kClBlockElems = 32768;  // channels_last: about this many elements (whole pixels)
constexpr int64_t kTasksPerThread = 4;    // fewer groups / images than this per thread: split

// One task per group / image when there are enough for the threads to share evenly: a multiple
// of the thread count, or many of them. Otherwise the split passes (two more parallel regions:
// on a loaded machine every region waits for its slowest thread).
bool whole_tasks(int64_t n) {
  const int64_t t = at::get_num_threads();
  return n >= kTasksPerThread * t || (n >= t && n % t == 0);
}

struct GnProblem {
  const char* x;
  char* y;
  int64_t esize;
  GnDtype dtype;
  int64_t B, C, S, G, Cg;
  const float *w, *bias, *add, *scale, *shift;
  float eps;
  bool silu;
};

// da[c] = add[b, ch] - add[b, first channel of the group], for the group's Cg channels
void group_da(const GnProblem& P, int64_t b, int64_t g, float* da) {
  const float* a = P.add ? P.add + b * P.C + g * P.Cg : nullptr;
  for (int64_t c = 0; c < P.Cg; ++c) da[c] = a ? a[c] - a[0] : 0.f;
}

// a[c], k[c] of y = act((x - ref) * a + k) for the group's channels, from its statistics
void group_coefs(const GnProblem& P, int64_t b, int64_t g, GnStats st, const float* da, float* a,
                 float* k) {
  const float rstd = gn_rstd(st, P.eps);
  for (int64_t c = 0; c < P.Cg; ++c) {
    const int64_t ch = g * P.Cg + c;
    const GnCoef co = gn_coef(st.mean, rstd, P.w ? P.w[ch] : 1.f, P.bias ? P.bias[ch] : 0.f,
                              da[c], P.scale ? 1.f + P.scale[b * P.C + ch] : 1.f,
                              P.shift ? P.shift[b * P.C + ch] : 0.f);
    a[c] = co.scale;
    k[c] = co.k;
  }
}

// -- NCHW-like with short rows (S < 4 units of 2W elements: the 8x8 to 1x1 levels of a U-Net)
// A group's Cg rows are Cg * S contiguous elements: they are taken as one statistics unit and
// normalized in one vectorized pass, with the per-channel coefficients (and the add shifts)
// spread over each channel's S elements. Row by row, a row under one unit is all padded tail
// (3x the time at 256 channels of 2x2) and one of a few units pays a call per row (1.35x at
// 8x8); from 4 units on, the rows win (the spread coefficients are two more loads per vector).
// One task per group (a group is at most kRowBlock elements here).
void run_groups(const GnProblem& P, const GnVecKernels& K) {
  const int64_t C = P.C, S = P.S, G = P.G, Cg = P.Cg, es = P.esize;
  const int64_t n = Cg * S, padded = (n + K.unit - 1) / K.unit * K.unit;
  at::parallel_for(0, P.B * G, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> buf(3 * Cg + (P.add ? 3 : 2) * padded, 0.f);
    float *da = buf.data(), *a = da + Cg, *k = a + Cg, *ea = k + Cg, *ek = ea + padded;
    float* eda = P.add ? ek + padded : nullptr;
    auto spread = [&](const float* v, float* e) {
      for (int64_t c = 0; c < Cg; ++c) std::fill(e + c * S, e + (c + 1) * S, v[c]);
    };
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / G, g = p % G;
      const char* x = P.x + (b * C + g * Cg) * S * es;
      const float ref = load_float(x, P.dtype);
      group_da(P, b, g, da);
      if (eda) spread(da, eda);
      group_coefs(P, b, g, K.run_stats(x, n, ref, eda), da, a, k);
      spread(a, ea);
      spread(k, ek);
      K.run_apply(x, P.y + (x - P.x), n, ref, ea, ek, P.silu);
    }
  });
}

// -- NCHW-like: a group is Cg rows of S contiguous elements ------------------------------------
void gn_nchw(const GnProblem& P, const GnVecKernels& K) {
  const int64_t B = P.B, C = P.C, S = P.S, G = P.G, Cg = P.Cg, es = P.esize;
  const int64_t nb = (S + kRowBlock - 1) / kRowBlock;  // units per row
  auto row = [&](int64_t b, int64_t ch) { return (b * C + ch) * S * es; };
  auto ref_of = [&](int64_t b, int64_t g) { return load_float(P.x + row(b, g * Cg), P.dtype); };
  auto unit_len = [&](int64_t j) { return std::min(kRowBlock, S - j * kRowBlock); };
  auto unit_stats = [&](int64_t b, int64_t ch, int64_t j, float ref) {
    return K.row_stats(P.x + row(b, ch) + j * kRowBlock * es, unit_len(j), ref);
  };
  // the group's statistics from its units' (in the one fixed order)
  auto fold = [&](const float* da, auto&& unit) {
    GnStats st{0.f, 0.f, 0.f};
    for (int64_t c = 0; c < Cg; ++c) {
      GnStats sc{0.f, 0.f, 0.f};
      for (int64_t j = 0; j < nb; ++j) sc = gn_combine(sc, unit(c, j));
      sc.mean += da[c];
      st = gn_combine(st, sc);
    }
    return st;
  };
  if (S < 4 * K.unit && Cg * S <= kRowBlock) {  // short rows: a group is one run, one unit
    run_groups(P, K);
    return;
  }
  if (whole_tasks(B * G)) {  // one task per group
    at::parallel_for(0, B * G, 1, [&](int64_t p0, int64_t p1) {
      std::vector<float> da(Cg), a(Cg), k(Cg);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t b = p / G, g = p % G;
        const float ref = ref_of(b, g);
        group_da(P, b, g, da.data());
        const GnStats st = fold(da.data(), [&](int64_t c, int64_t j) {
          return unit_stats(b, g * Cg + c, j, ref);
        });
        group_coefs(P, b, g, st, da.data(), a.data(), k.data());
        for (int64_t c = 0; c < Cg; ++c) {
          const int64_t off = row(b, g * Cg + c);
          K.row_apply(P.x + off, P.y + off, S, ref, a[c], k[c], P.silu);
        }
      }
    });
    return;
  }
  // few groups: every pass split over the units
  const int64_t units = B * C * nb;
  std::vector<GnStats> part(units);
  std::vector<float> refs(B * G), a(B * C), k(B * C);
  for (int64_t p = 0; p < B * G; ++p) refs[p] = ref_of(p / G, p % G);
  at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t bc = u / nb, b = bc / C, ch = bc % C;
      part[u] = unit_stats(b, ch, u % nb, refs[b * G + ch / Cg]);
    }
  });
  {  // the folds: a few scalar operations per unit, on this thread (no third parallel region)
    std::vector<float> da(Cg);
    for (int64_t p = 0; p < B * G; ++p) {
      const int64_t b = p / G, g = p % G;
      group_da(P, b, g, da.data());
      const GnStats* gp = part.data() + (b * C + g * Cg) * nb;
      const GnStats st = fold(da.data(), [&](int64_t c, int64_t j) { return gp[c * nb + j]; });
      group_coefs(P, b, g, st, da.data(), a.data() + b * C + g * Cg, k.data() + b * C + g * Cg);
    }
  }
  at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t bc = u / nb, j = u % nb;
      const int64_t off = row(bc / C, bc % C) + j * kRowBlock * es;
      K.row_apply(P.x + off, P.y + off, unit_len(j), refs[(bc / C) * G + (bc % C) / Cg], a[bc],
                  k[bc], P.silu);
    }
  });
}

// -- channels_last: an image is S pixels of C contiguous channels ------------------------------
// One task per image. With an L2 of 1 MiB or more (Zen 4) it walks the image in slabs of whole
// groups (cs channels of every pixel): statistics of the slab, then its normalization, while the
// slab is still in L2. Without slabs an image of 512 KiB (fp32 16x128x32x32) was read twice from
// L3 there, as its y evicted it from L2 during the second pass (2.5-3x the NCHW time at the same
// bytes). With 512 KiB (Zen 3) a slab does not fit beside its y either, and the slab's partial
// pixel rows ran 2x slower than whole ones (fp32 16x128x32x32, benchmarks/results/
// amd-epyc-zen3_2026-12-02_cpu-profile.md): no slabs there. A slab is a multiple of 32 channels,
// so of every capability's 2W, and starts at such a multiple: every channel takes the same
// vector or scalar path as without slabs, and the bits do not change (the split passes, which do
// not slab, give the same output).
constexpr int64_t kClSlabBytes = 256 * 1024;  // x of one slab of an image (its y as much again)
constexpr int64_t kClSlabMinL2 = 1024 * 1024;
constexpr int64_t kClSlabAlign = 32;

int64_t gcd64(int64_t a, int64_t b) { return b == 0 ? a : gcd64(b, a % b); }

int64_t l2_bytes() {  // 0 where the system does not say
#if defined(_SC_LEVEL2_CACHE_SIZE)
  static const int64_t v = std::max<long>(0, sysconf(_SC_LEVEL2_CACHE_SIZE));
  return v;
#else
  return 0;
#endif
}

int64_t cl_slab_channels(const GnProblem& P) {
  const int64_t step = P.Cg / gcd64(P.Cg, kClSlabAlign) * kClSlabAlign;  // lcm(Cg, 32)
  const int64_t per_channel = P.S * P.esize;
  if (l2_bytes() < kClSlabMinL2 || step >= P.C || step * per_channel > kClSlabBytes) return P.C;
  return std::min(P.C, std::max<int64_t>(1, kClSlabBytes / (step * per_channel)) * step);
}

void gn_cl(const GnProblem& P, const GnVecKernels& K) {
  const int64_t B = P.B, C = P.C, S = P.S, G = P.G, Cg = P.Cg, es = P.esize;
  const int64_t kp = std::max<int64_t>(1, kClBlockElems / C);  // pixels per unit
  const int64_t nb = (S + kp - 1) / kp;                         // units per image
  auto unit_ptr = [&](int64_t b, int64_t j) { return (b * S + j * kp) * C * es; };
  auto unit_pix = [&](int64_t j) { return std::min(kp, S - j * kp); };
  // per image: ref[c] = the first element of c's group; da[c]
  auto refs_of = [&](int64_t b, float* ref, float* da) {
    for (int64_t g = 0; g < G; ++g) {
      const float r = load_float(P.x + unit_ptr(b, 0) + g * Cg * es, P.dtype);
      std::fill(ref + g * Cg, ref + (g + 1) * Cg, r);
      group_da(P, b, g, da + g * Cg);
    }
  };
  // channels [c0, c0 + cn) (whole groups): channel statistics (folded over the image's units in
  // order) -> group statistics -> a, k. Arrays are indexed by channel, sums by unit j at
  // j * sums_stride (s1) and + C (s2).
  auto finish = [&](int64_t b, int64_t c0, int64_t cn, const float* da, float* mean, float* m2,
                    const float* sums, int64_t sums_stride, float* a, float* k) {
    std::fill(mean + c0, mean + c0 + cn, 0.f);
    std::fill(m2 + c0, m2 + c0 + cn, 0.f);
    float n = 0.f;
    for (int64_t j = 0; j < nb; ++j) {
      const float* s = sums + j * sums_stride;
      const float nj = static_cast<float>(unit_pix(j));
      gn_cl_fold(cn, n, mean + c0, m2 + c0, nj, s + c0, s + C + c0);
      n += nj;
    }
    for (int64_t g = c0 / Cg; g < (c0 + cn) / Cg; ++g) {
      GnStats st{0.f, 0.f, 0.f};
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c)
        st = gn_combine(st, GnStats{n, mean[c] + da[c], m2[c]});
      group_coefs(P, b, g, st, da + g * Cg, a + g * Cg, k + g * Cg);
    }
  };
  if (whole_tasks(B)) {  // one task per image, in slabs
    const int64_t cs = cl_slab_channels(P);
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> buf(6 * C), sums(2 * C * nb);
      float *ref = buf.data(), *da = ref + C, *mean = da + C, *m2 = mean + C, *a = m2 + C,
            *k = a + C;
      for (int64_t b = b0; b < b1; ++b) {
        refs_of(b, ref, da);
        std::fill(sums.begin(), sums.end(), 0.f);
        for (int64_t c0 = 0; c0 < C; c0 += cs) {
          const int64_t cn = std::min(cs, C - c0);
          for (int64_t j = 0; j < nb; ++j)
            K.cl_sums(P.x + unit_ptr(b, j) + c0 * es, C, cn, unit_pix(j), ref + c0,
                      sums.data() + 2 * C * j + c0, sums.data() + 2 * C * j + C + c0);
          finish(b, c0, cn, da, mean, m2, sums.data(), 2 * C, a, k);
          // backwards: the units read last by the statistics pass are still in L2 (a slab
          // larger than L2 is then read a second time partly from L2, the rest from L3)
          for (int64_t j = nb - 1; j >= 0; --j)
            K.cl_apply(P.x + unit_ptr(b, j) + c0 * es, P.y + unit_ptr(b, j) + c0 * es, C, cn,
                       unit_pix(j), ref + c0, a + c0, k + c0, P.silu);
        }
      }
    });
    return;
  }
  // few images: every pass split over the units (whole pixels: the units are what is split)
  std::vector<float> ref(B * C), da(B * C), a(B * C), k(B * C), sums(B * nb * 2 * C, 0.f);
  for (int64_t b = 0; b < B; ++b) refs_of(b, ref.data() + b * C, da.data() + b * C);
  at::parallel_for(0, B * nb, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / nb, j = u % nb;
      float* s = sums.data() + u * 2 * C;
      K.cl_sums(P.x + unit_ptr(b, j), C, C, unit_pix(j), ref.data() + b * C, s, s + C);
    }
  });
  {  // the folds: a few vector operations per unit, on this thread
    std::vector<float> mean(C), m2(C);
    for (int64_t b = 0; b < B; ++b)
      finish(b, 0, C, da.data() + b * C, mean.data(), m2.data(), sums.data() + b * nb * 2 * C,
             2 * C, a.data() + b * C, k.data() + b * C);
  }
  at::parallel_for(0, B * nb, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u1 - 1; u >= u0; --u) {  // backwards, as above (same split of the units)
      const int64_t b = u / nb, j = u % nb;
      K.cl_apply(P.x + unit_ptr(b, j), P.y + unit_ptr(b, j), C, C, unit_pix(j),
                 ref.data() + b * C, a.data() + b * C, k.data() + b * C, P.silu);
    }
  });
}

}  // namespace

// Checks shared with the CUDA entry point; returns the layout (0 NCHW-like, 1 channels_last).
int gn_check_args(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                  const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& add,
                  const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                  int64_t num_groups, const at::Tensor& out) {
  FD_CHECK(x.dim() >= 3 && x.dim() <= 8, "group_norm_silu: x must be (B, C, *spatial), got ",
           x.sizes());
  const int64_t B = x.size(0), C = x.size(1);
  FD_CHECK(num_groups > 0 && C % num_groups == 0, "group_norm_silu: num_groups=", num_groups,
           " must divide C=", C);
  auto check_param = [&](const c10::optional<at::Tensor>& t, const char* name,
                         at::IntArrayRef shape) {
    if (!t) return;
    FD_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->sizes() == shape,
             "group_norm_silu: ", name, " must be a contiguous float32 tensor of shape ", shape,
             ", got ", t->scalar_type(), " ", t->sizes());
    FD_CHECK(t->device() == x.device(), "group_norm_silu: ", name, " is on ", t->device(),
             " but x is on ", x.device());
  };
  check_param(weight, "weight", {C});
  check_param(bias, "bias", {C});
  check_param(add, "add", {B, C});
  check_param(scale, "scale", {B, C});
  check_param(shift, "shift", {B, C});
  FD_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() &&
           out.device() == x.device(), "group_norm_silu: out must match x in shape, dtype, device");
  const int lx = gn_layout(x.sizes().data(), x.strides().data(), static_cast<int>(x.dim()));
  const int lo = gn_layout(out.sizes().data(), out.strides().data(), static_cast<int>(out.dim()));
  FD_CHECK(lx >= 0 && lx == lo, "group_norm_silu: x and out must both be dense, in the same "
           "order ((B, C, *spatial) or channels_last)");
  return lx;
}

void group_norm_silu_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                         const c10::optional<at::Tensor>& bias,
                         const c10::optional<at::Tensor>& add,
                         const c10::optional<at::Tensor>& scale,
                         const c10::optional<at::Tensor>& shift, int64_t num_groups, double eps,
                         bool silu, at::Tensor out) {
  const int layout = gn_check_args(x, weight, bias, add, scale, shift, num_groups, out);
  if (x.numel() == 0) return;
  GnProblem P;
  P.x = static_cast<const char*>(x.data_ptr());
  P.y = static_cast<char*>(out.data_ptr());
  P.esize = x.element_size();
  switch (x.scalar_type()) {
    case at::kFloat: P.dtype = GnDtype::kFloat; break;
    case at::kHalf: P.dtype = GnDtype::kHalf; break;
    case at::kBFloat16: P.dtype = GnDtype::kBFloat16; break;
    default:
      FD_CHECK(false, "group_norm_silu: x must be float32, float16 or bfloat16 (float64 runs the "
               "reference), got ", x.scalar_type());
  }
  P.B = x.size(0);
  P.C = x.size(1);
  P.S = x.numel() / (P.B * P.C);
  P.G = num_groups;
  P.Cg = P.C / P.G;
  P.w = weight ? weight->data_ptr<float>() : nullptr;
  P.bias = bias ? bias->data_ptr<float>() : nullptr;
  P.add = add ? add->data_ptr<float>() : nullptr;
  P.scale = scale ? scale->data_ptr<float>() : nullptr;
  P.shift = shift ? shift->data_ptr<float>() : nullptr;
  P.eps = static_cast<float>(eps);
  P.silu = silu;
  const GnVecKernels& K = gn_vec_kernels(P.dtype);
  if (layout == 1) {
    gn_cl(P, K);
  } else {
    gn_nchw(P, K);
  }
}

}  // namespace fastdiff

TORCH_LIBRARY_FRAGMENT(fastdiff_ext, m) {
  m.def("group_norm_silu(Tensor x, Tensor? weight, Tensor? bias, Tensor? add, Tensor? scale, "
        "Tensor? shift, int num_groups, float eps, bool silu, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(fastdiff_ext, CPU, m) {
  m.impl("group_norm_silu", &fastdiff::group_norm_silu_cpu);
}
