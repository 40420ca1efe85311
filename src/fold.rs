//! Folding an eval-mode batch norm into the convolution or linear layer before it: the shared
//! description of the layer's weight ([`FoldSpec`]) and the index map from a weight element to
//! its output channel ([`FoldMap`]), used by the CPU fold (`reference::fold`) and the GPU kernel
//! alike.
//!
//! With `s[o] = bn_weight[o] / sqrt(running_var[o] + eps)`, the folded layer has
//! `W'[i] = W[i] * s[o(i)]` and `b'[o] = (b[o] - running_mean[o]) * s[o] + bn_bias[o]`.
//!
//! The output channel `o(i)` of the weight element at memory offset `i` depends on the kind of
//! layer, its groups and the weight's memory layout:
//!
//! | kind | logical weight shape | output-channel axis |
//! | --- | --- | --- |
//! | conv | `[C_out, C_in/g, k...]` | 0 |
//! | conv transpose | `[C_in, C_out/g, k...]` | 1, offset by the group of axis 0 |
//! | linear | `[out, in]` | 0 |
//!
//! A channels-last weight stores the second axis last (`[C_out, k..., C_in/g]`,
//! `[C_in, k..., C_out/g]`). Grouped transposed convolutions are where many folds go wrong:
//! output channel `o` lives in group `o / (C_out/g)`, at column `o % (C_out/g)`.

use crate::error::{Error, Result};
use crate::shape::Layout;

/// The kind of layer a batch norm is folded into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FoldKind {
    /// `ConvNd`, weight `[C_out, C_in/groups, k...]`.
    Conv,
    /// `ConvTransposeNd`, weight `[C_in, C_out/groups, k...]`.
    ConvTranspose,
    /// `Linear`, weight `[out, in]`.
    Linear,
}

impl FoldKind {
    /// Parses the names used by the golden fold files (a test tool) (`conv`, `conv_transpose`, `linear`).
    #[cfg(feature = "test-tools")]
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "conv" => Some(FoldKind::Conv),
            "conv_transpose" => Some(FoldKind::ConvTranspose),
            "linear" => Some(FoldKind::Linear),
            _ => None,
        }
    }
}

/// Most dimensions a folded weight may have: a 3-D convolution's `[C_out, C_in/g, kD, kH, kW]`.
pub const MAX_WEIGHT_RANK: usize = 5;

/// The weight of the layer a batch norm is folded into: its kind, logical shape, groups and
/// memory layout. Built only through [`FoldSpec::new`], so every `FoldSpec` is valid.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct FoldSpec {
    kind: FoldKind,
    shape: [usize; MAX_WEIGHT_RANK],
    rank: usize,
    groups: usize,
    weight_layout: Layout,
}

/// Where the output channel of each weight element is: for the element at memory offset `i`,
/// `o = (i / group_stride) * c_out_per_group + (i / inner_stride) % c_out_per_group`.
///
/// Conv and linear: `group_stride = numel`, `inner_stride = numel / c_out`,
/// `c_out_per_group = c_out`. Conv transpose `[C_in, C_out/g, k...]`:
/// `group_stride = (C_in/g) * (C_out/g) * K` (`K` the kernel volume), `inner_stride = K`
/// (1 for a channels-last weight), `c_out_per_group = C_out/g`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FoldMap {
    /// Elements of the weight.
    pub numel: usize,
    /// Output channels of the layer (channels of the batch norm).
    pub c_out: usize,
    /// Weight elements per group along the memory order.
    pub group_stride: usize,
    /// Distance in memory between consecutive output channels of one group.
    pub inner_stride: usize,
    /// Output channels per group.
    pub c_out_per_group: usize,
}

impl FoldMap {
    /// The output channel of the weight element at memory offset `i` (`i < numel`).
    pub fn channel_of(&self, i: usize) -> usize {
        (i / self.group_stride) * self.c_out_per_group
            + (i / self.inner_stride) % self.c_out_per_group
    }
}

fn invalid(reason: String) -> Error {
    Error::InvalidFold { reason }
}

impl FoldSpec {
    /// Describes a weight of logical shape `weight_shape` (see the table in the module docs)
    /// stored in `weight_layout`.
    ///
    /// Errors ([`Error::InvalidFold`]): a linear weight that is not 2-D or has `groups != 1`; a
    /// convolution weight with fewer than 3 or more than 5 dimensions; a zero dimension;
    /// `groups == 0`; a conv whose `C_out` or a transposed conv whose `C_in` is not divisible by
    /// `groups`; an element count that overflows `usize`.
    pub fn new(
        kind: FoldKind,
        weight_shape: &[usize],
        groups: usize,
        weight_layout: Layout,
    ) -> Result<Self> {
        let rank = weight_shape.len();
        let ranks = match kind {
            FoldKind::Linear => 2..=2,
            FoldKind::Conv | FoldKind::ConvTranspose => 3..=MAX_WEIGHT_RANK,
        };
        if !ranks.contains(&rank) {
            return Err(invalid(format!(
                "a {kind:?} weight has {} to {} dimensions, got {weight_shape:?}",
                ranks.start(),
                ranks.end()
            )));
        }
        if weight_shape.contains(&0) {
            return Err(invalid(format!(
                "weight shape {weight_shape:?} has a zero dimension"
            )));
        }
        if groups == 0 {
            return Err(invalid("groups must be at least 1".into()));
        }
        match kind {
            FoldKind::Linear if groups != 1 => {
                return Err(invalid(format!(
                    "a linear layer has no groups, got groups = {groups}"
                )));
            }
            FoldKind::Conv if !weight_shape[0].is_multiple_of(groups) => {
                return Err(invalid(format!(
                    "C_out = {} is not divisible by groups = {groups}",
                    weight_shape[0]
                )));
            }
            FoldKind::ConvTranspose if !weight_shape[0].is_multiple_of(groups) => {
                return Err(invalid(format!(
                    "C_in = {} is not divisible by groups = {groups}",
                    weight_shape[0]
                )));
            }
            _ => {}
        }
        // C_out <= numel for every kind (a transposed conv has groups <= C_in), so a weight whose
        // element count fits in usize also has a C_out that does.
        if weight_shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .is_none()
        {
            return Err(invalid(format!(
                "weight shape {weight_shape:?} is too large"
            )));
        }
        let mut shape = [1; MAX_WEIGHT_RANK];
        shape[..rank].copy_from_slice(weight_shape);
        Ok(Self {
            kind,
            shape,
            rank,
            groups,
            weight_layout,
        })
    }

    /// The kind of layer.
    pub fn kind(&self) -> FoldKind {
        self.kind
    }

    /// The logical weight shape, as given to [`FoldSpec::new`].
    pub fn weight_shape(&self) -> &[usize] {
        &self.shape[..self.rank]
    }

    /// Convolution groups (1 for linear).
    pub fn groups(&self) -> usize {
        self.groups
    }

    /// The weight's memory layout.
    pub fn weight_layout(&self) -> Layout {
        self.weight_layout
    }

    /// Elements of the weight.
    pub fn numel(&self) -> usize {
        self.weight_shape().iter().product()
    }

    /// Output channels of the layer: the number of batch-norm channels it must be folded with.
    pub fn c_out(&self) -> usize {
        match self.kind {
            FoldKind::Conv | FoldKind::Linear => self.shape[0],
            FoldKind::ConvTranspose => self.shape[1] * self.groups,
        }
    }

    /// The index map from weight elements to output channels (see [`FoldMap`]).
    pub fn map(&self) -> FoldMap {
        let numel = self.numel();
        let c_out = self.c_out();
        match self.kind {
            FoldKind::Conv | FoldKind::Linear => FoldMap {
                numel,
                c_out,
                group_stride: numel,
                inner_stride: numel / c_out,
                c_out_per_group: c_out,
            },
            FoldKind::ConvTranspose => {
                let c_out_per_group = self.shape[1];
                let kernel: usize = self.shape[2..self.rank].iter().product();
                FoldMap {
                    numel,
                    c_out,
                    group_stride: numel / self.groups,
                    inner_stride: match self.weight_layout {
                        Layout::ChannelsFirst => kernel,
                        Layout::ChannelsLast => 1,
                    },
                    c_out_per_group,
                }
            }
        }
    }
}

impl std::fmt::Debug for FoldSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} {:?} groups {} {}",
            self.kind,
            self.weight_shape(),
            self.groups,
            self.weight_layout
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The output channel of every element, by walking the logical indices in memory order.
    fn channels_by_index(
        kind: FoldKind,
        shape: &[usize],
        groups: usize,
        layout: Layout,
    ) -> Vec<usize> {
        let (a0, a1) = (shape[0], shape[1]);
        let kernel: usize = shape[2..].iter().product();
        let mut out = Vec::new();
        for i0 in 0..a0 {
            let mut push = |i1: usize| {
                out.push(match kind {
                    FoldKind::Conv | FoldKind::Linear => i0,
                    FoldKind::ConvTranspose => (i0 / (a0 / groups)) * a1 + i1,
                })
            };
            match layout {
                Layout::ChannelsFirst => (0..a1).for_each(|i1| (0..kernel).for_each(|_| push(i1))),
                Layout::ChannelsLast => (0..kernel).for_each(|_| (0..a1).for_each(&mut push)),
            }
        }
        out
    }

    #[test]
    fn map_matches_logical_indexing() {
        let cases: [(FoldKind, &[usize], usize); 8] = [
            (FoldKind::Conv, &[6, 4, 3, 3], 1),
            (FoldKind::Conv, &[6, 2, 3, 3], 2),
            (FoldKind::Conv, &[8, 1, 3], 8),
            (FoldKind::Conv, &[4, 2, 2, 3, 1], 2),
            (FoldKind::ConvTranspose, &[4, 6, 3, 3], 1),
            (FoldKind::ConvTranspose, &[4, 3, 3, 3], 2),
            (FoldKind::ConvTranspose, &[6, 1, 2, 2, 2], 3),
            (FoldKind::Linear, &[10, 16], 1),
        ];
        for (kind, shape, groups) in cases {
            for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
                let spec = FoldSpec::new(kind, shape, groups, layout).unwrap();
                let map = spec.map();
                let got: Vec<usize> = (0..map.numel).map(|i| map.channel_of(i)).collect();
                assert_eq!(
                    got,
                    channels_by_index(kind, shape, groups, layout),
                    "{spec:?}"
                );
                assert!(got.iter().all(|&o| o < spec.c_out()), "{spec:?}");
            }
        }
    }

    #[test]
    fn grouped_transpose_reaches_every_output_channel() {
        // [C_in = 4, C_out/g = 3, 1] with 2 groups: C_out = 6, group 1 holds channels 3..6.
        let spec = FoldSpec::new(
            FoldKind::ConvTranspose,
            &[4, 3, 1],
            2,
            Layout::ChannelsFirst,
        )
        .unwrap();
        assert_eq!(spec.c_out(), 6);
        let map = spec.map();
        let got: Vec<usize> = (0..map.numel).map(|i| map.channel_of(i)).collect();
        assert_eq!(got, [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]);
    }

    #[test]
    fn rejects_invalid_specs() {
        let bad: [(FoldKind, &[usize], usize); 8] = [
            (FoldKind::Linear, &[4, 4, 1], 1),
            (FoldKind::Linear, &[4, 4], 2),
            (FoldKind::Conv, &[4, 4], 1),
            (FoldKind::Conv, &[4, 4, 1, 1, 1, 1], 1),
            (FoldKind::Conv, &[6, 2, 3], 4),
            (FoldKind::ConvTranspose, &[6, 2, 3], 4),
            (FoldKind::Conv, &[6, 0, 3], 1),
            (FoldKind::Conv, &[6, 2, 3], 0),
        ];
        for (kind, shape, groups) in bad {
            let got = FoldSpec::new(kind, shape, groups, Layout::ChannelsFirst);
            assert!(
                matches!(got, Err(Error::InvalidFold { .. })),
                "{kind:?} {shape:?} {groups}: {got:?}"
            );
        }
        let huge = FoldSpec::new(
            FoldKind::Conv,
            &[usize::MAX, 2, 3],
            1,
            Layout::ChannelsFirst,
        );
        assert!(matches!(huge, Err(Error::InvalidFold { .. })));
    }

    #[test]
    fn parses_golden_kind_names() {
        assert_eq!(
            FoldKind::parse("conv_transpose"),
            Some(FoldKind::ConvTranspose)
        );
        assert_eq!(FoldKind::parse("conv"), Some(FoldKind::Conv));
        assert_eq!(FoldKind::parse("linear"), Some(FoldKind::Linear));
        assert_eq!(FoldKind::parse("deconv"), None);
    }
}
