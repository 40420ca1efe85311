//! Input checks shared by the CPU reference and the GPU path, so both refuse the same calls with
//! the same [`Error`].
//!
//! Every function here is pure and cheap: it looks at lengths, descriptors and (for
//! [`running_var`]) host values, never at device memory. A call validates everything before it
//! writes anything, so a refused call leaves every output and every piece of state untouched.
//!
//! The order of the checks is part of the contract (the first failing check is the error
//! reported): [`Buffers::check`] fixes it for buffer lengths.

use crate::error::{Error, Result};
use crate::shape::TensorDesc;
use cudarc::driver::{CudaView, CudaViewMut};

pub use crate::config::{validate_eps, validate_momentum};

/// The element count of a buffer, host slice or device view, for the checks.
pub trait Length {
    /// Number of elements.
    fn length(&self) -> usize;
}

impl<T> Length for &[T] {
    fn length(&self) -> usize {
        self.len()
    }
}

impl<T> Length for &mut [T] {
    fn length(&self) -> usize {
        self.len()
    }
}

impl<T> Length for CudaView<'_, T> {
    fn length(&self) -> usize {
        self.len()
    }
}

impl<T> Length for CudaViewMut<'_, T> {
    fn length(&self) -> usize {
        self.len()
    }
}

/// A buffer named `what` must hold exactly `needed` elements.
///
/// Errors: [`Error::BufferLength`] when `got != needed`.
pub fn buffer(what: &'static str, needed: usize, got: usize) -> Result<()> {
    if got == needed {
        Ok(())
    } else {
        Err(Error::BufferLength { what, needed, got })
    }
}

/// The lengths of the buffers one batch-norm call takes; `None` for a buffer it does not take.
///
/// Activation-shaped buffers (`x`, `y`, `dy`, `dx`) need `desc.numel()` elements, per-channel
/// buffers need `desc.channels()`. Fill in the ones a call has and leave the rest at
/// `Default::default()`:
///
/// ```
/// use batchnorm_cuda::{validate::Buffers, Error, TensorDesc};
///
/// let desc = TensorDesc::nchw(2, 3, 4, 4).unwrap();
/// let call = Buffers { x: 96, y: Some(96), weight: Some(2), ..Default::default() };
/// assert!(matches!(
///     call.check(&desc),
///     Err(Error::BufferLength { what: "weight", needed: 3, got: 2 })
/// ));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Buffers {
    /// The input `x`.
    pub x: usize,
    /// The output `y` of a forward.
    pub y: Option<usize>,
    /// The incoming gradient `dy` of a backward.
    pub dy: Option<usize>,
    /// The gradient `dx` a backward writes.
    pub dx: Option<usize>,
    /// The affine scale `weight`.
    pub weight: Option<usize>,
    /// The affine shift `bias`.
    pub bias: Option<usize>,
    /// `running_mean`, read or updated.
    pub running_mean: Option<usize>,
    /// `running_var`, read or updated.
    pub running_var: Option<usize>,
    /// The batch mean saved by a training forward.
    pub save_mean: Option<usize>,
    /// The low part of that mean (`save_mean + save_mean_lo` is the mean in double-float).
    pub save_mean_lo: Option<usize>,
    /// The batch `1 / sqrt(var + eps)` saved by a training forward.
    pub save_invstd: Option<usize>,
    /// The weight gradient a backward writes.
    pub dweight: Option<usize>,
    /// The bias gradient a backward writes.
    pub dbias: Option<usize>,
}

impl Buffers {
    /// Checks every given length against `desc`, in the order the fields are declared.
    ///
    /// Errors: [`Error::BufferLength`] naming the first buffer of the wrong length.
    pub fn check(&self, desc: &TensorDesc) -> Result<()> {
        let activations = [
            ("x", Some(self.x)),
            ("y", self.y),
            ("dy", self.dy),
            ("dx", self.dx),
        ];
        for (what, len) in activations {
            if let Some(len) = len {
                buffer(what, desc.numel(), len)?;
            }
        }
        let per_channel = [
            ("weight", self.weight),
            ("bias", self.bias),
            ("running_mean", self.running_mean),
            ("running_var", self.running_var),
            ("save_mean", self.save_mean),
            ("save_mean_lo", self.save_mean_lo),
            ("save_invstd", self.save_invstd),
            ("dweight", self.dweight),
            ("dbias", self.dbias),
        ];
        for (what, len) in per_channel {
            if let Some(len) = len {
                buffer(what, desc.channels(), len)?;
            }
        }
        Ok(())
    }
}

/// An input with `desc.channels()` channels fed to a layer built for `expected` channels.
///
/// Errors: [`Error::ChannelMismatch`] when they differ.
pub fn channels(expected: usize, desc: &TensorDesc) -> Result<()> {
    if desc.channels() == expected {
        Ok(())
    } else {
        Err(Error::ChannelMismatch {
            expected,
            got: desc.channels(),
        })
    }
}

/// A second activation tensor (`what`, e.g. `dy`) must have the shape and layout of `x`.
///
/// Errors: [`Error::ShapeMismatch`] when the logical shapes differ (checked first), then
/// [`Error::LayoutMismatch`] when the memory layouts differ.
pub fn same_tensor(what: &'static str, x: &TensorDesc, other: &TensorDesc) -> Result<()> {
    if x.dims() != other.dims() {
        return Err(Error::ShapeMismatch {
            what,
            expected: x.dims().to_vec(),
            got: other.dims().to_vec(),
        });
    }
    if x.layout() != other.layout() {
        return Err(Error::LayoutMismatch {
            what,
            expected: x.layout(),
            got: other.layout(),
        });
    }
    Ok(())
}

/// Batch statistics need more than one value per channel, as in PyTorch. An empty batch
/// (`m = 0`) is allowed: it produces an empty output and leaves the statistics alone.
///
/// Errors: [`Error::SingleValuePerChannel`] when `desc.per_channel() == 1`.
pub fn batch_statistics(desc: &TensorDesc) -> Result<()> {
    if desc.per_channel() == 1 {
        Err(Error::SingleValuePerChannel {
            dims: desc.dims().to_vec(),
        })
    } else {
        Ok(())
    }
}

/// Every running variance must be finite and `>= 0` (checked where running statistics are set
/// from outside, e.g. a layer's setter).
///
/// Errors: [`Error::InvalidRunningVar`] naming the first bad channel.
pub fn running_var(var: &[f32]) -> Result<()> {
    match var.iter().position(|v| !(v.is_finite() && *v >= 0.0)) {
        Some(channel) => Err(Error::InvalidRunningVar {
            channel,
            value: var[channel],
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::Layout;

    fn desc() -> TensorDesc {
        TensorDesc::new(&[2, 3, 5], Layout::ChannelsFirst).unwrap()
    }

    #[test]
    fn buffer_lengths_are_checked_in_declaration_order() {
        let ok = Buffers {
            x: 30,
            y: Some(30),
            dy: Some(30),
            dx: Some(30),
            weight: Some(3),
            bias: Some(3),
            running_mean: Some(3),
            running_var: Some(3),
            save_mean: Some(3),
            save_mean_lo: Some(3),
            save_invstd: Some(3),
            dweight: Some(3),
            dbias: Some(3),
        };
        assert!(ok.check(&desc()).is_ok());
        assert!(Buffers {
            x: 30,
            ..Default::default()
        }
        .check(&desc())
        .is_ok());

        let bad_x = Buffers {
            x: 29,
            weight: Some(2),
            ..ok
        };
        assert!(matches!(
            bad_x.check(&desc()),
            Err(Error::BufferLength {
                what: "x",
                needed: 30,
                got: 29
            })
        ));
        let bad_dx_and_bias = Buffers {
            dx: Some(31),
            bias: Some(4),
            ..ok
        };
        assert!(matches!(
            bad_dx_and_bias.check(&desc()),
            Err(Error::BufferLength {
                what: "dx",
                needed: 30,
                got: 31
            })
        ));
        let bad_dbias = Buffers {
            dbias: Some(0),
            ..ok
        };
        assert!(matches!(
            bad_dbias.check(&desc()),
            Err(Error::BufferLength {
                what: "dbias",
                needed: 3,
                got: 0
            })
        ));
    }

    #[test]
    fn channel_count_must_match_the_layer() {
        assert!(channels(3, &desc()).is_ok());
        assert!(matches!(
            channels(4, &desc()),
            Err(Error::ChannelMismatch {
                expected: 4,
                got: 3
            })
        ));
    }

    #[test]
    fn second_tensor_must_match_shape_then_layout() {
        let x = desc();
        assert!(same_tensor("dy", &x, &x).is_ok());
        let other_shape = TensorDesc::new(&[2, 3, 6], Layout::ChannelsLast).unwrap();
        assert!(matches!(
            same_tensor("dy", &x, &other_shape),
            Err(Error::ShapeMismatch { what: "dy", .. })
        ));
        assert!(matches!(
            same_tensor("dy", &x, &x.with_layout(Layout::ChannelsLast)),
            Err(Error::LayoutMismatch {
                what: "dy",
                expected: Layout::ChannelsFirst,
                got: Layout::ChannelsLast
            })
        ));
    }

    #[test]
    fn one_value_per_channel_is_refused_but_an_empty_batch_is_not() {
        let single = TensorDesc::new(&[1, 4], Layout::ChannelsFirst).unwrap();
        assert!(matches!(
            batch_statistics(&single),
            Err(Error::SingleValuePerChannel { dims }) if dims == [1, 4]
        ));
        let single_pixel = TensorDesc::nhwc(1, 4, 1, 1).unwrap();
        assert!(batch_statistics(&single_pixel).is_err());
        let empty = TensorDesc::new(&[0, 4, 3], Layout::ChannelsFirst).unwrap();
        assert!(batch_statistics(&empty).is_ok());
        assert!(
            batch_statistics(&TensorDesc::new(&[2, 4], Layout::ChannelsFirst).unwrap()).is_ok()
        );
    }

    #[test]
    fn running_var_must_be_finite_and_non_negative() {
        assert!(running_var(&[0.0, 1.0, 1e30]).is_ok());
        assert!(running_var(&[]).is_ok());
        for bad in [-1e-30, f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            match running_var(&[1.0, 2.0, bad, -1.0]) {
                Err(Error::InvalidRunningVar { channel: 2, value }) => {
                    assert_eq!(value.to_bits(), bad.to_bits())
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
