//! End-to-end proof that a batch-norm fold is right, beyond the golden cases: for random layers
//! and random eval-mode batch norms, batch norm after the layer equals the folded layer.
//!
//! - A = `reference::forward_inference` (running statistics) of the reference layer's output,
//! - B = the reference layer with the folded weight and bias (`reference::fold`, and the CPU
//!   layer's `BatchNorm::fold_into`, which must agree bit for bit),
//!
//! and `|A - B|` within the rounding bound of [`Case::bound`], element by element. The layers are
//! `conv`'s direct loops: conv 1-D, 2-D, 3-D, grouped, depthwise, transposed with
//! groups (the fold PyTorch gets wrong), linear; with and without conv bias, affine or not,
//! channels-first and channels-last weights, f32, f16 and bf16.
//!
//! The GPU checks (ignored without a device) fold the same cases with `gpu::functional::fold`
//! and `gpu::BatchNorm::fold_into`, compare them with the CPU fold (one rounding of `T`), and
//! run the whole check **on the device**: A = `gpu::functional::forward` in eval of
//! `conv::gpu` (the direct convolution of `kernels/conv_direct.cu`: f32 accumulation, one
//! rounding to `T`) and B = `conv::gpu` with the GPU-folded weight and bias, straight from the
//! fold's output buffers, within the bound of [`Case::bound`] for device arithmetic (which adds
//! the f32 accumulation of both convolutions and the f32 batch norm). The device convolution of
//! the original layer is also checked against the reference layer's output.
//!
//! `cargo test --release --test fold_e2e -- --nocapture` prints each case with its worst error.

mod common;

use batchnorm_cuda::conv::{self, ConvOutput, ConvParams};
use batchnorm_cuda::fold::{FoldKind, FoldSpec};
use batchnorm_cuda::reference::{self, FoldBatchNorm, Folded, RunningStats};
use batchnorm_cuda::{BatchNormConfig, DType, Element, Error, Layout};
use common::conv::{gamma, terms, to_channels_last, ConvLayer, LAYERS};
use common::gpu::{random, random_f32};
use common::ulp;

use FoldKind::{Conv, ConvTranspose};

const LAYOUTS: [Layout; 2] = [Layout::ChannelsFirst, Layout::ChannelsLast];

/// One random case: a layer, an eval-mode batch norm after it, an input, and
/// A = BN(layer(x)) by the reference.
struct Case<T> {
    label: String,
    spec: FoldSpec,
    params: ConvParams,
    x: Vec<T>,
    x_dims: Vec<usize>,
    weight: Vec<T>,
    conv_bias: Option<Vec<T>>,
    bn_weight: Option<Vec<f32>>,
    bn_bias: Option<Vec<f32>>,
    running_mean: Vec<f32>,
    running_var: Vec<f32>,
    eps: f32,
    /// The layer's own output, before the batch norm.
    conv_out: ConvOutput<T>,
    /// A: the batch norm of `conv_out`.
    expect: Vec<T>,
}

/// How a folded layer compared with A.
struct Outcome {
    /// Largest `|A - B|`.
    worst: f64,
    /// Largest `|A - B| / bound`.
    ratio: f64,
    /// Largest `|A - layer(x)|`: what the batch norm changed, which the fold had to reproduce.
    bn_effect: f64,
    /// Largest bound.
    max_bound: f64,
}

/// Where A and B were computed, for [`Case::bound`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arithmetic {
    /// `conv` and `reference::forward_inference`: f64, each result rounded once.
    Host,
    /// `conv::gpu` and `gpu::functional::forward` in eval: f32, each result rounded once.
    Device,
}

impl<T: Element> Case<T> {
    fn new(g: &ConvLayer, conv_bias: bool, affine: bool, layout: Layout, seed: u64) -> Self {
        let spec = FoldSpec::new(g.kind, g.weight, g.groups, layout).unwrap();
        let c_out = spec.c_out();
        let numel = |dims: &[usize]| dims.iter().product::<usize>();
        // The same logical weight for both layouts: the seed does not depend on the layout.
        let weight: Vec<T> = random(seed, numel(g.weight), 0.0, 0.5);
        let weight = match layout {
            Layout::ChannelsFirst => weight,
            Layout::ChannelsLast => to_channels_last(&weight, g.weight),
        };
        let x: Vec<T> = random(seed + 1, numel(g.x), 0.0, 1.0);
        let conv_bias = conv_bias.then(|| random(seed + 2, c_out, 0.0, 0.5));
        // Running statistics over two orders of magnitude of variance (scales up to ~10), signed
        // scales, shifts of the size of the layer's outputs.
        let running_mean = random_f32(seed + 3, c_out, -1.0, 1.0);
        let running_var: Vec<f32> = random_f32(seed + 4, c_out, 0.01f32.ln(), 4.0f32.ln())
            .into_iter()
            .map(f32::exp)
            .collect();
        let bn_weight = affine.then(|| random_f32(seed + 5, c_out, -2.0, 2.0));
        let bn_bias = affine.then(|| random_f32(seed + 6, c_out, -1.0, 1.0));
        let eps = [1e-5, 1e-3, 0.1][(seed % 3) as usize];

        let params = g.params();
        let conv_out = conv::apply(&x, g.x, &spec, &weight, conv_bias.as_deref(), &params)
            .unwrap_or_else(|e| panic!("{}: reference conv: {e}", g.name));
        let mut expect = vec![T::default(); conv_out.values.len()];
        let running = RunningStats {
            mean: &running_mean,
            var: &running_var,
        };
        reference::forward_inference(
            &conv_out.values,
            &conv_out.desc().unwrap(),
            bn_weight.as_deref(),
            bn_bias.as_deref(),
            running,
            eps,
            &mut expect,
        )
        .unwrap();
        let label = format!(
            "{} {} {} {} {} eps {eps:e}",
            g.name,
            T::DTYPE,
            if conv_bias.is_some() {
                "bias"
            } else {
                "no-bias"
            },
            if affine { "affine" } else { "no-affine" },
            layout
        );
        Self {
            label,
            spec,
            params,
            x,
            x_dims: g.x.to_vec(),
            weight,
            conv_bias,
            bn_weight,
            bn_bias,
            running_mean,
            running_var,
            eps,
            conv_out,
            expect,
        }
    }

    fn bn(&self) -> FoldBatchNorm<'_> {
        FoldBatchNorm {
            running_mean: &self.running_mean,
            running_var: &self.running_var,
            weight: self.bn_weight.as_deref(),
            bias: self.bn_bias.as_deref(),
            eps: self.eps,
        }
    }

    fn config(&self) -> BatchNormConfig {
        BatchNormConfig::new(self.spec.c_out())
            .eps(self.eps)
            .affine(self.bn_weight.is_some())
    }

    /// The CPU layer holding this case's batch norm, in eval mode.
    fn cpu_layer(&self) -> reference::BatchNorm {
        let mut bn = reference::BatchNorm::new(self.config()).unwrap();
        if let (Some(w), Some(b)) = (&self.bn_weight, &self.bn_bias) {
            bn.set_weight(w).unwrap();
            bn.set_bias(b).unwrap();
        }
        bn.set_running_mean(&self.running_mean).unwrap();
        bn.set_running_var(&self.running_var).unwrap();
        bn.eval();
        bn
    }

    /// `s[o] = bn_weight[o] / sqrt(running_var[o] + eps)` in f64.
    fn scale(&self) -> Vec<f64> {
        (0..self.spec.c_out())
            .map(|o| {
                let w = self.bn_weight.as_ref().map_or(1.0, |w| f64::from(w[o]));
                w / (f64::from(self.running_var[o]) + f64::from(self.eps)).sqrt()
            })
            .collect()
    }

    /// The layer on `x` with other weights and bias, in f32 (for the bounds below; f16 and bf16
    /// values and their ulps widen to f32 exactly).
    fn conv_f32(&self, x: &[f32], weight: &[f32], bias: &[f32]) -> Vec<f32> {
        conv::apply(
            x,
            &self.x_dims,
            &self.spec,
            weight,
            Some(bias),
            &self.params,
        )
        .unwrap()
        .values
    }

    /// The bound on `|A - B|` for each output element, with `weight_ulps` the rounding of the
    /// folded weight and bias in units in the last place of `T` (1/2 for one rounding to
    /// nearest of the exact product), `a` the values of A and `before` the layer output A was
    /// normalized from, and `arithmetic` where A and B were computed.
    ///
    /// With `E = s (layer(x) - mean) + beta` the exact result and `u` the rounding of `T`:
    /// - B is `sum W'x + b'` in f64 rounded once, and each `W'`, `b'` is within
    ///   `weight_ulps * ulp(W')` of `W s`, `(b - mean) s + beta`: so
    ///   `|B - E| <= sum_k weight_ulps ulp(W'_k) |x_k| + weight_ulps ulp(b') + ulp(B) / 2`
    ///   (the layer's sensitivity to one rounding of each weight, computed exactly by the layer
    ///   itself on `|x|` with the weights `weight_ulps * ulp(W')`: about `u` times the
    ///   accumulated magnitude `sum |W' x| + |b'|`, a few ulps of it in f32, 2^-11 of it in f16);
    /// - A rounds the layer's output before the batch norm and the batch norm's output:
    ///   `|A - E| <= |s| ulp(layer(x)) / 2 + ulp(A) / 2`;
    /// - f64 arithmetic (sums of at most a few hundred terms, the scale) adds below
    ///   `2^-40 (sum |W' x| + |b'| + |A|)`, and the f32 bound conv 2^-20 of itself.
    ///
    /// On the device ([`Arithmetic::Device`]: `conv::gpu`, `gpu::functional::forward` in eval)
    /// three more terms, with `u = 2^-24` and `n` the products per output:
    /// - both convolutions accumulate in f32 (`n` fmaf and the bias: `n + 1` roundings, every
    ///   partial sum at most the accumulated magnitude): `gamma(n + 1) sum |W' x| + |b'|` for B,
    ///   and `|s| gamma(n + 1) (sum |W x| + |b|)` for A's layer output, which the batch norm
    ///   scales by `s`; `gamma(k) = k u / (1 - k u)`;
    /// - the f32 batch norm `(C - mean) * (weight * invstd) + bias`, `invstd` the IEEE
    ///   `1 / sqrt(var + eps)`: `var + eps`, the square root, the reciprocal and the product with
    ///   `weight` give `scale` within `3.5u` relative, then the difference, the product and the
    ///   sum (fused or not) add at most `3u` relative to `|s (C - mean)| + |beta|`: below
    ///   `2^-21 (|s| |C - mean| + |beta|)` (`8u`) with what the first order leaves out;
    /// - the f64 slack also covers `|s| (sum |W x| + |b|)`.
    #[allow(clippy::too_many_arguments)]
    fn bound(
        &self,
        folded: &Folded<T>,
        a: &[T],
        before: &[T],
        got: &[T],
        weight_ulps: f64,
        arithmetic: Arithmetic,
    ) -> Vec<f64> {
        let dtype = T::DTYPE;
        let f32s = |v: &[T], f: &dyn Fn(f64) -> f64| -> Vec<f32> {
            v.iter().map(|v| f(v.to_f64()) as f32).collect()
        };
        let rounding = |v: f64| weight_ulps * ulp(dtype, v);
        let x_abs = f32s(&self.x, &f64::abs);
        let sensitivity = self.conv_f32(
            &x_abs,
            &f32s(&folded.weight, &rounding),
            &f32s(&folded.bias, &rounding),
        );
        let magnitude = self.conv_f32(
            &x_abs,
            &f32s(&folded.weight, &f64::abs),
            &f32s(&folded.bias, &f64::abs),
        );
        let scale = self.scale();
        let (c_out, spatial) = (
            self.spec.c_out(),
            self.conv_out.dims[2..].iter().product::<usize>(),
        );
        // Device only: the original layer's accumulated magnitude, and gamma(n + 1).
        let (original, gamma) = match arithmetic {
            Arithmetic::Host => (vec![0.0; got.len()], 0.0),
            Arithmetic::Device => (self.magnitude(), gamma(terms(&self.spec) + 1)),
        };
        (0..got.len())
            .map(|i| {
                let o = (i / spatial) % c_out;
                let (a, b) = (a[i].to_f64(), got[i].to_f64());
                let (before, s) = (before[i].to_f64(), scale[o].abs());
                let host = f64::from(sensitivity[i]) * (1.0 + 2f64.powi(-20))
                    + s * ulp(dtype, before) / 2.0
                    + ulp(dtype, a.abs().max(b.abs()))
                    + 2f64.powi(-40) * (f64::from(magnitude[i]) + a.abs());
                let device = match arithmetic {
                    Arithmetic::Host => 0.0,
                    Arithmetic::Device => {
                        let (m, m0) = (f64::from(magnitude[i]), f64::from(original[i]));
                        let mean = f64::from(self.running_mean[o]);
                        let beta = self.bn_bias.as_ref().map_or(0.0, |b| f64::from(b[o]));
                        gamma * (m + s * m0) * (1.0 + 2f64.powi(-20))
                            + 2f64.powi(-21) * (s * (before - mean).abs() + beta.abs())
                            + 2f64.powi(-40) * s * m0
                    }
                };
                host + device
            })
            .collect()
    }

    /// `sum |W x| + |b|` of the original layer, per output (f32 from f64).
    fn magnitude(&self) -> Vec<f32> {
        let abs = |v: &[T]| -> Vec<f32> { v.iter().map(|v| v.to_f64().abs() as f32).collect() };
        let bias = self
            .conv_bias
            .as_deref()
            .map_or_else(|| vec![0.0; self.spec.c_out()], abs);
        self.conv_f32(&abs(&self.x), &abs(&self.weight), &bias)
    }

    /// B: the layer with `folded`'s weight and bias on the same input, compared with A.
    fn check(&self, folded: &Folded<T>, weight_ulps: f64) -> Result<Outcome, String> {
        let got = conv::apply(
            &self.x,
            &self.x_dims,
            &self.spec,
            &folded.weight,
            Some(&folded.bias),
            &self.params,
        )
        .map_err(|e| format!("folded conv: {e}"))?
        .values;
        let bound = self.bound(
            folded,
            &self.expect,
            &self.conv_out.values,
            &got,
            weight_ulps,
            Arithmetic::Host,
        );
        compare_ab(&self.expect, &self.conv_out.values, &got, &bound)
    }
}

/// `|A - B|` within `bound`, element by element, and a batch norm that moved `before` (the
/// layer output A was normalized from) by far more than the bound.
fn compare_ab<T: Element>(
    expect: &[T],
    before: &[T],
    got: &[T],
    bound: &[f64],
) -> Result<Outcome, String> {
    let mut outcome = Outcome {
        worst: 0.0,
        ratio: 0.0,
        bn_effect: 0.0,
        max_bound: 0.0,
    };
    let mut bad = Vec::new();
    for (i, ((a, b), bound)) in expect.iter().zip(got).zip(bound).enumerate() {
        let (a, b) = (a.to_f64(), b.to_f64());
        let err = (a - b).abs();
        // A NaN error is outside the bound too.
        if err.is_nan() || err > *bound {
            bad.push(format!(
                "[{i}] A {a:e} B {b:e} |A-B| {err:.3e} > {bound:.3e}"
            ));
        }
        outcome.worst = outcome.worst.max(err);
        outcome.ratio = outcome.ratio.max(err / bound);
        outcome.max_bound = outcome.max_bound.max(*bound);
        let before = before[i].to_f64();
        outcome.bn_effect = outcome.bn_effect.max((a - before).abs());
    }
    if !bad.is_empty() {
        return Err(format!(
            "{} of {} outside the bound: {}",
            bad.len(),
            got.len(),
            bad[..bad.len().min(4)].join("; ")
        ));
    }
    // Not vacuous: the batch norm moved the output by an order of magnitude more than the
    // tolerance, so a fold that left the layer as it was would fail. (The device bound of bf16,
    // f32 accumulation of bf16 products, leaves the bf16 cases at ~18x: 20x was too strict.)
    if outcome.bn_effect < 10.0 * outcome.max_bound {
        return Err(format!(
            "the batch norm changed the output by only {:.3e} (bound {:.3e})",
            outcome.bn_effect, outcome.max_bound
        ));
    }
    Ok(outcome)
}

fn line(label: &str, outcome: &Outcome) -> String {
    format!(
        "ok   {label}: worst |A-B| {:.2e} ({:.2} of bound), max bound {:.2e}, BN moved by {:.2e}",
        outcome.worst, outcome.ratio, outcome.max_bound, outcome.bn_effect
    )
}

/// Most products per output a layer of these checks may have. The bound of a longer sum in bf16
/// on the device (`gamma(n + 1) sum |W x|` plus bf16 rounding) is too wide for a batch norm to
/// move the output 10x past it, so the check could not tell a fold from none: the 256- to
/// 576-product layers of [`LAYERS`] run in tests/gpu_conv.rs only, which checks the convolution.
const MAX_TERMS: usize = 200;

/// The layers of [`LAYERS`] these checks run.
fn fold_layers() -> impl Iterator<Item = &'static ConvLayer> {
    LAYERS.iter().filter(|l| {
        terms(&FoldSpec::new(l.kind, l.weight, l.groups, Layout::ChannelsFirst).unwrap())
            <= MAX_TERMS
    })
}

/// Runs `check` on every layer of [`fold_layers`], conv bias, affine and layout, for the dtype
/// `T`, printing one line per case and collecting failures.
fn for_each_case<T: Element>(
    lines: &mut Vec<String>,
    failures: &mut Vec<String>,
    check: impl Fn(&Case<T>) -> Result<String, String>,
) {
    let dtype_seed = match T::DTYPE {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    };
    for (gi, g) in fold_layers().enumerate() {
        for conv_bias in [true, false] {
            for affine in [true, false] {
                let seed = 1000 * gi as u64
                    + 100 * dtype_seed
                    + 10 * u64::from(conv_bias)
                    + 20 * u64::from(affine);
                let mut first_expect: Option<Vec<T>> = None;
                for layout in LAYOUTS {
                    let case = Case::<T>::new(g, conv_bias, affine, layout, seed);
                    // The same logical layer in either weight layout: the same A, bit for bit
                    // (the reference sums in logical order).
                    match &first_expect {
                        None => first_expect = Some(case.expect.clone()),
                        Some(first) if *first != case.expect => failures.push(format!(
                            "{}: A differs from the channels-first weight's",
                            case.label
                        )),
                        Some(_) => {}
                    }
                    let outcome =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&case)))
                            .unwrap_or_else(|_| Err("panicked".into()));
                    match outcome {
                        Ok(text) => lines.push(text),
                        Err(msg) => {
                            lines.push(format!("FAIL {}: {msg}", case.label));
                            failures.push(format!("{}: {msg}", case.label));
                        }
                    }
                }
            }
        }
    }
}

fn run_all_dtypes(what: &str, mut each: impl FnMut(&mut Vec<String>, &mut Vec<String>, DType)) {
    let (mut lines, mut failures) = (Vec::new(), Vec::new());
    for dtype in DType::ALL {
        each(&mut lines, &mut failures, dtype);
    }
    println!(
        "{}\n{what}: {} cases, {} failures",
        lines.join("\n"),
        lines.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{what}: {} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The CPU fold, functional and through the layer, end to end.
fn cpu_case<T: Element>(case: &Case<T>) -> Result<String, String> {
    let folded = reference::fold(
        &case.spec,
        &case.weight,
        case.conv_bias.as_deref(),
        &case.bn(),
    )
    .map_err(|e| format!("fold: {e}"))?;
    let by_layer = case
        .cpu_layer()
        .fold_into(&case.spec, &case.weight, case.conv_bias.as_deref())
        .map_err(|e| format!("fold_into: {e}"))?;
    if by_layer != folded {
        return Err("BatchNorm::fold_into differs from reference::fold".into());
    }
    // One rounding to nearest of each folded weight and bias: half an ulp.
    case.check(&folded, 0.5).map(|o| line(&case.label, &o))
}

#[test]
fn cpu_fold_equals_batch_norm_after_the_layer() {
    run_all_dtypes(
        "cpu fold end to end",
        |lines, failures, dtype| match dtype {
            DType::F32 => for_each_case::<f32>(lines, failures, cpu_case),
            DType::F16 => for_each_case::<half::f16>(lines, failures, cpu_case),
            DType::BF16 => for_each_case::<half::bf16>(lines, failures, cpu_case),
        },
    );
}

/// The classic wrong fold of a grouped transposed convolution: column `a1` of
/// `[C_in, C_out/G, k...]` scaled by `s[a1]`, as if every group held channels `0..C_out/G`.
fn fold_ignoring_groups<T: Element>(case: &Case<T>) -> Folded<T> {
    let mut folded = reference::fold(
        &case.spec,
        &case.weight,
        case.conv_bias.as_deref(),
        &case.bn(),
    )
    .unwrap();
    let (scale, map) = (case.scale(), case.spec.map());
    for (i, w) in folded.weight.iter_mut().enumerate() {
        let column = (i / map.inner_stride) % map.c_out_per_group;
        *w = T::from_f64(case.weight[i].to_f64() * scale[column]);
    }
    folded
}

/// The check has the power to catch the classic wrong fold of a grouped transposed convolution:
/// scaling column `a1` of `[C_in, C_out/G, k...]` by `s[a1]`, as if every group held channels
/// `0..C_out/G`. It must fail the bound in every dtype.
#[test]
fn a_fold_that_ignores_the_groups_fails_the_check() {
    fn wrong<T: Element>(g: &ConvLayer) -> Result<Outcome, String> {
        let case = Case::<T>::new(g, true, true, Layout::ChannelsFirst, 77);
        case.check(&fold_ignoring_groups(&case), 0.5)
    }
    let mut checked = 0;
    for g in fold_layers().filter(|g| g.kind == ConvTranspose && g.groups > 1) {
        for (dtype, outcome) in [
            (DType::F32, wrong::<f32>(g)),
            (DType::F16, wrong::<half::f16>(g)),
            (DType::BF16, wrong::<half::bf16>(g)),
        ] {
            match outcome {
                Ok(o) => panic!(
                    "{} {dtype}: a wrong fold passed (worst {:.2e})",
                    g.name, o.worst
                ),
                Err(msg) => println!("rejected as it should be: {} {dtype}: {msg}", g.name),
            }
            checked += 1;
        }
    }
    assert_eq!(
        checked, 12,
        "four grouped transposed geometries, three dtypes"
    );
}

/// A fold freezes the running statistics: a training-mode layer and a layer without running
/// statistics refuse it (training mode is checked first), on the CPU layer.
#[test]
fn cpu_layer_refuses_training_mode_and_missing_running_stats() {
    let spec = FoldSpec::new(Conv, &[4, 2, 3], 1, Layout::ChannelsFirst).unwrap();
    let weight = vec![0.5f32; spec.numel()];
    let training = reference::BatchNorm::new(BatchNormConfig::new(4)).unwrap();
    assert!(training.is_training());
    assert!(matches!(
        training.fold_into(&spec, &weight, None),
        Err(Error::TrainingMode { what: "fold" })
    ));
    let config = BatchNormConfig::new(4).track_running_stats(false);
    let mut untracked = reference::BatchNorm::new(config).unwrap();
    assert!(matches!(
        untracked.fold_into(&spec, &weight, None),
        Err(Error::TrainingMode { .. })
    ));
    untracked.eval();
    assert!(matches!(
        untracked.fold_into(&spec, &weight, None),
        Err(Error::NoRunningStats { what: "fold" })
    ));
    // And the same layer tracking its statistics folds once in eval mode.
    let mut tracked = reference::BatchNorm::new(BatchNormConfig::new(4)).unwrap();
    tracked.eval();
    let folded = tracked.fold_into(&spec, &weight, None).unwrap();
    // Fresh statistics (mean 0, var 1), weight 1, bias 0: W' = W / sqrt(1 + 1e-5), b' = 0.
    let want = 0.5 / (1.0 + f64::from(1e-5f32)).sqrt();
    assert!(
        folded.weight.iter().all(|&w| w == want as f32),
        "{:?}",
        folded.weight
    );
    assert_eq!(folded.bias, [0.0; 4]);
}

/// GPU checks: the fold, the convolutions and the batch norm on the device.
mod gpu_checks {
    use super::*;
    use batchnorm_cuda::gpu::{self, functional, GpuContext};
    use common::gpu::{download, gpu, upload, zeros};
    use common::{compare, widen, Tol};
    use cudarc::driver::CudaSlice;

    /// The layer of `case` on the device with the given weight and bias: `conv::gpu`.
    fn conv_gpu<T: Element>(
        gpu: &GpuContext,
        case: &Case<T>,
        x: &CudaSlice<T>,
        weight: &CudaSlice<T>,
        bias: Option<&CudaSlice<T>>,
    ) -> Result<CudaSlice<T>, String> {
        let mut y = zeros::<T>(gpu, case.conv_out.values.len());
        conv::gpu::apply(
            gpu,
            conv::gpu::Input {
                values: x.as_view(),
                dims: &case.x_dims,
            },
            &case.spec,
            &weight.as_view(),
            bias.map(|b| b.as_view()).as_ref(),
            &case.params,
            &mut y.as_view_mut(),
        )
        .map_err(|e| format!("gpu conv: {e}"))?;
        Ok(y)
    }

    /// The whole check on the device: C = conv(x; W, b) and A = BN(C) (eval, running
    /// statistics) against B = conv(x; W', b') with the folded weight and bias already on the
    /// device (`folded` is their host copy, for the bound), under [`Case::bound`] for device
    /// arithmetic; and C against the reference layer's output.
    fn device_check<T: Element>(
        gpu: &GpuContext,
        case: &Case<T>,
        d_folded_weight: &CudaSlice<T>,
        d_folded_bias: &CudaSlice<T>,
        folded: &Folded<T>,
        weight_ulps: f64,
    ) -> Result<Outcome, String> {
        let d_x = upload(gpu, &case.x);
        let d_weight = upload(gpu, &case.weight);
        let d_conv_bias = case.conv_bias.as_ref().map(|b| upload(gpu, b));
        let d_c = conv_gpu(gpu, case, &d_x, &d_weight, d_conv_bias.as_ref())?;
        let (d_mean, d_var) = (
            upload(gpu, &case.running_mean),
            upload(gpu, &case.running_var),
        );
        let d_bn_weight = case.bn_weight.as_ref().map(|w| upload(gpu, w));
        let d_bn_bias = case.bn_bias.as_ref().map(|b| upload(gpu, b));
        let mut d_a = zeros::<T>(gpu, case.conv_out.values.len());
        functional::forward(
            gpu,
            &mut gpu::Workspace::new(),
            functional::Forward {
                desc: case.conv_out.desc().map_err(|e| e.to_string())?,
                x: d_c.as_view(),
                weight: d_bn_weight
                    .as_ref()
                    .map(|w| w.as_view())
                    .as_ref()
                    .map(|v| v.slice(..)),
                bias: d_bn_bias
                    .as_ref()
                    .map(|b| b.as_view())
                    .as_ref()
                    .map(|v| v.slice(..)),
                stats: functional::ForwardStats::Running {
                    stats: functional::RunningStats {
                        mean: d_mean.as_view(),
                        var: d_var.as_view(),
                    },
                    eps: case.eps,
                },
                y: d_a.as_view_mut(),
                epilogue: functional::Epilogue::None,
            },
        )
        .map_err(|e| format!("gpu batch norm: {e}"))?;
        let d_b = conv_gpu(gpu, case, &d_x, d_folded_weight, Some(d_folded_bias))?;
        let (c, a, b) = (
            download(gpu, &d_c),
            download(gpu, &d_a),
            download(gpu, &d_b),
        );

        // The device layer against the reference layer (tests/gpu_conv.rs derives this bound):
        // f32 accumulation, each side rounded once to T.
        let magnitude = case.magnitude();
        let gamma = gamma(terms(&case.spec) + 1);
        for (i, (got, want)) in c.iter().zip(&case.conv_out.values).enumerate() {
            let (got, want) = (got.to_f64(), want.to_f64());
            let m = f64::from(magnitude[i]) * (1.0 + 2f64.powi(-20));
            let bound = gamma * m + 2f64.powi(-40) * m + ulp(T::DTYPE, got.abs().max(want.abs()));
            let err = (got - want).abs();
            if err.is_nan() || err > bound {
                return Err(format!(
                    "gpu conv [{i}] {got:e} vs reference {want:e}: |err| {err:.3e} > {bound:.3e}"
                ));
            }
        }
        let bound = case.bound(folded, &a, &c, &b, weight_ulps, Arithmetic::Device);
        compare_ab(&a, &c, &b, &bound)
    }

    /// The GPU fold of one case, through `functional::fold` and `BatchNorm::fold_into`.
    fn gpu_case<T: Element>(gpu: &GpuContext, case: &Case<T>) -> Result<String, String> {
        let cpu = reference::fold(
            &case.spec,
            &case.weight,
            case.conv_bias.as_deref(),
            &case.bn(),
        )
        .map_err(|e| format!("cpu fold: {e}"))?;
        let c_out = case.spec.c_out();
        let d_weight = upload(gpu, &case.weight);
        let d_conv_bias = case.conv_bias.as_ref().map(|b| upload(gpu, b));
        let conv_bias = d_conv_bias.as_ref().map(|b| b.as_view());
        let (d_mean, d_var) = (
            upload(gpu, &case.running_mean),
            upload(gpu, &case.running_var),
        );
        let d_bn_weight = case.bn_weight.as_ref().map(|w| upload(gpu, w));
        let d_bn_bias = case.bn_bias.as_ref().map(|b| upload(gpu, b));
        let bn = functional::FoldBatchNorm {
            running_mean: d_mean.as_view(),
            running_var: d_var.as_view(),
            weight: d_bn_weight.as_ref().map(|w| w.as_view()),
            bias: d_bn_bias.as_ref().map(|b| b.as_view()),
            eps: case.eps,
        };
        let (mut out_weight, mut out_bias) =
            (zeros::<T>(gpu, case.weight.len()), zeros::<T>(gpu, c_out));
        functional::fold(
            gpu,
            &case.spec,
            Some(&d_weight.as_view()),
            &mut out_weight.as_view_mut(),
            conv_bias.as_ref(),
            &mut out_bias.as_view_mut(),
            &bn,
        )
        .map_err(|e| format!("gpu fold: {e}"))?;
        let folded = Folded {
            weight: download(gpu, &out_weight),
            bias: download(gpu, &out_bias),
        };

        let mut layer = gpu::BatchNorm::new(gpu, case.config()).map_err(|e| e.to_string())?;
        if let (Some(w), Some(b)) = (&case.bn_weight, &case.bn_bias) {
            layer.set_weight(w).map_err(|e| e.to_string())?;
            layer.set_bias(b).map_err(|e| e.to_string())?;
        }
        layer
            .set_running_stats(&case.running_mean, &case.running_var)
            .map_err(|e| e.to_string())?;
        layer.eval();
        let (mut layer_weight, mut layer_bias) =
            (zeros::<T>(gpu, case.weight.len()), zeros::<T>(gpu, c_out));
        layer
            .fold_into(
                &case.spec,
                Some(&d_weight.as_view()),
                &mut layer_weight.as_view_mut(),
                conv_bias.as_ref(),
                &mut layer_bias.as_view_mut(),
            )
            .map_err(|e| format!("gpu fold_into: {e}"))?;
        if download(gpu, &layer_weight) != folded.weight
            || download(gpu, &layer_bias) != folded.bias
        {
            return Err("gpu BatchNorm::fold_into differs from gpu::functional::fold".into());
        }

        // The GPU computes in f64 and rounds once, like the CPU: within one rounding of T.
        let one = Tol::OneRounding(T::DTYPE);
        let w = compare(&widen(&folded.weight), &widen(&cpu.weight), one)
            .map_err(|m| format!("weight vs cpu: {m}"))?;
        let b = compare(&widen(&folded.bias), &widen(&cpu.bias), one)
            .map_err(|m| format!("bias vs cpu: {m}"))?;
        // Within one ulp of the CPU fold, itself within half an ulp of the exact value: 1.5 ulp
        // of the CPU value, at most 3 ulp of the GPU value (at worst one binade below it).
        // The GPU-folded weight and bias as the fold wrote them, on the device.
        let outcome = device_check(gpu, case, &out_weight, &out_bias, &folded, 3.0)?;
        Ok(format!(
            "{} (vs cpu fold: weight {:.2e}, bias {:.2e})",
            line(&case.label, &outcome),
            w.worst,
            b.worst
        ))
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn gpu_fold_equals_batch_norm_after_the_layer() {
        let gpu = gpu();
        run_all_dtypes(
            "gpu fold end to end",
            |lines, failures, dtype| match dtype {
                DType::F32 => for_each_case::<f32>(lines, failures, |c| gpu_case(&gpu, c)),
                DType::F16 => for_each_case::<half::f16>(lines, failures, |c| gpu_case(&gpu, c)),
                DType::BF16 => for_each_case::<half::bf16>(lines, failures, |c| gpu_case(&gpu, c)),
            },
        );
    }

    /// The device check has the power of the host one: the wrong fold of a grouped transposed
    /// convolution fails it in every dtype.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn gpu_check_rejects_a_fold_that_ignores_the_groups() {
        fn wrong<T: Element>(gpu: &GpuContext, g: &ConvLayer) -> Result<Outcome, String> {
            let case = Case::<T>::new(g, true, true, Layout::ChannelsFirst, 77);
            let folded = fold_ignoring_groups(&case);
            let (weight, bias) = (upload(gpu, &folded.weight), upload(gpu, &folded.bias));
            device_check(gpu, &case, &weight, &bias, &folded, 0.5)
        }
        let gpu = gpu();
        let mut checked = 0;
        for g in fold_layers().filter(|g| g.kind == ConvTranspose && g.groups > 1) {
            for (dtype, outcome) in [
                (DType::F32, wrong::<f32>(&gpu, g)),
                (DType::F16, wrong::<half::f16>(&gpu, g)),
                (DType::BF16, wrong::<half::bf16>(&gpu, g)),
            ] {
                match outcome {
                    Ok(o) => panic!(
                        "{} {dtype}: a wrong fold passed on the device (worst {:.2e})",
                        g.name, o.worst
                    ),
                    Err(msg) => println!("rejected as it should be: {} {dtype}: {msg}", g.name),
                }
                checked += 1;
            }
        }
        assert_eq!(
            checked, 12,
            "four grouped transposed geometries, three dtypes"
        );
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn gpu_layer_refuses_training_mode_and_missing_running_stats() {
        let gpu = gpu();
        let spec = FoldSpec::new(Conv, &[4, 2, 3], 1, Layout::ChannelsFirst).unwrap();
        let weight = upload(&gpu, &vec![0.5f32; spec.numel()]);
        let (mut out, mut bias) = (zeros::<f32>(&gpu, spec.numel()), zeros::<f32>(&gpu, 4));
        let mut fold = |layer: &gpu::BatchNorm| {
            layer.fold_into(
                &spec,
                Some(&weight.as_view()),
                &mut out.as_view_mut(),
                None,
                &mut bias.as_view_mut(),
            )
        };
        let training = gpu::BatchNorm::new(&gpu, BatchNormConfig::new(4)).unwrap();
        assert!(matches!(
            fold(&training),
            Err(Error::TrainingMode { what: "fold" })
        ));
        let config = BatchNormConfig::new(4).track_running_stats(false);
        let mut untracked = gpu::BatchNorm::new(&gpu, config).unwrap();
        assert!(matches!(fold(&untracked), Err(Error::TrainingMode { .. })));
        untracked.eval();
        assert!(matches!(
            fold(&untracked),
            Err(Error::NoRunningStats { what: "fold" })
        ));
        let mut tracked = gpu::BatchNorm::new(&gpu, BatchNormConfig::new(4)).unwrap();
        tracked.eval();
        fold(&tracked).unwrap();
        // Fresh statistics: W' = W / sqrt(1 + 1e-5) within one rounding, b' = 0.
        let want = vec![0.5 / (1.0 + f64::from(1e-5f32)).sqrt(); spec.numel()];
        let got = widen(&download(&gpu, &out));
        compare(&got, &want, Tol::OneRounding(DType::F32)).unwrap();
        assert_eq!(download(&gpu, &bias), [0.0; 4]);
    }
}
