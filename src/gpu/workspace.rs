//! Scratch memory of the split reductions, reused across calls so that steady-state calls
//! neither allocate nor synchronize the host.

use super::context::{alloc_error, GpuContext};
use crate::error::Result;
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use std::sync::Arc;

/// Per-call scratch: block partials, per-channel semaphores and backward coefficients.
///
/// Grows to the largest shape seen and is then reused. The semaphores are zeroed when allocated
/// and every kernel leaves them zero, so no memset is needed between calls. One workspace must
/// not be shared by calls in flight on different streams at once; cudarc's event tracking orders
/// them when it is.
#[derive(Debug, Default)]
pub struct Workspace {
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
    /// An empty workspace; the first call allocates what it needs.
    pub fn new() -> Self {
        Self::default()
    }

    /// Device bytes currently held.
    pub fn bytes(&self) -> usize {
        self.partials.as_ref().map_or(0, |b| b.num_bytes())
            + self.semaphores.as_ref().map_or(0, |b| b.num_bytes())
            + self.coef.as_ref().map_or(0, |b| b.num_bytes())
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
        let stream = gpu.stream();
        Ok(Scratch {
            partials: grow(&mut self.partials, stream, partial_floats)?,
            semaphores: grow(&mut self.semaphores, stream, channels)?,
            coef: grow(&mut self.coef, stream, 2 * channels)?,
        })
    }
}

/// The buffer, replaced by a zeroed one of at least `len` elements when it is shorter.
fn grow<'a, T: DeviceRepr + ValidAsZeroBits>(
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
