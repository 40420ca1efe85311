// bn_backward.cu: batch-norm backward, two launches (reduce, then dx).
//
// bn_backward_reduce_planar_<dt>_<ix>  grid (splits, min(C, 65535)), block 256     } the split
// bn_backward_reduce_rows_<dt>_<ix>    grid (ceil(C/(bx*VEC)), splits), block (bx,by) } reduction
//   of bn_stats (common.cuh), with per-channel state (sum dy, sum dy*(x - mean)) in f32: 16-byte
//   vector sums by a fixed pairwise tree, then thread -> warp -> block -> partials[c][split][2]
//   -> last block (split order). The last block writes dweight = invstd * sum dy*(x - mean) and
//   dbias = sum dy (= or +=), and coef[c] = (sum dy / m, sum dy*xhat / m) for the dx pass.
//   Shared memory: planar 2*8 floats; rows 2*VEC*256 floats (8 KB f32, 16 KB f16/bf16).
// bn_backward_dx_planar_<dt>_<ix>      grid (blocks), block 256          } the traversals of
// bn_backward_dx_rows_<dt>_<ix>        grid (ceil(P/(bx*VEC)), row_blocks) } bn_normalize (rows:
//   super-rows of P = lcm(C, 32*VEC) values, 16-byte path whenever numel % VEC == 0 and aligned)
//   dx = w*invstd * (dy - coef0 - xhat*coef1), xhat = (x - mean)*invstd, evaluated as
//   (dy - coef0 - (x - mean)*(coef1*invstd)) * (w*invstd) (PyTorch's grad_mean / proj_scale /
//   grad_scale). A double-float batch mean (mean, mean_lo) enters both passes as mean = hi
//   per element and lo per channel (the reduce's finalize, dx's grad_mean). coef == null: eval-mode backward dx = dy * (w*invstd), x is not read.
//   dx may alias dy. No shared memory.
//
// ReLU backward (epilogue.cuh): the same kernels with dy_eff = mask bit ? dy : 0 in place of dy.
// The mask is flat (bit e % 32 of word e / 32); the rows reductions walk real rows, whose slices
// may straddle two words when C % VEC != 0 (load_mask reads both).
// bn_backward_reduce_relu_{planar,rows}_<dt>_<ix>  BackwardReduceReluParams (relu and add_relu)
// bn_backward_dx_relu_{planar,rows}_<dt>_<ix>      BackwardElementwiseReluParams, dz ignored;
//   var_or_invstd == null: dx = dy_eff alone (PassOp; the host's dz-only request, dx := dz)
// bn_backward_dx_add_relu_{planar,rows}_<dt>_<ix>  dx and dz = dy_eff (both non-null)
//   dx and dz may alias dy.
#include "common.cuh"
#include "epilogue.cuh"

struct BackwardReduceParams {
  const void* x;
  const void* dy;
  const float* mean;
  const float* mean_lo;  // nullable (0): the low part of a double-float batch mean
  const float* var_or_invstd;
  float* partials;
  unsigned int* semaphores;
  float* dweight;
  float* dbias;
  float* coef;
  bn::Geometry g;
  float eps;
  int stat_is_var;
  int accumulate;
  int splits;
};

struct BackwardElementwiseParams {
  const void* x;
  const void* dy;
  void* dx;
  const float* mean;
  const float* mean_lo;  // nullable (0)
  const float* var_or_invstd;
  const float* weight;
  const float* coef;
  bn::Geometry g;
  float eps;
  int stat_is_var;
};

// The plain params, then the epilogue's (C++ derived structs: base fields first; Rust mirrors
// them with the base as the first field).
struct BackwardReduceReluParams : BackwardReduceParams {
  const unsigned int* mask;  // [mask words] from the relu forward
};
struct BackwardElementwiseReluParams : BackwardElementwiseParams {
  const unsigned int* mask;  // [mask words] from the relu forward
  void* dz;                  // T, nullable: add_relu's residual gradient (dx_add_relu only)
};
static_assert(sizeof(BackwardReduceParams) == 120 && sizeof(BackwardReduceReluParams) == 128, "Rust mirrors");
static_assert(sizeof(BackwardElementwiseParams) == 96 && sizeof(BackwardElementwiseReluParams) == 112,
              "Rust mirrors");

// The eval-mode backward in one pass: the reduce's fields (coef null: eval dx needs no sums),
// then the dx pass's outputs.
struct BackwardEvalParams : BackwardReduceParams {
  void* dx;                  // T, non-null; may alias dy
  const float* weight;       // [C] nullable (1)
  const unsigned int* mask;  // [mask words] nullable: a relu forward's mask, dy_eff = bit ? dy : 0
  void* dz;                  // T nullable: add_relu's dz = dy_eff (with a mask); may alias dy
};
static_assert(sizeof(BackwardEvalParams) == 152, "Rust mirror");

namespace bn {

// The mask of a reduce's params: none for the plain kernels.
__device__ __forceinline__ const unsigned* mask_of(const BackwardReduceParams&) { return nullptr; }
__device__ __forceinline__ const unsigned* mask_of(const BackwardReduceReluParams& p) { return p.mask; }

template <bool MASK, class A, class B> struct Pick {
  typedef A type;
};
template <class A, class B> struct Pick<false, A, B> {
  typedef B type;
};

// The sums of one planar slice of one channel's values: its valid slots [0, cnt) by a fixed
// pairwise tree, then added to the thread's state.
template <typename T>
__device__ __forceinline__ void add_sums(Sums2<1>& st, const Pack<T>& x, const Pack<T>& dy, const float (&mean)[1],
                                         int cnt) {
  constexpr int VEC = Vec<T>::N;
  float xv[VEC], g[VEC], gx[VEC];
  unpack(x, xv);
  unpack(dy, g);
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    g[k] = k < cnt ? g[k] : 0.f;  // masked slots: explicit 0 (also for a non-finite mean)
    gx[k] = k < cnt ? g[k] * (xv[k] - mean[0]) : 0.f;
  }
  st.a(0) += tree_sum(g);
  st.b(0) += tree_sum(gx);
}

// The sums of one row of a rows column (VEC channels). Masked channels read x = dy = 0 and mean
// 0: they add zeros, and are never written.
template <typename T>
__device__ __forceinline__ void add_sums(Sums2<Vec<T>::N>& st, const Pack<T>& x, const Pack<T>& dy,
                                         const float (&mean)[Vec<T>::N], int) {
  constexpr int VEC = Vec<T>::N;
  float xv[VEC], g[VEC];
  unpack(x, xv);
  unpack(dy, g);
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    st.a(k) += g[k];
    st.b(k) = fmaf(g[k], xv[k] - mean[k], st.b(k));
  }
}

// The accumulator of every backward reduction (split_reduce_planar / _rows): (sum dy_eff,
// sum dy_eff*(x - mean)) over K = 1 channel (planar) or a rows column's K = VEC channels (masked
// ones read mean 0). Out: what a kernel does with each slice besides the sums (the mask that
// turns dy into dy_eff, and the one-pass eval backward's dx and dz), with its per-channel state
// for the same K channels.
template <typename T, typename I, int K, class Out> struct XDyAcc {
  struct Frag {
    Pack<T> x, dy;
    unsigned bits;
  };
  const Raw<T>* x;
  const Raw<T>* dy;
  Out out;
  float mean[K];
  Sums2<K> st;
  template <class P>
  __device__ __forceinline__ XDyAcc(const P& p, u64 c)
      : x(static_cast<const Raw<T>*>(p.x)), dy(static_cast<const Raw<T>*>(p.dy)), out(p, c, 1),
        st(Sums2<K>::empty()) {
    mean[0] = p.mean[c];
  }
  template <class P>
  __device__ __forceinline__ XDyAcc(const P& p, const RowsColumn& rc)
      : x(static_cast<const Raw<T>*>(p.x)), dy(static_cast<const Raw<T>*>(p.dy)), out(p, rc.c0, rc.cnt),
        st(Sums2<K>::empty()) {
#pragma unroll
    for (int k = 0; k < K; ++k) mean[k] = k < rc.cnt ? p.mean[rc.c0 + k] : 0.f;
  }
  template <bool V, int STEP> __device__ __forceinline__ void load(Frag& fr, const Slice<I>& s) const {
    load_slots<T, V, STEP>(fr.x, x, s);
    load_slots<T, V, STEP>(fr.dy, dy, s);
    fr.bits = out.template load_bits<V, STEP>(s);
  }
  template <bool V, int STEP> __device__ __forceinline__ void consume(Frag& fr, const Slice<I>& s) {
    if (s.cnt <= 0) return;
    out.apply_mask(fr.dy, fr.bits);
    add_sums(st, fr.x, fr.dy, mean, s.cnt);
    out.template store<V, STEP>(fr.dy, s);
  }
};

// The reduce's slices: dy_eff = mask bit ? dy : 0 (MASK, the relu kernels), nothing written.
template <typename T, typename I, bool MASK> struct ReduceOut {
  const unsigned* mask;
  template <class P> __device__ __forceinline__ ReduceOut(const P& p, u64, int) : mask(mask_of(p)) {}
  template <bool V, int STEP> __device__ __forceinline__ unsigned load_bits(const Slice<I>& s) const {
    return MASK ? load_mask<Vec<T>::N, STEP, V>(mask, s) : 0u;
  }
  __device__ __forceinline__ void apply_mask(Pack<T>& dy, unsigned bits) const {
    if (MASK) mask_pack(dy, bits);
  }
  template <bool V, int STEP> __device__ __forceinline__ void store(const Pack<T>&, const Slice<I>&) const {}
};

// MASK: sums of dy_eff = mask bit ? dy : 0 (the relu kernels).
template <bool MASK> struct BackwardReduceT {
  typedef typename Pick<MASK, BackwardReduceReluParams, BackwardReduceParams>::type Params;
  static constexpr int PF = 2;  // (sum dy, sum dy*(x - mean))
  template <int K> using State = Sums2<K>;
  template <typename T, typename I> using PlanarAcc = XDyAcc<T, I, 1, ReduceOut<T, I, MASK>>;
  template <typename T, typename I> using RowsAcc = XDyAcc<T, I, Vec<T>::N, ReduceOut<T, I, MASK>>;

  static __device__ __forceinline__ bool vec_ok(const Params& p) { return aligned16(p.x) && aligned16(p.dy); }

  template <int K> static __device__ __forceinline__ void store_partial(float* dst, const Sums2<K>& s, int k) {
    dst[0] = s.a(k);
    dst[1] = s.b(k);
  }
  template <int K> static __device__ __forceinline__ void load_partial(Sums2<K>& s, const float* src, int k) {
    s.a(k) = __ldcg(src + 0);
    s.b(k) = __ldcg(src + 1);
  }

  // The walks sum dy*(x - hi); sum dy*(x - hi - lo) = that - lo*sum dy.
  template <typename T> static __device__ __forceinline__ void finalize(const Params& p, u64 c, const Sums2<1>& s) {
    const float sum_dy = s.a(0), sum_dy_xmu = fold_lo(s.b(0), load_or(p.mean_lo, c, 0.0f), sum_dy);
    const float invstd = invstd_of(p.var_or_invstd, c, p.stat_is_var, p.eps);
    const float gw = sum_dy_xmu * invstd;
    if (p.dweight) p.dweight[c] = p.accumulate ? p.dweight[c] + gw : gw;
    if (p.dbias) p.dbias[c] = p.accumulate ? p.dbias[c] + sum_dy : sum_dy;
    if (p.coef) {
      const float inv_m = (float)div_d(1.0, (double)(p.g.outer * p.g.inner));  // PyTorch's norm_fct = 1.0 / m
      p.coef[2 * c] = sum_dy * inv_m;
      p.coef[2 * c + 1] = sum_dy_xmu * inv_m * invstd;
    }
  }
};
typedef BackwardReduceT<false> BackwardReduce;

// Eval-mode backward in ONE pass (running statistics are constants, so dx needs no sums): the
// reduce's walk, grid, sums and finalize (dweight, dbias: bit for bit what bn_backward_reduce
// gives), and from the same registers dx = dy_eff * (w*invstd) (DxEvalOp's expression, so bit
// for bit bn_backward_dx's) [and dz = dy_eff]. x and dy are read once, dx written once: 3 passes
// instead of 4. The scale is a per-channel constant of each thread (planar: its channel; rows:
// its VEC channels), computed once.
// Slices in flight per thread in the one-pass eval backward over planes: 2, but 1 for 16-bit
// data with 64-bit indices, where ptxas 13.0 spills 4 bytes on sm_90 at 2 (the ptxas gate).
template <typename T, typename I> __host__ __device__ constexpr int eval_planar_unroll() {
  return sizeof(T) == 2 && sizeof(I) == 8 ? 1 : 2;
}

// The eval backward's slices: dy_eff (mask) first, then (after the sums) dz and
// dx = dy_eff * scale of each of the K channels (planar: one for every slot).
template <typename T, typename I, int K> struct EvalOut {
  static constexpr int VEC = Vec<T>::N;
  Raw<T>* dx;
  Raw<T>* dz;
  const unsigned* mask;
  float scale[K];
  __device__ __forceinline__ EvalOut(const BackwardEvalParams& p, u64 c0, int cnt)
      : dx(static_cast<Raw<T>*>(p.dx)), dz(static_cast<Raw<T>*>(p.dz)), mask(p.mask) {
#pragma unroll
    for (int k = 0; k < K; ++k)
      scale[k] = k < cnt ? load_or(p.weight, c0 + k, 1.0f) * invstd_of(p.var_or_invstd, c0 + k, p.stat_is_var, p.eps)
                         : 0.f;
  }
  template <bool V, int STEP> __device__ __forceinline__ unsigned load_bits(const Slice<I>& s) const {
    return mask ? load_mask<VEC, STEP, V>(mask, s) : 0u;  // mask: uniform, so load_mask stays collective
  }
  __device__ __forceinline__ void apply_mask(Pack<T>& dy, unsigned bits) const {
    if (mask) mask_pack(dy, bits);
  }
  template <bool V, int STEP> __device__ __forceinline__ void store(const Pack<T>& dy, const Slice<I>& s) const {
    if (dz) store_slots<T, V, STEP>(dz, dy, s);
    float g[VEC];
    unpack(dy, g);
#pragma unroll
    for (int k = 0; k < VEC; ++k) g[k] = g[k] * scale[K == 1 ? 0 : k];
    Pack<T> o;
    pack(o, g);
    store_slots<T, V, STEP>(dx, o, s);
  }
};

struct BackwardEval {
  typedef BackwardEvalParams Params;
  static constexpr int PF = BackwardReduce::PF;
  template <int K> using State = Sums2<K>;
  template <typename T, typename I> using PlanarAcc = XDyAcc<T, I, 1, EvalOut<T, I, 1>>;
  template <typename T, typename I> using RowsAcc = XDyAcc<T, I, Vec<T>::N, EvalOut<T, I, Vec<T>::N>>;

  static __device__ __forceinline__ bool vec_ok(const Params& p) {
    return aligned16(p.x) && aligned16(p.dy) && aligned16(p.dx) && (p.dz == nullptr || aligned16(p.dz));
  }
  template <int K> static __device__ __forceinline__ void store_partial(float* dst, const Sums2<K>& s, int k) {
    BackwardReduce::store_partial(dst, s, k);
  }
  template <int K> static __device__ __forceinline__ void load_partial(Sums2<K>& s, const float* src, int k) {
    BackwardReduce::load_partial(s, src, k);
  }
  template <typename T> static __device__ __forceinline__ void finalize(const Params& p, u64 c, const Sums2<1>& s) {
    BackwardReduce::template finalize<T>(p, c, s);
  }
};

// dx with batch statistics: coef = (sum dy / m, sum dy*xhat / m) from the reduce.
struct DxTrainOp {
  struct Coef {
    float mean, grad_mean, proj, scale;
  };
  const float* mean;
  const float* mean_lo;
  const float* var_or_invstd;
  const float* weight;
  const float* sums;  // BackwardElementwiseParams::coef
  float eps;
  int stat_is_var;
  // (x - hi - lo)*proj = (x - hi)*proj - lo*proj: lo is folded into grad_mean per channel.
  __device__ __forceinline__ Coef coef(u64 c) const {
    const float invstd = invstd_of(var_or_invstd, c, stat_is_var, eps);
    Coef k;
    k.mean = mean[c];
    k.proj = sums[2 * c + 1] * invstd;  // xhat*coef1 = (x - mean)*(coef1*invstd)
    k.grad_mean = fold_lo(sums[2 * c], load_or(mean_lo, c, 0.0f), k.proj);
    k.scale = load_or(weight, c, 1.0f) * invstd;
    return k;
  }
  __device__ __forceinline__ float apply(const Coef& k, float x, float dy) const {
    return (dy - k.grad_mean - (x - k.mean) * k.proj) * k.scale;
  }
};

// Eval-mode dx (running statistics are constants): dx = dy * (w*invstd); input 0 is dy.
struct DxEvalOp {
  struct Coef {
    float scale;
  };
  const float* var_or_invstd;
  const float* weight;
  float eps;
  int stat_is_var;
  __device__ __forceinline__ Coef coef(u64 c) const {
    Coef k;
    k.scale = load_or(weight, c, 1.0f) * invstd_of(var_or_invstd, c, stat_is_var, eps);
    return k;
  }
  __device__ __forceinline__ float apply(const Coef& k, float dy, float) const { return dy * k.scale; }
};

// One dx for every epilogue (NoEpilogue, or MaskedGrad for the relu kernels).
template <bool ROWS, typename T, typename I, class Epi>
__device__ __forceinline__ void backward_dx(const BackwardElementwiseParams& p, const Epi& epi) {
  // Slices per iteration from the 16-byte streams per slice (x, dy, and dz for add_relu).
  constexpr int S = Epi::kStreams;
  if (p.coef) {
    DxTrainOp op;
    op.mean = p.mean;
    op.mean_lo = p.mean_lo;
    op.var_or_invstd = p.var_or_invstd;
    op.weight = p.weight;
    op.sums = p.coef;
    op.eps = p.eps;
    op.stat_is_var = p.stat_is_var;
    if (ROWS) map_rows<T, I, 2, rows_unroll<T, 2 + S>()>(p.g, p.x, p.dy, p.dx, op, epi);
    else map_flat<T, I, 2, 2>(p.g, p.x, p.dy, p.dx, op, epi);
  } else {
    DxEvalOp op;
    op.var_or_invstd = p.var_or_invstd;
    op.weight = p.weight;
    op.eps = p.eps;
    op.stat_is_var = p.stat_is_var;
    if (ROWS) map_rows<T, I, 1, rows_unroll<T, 1 + S>()>(p.g, p.dy, nullptr, p.dx, op, epi);
    else map_flat<T, I, 1, sizeof(T) == 4 && S == 0 ? 4 : 2>(p.g, p.dy, nullptr, p.dx, op, epi);
  }
}

template <bool ROWS, typename T, typename I>
__device__ __forceinline__ void backward_dx_plain(const BackwardElementwiseParams& p) {
  backward_dx<ROWS, T, I>(p, NoEpilogue<T, I>());
}
// The ReLU backward alone, dx = dy_eff (input 0 is dy): how the host gets dz = dy_eff when dx
// is not wanted (dx_relu with dx := dz, var_or_invstd == null).
struct PassOp {
  struct Coef {};
  __device__ __forceinline__ Coef coef(u64) const { return Coef{}; }
  __device__ __forceinline__ float apply(const Coef&, float dy, float) const { return dy; }
};

template <bool ROWS, bool DZ, typename T, typename I>
__device__ __forceinline__ void backward_dx_relu(const BackwardElementwiseReluParams& p) {
  const MaskedGrad<T, I, DZ> epi(p.mask, p.dz);
  if (!DZ && p.var_or_invstd == nullptr) {
    if (ROWS) map_rows<T, I, 1, rows_unroll<T, 1>()>(p.g, p.dy, nullptr, p.dx, PassOp(), epi);
    else map_flat<T, I, 1, 4>(p.g, p.dy, nullptr, p.dx, PassOp(), epi);
    return;
  }
  backward_dx<ROWS, T, I>(p, epi);
}

}  // namespace bn

#define BN_BACKWARD_ENTRIES(dt, T, ix, I)                                                                      \
  BN_KERNEL(bn_backward_reduce_planar_##dt##_##ix, BackwardReduceParams,                                      \
            bn::split_reduce_planar<bn::BackwardReduce, T, I, 2>)                                              \
  BN_KERNEL(bn_backward_reduce_rows_##dt##_##ix, BackwardReduceParams, bn::split_reduce_rows<bn::BackwardReduce, T, I, bn::rows_unroll<T, 2>()>) \
  BN_KERNEL(bn_backward_dx_planar_##dt##_##ix, BackwardElementwiseParams, bn::backward_dx_plain<false, T, I>) \
  BN_KERNEL(bn_backward_dx_rows_##dt##_##ix, BackwardElementwiseParams, bn::backward_dx_plain<true, T, I>)    \
  BN_KERNEL(bn_backward_reduce_relu_planar_##dt##_##ix, BackwardReduceReluParams,                             \
            bn::split_reduce_planar<bn::BackwardReduceT<true>, T, I, 2>)                                       \
  BN_KERNEL(bn_backward_reduce_relu_rows_##dt##_##ix, BackwardReduceReluParams,                               \
            bn::split_reduce_rows<bn::BackwardReduceT<true>, T, I, bn::rows_unroll<T, 2>()>)                   \
  BN_KERNEL(bn_backward_dx_relu_planar_##dt##_##ix, BackwardElementwiseReluParams,                            \
            bn::backward_dx_relu<false, false, T, I>)                                                          \
  BN_KERNEL(bn_backward_dx_relu_rows_##dt##_##ix, BackwardElementwiseReluParams,                              \
            bn::backward_dx_relu<true, false, T, I>)                                                           \
  BN_KERNEL(bn_backward_dx_add_relu_planar_##dt##_##ix, BackwardElementwiseReluParams,                        \
            bn::backward_dx_relu<false, true, T, I>)                                                           \
  BN_KERNEL(bn_backward_dx_add_relu_rows_##dt##_##ix, BackwardElementwiseReluParams,                          \
            bn::backward_dx_relu<true, true, T, I>)                                                            \
  BN_KERNEL(bn_backward_eval_planar_##dt##_##ix, BackwardEvalParams,                                          \
            bn::split_reduce_planar<bn::BackwardEval, T, I, bn::eval_planar_unroll<T, I>()>)                  \
  BN_KERNEL(bn_backward_eval_rows_##dt##_##ix, BackwardEvalParams,                                             \
            bn::split_reduce_rows<bn::BackwardEval, T, I, bn::rows_unroll<T, 2>()>)

BN_FOR_EACH_TYPE(BN_BACKWARD_ENTRIES)
