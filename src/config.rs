//! Layer configuration with PyTorch's defaults, and its validation.

use crate::error::{Error, Result};

/// How the running variance is updated from a batch of `m` values per channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RunningVarUpdate {
    /// PyTorch: the unbiased batch variance, `var * m / (m - 1)`.
    #[default]
    Unbiased,
    /// Keras / TensorFlow: the biased batch variance used for normalizing.
    Biased,
}

/// Configuration of a batch-norm layer. `BatchNormConfig::new(c)` gives PyTorch's defaults:
/// `eps = 1e-5`, `momentum = Some(0.1)`, `affine = true`, `track_running_stats = true`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormConfig {
    /// Number of channels `C`.
    pub num_features: usize,
    /// Added to the variance before the square root; kept in f32 whatever the activation dtype.
    pub eps: f32,
    /// Weight of the new batch in the running-average update (PyTorch's convention: Keras'
    /// `momentum = 0.99` is `Some(0.01)` here). `None` is the cumulative average,
    /// factor `1 / num_batches_tracked`.
    pub momentum: Option<f32>,
    /// Learnable per-channel `weight` (scale) and `bias` (shift).
    pub affine: bool,
    /// Keep running statistics and use them in eval mode. Without them, eval mode normalizes
    /// with the batch statistics, as in PyTorch.
    pub track_running_stats: bool,
    /// Which variance feeds `running_var`.
    pub running_var_update: RunningVarUpdate,
}

impl BatchNormConfig {
    /// PyTorch's defaults for `num_features` channels.
    pub fn new(num_features: usize) -> Self {
        Self {
            num_features,
            eps: 1e-5,
            momentum: Some(0.1),
            affine: true,
            track_running_stats: true,
            running_var_update: RunningVarUpdate::Unbiased,
        }
    }

    /// Sets `eps`.
    pub fn eps(self, eps: f32) -> Self {
        Self { eps, ..self }
    }

    /// Sets `momentum` (`None`: cumulative average).
    pub fn momentum(self, momentum: Option<f32>) -> Self {
        Self { momentum, ..self }
    }

    /// Sets `affine`.
    pub fn affine(self, affine: bool) -> Self {
        Self { affine, ..self }
    }

    /// Sets `track_running_stats`.
    pub fn track_running_stats(self, track_running_stats: bool) -> Self {
        Self {
            track_running_stats,
            ..self
        }
    }

    /// Sets how `running_var` is updated.
    pub fn running_var_update(self, running_var_update: RunningVarUpdate) -> Self {
        Self {
            running_var_update,
            ..self
        }
    }

    /// Checks `C > 0`, `eps` finite and non-negative, `momentum` in `[0, 1]`.
    pub fn validate(&self) -> Result<()> {
        if self.num_features == 0 {
            return Err(Error::ZeroChannels);
        }
        validate_eps(self.eps)?;
        if let Some(momentum) = self.momentum {
            validate_momentum(momentum)?;
        }
        Ok(())
    }

    /// The weight of the new batch for the update that makes the counter `batches_after`.
    pub fn average_factor(&self, batches_after: u64) -> f32 {
        match self.momentum {
            Some(momentum) => momentum,
            None => (1.0 / batches_after as f64) as f32,
        }
    }
}

/// `eps` must be finite and `>= 0`.
pub fn validate_eps(eps: f32) -> Result<()> {
    if eps.is_finite() && eps >= 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidEps { eps })
    }
}

/// `momentum` must be in `[0, 1]` (NaN is not).
pub fn validate_momentum(momentum: f32) -> Result<()> {
    if (0.0..=1.0).contains(&momentum) {
        Ok(())
    } else {
        Err(Error::InvalidMomentum { momentum })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_pytorch() {
        let cfg = BatchNormConfig::new(8);
        assert_eq!(
            (cfg.eps, cfg.momentum, cfg.affine, cfg.track_running_stats),
            (1e-5, Some(0.1), true, true)
        );
        assert_eq!(cfg.running_var_update, RunningVarUpdate::Unbiased);
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn cumulative_average_factor_is_one_over_count() {
        let cfg = BatchNormConfig::new(1).momentum(None);
        assert_eq!(cfg.average_factor(1), 1.0);
        assert_eq!(cfg.average_factor(4), 0.25);
        assert_eq!(BatchNormConfig::new(1).average_factor(4), 0.1);
    }

    #[test]
    fn rejects_bad_eps_and_momentum() {
        for eps in [-1e-5, f32::NAN, f32::INFINITY] {
            assert!(matches!(
                BatchNormConfig::new(2).eps(eps).validate(),
                Err(Error::InvalidEps { .. })
            ));
        }
        for m in [-0.1, 1.5, f32::NAN] {
            assert!(matches!(
                BatchNormConfig::new(2).momentum(Some(m)).validate(),
                Err(Error::InvalidMomentum { .. })
            ));
        }
        assert!(BatchNormConfig::new(2)
            .eps(0.0)
            .momentum(Some(1.0))
            .validate()
            .is_ok());
        assert!(matches!(
            BatchNormConfig::new(0).validate(),
            Err(Error::ZeroChannels)
        ));
    }
}
