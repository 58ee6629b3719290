// q_sample's vectorized loop (one variant per CPU capability, see cpu/vec.h): per block of W
// Philox groups, the normals from the vectorized Philox + Box-Muller (cpu/noise_vec.h), then
// x_t = a x0 + s eps (and v = a eps - s x0) on float vectors: the expressions of q_sample_xt /
// q_sample_v (csrc/q_sample.h), in the same order.
#include "cpu/q_sample_vec.h"

#include "cpu/noise_vec.h"
#include "q_sample.h"

namespace fastdiff {
namespace CPU_CAPABILITY {
namespace {

template <typename T>
void blocks(const QSampleBlocks& r) {
  const T* x0 = static_cast<const T*>(r.x0);
  const T* noise = static_cast<const T*>(r.noise);
  T* xt = static_cast<T*>(r.x_t);
  T* ep = static_cast<T*>(r.eps);
  T* vp = static_cast<T*>(r.v);
  const fVec a(r.a), s(r.s);
  alignas(64) float z[4 * W];
  for (int64_t blk = 0; blk < r.nblocks; ++blk) {
    const int64_t off = 4 * W * blk;
    if (noise == nullptr)
      normals_block(r.seed, r.image, r.k + static_cast<uint32_t>(W * blk), r.step,
                    kStreamQSample, z);
    for (int64_t h = 0; h < 4 * W; h += 2 * W) {  // two halves of 2W elements
      fVec x_lo, x_hi, e_lo, e_hi;
      Io<T>::load(x0 + off + h, x_lo, x_hi);
      if (noise != nullptr) {
        Io<T>::load(noise + off + h, e_lo, e_hi);
      } else {
        e_lo = fVec::loadu(z + h);
        e_hi = fVec::loadu(z + h + W);
        Io<T>::store(ep + off + h, e_lo, e_hi);
      }
      Io<T>::store(xt + off + h, a * x_lo + s * e_lo, a * x_hi + s * e_hi);
      if (vp != nullptr) Io<T>::store(vp + off + h, a * e_lo - s * x_lo, a * e_hi - s * x_hi);
    }
  }
}

}  // namespace

int64_t vec_groups() { return W; }

void q_sample_blocks(VecDtype dtype, const QSampleBlocks& r) {
  switch (dtype) {
    case VecDtype::kHalf: return blocks<c10::Half>(r);
    case VecDtype::kBFloat16: return blocks<c10::BFloat16>(r);
    default: return blocks<float>(r);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fastdiff
