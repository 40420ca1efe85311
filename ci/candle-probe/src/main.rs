//! Builds batchnorm-cuda beside candle-core with its `cuda` feature: one cudarc for both, and a
//! `GpuContext` on candle's own stream. Checked by CI (`cargo check`), run on a GPU by hand.

use batchnorm_cuda::gpu::GpuContext;
use candle_core::{CudaDevice, backend::BackendDevice};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = CudaDevice::new(0)?;
    let ctx = GpuContext::from_stream(device.cuda_stream())?;
    println!("batchnorm-cuda on candle's stream: {}", ctx.device_name()?);
    Ok(())
}
