// norm_forward.cu: the forward of group, layer, instance and RMS normalization (norm_rows.cuh).
//
// norm_forward_row_<dt>   grid (min(rows, 2^31 - 1)), block 256: one block per row (rows
//   strided by gridDim.x), ONE launch: the row's statistics (Welford, block reduction), then
//   y = epilogue(xhat * weight + bias) over the row. A row of up to 4096 values (transformer
//   layer/RMS norm) is read once and kept in registers (16 per thread); a longer one is read
//   again for the normalize (from L1/L2 when it fits). Used for rows up to 8192 values and
//   whenever there are enough rows to fill the GPU. With stats_given the statistics are read (running statistics of an eval
//   instance norm, norm_running_rows) and nothing is reduced.
// norm_stats_split_<dt>   grid (rows, splits), block 256: split s of row r reduces its chunk to a
//   partial (count, mean of h - pivot, m2) in partials[(r * splits + s) * 3].
// norm_apply_split_<dt>   grid (rows, splits), block 256: every block merges its row's partials
//   in a fixed order (its 256 threads: splits t, t + 256, ..., then the block tree; the same
//   merge everywhere: deterministic), block (r, 0) writes the
//   statistics, each block normalizes its chunk. For long rows (group norm on large images).
// norm_running_rows       grid (ceil(rows / 256)), block 256: per-row statistics of an eval
//   instance norm from the running ones: mean = running_mean[c], rstd = 1/sqrt(running_var + eps).
// norm_running_update     grid (ceil(C / 256)), block 256: instance norm's running update from
//   the batch average of the per-instance means and unbiased variances, in double, rounded once.
#include "norm_rows.cuh"

struct NormForwardParams {
  const void* x;
  const void* residual;  // nullable: normalize x + residual, written to sum
  void* sum;
  void* y;
  const float* weight;  // nullable: 1
  const float* bias;    // nullable: 0
  float* mean;          // [rows] saved (or, with stats_given, read) statistics
  float* mean_lo;
  float* rstd;
  float* row_var;   // nullable: the biased variance of every row (instance running update)
  float* partials;  // split kernels: [rows][splits][3]
  NormShape shape;
  float eps;
  int epilogue;
  int splits;
  int stats_given;
};

struct NormRunningParams {
  float* running_mean;  // [C]: read by norm_running_rows, updated by norm_running_update
  float* running_var;
  float* mean;  // [rows]
  float* mean_lo;
  float* rstd;
  const float* row_var;
  NormShape shape;
  float eps;
  float momentum;
};

namespace bn {
namespace norm {

__device__ __forceinline__ void store_stats(const NormForwardParams& p, u64 row, const RowStats& st) {
  p.mean[row] = st.hi;
  p.mean_lo[row] = st.lo;
  p.rstd[row] = st.rstd;
  if (p.row_var) p.row_var[row] = st.var;
}

__device__ __forceinline__ RowStats given_stats(const NormForwardParams& p, u64 row) {
  RowStats st;
  st.hi = p.mean[row];
  st.lo = p.mean_lo[row];
  st.rstd = p.rstd[row];
  st.var = 0.f;
  return st;
}

// y (and the residual sum) of element i (channel c) whose input is h.
template <typename T>
__device__ __forceinline__ void store(const NormForwardParams& p, u64 i, u64 c, float h, const RowStats& st) {
  if (p.sum) static_cast<Raw<T>*>(p.sum)[i] = Dtype<T>::from_f(h);
  const float z = fmaf(xhat(h, st), load_or(p.weight, c, 1.f), load_or(p.bias, c, 0.f));
  static_cast<Raw<T>*>(p.y)[i] = Dtype<T>::from_f(epilogue(p.epilogue, z));
}

// y (and the residual sum) over elements [e0, e1) of a row.
template <typename T> struct Apply : HLoads<T> {
  const NormForwardParams& p;
  RowStats st;
  __device__ __forceinline__ Apply(const NormForwardParams& p_, const RowStats& st_)
      : HLoads<T>(p_.x, p_.residual), p(p_), st(st_) {}
  __device__ __forceinline__ void use(int j, u64 i, u64 c) { store<T>(p, i, c, this->h(j), st); }
};

template <typename T> __device__ __forceinline__ void apply(const NormForwardParams& p, u64 row, u64 e0, u64 e1,
                                                             const RowStats& st) {
  Apply<T> f(p, st);
  walk_grouped(p.shape, row, e0 + threadIdx.x, blockDim.x, e1, f);
}

__device__ __forceinline__ void park(float* bc, const RowStats& st) {
  bc[0] = st.hi;
  bc[1] = st.lo;
  bc[2] = st.rstd;
}

__device__ __forceinline__ RowStats unpark(const float* bc) {
  RowStats st;
  st.hi = bc[0];
  st.lo = bc[1];
  st.rstd = bc[2];
  st.var = 0.f;
  return st;
}

// The row's statistics from every thread's state s: reduced over the block, written by thread 0
// and handed to every thread through bc.
__device__ __forceinline__ RowStats row_stats(const NormForwardParams& p, u64 row, const Welford<1>& s, float pivot,
                                              float* red, float* bc) {
  const Welford<1> t = block_reduce(s, red);
  if (threadIdx.x == 0) {
    const RowStats st = finalize(t, pivot, p.eps, p.shape.centered);
    store_stats(p, row, st);
    park(bc, st);
  }
  __syncthreads();
  return unpark(bc);
}

// The held row's 16-byte path also needs every buffer 16-byte aligned. Uniform over the grid.
template <typename T> __device__ __forceinline__ bool held_vec_ok(const NormForwardParams& p, u64 len) {
  return held_vec_shape<T>(p.shape, len) && aligned16(p.x) && aligned16(p.y) &&
         (p.residual == nullptr || (aligned16(p.residual) && aligned16(p.sum)));
}

// One row held in registers (len <= 256 * kHeld): loaded whole, its statistics formed from the
// thread's values at once (vec_welford), then normalized from the registers.
template <typename T, bool V>
__device__ __forceinline__ void held_row(const NormForwardParams& p, u64 row, u64 len, float* red, float* bc) {
  const NormShape& sh = p.shape;
  const float pivot = row_pivot<T>(sh, p.x, p.residual, row);
  float h[kHeld], r[kHeld];
  const int cnt = load_held<T, V>(sh, row, len, p.x, p.residual, h, r);
  float v[kHeld];
#pragma unroll
  for (int k = 0; k < kHeld; ++k) {
    if (p.residual) h[k] = Dtype<T>::to_f(Dtype<T>::from_f(h[k] + r[k]));  // x + residual, rounded to T
    v[k] = sh.centered ? h[k] - pivot : h[k] * h[k];
  }
  const RowStats st = row_stats(p, row, cnt > 0 ? vec_welford(v, cnt) : Welford<1>::empty(), pivot, red, bc);
  float y[kHeld] = {};
  for_held<T, V>(sh, row, cnt, [&](int k, u64 c) {
    const float z = fmaf(xhat(h[k], st), load_or(p.weight, c, 1.f), load_or(p.bias, c, 0.f));
    y[k] = epilogue(p.epilogue, z);
  });
  store_held<T, V>(sh, row, len, cnt, p.y, y);
  if (p.sum) store_held<T, V>(sh, row, len, cnt, p.sum, h);
}

template <typename T> __device__ __forceinline__ void forward_row(const NormForwardParams& p) {
  __shared__ float red[Welford<1>::NF * kWarps];
  __shared__ float bc[3];
  const u64 n_rows = rows(p.shape), len = row_len(p.shape);
  const bool held = len <= (u64)kThreads * kHeld;  // uniform over the grid
  const bool vec = held && held_vec_ok<T>(p, len);
  for (u64 row = blockIdx.x; row < n_rows; row += gridDim.x) {
    if (p.stats_given) {
      apply<T>(p, row, 0, len, given_stats(p, row));
    } else if (vec) {
      held_row<T, true>(p, row, len, red, bc);
    } else if (held) {
      held_row<T, false>(p, row, len, red, bc);
    } else {
      const float pivot = row_pivot<T>(p.shape, p.x, p.residual, row);
      const Welford<1> s = row_moments<T>(p.shape, p.x, p.residual, row, 0, len, pivot);
      apply<T>(p, row, 0, len, row_stats(p, row, s, pivot, red, bc));
    }
    __syncthreads();  // red and bc are reused by the next row
  }
}

template <typename T> __device__ __forceinline__ void stats_split(const NormForwardParams& p) {
  __shared__ float red[Welford<1>::NF * kWarps];
  const u64 row = blockIdx.x, split = blockIdx.y;
  u64 e0, e1;
  split_range(row_len(p.shape), split, p.splits, e0, e1);
  const float pivot = row_pivot<T>(p.shape, p.x, p.residual, row);
  Welford<1> s = row_moments<T>(p.shape, p.x, p.residual, row, e0, e1, pivot);
  s = block_reduce(s, red);
  if (threadIdx.x == 0) {
    float* out = p.partials + (row * p.splits + split) * Welford<1>::NF;
#pragma unroll
    for (int i = 0; i < Welford<1>::NF; ++i) out[i] = s.v[i];
  }
}

template <typename T> __device__ __forceinline__ void apply_split(const NormForwardParams& p) {
  __shared__ float red[Welford<1>::NF * kWarps];
  __shared__ float bc[3];
  const u64 row = blockIdx.x, split = blockIdx.y;
  if (p.stats_given) {
    if (threadIdx.x == 0) park(bc, given_stats(p, row));
  } else {
    // The whole block merges the row's partials: thread t takes splits t, t + 256, ... in order
    // (at most ceil(splits / 256) one after another), then the block tree; every block of the
    // row merges in the same order, so they agree bit for bit.
    Welford<1> s = Welford<1>::empty();
    const float* in = p.partials + row * p.splits * Welford<1>::NF;
    for (int k = threadIdx.x; k < p.splits; k += kThreads) {
      Welford<1> t;
#pragma unroll
      for (int i = 0; i < Welford<1>::NF; ++i) t.v[i] = in[k * Welford<1>::NF + i];
      s = Welford<1>::merge(s, t);
    }
    s = block_reduce(s, red);
    if (threadIdx.x == 0) {
      const RowStats st = finalize(s, row_pivot<T>(p.shape, p.x, p.residual, row), p.eps, p.shape.centered);
      if (split == 0) store_stats(p, row, st);
      park(bc, st);
    }
  }
  __syncthreads();
  u64 e0, e1;
  split_range(row_len(p.shape), split, p.splits, e0, e1);
  apply<T>(p, row, e0, e1, unpark(bc));
}

__device__ __forceinline__ void running_rows(const NormRunningParams& p) {
  const u64 row = (u64)blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= rows(p.shape)) return;
  const u64 c = row - udiv(row, p.shape.channels) * p.shape.channels;
  p.mean[row] = p.running_mean[c];
  p.mean_lo[row] = 0.f;
  p.rstd[row] = invsqrt_rn(p.running_var[c] + p.eps);
}

__device__ __forceinline__ void running_update(const NormRunningParams& p) {
  const u64 c = (u64)blockIdx.x * blockDim.x + threadIdx.x, C = p.shape.channels, n = p.shape.batch;
  if (c >= C || n == 0) return;
  const double len = (double)row_len(p.shape), bessel = div_d(len, len - 1.0);
  double mean = 0.0, var = 0.0;
  for (u64 k = 0; k < n; ++k) {
    const u64 row = k * C + c;
    mean += (double)p.mean[row] + (double)p.mean_lo[row];
    var += (double)p.row_var[row] * bessel;
  }
  const double m = (double)p.momentum, inv_n = div_d(1.0, (double)n);
  p.running_mean[c] = (float)((1.0 - m) * (double)p.running_mean[c] + m * (mean * inv_n));
  p.running_var[c] = (float)((1.0 - m) * (double)p.running_var[c] + m * (var * inv_n));
}

}  // namespace norm
}  // namespace bn

#define NORM_FORWARD_ENTRIES(dt, T)                                                              \
  BN_KERNEL(norm_forward_row_##dt, NormForwardParams, bn::norm::forward_row<T>)                  \
  BN_KERNEL(norm_stats_split_##dt, NormForwardParams, bn::norm::stats_split<T>)                  \
  BN_KERNEL(norm_apply_split_##dt, NormForwardParams, bn::norm::apply_split<T>)

NORM_FOR_EACH_TYPE(NORM_FORWARD_ENTRIES)
BN_KERNEL(norm_running_rows, NormRunningParams, bn::norm::running_rows)
BN_KERNEL(norm_running_update, NormRunningParams, bn::norm::running_update)
