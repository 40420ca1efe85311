//! The rows of the other normalizations: GroupNorm(32) on U-Net activations (both layouts),
//! LayerNorm and RMSNorm on (tokens, 4096), InstanceNorm2d; a training forward and a backward
//! (dx, dweight, dbias) each, timed as the batch-norm rows are. Check: the CPU reference on the
//! first samples (rows are independent, so those rows' outputs and statistics must match
//! exactly what the full reference gives); dweight and dbias, sums over every sample, are
//! compared when the whole tensor has at most 2^22 elements. `channels_checked`/`channels` of
//! these rows count normalization rows.

use super::*;
use batchnorm_cuda::gpu::norms::{
    self as device, Backward, DeviceNormStats, Forward, NormWorkspace, Norms, StatsSource,
};
use batchnorm_cuda::norms::{NormDesc, NormEpilogue, NormKind};
use batchnorm_cuda::reference::norms as cpu;

/// One normalization shape of the suite.
pub(super) struct NormCase {
    pub suite: &'static str,
    pub kind: NormKind,
    /// Logical shape: `(N, C, ...)`, or `(tokens, hidden)` for layer and RMS norm.
    pub dims: Vec<usize>,
    /// Group norm's G.
    pub groups: usize,
    pub layout: Layout,
}

impl NormCase {
    fn desc_of(&self, dims: &[usize]) -> batchnorm_cuda::Result<NormDesc> {
        match self.kind {
            NormKind::Group => NormDesc::group(&TensorDesc::new(dims, self.layout)?, self.groups),
            NormKind::Instance => Ok(NormDesc::instance(&TensorDesc::new(dims, self.layout)?)),
            NormKind::Layer => NormDesc::layer(dims, &dims[1..]),
            NormKind::Rms => NormDesc::rms(dims, &dims[1..]),
        }
    }

    /// The first samples the reference checks.
    fn checked_dims(&self) -> Vec<usize> {
        let mut dims = self.dims.clone();
        let total: usize = dims.iter().product();
        if total > FULL_CHECK_NUMEL {
            let per_sample = total / dims[0];
            dims[0] = (FULL_CHECK_NUMEL / 4 / per_sample).clamp(1, dims[0]);
        }
        dims
    }
}

pub(super) fn suite() -> Vec<NormCase> {
    let case = |suite, kind, dims: &[usize], groups, layout| NormCase {
        suite,
        kind,
        dims: dims.to_vec(),
        groups,
        layout,
    };
    let (cf, cl) = (Layout::ChannelsFirst, Layout::ChannelsLast);
    let tokens = 8192;
    let mut cases = Vec::new();
    for layout in [cf, cl] {
        cases.push(case("unet", NormKind::Group, &[2, 320, 64, 64], 32, layout));
        cases.push(case("unet", NormKind::Group, &[2, 640, 32, 32], 32, layout));
        cases.push(case(
            "unet",
            NormKind::Group,
            &[8, 128, 128, 128],
            32,
            layout,
        ));
    }
    cases.push(case("transformer", NormKind::Layer, &[tokens, 4096], 1, cf));
    cases.push(case("transformer", NormKind::Rms, &[tokens, 4096], 1, cf));
    cases.push(case("transformer", NormKind::Layer, &[tokens, 1024], 1, cf));
    cases.push(case(
        "style",
        NormKind::Instance,
        &[16, 64, 128, 128],
        64,
        cf,
    ));
    cases
}

pub(super) fn op_names(kind: NormKind) -> [&'static str; 2] {
    match kind {
        NormKind::Group => ["group_norm_fwd", "group_norm_bwd"],
        NormKind::Layer => ["layer_norm_fwd", "layer_norm_bwd"],
        NormKind::Instance => ["instance_norm_fwd", "instance_norm_bwd"],
        NormKind::Rms => ["rms_norm_fwd", "rms_norm_bwd"],
    }
}

/// The forward and backward rows of one case and dtype, with their results.
pub(super) fn rows(
    case: &NormCase,
    dtype: DType,
    results: Vec<Result<(Timing, Check), String>>,
) -> Vec<Row> {
    let bytes = (case.dims.iter().product::<usize>() * dtype.size_of()) as u64;
    [false, true]
        .into_iter()
        .zip(results)
        .map(|(backward, result)| {
            let op = Op::Norm {
                kind: case.kind,
                backward,
            };
            let layout = match case.kind {
                NormKind::Group | NormKind::Instance => Some(case.layout),
                NormKind::Layer | NormKind::Rms => None,
            };
            let layout_name = layout.map_or(String::new(), |l| format!("/{l}"));
            Row {
                name: format!(
                    "{}/{}/{}{}",
                    op.name(),
                    dtype,
                    dims_name(&case.dims),
                    layout_name
                ),
                op,
                suite: case.suite,
                dtype,
                layout,
                dims: case.dims.clone(),
                fold: None,
                bytes: (op.passes().0 * bytes, op.passes().1 * bytes),
                result,
            }
        })
        .collect()
}

pub(super) fn bench<T: Element>(env: &mut Env, norms: &Norms, case: &NormCase) -> Vec<Row> {
    let results = match run::<T>(env, norms, case) {
        Ok(results) => results.into_iter().map(Ok).collect(),
        Err(e) => vec![Err(e.to_string()); 2],
    };
    rows(case, T::DTYPE, results)
}

fn run<T: Element>(
    env: &mut Env,
    norms: &Norms,
    case: &NormCase,
) -> BoxResult<Vec<(Timing, Check)>> {
    let desc = case.desc_of(&case.dims)?;
    let stream = env.gpu.stream().clone();
    let (n, c) = (desc.numel(), desc.channels());
    // Data as the batch-norm rows generate it, over a tensor of the same memory order.
    let data_desc = TensorDesc::new(&case.dims, case.layout)?;
    let x_h: Vec<T> = generate(&data_desc, 1, channel_mean, channel_std);
    let dy_h: Vec<T> = generate(&data_desc, 2, |c| 0.1 * channel_mean(c), |_| 1.0);
    let weight_h = per_channel(c, |c| 0.75 + 0.5 * unit(3, c));
    let bias_h = per_channel(c, |c| unit(4, c) - 0.5);
    let x = stream.clone_htod(&x_h)?;
    let dy = stream.clone_htod(&dy_h)?;
    let weight = stream.clone_htod(&weight_h)?;
    let bias = stream.clone_htod(&bias_h)?;
    let with_bias = case.kind != NormKind::Rms;
    let mut y = stream.alloc_zeros::<T>(n)?;
    let mut dx = stream.alloc_zeros::<T>(n)?;
    let mut dweight = stream.alloc_zeros::<f32>(c)?;
    let mut dbias = stream.alloc_zeros::<f32>(c)?;
    let mut stats = DeviceNormStats::new(&env.gpu, desc.rows())?;
    let mut workspace = NormWorkspace::new();

    let forward = |workspace: &mut NormWorkspace,
                   y: &mut CudaSlice<T>,
                   stats: &mut DeviceNormStats|
     -> BoxResult<()> {
        let call = Forward {
            weight: Some(weight.as_view()),
            bias: with_bias.then(|| bias.as_view()),
            ..Forward::new(x.as_view(), EPS, y.as_view_mut(), stats.as_mut())
        };
        device::forward(norms, workspace, &desc, call)?;
        Ok(())
    };
    let backward = |workspace: &mut NormWorkspace,
                    stats: &DeviceNormStats,
                    dx: &mut CudaSlice<T>,
                    dw: &mut CudaSlice<f32>,
                    db: &mut CudaSlice<f32>|
     -> BoxResult<()> {
        let call = Backward {
            x: x.as_view(),
            dy: dy.as_view(),
            weight: Some(weight.as_view()),
            bias: with_bias.then(|| bias.as_view()),
            stats: stats.as_view(),
            source: StatsSource::Batch,
            epilogue: NormEpilogue::None,
            dx: Some(dx.as_view_mut()),
            dweight: Some(dw.as_view_mut()),
            dbias: with_bias.then(|| db.as_view_mut()),
            accumulate: false,
        };
        device::backward(norms, workspace, &desc, call)?;
        Ok(())
    };

    // The reference on the first samples.
    let checked = case.checked_dims();
    let sub = case.desc_of(&checked)?;
    let m = sub.numel();
    let full = m == n;
    let check = || Check {
        dtype: T::DTYPE,
        max_abs_err: 0.0,
        rel_err: 0.0,
        all_written: true,
        channels_checked: sub.rows(),
        channels: desc.rows(),
    };
    // Channels-last group norm: the first samples are a prefix in either layout.
    let mut y_ref = vec![T::default(); m];
    let call = cpu::Forward {
        weight: Some(&weight_h),
        bias: with_bias.then_some(bias_h.as_slice()),
        ..cpu::Forward::new(&x_h[..m], EPS, &mut y_ref)
    };
    let stats_ref = cpu::forward(&sub, call)?.expect("batch statistics");

    poison(&stream, &mut y)?;
    forward(&mut workspace, &mut y, &mut stats)?;
    let mut fwd = check();
    let y_gpu = download(&stream, &y)?;
    fwd.written(&y_gpu);
    fwd.compare(&y_gpu[..m], &y_ref, true);
    let got = stats.to_host(&env.gpu)?;
    let rows = sub.rows();
    fwd.compare(&got.rstd[..rows], &stats_ref.rstd, false);
    if case.kind != NormKind::Rms {
        fwd.compare(&got.mean[..rows], &stats_ref.mean, false);
    }
    drop(y_gpu);

    let (mut dx_ref, mut dw_ref, mut db_ref) =
        (vec![T::default(); m], vec![0f32; c], vec![0f32; c]);
    let call = cpu::Backward {
        x: &x_h[..m],
        dy: &dy_h[..m],
        weight: Some(&weight_h),
        bias: with_bias.then_some(bias_h.as_slice()),
        stats: cpu::UsedStats::Batch(&stats_ref),
        epilogue: NormEpilogue::None,
        dx: Some(&mut dx_ref),
        dweight: Some(&mut dw_ref),
        dbias: Some(&mut db_ref),
        accumulate: false,
    };
    cpu::backward(&sub, call)?;
    poison(&stream, &mut dx)?;
    poison(&stream, &mut dweight)?;
    poison(&stream, &mut dbias)?;
    backward(&mut workspace, &stats, &mut dx, &mut dweight, &mut dbias)?;
    let mut bwd = check();
    let dx_gpu = download(&stream, &dx)?;
    bwd.written(&dx_gpu);
    bwd.compare(&dx_gpu[..m], &dx_ref, true);
    let dw_gpu = download(&stream, &dweight)?;
    bwd.written(&dw_gpu);
    if full {
        bwd.compare(&dw_gpu, &dw_ref, false);
        if with_bias {
            bwd.compare(&download(&stream, &dbias)?, &db_ref, false);
        }
    }
    drop(dx_gpu);

    let Env { timer, .. } = env;
    let t_fwd = timer.time(|| forward(&mut workspace, &mut y, &mut stats))?;
    let t_bwd =
        timer.time(|| backward(&mut workspace, &stats, &mut dx, &mut dweight, &mut dbias))?;
    Ok(vec![(t_fwd, fwd), (t_bwd, bwd)])
}
