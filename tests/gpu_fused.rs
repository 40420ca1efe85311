//! GPU fused ReLU epilogues (the `Epilogue` of `gpu::functional`, the layer's
//! `forward_relu`/`forward_add_relu`/`backward_*`) against the CPU reference's (`reference::fused`): awkward shapes, every dtype,
//! both layouts, training and eval; the mask word for word; vector and scalar paths (unaligned
//! views) writing and reading the same mask; bitwise determinism; output masks. Every test needs
//! a CUDA device: run with `--include-ignored` on a GPU machine (`scripts/gpu-run.sh`).

mod common;

use batchnorm_cuda::epilogue::{has_padding_bits, mask_words, pack_mask, unpack_mask};
use batchnorm_cuda::gpu::functional::{
    self, Epilogue, GradientsMut, RunningStats, RunningUpdate, SavedStats, SavedStatsMut,
};
use batchnorm_cuda::gpu::{self, GpuContext, Workspace};
use batchnorm_cuda::reference;
use batchnorm_cuda::{
    BatchNormConfig, DType, Element, EpilogueKind, Error, Layout, RunningVarUpdate, TensorDesc,
};
use common::gpu::*;
use common::{widen, with_dtype};
use cudarc::driver::CudaSlice;
use half::{bf16, f16};

const EPS: f32 = 1e-5;
const MOMENTUM: f32 = 0.1;

fn upload_words(gpu: &GpuContext, words: &[u32]) -> CudaSlice<u32> {
    gpu.stream().clone_htod(words).expect("host to device copy")
}

fn download_words(gpu: &GpuContext, words: &CudaSlice<u32>) -> Vec<u32> {
    gpu.stream().clone_dtoh(words).expect("device to host copy")
}

fn bits<T: Element>(values: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(values).to_vec()
}

/// The mask of a stored `y`: bit = `y > 0`.
fn mask_of<T: Element>(desc: &TensorDesc, y: &[T]) -> Vec<u32> {
    let positive: Vec<bool> = y.iter().map(|v| v.to_f64() > 0.0).collect();
    pack_mask(desc, &positive).unwrap()
}

/// The GPU mask is exactly `y_gpu > 0` (every word written, padding 0), and differs from the
/// reference's only where the reference's `y` is within the tolerance of 0.
#[track_caller]
fn check_mask<T: Element>(desc: &TensorDesc, mask: &[u32], y: &[T], y_ref: &[T], label: &str) {
    assert_eq!(
        mask,
        mask_of(desc, y).as_slice(),
        "{label}: mask is not y > 0"
    );
    assert!(!has_padding_bits(desc, mask), "{label}: padding bits");
    let (atol, rtol) = activation_bounds(T::DTYPE);
    let got = unpack_mask(desc, mask).unwrap();
    for (i, (&bit, r)) in got.iter().zip(y_ref).enumerate() {
        let r = r.to_f64();
        if bit != (r > 0.0) {
            // The GPU's y is 0 where the reference's is not, or the other way round: allowed
            // only within the tolerance of y itself.
            assert!(
                r.abs() <= atol + rtol * r.abs(),
                "{label} [{i}]: bit {bit}, reference y {r:e}"
            );
        }
    }
}

/// Device copies, each `offset` elements into its allocation (1: unaligned views, scalar path).
struct Device<T> {
    offset: usize,
    x: CudaSlice<T>,
    z: CudaSlice<T>,
    dy: CudaSlice<T>,
    weight: CudaSlice<f32>,
    bias: CudaSlice<f32>,
    running_mean: CudaSlice<f32>,
    running_var: CudaSlice<f32>,
}

fn padded<T: Element>(gpu: &GpuContext, values: &[T], offset: usize) -> CudaSlice<T> {
    let mut all = vec![T::default(); offset];
    all.extend_from_slice(values);
    upload(gpu, &all)
}

impl<T: Element> Device<T> {
    fn new(gpu: &GpuContext, host: &FusedInputs<T>, offset: usize) -> Self {
        Self {
            offset,
            x: padded(gpu, &host.x, offset),
            z: padded(gpu, &host.z, offset),
            dy: padded(gpu, &host.dy, offset),
            weight: upload(gpu, &host.weight),
            bias: upload(gpu, &host.bias),
            running_mean: upload(gpu, &host.running_mean),
            running_var: upload(gpu, &host.running_var),
        }
    }
}

/// What a GPU forward produced, on the host.
struct ForwardOut<T> {
    y: Vec<T>,
    mask: Vec<u32>,
    saved: Option<reference::SavedStats>,
    running: (Vec<f32>, Vec<f32>),
}

/// A fused forward on the GPU (the mask buffer starts all ones: every word must be written).
fn gpu_forward<T: Element>(
    gpu: &GpuContext,
    ws: &mut Workspace,
    dev: &mut Device<T>,
    desc: &TensorDesc,
    training: bool,
    residual: bool,
) -> ForwardOut<T> {
    let (n, c, o) = (desc.numel(), desc.channels(), dev.offset);
    let mut y = zeros::<T>(gpu, n + o);
    let mut mask = upload_words(gpu, &vec![u32::MAX; mask_words(desc)]);
    let (mut save_mean, mut save_invstd) = (zeros::<f32>(gpu, c), zeros::<f32>(gpu, c));
    let mut save_mean_lo = zeros::<f32>(gpu, c);
    {
        let x = dev.x.slice(o..);
        let z = dev.z.slice(o..);
        let mut y_view = y.slice_mut(o..);
        let mask = Some(mask.as_view_mut());
        let epilogue = match residual {
            true => Epilogue::AddRelu {
                z: z.slice(..),
                mask,
            },
            false => Epilogue::Relu { mask },
        };
        let (w, b) = (dev.weight.as_view(), dev.bias.as_view());
        if training {
            let running = RunningUpdate {
                mean: dev.running_mean.as_view_mut(),
                var: dev.running_var.as_view_mut(),
                factor: MOMENTUM,
                var_update: RunningVarUpdate::Unbiased,
            };
            let saved = SavedStatsMut {
                mean: save_mean.as_view_mut(),
                mean_lo: save_mean_lo.as_view_mut(),
                invstd: save_invstd.as_view_mut(),
            };
            functional::forward(
                gpu,
                ws,
                functional::Forward {
                    desc: *desc,
                    x: x.slice(..),
                    weight: Some(w.slice(..)),
                    bias: Some(b.slice(..)),
                    stats: functional::ForwardStats::Batch(functional::BatchStats {
                        saved,
                        running: Some(running),
                        eps: EPS,
                    }),
                    y: y_view.slice_mut(..),
                    epilogue,
                },
            )
            .expect("GPU fused training forward");
        } else {
            let running = RunningStats {
                mean: dev.running_mean.as_view(),
                var: dev.running_var.as_view(),
            };
            functional::forward(
                gpu,
                &mut Workspace::new(),
                functional::Forward {
                    desc: *desc,
                    x: x.slice(..),
                    weight: Some(w.slice(..)),
                    bias: Some(b.slice(..)),
                    stats: functional::ForwardStats::Running {
                        stats: running,
                        eps: EPS,
                    },
                    y: y_view.slice_mut(..),
                    epilogue,
                },
            )
            .expect("GPU fused eval forward");
        }
    }
    ForwardOut {
        y: download(gpu, &y)[o..].to_vec(),
        mask: download_words(gpu, &mask),
        saved: training.then(|| reference::SavedStats {
            mean: download(gpu, &save_mean),
            mean_lo: download(gpu, &save_mean_lo),
            invstd: download(gpu, &save_invstd),
        }),
        running: (
            download(gpu, &dev.running_mean),
            download(gpu, &dev.running_var),
        ),
    }
}

/// The reference forward of the same call: (y, mask, saved, running after).
fn cpu_forward<T: Element>(
    host: &FusedInputs<T>,
    desc: &TensorDesc,
    training: bool,
    residual: bool,
) -> ForwardOut<T> {
    let n = desc.numel();
    let mut y = vec![T::default(); n];
    let mut mask = vec![0u32; mask_words(desc)];
    let (mut mean, mut var) = (host.running_mean.clone(), host.running_var.clone());
    let (w, b) = (Some(&host.weight[..]), Some(&host.bias[..]));
    let z = residual.then_some(&host.z[..]);
    let saved = if training {
        Some(
            reference::fused::forward_training(
                reference::fused::Forward {
                    desc: *desc,
                    x: &host.x,
                    weight: w,
                    bias: b,
                    y: &mut y,
                    epilogue: reference::Epilogue::relu(z, Some(&mut mask)),
                },
                Some(reference::RunningUpdate::pytorch(
                    &mut mean, &mut var, MOMENTUM,
                )),
                EPS,
            )
            .unwrap(),
        )
    } else {
        let running = reference::RunningStats {
            mean: &host.running_mean,
            var: &host.running_var,
        };
        reference::fused::forward_inference(
            reference::fused::Forward {
                desc: *desc,
                x: &host.x,
                weight: w,
                bias: b,
                y: &mut y,
                epilogue: reference::Epilogue::relu(z, Some(&mut mask)),
            },
            running,
            EPS,
        )
        .unwrap();
        None
    };
    ForwardOut {
        y,
        mask,
        saved,
        running: (mean, var),
    }
}

/// What a GPU backward produced: (dx, dweight, dbias, dz).
type Grads<T> = (Vec<T>, Vec<f32>, Vec<f32>, Vec<T>);

/// A fused backward on the GPU from `mask` (and, in training, `saved`), every output asked for.
#[allow(clippy::too_many_arguments)]
fn gpu_backward<T: Element>(
    gpu: &GpuContext,
    ws: &mut Workspace,
    dev: &Device<T>,
    desc: &TensorDesc,
    mask: &[u32],
    saved: Option<&reference::SavedStats>,
    residual: bool,
) -> Grads<T> {
    let (n, c, o) = (desc.numel(), desc.channels(), dev.offset);
    let mask = upload_words(gpu, mask);
    let (mut dx, mut dz) = (zeros::<T>(gpu, n + o), zeros::<T>(gpu, n + o));
    let (mut dw, mut db) = (zeros::<f32>(gpu, c), zeros::<f32>(gpu, c));
    {
        let (x, dy, w) = (dev.x.slice(o..), dev.dy.slice(o..), dev.weight.as_view());
        let grads = GradientsMut {
            dx: Some(dx.slice_mut(o..)),
            dweight: Some(dw.as_view_mut()),
            dbias: Some(db.as_view_mut()),
            accumulate: false,
        };
        let dz_view = residual.then(|| dz.slice_mut(o..));
        match saved {
            Some(s) => {
                let (mean, invstd) = (upload(gpu, &s.mean), upload(gpu, &s.invstd));
                let mean_lo = upload(gpu, &s.mean_lo);
                let saved = SavedStats {
                    mean: mean.as_view(),
                    mean_lo: Some(mean_lo.as_view()),
                    invstd: invstd.as_view(),
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
                        epilogue: functional::EpilogueGrad::AddRelu {
                            mask: mask.as_view(),
                            dz: dz_view,
                        },
                    },
                )
                .expect("GPU fused training backward");
            }
            None => {
                let running = RunningStats {
                    mean: dev.running_mean.as_view(),
                    var: dev.running_var.as_view(),
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
                            eps: EPS,
                        },
                        grads,
                        epilogue: functional::EpilogueGrad::AddRelu {
                            mask: mask.as_view(),
                            dz: dz_view,
                        },
                    },
                )
                .expect("GPU fused eval backward");
            }
        }
    }
    (
        download(gpu, &dx)[o..].to_vec(),
        download(gpu, &dw),
        download(gpu, &db),
        download(gpu, &dz)[o..].to_vec(),
    )
}

/// The reference backward from the same mask and statistics.
fn cpu_backward<T: Element>(
    host: &FusedInputs<T>,
    desc: &TensorDesc,
    mask: &[u32],
    saved: Option<&reference::SavedStats>,
) -> Grads<T> {
    let (n, c) = (desc.numel(), desc.channels());
    let (mut dx, mut dw, mut db, mut dz) = (
        vec![T::default(); n],
        vec![0f32; c],
        vec![0f32; c],
        vec![T::default(); n],
    );
    let grads = reference::Gradients {
        dx: Some(&mut dx),
        dweight: Some(&mut dw),
        dbias: Some(&mut db),
        accumulate: false,
    };
    let w = Some(&host.weight[..]);
    match saved {
        Some(s) => reference::fused::backward_training(
            reference::fused::Backward {
                desc: *desc,
                x: &host.x,
                dy: &host.dy,
                weight: w,
                grads,
                epilogue: reference::EpilogueGrad::AddRelu {
                    mask,
                    dz: Some(&mut dz),
                },
            },
            s,
        ),
        None => reference::fused::backward_inference(
            reference::fused::Backward {
                desc: *desc,
                x: &host.x,
                dy: &host.dy,
                weight: w,
                grads,
                epilogue: reference::EpilogueGrad::AddRelu {
                    mask,
                    dz: Some(&mut dz),
                },
            },
            reference::RunningStats {
                mean: &host.running_mean,
                var: &host.running_var,
            },
            EPS,
        ),
    }
    .unwrap();
    (dx, dw, db, dz)
}

/// Forward and backward of one shape and dtype, both epilogues and modes, against the reference.
fn compare<T: Element>(gpu: &GpuContext, desc: &TensorDesc, seed: u64, offset: usize) {
    let host = fused_inputs::<T>(desc, seed);
    let (atol, rtol) = activation_bounds(T::DTYPE);
    let mut ws = Workspace::new();
    for residual in [false, true] {
        for training in [true, false] {
            let label = format!(
                "{desc} {} offset {offset} training {training} residual {residual}",
                T::DTYPE
            );
            let mut dev = Device::new(gpu, &host, offset);
            let got = gpu_forward(gpu, &mut ws, &mut dev, desc, training, residual);
            let want = cpu_forward(&host, desc, training, residual);
            let r = worst_ratio(&widen(&got.y), &widen(&want.y), atol, rtol);
            assert!(r <= 1.0, "{label}: y {r:.2} of the tolerance");
            check_mask(desc, &got.mask, &got.y, &want.y, &label);
            assert!(
                stat_ratio(&got.running.0, &want.running.0) <= 1.0,
                "{label}"
            );
            assert!(
                stat_ratio(&got.running.1, &want.running.1) <= 1.0,
                "{label}"
            );
            if let (Some(g), Some(w)) = (&got.saved, &want.saved) {
                assert!(stat_ratio(&g.mean, &w.mean) <= 1.0, "{label}: save_mean");
                assert!(
                    stat_ratio(&g.invstd, &w.invstd) <= 1.0,
                    "{label}: save_invstd"
                );
            }

            // Backward from the GPU's own mask and statistics, on both sides.
            let (dx, dw, db, dz) = gpu_backward(
                gpu,
                &mut ws,
                &dev,
                desc,
                &got.mask,
                got.saved.as_ref(),
                residual,
            );
            let (rdx, rdw, rdb, rdz) = cpu_backward(&host, desc, &got.mask, got.saved.as_ref());
            let r = worst_ratio(&widen(&dx), &widen(&rdx), atol, rtol);
            assert!(r <= 1.0, "{label}: dx {r:.2} of the tolerance");
            assert!(param_ratio(&dw, &rdw) <= 1.0, "{label}: dweight");
            assert!(param_ratio(&db, &rdb) <= 1.0, "{label}: dbias");
            if residual {
                assert_eq!(bits(&dz), bits(&rdz), "{label}: dz is dy masked, exactly");
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_fused_matches_reference_on_awkward_shapes() {
    let gpu = gpu();
    for (i, desc) in awkward_shapes().iter().enumerate() {
        for dtype in DType::ALL {
            with_dtype!(dtype, compare(&gpu, desc, 1000 + i as u64, 0));
        }
        println!("{desc}: ok");
    }
}

/// Views one element into their allocations: every kernel takes its scalar path.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_fused_matches_reference_on_unaligned_views() {
    let gpu = gpu();
    for (i, desc) in awkward_shapes().iter().enumerate() {
        for dtype in DType::ALL {
            with_dtype!(dtype, compare(&gpu, desc, 2000 + i as u64, 1));
        }
    }
}

/// Eval mode has no reduction, so the vector and the scalar paths compute every element the
/// same way: y and the mask are bitwise equal across paths, and a mask written through one path
/// is read through the other (dx, dz bitwise equal).
fn paths_agree<T: Element>(gpu: &GpuContext, desc: &TensorDesc) {
    let host = fused_inputs::<T>(desc, 77);
    let mut ws = Workspace::new();
    let (mut aligned, mut unaligned) = (Device::new(gpu, &host, 0), Device::new(gpu, &host, 1));
    for residual in [false, true] {
        let label = format!("{desc} {} residual {residual}", T::DTYPE);
        let a = gpu_forward(gpu, &mut ws, &mut aligned, desc, false, residual);
        let u = gpu_forward(gpu, &mut ws, &mut unaligned, desc, false, residual);
        assert_eq!(bits(&a.y), bits(&u.y), "{label}: y");
        assert_eq!(a.mask, u.mask, "{label}: mask");
        // Mask from the vector path, read by the scalar path, and the other way round.
        let ga = gpu_backward(gpu, &mut ws, &aligned, desc, &u.mask, None, residual);
        let gu = gpu_backward(gpu, &mut ws, &unaligned, desc, &a.mask, None, residual);
        assert_eq!(bits(&ga.0), bits(&gu.0), "{label}: dx");
        assert_eq!(bits(&ga.3), bits(&gu.3), "{label}: dz");
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_fused_vector_and_scalar_paths_share_the_mask() {
    let gpu = gpu();
    // numel % 8 == 0: the aligned runs take the vector paths (channels-last with any C: the
    // maps walk super-rows of lcm(C, 32 * VEC) values).
    for desc in [
        TensorDesc::nchw(3, 5, 8, 8).unwrap(),
        TensorDesc::nchw(2, 3, 40, 41).unwrap(), // inner = 1640: several units and a tail
        TensorDesc::nhwc(3, 64, 5, 7).unwrap(),
        TensorDesc::nhwc(2, 24, 3, 3).unwrap(), // 432 values: one partial super-row
        TensorDesc::new(&[33, 256], Layout::ChannelsFirst).unwrap(),
        TensorDesc::nhwc(4, 3, 8, 9).unwrap(), // C = 3: super-rows of 384 (f32) / 768, partial last
        TensorDesc::nhwc(2, 100, 4, 4).unwrap(), // C = 100: 3200 values, P = 3200 (f32) / 6400
        TensorDesc::new(&[40, 257], Layout::ChannelsFirst).unwrap(), // (N, C): one partial super-row
    ] {
        paths_agree::<f32>(&gpu, &desc);
        paths_agree::<f16>(&gpu, &desc);
        paths_agree::<bf16>(&gpu, &desc);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_fused_is_bitwise_deterministic() {
    let gpu = gpu();
    for desc in [
        TensorDesc::nchw(16, 8, 56, 56).unwrap(),
        TensorDesc::nhwc(16, 64, 28, 28).unwrap(),
    ] {
        let host = fused_inputs::<f16>(&desc, 31);
        let mut ws = Workspace::new();
        let run = |ws: &mut Workspace| {
            let mut dev = Device::new(&gpu, &host, 0);
            let f = gpu_forward(&gpu, ws, &mut dev, &desc, true, true);
            let g = gpu_backward(&gpu, ws, &dev, &desc, &f.mask, f.saved.as_ref(), true);
            (
                bits(&f.y),
                f.mask,
                bits(&g.0),
                bits(&g.1),
                bits(&g.2),
                bits(&g.3),
            )
        };
        let first = run(&mut ws);
        for i in 1..20 {
            let again = run(&mut ws);
            assert!(again == first, "{desc}: run {i} differs");
        }
    }
}

/// The mask is only read: two backwards from one mask agree bit for bit. Each output may be
/// left out (dz alone runs the ReLU backward by itself); accumulation adds.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_fused_mask_reuse_and_output_masks() {
    let gpu = gpu();
    let desc = TensorDesc::nchw(4, 5, 6, 7).unwrap();
    let (n, c) = (desc.numel(), desc.channels());
    let host = fused_inputs::<f32>(&desc, 41);
    let mut ws = Workspace::new();
    let mut dev = Device::new(&gpu, &host, 0);
    let f = gpu_forward(&gpu, &mut ws, &mut dev, &desc, true, true);
    let full = gpu_backward(&gpu, &mut ws, &dev, &desc, &f.mask, f.saved.as_ref(), true);
    let again = gpu_backward(&gpu, &mut ws, &dev, &desc, &f.mask, f.saved.as_ref(), true);
    assert!(full == again, "a second backward from the same mask");

    let saved = f.saved.as_ref().unwrap();
    let (mean, invstd) = (upload(&gpu, &saved.mean), upload(&gpu, &saved.invstd));
    let mean_lo = upload(&gpu, &saved.mean_lo);
    let saved = SavedStats {
        mean: mean.as_view(),
        mean_lo: Some(mean_lo.as_view()),
        invstd: invstd.as_view(),
    };
    let mask = upload_words(&gpu, &f.mask);
    let (x, dy, w) = (dev.x.as_view(), dev.dy.as_view(), dev.weight.as_view());
    let mut call = |dx: Option<&mut CudaSlice<f32>>,
                    params: Option<(&mut CudaSlice<f32>, &mut CudaSlice<f32>)>,
                    accumulate: bool,
                    dz: Option<&mut CudaSlice<f32>>| {
        let (dweight, dbias) = params
            .map(|(a, b)| (a.as_view_mut(), b.as_view_mut()))
            .unzip();
        let grads = GradientsMut {
            dx: dx.map(|d| d.as_view_mut()),
            dweight,
            dbias,
            accumulate,
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
                epilogue: functional::EpilogueGrad::AddRelu {
                    mask: mask.as_view(),
                    dz: dz.map(|d| d.as_view_mut()),
                },
            },
        )
        .unwrap();
    };
    // dz alone.
    let mut dz = upload(&gpu, &vec![7f32; n]);
    call(None, None, false, Some(&mut dz));
    assert_eq!(download(&gpu, &dz), full.3);
    // dx alone, dx and dz.
    let mut dx = zeros::<f32>(&gpu, n);
    call(Some(&mut dx), None, false, None);
    assert_eq!(download(&gpu, &dx), full.0);
    // Parameter gradients alone, accumulated twice onto 1.
    let (mut dw, mut db) = (upload(&gpu, &vec![1f32; c]), upload(&gpu, &vec![1f32; c]));
    for _ in 0..2 {
        call(None, Some((&mut dw, &mut db)), true, None);
    }
    let twice = |g: &[f32]| g.iter().map(|v| 1.0 + 2.0 * v).collect::<Vec<f32>>();
    assert!(param_ratio(&download(&gpu, &dw), &twice(&full.1)) <= 1.0);
    assert!(param_ratio(&download(&gpu, &db), &twice(&full.2)) <= 1.0);
    // dz in eval mode without dx: the ReLU backward alone.
    let running = RunningStats {
        mean: dev.running_mean.as_view(),
        var: dev.running_var.as_view(),
    };
    let mut dz = upload(&gpu, &vec![7f32; n]);
    let none = GradientsMut {
        dx: None,
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
            stats: functional::BackwardStats::Running {
                stats: running,
                eps: EPS,
            },
            grads: none,
            epilogue: functional::EpilogueGrad::AddRelu {
                mask: mask.as_view(),
                dz: Some(dz.as_view_mut()),
            },
        },
    )
    .unwrap();
    assert_eq!(download(&gpu, &dz), full.3);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_fused_nan_and_infinities_follow_pytorch() {
    let gpu = gpu();
    for desc in [
        TensorDesc::nchw(2, 2, 3, 1).unwrap(),
        TensorDesc::nhwc(2, 2, 3, 1).unwrap(),
    ] {
        let n = desc.numel();
        let mut host = fused_inputs::<f32>(&desc, 5);
        host.x[1] = f32::NAN;
        host.z[4] = f32::INFINITY;
        host.z[5] = f32::NEG_INFINITY;
        host.dy[1] = f32::NAN;
        let mut ws = Workspace::new();
        let mut dev = Device::new(&gpu, &host, 0);
        let got = gpu_forward(&gpu, &mut ws, &mut dev, &desc, false, true);
        let want = cpu_forward(&host, &desc, false, true);
        let on = unpack_mask(&desc, &got.mask).unwrap();
        assert!(
            got.y[1].is_nan() && !on[1],
            "{desc}: relu(NaN) = NaN, bit 0"
        );
        assert!(got.y[4] == f32::INFINITY && on[4]);
        assert!(got.y[5] == 0.0 && !on[5]);
        check_mask(&desc, &got.mask, &got.y, &want.y, &format!("{desc}"));
        // Eval backward: dx = dy_eff * w * invstd, dz = dy_eff; the NaN dy (index 1) sits under a
        // 0 bit, so every dx and dz is finite: dz is +0 there and dx is a zero with the sign of
        // w (+0 * w * invstd, as PyTorch's threshold_backward then batch-norm backward give).
        let g = gpu_backward(&gpu, &mut ws, &dev, &desc, &got.mask, None, true);
        assert_eq!(
            g.3[1].to_bits(),
            0,
            "{desc}: a NaN dy under bit 0 is dropped"
        );
        let g1 = desc.geometry();
        let w0 = host.weight[(1 / g1.inner) % g1.channels];
        assert_eq!(
            (g.0[1], g.0[1].is_sign_negative()),
            (0.0, w0.is_sign_negative()),
            "{desc}: dx under bit 0"
        );
        assert_eq!(g.0.len(), n);
        assert!(g.0.iter().chain(&g.3).all(|v| v.is_finite()), "{desc}");
    }
}

/// A few training steps of the GPU layer's fused calls against the CPU layer's, then eval; the
/// fused backward refuses a forward of the other kind (or without a mask).
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_fused_layer_tracks_reference_layer() {
    let gpu = gpu();
    for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
        let desc = TensorDesc::new(&[8, 4, 6, 6], layout).unwrap();
        let (n, c) = (desc.numel(), desc.channels());
        let config = BatchNormConfig::new(c);
        let mut cpu = reference::BatchNorm::new(config).unwrap();
        let mut layer = gpu::BatchNorm::new(&gpu, config).unwrap();
        for step in 0..4u64 {
            if step == 3 {
                cpu.eval();
                layer.eval();
            }
            let residual = step % 2 == 1;
            let x: Vec<f32> = random(700 + step, n, 0.5, 2.0);
            let z: Vec<f32> = random(800 + step, n, 0.0, 1.0);
            let dy: Vec<f32> = random(900 + step, n, 0.0, 1.0);
            let (y_cpu, _, cache_cpu) = if residual {
                cpu.forward_add_relu(&x, &z, &desc).unwrap()
            } else {
                cpu.forward_relu(&x, &desc).unwrap()
            };
            let (dx_dev, dz_dev, dy_dev) = (upload(&gpu, &x), upload(&gpu, &z), upload(&gpu, &dy));
            let mut y = zeros::<f32>(&gpu, n);
            let mut mask = upload_words(&gpu, &vec![0; mask_words(&desc)]);
            let cache = if residual {
                layer.forward_add_relu(
                    &desc,
                    &dx_dev.as_view(),
                    &dz_dev.as_view(),
                    &mut y.as_view_mut(),
                    Some(&mut mask.as_view_mut()),
                )
            } else {
                layer.forward_relu(
                    &desc,
                    &dx_dev.as_view(),
                    &mut y.as_view_mut(),
                    Some(&mut mask.as_view_mut()),
                )
            }
            .unwrap();
            assert_eq!(
                cache.epilogue(),
                Some(EpilogueKind::with_residual(residual))
            );
            let (y_gpu, mask_gpu) = (download(&gpu, &y), download_words(&gpu, &mask));
            assert!(worst_ratio(&widen(&y_gpu), &widen(&y_cpu), 1e-4, 1e-4) <= 1.0);
            check_mask(
                &desc,
                &mask_gpu,
                &y_gpu,
                &y_cpu,
                &format!("{desc} step {step}"),
            );
            assert_same_running_stats(&layer, &cpu);

            // Backward from each side's own mask (they agree away from 0).
            layer.zero_grad().unwrap();
            let mut gdx = zeros::<f32>(&gpu, n);
            let mut gdz = zeros::<f32>(&gpu, n);
            if residual {
                layer
                    .backward_add_relu(
                        &cache,
                        &dx_dev.as_view(),
                        &dy_dev.as_view(),
                        &mask.as_view(),
                        Some(gdx.as_view_mut()),
                        Some(gdz.as_view_mut()),
                    )
                    .unwrap();
                let wrong = layer.backward_relu(
                    &cache,
                    &dx_dev.as_view(),
                    &dy_dev.as_view(),
                    &mask.as_view(),
                    None,
                );
                assert!(matches!(wrong, Err(Error::EpilogueMismatch { .. })));
            } else {
                layer
                    .backward_relu(
                        &cache,
                        &dx_dev.as_view(),
                        &dy_dev.as_view(),
                        &mask.as_view(),
                        Some(gdx.as_view_mut()),
                    )
                    .unwrap();
            }
            let (grads, dz_cpu) = if residual {
                cpu.backward_add_relu(&cache_cpu, &x, &dy, &mask_gpu)
                    .unwrap()
            } else {
                (
                    cpu.backward_relu(&cache_cpu, &x, &dy, &mask_gpu).unwrap(),
                    vec![],
                )
            };
            assert!(
                worst_ratio(&widen(&download(&gpu, &gdx)), &widen(&grads.dx), 1e-4, 1e-4) <= 1.0
            );
            if residual {
                assert_eq!(download(&gpu, &gdz), dz_cpu);
            }
            let (gw, gb) = (
                layer.grad_weight().unwrap().unwrap(),
                layer.grad_bias().unwrap().unwrap(),
            );
            assert!(param_ratio(&gw, grads.dweight.as_ref().unwrap()) <= 1.0);
            assert!(param_ratio(&gb, grads.dbias.as_ref().unwrap()) <= 1.0);
        }
        // A fused forward without a mask cannot be differentiated through its mask.
        let x = upload(&gpu, &vec![1f32; n]);
        let mut y = zeros::<f32>(&gpu, n);
        let cache = layer
            .forward_relu(&desc, &x.as_view(), &mut y.as_view_mut(), None)
            .unwrap();
        let mask = upload_words(&gpu, &vec![0; mask_words(&desc)]);
        assert!(matches!(
            layer.backward_relu(&cache, &x.as_view(), &x.as_view(), &mask.as_view(), None),
            Err(Error::EpilogueMismatch { .. })
        ));
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_fused_refuses_bad_buffers_before_launching() {
    let gpu = gpu();
    let desc = TensorDesc::nchw(2, 3, 4, 5).unwrap();
    let n = desc.numel();
    let x = upload(&gpu, &vec![1f32; n]);
    let z = upload(&gpu, &vec![1f32; n - 1]);
    let mut y = upload(&gpu, &vec![9f32; n]);
    let mut mask = upload_words(&gpu, &vec![9u32; mask_words(&desc) - 1]);
    let (mean, var) = (upload(&gpu, &[0f32; 3]), upload(&gpu, &[1f32; 3]));
    let running = RunningStats {
        mean: mean.as_view(),
        var: var.as_view(),
    };
    let err = functional::forward(
        &gpu,
        &mut Workspace::new(),
        functional::Forward {
            desc,
            x: x.as_view(),
            weight: None,
            bias: None,
            stats: functional::ForwardStats::Running {
                stats: running.clone(),
                eps: EPS,
            },
            y: y.as_view_mut(),
            epilogue: Epilogue::AddRelu {
                z: z.as_view(),
                mask: Some(mask.as_view_mut()),
            },
        },
    );
    assert!(matches!(err, Err(Error::BufferLength { what: "z", .. })));
    let z = upload(&gpu, &vec![1f32; n]);
    let err = functional::forward(
        &gpu,
        &mut Workspace::new(),
        functional::Forward {
            desc,
            x: x.as_view(),
            weight: None,
            bias: None,
            stats: functional::ForwardStats::Running {
                stats: running,
                eps: EPS,
            },
            y: y.as_view_mut(),
            epilogue: Epilogue::AddRelu {
                z: z.as_view(),
                mask: Some(mask.as_view_mut()),
            },
        },
    );
    assert!(matches!(err, Err(Error::BufferLength { what: "mask", .. })));
    assert!(download(&gpu, &y).iter().all(|&v| v == 9.0));
    assert!(download_words(&gpu, &mask).iter().all(|&m| m == 9));
}

/// `BN(x) + z` is rounded once to the half type: an f32 sum just past a midpoint
/// (`common::eval_halfway`) rounds up, where rounding `BN(x)` first would tie down to 1.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_fused_add_rounds_once_past_a_half_way_point() {
    fn check<T: Element>(gpu: &GpuContext) {
        let case = common::eval_halfway(T::DTYPE);
        let desc = TensorDesc::new(&[1, 1], Layout::ChannelsFirst).unwrap();
        let (x, z) = (
            upload(gpu, &[T::from_f64(0.0)]),
            upload(gpu, &[T::from_f64(1.0)]),
        );
        let (mean, bias) = case.add;
        let (mean, var) = (upload(gpu, &mean), upload(gpu, &case.running_var));
        let (w, b) = (upload(gpu, &[1.0f32]), upload(gpu, &bias));
        let mut y = zeros::<T>(gpu, 1);
        let mut mask = upload_words(gpu, &[0]);
        functional::forward(
            gpu,
            &mut Workspace::new(),
            functional::Forward {
                desc,
                x: x.as_view(),
                weight: Some(w.as_view()),
                bias: Some(b.as_view()),
                stats: functional::ForwardStats::Running {
                    stats: RunningStats {
                        mean: mean.as_view(),
                        var: var.as_view(),
                    },
                    eps: case.eps,
                },
                y: y.as_view_mut(),
                epilogue: functional::Epilogue::relu(Some(z.as_view()), Some(mask.as_view_mut())),
            },
        )
        .unwrap();
        assert_eq!(download(gpu, &y)[0].to_f64(), case.expected, "{}", T::DTYPE);
    }
    let gpu = gpu();
    check::<f16>(&gpu);
    check::<bf16>(&gpu);
}
