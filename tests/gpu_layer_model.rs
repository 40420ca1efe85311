//! The GPU layer against the CPU reference layer over random sequences of calls: forwards (plain,
//! with ReLU, with add + ReLU; with or without their backward) in training and eval mode, mode
//! switches, `zero_grad`, new parameters and running statistics, and a state round trip into a
//! fresh layer, for random configurations (affine, tracking, momentum including `None`, 0 and 1),
//! shapes, layouts and dtypes (f32, f16, bf16; statistics and parameters are f32 in all three).
//! After every call the two layers must agree: outputs, masks (the stored y's sign), accumulated
//! gradients, running statistics, the counter, and the same refusals (one value per channel in
//! training) with the state left as it was. Needs a CUDA device: run with `--include-ignored` on
//! a GPU machine.

mod common;

use batchnorm_cuda::epilogue::{mask_words, unpack_mask};
use batchnorm_cuda::gpu::{self, GpuContext};
use batchnorm_cuda::reference;
use batchnorm_cuda::{
    BatchNormConfig, DType, Element, EpilogueKind, LayerState, Layout, StatefulLayer, TensorDesc,
};
use common::gpu::*;
use common::{compare, tolerance, widen, widen_f32, Quantity, Tol};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

#[derive(Clone, Debug)]
enum Op {
    /// A forward of `n` samples drawn from `seed` (plain, `relu(BN(x))` or `relu(BN(x) + z)`),
    /// then its backward when `backward`.
    Forward {
        n: usize,
        seed: u64,
        backward: bool,
        epilogue: Option<EpilogueKind>,
    },
    Train,
    Eval,
    ZeroGrad,
    SetParameters(u64),
    SetRunningStats(u64),
    /// `state()` of each layer loaded into a fresh one, which replaces it.
    Reload,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (
            1usize..=4,
            any::<u64>(),
            any::<bool>(),
            prop_oneof![
                2 => Just(None),
                1 => Just(Some(EpilogueKind::Relu)),
                1 => Just(Some(EpilogueKind::AddRelu))
            ]
        )
            .prop_map(|(n, seed, backward, epilogue)| Op::Forward {
                n,
                seed,
                backward,
                epilogue
            }),
        1 => Just(Op::Train),
        1 => Just(Op::Eval),
        1 => Just(Op::ZeroGrad),
        1 => any::<u64>().prop_map(Op::SetParameters),
        1 => any::<u64>().prop_map(Op::SetRunningStats),
        1 => Just(Op::Reload),
    ]
}

fn check(what: &str, got: &[f64], want: &[f64], tol: Tol) -> Result<(), TestCaseError> {
    compare(got, want, tol)
        .map(|_| ())
        .map_err(|e| TestCaseError::fail(format!("{what}: {e}")))
}

/// The two layers' states agree: parameters bitwise (both were set from the same values and
/// never trained here), running statistics within the statistics tolerance, the counter exactly.
fn same_state(what: &str, gpu: &LayerState, cpu: &LayerState) -> Result<(), TestCaseError> {
    prop_assert_eq!(&gpu.weight, &cpu.weight, "{}: weight", what);
    prop_assert_eq!(&gpu.bias, &cpu.bias, "{}: bias", what);
    prop_assert_eq!(
        gpu.num_batches_tracked,
        cpu.num_batches_tracked,
        "{}: num_batches_tracked",
        what
    );
    let stat = tolerance(DType::F32, Quantity::Statistic);
    for (name, g, c) in [
        ("running_mean", &gpu.running_mean, &cpu.running_mean),
        ("running_var", &gpu.running_var, &cpu.running_var),
    ] {
        match (g, c) {
            (Some(g), Some(c)) => check(
                &format!("{what}: {name}"),
                &widen_f32(g),
                &widen_f32(c),
                stat,
            )?,
            (None, None) => {}
            _ => prop_assert!(false, "{}: {} present on one side only", what, name),
        }
    }
    Ok(())
}

struct Model {
    cpu: reference::BatchNorm,
    gpu: gpu::BatchNorm,
    /// The CPU side's accumulated parameter gradients (the reference returns each backward's).
    grad_weight: Vec<f32>,
    grad_bias: Vec<f32>,
}

impl Model {
    /// Both layers, through the trait they share: the same call on each.
    fn both(&mut self) -> [&mut dyn StatefulLayer; 2] {
        [&mut self.cpu, &mut self.gpu]
    }
}

/// One forward (and its backward) on both layers; `Ok(false)` when both refused it alike.
fn forward_step<T: Element>(
    ctx: &GpuContext,
    m: &mut Model,
    desc: &TensorDesc,
    seed: u64,
    backward: bool,
    epilogue: Option<EpilogueKind>,
    what: &str,
) -> Result<bool, TestCaseError> {
    let act = tolerance(T::DTYPE, Quantity::Activation);
    let numel = desc.numel();
    let x: Vec<T> = random(seed, numel, 0.5, 2.0);
    let z: Vec<T> = random(seed ^ 0x2545f491, numel, 0.0, 1.0);
    let (cpu_before, gpu_before) = (m.cpu.state(), m.gpu.state().unwrap());
    let (xd, zd) = (upload(ctx, &x), upload(ctx, &z));
    let mut yd = zeros::<T>(ctx, numel);
    let mut maskd = ctx
        .stream()
        .alloc_zeros::<u32>(mask_words(desc).max(1))
        .unwrap();
    let mut mask = maskd.slice_mut(..mask_words(desc));
    let (x_, z_) = (xd.as_view(), zd.as_view());
    let mut y_ = yd.as_view_mut();
    let got = match epilogue {
        None => m.gpu.forward(desc, &x_, &mut y_),
        Some(EpilogueKind::Relu) => m.gpu.forward_relu(desc, &x_, &mut y_, Some(&mut mask)),
        Some(EpilogueKind::AddRelu) => {
            m.gpu
                .forward_add_relu(desc, &x_, &z_, &mut y_, Some(&mut mask))
        }
    };
    let want = match epilogue {
        None => m.cpu.forward(&x, desc),
        Some(EpilogueKind::Relu) => m.cpu.forward_relu(&x, desc).map(|(y, _, cache)| (y, cache)),
        Some(EpilogueKind::AddRelu) => m
            .cpu
            .forward_add_relu(&x, &z, desc)
            .map(|(y, _, cache)| (y, cache)),
    };
    let (gcache, (y, cache)) = match (got, want) {
        (Ok(g), Ok(w)) => (g, w),
        (Err(g), Err(w)) => {
            // The same refusal, and neither layer changed.
            prop_assert_eq!(format!("{g:?}"), format!("{w:?}"), "{}", what);
            same_state(what, &m.gpu.state().unwrap(), &gpu_before)?;
            same_state(what, &m.cpu.state(), &cpu_before)?;
            return Ok(false);
        }
        (g, w) => {
            return Err(TestCaseError::fail(format!(
                "{what}: GPU {g:?}, CPU {:?}",
                w.map(|_| ())
            )))
        }
    };
    let y_gpu = download(ctx, &yd);
    check(&format!("{what}: y"), &widen(&y_gpu), &widen(&y), act)?;
    // The mask the GPU wrote is the stored y's sign (the ABI's definition); the CPU backward
    // takes it too, so both sides see the same ReLU where y is within rounding of 0.
    let mask_host = ctx.stream().clone_dtoh(&maskd).unwrap()[..mask_words(desc)].to_vec();
    if epilogue.is_some() {
        let bits = unpack_mask(desc, &mask_host).unwrap();
        let y_wide = widen(&y_gpu);
        prop_assert!(
            bits.iter().zip(&y_wide).all(|(&b, &v)| b == (v > 0.0)),
            "{}: mask bits differ from y > 0",
            what
        );
    }
    if !backward {
        return Ok(true);
    }
    let dy: Vec<T> = random(seed ^ 0x5bd1e995, numel, 0.0, 1.0);
    let dyd = upload(ctx, &dy);
    let mut dxd = zeros::<T>(ctx, numel);
    let mut dzd = zeros::<T>(ctx, numel);
    let (x_, dy_, mask_) = (xd.as_view(), dyd.as_view(), maskd.slice(..mask_words(desc)));
    let dx_ = Some(dxd.as_view_mut());
    let grads = match epilogue {
        None => {
            m.gpu.backward(&gcache, &x_, &dy_, dx_).unwrap();
            m.cpu.backward(&cache, &x, &dy).unwrap()
        }
        Some(EpilogueKind::Relu) => {
            m.gpu
                .backward_relu(&gcache, &x_, &dy_, &mask_, dx_)
                .unwrap();
            m.cpu.backward_relu(&cache, &x, &dy, &mask_host).unwrap()
        }
        Some(EpilogueKind::AddRelu) => {
            m.gpu
                .backward_add_relu(&gcache, &x_, &dy_, &mask_, dx_, Some(dzd.as_view_mut()))
                .unwrap();
            let (grads, dz) = m
                .cpu
                .backward_add_relu(&cache, &x, &dy, &mask_host)
                .unwrap();
            prop_assert_eq!(widen(&download(ctx, &dzd)), widen(&dz), "{}: dz", what);
            grads
        }
    };
    check(
        &format!("{what}: dx"),
        &widen(&download(ctx, &dxd)),
        &widen(&grads.dx),
        act,
    )?;
    if let (Some(dw), Some(db)) = (grads.dweight, grads.dbias) {
        m.grad_weight.iter_mut().zip(&dw).for_each(|(a, g)| *a += g);
        m.grad_bias.iter_mut().zip(&db).for_each(|(a, g)| *a += g);
    }
    Ok(true)
}

fn run<T: Element>(
    ctx: &GpuContext,
    config: BatchNormConfig,
    spatial: &[usize],
    layout: Layout,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let c = config.num_features;
    let mut m = Model {
        cpu: reference::BatchNorm::new(config).unwrap(),
        gpu: gpu::BatchNorm::new(ctx, config).unwrap(),
        grad_weight: vec![0.0; c],
        grad_bias: vec![0.0; c],
    };
    for (step, op) in ops.iter().enumerate() {
        let what = format!("step {step} {op:?}");
        match *op {
            Op::Forward {
                n,
                seed,
                backward,
                epilogue,
            } => {
                let mut dims = vec![n, c];
                dims.extend_from_slice(spatial);
                let desc = TensorDesc::new(&dims, layout).unwrap();
                if !forward_step::<T>(ctx, &mut m, &desc, seed, backward, epilogue, &what)? {
                    continue;
                }
            }
            Op::Train => m.both().into_iter().for_each(|layer| layer.train()),
            Op::Eval => m.both().into_iter().for_each(|layer| layer.eval()),
            Op::ZeroGrad => {
                m.gpu.zero_grad().unwrap();
                m.grad_weight.fill(0.0);
                m.grad_bias.fill(0.0);
            }
            Op::SetParameters(seed) if config.affine => {
                let (w, b) = (
                    random_f32(seed, c, -1.5, 1.5),
                    random_f32(seed + 1, c, -0.5, 0.5),
                );
                for layer in m.both() {
                    layer.set_weight(&w).unwrap();
                    layer.set_bias(&b).unwrap();
                }
            }
            Op::SetRunningStats(seed) if config.track_running_stats => {
                let (mean, var) = (
                    random_f32(seed, c, -1.0, 1.0),
                    random_f32(seed + 1, c, 0.1, 3.0),
                );
                for layer in m.both() {
                    layer.set_running_stats(&mean, &var).unwrap();
                }
            }
            Op::SetParameters(_) | Op::SetRunningStats(_) => {}
            Op::Reload => {
                let training = m.cpu.is_training();
                let mut cpu = reference::BatchNorm::new(config).unwrap();
                let mut fresh = gpu::BatchNorm::new(ctx, config).unwrap();
                let reloaded: [(&mut dyn StatefulLayer, &dyn StatefulLayer); 2] =
                    [(&mut cpu, &m.cpu), (&mut fresh, &m.gpu)];
                for (layer, from) in reloaded {
                    layer.load_state(&from.state().unwrap()).unwrap();
                    if !training {
                        layer.eval();
                    }
                }
                // Gradients are not state: the fresh layer starts from zero.
                m = Model {
                    cpu,
                    gpu: fresh,
                    grad_weight: vec![0.0; c],
                    grad_bias: vec![0.0; c],
                };
            }
        }
        prop_assert_eq!(m.gpu.is_training(), m.cpu.is_training(), "{}", what);
        same_state(&what, &m.gpu.state().unwrap(), &m.cpu.state())?;
        if config.affine {
            for (name, got, want) in [
                ("grad_weight", m.gpu.grad_weight(), &m.grad_weight),
                ("grad_bias", m.gpu.grad_bias(), &m.grad_bias),
            ] {
                let got = got.unwrap().unwrap();
                check(
                    &format!("{what}: {name}"),
                    &widen_f32(&got),
                    &widen_f32(want),
                    tolerance(DType::F32, Quantity::ParamGrad),
                )?;
            }
        }
    }
    Ok(())
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_layer_follows_the_reference_layer_over_random_call_sequences() {
    let ctx = gpu();
    let case = (
        1usize..=6,
        proptest::collection::vec(1usize..=5, 0..=2),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![
            Just(None),
            Just(Some(0.0f32)),
            Just(Some(1.0f32)),
            (0.0f32..=1.0).prop_map(Some)
        ],
        proptest::collection::vec(op(), 1..=12),
        0usize..3,
    );
    let mut runner = TestRunner::new(Config::default());
    runner
        .run(
            &case,
            |(c, spatial, last, affine, track, momentum, ops, dtype)| {
                let config = BatchNormConfig::new(c)
                    .affine(affine)
                    .track_running_stats(track)
                    .momentum(momentum);
                let layout = if last {
                    Layout::ChannelsLast
                } else {
                    Layout::ChannelsFirst
                };
                match dtype {
                    0 => run::<f32>(&ctx, config, &spatial, layout, &ops),
                    1 => run::<half::f16>(&ctx, config, &spatial, layout, &ops),
                    _ => run::<half::bf16>(&ctx, config, &spatial, layout, &ops),
                }
            },
        )
        .unwrap();
}
