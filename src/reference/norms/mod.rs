//! Group, layer, instance and RMS normalization on the CPU: the oracle of [`crate::gpu::norms`].
//!
//! One functional pair, [`forward`] and [`backward`], serves all four normalizations through a
//! [`NormDesc`]; the layer [`NormLayer`] holds the parameters, tracked statistics and
//! gradients on top of it. Everything is computed in f64 from the stored values
//! (row statistics in two passes) and each output is rounded once; the backward reads the
//! double-float mean of [`NormStats`], so it never works from an f32-rounded mean.
//!
//! ```
//! use batchnorm_cuda::norms::NormDesc;
//! use batchnorm_cuda::reference::norms::{self, Forward};
//!
//! // LayerNorm(4) over two rows.
//! let desc = NormDesc::layer(&[2, 4], &[4])?;
//! let x = [1.0f32, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 14.0];
//! let mut y = [0.0f32; 8];
//! let stats = norms::forward(&desc, Forward::new(&x, 1e-5, &mut y))?.unwrap();
//! assert_eq!(stats.mean, [2.5, 11.0]);
//! assert!((y[0] + 1.3416).abs() < 1e-4 && (y[7] - 1.7320).abs() < 1e-4);
//! # Ok::<(), batchnorm_cuda::Error>(())
//! ```

mod layer;

pub use layer::{NormCache, NormLayer};

use crate::dtype::Element;
use crate::error::Result;
use crate::norms::{
    check_params, check_running, ForwardLengths, NormDesc, NormEpilogue, NormStats, RunningLengths,
};
use crate::validate::{buffer, validate_eps};
use rayon::prelude::*;

/// Where a forward takes its statistics from.
#[derive(Debug, Default)]
pub enum Statistics<'a> {
    /// Each row's own mean and variance (or mean square): every normalization in training, and
    /// in eval unless instance norm tracks running statistics.
    #[default]
    Batch,
    /// Instance norm in training with tracked statistics: the row statistics, and the running
    /// ones updated with the batch average of the per-instance means and unbiased variances.
    BatchUpdating {
        /// `running_mean`, `C` values, updated in place.
        running_mean: &'a mut [f32],
        /// `running_var`, `C` values, updated in place.
        running_var: &'a mut [f32],
        /// Weight of the batch: `running = (1 - momentum) * running + momentum * batch`.
        momentum: f32,
    },
    /// Instance norm in eval with tracked statistics: normalize with the running ones.
    Running(RunningStats<'a>),
}

/// Per-channel running statistics read by an eval-mode instance norm.
#[derive(Clone, Copy, Debug)]
pub struct RunningStats<'a> {
    /// `running_mean`, `C` values.
    pub mean: &'a [f32],
    /// `running_var`, `C` values.
    pub var: &'a [f32],
}

/// The fused residual add of a forward: normalize `x + residual` (rounded to the activation
/// dtype, as PyTorch adds) and write that sum to `sum`, the pre-norm transformer's next residual.
#[derive(Debug)]
pub struct Residual<'a, T> {
    /// Added to `x`, same shape.
    pub residual: &'a [T],
    /// Receives `x + residual`.
    pub sum: &'a mut [T],
}

/// One forward call: the input, the parameters, where the statistics come from and the output.
#[derive(Debug)]
pub struct Forward<'a, T> {
    /// The input, `desc.numel()` values in the layout's memory order.
    pub x: &'a [T],
    /// A fused residual add in front of the normalization.
    pub residual: Option<Residual<'a, T>>,
    /// `C` values or `None` for 1.
    pub weight: Option<&'a [f32]>,
    /// `C` values or `None` for 0.
    pub bias: Option<&'a [f32]>,
    /// Added to the variance (mean square for RMS norm).
    pub eps: f32,
    /// Batch or running statistics.
    pub statistics: Statistics<'a>,
    /// What follows the affine map.
    pub epilogue: NormEpilogue,
    /// The output, overwritten.
    pub y: &'a mut [T],
}

impl<'a, T> Forward<'a, T> {
    /// A plain call: batch statistics, no parameters, no epilogue.
    pub fn new(x: &'a [T], eps: f32, y: &'a mut [T]) -> Self {
        Self {
            x,
            residual: None,
            weight: None,
            bias: None,
            eps,
            statistics: Statistics::Batch,
            epilogue: NormEpilogue::None,
            y,
        }
    }
}

/// The statistics a backward differentiates through.
#[derive(Clone, Copy, Debug)]
pub enum UsedStats<'a> {
    /// The [`NormStats`] of a forward with batch statistics.
    Batch(&'a NormStats),
    /// The running statistics of an eval-mode instance norm (constants: `dx = dy * weight *
    /// rstd`), with the forward's `eps`.
    Running(RunningStats<'a>, f32),
}

/// One backward call. `bias` is read only by the SiLU epilogue (to recompute its input).
#[derive(Debug)]
pub struct Backward<'a, T> {
    /// The forward's input (`x + residual` for a fused residual add: its `sum`).
    pub x: &'a [T],
    /// The gradient of `y`.
    pub dy: &'a [T],
    /// The forward's weight.
    pub weight: Option<&'a [f32]>,
    /// The forward's bias.
    pub bias: Option<&'a [f32]>,
    /// The forward's statistics.
    pub stats: UsedStats<'a>,
    /// The forward's epilogue.
    pub epilogue: NormEpilogue,
    /// Receives the gradient of `x`.
    pub dx: Option<&'a mut [T]>,
    /// Receives `sum(dz * xhat)` per channel (`dz` the gradient of the affine output).
    pub dweight: Option<&'a mut [f32]>,
    /// Receives `sum(dz)` per channel.
    pub dbias: Option<&'a mut [f32]>,
    /// Add into `dweight` and `dbias` instead of overwriting them.
    pub accumulate: bool,
}

fn widen<T: Element>(values: &[T]) -> Vec<f64> {
    values.par_iter().map(|v| v.to_f64()).collect()
}

fn param(values: Option<&[f32]>, c: usize, default: f64) -> f64 {
    values.map_or(default, |v| f64::from(v[c]))
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// The epilogue's output and its derivative at `z`.
fn epilogue_value(epilogue: NormEpilogue, z: f64) -> f64 {
    match epilogue {
        NormEpilogue::None => z,
        NormEpilogue::Silu => z * sigmoid(z),
    }
}

fn epilogue_slope(epilogue: NormEpilogue, z: f64) -> f64 {
    match epilogue {
        NormEpilogue::None => 1.0,
        NormEpilogue::Silu => {
            let s = sigmoid(z);
            s * (1.0 + z * (1.0 - s))
        }
    }
}

/// Per row in f64: the mean (0 for RMS norm) and the biased variance (the mean square for RMS
/// norm); an empty row gives 0 and 0.
fn row_moments(desc: &NormDesc, h: &[f64]) -> Vec<(f64, f64)> {
    let n = desc.row_len() as f64;
    (0..desc.rows())
        .into_par_iter()
        .map(|row| {
            if desc.row_len() == 0 {
                return (0.0, 0.0);
            }
            let values = || desc.row_offsets(row).map(|i| h[i]);
            if !desc.kind().centered() {
                return (0.0, values().map(|v| v * v).sum::<f64>() / n);
            }
            let mean = values().sum::<f64>() / n;
            let var = values().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
            (mean, var)
        })
        .collect()
}

/// Per row in f64: the mean subtracted and the `rstd` multiplied, from running statistics
/// (row `n * C + c` of an instance norm is channel `c`).
fn running_rows(desc: &NormDesc, running: RunningStats<'_>, eps: f32) -> Vec<(f64, f64)> {
    (0..desc.rows())
        .map(|row| {
            let c = row % desc.channels();
            let rstd = 1.0 / (f64::from(running.var[c]) + f64::from(eps)).sqrt();
            (f64::from(running.mean[c]), rstd)
        })
        .collect()
}

/// `(mean, rstd)` in f64 per row, from the saved double-float mean.
fn saved_rows(stats: &NormStats) -> Vec<(f64, f64)> {
    (0..stats.rstd.len())
        .map(|r| {
            let mean = f64::from(stats.mean[r]) + f64::from(stats.mean_lo[r]);
            (mean, f64::from(stats.rstd[r]))
        })
        .collect()
}

/// Forward: `y = epilogue((h - mean) * rstd * weight + bias)` per element, with `h = x` (or
/// `x + residual`), the statistics of its row (or the running ones of its channel).
///
/// Returns the row statistics for [`backward`], or `None` when it normalized with running
/// statistics.
///
/// Errors, checked before anything is written: [`Error::BufferLength`](crate::Error::BufferLength) (x, y, residual, sum,
/// weight, bias, running statistics), [`Error::Unsupported`](crate::Error::Unsupported) for running statistics of anything
/// but instance norm, [`Error::InvalidEps`](crate::Error::InvalidEps), [`Error::InvalidMomentum`](crate::Error::InvalidMomentum),
/// [`Error::SingleValuePerChannel`](crate::Error::SingleValuePerChannel) for batch statistics of an instance norm over one value per
/// instance.
pub fn forward<T: Element>(desc: &NormDesc, call: Forward<'_, T>) -> Result<Option<NormStats>> {
    ForwardLengths {
        x: call.x.len(),
        y: call.y.len(),
        residual: call
            .residual
            .as_ref()
            .map(|r| (r.residual.len(), r.sum.len())),
        weight: call.weight.map(<[f32]>::len),
        bias: call.bias.map(<[f32]>::len),
        running: match &call.statistics {
            Statistics::Batch => RunningLengths::None,
            Statistics::BatchUpdating {
                running_mean,
                running_var,
                momentum,
            } => RunningLengths::Updating {
                mean: running_mean.len(),
                var: running_var.len(),
                momentum: *momentum,
            },
            Statistics::Running(r) => RunningLengths::Read {
                mean: r.mean.len(),
                var: r.var.len(),
            },
        },
        eps: call.eps,
    }
    .check(desc)?;

    let h = match call.residual {
        None => widen(call.x),
        Some(r) => {
            r.sum
                .par_iter_mut()
                .zip(call.x.par_iter().zip(r.residual))
                .for_each(|(s, (x, z))| *s = T::from_f64(x.to_f64() + z.to_f64()));
            widen(r.sum)
        }
    };
    let eps = f64::from(call.eps);
    let (rows, saved) = match call.statistics {
        Statistics::Running(running) => (running_rows(desc, running, call.eps), None),
        batch => {
            let moments = row_moments(desc, &h);
            if let Statistics::BatchUpdating {
                running_mean,
                running_var,
                momentum,
            } = batch
            {
                update_running(desc, &moments, running_mean, running_var, momentum);
            }
            let rows: Vec<(f64, f64)> = moments
                .iter()
                .map(|&(mean, var)| (mean, 1.0 / (var + eps).sqrt()))
                .collect();
            let saved = NormStats {
                mean: rows.iter().map(|r| r.0 as f32).collect(),
                mean_lo: rows
                    .iter()
                    .map(|r| (r.0 - f64::from(r.0 as f32)) as f32)
                    .collect(),
                rstd: rows.iter().map(|r| r.1 as f32).collect(),
            };
            (rows, Some(saved))
        }
    };
    let (weight, bias, epilogue) = (call.weight, call.bias, call.epilogue);
    call.y.par_iter_mut().enumerate().for_each(|(i, y)| {
        let (row, c) = desc.locate(i);
        let (mean, rstd) = rows[row];
        let z = (h[i] - mean) * rstd * param(weight, c, 1.0) + param(bias, c, 0.0);
        *y = T::from_f64(epilogue_value(epilogue, z));
    });
    Ok(saved)
}

/// `running = (1 - momentum) * running + momentum * batch average`, per channel, of the
/// per-instance means and unbiased variances (PyTorch's instance norm). An empty batch changes
/// nothing.
fn update_running(
    desc: &NormDesc,
    moments: &[(f64, f64)],
    running_mean: &mut [f32],
    running_var: &mut [f32],
    momentum: f32,
) {
    let (n, c_count) = (desc.batch(), desc.channels());
    if n == 0 {
        return;
    }
    let m = f64::from(momentum);
    let len = desc.row_len() as f64;
    for c in 0..c_count {
        let (mut mean, mut var) = (0.0, 0.0);
        for sample in 0..n {
            let (mu, v) = moments[sample * c_count + c];
            mean += mu;
            var += v * len / (len - 1.0);
        }
        let (mean, var) = (mean / n as f64, var / n as f64);
        running_mean[c] = ((1.0 - m) * f64::from(running_mean[c]) + m * mean) as f32;
        running_var[c] = ((1.0 - m) * f64::from(running_var[c]) + m * var) as f32;
    }
}

/// Backward of [`forward`]. With `dz = dy * epilogue'(z)`, `g = dz * weight` and
/// `xhat = (x - mean) * rstd`: `dweight = sum(dz * xhat)`, `dbias = sum(dz)` per channel, and
/// `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))` over each row (no `mean(g)` term for
/// RMS norm; `dx = g * rstd` with running statistics, which do not depend on `x`).
///
/// Errors, checked before anything is written: [`Error::BufferLength`](crate::Error::BufferLength) (x, dy, dx, weight,
/// bias, the statistics, dweight, dbias), [`Error::Unsupported`](crate::Error::Unsupported) for running statistics of
/// anything but instance norm, [`Error::InvalidEps`](crate::Error::InvalidEps).
pub fn backward<T: Element>(desc: &NormDesc, call: Backward<'_, T>) -> Result<()> {
    let n = desc.numel();
    buffer("x", n, call.x.len())?;
    buffer("dy", n, call.dy.len())?;
    if let Some(dx) = &call.dx {
        buffer("dx", n, dx.len())?;
    }
    check_params(
        desc,
        call.weight.map(<[f32]>::len),
        call.bias.map(<[f32]>::len),
    )?;
    match call.stats {
        UsedStats::Batch(s) => {
            buffer("save_mean", desc.rows(), s.mean.len())?;
            buffer("save_mean_lo", desc.rows(), s.mean_lo.len())?;
            buffer("save_rstd", desc.rows(), s.rstd.len())?;
        }
        UsedStats::Running(r, eps) => {
            check_running(desc, r.mean.len(), r.var.len())?;
            validate_eps(eps)?;
        }
    }
    for (what, out) in [("dweight", &call.dweight), ("dbias", &call.dbias)] {
        if let Some(out) = out {
            buffer(what, desc.channels(), out.len())?;
        }
    }

    let (x, dy) = (widen(call.x), widen(call.dy));
    let rows = match call.stats {
        UsedStats::Batch(s) => saved_rows(s),
        UsedStats::Running(r, eps) => running_rows(desc, r, eps),
    };
    let (weight, bias, epilogue) = (call.weight, call.bias, call.epilogue);
    // Per element: xhat, dz (the gradient of the affine output) and g = dz * weight.
    let terms: Vec<(f64, f64, f64)> = (0..n)
        .into_par_iter()
        .map(|i| {
            let (row, c) = desc.locate(i);
            let (mean, rstd) = rows[row];
            let xhat = (x[i] - mean) * rstd;
            let w = param(weight, c, 1.0);
            let z = xhat * w + param(bias, c, 0.0);
            let dz = dy[i] * epilogue_slope(epilogue, z);
            (xhat, dz, dz * w)
        })
        .collect();

    if let Some(dx) = call.dx {
        match call.stats {
            UsedStats::Running(..) => dx.par_iter_mut().enumerate().for_each(|(i, dx)| {
                *dx = T::from_f64(terms[i].2 * rows[desc.locate(i).0].1);
            }),
            UsedStats::Batch(_) => {
                let len = desc.row_len() as f64;
                let means: Vec<(f64, f64)> = (0..desc.rows())
                    .into_par_iter()
                    .map(|row| {
                        let (sg, sgx) = desc.row_offsets(row).fold((0.0, 0.0), |(a, b), i| {
                            let (xhat, _, g) = terms[i];
                            (a + g, b + g * xhat)
                        });
                        (sg / len, sgx / len)
                    })
                    .collect();
                let centered = desc.kind().centered();
                dx.par_iter_mut().enumerate().for_each(|(i, dx)| {
                    let row = desc.locate(i).0;
                    let (xhat, _, g) = terms[i];
                    let (mean_g, mean_gx) = means[row];
                    let shift = if centered { mean_g } else { 0.0 };
                    *dx = T::from_f64(rows[row].1 * (g - shift - xhat * mean_gx));
                });
            }
        }
    }

    let c_count = desc.channels();
    let (mut dweight, mut dbias) = (vec![0.0f64; c_count], vec![0.0f64; c_count]);
    for (i, &(xhat, dz, _)) in terms.iter().enumerate() {
        let c = desc.locate(i).1;
        dweight[c] += dz * xhat;
        dbias[c] += dz;
    }
    for (out, sums) in [(call.dweight, dweight), (call.dbias, dbias)] {
        if let Some(out) = out {
            for (o, s) in out.iter_mut().zip(sums) {
                let base = if call.accumulate { f64::from(*o) } else { 0.0 };
                *o = (base + s) as f32;
            }
        }
    }
    Ok(())
}
