//! Issue 8, numerical faults: a NaN or an infinity in one channel stays in that channel (the
//! statistics, outputs and gradients of the others are unaffected, their running statistics
//! updated normally); a constant channel gives `y = bias` exactly and finite gradients; f16
//! values near 65504 over many values per channel keep the statistics finite and right.
//!
//! The CPU tests check the reference layer against an oracle written here from the definitions
//! (f64, two passes), and check that the healthy channels are bitwise what the reference gives
//! for the tensor without the faulty channel (channels are independent). The GPU twins
//! (ignored without a device) check the GPU layer against the CPU reference.

mod common;

use batchnorm_cuda::gpu::{self, GpuContext};
use batchnorm_cuda::reference::{self, CachedStats};
use batchnorm_cuda::{BatchNormConfig, DType, Element, LayerState, Layout, TensorDesc};
use common::gpu::{download, random, random_f32, upload, zeros};
use common::{compare, tolerance, widen, widen_f32, Quantity, Tol};
use half::{bf16, f16};

const EPS: f32 = 1e-5;
const MOMENTUM: f32 = 0.1;
const LAYOUTS: [Layout; 2] = [Layout::ChannelsFirst, Layout::ChannelsLast];

// ------------------------------------------------------------------------------ one step, three ways

/// Everything one forward + backward produces, widened to f64. `save_*` are empty after an
/// eval-mode forward (it normalizes with the running statistics).
#[derive(Clone, Debug)]
struct Step {
    y: Vec<f64>,
    dx: Vec<f64>,
    save_mean: Vec<f64>,
    save_invstd: Vec<f64>,
    running_mean: Vec<f64>,
    running_var: Vec<f64>,
    dweight: Vec<f64>,
    dbias: Vec<f64>,
    counter: u64,
}

fn config(c: usize) -> BatchNormConfig {
    BatchNormConfig::new(c).eps(EPS).momentum(Some(MOMENTUM))
}

/// A starting state with per-channel values of every sign, counter 3.
fn start_state(c: usize, seed: u64) -> LayerState {
    LayerState {
        weight: Some(random_f32(seed, c, 0.5, 1.5)),
        bias: Some(random_f32(seed + 1, c, -0.5, 0.5)),
        running_mean: Some(random_f32(seed + 2, c, -0.3, 0.3)),
        running_var: Some(random_f32(seed + 3, c, 0.5, 2.0)),
        num_batches_tracked: 3,
    }
}

/// The CPU reference layer: a forward (training or eval) and its backward.
fn cpu_step<T: Element>(
    desc: &TensorDesc,
    x: &[T],
    dy: &[T],
    start: &LayerState,
    training: bool,
) -> Step {
    let mut bn = reference::BatchNorm::new(config(desc.channels())).unwrap();
    bn.load_state(start).unwrap();
    if !training {
        bn.eval();
    }
    let (y, cache) = bn.forward(x, desc).expect("CPU forward");
    let (save_mean, save_invstd) = match cache.stats() {
        CachedStats::Batch(saved) => (widen_f32(&saved.mean), widen_f32(&saved.invstd)),
        CachedStats::Running { .. } => (Vec::new(), Vec::new()),
    };
    let grads = bn.backward(&cache, x, dy).expect("CPU backward");
    let state = bn.state();
    Step {
        y: widen(&y),
        dx: widen(&grads.dx),
        save_mean,
        save_invstd,
        running_mean: widen_f32(state.running_mean.as_ref().unwrap()),
        running_var: widen_f32(state.running_var.as_ref().unwrap()),
        dweight: widen_f32(grads.dweight.as_ref().unwrap()),
        dbias: widen_f32(grads.dbias.as_ref().unwrap()),
        counter: state.num_batches_tracked,
    }
}

/// The GPU layer: the same step (its parameter gradients start at 0 and accumulate once).
fn gpu_step<T: Element>(
    gpu: &GpuContext,
    desc: &TensorDesc,
    x: &[T],
    dy: &[T],
    start: &LayerState,
    training: bool,
) -> Step {
    let n = desc.numel();
    let mut bn = gpu::BatchNorm::new(gpu, config(desc.channels())).unwrap();
    bn.load_state(start).unwrap();
    if !training {
        bn.eval();
    }
    let (xd, dyd) = (upload(gpu, x), upload(gpu, dy));
    let (mut y, mut dx) = (zeros::<T>(gpu, n), zeros::<T>(gpu, n));
    let cache = bn
        .forward(desc, &xd.as_view(), &mut y.as_view_mut())
        .expect("GPU forward");
    let (save_mean, save_invstd) = match bn.saved_stats(&cache).unwrap() {
        Some(saved) => (widen_f32(&saved.mean), widen_f32(&saved.invstd)),
        None => (Vec::new(), Vec::new()),
    };
    bn.backward(
        &cache,
        &xd.as_view(),
        &dyd.as_view(),
        Some(dx.as_view_mut()),
    )
    .expect("GPU backward");
    let state = bn.state().unwrap();
    Step {
        y: widen(&download(gpu, &y)),
        dx: widen(&download(gpu, &dx)),
        save_mean,
        save_invstd,
        running_mean: widen_f32(state.running_mean.as_ref().unwrap()),
        running_var: widen_f32(state.running_var.as_ref().unwrap()),
        dweight: widen_f32(&bn.grad_weight().unwrap().unwrap()),
        dbias: widen_f32(&bn.grad_bias().unwrap().unwrap()),
        counter: state.num_batches_tracked,
    }
}

/// The oracle, from the definitions, per channel in f64 (two passes for the variance; PyTorch's
/// unbiased running variance). A fault propagates through it as IEEE arithmetic says; the
/// checks only use its values where they are finite.
fn oracle<T: Element>(
    desc: &TensorDesc,
    x: &[T],
    dy: &[T],
    start: &LayerState,
    training: bool,
) -> Step {
    let (n, c, g) = (desc.numel(), desc.channels(), desc.geometry());
    let m = desc.per_channel() as f64;
    let f = f64::from(MOMENTUM);
    let eps = f64::from(EPS);
    let param = |v: &Option<Vec<f32>>, ch: usize| f64::from(v.as_ref().unwrap()[ch]);
    let mut out = Step {
        y: vec![0.0; n],
        dx: vec![0.0; n],
        save_mean: Vec::new(),
        save_invstd: Vec::new(),
        running_mean: widen_f32(start.running_mean.as_ref().unwrap()),
        running_var: widen_f32(start.running_var.as_ref().unwrap()),
        dweight: vec![0.0; c],
        dbias: vec![0.0; c],
        counter: start.num_batches_tracked + u64::from(training),
    };
    for ch in 0..c {
        let mut offsets = Vec::new();
        g.for_each_offset(ch, |i| offsets.push(i));
        let xs: Vec<f64> = offsets.iter().map(|&i| x[i].to_f64()).collect();
        let dys: Vec<f64> = offsets.iter().map(|&i| dy[i].to_f64()).collect();
        let (w, b) = (param(&start.weight, ch), param(&start.bias, ch));
        let (mean, invstd) = if training {
            let mean = xs.iter().sum::<f64>() / m;
            let var = xs.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / m;
            out.save_mean.push(mean);
            out.save_invstd.push(1.0 / (var + eps).sqrt());
            let (rm, rv) = (out.running_mean[ch], out.running_var[ch]);
            out.running_mean[ch] = (1.0 - f) * rm + f * mean;
            out.running_var[ch] = (1.0 - f) * rv + f * var * m / (m - 1.0);
            (mean, 1.0 / (var + eps).sqrt())
        } else {
            let (rm, rv) = (out.running_mean[ch], out.running_var[ch]);
            (rm, 1.0 / (rv + eps).sqrt())
        };
        let xhat: Vec<f64> = xs.iter().map(|v| (v - mean) * invstd).collect();
        let dbias: f64 = dys.iter().sum();
        let dweight: f64 = dys.iter().zip(&xhat).map(|(d, h)| d * h).sum();
        out.dbias[ch] = dbias;
        out.dweight[ch] = dweight;
        for (k, &i) in offsets.iter().enumerate() {
            out.y[i] = xhat[k] * w + b;
            out.dx[i] = if training {
                w * invstd * (dys[k] - dbias / m - xhat[k] * dweight / m)
            } else {
                dys[k] * w * invstd
            };
        }
    }
    out
}

// ------------------------------------------------------------------------------------- checks

/// The values of channel `ch` of an activation-shaped tensor, in memory order.
fn channel(desc: &TensorDesc, data: &[f64], ch: usize) -> Vec<f64> {
    let mut values = Vec::new();
    desc.geometry()
        .for_each_offset(ch, |i| values.push(data[i]));
    values
}

/// The values of the channels `chs`, one after the other.
fn channels(desc: &TensorDesc, data: &[f64], chs: &[usize]) -> Vec<f64> {
    chs.iter().flat_map(|&c| channel(desc, data, c)).collect()
}

fn pick(values: &[f64], chs: &[usize]) -> Vec<f64> {
    chs.iter().map(|&c| values[c]).collect()
}

/// Collects failures instead of stopping at the first.
struct Checks {
    label: String,
    failures: Vec<String>,
}

impl Checks {
    fn new(label: String) -> Self {
        Self {
            label,
            failures: Vec::new(),
        }
    }

    fn close(&mut self, what: &str, got: &[f64], want: &[f64], tol: Tol) {
        if let Err(msg) = compare(got, want, tol) {
            self.failures.push(format!("{}: {what}: {msg}", self.label));
        }
    }

    fn holds(&mut self, what: &str, ok: bool) {
        if !ok {
            self.failures.push(format!("{}: {what}", self.label));
        }
    }

    fn finish(self, all: &mut Vec<String>) {
        all.extend(self.failures);
    }
}

fn non_finite(values: &[f64]) -> bool {
    values.iter().all(|v| !v.is_finite())
}

fn finite(values: &[f64]) -> bool {
    values.iter().all(|v| v.is_finite())
}

/// The bounds of one comparison: activations, statistics, parameter gradients.
#[derive(Clone, Copy, Debug)]
struct Tols {
    act: Tol,
    stat: Tol,
    grad: Tol,
}

impl Tols {
    /// The tolerance table of the golden cases for `dtype`.
    fn of(dtype: DType) -> Self {
        Self {
            act: tolerance(dtype, Quantity::Activation),
            stat: tolerance(dtype, Quantity::Statistic),
            grad: tolerance(dtype, Quantity::ParamGrad),
        }
    }
}

/// `got` against `want` on the channels `chs`: activations, statistics and gradients, each
/// under the tolerance of its quantity.
fn compare_channels(
    checks: &mut Checks,
    desc: &TensorDesc,
    tols: Tols,
    got: &Step,
    want: &Step,
    chs: &[usize],
) {
    for (what, g, w) in [("y", &got.y, &want.y), ("dx", &got.dx, &want.dx)] {
        checks.close(
            what,
            &channels(desc, g, chs),
            &channels(desc, w, chs),
            tols.act,
        );
    }
    let mut stats = vec![
        ("running_mean", &got.running_mean, &want.running_mean),
        ("running_var", &got.running_var, &want.running_var),
    ];
    if !want.save_mean.is_empty() {
        stats.push(("save_mean", &got.save_mean, &want.save_mean));
        stats.push(("save_invstd", &got.save_invstd, &want.save_invstd));
    }
    for (what, g, w) in stats {
        checks.close(what, &pick(g, chs), &pick(w, chs), tols.stat);
    }
    for (what, g, w) in [
        ("dweight", &got.dweight, &want.dweight),
        ("dbias", &got.dbias, &want.dbias),
    ] {
        checks.close(what, &pick(g, chs), &pick(w, chs), tols.grad);
    }
}

// ------------------------------------------------------------------------------- NaN and Inf

/// What is injected into channel [`FAULTY`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// A NaN in `x`.
    XNan,
    /// `+inf` in `x`.
    XPosInf,
    /// `-inf` in `x`.
    XNegInf,
    /// `+inf` and `-inf` in `x`.
    XBothInf,
    /// A NaN in `dy` (the forward is clean).
    DyNan,
}

const FAULTS: [Fault; 5] = [
    Fault::XNan,
    Fault::XPosInf,
    Fault::XNegInf,
    Fault::XBothInf,
    Fault::DyNan,
];

/// The channel that gets the fault, of [`FAULT_DIMS`]' 5.
const FAULTY: usize = 2;
const FAULT_DIMS: [usize; 4] = [4, 5, 3, 6];

/// Inputs for `fault`, and the memory offsets it was put at.
fn faulty_inputs<T: Element>(desc: &TensorDesc, fault: Fault) -> (Vec<T>, Vec<T>, Vec<usize>) {
    let n = desc.numel();
    let mut x: Vec<T> = random(21, n, 0.3, 2.0);
    let mut dy: Vec<T> = random(22, n, 0.1, 1.0);
    let mut offsets = Vec::new();
    desc.geometry().for_each_offset(FAULTY, |i| offsets.push(i));
    let (first, middle) = (offsets[0], offsets[offsets.len() / 2]);
    let put = |target: &mut Vec<T>, at: usize, v: f64| target[at] = T::from_f64(v);
    let at = match fault {
        Fault::XNan => {
            put(&mut x, middle, f64::NAN);
            vec![middle]
        }
        Fault::XPosInf => {
            put(&mut x, first, f64::INFINITY);
            vec![first]
        }
        Fault::XNegInf => {
            put(&mut x, middle, f64::NEG_INFINITY);
            vec![middle]
        }
        Fault::XBothInf => {
            put(&mut x, first, f64::INFINITY);
            put(&mut x, middle, f64::NEG_INFINITY);
            vec![first, middle]
        }
        Fault::DyNan => {
            put(&mut dy, middle, f64::NAN);
            vec![middle]
        }
    };
    (x, dy, at)
}

/// A training step with `fault` in channel [`FAULTY`]: `got` (the layer under test) against
/// `want` (the oracle or the CPU reference) on every other channel, and the fault visible in
/// its own channel, never hidden.
fn check_training_fault(
    checks: &mut Checks,
    desc: &TensorDesc,
    dtype: DType,
    fault: Fault,
    got: &Step,
    want: &Step,
) {
    let tols = Tols::of(dtype);
    let healthy: Vec<usize> = (0..desc.channels()).filter(|&ch| ch != FAULTY).collect();
    compare_channels(checks, desc, tols, got, want, &healthy);
    checks.holds("the counter counts the batch", got.counter == want.counter);
    let f = FAULTY;
    let y = channel(desc, &got.y, f);
    let dx = channel(desc, &got.dx, f);
    if fault == Fault::DyNan {
        // The forward is clean; the backward of this channel is NaN, dbias included.
        checks.close(
            "y of the faulty channel",
            &y,
            &channel(desc, &want.y, f),
            tols.act,
        );
        let stats = |s: &Step| {
            [
                s.save_mean[f],
                s.save_invstd[f],
                s.running_mean[f],
                s.running_var[f],
            ]
        };
        checks.close(
            "statistics of the faulty channel",
            &stats(got),
            &stats(want),
            tols.stat,
        );
        checks.holds("dx of the faulty channel non-finite", non_finite(&dx));
        checks.holds(
            "dweight and dbias of the faulty channel non-finite",
            !got.dweight[f].is_finite() && !got.dbias[f].is_finite(),
        );
    } else {
        checks.holds("y of the faulty channel non-finite", non_finite(&y));
        checks.holds("dx of the faulty channel non-finite", non_finite(&dx));
        checks.holds(
            "saved mean of the faulty channel non-finite",
            !got.save_mean[f].is_finite(),
        );
        checks.holds(
            "running statistics of the faulty channel non-finite",
            !got.running_mean[f].is_finite() && !got.running_var[f].is_finite(),
        );
        checks.holds(
            "dweight of the faulty channel non-finite",
            !got.dweight[f].is_finite(),
        );
        // dbias = sum(dy) does not read x: finite and right.
        checks.close(
            "dbias of the faulty channel",
            &[got.dbias[f]],
            &[want.dbias[f]],
            tols.grad,
        );
    }
}

/// The tensor without channel `drop` (same layout; removing a channel keeps memory order).
fn without_channel<T: Copy>(desc: &TensorDesc, data: &[T], drop: usize) -> (TensorDesc, Vec<T>) {
    let g = desc.geometry();
    let mut dims = desc.dims().to_vec();
    dims[1] -= 1;
    let sub = TensorDesc::new(&dims, desc.layout()).unwrap();
    let kept = data
        .iter()
        .enumerate()
        .filter(|(i, _)| (i / g.inner) % g.channels != drop)
        .map(|(_, v)| *v)
        .collect();
    (sub, kept)
}

fn without(values: &Option<Vec<f32>>, drop: usize) -> Option<Vec<f32>> {
    values.as_ref().map(|v| {
        let mut v = v.clone();
        v.remove(drop);
        v
    })
}

/// The CPU reference's healthy channels are bitwise those of a run without the faulty channel.
fn check_isolation_bitwise<T: Element>(
    checks: &mut Checks,
    desc: &TensorDesc,
    x: &[T],
    dy: &[T],
    start: &LayerState,
    full: &Step,
) {
    let (sub_desc, sub_x) = without_channel(desc, x, FAULTY);
    let (_, sub_dy) = without_channel(desc, dy, FAULTY);
    let sub_start = LayerState {
        weight: without(&start.weight, FAULTY),
        bias: without(&start.bias, FAULTY),
        running_mean: without(&start.running_mean, FAULTY),
        running_var: without(&start.running_var, FAULTY),
        num_batches_tracked: start.num_batches_tracked,
    };
    let sub = cpu_step(&sub_desc, &sub_x, &sub_dy, &sub_start, true);
    let drop_act = |data: &[f64]| without_channel(desc, data, FAULTY).1;
    let drop_ch = |data: &[f64]| {
        let mut v = data.to_vec();
        v.remove(FAULTY);
        v
    };
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (what, a, b) in [
        ("y", drop_act(&full.y), sub.y.clone()),
        ("dx", drop_act(&full.dx), sub.dx.clone()),
        ("save_mean", drop_ch(&full.save_mean), sub.save_mean.clone()),
        (
            "save_invstd",
            drop_ch(&full.save_invstd),
            sub.save_invstd.clone(),
        ),
        (
            "running_mean",
            drop_ch(&full.running_mean),
            sub.running_mean.clone(),
        ),
        (
            "running_var",
            drop_ch(&full.running_var),
            sub.running_var.clone(),
        ),
        ("dweight", drop_ch(&full.dweight), sub.dweight.clone()),
        ("dbias", drop_ch(&full.dbias), sub.dbias.clone()),
    ] {
        checks.holds(
            &format!("{what} of the healthy channels bitwise as without the faulty one"),
            bits(&a) == bits(&b),
        );
    }
}

fn cpu_faults<T: Element>(failures: &mut Vec<String>) {
    for layout in LAYOUTS {
        let desc = TensorDesc::new(&FAULT_DIMS, layout).unwrap();
        let start = start_state(desc.channels(), 30);
        for fault in FAULTS {
            let (x, dy, _) = faulty_inputs::<T>(&desc, fault);
            let mut checks = Checks::new(format!("cpu {desc} {} {fault:?}", T::DTYPE));
            let got = cpu_step(&desc, &x, &dy, &start, true);
            let want = oracle(&desc, &x, &dy, &start, true);
            check_training_fault(&mut checks, &desc, T::DTYPE, fault, &got, &want);
            check_isolation_bitwise(&mut checks, &desc, &x, &dy, &start, &got);
            checks.finish(failures);
        }
    }
}

#[test]
fn cpu_nan_or_inf_in_one_channel_stays_in_that_channel() {
    let mut failures = Vec::new();
    cpu_faults::<f32>(&mut failures);
    cpu_faults::<f16>(&mut failures);
    cpu_faults::<bf16>(&mut failures);
    println!("3 dtypes x 2 layouts x {} faults", FAULTS.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn gpu_faults<T: Element>(gpu: &GpuContext, failures: &mut Vec<String>) {
    for layout in LAYOUTS {
        // The small shape, and one with many values per channel (split reductions).
        for dims in [&FAULT_DIMS[..], &[16, 5, 64, 64]] {
            let desc = TensorDesc::new(dims, layout).unwrap();
            let start = start_state(desc.channels(), 30);
            for fault in FAULTS {
                let (x, dy, _) = faulty_inputs::<T>(&desc, fault);
                let mut checks = Checks::new(format!("gpu {desc} {} {fault:?}", T::DTYPE));
                let got = gpu_step(gpu, &desc, &x, &dy, &start, true);
                let want = cpu_step(&desc, &x, &dy, &start, true);
                check_training_fault(&mut checks, &desc, T::DTYPE, fault, &got, &want);
                checks.finish(failures);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_nan_or_inf_in_one_channel_stays_in_that_channel() {
    let gpu = common::gpu::gpu();
    let mut failures = Vec::new();
    gpu_faults::<f32>(&gpu, &mut failures);
    gpu_faults::<f16>(&gpu, &mut failures);
    gpu_faults::<bf16>(&gpu, &mut failures);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Eval mode with a NaN or an infinity in `x`: only the outputs at the faulty elements are
/// non-finite (eval normalizes each element with the running statistics), `dx` is finite
/// everywhere (`dy * weight * invstd` does not read `x`), the running statistics and counter
/// stay, and only the faulty channel's `dweight` is non-finite.
fn check_eval_fault(
    checks: &mut Checks,
    desc: &TensorDesc,
    dtype: DType,
    at: &[usize],
    start: &LayerState,
    got: &Step,
    want: &Step,
) {
    let n = desc.numel();
    let clean: Vec<usize> = (0..n).filter(|i| !at.contains(i)).collect();
    let take = |v: &[f64], idx: &[usize]| idx.iter().map(|&i| v[i]).collect::<Vec<_>>();
    let act = tolerance(dtype, Quantity::Activation);
    checks.close(
        "y of clean elements",
        &take(&got.y, &clean),
        &take(&want.y, &clean),
        act,
    );
    checks.holds(
        "y of the faulty elements non-finite",
        non_finite(&take(&got.y, at)),
    );
    checks.close("dx", &got.dx, &want.dx, act);
    checks.holds("dx finite", finite(&got.dx));
    let bits = |v: &[f64]| v.iter().map(|x| (*x as f32).to_bits()).collect::<Vec<_>>();
    let start_bits = |v: &Option<Vec<f32>>| {
        v.as_ref()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>()
    };
    checks.holds(
        "running statistics bitwise unchanged in eval",
        bits(&got.running_mean) == start_bits(&start.running_mean)
            && bits(&got.running_var) == start_bits(&start.running_var),
    );
    checks.holds(
        "eval does not count",
        got.counter == start.num_batches_tracked,
    );
    let healthy: Vec<usize> = (0..desc.channels()).filter(|&c| c != FAULTY).collect();
    let grad = tolerance(dtype, Quantity::ParamGrad);
    checks.close(
        "dweight, healthy",
        &pick(&got.dweight, &healthy),
        &pick(&want.dweight, &healthy),
        grad,
    );
    checks.holds(
        "dweight of the faulty channel non-finite",
        !got.dweight[FAULTY].is_finite(),
    );
    checks.close("dbias", &got.dbias, &want.dbias, grad);
}

#[test]
fn cpu_eval_mode_fault_stays_in_its_elements() {
    let mut failures = Vec::new();
    for layout in LAYOUTS {
        let desc = TensorDesc::new(&FAULT_DIMS, layout).unwrap();
        let start = start_state(desc.channels(), 40);
        for fault in [Fault::XNan, Fault::XPosInf, Fault::XBothInf] {
            let (x, dy, at) = faulty_inputs::<f32>(&desc, fault);
            let mut checks = Checks::new(format!("cpu eval {desc} {fault:?}"));
            let got = cpu_step(&desc, &x, &dy, &start, false);
            let want = oracle(&desc, &x, &dy, &start, false);
            check_eval_fault(&mut checks, &desc, DType::F32, &at, &start, &got, &want);
            checks.finish(&mut failures);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_eval_mode_fault_stays_in_its_elements() {
    let gpu = common::gpu::gpu();
    let mut failures = Vec::new();
    for layout in LAYOUTS {
        let desc = TensorDesc::new(&FAULT_DIMS, layout).unwrap();
        let start = start_state(desc.channels(), 40);
        for fault in [Fault::XNan, Fault::XPosInf, Fault::XBothInf] {
            let (x, dy, at) = faulty_inputs::<f16>(&desc, fault);
            let mut checks = Checks::new(format!("gpu eval {desc} {fault:?}"));
            let got = gpu_step(&gpu, &desc, &x, &dy, &start, false);
            let want = cpu_step(&desc, &x, &dy, &start, false);
            check_eval_fault(&mut checks, &desc, DType::F16, &at, &start, &got, &want);
            checks.finish(&mut failures);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// --------------------------------------------------------------------------- constant channels

/// Channels 0, 2 and 4 are constant (0.7, -3.25, 1234.5 rounded to `T`), 1 and 3 are not.
const CONSTANT: [(usize, f64); 3] = [(0, 0.7), (2, -3.25), (4, 1234.5)];
/// Biases every dtype holds exactly, so `y = bias` can be checked for equality.
const BIASES: [f32; 5] = [0.25, -0.5, 0.0, 1.5, -2.0];

fn constant_inputs<T: Element>(desc: &TensorDesc) -> (Vec<T>, Vec<T>, LayerState) {
    let n = desc.numel();
    let mut x: Vec<T> = random(51, n, 0.0, 3.0);
    for (ch, value) in CONSTANT {
        desc.geometry()
            .for_each_offset(ch, |i| x[i] = T::from_f64(value));
    }
    let dy: Vec<T> = random(52, n, 0.2, 1.0);
    let start = LayerState {
        weight: Some(vec![1.5, 0.75, -2.0, 1.0, 0.5]),
        bias: Some(BIASES.to_vec()),
        ..start_state(5, 50)
    };
    (x, dy, start)
}

/// `y == bias` exactly on the constant channels, finite gradients everywhere, and everything
/// within tolerance of `want`.
fn check_constant(checks: &mut Checks, desc: &TensorDesc, dtype: DType, got: &Step, want: &Step) {
    compare_channels(checks, desc, Tols::of(dtype), got, want, &[0, 1, 2, 3, 4]);
    for (ch, _) in CONSTANT {
        let bias = f64::from(BIASES[ch]);
        checks.holds(
            &format!("y == bias exactly on constant channel {ch}"),
            channel(desc, &got.y, ch).iter().all(|&y| y == bias),
        );
    }
    checks.holds("dx finite", finite(&got.dx));
    checks.holds(
        "dweight and dbias finite",
        finite(&got.dweight) && finite(&got.dbias),
    );
    checks.holds(
        "statistics finite",
        finite(&got.save_mean)
            && finite(&got.save_invstd)
            && finite(&got.running_mean)
            && finite(&got.running_var),
    );
}

fn cpu_constant<T: Element>(failures: &mut Vec<String>) {
    for layout in LAYOUTS {
        let desc = TensorDesc::new(&[6, 5, 5, 7], layout).unwrap();
        let (x, dy, start) = constant_inputs::<T>(&desc);
        let mut checks = Checks::new(format!("cpu constant {desc} {}", T::DTYPE));
        let got = cpu_step(&desc, &x, &dy, &start, true);
        let want = oracle(&desc, &x, &dy, &start, true);
        check_constant(&mut checks, &desc, T::DTYPE, &got, &want);
        // By hand: xhat is exactly 0 on a constant channel, so dweight = sum(dy * 0) = 0.
        for (ch, _) in CONSTANT {
            checks.holds(
                &format!("dweight exactly 0 on constant channel {ch}"),
                got.dweight[ch] == 0.0,
            );
        }
        checks.finish(failures);
    }
}

#[test]
fn cpu_constant_channel_gives_bias_exactly_and_finite_gradients() {
    let mut failures = Vec::new();
    cpu_constant::<f32>(&mut failures);
    cpu_constant::<f16>(&mut failures);
    cpu_constant::<bf16>(&mut failures);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_constant_channel_gives_bias_exactly_and_finite_gradients() {
    let gpu = common::gpu::gpu();
    let mut failures = Vec::new();
    fn one<T: Element>(gpu: &GpuContext, dims: &[usize], failures: &mut Vec<String>) {
        for layout in LAYOUTS {
            let desc = TensorDesc::new(dims, layout).unwrap();
            let (x, dy, start) = constant_inputs::<T>(&desc);
            let mut checks = Checks::new(format!("gpu constant {desc} {}", T::DTYPE));
            let got = gpu_step(gpu, &desc, &x, &dy, &start, true);
            let want = cpu_step(&desc, &x, &dy, &start, true);
            check_constant(&mut checks, &desc, T::DTYPE, &got, &want);
            checks.finish(failures);
        }
    }
    for dims in [&[6, 5, 5, 7][..], &[32, 5, 64, 64], &[4096, 5]] {
        one::<f32>(&gpu, dims, &mut failures);
        one::<f16>(&gpu, dims, &mut failures);
        one::<bf16>(&gpu, dims, &mut failures);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// --------------------------------------------------------------------------- f16 near its max

/// f16 activations near 65504 over `m = 131072 > 65504` values per channel (a count or a sum in
/// f16 would overflow), four kinds of channel by `c % 4`: 65504 and 65472 alternating (mean near
/// the maximum, tiny spread), +-65504 (variance 4.3e9), uniform in [60000, 65504], uniform in
/// [-65504, 65504]. `dy` correlates with `x`.
fn near_max_inputs(desc: &TensorDesc) -> (Vec<f16>, Vec<f16>, LayerState) {
    let n = desc.numel();
    let u: Vec<f64> = random::<f32>(61, n, 0.0, 1.0)
        .iter()
        .map(|&v| f64::from(v))
        .collect();
    let mut x = vec![f16::ZERO; n];
    for ch in 0..desc.channels() {
        let mut k = 0usize;
        desc.geometry().for_each_offset(ch, |i| {
            let value = match ch % 4 {
                0 => [65504.0, 65472.0][k % 2],
                1 => [65504.0, -65504.0][k % 2],
                2 => 62752.0 + 2752.0 * u[i],
                _ => 65504.0 * u[i],
            };
            x[i] = f16::from_f64(value);
            k += 1;
        });
    }
    let dy = x
        .iter()
        .zip(&u)
        .map(|(x, u)| f16::from_f64(0.5 * x.to_f64() / 65504.0 + 0.25 * u + 0.05))
        .collect();
    let start = start_state(desc.channels(), 60);
    (x, dy, start)
}

/// Statistics near the f16 maximum are compared with a bound on the data's scale: 1e-6 of
/// 65504 absolute (an f32 mean of values of +-65504 is good to a few of its ulps), 1e-3
/// relative (a variance of 256 under a mean of 65488 loses ~ulp(65488) / 16 = 2.4e-4 in f32).
/// `y` and `dx` keep the f16 bounds of the golden cases.
const NEAR_MAX_STAT: Tol = Tol::Elementwise {
    atol: 65504.0 * 1e-6,
    rtol: 1e-3,
};

fn check_near_max(checks: &mut Checks, desc: &TensorDesc, got: &Step, want: &Step) {
    let all: Vec<usize> = (0..desc.channels()).collect();
    let tols = Tols {
        stat: NEAR_MAX_STAT,
        ..Tols::of(DType::F16)
    };
    compare_channels(checks, desc, tols, got, want, &all);
    checks.holds(
        "statistics finite",
        finite(&got.save_mean)
            && finite(&got.save_invstd)
            && finite(&got.running_mean)
            && finite(&got.running_var),
    );
    checks.holds("y and dx finite", finite(&got.y) && finite(&got.dx));
    checks.holds(
        "dweight and dbias finite",
        finite(&got.dweight) && finite(&got.dbias),
    );
    // By hand, channel 1 (+-65504 in equal numbers): mean 0, biased variance 65504^2.
    let invstd = 1.0 / (65504f64 * 65504.0 + f64::from(EPS)).sqrt();
    checks.close(
        "saved mean and invstd of the +-65504 channel, by hand",
        &[got.save_mean[1], got.save_invstd[1]],
        &[0.0, invstd],
        NEAR_MAX_STAT,
    );
}

const NEAR_MAX_DIMS: [usize; 4] = [8, 16, 128, 128];

#[test]
fn cpu_f16_near_its_maximum_keeps_statistics_finite_and_right() {
    let mut failures = Vec::new();
    for layout in LAYOUTS {
        let desc = TensorDesc::new(&NEAR_MAX_DIMS, layout).unwrap();
        let (x, dy, start) = near_max_inputs(&desc);
        let mut checks = Checks::new(format!("cpu near max {desc}"));
        let got = cpu_step(&desc, &x, &dy, &start, true);
        let want = oracle(&desc, &x, &dy, &start, true);
        check_near_max(&mut checks, &desc, &got, &want);
        checks.finish(&mut failures);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_f16_near_its_maximum_keeps_statistics_finite_and_right() {
    let gpu = common::gpu::gpu();
    let mut failures = Vec::new();
    for layout in LAYOUTS {
        let desc = TensorDesc::new(&NEAR_MAX_DIMS, layout).unwrap();
        let (x, dy, start) = near_max_inputs(&desc);
        let mut checks = Checks::new(format!("gpu near max {desc}"));
        let got = gpu_step(&gpu, &desc, &x, &dy, &start, true);
        let want = cpu_step(&desc, &x, &dy, &start, true);
        check_near_max(&mut checks, &desc, &got, &want);
        checks.finish(&mut failures);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
