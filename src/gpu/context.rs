//! The GPU context: driver checks, the CUDA context and stream, and the kernels, loaded once per
//! CUDA context.

use super::kernels::Kernels;
use super::ops;
use super::ptx::{KERNELS_BUILT, MIN_DRIVER_VERSION};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::shape::TensorDesc;
use cudarc::driver::{sys, CudaContext, CudaStream, DriverError};
use std::sync::{Arc, Mutex, PoisonError, Weak};

/// A CUDA device with every kernel of the crate loaded, and the stream calls are queued on.
///
/// Cheap to clone: clones share the context and the loaded kernels. [`GpuContext::from_stream`]
/// wraps a stream made elsewhere (candle's, or the caller's); [`GpuContext::with_stream`] gives
/// the same kernels on another stream of the same context.
#[derive(Clone, Debug)]
pub struct GpuContext {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Arc<Kernels>,
    sm_count: u32,
    single_pass_forward: bool,
}

impl GpuContext {
    /// Opens device `ordinal` (its primary context, which candle and the CUDA runtime share) and
    /// loads every kernel, on the context's default stream.
    ///
    /// Errors, never panics: [`Error::KernelsNotBuilt`] when this build has no PTX,
    /// [`Error::NoDriver`] when libcuda cannot be loaded, [`Error::DriverTooOld`] when the driver
    /// cannot load the kernels' PTX, [`Error::NoDevice`] when the driver has no such device.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !KERNELS_BUILT {
            return Err(Error::KernelsNotBuilt);
        }
        // Without libcuda, cudarc panics on first use (dynamic loading): ask first.
        if !loadable(LIBCUDA) {
            return Err(Error::NoDriver);
        }
        check_driver_version()?;
        cudarc::driver::result::init().map_err(no_device(ordinal))?;
        let count = CudaContext::device_count()
            .map_err(no_device(ordinal))?
            .max(0) as usize;
        if ordinal >= count {
            return Err(Error::NoDevice { ordinal, count });
        }
        Self::on_stream(CudaContext::new(ordinal)?.default_stream())
    }

    /// Queues work on an existing `stream` of any context: candle's
    /// (`candle_core::CudaDevice::cuda_stream()`), or one the caller made with
    /// [`cudarc`](crate::cudarc). The kernels are loaded once per CUDA context: every
    /// `GpuContext` on the same context shares them.
    ///
    /// Errors: [`Error::KernelsNotBuilt`], [`Error::DriverTooOld`], or the driver's error.
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Self> {
        if !KERNELS_BUILT {
            return Err(Error::KernelsNotBuilt);
        }
        check_driver_version()?;
        Self::on_stream(stream)
    }

    fn on_stream(stream: Arc<CudaStream>) -> Result<Self> {
        let ctx = stream.context().clone();
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            as u32;
        let kernels = kernels_of(&ctx)?;
        Ok(Self {
            ctx,
            stream,
            kernels,
            sm_count,
            single_pass_forward: false,
        })
    }

    /// The same device and kernels, queuing work on `stream`, which must belong to this CUDA
    /// context (through any cudarc handle of it); [`GpuContext::from_stream`] takes any stream.
    pub fn with_stream(&self, stream: Arc<CudaStream>) -> Result<Self> {
        if stream.context().cu_ctx() != self.ctx.cu_ctx() {
            return Err(Error::Unsupported {
                what: "GpuContext::with_stream",
                reason:
                    "the stream belongs to another CUDA context (GpuContext::from_stream takes it)"
                        .into(),
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

    /// The same context, with the single-pass training forward on (`true`) or off (`false`, the
    /// default).
    ///
    /// When on, a training forward without an epilogue over a channels-last or `(N, C)`
    /// tensor that fits in the SMs' shared memory together reads `x` once instead of twice: one
    /// cooperative launch keeps it on chip while it reduces the statistics, then normalizes it
    /// (`kernels/bn_onchip.cu`). Its results are those of the two-pass path bit for bit when
    /// both split the rows alike, and within the same tolerances otherwise. Off by default
    /// because it has not been timed on a GPU yet (`bench/PLAN.md`). Every other call, and a
    /// tensor that does not fit, takes the two-pass path; so does a grid the device refuses to
    /// run at once (`CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE`, or no cooperative launches). A
    /// workspace sized with [`super::Workspace::reserve_for`] through this context covers both
    /// paths.
    pub fn with_single_pass_forward(&self, on: bool) -> Self {
        Self {
            single_pass_forward: on,
            ..self.clone()
        }
    }

    /// Whether the single-pass training forward is on ([`GpuContext::with_single_pass_forward`]).
    pub fn single_pass_forward(&self) -> bool {
        self.single_pass_forward
    }

    /// Whether a training forward of `desc` in `dtype` without an epilogue takes the single
    /// pass on this context: it is on, the tensor is channels-last or `(N, C)`, and it fits on
    /// chip with every block resident (asked of the driver's occupancy; the launch may still
    /// be refused, and then the two passes run).
    pub fn single_pass_forward_fits(&self, desc: &TensorDesc, dtype: DType) -> Result<bool> {
        Ok(desc.numel() > 0 && ops::on_chip_shape(self, desc, dtype)?.is_some())
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

    /// Whether the stream is capturing a CUDA graph (`cuStreamIsCapturing`; an invalidated
    /// capture counts): work queued now is recorded into the graph, not run, and replays later.
    pub fn is_capturing(&self) -> Result<bool> {
        let status = self.stream.capture_status()?;
        Ok(status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
    }

    /// Waits for everything queued on this context's stream.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    pub(crate) fn kernels(&self) -> &Kernels {
        &self.kernels
    }
}

/// The names libcuda is loaded under (cudarc tries these among others).
const LIBCUDA: &[&str] = if cfg!(windows) {
    &["nvcuda.dll"]
} else {
    &["libcuda.so.1", "libcuda.so"]
};

/// Whether one of `names` can be loaded: asked before the first call into a library that cudarc
/// loads on first use, where a missing one is a panic. The handle is dropped again.
pub(crate) fn loadable(names: &[&str]) -> bool {
    names.iter().any(|name| {
        // SAFETY: runs the library's initializers only; nothing of it is called.
        unsafe { libloading::Library::new(*name) }.is_ok()
    })
}

/// The driver can load the embedded PTX: its CUDA version is at least the one that introduced
/// the PTX's ISA (an older one fails every module load with an opaque error).
fn check_driver_version() -> Result<()> {
    let mut driver = 0;
    // SAFETY: writes one int; libcuda is loaded (checked, or a stream of it exists). No cuInit
    // is needed.
    unsafe { sys::cuDriverGetVersion(&mut driver) }.result()?;
    if driver < MIN_DRIVER_VERSION {
        return Err(Error::DriverTooOld {
            driver,
            needed: MIN_DRIVER_VERSION,
        });
    }
    Ok(())
}

/// The kernels of each live CUDA context, by its handle. Weak: they unload when the last
/// `GpuContext` on that context drops. While one is alive, its modules keep the context alive,
/// so the handle cannot name another context.
static LOADED: Mutex<Vec<(usize, Weak<Kernels>)>> = Mutex::new(Vec::new());

/// The kernels loaded into `ctx`, loading them on first use. The lock is held while loading, so
/// two threads on one context load (and JIT-compile) once.
fn kernels_of(ctx: &Arc<CudaContext>) -> Result<Arc<Kernels>> {
    let key = ctx.cu_ctx() as usize;
    let mut loaded = LOADED.lock().unwrap_or_else(PoisonError::into_inner);
    loaded.retain(|(_, kernels)| kernels.strong_count() > 0);
    if let Some(kernels) = loaded
        .iter()
        .find(|(handle, _)| *handle == key)
        .and_then(|(_, kernels)| kernels.upgrade())
    {
        return Ok(kernels);
    }
    let kernels = Arc::new(Kernels::load(ctx)?);
    loaded.push((key, Arc::downgrade(&kernels)));
    Ok(kernels)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::ptx::{KERNEL_ORIGIN, MODULES, PTX_ISA};

    /// The shipped kernels load on every CUDA 12.x and 13.x driver: PTX ISA 8.0, which CUDA 12.0
    /// introduced (NVIDIA's PTX ISA release history), in every module.
    #[test]
    fn prebuilt_kernels_need_cuda_12_0() {
        assert!(!MODULES.is_empty(), "no kernels embedded ({KERNEL_ORIGIN})");
        for module in MODULES {
            let isa = module
                .ptx
                .lines()
                .find_map(|l| l.strip_prefix(".version ")?.trim().split_once('.'))
                .and_then(|(major, minor)| Some((major.parse().ok()?, minor.parse().ok()?)));
            assert!(
                isa.is_some_and(|isa: (u32, u32)| isa <= PTX_ISA),
                "{}: PTX ISA {isa:?}, newer than PTX_ISA {PTX_ISA:?} or unreadable",
                module.name
            );
        }
        if KERNEL_ORIGIN.starts_with("prebuilt") {
            assert_eq!(PTX_ISA, (8, 0), "{KERNEL_ORIGIN}");
            assert_eq!(MIN_DRIVER_VERSION, 12000, "{KERNEL_ORIGIN}");
        } else {
            println!(
                "kernels {KERNEL_ORIGIN}: PTX ISA {PTX_ISA:?}, driver >= {MIN_DRIVER_VERSION}"
            );
        }
    }

    #[test]
    fn driver_too_old_names_both_versions() {
        let message = Error::DriverTooOld {
            driver: 11080,
            needed: 12040,
        }
        .to_string();
        assert!(
            message.contains("CUDA 11.8") && message.contains("CUDA 12.4"),
            "{message}"
        );
    }

    /// Every `GpuContext` on one CUDA context shares one set of kernels, whichever cudarc handle
    /// of the context its stream comes through (candle's `CudaContext` is another handle of the
    /// same primary context); they are loaded again once all are gone.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn kernels_are_loaded_once_per_cuda_context() -> Result<()> {
        let first = GpuContext::new(0)?;
        let other_handle = CudaContext::new(0)?;
        assert_eq!(
            other_handle.cu_ctx(),
            first.cuda().cu_ctx(),
            "primary context"
        );
        let wrapped = GpuContext::from_stream(other_handle.new_stream()?)?;
        assert!(Arc::ptr_eq(&first.kernels, &wrapped.kernels));
        let moved = first.with_stream(other_handle.new_stream()?)?;
        assert!(Arc::ptr_eq(&first.kernels, &moved.kernels));
        let weak = Arc::downgrade(&first.kernels);
        drop((first, wrapped, moved));
        assert!(
            weak.upgrade().is_none(),
            "kernels outlived every GpuContext"
        );
        let again = GpuContext::from_stream(other_handle.default_stream())?;
        again.synchronize()
    }
}
