//! The stateful layer over [`super::forward`] and [`super::backward`] on the device, the GPU
//! twin of [`crate::reference::norms::NormLayer`] (same methods, same errors).

use super::{
    backward, forward, Backward, DeviceNormStats, Forward, NormWorkspace, Norms, Statistics,
    StatsSource,
};
use crate::dtype::Element;
use crate::error::Result;
use crate::norms::{NormConfig, NormDesc, NormEpilogue};
use crate::shape::Layout;
use crate::state::LayerState;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

/// `nn.GroupNorm`, `nn.LayerNorm`, `nn.InstanceNorm{1,2,3}d` or `nn.RMSNorm` on the GPU: the
/// parameters, tracked statistics and accumulated gradients live on the device.
///
/// A call that returns an error leaves them as they were.
#[derive(Debug)]
pub struct NormLayer {
    norms: Norms,
    config: NormConfig,
    epilogue: NormEpilogue,
    weight: Option<CudaSlice<f32>>,
    bias: Option<CudaSlice<f32>>,
    running_mean: Option<CudaSlice<f32>>,
    running_var: Option<CudaSlice<f32>>,
    num_batches_tracked: u64,
    grad_weight: Option<CudaSlice<f32>>,
    grad_bias: Option<CudaSlice<f32>>,
    workspace: NormWorkspace,
    training: bool,
}

/// What a forward leaves for its backward: the shape and the device statistics.
#[derive(Debug)]
pub struct NormCache {
    desc: NormDesc,
    stats: DeviceNormStats,
    source: StatsSource,
}

impl NormCache {
    /// The row statistics the backward reads (per-row running statistics after an eval
    /// forward of a tracked instance norm).
    pub fn stats(&self) -> &DeviceNormStats {
        &self.stats
    }
}

impl NormLayer {
    /// A fresh layer in training mode, with PyTorch's initial state.
    ///
    /// Errors: those of [`NormConfig::validate`], or a device error.
    pub fn new(norms: &Norms, config: NormConfig) -> Result<Self> {
        config.validate()?;
        let mut layer = Self {
            norms: norms.clone(),
            epilogue: NormEpilogue::None,
            weight: None,
            bias: None,
            running_mean: None,
            running_var: None,
            num_batches_tracked: 0,
            grad_weight: None,
            grad_bias: None,
            workspace: NormWorkspace::new(),
            training: true,
            config,
        };
        layer.load_state(layer.config.initial_state())?;
        Ok(layer)
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

    /// The state in PyTorch's `state_dict` names, copied to the host.
    pub fn state(&self) -> Result<LayerState> {
        let stream = self.norms.context().stream();
        let host =
            |b: &Option<CudaSlice<f32>>| b.as_ref().map(|b| stream.clone_dtoh(b)).transpose();
        Ok(LayerState {
            weight: host(&self.weight)?,
            bias: host(&self.bias)?,
            running_mean: host(&self.running_mean)?,
            running_var: host(&self.running_var)?,
            num_batches_tracked: self.num_batches_tracked,
        })
    }

    /// Replaces the state after [`NormConfig::check_state`]; on error nothing changes.
    pub fn load_state(&mut self, state: LayerState) -> Result<()> {
        self.config.check_state(&state)?;
        let stream = self.norms.context().stream();
        let device = |v: &Option<Vec<f32>>| v.as_ref().map(|v| stream.clone_htod(v)).transpose();
        let (weight, bias) = (device(&state.weight)?, device(&state.bias)?);
        let (mean, var) = (device(&state.running_mean)?, device(&state.running_var)?);
        self.weight = weight;
        self.bias = bias;
        self.running_mean = mean;
        self.running_var = var;
        self.num_batches_tracked = state.num_batches_tracked;
        Ok(())
    }

    /// The accumulated `weight` gradient, once a backward ran.
    pub fn grad_weight(&self) -> Option<&CudaSlice<f32>> {
        self.grad_weight.as_ref()
    }

    /// The accumulated `bias` gradient, once a backward ran.
    pub fn grad_bias(&self) -> Option<&CudaSlice<f32>> {
        self.grad_bias.as_ref()
    }

    /// Drops the accumulated gradients.
    pub fn zero_grad(&mut self) {
        self.grad_weight = None;
        self.grad_bias = None;
    }

    /// Normalizes `x` (logical shape `dims`, memory order `layout`) into `y`; training with
    /// tracked statistics updates them.
    ///
    /// Errors: those of [`NormConfig::describe`] and [`super::forward`].
    pub fn forward<T: Element>(
        &mut self,
        x: &CudaView<'_, T>,
        dims: &[usize],
        layout: Layout,
        y: &mut CudaViewMut<'_, T>,
    ) -> Result<NormCache> {
        let desc = self.config.describe(dims, layout)?;
        let mut stats = DeviceNormStats::new(self.norms.context(), desc.rows())?;
        let momentum = self.config.running_momentum();
        let (statistics, source) = match (momentum, &mut self.running_mean, &mut self.running_var) {
            (Some(momentum), Some(mean), Some(var)) if self.training => (
                Statistics::BatchUpdating {
                    running_mean: mean.as_view_mut(),
                    running_var: var.as_view_mut(),
                    momentum,
                },
                StatsSource::Batch,
            ),
            (Some(_), Some(mean), Some(var)) => (
                Statistics::Running {
                    mean: mean.as_view(),
                    var: var.as_view(),
                },
                StatsSource::Running,
            ),
            _ => (Statistics::Batch, StatsSource::Batch),
        };
        let call = Forward {
            weight: self.weight.as_ref().map(CudaSlice::as_view),
            bias: self.bias.as_ref().map(CudaSlice::as_view),
            statistics,
            epilogue: self.epilogue,
            ..Forward::new(
                x.slice(..),
                self.config.eps(T::DTYPE),
                y.slice_mut(..),
                stats.as_mut(),
            )
        };
        forward(&self.norms, &mut self.workspace, &desc, call)?;
        Ok(NormCache {
            desc,
            stats,
            source,
        })
    }

    /// The backward of the forward that returned `cache`: writes `dx` and adds the parameter
    /// gradients into [`NormLayer::grad_weight`] and [`NormLayer::grad_bias`].
    ///
    /// Errors: those of [`super::backward`].
    pub fn backward<T: Element>(
        &mut self,
        cache: &NormCache,
        x: &CudaView<'_, T>,
        dy: &CudaView<'_, T>,
        dx: &mut CudaViewMut<'_, T>,
    ) -> Result<()> {
        let ctx = self.norms.context();
        let len = self.config.param_len();
        let fresh = |present: bool, grad: &mut Option<CudaSlice<f32>>| -> Result<()> {
            if present && grad.is_none() {
                *grad = Some(ctx.stream().alloc_zeros::<f32>(len)?);
            }
            Ok(())
        };
        // A first backward allocates zeroed gradients, dropped again if the call fails.
        let had = (self.grad_weight.is_some(), self.grad_bias.is_some());
        fresh(self.weight.is_some(), &mut self.grad_weight)?;
        fresh(self.bias.is_some(), &mut self.grad_bias)?;
        let call = Backward {
            x: x.slice(..),
            dy: dy.slice(..),
            weight: self.weight.as_ref().map(CudaSlice::as_view),
            bias: self.bias.as_ref().map(CudaSlice::as_view),
            stats: cache.stats.as_view(),
            source: cache.source,
            epilogue: self.epilogue,
            dx: Some(dx.slice_mut(..)),
            dweight: self.grad_weight.as_mut().map(CudaSlice::as_view_mut),
            dbias: self.grad_bias.as_mut().map(CudaSlice::as_view_mut),
            accumulate: true,
        };
        let result = backward(&self.norms, &mut self.workspace, &cache.desc, call);
        if result.is_err() {
            if !had.0 {
                self.grad_weight = None;
            }
            if !had.1 {
                self.grad_bias = None;
            }
        }
        result
    }
}
