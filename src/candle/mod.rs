//! The candle adapter (feature `candle`): this crate's batch norm ([`BatchNorm`]) and its group,
//! layer, instance and RMS norms ([`Norm`]) as [`candle_nn::ModuleT`]s, trainable through
//! candle's autograd.
//!
//! candle-nn's own `BatchNorm` is about ten tensor ops (each a pass over memory), keeps no
//! `num_batches_tracked`, has no cumulative average, and its eval forward adds `eps` in the
//! statistics' dtype. [`BatchNorm`] here is one candle custom op per call with a backward op:
//!
//! | candle tensors on | forward and backward run on |
//! | --- | --- |
//! | the CPU | [`crate::reference`] (f64 accumulation) |
//! | a CUDA device (feature `candle-cuda`) | [`crate::gpu::functional`] and [`crate::gpu::norms`], on candle's stream |
//!
//! Works with candle-core and candle-nn 0.10 and 0.11 (both on cudarc 0.19); the crates are
//! re-exported as [`candle_core`] and [`candle_nn`] so a program can use the same versions.

mod batch_norm;
mod layout;
mod norm;
mod ops;

pub use batch_norm::{BatchNorm, Dims};
pub use candle_core;
pub use candle_nn;
pub use norm::Norm;
