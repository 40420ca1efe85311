//! Convolution layer geometries shared by the fold and convolution tests.

use batchnorm_cuda::conv::ConvParams;
use batchnorm_cuda::fold::FoldKind::{self, Conv, ConvTranspose, Linear};
use batchnorm_cuda::fold::FoldSpec;

/// One layer: the kind, the input `[N, C_in, spatial...]`, the logical weight shape
/// (channels-first), the groups and `[stride, padding, dilation, output_padding]`.
pub struct ConvLayer {
    pub name: &'static str,
    pub kind: FoldKind,
    pub x: &'static [usize],
    pub weight: &'static [usize],
    pub groups: usize,
    pub params: [&'static [usize]; 4],
}

impl ConvLayer {
    /// The layer's stride, padding, dilation and output padding.
    pub fn params(&self) -> ConvParams {
        let [stride, padding, dilation, output_padding] = self.params;
        ConvParams::new(stride.len())
            .stride(stride)
            .padding(padding)
            .dilation(dilation)
            .output_padding(output_padding)
    }
}

/// A [`ConvLayer`], in a `const` table.
pub const fn conv_layer(
    name: &'static str,
    kind: FoldKind,
    x: &'static [usize],
    weight: &'static [usize],
    groups: usize,
    params: [&'static [usize]; 4],
) -> ConvLayer {
    ConvLayer {
        name,
        kind,
        x,
        weight,
        groups,
        params,
    }
}

/// Every layer the fold and convolution tests run: 1-3-D convolutions (strided, padded,
/// dilated, grouped, depthwise, 1x1, long sums), transposed ones (grouped, depthwise, dilation
/// above stride, output padding) and linear layers.
pub const LAYERS: [ConvLayer; 23] = [
    conv_layer(
        "conv1d",
        Conv,
        &[2, 3, 11],
        &[4, 3, 3],
        1,
        [&[1], &[0], &[1], &[0]],
    ),
    conv_layer(
        "conv1d_strided_padded_dilated",
        Conv,
        &[2, 3, 13],
        &[4, 3, 3],
        1,
        [&[2], &[2], &[2], &[0]],
    ),
    conv_layer(
        "conv1d_depthwise",
        Conv,
        &[3, 6, 9],
        &[6, 1, 5],
        6,
        [&[1], &[2], &[2], &[0]],
    ),
    conv_layer(
        "conv2d_padded_dilated",
        Conv,
        &[2, 5, 7, 6],
        &[8, 5, 3, 3],
        1,
        [&[1, 1], &[1, 1], &[2, 1], &[0, 0]],
    ),
    conv_layer(
        "conv2d_grouped_strided",
        Conv,
        &[2, 6, 9, 7],
        &[8, 3, 3, 3],
        2,
        [&[2, 1], &[1, 0], &[1, 2], &[0, 0]],
    ),
    conv_layer(
        "conv2d_depthwise_x2",
        Conv,
        &[2, 4, 6, 6],
        &[8, 1, 3, 3],
        4,
        [&[2, 2], &[1, 1], &[1, 1], &[0, 0]],
    ),
    conv_layer(
        "conv2d_1x1",
        Conv,
        &[2, 16, 5, 5],
        &[12, 16, 1, 1],
        1,
        [&[1, 1], &[0, 0], &[1, 1], &[0, 0]],
    ),
    conv_layer(
        "conv2d_576_products",
        Conv,
        &[2, 64, 6, 5],
        &[8, 64, 3, 3],
        1,
        [&[1, 1], &[1, 1], &[1, 1], &[0, 0]],
    ),
    conv_layer(
        "conv3d",
        Conv,
        &[2, 3, 5, 4, 6],
        &[4, 3, 3, 2, 3],
        1,
        [&[1, 2, 1], &[1, 0, 1], &[1, 1, 2], &[0, 0, 0]],
    ),
    conv_layer(
        "conv3d_grouped",
        Conv,
        &[1, 4, 5, 6, 5],
        &[6, 2, 2, 3, 2],
        2,
        [&[2, 1, 2], &[0, 1, 1], &[1, 2, 1], &[0, 0, 0]],
    ),
    conv_layer(
        "conv_transpose1d",
        ConvTranspose,
        &[2, 4, 5],
        &[4, 6, 3],
        1,
        [&[2], &[1], &[1], &[1]],
    ),
    conv_layer(
        "conv_transpose2d_grouped",
        ConvTranspose,
        &[2, 4, 4, 5],
        &[4, 3, 3, 3],
        2,
        [&[2, 2], &[1, 0], &[1, 1], &[1, 0]],
    ),
    conv_layer(
        "conv_transpose2d_depthwise_dilated",
        ConvTranspose,
        &[2, 4, 5, 5],
        &[4, 2, 3, 3],
        4,
        [&[2, 2], &[1, 1], &[2, 1], &[1, 1]],
    ),
    conv_layer(
        "conv_transpose2d_dilation_above_stride",
        ConvTranspose,
        &[1, 3, 4, 4],
        &[3, 2, 3, 3],
        1,
        [&[1, 1], &[2, 0], &[3, 2], &[2, 1]],
    ),
    conv_layer(
        "conv_transpose3d_grouped",
        ConvTranspose,
        &[1, 6, 3, 4, 3],
        &[6, 2, 2, 3, 2],
        3,
        [&[2, 1, 2], &[0, 1, 0], &[1, 2, 1], &[1, 0, 0]],
    ),
    conv_layer(
        "conv_transpose3d_wide",
        ConvTranspose,
        &[1, 32, 2, 3, 2],
        &[32, 4, 2, 2, 2],
        1,
        [&[2, 2, 2], &[0, 0, 1], &[1, 1, 1], &[0, 1, 0]],
    ),
    conv_layer(
        "linear",
        Linear,
        &[9, 12],
        &[10, 12],
        1,
        [&[], &[], &[], &[]],
    ),
    conv_layer(
        "linear_300",
        Linear,
        &[4, 300],
        &[7, 300],
        1,
        [&[], &[], &[], &[]],
    ),
    conv_layer(
        "conv1d_strided_padded",
        Conv,
        &[3, 4, 11],
        &[6, 4, 3],
        1,
        [&[2], &[1], &[1], &[0]],
    ),
    conv_layer(
        "conv3d_undilated",
        Conv,
        &[2, 3, 5, 4, 6],
        &[4, 3, 3, 2, 3],
        1,
        [&[1, 2, 1], &[1, 0, 1], &[1, 1, 1], &[0, 0, 0]],
    ),
    conv_layer(
        "conv2d_grouped_padded",
        Conv,
        &[2, 6, 6, 7],
        &[8, 3, 3, 3],
        2,
        [&[2, 1], &[1, 1], &[1, 1], &[0, 0]],
    ),
    conv_layer(
        "conv2d_depthwise_x2_unstrided",
        Conv,
        &[2, 4, 6, 6],
        &[8, 1, 3, 3],
        4,
        [&[1, 1], &[1, 1], &[1, 1], &[0, 0]],
    ),
    conv_layer(
        "conv_transpose2d_depthwise",
        ConvTranspose,
        &[2, 4, 5, 5],
        &[4, 2, 3, 3],
        4,
        [&[2, 2], &[1, 1], &[1, 1], &[1, 1]],
    ),
];

/// A weight `[A0, A1, k...]` (channels-first) laid out `[A0, k..., A1]` (channels-last).
pub fn to_channels_last<T: Copy>(w: &[T], shape: &[usize]) -> Vec<T> {
    let (a0, a1) = (shape[0], shape[1]);
    let k: usize = shape[2..].iter().product();
    let mut out = Vec::with_capacity(w.len());
    for i0 in 0..a0 {
        for j in 0..k {
            for i1 in 0..a1 {
                out.push(w[(i0 * a1 + i1) * k + j]);
            }
        }
    }
    out
}

/// `k u / (1 - k u)` with `u = 2^-24`: the relative bound of `k` f32 roundings of a sum whose
/// partial sums are at most the sum of the magnitudes of its terms.
pub fn gamma(k: usize) -> f64 {
    let ku = k as f64 * 2f64.powi(-24);
    ku / (1.0 - ku)
}

/// The product terms of one output: `C_in/G` times the kernel volume (an upper bound for a
/// transposed conv, whose stride skips taps).
pub fn terms(spec: &FoldSpec) -> usize {
    let shape = spec.weight_shape();
    let c_in_per_group = match spec.kind() {
        ConvTranspose => shape[0] / spec.groups(),
        Conv | Linear => shape[1],
    };
    c_in_per_group * shape[2..].iter().product::<usize>()
}
