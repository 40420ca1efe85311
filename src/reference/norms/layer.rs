//! The stateful layer over [`super::forward`] and [`super::backward`]: any of the four
//! normalizations, its parameters, tracked statistics and accumulated gradients.

use super::{backward, forward, Backward, Forward, Residual, RunningStats, Statistics, UsedStats};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::norms::{NormConfig, NormDesc, NormEpilogue, NormStats};
use crate::shape::Layout;
use crate::state::LayerState;

/// `nn.GroupNorm`, `nn.LayerNorm`, `nn.InstanceNorm{1,2,3}d` or `nn.RMSNorm` on the CPU, from a
/// [`NormConfig`] with PyTorch's defaults; its [`LayerState`] uses PyTorch's `state_dict` names.
///
/// A call that returns an error leaves the parameters, running statistics and gradients as
/// they were.
///
/// ```
/// use batchnorm_cuda::norms::{GroupNormConfig, NormConfig};
/// use batchnorm_cuda::reference::norms::NormLayer;
/// use batchnorm_cuda::Layout;
///
/// let mut gn = NormLayer::new(NormConfig::Group(GroupNormConfig::new(2, 4)))?;
/// let x: Vec<f32> = (0..32).map(|i| (i % 5) as f32).collect();
/// let (y, cache) = gn.forward(&x, &[2, 4, 2, 2], Layout::ChannelsFirst)?;
/// let dx = gn.backward(&cache, &x, &y)?;
/// assert_eq!(dx.len(), 32);
/// assert!(gn.grad_weight().is_some());
/// # Ok::<(), batchnorm_cuda::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct NormLayer {
    config: NormConfig,
    epilogue: NormEpilogue,
    state: LayerState,
    grad_weight: Option<Vec<f32>>,
    grad_bias: Option<Vec<f32>>,
    training: bool,
}

/// What a forward leaves for its backward.
#[derive(Clone, Debug)]
pub struct NormCache {
    desc: NormDesc,
    eps: f32,
    /// `None` when the forward normalized with the running statistics.
    stats: Option<NormStats>,
}

impl NormCache {
    /// The row statistics of a forward with batch statistics.
    pub fn stats(&self) -> Option<&NormStats> {
        self.stats.as_ref()
    }
}

impl NormLayer {
    /// A fresh layer in training mode.
    ///
    /// Errors: those of [`NormConfig::validate`].
    pub fn new(config: NormConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            state: config.initial_state(),
            config,
            epilogue: NormEpilogue::None,
            grad_weight: None,
            grad_bias: None,
            training: true,
        })
    }

    /// The same layer with a fused epilogue (`GroupNorm` + SiLU).
    pub fn with_epilogue(self, epilogue: NormEpilogue) -> Self {
        Self { epilogue, ..self }
    }

    /// The configuration.
    pub fn config(&self) -> &NormConfig {
        &self.config
    }

    /// Training mode (the default).
    pub fn train(&mut self) {
        self.training = true;
    }

    /// Eval mode: an instance norm with tracked statistics normalizes with them.
    pub fn eval(&mut self) {
        self.training = false;
    }

    /// Whether the layer is in training mode.
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// The state in PyTorch's `state_dict` names.
    pub fn state(&self) -> &LayerState {
        &self.state
    }

    /// Replaces the state after [`NormConfig::check_state`]; on error nothing changes.
    pub fn load_state(&mut self, state: LayerState) -> Result<()> {
        self.config.check_state(&state)?;
        self.state = state;
        Ok(())
    }

    /// The accumulated `weight` gradient, once a backward ran.
    pub fn grad_weight(&self) -> Option<&[f32]> {
        self.grad_weight.as_deref()
    }

    /// The accumulated `bias` gradient, once a backward ran.
    pub fn grad_bias(&self) -> Option<&[f32]> {
        self.grad_bias.as_deref()
    }

    /// Drops the accumulated gradients.
    pub fn zero_grad(&mut self) {
        self.grad_weight = None;
        self.grad_bias = None;
    }

    /// Normalizes `x` (logical shape `dims`, memory order `layout`); training with tracked
    /// statistics updates them.
    ///
    /// Errors: those of [`NormConfig::describe`] and [`super::forward`].
    pub fn forward<T: Element>(
        &mut self,
        x: &[T],
        dims: &[usize],
        layout: Layout,
    ) -> Result<(Vec<T>, NormCache)> {
        self.run_forward(x, None, dims, layout)
    }

    /// The pre-norm transformer's fused step: writes `sum = x + residual` (rounded to `T`, as
    /// PyTorch adds) and returns the normalization of `sum`. The backward of this forward takes
    /// `sum` as its `x`; the gradient of `x` and of `residual` is its `dx` plus whatever `sum`
    /// receives downstream.
    ///
    /// Errors: those of [`NormLayer::forward`]; `residual` and `sum` are checked as `x` is.
    pub fn forward_residual<T: Element>(
        &mut self,
        x: &[T],
        residual: Residual<'_, T>,
        dims: &[usize],
        layout: Layout,
    ) -> Result<(Vec<T>, NormCache)> {
        self.run_forward(x, Some(residual), dims, layout)
    }

    fn run_forward<T: Element>(
        &mut self,
        x: &[T],
        residual: Option<Residual<'_, T>>,
        dims: &[usize],
        layout: Layout,
    ) -> Result<(Vec<T>, NormCache)> {
        let desc = self.config.describe(dims, layout)?;
        let eps = self.config.eps(T::DTYPE);
        let mut y = vec![T::default(); x.len()];
        let LayerState {
            weight,
            bias,
            running_mean,
            running_var,
            ..
        } = &mut self.state;
        let statistics = match (self.config.running_momentum(), running_mean, running_var) {
            (Some(momentum), Some(mean), Some(var)) if self.training => Statistics::BatchUpdating {
                running_mean: mean,
                running_var: var,
                momentum,
            },
            (Some(_), Some(mean), Some(var)) => Statistics::Running(RunningStats { mean, var }),
            _ => Statistics::Batch,
        };
        let call = Forward {
            residual,
            weight: weight.as_deref(),
            bias: bias.as_deref(),
            statistics,
            epilogue: self.epilogue,
            ..Forward::new(x, eps, &mut y)
        };
        let stats = forward(&desc, call)?;
        Ok((y, NormCache { desc, eps, stats }))
    }

    /// The backward of the forward that returned `cache`: returns `dx` and adds the parameter
    /// gradients into [`NormLayer::grad_weight`] and [`NormLayer::grad_bias`]. `x` is the
    /// forward's input: its `sum` after [`NormLayer::forward_residual`].
    ///
    /// Errors: those of [`super::backward`]; [`Error::MissingSavedStats`] when the cache's
    /// running statistics are no longer the layer's (the layer was switched to a mode or a
    /// state without them).
    pub fn backward<T: Element>(&mut self, cache: &NormCache, x: &[T], dy: &[T]) -> Result<Vec<T>> {
        let stats = match (
            &cache.stats,
            &self.state.running_mean,
            &self.state.running_var,
        ) {
            (Some(stats), ..) => UsedStats::Batch(stats),
            (None, Some(mean), Some(var)) => {
                UsedStats::Running(RunningStats { mean, var }, cache.eps)
            }
            (None, ..) => {
                return Err(Error::MissingSavedStats {
                    reason: "the forward used running statistics the layer no longer has",
                })
            }
        };
        let len = self.config.param_len();
        let mut grad_weight = self.grad_weight.clone().unwrap_or_else(|| vec![0.0; len]);
        let mut grad_bias = self.grad_bias.clone().unwrap_or_else(|| vec![0.0; len]);
        let mut dx = vec![T::default(); x.len()];
        let (has_weight, has_bias) = (self.state.weight.is_some(), self.state.bias.is_some());
        let call = Backward {
            x,
            dy,
            weight: self.state.weight.as_deref(),
            bias: self.state.bias.as_deref(),
            stats,
            epilogue: self.epilogue,
            dx: Some(&mut dx),
            dweight: has_weight.then_some(grad_weight.as_mut_slice()),
            dbias: has_bias.then_some(grad_bias.as_mut_slice()),
            accumulate: true,
        };
        backward(&cache.desc, call)?;
        if has_weight {
            self.grad_weight = Some(grad_weight);
        }
        if has_bias {
            self.grad_bias = Some(grad_bias);
        }
        Ok(dx)
    }
}
