// common.cuh: the one home of the shared kernel machinery (see kernels/ABI.md).
//
//   dtypes      Dtype<T>: raw 16/32-bit storage, f32 conversions; Pack<T>: one 16-byte vector.
//   reductions  Welford<K> (one state, one Chan merge, exact when either count is 0) and Sums2<K>;
//               warp_reduce / block_reduce (1-D block) / block_reduce_y (2-D block, over y).
//   traversals  walk_planar (warp units over the planes of one channel: the reductions; chunks
//               of a plane, or several whole small planes per unit with gathered slots),
//               walk_flat (the whole tensor as one run of 16-byte vectors: the elementwise passes
//               over channels-first tensors) and walk_rows (inner == 1), each calling a functor's
//               load() for UNROLL slices, then its consume().
//   split reduction + last-block finalize: split_reduce_planar / split_reduce_rows, shared by
//               bn_stats.cu and bn_backward.cu through a small policy type.
//   maps        map_flat / map_rows (normalize, dx) with an epilogue hook: NoEpilogue here, the
//               ReLU epilogues and the mask (located by Slice::mw/mb) in epilogue.cuh.
//   BN_FOR_EACH_TYPE / BN_KERNEL: stamp the extern "C" entry points per dtype x index width.
//
// Assumptions everywhere: 256 threads per block (blockDim.x == 256 for planar/1-D kernels,
// blockDim.x * blockDim.y == 256 for rows kernels, so both are powers of two); I is the element
// index type, unsigned int when numel < 2^31, else unsigned long long. All arithmetic is f32, no
// fast math: every division and square root whose result is compared with PyTorch is IEEE
// (div.rn / sqrt.rn); only the Welford merge weights use div_count (see there).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace bn {

typedef unsigned long long u64;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;

struct Geometry {
  u64 outer, channels, inner;
};

// ------------------------------------------------------------------------------------------------
// dtypes
// ------------------------------------------------------------------------------------------------
template <typename T> struct Dtype;
template <> struct Dtype<float> {
  typedef unsigned int Raw;
  static __device__ __forceinline__ float to_f(Raw r) { return __uint_as_float(r); }
  static __device__ __forceinline__ Raw from_f(float f) { return __float_as_uint(f); }
  static __device__ __forceinline__ double to_d(Raw r) { return (double)__uint_as_float(r); }
  static __device__ __forceinline__ Raw from_d(double d) { return __float_as_uint((float)d); }
};
template <> struct Dtype<__half> {
  typedef unsigned short Raw;
  static __device__ __forceinline__ float to_f(Raw r) { return __half2float(__ushort_as_half(r)); }
  static __device__ __forceinline__ Raw from_f(float f) { return __half_as_ushort(__float2half_rn(f)); }
  static __device__ __forceinline__ double to_d(Raw r) { return (double)to_f(r); }
  // cvt.rn.f16.f64: one rounding from double (not through f32).
  static __device__ __forceinline__ Raw from_d(double d) { return __half_as_ushort(__double2half(d)); }
};
template <> struct Dtype<__nv_bfloat16> {
  typedef unsigned short Raw;
  static __device__ __forceinline__ float to_f(Raw r) { return __bfloat162float(__ushort_as_bfloat16(r)); }
  static __device__ __forceinline__ Raw from_f(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
  static __device__ __forceinline__ double to_d(Raw r) { return (double)to_f(r); }
  // Single rounding from double (round-to-odd to f32 first below sm_90: no double rounding).
  static __device__ __forceinline__ Raw from_d(double d) { return __bfloat16_as_ushort(__double2bfloat16(d)); }
};
template <typename T> using Raw = typename Dtype<T>::Raw;

// Elements per 16-byte vector: 4 for f32, 8 for f16/bf16.
template <typename T> struct Vec { static constexpr int N = 16 / (int)sizeof(T); };

// One thread's VEC elements ("slots"), loaded as one 16-byte vector or slot by slot.
template <typename T> union Pack {
  uint4 u;
  Raw<T> r[Vec<T>::N];
};

// The slots of one thread in one unit (planar, flat) or row (rows): slot k lives at off + k*STEP
// (STEP = 1 for vector loads and for rows, 32 for planar and flat scalar loads) or, STEP ==
// kGather (the packed planar walk's scalar path, whose slots may lie in different planes), at
// off + rel[k]; slots [0, cnt) are valid (always a prefix). Flat walks only: slot 0 is element i
// of its plane, of channel c (the map steps them slot by slot: a flat slice may span planes); 0
// elsewhere.
// (mw, mb): where slot 0's bit lives in a ReLU mask (kernels/ABI.md, epilogue.cuh; the mask is
// flat: element e is bit e % 32 of word e / 32, so mw = off / 32, mb = off % 32): slot k's bit
// is bit mb + k of the 64 bits from word mw on when STEP == 1 (mb + VEC <= 32 whenever slot 0 is
// VEC-aligned: the vector paths and the rows maps; the scalar rows reductions over C % VEC != 0
// may straddle into word mw + 1), (mw + k, mb) when STEP == 32; kGather: element off + rel[k]'s
// bit, read slot by slot. Walks always fill them (rel: the packed walk only); a functor that
// reads no mask ignores them and the compiler drops them.
constexpr int kMaxVec = 8;  // Vec<T>::N of 16-bit types, the most slots a thread has
constexpr int kGather = 0;  // STEP of the gathered slots (off + rel[k])
template <typename I> struct Slice {
  I off;
  int cnt;
  unsigned c;
  I i;
  I mw;
  unsigned mb;
  unsigned rel[kMaxVec];
};

// Offset of slot k of a scalar slice (STEP 32 or kGather).
template <int STEP, typename I> __device__ __forceinline__ I slot_offset(const Slice<I>& s, int k) {
  return STEP == kGather ? s.off + (I)s.rel[k] : s.off + (I)(k * STEP);
}

template <typename T, bool V, int STEP, typename I>
__device__ __forceinline__ void load_slots(Pack<T>& p, const Raw<T>* src, const Slice<I>& s) {
  p.u = make_uint4(0u, 0u, 0u, 0u);  // invalid slots read as 0
  if (V) {
    if (s.cnt > 0) p.u = *reinterpret_cast<const uint4*>(src + s.off);
  } else {
#pragma unroll
    for (int k = 0; k < Vec<T>::N; ++k)
      if (k < s.cnt) p.r[k] = src[slot_offset<STEP>(s, k)];
  }
}

template <typename T, bool V, int STEP, typename I>
__device__ __forceinline__ void store_slots(Raw<T>* dst, const Pack<T>& p, const Slice<I>& s) {
  if (V) {
    if (s.cnt > 0) *reinterpret_cast<uint4*>(dst + s.off) = p.u;
  } else {
#pragma unroll
    for (int k = 0; k < Vec<T>::N; ++k)
      if (k < s.cnt) dst[slot_offset<STEP>(s, k)] = p.r[k];
  }
}

template <typename T> __device__ __forceinline__ void unpack(const Pack<T>& p, float (&v)[Vec<T>::N]) {
#pragma unroll
  for (int k = 0; k < Vec<T>::N; ++k) v[k] = Dtype<T>::to_f(p.r[k]);
}

template <typename T> __device__ __forceinline__ void pack(Pack<T>& p, const float (&v)[Vec<T>::N]) {
#pragma unroll
  for (int k = 0; k < Vec<T>::N; ++k) p.r[k] = Dtype<T>::from_f(v[k]);
}

// v rounded to T and stored as one 16-byte vector at dst (16-byte aligned). __stcg is one
// st.global.cg.v4 whatever NVVM infers about dst (a plain store of a Pack<T> may be split into
// 4-byte pieces where it cannot prove the alignment); .cg: the output is not read again here.
template <typename T> __device__ __forceinline__ void store_vector(Raw<T>* dst, const float (&v)[Vec<T>::N]) {
  Pack<T> p;
  pack(p, v);
  __stcg(reinterpret_cast<uint4*>(dst), p.u);
}

// Unsigned 64-bit a / b (b > 0) without div.u64, which ptxas turns into a subroutine call whose
// register saves show up as spills: div.u32 when both fit in 32 bits (always, in practice), else
// restoring binary long division. Only used a few times per thread, before the main loop.
__device__ __forceinline__ u64 udiv(u64 a, u64 b) {
  if (((a | b) >> 32) == 0) return (unsigned)a / (unsigned)b;
  if (a < b) return 0;
  const int sh = __clzll(b) - __clzll(a);  // 0 <= sh < 64: b << sh does not overflow
  u64 d = b << sh, q = 0;
  for (int i = 0; i <= sh; ++i) {
    q <<= 1;
    if (a >= d) {
      a -= d;
      q |= 1;
    }
    d >>= 1;
  }
  return q;
}

__device__ __forceinline__ u64 umod(u64 a, u64 b) { return a - udiv(a, b) * b; }

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<u64>(p) & 15u) == 0;
}

// Nullable per-channel parameter with an identity default.
__device__ __forceinline__ float load_or(const float* p, u64 c, float dflt) { return p ? p[c] : dflt; }

// Bit-identical to IEEE 1.0f / sqrtf(x) (sqrt.rn then rcp.rn, what nvcc emits for it) but
// without the slow-path subroutine calls ptxas attaches to sqrt.rn.f32 / rcp.rn.f32, whose
// register saves cost stack frames in the elementwise kernels. It runs ptxas's own fast-path
// sequences, instruction for instruction (nvcc 13.0's sm_90 code for sqrtf and 1.0f / x:
// MUFU.RSQ, 2 FMUL, 2 FFMA; MUFU.RCP, 2 FFMA), taken on the ranges where they are exact
// (sqrt: x in [2^-101, FLT_MAX]; rcp: biased exponent in [1, 252]); a positive x < 2^-100 is
// scaled by 2^126 (sqrt by 2^63, exact), so the sqrt lies in [2^-75, 2^64], inside the rcp range.
// Exact because the hardware's MUFU makes those sequences IEEE; the PTX ISA's MUFU bounds alone
// would not: an rsqrt above the exact value or an rcp below it, within the bounds, leaves a few
// inputs 1 ulp off (a one-off search over every positive input and every allowed result found
// 228 and 139 such pairs; the emulator's MUFU pushes the other way, tests/emulator/emu.h).
// tests/gpu_forward.rs checks every mantissa on the GPU.
// Specials as IEEE: +-0 -> +-Inf, +Inf -> +0, negative or NaN -> NaN.
__device__ __forceinline__ float invsqrt_rn(float x) {
  const bool tiny = x < 0x1p-100f;
  const float xs = tiny ? x * 0x1p126f : x;
  float r;
  asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(xs));
  const float s0 = xs * r;
  float s = fmaf(fmaf(-s0, s0, xs), r * 0.5f, s0);  // sqrt.rn(xs)
  if (tiny) s *= 0x1p-63f;
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(s));
  float q = fmaf(y, -fmaf(y, s, -1.0f), y);  // rcp.rn(s)
  const float inf = __int_as_float(0x7f800000);
  if (!(x > 0.f) || x == inf) q = x == 0.f ? copysignf(inf, x) : (x == inf ? 0.f : __int_as_float(0x7fffffff));
  return q;
}

// A batch mean as an unevaluated sum hi + lo of two floats (a double-float): hi is the f32 mean
// PyTorch saves, lo what f32 cannot hold of it. Rounding the mean once to f32 and forming x - hi
// loses up to half an ulp of the mean (3e-5 at 1000), which invstd then magnifies (x10 at std
// 0.1); x - hi - lo keeps it. lo is 0 when hi is not finite.
struct MeanPair {
  float hi, lo;
};

// c - lo*k: a per-channel coefficient with a mean's low part folded in (kernels/ABI.md). Exactly
// c when lo == 0 (no mean_lo, a constant channel), so an infinite k (zero variance and eps) gives
// what it gave without lo, not 0 * inf = NaN.
__device__ __forceinline__ float fold_lo(float c, float lo, float k) { return lo != 0.f ? fmaf(-lo, k, c) : c; }

// a + b exactly as hi + lo (Knuth's TwoSum: no ordering of |a|, |b| assumed; additions only, so
// no contraction into an fma can change it).
__device__ __forceinline__ MeanPair two_sum(float a, float b) {
  const float s = a + b;
  const float bb = s - a;
  const float err = (a - (s - bb)) + (b - bb);
  MeanPair r;
  r.hi = s;
  r.lo = fabsf(s) <= 3.40282346638528859812e+38f ? err : 0.f;  // finite s
  return r;
}

// invstd from the stored statistic: save_invstd as is, or 1/sqrt(running_var + eps).
__device__ __forceinline__ float invstd_of(const float* var_or_invstd, u64 c, int stat_is_var, float eps) {
  const float v = var_or_invstd[c];
  return stat_is_var ? invsqrt_rn(v + eps) : v;
}

// a / b for the internals of the Welford merges (weights nb/n, means of partial vectors), where
// b > 0 is a count (an integer below 2^24 in practice): hardware reciprocal, one Newton step, one
// residual correction. Within an ulp of div.rn (exact when the quotient is representable, e.g. b
// a power of two) but without div.rn's slow-path subroutine, whose call costs registers in the
// hot loops. Everything compared with PyTorch (var, invstd, running stats) uses IEEE / and sqrtf.
__device__ __forceinline__ float div_count(float a, float b) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(b));
  y = fmaf(fmaf(-b, y, 1.0f), y, y);
  const float q = a * y;
  return fmaf(fmaf(-q, b, a), y, q);
}

// a / b in double for the per-channel scalars of the finalize steps (b > 0 normal, a finite or
// not): hardware reciprocal estimate, two Newton steps, one residual correction. Relative error
// below 2^-52, exact when the quotient is representable; no div.rn.f64 subroutine call (a call
// in a kernel makes ptxas keep the values live across it in stack slots). Rounded to f32 it gives
// the IEEE f32 quotient of f32 operands (double carries more than 2*24+2 bits, and a quotient of
// two 24-bit numbers is never a f32 rounding midpoint), and PyTorch's
// static_cast<float>(double(m) / double(m - 1)) for every m (see bn_stats.cu).
__device__ __forceinline__ double div_d(double a, double b) {
  double y;
  asm("rcp.approx.ftz.f64 %0, %1;" : "=d"(y) : "d"(b));
  y = fma(fma(-b, y, 1.0), y, y);
  y = fma(fma(-b, y, 1.0), y, y);
  const double q = a * y;
  if (!(fabs(q) <= 1.7976931348623157e308)) return q;  // Inf or NaN: as IEEE, no NaN from Inf - Inf
  return fma(fma(-q, b, a), y, q);
}

// Fixed pairwise tree (N a power of two): deterministic, and exact for equal inputs (every
// level adds two equal values: a multiplication by 2).
template <int N> __device__ __forceinline__ float tree_sum(const float (&v)[N]) {
  float t[N];
#pragma unroll
  for (int k = 0; k < N; ++k) t[k] = v[k];
#pragma unroll
  for (int w = N / 2; w >= 1; w /= 2)
#pragma unroll
    for (int k = 0; k < w; ++k) t[k] = t[k] + t[k + w];
  return t[0];
}

// ------------------------------------------------------------------------------------------------
// Reduction states. Each is a small float array v[NF] so that shuffles and shared-memory moves
// are written once (warp_reduce, block_reduce*), with a static merge() and empty().
// ------------------------------------------------------------------------------------------------

// Welford state of K channels that share one count (K = 1 planar; K = VEC for rows, where every
// channel of a thread has seen the same rows). v = [n, mean[0..K), m2[0..K)].
template <int K> struct Welford {
  static constexpr int NF = 1 + 2 * K;
  float v[NF];
  __device__ __forceinline__ float& n() { return v[0]; }
  __device__ __forceinline__ float n() const { return v[0]; }
  __device__ __forceinline__ float& mean(int k) { return v[1 + k]; }
  __device__ __forceinline__ float mean(int k) const { return v[1 + k]; }
  __device__ __forceinline__ float& m2(int k) { return v[1 + K + k]; }
  __device__ __forceinline__ float m2(int k) const { return v[1 + K + k]; }

  static __device__ __forceinline__ Welford empty() {
    Welford s;
#pragma unroll
    for (int i = 0; i < NF; ++i) s.v[i] = 0.f;
    return s;
  }
  // One value per channel (a row of the rows traversal).
  static __device__ __forceinline__ Welford sample(const float (&x)[K]) {
    Welford s;
    s.n() = 1.f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      s.mean(k) = x[k];
      s.m2(k) = 0.f;
    }
    return s;
  }
  // Channel k of a state parked in shared memory as v[i] = src[i * stride].
  static __device__ __forceinline__ Welford<1> channel(const float* src, int stride, int k) {
    Welford<1> r;
    r.n() = src[0];
    r.mean(0) = src[(1 + k) * stride];
    r.m2(0) = src[(1 + K + k) * stride];
    return r;
  }
  // THE Chan et al. merge: with n = na + nb and w = nb / n (0 when both are empty),
  //   mean = ma + (mb - ma) * w,   m2 = m2a + m2b + (mb - ma)^2 * na * w.
  // Either side may be empty: an empty state is all zeros and gives w = 0 (b empty) or w = 1
  // exactly (a empty), so the result is the other side bit for bit (if its mean is finite; a
  // non-finite mean becomes NaN, as in PyTorch's Welford, and stays in its channel). Equal means
  // give d = 0, so a constant channel keeps its value as the exact mean. No select of whole
  // states: only two states are live, which keeps the K = 8 rows reductions in registers.
  static __device__ __forceinline__ Welford merge(const Welford& a, const Welford& b) {
    Welford r;
    r.n() = a.n() + b.n();
    const float w = r.n() > 0.f ? div_count(b.n(), r.n()) : 0.f;
    const float naw = a.n() * w;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const float d = b.mean(k) - a.mean(k);
      r.mean(k) = fmaf(d, w, a.mean(k));
      r.m2(k) = (a.m2(k) + b.m2(k)) + d * d * naw;
    }
    return r;
  }
};

// Statistics of one thread's N slots, of which [0, cnt) are valid (1 <= cnt <= N): shifted by the
// first value (exact differences for clustered data, exact mean for a constant vector), so one
// division per vector at most (none for a full vector: 1/N is a power of two).
template <int N> __device__ __forceinline__ Welford<1> vec_welford(const float (&x)[N], int cnt) {
  const float pivot = x[0];
  float d[N];
#pragma unroll
  for (int k = 0; k < N; ++k) d[k] = k < cnt ? x[k] - pivot : 0.f;
  const float s = tree_sum(d);
  float mean;
  if (cnt == N) mean = pivot + s * (1.0f / N);
  else mean = pivot + div_count(s, (float)cnt);
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const float e = k < cnt ? x[k] - mean : 0.f;
    d[k] = e * e;
  }
  Welford<1> r;
  r.n() = (float)cnt;
  r.mean(0) = mean;
  r.m2(0) = tree_sum(d);
  return r;
}

// Two plain sums per channel (backward: sum dy, sum dy*(x - mean)). v = [a[0..K), b[0..K)].
template <int K> struct Sums2 {
  static constexpr int NF = 2 * K;
  float v[NF];
  __device__ __forceinline__ float& a(int k) { return v[k]; }
  __device__ __forceinline__ float a(int k) const { return v[k]; }
  __device__ __forceinline__ float& b(int k) { return v[K + k]; }
  __device__ __forceinline__ float b(int k) const { return v[K + k]; }
  static __device__ __forceinline__ Sums2 empty() {
    Sums2 s;
#pragma unroll
    for (int i = 0; i < NF; ++i) s.v[i] = 0.f;
    return s;
  }
  static __device__ __forceinline__ Sums2<1> channel(const float* src, int stride, int k) {
    Sums2<1> r;
    r.a(0) = src[k * stride];
    r.b(0) = src[(K + k) * stride];
    return r;
  }
  static __device__ __forceinline__ Sums2 merge(const Sums2& x, const Sums2& y) {
    Sums2 r;
#pragma unroll
    for (int i = 0; i < NF; ++i) r.v[i] = x.v[i] + y.v[i];
    return r;
  }
};

// ------------------------------------------------------------------------------------------------
// Warp and block reductions (fixed order: deterministic).
// ------------------------------------------------------------------------------------------------

// Shuffle-down tree over offsets hi, hi/2, ..., lo (powers of two). Lane l < lo ends with the
// merge of lanes l, l+lo, l+2lo, ... < l + 2hi. All 32 lanes must call it.
template <class S> __device__ __forceinline__ S warp_reduce(S s, unsigned hi, unsigned lo) {
  for (unsigned off = hi; off >= lo; off >>= 1) {
    S o;
#pragma unroll
    for (int i = 0; i < S::NF; ++i) o.v[i] = __shfl_down_sync(kFull, s.v[i], off);
    s = S::merge(s, o);
  }
  return s;
}

// Whole 1-D block (blockDim == (256, 1, 1)); the result is valid in thread 0.
// sm: S::NF * kWarps floats. Callers separate two uses of sm by a __syncthreads().
template <class S> __device__ __forceinline__ S block_reduce(S s, float* sm) {
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  s = warp_reduce(s, 16, 1);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < S::NF; ++i) sm[i * kWarps + warp] = s.v[i];
  }
  __syncthreads();
  if (warp == 0) {
    S t = S::empty();
    if (lane < kWarps) {
#pragma unroll
      for (int i = 0; i < S::NF; ++i) t.v[i] = sm[i * kWarps + lane];
    }
    s = warp_reduce(t, kWarps / 2, 1);
  }
  return s;
}

// Over threadIdx.y of a (bx, by) block, bx * by == 256: the result for column tx is valid in
// thread (tx, 0). sm: S::NF * kThreads floats. Callers separate two uses by a __syncthreads().
template <class S> __device__ __forceinline__ S block_reduce_y(S s, float* sm) {
  const unsigned bx = blockDim.x, tx = threadIdx.x, ty = threadIdx.y;
  // 1) bx < 32: a warp holds 32/bx consecutive rows of the same bx columns; shuffle them down to
  //    the warp's first row (offsets 16 .. bx, multiples of bx: same column).
  if (bx < 32) s = warp_reduce(s, 16, bx);
  // 2) the first row of each warp group parks its state; row 0 merges the groups in order.
  //    rows per group = 32/bx (bx < 32) or 1: a power of two, so shifts and masks.
  const unsigned lg = bx < 32 ? 5u - (unsigned)(__ffs(bx) - 1) : 0u;
  const unsigned groups = blockDim.y >> lg;  // min(by, 8)
  const unsigned g = ty >> lg;
  if (g > 0 && (ty & ((1u << lg) - 1u)) == 0) {
#pragma unroll
    for (int i = 0; i < S::NF; ++i) sm[i * kThreads + (g - 1) * bx + tx] = s.v[i];  // < 7*bx+bx <= 256
  }
  __syncthreads();
  if (ty == 0) {
    for (unsigned h = 1; h < groups; ++h) {
      S t;
#pragma unroll
      for (int i = 0; i < S::NF; ++i) t.v[i] = sm[i * kThreads + (h - 1) * bx + tx];
      s = S::merge(s, t);
    }
  }
  return s;
}

// ------------------------------------------------------------------------------------------------
// Traversals.
// ------------------------------------------------------------------------------------------------
// A functor F visited by a walk provides:
//   typedef ... Frag;                                   registers of one slice (loaded data)
//   template <bool V, int STEP> void load(Frag&, const Slice<I>&);
//   template <bool V, int STEP> void consume(Frag&, const Slice<I>&);
// The walk calls load() for UNROLL slices, then consume() for each: UNROLL independent 16-byte
// loads (per input) in flight per thread.

// Slices per iteration: UNROLL_V on the vector path; half as many on the scalar path, where each
// slice already has VEC independent loads in flight and each 16-bit element takes a register.
template <int UNROLL_V, bool V> __host__ __device__ constexpr int unroll_for() {
  return V ? UNROLL_V : (UNROLL_V + 1) / 2;
}

// Planar (the reductions over channels-first tensors): the warp units of the planes of one
// channel c; plane q starts at base + q*plane_stride (base = c*inner, plane_stride = C*inner),
// CH = 32*VEC. Two kinds of unit, by plane size (planar_span):
//   chunked (inner > CH/2): unit u = (q = u / chunks, k = u % chunks) covers elements
//     [k*CH, min((k+1)*CH, inner)) of plane q;
//   packed (inner <= CH/2, 32-bit indices): unit u covers the G = CH / inner >= 2 whole planes [u*G,
//     min(u*G + G, outer)) of channel c, its values numbered t = 0 .. G*inner - 1 (plane
//     u*G + t / inner, element t % inner), so small planes (7x7, 5x5, 3x3) fill the lanes
//     instead of leaving most of a unit idle (49 halves in 256 slots: 19 %).
// All slots of a unit belong to channel c, so the functors' per-channel state is the same for
// both. Offsets are the elements' offsets in the tensor, which is all the ReLU mask needs (for
// inner > 1 it is flat: element e is bit e % 32 of word e / 32).
template <typename I> struct PlanarSpan {
  u64 units;        // per channel: planes * chunks (chunked) or ceil(planes / G) (packed)
  I chunks;         // chunked: units per plane, ceil(inner / CH)
  I inner;          // elements per plane
  I base;           // offset of plane 0
  I plane_stride;   // offset between consecutive planes
  unsigned planes;  // planes per unit: 1 (chunked) or G >= 2 (packed)
  unsigned tail;    // packed: values of the channel's last unit, (outer - (units - 1)*G) * inner
};

// Packed units with 32-bit indices only (tensors below 2^31 elements): with 64-bit indices the
// gathered slots cost registers the chunked walk does not (ptxas 13.0, sm_90, 16-bit data: the
// backward reduce 54 instead of 40, the one-pass eval backward 90 instead of 48). Every planar
// reduction packs alike, so the eval backward's sums stay the reduce's bit for bit.
template <typename I> __host__ __device__ constexpr bool packs() { return sizeof(I) == 4; }

// The units of a channels-first geometry (base is per channel: the caller sets it). The host's
// launch::planar_units counts them the same way.
template <typename T, typename I> __device__ __forceinline__ PlanarSpan<I> planar_span(const Geometry& g) {
  constexpr unsigned CH = 32u * Vec<T>::N;
  PlanarSpan<I> sp;
  sp.inner = (I)g.inner;
  sp.plane_stride = (I)g.channels * sp.inner;
  sp.base = 0;
  if (packs<I>() && g.inner <= CH / 2) {
    sp.planes = CH / (unsigned)g.inner;
    sp.units = udiv(g.outer + (sp.planes - 1), sp.planes);
    sp.tail = (unsigned)(g.outer - (sp.units - 1) * sp.planes) * (unsigned)g.inner;
    sp.chunks = 1;
  } else {
    sp.planes = 1;
    sp.tail = 0;
    sp.chunks = (sp.inner + (I)(CH - 1)) / (I)CH;
    sp.units = g.outer * (u64)sp.chunks;
  }
  return sp;
}

// Warp w of W takes the contiguous units [w*per + min(w, extra), +per + (w < extra)) with
// per = units / W, extra = units % W (balanced to one unit), walking them in order: consecutive
// 512-byte chunks of a plane, then the next plane. Lane slots: vector path elements
// k*CH + lane*VEC + [0, VEC); scalar path k*CH + lane + 32*s (each load instruction of the warp
// reads 32 consecutive elements). Divisions only here, at the start; none per unit.
template <typename I> struct PlanarCursor {
  I left;       // units still to visit
  I coff;       // k*CH of the current unit
  I poff;       // offset of the current plane, plus this lane's first slot
};

template <typename T, typename I, int UNROLL_V, bool V, class F>
__device__ __forceinline__ void walk_planar_impl(F& f, const PlanarSpan<I>& sp, PlanarCursor<I> cur) {
  constexpr int UNROLL = unroll_for<UNROLL_V, V>();
  constexpr int VEC = Vec<T>::N;
  constexpr int STEP = V ? 1 : 32;
  constexpr unsigned CH = 32u * VEC;
  const unsigned lane = threadIdx.x & 31;
  const I wrap = sp.chunks * (I)CH;  // coff runs over 0, CH, ..., wrap - CH
  cur.poff += V ? (I)(lane * VEC) : (I)lane;
  for (; cur.left > 0; cur.left -= cur.left < (I)UNROLL ? cur.left : (I)UNROLL) {
    Slice<I> sl[UNROLL];
    typename F::Frag fr[UNROLL];
#pragma unroll
    for (int j = 0; j < UNROLL; ++j) {
      int cnt = 0;
      if ((I)j < cur.left) {
        const I rem = sp.inner - cur.coff;  // > 0: the last chunk of a plane starts below inner
        const unsigned nv = rem < (I)CH ? (unsigned)rem : CH;  // elements of this unit
        if (V) cnt = lane * VEC < nv ? VEC : 0;  // inner % VEC == 0: whole vectors
        else cnt = lane < nv ? min(VEC, (int)((nv - lane + 31) >> 5)) : 0;
      }
      sl[j].off = cur.poff + cur.coff;  // past the end when cnt == 0: never dereferenced
      sl[j].cnt = cnt;
      sl[j].c = 0;
      sl[j].i = 0;
      sl[j].mw = sl[j].off >> 5;  // vector path: off % VEC == 0, so the VEC bits share the word
      sl[j].mb = (unsigned)sl[j].off & 31u;
      cur.coff += (I)CH;  // next unit
      if (cur.coff == wrap) {
        cur.coff = 0;
        cur.poff += sp.plane_stride;
      }
    }
#pragma unroll
    for (int j = 0; j < UNROLL; ++j) f.template load<V, STEP>(fr[j], sl[j]);
#pragma unroll
    for (int j = 0; j < UNROLL; ++j) f.template consume<V, STEP>(fr[j], sl[j]);
  }
}

// Packed units (G planes each). Lane slots: vector path t = lane*VEC + [0, VEC) (inner % VEC
// == 0: the vector lies in one plane and is 16-byte aligned); scalar path t = lane + 32*s, so
// each load instruction of the warp reads 32 consecutive t (whole runs of planes, contiguous
// within each), gathered slot by slot (STEP kGather). The offset of t from the unit's first
// plane, (t / inner)*plane_stride + t % inner, is the same in every unit: a thread divides once
// per slot here and keeps the offsets (rel) in registers; per unit only the first plane moves,
// by G*plane_stride. Valid slots are a prefix (t grows with the slot): t < G*inner, or t < tail
// in the channel's last unit. Slices' mask bits: vector path (mw, mb) as walk_planar_impl's;
// gathered, element off + rel[k]'s bit (load_mask reads them slot by slot).
template <typename T, typename I, int UNROLL_V, bool V, class F>
__device__ __forceinline__ void walk_packed_impl(F& f, const PlanarSpan<I>& sp, I poff, u64 begin, I left) {
  constexpr int UNROLL = unroll_for<UNROLL_V, V>();
  constexpr int VEC = Vec<T>::N;
  constexpr int STEP = V ? 1 : kGather;
  constexpr int SLOTS = V ? 1 : VEC;  // offsets a lane keeps: its vector's, or each slot's
  const unsigned lane = threadIdx.x & 31, inner = (unsigned)sp.inner, full = sp.planes * inner;
  // 32-bit indices only (packs): a valid slot's offset is below numel < 2^31; an invalid one's
  // may wrap (t past the channel's last plane), and it is never dereferenced.
  const unsigned stride = (unsigned)sp.plane_stride;
  unsigned rel[SLOTS];
  int cnt_full = 0, cnt_tail = 0;
#pragma unroll
  for (int s = 0; s < SLOTS; ++s) {
    const unsigned t = V ? lane * VEC : lane + 32u * s, q = t / inner;
    rel[s] = q * stride + (t - q * inner);
    cnt_full += t < full ? (V ? VEC : 1) : 0;
    cnt_tail += t < sp.tail ? (V ? VEC : 1) : 0;
  }
  const unsigned ustride = sp.planes * stride;
  I to_last = (I)(sp.units - 1 - begin);  // units before the channel's last (wraps when left == 0)
  for (; left > 0; left -= left < (I)UNROLL ? left : (I)UNROLL) {
    Slice<I> sl[UNROLL];
    typename F::Frag fr[UNROLL];
#pragma unroll
    for (int j = 0; j < UNROLL; ++j) {
      sl[j].off = V ? poff + (I)rel[0] : poff;  // past the end when cnt == 0: never dereferenced
      sl[j].cnt = (I)j < left ? (to_last == 0 ? cnt_tail : cnt_full) : 0;
      sl[j].c = 0;
      sl[j].i = 0;
      sl[j].mw = sl[j].off >> 5;
      sl[j].mb = (unsigned)sl[j].off & 31u;
#pragma unroll
      for (int s = 0; s < SLOTS; ++s) sl[j].rel[s] = rel[s];
      poff += (I)ustride;  // next unit
      --to_last;
    }
#pragma unroll
    for (int j = 0; j < UNROLL; ++j) f.template load<V, STEP>(fr[j], sl[j]);
#pragma unroll
    for (int j = 0; j < UNROLL; ++j) f.template consume<V, STEP>(fr[j], sl[j]);
  }
}

// vec is uniform over the grid (inner % VEC and pointer alignment), and so is the kind of unit:
// the branches never diverge.
template <typename T, typename I, int UNROLL, class F>
__device__ __forceinline__ void walk_planar(F& f, bool vec, const PlanarSpan<I>& sp, u64 warp, u64 warps) {
  constexpr unsigned CH = 32u * Vec<T>::N;
  const u64 per = udiv(sp.units, warps), extra = sp.units - per * warps;
  const u64 begin = warp * per + (warp < extra ? warp : extra);  // <= units: no overflow
  const I left = (I)(per + (warp < extra ? 1 : 0));
  // If left == 0, begin may be == units and the offsets past the end: never used.
  if (packs<I>() && sp.planes > 1) {
    const I poff = sp.base + (I)begin * (I)(sp.planes * (unsigned)sp.plane_stride);
    if (vec) walk_packed_impl<T, I, UNROLL, true>(f, sp, poff, begin, left);
    else walk_packed_impl<T, I, UNROLL, false>(f, sp, poff, begin, left);
    return;
  }
  PlanarCursor<I> cur;
  cur.left = left;
  const u64 q = udiv(begin, sp.chunks);
  cur.coff = (I)(begin - q * sp.chunks) * (I)CH;
  cur.poff = sp.base + (I)q * sp.plane_stride;
  if (vec) walk_planar_impl<T, I, UNROLL, true>(f, sp, cur);
  else walk_planar_impl<T, I, UNROLL, false>(f, sp, cur);
}

// Flat (the elementwise passes over channels-first tensors): the tensor as one run of n elements
// cut into units of CH = 32*VEC consecutive elements starting at multiples of CH, so a unit, and
// a lane's vector, may span planes (7x7, 14x14, 3x3 planes get whole 16-byte vectors and full
// lanes). Every slot has its own place (i, c): its offset in its plane and its channel. The walk
// and the maps step places by 1 (the next slot of a vector), 32 (the next slot of the scalar
// path) or CH (the next unit) without dividing: a step of d = q*inner + r elements is the place
// of element d, (r, q % C), computed once per thread.
template <typename I> struct FlatPos {
  I i;         // offset in the plane, < inner
  unsigned c;  // channel, < C
};
template <typename I> struct FlatGeom {
  I inner;
  unsigned C;
  __device__ __forceinline__ FlatPos<I> at(u64 e) const {
    const u64 q = udiv(e, inner);
    FlatPos<I> p;
    p.i = (I)(e - q * inner);
    p.c = (unsigned)umod(q, C);
    return p;
  }
  // p + the step s = at(d): i + s.i < 2*inner carries at most one plane; c + s.c + carry <= 2C - 1,
  // written so that nothing wraps in 32 bits.
  __device__ __forceinline__ void advance(FlatPos<I>& p, const FlatPos<I>& s) const {
    p.i += s.i;
    unsigned dq = s.c;
    if (p.i >= inner) {
      p.i -= inner;
      ++dq;  // <= C
    }
    const unsigned room = C - p.c;  // >= 1
    p.c = dq >= room ? dq - room : p.c + dq;
  }
};

// Warp w of W takes units as walk_planar does, but counted from the END of the tensor (warp w
// takes range W-1-w): the first blocks to run read the tail, which the statistics pass before
// read last and the L2 may still hold. Each range is walked forward. Slots: vector path elements
// unit + lane*VEC + [0, VEC) (every vector 16-byte aligned when the pointers are and
// n % VEC == 0: the kernel checks both, uniformly); scalar path unit + lane + 32*s. Mask
// (inner > 1: element e is bit e % 32 of word e / 32): units start on a word, so the lanes
// sharing a word are the same unit's (32/VEC aligned lanes on the vector path; word unit/32 + s,
// bit lane on the scalar path), as store_mask needs.
template <typename T, typename I, int UNROLL_V, bool V, class F>
__device__ __forceinline__ void walk_flat_impl(F& f, const FlatGeom<I>& fg, I n, I off, I left, FlatPos<I> pos) {
  constexpr int UNROLL = unroll_for<UNROLL_V, V>();
  constexpr int VEC = Vec<T>::N;
  constexpr int STEP = V ? 1 : 32;
  constexpr unsigned CH = 32u * VEC;
  const FlatPos<I> unit = fg.at(CH);
  for (; left > 0; left -= left < (I)UNROLL ? left : (I)UNROLL) {
    Slice<I> sl[UNROLL];
    typename F::Frag fr[UNROLL];
#pragma unroll
    for (int j = 0; j < UNROLL; ++j) {
      int cnt = 0;
      if ((I)j < left && off < n) cnt = V ? VEC : min(VEC, (int)((n - off + 31) >> 5));  // V: n % VEC == 0
      sl[j].off = off;  // past the end when cnt == 0: never dereferenced
      sl[j].cnt = cnt;
      sl[j].c = pos.c;
      sl[j].i = pos.i;
      sl[j].mw = off >> 5;
      sl[j].mb = (unsigned)off & 31u;
      off += (I)CH;
      fg.advance(pos, unit);
    }
#pragma unroll
    for (int j = 0; j < UNROLL; ++j) f.template load<V, STEP>(fr[j], sl[j]);
#pragma unroll
    for (int j = 0; j < UNROLL; ++j) f.template consume<V, STEP>(fr[j], sl[j]);
  }
}

// vec is uniform over the grid (n % VEC and pointer alignment), so the branch never diverges.
template <typename T, typename I, int UNROLL, class F>
__device__ __forceinline__ void walk_flat(F& f, bool vec, const FlatGeom<I>& fg, I n, u64 warp, u64 warps) {
  constexpr unsigned VEC = Vec<T>::N, CH = 32u * VEC;
  const u64 units = ((u64)n + (CH - 1)) / CH;
  const u64 w = warps - 1 - warp;
  const u64 per = udiv(units, warps), extra = units - per * warps;
  const u64 begin = w * per + (w < extra ? w : extra);  // <= units: no overflow
  const I left = (I)(per + (w < extra ? 1 : 0));
  // If left == 0, begin may be == units and the offset past the end: never used.
  const unsigned lane = threadIdx.x & 31;
  const I off = (I)(begin * CH) + (I)(vec ? lane * VEC : lane);
  const FlatPos<I> pos = fg.at(off);
  if (vec) walk_flat_impl<T, I, UNROLL, true>(f, fg, n, off, left, pos);
  else walk_flat_impl<T, I, UNROLL, false>(f, fg, n, off, left, pos);
}

// Rows (inner == 1): rows of `width` elements (the reductions: real rows, width = C; the
// elementwise maps: super-rows, width = rows_map_width). This thread owns columns [c0, c0 + cnt)
// of every row r0, r0 + rstride, ...; row r's slots start at r*width + c0, and the last row
// (rows - 1, the only one that may be partial) has last_cnt <= cnt valid slots. Vector path:
// width % VEC == 0 and every valid slice whole, so cnt and last_cnt are VEC or 0 and every row
// start is 16-byte aligned; scalar path: slots k < cnt loaded one by one. Mask (flat): slot 0 of
// row r is bit off % 32 of word off / 32.
// REV (the elementwise maps): row r is rows-1-r, so the first blocks to run take the last rows,
// which the reduction before (its blocks stride the rows together) read last: the L2 may hold them.
template <typename T, typename I, int UNROLL_V, bool V, bool REV, class F>
__device__ __forceinline__ void walk_rows_impl(F& f, I rows, I width, I c0, int cnt, int last_cnt, I r0, I rstride) {
  constexpr int UNROLL = unroll_for<UNROLL_V, V>();
  // r < rows < 2^31 (i32) and UNROLL*rstride <= 4*65535*256 < 2^27: r never wraps.
  for (I r = r0; r < rows; r += (I)UNROLL * rstride) {
    Slice<I> sl[UNROLL];
    typename F::Frag fr[UNROLL];
#pragma unroll
    for (int j = 0; j < UNROLL; ++j) {
      const I rf = r + (I)j * rstride;
      const I rr = REV ? rows - 1 - rf : rf;
      // A valid slice lies below numel < 2^31 (i32); an idle one (cnt = 0) may wrap: never
      // dereferenced, and its mask position never used.
      sl[j].off = rr * width + c0;
      sl[j].cnt = rf < rows ? (rr == rows - 1 ? last_cnt : cnt) : 0;
      sl[j].c = 0;
      sl[j].i = 0;
      sl[j].mw = sl[j].off >> 5;
      sl[j].mb = (unsigned)sl[j].off & 31u;
    }
#pragma unroll
    for (int j = 0; j < UNROLL; ++j) f.template load<V, 1>(fr[j], sl[j]);
#pragma unroll
    for (int j = 0; j < UNROLL; ++j) f.template consume<V, 1>(fr[j], sl[j]);
  }
}

template <typename T, typename I, int UNROLL, bool REV = false, class F>
__device__ __forceinline__ void walk_rows(F& f, bool vec, I rows, I width, I c0, int cnt, int last_cnt, I r0, I rstride) {
  if (vec) walk_rows_impl<T, I, UNROLL, true, REV>(f, rows, width, c0, cnt, last_cnt, r0, rstride);
  else walk_rows_impl<T, I, UNROLL, false, REV>(f, rows, width, c0, cnt, last_cnt, r0, rstride);
}

// Rows per iteration for rows kernels with NIN inputs. A rows thread keeps VEC channels of state
// or coefficients in registers (up to 4*8 floats for dx in 16-bit types, 2*8 sums for the
// backward reduce), so its data registers are budgeted: UNROLL*NIN 16-byte loads per iteration
// = 2 for 16-bit types, 4 for f32. With >= 4 resident blocks that is >= 32 KB in flight per SM.
// At least one row (NIN = 3: the add_relu dx streams x, dy and dz).
template <typename T, int NIN> __host__ __device__ constexpr int rows_unroll() {
  return (sizeof(T) == 2 ? 2 : 4) / NIN > 0 ? (sizeof(T) == 2 ? 2 : 4) / NIN : 1;
}

// This thread's rows column: columns [c0, c0 + VEC) of a row of `width` (the reductions:
// channels of a real row, width = C), valid prefix cnt.
struct RowsColumn {
  u64 c0;
  int cnt;
};
template <typename T> __device__ __forceinline__ RowsColumn rows_column(u64 width) {
  constexpr int VEC = Vec<T>::N;
  RowsColumn rc;
  rc.c0 = ((u64)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  rc.cnt = rc.c0 < width ? (int)min((u64)VEC, width - rc.c0) : 0;  // width % VEC == 0: VEC or 0
  return rc;
}

// The super-row width of the rows maps (kernels/ABI.md, launch::rows_map_width on the host):
// P = lcm(C, 32*VEC), or numel rounded up to 32 when that is smaller (the tensor is then one
// partial super-row, whose columns need no period). Column j of a super-row holds channel
// j % C; P is a multiple of 32 (mask words never span super-rows) and of VEC, and a full-width
// P is a whole number of 32-column block rows (no idle lanes but in the last super-row). n >= 1.
template <typename T> __device__ __forceinline__ u64 rows_map_width(u64 C, u64 n) {
  constexpr u64 CH = 32u * Vec<T>::N;
  u64 p = C;
  while (p % CH != 0) p <<= 1;  // C * CH / gcd(C, CH): at most 8 doublings
  const u64 whole = (n + 31u) & ~(u64)31u;
  return p < whole ? p : whole;
}

// ------------------------------------------------------------------------------------------------
// Split reduction + last-block finalize (bn_stats, bn_backward reduce).
// ------------------------------------------------------------------------------------------------
// Publish-then-count, one release/acquire pair per block: the block's partial writes are ordered
// before thread 0 by the barrier, thread 0 fences once (release, cumulative over what the barrier
// ordered) and counts the block in; the block that sees arrivals-1 before it is the last of its
// group, fences once more (acquire) and shares the verdict through the second barrier before its
// threads read the partials with __ldcg (L2: never a stale L1 line). The last block resets the
// semaphore at once: every block of the group has counted itself in, so nothing else touches it
// in this launch, and it is zero again for the next one.
__device__ __forceinline__ bool arrive_last(unsigned* sem, unsigned arrivals, int* flag) {
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    __threadfence();
    const bool last = atomicAdd(sem, 1u) == arrivals - 1u;
    if (last) {
      *sem = 0u;
      __threadfence();
    }
    *flag = last;
  }
  __syncthreads();
  return *flag != 0;
}

// A policy P provides:
//   typedef Params;  static constexpr int PF (floats per partial);  template <int K> State;
//   template <T, I> PlanarAcc (ctor (p, c)) and RowsAcc (ctor (p, RowsColumn)): walk functors
//       with a member `st` (State<1> / State<VEC>);
//   static bool vec_ok(p) (16-byte alignment of the inputs);
//   store_partial(float* dst, const State<K>&, k), load_partial(State<K>&, const float* src, k)
//       (src read with __ldcg), finalize<T>(p, c, const State<1>&) (one channel);
//   State<K>::channel(src, stride, k) (channel k of a state parked in shared memory).
// One split (splits == 1): no partials, no semaphore; the block finalizes its own state.

// grid (splits, min(C, 65535)), block 256: block (s, y) reduces channels c = y, y + gridDim.y, ...
// The splits*8 warps of channel c split its units (planar_span: chunks of a plane, or G whole
// small planes) into contiguous ranges (warp s*8 + w takes range s*8 + w); partial to
// partials[c][s]; the last block of channel c merges partials[c][0..splits) (thread t: splits
// t, t+256, ... in order, then the block tree: at most ceil(splits/256) dependent loads per
// thread, launch::merge_depth) and finalizes c.
template <class P, typename T, typename I, int UNROLL>
__device__ __forceinline__ void split_reduce_planar(const typename P::Params& p) {
  typedef typename P::template State<1> S;
  constexpr int VEC = Vec<T>::N;
  constexpr int PF = P::PF;
  __shared__ float red[S::NF * kWarps];
  __shared__ int last_flag;
  const I C = (I)p.g.channels, inner = (I)p.g.inner;
  const unsigned splits = (unsigned)p.splits;
  const bool vec = inner % (I)VEC == 0 && P::vec_ok(p);
  PlanarSpan<I> sp = planar_span<T, I>(p.g);
  for (u64 c = blockIdx.y; c < (u64)C; c += gridDim.y) {
    typename P::template PlanarAcc<T, I> acc(p, c);
    sp.base = (I)c * inner;
    walk_planar<T, I, UNROLL>(acc, vec, sp, (u64)blockIdx.x * kWarps + (threadIdx.x >> 5), (u64)splits * kWarps);
    S s = block_reduce(acc.st, red);
    if (splits == 1) {
      if (threadIdx.x == 0) P::template finalize<T>(p, c, s);
    } else {
      // 32-bit partial offsets: the workspace holds C*splits*PF < 2^32 floats.
      if (threadIdx.x == 0) P::store_partial(p.partials + ((unsigned)c * splits + blockIdx.x) * PF, s, 0);
      if (arrive_last(p.semaphores + c, splits, &last_flag)) {  // syncs: red is free again
        S t = S::empty();
        for (unsigned i = threadIdx.x; i < splits; i += kThreads) {
          S q = S::empty();
          P::load_partial(q, p.partials + ((unsigned)c * splits + i) * PF, 0);
          t = S::merge(t, q);
        }
        t = block_reduce(t, red);
        if (threadIdx.x == 0) P::template finalize<T>(p, c, t);
      }
    }
    __syncthreads();  // red and last_flag are reused by the next channel
  }
}

// Partials merged per thread row and level of the rows merge: a level merges kMergeRun * by
// consecutive partials (launch::MERGE_RUN, launch::merge_depth on the host).
constexpr unsigned kMergeRun = 8;

// The rows merge of one level: thread (tx, ty) merges partials first + i*step, i = ty, ty + by,
// ... < count, of its column's channels (in order), then the column's y tree (thread (tx, 0)).
// col: the column's channel c0, split 0; kstride: floats between two channels' partials.
template <class P, class S, int VEC>
__device__ __forceinline__ S rows_merge(const float* col, unsigned kstride, int cnt, unsigned first, unsigned count,
                                        unsigned step, float* red) {
  S t = S::empty();
  for (unsigned i = threadIdx.y; i < count; i += blockDim.y) {
    S q = S::empty();
    const float* src = col + (first + i * step) * P::PF;
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      if (k < cnt) P::load_partial(q, src + k * kstride, k);
    t = S::merge(t, q);
  }
  return block_reduce_y(t, red);
}

// grid (ceil(C / (bx*VEC)), splits), block (bx, by), bx*by = 256: thread (tx, ty) of block
// (X, s) owns channels [c0, c0+VEC), c0 = (X*bx + tx)*VEC, rows ty + s*by + k*splits*by.
// Reduced over ty; partials[c][s]. Merge in at most two levels of run = kMergeRun*by partials,
// so no thread loads more than 2*kMergeRun partials one after another, whatever splits is:
//   splits <= run: the last block of tile X (semaphore X) merges partials[c][0..splits).
//   else, groups = ceil(splits / run): the last block of group g = s / run (semaphore
//   tiles + X*groups + g) merges its run [g*run, min((g+1)*run, splits)) into partials[c][g*run]
//   and counts in at semaphore X; the last of those merges partials[c][g*run], g < groups.
// Fixed order at each level: the result depends on splits (and by), never on the schedule.
template <class P, typename T, typename I, int UNROLL>
__device__ __forceinline__ void split_reduce_rows(const typename P::Params& p) {
  constexpr int VEC = Vec<T>::N;
  constexpr int PF = P::PF;
  typedef typename P::template State<VEC> S;
  __shared__ float red[S::NF * kThreads];
  __shared__ int last_flag;
  const I C = (I)p.g.channels, rows = (I)p.g.outer;
  const unsigned splits = (unsigned)p.splits;
  const RowsColumn rc = rows_column<T>(p.g.channels);
  const bool vec = C % (I)VEC == 0 && P::vec_ok(p);
  typename P::template RowsAcc<T, I> acc(p, rc);
  walk_rows<T, I, UNROLL>(acc, vec, rows, C, (I)rc.c0, rc.cnt, rc.cnt, (I)(blockIdx.y * blockDim.y + threadIdx.y),
                          (I)(gridDim.y * blockDim.y));
  S t = block_reduce_y(acc.st, red);
  if (splits > 1) {
    // Partials of channel c0 + k, split i at (c0*splits + i)*PF + k*splits*PF: 32-bit offsets
    // (the workspace holds C*splits*PF < 2^32 floats), one base per split, a stride per channel.
    const unsigned kstride = splits * PF;
    float* col = p.partials + (unsigned)rc.c0 * splits * PF;
    const unsigned run = kMergeRun * blockDim.y;
    const unsigned groups = (splits + run - 1) / run;
    unsigned slot = blockIdx.y, count = splits, step = 1;  // this block's partial; the final level
    if (groups > 1) {
      const unsigned g = blockIdx.y / run, first = g * run, len = min(run, splits - first);
      if (threadIdx.y == 0) {
#pragma unroll
        for (int k = 0; k < VEC; ++k)
          if (k < rc.cnt) P::store_partial(col + slot * PF + k * kstride, t, k);
      }
      if (!arrive_last(p.semaphores + gridDim.x + blockIdx.x * groups + g, len, &last_flag)) return;
      t = rows_merge<P, S, VEC>(col, kstride, rc.cnt, first, len, 1, red);
      slot = first;
      count = groups;
      step = run;
    }
    if (threadIdx.y == 0) {
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        if (k < rc.cnt) P::store_partial(col + slot * PF + k * kstride, t, k);
    }
    if (!arrive_last(p.semaphores + blockIdx.x, count, &last_flag)) return;
    t = rows_merge<P, S, VEC>(col, kstride, rc.cnt, 0, count, step, red);
  }
  // Park the column results in red, then finalize one channel per thread (threads (tx, ty)
  // take channels c0 + ty, c0 + ty + by, ...): few registers live in the finalize.
  __syncthreads();
  if (threadIdx.y == 0) {
#pragma unroll
    for (int i = 0; i < S::NF; ++i) red[i * kThreads + threadIdx.x] = t.v[i];
  }
  __syncthreads();
  for (int k = threadIdx.y; k < rc.cnt; k += blockDim.y)
    P::template finalize<T>(p, rc.c0 + k, S::channel(red + threadIdx.x, kThreads, k));
}

// ------------------------------------------------------------------------------------------------
// Elementwise maps (bn_normalize, bn_backward dx): out = op.apply(coef(c), in0, in1).
// An Op provides: typedef Coef; Coef coef(u64 c) const; float apply(const Coef&, float a, float b)
// const (b unused when NIN == 1). Coef{} (zero) is used for masked channels of a rows column.
//
// An epilogue Epi (NoEpilogue here; the ReLU ones in epilogue.cuh) adds memory streams and a
// per-slot transform around the op. Per slice the maps call:
//   load<V, STEP>(Frag&, slice)                 its own loads, issued with the map's
//   grad<V, STEP>(Frag&, Pack<T>& last, slice)  before the op; may rewrite the last input (dy)
//   out(const Frag&, k, y) -> float             after the op, slot k
//   store<V, STEP>(const Frag&, out, slice, group)  after the output is packed and stored
// and before the walk: aligned() (its pointers allow the 16-byte path). kCollective: store()
// synchronizes lanes, so consume() runs for idle slices too (cnt == 0: loads and stores are
// masked, nothing is written). group: lanes sharing a mask word on the STEP == 1 paths
// (32/VEC flat; min(32/VEC, bx) rows, = 32/VEC under the mask contract bx*VEC >= 32).
// ------------------------------------------------------------------------------------------------
template <typename T, typename I> struct NoEpilogue {
  static constexpr bool kCollective = false;
  static constexpr int kStreams = 0;  // 16-byte streams it adds per slice (unroll budgets)
  struct Frag {};
  __device__ __forceinline__ bool aligned() const { return true; }
  template <bool V, int STEP> __device__ __forceinline__ void load(Frag&, const Slice<I>&) const {}
  template <bool V, int STEP> __device__ __forceinline__ void grad(Frag&, Pack<T>&, const Slice<I>&) const {}
  __device__ __forceinline__ float out(const Frag&, int, float y) const { return y; }
  template <bool V, int STEP>
  __device__ __forceinline__ void store(const Frag&, const Pack<T>&, const Slice<I>&, unsigned) const {}
};

// The body shared by both maps once the slice's inputs and epilogue registers are at hand;
// coef_at(k) gives slot k's coefficients, called once per slot in slot order.
template <typename T, typename I, int NIN, bool V, int STEP, class Op, class Epi, class CoefAt>
__device__ __forceinline__ void map_slice(const Op& op, const Epi& epi, Pack<T> (&in)[NIN], typename Epi::Frag& e,
                                          CoefAt coef_at, Raw<T>* out, const Slice<I>& s, unsigned group) {
  constexpr int VEC = Vec<T>::N;
  epi.template grad<V, STEP>(e, in[NIN - 1], s);
  float a[VEC], b[VEC], y[VEC];
  unpack(in[0], a);
  if (NIN > 1) unpack(in[NIN - 1], b);
#pragma unroll
  for (int k = 0; k < VEC; ++k) y[k] = epi.out(e, k, op.apply(coef_at(k), a[k], NIN > 1 ? b[k] : 0.f));
  Pack<T> o;
  pack(o, y);
  store_slots<T, V, STEP>(out, o, s);
  epi.template store<V, STEP>(e, o, s, group);
}

// Channels-first maps walk the flat tensor (walk_flat): slot k's channel is stepped from the
// slice's place, and the coefficients of the last channel seen stay in registers, so a thread
// computes them once per channel it meets (once per plane for planes of CH or more elements), not
// once per unit: the eval kernels' 1/sqrt(running_var + eps) included.
template <typename T, typename I, int NIN, class Op, class Epi = NoEpilogue<T, I>> struct FlatMap {
  static constexpr int VEC = Vec<T>::N;
  struct Frag {
    Pack<T> in[NIN];
    typename Epi::Frag e;
  };
  const Raw<T>* in[NIN];
  Raw<T>* out;
  Op op;
  Epi epi;
  FlatGeom<I> fg;
  FlatPos<I> slot1, slot32;  // steps between slots: STEP == 1, STEP == 32
  unsigned cc;                // channel of cf (~0u: none yet)
  typename Op::Coef cf;
  // Slot k's coefficients, for k = 0, 1, ... in order: recomputed only when the channel changes.
  // Slots past cnt keep the last ones (their results are never stored).
  template <int STEP> struct SlotCoef {
    FlatMap& m;
    FlatPos<I> p;
    int cnt;
    __device__ __forceinline__ const typename Op::Coef& operator()(int k) {
      if (k < cnt && p.c != m.cc) {
        m.cc = p.c;
        m.cf = m.op.coef(p.c);
      }
      m.fg.advance(p, STEP == 1 ? m.slot1 : m.slot32);
      return m.cf;
    }
  };
  template <bool V, int STEP> __device__ __forceinline__ void load(Frag& fr, const Slice<I>& s) const {
#pragma unroll
    for (int i = 0; i < NIN; ++i) load_slots<T, V, STEP>(fr.in[i], in[i], s);
    epi.template load<V, STEP>(fr.e, s);
  }
  template <bool V, int STEP> __device__ __forceinline__ void consume(Frag& fr, const Slice<I>& s) {
    if (!Epi::kCollective && s.cnt <= 0) return;
    FlatPos<I> p;
    p.i = s.i;
    p.c = s.c;
    map_slice<T, I, NIN, V, STEP>(op, epi, fr.in, fr.e, SlotCoef<STEP>{*this, p, s.cnt}, out, s, 32u / VEC);
  }
};

// Channels-last maps walk super-rows (map_rows): a thread's VEC columns hold the same VEC
// channels in every super-row, so their coefficients are computed once and stay in registers.
template <typename T, typename I, int NIN, class Op, class Epi = NoEpilogue<T, I>> struct RowsMap {
  static constexpr int VEC = Vec<T>::N;
  struct Frag {
    Pack<T> in[NIN];
    typename Epi::Frag e;
  };
  struct SlotCoef {  // one channel per slot of a rows slice
    const typename Op::Coef (&cf)[VEC];
    __device__ __forceinline__ const typename Op::Coef& operator()(int k) const { return cf[k]; }
  };
  const Raw<T>* in[NIN];
  Raw<T>* out;
  Op op;
  Epi epi;
  unsigned group;             // lanes sharing a mask word: min(32/VEC, bx)
  typename Op::Coef cf[VEC];  // per-thread coefficients, computed once
  // Column c0 + k holds channel (c0 + k) % C: one division per thread, then stepped (C may be
  // below VEC: the channels then wrap more than once).
  __device__ __forceinline__ void init(const RowsColumn& rc, u64 C) {
    u64 ch = umod(rc.c0, C);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      cf[k] = k < rc.cnt ? op.coef(ch) : typename Op::Coef{};
      ch = ch + 1 == C ? 0 : ch + 1;
    }
    group = min(32u / VEC, blockDim.x);
  }
  template <bool V, int STEP> __device__ __forceinline__ void load(Frag& fr, const Slice<I>& s) const {
#pragma unroll
    for (int i = 0; i < NIN; ++i) load_slots<T, V, STEP>(fr.in[i], in[i], s);
    epi.template load<V, STEP>(fr.e, s);
  }
  template <bool V, int STEP> __device__ __forceinline__ void consume(Frag& fr, const Slice<I>& s) const {
    if (!Epi::kCollective && s.cnt <= 0) return;
    map_slice<T, I, NIN, V, STEP>(op, epi, fr.in, fr.e, SlotCoef{cf}, out, s, group);
  }
};

// grid (blocks), block 256: the grid's warps split the flat tensor's units (walk_flat).
template <typename T, typename I, int NIN, int UNROLL, class Op, class Epi = NoEpilogue<T, I>>
__device__ __forceinline__ void map_flat(const Geometry& g, const void* in0, const void* in1, void* out, const Op& op,
                                         const Epi& epi = Epi()) {
  constexpr int VEC = Vec<T>::N;
  const I n = (I)(g.outer * g.channels * g.inner);
  FlatMap<T, I, NIN, Op, Epi> f;
  f.in[0] = static_cast<const Raw<T>*>(in0);
  if (NIN > 1) f.in[NIN - 1] = static_cast<const Raw<T>*>(in1);
  f.out = static_cast<Raw<T>*>(out);
  f.op = op;
  f.epi = epi;
  f.fg.inner = (I)g.inner;
  f.fg.C = (unsigned)g.channels;
  f.slot1 = f.fg.at(1);
  f.slot32 = f.fg.at(32);
  f.cc = ~0u;
  f.cf = typename Op::Coef{};
  const bool vec = n % (I)VEC == 0 && aligned16(in0) && (NIN == 1 || aligned16(in1)) && aligned16(out) &&
                   epi.aligned();
  walk_flat<T, I, UNROLL>(f, vec, f.fg, n, (u64)blockIdx.x * kWarps + (threadIdx.x >> 5), (u64)gridDim.x * kWarps);
}

// Super-rows: the channels-last tensor (numel = outer*C values) as rows of P = rows_map_width
// values (lcm(C, 32*VEC), so column j is channel j % C in every super-row), the last one partial
// when P does not divide numel. grid (ceil(P / (bx*VEC)), row_blocks), block (bx, by),
// bx*by = 256; with a mask, bx*VEC >= 32 (launch::rows_block of P guarantees it: a mask word's
// 32 columns lie in one block row). 16-byte path when numel % VEC == 0 and the pointers are
// aligned, whatever C is (P % VEC == 0: every slice starts on a vector).
template <typename T, typename I, int NIN, int UNROLL, class Op, class Epi = NoEpilogue<T, I>>
__device__ __forceinline__ void map_rows(const Geometry& g, const void* in0, const void* in1, void* out,
                                         const Op& op, const Epi& epi = Epi()) {
  constexpr int VEC = Vec<T>::N;
  const u64 n = g.outer * g.channels;
  if (n == 0) return;  // the host launches nothing then; uniform anyway
  const u64 width = rows_map_width<T>(g.channels, n);  // <= numel rounded up to 32: fits I
  const u64 rows = udiv(n + width - 1, width);
  const RowsColumn rc = rows_column<T>(width);
  const u64 tail = n - (rows - 1) * width;  // values of the last super-row, 1..width
  const int last_cnt = rc.c0 < tail ? (int)min((u64)rc.cnt, tail - rc.c0) : 0;
  RowsMap<T, I, NIN, Op, Epi> f;
  f.in[0] = static_cast<const Raw<T>*>(in0);
  if (NIN > 1) f.in[NIN - 1] = static_cast<const Raw<T>*>(in1);
  f.out = static_cast<Raw<T>*>(out);
  f.op = op;
  f.epi = epi;
  f.init(rc, g.channels);
  const bool vec = n % VEC == 0 && aligned16(in0) && (NIN == 1 || aligned16(in1)) && aligned16(out) && epi.aligned();
  walk_rows<T, I, UNROLL, true>(f, vec, (I)rows, (I)width, (I)rc.c0, rc.cnt, last_cnt,
                                (I)(blockIdx.y * blockDim.y + threadIdx.y), (I)(gridDim.y * blockDim.y));
}

// ------------------------------------------------------------------------------------------------
// Grid-wide barrier of a cooperative launch (every block resident: cuLaunchCooperativeKernel).
// ------------------------------------------------------------------------------------------------
// One 32-bit word of the workspace, whose low 31 bits are 0 between barriers. Each block's
// thread 0, after the block's barrier (its writes ordered before it) and a release fence, adds 1,
// except block (0, 0), which adds 2^31 - (expected - 1): the arrivals of one barrier add exactly
// 2^31, so bit 31 flips when (and only when) the last one arrives, and the low bits are 0 again,
// ready for the next barrier or launch. The waiting threads spin on a volatile read of the word
// with __nanosleep until bit 31 differs from what their own add saw, then fence (acquire) and
// release their blocks. expected: the blocks of the grid (< 2^31), all of which must call it.
__device__ __forceinline__ void grid_barrier(unsigned* counter, unsigned expected) {
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    const bool first = blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0;
    const unsigned add = first ? 0x80000000u - (expected - 1u) : 1u;
    __threadfence();
    const unsigned seen = atomicAdd(counter, add);
    const volatile unsigned* word = counter;
    while (((seen ^ *word) & 0x80000000u) == 0u) __nanosleep(32);
    __threadfence();
  }
  __syncthreads();
}

}  // namespace bn

// ------------------------------------------------------------------------------------------------
// Entry-point stamping: X(dtype suffix, T, index suffix, I) for the 3 dtypes x 2 index widths.
// ------------------------------------------------------------------------------------------------
#define BN_FOR_EACH_TYPE(X)                                                                         \
  X(f32, float, i32, unsigned int)                                                                 \
  X(f32, float, i64, unsigned long long)                                                           \
  X(f16, __half, i32, unsigned int)                                                                \
  X(f16, __half, i64, unsigned long long)                                                          \
  X(bf16, __nv_bfloat16, i32, unsigned int)                                                        \
  X(bf16, __nv_bfloat16, i64, unsigned long long)

// One entry point: ONE params struct by value, forwarded to a device template (the variadic
// tail is the template-id, commas included).
#define BN_KERNEL(name, Params, ...) \
  extern "C" __global__ void __launch_bounds__(bn::kThreads) name(const Params p) { __VA_ARGS__(p); }
