//! Properties of the CPU reference that need no recorded data: finite-difference gradients, the
//! literature's worked example computed by hand, layouts, NaN isolation, large means, awkward
//! sizes, the cumulative average, refused calls, and the layer against the functional API.

mod common;

use batchnorm_cuda::reference::{
    self, exact, BatchNorm, CachedStats, Gradients, RunningStats, RunningUpdate, SavedStats,
};
use batchnorm_cuda::{
    BatchNormConfig, DType, Element, Error, Layout, RunningVarUpdate, TensorDesc,
};
use common::{assert_close, widen, widen_f32, with_dtype, Tol};
use half::f16;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// ----- helpers -----

fn desc(dims: &[usize], layout: Layout) -> TensorDesc {
    TensorDesc::new(dims, layout).unwrap()
}

/// Seeded values `mean + spread * u`, `u` uniform in [-1, 1).
fn random_f64(seed: u64, len: usize, mean: f64, spread: f64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len)
        .map(|_| mean + spread * rng.random_range(-1.0..1.0))
        .collect()
}

fn random<T: Element>(seed: u64, len: usize, mean: f64, spread: f64) -> Vec<T> {
    random_f64(seed, len, mean, spread)
        .into_iter()
        .map(T::from_f64)
        .collect()
}

fn random_f32(seed: u64, len: usize, lo: f32, hi: f32) -> Vec<f32> {
    random_f64(
        seed,
        len,
        f64::from(lo + hi) / 2.0,
        f64::from(hi - lo) / 2.0,
    )
    .into_iter()
    .map(|v| v as f32)
    .collect()
}

/// Memory offset of logical element `(n, c, s)` (`s` the flattened spatial index), written out
/// independently of the crate's `Geometry`.
fn offset(dims: &[usize], layout: Layout, n: usize, c: usize, s: usize) -> usize {
    let (channels, spatial) = (dims[1], dims[2..].iter().product::<usize>());
    match layout {
        Layout::ChannelsFirst => (n * channels + c) * spatial + s,
        Layout::ChannelsLast => (n * spatial + s) * channels + c,
    }
}

/// The same logical tensor stored in another layout.
fn relayout<T: Copy>(values: &[T], dims: &[usize], from: Layout, to: Layout) -> Vec<T> {
    let mut out = values.to_vec();
    let spatial: usize = dims[2..].iter().product();
    for n in 0..dims[0] {
        for c in 0..dims[1] {
            for s in 0..spatial {
                out[offset(dims, to, n, c, s)] = values[offset(dims, from, n, c, s)];
            }
        }
    }
    out
}

/// The values of channel `c`, by logical index.
fn channel_values<T: Copy>(values: &[T], dims: &[usize], layout: Layout, c: usize) -> Vec<T> {
    let spatial: usize = dims[2..].iter().product();
    (0..dims[0])
        .flat_map(|n| (0..spatial).map(move |s| values[offset(dims, layout, n, c, s)]))
        .collect()
}

/// Textbook mean and biased variance in f64.
fn mean_var(values: &[f64]) -> (f64, f64) {
    let m = values.len() as f64;
    let mean = values.iter().sum::<f64>() / m;
    (
        mean,
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / m,
    )
}

const F32_TIGHT: Tol = Tol::Elementwise {
    atol: 1e-6,
    rtol: 1e-6,
};

/// One training forward and backward through the functional API, everything returned.
struct Training<T> {
    y: Vec<T>,
    saved: SavedStats,
    running_mean: Vec<f32>,
    running_var: Vec<f32>,
    dx: Vec<T>,
    dweight: Vec<f32>,
    dbias: Vec<f32>,
}

fn train_step<T: Element>(
    x: &[T],
    dy: &[T],
    desc: &TensorDesc,
    weight: &[f32],
    bias: &[f32],
) -> Training<T> {
    let c = desc.channels();
    let (mut running_mean, mut running_var) = (vec![0.5f32; c], vec![2.0f32; c]);
    let mut y = vec![T::default(); x.len()];
    let running = RunningUpdate::pytorch(&mut running_mean, &mut running_var, 0.1);
    let saved = reference::forward_training(
        x,
        desc,
        Some(weight),
        Some(bias),
        Some(running),
        1e-5,
        &mut y,
    )
    .unwrap();
    let (mut dx, mut dweight, mut dbias) =
        (vec![T::default(); x.len()], vec![0.0; c], vec![0.0; c]);
    let grads = Gradients {
        dx: Some(&mut dx),
        dweight: Some(&mut dweight),
        dbias: Some(&mut dbias),
        accumulate: false,
    };
    reference::backward_training(x, dy, desc, Some(weight), &saved, grads).unwrap();
    Training {
        y,
        saved,
        running_mean,
        running_var,
        dx,
        dweight,
        dbias,
    }
}

// ----- gradients -----

/// `L = sum(y * g)`: its gradient is the backward with `dy = g`.
fn loss(x: &[f64], desc: &TensorDesc, weight: &[f64], bias: &[f64], g: &[f64]) -> f64 {
    let (y, _) = exact::forward_training(x, desc, weight, bias, 1e-5).unwrap();
    y.iter().zip(g).map(|(y, g)| y * g).sum()
}

/// Central difference of `loss` along one coordinate of `values`, perturbed through `at`.
fn central_difference(values: &[f64], i: usize, at: impl Fn(&[f64]) -> f64) -> f64 {
    let h = 1e-5 * values[i].abs().max(1.0);
    let mut shifted = values.to_vec();
    shifted[i] = values[i] + h;
    let plus = at(&shifted);
    shifted[i] = values[i] - h;
    let minus = at(&shifted);
    (plus - minus) / (2.0 * h)
}

#[test]
fn gradients_match_central_differences() {
    let shapes: [&[usize]; 4] = [&[5, 3], &[3, 2, 4], &[2, 3, 2, 3], &[2, 2, 2, 1, 3]];
    for (seed, dims) in shapes.iter().enumerate() {
        for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
            let d = desc(dims, layout);
            let c = d.channels();
            let seed = seed as u64 * 10;
            let x = random_f64(seed, d.numel(), 0.5, 2.0);
            let g = random_f64(seed + 1, d.numel(), 0.0, 1.0);
            let weight = random_f64(seed + 2, c, 1.0, 0.5);
            let bias = random_f64(seed + 3, c, 0.0, 1.0);

            let (_, stats) = exact::forward_training(&x, &d, &weight, &bias, 1e-5).unwrap();
            let grads = exact::backward_training(&x, &g, &d, &weight, &stats).unwrap();

            let numeric_dx: Vec<f64> = (0..x.len())
                .map(|i| central_difference(&x, i, |x| loss(x, &d, &weight, &bias, &g)))
                .collect();
            let numeric_dw: Vec<f64> = (0..c)
                .map(|i| central_difference(&weight, i, |w| loss(&x, &d, w, &bias, &g)))
                .collect();
            let numeric_db: Vec<f64> = (0..c)
                .map(|i| central_difference(&bias, i, |b| loss(&x, &d, &weight, b, &g)))
                .collect();
            let tol = Tol::OfMax {
                atol: 1e-8,
                rtol: 1e-6,
            };
            let what = format!("{d}");
            assert_close(&format!("{what} dx"), &grads.dx, &numeric_dx, tol);
            assert_close(&format!("{what} dweight"), &grads.dweight, &numeric_dw, tol);
            assert_close(&format!("{what} dbias"), &grads.dbias, &numeric_db, tol);
        }
    }
}

// ----- the worked example -----

/// x = [1, 2, 3, 4], gamma 1, beta 0, fresh running statistics: mean 2.5, biased variance 1.25,
/// y = (x - 2.5) / sqrt(1.25 + eps), running_mean 0.25, running_var 0.9 + 0.1 * 5/3.
#[test]
fn four_values_worked_example() {
    let x = [1.0f32, 2.0, 3.0, 4.0];
    let d = desc(&[4, 1], Layout::ChannelsFirst);
    let mut bn = BatchNorm::new(BatchNormConfig::new(1)).unwrap();
    let (y, cache) = bn.forward(&x, &d).unwrap();

    let invstd = 1.0 / (1.25f64 + 1e-5).sqrt();
    let by_hand: Vec<f64> = x.iter().map(|&v| (f64::from(v) - 2.5) * invstd).collect();
    assert_close("y", &widen(&y), &by_hand, F32_TIGHT);
    // The values the literature prints.
    assert_close(
        "y",
        &widen(&y),
        &[-1.3416, -0.4472, 0.4472, 1.3416],
        Tol::Elementwise {
            atol: 1e-4,
            rtol: 0.0,
        },
    );
    let CachedStats::Batch(saved) = cache.stats() else {
        panic!("training forward must cache batch stats")
    };
    assert_eq!(saved.mean, [2.5]);
    assert_close("invstd", &widen_f32(&saved.invstd), &[invstd], F32_TIGHT);
    assert_close(
        "running_mean",
        &widen_f32(bn.running_mean().unwrap()),
        &[0.25],
        F32_TIGHT,
    );
    let running_var = 0.9 + 0.1 * 5.0 / 3.0;
    assert_close(
        "running_var",
        &widen_f32(bn.running_var().unwrap()),
        &[running_var],
        F32_TIGHT,
    );
    assert_eq!(bn.num_batches_tracked(), 1);

    // Eval now normalizes with the running statistics.
    bn.eval();
    let (y, _) = bn.forward(&x, &d).unwrap();
    let eval_invstd = 1.0 / (f64::from(bn.running_var().unwrap()[0]) + 1e-5).sqrt();
    let by_hand: Vec<f64> = x
        .iter()
        .map(|&v| (f64::from(v) - 0.25) * eval_invstd)
        .collect();
    assert_close("eval y", &widen(&y), &by_hand, F32_TIGHT);
    assert_eq!(bn.num_batches_tracked(), 1);

    // Keras' variance update takes the biased variance: 0.9 + 0.1 * 1.25.
    let cfg = BatchNormConfig::new(1).running_var_update(RunningVarUpdate::Biased);
    let mut keras = BatchNorm::new(cfg).unwrap();
    keras.forward(&x, &d).unwrap();
    assert_close(
        "biased running_var",
        &widen_f32(keras.running_var().unwrap()),
        &[0.9 + 0.125],
        F32_TIGHT,
    );
}

/// Eval backward by hand: `dx = dy * w / sqrt(rv + eps)`, `dweight = sum(dy * xhat)`.
#[test]
fn eval_backward_by_hand() {
    let d = desc(&[3, 2], Layout::ChannelsFirst);
    let x = [1.0f32, -2.0, 0.5, 4.0, -1.5, 3.0];
    let dy = [0.25f32, 1.0, -0.5, 2.0, 1.5, -1.0];
    let (weight, mean, var) = ([2.0f32, -0.5], [0.5f32, 1.0], [4.0f32, 0.25]);
    let (mut dx, mut dweight, mut dbias) = ([0.0f32; 6], [0.0f32; 2], [0.0f32; 2]);
    let grads = Gradients {
        dx: Some(&mut dx),
        dweight: Some(&mut dweight),
        dbias: Some(&mut dbias),
        accumulate: false,
    };
    let running = RunningStats {
        mean: &mean,
        var: &var,
    };
    reference::backward_inference(&x, &dy, &d, Some(&weight), running, 1e-5, grads).unwrap();

    let inv = |c: usize| 1.0 / (f64::from(var[c]) + 1e-5).sqrt();
    let dx_by_hand: Vec<f64> = (0..6)
        .map(|i| f64::from(dy[i]) * f64::from(weight[i % 2]) * inv(i % 2))
        .collect();
    let (mut dw_by_hand, mut db_by_hand) = ([0.0f64; 2], [0.0f64; 2]);
    for i in 0..6 {
        let c = i % 2;
        dw_by_hand[c] += f64::from(dy[i]) * (f64::from(x[i]) - f64::from(mean[c])) * inv(c);
        db_by_hand[c] += f64::from(dy[i]);
    }
    assert_close("dx", &widen(&dx), &dx_by_hand, F32_TIGHT);
    assert_close("dweight", &widen_f32(&dweight), &dw_by_hand, F32_TIGHT);
    assert_close("dbias", &widen_f32(&dbias), &db_by_hand, F32_TIGHT);
}

// ----- properties -----

#[test]
fn channels_first_and_channels_last_agree() {
    let shapes: [&[usize]; 4] = [&[6, 5], &[4, 3, 7], &[3, 5, 4, 6], &[2, 3, 2, 3, 4]];
    for (seed, dims) in shapes.iter().enumerate() {
        let (cf, cl) = (
            desc(dims, Layout::ChannelsFirst),
            desc(dims, Layout::ChannelsLast),
        );
        let c = cf.channels();
        let x: Vec<f32> = random(seed as u64, cf.numel(), 1.0, 3.0);
        let dy: Vec<f32> = random(seed as u64 + 1, cf.numel(), 0.0, 1.0);
        let (weight, bias) = (random_f32(7, c, 0.5, 1.5), random_f32(8, c, -1.0, 1.0));
        let first = train_step(&x, &dy, &cf, &weight, &bias);
        let to_cl = |v: &[f32]| relayout(v, dims, Layout::ChannelsFirst, Layout::ChannelsLast);
        let last = train_step(&to_cl(&x), &to_cl(&dy), &cl, &weight, &bias);

        let back = |v: &[f32]| {
            widen_f32(&relayout(
                v,
                dims,
                Layout::ChannelsLast,
                Layout::ChannelsFirst,
            ))
        };
        assert_close("y", &back(&last.y), &widen_f32(&first.y), F32_TIGHT);
        assert_close("dx", &back(&last.dx), &widen_f32(&first.dx), F32_TIGHT);
        for (what, a, b) in [
            ("mean", &last.saved.mean, &first.saved.mean),
            ("invstd", &last.saved.invstd, &first.saved.invstd),
            ("running_mean", &last.running_mean, &first.running_mean),
            ("running_var", &last.running_var, &first.running_var),
            ("dweight", &last.dweight, &first.dweight),
            ("dbias", &last.dbias, &first.dbias),
        ] {
            assert_close(what, &widen_f32(a), &widen_f32(b), F32_TIGHT);
        }
    }
}

#[test]
fn dx_sums_to_zero_over_each_channel() {
    for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
        let dims = [4, 3, 5, 6];
        let d = desc(&dims, layout);
        let x: Vec<f32> = random(1, d.numel(), 2.0, 3.0);
        let dy: Vec<f32> = random(2, d.numel(), 0.5, 1.0);
        let step = train_step(&x, &dy, &d, &[1.5, 0.5, 2.0], &[0.0, 1.0, -1.0]);
        for c in 0..3 {
            let dx = widen_f32(&channel_values(&step.dx, &dims, layout, c));
            let (sum, scale) = (
                dx.iter().sum::<f64>(),
                dx.iter().map(|v| v.abs()).sum::<f64>(),
            );
            assert!(
                sum.abs() <= 1e-6 * scale,
                "{layout} channel {c}: sum(dx) = {sum:e}, sum|dx| = {scale:e}"
            );
            assert!(scale > 1.0, "dx must not vanish");
        }
    }
}

/// A constant channel has variance 0: `y = (x - mean) * a + bias` is `bias` exactly.
fn constant_channel<T: Element>() {
    for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
        let dims = [3, 3, 4, 5];
        let d = desc(&dims, layout);
        let mut x: Vec<T> = random(3, d.numel(), 0.0, 2.0);
        for n in 0..3 {
            for s in 0..20 {
                x[offset(&dims, layout, n, 1, s)] = T::from_f64(3.7);
            }
        }
        let (weight, bias) = ([2.5f32, 2.5, 2.5], [0.1f32, -0.75, 0.3]);
        let mut y = vec![T::default(); x.len()];
        reference::forward_training(&x, &d, Some(&weight), Some(&bias), None, 1e-5, &mut y)
            .unwrap();
        for v in channel_values(&y, &dims, layout, 1) {
            assert_eq!(v, T::from_f64(-0.75), "{:?} {layout}", T::DTYPE);
        }
    }
}

#[test]
fn constant_channel_gives_bias_exactly() {
    for dtype in DType::ALL {
        with_dtype!(dtype, constant_channel());
    }
}

#[test]
fn nan_and_inf_stay_in_their_channel() {
    for bad in [f32::NAN, f32::INFINITY] {
        for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
            let dims = [4, 3, 5];
            let d = desc(&dims, layout);
            let clean: Vec<f32> = random(4, d.numel(), 1.0, 2.0);
            let mut dirty = clean.clone();
            dirty[offset(&dims, layout, 2, 1, 3)] = bad;
            let dy: Vec<f32> = random(5, d.numel(), 0.0, 1.0);
            let (weight, bias) = ([1.0f32, 2.0, 3.0], [0.5f32, 0.5, 0.5]);
            let (a, b) = (
                train_step(&clean, &dy, &d, &weight, &bias),
                train_step(&dirty, &dy, &d, &weight, &bias),
            );
            let what = format!("{bad} {layout}");
            for c in [0, 2] {
                for (got, want) in [(&b.y, &a.y), (&b.dx, &a.dx)] {
                    let (got, want) = (
                        channel_values(got, &dims, layout, c),
                        channel_values(want, &dims, layout, c),
                    );
                    assert_eq!(widen_f32(&got), widen_f32(&want), "{what} channel {c}");
                }
                for (got, want) in [
                    (&b.running_mean, &a.running_mean),
                    (&b.running_var, &a.running_var),
                ] {
                    assert_eq!(got[c], want[c], "{what} channel {c}");
                }
                assert_eq!(
                    (b.dweight[c], b.dbias[c]),
                    (a.dweight[c], a.dbias[c]),
                    "{what} channel {c}"
                );
            }
            assert!(
                channel_values(&b.y, &dims, layout, 1)
                    .iter()
                    .all(|v| v.is_nan()),
                "{what}"
            );
            assert!(
                channel_values(&b.dx, &dims, layout, 1)
                    .iter()
                    .all(|v| v.is_nan()),
                "{what}"
            );
            assert!(b.running_var[1].is_nan() && b.dweight[1].is_nan(), "{what}");
        }
    }
}

/// 1000 +- 0.1 in f32: E[x^2] - E[x]^2 would lose every digit of the variance.
#[test]
fn large_mean_keeps_the_variance() {
    for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
        let d = desc(&[64, 2, 3], layout);
        let (hi, lo) = (1000.1f32, 999.9f32);
        let x: Vec<f32> = (0..d.numel())
            .map(|i| if (i / 2) % 2 == 0 { hi } else { lo })
            .collect();
        let mut y = vec![0.0f32; x.len()];
        let saved = reference::forward_training(&x, &d, None, None, None, 1e-5, &mut y).unwrap();
        // Half the values of every channel are `hi`, half `lo` (checked below), so
        // mean = (hi + lo) / 2 and the biased variance is ((hi - lo) / 2)^2.
        let (hi, lo) = (f64::from(hi), f64::from(lo));
        for c in 0..2 {
            let values = widen_f32(&channel_values(&x, &[64, 2, 3], layout, c));
            assert_eq!(
                values.iter().filter(|&&v| v == hi).count(),
                values.len() / 2
            );
        }
        let (mean, var) = ((hi + lo) / 2.0, ((hi - lo) / 2.0).powi(2));
        let invstd = 1.0 / (var + 1e-5).sqrt();
        assert_close("mean", &widen_f32(&saved.mean), &[mean; 2], F32_TIGHT);
        assert_close("invstd", &widen_f32(&saved.invstd), &[invstd; 2], F32_TIGHT);
        let by_hand: Vec<f64> = x.iter().map(|&v| (f64::from(v) - mean) * invstd).collect();
        assert_close("y", &widen_f32(&y), &by_hand, F32_TIGHT);
    }
}

/// Channels and batch sizes around block and warp boundaries, against a textbook computation.
#[test]
fn awkward_sizes_match_the_textbook() {
    for c in [1, 3, 17, 1001] {
        for m in [2, 7, 33, 65] {
            for (dims, layout) in [
                (vec![m, c], Layout::ChannelsFirst),
                (vec![1, c, m], Layout::ChannelsFirst),
                (vec![1, c, m], Layout::ChannelsLast),
            ] {
                let d = desc(&dims, layout);
                let x: Vec<f32> = random((c * 100 + m) as u64, d.numel(), 3.0, 2.0);
                let (weight, bias) = (random_f32(1, c, 0.5, 2.0), random_f32(2, c, -1.0, 1.0));
                let mut y = vec![0.0f32; x.len()];
                let (mut rm, mut rv) = (vec![0.0f32; c], vec![1.0f32; c]);
                let running = RunningUpdate::pytorch(&mut rm, &mut rv, 0.1);
                let saved = reference::forward_training(
                    &x,
                    &d,
                    Some(&weight),
                    Some(&bias),
                    Some(running),
                    1e-5,
                    &mut y,
                )
                .unwrap();

                let mut want_y = vec![0.0f64; x.len()];
                let (mut want_mean, mut want_invstd, mut want_rm, mut want_rv) =
                    (vec![], vec![], vec![], vec![]);
                for ch in 0..c {
                    let (mean, var) = mean_var(&widen_f32(&channel_values(&x, &dims, layout, ch)));
                    let invstd = 1.0 / (var + 1e-5).sqrt();
                    for s in 0..m {
                        let (n, s) = if dims.len() == 2 { (s, 0) } else { (0, s) };
                        let i = offset(&dims, layout, n, ch, s);
                        want_y[i] = (f64::from(x[i]) - mean) * invstd * f64::from(weight[ch])
                            + f64::from(bias[ch]);
                    }
                    want_mean.push(mean);
                    want_invstd.push(invstd);
                    want_rm.push(0.1 * mean);
                    want_rv.push(0.9 + 0.1 * var * m as f64 / (m - 1) as f64);
                }
                let what = format!("{d}");
                assert_close(&what, &widen_f32(&y), &want_y, F32_TIGHT);
                assert_close(&what, &widen_f32(&saved.mean), &want_mean, F32_TIGHT);
                assert_close(&what, &widen_f32(&saved.invstd), &want_invstd, F32_TIGHT);
                assert_close(&what, &widen_f32(&rm), &want_rm, F32_TIGHT);
                assert_close(&what, &widen_f32(&rv), &want_rv, F32_TIGHT);
            }
        }
    }
}

/// With `momentum = None` the running statistics after k steps are the plain averages of the k
/// batch statistics (the first step's factor 1 wipes the initial state).
#[test]
fn cumulative_average_is_the_plain_mean_of_batches() {
    let dims = [6, 2, 5];
    let d = desc(&dims, Layout::ChannelsFirst);
    let mut bn = BatchNorm::new(BatchNormConfig::new(2).momentum(None)).unwrap();
    let k = 5;
    let (mut means, mut vars) = (vec![0.0f64; 2], vec![0.0f64; 2]);
    for step in 0..k {
        let x: Vec<f32> = random(step, d.numel(), step as f64, 1.0 + step as f64);
        bn.forward(&x, &d).unwrap();
        for c in 0..2 {
            let (mean, var) = mean_var(&widen_f32(&channel_values(
                &x,
                &dims,
                Layout::ChannelsFirst,
                c,
            )));
            means[c] += mean / k as f64;
            vars[c] += var * 30.0 / 29.0 / k as f64;
        }
    }
    assert_eq!(bn.num_batches_tracked(), k);
    let tol = Tol::Elementwise {
        atol: 1e-6,
        rtol: 1e-5,
    };
    assert_close(
        "running_mean",
        &widen_f32(bn.running_mean().unwrap()),
        &means,
        tol,
    );
    assert_close(
        "running_var",
        &widen_f32(bn.running_var().unwrap()),
        &vars,
        tol,
    );
}

#[test]
fn accumulate_adds_parameter_gradients() {
    let d = desc(&[4, 3, 5], Layout::ChannelsFirst);
    let x: Vec<f32> = random(1, d.numel(), 0.0, 1.0);
    let dy: Vec<f32> = random(2, d.numel(), 0.0, 1.0);
    let mut y = vec![0.0f32; x.len()];
    let saved = reference::forward_training(&x, &d, None, None, None, 1e-5, &mut y).unwrap();
    let (mut dweight, mut dbias) = ([0.0f32; 3], [0.0f32; 3]);
    for accumulate in [false, true] {
        let grads = Gradients {
            dx: None,
            dweight: Some(&mut dweight),
            dbias: Some(&mut dbias),
            accumulate,
        };
        reference::backward_training(&x, &dy, &d, None, &saved, grads).unwrap();
    }
    let (mut once_w, mut once_b) = ([0.0f32; 3], [0.0f32; 3]);
    let grads = Gradients {
        dx: None,
        dweight: Some(&mut once_w),
        dbias: Some(&mut once_b),
        accumulate: false,
    };
    reference::backward_training(&x, &dy, &d, None, &saved, grads).unwrap();
    let twice = |v: &[f32]| v.iter().map(|&v| 2.0 * f64::from(v)).collect::<Vec<_>>();
    assert_close("dweight", &widen_f32(&dweight), &twice(&once_w), F32_TIGHT);
    assert_close("dbias", &widen_f32(&dbias), &twice(&once_b), F32_TIGHT);
    assert!(once_b.iter().all(|&v| v != 0.0));
}

// ----- edge cases and refused calls -----

fn state(bn: &BatchNorm) -> Vec<u32> {
    let buffers = [bn.weight(), bn.bias(), bn.running_mean(), bn.running_var()];
    let mut bits: Vec<u32> = buffers
        .iter()
        .flatten()
        .flat_map(|b| b.iter().map(|v| v.to_bits()))
        .collect();
    bits.push(bn.num_batches_tracked() as u32);
    bits
}

fn trained_layer(c: usize) -> BatchNorm {
    let mut bn = BatchNorm::new(BatchNormConfig::new(c)).unwrap();
    bn.set_weight(&random_f32(1, c, 0.5, 1.5)).unwrap();
    bn.set_bias(&random_f32(2, c, -1.0, 1.0)).unwrap();
    let d = desc(&[4, c, 3], Layout::ChannelsFirst);
    bn.forward(&random::<f32>(3, d.numel(), 1.0, 1.0), &d)
        .unwrap();
    bn
}

#[test]
fn empty_batch_gives_empty_output_and_counts() {
    let mut bn = trained_layer(3);
    let before = state(&bn);
    let d = desc(&[0, 3, 4], Layout::ChannelsLast);
    let (y, cache) = bn.forward::<f16>(&[], &d).unwrap();
    assert!(y.is_empty());
    assert_eq!(
        bn.num_batches_tracked(),
        2,
        "the counter counts an empty batch"
    );
    let mut after = state(&bn);
    *after.last_mut().unwrap() -= 1;
    assert_eq!(after, before, "statistics untouched");
    let grads = bn.backward::<f16>(&cache, &[], &[]).unwrap();
    assert!(grads.dx.is_empty());
    assert_eq!(grads.dweight.unwrap(), [0.0; 3]);
}

#[test]
fn one_value_per_channel_fails_in_training_only() {
    let d = desc(&[1, 3], Layout::ChannelsFirst);
    let x = [1.0f32, 2.0, 3.0];
    let mut bn = trained_layer(3);
    let before = state(&bn);
    assert!(matches!(
        bn.forward(&x, &d),
        Err(Error::SingleValuePerChannel { .. })
    ));
    assert_eq!(state(&bn), before);
    bn.eval();
    let (y, _) = bn.forward(&x, &d).unwrap();
    assert!(y.iter().all(|v| v.is_finite()), "eval with N = 1 works");
    // Without running statistics eval uses batch statistics, so the same rule applies.
    let mut untracked = BatchNorm::new(BatchNormConfig::new(3).track_running_stats(false)).unwrap();
    untracked.eval();
    assert!(matches!(
        untracked.forward(&x, &d),
        Err(Error::SingleValuePerChannel { .. })
    ));
    // M = 2 works and uses the factor 2 for the unbiased variance: values 0 and 2 have biased
    // variance 1, unbiased 2, so running_var = 0.9 + 0.1 * 2.
    let mut fresh = BatchNorm::new(BatchNormConfig::new(1)).unwrap();
    fresh
        .forward(&[0.0f32, 2.0], &desc(&[2, 1], Layout::ChannelsFirst))
        .unwrap();
    assert_close(
        "running_var",
        &widen_f32(fresh.running_var().unwrap()),
        &[1.1],
        F32_TIGHT,
    );
}

#[test]
fn refused_calls_leave_the_layer_untouched() {
    let mut bn = trained_layer(3);
    let before = state(&bn);
    let d = desc(&[2, 3, 4], Layout::ChannelsFirst);
    let x: Vec<f32> = random(9, d.numel(), 0.0, 1.0);
    assert!(matches!(
        bn.forward(&x[1..], &d),
        Err(Error::BufferLength {
            what: "x",
            needed: 24,
            got: 23
        })
    ));
    let wrong_channels = desc(&[2, 4, 3], Layout::ChannelsFirst);
    assert!(matches!(
        bn.forward(&x, &wrong_channels),
        Err(Error::ChannelMismatch {
            expected: 3,
            got: 4
        })
    ));
    assert!(matches!(
        bn.set_weight(&[1.0; 2]),
        Err(Error::BufferLength { what: "weight", .. })
    ));
    assert!(matches!(
        bn.set_running_var(&[1.0, f32::NAN, 1.0]),
        Err(Error::InvalidRunningVar { channel: 1, .. })
    ));
    assert!(matches!(
        bn.set_running_var(&[1.0, 1.0, -2.0]),
        Err(Error::InvalidRunningVar { channel: 2, .. })
    ));
    // Both at once, in the GPU layer's order: lengths, the variance, then the buffers.
    assert!(matches!(
        bn.set_running_stats(&[0.0; 2], &[f32::NAN; 3]),
        Err(Error::BufferLength {
            what: "running_mean",
            ..
        })
    ));
    assert!(matches!(
        bn.set_running_stats(&[0.0; 3], &[1.0, -1.0, 1.0]),
        Err(Error::InvalidRunningVar { channel: 1, .. })
    ));
    assert_eq!(state(&bn), before);

    let (_, cache) = bn.forward(&x, &d).unwrap();
    assert!(matches!(
        bn.backward(&cache, &x, &x[..5]),
        Err(Error::BufferLength { what: "dy", .. })
    ));

    let mut plain = BatchNorm::new(
        BatchNormConfig::new(3)
            .affine(false)
            .track_running_stats(false),
    )
    .unwrap();
    assert!(matches!(
        plain.set_weight(&[1.0; 3]),
        Err(Error::NotAffine { .. })
    ));
    assert!(matches!(
        plain.set_running_mean(&[0.0; 3]),
        Err(Error::NoRunningStats { .. })
    ));
    assert!(matches!(
        plain.set_running_stats(&[0.0; 3], &[1.0; 3]),
        Err(Error::NoRunningStats {
            what: "set_running_stats"
        })
    ));
    assert!(matches!(
        plain.set_num_batches_tracked(3),
        Err(Error::NoRunningStats { .. })
    ));
    plain.forward(&x, &d).unwrap();
    assert_eq!(
        plain.num_batches_tracked(),
        0,
        "no counter without running statistics"
    );
    assert!(plain.weight().is_none() && plain.running_var().is_none());
}

#[test]
fn functional_calls_validate_everything_first() {
    let d = desc(&[2, 3, 4], Layout::ChannelsFirst);
    let x = vec![1.0f32; d.numel()];
    let mut y = vec![7.0f32; d.numel()];
    let (mut rm, mut rv) = ([0.5f32; 3], [2.0f32; 3]);
    let running = RunningUpdate::pytorch(&mut rm, &mut rv, 1.5);
    let got = reference::forward_training(&x, &d, None, None, Some(running), 1e-5, &mut y);
    assert!(matches!(got, Err(Error::InvalidMomentum { .. })));
    let running = RunningUpdate::pytorch(&mut rm, &mut rv[..2], 0.1);
    let got = reference::forward_training(&x, &d, None, None, Some(running), 1e-5, &mut y);
    assert!(matches!(
        got,
        Err(Error::BufferLength {
            what: "running_var",
            needed: 3,
            got: 2
        })
    ));
    let got = reference::forward_training(&x, &d, None, Some(&[0.0; 3]), None, -1.0, &mut y);
    assert!(matches!(got, Err(Error::InvalidEps { .. })));
    assert!(
        y.iter().all(|&v| v == 7.0) && rm == [0.5; 3] && rv == [2.0; 3],
        "nothing written"
    );

    let saved = SavedStats {
        mean: vec![0.0; 3],
        mean_lo: vec![0.0; 3],
        invstd: vec![1.0; 2],
    };
    let grads = Gradients::<f32> {
        dx: None,
        dweight: None,
        dbias: None,
        accumulate: false,
    };
    let got = reference::backward_training(&x, &x, &d, None, &saved, grads);
    assert!(matches!(
        got,
        Err(Error::BufferLength {
            what: "save_invstd",
            ..
        })
    ));
    let got = exact::forward_training(
        &[1.0; 3],
        &desc(&[1, 3], Layout::ChannelsFirst),
        &[1.0; 3],
        &[0.0; 3],
        1e-5,
    );
    assert!(matches!(got, Err(Error::SingleValuePerChannel { .. })));
}

// ----- the layer against the functional API -----

fn layer_matches_functional_for<T: Element>(
    dims: &[usize],
    layout: Layout,
    cfg: BatchNormConfig,
    training: bool,
) {
    let d = desc(dims, layout);
    let c = d.channels();
    let x: Vec<T> = random(11, d.numel(), 0.5, 2.0);
    let dy: Vec<T> = random(12, d.numel(), 0.0, 1.0);
    let mut bn = BatchNorm::new(cfg).unwrap();
    let (weight, bias) = (random_f32(13, c, 0.5, 1.5), random_f32(14, c, -1.0, 1.0));
    let (mut rm, mut rv) = (random_f32(15, c, -1.0, 1.0), random_f32(16, c, 0.5, 2.0));
    if cfg.affine {
        bn.set_weight(&weight).unwrap();
        bn.set_bias(&bias).unwrap();
    }
    if cfg.track_running_stats {
        bn.set_running_mean(&rm).unwrap();
        bn.set_running_var(&rv).unwrap();
        bn.set_num_batches_tracked(2).unwrap();
    }
    if !training {
        bn.eval();
    }
    let result = bn.forward(&x, &d);
    let batch_stats = training || !cfg.track_running_stats;
    if batch_stats && d.per_channel() == 1 {
        assert!(matches!(result, Err(Error::SingleValuePerChannel { .. })));
        return;
    }
    let (y, cache) = result.unwrap();
    let grads = bn.backward(&cache, &x, &dy).unwrap();

    let (w, b) = (
        cfg.affine.then_some(&weight[..]),
        cfg.affine.then_some(&bias[..]),
    );
    let mut want_y = vec![T::default(); x.len()];
    let (mut dx, mut dweight, mut dbias) =
        (vec![T::default(); x.len()], vec![0.0; c], vec![0.0; c]);
    let want_grads = Gradients {
        dx: Some(&mut dx),
        dweight: Some(&mut dweight),
        dbias: Some(&mut dbias),
        accumulate: false,
    };
    if batch_stats {
        let counting = training && cfg.track_running_stats;
        let running = counting.then(|| RunningUpdate {
            mean: &mut rm,
            var: &mut rv,
            factor: cfg.average_factor(3),
            var_update: cfg.running_var_update,
        });
        let saved =
            reference::forward_training(&x, &d, w, b, running, cfg.eps, &mut want_y).unwrap();
        assert_eq!(cache.stats(), &CachedStats::Batch(saved.clone()));
        reference::backward_training(&x, &dy, &d, w, &saved, want_grads).unwrap();
        assert_eq!(
            bn.num_batches_tracked(),
            if counting {
                3
            } else if cfg.track_running_stats {
                2
            } else {
                0
            }
        );
    } else {
        let running = RunningStats {
            mean: &rm,
            var: &rv,
        };
        reference::forward_inference(&x, &d, w, b, running, cfg.eps, &mut want_y).unwrap();
        reference::backward_inference(&x, &dy, &d, w, running, cfg.eps, want_grads).unwrap();
        assert_eq!(bn.num_batches_tracked(), 2);
    }
    assert_eq!(y, want_y);
    assert_eq!(grads.dx, dx);
    assert_eq!(grads.dweight, cfg.affine.then_some(dweight));
    assert_eq!(grads.dbias, cfg.affine.then_some(dbias));
    if cfg.track_running_stats {
        assert_eq!(
            (bn.running_mean().unwrap(), bn.running_var().unwrap()),
            (&rm[..], &rv[..])
        );
    }
}

fn dims_strategy() -> impl Strategy<Value = Vec<usize>> {
    (
        0usize..5,
        1usize..6,
        prop::collection::vec(1usize..5, 0..=3),
    )
        .prop_map(|(n, c, spatial)| {
            let mut dims = vec![n, c];
            dims.extend(spatial);
            dims
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn layer_matches_functional(
        dims in dims_strategy(),
        channels_last: bool,
        dtype in prop::sample::select(DType::ALL.to_vec()),
        training: bool,
        affine: bool,
        track: bool,
        momentum in prop::option::of(0.0f32..=1.0),
    ) {
        let layout = if channels_last { Layout::ChannelsLast } else { Layout::ChannelsFirst };
        let cfg = BatchNormConfig::new(dims[1]).affine(affine).track_running_stats(track).momentum(momentum);
        with_dtype!(dtype, layer_matches_functional_for(&dims, layout, cfg, training));
    }
}
