// bn_fold.cu: fold an eval-mode batch norm into the preceding conv / linear / conv-transpose.
//
// bn_fold_<dt>  grid (blocks), block 256, 64-bit indices: grid-stride over the numel weight
//   elements, and over the c_out biases (thread t writes bias_out[t], t + grid, ...).
//   Output channel of weight element i:
//     o = (i / group_stride) * c_out_per_group + (i / inner_stride) % c_out_per_group
//   s = bn_weight[o] / sqrt((double)running_var[o] + eps)
//   weight_out[i] = round(weight_in[i] * s)
//   bias_out[o]   = round((conv_bias[o] - running_mean[o]) * s + bn_bias[o])
//   All in double, rounded once to T. Nullable: conv_bias (0), bn_weight (1), bn_bias (0).
//   weight_out may alias weight_in (each element is read, then written, by one thread).
// No shared memory. Host: group_stride, inner_stride, c_out_per_group > 0.
#include "common.cuh"

struct FoldParams {
  const void* weight_in;
  void* weight_out;
  const void* conv_bias;
  void* bias_out;
  const float* bn_weight;
  const float* bn_bias;
  const float* running_mean;
  const float* running_var;
  unsigned long long numel, c_out, group_stride, inner_stride, c_out_per_group;
  float eps;
};

namespace bn {

__device__ __forceinline__ double fold_scale(const FoldParams& p, u64 o) {
  const double w = p.bn_weight ? (double)p.bn_weight[o] : 1.0;
  return w / sqrt((double)p.running_var[o] + (double)p.eps);
}

template <typename T> __device__ __forceinline__ void fold(const FoldParams& p) {
  typedef Dtype<T> D;
  const Raw<T>* w_in = static_cast<const Raw<T>*>(p.weight_in);
  Raw<T>* w_out = static_cast<Raw<T>*>(p.weight_out);
  const Raw<T>* conv_bias = static_cast<const Raw<T>*>(p.conv_bias);
  Raw<T>* b_out = static_cast<Raw<T>*>(p.bias_out);
  const u64 first = (u64)blockIdx.x * blockDim.x + threadIdx.x;
  const u64 stride = (u64)gridDim.x * blockDim.x;
  for (u64 i = first; i < p.numel; i += stride) {
    const u64 o = udiv(i, p.group_stride) * p.c_out_per_group + umod(udiv(i, p.inner_stride), p.c_out_per_group);
    w_out[i] = D::from_d(D::to_d(w_in[i]) * fold_scale(p, o));
  }
  for (u64 o = first; o < p.c_out; o += stride) {
    const double cb = conv_bias ? D::to_d(conv_bias[o]) : 0.0;
    const double bb = p.bn_bias ? (double)p.bn_bias[o] : 0.0;
    // One fma, written out: nvcc would contract `(cb - mean) * s + bb` into one anyway (the host
    // would not), and the reference computes the same fma, so both agree to the bit.
    b_out[o] = D::from_d(fma(cb - (double)p.running_mean[o], fold_scale(p, o), bb));
  }
}

}  // namespace bn

#define BN_FOLD_ENTRY(dt, T) BN_KERNEL(bn_fold_##dt, FoldParams, bn::fold<T>)
BN_FOLD_ENTRY(f32, float)
BN_FOLD_ENTRY(f16, __half)
BN_FOLD_ENTRY(bf16, __nv_bfloat16)
