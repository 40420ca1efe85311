//! Which candle layouts the adapter takes, and how its ops' outputs are laid out.
//!
//! A candle tensor `(N, C, spatial...)` is either contiguous (channels-first) or a permuted view
//! of a contiguous `(N, spatial..., C)` (channels-last, what `x.permute((0, 3, 1, 2))` of an
//! NHWC tensor gives). The ops read its storage in that memory order and write their outputs as
//! contiguous tensors of the memory-order shape ([`TensorDesc::memory_dims`]); [`to_logical`]
//! permutes such an output back to `(N, C, spatial...)`, so it keeps the input's layout.

use crate::shape::{Layout, TensorDesc};
use candle_core::{Error, Result, Tensor};

/// Where an activation's elements are in its storage: the descriptor (logical shape and memory
/// order) and the offset of the first element; the `desc.numel()` elements follow contiguously.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Placement {
    pub desc: TensorDesc,
    pub start: usize,
}

impl Placement {
    /// The placement of an activation `(N, C, spatial...)` with candle layout `layout`.
    ///
    /// Errors: the crate's [`crate::Error::Rank`] (wrapped) for a rank outside 2 to 5, and a
    /// candle error naming the strides when the layout is neither channels-first nor
    /// channels-last.
    pub fn of(layout: &candle_core::Layout) -> Result<Self> {
        let dims = layout.dims();
        for memory_order in [Layout::ChannelsFirst, Layout::ChannelsLast] {
            let desc = TensorDesc::new(dims, memory_order).map_err(Error::wrap)?;
            if dense_in(&desc, layout.stride()) {
                return Ok(Self {
                    desc,
                    start: layout.start_offset(),
                });
            }
        }
        Err(Error::Msg(format!(
            "batchnorm-cuda: a tensor of shape {dims:?} with strides {:?} is neither contiguous \
             (N, C, ...) nor channels-last (a permuted contiguous (N, ..., C)); call .contiguous() \
             first",
            layout.stride()
        ))
        .bt())
    }

    /// The range of the storage holding the elements.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.start..self.start + self.desc.numel()
    }
}

/// The logical axes in memory order, outermost first: `[0, 1, 2, ...]` channels-first,
/// `[0, 2, ..., 1]` channels-last.
fn memory_axes(desc: &TensorDesc) -> Vec<usize> {
    let rank = desc.rank();
    match desc.layout() {
        Layout::ChannelsFirst => (0..rank).collect(),
        Layout::ChannelsLast => std::iter::once(0).chain(2..rank).chain([1]).collect(),
    }
}

/// Whether `strides` (per logical axis) are those of a dense tensor in `desc`'s memory order.
/// The stride of an axis of size 1 is never used to address an element, so it may be anything.
fn dense_in(desc: &TensorDesc, strides: &[usize]) -> bool {
    let mut expected = 1;
    for axis in memory_axes(desc).into_iter().rev() {
        let size = desc.dims()[axis];
        if size > 1 && strides[axis] != expected {
            return false;
        }
        expected *= size;
    }
    true
}

/// The start of a contiguous tensor's elements in its storage (a gradient made contiguous in
/// the memory order of `x`).
pub(crate) fn contiguous_start(what: &str, layout: &candle_core::Layout) -> Result<usize> {
    if layout.is_contiguous() {
        Ok(layout.start_offset())
    } else {
        Err(Error::Msg(format!("batchnorm-cuda: {what} must be contiguous")).bt())
    }
}

/// An op's output, a contiguous tensor of `desc.memory_dims()`, as the logical
/// `(N, C, spatial...)` tensor: itself channels-first, a permuted view channels-last.
pub(crate) fn to_logical(memory_order: Tensor, desc: &TensorDesc) -> Result<Tensor> {
    match desc.layout() {
        Layout::ChannelsFirst => Ok(memory_order),
        Layout::ChannelsLast => {
            // Memory axis k holds logical axis memory_axes[k]; the inverse permutation.
            let axes = memory_axes(desc);
            let mut inverse = vec![0; axes.len()];
            for (memory_axis, &logical_axis) in axes.iter().enumerate() {
                inverse[logical_axis] = memory_axis;
            }
            memory_order.permute(inverse)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn contiguous_is_channels_first_and_a_permuted_nhwc_is_channels_last() -> Result<()> {
        let nhwc = Tensor::zeros((2, 5, 7, 3), DType::F32, &Device::Cpu)?;
        let nchw_view = nhwc.narrow(0, 1, 1)?.permute((0, 3, 1, 2))?;
        let placement = Placement::of(nchw_view.layout())?;
        assert_eq!(placement.desc.dims(), [1, 3, 5, 7]);
        assert_eq!(placement.desc.layout(), Layout::ChannelsLast);
        assert_eq!(placement.range(), 105..210);

        let nchw = Tensor::zeros((2, 3, 5, 7), DType::F32, &Device::Cpu)?;
        assert_eq!(
            Placement::of(nchw.layout())?.desc.layout(),
            Layout::ChannelsFirst
        );
        Ok(())
    }

    #[test]
    fn other_strides_are_refused_with_their_strides() -> Result<()> {
        let t = Tensor::zeros((2, 3, 5, 7), DType::F32, &Device::Cpu)?;
        let transposed = t.transpose(2, 3)?;
        let err = Placement::of(transposed.layout()).unwrap_err().to_string();
        assert!(err.contains("neither contiguous"), "{err}");
        assert!(err.contains("[105, 35, 1, 7]"), "{err}");
        let strided = t.narrow(3, 0, 4)?;
        assert!(Placement::of(strided.layout()).is_err());
        Ok(())
    }

    #[test]
    fn to_logical_undoes_the_memory_order() -> Result<()> {
        let values: Vec<f32> = (0..24).map(|v| v as f32).collect();
        let ndhwc = Tensor::from_vec(values, (1, 2, 3, 2, 2), &Device::Cpu)?;
        let desc = TensorDesc::new(&[1, 2, 2, 3, 2], Layout::ChannelsLast).unwrap();
        let logical = to_logical(ndhwc.clone(), &desc)?;
        assert_eq!(logical.dims(), [1, 2, 2, 3, 2]);
        // Element (n, c, d, h, w) of the logical view is element (n, d, h, w, c) in memory.
        let got = logical
            .get(0)?
            .get(1)?
            .get(1)?
            .get(2)?
            .get(0)?
            .to_scalar::<f32>()?;
        let want = ndhwc
            .get(0)?
            .get(1)?
            .get(2)?
            .get(0)?
            .get(1)?
            .to_scalar::<f32>()?;
        assert_eq!(got, want);
        assert_eq!(Placement::of(logical.layout())?.desc, desc);
        Ok(())
    }
}
