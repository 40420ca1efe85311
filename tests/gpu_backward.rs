//! GPU backward (training and eval mode) against the CPU reference. Every test needs a CUDA
//! device: run with `--include-ignored` on a GPU machine (`scripts/gpu-run.sh`).

mod common;

use batchnorm_cuda::gpu::functional::{
    self, GradientsMut, RunningStats, SavedStats, SavedStatsMut,
};
use batchnorm_cuda::gpu::{self, GpuContext, Workspace};
use batchnorm_cuda::reference;
use batchnorm_cuda::{BatchNormConfig, DType, Element, Layout, TensorDesc};
use common::gpu::*;
use common::{widen, widen_f32};
use cudarc::driver::CudaSlice;
use half::{bf16, f16};

struct Inputs<T> {
    x: Vec<T>,
    dy: Vec<T>,
    weight: Vec<f32>,
    running_mean: Vec<f32>,
    running_var: Vec<f32>,
}

fn inputs<T: Element>(desc: &TensorDesc, seed: u64) -> Inputs<T> {
    let (n, c) = (desc.numel(), desc.channels());
    Inputs {
        x: random(seed, n, 0.5, 2.0),
        dy: random(seed + 1, n, 0.0, 1.0),
        weight: random_f32(seed + 2, c, 0.5, 1.5),
        running_mean: random_f32(seed + 3, c, -0.2, 0.2),
        running_var: random_f32(seed + 4, c, 0.5, 2.0),
    }
}

struct Device<T> {
    x: CudaSlice<T>,
    dy: CudaSlice<T>,
    weight: CudaSlice<f32>,
    running_mean: CudaSlice<f32>,
    running_var: CudaSlice<f32>,
    saved_mean: CudaSlice<f32>,
    saved_mean_lo: CudaSlice<f32>,
    saved_invstd: CudaSlice<f32>,
}

impl<T: Element> Device<T> {
    fn new(gpu: &GpuContext, inputs: &Inputs<T>, desc: &TensorDesc) -> Self {
        let c = desc.channels();
        let mut device = Self {
            x: upload(gpu, &inputs.x),
            dy: upload(gpu, &inputs.dy),
            weight: upload(gpu, &inputs.weight),
            running_mean: upload(gpu, &inputs.running_mean),
            running_var: upload(gpu, &inputs.running_var),
            saved_mean: zeros(gpu, c),
            saved_mean_lo: zeros(gpu, c),
            saved_invstd: zeros(gpu, c),
        };
        // The saved statistics come from the GPU's own forward, as in training.
        let mut y = zeros::<T>(gpu, desc.numel());
        functional::forward(
            gpu,
            &mut Workspace::new(),
            functional::Forward {
                desc: *desc,
                x: device.x.as_view(),
                weight: Some(device.weight.as_view()),
                bias: None,
                stats: functional::ForwardStats::Batch(functional::BatchStats {
                    saved: SavedStatsMut {
                        mean: device.saved_mean.as_view_mut(),
                        mean_lo: device.saved_mean_lo.as_view_mut(),
                        invstd: device.saved_invstd.as_view_mut(),
                    },
                    running: None,
                    eps: 1e-5,
                }),
                y: y.as_view_mut(),
                epilogue: functional::Epilogue::None,
            },
        )
        .expect("GPU forward");
        device
    }

    /// Runs the backward and returns (dx, dweight, dbias) on the host.
    fn backward(
        &self,
        gpu: &GpuContext,
        ws: &mut Workspace,
        desc: &TensorDesc,
        training: bool,
    ) -> (Vec<T>, Vec<f32>, Vec<f32>) {
        let c = desc.channels();
        let mut dx = zeros::<T>(gpu, desc.numel());
        let (mut dw, mut db) = (zeros::<f32>(gpu, c), zeros::<f32>(gpu, c));
        let grads = GradientsMut {
            dx: Some(dx.as_view_mut()),
            dweight: Some(dw.as_view_mut()),
            dbias: Some(db.as_view_mut()),
            accumulate: false,
        };
        let (x, dy, w) = (self.x.as_view(), self.dy.as_view(), self.weight.as_view());
        if training {
            let saved = SavedStats {
                mean: self.saved_mean.as_view(),
                mean_lo: Some(self.saved_mean_lo.as_view()),
                invstd: self.saved_invstd.as_view(),
            };
            functional::backward(
                gpu,
                ws,
                functional::Backward {
                    desc: *desc,
                    x: x.slice(..),
                    dy: dy.slice(..),
                    weight: Some(w.slice(..)),
                    stats: functional::BackwardStats::Batch(saved),
                    grads,
                    epilogue: functional::EpilogueGrad::None,
                },
            )
            .expect("GPU backward");
        } else {
            let running = RunningStats {
                mean: self.running_mean.as_view(),
                var: self.running_var.as_view(),
            };
            functional::backward(
                gpu,
                ws,
                functional::Backward {
                    desc: *desc,
                    x: x.slice(..),
                    dy: dy.slice(..),
                    weight: Some(w.slice(..)),
                    stats: functional::BackwardStats::Running {
                        stats: running,
                        eps: 1e-5,
                    },
                    grads,
                    epilogue: functional::EpilogueGrad::None,
                },
            )
            .expect("GPU eval backward");
        }
        (download(gpu, &dx), download(gpu, &dw), download(gpu, &db))
    }
}

/// Worst ratios of (dx, dweight, dbias) for the training and the eval-mode backward.
fn compare_backward<T: Element>(gpu: &GpuContext, desc: &TensorDesc, seed: u64) -> [f64; 3] {
    let (n, c) = (desc.numel(), desc.channels());
    let host = inputs::<T>(desc, seed);
    let device = Device::new(gpu, &host, desc);
    let saved = reference::SavedStats {
        mean: download(gpu, &device.saved_mean),
        mean_lo: download(gpu, &device.saved_mean_lo),
        invstd: download(gpu, &device.saved_invstd),
    };
    let mut ws = Workspace::new();
    let (atol, rtol) = activation_bounds(T::DTYPE);
    let mut worst = [0f64; 3];
    for training in [true, false] {
        let (mut dx, mut dw, mut db) = (vec![T::default(); n], vec![0f32; c], vec![0f32; c]);
        let grads = reference::Gradients {
            dx: Some(&mut dx),
            dweight: Some(&mut dw),
            dbias: Some(&mut db),
            accumulate: false,
        };
        if training {
            reference::backward_training(
                &host.x,
                &host.dy,
                desc,
                Some(&host.weight),
                &saved,
                grads,
            )
            .unwrap();
        } else {
            let running = reference::RunningStats {
                mean: &host.running_mean,
                var: &host.running_var,
            };
            reference::backward_inference(
                &host.x,
                &host.dy,
                desc,
                Some(&host.weight),
                running,
                1e-5,
                grads,
            )
            .unwrap();
        }
        let (g_dx, g_dw, g_db) = device.backward(gpu, &mut ws, desc, training);
        worst[0] = worst[0].max(worst_ratio(&widen(&g_dx), &widen(&dx), atol, rtol));
        worst[1] = worst[1].max(param_ratio(&g_dw, &dw));
        worst[2] = worst[2].max(param_ratio(&g_db, &db));
    }
    worst
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_backward_matches_reference_on_awkward_shapes() {
    let gpu = gpu();
    for (i, desc) in awkward_shapes().iter().enumerate() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let worst = match dtype {
                DType::F32 => compare_backward::<f32>(&gpu, desc, 200 + i as u64),
                DType::F16 => compare_backward::<f16>(&gpu, desc, 200 + i as u64),
                DType::BF16 => compare_backward::<bf16>(&gpu, desc, 200 + i as u64),
            };
            println!(
                "{desc} {dtype}: worst ratio dx {:.3} dweight {:.3} dbias {:.3}",
                worst[0], worst[1], worst[2]
            );
            assert!(worst.iter().all(|&w| w <= 1.0), "{desc} {dtype}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_backward_is_bitwise_deterministic() {
    let gpu = gpu();
    for desc in [
        TensorDesc::nchw(16, 8, 56, 56).unwrap(),
        TensorDesc::nhwc(16, 64, 28, 28).unwrap(),
    ] {
        let host = inputs::<f32>(&desc, 31);
        let device = Device::new(&gpu, &host, &desc);
        let mut ws = Workspace::new();
        let first = device.backward(&gpu, &mut ws, &desc, true);
        for run in 1..50 {
            let again = device.backward(&gpu, &mut ws, &desc, true);
            let same =
                |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(
                same(&again.0, &first.0) && same(&again.1, &first.1) && same(&again.2, &first.2),
                "{desc}: run {run}"
            );
        }
    }
}

/// The backward reduce over the two-level rows merge (as gpu_forward's
/// `gpu_two_level_rows_merges_match_reference_and_repeat`): right, and repeated bit for bit.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_two_level_rows_merges_in_the_backward() {
    let gpu = gpu();
    let nhwc = TensorDesc::nhwc(8, 256, 32, 32).unwrap();
    let rows = TensorDesc::new(&[40_000, 32], Layout::ChannelsFirst).unwrap();
    let worst = compare_backward::<f16>(&gpu, &nhwc, 41);
    assert!(worst.iter().all(|&w| w <= 1.0), "{nhwc}: {worst:?}");
    let worst = compare_backward::<f32>(&gpu, &rows, 42);
    assert!(worst.iter().all(|&w| w <= 1.0), "{rows}: {worst:?}");
    let host = inputs::<f32>(&rows, 43);
    let device = Device::new(&gpu, &host, &rows);
    let mut ws = Workspace::new();
    let first = device.backward(&gpu, &mut ws, &rows, true);
    let again = device.backward(&gpu, &mut ws, &rows, true);
    let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
    assert!(
        same(&again.0, &first.0) && same(&again.1, &first.1) && same(&again.2, &first.2),
        "{rows}: a second backward differs"
    );
}

/// dx only, parameter gradients only, and accumulation into existing buffers.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_backward_output_masks_and_accumulation() {
    let gpu = gpu();
    let desc = TensorDesc::nchw(4, 5, 6, 7).unwrap();
    let c = desc.channels();
    let host = inputs::<f32>(&desc, 41);
    let device = Device::new(&gpu, &host, &desc);
    let mut ws = Workspace::new();
    let (full_dx, full_dw, full_db) = device.backward(&gpu, &mut ws, &desc, true);
    let saved = SavedStats {
        mean: device.saved_mean.as_view(),
        mean_lo: Some(device.saved_mean_lo.as_view()),
        invstd: device.saved_invstd.as_view(),
    };
    let (x, dy, w) = (
        device.x.as_view(),
        device.dy.as_view(),
        device.weight.as_view(),
    );

    // dx only.
    let mut dx = zeros::<f32>(&gpu, desc.numel());
    let grads = GradientsMut {
        dx: Some(dx.as_view_mut()),
        dweight: None,
        dbias: None,
        accumulate: false,
    };
    functional::backward(
        &gpu,
        &mut ws,
        functional::Backward {
            desc,
            x: x.slice(..),
            dy: dy.slice(..),
            weight: Some(w.slice(..)),
            stats: functional::BackwardStats::Batch(saved.clone()),
            grads,
            epilogue: functional::EpilogueGrad::None,
        },
    )
    .unwrap();
    assert_eq!(download(&gpu, &dx), full_dx);

    // Parameter gradients only, accumulated twice onto a starting value of 1.
    let (mut dw, mut db) = (upload(&gpu, &vec![1f32; c]), upload(&gpu, &vec![1f32; c]));
    for _ in 0..2 {
        let grads = GradientsMut {
            dx: None,
            dweight: Some(dw.as_view_mut()),
            dbias: Some(db.as_view_mut()),
            accumulate: true,
        };
        functional::backward(
            &gpu,
            &mut ws,
            functional::Backward {
                desc,
                x: x.slice(..),
                dy: dy.slice(..),
                weight: Some(w.slice(..)),
                stats: functional::BackwardStats::Batch(saved.clone()),
                grads,
                epilogue: functional::EpilogueGrad::None,
            },
        )
        .unwrap();
    }
    let want = |g: &[f32]| g.iter().map(|v| 1.0 + 2.0 * v).collect::<Vec<f32>>();
    assert!(param_ratio(&download(&gpu, &dw), &want(&full_dw)) <= 1.0);
    assert!(param_ratio(&download(&gpu, &db), &want(&full_db)) <= 1.0);
}

/// A few SGD steps of the layer's weight and bias toward a fixed target output, forward and
/// backward on the GPU, tracking the CPU layer step by step (running statistics included).
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_tiny_training_loop_tracks_reference() {
    let gpu = gpu();
    for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
        let desc = TensorDesc::new(&[8, 4, 6, 6], layout).unwrap();
        let (n, c) = (desc.numel(), desc.channels());
        let config = BatchNormConfig::new(c);
        let mut cpu = reference::BatchNorm::new(config).unwrap();
        let mut layer = gpu::BatchNorm::new(&gpu, config).unwrap();
        let target: Vec<f32> = random(5, n, 0.3, 1.0);
        // The loss sums over the 288 values of a channel, so its curvature in (w, b) is ~288:
        // SGD is stable below lr = 2 / 288. (At 0.05 the weights grew 13x per step and y became
        // the difference of numbers in the thousands, with f32 cancellation no test can bound.)
        let lr = 0.002f32;
        for step in 0..5u64 {
            let x: Vec<f32> = random(600 + step, n, 1.0, 2.0);
            // CPU: loss = 0.5 * |y - target|^2, dy = y - target.
            let (y_cpu, cache) = cpu.forward(&x, &desc).unwrap();
            let dy: Vec<f32> = y_cpu.iter().zip(&target).map(|(y, t)| y - t).collect();
            let grads = cpu.backward(&cache, &x, &dy).unwrap();
            let (gw, gb) = (grads.dweight.unwrap(), grads.dbias.unwrap());
            let w: Vec<f32> = cpu
                .weight()
                .unwrap()
                .iter()
                .zip(&gw)
                .map(|(w, g)| w - lr * g)
                .collect();
            let b: Vec<f32> = cpu
                .bias()
                .unwrap()
                .iter()
                .zip(&gb)
                .map(|(b, g)| b - lr * g)
                .collect();
            cpu.set_weight(&w).unwrap();
            cpu.set_bias(&b).unwrap();

            // GPU: same step, dy from the GPU's own output.
            let dx = upload(&gpu, &x);
            let mut y = zeros::<f32>(&gpu, n);
            let cache = layer
                .forward(&desc, &dx.as_view(), &mut y.as_view_mut())
                .unwrap();
            let y_gpu = download(&gpu, &y);
            assert!(
                worst_ratio(&widen(&y_gpu), &widen(&y_cpu), 1e-4, 1e-4) <= 1.0,
                "{desc} step {step}: y"
            );
            let dy_gpu: Vec<f32> = y_gpu.iter().zip(&target).map(|(y, t)| y - t).collect();
            let ddy = upload(&gpu, &dy_gpu);
            let mut grad_x = zeros::<f32>(&gpu, n);
            layer.zero_grad().unwrap();
            layer
                .backward(
                    &cache,
                    &dx.as_view(),
                    &ddy.as_view(),
                    Some(grad_x.as_view_mut()),
                )
                .unwrap();
            let (ggw, ggb) = (
                layer.grad_weight().unwrap().unwrap(),
                layer.grad_bias().unwrap().unwrap(),
            );
            assert!(
                param_ratio(&ggw, &gw) <= 1.0 && param_ratio(&ggb, &gb) <= 1.0,
                "{desc} step {step}: grads"
            );
            let w: Vec<f32> = layer
                .weight()
                .unwrap()
                .unwrap()
                .iter()
                .zip(&ggw)
                .map(|(w, g)| w - lr * g)
                .collect();
            let b: Vec<f32> = layer
                .bias()
                .unwrap()
                .unwrap()
                .iter()
                .zip(&ggb)
                .map(|(b, g)| b - lr * g)
                .collect();
            layer.set_weight(&w).unwrap();
            layer.set_bias(&b).unwrap();

            assert_same_running_stats(&layer, &cpu);
            let wr = worst_ratio(
                &widen_f32(&w),
                &widen_f32(cpu.weight().unwrap()),
                1e-5,
                1e-4,
            );
            println!("{desc} step {step}: weight ratio {wr:.3}");
            assert!(wr <= 1.0);
        }
    }
}

/// The sum over a channel of the training dx is ~0 (the mean is subtracted out).
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_dx_sums_to_zero_per_channel() {
    let gpu = gpu();
    let desc = TensorDesc::nhwc(8, 16, 9, 9).unwrap();
    let host = inputs::<f32>(&desc, 51);
    let device = Device::new(&gpu, &host, &desc);
    let (dx, _, _) = device.backward(&gpu, &mut Workspace::new(), &desc, true);
    for ch in 0..desc.channels() {
        let (mut sum, mut abs) = (0f64, 0f64);
        desc.geometry().for_each_offset(ch, |i| {
            sum += dx[i] as f64;
            abs += (dx[i] as f64).abs();
        });
        assert!(sum.abs() <= 1e-5 * abs.max(1.0), "channel {ch}: sum {sum}");
    }
}
