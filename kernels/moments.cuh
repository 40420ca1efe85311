// moments.cuh: per-channel Welford moments of x, shared by bn_stats.cu (finalize: invstd and the
// running update) and bn_sync.cu (finalize: the raw (count, mean, m2) a rank exchanges).
//
//   MomentsAcc<Params>  the accumulation half of a split_reduce_* policy (common.cuh): State,
//                       PF, the planar and rows walk functors, vec_ok, store/load_partial. Any
//                       Params with x, partials, semaphores, g, splits. A policy derives from it
//                       and adds finalize<T>(p, c, s).
//   write_batch_stats   save_mean, save_invstd and the running update of one channel from its
//                       mean, m2 and count: the finalize of bn_stats and of the bn_sync merge.
#pragma once

#include "common.cuh"

namespace bn {

template <class P> struct MomentsAcc {
  typedef P Params;
  static constexpr int PF = 3;  // (mean, m2, count)
  template <int K> using State = Welford<K>;

  // Every block of channel c accumulates y = x - pivot(c), pivot(c) = x(0, c, 0) (one value,
  // the same for all blocks): for clustered data the differences are exact and small, so the
  // Welford means and merge deltas carry no rounding at the scale of the mean (mean 1000, std 0.1
  // keeps the variance to ~1e-6 instead of ~1e-4), a constant channel gives y == 0 exactly, and
  // the finalize adds the pivot back with one rounding.
  template <typename T> static __device__ __forceinline__ float pivot(const Params& p, u64 c) {
    return Dtype<T>::to_f(static_cast<const Raw<T>*>(p.x)[c * p.g.inner]);
  }

  template <typename T, typename I> struct PlanarAcc {
    typedef Pack<T> Frag;
    const Raw<T>* x;
    float pv;
    Welford<1> st;
    __device__ __forceinline__ PlanarAcc(const Params& p, u64 c)
        : x(static_cast<const Raw<T>*>(p.x)), pv(pivot<T>(p, c)), st(Welford<1>::empty()) {}
    template <bool V, int STEP> __device__ __forceinline__ void load(Frag& fr, const Slice<I>& s) const {
      load_slots<T, V, STEP>(fr, x, s);
    }
    template <bool V, int STEP> __device__ __forceinline__ void consume(Frag& fr, const Slice<I>& s) {
      if (s.cnt <= 0) return;
      float v[Vec<T>::N];
      unpack(fr, v);
#pragma unroll
      for (int k = 0; k < Vec<T>::N; ++k) v[k] -= pv;
      st = Welford<1>::merge(st, vec_welford(v, s.cnt));
    }
  };

  template <typename T, typename I> struct RowsAcc {
    static constexpr int VEC = Vec<T>::N;
    typedef Pack<T> Frag;
    const Raw<T>* x;
    float pv[VEC];
    Welford<VEC> st;
    __device__ __forceinline__ RowsAcc(const Params& p, const RowsColumn& rc)
        : x(static_cast<const Raw<T>*>(p.x)), st(Welford<VEC>::empty()) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) pv[k] = k < rc.cnt ? pivot<T>(p, rc.c0 + k) : 0.f;
    }
    template <bool V, int STEP> __device__ __forceinline__ void load(Frag& fr, const Slice<I>& s) const {
      load_slots<T, V, STEP>(fr, x, s);
    }
    // Masked channels (k >= cnt) accumulate zeros and are never written.
    template <bool V, int STEP> __device__ __forceinline__ void consume(Frag& fr, const Slice<I>& s) {
      if (s.cnt <= 0) return;
      float v[VEC];
      unpack(fr, v);
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] -= pv[k];
      st = Welford<VEC>::merge(st, Welford<VEC>::sample(v));
    }
  };

  static __device__ __forceinline__ bool vec_ok(const Params& p) { return aligned16(p.x); }

  template <int K> static __device__ __forceinline__ void store_partial(float* dst, const Welford<K>& s, int k) {
    dst[0] = s.mean(k);
    dst[1] = s.m2(k);
    dst[2] = s.n();
  }
  // All channels of a rows column have the same count in a given split: n is rewritten equal.
  template <int K> static __device__ __forceinline__ void load_partial(Welford<K>& s, const float* src, int k) {
    s.mean(k) = __ldcg(src + 0);
    s.m2(k) = __ldcg(src + 1);
    s.n() = __ldcg(src + 2);
  }
};

// Channel c's batch statistics from its mean (hi + lo), m2 and count m (m >= 1; m == 0 only for
// an empty sync batch, which writes mean 0 and 1/sqrt(eps) as the CPU reference does):
// save_mean = hi (PyTorch's f32 mean), save_mean_lo = lo (nullable), save_invstd =
// 1/sqrt(m2/m + eps), and, when running_mean / running_var are given and m >= 2,
// r = (1 - factor)*r + factor*batch with the unbiased (unbiased != 0) or biased variance.
// O: any params struct with save_mean, save_mean_lo, save_invstd, running_mean, running_var, eps,
// factor, unbiased (StatsParams, SyncMergeParams).
template <class O>
__device__ __forceinline__ void write_batch_stats(const O& o, u64 c, MeanPair mean, float m2, u64 m) {
  // Biased variance, IEEE m2 / (float)m (PyTorch's var_n / N), through div_d: no call.
  const float var = m > 0 ? (float)div_d((double)m2, (double)(float)m) : 0.f;
  o.save_mean[c] = mean.hi;
  if (o.save_mean_lo) o.save_mean_lo[c] = mean.lo;
  o.save_invstd[c] = invsqrt_rn(var + o.eps);  // == 1.0f / sqrtf(var + eps)
  if (m < 2) return;
  const float f = o.factor;
  // The f32 mean, as PyTorch's update (lo is below the running mean's own rounding).
  if (o.running_mean) o.running_mean[c] = f * mean.hi + (1.0f - f) * o.running_mean[c];
  if (o.running_var) {
    // Bessel factor as PyTorch: static_cast<float>(double(m) / double(m - 1)). x = m/(m-1) is
    // never within 2^-48 (relative) of a f32 rounding midpoint unless m - 1 > 2^24, where both
    // round to 1.0f (m - 1 == 2^24 is an exact midpoint, exact in div_d too): div_d's error
    // cannot change the f32 result.
    const float batch_var = o.unbiased ? var * (float)div_d((double)m, (double)(m - 1)) : var;
    o.running_var[c] = f * batch_var + (1.0f - f) * o.running_var[c];
  }
}

}  // namespace bn
