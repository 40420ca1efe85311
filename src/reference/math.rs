//! The arithmetic of the reference, written once: generic over how activations are stored
//! (f32, f16, bf16, or f64 for the exact helpers), with every parameter and statistic in f64.
//!
//! Reductions run one channel per rayon task, each summing its values in f64 in memory order
//! (two passes for the variance: the mean, then the squared deviations from it). Elementwise
//! outputs run in parallel over the output buffer; each element is rounded once.

use crate::dtype::Element;
use crate::shape::Geometry;
use rayon::prelude::*;

/// How an activation value is stored: widened exactly to f64, rounded once back.
pub(crate) trait Value: Copy + Send + Sync {
    fn widen(self) -> f64;
    fn narrow(value: f64) -> Self;
}

impl<T: Element> Value for T {
    fn widen(self) -> f64 {
        self.to_f64()
    }
    fn narrow(value: f64) -> Self {
        T::from_f64(value)
    }
}

impl Value for f64 {
    fn widen(self) -> f64 {
        self
    }
    fn narrow(value: f64) -> Self {
        value
    }
}

/// Elements below this many per rayon job are not split further.
const MIN_ELEMENTS_PER_JOB: usize = 1 << 14;

/// The values of channel `c`, in memory order.
fn channel<V: Value>(x: &[V], g: Geometry, c: usize) -> impl Iterator<Item = f64> + '_ {
    (0..g.outer).flat_map(move |o| {
        let start = g.offset(o, c, 0);
        x[start..start + g.inner].iter().map(|v| v.widen())
    })
}

/// `f(c)` for every channel, in parallel.
fn per_channel<R: Send>(g: Geometry, f: impl Fn(usize) -> R + Sync + Send) -> Vec<R> {
    (0..g.channels).into_par_iter().map(f).collect()
}

/// `out[i] = f(c, [inputs[0][i], ...])` for every element `i`, `c` its channel, rounded once.
/// Every buffer holds `g.outer * g.channels * g.inner` elements (checked by the caller).
pub(crate) fn map<V: Value, const K: usize>(
    inputs: [&[V]; K],
    g: Geometry,
    out: &mut [V],
    f: impl Fn(usize, [f64; K]) -> f64 + Sync,
) {
    out.par_iter_mut()
        .with_min_len(MIN_ELEMENTS_PER_JOB)
        .enumerate()
        .for_each(|(i, out)| {
            let c = (i / g.inner) % g.channels;
            *out = V::narrow(f(c, inputs.map(|input| input[i].widen())));
        });
}

/// Per-channel batch statistics: the mean and the biased variance. An empty channel has mean 0
/// and variance 0.
pub(crate) struct Moments {
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
}

/// Mean and biased variance of every channel, two passes in f64 (no `E[x^2] - E[x]^2`).
pub(crate) fn moments<V: Value>(x: &[V], g: Geometry) -> Moments {
    let m = g.per_channel();
    let (mean, var) = per_channel(g, |c| {
        if m == 0 {
            return (0.0, 0.0);
        }
        let mean = channel(x, g, c).sum::<f64>() / m as f64;
        let var = channel(x, g, c)
            .map(|v| (v - mean) * (v - mean))
            .sum::<f64>()
            / m as f64;
        (mean, var)
    })
    .into_iter()
    .unzip();
    Moments { mean, var }
}

/// `1 / sqrt(var + eps)`, per channel.
pub(crate) fn invstd(var: &[f64], eps: f64) -> Vec<f64> {
    var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect()
}

/// A per-channel normalization: `xhat = (x - mean) * invstd`, scaled by `weight`. Training uses
/// the batch statistics, eval the running ones.
pub(crate) struct Norm<'a> {
    pub mean: &'a [f64],
    pub invstd: &'a [f64],
    pub weight: &'a [f64],
}

/// `y = (x - mean) * (weight * invstd) + bias`, per channel: never `x * a + (bias - mean * a)`,
/// which cancels for a large mean.
pub(crate) fn normalize<V: Value>(
    x: &[V],
    g: Geometry,
    norm: &Norm<'_>,
    bias: &[f64],
    y: &mut [V],
) {
    let scale: Vec<f64> = norm
        .weight
        .iter()
        .zip(norm.invstd)
        .map(|(w, s)| w * s)
        .collect();
    map([x], g, y, |c, [x]| (x - norm.mean[c]) * scale[c] + bias[c]);
}

/// Per-channel gradients of the affine parameters: `dweight = sum(dy * xhat)`,
/// `dbias = sum(dy)`.
pub(crate) struct ParamGrads {
    pub dweight: Vec<f64>,
    pub dbias: Vec<f64>,
}

/// The two reductions of every backward.
pub(crate) fn param_grads<V: Value>(x: &[V], dy: &[V], g: Geometry, norm: &Norm<'_>) -> ParamGrads {
    let (dweight, dbias) = per_channel(g, |c| {
        let (sum_dy, sum_dy_xc) = channel(x, g, c)
            .zip(channel(dy, g, c))
            .fold((0.0, 0.0), |(s, sx), (x, dy)| {
                (s + dy, sx + dy * (x - norm.mean[c]))
            });
        (sum_dy_xc * norm.invstd[c], sum_dy)
    })
    .into_iter()
    .unzip();
    ParamGrads { dweight, dbias }
}

/// Training-mode `dx = weight * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))`, from the
/// reductions in `grads`. The batch statistics depend on `x`, hence the two mean terms.
pub(crate) fn training_dx<V: Value>(
    x: &[V],
    dy: &[V],
    g: Geometry,
    norm: &Norm<'_>,
    grads: &ParamGrads,
    dx: &mut [V],
) {
    training_dx_over(x, dy, g, norm, grads, g.per_channel() as f64, dx);
}

/// [`training_dx`] with `grads` summed over `m` values per channel: the whole batch of every
/// rank in a synchronized backward (`grads` all-reduced, `m` the global count).
pub(crate) fn training_dx_over<V: Value>(
    x: &[V],
    dy: &[V],
    g: Geometry,
    norm: &Norm<'_>,
    grads: &ParamGrads,
    m: f64,
    dx: &mut [V],
) {
    map([x, dy], g, dx, |c, [x, dy]| {
        let xhat = (x - norm.mean[c]) * norm.invstd[c];
        norm.weight[c] * norm.invstd[c] * (dy - grads.dbias[c] / m - xhat * (grads.dweight[c] / m))
    });
}

/// Eval-mode `dx = dy * weight * invstd`: the running statistics do not depend on `x`.
pub(crate) fn eval_dx<V: Value>(dy: &[V], g: Geometry, norm: &Norm<'_>, dx: &mut [V]) {
    map([dy], g, dx, |c, [dy]| {
        dy * (norm.weight[c] * norm.invstd[c])
    });
}
