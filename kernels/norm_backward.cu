// norm_backward.cu: the backward of group, layer, instance and RMS normalization (norm_rows.cuh).
//
// With dz = dy * epilogue'(z) (z = xhat * weight + bias recomputed), g = dz * weight and
// xhat = ((x - hi) - lo) * rstd from the saved statistics:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) over each row (no mean(g) for RMS norm;
//   dx = g * rstd with constant_stats, the running statistics of an eval instance norm);
//   dweight[c] = sum(dz * xhat), dbias[c] = sum(dz) over the values of channel c.
//
// norm_backward_row_<dt>    grid (min(rows, 2^31 - 1)), block 256: one block per row, ONE launch:
//   the two row sums (block reduction), then dx over the row.
// norm_backward_split_<dt>  grid (rows, splits), block 256: partial sums of a chunk to
//   partials[(r * splits + s) * 2].
// norm_dx_split_<dt>        grid (rows, splits), block 256: each block merges its row's partials
//   in a fixed order (threads: splits t, t + 256, ..., then the block tree), then writes dx
//   over its chunk.
// norm_param_grads_<dt>     grid (ceil(C / 32)), block (32, 8): thread column tx owns channel
//   blockIdx.x * 32 + tx (adjacent channels: coalesced for layer norm), the 8 rows of threads
//   stride over its N * S values; the 8 partial sums are added in order. dweight / dbias are
//   written (=) or accumulated (+=), each nullable.
#include "norm_rows.cuh"

struct NormBackwardParams {
  const void* x;
  const void* dy;
  void* dx;              // nullable in norm_param_grads only
  const float* weight;   // nullable: 1
  const float* bias;     // nullable: 0 (read for the SiLU epilogue)
  const float* mean;     // [rows]
  const float* mean_lo;
  const float* rstd;
  float* dweight;   // norm_param_grads, nullable
  float* dbias;     // norm_param_grads, nullable
  float* partials;  // split kernels: [rows][splits][2]
  NormShape shape;
  int epilogue;
  int splits;
  int constant_stats;
  int accumulate;
};

namespace bn {
namespace norm {

__device__ __forceinline__ RowStats saved(const NormBackwardParams& p, u64 row) {
  RowStats st;
  st.hi = p.mean[row];
  st.lo = p.mean_lo[row];
  st.rstd = p.rstd[row];
  st.var = 0.f;
  return st;
}

// xhat, dz and g of element i (channel c).
struct Terms {
  float xhat, dz, g;
};

template <typename T>
__device__ __forceinline__ Terms terms(const NormBackwardParams& p, u64 i, u64 c, const RowStats& st) {
  Terms t;
  t.xhat = xhat(Dtype<T>::to_f(static_cast<const Raw<T>*>(p.x)[i]), st);
  const float w = load_or(p.weight, c, 1.f);
  t.dz = Dtype<T>::to_f(static_cast<const Raw<T>*>(p.dy)[i]);
  if (p.epilogue != kNone) t.dz *= epilogue_slope(p.epilogue, fmaf(t.xhat, w, load_or(p.bias, c, 0.f)));
  t.g = t.dz * w;
  return t;
}

// This thread's sums of g and g * xhat over [e0, e1) of a row.
template <typename T>
__device__ __forceinline__ Sums2<1> row_sums(const NormBackwardParams& p, u64 row, u64 e0, u64 e1,
                                             const RowStats& st) {
  Sums2<1> acc = Sums2<1>::empty();
  RowWalk w = walk(p.shape, row, e0 + threadIdx.x, blockDim.x);
  for (u64 e = e0 + threadIdx.x; e < e1; e += blockDim.x, w.advance()) {
    const Terms t = terms<T>(p, w.addr(), w.channel(), st);
    acc.a(0) += t.g;
    acc.b(0) = fmaf(t.g, t.xhat, acc.b(0));
  }
  return acc;
}

// dx over [e0, e1) of a row: rstd * (g - mean_g - xhat * mean_gx).
template <typename T>
__device__ __forceinline__ void dx_range(const NormBackwardParams& p, u64 row, u64 e0, u64 e1, const RowStats& st,
                                         float mean_g, float mean_gx) {
  RowWalk w = walk(p.shape, row, e0 + threadIdx.x, blockDim.x);
  for (u64 e = e0 + threadIdx.x; e < e1; e += blockDim.x, w.advance()) {
    const u64 i = w.addr();
    const Terms t = terms<T>(p, i, w.channel(), st);
    static_cast<Raw<T>*>(p.dx)[i] = Dtype<T>::from_f(st.rstd * ((t.g - mean_g) - t.xhat * mean_gx));
  }
}

// The row means of g (0 for RMS norm) and g * xhat from the row's sums.
__device__ __forceinline__ void row_means(const NormBackwardParams& p, const Sums2<1>& s, float* bc) {
  const float len = (float)row_len(p.shape);
  bc[0] = p.shape.centered ? s.a(0) / len : 0.f;
  bc[1] = s.b(0) / len;
}

template <typename T> __device__ __forceinline__ void backward_row(const NormBackwardParams& p) {
  __shared__ float red[Sums2<1>::NF * kWarps];
  __shared__ float bc[2];
  const u64 n_rows = rows(p.shape), len = row_len(p.shape);
  for (u64 row = blockIdx.x; row < n_rows; row += gridDim.x) {
    const RowStats st = saved(p, row);
    if (p.constant_stats) {
      dx_range<T>(p, row, 0, len, st, 0.f, 0.f);
      continue;
    }
    Sums2<1> s = row_sums<T>(p, row, 0, len, st);
    s = block_reduce(s, red);
    if (threadIdx.x == 0) row_means(p, s, bc);
    __syncthreads();
    dx_range<T>(p, row, 0, len, st, bc[0], bc[1]);
    __syncthreads();  // red and bc are reused by the next row
  }
}

template <typename T> __device__ __forceinline__ void backward_split(const NormBackwardParams& p) {
  __shared__ float red[Sums2<1>::NF * kWarps];
  const u64 row = blockIdx.x, split = blockIdx.y;
  u64 e0, e1;
  split_range(row_len(p.shape), split, p.splits, e0, e1);
  Sums2<1> s = row_sums<T>(p, row, e0, e1, saved(p, row));
  s = block_reduce(s, red);
  if (threadIdx.x == 0) {
    float* out = p.partials + (row * p.splits + split) * Sums2<1>::NF;
    out[0] = s.a(0);
    out[1] = s.b(0);
  }
}

template <typename T> __device__ __forceinline__ void dx_split(const NormBackwardParams& p) {
  __shared__ float red[Sums2<1>::NF * kWarps];
  __shared__ float bc[2];
  const u64 row = blockIdx.x, split = blockIdx.y;
  // The whole block sums the row's partials (thread t: splits t, t + 256, ..., then the block
  // tree), in the same order in every block of the row.
  Sums2<1> s = Sums2<1>::empty();
  const float* in = p.partials + row * p.splits * Sums2<1>::NF;
  for (int k = threadIdx.x; k < p.splits; k += kThreads) {
    s.a(0) += in[k * Sums2<1>::NF];
    s.b(0) += in[k * Sums2<1>::NF + 1];
  }
  s = block_reduce(s, red);
  if (threadIdx.x == 0) row_means(p, s, bc);
  __syncthreads();
  u64 e0, e1;
  split_range(row_len(p.shape), split, p.splits, e0, e1);
  dx_range<T>(p, row, e0, e1, saved(p, row), bc[0], bc[1]);
}

template <typename T> __device__ __forceinline__ void param_grads(const NormBackwardParams& p) {
  constexpr int kCols = 32, kLanes = 8;
  __shared__ float red[2][kLanes][kCols];
  const NormShape& s = p.shape;
  const u64 c = (u64)blockIdx.x * kCols + threadIdx.x, S = s.spatial, C = s.channels;
  float dw = 0.f, db = 0.f;
  if (c < C) {
    const u64 k = cpg(s), g = udiv(c, k), count = s.batch * S;
    // Value m = (n, sp) of channel c, m = ty, ty + 8, ...: n and sp carried, not divided.
    u64 n = udiv(threadIdx.y, S), sp = threadIdx.y - n * S;
    const u64 step_n = udiv(kLanes, S), step_sp = kLanes - step_n * S;
    for (u64 m = threadIdx.y; m < count; m += kLanes) {
      const u64 i = contiguous(s) ? (n * C + c) * S + sp : (n * S + sp) * C + c;
      const Terms t = terms<T>(p, i, c, saved(p, n * s.groups + g));
      dw = fmaf(t.dz, t.xhat, dw);
      db += t.dz;
      n += step_n;
      sp += step_sp;
      if (sp >= S) {
        sp -= S;
        ++n;
      }
    }
  }
  red[0][threadIdx.y][threadIdx.x] = dw;
  red[1][threadIdx.y][threadIdx.x] = db;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int l = 1; l < kLanes; ++l) {
      dw += red[0][l][threadIdx.x];
      db += red[1][l][threadIdx.x];
    }
    if (p.dweight) p.dweight[c] = p.accumulate ? p.dweight[c] + dw : dw;
    if (p.dbias) p.dbias[c] = p.accumulate ? p.dbias[c] + db : db;
  }
}

}  // namespace norm
}  // namespace bn

#define NORM_BACKWARD_ENTRIES(dt, T)                                                             \
  BN_KERNEL(norm_backward_row_##dt, NormBackwardParams, bn::norm::backward_row<T>)               \
  BN_KERNEL(norm_backward_split_##dt, NormBackwardParams, bn::norm::backward_split<T>)           \
  BN_KERNEL(norm_dx_split_##dt, NormBackwardParams, bn::norm::dx_split<T>)                       \
  BN_KERNEL(norm_param_grads_##dt, NormBackwardParams, bn::norm::param_grads<T>)

NORM_FOR_EACH_TYPE(NORM_BACKWARD_ENTRIES)
