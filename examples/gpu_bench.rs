//! The one-run GPU benchmark: our kernels over the shape suite, against the device-to-device copy
//! bandwidth, each row checked against the CPU reference. Writes `ours.json` and `ours.md` into
//! `--out DIR`; `bench/pytorch_bench.py` times PyTorch on the same rows and merges the two.
//!
//! ```text
//! cargo run --release --example gpu_bench -- --out DIR [--quick] [--filter TEXT]
//! cargo run --release --example gpu_bench -- --out DIR --dry-run   # no GPU: list the suite
//! cargo test --example gpu_bench                                   # host-side logic, no GPU
//! ```
//!
//! Without a GPU it exits with status 3 and a one-line reason; a row that errors or fails its
//! check makes it exit with status 1 after writing both files.
//!
//! Method (the PyTorch side does the same):
//! - Time: CUDA events around each call, after `WARMUP` untimed calls; between runs a 256 MiB
//!   buffer is overwritten (five times the H100's 50 MB L2), so every run starts with a cold L2
//!   and no input is served from cache; the median of `MIN_RUNS..=MAX_RUNS` runs (as many as fit
//!   in `TARGET_MS` per op) is reported, with the minimum and the 90th percentile.
//! - Yardstick: a 1 GiB device-to-device copy, bytes read + bytes written, median of 30.
//! - Bandwidth: bytes over the median time, under two models of the traffic, in passes over the
//!   activation tensor: minimal (forward 2, eval 2, backward 3: each input read once, each output
//!   written once) and practical, what our kernels move (forward 3, eval 2, backward 5). A small
//!   tensor can stay in L2 between the passes of one call, so its practical figure can exceed
//!   the copy bandwidth: that is the cache, not HBM.
//! - Check: before the timed runs each op runs once on outputs poisoned with NaN; every element
//!   of every output must then be finite (all were written), and the outputs are compared with
//!   the CPU reference (f64, rounded once). The reference sees the whole tensor when it has at
//!   most 2^22 elements or at most 8 channels; otherwise 8 channels spread over C (first and last
//!   included), gathered into a smaller tensor of the same layout: channels are independent, so
//!   the reference on that subset gives exactly those channels' results. `rel_err` is the
//!   largest `|out - ref|_2 / |ref|_2` over the op's outputs (y or dx, and the per-channel
//!   statistics or gradients), `max_abs_err` the largest difference in y or dx; `ok` when every
//!   element was written and `rel_err` is within a few roundings of the dtype (`tolerance`).

use batchnorm_cuda::fold::{FoldKind, FoldSpec};
use batchnorm_cuda::gpu::functional::{
    self, FoldBatchNorm, GradientsMut, RunningStats, RunningUpdate, SavedStats, SavedStatsMut,
};
use batchnorm_cuda::gpu::{GpuContext, Workspace};
use batchnorm_cuda::{reference, DType, Element, Layout, RunningVarUpdate, TensorDesc};
use cudarc::driver::{sys, CudaEvent, CudaSlice, CudaStream, DevicePtrMut};
use rayon::prelude::*;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

// The rows of group, layer, instance and RMS norm.
#[path = "gpu_bench/norms.rs"]
mod norms;

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Written between timed runs: several times any L2 (H100: 50 MB).
const FLUSH_BYTES: usize = 256 << 20;
/// Each buffer of the copy yardstick: far above L2.
const COPY_BYTES: usize = 1 << 30;
const COPY_RUNS: usize = 30;
const WARMUP: usize = 3;
const MIN_RUNS: usize = 20;
const MAX_RUNS: usize = 200;
/// GPU time spent on the measured runs of one op, which sets their number.
const TARGET_MS: f64 = 30.0;
const EPS: f32 = 1e-5;
const MOMENTUM: f32 = 0.1;
/// Tensors up to this many elements are checked on every channel.
const FULL_CHECK_NUMEL: usize = 1 << 22;
/// Channels checked on larger tensors.
const SAMPLED_CHANNELS: usize = 8;

/// Largest accepted `rel_err`: a few units of rounding of the output dtype (f32: the GPU
/// accumulates in f32 where the reference uses f64).
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 2e-3,
        DType::BF16 => 1.6e-2,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Fwd,
    Eval,
    Bwd,
    Fold,
    /// A training forward (batch statistics) or backward of another normalization.
    Norm {
        kind: batchnorm_cuda::norms::NormKind,
        backward: bool,
    },
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Fwd => "bn_fwd",
            Op::Eval => "bn_eval",
            Op::Bwd => "bn_bwd",
            Op::Fold => "bn_fold",
            Op::Norm { kind, backward } => {
                let [fwd, bwd] = norms::op_names(kind);
                if backward {
                    bwd
                } else {
                    fwd
                }
            }
        }
    }

    /// Passes over the tensor (the activation, or the fold's weight): (minimal, practical).
    fn passes(self) -> (u64, u64) {
        match self {
            Op::Fwd => (2, 3),
            Op::Eval | Op::Fold => (2, 2),
            Op::Bwd => (3, 5),
            // Forward: x read twice (statistics, then normalize from L1/L2 or HBM).
            Op::Norm {
                backward: false, ..
            } => (2, 3),
            // Backward: row sums (x, dy), dx (x, dy, dx), parameter sums (x, dy).
            Op::Norm { backward: true, .. } => (3, 7),
        }
    }
}

/// One batch-norm shape of the suite; rank-2 shapes run in one layout only (both are the same).
struct BnCase {
    suite: &'static str,
    dims: Vec<usize>,
}

/// One folded layer: the weight of a ResNet-50 convolution, a transposed conv or a linear layer.
struct FoldCase {
    kind: FoldKind,
    shape: &'static [usize],
    groups: usize,
}

/// The distinct (C, H, W) of ResNet-50's batch norms (torchvision v1.5: the stride sits on the
/// 3x3 conv, so each stage's first block also normalizes C/4... at the previous resolution).
const RESNET50_CHW: [[usize; 3]; 12] = [
    [64, 112, 112],
    [64, 56, 56],
    [256, 56, 56],
    [128, 56, 56],
    [128, 28, 28],
    [512, 28, 28],
    [256, 28, 28],
    [256, 14, 14],
    [1024, 14, 14],
    [512, 14, 14],
    [512, 7, 7],
    [2048, 7, 7],
];

fn bn_suite(quick: bool) -> Vec<BnCase> {
    let case = |suite, dims: &[usize]| BnCase {
        suite,
        dims: dims.to_vec(),
    };
    if quick {
        return vec![
            case("resnet50", &[32, 256, 56, 56]),
            case("resnet50", &[32, 2048, 7, 7]),
            case("small_c", &[256, 4, 112, 112]),
            case("bn1d", &[4096, 1024]),
        ];
    }
    let mut cases = Vec::new();
    for n in [32, 128] {
        for [c, h, w] in RESNET50_CHW {
            cases.push(case("resnet50", &[n, c, h, w]));
        }
    }
    // Few channels with many values each: where one block per channel leaves SMs idle.
    for dims in [
        &[256, 2, 112, 112][..],
        &[256, 4, 112, 112],
        &[256, 16, 112, 112],
        &[32, 4, 64, 64, 64],
        &[8, 32, 64, 64, 64],
    ] {
        cases.push(case("small_c", dims));
    }
    cases.push(case("wide", &[256, 2048, 7, 7]));
    cases.push(case("bn1d", &[4096, 1024]));
    cases
}

fn fold_suite(quick: bool) -> Vec<FoldCase> {
    let conv = |shape| FoldCase {
        kind: FoldKind::Conv,
        shape,
        groups: 1,
    };
    let mut cases = vec![
        conv(&[64, 3, 7, 7]),
        conv(&[256, 64, 1, 1]),
        conv(&[512, 512, 3, 3]),
    ];
    if !quick {
        cases.push(conv(&[2048, 1024, 1, 1]));
        cases.push(FoldCase {
            kind: FoldKind::Conv,
            shape: &[512, 1, 3, 3],
            groups: 512,
        });
        cases.push(FoldCase {
            kind: FoldKind::ConvTranspose,
            shape: &[512, 256, 4, 4],
            groups: 1,
        });
        cases.push(FoldCase {
            kind: FoldKind::Linear,
            shape: &[1000, 2048],
            groups: 1,
        });
    }
    cases
}

fn dims_name(dims: &[usize]) -> String {
    dims.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join("x")
}

fn kind_name(kind: FoldKind) -> &'static str {
    match kind {
        FoldKind::Conv => "conv",
        FoldKind::ConvTranspose => "conv_transpose",
        FoldKind::Linear => "linear",
    }
}

// ---------------------------------------------------------------------------------------------
// Timing

#[derive(Clone, Copy, Debug)]
struct Timing {
    median_us: f64,
    min_us: f64,
    p90_us: f64,
    runs: usize,
}

impl Timing {
    fn from_ms(mut ms: Vec<f64>) -> Self {
        ms.sort_by(f64::total_cmp);
        let n = ms.len();
        let median = if n % 2 == 1 {
            ms[n / 2]
        } else {
            0.5 * (ms[n / 2 - 1] + ms[n / 2])
        };
        let p90 = ms[((n as f64 * 0.9).ceil() as usize).clamp(1, n) - 1];
        Self {
            median_us: median * 1e3,
            min_us: ms[0] * 1e3,
            p90_us: p90 * 1e3,
            runs: n,
        }
    }
}

/// CUDA-event timing with an L2 flush before every run.
struct Timer {
    stream: Arc<CudaStream>,
    flush: CudaSlice<u8>,
    flush_ms: f64,
    events: Vec<(CudaEvent, CudaEvent)>,
}

impl Timer {
    fn new(gpu: &GpuContext) -> BoxResult<Self> {
        let stream = gpu.stream().clone();
        let flush = stream.alloc_zeros::<u8>(FLUSH_BYTES)?;
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let events = (0..MAX_RUNS)
            .map(|_| Ok((gpu.cuda().new_event(timing)?, gpu.cuda().new_event(timing)?)))
            .collect::<BoxResult<Vec<_>>>()?;
        let mut timer = Self {
            stream,
            flush,
            flush_ms: 0.0,
            events,
        };
        // The flush's own time sizes the loop; it is never inside a timed region.
        let Timer {
            stream,
            flush,
            events,
            ..
        } = &mut timer;
        let (start, end) = &events[0];
        stream.memset_zeros(flush)?;
        start.record(stream)?;
        stream.memset_zeros(flush)?;
        end.record(stream)?;
        timer.flush_ms = f64::from(start.elapsed_ms(end)?);
        Ok(timer)
    }

    /// Median (and spread) of `op` over cold-L2 runs.
    fn time(&mut self, mut op: impl FnMut() -> BoxResult<()>) -> BoxResult<Timing> {
        let Timer {
            stream,
            flush,
            flush_ms,
            events,
        } = self;
        let (start, end) = &events[0];
        stream.memset_zeros(flush)?;
        start.record(stream)?;
        for _ in 0..WARMUP {
            op()?;
        }
        end.record(stream)?;
        let estimate_ms = f64::from(start.elapsed_ms(end)?) / WARMUP as f64;
        let runs = ((TARGET_MS / (estimate_ms + *flush_ms)) as usize).clamp(MIN_RUNS, MAX_RUNS);
        for (start, end) in &events[..runs] {
            stream.memset_zeros(flush)?;
            start.record(stream)?;
            op()?;
            end.record(stream)?;
        }
        stream.synchronize()?;
        let ms = events[..runs]
            .iter()
            .map(|(s, e)| Ok(f64::from(s.elapsed_ms(e)?)))
            .collect::<BoxResult<Vec<_>>>()?;
        Ok(Timing::from_ms(ms))
    }
}

/// Device-to-device copy bandwidth in GB/s (bytes read + bytes written), median of runs.
fn copy_bandwidth(gpu: &GpuContext) -> BoxResult<(f64, Timing)> {
    let stream = gpu.stream();
    let src = stream.alloc_zeros::<u8>(COPY_BYTES)?;
    let mut dst = stream.alloc_zeros::<u8>(COPY_BYTES)?;
    let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let (start, end) = (gpu.cuda().new_event(timing)?, gpu.cuda().new_event(timing)?);
    for _ in 0..WARMUP {
        stream.memcpy_dtod(&src, &mut dst)?;
    }
    let mut ms = Vec::with_capacity(COPY_RUNS);
    for _ in 0..COPY_RUNS {
        start.record(stream)?;
        stream.memcpy_dtod(&src, &mut dst)?;
        end.record(stream)?;
        ms.push(f64::from(start.elapsed_ms(&end)?));
    }
    let t = Timing::from_ms(ms);
    Ok((2.0 * COPY_BYTES as f64 / (t.median_us * 1e-6) / 1e9, t))
}

/// Fills `buffer` with 0xFF bytes: NaN in f32, f16 and bf16, so an unwritten output shows.
fn poison<T>(stream: &Arc<CudaStream>, buffer: &mut CudaSlice<T>) -> BoxResult<()> {
    let bytes = buffer.num_bytes();
    let (ptr, _record) = buffer.device_ptr_mut(stream);
    // SAFETY: `ptr` and `bytes` describe the live allocation `buffer`, borrowed mutably for this
    // call; the memset is queued on the stream every use of `buffer` is queued on.
    unsafe { cudarc::driver::result::memset_d8_async(ptr, 0xFF, bytes, stream.cu_stream()) }?;
    Ok(())
}

fn download<T: Element>(stream: &Arc<CudaStream>, buffer: &CudaSlice<T>) -> BoxResult<Vec<T>> {
    let host = stream.clone_dtoh(buffer)?;
    stream.synchronize()?;
    Ok(host)
}

// ---------------------------------------------------------------------------------------------
// Inputs: deterministic, cheap, parallel, never zeros.

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE5_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in [0, 1).
fn unit(seed: u64, i: usize) -> f64 {
    (splitmix(seed ^ splitmix(i as u64)) >> 11) as f64 / (1u64 << 53) as f64
}

/// About N(0, 1): the sum of four 16-bit uniforms, centred and scaled (Irwin-Hall).
fn normalish(seed: u64, i: usize) -> f64 {
    let bits = splitmix(seed ^ splitmix(i as u64));
    let sum: f64 = (0..4)
        .map(|k| ((bits >> (16 * k)) & 0xFFFF) as f64 / 65536.0)
        .sum();
    (sum - 2.0) * 3f64.sqrt()
}

/// Per-channel mean and standard deviation of the inputs: shifted and scaled channels, as
/// activations are.
fn channel_mean(c: usize) -> f64 {
    ((c * 7) % 13) as f64 * 0.5 - 3.0
}
fn channel_std(c: usize) -> f64 {
    0.5 + ((c * 5) % 11) as f64 * 0.1
}

/// A tensor in `desc`'s memory order with per-channel `mean(c) + std(c) * normal`.
fn generate<T: Element>(
    desc: &TensorDesc,
    seed: u64,
    mean: impl Fn(usize) -> f64 + Sync,
    std: impl Fn(usize) -> f64 + Sync,
) -> Vec<T> {
    let g = desc.geometry();
    (0..desc.numel())
        .into_par_iter()
        .map(|i| {
            let c = (i / g.inner) % g.channels;
            T::from_f64(mean(c) + std(c) * normalish(seed, i))
        })
        .collect()
}

fn per_channel(c: usize, f: impl Fn(usize) -> f64) -> Vec<f32> {
    (0..c).map(|c| f(c) as f32).collect()
}

// ---------------------------------------------------------------------------------------------
// Checking against the reference

/// The channels the reference checks, and the smaller tensor holding only them.
struct Subset {
    full: TensorDesc,
    channels: Vec<usize>,
    desc: TensorDesc,
}

impl Subset {
    fn new(full: &TensorDesc) -> BoxResult<Self> {
        let c = full.channels();
        let channels: Vec<usize> = if full.numel() <= FULL_CHECK_NUMEL || c <= SAMPLED_CHANNELS {
            (0..c).collect()
        } else {
            let mut picked: Vec<usize> = (0..SAMPLED_CHANNELS)
                .map(|k| k * (c - 1) / (SAMPLED_CHANNELS - 1))
                .collect();
            picked.dedup();
            picked
        };
        Self::with_channels(full, channels)
    }

    fn with_channels(full: &TensorDesc, channels: Vec<usize>) -> BoxResult<Self> {
        let mut dims = full.dims().to_vec();
        dims[1] = channels.len();
        let desc = TensorDesc::new(&dims, full.layout())?;
        Ok(Self {
            full: *full,
            channels,
            desc,
        })
    }

    /// The checked channels of a full tensor, as a tensor of `self.desc`.
    fn gather<T: Copy + Default + Send + Sync>(&self, full: &[T]) -> Vec<T> {
        let (g, s) = (self.full.geometry(), self.desc.geometry());
        let mut out = vec![T::default(); self.desc.numel()];
        for (j, &c) in self.channels.iter().enumerate() {
            for o in 0..g.outer {
                for i in 0..g.inner {
                    out[s.offset(o, j, i)] = full[g.offset(o, c, i)];
                }
            }
        }
        out
    }

    fn pick(&self, per_channel: &[f32]) -> Vec<f32> {
        self.channels.iter().map(|&c| per_channel[c]).collect()
    }
}

/// Errors of one op against the reference.
#[derive(Clone, Debug)]
struct Check {
    dtype: DType,
    max_abs_err: f64,
    rel_err: f64,
    all_written: bool,
    channels_checked: usize,
    channels: usize,
}

impl Check {
    fn new(dtype: DType, subset: &Subset) -> Self {
        Self {
            dtype,
            max_abs_err: 0.0,
            rel_err: 0.0,
            all_written: true,
            channels_checked: subset.channels.len(),
            channels: subset.full.channels(),
        }
    }

    /// Every element of a full output is finite (the inputs are, and the output was poisoned).
    fn written<T: Element>(&mut self, full: &[T]) {
        self.all_written &= full.par_iter().all(|v| v.to_f64().is_finite());
    }

    /// Compares an output (or its checked subset) with the reference; `main` outputs (y, dx)
    /// also set `max_abs_err`.
    fn compare<T: Element>(&mut self, got: &[T], want: &[T], main: bool) {
        let (mut diff2, mut ref2, mut max_abs) = (0.0f64, 0.0f64, 0.0f64);
        for (g, w) in got.iter().zip(want) {
            let (g, w) = (g.to_f64(), w.to_f64());
            // NaN must fail: fold it into the error as infinity.
            let d = if (g - w).is_nan() {
                f64::INFINITY
            } else {
                (g - w).abs()
            };
            diff2 += d * d;
            ref2 += w * w;
            max_abs = max_abs.max(d);
        }
        let rel = if ref2 > 0.0 {
            (diff2 / ref2).sqrt()
        } else {
            diff2.sqrt()
        };
        self.rel_err = self.rel_err.max(rel);
        if main {
            self.max_abs_err = self.max_abs_err.max(max_abs);
        }
    }

    fn ok(&self) -> bool {
        self.all_written && self.rel_err <= tolerance(self.dtype)
    }
}

// ---------------------------------------------------------------------------------------------
// Rows

struct Row {
    name: String,
    op: Op,
    suite: &'static str,
    dtype: DType,
    layout: Option<Layout>,
    dims: Vec<usize>,
    fold: Option<(FoldKind, usize)>,
    /// Bytes under the (minimal, practical) models.
    bytes: (u64, u64),
    result: Result<(Timing, Check), String>,
}

impl Row {
    fn gbs(&self, bytes: u64) -> Option<f64> {
        self.result
            .as_ref()
            .ok()
            .map(|(t, _)| bytes as f64 / (t.median_us * 1e-6) / 1e9)
    }
}

struct Env {
    gpu: GpuContext,
    timer: Timer,
    workspace: Workspace,
}

/// Training forward, eval forward and training backward of one shape, dtype and layout.
/// The three rows of one shape, dtype and layout, with their results (fwd, eval, bwd).
fn bn_rows(
    case: &BnCase,
    layout: Layout,
    dtype: DType,
    results: Vec<Result<(Timing, Check), String>>,
) -> Vec<Row> {
    let bytes = (case.dims.iter().product::<usize>() * dtype.size_of()) as u64;
    [Op::Fwd, Op::Eval, Op::Bwd]
        .into_iter()
        .zip(results)
        .map(|(op, result)| Row {
            name: format!(
                "{}/{}/{}/{}",
                op.name(),
                dtype,
                dims_name(&case.dims),
                layout
            ),
            op,
            suite: case.suite,
            dtype,
            layout: Some(layout),
            dims: case.dims.clone(),
            fold: None,
            bytes: (op.passes().0 * bytes, op.passes().1 * bytes),
            result,
        })
        .collect()
}

fn bench_bn<T: Element>(env: &mut Env, case: &BnCase, layout: Layout) -> Vec<Row> {
    let results = match TensorDesc::new(&case.dims, layout)
        .map_err(Into::into)
        .and_then(|desc| run_bn::<T>(env, &desc))
    {
        Ok(results) => results.into_iter().map(Ok).collect(),
        Err(e) => vec![Err(e.to_string()); 3],
    };
    bn_rows(case, layout, T::DTYPE, results)
}

/// Checks, then times, forward / eval / backward; results in that order.
fn run_bn<T: Element>(env: &mut Env, desc: &TensorDesc) -> BoxResult<Vec<(Timing, Check)>> {
    let Env {
        gpu,
        timer,
        workspace,
    } = env;
    let gpu = &*gpu;
    let stream = gpu.stream().clone();
    let (n, c) = (desc.numel(), desc.channels());

    let x_h: Vec<T> = generate(desc, 1, channel_mean, channel_std);
    let dy_h: Vec<T> = generate(desc, 2, |c| 0.1 * channel_mean(c), |_| 1.0);
    let weight_h = per_channel(c, |c| 0.75 + 0.5 * unit(3, c));
    let bias_h = per_channel(c, |c| unit(4, c) - 0.5);
    let (rm0, rv0) = (vec![0.0f32; c], vec![1.0f32; c]);
    // Eval statistics near the data's, as in a trained network, so y stays O(1).
    let rm_eval = per_channel(c, |c| channel_mean(c) + 0.1 * (unit(5, c) - 0.5));
    let rv_eval = per_channel(c, |c| channel_std(c).powi(2) * (0.8 + 0.4 * unit(6, c)));

    let x = stream.clone_htod(&x_h)?;
    let dy = stream.clone_htod(&dy_h)?;
    let weight = stream.clone_htod(&weight_h)?;
    let bias = stream.clone_htod(&bias_h)?;
    let mut running_mean = stream.clone_htod(&rm0)?;
    let mut running_var = stream.clone_htod(&rv0)?;
    let eval_mean = stream.clone_htod(&rm_eval)?;
    let eval_var = stream.clone_htod(&rv_eval)?;
    let mut y = stream.alloc_zeros::<T>(n)?;
    let mut dx = stream.alloc_zeros::<T>(n)?;
    let mut save_mean = stream.alloc_zeros::<f32>(c)?;
    let mut save_mean_lo = stream.alloc_zeros::<f32>(c)?;
    let mut save_invstd = stream.alloc_zeros::<f32>(c)?;
    let mut dweight = stream.alloc_zeros::<f32>(c)?;
    let mut dbias = stream.alloc_zeros::<f32>(c)?;

    let forward = |workspace: &mut Workspace,
                   y: &mut CudaSlice<T>,
                   rm: &mut CudaSlice<f32>,
                   rv: &mut CudaSlice<f32>,
                   [sm, sl, si]: [&mut CudaSlice<f32>; 3]|
     -> BoxResult<()> {
        let running = RunningUpdate {
            mean: rm.as_view_mut(),
            var: rv.as_view_mut(),
            factor: MOMENTUM,
            var_update: RunningVarUpdate::Unbiased,
        };
        let saved = SavedStatsMut {
            mean: sm.as_view_mut(),
            mean_lo: sl.as_view_mut(),
            invstd: si.as_view_mut(),
        };
        functional::forward(
            gpu,
            workspace,
            functional::Forward {
                desc: *desc,
                x: x.as_view(),
                weight: Some(weight.as_view()),
                bias: Some(bias.as_view()),
                stats: functional::ForwardStats::Batch(functional::BatchStats {
                    saved,
                    running: Some(running),
                    eps: EPS,
                }),
                y: y.as_view_mut(),
                epilogue: functional::Epilogue::None,
            },
        )?;
        Ok(())
    };
    let eval = |y: &mut CudaSlice<T>| -> BoxResult<()> {
        let running = RunningStats {
            mean: eval_mean.as_view(),
            var: eval_var.as_view(),
        };
        functional::forward(
            gpu,
            &mut Workspace::new(),
            functional::Forward {
                desc: *desc,
                x: x.as_view(),
                weight: Some(weight.as_view()),
                bias: Some(bias.as_view()),
                stats: functional::ForwardStats::Running {
                    stats: running,
                    eps: EPS,
                },
                y: y.as_view_mut(),
                epilogue: functional::Epilogue::None,
            },
        )?;
        Ok(())
    };
    let backward = |workspace: &mut Workspace,
                    [sm, sl, si]: [&CudaSlice<f32>; 3],
                    dx: &mut CudaSlice<T>,
                    dw: &mut CudaSlice<f32>,
                    db: &mut CudaSlice<f32>|
     -> BoxResult<()> {
        let saved = SavedStats {
            mean: sm.as_view(),
            mean_lo: Some(sl.as_view()),
            invstd: si.as_view(),
        };
        let grads = GradientsMut {
            dx: Some(dx.as_view_mut()),
            dweight: Some(dw.as_view_mut()),
            dbias: Some(db.as_view_mut()),
            accumulate: false,
        };
        functional::backward(
            gpu,
            workspace,
            functional::Backward {
                desc: *desc,
                x: x.as_view(),
                dy: dy.as_view(),
                weight: Some(weight.as_view()),
                stats: functional::BackwardStats::Batch(saved),
                grads,
                epilogue: functional::EpilogueGrad::None,
            },
        )?;
        Ok(())
    };

    // One checked call of each op, on poisoned outputs.
    let subset = Subset::new(desc)?;
    let (x_s, dy_s) = (subset.gather(&x_h), subset.gather(&dy_h));
    let (w_s, b_s) = (subset.pick(&weight_h), subset.pick(&bias_h));
    let m = subset.desc.numel();

    poison(&stream, &mut y)?;
    forward(
        workspace,
        &mut y,
        &mut running_mean,
        &mut running_var,
        [&mut save_mean, &mut save_mean_lo, &mut save_invstd],
    )?;
    let mut fwd = Check::new(T::DTYPE, &subset);
    let y_gpu = download(&stream, &y)?;
    fwd.written(&y_gpu);
    let (mut rm_ref, mut rv_ref) = (subset.pick(&rm0), subset.pick(&rv0));
    let mut y_ref = vec![T::default(); m];
    let saved_ref = reference::forward_training(
        &x_s,
        &subset.desc,
        Some(&w_s),
        Some(&b_s),
        Some(reference::RunningUpdate::pytorch(
            &mut rm_ref,
            &mut rv_ref,
            MOMENTUM,
        )),
        EPS,
        &mut y_ref,
    )?;
    fwd.compare(&subset.gather(&y_gpu), &y_ref, true);
    let per_channel_outputs = [
        (&save_mean, &saved_ref.mean),
        (&save_invstd, &saved_ref.invstd),
        (&running_mean, &rm_ref),
        (&running_var, &rv_ref),
    ];
    for (gpu_values, want) in per_channel_outputs {
        fwd.compare(&subset.pick(&download(&stream, gpu_values)?), want, false);
    }

    poison(&stream, &mut y)?;
    eval(&mut y)?;
    let mut inf = Check::new(T::DTYPE, &subset);
    let y_gpu = download(&stream, &y)?;
    inf.written(&y_gpu);
    let (rm_eval_s, rv_eval_s) = (subset.pick(&rm_eval), subset.pick(&rv_eval));
    let running = reference::RunningStats {
        mean: &rm_eval_s,
        var: &rv_eval_s,
    };
    reference::forward_inference(
        &x_s,
        &subset.desc,
        Some(&w_s),
        Some(&b_s),
        running,
        EPS,
        &mut y_ref,
    )?;
    inf.compare(&subset.gather(&y_gpu), &y_ref, true);
    drop(y_gpu);

    poison(&stream, &mut dx)?;
    poison(&stream, &mut dweight)?;
    poison(&stream, &mut dbias)?;
    backward(
        workspace,
        [&save_mean, &save_mean_lo, &save_invstd],
        &mut dx,
        &mut dweight,
        &mut dbias,
    )?;
    let mut bwd = Check::new(T::DTYPE, &subset);
    let dx_gpu = download(&stream, &dx)?;
    let (dw_gpu, db_gpu) = (download(&stream, &dweight)?, download(&stream, &dbias)?);
    bwd.written(&dx_gpu);
    bwd.written(&dw_gpu);
    bwd.written(&db_gpu);
    let (mut dx_ref, mut dw_ref, mut db_ref) = (
        vec![T::default(); m],
        vec![0f32; w_s.len()],
        vec![0f32; w_s.len()],
    );
    let grads = reference::Gradients {
        dx: Some(&mut dx_ref),
        dweight: Some(&mut dw_ref),
        dbias: Some(&mut db_ref),
        accumulate: false,
    };
    reference::backward_training(&x_s, &dy_s, &subset.desc, Some(&w_s), &saved_ref, grads)?;
    bwd.compare(&subset.gather(&dx_gpu), &dx_ref, true);
    bwd.compare(&subset.pick(&dw_gpu), &dw_ref, false);
    bwd.compare(&subset.pick(&db_gpu), &db_ref, false);
    drop(dx_gpu);

    // Timed runs. The running statistics keep updating, as in training; the backward reuses the
    // saved statistics of the last forward.
    let t_fwd = timer.time(|| {
        forward(
            workspace,
            &mut y,
            &mut running_mean,
            &mut running_var,
            [&mut save_mean, &mut save_mean_lo, &mut save_invstd],
        )
    })?;
    let t_eval = timer.time(|| eval(&mut y))?;
    let t_bwd = timer.time(|| {
        backward(
            workspace,
            [&save_mean, &save_mean_lo, &save_invstd],
            &mut dx,
            &mut dweight,
            &mut dbias,
        )
    })?;
    Ok(vec![(t_fwd, fwd), (t_eval, inf), (t_bwd, bwd)])
}

/// The row of one fold: the folded weight is written out of place, as PyTorch's
/// `fuse_conv_bn_weights` does.
fn fold_row(case: &FoldCase, dtype: DType, result: Result<(Timing, Check), String>) -> Row {
    let groups = if case.groups > 1 {
        format!("_g{}", case.groups)
    } else {
        String::new()
    };
    let name = format!(
        "{}/{}/{}{}/{}",
        Op::Fold.name(),
        dtype,
        kind_name(case.kind),
        groups,
        dims_name(case.shape)
    );
    let numel: u64 = case.shape.iter().product::<usize>() as u64;
    let c_out = match case.kind {
        FoldKind::ConvTranspose => case.shape[1] * case.groups,
        _ => case.shape[0],
    } as u64;
    let size = dtype.size_of() as u64;
    // Weight read and written; four f32 vectors read and the bias written per output channel.
    let bytes = 2 * numel * size + c_out * (16 + size);
    Row {
        name,
        op: Op::Fold,
        suite: "fold",
        dtype,
        layout: None,
        dims: case.shape.to_vec(),
        fold: Some((case.kind, case.groups)),
        bytes: (bytes, bytes),
        result,
    }
}

fn bench_fold<T: Element>(env: &mut Env, case: &FoldCase) -> Row {
    fold_row(
        case,
        T::DTYPE,
        run_fold::<T>(env, case).map_err(|e| e.to_string()),
    )
}

fn run_fold<T: Element>(env: &mut Env, case: &FoldCase) -> BoxResult<(Timing, Check)> {
    let Env { gpu, timer, .. } = env;
    let gpu = &*gpu;
    let stream = gpu.stream().clone();
    let spec = FoldSpec::new(case.kind, case.shape, case.groups, Layout::ChannelsFirst)?;
    let (n, c) = (spec.numel(), spec.c_out());
    let w_h: Vec<T> = (0..n)
        .map(|i| T::from_f64(0.05 * normalish(7, i)))
        .collect();
    let rm_h = per_channel(c, |c| unit(8, c) - 0.5);
    let rv_h = per_channel(c, |c| 0.5 + unit(9, c));
    let bnw_h = per_channel(c, |c| 0.75 + 0.5 * unit(10, c));
    let bnb_h = per_channel(c, |c| unit(11, c) - 0.5);
    let w_in = stream.clone_htod(&w_h)?;
    let (rm, rv) = (stream.clone_htod(&rm_h)?, stream.clone_htod(&rv_h)?);
    let (bnw, bnb) = (stream.clone_htod(&bnw_h)?, stream.clone_htod(&bnb_h)?);
    let mut w_out = stream.alloc_zeros::<T>(n)?;
    let mut b_out = stream.alloc_zeros::<T>(c)?;

    let fold = |w_out: &mut CudaSlice<T>, b_out: &mut CudaSlice<T>| -> BoxResult<()> {
        let bn = FoldBatchNorm {
            running_mean: rm.as_view(),
            running_var: rv.as_view(),
            weight: Some(bnw.as_view()),
            bias: Some(bnb.as_view()),
            eps: EPS,
        };
        functional::fold(
            gpu,
            &spec,
            Some(&w_in.as_view()),
            &mut w_out.as_view_mut(),
            None,
            &mut b_out.as_view_mut(),
            &bn,
        )?;
        Ok(())
    };

    poison(&stream, &mut w_out)?;
    poison(&stream, &mut b_out)?;
    fold(&mut w_out, &mut b_out)?;
    let (w_gpu, b_gpu) = (download(&stream, &w_out)?, download(&stream, &b_out)?);
    let bn = reference::FoldBatchNorm {
        running_mean: &rm_h,
        running_var: &rv_h,
        weight: Some(&bnw_h),
        bias: Some(&bnb_h),
        eps: EPS,
    };
    let want = reference::fold(&spec, &w_h, None, &bn)?;
    let mut check = Check {
        dtype: T::DTYPE,
        max_abs_err: 0.0,
        rel_err: 0.0,
        all_written: true,
        channels_checked: c,
        channels: c,
    };
    check.written(&w_gpu);
    check.written(&b_gpu);
    check.compare(&w_gpu, &want.weight, true);
    check.compare(&b_gpu, &want.bias, false);

    let timing = timer.time(|| fold(&mut w_out, &mut b_out))?;
    Ok((timing, check))
}

// ---------------------------------------------------------------------------------------------
// Output

/// ISO 8601 UTC time of the system clock.
fn utc_now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// The CUDA version the driver supports, e.g. 13000.
fn driver_cuda_version() -> Option<i32> {
    let mut version = 0;
    // SAFETY: a plain query writing one int; the driver was initialised by GpuContext::new.
    let status = unsafe { sys::cuDriverGetVersion(&mut version) };
    (status == sys::CUresult::CUDA_SUCCESS).then_some(version)
}

struct Header {
    date: String,
    device: String,
    sm_count: u32,
    l2_bytes: i32,
    driver_cuda: Option<i32>,
    copy_gbs: f64,
    copy: Timing,
    quick: bool,
    filter: Option<String>,
    dry_run: bool,
}

fn row_json(row: &Row, copy_gbs: f64) -> Value {
    let (timing, check) = match &row.result {
        Ok((t, c)) => (Some(t), Some(c)),
        Err(_) => (None, None),
    };
    let (gbs_min, gbs_practical) = (row.gbs(row.bytes.0), row.gbs(row.bytes.1));
    let mut fields = json!({
        "name": row.name,
        "op": row.op.name(),
        "suite": row.suite,
        "dtype": row.dtype.to_string(),
        "layout": row.layout.map(|l| l.to_string()),
        "shape": row.dims,
    });
    if let Some((kind, groups)) = row.fold {
        fields["fold_kind"] = json!(kind_name(kind));
        fields["groups"] = json!(groups);
    }
    let measured = json!({
        "time_us": timing.map(|t| t.median_us),
        "time_min_us": timing.map(|t| t.min_us),
        "time_p90_us": timing.map(|t| t.p90_us),
        "runs": timing.map(|t| t.runs),
        "bytes_min": row.bytes.0,
        "bytes_practical": row.bytes.1,
        "gbs_min": gbs_min,
        "gbs_practical": gbs_practical,
        "frac_copy_min": gbs_min.map(|b| b / copy_gbs),
        "frac_copy_practical": gbs_practical.map(|b| b / copy_gbs),
        "max_abs_err": check.map(|c| c.max_abs_err),
        "rel_err": check.map(|c| c.rel_err),
        "tolerance": tolerance(row.dtype),
        "channels_checked": check.map(|c| c.channels_checked),
        "channels": check.map(|c| c.channels),
        "all_written": check.map(|c| c.all_written),
        "ok": check.is_some_and(Check::ok),
        "error": row.result.as_ref().err(),
    });
    if let (Some(fields), Value::Object(measured)) = (fields.as_object_mut(), measured) {
        fields.extend(measured);
    }
    fields
}

/// The f64 that prints like the f32 (1e-5, not 0.000009999999747378752).
fn shortest(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(f64::from(v))
}

fn write_json(h: &Header, rows: &[Row]) -> String {
    let doc = json!({
        "schema": 1,
        "tool": "examples/gpu_bench.rs",
        "date": h.date,
        "device": h.device,
        "sm_count": h.sm_count,
        "l2_bytes": h.l2_bytes,
        "driver_cuda_version": h.driver_cuda,
        "quick": h.quick,
        "dry_run": h.dry_run,
        "filter": h.filter,
        "method": {
            "timer": "CUDA events around each call",
            "statistic": "median",
            "warmup": WARMUP,
            "min_runs": MIN_RUNS,
            "max_runs": MAX_RUNS,
            "target_ms_per_op": TARGET_MS,
            "l2_flush_bytes": FLUSH_BYTES,
            "eps": shortest(EPS),
            "momentum": shortest(MOMENTUM),
            "passes_min": "fwd 2, eval 2, bwd 3, fold 2 (weight)",
            "passes_practical": "fwd 3, eval 2, bwd 5, fold 2 (weight)",
        },
        "copy_bytes": 2 * COPY_BYTES,
        "copy_time_us": h.copy.median_us,
        "copy_gbs": h.copy_gbs,
        "rows": rows.iter().map(|r| row_json(r, h.copy_gbs)).collect::<Vec<_>>(),
    });
    let mut out = serde_json::to_string_pretty(&doc).expect("a JSON value serializes");
    out.push('\n');
    out
}

/// The device and copy-yardstick lines of a measured run.
fn write_device(md: &mut String, h: &Header) {
    let _ = writeln!(
        md,
        "{} on {} ({} SMs, L2 {} MB, driver CUDA {}){}.\n",
        h.date,
        h.device,
        h.sm_count,
        h.l2_bytes as f64 / 1e6,
        h.driver_cuda
            .map_or("?".into(), |v| format!("{}.{}", v / 1000, v % 1000 / 10)),
        if h.quick { ", quick subset" } else { "" }
    );
    let _ = writeln!(
        md,
        "Copy yardstick: {:.0} GB/s (1 GiB device-to-device, read + write, median of {}).\n",
        h.copy_gbs, h.copy.runs
    );
}

fn write_markdown(h: &Header, rows: &[Row]) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# batchnorm-cuda: GPU benchmark\n");
    if h.dry_run {
        let _ = writeln!(
            md,
            "**Dry run ({}): the suite only, nothing was measured.**\n",
            h.date
        );
    } else {
        write_device(&mut md, h);
    }
    let _ = writeln!(
        md,
        "Median of {MIN_RUNS} to {MAX_RUNS} runs timed with CUDA events after {WARMUP} warm-up \
         calls, L2 flushed ({} MiB written) before each run. GB/s: bytes over the median time, \
         minimal model (fwd 2 passes, eval 2, bwd 3) / practical model of our kernels (fwd 3, \
         eval 2, bwd 5); % copy: each of the two over the copy yardstick. Errors against the CPU \
         reference; `rel` is the largest relative L2 error over the op's outputs.\n",
        FLUSH_BYTES >> 20
    );
    let mut ops: Vec<Op> = Vec::new();
    for row in rows {
        if !ops.contains(&row.op) {
            ops.push(row.op);
        }
    }
    for op in ops {
        let rows: Vec<&Row> = rows.iter().filter(|r| r.op == op).collect();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(md, "## {}\n", op.name());
        let _ = writeln!(
            md,
            "| name | median us | min us | GB/s min | GB/s practical | % copy min / practical | max abs err | rel err | ok |"
        );
        let _ = writeln!(
            md,
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
        );
        for row in rows {
            match &row.result {
                Ok((t, c)) => {
                    let (min, practical) = (
                        row.gbs(row.bytes.0).unwrap_or(0.0),
                        row.gbs(row.bytes.1).unwrap_or(0.0),
                    );
                    let _ = writeln!(
                        md,
                        "| {} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0}% / {:.0}% | {:.2e} | {:.2e} | {} |",
                        row.name,
                        t.median_us,
                        t.min_us,
                        min,
                        practical,
                        100.0 * min / h.copy_gbs,
                        100.0 * practical / h.copy_gbs,
                        c.max_abs_err,
                        c.rel_err,
                        if c.ok() { "yes" } else { "**NO**" }
                    );
                }
                Err(e) if e == NOT_MEASURED => {
                    let _ = writeln!(md, "| {} | not measured | | | | | | | |", row.name);
                }
                Err(e) => {
                    let _ = writeln!(
                        md,
                        "| {} | error: {} | | | | | | | **NO** |",
                        row.name,
                        e.replace('|', "/")
                    );
                }
            }
        }
        md.push('\n');
    }
    md
}

// ---------------------------------------------------------------------------------------------

struct Args {
    out: PathBuf,
    quick: bool,
    filter: Option<String>,
    dry_run: bool,
}

const USAGE: &str = "usage: gpu_bench [--out DIR] [--quick] [--filter TEXT] [--dry-run]
  --out DIR      where ours.json and ours.md are written (default: .)
  --quick        a small subset of the suite
  --filter TEXT  only rows whose name contains TEXT (e.g. bn_fwd/f16)
  --dry-run      no GPU: write the rows of the suite, every one marked not measured";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        out: PathBuf::from("."),
        quick: false,
        filter: None,
        dry_run: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--out" => args.out = it.next().ok_or("--out needs a directory")?.into(),
            "--quick" => args.quick = true,
            "--filter" => args.filter = Some(it.next().ok_or("--filter needs a text")?),
            "--dry-run" => args.dry_run = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("gpu_bench: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = if args.dry_run {
        run(None, &args)
    } else {
        match GpuContext::new(0) {
            Ok(gpu) => run(Some(gpu), &args),
            Err(e) => {
                eprintln!("gpu_bench: no GPU to benchmark on: {e}");
                return ExitCode::from(3);
            }
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("gpu_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

const NOT_MEASURED: &str = "not measured (dry run)";

/// Runs the suite (or, without a GPU, lists it) and writes the outputs; `Ok(false)` when a
/// measured row failed its check or errored.
fn run(gpu: Option<GpuContext>, args: &Args) -> BoxResult<bool> {
    let started = Instant::now();
    std::fs::create_dir_all(&args.out)?;
    let mut header = Header {
        date: utc_now(),
        device: NOT_MEASURED.into(),
        sm_count: 0,
        l2_bytes: 0,
        driver_cuda: None,
        copy_gbs: f64::NAN,
        copy: Timing {
            median_us: f64::NAN,
            min_us: f64::NAN,
            p90_us: f64::NAN,
            runs: 0,
        },
        quick: args.quick,
        filter: args.filter.clone(),
        dry_run: gpu.is_none(),
    };
    let mut env = match gpu {
        Some(gpu) => {
            header.device = gpu.device_name()?;
            header.sm_count = gpu.sm_count();
            header.l2_bytes = gpu
                .cuda()
                .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?;
            header.driver_cuda = driver_cuda_version();
            (header.copy_gbs, header.copy) = copy_bandwidth(&gpu)?;
            println!(
                "{}: copy {:.0} GB/s ({:.1} us per 2 GiB moved)",
                header.device, header.copy_gbs, header.copy.median_us
            );
            let timer = Timer::new(&gpu)?;
            Some(Env {
                gpu,
                timer,
                workspace: Workspace::new(),
            })
        }
        None => None,
    };
    let copy_gbs = header.copy_gbs;
    let wanted = |name: &str| {
        args.filter
            .as_ref()
            .is_none_or(|f| name.contains(f.as_str()))
    };

    let mut rows = Vec::new();
    let mut report = |new: Vec<Row>| {
        for row in new.into_iter().filter(|r| wanted(&r.name)) {
            print_row(&row, copy_gbs);
            rows.push(row);
        }
    };
    for case in bn_suite(args.quick) {
        let layouts: &[Layout] = if case.dims.len() == 2 {
            &[Layout::ChannelsFirst]
        } else {
            &[Layout::ChannelsFirst, Layout::ChannelsLast]
        };
        for &layout in layouts {
            for dtype in DType::ALL {
                // Skip the work when the filter keeps none of the three rows.
                let planned = bn_rows(&case, layout, dtype, vec![Err(NOT_MEASURED.into()); 3]);
                let Some(env) = env
                    .as_mut()
                    .filter(|_| planned.iter().any(|r| wanted(&r.name)))
                else {
                    report(planned);
                    continue;
                };
                report(match dtype {
                    DType::F32 => bench_bn::<f32>(env, &case, layout),
                    DType::F16 => bench_bn::<half::f16>(env, &case, layout),
                    DType::BF16 => bench_bn::<half::bf16>(env, &case, layout),
                });
            }
        }
    }
    for case in fold_suite(args.quick) {
        for dtype in DType::ALL {
            let planned = fold_row(&case, dtype, Err(NOT_MEASURED.into()));
            let Some(env) = env.as_mut().filter(|_| wanted(&planned.name)) else {
                report(vec![planned]);
                continue;
            };
            report(vec![match dtype {
                DType::F32 => bench_fold::<f32>(env, &case),
                DType::F16 => bench_fold::<half::f16>(env, &case),
                DType::BF16 => bench_fold::<half::bf16>(env, &case),
            }]);
        }
    }

    let norm_kernels = env
        .as_ref()
        .map(|env| batchnorm_cuda::gpu::norms::Norms::new(&env.gpu))
        .transpose()?;
    for case in norms::suite(args.quick) {
        for dtype in DType::ALL {
            let planned = norms::rows(&case, dtype, vec![Err(NOT_MEASURED.into()); 2]);
            let (Some(env), Some(kernels)) = (
                env.as_mut()
                    .filter(|_| planned.iter().any(|r| wanted(&r.name))),
                norm_kernels.as_ref(),
            ) else {
                report(planned);
                continue;
            };
            report(match dtype {
                DType::F32 => norms::bench::<f32>(env, kernels, &case),
                DType::F16 => norms::bench::<half::f16>(env, kernels, &case),
                DType::BF16 => norms::bench::<half::bf16>(env, kernels, &case),
            });
        }
    }

    let json_path = args.out.join("ours.json");
    let md_path = args.out.join("ours.md");
    std::fs::write(&json_path, write_json(&header, &rows))?;
    std::fs::write(&md_path, write_markdown(&header, &rows))?;
    let failed: Vec<&Row> = rows
        .iter()
        .filter(|r| !r.result.as_ref().is_ok_and(|(_, c)| c.ok()))
        .collect();
    let written = format!("Wrote {} and {}", json_path.display(), md_path.display());
    if header.dry_run {
        println!(
            "\ndry run: {} rows listed, nothing was measured. {written}",
            rows.len()
        );
        return Ok(true);
    }
    println!(
        "\n{} rows in {:.0} s; {} failed their check or errored. {written}",
        rows.len(),
        started.elapsed().as_secs_f64(),
        failed.len(),
    );
    for row in &failed {
        println!("FAILED {}", row.name);
    }
    Ok(failed.is_empty())
}

fn print_row(row: &Row, copy_gbs: f64) {
    match &row.result {
        Ok((t, c)) => {
            let practical = row.gbs(row.bytes.1).unwrap_or(0.0);
            println!(
                "{:<48} {:>9.1} us {:>6.0} GB/s {:>4.0}% copy  rel err {:.1e}{}",
                row.name,
                t.median_us,
                practical,
                100.0 * practical / copy_gbs,
                c.rel_err,
                if c.ok() {
                    ""
                } else if c.all_written {
                    "  CHECK FAILED"
                } else {
                    "  UNWRITTEN OUTPUT"
                }
            );
        }
        Err(e) => println!("{:<48} ERROR {e}", row.name),
    }
}

#[cfg(test)]
mod tests {
    //! The host side of the benchmark, checked without a GPU: `cargo test --example gpu_bench`.
    use super::*;

    /// The reference on the gathered channels gives exactly the full reference's values for
    /// those channels, in both layouts: what makes the sampled check sound.
    #[test]
    fn subset_reference_equals_full_reference() {
        for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
            let full = TensorDesc::new(&[3, 10, 5, 7], layout).unwrap();
            let subset = Subset::with_channels(&full, vec![0, 4, 9]).unwrap();
            let x: Vec<f32> = generate(&full, 1, channel_mean, channel_std);
            let w = per_channel(10, |c| 0.5 + c as f64 * 0.1);
            let mut y = vec![0f32; full.numel()];
            let saved =
                reference::forward_training(&x, &full, Some(&w), None, None, EPS, &mut y).unwrap();
            let mut y_s = vec![0f32; subset.desc.numel()];
            let x_s = subset.gather(&x);
            let saved_s = reference::forward_training(
                &x_s,
                &subset.desc,
                Some(&subset.pick(&w)),
                None,
                None,
                EPS,
                &mut y_s,
            )
            .unwrap();
            assert_eq!(subset.gather(&y), y_s, "{layout}");
            assert_eq!(subset.pick(&saved.mean), saved_s.mean);
            assert_eq!(subset.pick(&saved.invstd), saved_s.invstd);
        }
    }

    #[test]
    fn large_tensors_sample_first_and_last_channels() {
        let desc = TensorDesc::nhwc(128, 2048, 7, 7).unwrap();
        let subset = Subset::new(&desc).unwrap();
        assert_eq!(subset.channels.len(), SAMPLED_CHANNELS);
        assert_eq!(
            (subset.channels[0], *subset.channels.last().unwrap()),
            (0, 2047)
        );
        assert_eq!(subset.desc.dims(), &[128, 8, 7, 7]);
        let small = Subset::new(&TensorDesc::nchw(256, 4, 112, 112).unwrap()).unwrap();
        assert_eq!(small.channels, vec![0, 1, 2, 3]);
    }

    #[test]
    fn check_fails_on_nan_and_unwritten_outputs() {
        let subset =
            Subset::with_channels(&TensorDesc::nchw(1, 1, 1, 2).unwrap(), vec![0]).unwrap();
        let mut check = Check::new(DType::F32, &subset);
        check.compare(&[1.0f32, 2.0], &[1.0, 2.0], true);
        assert!(check.ok() && check.rel_err == 0.0);
        check.compare(&[f32::NAN, 2.0], &[1.0, 2.0], true);
        assert!(!check.ok());
        let mut unwritten = Check::new(DType::F32, &subset);
        unwritten.written(&[1.0f32, f32::NAN]);
        assert!(!unwritten.ok());
    }

    #[test]
    fn timing_statistics() {
        let t = Timing::from_ms(vec![4.0, 1.0, 3.0, 2.0]);
        assert_eq!(
            (t.median_us, t.min_us, t.p90_us, t.runs),
            (2500.0, 1000.0, 4000.0, 4)
        );
        assert_eq!(Timing::from_ms(vec![3.0, 1.0, 2.0]).median_us, 2000.0);
    }

    #[test]
    fn f32_constants_print_as_written() {
        assert_eq!(shortest(1e-5), 1e-5);
        assert_eq!(serde_json::to_string(&shortest(0.1)).unwrap(), "0.1");
    }

    #[test]
    fn suite_sizes() {
        // Keep in sync with bench/pytorch_bench.py (its --self-test checks the names).
        assert_eq!(bn_suite(false).len(), 24 + 5 + 1 + 1);
        assert_eq!(fold_suite(false).len(), 7);
        assert_eq!(
            RESNET50_CHW
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len(),
            12
        );
    }
}
