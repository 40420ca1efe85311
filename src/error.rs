//! The crate's one error type. Every variant carries the values that were wrong.

use crate::dtype::DType;
use crate::shape::Layout;

/// Everything that can go wrong in this crate. A call that returns an error leaves the layer's
/// parameters, running statistics and counter exactly as they were.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // fields: the values named in each message
pub enum Error {
    /// The input does not have 2 to 5 dimensions.
    #[error("batch norm input must have 2 to 5 dimensions (N, C, ...), got {got}")]
    Rank { got: usize },

    /// A shape or layer with no channels.
    #[error("batch norm input must have at least one channel (C = 0)")]
    ZeroChannels,

    /// The element count overflows `usize`.
    #[error("tensor of shape {dims:?} has more elements than fit in usize")]
    TooLarge { dims: Vec<usize> },

    /// The input's channel count differs from the layer's.
    #[error("input has {got} channels, the layer has {expected}")]
    ChannelMismatch { expected: usize, got: usize },

    /// A tensor (e.g. `dy`) has another logical shape than `x`.
    #[error("{what} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        what: &'static str,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    /// A tensor (e.g. `dy`) has another memory layout than `x`.
    #[error("{what} is {got}, expected {expected} like the input")]
    LayoutMismatch {
        what: &'static str,
        expected: Layout,
        got: Layout,
    },

    /// A tensor has another dtype than expected.
    #[error("{what} has dtype {got}, expected {expected}")]
    DTypeMismatch {
        what: &'static str,
        expected: DType,
        got: DType,
    },

    /// A buffer holds the wrong number of elements.
    #[error("{what} holds {got} elements, needs {needed}")]
    BufferLength {
        what: &'static str,
        needed: usize,
        got: usize,
    },

    /// Training with one value per channel: the variance is undefined (PyTorch refuses it too).
    #[error("expected more than 1 value per channel when training, got input of shape {dims:?}")]
    SingleValuePerChannel { dims: Vec<usize> },

    /// `eps` negative, NaN or infinite.
    #[error("eps must be finite and non-negative, got {eps}")]
    InvalidEps { eps: f32 },

    /// `momentum` (or an average factor) outside `[0, 1]`, or NaN.
    #[error("momentum must be in [0, 1], got {momentum}")]
    InvalidMomentum { momentum: f32 },

    /// A running variance that is negative, NaN or infinite.
    #[error("running_var[{channel}] is {value}: a variance must be finite and non-negative")]
    InvalidRunningVar { channel: usize, value: f32 },

    /// The call needs running statistics the layer does not keep.
    #[error(
        "{what} needs running statistics, but the layer was built with track_running_stats = false"
    )]
    NoRunningStats { what: &'static str },

    /// The call needs the layer in eval mode.
    #[error("{what} needs the layer in eval mode; call eval() first")]
    TrainingMode { what: &'static str },

    /// The call needs affine parameters the layer does not have.
    #[error("{what} needs affine parameters, but the layer was built with affine = false")]
    NotAffine { what: &'static str },

    /// A backward without the saved statistics of its own forward.
    #[error("backward needs the saved statistics of a training forward, but {reason}")]
    MissingSavedStats { reason: &'static str },

    /// A fused backward that does not follow a fused forward of its kind with a mask
    /// (e.g. `backward_relu` after a plain `forward`).
    #[error("{backward} needs the mask of a {needed}, but its forward was {ran}")]
    EpilogueMismatch {
        backward: &'static str,
        needed: &'static str,
        ran: &'static str,
    },

    /// A fold whose shapes or parameters do not fit.
    #[error("cannot fold: {reason}")]
    InvalidFold { reason: String },

    /// A reference convolution whose shapes or parameters do not fit (`conv`).
    #[error("invalid convolution: {reason}")]
    InvalidConv { reason: String },

    /// A group norm whose group count is 0 or does not divide the channels.
    #[error("{channels} channels cannot be split into {groups} groups")]
    GroupsDoNotDivideChannels { groups: usize, channels: usize },

    /// A layer or RMS norm whose `normalized_shape` is empty, has a zero dimension or is not
    /// the trailing dimensions of the input.
    #[error("normalized_shape {normalized_shape:?} is not the trailing dimensions of an input of shape {dims:?}")]
    NormalizedShape {
        normalized_shape: Vec<usize>,
        dims: Vec<usize>,
    },

    /// A state file lacks a key.
    #[error("state key `{key}` is missing")]
    StateKeyMissing { key: String },

    /// A state file key has the wrong shape or dtype, or bad values.
    #[error("state key `{key}` is malformed: {reason}")]
    StateKeyMalformed { key: String, reason: String },

    /// A state file that cannot be read or written.
    #[error("state file: {0}")]
    StateFile(String),

    /// libcuda could not be loaded.
    #[error(
        "no CUDA driver: libcuda could not be loaded. On a machine with an NVIDIA GPU, install its \
         driver (CUDA 12.0 or newer). Without one, `reference::BatchNorm` runs the same API on the \
         CPU, and `bash scripts/emulated-gpu.sh` (in the repository) runs the GPU tests on an \
         emulated driver"
    )]
    NoDriver,

    /// The driver is older than the CUDA version whose PTX the kernels are (versions as
    /// `cuDriverGetVersion` gives them: 12040 is CUDA 12.4).
    #[error(
        "the CUDA driver supports CUDA {}.{}, but this build's kernels need CUDA {}.{} or newer: \
         update the NVIDIA driver, or build without BATCHNORM_BUILD_KERNELS=1 to get the \
         prebuilt kernels, which load on CUDA 12.0",
        .driver / 1000, .driver % 1000 / 10, .needed / 1000, .needed % 1000 / 10
    )]
    DriverTooOld { driver: i32, needed: i32 },

    /// No CUDA device with that ordinal.
    #[error("no CUDA device with ordinal {ordinal}: the driver reports {count}")]
    NoDevice { ordinal: usize, count: usize },

    /// A device allocation failed.
    #[error("out of device memory allocating {bytes} bytes")]
    OutOfMemory { bytes: usize },

    /// An entry point is missing from the PTX (a build problem).
    #[error("kernel `{name}` is missing from the compiled PTX")]
    MissingKernel { name: &'static str },

    /// The crate was built without its kernels (`kernels/prebuilt/` was missing).
    #[error(
        "this build has no CUDA kernels: kernels/prebuilt/ was missing when the crate was \
         compiled. In the repository, run `bash scripts/build-kernels.sh`, or build with \
         BATCHNORM_BUILD_KERNELS=1 and nvcc (`scripts/install-nvcc.sh`)"
    )]
    KernelsNotBuilt,

    /// A workspace used on another stream than the one it serves (see
    /// [`Workspace`](crate::gpu::Workspace)).
    #[error(
        "the workspace serves the stream of its first call: calls in flight on two streams would \
         share its semaphores and partials; use one Workspace per stream"
    )]
    WorkspaceOnAnotherStream,

    /// A call that needs a larger workspace while a CUDA graph is being captured with it, or
    /// once one was: growing would free buffers the graph reads at every replay.
    #[error(
        "the workspace holds {held} bytes and this call needs {needed}, but it cannot grow: \
         {reason}; reserve it for the largest shape before capturing (Workspace::reserve_for, \
         BatchNorm::reserve), or use another workspace"
    )]
    WorkspaceCannotGrow {
        held: usize,
        needed: usize,
        reason: &'static str,
    },

    /// A training forward with `momentum = None` (cumulative average) updating the running
    /// statistics while the stream captures a CUDA graph: its factor `1 / num_batches_tracked`
    /// is a launch parameter, so every replay would apply the factor of the captured call.
    #[error(
        "momentum = None (cumulative average) cannot be captured in a CUDA graph: each replay \
         would reuse the factor 1/num_batches_tracked of the captured call; capture with a \
         momentum, or run this forward outside the graph"
    )]
    CumulativeAverageInCapture,

    /// A valid request this crate does not support.
    #[error("{what}: {reason}")]
    Unsupported { what: &'static str, reason: String },

    /// An NCCL call failed, or libnccl could not be loaded (feature `nccl`).
    #[cfg(feature = "nccl")]
    #[error("NCCL {call} failed: {reason}")]
    Nccl { call: &'static str, reason: String },

    /// Any other CUDA driver error.
    #[error("CUDA driver error: {0}")]
    Driver(#[from] cudarc::driver::DriverError),

    /// A file error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
