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
//! | [`conv`] | a direct convolution, transposed convolution and linear layer (a test tool: the device side of the fold check, not fast) |
//! | [`fused`] | the same calls with a fused `relu(BN(x) [+ z])` epilogue and its 1-bit ReLU mask |
//! | [`norms`] | group, layer, instance and RMS normalization ([`crate::norms`]) |
//! | [`BatchNorm`] | parameters, running statistics and mode on the device |
//! | [`sync`] | synchronized batch norm across data-parallel ranks (`SyncBatchNorm` over NCCL with the `nccl` feature) |

mod context;
pub mod conv;
pub mod functional;
pub mod fused;
mod kernels;
pub mod launch;
mod layer;
pub mod norms;
mod params;
pub mod ptx;
pub mod sync;
mod workspace;

pub use context::GpuContext;
pub use layer::{BatchNorm, ForwardCache};
pub use workspace::Workspace;
