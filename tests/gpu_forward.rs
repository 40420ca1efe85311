//! GPU forward (training and eval) against the CPU reference. Every test needs a CUDA device:
//! run with `--include-ignored` on a GPU machine (`scripts/gpu-run.sh`).

mod common;

use batchnorm_cuda::gpu::functional::{self, RunningStats, RunningUpdate, SavedStatsMut};
use batchnorm_cuda::gpu::{self, GpuContext, Workspace};
use batchnorm_cuda::reference;
use batchnorm_cuda::{BatchNormConfig, DType, Element, Error, Layout, TensorDesc};
use common::gpu::*;
use common::{widen, widen_f32};
use half::{bf16, f16};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// Statistics are f32 whatever the input dtype.
const STATS_TOL: (f64, f64) = (1e-5, 1e-5);

struct Outcome {
    y: f64,
    stats: f64,
    running: f64,
}

/// One training forward (with a running update) and one eval forward on the GPU and on the
/// CPU reference; returns the worst tolerance ratios.
fn compare_forward<T: Element>(
    gpu: &GpuContext,
    desc: &TensorDesc,
    seed: u64,
    mean: f64,
    spread: f64,
) -> Outcome {
    let (n, c) = (desc.numel(), desc.channels());
    let x: Vec<T> = random(seed, n, mean, spread);
    let weight = random_f32(seed + 1, c, 0.5, 1.5);
    let bias = random_f32(seed + 2, c, -0.5, 0.5);
    let run_mean0 = random_f32(seed + 3, c, -0.1, 0.1);
    let run_var0 = random_f32(seed + 4, c, 0.5, 2.0);
    let eps = 1e-5;

    // CPU reference.
    let (mut ref_mean, mut ref_var) = (run_mean0.clone(), run_var0.clone());
    let mut ref_y = vec![T::default(); n];
    let running = reference::RunningUpdate::pytorch(&mut ref_mean, &mut ref_var, 0.1);
    let saved = reference::forward_training(
        &x,
        desc,
        Some(&weight),
        Some(&bias),
        Some(running),
        eps,
        &mut ref_y,
    )
    .expect("reference training forward");
    let mut ref_eval = vec![T::default(); n];
    let running = reference::RunningStats {
        mean: &ref_mean,
        var: &ref_var,
    };
    reference::forward_inference(
        &x,
        desc,
        Some(&weight),
        Some(&bias),
        running,
        eps,
        &mut ref_eval,
    )
    .expect("reference eval forward");

    // GPU.
    let mut ws = Workspace::new();
    let dx = upload(gpu, &x);
    let (dw, db) = (upload(gpu, &weight), upload(gpu, &bias));
    let (mut d_mean, mut d_var) = (upload(gpu, &run_mean0), upload(gpu, &run_var0));
    let mut dy = zeros::<T>(gpu, n);
    let (mut s_mean, mut s_invstd) = (zeros::<f32>(gpu, c), zeros::<f32>(gpu, c));
    let mut s_mean_lo = zeros::<f32>(gpu, c);
    functional::forward(
        gpu,
        &mut ws,
        functional::Forward {
            desc: *desc,
            x: dx.as_view(),
            weight: Some(dw.as_view()),
            bias: Some(db.as_view()),
            stats: functional::ForwardStats::Batch(functional::BatchStats {
                saved: SavedStatsMut {
                    mean: s_mean.as_view_mut(),
                    mean_lo: s_mean_lo.as_view_mut(),
                    invstd: s_invstd.as_view_mut(),
                },
                running: Some(RunningUpdate {
                    mean: d_mean.as_view_mut(),
                    var: d_var.as_view_mut(),
                    factor: 0.1,
                    var_update: Default::default(),
                }),
                eps,
            }),
            y: dy.as_view_mut(),
            epilogue: functional::Epilogue::None,
        },
    )
    .expect("GPU training forward");
    let mut d_eval = zeros::<T>(gpu, n);
    let running = RunningStats {
        mean: d_mean.as_view(),
        var: d_var.as_view(),
    };
    functional::forward(
        gpu,
        &mut Workspace::new(),
        functional::Forward {
            desc: *desc,
            x: dx.as_view(),
            weight: Some(dw.as_view()),
            bias: Some(db.as_view()),
            stats: functional::ForwardStats::Running {
                stats: running,
                eps,
            },
            y: d_eval.as_view_mut(),
            epilogue: functional::Epilogue::None,
        },
    )
    .expect("GPU eval forward");

    // Any f32 implementation (PyTorch's too) stores the mean in f32 and computes x - mean from
    // it: a channel with a large mean and a small spread (|mean| * scale >> 1) carries that
    // rounding into y, up to an ulp of the mean times the channel's scale |w| * invstd.
    let conditioning = (0..c)
        .map(|k| f64::from(saved.mean[k].abs() * weight[k].abs() * saved.invstd[k]))
        .fold(0.0, f64::max)
        * f64::from(f32::EPSILON);
    let (atol, rtol) = activation_bounds(T::DTYPE);
    let atol = atol + conditioning;
    let y = worst_ratio(&widen(&download(gpu, &dy)), &widen(&ref_y), atol, rtol).max(worst_ratio(
        &widen(&download(gpu, &d_eval)),
        &widen(&ref_eval),
        atol,
        rtol,
    ));
    let (sa, sr) = STATS_TOL;
    let stats = worst_ratio(
        &widen_f32(&download(gpu, &s_mean)),
        &widen_f32(&saved.mean),
        sa,
        sr,
    )
    .max(worst_ratio(
        &widen_f32(&download(gpu, &s_invstd)),
        &widen_f32(&saved.invstd),
        sa,
        sr,
    ));
    let running = worst_ratio(
        &widen_f32(&download(gpu, &d_mean)),
        &widen_f32(&ref_mean),
        sa,
        sr,
    )
    .max(worst_ratio(
        &widen_f32(&download(gpu, &d_var)),
        &widen_f32(&ref_var),
        sa,
        sr,
    ));
    Outcome { y, stats, running }
}

fn compare_any(
    gpu: &GpuContext,
    dtype: DType,
    desc: &TensorDesc,
    seed: u64,
    mean: f64,
    spread: f64,
) -> Outcome {
    match dtype {
        DType::F32 => compare_forward::<f32>(gpu, desc, seed, mean, spread),
        DType::F16 => compare_forward::<f16>(gpu, desc, seed, mean, spread),
        DType::BF16 => compare_forward::<bf16>(gpu, desc, seed, mean, spread),
    }
}

fn assert_within(what: &str, o: &Outcome) {
    println!(
        "{what}: worst ratio y {:.3} stats {:.3} running {:.3}",
        o.y, o.stats, o.running
    );
    assert!(
        o.y <= 1.0 && o.stats <= 1.0 && o.running <= 1.0,
        "{what} out of tolerance"
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_context_loads_every_kernel() {
    let gpu = gpu();
    println!(
        "device: {} ({} SMs), {} PTX modules",
        gpu.device_name().unwrap(),
        gpu.sm_count(),
        gpu::ptx::MODULES.len()
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_forward_matches_reference_on_awkward_shapes() {
    let gpu = gpu();
    for (i, desc) in awkward_shapes().iter().enumerate() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let o = compare_any(&gpu, dtype, desc, 100 + i as u64, 0.3, 2.0);
            assert_within(&format!("{desc} {dtype}"), &o);
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_forward_random_shapes_property() {
    let gpu = gpu();
    let shape = (
        1usize..=5,
        1usize..=40,
        proptest::collection::vec(1usize..=24, 0..=3),
        any::<bool>(),
        0usize..3,
        any::<u64>(),
    );
    let mut runner = TestRunner::new(Config::default());
    runner
        .run(&shape, |(n, c, spatial, last, dtype, seed)| {
            let mut dims = vec![n + 1, c];
            dims.extend(spatial);
            let layout = if last {
                Layout::ChannelsLast
            } else {
                Layout::ChannelsFirst
            };
            let desc = TensorDesc::new(&dims, layout).unwrap();
            let dtype = [DType::F32, DType::F16, DType::BF16][dtype];
            let o = compare_any(&gpu, dtype, &desc, seed, 1.0, 3.0);
            prop_assert!(
                o.y <= 1.0 && o.stats <= 1.0 && o.running <= 1.0,
                "{desc} {dtype}: y {} stats {} running {}",
                o.y,
                o.stats,
                o.running
            );
            Ok(())
        })
        .unwrap();
}

/// Mean 1000, spread 0.1 in f32: a sum-of-squares variance would be noise.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_large_mean_small_spread_keeps_the_variance() {
    let gpu = gpu();
    for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
        let desc = TensorDesc::new(&[16, 3, 64, 64], layout).unwrap();
        let o = compare_any(&gpu, DType::F32, &desc, 7, 1000.0, 0.1);
        assert_within(&format!("shifted {desc}"), &o);
    }
}

/// Few channels and many values: the reduction is split over many blocks.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_long_reductions_split_across_blocks() {
    let gpu = gpu();
    for dims in [[64usize, 2, 128, 128], [4, 4, 256, 256]] {
        for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
            let desc = TensorDesc::new(&dims, layout).unwrap();
            let o = compare_any(&gpu, DType::F16, &desc, 11, -2.0, 1.0);
            assert_within(&format!("{desc}"), &o);
        }
    }
}

/// Reductions long enough for the two-level rows merge (more than 8 * by splits,
/// `launch::merge_depth`) on 132 SMs: channels-last f16 with C = 256 (by 8: 256 splits) and an
/// `(N, C)` f32 batch (by 32: 313 splits). Right against the reference, and a second forward
/// repeats the statistics bit for bit (and y).
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_two_level_rows_merges_match_reference_and_repeat() {
    fn repeats<T: Element>(gpu: &GpuContext, desc: &TensorDesc) {
        let x: Vec<T> = random(13, desc.numel(), 1.5, 2.0);
        let (first, again) = (training_stats(gpu, desc, &x), training_stats(gpu, desc, &x));
        let bits = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(
            bits(&first.1, &again.1) && bits(&first.2, &again.2) && first.0 == again.0,
            "{desc}: a second run differs"
        );
    }
    let gpu = gpu();
    let nhwc = TensorDesc::nhwc(8, 256, 32, 32).unwrap();
    let rows = TensorDesc::new(&[40_000, 32], Layout::ChannelsFirst).unwrap();
    for (desc, dtype) in [(nhwc, DType::F16), (rows, DType::F32), (rows, DType::BF16)] {
        let o = compare_any(&gpu, dtype, &desc, 17, 1.5, 2.0);
        assert_within(&format!("{desc} {dtype}"), &o);
    }
    repeats::<f16>(&gpu, &nhwc);
    repeats::<f32>(&gpu, &rows);
}

/// Saved statistics of a training forward, as host vectors.
fn training_stats<T: Element>(
    gpu: &GpuContext,
    desc: &TensorDesc,
    x: &[T],
) -> (Vec<T>, Vec<f32>, Vec<f32>) {
    let c = desc.channels();
    let mut ws = Workspace::new();
    let dx = upload(gpu, x);
    let mut y = zeros::<T>(gpu, x.len());
    let (mut mean, mut invstd) = (zeros::<f32>(gpu, c), zeros::<f32>(gpu, c));
    let mut mean_lo = zeros::<f32>(gpu, c);
    functional::forward(
        gpu,
        &mut ws,
        functional::Forward {
            desc: *desc,
            x: dx.as_view(),
            weight: None,
            bias: None,
            stats: functional::ForwardStats::Batch(functional::BatchStats {
                saved: SavedStatsMut {
                    mean: mean.as_view_mut(),
                    mean_lo: mean_lo.as_view_mut(),
                    invstd: invstd.as_view_mut(),
                },
                running: None,
                eps: 1e-5,
            }),
            y: y.as_view_mut(),
            epilogue: functional::Epilogue::None,
        },
    )
    .unwrap();
    (
        download(gpu, &y),
        download(gpu, &mean),
        download(gpu, &invstd),
    )
}

/// Reorders an NCHW-ordered host tensor to channels-last memory order.
fn to_channels_last<T: Copy>(x: &[T], desc: &TensorDesc) -> Vec<T> {
    let (first, last) = (
        desc.geometry(),
        desc.with_layout(Layout::ChannelsLast).geometry(),
    );
    let (n, c, s) = (desc.batch(), desc.channels(), desc.spatial());
    let mut out = x.to_vec();
    for b in 0..n {
        for ch in 0..c {
            for i in 0..s {
                out[last.offset(b * s + i, ch, 0)] = x[first.offset(b, ch, i)];
            }
        }
    }
    out
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_layouts_give_the_same_statistics() {
    let gpu = gpu();
    let desc = TensorDesc::nchw(8, 24, 17, 19).unwrap();
    let x: Vec<f32> = random(5, desc.numel(), 0.5, 2.0);
    let (_, mean_first, invstd_first) = training_stats(&gpu, &desc, &x);
    let desc_last = desc.with_layout(Layout::ChannelsLast);
    let (_, mean_last, invstd_last) =
        training_stats(&gpu, &desc_last, &to_channels_last(&x, &desc));
    let (a, r) = STATS_TOL;
    assert!(worst_ratio(&widen_f32(&mean_first), &widen_f32(&mean_last), a, r) <= 1.0);
    assert!(worst_ratio(&widen_f32(&invstd_first), &widen_f32(&invstd_last), a, r) <= 1.0);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_training_forward_is_bitwise_deterministic() {
    let gpu = gpu();
    for desc in [
        TensorDesc::nchw(32, 4, 56, 56).unwrap(),
        TensorDesc::nhwc(32, 64, 28, 28).unwrap(),
    ] {
        let x: Vec<f16> = random(9, desc.numel(), 0.0, 3.0);
        let first = training_stats(&gpu, &desc, &x);
        for run in 1..50 {
            let again = training_stats(&gpu, &desc, &x);
            assert!(
                again
                    .0
                    .iter()
                    .zip(&first.0)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
                    && again
                        .1
                        .iter()
                        .zip(&first.1)
                        .all(|(a, b)| a.to_bits() == b.to_bits())
                    && again
                        .2
                        .iter()
                        .zip(&first.2)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{desc}: run {run} differs from run 0"
            );
        }
    }
}

/// A view whose start is one element past a 16-byte boundary must take the scalar path and
/// still be right.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_unaligned_views_fall_back_to_scalar_code() {
    let gpu = gpu();
    for desc in [
        TensorDesc::nchw(4, 8, 16, 16).unwrap(),
        TensorDesc::nhwc(4, 8, 16, 16).unwrap(),
    ] {
        let n = desc.numel();
        let x: Vec<f32> = random(21, n + 1, 0.0, 1.0);
        let mut ref_y = vec![0f32; n];
        let saved = reference::forward_training(&x[1..], &desc, None, None, None, 1e-5, &mut ref_y)
            .unwrap();
        let dx = upload(&gpu, &x);
        let mut y = zeros::<f32>(&gpu, n + 1);
        let (mut mean, mut invstd) = (zeros::<f32>(&gpu, 8), zeros::<f32>(&gpu, 8));
        let mut mean_lo = zeros::<f32>(&gpu, 8);
        let mut ws = Workspace::new();
        functional::forward(
            &gpu,
            &mut ws,
            functional::Forward {
                desc,
                x: dx.slice(1..),
                weight: None,
                bias: None,
                stats: functional::ForwardStats::Batch(functional::BatchStats {
                    saved: SavedStatsMut {
                        mean: mean.as_view_mut(),
                        mean_lo: mean_lo.as_view_mut(),
                        invstd: invstd.as_view_mut(),
                    },
                    running: None,
                    eps: 1e-5,
                }),
                y: y.slice_mut(1..),
                epilogue: functional::Epilogue::None,
            },
        )
        .unwrap();
        let y = download(&gpu, &y);
        assert!(
            worst_ratio(&widen(&y[1..]), &widen(&ref_y), 1e-4, 1e-4) <= 1.0,
            "{desc}"
        );
        assert_eq!(y[0], 0.0, "{desc}: wrote before the view");
        assert!(
            worst_ratio(
                &widen_f32(&download(&gpu, &mean)),
                &widen_f32(&saved.mean),
                1e-5,
                1e-5
            ) <= 1.0
        );
    }
}

/// The layer over 10 training steps (momentum 0.1 and the cumulative average) then eval,
/// against the CPU layer step by step.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_layer_running_stats_track_reference_over_10_steps() {
    let gpu = gpu();
    for momentum in [Some(0.1), None] {
        let config = BatchNormConfig::new(6).momentum(momentum);
        let mut cpu = reference::BatchNorm::new(config).unwrap();
        let mut layer = gpu::BatchNorm::new(&gpu, config).unwrap();
        let desc = TensorDesc::nchw(4, 6, 5, 7).unwrap();
        for step in 0..10u64 {
            let x: Vec<f32> = random(
                1000 + step,
                desc.numel(),
                step as f64 * 0.1,
                1.0 + step as f64,
            );
            let (ref_y, _) = cpu.forward(&x, &desc).unwrap();
            let dx = upload(&gpu, &x);
            let mut y = zeros::<f32>(&gpu, desc.numel());
            layer
                .forward(&desc, &dx.as_view(), &mut y.as_view_mut())
                .unwrap();
            assert!(
                worst_ratio(&widen(&download(&gpu, &y)), &widen(&ref_y), 1e-4, 1e-4) <= 1.0,
                "step {step}"
            );
            assert_same_running_stats(&layer, &cpu);
        }
        cpu.eval();
        layer.eval();
        let x: Vec<f32> = random(77, desc.numel(), 0.5, 2.0);
        let (ref_y, _) = cpu.forward(&x, &desc).unwrap();
        let dx = upload(&gpu, &x);
        let mut y = zeros::<f32>(&gpu, desc.numel());
        layer
            .forward(&desc, &dx.as_view(), &mut y.as_view_mut())
            .unwrap();
        assert!(worst_ratio(&widen(&download(&gpu, &y)), &widen(&ref_y), 1e-4, 1e-4) <= 1.0);
    }
}

/// Bad inputs give the CPU path's error, and leave the layer as it was.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_bad_inputs_give_the_cpu_errors() {
    let gpu = gpu();
    let config = BatchNormConfig::new(4);
    let mut cpu = reference::BatchNorm::new(config).unwrap();
    let mut layer = gpu::BatchNorm::new(&gpu, config).unwrap();
    let cases: Vec<(TensorDesc, usize)> = vec![
        (TensorDesc::nchw(2, 3, 4, 4).unwrap(), 96), // channel mismatch
        (TensorDesc::new(&[1, 4], Layout::ChannelsFirst).unwrap(), 4), // one value per channel
        (
            TensorDesc::new(&[1, 4, 1, 1], Layout::ChannelsLast).unwrap(),
            4,
        ), // one value per channel
        (TensorDesc::nchw(2, 4, 4, 4).unwrap(), 100), // x too long
    ];
    for (desc, len) in cases {
        let x = vec![1.0f32; len];
        let cpu_err = cpu.forward(&x, &desc).unwrap_err();
        let dx = upload(&gpu, &x);
        let mut y = zeros::<f32>(&gpu, len);
        let gpu_err = layer
            .forward(&desc, &dx.as_view(), &mut y.as_view_mut())
            .unwrap_err();
        assert_eq!(gpu_err.to_string(), cpu_err.to_string(), "{desc}");
        assert_eq!(layer.num_batches_tracked(), 0);
        assert_eq!(layer.running_mean().unwrap().unwrap(), vec![0.0; 4]);
        assert_eq!(layer.running_var().unwrap().unwrap(), vec![1.0; 4]);
    }
    assert!(matches!(
        layer.set_running_stats(&[0.0; 4], &[1.0, -1.0, 1.0, 1.0]),
        Err(Error::InvalidRunningVar { channel: 1, .. })
    ));
}

/// An empty batch is not an error: nothing is written, the statistics stay, the counter moves.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_empty_batch_keeps_the_statistics() {
    let gpu = gpu();
    let mut layer = gpu::BatchNorm::new(&gpu, BatchNormConfig::new(3)).unwrap();
    let desc = TensorDesc::nchw(0, 3, 4, 4).unwrap();
    let x = zeros::<f32>(&gpu, 1);
    let mut y = zeros::<f32>(&gpu, 1);
    layer
        .forward(&desc, &x.slice(0..0), &mut y.slice_mut(0..0))
        .unwrap();
    assert_eq!(layer.running_mean().unwrap().unwrap(), vec![0.0; 3]);
    assert_eq!(layer.running_var().unwrap().unwrap(), vec![1.0; 3]);
    assert_eq!(layer.num_batches_tracked(), 1);
}

/// NaN in one channel stays in that channel; a constant channel gives y = bias exactly.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_nan_and_constant_channels_stay_contained() {
    let gpu = gpu();
    for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
        let desc = TensorDesc::new(&[4, 3, 8, 8], layout).unwrap();
        let g = desc.geometry();
        let mut x: Vec<f32> = random(3, desc.numel(), 0.0, 1.0);
        g.for_each_offset(1, |i| x[i] = 2.5);
        let mut first = true;
        g.for_each_offset(2, |i| {
            if first {
                x[i] = f32::NAN;
                first = false;
            }
        });
        let bias = [0.25f32, -0.75, 0.5];
        let mut layer = gpu::BatchNorm::new(&gpu, BatchNormConfig::new(3)).unwrap();
        layer.set_bias(&bias).unwrap();
        let dx = upload(&gpu, &x);
        let mut y = zeros::<f32>(&gpu, desc.numel());
        layer
            .forward(&desc, &dx.as_view(), &mut y.as_view_mut())
            .unwrap();
        let y = download(&gpu, &y);
        g.for_each_offset(0, |i| {
            assert!(y[i].is_finite(), "{desc}: channel 0 caught the NaN")
        });
        g.for_each_offset(1, |i| assert_eq!(y[i], bias[1], "{desc}: constant channel"));
        g.for_each_offset(2, |i| assert!(y[i].is_nan()));
        let rm = layer.running_mean().unwrap().unwrap();
        assert!(rm[0].is_finite() && rm[1].is_finite() && rm[2].is_nan());
    }
}

/// invstd is IEEE `1.0f / sqrtf(var + eps)` to the bit on the device (kernels/common.cuh,
/// invsqrt_rn, which runs MUFU results through ptxas's own fast paths: only the hardware shows
/// they are exact), for every mantissa of both exponent parities (every variance in [1, 4); the
/// other binades run the same instructions scaled by powers of 4), the scaled range below
/// 2^-100, subnormals, the largest floats, the specials and a million random variances. An eval
/// forward with mean 0, eps 0, no affine and x = 1 writes y = (1 - 0) * invstd + 0 = invstd.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_invstd_is_ieee_one_over_sqrt_for_every_mantissa() {
    let gpu = gpu();
    let ieee_invstd = |var: f32| 1.0 / (var + 0.0).sqrt(); // eps = 0: -0 + 0 is +0
    let pow2 = |e: i32| f32::from_bits(((127 + e) as u32) << 23); // a normal 2^e
    let mut var: Vec<f32> = (1.0f32.to_bits()..4.0f32.to_bits())
        .map(f32::from_bits)
        .collect();
    var.extend((1..pow2(-99).to_bits()).step_by(97).map(f32::from_bits));
    var.extend((0..4096).map(|k| f32::from_bits(f32::MAX.to_bits() - k)));
    var.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NAN,
        -1.0,
        pow2(-101),
        pow2(-100),
        1e-5,
    ]);
    let bits: Vec<u32> = random::<f32>(11, 1 << 20, 0.0, 1.0)
        .iter()
        .enumerate()
        .map(|(i, u)| u.to_bits().rotate_left(i as u32 % 32) & 0x7fff_ffff)
        .collect();
    var.extend(bits.into_iter().map(f32::from_bits));
    let c = var.len();
    let desc = TensorDesc::new(&[1, c], Layout::ChannelsFirst).unwrap();
    let x = upload(&gpu, &vec![1.0f32; c]);
    let (mean, dvar) = (zeros::<f32>(&gpu, c), upload(&gpu, &var));
    let mut y = zeros::<f32>(&gpu, c);
    let running = RunningStats {
        mean: mean.as_view(),
        var: dvar.as_view(),
    };
    functional::forward(
        &gpu,
        &mut Workspace::new(),
        functional::Forward {
            desc,
            x: x.as_view(),
            weight: None,
            bias: None,
            stats: functional::ForwardStats::Running {
                stats: running,
                eps: 0.0,
            },
            y: y.as_view_mut(),
            epilogue: functional::Epilogue::None,
        },
    )
    .expect("GPU eval forward");
    let got = download(&gpu, &y);
    let wrong: Vec<String> = var
        .iter()
        .zip(&got)
        .filter(|(&v, g)| {
            let want = ieee_invstd(v);
            !(want.is_nan() && g.is_nan()) && want.to_bits() != g.to_bits()
        })
        .map(|(&v, g)| {
            format!(
                "{v:e} ({:#010x}): {g:e}, IEEE {:e}",
                v.to_bits(),
                ieee_invstd(v)
            )
        })
        .collect();
    println!("{c} variances, {} not IEEE 1/sqrt", wrong.len());
    assert!(
        wrong.is_empty(),
        "{} wrong, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(8)]
    );
}

/// The fold kernel rounds its double result to a half type once: weight and bias land just past
/// a midpoint (`common::fold_halfway`), where rounding through f32 would tie down to 1.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_fold_rounds_once_past_a_half_way_point() {
    fn check<T: Element>(gpu: &GpuContext) {
        let case = common::fold_halfway(T::DTYPE);
        let spec = batchnorm_cuda::fold::FoldSpec::new(
            batchnorm_cuda::fold::FoldKind::Conv,
            &[1, 1, 1, 1],
            1,
            Layout::ChannelsFirst,
        )
        .unwrap();
        let (mean, var) = (
            upload(gpu, &case.running_mean),
            upload(gpu, &case.running_var),
        );
        let (w, b) = (upload(gpu, &case.bn_weight), upload(gpu, &case.bn_bias));
        let bn = functional::FoldBatchNorm {
            running_mean: mean.as_view(),
            running_var: var.as_view(),
            weight: Some(w.as_view()),
            bias: Some(b.as_view()),
            eps: case.eps,
        };
        let mut weight = upload(gpu, &[T::from_f64(1.0)]);
        let mut bias = zeros::<T>(gpu, 1);
        functional::fold(
            gpu,
            &spec,
            None,
            &mut weight.as_view_mut(),
            None,
            &mut bias.as_view_mut(),
            &bn,
        )
        .unwrap();
        let got = (
            download(gpu, &weight)[0].to_f64(),
            download(gpu, &bias)[0].to_f64(),
        );
        assert_eq!(got, (case.expected, case.expected), "{}", T::DTYPE);
    }
    let gpu = gpu();
    check::<f16>(&gpu);
    check::<bf16>(&gpu);
}

/// Channels-last and `(N, C)` shapes of the single-pass forward: C = 1, 8, 64, 100, rows that
/// are not a multiple of any block's band.
fn single_pass_shapes() -> Vec<TensorDesc> {
    vec![
        TensorDesc::new(&[1037, 1], Layout::ChannelsFirst).unwrap(),
        TensorDesc::new(&[3, 8, 7, 9], Layout::ChannelsLast).unwrap(),
        TensorDesc::new(&[501, 8], Layout::ChannelsFirst).unwrap(),
        TensorDesc::nhwc(2, 64, 9, 11).unwrap(),
        TensorDesc::new(&[300, 100], Layout::ChannelsFirst).unwrap(),
        TensorDesc::nhwc(3, 100, 5, 3).unwrap(),
    ]
}

/// The single-pass forward (opted in on the context) against the CPU reference with the
/// two-pass path's tolerances (y, saved and running statistics), the same statistics as the
/// two-pass path within them, and bitwise the same results on a repeat.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_single_pass_forward_matches_reference_and_split_path() {
    let split = gpu();
    let single = split.with_single_pass_forward(true);
    assert!(single.single_pass_forward() && !split.single_pass_forward());
    for (i, desc) in single_pass_shapes().iter().enumerate() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            assert!(
                single.single_pass_forward_fits(desc, dtype).unwrap(),
                "{desc} {dtype}: the single pass does not take it"
            );
            assert!(!split.single_pass_forward_fits(desc, dtype).unwrap());
            let o = compare_any(&single, dtype, desc, 300 + i as u64, 0.3, 2.0);
            assert_within(&format!("single pass {desc} {dtype}"), &o);
        }
        let x: Vec<f16> = random(40 + i as u64, desc.numel(), 5.0, 2.0);
        let one = training_stats(&single, desc, &x);
        let two = training_stats(&split, desc, &x);
        let (a, r) = STATS_TOL;
        assert!(worst_ratio(&widen_f32(&one.1), &widen_f32(&two.1), a, r) <= 1.0);
        assert!(worst_ratio(&widen_f32(&one.2), &widen_f32(&two.2), a, r) <= 1.0);
        let (atol, rtol) = activation_bounds(DType::F16);
        assert!(worst_ratio(&widen(&one.0), &widen(&two.0), atol, rtol) <= 1.0);
        let again = training_stats(&single, desc, &x);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert!(
            bits(&again.1) == bits(&one.1)
                && bits(&again.2) == bits(&one.2)
                && again
                    .0
                    .iter()
                    .zip(&one.0)
                    .all(|(p, q)| p.to_bits() == q.to_bits()),
            "{desc}: a repeat of the single pass differs"
        );
    }
    // Channels-first tensors and planar shapes never take it.
    let planar = TensorDesc::nchw(2, 8, 5, 5).unwrap();
    assert!(!single
        .single_pass_forward_fits(&planar, DType::F32)
        .unwrap());
}

/// The layer on an opted-in context: running statistics and num_batches_tracked as the two-pass
/// layer's over several steps, and a refused call (a single value per channel) leaves the state
/// and the counter as they were.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_single_pass_layer_tracks_the_two_pass_layer() {
    let split = gpu();
    let single = split.with_single_pass_forward(true);
    let desc = TensorDesc::nhwc(4, 24, 6, 5).unwrap();
    assert!(single.single_pass_forward_fits(&desc, DType::F32).unwrap());
    let config = BatchNormConfig::new(24);
    let mut layers = [
        gpu::BatchNorm::new(&split, config).unwrap(),
        gpu::BatchNorm::new(&single, config).unwrap(),
    ];
    for step in 0..3u64 {
        let x: Vec<f32> = random(70 + step, desc.numel(), 1.0 + step as f64, 2.0);
        let dx = upload(&split, &x);
        let mut ys = Vec::new();
        for layer in &mut layers {
            let mut y = zeros::<f32>(&split, desc.numel());
            layer
                .forward(&desc, &dx.as_view(), &mut y.as_view_mut())
                .unwrap();
            ys.push(download(&split, &y));
        }
        let (atol, rtol) = activation_bounds(DType::F32);
        assert!(worst_ratio(&widen(&ys[1]), &widen(&ys[0]), atol, rtol) <= 1.0);
    }
    let (a, r) = STATS_TOL;
    let [two, one] = &layers;
    assert_eq!(one.num_batches_tracked(), 3);
    assert_eq!(one.num_batches_tracked(), two.num_batches_tracked());
    let widen_opt = |v: Option<Vec<f32>>| widen_f32(&v.unwrap());
    assert!(
        worst_ratio(
            &widen_opt(one.running_mean().unwrap()),
            &widen_opt(two.running_mean().unwrap()),
            a,
            r
        ) <= 1.0
    );
    assert!(
        worst_ratio(
            &widen_opt(one.running_var().unwrap()),
            &widen_opt(two.running_var().unwrap()),
            a,
            r
        ) <= 1.0
    );
    // One value per channel: refused before anything is queued.
    let [_, one] = &mut layers;
    let lone = TensorDesc::new(&[1, 24], Layout::ChannelsFirst).unwrap();
    let before = one.state().unwrap();
    let dx = upload(&split, &[1.0f32; 24]);
    let mut y = zeros::<f32>(&split, 24);
    let err = one
        .forward(&lone, &dx.as_view(), &mut y.as_view_mut())
        .unwrap_err();
    assert!(
        matches!(err, Error::SingleValuePerChannel { .. }),
        "{err:?}"
    );
    assert_eq!(common::state_change(&before, &one.state().unwrap()), None);
    assert_eq!(one.num_batches_tracked(), 3);
}
