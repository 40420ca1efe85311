//! The CPU reference on data with a large common offset next to its spread (mean 1000, std 0.1
//! in f32, and the like in f16 and bf16): every call form (training and eval, forward and
//! backward, plain and fused, synchronized over shards) against the exact f64 results with the
//! golden tolerances, the backward from the statistics its own forward saved.
//! `cargo test --release --test offset -- --nocapture` prints the worst share of tolerance per
//! quantity. The GPU's twin is `gpu_offset.rs`.

mod common;

use batchnorm_cuda::reference::{
    self, fused, sync, Epilogue, EpilogueGrad, Gradients, RunningStats, RunningUpdate,
};
use batchnorm_cuda::{epilogue, DType, Element, TensorDesc};
use common::offset::{check, offsets, shapes, Case, Form, Outcome, Shares, EPS, FORMS, MOMENTUM};
use common::with_dtype;

/// The reference's functional calls (fused ones for the fused forms) on `case`.
fn run<T: Element>(case: &Case<T>) -> Outcome<T> {
    let (desc, n, c) = (&case.desc, case.desc.numel(), case.desc.channels());
    let (w, b) = (Some(&case.weight[..]), Some(&case.bias[..]));
    let (mut rm, mut rv) = (case.running_mean.clone(), case.running_var.clone());
    let mut y = vec![T::default(); n];
    let fused_form = case.form != Form::Plain;
    let mut mask = vec![0u32; epilogue::mask_words(desc)];
    let residual = (case.form == Form::AddRelu).then_some(&case.z[..]);
    let saved = if case.training {
        let running = Some(RunningUpdate::pytorch(&mut rm, &mut rv, MOMENTUM));
        Some(if fused_form {
            fused::forward_training(
                fused::Forward {
                    desc: *desc,
                    x: &case.x,
                    weight: w,
                    bias: b,
                    y: &mut y,
                    epilogue: Epilogue::relu(residual, Some(&mut mask)),
                },
                running,
                EPS,
            )
        } else {
            reference::forward_training(&case.x, desc, w, b, running, EPS, &mut y)
        })
        .transpose()
        .unwrap()
    } else {
        let running = RunningStats {
            mean: &rm,
            var: &rv,
        };
        if fused_form {
            fused::forward_inference(
                fused::Forward {
                    desc: *desc,
                    x: &case.x,
                    weight: w,
                    bias: b,
                    y: &mut y,
                    epilogue: Epilogue::relu(residual, Some(&mut mask)),
                },
                running,
                EPS,
            )
        } else {
            reference::forward_inference(&case.x, desc, w, b, running, EPS, &mut y)
        }
        .unwrap();
        None
    };

    let (mut dx, mut dweight, mut dbias) = (vec![T::default(); n], vec![0.0; c], vec![0.0; c]);
    let mut dz = vec![T::default(); n];
    let grads = Gradients {
        dx: Some(&mut dx),
        dweight: Some(&mut dweight),
        dbias: Some(&mut dbias),
        accumulate: false,
    };
    let dz_out = (case.form == Form::AddRelu).then_some(&mut dz[..]);
    let running = RunningStats {
        mean: &case.running_mean,
        var: &case.running_var,
    };
    match (&saved, fused_form) {
        (Some(s), false) => reference::backward_training(&case.x, &case.dy, desc, w, s, grads),
        (Some(s), true) => fused::backward_training(
            fused::Backward {
                desc: *desc,
                x: &case.x,
                dy: &case.dy,
                weight: w,
                grads,
                epilogue: EpilogueGrad::AddRelu {
                    mask: &mask,
                    dz: dz_out,
                },
            },
            s,
        ),
        (None, false) => {
            reference::backward_inference(&case.x, &case.dy, desc, w, running, EPS, grads)
        }
        (None, true) => fused::backward_inference(
            fused::Backward {
                desc: *desc,
                x: &case.x,
                dy: &case.dy,
                weight: w,
                grads,
                epilogue: EpilogueGrad::AddRelu {
                    mask: &mask,
                    dz: dz_out,
                },
            },
            running,
            EPS,
        ),
    }
    .unwrap();
    Outcome {
        y,
        mask: fused_form.then_some(mask),
        saved: saved.map(|s| (s.mean, s.mean_lo, s.invstd)),
        running_mean: rm,
        running_var: rv,
        dx,
        dweight,
        dbias: dbias.clone(),
        dz: (case.form == Form::AddRelu).then_some(dz),
    }
}

fn every_form<T: Element>(shares: &mut Shares, seed: &mut u64) {
    for desc in shapes() {
        for &offset in offsets(T::DTYPE) {
            for training in [true, false] {
                for form in FORMS {
                    *seed += 1;
                    let case = Case::<T>::new(desc, offset, training, form, *seed);
                    check(&case, &run(&case), shares);
                }
            }
        }
    }
}

#[test]
fn reference_keeps_the_mean_on_offset_data() {
    let mut shares = Shares::default();
    let mut seed = 0;
    for dtype in DType::ALL {
        with_dtype!(dtype, every_form(&mut shares, &mut seed));
    }
    shares.print("reference offset cases");
}

/// The synchronized protocol over uneven shards (an empty one included), run rank by rank:
/// every rank's outputs against the exact results of the concatenated batch.
fn synced<T: Element>(desc: TensorDesc, offset: (f64, f64), seed: u64, shares: &mut Shares) {
    let case = Case::<T>::new(desc, offset, true, Form::Plain, seed);
    let (c, per_sample) = (desc.channels(), desc.numel() / desc.batch());
    let sizes = [desc.batch() - 3, 0, 3];
    let mut shard_descs = Vec::new();
    let mut ranges = Vec::new();
    let mut start = 0;
    for &n in &sizes {
        let mut dims = desc.dims().to_vec();
        dims[0] = n;
        shard_descs.push(TensorDesc::new(&dims, desc.layout()).unwrap());
        ranges.push(start..start + n * per_sample);
        start += n * per_sample;
    }
    let gathered: Vec<_> = ranges
        .iter()
        .zip(&shard_descs)
        .map(|(r, d)| sync::local_moments(&case.x[r.clone()], d).unwrap())
        .collect();
    let mut got = Outcome {
        y: vec![T::default(); desc.numel()],
        mask: None,
        saved: None,
        running_mean: Vec::new(),
        running_var: Vec::new(),
        dx: vec![T::default(); desc.numel()],
        dweight: vec![0.0; c],
        dbias: vec![0.0; c],
        dz: None,
    };
    let mut saved_per_rank = Vec::new();
    for (range, d) in ranges.iter().zip(&shard_descs) {
        let (mut rm, mut rv) = (case.running_mean.clone(), case.running_var.clone());
        let request = sync::SyncForward {
            desc: *d,
            x: &case.x[range.clone()],
            weight: Some(&case.weight),
            bias: Some(&case.bias),
            running: Some(RunningUpdate::pytorch(&mut rm, &mut rv, MOMENTUM)),
            eps: EPS,
            y: &mut got.y[range.clone()],
        };
        let saved = sync::forward_training(request, &gathered).unwrap();
        (got.running_mean, got.running_var) = (rm, rv);
        saved_per_rank.push(saved);
    }
    let local: Vec<_> = ranges
        .iter()
        .zip(&shard_descs)
        .zip(&saved_per_rank)
        .map(|((r, d), s)| {
            sync::local_grad_sums(&case.x[r.clone()], &case.dy[r.clone()], d, s).unwrap()
        })
        .collect();
    let global = sync::all_reduce(&local).unwrap();
    let count = desc.per_channel() as u64;
    for (rank, (range, d)) in ranges.iter().zip(&shard_descs).enumerate() {
        let (mut dweight, mut dbias) = (vec![0.0; c], vec![0.0; c]);
        let request = sync::SyncBackward {
            desc: *d,
            x: &case.x[range.clone()],
            dy: &case.dy[range.clone()],
            weight: Some(&case.weight),
            saved: &saved_per_rank[rank],
            count,
            grads: Gradients {
                dx: Some(&mut got.dx[range.clone()]),
                dweight: Some(&mut dweight),
                dbias: Some(&mut dbias),
                accumulate: false,
            },
        };
        sync::backward_training(request, &local[rank], &global).unwrap();
        // Parameter gradients stay per rank; their sum is the whole batch's.
        for ch in 0..c {
            got.dweight[ch] += dweight[ch];
            got.dbias[ch] += dbias[ch];
        }
    }
    let s = &saved_per_rank[0];
    got.saved = Some((s.mean.clone(), s.mean_lo.clone(), s.invstd.clone()));
    check(&case, &got, shares);
}

#[test]
fn reference_sync_keeps_the_mean_on_offset_data() {
    let mut shares = Shares::default();
    let mut seed = 1000;
    for desc in shapes().into_iter().filter(|d| d.batch() >= 4) {
        for dtype in DType::ALL {
            seed += 1;
            let offset = offsets(dtype)[0];
            with_dtype!(dtype, synced(desc, offset, seed, &mut shares));
        }
    }
    shares.print("reference sync offset cases");
}
