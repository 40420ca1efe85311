//! Group, layer, instance and RMS normalization on the GPU (`kernels/norm_*.cu`), the same calls
//! as [`crate::reference::norms`] over borrowed device views.
//!
//! [`Norms`] is a [`GpuContext`] with the normalization kernels loaded; [`forward`] and
//! [`backward`] take one request struct each. Short rows (transformer layer/RMS norm) and
//! shapes with enough rows run one block per row in one launch; a few long rows (group norm on
//! large images) split every row over several blocks ([`RowPlan`]). Every reduction has a fixed
//! order: results are bitwise deterministic, with no atomics.
//!
//! ```
//! use batchnorm_cuda::gpu::{norms::{self, Forward, Norms, NormWorkspace, StatsMut}, GpuContext};
//! use batchnorm_cuda::norms::NormDesc;
//!
//! let Ok(ctx) = GpuContext::new(0) else { return Ok(()) }; // no GPU here
//! let gpu = Norms::new(&ctx)?;
//! let desc = NormDesc::layer(&[2, 4], &[4])?;
//! let x = ctx.stream().clone_htod(&[1.0f32, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 14.0])?;
//! let mut y = ctx.stream().alloc_zeros::<f32>(8)?;
//! let mut stats = norms::DeviceNormStats::new(&ctx, desc.rows())?;
//! let call = Forward::new(x.as_view(), 1e-5, y.as_view_mut(), stats.as_mut());
//! norms::forward(&gpu, &mut NormWorkspace::new(), &desc, call)?;
//! assert_eq!(ctx.stream().clone_dtoh(&stats.mean)?, [2.5, 11.0]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod kernels;
mod layer;

#[cfg(test)]
pub(crate) use kernels::ENTRY_POINTS;
pub use kernels::{row_plan, RowPlan, MAX_SPLITS};
pub use layer::{NormCache, NormLayer};

use super::context::alloc_error;
use super::ops::Guards;
use super::workspace::{grow, Tenancy};
use super::GpuContext;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::norms::{
    check_params, check_running, ForwardLengths, NormDesc, NormEpilogue, NormStats, RunningLengths,
};
use crate::validate::buffer;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use kernels::{
    BackwardParams, ForwardParams, Grid, NormKernels, ParamPlan, RunningParams, ShapeParams,
};
use std::sync::Arc;

/// A [`GpuContext`] with the normalization kernels loaded (once; clones share them).
#[derive(Clone, Debug)]
pub struct Norms {
    gpu: GpuContext,
    kernels: Arc<NormKernels>,
}

impl Norms {
    /// Loads the normalization kernels into `gpu`'s context.
    ///
    /// Errors: [`Error::MissingKernel`] when the build lacks one, or a driver error.
    pub fn new(gpu: &GpuContext) -> Result<Self> {
        Ok(Self {
            gpu: gpu.clone(),
            kernels: Arc::new(NormKernels::load(gpu)?),
        })
    }

    /// The context the calls are queued on.
    pub fn context(&self) -> &GpuContext {
        &self.gpu
    }
}

/// Device statistics of a forward, one value per row each (see [`NormStats`]).
#[derive(Debug)]
pub struct DeviceNormStats {
    /// The row means rounded to f32 (0 for RMS norm).
    pub mean: CudaSlice<f32>,
    /// The exact mean minus `mean`, rounded to f32.
    pub mean_lo: CudaSlice<f32>,
    /// `1 / sqrt(var + eps)` (mean square for RMS norm).
    pub rstd: CudaSlice<f32>,
}

impl DeviceNormStats {
    /// Zeroed statistics for `rows` rows.
    pub fn new(gpu: &GpuContext, rows: usize) -> Result<Self> {
        let alloc = || {
            gpu.stream()
                .alloc_zeros::<f32>(rows)
                .map_err(alloc_error(rows * 4))
        };
        Ok(Self {
            mean: alloc()?,
            mean_lo: alloc()?,
            rstd: alloc()?,
        })
    }

    /// Views for a forward to write.
    pub fn as_mut(&mut self) -> StatsMut<'_> {
        StatsMut {
            mean: self.mean.as_view_mut(),
            mean_lo: self.mean_lo.as_view_mut(),
            rstd: self.rstd.as_view_mut(),
        }
    }

    /// Views for a backward to read.
    pub fn as_view(&self) -> StatsView<'_> {
        StatsView {
            mean: self.mean.as_view(),
            mean_lo: self.mean_lo.as_view(),
            rstd: self.rstd.as_view(),
        }
    }

    /// Copies them to the host (synchronizes the stream).
    pub fn to_host(&self, gpu: &GpuContext) -> Result<NormStats> {
        self.prefix(self.len()).to_host(gpu)
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.rstd.len()
    }

    /// Whether they hold no row.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Views of the first `rows` rows for a forward to write (`rows <= len()`).
    pub(crate) fn prefix_mut(&mut self, rows: usize) -> StatsMut<'_> {
        StatsMut {
            mean: self.mean.slice_mut(..rows),
            mean_lo: self.mean_lo.slice_mut(..rows),
            rstd: self.rstd.slice_mut(..rows),
        }
    }

    /// Views of the first `rows` rows for a backward to read (`rows <= len()`).
    pub(crate) fn prefix(&self, rows: usize) -> StatsView<'_> {
        StatsView {
            mean: self.mean.slice(..rows),
            mean_lo: self.mean_lo.slice(..rows),
            rstd: self.rstd.slice(..rows),
        }
    }
}

impl StatsView<'_> {
    /// Copies them to the host (synchronizes the stream).
    pub fn to_host(&self, gpu: &GpuContext) -> Result<NormStats> {
        let s = gpu.stream();
        Ok(NormStats {
            mean: s.clone_dtoh(&self.mean)?,
            mean_lo: s.clone_dtoh(&self.mean_lo)?,
            rstd: s.clone_dtoh(&self.rstd)?,
        })
    }
}

/// The statistics a forward writes, `rows` values each.
#[derive(Debug)]
pub struct StatsMut<'a> {
    /// Row means.
    pub mean: CudaViewMut<'a, f32>,
    /// Their low parts.
    pub mean_lo: CudaViewMut<'a, f32>,
    /// Row `rstd`.
    pub rstd: CudaViewMut<'a, f32>,
}

/// The statistics a backward reads, `rows` values each.
#[derive(Debug)]
pub struct StatsView<'a> {
    /// Row means.
    pub mean: CudaView<'a, f32>,
    /// Their low parts.
    pub mean_lo: CudaView<'a, f32>,
    /// Row `rstd`.
    pub rstd: CudaView<'a, f32>,
}

/// Where a forward takes its statistics from (as [`crate::reference::norms::Statistics`]).
#[derive(Debug, Default)]
pub enum Statistics<'a> {
    /// Each row's own statistics.
    #[default]
    Batch,
    /// Instance norm in training with tracked statistics: also update the running ones.
    BatchUpdating {
        /// `running_mean`, `C` values.
        running_mean: CudaViewMut<'a, f32>,
        /// `running_var`, `C` values.
        running_var: CudaViewMut<'a, f32>,
        /// Weight of the batch.
        momentum: f32,
    },
    /// Instance norm in eval with tracked statistics: normalize with them (the forward writes
    /// the per-row statistics they give, which the backward reads as constants).
    Running {
        /// `running_mean`, `C` values.
        mean: CudaView<'a, f32>,
        /// `running_var`, `C` values.
        var: CudaView<'a, f32>,
    },
}

/// The fused residual add: normalize `x + residual` and write it to `sum`.
#[derive(Debug)]
pub struct Residual<'a, T> {
    /// Added to `x`.
    pub residual: CudaView<'a, T>,
    /// Receives `x + residual`, rounded to `T`.
    pub sum: CudaViewMut<'a, T>,
}

/// One forward call.
#[derive(Debug)]
pub struct Forward<'a, T> {
    /// The input, `desc.numel()` values.
    pub x: CudaView<'a, T>,
    /// A fused residual add in front of the normalization.
    pub residual: Option<Residual<'a, T>>,
    /// `C` values or `None` for 1.
    pub weight: Option<CudaView<'a, f32>>,
    /// `C` values or `None` for 0.
    pub bias: Option<CudaView<'a, f32>>,
    /// Added to the variance (mean square for RMS norm).
    pub eps: f32,
    /// Batch or running statistics.
    pub statistics: Statistics<'a>,
    /// What follows the affine map.
    pub epilogue: NormEpilogue,
    /// The output.
    pub y: CudaViewMut<'a, T>,
    /// Receives the row statistics.
    pub stats: StatsMut<'a>,
}

impl<'a, T> Forward<'a, T> {
    /// A plain call: batch statistics, no parameters, no epilogue.
    pub fn new(x: CudaView<'a, T>, eps: f32, y: CudaViewMut<'a, T>, stats: StatsMut<'a>) -> Self {
        Self {
            x,
            residual: None,
            weight: None,
            bias: None,
            eps,
            statistics: Statistics::Batch,
            epilogue: NormEpilogue::None,
            y,
            stats,
        }
    }
}

/// Whether a backward's statistics depended on `x`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum StatsSource {
    /// Row statistics of the forward's own input.
    #[default]
    Batch,
    /// Running statistics (eval instance norm): constants, `dx = dy * weight * rstd`.
    Running,
}

/// One backward call. `bias` is read only by the SiLU epilogue.
#[derive(Debug)]
pub struct Backward<'a, T> {
    /// The forward's input (its `sum` after a fused residual add).
    pub x: CudaView<'a, T>,
    /// The gradient of `y`.
    pub dy: CudaView<'a, T>,
    /// The forward's weight.
    pub weight: Option<CudaView<'a, f32>>,
    /// The forward's bias.
    pub bias: Option<CudaView<'a, f32>>,
    /// The forward's statistics.
    pub stats: StatsView<'a>,
    /// Where they came from.
    pub source: StatsSource,
    /// The forward's epilogue.
    pub epilogue: NormEpilogue,
    /// Receives the gradient of `x`.
    pub dx: Option<CudaViewMut<'a, T>>,
    /// Receives `sum(dz * xhat)` per channel.
    pub dweight: Option<CudaViewMut<'a, f32>>,
    /// Receives `sum(dz)` per channel.
    pub dbias: Option<CudaViewMut<'a, f32>>,
    /// Add into `dweight` and `dbias` instead of overwriting them.
    pub accumulate: bool,
}

/// Scratch memory of the split reductions and the running update, reused across calls, with
/// [`Workspace`](crate::gpu::Workspace)'s rules: it serves the stream of its first call
/// ([`Error::WorkspaceOnAnotherStream`] on another), and never grows during or after the capture
/// of a CUDA graph ([`Error::WorkspaceCannotGrow`]: run the largest shape once before capturing).
#[derive(Debug, Default)]
pub struct NormWorkspace {
    tenancy: Tenancy,
    floats: Option<CudaSlice<f32>>,
}

impl NormWorkspace {
    /// An empty workspace; the first call that needs scratch allocates it.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sizes the workspace for every [`forward`] and [`backward`] on `desc`: before capturing a
    /// CUDA graph, with the largest shape the graph (and later calls) will run.
    pub fn reserve_for(&mut self, gpu: &GpuContext, desc: &NormDesc) -> Result<()> {
        let plan = row_plan(desc.rows(), desc.row_len(), gpu.sm_count());
        let params = param_plan(desc, gpu.sm_count());
        let largest =
            forward_scratch(desc, plan, true).max(backward_scratch(desc, plan, false, params));
        self.reserve(gpu, largest).map(drop)
    }

    fn reserve(&mut self, gpu: &GpuContext, len: usize) -> Result<&mut CudaSlice<f32>> {
        let held = self.floats.as_ref().map_or(0, |b| b.len());
        self.tenancy.admit(gpu, len > held, 4 * held, 4 * len)?;
        grow(&mut self.floats, gpu.stream(), len)
    }
}

/// Floats of forward scratch: the split partials (3 per row and split), then, with a running
/// update, the per-row variance.
fn forward_scratch(desc: &NormDesc, plan: RowPlan, updating: bool) -> usize {
    let partials = match plan {
        RowPlan::Split { splits } => desc.rows() * splits as usize * 3,
        RowPlan::PerRow { .. } => 0,
    };
    partials + if updating { desc.rows() } else { 0 }
}

/// The backward's row plan: constant statistics need no row sums, so one block per row
/// whatever the length.
fn backward_plan(desc: &NormDesc, plan: RowPlan, constant: bool) -> RowPlan {
    match plan {
        RowPlan::Split { .. } if constant => RowPlan::PerRow {
            blocks: desc.rows().min(kernels::MAX_GRID_X as usize) as u32,
        },
        plan => plan,
    }
}

/// Floats of backward scratch: 2 partials per row and split for `dx`, then (after the `dx`
/// launches have read them) 2 per channel and range for the parameter gradients.
fn backward_scratch(desc: &NormDesc, plan: RowPlan, constant: bool, params: ParamPlan) -> usize {
    let splits = match backward_plan(desc, plan, constant) {
        RowPlan::Split { splits } => splits as usize,
        RowPlan::PerRow { .. } => 1,
    };
    (desc.rows() * splits * 2).max(params.scratch(desc.channels()))
}

/// The parameter gradients' plan for `desc`.
fn param_plan(desc: &NormDesc, sm_count: u32) -> ParamPlan {
    let planes = desc.layout() == crate::Layout::ChannelsFirst && desc.spatial() > 1;
    let values = (desc.batch() * desc.spatial()) as u64;
    ParamPlan::new(desc.channels() as u64, values, planes, sm_count)
}

/// Rows longer than this do not fit the kernels' f32 counts.
const MAX_ROW_LEN: usize = 1 << 24;

fn check_row_len(desc: &NormDesc) -> Result<()> {
    if desc.row_len() >= MAX_ROW_LEN {
        return Err(Error::Unsupported {
            what: "normalization rows",
            reason: format!(
                "{} values per row; the GPU kernels take fewer than 2^24",
                desc.row_len()
            ),
        });
    }
    Ok(())
}

fn check_stats(desc: &NormDesc, lens: [usize; 3]) -> Result<()> {
    buffer("save_mean", desc.rows(), lens[0])?;
    buffer("save_mean_lo", desc.rows(), lens[1])?;
    buffer("save_rstd", desc.rows(), lens[2])
}

fn shape(desc: &NormDesc) -> ShapeParams {
    ShapeParams {
        batch: desc.batch() as u64,
        channels: desc.channels() as u64,
        groups: desc.groups() as u64,
        spatial: desc.spatial() as u64,
        channels_last: i32::from(desc.layout() == crate::Layout::ChannelsLast),
        centered: i32::from(desc.kind().centered()),
    }
}

fn epilogue_code(epilogue: NormEpilogue) -> i32 {
    match epilogue {
        NormEpilogue::None => 0,
        NormEpilogue::Silu => 1,
    }
}

/// Forward on the device (semantics and errors as [`crate::reference::norms::forward`], plus
/// [`Error::Unsupported`] for rows of 2^24 values or more). Queued on the context's stream.
pub fn forward<T: Element>(
    norms: &Norms,
    workspace: &mut NormWorkspace,
    desc: &NormDesc,
    mut call: Forward<'_, T>,
) -> Result<()> {
    ForwardLengths {
        x: call.x.len(),
        y: call.y.len(),
        residual: call
            .residual
            .as_ref()
            .map(|r| (r.residual.len(), r.sum.len())),
        weight: call.weight.as_ref().map(CudaView::len),
        bias: call.bias.as_ref().map(CudaView::len),
        running: match &call.statistics {
            Statistics::Batch => RunningLengths::None,
            Statistics::BatchUpdating {
                running_mean,
                running_var,
                momentum,
            } => RunningLengths::Updating {
                mean: running_mean.len(),
                var: running_var.len(),
                momentum: *momentum,
            },
            Statistics::Running { mean, var } => RunningLengths::Read {
                mean: mean.len(),
                var: var.len(),
            },
        },
        eps: call.eps,
    }
    .check(desc)?;
    check_stats(
        desc,
        [
            call.stats.mean.len(),
            call.stats.mean_lo.len(),
            call.stats.rstd.len(),
        ],
    )?;
    check_row_len(desc)?;
    if desc.rows() == 0 {
        return Ok(());
    }

    let gpu = &norms.gpu;
    let stream = gpu.stream();
    let plan = row_plan(desc.rows(), desc.row_len(), gpu.sm_count());
    let updating = matches!(call.statistics, Statistics::BatchUpdating { .. });
    // The scratch: split partials, then (running update) the per-row variance.
    let row_var_at = forward_scratch(desc, plan, false);
    let scratch = workspace.reserve(gpu, forward_scratch(desc, plan, updating))?;

    let mut statistics = std::mem::take(&mut call.statistics);
    let mut guards = Guards::new(stream);
    let scratch_ptr = guards.write(scratch);
    let x = guards.read(&call.x);
    let (residual, sum) = match &mut call.residual {
        Some(r) => (guards.read(&r.residual), guards.write(&mut r.sum)),
        None => (0, 0),
    };
    let mut params = ForwardParams {
        x,
        residual,
        sum,
        y: guards.write(&mut call.y),
        weight: guards.read_opt(call.weight.as_ref()),
        bias: guards.read_opt(call.bias.as_ref()),
        mean: guards.write(&mut call.stats.mean),
        mean_lo: guards.write(&mut call.stats.mean_lo),
        rstd: guards.write(&mut call.stats.rstd),
        row_var: if updating {
            scratch_ptr + 4 * row_var_at as u64
        } else {
            0
        },
        partials: scratch_ptr,
        shape: shape(desc),
        eps: call.eps,
        epilogue: epilogue_code(call.epilogue),
        splits: match plan {
            RowPlan::Split { splits } => splits as i32,
            RowPlan::PerRow { .. } => 1,
        },
        stats_given: 0,
    };
    let k = &norms.kernels;
    let rows = desc.rows() as u32;
    let per_row = |plan: RowPlan| match plan {
        RowPlan::PerRow { blocks } => Grid::blocks(blocks),
        RowPlan::Split { splits } => Grid::rows_by_splits(rows, splits),
    };

    // SAFETY (every launch below): each buffer was checked against `desc` above, the scratch
    // holds the partials and row variances the plan needs, and `guards` keeps the views
    // borrowed and ordered until the launches are queued.
    match &mut statistics {
        Statistics::Running { mean, var } => {
            let running = RunningParams {
                running_mean: guards.read(mean),
                running_var: guards.read(var),
                mean: params.mean,
                mean_lo: params.mean_lo,
                rstd: params.rstd,
                row_var: 0,
                shape: params.shape,
                eps: call.eps,
                momentum: 0.0,
            };
            params.stats_given = 1;
            unsafe {
                k.running_rows
                    .launch(stream, Grid::flat(desc.rows() as u64), &running)?;
                match plan {
                    RowPlan::PerRow { .. } => {
                        k.forward_row[T::INDEX].launch(stream, per_row(plan), &params)
                    }
                    RowPlan::Split { .. } => {
                        k.apply_split[T::INDEX].launch(stream, per_row(plan), &params)
                    }
                }
            }
        }
        batch => {
            unsafe {
                match plan {
                    RowPlan::PerRow { .. } => {
                        k.forward_row[T::INDEX].launch(stream, per_row(plan), &params)?
                    }
                    RowPlan::Split { .. } => {
                        k.stats_split[T::INDEX].launch(stream, per_row(plan), &params)?;
                        k.apply_split[T::INDEX].launch(stream, per_row(plan), &params)?;
                    }
                }
            }
            if let Statistics::BatchUpdating {
                running_mean,
                running_var,
                momentum,
            } = batch
            {
                let running = RunningParams {
                    running_mean: guards.write(running_mean),
                    running_var: guards.write(running_var),
                    mean: params.mean,
                    mean_lo: params.mean_lo,
                    rstd: params.rstd,
                    row_var: params.row_var,
                    shape: params.shape,
                    eps: call.eps,
                    momentum: *momentum,
                };
                if desc.batch() > 0 {
                    unsafe {
                        k.running_update.launch(
                            stream,
                            Grid::flat(desc.channels() as u64),
                            &running,
                        )?;
                    }
                }
            }
            Ok(())
        }
    }
}

/// Backward on the device (semantics and errors as [`crate::reference::norms::backward`], plus
/// [`Error::Unsupported`] for rows of 2^24 values or more, and for running statistics of
/// anything but instance norm). Queued on the context's stream.
pub fn backward<T: Element>(
    norms: &Norms,
    workspace: &mut NormWorkspace,
    desc: &NormDesc,
    mut call: Backward<'_, T>,
) -> Result<()> {
    let n = desc.numel();
    buffer("x", n, call.x.len())?;
    buffer("dy", n, call.dy.len())?;
    if let Some(dx) = &call.dx {
        buffer("dx", n, dx.len())?;
    }
    check_params(
        desc,
        call.weight.as_ref().map(CudaView::len),
        call.bias.as_ref().map(CudaView::len),
    )?;
    check_stats(
        desc,
        [
            call.stats.mean.len(),
            call.stats.mean_lo.len(),
            call.stats.rstd.len(),
        ],
    )?;
    if call.source == StatsSource::Running {
        check_running(desc, desc.channels(), desc.channels())?;
    }
    for (what, out) in [("dweight", &call.dweight), ("dbias", &call.dbias)] {
        if let Some(out) = out {
            buffer(what, desc.channels(), out.len())?;
        }
    }
    check_row_len(desc)?;
    if desc.rows() == 0 {
        return Ok(());
    }

    let gpu = &norms.gpu;
    let stream = gpu.stream();
    let constant = call.source == StatsSource::Running;
    let batch_plan = row_plan(desc.rows(), desc.row_len(), gpu.sm_count());
    let plan = backward_plan(desc, batch_plan, constant);
    let splits = match plan {
        RowPlan::Split { splits } => splits,
        RowPlan::PerRow { .. } => 1,
    };
    let params_plan = param_plan(desc, gpu.sm_count());
    let scratch = workspace.reserve(
        gpu,
        backward_scratch(desc, batch_plan, constant, params_plan),
    )?;

    let mut guards = Guards::new(stream);
    let partials = guards.write(scratch);
    let x = guards.read(&call.x);
    let params = BackwardParams {
        x,
        dy: guards.read(&call.dy),
        dx: guards.write_opt(call.dx.as_mut()),
        weight: guards.read_opt(call.weight.as_ref()),
        bias: guards.read_opt(call.bias.as_ref()),
        mean: guards.read(&call.stats.mean),
        mean_lo: guards.read(&call.stats.mean_lo),
        rstd: guards.read(&call.stats.rstd),
        dweight: guards.write_opt(call.dweight.as_mut()),
        dbias: guards.write_opt(call.dbias.as_mut()),
        partials,
        shape: shape(desc),
        epilogue: epilogue_code(call.epilogue),
        splits: splits as i32,
        constant_stats: i32::from(constant),
        accumulate: i32::from(call.accumulate),
    };
    let k = &norms.kernels;
    // SAFETY (all launches): every buffer was checked against `desc` above, the scratch holds
    // the partials of the plan, and `guards` keeps the views borrowed until they are queued.
    unsafe {
        if params.dx != 0 {
            match plan {
                RowPlan::PerRow { blocks } => {
                    k.backward_row[T::INDEX].launch(stream, Grid::blocks(blocks), &params)?
                }
                RowPlan::Split { splits } => {
                    let grid = Grid::rows_by_splits(desc.rows() as u32, splits);
                    k.backward_split[T::INDEX].launch(stream, grid, &params)?;
                    k.dx_split[T::INDEX].launch(stream, grid, &params)?;
                }
            }
        }
        if params.dweight != 0 || params.dbias != 0 {
            // The same scratch as dx's partials, which the launches above have read (stream order).
            let params = BackwardParams {
                splits: params_plan.splits as i32,
                ..params
            };
            k.param_grads[T::INDEX].launch(stream, params_plan.grid, &params)?;
            if params_plan.splits > 1 {
                let grid = Grid::flat(desc.channels() as u64);
                k.param_grads_merge.launch(stream, grid, &params)?;
            }
        }
    }
    Ok(())
}

/// Which of the three kernel instantiations serves `T`.
trait DtypeIndex {
    const INDEX: usize;
}

impl<T: Element> DtypeIndex for T {
    const INDEX: usize = match T::DTYPE {
        crate::DType::F32 => 0,
        crate::DType::F16 => 1,
        crate::DType::BF16 => 2,
    };
}
