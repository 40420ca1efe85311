//! The candle adapter (`batchnorm_cuda::candle`, feature `candle`) on candle CPU tensors: every
//! golden case through `forward_t` and candle's autograd, the running statistics over several
//! steps against this crate's CPU layer, layouts, refusals, checkpoints in PyTorch's format,
//! and a small network that learns. The CUDA path's tests (feature `candle-cuda`) are ignored
//! without a device.

mod common;

use batchnorm_cuda::candle::{BatchNorm, Dims};
use batchnorm_cuda::state::StateFile;
use batchnorm_cuda::{reference, BatchNormConfig, Element, LayerState, Layout, TensorDesc};
use candle_core::{DType, Device, Result, Tensor, Var, WithDType};
use candle_nn::{ModuleT, Optimizer, VarBuilder, VarMap};
use common::{run_all, widen, with_dtype, BnInputs, Case, Checks, Stored};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The logical axes in memory order: `[0, 1, 2, ..]` channels-first, `[0, 2, .., 1]`
/// channels-last.
fn memory_axes(desc: &TensorDesc) -> Vec<usize> {
    let rank = desc.rank();
    match desc.layout() {
        Layout::ChannelsFirst => (0..rank).collect(),
        Layout::ChannelsLast => std::iter::once(0).chain(2..rank).chain([1]).collect(),
    }
}

/// The logical `(N, C, ...)` view of a tensor of `desc.memory_dims()` (a permuted tensor when
/// channels-last).
fn logical_view(memory_order: &Tensor, desc: &TensorDesc) -> Result<Tensor> {
    let axes = memory_axes(desc);
    let mut inverse = vec![0; axes.len()];
    for (memory_axis, &logical_axis) in axes.iter().enumerate() {
        inverse[logical_axis] = memory_axis;
    }
    memory_order.permute(inverse)
}

/// A `Var` holding `values` in `desc`'s memory order, and its logical view.
fn activation<T: WithDType>(values: Vec<T>, desc: &TensorDesc) -> Result<(Var, Tensor)> {
    let var = Var::from_tensor(&Tensor::from_vec(values, desc.memory_dims(), &Device::Cpu)?)?;
    let logical = logical_view(var.as_tensor(), desc)?;
    Ok((var, logical))
}

/// A logical `(N, C, ...)` tensor's values in `desc`'s memory order.
fn memory_values<T: WithDType>(logical: &Tensor, desc: &TensorDesc) -> Result<Vec<T>> {
    logical.permute(memory_axes(desc))?.flatten_all()?.to_vec1()
}

fn f64s(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()
}

/// A batch norm of the case's configuration and state, on a fresh `VarMap`.
fn layer_of(case: &Case, varmap: &VarMap) -> Result<BatchNorm> {
    let desc = case.desc();
    let dims = match desc.rank() {
        2 | 3 => Dims::One,
        4 => Dims::Two,
        _ => Dims::Three,
    };
    let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
    let bn = BatchNorm::new(dims, case.config(), vb)?;
    let c = desc.channels();
    let mut varmap = varmap.clone();
    for name in ["weight", "bias", "running_mean", "running_var"] {
        if let Some(values) = case.values::<f32>(name) {
            varmap.set_one(name, Tensor::from_vec(values, c, &Device::Cpu)?)?;
        }
    }
    if case.flag("track_running_stats") {
        let count = case.num_batches_tracked() as i64;
        varmap.set_one("num_batches_tracked", Tensor::new(count, &Device::Cpu)?)?;
    }
    Ok(bn)
}

/// A layer's running mean, running variance and counter.
type Statistics = (Option<Vec<f32>>, Option<Vec<f32>>, Option<u64>);

/// The running statistics and counter of a layer, for the refused-call check.
fn state_of(bn: &BatchNorm) -> Result<Statistics> {
    Ok((
        bn.running_mean()
            .map(|v| v.as_tensor().to_vec1())
            .transpose()?,
        bn.running_var()
            .map(|v| v.as_tensor().to_vec1())
            .transpose()?,
        bn.num_batches_tracked()?,
    ))
}

/// One golden case through the adapter: `forward_t` in the case's mode, then, when the case has
/// `dy`, candle's autograd of `sum(y * dy)`, whose gradient with respect to `y` is exactly `dy`.
fn golden<T: Element + Stored + WithDType>(case: &Case, checks: &mut Checks) {
    let mut run = || -> Result<()> {
        let BnInputs { x, dy, .. } = case.bn_inputs::<T>();
        let desc = case.desc();
        let varmap = VarMap::new();
        let bn = layer_of(case, &varmap)?;
        let (x_var, x) = activation(x, &desc)?;
        let before = state_of(&bn)?;
        let result = bn.forward_t(&x, case.training());
        if let Some(error) = case.expect_error() {
            assert_eq!(
                error, "single_value_per_channel",
                "teach this test the error"
            );
            match result {
                Err(e)
                    if e.to_string()
                        .contains("expected more than 1 value per channel") =>
                {
                    checks.note(format!("refused: {e}"))
                }
                Err(e) => checks.fail(format!("expected {error}, got {e}")),
                Ok(_) => checks.fail(format!("expected {error}, the call succeeded")),
            }
            if state_of(&bn)? != before {
                checks.fail("the refused call changed the running statistics or the counter");
            }
            return Ok(());
        }
        let y = result?;
        assert_eq!(y.dims(), desc.dims());
        checks.compare_golden(case, "y", Some(widen(&memory_values::<T>(&y, &desc)?)));
        for (name, var) in [
            ("running_mean", bn.running_mean()),
            ("running_var", bn.running_var()),
        ] {
            let got = var.map(|v| f64s(v.as_tensor())).transpose()?;
            checks.compare_golden(case, name, got);
        }
        if let Some(expected) = case.expect_num_batches_tracked() {
            let got = bn.num_batches_tracked()?.unwrap_or(0);
            checks.equal("num_batches_tracked", got, expected);
        }
        for name in ["save_mean", "save_invstd"] {
            checks.not_exposed(name, "kept inside the adapter's op for its backward");
        }
        if let Some(dy) = dy {
            let (_, dy) = activation(dy, &desc)?;
            let grads = (&y * dy.detach())?.sum_all()?.backward()?;
            let dx = grads.get(x_var.as_tensor()).expect("x has a gradient");
            checks.compare_golden(case, "dx", Some(widen(&dx.flatten_all()?.to_vec1::<T>()?)));
            for (name, param) in [("dweight", bn.weight()), ("dbias", bn.bias())] {
                let got = param
                    .map(|p| f64s(grads.get(p).expect("a parameter has a gradient")))
                    .transpose()?;
                checks.compare_golden(case, name, got);
            }
        }
        Ok(())
    };
    if let Err(e) = run() {
        checks.fail(format!("candle error: {e}"));
    }
}

#[test]
fn golden_cases_through_the_adapter_and_autograd() {
    run_all(&common::batchnorm_cases(), "candle", |case, checks| {
        with_dtype!(case.dtype(), golden(case, checks))
    });
}

/// Seeded values of about unit spread around `shift`.
fn random(rng: &mut StdRng, len: usize, shift: f32) -> Vec<f32> {
    (0..len)
        .map(|_| shift + rng.random_range(-2.0..2.0))
        .collect()
}

/// Several training steps and an eval step through the adapter and through this crate's CPU
/// layer (`reference::BatchNorm`) agree exactly: the same reference calls with the same
/// factors, momentum and cumulative average alike.
#[test]
fn running_statistics_over_steps_match_the_crate_layer() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(21);
    for momentum in [Some(0.1), Some(0.7), None] {
        let config = BatchNormConfig::new(3).momentum(momentum);
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let bn = BatchNorm::new(Dims::Two, config, vb)?;
        let mut layer = reference::BatchNorm::new(config).unwrap();
        let desc = TensorDesc::nchw(4, 3, 5, 6).unwrap();
        for step in 0..5 {
            let x = random(&mut rng, desc.numel(), step as f32);
            let (_, xt) = activation(x.clone(), &desc)?;
            let y = bn.forward_t(&xt, true)?;
            let (y_layer, _) = layer.forward(&x, &desc).unwrap();
            assert_eq!(memory_values::<f32>(&y, &desc)?, y_layer, "y, step {step}");
            let running_mean: Vec<f32> = bn.running_mean().unwrap().as_tensor().to_vec1()?;
            let running_var: Vec<f32> = bn.running_var().unwrap().as_tensor().to_vec1()?;
            assert_eq!(
                running_mean,
                layer.running_mean().unwrap(),
                "{momentum:?} {step}"
            );
            assert_eq!(
                running_var,
                layer.running_var().unwrap(),
                "{momentum:?} {step}"
            );
            assert_eq!(bn.num_batches_tracked()?, Some(layer.num_batches_tracked()));
        }
        layer.eval();
        let x = random(&mut rng, desc.numel(), 1.0);
        let (_, xt) = activation(x.clone(), &desc)?;
        let y = bn.forward_t(&xt, false)?;
        let (y_layer, _) = layer.forward(&x, &desc).unwrap();
        assert_eq!(memory_values::<f32>(&y, &desc)?, y_layer, "eval y");
        assert_eq!(bn.num_batches_tracked()?, Some(5), "eval does not count");
    }
    Ok(())
}

/// Channels-last (a permuted candle tensor) gives what channels-first gives, in the layout of
/// the input, for `y` and every gradient.
#[test]
fn channels_last_matches_channels_first() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(7);
    let nchw = TensorDesc::nchw(2, 5, 3, 4).unwrap();
    let nhwc = TensorDesc::nhwc(2, 5, 3, 4).unwrap();
    let x = Tensor::from_vec(
        random(&mut rng, nchw.numel(), 3.0),
        nchw.dims(),
        &Device::Cpu,
    )?;
    let dy = Tensor::from_vec(
        random(&mut rng, nchw.numel(), 0.0),
        nchw.dims(),
        &Device::Cpu,
    )?;
    // y, dx, dweight, dbias.
    let run = |desc: &TensorDesc| -> Result<[Vec<f32>; 4]> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let bn = BatchNorm::new(Dims::Two, BatchNormConfig::new(5), vb)?;
        varmap.clone().set_one(
            "weight",
            Tensor::new(&[0.5f32, 1.0, 1.5, 2.0, -1.0], &Device::Cpu)?,
        )?;
        let values = memory_values::<f32>(&x, desc)?;
        let (x_var, x_view) = activation(values, desc)?;
        let y = bn.forward_t(&x_view, true)?;
        assert_eq!(
            y.stride(),
            x_view.stride(),
            "y keeps the layout of x ({})",
            desc.layout()
        );
        let grads = (&y * &dy)?.sum_all()?.backward()?;
        let dx = grads.get(x_var.as_tensor()).unwrap();
        let dx = activation(dx.flatten_all()?.to_vec1::<f32>()?, desc)?.1;
        Ok([
            y.flatten_all()?.to_vec1()?,
            dx.flatten_all()?.to_vec1()?,
            grads.get(bn.weight().unwrap()).unwrap().to_vec1()?,
            grads.get(bn.bias().unwrap()).unwrap().to_vec1()?,
        ])
    };
    assert_eq!(run(&nchw)?, run(&nhwc)?);
    Ok(())
}

/// f16 and bf16 activations: y, dx in the activation dtype within the golden tolerance of the
/// f32 run, parameters and statistics f32.
#[test]
fn half_activations_keep_f32_parameters_and_statistics() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(3);
    let desc = TensorDesc::nchw(3, 2, 4, 4).unwrap();
    let x = random(&mut rng, desc.numel(), 100.0);
    for dtype in [DType::F16, DType::BF16] {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
        let bn = BatchNorm::new(Dims::Two, BatchNormConfig::new(2), vb)?;
        let xt = Tensor::from_vec(x.clone(), desc.dims(), &Device::Cpu)?.to_dtype(dtype)?;
        let y = bn.forward_t(&xt, true)?;
        assert_eq!(y.dtype(), dtype);
        for var in [bn.running_mean().unwrap(), bn.running_var().unwrap()] {
            assert_eq!(var.dtype(), DType::F32);
        }
        assert_eq!(bn.weight().unwrap().dtype(), DType::F32);
        let bn_dtype = if dtype == DType::F16 {
            batchnorm_cuda::DType::F16
        } else {
            batchnorm_cuda::DType::BF16
        };
        // x was rounded to the half type first (by up to 1/4 of the unit spread in bf16 at
        // 100): compare with the f32 run on the rounded input.
        let rounded = xt.to_dtype(DType::F32)?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let bn32 = BatchNorm::new(Dims::Two, BatchNormConfig::new(2), vb)?;
        let want = f64s(&bn32.forward_t(&rounded, true)?)?;
        common::assert_close(
            &format!("{dtype:?} y"),
            &f64s(&y)?,
            &want,
            common::tolerance(bn_dtype, common::Quantity::Activation),
        );
        let grads = y.to_dtype(DType::F32)?.sum_all()?.backward()?;
        assert_eq!(grads.get(bn.weight().unwrap()).unwrap().dtype(), DType::F32);
    }
    Ok(())
}

/// Wrong channel count, rank, strides or dtype: a candle error that says which, and nothing
/// counted.
#[test]
fn bad_input_is_a_clear_error_and_changes_nothing() -> Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let bn = BatchNorm::new(Dims::Two, BatchNormConfig::new(3), vb)?;
    let dev = &Device::Cpu;
    let cases = [
        (
            Tensor::zeros((2, 4, 3, 3), DType::F32, dev)?,
            "input has 4 channels, the layer has 3",
        ),
        (
            Tensor::zeros((2, 3, 3), DType::F32, dev)?,
            "expected 4D input (got 3D input)",
        ),
        (
            Tensor::zeros((2, 3, 4, 5), DType::F32, dev)?.transpose(2, 3)?,
            "neither contiguous",
        ),
        (
            Tensor::zeros((2, 3, 3, 3), DType::F64, dev)?,
            "must be f32, f16 or bf16",
        ),
        (
            Tensor::ones((1, 3, 1, 1), DType::F32, dev)?,
            "more than 1 value per channel",
        ),
    ];
    for (x, message) in cases {
        let err = bn.forward_t(&x, true).unwrap_err().to_string();
        assert!(err.contains(message), "{err:?} should say {message:?}");
    }
    assert_eq!(bn.num_batches_tracked()?, Some(0));
    assert_eq!(
        bn.running_mean().unwrap().as_tensor().to_vec1::<f32>()?,
        [0.0; 3]
    );
    assert_eq!(
        bn.running_var().unwrap().as_tensor().to_vec1::<f32>()?,
        [1.0; 3]
    );
    Ok(())
}

/// `VarMap::save` writes PyTorch's `state_dict` (this crate's PyTorch-format reader takes it:
/// f32 `[C]` tensors and an i64 scalar counter), and a file in PyTorch's format loads through
/// `VarBuilder` into a layer that computes what the saved one did.
#[test]
fn state_round_trips_through_pytorch_format() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(5);
    let config = BatchNormConfig::new(4).momentum(None);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let bn = BatchNorm::new(Dims::One, config, vb.pp("features.1"))?;
    let desc = TensorDesc::new(&[6, 4, 5], Layout::ChannelsFirst).unwrap();
    for step in 0..3 {
        let x = random(&mut rng, desc.numel(), step as f32);
        bn.forward_t(&activation(x, &desc)?.1, true)?;
    }
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("candle-state");
    std::fs::create_dir_all(&dir)?;
    let saved = dir.join("varmap.safetensors");
    varmap.save(&saved)?;
    let state = StateFile::open(&saved)
        .and_then(|file| file.layer("features.1.", &config))
        .unwrap_or_else(|e| panic!("the VarMap file is not a PyTorch state_dict: {e}"));
    assert_eq!(state.num_batches_tracked, 3);
    assert_eq!(
        state.running_var.as_deref().unwrap(),
        bn.running_var().unwrap().as_tensor().to_vec1::<f32>()?
    );

    // A checkpoint written in PyTorch's format (by this crate's writer), loaded by candle.
    let pytorch = LayerState {
        weight: Some(vec![1.5, -0.5, 2.0, 1.0]),
        bias: Some(vec![0.1, 0.2, -0.3, 0.0]),
        running_mean: Some(vec![0.5, -1.0, 2.0, 0.0]),
        running_var: Some(vec![2.0, 0.5, 1.0, 4.0]),
        num_batches_tracked: 12,
    };
    let bytes = StateFile::to_bytes(&[("bn.", &pytorch)]).unwrap();
    let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, &Device::Cpu)?;
    let loaded = BatchNorm::new(Dims::One, config, vb.pp("bn"))?;
    assert_eq!(loaded.num_batches_tracked()?, Some(12));
    let x = random(&mut rng, desc.numel(), 0.0);
    let y = loaded.forward_t(&activation(x.clone(), &desc)?.1, false)?;
    let mut layer = reference::BatchNorm::new(config).unwrap();
    batchnorm_cuda::StatefulLayer::load_state(&mut layer, &pytorch).unwrap();
    layer.eval();
    let (want, _) = layer.forward(&x, &desc).unwrap();
    assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, want);
    Ok(())
}

/// `affine = false` and `track_running_stats = false` ask the VarBuilder for nothing they do not
/// have, and eval without running statistics normalizes with the batch's.
#[test]
fn optional_state_is_absent_and_eval_without_statistics_uses_the_batch() -> Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let config = BatchNormConfig::new(2)
        .affine(false)
        .track_running_stats(false);
    let bn = BatchNorm::new(Dims::One, config, vb)?;
    assert!(varmap.all_vars().is_empty());
    assert!(bn.weight().is_none() && bn.running_mean().is_none());
    assert_eq!(bn.num_batches_tracked()?, None);
    let x = Tensor::new(&[[1.0f32, 10.0], [3.0, 30.0]], &Device::Cpu)?;
    for train in [true, false] {
        let y = bn.forward_t(&x, train)?.to_vec2::<f32>()?;
        for (got, want) in y.concat().iter().zip([-1.0f32, -1.0, 1.0, 1.0]) {
            assert!((got - want).abs() < 1e-3, "{y:?}");
        }
    }
    Ok(())
}

/// The fused `relu(BN(x))` and `relu(BN(x) + z)` against the unfused candle ops on the plain
/// module, training and eval, both layouts: `y` and every gradient (`z`'s included) within the
/// f32 golden tolerance (the fused forms round `BN(x) + z` once; candle's `relu` backward passes
/// the gradient at exactly 0, which seeded data does not hit).
#[test]
fn fused_relu_and_add_relu_match_the_unfused_ops() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(13);
    let tol = |name: &str| common::tolerance_for(name, batchnorm_cuda::DType::F32);
    for desc in [
        TensorDesc::nchw(3, 4, 5, 3).unwrap(),
        TensorDesc::nhwc(3, 4, 5, 3).unwrap(),
    ] {
        for train in [true, false] {
            let x = random(&mut rng, desc.numel(), 1.0);
            let z = random(&mut rng, desc.numel(), 0.0);
            let dy = random(&mut rng, desc.numel(), 0.0);
            // [y, dx, dz, dweight, dbias] of one form.
            let run = |residual: bool, fused: bool| -> Result<Vec<Vec<f64>>> {
                let varmap = VarMap::new();
                let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
                let bn = BatchNorm::new(Dims::Two, BatchNormConfig::new(4), vb)?;
                let mut varmap = varmap.clone();
                varmap.set_one(
                    "weight",
                    Tensor::new(&[1.5f32, -0.5, 1.0, 2.0], &Device::Cpu)?,
                )?;
                varmap.set_one(
                    "running_var",
                    Tensor::new(&[0.5f32, 2.0, 1.0, 4.0], &Device::Cpu)?,
                )?;
                let (x_var, xt) = activation(x.clone(), &desc)?;
                let (z_var, zt) = activation(z.clone(), &desc)?;
                let y = match (residual, fused) {
                    (false, true) => bn.forward_relu_t(&xt, train)?,
                    (true, true) => bn.forward_add_relu_t(&xt, &zt, train)?,
                    (false, false) => bn.forward_t(&xt, train)?.relu()?,
                    (true, false) => (bn.forward_t(&xt, train)? + &zt)?.relu()?,
                };
                if fused {
                    // (candle's own elementwise ops write contiguous outputs)
                    assert_eq!(y.stride(), xt.stride(), "y keeps the layout of x");
                }
                let dyt = activation(dy.clone(), &desc)?.1;
                let grads = (&y * &dyt)?.sum_all()?.backward()?;
                let dz = match grads.get(z_var.as_tensor()) {
                    Some(dz) => f64s(dz)?,
                    None => Vec::new(),
                };
                Ok(vec![
                    f64s(&y.permute(memory_axes(&desc))?)?,
                    f64s(grads.get(x_var.as_tensor()).unwrap())?,
                    dz,
                    f64s(grads.get(bn.weight().unwrap()).unwrap())?,
                    f64s(grads.get(bn.bias().unwrap()).unwrap())?,
                ])
            };
            for residual in [false, true] {
                let (fused, unfused) = (run(residual, true)?, run(residual, false)?);
                let names = ["y", "dx", "dz", "dweight", "dbias"];
                for ((name, got), want) in names.iter().zip(&fused).zip(&unfused) {
                    let what =
                        format!("{} train={train} residual={residual} {name}", desc.layout());
                    let tol = tol(if *name == "dz" { "dx" } else { name });
                    common::assert_close(&what, got, want, tol);
                }
                assert_eq!(
                    fused[2].is_empty(),
                    !residual,
                    "dz exactly for the residual form"
                );
            }
        }
    }
    Ok(())
}

/// conv -> this batch norm -> ReLU -> mean pool -> linear, SGD on a seeded two-class problem
/// (which half of an image is brighter): the loss falls and the classes are learnt.
#[test]
fn a_small_network_learns() -> Result<()> {
    let dev = &Device::Cpu;
    let mut rng = StdRng::seed_from_u64(11);
    let (n, size) = (32, 8);
    let mut images = Vec::with_capacity(n * size * size);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let label = (i % 2) as u32;
        for _ in 0..size {
            for col in 0..size {
                let bright = (col < size / 2) == (label == 0);
                images.push(if bright { 1.0 } else { 0.0 } + rng.random_range(-0.5f32..0.5));
            }
        }
        labels.push(label);
    }
    let x = Tensor::from_vec(images, (n, 1, size, size), dev)?;
    let labels = Tensor::new(labels, dev)?;

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    let conv = candle_nn::conv2d(1, 4, 3, Default::default(), vb.pp("conv"))?;
    let bn = BatchNorm::new(Dims::Two, BatchNormConfig::new(4), vb.pp("bn"))?;
    let linear = candle_nn::linear(4, 2, vb.pp("fc"))?;
    // candle's CPU initializers draw from an unseeded generator, so the loss fell below half in
    // about 24 runs of 25 (one CI run failed at 0.55): the conv and linear parameters are drawn
    // again from a seeded one (uniform in +-1/sqrt(fan_in), as candle's default), so every run
    // is the same run (this seed: the loss falls to 0.22 of the first).
    {
        let data = varmap.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().filter(|k| !k.starts_with("bn.")).collect();
        names.sort();
        let mut init = StdRng::seed_from_u64(12);
        for name in names {
            let var = &data[name];
            let shape = var.shape().clone();
            let fan_in = shape.elem_count() / shape.dims()[0];
            let bound = (1.0 / (fan_in as f32).sqrt()).min(1.0);
            let values: Vec<f32> = (0..shape.elem_count())
                .map(|_| init.random_range(-bound..bound))
                .collect();
            var.set(&Tensor::from_vec(values, shape, dev)?)?;
        }
    }
    let mut sgd = candle_nn::SGD::new(varmap.all_vars(), 0.1)?;
    let loss_of = || -> Result<Tensor> {
        let h = bn.forward_t(&x.apply(&conv)?, true)?.relu()?;
        let logits = h.mean((2, 3))?.apply(&linear)?;
        candle_nn::loss::cross_entropy(&logits, &labels)
    };
    let first = loss_of()?.to_scalar::<f32>()?;
    let mut last = first;
    for _ in 0..60 {
        let loss = loss_of()?;
        last = loss.to_scalar::<f32>()?;
        sgd.backward_step(&loss)?;
    }
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    assert_eq!(bn.num_batches_tracked()?, Some(61), "one forward per loss");
    Ok(())
}

/// The CUDA path against the CPU path: every dtype and both layouts, forward, gradients and
/// running statistics.
#[cfg(feature = "candle-cuda")]
#[test]
#[ignore = "needs a CUDA device"]
fn cuda_matches_cpu() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let mut rng = StdRng::seed_from_u64(9);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
            let desc = TensorDesc::new(&[4, 6, 5, 7], layout).unwrap();
            let x = random(&mut rng, desc.numel(), 2.0);
            let dy = random(&mut rng, desc.numel(), 0.0);
            let run = |dev: &Device| -> Result<Vec<Vec<f64>>> {
                let varmap = VarMap::new();
                let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
                let bn = BatchNorm::new(Dims::Two, BatchNormConfig::new(6), vb)?;
                let memory = |values: &[f32]| {
                    Tensor::from_slice(values, desc.memory_dims(), dev)?.to_dtype(dtype)
                };
                let x_dev = Var::from_tensor(&memory(&x)?)?;
                let xt_dev = logical_view(x_dev.as_tensor(), &desc)?;
                let dyt = logical_view(&memory(&dy)?, &desc)?;
                let y = bn.forward_t(&xt_dev, true)?;
                let grads = (&y * &dyt)?.sum_all()?.backward()?;
                let mut out = vec![f64s(&y)?, f64s(grads.get(x_dev.as_tensor()).unwrap())?];
                for p in [bn.weight().unwrap(), bn.bias().unwrap()] {
                    out.push(f64s(grads.get(p).unwrap())?);
                }
                out.push(f64s(bn.running_mean().unwrap().as_tensor())?);
                out.push(f64s(bn.running_var().unwrap().as_tensor())?);
                Ok(out)
            };
            let (cpu, cuda) = (run(&Device::Cpu)?, run(&gpu)?);
            let bn_dtype = match dtype {
                DType::F16 => batchnorm_cuda::DType::F16,
                DType::BF16 => batchnorm_cuda::DType::BF16,
                _ => batchnorm_cuda::DType::F32,
            };
            let names = ["y", "dx", "dweight", "dbias", "running_mean", "running_var"];
            for ((name, got), want) in names.iter().zip(&cuda).zip(&cpu) {
                let tol = common::tolerance_for(name, bn_dtype);
                common::assert_close(&format!("{dtype:?} {layout} {name}"), got, want, tol);
            }
        }
    }
    Ok(())
}
