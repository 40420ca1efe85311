//! Builds batchnorm-cuda beside candle-core with its `cuda` feature: one cudarc for both, a
//! `GpuContext` on candle's own stream, and the candle adapter (feature `candle-cuda`) on CUDA
//! tensors, forward and backward. Checked by CI (`cargo check`), run on a GPU by hand.

use batchnorm_cuda::candle::{BatchNorm, Dims};
use batchnorm_cuda::gpu::GpuContext;
use batchnorm_cuda::BatchNormConfig;
use candle_core::{backend::BackendDevice, CudaDevice, DType, Device, Tensor};
use candle_nn::{ModuleT, VarBuilder, VarMap};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = CudaDevice::new(0)?;
    let ctx = GpuContext::from_stream(device.cuda_stream())?;
    println!("batchnorm-cuda on candle's stream: {}", ctx.device_name()?);

    let device = Device::Cuda(device);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let bn = BatchNorm::new(Dims::Two, BatchNormConfig::new(64), vb)?;
    let x = Tensor::randn(0f32, 1.0, (8, 56, 56, 64), &device)?
        .to_dtype(DType::F16)?
        .permute((0, 3, 1, 2))?; // channels-last
    let y = bn.forward_t(&x, true)?;
    let grads = y.to_dtype(DType::F32)?.sqr()?.sum_all()?.backward()?;
    let dweight = grads.get(bn.weight().expect("affine")).expect("a gradient");
    println!(
        "adapter on CUDA: y {:?} {:?}, dweight[0] {}, num_batches_tracked {:?}",
        y.dims(),
        y.dtype(),
        dweight.get(0)?.to_scalar::<f32>()?,
        bn.num_batches_tracked()?
    );
    Ok(())
}
