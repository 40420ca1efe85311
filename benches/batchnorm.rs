//! Criterion benches: the CPU reference (always) and the GPU kernels (when a device is there).
//!
//! ```text
//! cargo bench --bench batchnorm                 # everything
//! cargo bench --bench batchnorm -- ref_         # CPU reference only
//! cargo bench --bench batchnorm -- --quick      # fewer samples
//! ```
//!
//! Names are `op/dtype/shape/layout` (`ref_fwd/...` for the reference, `bn_fwd/...` for the
//! GPU). Throughput counts the bytes each implementation actually moves, in passes over the
//! tensor: the reference's forward reads x three times (mean, variance, normalize) and writes y
//! (4), eval 2, backward 5 (x and dy for the sums, again for dx, dx written); our kernels'
//! forward 3, eval 2, backward 5.
//!
//! The GPU benches time back-to-back calls with CUDA events (the stream is synchronized inside
//! the timed region); their tensors are above an H100's 50 MB L2 so the calls do not run from
//! cache. They are for quick A/B checks; the reported numbers, with an L2 flush between runs,
//! the copy yardstick and the comparison with PyTorch, come from `examples/gpu_bench.rs`.

use batchnorm_cuda::gpu::functional::{
    self, Backward, BackwardStats, BatchStats, Epilogue, EpilogueGrad, Forward, ForwardStats,
    GradientsMut, RunningStats, RunningUpdate, SavedStats, SavedStatsMut,
};
use batchnorm_cuda::gpu::{GpuContext, Workspace};
use batchnorm_cuda::reference;
use batchnorm_cuda::{Element, Layout, RunningVarUpdate, TensorDesc};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use cudarc::driver::{sys, CudaSlice};
use std::hint::black_box;
use std::time::Duration;

const EPS: f32 = 1e-5;
const MOMENTUM: f32 = 0.1;

/// Deterministic inputs with shifted, scaled channels (never zeros, which can flatter timings).
fn input<T: Element>(desc: &TensorDesc, seed: u64) -> Vec<T> {
    let g = desc.geometry();
    (0..desc.numel())
        .map(|i| {
            let mut z = (i as u64 ^ seed.rotate_left(32)).wrapping_add(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE5_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            let u = ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64;
            let c = (i / g.inner) % g.channels;
            T::from_f64((c % 7) as f64 - 3.0 + 4.0 * (u - 0.5))
        })
        .collect()
}

fn per_channel(c: usize, f: impl Fn(usize) -> f64) -> Vec<f32> {
    (0..c).map(|c| f(c) as f32).collect()
}

fn bench_name(dtype: impl std::fmt::Display, desc: &TensorDesc) -> String {
    let dims: Vec<String> = desc.dims().iter().map(usize::to_string).collect();
    format!("{dtype}/{}/{}", dims.join("x"), desc.layout())
}

/// Bytes of `passes` full passes over the tensor.
fn bytes<T>(desc: &TensorDesc, passes: u64) -> Throughput {
    Throughput::Bytes(passes * (desc.numel() * std::mem::size_of::<T>()) as u64)
}

// ---------------------------------------------------------------------------------------------
// CPU reference

/// Small enough that the three ops on every shape finish in about a minute on two cores.
fn cpu_shapes() -> Vec<(TensorDesc, bool)> {
    let nchw = TensorDesc::nchw(16, 64, 28, 28).unwrap();
    // (descriptor, run in f16 as well as f32)
    vec![
        (nchw, true),
        (nchw.with_layout(Layout::ChannelsLast), false),
        (
            TensorDesc::new(&[512, 256], Layout::ChannelsFirst).unwrap(),
            false,
        ),
    ]
}

fn cpu_benches(c: &mut Criterion) {
    for (desc, with_f16) in cpu_shapes() {
        cpu_shape::<f32>(c, &desc);
        if with_f16 {
            cpu_shape::<half::f16>(c, &desc);
        }
    }
}

fn cpu_shape<T: Element>(c: &mut Criterion, desc: &TensorDesc) {
    let ch = desc.channels();
    let name = bench_name(T::DTYPE, desc);
    let x: Vec<T> = input(desc, 1);
    let dy: Vec<T> = input(desc, 2);
    let weight = per_channel(ch, |c| 0.5 + (c % 5) as f64 * 0.25);
    let bias = per_channel(ch, |c| (c % 3) as f64 - 1.0);
    let (mut rm, mut rv) = (vec![0.0f32; ch], vec![1.0f32; ch]);
    let mut y = vec![T::default(); desc.numel()];
    let mut dx = vec![T::default(); desc.numel()];
    let (mut dw, mut db) = (vec![0.0f32; ch], vec![0.0f32; ch]);

    let mut group = c.benchmark_group("ref_fwd");
    group
        .sampling_mode(SamplingMode::Flat)
        .throughput(bytes::<T>(desc, 4));
    group.bench_function(&name, |b| {
        b.iter(|| {
            let running = reference::RunningUpdate::pytorch(&mut rm, &mut rv, MOMENTUM);
            reference::forward_training(
                &x,
                desc,
                Some(&weight),
                Some(&bias),
                Some(running),
                EPS,
                &mut y,
            )
            .unwrap()
        })
    });
    group.finish();

    let mut group = c.benchmark_group("ref_eval");
    group
        .sampling_mode(SamplingMode::Flat)
        .throughput(bytes::<T>(desc, 2));
    group.bench_function(&name, |b| {
        b.iter(|| {
            let running = reference::RunningStats {
                mean: &rm,
                var: &rv,
            };
            reference::forward_inference(&x, desc, Some(&weight), Some(&bias), running, EPS, &mut y)
                .unwrap()
        })
    });
    group.finish();

    let saved =
        reference::forward_training(&x, desc, Some(&weight), Some(&bias), None, EPS, &mut y)
            .unwrap();
    let mut group = c.benchmark_group("ref_bwd");
    group
        .sampling_mode(SamplingMode::Flat)
        .throughput(bytes::<T>(desc, 5));
    group.bench_function(&name, |b| {
        b.iter(|| {
            let grads = reference::Gradients {
                dx: Some(&mut dx),
                dweight: Some(&mut dw),
                dbias: Some(&mut db),
                accumulate: false,
            };
            reference::backward_training(&x, &dy, desc, Some(&weight), &saved, grads).unwrap()
        })
    });
    group.finish();
    black_box((&y, &dx, &dw, &db));
}

// ---------------------------------------------------------------------------------------------
// GPU kernels

/// Each tensor above an H100's 50 MB L2.
fn gpu_shapes() -> Vec<(TensorDesc, bool)> {
    let nchw = TensorDesc::nchw(64, 256, 56, 56).unwrap();
    // (descriptor, f32 instead of f16)
    vec![
        (nchw, false),
        (nchw.with_layout(Layout::ChannelsLast), false),
        (TensorDesc::nchw(256, 16, 112, 112).unwrap(), false),
        (
            TensorDesc::new(&[16384, 1024], Layout::ChannelsFirst).unwrap(),
            true,
        ),
    ]
}

fn gpu_benches(c: &mut Criterion) {
    let gpu = match GpuContext::new(0) {
        Ok(gpu) => gpu,
        Err(e) => {
            println!("GPU benchmarks skipped: {e}");
            return;
        }
    };
    for (desc, f32) in gpu_shapes() {
        let result = if f32 {
            gpu_shape::<f32>(c, &gpu, &desc)
        } else {
            gpu_shape::<half::f16>(c, &gpu, &desc)
        };
        if let Err(e) = result {
            println!("GPU benchmark {} skipped: {e}", bench_name("-", &desc));
        }
    }
}

/// Device buffers of one shape.
struct Buffers<T> {
    x: CudaSlice<T>,
    dy: CudaSlice<T>,
    y: CudaSlice<T>,
    dx: CudaSlice<T>,
    weight: CudaSlice<f32>,
    bias: CudaSlice<f32>,
    running_mean: CudaSlice<f32>,
    running_var: CudaSlice<f32>,
    save_mean: CudaSlice<f32>,
    save_mean_lo: CudaSlice<f32>,
    save_invstd: CudaSlice<f32>,
    dweight: CudaSlice<f32>,
    dbias: CudaSlice<f32>,
}

impl<T: Element> Buffers<T> {
    fn new(gpu: &GpuContext, desc: &TensorDesc) -> batchnorm_cuda::Result<Self> {
        let (s, ch, n) = (gpu.stream(), desc.channels(), desc.numel());
        Ok(Self {
            x: s.clone_htod(&input::<T>(desc, 1))?,
            dy: s.clone_htod(&input::<T>(desc, 2))?,
            y: s.alloc_zeros(n)?,
            dx: s.alloc_zeros(n)?,
            weight: s.clone_htod(&per_channel(ch, |c| 0.5 + (c % 5) as f64 * 0.25))?,
            bias: s.clone_htod(&per_channel(ch, |c| (c % 3) as f64 - 1.0))?,
            running_mean: s.alloc_zeros(ch)?,
            running_var: s.clone_htod(&vec![1.0f32; ch])?,
            save_mean: s.alloc_zeros(ch)?,
            save_mean_lo: s.alloc_zeros(ch)?,
            save_invstd: s.alloc_zeros(ch)?,
            dweight: s.alloc_zeros(ch)?,
            dbias: s.alloc_zeros(ch)?,
        })
    }

    fn forward(
        &mut self,
        gpu: &GpuContext,
        ws: &mut Workspace,
        desc: &TensorDesc,
    ) -> batchnorm_cuda::Result<()> {
        let running = RunningUpdate {
            mean: self.running_mean.as_view_mut(),
            var: self.running_var.as_view_mut(),
            factor: MOMENTUM,
            var_update: RunningVarUpdate::Unbiased,
        };
        let saved = SavedStatsMut {
            mean: self.save_mean.as_view_mut(),
            mean_lo: self.save_mean_lo.as_view_mut(),
            invstd: self.save_invstd.as_view_mut(),
        };
        let request = Forward {
            desc: *desc,
            x: self.x.as_view(),
            weight: Some(self.weight.as_view()),
            bias: Some(self.bias.as_view()),
            stats: ForwardStats::Batch(BatchStats {
                saved,
                running: Some(running),
                eps: EPS,
            }),
            y: self.y.as_view_mut(),
            epilogue: Epilogue::None,
        };
        functional::forward(gpu, ws, request)
    }

    fn eval(
        &mut self,
        gpu: &GpuContext,
        ws: &mut Workspace,
        desc: &TensorDesc,
    ) -> batchnorm_cuda::Result<()> {
        let running = RunningStats {
            mean: self.running_mean.as_view(),
            var: self.running_var.as_view(),
        };
        let request = Forward {
            desc: *desc,
            x: self.x.as_view(),
            weight: Some(self.weight.as_view()),
            bias: Some(self.bias.as_view()),
            stats: ForwardStats::Running {
                stats: running,
                eps: EPS,
            },
            y: self.y.as_view_mut(),
            epilogue: Epilogue::None,
        };
        functional::forward(gpu, ws, request)
    }

    fn backward(
        &mut self,
        gpu: &GpuContext,
        ws: &mut Workspace,
        desc: &TensorDesc,
    ) -> batchnorm_cuda::Result<()> {
        let saved = SavedStats {
            mean: self.save_mean.as_view(),
            mean_lo: Some(self.save_mean_lo.as_view()),
            invstd: self.save_invstd.as_view(),
        };
        let grads = GradientsMut {
            dx: Some(self.dx.as_view_mut()),
            dweight: Some(self.dweight.as_view_mut()),
            dbias: Some(self.dbias.as_view_mut()),
            accumulate: false,
        };
        let request = Backward {
            desc: *desc,
            x: self.x.as_view(),
            dy: self.dy.as_view(),
            weight: Some(self.weight.as_view()),
            stats: BackwardStats::Batch(saved),
            grads,
            epilogue: EpilogueGrad::None,
        };
        functional::backward(gpu, ws, request)
    }
}

/// GPU time of `iters` back-to-back calls, from CUDA events; the stream is synchronized before
/// the events are read, inside the measured region. A call that failed once before the bench
/// started cannot fail here except by a device fault, which is worth a panic.
fn time_gpu(
    gpu: &GpuContext,
    iters: u64,
    mut op: impl FnMut() -> batchnorm_cuda::Result<()>,
) -> Duration {
    let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let stream = gpu.stream();
    let start = stream.record_event(timing).expect("record a CUDA event");
    for _ in 0..iters {
        op().expect("batch-norm launch");
    }
    let end = stream.record_event(timing).expect("record a CUDA event");
    stream.synchronize().expect("synchronize the stream");
    let ms = start.elapsed_ms(&end).expect("read CUDA event times");
    Duration::from_secs_f64(f64::from(ms) * 1e-3)
}

fn gpu_shape<T: Element>(
    c: &mut Criterion,
    gpu: &GpuContext,
    desc: &TensorDesc,
) -> batchnorm_cuda::Result<()> {
    let name = bench_name(T::DTYPE, desc);
    let mut ws = Workspace::new();
    let mut buf = Buffers::<T>::new(gpu, desc)?;
    // One call of each outside the timing: errors surface here, and the workspace is grown.
    buf.forward(gpu, &mut ws, desc)?;
    buf.eval(gpu, &mut ws, desc)?;
    buf.backward(gpu, &mut ws, desc)?;
    gpu.synchronize()?;

    let mut group = c.benchmark_group("bn_fwd");
    group.throughput(bytes::<T>(desc, 3));
    group.bench_function(&name, |b| {
        b.iter_custom(|iters| time_gpu(gpu, iters, || buf.forward(gpu, &mut ws, desc)))
    });
    group.finish();

    let mut group = c.benchmark_group("bn_eval");
    group.throughput(bytes::<T>(desc, 2));
    group.bench_function(&name, |b| {
        b.iter_custom(|iters| time_gpu(gpu, iters, || buf.eval(gpu, &mut ws, desc)))
    });
    group.finish();

    let mut group = c.benchmark_group("bn_bwd");
    group.throughput(bytes::<T>(desc, 5));
    group.bench_function(&name, |b| {
        b.iter_custom(|iters| time_gpu(gpu, iters, || buf.backward(gpu, &mut ws, desc)))
    });
    group.finish();
    Ok(())
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
}

criterion_group! {
    name = benches;
    config = config();
    targets = cpu_benches, gpu_benches
}
criterion_main!(benches);
