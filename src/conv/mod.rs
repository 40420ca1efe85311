//! Reference convolutions, transposed convolutions and linear layers on the CPU: direct loops,
//! sums in f64, each output rounded once to `T`. They exist to prove a batch-norm fold right
//! end to end (`BN(conv(x; W, b)) == conv(x; W', b')`), so they favour the obvious over the fast.
//!
//! Activations are channels-first, `[N, C, spatial...]` with 1 to 3 spatial dimensions (`[N, C]`
//! for [`linear`]). The weight is described by a [`FoldSpec`], exactly as the fold reads it:
//! its kind, logical shape, groups and memory layout (channels-first `[A0, A1, k...]` or
//! channels-last `[A0, k..., A1]`).
//!
//! With `s` the stride, `p` the padding, `d` the dilation and `op` the output padding of one
//! spatial dimension, `L` its input length, `k` the kernel length, `G` the groups (PyTorch's
//! definitions, `torch.nn.ConvNd` and `torch.nn.ConvTransposeNd`):
//!
//! | | weight | output length | `y[n, o, q]` |
//! | --- | --- | --- | --- |
//! | [`conv`] | `[C_out, C_in/G, k...]` | `floor((L + 2p - d(k-1) - 1) / s) + 1` | `b[o] + sum_{c, j} W[o, c, j] x[n, g C_in/G + c, q s + j d - p]` |
//! | [`conv_transpose`] | `[C_in, C_out/G, k...]` | `(L-1) s - 2p + d(k-1) + op + 1` | `b[o] + sum_{c, j, i : i s + j d - p = q} W[g C_in/G + c, o mod C_out/G, j] x[n, g C_in/G + c, i]` |
//! | [`linear`] | `[out, in]` | | `b[o] + sum_c W[o, c] x[n, c]` |
//!
//! where `g` is the group of output channel `o` (`o / (C_out/G)`), `c` runs over the input
//! channels of one group, `j` over the kernel and positions outside the input count as zeros
//! (zero padding); spatial indices are per dimension. The transposed convolution is the adjoint
//! of the convolution with the same weight tensor: `<conv(x), y> = <x, conv_transpose(y)>`.
//!
//! ```
//! use batchnorm_cuda::fold::{FoldKind, FoldSpec};
//! use batchnorm_cuda::conv::{conv, ConvParams};
//! use batchnorm_cuda::Layout;
//!
//! // Conv1d(1, 1, kernel_size=2) on [1, 2, 3] with the kernel [2, 3].
//! let spec = FoldSpec::new(FoldKind::Conv, &[1, 1, 2], 1, Layout::ChannelsFirst)?;
//! let y = conv(&[1.0f32, 2.0, 3.0], &[1, 1, 3], &spec, &[2.0, 3.0], None, &ConvParams::new(1))?;
//! assert_eq!(y.dims, [1, 1, 2]);
//! assert_eq!(y.values, [8.0, 13.0]);
//! # Ok::<(), batchnorm_cuda::Error>(())
//! ```

pub mod gpu;

use rayon::prelude::*;

use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::fold::{FoldKind, FoldSpec};
use crate::shape::{Layout, TensorDesc};
use crate::validate;

/// Most spatial dimensions of a reference convolution (`Conv3d`).
pub const MAX_SPATIAL_DIMS: usize = 3;

/// Stride, padding, dilation and output padding, one entry per spatial dimension each.
/// [`ConvParams::new`] gives PyTorch's defaults (stride 1, padding 0, dilation 1, output padding
/// 0); the groups are the [`FoldSpec`]'s.
///
/// ```
/// use batchnorm_cuda::conv::ConvParams;
///
/// let p = ConvParams::new(2).stride(&[2, 2]).padding(&[1, 0]);
/// assert_eq!(p.dilation, [1, 1]);
/// assert_eq!(p.spatial_dims(), 2);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvParams {
    /// Step between output positions, at least 1.
    pub stride: Vec<usize>,
    /// Implicit zeros on both sides of the input (conv) or cropped from both sides of the output
    /// (transposed conv).
    pub padding: Vec<usize>,
    /// Spacing between kernel taps, at least 1.
    pub dilation: Vec<usize>,
    /// Extra length on one side of a transposed conv's output, less than the stride or the
    /// dilation (PyTorch's rule); 0 for a conv.
    pub output_padding: Vec<usize>,
}

impl ConvParams {
    /// PyTorch's defaults for `spatial_dims` dimensions (0 for a linear layer).
    pub fn new(spatial_dims: usize) -> Self {
        Self {
            stride: vec![1; spatial_dims],
            padding: vec![0; spatial_dims],
            dilation: vec![1; spatial_dims],
            output_padding: vec![0; spatial_dims],
        }
    }

    /// Sets the stride.
    pub fn stride(self, stride: &[usize]) -> Self {
        Self {
            stride: stride.to_vec(),
            ..self
        }
    }

    /// Sets the padding.
    pub fn padding(self, padding: &[usize]) -> Self {
        Self {
            padding: padding.to_vec(),
            ..self
        }
    }

    /// Sets the dilation.
    pub fn dilation(self, dilation: &[usize]) -> Self {
        Self {
            dilation: dilation.to_vec(),
            ..self
        }
    }

    /// Sets the output padding (transposed convolutions only).
    pub fn output_padding(self, output_padding: &[usize]) -> Self {
        Self {
            output_padding: output_padding.to_vec(),
            ..self
        }
    }

    /// The number of spatial dimensions, the length of [`ConvParams::stride`].
    pub fn spatial_dims(&self) -> usize {
        self.stride.len()
    }
}

/// The result of a reference layer: channels-first values and their logical shape, ready for
/// the batch norm after it.
///
/// ```
/// use batchnorm_cuda::fold::{FoldKind, FoldSpec};
/// use batchnorm_cuda::conv::{conv, ConvParams};
/// use batchnorm_cuda::reference::{self, RunningStats};
/// use batchnorm_cuda::Layout;
///
/// // Conv2d(2, 3, 1) on a [1, 2, 2, 2] input of ones, then BatchNorm2d(3) in eval mode.
/// let spec = FoldSpec::new(FoldKind::Conv, &[3, 2, 1, 1], 1, Layout::ChannelsFirst)?;
/// let y = conv(&[1.0f32; 8], &[1, 2, 2, 2], &spec, &[0.5f32; 6], None, &ConvParams::new(2))?;
/// assert_eq!((y.dims.as_slice(), y.values[0]), (&[1, 3, 2, 2][..], 1.0));
/// let (mean, var) = ([1.0f32; 3], [1.0f32; 3]);
/// let mut out = vec![0.0f32; y.values.len()];
/// let running = RunningStats { mean: &mean, var: &var };
/// reference::forward_inference(&y.values, &y.desc()?, None, None, running, 1e-5, &mut out)?;
/// assert_eq!(out, [0.0; 12]);
/// # Ok::<(), batchnorm_cuda::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ConvOutput<T> {
    /// `[N, C_out, spatial...]` values in channels-first order.
    pub values: Vec<T>,
    /// `[N, C_out, spatial...]`.
    pub dims: Vec<usize>,
}

impl<T> ConvOutput<T> {
    /// The channels-first descriptor of the output, as a batch norm after the layer takes it.
    ///
    /// Errors: those of [`TensorDesc::new`].
    pub fn desc(&self) -> Result<TensorDesc> {
        TensorDesc::new(&self.dims, Layout::ChannelsFirst)
    }
}

/// `ConvNd`: the convolution of `x` (`x_dims = [N, C_in, spatial...]`, channels-first) with the
/// weight `spec` describes (kind [`FoldKind::Conv`], in the spec's memory layout) and the optional
/// bias (`C_out` values), with the groups of `spec` (see the module docs for the formula).
///
/// ```
/// use batchnorm_cuda::fold::{FoldKind, FoldSpec};
/// use batchnorm_cuda::conv::{conv, ConvParams};
/// use batchnorm_cuda::Layout;
///
/// // Conv1d(1, 1, 2, stride=2, padding=1, bias=True) on [1, 2, 3]: taps at [-1, 0] and [1, 2].
/// let spec = FoldSpec::new(FoldKind::Conv, &[1, 1, 2], 1, Layout::ChannelsFirst)?;
/// let params = ConvParams::new(1).stride(&[2]).padding(&[1]);
/// let y = conv(&[1.0f32, 2.0, 3.0], &[1, 1, 3], &spec, &[2.0, 3.0], Some(&[0.5]), &params)?;
/// assert_eq!(y.values, [3.5, 13.5]);
/// # Ok::<(), batchnorm_cuda::Error>(())
/// ```
///
/// Errors: [`Error::InvalidConv`] for a spec of another kind, parameters or an input of the
/// wrong rank, a zero stride, dilation or input length, a non-zero output padding, or an empty
/// output; [`Error::ChannelMismatch`] when `x` has not `C_in` channels; [`Error::BufferLength`]
/// for `x`, `weight` and `bias`.
pub fn conv<T: Element>(
    x: &[T],
    x_dims: &[usize],
    spec: &FoldSpec,
    weight: &[T],
    bias: Option<&[T]>,
    params: &ConvParams,
) -> Result<ConvOutput<T>> {
    let plan = Plan::new(FoldKind::Conv, x_dims, spec, params)?;
    plan.run(x, weight, bias)
}

/// `ConvTransposeNd`: the transposed convolution of `x` (`x_dims = [N, C_in, spatial...]`,
/// channels-first) with the weight `spec` describes (kind [`FoldKind::ConvTranspose`],
/// `[C_in, C_out/G, k...]` in the spec's memory layout) and the optional bias (`C_out` values),
/// with the groups of `spec` (see the module docs for the formula).
///
/// ```
/// use batchnorm_cuda::fold::{FoldKind, FoldSpec};
/// use batchnorm_cuda::conv::{conv_transpose, ConvParams};
/// use batchnorm_cuda::Layout;
///
/// // ConvTranspose1d(1, 1, 2, stride=2) on [1, 2]: each input scatters [2, 3] times itself.
/// let spec = FoldSpec::new(FoldKind::ConvTranspose, &[1, 1, 2], 1, Layout::ChannelsFirst)?;
/// let params = ConvParams::new(1).stride(&[2]);
/// let y = conv_transpose(&[1.0f32, 2.0], &[1, 1, 2], &spec, &[2.0, 3.0], None, &params)?;
/// assert_eq!(y.values, [2.0, 3.0, 4.0, 6.0]);
/// # Ok::<(), batchnorm_cuda::Error>(())
/// ```
///
/// Errors: as [`conv`], and [`Error::InvalidConv`] for an output padding not smaller than the
/// stride or the dilation.
pub fn conv_transpose<T: Element>(
    x: &[T],
    x_dims: &[usize],
    spec: &FoldSpec,
    weight: &[T],
    bias: Option<&[T]>,
    params: &ConvParams,
) -> Result<ConvOutput<T>> {
    let plan = Plan::new(FoldKind::ConvTranspose, x_dims, spec, params)?;
    plan.run(x, weight, bias)
}

/// `Linear`: `y[n, o] = b[o] + sum_c W[o, c] x[n, c]` for `x` of shape `x_dims = [N, in]` and the
/// weight `[out, in]` that `spec` describes (kind [`FoldKind::Linear`]).
///
/// ```
/// use batchnorm_cuda::fold::{FoldKind, FoldSpec};
/// use batchnorm_cuda::conv::linear;
/// use batchnorm_cuda::Layout;
///
/// let spec = FoldSpec::new(FoldKind::Linear, &[2, 3], 1, Layout::ChannelsFirst)?;
/// let w = [1.0f32, 0.0, -1.0, 2.0, 1.0, 0.0];
/// let y = linear(&[1.0f32, 2.0, 3.0], &[1, 3], &spec, &w, Some(&[0.5, -1.0]))?;
/// assert_eq!(y.values, [-1.5, 3.0]);
/// # Ok::<(), batchnorm_cuda::Error>(())
/// ```
///
/// Errors: as [`conv`].
pub fn linear<T: Element>(
    x: &[T],
    x_dims: &[usize],
    spec: &FoldSpec,
    weight: &[T],
    bias: Option<&[T]>,
) -> Result<ConvOutput<T>> {
    let plan = Plan::new(FoldKind::Linear, x_dims, spec, &ConvParams::new(0))?;
    plan.run(x, weight, bias)
}

/// The layer `spec` describes: [`conv`], [`conv_transpose`] or [`linear`] by `spec.kind()`
/// (`params` with no spatial dimension for a linear layer).
///
/// ```
/// use batchnorm_cuda::fold::{FoldKind, FoldSpec};
/// use batchnorm_cuda::conv::{apply, ConvParams};
/// use batchnorm_cuda::Layout;
///
/// let spec = FoldSpec::new(FoldKind::Linear, &[1, 2], 1, Layout::ChannelsFirst)?;
/// let y = apply(&[3.0f32, 4.0], &[1, 2], &spec, &[1.0, 1.0], None, &ConvParams::new(0))?;
/// assert_eq!(y.values, [7.0]);
/// # Ok::<(), batchnorm_cuda::Error>(())
/// ```
///
/// Errors: those of the function called.
pub fn apply<T: Element>(
    x: &[T],
    x_dims: &[usize],
    spec: &FoldSpec,
    weight: &[T],
    bias: Option<&[T]>,
    params: &ConvParams,
) -> Result<ConvOutput<T>> {
    let plan = Plan::new(spec.kind(), x_dims, spec, params)?;
    plan.run(x, weight, bias)
}

fn invalid(reason: String) -> Error {
    Error::InvalidConv { reason }
}

/// The output length of one spatial dimension from `[L, k, s, p, d, op]` (PyTorch's formulas in
/// the module docs), or `None` when it is below 1 or does not fit in `usize`. In `i128` with
/// checked products, so no input overflows or underflows.
fn output_length(kind: FoldKind, values: [usize; 6]) -> Option<usize> {
    let [l, k, s, p, d, op] = values.map(|v| v as i128);
    let reach = d.checked_mul(k - 1)?;
    let out = match kind {
        // (L - 1) s - 2p + d (k - 1) + op + 1
        FoldKind::ConvTranspose => (l - 1)
            .checked_mul(s)?
            .checked_add(reach)?
            .checked_add(op + 1)?
            .checked_sub(2 * p)?,
        // floor((L + 2p - d (k - 1) - 1) / s) + 1, with no output when the dilated kernel is
        // longer than the padded input
        _ => {
            let span = (l + 2 * p).checked_sub(reach)? - 1;
            if span < 0 {
                return None;
            }
            span / s + 1
        }
    };
    usize::try_from(out).ok().filter(|&out| out >= 1)
}

/// A validated layer, every spatial quantity padded to [`MAX_SPATIAL_DIMS`] dimensions with a
/// length-1 input and kernel, stride 1, padding 0 and dilation 1 (which changes nothing). A
/// linear layer is a convolution with no spatial dimension. Shared with `conv::gpu`, which
/// validates a call and takes its output shape from the same plan, then launches it.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) kind: FoldKind,
    pub(crate) batch: usize,
    pub(crate) c_in: usize,
    pub(crate) c_out: usize,
    pub(crate) c_in_per_group: usize,
    pub(crate) c_out_per_group: usize,
    /// Size of the weight's second logical axis (`C_in/G` or `C_out/G`).
    pub(crate) axis1: usize,
    pub(crate) weight_layout: Layout,
    pub(crate) weight_numel: usize,
    pub(crate) input: [usize; MAX_SPATIAL_DIMS],
    pub(crate) output: [usize; MAX_SPATIAL_DIMS],
    pub(crate) kernel: [usize; MAX_SPATIAL_DIMS],
    pub(crate) stride: [usize; MAX_SPATIAL_DIMS],
    pub(crate) padding: [usize; MAX_SPATIAL_DIMS],
    pub(crate) dilation: [usize; MAX_SPATIAL_DIMS],
    pub(crate) out_dims: Vec<usize>,
}

impl Plan {
    pub(crate) fn new(
        kind: FoldKind,
        x_dims: &[usize],
        spec: &FoldSpec,
        params: &ConvParams,
    ) -> Result<Self> {
        if spec.kind() != kind {
            return Err(invalid(format!(
                "a {kind:?} layer needs a {kind:?} weight, got {spec:?}"
            )));
        }
        let shape = spec.weight_shape();
        let dims = shape.len() - 2;
        let lists = [
            ("stride", &params.stride),
            ("padding", &params.padding),
            ("dilation", &params.dilation),
            ("output_padding", &params.output_padding),
        ];
        for (what, list) in lists {
            if list.len() != dims {
                return Err(invalid(format!(
                    "{what} has {} entries for {dims} spatial dimensions: {list:?}",
                    list.len()
                )));
            }
        }
        if x_dims.len() != dims + 2 {
            return Err(invalid(format!(
                "input of shape {x_dims:?} for a weight {shape:?}: expected [N, C] and {dims} \
                 spatial dimensions"
            )));
        }
        let groups = spec.groups();
        let (c_in, c_out) = match kind {
            FoldKind::Conv | FoldKind::Linear => (shape[1] * groups, shape[0]),
            FoldKind::ConvTranspose => (shape[0], spec.c_out()),
        };
        if x_dims[1] != c_in {
            return Err(Error::ChannelMismatch {
                expected: c_in,
                got: x_dims[1],
            });
        }

        let mut plan = Self {
            kind,
            batch: x_dims[0],
            c_in,
            c_out,
            c_in_per_group: c_in / groups,
            c_out_per_group: c_out / groups,
            axis1: shape[1],
            weight_layout: spec.weight_layout(),
            weight_numel: spec.numel(),
            input: [1; MAX_SPATIAL_DIMS],
            output: [1; MAX_SPATIAL_DIMS],
            kernel: [1; MAX_SPATIAL_DIMS],
            stride: [1; MAX_SPATIAL_DIMS],
            padding: [0; MAX_SPATIAL_DIMS],
            dilation: [1; MAX_SPATIAL_DIMS],
            out_dims: vec![x_dims[0], c_out],
        };
        for i in 0..dims {
            let (l, k) = (x_dims[2 + i], shape[2 + i]);
            let (s, p, d, op) = (
                params.stride[i],
                params.padding[i],
                params.dilation[i],
                params.output_padding[i],
            );
            if l == 0 || s == 0 || d == 0 {
                return Err(invalid(format!(
                    "spatial dimension {i}: input length {l}, stride {s} and dilation {d} must \
                     be at least 1"
                )));
            }
            if kind == FoldKind::ConvTranspose && op >= s.max(d) {
                return Err(invalid(format!(
                    "spatial dimension {i}: output padding {op} must be smaller than the stride \
                     {s} or the dilation {d}"
                )));
            }
            if kind != FoldKind::ConvTranspose && op != 0 {
                return Err(invalid(format!(
                    "spatial dimension {i}: a convolution has no output padding, got {op}"
                )));
            }
            let out = output_length(kind, [l, k, s, p, d, op]).ok_or_else(|| {
                invalid(format!(
                    "spatial dimension {i}: input length {l}, kernel {k}, stride {s}, padding \
                     {p}, dilation {d} and output padding {op} give no output"
                ))
            })?;
            plan.input[i] = x_dims[2 + i];
            plan.kernel[i] = shape[2 + i];
            plan.stride[i] = params.stride[i];
            plan.padding[i] = params.padding[i];
            plan.dilation[i] = params.dilation[i];
            plan.output[i] = out;
            plan.out_dims.push(out);
        }
        let fits = |dims: &[usize]| dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if fits(x_dims).is_none() || fits(&plan.out_dims).is_none() {
            return Err(invalid(format!(
                "input {x_dims:?} or output {:?} too large",
                plan.out_dims
            )));
        }
        Ok(plan)
    }

    fn kernel_volume(&self) -> usize {
        self.kernel.iter().product()
    }

    /// The memory offset of weight element `[a0, a1, j]` (`j` the flat kernel index).
    fn weight_offset(&self, a0: usize, a1: usize, j: usize) -> usize {
        let k = self.kernel_volume();
        match self.weight_layout {
            Layout::ChannelsFirst => (a0 * self.axis1 + a1) * k + j,
            Layout::ChannelsLast => (a0 * k + j) * self.axis1 + a1,
        }
    }

    /// The input position that kernel tap `j` reads for output position `q` along dimension
    /// `dim`, if any: conv `q s + j d - p`; transposed conv the `i` with `i s + j d - p = q`.
    fn source(&self, dim: usize, q: usize, j: usize) -> Option<usize> {
        // In u128: q s, j d and q + p stay below 2^66 for any valid plan (q s and j d are at
        // most L + 2p), so nothing wraps, however large the parameters.
        let [q, j, s, p, d] = [
            q,
            j,
            self.stride[dim],
            self.padding[dim],
            self.dilation[dim],
        ]
        .map(|v| v as u128);
        let i = match self.kind {
            FoldKind::ConvTranspose => {
                let t = (q + p).checked_sub(j * d)?;
                if t % s != 0 {
                    return None;
                }
                t / s
            }
            _ => (q * s + j * d).checked_sub(p)?,
        };
        usize::try_from(i).ok().filter(|&i| i < self.input[dim])
    }

    /// Output element `[n, o, q0, q1, q2]` in f64.
    fn output_at<T: Element>(
        &self,
        x: &[T],
        weight: &[T],
        n: usize,
        o: usize,
        q: [usize; 3],
    ) -> f64 {
        let g = o / self.c_out_per_group;
        let [l0, l1, l2] = self.input;
        let [k0, k1, k2] = self.kernel;
        let mut acc = 0.0f64;
        for c in 0..self.c_in_per_group {
            let channel = g * self.c_in_per_group + c;
            let (a0, a1) = match self.kind {
                FoldKind::ConvTranspose => (channel, o % self.c_out_per_group),
                _ => (o, c),
            };
            for j0 in 0..k0 {
                let Some(i0) = self.source(0, q[0], j0) else {
                    continue;
                };
                for j1 in 0..k1 {
                    let Some(i1) = self.source(1, q[1], j1) else {
                        continue;
                    };
                    for j2 in 0..k2 {
                        let Some(i2) = self.source(2, q[2], j2) else {
                            continue;
                        };
                        let xi = (((n * self.c_in + channel) * l0 + i0) * l1 + i1) * l2 + i2;
                        let wi = self.weight_offset(a0, a1, (j0 * k1 + j1) * k2 + j2);
                        acc += weight[wi].to_f64() * x[xi].to_f64();
                    }
                }
            }
        }
        acc
    }

    fn run<T: Element>(&self, x: &[T], weight: &[T], bias: Option<&[T]>) -> Result<ConvOutput<T>> {
        let x_numel = self.batch * self.c_in * self.input.iter().product::<usize>();
        validate::buffer("x", x_numel, x.len())?;
        validate::buffer("weight", self.weight_numel, weight.len())?;
        if let Some(bias) = bias {
            validate::buffer("bias", self.c_out, bias.len())?;
        }
        let [o0, o1, o2] = self.output;
        let numel: usize = self.out_dims.iter().product();
        let values = (0..numel)
            .into_par_iter()
            .map(|idx| {
                let (q2, rest) = (idx % o2, idx / o2);
                let (q1, rest) = (rest % o1, rest / o1);
                let (q0, rest) = (rest % o0, rest / o0);
                let (o, n) = (rest % self.c_out, rest / self.c_out);
                let b = bias.map_or(0.0, |b| b[o].to_f64());
                T::from_f64(self.output_at(x, weight, n, o, [q0, q1, q2]) + b)
            })
            .collect();
        Ok(ConvOutput {
            values,
            dims: self.out_dims.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const FIRST: Layout = Layout::ChannelsFirst;

    fn spec(kind: FoldKind, shape: &[usize], groups: usize) -> FoldSpec {
        FoldSpec::new(kind, shape, groups, FIRST).unwrap()
    }

    /// Small integers in [-4, 4]: every product and sum below is exact in f32 and f64, so the
    /// identities hold bit for bit.
    fn ints(seed: u64, len: usize) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..len)
            .map(|_| rng.random_range(-4i32..=4) as f32)
            .collect()
    }

    fn numel(dims: &[usize]) -> usize {
        dims.iter().product()
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum()
    }

    /// Row-major multi-index of flat index `i` in `dims`.
    fn unravel(mut i: usize, dims: &[usize]) -> Vec<usize> {
        let mut idx = vec![0; dims.len()];
        for (k, &d) in dims.iter().enumerate().rev() {
            idx[k] = i % d;
            i /= d;
        }
        idx
    }

    fn ravel(idx: &[usize], dims: &[usize]) -> usize {
        idx.iter().zip(dims).fold(0, |acc, (&i, &d)| acc * d + i)
    }

    /// A new tensor of shape `dst` whose element at index `i` is `src[f(i)]`, or 0 when `f`
    /// gives `None`.
    fn remap(
        src: &[f32],
        src_dims: &[usize],
        dst: &[usize],
        f: impl Fn(&[usize]) -> Option<Vec<usize>>,
    ) -> Vec<f32> {
        (0..numel(dst))
            .map(|i| f(&unravel(i, dst)).map_or(0.0, |j| src[ravel(&j, src_dims)]))
            .collect()
    }

    /// `[A0, A1, k...]` -> `[A0, k..., A1]`.
    fn to_channels_last(w: &[f32], shape: &[usize]) -> Vec<f32> {
        let mut last = shape.to_vec();
        last.remove(1);
        last.push(shape[1]);
        remap(w, shape, &last, |i| {
            let mut j = vec![i[0], i[i.len() - 1]];
            j.extend_from_slice(&i[1..i.len() - 1]);
            Some(j)
        })
    }

    /// Channels `start..start + count` of a channels-first `[N, C, ...]` tensor.
    fn channels(v: &[f32], dims: &[usize], start: usize, count: usize) -> Vec<f32> {
        let mut sub = dims.to_vec();
        sub[1] = count;
        remap(v, dims, &sub, |i| {
            let mut j = i.to_vec();
            j[1] += start;
            Some(j)
        })
    }

    #[test]
    fn conv1d_by_hand() {
        let x = [1.0f32, 2.0, 3.0];
        let w = [2.0f32, 3.0];
        let s = spec(FoldKind::Conv, &[1, 1, 2], 1);
        let run = |params: ConvParams, bias: Option<&[f32]>| {
            conv(&x, &[1, 1, 3], &s, &w, bias, &params).unwrap()
        };
        // [1*2 + 2*3, 2*2 + 3*3]
        let y = run(ConvParams::new(1), None);
        assert_eq!(
            (y.dims.as_slice(), y.values.as_slice()),
            (&[1, 1, 2][..], &[8.0, 13.0][..])
        );
        assert_eq!(run(ConvParams::new(1), Some(&[0.5])).values, [8.5, 13.5]);
        // Padding 1: [0, 1, 2, 3, 0] -> [0*2 + 1*3, 8, 13, 3*2 + 0*3]
        let padded = ConvParams::new(1).padding(&[1]);
        assert_eq!(run(padded.clone(), None).values, [3.0, 8.0, 13.0, 6.0]);
        // Stride 2: every other output of the padded case; floor((3 + 2 - 1 - 1) / 2) + 1 = 2.
        assert_eq!(run(padded.stride(&[2]), None).values, [3.0, 13.0]);
        // Dilation 2: one output, x0 * w0 + x2 * w1.
        let y = run(ConvParams::new(1).dilation(&[2]), None);
        assert_eq!(
            (y.dims.as_slice(), y.values.as_slice()),
            (&[1, 1, 1][..], &[11.0][..])
        );
    }

    #[test]
    fn conv_transpose1d_by_hand() {
        let x = [1.0f32, 2.0];
        let w = [2.0f32, 3.0];
        let s = spec(FoldKind::ConvTranspose, &[1, 1, 2], 1);
        let run = |params: ConvParams| conv_transpose(&x, &[1, 1, 2], &s, &w, None, &params);
        // Stride 1: x0 * [2, 3] at 0 plus x1 * [2, 3] at 1; (2 - 1) + 1 + 1 = 3 outputs.
        assert_eq!(run(ConvParams::new(1)).unwrap().values, [2.0, 7.0, 6.0]);
        // Stride 2: no overlap.
        let strided = ConvParams::new(1).stride(&[2]);
        assert_eq!(run(strided.clone()).unwrap().values, [2.0, 3.0, 4.0, 6.0]);
        // Output padding adds one (zero) position at the end.
        let y = run(strided.clone().output_padding(&[1])).unwrap();
        assert_eq!(y.values, [2.0, 3.0, 4.0, 6.0, 0.0]);
        // Padding crops one position from each side: (2 - 1) * 2 - 2 + 1 + 1 = 2.
        assert_eq!(run(strided.padding(&[1])).unwrap().values, [3.0, 4.0]);
        // Dilation 2, stride 1: x0 * w at {0, 2}, x1 * w at {1, 3}.
        let y = run(ConvParams::new(1).dilation(&[2])).unwrap();
        assert_eq!(y.values, [2.0, 4.0, 3.0, 6.0]);
    }

    #[test]
    fn conv2d_and_conv3d_by_hand() {
        // 3x3 input 1..9, kernel [[1, 0], [0, 1]]: y[i][j] = x[i][j] + x[i+1][j+1].
        let x: Vec<f32> = (1..=9).map(|v| v as f32).collect();
        let s = spec(FoldKind::Conv, &[1, 1, 2, 2], 1);
        let y = conv(
            &x,
            &[1, 1, 3, 3],
            &s,
            &[1.0, 0.0, 0.0, 1.0],
            None,
            &ConvParams::new(2),
        );
        let y = y.unwrap();
        assert_eq!(y.dims, [1, 1, 2, 2]);
        assert_eq!(y.values, [6.0, 8.0, 12.0, 14.0]);
        // A 2x2x2 kernel of ones over a 2x2x2 input 1..8 is the sum, 36; two output channels,
        // the second with kernel 2 and bias 1.
        let x: Vec<f32> = (1..=8).map(|v| v as f32).collect();
        let s = spec(FoldKind::Conv, &[2, 1, 2, 2, 2], 1);
        let w: Vec<f32> = [[1.0f32; 8], [2.0; 8]].concat();
        let y = conv(
            &x,
            &[1, 1, 2, 2, 2],
            &s,
            &w,
            Some(&[0.0, 1.0]),
            &ConvParams::new(3),
        );
        let y = y.unwrap();
        assert_eq!(y.dims, [1, 2, 1, 1, 1]);
        assert_eq!(y.values, [36.0, 73.0]);
    }

    #[test]
    fn linear_by_hand() {
        let s = spec(FoldKind::Linear, &[2, 3], 1);
        let w = [1.0f32, 0.0, -1.0, 2.0, 1.0, 0.0];
        // Two rows: [1, 2, 3] and [0, 1, 0].
        let x = [1.0f32, 2.0, 3.0, 0.0, 1.0, 0.0];
        let y = linear(&x, &[2, 3], &s, &w, Some(&[0.5, -1.0])).unwrap();
        assert_eq!(y.dims, [2, 2]);
        assert_eq!(y.values, [-1.5, 3.0, 0.5, 0.0]);
    }

    /// The geometries the identities below run on: (input dims, conv weight shape, groups,
    /// stride, padding, dilation).
    type Geometry = (
        &'static [usize],
        &'static [usize],
        usize,
        &'static [usize],
        &'static [usize],
        &'static [usize],
    );

    const GEOMETRIES: [Geometry; 9] = [
        (&[2, 3, 7], &[4, 3, 3], 1, &[1], &[0], &[1]),
        (&[2, 3, 9], &[4, 3, 3], 1, &[2], &[1], &[2]),
        (&[1, 4, 8], &[6, 2, 2], 2, &[3], &[2], &[1]),
        (&[2, 4, 6, 5], &[6, 2, 3, 2], 2, &[2, 1], &[1, 0], &[1, 2]),
        (&[1, 3, 7, 7], &[6, 1, 3, 3], 3, &[2, 2], &[1, 1], &[1, 1]),
        (&[2, 4, 5, 6], &[4, 1, 3, 3], 4, &[1, 2], &[2, 1], &[2, 1]),
        (
            &[1, 2, 4, 5, 6],
            &[4, 2, 2, 3, 2],
            1,
            &[1, 2, 3],
            &[0, 1, 1],
            &[2, 1, 1],
        ),
        (
            &[2, 4, 5, 4, 5],
            &[4, 2, 3, 1, 2],
            2,
            &[2, 1, 1],
            &[1, 0, 1],
            &[1, 1, 3],
        ),
        (
            &[1, 3, 3, 4, 3],
            &[3, 1, 2, 2, 2],
            3,
            &[1, 1, 1],
            &[1, 1, 0],
            &[1, 2, 1],
        ),
    ];

    fn params(g: &Geometry) -> ConvParams {
        ConvParams::new(g.3.len())
            .stride(g.3)
            .padding(g.4)
            .dilation(g.5)
    }

    /// `<conv(x), y> == <x, conv_transpose(y)>` with the same weight tensor read as a transposed
    /// conv's `[C_in' = C_out, C_out'/G = C_in/G, k...]`, and the output padding that gives back
    /// the input length: an independent check of every index of the transposed conv (and of the
    /// conv) for each stride, padding, dilation, group count and weight layout.
    #[test]
    fn conv_transpose_is_the_adjoint_of_conv() {
        for (case, g) in GEOMETRIES.iter().enumerate() {
            let (x_dims, w_shape, groups) = (g.0, g.1, g.2);
            let p = params(g);
            let x = ints(case as u64, numel(x_dims));
            let w = ints(100 + case as u64, numel(w_shape));
            for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
                let w = match layout {
                    Layout::ChannelsFirst => w.clone(),
                    Layout::ChannelsLast => to_channels_last(&w, w_shape),
                };
                let forward = FoldSpec::new(FoldKind::Conv, w_shape, groups, layout).unwrap();
                let y = conv(&x, x_dims, &forward, &w, None, &p).unwrap();
                let r = ints(200 + case as u64, y.values.len());
                // L_in = (L_out - 1) s - 2p + d (k - 1) + op + 1
                let op: Vec<usize> = (0..p.spatial_dims())
                    .map(|i| {
                        let back = (y.dims[2 + i] - 1) * p.stride[i]
                            + p.dilation[i] * (w_shape[2 + i] - 1)
                            + 1;
                        x_dims[2 + i] + 2 * p.padding[i] - back
                    })
                    .collect();
                let transposed =
                    FoldSpec::new(FoldKind::ConvTranspose, w_shape, groups, layout).unwrap();
                let back = conv_transpose(
                    &r,
                    &y.dims,
                    &transposed,
                    &w,
                    None,
                    &p.clone().output_padding(&op),
                )
                .unwrap();
                assert_eq!(back.dims, x_dims, "{case} {layout}");
                let (lhs, rhs) = (dot(&y.values, &r), dot(&x, &back.values));
                assert_eq!(lhs, rhs, "{case} {layout}: <conv(x), r> != <x, convT(r)>");
                assert!(lhs != 0.0, "{case}: a vacuous check");
            }
        }
    }

    /// A channels-last weight gives the same output as its channels-first original.
    #[test]
    fn channels_last_weight_matches_channels_first() {
        for (case, g) in GEOMETRIES.iter().enumerate() {
            let (x_dims, w_shape, groups) = (g.0, g.1, g.2);
            let x = ints(300 + case as u64, numel(x_dims));
            let w = ints(400 + case as u64, numel(w_shape));
            let bias = ints(500 + case as u64, w_shape[0]);
            let first = FoldSpec::new(FoldKind::Conv, w_shape, groups, FIRST).unwrap();
            let last =
                FoldSpec::new(FoldKind::Conv, w_shape, groups, Layout::ChannelsLast).unwrap();
            let w_last = to_channels_last(&w, w_shape);
            let a = conv(&x, x_dims, &first, &w, Some(&bias), &params(g)).unwrap();
            let b = conv(&x, x_dims, &last, &w_last, Some(&bias), &params(g)).unwrap();
            assert_eq!(a, b, "{case}");
        }
    }

    /// A grouped (or depthwise) conv, plain or transposed, is `G` independent convs on the
    /// channel slices of each group, concatenated along the channels.
    #[test]
    fn groups_are_independent_convs() {
        for (case, g) in GEOMETRIES.iter().enumerate().filter(|(_, g)| g.2 > 1) {
            let (x_dims, w_shape, groups) = (g.0, g.1, g.2);
            let p = params(g);
            for kind in [FoldKind::Conv, FoldKind::ConvTranspose] {
                let s = spec(kind, w_shape, groups);
                let c_in = match kind {
                    FoldKind::ConvTranspose => w_shape[0],
                    _ => w_shape[1] * groups,
                };
                let mut x_dims = x_dims.to_vec();
                x_dims[1] = c_in;
                let x = ints(600 + case as u64, numel(&x_dims));
                let w = ints(700 + case as u64, numel(w_shape));
                let bias = ints(800 + case as u64, s.c_out());
                let whole = apply(&x, &x_dims, &s, &w, Some(&bias), &p).unwrap();

                let mut group_shape = w_shape.to_vec();
                group_shape[0] /= groups;
                let one = spec(kind, &group_shape, 1);
                let (c_in_g, c_out_g, w_g) =
                    (c_in / groups, s.c_out() / groups, numel(&group_shape));
                let parts: Vec<ConvOutput<f32>> = (0..groups)
                    .map(|grp| {
                        let xs = channels(&x, &x_dims, grp * c_in_g, c_in_g);
                        let mut dims = x_dims.clone();
                        dims[1] = c_in_g;
                        let ws = &w[grp * w_g..(grp + 1) * w_g];
                        let bs = &bias[grp * c_out_g..(grp + 1) * c_out_g];
                        apply(&xs, &dims, &one, ws, Some(bs), &p).unwrap()
                    })
                    .collect();
                // Output channel o is channel o % (C_out/G) of group o / (C_out/G).
                let part_dims = &parts[0].dims;
                let joined: Vec<f32> = (0..numel(&whole.dims))
                    .map(|i| {
                        let mut idx = unravel(i, &whole.dims);
                        let grp = idx[1] / c_out_g;
                        idx[1] %= c_out_g;
                        parts[grp].values[ravel(&idx, part_dims)]
                    })
                    .collect();
                assert_eq!(whole.values, joined, "{case} {kind:?}");
            }
        }
    }

    /// Padding is zeros around the input, stride is subsampling the stride-1 output, dilation
    /// is a kernel with `d - 1` zeros between taps: each checked against the plain conv.
    #[test]
    fn padding_stride_and_dilation_by_definition() {
        for (case, g) in GEOMETRIES.iter().enumerate() {
            let (x_dims, w_shape, groups) = (g.0, g.1, g.2);
            let (p, dims) = (params(g), g.3.len());
            let x = ints(900 + case as u64, numel(x_dims));
            let w = ints(1000 + case as u64, numel(w_shape));
            let s = spec(FoldKind::Conv, w_shape, groups);
            let got = conv(&x, x_dims, &s, &w, None, &p).unwrap();

            // Zero-padded input, dilated kernel, stride 1, no padding, no dilation.
            let mut padded_dims = x_dims.to_vec();
            (0..dims).for_each(|i| padded_dims[2 + i] += 2 * p.padding[i]);
            let padded = remap(&x, x_dims, &padded_dims, |i| {
                let mut j = i.to_vec();
                for k in 0..dims {
                    j[2 + k] = i[2 + k].checked_sub(p.padding[k])?;
                    if j[2 + k] >= x_dims[2 + k] {
                        return None;
                    }
                }
                Some(j)
            });
            let mut dilated_shape = w_shape.to_vec();
            (0..dims).for_each(|i| dilated_shape[2 + i] = p.dilation[i] * (w_shape[2 + i] - 1) + 1);
            let dilated = remap(&w, w_shape, &dilated_shape, |i| {
                let mut j = i.to_vec();
                for k in 0..dims {
                    if i[2 + k] % p.dilation[k] != 0 {
                        return None;
                    }
                    j[2 + k] = i[2 + k] / p.dilation[k];
                }
                Some(j)
            });
            let plain = spec(FoldKind::Conv, &dilated_shape, groups);
            let dense = conv(
                &padded,
                &padded_dims,
                &plain,
                &dilated,
                None,
                &ConvParams::new(dims),
            )
            .unwrap();
            let want = remap(&dense.values, &dense.dims, &got.dims, |i| {
                let mut j = i.to_vec();
                (0..dims).for_each(|k| j[2 + k] *= p.stride[k]);
                Some(j)
            });
            assert_eq!(got.values, want, "{case}");
        }
    }

    #[test]
    fn refuses_bad_shapes_and_parameters() {
        let s = spec(FoldKind::Conv, &[2, 3, 3], 1);
        let w = [0.0f32; 18];
        let x = [0.0f32; 15];
        let p = ConvParams::new(1);
        let err = |r: Result<ConvOutput<f32>>| r.map(|_| ()).unwrap_err();
        assert!(matches!(
            err(conv(&x, &[1, 4, 5], &s, &w, None, &p)),
            Error::ChannelMismatch {
                expected: 3,
                got: 4
            }
        ));
        assert!(matches!(
            err(conv(&x, &[1, 3, 6], &s, &w, None, &p)),
            Error::BufferLength {
                what: "x",
                needed: 18,
                got: 15
            }
        ));
        assert!(matches!(
            err(conv(&x, &[1, 3, 5], &s, &w[1..], None, &p)),
            Error::BufferLength { what: "weight", .. }
        ));
        assert!(matches!(
            err(conv(&x, &[1, 3, 5], &s, &w, Some(&[0.0]), &p)),
            Error::BufferLength {
                what: "bias",
                needed: 2,
                got: 1
            }
        ));
        let bad: [(&[usize], ConvParams); 7] = [
            (&[1, 3, 5, 1], p.clone()),
            (&[1, 3, 5], ConvParams::new(2)),
            (&[1, 3, 5], p.clone().stride(&[0])),
            (&[1, 3, 5], p.clone().dilation(&[0])),
            (&[1, 3, 5], p.clone().output_padding(&[1])),
            (&[1, 3, 2], p.clone()),
            (&[1, 3, 5], p.clone().dilation(&[3])),
        ];
        for (dims, params) in bad {
            let got = err(conv(&x, dims, &s, &w, None, &params));
            assert!(
                matches!(got, Error::InvalidConv { .. }),
                "{dims:?} {params:?}: {got}"
            );
        }
        // A conv weight given to the transposed conv.
        assert!(matches!(
            err(conv_transpose(&x, &[1, 2, 5], &s, &w, None, &p)),
            Error::InvalidConv { .. }
        ));
        // Output padding must be smaller than the stride or the dilation; padding can crop
        // everything.
        let t = spec(FoldKind::ConvTranspose, &[3, 2, 3], 1);
        let bad_t = [
            p.clone().stride(&[2]).output_padding(&[2]),
            p.clone().output_padding(&[1]),
            p.clone().padding(&[4]),
        ];
        for params in bad_t {
            let got = err(conv_transpose(&x, &[1, 3, 5], &t, &w, None, &params));
            assert!(
                matches!(got, Error::InvalidConv { .. }),
                "{params:?}: {got}"
            );
        }
        // Parameters near usize::MAX are refused or computed without wrapping.
        let huge = p.clone().dilation(&[usize::MAX]);
        let got = err(conv_transpose(&x, &[1, 3, 5], &t, &w, None, &huge));
        assert!(matches!(got, Error::InvalidConv { .. }), "{got}");
        let far = p
            .clone()
            .padding(&[usize::MAX / 2])
            .stride(&[usize::MAX / 4]);
        let y = conv(&x, &[1, 3, 5], &s, &w, None, &far).unwrap();
        assert_eq!(
            (y.dims.as_slice(), y.values.as_slice()),
            (&[1, 2, 5][..], &[0.0; 10][..])
        );
        let ok = p.clone().dilation(&[2]).output_padding(&[1]);
        assert_eq!(
            conv_transpose(&x, &[1, 3, 5], &t, &w, None, &ok)
                .unwrap()
                .dims,
            [1, 2, 10]
        );
    }
}
