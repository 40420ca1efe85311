//! Every golden batch-norm case recorded from PyTorch, through the CPU reference: the functional
//! API and the layer. `cargo test --release --test golden -- --nocapture` prints each case with
//! the worst error of every compared tensor.

mod common;

use batchnorm_cuda::reference::{
    self, BatchNorm, CachedStats, Gradients, RunningStats, RunningUpdate,
};
use batchnorm_cuda::{DType, Element, Error, Result};
use common::{
    run_all, tolerance_for, widen, widen_f32, with_dtype, BnInputs, Case, Checks, Stored,
};

/// Whether `error` is the typed error a golden `expect.error` names.
fn is_expected_error(name: &str, error: &Error) -> bool {
    match name {
        "single_value_per_channel" => matches!(error, Error::SingleValuePerChannel { .. }),
        other => panic!("unknown expect.error {other:?}: teach tests/golden.rs its typed error"),
    }
}

/// Records the outcome of a call that PyTorch refused; returns whether it was refused.
fn refused<V>(case: &Case, checks: &mut Checks, result: &Result<V>) -> bool {
    let Some(name) = case.expect_error() else {
        return false;
    };
    match result {
        Err(e) if is_expected_error(name, e) => checks.note(format!("refused: {e}")),
        Err(e) => checks.fail(format!("expected error {name}, got {e}")),
        Ok(_) => checks.fail(format!("expected error {name}, the call succeeded")),
    }
    true
}

/// Compares a golden tensor of a batch-norm case.
fn compare(checks: &mut Checks, case: &Case, name: &str, got: Option<Vec<f64>>) {
    checks.compare(case, name, got, tolerance_for(name, case.dtype()));
}

/// The functional API: `forward_training` (training, or eval without running statistics) or
/// `forward_inference`, then the matching backward.
fn functional<T: Element + Stored>(case: &Case, checks: &mut Checks) {
    let BnInputs {
        x,
        dy,
        weight,
        bias,
        mut running_mean,
        mut running_var,
    } = case.bn_inputs::<T>();
    let (desc, cfg) = (case.desc(), case.config());
    let (w, b) = (weight.as_deref(), bias.as_deref());
    let mut y = vec![T::default(); x.len()];
    let mut dx = vec![T::default(); x.len()];
    let c = desc.channels();
    let (mut dweight, mut dbias) = (vec![0.0f32; c], vec![0.0f32; c]);
    let affine = cfg.affine;
    let grads = Gradients {
        dx: Some(&mut dx),
        dweight: affine.then_some(dweight.as_mut_slice()),
        dbias: affine.then_some(dbias.as_mut_slice()),
        accumulate: false,
    };

    if case.training() || !cfg.track_running_stats {
        let running = match (
            case.training(),
            running_mean.as_deref_mut(),
            running_var.as_deref_mut(),
        ) {
            (true, Some(mean), Some(var)) => Some(RunningUpdate::pytorch(
                mean,
                var,
                cfg.average_factor(case.num_batches_tracked() + 1),
            )),
            _ => None,
        };
        let result = reference::forward_training(&x, &desc, w, b, running, cfg.eps, &mut y);
        if refused(case, checks, &result) {
            return;
        }
        let saved = result.unwrap_or_else(|e| panic!("forward_training: {e}"));
        compare(checks, case, "save_mean", Some(widen_f32(&saved.mean)));
        compare(checks, case, "save_invstd", Some(widen_f32(&saved.invstd)));
        if let Some(dy) = &dy {
            reference::backward_training(&x, dy, &desc, w, &saved, grads)
                .unwrap_or_else(|e| panic!("backward_training: {e}"));
        }
    } else {
        let (mean, var) = (
            running_mean.as_deref().unwrap(),
            running_var.as_deref().unwrap(),
        );
        let running = RunningStats { mean, var };
        let result = reference::forward_inference(&x, &desc, w, b, running, cfg.eps, &mut y);
        if refused(case, checks, &result) {
            return;
        }
        result.unwrap_or_else(|e| panic!("forward_inference: {e}"));
        if let Some(dy) = &dy {
            reference::backward_inference(&x, dy, &desc, w, running, cfg.eps, grads)
                .unwrap_or_else(|e| panic!("backward_inference: {e}"));
        }
    }
    if case.expect_error().is_some() {
        checks.fail("the case expects an error, the call succeeded");
    }
    compare(checks, case, "y", Some(widen(&y)));
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
    if dy.is_some() {
        compare(checks, case, "dx", Some(widen(&dx)));
        compare(checks, case, "dweight", affine.then(|| widen_f32(&dweight)));
        compare(checks, case, "dbias", affine.then(|| widen_f32(&dbias)));
    }
}

/// The layer: built from the case's configuration and state, one forward, one backward.
fn layer<T: Element + Stored>(case: &Case, checks: &mut Checks) {
    let BnInputs {
        x,
        dy,
        weight,
        bias,
        running_mean,
        running_var,
    } = case.bn_inputs::<T>();
    let (desc, cfg) = (case.desc(), case.config());
    let mut bn = BatchNorm::new(cfg).unwrap();
    if let (Some(w), Some(b)) = (&weight, &bias) {
        bn.set_weight(w).unwrap();
        bn.set_bias(b).unwrap();
    }
    if let (Some(mean), Some(var)) = (&running_mean, &running_var) {
        bn.set_running_mean(mean).unwrap();
        bn.set_running_var(var).unwrap();
        bn.set_num_batches_tracked(case.num_batches_tracked())
            .unwrap();
    }
    if !case.training() {
        bn.eval();
    }

    let before = bn.state();
    let result = bn.forward(&x, &desc);
    if refused(case, checks, &result) {
        if let Some(change) = common::state_change(&before, &bn.state()) {
            checks.fail(format!(
                "the refused call changed the layer's state: {change}"
            ));
        }
        return;
    }
    let (y, cache) = result.unwrap_or_else(|e| panic!("forward: {e}"));
    compare(checks, case, "y", Some(widen(&y)));
    compare(
        checks,
        case,
        "running_mean",
        bn.running_mean().map(widen_f32),
    );
    compare(checks, case, "running_var", bn.running_var().map(widen_f32));
    if let Some(expected) = case.expect_num_batches_tracked() {
        checks.equal("num_batches_tracked", bn.num_batches_tracked(), expected);
    }
    let saved = match cache.stats() {
        CachedStats::Batch(saved) => Some(saved),
        CachedStats::Running { .. } => None,
    };
    compare(checks, case, "save_mean", saved.map(|s| widen_f32(&s.mean)));
    compare(
        checks,
        case,
        "save_invstd",
        saved.map(|s| widen_f32(&s.invstd)),
    );
    if let Some(dy) = &dy {
        let grads = bn
            .backward(&cache, &x, dy)
            .unwrap_or_else(|e| panic!("backward: {e}"));
        compare(checks, case, "dx", Some(widen(&grads.dx)));
        compare(
            checks,
            case,
            "dweight",
            grads.dweight.as_deref().map(widen_f32),
        );
        compare(checks, case, "dbias", grads.dbias.as_deref().map(widen_f32));
    }
}

#[test]
fn golden_functional() {
    run_all(&common::batchnorm_cases(), "functional", |case, checks| {
        with_dtype!(case.dtype(), functional(case, checks))
    });
}

#[test]
fn golden_layer() {
    run_all(&common::batchnorm_cases(), "layer", |case, checks| {
        with_dtype!(case.dtype(), layer(case, checks))
    });
}

/// The cases cover what they claim to: at least one refused call, eval, f16, bf16, channels-last.
#[test]
fn golden_cases_cover_the_semantics() {
    let cases = common::batchnorm_cases();
    let any = |f: &dyn Fn(&Case) -> bool| cases.iter().any(f);
    assert!(any(&|c| c.expect_error().is_some()), "no error case");
    assert!(
        any(&|c| !c.training() && c.flag("track_running_stats")),
        "no eval case"
    );
    assert!(
        any(&|c| !c.training() && !c.flag("track_running_stats")),
        "no eval case with batch statistics"
    );
    assert!(
        any(&|c| c.dtype() == DType::F16) && any(&|c| c.dtype() == DType::BF16),
        "no half case"
    );
    assert!(
        any(&|c| c.meta("momentum") == Some("none")),
        "no cumulative-average case"
    );
    assert!(
        any(&|c| c.meta("layout") == Some("channels_last")),
        "no channels-last case"
    );
}

/// An empty batch in training, written as `FORMAT.md` describes it (no saved statistics: PyTorch
/// records none): the harness takes the saved statistics the crate produces as unspecified, and
/// every specified tensor still has to match (empty outputs, running statistics unchanged,
/// counter incremented, zero parameter gradients).
#[test]
fn an_empty_batch_case_leaves_the_saved_statistics_unspecified() {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let f64s = |v: &[f64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (running_mean, running_var) = ([0.5f32, -1.0, 2.0], [1.5f32, 0.25, 4.0]);
    let tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = vec![
        ("x", Dtype::F32, vec![0, 3], vec![]),
        ("dy", Dtype::F32, vec![0, 3], vec![]),
        ("weight", Dtype::F32, vec![3], f32s(&[1.0, 2.0, 3.0])),
        ("bias", Dtype::F32, vec![3], f32s(&[0.0, 0.5, -0.5])),
        ("running_mean", Dtype::F32, vec![3], f32s(&running_mean)),
        ("running_var", Dtype::F32, vec![3], f32s(&running_var)),
        ("expect.y", Dtype::F64, vec![0, 3], vec![]),
        ("expect.dx", Dtype::F64, vec![0, 3], vec![]),
        (
            "expect.running_mean",
            Dtype::F64,
            vec![3],
            f64s(&running_mean.map(f64::from)),
        ),
        (
            "expect.running_var",
            Dtype::F64,
            vec![3],
            f64s(&running_var.map(f64::from)),
        ),
        ("expect.dweight", Dtype::F64, vec![3], f64s(&[0.0; 3])),
        ("expect.dbias", Dtype::F64, vec![3], f64s(&[0.0; 3])),
    ];
    let meta = [
        ("shape", "0,3"),
        ("layout", "channels_first"),
        ("dtype", "f32"),
        ("training", "true"),
        ("momentum", "0.1"),
        ("eps", "1e-05"),
        ("affine", "true"),
        ("track_running_stats", "true"),
        ("num_batches_tracked", "2"),
        ("expect.num_batches_tracked", "3"),
        ("note", "an empty batch: no saved statistics"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let views = tensors.iter().map(|(name, dtype, shape, bytes)| {
        (
            *name,
            TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
        )
    });
    let bytes = safetensors::serialize(views, Some(meta)).unwrap();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("golden-empty-batch");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("empty_batch_train.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let case = Case::load(&path);
    assert!(case.unspecified("save_mean") && !case.unspecified("y"));
    let cases = [case];
    run_all(&cases, "functional", |case, checks| {
        functional::<f32>(case, checks)
    });
    run_all(&cases, "layer", layer::<f32>);
}
