//! Every golden conv / linear + batch-norm fold case through the CPU fold, into new buffers and
//! in place. `cargo test --release --test fold -- --nocapture` prints each case with its worst
//! error.

mod common;

use batchnorm_cuda::fold::{FoldKind, FoldSpec};
use batchnorm_cuda::reference::{self, FoldBatchNorm, Folded};
use batchnorm_cuda::{DType, Element, Error, Layout};
use common::{
    assert_close, run_all, tolerance, widen, with_dtype, Case, Checks, FoldInputs, Quantity, Stored,
};

fn fold_case<T: Element + Stored>(case: &Case, checks: &mut Checks) {
    let spec = case.fold_spec();
    let inputs: FoldInputs<T> = case.fold_inputs();
    let bn = FoldBatchNorm {
        running_mean: &inputs.running_mean,
        running_var: &inputs.running_var,
        weight: inputs.bn_weight.as_deref(),
        bias: inputs.bn_bias.as_deref(),
        eps: case.eps(),
    };
    let folded = reference::fold(&spec, &inputs.weight, inputs.conv_bias.as_deref(), &bn)
        .unwrap_or_else(|e| panic!("fold: {e}"));
    let tol = tolerance(case.dtype(), Quantity::Folded);
    checks.compare(case, "weight", Some(widen(&folded.weight)), tol);
    checks.compare(case, "bias", Some(widen(&folded.bias)), tol);

    // In place, with zeros standing for a missing bias: the same values, bit for bit.
    let mut weight = inputs.weight.clone();
    let mut bias = inputs
        .conv_bias
        .clone()
        .unwrap_or_else(|| vec![T::from_f64(0.0); spec.c_out()]);
    reference::fold_in_place(&spec, &mut weight, &mut bias, &bn)
        .unwrap_or_else(|e| panic!("fold_in_place: {e}"));
    if (Folded { weight, bias }) == folded {
        checks.note("in place identical");
    } else {
        checks.fail("fold_in_place differs from fold");
    }
}

#[test]
fn fold_golden_cases() {
    run_all(&common::fold_cases(), "fold", |case, checks| {
        with_dtype!(case.dtype(), fold_case(case, checks))
    });
}

/// Without affine parameters the batch norm's weight is 1 and its bias 0, and a layer without
/// bias gets `b' = -running_mean * s`: by hand on a 1x1 conv.
#[test]
fn fold_without_affine_or_bias_by_hand() {
    let spec = FoldSpec::new(FoldKind::Conv, &[2, 3, 1, 1], 1, Layout::ChannelsFirst).unwrap();
    let weight = [1.0f32, -2.0, 0.5, 4.0, 0.25, -1.0];
    let (mean, var) = ([0.5f32, -2.0], [3.0f32, 0.0625]);
    let bn = FoldBatchNorm {
        running_mean: &mean,
        running_var: &var,
        weight: None,
        bias: None,
        eps: 1e-3,
    };
    let folded = reference::fold(&spec, &weight, None, &bn).unwrap();

    let s = [
        1.0 / (3.0f64 + 1e-3).sqrt(),
        1.0 / (0.0625f64 + 1e-3).sqrt(),
    ];
    let want_weight: Vec<f64> = weight
        .iter()
        .enumerate()
        .map(|(i, &w)| f64::from(w) * s[i / 3])
        .collect();
    let want_bias = [-0.5 * s[0], 2.0 * s[1]];
    let tol = tolerance(DType::F32, Quantity::Folded);
    // eps is an f32 (1e-3 is not exact), so compare at f32 precision.
    assert_close("weight", &widen(&folded.weight), &want_weight, tol);
    assert_close("bias", &widen(&folded.bias), &want_bias, tol);
}

/// A channels-last weight folds to the channels-last copy of the channels-first fold, for a
/// grouped transposed convolution (the layout PyTorch's own fold gets wrong).
#[test]
fn fold_channels_last_weight_matches_channels_first() {
    let (c_in, c_out_per_group, kernel, groups) = (4, 3, 2 * 2, 2);
    let shape = [c_in, c_out_per_group, 2, 2];
    let first = FoldSpec::new(
        FoldKind::ConvTranspose,
        &shape,
        groups,
        Layout::ChannelsFirst,
    )
    .unwrap();
    let last = FoldSpec::new(
        FoldKind::ConvTranspose,
        &shape,
        groups,
        Layout::ChannelsLast,
    )
    .unwrap();
    let weight: Vec<f32> = (0..first.numel())
        .map(|i| (i as f32 * 0.37).sin())
        .collect();
    // [C_in, C_out/g, K] -> [C_in, K, C_out/g]
    let to_last = |w: &[f32]| {
        let mut out = vec![0.0f32; w.len()];
        for i in 0..c_in {
            for o in 0..c_out_per_group {
                for k in 0..kernel {
                    out[(i * kernel + k) * c_out_per_group + o] =
                        w[(i * c_out_per_group + o) * kernel + k];
                }
            }
        }
        out
    };
    let c_out = first.c_out();
    let (mean, var): (Vec<f32>, Vec<f32>) =
        (0..c_out).map(|o| (o as f32 * 0.1, 1.0 + o as f32)).unzip();
    let (bn_weight, bn_bias): (Vec<f32>, Vec<f32>) =
        (0..c_out).map(|o| (0.5 + o as f32, -(o as f32))).unzip();
    let bias: Vec<f32> = (0..c_out).map(|o| o as f32 * 0.3).collect();
    let bn = FoldBatchNorm {
        running_mean: &mean,
        running_var: &var,
        weight: Some(&bn_weight),
        bias: Some(&bn_bias),
        eps: 1e-5,
    };
    let a = reference::fold(&first, &weight, Some(&bias), &bn).unwrap();
    let b = reference::fold(&last, &to_last(&weight), Some(&bias), &bn).unwrap();
    assert_eq!(b.weight, to_last(&a.weight));
    assert_eq!(b.bias, a.bias);
    // Every output channel got its own scale: column o of group g is channel g * 3 + o.
    for o in 0..c_out {
        let (g, col) = (o / c_out_per_group, o % c_out_per_group);
        let i = ((g * (c_in / groups)) * c_out_per_group + col) * kernel;
        let s = f64::from(bn_weight[o]) / (f64::from(var[o]) + f64::from(1e-5f32)).sqrt();
        assert_close(
            "scale",
            &[f64::from(a.weight[i])],
            &[f64::from(weight[i]) * s],
            tolerance(DType::F32, Quantity::Folded),
        );
    }
}

#[test]
fn fold_refuses_wrong_lengths() {
    let spec = FoldSpec::new(FoldKind::Linear, &[3, 2], 1, Layout::ChannelsFirst).unwrap();
    let (mean, var) = ([0.0f32; 3], [1.0f32; 3]);
    let bn = FoldBatchNorm {
        running_mean: &mean,
        running_var: &var,
        weight: None,
        bias: None,
        eps: 1e-5,
    };
    let got = reference::fold(&spec, &[1.0f32; 5], None, &bn);
    assert!(matches!(
        got,
        Err(Error::BufferLength {
            what: "weight",
            needed: 6,
            got: 5
        })
    ));
    let got = reference::fold(&spec, &[1.0f32; 6], Some(&[0.0; 2]), &bn);
    assert!(matches!(
        got,
        Err(Error::BufferLength {
            what: "conv_bias",
            needed: 3,
            got: 2
        })
    ));
    let short = FoldBatchNorm {
        running_var: &var[..1],
        ..bn
    };
    let got = reference::fold(&spec, &[1.0f32; 6], None, &short);
    assert!(matches!(
        got,
        Err(Error::BufferLength {
            what: "bn.running_var",
            ..
        })
    ));
    let bad_eps = FoldBatchNorm {
        eps: f32::NAN,
        ..bn
    };
    assert!(matches!(
        reference::fold(&spec, &[1.0f32; 6], None, &bad_eps),
        Err(Error::InvalidEps { .. })
    ));
}

/// The fold rounds its double result to a half type once: weight and bias land just past a
/// midpoint (`common::fold_halfway`), where rounding through f32 would tie down to 1.
#[test]
fn fold_rounds_once_past_a_half_way_point() {
    fn check<T: Element>() {
        let case = common::fold_halfway(T::DTYPE);
        let spec = FoldSpec::new(FoldKind::Conv, &[1, 1, 1, 1], 1, Layout::ChannelsFirst).unwrap();
        let bn = FoldBatchNorm {
            running_mean: &case.running_mean,
            running_var: &case.running_var,
            weight: Some(&case.bn_weight),
            bias: Some(&case.bn_bias),
            eps: case.eps,
        };
        let folded = reference::fold(&spec, &[T::from_f64(1.0)], None, &bn).unwrap();
        let got = (folded.weight[0].to_f64(), folded.bias[0].to_f64());
        assert_eq!(got, (case.expected, case.expected), "{}", T::DTYPE);
    }
    check::<half::f16>();
    check::<half::bf16>();
}
