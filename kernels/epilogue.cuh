// epilogue.cuh: fused ReLU epilogues (kernels/ABI.md, "ReLU epilogues and the mask").
//
//   mask layout   one bit per element, flat for every tensor: the element at memory offset e
//                 is bit e % 32 of word e / 32, ceil(numel/32) words; the padding bits of the
//                 last word are 0. A function of the shape alone, independent of dtype and of
//                 the load path (vector or scalar): a mask written through one path is read
//                 correctly through the other. Slice::mw/mb (common.cuh) locate a slice's bits.
//   load_mask     a slice's bits (bit k = slot k), plain loads (lanes sharing a word broadcast;
//                 gathered slots of the packed planar walk: one word per slot).
//   store_mask    a slice's bits written without atomics: lanes sharing a word OR their bits by
//                 shuffles (STEP == 1) or ballot one word per slot (STEP == 32, flat scalar),
//                 then exactly one lane stores each word. Every word of an element in range is
//                 written by exactly one lane per launch: deterministic, no read-modify-write.
//   ReluEpilogue  forward: y = relu(op(x) [+ z]) and mask bit = (stored y > 0).
//   MaskedGrad    backward dx: dy_eff = bit ? dy : +0 before the op; [dz = dy_eff].
// relu(t) = t > 0 ? t : 0, except relu(NaN) = NaN (PyTorch's; fmaxf would give 0) and its mask
// bit is 0 (NaN > 0 is false), so dy_eff = 0 there, as PyTorch's threshold_backward(dy, y, 0).
#pragma once

#include "common.cuh"

namespace bn {

__device__ __forceinline__ unsigned lane_id() {
  unsigned lane;
  asm("mov.u32 %0, %%laneid;" : "=r"(lane));
  return lane;
}

template <int VEC, int STEP, bool V, typename I>
__device__ __forceinline__ unsigned load_mask(const unsigned* mask, const Slice<I>& s) {
  unsigned bits = 0;
  if (STEP == 1) {
    // Vector paths and the rows maps: one word holds all VEC bits (mb % VEC == 0, VEC divides
    // 32). The scalar rows reductions (real rows of C % VEC != 0 values) start anywhere: their
    // cnt bits may run into the next word, which then holds an element (< numel) and exists.
    // Bits past cnt are padding (0) or another lane's; the loaded slots there are 0 and never
    // stored.
    if (s.cnt > 0) {
      if (V || s.mb + (unsigned)s.cnt <= 32u) {
        bits = (__ldg(mask + s.mw) >> s.mb) & ((1u << VEC) - 1u);
      } else {
        const u64 two = (u64)__ldg(mask + s.mw) | (u64)__ldg(mask + s.mw + 1) << 32;
        bits = (unsigned)(two >> s.mb) & ((1u << VEC) - 1u);
      }
    }
  } else if (STEP == kGather) {
    // Packed planar slots (common.cuh, walk_packed_impl): element e = off + rel[k] anywhere in
    // up to VEC planes, so each slot reads its own word (the warp's 32 slots k cover a few
    // consecutive words per plane: L1 hits after the first). Not collective.
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      if (k < s.cnt) {
        const I e = s.off + (I)s.rel[k];
        bits |= ((__ldg(mask + (e >> 5)) >> ((unsigned)e & 31u)) & 1u) << k;
      }
  } else {
    // Lane l's slots are elements e0 + l + 32k (e0: lane 0's), so with mb0 = e0 % 32 slot k of
    // lane l is bit (mb0 + l) % 32 = mb of word mw0 + k + d, d = (mb0 + l) / 32 (0 or 1; always 0
    // on the flat walks, whose units start on a word; the planar walks' planes need not). Lane j
    // loads word mw0 + j for the words some lane needs (lane 0 has the most slots, lane
    // 32 - mb0 the most among d == 1), and the warp shares them by shuffles.
    const unsigned lane = lane_id();
    const unsigned mb0 = __shfl_sync(kFull, s.mb, 0);
    const unsigned d = (mb0 + lane) >> 5;
    const int c0 = __shfl_sync(kFull, s.cnt, 0);
    const int c1 = __shfl_sync(kFull, s.cnt, (32u - mb0) & 31u);
    const int words = mb0 != 0 && c1 > 0 ? max(c0, c1 + 1) : c0;
    const unsigned w = (int)lane < words ? __ldg(mask + (s.mw - (I)d) + (I)lane) : 0u;
#pragma unroll
    for (int k = 0; k < VEC; ++k) bits |= ((__shfl_sync(kFull, w, k + (int)d) >> s.mb) & 1u) << k;
  }
  return bits;
}

// Collective. STEP == 1 (flat vector path: group = 32/VEC; rows maps: group = min(32/VEC, bx)):
// the `group` aligned consecutive lanes share word mw (they are the same unit / super-row, so
// they run the same slices; super-rows are whole words); the group's first lane has mb == 0 and
// the lowest slots, so it stores the word when its slice is in range. The rows maps need
// bx*VEC >= 32 (launch::rows_block of the super-row width guarantees it), else two blocks, or
// two block rows, would share a word.
// STEP == 32 (flat scalar path, the whole warp): word mw + k = slot k of lanes 0..31 (bit =
// lane); lane k stores it when lane 0's slot k is in range (lane 0 has the most valid slots).
template <int VEC, int STEP, typename I>
__device__ __forceinline__ void store_mask(unsigned* mask, const Slice<I>& s, unsigned bits, unsigned group) {
  static_assert(STEP != kGather, "masks are written by the maps' walks (flat, rows), never gathered");
  const unsigned lane = lane_id();
  if (STEP == 1) {
    unsigned v = bits << s.mb;
    const unsigned lanes = group >= 32u ? kFull : ((1u << group) - 1u) << (lane & ~(group - 1u));
    for (unsigned off = group >> 1; off > 0; off >>= 1) v |= __shfl_xor_sync(lanes, v, off);
    if ((lane & (group - 1u)) == 0 && s.cnt > 0) mask[s.mw] = v;
  } else {
    unsigned w = 0;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const unsigned b = __ballot_sync(kFull, (bits >> k) & 1u);
      if (lane == (unsigned)k) w = b;
    }
    const int words = __shfl_sync(kFull, s.cnt, 0);
    if ((int)lane < words) mask[s.mw + (I)lane] = w;
  }
}

// relu with PyTorch's NaN: NaN <= 0 is false, so NaN passes through; -0 and negatives give +0.
__device__ __forceinline__ float relu(float t) { return t <= 0.f ? 0.f : t; }

// Forward: y = relu(op(x) + (ADD ? z : 0)), mask bit = (y as stored in T) > 0, so a positive
// value that rounds to 0 in f16/bf16 gets bit 0 like y itself. mask == null: no mask.
template <typename T, typename I, bool ADD> struct ReluEpilogue {
  static constexpr int VEC = Vec<T>::N;
  static constexpr bool kCollective = true;
  static constexpr int kStreams = ADD ? 1 : 0;  // z
  struct Frag {
    Pack<T> z;
  };
  const Raw<T>* z;  // ADD only
  unsigned* mask;   // nullable
  __device__ __forceinline__ ReluEpilogue(const void* z_, unsigned* mask_)
      : z(static_cast<const Raw<T>*>(z_)), mask(mask_) {}
  __device__ __forceinline__ ReluEpilogue() : z(nullptr), mask(nullptr) {}
  __device__ __forceinline__ bool aligned() const { return !ADD || aligned16(z); }
  template <bool V, int STEP> __device__ __forceinline__ void load(Frag& f, const Slice<I>& s) const {
    if (ADD) load_slots<T, V, STEP>(f.z, z, s);
  }
  template <bool V, int STEP> __device__ __forceinline__ void grad(Frag&, Pack<T>&, const Slice<I>&) const {}
  __device__ __forceinline__ float out(const Frag& f, int k, float y) const {
    return relu(ADD ? y + Dtype<T>::to_f(f.z.r[k]) : y);
  }
  template <bool V, int STEP>
  __device__ __forceinline__ void store(const Frag&, const Pack<T>& o, const Slice<I>& s, unsigned group) const {
    if (mask == nullptr) return;  // uniform over the grid
    unsigned bits = 0;
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      if (k < s.cnt && Dtype<T>::to_f(o.r[k]) > 0.f) bits |= 1u << k;
    store_mask<VEC, STEP>(mask, s, bits, group);
  }
};

// Zeroes the slots of p whose mask bit is 0 (+0 in every dtype; a NaN dy is dropped too). Works
// on the four 32-bit words of the vector (one AND each), not slot by slot: 16-bit slots stay
// packed in their registers.
template <typename T> __device__ __forceinline__ void mask_pack(Pack<T>& p, unsigned bits) {
  const auto keep = [bits](int k) { return 0u - ((bits >> k) & 1u); };  // all ones when bit k is set
  unsigned m[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    m[i] = sizeof(T) == 4 ? keep(i) : (keep(2 * i) & 0xffffu) | (keep(2 * i + 1) << 16);
  p.u.x &= m[0];
  p.u.y &= m[1];
  p.u.z &= m[2];
  p.u.w &= m[3];
}

// Backward dx: dy_eff = bit ? dy : 0 replaces dy before the op (the last map input is dy in
// both dx ops); DZ: dz = dy_eff is stored too (never null: the host launches the DZ kernels
// only with a dz, and with a dx; dz alone is the relu kernels' PassOp, see bn_backward.cu).
template <typename T, typename I, bool DZ> struct MaskedGrad {
  static constexpr int VEC = Vec<T>::N;
  static constexpr bool kCollective = false;
  static constexpr int kStreams = DZ ? 1 : 0;  // dz
  struct Frag {
    unsigned bits;
  };
  const unsigned* mask;
  Raw<T>* dz;  // DZ only
  __device__ __forceinline__ MaskedGrad(const unsigned* mask_, void* dz_)
      : mask(mask_), dz(static_cast<Raw<T>*>(dz_)) {}
  __device__ __forceinline__ MaskedGrad() : mask(nullptr), dz(nullptr) {}
  __device__ __forceinline__ bool aligned() const { return !DZ || aligned16(dz); }
  template <bool V, int STEP> __device__ __forceinline__ void load(Frag& f, const Slice<I>& s) const {
    f.bits = load_mask<VEC, STEP, V>(mask, s);
  }
  template <bool V, int STEP> __device__ __forceinline__ void grad(Frag& f, Pack<T>& dy, const Slice<I>& s) const {
    mask_pack(dy, f.bits);
    if (DZ) store_slots<T, V, STEP>(dz, dy, s);
  }
  __device__ __forceinline__ float out(const Frag&, int, float y) const { return y; }
  template <bool V, int STEP>
  __device__ __forceinline__ void store(const Frag&, const Pack<T>&, const Slice<I>&, unsigned) const {}
};

}  // namespace bn
