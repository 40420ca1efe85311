//! `conv::gpu` (the direct convolution of `kernels/conv_direct.cu`, a test tool) against
//! `conv`, element by element: conv 1-D, 2-D and 3-D, grouped, depthwise, 1x1,
//! strided, padded, dilated, transposed (with groups, output padding, dilation above the stride),
//! linear; channels-first and channels-last weights, with and without bias; f32, f16 and bf16.
//! Every test needs a CUDA device: run with `--include-ignored` on a GPU machine
//! (`scripts/gpu-run.sh`).
//!
//! The bound ([`bound`]) is the rounding analysis of the two computations, not a fudge factor:
//! the reference sums the exact products in f64 and rounds once to `T`; the kernel accumulates
//! the same `n` products with `n` fmaf and adds the bias (`n + 1` f32 roundings), then rounds
//! once to `T`. With `M = sum |w x| + |b|` (every partial sum is at most `M`):
//!
//! - `|S_f32 - S| <= gamma(n + 1) M`, `gamma(k) = k u / (1 - k u)`, `u = 2^-24` (recursive
//!   summation, Higham, Accuracy and Stability of Numerical Algorithms, 4.2);
//! - `|S_f64 - S| <= gamma_f64(n) M < 2^-40 M` for the few hundred terms here;
//! - each output's rounding to `T` is at most half an ulp of it, both together one ulp of the
//!   larger.
//!
//! So `|gpu - reference| <= gamma(n + 1) M + 2^-40 M + ulp_T(max(|gpu|, |reference|))`. In f32
//! that is a few hundred ulps of `M` at worst (typical errors are far below: the rounding errors
//! of a sum are not all of one sign); in f16 and bf16 the output rounding dominates and the bound
//! is one ulp of `T` plus a sliver. An index error moves an output by about `|w x|`, thousands of
//! times the bound.

mod common;

use batchnorm_cuda::conv::{self, ConvParams};
use batchnorm_cuda::fold::{FoldKind, FoldSpec};
use batchnorm_cuda::gpu::GpuContext;
use batchnorm_cuda::{DType, Element, Error, Layout};
use common::conv::{conv_layer, gamma, terms, to_channels_last, ConvLayer, LAYERS};
use common::gpu::{download, gpu, random, upload, zeros};
use common::ulp;
use FoldKind::{Conv, ConvTranspose, Linear};

/// The bound on `|gpu - reference|` for one output (module docs): `terms` products and a bias,
/// `magnitude = sum |w x| + |b|` (computed in f32 from f64: the factor covers its rounding).
fn bound(dtype: DType, terms: usize, magnitude: f64, gpu: f64, reference: f64) -> f64 {
    let magnitude = magnitude * (1.0 + 2f64.powi(-20));
    gamma(terms + 1) * magnitude
        + 2f64.powi(-40) * magnitude
        + ulp(dtype, gpu.abs().max(reference.abs()))
}

/// The layer through its own entry point (`conv`, `conv_transpose`, `linear`), or `apply`.
#[allow(clippy::too_many_arguments)]
fn run_gpu<T: Element>(
    gpu: &GpuContext,
    via_apply: bool,
    x: &[T],
    x_dims: &[usize],
    spec: &FoldSpec,
    weight: &[T],
    bias: Option<&[T]>,
    params: &ConvParams,
) -> Result<Vec<T>, Error> {
    let dims = conv::gpu::output_dims(x_dims, spec, params)?;
    let (d_x, d_w) = (upload(gpu, x), upload(gpu, weight));
    let d_b = bias.map(|b| upload(gpu, b));
    // NaN-filled output: an element the kernel does not write fails the comparison.
    let nan = vec![T::from_f64(f64::NAN); dims.iter().product()];
    let mut d_y = upload(gpu, &nan);
    let (xv, wv) = (d_x.as_view(), d_w.as_view());
    let bv = d_b.as_ref().map(|b| b.as_view());
    let mut yv = d_y.as_view_mut();
    if via_apply {
        conv::gpu::apply(
            gpu,
            conv::gpu::Input {
                values: xv.slice(..),
                dims: x_dims,
            },
            spec,
            &wv,
            bv.as_ref(),
            params,
            &mut yv,
        )?;
    } else {
        match spec.kind() {
            Conv => conv::gpu::conv(
                gpu,
                conv::gpu::Input {
                    values: xv.slice(..),
                    dims: x_dims,
                },
                spec,
                &wv,
                bv.as_ref(),
                params,
                &mut yv,
            )?,
            ConvTranspose => conv::gpu::conv_transpose(
                gpu,
                conv::gpu::Input {
                    values: xv.slice(..),
                    dims: x_dims,
                },
                spec,
                &wv,
                bv.as_ref(),
                params,
                &mut yv,
            )?,
            Linear => conv::gpu::linear(
                gpu,
                conv::gpu::Input {
                    values: xv.slice(..),
                    dims: x_dims,
                },
                spec,
                &wv,
                bv.as_ref(),
                &mut yv,
            )?,
        }
    }
    Ok(download(gpu, &d_y))
}

/// Worst `|gpu - reference|` and worst fraction of the bound.
struct Outcome {
    worst: f64,
    ratio: f64,
}

/// One layer, weight layout and bias choice in dtype `T`: the GPU against the reference.
fn check<T: Element>(
    gpu: &GpuContext,
    l: &ConvLayer,
    layout: Layout,
    with_bias: bool,
    seed: u64,
) -> Result<Outcome, String> {
    let spec = FoldSpec::new(l.kind, l.weight, l.groups, layout).map_err(|e| e.to_string())?;
    let params = l.params();
    let numel = |dims: &[usize]| dims.iter().product::<usize>();
    let x: Vec<T> = random(seed, numel(l.x), 0.0, 1.0);
    let weight: Vec<T> = random(seed + 1, numel(l.weight), 0.0, 0.5);
    let weight = match layout {
        Layout::ChannelsFirst => weight,
        Layout::ChannelsLast => to_channels_last(&weight, l.weight),
    };
    let bias: Option<Vec<T>> = with_bias.then(|| random(seed + 2, spec.c_out(), 0.0, 0.5));

    let want = conv::apply(&x, l.x, &spec, &weight, bias.as_deref(), &params)
        .map_err(|e| format!("reference: {e}"))?;
    let abs = |v: &[T]| -> Vec<f32> { v.iter().map(|v| v.to_f64().abs() as f32).collect() };
    let magnitude = conv::apply(
        &abs(&x),
        l.x,
        &spec,
        &abs(&weight),
        bias.as_deref().map(abs).as_deref(),
        &params,
    )
    .map_err(|e| format!("reference |w x|: {e}"))?;
    let got = run_gpu(
        gpu,
        seed.is_multiple_of(2),
        &x,
        l.x,
        &spec,
        &weight,
        bias.as_deref(),
        &params,
    )
    .map_err(|e| format!("gpu: {e}"))?;
    if got.len() != want.values.len() {
        return Err(format!(
            "{} outputs, expected {}",
            got.len(),
            want.values.len()
        ));
    }

    let terms = terms(&spec);
    let mut outcome = Outcome {
        worst: 0.0,
        ratio: 0.0,
    };
    let mut bad = Vec::new();
    for (i, (g, r)) in got.iter().zip(&want.values).enumerate() {
        let (g, r) = (g.to_f64(), r.to_f64());
        let b = bound(T::DTYPE, terms, f64::from(magnitude.values[i]), g, r);
        let err = (g - r).abs();
        if err.is_nan() || err > b {
            bad.push(format!(
                "[{i}] gpu {g:e} reference {r:e} |err| {err:.3e} > {b:.3e}"
            ));
        }
        outcome.worst = outcome.worst.max(err);
        outcome.ratio = outcome.ratio.max(err / b);
    }
    if !bad.is_empty() {
        return Err(format!(
            "{} of {} outside the bound: {}",
            bad.len(),
            got.len(),
            bad[..bad.len().min(4)].join("; ")
        ));
    }
    // Not vacuous: outputs of the size of the bound's scale, not zeros.
    let largest = want
        .values
        .iter()
        .fold(0.0f64, |m, v| m.max(v.to_f64().abs()));
    if largest < 0.1 {
        return Err(format!("largest output {largest:e}: a vacuous case"));
    }
    Ok(outcome)
}

fn check_all<T: Element>(gpu: &GpuContext, lines: &mut Vec<String>, failures: &mut Vec<String>) {
    for (li, l) in LAYERS.iter().enumerate() {
        for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
            for with_bias in [true, false] {
                let seed = 100 * li as u64
                    + 10 * u64::from(with_bias)
                    + (layout == Layout::ChannelsLast) as u64;
                let label = format!(
                    "{} {} {layout} {}",
                    l.name,
                    T::DTYPE,
                    if with_bias { "bias" } else { "no-bias" }
                );
                match check::<T>(gpu, l, layout, with_bias, seed) {
                    Ok(o) => lines.push(format!(
                        "ok   {label}: worst {:.2e} ({:.3} of bound)",
                        o.worst, o.ratio
                    )),
                    Err(msg) => {
                        lines.push(format!("FAIL {label}: {msg}"));
                        failures.push(format!("{label}: {msg}"));
                    }
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_conv_equals_the_reference() {
    let gpu = gpu();
    let (mut lines, mut failures) = (Vec::new(), Vec::new());
    check_all::<f32>(&gpu, &mut lines, &mut failures);
    check_all::<half::f16>(&gpu, &mut lines, &mut failures);
    check_all::<half::bf16>(&gpu, &mut lines, &mut failures);
    println!(
        "{}\n{} cases, {} failures",
        lines.join("\n"),
        lines.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// More outputs than the launch has threads (the grid is capped at 8 blocks per SM), so every
/// thread walks several outputs: the kernel's incremental index (`advance`) is exercised.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_conv_grid_stride_covers_every_output() {
    let gpu = gpu();
    let l = conv_layer(
        "conv2d_grid_stride",
        Conv,
        &[6, 8, 97, 101],
        &[12, 4, 3, 3],
        2,
        [&[1, 1], &[1, 1], &[1, 1], &[0, 0]],
    );
    let outputs: usize = 6 * 12 * 97 * 101;
    let threads = gpu.sm_count() as usize * 8 * 256;
    assert!(
        outputs > 2 * threads,
        "{outputs} outputs, {threads} threads"
    );
    for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
        let o = check::<f32>(&gpu, &l, layout, true, 7).unwrap();
        println!(
            "{} f32 {layout}: worst {:.2e} ({:.3} of bound)",
            l.name, o.worst, o.ratio
        );
        let o = check::<half::f16>(&gpu, &l, layout, false, 8).unwrap();
        println!(
            "{} f16 {layout}: worst {:.2e} ({:.3} of bound)",
            l.name, o.worst, o.ratio
        );
    }
}

/// Refused calls leave `y` untouched; an empty batch launches nothing.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_conv_refuses_bad_calls_before_launching() {
    let gpu = gpu();
    let spec = FoldSpec::new(Conv, &[2, 3, 3], 1, Layout::ChannelsFirst).unwrap();
    let p = ConvParams::new(1);
    let (x, w) = (upload(&gpu, &[1.0f32; 15]), upload(&gpu, &[1.0f32; 18]));
    let sentinel = [7.0f32; 6];
    let mut y = upload(&gpu, &sentinel);
    let mut short = zeros::<f32>(&gpu, 5);
    let got = conv::gpu::conv(
        &gpu,
        conv::gpu::Input {
            values: x.as_view(),
            dims: &[1, 3, 5],
        },
        &spec,
        &w.as_view(),
        None,
        &p,
        &mut short.as_view_mut(),
    );
    assert!(
        matches!(
            got,
            Err(Error::BufferLength {
                what: "y",
                needed: 6,
                got: 5
            })
        ),
        "{got:?}"
    );
    let got = conv::gpu::conv(
        &gpu,
        conv::gpu::Input {
            values: x.as_view(),
            dims: &[1, 4, 5],
        },
        &spec,
        &w.as_view(),
        None,
        &p,
        &mut y.as_view_mut(),
    );
    assert!(
        matches!(
            got,
            Err(Error::ChannelMismatch {
                expected: 3,
                got: 4
            })
        ),
        "{got:?}"
    );
    let got = conv::gpu::conv_transpose(
        &gpu,
        conv::gpu::Input {
            values: x.as_view(),
            dims: &[1, 3, 5],
        },
        &spec,
        &w.as_view(),
        None,
        &p,
        &mut y.as_view_mut(),
    );
    assert!(matches!(got, Err(Error::InvalidConv { .. })), "{got:?}");
    // Stride 2^31: one output, but past the kernel's 32-bit positions.
    let huge = p.clone().stride(&[1 << 31]);
    let mut y2 = upload(&gpu, &sentinel[..2]);
    let got = conv::gpu::conv(
        &gpu,
        conv::gpu::Input {
            values: x.as_view(),
            dims: &[1, 3, 5],
        },
        &spec,
        &w.as_view(),
        None,
        &huge,
        &mut y2.as_view_mut(),
    );
    assert!(
        matches!(
            got,
            Err(Error::Unsupported {
                what: "conv::gpu",
                ..
            })
        ),
        "{got:?}"
    );
    assert_eq!(download(&gpu, &y), sentinel);
    assert_eq!(download(&gpu, &y2), sentinel[..2]);
    // An empty batch: valid, nothing launched.
    conv::gpu::conv(
        &gpu,
        conv::gpu::Input {
            values: x.slice(0..0),
            dims: &[0, 3, 5],
        },
        &spec,
        &w.as_view(),
        None,
        &p,
        &mut y.slice_mut(0..0),
    )
    .unwrap();
    assert_eq!(download(&gpu, &y), sentinel);
    gpu.synchronize().unwrap();
}
