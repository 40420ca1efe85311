//! One layer's state in PyTorch's `state_dict` format, read from and written to safetensors.
//!
//! A [`LayerState`] is the host-side copy of what `torch.nn.BatchNorm{1,2,3}d.state_dict()`
//! holds. In a file, every key of a layer starts with the layer's prefix, e.g. `layer1.0.bn1.`
//! (the empty prefix is a lone layer's own `state_dict()`):
//!
//! | key                            | present when                | dtype in a file             | shape |
//! |--------------------------------|-----------------------------|-----------------------------|-------|
//! | `{prefix}weight`               | `affine`                    | F32, F16, BF16, F64 -> f32  | `[C]` |
//! | `{prefix}bias`                 | `affine`                    | F32, F16, BF16, F64 -> f32  | `[C]` |
//! | `{prefix}running_mean`         | `track_running_stats`       | F32, F16, BF16, F64 -> f32  | `[C]` |
//! | `{prefix}running_var`          | `track_running_stats`       | F32, F16, BF16, F64 -> f32  | `[C]` |
//! | `{prefix}num_batches_tracked`  | `track_running_stats`       | I64 or I32 -> u64           | `[]`  |
//!
//! Reading is strict like PyTorch's `load_state_dict(strict=True)`: a key the configuration
//! needs must be there, and a key it does not have must not be. The one exception is
//! `num_batches_tracked`, which old checkpoints lack: a missing counter reads as 0.
//!
//! Writing produces what `safetensors.torch.save_file(bn.state_dict(), path,
//! metadata={"format": "pt"})` produces (the metadata Hugging Face's `save_pretrained` adds):
//! F32 per-channel tensors and an I64 scalar counter, so the file loads back into PyTorch with
//! `bn.load_state_dict(safetensors.torch.load_file(path))`.
//!
//! One file usually holds many layers. [`StateFile`] parses its header once and then reads any
//! number of layers by prefix without parsing again; [`LayerState::from_safetensors`] is the
//! one-layer shortcut that parses on every call.
//!
//! ```
//! use batchnorm_cuda::state::StateFile;
//! use batchnorm_cuda::{BatchNormConfig, LayerState};
//!
//! let config = BatchNormConfig::new(2);
//! let state = LayerState {
//!     weight: Some(vec![1.0, 0.5]),
//!     bias: Some(vec![0.0, -0.1]),
//!     running_mean: Some(vec![0.2, 0.3]),
//!     running_var: Some(vec![1.1, 0.9]),
//!     num_batches_tracked: 7,
//! };
//! let bytes = StateFile::to_bytes(&[("layer1.0.bn1.", &state), ("layer1.0.bn2.", &state)])?;
//!
//! let file = StateFile::from_bytes(bytes)?; // the header is parsed once, here
//! for prefix in ["layer1.0.bn1.", "layer1.0.bn2."] {
//!     assert_eq!(file.layer(prefix, &config)?, state);
//! }
//! # Ok::<(), batchnorm_cuda::Error>(())
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;

use half::{bf16, f16};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensorError, SafeTensors, View};

use crate::config::BatchNormConfig;
use crate::error::{Error, Result};
use crate::validate;

/// The name of the batch counter in PyTorch's `state_dict`.
const NUM_BATCHES_TRACKED: &str = "num_batches_tracked";

/// Bytes before the JSON header of a safetensors file: its length, as a little-endian u64.
const HEADER_LEN_BYTES: usize = 8;

/// The configuration flag that makes a key present.
#[derive(Clone, Copy)]
enum Group {
    /// `weight`, `bias`.
    Affine,
    /// `running_mean`, `running_var`, `num_batches_tracked`.
    Running,
}

impl Group {
    fn enabled(self, config: &BatchNormConfig) -> bool {
        match self {
            Group::Affine => config.affine,
            Group::Running => config.track_running_stats,
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Group::Affine => "affine",
            Group::Running => "track_running_stats",
        }
    }

    /// A key (or a non-zero counter) that a layer without this group cannot hold.
    fn unexpected(self, key: String, what: &str) -> Error {
        Error::StateKeyMalformed {
            key,
            reason: format!(
                "{what}, but the layer was built with {} = false",
                self.flag()
            ),
        }
    }
}

/// The per-channel keys, in `state_dict` order, with the flag that makes each present.
const PER_CHANNEL: [(&str, Group); 4] = [
    ("weight", Group::Affine),
    ("bias", Group::Affine),
    ("running_mean", Group::Running),
    ("running_var", Group::Running),
];

/// One batch-norm layer's parameters, running statistics and batch counter, on the host, in
/// f32: the interchange between the layers, files and PyTorch.
///
/// A field is `Some` exactly when the layer has it: `weight` and `bias` with `affine`,
/// `running_mean` and `running_var` with `track_running_stats`; each then holds `C` values.
/// `num_batches_tracked` is 0 for a layer without running statistics. [`LayerState::check`]
/// tells whether a state fits a configuration. `Default` is the state of a layer with neither.
///
/// ```
/// use batchnorm_cuda::{BatchNormConfig, LayerState};
///
/// // A fresh `nn.BatchNorm2d(3)`.
/// let fresh = LayerState {
///     weight: Some(vec![1.0; 3]),
///     bias: Some(vec![0.0; 3]),
///     running_mean: Some(vec![0.0; 3]),
///     running_var: Some(vec![1.0; 3]),
///     num_batches_tracked: 0,
/// };
/// assert!(fresh.check(&BatchNormConfig::new(3)).is_ok());
/// assert!(LayerState::default().check(&BatchNormConfig::new(3).affine(false)).is_err());
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerState {
    /// The affine scale `gamma`, `C` values; `None` without `affine`.
    pub weight: Option<Vec<f32>>,
    /// The affine shift `beta`, `C` values; `None` without `affine`.
    pub bias: Option<Vec<f32>>,
    /// The running mean, `C` values; `None` without `track_running_stats`.
    pub running_mean: Option<Vec<f32>>,
    /// The running variance, `C` finite values `>= 0`; `None` without `track_running_stats`.
    pub running_var: Option<Vec<f32>>,
    /// Training batches seen, PyTorch's `num_batches_tracked` (drives `momentum = None`);
    /// 0 without `track_running_stats`.
    pub num_batches_tracked: u64,
}

impl LayerState {
    /// Checks that this state fits `config`: each field is present exactly when the
    /// configuration has it, every present field holds `config.num_features` values, the
    /// counter is 0 without running statistics, and the running variance is finite and `>= 0`.
    /// It does not check `config` itself ([`BatchNormConfig::validate`] does).
    ///
    /// Errors, naming the field as its `state_dict` key without a prefix, e.g. `bias`:
    /// [`Error::StateKeyMissing`] for a field the configuration needs but that is `None`;
    /// [`Error::StateKeyMalformed`] for a field it does not have, a wrong length or a non-zero
    /// counter without running statistics (checked per field in `state_dict` order, then the
    /// counter); then [`Error::InvalidRunningVar`] for the first bad variance.
    ///
    /// ```
    /// use batchnorm_cuda::{BatchNormConfig, Error, LayerState};
    ///
    /// let state = LayerState {
    ///     running_mean: Some(vec![0.0; 2]),
    ///     running_var: Some(vec![1.0, -1.0]),
    ///     ..Default::default()
    /// };
    /// let config = BatchNormConfig::new(2).affine(false);
    /// assert!(matches!(state.check(&config), Err(Error::InvalidRunningVar { channel: 1, .. })));
    /// assert!(matches!(
    ///     state.check(&BatchNormConfig::new(2)),
    ///     Err(Error::StateKeyMissing { key }) if key == "weight"
    /// ));
    /// ```
    pub fn check(&self, config: &BatchNormConfig) -> Result<()> {
        self.check_keys(config, "")
    }

    /// Reads the layer whose keys start with `prefix` from the bytes of a safetensors file,
    /// converting F16, BF16 and F64 parameters to f32 (see the [module docs](self) for the
    /// keys). The header is parsed on every call: to read several layers of one file, parse it
    /// once with [`StateFile::from_bytes`] or [`StateFile::open`].
    ///
    /// Errors: [`Error::StateFile`] when `bytes` is not a safetensors file;
    /// [`Error::StateKeyMalformed`] for a key of another shape than `[C]` (`[]` for the
    /// counter), of an unsupported dtype or a negative counter, or a key the configuration does
    /// not have; [`Error::StateKeyMissing`] for a key it needs; [`Error::InvalidRunningVar`].
    /// Keys are named with their prefix.
    ///
    /// ```
    /// use batchnorm_cuda::state::StateFile;
    /// use batchnorm_cuda::{BatchNormConfig, Error, LayerState};
    ///
    /// let config = BatchNormConfig::new(2).track_running_stats(false);
    /// let state = LayerState { weight: Some(vec![2.0, 3.0]), bias: Some(vec![0.5, 0.0]), ..Default::default() };
    /// let bytes = StateFile::to_bytes(&[("bn.", &state)])?;
    /// assert_eq!(LayerState::from_safetensors(&bytes, "bn.", &config)?, state);
    /// assert!(matches!(
    ///     LayerState::from_safetensors(&bytes, "other.", &config),
    ///     Err(Error::StateKeyMissing { key }) if key == "other.weight"
    /// ));
    /// # Ok::<(), Error>(())
    /// ```
    pub fn from_safetensors(bytes: &[u8], prefix: &str, config: &BatchNormConfig) -> Result<Self> {
        let (header_len, header) = parse_header(bytes)?;
        read_layer(&header, data_section(bytes, header_len)?, prefix, config)
    }

    /// The per-channel fields, in `state_dict` order, beside their key names and groups.
    fn per_channel(&self) -> [(&'static str, Group, Option<&[f32]>); 4] {
        let [weight, bias, mean, var] = PER_CHANNEL;
        [
            (weight.0, weight.1, self.weight.as_deref()),
            (bias.0, bias.1, self.bias.as_deref()),
            (mean.0, mean.1, self.running_mean.as_deref()),
            (var.0, var.1, self.running_var.as_deref()),
        ]
    }

    /// [`LayerState::check`] with every key named `{prefix}{name}`.
    fn check_keys(&self, config: &BatchNormConfig, prefix: &str) -> Result<()> {
        let channels = config.num_features;
        for (name, group, value) in self.per_channel() {
            let key = || format!("{prefix}{name}");
            match (value, group.enabled(config)) {
                (Some(values), true) if values.len() != channels => {
                    return Err(shape_error(key(), &[channels], &[values.len()]));
                }
                (None, true) => return Err(Error::StateKeyMissing { key: key() }),
                (Some(_), false) => return Err(group.unexpected(key(), "present")),
                (Some(_), true) | (None, false) => {}
            }
        }
        if !config.track_running_stats && self.num_batches_tracked != 0 {
            let what = format!("is {}", self.num_batches_tracked);
            return Err(Group::Running.unexpected(format!("{prefix}{NUM_BATCHES_TRACKED}"), &what));
        }
        match &self.running_var {
            Some(var) => validate::running_var(var),
            None => Ok(()),
        }
    }

    /// The configuration flags and channel count this state implies, for checking it before
    /// it is written.
    fn implied_config(&self) -> BatchNormConfig {
        let channels = self
            .per_channel()
            .into_iter()
            .find_map(|(_, _, value)| value.map(<[f32]>::len));
        BatchNormConfig::new(channels.unwrap_or(0))
            .affine(self.weight.is_some() || self.bias.is_some())
            .track_running_stats(self.running_mean.is_some() || self.running_var.is_some())
    }
}

/// A parsed safetensors file of layer states: the bytes and their header, parsed once, so any
/// number of layers can be read from it by prefix ([`StateFile::layer`]) without parsing again.
/// [`StateFile::save`] and [`StateFile::to_bytes`] write such a file.
///
/// ```no_run
/// use batchnorm_cuda::state::StateFile;
/// use batchnorm_cuda::BatchNormConfig;
///
/// let file = StateFile::open("resnet18_bn.safetensors")?;
/// let bn1 = file.layer("layer1.0.bn1.", &BatchNormConfig::new(64))?;
/// let bn2 = file.layer("layer1.0.bn2.", &BatchNormConfig::new(64))?;
/// # Ok::<(), batchnorm_cuda::Error>(())
/// ```
pub struct StateFile {
    bytes: Vec<u8>,
    header_len: usize,
    header: Metadata,
}

impl fmt::Debug for StateFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateFile")
            .field("bytes", &self.bytes.len())
            .field("tensors", &self.header.tensors().len())
            .finish()
    }
}

impl StateFile {
    /// Reads and parses the safetensors file at `path`.
    ///
    /// Errors: [`Error::Io`] when it cannot be read, [`Error::StateFile`] (naming the path)
    /// when it is not a safetensors file.
    ///
    /// ```
    /// use batchnorm_cuda::state::StateFile;
    /// use batchnorm_cuda::Error;
    ///
    /// assert!(matches!(StateFile::open("/no/such/file.safetensors"), Err(Error::Io(_))));
    /// ```
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::from_bytes(std::fs::read(path)?).map_err(|err| match err {
            Error::StateFile(reason) => Error::StateFile(format!("{}: {reason}", path.display())),
            other => other,
        })
    }

    /// Parses the bytes of a safetensors file, keeping them.
    ///
    /// Errors: [`Error::StateFile`] when they are not a safetensors file.
    ///
    /// ```
    /// use batchnorm_cuda::state::StateFile;
    /// use batchnorm_cuda::Error;
    ///
    /// assert!(matches!(StateFile::from_bytes(b"not safetensors".to_vec()), Err(Error::StateFile(_))));
    /// ```
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        let (header_len, header) = parse_header(&bytes)?;
        data_section(&bytes, header_len)?;
        Ok(Self {
            bytes,
            header_len,
            header,
        })
    }

    /// Reads the layer whose keys start with `prefix`, converting F16, BF16 and F64 parameters
    /// to f32; cheap: a few map look-ups and copies of `C` values, no parsing.
    ///
    /// Errors: as [`LayerState::from_safetensors`], less the file errors.
    ///
    /// ```
    /// use batchnorm_cuda::state::StateFile;
    /// use batchnorm_cuda::{BatchNormConfig, LayerState};
    ///
    /// let config = BatchNormConfig::new(1).affine(false);
    /// let state = LayerState {
    ///     running_mean: Some(vec![0.5]),
    ///     running_var: Some(vec![2.0]),
    ///     num_batches_tracked: 3,
    ///     ..Default::default()
    /// };
    /// let file = StateFile::from_bytes(StateFile::to_bytes(&[("features.1.", &state)])?)?;
    /// assert_eq!(file.layer("features.1.", &config)?, state);
    /// # Ok::<(), batchnorm_cuda::Error>(())
    /// ```
    pub fn layer(&self, prefix: &str, config: &BatchNormConfig) -> Result<LayerState> {
        read_layer(
            &self.header,
            data_section(&self.bytes, self.header_len)?,
            prefix,
            config,
        )
    }

    /// Serializes the layers, each as `(prefix, state)`, into the bytes of one safetensors
    /// file: per-channel tensors as F32 `[C]`, `num_batches_tracked` as an I64 scalar (only
    /// for layers with running statistics, as in PyTorch), and `__metadata__` `{"format":
    /// "pt"}`.
    ///
    /// Each state is checked first against the configuration its fields imply (affine when it
    /// has `weight` or `bias`, running statistics when it has `running_mean` or `running_var`,
    /// `C` from its first field), so a file this writes always reads back.
    ///
    /// Errors: as [`LayerState::check`], with keys named with their prefix;
    /// [`Error::StateFile`] when two layers would write the same key, when a counter exceeds
    /// `i64::MAX`, or when safetensors refuses the data.
    ///
    /// ```
    /// use batchnorm_cuda::state::StateFile;
    /// use batchnorm_cuda::{Error, LayerState};
    ///
    /// let half_affine = LayerState { weight: Some(vec![1.0]), ..Default::default() };
    /// assert!(matches!(
    ///     StateFile::to_bytes(&[("bn.", &half_affine)]),
    ///     Err(Error::StateKeyMissing { key }) if key == "bn.bias"
    /// ));
    /// ```
    pub fn to_bytes(layers: &[(&str, &LayerState)]) -> Result<Vec<u8>> {
        safetensors::serialize(entries(layers)?, Some(pt_metadata())).map_err(write_error)
    }

    /// Writes the layers into one safetensors file at `path`, as [`StateFile::to_bytes`]
    /// serializes them. The file is written beside `path` and then renamed over it.
    ///
    /// Errors: as [`StateFile::to_bytes`], and [`Error::Io`] when the file cannot be written.
    ///
    /// ```no_run
    /// use batchnorm_cuda::state::StateFile;
    /// use batchnorm_cuda::LayerState;
    ///
    /// # let (bn1, bn2) = (LayerState::default(), LayerState::default());
    /// StateFile::save("bn.safetensors", &[("layer1.0.bn1.", &bn1), ("layer1.0.bn2.", &bn2)])?;
    /// # Ok::<(), batchnorm_cuda::Error>(())
    /// ```
    pub fn save(path: impl AsRef<Path>, layers: &[(&str, &LayerState)]) -> Result<()> {
        safetensors::serialize_to_file(entries(layers)?, Some(pt_metadata()), path.as_ref())
            .map_err(write_error)
    }
}

/// Parses a safetensors header: the header's length in bytes and the header.
fn parse_header(bytes: &[u8]) -> Result<(usize, Metadata)> {
    SafeTensors::read_metadata(bytes)
        .map_err(|err| Error::StateFile(format!("not a safetensors file: {err}")))
}

/// The tensor data after a header of `header_len` bytes (`parse_header` checked that it fits).
fn data_section(bytes: &[u8], header_len: usize) -> Result<&[u8]> {
    header_len
        .checked_add(HEADER_LEN_BYTES)
        .and_then(|start| bytes.get(start..))
        .ok_or_else(|| Error::StateFile(format!("header of {header_len} bytes overruns the file")))
}

/// Reads the layer at `prefix` from a parsed header and its data section, then checks it.
/// Errors come in `state_dict` order of the keys, then from [`LayerState::check_keys`].
fn read_layer(
    header: &Metadata,
    data: &[u8],
    prefix: &str,
    config: &BatchNormConfig,
) -> Result<LayerState> {
    let [weight, bias, running_mean, running_var] = PER_CHANNEL.map(|(name, _)| {
        let key = format!("{prefix}{name}");
        header
            .info(&key)
            .map(|info| to_f32(&key, info, data, config.num_features))
            .transpose()
    });
    let key = format!("{prefix}{NUM_BATCHES_TRACKED}");
    let num_batches_tracked = header
        .info(&key)
        .map_or(Ok(0), |info| to_counter(&key, info, data));
    let state = LayerState {
        weight: weight?,
        bias: bias?,
        running_mean: running_mean?,
        running_var: running_var?,
        num_batches_tracked: num_batches_tracked?,
    };
    state.check_keys(config, prefix)?;
    Ok(state)
}

/// The bytes of one tensor (`parse_header` checked the offsets; this never trusts them).
fn tensor_bytes<'a>(key: &str, info: &TensorInfo, data: &'a [u8]) -> Result<&'a [u8]> {
    let (start, end) = info.data_offsets;
    data.get(start..end).ok_or_else(|| {
        Error::StateFile(format!(
            "`{key}`: data at {start}..{end} is outside the {} data bytes",
            data.len()
        ))
    })
}

/// A per-channel tensor of shape `[channels]` in F32, F16, BF16 or F64, as f32.
fn to_f32(key: &str, info: &TensorInfo, data: &[u8], channels: usize) -> Result<Vec<f32>> {
    if info.shape != [channels] {
        return Err(shape_error(key.to_owned(), &[channels], &info.shape));
    }
    let bytes = tensor_bytes(key, info, data)?;
    match info.dtype {
        Dtype::F32 => Ok(decode(bytes, f32::from_le_bytes)),
        Dtype::F16 => Ok(decode(bytes, |b| f16::from_le_bytes(b).to_f32())),
        Dtype::BF16 => Ok(decode(bytes, |b| bf16::from_le_bytes(b).to_f32())),
        // Rounds to nearest; magnitudes beyond f32 become infinite.
        Dtype::F64 => Ok(decode(bytes, |b| f64::from_le_bytes(b) as f32)),
        other => Err(dtype_error(key, "F32, F16, BF16 or F64", other)),
    }
}

/// The counter: a scalar (shape `[]`) I64 or I32 that is `>= 0`.
fn to_counter(key: &str, info: &TensorInfo, data: &[u8]) -> Result<u64> {
    if !info.shape.is_empty() {
        return Err(shape_error(key.to_owned(), &[], &info.shape));
    }
    let bytes = tensor_bytes(key, info, data)?;
    let value = match info.dtype {
        Dtype::I64 => decode(bytes, i64::from_le_bytes),
        Dtype::I32 => decode(bytes, |b| i64::from(i32::from_le_bytes(b))),
        other => return Err(dtype_error(key, "I64 or I32", other)),
    };
    match value[..] {
        [count] => u64::try_from(count).map_err(|_| Error::StateKeyMalformed {
            key: key.to_owned(),
            reason: format!("expected a batch count >= 0, got {count}"),
        }),
        _ => Err(Error::StateFile(format!(
            "`{key}`: a scalar of {} bytes",
            bytes.len()
        ))),
    }
}

/// Little-endian elements of `N` bytes each, converted by `from_le`.
fn decode<const N: usize, T>(bytes: &[u8], from_le: impl Fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|chunk| {
            let mut element = [0; N];
            element.copy_from_slice(chunk);
            from_le(element)
        })
        .collect()
}

fn shape_error(key: String, expected: &[usize], got: &[usize]) -> Error {
    Error::StateKeyMalformed {
        key,
        reason: format!("expected shape {expected:?}, got {got:?}"),
    }
}

fn dtype_error(key: &str, expected: &str, got: Dtype) -> Error {
    Error::StateKeyMalformed {
        key: key.to_owned(),
        reason: format!("expected dtype {expected}, got {got}"),
    }
}

/// One tensor to write.
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for Entry {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        (&self.bytes[..]).into()
    }

    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// The tensors of all layers, each state checked, no key twice.
fn entries(layers: &[(&str, &LayerState)]) -> Result<Vec<(String, Entry)>> {
    let mut entries = Vec::new();
    for &(prefix, state) in layers {
        state.check_keys(&state.implied_config(), prefix)?;
        for (name, _, values) in state.per_channel() {
            if let Some(values) = values {
                let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                let entry = Entry {
                    dtype: Dtype::F32,
                    shape: vec![values.len()],
                    bytes,
                };
                entries.push((format!("{prefix}{name}"), entry));
            }
        }
        if state.running_mean.is_some() {
            let key = format!("{prefix}{NUM_BATCHES_TRACKED}");
            let count = i64::try_from(state.num_batches_tracked).map_err(|_| {
                Error::StateFile(format!(
                    "`{key}` = {} does not fit PyTorch's int64",
                    state.num_batches_tracked
                ))
            })?;
            entries.push((
                key,
                Entry {
                    dtype: Dtype::I64,
                    shape: vec![],
                    bytes: count.to_le_bytes().to_vec(),
                },
            ));
        }
    }
    let mut keys = HashSet::with_capacity(entries.len());
    if let Some((key, _)) = entries.iter().find(|(key, _)| !keys.insert(key)) {
        return Err(Error::StateFile(format!(
            "two layers would both write `{key}`: the prefixes collide"
        )));
    }
    Ok(entries)
}

/// The `__metadata__` PyTorch checkpoints on the Hugging Face hub carry.
fn pt_metadata() -> HashMap<String, String> {
    HashMap::from([("format".to_owned(), "pt".to_owned())])
}

fn write_error(err: SafeTensorError) -> Error {
    match err {
        SafeTensorError::IoError(err) => Error::Io(err),
        other => Error::StateFile(format!("cannot serialize: {other}")),
    }
}

/// The host-side state and mode of a batch-norm layer: the same methods on the GPU layer
/// ([`gpu::BatchNorm`](crate::gpu::BatchNorm)), the CPU reference
/// ([`reference::BatchNorm`](crate::reference::BatchNorm)) and, with the `nccl` feature, the
/// synchronized layer, so that code (a checkpoint loader, a test) can drive any of them. The
/// activations' side (forward, backward) stays on each layer: device views on the GPU, host
/// slices on the CPU.
///
/// Every setter checks before it writes: on error nothing changes.
pub trait StatefulLayer {
    /// The layer's configuration.
    fn config(&self) -> &BatchNormConfig;
    /// Training mode: batch statistics, running statistics updated.
    fn train(&mut self);
    /// Eval mode: running statistics (batch statistics when `track_running_stats` is false).
    fn eval(&mut self);
    /// Whether the layer is in training mode.
    fn is_training(&self) -> bool;
    /// The number of training forwards that updated the running statistics.
    fn num_batches_tracked(&self) -> u64;
    /// Sets the counter; [`Error::NoRunningStats`] when the layer keeps no running statistics.
    fn set_num_batches_tracked(&mut self, value: u64) -> Result<()>;
    /// A host copy of the whole state (the GPU layers copy from the device).
    fn state(&self) -> Result<LayerState>;
    /// Replaces the whole state after checking it against the configuration.
    fn load_state(&mut self, state: &LayerState) -> Result<()>;
    /// Replaces the weight: [`Error::NotAffine`], [`Error::BufferLength`].
    fn set_weight(&mut self, values: &[f32]) -> Result<()>;
    /// Replaces the bias: [`Error::NotAffine`], [`Error::BufferLength`].
    fn set_bias(&mut self, values: &[f32]) -> Result<()>;
    /// Replaces the running mean: [`Error::NoRunningStats`], [`Error::BufferLength`].
    fn set_running_mean(&mut self, values: &[f32]) -> Result<()>;
    /// Replaces the running variance: [`Error::NoRunningStats`], [`Error::BufferLength`],
    /// [`Error::InvalidRunningVar`] for a negative or non-finite value.
    fn set_running_var(&mut self, values: &[f32]) -> Result<()>;
    /// Replaces both running statistics, checked first (lengths, a finite non-negative
    /// variance), then [`Error::NoRunningStats`].
    fn set_running_stats(&mut self, mean: &[f32], var: &[f32]) -> Result<()>;
}

/// Implements [`StatefulLayer`] for a layer type by its inherent methods of the same names;
/// `state` says how to get a `Result<LayerState>` from the layer.
macro_rules! stateful_layer_by_inherent_methods {
    ($layer:ty, state: |$l:ident| $state:expr) => {
        impl $crate::state::StatefulLayer for $layer {
            fn config(&self) -> &$crate::config::BatchNormConfig {
                <$layer>::config(self)
            }
            fn train(&mut self) {
                <$layer>::train(self)
            }
            fn eval(&mut self) {
                <$layer>::eval(self)
            }
            fn is_training(&self) -> bool {
                <$layer>::is_training(self)
            }
            fn num_batches_tracked(&self) -> u64 {
                <$layer>::num_batches_tracked(self)
            }
            fn set_num_batches_tracked(&mut self, value: u64) -> $crate::error::Result<()> {
                <$layer>::set_num_batches_tracked(self, value)
            }
            fn state(&self) -> $crate::error::Result<$crate::state::LayerState> {
                let $l = self;
                $state
            }
            fn load_state(
                &mut self,
                state: &$crate::state::LayerState,
            ) -> $crate::error::Result<()> {
                <$layer>::load_state(self, state)
            }
            fn set_weight(&mut self, values: &[f32]) -> $crate::error::Result<()> {
                <$layer>::set_weight(self, values)
            }
            fn set_bias(&mut self, values: &[f32]) -> $crate::error::Result<()> {
                <$layer>::set_bias(self, values)
            }
            fn set_running_mean(&mut self, values: &[f32]) -> $crate::error::Result<()> {
                <$layer>::set_running_mean(self, values)
            }
            fn set_running_var(&mut self, values: &[f32]) -> $crate::error::Result<()> {
                <$layer>::set_running_var(self, values)
            }
            fn set_running_stats(
                &mut self,
                mean: &[f32],
                var: &[f32],
            ) -> $crate::error::Result<()> {
                <$layer>::set_running_stats(self, mean, var)
            }
        }
    };
}
pub(crate) use stateful_layer_by_inherent_methods;
