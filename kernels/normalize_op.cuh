// normalize_op.cuh: the normalize of a forward, y = (x - mean[c]) * (weight[c] * invstd[c]) +
// bias[c] with the mean a double-float (mean, mean_lo), as an elementwise-map Op (common.cuh):
// bn_normalize.cu's passes and bn_onchip.cu's single pass share it.
#pragma once

#include "common.cuh"

namespace bn {

struct NormalizeOp {
  struct Coef {
    float mean, scale, bias;
  };
  const float* mean;
  const float* mean_lo;
  const float* var_or_invstd;
  const float* weight;
  const float* bias;
  float eps;
  int stat_is_var;
  // (x - hi - lo)*scale + bias = (x - hi)*scale + (bias - lo*scale): x - hi is exact for x near
  // the mean (Sterbenz), and lo*scale is far below |bias| or the spread, so folding it into the
  // bias costs one rounding at the scale of y and nothing per element.
  __device__ __forceinline__ Coef coef(u64 c) const {
    Coef k;
    k.mean = mean[c];
    k.scale = load_or(weight, c, 1.0f) * invstd_of(var_or_invstd, c, stat_is_var, eps);
    k.bias = fold_lo(load_or(bias, c, 0.0f), load_or(mean_lo, c, 0.0f), k.scale);
    return k;
  }
  __device__ __forceinline__ float apply(const Coef& k, float x, float) const {
    return (x - k.mean) * k.scale + k.bias;
  }
};

}  // namespace bn
