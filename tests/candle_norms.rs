//! Group, layer, instance and RMS normalization through the candle adapter
//! (`batchnorm_cuda::candle::Norm`, feature `candle`) on candle CPU tensors: every golden norm
//! case (`../shared/golden/norms`) through `forward_t` and candle's autograd, instance norm's
//! running statistics over several steps against this crate's CPU layer, refusals that change
//! nothing, and the `state_dict` names. The CUDA path's test (feature `candle-cuda`) is ignored
//! without a device.

mod common;

use batchnorm_cuda::candle::Norm;
use batchnorm_cuda::norms::{
    GroupNormConfig, InstanceNormConfig, LayerNormConfig, NormConfig, RmsNormConfig,
};
use batchnorm_cuda::reference::norms::NormLayer;
use batchnorm_cuda::{Element, Layout, TensorDesc};
use candle_core::{DType, Device, Result, Tensor, Var, WithDType};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use common::norms::{input_dims, layer_config, NormInputs};
use common::{run_all, tolerance_for, widen, with_dtype, Case, Checks, Stored};

/// The logical axes in memory order: `[0, 1, 2, ..]` channels-first, `[0, 2, .., 1]`
/// channels-last.
fn memory_axes(rank: usize, layout: Layout) -> Vec<usize> {
    match layout {
        Layout::ChannelsFirst => (0..rank).collect(),
        Layout::ChannelsLast => std::iter::once(0).chain(2..rank).chain([1]).collect(),
    }
}

/// A `Var` holding `values` in the memory order of `(dims, layout)`, and its logical view.
fn activation<T: WithDType>(
    values: Vec<T>,
    dims: &[usize],
    layout: Layout,
) -> Result<(Var, Tensor)> {
    let axes = memory_axes(dims.len(), layout);
    let memory_dims: Vec<usize> = axes.iter().map(|&a| dims[a]).collect();
    let var = Var::from_tensor(&Tensor::from_vec(values, memory_dims, &Device::Cpu)?)?;
    let mut inverse = vec![0; axes.len()];
    for (memory_axis, &logical_axis) in axes.iter().enumerate() {
        inverse[logical_axis] = memory_axis;
    }
    let logical = var.as_tensor().permute(inverse)?;
    Ok((var, logical))
}

/// A logical tensor's values in the memory order of `layout`.
fn memory_values<T: WithDType>(logical: &Tensor, layout: Layout) -> Result<Vec<T>> {
    logical
        .permute(memory_axes(logical.rank(), layout))?
        .flatten_all()?
        .to_vec1()
}

fn f64s(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()
}

fn compare(checks: &mut Checks, case: &Case, name: &str, got: Option<Vec<f64>>) {
    checks.compare(case, name, got, tolerance_for(name, case.dtype()));
}

/// A normalization of the case's configuration, its state set from the case.
fn layer_of<T: Element + Stored>(case: &Case, varmap: &VarMap) -> Result<Norm> {
    let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
    let norm = Norm::new(layer_config(case), vb)?;
    let inputs = NormInputs::<T>::of(case);
    let mut varmap = varmap.clone();
    for (name, values, tensor) in [
        ("weight", inputs.weight, norm.weight().cloned()),
        ("bias", inputs.bias, norm.bias().cloned()),
        (
            "running_mean",
            inputs.running_mean,
            norm.running_mean().map(|v| v.as_tensor().clone()),
        ),
        (
            "running_var",
            inputs.running_var,
            norm.running_var().map(|v| v.as_tensor().clone()),
        ),
    ] {
        match (values, tensor) {
            (Some(values), Some(tensor)) => varmap.set_one(
                name,
                Tensor::from_vec(values, tensor.shape(), &Device::Cpu)?,
            )?,
            (None, None) => {}
            (values, tensor) => panic!(
                "{}: the case has {name}: {}, the module: {}",
                case.name,
                values.is_some(),
                tensor.is_some()
            ),
        }
    }
    Ok(norm)
}

/// One golden case through the adapter: `forward_t` in the case's mode, then candle's autograd
/// of `sum(y * dy)`, whose gradient with respect to `y` is exactly `dy`.
fn golden<T: Element + Stored + WithDType>(case: &Case, checks: &mut Checks) {
    let mut run = || -> Result<()> {
        let varmap = VarMap::new();
        let norm = layer_of::<T>(case, &varmap)?;
        let NormInputs { x, dy, .. } = NormInputs::<T>::of(case);
        let (dims, layout) = input_dims(case);
        let (x_var, x) = activation(x, &dims, layout)?;
        let training = case.meta("training") != Some("false");
        let y = norm.forward_t(&x, training)?;
        assert_eq!(y.dims(), dims);
        compare(
            checks,
            case,
            "y",
            Some(widen(&memory_values::<T>(&y, layout)?)),
        );
        for (name, var) in [
            ("running_mean", norm.running_mean()),
            ("running_var", norm.running_var()),
        ] {
            compare(
                checks,
                case,
                name,
                var.map(|v| f64s(v.as_tensor())).transpose()?,
            );
        }
        for name in ["save_mean", "save_rstd"] {
            checks.not_exposed(name, "kept inside the adapter's op for its backward");
        }
        let dy = dy.expect("every norm case has dy");
        let (_, dy) = activation(dy, &dims, layout)?;
        let grads = (&y * dy.detach())?.sum_all()?.backward()?;
        let dx = grads.get(x_var.as_tensor()).expect("x has a gradient");
        compare(
            checks,
            case,
            "dx",
            Some(widen(&dx.flatten_all()?.to_vec1::<T>()?)),
        );
        for (name, param) in [("dweight", norm.weight()), ("dbias", norm.bias())] {
            let got = param
                .map(|p| {
                    let grad = grads.get(p).expect("a parameter has a gradient");
                    assert_eq!(grad.dims(), p.dims(), "{name} has the parameter's shape");
                    f64s(grad)
                })
                .transpose()?;
            compare(checks, case, name, got);
        }
        Ok(())
    };
    if let Err(e) = run() {
        checks.fail(format!("candle error: {e}"));
    }
}

#[test]
fn golden_norm_cases_through_the_adapter_and_autograd() {
    run_all(&common::norm_cases(), "candle norms", |case, checks| {
        with_dtype!(case.dtype(), golden(case, checks))
    });
}

fn tracked_instance_norm() -> NormConfig {
    NormConfig::Instance(InstanceNormConfig {
        affine: true,
        track_running_stats: true,
        momentum: 0.3,
        ..InstanceNormConfig::new(3)
    })
}

fn values(seed: u32, len: usize) -> Vec<f32> {
    // A fixed, uneven sequence: different means and spreads per instance.
    (0..len)
        .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 250.0 - 1.5)
        .collect()
}

/// Three training steps and one eval forward: the module's running statistics and outputs
/// equal this crate's CPU layer's (the same reference computes both, so they match exactly).
#[test]
fn instance_norm_running_statistics_over_steps_match_the_crate_layer() -> Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let norm = Norm::new(tracked_instance_norm(), vb)?;
    let mut layer = NormLayer::new(tracked_instance_norm()).unwrap();
    let dims = [2, 3, 4, 5];
    for step in 0..3 {
        let x = values(step, 120);
        let y = norm.forward_t(&Tensor::from_vec(x.clone(), &dims, &Device::Cpu)?, true)?;
        let (want, _) = layer.forward(&x, &dims, Layout::ChannelsFirst).unwrap();
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, want, "step {step}");
        let state = layer.state();
        let got_mean = norm.running_mean().unwrap().as_tensor().to_vec1::<f32>()?;
        let got_var = norm.running_var().unwrap().as_tensor().to_vec1::<f32>()?;
        assert_eq!(Some(got_mean), state.running_mean, "step {step}");
        assert_eq!(Some(got_var), state.running_var, "step {step}");
    }
    layer.eval();
    let x = values(9, 120);
    let y = norm.forward_t(&Tensor::from_vec(x.clone(), &dims, &Device::Cpu)?, false)?;
    let (want, _) = layer.forward(&x, &dims, Layout::ChannelsFirst).unwrap();
    assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, want);
    // PyTorch keeps the counter of an instance norm and never advances it.
    let counter = norm.num_batches_tracked().unwrap().as_tensor();
    assert_eq!(counter.to_scalar::<i64>()?, 0);
    Ok(())
}

/// A channels-last group norm (a permuted NHWC tensor) gives the channels-first result, in the
/// input's layout, with the same gradients.
#[test]
fn channels_last_group_norm_matches_channels_first() -> Result<()> {
    let config = NormConfig::Group(GroupNormConfig::new(2, 4));
    let varmap = VarMap::new();
    let norm = Norm::new(
        config,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )?;
    let nchw = Tensor::from_vec(values(3, 2 * 4 * 3 * 5), (2, 4, 3, 5), &Device::Cpu)?;
    let nhwc = Var::from_tensor(&nchw.permute((0, 2, 3, 1))?.contiguous()?)?;
    let x_last = nhwc.as_tensor().permute((0, 3, 1, 2))?;
    let desc = TensorDesc::new(x_last.dims(), Layout::ChannelsLast).unwrap();
    assert_eq!(desc.channels(), 4);
    let (y_first, y_last) = (norm.forward_t(&nchw, true)?, norm.forward_t(&x_last, true)?);
    assert_eq!(
        y_last.stride(),
        x_last.stride(),
        "the output keeps the layout"
    );
    let diff = (&y_first - &y_last)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff < 1e-6, "{diff}");
    let grads = y_last.sqr()?.sum_all()?.backward()?;
    assert!(grads.get(nhwc.as_tensor()).is_some());
    assert!(grads.get(norm.weight().unwrap()).is_some());
    Ok(())
}

/// Refused calls are candle errors that name the problem, and a refused training call leaves
/// the running statistics as they were.
#[test]
fn bad_input_is_a_clear_error_and_changes_nothing() -> Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let instance = Norm::new(tracked_instance_norm(), vb.pp("in"))?;
    let before = instance
        .running_mean()
        .unwrap()
        .as_tensor()
        .to_vec1::<f32>()?;
    let cases = [
        (
            Tensor::zeros((2, 5, 4), DType::F32, &Device::Cpu)?,
            "channel",
        ),
        // One value per instance: no variance, as PyTorch refuses.
        (Tensor::zeros((2, 3, 1), DType::F32, &Device::Cpu)?, "value"),
        (
            Tensor::zeros((2, 3, 4), DType::I64, &Device::Cpu)?,
            "f32, f16 or bf16",
        ),
        (
            Tensor::zeros((2, 3, 4, 5), DType::F32, &Device::Cpu)?.transpose(2, 3)?,
            "neither contiguous",
        ),
    ];
    for (x, needle) in cases {
        let err = instance.forward_t(&x, true).unwrap_err().to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
    let after = instance
        .running_mean()
        .unwrap()
        .as_tensor()
        .to_vec1::<f32>()?;
    assert_eq!(before, after);

    let ln = Norm::new(
        NormConfig::Layer(LayerNormConfig::new(&[4, 5])),
        vb.pp("ln"),
    )?;
    let err = ln
        .forward_t(&Tensor::zeros((2, 5, 4), DType::F32, &Device::Cpu)?, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("normalized_shape"), "{err}");
    let transposed = Tensor::zeros((2, 5, 4), DType::F32, &Device::Cpu)?.transpose(1, 2)?;
    let err = ln.forward_t(&transposed, true).unwrap_err().to_string();
    assert!(err.contains("contiguous"), "{err}");
    let err = Norm::new(NormConfig::Group(GroupNormConfig::new(3, 4)), vb.pp("gn"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot be split into 3 groups"), "{err}");
    Ok(())
}

/// The `state_dict` keys and shapes PyTorch uses, and only those the configuration has.
#[test]
fn state_uses_pytorch_names_and_shapes() -> Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let no_bias = NormConfig::Layer(LayerNormConfig {
        bias: false,
        ..LayerNormConfig::new(&[3, 4])
    });
    Norm::new(no_bias, vb.pp("ln"))?;
    Norm::new(NormConfig::Rms(RmsNormConfig::new(&[8])), vb.pp("rms"))?;
    Norm::new(tracked_instance_norm(), vb.pp("in"))?;
    Norm::new(
        NormConfig::Instance(InstanceNormConfig::new(3)),
        vb.pp("plain"),
    )?;
    let data = varmap.data().lock().unwrap();
    let mut keys: Vec<(String, Vec<usize>, DType)> = data
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec(), v.dtype()))
        .collect();
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    let f32_key = |k: &str, dims: &[usize]| (k.to_string(), dims.to_vec(), DType::F32);
    let mut expected = vec![
        f32_key("in.bias", &[3]),
        f32_key("in.running_mean", &[3]),
        f32_key("in.running_var", &[3]),
        f32_key("in.weight", &[3]),
        ("in.num_batches_tracked".into(), vec![], DType::I64),
        f32_key("ln.weight", &[3, 4]),
        f32_key("rms.weight", &[8]),
    ];
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(keys, expected);
    Ok(())
}

/// Half-precision activations keep f32 parameters; RMS norm's default eps follows the dtype.
#[test]
fn half_activations_keep_f32_parameters() -> Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let rms = Norm::new(NormConfig::Rms(RmsNormConfig::new(&[6])), vb)?;
    let x32 = Tensor::from_vec(values(5, 24), (4, 6), &Device::Cpu)?;
    let x16 = x32.to_dtype(DType::F16)?;
    let y16 = rms.forward_t(&x16, true)?;
    assert_eq!(y16.dtype(), DType::F16);
    let y32 = rms.forward_t(&x32, true)?;
    let diff = (y16.to_dtype(DType::F32)? - &y32)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    // One f16 rounding of values of size ~2, plus eps 2^-10 instead of 2^-23 on mean squares ~1.
    assert!(diff < 4e-3, "{diff}");
    let grads = y16.to_dtype(DType::F32)?.sum_all()?.backward()?;
    assert_eq!(
        grads.get(rms.weight().unwrap()).unwrap().dtype(),
        DType::F32
    );
    Ok(())
}

#[cfg(feature = "candle-cuda")]
#[test]
#[ignore = "needs a CUDA device"]
fn cuda_matches_cpu() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    for config in [
        NormConfig::Group(GroupNormConfig::new(2, 4)),
        NormConfig::Layer(LayerNormConfig::new(&[3, 5])),
        NormConfig::Rms(RmsNormConfig::new(&[5])),
        tracked_instance_norm_of(4),
    ] {
        let on = |device: &Device| -> Result<(Vec<f32>, Vec<f32>, Option<Vec<f32>>)> {
            let varmap = VarMap::new();
            let norm = Norm::new(
                config.clone(),
                VarBuilder::from_varmap(&varmap, DType::F32, device),
            )?;
            let x = Var::from_tensor(&Tensor::from_vec(values(7, 120), (2, 4, 3, 5), device)?)?;
            let y = norm.forward_t(x.as_tensor(), true)?;
            let grads = (&y * &y)?.sum_all()?.backward()?;
            Ok((
                y.flatten_all()?.to_vec1()?,
                grads.get(x.as_tensor()).unwrap().flatten_all()?.to_vec1()?,
                norm.running_var()
                    .map(|v| v.as_tensor().to_vec1())
                    .transpose()?,
            ))
        };
        let (cpu, cuda) = (on(&Device::Cpu)?, on(&gpu)?);
        assert_eq!(cpu.2.is_some(), cuda.2.is_some(), "{config:?}");
        let (cpu_var, cuda_var) = (cpu.2.unwrap_or_default(), cuda.2.unwrap_or_default());
        let pairs = [(&cpu.0, &cuda.0), (&cpu.1, &cuda.1), (&cpu_var, &cuda_var)];
        for (want, got) in pairs {
            assert_eq!(want.len(), got.len(), "{config:?}");
            for (a, b) in want.iter().zip(got) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + a.abs()),
                    "{config:?}: {a} vs {b}"
                );
            }
        }
    }
    Ok(())
}

fn tracked_instance_norm_of(c: usize) -> NormConfig {
    NormConfig::Instance(InstanceNormConfig {
        affine: true,
        track_running_stats: true,
        ..InstanceNormConfig::new(c)
    })
}

/// `VarMap::save` writes the trained state under PyTorch's names, dtypes and shapes, and a
/// module loaded from that file with `VarBuilder::from_mmaped_safetensors` computes the same.
#[test]
fn state_round_trips_through_a_safetensors_file() -> Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let ln_config = NormConfig::Layer(LayerNormConfig::new(&[4, 5]));
    let instance = Norm::new(tracked_instance_norm(), vb.pp("block.in"))?;
    let ln = Norm::new(ln_config.clone(), vb.pp("block.ln"))?;
    let x = Tensor::from_vec(values(11, 2 * 3 * 4 * 5), (2, 3, 4, 5), &Device::Cpu)?;
    // Two training steps, and parameters moved off their initial values.
    for _ in 0..2 {
        ln.forward_t(&instance.forward_t(&x, true)?, true)?;
    }
    let mut data = varmap.clone();
    data.set_one("block.ln.weight", (ln.weight().unwrap() * 1.5)?)?;
    data.set_one(
        "block.in.bias",
        Tensor::new(&[0.5f32, -1.0, 2.0], &Device::Cpu)?,
    )?;

    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("candle-norm-state");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("varmap.safetensors");
    varmap.save(&path)?;
    let file = candle_core::safetensors::load(&path, &Device::Cpu)?;
    let shape_of = |name: &str| (file[name].dims().to_vec(), file[name].dtype());
    assert_eq!(shape_of("block.ln.weight"), (vec![4, 5], DType::F32));
    assert_eq!(shape_of("block.in.running_var"), (vec![3], DType::F32));
    assert_eq!(
        shape_of("block.in.num_batches_tracked"),
        (vec![], DType::I64)
    );

    // SAFETY: the file was written above and is not modified while mapped.
    let loaded =
        unsafe { VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, &Device::Cpu)? };
    let instance_loaded = Norm::new(tracked_instance_norm(), loaded.pp("block.in"))?;
    let ln_loaded = Norm::new(ln_config, loaded.pp("block.ln"))?;
    let run = |instance: &Norm, ln: &Norm| -> Result<Vec<f32>> {
        ln.forward_t(&instance.forward_t(&x, false)?, false)?
            .flatten_all()?
            .to_vec1()
    };
    assert_eq!(run(&instance_loaded, &ln_loaded)?, run(&instance, &ln)?);
    assert_eq!(
        instance_loaded
            .running_mean()
            .unwrap()
            .as_tensor()
            .to_vec1::<f32>()?,
        instance
            .running_mean()
            .unwrap()
            .as_tensor()
            .to_vec1::<f32>()?
    );
    Ok(())
}

/// `forward_silu_t` is `silu(forward_t(x))` in one op, with the same gradients of `x`, `weight`
/// and `bias` (f32: within a few roundings of the unfused candle ops).
#[test]
fn fused_silu_matches_the_unfused_ops() -> Result<()> {
    let layer_no_bias = NormConfig::Layer(LayerNormConfig {
        bias: false,
        ..LayerNormConfig::new(&[5])
    });
    let configs = [
        NormConfig::Group(GroupNormConfig::new(2, 4)),
        layer_no_bias,
        tracked_instance_norm_of(4),
    ];
    for (i, config) in configs.into_iter().enumerate() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let norm = Norm::new(config.clone(), vb)?;
        // Parameters off 1 and 0, so that the SiLU's input depends on both.
        let mut data = varmap.clone();
        if let Some(w) = norm.weight() {
            data.set_one("weight", (w.ones_like()? * 1.7)?)?;
        }
        if let Some(b) = norm.bias() {
            data.set_one("bias", (b.ones_like()? * -0.4)?)?;
        }
        let x = Var::from_tensor(&Tensor::from_vec(
            values(20 + i as u32, 120),
            (2, 4, 3, 5),
            &Device::Cpu,
        )?)?;
        let g = Tensor::from_vec(values(40 + i as u32, 120), (2, 4, 3, 5), &Device::Cpu)?;
        let run = |fused: bool| -> Result<Vec<Vec<f32>>> {
            let y = match fused {
                true => norm.forward_silu_t(x.as_tensor(), true)?,
                false => norm.forward_t(x.as_tensor(), true)?.silu()?,
            };
            let grads = (&y * &g)?.sum_all()?.backward()?;
            let mut out = vec![y.flatten_all()?.to_vec1()?];
            out.push(grads.get(x.as_tensor()).unwrap().flatten_all()?.to_vec1()?);
            for p in [norm.weight(), norm.bias()].into_iter().flatten() {
                out.push(grads.get(p).unwrap().flatten_all()?.to_vec1()?);
            }
            Ok(out)
        };
        let (fused, unfused) = (run(true)?, run(false)?);
        assert_eq!(fused.len(), unfused.len());
        for (k, (a, b)) in fused.iter().zip(&unfused).enumerate() {
            let worst = a
                .iter()
                .zip(b)
                .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()));
            let worst = worst.fold(0.0f32, f32::max);
            assert!(worst < 2e-5, "{config:?}, tensor {k}: {worst}");
        }
    }
    Ok(())
}
