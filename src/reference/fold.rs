//! Conv / linear + batch-norm folding on the CPU, in f64, rounded once.

use crate::config::validate_eps;
use crate::dtype::Element;
use crate::error::Result;
use crate::fold::FoldSpec;
use crate::validate;

/// The eval-mode batch norm being folded: `C_out` values per buffer.
#[derive(Clone, Copy, Debug)]
pub struct FoldBatchNorm<'a> {
    /// Running mean.
    pub running_mean: &'a [f32],
    /// Running variance; a negative or NaN entry gives NaN in its channel only.
    pub running_var: &'a [f32],
    /// The batch norm's scale, `None` when not affine (1).
    pub weight: Option<&'a [f32]>,
    /// The batch norm's shift, `None` when not affine (0).
    pub bias: Option<&'a [f32]>,
    /// Its epsilon.
    pub eps: f32,
}

/// A folded layer: its new weight (shape and memory order of the original) and bias (`C_out`).
#[derive(Clone, Debug, PartialEq)]
pub struct Folded<T> {
    /// The folded weight.
    pub weight: Vec<T>,
    /// The folded bias, created when the layer had none.
    pub bias: Vec<T>,
}

/// Folds `bn` into a layer with weight `weight` (described by `spec`, in its memory order) and
/// optional bias `bias` (`C_out` values), into new buffers:
/// `W'[i] = W[i] * s[o(i)]`, `b' = (b - running_mean) * s + bn_bias` with
/// `s = bn_weight / sqrt(running_var + eps)` and `o(i)` from [`FoldSpec::map`]. A missing bias
/// counts as zeros.
///
/// Errors: as [`fold_in_place`].
pub fn fold<T: Element>(
    spec: &FoldSpec,
    weight: &[T],
    bias: Option<&[T]>,
    bn: &FoldBatchNorm<'_>,
) -> Result<Folded<T>> {
    let mut folded = Folded {
        weight: weight.to_vec(),
        bias: bias.map_or_else(|| vec![T::from_f64(0.0); spec.c_out()], <[T]>::to_vec),
    };
    fold_in_place(spec, &mut folded.weight, &mut folded.bias, bn)?;
    Ok(folded)
}

/// [`fold`] in place: `weight` (`spec.numel()` values) and `bias` (`C_out` values; zeros for a
/// layer without bias) are overwritten with the folded layer's.
///
/// Errors, in the order the GPU fold checks them: [`Error::InvalidEps`](crate::Error::InvalidEps);
/// [`Error::BufferLength`](crate::Error::BufferLength) for `weight`, `conv_bias` (the `bias`
/// buffer), `bn.running_mean`, `bn.running_var`, `bn.weight`, `bn.bias`.
pub fn fold_in_place<T: Element>(
    spec: &FoldSpec,
    weight: &mut [T],
    bias: &mut [T],
    bn: &FoldBatchNorm<'_>,
) -> Result<()> {
    let c_out = spec.c_out();
    validate_eps(bn.eps)?;
    validate::buffer("weight", spec.numel(), weight.len())?;
    validate::buffer("conv_bias", c_out, bias.len())?;
    let per_channel = [
        ("bn.running_mean", Some(bn.running_mean)),
        ("bn.running_var", Some(bn.running_var)),
        ("bn.weight", bn.weight),
        ("bn.bias", bn.bias),
    ];
    for (what, values) in per_channel {
        if let Some(values) = values {
            validate::buffer(what, c_out, values.len())?;
        }
    }

    let eps = f64::from(bn.eps);
    let param = |values: Option<&[f32]>, o: usize, default: f64| {
        values.map_or(default, |v| f64::from(v[o]))
    };
    let scale: Vec<f64> = (0..c_out)
        .map(|o| param(bn.weight, o, 1.0) / (f64::from(bn.running_var[o]) + eps).sqrt())
        .collect();
    let map = spec.map();
    for (i, w) in weight.iter_mut().enumerate() {
        *w = T::from_f64(w.to_f64() * scale[map.channel_of(i)]);
    }
    for (o, b) in bias.iter_mut().enumerate() {
        // One fused multiply-add, as the kernel's (which nvcc would fuse anyway).
        let centered = b.to_f64() - f64::from(bn.running_mean[o]);
        *b = T::from_f64(centered.mul_add(scale[o], param(bn.bias, o, 0.0)));
    }
    Ok(())
}
