//! What the GPU layers and the CPU reference both hand out on the host: the vocabulary they
//! share, so that neither depends on the other.

/// The batch statistics a training forward saves for its backward: per channel, the `mean` and
/// `invstd = 1 / sqrt(biased_var + eps)`, in f32 whatever the activation dtype (as PyTorch and
/// cuDNN save them). An empty batch saves mean 0 and `1 / sqrt(eps)`.
#[derive(Clone, Debug, PartialEq)]
pub struct SavedStats {
    /// Batch mean, one per channel.
    pub mean: Vec<f32>,
    /// `1 / sqrt(biased_var + eps)`, one per channel.
    pub invstd: Vec<f32>,
}
