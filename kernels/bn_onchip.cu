// bn_onchip.cu: the training forward of channels-last / (N, C) tensors (inner == 1) in ONE pass
// over memory: x is read once into shared memory, y written once from it (an opt-in path: the
// split statistics + normalize passes stay the default; kernels/ABI.md).
//
// bn_onchip_rows_<dt>_<ix>  grid (ceil(C / (bx*VEC)), splits), block (bx, by), launched
//   COOPERATIVELY (every block resident: cuLaunchCooperativeKernel), with dynamic shared memory
//   for each thread's rows: slots = ceil(rows / (splits*by)) 16-byte vectors per thread, 4 KB
//   each per block.
// 1. The rows traversal of bn_stats_rows (the same threads, rows and order: thread (tx, ty) of
//    block (X, s) owns channels [c0, c0+VEC), rows ty + s*by + k*splits*by): each vector is kept
//    in the thread's slot k of shared memory and accumulated into the same shifted Welford state
//    (moments.cuh); the block's partial goes to partials[c][s], as bn_stats_rows writes it.
// 2. A grid barrier (common.cuh, grid_barrier on the workspace word `barrier`).
// 3. Every block merges all partials of its channel tile in bn_stats_rows' order (rows_merge,
//    one level up to kMergeRun*by splits; past it the blocks s < groups first merge group s into
//    partials[c][s*run], a second grid barrier, then every block merges the groups): every block
//    gets bitwise the statistics bn_stats_rows gives with the same grid and block, and block
//    (X, 0) writes save_mean, save_mean_lo, save_invstd and the running update (its finalize,
//    write_batch_stats) for the tile's channels.
// 4. Every block normalizes its slots with bn_normalize's op (normalize_op.cuh) through the
//    rows map (RowsMap, no epilogue) and writes y: bit for bit the normalize pass from those
//    statistics.
// One split: no partial and no barrier, as bn_stats_rows. x is read only before the first
// barrier (the pivots are kept in shared memory), so y may equal x. No ReLU epilogue.
// Shared memory: static (1 + 2*VEC)*256 + 3*256 floats (12 KB f32, 20 KB f16/bf16), dynamic
// slots*4 KB. Assumes bx*VEC <= 256 (launch::rows_block: bx <= 32), partials sized
// [C][splits][3] (< 2^32 floats), *barrier's low 31 bits 0 (they are again after the launch),
// rows >= 2 (host), and every block of the grid resident.
#include "moments.cuh"
#include "normalize_op.cuh"

struct OnchipParams {
  const void* x;         // T[rows*C]
  void* y;               // T[rows*C] out (may be x)
  const float* weight;   // [C], nullable (1)
  const float* bias;     // [C], nullable (0)
  float* partials;       // workspace [C][splits][3] (not touched when splits == 1)
  unsigned int* barrier; // workspace, one word (not touched when splits == 1)
  float* save_mean;      // [C] out
  float* save_mean_lo;   // [C] out, nullable
  float* save_invstd;    // [C] out
  float* running_mean;   // [C] in/out, nullable
  float* running_var;    // [C] in/out, nullable
  bn::Geometry g;
  float eps;
  float factor;
  int unbiased;
  int splits;
};
static_assert(sizeof(OnchipParams) == 128, "Rust mirrors");

namespace bn {

// Where a block's copy of its tile's statistics goes: shared memory, indexed by the channel's
// place in the tile; no running update (write_batch_stats' O).
struct TileStats {
  float* save_mean;
  float* save_mean_lo;
  float* save_invstd;
  float* running_mean;
  float* running_var;
  float eps;
  float factor;
  int unbiased;
};

template <typename T, typename I> struct OnchipLoad : MomentsAcc<OnchipParams>::RowsAcc<T, I> {
  typedef typename MomentsAcc<OnchipParams>::template RowsAcc<T, I> Base;
  uint4* slot;  // this thread's next slot: slot k at tile[k*256 + tid]
  __device__ __forceinline__ OnchipLoad(const OnchipParams& p, const RowsColumn& rc, uint4* first)
      : Base(p, rc), slot(first) {}
  template <bool V, int STEP> __device__ __forceinline__ void consume(Pack<T>& fr, const Slice<I>& s) {
    if (s.cnt <= 0) return;
    *slot = fr.u;
    slot += kThreads;
    Base::template consume<V, STEP>(fr, s);
  }
};

// The rows map fed from the slots instead of x: the same walk, so the same rows in the same order.
template <typename T, typename I> struct OnchipStore {
  typedef RowsMap<T, I, 1, NormalizeOp> Map;
  typedef typename Map::Frag Frag;
  Map map;
  const uint4* slot;
  template <bool V, int STEP> __device__ __forceinline__ void load(Frag& fr, const Slice<I>& s) {
    fr.in[0].u = make_uint4(0u, 0u, 0u, 0u);
    if (s.cnt > 0) {
      fr.in[0].u = *slot;
      slot += kThreads;
    }
  }
  template <bool V, int STEP> __device__ __forceinline__ void consume(Frag& fr, const Slice<I>& s) const {
    map.template consume<V, STEP>(fr, s);
  }
};

template <typename T, typename I> __device__ __forceinline__ void onchip_rows(const OnchipParams& p) {
  constexpr int VEC = Vec<T>::N;
  constexpr int PF = 3;
  constexpr int UNROLL = rows_unroll<T, 1>();
  typedef MomentsAcc<OnchipParams> M;
  typedef Welford<VEC> S;
  __shared__ float red[S::NF * kThreads];
  __shared__ float tile_mean[kThreads];  // the pivots, then the means (hi) of the tile's channels
  __shared__ float tile_lo[kThreads];
  __shared__ float tile_invstd[kThreads];
  extern __shared__ uint4 tile[];
  const I C = (I)p.g.channels, rows = (I)p.g.outer;
  const unsigned splits = (unsigned)p.splits, tid = threadIdx.y * blockDim.x + threadIdx.x;
  const RowsColumn rc = rows_column<T>(p.g.channels);
  const u64 tile0 = (u64)blockIdx.x * blockDim.x * VEC;  // the tile's first channel
  const unsigned at = threadIdx.x * VEC;                  // rc.c0 - tile0
  const I r0 = (I)(blockIdx.y * blockDim.y + threadIdx.y), rstride = (I)(gridDim.y * blockDim.y);

  OnchipLoad<T, I> acc(p, rc, tile + tid);
  walk_rows<T, I, UNROLL>(acc, C % (I)VEC == 0 && aligned16(p.x), rows, C, (I)rc.c0, rc.cnt, rc.cnt, r0, rstride);
  if (threadIdx.y == 0) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) tile_mean[at + k] = acc.pv[k];
  }
  S t = block_reduce_y(acc.st, red);
  if (splits > 1) {
    // bn_stats_rows' partials and merge levels (common.cuh, split_reduce_rows).
    const unsigned kstride = splits * PF, blocks = gridDim.x * gridDim.y;
    float* col = p.partials + (unsigned)rc.c0 * splits * PF;
    const unsigned run = kMergeRun * blockDim.y, groups = (splits + run - 1) / run;
    if (threadIdx.y == 0) {
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        if (k < rc.cnt) M::store_partial(col + blockIdx.y * PF + k * kstride, t, k);
    }
    grid_barrier(p.barrier, blocks);
    unsigned count = splits, step = 1;
    if (groups > 1) {
      if (blockIdx.y < groups) {
        const unsigned first = blockIdx.y * run, len = min(run, splits - first);
        const S q = rows_merge<M, S, VEC>(col, kstride, rc.cnt, first, len, 1, red);
        if (threadIdx.y == 0) {
#pragma unroll
          for (int k = 0; k < VEC; ++k)
            if (k < rc.cnt) M::store_partial(col + first * PF + k * kstride, q, k);
        }
      }
      grid_barrier(p.barrier, blocks);
      count = groups;
      step = run;
    }
    t = rows_merge<M, S, VEC>(col, kstride, rc.cnt, 0, count, step, red);
  }
  // The column results parked in red, one channel per thread (bn_stats_rows' finalize): every
  // block keeps the tile's statistics in shared memory, block (X, 0) also writes them out.
  __syncthreads();
  if (threadIdx.y == 0) {
#pragma unroll
    for (int i = 0; i < S::NF; ++i) red[i * kThreads + threadIdx.x] = t.v[i];
  }
  __syncthreads();
  const TileStats local{tile_mean, tile_lo, tile_invstd, nullptr, nullptr, p.eps, 0.f, 0};
  for (int k = threadIdx.y; k < rc.cnt; k += blockDim.y) {
    const Welford<1> s = S::channel(red + threadIdx.x, kThreads, k);
    const MeanPair mean = two_sum(tile_mean[at + k], s.mean(0));
    write_batch_stats(local, at + k, mean, s.m2(0), p.g.outer);
    if (blockIdx.y == 0) write_batch_stats(p, rc.c0 + k, mean, s.m2(0), p.g.outer);
  }
  __syncthreads();

  // The normalize of bn_normalize_rows from the tile's statistics (indexed from the tile's
  // first channel: the op is given them shifted by tile0).
  OnchipStore<T, I> out;
  out.map.in[0] = static_cast<const Raw<T>*>(p.x);
  out.map.out = static_cast<Raw<T>*>(p.y);
  out.map.op.mean = tile_mean - tile0;
  out.map.op.mean_lo = tile_lo - tile0;
  out.map.op.var_or_invstd = tile_invstd - tile0;
  out.map.op.weight = p.weight;
  out.map.op.bias = p.bias;
  out.map.op.eps = 0.f;
  out.map.op.stat_is_var = 0;
  out.map.init(rc, p.g.channels);
  out.slot = tile + tid;
  walk_rows<T, I, UNROLL>(out, C % (I)VEC == 0 && aligned16(p.y), rows, C, (I)rc.c0, rc.cnt, rc.cnt, r0, rstride);
}

}  // namespace bn

#define BN_ONCHIP_ENTRIES(dt, T, ix, I) BN_KERNEL(bn_onchip_rows_##dt##_##ix, OnchipParams, bn::onchip_rows<T, I>)

BN_FOR_EACH_TYPE(BN_ONCHIP_ENTRIES)
