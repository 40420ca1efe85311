//! Synchronized batch norm across data-parallel ranks on the GPU: each rank holds a shard of the
//! batch (split along `N`) and normalizes with the statistics of the whole batch.
//!
//! The device-side steps are plain functions over device buffers, usable without NCCL (shards on
//! one device, or any transport the caller has); with the `nccl` feature, `SyncBatchNorm` runs
//! them around NCCL collectives, with the interface of [`BatchNorm`](super::BatchNorm). The CPU
//! oracle is [`crate::reference::sync`].
//!
//! | step (per rank) | function | collective between the steps |
//! | --- | --- | --- |
//! | forward: `(count, mean, mean_lo, m2)` of the shard, `[C][4]` f32 | [`local_moments`] | all-gather into `[R][C][4]` |
//! | forward: merge in rank order, running update with the global count, normalize | [`forward_training`] | |
//! | backward: `(sum dy, sum dy * xhat)` of the shard, `[2][C]` f32 | [`local_grad_sums`] | all-reduce (sum) |
//! | backward: coefficients with the global count, `dx` | [`backward_training`] | |
//!
//! # Semantics
//! PyTorch's `nn.SyncBatchNorm`, with apex's exchange: ranks exchange moments, not `invstd`
//! (PyTorch rebuilds the variance as `1/invstd^2 - eps`, which loses precision), and every rank
//! merges the `R` moments with Chan's formula in double, in rank order, so every rank computes
//! bitwise the same statistics (and a world of one reproduces [`functional::forward_training`]
//! bit for bit). Ranks with an empty shard send `(0, 0, 0, 0)`, an exact identity of the merge, and must still call every collective (or the
//! others wait forever). The running statistics use the global count `M` (`M / (M - 1)`).
//! `dweight` and `dbias` are the rank's own sums, as in PyTorch: data-parallel training
//! all-reduces parameter gradients itself, and the sum over the ranks is the single-device
//! gradient. Eval mode does not synchronize.
//!
//! **One value per channel.** Only the device sees `M` (the host knows its own count; learning
//! the others' would cost a device-to-host copy and a stall every step). As in PyTorch, the host
//! refuses a shard of one value per channel only in a world of one rank
//! ([`Error::SingleValuePerChannel`]). The merge kernel, which sees every count, handles the
//! rest: `M == 0` (every shard empty) leaves the running statistics as they are, like an empty
//! batch; `M == 1` also leaves them (PyTorch writes NaN, `0 / 0`, into `running_var` there) and
//! normalizes to `bias`. It writes `M` to a one-element buffer the backward reads;
//! `SyncBatchNorm::last_global_count` reads it on the host for callers that want to refuse
//! `M == 1`.
//!
//! **Precision.** Each rank's mean travels as two floats, `hi + lo` (a double-float, exact sum of
//! its per-channel pivot and shifted mean), and the merge runs in double, so the deltas between
//! rank means carry no f32 rounding of the mean: a large mean next to a small spread costs
//! nothing, even with one value per shard. The merged mean is saved as `save_mean + save_mean_lo`
//! and every rank's normalize and backward use both. Counts travel as f32 (exact below 2^24 values per channel and rank) and are summed in 64-bit
//! integers on the device. The backward all-reduce adds in NCCL's order (the same result on
//! every rank, not a fixed rank order).
//!
//! # Scaling to many nodes: what crosses the network per step
//! Per batch-norm layer with `C` channels, `R` ranks, f32 (`16 C` bytes of moments per rank):
//!
//! | collective | each rank contributes | each rank receives | ring steps |
//! | --- | --- | --- | --- |
//! | forward all-gather of `(count, mean, mean_lo, m2)` | `16 C` bytes | `16 C (R - 1)` bytes | `R - 1` |
//! | backward all-reduce of `(sum dy, sum dy * xhat)` | `8 C` bytes | `8 C` bytes (a ring moves `2 (R-1)/R * 8 C` each way) | `2 (R - 1)`, or `2 log R` as a tree |
//!
//! For ResNet-50 (53 batch norms, `sum C = 26 560`): `425 KB` of moments per rank per step,
//! so the all-gather delivers `3.0 MB` to each rank at `R = 8` and `217 MB` at `R = 512`, and
//! the backward all-reduces `212 KB`. Next to the `~100 MB` gradient all-reduce of the same
//! model that is nothing at a few ranks, but the all-gather grows as `O(R C)` where an
//! all-reduce would stay `O(C)`: this is the price of the fixed-order merge. At a few nodes the
//! cost is latency, not bandwidth: two collectives per layer (106 per ResNet-50 step), each a
//! few KB, each on the critical path, each costing NCCL's launch latency plus `R - 1` ring hops
//! for the all-gather. The usual remedy is the one PyTorch users apply: synchronize within a
//! group (one node, 8 GPUs over NVLink) rather than the whole job. `SyncBatchNorm` takes any
//! communicator, so a per-node communicator (its own `unique_id` per node) is such a group.
//!
//! # Overlap: what the implementation does
//! Every step is queued on the layer's stream (NCCL on the communicator's stream, ordered by
//! cudarc's events when they differ); nothing synchronizes the host, so the host keeps
//! queuing later layers and the GPU never waits for it. Within a layer nothing can overlap the
//! collective: the normalize needs the global statistics, and `dx` needs the global sums. The
//! NCCL kernels take a few SMs and overlap whatever other streams run, e.g. the data-parallel
//! gradient all-reduce of layers already done in the backward. Not implemented: grouping the
//! collectives of independent batch norms (a ResNet block's downsample and main branch) into
//! one `ncclGroupStart/End` to pay one latency for two; sending the count once per rank
//! instead of per channel (`12 C + 4` bytes instead of `16 C`); an `O(C)` all-reduce of
//! pivot-shifted sums for very large `R`, at the cost of the fixed merge order.

use super::context::GpuContext;
use super::functional::{
    self, index_width, launch, launch_elementwise, pick, GradientsMut, Guards, Normalization,
    RunningUpdate, SavedStats, SavedStatsMut,
};
use super::kernels::{Family, Scalar};
use super::launch as shapes;
use super::params::{
    BackwardElementwiseParams, NormalizeParams, SyncCoefficientsParams, SyncMergeParams,
    SyncMomentsParams,
};
use super::workspace::Workspace;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::gpu::functional::RunningParts;
use crate::shape::TensorDesc;
use crate::validate::{self, validate_eps, validate_momentum, Buffers};
use cudarc::driver::{CudaView, CudaViewMut};

#[cfg(feature = "nccl")]
mod nccl;
#[cfg(feature = "nccl")]
pub use nccl::{communicator, unique_id, SyncBatchNorm};

/// Floats per channel in a rank's moments: `(count, mean, mean_lo, m2)`, the mean as the exact
/// sum `mean + mean_lo` of two floats.
pub const MOMENT_FLOATS: usize = 4;

/// Floats per channel and split in the moments reduction's workspace: `(mean, m2, count)`.
const PARTIAL_FLOATS: usize = 3;

/// Every rank's moments after the all-gather: `[R][C][4]` f32, rank-major, rank `r`'s
/// [`local_moments`] at `[r]`.
#[derive(Debug)]
pub struct GatheredMoments<'a> {
    /// The `R * C * 4` floats.
    pub moments: CudaView<'a, f32>,
    /// Number of ranks `R` (at least 1).
    pub ranks: usize,
}

/// The backward sums, `[2][C]` f32 each: `sum(dy)` per channel, then `sum(dy * xhat)`.
#[derive(Debug)]
pub struct ReducedSums<'a> {
    /// This rank's, from [`local_grad_sums`]: they become its `dweight` and `dbias`.
    pub local: CudaView<'a, f32>,
    /// Summed over every rank (the all-reduce of the `local` sums): they give `dx`.
    pub global: CudaView<'a, f32>,
}

/// The `(count, mean, mean_lo, m2)` of each channel of this rank's shard `x` into `moments` (`[C][4]`),
/// one split-reduction launch (bn_stats' reduction, including its per-channel pivot). An empty
/// shard writes zeros (the identity of the merge) and a shard may hold a single value per
/// channel.
///
/// Errors: [`Error::BufferLength`] (`moments` needs `4 C`).
pub fn local_moments<T: Element>(
    gpu: &GpuContext,
    workspace: &mut Workspace,
    x: &CudaView<'_, T>,
    desc: &TensorDesc,
    moments: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    Buffers {
        x: x.len(),
        ..Default::default()
    }
    .check(desc)?;
    let c = desc.channels();
    validate::buffer("moments", MOMENT_FLOATS * c, moments.len())?;
    let stream = gpu.stream();
    if desc.numel() == 0 {
        stream.memset_zeros(moments)?;
        return Ok(());
    }
    let g = desc.geometry();
    let reduce = shapes::reduction(&g, T::DTYPE, gpu.sm_count());
    let scratch = workspace.reserve(gpu, PARTIAL_FLOATS * c * reduce.splits as usize, c)?;
    let mut guards = Guards::new(stream);
    let params = SyncMomentsParams {
        x: guards.read(x),
        partials: guards.write(scratch.partials),
        semaphores: guards.write(scratch.semaphores),
        moments: guards.write(moments),
        g: g.into(),
        splits: reduce.splits as i32,
    };
    let family = pick(&g, Family::SyncMomentsPlanar, Family::SyncMomentsRows);
    let function = gpu.kernels().get(family, T::DTYPE, index_width(desc));
    launch(stream, function, reduce, &params)
}

/// Checks a synchronized training forward's arguments, in the order of
/// [`functional::forward_training`], then the gathered moments and `total`. The layer calls it
/// before the first collective, so a refused call leaves the communicator unused.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_forward(
    x: usize,
    y: usize,
    desc: &TensorDesc,
    weight: Option<usize>,
    bias: Option<usize>,
    running: Option<(usize, usize, f32)>,
    saved: (usize, usize, usize),
    eps: f32,
    gathered: (usize, usize),
    total: usize,
) -> Result<()> {
    Buffers {
        x,
        y: Some(y),
        weight,
        bias,
        running_mean: running.map(|r| r.0),
        running_var: running.map(|r| r.1),
        save_mean: Some(saved.0),
        save_mean_lo: Some(saved.1),
        save_invstd: Some(saved.2),
        ..Default::default()
    }
    .check(desc)?;
    validate_eps(eps)?;
    if let Some((_, _, factor)) = running {
        validate_momentum(factor)?;
    }
    let (len, ranks) = gathered;
    if ranks == 0 {
        return Err(Error::Unsupported {
            what: "synchronized batch norm",
            reason: "the world needs at least one rank".into(),
        });
    }
    let per_rank = MOMENT_FLOATS * desc.channels();
    validate::buffer("gathered", ranks.saturating_mul(per_rank), len)?;
    validate::buffer("total", 1, total)
}

/// One rank's training forward once the moments are gathered: merges `gathered` in rank order
/// (writing `saved`, the running update with the global count `M`, and `M` into `total`), then
/// normalizes the shard `x` into `y`. Two launches; an empty shard skips the second.
///
/// Buffers as in [`functional::forward_training`]; `total` holds one `u64`. See the module docs
/// for `M < 2`.
///
/// Errors, before anything is queued: [`Error::BufferLength`], [`Error::InvalidEps`],
/// [`Error::InvalidMomentum`], [`Error::Unsupported`] for `R == 0`.
#[allow(clippy::too_many_arguments)]
pub fn forward_training<T: Element>(
    gpu: &GpuContext,
    x: &CudaView<'_, T>,
    desc: &TensorDesc,
    weight: Option<&CudaView<'_, f32>>,
    bias: Option<&CudaView<'_, f32>>,
    running: Option<RunningUpdate<'_>>,
    eps: f32,
    gathered: &GatheredMoments<'_>,
    y: &mut CudaViewMut<'_, T>,
    saved: SavedStatsMut<'_>,
    total: &mut CudaViewMut<'_, u64>,
) -> Result<()> {
    check_forward(
        x.len(),
        y.len(),
        desc,
        weight.map(|w| w.len()),
        bias.map(|b| b.len()),
        running
            .as_ref()
            .map(|r| (r.mean.len(), r.var.len(), r.factor)),
        (saved.mean.len(), saved.mean_lo.len(), saved.invstd.len()),
        eps,
        (gathered.moments.len(), gathered.ranks),
        total.len(),
    )?;
    let c = desc.channels();
    let stream = gpu.stream();
    let mut running = RunningParts::of(running);
    let SavedStatsMut {
        mut mean,
        mut mean_lo,
        mut invstd,
    } = saved;
    let mut guards = Guards::new(stream);
    let merge = SyncMergeParams {
        gathered: guards.read(&gathered.moments),
        save_mean: guards.write(&mut mean),
        save_mean_lo: guards.write(&mut mean_lo),
        save_invstd: guards.write(&mut invstd),
        running_mean: guards.write_opt(running.mean.as_mut()),
        running_var: guards.write_opt(running.var.as_mut()),
        total: guards.write(total),
        ranks: gathered.ranks as u64,
        channels: c as u64,
        eps,
        factor: running.factor,
        unbiased: running.unbiased,
    };
    let function = gpu.kernels().scalar(Scalar::SyncMerge);
    launch(
        stream,
        function,
        shapes::flat(c as u64, gpu.sm_count()),
        &merge,
    )?;
    if desc.numel() == 0 {
        return Ok(());
    }
    let normalize = NormalizeParams {
        x: guards.read(x),
        y: guards.write(y),
        mean: merge.save_mean,
        mean_lo: merge.save_mean_lo,
        var_or_invstd: merge.save_invstd,
        weight: guards.read_opt(weight),
        bias: guards.read_opt(bias),
        g: desc.geometry().into(),
        eps,
        stat_is_var: 0,
    };
    launch_elementwise::<T, _>(
        gpu,
        desc,
        Family::NormalizePlanar,
        Family::NormalizeRows,
        &normalize,
    )
}

/// This rank's `sum(dy)` and `sum(dy * xhat)` per channel into `sums` (`[2][C]`), `xhat` from the
/// `saved` (global) statistics: the backward's split reduction (one launch), or zeros for an
/// empty shard.
///
/// Errors: [`Error::BufferLength`] (`sums` needs `2 C`).
pub fn local_grad_sums<T: Element>(
    gpu: &GpuContext,
    workspace: &mut Workspace,
    x: &CudaView<'_, T>,
    dy: &CudaView<'_, T>,
    desc: &TensorDesc,
    saved: &SavedStats<'_>,
    sums: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    check_sums(x, dy, desc, saved, sums.len())?;
    let (sum_dy, sum_dy_xhat) = sums.split_at_mut(desc.channels());
    let stats = Normalization {
        mean: &saved.mean,
        mean_lo: saved.mean_lo.as_ref(),
        var_or_invstd: &saved.invstd,
        eps: 0.0,
        training: true,
    };
    // The reduce writes dbias = sum(dy) and dweight = invstd * sum(dy * (x - mean)).
    let grads = GradientsMut {
        dx: None,
        dweight: Some(sum_dy_xhat),
        dbias: Some(sum_dy),
        accumulate: false,
    };
    functional::backward(gpu, workspace, x, dy, desc, None, &stats, grads, None)
}

fn check_sums<T>(
    x: &CudaView<'_, T>,
    dy: &CudaView<'_, T>,
    desc: &TensorDesc,
    saved: &SavedStats<'_>,
    sums: usize,
) -> Result<()> {
    Buffers {
        x: x.len(),
        dy: Some(dy.len()),
        save_mean: Some(saved.mean.len()),
        save_mean_lo: saved.mean_lo.as_ref().map(|lo| lo.len()),
        save_invstd: Some(saved.invstd.len()),
        ..Default::default()
    }
    .check(desc)?;
    validate::buffer("sums", 2 * desc.channels(), sums)
}

/// One rank's training backward once the sums are all-reduced: coefficients
/// `(global sum dy / M, global sum dy * xhat / M)` with `M` from `total` (written by
/// [`forward_training`]), `dweight`/`dbias` = (or += when `grads.accumulate`) this rank's `local`
/// sums, then `dx = weight * invstd * (dy - coef0 - xhat * coef1)` for the shard (the
/// backward's elementwise kernel). Two launches; an empty shard skips the second.
///
/// Buffers as in [`functional::backward_training`]; `sums.local`, `sums.global` hold `2 C`
/// floats, `total` one `u64`.
///
/// Errors, before anything is queued: [`Error::BufferLength`].
#[allow(clippy::too_many_arguments)]
pub fn backward_training<T: Element>(
    gpu: &GpuContext,
    workspace: &mut Workspace,
    x: &CudaView<'_, T>,
    dy: &CudaView<'_, T>,
    desc: &TensorDesc,
    weight: Option<&CudaView<'_, f32>>,
    saved: &SavedStats<'_>,
    sums: &ReducedSums<'_>,
    total: &CudaView<'_, u64>,
    grads: GradientsMut<'_, T>,
) -> Result<()> {
    check_backward(x, dy, desc, weight, saved, sums, total.len(), &grads)?;
    let GradientsMut {
        mut dx,
        mut dweight,
        mut dbias,
        accumulate,
    } = grads;
    let c = desc.channels();
    let stream = gpu.stream();
    let scratch = workspace.reserve(gpu, 0, c)?;
    let mut guards = Guards::new(stream);
    let coefficients = SyncCoefficientsParams {
        local: guards.read(&sums.local),
        global: guards.read(&sums.global),
        total: guards.read(total),
        coef: guards.write(scratch.coef),
        dweight: guards.write_opt(dweight.as_mut()),
        dbias: guards.write_opt(dbias.as_mut()),
        channels: c as u64,
        accumulate: accumulate as i32,
    };
    let function = gpu.kernels().scalar(Scalar::SyncCoefficients);
    launch(
        stream,
        function,
        shapes::flat(c as u64, gpu.sm_count()),
        &coefficients,
    )?;
    let Some(dx) = dx.as_mut().filter(|_| desc.numel() > 0) else {
        return Ok(());
    };
    let params = BackwardElementwiseParams {
        x: guards.read(x),
        dy: guards.read(dy),
        dx: guards.write(dx),
        mean: guards.read(&saved.mean),
        mean_lo: guards.read_opt(saved.mean_lo.as_ref()),
        var_or_invstd: guards.read(&saved.invstd),
        weight: guards.read_opt(weight),
        coef: coefficients.coef,
        g: desc.geometry().into(),
        eps: 0.0,
        stat_is_var: 0,
    };
    launch_elementwise::<T, _>(
        gpu,
        desc,
        Family::BackwardDxPlanar,
        Family::BackwardDxRows,
        &params,
    )
}

/// Checks [`backward_training`]'s arguments (the layer calls it before the all-reduce).
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_backward<T>(
    x: &CudaView<'_, T>,
    dy: &CudaView<'_, T>,
    desc: &TensorDesc,
    weight: Option<&CudaView<'_, f32>>,
    saved: &SavedStats<'_>,
    sums: &ReducedSums<'_>,
    total: usize,
    grads: &GradientsMut<'_, T>,
) -> Result<()> {
    Buffers {
        x: x.len(),
        dy: Some(dy.len()),
        dx: grads.dx.as_ref().map(|d| d.len()),
        weight: weight.map(|w| w.len()),
        save_mean: Some(saved.mean.len()),
        save_mean_lo: saved.mean_lo.as_ref().map(|lo| lo.len()),
        save_invstd: Some(saved.invstd.len()),
        dweight: grads.dweight.as_ref().map(|d| d.len()),
        dbias: grads.dbias.as_ref().map(|d| d.len()),
        ..Default::default()
    }
    .check(desc)?;
    let c = desc.channels();
    validate::buffer("sums.local", 2 * c, sums.local.len())?;
    validate::buffer("sums.global", 2 * c, sums.global.len())?;
    validate::buffer("total", 1, total)
}
