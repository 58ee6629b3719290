// sampler_step's vectorized loop (one variant per CPU capability, see cpu/vec.h): the
// per-element expressions of csrc/sampler_step.h (sampler_step_guide, _x0, _mean, _std) on
// float vectors, in the same order, with the noise from the vectorized Philox + Box-Muller.
#include "cpu/sampler_step_vec.h"

#include "cpu/noise_vec.h"

namespace fastdiff {
namespace CPU_CAPABILITY {
namespace {

struct Coefs {
  fVec cx, cm, k0, kx, km, sd, l0, l1, thr, lo, hi, w;
};

template <int kClip, int kStd>
inline fVec step(const Coefs& c, const fVec& x, fVec m, const fVec* mc, const fVec* z,
                 const fVec& v, fVec& x0c) {
  if (mc != nullptr) m = m + c.w * (*mc - m);
  fVec x0 = c.cx * x + c.cm * m;
  if (kClip == kClipRange) {
    x0 = at::vec::minimum(at::vec::maximum(x0, c.lo), c.hi);
  } else if (kClip == kClipThreshold) {
    x0 = at::vec::minimum(at::vec::maximum(x0, fVec(0.f) - c.thr), c.thr) / c.thr;
  }
  x0c = x0;
  fVec out = c.k0 * x0 + c.kx * x + c.km * m;
  if (z != nullptr) {
    fVec sd = c.sd;
    if (kStd == kStdLearnedRange) sd = (c.l0 + c.l1 * v).exp();
    else if (kStd == kStdLearned) sd = v.sqrt();
    out = out + sd * *z;
  }
  return out;
}

template <typename T, int kClip, int kStd>
void blocks(const SamplerStepBlocks& r) {
  const T* x = static_cast<const T*>(r.x);
  const T* m = static_cast<const T*>(r.m);
  const T* mc = static_cast<const T*>(r.mc);
  const T* var = static_cast<const T*>(r.var);
  const T* noise = static_cast<const T*>(r.noise);
  T* out = static_cast<T*>(r.out);
  T* x0 = static_cast<T*>(r.x0);
  const SamplerStepCoef& k = r.c;
  const Coefs c{fVec(k.cx), fVec(k.cm), fVec(k.k0), fVec(k.kx), fVec(k.km), fVec(k.std),
                fVec(k.l0), fVec(k.l1), fVec(r.thr), fVec(-r.clip_range), fVec(r.clip_range),
                fVec(r.w)};
  const bool learned = kStd != kStdFixed && r.add_noise;
  alignas(64) float zb[4 * W];
  for (int64_t blk = 0; blk < r.nblocks; ++blk) {
    const int64_t off = 4 * W * blk;
    if (r.add_noise && noise == nullptr)
      normals_block(r.seed, r.image, r.k + static_cast<uint32_t>(W * blk), r.step,
                    kStreamSamplerStep, zb);
    for (int64_t h = 0; h < 4 * W; h += 2 * W) {
      fVec xa, xb, ma, mb, ca, cb, za, zb2, va, vb, oa, ob, x0a, x0b;
      Io<T>::load(x + off + h, xa, xb);
      Io<T>::load(m + off + h, ma, mb);
      if (mc != nullptr) Io<T>::load(mc + off + h, ca, cb);
      if (r.add_noise) {
        if (noise != nullptr) {
          Io<T>::load(noise + off + h, za, zb2);
        } else {
          za = fVec::loadu(zb + h);
          zb2 = fVec::loadu(zb + h + W);
        }
      }
      if (learned) Io<T>::load(var + off + h, va, vb);
      const fVec* pa = mc != nullptr ? &ca : nullptr;
      const fVec* pb = mc != nullptr ? &cb : nullptr;
      oa = step<kClip, kStd>(c, xa, ma, pa, r.add_noise ? &za : nullptr, va, x0a);
      ob = step<kClip, kStd>(c, xb, mb, pb, r.add_noise ? &zb2 : nullptr, vb, x0b);
      Io<T>::store(out + off + h, oa, ob);
      if (x0 != nullptr) Io<T>::store(x0 + off + h, x0a, x0b);
    }
  }
}

template <typename T>
void dispatch(const SamplerStepBlocks& r) {
  auto with_clip = [&](auto std_mode) {
    constexpr int S = decltype(std_mode)::value;
    if (r.clip == kClipRange) blocks<T, kClipRange, S>(r);
    else if (r.clip == kClipThreshold) blocks<T, kClipThreshold, S>(r);
    else blocks<T, kClipNone, S>(r);
  };
  if (r.std_mode == kStdLearnedRange) with_clip(std::integral_constant<int, kStdLearnedRange>{});
  else if (r.std_mode == kStdLearned) with_clip(std::integral_constant<int, kStdLearned>{});
  else with_clip(std::integral_constant<int, kStdFixed>{});
}

}  // namespace

void sampler_step_blocks(VecDtype dtype, const SamplerStepBlocks& r) {
  switch (dtype) {
    case VecDtype::kHalf: return dispatch<c10::Half>(r);
    case VecDtype::kBFloat16: return dispatch<c10::BFloat16>(r);
    default: return dispatch<float>(r);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fastdiff
