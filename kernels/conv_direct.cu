// conv_direct.cu: a DIRECT convolution, a correctness tool, NOT a fast kernel. It is the GPU side
// of the end-to-end fold check (tests/fold_e2e.rs: BN(conv(x)) == conv'(x) with the folded
// weights, convolutions on the device) and is tested against the CPU reference
// (src/reference/conv.rs, whose docs table gives the definitions used here). One thread per output
// element, plain loops over the receptive field, no shared memory, no tiling, no vector loads:
// every line is meant to be checked by reading it. Do not use it where speed matters (cuDNN).
//
// conv_direct_<dt>  grid (blocks), block 256, 64-bit indices, grid-stride over the numel outputs.
//   One entry point per dtype covers ConvNd, ConvTransposeNd (transposed = 1) and Linear (a conv
//   with no spatial dimension): the host pads every spatial quantity to 3 dimensions with a
//   length-1 input, output and kernel, stride 1, padding 0, dilation 1, which changes nothing.
//   Activations channels-first: x [N, C_in, L0, L1, L2], y [N, C_out, O0, O1, O2].
//   Weight [A0, A1, k0, k1, k2] (channels-first) or [A0, k0, k1, k2, A1] (channels-last), with
//   (A0, A1) = (C_out, C_in/G) for a conv, (C_in, C_out/G) for a transposed conv; axis1 = A1.
//   Output element (n, o, q): g = o / (C_out/G); for c < C_in/G (input channel ch = g C_in/G + c)
//   and every tap j = (j0, j1, j2) whose source position i exists in every dimension,
//     conv:            i = q s + j d - p                     (0 <= i < L)
//     transposed conv: the i with i s + j d - p = q           (0 <= i < L)
//   acc += W[a0, a1, j] * x[n, ch, i] with (a0, a1) = (o, c) (conv) or (ch, o mod C_out/G)
//   (transposed), in f32 with one fmaf per product, in the order (c, j0, j1, j2) of the reference;
//   then acc += bias[o] (nullable) and y = round(acc) to T, once.
// Element offsets (and numel) are 64-bit; coordinates (n excepted) are 32-bit. Host guarantees
// (src/gpu/conv.rs): the reference's validation of the layer (every output length >= 1, C_in/G
// and C_out/G >= 1, stride >= 1); N, C_in, C_out and every L, O, k, s, p, d below 2^31, and for
// a conv (O-1) s + (k-1) d below 2^31, so no 32-bit position wraps (conv: q s + j d; transposed:
// q + p < 2^32, and i s <= q + p - j d); numel = N C_out O0 O1 O2 > 0; blockDim.x * gridDim.x
// < 2^32.
#include "common.cuh"

struct ConvDirectParams {
  const void* x;       // T [N, c_in, input[0], input[1], input[2]]
  const void* weight;  // T, layout above
  const void* bias;    // T [c_out], nullable (0)
  void* y;             // T [N, c_out, output[0], output[1], output[2]], fully overwritten
  unsigned long long c_in, c_out, c_in_per_group, c_out_per_group, axis1;
  unsigned long long numel;  // N * c_out * output[0] * output[1] * output[2]
  unsigned int input[3], output[3], kernel[3], stride[3], padding[3], dilation[3];
  int transposed;            // 1: ConvTransposeNd
  int weight_channels_last;  // 1: weight [A0, k..., A1]
};
static_assert(sizeof(ConvDirectParams) == 160, "Rust mirror: ConvDirectParams in src/gpu/params.rs");

namespace bn {

// The input position that tap j reads for output position q along dimension D, or -1 (none:
// outside the input, or, transposed, no integer i).
template <int D> __device__ __forceinline__ int conv_source(const ConvDirectParams& p, unsigned q, unsigned j) {
  const unsigned s = p.stride[D], pad = p.padding[D], jd = j * p.dilation[D];
  unsigned i;
  if (p.transposed) {
    const unsigned t = q + pad;  // i s = q + p - j d
    if (t < jd) return -1;
    i = (t - jd) / s;
    if (i * s != t - jd) return -1;
  } else {
    const unsigned t = q * s + jd;  // i = q s + j d - p
    if (t < pad) return -1;
    i = t - pad;
  }
  return i < p.input[D] ? (int)i : -1;
}

// An output element's coordinates (n, o, q0, q1, q2): the mixed-radix digits of its flat index
// in [N, C_out, O0, O1, O2], q2 fastest.
struct OutPos {
  u64 n;
  unsigned o, q0, q1, q2;
};

// The coordinates of flat index idx < 2^32 (the first index of a thread and the grid stride, both
// below blockDim.x * gridDim.x < 2^32: 32-bit divisions only, none in the loop).
__device__ __forceinline__ OutPos out_pos(const ConvDirectParams& p, unsigned idx) {
  OutPos r;
  r.q2 = idx % p.output[2];
  idx /= p.output[2];
  r.q1 = idx % p.output[1];
  idx /= p.output[1];
  r.q0 = idx % p.output[0];
  idx /= p.output[0];
  r.o = idx % (unsigned)p.c_out;
  r.n = idx / (unsigned)p.c_out;
  return r;
}

// digit += step + carry_in with the radix subtracted once on overflow (digit, step < radix < 2^31,
// so the sum is below 2 radix and does not wrap); returns the carry out.
__device__ __forceinline__ unsigned add_digit(unsigned& digit, unsigned step, unsigned carry, unsigned radix) {
  digit += step + carry;
  if (digit < radix) return 0;
  digit -= radix;
  return 1;
}

// pos += step, digit by digit: the grid stride is decomposed once, so the loop divides nothing
// but the group (64-bit divisions cost registers and spills: see udiv in common.cuh).
__device__ __forceinline__ void advance(OutPos& pos, const OutPos& step, const ConvDirectParams& p) {
  unsigned carry = add_digit(pos.q2, step.q2, 0, p.output[2]);
  carry = add_digit(pos.q1, step.q1, carry, p.output[1]);
  carry = add_digit(pos.q0, step.q0, carry, p.output[0]);
  carry = add_digit(pos.o, step.o, carry, (unsigned)p.c_out);
  pos.n += step.n + carry;
}

template <typename T> __device__ __forceinline__ void conv_direct(const ConvDirectParams& p) {
  typedef Dtype<T> D;
  const Raw<T>* x = static_cast<const Raw<T>*>(p.x);
  const Raw<T>* w = static_cast<const Raw<T>*>(p.weight);
  const Raw<T>* bias = static_cast<const Raw<T>*>(p.bias);
  Raw<T>* y = static_cast<Raw<T>*>(p.y);
  const unsigned k0 = p.kernel[0], k1 = p.kernel[1], k2 = p.kernel[2];
  const u64 kernel_volume = (u64)k0 * k1 * k2;
  const unsigned first = blockIdx.x * blockDim.x + threadIdx.x, stride = gridDim.x * blockDim.x;
  OutPos pos = out_pos(p, first);
  const OutPos step = out_pos(p, stride);
  for (u64 idx = first; idx < p.numel; idx += stride, advance(pos, step, p)) {
    const u64 o = pos.o, n = pos.n;
    const u64 g = pos.o / (unsigned)p.c_out_per_group;  // C_out < 2^31
    float acc = 0.f;
    for (u64 c = 0; c < p.c_in_per_group; ++c) {
      const u64 ch = g * p.c_in_per_group + c;
      const u64 a0 = p.transposed ? ch : o;
      const u64 a1 = p.transposed ? o - g * p.c_out_per_group : c;
      for (unsigned j0 = 0; j0 < k0; ++j0) {
        const int i0 = conv_source<0>(p, pos.q0, j0);
        if (i0 < 0) continue;
        for (unsigned j1 = 0; j1 < k1; ++j1) {
          const int i1 = conv_source<1>(p, pos.q1, j1);
          if (i1 < 0) continue;
          for (unsigned j2 = 0; j2 < k2; ++j2) {
            const int i2 = conv_source<2>(p, pos.q2, j2);
            if (i2 < 0) continue;
            const u64 j = ((u64)j0 * k1 + j1) * k2 + j2;
            const u64 wi = p.weight_channels_last ? (a0 * kernel_volume + j) * p.axis1 + a1
                                                  : (a0 * p.axis1 + a1) * kernel_volume + j;
            const u64 xi = (((n * p.c_in + ch) * p.input[0] + (u64)i0) * p.input[1] + (u64)i1) * p.input[2] + (u64)i2;
            acc = fmaf(D::to_f(w[wi]), D::to_f(x[xi]), acc);
          }
        }
      }
    }
    if (bias) acc += D::to_f(bias[o]);
    y[idx] = D::from_f(acc);
  }
}

}  // namespace bn

// As BN_KERNEL, but with a minimum of one block per SM: without it ptxas trades registers for
// occupancy on this kernel (48 registers and spills for f32); a correctness tool needs no occupancy.
#define BN_CONV_DIRECT_ENTRY(dt, T)                                                              \
  extern "C" __global__ void __launch_bounds__(bn::kThreads, 1) conv_direct_##dt(const ConvDirectParams p) { \
    bn::conv_direct<T>(p);                                                                       \
  }
BN_CONV_DIRECT_ENTRY(f32, float)
BN_CONV_DIRECT_ENTRY(f16, __half)
BN_CONV_DIRECT_ENTRY(bf16, __nv_bfloat16)
