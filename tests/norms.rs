//! Group, layer, instance and RMS normalization on the CPU reference: every golden case recorded
//! from PyTorch (`../shared/golden/norms`), then the offset-robustness checks.
//! `cargo test --release norms -- --nocapture` prints each case with the worst share of
//! tolerance of every compared tensor.

mod common;

use batchnorm_cuda::norms::{
    GroupNormConfig, InstanceNormConfig, LayerNormConfig, NormConfig, NormDesc, NormEpilogue,
    NormStats,
};
use batchnorm_cuda::reference::norms::{
    self, Backward, Forward, NormLayer, Residual, RunningStats, Statistics, UsedStats,
};
use batchnorm_cuda::{DType, Element, Error, Layout, TensorDesc};
use common::norms::{layer_config, layer_state, offset_pair, Mode, NormCall, NormInputs};
use common::{
    assert_close, run_all, tolerance_for, widen, widen_f32, with_dtype, Case, Checks, Stored,
};

fn compare(checks: &mut Checks, case: &Case, name: &str, got: Option<Vec<f64>>) {
    checks.compare(case, name, got, tolerance_for(name, case.dtype()));
}

/// One forward and one backward of the case through the functional reference.
fn functional<T: Element + Stored>(case: &Case, checks: &mut Checks) {
    let NormCall { desc, eps, mode } = NormCall::of(case);
    let NormInputs {
        x,
        dy,
        weight,
        bias,
        mut running_mean,
        mut running_var,
    } = NormInputs::<T>::of(case);
    let mut y = vec![T::default(); x.len()];
    let statistics = match (
        mode,
        running_mean.as_deref_mut(),
        running_var.as_deref_mut(),
    ) {
        (Mode::Batch, ..) => Statistics::Batch,
        (Mode::BatchUpdating { momentum }, Some(mean), Some(var)) => Statistics::BatchUpdating {
            running_mean: mean,
            running_var: var,
            momentum,
        },
        (Mode::Running, Some(mean), Some(var)) => Statistics::Running(RunningStats { mean, var }),
        _ => panic!("{}: tracked statistics without running_mean/var", case.name),
    };
    let call = Forward {
        weight: weight.as_deref(),
        bias: bias.as_deref(),
        statistics,
        ..Forward::new(&x, eps, &mut y)
    };
    let saved = norms::forward(&desc, call).unwrap_or_else(|e| panic!("forward: {e}"));
    compare(checks, case, "y", Some(widen(&y)));
    if let Some(saved) = &saved {
        if desc.kind().centered() {
            compare(checks, case, "save_mean", Some(widen_f32(&saved.mean)));
        }
        compare(checks, case, "save_rstd", Some(widen_f32(&saved.rstd)));
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

    let Some(dy) = dy else { return };
    let c = desc.channels();
    let mut dx = vec![T::default(); x.len()];
    let (mut dweight, mut dbias) = (vec![0.0f32; c], vec![0.0f32; c]);
    let stats = match &saved {
        Some(saved) => UsedStats::Batch(saved),
        None => UsedStats::Running(
            RunningStats {
                mean: running_mean.as_deref().unwrap(),
                var: running_var.as_deref().unwrap(),
            },
            eps,
        ),
    };
    let call = Backward {
        x: &x,
        dy: &dy,
        weight: weight.as_deref(),
        bias: bias.as_deref(),
        stats,
        epilogue: NormEpilogue::None,
        dx: Some(&mut dx),
        dweight: weight.is_some().then_some(dweight.as_mut_slice()),
        dbias: bias.is_some().then_some(dbias.as_mut_slice()),
        accumulate: false,
    };
    norms::backward(&desc, call).unwrap_or_else(|e| panic!("backward: {e}"));
    compare(checks, case, "dx", Some(widen(&dx)));
    compare(
        checks,
        case,
        "dweight",
        weight.is_some().then(|| widen_f32(&dweight)),
    );
    compare(
        checks,
        case,
        "dbias",
        bias.is_some().then(|| widen_f32(&dbias)),
    );
}

#[test]
fn golden_norms_reference() {
    run_all(&common::norm_cases(), "norms reference", |case, checks| {
        with_dtype!(case.dtype(), functional(case, checks))
    });
}

/// The layer, built from the case's configuration and state: one forward, one backward.
fn layer<T: Element + Stored>(case: &Case, checks: &mut Checks) {
    let inputs = NormInputs::<T>::of(case);
    let mut layer = NormLayer::new(layer_config(case)).unwrap();
    layer.load_state(layer_state(&inputs)).unwrap();
    if case.meta("training") == Some("false") {
        layer.eval();
    }
    let dims = common::norms::input_dims(case);
    let (y, cache) = layer
        .forward(&inputs.x, &dims.0, dims.1)
        .unwrap_or_else(|e| panic!("forward: {e}"));
    compare(checks, case, "y", Some(widen(&y)));
    if let Some(stats) = cache.stats() {
        if !matches!(layer.config(), NormConfig::Rms(_)) {
            compare(checks, case, "save_mean", Some(widen_f32(&stats.mean)));
        }
        compare(checks, case, "save_rstd", Some(widen_f32(&stats.rstd)));
    }
    let state = layer.state().clone();
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
    let dy = inputs.dy.as_ref().expect("every norm case has dy");
    let dx = layer
        .backward(&cache, &inputs.x, dy)
        .unwrap_or_else(|e| panic!("backward: {e}"));
    compare(checks, case, "dx", Some(widen(&dx)));
    compare(checks, case, "dweight", layer.grad_weight().map(widen_f32));
    compare(checks, case, "dbias", layer.grad_bias().map(widen_f32));
}

#[test]
fn golden_norms_reference_layer() {
    run_all(
        &common::norm_cases(),
        "norms reference layer",
        |case, checks| with_dtype!(case.dtype(), layer(case, checks)),
    );
}

/// A refused call leaves the layer's state and gradients as they were; gradients accumulate.
#[test]
fn norms_layer_state_is_untouched_on_failure_and_grads_accumulate() {
    let config = NormConfig::Instance(InstanceNormConfig {
        affine: true,
        track_running_stats: true,
        ..InstanceNormConfig::new(3)
    });
    let mut layer = NormLayer::new(config).unwrap();
    let x: Vec<f32> = common::gpu::random(1, 2 * 3 * 10, 1.0, 2.0);
    let (y, cache) = layer
        .forward(&x, &[2, 3, 10], Layout::ChannelsFirst)
        .unwrap();
    layer.backward(&cache, &x, &y).unwrap();
    let (state, grad) = (layer.state().clone(), layer.grad_weight().unwrap().to_vec());
    assert_ne!(
        state.running_mean,
        Some(vec![0.0; 3]),
        "training updates the running mean"
    );
    // Wrong channel count, wrong layout for a layer norm, a short dy, a bad state.
    assert!(matches!(
        layer.forward(&x, &[2, 5, 6], Layout::ChannelsFirst),
        Err(Error::ChannelMismatch {
            expected: 3,
            got: 5
        })
    ));
    assert!(matches!(
        layer.backward(&cache, &x, &y[..10]),
        Err(Error::BufferLength { what: "dy", .. })
    ));
    let bad = batchnorm_cuda::LayerState {
        running_var: Some(vec![1.0, -1.0, 1.0]),
        ..state.clone()
    };
    assert!(matches!(
        layer.load_state(bad),
        Err(Error::InvalidRunningVar { channel: 1, .. })
    ));
    assert_eq!(common::state_change(&state, layer.state()), None);
    assert_eq!(layer.grad_weight().unwrap(), grad.as_slice());
    // A second backward adds the same gradient.
    layer.backward(&cache, &x, &y).unwrap();
    for (twice, once) in layer.grad_weight().unwrap().iter().zip(&grad) {
        assert!((twice - 2.0 * once).abs() <= 1e-6 * once.abs().max(1.0));
    }
    let mut ln = NormLayer::new(NormConfig::Layer(LayerNormConfig::new(&[10]))).unwrap();
    assert!(matches!(
        ln.forward(&x, &[2, 3, 10], Layout::ChannelsLast),
        Err(Error::Unsupported { .. })
    ));
    assert!(matches!(
        NormLayer::new(NormConfig::Group(GroupNormConfig::new(4, 6))),
        Err(Error::GroupsDoNotDivideChannels {
            groups: 4,
            channels: 6
        })
    ));
}

/// The cases cover the four normalizations, half precision, channels-last and tracked instance
/// statistics in both modes.
#[test]
fn golden_norms_cover_the_semantics() {
    let cases = common::norm_cases();
    let any = |f: &dyn Fn(&Case) -> bool| cases.iter().any(f);
    for op in ["group_norm", "layer_norm", "instance_norm", "rms_norm"] {
        assert!(any(&|c| c.meta("op") == Some(op)), "no {op} case");
    }
    assert!(any(&|c| c.dtype() == DType::F16) && any(&|c| c.dtype() == DType::BF16));
    assert!(any(&|c| c.meta("layout") == Some("channels_last")));
    assert!(any(&|c| c.meta("training") == Some("false")));
    assert!(any(
        &|c| c.meta("track_running_stats") == Some("true") && c.meta("training") == Some("true")
    ));
}

/// The shapes of the offset checks: group norm both layouts, instance norm, layer norm over a
/// transformer row. (RMS norm subtracts nothing and is not shift-invariant: an offset is just
/// large values to it, which the GPU tests cover against this reference.)
pub fn offset_descs() -> Vec<NormDesc> {
    let t = |dims: &[usize], layout| TensorDesc::new(dims, layout).unwrap();
    vec![
        NormDesc::group(&t(&[2, 8, 5, 7], Layout::ChannelsFirst), 4).unwrap(),
        NormDesc::group(&t(&[2, 8, 5, 7], Layout::ChannelsLast), 2).unwrap(),
        NormDesc::instance(&t(&[3, 4, 50], Layout::ChannelsLast)),
        NormDesc::layer(&[6, 384], &[384]).unwrap(),
    ]
}

/// Forward and backward of `x` (batch statistics, affine, optional SiLU): y, stats, dx, dweight,
/// dbias in f64.
pub struct Outputs {
    pub y: Vec<f64>,
    pub stats: NormStats,
    pub dx: Vec<f64>,
    pub dweight: Vec<f64>,
    pub dbias: Vec<f64>,
}

pub fn reference_outputs<T: Element>(
    desc: &NormDesc,
    x: &[T],
    dy: &[T],
    weight: &[f32],
    bias: &[f32],
    epilogue: NormEpilogue,
) -> Outputs {
    let mut y = vec![T::default(); x.len()];
    let call = Forward {
        weight: Some(weight),
        bias: Some(bias),
        epilogue,
        ..Forward::new(x, 1e-5, &mut y)
    };
    let stats = norms::forward(desc, call).unwrap().unwrap();
    let (mut dx, mut dweight, mut dbias) = (
        vec![T::default(); x.len()],
        vec![0.0f32; weight.len()],
        vec![0.0f32; weight.len()],
    );
    let call = Backward {
        x,
        dy,
        weight: Some(weight),
        bias: Some(bias),
        stats: UsedStats::Batch(&stats),
        epilogue,
        dx: Some(&mut dx),
        dweight: Some(&mut dweight),
        dbias: Some(&mut dbias),
        accumulate: false,
    };
    norms::backward(desc, call).unwrap();
    Outputs {
        y: widen(&y),
        stats,
        dx: widen(&dx),
        dweight: widen_f32(&dweight),
        dbias: widen_f32(&dbias),
    }
}

/// On rows with a large common offset (mean 1000 and spread 0.1 in f32, 100 and 0.5 in f16...)
/// the reference gives what it gives on the same rows without the offset (exactly the same
/// mathematical result, and well conditioned), within the golden tolerances: neither the
/// forward nor the backward rounds the mean before forming `x - mean`.
#[test]
fn norms_reference_is_offset_robust() {
    fn check<T: Element>(dtype: DType, offset: f64, spread: f64) {
        for (k, desc) in offset_descs().iter().enumerate() {
            let (small, shifted) = offset_pair::<T>(k as u64, desc.numel(), offset, spread);
            let dy: Vec<T> = common::gpu::random(100 + k as u64, desc.numel(), 0.0, 1.0);
            let weight = common::gpu::random_f32(7, desc.channels(), 0.5, 1.5);
            let bias = common::gpu::random_f32(8, desc.channels(), -0.5, 0.5);
            for epilogue in [NormEpilogue::None, NormEpilogue::Silu] {
                let want = reference_outputs(desc, &small, &dy, &weight, &bias, epilogue);
                let got = reference_outputs(desc, &shifted, &dy, &weight, &bias, epilogue);
                let what =
                    |q: &str| format!("{:?} {dtype} offset {offset} {epilogue:?} {q}", desc.kind());
                let act = tolerance_for("y", dtype);
                assert_close(&what("y"), &got.y, &want.y, act);
                assert_close(&what("dx"), &got.dx, &want.dx, act);
                let pg = tolerance_for("dweight", dtype);
                assert_close(&what("dweight"), &got.dweight, &want.dweight, pg);
                assert_close(&what("dbias"), &got.dbias, &want.dbias, pg);
                assert_close(
                    &what("rstd"),
                    &widen_f32(&got.stats.rstd),
                    &widen_f32(&want.stats.rstd),
                    tolerance_for("save_rstd", dtype),
                );
            }
        }
    }
    check::<f32>(DType::F32, 1000.0, 0.1);
    check::<f32>(DType::F32, -700.0, 0.07);
    check::<half::f16>(DType::F16, 100.0, 0.5);
    check::<half::bf16>(DType::BF16, 64.0, 2.0);
}

#[test]
fn norms_reference_refuses_bad_calls_and_writes_nothing() {
    let desc = NormDesc::group(&TensorDesc::nchw(2, 4, 3, 3).unwrap(), 2).unwrap();
    let x = vec![1.0f32; desc.numel()];
    let mut y = vec![7.0f32; desc.numel()];
    let short = [1.0f32; 3];
    let call = Forward {
        weight: Some(&short),
        ..Forward::new(&x, 1e-5, &mut y)
    };
    assert!(matches!(
        norms::forward(&desc, call),
        Err(Error::BufferLength {
            what: "weight",
            needed: 4,
            got: 3
        })
    ));
    let call = Forward::new(&x, -1.0, &mut y);
    assert!(matches!(
        norms::forward(&desc, call),
        Err(Error::InvalidEps { .. })
    ));
    let (mut mean, mut var) = ([0.0f32; 4], [1.0f32; 4]);
    let call = Forward {
        statistics: Statistics::BatchUpdating {
            running_mean: &mut mean,
            running_var: &mut var,
            momentum: 0.1,
        },
        ..Forward::new(&x, 1e-5, &mut y)
    };
    assert!(matches!(
        norms::forward(&desc, call),
        Err(Error::Unsupported { .. })
    ));
    // InstanceNorm over one value per instance, in training: PyTorch refuses it.
    let single = NormDesc::instance(&TensorDesc::new(&[2, 4, 1], Layout::ChannelsFirst).unwrap());
    let mut y8 = [7.0f32; 8];
    let call = Forward::new(&x[..8], 1e-5, &mut y8);
    assert!(matches!(
        norms::forward(&single, call),
        Err(Error::SingleValuePerChannel { .. })
    ));
    assert!(y.iter().chain(&y8).all(|&v| v == 7.0));
    assert_eq!((mean, var), ([0.0; 4], [1.0; 4]));
}

/// The fused residual add writes `x + residual` and normalizes it: the same as adding first.
#[test]
fn norms_reference_residual_add_is_add_then_normalize() {
    let desc = NormDesc::rms(&[3, 64], &[64]).unwrap();
    let x: Vec<half::bf16> = common::gpu::random(1, desc.numel(), 0.0, 2.0);
    let r: Vec<half::bf16> = common::gpu::random(2, desc.numel(), 0.5, 1.0);
    let (mut sum, mut y) = (
        vec![half::bf16::ZERO; x.len()],
        vec![half::bf16::ZERO; x.len()],
    );
    let call = Forward {
        residual: Some(Residual {
            residual: &r,
            sum: &mut sum,
        }),
        ..Forward::new(&x, 1e-6, &mut y)
    };
    norms::forward(&desc, call).unwrap();
    let added: Vec<half::bf16> = x.iter().zip(&r).map(|(a, b)| *a + *b).collect();
    assert_eq!(sum, added);
    let mut y2 = vec![half::bf16::ZERO; x.len()];
    norms::forward(&desc, Forward::new(&added, 1e-6, &mut y2)).unwrap();
    assert_eq!(y, y2);
}

/// The layer's fused residual add is the layer's forward of the added sum: the same `y`, row
/// statistics, running update and (with the sum as input) backward, bit for bit; a residual of
/// the wrong length is refused with the state untouched.
#[test]
fn norms_reference_layer_residual_is_add_then_forward() {
    let tracked = NormConfig::Instance(InstanceNormConfig {
        affine: true,
        track_running_stats: true,
        ..InstanceNormConfig::new(4)
    });
    for (config, dims) in [
        (NormConfig::Layer(LayerNormConfig::new(&[48])), vec![5, 48]),
        (tracked, vec![3, 4, 6, 5]),
    ] {
        let n: usize = dims.iter().product();
        let x: Vec<half::f16> = common::gpu::random(11, n, 0.5, 2.0);
        let r: Vec<half::f16> = common::gpu::random(12, n, -0.25, 1.0);
        let dy: Vec<half::f16> = common::gpu::random(13, n, 0.0, 1.0);
        let mut fused = NormLayer::new(config.clone()).unwrap();
        let mut plain = fused.clone();
        let mut sum = vec![half::f16::ZERO; n];
        let residual = Residual {
            residual: &r,
            sum: &mut sum,
        };
        let (y, cache) = fused
            .forward_residual(&x, residual, &dims, Layout::ChannelsFirst)
            .unwrap();
        let added: Vec<half::f16> = x.iter().zip(&r).map(|(a, b)| *a + *b).collect();
        assert_eq!(sum, added, "{config:?}: sum");
        let (y2, cache2) = plain.forward(&added, &dims, Layout::ChannelsFirst).unwrap();
        assert_eq!(y, y2, "{config:?}: y");
        assert_eq!(fused.state(), plain.state(), "{config:?}: state");
        let dx = fused.backward(&cache, &sum, &dy).unwrap();
        let dx2 = plain.backward(&cache2, &added, &dy).unwrap();
        assert_eq!(dx, dx2, "{config:?}: dx");
        assert_eq!(
            fused.grad_weight(),
            plain.grad_weight(),
            "{config:?}: dweight"
        );

        let before = fused.state().clone();
        let short = vec![half::f16::ZERO; n - 1];
        let residual = Residual {
            residual: &short,
            sum: &mut sum,
        };
        assert!(matches!(
            fused.forward_residual(&x, residual, &dims, Layout::ChannelsFirst),
            Err(Error::BufferLength {
                what: "residual",
                ..
            })
        ));
        assert_eq!(
            fused.state(),
            &before,
            "{config:?}: a refused call changed the state"
        );
        assert_eq!(sum, added, "{config:?}: a refused call wrote the sum");
    }
}
