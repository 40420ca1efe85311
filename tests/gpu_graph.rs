//! Issue 19, graph and stream safety (every test needs a CUDA device: run with
//! `--include-ignored` on a GPU machine, or on the emulated driver, which records a stream
//! capture and replays it): a training step captured in a CUDA graph replays like direct calls;
//! a workspace never grows during or after a capture, a workspace serves one stream, and
//! `momentum = None` refuses to be captured, each a typed error that leaves parameters,
//! gradients, running statistics and the counter as they were.

mod common;

use batchnorm_cuda::gpu::functional::{self, BatchStats, ForwardStats, RunningUpdate};
use batchnorm_cuda::gpu::functional::{Epilogue, SavedStatsMut};
use batchnorm_cuda::gpu::{BatchNorm, GpuContext, Workspace};
use batchnorm_cuda::{BatchNormConfig, DType, Error, LayerState, RunningVarUpdate, TensorDesc};
use common::gpu::{download, gpu, random, upload, zeros};
use cudarc::driver::{sys, CudaGraph, CudaSlice};

/// A stream of its own (the legacy default stream cannot capture), on a context whose buffers
/// carry no cudarc events: every buffer of these tests lives on that one stream, and a wait on
/// an event recorded before the capture is not something a capture may hold.
fn capture_context() -> GpuContext {
    let gpu = gpu();
    // SAFETY: each test allocates and uses all its buffers on the one stream forked below.
    unsafe { gpu.cuda().disable_event_tracking() };
    gpu.fork_stream().expect("a new stream")
}

fn begin(gpu: &GpuContext) {
    let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
    gpu.stream().begin_capture(mode).expect("begin capture");
    assert!(gpu.is_capturing().unwrap());
}

fn end(gpu: &GpuContext) -> CudaGraph {
    let graph = gpu
        .stream()
        .end_capture(sys::CUgraphInstantiate_flags(0))
        .expect("end capture")
        .expect("a graph");
    assert!(!gpu.is_capturing().unwrap());
    graph
}

/// One layer's inputs and outputs on the device.
struct Step {
    desc: TensorDesc,
    x: CudaSlice<f32>,
    dy: CudaSlice<f32>,
    y: CudaSlice<f32>,
    dx: CudaSlice<f32>,
}

impl Step {
    fn new(gpu: &GpuContext, dims: &[usize], seed: u64) -> Self {
        let desc = TensorDesc::nchw(dims[0], dims[1], dims[2], dims[3]).unwrap();
        let n = desc.numel();
        Self {
            desc,
            x: upload(gpu, &random::<f32>(seed, n, 0.4, 2.0)),
            dy: upload(gpu, &random::<f32>(seed + 1, n, 0.1, 1.0)),
            y: zeros(gpu, n),
            dx: zeros(gpu, n),
        }
    }

    fn forward(&mut self, bn: &mut BatchNorm) -> batchnorm_cuda::Result<()> {
        bn.forward(&self.desc, &self.x.as_view(), &mut self.y.as_view_mut())
            .map(drop)
    }

    fn train(&mut self, bn: &mut BatchNorm) -> batchnorm_cuda::Result<()> {
        let cache = bn.forward(&self.desc, &self.x.as_view(), &mut self.y.as_view_mut())?;
        let dx = Some(self.dx.as_view_mut());
        bn.backward(&cache, &self.x.as_view(), &self.dy.as_view(), dx)
    }
}

/// Everything a failed call must leave as it was.
#[derive(Debug, PartialEq)]
struct Snapshot {
    state: LayerState,
    grads: (Option<Vec<f32>>, Option<Vec<f32>>),
}

fn snapshot(bn: &BatchNorm) -> Snapshot {
    Snapshot {
        state: bn.state().unwrap(),
        grads: (bn.grad_weight().unwrap(), bn.grad_bias().unwrap()),
    }
}

/// A layer with non-trivial state, so that "unchanged" is not "still the initial values".
fn layer(gpu: &GpuContext, config: BatchNormConfig) -> BatchNorm {
    let c = config.num_features;
    let mut bn = BatchNorm::new(gpu, config).unwrap();
    bn.set_weight(&random::<f32>(7, c, 1.0, 0.3)).unwrap();
    bn.set_bias(&random::<f32>(8, c, 0.0, 0.3)).unwrap();
    if config.track_running_stats {
        let var: Vec<f32> = random(10, c, 1.5, 0.4);
        bn.set_running_stats(&random::<f32>(9, c, 0.1, 0.2), &var)
            .unwrap();
        bn.set_num_batches_tracked(5).unwrap();
    }
    bn
}

#[test]
#[ignore = "needs a CUDA device"]
fn captured_training_step_replays_like_direct_calls() {
    let gpu = capture_context();
    let dims = [6, 3, 5, 7];
    let config = BatchNormConfig::new(3);
    let (mut captured, mut direct) = (layer(&gpu, config), layer(&gpu, config));
    let (mut a, mut b) = (Step::new(&gpu, &dims, 1), Step::new(&gpu, &dims, 1));
    captured.reserve(&a.desc, DType::F32).unwrap();
    let before = snapshot(&captured);

    begin(&gpu);
    a.train(&mut captured).unwrap();
    let graph = end(&gpu);
    // Captured, not run: the running statistics have not moved yet.
    assert_eq!(
        snapshot(&captured).state.running_mean,
        before.state.running_mean
    );

    const REPLAYS: u64 = 3;
    for _ in 0..REPLAYS {
        graph.launch().unwrap();
        b.train(&mut direct).unwrap();
    }
    let (got, want) = (snapshot(&captured), snapshot(&direct));
    assert_eq!(got.state.running_mean, want.state.running_mean);
    assert_eq!(got.state.running_var, want.state.running_var);
    assert_eq!(
        got.grads, want.grads,
        "gradients accumulated over the replays"
    );
    assert_eq!(download(&gpu, &a.y), download(&gpu, &b.y));
    assert_eq!(download(&gpu, &a.dx), download(&gpu, &b.dx));
    assert_ne!(got.state.running_mean, before.state.running_mean);
    // The counter counts the host's calls (README, Semantics): one capture, three replays.
    assert_eq!(captured.num_batches_tracked(), 5 + 1);
    assert_eq!(direct.num_batches_tracked(), 5 + REPLAYS);
}

/// The single-pass forward (a cooperative launch) captured in a graph replays like direct calls
/// on the same opted-in context, bit for bit: `reserve` sized the workspace for it (partials
/// and the barrier word), and the barrier word is ready again after every replay.
#[test]
#[ignore = "needs a CUDA device"]
fn captured_single_pass_forward_replays_like_direct_calls() {
    let gpu = capture_context().with_single_pass_forward(true);
    let desc = TensorDesc::nhwc(4, 8, 9, 7).unwrap();
    assert!(gpu.single_pass_forward_fits(&desc, DType::F32).unwrap());
    let n = desc.numel();
    let config = BatchNormConfig::new(8);
    let (mut captured, mut direct) = (layer(&gpu, config), layer(&gpu, config));
    let x = upload(&gpu, &random::<f32>(3, n, 0.4, 2.0));
    let (mut ya, mut yb) = (zeros::<f32>(&gpu, n), zeros::<f32>(&gpu, n));
    captured.reserve(&desc, DType::F32).unwrap();
    let before = snapshot(&captured);
    begin(&gpu);
    captured
        .forward(&desc, &x.as_view(), &mut ya.as_view_mut())
        .unwrap();
    let graph = end(&gpu);
    // Captured, not run: the running statistics have not moved yet.
    let captured_state = snapshot(&captured).state;
    assert_eq!(captured_state.running_mean, before.state.running_mean);
    assert_eq!(captured_state.running_var, before.state.running_var);
    for _ in 0..3 {
        graph.launch().unwrap();
        direct
            .forward(&desc, &x.as_view(), &mut yb.as_view_mut())
            .unwrap();
    }
    let (got, want) = (snapshot(&captured), snapshot(&direct));
    assert_eq!(got.state.running_mean, want.state.running_mean);
    assert_eq!(got.state.running_var, want.state.running_var);
    assert_ne!(got.state.running_mean, before.state.running_mean);
    assert_eq!(download(&gpu, &ya), download(&gpu, &yb));
}

#[test]
#[ignore = "needs a CUDA device"]
fn workspace_cannot_grow_during_a_capture() {
    let gpu = capture_context();
    let mut bn = layer(&gpu, BatchNormConfig::new(3));
    let mut step = Step::new(&gpu, &[6, 3, 5, 7], 2);
    let (before, y_before) = (snapshot(&bn), download(&gpu, &step.y));

    begin(&gpu);
    let got = step.train(&mut bn);
    drop(end(&gpu));
    assert!(
        matches!(
            got,
            Err(Error::WorkspaceCannotGrow { held: 0, needed, reason })
                if needed > 0 && reason.contains("capturing")
        ),
        "{got:?}"
    );
    assert_eq!(snapshot(&bn), before, "a refused forward changed the layer");
    assert_eq!(download(&gpu, &step.y), y_before);

    // The functional calls refuse the same way, before queuing anything.
    let mut ws = Workspace::new();
    let (mut mean, mut mean_lo, mut invstd) = (zeros(&gpu, 3), zeros(&gpu, 3), zeros(&gpu, 3));
    let mut running = (upload(&gpu, &[0.5f32; 3]), upload(&gpu, &[2.0f32; 3]));
    begin(&gpu);
    let got = functional::forward(
        &gpu,
        &mut ws,
        functional::Forward {
            desc: step.desc,
            x: step.x.as_view(),
            weight: None,
            bias: None,
            stats: ForwardStats::Batch(BatchStats {
                saved: SavedStatsMut {
                    mean: mean.as_view_mut(),
                    mean_lo: mean_lo.as_view_mut(),
                    invstd: invstd.as_view_mut(),
                },
                running: Some(RunningUpdate {
                    mean: running.0.as_view_mut(),
                    var: running.1.as_view_mut(),
                    factor: 0.1,
                    var_update: RunningVarUpdate::Unbiased,
                }),
                eps: 1e-5,
            }),
            y: step.y.as_view_mut(),
            epilogue: Epilogue::None,
        },
    );
    drop(end(&gpu));
    assert!(
        matches!(got, Err(Error::WorkspaceCannotGrow { .. })),
        "{got:?}"
    );
    assert_eq!(ws.bytes(), 0);
    assert_eq!(download(&gpu, &running.0), [0.5; 3]);
    assert_eq!(download(&gpu, &running.1), [2.0; 3]);
    assert_eq!(download(&gpu, &step.y), y_before);

    // Reserved beforehand, the same step captures.
    bn.reserve(&step.desc, DType::F32).unwrap();
    begin(&gpu);
    step.train(&mut bn).unwrap();
    let graph = end(&gpu);
    graph.launch().unwrap();
    assert_ne!(snapshot(&bn).state.running_mean, before.state.running_mean);
}

#[test]
#[ignore = "needs a CUDA device"]
fn workspace_cannot_grow_after_a_capture() {
    let gpu = capture_context();
    let mut bn = layer(&gpu, BatchNormConfig::new(3));
    let mut small = Step::new(&gpu, &[2, 3, 4, 4], 3);
    let mut large = Step::new(&gpu, &[64, 3, 32, 32], 4);
    bn.reserve(&small.desc, DType::F32).unwrap();
    begin(&gpu);
    small.forward(&mut bn).unwrap();
    let graph = end(&gpu);

    let before = snapshot(&bn);
    let got = large.train(&mut bn);
    assert!(
        matches!(
            got,
            Err(Error::WorkspaceCannotGrow { held, needed, reason })
                if needed > held && reason.contains("may still read")
        ),
        "{got:?}"
    );
    assert_eq!(snapshot(&bn), before, "a refused forward changed the layer");
    // The graph's buffers are still the workspace's: it replays, and a shape that fits runs.
    graph.launch().unwrap();
    small.train(&mut bn).unwrap();
    assert_ne!(snapshot(&bn).state.running_mean, before.state.running_mean);
}

#[test]
#[ignore = "needs a CUDA device"]
fn cumulative_average_refuses_capture() {
    let gpu = capture_context();
    let cumulative = BatchNormConfig::new(3).momentum(None);
    let mut bn = layer(&gpu, cumulative);
    let mut step = Step::new(&gpu, &[6, 3, 5, 7], 5);
    bn.reserve(&step.desc, DType::F32).unwrap();
    let before = snapshot(&bn);

    begin(&gpu);
    let got = step.forward(&mut bn);
    drop(end(&gpu));
    assert!(
        matches!(got, Err(Error::CumulativeAverageInCapture)),
        "{got:?}"
    );
    assert_eq!(snapshot(&bn), before, "a refused forward changed the layer");
    assert_eq!(bn.num_batches_tracked(), 5);

    // What does not update the running statistics captures: eval, and no running statistics.
    bn.eval();
    begin(&gpu);
    step.forward(&mut bn).unwrap();
    drop(end(&gpu));
    let mut untracked = layer(&gpu, cumulative.track_running_stats(false));
    untracked.reserve(&step.desc, DType::F32).unwrap();
    begin(&gpu);
    step.train(&mut untracked).unwrap();
    drop(end(&gpu));
    // Outside a capture the cumulative average runs as ever.
    bn.train();
    step.forward(&mut bn).unwrap();
    assert_eq!(bn.num_batches_tracked(), 6);
}

#[test]
#[ignore = "needs a CUDA device"]
fn a_workspace_serves_one_stream() {
    let gpu = gpu();
    let (on_a, on_b) = (gpu.fork_stream().unwrap(), gpu.fork_stream().unwrap());
    let desc = TensorDesc::nchw(4, 3, 5, 5).unwrap();
    let x_host = random::<f32>(11, desc.numel(), 0.2, 1.0);
    let mut ws = Workspace::new();
    let run = |gpu: &GpuContext, ws: &mut Workspace| -> (batchnorm_cuda::Result<()>, Vec<f32>) {
        let x = upload(gpu, &x_host);
        let mut y = upload(gpu, &vec![7.0f32; desc.numel()]);
        let (mut mean, mut mean_lo, mut invstd) = (zeros(gpu, 3), zeros(gpu, 3), zeros(gpu, 3));
        let request = functional::Forward {
            desc,
            x: x.as_view(),
            weight: None,
            bias: None,
            stats: ForwardStats::Batch(BatchStats {
                saved: SavedStatsMut {
                    mean: mean.as_view_mut(),
                    mean_lo: mean_lo.as_view_mut(),
                    invstd: invstd.as_view_mut(),
                },
                running: None,
                eps: 1e-5,
            }),
            y: y.as_view_mut(),
            epilogue: Epilogue::None,
        };
        let result = functional::forward(gpu, ws, request);
        (result, download(gpu, &y))
    };
    let (first, y_a) = run(&on_a, &mut ws);
    first.unwrap();
    assert!(y_a.iter().all(|v| *v != 7.0), "the forward on stream A ran");
    let bytes = ws.bytes();
    let (second, y_b) = run(&on_b, &mut ws);
    assert!(
        matches!(second, Err(Error::WorkspaceOnAnotherStream)),
        "{second:?}"
    );
    assert!(y_b.iter().all(|v| *v == 7.0), "a refused forward wrote y");
    assert_eq!(ws.bytes(), bytes);
    // Its own stream keeps it; a workspace of stream B's own serves B.
    run(&on_a, &mut ws).0.unwrap();
    run(&on_b, &mut Workspace::new()).0.unwrap();
    // Another handle of the same stream is the same stream.
    run(&on_a.with_stream(on_a.stream().clone()).unwrap(), &mut ws)
        .0
        .unwrap();
}

#[test]
#[ignore = "needs a CUDA device"]
fn a_norm_workspace_serves_one_stream() {
    use batchnorm_cuda::gpu::norms::{self, DeviceNormStats, Forward, NormWorkspace, Norms};
    use batchnorm_cuda::norms::NormDesc;
    let gpu = gpu();
    let desc = NormDesc::layer(&[4, 16], &[16]).unwrap();
    let x_host = random::<f32>(12, 64, 0.3, 1.0);
    let mut ws = NormWorkspace::new();
    let run =
        |gpu: &GpuContext, ws: &mut NormWorkspace| -> (batchnorm_cuda::Result<()>, Vec<f32>) {
            let norms = Norms::new(gpu).unwrap();
            let x = upload(gpu, &x_host);
            let mut y = upload(gpu, &[7.0f32; 64]);
            let mut stats = DeviceNormStats::new(gpu, desc.rows()).unwrap();
            let call = Forward::new(x.as_view(), 1e-5, y.as_view_mut(), stats.as_mut());
            let result = norms::forward(&norms, ws, &desc, call);
            (result, download(gpu, &y))
        };
    let (on_a, on_b) = (gpu.fork_stream().unwrap(), gpu.fork_stream().unwrap());
    let (first, y_a) = run(&on_a, &mut ws);
    first.unwrap();
    assert!(y_a.iter().all(|v| *v != 7.0), "the forward on stream A ran");
    let (second, y_b) = run(&on_b, &mut ws);
    assert!(
        matches!(second, Err(Error::WorkspaceOnAnotherStream)),
        "{second:?}"
    );
    assert!(y_b.iter().all(|v| *v == 7.0), "a refused forward wrote y");
    run(&on_b, &mut NormWorkspace::new()).0.unwrap();
}

/// The normalization layer's parts of a training step, on the device.
mod norm_layer {
    use super::*;
    use batchnorm_cuda::gpu::norms::{NormLayer, Norms};
    use batchnorm_cuda::norms::{InstanceNormConfig, NormConfig};
    use batchnorm_cuda::Layout;

    pub const DIMS: [usize; 4] = [3, 4, 5, 6];

    /// A tracked, affine instance norm with non-trivial state: a training step moves its
    /// running statistics and gradients.
    pub fn layer(norms: &Norms) -> NormLayer {
        let config = NormConfig::Instance(InstanceNormConfig {
            affine: true,
            track_running_stats: true,
            ..InstanceNormConfig::new(4)
        });
        let mut layer = NormLayer::new(norms, config).unwrap();
        let mut state = layer.state().unwrap();
        state.weight = Some(random(21, 4, 1.0, 0.3));
        state.bias = Some(random(22, 4, 0.0, 0.3));
        state.running_mean = Some(random(23, 4, 0.1, 0.2));
        state.running_var = Some(random(24, 4, 1.5, 0.4));
        layer.load_state(state).unwrap();
        layer
    }

    pub fn train(layer: &mut NormLayer, step: &mut Step) -> batchnorm_cuda::Result<()> {
        let cache = layer.forward(
            &step.x.as_view(),
            &DIMS,
            Layout::ChannelsFirst,
            &mut step.y.as_view_mut(),
        )?;
        let (x, dy) = (step.x.as_view(), step.dy.as_view());
        layer.backward(&cache, &x, &dy, &mut step.dx.as_view_mut())
    }

    pub fn snapshot(gpu: &GpuContext, layer: &NormLayer) -> (LayerState, Vec<f32>, Vec<f32>) {
        let grad = |g: Option<&CudaSlice<f32>>| download(gpu, g.expect("affine"));
        (
            layer.state().unwrap(),
            grad(layer.grad_weight()),
            grad(layer.grad_bias()),
        )
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn captured_norm_layer_step_replays_like_direct_calls() {
    use batchnorm_cuda::gpu::norms::Norms;
    use batchnorm_cuda::Layout;
    let gpu = capture_context();
    let norms = Norms::new(&gpu).unwrap();
    let (mut captured, mut direct) = (norm_layer::layer(&norms), norm_layer::layer(&norms));
    let (mut a, mut b) = (
        Step::new(&gpu, &norm_layer::DIMS, 5),
        Step::new(&gpu, &norm_layer::DIMS, 5),
    );
    captured
        .reserve(&norm_layer::DIMS, Layout::ChannelsFirst)
        .unwrap();
    let before = norm_layer::snapshot(&gpu, &captured);

    begin(&gpu);
    norm_layer::train(&mut captured, &mut a).unwrap();
    let graph = end(&gpu);
    assert_eq!(
        norm_layer::snapshot(&gpu, &captured),
        before,
        "captured, not run"
    );

    for _ in 0..3 {
        graph.launch().unwrap();
        norm_layer::train(&mut direct, &mut b).unwrap();
    }
    let (got, want) = (
        norm_layer::snapshot(&gpu, &captured),
        norm_layer::snapshot(&gpu, &direct),
    );
    assert_eq!(got, want, "running statistics and accumulated gradients");
    assert_ne!(got.0.running_mean, before.0.running_mean);
    assert_ne!(got.1, before.1);
    assert_eq!(download(&gpu, &a.y), download(&gpu, &b.y));
    assert_eq!(download(&gpu, &a.dx), download(&gpu, &b.dx));
    // zero_grad keeps the graph's buffers: the next replay accumulates from zero again.
    captured.zero_grad().unwrap();
    direct.zero_grad().unwrap();
    graph.launch().unwrap();
    norm_layer::train(&mut direct, &mut b).unwrap();
    assert_eq!(
        norm_layer::snapshot(&gpu, &captured),
        norm_layer::snapshot(&gpu, &direct)
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn norm_layer_cannot_grow_during_or_after_a_capture() {
    use batchnorm_cuda::gpu::norms::Norms;
    use batchnorm_cuda::Layout;
    let gpu = capture_context();
    let norms = Norms::new(&gpu).unwrap();
    let mut layer = norm_layer::layer(&norms);
    let mut step = Step::new(&gpu, &norm_layer::DIMS, 6);
    let (before, y_before) = (norm_layer::snapshot(&gpu, &layer), download(&gpu, &step.y));

    begin(&gpu);
    let got = norm_layer::train(&mut layer, &mut step);
    drop(end(&gpu));
    assert!(
        matches!(
            got,
            Err(Error::WorkspaceCannotGrow { needed, reason, .. })
                if needed > 0 && reason.contains("capturing")
        ),
        "{got:?}"
    );
    assert_eq!(norm_layer::snapshot(&gpu, &layer), before);
    assert_eq!(download(&gpu, &step.y), y_before);

    // Reserved for the small shape, the step captures; a larger shape afterwards is refused.
    layer
        .reserve(&norm_layer::DIMS, Layout::ChannelsFirst)
        .unwrap();
    begin(&gpu);
    norm_layer::train(&mut layer, &mut step).unwrap();
    let graph = end(&gpu);
    let large_dims = [8, 4, 16, 16];
    let mut large = Step::new(&gpu, &large_dims, 7);
    let before = norm_layer::snapshot(&gpu, &layer);
    let got = layer.forward(
        &large.x.as_view(),
        &large_dims,
        Layout::ChannelsFirst,
        &mut large.y.as_view_mut(),
    );
    assert!(
        matches!(
            got,
            Err(Error::WorkspaceCannotGrow { held, needed, reason })
                if needed > held && reason.contains("may still read")
        ),
        "{got:?}"
    );
    assert_eq!(norm_layer::snapshot(&gpu, &layer), before);
    graph.launch().unwrap();
    assert_ne!(
        norm_layer::snapshot(&gpu, &layer).0.running_mean,
        before.0.running_mean
    );
}
