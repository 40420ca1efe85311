//! Stateless batch-norm calls over borrowed device memory, like cuDNN: a [`TensorDesc`] says the
//! shape and layout, the caller owns every buffer, work is queued on the [`GpuContext`]'s stream
//! and nothing synchronizes the host. Each function validates everything before it launches,
//! so an error leaves every buffer untouched.
//!
//! Activations are `T` ([`Element`]: f32, f16, bf16) in the layout of the descriptor; parameters,
//! statistics and gradients of parameters are f32, each `[C]`.

use super::context::GpuContext;
use super::fused::{ReluEpilogue, ReluGrad};
use super::kernels::{Family, IndexWidth};
use super::launch::{self, Launch, Traversal};
use super::params::{
    BackwardElementwiseParams, BackwardElementwiseReluParams, BackwardReduceParams,
    BackwardReduceReluParams, FoldParams, NormalizeParams, NormalizeReluParams, StatsParams,
};
use super::workspace::Workspace;
use crate::config::{validate_eps, validate_momentum, RunningVarUpdate};
use crate::dtype::Element;
use crate::epilogue::{self, Epilogue};
use crate::error::Result;
use crate::fold::FoldSpec;
use crate::shape::TensorDesc;
use crate::validate::{self, Buffers};
use cudarc::driver::{
    CudaFunction, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr,
    PushKernelArg, SyncOnDrop,
};

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

/// A [`RunningUpdate`] as the statistics kernels take it: the buffers (absent: no update), the
/// factor and whether `running_var` takes the unbiased variance.
pub(crate) struct RunningParts<'a> {
    pub mean: Option<CudaViewMut<'a, f32>>,
    pub var: Option<CudaViewMut<'a, f32>>,
    pub factor: f32,
    pub unbiased: i32,
}

impl<'a> RunningParts<'a> {
    pub(crate) fn of(running: Option<RunningUpdate<'a>>) -> Self {
        match running {
            Some(r) => Self {
                unbiased: (r.var_update == RunningVarUpdate::Unbiased) as i32,
                factor: r.factor,
                mean: Some(r.mean),
                var: Some(r.var),
            },
            None => Self {
                mean: None,
                var: None,
                factor: 0.0,
                unbiased: 0,
            },
        }
    }
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

/// Training forward: batch statistics (a split Welford reduction whose last block per channel
/// also writes `saved` and updates `running`), then `y = (x - mean) * (weight * invstd) + bias`.
/// Two launches.
///
/// - `x`, `y`: `desc.numel()` elements of `T` in `desc`'s memory order; `y` is overwritten.
/// - `weight`, `bias`: `C` values each, or `None` for 1 and 0.
/// - `saved`: receives the batch mean and `1 / sqrt(biased_var + eps)` for the backward.
///
/// An empty batch (`N * spatial == 0`) writes nothing and leaves the statistics as they are.
/// Errors, checked before anything is queued (as [`crate::reference::forward_training`] does):
/// [`Error::BufferLength`](crate::Error::BufferLength), [`Error::InvalidEps`](crate::Error::InvalidEps), [`Error::InvalidMomentum`](crate::Error::InvalidMomentum),
/// [`Error::SingleValuePerChannel`](crate::Error::SingleValuePerChannel).
#[allow(clippy::too_many_arguments)]
pub fn forward_training<T: Element>(
    gpu: &GpuContext,
    workspace: &mut Workspace,
    x: &CudaView<'_, T>,
    desc: &TensorDesc,
    weight: Option<&CudaView<'_, f32>>,
    bias: Option<&CudaView<'_, f32>>,
    running: Option<RunningUpdate<'_>>,
    eps: f32,
    y: &mut CudaViewMut<'_, T>,
    saved: SavedStatsMut<'_>,
) -> Result<()> {
    forward_training_with(
        gpu, workspace, x, desc, weight, bias, running, eps, y, saved, None,
    )
}

/// [`forward_training`], with the fused ReLU epilogue of [`super::fused::forward_training`]
/// when `epilogue` is given (its buffers checked right after the plain ones).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_training_with<T: Element>(
    gpu: &GpuContext,
    workspace: &mut Workspace,
    x: &CudaView<'_, T>,
    desc: &TensorDesc,
    weight: Option<&CudaView<'_, f32>>,
    bias: Option<&CudaView<'_, f32>>,
    running: Option<RunningUpdate<'_>>,
    eps: f32,
    y: &mut CudaViewMut<'_, T>,
    saved: SavedStatsMut<'_>,
    mut epilogue: Option<ReluEpilogue<'_, T>>,
) -> Result<()> {
    Buffers {
        x: x.len(),
        y: Some(y.len()),
        weight: weight.map(|w| w.len()),
        bias: bias.map(|b| b.len()),
        running_mean: running.as_ref().map(|r| r.mean.len()),
        running_var: running.as_ref().map(|r| r.var.len()),
        save_mean: Some(saved.mean.len()),
        save_mean_lo: Some(saved.mean_lo.len()),
        save_invstd: Some(saved.invstd.len()),
        ..Default::default()
    }
    .check(desc)?;
    check_epilogue(desc, epilogue.as_ref())?;
    validate_eps(eps)?;
    if let Some(r) = &running {
        validate_momentum(r.factor)?;
    }
    validate::batch_statistics(desc)?;
    if desc.numel() == 0 {
        return Ok(());
    }

    let c = desc.channels();
    let g = desc.geometry();
    let stream = gpu.stream();
    let reduce = launch::reduction(&g, T::DTYPE, gpu.sm_count());
    let scratch = workspace.reserve(gpu, 3 * c * reduce.splits as usize, c)?;
    let mut running = RunningParts::of(running);
    let SavedStatsMut {
        mut mean,
        mut mean_lo,
        mut invstd,
    } = saved;
    let mut guards = Guards::new(stream);
    let stats = StatsParams {
        x: guards.read(x),
        partials: guards.write(scratch.partials),
        semaphores: guards.write(scratch.semaphores),
        save_mean: guards.write(&mut mean),
        save_mean_lo: guards.write(&mut mean_lo),
        save_invstd: guards.write(&mut invstd),
        running_mean: guards.write_opt(running.mean.as_mut()),
        running_var: guards.write_opt(running.var.as_mut()),
        g: g.into(),
        eps,
        factor: running.factor,
        unbiased: running.unbiased,
        splits: reduce.splits as i32,
    };
    let family = pick(&g, Family::StatsPlanar, Family::StatsRows);
    launch(
        stream,
        gpu.kernels().get(family, T::DTYPE, index_width(desc)),
        reduce,
        &stats,
    )?;

    let normalize = NormalizeParams {
        x: stats.x,
        y: guards.write(y),
        mean: stats.save_mean,
        mean_lo: stats.save_mean_lo,
        var_or_invstd: stats.save_invstd,
        weight: guards.read_opt(weight),
        bias: guards.read_opt(bias),
        g: g.into(),
        eps,
        stat_is_var: 0,
    };
    let relu = epilogue_pointers(&mut guards, epilogue.as_mut());
    launch_normalize::<T>(gpu, desc, normalize, relu)
}

/// Eval forward with the running statistics, one launch:
/// `y = (x - running_mean) * (weight / sqrt(running_var + eps)) + bias`.
///
/// Shapes as in [`forward_training`]. Errors: [`Error::BufferLength`](crate::Error::BufferLength), [`Error::InvalidEps`](crate::Error::InvalidEps).
#[allow(clippy::too_many_arguments)]
pub fn forward_inference<T: Element>(
    gpu: &GpuContext,
    x: &CudaView<'_, T>,
    desc: &TensorDesc,
    weight: Option<&CudaView<'_, f32>>,
    bias: Option<&CudaView<'_, f32>>,
    running: &RunningStats<'_>,
    eps: f32,
    y: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    forward_inference_with(gpu, x, desc, weight, bias, running, eps, y, None)
}

/// [`forward_inference`], with the fused ReLU epilogue of [`super::fused::forward_inference`]
/// when `epilogue` is given.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_inference_with<T: Element>(
    gpu: &GpuContext,
    x: &CudaView<'_, T>,
    desc: &TensorDesc,
    weight: Option<&CudaView<'_, f32>>,
    bias: Option<&CudaView<'_, f32>>,
    running: &RunningStats<'_>,
    eps: f32,
    y: &mut CudaViewMut<'_, T>,
    mut epilogue: Option<ReluEpilogue<'_, T>>,
) -> Result<()> {
    Buffers {
        x: x.len(),
        y: Some(y.len()),
        weight: weight.map(|w| w.len()),
        bias: bias.map(|b| b.len()),
        running_mean: Some(running.mean.len()),
        running_var: Some(running.var.len()),
        ..Default::default()
    }
    .check(desc)?;
    check_epilogue(desc, epilogue.as_ref())?;
    validate_eps(eps)?;
    if desc.numel() == 0 {
        return Ok(());
    }
    let mut guards = Guards::new(gpu.stream());
    let params = NormalizeParams {
        x: guards.read(x),
        y: guards.write(y),
        mean: guards.read(&running.mean),
        mean_lo: 0,
        var_or_invstd: guards.read(&running.var),
        weight: guards.read_opt(weight),
        bias: guards.read_opt(bias),
        g: desc.geometry().into(),
        eps,
        stat_is_var: 1,
    };
    let relu = epilogue_pointers(&mut guards, epilogue.as_mut());
    launch_normalize::<T>(gpu, desc, params, relu)
}

/// The fused buffers of a forward, checked after the plain ones.
fn check_epilogue<T>(desc: &TensorDesc, epilogue: Option<&ReluEpilogue<'_, T>>) -> Result<()> {
    match epilogue {
        Some(e) => epilogue::check_forward(
            desc,
            e.residual.as_ref().map(|z| z.len()),
            e.mask.as_ref().map(|m| m.len()),
        ),
        None => Ok(()),
    }
}

/// The device pointers of a forward epilogue: its kind, `z` and the mask (0 when absent).
fn epilogue_pointers<'a, T>(
    guards: &mut Guards<'a>,
    epilogue: Option<&'a mut ReluEpilogue<'_, T>>,
) -> Option<(Epilogue, u64, u64)> {
    let ReluEpilogue { residual, mask } = epilogue?;
    let residual: &'a Option<CudaView<'_, T>> = residual;
    Some((
        Epilogue::with_residual(residual.is_some()),
        guards.read_opt(residual.as_ref()),
        guards.write_opt(mask.as_mut()),
    ))
}

/// The normalize pass of both forwards: plain, or `relu(. [+ z])` writing the mask.
fn launch_normalize<T: Element>(
    gpu: &GpuContext,
    desc: &TensorDesc,
    params: NormalizeParams,
    relu: Option<(Epilogue, u64, u64)>,
) -> Result<()> {
    let Some((kind, z, mask)) = relu else {
        return launch_elementwise::<T, _>(
            gpu,
            desc,
            Family::NormalizePlanar,
            Family::NormalizeRows,
            &params,
        );
    };
    let (planar, rows) = match kind {
        Epilogue::Relu => (Family::NormalizeReluPlanar, Family::NormalizeReluRows),
        Epilogue::AddRelu => (Family::NormalizeAddReluPlanar, Family::NormalizeAddReluRows),
    };
    let params = NormalizeReluParams {
        base: params,
        z,
        mask,
    };
    launch_elementwise::<T, _>(gpu, desc, planar, rows, &params)
}

/// Training backward from the statistics its forward saved: one split reduction of `sum(dy)`
/// and `sum(dy * x_hat)` per channel (which also writes `dweight` and `dbias`), then one
/// elementwise pass `dx = weight * invstd * (dy - sum(dy) / m - x_hat * sum(dy * x_hat) / m)`.
/// `x` and `dy` are read twice, `dx` written once.
///
/// Errors: [`Error::BufferLength`](crate::Error::BufferLength), [`Error::SingleValuePerChannel`](crate::Error::SingleValuePerChannel).
#[allow(clippy::too_many_arguments)]
pub fn backward_training<T: Element>(
    gpu: &GpuContext,
    workspace: &mut Workspace,
    x: &CudaView<'_, T>,
    dy: &CudaView<'_, T>,
    desc: &TensorDesc,
    weight: Option<&CudaView<'_, f32>>,
    saved: &SavedStats<'_>,
    grads: GradientsMut<'_, T>,
) -> Result<()> {
    backward_training_with(gpu, workspace, x, dy, desc, weight, saved, grads, None)
}

/// [`backward_training`] through the ReLU mask of [`super::fused::backward_training`] when
/// `relu` is given (its buffers checked right after the plain ones).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_training_with<T: Element>(
    gpu: &GpuContext,
    workspace: &mut Workspace,
    x: &CudaView<'_, T>,
    dy: &CudaView<'_, T>,
    desc: &TensorDesc,
    weight: Option<&CudaView<'_, f32>>,
    saved: &SavedStats<'_>,
    grads: GradientsMut<'_, T>,
    relu: Option<ReluGrad<'_, '_, T>>,
) -> Result<()> {
    Buffers {
        save_mean: Some(saved.mean.len()),
        save_mean_lo: saved.mean_lo.as_ref().map(|lo| lo.len()),
        save_invstd: Some(saved.invstd.len()),
        ..backward_buffers(x, dy, weight, &grads)
    }
    .check(desc)?;
    check_relu_grad(desc, relu.as_ref())?;
    validate::batch_statistics(desc)?;
    let stats = Normalization {
        mean: &saved.mean,
        mean_lo: saved.mean_lo.as_ref(),
        var_or_invstd: &saved.invstd,
        eps: 0.0,
        training: true,
    };
    backward(gpu, workspace, x, dy, desc, weight, &stats, grads, relu)
}

/// Eval-mode backward with the running statistics (constants of the forward):
/// `dx = dy * weight / sqrt(running_var + eps)` in one pass, and one reduction for `dweight`
/// and `dbias` when they are asked for.
///
/// Errors: [`Error::BufferLength`](crate::Error::BufferLength), [`Error::InvalidEps`](crate::Error::InvalidEps).
#[allow(clippy::too_many_arguments)]
pub fn backward_inference<T: Element>(
    gpu: &GpuContext,
    workspace: &mut Workspace,
    x: &CudaView<'_, T>,
    dy: &CudaView<'_, T>,
    desc: &TensorDesc,
    weight: Option<&CudaView<'_, f32>>,
    running: &RunningStats<'_>,
    eps: f32,
    grads: GradientsMut<'_, T>,
) -> Result<()> {
    backward_inference_with(
        gpu, workspace, x, dy, desc, weight, running, eps, grads, None,
    )
}

/// [`backward_inference`] through the ReLU mask of [`super::fused::backward_inference`] when
/// `relu` is given.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_inference_with<T: Element>(
    gpu: &GpuContext,
    workspace: &mut Workspace,
    x: &CudaView<'_, T>,
    dy: &CudaView<'_, T>,
    desc: &TensorDesc,
    weight: Option<&CudaView<'_, f32>>,
    running: &RunningStats<'_>,
    eps: f32,
    grads: GradientsMut<'_, T>,
    relu: Option<ReluGrad<'_, '_, T>>,
) -> Result<()> {
    Buffers {
        running_mean: Some(running.mean.len()),
        running_var: Some(running.var.len()),
        ..backward_buffers(x, dy, weight, &grads)
    }
    .check(desc)?;
    check_relu_grad(desc, relu.as_ref())?;
    validate_eps(eps)?;
    let stats = Normalization {
        mean: &running.mean,
        mean_lo: None,
        var_or_invstd: &running.var,
        eps,
        training: false,
    };
    backward(gpu, workspace, x, dy, desc, weight, &stats, grads, relu)
}

/// The fused buffers of a backward, checked after the plain ones.
fn check_relu_grad<T>(desc: &TensorDesc, relu: Option<&ReluGrad<'_, '_, T>>) -> Result<()> {
    match relu {
        Some(r) => epilogue::check_backward(desc, r.mask.len(), r.dz.as_ref().map(|d| d.len())),
        None => Ok(()),
    }
}

fn backward_buffers<T>(
    x: &CudaView<'_, T>,
    dy: &CudaView<'_, T>,
    weight: Option<&CudaView<'_, f32>>,
    grads: &GradientsMut<'_, T>,
) -> Buffers {
    Buffers {
        x: x.len(),
        dy: Some(dy.len()),
        dx: grads.dx.as_ref().map(|d| d.len()),
        weight: weight.map(|w| w.len()),
        dweight: grads.dweight.as_ref().map(|d| d.len()),
        dbias: grads.dbias.as_ref().map(|d| d.len()),
        ..Default::default()
    }
}

/// The statistics a backward normalizes with: saved batch ones (`var_or_invstd` is invstd, the
/// mean `mean + mean_lo`) or running ones (`var_or_invstd` is the variance, `eps` added on the
/// device, no `mean_lo`).
pub(crate) struct Normalization<'s, 'a> {
    pub mean: &'s CudaView<'a, f32>,
    pub mean_lo: Option<&'s CudaView<'a, f32>>,
    pub var_or_invstd: &'s CudaView<'a, f32>,
    pub eps: f32,
    pub training: bool,
}

/// The shared body of both backwards (and of the synchronized one's local sums), after
/// validation; with `dy_eff = mask ? dy : 0` in place of `dy` when `relu` is given (and
/// `dz = dy_eff` when it asks for it): the `*_relu` kernels.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<T: Element>(
    gpu: &GpuContext,
    workspace: &mut Workspace,
    x: &CudaView<'_, T>,
    dy: &CudaView<'_, T>,
    desc: &TensorDesc,
    weight: Option<&CudaView<'_, f32>>,
    stats: &Normalization<'_, '_>,
    grads: GradientsMut<'_, T>,
    relu: Option<ReluGrad<'_, '_, T>>,
) -> Result<()> {
    let GradientsMut {
        mut dx,
        mut dweight,
        mut dbias,
        accumulate,
    } = grads;
    if desc.numel() == 0 {
        // Empty batch: the sums are 0, so fresh gradients are 0 and accumulated ones unchanged.
        if !accumulate {
            for buffer in [dweight.as_mut(), dbias.as_mut()].into_iter().flatten() {
                gpu.stream().memset_zeros(buffer)?;
            }
        }
        return Ok(());
    }

    let c = desc.channels();
    let g = desc.geometry();
    let stream = gpu.stream();
    let index = index_width(desc);
    let wants_params = dweight.is_some() || dbias.is_some();
    // Training dx needs the sums; eval dx does not.
    let needs_reduction = wants_params || (stats.training && dx.is_some());
    let reduce = launch::reduction(&g, T::DTYPE, gpu.sm_count());
    let scratch = workspace.reserve(gpu, 2 * c * reduce.splits as usize, c)?;
    let (mask, mut dz) = relu.map(|r| (r.mask, r.dz)).unzip();
    let mut guards = Guards::new(stream);
    let x_ptr = guards.read(x);
    let dy_ptr = guards.read(dy);
    let mean = guards.read(stats.mean);
    let mean_lo = guards.read_opt(stats.mean_lo);
    let var_or_invstd = guards.read(stats.var_or_invstd);
    let stat_is_var = (!stats.training) as i32;
    let mask = guards.read_opt(mask);
    let dz = guards.write_opt(dz.as_mut().and_then(Option::as_mut));
    let mut coef = 0;
    if needs_reduction {
        if stats.training {
            coef = guards.write(scratch.coef);
        }
        let params = BackwardReduceParams {
            x: x_ptr,
            dy: dy_ptr,
            mean,
            mean_lo,
            var_or_invstd,
            partials: guards.write(scratch.partials),
            semaphores: guards.write(scratch.semaphores),
            dweight: guards.write_opt(dweight.as_mut()),
            dbias: guards.write_opt(dbias.as_mut()),
            coef,
            g: g.into(),
            eps: stats.eps,
            stat_is_var,
            accumulate: accumulate as i32,
            splits: reduce.splits as i32,
        };
        if mask == 0 {
            let family = pick(&g, Family::BackwardReducePlanar, Family::BackwardReduceRows);
            launch(
                stream,
                gpu.kernels().get(family, T::DTYPE, index),
                reduce,
                &params,
            )?;
        } else {
            let family = pick(
                &g,
                Family::BackwardReduceReluPlanar,
                Family::BackwardReduceReluRows,
            );
            let params = BackwardReduceReluParams { base: params, mask };
            launch(
                stream,
                gpu.kernels().get(family, T::DTYPE, index),
                reduce,
                &params,
            )?;
        }
    }
    if dx.is_none() && dz == 0 {
        return Ok(());
    }
    let params = BackwardElementwiseParams {
        x: x_ptr,
        dy: dy_ptr,
        dx: guards.write_opt(dx.as_mut()),
        mean,
        mean_lo,
        var_or_invstd,
        weight: guards.read_opt(weight),
        coef,
        g: g.into(),
        eps: stats.eps,
        stat_is_var,
    };
    if mask == 0 {
        return launch_elementwise::<T, _>(
            gpu,
            desc,
            Family::BackwardDxPlanar,
            Family::BackwardDxRows,
            &params,
        );
    }
    // dz without dx: the ReLU backward alone, into dz (dx_relu with var_or_invstd null).
    let (with_dz, params) = if params.dx == 0 {
        let alone = BackwardElementwiseParams {
            dx: dz,
            var_or_invstd: 0,
            coef: 0,
            ..params
        };
        (false, alone)
    } else {
        (dz != 0, params)
    };
    let (planar, rows) = if with_dz {
        (
            Family::BackwardDxAddReluPlanar,
            Family::BackwardDxAddReluRows,
        )
    } else {
        (Family::BackwardDxReluPlanar, Family::BackwardDxReluRows)
    };
    let params = BackwardElementwiseReluParams {
        base: params,
        mask,
        dz: if with_dz { dz } else { 0 },
    };
    launch_elementwise::<T, _>(gpu, desc, planar, rows, &params)
}

/// The batch norm a [`fold`] folds: its running statistics, optional affine parameters and eps.
#[derive(Debug)]
pub struct FoldBatchNorm<'a> {
    /// `[C_out]` running mean.
    pub running_mean: CudaView<'a, f32>,
    /// `[C_out]` running variance.
    pub running_var: CudaView<'a, f32>,
    /// Optional `[C_out]` weight (1 when absent).
    pub weight: Option<CudaView<'a, f32>>,
    /// Optional `[C_out]` bias (0 when absent).
    pub bias: Option<CudaView<'a, f32>>,
    /// The batch norm's epsilon.
    pub eps: f32,
}

/// Folds an eval-mode batch norm into the convolution or linear layer before it:
/// `W' = W * s` along the output channel, `b' = (b - running_mean) * s + bias`, with
/// `s = weight / sqrt(running_var + eps)`, computed in f64 and rounded once to `T`.
///
/// `weight` is read from `weight_in` (or, when `None`, from `weight_out` itself: in place) and
/// written to `weight_out`, in the memory order of `spec`; `conv_bias` is the layer's own bias
/// (`None` when it has none) and `bias_out` receives the folded bias `[C_out]`.
pub fn fold<T: Element>(
    gpu: &GpuContext,
    spec: &FoldSpec,
    weight_in: Option<&CudaView<'_, T>>,
    weight_out: &mut CudaViewMut<'_, T>,
    conv_bias: Option<&CudaView<'_, T>>,
    bias_out: &mut CudaViewMut<'_, T>,
    bn: &FoldBatchNorm<'_>,
) -> Result<()> {
    let map = spec.map();
    let c_out = map.c_out;
    validate_eps(bn.eps)?;
    if let Some(w) = weight_in {
        validate::buffer("weight", map.numel, w.len())?;
    }
    validate::buffer("weight_out", map.numel, weight_out.len())?;
    validate::buffer("bias_out", c_out, bias_out.len())?;
    if let Some(b) = conv_bias {
        validate::buffer("conv_bias", c_out, b.len())?;
    }
    let per_channel = [
        ("bn.running_mean", Some(bn.running_mean.len())),
        ("bn.running_var", Some(bn.running_var.len())),
        ("bn.weight", bn.weight.as_ref().map(|w| w.len())),
        ("bn.bias", bn.bias.as_ref().map(|b| b.len())),
    ];
    for (what, len) in per_channel {
        if let Some(len) = len {
            validate::buffer(what, c_out, len)?;
        }
    }

    let stream = gpu.stream();
    let mut guards = Guards::new(stream);
    let weight_out_ptr = guards.write(weight_out);
    let params = FoldParams {
        weight_in: weight_in.map_or(weight_out_ptr, |w| guards.read(w)),
        weight_out: weight_out_ptr,
        conv_bias: guards.read_opt(conv_bias),
        bias_out: guards.write(bias_out),
        bn_weight: guards.read_opt(bn.weight.as_ref()),
        bn_bias: guards.read_opt(bn.bias.as_ref()),
        running_mean: guards.read(&bn.running_mean),
        running_var: guards.read(&bn.running_var),
        numel: map.numel as u64,
        c_out: c_out as u64,
        group_stride: map.group_stride as u64,
        inner_stride: map.inner_stride as u64,
        c_out_per_group: map.c_out_per_group as u64,
        eps: bn.eps,
    };
    let work = map.numel.max(c_out) as u64;
    launch(
        stream,
        gpu.kernels().fold(T::DTYPE),
        launch::flat(work, gpu.sm_count()),
        &params,
    )
}

pub(crate) fn index_width(desc: &TensorDesc) -> IndexWidth {
    IndexWidth::for_numel(desc.numel())
}

pub(crate) fn pick(g: &crate::shape::Geometry, planar: Family, rows: Family) -> Family {
    match Traversal::of(g) {
        Traversal::Planar => planar,
        Traversal::Rows => rows,
    }
}

pub(crate) fn launch_elementwise<T: Element, P: DeviceRepr>(
    gpu: &GpuContext,
    desc: &TensorDesc,
    planar: Family,
    rows: Family,
    params: &P,
) -> Result<()> {
    let g = desc.geometry();
    let function = gpu
        .kernels()
        .get(pick(&g, planar, rows), T::DTYPE, index_width(desc));
    launch(
        gpu.stream(),
        function,
        launch::elementwise(&g, T::DTYPE, gpu.sm_count()),
        params,
    )
}

/// The one launch of the crate.
pub(crate) fn launch<P: DeviceRepr>(
    stream: &CudaStream,
    function: &CudaFunction,
    shape: Launch,
    params: &P,
) -> Result<()> {
    // SAFETY: every kernel takes exactly one parameter struct whose #[repr(C)] mirror is `P`
    // (layouts checked in params.rs); the caller validated every buffer length against the
    // descriptor and the launch shape comes from `launch`, whose grids stay within the
    // kernels' assumptions (256 threads, channel tiles covering C, splits <= MAX_SPLITS). The
    // device pointers in `params` are kept alive and ordered by the caller's `Guards`.
    unsafe {
        stream
            .launch_builder(function)
            .arg(params)
            .launch(shape.config())
    }?;
    Ok(())
}

/// Raw device pointers for a launch's parameter struct, with the cudarc guards that order the
/// buffers' other uses after the launch (they record events when dropped, after the launch).
pub(crate) struct Guards<'a> {
    stream: &'a CudaStream,
    guards: Vec<SyncOnDrop<'a>>,
}

impl<'a> Guards<'a> {
    pub(crate) fn new(stream: &'a CudaStream) -> Self {
        Self {
            stream,
            guards: Vec::new(),
        }
    }

    pub(crate) fn read<T>(&mut self, buffer: &'a impl DevicePtr<T>) -> u64 {
        let (ptr, guard) = buffer.device_ptr(self.stream);
        self.guards.push(guard);
        ptr
    }

    pub(crate) fn write<T>(&mut self, buffer: &'a mut impl DevicePtrMut<T>) -> u64 {
        let (ptr, guard) = buffer.device_ptr_mut(self.stream);
        self.guards.push(guard);
        ptr
    }

    pub(crate) fn read_opt<T>(&mut self, buffer: Option<&'a impl DevicePtr<T>>) -> u64 {
        buffer.map_or(0, |b| self.read(b))
    }

    pub(crate) fn write_opt<T>(&mut self, buffer: Option<&'a mut impl DevicePtrMut<T>>) -> u64 {
        buffer.map_or(0, |b| self.write(b))
    }
}
