//! Group, layer, instance and RMS normalization: what the CPU reference
//! ([`crate::reference::norms`]) and the GPU path ([`crate::gpu::norms`]) share.
//!
//! The four differ from batch norm only in which values share statistics, and all of them fit
//! one shape, [`NormDesc`]: a tensor `(N, C, S)` (S the product of the spatial dimensions) in
//! which each sample's channels form `G` groups; the values of one (sample, group) are a *row*
//! of `C / G * S` values with its own statistics, and the affine parameters are per channel.
//!
//! | normalization | N | C | G | S | statistics |
//! | --- | --- | --- | --- | --- | --- |
//! | `GroupNorm(G, C)` on `(N, C, *)` | N | C | G | `*` | mean and variance per (sample, group) |
//! | `InstanceNorm{1,2,3}d(C)` on `(N, C, *)` | N | C | C | `*` | mean and variance per (sample, channel) |
//! | `LayerNorm(shape)` on `(..., shape)` | leading dims | `prod(shape)` | 1 | 1 | mean and variance per leading index |
//! | `RMSNorm(shape)` on `(..., shape)` | leading dims | `prod(shape)` | 1 | 1 | `mean(x^2)` per leading index |
//!
//! Channels-first tensors keep a row contiguous (`(n*G + g) * C/G * S` onwards); channels-last
//! ones (`N, S, C` in memory, group and instance norm only) spread it over `S` runs of `C/G`
//! values, `C` apart.

use crate::error::{Error, Result};
use crate::shape::{Layout, TensorDesc};
use crate::state::LayerState;
use crate::validate::{buffer, validate_eps, validate_momentum};

/// Which normalization a [`NormDesc`] describes: names errors and picks the statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NormKind {
    /// `nn.GroupNorm`.
    Group,
    /// `nn.InstanceNorm1d/2d/3d`.
    Instance,
    /// `nn.LayerNorm`.
    Layer,
    /// `nn.RMSNorm`.
    Rms,
}

impl NormKind {
    /// Whether rows are centred on their mean (all but RMS norm, which divides by the root mean
    /// square and subtracts nothing).
    pub fn centered(self) -> bool {
        self != NormKind::Rms
    }
}

/// The fused epilogue of a forward (and the matching backward): what follows the affine map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum NormEpilogue {
    /// `y = xhat * weight + bias`.
    #[default]
    None,
    /// `y = silu(xhat * weight + bias)`, `silu(z) = z * sigmoid(z)`: GroupNorm + SiLU of the
    /// diffusion U-Nets. The backward recomputes `z` from `x` and the saved statistics.
    Silu,
}

/// The shape of a normalization call (see the [module docs](self)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NormDesc {
    kind: NormKind,
    batch: usize,
    channels: usize,
    groups: usize,
    spatial: usize,
    layout: Layout,
}

impl NormDesc {
    /// `GroupNorm(groups, C)` on `x` of shape `desc` (`(N, C, *)`, either layout).
    ///
    /// Errors: [`Error::GroupsDoNotDivideChannels`] when `groups` is 0 or does not divide `C`.
    pub fn group(desc: &TensorDesc, groups: usize) -> Result<Self> {
        let channels = desc.channels();
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(Error::GroupsDoNotDivideChannels { groups, channels });
        }
        Ok(Self::from_tensor(NormKind::Group, desc, groups))
    }

    /// `InstanceNorm{1,2,3}d(C)` on `x` of shape `desc` (`(N, C, *)`, either layout).
    pub fn instance(desc: &TensorDesc) -> Self {
        Self::from_tensor(NormKind::Instance, desc, desc.channels())
    }

    fn from_tensor(kind: NormKind, desc: &TensorDesc, groups: usize) -> Self {
        Self {
            kind,
            batch: desc.batch(),
            channels: desc.channels(),
            groups,
            spatial: desc.spatial(),
            layout: desc.layout(),
        }
    }

    /// `LayerNorm(normalized_shape)` on a contiguous `x` of shape `dims`.
    ///
    /// Errors: [`Error::NormalizedShape`] unless `normalized_shape` is non-empty, has no zero
    /// dimension and equals the trailing dimensions of `dims`; [`Error::TooLarge`] when the
    /// element count overflows `usize`.
    pub fn layer(dims: &[usize], normalized_shape: &[usize]) -> Result<Self> {
        Self::trailing(NormKind::Layer, dims, normalized_shape)
    }

    /// `RMSNorm(normalized_shape)` on a contiguous `x` of shape `dims`; errors as
    /// [`NormDesc::layer`].
    pub fn rms(dims: &[usize], normalized_shape: &[usize]) -> Result<Self> {
        Self::trailing(NormKind::Rms, dims, normalized_shape)
    }

    fn trailing(kind: NormKind, dims: &[usize], normalized_shape: &[usize]) -> Result<Self> {
        let fits = !normalized_shape.is_empty()
            && !normalized_shape.contains(&0)
            && dims.ends_with(normalized_shape);
        if !fits {
            return Err(Error::NormalizedShape {
                normalized_shape: normalized_shape.to_vec(),
                dims: dims.to_vec(),
            });
        }
        let product = |d: &[usize]| d.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
        let too_large = || Error::TooLarge {
            dims: dims.to_vec(),
        };
        let split = dims.len() - normalized_shape.len();
        Ok(Self {
            kind,
            batch: product(&dims[..split]).ok_or_else(too_large)?,
            channels: product(normalized_shape).ok_or_else(too_large)?,
            groups: 1,
            spatial: 1,
            layout: Layout::ChannelsFirst,
        })
        .and_then(|d: Self| {
            d.rows()
                .checked_mul(d.row_len())
                .map(|_| d)
                .ok_or_else(too_large)
        })
    }

    /// Which normalization this is.
    pub fn kind(&self) -> NormKind {
        self.kind
    }

    /// N: samples (layer and RMS norm: the product of the leading dimensions).
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// C: the length of `weight` and `bias` (layer and RMS norm: `prod(normalized_shape)`).
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// G: groups per sample.
    pub fn groups(&self) -> usize {
        self.groups
    }

    /// S: values per channel and sample.
    pub fn spatial(&self) -> usize {
        self.spatial
    }

    /// The memory order.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Channels per group, `C / G`.
    pub fn channels_per_group(&self) -> usize {
        self.channels / self.groups
    }

    /// Rows, `N * G`: the length of the saved statistics.
    pub fn rows(&self) -> usize {
        self.batch * self.groups
    }

    /// Values per row, `C / G * S`.
    pub fn row_len(&self) -> usize {
        self.channels_per_group() * self.spatial
    }

    /// Elements of `x`.
    pub fn numel(&self) -> usize {
        self.batch * self.channels * self.spatial
    }

    /// Whether the rows are contiguous in memory (channels-first, or a single value per channel).
    pub fn rows_contiguous(&self) -> bool {
        self.layout == Layout::ChannelsFirst || self.spatial == 1
    }

    /// The row and the channel of element `i` (in memory order).
    pub fn locate(&self, i: usize) -> (usize, usize) {
        if self.rows_contiguous() {
            let channel = (i / self.spatial) % self.channels;
            (i / self.row_len(), channel)
        } else {
            let channel = i % self.channels;
            let sample = i / (self.spatial * self.channels);
            (
                sample * self.groups + channel / self.channels_per_group(),
                channel,
            )
        }
    }

    /// The element offsets of row `row`, in memory order.
    pub fn row_offsets(&self, row: usize) -> impl Iterator<Item = usize> + '_ {
        let len = self.row_len();
        let cpg = self.channels_per_group();
        let (sample, group) = (row / self.groups, row % self.groups);
        let contiguous = self.rows_contiguous();
        (0..len).map(move |e| {
            if contiguous {
                row * len + e
            } else {
                (sample * self.spatial + e / cpg) * self.channels + group * cpg + e % cpg
            }
        })
    }
}

/// The statistics a training forward saves for its backward, one entry per row (`[N, G]` for
/// group norm, `[N, C]` for instance norm, the leading dimensions for layer and RMS norm), f32
/// whatever the activation dtype.
///
/// The mean is kept as a double-float, `mean + mean_lo`, so that `x - mean` in the backward is
/// not off by the rounding of the mean: on a row with a large common offset (mean 1000, spread
/// 0.1) one f32 rounding of the mean (3e-5) is, times `rstd` (10), already a third of the f32
/// tolerance. `mean` alone is the value PyTorch saves. RMS norm subtracts nothing: its means
/// are 0.
#[derive(Clone, Debug, PartialEq)]
pub struct NormStats {
    /// The row means, rounded to f32.
    pub mean: Vec<f32>,
    /// What `mean` lacks: the exact mean minus `mean`, rounded to f32.
    pub mean_lo: Vec<f32>,
    /// `1 / sqrt(biased_var + eps)`, or `1 / sqrt(mean(x^2) + eps)` for RMS norm.
    pub rstd: Vec<f32>,
}

/// `nn.GroupNorm(num_groups, num_channels)`: `GroupNormConfig::new(g, c)` has PyTorch's
/// defaults (`eps = 1e-5`, `affine = true`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupNormConfig {
    /// G; must divide `num_channels`.
    pub num_groups: usize,
    /// C.
    pub num_channels: usize,
    /// Added to the variance.
    pub eps: f32,
    /// Per-channel `weight` and `bias`.
    pub affine: bool,
}

impl GroupNormConfig {
    /// PyTorch's defaults.
    pub fn new(num_groups: usize, num_channels: usize) -> Self {
        Self {
            num_groups,
            num_channels,
            eps: 1e-5,
            affine: true,
        }
    }

    /// Errors: [`Error::ZeroChannels`], [`Error::GroupsDoNotDivideChannels`],
    /// [`Error::InvalidEps`].
    pub fn validate(&self) -> Result<()> {
        if self.num_channels == 0 {
            return Err(Error::ZeroChannels);
        }
        if self.num_groups == 0 || !self.num_channels.is_multiple_of(self.num_groups) {
            return Err(Error::GroupsDoNotDivideChannels {
                groups: self.num_groups,
                channels: self.num_channels,
            });
        }
        crate::config::validate_eps(self.eps)
    }
}

/// `nn.LayerNorm(normalized_shape)`: `LayerNormConfig::new(shape)` has PyTorch's defaults
/// (`eps = 1e-5`, `elementwise_affine = true`, `bias = true`).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerNormConfig {
    /// The trailing dimensions normalized over; `weight` and `bias` have this shape.
    pub normalized_shape: Vec<usize>,
    /// Added to the variance.
    pub eps: f32,
    /// A learnable `weight` (and `bias`, when [`LayerNormConfig::bias`]).
    pub elementwise_affine: bool,
    /// A learnable `bias` beside the weight (`LayerNorm(bias=False)` has none).
    pub bias: bool,
}

impl LayerNormConfig {
    /// PyTorch's defaults.
    pub fn new(normalized_shape: &[usize]) -> Self {
        Self {
            normalized_shape: normalized_shape.to_vec(),
            eps: 1e-5,
            elementwise_affine: true,
            bias: true,
        }
    }

    /// Errors: [`Error::NormalizedShape`] for an empty shape or a zero dimension,
    /// [`Error::InvalidEps`].
    pub fn validate(&self) -> Result<()> {
        NormDesc::layer(&self.normalized_shape, &self.normalized_shape)?;
        crate::config::validate_eps(self.eps)
    }
}

/// `nn.InstanceNorm{1,2,3}d(num_features)`: `InstanceNormConfig::new(c)` has PyTorch's defaults
/// (`eps = 1e-5`, `momentum = 0.1`, `affine = false`, `track_running_stats = false`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InstanceNormConfig {
    /// C.
    pub num_features: usize,
    /// Added to the variance.
    pub eps: f32,
    /// Weight of the batch in the running update.
    pub momentum: f32,
    /// Per-channel `weight` and `bias`.
    pub affine: bool,
    /// Keep running statistics (the batch average of the per-instance mean and unbiased
    /// variance) and normalize with them in eval mode.
    pub track_running_stats: bool,
}

impl InstanceNormConfig {
    /// PyTorch's defaults.
    pub fn new(num_features: usize) -> Self {
        Self {
            num_features,
            eps: 1e-5,
            momentum: 0.1,
            affine: false,
            track_running_stats: false,
        }
    }

    /// Errors: [`Error::ZeroChannels`], [`Error::InvalidEps`], [`Error::InvalidMomentum`].
    pub fn validate(&self) -> Result<()> {
        if self.num_features == 0 {
            return Err(Error::ZeroChannels);
        }
        crate::config::validate_eps(self.eps)?;
        crate::config::validate_momentum(self.momentum)
    }
}

/// `nn.RMSNorm(normalized_shape)`: `RmsNormConfig::new(shape)` has PyTorch's defaults
/// (`eps = None`, `elementwise_affine = true`).
#[derive(Clone, Debug, PartialEq)]
pub struct RmsNormConfig {
    /// The trailing dimensions normalized over; `weight` has this shape.
    pub normalized_shape: Vec<usize>,
    /// Added to `mean(x^2)`; `None` is the machine epsilon of the input dtype, as in PyTorch
    /// ([`rms_eps`]).
    pub eps: Option<f32>,
    /// A learnable `weight`.
    pub elementwise_affine: bool,
}

impl RmsNormConfig {
    /// PyTorch's defaults.
    pub fn new(normalized_shape: &[usize]) -> Self {
        Self {
            normalized_shape: normalized_shape.to_vec(),
            eps: None,
            elementwise_affine: true,
        }
    }

    /// Errors: [`Error::NormalizedShape`], [`Error::InvalidEps`].
    pub fn validate(&self) -> Result<()> {
        NormDesc::rms(&self.normalized_shape, &self.normalized_shape)?;
        self.eps.map_or(Ok(()), crate::config::validate_eps)
    }
}

/// The epsilon of `RMSNorm(eps=eps)` on `dtype` input: `eps`, or `torch.finfo(dtype).eps` when
/// `None` (2^-23, 2^-10 and 2^-7 for f32, f16 and bf16).
pub fn rms_eps(eps: Option<f32>, dtype: crate::DType) -> f32 {
    eps.unwrap_or(match dtype {
        crate::DType::F32 => f32::EPSILON,
        crate::DType::F16 => half::f16::EPSILON.to_f32(),
        crate::DType::BF16 => half::bf16::EPSILON.to_f32(),
    })
}

/// Any of the four layer configurations: what a layer ([`crate::reference::norms::NormLayer`],
/// [`crate::gpu::norms::NormLayer`]) is built from.
#[derive(Clone, Debug, PartialEq)]
pub enum NormConfig {
    /// `nn.GroupNorm`.
    Group(GroupNormConfig),
    /// `nn.LayerNorm`.
    Layer(LayerNormConfig),
    /// `nn.InstanceNorm{1,2,3}d`.
    Instance(InstanceNormConfig),
    /// `nn.RMSNorm`.
    Rms(RmsNormConfig),
}

impl NormConfig {
    /// Checks the configuration (see each config's `validate`).
    pub fn validate(&self) -> Result<()> {
        match self {
            NormConfig::Group(c) => c.validate(),
            NormConfig::Layer(c) => c.validate(),
            NormConfig::Instance(c) => c.validate(),
            NormConfig::Rms(c) => c.validate(),
        }
    }

    /// The shape of a call on an input of logical shape `dims` stored in `layout`.
    ///
    /// Errors: those of [`TensorDesc::new`] and [`Error::ChannelMismatch`] for group and
    /// instance norm, [`Error::NormalizedShape`] and [`Error::Unsupported`] (channels-last) for
    /// layer and RMS norm.
    pub fn describe(&self, dims: &[usize], layout: Layout) -> Result<NormDesc> {
        let tensor = |channels: usize| -> Result<TensorDesc> {
            let desc = TensorDesc::new(dims, layout)?;
            if desc.channels() != channels {
                return Err(Error::ChannelMismatch {
                    expected: channels,
                    got: desc.channels(),
                });
            }
            Ok(desc)
        };
        let contiguous = |what: &'static str| -> Result<()> {
            if layout == Layout::ChannelsLast {
                return Err(Error::Unsupported {
                    what,
                    reason: "normalizes trailing dimensions of a contiguous input; channels-last has no meaning here".into(),
                });
            }
            Ok(())
        };
        match self {
            NormConfig::Group(c) => NormDesc::group(&tensor(c.num_channels)?, c.num_groups),
            NormConfig::Instance(c) => Ok(NormDesc::instance(&tensor(c.num_features)?)),
            NormConfig::Layer(c) => {
                contiguous("LayerNorm")?;
                NormDesc::layer(dims, &c.normalized_shape)
            }
            NormConfig::Rms(c) => {
                contiguous("RMSNorm")?;
                NormDesc::rms(dims, &c.normalized_shape)
            }
        }
    }

    /// Values of `weight` (and `bias`): C, or `prod(normalized_shape)`.
    pub fn param_len(&self) -> usize {
        match self {
            NormConfig::Group(c) => c.num_channels,
            NormConfig::Instance(c) => c.num_features,
            NormConfig::Layer(LayerNormConfig {
                normalized_shape, ..
            })
            | NormConfig::Rms(RmsNormConfig {
                normalized_shape, ..
            }) => normalized_shape.iter().product(),
        }
    }

    /// Whether the layer has a `weight`.
    pub fn has_weight(&self) -> bool {
        match self {
            NormConfig::Group(c) => c.affine,
            NormConfig::Instance(c) => c.affine,
            NormConfig::Layer(c) => c.elementwise_affine,
            NormConfig::Rms(c) => c.elementwise_affine,
        }
    }

    /// Whether the layer has a `bias`.
    pub fn has_bias(&self) -> bool {
        match self {
            NormConfig::Layer(c) => c.elementwise_affine && c.bias,
            NormConfig::Rms(_) => false,
            other => other.has_weight(),
        }
    }

    /// The momentum of tracked running statistics (instance norm with `track_running_stats`).
    pub fn running_momentum(&self) -> Option<f32> {
        match self {
            NormConfig::Instance(c) if c.track_running_stats => Some(c.momentum),
            _ => None,
        }
    }

    /// The epsilon used on `dtype` input.
    pub fn eps(&self, dtype: crate::DType) -> f32 {
        match self {
            NormConfig::Group(c) => c.eps,
            NormConfig::Instance(c) => c.eps,
            NormConfig::Layer(c) => c.eps,
            NormConfig::Rms(c) => rms_eps(c.eps, dtype),
        }
    }

    /// A fresh layer's state, as PyTorch initializes it: weight 1, bias 0, running mean 0 and
    /// variance 1, counter 0 (kept, never advanced: instance norm does not count batches).
    pub fn initial_state(&self) -> LayerState {
        let (len, running) = (self.param_len(), self.running_momentum().is_some());
        LayerState {
            weight: self.has_weight().then(|| vec![1.0; len]),
            bias: self.has_bias().then(|| vec![0.0; len]),
            running_mean: running.then(|| vec![0.0; len]),
            running_var: running.then(|| vec![1.0; len]),
            num_batches_tracked: 0,
        }
    }

    /// Checks that `state` fits: each `state_dict` key present exactly when the configuration
    /// has it, with `param_len` values, and a finite non-negative running variance.
    ///
    /// Errors: [`Error::StateKeyMissing`], [`Error::StateKeyMalformed`],
    /// [`Error::InvalidRunningVar`].
    pub fn check_state(&self, state: &LayerState) -> Result<()> {
        let running = self.running_momentum().is_some();
        let len = self.param_len();
        for (key, wanted, value) in [
            ("weight", self.has_weight(), &state.weight),
            ("bias", self.has_bias(), &state.bias),
            ("running_mean", running, &state.running_mean),
            ("running_var", running, &state.running_var),
        ] {
            match (wanted, value) {
                (true, None) => return Err(Error::StateKeyMissing { key: key.into() }),
                (false, Some(_)) => {
                    return Err(Error::StateKeyMalformed {
                        key: key.into(),
                        reason: "this layer has no such parameter".into(),
                    })
                }
                (true, Some(v)) if v.len() != len => {
                    return Err(Error::StateKeyMalformed {
                        key: key.into(),
                        reason: format!("{} values, the layer has {len}", v.len()),
                    })
                }
                _ => {}
            }
        }
        if !running && state.num_batches_tracked != 0 {
            return Err(Error::StateKeyMalformed {
                key: "num_batches_tracked".into(),
                reason: "the layer keeps no running statistics".into(),
            });
        }
        state
            .running_var
            .as_deref()
            .map_or(Ok(()), crate::validate::running_var)
    }
}

/// The running statistics a normalization forward touches, by length.
pub(crate) enum RunningLengths {
    /// Batch statistics alone.
    None,
    /// Batch statistics that update `running_mean`, `running_var` with `momentum`.
    Updating {
        mean: usize,
        var: usize,
        momentum: f32,
    },
    /// Normalizing with the running statistics.
    Read { mean: usize, var: usize },
}

/// The lengths and scalars of a normalization forward, checked in one order by the CPU
/// reference and the GPU path, so both refuse a call with the same error.
pub(crate) struct ForwardLengths {
    pub x: usize,
    pub y: usize,
    /// `(residual, sum)` of the residual-add form.
    pub residual: Option<(usize, usize)>,
    pub weight: Option<usize>,
    pub bias: Option<usize>,
    pub running: RunningLengths,
    pub eps: f32,
}

impl ForwardLengths {
    pub(crate) fn check(&self, desc: &NormDesc) -> Result<()> {
        let n = desc.numel();
        buffer("x", n, self.x)?;
        buffer("y", n, self.y)?;
        if let Some((residual, sum)) = self.residual {
            buffer("residual", n, residual)?;
            buffer("sum", n, sum)?;
        }
        check_params(desc, self.weight, self.bias)?;
        match self.running {
            RunningLengths::None => {}
            RunningLengths::Updating {
                mean,
                var,
                momentum,
            } => {
                check_running(desc, mean, var)?;
                validate_momentum(momentum)?;
            }
            RunningLengths::Read { mean, var } => check_running(desc, mean, var)?,
        }
        validate_eps(self.eps)?;
        if !matches!(self.running, RunningLengths::Read { .. }) {
            check_batch_statistics(desc)?;
        }
        Ok(())
    }
}

/// Checks `weight` and `bias` (lengths) against `desc`.
pub(crate) fn check_params(
    desc: &NormDesc,
    weight: Option<usize>,
    bias: Option<usize>,
) -> Result<()> {
    let c = desc.channels();
    if let Some(len) = weight {
        buffer("weight", c, len)?;
    }
    if let Some(len) = bias {
        buffer("bias", c, len)?;
    }
    Ok(())
}

/// Running statistics belong to instance norm only.
pub(crate) fn check_running(desc: &NormDesc, mean: usize, var: usize) -> Result<()> {
    if desc.kind() != NormKind::Instance {
        return Err(Error::Unsupported {
            what: "running statistics",
            reason: format!("only instance norm keeps them, not {:?} norm", desc.kind()),
        });
    }
    buffer("running_mean", desc.channels(), mean)?;
    buffer("running_var", desc.channels(), var)
}

/// Instance norm refuses batch statistics over one value per instance, as PyTorch does.
pub(crate) fn check_batch_statistics(desc: &NormDesc) -> Result<()> {
    if desc.kind() == NormKind::Instance && desc.spatial() == 1 && desc.numel() > 0 {
        return Err(Error::SingleValuePerChannel {
            dims: vec![desc.batch(), desc.channels(), 1],
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_of_every_layout_partition_the_tensor() {
        for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
            let desc = NormDesc::group(&TensorDesc::new(&[2, 6, 5], layout).unwrap(), 3).unwrap();
            let mut seen = vec![false; desc.numel()];
            for row in 0..desc.rows() {
                for i in desc.row_offsets(row) {
                    assert!(!seen[i], "{layout}: element {i} in two rows");
                    seen[i] = true;
                    assert_eq!(desc.locate(i).0, row, "{layout}: element {i}");
                }
            }
            assert!(seen.iter().all(|&s| s));
        }
    }

    #[test]
    fn shapes_are_checked() {
        let desc = TensorDesc::nchw(2, 6, 3, 3).unwrap();
        assert!(matches!(
            NormDesc::group(&desc, 4),
            Err(Error::GroupsDoNotDivideChannels {
                groups: 4,
                channels: 6
            })
        ));
        assert!(NormDesc::group(&desc, 0).is_err());
        assert!(matches!(
            NormDesc::layer(&[4, 8], &[4]),
            Err(Error::NormalizedShape { .. })
        ));
        assert!(NormDesc::layer(&[4, 8], &[]).is_err());
        let ln = NormDesc::layer(&[2, 3, 8], &[3, 8]).unwrap();
        assert_eq!((ln.rows(), ln.row_len(), ln.channels()), (2, 24, 24));
        assert_eq!(rms_eps(None, crate::DType::F16), 2f32.powi(-10));
    }
}
