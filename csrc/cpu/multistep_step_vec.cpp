// multistep_step's vectorized loop (one variant per CPU capability, see cpu/vec.h): the
// expressions of multistep_element (csrc/multistep_step.h) on float vectors, in the same order,
// with the noise from the vectorized Philox + Box-Muller (cpu/noise_vec.h).
#include "cpu/multistep_step_vec.h"

#include "cpu/noise_vec.h"

namespace fastdiff {
namespace CPU_CAPABILITY {
namespace {

struct Coefs {
  fVec cx, cm, corr_x, corr_last, corr_new, corr_h[kMultistepMaxOrder], pred_y, pred_new,
      pred_h[kMultistepMaxOrder], noise, thr, nthr, lo, hi, w;
};

// one vector of elements; h: the K ring slots' values; returns x_prev, sets x0 and y
template <int kK>
inline fVec element(const Coefs& c, int clip, bool last, const fVec& x, fVec m, const fVec* mc,
                    const fVec& xl, const fVec* h, const fVec* z, fVec& x0, fVec& y) {
  if (mc != nullptr) m = m + c.w * (*mc - m);
  x0 = c.cx * x + c.cm * m;
  // clamps as multistep_clamp: a NaN passes (x < lo and x > hi are both false)
  if (clip == kMsClipRange) {
    x0 = fVec::blendv(fVec::blendv(x0, c.hi, x0 > c.hi), c.lo, x0 < c.lo);
  } else if (clip == kMsClipThreshold) {
    x0 = fVec::blendv(fVec::blendv(x0, c.thr, x0 > c.thr), c.nthr, x0 < c.nthr) / c.thr;
  }
  if (last) {
    y = c.corr_x * x + c.corr_last * xl + c.corr_new * x0;
    for (int k = 0; k < kK; ++k) y = y + c.corr_h[k] * h[k];
  } else {
    y = x;
  }
  fVec out = c.pred_y * y + c.pred_new * x0;
  for (int k = 0; k < kK; ++k) out = out + c.pred_h[k] * h[k];
  if (z != nullptr) out = out + c.noise * *z;
  return out;
}

template <typename T, int kK>
void blocks(const MultistepBlocks& r) {
  const T* x = static_cast<const T*>(r.x);
  const T* m = static_cast<const T*>(r.m);
  const T* mc = static_cast<const T*>(r.mc);
  const T* noise = static_cast<const T*>(r.noise);
  T* out = static_cast<T*>(r.out);
  const MultistepCoef& k = r.c;
  Coefs c{fVec(k.cx), fVec(k.cm), fVec(k.corr_x), fVec(k.corr_last), fVec(k.corr_new),
          {fVec(k.corr_h[0]), fVec(k.corr_h[1]), fVec(k.corr_h[2])}, fVec(k.pred_y),
          fVec(k.pred_new), {fVec(k.pred_h[0]), fVec(k.pred_h[1]), fVec(k.pred_h[2])},
          fVec(k.noise), fVec(r.thr), fVec(-r.thr), fVec(-r.clip_range), fVec(r.clip_range),
          fVec(r.w)};
  const bool last = r.last != nullptr;
  alignas(64) float zb[4 * W];
  for (int64_t blk = 0; blk < r.nblocks; ++blk) {
    const int64_t off = 4 * W * blk;
    if (r.add_noise && noise == nullptr)
      normals_block(r.seed, r.image, r.k + static_cast<uint32_t>(W * blk), r.step,
                    kStreamMultistep, zb);
    for (int64_t hf = 0; hf < 4 * W; hf += 2 * W) {  // two halves of 2W elements
      const int64_t o = off + hf;
      fVec xa, xb, ma, mb, ca, cb, za, zb2, la, lb, ha[kK], hb[kK], x0a, x0b, ya, yb;
      Io<T>::load(x + o, xa, xb);
      Io<T>::load(m + o, ma, mb);
      if (mc != nullptr) Io<T>::load(mc + o, ca, cb);
      if (r.add_noise) {
        if (noise != nullptr) {
          Io<T>::load(noise + o, za, zb2);
        } else {
          za = fVec::loadu(zb + hf);
          zb2 = fVec::loadu(zb + hf + W);
        }
      }
      if (last) Io<float>::load(r.last + o, la, lb);
      for (int s = 0; s < kK; ++s) Io<float>::load(r.h[s] + o, ha[s], hb[s]);
      // every read of these elements is done: now the writes (out may be x_t, dst a slot)
      const fVec oa = element<kK>(c, r.clip, last, xa, ma, mc != nullptr ? &ca : nullptr, la, ha,
                                  r.add_noise ? &za : nullptr, x0a, ya);
      const fVec ob = element<kK>(c, r.clip, last, xb, mb, mc != nullptr ? &cb : nullptr, lb, hb,
                                  r.add_noise ? &zb2 : nullptr, x0b, yb);
      Io<T>::store(out + o, oa, ob);
      Io<float>::store(r.dst + o, x0a, x0b);
      if (last) Io<float>::store(r.last + o, ya, yb);
    }
  }
}

template <typename T>
void dispatch(const MultistepBlocks& r) {
  if (r.K == 1) blocks<T, 1>(r);
  else if (r.K == 2) blocks<T, 2>(r);
  else blocks<T, 3>(r);
}

}  // namespace

void multistep_step_blocks(VecDtype dtype, const MultistepBlocks& r) {
  switch (dtype) {
    case VecDtype::kHalf: return dispatch<c10::Half>(r);
    case VecDtype::kBFloat16: return dispatch<c10::BFloat16>(r);
    default: return dispatch<float>(r);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fastdiff
