//! # batchnorm-cuda
//!
//! Hand-written CUDA kernels for batch normalization with PyTorch's semantics, a safe Rust
//! wrapper, and a CPU reference that checks them.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod config;
pub mod dtype;
pub mod error;
pub mod fold;
pub mod gpu;
pub mod reference;
pub mod shape;
pub mod state;
pub mod validate;

pub use config::{BatchNormConfig, RunningVarUpdate};
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use shape::{Geometry, Layout, TensorDesc};
pub use state::LayerState;
