//! The training forward and backward with f64 activations, parameters and statistics, nothing
//! rounded: for finite-difference gradient checks, where rounding an output to f32 would drown
//! the differences. Same arithmetic as the rest of the reference (the same code, instantiated for
//! f64).

use super::math::{self, Norm, ParamGrads};
use crate::config::validate_eps;
use crate::error::Result;
use crate::shape::TensorDesc;
use crate::validate::{self, Buffers};

/// Batch statistics in f64, one value per channel each.
#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    /// Batch mean.
    pub mean: Vec<f64>,
    /// `1 / sqrt(biased_var + eps)`.
    pub invstd: Vec<f64>,
}

/// Gradients in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct Grads {
    /// Input gradient, in the memory order of `x`.
    pub dx: Vec<f64>,
    /// `sum(dy * xhat)` per channel.
    pub dweight: Vec<f64>,
    /// `sum(dy)` per channel.
    pub dbias: Vec<f64>,
}

/// Training forward in f64: returns `y` (in `desc`'s memory order) and the batch statistics.
/// `weight` and `bias` hold `C` values each.
///
/// Errors: as [`super::forward_training`].
pub fn forward_training(
    x: &[f64],
    desc: &TensorDesc,
    weight: &[f64],
    bias: &[f64],
    eps: f32,
) -> Result<(Vec<f64>, Stats)> {
    Buffers {
        x: x.len(),
        weight: Some(weight.len()),
        bias: Some(bias.len()),
        ..Default::default()
    }
    .check(desc)?;
    validate_eps(eps)?;
    validate::batch_statistics(desc)?;

    let g = desc.geometry();
    let moments = math::moments(x, g);
    let invstd = math::invstd(&moments.var, f64::from(eps));
    let mut y = vec![0.0; x.len()];
    math::normalize(
        x,
        g,
        &Norm {
            mean: &moments.mean,
            invstd: &invstd,
            weight,
        },
        bias,
        &mut y,
    );
    Ok((
        y,
        Stats {
            mean: moments.mean,
            invstd,
        },
    ))
}

/// Training backward in f64 from the [`Stats`] of [`forward_training`]; `dy` in the memory order
/// of `x`, `weight` holding `C` values.
///
/// Errors: as [`super::backward_training`].
pub fn backward_training(
    x: &[f64],
    dy: &[f64],
    desc: &TensorDesc,
    weight: &[f64],
    stats: &Stats,
) -> Result<Grads> {
    Buffers {
        x: x.len(),
        dy: Some(dy.len()),
        weight: Some(weight.len()),
        save_mean: Some(stats.mean.len()),
        save_invstd: Some(stats.invstd.len()),
        ..Default::default()
    }
    .check(desc)?;
    validate::batch_statistics(desc)?;

    let g = desc.geometry();
    let norm = Norm {
        mean: &stats.mean,
        invstd: &stats.invstd,
        weight,
    };
    let sums = math::param_grads(x, dy, g, &norm);
    let mut dx = vec![0.0; x.len()];
    math::training_dx(x, dy, g, &norm, &sums, &mut dx);
    let ParamGrads { dweight, dbias } = sums;
    Ok(Grads { dx, dweight, dbias })
}
