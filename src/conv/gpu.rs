//! A direct convolution on the GPU, **a correctness tool, not a fast layer**: the device side of
//! the end-to-end fold check (`BN(conv(x)) == conv'(x)` with the folded weights, both
//! convolutions on the device). One thread per output element loops over its receptive field
//! (`kernels/conv_direct.cu`); use cuDNN where speed matters.
//!
//! The calls mirror [`conv`](crate::conv) exactly: the same
//! definitions (its docs table: `ConvNd`, `ConvTransposeNd` with groups, stride, padding,
//! dilation and output padding, `Linear`), the same [`FoldSpec`] weight description (kind,
//! groups, channels-first or channels-last weight), channels-first activations with 1 to 3
//! spatial dimensions, the same validation and errors, and the output shape from the same
//! function ([`output_dims`]). They differ in the arithmetic: products accumulated in f32 (one
//! `fmaf` each, then the bias) and rounded once to `T`, where the reference sums in f64.
//!
//! ```no_run
//! use batchnorm_cuda::conv::{self, ConvParams};
//! use batchnorm_cuda::fold::{FoldKind, FoldSpec};
//! use batchnorm_cuda::gpu::GpuContext;
//! use batchnorm_cuda::Layout;
//!
//! let ctx = GpuContext::new(0)?;
//! // Conv1d(1, 1, kernel_size=2) on [1, 2, 3] with the kernel [2, 3]: [8, 13].
//! let spec = FoldSpec::new(FoldKind::Conv, &[1, 1, 2], 1, Layout::ChannelsFirst)?;
//! let params = ConvParams::new(1);
//! let dims = conv::gpu::output_dims(&[1, 1, 3], &spec, &params)?;
//! assert_eq!(dims, [1, 1, 2]);
//! let x = ctx.stream().clone_htod(&[1.0f32, 2.0, 3.0])?;
//! let w = ctx.stream().clone_htod(&[2.0f32, 3.0])?;
//! let mut y = ctx.stream().alloc_zeros::<f32>(2)?;
//! let input = conv::gpu::Input { values: x.as_view(), dims: &[1, 1, 3] };
//! conv::gpu::conv(&ctx, input, &spec, &w.as_view(), None, &params, &mut y.as_view_mut())?;
//! assert_eq!(ctx.stream().clone_dtoh(&y)?, [8.0, 13.0]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use super::{ConvParams, Plan, MAX_SPATIAL_DIMS};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::fold::{FoldKind, FoldSpec};
use crate::gpu::kernels;
use crate::gpu::launch as shape;
use crate::gpu::ops::Guards;
use crate::gpu::params::ConvDirectParams;
use crate::gpu::GpuContext;
use crate::shape::Layout;
use crate::validate;
use cudarc::driver::{CudaView, CudaViewMut};

/// The output shape `[N, C_out, spatial...]` of the layer `spec` describes on an input of shape
/// `x_dims`: the shape [`conv::apply`](crate::conv::apply) returns, from
/// the same validation.
///
/// Errors: those of [`conv::apply`](crate::conv::apply) that do not
/// depend on the buffers ([`Error::InvalidConv`], [`Error::ChannelMismatch`]).
pub fn output_dims(x_dims: &[usize], spec: &FoldSpec, params: &ConvParams) -> Result<Vec<usize>> {
    Ok(Plan::new(spec.kind(), x_dims, spec, params)?.out_dims)
}

/// Channels-first activations on the device and their shape `[N, C, spatial...]` (`[N, in]`
/// for a linear layer).
#[derive(Debug)]
pub struct Input<'a, T> {
    /// `dims.iter().product()` values.
    pub values: CudaView<'a, T>,
    /// The shape.
    pub dims: &'a [usize],
}

/// `ConvNd` on the device: [`conv::conv`](crate::conv::conv) into `y` (`output_dims`
/// elements, channels-first, overwritten). `weight` holds the layer's weight in `spec`'s memory
/// layout, `bias` `C_out` values or `None`.
///
/// Errors, checked before anything is queued: [`Error::InvalidConv`] and
/// [`Error::ChannelMismatch`] as the reference; [`Error::BufferLength`] for `x`, `weight`,
/// `bias` (as the reference) and `y`; [`Error::Unsupported`] for an extent the kernel's 32-bit
/// per-dimension arithmetic cannot take (`N`, `C_in`, `C_out`, a length, kernel size, stride,
/// padding or dilation of 2^31 or more, or a conv whose `(O - 1) s + (k - 1) d` reaches 2^31).
pub fn conv<T: Element>(
    gpu: &GpuContext,
    x: Input<'_, T>,
    spec: &FoldSpec,
    weight: &CudaView<'_, T>,
    bias: Option<&CudaView<'_, T>>,
    params: &ConvParams,
    y: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    let layer = Layer {
        kind: FoldKind::Conv,
        spec,
        weight,
        bias,
        params,
    };
    run(gpu, x, &layer, y)
}

/// `ConvTransposeNd` on the device: [`conv::conv_transpose`](crate::conv::conv_transpose) into
/// `y`. Arguments and errors as [`conv`], with the weight `[C_in, C_out/G, k...]`.
pub fn conv_transpose<T: Element>(
    gpu: &GpuContext,
    x: Input<'_, T>,
    spec: &FoldSpec,
    weight: &CudaView<'_, T>,
    bias: Option<&CudaView<'_, T>>,
    params: &ConvParams,
    y: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    let layer = Layer {
        kind: FoldKind::ConvTranspose,
        spec,
        weight,
        bias,
        params,
    };
    run(gpu, x, &layer, y)
}

/// `Linear` on the device: [`conv::linear`](crate::conv::linear) into `y` (`[N, out]`), for `x`
/// of shape `[N, in]`. Errors as [`conv`].
pub fn linear<T: Element>(
    gpu: &GpuContext,
    x: Input<'_, T>,
    spec: &FoldSpec,
    weight: &CudaView<'_, T>,
    bias: Option<&CudaView<'_, T>>,
    y: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    let layer = Layer {
        kind: FoldKind::Linear,
        spec,
        weight,
        bias,
        params: &ConvParams::new(0),
    };
    run(gpu, x, &layer, y)
}

/// The layer `spec` describes: [`conv`], [`conv_transpose`] or [`linear`] by `spec.kind()`, as
/// [`conv::apply`](crate::conv::apply). Errors: those of the function called.
pub fn apply<T: Element>(
    gpu: &GpuContext,
    x: Input<'_, T>,
    spec: &FoldSpec,
    weight: &CudaView<'_, T>,
    bias: Option<&CudaView<'_, T>>,
    params: &ConvParams,
    y: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    let layer = Layer {
        kind: spec.kind(),
        spec,
        weight,
        bias,
        params,
    };
    run(gpu, x, &layer, y)
}

/// The layer of one call: what it computes, its description, weight, bias and parameters.
struct Layer<'r, 'a, T> {
    kind: FoldKind,
    spec: &'r FoldSpec,
    weight: &'r CudaView<'a, T>,
    bias: Option<&'r CudaView<'a, T>>,
    params: &'r ConvParams,
}

/// Buffer lengths of one call.
#[derive(Clone, Copy, Debug)]
struct Lengths {
    x: usize,
    weight: usize,
    bias: Option<usize>,
    y: usize,
}

fn run<T: Element>(
    gpu: &GpuContext,
    x: Input<'_, T>,
    layer: &Layer<'_, '_, T>,
    y: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    let lengths = Lengths {
        x: x.values.len(),
        weight: layer.weight.len(),
        bias: layer.bias.map(|b| b.len()),
        y: y.len(),
    };
    let mut p = kernel_params(layer.kind, x.dims, layer.spec, layer.params, lengths)?;
    if p.numel == 0 {
        return Ok(()); // N == 0: an empty output
    }
    let stream = gpu.stream();
    let mut guards = Guards::new(stream);
    p.x = guards.read(&x.values);
    p.weight = guards.read(layer.weight);
    p.bias = guards.read_opt(layer.bias);
    p.y = guards.write(y);
    gpu.kernels()
        .per_dtype(kernels::CONV_DIRECT, T::DTYPE)
        .launch(stream, shape::flat(p.numel, gpu.sm_count()), &p)
}

/// Below this, every per-dimension quantity fits the kernel's 32-bit arithmetic.
const LIMIT: u128 = 1 << 31;

fn unsupported(reason: String) -> Error {
    Error::Unsupported {
        what: "conv::gpu",
        reason,
    }
}

/// Validates a call (the reference's plan, then the buffers in the reference's order, then `y`,
/// then the kernel's limits) and fills the kernel's parameters, device pointers left 0.
fn kernel_params(
    kind: FoldKind,
    x_dims: &[usize],
    spec: &FoldSpec,
    params: &ConvParams,
    lengths: Lengths,
) -> Result<ConvDirectParams> {
    let plan = Plan::new(kind, x_dims, spec, params)?;
    // Plan::new checked that the input and output element counts fit in usize.
    validate::buffer("x", x_dims.iter().product(), lengths.x)?;
    validate::buffer("weight", plan.weight_numel, lengths.weight)?;
    if let Some(len) = lengths.bias {
        validate::buffer("bias", plan.c_out, len)?;
    }
    let numel: usize = plan.out_dims.iter().product();
    validate::buffer("y", numel, lengths.y)?;

    for (what, value) in [
        ("N", plan.batch),
        ("C_in", plan.c_in),
        ("C_out", plan.c_out),
    ] {
        if value as u128 >= LIMIT {
            return Err(unsupported(format!("{what} = {value} is 2^31 or more")));
        }
    }
    let u32s = |values: &[usize; MAX_SPATIAL_DIMS]| values.map(|v| v as u32);
    for d in 0..MAX_SPATIAL_DIMS {
        let values = [
            ("input length", plan.input[d]),
            ("output length", plan.output[d]),
            ("kernel size", plan.kernel[d]),
            ("stride", plan.stride[d]),
            ("padding", plan.padding[d]),
            ("dilation", plan.dilation[d]),
        ];
        for (what, value) in values {
            if value as u128 >= LIMIT {
                return Err(unsupported(format!(
                    "spatial dimension {d}: {what} {value} is 2^31 or more"
                )));
            }
        }
        // A conv's furthest position q s + j d (a transposed conv's q + p and j d are below
        // 2^32 by the checks above, and its i s is at most q + p - j d).
        let [o, k, s, dil] = [
            plan.output[d],
            plan.kernel[d],
            plan.stride[d],
            plan.dilation[d],
        ]
        .map(|v| v as u128);
        let reach = (o - 1) * s + (k - 1) * dil;
        if kind != FoldKind::ConvTranspose && reach >= LIMIT {
            return Err(unsupported(format!(
                "spatial dimension {d}: the furthest tap (O - 1) s + (k - 1) d = {reach} is 2^31 \
                 or more"
            )));
        }
    }
    Ok(ConvDirectParams {
        x: 0,
        weight: 0,
        bias: 0,
        y: 0,
        c_in: plan.c_in as u64,
        c_out: plan.c_out as u64,
        c_in_per_group: plan.c_in_per_group as u64,
        c_out_per_group: plan.c_out_per_group as u64,
        axis1: plan.axis1 as u64,
        numel: numel as u64,
        input: u32s(&plan.input),
        output: u32s(&plan.output),
        kernel: u32s(&plan.kernel),
        stride: u32s(&plan.stride),
        padding: u32s(&plan.padding),
        dilation: u32s(&plan.dilation),
        transposed: (kind == FoldKind::ConvTranspose) as i32,
        weight_channels_last: (plan.weight_layout == Layout::ChannelsLast) as i32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lengths(x: usize, weight: usize, bias: Option<usize>, y: usize) -> Lengths {
        Lengths { x, weight, bias, y }
    }

    /// A grouped 2-D transposed conv with a channels-last weight: every field from the
    /// reference's plan, the third spatial dimension padded with the identity.
    #[test]
    fn params_of_a_grouped_transposed_conv() {
        // ConvTranspose2d(4, 6, (3, 2), stride (2, 1), padding (1, 0), dilation (1, 2),
        // output_padding (1, 0), groups 2) on [2, 4, 5, 3]: weight [4, 3, 3, 2].
        let spec = FoldSpec::new(
            FoldKind::ConvTranspose,
            &[4, 3, 3, 2],
            2,
            Layout::ChannelsLast,
        )
        .unwrap();
        let params = ConvParams::new(2)
            .stride(&[2, 1])
            .padding(&[1, 0])
            .dilation(&[1, 2])
            .output_padding(&[1, 0]);
        let x_dims = [2, 4, 5, 3];
        // (5 - 1) 2 - 2 + 1 (3 - 1) + 1 + 1 = 10; (3 - 1) 1 - 0 + 2 (2 - 1) + 0 + 1 = 5.
        let dims = output_dims(&x_dims, &spec, &params).unwrap();
        assert_eq!(dims, [2, 6, 10, 5]);
        let p = kernel_params(
            FoldKind::ConvTranspose,
            &x_dims,
            &spec,
            &params,
            lengths(120, 72, Some(6), 600),
        )
        .unwrap();
        assert_eq!(
            (
                p.c_in,
                p.c_out,
                p.c_in_per_group,
                p.c_out_per_group,
                p.axis1
            ),
            (4, 6, 2, 3, 3)
        );
        assert_eq!(p.numel, 600);
        assert_eq!(
            (p.input, p.output, p.kernel),
            ([5, 3, 1], [10, 5, 1], [3, 2, 1])
        );
        assert_eq!(
            (p.stride, p.padding, p.dilation),
            ([2, 1, 1], [1, 0, 0], [1, 2, 1])
        );
        assert_eq!((p.transposed, p.weight_channels_last), (1, 1));
        assert_eq!((p.x, p.weight, p.bias, p.y), (0, 0, 0, 0));
    }

    /// A linear layer is a conv with every spatial dimension of length 1.
    #[test]
    fn params_of_a_linear_layer() {
        let spec = FoldSpec::new(FoldKind::Linear, &[5, 7], 1, Layout::ChannelsFirst).unwrap();
        let p = kernel_params(
            FoldKind::Linear,
            &[3, 7],
            &spec,
            &ConvParams::new(0),
            lengths(21, 35, None, 15),
        )
        .unwrap();
        assert_eq!(
            (
                p.c_in,
                p.c_out,
                p.c_in_per_group,
                p.c_out_per_group,
                p.axis1
            ),
            (7, 5, 7, 5, 7)
        );
        assert_eq!((p.input, p.output, p.kernel), ([1; 3], [1; 3], [1; 3]));
        assert_eq!((p.stride, p.padding, p.dilation), ([1; 3], [0; 3], [1; 3]));
        assert_eq!((p.numel, p.transposed, p.weight_channels_last), (15, 0, 0));
    }

    #[test]
    fn refuses_what_the_reference_refuses_and_wrong_buffers() {
        let spec = FoldSpec::new(FoldKind::Conv, &[2, 3, 3], 1, Layout::ChannelsFirst).unwrap();
        let p = ConvParams::new(1);
        let call = |kind, dims: &[usize], params: &ConvParams, l: Lengths| {
            kernel_params(kind, dims, &spec, params, l).unwrap_err()
        };
        let ok = lengths(15, 18, Some(2), 6);
        // The reference's own errors, first.
        assert!(matches!(
            call(FoldKind::ConvTranspose, &[1, 3, 5], &p, ok),
            Error::InvalidConv { .. }
        ));
        assert!(matches!(
            call(FoldKind::Conv, &[1, 4, 5], &p, ok),
            Error::ChannelMismatch {
                expected: 3,
                got: 4
            }
        ));
        assert!(matches!(
            call(FoldKind::Conv, &[1, 3, 5], &p.clone().stride(&[0]), ok),
            Error::InvalidConv { .. }
        ));
        // Then the buffers, in the order x, weight, bias, y.
        for (l, what, needed) in [
            (lengths(14, 17, Some(1), 5), "x", 15),
            (lengths(15, 17, Some(1), 5), "weight", 18),
            (lengths(15, 18, Some(1), 5), "bias", 2),
            (lengths(15, 18, Some(2), 5), "y", 6),
        ] {
            let got = call(FoldKind::Conv, &[1, 3, 5], &p, l);
            assert!(
                matches!(got, Error::BufferLength { what: w, needed: n, .. } if w == what && n == needed),
                "{what}: {got}"
            );
        }
        let fine = kernel_params(FoldKind::Conv, &[1, 3, 5], &spec, &p, ok).unwrap();
        assert_eq!((fine.numel, fine.output), (6, [3, 1, 1]));
        // No bias is fine; an empty batch is valid and has no output.
        let empty = kernel_params(
            FoldKind::Conv,
            &[0, 3, 5],
            &spec,
            &p,
            lengths(0, 18, None, 0),
        );
        assert_eq!(empty.unwrap().numel, 0);
    }

    /// Extents the reference takes (it computes in u128) but the kernel's 32-bit positions
    /// cannot: refused with `Unsupported`, never launched with wrapped values.
    #[test]
    fn refuses_extents_past_the_kernels_32_bit_positions() {
        let spec = FoldSpec::new(FoldKind::Conv, &[2, 3, 3], 1, Layout::ChannelsFirst).unwrap();
        let t = FoldSpec::new(
            FoldKind::ConvTranspose,
            &[3, 2, 3],
            1,
            Layout::ChannelsFirst,
        )
        .unwrap();
        let big = 1usize << 31;
        let cases = [
            // Huge padding and stride: 5 outputs, but p >= 2^31.
            (
                FoldKind::Conv,
                spec,
                ConvParams::new(1)
                    .padding(&[usize::MAX / 2])
                    .stride(&[usize::MAX / 4]),
            ),
            // Dilation 2^30, 3 taps, 5 outputs: (O - 1) s + (k - 1) d = 2^31 + 4.
            (
                FoldKind::Conv,
                spec,
                ConvParams::new(1).padding(&[1 << 30]).dilation(&[1 << 30]),
            ),
            // Stride 2^30, 3 outputs: (O - 1) s + (k - 1) d = 2^31 + 2.
            (
                FoldKind::Conv,
                spec,
                ConvParams::new(1).padding(&[1 << 30]).stride(&[1 << 30]),
            ),
            // A transposed conv with stride 2^31.
            (
                FoldKind::ConvTranspose,
                t,
                ConvParams::new(1).stride(&[big]),
            ),
        ];
        for (kind, spec, params) in cases {
            let dims = output_dims(&[1, 3, 5], &spec, &params).unwrap();
            let numel = dims.iter().product();
            let l = lengths(15, 18, None, numel);
            let got = kernel_params(kind, &[1, 3, 5], &spec, &params, l).unwrap_err();
            assert!(
                matches!(
                    got,
                    Error::Unsupported {
                        what: "conv::gpu",
                        ..
                    }
                ),
                "{params:?}: {got}"
            );
        }
        // Just below the limit: 2 outputs, (O - 1) s + (k - 1) d = 2^31 - 3 + 2.
        let params = ConvParams::new(1)
            .padding(&[(1 << 30) - 2])
            .stride(&[big - 3]);
        assert_eq!(output_dims(&[1, 3, 5], &spec, &params).unwrap(), [1, 2, 2]);
        let l = lengths(15, 18, None, 4);
        kernel_params(FoldKind::Conv, &[1, 3, 5], &spec, &params, l).unwrap();
    }
}
