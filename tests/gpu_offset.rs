//! The GPU path on data with a large common offset next to its spread (mean 1000, std 0.1 in
//! f32, and the like in f16 and bf16): every functional call form (training and eval, forward
//! and backward, plain and fused) against the exact f64 results with the golden tolerances, the
//! backward from the statistics the GPU's own forward saved (`save_mean + save_mean_lo`). The
//! CPU reference's twin is `offset.rs`; the synchronized form is in `gpu_sync.rs`. Needs a CUDA
//! device (or the emulated driver): `--include-ignored`.

mod common;

use batchnorm_cuda::gpu::functional::{
    self, GradientsMut, RunningStats, RunningUpdate, SavedStats, SavedStatsMut,
};
use batchnorm_cuda::gpu::{GpuContext, Workspace};
use batchnorm_cuda::{epilogue, DType, Element, RunningVarUpdate};
use common::gpu::{download, gpu, upload, zeros};
use common::offset::{check, offsets, shapes, Case, Form, Outcome, Shares, EPS, FORMS, MOMENTUM};
use common::with_dtype;

/// The GPU's functional calls (fused ones for the fused forms) on `case`.
fn run<T: Element>(gpu: &GpuContext, ws: &mut Workspace, case: &Case<T>) -> Outcome<T> {
    let (desc, n, c) = (&case.desc, case.desc.numel(), case.desc.channels());
    let (x, z, dy) = (
        upload(gpu, &case.x),
        upload(gpu, &case.z),
        upload(gpu, &case.dy),
    );
    let (w, b) = (upload(gpu, &case.weight), upload(gpu, &case.bias));
    let (mut rm, mut rv) = (
        upload(gpu, &case.running_mean),
        upload(gpu, &case.running_var),
    );
    let mut y = zeros::<T>(gpu, n);
    let stream = gpu.stream();
    let mut mask = stream
        .alloc_zeros::<u32>(epilogue::mask_words(desc))
        .unwrap();
    let [mut mean, mut mean_lo, mut invstd] = [0; 3].map(|_| zeros::<f32>(gpu, c));
    let fused_form = case.form != Form::Plain;
    let epilogue =
        |mask| functional::Epilogue::relu((case.form == Form::AddRelu).then(|| z.as_view()), mask);
    let (wv, bv) = (w.as_view(), b.as_view());
    if case.training {
        let running = Some(RunningUpdate {
            mean: rm.as_view_mut(),
            var: rv.as_view_mut(),
            factor: MOMENTUM,
            var_update: RunningVarUpdate::Unbiased,
        });
        let saved = SavedStatsMut {
            mean: mean.as_view_mut(),
            mean_lo: mean_lo.as_view_mut(),
            invstd: invstd.as_view_mut(),
        };
        let (x, mut yv) = (x.as_view(), y.as_view_mut());
        if fused_form {
            let epilogue = epilogue(Some(mask.as_view_mut()));
            functional::forward(
                gpu,
                ws,
                functional::Forward {
                    desc: *desc,
                    x: x.slice(..),
                    weight: Some(wv.slice(..)),
                    bias: Some(bv.slice(..)),
                    stats: functional::ForwardStats::Batch(functional::BatchStats {
                        saved,
                        running,
                        eps: EPS,
                    }),
                    y: yv.slice_mut(..),
                    epilogue,
                },
            )
        } else {
            functional::forward(
                gpu,
                ws,
                functional::Forward {
                    desc: *desc,
                    x: x.slice(..),
                    weight: Some(wv.slice(..)),
                    bias: Some(bv.slice(..)),
                    stats: functional::ForwardStats::Batch(functional::BatchStats {
                        saved,
                        running,
                        eps: EPS,
                    }),
                    y: yv.slice_mut(..),
                    epilogue: functional::Epilogue::None,
                },
            )
        }
        .unwrap();
    } else {
        let running = RunningStats {
            mean: rm.as_view(),
            var: rv.as_view(),
        };
        let (x, mut yv) = (x.as_view(), y.as_view_mut());
        if fused_form {
            let epilogue = epilogue(Some(mask.as_view_mut()));
            functional::forward(
                gpu,
                &mut Workspace::new(),
                functional::Forward {
                    desc: *desc,
                    x: x.slice(..),
                    weight: Some(wv.slice(..)),
                    bias: Some(bv.slice(..)),
                    stats: functional::ForwardStats::Running {
                        stats: running,
                        eps: EPS,
                    },
                    y: yv.slice_mut(..),
                    epilogue,
                },
            )
        } else {
            functional::forward(
                gpu,
                &mut Workspace::new(),
                functional::Forward {
                    desc: *desc,
                    x: x.slice(..),
                    weight: Some(wv.slice(..)),
                    bias: Some(bv.slice(..)),
                    stats: functional::ForwardStats::Running {
                        stats: running,
                        eps: EPS,
                    },
                    y: yv.slice_mut(..),
                    epilogue: functional::Epilogue::None,
                },
            )
        }
        .unwrap();
    }

    let mut dx = zeros::<T>(gpu, n);
    let mut dz = zeros::<T>(gpu, n);
    let (mut dweight, mut dbias) = (zeros::<f32>(gpu, c), zeros::<f32>(gpu, c));
    let grads = GradientsMut {
        dx: Some(dx.as_view_mut()),
        dweight: Some(dweight.as_view_mut()),
        dbias: Some(dbias.as_view_mut()),
        accumulate: false,
    };
    let dz_out = (case.form == Form::AddRelu).then(|| dz.as_view_mut());
    let (xv, dyv, maskv) = (x.as_view(), dy.as_view(), mask.as_view());
    let eval_stats = RunningStats {
        mean: rm.as_view(),
        var: rv.as_view(),
    };
    let saved = SavedStats {
        mean: mean.as_view(),
        mean_lo: Some(mean_lo.as_view()),
        invstd: invstd.as_view(),
    };
    match (case.training, fused_form) {
        (true, false) => functional::backward(
            gpu,
            ws,
            functional::Backward {
                desc: *desc,
                x: xv.slice(..),
                dy: dyv.slice(..),
                weight: Some(wv.slice(..)),
                stats: functional::BackwardStats::Batch(saved),
                grads,
                epilogue: functional::EpilogueGrad::None,
            },
        ),
        (true, true) => functional::backward(
            gpu,
            ws,
            functional::Backward {
                desc: *desc,
                x: xv.slice(..),
                dy: dyv.slice(..),
                weight: Some(wv.slice(..)),
                stats: functional::BackwardStats::Batch(saved),
                grads,
                epilogue: functional::EpilogueGrad::AddRelu {
                    mask: maskv.slice(..),
                    dz: dz_out,
                },
            },
        ),
        (false, false) => functional::backward(
            gpu,
            ws,
            functional::Backward {
                desc: *desc,
                x: xv.slice(..),
                dy: dyv.slice(..),
                weight: Some(wv.slice(..)),
                stats: functional::BackwardStats::Running {
                    stats: eval_stats,
                    eps: EPS,
                },
                grads,
                epilogue: functional::EpilogueGrad::None,
            },
        ),
        (false, true) => functional::backward(
            gpu,
            ws,
            functional::Backward {
                desc: *desc,
                x: xv.slice(..),
                dy: dyv.slice(..),
                weight: Some(wv.slice(..)),
                stats: functional::BackwardStats::Running {
                    stats: eval_stats,
                    eps: EPS,
                },
                grads,
                epilogue: functional::EpilogueGrad::AddRelu {
                    mask: maskv.slice(..),
                    dz: dz_out,
                },
            },
        ),
    }
    .unwrap();
    Outcome {
        y: download(gpu, &y),
        mask: fused_form.then(|| stream.clone_dtoh(&mask).unwrap()),
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
