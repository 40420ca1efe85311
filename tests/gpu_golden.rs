//! Every golden case recorded from PyTorch (`../shared/golden` and `BATCHNORM_GOLDEN_DIR`) on the
//! GPU: the layer for batch norm (forward, running statistics, counter, saved statistics,
//! backward) and the functional fold. Needs a CUDA device: run with `--include-ignored`.
//! `-- --nocapture` prints each case with its worst errors.

mod common;

use batchnorm_cuda::gpu::functional::{self, FoldBatchNorm};
use batchnorm_cuda::gpu::{BatchNorm, GpuContext};
use batchnorm_cuda::{reference, Element, Error};
use common::gpu::{download, gpu, upload, zeros};
use common::{
    run_all, tolerance, widen, widen_f32, with_dtype, BnInputs, Case, Checks, FoldInputs, Quantity,
    Stored,
};

/// Element for element the same bits, or both NaN (payloads may differ).
fn same_bits<T: Element>(a: &[T], b: &[T]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            (x.to_f64().is_nan() && y.to_f64().is_nan())
                || bytemuck::bytes_of(x) == bytemuck::bytes_of(y)
        })
}

fn compare(checks: &mut Checks, case: &Case, name: &str, got: Option<Vec<f64>>) {
    checks.compare_golden(case, name, got);
}

/// The GPU layer, built from the case's configuration and state: one forward, one backward.
fn layer<T: Element + Stored>(gpu: &GpuContext, case: &Case, checks: &mut Checks) {
    let BnInputs {
        x,
        dy,
        weight,
        bias,
        running_mean,
        running_var,
    } = case.bn_inputs::<T>();
    let (desc, cfg) = (case.desc(), case.config());
    let mut bn = BatchNorm::new(gpu, cfg).unwrap();
    if let (Some(w), Some(b)) = (&weight, &bias) {
        bn.set_weight(w).unwrap();
        bn.set_bias(b).unwrap();
    }
    if let (Some(mean), Some(var)) = (&running_mean, &running_var) {
        bn.set_running_stats(mean, var).unwrap();
        bn.set_num_batches_tracked(case.num_batches_tracked())
            .unwrap();
    }
    if !case.training() {
        bn.eval();
    }
    // One element more than needed: an empty batch still gets a valid allocation.
    let n = x.len();
    let dx_in = upload(gpu, &[x.as_slice(), &[T::default()]].concat());
    let mut y = zeros::<T>(gpu, n + 1);

    let before = bn.state().unwrap();
    let result = bn.forward(&desc, &dx_in.slice(..n), &mut y.slice_mut(..n));
    if let Some(name) = case.expect_error() {
        match &result {
            Err(e @ Error::SingleValuePerChannel { .. }) if name == "single_value_per_channel" => {
                checks.note(format!("refused: {e}"))
            }
            other => checks.fail(format!("expected error {name}, got {other:?}")),
        }
        if let Some(change) = common::state_change(&before, &bn.state().unwrap()) {
            checks.fail(format!(
                "the refused call changed the layer's state: {change}"
            ));
        }
        return;
    }
    let cache = result.unwrap_or_else(|e| panic!("forward: {e}"));
    compare(checks, case, "y", Some(widen(&download(gpu, &y)[..n])));
    compare(
        checks,
        case,
        "running_mean",
        bn.running_mean().unwrap().as_deref().map(widen_f32),
    );
    compare(
        checks,
        case,
        "running_var",
        bn.running_var().unwrap().as_deref().map(widen_f32),
    );
    if let Some(expected) = case.expect_num_batches_tracked() {
        checks.equal("num_batches_tracked", bn.num_batches_tracked(), expected);
    }
    let saved = bn.saved_stats(&cache).unwrap();
    compare(
        checks,
        case,
        "save_mean",
        saved.as_ref().map(|s| widen_f32(&s.mean)),
    );
    compare(
        checks,
        case,
        "save_invstd",
        saved.as_ref().map(|s| widen_f32(&s.invstd)),
    );
    if let Some(dy) = &dy {
        let ddy = upload(gpu, &[dy.as_slice(), &[T::default()]].concat());
        let mut dx = zeros::<T>(gpu, n + 1);
        bn.zero_grad().unwrap();
        bn.backward(
            &cache,
            &dx_in.slice(..n),
            &ddy.slice(..n),
            Some(dx.slice_mut(..n)),
        )
        .unwrap_or_else(|e| panic!("backward: {e}"));
        compare(checks, case, "dx", Some(widen(&download(gpu, &dx)[..n])));
        compare(
            checks,
            case,
            "dweight",
            bn.grad_weight().unwrap().as_deref().map(widen_f32),
        );
        compare(
            checks,
            case,
            "dbias",
            bn.grad_bias().unwrap().as_deref().map(widen_f32),
        );
    }
}

/// The GPU fold of one golden fold case, into new buffers and in place (bitwise the same).
fn fold<T: Element + Stored>(gpu: &GpuContext, case: &Case, checks: &mut Checks) {
    let FoldInputs {
        weight,
        conv_bias,
        bn_weight,
        bn_bias,
        running_mean,
        running_var,
    } = case.fold_inputs::<T>();
    let spec = case.fold_spec();
    let c_out = spec.c_out();
    let (d_weight, d_conv_bias) = (
        upload(gpu, &weight),
        conv_bias.as_ref().map(|b| upload(gpu, b)),
    );
    let (d_mean, d_var) = (upload(gpu, &running_mean), upload(gpu, &running_var));
    let d_bn_weight = bn_weight.as_ref().map(|w| upload(gpu, w));
    let d_bn_bias = bn_bias.as_ref().map(|b| upload(gpu, b));
    let bn = FoldBatchNorm {
        running_mean: d_mean.as_view(),
        running_var: d_var.as_view(),
        weight: d_bn_weight.as_ref().map(|w| w.as_view()),
        bias: d_bn_bias.as_ref().map(|b| b.as_view()),
        eps: case.eps(),
    };
    let mut out_weight = zeros::<T>(gpu, weight.len());
    let mut out_bias = zeros::<T>(gpu, c_out);
    let conv_bias_view = d_conv_bias.as_ref().map(|b| b.as_view());
    functional::fold(
        gpu,
        &spec,
        Some(&d_weight.as_view()),
        &mut out_weight.as_view_mut(),
        conv_bias_view.as_ref(),
        &mut out_bias.as_view_mut(),
        &bn,
    )
    .unwrap_or_else(|e| panic!("fold: {e}"));
    let (new_weight, new_bias) = (download(gpu, &out_weight), download(gpu, &out_bias));
    let tol = tolerance(case.dtype(), Quantity::Folded);
    checks.compare(case, "weight", Some(widen(&new_weight)), tol);
    checks.compare(case, "bias", Some(widen(&new_bias)), tol);
    // The device computes the reference's double formula (one fma for the bias) and rounds
    // once: the two agree to the bit, whatever nvcc contracts.
    let cpu = reference::fold(
        &spec,
        &weight,
        conv_bias.as_deref(),
        &reference::FoldBatchNorm {
            running_mean: &running_mean,
            running_var: &running_var,
            weight: bn_weight.as_deref(),
            bias: bn_bias.as_deref(),
            eps: case.eps(),
        },
    )
    .unwrap_or_else(|e| panic!("reference fold: {e}"));
    checks.equal(
        "weight == CPU reference, bitwise",
        same_bits(&new_weight, &cpu.weight),
        true,
    );
    checks.equal(
        "bias == CPU reference, bitwise",
        same_bits(&new_bias, &cpu.bias),
        true,
    );

    let mut in_place = upload(gpu, &weight);
    let mut bias_in_place = zeros::<T>(gpu, c_out);
    functional::fold(
        gpu,
        &spec,
        None,
        &mut in_place.as_view_mut(),
        conv_bias_view.as_ref(),
        &mut bias_in_place.as_view_mut(),
        &bn,
    )
    .unwrap_or_else(|e| panic!("fold in place: {e}"));
    checks.equal(
        "in place == new buffers",
        download(gpu, &in_place) == new_weight,
        true,
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_golden_layer() {
    let gpu = gpu();
    run_all(&common::batchnorm_cases(), "gpu layer", |case, checks| {
        with_dtype!(case.dtype(), layer(&gpu, case, checks))
    });
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_golden_fold() {
    let gpu = gpu();
    run_all(&common::fold_cases(), "gpu fold", |case, checks| {
        with_dtype!(case.dtype(), fold(&gpu, case, checks))
    });
}

/// The golden layer cases again on a context with the single-pass forward on: the channels-last
/// and `(N, C)` training cases that fit take it (at least one must), with the golden tolerances
/// unchanged; the refused ones leave the layer as it was.
#[test]
#[ignore = "needs a CUDA device"]
fn gpu_golden_layer_single_pass() {
    let gpu = gpu().with_single_pass_forward(true);
    let cases = common::batchnorm_cases();
    let taken = cases
        .iter()
        .filter(|case| {
            case.training()
                && case.expect_error().is_none()
                && gpu
                    .single_pass_forward_fits(&case.desc(), case.dtype())
                    .unwrap()
        })
        .count();
    println!(
        "{taken} of {} golden cases take the single pass",
        cases.len()
    );
    assert!(taken > 0, "no golden case takes the single pass");
    run_all(&cases, "gpu layer, single pass", |case, checks| {
        with_dtype!(case.dtype(), layer(&gpu, case, checks))
    });
}
