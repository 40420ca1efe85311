//! The device operations under the public calls: one function per operation (batch statistics,
//! normalize with its epilogue, gradient reduce, dx with its epilogue, the synchronized moments,
//! merge and coefficients, fold), each building its kernel's parameter struct once and
//! launching it through the family typed by that struct ([`super::kernels`]).
//!
//! Nothing here validates: the callers ([`super::functional`], [`super::sync`]) check every
//! buffer against the descriptor first, so a refused call queues nothing.

use super::context::GpuContext;
use super::kernels::{self, Family, IndexWidth};
use super::launch::{self, Traversal};
use super::params::{
    BackwardElementwiseParams, BackwardElementwiseReluParams, BackwardEvalParams,
    BackwardReduceParams, BackwardReduceReluParams, FoldParams, NormalizeParams,
    NormalizeReluParams, OnchipParams, StatsParams, SyncCoefficientsParams, SyncMergeParams,
    SyncMomentsParams,
};
use super::views::{
    BackwardStats, BatchStats, Epilogue, EpilogueGrad, GradientsMut, RunningStats, RunningUpdate,
    SavedStats,
};
use super::workspace::{Scratch, Workspace};
use crate::config::RunningVarUpdate;
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::fold::FoldSpec;
use crate::shape::TensorDesc;
use cudarc::driver::{
    sys, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr,
    SyncOnDrop,
};

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

/// Launches `family`'s entry point for `desc` (traversal, dtype, index width) with `shape`.
fn launch_family<T: Element, P: DeviceRepr>(
    gpu: &GpuContext,
    family: Family<P>,
    desc: &TensorDesc,
    shape: launch::Launch,
    params: &P,
) -> Result<()> {
    let g = desc.geometry();
    let index = IndexWidth::for_numel(desc.numel());
    gpu.kernels()
        .family(family, Traversal::of(&g), T::DTYPE, index)
        .launch(gpu.stream(), shape, params)
}

/// The launch of the split reduction `family` over `desc`: one wave of that kernel's blocks (its
/// occupancy, from the driver), split as [`launch::reduction`] says.
fn reduction_shape<P>(
    gpu: &GpuContext,
    family: Family<P>,
    desc: &TensorDesc,
    dtype: DType,
) -> launch::Launch {
    let g = desc.geometry();
    let shape = launch::reduction(&g, dtype, residency(gpu, family, desc, dtype));
    // The workspace holds one semaphore per channel, which the kernels never exceed.
    debug_assert!(launch::semaphores(&g, &shape) <= g.channels as u64);
    shape
}

/// How many blocks of `family`'s kernel for `desc` one SM holds at once (the driver's figure,
/// asked when the kernels loaded), on every SM of the device.
fn residency<P>(
    gpu: &GpuContext,
    family: Family<P>,
    desc: &TensorDesc,
    dtype: DType,
) -> launch::Residency {
    let g = desc.geometry();
    let index = IndexWidth::for_numel(desc.numel());
    launch::Residency {
        sm_count: gpu.sm_count(),
        blocks_per_sm: gpu
            .kernels()
            .blocks_per_sm(family, Traversal::of(&g), dtype, index),
    }
}

fn elementwise<T: Element, P: DeviceRepr>(
    gpu: &GpuContext,
    family: Family<P>,
    desc: &TensorDesc,
    params: &P,
) -> Result<()> {
    let resident = residency(gpu, family, desc, T::DTYPE);
    let shape = launch::elementwise(&desc.geometry(), T::DTYPE, resident);
    launch_family::<T, P>(gpu, family, desc, shape, params)
}

/// The statistics a normalize or a backward reads: the one place their encoding in the
/// kernels' parameters (`var_or_invstd`, `stat_is_var`, `eps`) is spelled.
#[derive(Clone, Copy)]
pub(crate) enum Normalization<'s, 'a> {
    /// Saved batch statistics: the mean and `invstd`, used as they are.
    Batch(&'s SavedStats<'a>),
    /// Running statistics: `1 / sqrt(var + eps)` on the device.
    Running(&'s RunningStats<'a>, f32),
}

/// [`Normalization`] as the kernels take it.
struct StatPointers {
    mean: u64,
    mean_lo: u64,
    var_or_invstd: u64,
    eps: f32,
    stat_is_var: i32,
}

impl<'s, 'a> Normalization<'s, 'a> {
    pub(crate) fn of(stats: &'s BackwardStats<'a>) -> Self {
        match stats {
            BackwardStats::Batch(saved) => Self::Batch(saved),
            BackwardStats::Running { stats, eps } => Self::Running(stats, *eps),
        }
    }

    fn is_batch(&self) -> bool {
        matches!(self, Self::Batch(_))
    }

    fn pointers<'g>(&self, guards: &mut Guards<'g>) -> StatPointers
    where
        's: 'g,
    {
        match *self {
            Self::Batch(saved) => StatPointers {
                mean: guards.read(&saved.mean),
                mean_lo: guards.read_opt(saved.mean_lo.as_ref()),
                var_or_invstd: guards.read(&saved.invstd),
                eps: 0.0,
                stat_is_var: 0,
            },
            Self::Running(running, eps) => StatPointers {
                mean: guards.read(&running.mean),
                mean_lo: 0,
                var_or_invstd: guards.read(&running.var),
                eps,
                stat_is_var: 1,
            },
        }
    }
}

/// A running update as the statistics and merge kernels take it: the two buffers (0: no
/// update), the factor and whether `running_var` takes the unbiased variance.
struct RunningPointers {
    mean: u64,
    var: u64,
    factor: f32,
    unbiased: i32,
}

fn running_pointers<'g>(
    guards: &mut Guards<'g>,
    running: Option<&'g mut RunningUpdate<'_>>,
) -> RunningPointers {
    match running {
        Some(r) => RunningPointers {
            unbiased: (r.var_update == RunningVarUpdate::Unbiased) as i32,
            factor: r.factor,
            mean: guards.write(&mut r.mean),
            var: guards.write(&mut r.var),
        },
        None => RunningPointers {
            mean: 0,
            var: 0,
            factor: 0.0,
            unbiased: 0,
        },
    }
}

/// Floats per channel and split in the workspace: the statistics' and the moments' Welford
/// partials `(mean, m2, count)`, the backward's sums `(sum dy, sum dy * xhat)`.
const WELFORD_FLOATS: usize = 3;
const GRADIENT_FLOATS: usize = 2;

/// What the largest batch-norm call on a non-empty `desc` in `dtype` asks of a workspace:
/// `(partial floats, semaphores)`, as the calls below reserve it.
/// Each reduction kernel's grid follows its own occupancy, so every one is asked; with the
/// single-pass forward on, its partials and barrier word too.
pub(crate) fn largest_scratch(
    gpu: &GpuContext,
    desc: &TensorDesc,
    dtype: DType,
) -> Result<(usize, usize)> {
    let c = desc.channels();
    let splits = |shape: launch::Launch| shape.splits as usize;
    let stats = reduction_shape(gpu, kernels::STATS, desc, dtype);
    let moments = reduction_shape(gpu, kernels::SYNC_MOMENTS, desc, dtype);
    let reduce = reduction_shape(gpu, kernels::BACKWARD_REDUCE, desc, dtype);
    let reduce_relu = reduction_shape(gpu, kernels::BACKWARD_REDUCE_RELU, desc, dtype);
    let eval = reduction_shape(gpu, kernels::BACKWARD_EVAL, desc, dtype);
    let mut welford = splits(stats).max(splits(moments));
    let mut semaphores = c;
    if let Some(single) = on_chip_shape(gpu, desc, dtype)? {
        welford = welford.max(splits(single.launch));
        semaphores = c + 1;
    }
    let gradient = splits(reduce).max(splits(reduce_relu)).max(splits(eval));
    Ok((
        (WELFORD_FLOATS * welford).max(GRADIENT_FLOATS * gradient) * c,
        semaphores,
    ))
}

/// The single-pass forward's launch for `desc` when the context has it on and the tensor fits
/// on chip ([`launch::on_chip`], with the driver's occupancy for its dynamic shared memory).
pub(crate) fn on_chip_shape(
    gpu: &GpuContext,
    desc: &TensorDesc,
    dtype: DType,
) -> Result<Option<launch::OnChip>> {
    if !gpu.single_pass_forward() {
        return Ok(None);
    }
    let kernel = gpu
        .kernels()
        .onchip(dtype, IndexWidth::for_numel(desc.numel()));
    let mut failed = None;
    let plan = launch::on_chip(
        &desc.geometry(),
        dtype,
        gpu.sm_count(),
        kernel.max_shared as u64,
        |bytes| {
            kernel.blocks_per_sm(bytes as usize).unwrap_or_else(|e| {
                failed.get_or_insert(e);
                0
            })
        },
    );
    match failed {
        Some(e) => Err(e),
        None => Ok(plan),
    }
}

/// The inputs of a single-pass training forward.
pub(crate) struct SinglePass<'r, 'a, T> {
    pub desc: &'r TensorDesc,
    pub x: &'r CudaView<'a, T>,
    pub weight: Option<&'r CudaView<'a, f32>>,
    pub bias: Option<&'r CudaView<'a, f32>>,
}

/// The training forward of a non-empty rows tensor in one pass over memory
/// (`kernels/bn_onchip.cu`): the batch statistics into `stats` and `y`, as [`batch_statistics`]
/// then [`normalize`] would give them. `Ok(false)`, with nothing queued, when it does not apply:
/// the context has it off, the tensor does not fit on chip, or the device refuses the
/// cooperative grid (`CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE`, or `CUDA_ERROR_NOT_SUPPORTED`
/// where cooperative launches are not); the caller then runs the two passes. One launch. The
/// workspace holds the partials and, past the semaphores, the grid barrier's word (zero between
/// calls, as the semaphores).
pub(crate) fn single_pass_forward<T: Element>(
    gpu: &GpuContext,
    workspace: &mut Workspace,
    op: &SinglePass<'_, '_, T>,
    stats: &mut BatchStats<'_>,
    y: &mut CudaViewMut<'_, T>,
) -> Result<bool> {
    let Some(plan) = on_chip_shape(gpu, op.desc, T::DTYPE)? else {
        return Ok(false);
    };
    let c = op.desc.channels();
    let scratch =
        workspace.reserve(gpu, WELFORD_FLOATS * c * plan.launch.splits as usize, c + 1)?;
    let mut guards = Guards::new(gpu.stream());
    let running = running_pointers(&mut guards, stats.running.as_mut());
    let semaphores = guards.write(scratch.semaphores);
    let params = OnchipParams {
        x: guards.read(op.x),
        y: guards.write(y),
        weight: guards.read_opt(op.weight),
        bias: guards.read_opt(op.bias),
        partials: guards.write(scratch.partials),
        barrier: semaphores + 4 * c as u64,
        save_mean: guards.write(&mut stats.saved.mean),
        save_mean_lo: guards.write(&mut stats.saved.mean_lo),
        save_invstd: guards.write(&mut stats.saved.invstd),
        running_mean: running.mean,
        running_var: running.var,
        g: op.desc.geometry().into(),
        eps: stats.eps,
        factor: running.factor,
        unbiased: running.unbiased,
        splits: plan.launch.splits as i32,
    };
    let kernel = gpu
        .kernels()
        .onchip(T::DTYPE, IndexWidth::for_numel(op.desc.numel()));
    match kernel.launch(gpu.stream(), plan.launch, plan.shared_bytes, &params) {
        Ok(()) => Ok(true),
        // Refused before anything was queued: the two passes run instead.
        Err(Error::Driver(e))
            if matches!(
                e.0,
                sys::CUresult::CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE
                    | sys::CUresult::CUDA_ERROR_NOT_SUPPORTED
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Batch statistics of a non-empty `x`: a split Welford reduction whose last block per channel
/// writes `stats.saved` and updates `stats.running`. One launch.
pub(crate) fn batch_statistics<T: Element>(
    gpu: &GpuContext,
    workspace: &mut Workspace,
    desc: &TensorDesc,
    x: &CudaView<'_, T>,
    stats: &mut BatchStats<'_>,
) -> Result<()> {
    let (c, g) = (desc.channels(), desc.geometry());
    let reduce = reduction_shape(gpu, kernels::STATS, desc, T::DTYPE);
    let scratch = workspace.reserve(gpu, WELFORD_FLOATS * c * reduce.splits as usize, c)?;
    let mut guards = Guards::new(gpu.stream());
    let running = running_pointers(&mut guards, stats.running.as_mut());
    let params = StatsParams {
        x: guards.read(x),
        partials: guards.write(scratch.partials),
        semaphores: guards.write(scratch.semaphores),
        save_mean: guards.write(&mut stats.saved.mean),
        save_mean_lo: guards.write(&mut stats.saved.mean_lo),
        save_invstd: guards.write(&mut stats.saved.invstd),
        running_mean: running.mean,
        running_var: running.var,
        g: g.into(),
        eps: stats.eps,
        factor: running.factor,
        unbiased: running.unbiased,
        splits: reduce.splits as i32,
    };
    launch_family::<T, _>(gpu, kernels::STATS, desc, reduce, &params)
}

/// The inputs of a normalize: `y = (x - mean) * (weight * invstd) + bias`, then the epilogue.
pub(crate) struct Normalize<'r, 'a, T> {
    pub desc: &'r TensorDesc,
    pub x: &'r CudaView<'a, T>,
    pub weight: Option<&'r CudaView<'a, f32>>,
    pub bias: Option<&'r CudaView<'a, f32>>,
    pub stats: Normalization<'r, 'a>,
}

/// The normalize pass of every forward, with its epilogue (`relu(. [+ z])` writing the mask).
/// One launch over a non-empty `x`.
pub(crate) fn normalize<T: Element>(
    gpu: &GpuContext,
    op: &Normalize<'_, '_, T>,
    y: &mut CudaViewMut<'_, T>,
    epilogue: &mut Epilogue<'_, T>,
) -> Result<()> {
    let mut guards = Guards::new(gpu.stream());
    let stats = op.stats.pointers(&mut guards);
    let params = NormalizeParams {
        x: guards.read(op.x),
        y: guards.write(y),
        mean: stats.mean,
        mean_lo: stats.mean_lo,
        var_or_invstd: stats.var_or_invstd,
        weight: guards.read_opt(op.weight),
        bias: guards.read_opt(op.bias),
        g: op.desc.geometry().into(),
        eps: stats.eps,
        stat_is_var: stats.stat_is_var,
    };
    let (family, z, mask) = match epilogue {
        Epilogue::None => return elementwise::<T, _>(gpu, kernels::NORMALIZE, op.desc, &params),
        Epilogue::Relu { mask } => (kernels::NORMALIZE_RELU, 0, mask),
        Epilogue::AddRelu { z, mask } => (kernels::NORMALIZE_ADD_RELU, guards.read(z), mask),
    };
    let params = NormalizeReluParams {
        base: params,
        z,
        mask: guards.write_opt(mask.as_mut()),
    };
    elementwise::<T, _>(gpu, family, op.desc, &params)
}

/// The inputs of a backward's passes.
pub(crate) struct Gradient<'r, 'a, T> {
    pub desc: &'r TensorDesc,
    pub x: &'r CudaView<'a, T>,
    pub dy: &'r CudaView<'a, T>,
    pub weight: Option<&'r CudaView<'a, f32>>,
    pub stats: Normalization<'r, 'a>,
}

/// Both passes of a backward, after validation: the reduce when parameter gradients are asked
/// for or batch statistics need the dx coefficients, then the dx pass when it writes anything;
/// in eval with dx and parameter gradients, one pass that does both ([`backward_eval`]).
/// An empty batch sums to 0: fresh parameter gradients are zeroed, accumulated ones unchanged.
pub(crate) fn backward<T: Element>(
    gpu: &GpuContext,
    workspace: &mut Workspace,
    op: &Gradient<'_, '_, T>,
    grads: GradientsMut<'_, T>,
    epilogue: &mut EpilogueGrad<'_, T>,
) -> Result<()> {
    let GradientsMut {
        mut dx,
        mut dweight,
        mut dbias,
        accumulate,
    } = grads;
    if op.desc.numel() == 0 {
        if !accumulate {
            for buffer in [dweight.as_mut(), dbias.as_mut()].into_iter().flatten() {
                gpu.stream().memset_zeros(buffer)?;
            }
        }
        return Ok(());
    }
    let c = op.desc.channels();
    // Training dx needs the sums; eval dx does not, so eval runs both in one pass.
    let wants_params = dweight.is_some() || dbias.is_some();
    let one_pass_eval = !op.stats.is_batch() && wants_params && dx.is_some();
    // The kernel that reduces (the eval pass, or the reduce plain or reading the mask) decides
    // the grid, hence the partials.
    let mask = epilogue.mask();
    let reduce = match (one_pass_eval, mask) {
        (true, _) => reduction_shape(gpu, kernels::BACKWARD_EVAL, op.desc, T::DTYPE),
        (false, None) => reduction_shape(gpu, kernels::BACKWARD_REDUCE, op.desc, T::DTYPE),
        (false, Some(_)) => reduction_shape(gpu, kernels::BACKWARD_REDUCE_RELU, op.desc, T::DTYPE),
    };
    let scratch = workspace.reserve(gpu, GRADIENT_FLOATS * c * reduce.splits as usize, c)?;
    let sums = ParamSums {
        dweight: dweight.as_mut(),
        dbias: dbias.as_mut(),
        accumulate,
    };
    if let (true, Some(dx)) = (one_pass_eval, dx.as_mut()) {
        return backward_eval(gpu, scratch, reduce, op, sums, dx, epilogue);
    }
    if wants_params || (op.stats.is_batch() && dx.is_some()) {
        backward_reduce(gpu, scratch, reduce, op, sums, mask)?;
    }
    backward_dx(gpu, workspace.coef(), op, dx.as_mut(), epilogue)
}

/// The per-channel outputs of a gradient reduce: `dbias = sum(dy)` and
/// `dweight = invstd * sum(dy * (x - mean))`, written or accumulated.
pub(crate) struct ParamSums<'r, 'a> {
    pub dweight: Option<&'r mut CudaViewMut<'a, f32>>,
    pub dbias: Option<&'r mut CudaViewMut<'a, f32>>,
    pub accumulate: bool,
}

/// The reduce of a backward over a non-empty batch: the parameter sums and, from batch
/// statistics, the dx coefficients into the workspace's `coef`. `mask`: the ReLU mask of a
/// fused forward, read as `dy` is loaded. `reduce`: the launch the workspace's partials were
/// reserved for (the same kernel's [`reduction_shape`]). One launch.
pub(crate) fn backward_reduce<T: Element>(
    gpu: &GpuContext,
    scratch: Scratch<'_>,
    reduce: launch::Launch,
    op: &Gradient<'_, '_, T>,
    sums: ParamSums<'_, '_>,
    mask: Option<&CudaView<'_, u32>>,
) -> Result<()> {
    let mut guards = Guards::new(gpu.stream());
    let params = reduce_params(&mut guards, scratch, op, sums, reduce);
    match mask {
        None => launch_family::<T, _>(gpu, kernels::BACKWARD_REDUCE, op.desc, reduce, &params),
        Some(mask) => {
            let params = BackwardReduceReluParams {
                base: params,
                mask: guards.read(mask),
            };
            let family = kernels::BACKWARD_REDUCE_RELU;
            launch_family::<T, _>(gpu, family, op.desc, reduce, &params)
        }
    }
}

/// The parameters of a gradient reduce over `reduce`'s grid; the dx coefficients go to the
/// workspace's `coef` with batch statistics only.
fn reduce_params<'a, T>(
    guards: &mut Guards<'a>,
    scratch: Scratch<'a>,
    op: &'a Gradient<'_, '_, T>,
    sums: ParamSums<'a, '_>,
    reduce: launch::Launch,
) -> BackwardReduceParams {
    let stats = op.stats.pointers(guards);
    BackwardReduceParams {
        x: guards.read(op.x),
        dy: guards.read(op.dy),
        mean: stats.mean,
        mean_lo: stats.mean_lo,
        var_or_invstd: stats.var_or_invstd,
        partials: guards.write(scratch.partials),
        semaphores: guards.write(scratch.semaphores),
        dweight: guards.write_opt(sums.dweight),
        dbias: guards.write_opt(sums.dbias),
        coef: if op.stats.is_batch() {
            guards.write(scratch.coef)
        } else {
            0
        },
        g: op.desc.geometry().into(),
        eps: stats.eps,
        stat_is_var: stats.stat_is_var,
        accumulate: sums.accumulate as i32,
        splits: reduce.splits as i32,
    }
}

/// The eval backward over a non-empty batch with dx and parameter gradients, in one pass
/// (`bn_backward_eval_*`): the reduce's sums (dweight, dbias, bit for bit [`backward_reduce`]'s)
/// and `dx = dy_eff * weight * invstd` (bit for bit [`backward_dx`]'s) from one read of `x` and
/// `dy`, and `dz = dy_eff` for the residual form: 3 passes over memory instead of 4.
fn backward_eval<T: Element>(
    gpu: &GpuContext,
    scratch: Scratch<'_>,
    reduce: launch::Launch,
    op: &Gradient<'_, '_, T>,
    sums: ParamSums<'_, '_>,
    dx: &mut CudaViewMut<'_, T>,
    epilogue: &mut EpilogueGrad<'_, T>,
) -> Result<()> {
    let mut guards = Guards::new(gpu.stream());
    let base = reduce_params(&mut guards, scratch, op, sums, reduce);
    let (mask, dz) = match epilogue {
        EpilogueGrad::None => (0, 0),
        EpilogueGrad::Relu { mask } => (guards.read(mask), 0),
        EpilogueGrad::AddRelu { mask, dz } => (guards.read(mask), guards.write_opt(dz.as_mut())),
    };
    let params = BackwardEvalParams {
        base,
        dx: guards.write(dx),
        weight: guards.read_opt(op.weight),
        mask,
        dz,
    };
    launch_family::<T, _>(gpu, kernels::BACKWARD_EVAL, op.desc, reduce, &params)
}

/// The dx pass of a backward over a non-empty batch:
/// `dx = weight * invstd * (dy - coef0 - x_hat * coef1)` with the coefficients of the reduce
/// (batch statistics) or `dx = dy * weight * invstd` (running ones), through the epilogue's
/// mask; the residual form also writes `dz`, and without `dx` runs the ReLU backward alone into
/// `dz`. Nothing to write: no launch.
pub(crate) fn backward_dx<T: Element>(
    gpu: &GpuContext,
    coef: Option<&CudaSlice<f32>>,
    op: &Gradient<'_, '_, T>,
    dx: Option<&mut CudaViewMut<'_, T>>,
    epilogue: &mut EpilogueGrad<'_, T>,
) -> Result<()> {
    let mut guards = Guards::new(gpu.stream());
    let stats = op.stats.pointers(&mut guards);
    let params = BackwardElementwiseParams {
        x: guards.read(op.x),
        dy: guards.read(op.dy),
        dx: guards.write_opt(dx),
        mean: stats.mean,
        mean_lo: stats.mean_lo,
        var_or_invstd: stats.var_or_invstd,
        weight: guards.read_opt(op.weight),
        coef: guards.read_opt(coef.filter(|_| op.stats.is_batch())),
        g: op.desc.geometry().into(),
        eps: stats.eps,
        stat_is_var: stats.stat_is_var,
    };
    let (mask, dz) = match epilogue {
        EpilogueGrad::None if params.dx == 0 => return Ok(()),
        EpilogueGrad::None => {
            return elementwise::<T, _>(gpu, kernels::BACKWARD_DX, op.desc, &params)
        }
        EpilogueGrad::Relu { mask } => (guards.read(mask), 0),
        EpilogueGrad::AddRelu { mask, dz } => (guards.read(mask), guards.write_opt(dz.as_mut())),
    };
    let (family, params) = match (params.dx, dz) {
        (0, 0) => return Ok(()),
        // dz without dx: the ReLU backward alone, into dz (dx_relu with var_or_invstd null).
        (0, dz) => {
            let alone = BackwardElementwiseParams {
                dx: dz,
                var_or_invstd: 0,
                coef: 0,
                ..params
            };
            (kernels::BACKWARD_DX_RELU, (alone, 0))
        }
        (_, 0) => (kernels::BACKWARD_DX_RELU, (params, 0)),
        (_, dz) => (kernels::BACKWARD_DX_ADD_RELU, (params, dz)),
    };
    let (base, dz) = params;
    let params = BackwardElementwiseReluParams { base, mask, dz };
    elementwise::<T, _>(gpu, family, op.desc, &params)
}

/// The `(count, mean, mean_lo, m2)` of each channel of a non-empty shard `x` into `moments`
/// (`[C][4]`):
/// bn_stats' split reduction. One launch.
pub(crate) fn sync_moments<T: Element>(
    gpu: &GpuContext,
    workspace: &mut Workspace,
    desc: &TensorDesc,
    x: &CudaView<'_, T>,
    moments: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let (c, g) = (desc.channels(), desc.geometry());
    let reduce = reduction_shape(gpu, kernels::SYNC_MOMENTS, desc, T::DTYPE);
    let scratch = workspace.reserve(gpu, WELFORD_FLOATS * c * reduce.splits as usize, c)?;
    let mut guards = Guards::new(gpu.stream());
    let params = SyncMomentsParams {
        x: guards.read(x),
        partials: guards.write(scratch.partials),
        semaphores: guards.write(scratch.semaphores),
        moments: guards.write(moments),
        g: g.into(),
        splits: reduce.splits as i32,
    };
    launch_family::<T, _>(gpu, kernels::SYNC_MOMENTS, desc, reduce, &params)
}

/// Every rank's moments, `[R][C][4]`, and the global count's one-element buffer.
pub(crate) struct Merge<'a> {
    pub gathered: CudaView<'a, f32>,
    pub ranks: usize,
    pub channels: usize,
    pub total: CudaViewMut<'a, u64>,
}

/// The fixed-order merge of every rank's moments into `stats.saved`, the running update with
/// the global count `M`, and `M` into `merge.total`. One launch.
pub(crate) fn sync_merge(
    gpu: &GpuContext,
    mut merge: Merge<'_>,
    stats: &mut BatchStats<'_>,
) -> Result<()> {
    let mut guards = Guards::new(gpu.stream());
    let running = running_pointers(&mut guards, stats.running.as_mut());
    let params = SyncMergeParams {
        gathered: guards.read(&merge.gathered),
        save_mean: guards.write(&mut stats.saved.mean),
        save_mean_lo: guards.write(&mut stats.saved.mean_lo),
        save_invstd: guards.write(&mut stats.saved.invstd),
        running_mean: running.mean,
        running_var: running.var,
        total: guards.write(&mut merge.total),
        ranks: merge.ranks as u64,
        channels: merge.channels as u64,
        eps: stats.eps,
        factor: running.factor,
        unbiased: running.unbiased,
    };
    let shape = launch::flat(merge.channels as u64, gpu.sm_count());
    gpu.kernels()
        .single(kernels::SYNC_MERGE)
        .launch(gpu.stream(), shape, &params)
}

/// The all-reduced backward sums: this rank's and every rank's, `[2][C]` each, and the global
/// count the forward's merge wrote.
pub(crate) struct GlobalSums<'r, 'a> {
    pub local: &'r CudaView<'a, f32>,
    pub global: &'r CudaView<'a, f32>,
    pub total: &'r CudaView<'a, u64>,
    pub channels: usize,
}

/// The dx coefficients `(global sum dy / M, global sum dy * xhat / M)` into `coef`, and the
/// parameter gradients from this rank's sums. One launch.
pub(crate) fn sync_coefficients(
    gpu: &GpuContext,
    sums: GlobalSums<'_, '_>,
    coef: &mut CudaSlice<f32>,
    params_out: ParamSums<'_, '_>,
) -> Result<()> {
    let mut guards = Guards::new(gpu.stream());
    let params = SyncCoefficientsParams {
        local: guards.read(sums.local),
        global: guards.read(sums.global),
        total: guards.read(sums.total),
        coef: guards.write(coef),
        dweight: guards.write_opt(params_out.dweight),
        dbias: guards.write_opt(params_out.dbias),
        channels: sums.channels as u64,
        accumulate: params_out.accumulate as i32,
    };
    let shape = launch::flat(sums.channels as u64, gpu.sm_count());
    gpu.kernels()
        .single(kernels::SYNC_COEFFICIENTS)
        .launch(gpu.stream(), shape, &params)
}

/// The device buffers of a fold.
pub(crate) struct FoldBuffers<'a, T> {
    pub weight_in: Option<CudaView<'a, T>>,
    pub weight_out: CudaViewMut<'a, T>,
    pub conv_bias: Option<CudaView<'a, T>>,
    pub bias_out: CudaViewMut<'a, T>,
}

/// The batch norm a fold folds, as [`super::functional::FoldBatchNorm`] holds it.
pub(crate) struct FoldStats<'r, 'a> {
    pub running: RunningStats<'a>,
    pub weight: Option<&'r CudaView<'a, f32>>,
    pub bias: Option<&'r CudaView<'a, f32>>,
    pub eps: f32,
}

/// `W' = W * s`, `b' = (b - running_mean) * s + bias` in f64, rounded once to `T`. One launch.
pub(crate) fn fold<T: Element>(
    gpu: &GpuContext,
    spec: &FoldSpec,
    mut buffers: FoldBuffers<'_, T>,
    bn: &FoldStats<'_, '_>,
) -> Result<()> {
    let map = spec.map();
    let mut guards = Guards::new(gpu.stream());
    let weight_out = guards.write(&mut buffers.weight_out);
    let params = FoldParams {
        weight_in: buffers
            .weight_in
            .as_ref()
            .map_or(weight_out, |w| guards.read(w)),
        weight_out,
        conv_bias: guards.read_opt(buffers.conv_bias.as_ref()),
        bias_out: guards.write(&mut buffers.bias_out),
        bn_weight: guards.read_opt(bn.weight),
        bn_bias: guards.read_opt(bn.bias),
        running_mean: guards.read(&bn.running.mean),
        running_var: guards.read(&bn.running.var),
        numel: map.numel as u64,
        c_out: map.c_out as u64,
        group_stride: map.group_stride as u64,
        inner_stride: map.inner_stride as u64,
        c_out_per_group: map.c_out_per_group as u64,
        eps: bn.eps,
    };
    let shape = launch::flat(map.numel.max(map.c_out) as u64, gpu.sm_count());
    gpu.kernels()
        .per_dtype(kernels::FOLD, T::DTYPE)
        .launch(gpu.stream(), shape, &params)
}
