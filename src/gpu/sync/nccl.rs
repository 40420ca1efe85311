//! The NCCL glue (feature `nccl`): communicators and the [`SyncBatchNorm`] layer.

use super::{
    backward_training, check_forward, forward_training, local_grad_sums, local_moments,
    GatheredMoments, ReducedSums, SyncBackward, MOMENT_FLOATS,
};
use crate::config::BatchNormConfig;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::fold::FoldSpec;
use crate::gpu::context::{alloc_error, GpuContext};
use crate::gpu::functional::{Forward, ForwardStats};
use crate::gpu::layer::{BatchNorm, ForwardCache};
use crate::gpu::views::{BackwardStats, Epilogue, GradientsMut};
use crate::shape::TensorDesc;
use crate::state::LayerState;
use crate::stats::SavedStats as SavedStatsHost;
use crate::validate;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DeviceRepr, ValidAsZeroBits};
use cudarc::nccl::{result::NcclError, Comm, Id, ReduceOp};
use std::rc::Rc;
use std::sync::Arc;

/// Maps an NCCL failure of `call` to [`Error::Nccl`].
fn nccl_error(call: &'static str) -> impl Fn(NcclError) -> Error {
    move |e| Error::Nccl {
        call,
        reason: format!("{:?}", e.0),
    }
}

/// libnccl is loaded on first use, and cudarc panics when it is missing: ask first.
fn require_nccl(call: &'static str) -> Result<()> {
    if crate::gpu::context::loadable(&["libnccl.so"]) {
        Ok(())
    } else {
        Err(Error::Nccl {
            call,
            reason: "libnccl could not be loaded (cudarc looks for libnccl.so: link it to NCCL's \
                     libnccl.so.2 in a directory on LD_LIBRARY_PATH)"
                .into(),
        })
    }
}

/// A new NCCL unique id. Rank 0 creates it and sends its 128 bytes
/// ([`Id::internal`]) to every other rank by any means (a file, a TCP socket, MPI); they rebuild
/// it with [`Id::uninit`] and pass it to [`communicator`].
///
/// Errors: [`Error::Nccl`], also when libnccl cannot be loaded.
pub fn unique_id() -> Result<Id> {
    require_nccl("ncclGetUniqueId")?;
    Id::new().map_err(nccl_error("ncclGetUniqueId"))
}

/// This process's communicator in a world of `world_size` ranks, as rank `rank`, on `gpu`'s
/// device and stream (`ncclCommInitRank`: blocks until every rank has joined). Share it between
/// all the layers of a model with [`Rc`].
///
/// Errors: [`Error::Unsupported`] unless `rank < world_size`; [`Error::Nccl`].
pub fn communicator(gpu: &GpuContext, rank: usize, world_size: usize, id: Id) -> Result<Rc<Comm>> {
    if rank >= world_size || i32::try_from(world_size).is_err() {
        return Err(Error::Unsupported {
            what: "communicator",
            reason: format!("rank {rank} in a world of {world_size} ranks"),
        });
    }
    require_nccl("ncclCommInitRank")?;
    let comm = Comm::from_rank(gpu.stream().clone(), rank, world_size, id)
        .map_err(nccl_error("ncclCommInitRank"))?;
    Ok(Rc::new(comm))
}

/// Batch norm with statistics synchronized over the ranks of an NCCL communicator
/// (`nn.SyncBatchNorm`): the interface of [`BatchNorm`], whose state it keeps (parameters and
/// their gradients, running statistics, counter), plus the communicator.
///
/// In training mode a forward runs [`local_moments`], an all-gather of `16 C` bytes per rank,
/// and [`forward_training`] (merge in rank order, running update with the global count,
/// normalize); a backward runs [`local_grad_sums`], an all-reduce of `8 C` bytes, and
/// [`backward_training`]. Every rank must call every training `forward` and `backward`, with
/// an empty shard if it has none, or the others wait forever. Eval mode is local, as in
/// PyTorch. Parameter gradients are this rank's own (see the [module docs](super)).
///
/// Steady-state calls neither allocate nor synchronize the host. Not `Send`: the communicator
/// belongs to the thread that drives its device.
#[derive(Debug)]
pub struct SyncBatchNorm {
    bn: BatchNorm,
    comm: Rc<Comm>,
    /// `[C][3]`: this rank's moments, sent by the all-gather.
    moments: CudaSlice<f32>,
    /// `[R][C][3]`: every rank's moments.
    gathered: CudaSlice<f32>,
    /// `[2][C]`: this rank's backward sums, sent by the all-reduce.
    sums: CudaSlice<f32>,
    /// `[2][C]`: the sums over every rank.
    reduced: CudaSlice<f32>,
    /// `[1]`: the global count `M` of the latest synchronized forward.
    total: CudaSlice<u64>,
    /// Whether the layer's latest forward was synchronized (training mode).
    synced: bool,
}

impl SyncBatchNorm {
    /// A layer on `gpu`'s device in training mode with PyTorch's initial values, synchronized
    /// over `comm` (whose device must be `gpu`'s).
    ///
    /// Errors: those of [`BatchNorm::new`]; [`Error::Unsupported`] when `comm` belongs to another
    /// CUDA context; [`Error::OutOfMemory`].
    pub fn new(gpu: &GpuContext, config: BatchNormConfig, comm: Rc<Comm>) -> Result<Self> {
        if !Arc::ptr_eq(comm.context(), gpu.cuda()) {
            return Err(Error::Unsupported {
                what: "SyncBatchNorm::new",
                reason: "the communicator belongs to another CUDA context".into(),
            });
        }
        let bn = BatchNorm::new(gpu, config)?;
        let c = config.num_features;
        let zeros = |len: usize| -> Result<CudaSlice<f32>> { device_zeros(gpu, len) };
        Ok(Self {
            moments: zeros(MOMENT_FLOATS * c)?,
            gathered: zeros(
                MOMENT_FLOATS
                    .saturating_mul(c)
                    .saturating_mul(comm.world_size()),
            )?,
            sums: zeros(2 * c)?,
            reduced: zeros(2 * c)?,
            total: device_zeros(gpu, 1)?,
            bn,
            comm,
            synced: false,
        })
    }

    /// The communicator.
    pub fn comm(&self) -> &Rc<Comm> {
        &self.comm
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Number of ranks `R`.
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// The layer's local state (parameters, gradients, running statistics), read-only.
    pub fn local(&self) -> &BatchNorm {
        &self.bn
    }

    /// The layer's configuration.
    pub fn config(&self) -> &BatchNormConfig {
        self.bn.config()
    }

    /// The context the layer's buffers live in.
    pub fn gpu(&self) -> &GpuContext {
        self.bn.gpu()
    }

    /// Training mode: synchronized batch statistics, running statistics updated.
    pub fn train(&mut self) {
        self.bn.train();
    }

    /// Eval mode: local, with the running statistics (local batch statistics without them).
    pub fn eval(&mut self) {
        self.bn.eval();
    }

    /// Whether the layer is in training mode.
    pub fn is_training(&self) -> bool {
        self.bn.is_training()
    }

    /// Batch-norm forward of this rank's shard `x` (shape and layout `desc`, any `N`) into `y`.
    /// Training mode synchronizes (see the type's docs); eval mode is [`BatchNorm::forward`].
    ///
    /// Errors, before any collective: [`Error::ChannelMismatch`],
    /// [`Error::SingleValuePerChannel`] for one value per channel in a world of one rank, then
    /// those of [`forward_training`]; [`Error::Nccl`].
    pub fn forward<T: Element>(
        &mut self,
        desc: &TensorDesc,
        x: &CudaView<'_, T>,
        y: &mut CudaViewMut<'_, T>,
    ) -> Result<ForwardCache> {
        if !self.bn.is_training() {
            let cache = self.bn.forward(desc, x, y)?;
            self.synced = false;
            return Ok(cache);
        }
        validate::channels(self.bn.config().num_features, desc)?;
        let Self {
            bn,
            comm,
            moments,
            gathered,
            total,
            ..
        } = self;
        // PyTorch's rule: only a world of one rank knows the global count on the host.
        if comm.world_size() == 1 {
            validate::batch_statistics(desc)?;
        }
        bn.batch_forward(|step| {
            let request = Forward {
                desc: *desc,
                x: x.slice(..),
                weight: step.weight,
                bias: step.bias,
                stats: ForwardStats::Batch(step.stats),
                y: y.slice_mut(..),
                epilogue: Epilogue::None,
            };
            check_forward(&request, total.len(), gathered.len(), comm.world_size())?;
            local_moments(
                step.gpu,
                step.workspace,
                x,
                desc,
                &mut moments.as_view_mut(),
            )?;
            comm.all_gather(&*moments, &mut *gathered)
                .map_err(nccl_error("ncclAllGather"))?;
            let gathered = GatheredMoments {
                moments: gathered.as_view(),
                ranks: comm.world_size(),
            };
            forward_training(step.gpu, request, total.as_view_mut(), &gathered)
        })?;
        self.synced = true;
        Ok(self.bn.record_forward(desc, T::DTYPE, true))
    }

    /// Backward of the forward that returned `cache`: writes `dx` when given and adds this
    /// rank's parameter gradients into `grad_weight`/`grad_bias` (when affine). After a
    /// synchronized forward it all-reduces the sums (every rank must call it); after an eval
    /// forward it is [`BatchNorm::backward`].
    ///
    /// Errors, before any collective: [`Error::MissingSavedStats`], [`Error::DTypeMismatch`],
    /// those of [`backward_training`]; [`Error::Nccl`].
    pub fn backward<T: Element>(
        &mut self,
        cache: &ForwardCache,
        x: &CudaView<'_, T>,
        dy: &CudaView<'_, T>,
        dx: Option<CudaViewMut<'_, T>>,
    ) -> Result<()> {
        if !self.synced {
            return self.bn.backward(cache, x, dy, dx);
        }
        let Self {
            bn,
            comm,
            sums,
            reduced,
            total,
            ..
        } = self;
        let step = bn.backward_step::<T>(cache)?;
        let BackwardStats::Batch(saved) = step.stats else {
            return Err(Error::MissingSavedStats {
                reason: "the synchronized forward saved no batch statistics",
            });
        };
        let request = SyncBackward {
            desc: *cache.desc(),
            x: x.slice(..),
            dy: dy.slice(..),
            weight: step.weight,
            saved,
            total: total.as_view(),
            grads: GradientsMut {
                dx,
                dweight: step.dweight,
                dbias: step.dbias,
                accumulate: true,
            },
        };
        request.check(sums.len(), reduced.len())?;
        local_grad_sums(
            step.gpu,
            step.workspace,
            x,
            dy,
            &request.desc,
            &request.saved,
            &mut sums.as_view_mut(),
        )?;
        comm.all_reduce(&*sums, &mut *reduced, &ReduceOp::Sum)
            .map_err(nccl_error("ncclAllReduce"))?;
        let reduced = ReducedSums {
            local: sums.as_view(),
            global: reduced.as_view(),
        };
        backward_training(step.gpu, step.workspace, request, &reduced)
    }

    /// The global count `M` (values per channel over every rank) of the latest synchronized
    /// forward, read from the device (synchronizes the stream); 0 before the first one. `M == 1`
    /// is the case PyTorch cannot train on (see the [module docs](super)).
    pub fn last_global_count(&self) -> Result<u64> {
        Ok(self.bn.gpu().stream().clone_dtoh(&self.total)?[0])
    }

    /// Sets the parameter gradients to zero (PyTorch's `zero_grad`).
    pub fn zero_grad(&mut self) -> Result<()> {
        self.bn.zero_grad()
    }

    /// The number of training forwards that updated the running statistics.
    pub fn num_batches_tracked(&self) -> u64 {
        self.bn.num_batches_tracked()
    }

    /// Sets the counter (see [`BatchNorm::set_num_batches_tracked`]).
    pub fn set_num_batches_tracked(&mut self, value: u64) -> Result<()> {
        self.bn.set_num_batches_tracked(value)
    }

    /// A host copy of the weight (`None` when not affine).
    pub fn weight(&self) -> Result<Option<Vec<f32>>> {
        self.bn.weight()
    }

    /// A host copy of the bias (`None` when not affine).
    pub fn bias(&self) -> Result<Option<Vec<f32>>> {
        self.bn.bias()
    }

    /// A host copy of this rank's accumulated weight gradient (`None` when not affine).
    pub fn grad_weight(&self) -> Result<Option<Vec<f32>>> {
        self.bn.grad_weight()
    }

    /// A host copy of this rank's accumulated bias gradient (`None` when not affine).
    pub fn grad_bias(&self) -> Result<Option<Vec<f32>>> {
        self.bn.grad_bias()
    }

    /// A host copy of the running mean (`None` without running statistics).
    pub fn running_mean(&self) -> Result<Option<Vec<f32>>> {
        self.bn.running_mean()
    }

    /// A host copy of the running variance (`None` without running statistics).
    pub fn running_var(&self) -> Result<Option<Vec<f32>>> {
        self.bn.running_var()
    }

    /// Replaces the weight (see [`BatchNorm::set_weight`]).
    pub fn set_weight(&mut self, values: &[f32]) -> Result<()> {
        self.bn.set_weight(values)
    }

    /// Replaces the bias (see [`BatchNorm::set_bias`]).
    pub fn set_bias(&mut self, values: &[f32]) -> Result<()> {
        self.bn.set_bias(values)
    }

    /// [`BatchNorm::set_running_mean`].
    pub fn set_running_mean(&mut self, values: &[f32]) -> Result<()> {
        self.bn.set_running_mean(values)
    }

    /// [`BatchNorm::set_running_var`].
    pub fn set_running_var(&mut self, values: &[f32]) -> Result<()> {
        self.bn.set_running_var(values)
    }

    /// Replaces both running statistics (see [`BatchNorm::set_running_stats`]).
    pub fn set_running_stats(&mut self, mean: &[f32], var: &[f32]) -> Result<()> {
        self.bn.set_running_stats(mean, var)
    }

    /// A host copy of the statistics the forward of `cache` saved (the global ones after a
    /// synchronized forward).
    pub fn saved_stats(&self, cache: &ForwardCache) -> Result<Option<SavedStatsHost>> {
        self.bn.saved_stats(cache)
    }

    /// A host copy of the whole state, with PyTorch's names (the same on every rank).
    pub fn state(&self) -> Result<LayerState> {
        self.bn.state()
    }

    /// Replaces the whole state (see [`BatchNorm::load_state`]).
    pub fn load_state(&mut self, state: &LayerState) -> Result<()> {
        self.bn.load_state(state)
    }

    /// Folds this eval-mode layer into the layer before it (see [`BatchNorm::fold_into`]).
    pub fn fold_into<T: Element>(
        &self,
        spec: &FoldSpec,
        weight_in: Option<&CudaView<'_, T>>,
        weight_out: &mut CudaViewMut<'_, T>,
        conv_bias: Option<&CudaView<'_, T>>,
        bias_out: &mut CudaViewMut<'_, T>,
    ) -> Result<()> {
        self.bn
            .fold_into(spec, weight_in, weight_out, conv_bias, bias_out)
    }

    /// Borrowed device views of the parameters, for optimizers that update them in place.
    pub fn parameters_mut(&mut self) -> Option<(CudaViewMut<'_, f32>, CudaViewMut<'_, f32>)> {
        self.bn.parameters_mut()
    }
}

fn device_zeros<T: DeviceRepr + ValidAsZeroBits>(
    gpu: &GpuContext,
    len: usize,
) -> Result<CudaSlice<T>> {
    gpu.stream()
        .alloc_zeros::<T>(len)
        .map_err(alloc_error(len.saturating_mul(std::mem::size_of::<T>())))
}

crate::state::stateful_layer_by_inherent_methods!(SyncBatchNorm, state: |layer| layer.state());
