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
//! | [`functional`] | stateless calls: request structs of device buffers and a [`TensorDesc`](crate::TensorDesc), with fused ReLU epilogues |
//! | [`norms`] | group, layer, instance and RMS normalization ([`crate::norms`]) |
//! | [`BatchNorm`] | parameters, running statistics and mode on the device |
//! | [`sync`] | synchronized batch norm across data-parallel ranks (`SyncBatchNorm` over NCCL with the `nccl` feature) |

mod context;
mod forwards;
pub mod functional;
pub(crate) mod kernels;
pub mod launch;
mod layer;
pub mod norms;
pub(crate) mod ops;
pub(crate) mod params;
pub mod ptx;
pub mod sync;
mod views;
mod workspace;

pub use context::GpuContext;
pub use layer::{BatchNorm, ForwardCache};
pub use workspace::Workspace;
