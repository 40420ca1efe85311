//! Synchronized batch norm on the CPU reference (`reference::sync`): simulated ranks, each with a
//! shard of the batch, against the single-device reference on the concatenated batch. Unequal
//! and empty shards, 1, 2, 3 and 8 ranks, every rank and layout, every dtype; every rank's
//! statistics bitwise identical; the backward equal to the single-device one.

mod common;

use batchnorm_cuda::reference::sync::{self, ChannelMoments, Shard, SyncBatchNorm};
use batchnorm_cuda::reference::{BatchNorm, Grads};
use batchnorm_cuda::{BatchNormConfig, DType, Element, Error, Layout, TensorDesc};
use common::gpu::{random, random_f32};
use common::{assert_close, widen, widen_f32, with_dtype, Tol};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Statistics: the f64 merge and the f64 two-pass sum round to the same f32 or a neighbour.
const STATS: Tol = Tol::Elementwise {
    atol: 1e-9,
    rtol: 1e-6,
};

/// Activations: one rounding of (nearly) the same f64 value.
fn activation_tol(dtype: DType) -> Tol {
    let rtol = match dtype {
        DType::F32 => 2.5e-7,
        DType::F16 => 1e-3,
        DType::BF16 => 8e-3,
    };
    Tol::Elementwise { atol: 1e-9, rtol }
}

/// Shapes per rank (dims with a placeholder batch size), rank 2 to 5.
const SHAPES: &[&[usize]] = &[&[0, 3], &[0, 4, 5], &[0, 3, 2, 3], &[0, 2, 2, 1, 3]];

/// `ranks` batch sizes summing to `total`, some empty, seeded.
fn split(total: usize, ranks: usize, seed: u64) -> Vec<usize> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cuts: Vec<usize> = (0..ranks - 1)
        .map(|_| rng.random_range(0..=total))
        .collect();
    cuts.sort_unstable();
    let mut sizes = Vec::with_capacity(ranks);
    let mut last = 0;
    for cut in cuts.into_iter().chain([total]) {
        sizes.push(cut - last);
        last = cut;
    }
    // Make sure a multi-rank world has an empty shard (the last rank's, if none is).
    if ranks > 1 && !sizes.contains(&0) {
        let moved = sizes[ranks - 1];
        sizes[0] += moved;
        sizes[ranks - 1] = 0;
    }
    sizes
}

fn desc(dims: &[usize], batch: usize, layout: Layout) -> TensorDesc {
    let mut dims = dims.to_vec();
    dims[0] = batch;
    TensorDesc::new(&dims, layout).unwrap()
}

/// The shards of `x` (laid out as `full`): batch `sizes[r]` each, contiguous in memory in either
/// layout because `N` is the outermost dimension.
fn shard_descs(full: &TensorDesc, sizes: &[usize]) -> Vec<(TensorDesc, std::ops::Range<usize>)> {
    let per_sample = full.numel() / full.batch().max(1);
    let mut start = 0;
    sizes
        .iter()
        .map(|&n| {
            let d = desc(full.dims(), n, full.layout());
            let range = start..start + n * per_sample;
            start = range.end;
            (d, range)
        })
        .collect()
}

fn layer(c: usize, momentum: Option<f32>, seed: u64) -> BatchNorm {
    let mut bn = BatchNorm::new(BatchNormConfig::new(c).momentum(momentum)).unwrap();
    bn.set_weight(&random_f32(seed, c, 0.5, 1.5)).unwrap();
    bn.set_bias(&random_f32(seed + 1, c, -0.5, 0.5)).unwrap();
    bn
}

fn world_like(single: &BatchNorm, ranks: usize) -> SyncBatchNorm {
    let mut world = SyncBatchNorm::new(*single.config(), ranks).unwrap();
    for r in 0..ranks {
        world.replica_mut(r).load_state(&single.state()).unwrap();
    }
    world
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// Every replica's state, bitwise, must be rank 0's.
fn assert_replicas_identical(world: &SyncBatchNorm, what: &str) {
    let first = world.replica(0).state();
    for r in 1..world.world_size() {
        let state = world.replica(r).state();
        assert_eq!(
            bits(state.running_mean.as_deref().unwrap()),
            bits(first.running_mean.as_deref().unwrap()),
            "{what}: running_mean of rank {r}"
        );
        assert_eq!(
            bits(state.running_var.as_deref().unwrap()),
            bits(first.running_var.as_deref().unwrap()),
            "{what}: running_var of rank {r}"
        );
        assert_eq!(
            state.num_batches_tracked, first.num_batches_tracked,
            "{what}: counter of rank {r}"
        );
    }
}

/// Two training steps (different data, different splits) of a simulated world against the
/// single-device layer on the concatenated batches: outputs, saved statistics, running
/// statistics and counter, `dx`, and the parameter gradients summed over the ranks.
fn world_matches_single_device<T: Element>(
    dims: &[usize],
    layout: Layout,
    ranks: usize,
    momentum: Option<f32>,
    seed: u64,
) {
    let total = 7 + ranks;
    let full = desc(dims, total, layout);
    let c = full.channels();
    let mut single = layer(c, momentum, seed);
    let mut world = world_like(&single, ranks);
    let label = format!("{full} {} R={ranks} momentum {momentum:?}", T::DTYPE);
    for step in 0..2u64 {
        let seed = seed + 10 * step;
        let sizes = split(total, ranks, seed);
        let what = format!("{label} step {step} shards {sizes:?}");
        let x: Vec<T> = random(seed + 2, full.numel(), 0.5 + step as f64, 2.0);
        let dy: Vec<T> = random(seed + 3, full.numel(), 0.1, 1.0);

        let (y, cache) = single.forward(&x, &full).unwrap();
        let grads = single.backward(&cache, &x, &dy).unwrap();
        let saved = match cache.stats() {
            batchnorm_cuda::reference::CachedStats::Batch(saved) => saved.clone(),
            other => panic!("training forward cached {other:?}"),
        };

        let parts = shard_descs(&full, &sizes);
        let shards: Vec<Shard<'_, T>> = parts
            .iter()
            .map(|(d, range)| Shard {
                x: &x[range.clone()],
                desc: *d,
            })
            .collect();
        let (ys, sync_cache) = world.forward(&shards).unwrap();
        let dys: Vec<&[T]> = parts.iter().map(|(_, r)| &dy[r.clone()]).collect();
        let sync_grads = world.backward(&sync_cache, &shards, &dys).unwrap();

        assert_eq!(sync_cache.global_count(), Some(full.per_channel() as u64));
        let tol = activation_tol(T::DTYPE);
        for (r, (_, range)) in parts.iter().enumerate() {
            let rank = format!("{what} rank {r}");
            assert_close(
                &format!("{rank} y"),
                &widen(&ys[r]),
                &widen(&y[range.clone()]),
                tol,
            );
            assert_close(
                &format!("{rank} dx"),
                &widen(&sync_grads[r].dx),
                &widen(&grads.dx[range.clone()]),
                tol,
            );
            let got = sync_cache.saved(r).unwrap();
            // Every rank saved bitwise the statistics of rank 0.
            let first = sync_cache.saved(0).unwrap();
            assert_eq!(bits(&got.mean), bits(&first.mean), "{rank} save_mean");
            assert_eq!(bits(&got.invstd), bits(&first.invstd), "{rank} save_invstd");
        }
        let saved_sync = sync_cache.saved(0).unwrap();
        assert_close(
            &format!("{what} save_mean"),
            &widen_f32(&saved_sync.mean),
            &widen_f32(&saved.mean),
            STATS,
        );
        assert_close(
            &format!("{what} save_invstd"),
            &widen_f32(&saved_sync.invstd),
            &widen_f32(&saved.invstd),
            STATS,
        );
        assert_replicas_identical(&world, &what);
        let replica = world.replica(0);
        assert_eq!(
            replica.num_batches_tracked(),
            single.num_batches_tracked(),
            "{what}"
        );
        for (name, got, want) in [
            (
                "running_mean",
                replica.running_mean().unwrap(),
                single.running_mean().unwrap(),
            ),
            (
                "running_var",
                replica.running_var().unwrap(),
                single.running_var().unwrap(),
            ),
        ] {
            assert_close(
                &format!("{what} {name}"),
                &widen_f32(got),
                &widen_f32(want),
                STATS,
            );
        }
        // Parameter gradients are per rank; their sum is the single-device gradient.
        let summed = |pick: fn(&Grads<T>) -> &Option<Vec<f32>>| -> Vec<f64> {
            (0..c)
                .map(|ch| {
                    sync_grads
                        .iter()
                        .map(|g| f64::from(pick(g).as_ref().unwrap()[ch]))
                        .sum()
                })
                .collect()
        };
        let grad_tol = Tol::OfMax {
            atol: 1e-6,
            rtol: 1e-6,
        };
        assert_close(
            &format!("{what} dweight"),
            &summed(|g| &g.dweight),
            &widen_f32(grads.dweight.as_ref().unwrap()),
            grad_tol,
        );
        assert_close(
            &format!("{what} dbias"),
            &summed(|g| &g.dbias),
            &widen_f32(grads.dbias.as_ref().unwrap()),
            grad_tol,
        );
    }
}

#[test]
fn simulated_ranks_match_the_concatenated_batch() {
    let mut seed = 100;
    for &ranks in &[1usize, 2, 3, 8] {
        for dims in SHAPES {
            for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
                for dtype in DType::ALL {
                    seed += 1;
                    with_dtype!(
                        dtype,
                        world_matches_single_device(dims, layout, ranks, Some(0.1), seed)
                    );
                }
            }
        }
    }
}

#[test]
fn cumulative_average_uses_the_global_batches() {
    for ranks in [2, 3] {
        world_matches_single_device::<f32>(&[0, 3, 4], Layout::ChannelsFirst, ranks, None, 7);
    }
}

#[test]
fn shard_splits_have_empty_and_unequal_shards() {
    for ranks in [2, 3, 8] {
        for seed in 0..20 {
            let sizes = split(10, ranks, seed);
            assert_eq!(sizes.len(), ranks);
            assert_eq!(sizes.iter().sum::<usize>(), 10);
            assert!(sizes.contains(&0), "{sizes:?}");
        }
    }
}

#[test]
fn merge_is_chan_in_rank_order_with_empty_ranks_as_identity() {
    let d = TensorDesc::new(&[5, 2, 3], Layout::ChannelsFirst).unwrap();
    let x: Vec<f32> = random(1, d.numel(), 3.0, 1.0);
    let a = sync::local_moments(&x, &d).unwrap();
    let empty = ChannelMoments::empty(2);
    let merged = sync::merge(&[empty.clone(), a.clone(), empty.clone()]).unwrap();
    assert_eq!(merged, a, "empty ranks change nothing");
    assert_eq!(merged.count, 15);

    // Two halves merge to the whole (f64).
    let (lo, hi) = (
        TensorDesc::new(&[2, 2, 3], Layout::ChannelsFirst).unwrap(),
        TensorDesc::new(&[3, 2, 3], Layout::ChannelsFirst).unwrap(),
    );
    let parts = [
        sync::local_moments(&x[..12], &lo).unwrap(),
        sync::local_moments(&x[12..], &hi).unwrap(),
    ];
    let whole = sync::merge(&parts).unwrap();
    assert_eq!(whole.count, a.count);
    assert_close("mean", &whole.mean, &a.mean, STATS);
    assert_close("m2", &whole.m2, &a.m2, STATS);
    // Deterministic: the same call gives the same bits.
    assert_eq!(sync::merge(&parts).unwrap(), whole);

    assert!(matches!(sync::merge(&[]), Err(Error::Unsupported { .. })));
    assert!(matches!(
        sync::merge(&[a, ChannelMoments::empty(3)]),
        Err(Error::BufferLength { .. })
    ));
}

#[test]
fn large_mean_keeps_the_variance_across_ranks() {
    let full = TensorDesc::new(&[12, 2, 50], Layout::ChannelsFirst).unwrap();
    let x: Vec<f32> = random(5, full.numel(), 1000.0, 0.1);
    let single = layer(2, Some(0.1), 3);
    let mut reference = single.clone();
    let mut world = world_like(&single, 3);
    let (_, cache) = reference.forward(&x, &full).unwrap();
    let parts = shard_descs(&full, &[5, 0, 7]);
    let shards: Vec<_> = parts
        .iter()
        .map(|(d, r)| Shard {
            x: &x[r.clone()],
            desc: *d,
        })
        .collect();
    let (_, sync_cache) = world.forward(&shards).unwrap();
    let batchnorm_cuda::reference::CachedStats::Batch(saved) = cache.stats() else {
        panic!()
    };
    assert_close(
        "invstd at mean 1000, std 0.1",
        &widen_f32(&sync_cache.saved(1).unwrap().invstd),
        &widen_f32(&saved.invstd),
        STATS,
    );
}

#[test]
fn one_value_in_the_whole_world_is_refused_and_nothing_changes() {
    let single = layer(3, Some(0.1), 9);
    let mut world = world_like(&single, 3);
    let one = TensorDesc::new(&[1, 3], Layout::ChannelsFirst).unwrap();
    let none = TensorDesc::new(&[0, 3], Layout::ChannelsFirst).unwrap();
    let x = [1.0f32, 2.0, 3.0];
    let shards = [
        Shard { x: &[], desc: none },
        Shard { x: &x, desc: one },
        Shard { x: &[], desc: none },
    ];
    let before = world.replica(0).state();
    assert!(matches!(
        world.forward(&shards),
        Err(Error::SingleValuePerChannel { .. })
    ));
    for r in 0..3 {
        assert_eq!(world.replica(r).state(), before, "rank {r} changed");
    }

    // One value on each of two ranks is a batch of two: fine, and shards of one are allowed.
    let mut world = SyncBatchNorm::new(BatchNormConfig::new(3), 3).unwrap();
    let y = [5.0f32, 7.0, 9.0];
    let shards = [
        Shard { x: &x, desc: one },
        Shard { x: &[], desc: none },
        Shard { x: &y, desc: one },
    ];
    let (ys, cache) = world.forward(&shards).unwrap();
    assert_eq!(cache.global_count(), Some(2));
    assert_close(
        "two values",
        &widen(&ys[0]),
        &widen(&[-1.0f32, -1.0, -1.0]),
        Tol::Elementwise {
            atol: 1e-4,
            rtol: 0.0,
        },
    );
    assert!(ys[1].is_empty());
}

#[test]
fn every_shard_empty_is_an_empty_batch() {
    let single = layer(2, Some(0.1), 11);
    let mut world = world_like(&single, 2);
    let none = TensorDesc::new(&[0, 2, 4], Layout::ChannelsLast).unwrap();
    let shards = [Shard::<f32> { x: &[], desc: none }; 2];
    let before = world.replica(0).state();
    let (ys, cache) = world.forward(&shards).unwrap();
    assert!(ys.iter().all(Vec::is_empty));
    assert_eq!(cache.global_count(), Some(0));
    for r in 0..2 {
        let state = world.replica(r).state();
        assert_eq!(state.running_mean, before.running_mean);
        assert_eq!(state.running_var, before.running_var);
        assert_eq!(state.num_batches_tracked, 1, "an empty batch still counts");
    }
    let grads = world.backward(&cache, &shards, &[&[], &[]]).unwrap();
    assert!(grads
        .iter()
        .all(|g| g.dweight.as_ref().unwrap().iter().all(|&v| v == 0.0)));
}

#[test]
fn eval_mode_is_local() {
    let full = TensorDesc::new(&[6, 2, 3], Layout::ChannelsFirst).unwrap();
    let x: Vec<f32> = random(21, full.numel(), 0.0, 1.0);
    let mut single = layer(2, Some(0.1), 13);
    single.forward(&x, &full).unwrap();
    let mut world = world_like(&single, 2);
    world.eval();
    single.eval();
    let parts = shard_descs(&full, &[4, 2]);
    let shards: Vec<_> = parts
        .iter()
        .map(|(d, r)| Shard {
            x: &x[r.clone()],
            desc: *d,
        })
        .collect();
    let (ys, cache) = world.forward(&shards).unwrap();
    assert_eq!(cache.global_count(), None);
    let (y, _) = single.forward(&x, &full).unwrap();
    for (r, (_, range)) in parts.iter().enumerate() {
        assert_eq!(bits(&ys[r]), bits(&y[range.clone()]), "rank {r}");
    }
}

#[test]
fn refused_calls_name_the_problem() {
    let mut world = SyncBatchNorm::new(BatchNormConfig::new(2), 2).unwrap();
    let d = TensorDesc::new(&[2, 2], Layout::ChannelsFirst).unwrap();
    let x = [0.0f32; 4];
    assert!(matches!(
        world.forward(&[Shard { x: &x, desc: d }]),
        Err(Error::BufferLength {
            what: "shards",
            needed: 2,
            got: 1
        })
    ));
    let three = TensorDesc::new(&[2, 3], Layout::ChannelsFirst).unwrap();
    assert!(matches!(
        world.forward(&[
            Shard { x: &x, desc: d },
            Shard {
                x: &[0.0; 6],
                desc: three
            }
        ]),
        Err(Error::ChannelMismatch {
            expected: 2,
            got: 3
        })
    ));
    assert!(matches!(
        world.forward(&[
            Shard { x: &x, desc: d },
            Shard {
                x: &x[..3],
                desc: d
            }
        ]),
        Err(Error::BufferLength { what: "x", .. })
    ));
    assert_eq!(world.replica(1).num_batches_tracked(), 0);
    assert!(SyncBatchNorm::new(BatchNormConfig::new(2), 0).is_err());
}
