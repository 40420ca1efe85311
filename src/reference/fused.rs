//! Fused ReLU epilogues on the CPU: the epilogues of [`crate::gpu::functional`] on host slices, the oracle of its
//! kernels. `y = relu(BN(x))` and `y = relu(BN(x) + z)` with the 1-bit ReLU mask of
//! [`crate::epilogue`] (same packed layout as the GPU's, so masks compare word for word).
//!
//! Written to be obviously correct, on top of the plain reference:
//! - forward: the plain forward (statistics, running update), then `y` again from the same f64
//!   statistics as `round(relu(BN(x) [+ z]))`, rounded once, and the mask bit `y > 0` of the
//!   stored `y`. `relu(t) = t` for `t > 0` and for NaN (PyTorch's), else `+0`.
//! - backward: `dy_eff = mask ? dy : +0` (PyTorch's `threshold_backward(dy, y, 0)`), then the
//!   plain backward of `dy_eff`, and `dz = dy_eff`.
//!
//! So `relu(BN(x))` equals the unfused `relu` of the plain forward bit for bit (ReLU commutes
//! with rounding), and `relu(BN(x) + z)` is within one rounding of the unfused
//! `relu(round(BN(x)) + z)` (one rounding instead of two, as cuDNN's and apex's fused kernels).
//!
//! Checks as in the plain calls, with the fused buffers (`z`, `mask`, `dz`) checked right after
//! the plain buffers, as the GPU does; an `Err` leaves every buffer untouched.
//!
//! ```
//! use batchnorm_cuda::reference::{fused, Epilogue};
//! use batchnorm_cuda::{epilogue, TensorDesc};
//!
//! let desc = TensorDesc::nchw(2, 1, 1, 2)?; // 4 values of one channel: mean 2.5
//! let x = [1.0f32, 2.0, 3.0, 4.0];
//! let z = [0.0f32, 0.0, 0.0, -1.0];
//! let (mut y, mut mask) = ([0.0f32; 4], vec![0u32; epilogue::mask_words(&desc)]);
//! let request = fused::Forward {
//!     desc,
//!     x: &x,
//!     weight: None,
//!     bias: None,
//!     y: &mut y,
//!     epilogue: Epilogue::AddRelu { z: &z, mask: Some(&mut mask) },
//! };
//! fused::forward_training(request, None, 0.0)?;
//! assert_eq!(&y[..2], [0.0, 0.0]);
//! assert!(y[2] > 0.0 && y[3] > 0.0);
//! assert_eq!(mask, [0b1100]); // four values: bits 0..4 of one word (flat: element e is bit e % 32)
//! # Ok::<(), batchnorm_cuda::Error>(())
//! ```

use super::{
    backward_buffers, math, widen, widen_or, Epilogue, EpilogueGrad, Gradients, RunningStats,
    RunningUpdate, SavedStats,
};
use crate::dtype::Element;
use crate::epilogue::mask_position;
use crate::error::Result;
use crate::shape::TensorDesc;
use crate::validate::Buffers;

/// PyTorch's ReLU in f64: `t` for `t > 0` and for NaN, `+0` otherwise (also for `-0`).
pub fn relu(t: f64) -> f64 {
    if t > 0.0 || t.is_nan() {
        t
    } else {
        0.0
    }
}

/// A forward with its epilogue on host slices, as [`crate::gpu::functional::Forward`] on the
/// device (without the statistics, which [`forward_training`] and [`forward_inference`] say).
#[derive(Debug)]
pub struct Forward<'a, T> {
    /// Shape and memory order of `x`, `y` and `z`.
    pub desc: TensorDesc,
    /// `desc.numel()` elements.
    pub x: &'a [T],
    /// `[C]`, or `None` for 1.
    pub weight: Option<&'a [f32]>,
    /// `[C]`, or `None` for 0.
    pub bias: Option<&'a [f32]>,
    /// `desc.numel()` elements, overwritten.
    pub y: &'a mut [T],
    /// [`Epilogue::None`] (the plain forward), or a fused ReLU.
    pub epilogue: Epilogue<'a, T>,
}

/// A backward through an epilogue on host slices, as [`crate::gpu::functional::Backward`].
#[derive(Debug)]
pub struct Backward<'a, T> {
    /// Shape and memory order of `x`, `dy`, `dx` and `dz`.
    pub desc: TensorDesc,
    /// The forward's input.
    pub x: &'a [T],
    /// The gradient of the forward's output.
    pub dy: &'a [T],
    /// `[C]`, or `None` for 1.
    pub weight: Option<&'a [f32]>,
    /// Which gradients to write.
    pub grads: Gradients<'a, T>,
    /// The backward of the forward's epilogue: the mask, and `dz` for the residual form.
    pub epilogue: EpilogueGrad<'a, T>,
}

/// Training forward with a fused epilogue: [`super::forward_training`] (statistics, running
/// update, the returned [`SavedStats`]), with `y = relu(BN(x) [+ z])` and, when asked for, the
/// ReLU mask ([`mask_words`](crate::epilogue::mask_words) words, every word written).
///
/// Errors: those of [`super::forward_training`], with
/// [`Error::BufferLength`](crate::Error::BufferLength) for `z` and `mask` checked right after
/// the plain buffers.
pub fn forward_training<T: Element>(
    request: Forward<'_, T>,
    running: Option<RunningUpdate<'_>>,
    eps: f32,
) -> Result<SavedStats> {
    let Forward {
        desc,
        x,
        weight,
        bias,
        y,
        epilogue,
    } = request;
    Buffers {
        running_mean: running.as_ref().map(|r| r.mean.len()),
        running_var: running.as_ref().map(|r| r.var.len()),
        ..forward_buffers(x, y, weight, bias)
    }
    .check(&desc)?;
    epilogue.check(&desc)?;
    let saved = super::forward_training(x, &desc, weight, bias, running, eps, y)?;
    if epilogue.kind().is_some() {
        // The f64 statistics the plain forward normalized with (the same deterministic sums),
        // so that BN(x) is the plain one before its rounding.
        let moments = math::moments(x, desc.geometry());
        let invstd = math::invstd(&moments.var, f64::from(eps));
        let stats = Stats {
            mean: &moments.mean,
            invstd: &invstd,
        };
        let plain = Affine { weight, bias };
        epilogue_pass(x, &desc, &stats, plain, y, epilogue);
    }
    Ok(saved)
}

/// Eval forward with a fused epilogue:
/// `y = relu((x - running_mean) * weight / sqrt(running_var + eps) + bias [+ z])`, and the mask
/// when asked for.
///
/// Errors: those of [`super::forward_inference`], with `z` and `mask` checked right after the
/// plain buffers.
pub fn forward_inference<T: Element>(
    request: Forward<'_, T>,
    running: RunningStats<'_>,
    eps: f32,
) -> Result<()> {
    let Forward {
        desc,
        x,
        weight,
        bias,
        y,
        epilogue,
    } = request;
    Buffers {
        running_mean: Some(running.mean.len()),
        running_var: Some(running.var.len()),
        ..forward_buffers(x, y, weight, bias)
    }
    .check(&desc)?;
    epilogue.check(&desc)?;
    super::forward_inference(x, &desc, weight, bias, running, eps, y)?;
    if epilogue.kind().is_some() {
        let (mean, invstd) = (
            widen(running.mean),
            math::invstd(&widen(running.var), f64::from(eps)),
        );
        let stats = Stats {
            mean: &mean,
            invstd: &invstd,
        };
        epilogue_pass(x, &desc, &stats, Affine { weight, bias }, y, epilogue);
    }
    Ok(())
}

fn forward_buffers<T>(x: &[T], y: &[T], weight: Option<&[f32]>, bias: Option<&[f32]>) -> Buffers {
    Buffers {
        x: x.len(),
        y: Some(y.len()),
        weight: weight.map(<[f32]>::len),
        bias: bias.map(<[f32]>::len),
        ..Default::default()
    }
}

/// Training backward of a fused forward from its mask: [`super::backward_training`] of
/// `dy_eff = mask ? dy : +0`, and `dz = dy_eff` when `dz` is given.
///
/// Errors: those of [`super::backward_training`], with `mask` and `dz` checked right after the
/// plain buffers.
pub fn backward_training<T: Element>(request: Backward<'_, T>, saved: &SavedStats) -> Result<()> {
    let Backward {
        desc,
        x,
        dy,
        weight,
        grads,
        epilogue,
    } = request;
    saved
        .buffers(backward_buffers(x, dy, weight, &grads))
        .check(&desc)?;
    epilogue.check(&desc)?;
    let dy_eff = masked(dy, &epilogue, &desc);
    super::backward_training(x, &dy_eff, &desc, weight, saved, grads)?;
    write_dz(epilogue, &dy_eff);
    Ok(())
}

/// Eval-mode backward of a fused forward: [`super::backward_inference`] of
/// `dy_eff = mask ? dy : +0`, and `dz = dy_eff` when given.
///
/// Errors: those of [`super::backward_inference`], with `mask` and `dz` checked right after the
/// plain buffers.
pub fn backward_inference<T: Element>(
    request: Backward<'_, T>,
    running: RunningStats<'_>,
    eps: f32,
) -> Result<()> {
    let Backward {
        desc,
        x,
        dy,
        weight,
        grads,
        epilogue,
    } = request;
    Buffers {
        running_mean: Some(running.mean.len()),
        running_var: Some(running.var.len()),
        ..backward_buffers(x, dy, weight, &grads)
    }
    .check(&desc)?;
    epilogue.check(&desc)?;
    let dy_eff = masked(dy, &epilogue, &desc);
    super::backward_inference(x, &dy_eff, &desc, weight, running, eps, grads)?;
    write_dz(epilogue, &dy_eff);
    Ok(())
}

/// `dz = dy_eff` when the residual form asks for it.
fn write_dz<T: Element>(epilogue: EpilogueGrad<'_, T>, dy_eff: &[T]) {
    if let EpilogueGrad::AddRelu { dz: Some(dz), .. } = epilogue {
        dz.copy_from_slice(dy_eff);
    }
}

/// The affine parameters of a forward.
#[derive(Clone, Copy)]
struct Affine<'a> {
    weight: Option<&'a [f32]>,
    bias: Option<&'a [f32]>,
}

/// The per-channel statistics a forward normalizes with, in f64.
struct Stats<'a> {
    mean: &'a [f64],
    invstd: &'a [f64],
}

/// `y = round(relu(BN(x) [+ z]))`, with `BN(x) = (x - mean) * (weight * invstd) + bias` as the
/// plain reference computes it, and the mask of the stored `y` when asked for.
fn epilogue_pass<T: Element>(
    x: &[T],
    desc: &TensorDesc,
    stats: &Stats<'_>,
    affine: Affine<'_>,
    y: &mut [T],
    epilogue: Epilogue<'_, T>,
) {
    let (g, c) = (desc.geometry(), desc.channels());
    let bias = widen_or(affine.bias, c, 0.0);
    let scale: Vec<f64> = widen_or(affine.weight, c, 1.0)
        .iter()
        .zip(stats.invstd)
        .map(|(w, s)| w * s)
        .collect();
    let bn = |c: usize, x: f64| (x - stats.mean[c]) * scale[c] + bias[c];
    let mask = match epilogue {
        Epilogue::None => return,
        Epilogue::Relu { mask } => {
            math::map([x], g, y, |c, [x]| relu(bn(c, x)));
            mask
        }
        Epilogue::AddRelu { z, mask } => {
            math::map([x, z], g, y, |c, [x, z]| relu(bn(c, x) + z));
            mask
        }
    };
    if let Some(mask) = mask {
        mask.fill(0);
        for (offset, v) in y.iter().enumerate() {
            if v.to_f64() > 0.0 {
                let (word, bit) = mask_position(desc, offset);
                mask[word] |= 1 << bit;
            }
        }
    }
}

/// `dy` where the mask bit is set, `+0` elsewhere (a NaN `dy` under a 0 bit gives 0); `dy`
/// itself without a mask.
fn masked<T: Element>(dy: &[T], epilogue: &EpilogueGrad<'_, T>, desc: &TensorDesc) -> Vec<T> {
    let Some(mask) = epilogue.mask() else {
        return dy.to_vec();
    };
    dy.iter()
        .enumerate()
        .map(|(offset, &g)| {
            let (word, bit) = mask_position(desc, offset);
            if mask[word] >> bit & 1 == 1 {
                g
            } else {
                T::default()
            }
        })
        .collect()
}
