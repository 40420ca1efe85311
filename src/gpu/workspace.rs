//! Scratch memory of the split reductions, reused across calls so that steady-state calls
//! neither allocate nor synchronize the host, and the two rules that keep reusing it safe: a
//! workspace serves one stream, and it never grows while a CUDA graph may hold its buffers.

use super::context::{alloc_error, GpuContext};
use super::ops;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::shape::TensorDesc;
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use std::sync::Arc;

/// Per-call scratch: block partials, per-channel semaphores and backward coefficients.
///
/// Grows to the largest shape seen and is then reused. The semaphores are zeroed when allocated
/// and every kernel leaves them zero, so no memset is needed between calls.
///
/// * **One stream.** The first call binds the workspace to its context's stream; a call on
///   another stream is [`Error::WorkspaceOnAnotherStream`] (two streams in flight at once would
///   share its semaphores and partials). Use one workspace per stream.
/// * **CUDA graphs.** A graph captured with the workspace reads its buffers at every replay, so
///   the workspace never grows during a capture, nor after one: such a call is
///   [`Error::WorkspaceCannotGrow`], before anything is queued. Size it first with
///   [`Workspace::reserve_for`] for the largest shape the graph (and later calls) will run, and
///   keep it alive as long as the graph, like every buffer the graph reads.
#[derive(Debug, Default)]
pub struct Workspace {
    tenancy: Tenancy,
    partials: Option<CudaSlice<f32>>,
    semaphores: Option<CudaSlice<u32>>,
    coef: Option<CudaSlice<f32>>,
}

/// The buffers of one call, each at least as long as asked.
pub(crate) struct Scratch<'a> {
    pub partials: &'a mut CudaSlice<f32>,
    pub semaphores: &'a mut CudaSlice<u32>,
    pub coef: &'a mut CudaSlice<f32>,
}

impl Workspace {
    /// An empty workspace; the first call allocates what it needs and binds it to its stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Device bytes currently held.
    pub fn bytes(&self) -> usize {
        self.partials.as_ref().map_or(0, |b| b.num_bytes())
            + self.semaphores.as_ref().map_or(0, |b| b.num_bytes())
            + self.coef.as_ref().map_or(0, |b| b.num_bytes())
    }

    /// Grows the workspace to what every batch-norm call on `desc` in `dtype` needs (training
    /// and eval forwards, backwards, the synchronized moments, and the single-pass forward when
    /// `gpu` has it on: [`GpuContext::with_single_pass_forward`]) and binds it to `gpu`'s
    /// stream: call it before capturing a CUDA graph, with the largest shape.
    ///
    /// Errors: those of a call's reserve ([`Error::WorkspaceOnAnotherStream`],
    /// [`Error::WorkspaceCannotGrow`], [`Error::OutOfMemory`]).
    pub fn reserve_for(&mut self, gpu: &GpuContext, desc: &TensorDesc, dtype: DType) -> Result<()> {
        let (partial_floats, semaphores) = ops::largest_scratch(gpu, desc, dtype)?;
        self.reserve(gpu, partial_floats, semaphores).map(drop)
    }

    /// The dx coefficients the latest training reduce wrote (`None` before any reserve).
    pub(crate) fn coef(&self) -> Option<&CudaSlice<f32>> {
        self.coef.as_ref()
    }

    pub(crate) fn reserve(
        &mut self,
        gpu: &GpuContext,
        partial_floats: usize,
        channels: usize,
    ) -> Result<Scratch<'_>> {
        let lens = [partial_floats, channels, 2 * channels];
        let held = [
            self.partials.as_ref().map_or(0, |b| b.len()),
            self.semaphores.as_ref().map_or(0, |b| b.len()),
            self.coef.as_ref().map_or(0, |b| b.len()),
        ];
        let grows = lens.iter().zip(held).any(|(&len, held)| len > held);
        // Every buffer holds 4-byte elements.
        let needed = lens
            .iter()
            .zip(held)
            .map(|(&len, held)| 4 * len.max(held))
            .sum();
        self.tenancy.admit(gpu, grows, self.bytes(), needed)?;
        let stream = gpu.stream();
        Ok(Scratch {
            partials: grow(&mut self.partials, stream, partial_floats)?,
            semaphores: grow(&mut self.semaphores, stream, channels)?,
            coef: grow(&mut self.coef, stream, 2 * channels)?,
        })
    }
}

/// The stream a workspace serves, and whether a CUDA graph captured it: what every workspace
/// (this one, [`super::norms::NormWorkspace`]) checks before a call uses or grows its buffers.
#[derive(Debug, Default)]
pub(crate) struct Tenancy {
    stream: Option<Arc<CudaStream>>,
    captured: bool,
}

impl Tenancy {
    /// Admits a call on `gpu`'s stream that needs the buffers to grow (`grows`) from `held` to
    /// `needed` bytes, or refuses it before anything is queued. The first admitted call binds
    /// the stream; a call made while the stream captures a graph marks the workspace captured.
    pub(crate) fn admit(
        &mut self,
        gpu: &GpuContext,
        grows: bool,
        held: usize,
        needed: usize,
    ) -> Result<()> {
        let stream = gpu.stream();
        if let Some(bound) = &self.stream {
            let same = bound.cu_stream() == stream.cu_stream()
                && bound.context().cu_ctx() == stream.context().cu_ctx();
            if !same {
                return Err(Error::WorkspaceOnAnotherStream);
            }
        }
        let capturing = gpu.is_capturing()?;
        if grows && (capturing || self.captured) {
            let reason = if capturing {
                "the stream is capturing a CUDA graph"
            } else {
                "a CUDA graph captured with it may still read its buffers"
            };
            return Err(Error::WorkspaceCannotGrow {
                held,
                needed,
                reason,
            });
        }
        self.captured |= capturing;
        self.stream.get_or_insert_with(|| stream.clone());
        Ok(())
    }
}

/// The buffer, replaced by a zeroed one of at least `len` elements when it is shorter.
pub(crate) fn grow<'a, T: DeviceRepr + ValidAsZeroBits>(
    buffer: &'a mut Option<CudaSlice<T>>,
    stream: &Arc<CudaStream>,
    len: usize,
) -> Result<&'a mut CudaSlice<T>> {
    let slot = match buffer.take() {
        Some(existing) if existing.len() >= len => existing,
        _ => {
            let len = len.max(1);
            stream
                .alloc_zeros(len)
                .map_err(alloc_error(len * std::mem::size_of::<T>()))?
        }
    };
    Ok(buffer.insert(slot))
}
