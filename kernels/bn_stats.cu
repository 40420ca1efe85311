// bn_stats.cu: training statistics in ONE launch (split reduction + last-block finalize).
//
// bn_stats_planar_<dt>_<ix>  (inner > 1)   grid (splits, min(C, 65535)), block 256.
//   Block (s, y) handles channels c = y, y + gridDim.y, ...; per channel, warp s*8 + w of the
//   splits*8 takes the (s*8 + w)-th contiguous range of the channel's warp units (unit = 32 lanes
//   x VEC elements of one plane).
// bn_stats_rows_<dt>_<ix>    (inner == 1)  grid (ceil(C / (bx*VEC)), splits), block (bx, by).
//   Thread column owns VEC channels, rows strided by splits*by.
// Per thread: Welford in f32 on x - x(0, c, 0) (a per-channel pivot, see Stats). Planar: each
// 16-byte vector's own (count, mean, m2) is Chan-merged into the thread state (<= 1 division per
// vector); rows: one value per channel per row, one division per row shared by the VEC channels.
// Then warp shuffles + shared memory (fixed order), partial (mean of x - pivot, m2, count) to
// partials[c][split], semaphore; the last block merges the partials in split order and writes
// save_mean = pivot + mean, save_invstd = 1/sqrt(var + eps) (bit-identical to 1.0f / sqrtf) and
// the running update.
// Shared memory: planar 3*8 floats; rows (1 + 2*VEC)*256 floats (9 KB f32, 17 KB f16/bf16).
// Assumes m = outer*inner >= 2 (host), partials sized [C][splits][3] (< 2^32 floats),
// semaphores zero, gridDim.x (planar) / gridDim.y (rows) == splits.
#include "common.cuh"

struct StatsParams {
  const void* x;
  float* partials;
  unsigned int* semaphores;
  float* save_mean;
  float* save_invstd;
  float* running_mean;
  float* running_var;
  bn::Geometry g;
  float eps;
  float factor;
  int unbiased;
  int splits;
};

namespace bn {

struct Stats {
  typedef StatsParams Params;
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

  template <typename T> static __device__ __forceinline__ void finalize(const Params& p, u64 c, const Welford<1>& s) {
    const u64 m = p.g.outer * p.g.inner;
    const float mean = pivot<T>(p, c) + s.mean(0);
    // Biased variance, IEEE m2 / (float)m (PyTorch's var_n / N), through div_d: no call.
    const float var = (float)div_d((double)s.m2(0), (double)(float)m);
    p.save_mean[c] = mean;
    p.save_invstd[c] = invsqrt_rn(var + p.eps);  // == 1.0f / sqrtf(var + eps)
    const float f = p.factor;
    if (p.running_mean) p.running_mean[c] = f * mean + (1.0f - f) * p.running_mean[c];
    if (p.running_var) {
      // Bessel factor as PyTorch: static_cast<float>(double(m) / double(m - 1)). x = m/(m-1) is
      // never within 2^-48 (relative) of a f32 rounding midpoint unless m - 1 > 2^24, where both
      // round to 1.0f (m - 1 == 2^24 is an exact midpoint, exact in div_d too): div_d's error
      // cannot change the f32 result.
      const float batch_var = p.unbiased ? var * (float)div_d((double)m, (double)(m - 1)) : var;
      p.running_var[c] = f * batch_var + (1.0f - f) * p.running_var[c];
    }
  }
};

}  // namespace bn

#define BN_STATS_ENTRIES(dt, T, ix, I)                                                  \
  BN_KERNEL(bn_stats_planar_##dt##_##ix, StatsParams, bn::split_reduce_planar<bn::Stats, T, I, 4>) \
  BN_KERNEL(bn_stats_rows_##dt##_##ix, StatsParams, bn::split_reduce_rows<bn::Stats, T, I, bn::rows_unroll<T, 1>()>)

BN_FOR_EACH_TYPE(BN_STATS_ENTRIES)
