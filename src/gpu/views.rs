//! The borrowed device buffers a call reads and writes, shared by the public calls
//! ([`super::functional`], [`super::sync`]) and the crate's ops layer beneath them: statistics,
//! running state, gradients and epilogues, each a type that says what it holds.

use crate::config::RunningVarUpdate;
use crate::epilogue;
use crate::error::Result;
use crate::validate::{validate_eps, validate_momentum, Buffers};
use cudarc::driver::{CudaView, CudaViewMut};

/// The running statistics a training forward updates in place:
/// `r = (1 - factor) * r + factor * batch`.
#[derive(Debug)]
pub struct RunningUpdate<'a> {
    /// `[C]` running mean.
    pub mean: CudaViewMut<'a, f32>,
    /// `[C]` running variance.
    pub var: CudaViewMut<'a, f32>,
    /// Weight of the batch: `momentum`, or `1 / num_batches_tracked` for the cumulative average.
    pub factor: f32,
    /// Unbiased (PyTorch) or biased (Keras) batch variance into `var`.
    pub var_update: RunningVarUpdate,
}

/// Running statistics read by eval-mode calls.
#[derive(Debug)]
pub struct RunningStats<'a> {
    /// `[C]` running mean.
    pub mean: CudaView<'a, f32>,
    /// `[C]` running variance.
    pub var: CudaView<'a, f32>,
}

/// Where a training forward writes the batch statistics its backward needs.
#[derive(Debug)]
pub struct SavedStatsMut<'a> {
    /// `[C]` batch mean, rounded to f32 (what PyTorch saves).
    pub mean: CudaViewMut<'a, f32>,
    /// `[C]` the rest of the batch mean: `mean + mean_lo` is the mean to about 48 bits, so that
    /// `x - mean` loses nothing when the mean is large next to the spread.
    pub mean_lo: CudaViewMut<'a, f32>,
    /// `[C]` `1 / sqrt(biased_var + eps)`.
    pub invstd: CudaViewMut<'a, f32>,
}

/// The batch statistics a training forward saved, read by its backward.
#[derive(Debug)]
pub struct SavedStats<'a> {
    /// `[C]` batch mean, rounded to f32.
    pub mean: CudaView<'a, f32>,
    /// `[C]` the low part of the mean ([`SavedStatsMut::mean_lo`]); `None` reads as 0, for
    /// statistics saved elsewhere (PyTorch's), whose f32 mean then limits the accuracy of `dx`
    /// and `dweight` on data with a large mean.
    pub mean_lo: Option<CudaView<'a, f32>>,
    /// `[C]` `1 / sqrt(biased_var + eps)`.
    pub invstd: CudaView<'a, f32>,
}

/// What a training forward computes from the batch: the statistics into `saved`, the running
/// update when given, with `eps`.
#[derive(Debug)]
pub struct BatchStats<'a> {
    /// Receives the batch mean and `1 / sqrt(biased_var + eps)` for the backward.
    pub saved: SavedStatsMut<'a>,
    /// Updated in place when given.
    pub running: Option<RunningUpdate<'a>>,
    /// Added to the biased batch variance.
    pub eps: f32,
}

/// The statistics a forward normalizes with.
#[derive(Debug)]
pub enum ForwardStats<'a> {
    /// Training: the batch's own statistics (a split reduction, then the normalize).
    Batch(BatchStats<'a>),
    /// Eval: the running statistics, `eps` added to the variance on the device.
    Running {
        /// The running statistics.
        stats: RunningStats<'a>,
        /// Added to `stats.var`.
        eps: f32,
    },
}

/// The statistics a backward differentiates through.
#[derive(Debug)]
pub enum BackwardStats<'a> {
    /// Training: the batch statistics its forward saved (the mean and invstd depend on `x`).
    Batch(SavedStats<'a>),
    /// Eval: the running statistics, constants of the forward.
    Running {
        /// The running statistics.
        stats: RunningStats<'a>,
        /// Added to `stats.var`.
        eps: f32,
    },
}

/// Which gradients a backward writes. Any may be absent (output masks); `accumulate` adds the
/// parameter gradients into the given buffers instead of overwriting them (micro-batches).
#[derive(Debug)]
pub struct GradientsMut<'a, T> {
    /// Gradient of the input, same shape and layout as `x`; overwritten.
    pub dx: Option<CudaViewMut<'a, T>>,
    /// `[C]` gradient of the weight: `sum(dy * x_hat)`.
    pub dweight: Option<CudaViewMut<'a, f32>>,
    /// `[C]` gradient of the bias: `sum(dy)`.
    pub dbias: Option<CudaViewMut<'a, f32>>,
    /// Add into `dweight` and `dbias` instead of overwriting them.
    pub accumulate: bool,
}

/// A forward's epilogue on the device ([`crate::epilogue::Epilogue`]): `z` a view of `x`'s
/// shape and layout, the mask [`mask_words`](crate::epilogue::mask_words) `u32` words (layout in
/// [`crate::epilogue`], independent of the dtype).
///
/// `relu(NaN)` is NaN (PyTorch's) with mask bit 0; `BN(x) + z` is computed in f32 and rounded
/// once to `T` (not rounded to `T` after the batch norm first, as the unfused PyTorch ops do:
/// within one rounding of them). Every layout and dtype of the plain calls, unlike cuDNN's fused
/// calls (NHWC, f16, `C % 4 == 0`).
pub type Epilogue<'a, T> = epilogue::Epilogue<CudaView<'a, T>, CudaViewMut<'a, u32>>;

/// A backward's epilogue on the device ([`crate::epilogue::EpilogueGrad`]): the forward's
/// mask, and `dz` of `x`'s shape and layout. The kernels mask `dy` as they load it: nothing
/// extra is written.
pub type EpilogueGrad<'a, T> = epilogue::EpilogueGrad<CudaView<'a, u32>, CudaViewMut<'a, T>>;

/// Floats per channel in a rank's moments: `(count, mean, mean_lo, m2)`, the mean as the exact
/// sum `mean + mean_lo` of two floats.
pub const MOMENT_FLOATS: usize = 4;

impl BatchStats<'_> {
    /// The statistics' buffers, for [`Buffers::check`] beside the activations.
    pub(crate) fn buffers(&self) -> Buffers {
        Buffers {
            running_mean: self.running.as_ref().map(|r| r.mean.len()),
            running_var: self.running.as_ref().map(|r| r.var.len()),
            save_mean: Some(self.saved.mean.len()),
            save_mean_lo: Some(self.saved.mean_lo.len()),
            save_invstd: Some(self.saved.invstd.len()),
            ..Default::default()
        }
    }

    /// `eps`, then the running update's factor.
    pub(crate) fn check_scalars(&self) -> Result<()> {
        validate_eps(self.eps)?;
        match &self.running {
            Some(r) => validate_momentum(r.factor),
            None => Ok(()),
        }
    }
}

// Not derived: `CudaView` is not `Clone`, but a shared view of a view is.
impl Clone for SavedStats<'_> {
    fn clone(&self) -> Self {
        Self {
            mean: self.mean.slice(..),
            mean_lo: self.mean_lo.as_ref().map(|lo| lo.slice(..)),
            invstd: self.invstd.slice(..),
        }
    }
}

impl Clone for RunningStats<'_> {
    fn clone(&self) -> Self {
        Self {
            mean: self.mean.slice(..),
            var: self.var.slice(..),
        }
    }
}

impl SavedStats<'_> {
    /// The saved statistics' buffers, for [`Buffers::check`].
    pub(crate) fn buffers(&self) -> Buffers {
        Buffers {
            save_mean: Some(self.mean.len()),
            save_mean_lo: self.mean_lo.as_ref().map(|lo| lo.len()),
            save_invstd: Some(self.invstd.len()),
            ..Default::default()
        }
    }
}

impl RunningStats<'_> {
    /// The running statistics' buffers, for [`Buffers::check`].
    pub(crate) fn buffers(&self) -> Buffers {
        Buffers {
            running_mean: Some(self.mean.len()),
            running_var: Some(self.var.len()),
            ..Default::default()
        }
    }
}
