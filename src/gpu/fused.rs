//! Fused ReLU epilogues on the GPU, stateless like [`super::functional`]: `y = relu(BN(x))` and
//! the ResNet block's `y = relu(BN(x) + z)`, whose forward writes a 1-bit-per-element ReLU mask
//! instead of keeping `y`, and whose backward reads the mask: `dy_eff = mask ? dy : 0`, then the
//! plain batch-norm backward of `dy_eff`, and `dz = dy_eff` for the residual form.
//!
//! Every layout and dtype the plain calls take (channels-first and channels-last, any `C`, f32,
//! f16, bf16, unaligned views), unlike cuDNN's fused calls (NHWC, f16, `C % 4 == 0`). The
//! mask's length is [`mask_words`]`(desc)` `u32` words, its layout in [`crate::epilogue`]
//! (independent of the dtype). `relu(NaN)` is NaN (PyTorch's) with mask bit 0; `BN(x) + z` is
//! computed in f32 and rounded once to `T` (not rounded to `T` after the batch norm first, as
//! the unfused PyTorch ops do: within one rounding of them).
//!
//! | call | launches | reads | writes |
//! | --- | --- | --- | --- |
//! | [`forward_training`] | statistics, normalize | `x` twice, `z` | `y`, mask |
//! | [`forward_inference`] | normalize | `x`, `z` | `y`, mask |
//! | [`backward_training`] | reduce, dx | `x`, `dy`, mask twice | `dx`, `dz` |
//! | [`backward_inference`] | (reduce), dx | `x`, `dy`, mask | `dx`, `dz` |
//!
//! Validation as in [`super::functional`], with the fused buffers (`z`, the mask, `dz`) checked
//! right after the plain ones, as [`crate::reference::fused`] does.
//!
//! ```no_run
//! use batchnorm_cuda::gpu::{fused, functional, GpuContext, Workspace};
//! use batchnorm_cuda::TensorDesc;
//!
//! let gpu = GpuContext::new(0)?;
//! let desc = TensorDesc::nhwc(8, 64, 56, 56)?;
//! let stream = gpu.stream();
//! let x = stream.clone_htod(&vec![half::f16::ONE; desc.numel()])?;
//! let z = stream.clone_htod(&vec![half::f16::ONE; desc.numel()])?; // the shortcut
//! let mut y = stream.alloc_zeros::<half::f16>(desc.numel())?;
//! let mut mask = stream.alloc_zeros::<u32>(fused::mask_words(&desc))?;
//! let (mut mean, mut invstd) = (stream.alloc_zeros(64)?, stream.alloc_zeros(64)?);
//! let mut mean_lo = stream.alloc_zeros(64)?;
//! let mut ws = Workspace::new();
//! fused::forward_training(
//!     &gpu, &mut ws, &x.as_view(), &desc, None, None, None, 1e-5,
//!     fused::ReluEpilogue { residual: Some(z.as_view()), mask: Some(mask.as_view_mut()) },
//!     &mut y.as_view_mut(),
//!     functional::SavedStatsMut {
//!         mean: mean.as_view_mut(),
//!         mean_lo: mean_lo.as_view_mut(),
//!         invstd: invstd.as_view_mut(),
//!     },
//! )?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use super::context::GpuContext;
use super::functional::{
    self, GradientsMut, RunningStats, RunningUpdate, SavedStats, SavedStatsMut,
};
use super::workspace::Workspace;
use crate::dtype::Element;
use crate::error::Result;
use crate::shape::TensorDesc;
use cudarc::driver::{CudaView, CudaViewMut};

pub use crate::epilogue::{mask_words, Epilogue};

/// The fused part of a forward: what is added before the ReLU, and where the mask goes.
#[derive(Debug)]
pub struct ReluEpilogue<'a, T> {
    /// `z` of `y = relu(BN(x) + z)`, shape and layout of `x` (may be the same memory as `y`);
    /// `None` for `y = relu(BN(x))`.
    pub residual: Option<CudaView<'a, T>>,
    /// Receives the ReLU mask, [`mask_words`] words, every word written; `None` writes no mask
    /// (inference without a backward).
    pub mask: Option<CudaViewMut<'a, u32>>,
}

/// The fused part of a backward: the forward's mask and the optional residual gradient.
pub(crate) struct ReluGrad<'m, 'a, T> {
    pub mask: &'m CudaView<'a, u32>,
    pub dz: Option<CudaViewMut<'a, T>>,
}

/// Training forward with a fused epilogue: batch statistics (as
/// [`functional::forward_training`]: `saved` written, `running` updated), then
/// `y = relu((x - mean) * weight * invstd + bias [+ z])` and the mask, in one pass.
///
/// - `x`, `y`, `epilogue.residual`: `desc.numel()` elements of `T` in `desc`'s memory order.
/// - `epilogue.mask`: [`mask_words`]`(desc)` words.
///
/// Errors, before anything is queued: those of [`functional::forward_training`], with
/// [`Error::BufferLength`](crate::Error::BufferLength) for `z` and `mask` checked right after
/// the plain buffers.
#[allow(clippy::too_many_arguments)]
pub fn forward_training<T: Element>(
    gpu: &GpuContext,
    workspace: &mut Workspace,
    x: &CudaView<'_, T>,
    desc: &TensorDesc,
    weight: Option<&CudaView<'_, f32>>,
    bias: Option<&CudaView<'_, f32>>,
    running: Option<RunningUpdate<'_>>,
    eps: f32,
    epilogue: ReluEpilogue<'_, T>,
    y: &mut CudaViewMut<'_, T>,
    saved: SavedStatsMut<'_>,
) -> Result<()> {
    functional::forward_training_with(
        gpu,
        workspace,
        x,
        desc,
        weight,
        bias,
        running,
        eps,
        y,
        saved,
        Some(epilogue),
    )
}

/// Eval forward with a fused epilogue, one launch:
/// `y = relu((x - running_mean) * weight / sqrt(running_var + eps) + bias [+ z])` and the mask.
///
/// Shapes as in [`forward_training`]. Errors: those of [`functional::forward_inference`], with
/// `z` and `mask` checked right after the plain buffers.
#[allow(clippy::too_many_arguments)]
pub fn forward_inference<T: Element>(
    gpu: &GpuContext,
    x: &CudaView<'_, T>,
    desc: &TensorDesc,
    weight: Option<&CudaView<'_, f32>>,
    bias: Option<&CudaView<'_, f32>>,
    running: &RunningStats<'_>,
    eps: f32,
    epilogue: ReluEpilogue<'_, T>,
    y: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    functional::forward_inference_with(gpu, x, desc, weight, bias, running, eps, y, Some(epilogue))
}

/// Training backward of a fused forward: [`functional::backward_training`] of
/// `dy_eff = mask ? dy : 0` (the `*_relu` kernels mask `dy` as they load it: nothing extra is
/// written), and `dz = dy_eff` when `dz` is given (the residual's gradient; written by the dx
/// pass, which then runs even without `grads.dx`).
///
/// - `x`, `dy`, `grads.dx`, `dz`: `desc.numel()` elements; `mask`: [`mask_words`]`(desc)`
///   words from the forward (read only: one mask serves any number of backwards).
///
/// Errors: those of [`functional::backward_training`], with `mask` and `dz` checked right after
/// the plain buffers.
#[allow(clippy::too_many_arguments)]
pub fn backward_training<T: Element>(
    gpu: &GpuContext,
    workspace: &mut Workspace,
    x: &CudaView<'_, T>,
    dy: &CudaView<'_, T>,
    mask: &CudaView<'_, u32>,
    desc: &TensorDesc,
    weight: Option<&CudaView<'_, f32>>,
    saved: &SavedStats<'_>,
    grads: GradientsMut<'_, T>,
    dz: Option<CudaViewMut<'_, T>>,
) -> Result<()> {
    let relu = ReluGrad { mask, dz };
    functional::backward_training_with(
        gpu,
        workspace,
        x,
        dy,
        desc,
        weight,
        saved,
        grads,
        Some(relu),
    )
}

/// Eval-mode backward of a fused forward: [`functional::backward_inference`] of
/// `dy_eff = mask ? dy : 0`, and `dz = dy_eff` when given.
///
/// Shapes as in [`backward_training`]. Errors: those of [`functional::backward_inference`],
/// with `mask` and `dz` checked right after the plain buffers.
#[allow(clippy::too_many_arguments)]
pub fn backward_inference<T: Element>(
    gpu: &GpuContext,
    workspace: &mut Workspace,
    x: &CudaView<'_, T>,
    dy: &CudaView<'_, T>,
    mask: &CudaView<'_, u32>,
    desc: &TensorDesc,
    weight: Option<&CudaView<'_, f32>>,
    running: &RunningStats<'_>,
    eps: f32,
    grads: GradientsMut<'_, T>,
    dz: Option<CudaViewMut<'_, T>>,
) -> Result<()> {
    let relu = ReluGrad { mask, dz };
    functional::backward_inference_with(
        gpu,
        workspace,
        x,
        dy,
        desc,
        weight,
        running,
        eps,
        grads,
        Some(relu),
    )
}

#[cfg(test)]
mod tests {
    use super::super::launch::{self, Traversal};
    use crate::dtype::DType;
    use crate::shape::{Layout, TensorDesc};

    /// The normalize kernels write a rows mask word from the lanes of one block: they need
    /// `bx * VEC >= 32` (a word's 32 channels inside one block) or a single channel tile
    /// (kernels/epilogue.cuh, store_mask). The elementwise launch must keep it for every C.
    #[test]
    fn rows_launches_keep_mask_words_inside_a_block() {
        for c in (1..=300).chain([511, 512, 513, 1000, 1001, 4096, 65_537]) {
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let desc = TensorDesc::new(&[3, c], Layout::ChannelsLast).unwrap();
                let g = desc.geometry();
                assert_eq!(Traversal::of(&g), Traversal::Rows);
                let l = launch::elementwise(&g, dtype, 132);
                let vec = launch::vector_width(dtype);
                let (bx, tiles) = (l.block.0 as u64, l.grid.0);
                assert!(bx * vec >= 32 || tiles == 1, "C = {c} {dtype}: {l:?}");
            }
        }
    }
}
