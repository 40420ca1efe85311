//! Synchronized batch norm on the GPU. Shards of one batch on one device, merged by the sync
//! kernels (`gpu::sync`), against the single-device GPU path and the CPU reference on the
//! concatenated batch; with the `nccl` feature, the NCCL layer in a world of one GPU against
//! `gpu::BatchNorm`. Every test needs a CUDA device: run with `--include-ignored` on a GPU
//! machine (`--features nccl` for the NCCL test, which also needs libnccl).

mod common;

use batchnorm_cuda::epilogue::mask_words;
use batchnorm_cuda::gpu::functional::{
    self, BatchStats, Epilogue, ForwardStats, GradientsMut, RunningStats, RunningUpdate,
    SavedStats, SavedStatsMut,
};
use batchnorm_cuda::gpu::sync::{self, GatheredMoments, ReducedSums, MOMENT_FLOATS};
use batchnorm_cuda::gpu::{GpuContext, Workspace};
use batchnorm_cuda::reference;
use batchnorm_cuda::{DType, Element, Error, Layout, TensorDesc};
use common::gpu::*;
use common::offset::{self, offsets, Form, Shares};
use common::{tolerance, widen, widen_f32, with_dtype, Quantity, Tol};
use cudarc::driver::CudaSlice;

const EPS: f32 = 1e-5;
const MOMENTUM: f32 = 0.1;

/// f32 statistics.
const STATS: Tol = Tol::Elementwise {
    atol: 1e-5,
    rtol: 1e-5,
};

#[track_caller]
fn check(what: &str, got: &[f64], want: &[f64], tol: Tol) {
    let r = ratio(got, want, tol);
    assert!(r <= 1.0, "{what}: {r:.2}x the tolerance");
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// A device buffer of `len` elements (at least one: an empty shard still gets a buffer).
fn buffer<T: Element>(gpu: &GpuContext, len: usize) -> CudaSlice<T> {
    zeros(gpu, len.max(1))
}

/// A device copy of `host` (one zero element when empty: no zero-byte allocation).
fn upload_padded<T: Element>(gpu: &GpuContext, host: &[T]) -> CudaSlice<T> {
    if host.is_empty() {
        zeros(gpu, 1)
    } else {
        upload(gpu, host)
    }
}

/// The inputs of one comparison: the whole batch and how it is split.
struct Batch<T> {
    full: TensorDesc,
    sizes: Vec<usize>,
    x: Vec<T>,
    dy: Vec<T>,
    weight: Vec<f32>,
    bias: Vec<f32>,
    running_mean: Vec<f32>,
    running_var: Vec<f32>,
}

impl<T: Element> Batch<T> {
    fn new(full: TensorDesc, sizes: Vec<usize>, seed: u64, mean: f64, spread: f64) -> Self {
        let (n, c) = (full.numel(), full.channels());
        assert_eq!(sizes.iter().sum::<usize>(), full.batch());
        Self {
            full,
            sizes,
            x: random(seed, n, mean, spread),
            dy: random(seed + 1, n, 0.1, 1.0),
            weight: random_f32(seed + 2, c, 0.5, 1.5),
            bias: random_f32(seed + 3, c, -0.5, 0.5),
            running_mean: random_f32(seed + 4, c, -0.1, 0.1),
            running_var: random_f32(seed + 5, c, 0.5, 2.0),
        }
    }

    /// Shard `r`: its descriptor and element range (`N` is outermost in both layouts).
    fn shards(&self) -> Vec<(TensorDesc, std::ops::Range<usize>)> {
        let per_sample = self.full.numel() / self.full.batch().max(1);
        let mut start = 0;
        self.sizes
            .iter()
            .map(|&n| {
                let mut dims = self.full.dims().to_vec();
                dims[0] = n;
                let desc = TensorDesc::new(&dims, self.full.layout()).unwrap();
                let range = start..start + n * per_sample;
                start = range.end;
                (desc, range)
            })
            .collect()
    }
}

/// What one rank (or the single device) ends with, on the host.
#[derive(Debug)]
struct Outcome<T> {
    y: Vec<T>,
    mean: Vec<f32>,
    mean_lo: Vec<f32>,
    invstd: Vec<f32>,
    running_mean: Vec<f32>,
    running_var: Vec<f32>,
    dx: Vec<T>,
    dweight: Vec<f32>,
    dbias: Vec<f32>,
    total: u64,
}

/// The single-device GPU path on the whole batch.
fn single_device<T: Element>(gpu: &GpuContext, b: &Batch<T>) -> Outcome<T> {
    let (n, c, desc) = (b.full.numel(), b.full.channels(), &b.full);
    let mut ws = Workspace::new();
    let (x, dy) = (upload(gpu, &b.x), upload(gpu, &b.dy));
    let (w, bias) = (upload(gpu, &b.weight), upload(gpu, &b.bias));
    let (mut rm, mut rv) = (upload(gpu, &b.running_mean), upload(gpu, &b.running_var));
    let (mut mean, mut invstd) = (zeros::<f32>(gpu, c), zeros::<f32>(gpu, c));
    let mut mean_lo = zeros::<f32>(gpu, c);
    let mut y = zeros::<T>(gpu, n);
    functional::forward(
        gpu,
        &mut ws,
        functional::Forward {
            desc: *desc,
            x: x.as_view(),
            weight: Some(w.as_view()),
            bias: Some(bias.as_view()),
            stats: functional::ForwardStats::Batch(functional::BatchStats {
                saved: SavedStatsMut {
                    mean: mean.as_view_mut(),
                    mean_lo: mean_lo.as_view_mut(),
                    invstd: invstd.as_view_mut(),
                },
                running: Some(RunningUpdate {
                    mean: rm.as_view_mut(),
                    var: rv.as_view_mut(),
                    factor: MOMENTUM,
                    var_update: Default::default(),
                }),
                eps: EPS,
            }),
            y: y.as_view_mut(),
            epilogue: functional::Epilogue::None,
        },
    )
    .expect("single-device forward");
    let mut dx = zeros::<T>(gpu, n);
    let (mut dw, mut db) = (zeros::<f32>(gpu, c), zeros::<f32>(gpu, c));
    let saved = SavedStats {
        mean: mean.as_view(),
        mean_lo: Some(mean_lo.as_view()),
        invstd: invstd.as_view(),
    };
    let grads = GradientsMut {
        dx: Some(dx.as_view_mut()),
        dweight: Some(dw.as_view_mut()),
        dbias: Some(db.as_view_mut()),
        accumulate: false,
    };
    functional::backward(
        gpu,
        &mut ws,
        functional::Backward {
            desc: *desc,
            x: x.as_view(),
            dy: dy.as_view(),
            weight: Some(w.as_view()),
            stats: functional::BackwardStats::Batch(saved),
            grads,
            epilogue: functional::EpilogueGrad::None,
        },
    )
    .expect("single-device backward");
    Outcome {
        y: download(gpu, &y),
        mean: download(gpu, &mean),
        mean_lo: download(gpu, &mean_lo),
        invstd: download(gpu, &invstd),
        running_mean: download(gpu, &rm),
        running_var: download(gpu, &rv),
        dx: download(gpu, &dx),
        dweight: download(gpu, &dw),
        dbias: download(gpu, &db),
        total: desc.per_channel() as u64,
    }
}

/// Every rank's buffers.
struct Rank<T> {
    desc: TensorDesc,
    range: std::ops::Range<usize>,
    ws: Workspace,
    running_mean: CudaSlice<f32>,
    running_var: CudaSlice<f32>,
    mean: CudaSlice<f32>,
    mean_lo: CudaSlice<f32>,
    invstd: CudaSlice<f32>,
    total: CudaSlice<u64>,
    y: CudaSlice<T>,
    sums: CudaSlice<f32>,
    dx: CudaSlice<T>,
    dweight: CudaSlice<f32>,
    dbias: CudaSlice<f32>,
}

/// The shards of `b` on one device, each rank with its own buffers, merged by the sync kernels;
/// the all-gather is the shared `[R][C][4]` buffer every rank writes its slot of, the all-reduce
/// a host sum in rank order.
fn shards_on_device<T: Element>(gpu: &GpuContext, b: &Batch<T>) -> Vec<Outcome<T>> {
    let c = b.full.channels();
    let (x, dy) = (upload_padded(gpu, &b.x), upload_padded(gpu, &b.dy));
    let (w, bias) = (upload(gpu, &b.weight), upload(gpu, &b.bias));
    let mut ranks: Vec<Rank<T>> = b
        .shards()
        .into_iter()
        .map(|(desc, range)| Rank {
            desc,
            ws: Workspace::new(),
            running_mean: upload(gpu, &b.running_mean),
            running_var: upload(gpu, &b.running_var),
            mean: zeros(gpu, c),
            mean_lo: zeros(gpu, c),
            invstd: zeros(gpu, c),
            total: gpu.stream().alloc_zeros::<u64>(1).unwrap(),
            y: buffer(gpu, range.len()),
            sums: zeros(gpu, 2 * c),
            dx: buffer(gpu, range.len()),
            dweight: zeros(gpu, c),
            dbias: zeros(gpu, c),
            range,
        })
        .collect();
    let world = ranks.len();
    let per_rank = MOMENT_FLOATS * c;
    let mut gathered = zeros::<f32>(gpu, world * per_rank);
    for (r, rank) in ranks.iter_mut().enumerate() {
        sync::local_moments(
            gpu,
            &mut rank.ws,
            &x.slice(rank.range.clone()),
            &rank.desc,
            &mut gathered.slice_mut(r * per_rank..(r + 1) * per_rank),
        )
        .expect("local moments");
    }
    for rank in &mut ranks {
        let n = rank.range.len();
        let request = functional::Forward {
            desc: rank.desc,
            x: x.slice(rank.range.clone()),
            weight: Some(w.as_view()),
            bias: Some(bias.as_view()),
            stats: ForwardStats::Batch(BatchStats {
                saved: SavedStatsMut {
                    mean: rank.mean.as_view_mut(),
                    mean_lo: rank.mean_lo.as_view_mut(),
                    invstd: rank.invstd.as_view_mut(),
                },
                running: Some(RunningUpdate {
                    mean: rank.running_mean.as_view_mut(),
                    var: rank.running_var.as_view_mut(),
                    factor: MOMENTUM,
                    var_update: Default::default(),
                }),
                eps: EPS,
            }),
            y: rank.y.slice_mut(..n),
            epilogue: Epilogue::None,
        };
        let gathered = GatheredMoments {
            moments: gathered.as_view(),
            ranks: world,
        };
        let total = rank.total.as_view_mut();
        sync::forward_training(gpu, request, total, &gathered).expect("sync forward");
    }
    for rank in &mut ranks {
        let saved = SavedStats {
            mean: rank.mean.as_view(),
            mean_lo: Some(rank.mean_lo.as_view()),
            invstd: rank.invstd.as_view(),
        };
        sync::local_grad_sums(
            gpu,
            &mut rank.ws,
            &x.slice(rank.range.clone()),
            &dy.slice(rank.range.clone()),
            &rank.desc,
            &saved,
            &mut rank.sums.as_view_mut(),
        )
        .expect("local sums");
    }
    // The all-reduce, in rank order on the host.
    let mut global = vec![0.0f32; 2 * c];
    for rank in &ranks {
        for (g, s) in global.iter_mut().zip(download(gpu, &rank.sums)) {
            *g += s;
        }
    }
    let global = upload(gpu, &global);
    for rank in &mut ranks {
        let n = rank.range.len();
        let saved = SavedStats {
            mean: rank.mean.as_view(),
            mean_lo: Some(rank.mean_lo.as_view()),
            invstd: rank.invstd.as_view(),
        };
        let sums = ReducedSums {
            local: rank.sums.as_view(),
            global: global.as_view(),
        };
        let grads = GradientsMut {
            dx: Some(rank.dx.slice_mut(..n)),
            dweight: Some(rank.dweight.as_view_mut()),
            dbias: Some(rank.dbias.as_view_mut()),
            accumulate: false,
        };
        let request = sync::SyncBackward {
            desc: rank.desc,
            x: x.slice(rank.range.clone()),
            dy: dy.slice(rank.range.clone()),
            weight: Some(w.as_view()),
            saved,
            total: rank.total.as_view(),
            grads,
        };
        sync::backward_training(gpu, &mut rank.ws, request, &sums).expect("sync backward");
    }
    ranks
        .iter()
        .map(|rank| {
            let n = rank.range.len();
            Outcome {
                y: download(gpu, &rank.y)[..n].to_vec(),
                mean: download(gpu, &rank.mean),
                mean_lo: download(gpu, &rank.mean_lo),
                invstd: download(gpu, &rank.invstd),
                running_mean: download(gpu, &rank.running_mean),
                running_var: download(gpu, &rank.running_var),
                dx: download(gpu, &rank.dx)[..n].to_vec(),
                dweight: download(gpu, &rank.dweight),
                dbias: download(gpu, &rank.dbias),
                total: gpu.stream().clone_dtoh(&rank.total).unwrap()[0],
            }
        })
        .collect()
}

/// The CPU reference on the whole batch.
fn cpu_reference<T: Element>(b: &Batch<T>) -> Outcome<T> {
    let (n, c, desc) = (b.full.numel(), b.full.channels(), &b.full);
    let (mut rm, mut rv) = (b.running_mean.clone(), b.running_var.clone());
    let mut y = vec![T::default(); n];
    let saved = reference::forward_training(
        &b.x,
        desc,
        Some(&b.weight),
        Some(&b.bias),
        Some(reference::RunningUpdate::pytorch(
            &mut rm, &mut rv, MOMENTUM,
        )),
        EPS,
        &mut y,
    )
    .unwrap();
    let mut dx = vec![T::default(); n];
    let (mut dw, mut db) = (vec![0.0; c], vec![0.0; c]);
    reference::backward_training(
        &b.x,
        &b.dy,
        desc,
        Some(&b.weight),
        &saved,
        reference::Gradients {
            dx: Some(&mut dx),
            dweight: Some(&mut dw),
            dbias: Some(&mut db),
            accumulate: false,
        },
    )
    .unwrap();
    Outcome {
        y,
        mean: saved.mean,
        mean_lo: saved.mean_lo,
        invstd: saved.invstd,
        running_mean: rm,
        running_var: rv,
        dx,
        dweight: dw,
        dbias: db,
        total: desc.per_channel() as u64,
    }
}

/// The ranks against one whole-batch outcome: `y` and `dx` slices, statistics, running
/// statistics, the parameter gradients summed over the ranks.
fn compare_ranks<T: Element>(what: &str, b: &Batch<T>, ranks: &[Outcome<T>], want: &Outcome<T>) {
    let tol = tolerance(T::DTYPE, Quantity::Activation);
    for (r, ((_, range), got)) in b.shards().into_iter().zip(ranks).enumerate() {
        let what = format!("{what} rank {r}");
        check(
            &format!("{what} y"),
            &widen(&got.y),
            &widen(&want.y[range.clone()]),
            tol,
        );
        check(
            &format!("{what} dx"),
            &widen(&got.dx),
            &widen(&want.dx[range]),
            tol,
        );
        for (name, g, w) in [
            ("save_mean", &got.mean, &want.mean),
            ("save_invstd", &got.invstd, &want.invstd),
            ("running_mean", &got.running_mean, &want.running_mean),
            ("running_var", &got.running_var, &want.running_var),
        ] {
            check(
                &format!("{what} {name}"),
                &widen_f32(g),
                &widen_f32(w),
                STATS,
            );
        }
        assert_eq!(got.total, want.total, "{what} global count");
    }
    let c = want.dweight.len();
    let summed = |pick: fn(&Outcome<T>) -> &Vec<f32>| -> Vec<f64> {
        (0..c)
            .map(|ch| ranks.iter().map(|o| f64::from(pick(o)[ch])).sum())
            .collect()
    };
    check(
        &format!("{what} dweight"),
        &summed(|o| &o.dweight),
        &widen_f32(&want.dweight),
        tolerance(DType::F32, Quantity::ParamGrad),
    );
    check(
        &format!("{what} dbias"),
        &summed(|o| &o.dbias),
        &widen_f32(&want.dbias),
        tolerance(DType::F32, Quantity::ParamGrad),
    );
}

/// Every rank holds bitwise rank 0's statistics.
fn assert_ranks_agree<T>(what: &str, ranks: &[Outcome<T>]) {
    for (r, o) in ranks.iter().enumerate().skip(1) {
        let first = &ranks[0];
        assert_eq!(
            bits(&o.mean),
            bits(&first.mean),
            "{what} rank {r} save_mean"
        );
        assert_eq!(
            bits(&o.mean_lo),
            bits(&first.mean_lo),
            "{what} rank {r} save_mean_lo"
        );
        assert_eq!(
            bits(&o.invstd),
            bits(&first.invstd),
            "{what} rank {r} save_invstd"
        );
        assert_eq!(
            bits(&o.running_mean),
            bits(&first.running_mean),
            "{what} rank {r} running_mean"
        );
        assert_eq!(
            bits(&o.running_var),
            bits(&first.running_var),
            "{what} rank {r} running_var"
        );
    }
}

/// Unequal batch sizes with empty shards for `ranks` ranks, total `n`.
fn sizes(n: usize, ranks: usize) -> Vec<usize> {
    match ranks {
        1 => vec![n],
        2 => vec![0, n],
        3 => vec![n - 3, 0, 3],
        8 => {
            let mut s = vec![0, 1, 0, 2, 0, 0, 1, 0];
            s[7] = n - 4;
            s
        }
        _ => unreachable!(),
    }
}

fn shards_match<T: Element>(gpu: &GpuContext, full: TensorDesc, ranks: usize, seed: u64) {
    let b = Batch::<T>::new(full, sizes(full.batch(), ranks), seed, 0.5, 2.0);
    let what = format!("{full} {} shards {:?}", T::DTYPE, b.sizes);
    let got = shards_on_device(gpu, &b);
    assert_ranks_agree(&what, &got);
    let single = single_device(gpu, &b);
    compare_ranks(&format!("{what} vs GPU"), &b, &got, &single);
    compare_ranks(&format!("{what} vs CPU"), &b, &got, &cpu_reference(&b));
    if ranks == 1 {
        // A world of one is bn_stats bit for bit: the merge of one rank is exact.
        let o = &got[0];
        assert_eq!(bits(&o.mean), bits(&single.mean), "{what} save_mean");
        // The moments kernel's and bn_stats' shifted means may differ in their last bits, f32
        // rounding noise far below the mean's own resolution that only mean_lo shows.
        for ((lo, single_lo), mean) in o.mean_lo.iter().zip(&single.mean_lo).zip(&o.mean) {
            let bound = common::ulp(DType::F32, f64::from(*mean)) * 2f64.powi(-24);
            assert!(
                (f64::from(*lo) - f64::from(*single_lo)).abs() <= bound,
                "{what} save_mean_lo {lo:e} vs {single_lo:e}"
            );
        }
        assert_eq!(bits(&o.invstd), bits(&single.invstd), "{what} save_invstd");
        assert_eq!(
            bits(&o.running_mean),
            bits(&single.running_mean),
            "{what} running_mean"
        );
        assert_eq!(
            bits(&o.running_var),
            bits(&single.running_var),
            "{what} running_var"
        );
        assert_eq!(widen(&o.y), widen(&single.y), "{what} y");
    }
}

/// The synchronized forward takes functional's request: in a world of one, a fused epilogue
/// gives `y` and the mask of the single-device forward bit for bit; running statistics (eval,
/// which does not synchronize) are refused before anything is written.
#[test]
#[ignore = "needs a CUDA device"]
fn sync_forward_runs_the_epilogue_as_the_single_device_forward() {
    let gpu = gpu();
    let desc = TensorDesc::nchw(6, 5, 7, 3).unwrap();
    let (n, c) = (desc.numel(), desc.channels());
    let x = upload(&gpu, &random::<f32>(31, n, 0.5, 2.0));
    let z = upload(&gpu, &random::<f32>(32, n, -1.0, 1.0));
    let run = |sync_path: bool| {
        let stream = gpu.stream();
        let mut y = zeros::<f32>(&gpu, n);
        let mut mask = stream.alloc_zeros::<u32>(mask_words(&desc)).unwrap();
        let [mut mean, mut mean_lo, mut invstd] = [0; 3].map(|_| zeros::<f32>(&gpu, c));
        let mut ws = Workspace::new();
        let request = functional::Forward {
            desc,
            x: x.as_view(),
            weight: None,
            bias: None,
            stats: ForwardStats::Batch(BatchStats {
                saved: SavedStatsMut {
                    mean: mean.as_view_mut(),
                    mean_lo: mean_lo.as_view_mut(),
                    invstd: invstd.as_view_mut(),
                },
                running: None,
                eps: EPS,
            }),
            y: y.as_view_mut(),
            epilogue: Epilogue::AddRelu {
                z: z.as_view(),
                mask: Some(mask.as_view_mut()),
            },
        };
        if sync_path {
            let mut moments = zeros::<f32>(&gpu, MOMENT_FLOATS * c);
            let mut total = stream.alloc_zeros::<u64>(1).unwrap();
            let xv = x.as_view();
            sync::local_moments(&gpu, &mut ws, &xv, &desc, &mut moments.as_view_mut())
                .expect("local moments");
            let gathered = GatheredMoments {
                moments: moments.as_view(),
                ranks: 1,
            };
            sync::forward_training(&gpu, request, total.as_view_mut(), &gathered)
                .expect("sync forward");
        } else {
            functional::forward(&gpu, &mut ws, request).expect("forward");
        }
        (download(&gpu, &y), stream.clone_dtoh(&mask).unwrap())
    };
    let (sync_y, sync_mask) = run(true);
    let (y, mask) = run(false);
    assert_eq!(bits(&sync_y), bits(&y), "y");
    assert_eq!(sync_mask, mask, "mask");
    assert!(mask.iter().any(|&w| w != 0) && y.contains(&0.0));

    let (mean, var) = (upload(&gpu, &[0f32; 5]), upload(&gpu, &[1f32; 5]));
    let sentinel = vec![7f32; n];
    let mut y = upload(&gpu, &sentinel);
    let mut total = gpu.stream().alloc_zeros::<u64>(1).unwrap();
    let moments = zeros::<f32>(&gpu, MOMENT_FLOATS * c);
    let eval = functional::Forward {
        desc,
        x: x.as_view(),
        weight: None,
        bias: None,
        stats: ForwardStats::Running {
            stats: RunningStats {
                mean: mean.as_view(),
                var: var.as_view(),
            },
            eps: EPS,
        },
        y: y.as_view_mut(),
        epilogue: Epilogue::None,
    };
    let gathered = GatheredMoments {
        moments: moments.as_view(),
        ranks: 1,
    };
    let got = sync::forward_training(&gpu, eval, total.as_view_mut(), &gathered);
    assert!(matches!(got, Err(Error::Unsupported { .. })), "{got:?}");
    assert_eq!(download(&gpu, &y), sentinel);
}

#[test]
#[ignore = "needs a CUDA device"]
fn shards_on_one_device_match_the_concatenated_batch() {
    let gpu = gpu();
    let dims: &[&[usize]] = &[
        &[12, 3],
        &[12, 1001],
        &[12, 17, 33],
        &[12, 16, 8, 8],
        &[12, 3, 5, 7],
        &[12, 8, 1, 1],
        &[12, 2, 3, 4, 5],
    ];
    let mut seed = 1;
    for &ranks in &[1usize, 2, 3, 8] {
        for d in dims {
            for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
                for dtype in DType::ALL {
                    seed += 10;
                    let full = TensorDesc::new(d, layout).unwrap();
                    with_dtype!(dtype, shards_match(&gpu, full, ranks, seed));
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn large_shards_split_and_merge() {
    // Many splits per channel within each shard, both traversals, 2^20 values per channel.
    let gpu = gpu();
    for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
        let full = TensorDesc::new(&[16, 4, 256, 256], layout).unwrap();
        let b = Batch::<half::f16>::new(full, vec![5, 0, 11], 77, 0.5, 2.0);
        let got = shards_on_device(&gpu, &b);
        assert_ranks_agree("large", &got);
        compare_ranks("large vs GPU", &b, &got, &single_device(&gpu, &b));
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn large_mean_keeps_the_variance_across_ranks() {
    let gpu = gpu();
    let full = TensorDesc::new(&[12, 4, 32, 32], Layout::ChannelsFirst).unwrap();
    let b = Batch::<f32>::new(full, vec![3, 0, 9], 5, 1000.0, 0.1);
    let got = shards_on_device(&gpu, &b);
    let want = cpu_reference(&b);
    check(
        "invstd at mean 1000, std 0.1",
        &widen_f32(&got[1].invstd),
        &widen_f32(&want.invstd),
        Tol::Elementwise {
            atol: 0.0,
            rtol: 1e-4,
        },
    );
}

/// The synchronized form on offset data (`common::offset`): uneven shards, an empty one
/// included, merged on the device; every output against the exact results of the concatenated
/// batch with the golden tolerances (`offset.rs` runs the same cases on the CPU reference).
fn offset_shards<T: Element>(gpu: &GpuContext, full: TensorDesc, seed: u64, shares: &mut Shares) {
    let case = offset::Case::<T>::new(full, offsets(T::DTYPE)[0], true, Form::Plain, seed);
    let b = Batch {
        full,
        sizes: vec![full.batch() - 3, 0, 3],
        x: case.x.clone(),
        dy: case.dy.clone(),
        weight: case.weight.clone(),
        bias: case.bias.clone(),
        running_mean: case.running_mean.clone(),
        running_var: case.running_var.clone(),
    };
    let ranks = shards_on_device(gpu, &b);
    assert_ranks_agree(&case.label(), &ranks);
    let c = full.channels();
    let summed = |pick: fn(&Outcome<T>) -> &Vec<f32>| -> Vec<f32> {
        (0..c)
            .map(|ch| ranks.iter().map(|o| f64::from(pick(o)[ch])).sum::<f64>() as f32)
            .collect()
    };
    let first = &ranks[0];
    let got = offset::Outcome {
        y: ranks.iter().flat_map(|o| o.y.iter().copied()).collect(),
        mask: None,
        saved: Some((
            first.mean.clone(),
            first.mean_lo.clone(),
            first.invstd.clone(),
        )),
        running_mean: first.running_mean.clone(),
        running_var: first.running_var.clone(),
        dx: ranks.iter().flat_map(|o| o.dx.iter().copied()).collect(),
        dweight: summed(|o| &o.dweight),
        dbias: summed(|o| &o.dbias),
        dz: None,
    };
    offset::check(&case, &got, shares);
}

#[test]
#[ignore = "needs a CUDA device"]
fn offset_shards_keep_the_mean() {
    let gpu = gpu();
    let mut shares = Shares::default();
    let mut seed = 1000;
    for full in offset::shapes().into_iter().filter(|d| d.batch() >= 4) {
        for dtype in DType::ALL {
            seed += 1;
            with_dtype!(dtype, offset_shards(&gpu, full, seed, &mut shares));
        }
    }
    shares.print("GPU sync offset cases");
}

#[test]
#[ignore = "needs a CUDA device"]
fn fewer_than_two_values_in_the_world_leave_the_running_statistics() {
    let gpu = gpu();
    for (sizes, total) in [(vec![0, 0, 0], 0u64), (vec![0, 1, 0], 1)] {
        let full = TensorDesc::new(&[total as usize, 5], Layout::ChannelsFirst).unwrap();
        let b = Batch::<f32>::new(full, sizes, 3, 0.0, 1.0);
        let got = shards_on_device(&gpu, &b);
        for o in &got {
            assert_eq!(o.total, total);
            assert_eq!(bits(&o.running_mean), bits(&b.running_mean));
            assert_eq!(bits(&o.running_var), bits(&b.running_var));
            assert!(o.dweight.iter().chain(&o.dbias).all(|v| v.is_finite()));
        }
        if total == 1 {
            // The one value is the mean: y = bias.
            assert_eq!(widen(&got[1].y), widen_f32(&b.bias));
        }
    }
}

#[cfg(feature = "nccl")]
mod nccl {
    use super::*;
    use batchnorm_cuda::gpu::sync::SyncBatchNorm;
    use batchnorm_cuda::gpu::BatchNorm;
    use batchnorm_cuda::{BatchNormConfig, Error};

    fn world_of_one(gpu: &GpuContext, config: BatchNormConfig) -> SyncBatchNorm {
        let id = sync::unique_id().expect("NCCL unique id (is libnccl installed?)");
        let comm = sync::communicator(gpu, 0, 1, id).expect("NCCL communicator");
        SyncBatchNorm::new(gpu, config, comm).expect("SyncBatchNorm")
    }

    /// Three training steps of `SyncBatchNorm` over NCCL and `BatchNorm` on the same batches:
    /// the forward bitwise (the merge of one rank is exact), the backward within tolerance.
    fn matches_batch_norm<T: Element>(gpu: &GpuContext, desc: TensorDesc, momentum: Option<f32>) {
        let c = desc.channels();
        let config = BatchNormConfig::new(c).momentum(momentum);
        let mut synced = world_of_one(gpu, config);
        let mut plain = BatchNorm::new(gpu, config).unwrap();
        assert_eq!((synced.rank(), synced.world_size()), (0, 1));
        let (w, b) = (random_f32(1, c, 0.5, 1.5), random_f32(2, c, -0.5, 0.5));
        synced.set_weight(&w).unwrap();
        plain.set_weight(&w).unwrap();
        synced.set_bias(&b).unwrap();
        plain.set_bias(&b).unwrap();
        let what = format!(
            "NCCL world of one, {desc} {} momentum {momentum:?}",
            T::DTYPE
        );
        for step in 0..3u64 {
            let x = upload(gpu, &random::<T>(10 + step, desc.numel(), 0.3, 2.0));
            let dy = upload(gpu, &random::<T>(20 + step, desc.numel(), 0.0, 1.0));
            let (mut ys, mut yp) = (zeros::<T>(gpu, desc.numel()), zeros::<T>(gpu, desc.numel()));
            let cs = synced
                .forward(&desc, &x.as_view(), &mut ys.as_view_mut())
                .unwrap();
            let cp = plain
                .forward(&desc, &x.as_view(), &mut yp.as_view_mut())
                .unwrap();
            assert_eq!(
                widen(&download(gpu, &ys)),
                widen(&download(gpu, &yp)),
                "{what} y"
            );
            let (ss, sp) = (
                synced.saved_stats(&cs).unwrap().unwrap(),
                plain.saved_stats(&cp).unwrap().unwrap(),
            );
            assert_eq!(bits(&ss.mean), bits(&sp.mean), "{what} save_mean");
            assert_eq!(bits(&ss.invstd), bits(&sp.invstd), "{what} save_invstd");
            let (s, p) = (synced.state().unwrap(), plain.state().unwrap());
            assert_eq!(s, p, "{what} step {step} state");
            assert_eq!(
                synced.last_global_count().unwrap(),
                desc.per_channel() as u64
            );

            let (mut dxs, mut dxp) = (zeros::<T>(gpu, desc.numel()), zeros::<T>(gpu, desc.numel()));
            synced
                .backward(&cs, &x.as_view(), &dy.as_view(), Some(dxs.as_view_mut()))
                .unwrap();
            plain
                .backward(&cp, &x.as_view(), &dy.as_view(), Some(dxp.as_view_mut()))
                .unwrap();
            check(
                &format!("{what} dx"),
                &widen(&download(gpu, &dxs)),
                &widen(&download(gpu, &dxp)),
                tolerance(T::DTYPE, Quantity::Activation),
            );
            // The local sums are bn_backward's own: accumulated gradients bitwise.
            assert_eq!(
                bits(&synced.grad_weight().unwrap().unwrap()),
                bits(&plain.grad_weight().unwrap().unwrap()),
                "{what} grad_weight"
            );
            assert_eq!(
                bits(&synced.grad_bias().unwrap().unwrap()),
                bits(&plain.grad_bias().unwrap().unwrap()),
                "{what} grad_bias"
            );
        }
        // Eval is local: the plain layer's result.
        synced.eval();
        plain.eval();
        let x = upload(gpu, &random::<T>(99, desc.numel(), 0.3, 2.0));
        let (mut ys, mut yp) = (zeros::<T>(gpu, desc.numel()), zeros::<T>(gpu, desc.numel()));
        synced
            .forward(&desc, &x.as_view(), &mut ys.as_view_mut())
            .unwrap();
        plain
            .forward(&desc, &x.as_view(), &mut yp.as_view_mut())
            .unwrap();
        assert_eq!(
            widen(&download(gpu, &ys)),
            widen(&download(gpu, &yp)),
            "{what} eval y"
        );
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn nccl_world_of_one_matches_batch_norm() {
        let gpu = gpu();
        for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
            let desc = TensorDesc::new(&[4, 6, 9, 7], layout).unwrap();
            matches_batch_norm::<f32>(&gpu, desc, Some(0.1));
            matches_batch_norm::<half::f16>(&gpu, desc, None);
            matches_batch_norm::<half::bf16>(
                &gpu,
                TensorDesc::new(&[33, 17], layout).unwrap(),
                Some(0.1),
            );
        }
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn nccl_world_of_one_empty_and_single_value_batches() {
        let gpu = gpu();
        let mut synced = world_of_one(&gpu, BatchNormConfig::new(3));
        let before = synced.state().unwrap();
        // Empty shard: every collective still runs; statistics unchanged, counter moves.
        let empty = TensorDesc::new(&[0, 3, 4], Layout::ChannelsFirst).unwrap();
        let (x, dy) = (zeros::<f32>(&gpu, 1), zeros::<f32>(&gpu, 1));
        let mut y = zeros::<f32>(&gpu, 1);
        let cache = synced
            .forward(&empty, &x.slice(..0), &mut y.slice_mut(..0))
            .unwrap();
        assert_eq!(synced.last_global_count().unwrap(), 0);
        let after = synced.state().unwrap();
        assert_eq!(after.running_mean, before.running_mean);
        assert_eq!(after.running_var, before.running_var);
        assert_eq!(after.num_batches_tracked, 1);
        synced
            .backward(&cache, &x.slice(..0), &dy.slice(..0), None)
            .unwrap();
        // One value per channel in a world of one: PyTorch's error, before any collective.
        let single = TensorDesc::new(&[1, 3], Layout::ChannelsFirst).unwrap();
        let x = zeros::<f32>(&gpu, 3);
        let mut y = zeros::<f32>(&gpu, 3);
        assert!(matches!(
            synced.forward(&single, &x.as_view(), &mut y.as_view_mut()),
            Err(Error::SingleValuePerChannel { .. })
        ));
        assert_eq!(synced.num_batches_tracked(), 1);
    }

    /// One rank of an NCCL world, on device `rank`, in its own thread: a training step over its
    /// shard of `b`, from the batch's starting state.
    fn nccl_rank<T: Element>(
        b: &Batch<T>,
        rank: usize,
        id: [core::ffi::c_char; 128],
    ) -> Outcome<T> {
        let gpu = GpuContext::new(rank).expect("one device per rank");
        let comm = sync::communicator(&gpu, rank, b.sizes.len(), cudarc::nccl::Id::uninit(id))
            .expect("NCCL communicator");
        let c = b.full.channels();
        let mut layer = SyncBatchNorm::new(&gpu, BatchNormConfig::new(c), comm).unwrap();
        layer.set_weight(&b.weight).unwrap();
        layer.set_bias(&b.bias).unwrap();
        layer
            .set_running_stats(&b.running_mean, &b.running_var)
            .unwrap();
        let (desc, range) = b.shards().swap_remove(rank);
        let (x, dy) = (
            upload_padded(&gpu, &b.x[range.clone()]),
            upload_padded(&gpu, &b.dy[range.clone()]),
        );
        let n = range.len();
        let (mut y, mut dx) = (buffer::<T>(&gpu, n), buffer::<T>(&gpu, n));
        let cache = layer
            .forward(&desc, &x.slice(..n), &mut y.slice_mut(..n))
            .unwrap();
        layer
            .backward(
                &cache,
                &x.slice(..n),
                &dy.slice(..n),
                Some(dx.slice_mut(..n)),
            )
            .unwrap();
        let saved = layer.saved_stats(&cache).unwrap().unwrap();
        Outcome {
            y: download(&gpu, &y)[..n].to_vec(),
            mean: saved.mean,
            mean_lo: saved.mean_lo,
            invstd: saved.invstd,
            running_mean: layer.running_mean().unwrap().unwrap(),
            running_var: layer.running_var().unwrap().unwrap(),
            dx: download(&gpu, &dx)[..n].to_vec(),
            dweight: layer.grad_weight().unwrap().unwrap(),
            dbias: layer.grad_bias().unwrap().unwrap(),
            total: layer.last_global_count().unwrap(),
        }
    }

    /// Ranks on separate devices, one thread each, with unequal and empty shards: every rank
    /// gets bitwise the same statistics, and the whole batch's results. Needs two or more
    /// devices (NCCL refuses two ranks on one GPU); the emulated driver has EMU_DEVICE_COUNT.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn nccl_ranks_on_separate_devices_match_the_whole_batch() {
        let gpu = gpu();
        let devices = cudarc::driver::CudaContext::device_count().unwrap() as usize;
        if devices < 2 {
            println!(
                "NOT RUN: {devices} CUDA device(s); an NCCL world of several ranks needs one each"
            );
            return;
        }
        let ranks = devices.min(3);
        for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
            let full = TensorDesc::new(&[7, 5, 6, 3], layout).unwrap();
            let b = Batch::<f32>::new(full, sizes(full.batch(), ranks), 31, 0.5, 2.0);
            let what = format!("NCCL {ranks} ranks {full} shards {:?}", b.sizes);
            let id = *sync::unique_id().unwrap().internal();
            let got: Vec<Outcome<f32>> = std::thread::scope(|s| {
                let b = &b;
                let handles: Vec<_> = (0..ranks)
                    .map(|rank| s.spawn(move || nccl_rank(b, rank, id)))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert_ranks_agree(&what, &got);
            compare_ranks(
                &format!("{what} vs GPU"),
                &b,
                &got,
                &single_device(&gpu, &b),
            );
            compare_ranks(&format!("{what} vs CPU"), &b, &got, &cpu_reference(&b));
        }
    }
}
