// norm_backward.cu: the backward of group, layer, instance and RMS normalization (norm_rows.cuh).
//
// With dz = dy * epilogue'(z) (z = xhat * weight + bias recomputed), g = dz * weight and
// xhat = ((x - hi) - lo) * rstd from the saved statistics:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) over each row (no mean(g) for RMS norm;
//   dx = g * rstd with constant_stats, the running statistics of an eval instance norm);
//   dweight[c] = sum(dz * xhat), dbias[c] = sum(dz) over the values of channel c.
//
// norm_backward_row_<dt>    grid (min(rows, 2^31 - 1)), block 256: one block per row, ONE launch:
//   the two row sums (block reduction), then dx over the row. A row of up to 4096 values is read
//   once and kept in registers (16 x and 16 dy values per thread, 16-byte loads where the row
//   allows); a longer one is read again for dx.
// norm_backward_split_<dt>  grid (rows, splits), block 256: partial sums of a chunk to
//   partials[(r * splits + s) * 2].
// norm_dx_split_<dt>        grid (rows, splits), block 256: each block merges its row's partials
//   in a fixed order (threads: splits t, t + 256, ..., then the block tree), then writes dx
//   over its chunk.
// norm_param_grads_<dt>     dweight[c] and dbias[c] over channel c's N * S values m = n*S + sp,
//   cut into grid.y = splits ranges (enough blocks to fill the GPU: the host's param plan).
//   Planes (channels-first with S > 1: group, instance norm): grid (C, splits), block 256,
//   block (c, s) walks range s of channel c along its planes (coalesced), block tree.
//   Otherwise (layer / RMS norm, channels-last): grid (ceil(C / 32), splits), block (32, 8),
//   thread column tx owns channel blockIdx.x * 32 + tx (adjacent channels: coalesced), its 8
//   rows of threads stride over range s, their sums added in order.
//   One split: dweight / dbias written (=) or accumulated (+=), each nullable; else the sums go
//   to partials[(c * splits + s) * 2] and
// norm_param_grads_merge    grid (ceil(C / 256)), block 256: thread c adds its partials in split
//   order, then writes dweight / dbias as above.
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

// From the values x and dy, the channel's weight w and bias b (read by the epilogue only).
__device__ __forceinline__ Terms terms_of(const NormBackwardParams& p, float x, float dy, float w, float b,
                                          const RowStats& st) {
  Terms t;
  t.xhat = xhat(x, st);
  t.dz = dy;
  if (p.epilogue != kNone) t.dz *= epilogue_slope(p.epilogue, fmaf(t.xhat, w, b));
  t.g = t.dz * w;
  return t;
}

// The loads of walk_grouped's slots (raw x and dy), and their terms when used.
template <typename T> struct XDyLoads {
  const NormBackwardParams& p;
  RowStats st;
  Raw<T> xr[kInFlight], dyr[kInFlight];
  __device__ __forceinline__ XDyLoads(const NormBackwardParams& p_, const RowStats& st_) : p(p_), st(st_) {}
  __device__ __forceinline__ void load(int j, u64 i) {
    xr[j] = static_cast<const Raw<T>*>(p.x)[i];
    dyr[j] = static_cast<const Raw<T>*>(p.dy)[i];
  }
  __device__ __forceinline__ Terms terms(int j, u64 c) const {
    const float b = p.epilogue != kNone ? load_or(p.bias, c, 0.f) : 0.f;
    return terms_of(p, Dtype<T>::to_f(xr[j]), Dtype<T>::to_f(dyr[j]), load_or(p.weight, c, 1.f), b, st);
  }
};

// This thread's sums of g and g * xhat over [e0, e1) of a row.
template <typename T> struct RowSums : XDyLoads<T> {
  Sums2<1> acc;
  __device__ __forceinline__ RowSums(const NormBackwardParams& p, const RowStats& st)
      : XDyLoads<T>(p, st), acc(Sums2<1>::empty()) {}
  __device__ __forceinline__ void use(int j, u64, u64 c) {
    const Terms t = this->terms(j, c);
    acc.a(0) += t.g;
    acc.b(0) = fmaf(t.g, t.xhat, acc.b(0));
  }
};

template <typename T>
__device__ __forceinline__ Sums2<1> row_sums(const NormBackwardParams& p, u64 row, u64 e0, u64 e1,
                                             const RowStats& st) {
  RowSums<T> f(p, st);
  walk_grouped(p.shape, row, e0 + threadIdx.x, blockDim.x, e1, f);
  return f.acc;
}

// dx over [e0, e1) of a row: rstd * (g - mean_g - xhat * mean_gx).
template <typename T> struct RowDx : XDyLoads<T> {
  float mean_g, mean_gx;
  __device__ __forceinline__ RowDx(const NormBackwardParams& p, const RowStats& st, float mean_g_, float mean_gx_)
      : XDyLoads<T>(p, st), mean_g(mean_g_), mean_gx(mean_gx_) {}
  __device__ __forceinline__ void use(int j, u64 i, u64 c) {
    const Terms t = this->terms(j, c);
    const float dx = this->st.rstd * ((t.g - mean_g) - t.xhat * mean_gx);
    static_cast<Raw<T>*>(this->p.dx)[i] = Dtype<T>::from_f(dx);
  }
};

template <typename T>
__device__ __forceinline__ void dx_range(const NormBackwardParams& p, u64 row, u64 e0, u64 e1, const RowStats& st,
                                         float mean_g, float mean_gx) {
  RowDx<T> f(p, st, mean_g, mean_gx);
  walk_grouped(p.shape, row, e0 + threadIdx.x, blockDim.x, e1, f);
}

// The row means of g (0 for RMS norm) and g * xhat.
struct RowMeans {
  float g, gx;
};

// The row means from every thread's sums s: reduced over the block, formed by thread 0 and
// handed to every thread through bc. Zero with constant_stats (dx = g * rstd: nothing reduced).
__device__ __forceinline__ RowMeans block_row_means(const NormBackwardParams& p, const Sums2<1>& s, float* red,
                                                    float* bc) {
  if (p.constant_stats) return RowMeans{0.f, 0.f};
  const Sums2<1> t = block_reduce(s, red);
  if (threadIdx.x == 0) {
    const float len = (float)row_len(p.shape);
    bc[0] = p.shape.centered ? t.a(0) / len : 0.f;
    bc[1] = t.b(0) / len;
  }
  __syncthreads();
  return RowMeans{bc[0], bc[1]};
}

// One row held in registers (len <= 256 * kHeld): x and dy loaded once, the row sums and dx
// formed from the registers. V: 16-byte loads and stores (held_vec_shape, aligned buffers).
template <typename T, bool V>
__device__ __forceinline__ void held_backward_row(const NormBackwardParams& p, u64 row, u64 len, float* red,
                                                  float* bc) {
  const NormShape& sh = p.shape;
  const RowStats st = saved(p, row);
  float xh[kHeld], g[kHeld];  // x and dy as loaded, then xhat and g
  const int cnt = load_held<T, V>(sh, row, len, p.x, p.dy, xh, g);
  Sums2<1> s = Sums2<1>::empty();
  for_held<T, V>(sh, row, cnt, [&](int k, u64 c) {
    const float b = p.epilogue != kNone ? load_or(p.bias, c, 0.f) : 0.f;
    const Terms t = terms_of(p, xh[k], g[k], load_or(p.weight, c, 1.f), b, st);
    xh[k] = t.xhat;
    g[k] = t.g;
    s.a(0) += t.g;
    s.b(0) = fmaf(t.g, t.xhat, s.b(0));
  });
  const RowMeans m = block_row_means(p, s, red, bc);
  float dx[kHeld];
#pragma unroll
  for (int k = 0; k < kHeld; ++k) dx[k] = st.rstd * ((g[k] - m.g) - xh[k] * m.gx);
  store_held<T, V>(sh, row, len, cnt, p.dx, dx);
}

template <typename T> __device__ __forceinline__ void backward_row(const NormBackwardParams& p) {
  __shared__ float red[Sums2<1>::NF * kWarps];
  __shared__ float bc[2];
  const u64 n_rows = rows(p.shape), len = row_len(p.shape);
  const bool held = len <= (u64)kThreads * kHeld;  // uniform over the grid
  const bool vec = held && held_vec_shape<T>(p.shape, len) && aligned16(p.x) && aligned16(p.dy) && aligned16(p.dx);
  for (u64 row = blockIdx.x; row < n_rows; row += gridDim.x) {
    if (vec) {
      held_backward_row<T, true>(p, row, len, red, bc);
    } else if (held) {
      held_backward_row<T, false>(p, row, len, red, bc);
    } else {
      const RowStats st = saved(p, row);
      const Sums2<1> s = p.constant_stats ? Sums2<1>::empty() : row_sums<T>(p, row, 0, len, st);
      const RowMeans m = block_row_means(p, s, red, bc);
      dx_range<T>(p, row, 0, len, st, m.g, m.gx);
    }
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
  const RowMeans m = block_row_means(p, s, red, bc);
  u64 e0, e1;
  split_range(row_len(p.shape), split, p.splits, e0, e1);
  dx_range<T>(p, row, e0, e1, saved(p, row), m.g, m.gx);
}

// Whether the parameter gradients walk planes (channel values contiguous along S) or columns.
__device__ __forceinline__ bool param_planes(const NormShape& s) { return contiguous(s) && s.spatial > 1; }

// One thread's sums of dz * xhat and dz over channel c's values m = first, first + step, ... < m1,
// in that order: groups of kInFlight whose loads are all issued before any is used, then the
// rest one by one. Value m = (n, sp) is at n * S*C + sp * stride + base (carried, not divided).
template <typename T>
__device__ __forceinline__ Sums2<1> channel_sums(const NormBackwardParams& p, u64 c, u64 first, u64 step, u64 m1) {
  constexpr int U = kInFlight;
  const NormShape& s = p.shape;
  const u64 S = s.spatial, C = s.channels, g = udiv(c, cpg(s));
  const u64 stride = contiguous(s) ? 1 : C, base = contiguous(s) ? c * S : c;
  const Raw<T>* x = static_cast<const Raw<T>*>(p.x);
  const Raw<T>* dy = static_cast<const Raw<T>*>(p.dy);
  const float w = load_or(p.weight, c, 1.f), b = load_or(p.bias, c, 0.f);
  u64 n = udiv(first, S), sp = first - n * S;
  const u64 step_n = udiv(step, S), step_sp = step - step_n * S;
  // The next value's offset and row; moves (n, sp) on by step.
  auto next = [&](u64& row) {
    const u64 i = n * (S * C) + sp * stride + base;
    row = n * s.groups + g;
    sp += step_sp;
    const bool carry = sp >= S;
    sp -= carry ? S : 0;
    n += step_n + (carry ? 1 : 0);
    return i;
  };
  Sums2<1> acc = Sums2<1>::empty();
  auto add = [&](Raw<T> xr, Raw<T> dyr, u64 row) {
    const Terms t = terms_of(p, Dtype<T>::to_f(xr), Dtype<T>::to_f(dyr), w, b, saved(p, row));
    acc.a(0) = fmaf(t.dz, t.xhat, acc.a(0));
    acc.b(0) += t.dz;
  };
  u64 m = first;
  for (; m + (U - 1) * step < m1; m += U * step) {
    Raw<T> xr[U], dyr[U];
    u64 row[U];
#pragma unroll
    for (int j = 0; j < U; ++j) {
      const u64 i = next(row[j]);
      xr[j] = x[i];
      dyr[j] = dy[i];
    }
#pragma unroll
    for (int j = 0; j < U; ++j) add(xr[j], dyr[j], row[j]);
  }
  for (; m < m1; m += step) {
    u64 row;
    const u64 i = next(row);
    add(x[i], dy[i], row);
  }
  return acc;
}

__device__ __forceinline__ void write_param_grads(const NormBackwardParams& p, u64 c, float dw, float db) {
  if (p.dweight) p.dweight[c] = p.accumulate ? p.dweight[c] + dw : dw;
  if (p.dbias) p.dbias[c] = p.accumulate ? p.dbias[c] + db : db;
}

// Channel c's sums over this block's range: the result with one split, else its partial.
__device__ __forceinline__ void finish_param_grads(const NormBackwardParams& p, u64 c, const Sums2<1>& t) {
  if (p.splits == 1) {
    write_param_grads(p, c, t.a(0), t.b(0));
  } else {
    float* out = p.partials + (c * (u64)p.splits + blockIdx.y) * 2;
    out[0] = t.a(0);
    out[1] = t.b(0);
  }
}

template <typename T> __device__ __forceinline__ void param_grads(const NormBackwardParams& p) {
  const NormShape& s = p.shape;
  u64 m0, m1;
  split_range(s.batch * s.spatial, blockIdx.y, p.splits, m0, m1);
  if (param_planes(s)) {
    __shared__ float red[Sums2<1>::NF * kWarps];
    const u64 c = blockIdx.x;
    const Sums2<1> t = block_reduce(channel_sums<T>(p, c, m0 + threadIdx.x, kThreads, m1), red);
    if (threadIdx.x == 0) finish_param_grads(p, c, t);
    return;
  }
  constexpr int kCols = 32, kLanes = 8;
  __shared__ float red[2][kLanes][kCols];
  const u64 c = (u64)blockIdx.x * kCols + threadIdx.x;
  Sums2<1> t = Sums2<1>::empty();
  if (c < s.channels) t = channel_sums<T>(p, c, m0 + threadIdx.y, kLanes, m1);
  red[0][threadIdx.y][threadIdx.x] = t.a(0);
  red[1][threadIdx.y][threadIdx.x] = t.b(0);
  __syncthreads();
  if (threadIdx.y == 0 && c < s.channels) {
    for (int l = 1; l < kLanes; ++l) {
      t.a(0) += red[0][l][threadIdx.x];
      t.b(0) += red[1][l][threadIdx.x];
    }
    finish_param_grads(p, c, t);
  }
}

__device__ __forceinline__ void param_grads_merge(const NormBackwardParams& p) {
  const u64 c = (u64)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= p.shape.channels) return;
  const float* in = p.partials + c * (u64)p.splits * 2;
  float dw = 0.f, db = 0.f;
  for (int k = 0; k < p.splits; ++k) {
    dw += in[2 * k];
    db += in[2 * k + 1];
  }
  write_param_grads(p, c, dw, db);
}

}  // namespace norm
}  // namespace bn

#define NORM_BACKWARD_ENTRIES(dt, T)                                                             \
  BN_KERNEL(norm_backward_row_##dt, NormBackwardParams, bn::norm::backward_row<T>)               \
  BN_KERNEL(norm_backward_split_##dt, NormBackwardParams, bn::norm::backward_split<T>)           \
  BN_KERNEL(norm_dx_split_##dt, NormBackwardParams, bn::norm::dx_split<T>)                       \
  BN_KERNEL(norm_param_grads_##dt, NormBackwardParams, bn::norm::param_grads<T>)

NORM_FOR_EACH_TYPE(NORM_BACKWARD_ENTRIES)
BN_KERNEL(norm_param_grads_merge, NormBackwardParams, bn::norm::param_grads_merge)
