//! The stateful layer: `nn.BatchNorm1d/2d/3d` on the GPU.

use super::context::{alloc_error, GpuContext};
use super::forwards::{ForwardLog, Ticket};
use super::functional::{self, Backward, FoldBatchNorm, Forward};
use super::views::{
    BackwardStats, BatchStats, Epilogue, EpilogueGrad, ForwardStats, GradientsMut, RunningStats,
    RunningUpdate, SavedStats, SavedStatsMut,
};
use super::workspace::Workspace;
use crate::config::BatchNormConfig;
use crate::dtype::{DType, Element};
use crate::epilogue::EpilogueKind;
use crate::error::{Error, Result};
use crate::fold::FoldSpec;
use crate::shape::TensorDesc;
use crate::state::LayerState;
use crate::stats::SavedStats as SavedStatsHost;
use crate::validate;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

/// A batch-norm layer whose parameters, gradients, running statistics and scratch live on one
/// GPU, with PyTorch's semantics (`nn.BatchNorm1d/2d/3d`: the layer takes any rank from 2 to 5).
///
/// * `weight`/`bias` (when `affine`) start at 1 and 0; their gradients accumulate across
///   `backward` calls until [`BatchNorm::zero_grad`], like `.grad` in PyTorch.
/// * `running_mean`/`running_var` (when `track_running_stats`) start at 0 and 1.
/// * `num_batches_tracked` is kept on the host: it is an exact integer the host always knows,
///   so the cumulative-average factor needs no device round trip.
///
/// Steady-state `forward` and `backward` calls neither allocate nor synchronize the host, so
/// they can be captured in a CUDA graph, on a stream of the layer's own
/// ([`GpuContext::fork_stream`]; the layer's workspace serves one stream), after
/// [`BatchNorm::reserve`] for the largest shape (the workspace cannot grow during or after a
/// capture: [`Error::WorkspaceCannotGrow`]). The counter counts the calls the host made: a
/// replay does not advance it. With `momentum = None`, whose factor is `1 /
/// num_batches_tracked`, a training forward that updates the running statistics refuses to be
/// captured ([`Error::CumulativeAverageInCapture`]) rather than replay a stale factor. A failed
/// call leaves parameters, running statistics and the counter as they were.
#[derive(Debug)]
pub struct BatchNorm {
    gpu: GpuContext,
    config: BatchNormConfig,
    training: bool,
    weight: Option<CudaSlice<f32>>,
    bias: Option<CudaSlice<f32>>,
    grad_weight: Option<CudaSlice<f32>>,
    grad_bias: Option<CudaSlice<f32>>,
    running_mean: Option<CudaSlice<f32>>,
    running_var: Option<CudaSlice<f32>>,
    num_batches_tracked: u64,
    saved_mean: CudaSlice<f32>,
    saved_mean_lo: CudaSlice<f32>,
    saved_invstd: CudaSlice<f32>,
    workspace: Workspace,
    /// Which forward the saved statistics are of.
    forwards: ForwardLog,
}

/// The layer's buffers a forward with batch statistics uses (see [`BatchNorm::batch_forward`]).
pub(super) struct BatchStep<'a> {
    pub gpu: &'a GpuContext,
    pub workspace: &'a mut Workspace,
    pub weight: Option<CudaView<'a, f32>>,
    pub bias: Option<CudaView<'a, f32>>,
    pub stats: BatchStats<'a>,
}

/// The layer's buffers a backward uses (see [`BatchNorm::backward_step`]); `stats` are the
/// batch statistics the forward saved, or the running ones after an eval forward.
pub(super) struct BackwardStep<'a> {
    pub gpu: &'a GpuContext,
    pub workspace: &'a mut Workspace,
    pub weight: Option<CudaView<'a, f32>>,
    pub stats: BackwardStats<'a>,
    pub dweight: Option<CudaViewMut<'a, f32>>,
    pub dbias: Option<CudaViewMut<'a, f32>>,
}

/// What a forward hands to its backward: the shape, dtype and which statistics normalized it.
/// The saved batch statistics themselves stay in the layer (no allocation per call), so a
/// backward must come before the layer's next forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardCache {
    desc: TensorDesc,
    dtype: DType,
    batch_stats: bool,
    ticket: Ticket,
    /// The fused epilogue of a `forward_relu`/`forward_add_relu`, and whether it wrote a mask.
    epilogue: Option<(EpilogueKind, bool)>,
}

impl ForwardCache {
    /// Shape and layout of the forward's input.
    pub fn desc(&self) -> &TensorDesc {
        &self.desc
    }

    /// Whether the forward normalized with batch statistics (training, or no running stats).
    pub fn used_batch_stats(&self) -> bool {
        self.batch_stats
    }

    /// The fused epilogue the forward ran (`None` for [`BatchNorm::forward`]).
    pub fn epilogue(&self) -> Option<EpilogueKind> {
        self.epilogue.map(|(e, _)| e)
    }
}

impl BatchNorm {
    /// A layer on `gpu`'s device, in training mode, with PyTorch's initial values.
    pub fn new(gpu: &GpuContext, config: BatchNormConfig) -> Result<Self> {
        config.validate()?;
        let c = config.num_features;
        // The device buffer first: a size the device cannot hold is `Error::OutOfMemory` here,
        // before a host buffer of that size is made (which would abort the process).
        let filled = |value: f32| -> Result<CudaSlice<f32>> {
            let stream = gpu.stream();
            let mut buffer = stream
                .alloc_zeros::<f32>(c)
                .map_err(alloc_error(c.saturating_mul(4)))?;
            if value != 0.0 {
                stream.memcpy_htod(&vec![value; c], &mut buffer)?;
            }
            Ok(buffer)
        };
        let optional = |wanted: bool, value: f32| wanted.then(|| filled(value)).transpose();
        Ok(Self {
            gpu: gpu.clone(),
            config,
            training: true,
            weight: optional(config.affine, 1.0)?,
            bias: optional(config.affine, 0.0)?,
            grad_weight: optional(config.affine, 0.0)?,
            grad_bias: optional(config.affine, 0.0)?,
            running_mean: optional(config.track_running_stats, 0.0)?,
            running_var: optional(config.track_running_stats, 1.0)?,
            num_batches_tracked: 0,
            saved_mean: filled(0.0)?,
            saved_mean_lo: filled(0.0)?,
            saved_invstd: filled(0.0)?,
            workspace: Workspace::new(),
            forwards: ForwardLog::new(),
        })
    }

    /// Sizes the layer's workspace for every call on `desc` in `dtype` (see
    /// [`Workspace::reserve_for`]): before capturing a CUDA graph, with the largest shape.
    pub fn reserve(&mut self, desc: &TensorDesc, dtype: DType) -> Result<()> {
        validate::channels(self.config.num_features, desc)?;
        self.workspace.reserve_for(&self.gpu, desc, dtype)
    }

    /// The layer's configuration.
    pub fn config(&self) -> &BatchNormConfig {
        &self.config
    }

    /// The context the layer's buffers live in.
    pub fn gpu(&self) -> &GpuContext {
        &self.gpu
    }

    /// Training mode: batch statistics, running statistics updated.
    pub fn train(&mut self) {
        self.training = true;
    }

    /// Eval mode: running statistics (batch statistics when `track_running_stats` is false).
    pub fn eval(&mut self) {
        self.training = false;
    }

    /// Whether the layer is in training mode.
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// Batch-norm forward of `x` (shape and layout `desc`) into `y`.
    ///
    /// Training mode normalizes with the batch statistics and, when tracking, updates the
    /// running statistics and increments `num_batches_tracked` (also for an empty batch, as
    /// PyTorch does). Eval mode normalizes with the running statistics in one launch.
    pub fn forward<T: Element>(
        &mut self,
        desc: &TensorDesc,
        x: &CudaView<'_, T>,
        y: &mut CudaViewMut<'_, T>,
    ) -> Result<ForwardCache> {
        self.forward_fused(desc, x, y, Epilogue::None)
    }

    /// The forward of [`forward`](Self::forward) and of the fused forwards (`epilogue`).
    fn forward_fused<T: Element>(
        &mut self,
        desc: &TensorDesc,
        x: &CudaView<'_, T>,
        y: &mut CudaViewMut<'_, T>,
        epilogue: Epilogue<'_, T>,
    ) -> Result<ForwardCache> {
        validate::channels(self.config.num_features, desc)?;
        let kind = epilogue.kind().map(|kind| (kind, epilogue.writes_mask()));
        let batch_stats = self.training || !self.config.track_running_stats;
        if batch_stats {
            self.batch_forward(|step| {
                let request = Forward {
                    desc: *desc,
                    x: x.slice(..),
                    weight: step.weight,
                    bias: step.bias,
                    stats: ForwardStats::Batch(step.stats),
                    y: y.slice_mut(..),
                    epilogue,
                };
                functional::forward(step.gpu, step.workspace, request)
            })?;
        } else {
            let request = Forward {
                desc: *desc,
                x: x.slice(..),
                weight: self.weight.as_ref().map(|w| w.as_view()),
                bias: self.bias.as_ref().map(|b| b.as_view()),
                stats: ForwardStats::Running {
                    stats: running_views(&self.running_mean, &self.running_var, "eval forward")?,
                    eps: self.config.eps,
                },
                y: y.slice_mut(..),
                epilogue,
            };
            functional::forward(&self.gpu, &mut self.workspace, request)?;
        }
        let mut cache = self.record_forward(desc, T::DTYPE, batch_stats);
        cache.epilogue = kind;
        Ok(cache)
    }

    /// A forward with batch statistics: `step` gets the layer's parameters, its running update
    /// (when training with running statistics), eps and the saved statistics to write; the
    /// counter moves when it succeeds. Shared with the synchronized layer.
    pub(super) fn batch_forward(
        &mut self,
        step: impl FnOnce(BatchStep<'_>) -> Result<()>,
    ) -> Result<()> {
        let track = self.training && self.config.track_running_stats;
        if track && self.config.momentum.is_none() && self.gpu.is_capturing()? {
            return Err(Error::CumulativeAverageInCapture);
        }
        // Saturating, as the CPU layer: a counter at u64::MAX must not wrap to 0 (factor 1/0).
        let batches_after = self.num_batches_tracked.saturating_add(1);
        let factor = self.config.average_factor(batches_after);
        let running = match (&mut self.running_mean, &mut self.running_var) {
            (Some(mean), Some(var)) if track => Some(RunningUpdate {
                mean: mean.as_view_mut(),
                var: var.as_view_mut(),
                factor,
                var_update: self.config.running_var_update,
            }),
            _ => None,
        };
        step(BatchStep {
            gpu: &self.gpu,
            workspace: &mut self.workspace,
            weight: self.weight.as_ref().map(|w| w.as_view()),
            bias: self.bias.as_ref().map(|b| b.as_view()),
            stats: BatchStats {
                saved: SavedStatsMut {
                    mean: self.saved_mean.as_view_mut(),
                    mean_lo: self.saved_mean_lo.as_view_mut(),
                    invstd: self.saved_invstd.as_view_mut(),
                },
                running,
                eps: self.config.eps,
            },
        })?;
        if track {
            self.num_batches_tracked = batches_after;
        }
        Ok(())
    }

    /// Counts a successful forward and returns its cache.
    pub(super) fn record_forward(
        &mut self,
        desc: &TensorDesc,
        dtype: DType,
        batch_stats: bool,
    ) -> ForwardCache {
        ForwardCache {
            desc: *desc,
            dtype,
            batch_stats,
            ticket: self.forwards.record(),
            epilogue: None,
        }
    }

    /// Backward of the forward that returned `cache`: writes `dx` when given, and adds the
    /// parameter gradients into the layer's `grad_weight`/`grad_bias` (when affine).
    ///
    /// After an eval-mode forward this is the eval-mode backward (running statistics are
    /// constants). `x` and `dy` have the forward's shape and layout.
    pub fn backward<T: Element>(
        &mut self,
        cache: &ForwardCache,
        x: &CudaView<'_, T>,
        dy: &CudaView<'_, T>,
        dx: Option<CudaViewMut<'_, T>>,
    ) -> Result<()> {
        self.backward_fused(cache, x, dy, dx, EpilogueGrad::None)
    }

    /// The backward of [`backward`](Self::backward) and of the fused backwards (`epilogue`),
    /// once the cache is known to match the epilogue.
    fn backward_fused<T: Element>(
        &mut self,
        cache: &ForwardCache,
        x: &CudaView<'_, T>,
        dy: &CudaView<'_, T>,
        dx: Option<CudaViewMut<'_, T>>,
        epilogue: EpilogueGrad<'_, T>,
    ) -> Result<()> {
        let step = self.backward_step::<T>(cache)?;
        let request = Backward {
            desc: cache.desc,
            x: x.slice(..),
            dy: dy.slice(..),
            weight: step.weight,
            stats: step.stats,
            grads: GradientsMut {
                dx,
                dweight: step.dweight,
                dbias: step.dbias,
                accumulate: true,
            },
            epilogue,
        };
        functional::backward(step.gpu, step.workspace, request)
    }

    /// What the backward of `cache` (checked: this layer's latest forward, dtype `T`) computes
    /// with: the saved batch statistics, or the running ones after an eval forward
    /// ([`Error::NoRunningStats`] when there are none). Shared with the synchronized layer.
    pub(super) fn backward_step<T: Element>(
        &mut self,
        cache: &ForwardCache,
    ) -> Result<BackwardStep<'_>> {
        self.check_cache(cache)?;
        if cache.dtype != T::DTYPE {
            return Err(Error::DTypeMismatch {
                what: "x",
                expected: cache.dtype,
                got: T::DTYPE,
            });
        }
        let stats = if cache.batch_stats {
            BackwardStats::Batch(SavedStats {
                mean: self.saved_mean.as_view(),
                mean_lo: Some(self.saved_mean_lo.as_view()),
                invstd: self.saved_invstd.as_view(),
            })
        } else {
            BackwardStats::Running {
                stats: running_views(&self.running_mean, &self.running_var, "eval backward")?,
                eps: self.config.eps,
            }
        };
        Ok(BackwardStep {
            gpu: &self.gpu,
            workspace: &mut self.workspace,
            weight: self.weight.as_ref().map(|w| w.as_view()),
            stats,
            dweight: self.grad_weight.as_mut().map(|g| g.as_view_mut()),
            dbias: self.grad_bias.as_mut().map(|g| g.as_view_mut()),
        })
    }

    /// Sets the parameter gradients to zero (PyTorch's `zero_grad`).
    pub fn zero_grad(&mut self) -> Result<()> {
        let stream = self.gpu.stream().clone();
        for grad in [self.grad_weight.as_mut(), self.grad_bias.as_mut()]
            .into_iter()
            .flatten()
        {
            stream.memset_zeros(grad)?;
        }
        Ok(())
    }

    /// The number of training forwards that updated the running statistics.
    pub fn num_batches_tracked(&self) -> u64 {
        self.num_batches_tracked
    }

    /// Sets the counter (loading a checkpoint); [`Error::NoRunningStats`] when the layer keeps
    /// no running statistics.
    pub fn set_num_batches_tracked(&mut self, value: u64) -> Result<()> {
        if !self.config.track_running_stats {
            return Err(Error::NoRunningStats {
                what: "set_num_batches_tracked",
            });
        }
        self.num_batches_tracked = value;
        Ok(())
    }

    /// A host copy of the weight (`None` when not affine). Synchronizes the stream.
    pub fn weight(&self) -> Result<Option<Vec<f32>>> {
        self.to_host(self.weight.as_ref())
    }

    /// A host copy of the bias (`None` when not affine).
    pub fn bias(&self) -> Result<Option<Vec<f32>>> {
        self.to_host(self.bias.as_ref())
    }

    /// A host copy of the accumulated weight gradient (`None` when not affine).
    pub fn grad_weight(&self) -> Result<Option<Vec<f32>>> {
        self.to_host(self.grad_weight.as_ref())
    }

    /// A host copy of the accumulated bias gradient (`None` when not affine).
    pub fn grad_bias(&self) -> Result<Option<Vec<f32>>> {
        self.to_host(self.grad_bias.as_ref())
    }

    /// A host copy of the running mean (`None` without running statistics).
    pub fn running_mean(&self) -> Result<Option<Vec<f32>>> {
        self.to_host(self.running_mean.as_ref())
    }

    /// A host copy of the running variance (`None` without running statistics).
    pub fn running_var(&self) -> Result<Option<Vec<f32>>> {
        self.to_host(self.running_var.as_ref())
    }

    /// Replaces the weight; [`Error::NotAffine`] when the layer has none.
    pub fn set_weight(&mut self, values: &[f32]) -> Result<()> {
        let c = self.config.num_features;
        validate::buffer("weight", c, values.len())?;
        let target = self
            .weight
            .as_mut()
            .ok_or(Error::NotAffine { what: "set_weight" })?;
        Ok(self.gpu.stream().memcpy_htod(values, target)?)
    }

    /// Replaces the bias; [`Error::NotAffine`] when the layer has none.
    pub fn set_bias(&mut self, values: &[f32]) -> Result<()> {
        let c = self.config.num_features;
        validate::buffer("bias", c, values.len())?;
        let target = self
            .bias
            .as_mut()
            .ok_or(Error::NotAffine { what: "set_bias" })?;
        Ok(self.gpu.stream().memcpy_htod(values, target)?)
    }

    /// Replaces the running mean, as the CPU layer's: [`Error::NoRunningStats`], then
    /// [`Error::BufferLength`].
    pub fn set_running_mean(&mut self, values: &[f32]) -> Result<()> {
        let target = self.running_mean.as_mut().ok_or(Error::NoRunningStats {
            what: "set_running_mean",
        })?;
        validate::buffer("running_mean", self.config.num_features, values.len())?;
        Ok(self.gpu.stream().memcpy_htod(values, target)?)
    }

    /// Replaces the running variance, as the CPU layer's: [`Error::NoRunningStats`],
    /// [`Error::BufferLength`], then [`Error::InvalidRunningVar`].
    pub fn set_running_var(&mut self, values: &[f32]) -> Result<()> {
        let target = self.running_var.as_mut().ok_or(Error::NoRunningStats {
            what: "set_running_var",
        })?;
        validate::buffer("running_var", self.config.num_features, values.len())?;
        validate::running_var(values)?;
        Ok(self.gpu.stream().memcpy_htod(values, target)?)
    }

    /// Replaces both running statistics (checked first: lengths, a finite non-negative
    /// variance); [`Error::NoRunningStats`] when the layer keeps none.
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
        let stream = self.gpu.stream();
        stream.memcpy_htod(mean, dst_mean)?;
        stream.memcpy_htod(var, dst_var)?;
        Ok(())
    }

    /// A host copy of the batch statistics the forward of `cache` saved for its backward
    /// (`None` after an eval-mode forward, which normalizes with the running statistics).
    pub fn saved_stats(&self, cache: &ForwardCache) -> Result<Option<SavedStatsHost>> {
        self.check_cache(cache)?;
        if !cache.batch_stats {
            return Ok(None);
        }
        let stream = self.gpu.stream();
        Ok(Some(SavedStatsHost {
            mean: stream.clone_dtoh(&self.saved_mean)?,
            mean_lo: stream.clone_dtoh(&self.saved_mean_lo)?,
            invstd: stream.clone_dtoh(&self.saved_invstd)?,
        }))
    }

    /// A host copy of the whole state, with PyTorch's names (see [`LayerState`]).
    pub fn state(&self) -> Result<LayerState> {
        Ok(LayerState {
            weight: self.weight()?,
            bias: self.bias()?,
            running_mean: self.running_mean()?,
            running_var: self.running_var()?,
            num_batches_tracked: self.num_batches_tracked,
        })
    }

    /// Replaces the whole state after checking it against the layer's configuration (which
    /// buffers exist, their lengths, a finite non-negative `running_var`): on error nothing
    /// changes.
    pub fn load_state(&mut self, state: &LayerState) -> Result<()> {
        state.check(&self.config)?;
        let stream = self.gpu.stream().clone();
        let pairs = [
            (&mut self.weight, &state.weight),
            (&mut self.bias, &state.bias),
            (&mut self.running_mean, &state.running_mean),
            (&mut self.running_var, &state.running_var),
        ];
        for (device, host) in pairs {
            if let (Some(device), Some(host)) = (device, host) {
                stream.memcpy_htod(host, device)?;
            }
        }
        self.num_batches_tracked = state.num_batches_tracked;
        Ok(())
    }

    /// Folds this eval-mode layer into the convolution or linear layer before it, on the device
    /// (see [`functional::fold`]): reads the layer's weight from `weight_in` (or from
    /// `weight_out` itself when `None`: in place), writes the folded weight to `weight_out` and
    /// the folded bias to `bias_out`.
    ///
    /// Errors: [`Error::TrainingMode`] in training mode, [`Error::NoRunningStats`] without
    /// running statistics, [`Error::ChannelMismatch`] when `spec`'s output channels differ from
    /// the layer's, then those of [`functional::fold`].
    pub fn fold_into<T: Element>(
        &self,
        spec: &FoldSpec,
        weight_in: Option<&CudaView<'_, T>>,
        weight_out: &mut CudaViewMut<'_, T>,
        conv_bias: Option<&CudaView<'_, T>>,
        bias_out: &mut CudaViewMut<'_, T>,
    ) -> Result<()> {
        if self.training {
            return Err(Error::TrainingMode { what: "fold" });
        }
        let running = self.running_stats("fold")?;
        let c = self.config.num_features;
        if spec.c_out() != c {
            return Err(Error::ChannelMismatch {
                expected: c,
                got: spec.c_out(),
            });
        }
        let bn = FoldBatchNorm {
            running_mean: running.mean,
            running_var: running.var,
            weight: self.weight.as_ref().map(|w| w.as_view()),
            bias: self.bias.as_ref().map(|b| b.as_view()),
            eps: self.config.eps,
        };
        functional::fold(
            &self.gpu, spec, weight_in, weight_out, conv_bias, bias_out, &bn,
        )
    }

    /// Borrowed device views of the parameters, for optimizers that update them in place.
    pub fn parameters_mut(&mut self) -> Option<(CudaViewMut<'_, f32>, CudaViewMut<'_, f32>)> {
        Some((
            self.weight.as_mut()?.as_view_mut(),
            self.bias.as_mut()?.as_view_mut(),
        ))
    }

    /// The saved statistics in the layer are those of `cache`'s forward.
    fn check_cache(&self, cache: &ForwardCache) -> Result<()> {
        self.forwards.check(&cache.ticket)
    }

    fn running_stats(&self, what: &'static str) -> Result<RunningStats<'_>> {
        running_views(&self.running_mean, &self.running_var, what)
    }

    fn to_host(&self, buffer: Option<&CudaSlice<f32>>) -> Result<Option<Vec<f32>>> {
        buffer
            .map(|b| Ok(self.gpu.stream().clone_dtoh(b)?))
            .transpose()
    }
}

/// Fused ReLU epilogues ([`functional::Epilogue`]): the forward writes a 1-bit ReLU mask
/// instead of keeping `y`, the backward reads it. Same modes, statistics, counter and gradient
/// accumulation as [`BatchNorm::forward`] and [`BatchNorm::backward`].
impl BatchNorm {
    /// `y = relu(BN(x))`, and the ReLU mask ([`mask_words`](crate::epilogue::mask_words) words)
    /// for [`backward_relu`](Self::backward_relu) when `mask` is given (none for inference).
    ///
    /// Errors: those of [`forward`](Self::forward), then
    /// [`Error::BufferLength`] for the mask.
    pub fn forward_relu<T: Element>(
        &mut self,
        desc: &TensorDesc,
        x: &CudaView<'_, T>,
        y: &mut CudaViewMut<'_, T>,
        mask: Option<&mut CudaViewMut<'_, u32>>,
    ) -> Result<ForwardCache> {
        let mask = mask.map(|m| m.slice_mut(..));
        self.forward_fused(desc, x, y, Epilogue::Relu { mask })
    }

    /// `y = relu(BN(x) + z)` (the ResNet block: `z` is the shortcut, same shape and layout as
    /// `x`, and may be the memory of `y`), and the mask for
    /// [`backward_add_relu`](Self::backward_add_relu).
    ///
    /// Errors: those of [`forward`](Self::forward), then [`Error::BufferLength`] for `z` and the
    /// mask.
    pub fn forward_add_relu<T: Element>(
        &mut self,
        desc: &TensorDesc,
        x: &CudaView<'_, T>,
        z: &CudaView<'_, T>,
        y: &mut CudaViewMut<'_, T>,
        mask: Option<&mut CudaViewMut<'_, u32>>,
    ) -> Result<ForwardCache> {
        let epilogue = Epilogue::AddRelu {
            z: z.slice(..),
            mask: mask.map(|m| m.slice_mut(..)),
        };
        self.forward_fused(desc, x, y, epilogue)
    }

    /// Backward of [`forward_relu`](Self::forward_relu) from its mask: `dx` (when given) and the
    /// parameter gradients of `dy_eff = mask ? dy : 0`.
    ///
    /// Errors: those of [`backward`](Self::backward); [`Error::EpilogueMismatch`] unless `cache`
    /// comes from a `forward_relu` that wrote a mask; [`Error::BufferLength`] for the mask.
    pub fn backward_relu<T: Element>(
        &mut self,
        cache: &ForwardCache,
        x: &CudaView<'_, T>,
        dy: &CudaView<'_, T>,
        mask: &CudaView<'_, u32>,
        dx: Option<CudaViewMut<'_, T>>,
    ) -> Result<()> {
        check_epilogue(EpilogueKind::Relu, cache)?;
        let epilogue = EpilogueGrad::Relu {
            mask: mask.slice(..),
        };
        self.backward_fused(cache, x, dy, dx, epilogue)
    }

    /// Backward of [`forward_add_relu`](Self::forward_add_relu): as
    /// [`backward_relu`](Self::backward_relu), and `dz = dy_eff` (the shortcut's gradient) when
    /// given.
    ///
    /// Errors: as [`backward_relu`](Self::backward_relu), after a `forward_add_relu`.
    pub fn backward_add_relu<T: Element>(
        &mut self,
        cache: &ForwardCache,
        x: &CudaView<'_, T>,
        dy: &CudaView<'_, T>,
        mask: &CudaView<'_, u32>,
        dx: Option<CudaViewMut<'_, T>>,
        dz: Option<CudaViewMut<'_, T>>,
    ) -> Result<()> {
        check_epilogue(EpilogueKind::AddRelu, cache)?;
        let epilogue = EpilogueGrad::AddRelu {
            mask: mask.slice(..),
            dz,
        };
        self.backward_fused(cache, x, dy, dx, epilogue)
    }
}

/// Views of the running statistics; [`Error::NoRunningStats`] (`what`) when the layer keeps none.
fn running_views<'a>(
    mean: &'a Option<CudaSlice<f32>>,
    var: &'a Option<CudaSlice<f32>>,
    what: &'static str,
) -> Result<RunningStats<'a>> {
    match (mean, var) {
        (Some(mean), Some(var)) => Ok(RunningStats {
            mean: mean.as_view(),
            var: var.as_view(),
        }),
        _ => Err(Error::NoRunningStats { what }),
    }
}

/// [`Error::EpilogueMismatch`] unless `cache` comes from a forward with the epilogue `kind` that
/// wrote a mask.
fn check_epilogue(kind: EpilogueKind, cache: &ForwardCache) -> Result<()> {
    let (backward, needed) = match kind {
        EpilogueKind::Relu => ("backward_relu", "forward_relu"),
        EpilogueKind::AddRelu => ("backward_add_relu", "forward_add_relu"),
    };
    let ran = match cache.epilogue {
        Some((ran, true)) if ran == kind => return Ok(()),
        Some((EpilogueKind::Relu, true)) => "forward_relu",
        Some((EpilogueKind::AddRelu, true)) => "forward_add_relu",
        Some((_, false)) => "a fused forward without a mask",
        None => "the plain forward",
    };
    Err(Error::EpilogueMismatch {
        backward,
        needed,
        ran,
    })
}

crate::state::stateful_layer_by_inherent_methods!(BatchNorm, state: |layer| layer.state());
