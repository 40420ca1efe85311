//! Shape and memory-layout descriptors, like a cuDNN tensor descriptor.

use crate::error::{Error, Result};
use std::fmt;

/// Memory order of an activation tensor whose logical shape is `(N, C, spatial...)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Layout {
    /// `N, C, D, H, W` order in memory (PyTorch's default, `torch.contiguous_format`).
    #[default]
    ChannelsFirst,
    /// `N, D, H, W, C` order in memory (`torch.channels_last` / `channels_last_3d`).
    ChannelsLast,
}

impl Layout {
    /// Parses the names used by the golden files (a test tool).
    #[cfg(feature = "test-tools")]
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "channels_first" => Some(Layout::ChannelsFirst),
            "channels_last" => Some(Layout::ChannelsLast),
            _ => None,
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::ChannelsFirst => "channels_first",
            Layout::ChannelsLast => "channels_last",
        })
    }
}

/// Most dimensions a batch-norm input may have: `(N, C, D, H, W)`.
pub const MAX_RANK: usize = 5;

/// The logical shape `(N, C, spatial...)` of a batch-norm input and its memory layout.
///
/// Ranks 2 to 5 cover `BatchNorm1d` on `(N, C)` and `(N, C, L)`, `BatchNorm2d` and `BatchNorm3d`.
/// Any dimension but `C` may be 0 (an empty batch).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TensorDesc {
    dims: [usize; MAX_RANK],
    rank: usize,
    layout: Layout,
}

/// The three-axis view every kernel works on: element `(o, c, i)` lives at
/// `(o * channels + c) * inner + i`. Channels-first: `outer = N`, `inner = D*H*W`;
/// channels-last: `outer = N*D*H*W`, `inner = 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Product of the axes before C in memory.
    pub outer: usize,
    /// C.
    pub channels: usize,
    /// Product of the axes after C in memory.
    pub inner: usize,
}

impl Geometry {
    /// Memory offset of the `(o, c, i)` element.
    pub fn offset(&self, outer: usize, channel: usize, inner: usize) -> usize {
        (outer * self.channels + channel) * self.inner + inner
    }

    /// Values per channel: the `m` of the batch statistics.
    pub fn per_channel(&self) -> usize {
        self.outer * self.inner
    }

    /// Calls `f` with the memory offset of every value of `channel`.
    pub fn for_each_offset(&self, channel: usize, mut f: impl FnMut(usize)) {
        for o in 0..self.outer {
            let base = self.offset(o, channel, 0);
            (base..base + self.inner).for_each(&mut f);
        }
    }
}

impl TensorDesc {
    /// A descriptor for the logical shape `dims = [N, C, spatial...]` stored in `layout`.
    ///
    /// Errors: [`Error::Rank`] unless `dims` has 2 to 5 entries; [`Error::ZeroChannels`] when
    /// `C = 0`; [`Error::TooLarge`] when the element count overflows `usize`.
    pub fn new(dims: &[usize], layout: Layout) -> Result<Self> {
        if !(2..=MAX_RANK).contains(&dims.len()) {
            return Err(Error::Rank { got: dims.len() });
        }
        if dims[1] == 0 {
            return Err(Error::ZeroChannels);
        }
        if dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .is_none()
        {
            return Err(Error::TooLarge {
                dims: dims.to_vec(),
            });
        }
        let mut all = [1; MAX_RANK];
        all[..dims.len()].copy_from_slice(dims);
        Ok(Self {
            dims: all,
            rank: dims.len(),
            layout,
        })
    }

    /// `(N, C, H, W)` in channels-first order.
    pub fn nchw(n: usize, c: usize, h: usize, w: usize) -> Result<Self> {
        Self::new(&[n, c, h, w], Layout::ChannelsFirst)
    }

    /// `(N, C, H, W)` stored channels-last (NHWC).
    pub fn nhwc(n: usize, c: usize, h: usize, w: usize) -> Result<Self> {
        Self::new(&[n, c, h, w], Layout::ChannelsLast)
    }

    /// The logical dimensions `[N, C, spatial...]`.
    pub fn dims(&self) -> &[usize] {
        &self.dims[..self.rank]
    }

    /// The dimensions in memory order (`[N, H, W, C]` for a channels-last 4-D tensor).
    pub fn memory_dims(&self) -> Vec<usize> {
        let mut dims = self.dims().to_vec();
        if self.layout == Layout::ChannelsLast {
            let c = dims.remove(1);
            dims.push(c);
        }
        dims
    }

    /// Number of dimensions, 2 to 5.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Memory layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// N.
    pub fn batch(&self) -> usize {
        self.dims[0]
    }

    /// C.
    pub fn channels(&self) -> usize {
        self.dims[1]
    }

    /// Product of the spatial dimensions (1 for `(N, C)`).
    pub fn spatial(&self) -> usize {
        self.dims[2..self.rank].iter().product()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.dims().iter().product()
    }

    /// Values per channel, `N * spatial`: the `m` of the batch statistics.
    pub fn per_channel(&self) -> usize {
        self.batch() * self.spatial()
    }

    /// The `(outer, C, inner)` view the kernels index with.
    pub fn geometry(&self) -> Geometry {
        match self.layout {
            Layout::ChannelsFirst => Geometry {
                outer: self.batch(),
                channels: self.channels(),
                inner: self.spatial(),
            },
            Layout::ChannelsLast => Geometry {
                outer: self.per_channel(),
                channels: self.channels(),
                inner: 1,
            },
        }
    }

    /// Same shape, other layout.
    pub fn with_layout(&self, layout: Layout) -> Self {
        Self { layout, ..*self }
    }
}

impl fmt::Debug for TensorDesc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {}", self.dims(), self.layout)
    }
}

impl fmt::Display for TensorDesc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_memory_order() {
        let nchw = TensorDesc::nchw(2, 3, 4, 5).unwrap();
        assert_eq!(
            nchw.geometry(),
            Geometry {
                outer: 2,
                channels: 3,
                inner: 20
            }
        );
        let nhwc = nchw.with_layout(Layout::ChannelsLast);
        assert_eq!(
            nhwc.geometry(),
            Geometry {
                outer: 40,
                channels: 3,
                inner: 1
            }
        );
        assert_eq!(nhwc.memory_dims(), vec![2, 4, 5, 3]);
        // Element (n=1, c=2, h=3, w=4): NCHW offset ((1*3+2)*4+3)*5+4, NHWC ((1*4+3)*5+4)*3+2.
        assert_eq!(nchw.geometry().offset(1, 2, 3 * 5 + 4), 119);
        assert_eq!(nhwc.geometry().offset(4 * 5 + 3 * 5 + 4, 2, 0), 119);
    }

    #[test]
    fn offsets_visit_each_element_once() {
        for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
            let desc = TensorDesc::new(&[3, 4, 2, 5], layout).unwrap();
            let g = desc.geometry();
            let mut seen = vec![0u8; desc.numel()];
            for c in 0..desc.channels() {
                g.for_each_offset(c, |i| seen[i] += 1);
            }
            assert!(seen.iter().all(|&s| s == 1), "{layout}");
        }
    }

    #[test]
    fn rejects_bad_ranks_and_zero_channels() {
        assert!(matches!(
            TensorDesc::new(&[4], Layout::ChannelsFirst),
            Err(Error::Rank { got: 1 })
        ));
        assert!(matches!(
            TensorDesc::new(&[1, 2, 3, 4, 5, 6], Layout::ChannelsFirst),
            Err(Error::Rank { got: 6 })
        ));
        assert!(matches!(
            TensorDesc::new(&[4, 0], Layout::ChannelsFirst),
            Err(Error::ZeroChannels)
        ));
        assert!(matches!(
            TensorDesc::new(&[usize::MAX, 2, 2], Layout::ChannelsFirst),
            Err(Error::TooLarge { .. })
        ));
        let empty = TensorDesc::new(&[0, 3, 7], Layout::ChannelsFirst).unwrap();
        assert_eq!((empty.numel(), empty.per_channel()), (0, 0));
    }
}
