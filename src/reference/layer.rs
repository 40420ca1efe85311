//! The stateful CPU layer, `torch.nn.BatchNorm{1,2,3}d` on host buffers.

use super::{
    backward_inference, backward_training, fold, forward_inference, forward_training, Epilogue,
    EpilogueGrad, FoldBatchNorm, Folded, Gradients, RunningStats, RunningUpdate, SavedStats,
};
use crate::config::BatchNormConfig;
use crate::dtype::Element;
use crate::epilogue::{self, EpilogueKind};
use crate::error::{Error, Result};
use crate::fold::FoldSpec;
use crate::shape::TensorDesc;
use crate::state::LayerState;
use crate::validate::{self, Buffers};

/// A batch-norm layer with PyTorch's state and rules, on the CPU.
///
/// State: f32 `weight` and `bias` (1 and 0 at creation, absent when `affine = false`),
/// `running_mean` and `running_var` (0 and 1, absent when `track_running_stats = false`) and
/// `num_batches_tracked`. A new layer is in training mode.
///
/// - Training: normalizes with the batch statistics; when tracking, increments the counter
///   (also for an empty batch) and updates the running statistics with factor `momentum`, or
///   `1 / num_batches_tracked` (after the increment) when `momentum` is `None`.
/// - Eval: normalizes with the running statistics; without them (`track_running_stats = false`)
///   with the batch statistics, as PyTorch does, and the counter stays.
///
/// A call that returns an error leaves every parameter, running statistic and the counter
/// bitwise as they were.
///
/// ```
/// use batchnorm_cuda::{reference::BatchNorm, BatchNormConfig, TensorDesc};
///
/// let mut bn = BatchNorm::new(BatchNormConfig::new(3))?;
/// let desc = TensorDesc::nchw(2, 3, 4, 4)?;
/// let x: Vec<f32> = (0..desc.numel()).map(|i| (i % 7) as f32).collect();
/// let (y, cache) = bn.forward(&x, &desc)?;
/// let grads = bn.backward(&cache, &x, &y)?;
/// assert_eq!(bn.num_batches_tracked(), 1);
/// assert_eq!(grads.dx.len(), x.len());
/// # Ok::<(), batchnorm_cuda::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct BatchNorm {
    config: BatchNormConfig,
    weight: Option<Vec<f32>>,
    bias: Option<Vec<f32>>,
    running_mean: Option<Vec<f32>>,
    running_var: Option<Vec<f32>>,
    num_batches_tracked: u64,
    training: bool,
}

/// Which statistics a forward normalized with, as its backward needs them.
#[derive(Clone, Debug, PartialEq)]
pub enum CachedStats {
    /// Batch statistics (training, or eval without running statistics): training backward.
    Batch(SavedStats),
    /// The running statistics at the time of the forward (eval): eval backward.
    Running {
        /// `running_mean`, one per channel.
        mean: Vec<f32>,
        /// `running_var`, one per channel.
        var: Vec<f32>,
    },
}

/// What [`BatchNorm::backward`] needs from its forward: the input's descriptor and the
/// statistics used. The backward reads the layer's weight as it is then.
#[derive(Clone, Debug, PartialEq)]
pub struct ForwardCache {
    desc: TensorDesc,
    stats: CachedStats,
    /// The fused epilogue of a `forward_relu`/`forward_add_relu` (`None`: plain forward).
    epilogue: Option<EpilogueKind>,
}

impl ForwardCache {
    /// The descriptor of the forward's input.
    pub fn desc(&self) -> &TensorDesc {
        &self.desc
    }

    /// The statistics the forward normalized with.
    pub fn stats(&self) -> &CachedStats {
        &self.stats
    }

    /// The fused epilogue the forward ran (`None` for [`BatchNorm::forward`]).
    pub fn epilogue(&self) -> Option<EpilogueKind> {
        self.epilogue
    }
}

/// Gradients from [`BatchNorm::backward`].
#[derive(Clone, Debug, PartialEq)]
pub struct Grads<T> {
    /// Input gradient, in the memory order of `x`.
    pub dx: Vec<T>,
    /// Weight gradient, when the layer is affine.
    pub dweight: Option<Vec<f32>>,
    /// Bias gradient, when the layer is affine.
    pub dbias: Option<Vec<f32>>,
}

/// Replaces a per-channel state buffer with `values` after checking, in this order, that the
/// layer has it (else `missing`), its length, and the values themselves with `check`.
fn set_channels(
    slot: &mut Option<Vec<f32>>,
    what: &'static str,
    values: &[f32],
    missing: Error,
    check: fn(&[f32]) -> Result<()>,
) -> Result<()> {
    let current = slot.as_mut().ok_or(missing)?;
    validate::buffer(what, current.len(), values.len())?;
    check(values)?;
    current.copy_from_slice(values);
    Ok(())
}

/// Any finite or non-finite value is a valid weight, bias or mean.
fn any_values(_: &[f32]) -> Result<()> {
    Ok(())
}

impl BatchNorm {
    /// A layer in training mode with PyTorch's initial state for `config`.
    ///
    /// Errors: those of [`BatchNormConfig::validate`].
    pub fn new(config: BatchNormConfig) -> Result<Self> {
        config.validate()?;
        let c = config.num_features;
        let (affine, track) = (config.affine, config.track_running_stats);
        Ok(Self {
            config,
            weight: affine.then(|| vec![1.0; c]),
            bias: affine.then(|| vec![0.0; c]),
            running_mean: track.then(|| vec![0.0; c]),
            running_var: track.then(|| vec![1.0; c]),
            num_batches_tracked: 0,
            training: true,
        })
    }

    /// The layer's configuration.
    pub fn config(&self) -> &BatchNormConfig {
        &self.config
    }

    /// Training mode: batch statistics, running statistics updated.
    pub fn train(&mut self) {
        self.training = true;
    }

    /// Eval mode: running statistics (batch statistics without them).
    pub fn eval(&mut self) {
        self.training = false;
    }

    /// Whether the layer is in training mode.
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// The scale, `None` when not affine.
    pub fn weight(&self) -> Option<&[f32]> {
        self.weight.as_deref()
    }

    /// The shift, `None` when not affine.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// The running mean, `None` without running statistics.
    pub fn running_mean(&self) -> Option<&[f32]> {
        self.running_mean.as_deref()
    }

    /// The running variance, `None` without running statistics.
    pub fn running_var(&self) -> Option<&[f32]> {
        self.running_var.as_deref()
    }

    /// Training forwards counted so far (0 without running statistics).
    pub fn num_batches_tracked(&self) -> u64 {
        self.num_batches_tracked
    }

    /// Sets the scale. Errors: [`Error::NotAffine`], [`Error::BufferLength`] unless `C` values.
    pub fn set_weight(&mut self, weight: &[f32]) -> Result<()> {
        let missing = Error::NotAffine { what: "set_weight" };
        set_channels(&mut self.weight, "weight", weight, missing, any_values)
    }

    /// Sets the shift. Errors: [`Error::NotAffine`], [`Error::BufferLength`] unless `C` values.
    pub fn set_bias(&mut self, bias: &[f32]) -> Result<()> {
        let missing = Error::NotAffine { what: "set_bias" };
        set_channels(&mut self.bias, "bias", bias, missing, any_values)
    }

    /// Sets the running mean. Errors: [`Error::NoRunningStats`], [`Error::BufferLength`].
    pub fn set_running_mean(&mut self, mean: &[f32]) -> Result<()> {
        let missing = Error::NoRunningStats {
            what: "set_running_mean",
        };
        set_channels(
            &mut self.running_mean,
            "running_mean",
            mean,
            missing,
            any_values,
        )
    }

    /// Sets the running variance. Errors, in this order: [`Error::NoRunningStats`],
    /// [`Error::BufferLength`], [`Error::InvalidRunningVar`] for a negative or non-finite value.
    pub fn set_running_var(&mut self, var: &[f32]) -> Result<()> {
        let missing = Error::NoRunningStats {
            what: "set_running_var",
        };
        set_channels(
            &mut self.running_var,
            "running_var",
            var,
            missing,
            validate::running_var,
        )
    }

    /// Replaces both running statistics, checked first (lengths, a finite non-negative
    /// variance), then [`Error::NoRunningStats`], as the GPU layer's.
    pub fn set_running_stats(&mut self, mean: &[f32], var: &[f32]) -> Result<()> {
        let c = self.config.num_features;
        validate::buffer("running_mean", c, mean.len())?;
        validate::buffer("running_var", c, var.len())?;
        validate::running_var(var)?;
        let (Some(dst_mean), Some(dst_var)) = (&mut self.running_mean, &mut self.running_var)
        else {
            return Err(Error::NoRunningStats {
                what: "set_running_stats",
            });
        };
        dst_mean.copy_from_slice(mean);
        dst_var.copy_from_slice(var);
        Ok(())
    }

    /// Sets the counter (e.g. when loading a checkpoint). Errors: [`Error::NoRunningStats`].
    pub fn set_num_batches_tracked(&mut self, count: u64) -> Result<()> {
        if !self.config.track_running_stats {
            return Err(Error::NoRunningStats {
                what: "set_num_batches_tracked",
            });
        }
        self.num_batches_tracked = count;
        Ok(())
    }

    /// A copy of the whole state, with PyTorch's names (see [`LayerState`]).
    pub fn state(&self) -> LayerState {
        LayerState {
            weight: self.weight.clone(),
            bias: self.bias.clone(),
            running_mean: self.running_mean.clone(),
            running_var: self.running_var.clone(),
            num_batches_tracked: self.num_batches_tracked,
        }
    }

    /// Replaces the whole state after checking it against the configuration
    /// ([`LayerState::check`]); on error nothing changes.
    pub fn load_state(&mut self, state: &LayerState) -> Result<()> {
        state.check(&self.config)?;
        self.weight.clone_from(&state.weight);
        self.bias.clone_from(&state.bias);
        self.running_mean.clone_from(&state.running_mean);
        self.running_var.clone_from(&state.running_var);
        self.num_batches_tracked = state.num_batches_tracked;
        Ok(())
    }

    /// Folds this eval-mode layer into the convolution or linear layer before it (see
    /// [`fold`]): returns the folded weight (memory order of `spec`) and bias.
    ///
    /// Errors: [`Error::TrainingMode`] in training mode (a fold freezes the running statistics),
    /// [`Error::NoRunningStats`] without them, [`Error::ChannelMismatch`] when the layer's
    /// output channels differ from the batch norm's, then those of [`fold`].
    pub fn fold_into<T: Element>(
        &self,
        spec: &FoldSpec,
        weight: &[T],
        bias: Option<&[T]>,
    ) -> Result<Folded<T>> {
        let (mean, var) = self.fold_stats(spec)?;
        let bn = FoldBatchNorm {
            running_mean: mean,
            running_var: var,
            weight: self.weight.as_deref(),
            bias: self.bias.as_deref(),
            eps: self.config.eps,
        };
        fold(spec, weight, bias, &bn)
    }

    fn fold_stats(&self, spec: &FoldSpec) -> Result<(&[f32], &[f32])> {
        if self.training {
            return Err(Error::TrainingMode { what: "fold" });
        }
        let (Some(mean), Some(var)) = (&self.running_mean, &self.running_var) else {
            return Err(Error::NoRunningStats { what: "fold" });
        };
        if spec.c_out() != self.config.num_features {
            return Err(Error::ChannelMismatch {
                expected: self.config.num_features,
                got: spec.c_out(),
            });
        }
        Ok((mean, var))
    }

    /// Whether a forward in the current mode normalizes with batch statistics.
    fn uses_batch_stats(&self) -> bool {
        self.training || !self.config.track_running_stats
    }

    /// Normalizes `x` (laid out as `desc`) and returns `y` with the cache for [`Self::backward`].
    /// Updates the running statistics and the counter in training mode (see [`BatchNorm`]).
    ///
    /// Errors: [`Error::ChannelMismatch`] unless `desc` has the layer's `C`; then those of
    /// [`forward_training`] or [`forward_inference`].
    pub fn forward<T: Element>(
        &mut self,
        x: &[T],
        desc: &TensorDesc,
    ) -> Result<(Vec<T>, ForwardCache)> {
        validate::channels(self.config.num_features, desc)?;
        Buffers {
            x: x.len(),
            ..Default::default()
        }
        .check(desc)?;
        let mut y = vec![T::default(); x.len()];
        let cfg = self.config;
        let stats = match (
            self.uses_batch_stats(),
            &self.running_mean,
            &self.running_var,
        ) {
            (false, Some(mean), Some(var)) => {
                let running = RunningStats { mean, var };
                forward_inference(
                    x,
                    desc,
                    self.weight(),
                    self.bias(),
                    running,
                    cfg.eps,
                    &mut y,
                )?;
                CachedStats::Running {
                    mean: mean.clone(),
                    var: var.clone(),
                }
            }
            _ => CachedStats::Batch(self.batch_forward(|weight, bias, running, eps| {
                forward_training(x, desc, weight, bias, running, eps, &mut y)
            })?),
        };
        Ok((
            y,
            ForwardCache {
                desc: *desc,
                stats,
                epilogue: None,
            },
        ))
    }

    /// A forward with batch statistics: `normalize` gets the weight, the bias, the running update
    /// (when training with running statistics) and eps; the counter moves when it succeeds.
    /// Shared with the simulated [`SyncBatchNorm`](super::sync::SyncBatchNorm).
    pub(super) fn batch_forward(
        &mut self,
        normalize: impl FnOnce(
            Option<&[f32]>,
            Option<&[f32]>,
            Option<RunningUpdate<'_>>,
            f32,
        ) -> Result<SavedStats>,
    ) -> Result<SavedStats> {
        let cfg = self.config;
        let counting = self.training && cfg.track_running_stats;
        let batches_after = self.num_batches_tracked.saturating_add(1);
        let running = match (
            counting,
            self.running_mean.as_deref_mut(),
            self.running_var.as_deref_mut(),
        ) {
            (true, Some(mean), Some(var)) => Some(RunningUpdate {
                mean,
                var,
                factor: cfg.average_factor(batches_after),
                var_update: cfg.running_var_update,
            }),
            _ => None,
        };
        let (weight, bias) = (self.weight.as_deref(), self.bias.as_deref());
        let saved = normalize(weight, bias, running, cfg.eps)?;
        if counting {
            self.num_batches_tracked = batches_after;
        }
        Ok(saved)
    }

    /// Gradients of the forward that produced `cache`, for its input `x` and the gradient `dy`
    /// of its output (both laid out as `cache.desc()`): the training backward after batch
    /// statistics, the eval backward after running statistics. `dweight` and `dbias` are given
    /// when the layer is affine.
    ///
    /// Errors: [`Error::ChannelMismatch`], [`Error::BufferLength`].
    pub fn backward<T: Element>(
        &self,
        cache: &ForwardCache,
        x: &[T],
        dy: &[T],
    ) -> Result<Grads<T>> {
        let desc = &cache.desc;
        validate::channels(self.config.num_features, desc)?;
        Buffers {
            x: x.len(),
            dy: Some(dy.len()),
            ..Default::default()
        }
        .check(desc)?;
        let c = desc.channels();
        let mut dx = vec![T::default(); x.len()];
        let affine = self.config.affine;
        let (mut dweight, mut dbias) = (affine.then(|| vec![0.0; c]), affine.then(|| vec![0.0; c]));
        let grads = Gradients {
            dx: Some(&mut dx),
            dweight: dweight.as_deref_mut(),
            dbias: dbias.as_deref_mut(),
            accumulate: false,
        };
        match &cache.stats {
            CachedStats::Batch(saved) => {
                backward_training(x, dy, desc, self.weight(), saved, grads)?
            }
            CachedStats::Running { mean, var } => {
                let running = RunningStats { mean, var };
                backward_inference(x, dy, desc, self.weight(), running, self.config.eps, grads)?
            }
        }
        Ok(Grads { dx, dweight, dbias })
    }
}

/// Fused ReLU epilogues ([`super::fused`]): the layer's modes, statistics and counter as in
/// [`BatchNorm::forward`], with `y = relu(BN(x) [+ z])` and its ReLU mask, and the backward
/// from the mask.
impl BatchNorm {
    /// `y = relu(BN(x))` and its ReLU mask ([`epilogue::mask_words`] words), with the cache
    /// for [`backward_relu`](Self::backward_relu).
    ///
    /// Errors: those of [`forward`](Self::forward).
    pub fn forward_relu<T: Element>(
        &mut self,
        x: &[T],
        desc: &TensorDesc,
    ) -> Result<(Vec<T>, Vec<u32>, ForwardCache)> {
        self.forward_fused(x, None, desc)
    }

    /// `y = relu(BN(x) + z)` (`z`: the shortcut, laid out as `x`) and its ReLU mask, with the
    /// cache for [`backward_add_relu`](Self::backward_add_relu).
    ///
    /// Errors: those of [`forward`](Self::forward), then [`Error::BufferLength`] for `z`.
    pub fn forward_add_relu<T: Element>(
        &mut self,
        x: &[T],
        z: &[T],
        desc: &TensorDesc,
    ) -> Result<(Vec<T>, Vec<u32>, ForwardCache)> {
        self.forward_fused(x, Some(z), desc)
    }

    /// Gradients of [`forward_relu`](Self::forward_relu) from its mask: those of
    /// [`backward`](Self::backward) for `dy_eff = mask ? dy : 0`.
    ///
    /// Errors: [`Error::EpilogueMismatch`] unless `cache` comes from `forward_relu`, then those
    /// of [`backward`](Self::backward), then [`Error::BufferLength`] for the mask.
    pub fn backward_relu<T: Element>(
        &self,
        cache: &ForwardCache,
        x: &[T],
        dy: &[T],
        mask: &[u32],
    ) -> Result<Grads<T>> {
        Ok(self
            .backward_fused(EpilogueKind::Relu, cache, x, dy, mask)?
            .0)
    }

    /// Gradients of [`forward_add_relu`](Self::forward_add_relu): as
    /// [`backward_relu`](Self::backward_relu), and `dz = dy_eff`, the shortcut's gradient.
    pub fn backward_add_relu<T: Element>(
        &self,
        cache: &ForwardCache,
        x: &[T],
        dy: &[T],
        mask: &[u32],
    ) -> Result<(Grads<T>, Vec<T>)> {
        self.backward_fused(EpilogueKind::AddRelu, cache, x, dy, mask)
    }

    fn forward_fused<T: Element>(
        &mut self,
        x: &[T],
        residual: Option<&[T]>,
        desc: &TensorDesc,
    ) -> Result<(Vec<T>, Vec<u32>, ForwardCache)> {
        validate::channels(self.config.num_features, desc)?;
        Buffers {
            x: x.len(),
            ..Default::default()
        }
        .check(desc)?;
        let mut y = vec![T::default(); x.len()];
        let mut mask = vec![0u32; epilogue::mask_words(desc)];
        let cfg = self.config;
        let epilogue = Epilogue::relu(residual, Some(&mut mask));
        let stats = match (
            self.uses_batch_stats(),
            &self.running_mean,
            &self.running_var,
        ) {
            (false, Some(mean), Some(var)) => {
                let running = RunningStats { mean, var };
                let affine = (self.weight(), self.bias());
                let call = fused_request(desc, x, affine, &mut y, epilogue);
                super::fused::forward_inference(call, running, cfg.eps)?;
                CachedStats::Running {
                    mean: mean.clone(),
                    var: var.clone(),
                }
            }
            _ => CachedStats::Batch(self.batch_forward(|weight, bias, running, eps| {
                let call = fused_request(desc, x, (weight, bias), &mut y, epilogue);
                super::fused::forward_training(call, running, eps)
            })?),
        };
        let epilogue = Some(EpilogueKind::with_residual(residual.is_some()));
        let cache = ForwardCache {
            desc: *desc,
            stats,
            epilogue,
        };
        Ok((y, mask, cache))
    }

    fn backward_fused<T: Element>(
        &self,
        kind: EpilogueKind,
        cache: &ForwardCache,
        x: &[T],
        dy: &[T],
        mask: &[u32],
    ) -> Result<(Grads<T>, Vec<T>)> {
        if cache.epilogue != Some(kind) {
            let (backward, needed) = match kind {
                EpilogueKind::Relu => ("backward_relu", "forward_relu"),
                EpilogueKind::AddRelu => ("backward_add_relu", "forward_add_relu"),
            };
            let ran = match cache.epilogue {
                Some(EpilogueKind::Relu) => "forward_relu",
                Some(EpilogueKind::AddRelu) => "forward_add_relu",
                None => "the plain forward",
            };
            return Err(Error::EpilogueMismatch {
                backward,
                needed,
                ran,
            });
        }
        let desc = &cache.desc;
        validate::channels(self.config.num_features, desc)?;
        Buffers {
            x: x.len(),
            dy: Some(dy.len()),
            ..Default::default()
        }
        .check(desc)?;
        let c = desc.channels();
        let mut dx = vec![T::default(); x.len()];
        let mut dz = vec![T::default(); x.len()];
        let affine = self.config.affine;
        let (mut dweight, mut dbias) = (affine.then(|| vec![0.0; c]), affine.then(|| vec![0.0; c]));
        let grads = Gradients {
            dx: Some(&mut dx),
            dweight: dweight.as_deref_mut(),
            dbias: dbias.as_deref_mut(),
            accumulate: false,
        };
        let request = super::fused::Backward {
            desc: *desc,
            x,
            dy,
            weight: self.weight(),
            grads,
            epilogue: match kind {
                EpilogueKind::Relu => EpilogueGrad::Relu { mask },
                EpilogueKind::AddRelu => EpilogueGrad::AddRelu {
                    mask,
                    dz: Some(&mut dz),
                },
            },
        };
        match &cache.stats {
            CachedStats::Batch(saved) => super::fused::backward_training(request, saved)?,
            CachedStats::Running { mean, var } => {
                let running = RunningStats { mean, var };
                super::fused::backward_inference(request, running, self.config.eps)?
            }
        }
        Ok((Grads { dx, dweight, dbias }, dz))
    }
}

/// The fused forward of `x` with the layer's `(weight, bias)`.
fn fused_request<'a, T>(
    desc: &TensorDesc,
    x: &'a [T],
    (weight, bias): (Option<&'a [f32]>, Option<&'a [f32]>),
    y: &'a mut [T],
    epilogue: Epilogue<'a, T>,
) -> super::fused::Forward<'a, T> {
    super::fused::Forward {
        desc: *desc,
        x,
        weight,
        bias,
        y,
        epilogue,
    }
}

crate::state::stateful_layer_by_inherent_methods!(BatchNorm, state: |layer| Ok(layer.state()));
