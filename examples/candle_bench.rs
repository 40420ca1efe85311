//! candle-nn's `BatchNorm` against this crate's adapter inside candle, on a ResNet-sized
//! activation (default 32x256x56x56, f32 and f16), training mode: the forward alone, and the
//! forward with candle's backward of `sum(y * g)` (the same loss for both, so the difference is
//! the batch norm's). Median of timed iterations after warm-up, each ended by a device
//! synchronize. Needs a CUDA device:
//!
//! ```text
//! cargo run --release --features candle-cuda --example candle_bench [-- N C H W [ITERS]]
//! ```
//!
//! A row whose module refuses the call (candle-nn's training forward mixes its f32 statistics
//! with f16 parameters or activations) prints the error instead of a time.

use batchnorm_cuda::candle::{candle_core, candle_nn, BatchNorm, Dims};
use batchnorm_cuda::BatchNormConfig;
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use std::time::Instant;

/// The median wall time of `f` in milliseconds, the device synchronized around each call.
fn median_ms(device: &Device, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    device.synchronize()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = Instant::now();
        f()?;
        device.synchronize()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[iters / 2])
}

/// Forward and forward + backward times of `module` on `x` (a `Var`), or the module's error.
fn time_module(
    device: &Device,
    module: &dyn ModuleT,
    x: &Var,
    g: &Tensor,
    iters: usize,
) -> Result<(f64, f64)> {
    let forward = median_ms(device, iters, || {
        module.forward_t(x.as_tensor(), true).map(drop)
    })?;
    let backward = median_ms(device, iters, || {
        let y = module.forward_t(x.as_tensor(), true)?;
        (y * g)?.sum_all()?.backward().map(drop)
    })?;
    Ok((forward, backward))
}

fn cell(result: &Result<(f64, f64)>, pick: fn(&(f64, f64)) -> f64) -> String {
    match result {
        Ok(times) => format!("{:>10.3}", pick(times)),
        Err(_) => format!("{:>10}", "error"),
    }
}

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("arguments: N C H W [ITERS]"))
        .collect();
    let (shape, iters) = match args.as_slice() {
        [] => ((32, 256, 56, 56), 20),
        [n, c, h, w] => ((*n, *c, *h, *w), 20),
        [n, c, h, w, iters] => ((*n, *c, *h, *w), *iters),
        _ => panic!("arguments: N C H W [ITERS]"),
    };
    let device = Device::new_cuda(0)?;
    println!(
        "batch norm in candle, training, x {shape:?}, median of {iters} after 3 warm-up \
         calls, ms"
    );
    println!(
        "{:<6} {:<26} {:>10} {:>10}",
        "dtype", "module", "forward", "fwd+bwd"
    );
    for dtype in [DType::F32, DType::F16] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &device)?.to_dtype(dtype)?)?;
        let g = Tensor::randn(0f32, 1.0, shape, &device)?.to_dtype(dtype)?;
        let c = shape.1;

        let ours_map = VarMap::new();
        let ours = BatchNorm::new(
            Dims::Two,
            BatchNormConfig::new(c),
            VarBuilder::from_varmap(&ours_map, DType::F32, &device),
        )?;
        // candle-nn's parameters in f32 (its statistics are f32 inside its forward either way).
        let theirs_map = VarMap::new();
        let theirs = candle_nn::batch_norm(
            c,
            candle_nn::BatchNormConfig::default(),
            VarBuilder::from_varmap(&theirs_map, DType::F32, &device),
        )?;

        let rows: [(&str, &dyn ModuleT); 2] = [
            ("candle_nn::BatchNorm", &theirs),
            ("batchnorm_cuda::candle", &ours),
        ];
        for (name, module) in rows {
            let result = time_module(&device, module, &x, &g, iters);
            println!(
                "{:<6} {:<26} {} {}",
                format!("{dtype:?}"),
                name,
                cell(&result, |t| t.0),
                cell(&result, |t| t.1)
            );
            if let Err(e) = result {
                let message = e.to_string();
                println!("       ({name}: {})", message.lines().next().unwrap_or(""));
            }
        }
    }
    Ok(())
}
