//! Convolution layer geometries shared by the fold and convolution tests.

use batchnorm_cuda::fold::FoldKind;
use batchnorm_cuda::reference::conv::ConvParams;

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
