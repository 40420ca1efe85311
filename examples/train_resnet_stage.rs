//! The main example: the batch norms of a ResNet-style stage (conv -> BN -> ReLU, three times)
//! through a few training steps (forward, backward, SGD on weight and bias, running
//! statistics), eval, folding the first batch norm into the convolution before it, and saving
//! the state in PyTorch's format. Every GPU step is checked against the CPU reference.
//!
//! Runs on the GPU when one is present, on the CPU reference alone otherwise, and says which:
//!
//! ```sh
//! cargo run --release --example train_resnet_stage
//! ```

use batchnorm_cuda::fold::{FoldKind, FoldSpec};
use batchnorm_cuda::gpu::{self, GpuContext};
use batchnorm_cuda::state::StateFile;
use batchnorm_cuda::{conv, reference};
use batchnorm_cuda::{BatchNormConfig, Element, Layout, Result, TensorDesc};
use half::{bf16, f16};
use std::time::Instant;

const STEPS: u64 = 4;
const LEARNING_RATE: f32 = 0.05;

/// One batch norm of the stage: its input shape, and the same layer on the CPU and the GPU.
struct Layer {
    name: &'static str,
    desc: TensorDesc,
    cpu: reference::BatchNorm,
    gpu: Option<gpu::BatchNorm>,
}

/// How much of its tolerance the worst GPU result of one step uses (at most 1 passes).
#[derive(Default)]
struct Errors {
    y: f64,
    dx: f64,
    params: f64,
    running: f64,
}

impl Errors {
    fn worst(&self) -> f64 {
        self.y.max(self.dx).max(self.params).max(self.running)
    }
}

/// The worst `|got - want| / (atol + rtol * |want|)`; a NaN on one side only is infinite.
fn share(got: &[f64], want: &[f64], (atol, rtol): (f64, f64)) -> f64 {
    got.iter()
        .zip(want)
        .map(|(g, w)| match (g.is_nan(), w.is_nan()) {
            (false, false) => (g - w).abs() / (atol + rtol * w.abs()),
            (true, true) => 0.0,
            _ => f64::INFINITY,
        })
        .fold(0.0, f64::max)
}

/// Tolerances of the golden cases (`shared/golden/FORMAT.md`): outputs in the activation dtype.
fn output_tolerance<T: Element>() -> (f64, f64) {
    match T::DTYPE {
        batchnorm_cuda::DType::F32 => (1e-4, 1e-4),
        batchnorm_cuda::DType::F16 => (4e-3, 2e-3),
        batchnorm_cuda::DType::BF16 => (3e-2, 1.6e-2),
    }
}

/// Statistics are f32 whatever the activation dtype.
const STATS_TOLERANCE: (f64, f64) = (1e-4, 1e-4);

/// Parameter gradients are sums over a channel: relative to the largest of them.
fn sums_tolerance(want: &[f64]) -> (f64, f64) {
    (
        1e-4 + 1e-4 * want.iter().fold(0.0, |m: f64, w| m.max(w.abs())),
        0.0,
    )
}

fn widen<T: Element>(values: &[T]) -> Vec<f64> {
    values.iter().map(|v| v.to_f64()).collect()
}

/// Deterministic pseudo-random values in `[-1, 1)` (SplitMix64), so the example needs no RNG.
fn noise(seed: u64, len: usize) -> Vec<f64> {
    (0..len as u64)
        .map(|i| {
            let mut z = seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(i.wrapping_mul(0xBF58_476D_1CE4_E5B9));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect()
}

fn tensor<T: Element>(seed: u64, len: usize, mean: f64, spread: f64) -> Vec<T> {
    noise(seed, len)
        .into_iter()
        .map(|u| T::from_f64(mean + spread * u))
        .collect()
}

fn sgd(params: &[f32], grads: &[f32]) -> Vec<f32> {
    params
        .iter()
        .zip(grads)
        .map(|(p, g)| p - LEARNING_RATE * g)
        .collect()
}

/// One training step of one layer in dtype `T`: CPU always, GPU when present; returns the
/// CPU and GPU times (seconds) and the GPU's errors against the CPU.
fn train_step<T: Element>(
    layer: &mut Layer,
    gpu_ctx: Option<&GpuContext>,
    seed: u64,
) -> Result<(f64, f64, Errors)> {
    let n = layer.desc.numel();
    // A conv output with a per-layer offset, and the gradient coming back through ReLU.
    let x: Vec<T> = tensor(seed, n, 0.5 + 0.1 * seed as f64, 2.0);
    let dy: Vec<T> = tensor(seed + 1000, n, 0.0, 0.5);

    let start = Instant::now();
    let (y_ref, cache) = layer.cpu.forward(&x, &layer.desc)?;
    let grads = layer.cpu.backward(&cache, &x, &dy)?;
    let (dw, db) = (
        grads.dweight.clone().unwrap_or_default(),
        grads.dbias.clone().unwrap_or_default(),
    );
    let weight = sgd(layer.cpu.weight().unwrap_or_default(), &dw);
    let bias = sgd(layer.cpu.bias().unwrap_or_default(), &db);
    layer.cpu.set_weight(&weight)?;
    layer.cpu.set_bias(&bias)?;
    let cpu_time = start.elapsed().as_secs_f64();

    let (Some(ctx), Some(bn)) = (gpu_ctx, layer.gpu.as_mut()) else {
        return Ok((cpu_time, 0.0, Errors::default()));
    };
    let stream = ctx.stream();
    let d_x = stream.clone_htod(&x)?;
    let d_dy = stream.clone_htod(&dy)?;
    let mut d_y = stream.alloc_zeros::<T>(n)?;
    let mut d_dx = stream.alloc_zeros::<T>(n)?;
    ctx.synchronize()?;
    let start = Instant::now();
    let cache = bn.forward(&layer.desc, &d_x.as_view(), &mut d_y.as_view_mut())?;
    bn.zero_grad()?;
    bn.backward(
        &cache,
        &d_x.as_view(),
        &d_dy.as_view(),
        Some(d_dx.as_view_mut()),
    )?;
    ctx.synchronize()?;
    let gpu_time = start.elapsed().as_secs_f64();
    let (gw, gb) = (
        bn.grad_weight()?.unwrap_or_default(),
        bn.grad_bias()?.unwrap_or_default(),
    );
    bn.set_weight(&sgd(&bn.weight()?.unwrap_or_default(), &gw))?;
    bn.set_bias(&sgd(&bn.bias()?.unwrap_or_default(), &gb))?;

    let (tol, (dw, db)) = (output_tolerance::<T>(), (widen(&dw), widen(&db)));
    let (gw, gb) = (widen(&gw), widen(&gb));
    let errors = Errors {
        y: share(&widen(&stream.clone_dtoh(&d_y)?), &widen(&y_ref), tol),
        dx: share(&widen(&stream.clone_dtoh(&d_dx)?), &widen(&grads.dx), tol),
        params: share(&gw, &dw, sums_tolerance(&dw)).max(share(&gb, &db, sums_tolerance(&db))),
        running: share(
            &widen(&bn.running_mean()?.unwrap_or_default()),
            &widen(layer.cpu.running_mean().unwrap_or_default()),
            STATS_TOLERANCE,
        )
        .max(share(
            &widen(&bn.running_var()?.unwrap_or_default()),
            &widen(layer.cpu.running_var().unwrap_or_default()),
            STATS_TOLERANCE,
        )),
    };
    Ok((cpu_time, gpu_time, errors))
}

/// Eval forward of one layer on both paths; returns the share of the tolerance the GPU uses.
fn eval_step<T: Element>(layer: &mut Layer, gpu_ctx: Option<&GpuContext>) -> Result<f64> {
    let x: Vec<T> = tensor(99, layer.desc.numel(), 0.7, 2.0);
    layer.cpu.eval();
    let (y_ref, _) = layer.cpu.forward(&x, &layer.desc)?;
    let (Some(ctx), Some(bn)) = (gpu_ctx, layer.gpu.as_mut()) else {
        return Ok(0.0);
    };
    bn.eval();
    let d_x = ctx.stream().clone_htod(&x)?;
    let mut d_y = ctx.stream().alloc_zeros::<T>(x.len())?;
    bn.forward(&layer.desc, &d_x.as_view(), &mut d_y.as_view_mut())?;
    Ok(share(
        &widen(&ctx.stream().clone_dtoh(&d_y)?),
        &widen(&y_ref),
        output_tolerance::<T>(),
    ))
}

/// Folds the first batch norm into a 3x3 convolution before it and checks
/// `conv_folded(x) == bn(conv(x))` on the CPU reference (the fold itself also on the GPU).
fn fold_step(layer: &Layer, gpu_ctx: Option<&GpuContext>) -> Result<(f64, f64)> {
    let c = layer.desc.channels();
    let spec = FoldSpec::new(FoldKind::Conv, &[c, c, 3, 3], 1, Layout::ChannelsFirst)?;
    let weight: Vec<f32> = tensor(7, spec.numel(), 0.0, 0.1);
    let conv_bias: Vec<f32> = tensor(8, c, 0.0, 0.1);
    let input = TensorDesc::nchw(2, c, 10, 10)?;
    let x: Vec<f32> = tensor(9, input.numel(), 0.0, 1.0);
    let params = conv::ConvParams::new(2).padding(&[1, 1]);
    let conv_out = conv::conv(&x, input.dims(), &spec, &weight, Some(&conv_bias), &params)?;
    let (out_desc, conv_out) = (conv_out.desc()?, conv_out.values);

    let mut bn_out = vec![0f32; conv_out.len()];
    let running = reference::RunningStats {
        mean: layer.cpu.running_mean().unwrap_or_default(),
        var: layer.cpu.running_var().unwrap_or_default(),
    };
    let (w, b) = (layer.cpu.weight(), layer.cpu.bias());
    reference::forward_inference(
        &conv_out,
        &out_desc,
        w,
        b,
        running,
        layer.cpu.config().eps,
        &mut bn_out,
    )?;

    let folded = layer.cpu.fold_into(&spec, &weight, Some(&conv_bias))?;
    let folded_out = conv::conv(
        &x,
        input.dims(),
        &spec,
        &folded.weight,
        Some(&folded.bias),
        &params,
    )?;
    // 3x3x32 = 288 products per output, each O(0.1): a few f32 ulps of accumulated rounding.
    let cpu_err = share(&widen(&folded_out.values), &widen(&bn_out), (1e-5, 1e-5));

    let (Some(ctx), Some(bn)) = (gpu_ctx, layer.gpu.as_ref()) else {
        return Ok((cpu_err, 0.0));
    };
    let stream = ctx.stream();
    let d_w = stream.clone_htod(&weight)?;
    let d_b = stream.clone_htod(&conv_bias)?;
    let mut out_w = stream.alloc_zeros::<f32>(weight.len())?;
    let mut out_b = stream.alloc_zeros::<f32>(c)?;
    bn.fold_into(
        &spec,
        Some(&d_w.as_view()),
        &mut out_w.as_view_mut(),
        Some(&d_b.as_view()),
        &mut out_b.as_view_mut(),
    )?;
    // The GPU folds in f64 and rounds once, like the reference (fold/FORMAT.md: rtol 1e-6), from
    // the GPU layer's own statistics (which track the CPU layer's within tolerance, not bitwise).
    let mut twin = reference::BatchNorm::new(*bn.config())?;
    twin.load_state(&bn.state()?)?;
    twin.eval();
    let want = twin.fold_into(&spec, &weight, Some(&conv_bias))?;
    let fold_tol = (1e-7, 1e-6);
    let gpu_err = share(
        &widen(&stream.clone_dtoh(&out_w)?),
        &widen(&want.weight),
        fold_tol,
    )
    .max(share(
        &widen(&stream.clone_dtoh(&out_b)?),
        &widen(&want.bias),
        fold_tol,
    ));
    Ok((cpu_err, gpu_err))
}

fn main() -> Result<()> {
    let total = Instant::now();
    let gpu_ctx = match GpuContext::new(0) {
        Ok(ctx) => {
            println!(
                "device: {} ({} SMs): GPU kernels, checked against the CPU reference",
                ctx.device_name()?,
                ctx.sm_count()
            );
            Some(ctx)
        }
        Err(e) => {
            println!("no GPU ({e}): running the CPU reference alone");
            None
        }
    };

    let (n, c) = (8, 32);
    let shapes = [
        ("bn1 f32 NCHW", TensorDesc::nchw(n, c, 28, 28)?),
        ("bn2 f16 NHWC", TensorDesc::nhwc(n, c, 28, 28)?),
        ("bn3 bf16 NHWC", TensorDesc::nhwc(n, 4 * c, 28, 28)?),
    ];
    let mut layers = Vec::new();
    for (name, desc) in shapes {
        let config = BatchNormConfig::new(desc.channels());
        let gpu = gpu_ctx
            .as_ref()
            .map(|ctx| gpu::BatchNorm::new(ctx, config))
            .transpose()?;
        layers.push(Layer {
            name,
            desc,
            cpu: reference::BatchNorm::new(config)?,
            gpu,
        });
    }

    let mut worst = 0f64;
    for step in 0..STEPS {
        for (i, layer) in layers.iter_mut().enumerate() {
            let seed = 10 * step + i as u64;
            let (cpu_t, gpu_t, e) = match i {
                0 => train_step::<f32>(layer, gpu_ctx.as_ref(), seed)?,
                1 => train_step::<f16>(layer, gpu_ctx.as_ref(), seed)?,
                _ => train_step::<bf16>(layer, gpu_ctx.as_ref(), seed)?,
            };
            let timing = if gpu_ctx.is_some() {
                worst = worst.max(e.worst());
                format!(
                    "cpu {:6.2} ms, gpu {:6.3} ms | share of tolerance: y {:.2} dx {:.2} grads {:.2} running {:.2}",
                    cpu_t * 1e3, gpu_t * 1e3, e.y, e.dx, e.params, e.running
                )
            } else {
                format!("cpu {:7.2} ms", cpu_t * 1e3)
            };
            println!("step {step} {:<14} {} | {timing}", layer.name, layer.desc);
        }
    }

    for (i, layer) in layers.iter_mut().enumerate() {
        let err = match i {
            0 => eval_step::<f32>(layer, gpu_ctx.as_ref())?,
            1 => eval_step::<f16>(layer, gpu_ctx.as_ref())?,
            _ => eval_step::<bf16>(layer, gpu_ctx.as_ref())?,
        };
        worst = worst.max(err);
        let gpu_note = if gpu_ctx.is_some() {
            format!(": GPU uses {err:.2} of the tolerance")
        } else {
            String::new()
        };
        println!(
            "eval {:<14} running_mean[0] {:.4}, num_batches_tracked {}{gpu_note}",
            layer.name,
            layer.cpu.running_mean().unwrap_or_default()[0],
            layer.cpu.num_batches_tracked()
        );
    }

    let (fold_cpu, fold_gpu) = fold_step(&layers[0], gpu_ctx.as_ref())?;
    worst = worst.max(fold_cpu).max(fold_gpu);
    println!("fold bn1 into a 3x3 conv: conv_folded(x) vs bn(conv(x)) uses {fold_cpu:.2} of the tolerance");
    if gpu_ctx.is_some() {
        println!("fold on the GPU: folded weight and bias use {fold_gpu:.2} of the tolerance");
    }

    let path = std::env::temp_dir().join("batchnorm_cuda_resnet_stage.safetensors");
    let states: Vec<_> = layers.iter().map(|l| l.cpu.state()).collect();
    let prefixes = ["layer1.0.bn1.", "layer1.0.bn2.", "layer1.0.bn3."];
    let named: Vec<_> = prefixes.iter().copied().zip(&states).collect();
    StateFile::save(&path, &named)?;
    let file = StateFile::open(&path)?;
    for ((prefix, state), layer) in named.iter().zip(&layers) {
        assert_eq!(
            &&file.layer(prefix, layer.cpu.config())?,
            state,
            "{prefix} reloads as saved"
        );
    }
    println!(
        "saved {} layers in PyTorch's state_dict format to {} and reloaded them",
        named.len(),
        path.display()
    );
    println!("done in {:.2} s", total.elapsed().as_secs_f64());
    if worst > 1.0 {
        eprintln!("FAILED: a result is outside its tolerance ({worst:.2} of it)");
        std::process::exit(1);
    }
    println!("every check within tolerance (worst {worst:.2} of it)");
    Ok(())
}
