//! `#[repr(C)]` mirrors of the kernels' parameter structs (`kernels/*.cu`). Each kernel takes
//! one of these by value; device pointers travel as `u64`, 0 meaning "absent".

use crate::shape::Geometry;
use cudarc::driver::DeviceRepr;

/// `struct Geometry` of `kernels/common.cuh`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct GeometryParams {
    pub outer: u64,
    pub channels: u64,
    pub inner: u64,
}

impl From<Geometry> for GeometryParams {
    fn from(g: Geometry) -> Self {
        Self {
            outer: g.outer as u64,
            channels: g.channels as u64,
            inner: g.inner as u64,
        }
    }
}

/// `struct StatsParams` of `kernels/bn_stats.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct StatsParams {
    pub x: u64,
    pub partials: u64,
    pub semaphores: u64,
    pub save_mean: u64,
    pub save_mean_lo: u64,
    pub save_invstd: u64,
    pub running_mean: u64,
    pub running_var: u64,
    pub g: GeometryParams,
    pub eps: f32,
    pub factor: f32,
    pub unbiased: i32,
    pub splits: i32,
}

/// `struct OnchipParams` of `kernels/bn_onchip.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct OnchipParams {
    pub x: u64,
    pub y: u64,
    pub weight: u64,
    pub bias: u64,
    pub partials: u64,
    pub barrier: u64,
    pub save_mean: u64,
    pub save_mean_lo: u64,
    pub save_invstd: u64,
    pub running_mean: u64,
    pub running_var: u64,
    pub g: GeometryParams,
    pub eps: f32,
    pub factor: f32,
    pub unbiased: i32,
    pub splits: i32,
}

/// `struct NormalizeParams` of `kernels/bn_normalize.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct NormalizeParams {
    pub x: u64,
    pub y: u64,
    pub mean: u64,
    pub mean_lo: u64,
    pub var_or_invstd: u64,
    pub weight: u64,
    pub bias: u64,
    pub g: GeometryParams,
    pub eps: f32,
    pub stat_is_var: i32,
}

/// `struct BackwardReduceParams` of `kernels/bn_backward.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct BackwardReduceParams {
    pub x: u64,
    pub dy: u64,
    pub mean: u64,
    pub mean_lo: u64,
    pub var_or_invstd: u64,
    pub partials: u64,
    pub semaphores: u64,
    pub dweight: u64,
    pub dbias: u64,
    pub coef: u64,
    pub g: GeometryParams,
    pub eps: f32,
    pub stat_is_var: i32,
    pub accumulate: i32,
    pub splits: i32,
}

/// `struct BackwardElementwiseParams` of `kernels/bn_backward.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct BackwardElementwiseParams {
    pub x: u64,
    pub dy: u64,
    pub dx: u64,
    pub mean: u64,
    pub mean_lo: u64,
    pub var_or_invstd: u64,
    pub weight: u64,
    pub coef: u64,
    pub g: GeometryParams,
    pub eps: f32,
    pub stat_is_var: i32,
}

/// `struct FoldParams` of `kernels/bn_fold.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct FoldParams {
    pub weight_in: u64,
    pub weight_out: u64,
    pub conv_bias: u64,
    pub bias_out: u64,
    pub bn_weight: u64,
    pub bn_bias: u64,
    pub running_mean: u64,
    pub running_var: u64,
    pub numel: u64,
    pub c_out: u64,
    pub group_stride: u64,
    pub inner_stride: u64,
    pub c_out_per_group: u64,
    pub eps: f32,
}

/// `struct SyncMomentsParams` of `kernels/bn_sync.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct SyncMomentsParams {
    pub x: u64,
    pub partials: u64,
    pub semaphores: u64,
    pub moments: u64,
    pub g: GeometryParams,
    pub splits: i32,
}

/// `struct SyncMergeParams` of `kernels/bn_sync.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct SyncMergeParams {
    pub gathered: u64,
    pub save_mean: u64,
    pub save_mean_lo: u64,
    pub save_invstd: u64,
    pub running_mean: u64,
    pub running_var: u64,
    pub total: u64,
    pub ranks: u64,
    pub channels: u64,
    pub eps: f32,
    pub factor: f32,
    pub unbiased: i32,
}

/// `struct SyncCoefficientsParams` of `kernels/bn_sync.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct SyncCoefficientsParams {
    pub local: u64,
    pub global: u64,
    pub total: u64,
    pub coef: u64,
    pub dweight: u64,
    pub dbias: u64,
    pub channels: u64,
    pub accumulate: i32,
}

/// `struct NormalizeReluParams` of `kernels/bn_normalize.cu` (a C++ struct derived from
/// `NormalizeParams`: the base's fields first), for `bn_normalize_{relu,add_relu}_*`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct NormalizeReluParams {
    pub base: NormalizeParams,
    pub z: u64,
    pub mask: u64,
}

/// `struct BackwardReduceReluParams` of `kernels/bn_backward.cu` (derived from
/// `BackwardReduceParams`), for `bn_backward_reduce_relu_*`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct BackwardReduceReluParams {
    pub base: BackwardReduceParams,
    pub mask: u64,
}

/// `struct BackwardElementwiseReluParams` of `kernels/bn_backward.cu` (derived from
/// `BackwardElementwiseParams`), for `bn_backward_dx_{relu,add_relu}_*`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct BackwardElementwiseReluParams {
    pub base: BackwardElementwiseParams,
    pub mask: u64,
    pub dz: u64,
}

/// `struct BackwardEvalParams` of `kernels/bn_backward.cu` (derived from
/// `BackwardReduceParams`), for the one-pass eval backward `bn_backward_eval_*`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct BackwardEvalParams {
    pub base: BackwardReduceParams,
    pub dx: u64,
    pub weight: u64,
    pub mask: u64,
    pub dz: u64,
}

/// `struct ConvDirectParams` of `kernels/conv_direct.cu` (the direct convolution of
/// `crate::conv::gpu`, a test tool).
#[cfg(feature = "test-tools")]
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConvDirectParams {
    pub x: u64,
    pub weight: u64,
    pub bias: u64,
    pub y: u64,
    pub c_in: u64,
    pub c_out: u64,
    pub c_in_per_group: u64,
    pub c_out_per_group: u64,
    pub axis1: u64,
    pub numel: u64,
    pub input: [u32; 3],
    pub output: [u32; 3],
    pub kernel: [u32; 3],
    pub stride: [u32; 3],
    pub padding: [u32; 3],
    pub dilation: [u32; 3],
    pub transposed: i32,
    pub weight_channels_last: i32,
}

// SAFETY: plain-old-data structs of integers and floats with the C layout the kernels declare;
// the pointers they carry are checked by the functional layer before a launch.
unsafe impl DeviceRepr for StatsParams {}
unsafe impl DeviceRepr for OnchipParams {}
unsafe impl DeviceRepr for NormalizeParams {}
unsafe impl DeviceRepr for BackwardReduceParams {}
unsafe impl DeviceRepr for BackwardElementwiseParams {}
unsafe impl DeviceRepr for FoldParams {}
#[cfg(feature = "test-tools")]
unsafe impl DeviceRepr for ConvDirectParams {}
unsafe impl DeviceRepr for SyncMomentsParams {}
unsafe impl DeviceRepr for SyncMergeParams {}
unsafe impl DeviceRepr for SyncCoefficientsParams {}
unsafe impl DeviceRepr for NormalizeReluParams {}
unsafe impl DeviceRepr for BackwardReduceReluParams {}
unsafe impl DeviceRepr for BackwardElementwiseReluParams {}
unsafe impl DeviceRepr for BackwardEvalParams {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    /// The sizes the C compiler gives the same structs (pointers and u64 are 8 bytes; the
    /// trailing 4-byte fields are padded to 8).
    #[test]
    fn layouts_match_the_c_structs() {
        assert_eq!(size_of::<GeometryParams>(), 24);
        assert_eq!(size_of::<StatsParams>(), 8 * 8 + 24 + 16);
        assert_eq!(size_of::<OnchipParams>(), 11 * 8 + 24 + 16);
        assert_eq!(size_of::<NormalizeParams>(), 7 * 8 + 24 + 8);
        assert_eq!(size_of::<BackwardReduceParams>(), 10 * 8 + 24 + 16);
        assert_eq!(size_of::<BackwardElementwiseParams>(), 8 * 8 + 24 + 8);
        assert_eq!(size_of::<FoldParams>(), 13 * 8 + 8);
        #[cfg(feature = "test-tools")]
        assert_eq!(size_of::<ConvDirectParams>(), 10 * 8 + 18 * 4 + 8);
        assert_eq!(size_of::<SyncMomentsParams>(), 4 * 8 + 24 + 8);
        assert_eq!(size_of::<SyncMergeParams>(), 9 * 8 + 16);
        assert_eq!(size_of::<SyncCoefficientsParams>(), 7 * 8 + 8);
    }

    /// The ReLU params extend the plain ones: base first (no padding: the bases are multiples of
    /// 8 bytes), then the new pointers, as the kernels' `static_assert`s say.
    #[test]
    fn relu_layouts_match_the_c_structs() {
        assert_eq!(size_of::<NormalizeReluParams>(), 88 + 2 * 8);
        assert_eq!(size_of::<BackwardReduceReluParams>(), 120 + 8);
        assert_eq!(size_of::<BackwardElementwiseReluParams>(), 96 + 2 * 8);
        assert_eq!(std::mem::offset_of!(NormalizeReluParams, z), 88);
        assert_eq!(std::mem::offset_of!(BackwardReduceReluParams, mask), 120);
        assert_eq!(std::mem::offset_of!(BackwardElementwiseReluParams, dz), 104);
        assert_eq!(size_of::<BackwardEvalParams>(), 120 + 4 * 8);
        assert_eq!(std::mem::offset_of!(BackwardEvalParams, dz), 144);
    }
}
