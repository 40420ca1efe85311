//! The one-run GPU benchmark: our kernels over the shape suite, against the device-to-device copy
//! bandwidth, each row checked against the CPU reference. Writes `ours.json` and `ours.md` into
//! `--out DIR`; `bench/pytorch_bench.py` times PyTorch on the same rows and merges the two.
//!
//! ```text
//! cargo run --release --example gpu_bench -- --out DIR [--quick] [--filter TEXT[,TEXT...]]
//! cargo run --release --example gpu_bench -- --out DIR --dry-run   # no GPU: list the suite
//! cargo test --example gpu_bench                                   # host-side logic, no GPU
//! ```
//!
//! Without a GPU it exits with status 3 and a one-line reason; a row that errors or fails its
//! check makes it exit with status 1 after writing both files.
//!
//! Method (the PyTorch side does the same):
//! - Time: CUDA events around each call, after `WARMUP` untimed calls; before every timed run
//!   the L2 is flushed by copying a buffer of 4x the L2 into another (every line read and
//!   written, so no dirty line of the op's own data is left to be written back inside the timed
//!   region) and the host waits for it; the median of `MIN_RUNS..=MAX_RUNS` runs (as many as
//!   fit in `TARGET_MS` per op) is reported, with the minimum and the 90th percentile.
//! - Ops: training forward, eval forward, training backward, eval backward, the fused
//!   `relu(BN(x) + z)` forward and backward; on small shapes also the first three replayed from
//!   a CUDA graph of `GRAPH_CALLS` calls (warm L2, no host in the loop: launch cost). The
//!   statistics pass alone is reported as forward minus eval. `--quick`: issue 16's six shapes,
//!   forward, eval and backward each, and no folds or other norms.
//! - Yardstick: a 1 GiB device-to-device copy, bytes read + bytes written, median of 30.
//! - Bandwidth: bytes over the median time, under two models of the traffic, in passes over the
//!   activation tensor: minimal (each input read once, each output written once) and practical,
//!   what our kernels move (`Op::passes`). A small tensor can stay in L2 between the passes of
//!   one call, so its practical figure can exceed the copy bandwidth: that is the cache, not HBM.
//! - Check: before the timed runs each op runs once on outputs poisoned with NaN; every element
//!   of every output must then be finite (all were written), and the outputs are compared with
//!   the CPU reference (f64, rounded once). The reference sees the whole tensor when it has at
//!   most 2^22 elements or at most 8 channels; otherwise 8 channels spread over C (first and last
//!   included), gathered into a smaller tensor of the same layout: channels are independent, so
//!   the reference on that subset gives exactly those channels' results. `rel_err` is the
//!   largest `|out - ref|_2 / |ref|_2` over the op's outputs (y or dx, and the per-channel
//!   statistics or gradients), `max_abs_err` the largest difference in y or dx; `ok` when every
//!   element was written and `rel_err` is within a few roundings of the dtype (`tolerance`).

use batchnorm_cuda::epilogue::mask_words;
use batchnorm_cuda::fold::{FoldKind, FoldSpec};
use batchnorm_cuda::gpu::functional::{
    self, FoldBatchNorm, GradientsMut, RunningStats, RunningUpdate, SavedStats, SavedStatsMut,
};
use batchnorm_cuda::gpu::{GpuContext, Workspace};
use batchnorm_cuda::{reference, DType, Element, Layout, RunningVarUpdate, TensorDesc};
use cudarc::driver::{sys, CudaEvent, CudaSlice, CudaStream, DevicePtrMut, DeviceRepr};
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

/// Each buffer of the L2 flush (one read, one written between timed runs) is this many times
/// the device's L2 (H200: 60 MB, so 240 MB read and 240 MB written)...
const FLUSH_L2_MULTIPLE: usize = 4;
/// ...and at least this large.
const MIN_FLUSH_BYTES: usize = 64 << 20;
/// Calls captured back to back in each CUDA graph of the graph rows.
const GRAPH_CALLS: usize = 20;
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
    /// The backward of an eval forward (running statistics are constants).
    EvalBwd,
    /// The training forward in one pass, keeping the tensor on chip (opted in on the context:
    /// `GpuContext::with_single_pass_forward`); rows only where it applies
    /// ([`with_single_pass`]).
    SinglePassFwd,
    /// `y = relu(BN(x) + z)` with its mask, and its backward (`dx`, `dz`, parameter gradients).
    AddReluFwd,
    AddReluBwd,
    /// The op replayed from a CUDA graph of back-to-back calls: launch cost, warm L2.
    Graph(GraphOp),
    Fold,
    /// A training forward (batch statistics) or backward of another normalization.
    Norm {
        kind: batchnorm_cuda::norms::NormKind,
        backward: bool,
    },
}

/// The ops a graph row replays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GraphOp {
    Fwd,
    Eval,
    Bwd,
}

/// The ops of the quick set and of every batch-norm shape.
const TRAIN_EVAL: &[Op] = &[Op::Fwd, Op::Eval, Op::Bwd];
/// The full suite's ops on the main shapes.
const ALL_BN_OPS: &[Op] = &[
    Op::Fwd,
    Op::Eval,
    Op::Bwd,
    Op::EvalBwd,
    Op::AddReluFwd,
    Op::AddReluBwd,
];
/// The small shapes' ops: plain, and replayed from a CUDA graph.
const GRAPH_OPS: &[Op] = &[
    Op::Fwd,
    Op::Eval,
    Op::Bwd,
    Op::Graph(GraphOp::Fwd),
    Op::Graph(GraphOp::Eval),
    Op::Graph(GraphOp::Bwd),
];

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Fwd => "bn_fwd",
            Op::SinglePassFwd => "bn_fwd_single_pass",
            Op::Eval => "bn_eval",
            Op::Bwd => "bn_bwd",
            Op::EvalBwd => "bn_eval_bwd",
            Op::AddReluFwd => "bn_add_relu_fwd",
            Op::AddReluBwd => "bn_add_relu_bwd",
            Op::Graph(GraphOp::Fwd) => "bn_fwd_graph",
            Op::Graph(GraphOp::Eval) => "bn_eval_graph",
            Op::Graph(GraphOp::Bwd) => "bn_bwd_graph",
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

    /// The op a graph row replays; every other op is its own.
    fn plain(self) -> Op {
        match self {
            Op::Graph(GraphOp::Fwd) => Op::Fwd,
            Op::Graph(GraphOp::Eval) => Op::Eval,
            Op::Graph(GraphOp::Bwd) => Op::Bwd,
            other => other,
        }
    }

    fn is_graph(self) -> bool {
        matches!(self, Op::Graph(_))
    }

    /// Bytes of a batch-norm op on `numel` elements of `size` bytes, (minimal, practical):
    /// passes over the tensor, plus the fused rows' 1-bit mask (written once, read by the
    /// backward's two passes).
    fn bytes(self, numel: u64, size: u64) -> (u64, u64) {
        let (lo, hi) = self.passes();
        let mask = numel.div_ceil(32) * 4;
        let (mask_lo, mask_hi) = match self.plain() {
            Op::AddReluFwd => (mask, mask),
            Op::AddReluBwd => (mask, 2 * mask),
            _ => (0, 0),
        };
        (lo * numel * size + mask_lo, hi * numel * size + mask_hi)
    }

    /// Passes over the tensor (the activation, or the fold's weight): (minimal, practical).
    fn passes(self) -> (u64, u64) {
        match self.plain() {
            Op::Fwd => (2, 3),
            // x read once into shared memory, y written from it.
            Op::Eval | Op::Fold | Op::SinglePassFwd => (2, 2),
            Op::Bwd => (3, 5),
            // Eval backward: x and dy read, dx written; ours: the reduce (x, dy), then dx (dy, dx).
            Op::EvalBwd => (3, 4),
            // x and z read, y written; ours: statistics (x), then normalize (x, z, y).
            Op::AddReluFwd => (3, 4),
            // x and dy read, dx and dz written; ours: reduce (x, dy), then dx (x, dy, dx, dz).
            Op::AddReluBwd => (4, 6),
            Op::Graph(_) => unreachable!("plain() never gives a graph op"),
            // Forward: x read twice (statistics, then normalize from L1/L2 or HBM).
            Op::Norm {
                backward: false, ..
            } => (2, 3),
            // Backward: row sums (x, dy), dx (x, dy, dx), parameter sums (x, dy).
            Op::Norm { backward: true, .. } => (3, 7),
        }
    }
}

/// Largest tensor the single-pass forward gets a row for: on an H100/H200 (132 SMs, 227 KB of
/// shared memory per block) a tensor of this size fits on chip even with its channel tiles
/// padded (bench/PLAN.md); a larger one would take the two passes.
const SINGLE_PASS_MAX_BYTES: usize = 13_000_000;

/// `case.ops` in `layout` and `dtype`, with a single-pass row after the training forward's
/// where it applies: channels-last or `(N, C)`, at most [`SINGLE_PASS_MAX_BYTES`]
/// (`bench/pytorch_bench.py`'s `with_single_pass` is the same rule).
fn with_single_pass(case: &BnCase, layout: Layout, dtype: DType) -> Vec<Op> {
    let rows = case.dims.len() == 2 || layout == Layout::ChannelsLast;
    let bytes = case.dims.iter().product::<usize>() * dtype.size_of();
    let single = rows && bytes <= SINGLE_PASS_MAX_BYTES;
    case.ops
        .iter()
        .flat_map(|&op| {
            std::iter::once(op).chain((single && op == Op::Fwd).then_some(Op::SinglePassFwd))
        })
        .collect()
}

/// One batch-norm shape of the suite, the layouts and dtypes it runs in (rank-2 shapes in one
/// layout only: both are the same) and its ops.
struct BnCase {
    suite: &'static str,
    dims: Vec<usize>,
    layouts: Vec<Layout>,
    dtypes: Vec<DType>,
    ops: &'static [Op],
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

/// The shapes of the quick set (issue 16's), each in one dtype and layout:
/// (suite, dims, layout, dtype).
const QUICK: [(&str, &[usize], Layout, DType); 6] = [
    (
        "resnet50",
        &[256, 64, 112, 112],
        Layout::ChannelsFirst,
        DType::F16,
    ),
    (
        "small_c",
        &[32, 2, 512, 512],
        Layout::ChannelsFirst,
        DType::F32,
    ),
    (
        "resnet50",
        &[256, 64, 56, 56],
        Layout::ChannelsLast,
        DType::F16,
    ),
    (
        "resnet50",
        &[32, 256, 56, 56],
        Layout::ChannelsLast,
        DType::F16,
    ),
    (
        "resnet50",
        &[64, 2048, 7, 7],
        Layout::ChannelsFirst,
        DType::F32,
    ),
    ("bn1d", &[100000, 32], Layout::ChannelsFirst, DType::F32),
];

fn bn_suite(quick: bool) -> Vec<BnCase> {
    let quick_cases = QUICK.iter().map(|&(suite, dims, layout, dtype)| BnCase {
        suite,
        dims: dims.to_vec(),
        layouts: vec![layout],
        dtypes: vec![dtype],
        ops: if quick { TRAIN_EVAL } else { ALL_BN_OPS },
    });
    if quick {
        return quick_cases.collect();
    }
    let case = |suite, dims: &[usize], ops| BnCase {
        suite,
        dims: dims.to_vec(),
        layouts: if dims.len() == 2 {
            vec![Layout::ChannelsFirst]
        } else {
            vec![Layout::ChannelsFirst, Layout::ChannelsLast]
        },
        dtypes: DType::ALL.to_vec(),
        ops,
    };
    let mut cases: Vec<BnCase> = quick_cases.collect();
    for (n, ops) in [(32, ALL_BN_OPS), (128, TRAIN_EVAL)] {
        for [c, h, w] in RESNET50_CHW {
            cases.push(case("resnet50", &[n, c, h, w], ops));
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
        cases.push(case("small_c", dims, ALL_BN_OPS));
    }
    // Channel counts no vector width divides: the scalar paths.
    for dims in [&[32, 100, 14, 14][..], &[64, 255, 7, 7], &[1024, 33]] {
        cases.push(case("odd_c", dims, ALL_BN_OPS));
    }
    cases.push(case("wide", &[256, 2048, 7, 7], TRAIN_EVAL));
    cases.push(case("bn1d", &[4096, 1024], ALL_BN_OPS));
    // Small shapes, where launch cost shows: also replayed from CUDA graphs.
    for dims in [&[256, 512][..], &[8, 64, 14, 14], &[8, 256, 7, 7]] {
        cases.push(case("graph", dims, GRAPH_OPS));
    }
    cases
}

fn fold_suite() -> Vec<FoldCase> {
    let fold = |kind, shape, groups| FoldCase {
        kind,
        shape,
        groups,
    };
    vec![
        fold(FoldKind::Conv, &[64, 3, 7, 7], 1),
        fold(FoldKind::Conv, &[256, 64, 1, 1], 1),
        fold(FoldKind::Conv, &[512, 512, 3, 3], 1),
        fold(FoldKind::Conv, &[2048, 1024, 1, 1], 1),
        fold(FoldKind::Conv, &[512, 1, 3, 3], 512),
        fold(FoldKind::ConvTranspose, &[512, 256, 4, 4], 1),
        fold(FoldKind::Linear, &[1000, 2048], 1),
    ]
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
    /// The timing of one of `calls` calls that ran as one measured unit.
    fn per_call(self, calls: usize) -> Self {
        let k = calls as f64;
        Self {
            median_us: self.median_us / k,
            min_us: self.min_us / k,
            p90_us: self.p90_us / k,
            runs: self.runs,
        }
    }

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

/// CUDA-event timing, with an L2 flush before every run (or none: [`Timer::time_warm`]).
struct Timer {
    stream: Arc<CudaStream>,
    /// The flush: `flush.0` copied into `flush.1`, each `flush_bytes` long.
    flush: (CudaSlice<u8>, CudaSlice<u8>),
    flush_bytes: usize,
    flush_ms: f64,
    events: Vec<(CudaEvent, CudaEvent)>,
}

impl Timer {
    /// `l2_bytes`: the device's L2, which sizes the flush.
    fn new(gpu: &GpuContext, l2_bytes: usize) -> BoxResult<Self> {
        let stream = gpu.stream().clone();
        let flush_bytes = flush_bytes(l2_bytes);
        let flush = (
            stream.alloc_zeros::<u8>(flush_bytes)?,
            stream.alloc_zeros::<u8>(flush_bytes)?,
        );
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let events = (0..MAX_RUNS)
            .map(|_| Ok((gpu.cuda().new_event(timing)?, gpu.cuda().new_event(timing)?)))
            .collect::<BoxResult<Vec<_>>>()?;
        let mut timer = Self {
            stream,
            flush,
            flush_bytes,
            flush_ms: 0.0,
            events,
        };
        // The flush's own time sizes the loop; it is never inside a timed region.
        timer.flush()?;
        let (start, end) = &timer.events[0];
        start.record(&timer.stream)?;
        let (src, dst) = &mut timer.flush;
        timer.stream.memcpy_dtod(src, dst)?;
        end.record(&timer.stream)?;
        timer.flush_ms = f64::from(start.elapsed_ms(end)?);
        Ok(timer)
    }

    /// Evicts the L2: reads one buffer and writes another, each larger than twice the L2 (a
    /// copy, so no dirty line of the timed op's inputs or outputs is left to be written back
    /// inside the next timed region), then waits for it on the host.
    fn flush(&mut self) -> BoxResult<()> {
        let (src, dst) = &mut self.flush;
        self.stream.memcpy_dtod(src, dst)?;
        self.stream.synchronize()?;
        Ok(())
    }

    /// Median (and spread) of `op` over cold-L2 runs.
    fn time(&mut self, op: impl FnMut() -> BoxResult<()>) -> BoxResult<Timing> {
        self.measure(true, op)
    }

    /// Median (and spread) of `op` over back-to-back runs: warm L2, as in a CUDA-graph replay
    /// loop; for launch cost.
    fn time_warm(&mut self, op: impl FnMut() -> BoxResult<()>) -> BoxResult<Timing> {
        self.measure(false, op)
    }

    fn measure(&mut self, cold: bool, mut op: impl FnMut() -> BoxResult<()>) -> BoxResult<Timing> {
        self.flush()?;
        let (start, end) = &self.events[0];
        start.record(&self.stream)?;
        for _ in 0..WARMUP {
            op()?;
        }
        end.record(&self.stream)?;
        let estimate_ms = f64::from(start.elapsed_ms(end)?) / WARMUP as f64;
        let flush_ms = if cold { self.flush_ms } else { 0.0 };
        let runs = ((TARGET_MS / (estimate_ms + flush_ms)) as usize).clamp(MIN_RUNS, MAX_RUNS);
        for k in 0..runs {
            if cold {
                self.flush()?;
            }
            let (start, end) = &self.events[k];
            start.record(&self.stream)?;
            op()?;
            end.record(&self.stream)?;
        }
        self.stream.synchronize()?;
        let ms = self.events[..runs]
            .iter()
            .map(|(s, e)| Ok(f64::from(s.elapsed_ms(e)?)))
            .collect::<BoxResult<Vec<_>>>()?;
        Ok(Timing::from_ms(ms))
    }
}

/// Bytes of each of the flush's two buffers: `FLUSH_L2_MULTIPLE` times the L2, at least
/// `MIN_FLUSH_BYTES` (a device that reports no L2).
fn flush_bytes(l2_bytes: usize) -> usize {
    (FLUSH_L2_MULTIPLE * l2_bytes).max(MIN_FLUSH_BYTES)
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
#[derive(Clone)]
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

/// The rows of `ops` (some of `case.ops`) in one dtype and layout, with their results.
fn bn_rows(
    case: &BnCase,
    ops: &[Op],
    layout: Layout,
    dtype: DType,
    results: Vec<Result<(Timing, Check), String>>,
) -> Vec<Row> {
    let numel = case.dims.iter().product::<usize>() as u64;
    ops.iter()
        .zip(results)
        .map(|(&op, result)| Row {
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
            bytes: op.bytes(numel, dtype.size_of() as u64),
            result,
        })
        .collect()
}

fn bench_bn<T: Element>(env: &mut Env, case: &BnCase, ops: &[Op], layout: Layout) -> Vec<Row> {
    let results = match TensorDesc::new(&case.dims, layout)
        .map_err(Into::into)
        .and_then(|desc| run_bn::<T>(env, &desc, ops))
    {
        Ok(results) => results.into_iter().map(Ok).collect(),
        Err(e) => vec![Err(e.to_string()); ops.len()],
    };
    bn_rows(case, ops, layout, T::DTYPE, results)
}

/// The device buffers of one batch-norm shape: inputs, outputs, statistics and gradients.
struct BnBuffers<T: DeviceRepr> {
    desc: TensorDesc,
    x: CudaSlice<T>,
    dy: CudaSlice<T>,
    /// The residual of the fused rows (`None` when no fused op runs).
    z: Option<CudaSlice<T>>,
    weight: CudaSlice<f32>,
    bias: CudaSlice<f32>,
    running_mean: CudaSlice<f32>,
    running_var: CudaSlice<f32>,
    eval_mean: CudaSlice<f32>,
    eval_var: CudaSlice<f32>,
    y: CudaSlice<T>,
    dx: CudaSlice<T>,
    dz: Option<CudaSlice<T>>,
    mask: Option<CudaSlice<u32>>,
    saved: [CudaSlice<f32>; 3],
    dweight: CudaSlice<f32>,
    dbias: CudaSlice<f32>,
}

impl<T: Element> BnBuffers<T> {
    /// One call of a plain op (`op.plain()`), queued on `gpu`'s stream.
    fn run(&mut self, gpu: &GpuContext, ws: &mut Workspace, op: Op) -> BoxResult<()> {
        let fused = matches!(op.plain(), Op::AddReluFwd | Op::AddReluBwd);
        let running = || RunningStats {
            mean: self.eval_mean.as_view(),
            var: self.eval_var.as_view(),
        };
        let single;
        let gpu = if op == Op::SinglePassFwd {
            single = gpu.with_single_pass_forward(true);
            if !single.single_pass_forward_fits(&self.desc, T::DTYPE)? {
                return Err("the single-pass forward does not fit on this device".into());
            }
            &single
        } else {
            gpu
        };
        match op.plain() {
            Op::Fwd | Op::AddReluFwd | Op::SinglePassFwd => {
                let [sm, sl, si] = &mut self.saved;
                let epilogue = match (&self.z, &mut self.mask) {
                    (Some(z), Some(mask)) if fused => functional::Epilogue::AddRelu {
                        z: z.as_view(),
                        mask: Some(mask.as_view_mut()),
                    },
                    _ => functional::Epilogue::None,
                };
                let stats = functional::ForwardStats::Batch(functional::BatchStats {
                    saved: SavedStatsMut {
                        mean: sm.as_view_mut(),
                        mean_lo: sl.as_view_mut(),
                        invstd: si.as_view_mut(),
                    },
                    running: Some(RunningUpdate {
                        mean: self.running_mean.as_view_mut(),
                        var: self.running_var.as_view_mut(),
                        factor: MOMENTUM,
                        var_update: RunningVarUpdate::Unbiased,
                    }),
                    eps: EPS,
                });
                let request = functional::Forward {
                    desc: self.desc,
                    x: self.x.as_view(),
                    weight: Some(self.weight.as_view()),
                    bias: Some(self.bias.as_view()),
                    stats,
                    y: self.y.as_view_mut(),
                    epilogue,
                };
                functional::forward(gpu, ws, request)?;
            }
            Op::Eval => {
                let request = functional::Forward {
                    desc: self.desc,
                    x: self.x.as_view(),
                    weight: Some(self.weight.as_view()),
                    bias: Some(self.bias.as_view()),
                    stats: functional::ForwardStats::Running {
                        stats: running(),
                        eps: EPS,
                    },
                    y: self.y.as_view_mut(),
                    epilogue: functional::Epilogue::None,
                };
                functional::forward(gpu, ws, request)?;
            }
            Op::Bwd | Op::EvalBwd | Op::AddReluBwd => {
                let [sm, sl, si] = &self.saved;
                let stats = if op.plain() == Op::EvalBwd {
                    functional::BackwardStats::Running {
                        stats: running(),
                        eps: EPS,
                    }
                } else {
                    functional::BackwardStats::Batch(SavedStats {
                        mean: sm.as_view(),
                        mean_lo: Some(sl.as_view()),
                        invstd: si.as_view(),
                    })
                };
                let epilogue = match (&self.mask, &mut self.dz) {
                    (Some(mask), Some(dz)) if fused => functional::EpilogueGrad::AddRelu {
                        mask: mask.as_view(),
                        dz: Some(dz.as_view_mut()),
                    },
                    _ => functional::EpilogueGrad::None,
                };
                let request = functional::Backward {
                    desc: self.desc,
                    x: self.x.as_view(),
                    dy: self.dy.as_view(),
                    weight: Some(self.weight.as_view()),
                    stats,
                    grads: GradientsMut {
                        dx: Some(self.dx.as_view_mut()),
                        dweight: Some(self.dweight.as_view_mut()),
                        dbias: Some(self.dbias.as_view_mut()),
                        accumulate: false,
                    },
                    epilogue,
                };
                functional::backward(gpu, ws, request)?;
            }
            other => unreachable!("{other:?} is not a plain batch-norm op"),
        }
        Ok(())
    }
}

/// The host inputs of one shape and the subset of channels the reference checks.
struct BnHost<T> {
    x: Vec<T>,
    dy: Vec<T>,
    z: Option<Vec<T>>,
    weight: Vec<f32>,
    bias: Vec<f32>,
    rm_eval: Vec<f32>,
    rv_eval: Vec<f32>,
}

/// Checks each op once on poisoned outputs, then times each; results in `ops`' order.
fn run_bn<T: Element>(
    env: &mut Env,
    desc: &TensorDesc,
    ops: &[Op],
) -> BoxResult<Vec<(Timing, Check)>> {
    let Env {
        gpu,
        timer,
        workspace,
    } = env;
    let gpu = &*gpu;
    let stream = gpu.stream().clone();
    let (n, c) = (desc.numel(), desc.channels());
    let fused = ops
        .iter()
        .any(|op| matches!(op.plain(), Op::AddReluFwd | Op::AddReluBwd));
    let phase = Instant::now();

    let host = BnHost::<T> {
        x: generate(desc, 1, channel_mean, channel_std),
        dy: generate(desc, 2, |c| 0.1 * channel_mean(c), |_| 1.0),
        z: fused.then(|| generate(desc, 12, |_| 0.5, |_| 1.0)),
        weight: per_channel(c, |c| 0.75 + 0.5 * unit(3, c)),
        bias: per_channel(c, |c| unit(4, c) - 0.5),
        // Eval statistics near the data's, as in a trained network, so y stays O(1).
        rm_eval: per_channel(c, |c| channel_mean(c) + 0.1 * (unit(5, c) - 0.5)),
        rv_eval: per_channel(c, |c| channel_std(c).powi(2) * (0.8 + 0.4 * unit(6, c))),
    };
    let (rm0, rv0) = (vec![0.0f32; c], vec![1.0f32; c]);
    let mut bufs = BnBuffers::<T> {
        desc: *desc,
        x: stream.clone_htod(&host.x)?,
        dy: stream.clone_htod(&host.dy)?,
        z: host.z.as_ref().map(|z| stream.clone_htod(z)).transpose()?,
        weight: stream.clone_htod(&host.weight)?,
        bias: stream.clone_htod(&host.bias)?,
        running_mean: stream.clone_htod(&rm0)?,
        running_var: stream.clone_htod(&rv0)?,
        eval_mean: stream.clone_htod(&host.rm_eval)?,
        eval_var: stream.clone_htod(&host.rv_eval)?,
        y: stream.alloc_zeros::<T>(n)?,
        dx: stream.alloc_zeros::<T>(n)?,
        dz: fused.then(|| stream.alloc_zeros::<T>(n)).transpose()?,
        mask: fused
            .then(|| stream.alloc_zeros::<u32>(mask_words(desc)))
            .transpose()?,
        saved: [
            stream.alloc_zeros::<f32>(c)?,
            stream.alloc_zeros::<f32>(c)?,
            stream.alloc_zeros::<f32>(c)?,
        ],
        dweight: stream.alloc_zeros::<f32>(c)?,
        dbias: stream.alloc_zeros::<f32>(c)?,
    };
    let setup_s = phase.elapsed().as_secs_f64();

    // One checked call of each plain op, on poisoned outputs, in dependency order: the
    // backwards read the saved statistics (and mask) their forward left.
    let phase = Instant::now();
    let subset = Subset::new(desc)?;
    let mut checks: Vec<(Op, Check)> = Vec::new();
    let order = [
        Op::Fwd,
        Op::SinglePassFwd,
        Op::Eval,
        Op::Bwd,
        Op::EvalBwd,
        Op::AddReluFwd,
        Op::AddReluBwd,
    ];
    let mut reference = Reference::new(&host, &subset);
    for op in order {
        let wanted = ops.iter().any(|o| o.plain() == op);
        // The training backwards need a training forward before them.
        let needed = match op {
            Op::Fwd => ops.iter().any(|o| o.plain() == Op::Bwd),
            Op::AddReluFwd => ops.iter().any(|o| o.plain() == Op::AddReluBwd),
            _ => false,
        };
        if !(wanted || needed) {
            continue;
        }
        let check = check_op(gpu, workspace, &mut bufs, &mut reference, op)?;
        checks.push((op, check));
    }
    let check_s = phase.elapsed().as_secs_f64();

    // Timed runs. The running statistics keep updating, as in training; the backwards reuse
    // the saved statistics and mask of the last forward.
    let phase = Instant::now();
    let mut results = Vec::new();
    for &op in ops {
        let check = checks
            .iter()
            .find(|(o, _)| *o == op.plain())
            .map(|(_, c)| c.clone())
            .expect("every op was checked");
        let timing = if op.is_graph() {
            time_graph(gpu, timer, &mut bufs, op)?
        } else {
            timer.time(|| bufs.run(gpu, workspace, op))?
        };
        results.push((timing, check));
    }
    println!(
        "  {} {}/{}: setup {setup_s:.2} s, check {check_s:.2} s ({} of {} channels), time {:.2} s",
        dims_name(desc.dims()),
        T::DTYPE,
        desc.layout(),
        subset.channels.len(),
        c,
        phase.elapsed().as_secs_f64()
    );
    Ok(results)
}

/// Times `op` replayed from a CUDA graph of `GRAPH_CALLS` back-to-back calls on a workspace of
/// its own (reserved before the capture): launch cost without the host, warm L2.
fn time_graph<T: Element>(
    gpu: &GpuContext,
    timer: &mut Timer,
    bufs: &mut BnBuffers<T>,
    op: Op,
) -> BoxResult<Timing> {
    let mut ws = Workspace::new();
    ws.reserve_for(gpu, &bufs.desc, T::DTYPE)?;
    let stream = gpu.stream();
    stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    let captured = (0..GRAPH_CALLS).try_for_each(|_| bufs.run(gpu, &mut ws, op));
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    captured?;
    let graph = graph?.ok_or("the capture recorded no graph")?;
    let per_replay = timer.time_warm(|| Ok(graph.launch()?))?;
    Ok(per_replay.per_call(GRAPH_CALLS))
}

/// The CPU reference's results on the checked channels, computed as the checks need them.
struct Reference<T> {
    x: Vec<T>,
    dy: Vec<T>,
    z: Option<Vec<T>>,
    weight: Vec<f32>,
    bias: Vec<f32>,
    rm_eval: Vec<f32>,
    rv_eval: Vec<f32>,
    saved: Option<reference::SavedStats>,
    mask: Option<Vec<u32>>,
    subset: Subset,
}

impl<T: Element> Reference<T> {
    fn new(host: &BnHost<T>, subset: &Subset) -> Self {
        Self {
            x: subset.gather(&host.x),
            dy: subset.gather(&host.dy),
            z: host.z.as_ref().map(|z| subset.gather(z)),
            weight: subset.pick(&host.weight),
            bias: subset.pick(&host.bias),
            rm_eval: subset.pick(&host.rm_eval),
            rv_eval: subset.pick(&host.rv_eval),
            saved: None,
            mask: None,
            subset: subset.clone(),
        }
    }
}

/// Runs `op` once on poisoned outputs and compares them with the reference on the checked
/// channels.
fn check_op<T: Element>(
    gpu: &GpuContext,
    ws: &mut Workspace,
    bufs: &mut BnBuffers<T>,
    r: &mut Reference<T>,
    op: Op,
) -> BoxResult<Check> {
    let stream = gpu.stream().clone();
    let subset = r.subset.clone();
    let m = subset.desc.numel();
    let mut check = Check::new(T::DTYPE, &subset);
    let (w, b) = (Some(&r.weight[..]), Some(&r.bias[..]));
    let eval_stats = |r: &Reference<T>| (r.rm_eval.clone(), r.rv_eval.clone());
    match op {
        Op::Fwd | Op::AddReluFwd | Op::SinglePassFwd => {
            poison(&stream, &mut bufs.y)?;
            // The running statistics start from PyTorch's initial values at every check.
            stream.memcpy_htod(&vec![0.0f32; bufs.desc.channels()], &mut bufs.running_mean)?;
            stream.memcpy_htod(&vec![1.0f32; bufs.desc.channels()], &mut bufs.running_var)?;
            bufs.run(gpu, ws, op)?;
            let y_gpu = download(&stream, &bufs.y)?;
            check.written(&y_gpu);
            let (mut rm, mut rv) = (vec![0.0f32; r.weight.len()], vec![1.0f32; r.weight.len()]);
            let mut y_ref = vec![T::default(); m];
            let running = Some(reference::RunningUpdate::pytorch(
                &mut rm, &mut rv, MOMENTUM,
            ));
            let saved = if op != Op::AddReluFwd {
                reference::forward_training(&r.x, &subset.desc, w, b, running, EPS, &mut y_ref)?
            } else {
                let mut mask = vec![0u32; mask_words(&subset.desc)];
                let z = r.z.as_deref().ok_or("no residual")?;
                let request = reference::fused::Forward {
                    desc: subset.desc,
                    x: &r.x,
                    weight: w,
                    bias: b,
                    y: &mut y_ref,
                    epilogue: batchnorm_cuda::epilogue::Epilogue::AddRelu {
                        z,
                        mask: Some(&mut mask),
                    },
                };
                let saved = reference::fused::forward_training(request, running, EPS)?;
                r.mask = Some(mask);
                saved
            };
            check.compare(&subset.gather(&y_gpu), &y_ref, true);
            let [sm, _, si] = &bufs.saved;
            let per_channel_outputs = [
                (sm, &saved.mean),
                (si, &saved.invstd),
                (&bufs.running_mean, &rm),
                (&bufs.running_var, &rv),
            ];
            for (gpu_values, want) in per_channel_outputs {
                check.compare(&subset.pick(&download(&stream, gpu_values)?), want, false);
            }
            r.saved = Some(saved);
        }
        Op::Eval => {
            poison(&stream, &mut bufs.y)?;
            bufs.run(gpu, ws, op)?;
            let y_gpu = download(&stream, &bufs.y)?;
            check.written(&y_gpu);
            let mut y_ref = vec![T::default(); m];
            let (mean, var) = eval_stats(r);
            let running = reference::RunningStats {
                mean: &mean,
                var: &var,
            };
            reference::forward_inference(&r.x, &subset.desc, w, b, running, EPS, &mut y_ref)?;
            check.compare(&subset.gather(&y_gpu), &y_ref, true);
        }
        Op::Bwd | Op::EvalBwd | Op::AddReluBwd => {
            poison(&stream, &mut bufs.dx)?;
            poison(&stream, &mut bufs.dweight)?;
            poison(&stream, &mut bufs.dbias)?;
            if let Some(dz) = bufs.dz.as_mut() {
                poison(&stream, dz)?;
            }
            bufs.run(gpu, ws, op)?;
            let dx_gpu = download(&stream, &bufs.dx)?;
            let (dw_gpu, db_gpu) = (
                download(&stream, &bufs.dweight)?,
                download(&stream, &bufs.dbias)?,
            );
            check.written(&dx_gpu);
            check.written(&dw_gpu);
            check.written(&db_gpu);
            let c = r.weight.len();
            let (mut dx_ref, mut dw_ref, mut db_ref) =
                (vec![T::default(); m], vec![0f32; c], vec![0f32; c]);
            let mut dz_ref = vec![T::default(); m];
            let grads = reference::Gradients {
                dx: Some(&mut dx_ref),
                dweight: Some(&mut dw_ref),
                dbias: Some(&mut db_ref),
                accumulate: false,
            };
            let saved = r.saved.as_ref().ok_or("no forward ran before the backward");
            match op {
                Op::Bwd => {
                    reference::backward_training(&r.x, &r.dy, &subset.desc, w, saved?, grads)?
                }
                Op::EvalBwd => {
                    let (mean, var) = eval_stats(r);
                    let running = reference::RunningStats {
                        mean: &mean,
                        var: &var,
                    };
                    reference::backward_inference(
                        &r.x,
                        &r.dy,
                        &subset.desc,
                        w,
                        running,
                        EPS,
                        grads,
                    )?
                }
                _ => {
                    let mask = r.mask.as_deref().ok_or("no fused forward ran")?;
                    let request = reference::fused::Backward {
                        desc: subset.desc,
                        x: &r.x,
                        dy: &r.dy,
                        weight: w,
                        grads,
                        epilogue: batchnorm_cuda::epilogue::EpilogueGrad::AddRelu {
                            mask,
                            dz: Some(&mut dz_ref),
                        },
                    };
                    reference::fused::backward_training(request, saved?)?
                }
            }
            check.compare(&subset.gather(&dx_gpu), &dx_ref, true);
            check.compare(&subset.pick(&dw_gpu), &dw_ref, false);
            check.compare(&subset.pick(&db_gpu), &db_ref, false);
            if let (Op::AddReluBwd, Some(dz)) = (op, bufs.dz.as_ref()) {
                let dz_gpu = download(&stream, dz)?;
                check.written(&dz_gpu);
                check.compare(&subset.gather(&dz_gpu), &dz_ref, true);
            }
        }
        other => unreachable!("{other:?} is not a plain batch-norm op"),
    }
    Ok(check)
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
    flush_bytes: usize,
    driver_cuda: Option<i32>,
    copy_gbs: f64,
    copy: Timing,
    quick: bool,
    filter: Option<String>,
    dry_run: bool,
}

/// The statistics pass alone of a training-forward row: its time minus the eval forward's of
/// the same shape, dtype and layout (us), and that pass's GB/s (one read of x).
fn stats_pass(row: &Row, rows: &[Row]) -> Option<(f64, f64)> {
    if row.op != Op::Fwd {
        return None;
    }
    let eval_name = row.name.replacen(Op::Fwd.name(), Op::Eval.name(), 1);
    let eval = rows.iter().find(|r| r.name == eval_name)?;
    let (Ok((fwd, _)), Ok((eval, _))) = (&row.result, &eval.result) else {
        return None;
    };
    let us = fwd.median_us - eval.median_us;
    let read = row.bytes.0 as f64 / 2.0;
    Some((us, read / (us * 1e-6) / 1e9))
}

fn row_json(row: &Row, rows: &[Row], copy_gbs: f64) -> Value {
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
        "stats_pass_us": stats_pass(row, rows).map(|(us, _)| us),
        "stats_pass_gbs": stats_pass(row, rows).map(|(_, gbs)| gbs),
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
            "l2_flush": "a device-to-device copy of l2_flush_bytes into a second buffer, then a host synchronize, before every timed run (graph rows: none)",
            "l2_flush_bytes": h.flush_bytes,
            "graph_calls": GRAPH_CALLS,
            "eps": shortest(EPS),
            "momentum": shortest(MOMENTUM),
            "passes_min": "fwd 2, eval 2, bwd 3, eval_bwd 3, add_relu_fwd 3 + mask, add_relu_bwd 4 + mask, fold 2 (weight)",
            "passes_practical": "fwd 3, eval 2, bwd 5, eval_bwd 4, add_relu_fwd 4 + mask, add_relu_bwd 6 + 2 masks, fold 2 (weight)",
            "stats_pass": "bn_fwd minus bn_eval of the same shape: the statistics pass alone (one read of x)",
        },
        "copy_bytes": 2 * COPY_BYTES,
        "copy_time_us": h.copy.median_us,
        "copy_gbs": h.copy_gbs,
        "rows": rows.iter().map(|r| row_json(r, rows, h.copy_gbs)).collect::<Vec<_>>(),
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
         calls; before each run the L2 is flushed by copying {} MiB into a second buffer (read \
         and written), then a host synchronize. `_graph` rows: {GRAPH_CALLS} back-to-back calls \
         replayed from one CUDA graph, warm L2, time per call. GB/s: bytes over the median time, \
         minimal model (each input read once, each output written once: fwd 2 passes, eval 2, \
         bwd 3, eval_bwd 3, add_relu fwd 3 / bwd 4 + the 1-bit mask) / practical model of our \
         kernels (fwd 3, eval 2, bwd 5, eval_bwd 4, add_relu 4 / 6); % copy: each of the two over \
         the copy yardstick. Errors against the CPU reference; `rel` is the largest relative L2 \
         error over the op's outputs.\n",
        h.flush_bytes >> 20
    );
    write_stats_pass(&mut md, h, rows);
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

/// The statistics pass alone (forward minus eval) of every shape with both rows measured.
fn write_stats_pass(md: &mut String, h: &Header, rows: &[Row]) {
    let passes: Vec<(&Row, (f64, f64))> = rows
        .iter()
        .filter_map(|r| Some((r, stats_pass(r, rows)?)))
        .collect();
    if passes.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "## Statistics pass alone (bn_fwd minus bn_eval)\n\nOne read of x, so its % copy is \
         against a yardstick that also writes: comparison.md sets it against PyTorch's read-only \
         yardstick. Where the merge tail of the split reduction shows.\n"
    );
    let _ = writeln!(md, "| name | us | GB/s (read) | % copy |");
    let _ = writeln!(md, "| --- | ---: | ---: | ---: |");
    for (row, (us, gbs)) in passes {
        let _ = writeln!(
            md,
            "| {} | {us:.1} | {gbs:.0} | {:.0}% |",
            row.name.replacen(Op::Fwd.name(), "bn_stats_pass", 1),
            100.0 * gbs / h.copy_gbs
        );
    }
    md.push('\n');
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
  --quick        the quick set: issue 16's six batch-norm shapes, fwd/eval/bwd each
  --filter TEXT  only rows whose name contains TEXT, or one of its comma-separated parts
                 (e.g. bn_fwd/f16,bn_bwd_graph)
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
        let opening = Instant::now();
        match GpuContext::new(0).and_then(|gpu| {
            // A stream of its own (the legacy default stream cannot capture the graph rows),
            // and no cudarc events: every buffer lives and is used on that one stream.
            // SAFETY: nothing of this program uses another stream.
            unsafe { gpu.cuda().disable_event_tracking() };
            gpu.fork_stream()
        }) {
            Ok(gpu) => {
                println!(
                    "[{:.1} s] GPU context, every kernel loaded (the driver's JIT included)",
                    opening.elapsed().as_secs_f64()
                );
                run(Some(gpu), &args)
            }
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
        flush_bytes: flush_bytes(0),
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
            let timer = Timer::new(&gpu, header.l2_bytes.max(0) as usize)?;
            header.flush_bytes = timer.flush_bytes;
            println!(
                "[{:.1} s] device, copy yardstick and L2 flush ({} MiB) ready",
                started.elapsed().as_secs_f64(),
                timer.flush_bytes >> 20
            );
            Some(Env {
                gpu,
                timer,
                workspace: Workspace::new(),
            })
        }
        None => None,
    };
    let copy_gbs = header.copy_gbs;
    // A row is wanted when its name contains any of the filter's comma-separated texts.
    let wanted = |name: &str| {
        args.filter
            .as_ref()
            .is_none_or(|f| f.split(',').any(|part| name.contains(part)))
    };

    let mut rows = Vec::new();
    let mut report = |new: Vec<Row>| {
        for row in new.into_iter().filter(|r| wanted(&r.name)) {
            print_row(&row, copy_gbs);
            rows.push(row);
        }
    };
    for case in bn_suite(args.quick) {
        for &layout in &case.layouts {
            for &dtype in &case.dtypes {
                // Only the ops whose rows the filter keeps run.
                let case_ops = with_single_pass(&case, layout, dtype);
                let not_measured = vec![Err(NOT_MEASURED.into()); case_ops.len()];
                let planned = bn_rows(&case, &case_ops, layout, dtype, not_measured);
                let ops: Vec<Op> = planned
                    .iter()
                    .filter(|r| wanted(&r.name))
                    .map(|r| r.op)
                    .collect();
                let Some(env) = env.as_mut().filter(|_| !ops.is_empty()) else {
                    report(planned);
                    continue;
                };
                report(match dtype {
                    DType::F32 => bench_bn::<f32>(env, &case, &ops, layout),
                    DType::F16 => bench_bn::<half::f16>(env, &case, &ops, layout),
                    DType::BF16 => bench_bn::<half::bf16>(env, &case, &ops, layout),
                });
            }
        }
    }
    if env.is_some() {
        println!(
            "[{:.1} s] batch-norm rows done",
            started.elapsed().as_secs_f64()
        );
    }
    // The quick set is the batch-norm shapes alone.
    let (folds, norm_cases) = if args.quick {
        (Vec::new(), Vec::new())
    } else {
        (fold_suite(), norms::suite())
    };
    for case in folds {
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
    for case in norm_cases {
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

    /// The quick set is exactly issue 16's shapes, each in its dtype and layout, with the
    /// training forward, eval forward and backward.
    #[test]
    fn quick_set_is_issue_16s_shapes() {
        let names: Vec<String> = bn_suite(true)
            .iter()
            .flat_map(|case| {
                let rows = vec![Err(NOT_MEASURED.into()); case.ops.len()];
                bn_rows(case, case.ops, case.layouts[0], case.dtypes[0], rows)
            })
            .map(|row| row.name)
            .collect();
        let mut want = Vec::new();
        for shape in [
            "f16/256x64x112x112/channels_first",
            "f32/32x2x512x512/channels_first",
            "f16/256x64x56x56/channels_last",
            "f16/32x256x56x56/channels_last",
            "f32/64x2048x7x7/channels_first",
            "f32/100000x32/channels_first",
        ] {
            for op in ["bn_fwd", "bn_eval", "bn_bwd"] {
                want.push(format!("{op}/{shape}"));
            }
        }
        assert_eq!(names, want);
    }

    #[test]
    fn byte_models() {
        let (n, size) = (64u64, 2u64);
        assert_eq!(Op::Fwd.bytes(n, size), (2 * 128, 3 * 128));
        assert_eq!(
            Op::Graph(GraphOp::Bwd).bytes(n, size),
            Op::Bwd.bytes(n, size)
        );
        // Two mask words of 4 bytes for 64 elements: written once, read by two passes.
        assert_eq!(Op::AddReluFwd.bytes(n, size), (3 * 128 + 8, 4 * 128 + 8));
        assert_eq!(Op::AddReluBwd.bytes(n, size), (4 * 128 + 8, 6 * 128 + 16));
        assert!(flush_bytes(60_000_000) > 2 * 60_000_000);
    }

    #[test]
    fn timing_statistics() {
        let t = Timing::from_ms(vec![4.0, 1.0, 3.0, 2.0]);
        assert_eq!(
            (t.median_us, t.min_us, t.p90_us, t.runs),
            (2500.0, 1000.0, 4000.0, 4)
        );
        assert_eq!(Timing::from_ms(vec![3.0, 1.0, 2.0]).median_us, 2000.0);
        assert_eq!(t.per_call(4).median_us, 625.0);
    }

    #[test]
    fn f32_constants_print_as_written() {
        assert_eq!(shortest(1e-5), 1e-5);
        assert_eq!(serde_json::to_string(&shortest(0.1)).unwrap(), "0.1");
    }

    #[test]
    fn suite_sizes() {
        // Keep in sync with bench/pytorch_bench.py (its --self-test checks the names).
        assert_eq!(bn_suite(false).len(), 6 + 24 + 5 + 3 + 1 + 1 + 3);
        assert_eq!(fold_suite().len(), 7);
        assert_eq!(
            RESNET50_CHW
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len(),
            12
        );
    }
}
