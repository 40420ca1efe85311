//! Issue 8, concurrency (every test needs a CUDA device: run with `--include-ignored` on a GPU
//! machine, `scripts/gpu-run.sh`): two layers on two streams of one context, and one context
//! shared by two threads (on its one stream, and on a stream each), give bitwise the results
//! each gives when it runs alone. The kernels are deterministic (fixed reduction order, no
//! float atomics), so "the same" means every bit of every output, gradient and statistic. And
//! split reductions queued back to back on one workspace never read another launch's partials.

mod common;

use batchnorm_cuda::gpu::functional::{self, GradientsMut, SavedStats, SavedStatsMut};
use batchnorm_cuda::gpu::{self, GpuContext, Workspace};
use batchnorm_cuda::reference;
use batchnorm_cuda::{BatchNormConfig, Element, LayerState, Layout, TensorDesc};
use common::gpu::{download, gpu, param_ratio, random, random_f32, stat_ratio, upload, zeros};
use cudarc::driver::CudaSlice;
use half::f16;
use std::sync::Arc;

/// Steps of one job; the last runs in eval mode (eval forward and backward).
const STEPS: usize = 4;

/// One layer's work: its shape, starting state and the inputs of every step.
struct Job<T> {
    desc: TensorDesc,
    state: LayerState,
    inputs: Vec<(Vec<T>, Vec<T>)>,
}

impl<T: Element> Job<T> {
    fn new(dims: &[usize], layout: Layout, seed: u64) -> Self {
        let desc = TensorDesc::new(dims, layout).unwrap();
        let (n, c) = (desc.numel(), desc.channels());
        let inputs = (0..STEPS as u64)
            .map(|s| {
                let x = random(seed + 10 * s, n, 0.2 * s as f64, 1.5);
                let dy = random(seed + 10 * s + 1, n, 0.05, 1.0);
                (x, dy)
            })
            .collect();
        let state = LayerState {
            weight: Some(random_f32(seed + 100, c, 0.5, 1.5)),
            bias: Some(random_f32(seed + 101, c, -0.5, 0.5)),
            running_mean: Some(random_f32(seed + 102, c, -0.2, 0.2)),
            running_var: Some(random_f32(seed + 103, c, 0.5, 2.0)),
            num_batches_tracked: 1,
        };
        Self {
            desc,
            state,
            inputs,
        }
    }
}

/// Every result of a job, as bits.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    ys: Vec<Vec<u8>>,
    dxs: Vec<Vec<u8>>,
    grad_weight: Vec<u32>,
    grad_bias: Vec<u32>,
    state: Vec<Vec<u32>>,
    counter: u64,
}

fn f32_bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

fn element_bytes<T: Element>(values: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(values).to_vec()
}

/// A job queued on one context's stream: the layer, its inputs and outputs on the device.
/// Steps queue work without waiting for the host; `finish` downloads.
struct Run<T> {
    gpu: GpuContext,
    bn: gpu::BatchNorm,
    desc: TensorDesc,
    inputs: Vec<(CudaSlice<T>, CudaSlice<T>)>,
    outputs: Vec<(CudaSlice<T>, CudaSlice<T>)>,
}

impl<T: Element> Run<T> {
    fn new(gpu: &GpuContext, job: &Job<T>) -> Self {
        let mut bn = gpu::BatchNorm::new(gpu, BatchNormConfig::new(job.desc.channels())).unwrap();
        bn.load_state(&job.state).unwrap();
        let n = job.desc.numel();
        Self {
            gpu: gpu.clone(),
            bn,
            desc: job.desc,
            inputs: job
                .inputs
                .iter()
                .map(|(x, dy)| (upload(gpu, x), upload(gpu, dy)))
                .collect(),
            outputs: (0..STEPS).map(|_| (zeros(gpu, n), zeros(gpu, n))).collect(),
        }
    }

    fn step(&mut self, s: usize) {
        if s == STEPS - 1 {
            self.bn.eval();
        }
        let (x, dy) = &self.inputs[s];
        let (y, dx) = &mut self.outputs[s];
        let cache = self
            .bn
            .forward(&self.desc, &x.as_view(), &mut y.as_view_mut())
            .expect("forward");
        self.bn
            .backward(&cache, &x.as_view(), &dy.as_view(), Some(dx.as_view_mut()))
            .expect("backward");
    }

    fn finish(self) -> Outcome {
        let gpu = &self.gpu;
        let state = self.bn.state().unwrap();
        Outcome {
            ys: self
                .outputs
                .iter()
                .map(|(y, _)| element_bytes(&download(gpu, y)))
                .collect(),
            dxs: self
                .outputs
                .iter()
                .map(|(_, dx)| element_bytes(&download(gpu, dx)))
                .collect(),
            grad_weight: f32_bits(&self.bn.grad_weight().unwrap().unwrap()),
            grad_bias: f32_bits(&self.bn.grad_bias().unwrap().unwrap()),
            state: [
                &state.weight,
                &state.bias,
                &state.running_mean,
                &state.running_var,
            ]
            .iter()
            .map(|v| f32_bits(v.as_ref().unwrap()))
            .collect(),
            counter: state.num_batches_tracked,
        }
    }
}

/// The job alone on `gpu`'s stream, every step queued, then downloaded.
fn alone<T: Element>(gpu: &GpuContext, job: &Job<T>) -> Outcome {
    let mut run = Run::new(gpu, job);
    (0..STEPS).for_each(|s| run.step(s));
    run.finish()
}

/// Two jobs of different dtypes, shapes and layouts (planar and rows kernels).
fn jobs() -> (Job<f16>, Job<f32>) {
    (
        Job::new(&[16, 32, 28, 28], Layout::ChannelsFirst, 1000),
        Job::new(&[32, 64, 14, 14], Layout::ChannelsLast, 2000),
    )
}

fn assert_same(label: &str, got: &Outcome, want: &Outcome) {
    assert_eq!(got.counter, want.counter, "{label}: counter");
    assert!(
        got == want,
        "{label}: differs from the run alone in {}",
        [
            ("y", got.ys != want.ys),
            ("dx", got.dxs != want.dxs),
            ("grad_weight", got.grad_weight != want.grad_weight),
            ("grad_bias", got.grad_bias != want.grad_bias),
            ("state", got.state != want.state),
        ]
        .iter()
        .filter(|(_, differs)| *differs)
        .map(|(what, _)| *what)
        .collect::<Vec<_>>()
        .join(", ")
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn two_layers_on_two_streams_of_one_context_match_running_alone() {
    let gpu = gpu();
    let (job_a, job_b) = jobs();
    let want_a = alone(&gpu, &job_a);
    let want_b = alone(&gpu, &job_b);
    assert_eq!(want_a.counter, 1 + (STEPS as u64 - 1));

    for round in 0..3 {
        let stream_a = gpu.fork_stream().unwrap();
        let stream_b = gpu.fork_stream().unwrap();
        assert!(!Arc::ptr_eq(stream_a.stream(), stream_b.stream()));
        assert!(Arc::ptr_eq(stream_a.cuda(), stream_b.cuda()), "one context");
        let mut a = Run::new(&stream_a, &job_a);
        let mut b = Run::new(&stream_b, &job_b);
        // Interleaved on the host; nothing waits until the downloads, so the streams overlap.
        for s in 0..STEPS {
            a.step(s);
            b.step(s);
        }
        let (got_a, got_b) = (a.finish(), b.finish());
        assert_same(
            &format!("round {round}, layer A on stream A"),
            &got_a,
            &want_a,
        );
        assert_same(
            &format!("round {round}, layer B on stream B"),
            &got_b,
            &want_b,
        );
    }
    println!("two streams: 3 rounds bitwise equal to the runs alone");
}

/// Two threads, each running its job `rounds` times on its own clone of `gpu`, or on a stream
/// of its own when `fork` is set.
fn two_threads(gpu: &GpuContext, fork: bool, want: (&Outcome, &Outcome)) {
    let (job_a, job_b) = jobs();
    let context = |gpu: &GpuContext| {
        if fork {
            gpu.fork_stream().unwrap()
        } else {
            gpu.clone()
        }
    };
    let (got_a, got_b) = std::thread::scope(|scope| {
        let (ctx_a, ctx_b) = (context(gpu), context(gpu));
        let (job_a, job_b) = (&job_a, &job_b);
        let a = scope.spawn(move || (0..4).map(|_| alone(&ctx_a, job_a)).collect::<Vec<_>>());
        let b = scope.spawn(move || (0..4).map(|_| alone(&ctx_b, job_b)).collect::<Vec<_>>());
        (a.join().unwrap(), b.join().unwrap())
    });
    for (round, (a, b)) in got_a.iter().zip(&got_b).enumerate() {
        assert_same(&format!("fork={fork} round {round}, thread A"), a, want.0);
        assert_same(&format!("fork={fork} round {round}, thread B"), b, want.1);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn one_context_shared_by_two_threads_matches_running_alone() {
    let gpu = gpu();
    let (job_a, job_b) = jobs();
    let want_a = alone(&gpu, &job_a);
    let want_b = alone(&gpu, &job_b);
    // Clones of one context: one stream, shared.
    two_threads(&gpu, false, (&want_a, &want_b));
    // One context, a stream per thread.
    two_threads(&gpu, true, (&want_a, &want_b));
    println!("two threads: 4 rounds each, shared stream and a stream each, bitwise equal");
}

/// The split reductions' last block reads the partials the other blocks of its channel wrote
/// (fence, semaphore, L2 loads: kernels/common.cuh, arrive_last), which only the hardware's
/// memory ordering can show. 32 training forwards and backwards queued back to back on one
/// workspace, alternating two inputs with different statistics, must each give bitwise the
/// results of the first call on their input (which are checked against the CPU reference): a
/// partial read before it was published, or left by the previous launch, would carry the
/// other input's or a zeroed block's sums. Planar and rows kernels, many blocks per channel.
#[test]
#[ignore = "needs a CUDA device"]
fn back_to_back_split_reductions_read_no_stale_partial() {
    const CALLS: usize = 32;
    let gpu = gpu();
    for (dims, layout) in [
        ([64, 2, 128, 128], Layout::ChannelsFirst),
        ([64, 8, 64, 64], Layout::ChannelsLast),
    ] {
        let desc = TensorDesc::new(&dims, layout).unwrap();
        let (n, c) = (desc.numel(), desc.channels());
        let host: Vec<(Vec<f16>, Vec<f16>)> = [(0.0, 1.0), (3.0, 2.0)]
            .iter()
            .enumerate()
            .map(|(k, &(mean, spread))| {
                let seed = 50 + 2 * k as u64;
                (
                    random(seed, n, mean, spread),
                    random(seed + 1, n, mean / 3.0, 1.0),
                )
            })
            .collect();
        let inputs: Vec<_> = host
            .iter()
            .map(|(x, dy)| (upload(&gpu, x), upload(&gpu, dy)))
            .collect();
        let mut ws = Workspace::new();
        let mut y = zeros::<f16>(&gpu, n);
        // Per call: mean, invstd, dweight, dbias, mean_lo (C each).
        let mut out: [CudaSlice<f32>; 5] = std::array::from_fn(|_| zeros(&gpu, CALLS * c));
        for call in 0..CALLS {
            let (x, dy) = &inputs[call % 2];
            let at = call * c..(call + 1) * c;
            let [mean, invstd, dweight, dbias, mean_lo] = &mut out;
            functional::forward(
                &gpu,
                &mut ws,
                functional::Forward {
                    desc,
                    x: x.as_view(),
                    weight: None,
                    bias: None,
                    stats: functional::ForwardStats::Batch(functional::BatchStats {
                        saved: SavedStatsMut {
                            mean: mean.slice_mut(at.clone()),
                            mean_lo: mean_lo.slice_mut(at.clone()),
                            invstd: invstd.slice_mut(at.clone()),
                        },
                        running: None,
                        eps: 1e-5,
                    }),
                    y: y.as_view_mut(),
                    epilogue: functional::Epilogue::None,
                },
            )
            .expect("training forward");
            functional::backward(
                &gpu,
                &mut ws,
                functional::Backward {
                    desc,
                    x: x.as_view(),
                    dy: dy.as_view(),
                    weight: None,
                    stats: functional::BackwardStats::Batch(SavedStats {
                        mean: mean.slice(at.clone()),
                        mean_lo: Some(mean_lo.slice(at.clone())),
                        invstd: invstd.slice(at.clone()),
                    }),
                    grads: GradientsMut {
                        dx: None,
                        dweight: Some(dweight.slice_mut(at.clone())),
                        dbias: Some(dbias.slice_mut(at)),
                        accumulate: false,
                    },
                    epilogue: functional::EpilogueGrad::None,
                },
            )
            .expect("training backward");
        }
        let got: Vec<Vec<f32>> = out.iter().map(|o| download(&gpu, o)).collect();
        let of_call = |q: usize, call: usize| &got[q][call * c..(call + 1) * c];
        for (k, (x, dy)) in host.iter().enumerate() {
            let mut ref_y = vec![f16::ZERO; n];
            let saved =
                reference::forward_training(x, &desc, None, None, None, 1e-5, &mut ref_y).unwrap();
            let (mut dweight, mut dbias) = (vec![0.0; c], vec![0.0; c]);
            let grads = reference::Gradients {
                dx: None,
                dweight: Some(&mut dweight),
                dbias: Some(&mut dbias),
                accumulate: false,
            };
            // The backward from the device's saved statistics, as the device's backward ran
            // (the device's bits are the point of this test).
            let device_saved = reference::SavedStats {
                mean: of_call(0, k).to_vec(),
                mean_lo: of_call(4, k).to_vec(),
                invstd: of_call(1, k).to_vec(),
            };
            reference::backward_training(x, dy, &desc, None, &device_saved, grads).unwrap();
            let checks = [
                stat_ratio(of_call(0, k), &saved.mean),
                stat_ratio(of_call(1, k), &saved.invstd),
                param_ratio(of_call(2, k), &dweight),
                param_ratio(of_call(3, k), &dbias),
            ];
            assert!(
                checks.iter().all(|r| *r <= 1.0),
                "{desc} input {k}: {checks:?} of the tolerance"
            );
        }
        assert_ne!(of_call(0, 0), of_call(0, 1), "the two inputs' means differ");
        for call in 2..CALLS {
            for (q, what) in ["mean", "invstd", "dweight", "dbias"].iter().enumerate() {
                let (a, b) = (of_call(q, call), of_call(q, call % 2));
                assert!(
                    a.iter().zip(b).all(|(p, r)| p.to_bits() == r.to_bits()),
                    "{desc}: call {call}'s {what} differs from call {}'s",
                    call % 2
                );
            }
        }
        println!("{desc}: {CALLS} back-to-back calls on one workspace, bitwise stable");
    }
}
