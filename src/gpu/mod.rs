//! The GPU side: PTX registry, kernel table, launch configuration, the stateless functional
//! layer over borrowed device memory (like cuDNN) and the stateful [`BatchNorm`] layer (like
//! `nn.BatchNorm2d`).
//!
//! | layer | what it is |
//! | --- | --- |
//! | `kernels/*.cu` | the CUDA sources, compiled to PTX by `build.rs` |
//! | [`ptx`] | the generated registry of modules and entry points |
//! | [`GpuContext`] | a CUDA context, a stream, and every kernel loaded once |
//! | [`launch`] | grid and block sizes as pure functions |
//! | [`functional`] | stateless calls: device buffers + a [`TensorDesc`](crate::TensorDesc) |
//! | [`BatchNorm`] | parameters, running statistics and mode on the device |

mod context;
pub mod functional;
mod kernels;
pub mod launch;
mod layer;
mod params;
pub mod ptx;
mod workspace;

pub use context::GpuContext;
pub use layer::{BatchNorm, ForwardCache};
pub use workspace::Workspace;
