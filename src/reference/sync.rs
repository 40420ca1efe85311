//! Synchronized batch norm on the CPU: data-parallel ranks, each holding a shard of the batch
//! (split along `N`), normalize with the statistics of the whole batch. The oracle of the GPU
//! path ([`crate::gpu::sync`]) and a simulation of `R` ranks on one machine.
//!
//! The protocol, step by step (each function is one rank's step; the collectives are plain
//! functions over every rank's contribution):
//!
//! | step | function | exchanged |
//! | --- | --- | --- |
//! | forward: the shard's moments | [`local_moments`] | |
//! | forward: all-gather, merge in rank order | [`merge`] (inside [`forward_training`]) | `(count, mean, m2)` per channel and rank |
//! | forward: normalize, running update with the global count | [`forward_training`] | |
//! | backward: the shard's sums | [`local_grad_sums`] | |
//! | backward: all-reduce | [`all_reduce`] | `(sum dy, sum dy * xhat)` per channel |
//! | backward: `dx` with the global count | [`backward_training`] | |
//!
//! [`SyncBatchNorm`] runs the whole protocol for `R` replicas of a layer, each with its own state.
//!
//! Semantics (PyTorch's `nn.SyncBatchNorm`, except where noted):
//! - The ranks exchange moments, not `invstd` (PyTorch rebuilds the variance from `invstd`,
//!   lossy), and merge them with Chan's formula in rank order, so every rank computes the same
//!   statistics; empty shards (`count = 0`) take part and change nothing.
//! - The running statistics use the global count `M` (unbiased factor `M / (M - 1)`).
//! - `M == 1` is [`Error::SingleValuePerChannel`] here, where every count is known. (PyTorch
//!   raises only when its own shard has one value and the world has one rank; with more ranks
//!   it writes NaN, `0 / 0`, into `running_var`.) `M == 0`, every shard empty, is the empty
//!   batch: statistics unchanged.
//! - `dweight` and `dbias` are this rank's own sums, as in PyTorch: data-parallel training
//!   all-reduces (averages) parameter gradients separately. Their sum over the ranks is the
//!   single-device gradient.
//! - Eval mode does not synchronize (running statistics, or the shard's own batch statistics
//!   without them), as in PyTorch.

use super::math::{self, Norm, ParamGrads};
use super::{
    normalize_batch, store, update_running, widen, widen_or, BatchNorm, ForwardCache, Gradients,
    Grads, RunningUpdate, SavedStats,
};
use crate::config::BatchNormConfig;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::shape::TensorDesc;
use crate::validate::{self, validate_eps, validate_momentum, Buffers};

/// Per-channel moments of a set of values: what a rank sends in the forward all-gather (its
/// shard), or the merge of every rank's (the whole batch). In f64 here; the GPU sends f32, the
/// mean as two floats (`hi + lo`).
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelMoments {
    /// Values per channel (`N * spatial`), the same for every channel; 0 for an empty shard.
    pub count: u64,
    /// Mean per channel (0 when `count == 0`).
    pub mean: Vec<f64>,
    /// Sum of squared deviations from `mean`, per channel.
    pub m2: Vec<f64>,
}

impl ChannelMoments {
    /// The moments of no values: the identity of [`merge`].
    pub fn empty(channels: usize) -> Self {
        Self {
            count: 0,
            mean: vec![0.0; channels],
            m2: vec![0.0; channels],
        }
    }

    /// The biased variance `m2 / count` per channel (0 when empty).
    pub fn var(&self) -> Vec<f64> {
        let n = self.count.max(1) as f64;
        self.m2.iter().map(|m2| m2 / n).collect()
    }
}

/// One rank's per-channel sums for the backward all-reduce.
#[derive(Clone, Debug, PartialEq)]
pub struct GradSums {
    /// `sum(dy)` per channel: the rank's `dbias`.
    pub sum_dy: Vec<f64>,
    /// `sum(dy * xhat)` per channel, `xhat` normalized with the global statistics: the rank's
    /// `dweight`.
    pub sum_dy_xhat: Vec<f64>,
}

/// Moments of this rank's shard `x` (`desc`'s shape and layout, any `N` including 0).
///
/// Errors: [`Error::BufferLength`].
pub fn local_moments<T: Element>(x: &[T], desc: &TensorDesc) -> Result<ChannelMoments> {
    Buffers {
        x: x.len(),
        ..Default::default()
    }
    .check(desc)?;
    let m = desc.per_channel();
    let moments = math::moments(x, desc.geometry());
    Ok(ChannelMoments {
        count: m as u64,
        mean: moments.mean,
        m2: moments.var.iter().map(|v| v * m as f64).collect(),
    })
}

/// Merges every rank's moments (`gathered[r]` from rank `r`) with Chan's formula, left to right
/// in rank order: every rank that calls it with the all-gathered moments gets the same result.
/// An empty rank is an identity.
///
/// Errors: [`Error::Unsupported`] for no ranks, [`Error::BufferLength`] when a rank has another
/// number of channels than rank 0.
pub fn merge(gathered: &[ChannelMoments]) -> Result<ChannelMoments> {
    let first = gathered.first().ok_or_else(|| Error::Unsupported {
        what: "sync merge",
        reason: "no ranks to merge".into(),
    })?;
    let c = first.mean.len();
    let mut total = ChannelMoments::empty(c);
    for rank in gathered {
        validate::buffer("moments.mean", c, rank.mean.len())?;
        validate::buffer("moments.m2", c, rank.m2.len())?;
        if rank.count == 0 {
            continue;
        }
        let (na, nb) = (total.count as f64, rank.count as f64);
        let n = na + nb;
        for ch in 0..c {
            let delta = rank.mean[ch] - total.mean[ch];
            total.mean[ch] += delta * nb / n;
            total.m2[ch] += rank.m2[ch] + delta * delta * na * nb / n;
        }
        total.count += rank.count;
    }
    Ok(total)
}

/// One rank's training forward on host slices, as the [`crate::gpu::functional::Forward`] that
/// [`crate::gpu::sync::forward_training`] takes on the device.
#[derive(Debug)]
pub struct SyncForward<'a, T> {
    /// Shape and memory order of this rank's shard `x` and of `y`.
    pub desc: TensorDesc,
    /// The shard.
    pub x: &'a [T],
    /// `[C]`, or `None` for 1.
    pub weight: Option<&'a [f32]>,
    /// `[C]`, or `None` for 0.
    pub bias: Option<&'a [f32]>,
    /// Updated with the global statistics and count when given.
    pub running: Option<RunningUpdate<'a>>,
    /// Added to the global biased variance.
    pub eps: f32,
    /// Overwritten.
    pub y: &'a mut [T],
}

/// One rank's training backward on host slices, as [`crate::gpu::sync::SyncBackward`].
#[derive(Debug)]
pub struct SyncBackward<'a, T> {
    /// Shape and memory order of this rank's shard `x`, `dy` and `dx`.
    pub desc: TensorDesc,
    /// The shard.
    pub x: &'a [T],
    /// The gradient of the forward's output.
    pub dy: &'a [T],
    /// `[C]`, or `None` for 1.
    pub weight: Option<&'a [f32]>,
    /// The global statistics [`forward_training`] returned.
    pub saved: &'a SavedStats,
    /// The world's values per channel `M`.
    pub count: u64,
    /// Which gradients to write; `dweight` and `dbias` are this rank's.
    pub grads: Gradients<'a, T>,
}

/// One rank's training forward with the all-gathered moments of every rank (its own included):
/// merges them ([`merge`]), normalizes its shard `x` into `y` with the global statistics and,
/// when `running` is given, updates the running statistics with the global count. Shapes as in
/// [`super::forward_training`]; the shard may be empty or hold one value per channel.
///
/// Errors, before anything is written: [`Error::BufferLength`], [`Error::InvalidEps`],
/// [`Error::InvalidMomentum`], those of [`merge`], [`Error::BufferLength`] when the moments have
/// another channel count than `desc`, [`Error::SingleValuePerChannel`] when the whole world holds
/// one value per channel.
pub fn forward_training<T: Element>(
    request: SyncForward<'_, T>,
    gathered: &[ChannelMoments],
) -> Result<SavedStats> {
    let SyncForward {
        desc,
        x,
        weight,
        bias,
        running,
        eps,
        y,
    } = request;
    let desc = &desc;
    Buffers {
        x: x.len(),
        y: Some(y.len()),
        weight: weight.map(<[f32]>::len),
        bias: bias.map(<[f32]>::len),
        running_mean: running.as_ref().map(|r| r.mean.len()),
        running_var: running.as_ref().map(|r| r.var.len()),
        ..Default::default()
    }
    .check(desc)?;
    validate_eps(eps)?;
    if let Some(running) = &running {
        validate_momentum(running.factor)?;
    }
    let world = merge(gathered)?;
    validate::buffer("moments.mean", desc.channels(), world.mean.len())?;
    global_count(world.count, desc)?;
    let moments = math::Moments {
        var: world.var(),
        mean: world.mean,
    };
    update_running(running, &moments, world.count as usize);
    Ok(normalize_batch(x, desc, weight, bias, eps, &moments, y))
}

/// `M == 1` cannot be trained on, as in the single-device path.
fn global_count(count: u64, desc: &TensorDesc) -> Result<()> {
    if count == 1 {
        Err(Error::SingleValuePerChannel {
            dims: desc.dims().to_vec(),
        })
    } else {
        Ok(())
    }
}

/// This rank's `sum(dy)` and `sum(dy * xhat)` per channel, `xhat` from the `saved` global
/// statistics of its forward.
///
/// Errors: [`Error::BufferLength`].
pub fn local_grad_sums<T: Element>(
    x: &[T],
    dy: &[T],
    desc: &TensorDesc,
    saved: &SavedStats,
) -> Result<GradSums> {
    saved
        .buffers(Buffers {
            x: x.len(),
            dy: Some(dy.len()),
            ..Default::default()
        })
        .check(desc)?;
    let (mean, invstd) = (saved.full_mean(), widen(&saved.invstd));
    let weight = vec![1.0; desc.channels()];
    let norm = Norm {
        mean: &mean,
        invstd: &invstd,
        weight: &weight,
    };
    let sums = math::param_grads(x, dy, desc.geometry(), &norm);
    Ok(GradSums {
        sum_dy: sums.dbias,
        sum_dy_xhat: sums.dweight,
    })
}

/// The backward all-reduce: every rank's sums added in rank order.
///
/// Errors: [`Error::Unsupported`] for no ranks, [`Error::BufferLength`] when the ranks disagree
/// on the channel count.
pub fn all_reduce(parts: &[GradSums]) -> Result<GradSums> {
    let first = parts.first().ok_or_else(|| Error::Unsupported {
        what: "sync all-reduce",
        reason: "no ranks to reduce".into(),
    })?;
    let c = first.sum_dy.len();
    let mut total = GradSums {
        sum_dy: vec![0.0; c],
        sum_dy_xhat: vec![0.0; c],
    };
    for part in parts {
        validate::buffer("sums.sum_dy", c, part.sum_dy.len())?;
        validate::buffer("sums.sum_dy_xhat", c, part.sum_dy_xhat.len())?;
        for ch in 0..c {
            total.sum_dy[ch] += part.sum_dy[ch];
            total.sum_dy_xhat[ch] += part.sum_dy_xhat[ch];
        }
    }
    Ok(total)
}

/// One rank's training backward after the all-reduce: `global` holds the world's sums and
/// `count` the world's values per channel `M`;
/// `dx = weight * invstd * (dy - global.sum_dy / M - xhat * global.sum_dy_xhat / M)` for this
/// rank's shard, and `dweight`, `dbias` receive this rank's own sums (`local`, see the module
/// docs). Buffers as in [`super::backward_training`].
///
/// Errors: [`Error::BufferLength`] (the sums need `C` values each),
/// [`Error::SingleValuePerChannel`] when `M == 1`.
pub fn backward_training<T: Element>(
    request: SyncBackward<'_, T>,
    local: &GradSums,
    global: &GradSums,
) -> Result<()> {
    let SyncBackward {
        desc,
        x,
        dy,
        weight,
        saved,
        count,
        grads,
    } = request;
    let desc = &desc;
    saved
        .buffers(Buffers {
            x: x.len(),
            dy: Some(dy.len()),
            dx: grads.dx.as_ref().map(|dx| dx.len()),
            weight: weight.map(<[f32]>::len),
            dweight: grads.dweight.as_ref().map(|d| d.len()),
            dbias: grads.dbias.as_ref().map(|d| d.len()),
            ..Default::default()
        })
        .check(desc)?;
    let c = desc.channels();
    for (what, len) in [
        ("local.sum_dy", local.sum_dy.len()),
        ("local.sum_dy_xhat", local.sum_dy_xhat.len()),
        ("global.sum_dy", global.sum_dy.len()),
        ("global.sum_dy_xhat", global.sum_dy_xhat.len()),
    ] {
        validate::buffer(what, c, len)?;
    }
    global_count(count, desc)?;

    if let Some(dx) = grads.dx {
        let (mean, invstd, weight) = (
            saved.full_mean(),
            widen(&saved.invstd),
            widen_or(weight, c, 1.0),
        );
        let norm = Norm {
            mean: &mean,
            invstd: &invstd,
            weight: &weight,
        };
        let sums = ParamGrads {
            dweight: global.sum_dy_xhat.clone(),
            dbias: global.sum_dy.clone(),
        };
        let g = desc.geometry();
        math::training_dx_over(x, dy, g, &norm, &sums, count as f64, dx);
    }
    store(grads.dweight, &local.sum_dy_xhat, grads.accumulate);
    store(grads.dbias, &local.sum_dy, grads.accumulate);
    Ok(())
}

/// One rank's shard: its activations and their shape (any `N`, the layer's `C`).
#[derive(Clone, Copy, Debug)]
pub struct Shard<'a, T> {
    /// The shard's values, in `desc`'s memory order.
    pub x: &'a [T],
    /// Shape and layout of the shard.
    pub desc: TensorDesc,
}

/// `R` replicas of a [`BatchNorm`] trained data-parallel with synchronized statistics, simulated
/// on one machine: rank `r` owns replica `r` (its own parameters, running statistics and
/// counter) and shard `r` of every batch; the collectives run in rank order.
///
/// Training forwards run the synchronized protocol (see the module docs): every replica ends
/// with bitwise the same running statistics and counter. Eval forwards are local to each rank.
///
/// ```
/// use batchnorm_cuda::reference::sync::{Shard, SyncBatchNorm};
/// use batchnorm_cuda::{BatchNormConfig, TensorDesc};
///
/// let mut world = SyncBatchNorm::new(BatchNormConfig::new(2), 2)?;
/// let (a, b) = (TensorDesc::nchw(1, 2, 2, 2)?, TensorDesc::nchw(3, 2, 2, 2)?);
/// let xa: Vec<f32> = (0..8).map(|i| i as f32).collect();
/// let xb: Vec<f32> = (0..24).map(|i| (i % 5) as f32).collect();
/// let shards = [Shard { x: &xa, desc: a }, Shard { x: &xb, desc: b }];
/// let (ys, cache) = world.forward(&shards)?;
/// let grads = world.backward(&cache, &shards, &[&ys[0], &ys[1]])?;
/// assert_eq!(world.replica(0).running_var(), world.replica(1).running_var());
/// assert_eq!(grads[1].dx.len(), 24);
/// # Ok::<(), batchnorm_cuda::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct SyncBatchNorm {
    replicas: Vec<BatchNorm>,
}

/// What [`SyncBatchNorm::backward`] needs from its forward, for every rank.
#[derive(Clone, Debug, PartialEq)]
pub struct SyncForwardCache {
    ranks: RankCaches,
}

#[derive(Clone, Debug, PartialEq)]
enum RankCaches {
    /// A synchronized training forward: each rank's descriptor and saved (global) statistics,
    /// and the global count.
    Synced {
        descs: Vec<TensorDesc>,
        saved: Vec<SavedStats>,
        count: u64,
    },
    /// Local forwards (eval mode).
    Local(Vec<ForwardCache>),
}

impl SyncForwardCache {
    /// The global count `M` of a synchronized forward (`None` after a local, eval-mode one).
    pub fn global_count(&self) -> Option<u64> {
        match &self.ranks {
            RankCaches::Synced { count, .. } => Some(*count),
            RankCaches::Local(_) => None,
        }
    }

    /// The statistics rank `rank` saved in a synchronized forward (the same on every rank).
    pub fn saved(&self, rank: usize) -> Option<&SavedStats> {
        match &self.ranks {
            RankCaches::Synced { saved, .. } => saved.get(rank),
            RankCaches::Local(_) => None,
        }
    }
}

impl SyncBatchNorm {
    /// `world_size` fresh replicas of a layer configured by `config`, in training mode.
    ///
    /// Errors: those of [`BatchNormConfig::validate`], [`Error::Unsupported`] for an empty world.
    pub fn new(config: BatchNormConfig, world_size: usize) -> Result<Self> {
        if world_size == 0 {
            return Err(Error::Unsupported {
                what: "SyncBatchNorm",
                reason: "the world needs at least one rank".into(),
            });
        }
        let replica = BatchNorm::new(config)?;
        Ok(Self {
            replicas: vec![replica; world_size],
        })
    }

    /// Number of ranks `R`.
    pub fn world_size(&self) -> usize {
        self.replicas.len()
    }

    /// Rank `rank`'s replica (its parameters, running statistics and counter). Panics when
    /// `rank >= R`.
    pub fn replica(&self, rank: usize) -> &BatchNorm {
        &self.replicas[rank]
    }

    /// Rank `rank`'s replica, to set parameters or state. Panics when `rank >= R`.
    pub fn replica_mut(&mut self, rank: usize) -> &mut BatchNorm {
        &mut self.replicas[rank]
    }

    /// Training mode on every rank.
    pub fn train(&mut self) {
        self.replicas.iter_mut().for_each(BatchNorm::train);
    }

    /// Eval mode on every rank.
    pub fn eval(&mut self) {
        self.replicas.iter_mut().for_each(BatchNorm::eval);
    }

    /// Whether the ranks are in training mode.
    pub fn is_training(&self) -> bool {
        self.replicas[0].is_training()
    }

    /// One forward step of every rank on its shard (`shards[r]` for rank `r`): the outputs, in
    /// rank order, and the cache for [`Self::backward`]. Training mode synchronizes (see the
    /// module docs); eval mode runs each replica's own [`BatchNorm::forward`].
    ///
    /// Errors, before any replica changes: [`Error::BufferLength`] (`what = "shards"`) unless one
    /// shard per rank, [`Error::ChannelMismatch`], those of [`forward_training`].
    pub fn forward<T: Element>(
        &mut self,
        shards: &[Shard<'_, T>],
    ) -> Result<(Vec<Vec<T>>, SyncForwardCache)> {
        self.check_shards(shards.len(), shards.iter().map(|s| (s.x.len(), s.desc)))?;
        if !self.is_training() {
            let mut ys = Vec::with_capacity(shards.len());
            let mut caches = Vec::with_capacity(shards.len());
            for (replica, shard) in self.replicas.iter_mut().zip(shards) {
                let (y, cache) = replica.forward(shard.x, &shard.desc)?;
                ys.push(y);
                caches.push(cache);
            }
            let ranks = RankCaches::Local(caches);
            return Ok((ys, SyncForwardCache { ranks }));
        }
        // The all-gather: every rank receives every rank's moments.
        let gathered = shards
            .iter()
            .map(|s| local_moments(s.x, &s.desc))
            .collect::<Result<Vec<_>>>()?;
        // Whatever fails for one rank fails for all (same configuration, same gathered moments):
        // rank 0 checks first, so an error leaves every replica as it was.
        let count = merge(&gathered)?.count;
        let mut ys = Vec::with_capacity(shards.len());
        let mut saved = Vec::with_capacity(shards.len());
        for (rank, (replica, shard)) in self.replicas.iter_mut().zip(shards).enumerate() {
            let mut y = vec![T::default(); shard.x.len()];
            let stats = replica.batch_forward(|weight, bias, running, eps| {
                let request = SyncForward {
                    desc: shard.desc,
                    x: shard.x,
                    weight,
                    bias,
                    running,
                    eps,
                    y: &mut y,
                };
                forward_training(request, &gathered)
            });
            match stats {
                Ok(stats) => saved.push(stats),
                Err(e) => {
                    debug_assert_eq!(rank, 0, "a later rank failed where rank 0 did not");
                    return Err(e);
                }
            }
            ys.push(y);
        }
        let descs = shards.iter().map(|s| s.desc).collect();
        let ranks = RankCaches::Synced {
            descs,
            saved,
            count,
        };
        Ok((ys, SyncForwardCache { ranks }))
    }

    /// The backward of every rank (`shards` as given to the forward, `dys[r]` the gradient of
    /// rank `r`'s output): per rank `dx` and, when affine, the rank's own `dweight` and `dbias`
    /// (their sum over the ranks is the single-device gradient).
    ///
    /// Errors: [`Error::BufferLength`] unless one shard and one `dy` per rank with the forward's
    /// lengths, [`Error::ChannelMismatch`].
    pub fn backward<T: Element>(
        &self,
        cache: &SyncForwardCache,
        shards: &[Shard<'_, T>],
        dys: &[&[T]],
    ) -> Result<Vec<Grads<T>>> {
        self.check_shards(shards.len(), shards.iter().map(|s| (s.x.len(), s.desc)))?;
        validate::buffer("dys", self.world_size(), dys.len())?;
        let (descs, saved, count) = match &cache.ranks {
            RankCaches::Local(caches) => {
                return self
                    .replicas
                    .iter()
                    .zip(caches)
                    .zip(shards.iter().zip(dys))
                    .map(|((replica, cache), (shard, dy))| replica.backward(cache, shard.x, dy))
                    .collect();
            }
            RankCaches::Synced {
                descs,
                saved,
                count,
            } => (descs, saved, *count),
        };
        for (desc, shard) in descs.iter().zip(shards) {
            validate::same_tensor("x", desc, &shard.desc)?;
        }
        // The all-reduce.
        let local = shards
            .iter()
            .zip(dys)
            .zip(descs.iter().zip(saved))
            .map(|((shard, dy), (desc, saved))| local_grad_sums(shard.x, dy, desc, saved))
            .collect::<Result<Vec<_>>>()?;
        let global = all_reduce(&local)?;
        let mut out = Vec::with_capacity(shards.len());
        for (rank, replica) in self.replicas.iter().enumerate() {
            let desc = &descs[rank];
            let c = desc.channels();
            let mut dx = vec![T::default(); desc.numel()];
            let affine = replica.config().affine;
            let mut dweight = affine.then(|| vec![0.0; c]);
            let mut dbias = affine.then(|| vec![0.0; c]);
            let grads = Gradients {
                dx: Some(&mut dx),
                dweight: dweight.as_deref_mut(),
                dbias: dbias.as_deref_mut(),
                accumulate: false,
            };
            let request = SyncBackward {
                desc: *desc,
                x: shards[rank].x,
                dy: dys[rank],
                weight: replica.weight(),
                saved: &saved[rank],
                count,
                grads,
            };
            backward_training(request, &local[rank], &global)?;
            out.push(Grads { dx, dweight, dbias });
        }
        Ok(out)
    }

    fn check_shards(
        &self,
        count: usize,
        shards: impl Iterator<Item = (usize, TensorDesc)>,
    ) -> Result<()> {
        validate::buffer("shards", self.world_size(), count)?;
        let c = self.replicas[0].config().num_features;
        for (len, desc) in shards {
            validate::channels(c, &desc)?;
            Buffers {
                x: len,
                ..Default::default()
            }
            .check(&desc)?;
        }
        Ok(())
    }
}
