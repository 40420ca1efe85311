// bn_sync.cu: synchronized batch norm across ranks (data-parallel replicas, each with a shard of
// the batch). The ranks exchange per-channel (count, mean hi, mean lo, m2), not invstd (PyTorch's
// SyncBatchNorm rebuilds the variance from invstd and loses precision), and every rank merges
// the R moments in the same fixed order, so all ranks hold bitwise the same statistics.
//
// bn_sync_moments_planar_<dt>_<ix>  (inner > 1)   } bn_stats' split reduction and accumulation
// bn_sync_moments_rows_<dt>_<ix>    (inner == 1)  } (moments.cuh, same grids and workspace);
//   the last block of each channel writes moments[c] = (count, hi, lo, m2) of this rank's shard:
//   count = (float)(outer*inner) (exact below 2^24), hi + lo = pivot + shifted mean exactly (as
//   bn_stats' save_mean, save_mean_lo), m2 of the shifted values. Assumes m = outer*inner >= 1 (an empty
//   shard launches nothing: the host zeroes its moments, an empty Welford state).
// bn_sync_merge        grid-stride over channels, block 256, no shared memory.
//   Thread of channel c merges gathered[r][c] for r = 0, 1, ..., R-1 in that order with Chan's
//   formula in double (each rank's mean is hi + lo, exact in double; an empty rank is an exact
//   identity, so R == 1 reproduces bn_stats bit for bit), sums the counts exactly in 64 bits (M),
//   and finalizes with M as bn_stats does (write_batch_stats): save_mean, save_mean_lo (the
//   double mean split into two floats), save_invstd, running update with M/(M-1). M == 0 (every
//   shard empty) writes mean 0, invstd 1/sqrt(eps) and no running update; M == 1 (one value in
//   the whole world, which only the device can see) writes the statistics but no running update.
//   Channel 0's thread writes M to *total for the backward.
// bn_sync_coefficients grid-stride over channels, block 256.
//   From this rank's (sum dy, sum dy*xhat) and the all-reduced sums: coef[c] = (global sum dy / M,
//   global sum dy*xhat / M) for bn_backward_dx, and dweight/dbias = (or +=) the LOCAL sums
//   (PyTorch: parameter gradients stay per rank; data-parallel training averages them).
#include "moments.cuh"

struct SyncMomentsParams {
  const void* x;
  float* partials;
  unsigned int* semaphores;
  float* moments;  // [C][4] out: (count, mean hi, mean lo, m2)
  bn::Geometry g;
  int splits;
};

struct SyncMergeParams {
  const float* gathered;        // [R][C][4]: every rank's moments, rank-major
  float* save_mean;             // [C] out
  float* save_mean_lo;          // [C] out, nullable
  float* save_invstd;           // [C] out
  float* running_mean;          // [C] in/out, nullable
  float* running_var;           // [C] in/out, nullable
  unsigned long long* total;    // [1] out, nullable: M, the global count
  unsigned long long ranks;
  unsigned long long channels;
  float eps;
  float factor;
  int unbiased;
};

struct SyncCoefficientsParams {
  const float* local;                // [2][C]: this rank's (sum dy, sum dy*xhat)
  const float* global;               // [2][C]: the same, summed over the ranks
  const unsigned long long* total;   // [1]: M, from bn_sync_merge
  float* coef;                       // [C][2] out: BackwardElementwiseParams::coef
  float* dweight;                    // [C] nullable: = or += local sum dy*xhat
  float* dbias;                      // [C] nullable: = or += local sum dy
  unsigned long long channels;
  int accumulate;
};

namespace bn {

constexpr int kMomentFloats = 4;  // (count, mean hi, mean lo, m2) per channel and rank

struct SyncMoments : MomentsAcc<SyncMomentsParams> {
  template <typename T> static __device__ __forceinline__ void finalize(const Params& p, u64 c, const Welford<1>& s) {
    const MeanPair mean = two_sum(pivot<T>(p, c), s.mean(0));
    float* dst = p.moments + kMomentFloats * c;
    dst[0] = (float)(p.g.outer * p.g.inner);
    dst[1] = mean.hi;
    dst[2] = mean.lo;
    dst[3] = s.m2(0);
  }
};

// Rows per iteration of the rows moments kernel: bn_stats' rows_unroll<T, 1>() (4 for f32), but 3
// rather than 2 for 16-bit types: with 2, ptxas 13.0 spills 4 bytes on sm_90 for f16/bf16 with
// 32-bit offsets (48 registers; bn_stats' heavier finalize happens to allocate without a spill).
// 3 uses 61-64 registers, no spill, and keeps 3 loads of 16 bytes in flight per thread.
template <typename T> __host__ __device__ constexpr int moments_rows_unroll() {
  return sizeof(T) == 2 ? 3 : rows_unroll<T, 1>();
}

// A double mean as hi + lo with hi = (float)mean, as two_sum's pairs: lo is the rest rounded to
// f32, moved one step toward 0 in the one case where it rounds onto half an ulp of an odd hi
// (then hi + lo would be a tie that rounds away from hi). lo is 0 when hi is not finite.
__device__ __forceinline__ MeanPair split_mean(double mean) {
  MeanPair r;
  r.hi = (float)mean;
  r.lo = 0.f;
  if (!(fabsf(r.hi) <= 3.40282346638528859812e+38f)) return r;
  r.lo = (float)(mean - (double)r.hi);
  if ((float)((double)r.hi + (double)r.lo) != r.hi) r.lo = __int_as_float(__float_as_int(r.lo) - 1);
  return r;
}

// Chan's merge in double, once per channel and rank (not a hot loop): w = nb / n (0 when both
// are empty, exactly 1 when a is), mean = ma + d*w, m2 = m2a + m2b + d^2 * na * w. With a empty
// the result is b exactly; so R == 1 gives back the rank's (hi, lo, m2) bit for bit.
__device__ __forceinline__ void sync_merge(const SyncMergeParams& p) {
  const u64 C = p.channels;
  for (u64 c = (u64)blockIdx.x * kThreads + threadIdx.x; c < C; c += (u64)gridDim.x * kThreads) {
    double n = 0.0, mean = 0.0, m2 = 0.0;
    u64 m = 0;
    const float* src = p.gathered + kMomentFloats * c;
    for (u64 r = 0; r < p.ranks; ++r, src += kMomentFloats * C) {
      const double nb = src[0], mb = (double)src[1] + (double)src[2], m2b = src[3];
      const double nn = n + nb;
      const double w = nn > 0.0 ? div_d(nb, nn) : 0.0;
      const double d = mb - mean;
      mean = fma(d, w, mean);
      m2 = fma(d * d, n * w, m2 + m2b);
      n = nn;
      m += (u64)src[0];
    }
    write_batch_stats(p, c, split_mean(mean), (float)m2, m);
    if (c == 0 && p.total) *p.total = m;
  }
}

__device__ __forceinline__ void sync_coefficients(const SyncCoefficientsParams& p) {
  const u64 C = p.channels;
  const u64 m = *p.total;
  // PyTorch's norm_fct = 1.0 / m; 0 when every shard is empty (then no rank has a dx to compute).
  const float inv_m = m > 0 ? (float)div_d(1.0, (double)m) : 0.f;
  for (u64 c = (u64)blockIdx.x * kThreads + threadIdx.x; c < C; c += (u64)gridDim.x * kThreads) {
    p.coef[2 * c] = p.global[c] * inv_m;
    p.coef[2 * c + 1] = p.global[C + c] * inv_m;
    const float dy = p.local[c], dyx = p.local[C + c];
    if (p.dweight) p.dweight[c] = p.accumulate ? p.dweight[c] + dyx : dyx;
    if (p.dbias) p.dbias[c] = p.accumulate ? p.dbias[c] + dy : dy;
  }
}

}  // namespace bn

#define BN_SYNC_ENTRIES(dt, T, ix, I)                                                                      \
  BN_KERNEL(bn_sync_moments_planar_##dt##_##ix, SyncMomentsParams, bn::split_reduce_planar<bn::SyncMoments, T, I, 4>) \
  BN_KERNEL(bn_sync_moments_rows_##dt##_##ix, SyncMomentsParams,                                          \
            bn::split_reduce_rows<bn::SyncMoments, T, I, bn::moments_rows_unroll<T>()>)

BN_FOR_EACH_TYPE(BN_SYNC_ENTRIES)
BN_KERNEL(bn_sync_merge, SyncMergeParams, bn::sync_merge)
BN_KERNEL(bn_sync_coefficients, SyncCoefficientsParams, bn::sync_coefficients)
