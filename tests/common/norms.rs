//! The group, layer, instance and RMS norm golden cases (`shared/golden/norms/FORMAT.md`) as
//! calls: the shape, epsilon and statistics mode a case was recorded with, and its inputs; and
//! seeded inputs with a large common offset for the accuracy tests.

use super::golden::{Case, Stored};
use batchnorm_cuda::norms::{
    rms_eps, GroupNormConfig, InstanceNormConfig, LayerNormConfig, NormConfig, NormDesc,
    RmsNormConfig,
};
use batchnorm_cuda::{Element, TensorDesc};

/// Where a case's forward took its statistics from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// The rows' own statistics.
    Batch,
    /// Instance norm, training, tracked: row statistics and a running update with `momentum`.
    BatchUpdating { momentum: f32 },
    /// Instance norm, eval, tracked: the running statistics.
    Running,
}

/// What a case's call needs besides its tensors.
#[derive(Clone, Copy, Debug)]
pub struct NormCall {
    pub desc: NormDesc,
    pub eps: f32,
    pub mode: Mode,
}

fn dims(case: &Case, key: &str) -> Vec<usize> {
    case.require(key)
        .split(',')
        .map(|d| {
            d.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{}: bad {key}", case.name))
        })
        .collect()
}

impl NormCall {
    /// The call of `case`; panics (naming the case) on metadata it cannot read.
    pub fn of(case: &Case) -> Self {
        let op = case.require("op");
        let shape = dims(case, "shape");
        let tensor = || {
            let layout = batchnorm_cuda::Layout::parse(case.require("layout")).unwrap();
            TensorDesc::new(&shape, layout).unwrap_or_else(|e| panic!("{}: {e}", case.name))
        };
        let desc = match op {
            "group_norm" => NormDesc::group(&tensor(), parse(case, "num_groups")),
            "instance_norm" => Ok(NormDesc::instance(&tensor())),
            "layer_norm" => NormDesc::layer(&shape, &dims(case, "normalized_shape")),
            "rms_norm" => NormDesc::rms(&shape, &dims(case, "normalized_shape")),
            other => panic!("{}: unknown op {other:?}", case.name),
        }
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let eps = match case.require("eps") {
            "none" => {
                let eps = rms_eps(None, case.dtype());
                assert_eq!(
                    eps,
                    parse::<f32>(case, "eps_used"),
                    "{}: eps_used",
                    case.name
                );
                eps
            }
            _ => parse(case, "eps"),
        };
        let tracked = op == "instance_norm" && case.flag("track_running_stats");
        let mode = match (tracked, tracked && case.training()) {
            (false, _) => Mode::Batch,
            (true, true) => Mode::BatchUpdating {
                momentum: parse(case, "momentum"),
            },
            (true, false) => Mode::Running,
        };
        Self { desc, eps, mode }
    }
}

/// The logical shape and layout of a case's input.
pub fn input_dims(case: &Case) -> (Vec<usize>, batchnorm_cuda::Layout) {
    let layout = batchnorm_cuda::Layout::parse(case.require("layout")).unwrap();
    (dims(case, "shape"), layout)
}

/// The layer configuration a case was recorded with.
pub fn layer_config(case: &Case) -> NormConfig {
    let affine = case.flag("affine");
    let eps = || parse::<f32>(case, "eps");
    match case.require("op") {
        "group_norm" => NormConfig::Group(GroupNormConfig {
            eps: eps(),
            affine,
            ..GroupNormConfig::new(parse(case, "num_groups"), dims(case, "shape")[1])
        }),
        "instance_norm" => NormConfig::Instance(InstanceNormConfig {
            eps: eps(),
            momentum: parse(case, "momentum"),
            affine,
            track_running_stats: case.flag("track_running_stats"),
            ..InstanceNormConfig::new(dims(case, "shape")[1])
        }),
        "layer_norm" => NormConfig::Layer(LayerNormConfig {
            eps: eps(),
            elementwise_affine: affine,
            bias: case.flag("has_bias"),
            ..LayerNormConfig::new(&dims(case, "normalized_shape"))
        }),
        "rms_norm" => NormConfig::Rms(RmsNormConfig {
            eps: match case.require("eps") {
                "none" => None,
                _ => Some(eps()),
            },
            elementwise_affine: affine,
            ..RmsNormConfig::new(&dims(case, "normalized_shape"))
        }),
        other => panic!("{}: unknown op {other:?}", case.name),
    }
}

/// The case's state as a layer holds it.
pub fn layer_state<T: Element + Stored>(inputs: &NormInputs<T>) -> batchnorm_cuda::LayerState {
    batchnorm_cuda::LayerState {
        weight: inputs.weight.clone(),
        bias: inputs.bias.clone(),
        running_mean: inputs.running_mean.clone(),
        running_var: inputs.running_var.clone(),
        num_batches_tracked: 0,
    }
}

fn parse<T: std::str::FromStr>(case: &Case, key: &str) -> T {
    let text = case.require(key);
    text.parse()
        .unwrap_or_else(|_| panic!("{}: metadata `{key}` = {text:?} does not parse", case.name))
}

/// The tensors of a case: activations in `T`, parameters and running statistics in f32.
#[derive(Clone, Debug)]
pub struct NormInputs<T> {
    pub x: Vec<T>,
    pub dy: Option<Vec<T>>,
    pub weight: Option<Vec<f32>>,
    pub bias: Option<Vec<f32>>,
    pub running_mean: Option<Vec<f32>>,
    pub running_var: Option<Vec<f32>>,
}

impl<T: Element + Stored> NormInputs<T> {
    pub fn of(case: &Case) -> Self {
        Self {
            x: case.required("x"),
            dy: case.values("dy"),
            weight: case.values("weight"),
            bias: case.values("bias"),
            running_mean: case.values("running_mean"),
            running_var: case.values("running_var"),
        }
    }
}

/// A row-offset pair for the accuracy tests: `shifted[i] = offset + small[i]` exactly (the
/// small values are multiples of the offset's ulp in `T`, below `spread` in size), so every
/// exact result on `shifted` equals the exact result on `small`, which is well conditioned.
pub fn offset_pair<T: Element>(
    seed: u64,
    len: usize,
    offset: f64,
    spread: f64,
) -> (Vec<T>, Vec<T>) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    assert_eq!(
        T::from_f64(offset).to_f64(),
        offset,
        "the offset must be a value of the dtype"
    );
    // The spacing of the dtype around the offset: the smallest step that moves it.
    let mut step = offset.abs().max(1.0).log2().ceil().exp2();
    while T::from_f64(offset + step / 2.0).to_f64() != offset {
        step /= 2.0;
    }
    let units = (spread / step).floor().max(1.0) as i64;
    let (mut small, mut shifted) = (Vec::with_capacity(len), Vec::with_capacity(len));
    for _ in 0..len {
        let d = rng.random_range(-units..=units) as f64 * step;
        let s = T::from_f64(offset + d);
        assert_eq!(s.to_f64(), offset + d, "offset + d must be exact");
        assert_eq!(T::from_f64(d).to_f64(), d, "d must be exact");
        small.push(T::from_f64(d));
        shifted.push(s);
    }
    (small, shifted)
}
