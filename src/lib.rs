//! # batchnorm-cuda
//!
//! Hand-written CUDA kernels for batch normalization with PyTorch's semantics
//! (`nn.BatchNorm1d/2d/3d`), a safe Rust wrapper over them, and a CPU reference in f64 that
//! checks them and runs the same API where no GPU is.
//!
//! | layer | what it is |
//! | --- | --- |
//! | `kernels/*.cu` | CUDA sources, prebuilt to PTX in `kernels/prebuilt/` (contract: `kernels/ABI.md`) |
//! | [`gpu::ptx`] | the generated registry of PTX modules and their entry points |
//! | [`gpu::GpuContext`] | a device, a stream, and every kernel loaded once |
//! | [`gpu::launch`] | grid and block sizes as pure functions |
//! | [`gpu::functional`] | stateless calls: request structs of borrowed device memory and a [`TensorDesc`], like cuDNN |
//! | [`gpu::BatchNorm`] | the stateful layer: parameters, gradients, running statistics, train/eval |
//! | [`reference`](mod@reference) | the same functional calls and layer on the CPU, f64 accumulation |
//! | `conv` | convolution, transposed convolution and linear layer by direct loops (f64 on the CPU, f32 on the GPU in `conv::gpu`): test tools that check a fold end to end (feature `test-tools`) |
//! | [`fold`] | conv/linear + batch-norm folding: which weight element scales by which channel |
//! | [`epilogue`] | fused `relu(BN(x))` / `relu(BN(x) + z)`: the epilogue with its buffers and the ReLU mask's layout ([`gpu::functional`], [`reference::fused`]) |
//! | [`stats`] | the saved batch statistics on the host, as both the GPU layers and the reference hand them out |
//! | [`norms`] | group, layer, instance and RMS normalization: one row-statistics shape for all four ([`reference::norms`], [`gpu::norms`]) |
//! | [`state`] | a layer's state in PyTorch's `state_dict` names, as safetensors |
//! | `candle` | batch norm as a candle module with autograd, on CPU and CUDA tensors (feature `candle`) |
//!
//! Activations are `f32`, [`half::f16`] or [`half::bf16`] ([`Element`]) in channels-first or
//! channels-last memory order ([`Layout`]); parameters and statistics are always `f32`.
//!
//! ```
//! use batchnorm_cuda::{gpu, reference, BatchNormConfig, TensorDesc};
//!
//! // BatchNorm2d(3) on a (2, 3, 4, 4) batch, on the GPU when there is one.
//! let desc = TensorDesc::nchw(2, 3, 4, 4)?;
//! let x: Vec<f32> = (0..desc.numel()).map(|i| (i % 7) as f32).collect();
//! let mut cpu = reference::BatchNorm::new(BatchNormConfig::new(3))?;
//! let (y, _cache) = cpu.forward(&x, &desc)?;
//! assert_eq!(cpu.num_batches_tracked(), 1);
//!
//! match gpu::GpuContext::new(0) {
//!     Ok(ctx) => {
//!         let mut bn = gpu::BatchNorm::new(&ctx, BatchNormConfig::new(3))?;
//!         let dx = ctx.stream().clone_htod(&x)?;
//!         let mut dy = ctx.stream().alloc_zeros::<f32>(x.len())?;
//!         bn.forward(&desc, &dx.as_view(), &mut dy.as_view_mut())?;
//!         let y_gpu = ctx.stream().clone_dtoh(&dy)?;
//!         assert!(y.iter().zip(&y_gpu).all(|(a, b)| (a - b).abs() < 1e-4));
//!     }
//!     // No driver, no device or no kernels in this build: a typed error, never a panic.
//!     Err(e) => println!("CPU only: {e}"),
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

#[cfg(feature = "candle")]
pub mod candle;
pub mod config;
#[cfg(feature = "test-tools")]
pub mod conv;
pub mod dtype;
pub mod epilogue;
pub mod error;
pub mod fold;
pub mod gpu;
pub mod norms;
pub mod reference;
pub mod shape;
pub mod state;
pub mod stats;
pub mod validate;

pub use config::{BatchNormConfig, RunningVarUpdate};
pub use dtype::{DType, Element};
pub use epilogue::EpilogueKind;
pub use error::{Error, Result};
pub use shape::{Geometry, Layout, TensorDesc};
pub use state::{LayerState, StatefulLayer};

/// The cudarc this crate is built on, for streams and device buffers of the same version (and to
/// make a [`gpu::GpuContext`] from another crate's stream, e.g. candle's).
pub use cudarc;

/// The README's code compiles (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
