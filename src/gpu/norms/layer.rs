//! The stateful layer over [`super::forward`] and [`super::backward`] on the device, the GPU
//! twin of [`crate::reference::norms::NormLayer`] (same methods and errors, except where a CUDA
//! graph needs buffers that stay put: see [`NormLayer`]).

use super::{
    backward, forward, Backward, DeviceNormStats, Forward, NormWorkspace, Norms, Residual,
    Statistics, StatsSource,
};
use crate::dtype::Element;
use crate::error::Result;
use crate::gpu::context::alloc_error;
use crate::gpu::forwards::{ForwardLog, Ticket};
use crate::norms::{NormConfig, NormDesc, NormEpilogue, NormStats};
use crate::shape::Layout;
use crate::state::LayerState;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

/// `nn.GroupNorm`, `nn.LayerNorm`, `nn.InstanceNorm{1,2,3}d` or `nn.RMSNorm` on the GPU: the
/// parameters, tracked statistics and accumulated gradients live on the device.
///
/// A call that returns an error leaves them as they were.
///
/// Steady-state `forward` and `backward` calls neither allocate nor synchronize the host, so
/// they can be captured in a CUDA graph (on a stream of the layer's own: its workspace serves
/// one stream) after [`NormLayer::reserve`] for the largest shape. The layer keeps the row
/// statistics of its last forward in a buffer that grows to the largest shape and, like the
/// workspace, never grows during or after a capture
/// ([`Error::WorkspaceCannotGrow`](crate::Error::WorkspaceCannotGrow)), so a backward must come
/// before the layer's next forward
/// ([`Error::MissingSavedStats`](crate::Error::MissingSavedStats)). Unlike the CPU twin, the
/// gradients exist (zero) from the start and [`zero_grad`](NormLayer::zero_grad) zeroes them
/// in place, as [`BatchNorm`](crate::gpu::BatchNorm) does: a graph keeps writing into the same
/// buffers.
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
    /// The row statistics of the last forward, in a buffer grown to the largest shape.
    saved: Option<DeviceNormStats>,
    training: bool,
    /// Which forward `saved` holds the statistics of.
    forwards: ForwardLog,
}

/// What a forward hands to its backward: the shape and which statistics normalized it. The
/// row statistics stay in the layer ([`NormLayer::saved_stats`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NormCache {
    desc: NormDesc,
    source: StatsSource,
    ticket: Ticket,
}

impl NormCache {
    /// The shape of the forward.
    pub fn desc(&self) -> &NormDesc {
        &self.desc
    }
}

impl NormLayer {
    /// A fresh layer in training mode, with PyTorch's initial state.
    ///
    /// Errors: those of [`NormConfig::validate`], or a device error.
    pub fn new(norms: &Norms, config: NormConfig) -> Result<Self> {
        config.validate()?;
        let len = config.param_len();
        let zeros = |wanted: bool| -> Result<Option<CudaSlice<f32>>> {
            let stream = norms.context().stream();
            let alloc = || stream.alloc_zeros::<f32>(len).map_err(alloc_error(len * 4));
            wanted.then(alloc).transpose()
        };
        let mut layer = Self {
            norms: norms.clone(),
            epilogue: NormEpilogue::None,
            weight: None,
            bias: None,
            running_mean: None,
            running_var: None,
            num_batches_tracked: 0,
            grad_weight: zeros(config.has_weight())?,
            grad_bias: zeros(config.has_bias())?,
            workspace: NormWorkspace::new(),
            saved: None,
            training: true,
            forwards: ForwardLog::new(),
            config,
        };
        layer.load_state(layer.config.initial_state())?;
        Ok(layer)
    }

    /// Sizes the workspace and the saved statistics for every call on `dims` in `layout`:
    /// before capturing a CUDA graph, with the largest shape.
    ///
    /// Errors: those of [`NormConfig::describe`],
    /// [`Error::WorkspaceCannotGrow`](crate::Error::WorkspaceCannotGrow) during or after a
    /// capture, [`Error::WorkspaceOnAnotherStream`](crate::Error::WorkspaceOnAnotherStream).
    pub fn reserve(&mut self, dims: &[usize], layout: Layout) -> Result<()> {
        let desc = self.config.describe(dims, layout)?;
        self.workspace.reserve_for(self.norms.context(), &desc)?;
        self.saved_for(desc.rows()).map(drop)
    }

    /// The saved statistics, grown to at least `rows` rows under the workspace's rules. A
    /// replaced buffer no longer holds any forward's statistics, so it ends their caches.
    fn saved_for(&mut self, rows: usize) -> Result<&mut DeviceNormStats> {
        let held = self.saved.as_ref().map_or(0, DeviceNormStats::len);
        let gpu = self.norms.context();
        if self.saved.is_none() || rows > held {
            self.workspace
                .tenancy
                .admit(gpu, true, 12 * held, 12 * rows.max(1))?;
            self.saved = Some(DeviceNormStats::new(gpu, rows.max(1))?);
            self.forwards.forget();
        }
        Ok(self.saved.as_mut().expect("allocated above"))
    }

    /// The row statistics `cache`'s forward saved, copied to the host (per-row running
    /// statistics after an eval forward of a tracked instance norm).
    ///
    /// Errors: [`Error::MissingSavedStats`](crate::Error::MissingSavedStats) when another
    /// forward of this layer ran since, or the cache is another layer's.
    pub fn saved_stats(&self, cache: &NormCache) -> Result<NormStats> {
        self.forwards.check(&cache.ticket)?;
        let saved = self.saved.as_ref().expect("a forward saved them");
        saved
            .prefix(cache.desc.rows())
            .to_host(self.norms.context())
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

    /// The accumulated `weight` gradient (zero until a backward), when the layer has a weight.
    pub fn grad_weight(&self) -> Option<&CudaSlice<f32>> {
        self.grad_weight.as_ref()
    }

    /// The accumulated `bias` gradient (zero until a backward), when the layer has a bias.
    pub fn grad_bias(&self) -> Option<&CudaSlice<f32>> {
        self.grad_bias.as_ref()
    }

    /// Sets the accumulated gradients to zero, in place (PyTorch's
    /// `zero_grad(set_to_none=False)`: a captured graph keeps its buffers).
    pub fn zero_grad(&mut self) -> Result<()> {
        let stream = self.norms.context().stream().clone();
        for grad in [self.grad_weight.as_mut(), self.grad_bias.as_mut()]
            .into_iter()
            .flatten()
        {
            stream.memset_zeros(grad)?;
        }
        Ok(())
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
        self.run_forward(x, None, dims, layout, y)
    }

    /// The pre-norm transformer's fused step: writes `sum = x + residual` (rounded to `T`, as
    /// PyTorch adds) and normalizes `sum` into `y`, in one pass over `x` and `residual`.
    ///
    /// The backward of this forward takes `sum` as its `x`. Its `dx` is the gradient of `sum`
    /// through the normalization; the gradient of `x` and of `residual` is that plus whatever
    /// `sum` receives downstream (as the next block's residual).
    ///
    /// ```no_run
    /// # use batchnorm_cuda::{gpu::{self, norms::{NormLayer, Norms, Residual}}, norms::{NormConfig, RmsNormConfig}, Layout};
    /// # fn main() -> batchnorm_cuda::Result<()> {
    /// let norms = Norms::new(&gpu::GpuContext::new(0)?)?;
    /// let mut rms = NormLayer::new(&norms, NormConfig::Rms(RmsNormConfig::new(&[4096])))?;
    /// let stream = norms.context().stream();
    /// let (x, r) = (stream.alloc_zeros::<f32>(8 * 4096)?, stream.alloc_zeros::<f32>(8 * 4096)?);
    /// let (mut sum, mut y) = (stream.alloc_zeros::<f32>(8 * 4096)?, stream.alloc_zeros::<f32>(8 * 4096)?);
    /// let residual = Residual { residual: r.as_view(), sum: sum.as_view_mut() };
    /// let cache = rms.forward_residual(&x.as_view(), residual, &[8, 4096], Layout::ChannelsFirst, &mut y.as_view_mut())?;
    /// # let _ = cache;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// Errors: those of [`NormLayer::forward`]; `residual` and `sum` are checked as `x` is.
    pub fn forward_residual<T: Element>(
        &mut self,
        x: &CudaView<'_, T>,
        residual: Residual<'_, T>,
        dims: &[usize],
        layout: Layout,
        y: &mut CudaViewMut<'_, T>,
    ) -> Result<NormCache> {
        self.run_forward(x, Some(residual), dims, layout, y)
    }

    fn run_forward<T: Element>(
        &mut self,
        x: &CudaView<'_, T>,
        residual: Option<Residual<'_, T>>,
        dims: &[usize],
        layout: Layout,
        y: &mut CudaViewMut<'_, T>,
    ) -> Result<NormCache> {
        let desc = self.config.describe(dims, layout)?;
        self.saved_for(desc.rows())?;
        let stats = self.saved.as_mut().expect("sized above");
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
            residual,
            weight: self.weight.as_ref().map(CudaSlice::as_view),
            bias: self.bias.as_ref().map(CudaSlice::as_view),
            statistics,
            epilogue: self.epilogue,
            ..Forward::new(
                x.slice(..),
                self.config.eps(T::DTYPE),
                y.slice_mut(..),
                stats.prefix_mut(desc.rows()),
            )
        };
        forward(&self.norms, &mut self.workspace, &desc, call)?;
        Ok(NormCache {
            desc,
            source,
            ticket: self.forwards.record(),
        })
    }

    /// The backward of the forward that returned `cache`: writes `dx` and adds the parameter
    /// gradients into [`NormLayer::grad_weight`] and [`NormLayer::grad_bias`]. `x` is the
    /// forward's input: its `sum` after [`NormLayer::forward_residual`].
    ///
    /// Errors: those of [`super::backward`].
    pub fn backward<T: Element>(
        &mut self,
        cache: &NormCache,
        x: &CudaView<'_, T>,
        dy: &CudaView<'_, T>,
        dx: &mut CudaViewMut<'_, T>,
    ) -> Result<()> {
        self.forwards.check(&cache.ticket)?;
        let stats = self.saved.as_ref().expect("a forward saved them");
        let call = Backward {
            x: x.slice(..),
            dy: dy.slice(..),
            weight: self.weight.as_ref().map(CudaSlice::as_view),
            bias: self.bias.as_ref().map(CudaSlice::as_view),
            stats: stats.prefix(cache.desc.rows()),
            source: cache.source,
            epilogue: self.epilogue,
            dx: Some(dx.slice_mut(..)),
            dweight: self.grad_weight.as_mut().map(CudaSlice::as_view_mut),
            dbias: self.grad_bias.as_mut().map(CudaSlice::as_view_mut),
            accumulate: true,
        };
        backward(&self.norms, &mut self.workspace, &cache.desc, call)
    }
}
