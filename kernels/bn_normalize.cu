// bn_normalize.cu: y = (x - mean[c]) * (weight[c] * invstd[c]) + bias[c]  (training forward
// second pass, and the whole eval forward). The training mean is a double-float (mean, mean_lo;
// common.cuh MeanPair); mean_lo is folded into the bias per channel.
//
// bn_normalize_planar_<dt>_<ix>  (inner > 1)   grid (blocks), block 256: the grid's warps split
//   the flat tensor's warp units (32 lanes x VEC consecutive values, spanning planes) into
//   contiguous ranges, from the tail (common.cuh, walk_flat); every slot's channel is stepped
//   without division, and a thread recomputes coefficients only when its channel changes.
// bn_normalize_rows_<dt>_<ix>    (inner == 1)  grid (ceil(P / (bx*VEC)), row_blocks), block
//   (bx, by): the tensor as super-rows of P = lcm(C, 32*VEC) values (common.cuh, map_rows), so
//   each thread's VEC columns hold the same channels in every super-row: it
//   computes their coefficients once, then strides super-rows (C = 3, 100, 257 included).
// No shared memory. 16-byte loads/stores when numel % VEC == 0 (any plane size, any C) and x, y
// are 16-byte aligned; scalar otherwise. y may equal x (every element is read and then
// written by the same thread). Not x*a + b with b = bias - mean*a: that cancels for large means;
// a constant channel gives (x - mean) == 0 and y == bias exactly.
//
// Fused ReLU epilogues (epilogue.cuh), same grids, NormalizeReluParams:
// bn_normalize_relu_{planar,rows}_<dt>_<ix>      y = relu(BN(x)),     mask bit = y > 0
// bn_normalize_add_relu_{planar,rows}_<dt>_<ix>  y = relu(BN(x) + z), mask bit = y > 0
//   BN(x) + z in f32, rounded once to T; relu(NaN) = NaN with bit 0. mask nullable (no mask);
//   y may equal x or z. The 16-byte path also needs z aligned. Planar unroll 2 (4 for f32
//   without z), rows_unroll<T, 2> with z.
#include "common.cuh"
#include "epilogue.cuh"
#include "normalize_op.cuh"

struct NormalizeParams {
  const void* x;
  void* y;
  const float* mean;
  const float* mean_lo;  // nullable (0): the low part of a double-float batch mean
  const float* var_or_invstd;
  const float* weight;
  const float* bias;
  bn::Geometry g;
  float eps;
  int stat_is_var;
};

// The plain params, then the epilogue's (a C++ derived struct: base fields first; Rust mirrors
// it with the base as its first field).
struct NormalizeReluParams : NormalizeParams {
  const void* z;        // T, the residual (add_relu entries only; ignored by relu)
  unsigned int* mask;   // [mask words] out, nullable: no mask
};
static_assert(sizeof(NormalizeParams) == 88 && sizeof(NormalizeReluParams) == 104, "Rust mirrors");

namespace bn {

__device__ __forceinline__ NormalizeOp normalize_op(const NormalizeParams& p) {
  NormalizeOp op;
  op.mean = p.mean;
  op.mean_lo = p.mean_lo;
  op.var_or_invstd = p.var_or_invstd;
  op.weight = p.weight;
  op.bias = p.bias;
  op.eps = p.eps;
  op.stat_is_var = p.stat_is_var;
  return op;
}

// One normalize for every epilogue; NIN = 16-byte loads per slice (x, and z for add_relu).
template <bool ROWS, typename T, typename I, int NIN, class Epi>
__device__ __forceinline__ void normalize(const NormalizeParams& p, const Epi& epi) {
  if (ROWS) map_rows<T, I, 1, rows_unroll<T, NIN>()>(p.g, p.x, nullptr, p.y, normalize_op(p), epi);
  else map_flat<T, I, 1, sizeof(T) == 4 && NIN == 1 ? 4 : 2>(p.g, p.x, nullptr, p.y, normalize_op(p), epi);
}

template <bool ROWS, typename T, typename I> __device__ __forceinline__ void normalize_plain(const NormalizeParams& p) {
  normalize<ROWS, T, I, 1>(p, NoEpilogue<T, I>());
}

template <bool ROWS, bool ADD, typename T, typename I>
__device__ __forceinline__ void normalize_relu(const NormalizeReluParams& p) {
  normalize<ROWS, T, I, ADD ? 2 : 1>(p, ReluEpilogue<T, I, ADD>(p.z, p.mask));
}

}  // namespace bn

#define BN_NORMALIZE_ENTRIES(dt, T, ix, I)                                                                         \
  BN_KERNEL(bn_normalize_planar_##dt##_##ix, NormalizeParams, bn::normalize_plain<false, T, I>)                    \
  BN_KERNEL(bn_normalize_rows_##dt##_##ix, NormalizeParams, bn::normalize_plain<true, T, I>)                       \
  BN_KERNEL(bn_normalize_relu_planar_##dt##_##ix, NormalizeReluParams, bn::normalize_relu<false, false, T, I>)     \
  BN_KERNEL(bn_normalize_relu_rows_##dt##_##ix, NormalizeReluParams, bn::normalize_relu<true, false, T, I>)        \
  BN_KERNEL(bn_normalize_add_relu_planar_##dt##_##ix, NormalizeReluParams, bn::normalize_relu<false, true, T, I>)  \
  BN_KERNEL(bn_normalize_add_relu_rows_##dt##_##ix, NormalizeReluParams, bn::normalize_relu<true, true, T, I>)

BN_FOR_EACH_TYPE(BN_NORMALIZE_ENTRIES)
