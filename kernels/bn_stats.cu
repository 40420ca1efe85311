// bn_stats.cu: training statistics in ONE launch (split reduction + last-block finalize).
//
// bn_stats_planar_<dt>_<ix>  (inner > 1)   grid (splits, min(C, 65535)), block 256.
//   Block (s, y) handles channels c = y, y + gridDim.y, ...; per channel, warp s*8 + w of the
//   splits*8 takes the (s*8 + w)-th contiguous range of the channel's warp units (unit = 32 lanes
//   x VEC elements of one plane, or, planes of at most 16*VEC values with 32-bit indices, the
//   32*VEC / inner whole planes that fit: common.cuh, planar_span).
// bn_stats_rows_<dt>_<ix>    (inner == 1)  grid (ceil(C / (bx*VEC)), splits), block (bx, by).
//   Thread column owns VEC channels, rows strided by splits*by.
// Per thread: Welford in f32 on x - x(0, c, 0) (a per-channel pivot, see moments.cuh). Planar: each
// 16-byte vector's own (count, mean, m2) is Chan-merged into the thread state (<= 1 division per
// vector); rows: one value per channel per row, one division per row shared by the VEC channels.
// Then warp shuffles + shared memory (fixed order), partial (mean of x - pivot, m2, count) to
// partials[c][split], semaphore; the last block merges the partials in split order (rows: in two
// levels past 8*by splits, common.cuh; one split: no partial) and writes
// save_mean + save_mean_lo = pivot + mean exactly (two_sum: save_mean is the rounded f32 mean),
// save_invstd = 1/sqrt(var + eps) (bit-identical to 1.0f / sqrtf) and the running update.
// Shared memory: planar 3*8 floats; rows (1 + 2*VEC)*256 floats (9 KB f32, 17 KB f16/bf16).
// Assumes m = outer*inner >= 2 (host), partials sized [C][splits][3] (< 2^32 floats),
// launch::semaphores semaphores zero, gridDim.x (planar) / gridDim.y (rows) == splits.
#include "moments.cuh"

struct StatsParams {
  const void* x;
  float* partials;
  unsigned int* semaphores;
  float* save_mean;
  float* save_mean_lo;  // nullable
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

// The accumulation (per-channel pivot, Welford, partials) is moments.cuh's, shared with bn_sync.
struct Stats : MomentsAcc<StatsParams> {
  template <typename T> static __device__ __forceinline__ void finalize(const Params& p, u64 c, const Welford<1>& s) {
    write_batch_stats(p, c, two_sum(pivot<T>(p, c), s.mean(0)), s.m2(0), p.g.outer * p.g.inner);
  }
};

}  // namespace bn

#define BN_STATS_ENTRIES(dt, T, ix, I)                                                  \
  BN_KERNEL(bn_stats_planar_##dt##_##ix, StatsParams, bn::split_reduce_planar<bn::Stats, T, I, 4>) \
  BN_KERNEL(bn_stats_rows_##dt##_##ix, StatsParams, bn::split_reduce_rows<bn::Stats, T, I, bn::rows_unroll<T, 1>()>)

BN_FOR_EACH_TYPE(BN_STATS_ENTRIES)
