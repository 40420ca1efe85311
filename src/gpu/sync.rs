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
//! | forward: merge in rank order, running update with the global count, normalize | [`forward_training`] (a [`functional::Forward`](super::functional::Forward) request) | |
//! | backward: `(sum dy, sum dy * xhat)` of the shard, `[2][C]` f32 | [`local_grad_sums`] | all-reduce (sum) |
//! | backward: coefficients with the global count, `dx` | [`backward_training`] | |
//!
//! # Semantics
//! PyTorch's `nn.SyncBatchNorm`, with apex's exchange: ranks exchange moments, not `invstd`
//! (PyTorch rebuilds the variance as `1/invstd^2 - eps`, which loses precision), and every rank
//! merges the `R` moments with Chan's formula in double, in rank order, so every rank computes
//! bitwise the same statistics (and a world of one reproduces
//! [`functional::forward`](super::functional::forward) bit for bit). Ranks with an empty shard
//! send `(0, 0, 0, 0)`, an exact identity of the merge, and must still call every collective (or
//! the others wait forever). The running statistics use the global count `M` (`M / (M - 1)`).
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
//! and every rank's normalize and backward use both. Counts travel as f32 (exact below 2^24
//! values per channel and rank) and are summed in 64-bit integers on the device. The backward all-reduce adds in NCCL's order (the same result on
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
use super::functional::{Forward, ForwardStats};
use super::ops::{self, GlobalSums, Gradient, Merge, Normalization, Normalize, ParamSums};
use super::views::{EpilogueGrad, GradientsMut, SavedStats};
use super::workspace::Workspace;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::shape::TensorDesc;
use crate::validate::{self, Buffers};
use cudarc::driver::{CudaView, CudaViewMut};

#[cfg(feature = "nccl")]
mod nccl;
#[cfg(feature = "nccl")]
pub use nccl::{communicator, unique_id, SyncBatchNorm};

pub use super::views::MOMENT_FLOATS;

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

/// The `(count, mean, mean_lo, m2)` of each channel of this rank's shard `x` into `moments`
/// (`[C][4]`),
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
    validate::buffer("moments", MOMENT_FLOATS * desc.channels(), moments.len())?;
    if desc.numel() == 0 {
        gpu.stream().memset_zeros(moments)?;
        return Ok(());
    }
    ops::sync_moments(gpu, workspace, desc, x, moments)
}

/// Checks a synchronized training forward in the order of
/// [`functional::forward`](super::functional::forward) (without its one-value-per-channel check:
/// only the merge sees the global count), then the gathered moments (`gathered` floats for
/// `ranks` ranks) and `total`. The layer calls it before the first collective, so a refused
/// call leaves the communicator unused.
///
/// Errors: [`Error::Unsupported`] for [`ForwardStats::Running`] (eval mode does not
/// synchronize: [`functional::forward`](super::functional::forward) serves it) or `R == 0`,
/// [`Error::BufferLength`], [`Error::InvalidEps`], [`Error::InvalidMomentum`].
pub(crate) fn check_forward<T>(
    request: &Forward<'_, T>,
    total: usize,
    gathered: usize,
    ranks: usize,
) -> Result<()> {
    if let ForwardStats::Running { .. } = request.stats {
        return Err(eval_does_not_synchronize());
    }
    request.check()?;
    if ranks == 0 {
        return Err(Error::Unsupported {
            what: "synchronized batch norm",
            reason: "the world needs at least one rank".into(),
        });
    }
    let per_rank = MOMENT_FLOATS * request.desc.channels();
    validate::buffer("gathered", ranks.saturating_mul(per_rank), gathered)?;
    validate::buffer("total", 1, total)
}

fn eval_does_not_synchronize() -> Error {
    Error::Unsupported {
        what: "synchronized batch norm",
        reason: "eval mode normalizes with the running statistics and does not synchronize: use \
                 functional::forward"
            .into(),
    }
}

/// One rank's training forward once the moments are gathered: merges `gathered` in rank order
/// (writing the request's saved statistics, the running update with the global count `M`, and
/// `M` into `total`, one `u64` that [`backward_training`] reads), then normalizes the shard
/// `x` into `y`, with the request's epilogue. Two launches; an empty shard skips the second.
/// `request.stats` is [`ForwardStats::Batch`]. See the module docs for `M < 2`.
///
/// Errors, before anything is queued: [`Error::Unsupported`] for [`ForwardStats::Running`]
/// (eval mode does not synchronize) or `R == 0`; those of
/// [`functional::forward`](super::functional::forward) but for one value per channel
/// ([`Error::BufferLength`], [`Error::InvalidEps`], [`Error::InvalidMomentum`]); then
/// [`Error::BufferLength`] for `gathered` and `total`.
pub fn forward_training<T: Element>(
    gpu: &GpuContext,
    request: Forward<'_, T>,
    mut total: CudaViewMut<'_, u64>,
    gathered: &GatheredMoments<'_>,
) -> Result<()> {
    check_forward(
        &request,
        total.len(),
        gathered.moments.len(),
        gathered.ranks,
    )?;
    let Forward {
        desc,
        x,
        weight,
        bias,
        stats,
        mut y,
        mut epilogue,
    } = request;
    let ForwardStats::Batch(mut stats) = stats else {
        return Err(eval_does_not_synchronize());
    };
    let merge = Merge {
        gathered: gathered.moments.slice(..),
        ranks: gathered.ranks,
        channels: desc.channels(),
        total: total.slice_mut(..),
    };
    ops::sync_merge(gpu, merge, &mut stats)?;
    if desc.numel() == 0 {
        return Ok(());
    }
    let saved = SavedStats {
        mean: stats.saved.mean.as_view(),
        mean_lo: Some(stats.saved.mean_lo.as_view()),
        invstd: stats.saved.invstd.as_view(),
    };
    let op = Normalize {
        desc: &desc,
        x: &x,
        weight: weight.as_ref(),
        bias: bias.as_ref(),
        stats: Normalization::Batch(&saved),
    };
    ops::normalize(gpu, &op, &mut y, &mut epilogue)
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
    Buffers {
        x: x.len(),
        dy: Some(dy.len()),
        ..saved.buffers()
    }
    .check(desc)?;
    validate::buffer("sums", 2 * desc.channels(), sums.len())?;
    let (sum_dy, sum_dy_xhat) = sums.split_at_mut(desc.channels());
    let op = Gradient {
        desc,
        x,
        dy,
        weight: None,
        stats: Normalization::Batch(saved),
    };
    // The reduce writes dbias = sum(dy) and dweight = invstd * sum(dy * (x - mean)).
    let grads = GradientsMut {
        dx: None,
        dweight: Some(sum_dy_xhat),
        dbias: Some(sum_dy),
        accumulate: false,
    };
    ops::backward(gpu, workspace, &op, grads, &mut EpilogueGrad::None)
}

/// One rank's synchronized training backward, once the sums are all-reduced.
#[derive(Debug)]
pub struct SyncBackward<'a, T> {
    /// Shape and memory order of this rank's shard `x`, `dy` and `dx`.
    pub desc: TensorDesc,
    /// The shard, `desc.numel()` elements.
    pub x: CudaView<'a, T>,
    /// The gradient of the forward's output, `desc.numel()` elements.
    pub dy: CudaView<'a, T>,
    /// `[C]`, or `None` for 1.
    pub weight: Option<CudaView<'a, f32>>,
    /// The global statistics [`forward_training`] saved.
    pub saved: SavedStats<'a>,
    /// The global count `M` [`forward_training`] wrote (one `u64`).
    pub total: CudaView<'a, u64>,
    /// Which gradients to write; `dweight` and `dbias` are this rank's.
    pub grads: GradientsMut<'a, T>,
}

impl<T> SyncBackward<'_, T> {
    /// Checks the request, then the sums' lengths (the layer calls it before the all-reduce).
    pub(crate) fn check(&self, local: usize, global: usize) -> Result<()> {
        let grads = &self.grads;
        Buffers {
            x: self.x.len(),
            dy: Some(self.dy.len()),
            dx: grads.dx.as_ref().map(|d| d.len()),
            weight: self.weight.as_ref().map(|w| w.len()),
            dweight: grads.dweight.as_ref().map(|d| d.len()),
            dbias: grads.dbias.as_ref().map(|d| d.len()),
            ..self.saved.buffers()
        }
        .check(&self.desc)?;
        let c = self.desc.channels();
        validate::buffer("sums.local", 2 * c, local)?;
        validate::buffer("sums.global", 2 * c, global)?;
        validate::buffer("total", 1, self.total.len())
    }
}

/// One rank's training backward once the sums are all-reduced: coefficients
/// `(global sum dy / M, global sum dy * xhat / M)` with `M` from `total`, `dweight`/`dbias` =
/// (or += when `grads.accumulate`) this rank's `local` sums, then
/// `dx = weight * invstd * (dy - coef0 - xhat * coef1)` for the shard (the backward's
/// elementwise kernel). Two launches; an empty shard skips the second.
///
/// Errors, before anything is queued: [`Error::BufferLength`] (`sums.local` and `sums.global`
/// hold `2 C` floats).
pub fn backward_training<T: Element>(
    gpu: &GpuContext,
    workspace: &mut Workspace,
    request: SyncBackward<'_, T>,
    sums: &ReducedSums<'_>,
) -> Result<()> {
    request.check(sums.local.len(), sums.global.len())?;
    let SyncBackward {
        desc,
        x,
        dy,
        weight,
        saved,
        total,
        mut grads,
    } = request;
    let c = desc.channels();
    let scratch = workspace.reserve(gpu, 0, c)?;
    let global = GlobalSums {
        local: &sums.local,
        global: &sums.global,
        total: &total,
        channels: c,
    };
    let params = ParamSums {
        dweight: grads.dweight.as_mut(),
        dbias: grads.dbias.as_mut(),
        accumulate: grads.accumulate,
    };
    ops::sync_coefficients(gpu, global, scratch.coef, params)?;
    if desc.numel() == 0 || grads.dx.is_none() {
        return Ok(());
    }
    let op = Gradient {
        desc: &desc,
        x: &x,
        dy: &dy,
        weight: weight.as_ref(),
        stats: Normalization::Batch(&saved),
    };
    let dx = grads.dx.as_mut();
    ops::backward_dx(gpu, workspace.coef(), &op, dx, &mut EpilogueGrad::None)
}
