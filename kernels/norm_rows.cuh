// norm_rows.cuh: the row machinery of group, layer, instance and RMS normalization (src/norms.rs).
//
// Every one of them is a tensor (N, C, S) whose channels form G groups per sample; the values of
// one (sample, group) are a ROW of L = C/G * S values with its own statistics, and the affine
// parameters are per channel. Channels-first (or S == 1) rows are contiguous: row r starts at
// r * L, as cpg runs of S values (channel = g*cpg + run). Channels-last rows are S runs of cpg
// values, C apart (channel = g*cpg + position in the run). RowWalk walks element e, e + step, ...
// of a row as (run a, position b) with one division at the start and carries after.
//
// Statistics (common.cuh's Welford, fixed-order reductions: deterministic, no atomics):
//   centered (group, instance, layer norm): Welford on h - pivot, pivot = the row's first value,
//     so the differences are exact for clustered rows (Sterbenz); the mean is kept as a
//     double-float hi + lo = pivot + mean(h - pivot) (common.cuh's MeanPair and two_sum), and
//     x - mean is formed as (x - hi) - lo everywhere (normalize, backward): rounding the mean to
//     f32 first would cost up to half an ulp of the offset times rstd (3e-5 * 10 at mean 1000,
//     std 0.1).
//   RMS norm: the mean of h^2 through the same Welford state (its m2 unused); hi = lo = 0.
//   rstd = 1 / sqrt(var + eps), bit-identical to IEEE 1.0f / sqrtf (invsqrt_rn).
// h is x, or x + residual rounded to T (the fused residual add; the sum is written by the
// normalize pass). Counts are f32: rows hold fewer than 2^24 values (checked by the host).
#pragma once
#include "common.cuh"

// The (N, C, G, S) shape of src/norms.rs's NormDesc.
struct NormShape {
  unsigned long long batch, channels, groups, spatial;
  int channels_last;  // N, S, C memory order with S > 1: strided rows
  int centered;       // 0 for RMS norm
};

namespace bn {
namespace norm {

constexpr int kNone = 0, kSilu = 1;  // NormEpilogue

__device__ __forceinline__ u64 rows(const NormShape& s) { return s.batch * s.groups; }
__device__ __forceinline__ u64 cpg(const NormShape& s) { return udiv(s.channels, s.groups); }
__device__ __forceinline__ u64 row_len(const NormShape& s) { return cpg(s) * s.spatial; }
__device__ __forceinline__ bool contiguous(const NormShape& s) { return !s.channels_last || s.spatial == 1; }

struct RowWalk {
  u64 base, stride_a, len_b, chan0;
  u64 a, b, step_a, step_b;
  bool chan_from_a;
  __device__ __forceinline__ u64 addr() const { return base + a * stride_a + b; }
  __device__ __forceinline__ u64 channel() const { return chan0 + (chan_from_a ? a : b); }
  __device__ __forceinline__ void advance() {  // selects, not a branch: loads may move across it
    b += step_b;
    const bool carry = b >= len_b;
    b -= carry ? len_b : 0;
    a += step_a + (carry ? 1 : 0);
  }
};

// Element e of row `row`, advancing by `step` elements.
__device__ __forceinline__ RowWalk walk(const NormShape& s, u64 row, u64 e, u64 step) {
  const u64 k = cpg(s), g = row - udiv(row, s.groups) * s.groups, n = udiv(row, s.groups);
  RowWalk w;
  w.chan0 = g * k;
  if (contiguous(s)) {
    w.base = row * k * s.spatial;
    w.stride_a = s.spatial;
    w.len_b = s.spatial;
    w.chan_from_a = true;
  } else {
    w.base = n * s.spatial * s.channels + g * k;
    w.stride_a = s.channels;
    w.len_b = k;
    w.chan_from_a = false;
  }
  w.a = udiv(e, w.len_b);
  w.b = e - w.a * w.len_b;
  w.step_a = udiv(step, w.len_b);
  w.step_b = step - w.step_a * w.len_b;
  return w;
}

// Values in flight per thread: the walks below load kInFlight values before they use any.
constexpr int kInFlight = 4;

// Calls f(i, c) on this thread's elements e = first, first + step, ... < e1 of a row, in order
// (i its offset, c its channel), in groups of kInFlight: load(j, i) for the whole group, then
// use(j, i, c) for each. The caller's functor keeps the loaded values in slot j.
template <class F>
__device__ __forceinline__ void walk_grouped(const NormShape& s, u64 row, u64 first, u64 step, u64 e1, F& f) {
  RowWalk w = walk(s, row, first, step);
  u64 e = first;
  for (; e + (kInFlight - 1) * step < e1; e += kInFlight * step) {
    u64 i[kInFlight], c[kInFlight];
#pragma unroll
    for (int j = 0; j < kInFlight; ++j) {
      i[j] = w.addr();
      c[j] = w.channel();
      f.load(j, i[j]);
      w.advance();
    }
#pragma unroll
    for (int j = 0; j < kInFlight; ++j) f.use(j, i[j], c[j]);
  }
  for (; e < e1; e += step, w.advance()) {
    f.load(0, w.addr());
    f.use(0, w.addr(), w.channel());
  }
}

// The loads of h (walk_grouped's N = kInFlight slots, or a block's held row): raw x [and
// residual] per slot, combined when used.
template <typename T, int N = kInFlight> struct HLoads {
  const Raw<T>* x;
  const Raw<T>* residual;  // nullable
  Raw<T> xr[N], rr[N];
  __device__ __forceinline__ HLoads(const void* x_, const void* residual_)
      : x(static_cast<const Raw<T>*>(x_)), residual(static_cast<const Raw<T>*>(residual_)) {}
  __device__ __forceinline__ void load(int j, u64 i) {
    xr[j] = x[i];
    rr[j] = residual ? residual[i] : Raw<T>(0);
  }
  __device__ __forceinline__ float h(int j) const {
    const float v = Dtype<T>::to_f(xr[j]);
    return residual ? Dtype<T>::to_f(Dtype<T>::from_f(v + Dtype<T>::to_f(rr[j]))) : v;
  }
};

// A row's statistics: mean = hi + lo (0 for RMS norm), rstd, and the biased variance (mean
// square for RMS norm).
struct RowStats {
  float hi, lo, rstd, var;
};

__device__ __forceinline__ float xhat(float h, const RowStats& st) { return ((h - st.hi) - st.lo) * st.rstd; }

__device__ __forceinline__ float sigmoid(float z) { return 1.f / (1.f + expf(-z)); }

__device__ __forceinline__ float epilogue(int kind, float z) { return kind == kSilu ? z * sigmoid(z) : z; }

// d epilogue / dz.
__device__ __forceinline__ float epilogue_slope(int kind, float z) {
  if (kind != kSilu) return 1.f;
  const float s = sigmoid(z);
  return s * fmaf(z, 1.f - s, 1.f);
}

// The statistics from a row's merged Welford state (of h - pivot, or of h^2).
static __device__ __noinline__ RowStats finalize(const Welford<1>& w, float pivot, float eps, int centered) {
  RowStats st;
  st.hi = 0.f;
  st.lo = 0.f;
  st.var = 0.f;
  if (w.n() > 0.f) {
    if (centered) {
      // hi + lo == pivot + mean(h - pivot) exactly (common.cuh's two_sum).
      const MeanPair mean = two_sum(pivot, w.mean(0));
      st.hi = mean.hi;
      st.lo = mean.lo;
      st.var = w.m2(0) / w.n();
    } else {
      st.var = w.mean(0);
    }
  }
  st.rstd = invsqrt_rn(st.var + eps);
  return st;
}

// The first value of a row (0 for an empty row): the pivot every block of the row shares.
template <typename T>
__device__ __forceinline__ float row_pivot(const NormShape& s, const void* x, const void* residual, u64 row) {
  if (row_len(s) == 0 || !s.centered) return 0.f;
  HLoads<T, 1> first(x, residual);
  first.load(0, walk(s, row, 0, 1).addr());
  return first.h(0);
}

// This thread's Welford state over elements [e0, e1) of a row (stride blockDim.x).
template <typename T> struct RowMoments : HLoads<T> {
  Welford<1> acc;
  float pivot;
  int centered;
  __device__ __forceinline__ RowMoments(const void* x, const void* residual, float pivot_, int centered_)
      : HLoads<T>(x, residual), acc(Welford<1>::empty()), pivot(pivot_), centered(centered_) {}
  __device__ __forceinline__ void use(int j, u64, u64) {
    const float h = this->h(j);
    const float v[1] = {centered ? h - pivot : h * h};
    acc = Welford<1>::merge(acc, Welford<1>::sample(v));
  }
};

template <typename T>
__device__ __forceinline__ Welford<1> row_moments(const NormShape& s, const void* x, const void* residual, u64 row,
                                                  u64 e0, u64 e1, float pivot) {
  RowMoments<T> m(x, residual, pivot, s.centered);
  walk_grouped(s, row, e0 + threadIdx.x, blockDim.x, e1, m);
  return m.acc;
}

// Values each thread keeps in registers when a whole row fits the block (rows up to 256 * kHeld
// = 4096 values: transformer layer and RMS norm): the row is loaded once, all of it before any
// value is used, and the last pass works from the registers.
constexpr int kHeld = 16;

// A thread's SLOTS of a held row. V (16-byte path): slots j*VEC .. j*VEC + VEC - 1 are vector j,
// the VEC values from element held_vector<T>(j) on; else slot k is element threadIdx.x + k*256.
// The valid slots are a prefix [0, cnt).
template <typename T> __device__ __forceinline__ u64 held_vector(int j) {
  return (threadIdx.x + (u64)j * kThreads) * Vec<T>::N;
}

// Whether a held row can take the 16-byte path: a contiguous row (channels-first, or S == 1) of
// a multiple of VEC values whose vectors lie in one channel (S % VEC == 0) or span VEC adjacent
// ones (S == 1: layer and RMS norm). The caller checks its buffers' alignment. Uniform.
template <typename T> __device__ __forceinline__ bool held_vec_shape(const NormShape& s, u64 len) {
  constexpr u64 VEC = Vec<T>::N;
  return contiguous(s) && len % VEC == 0 && (s.spatial == 1 || s.spatial % VEC == 0);
}

// This thread's slots of a held row of a and b (nullable: read as 0), as floats, every load
// issued before any value is converted; returns cnt (the invalid slots are 0).
template <typename T, bool V>
__device__ __forceinline__ int load_held(const NormShape& s, u64 row, u64 len, const void* a_, const void* b_,
                                         float (&a)[kHeld], float (&b)[kHeld]) {
  constexpr int VEC = Vec<T>::N, NV = kHeld / VEC;
  const Raw<T>* pa = static_cast<const Raw<T>*>(a_);
  const Raw<T>* pb = static_cast<const Raw<T>*>(b_);
  int cnt = 0;
  if (V) {
    Pack<T> ap[NV], bp[NV];
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const u64 e = held_vector<T>(j);
      ap[j].u = bp[j].u = make_uint4(0u, 0u, 0u, 0u);
      if (e < len) {
        ap[j].u = *reinterpret_cast<const uint4*>(pa + row * len + e);
        if (pb) bp[j].u = *reinterpret_cast<const uint4*>(pb + row * len + e);
        cnt += VEC;
      }
    }
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      float av[VEC], bv[VEC];
      unpack(ap[j], av);
      unpack(bp[j], bv);
#pragma unroll
      for (int q = 0; q < VEC; ++q) {
        a[j * VEC + q] = av[q];
        b[j * VEC + q] = bv[q];
      }
    }
  } else {
    Raw<T> ar[kHeld], br[kHeld];
    RowWalk w = walk(s, row, threadIdx.x, kThreads);
#pragma unroll
    for (int k = 0; k < kHeld; ++k) {
      ar[k] = br[k] = Raw<T>(0);
      const bool valid = threadIdx.x + (u64)k * kThreads < len;
      if (valid) {
        ar[k] = pa[w.addr()];
        if (pb) br[k] = pb[w.addr()];
      }
      cnt += valid ? 1 : 0;
      w.advance();
    }
#pragma unroll
    for (int k = 0; k < kHeld; ++k) {
      a[k] = Dtype<T>::to_f(ar[k]);
      b[k] = Dtype<T>::to_f(br[k]);
    }
  }
  return cnt;
}

// Calls f(k, c) for this thread's valid slots k of a held row, in order (c: slot k's channel).
template <typename T, bool V, class F>
__device__ __forceinline__ void for_held(const NormShape& s, u64 row, int cnt, F&& f) {
  constexpr int VEC = Vec<T>::N, NV = kHeld / VEC;
  if (V) {
    const u64 chan0 = (row - udiv(row, s.groups) * s.groups) * cpg(s);
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      if (j * VEC >= cnt) break;
      const u64 e = held_vector<T>(j);
      // S == 1: the vector spans VEC channels; else it lies in one (S % VEC == 0).
      const u64 c0 = s.spatial == 1 ? chan0 + e : chan0 + udiv(e, s.spatial);
#pragma unroll
      for (int q = 0; q < VEC; ++q) f(j * VEC + q, s.spatial == 1 ? c0 + q : c0);
    }
  } else {
    RowWalk w = walk(s, row, threadIdx.x, kThreads);
#pragma unroll
    for (int k = 0; k < kHeld; ++k) {
      if (k < cnt) f(k, w.channel());
      w.advance();
    }
  }
}

// Stores this thread's valid slots v of a held row to out, rounded to T (V: 16-byte stores).
template <typename T, bool V>
__device__ __forceinline__ void store_held(const NormShape& s, u64 row, u64 len, int cnt, void* out_,
                                           const float (&v)[kHeld]) {
  constexpr int VEC = Vec<T>::N, NV = kHeld / VEC;
  Raw<T>* out = static_cast<Raw<T>*>(out_);
  if (V) {
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      if (j * VEC >= cnt) break;
      float pv[VEC];
#pragma unroll
      for (int q = 0; q < VEC; ++q) pv[q] = v[j * VEC + q];
      store_vector<T>(out + row * len + held_vector<T>(j), pv);
    }
  } else {
    RowWalk w = walk(s, row, threadIdx.x, kThreads);
#pragma unroll
    for (int k = 0; k < kHeld; ++k) {
      if (k < cnt) out[w.addr()] = Dtype<T>::from_f(v[k]);
      w.advance();
    }
  }
}

// [e0, e1) of split `split` of `splits` over a row of `len` values.
__device__ __forceinline__ void split_range(u64 len, u64 split, u64 splits, u64& e0, u64& e1) {
  const u64 chunk = udiv(len + splits - 1, splits);
  e0 = split * chunk < len ? split * chunk : len;
  e1 = e0 + chunk < len ? e0 + chunk : len;
}

}  // namespace norm
}  // namespace bn

// One entry point per dtype: ONE params struct by value, forwarded to a device template.
#define NORM_FOR_EACH_TYPE(X) \
  X(f32, float)               \
  X(f16, __half)              \
  X(bf16, __nv_bfloat16)
