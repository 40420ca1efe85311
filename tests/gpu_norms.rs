//! Group, layer, instance and RMS normalization on the GPU (`gpu::norms`): every golden case of
//! `../shared/golden/norms`, then both row plans, the fused forms, offset data and bad calls
//! against the CPU reference. Needs a CUDA device (or the emulated driver of
//! scripts/emulated-gpu.sh): run with `--include-ignored`; `-- --nocapture` prints each golden
//! case with its worst share of tolerance.

mod common;

use batchnorm_cuda::gpu::norms::{
    self, row_plan, Backward, DeviceNormStats, Forward, NormLayer, NormWorkspace, Norms, Residual,
    RowPlan, Statistics, StatsSource,
};
use batchnorm_cuda::gpu::GpuContext;
use batchnorm_cuda::norms::{
    InstanceNormConfig, LayerNormConfig, NormConfig, NormDesc, NormEpilogue, NormStats,
    RmsNormConfig,
};
use batchnorm_cuda::reference::norms as cpu;
use batchnorm_cuda::{DType, Element, Error, Layout, TensorDesc};
use common::gpu::{download, gpu, random, random_f32, upload, zeros};
use common::norms::{
    input_dims, layer_config, layer_state, offset_pair, Mode, NormCall, NormInputs,
};
use common::{
    assert_close, run_all, tolerance_for, widen, widen_f32, with_dtype, Case, Checks, Stored,
};
use cudarc::driver::CudaSlice;

/// Runs a test's `check::<T>(&norms, dtype)` in f32, f16 and bf16 on one context.
macro_rules! in_every_dtype {
    ($check:ident) => {{
        let norms = Norms::new(&gpu()).unwrap();
        $check::<f32>(&norms, DType::F32);
        $check::<half::f16>(&norms, DType::F16);
        $check::<half::bf16>(&norms, DType::BF16);
    }};
}

/// What one forward and backward on the device produced, in f64.
struct Outputs {
    y: Vec<f64>,
    sum: Option<Vec<f64>>,
    stats: NormStats,
    dx: Vec<f64>,
    dweight: Vec<f64>,
    dbias: Vec<f64>,
}

/// The inputs of one device run.
struct Run<'a, T> {
    x: &'a [T],
    residual: Option<&'a [T]>,
    dy: &'a [T],
    weight: Option<&'a [f32]>,
    bias: Option<&'a [f32]>,
    eps: f32,
    mode: Mode,
    running_mean: Option<&'a mut Vec<f32>>,
    running_var: Option<&'a mut Vec<f32>>,
    epilogue: NormEpilogue,
}

fn run<T: Element>(norms: &Norms, desc: &NormDesc, run: Run<'_, T>) -> Outputs {
    let ctx = norms.context();
    let n = desc.numel();
    let c = desc.channels();
    let mut ws = NormWorkspace::new();
    let x = upload(ctx, run.x);
    let residual = run.residual.map(|r| upload(ctx, r));
    let mut sum = zeros::<T>(ctx, n.max(1));
    let mut y = zeros::<T>(ctx, n.max(1));
    let weight = run.weight.map(|w| upload(ctx, w));
    let bias = run.bias.map(|b| upload(ctx, b));
    let mut stats = DeviceNormStats::new(ctx, desc.rows()).unwrap();
    let mut rm = run.running_mean.as_ref().map(|v| upload(ctx, v));
    let mut rv = run.running_var.as_ref().map(|v| upload(ctx, v));
    let statistics = match (run.mode, rm.as_mut(), rv.as_mut()) {
        (Mode::Batch, ..) => Statistics::Batch,
        (Mode::BatchUpdating { momentum }, Some(m), Some(v)) => Statistics::BatchUpdating {
            running_mean: m.as_view_mut(),
            running_var: v.as_view_mut(),
            momentum,
        },
        (Mode::Running, Some(m), Some(v)) => Statistics::Running {
            mean: m.as_view(),
            var: v.as_view(),
        },
        _ => panic!("tracked statistics without running_mean/var"),
    };
    let call = Forward {
        residual: residual.as_ref().map(|r| Residual {
            residual: r.as_view(),
            sum: sum.slice_mut(..n),
        }),
        weight: weight.as_ref().map(|w| w.as_view()),
        bias: bias.as_ref().map(|b| b.as_view()),
        statistics,
        epilogue: run.epilogue,
        ..Forward::new(x.as_view(), run.eps, y.slice_mut(..n), stats.as_mut())
    };
    norms::forward(norms, &mut ws, desc, call).unwrap_or_else(|e| panic!("forward: {e}"));
    if let (Some(m), Some(v)) = (rm.as_ref(), rv.as_ref()) {
        *run.running_mean.unwrap() = download(ctx, m);
        *run.running_var.unwrap() = download(ctx, v);
    }

    // The backward reads the normalized input: the sum of a fused residual add.
    let input = if residual.is_some() {
        sum.slice(..n)
    } else {
        x.as_view()
    };
    let dy = upload(ctx, run.dy);
    let mut dx = zeros::<T>(ctx, n.max(1));
    let (mut dweight, mut dbias) = (zeros::<f32>(ctx, c), zeros::<f32>(ctx, c));
    let call = Backward {
        x: input,
        dy: dy.as_view(),
        weight: weight.as_ref().map(|w| w.as_view()),
        bias: bias.as_ref().map(|b| b.as_view()),
        stats: stats.as_view(),
        source: match run.mode {
            Mode::Running => StatsSource::Running,
            _ => StatsSource::Batch,
        },
        epilogue: run.epilogue,
        dx: Some(dx.slice_mut(..n)),
        dweight: Some(dweight.as_view_mut()),
        dbias: Some(dbias.as_view_mut()),
        accumulate: false,
    };
    norms::backward(norms, &mut ws, desc, call).unwrap_or_else(|e| panic!("backward: {e}"));
    Outputs {
        y: widen(&download(ctx, &y)[..n]),
        sum: residual.is_some().then(|| widen(&download(ctx, &sum)[..n])),
        stats: stats.to_host(ctx).unwrap(),
        dx: widen(&download(ctx, &dx)[..n]),
        dweight: widen_f32(&download(ctx, &dweight)),
        dbias: widen_f32(&download(ctx, &dbias)),
    }
}

fn compare(checks: &mut Checks, case: &Case, name: &str, got: Option<Vec<f64>>) {
    checks.compare(case, name, got, tolerance_for(name, case.dtype()));
}

fn golden<T: Element + Stored>(norms: &Norms, case: &Case, checks: &mut Checks) {
    let NormCall { desc, eps, mode } = NormCall::of(case);
    let NormInputs {
        x,
        dy,
        weight,
        bias,
        mut running_mean,
        mut running_var,
    } = NormInputs::<T>::of(case);
    let dy = dy.unwrap_or_else(|| panic!("{}: every norm case has dy", case.name));
    let out = run(
        norms,
        &desc,
        Run {
            x: &x,
            residual: None,
            dy: &dy,
            weight: weight.as_deref(),
            bias: bias.as_deref(),
            eps,
            mode,
            running_mean: running_mean.as_mut(),
            running_var: running_var.as_mut(),
            epilogue: NormEpilogue::None,
        },
    );
    compare(checks, case, "y", Some(out.y));
    if mode != Mode::Running {
        if desc.kind().centered() {
            compare(checks, case, "save_mean", Some(widen_f32(&out.stats.mean)));
        }
        compare(checks, case, "save_rstd", Some(widen_f32(&out.stats.rstd)));
    }
    compare(
        checks,
        case,
        "running_mean",
        running_mean.as_deref().map(widen_f32),
    );
    compare(
        checks,
        case,
        "running_var",
        running_var.as_deref().map(widen_f32),
    );
    compare(checks, case, "dx", Some(out.dx));
    compare(
        checks,
        case,
        "dweight",
        weight.is_some().then_some(out.dweight),
    );
    compare(checks, case, "dbias", bias.is_some().then_some(out.dbias));
}

#[test]
#[ignore = "needs a CUDA device"]
fn golden_norms_gpu() {
    let norms = Norms::new(&gpu()).unwrap();
    run_all(&common::norm_cases(), "norms gpu", |case, checks| {
        with_dtype!(case.dtype(), golden(&norms, case, checks))
    });
}

/// The GPU layer, built from the case's configuration and state: one forward, one backward.
fn golden_layer<T: Element + Stored>(norms: &Norms, case: &Case, checks: &mut Checks) {
    let ctx = norms.context();
    let inputs = NormInputs::<T>::of(case);
    let mut layer = NormLayer::new(norms, layer_config(case)).unwrap();
    layer.load_state(layer_state(&inputs)).unwrap();
    if case.meta("training") == Some("false") {
        layer.eval();
    }
    let (dims, layout) = input_dims(case);
    let n = inputs.x.len();
    let x = upload(ctx, &inputs.x);
    let mut y = zeros::<T>(ctx, n);
    let cache = layer
        .forward(&x.as_view(), &dims, layout, &mut y.as_view_mut())
        .unwrap_or_else(|e| panic!("forward: {e}"));
    compare(checks, case, "y", Some(widen(&download(ctx, &y))));
    if layer.is_training() || case.meta("track_running_stats") != Some("true") {
        let stats = layer.saved_stats(&cache).unwrap();
        if !matches!(layer.config(), NormConfig::Rms(_)) {
            compare(checks, case, "save_mean", Some(widen_f32(&stats.mean)));
        }
        compare(checks, case, "save_rstd", Some(widen_f32(&stats.rstd)));
    }
    let state = layer.state().unwrap();
    compare(
        checks,
        case,
        "running_mean",
        state.running_mean.as_deref().map(widen_f32),
    );
    compare(
        checks,
        case,
        "running_var",
        state.running_var.as_deref().map(widen_f32),
    );
    let dy = upload(ctx, inputs.dy.as_ref().expect("every norm case has dy"));
    let mut dx = zeros::<T>(ctx, n);
    layer
        .backward(&cache, &x.as_view(), &dy.as_view(), &mut dx.as_view_mut())
        .unwrap_or_else(|e| panic!("backward: {e}"));
    compare(checks, case, "dx", Some(widen(&download(ctx, &dx))));
    let grad = |g: Option<&cudarc::driver::CudaSlice<f32>>| g.map(|g| widen_f32(&download(ctx, g)));
    compare(checks, case, "dweight", grad(layer.grad_weight()));
    compare(checks, case, "dbias", grad(layer.grad_bias()));
}

#[test]
#[ignore = "needs a CUDA device"]
fn golden_norms_gpu_layer() {
    let norms = Norms::new(&gpu()).unwrap();
    run_all(&common::norm_cases(), "norms gpu layer", |case, checks| {
        with_dtype!(case.dtype(), golden_layer(&norms, case, checks))
    });
}

/// A refused call leaves the GPU layer's state and gradients as they were.
#[test]
#[ignore = "needs a CUDA device"]
fn norms_gpu_layer_state_is_untouched_on_failure() {
    let norms = Norms::new(&gpu()).unwrap();
    let ctx = norms.context();
    let config = NormConfig::Instance(InstanceNormConfig {
        affine: true,
        track_running_stats: true,
        ..InstanceNormConfig::new(3)
    });
    let mut layer = NormLayer::new(&norms, config).unwrap();
    let x = upload(ctx, &random::<f32>(1, 60, 1.0, 2.0));
    let mut y = zeros::<f32>(ctx, 60);
    let cache = layer
        .forward(
            &x.as_view(),
            &[2, 3, 10],
            Layout::ChannelsFirst,
            &mut y.as_view_mut(),
        )
        .unwrap();
    let before = layer.state().unwrap();
    assert!(matches!(
        layer.forward(
            &x.as_view(),
            &[2, 5, 6],
            Layout::ChannelsFirst,
            &mut y.as_view_mut()
        ),
        Err(Error::ChannelMismatch {
            expected: 3,
            got: 5
        })
    ));
    let short = zeros::<f32>(ctx, 10);
    let mut dx = zeros::<f32>(ctx, 60);
    assert!(matches!(
        layer.backward(
            &cache,
            &x.as_view(),
            &short.as_view(),
            &mut dx.as_view_mut()
        ),
        Err(Error::BufferLength { what: "dy", .. })
    ));
    let grad = download(ctx, layer.grad_weight().expect("affine"));
    assert_eq!(
        grad, [0.0; 3],
        "a failed first backward leaves the gradient at zero"
    );
    assert_eq!(common::state_change(&before, &layer.state().unwrap()), None);

    // The saved statistics are the last forward's: an older cache is refused.
    let fresh = layer
        .forward(
            &x.as_view(),
            &[2, 3, 10],
            Layout::ChannelsFirst,
            &mut y.as_view_mut(),
        )
        .unwrap();
    let dy = zeros::<f32>(ctx, 60);
    let stale = layer.backward(&cache, &x.as_view(), &dy.as_view(), &mut dx.as_view_mut());
    assert!(
        matches!(stale, Err(Error::MissingSavedStats { .. })),
        "{stale:?}"
    );
    assert!(matches!(
        layer.saved_stats(&cache),
        Err(Error::MissingSavedStats { .. })
    ));
    assert_eq!(layer.saved_stats(&fresh).unwrap().rstd.len(), 6);
}

/// Both row plans on the emulated or real GPU's SM count: some shapes split their rows, and some
/// split their channels' values for the parameter gradients.
fn shapes(sm_count: u32) -> Vec<NormDesc> {
    let t = |dims: &[usize], layout| TensorDesc::new(dims, layout).unwrap();
    let descs = vec![
        NormDesc::group(&t(&[3, 12, 7, 5], Layout::ChannelsFirst), 4).unwrap(),
        NormDesc::group(&t(&[3, 12, 7, 5], Layout::ChannelsLast), 3).unwrap(),
        NormDesc::group(&t(&[1, 4, 96, 100], Layout::ChannelsFirst), 2).unwrap(),
        NormDesc::group(&t(&[1, 6, 60, 60], Layout::ChannelsLast), 2).unwrap(),
        // A held row of whole planes (S % VEC == 0): the 16-byte path, a channel per vector.
        NormDesc::group(&t(&[2, 8, 4, 16], Layout::ChannelsFirst), 2).unwrap(),
        NormDesc::instance(&t(&[2, 5, 33], Layout::ChannelsLast)),
        NormDesc::layer(&[9, 1000], &[1000]).unwrap(),
        // Enough rows for the parameter gradients to split them (3 ranges on 132 SMs; the
        // group norms above split theirs too: 5 ranges over planes, 15 over columns).
        NormDesc::layer(&[600, 96], &[96]).unwrap(),
        // Longer than the 4096 values a block keeps in registers: read twice.
        NormDesc::layer(&[3, 5000], &[5000]).unwrap(),
        NormDesc::layer(&[2, 3, 4, 50], &[3, 4, 50]).unwrap(),
        NormDesc::rms(&[7, 257], &[257]).unwrap(),
        NormDesc::rms(&[2, 20_000], &[20_000]).unwrap(),
    ];
    assert!(
        descs.iter().any(|d| matches!(
            row_plan(d.rows(), d.row_len(), sm_count),
            RowPlan::Split { .. }
        )),
        "no shape takes the split plan on {sm_count} SMs"
    );
    descs
}

/// Device against the CPU reference (the f64 oracle), golden tolerances: every plan, layout and
/// dtype, plain and with the SiLU epilogue and the residual add.
#[test]
#[ignore = "needs a CUDA device"]
fn norms_gpu_matches_the_reference() {
    fn check<T: Element>(norms: &Norms, dtype: DType) {
        for (k, desc) in shapes(norms.context().sm_count()).iter().enumerate() {
            let n = desc.numel();
            let x: Vec<T> = random(k as u64, n, 0.3, 2.0);
            let r: Vec<T> = random(50 + k as u64, n, 0.0, 1.0);
            let dy: Vec<T> = random(100 + k as u64, n, 0.0, 1.0);
            let w = random_f32(7, desc.channels(), -1.5, 1.5);
            let b = random_f32(8, desc.channels(), -0.5, 0.5);
            for (epilogue, residual) in [
                (NormEpilogue::None, false),
                (NormEpilogue::Silu, false),
                (NormEpilogue::None, true),
            ] {
                let what =
                    |q: &str| format!("{desc:?} {dtype} {epilogue:?} residual {residual} {q}");
                let got = run(
                    norms,
                    desc,
                    Run {
                        x: &x,
                        residual: residual.then_some(r.as_slice()),
                        dy: &dy,
                        weight: Some(&w),
                        bias: Some(&b),
                        eps: 1e-5,
                        mode: Mode::Batch,
                        running_mean: None,
                        running_var: None,
                        epilogue,
                    },
                );
                let input: Vec<T> = if residual {
                    x.iter()
                        .zip(&r)
                        .map(|(a, b)| T::from_f64(a.to_f64() + b.to_f64()))
                        .collect()
                } else {
                    x.clone()
                };
                if let Some(sum) = &got.sum {
                    assert_eq!(sum, &widen(&input), "{}", what("sum"));
                }
                let want = reference(desc, &input, &dy, &w, &b, epilogue);
                assert_outputs_close(&what, &got, &want, dtype);
                let mean = |s: &NormStats| -> Vec<f64> {
                    s.mean
                        .iter()
                        .zip(&s.mean_lo)
                        .map(|(h, l)| f64::from(*h) + f64::from(*l))
                        .collect()
                };
                let st = tolerance_for("save_rstd", dtype);
                assert_close(&what("mean"), &mean(&got.stats), &mean(&want.stats), st);
            }
        }
    }
    in_every_dtype!(check);
}

/// One row long enough for more than 256 splits (each thread of a merging block takes two or
/// more partials): forward and backward against the reference.
#[test]
#[ignore = "needs a CUDA device"]
fn norms_gpu_merges_many_splits() {
    let norms = Norms::new(&gpu()).unwrap();
    let sm_count = norms.context().sm_count();
    let desc = NormDesc::rms(&[1, 2_100_000], &[2_100_000]).unwrap();
    if !matches!(row_plan(1, desc.row_len(), sm_count), RowPlan::Split { splits } if splits > 256) {
        eprintln!("{sm_count} SMs: fewer than 257 splits, nothing to check here");
        return;
    }
    let n = desc.numel();
    let x: Vec<f32> = random(3, n, 0.3, 2.0);
    let dy: Vec<f32> = random(4, n, 0.0, 1.0);
    let w = random_f32(5, desc.channels(), -1.5, 1.5);
    let got = run(
        &norms,
        &desc,
        Run {
            x: &x,
            residual: None,
            dy: &dy,
            weight: Some(&w),
            bias: None,
            eps: 1e-5,
            mode: Mode::Batch,
            running_mean: None,
            running_var: None,
            epilogue: NormEpilogue::None,
        },
    );
    let b = vec![0.0; desc.channels()];
    let want = reference(&desc, &x, &dy, &w, &b, NormEpilogue::None);
    let act = tolerance_for("y", DType::F32);
    assert_close("y", &got.y, &want.y, act);
    assert_close("dx", &got.dx, &want.dx, act);
    let st = tolerance_for("save_rstd", DType::F32);
    assert_close(
        "rstd",
        &widen_f32(&got.stats.rstd),
        &widen_f32(&want.stats.rstd),
        st,
    );
}

/// `got` (the device's) against `want` (the reference's) within the golden tolerances of
/// `dtype`: y and dx, the parameter gradients and the saved rstd; `what` names a quantity.
fn assert_outputs_close(
    what: &dyn Fn(&str) -> String,
    got: &Outputs,
    want: &Outputs,
    dtype: DType,
) {
    let act = tolerance_for("y", dtype);
    assert_close(&what("y"), &got.y, &want.y, act);
    assert_close(&what("dx"), &got.dx, &want.dx, act);
    let pg = tolerance_for("dweight", dtype);
    assert_close(&what("dweight"), &got.dweight, &want.dweight, pg);
    assert_close(&what("dbias"), &got.dbias, &want.dbias, pg);
    let st = tolerance_for("save_rstd", dtype);
    let rstd = |o: &Outputs| widen_f32(&o.stats.rstd);
    assert_close(&what("rstd"), &rstd(got), &rstd(want), st);
}

/// The CPU reference's forward and backward with batch statistics and affine parameters.
fn reference<T: Element>(
    desc: &NormDesc,
    x: &[T],
    dy: &[T],
    weight: &[f32],
    bias: &[f32],
    epilogue: NormEpilogue,
) -> Outputs {
    let mut y = vec![T::default(); x.len()];
    let call = cpu::Forward {
        weight: Some(weight),
        bias: Some(bias),
        epilogue,
        ..cpu::Forward::new(x, 1e-5, &mut y)
    };
    let stats = cpu::forward(desc, call).unwrap().unwrap();
    let c = weight.len();
    let (mut dx, mut dweight, mut dbias) =
        (vec![T::default(); x.len()], vec![0.0; c], vec![0.0; c]);
    let call = cpu::Backward {
        x,
        dy,
        weight: Some(weight),
        bias: Some(bias),
        stats: cpu::UsedStats::Batch(&stats),
        epilogue,
        dx: Some(&mut dx),
        dweight: Some(&mut dweight),
        dbias: Some(&mut dbias),
        accumulate: false,
    };
    cpu::backward(desc, call).unwrap();
    Outputs {
        y: widen(&y),
        sum: None,
        stats,
        dx: widen(&dx),
        dweight: widen_f32(&dweight),
        dbias: widen_f32(&dbias),
    }
}

/// Rows with a large common offset (mean 1000 and spread 0.1 in f32, -700 and 0.07, 100 and
/// 0.5 in f16, 64 and 2 in bf16), both plans: the device gives what the f64 oracle gives on the
/// same rows without the offset (the same exact result, well conditioned), within the golden
/// tolerances. A mean rounded to f32 before `x - mean` fails this by up to 10 times.
#[test]
#[ignore = "needs a CUDA device"]
fn norms_gpu_is_offset_robust() {
    fn check<T: Element>(norms: &Norms, dtype: DType, offset: f64, spread: f64) {
        let sm = norms.context().sm_count();
        for (k, desc) in shapes(sm)
            .iter()
            .enumerate()
            .filter(|(_, d)| d.kind().centered())
        {
            let (small, shifted) = offset_pair::<T>(k as u64, desc.numel(), offset, spread);
            let dy: Vec<T> = random(100 + k as u64, desc.numel(), 0.0, 1.0);
            let w = random_f32(7, desc.channels(), 0.5, 1.5);
            let b = random_f32(8, desc.channels(), -0.5, 0.5);
            for epilogue in [NormEpilogue::None, NormEpilogue::Silu] {
                let want = reference(desc, &small, &dy, &w, &b, epilogue);
                let got = run(
                    norms,
                    desc,
                    Run {
                        x: &shifted,
                        residual: None,
                        dy: &dy,
                        weight: Some(&w),
                        bias: Some(&b),
                        eps: 1e-5,
                        mode: Mode::Batch,
                        running_mean: None,
                        running_var: None,
                        epilogue,
                    },
                );
                let what = |q: &str| format!("{desc:?} {dtype} offset {offset} {epilogue:?} {q}");
                assert_outputs_close(&what, &got, &want, dtype);
            }
        }
    }
    let norms = Norms::new(&gpu()).unwrap();
    check::<f32>(&norms, DType::F32, 1000.0, 0.1);
    check::<f32>(&norms, DType::F32, -700.0, 0.07);
    check::<half::f16>(&norms, DType::F16, 100.0, 0.5);
    check::<half::bf16>(&norms, DType::BF16, 64.0, 2.0);
}

/// Two runs of the same call give the same bits (fixed-order reductions, no atomics).
#[test]
#[ignore = "needs a CUDA device"]
fn norms_gpu_is_deterministic() {
    let norms = Norms::new(&gpu()).unwrap();
    for desc in shapes(norms.context().sm_count()) {
        let n = desc.numel();
        let x: Vec<f32> = random(1, n, 0.0, 3.0);
        let dy: Vec<f32> = random(2, n, 0.0, 1.0);
        let w = random_f32(3, desc.channels(), -1.0, 1.0);
        let go = || {
            let r = Run {
                x: &x,
                residual: None,
                dy: &dy,
                weight: Some(&w),
                bias: Some(&w),
                eps: 1e-5,
                mode: Mode::Batch,
                running_mean: None,
                running_var: None,
                epilogue: NormEpilogue::Silu,
            };
            let o = run(&norms, &desc, r);
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            [bits(&o.y), bits(&o.dx), bits(&o.dweight), bits(&o.dbias)]
        };
        assert_eq!(go(), go(), "{desc:?}");
    }
}

/// Bad calls are refused with the reference's typed errors and write nothing.
#[test]
#[ignore = "needs a CUDA device"]
fn norms_gpu_refuses_bad_calls_and_writes_nothing() {
    let norms = Norms::new(&gpu()).unwrap();
    let ctx = norms.context();
    let desc = NormDesc::group(&TensorDesc::nchw(2, 4, 3, 3).unwrap(), 2).unwrap();
    let x = upload(ctx, &vec![1.0f32; desc.numel()]);
    let mut y = upload(ctx, &vec![7.0f32; desc.numel()]);
    let mut stats = DeviceNormStats::new(ctx, desc.rows()).unwrap();
    let short = upload(ctx, &[1.0f32; 3]);
    let mut ws = NormWorkspace::new();
    let call = Forward {
        weight: Some(short.as_view()),
        ..Forward::new(x.as_view(), 1e-5, y.as_view_mut(), stats.as_mut())
    };
    assert!(matches!(
        norms::forward(&norms, &mut ws, &desc, call),
        Err(Error::BufferLength {
            what: "weight",
            needed: 4,
            got: 3
        })
    ));
    let call = Forward::new(x.as_view(), f32::NAN, y.as_view_mut(), stats.as_mut());
    assert!(matches!(
        norms::forward(&norms, &mut ws, &desc, call),
        Err(Error::InvalidEps { .. })
    ));
    let (mut m, mut v) = (upload(ctx, &[0.0f32; 4]), upload(ctx, &[1.0f32; 4]));
    let call = Forward {
        statistics: Statistics::BatchUpdating {
            running_mean: m.as_view_mut(),
            running_var: v.as_view_mut(),
            momentum: 0.1,
        },
        ..Forward::new(x.as_view(), 1e-5, y.as_view_mut(), stats.as_mut())
    };
    assert!(matches!(
        norms::forward(&norms, &mut ws, &desc, call),
        Err(Error::Unsupported { .. })
    ));
    assert!(download(ctx, &y).iter().all(|&v| v == 7.0));
    assert_eq!(download(ctx, &m), [0.0; 4]);
    assert_eq!(download(ctx, &v), [1.0; 4]);
    assert!(download(ctx, &stats.rstd).iter().all(|&v| v == 0.0));
}

/// A NaN stays in its row, a constant row normalizes to exactly `bias` (its mean is exact, its
/// variance 0; RMS norm excepted, which subtracts nothing), on both row plans and layouts, and
/// the other rows match the reference.
#[test]
#[ignore = "needs a CUDA device"]
fn norms_gpu_keeps_nan_in_its_row_and_constant_rows_exact() {
    let norms = Norms::new(&gpu()).unwrap();
    for desc in shapes(norms.context().sm_count()) {
        let n = desc.numel();
        let mut x: Vec<f32> = random(3, n, 0.5, 1.0);
        let last = desc.rows() - 1;
        let first = desc.row_offsets(0).next().unwrap();
        x[first] = f32::NAN;
        for i in desc.row_offsets(last) {
            x[i] = 1234.5;
        }
        let dy: Vec<f32> = random(4, n, 0.0, 1.0);
        let (w, b) = (
            random_f32(5, desc.channels(), 0.5, 1.5),
            random_f32(6, desc.channels(), -1.0, 1.0),
        );
        let got = run(
            &norms,
            &desc,
            Run {
                x: &x,
                residual: None,
                dy: &dy,
                weight: Some(&w),
                bias: Some(&b),
                eps: 1e-5,
                mode: Mode::Batch,
                running_mean: None,
                running_var: None,
                epilogue: NormEpilogue::None,
            },
        );
        let want = reference(&desc, &x, &dy, &w, &b, NormEpilogue::None);
        let what = format!("{desc:?}");
        let act = tolerance_for("y", DType::F32);
        if desc.rows() > 1 {
            for i in desc.row_offsets(last).filter(|_| desc.kind().centered()) {
                let c = desc.locate(i).1;
                assert_eq!(got.y[i], f64::from(b[c]), "{what}: constant row");
            }
            for i in desc.row_offsets(0) {
                assert!(got.y[i].is_nan() && got.dx[i].is_nan(), "{what}: NaN row");
            }
            // The rows between are untouched by the NaN: compare them alone.
            let clean: Vec<usize> = (1..last).flat_map(|r| desc.row_offsets(r)).collect();
            let pick = |v: &[f64]| clean.iter().map(|&i| v[i]).collect::<Vec<_>>();
            assert_close(&format!("{what} y"), &pick(&got.y), &pick(&want.y), act);
            assert_close(&format!("{what} dx"), &pick(&got.dx), &pick(&want.dx), act);
        }
    }
}

/// The GPU layer's fused residual add against the CPU layer's: `sum` bit for bit, `y`, the row
/// statistics, the running update, and the backward from `sum` within the golden tolerances, in
/// every dtype; a residual of the wrong length is refused with the state untouched.
#[test]
#[ignore = "needs a CUDA device"]
fn norms_gpu_layer_residual_matches_the_cpu_layer() {
    fn check<T: Element>(norms: &Norms, dtype: DType) {
        let ctx = norms.context();
        let tracked = NormConfig::Instance(InstanceNormConfig {
            affine: true,
            track_running_stats: true,
            ..InstanceNormConfig::new(4)
        });
        for (config, dims) in [
            (NormConfig::Rms(RmsNormConfig::new(&[96])), vec![7, 96]),
            (
                NormConfig::Layer(LayerNormConfig::new(&[40])),
                vec![2, 3, 40],
            ),
            (tracked, vec![3, 4, 6, 5]),
        ] {
            let what = |q: &str| format!("{config:?} {dtype} {q}");
            let n: usize = dims.iter().product();
            let x: Vec<T> = random(21, n, 0.5, 2.0);
            let r: Vec<T> = random(22, n, -0.25, 1.0);
            let dy: Vec<T> = random(23, n, 0.0, 1.0);
            let mut cpu_layer = cpu::NormLayer::new(config.clone()).unwrap();
            let mut host_sum = vec![T::default(); n];
            let host_residual = cpu::Residual {
                residual: &r,
                sum: &mut host_sum,
            };
            let (want_y, want_cache) = cpu_layer
                .forward_residual(&x, host_residual, &dims, Layout::ChannelsFirst)
                .unwrap();
            let want_dx = cpu_layer.backward(&want_cache, &host_sum, &dy).unwrap();

            let mut layer = NormLayer::new(norms, config.clone()).unwrap();
            let (xd, rd, dyd) = (upload(ctx, &x), upload(ctx, &r), upload(ctx, &dy));
            let (mut sum, mut y, mut dx) = (zeros::<T>(ctx, n), zeros::<T>(ctx, n), zeros(ctx, n));
            let residual = Residual {
                residual: rd.as_view(),
                sum: sum.as_view_mut(),
            };
            let cache = layer
                .forward_residual(
                    &xd.as_view(),
                    residual,
                    &dims,
                    Layout::ChannelsFirst,
                    &mut y.as_view_mut(),
                )
                .unwrap();
            assert_eq!(
                widen(&download(ctx, &sum)),
                widen(&host_sum),
                "{}",
                what("sum")
            );
            let got_stats = layer.saved_stats(&cache).unwrap();
            let tol = |q: &str| tolerance_for(q, dtype);
            assert_close(
                &what("y"),
                &widen(&download(ctx, &y)),
                &widen(&want_y),
                tol("y"),
            );
            let want_stats = want_cache.stats().expect("training: batch statistics");
            assert_close(
                &what("rstd"),
                &widen_f32(&got_stats.rstd),
                &widen_f32(&want_stats.rstd),
                tol("save_rstd"),
            );
            let (got_state, want_state) = (layer.state().unwrap(), cpu_layer.state().clone());
            for (q, got, want) in [
                (
                    "running_mean",
                    &got_state.running_mean,
                    &want_state.running_mean,
                ),
                (
                    "running_var",
                    &got_state.running_var,
                    &want_state.running_var,
                ),
            ] {
                assert_eq!(got.is_some(), want.is_some(), "{}", what(q));
                if let (Some(got), Some(want)) = (got, want) {
                    assert_close(&what(q), &widen_f32(got), &widen_f32(want), tol(q));
                }
            }
            layer
                .backward(
                    &cache,
                    &sum.as_view(),
                    &dyd.as_view(),
                    &mut dx.as_view_mut(),
                )
                .unwrap();
            assert_close(
                &what("dx"),
                &widen(&download(ctx, &dx)),
                &widen(&want_dx),
                tol("dx"),
            );
            let grad = download(ctx, layer.grad_weight().expect("affine"));
            let want_grad = cpu_layer.grad_weight().expect("affine");
            assert_close(
                &what("dweight"),
                &widen_f32(&grad),
                &widen_f32(want_grad),
                tol("dweight"),
            );

            let before = layer.state().unwrap();
            let short = zeros::<T>(ctx, n - 1);
            let residual = Residual {
                residual: short.as_view(),
                sum: sum.as_view_mut(),
            };
            let refused = layer.forward_residual(
                &xd.as_view(),
                residual,
                &dims,
                Layout::ChannelsFirst,
                &mut y.as_view_mut(),
            );
            assert!(
                matches!(
                    refused,
                    Err(Error::BufferLength {
                        what: "residual",
                        ..
                    })
                ),
                "{}: {refused:?}",
                what("short residual")
            );
            assert_eq!(common::state_change(&before, &layer.state().unwrap()), None);
            assert_eq!(
                widen(&download(ctx, &sum)),
                widen(&host_sum),
                "{}",
                what("sum kept")
            );
        }
    }
    in_every_dtype!(check);
}

/// `v` uploaded `offset` elements into its allocation (a view of it from `offset` on starts
/// misaligned for any offset that is not a multiple of 16 bytes).
fn padded<T: Element>(ctx: &GpuContext, v: &[T], offset: usize) -> CudaSlice<T> {
    let mut p = vec![T::default(); offset];
    p.extend_from_slice(v);
    upload(ctx, &p)
}

/// The held row's 16-byte path needs every buffer 16-byte aligned: a view that starts one
/// element into its allocation (x, residual, y or sum, one at a time) sends the call to the
/// per-value path, which gives what the reference gives, as the aligned call does.
#[test]
#[ignore = "needs a CUDA device"]
fn norms_gpu_forward_takes_any_alignment() {
    fn check<T: Element>(norms: &Norms, dtype: DType) {
        let ctx = norms.context();
        let desc = NormDesc::layer(&[6, 1024], &[1024]).unwrap();
        let n = desc.numel();
        let x: Vec<T> = random(31, n, 0.5, 2.0);
        let r: Vec<T> = random(32, n, 0.0, 1.0);
        let w = random_f32(33, 1024, -1.5, 1.5);
        let b = random_f32(34, 1024, -0.5, 0.5);
        let sum: Vec<T> = x
            .iter()
            .zip(&r)
            .map(|(a, b)| T::from_f64(a.to_f64() + b.to_f64()))
            .collect();
        let want = |input: &[T]| {
            let mut y = vec![T::default(); n];
            let call = cpu::Forward {
                weight: Some(&w),
                bias: Some(&b),
                ..cpu::Forward::new(input, 1e-5, &mut y)
            };
            cpu::forward(&desc, call).unwrap();
            widen(&y)
        };
        let (wd, bd) = (upload(ctx, &w), upload(ctx, &b));
        // Offsets of x, residual, y and sum; a residual add when it has one of its own.
        let cases: [([usize; 4], bool); 7] = [
            ([0, 0, 0, 0], false),
            ([0, 0, 0, 0], true),
            ([1, 0, 0, 0], false),
            ([0, 0, 1, 0], false),
            ([0, 1, 0, 0], true),
            ([0, 0, 0, 1], true),
            ([1, 1, 1, 1], true),
        ];
        for ([xo, ro, yo, so], residual) in cases {
            let what = format!("{dtype} offsets x {xo} residual {ro} y {yo} sum {so}");
            let (xd, rd) = (padded(ctx, &x, xo), padded(ctx, &r, ro));
            let (mut yd, mut sd) = (zeros::<T>(ctx, n + yo), zeros::<T>(ctx, n + so));
            let mut stats = DeviceNormStats::new(ctx, desc.rows()).unwrap();
            let call = Forward {
                residual: residual.then(|| Residual {
                    residual: rd.slice(ro..),
                    sum: sd.slice_mut(so..),
                }),
                weight: Some(wd.as_view()),
                bias: Some(bd.as_view()),
                ..Forward::new(xd.slice(xo..), 1e-5, yd.slice_mut(yo..), stats.as_mut())
            };
            norms::forward(norms, &mut NormWorkspace::new(), &desc, call).unwrap();
            let expect = want(if residual { &sum } else { &x });
            let got = widen(&download(ctx, &yd)[yo..]);
            assert_close(&what, &got, &expect, tolerance_for("y", dtype));
            if residual {
                assert_eq!(widen(&download(ctx, &sd)[so..]), widen(&sum), "{what} sum");
            }
        }
    }
    in_every_dtype!(check);
}

/// The backward's 16-byte path needs x, dy and dx 16-byte aligned: a view that starts one
/// element into its allocation (each of them, then all three) takes the per-value path, which
/// gives what the reference gives, as the aligned call does.
#[test]
#[ignore = "needs a CUDA device"]
fn norms_gpu_backward_takes_any_alignment() {
    fn check<T: Element>(norms: &Norms, dtype: DType) {
        let ctx = norms.context();
        let desc = NormDesc::layer(&[6, 1024], &[1024]).unwrap();
        let n = desc.numel();
        let x: Vec<T> = random(41, n, 0.5, 2.0);
        let dy: Vec<T> = random(42, n, 0.0, 1.0);
        let w = random_f32(43, 1024, -1.5, 1.5);
        let b = random_f32(44, 1024, -0.5, 0.5);
        let want = reference(&desc, &x, &dy, &w, &b, NormEpilogue::None);
        let (wd, bd) = (upload(ctx, &w), upload(ctx, &b));
        let mut stats = DeviceNormStats::new(ctx, desc.rows()).unwrap();
        let mut y = zeros::<T>(ctx, n);
        let xd = upload(ctx, &x);
        let call = Forward {
            weight: Some(wd.as_view()),
            bias: Some(bd.as_view()),
            ..Forward::new(xd.as_view(), 1e-5, y.as_view_mut(), stats.as_mut())
        };
        norms::forward(norms, &mut NormWorkspace::new(), &desc, call).unwrap();
        // Offsets of x, dy and dx.
        for [xo, yo, dxo] in [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]] {
            let what = format!("{dtype} offsets x {xo} dy {yo} dx {dxo}");
            let (xd, dyd) = (padded(ctx, &x, xo), padded(ctx, &dy, yo));
            let mut dxd = zeros::<T>(ctx, n + dxo);
            let (mut dw, mut db) = (zeros::<f32>(ctx, 1024), zeros::<f32>(ctx, 1024));
            let call = Backward {
                x: xd.slice(xo..),
                dy: dyd.slice(yo..),
                weight: Some(wd.as_view()),
                bias: Some(bd.as_view()),
                stats: stats.as_view(),
                source: StatsSource::Batch,
                epilogue: NormEpilogue::None,
                dx: Some(dxd.slice_mut(dxo..)),
                dweight: Some(dw.as_view_mut()),
                dbias: Some(db.as_view_mut()),
                accumulate: false,
            };
            norms::backward(norms, &mut NormWorkspace::new(), &desc, call).unwrap();
            let got = widen(&download(ctx, &dxd)[dxo..]);
            assert_close(&what, &got, &want.dx, tolerance_for("y", dtype));
            let pg = tolerance_for("dweight", dtype);
            assert_close(&what, &widen_f32(&download(ctx, &dw)), &want.dweight, pg);
            assert_close(&what, &widen_f32(&download(ctx, &db)), &want.dbias, pg);
        }
    }
    in_every_dtype!(check);
}
