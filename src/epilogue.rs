//! Fused epilogues: `y = relu(BN(x))` and the ResNet block's `y = relu(BN(x) + z)`, and the
//! ReLU mask their backward reads instead of `y` (cuDNN's "reserve space"; apex groupbn's
//! bitmask), shared by the GPU ([`crate::gpu::functional`]) and the CPU reference
//! ([`crate::reference::fused`]).
//!
//! # The mask
//!
//! One bit per element: bit = `y > 0` for `y` as stored (after the residual add and the rounding
//! to the activation dtype), so ReLU's derivative at 0 is 0, as PyTorch's `threshold_backward`.
//! `relu(NaN)` is NaN (PyTorch's; `fmaxf` would give 0) with bit 0, so its gradient is 0.
//!
//! Layout, a function of the descriptor's element count alone (not of the dtype, the layout or
//! the load path a kernel takes): flat, the element at memory offset `e` is bit `e % 32` of word
//! `e / 32`, `ceil(numel / 32)` words; the padding bits of the last word are 0. Every
//! elementwise kernel walks whole words: the channels-first ones as one run of 16-byte vectors
//! that may span planes, the channels-last and `(N, C)` ones as super-rows of `lcm(C, 32 * VEC)`
//! values (whole words, whatever `C` is). [`mask_words`] is the length, [`mask_position`] the
//! place of one element, [`pack_mask`] and [`unpack_mask`] convert from and to one `bool` per
//! element in memory order.
//!
//! ```
//! use batchnorm_cuda::epilogue::{mask_position, mask_words};
//! use batchnorm_cuda::TensorDesc;
//!
//! let nchw = TensorDesc::nchw(2, 3, 7, 7)?; // 294 values: 10 words, 6 padding bits
//! assert_eq!(mask_words(&nchw), 10);
//! assert_eq!(mask_position(&nchw, 49 + 40), (2, 25)); // element 89
//! let nhwc = TensorDesc::nhwc(2, 3, 7, 7)?; // 98 rows of 3 channels: 294 values, 10 words
//! assert_eq!(mask_words(&nhwc), 10);
//! assert_eq!(mask_position(&nhwc, 3 * 10 + 2), (1, 0)); // row 10, channel 2: element 32
//! # Ok::<(), batchnorm_cuda::Error>(())
//! ```

use crate::error::Result;
use crate::shape::TensorDesc;
use crate::validate::{self, Length};

/// Which fused epilogue a forward ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EpilogueKind {
    /// `y = relu(BN(x))`.
    Relu,
    /// `y = relu(BN(x) + z)`: the backward also gives `dz`.
    AddRelu,
}

impl EpilogueKind {
    /// The epilogue of a call given whether it has a residual `z`.
    pub fn with_residual(residual: bool) -> Self {
        if residual {
            EpilogueKind::AddRelu
        } else {
            EpilogueKind::Relu
        }
    }
}

/// What a forward does after the batch norm, with its buffers: `Z` holds the shortcut `z`
/// (`desc.numel()` values in the layout of `x`, may be the memory of `y`), `M` receives the
/// ReLU mask ([`mask_words`] words, every one written; `None` writes no mask: inference
/// without a backward). The GPU's is [`crate::gpu::functional::Epilogue`], the CPU
/// reference's [`crate::reference::Epilogue`].
#[derive(Debug)]
pub enum Epilogue<Z, M> {
    /// `y = BN(x)`.
    None,
    /// `y = relu(BN(x))`.
    Relu {
        /// Receives the ReLU mask.
        mask: Option<M>,
    },
    /// `y = relu(BN(x) + z)`.
    AddRelu {
        /// The shortcut.
        z: Z,
        /// Receives the ReLU mask.
        mask: Option<M>,
    },
}

impl<Z: Length, M: Length> Epilogue<Z, M> {
    /// `relu(BN(x) + z)` when there is a residual `z`, else `relu(BN(x))`.
    pub fn relu(residual: Option<Z>, mask: Option<M>) -> Self {
        match residual {
            Some(z) => Epilogue::AddRelu { z, mask },
            None => Epilogue::Relu { mask },
        }
    }

    /// The fused epilogue, `None` for the plain batch norm.
    pub fn kind(&self) -> Option<EpilogueKind> {
        match self {
            Epilogue::None => None,
            Epilogue::Relu { .. } => Some(EpilogueKind::Relu),
            Epilogue::AddRelu { .. } => Some(EpilogueKind::AddRelu),
        }
    }

    /// Whether the epilogue writes a mask.
    pub fn writes_mask(&self) -> bool {
        matches!(
            self,
            Epilogue::Relu { mask: Some(_) } | Epilogue::AddRelu { mask: Some(_), .. }
        )
    }

    /// The buffers a fused forward adds to the plain one, checked after the plain call's
    /// buffers: `z`, then the mask, each when given.
    pub(crate) fn check(&self, desc: &TensorDesc) -> Result<()> {
        let (z, mask) = match self {
            Epilogue::None => return Ok(()),
            Epilogue::Relu { mask } => (None, mask),
            Epilogue::AddRelu { z, mask } => (Some(z), mask),
        };
        if let Some(z) = z {
            validate::buffer("z", desc.numel(), z.length())?;
        }
        if let Some(mask) = mask {
            validate::buffer("mask", mask_words(desc), mask.length())?;
        }
        Ok(())
    }
}

/// The backward of an [`Epilogue`], with its buffers: `M` holds the forward's mask (read only:
/// one mask serves any number of backwards), `D` receives `dz`. The backward runs the plain
/// batch-norm backward of `dy_eff = mask ? dy : 0`.
#[derive(Debug)]
pub enum EpilogueGrad<M, D> {
    /// The backward of [`Epilogue::None`].
    None,
    /// The backward of [`Epilogue::Relu`].
    Relu {
        /// The forward's mask.
        mask: M,
    },
    /// The backward of [`Epilogue::AddRelu`]: also `dz = dy_eff`, the shortcut's gradient
    /// (shape and layout of `x`), when `dz` is given.
    AddRelu {
        /// The forward's mask.
        mask: M,
        /// Receives the shortcut's gradient.
        dz: Option<D>,
    },
}

impl<M: Length, D: Length> EpilogueGrad<M, D> {
    /// The fused epilogue whose backward this is, `None` for the plain batch norm.
    pub fn kind(&self) -> Option<EpilogueKind> {
        match self {
            EpilogueGrad::None => None,
            EpilogueGrad::Relu { .. } => Some(EpilogueKind::Relu),
            EpilogueGrad::AddRelu { .. } => Some(EpilogueKind::AddRelu),
        }
    }

    /// The forward's mask, `None` for the plain backward.
    pub fn mask(&self) -> Option<&M> {
        match self {
            EpilogueGrad::None => None,
            EpilogueGrad::Relu { mask } | EpilogueGrad::AddRelu { mask, .. } => Some(mask),
        }
    }

    /// The buffers a fused backward adds to the plain one: the mask, then `dz` when given.
    pub(crate) fn check(&self, desc: &TensorDesc) -> Result<()> {
        if let Some(mask) = self.mask() {
            validate::buffer("mask", mask_words(desc), mask.length())?;
        }
        if let EpilogueGrad::AddRelu { dz: Some(dz), .. } = self {
            validate::buffer("dz", desc.numel(), dz.length())?;
        }
        Ok(())
    }
}

/// Number of `u32` words of the ReLU mask of a tensor described by `desc`: `ceil(numel / 32)`
/// (0 when it is empty).
pub fn mask_words(desc: &TensorDesc) -> usize {
    desc.numel().div_ceil(32)
}

/// `(word, bit)` of the element at memory offset `offset` (`< desc.numel()`) in the mask:
/// `(offset / 32, offset % 32)`, whatever the shape (the descriptor is taken so that callers
/// never assume it).
pub fn mask_position(_desc: &TensorDesc, offset: usize) -> (usize, u32) {
    (offset / 32, (offset % 32) as u32)
}

/// The mask of one `bool` per element in memory order (`desc.numel()` of them); padding bits 0.
///
/// Errors: [`Error::BufferLength`](crate::Error::BufferLength) (`"mask"`) unless `bits` holds
/// `desc.numel()` values.
pub fn pack_mask(desc: &TensorDesc, bits: &[bool]) -> Result<Vec<u32>> {
    validate::buffer("mask", desc.numel(), bits.len())?;
    let mut mask = vec![0u32; mask_words(desc)];
    for (offset, _) in bits.iter().enumerate().filter(|(_, &b)| b) {
        let (word, bit) = mask_position(desc, offset);
        mask[word] |= 1 << bit;
    }
    Ok(mask)
}

/// One `bool` per element in memory order, read from `mask`.
///
/// Errors: [`Error::BufferLength`](crate::Error::BufferLength) (`"mask"`) unless `mask` holds
/// [`mask_words`] words.
pub fn unpack_mask(desc: &TensorDesc, mask: &[u32]) -> Result<Vec<bool>> {
    validate::buffer("mask", mask_words(desc), mask.len())?;
    Ok((0..desc.numel())
        .map(|offset| {
            let (word, bit) = mask_position(desc, offset);
            mask[word] >> bit & 1 == 1
        })
        .collect())
}

/// Whether any padding bit of `mask` (a bit of the last word past the last element) is set: a
/// mask the forward wrote never has one.
pub fn has_padding_bits(desc: &TensorDesc, mask: &[u32]) -> bool {
    let tail = desc.numel() % 32; // bits used in the last word (0: all 32)
    tail != 0
        && mask
            .get(mask_words(desc) - 1)
            .is_some_and(|w| w >> tail != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::Layout;

    fn desc(dims: &[usize], layout: Layout) -> TensorDesc {
        TensorDesc::new(dims, layout).unwrap()
    }

    #[test]
    fn words_are_flat_for_every_layout() {
        // (N, C): 15 values in one word; 165 values: 5 words of 32 and 5 values in a sixth.
        assert_eq!(mask_words(&desc(&[5, 3], Layout::ChannelsFirst)), 1);
        assert_eq!(mask_words(&desc(&[5, 33], Layout::ChannelsFirst)), 6);
        assert_eq!(mask_words(&desc(&[7, 1], Layout::ChannelsLast)), 1);
        assert_eq!(mask_words(&desc(&[3, 32], Layout::ChannelsFirst)), 3);
        // Channels-first with inner > 1: 192, 198, 294 and 6 values.
        assert_eq!(mask_words(&desc(&[2, 3, 32], Layout::ChannelsFirst)), 6);
        assert_eq!(mask_words(&desc(&[2, 3, 33], Layout::ChannelsFirst)), 7);
        assert_eq!(mask_words(&desc(&[2, 3, 7, 7], Layout::ChannelsFirst)), 10);
        assert_eq!(mask_words(&desc(&[2, 3, 1, 1], Layout::ChannelsFirst)), 1);
        // Channels-last: 6272 values are 196 words, as the 98 rows of 64 channels (2 words each)
        // they were before the layout became flat; 720 values: 22.5 words, so 23.
        assert_eq!(
            mask_words(&desc(&[2, 64, 7, 7], Layout::ChannelsLast)),
            98 * 2
        );
        assert_eq!(
            mask_words(&desc(&[2, 3, 4, 5, 6], Layout::ChannelsLast)),
            23
        );
        // Empty batches have no mask.
        assert_eq!(mask_words(&desc(&[0, 3, 5], Layout::ChannelsFirst)), 0);
        assert_eq!(mask_words(&desc(&[2, 3, 0], Layout::ChannelsFirst)), 0);
        assert_eq!(mask_words(&desc(&[0, 3], Layout::ChannelsLast)), 0);
    }

    /// Every element gets its own bit, inside the mask, in memory order with no gap (flat).
    #[test]
    fn positions_are_distinct_and_in_range() {
        for dims in [
            &[3usize, 5][..],
            &[2, 40],
            &[7, 100],
            &[2, 257],
            &[4, 12, 3, 1],
            &[2, 3, 7],
            &[2, 3, 64],
            &[2, 3, 65],
            &[1, 2, 5, 7],
            &[2, 33, 2, 2],
        ] {
            for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
                let d = desc(dims, layout);
                let words = mask_words(&d);
                let mut seen = vec![0u32; words];
                let mut last = None;
                for offset in 0..d.numel() {
                    let (word, bit) = mask_position(&d, offset);
                    assert!(word < words && bit < 32, "{d}: {offset}");
                    assert_eq!(seen[word] >> bit & 1, 0, "{d}: {offset} shares a bit");
                    seen[word] |= 1 << bit;
                    let global = word * 32 + bit as usize;
                    assert_eq!(global, offset, "{d}: not flat");
                    assert!(last.is_none_or(|l| global > l), "{d}: not in memory order");
                    last = Some(global);
                }
                assert_eq!(
                    seen.iter().map(|w| w.count_ones() as usize).sum::<usize>(),
                    d.numel()
                );
                assert!(!has_padding_bits(&d, &seen), "{d}");
            }
        }
    }

    #[test]
    fn pack_and_unpack_round_trip() {
        let d = desc(&[3, 5, 7], Layout::ChannelsFirst);
        let bits: Vec<bool> = (0..d.numel()).map(|i| i % 3 == 0 || i % 7 == 1).collect();
        let mask = pack_mask(&d, &bits).unwrap();
        assert_eq!(mask.len(), mask_words(&d));
        assert!(!has_padding_bits(&d, &mask));
        assert_eq!(unpack_mask(&d, &mask).unwrap(), bits);
        // One segment of 105 values: word 0 holds elements 0..32 (i % 3 == 0 or i % 7 == 1),
        // word 3 elements 96..105, then 23 padding bits.
        assert_eq!(mask[0], 0b110_1001_0110_0100_1001_0011_0100_1011);
        let mut dirty = mask.clone();
        dirty[3] |= 1 << 9;
        assert!(has_padding_bits(&d, &dirty));
        assert!(matches!(
            unpack_mask(&d, &mask[1..]),
            Err(crate::Error::BufferLength { what: "mask", .. })
        ));
    }

    #[test]
    fn fused_buffers_are_checked_in_order() {
        type Forward<'a> = Epilogue<&'a [f32], &'a mut [u32]>;
        type Backward<'a> = EpilogueGrad<&'a [u32], &'a mut [f32]>;
        let d = desc(&[13, 5], Layout::ChannelsFirst); // 65 values: 3 words
        let (z, mut mask) = ([0.0f32; 66], [0u32; 4]);
        let ok: Forward = Epilogue::AddRelu {
            z: &z[..65],
            mask: Some(&mut mask[..3]),
        };
        assert!(ok.check(&d).is_ok());
        assert!(Forward::Relu { mask: None }.check(&d).is_ok());
        assert!(Forward::None.check(&d).is_ok());
        let short_both: Forward = Epilogue::AddRelu {
            z: &z[..64],
            mask: Some(&mut mask[..2]),
        };
        assert!(matches!(
            short_both.check(&d),
            Err(crate::Error::BufferLength {
                what: "z",
                needed: 65,
                got: 64
            })
        ));
        assert!(matches!(
            Forward::Relu {
                mask: Some(&mut mask[..2])
            }
            .check(&d),
            Err(crate::Error::BufferLength {
                what: "mask",
                needed: 3,
                got: 2
            })
        ));
        let (saved_mask, mut dz) = ([0u32; 3], [0.0f32; 66]);
        let ok: Backward = EpilogueGrad::AddRelu {
            mask: &saved_mask,
            dz: Some(&mut dz[..65]),
        };
        assert!(ok.check(&d).is_ok());
        let long_dz: Backward = EpilogueGrad::AddRelu {
            mask: &saved_mask,
            dz: Some(&mut dz),
        };
        assert!(matches!(
            long_dz.check(&d),
            Err(crate::Error::BufferLength { what: "dz", .. })
        ));
    }
}
