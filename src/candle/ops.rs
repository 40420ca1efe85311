//! The candle custom ops: the batch-norm forward (a `CustomOp3` of `x`, `weight`, `bias` whose
//! `bwd` runs the backward op) and the backward (`x`, `dy`, `weight` to `dx`), each on CPU
//! storage through [`crate::reference`] and, with the feature `candle-cuda`, on CUDA storage
//! through [`crate::gpu::functional`] on candle's stream.
//!
//! A custom op has one output. What else a call computes (the saved batch statistics, the new
//! running statistics, the parameter gradients) the op keeps in [`Channels`] for its caller:
//! candle gives no way to write into a `Var`'s storage from an op, so the module `Var::set`s the
//! running statistics it gets back.

use super::layout::{contiguous_start, to_logical, Placement};
use crate::config::RunningVarUpdate;
use crate::dtype::Element;
use crate::reference;
use crate::stats::SavedStats;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Error, Layout, Result, Shape, Tensor, WithDType};
use std::sync::{Arc, Mutex, MutexGuard};

#[cfg(feature = "candle-cuda")]
use crate::cudarc::driver::{CudaSlice, CudaView};
#[cfg(feature = "candle-cuda")]
use candle_core::{cuda_backend::CudaDType, CudaDevice, CudaStorage, CustomOp1};

/// Calls `$f::<T>(args)` with `T` the element type of `$dtype`, or fails for another dtype.
macro_rules! by_element {
    ($dtype:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F16 => $f::<half::f16>($($arg),*),
            DType::BF16 => $f::<half::bf16>($($arg),*),
            other => Err(Error::Msg(format!(
                "batchnorm-cuda: activations must be f32, f16 or bf16, got {other:?}"
            ))
            .bt()),
        }
    };
}

/// `[C]` f32 values an op computed, on the device of its inputs.
pub(crate) enum Channels {
    /// On the host (CPU tensors).
    Host(Vec<f32>),
    /// On a CUDA device.
    #[cfg(feature = "candle-cuda")]
    Device(CudaSlice<f32>, CudaDevice),
}

impl Channels {
    /// As a `[C]` f32 tensor on `like`'s device.
    pub(crate) fn into_tensor(self, like: &Tensor) -> Result<Tensor> {
        match self {
            Channels::Host(values) => {
                let len = values.len();
                Tensor::from_vec(values, len, like.device())
            }
            #[cfg(feature = "candle-cuda")]
            Channels::Device(slice, device) => {
                like.apply_op1_no_bwd(&Emit(Mutex::new(Some((slice, device)))))
            }
        }
    }
}

/// Hands a device buffer to candle as a tensor: a custom op is the one way to make a tensor of
/// a `CudaStorage` outside candle-core. Its input only picks the device.
#[cfg(feature = "candle-cuda")]
struct Emit(Mutex<Option<(CudaSlice<f32>, CudaDevice)>>);

#[cfg(feature = "candle-cuda")]
impl CustomOp1 for Emit {
    fn name(&self) -> &'static str {
        "batchnorm-cuda-emit"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Err(Error::Msg("batchnorm-cuda: device values emitted on the CPU".into()).bt())
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        let (slice, device) = lock(&self.0)?
            .take()
            .ok_or_else(|| Error::Msg("batchnorm-cuda: values emitted twice".into()).bt())?;
        let len = slice.len();
        Ok((
            CudaStorage::wrap_cuda_slice(slice, device),
            Shape::from(len),
        ))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    mutex
        .lock()
        .map_err(|_| Error::Msg("batchnorm-cuda: an op panicked holding its outputs".into()).bt())
}

/// The running statistics a training forward updates: read from `mean` and `var`, the new
/// values handed back in [`ForwardOutputs::running`].
pub(crate) struct RunningInputs {
    pub mean: Tensor,
    pub var: Tensor,
    /// Weight of the batch: the momentum, or `1 / num_batches_tracked` after the increment.
    pub factor: f32,
    pub var_update: RunningVarUpdate,
}

/// The statistics a forward normalizes with.
pub(crate) enum Statistics {
    /// The batch's own (training, or eval without running statistics), updating `running` when
    /// given.
    Batch { running: Option<RunningInputs> },
    /// The running statistics (eval).
    Running { mean: Tensor, var: Tensor },
}

/// The batch statistics a training forward saved for its backward.
enum Saved {
    Host(SavedStats),
    #[cfg(feature = "candle-cuda")]
    Device {
        mean: CudaSlice<f32>,
        mean_lo: CudaSlice<f32>,
        invstd: CudaSlice<f32>,
    },
}

/// What a forward computed besides `y`.
#[derive(Default)]
pub(crate) struct ForwardOutputs {
    /// The batch statistics, for the backward (`None` with running statistics).
    saved: Option<Arc<Saved>>,
    /// The new running mean and variance, when the forward updated them.
    pub running: Option<(Channels, Channels)>,
}

/// The batch-norm forward as a candle op of `(x, weight, bias)`; the output is `y` in the memory
/// order of `x` ([`to_logical`] makes it `(N, C, ...)`). Without affine parameters the op reads
/// neither `weight` nor `bias` (any tensor stands in for them) and gives them no gradient.
pub(crate) struct ForwardOp {
    pub eps: f32,
    pub affine: bool,
    pub stats: Statistics,
    /// Shared with the caller, which takes the running statistics after the call.
    pub outputs: Arc<Mutex<ForwardOutputs>>,
}

/// The backward op of `(x, dy, weight)`, `dy` contiguous in the memory order of `x`; the output
/// is `dx` in that memory order, the parameter gradients (when affine) kept in `param_grads`.
struct BackwardOp<'a> {
    forward: &'a ForwardOp,
    saved: Option<Arc<Saved>>,
    param_grads: Mutex<Option<(Channels, Channels)>>,
}

/// The `[C]` f32 values of a CPU tensor's storage, checked.
fn cpu_channels<'s>(
    what: &str,
    storage: &'s CpuStorage,
    layout: &Layout,
    channels: usize,
) -> Result<&'s [f32]> {
    let start = contiguous_start(what, layout)?;
    let values = storage.as_slice::<f32>().map_err(|_| {
        Error::Msg(format!(
            "batchnorm-cuda: {what} must be f32, got {:?}",
            storage.dtype()
        ))
        .bt()
    })?;
    if layout.dims() != [channels] {
        return Err(Error::wrap(crate::Error::ShapeMismatch {
            what: "weight and bias",
            expected: vec![channels],
            got: layout.dims().to_vec(),
        }));
    }
    Ok(&values[start..start + channels])
}

fn forward_cpu<T: Element + WithDType>(
    op: &ForwardOp,
    (x, x_layout): (&CpuStorage, &Layout),
    (w, w_layout): (&CpuStorage, &Layout),
    (b, b_layout): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let placement = Placement::of(x_layout)?;
    let desc = placement.desc;
    let x = &x.as_slice::<T>()?[placement.range()];
    let c = desc.channels();
    let (weight, bias) = match op.affine {
        true => (
            Some(cpu_channels("weight", w, w_layout, c)?),
            Some(cpu_channels("bias", b, b_layout, c)?),
        ),
        false => (None, None),
    };
    let mut y = vec![T::default(); x.len()];
    let outputs = match &op.stats {
        Statistics::Batch { running } => {
            let mut new_running = match running {
                Some(r) => Some((r.mean.to_vec1::<f32>()?, r.var.to_vec1::<f32>()?)),
                None => None,
            };
            let update = running
                .as_ref()
                .zip(new_running.as_mut())
                .map(|(r, (mean, var))| reference::RunningUpdate {
                    mean,
                    var,
                    factor: r.factor,
                    var_update: r.var_update,
                });
            let saved = reference::forward_training(x, &desc, weight, bias, update, op.eps, &mut y)
                .map_err(Error::wrap)?;
            ForwardOutputs {
                saved: Some(Arc::new(Saved::Host(saved))),
                running: new_running.map(|(m, v)| (Channels::Host(m), Channels::Host(v))),
            }
        }
        Statistics::Running { mean, var } => {
            let (mean, var) = (mean.to_vec1::<f32>()?, var.to_vec1::<f32>()?);
            let running = reference::RunningStats {
                mean: &mean,
                var: &var,
            };
            reference::forward_inference(x, &desc, weight, bias, running, op.eps, &mut y)
                .map_err(Error::wrap)?;
            ForwardOutputs::default()
        }
    };
    *lock(&op.outputs)? = outputs;
    Ok((T::to_cpu_storage_owned(y), Shape::from(desc.memory_dims())))
}

fn backward_cpu<T: Element + WithDType>(
    op: &BackwardOp<'_>,
    (x, x_layout): (&CpuStorage, &Layout),
    (dy, dy_layout): (&CpuStorage, &Layout),
    (w, w_layout): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let forward = op.forward;
    let placement = Placement::of(x_layout)?;
    let desc = placement.desc;
    let x = &x.as_slice::<T>()?[placement.range()];
    let dy_start = contiguous_start("dy", dy_layout)?;
    let dy = &dy.as_slice::<T>()?[dy_start..dy_start + desc.numel()];
    let c = desc.channels();
    let weight = match forward.affine {
        true => Some(cpu_channels("weight", w, w_layout, c)?),
        false => None,
    };
    let mut dx = vec![T::default(); x.len()];
    let (mut dweight, mut dbias) = (vec![0.0f32; c], vec![0.0f32; c]);
    let grads = reference::Gradients {
        dx: Some(&mut dx),
        dweight: forward.affine.then_some(dweight.as_mut_slice()),
        dbias: forward.affine.then_some(dbias.as_mut_slice()),
        accumulate: false,
    };
    match (&forward.stats, op.saved.as_deref()) {
        (Statistics::Batch { .. }, Some(Saved::Host(saved))) => {
            reference::backward_training(x, dy, &desc, weight, saved, grads)
        }
        (Statistics::Running { mean, var }, _) => {
            let (mean, var) = (mean.to_vec1::<f32>()?, var.to_vec1::<f32>()?);
            let running = reference::RunningStats {
                mean: &mean,
                var: &var,
            };
            reference::backward_inference(x, dy, &desc, weight, running, forward.eps, grads)
        }
        _ => return Err(no_saved_statistics()),
    }
    .map_err(Error::wrap)?;
    if forward.affine {
        *lock(&op.param_grads)? = Some((Channels::Host(dweight), Channels::Host(dbias)));
    }
    Ok((T::to_cpu_storage_owned(dx), Shape::from(desc.memory_dims())))
}

fn no_saved_statistics() -> Error {
    Error::wrap(crate::Error::MissingSavedStats {
        reason: "its forward op saved none on this device",
    })
}

impl CustomOp3 for ForwardOp {
    fn name(&self) -> &'static str {
        "batchnorm-cuda-forward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_element!(
            x.dtype(),
            forward_cpu(self, (x, x_layout), (w, w_layout), (b, b_layout))
        )
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        w: &CudaStorage,
        w_layout: &Layout,
        b: &CudaStorage,
        b_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        by_element!(
            x.dtype(),
            cuda::forward(self, (x, x_layout), (w, w_layout), (b, b_layout))
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let desc = Placement::of(x.layout())?.desc;
        let backward = BackwardOp {
            forward: self,
            saved: lock(&self.outputs)?.saved.clone(),
            param_grads: Mutex::new(None),
        };
        // The gradient of the op's memory-order output, laid out as that output.
        let dy = dy.contiguous()?;
        let dx = x.apply_op3_no_bwd(&dy, weight, &backward)?;
        let dx = to_logical(dx, &desc)?;
        let param_grads = lock(&backward.param_grads)?.take();
        match param_grads {
            Some((dweight, dbias)) => Ok((
                Some(dx),
                Some(dweight.into_tensor(weight)?),
                Some(dbias.into_tensor(bias)?),
            )),
            None => Ok((Some(dx), None, None)),
        }
    }
}

impl CustomOp3 for BackwardOp<'_> {
    fn name(&self) -> &'static str {
        "batchnorm-cuda-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        dy: &CpuStorage,
        dy_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_element!(
            x.dtype(),
            backward_cpu(self, (x, x_layout), (dy, dy_layout), (w, w_layout))
        )
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        dy: &CudaStorage,
        dy_layout: &Layout,
        w: &CudaStorage,
        w_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        by_element!(
            x.dtype(),
            cuda::backward(self, (x, x_layout), (dy, dy_layout), (w, w_layout))
        )
    }
}

/// The CUDA path: [`crate::gpu::functional`] on candle's stream, every buffer a candle storage
/// or a fresh allocation on its device.
#[cfg(feature = "candle-cuda")]
mod cuda {
    use super::*;
    use crate::gpu::functional::{
        self, BackwardStats, BatchStats, Epilogue, EpilogueGrad, ForwardStats, GradientsMut,
        RunningStats, RunningUpdate, SavedStats, SavedStatsMut,
    };
    use crate::gpu::{GpuContext, Workspace};
    use candle_core::Storage;

    fn context(device: &CudaDevice) -> Result<GpuContext> {
        GpuContext::from_stream(device.cuda_stream()).map_err(Error::wrap)
    }

    /// The `[C]` f32 view of a CUDA storage, checked.
    fn channels<'s>(
        what: &str,
        storage: &'s CudaStorage,
        layout: &Layout,
        channels: usize,
    ) -> Result<CudaView<'s, f32>> {
        let start = contiguous_start(what, layout)?;
        if layout.dims() != [channels] {
            return Err(Error::wrap(crate::Error::ShapeMismatch {
                what: "weight and bias",
                expected: vec![channels],
                got: layout.dims().to_vec(),
            }));
        }
        Ok(storage
            .as_cuda_slice::<f32>()?
            .slice(start..start + channels))
    }

    /// Calls `f` with the `[C]` f32 view of a CUDA tensor held by the op (running statistics).
    fn with_tensor<R>(
        what: &str,
        tensor: &Tensor,
        c: usize,
        f: impl FnOnce(CudaView<'_, f32>) -> Result<R>,
    ) -> Result<R> {
        let (storage, layout) = tensor.storage_and_layout();
        match &*storage {
            Storage::Cuda(storage) => f(channels(what, storage, layout, c)?),
            _ => Err(Error::Msg(format!("batchnorm-cuda: {what} is not on the CUDA device")).bt()),
        }
    }

    pub(super) fn forward<T: Element + CudaDType>(
        op: &ForwardOp,
        (x, x_layout): (&CudaStorage, &Layout),
        (w, w_layout): (&CudaStorage, &Layout),
        (b, b_layout): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let device = x.device().clone();
        let gpu = context(&device)?;
        let placement = Placement::of(x_layout)?;
        let desc = placement.desc;
        let c = desc.channels();
        let x_view = x.as_cuda_slice::<T>()?.slice(placement.range());
        let (weight, bias) = match op.affine {
            true => (
                Some(channels("weight", w, w_layout, c)?),
                Some(channels("bias", b, b_layout, c)?),
            ),
            false => (None, None),
        };
        let mut y = device.alloc_zeros::<T>(desc.numel())?;
        let mut workspace = Workspace::new();
        let request = |stats, y| functional::Forward {
            desc,
            x: x_view.slice(..),
            weight: weight.as_ref().map(|w| w.slice(..)),
            bias: bias.as_ref().map(|b| b.slice(..)),
            stats,
            y,
            epilogue: Epilogue::None,
        };
        let outputs = match &op.stats {
            Statistics::Batch { running } => {
                let alloc = || device.alloc_zeros::<f32>(c);
                let (mut mean, mut mean_lo, mut invstd) = (alloc()?, alloc()?, alloc()?);
                // The update writes copies: the Vars are set from them after the call.
                let copy = |t: &Tensor, what| {
                    with_tensor(what, t, c, |v| {
                        Ok(gpu.stream().clone_dtod(&v).map_err(Error::wrap)?)
                    })
                };
                let mut new_running = match running {
                    Some(r) => Some((copy(&r.mean, "running_mean")?, copy(&r.var, "running_var")?)),
                    None => None,
                };
                let update = running
                    .as_ref()
                    .zip(new_running.as_mut())
                    .map(|(r, (m, v))| RunningUpdate {
                        mean: m.as_view_mut(),
                        var: v.as_view_mut(),
                        factor: r.factor,
                        var_update: r.var_update,
                    });
                let stats = ForwardStats::Batch(BatchStats {
                    saved: SavedStatsMut {
                        mean: mean.as_view_mut(),
                        mean_lo: mean_lo.as_view_mut(),
                        invstd: invstd.as_view_mut(),
                    },
                    running: update,
                    eps: op.eps,
                });
                functional::forward(&gpu, &mut workspace, request(stats, y.as_view_mut()))
                    .map_err(Error::wrap)?;
                let on_device = |s| Channels::Device(s, device.clone());
                ForwardOutputs {
                    saved: Some(Arc::new(Saved::Device {
                        mean,
                        mean_lo,
                        invstd,
                    })),
                    running: new_running.map(|(m, v)| (on_device(m), on_device(v))),
                }
            }
            Statistics::Running { mean, var } => {
                with_tensor("running_mean", mean, c, |mean| {
                    with_tensor("running_var", var, c, |var| {
                        let stats = ForwardStats::Running {
                            stats: RunningStats { mean, var },
                            eps: op.eps,
                        };
                        functional::forward(&gpu, &mut workspace, request(stats, y.as_view_mut()))
                            .map_err(Error::wrap)
                    })
                })?;
                ForwardOutputs::default()
            }
        };
        *lock(&op.outputs)? = outputs;
        Ok((
            CudaStorage::wrap_cuda_slice(y, device),
            Shape::from(desc.memory_dims()),
        ))
    }

    pub(super) fn backward<T: Element + CudaDType>(
        op: &BackwardOp<'_>,
        (x, x_layout): (&CudaStorage, &Layout),
        (dy, dy_layout): (&CudaStorage, &Layout),
        (w, w_layout): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let forward = op.forward;
        let device = x.device().clone();
        let gpu = context(&device)?;
        let placement = Placement::of(x_layout)?;
        let desc = placement.desc;
        let c = desc.channels();
        let x_view = x.as_cuda_slice::<T>()?.slice(placement.range());
        let dy_start = contiguous_start("dy", dy_layout)?;
        let dy_view = dy
            .as_cuda_slice::<T>()?
            .slice(dy_start..dy_start + desc.numel());
        let weight = match forward.affine {
            true => Some(channels("weight", w, w_layout, c)?),
            false => None,
        };
        let mut dx = device.alloc_zeros::<T>(desc.numel())?;
        let (mut dweight, mut dbias) =
            (device.alloc_zeros::<f32>(c)?, device.alloc_zeros::<f32>(c)?);
        let mut workspace = Workspace::new();
        let request = |stats| functional::Backward {
            desc,
            x: x_view.slice(..),
            dy: dy_view.slice(..),
            weight: weight.as_ref().map(|w| w.slice(..)),
            stats,
            grads: GradientsMut {
                dx: Some(dx.as_view_mut()),
                dweight: forward.affine.then(|| dweight.as_view_mut()),
                dbias: forward.affine.then(|| dbias.as_view_mut()),
                accumulate: false,
            },
            epilogue: EpilogueGrad::None,
        };
        match (&forward.stats, op.saved.as_deref()) {
            (
                Statistics::Batch { .. },
                Some(Saved::Device {
                    mean,
                    mean_lo,
                    invstd,
                }),
            ) => {
                let stats = BackwardStats::Batch(SavedStats {
                    mean: mean.as_view(),
                    mean_lo: Some(mean_lo.as_view()),
                    invstd: invstd.as_view(),
                });
                functional::backward(&gpu, &mut workspace, request(stats)).map_err(Error::wrap)?
            }
            (Statistics::Running { mean, var }, _) => {
                with_tensor("running_mean", mean, c, |mean| {
                    with_tensor("running_var", var, c, |var| {
                        let stats = BackwardStats::Running {
                            stats: RunningStats { mean, var },
                            eps: forward.eps,
                        };
                        functional::backward(&gpu, &mut workspace, request(stats))
                            .map_err(Error::wrap)
                    })
                })?
            }
            _ => return Err(no_saved_statistics()),
        }
        if forward.affine {
            let on_device = |s| Channels::Device(s, device.clone());
            *lock(&op.param_grads)? = Some((on_device(dweight), on_device(dbias)));
        }
        Ok((
            CudaStorage::wrap_cuda_slice(dx, device),
            Shape::from(desc.memory_dims()),
        ))
    }
}
