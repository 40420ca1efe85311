//! The candle custom ops: the batch-norm forward, a `CustomOp3` of `(x, params, z)` whose `bwd`
//! runs the backward op of `(x, dy, params)`, each on CPU storage through
//! [`crate::reference::fused`] and, with the feature `candle-cuda`, on CUDA storage through
//! [`crate::gpu::functional`] on candle's stream. `params` is `[weight, bias]` stacked to
//! `[2, C]` f32 (candle's `stack` carries their gradients back to both), and `z` the shortcut
//! of `relu(BN(x) + z)`; a call without them passes `x` in their place, which the op does not
//! read and gives no gradient.
//!
//! A custom op has one output. What else a call computes (the saved batch statistics and ReLU
//! mask, the new running statistics, the gradients of the parameters and of `z`) the op keeps
//! as [`Emitted`] values for its caller: candle gives no way to write into a `Var`'s storage
//! from an op, so the module `Var::set`s the running statistics it gets back.

use super::layout::{contiguous_start, to_logical, Placement};
use crate::config::RunningVarUpdate;
use crate::dtype::Element;
use crate::epilogue::{mask_words, EpilogueKind};
use crate::reference::{self, fused};
use crate::shape::TensorDesc;
use crate::stats::SavedStats;
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType, Error, Layout, Result, Shape, Tensor, Var, WithDType,
};
use std::sync::{Arc, Mutex, MutexGuard};

#[cfg(feature = "candle-cuda")]
use crate::cudarc::driver::{CudaSlice, CudaView};
#[cfg(feature = "candle-cuda")]
use candle_core::{cuda_backend::CudaDType, CudaDevice, CudaStorage};

/// Calls `$f::<T>(args)` with `T` the element type of `$dtype`, or fails for another dtype.
macro_rules! by_element {
    ($dtype:expr, $($f:ident)::+, ($($arg:expr),* $(,)?)) => {
        match $dtype {
            DType::F32 => $($f)::+::<f32>($($arg),*),
            DType::F16 => $($f)::+::<half::f16>($($arg),*),
            DType::BF16 => $($f)::+::<half::bf16>($($arg),*),
            other => Err(Error::Msg(format!(
                "batchnorm-cuda: activations must be f32, f16 or bf16, got {other:?}"
            ))
            .bt()),
        }
    };
}
pub(super) use by_element;

/// Storage an op computed besides its output, on the device of its inputs.
pub(super) enum Stored {
    Host(CpuStorage),
    #[cfg(feature = "candle-cuda")]
    Device(CudaStorage),
}

/// A value an op computed besides its output, made a tensor by [`Emitted::into_tensor`].
pub(crate) struct Emitted {
    storage: Stored,
    shape: Shape,
}

impl Emitted {
    pub(super) fn host<T: WithDType>(values: Vec<T>, shape: impl Into<Shape>) -> Self {
        Self {
            storage: Stored::Host(T::to_cpu_storage_owned(values)),
            shape: shape.into(),
        }
    }

    #[cfg(feature = "candle-cuda")]
    pub(super) fn device<T: CudaDType>(
        slice: CudaSlice<T>,
        device: &CudaDevice,
        shape: impl Into<Shape>,
    ) -> Self {
        Self {
            storage: Stored::Device(CudaStorage::wrap_cuda_slice(slice, device.clone())),
            shape: shape.into(),
        }
    }

    /// As a tensor on `like`'s device (a custom op is the one way to make a tensor of a storage
    /// outside candle-core).
    pub(crate) fn into_tensor(self, like: &Tensor) -> Result<Tensor> {
        like.apply_op1_no_bwd(&Emit(Mutex::new(Some(self))))
    }
}

/// Hands an [`Emitted`] value to candle; its input only picks the device.
struct Emit(Mutex<Option<Emitted>>);

impl Emit {
    fn take(&self) -> Result<Emitted> {
        lock(&self.0)?
            .take()
            .ok_or_else(|| Error::Msg("batchnorm-cuda: a value emitted twice".into()).bt())
    }
}

#[cfg(feature = "candle-cuda")]
fn on_other_device() -> Error {
    Error::Msg("batchnorm-cuda: an op's values asked for on another device".into()).bt()
}

impl CustomOp1 for Emit {
    fn name(&self) -> &'static str {
        "batchnorm-cuda-emit"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        match self.take()? {
            Emitted {
                storage: Stored::Host(storage),
                shape,
            } => Ok((storage, shape)),
            #[cfg(feature = "candle-cuda")]
            _ => Err(on_other_device()),
        }
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        match self.take()? {
            Emitted {
                storage: Stored::Device(storage),
                shape,
            } => Ok((storage, shape)),
            _ => Err(on_other_device()),
        }
    }
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
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

/// What a forward saved for its backward: the batch statistics (none with running statistics)
/// and the ReLU mask of a fused epilogue.
#[derive(Default)]
pub(crate) enum Saved {
    #[default]
    Nothing,
    Host {
        stats: Option<SavedStats>,
        mask: Vec<u32>,
    },
    #[cfg(feature = "candle-cuda")]
    Device {
        stats: Option<[CudaSlice<f32>; 3]>,
        mask: Option<CudaSlice<u32>>,
    },
}

/// What a forward computed besides `y`: what it `S`aved for its backward, and the new running
/// statistics.
pub(crate) struct ForwardOutputs<S = Saved> {
    /// For the backward.
    pub(super) saved: Arc<S>,
    /// The new running mean and variance, when the forward updated them.
    pub(super) running: Option<(Emitted, Emitted)>,
}

impl<S: Default> Default for ForwardOutputs<S> {
    fn default() -> Self {
        Self {
            saved: Arc::default(),
            running: None,
        }
    }
}

/// Sets `mean` and `var` to the running statistics a training forward computed, if it did;
/// returns whether it did.
pub(crate) fn commit_running<S>(
    outputs: &Mutex<ForwardOutputs<S>>,
    like: &Tensor,
    mean: &Var,
    var: &Var,
) -> Result<bool> {
    let Some((new_mean, new_var)) = lock(outputs)?.running.take() else {
        return Ok(false);
    };
    let (new_mean, new_var) = (new_mean.into_tensor(like)?, new_var.into_tensor(like)?);
    mean.set(&new_mean)?;
    var.set(&new_var)?;
    Ok(true)
}

/// The batch-norm forward as a candle op of `(x, params, z)`; the output is `y` in the memory
/// order of `x` ([`to_logical`] makes it `(N, C, ...)`).
pub(crate) struct ForwardOp {
    pub eps: f32,
    pub affine: bool,
    /// `None`: `y = BN(x)`; else `relu(BN(x))` or `relu(BN(x) + z)`.
    pub epilogue: Option<EpilogueKind>,
    pub stats: Statistics,
    /// Shared with the caller, which takes the running statistics after the call.
    pub outputs: Arc<Mutex<ForwardOutputs>>,
}

/// The gradients a backward computes besides `dx`.
#[derive(Default)]
struct BackwardOutputs {
    /// `[2, C]`: `dweight` and `dbias`, when affine.
    dparams: Option<Emitted>,
    /// The shortcut's gradient, for `relu(BN(x) + z)`.
    dz: Option<Emitted>,
}

/// The backward op of `(x, dy, params)`, `dy` contiguous in the memory order of `x`; the output
/// is `dx` in that memory order.
struct BackwardOp<'a> {
    forward: &'a ForwardOp,
    saved: Arc<Saved>,
    outputs: Mutex<BackwardOutputs>,
}

/// The checked `(weight, bias)` of a `[2, C]` params storage, starting at `start`.
fn check_params(layout: &Layout, channels: usize) -> Result<usize> {
    let start = contiguous_start("the parameters", layout)?;
    if layout.dims() != [2, channels] {
        return Err(Error::wrap(crate::Error::ShapeMismatch {
            what: "weight and bias",
            expected: vec![2, channels],
            got: layout.dims().to_vec(),
        }));
    }
    Ok(start)
}

/// The placement of `z`, which must have the shape and layout of `x`.
fn check_shortcut(x: &TensorDesc, z: &Layout) -> Result<Placement> {
    let placement = Placement::of(z)?;
    let desc = placement.desc;
    if desc.dims() != x.dims() {
        return Err(Error::wrap(crate::Error::ShapeMismatch {
            what: "z",
            expected: x.dims().to_vec(),
            got: desc.dims().to_vec(),
        }));
    }
    if desc.layout() != x.layout() {
        return Err(Error::wrap(crate::Error::LayoutMismatch {
            what: "z",
            expected: x.layout(),
            got: desc.layout(),
        }));
    }
    Ok(placement)
}

/// `[weight..., bias...]` of a CPU params storage as `(weight, bias)`.
fn cpu_params<'s>(
    storage: &'s CpuStorage,
    layout: &Layout,
    c: usize,
) -> Result<(&'s [f32], &'s [f32])> {
    let start = check_params(layout, c)?;
    let values = storage.as_slice::<f32>().map_err(|_| {
        Error::Msg(format!(
            "batchnorm-cuda: weight and bias must be f32, got {:?}",
            storage.dtype()
        ))
        .bt()
    })?;
    Ok(values[start..start + 2 * c].split_at(c))
}

fn forward_cpu<T: Element + WithDType>(
    op: &ForwardOp,
    (x, x_layout): (&CpuStorage, &Layout),
    (params, params_layout): (&CpuStorage, &Layout),
    (z, z_layout): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let placement = Placement::of(x_layout)?;
    let desc = placement.desc;
    let x = &x.as_slice::<T>()?[placement.range()];
    let (weight, bias) = match op.affine {
        true => {
            cpu_params(params, params_layout, desc.channels()).map(|(w, b)| (Some(w), Some(b)))?
        }
        false => (None, None),
    };
    let z = match op.epilogue {
        Some(EpilogueKind::AddRelu) => {
            Some(&z.as_slice::<T>()?[check_shortcut(&desc, z_layout)?.range()])
        }
        _ => None,
    };
    let mut y = vec![T::default(); x.len()];
    let mut mask = vec![
        0u32;
        if op.epilogue.is_some() {
            mask_words(&desc)
        } else {
            0
        }
    ];
    let request = fused::Forward {
        desc,
        x,
        weight,
        bias,
        y: &mut y,
        epilogue: match op.epilogue {
            None => reference::Epilogue::None,
            Some(_) => reference::Epilogue::relu(z, Some(&mut mask)),
        },
    };
    let (stats, running) = match &op.stats {
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
            let saved = fused::forward_training(request, update, op.eps).map_err(Error::wrap)?;
            let c = desc.channels();
            let running = new_running.map(|(m, v)| (Emitted::host(m, c), Emitted::host(v, c)));
            (Some(saved), running)
        }
        Statistics::Running { mean, var } => {
            let (mean, var) = (mean.to_vec1::<f32>()?, var.to_vec1::<f32>()?);
            let running = reference::RunningStats {
                mean: &mean,
                var: &var,
            };
            fused::forward_inference(request, running, op.eps).map_err(Error::wrap)?;
            (None, None)
        }
    };
    *lock(&op.outputs)? = ForwardOutputs {
        saved: Arc::new(Saved::Host { stats, mask }),
        running,
    };
    Ok((T::to_cpu_storage_owned(y), Shape::from(desc.memory_dims())))
}

fn backward_cpu<T: Element + WithDType>(
    op: &BackwardOp<'_>,
    (x, x_layout): (&CpuStorage, &Layout),
    (dy, dy_layout): (&CpuStorage, &Layout),
    (params, params_layout): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let forward = op.forward;
    let Saved::Host { stats, mask } = &*op.saved else {
        return Err(no_saved_statistics());
    };
    let placement = Placement::of(x_layout)?;
    let desc = placement.desc;
    let (c, n) = (desc.channels(), desc.numel());
    let x = &x.as_slice::<T>()?[placement.range()];
    let dy_start = contiguous_start("dy", dy_layout)?;
    let dy = &dy.as_slice::<T>()?[dy_start..dy_start + n];
    let weight = match forward.affine {
        true => Some(cpu_params(params, params_layout, c)?.0),
        false => None,
    };
    let mut dx = vec![T::default(); n];
    let mut dparams = vec![0.0f32; 2 * c];
    let (dweight, dbias) = dparams.split_at_mut(c);
    let mut dz = vec![
        T::default();
        if forward.epilogue == Some(EpilogueKind::AddRelu) {
            n
        } else {
            0
        }
    ];
    let request = fused::Backward {
        desc,
        x,
        dy,
        weight,
        grads: reference::Gradients {
            dx: Some(&mut dx),
            dweight: forward.affine.then_some(dweight),
            dbias: forward.affine.then_some(dbias),
            accumulate: false,
        },
        epilogue: match forward.epilogue {
            None => reference::EpilogueGrad::None,
            Some(EpilogueKind::Relu) => reference::EpilogueGrad::Relu { mask },
            Some(EpilogueKind::AddRelu) => reference::EpilogueGrad::AddRelu {
                mask,
                dz: Some(&mut dz),
            },
        },
    };
    match (&forward.stats, stats) {
        (Statistics::Batch { .. }, Some(saved)) => fused::backward_training(request, saved),
        (Statistics::Running { mean, var }, _) => {
            let (mean, var) = (mean.to_vec1::<f32>()?, var.to_vec1::<f32>()?);
            let running = reference::RunningStats {
                mean: &mean,
                var: &var,
            };
            fused::backward_inference(request, running, forward.eps)
        }
        _ => return Err(no_saved_statistics()),
    }
    .map_err(Error::wrap)?;
    *lock(&op.outputs)? = BackwardOutputs {
        dparams: forward.affine.then(|| Emitted::host(dparams, (2, c))),
        dz: (forward.epilogue == Some(EpilogueKind::AddRelu))
            .then(|| Emitted::host(dz, desc.memory_dims())),
    };
    Ok((T::to_cpu_storage_owned(dx), Shape::from(desc.memory_dims())))
}

pub(super) fn no_saved_statistics() -> Error {
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
        params: &CpuStorage,
        params_layout: &Layout,
        z: &CpuStorage,
        z_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let args = ((x, x_layout), (params, params_layout), (z, z_layout));
        by_element!(x.dtype(), forward_cpu, (self, args.0, args.1, args.2))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        params: &CudaStorage,
        params_layout: &Layout,
        z: &CudaStorage,
        z_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let args = ((x, x_layout), (params, params_layout), (z, z_layout));
        by_element!(x.dtype(), cuda::forward, (self, args.0, args.1, args.2))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        z: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let desc = Placement::of(x.layout())?.desc;
        let backward = BackwardOp {
            forward: self,
            saved: lock(&self.outputs)?.saved.clone(),
            outputs: Mutex::new(BackwardOutputs::default()),
        };
        // The gradient of the op's memory-order output, laid out as that output.
        let dy = dy.contiguous()?;
        let dx = x.apply_op3_no_bwd(&dy, params, &backward)?;
        let outputs = std::mem::take(&mut *lock(&backward.outputs)?);
        let dparams = outputs.dparams.map(|d| d.into_tensor(params)).transpose()?;
        let dz = match outputs.dz {
            Some(dz) => Some(to_logical(dz.into_tensor(z)?, &desc)?),
            None => None,
        };
        Ok((Some(to_logical(dx, &desc)?), dparams, dz))
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
        params: &CpuStorage,
        params_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let args = ((x, x_layout), (dy, dy_layout), (params, params_layout));
        by_element!(x.dtype(), backward_cpu, (self, args.0, args.1, args.2))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        dy: &CudaStorage,
        dy_layout: &Layout,
        params: &CudaStorage,
        params_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let args = ((x, x_layout), (dy, dy_layout), (params, params_layout));
        by_element!(x.dtype(), cuda::backward, (self, args.0, args.1, args.2))
    }
}

/// The CUDA path: [`crate::gpu::functional`] on candle's stream, every buffer a candle storage
/// or a fresh allocation on its device, with the context and workspaces of [`stream_state`].
#[cfg(feature = "candle-cuda")]
pub(super) mod cuda {
    use super::*;
    use crate::gpu::functional::{
        self, BackwardStats, BatchStats, Epilogue, EpilogueGrad, ForwardStats, GradientsMut,
        RunningStats, RunningUpdate, SavedStats, SavedStatsMut,
    };
    use crate::gpu::norms::{NormWorkspace, Norms};
    use crate::gpu::{GpuContext, Workspace};
    use candle_core::Storage;
    use std::collections::HashMap;
    use std::sync::{OnceLock, PoisonError};

    /// What the ops keep per candle stream between calls: the context (the kernels loaded once)
    /// and the workspaces, which serve one stream each (`Error::WorkspaceOnAnotherStream`).
    pub(in crate::candle) struct StreamState {
        pub gpu: GpuContext,
        pub workspace: Workspace,
        norms: Option<(Norms, NormWorkspace)>,
    }

    impl StreamState {
        /// The normalization kernels (loaded on first use) and their workspace.
        pub fn norms(&mut self) -> Result<(&Norms, &mut NormWorkspace)> {
            let (norms, workspace) = match &mut self.norms {
                Some(loaded) => loaded,
                slot => slot.insert((
                    Norms::new(&self.gpu).map_err(Error::wrap)?,
                    NormWorkspace::new(),
                )),
            };
            Ok((&*norms, workspace))
        }
    }

    /// The state of `device`'s stream, made on its first call. Keyed by the CUDA context and
    /// stream handles; the state holds the stream, so a handle is never reused for another
    /// while its entry lives (the entries live as long as the program, one per stream used).
    /// Calls on one stream take turns on its state, as the stream would run them in turn anyway.
    pub(in crate::candle) fn stream_state(device: &CudaDevice) -> Result<Arc<Mutex<StreamState>>> {
        type States = Mutex<HashMap<(usize, usize), Arc<Mutex<StreamState>>>>;
        static STATES: OnceLock<States> = OnceLock::new();
        let stream = device.cuda_stream();
        let key = (
            stream.context().cu_ctx() as usize,
            stream.cu_stream() as usize,
        );
        // A panic in another call leaves the map whole: recover it rather than fail forever.
        let mut states = STATES
            .get_or_init(States::default)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(state) = states.get(&key) {
            return Ok(state.clone());
        }
        let state = Arc::new(Mutex::new(StreamState {
            gpu: GpuContext::from_stream(stream).map_err(Error::wrap)?,
            workspace: Workspace::new(),
            norms: None,
        }));
        states.insert(key, state.clone());
        Ok(state)
    }

    /// Runs `f` on the state of `device`'s stream.
    pub(in crate::candle) fn with_stream<R>(
        device: &CudaDevice,
        f: impl FnOnce(&mut StreamState) -> Result<R>,
    ) -> Result<R> {
        let state = stream_state(device)?;
        // A workspace a panicking call held is still valid memory of this stream.
        let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut state)
    }

    /// `(weight, bias)` views of a `[2, C]` params storage.
    fn params<'s>(
        storage: &'s CudaStorage,
        layout: &Layout,
        c: usize,
    ) -> Result<(CudaView<'s, f32>, CudaView<'s, f32>)> {
        let start = check_params(layout, c)?;
        let slice = storage.as_cuda_slice::<f32>()?;
        Ok((
            slice.slice(start..start + c),
            slice.slice(start + c..start + 2 * c),
        ))
    }

    /// The f32 view of a contiguous CUDA tensor's storage (the running statistics the op holds,
    /// read through `Tensor::storage_and_layout`).
    pub(in crate::candle) fn cuda_channels<'s>(
        what: &str,
        storage: &'s Storage,
        layout: &Layout,
    ) -> Result<CudaView<'s, f32>> {
        let start = contiguous_start(what, layout)?;
        match storage {
            Storage::Cuda(storage) => {
                let len = layout.shape().elem_count();
                Ok(storage.as_cuda_slice::<f32>()?.slice(start..start + len))
            }
            _ => Err(Error::Msg(format!("batchnorm-cuda: {what} is not on the CUDA device")).bt()),
        }
    }

    pub(super) fn forward<T: Element + CudaDType>(
        op: &ForwardOp,
        (x, x_layout): (&CudaStorage, &Layout),
        (p, p_layout): (&CudaStorage, &Layout),
        (z, z_layout): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let device = x.device().clone();
        with_stream(&device, |state| {
            forward_on::<T>(op, state, (x, x_layout), (p, p_layout), (z, z_layout))
        })
    }

    fn forward_on<T: Element + CudaDType>(
        op: &ForwardOp,
        StreamState { gpu, workspace, .. }: &mut StreamState,
        (x, x_layout): (&CudaStorage, &Layout),
        (p, p_layout): (&CudaStorage, &Layout),
        (z, z_layout): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let gpu: &GpuContext = gpu;
        let device = x.device().clone();
        let placement = Placement::of(x_layout)?;
        let desc = placement.desc;
        let c = desc.channels();
        let x_view = x.as_cuda_slice::<T>()?.slice(placement.range());
        let (weight, bias) = match op.affine {
            true => params(p, p_layout, c).map(|(w, b)| (Some(w), Some(b)))?,
            false => (None, None),
        };
        let z_view = match op.epilogue {
            Some(EpilogueKind::AddRelu) => Some(
                z.as_cuda_slice::<T>()?
                    .slice(check_shortcut(&desc, z_layout)?.range()),
            ),
            _ => None,
        };
        let mut y = device.alloc_zeros::<T>(desc.numel())?;
        let mut mask = match op.epilogue {
            Some(_) => Some(device.alloc_zeros::<u32>(mask_words(&desc))?),
            None => None,
        };
        let mut call = |stats, y: &mut CudaSlice<T>, mask: Option<&mut CudaSlice<u32>>| {
            let epilogue = match (op.epilogue, mask) {
                (Some(_), mask) => Epilogue::relu(
                    z_view.as_ref().map(|z| z.slice(..)),
                    mask.map(|m| m.as_view_mut()),
                ),
                (None, _) => Epilogue::None,
            };
            let request = functional::Forward {
                desc,
                x: x_view.slice(..),
                weight: weight.as_ref().map(|w| w.slice(..)),
                bias: bias.as_ref().map(|b| b.slice(..)),
                stats,
                y: y.as_view_mut(),
                epilogue,
            };
            functional::forward(gpu, workspace, request).map_err(Error::wrap)
        };
        let (stats, running) = match &op.stats {
            Statistics::Batch { running } => {
                let alloc = || device.alloc_zeros::<f32>(c);
                let mut saved = [alloc()?, alloc()?, alloc()?];
                // The update writes copies: the Vars are set from them after the call.
                let copy = |t: &Tensor, what| -> Result<CudaSlice<f32>> {
                    let (storage, layout) = t.storage_and_layout();
                    let view = cuda_channels(what, &storage, layout)?;
                    gpu.stream().clone_dtod(&view).map_err(Error::wrap)
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
                let [mean, mean_lo, invstd] = &mut saved;
                let stats = ForwardStats::Batch(BatchStats {
                    saved: SavedStatsMut {
                        mean: mean.as_view_mut(),
                        mean_lo: mean_lo.as_view_mut(),
                        invstd: invstd.as_view_mut(),
                    },
                    running: update,
                    eps: op.eps,
                });
                call(stats, &mut y, mask.as_mut())?;
                let running = new_running.map(|(m, v)| {
                    (
                        Emitted::device(m, &device, c),
                        Emitted::device(v, &device, c),
                    )
                });
                (Some(saved), running)
            }
            Statistics::Running { mean, var } => {
                let (mean_storage, mean_layout) = mean.storage_and_layout();
                let (var_storage, var_layout) = var.storage_and_layout();
                let stats = ForwardStats::Running {
                    stats: RunningStats {
                        mean: cuda_channels("running_mean", &mean_storage, mean_layout)?,
                        var: cuda_channels("running_var", &var_storage, var_layout)?,
                    },
                    eps: op.eps,
                };
                call(stats, &mut y, mask.as_mut())?;
                (None, None)
            }
        };
        *lock(&op.outputs)? = ForwardOutputs {
            saved: Arc::new(Saved::Device { stats, mask }),
            running,
        };
        Ok((
            CudaStorage::wrap_cuda_slice(y, device),
            Shape::from(desc.memory_dims()),
        ))
    }

    pub(super) fn backward<T: Element + CudaDType>(
        op: &BackwardOp<'_>,
        (x, x_layout): (&CudaStorage, &Layout),
        (dy, dy_layout): (&CudaStorage, &Layout),
        (p, p_layout): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let device = x.device().clone();
        with_stream(&device, |state| {
            backward_on::<T>(op, state, (x, x_layout), (dy, dy_layout), (p, p_layout))
        })
    }

    fn backward_on<T: Element + CudaDType>(
        op: &BackwardOp<'_>,
        StreamState { gpu, workspace, .. }: &mut StreamState,
        (x, x_layout): (&CudaStorage, &Layout),
        (dy, dy_layout): (&CudaStorage, &Layout),
        (p, p_layout): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let gpu: &GpuContext = gpu;
        let forward = op.forward;
        let Saved::Device { stats, mask } = &*op.saved else {
            return Err(no_saved_statistics());
        };
        let device = x.device().clone();
        let placement = Placement::of(x_layout)?;
        let desc = placement.desc;
        let (c, n) = (desc.channels(), desc.numel());
        let x_view = x.as_cuda_slice::<T>()?.slice(placement.range());
        let dy_start = contiguous_start("dy", dy_layout)?;
        let dy_view = dy.as_cuda_slice::<T>()?.slice(dy_start..dy_start + n);
        let weight = match forward.affine {
            true => Some(params(p, p_layout, c)?.0),
            false => None,
        };
        let residual = forward.epilogue == Some(EpilogueKind::AddRelu);
        let mut dx = device.alloc_zeros::<T>(n)?;
        let mut dparams = device.alloc_zeros::<f32>(2 * c)?;
        let mut dz = match residual {
            true => Some(device.alloc_zeros::<T>(n)?),
            false => None,
        };
        let mut call = |stats| {
            let (dweight, dbias) = dparams.split_at_mut(c);
            let epilogue = match (forward.epilogue, mask) {
                (None, _) => EpilogueGrad::None,
                (Some(EpilogueKind::Relu), Some(mask)) => EpilogueGrad::Relu {
                    mask: mask.as_view(),
                },
                (Some(EpilogueKind::AddRelu), Some(mask)) => EpilogueGrad::AddRelu {
                    mask: mask.as_view(),
                    dz: dz.as_mut().map(|dz| dz.as_view_mut()),
                },
                (Some(_), None) => return Err(no_saved_statistics()),
            };
            let request = functional::Backward {
                desc,
                x: x_view.slice(..),
                dy: dy_view.slice(..),
                weight: weight.as_ref().map(|w| w.slice(..)),
                stats,
                grads: GradientsMut {
                    dx: Some(dx.as_view_mut()),
                    dweight: forward.affine.then_some(dweight),
                    dbias: forward.affine.then_some(dbias),
                    accumulate: false,
                },
                epilogue,
            };
            functional::backward(gpu, workspace, request).map_err(Error::wrap)
        };
        match (&forward.stats, stats) {
            (Statistics::Batch { .. }, Some([mean, mean_lo, invstd])) => {
                call(BackwardStats::Batch(SavedStats {
                    mean: mean.as_view(),
                    mean_lo: Some(mean_lo.as_view()),
                    invstd: invstd.as_view(),
                }))?
            }
            (Statistics::Running { mean, var }, _) => {
                let (mean_storage, mean_layout) = mean.storage_and_layout();
                let (var_storage, var_layout) = var.storage_and_layout();
                call(BackwardStats::Running {
                    stats: RunningStats {
                        mean: cuda_channels("running_mean", &mean_storage, mean_layout)?,
                        var: cuda_channels("running_var", &var_storage, var_layout)?,
                    },
                    eps: forward.eps,
                })?
            }
            _ => return Err(no_saved_statistics()),
        }
        *lock(&op.outputs)? = BackwardOutputs {
            dparams: forward
                .affine
                .then(|| Emitted::device(dparams, &device, (2, c))),
            dz: dz.map(|dz| Emitted::device(dz, &device, desc.memory_dims())),
        };
        Ok((
            CudaStorage::wrap_cuda_slice(dx, device),
            Shape::from(desc.memory_dims()),
        ))
    }
}
