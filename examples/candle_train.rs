//! Trains a small CNN with candle on images the example draws itself (stripes at three
//! orientations, random phase, brightness and contrast, noise), twice per learning rate: with
//! this crate's batch norm after each convolution and with no normalization, from the same
//! seeded initial weights. Prints the loss per epoch and the test accuracy, and draws the loss
//! curves (SVG, `plotters`) to `docs/candle_train.svg` or the path given as the first argument.
//!
//! `cargo run --release --features candle --example candle_train` (CPU: the CPU reference;
//! with `--features candle-cuda` on a GPU machine, the crate's kernels).

use batchnorm_cuda::candle::{BatchNorm, Dims};
use batchnorm_cuda::BatchNormConfig;
use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, Linear, ModuleT, Optimizer, VarBuilder, VarMap};
use plotters::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SIZE: usize = 12;
const CLASSES: usize = 3;
const EPOCHS: usize = 10;
const BATCH: usize = 32;
const SEED: u64 = 2024;
/// A learning rate both networks train with.
const LR: f64 = 0.05;
/// Twenty times higher: the unnormalized network's loss jumps by orders of magnitude and it
/// ends near chance, the normalized one converges.
const HIGH_LR: f64 = 1.0;

/// `n` images `(n, 1, SIZE, SIZE)` and labels: horizontal, vertical or diagonal stripes of a
/// random period and phase, scaled by a random contrast, shifted by a random brightness, noisy.
fn dataset(n: usize, rng: &mut StdRng, device: &Device) -> Result<(Tensor, Tensor)> {
    let mut pixels = Vec::with_capacity(n * SIZE * SIZE);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let class = i % CLASSES;
        let period = rng.random_range(3.0f32..6.0);
        let phase = rng.random_range(0.0..std::f32::consts::TAU);
        let contrast = rng.random_range(1.0f32..8.0);
        let brightness = rng.random_range(-8.0f32..8.0);
        for row in 0..SIZE {
            for col in 0..SIZE {
                let t = match class {
                    0 => row as f32,
                    1 => col as f32,
                    _ => (row + col) as f32 / std::f32::consts::SQRT_2,
                };
                let wave = (std::f32::consts::TAU * t / period + phase).sin();
                pixels.push(brightness + contrast * wave + rng.random_range(-0.5..0.5));
            }
        }
        labels.push(class as u32);
    }
    Ok((
        Tensor::from_vec(pixels, (n, 1, SIZE, SIZE), device)?,
        Tensor::new(labels, device)?,
    ))
}

/// conv 3x3 (8) -> [BN] -> ReLU -> conv 3x3 stride 2 (16) -> [BN] -> ReLU -> mean -> linear.
struct Net {
    conv1: Conv2d,
    bn1: Option<BatchNorm>,
    conv2: Conv2d,
    bn2: Option<BatchNorm>,
    fc: Linear,
}

impl Net {
    fn new(normalized: bool, vb: VarBuilder) -> Result<Self> {
        let padded = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let strided = Conv2dConfig {
            stride: 2,
            ..Default::default()
        };
        let bn = |c, name| {
            normalized
                .then(|| BatchNorm::new(Dims::Two, BatchNormConfig::new(c), vb.pp(name)))
                .transpose()
        };
        Ok(Self {
            conv1: candle_nn::conv2d(1, 8, 3, padded, vb.pp("conv1"))?,
            bn1: bn(8, "bn1")?,
            conv2: candle_nn::conv2d(8, 16, 3, strided, vb.pp("conv2"))?,
            bn2: bn(16, "bn2")?,
            fc: candle_nn::linear(16, CLASSES, vb.pp("fc"))?,
        })
    }
}

impl ModuleT for Net {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let block = |x: Tensor, bn: &Option<BatchNorm>| match bn {
            Some(bn) => bn.forward_t(&x, train)?.relu(),
            None => x.relu(),
        };
        let h = block(x.apply(&self.conv1)?, &self.bn1)?;
        let h = block(h.apply(&self.conv2)?, &self.bn2)?;
        h.mean((2, 3))?.apply(&self.fc)
    }
}

/// Overwrites every convolution and linear weight with seeded He-uniform values (and their
/// biases with 0): candle's own initializers draw from an unseeded generator. Both networks get
/// the same values, the batch norms keep PyTorch's initial state.
fn seeded_init(varmap: &VarMap, device: &Device) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(SEED);
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().filter(|n| !n.starts_with("bn")).collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let values: Vec<f32> = if name.ends_with(".weight") {
            let fan_in = var.elem_count() / var.dims()[0];
            let bound = (6.0 / fan_in as f32).sqrt();
            (0..var.elem_count())
                .map(|_| rng.random_range(-bound..bound))
                .collect()
        } else {
            vec![0.0; var.elem_count()]
        };
        var.set(&Tensor::from_vec(values, var.shape(), device)?)?;
    }
    Ok(())
}

/// One training run: the mean training loss per epoch and the final test accuracy.
fn train(normalized: bool, lr: f64, data: &Data) -> Result<(Vec<f32>, f32)> {
    let device = data.train.0.device();
    let varmap = VarMap::new();
    let net = Net::new(
        normalized,
        VarBuilder::from_varmap(&varmap, DType::F32, device),
    )?;
    seeded_init(&varmap, device)?;
    let mut sgd = candle_nn::SGD::new(varmap.all_vars(), lr)?;
    let (images, labels) = &data.train;
    let n = images.dim(0)?;
    let mut losses = Vec::with_capacity(EPOCHS);
    for _ in 0..EPOCHS {
        let mut total = 0.0;
        for start in (0..n).step_by(BATCH) {
            let len = BATCH.min(n - start);
            let logits = net.forward_t(&images.narrow(0, start, len)?, true)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &labels.narrow(0, start, len)?)?;
            total += loss.to_scalar::<f32>()? * len as f32;
            if loss.to_scalar::<f32>()?.is_finite() {
                sgd.backward_step(&loss)?;
            }
        }
        losses.push(total / n as f32);
    }
    let (images, labels) = &data.test;
    let predicted = net.forward_t(images, false)?.argmax(D::Minus1)?;
    let correct = predicted.eq(labels)?.to_dtype(DType::F32)?.sum_all()?;
    Ok((losses, correct.to_scalar::<f32>()? / images.dim(0)? as f32))
}

struct Data {
    train: (Tensor, Tensor),
    test: (Tensor, Tensor),
}

/// One curve of the plot.
struct Run {
    label: String,
    losses: Vec<f32>,
    color: RGBColor,
}

fn plot(path: &str, runs: &[Run]) -> std::result::Result<(), Box<dyn std::error::Error>> {
    // A diverged run's loss is clipped to the top of the plot.
    let top = 2.0f32;
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "candle CNN on generated stripes: training loss per epoch",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(1f32..EPOCHS as f32, 0f32..top)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("cross-entropy loss")
        .draw()?;
    for run in runs {
        let color = run.color;
        let points = run
            .losses
            .iter()
            .enumerate()
            .map(|(i, &l)| ((i + 1) as f32, if l.is_finite() { l.min(top) } else { top }));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(run.label.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let device = Device::cuda_if_available(0)?;
    let mut rng = StdRng::seed_from_u64(SEED);
    let data = Data {
        train: dataset(480, &mut rng, &device)?,
        test: dataset(240, &mut rng, &device)?,
    };
    println!(
        "candle on {device:?}: {EPOCHS} epochs of 480 images {SIZE}x{SIZE}, batch {BATCH}, SGD"
    );
    let mut runs = Vec::new();
    // Blue and red at the learning rate both handle, green and orange at the high one.
    let palette = [(BLUE, RED), (RGBColor(0, 150, 60), RGBColor(240, 130, 0))];
    for (lr, (bn_color, plain_color)) in [LR, HIGH_LR].into_iter().zip(palette) {
        for (normalized, color) in [(true, bn_color), (false, plain_color)] {
            let name = if normalized { "batch norm" } else { "no norm" };
            let (losses, accuracy) = train(normalized, lr, &data)?;
            let shown: Vec<String> = losses.iter().map(|l| format!("{l:.3}")).collect();
            println!(
                "lr {lr:<4} {name:<10} loss per epoch [{}]  test accuracy {:.1}%",
                shown.join(", "),
                100.0 * accuracy
            );
            runs.push(Run {
                label: format!("{name}, lr {lr}"),
                losses,
                color,
            });
        }
    }
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "docs/candle_train.svg".into());
    plot(&path, &runs)?;
    println!("loss curves: {path}");
    Ok(())
}
