//! Helpers of the GPU tests: the device, host <-> device copies, seeded inputs.
#![allow(dead_code)] // each test binary uses its own subset

use super::{compare, tolerance, widen_f32, Quantity, Tol};
use batchnorm_cuda::gpu::GpuContext;
use batchnorm_cuda::{DType, Element, Layout, TensorDesc};
use cudarc::driver::CudaSlice;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The GPU the ignored tests run on. Fails loudly (these tests are only run with
/// `--include-ignored` on a GPU machine, where a missing device is a real failure).
pub fn gpu() -> GpuContext {
    GpuContext::new(0).unwrap_or_else(|e| panic!("GPU tests need a CUDA device: {e}"))
}

pub fn upload<T: Element>(gpu: &GpuContext, host: &[T]) -> CudaSlice<T> {
    gpu.stream().clone_htod(host).expect("host to device copy")
}

pub fn download<T: Element>(gpu: &GpuContext, device: &CudaSlice<T>) -> Vec<T> {
    gpu.stream()
        .clone_dtoh(device)
        .expect("device to host copy")
}

pub fn zeros<T: Element>(gpu: &GpuContext, len: usize) -> CudaSlice<T> {
    gpu.stream().alloc_zeros(len).expect("device allocation")
}

/// Seeded values `mean + spread * u`, `u` uniform in [-1, 1), rounded to `T`.
pub fn random<T: Element>(seed: u64, len: usize, mean: f64, spread: f64) -> Vec<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len)
        .map(|_| T::from_f64(mean + spread * rng.random_range(-1.0..1.0)))
        .collect()
}

/// Seeded f32 per-channel values in `[lo, hi)`.
pub fn random_f32(seed: u64, len: usize, lo: f32, hi: f32) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(lo..hi)).collect()
}

/// Inputs of a fused-epilogue case: x around 0.3 with spread 2 (about half the outputs are
/// negative), a residual of the same scale, dy, per-channel parameters and running statistics.
pub struct FusedInputs<T> {
    pub x: Vec<T>,
    pub z: Vec<T>,
    pub dy: Vec<T>,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub running_mean: Vec<f32>,
    pub running_var: Vec<f32>,
}

pub fn fused_inputs<T: Element>(desc: &TensorDesc, seed: u64) -> FusedInputs<T> {
    let (n, c) = (desc.numel(), desc.channels());
    FusedInputs {
        x: random(seed, n, 0.3, 2.0),
        z: random(seed + 1, n, 0.0, 1.5),
        dy: random(seed + 2, n, 0.0, 1.0),
        weight: random_f32(seed + 3, c, -1.5, 1.5),
        bias: random_f32(seed + 4, c, -0.5, 0.5),
        running_mean: random_f32(seed + 5, c, -0.2, 0.2),
        running_var: random_f32(seed + 6, c, 0.5, 2.0),
    }
}

/// Shapes that exercise every path: vector and scalar loads, tails, one and many splits,
/// both traversals, more channels than a block, odd sizes.
pub fn awkward_shapes() -> Vec<TensorDesc> {
    let dims: &[&[usize]] = &[
        &[2, 1],
        &[7, 3],
        &[33, 17],
        &[4, 1001],
        &[3, 5, 7],
        &[2, 3, 32],
        &[5, 4, 33],
        &[2, 16, 8, 8],
        &[3, 17, 5, 7],
        &[1, 2, 112, 112],
        &[8, 64, 1, 1],
        &[2, 3, 4, 5, 6],
        &[1, 4, 16, 16, 16],
        &[65, 8, 65],
    ];
    dims.iter()
        .flat_map(|d| {
            [Layout::ChannelsFirst, Layout::ChannelsLast].map(|l| TensorDesc::new(d, l).unwrap())
        })
        .collect()
}

/// How much of the elementwise tolerance `atol + rtol * |want|` the worst element uses (at most
/// 1 passes; infinite when an element fails outright, e.g. NaN against a number), by
/// [`compare`](super::compare).
pub fn worst_ratio(got: &[f64], want: &[f64], atol: f64, rtol: f64) -> f64 {
    ratio(got, want, Tol::Elementwise { atol, rtol })
}

/// [`worst_ratio`] for any [`Tol`].
pub fn ratio(got: &[f64], want: &[f64], tol: Tol) -> f64 {
    match compare(got, want, tol) {
        Ok(report) => report.worst_ratio,
        Err(message) => {
            eprintln!("{message}");
            f64::INFINITY
        }
    }
}

/// The GPU layer's running statistics and counter equal the CPU layer's (statistics within the
/// f32 tolerance of the golden cases).
#[track_caller]
pub fn assert_same_running_stats(
    gpu_layer: &batchnorm_cuda::gpu::BatchNorm,
    cpu_layer: &batchnorm_cuda::reference::BatchNorm,
) {
    let pairs = [
        (
            "running_mean",
            gpu_layer.running_mean().unwrap(),
            cpu_layer.running_mean(),
        ),
        (
            "running_var",
            gpu_layer.running_var().unwrap(),
            cpu_layer.running_var(),
        ),
    ];
    for (what, got, want) in pairs {
        let (got, want) = (got.unwrap_or_default(), want.unwrap_or_default().to_vec());
        let r = worst_ratio(
            &super::widen_f32(&got),
            &super::widen_f32(&want),
            1e-5,
            1e-5,
        );
        assert!(r <= 1.0, "{what}: {r:.2} of the tolerance");
    }
    assert_eq!(
        gpu_layer.num_batches_tracked(),
        cpu_layer.num_batches_tracked()
    );
}

/// The golden tolerance of activations (`y`, `dx`) of `dtype`, as its `(atol, rtol)`.
pub fn activation_bounds(dtype: DType) -> (f64, f64) {
    match tolerance(dtype, Quantity::Activation) {
        Tol::Elementwise { atol, rtol } => (atol, rtol),
        other => unreachable!("activations are compared elementwise, not {other:?}"),
    }
}

/// How much of the golden statistics tolerance (saved and running statistics, f32 whatever the
/// activations) `got` uses against `want`.
pub fn stat_ratio(got: &[f32], want: &[f32]) -> f64 {
    ratio(
        &widen_f32(got),
        &widen_f32(want),
        tolerance(DType::F32, Quantity::Statistic),
    )
}

/// How much of the golden parameter-gradient tolerance (`dweight`, `dbias`: relative to the
/// largest magnitude) `got` uses against `want`.
pub fn param_ratio(got: &[f32], want: &[f32]) -> f64 {
    ratio(
        &widen_f32(got),
        &widen_f32(want),
        tolerance(DType::F32, Quantity::ParamGrad),
    )
}
