//! Data with a large common offset next to its spread (mean 1000, std 0.1 in f32), where a mean
//! rounded once to f32 is off by half an ulp of the offset and `invstd` magnifies that past the
//! golden tolerances. The cases, an f64 oracle written here from the definitions (it shares no
//! code with the crate), and the comparison with the golden tolerance table.
#![allow(dead_code)] // each test binary uses its own subset

use super::{compare, tolerance, widen, widen_f32, Quantity, Tol};
use batchnorm_cuda::{epilogue, DType, Element, Layout, TensorDesc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub const EPS: f32 = 1e-5;
pub const MOMENTUM: f32 = 0.1;

/// `(offset, spread)` pairs for a dtype: values uniform in `offset + c/8 +- spread` (channel
/// `c`), every one of them exactly representable after rounding to the dtype. Spreads are a few
/// hundred ulps of the offset in f32 and 8-16 ulps in the half types (whose ulp at 1000 is 0.5).
pub fn offsets(dtype: DType) -> &'static [(f64, f64)] {
    match dtype {
        DType::F32 => &[(1000.0, 0.1), (-700.0, 0.07), (30000.0, 2.0)],
        DType::F16 => &[(100.0, 0.5), (-1000.0, 4.0)],
        DType::BF16 => &[(50.0, 2.0), (-300.0, 16.0)],
    }
}

/// Shapes with both traversals, vector and scalar paths, more than one split.
pub fn shapes() -> Vec<TensorDesc> {
    let dims: &[&[usize]] = &[&[300, 5], &[8, 3, 9, 11], &[4, 4, 16, 16], &[2, 3, 4, 5, 6]];
    dims.iter()
        .flat_map(|d| {
            [Layout::ChannelsFirst, Layout::ChannelsLast].map(|l| TensorDesc::new(d, l).unwrap())
        })
        .collect()
}

/// The fused epilogue a case runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    Plain,
    Relu,
    AddRelu,
}

pub const FORMS: [Form; 3] = [Form::Plain, Form::Relu, Form::AddRelu];

/// One call's inputs, in the memory order of `desc`.
pub struct Case<T> {
    pub desc: TensorDesc,
    pub training: bool,
    pub form: Form,
    pub offset: f64,
    pub spread: f64,
    pub x: Vec<T>,
    /// The residual `z` (zeros unless `AddRelu`, where it is of the scale of `BN(x)`).
    pub z: Vec<T>,
    /// `dy` with a mean far from 0, which multiplies an error in the mean into `dweight`.
    pub dy: Vec<T>,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    /// Near the batch's statistics, as after some training (eval normalizes with them).
    pub running_mean: Vec<f32>,
    pub running_var: Vec<f32>,
}

impl<T: Element> Case<T> {
    pub fn new(
        desc: TensorDesc,
        (offset, spread): (f64, f64),
        training: bool,
        form: Form,
        seed: u64,
    ) -> Self {
        let (n, c) = (desc.numel(), desc.channels());
        let mut rng = StdRng::seed_from_u64(seed);
        let g = desc.geometry();
        let channel_of = |i: usize| (i / g.inner) % g.channels;
        let x = (0..n)
            .map(|i| {
                let centre = offset + channel_of(i) as f64 / 8.0;
                T::from_f64(centre + spread * rng.random_range(-1.0..1.0))
            })
            .collect();
        let mut uniform = |len: usize, mean: f64, spread: f64| -> Vec<f64> {
            (0..len)
                .map(|_| mean + spread * rng.random_range(-1.0..1.0))
                .collect()
        };
        let z = match form {
            Form::AddRelu => uniform(n, 0.0, 1.0),
            _ => vec![0.0; n],
        };
        let dy = uniform(n, 0.3, 1.0);
        let narrow = |v: Vec<f64>| -> Vec<f32> { v.into_iter().map(|v| v as f32).collect() };
        let weight = narrow(uniform(c, 1.0, 0.5));
        let bias = narrow(uniform(c, 0.0, 0.5));
        let running_mean = (0..c)
            .map(|ch| (offset + ch as f64 / 8.0 + spread * 0.05) as f32)
            .collect();
        let running_var = narrow(uniform(c, spread * spread / 3.0, spread * spread / 10.0));
        Self {
            desc,
            training,
            form,
            offset,
            spread,
            x,
            z: z.into_iter().map(T::from_f64).collect(),
            dy: dy.into_iter().map(T::from_f64).collect(),
            weight,
            bias,
            running_mean,
            running_var,
        }
    }

    pub fn label(&self) -> String {
        format!(
            "{} {} {:?} {} offset {} spread {}",
            self.desc,
            T::DTYPE,
            self.form,
            if self.training { "train" } else { "eval" },
            self.offset,
            self.spread
        )
    }
}

/// What a path under test returns for a [`Case`], on the host.
pub struct Outcome<T> {
    pub y: Vec<T>,
    /// The ReLU mask (fused forms).
    pub mask: Option<Vec<u32>>,
    /// `(save_mean, save_mean_lo, save_invstd)` of a training forward.
    pub saved: Option<(Vec<f32>, Vec<f32>, Vec<f32>)>,
    pub running_mean: Vec<f32>,
    pub running_var: Vec<f32>,
    pub dx: Vec<T>,
    pub dweight: Vec<f32>,
    pub dbias: Vec<f32>,
    /// `dz` of the residual form.
    pub dz: Option<Vec<T>>,
}

/// The exact results of a case in f64, from the definitions.
struct Exact {
    y: Vec<f64>,
    mean: Vec<f64>,
    invstd: Vec<f64>,
    std: Vec<f64>,
    running_mean: Vec<f64>,
    running_var: Vec<f64>,
    dx: Vec<f64>,
    dweight: Vec<f64>,
    dbias: Vec<f64>,
    dz: Vec<f64>,
}

/// `dy_eff` is `dy` through the mask the path under test wrote (the mask itself is checked
/// against the stored `y`).
fn exact<T: Element>(case: &Case<T>, dy_eff: &[f64]) -> Exact {
    let desc = &case.desc;
    let (c, m) = (desc.channels(), desc.per_channel() as f64);
    let g = desc.geometry();
    let channel = |i: usize| (i / g.inner) % g.channels;
    let x = widen(&case.x);
    let (w, b) = (widen_f32(&case.weight), widen_f32(&case.bias));
    let (rm, rv) = (widen_f32(&case.running_mean), widen_f32(&case.running_var));
    let eps = f64::from(EPS);

    let per_channel = |f: &dyn Fn(usize) -> f64| -> Vec<f64> {
        let mut sums = vec![0.0; c];
        for i in 0..x.len() {
            sums[channel(i)] += f(i);
        }
        sums
    };
    let batch_mean: Vec<f64> = per_channel(&|i| x[i]).iter().map(|s| s / m).collect();
    let batch_var: Vec<f64> = per_channel(&|i| (x[i] - batch_mean[channel(i)]).powi(2))
        .iter()
        .map(|s| s / m)
        .collect();
    let (mean, var) = if case.training {
        (batch_mean.clone(), batch_var.clone())
    } else {
        (rm.clone(), rv.clone())
    };
    let invstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let z = widen(&case.z);
    let y = (0..x.len())
        .map(|i| {
            let ch = channel(i);
            let t = (x[i] - mean[ch]) * invstd[ch] * w[ch] + b[ch];
            match case.form {
                Form::Plain => t,
                Form::Relu => t.max(0.0),
                Form::AddRelu => (t + z[i]).max(0.0),
            }
        })
        .collect();
    let f = f64::from(MOMENTUM);
    let (running_mean, running_var) = if case.training {
        (
            (0..c).map(|ch| (1.0 - f) * rm[ch] + f * mean[ch]).collect(),
            (0..c)
                .map(|ch| (1.0 - f) * rv[ch] + f * var[ch] * m / (m - 1.0))
                .collect(),
        )
    } else {
        (rm.clone(), rv.clone())
    };
    let dbias = per_channel(&|i| dy_eff[i]);
    let sum_dy_xc = per_channel(&|i| dy_eff[i] * (x[i] - mean[channel(i)]));
    let dweight: Vec<f64> = (0..c).map(|ch| sum_dy_xc[ch] * invstd[ch]).collect();
    let dx = (0..x.len())
        .map(|i| {
            let ch = channel(i);
            let scale = w[ch] * invstd[ch];
            if case.training {
                let xhat = (x[i] - mean[ch]) * invstd[ch];
                scale * (dy_eff[i] - dbias[ch] / m - xhat * dweight[ch] / m)
            } else {
                dy_eff[i] * scale
            }
        })
        .collect();
    Exact {
        y,
        std: batch_var.iter().map(|v| v.sqrt()).collect(),
        mean: batch_mean,
        invstd,
        running_mean,
        running_var,
        dx,
        dweight,
        dbias,
        dz: dy_eff.to_vec(),
    }
}

/// The worst share of its golden tolerance each quantity used, over every case checked.
#[derive(Default)]
pub struct Shares(pub Vec<(String, f64)>);

impl Shares {
    fn record(&mut self, what: &str, share: f64) {
        match self.0.iter_mut().find(|(name, _)| name == what) {
            Some((_, worst)) => *worst = worst.max(share),
            None => self.0.push((what.to_string(), share)),
        }
    }

    pub fn print(&self, path: &str) {
        let line: Vec<String> = self
            .0
            .iter()
            .map(|(name, share)| format!("{name} {share:.2}"))
            .collect();
        println!("{path}: worst share of tolerance: {}", line.join(", "));
    }
}

/// Checks `got` against the exact results of `case` with the golden tolerances (`y`, `dx`, `dz`:
/// the activation row of the dtype; statistics: the statistics row; `dweight`, `dbias`: the
/// parameter-gradient row), the mask against the stored `y`, and `save_mean + save_mean_lo`
/// against the exact mean to 1e-5 of the channel's standard deviation (one f32 rounding of the
/// mean alone is half an ulp of the offset: 3e-4 of the spread at 1000 and 0.1). Panics naming
/// the case and the quantity on a failure.
pub fn check<T: Element>(case: &Case<T>, got: &Outcome<T>, shares: &mut Shares) {
    let label = case.label();
    let dy = widen(&case.dy);
    let dy_eff: Vec<f64> = match (&got.mask, case.form) {
        (None, Form::Plain) => dy,
        (Some(mask), Form::Relu | Form::AddRelu) => {
            let bits = epilogue::unpack_mask(&case.desc, mask).unwrap();
            let stored_y = widen(&got.y);
            for (i, (&bit, &y)) in bits.iter().zip(&stored_y).enumerate() {
                assert_eq!(
                    bit,
                    y > 0.0,
                    "{label}: mask bit {i} against the stored y {y}"
                );
            }
            dy.iter()
                .zip(&bits)
                .map(|(&d, &bit)| if bit { d } else { 0.0 })
                .collect()
        }
        _ => panic!("{label}: a mask exactly for the fused forms"),
    };
    let want = exact(case, &dy_eff);
    let dtype = T::DTYPE;
    let mut quantity = |what: &str, got: Vec<f64>, want: &[f64], tol: Tol| {
        let report = compare(&got, want, tol).unwrap_or_else(|e| panic!("{label}: {what}: {e}"));
        shares.record(what, report.worst_ratio);
    };
    let activation = tolerance(dtype, Quantity::Activation);
    let statistic = tolerance(dtype, Quantity::Statistic);
    let param = tolerance(dtype, Quantity::ParamGrad);
    quantity("y", widen(&got.y), &want.y, activation);
    quantity("dx", widen(&got.dx), &want.dx, activation);
    quantity("dweight", widen_f32(&got.dweight), &want.dweight, param);
    quantity("dbias", widen_f32(&got.dbias), &want.dbias, param);
    quantity(
        "running_mean",
        widen_f32(&got.running_mean),
        &want.running_mean,
        statistic,
    );
    quantity(
        "running_var",
        widen_f32(&got.running_var),
        &want.running_var,
        statistic,
    );
    if let Some(dz) = &got.dz {
        quantity("dz", widen(dz), &want.dz, activation);
    }
    match (&got.saved, case.training) {
        (Some((mean, mean_lo, invstd)), true) => {
            quantity("save_mean", widen_f32(mean), &want.mean, statistic);
            quantity("save_invstd", widen_f32(invstd), &want.invstd, statistic);
            for ch in 0..mean.len() {
                let pair = f64::from(mean[ch]) + f64::from(mean_lo[ch]);
                assert_eq!(
                    mean[ch], pair as f32,
                    "{label}: save_mean is not the rounded pair"
                );
                let err = (pair - want.mean[ch]).abs();
                let bound = 1e-5 * want.std[ch];
                shares.record("save_mean+lo", err / bound);
                assert!(
                    err <= bound,
                    "{label}: save_mean + save_mean_lo [{ch}] = {pair}, exact {}: {err:.3e} > {bound:.3e}",
                    want.mean[ch]
                );
            }
        }
        (None, false) => {}
        _ => panic!("{label}: saved statistics exactly for training"),
    }
}
