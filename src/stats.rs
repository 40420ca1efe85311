//! What the GPU layers and the CPU reference both hand out on the host: the vocabulary they
//! share, so that neither depends on the other.

/// The batch statistics a training forward saves for its backward: per channel, the `mean` and
/// `invstd = 1 / sqrt(biased_var + eps)`, in f32 whatever the activation dtype (as PyTorch and
/// cuDNN save them), and `mean_lo`, the part of the mean f32 cannot hold. An empty batch saves
/// mean 0 and `1 / sqrt(eps)`.
#[derive(Clone, Debug, PartialEq)]
pub struct SavedStats {
    /// Batch mean rounded to f32, one per channel.
    pub mean: Vec<f32>,
    /// The rest of the batch mean, `mean + mean_lo` (a double-float, about 48 bits): the
    /// backward forms `x - mean` with both, so a mean large next to the spread loses nothing
    /// (the f32 mean alone is off by up to half an ulp, 3e-5 at 1000, which `invstd`
    /// magnifies). Zeros for statistics saved without it (PyTorch's).
    pub mean_lo: Vec<f32>,
    /// `1 / sqrt(biased_var + eps)`, one per channel.
    pub invstd: Vec<f32>,
}
