// GroupNorm (+ add before, + scale/shift and SiLU after) on the CPU: one task per (batch, group), two passes over
// the group (statistics, then normalize; the second pass mostly hits cache).
//
// NCHW-like layouts: a group is Cg contiguous rows of S pixels -> inner loops run along a row.
// channels_last: a group is S pixels of Cg contiguous channels -> inner loops run across the
// channels with per-channel accumulators. Both inner loops keep independent fp32 lanes, so they
// vectorize without reassociating a reduction; blocks of at most kChunk elements are folded into
// the group's statistics with Chan's formula (group_norm_silu.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <vector>

#include "group_norm_silu.h"

namespace fastdiff {
namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kChunk = 1024;   // elements of a row per fp32 block (16 lanes x 64)
constexpr int64_t kChunkCL = 128;  // pixels per fp32 block in channels_last (1 lane per channel)

template <typename scalar_t>
GnStats row_stats(const scalar_t* row, int64_t n, float shift) {
  GnStats st{0.f, 0.f, 0.f};
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t len = std::min(kChunk, n - c0);
    float s1[kLanes] = {0.f}, s2[kLanes] = {0.f};
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        const float d = static_cast<float>(row[c0 + i + l]) - shift;
        s1[l] += d;
        s2[l] += d * d;
      }
    }
    for (int64_t l = 0; i < len; ++i, ++l) {
      const float d = static_cast<float>(row[c0 + i]) - shift;
      s1[l] += d;
      s2[l] += d * d;
    }
    float t1 = 0.f, t2 = 0.f;
    for (int64_t l = 0; l < kLanes; ++l) { t1 += s1[l]; t2 += s2[l]; }
    st = gn_combine(st, gn_from_sums(static_cast<float>(len), t1, t2));
  }
  return st;
}

template <typename scalar_t>
void gn_cpu_impl(const at::Tensor& x, const float* w, const float* bias, const float* add,
                 const float* scale, const float* shift, int64_t G, float eps, bool silu, bool channels_last, at::Tensor& out) {
  const int64_t B = x.size(0), C = x.size(1), S = x.numel() / (B * C), Cg = C / G;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* yp = out.data_ptr<scalar_t>();
  at::parallel_for(0, B * G, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> da(Cg), s1(Cg), s2(Cg);
    std::vector<GnCoef> coef(Cg);
    std::vector<GnStats> cst(Cg);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / G, g = p % G;
      const int64_t base = b * C * S + (channels_last ? g * Cg : g * Cg * S);
      const float xs = static_cast<float>(xp[base]);
      const float a0 = add ? add[b * C + g * Cg] : 0.f;
      for (int64_t c = 0; c < Cg; ++c) da[c] = add ? add[b * C + g * Cg + c] - a0 : 0.f;

      GnStats st{0.f, 0.f, 0.f};
      if (!channels_last) {
        for (int64_t c = 0; c < Cg; ++c) {
          // d = (x - xs) + da_c: a row shifted by (xs - da_c)
          GnStats r = row_stats(xp + base + c * S, S, xs);
          r.mean += da[c];
          st = gn_combine(st, r);
        }
      } else {
        for (int64_t c = 0; c < Cg; ++c) cst[c] = {0.f, 0.f, 0.f};
        for (int64_t q0 = 0; q0 < S; q0 += kChunkCL) {
          const int64_t len = std::min(kChunkCL, S - q0);
          std::fill(s1.begin(), s1.end(), 0.f);
          std::fill(s2.begin(), s2.end(), 0.f);
          float* s1p = s1.data();
          float* s2p = s2.data();
          for (int64_t q = q0; q < q0 + len; ++q) {
            const scalar_t* px = xp + base + q * C;
            for (int64_t c = 0; c < Cg; ++c) {  // contiguous channels: vectorizes
              const float d = static_cast<float>(px[c]) - xs;
              s1p[c] += d;
              s2p[c] += d * d;
            }
          }
          for (int64_t c = 0; c < Cg; ++c)
            cst[c] = gn_combine(cst[c], gn_from_sums(static_cast<float>(len), s1[c], s2[c]));
        }
        for (int64_t c = 0; c < Cg; ++c) {
          GnStats r = cst[c];
          r.mean += da[c];
          st = gn_combine(st, r);
        }
      }
      const float rstd = gn_rstd(st, eps);
      for (int64_t c = 0; c < Cg; ++c) {
        const int64_t ch = g * Cg + c;
        coef[c] = gn_coef(st.mean, rstd, w ? w[ch] : 1.f, bias ? bias[ch] : 0.f, da[c],
                          scale ? 1.f + scale[b * C + ch] : 1.f, shift ? shift[b * C + ch] : 0.f);
      }
      if (!channels_last) {
        for (int64_t c = 0; c < Cg; ++c) {
          const scalar_t* row = xp + base + c * S;
          scalar_t* yrow = yp + base + c * S;
          const GnCoef k = coef[c];
          for (int64_t i = 0; i < S; ++i)
            yrow[i] = static_cast<scalar_t>(gn_apply(static_cast<float>(row[i]) - xs, k, silu));
        }
      } else {
        const GnCoef* kp = coef.data();
        for (int64_t q = 0; q < S; ++q) {
          const scalar_t* px = xp + base + q * C;
          scalar_t* py = yp + base + q * C;
          for (int64_t c = 0; c < Cg; ++c)
            py[c] = static_cast<scalar_t>(gn_apply(static_cast<float>(px[c]) - xs, kp[c], silu));
        }
      }
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

namespace {

void group_norm_silu_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                         const c10::optional<at::Tensor>& bias,
                         const c10::optional<at::Tensor>& add,
                         const c10::optional<at::Tensor>& scale,
                         const c10::optional<at::Tensor>& shift, int64_t num_groups, double eps,
                         bool silu, at::Tensor out) {
  const int layout = gn_check_args(x, weight, bias, add, scale, shift, num_groups, out);
  if (x.numel() == 0) return;
  const float* w = weight ? weight->data_ptr<float>() : nullptr;
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  const float* a = add ? add->data_ptr<float>() : nullptr;
  const float* sc = scale ? scale->data_ptr<float>() : nullptr;
  const float* sh = shift ? shift->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_cpu",
                                  [&] {
    gn_cpu_impl<scalar_t>(x, w, b, a, sc, sh, num_groups, static_cast<float>(eps), silu, layout == 1, out);
  });
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_FRAGMENT(fastdiff_ext, m) {
  m.def("group_norm_silu(Tensor x, Tensor? weight, Tensor? bias, Tensor? add, Tensor? scale, "
        "Tensor? shift, int num_groups, float eps, bool silu, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(fastdiff_ext, CPU, m) {
  m.impl("group_norm_silu", &fastdiff::group_norm_silu_cpu);
}
