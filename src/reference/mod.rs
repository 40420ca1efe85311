//! The CPU reference: simple, obviously correct batch normalization with PyTorch's semantics,
//! the oracle the CUDA kernels are tested against and the baseline of the benches.
//!
//! It mirrors the GPU API ([`crate::gpu`]) on host slices:
//!
//! | reference | what it is |
//! | --- | --- |
//! | [`forward_training`], [`forward_inference`], [`backward_training`], [`backward_inference`] | cuDNN-like functional calls on caller-owned buffers |
//! | [`BatchNorm`] | a stateful layer like `torch.nn.BatchNorm{1,2,3}d` |
//! | [`fold`], [`fold_in_place`] | conv / linear + batch-norm folding for inference |
//! | `exact` | the training forward and backward entirely in f64, for gradient checks (feature `test-tools`) |
//! | [`sync`] | synchronized batch norm over data-parallel ranks, simulated on one machine |
//! | [`norms`] | group, layer, instance and RMS normalization ([`crate::norms`]) |
//! | [`fused`] | the calls with a fused `relu(BN(x) [+ z])` epilogue and its ReLU mask ([`crate::epilogue`]) |
//!
//! Activations (`x`, `y`, `dy`, `dx`) are any [`Element`] (f32, f16, bf16), stored in the
//! memory order of their [`TensorDesc`]; parameters, statistics and their gradients are f32.
//! Everything is computed in f64 (sums in f64, variance in two passes) and each output is
//! rounded once. Channels are independent: a NaN or an infinity in one channel stays there.
//! Work is spread over channels (reductions) and elements (outputs) with rayon.
//!
//! Every function validates all its arguments (with [`crate::validate`], exactly as the GPU
//! path does) before it writes anything, so an `Err` leaves every buffer untouched.
//!
//! ```
//! use batchnorm_cuda::{reference, TensorDesc, Layout};
//!
//! // BatchNorm1d on x = [1, 2, 3, 4] (N = 4, C = 1), fresh running statistics.
//! let desc = TensorDesc::new(&[4, 1], Layout::ChannelsFirst)?;
//! let x = [1.0f32, 2.0, 3.0, 4.0];
//! let (mut mean, mut var) = ([0.0f32], [1.0f32]);
//! let mut y = [0.0f32; 4];
//! let running = reference::RunningUpdate::pytorch(&mut mean, &mut var, 0.1);
//! let saved = reference::forward_training(&x, &desc, None, None, Some(running), 1e-5, &mut y)?;
//! assert_eq!(saved.mean, [2.5]);
//! assert!((y[0] + 1.3416).abs() < 1e-4);
//! assert!((var[0] - (0.9 + 0.1 * 5.0 / 3.0)).abs() < 1e-6);
//! # Ok::<(), batchnorm_cuda::Error>(())
//! ```

#[cfg(feature = "test-tools")]
pub mod exact;
mod fold;
pub mod fused;
mod layer;
mod math;
pub mod norms;
pub mod sync;

pub use crate::stats::SavedStats;
pub use fold::{fold, fold_in_place, FoldBatchNorm, Folded};
pub use layer::{BatchNorm, CachedStats, ForwardCache, Grads};

use crate::config::RunningVarUpdate;
use crate::dtype::Element;
use crate::error::Result;
use crate::shape::TensorDesc;
use crate::validate::{self, validate_eps, validate_momentum, Buffers};
use math::Norm;

/// What the reference computes with the saved statistics (the type is the crate's shared
/// [`SavedStats`]).
impl SavedStats {
    /// The f32 statistics of f64 ones: the mean as `mean + mean_lo` with `mean` the f32 rounding
    /// of the pair (as the GPU's), `invstd` rounded once.
    fn from_f64(mean: &[f64], invstd: &[f64]) -> Self {
        let hi = narrow(mean);
        let mean_lo = mean
            .iter()
            .zip(&hi)
            .map(|(&m, &h)| {
                if !h.is_finite() {
                    return 0.0;
                }
                let lo = (m - f64::from(h)) as f32;
                // Rounded onto half an ulp of an odd `h`, `h + lo` would tie away from `h`.
                if (f64::from(h) + f64::from(lo)) as f32 == h {
                    lo
                } else {
                    f32::from_bits(lo.to_bits() - 1)
                }
            })
            .collect();
        Self {
            mean: hi,
            mean_lo,
            invstd: narrow(invstd),
        }
    }

    /// The saved mean in f64: `mean + mean_lo`.
    fn full_mean(&self) -> Vec<f64> {
        self.mean
            .iter()
            .zip(&self.mean_lo)
            .map(|(&hi, &lo)| f64::from(hi) + f64::from(lo))
            .collect()
    }

    /// `call`'s buffer lengths with the saved statistics' filled in.
    fn buffers(&self, call: Buffers) -> Buffers {
        Buffers {
            save_mean: Some(self.mean.len()),
            save_mean_lo: Some(self.mean_lo.len()),
            save_invstd: Some(self.invstd.len()),
            ..call
        }
    }
}

/// A forward's epilogue on host slices ([`crate::epilogue::Epilogue`]): `z` laid out as `x`,
/// the mask [`mask_words`](crate::epilogue::mask_words) words.
pub type Epilogue<'a, T> = crate::epilogue::Epilogue<&'a [T], &'a mut [u32]>;

/// A backward's epilogue on host slices ([`crate::epilogue::EpilogueGrad`]): the forward's
/// mask, and `dz` laid out as `x`.
pub type EpilogueGrad<'a, T> = crate::epilogue::EpilogueGrad<&'a [u32], &'a mut [T]>;

/// The running statistics a training forward updates, and how:
/// `running = (1 - factor) * running + factor * batch`.
#[derive(Debug)]
pub struct RunningUpdate<'a> {
    /// `running_mean`, one per channel, updated in place.
    pub mean: &'a mut [f32],
    /// `running_var`, one per channel, updated in place.
    pub var: &'a mut [f32],
    /// Weight of the batch, in `[0, 1]`: the momentum, or `1 / num_batches_tracked` (after the
    /// increment) for a cumulative average (see [`crate::BatchNormConfig::average_factor`]).
    pub factor: f32,
    /// Which batch variance feeds `running_var`.
    pub var_update: RunningVarUpdate,
}

impl<'a> RunningUpdate<'a> {
    /// PyTorch's update: the unbiased batch variance feeds `running_var`.
    pub fn pytorch(mean: &'a mut [f32], var: &'a mut [f32], factor: f32) -> Self {
        Self {
            mean,
            var,
            factor,
            var_update: RunningVarUpdate::Unbiased,
        }
    }
}

/// Running statistics read by eval-mode calls, one value per channel each.
#[derive(Clone, Copy, Debug)]
pub struct RunningStats<'a> {
    /// `running_mean`.
    pub mean: &'a [f32],
    /// `running_var`; a negative or NaN entry gives NaN in its channel only.
    pub var: &'a [f32],
}

/// The gradients a backward writes; `None` skips one. `dweight` and `dbias` are f32, `dx` has
/// the activation dtype and the layout of `x`.
#[derive(Debug)]
pub struct Gradients<'a, T> {
    /// The input gradient, overwritten.
    pub dx: Option<&'a mut [T]>,
    /// `sum(dy * xhat)` per channel.
    pub dweight: Option<&'a mut [f32]>,
    /// `sum(dy)` per channel.
    pub dbias: Option<&'a mut [f32]>,
    /// Add into `dweight` and `dbias` (gradient accumulation) instead of overwriting them.
    pub accumulate: bool,
}

/// A per-channel parameter widened to f64, or `default` for every channel when absent.
fn widen_or(values: Option<&[f32]>, channels: usize, default: f64) -> Vec<f64> {
    match values {
        Some(values) => widen(values),
        None => vec![default; channels],
    }
}

fn widen(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&v| f64::from(v)).collect()
}

fn narrow(values: &[f64]) -> Vec<f32> {
    values.iter().map(|&v| v as f32).collect()
}

/// Training-mode forward: normalizes `x` with its batch statistics into `y` and, when `running`
/// is given, updates the running statistics (PyTorch: `running_var` takes the unbiased variance
/// `var * m / (m - 1)`, `m = N * spatial` values per channel).
///
/// - `x`, `y`: `desc.numel()` elements in `desc`'s memory order; `y` is overwritten.
/// - `weight`, `bias`: `C` values each, or `None` for 1 and 0.
/// - Returns the [`SavedStats`] for [`backward_training`].
///
/// An empty batch (`m = 0`) writes nothing and leaves the running statistics alone.
///
/// Errors: [`Error::BufferLength`](crate::Error::BufferLength) (checked in the order of
/// [`Buffers`]), [`Error::InvalidEps`](crate::Error::InvalidEps),
/// [`Error::InvalidMomentum`](crate::Error::InvalidMomentum) for a factor outside `[0, 1]`,
/// [`Error::SingleValuePerChannel`](crate::Error::SingleValuePerChannel) when `m = 1`.
pub fn forward_training<T: Element>(
    x: &[T],
    desc: &TensorDesc,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    running: Option<RunningUpdate<'_>>,
    eps: f32,
    y: &mut [T],
) -> Result<SavedStats> {
    Buffers {
        x: x.len(),
        y: Some(y.len()),
        weight: weight.map(<[f32]>::len),
        bias: bias.map(<[f32]>::len),
        running_mean: running.as_ref().map(|r| r.mean.len()),
        running_var: running.as_ref().map(|r| r.var.len()),
        ..Default::default()
    }
    .check(desc)?;
    validate_eps(eps)?;
    if let Some(running) = &running {
        validate_momentum(running.factor)?;
    }
    validate::batch_statistics(desc)?;

    let moments = math::moments(x, desc.geometry());
    update_running(running, &moments, desc.per_channel());
    Ok(normalize_batch(x, desc, weight, bias, eps, &moments, y))
}

/// `running = (1 - factor) * running + factor * batch` from the moments of a batch of `m`
/// values per channel (from `x` alone, or merged over every rank by [`sync`]); none when
/// `m == 0`.
fn update_running(running: Option<RunningUpdate<'_>>, moments: &math::Moments, m: usize) {
    let Some(running) = running.filter(|_| m > 0) else {
        return;
    };
    let f = f64::from(running.factor);
    let bessel = match running.var_update {
        RunningVarUpdate::Unbiased => m as f64 / (m - 1) as f64,
        RunningVarUpdate::Biased => 1.0,
    };
    for ch in 0..moments.mean.len() {
        let (mean, var) = (&mut running.mean[ch], &mut running.var[ch]);
        *mean = ((1.0 - f) * f64::from(*mean) + f * moments.mean[ch]) as f32;
        *var = ((1.0 - f) * f64::from(*var) + f * moments.var[ch] * bessel) as f32;
    }
}

/// The rest of a training forward once the batch moments are known, after validation: `y` and
/// the saved statistics.
fn normalize_batch<T: Element>(
    x: &[T],
    desc: &TensorDesc,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    eps: f32,
    moments: &math::Moments,
    y: &mut [T],
) -> SavedStats {
    let (g, c) = (desc.geometry(), desc.channels());
    let invstd = math::invstd(&moments.var, f64::from(eps));
    let weight = widen_or(weight, c, 1.0);
    let norm = Norm {
        mean: &moments.mean,
        invstd: &invstd,
        weight: &weight,
    };
    math::normalize(x, g, &norm, &widen_or(bias, c, 0.0), y);
    SavedStats::from_f64(&moments.mean, &invstd)
}

/// Eval-mode forward: `y = (x - running_mean) * (weight / sqrt(running_var + eps)) + bias`.
///
/// - `x`, `y`: `desc.numel()` elements in `desc`'s memory order; `y` is overwritten.
/// - `weight`, `bias`: `C` values each, or `None` for 1 and 0; `running`: `C` values each.
///
/// Errors: [`Error::BufferLength`](crate::Error::BufferLength),
/// [`Error::InvalidEps`](crate::Error::InvalidEps).
pub fn forward_inference<T: Element>(
    x: &[T],
    desc: &TensorDesc,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    running: RunningStats<'_>,
    eps: f32,
    y: &mut [T],
) -> Result<()> {
    Buffers {
        x: x.len(),
        y: Some(y.len()),
        weight: weight.map(<[f32]>::len),
        bias: bias.map(<[f32]>::len),
        running_mean: Some(running.mean.len()),
        running_var: Some(running.var.len()),
        ..Default::default()
    }
    .check(desc)?;
    validate_eps(eps)?;

    let (g, c) = (desc.geometry(), desc.channels());
    let (mean, invstd) = (
        widen(running.mean),
        math::invstd(&widen(running.var), f64::from(eps)),
    );
    let weight = widen_or(weight, c, 1.0);
    let norm = Norm {
        mean: &mean,
        invstd: &invstd,
        weight: &weight,
    };
    math::normalize(x, g, &norm, &widen_or(bias, c, 0.0), y);
    Ok(())
}

/// Writes per-channel gradients in f32, overwriting or accumulating.
fn store(out: Option<&mut [f32]>, values: &[f64], accumulate: bool) {
    if let Some(out) = out {
        for (out, &value) in out.iter_mut().zip(values) {
            let base = if accumulate { f64::from(*out) } else { 0.0 };
            *out = (base + value) as f32;
        }
    }
}

/// The buffers both backwards take, less the statistics.
fn backward_buffers<T>(
    x: &[T],
    dy: &[T],
    weight: Option<&[f32]>,
    grads: &Gradients<'_, T>,
) -> Buffers {
    Buffers {
        x: x.len(),
        dy: Some(dy.len()),
        dx: grads.dx.as_ref().map(|dx| dx.len()),
        weight: weight.map(<[f32]>::len),
        dweight: grads.dweight.as_ref().map(|d| d.len()),
        dbias: grads.dbias.as_ref().map(|d| d.len()),
        ..Default::default()
    }
}

/// Training-mode backward from the [`SavedStats`] of [`forward_training`]:
/// `dx = weight * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))`,
/// `dweight = sum(dy * xhat)`, `dbias = sum(dy)`, with `xhat = (x - mean) * invstd`.
///
/// - `x`, `dy` and `grads.dx`: `desc.numel()` elements in `desc`'s memory order;
/// - `weight`: `C` values or `None` for 1; `grads.dweight`, `grads.dbias`: `C` values each.
///
/// Only the gradients given in `grads` are written. An empty batch gives zero `dweight` and
/// `dbias`.
///
/// Errors: [`Error::BufferLength`](crate::Error::BufferLength),
/// [`Error::SingleValuePerChannel`](crate::Error::SingleValuePerChannel) (no training forward
/// of such a batch exists).
pub fn backward_training<T: Element>(
    x: &[T],
    dy: &[T],
    desc: &TensorDesc,
    weight: Option<&[f32]>,
    saved: &SavedStats,
    grads: Gradients<'_, T>,
) -> Result<()> {
    saved
        .buffers(backward_buffers(x, dy, weight, &grads))
        .check(desc)?;
    validate::batch_statistics(desc)?;

    let (g, c) = (desc.geometry(), desc.channels());
    let (mean, invstd, weight) = (
        saved.full_mean(),
        widen(&saved.invstd),
        widen_or(weight, c, 1.0),
    );
    let norm = Norm {
        mean: &mean,
        invstd: &invstd,
        weight: &weight,
    };
    let sums = math::param_grads(x, dy, g, &norm);
    if let Some(dx) = grads.dx {
        math::training_dx(x, dy, g, &norm, &sums, dx);
    }
    store(grads.dweight, &sums.dweight, grads.accumulate);
    store(grads.dbias, &sums.dbias, grads.accumulate);
    Ok(())
}

/// Eval-mode backward with the running statistics (which do not depend on `x`):
/// `dx = dy * weight / sqrt(running_var + eps)`, `dweight = sum(dy * xhat)` with
/// `xhat = (x - running_mean) / sqrt(running_var + eps)`, `dbias = sum(dy)`.
///
/// Buffers as in [`backward_training`], `running` holding `C` values each.
///
/// Errors: [`Error::BufferLength`](crate::Error::BufferLength),
/// [`Error::InvalidEps`](crate::Error::InvalidEps).
pub fn backward_inference<T: Element>(
    x: &[T],
    dy: &[T],
    desc: &TensorDesc,
    weight: Option<&[f32]>,
    running: RunningStats<'_>,
    eps: f32,
    grads: Gradients<'_, T>,
) -> Result<()> {
    Buffers {
        running_mean: Some(running.mean.len()),
        running_var: Some(running.var.len()),
        ..backward_buffers(x, dy, weight, &grads)
    }
    .check(desc)?;
    validate_eps(eps)?;

    let (g, c) = (desc.geometry(), desc.channels());
    let (mean, invstd) = (
        widen(running.mean),
        math::invstd(&widen(running.var), f64::from(eps)),
    );
    let weight = widen_or(weight, c, 1.0);
    let norm = Norm {
        mean: &mean,
        invstd: &invstd,
        weight: &weight,
    };
    let sums = math::param_grads(x, dy, g, &norm);
    if let Some(dx) = grads.dx {
        math::eval_dx(dy, g, &norm, dx);
    }
    store(grads.dweight, &sums.dweight, grads.accumulate);
    store(grads.dbias, &sums.dbias, grads.accumulate);
    Ok(())
}
