//! [`Norm`]: PyTorch's `GroupNorm`, `LayerNorm`, `InstanceNorm{1,2,3}d` and `RMSNorm` as one
//! candle module over [`NormConfig`], and its custom ops: the forward, a `CustomOp3` of
//! `(x, weight, bias)` whose `bwd` runs the backward op of `(x, dy, weight)`, on CPU storage
//! through [`crate::reference::norms`] and, with the feature `candle-cuda`, on CUDA storage
//! through [`crate::gpu::norms`] on candle's stream. A layer without `weight` or `bias` passes
//! `x` in its place, which the ops do not read and give no gradient.

use super::layout::{contiguous_start, to_logical, Placement};
use super::ops::{by_element, commit_running, lock, no_saved_statistics, Emitted, ForwardOutputs};
use crate::dtype::Element;
use crate::norms::{NormConfig, NormDesc, NormEpilogue, NormStats};
use crate::reference::norms as reference;
use crate::shape::{Layout, TensorDesc};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp3, DType, Error, Layout as CandleLayout, Result, Shape, Tensor, Var,
    WithDType,
};
use candle_nn::{Init, ModuleT, VarBuilder};
use std::sync::{Arc, Mutex};

#[cfg(feature = "candle-cuda")]
use candle_core::{cuda_backend::CudaDType, CudaStorage};

/// A group, layer, instance or RMS normalization with PyTorch's semantics for candle tensors,
/// with the gradients of `x`, `weight` and `bias` through candle's autograd.
///
/// - **Which**: the [`NormConfig`] says, with PyTorch's defaults in each configuration's `new`:
///   `GroupNorm(G, C)` and `InstanceNorm{1,2,3}d(C)` on `(N, C, ...)` (rank 2 to 5), contiguous
///   or channels-last (a permuted contiguous `(N, ..., C)`, the output keeps the layout);
///   `LayerNorm(shape)` and `RMSNorm(shape)` over the trailing dimensions `shape` of a
///   contiguous tensor of any rank.
/// - **Train and eval** (`forward_t`'s flag) differ only for an instance norm with
///   `track_running_stats`: training normalizes with each instance's statistics and updates
///   `running_mean` and `running_var` (the batch average of the per-instance mean and unbiased
///   variance, with `momentum`); eval normalizes with them, and the backward treats them as
///   constants. Every other normalization uses its rows' own statistics in both modes.
/// - **Dtypes**: `x` f32, f16 or bf16; `weight`, `bias`, the statistics and `eps` are f32 (an
///   RMS norm with `eps = None` takes the machine epsilon of `x`'s dtype, as PyTorch does).
/// - **Fused SiLU**: [`Norm::forward_silu_t`] gives `silu(norm(x))` in the same pass, with its
///   gradients.
/// - **Devices**: CPU tensors run on [`crate::reference::norms`] (f64 accumulation); CUDA tensors
///   on this crate's kernels on candle's stream (feature `candle-cuda`).
/// - **State**, created or loaded through a [`VarBuilder`] under PyTorch's `state_dict` names:
///   `weight` and `bias` (shape `[C]`, or `normalized_shape` for layer and RMS norm) when the
///   configuration has them; `running_mean`, `running_var` (`[C]`) and `num_batches_tracked`
///   (i64, `[]`; PyTorch keeps it for instance norm but never advances it, nor does this module)
///   for an instance norm with `track_running_stats`.
///
/// Errors are candle errors; those of this crate (a channel count or `normalized_shape` that
/// does not fit, one value per instance in training...) are wrapped [`crate::Error`]s. A failed
/// call leaves the running statistics as they were.
///
/// ```
/// use batchnorm_cuda::candle::Norm;
/// use batchnorm_cuda::norms::{GroupNormConfig, LayerNormConfig, NormConfig};
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{ModuleT, VarBuilder, VarMap};
///
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let gn = Norm::new(NormConfig::Group(GroupNormConfig::new(2, 4)), vb.pp("gn"))?;
/// let ln = Norm::new(NormConfig::Layer(LayerNormConfig::new(&[5, 5])), vb.pp("ln"))?;
/// let x = Tensor::randn(0f32, 1.0, (3, 4, 5, 5), &Device::Cpu)?;
/// let y = ln.forward_t(&gn.forward_t(&x, true)?, true)?;
/// let grads = y.sqr()?.sum_all()?.backward()?;
/// assert!(grads.get(gn.weight().unwrap()).is_some());
/// assert_eq!(ln.weight().unwrap().dims(), [5, 5]);
/// assert!(varmap.data().lock().unwrap().contains_key("ln.bias"));
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Norm {
    config: NormConfig,
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    running: Option<Running>,
}

/// An instance norm's tracked statistics.
#[derive(Clone, Debug)]
struct Running {
    mean: Var,
    var: Var,
    /// In the `state_dict` for PyTorch's sake; never advanced.
    num_batches_tracked: Var,
}

impl Norm {
    /// A normalization of `config` whose parameters and statistics `vb` creates (a `VarMap`:
    /// weight 1, bias 0, running mean 0, running variance 1, counter 0) or loads (a checkpoint),
    /// asking only for what the configuration has.
    ///
    /// Errors: an invalid configuration (wrapped [`crate::Error`]), or `vb`'s error for a
    /// missing tensor or one of another shape.
    pub fn new(config: NormConfig, vb: VarBuilder) -> Result<Self> {
        config.validate().map_err(Error::wrap)?;
        let param_shape = match &config {
            NormConfig::Layer(c) => c.normalized_shape.clone(),
            NormConfig::Rms(c) => c.normalized_shape.clone(),
            other => vec![other.param_len()],
        };
        let f32_tensor = |shape: Vec<usize>, name, value| {
            vb.get_with_hints_dtype(shape, name, Init::Const(value), DType::F32)
        };
        let weight = config
            .has_weight()
            .then(|| f32_tensor(param_shape.clone(), "weight", 1.0))
            .transpose()?;
        let bias = config
            .has_bias()
            .then(|| f32_tensor(param_shape, "bias", 0.0))
            .transpose()?;
        let running = match config.running_momentum() {
            Some(_) => {
                let c = config.param_len();
                Some(Running {
                    mean: Var::from_tensor(&f32_tensor(vec![c], "running_mean", 0.0)?)?,
                    var: Var::from_tensor(&f32_tensor(vec![c], "running_var", 1.0)?)?,
                    num_batches_tracked: Var::from_tensor(&vb.get_with_hints_dtype(
                        (),
                        "num_batches_tracked",
                        Init::Const(0.0),
                        DType::I64,
                    )?)?,
                })
            }
            None => None,
        };
        Ok(Self {
            config,
            weight,
            bias,
            running,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &NormConfig {
        &self.config
    }

    /// `weight`, f32 (a `Var`'s tensor when built from a `VarMap`); `None` without it.
    pub fn weight(&self) -> Option<&Tensor> {
        self.weight.as_ref()
    }

    /// `bias`, f32; `None` without it.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `running_mean`, `[C]` f32; `None` unless an instance norm tracks running statistics.
    pub fn running_mean(&self) -> Option<&Var> {
        self.running.as_ref().map(|r| &r.mean)
    }

    /// `running_var`, `[C]` f32; `None` unless an instance norm tracks running statistics.
    pub fn running_var(&self) -> Option<&Var> {
        self.running.as_ref().map(|r| &r.var)
    }

    /// `num_batches_tracked`, i64 `[]`, kept for PyTorch's `state_dict` and never advanced;
    /// `None` unless an instance norm tracks running statistics.
    pub fn num_batches_tracked(&self) -> Option<&Var> {
        self.running.as_ref().map(|r| &r.num_batches_tracked)
    }

    fn statistics(&self, train: bool) -> Option<NormStatistics> {
        let running = self.running.as_ref()?;
        let (mean, var) = (
            running.mean.as_tensor().clone(),
            running.var.as_tensor().clone(),
        );
        Some(match (train, self.config.running_momentum()) {
            (true, Some(momentum)) => NormStatistics::Updating {
                mean,
                var,
                momentum,
            },
            _ => NormStatistics::Running { mean, var },
        })
    }
}

impl Norm {
    /// `silu(norm(x))` in one pass (`silu(z) = z * sigmoid(z)`: GroupNorm + SiLU of the
    /// diffusion U-Nets), its backward recomputing `z` from `x`; otherwise as
    /// [`ModuleT::forward_t`].
    pub fn forward_silu_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_with(x, NormEpilogue::Silu, train)
    }

    fn forward_with(&self, x: &Tensor, epilogue: NormEpilogue, train: bool) -> Result<Tensor> {
        // Refused before the op so that a bad shape is a clear error on every device.
        let placement = NormPlacement::of(&self.config, x.layout())?;
        let outputs = Arc::new(Mutex::new(ForwardOutputs::default()));
        let op = NormForward {
            config: self.config.clone(),
            has_weight: self.weight.is_some(),
            has_bias: self.bias.is_some(),
            epilogue,
            stats: self.statistics(train),
            outputs: outputs.clone(),
        };
        let weight = self.weight.as_ref().unwrap_or(x);
        let bias = self.bias.as_ref().unwrap_or(x);
        let y = x.apply_op3(weight, bias, op)?;
        if let Some(running) = &self.running {
            commit_running(&outputs, x, &running.mean, &running.var)?;
        }
        placement.to_logical(y)
    }
}

impl ModuleT for Norm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_with(x, NormEpilogue::None, train)
    }
}

/// Where a normalization's input is: its [`NormDesc`], the offset of its first element, and
/// the group/instance-norm tensor descriptor that puts a channels-last output back in order.
struct NormPlacement {
    desc: NormDesc,
    start: usize,
    memory_dims: Vec<usize>,
    tensor: Option<TensorDesc>,
}

impl NormPlacement {
    fn of(config: &NormConfig, layout: &CandleLayout) -> Result<Self> {
        match config {
            NormConfig::Group(_) | NormConfig::Instance(_) => {
                let placement = Placement::of(layout)?;
                let tensor = placement.desc;
                Ok(Self {
                    desc: config
                        .describe(tensor.dims(), tensor.layout())
                        .map_err(Error::wrap)?,
                    start: placement.start,
                    memory_dims: tensor.memory_dims(),
                    tensor: Some(tensor),
                })
            }
            NormConfig::Layer(_) | NormConfig::Rms(_) => Ok(Self {
                desc: config
                    .describe(layout.dims(), Layout::ChannelsFirst)
                    .map_err(Error::wrap)?,
                start: contiguous_start("the input of a layer or RMS norm", layout)?,
                memory_dims: layout.dims().to_vec(),
                tensor: None,
            }),
        }
    }

    fn range(&self) -> std::ops::Range<usize> {
        self.start..self.start + self.desc.numel()
    }

    fn shape(&self) -> Shape {
        Shape::from(self.memory_dims.clone())
    }

    /// An op's output (memory order) as the logical tensor.
    fn to_logical(&self, memory_order: Tensor) -> Result<Tensor> {
        match &self.tensor {
            Some(tensor) => to_logical(memory_order, tensor),
            None => Ok(memory_order),
        }
    }
}

/// The tracked statistics a forward touches (none: each row's own statistics alone).
enum NormStatistics {
    /// Training: the rows' statistics, and the running ones updated from them (new values
    /// handed back in [`ForwardOutputs::running`]).
    Updating {
        mean: Tensor,
        var: Tensor,
        momentum: f32,
    },
    /// Eval: the running statistics.
    Running { mean: Tensor, var: Tensor },
}

/// What a forward saved for its backward: the row statistics (none with running statistics).
#[derive(Default)]
enum NormSaved {
    #[default]
    Nothing,
    Host(Option<NormStats>),
    /// Row statistics on the device; with running statistics, those the forward derived from
    /// them (constants to the backward).
    #[cfg(feature = "candle-cuda")]
    Device(crate::gpu::norms::DeviceNormStats),
}

/// The forward op of `(x, weight, bias)`; the output is `y` in the memory order of `x`.
struct NormForward {
    config: NormConfig,
    has_weight: bool,
    has_bias: bool,
    /// What follows the affine map.
    epilogue: NormEpilogue,
    stats: Option<NormStatistics>,
    /// Shared with the module, which takes the running statistics after the call.
    outputs: Arc<Mutex<ForwardOutputs<NormSaved>>>,
}

/// The backward op of `(x, dy, weight)`, `dy` contiguous in the memory order of `x`; the output
/// is `dx` in that memory order, `dweight` and `dbias` kept for [`NormForward::bwd`].
struct NormBackward<'a> {
    forward: &'a NormForward,
    saved: Arc<NormSaved>,
    /// The forward's bias, which the SiLU backward reads to recompute its input.
    bias: Option<Tensor>,
    dparams: Mutex<(Option<Emitted>, Option<Emitted>)>,
}

/// `len` f32 values of a contiguous parameter or statistics storage.
fn cpu_f32<'s>(
    what: &'static str,
    storage: &'s CpuStorage,
    layout: &CandleLayout,
    len: usize,
) -> Result<&'s [f32]> {
    let start = contiguous_start(what, layout)?;
    if layout.shape().elem_count() != len {
        return Err(Error::wrap(crate::Error::BufferLength {
            what,
            needed: len,
            got: layout.shape().elem_count(),
        }));
    }
    let values = storage.as_slice::<f32>().map_err(|_| {
        Error::Msg(format!(
            "batchnorm-cuda: {what} must be f32, got {:?}",
            storage.dtype()
        ))
        .bt()
    })?;
    Ok(&values[start..start + len])
}

fn forward_cpu<T: Element + WithDType>(
    op: &NormForward,
    (x, x_layout): (&CpuStorage, &CandleLayout),
    (w, w_layout): (&CpuStorage, &CandleLayout),
    (b, b_layout): (&CpuStorage, &CandleLayout),
) -> Result<(CpuStorage, Shape)> {
    let placement = NormPlacement::of(&op.config, x_layout)?;
    let desc = placement.desc;
    let c = desc.channels();
    let x = &x.as_slice::<T>()?[placement.range()];
    let weight = match op.has_weight {
        true => Some(cpu_f32("weight", w, w_layout, c)?),
        false => None,
    };
    let bias = match op.has_bias {
        true => Some(cpu_f32("bias", b, b_layout, c)?),
        false => None,
    };
    let mut y = vec![T::default(); x.len()];
    let (mut mean, mut var) = match &op.stats {
        Some(
            NormStatistics::Updating { mean, var, .. } | NormStatistics::Running { mean, var },
        ) => (mean.to_vec1::<f32>()?, var.to_vec1::<f32>()?),
        None => (Vec::new(), Vec::new()),
    };
    let statistics = match &op.stats {
        None => reference::Statistics::Batch,
        Some(NormStatistics::Updating { momentum, .. }) => reference::Statistics::BatchUpdating {
            running_mean: &mut mean,
            running_var: &mut var,
            momentum: *momentum,
        },
        Some(NormStatistics::Running { .. }) => {
            reference::Statistics::Running(reference::RunningStats {
                mean: &mean,
                var: &var,
            })
        }
    };
    let call = reference::Forward {
        weight,
        bias,
        statistics,
        epilogue: op.epilogue,
        ..reference::Forward::new(x, op.config.eps(<T as Element>::DTYPE), &mut y)
    };
    let saved = reference::forward(&desc, call).map_err(Error::wrap)?;
    let running = matches!(op.stats, Some(NormStatistics::Updating { .. }))
        .then(|| (Emitted::host(mean, c), Emitted::host(var, c)));
    *lock(&op.outputs)? = ForwardOutputs {
        saved: Arc::new(NormSaved::Host(saved)),
        running,
    };
    Ok((T::to_cpu_storage_owned(y), placement.shape()))
}

fn backward_cpu<T: Element + WithDType>(
    op: &NormBackward<'_>,
    (x, x_layout): (&CpuStorage, &CandleLayout),
    (dy, dy_layout): (&CpuStorage, &CandleLayout),
    (w, w_layout): (&CpuStorage, &CandleLayout),
) -> Result<(CpuStorage, Shape)> {
    let forward = op.forward;
    let NormSaved::Host(saved) = &*op.saved else {
        return Err(no_saved_statistics());
    };
    let placement = NormPlacement::of(&forward.config, x_layout)?;
    let desc = placement.desc;
    let (c, n) = (desc.channels(), desc.numel());
    let x = &x.as_slice::<T>()?[placement.range()];
    let dy_start = contiguous_start("dy", dy_layout)?;
    let dy = &dy.as_slice::<T>()?[dy_start..dy_start + n];
    let weight = match forward.has_weight {
        true => Some(cpu_f32("weight", w, w_layout, c)?),
        false => None,
    };
    let running = match &forward.stats {
        Some(NormStatistics::Running { mean, var }) => {
            Some((mean.to_vec1::<f32>()?, var.to_vec1::<f32>()?))
        }
        _ => None,
    };
    let stats = match (saved, &running) {
        (Some(saved), _) => reference::UsedStats::Batch(saved),
        (None, Some((mean, var))) => reference::UsedStats::Running(
            reference::RunningStats { mean, var },
            forward.config.eps(<T as Element>::DTYPE),
        ),
        (None, None) => return Err(no_saved_statistics()),
    };
    let bias = match &op.bias {
        Some(bias) => Some(bias.flatten_all()?.to_vec1::<f32>()?),
        None => None,
    };
    let mut dx = vec![T::default(); n];
    let (mut dweight, mut dbias) = (vec![0.0f32; c], vec![0.0f32; c]);
    let call = reference::Backward {
        x,
        dy,
        weight,
        bias: bias.as_deref(),
        stats,
        epilogue: forward.epilogue,
        dx: Some(&mut dx),
        dweight: forward.has_weight.then_some(dweight.as_mut_slice()),
        dbias: forward.has_bias.then_some(dbias.as_mut_slice()),
        accumulate: false,
    };
    reference::backward(&desc, call).map_err(Error::wrap)?;
    *lock(&op.dparams)? = (
        forward.has_weight.then(|| Emitted::host(dweight, c)),
        forward.has_bias.then(|| Emitted::host(dbias, c)),
    );
    Ok((T::to_cpu_storage_owned(dx), placement.shape()))
}

impl CustomOp3 for NormForward {
    fn name(&self) -> &'static str {
        "batchnorm-cuda-norm-forward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &CandleLayout,
        w: &CpuStorage,
        w_layout: &CandleLayout,
        b: &CpuStorage,
        b_layout: &CandleLayout,
    ) -> Result<(CpuStorage, Shape)> {
        let args = ((x, x_layout), (w, w_layout), (b, b_layout));
        by_element!(x.dtype(), forward_cpu, (self, args.0, args.1, args.2))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &CandleLayout,
        w: &CudaStorage,
        w_layout: &CandleLayout,
        b: &CudaStorage,
        b_layout: &CandleLayout,
    ) -> Result<(CudaStorage, Shape)> {
        let args = ((x, x_layout), (w, w_layout), (b, b_layout));
        by_element!(x.dtype(), cuda::forward, (self, args.0, args.1, args.2))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let placement = NormPlacement::of(&self.config, x.layout())?;
        let backward = NormBackward {
            forward: self,
            saved: lock(&self.outputs)?.saved.clone(),
            bias: (self.has_bias && self.epilogue == NormEpilogue::Silu).then(|| bias.clone()),
            dparams: Mutex::new((None, None)),
        };
        // The gradient of the op's memory-order output, laid out as that output.
        let dy = dy.contiguous()?;
        let dx = x.apply_op3_no_bwd(&dy, weight, &backward)?;
        let (dweight, dbias) = std::mem::take(&mut *lock(&backward.dparams)?);
        // Emitted flat, `[C]`; the parameters may have `normalized_shape`.
        let param_grad = |grad: Option<Emitted>, param: &Tensor| {
            grad.map(|g| g.into_tensor(param)?.reshape(param.shape()))
                .transpose()
        };
        Ok((
            Some(placement.to_logical(dx)?),
            param_grad(dweight, weight)?,
            param_grad(dbias, bias)?,
        ))
    }
}

impl CustomOp3 for NormBackward<'_> {
    fn name(&self) -> &'static str {
        "batchnorm-cuda-norm-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &CandleLayout,
        dy: &CpuStorage,
        dy_layout: &CandleLayout,
        w: &CpuStorage,
        w_layout: &CandleLayout,
    ) -> Result<(CpuStorage, Shape)> {
        let args = ((x, x_layout), (dy, dy_layout), (w, w_layout));
        by_element!(x.dtype(), backward_cpu, (self, args.0, args.1, args.2))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &CandleLayout,
        dy: &CudaStorage,
        dy_layout: &CandleLayout,
        w: &CudaStorage,
        w_layout: &CandleLayout,
    ) -> Result<(CudaStorage, Shape)> {
        let args = ((x, x_layout), (dy, dy_layout), (w, w_layout));
        by_element!(x.dtype(), cuda::backward, (self, args.0, args.1, args.2))
    }
}

/// The CUDA path: [`crate::gpu::norms`] on candle's stream, with the kernels and workspace the
/// stream's state keeps.
#[cfg(feature = "candle-cuda")]
mod cuda {
    use super::*;
    use crate::candle::ops::cuda::{cuda_channels, with_stream};
    use crate::cudarc::driver::{CudaSlice, CudaView};
    use crate::gpu::norms::{self, DeviceNormStats, StatsSource};

    /// `len` f32 values of a contiguous CUDA storage.
    fn f32_view<'s>(
        what: &'static str,
        storage: &'s CudaStorage,
        layout: &CandleLayout,
        len: usize,
    ) -> Result<CudaView<'s, f32>> {
        let start = contiguous_start(what, layout)?;
        if layout.shape().elem_count() != len {
            return Err(Error::wrap(crate::Error::BufferLength {
                what,
                needed: len,
                got: layout.shape().elem_count(),
            }));
        }
        Ok(storage.as_cuda_slice::<f32>()?.slice(start..start + len))
    }

    pub(super) fn forward<T: Element + CudaDType>(
        op: &NormForward,
        (x, x_layout): (&CudaStorage, &CandleLayout),
        (w, w_layout): (&CudaStorage, &CandleLayout),
        (b, b_layout): (&CudaStorage, &CandleLayout),
    ) -> Result<(CudaStorage, Shape)> {
        let device = x.device().clone();
        let placement = NormPlacement::of(&op.config, x_layout)?;
        let desc = placement.desc;
        let c = desc.channels();
        let x_view = x.as_cuda_slice::<T>()?.slice(placement.range());
        let weight = match op.has_weight {
            true => Some(f32_view("weight", w, w_layout, c)?),
            false => None,
        };
        let bias = match op.has_bias {
            true => Some(f32_view("bias", b, b_layout, c)?),
            false => None,
        };
        let mut y = device.alloc_zeros::<T>(desc.numel())?;
        let (saved, running) = with_stream(&device, |state| {
            let (kernels, workspace) = state.norms()?;
            let gpu = kernels.context();
            let mut saved = DeviceNormStats::new(gpu, desc.rows()).map_err(Error::wrap)?;
            let mut run = |statistics, y: &mut CudaSlice<T>, saved: &mut DeviceNormStats| {
                let call = norms::Forward {
                    weight: weight.as_ref().map(|w| w.slice(..)),
                    bias: bias.as_ref().map(|b| b.slice(..)),
                    statistics,
                    epilogue: op.epilogue,
                    ..norms::Forward::new(
                        x_view.slice(..),
                        op.config.eps(<T as Element>::DTYPE),
                        y.as_view_mut(),
                        saved.as_mut(),
                    )
                };
                norms::forward(kernels, workspace, &desc, call).map_err(Error::wrap)
            };
            let running = match &op.stats {
                None => {
                    run(norms::Statistics::Batch, &mut y, &mut saved)?;
                    None
                }
                Some(NormStatistics::Updating {
                    mean,
                    var,
                    momentum,
                }) => {
                    // The update writes copies: the Vars are set from them after the call.
                    let copy = |t: &Tensor, what| -> Result<CudaSlice<f32>> {
                        let (storage, layout) = t.storage_and_layout();
                        let view = cuda_channels(what, &storage, layout)?;
                        gpu.stream().clone_dtod(&view).map_err(Error::wrap)
                    };
                    let (mut new_mean, mut new_var) =
                        (copy(mean, "running_mean")?, copy(var, "running_var")?);
                    let statistics = norms::Statistics::BatchUpdating {
                        running_mean: new_mean.as_view_mut(),
                        running_var: new_var.as_view_mut(),
                        momentum: *momentum,
                    };
                    run(statistics, &mut y, &mut saved)?;
                    Some((
                        Emitted::device(new_mean, &device, c),
                        Emitted::device(new_var, &device, c),
                    ))
                }
                Some(NormStatistics::Running { mean, var }) => {
                    let (mean_storage, mean_layout) = mean.storage_and_layout();
                    let (var_storage, var_layout) = var.storage_and_layout();
                    let statistics = norms::Statistics::Running {
                        mean: cuda_channels("running_mean", &mean_storage, mean_layout)?,
                        var: cuda_channels("running_var", &var_storage, var_layout)?,
                    };
                    run(statistics, &mut y, &mut saved)?;
                    None
                }
            };
            Ok((saved, running))
        })?;
        *lock(&op.outputs)? = ForwardOutputs {
            saved: Arc::new(NormSaved::Device(saved)),
            running,
        };
        Ok((CudaStorage::wrap_cuda_slice(y, device), placement.shape()))
    }

    pub(super) fn backward<T: Element + CudaDType>(
        op: &NormBackward<'_>,
        (x, x_layout): (&CudaStorage, &CandleLayout),
        (dy, dy_layout): (&CudaStorage, &CandleLayout),
        (w, w_layout): (&CudaStorage, &CandleLayout),
    ) -> Result<(CudaStorage, Shape)> {
        let forward = op.forward;
        let NormSaved::Device(saved) = &*op.saved else {
            return Err(no_saved_statistics());
        };
        let device = x.device().clone();
        let placement = NormPlacement::of(&forward.config, x_layout)?;
        let desc = placement.desc;
        let (c, n) = (desc.channels(), desc.numel());
        let x_view = x.as_cuda_slice::<T>()?.slice(placement.range());
        let dy_start = contiguous_start("dy", dy_layout)?;
        let dy_view = dy.as_cuda_slice::<T>()?.slice(dy_start..dy_start + n);
        let weight = match forward.has_weight {
            true => Some(f32_view("weight", w, w_layout, c)?),
            false => None,
        };
        let mut dx = device.alloc_zeros::<T>(n)?;
        let mut dweight = device.alloc_zeros::<f32>(c)?;
        let mut dbias = device.alloc_zeros::<f32>(c)?;
        let bias_guard = op.bias.as_ref().map(Tensor::storage_and_layout);
        let bias = match &bias_guard {
            Some((storage, layout)) => Some(cuda_channels("bias", storage, layout)?),
            None => None,
        };
        with_stream(&device, |state| {
            let (kernels, workspace) = state.norms()?;
            let call = norms::Backward {
                x: x_view.slice(..),
                dy: dy_view.slice(..),
                weight: weight.as_ref().map(|w| w.slice(..)),
                bias: bias.as_ref().map(|b| b.slice(..)),
                stats: saved.as_view(),
                source: match forward.stats {
                    Some(NormStatistics::Running { .. }) => StatsSource::Running,
                    _ => StatsSource::Batch,
                },
                epilogue: forward.epilogue,
                dx: Some(dx.as_view_mut()),
                dweight: forward.has_weight.then_some(dweight.as_view_mut()),
                dbias: forward.has_bias.then_some(dbias.as_view_mut()),
                accumulate: false,
            };
            norms::backward(kernels, workspace, &desc, call).map_err(Error::wrap)
        })?;
        *lock(&op.dparams)? = (
            forward
                .has_weight
                .then(|| Emitted::device(dweight, &device, c)),
            forward.has_bias.then(|| Emitted::device(dbias, &device, c)),
        );
        Ok((CudaStorage::wrap_cuda_slice(dx, device), placement.shape()))
    }
}
