//! The GPU context: driver checks, the CUDA context and stream, and the kernels, loaded once.

use super::kernels::Kernels;
use super::ptx::KERNELS_BUILT;
use crate::error::{Error, Result};
use cudarc::driver::{sys, CudaContext, CudaStream, DriverError};
use std::sync::Arc;

/// A CUDA device with every kernel of the crate loaded, and the stream calls are queued on.
///
/// Cheap to clone: clones share the context and the loaded kernels. [`GpuContext::with_stream`]
/// gives the same kernels on another stream of the same context.
#[derive(Clone, Debug)]
pub struct GpuContext {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Arc<Kernels>,
    sm_count: u32,
}

impl GpuContext {
    /// Opens device `ordinal` and loads every kernel, on the context's default stream.
    ///
    /// Errors, never panics: [`Error::KernelsNotBuilt`] when this build has no PTX,
    /// [`Error::NoDriver`] when libcuda cannot be loaded, [`Error::NoDevice`] when the driver
    /// has no such device.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !KERNELS_BUILT {
            return Err(Error::KernelsNotBuilt);
        }
        // cudarc panics on first use when libcuda is missing: ask first.
        // SAFETY: only tries to dlopen the library; no driver call is made.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::NoDriver);
        }
        cudarc::driver::result::init().map_err(no_device(ordinal))?;
        let count = CudaContext::device_count()
            .map_err(no_device(ordinal))?
            .max(0) as usize;
        if ordinal >= count {
            return Err(Error::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal)?;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            as u32;
        let kernels = Arc::new(Kernels::load(&ctx)?);
        let stream = ctx.default_stream();
        Ok(Self {
            ctx,
            stream,
            kernels,
            sm_count,
        })
    }

    /// The same device and kernels, queuing work on `stream` (which must belong to this context).
    pub fn with_stream(&self, stream: Arc<CudaStream>) -> Result<Self> {
        if !Arc::ptr_eq(stream.context(), &self.ctx) {
            return Err(Error::Unsupported {
                what: "GpuContext::with_stream",
                reason: "the stream belongs to another CUDA context".into(),
            });
        }
        Ok(Self {
            stream,
            ..self.clone()
        })
    }

    /// A new stream of this context, with the same kernels.
    pub fn fork_stream(&self) -> Result<Self> {
        Ok(Self {
            stream: self.ctx.new_stream()?,
            ..self.clone()
        })
    }

    /// The stream every call of this context is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The underlying cudarc context.
    pub fn cuda(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn device_name(&self) -> Result<String> {
        Ok(self.ctx.name()?)
    }

    /// Number of streaming multiprocessors, which launch sizes are derived from.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// Waits for everything queued on this context's stream.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    pub(crate) fn kernels(&self) -> &Kernels {
        &self.kernels
    }
}

fn no_device(ordinal: usize) -> impl Fn(DriverError) -> Error {
    move |e| match e.0 {
        sys::CUresult::CUDA_ERROR_NO_DEVICE => Error::NoDevice { ordinal, count: 0 },
        _ => Error::Driver(e),
    }
}

/// Maps an allocation failure to [`Error::OutOfMemory`] with the size that was asked for.
pub(crate) fn alloc_error(bytes: usize) -> impl Fn(DriverError) -> Error {
    move |e| match e.0 {
        sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => Error::OutOfMemory { bytes },
        _ => Error::Driver(e),
    }
}
