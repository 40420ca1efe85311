//! Stateless batch-norm calls over borrowed device memory, like cuDNN: a request says the shape
//! and layout ([`TensorDesc`]), the buffers, the statistics and the epilogue; the caller owns
//! every buffer, work is queued on the [`GpuContext`]'s stream and nothing synchronizes the
//! host. Each call validates everything before it launches, so an error leaves every buffer
//! untouched.
//!
//! Activations are `T` ([`Element`]: f32, f16, bf16) in the layout of the descriptor; parameters,
//! statistics and gradients of parameters are f32, each `[C]`.
//!
//! | call | statistics | launches | reads | writes |
//! | --- | --- | --- | --- | --- |
//! | [`forward`] | [`ForwardStats::Batch`] | statistics, normalize | `x` twice, `z` | `y`, saved, running, mask |
//! | [`forward`] | [`ForwardStats::Running`] | normalize | `x`, `z` | `y`, mask |
//! | [`backward`] | [`BackwardStats::Batch`] | reduce, dx | `x`, `dy`, mask twice | `dx`, `dz`, parameter gradients |
//! | [`backward`] | [`BackwardStats::Running`] | (reduce), dx | `x`, `dy`, mask | `dx`, `dz`, parameter gradients |
//!
//! The fused epilogues ([`Epilogue`], [`EpilogueGrad`]): `y = relu(BN(x))` and the ResNet
//! block's `y = relu(BN(x) + z)` write a 1-bit-per-element ReLU mask instead of keeping `y`;
//! their backward reads the mask (`dy_eff = mask ? dy : 0`), then runs the plain backward of
//! `dy_eff`, and `dz = dy_eff` for the residual form. Their buffers are checked right after the
//! plain ones, as [`crate::reference::fused`] does.
//!
//! ```no_run
//! use batchnorm_cuda::gpu::functional::{self, BatchStats, Epilogue, ForwardStats, SavedStatsMut};
//! use batchnorm_cuda::gpu::{GpuContext, Workspace};
//! use batchnorm_cuda::{epilogue::mask_words, TensorDesc};
//!
//! let gpu = GpuContext::new(0)?;
//! let desc = TensorDesc::nhwc(8, 64, 56, 56)?;
//! let stream = gpu.stream();
//! let x = stream.clone_htod(&vec![half::f16::ONE; desc.numel()])?;
//! let z = stream.clone_htod(&vec![half::f16::ONE; desc.numel()])?; // the shortcut
//! let mut y = stream.alloc_zeros::<half::f16>(desc.numel())?;
//! let mut mask = stream.alloc_zeros::<u32>(mask_words(&desc))?;
//! let (mut mean, mut invstd) = (stream.alloc_zeros(64)?, stream.alloc_zeros(64)?);
//! let mut mean_lo = stream.alloc_zeros(64)?;
//! let mut ws = Workspace::new();
//! functional::forward(&gpu, &mut ws, functional::Forward {
//!     desc,
//!     x: x.as_view(),
//!     weight: None,
//!     bias: None,
//!     stats: ForwardStats::Batch(BatchStats {
//!         saved: SavedStatsMut {
//!             mean: mean.as_view_mut(),
//!             mean_lo: mean_lo.as_view_mut(),
//!             invstd: invstd.as_view_mut(),
//!         },
//!         running: None,
//!         eps: 1e-5,
//!     }),
//!     y: y.as_view_mut(),
//!     epilogue: Epilogue::AddRelu { z: z.as_view(), mask: Some(mask.as_view_mut()) },
//! })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use super::context::GpuContext;
use super::ops::{self, FoldBuffers, FoldStats, Gradient, Normalization, Normalize, SinglePass};
use super::workspace::Workspace;
use crate::dtype::Element;
use crate::error::Result;
use crate::fold::FoldSpec;
use crate::shape::TensorDesc;
use crate::validate::{self, validate_eps, Buffers};
use cudarc::driver::{CudaView, CudaViewMut};

pub use super::views::{
    BackwardStats, BatchStats, Epilogue, EpilogueGrad, ForwardStats, GradientsMut, RunningStats,
    RunningUpdate, SavedStats, SavedStatsMut,
};

/// A forward: `y = (x - mean) * (weight * invstd) + bias`, then the epilogue.
#[derive(Debug)]
pub struct Forward<'a, T> {
    /// Shape and memory order of `x`, `y` and `z`.
    pub desc: TensorDesc,
    /// `desc.numel()` elements.
    pub x: CudaView<'a, T>,
    /// `[C]`, or `None` for 1.
    pub weight: Option<CudaView<'a, f32>>,
    /// `[C]`, or `None` for 0.
    pub bias: Option<CudaView<'a, f32>>,
    /// The batch's statistics (training) or the running ones (eval).
    pub stats: ForwardStats<'a>,
    /// `desc.numel()` elements, overwritten.
    pub y: CudaViewMut<'a, T>,
    /// [`Epilogue::None`], or a fused ReLU.
    pub epilogue: Epilogue<'a, T>,
}

impl<T> Forward<'_, T> {
    /// The checks every forward makes before it queues anything (the synchronized one too):
    /// the plain buffers, the epilogue's, eps and the running update's factor.
    pub(crate) fn check(&self) -> Result<()> {
        let stat_buffers = match &self.stats {
            ForwardStats::Batch(batch) => batch.buffers(),
            ForwardStats::Running { stats, .. } => stats.buffers(),
        };
        Buffers {
            x: self.x.len(),
            y: Some(self.y.len()),
            weight: self.weight.as_ref().map(|w| w.len()),
            bias: self.bias.as_ref().map(|b| b.len()),
            ..stat_buffers
        }
        .check(&self.desc)?;
        self.epilogue.check(&self.desc)?;
        match &self.stats {
            ForwardStats::Batch(batch) => batch.check_scalars(),
            ForwardStats::Running { eps, .. } => validate_eps(*eps),
        }
    }
}

/// Batch-norm forward.
///
/// - [`ForwardStats::Batch`] (training): batch statistics (a split Welford reduction whose last
///   block per channel also writes `saved` and updates `running`), then the normalize. Two
///   launches; one, reading `x` once, for a channels-last or `(N, C)` tensor without an
///   epilogue that fits on chip when the context has the single-pass forward on
///   ([`GpuContext::with_single_pass_forward`]). An empty batch (`N * spatial == 0`) writes
///   nothing and leaves the statistics as they are.
/// - [`ForwardStats::Running`] (eval): `y = (x - running_mean) * (weight / sqrt(running_var +
///   eps)) + bias`, one launch.
///
/// Errors, checked before anything is queued in this order (as [`crate::reference`] does):
/// [`Error::BufferLength`](crate::Error::BufferLength) for the plain buffers, then for the
/// epilogue's `z` and mask, [`Error::InvalidEps`](crate::Error::InvalidEps),
/// [`Error::InvalidMomentum`](crate::Error::InvalidMomentum), and in training
/// [`Error::SingleValuePerChannel`](crate::Error::SingleValuePerChannel).
pub fn forward<T: Element>(
    gpu: &GpuContext,
    workspace: &mut Workspace,
    request: Forward<'_, T>,
) -> Result<()> {
    request.check()?;
    if let ForwardStats::Batch(_) = request.stats {
        validate::batch_statistics(&request.desc)?;
    }
    let Forward {
        desc,
        x,
        weight,
        bias,
        mut stats,
        mut y,
        mut epilogue,
    } = request;
    if desc.numel() == 0 {
        return Ok(());
    }

    if let (ForwardStats::Batch(batch), Epilogue::None) = (&mut stats, &epilogue) {
        let op = SinglePass {
            desc: &desc,
            x: &x,
            weight: weight.as_ref(),
            bias: bias.as_ref(),
        };
        if ops::single_pass_forward(gpu, workspace, &op, batch, &mut y)? {
            return Ok(());
        }
    }
    let saved;
    let stats = match &mut stats {
        ForwardStats::Batch(batch) => {
            ops::batch_statistics(gpu, workspace, &desc, &x, batch)?;
            saved = SavedStats {
                mean: batch.saved.mean.as_view(),
                mean_lo: Some(batch.saved.mean_lo.as_view()),
                invstd: batch.saved.invstd.as_view(),
            };
            Normalization::Batch(&saved)
        }
        ForwardStats::Running { stats, eps } => Normalization::Running(stats, *eps),
    };
    let op = Normalize {
        desc: &desc,
        x: &x,
        weight: weight.as_ref(),
        bias: bias.as_ref(),
        stats,
    };
    ops::normalize(gpu, &op, &mut y, &mut epilogue)
}

/// A backward: the gradients of a forward's `x` and parameters from `dy`.
#[derive(Debug)]
pub struct Backward<'a, T> {
    /// Shape and memory order of `x`, `dy`, `dx` and `dz`.
    pub desc: TensorDesc,
    /// The forward's input, `desc.numel()` elements.
    pub x: CudaView<'a, T>,
    /// The gradient of the forward's output, `desc.numel()` elements.
    pub dy: CudaView<'a, T>,
    /// `[C]`, or `None` for 1.
    pub weight: Option<CudaView<'a, f32>>,
    /// The forward's saved batch statistics (training) or the running ones (eval).
    pub stats: BackwardStats<'a>,
    /// Which gradients to write.
    pub grads: GradientsMut<'a, T>,
    /// The backward of the forward's epilogue.
    pub epilogue: EpilogueGrad<'a, T>,
}

/// Batch-norm backward.
///
/// - [`BackwardStats::Batch`] (training): one split reduction of `sum(dy)` and
///   `sum(dy * x_hat)` per channel (which also writes `dweight` and `dbias`), then one
///   elementwise pass `dx = weight * invstd * (dy - sum(dy) / m - x_hat * sum(dy * x_hat) / m)`.
///   `x` and `dy` are read twice, `dx` written once.
/// - [`BackwardStats::Running`] (eval: the statistics are constants of the forward):
///   `dx = dy * weight / sqrt(running_var + eps)` in one pass, which also reduces `dweight` and
///   `dbias` when they are asked for (`x` and `dy` read once); without `dx`, the reduction alone.
///
/// With a fused epilogue, of `dy_eff = mask ? dy : 0`, and `dz = dy_eff` when asked for.
///
/// Errors, before anything is queued: [`Error::BufferLength`](crate::Error::BufferLength) for
/// the plain buffers, then the mask and `dz`; in training
/// [`Error::SingleValuePerChannel`](crate::Error::SingleValuePerChannel), in eval
/// [`Error::InvalidEps`](crate::Error::InvalidEps).
pub fn backward<T: Element>(
    gpu: &GpuContext,
    workspace: &mut Workspace,
    request: Backward<'_, T>,
) -> Result<()> {
    let Backward {
        desc,
        x,
        dy,
        weight,
        stats,
        grads,
        mut epilogue,
    } = request;
    let stat_buffers = match &stats {
        BackwardStats::Batch(saved) => saved.buffers(),
        BackwardStats::Running { stats, .. } => stats.buffers(),
    };
    Buffers {
        x: x.len(),
        dy: Some(dy.len()),
        dx: grads.dx.as_ref().map(|d| d.len()),
        weight: weight.as_ref().map(|w| w.len()),
        dweight: grads.dweight.as_ref().map(|d| d.len()),
        dbias: grads.dbias.as_ref().map(|d| d.len()),
        ..stat_buffers
    }
    .check(&desc)?;
    epilogue.check(&desc)?;
    match &stats {
        BackwardStats::Batch(_) => validate::batch_statistics(&desc)?,
        BackwardStats::Running { eps, .. } => validate_eps(*eps)?,
    }
    let op = Gradient {
        desc: &desc,
        x: &x,
        dy: &dy,
        weight: weight.as_ref(),
        stats: Normalization::of(&stats),
    };
    ops::backward(gpu, workspace, &op, grads, &mut epilogue)
}

/// The batch norm a [`fold`] folds: its running statistics, optional affine parameters and eps.
#[derive(Debug)]
pub struct FoldBatchNorm<'a> {
    /// `[C_out]` running mean.
    pub running_mean: CudaView<'a, f32>,
    /// `[C_out]` running variance.
    pub running_var: CudaView<'a, f32>,
    /// Optional `[C_out]` weight (1 when absent).
    pub weight: Option<CudaView<'a, f32>>,
    /// Optional `[C_out]` bias (0 when absent).
    pub bias: Option<CudaView<'a, f32>>,
    /// The batch norm's epsilon.
    pub eps: f32,
}

/// Folds an eval-mode batch norm into the convolution or linear layer before it:
/// `W' = W * s` along the output channel, `b' = (b - running_mean) * s + bias`, with
/// `s = weight / sqrt(running_var + eps)`, computed in f64 and rounded once to `T`.
///
/// `weight` is read from `weight_in` (or, when `None`, from `weight_out` itself: in place) and
/// written to `weight_out`, in the memory order of `spec`; `conv_bias` is the layer's own bias
/// (`None` when it has none) and `bias_out` receives the folded bias `[C_out]`.
pub fn fold<T: Element>(
    gpu: &GpuContext,
    spec: &FoldSpec,
    weight_in: Option<&CudaView<'_, T>>,
    weight_out: &mut CudaViewMut<'_, T>,
    conv_bias: Option<&CudaView<'_, T>>,
    bias_out: &mut CudaViewMut<'_, T>,
    bn: &FoldBatchNorm<'_>,
) -> Result<()> {
    let map = spec.map();
    let c_out = map.c_out;
    validate_eps(bn.eps)?;
    if let Some(w) = weight_in {
        validate::buffer("weight", map.numel, w.len())?;
    }
    validate::buffer("weight_out", map.numel, weight_out.len())?;
    validate::buffer("bias_out", c_out, bias_out.len())?;
    if let Some(b) = conv_bias {
        validate::buffer("conv_bias", c_out, b.len())?;
    }
    let per_channel = [
        ("bn.running_mean", Some(bn.running_mean.len())),
        ("bn.running_var", Some(bn.running_var.len())),
        ("bn.weight", bn.weight.as_ref().map(|w| w.len())),
        ("bn.bias", bn.bias.as_ref().map(|b| b.len())),
    ];
    for (what, len) in per_channel {
        if let Some(len) = len {
            validate::buffer(what, c_out, len)?;
        }
    }
    let buffers = FoldBuffers {
        weight_in: weight_in.map(|w| w.slice(..)),
        weight_out: weight_out.slice_mut(..),
        conv_bias: conv_bias.map(|b| b.slice(..)),
        bias_out: bias_out.slice_mut(..),
    };
    let stats = FoldStats {
        running: RunningStats {
            mean: bn.running_mean.slice(..),
            var: bn.running_var.slice(..),
        },
        weight: bn.weight.as_ref(),
        bias: bn.bias.as_ref(),
        eps: bn.eps,
    };
    ops::fold(gpu, spec, buffers, &stats)
}
