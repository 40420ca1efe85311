//! Issue 8, scale (every test needs a CUDA device: run with `--include-ignored` on a GPU
//! machine, `scripts/gpu-run.sh`):
//!
//! * an f16 tensor of more than 2^31 elements (32 x 64 x 1024 x 1100 = 2.31e9, 4.6 GB) through
//!   the layer's training forward and backward, in both layouts (the 64-bit index kernels),
//!   checked against the CPU reference on sampled channels: channels are independent, so the
//!   sub-tensor of the sampled channels through the reference is an exact oracle for them;
//! * device allocations that fail: a raw one, a layer whose parameters cannot fit, and a
//!   forward whose workspace cannot be allocated because the device is full; each is an error,
//!   changes nothing, and the layer works once memory is there.
//!
//! Each test uses most of the device's memory, so they take a lock and run one at a time.

mod common;

use batchnorm_cuda::gpu::{self, GpuContext};
use batchnorm_cuda::reference::{self, CachedStats};
use batchnorm_cuda::{BatchNormConfig, DType, Error, LayerState, Layout, TensorDesc};
use common::gpu::{download, gpu, random, ratio, upload, zeros};
use common::{tolerance, widen, widen_f32, Quantity};
use cudarc::driver::{sys::CUresult, CudaSlice};
use half::f16;
use rayon::prelude::*;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

/// Held by every test here: each one fills most of the device.
static DEVICE_MEMORY: Mutex<()> = Mutex::new(());

fn exclusive() -> MutexGuard<'static, ()> {
    DEVICE_MEMORY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// --------------------------------------------------------------------- more than 2^31 elements

const BIG_DIMS: [usize; 4] = [32, 64, 1024, 1100];
/// The channels checked against the reference: first, last and two between.
const SAMPLED: [usize; 4] = [0, 17, 42, 63];

/// SplitMix64: a counter-based generator, so any element's value can be made again alone.
fn hash(seed: u64, i: u64) -> u64 {
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(i.wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(0x94D0_49BB_1331_11EB);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in [-1, 1), from element index `i` of the full tensor.
fn unit(seed: u64, i: usize) -> f64 {
    (hash(seed, i as u64) >> 11) as f64 / (1u64 << 52) as f64 - 1.0
}

/// `x` at full-tensor element `i` of channel `c`: a per-channel mean and spread.
fn x_at(c: usize, i: usize) -> f16 {
    let mean = -1.5 + 3.0 * (c as f64) / 63.0;
    let spread = 0.5 + 0.3 * (c % 5) as f64;
    f16::from_f64(mean + spread * unit(1, i))
}

/// `dy` at element `i`: correlated with `x` (as real gradients are), plus noise and an offset.
fn dy_at(_c: usize, i: usize) -> f16 {
    f16::from_f64(0.25 * unit(1, i) + 0.5 * unit(2, i) + 0.05)
}

/// The full tensor `desc` filled by `value(channel, index)`, in parallel.
fn fill(desc: &TensorDesc, value: fn(usize, usize) -> f16) -> Vec<f16> {
    let g = desc.geometry();
    (0..desc.numel())
        .into_par_iter()
        .map(|i| value((i / g.inner) % g.channels, i))
        .collect()
}

/// The sub-tensor of channels `chs` of `full` (same layout), made from `value` directly: element
/// `(o, c', s)` of the sub-tensor is element `(o, chs[c'], s)` of the full one.
fn sub_tensor(
    full: &TensorDesc,
    chs: &[usize],
    value: fn(usize, usize) -> f16,
) -> (TensorDesc, Vec<f16>) {
    let mut dims = full.dims().to_vec();
    dims[1] = chs.len();
    let sub = TensorDesc::new(&dims, full.layout()).unwrap();
    let (g, k) = (full.geometry(), chs.len());
    let data = (0..sub.numel())
        .into_par_iter()
        .map(|j| {
            let (o, c, s) = (j / g.inner / k, chs[(j / g.inner) % k], j % g.inner);
            value(c, g.offset(o, c, s))
        })
        .collect();
    (sub, data)
}

/// The values of channels `chs` of a device tensor, as the sub-tensor of those channels.
/// Channels-first: one copy per (n, channel) plane; channels-last: the whole tensor, gathered.
fn gather(gpu: &GpuContext, full: &TensorDesc, data: &CudaSlice<f16>, chs: &[usize]) -> Vec<f16> {
    let g = full.geometry();
    let k = chs.len();
    match full.layout() {
        Layout::ChannelsFirst => {
            let mut out = Vec::with_capacity(g.outer * k * g.inner);
            for o in 0..g.outer {
                for &c in chs {
                    let start = g.offset(o, c, 0);
                    let plane = gpu
                        .stream()
                        .clone_dtoh(&data.slice(start..start + g.inner))
                        .expect("device to host copy");
                    out.extend_from_slice(&plane);
                }
            }
            out
        }
        Layout::ChannelsLast => {
            let all = download(gpu, data);
            (0..g.outer * k)
                .into_par_iter()
                .map(|j| all[g.offset(j / k, chs[j % k], 0)])
                .collect()
        }
    }
}

fn per_channel(c: usize, a: f32, b: f32) -> Vec<f32> {
    (0..c).map(|i| a + b * (i % 7) as f32).collect()
}

fn pick(values: &[f32], chs: &[usize]) -> Vec<f32> {
    chs.iter().map(|&c| values[c]).collect()
}

fn more_than_2_31_elements(layout: Layout) {
    let _lock = exclusive();
    let gpu = gpu();
    let desc = TensorDesc::new(&BIG_DIMS, layout).unwrap();
    let (n, c) = (desc.numel(), desc.channels());
    assert!(n > 1usize << 31, "{n} elements");
    let clock = Instant::now();

    let x = upload(&gpu, &fill(&desc, x_at));
    let dy = upload(&gpu, &fill(&desc, dy_at));
    println!(
        "{desc}: {n} elements generated and uploaded in {:.1?}",
        clock.elapsed()
    );
    let state = LayerState {
        weight: Some(per_channel(c, 0.5, 0.2)),
        bias: Some(per_channel(c, -0.3, 0.1)),
        running_mean: Some(per_channel(c, 0.1, -0.05)),
        running_var: Some(per_channel(c, 0.8, 0.3)),
        num_batches_tracked: 5,
    };
    let config = BatchNormConfig::new(c);
    let mut bn = gpu::BatchNorm::new(&gpu, config).unwrap();
    bn.load_state(&state).unwrap();
    let mut y = zeros::<f16>(&gpu, n);
    let mut dx = zeros::<f16>(&gpu, n);
    let clock = Instant::now();
    let cache = bn
        .forward(&desc, &x.as_view(), &mut y.as_view_mut())
        .expect("forward of > 2^31 elements");
    let saved = bn.saved_stats(&cache).unwrap().expect("batch statistics");
    bn.backward(&cache, &x.as_view(), &dy.as_view(), Some(dx.as_view_mut()))
        .expect("backward of > 2^31 elements");
    gpu.synchronize().unwrap();
    println!("{desc}: forward + backward in {:.1?}", clock.elapsed());
    drop((x, dy));
    let got_state = bn.state().unwrap();
    let got_y = gather(&gpu, &desc, &y, &SAMPLED);
    drop(y);
    let got_dx = gather(&gpu, &desc, &dx, &SAMPLED);
    drop(dx);

    // The reference on the sampled channels alone.
    let clock = Instant::now();
    let (sub, sub_x) = sub_tensor(&desc, &SAMPLED, x_at);
    let (_, sub_dy) = sub_tensor(&desc, &SAMPLED, dy_at);
    let sub_state = LayerState {
        weight: state.weight.as_deref().map(|v| pick(v, &SAMPLED)),
        bias: state.bias.as_deref().map(|v| pick(v, &SAMPLED)),
        running_mean: state.running_mean.as_deref().map(|v| pick(v, &SAMPLED)),
        running_var: state.running_var.as_deref().map(|v| pick(v, &SAMPLED)),
        num_batches_tracked: state.num_batches_tracked,
    };
    let mut cpu = reference::BatchNorm::new(BatchNormConfig::new(SAMPLED.len())).unwrap();
    cpu.load_state(&sub_state).unwrap();
    let (ref_y, ref_cache) = cpu.forward(&sub_x, &sub).unwrap();
    let ref_grads = cpu.backward(&ref_cache, &sub_x, &sub_dy).unwrap();
    let CachedStats::Batch(ref_saved) = ref_cache.stats() else {
        panic!("a training forward saves batch statistics")
    };
    let ref_state = cpu.state();
    println!("{sub}: reference in {:.1?}", clock.elapsed());

    let act = tolerance(DType::F16, Quantity::Activation);
    let stat = tolerance(DType::F16, Quantity::Statistic);
    let grad = tolerance(DType::F16, Quantity::ParamGrad);
    let f32s = |v: &[f32]| widen_f32(v);
    let sampled = |v: &Option<Vec<f32>>| f32s(&pick(v.as_ref().unwrap(), &SAMPLED));
    let grad_weight = bn.grad_weight().unwrap();
    let grad_bias = bn.grad_bias().unwrap();
    let checks = [
        ("y", ratio(&widen(&got_y), &widen(&ref_y), act)),
        ("dx", ratio(&widen(&got_dx), &widen(&ref_grads.dx), act)),
        (
            "save_mean",
            ratio(
                &f32s(&pick(&saved.mean, &SAMPLED)),
                &f32s(&ref_saved.mean),
                stat,
            ),
        ),
        (
            "save_invstd",
            ratio(
                &f32s(&pick(&saved.invstd, &SAMPLED)),
                &f32s(&ref_saved.invstd),
                stat,
            ),
        ),
        (
            "running_mean",
            ratio(
                &sampled(&got_state.running_mean),
                &f32s(ref_state.running_mean.as_ref().unwrap()),
                stat,
            ),
        ),
        (
            "running_var",
            ratio(
                &sampled(&got_state.running_var),
                &f32s(ref_state.running_var.as_ref().unwrap()),
                stat,
            ),
        ),
        (
            "dweight",
            ratio(
                &sampled(&grad_weight),
                &f32s(ref_grads.dweight.as_ref().unwrap()),
                grad,
            ),
        ),
        (
            "dbias",
            ratio(
                &sampled(&grad_bias),
                &f32s(ref_grads.dbias.as_ref().unwrap()),
                grad,
            ),
        ),
    ];
    for (what, r) in checks {
        println!("{desc} channels {SAMPLED:?}: {what} uses {r:.3} of its tolerance");
    }
    let bad: Vec<_> = checks
        .iter()
        .filter(|(_, r)| r.is_nan() || *r > 1.0)
        .collect();
    assert!(bad.is_empty(), "outside tolerance: {bad:?}");
    assert_eq!(got_state.num_batches_tracked, 6);
}

#[test]
#[ignore = "needs a CUDA device"]
fn more_than_2_31_elements_f16_channels_first() {
    more_than_2_31_elements(Layout::ChannelsFirst);
}

#[test]
#[ignore = "needs a CUDA device"]
fn more_than_2_31_elements_f16_channels_last() {
    more_than_2_31_elements(Layout::ChannelsLast);
}

// --------------------------------------------------------------------- failed device allocations

fn bits(state: &LayerState) -> Vec<Option<Vec<u32>>> {
    [
        &state.weight,
        &state.bias,
        &state.running_mean,
        &state.running_var,
    ]
    .iter()
    .map(|v| v.as_ref().map(|v| v.iter().map(|x| x.to_bits()).collect()))
    .collect()
}

fn assert_state_bitwise(before: &LayerState, after: &LayerState, what: &str) {
    assert_eq!(
        bits(before),
        bits(after),
        "{what}: parameters or statistics changed"
    );
    assert_eq!(
        before.num_batches_tracked, after.num_batches_tracked,
        "{what}: the counter changed"
    );
}

/// One training step of `bn` on `x` and `dy` (f32, layout `desc`), against a CPU layer that
/// starts from the same state; returns the worst tolerance ratio of y, dx and the statistics.
fn step_matches_reference(
    gpu: &GpuContext,
    bn: &mut gpu::BatchNorm,
    desc: &TensorDesc,
    x: &[f32],
    dy: &[f32],
) -> f64 {
    let mut cpu = reference::BatchNorm::new(*bn.config()).unwrap();
    cpu.load_state(&bn.state().unwrap()).unwrap();
    let (ref_y, cache) = cpu.forward(x, desc).unwrap();
    let ref_grads = cpu.backward(&cache, x, dy).unwrap();

    let (xd, dyd) = (upload(gpu, x), upload(gpu, dy));
    let (mut y, mut dx) = (zeros::<f32>(gpu, x.len()), zeros::<f32>(gpu, x.len()));
    let gcache = bn
        .forward(desc, &xd.as_view(), &mut y.as_view_mut())
        .expect("forward");
    bn.backward(
        &gcache,
        &xd.as_view(),
        &dyd.as_view(),
        Some(dx.as_view_mut()),
    )
    .expect("backward");
    let act = tolerance(DType::F32, Quantity::Activation);
    let stat = tolerance(DType::F32, Quantity::Statistic);
    let (got, want) = (bn.state().unwrap(), cpu.state());
    let stats = |s: &LayerState| {
        let mut v = s.running_mean.clone().unwrap();
        v.extend(s.running_var.as_ref().unwrap());
        widen_f32(&v)
    };
    assert_eq!(got.num_batches_tracked, want.num_batches_tracked);
    [
        ratio(&widen(&download(gpu, &y)), &widen(&ref_y), act),
        ratio(&widen(&download(gpu, &dx)), &widen(&ref_grads.dx), act),
        ratio(&stats(&got), &stats(&want), stat),
    ]
    .into_iter()
    .fold(0.0, f64::max)
}

#[test]
#[ignore = "needs a CUDA device"]
fn failed_allocations_are_errors_and_leave_the_layer_usable() {
    let _lock = exclusive();
    let gpu = gpu();

    // A working layer, one step in.
    let small = TensorDesc::new(&[4, 8, 16], Layout::ChannelsFirst).unwrap();
    let (sx, sdy) = (
        random::<f32>(1, 512, 0.5, 2.0),
        random::<f32>(2, 512, 0.0, 1.0),
    );
    let mut layer = gpu::BatchNorm::new(&gpu, BatchNormConfig::new(8)).unwrap();
    assert!(step_matches_reference(&gpu, &mut layer, &small, &sx, &sdy) <= 1.0);
    let before = layer.state().unwrap();

    // A raw allocation no device holds: the driver's out-of-memory code.
    let raw = gpu.stream().alloc_zeros::<u8>(1 << 46);
    match raw {
        Err(e) => {
            assert_eq!(e.0, CUresult::CUDA_ERROR_OUT_OF_MEMORY, "{e:?}");
            println!("64 TiB raw allocation: {e}");
        }
        Ok(_) => panic!("64 TiB allocated"),
    }
    // A layer whose parameters cannot fit: the crate's typed error with the size asked for.
    match gpu::BatchNorm::new(&gpu, BatchNormConfig::new(1 << 40)) {
        Err(e @ Error::OutOfMemory { bytes }) => {
            assert_eq!(bytes, 4 << 40);
            println!("layer of 2^40 channels: {e}");
        }
        other => panic!("layer of 2^40 channels: expected OutOfMemory, got {other:?}"),
    }
    assert_state_bitwise(&before, &layer.state().unwrap(), "after failed allocations");
    assert!(step_matches_reference(&gpu, &mut layer, &small, &sx, &sdy) <= 1.0);
    // That step moved the running statistics: the state the failures below must not change.
    let before = layer.state().unwrap();

    // A forward whose workspace cannot be allocated. (N, C) with C = 2^23: the workspace of its
    // statistics holds several floats per channel (>= 32 MiB), allocated on the first forward.
    let c = 1usize << 23;
    let wide = TensorDesc::new(&[2, c], Layout::ChannelsFirst).unwrap();
    let (wx, wdy) = (
        random::<f32>(3, 2 * c, 0.5, 2.0),
        random::<f32>(4, 2 * c, 0.0, 1.0),
    );
    let mut big = gpu::BatchNorm::new(&gpu, BatchNormConfig::new(c)).unwrap();
    let big_before = big.state().unwrap();
    let xd = upload(&gpu, &wx);
    let mut yd = zeros::<f32>(&gpu, 2 * c);
    gpu.synchronize().unwrap();

    // Fill the device, down to 1 MiB pieces.
    let mut ballast: Vec<CudaSlice<u8>> = Vec::new();
    for piece in [1usize << 30, 1 << 26, 1 << 23, 1 << 20] {
        while let Ok(block) = gpu.stream().alloc_zeros::<u8>(piece) {
            ballast.push(block);
        }
    }
    let held: usize = ballast.iter().map(|b| b.len()).sum();
    println!(
        "ballast: {:.1} GiB in {} pieces",
        held as f64 / (1u64 << 30) as f64,
        ballast.len()
    );

    match big.forward(&wide, &xd.as_view(), &mut yd.as_view_mut()) {
        Err(e @ Error::OutOfMemory { bytes }) => {
            assert!(bytes >= 4 * c, "{bytes} bytes");
            println!("forward on a full device: {e}");
        }
        other => panic!("forward on a full device: expected OutOfMemory, got {other:?}"),
    }
    match gpu::BatchNorm::new(&gpu, BatchNormConfig::new(c)) {
        Err(e @ Error::OutOfMemory { bytes }) => {
            assert_eq!(bytes, 4 * c);
            println!("layer on a full device: {e}");
        }
        other => panic!("layer on a full device: expected OutOfMemory, got {other:?}"),
    }
    assert_state_bitwise(&big_before, &big.state().unwrap(), "failed forward");
    assert_state_bitwise(&before, &layer.state().unwrap(), "other layer");

    // Memory back: the same layers work, and agree with the reference.
    drop(ballast);
    gpu.synchronize().unwrap();
    drop((xd, yd));
    let worst = step_matches_reference(&gpu, &mut big, &wide, &wx, &wdy);
    assert!(worst <= 1.0, "layer after its failed forward: {worst}");
    let worst = step_matches_reference(&gpu, &mut layer, &small, &sx, &sdy);
    assert!(worst <= 1.0, "other layer: {worst}");
}
