//! The GPU path on data with a large common offset next to its spread (mean 1000, std 0.1 in
//! f32, and the like in f16 and bf16): every functional call form (training and eval, forward
//! and backward, plain and fused) against the exact f64 results with the golden tolerances, the
//! backward from the statistics the GPU's own forward saved (`save_mean + save_mean_lo`). The
//! CPU reference's twin is `offset.rs`; the synchronized form is in `gpu_sync.rs`. Needs a CUDA
//! device (or the emulated driver): `--include-ignored`.

mod common;

use batchnorm_cuda::gpu::functional::{
    self, Backward, BackwardStats, BatchStats, Epilogue, EpilogueGrad, Forward, ForwardStats,
    GradientsMut, RunningStats, RunningUpdate, SavedStats, SavedStatsMut,
};
use batchnorm_cuda::gpu::{GpuContext, Workspace};
use batchnorm_cuda::{epilogue, DType, Element, RunningVarUpdate};
use common::gpu::{download, gpu, upload, zeros};
use common::offset::{check, offsets, shapes, Case, Form, Outcome, Shares, EPS, FORMS, MOMENTUM};
use common::with_dtype;

/// The GPU's functional calls, with the case's epilogue, on `case`.
fn run<T: Element>(gpu: &GpuContext, ws: &mut Workspace, case: &Case<T>) -> Outcome<T> {
    let (desc, n, c) = (case.desc, case.desc.numel(), case.desc.channels());
    let [x, z, dy] = [&case.x, &case.z, &case.dy].map(|v| upload(gpu, v));
    let (w, b) = (upload(gpu, &case.weight), upload(gpu, &case.bias));
    let (mut rm, mut rv) = (
        upload(gpu, &case.running_mean),
        upload(gpu, &case.running_var),
    );
    let [mut y, mut dx, mut dz] = [0; 3].map(|_| zeros::<T>(gpu, n));
    let [mut mean, mut mean_lo, mut invstd, mut dweight, mut dbias] =
        [0; 5].map(|_| zeros::<f32>(gpu, c));
    let stream = gpu.stream();
    let mut mask = stream
        .alloc_zeros::<u32>(epilogue::mask_words(&desc))
        .unwrap();

    let stats = if case.training {
        ForwardStats::Batch(BatchStats {
            saved: SavedStatsMut {
                mean: mean.as_view_mut(),
                mean_lo: mean_lo.as_view_mut(),
                invstd: invstd.as_view_mut(),
            },
            running: Some(RunningUpdate {
                mean: rm.as_view_mut(),
                var: rv.as_view_mut(),
                factor: MOMENTUM,
                var_update: RunningVarUpdate::Unbiased,
            }),
            eps: EPS,
        })
    } else {
        ForwardStats::Running {
            stats: RunningStats {
                mean: rm.as_view(),
                var: rv.as_view(),
            },
            eps: EPS,
        }
    };
    let residual = (case.form == Form::AddRelu).then(|| z.as_view());
    let forward = Forward {
        desc,
        x: x.as_view(),
        weight: Some(w.as_view()),
        bias: Some(b.as_view()),
        stats,
        y: y.as_view_mut(),
        epilogue: match case.form {
            Form::Plain => Epilogue::None,
            _ => Epilogue::relu(residual, Some(mask.as_view_mut())),
        },
    };
    functional::forward(gpu, ws, forward).unwrap();

    let stats = if case.training {
        BackwardStats::Batch(SavedStats {
            mean: mean.as_view(),
            mean_lo: Some(mean_lo.as_view()),
            invstd: invstd.as_view(),
        })
    } else {
        BackwardStats::Running {
            stats: RunningStats {
                mean: rm.as_view(),
                var: rv.as_view(),
            },
            eps: EPS,
        }
    };
    let backward = Backward {
        desc,
        x: x.as_view(),
        dy: dy.as_view(),
        weight: Some(w.as_view()),
        stats,
        grads: GradientsMut {
            dx: Some(dx.as_view_mut()),
            dweight: Some(dweight.as_view_mut()),
            dbias: Some(dbias.as_view_mut()),
            accumulate: false,
        },
        epilogue: match case.form {
            Form::Plain => EpilogueGrad::None,
            Form::Relu => EpilogueGrad::Relu {
                mask: mask.as_view(),
            },
            Form::AddRelu => EpilogueGrad::AddRelu {
                mask: mask.as_view(),
                dz: Some(dz.as_view_mut()),
            },
        },
    };
    functional::backward(gpu, ws, backward).unwrap();
    Outcome {
        y: download(gpu, &y),
        mask: (case.form != Form::Plain).then(|| stream.clone_dtoh(&mask).unwrap()),
        saved: case.training.then(|| {
            (
                download(gpu, &mean),
                download(gpu, &mean_lo),
                download(gpu, &invstd),
            )
        }),
        running_mean: download(gpu, &rm),
        running_var: download(gpu, &rv),
        dx: download(gpu, &dx),
        dweight: download(gpu, &dweight),
        dbias: download(gpu, &dbias),
        dz: (case.form == Form::AddRelu).then(|| download(gpu, &dz)),
    }
}

fn every_form<T: Element>(gpu: &GpuContext, shares: &mut Shares, seed: &mut u64) {
    let mut ws = Workspace::new();
    for desc in shapes() {
        for &offset in offsets(T::DTYPE) {
            for training in [true, false] {
                for form in FORMS {
                    *seed += 1;
                    let case = Case::<T>::new(desc, offset, training, form, *seed);
                    check(&case, &run(gpu, &mut ws, &case), shares);
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_keeps_the_mean_on_offset_data() {
    let gpu = gpu();
    let mut shares = Shares::default();
    let mut seed = 0;
    for dtype in DType::ALL {
        with_dtype!(dtype, every_form(&gpu, &mut shares, &mut seed));
    }
    shares.print("GPU offset cases");
}
