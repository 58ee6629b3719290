// GroupNorm (+ add before, + scale/shift and SiLU after) on CUDA, same plan as kernels/group_norm_silu.py.
//
// Bytes: the floor is read x + write y (N·e each). With K == 1 one block owns a group: it reads
// the group for the statistics and again to normalize (the re-read mostly hits L2/L1).
// When B·G blocks would leave SMs idle (K > 1), each group is split into K chunks: pass 1 writes
// per-chunk (count, mean, M2) to a float workspace (B·G·K·3), pass 2 combines the K partials in a
// fixed order (Chan's formula; deterministic, no atomics) and normalizes its chunk.
//
// A group is a 2-D array with a contiguous inner dim: NCHW-like: Cg rows (channels) of S pixels,
// row stride S; channels_last: S rows (pixels) of Cg channels, row stride C. Loads and stores
// are vectors of V elements (16 bytes where the inner length, row stride and pointers allow).
// Stream: the current one; no host syncs (graph-capturable).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <atomic>
#include <c10/cuda/CUDAException.h>

#include "group_norm_silu.h"

namespace fastdiff {

// Defined in cpu/group_norm_silu.cpp (one set of checks for both devices).
int gn_check_args(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                  const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& add,
                  const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                  int64_t num_groups, const at::Tensor& out);

namespace {

constexpr int kThreads = 256;
constexpr int kFlush = 256;  // elements summed in fp32 per thread before a Chan merge

template <typename T, int V>
struct alignas(sizeof(T) * V) VecT {
  T v[V];
};

struct GroupGeom {
  int64_t C, S, Cg, G;
  int64_t rows, cols, row_stride;  // the group as rows x cols, cols contiguous
  int64_t nvec;                    // rows * cols / V
  bool cl;
};

__device__ __forceinline__ GnStats shfl_down(GnStats s, int off) {
  return {__shfl_down_sync(0xffffffffu, s.n, off), __shfl_down_sync(0xffffffffu, s.mean, off),
          __shfl_down_sync(0xffffffffu, s.m2, off)};
}

// Deterministic block reduction (fixed shuffle tree, then warp 0 in fixed order); the result is
// valid in every thread.
__device__ GnStats block_reduce(GnStats s) {
  __shared__ GnStats warp_st[kThreads / 32];
  __shared__ GnStats total;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int off = 16; off > 0; off >>= 1) s = gn_combine(s, shfl_down(s, off));
  if (lane == 0) warp_st[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < kThreads / 32 ? warp_st[lane] : GnStats{0.f, 0.f, 0.f};
    for (int off = 16; off > 0; off >>= 1) s = gn_combine(s, shfl_down(s, off));
    if (lane == 0) total = s;
  }
  __syncthreads();
  return total;
}

template <typename scalar_t, int V>
__device__ __forceinline__ void load_vec(const scalar_t* p, float (&f)[V]) {
  const VecT<scalar_t, V> v = *reinterpret_cast<const VecT<scalar_t, V>*>(p);
#pragma unroll
  for (int j = 0; j < V; ++j) f[j] = static_cast<float>(v.v[j]);
}

// Statistics of vectors [v0, v1) of the group (shifted by xs, + da of the channel).
template <typename scalar_t, int V>
__device__ GnStats chunk_stats(const scalar_t* __restrict__ xg, const float* __restrict__ ag,
                               float a0, float xs, const GroupGeom geo, int64_t v0, int64_t v1) {
  GnStats st{0.f, 0.f, 0.f};
  float s1 = 0.f, s2 = 0.f;
  int cnt = 0;
  for (int64_t v = v0 + threadIdx.x; v < v1; v += kThreads) {
    const int64_t e = v * V, r = e / geo.cols, col = e - r * geo.cols;
    float f[V];
    load_vec<scalar_t, V>(xg + r * geo.row_stride + col, f);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t c = geo.cl ? col + j : r;
      const float d = (f[j] - xs) + (ag ? __ldg(ag + c) - a0 : 0.f);
      s1 += d;
      s2 += d * d;
    }
    cnt += V;
    if (cnt >= kFlush) {
      st = gn_combine(st, gn_from_sums(static_cast<float>(cnt), s1, s2));
      s1 = s2 = 0.f;
      cnt = 0;
    }
  }
  st = gn_combine(st, gn_from_sums(static_cast<float>(cnt), s1, s2));
  return block_reduce(st);
}

template <typename scalar_t, int V>
__device__ void chunk_apply(const scalar_t* __restrict__ xg, scalar_t* __restrict__ yg,
                            const float* __restrict__ wg, const float* __restrict__ bg,
                            const float* __restrict__ ag, const float* __restrict__ sg,
                            const float* __restrict__ tg, float a0, float xs, GnStats st,
                            float eps, bool silu, const GroupGeom geo, int64_t v0, int64_t v1) {
  const float rstd = gn_rstd(st, eps);
  for (int64_t v = v0 + threadIdx.x; v < v1; v += kThreads) {
    const int64_t e = v * V, r = e / geo.cols, col = e - r * geo.cols;
    const int64_t off = r * geo.row_stride + col;
    float f[V];
    load_vec<scalar_t, V>(xg + off, f);
    VecT<scalar_t, V> out;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t c = geo.cl ? col + j : r;
      const GnCoef k = gn_coef(st.mean, rstd, wg ? __ldg(wg + c) : 1.f, bg ? __ldg(bg + c) : 0.f,
                               ag ? __ldg(ag + c) - a0 : 0.f, sg ? 1.f + __ldg(sg + c) : 1.f,
                               tg ? __ldg(tg + c) : 0.f);
      out.v[j] = static_cast<scalar_t>(gn_apply(f[j] - xs, k, silu));
    }
    *reinterpret_cast<VecT<scalar_t, V>*>(yg + off) = out;
  }
}

struct GroupPtrs {
  int64_t base;  // offset of the group's first element
  const float *w, *b, *a, *s, *t;  // the group's weight, bias, add, scale, shift (or null)
  float a0;
};

__device__ __forceinline__ GroupPtrs group_ptrs(int64_t pid, const GroupGeom& geo,
                                                const float* w, const float* b, const float* a,
                                                const float* s = nullptr,
                                                const float* t = nullptr) {
  const int64_t bi = pid / geo.G, g = pid % geo.G;
  GroupPtrs p;
  p.base = bi * geo.C * geo.S + (geo.cl ? g * geo.Cg : g * geo.Cg * geo.S);
  p.w = w ? w + g * geo.Cg : nullptr;
  p.b = b ? b + g * geo.Cg : nullptr;
  p.a = a ? a + bi * geo.C + g * geo.Cg : nullptr;
  p.s = s ? s + bi * geo.C + g * geo.Cg : nullptr;
  p.t = t ? t + bi * geo.C + g * geo.Cg : nullptr;
  p.a0 = a ? __ldg(p.a) : 0.f;
  return p;
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
gn_fused_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, const float* w,
                const float* b, const float* a, const float* s, const float* t, float eps,
                bool silu, GroupGeom geo) {
  const GroupPtrs p = group_ptrs(blockIdx.x, geo, w, b, a, s, t);
  const float xs = static_cast<float>(x[p.base]);
  const GnStats st = chunk_stats<scalar_t, V>(x + p.base, p.a, p.a0, xs, geo, 0, geo.nvec);
  chunk_apply<scalar_t, V>(x + p.base, y + p.base, p.w, p.b, p.a, p.s, p.t, p.a0, xs, st, eps,
                           silu, geo, 0, geo.nvec);
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
gn_partial_kernel(const scalar_t* __restrict__ x, const float* a, float* __restrict__ ws,
                  GroupGeom geo, int64_t vpc) {
  const int64_t pid = blockIdx.x, k = blockIdx.y, K = gridDim.y;
  const GroupPtrs p = group_ptrs(pid, geo, nullptr, nullptr, a);
  const float xs = static_cast<float>(x[p.base]);
  const int64_t v0 = k * vpc, v1 = min(v0 + vpc, geo.nvec);
  const GnStats st = chunk_stats<scalar_t, V>(x + p.base, p.a, p.a0, xs, geo, v0, v1);
  if (threadIdx.x == 0) {
    float* o = ws + (pid * K + k) * 3;
    o[0] = st.n;
    o[1] = st.mean;
    o[2] = st.m2;
  }
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
gn_apply_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, const float* w,
                const float* b, const float* a, const float* s, const float* t,
                const float* __restrict__ ws, float eps, bool silu, GroupGeom geo, int64_t vpc) {
  const int64_t pid = blockIdx.x, k = blockIdx.y, K = gridDim.y;
  __shared__ GnStats total;
  if (threadIdx.x == 0) {  // same order in every block of the group: identical statistics
    GnStats st{0.f, 0.f, 0.f};
    for (int64_t j = 0; j < K; ++j) {
      const float* q = ws + (pid * K + j) * 3;
      st = gn_combine(st, GnStats{q[0], q[1], q[2]});
    }
    total = st;
  }
  __syncthreads();
  const GroupPtrs p = group_ptrs(pid, geo, w, b, a, s, t);
  const float xs = static_cast<float>(x[p.base]);
  const int64_t v0 = k * vpc, v1 = min(v0 + vpc, geo.nvec);
  chunk_apply<scalar_t, V>(x + p.base, y + p.base, p.w, p.b, p.a, p.s, p.t, p.a0, xs, total, eps,
                           silu, geo, v0, v1);
}

// SM count of the current device, queried once per device (an attribute read, no sync).
int sm_count() {
  static std::atomic<int> cache[64];
  const int dev = c10::cuda::current_device();
  if (dev >= 64) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    return n;
  }
  int n = cache[dev].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    cache[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}

template <typename scalar_t, int V>
void launch(const at::Tensor& x, at::Tensor& out, const float* w, const float* b, const float* a,
            const float* s, const float* t, float eps, bool silu, GroupGeom geo, int64_t B) {
  geo.nvec = geo.rows * geo.cols / V;
  const int64_t groups = B * geo.G;
  const int sms = sm_count();
  const int64_t target = 2 * static_cast<int64_t>(sms);
  // split only when groups alone leave SMs idle, and keep >= 2048 elements per chunk
  int64_t K = 1;
  if (groups < target) {
    const int64_t max_k = std::max<int64_t>(1, geo.nvec * V / 2048);
    K = std::min<int64_t>({(target + groups - 1) / groups, max_k, 65535});
  }
  const int64_t vpc = (geo.nvec + K - 1) / K;
  K = (geo.nvec + vpc - 1) / vpc;  // no empty chunk
  auto stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* yp = out.data_ptr<scalar_t>();
  if (K == 1) {
    gn_fused_kernel<scalar_t, V><<<dim3(groups), kThreads, 0, stream>>>(xp, yp, w, b, a, s, t,
                                                                         eps, silu, geo);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  at::Tensor ws = at::empty({groups * K * 3}, x.options().dtype(at::kFloat));
  const dim3 grid(groups, K);
  gn_partial_kernel<scalar_t, V><<<grid, kThreads, 0, stream>>>(xp, a, ws.data_ptr<float>(), geo,
                                                                vpc);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  gn_apply_kernel<scalar_t, V><<<grid, kThreads, 0, stream>>>(xp, yp, w, b, a, s, t,
                                                              ws.data_ptr<float>(), eps, silu,
                                                              geo, vpc);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void group_norm_silu_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias,
                          const c10::optional<at::Tensor>& add,
                          const c10::optional<at::Tensor>& scale,
                          const c10::optional<at::Tensor>& shift, int64_t num_groups, double eps,
                          bool silu, at::Tensor out) {
  const int layout = gn_check_args(x, weight, bias, add, scale, shift, num_groups, out);
  if (x.numel() == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), C = x.size(1);
  GroupGeom geo;
  geo.C = C;
  geo.S = x.numel() / (B * C);
  geo.G = num_groups;
  geo.Cg = C / num_groups;
  geo.cl = layout == 1;
  geo.rows = geo.cl ? geo.S : geo.Cg;
  geo.cols = geo.cl ? geo.Cg : geo.S;
  geo.row_stride = geo.cl ? C : geo.S;
  geo.nvec = 0;
  const float* w = weight ? weight->data_ptr<float>() : nullptr;
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  const float* a = add ? add->data_ptr<float>() : nullptr;
  const float* sc = scale ? scale->data_ptr<float>() : nullptr;
  const float* sh = shift ? shift->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_cuda",
                                  [&] {
    // widest vector (<= 16 bytes) that never straddles a row and keeps every access aligned
    constexpr int kMaxV = 16 / sizeof(scalar_t);
    int v = kMaxV;
    const auto aligned = [&](int vv) {
      const uintptr_t bytes = static_cast<uintptr_t>(vv) * sizeof(scalar_t);
      return geo.cols % vv == 0 && geo.row_stride % vv == 0 &&
             reinterpret_cast<uintptr_t>(x.data_ptr()) % bytes == 0 &&
             reinterpret_cast<uintptr_t>(out.data_ptr()) % bytes == 0;
    };
    while (v > 1 && !aligned(v)) v /= 2;
    const float e = static_cast<float>(eps);
    switch (v) {
      case 8: launch<scalar_t, (kMaxV >= 8 ? 8 : 1)>(x, out, w, b, a, sc, sh, e, silu, geo, B);
        break;
      case 4: launch<scalar_t, (kMaxV >= 4 ? 4 : 1)>(x, out, w, b, a, sc, sh, e, silu, geo, B);
        break;
      case 2: launch<scalar_t, 2>(x, out, w, b, a, sc, sh, e, silu, geo, B); break;
      default: launch<scalar_t, 1>(x, out, w, b, a, sc, sh, e, silu, geo, B); break;
    }
  });
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff_ext, CUDA, m) {
  m.impl("group_norm_silu", &fastdiff::group_norm_silu_cuda);
}
