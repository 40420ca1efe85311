//! The fused ReLU epilogues of the CPU reference (`reference::fused`, the layer's
//! `forward_relu`/`forward_add_relu`/`backward_*`) against the unfused composition of the plain
//! reference and an independent ReLU: `relu(BN(x))` bit for bit, `relu(BN(x) + z)` within one
//! rounding (exactly when every step is exact), the backward as ReLU backward then the plain
//! backward bit for bit; NaN and values exactly at 0 as PyTorch; every dtype, both layouts,
//! awkward sizes; refused calls leave everything untouched.

mod common;

use batchnorm_cuda::epilogue::{self, mask_words, pack_mask, unpack_mask};
use batchnorm_cuda::reference::{
    self, fused, BatchNorm, Epilogue, EpilogueGrad, Gradients, RunningStats, RunningUpdate,
    SavedStats,
};
use batchnorm_cuda::{BatchNormConfig, DType, Element, EpilogueKind, Error, Layout, TensorDesc};
use common::gpu::{awkward_shapes, fused_inputs, FusedInputs};
use common::{ulp, with_dtype};
use half::{bf16, f16};

const EPS: f32 = 1e-5;

fn desc(dims: &[usize], layout: Layout) -> TensorDesc {
    TensorDesc::new(dims, layout).unwrap()
}

/// Every shape of the GPU tests, plus planes and rows around a mask word (31, 32, 33, 64, 65
/// values) and single-channel / single-plane cases.
fn shapes() -> Vec<TensorDesc> {
    let mut all = awkward_shapes();
    for dims in [
        &[2usize, 1, 31][..],
        &[3, 2, 32],
        &[2, 3, 33],
        &[2, 2, 64],
        &[2, 1, 65],
        &[5, 31],
        &[4, 33],
        &[3, 64, 1, 1],
        &[2, 65, 2],
    ] {
        for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
            all.push(desc(dims, layout));
        }
    }
    all
}

fn bits<T: Element>(values: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(values).to_vec()
}

fn f32_bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// PyTorch's relu on a stored value: itself when > 0 or NaN, else +0.
fn relu<T: Element>(v: T) -> T {
    let f = v.to_f64();
    if f > 0.0 || f.is_nan() {
        v
    } else {
        T::from_f64(0.0)
    }
}

/// The mask PyTorch's relu backward would use: `y > 0` of the stored `y`, packed.
fn mask_of<T: Element>(desc: &TensorDesc, y: &[T]) -> Vec<u32> {
    let positive: Vec<bool> = y.iter().map(|v| v.to_f64() > 0.0).collect();
    pack_mask(desc, &positive).unwrap()
}

/// The forward both ways: (fused y, fused mask, unfused BN(x) of the plain reference, saved
/// statistics of each, running statistics after each).
struct Forward<T> {
    y: Vec<T>,
    mask: Vec<u32>,
    plain: Vec<T>,
    saved: Option<(SavedStats, SavedStats)>,
    running: [Vec<f32>; 4],
}

fn forward<T: Element>(
    desc: &TensorDesc,
    case: &FusedInputs<T>,
    training: bool,
    residual: bool,
) -> Forward<T> {
    let n = desc.numel();
    let (w, b) = (Some(&case.weight[..]), Some(&case.bias[..]));
    let z = residual.then_some(&case.z[..]);
    let (mut y, mut plain) = (vec![T::default(); n], vec![T::default(); n]);
    let mut mask = vec![u32::MAX; mask_words(desc)]; // every word must be written
    let (mut fm, mut fv) = (case.running_mean.clone(), case.running_var.clone());
    let (mut pm, mut pv) = (case.running_mean.clone(), case.running_var.clone());
    let saved = if training {
        let fused_saved = fused::forward_training(
            fused::Forward {
                desc: *desc,
                x: &case.x,
                weight: w,
                bias: b,
                y: &mut y,
                epilogue: Epilogue::relu(z, Some(&mut mask)),
            },
            Some(RunningUpdate::pytorch(&mut fm, &mut fv, 0.1)),
            EPS,
        )
        .unwrap();
        let plain_saved = reference::forward_training(
            &case.x,
            desc,
            w,
            b,
            Some(RunningUpdate::pytorch(&mut pm, &mut pv, 0.1)),
            EPS,
            &mut plain,
        )
        .unwrap();
        Some((fused_saved, plain_saved))
    } else {
        let running = RunningStats {
            mean: &case.running_mean,
            var: &case.running_var,
        };
        fused::forward_inference(
            fused::Forward {
                desc: *desc,
                x: &case.x,
                weight: w,
                bias: b,
                y: &mut y,
                epilogue: Epilogue::relu(z, Some(&mut mask)),
            },
            running,
            EPS,
        )
        .unwrap();
        reference::forward_inference(&case.x, desc, w, b, running, EPS, &mut plain).unwrap();
        None
    };
    Forward {
        y,
        mask,
        plain,
        saved,
        running: [fm, fv, pm, pv],
    }
}

fn relu_matches_plain_then_relu<T: Element>(desc: &TensorDesc, seed: u64) {
    let case = fused_inputs::<T>(desc, seed);
    for training in [true, false] {
        let f = forward(desc, &case, training, false);
        let want: Vec<T> = f.plain.iter().map(|&v| relu(v)).collect();
        let label = format!("{desc} {} training {training}", T::DTYPE);
        assert_eq!(bits(&f.y), bits(&want), "{label}: y");
        assert_eq!(f.mask, mask_of(desc, &f.y), "{label}: mask");
        assert!(!epilogue::has_padding_bits(desc, &f.mask), "{label}");
        let [fm, fv, pm, pv] = &f.running;
        assert_eq!((f32_bits(fm), f32_bits(fv)), (f32_bits(pm), f32_bits(pv)));
        if let Some((fused_saved, plain_saved)) = f.saved {
            assert_eq!(fused_saved, plain_saved, "{label}: saved statistics");
        }
    }
}

#[test]
fn relu_forward_is_the_plain_forward_then_relu_bit_for_bit() {
    for (i, d) in shapes().iter().enumerate() {
        for dtype in DType::ALL {
            with_dtype!(dtype, relu_matches_plain_then_relu(d, 100 + i as u64));
        }
    }
}

/// Fused `round(relu(b + z))` against the unfused `relu(round(round(b) + z))`: the two differ
/// by at most `ulp(b)/2 + ulp(u + z)/2 + ulp(b + z)/2`, under `ulp(u) + 2 ulp(2 max(|u|, |u+z|))`.
fn add_relu_within_one_rounding<T: Element>(desc: &TensorDesc, seed: u64) {
    let case = fused_inputs::<T>(desc, seed);
    for training in [true, false] {
        let f = forward(desc, &case, training, true);
        let label = format!("{desc} {} training {training}", T::DTYPE);
        assert_eq!(f.mask, mask_of(desc, &f.y), "{label}: mask is y > 0");
        let [fm, fv, pm, pv] = &f.running;
        assert_eq!((f32_bits(fm), f32_bits(fv)), (f32_bits(pm), f32_bits(pv)));
        let fused_mask = unpack_mask(desc, &f.mask).unwrap();
        for (i, &bit) in fused_mask.iter().enumerate() {
            let (u, z) = (f.plain[i].to_f64(), case.z[i].to_f64());
            let sum = T::from_f64(u + z);
            let want = relu(sum).to_f64();
            let got = f.y[i].to_f64();
            let bound = ulp(T::DTYPE, u) + 2.0 * ulp(T::DTYPE, 2.0 * u.abs().max((u + z).abs()));
            assert!(
                (got - want).abs() <= bound || (got.is_nan() && want.is_nan()),
                "{label} [{i}]: fused {got:e}, unfused {want:e}, bound {bound:e}"
            );
            if (want > 0.0) != bit {
                // Only where rounding can move the sum across 0.
                assert!(
                    want.abs() <= bound && got.abs() <= bound,
                    "{label} [{i}]: mask"
                );
            }
        }
    }
}

#[test]
fn add_relu_forward_is_within_one_rounding_of_the_unfused_ops() {
    for (i, d) in shapes().iter().enumerate() {
        for dtype in DType::ALL {
            with_dtype!(dtype, add_relu_within_one_rounding(d, 300 + i as u64));
        }
    }
}

/// Eval mode with exact arithmetic (mean 0.5, var 0.25 and eps 0: invstd 2, weight 1, bias 0;
/// small integers and halves): BN(x) + z is exact, so fused and unfused agree bit for bit, and
/// sums exactly 0 give y = +0 with mask bit 0 (relu'(0) = 0).
fn exact_add_relu<T: Element>(layout: Layout) {
    let d = desc(&[2, 3, 5], layout);
    let n = d.numel();
    let x: Vec<T> = (0..n).map(|i| T::from_f64((i % 7) as f64 * 0.5)).collect();
    // z = -(x - 0.5) * 2 on every third element: the sum is exactly 0 there.
    let z: Vec<T> = (0..n)
        .map(|i| {
            let bn = ((i % 7) as f64 * 0.5 - 0.5) * 2.0;
            T::from_f64(if i % 3 == 0 {
                -bn
            } else {
                (i % 5) as f64 - 2.0
            })
        })
        .collect();
    let (mean, var) = (vec![0.5f32; 3], vec![0.25f32; 3]);
    let running = RunningStats {
        mean: &mean,
        var: &var,
    };
    let (mut y, mut plain) = (vec![T::default(); n], vec![T::default(); n]);
    let mut mask = vec![0u32; mask_words(&d)];
    fused::forward_inference(
        fused::Forward {
            desc: d,
            x: &x,
            weight: None,
            bias: None,
            y: &mut y,
            epilogue: Epilogue::AddRelu {
                z: &z,
                mask: Some(&mut mask),
            },
        },
        running,
        0.0,
    )
    .unwrap();
    reference::forward_inference(&x, &d, None, None, running, 0.0, &mut plain).unwrap();
    let want: Vec<T> = plain
        .iter()
        .zip(&z)
        .map(|(u, z)| relu(T::from_f64(u.to_f64() + z.to_f64())))
        .collect();
    assert_eq!(bits(&y), bits(&want), "{layout} {}", T::DTYPE);
    assert_eq!(mask, mask_of(&d, &y));
    let on = unpack_mask(&d, &mask).unwrap();
    for i in (0..n).step_by(3) {
        assert_eq!(y[i].to_f64().to_bits(), 0f64.to_bits(), "[{i}]: +0");
        assert!(!on[i], "[{i}]: relu'(0) = 0");
    }
    // relu(BN(x)) alone at BN(x) == 0 (x = 0.5), and at -0: +0 with bit 0.
    let mut y = vec![T::default(); n];
    fused::forward_inference(
        fused::Forward {
            desc: d,
            x: &x,
            weight: None,
            bias: None,
            y: &mut y,
            epilogue: Epilogue::Relu {
                mask: Some(&mut mask),
            },
        },
        running,
        0.0,
    )
    .unwrap();
    for (i, v) in y.iter().enumerate() {
        if i % 7 <= 1 {
            assert_eq!(v.to_f64().to_bits(), 0f64.to_bits(), "[{i}]");
        }
    }
    assert_eq!(mask, mask_of(&d, &y));
}

#[test]
fn values_exactly_at_zero_give_zero_and_mask_bit_zero() {
    for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
        exact_add_relu::<f32>(layout);
        exact_add_relu::<f16>(layout);
        exact_add_relu::<bf16>(layout);
    }
}

/// The backward both ways from the same forward: fused (mask) against ReLU backward computed
/// from y (`y > 0 ? dy : 0`) then the plain backward; dz is that masked dy.
fn backward_matches_composition<T: Element>(desc: &TensorDesc, seed: u64) {
    let case = fused_inputs::<T>(desc, seed);
    let (n, c) = (desc.numel(), desc.channels());
    for residual in [false, true] {
        for training in [true, false] {
            let f = forward(desc, &case, training, residual);
            let label = format!(
                "{desc} {} training {training} residual {residual}",
                T::DTYPE
            );
            let dy_eff: Vec<T> =
                f.y.iter()
                    .zip(&case.dy)
                    .map(|(y, &g)| if y.to_f64() > 0.0 { g } else { T::default() })
                    .collect();
            let w = Some(&case.weight[..]);
            let run = |fused_call: bool| {
                let (mut dx, mut dw, mut db) =
                    (vec![T::default(); n], vec![0f32; c], vec![0f32; c]);
                let mut dz = vec![T::from_f64(7.0); n];
                let grads = Gradients {
                    dx: Some(&mut dx),
                    dweight: Some(&mut dw),
                    dbias: Some(&mut db),
                    accumulate: false,
                };
                let dz_out = residual.then_some(&mut dz[..]);
                match (&f.saved, fused_call) {
                    (Some((saved, _)), true) => fused::backward_training(
                        fused::Backward {
                            desc: *desc,
                            x: &case.x,
                            dy: &case.dy,
                            weight: w,
                            grads,
                            epilogue: EpilogueGrad::AddRelu {
                                mask: &f.mask,
                                dz: dz_out,
                            },
                        },
                        saved,
                    ),
                    (Some((saved, _)), false) => {
                        reference::backward_training(&case.x, &dy_eff, desc, w, saved, grads)
                    }
                    (None, true) => fused::backward_inference(
                        fused::Backward {
                            desc: *desc,
                            x: &case.x,
                            dy: &case.dy,
                            weight: w,
                            grads,
                            epilogue: EpilogueGrad::AddRelu {
                                mask: &f.mask,
                                dz: dz_out,
                            },
                        },
                        RunningStats {
                            mean: &case.running_mean,
                            var: &case.running_var,
                        },
                        EPS,
                    ),
                    (None, false) => reference::backward_inference(
                        &case.x,
                        &dy_eff,
                        desc,
                        w,
                        RunningStats {
                            mean: &case.running_mean,
                            var: &case.running_var,
                        },
                        EPS,
                        grads,
                    ),
                }
                .unwrap();
                (dx, dw, db, dz)
            };
            let (dx, dw, db, dz) = run(true);
            let (want_dx, want_dw, want_db, _) = run(false);
            assert_eq!(bits(&dx), bits(&want_dx), "{label}: dx");
            assert_eq!(f32_bits(&dw), f32_bits(&want_dw), "{label}: dweight");
            assert_eq!(f32_bits(&db), f32_bits(&want_db), "{label}: dbias");
            if residual {
                assert_eq!(bits(&dz), bits(&dy_eff), "{label}: dz");
            } else {
                assert!(
                    dz.iter().all(|v| v.to_f64() == 7.0),
                    "{label}: dz untouched"
                );
            }
        }
    }
}

#[test]
fn backward_is_relu_backward_then_the_plain_backward() {
    for (i, d) in shapes().iter().enumerate() {
        for dtype in DType::ALL {
            with_dtype!(dtype, backward_matches_composition(d, 500 + i as u64));
        }
    }
}

#[test]
fn nan_and_infinities_follow_pytorch() {
    let d = desc(&[2, 2, 3], Layout::ChannelsFirst);
    let n = d.numel();
    let mut x = vec![1.0f32; n];
    x[1] = f32::NAN; // relu(NaN) = NaN, bit 0
    let mut z = vec![0.5f32; n];
    z[4] = f32::INFINITY; // inf, bit 1
    z[5] = f32::NEG_INFINITY; // -inf -> 0, bit 0
    let (mean, var) = (vec![0.0f32; 2], vec![1.0f32; 2]);
    let running = RunningStats {
        mean: &mean,
        var: &var,
    };
    let mut y = vec![0f32; n];
    let mut mask = vec![0u32; mask_words(&d)];
    fused::forward_inference(
        fused::Forward {
            desc: d,
            x: &x,
            weight: None,
            bias: None,
            y: &mut y,
            epilogue: Epilogue::AddRelu {
                z: &z,
                mask: Some(&mut mask),
            },
        },
        running,
        0.0,
    )
    .unwrap();
    let on = unpack_mask(&d, &mask).unwrap();
    assert!(y[1].is_nan() && !on[1], "relu(NaN) is NaN with bit 0");
    assert!(y[4] == f32::INFINITY && on[4]);
    assert!(y[5] == 0.0 && !on[5]);
    assert!(y[0] == 1.5 && on[0]);

    // Backward: a NaN dy under a 0 bit is dropped (threshold_backward), one under a 1 bit is kept.
    let mut dy = vec![1.0f32; n];
    dy[1] = f32::NAN;
    dy[0] = f32::NAN;
    let (mut dx, mut dz) = (vec![0f32; n], vec![0f32; n]);
    let grads = Gradients {
        dx: Some(&mut dx),
        dweight: None,
        dbias: None,
        accumulate: false,
    };
    fused::backward_inference(
        fused::Backward {
            desc: d,
            x: &x,
            dy: &dy,
            weight: None,
            grads,
            epilogue: EpilogueGrad::AddRelu {
                mask: &mask,
                dz: Some(&mut dz),
            },
        },
        running,
        0.0,
    )
    .unwrap();
    assert_eq!(dz[1].to_bits(), 0f32.to_bits());
    assert!(dz[0].is_nan() && dx[0].is_nan());
    assert_eq!(dx[1], 0.0);
    assert_eq!((dz[5], dx[5]), (0.0, 0.0));
    assert_eq!((dz[4], dx[4]), (1.0, 1.0));

    // Training: a NaN in channel 0 makes its statistics NaN, so its whole output is NaN with
    // bit 0; channel 1 is untouched.
    let mut y = vec![0f32; n];
    fused::forward_training(
        fused::Forward {
            desc: d,
            x: &x,
            weight: None,
            bias: None,
            y: &mut y,
            epilogue: Epilogue::Relu {
                mask: Some(&mut mask),
            },
        },
        None,
        EPS,
    )
    .unwrap();
    let on = unpack_mask(&d, &mask).unwrap();
    d.geometry()
        .for_each_offset(0, |i| assert!(y[i].is_nan() && !on[i]));
    d.geometry().for_each_offset(1, |i| assert!(!y[i].is_nan()));
}

/// One mask serves any number of backwards; each output may be left out; accumulation adds.
#[test]
fn mask_reuse_output_masks_and_accumulation() {
    let d = desc(&[3, 5, 7], Layout::ChannelsLast);
    let (n, c) = (d.numel(), d.channels());
    let case = fused_inputs::<f32>(&d, 77);
    let f = forward(&d, &case, true, true);
    let (saved, _) = f.saved.unwrap();
    let w = Some(&case.weight[..]);
    let full = |accumulate: bool, start: f32| {
        let (mut dx, mut dw, mut db, mut dz) =
            (vec![0f32; n], vec![start; c], vec![start; c], vec![0f32; n]);
        let grads = Gradients {
            dx: Some(&mut dx),
            dweight: Some(&mut dw),
            dbias: Some(&mut db),
            accumulate,
        };
        fused::backward_training(
            fused::Backward {
                desc: d,
                x: &case.x,
                dy: &case.dy,
                weight: w,
                grads,
                epilogue: EpilogueGrad::AddRelu {
                    mask: &f.mask,
                    dz: Some(&mut dz),
                },
            },
            &saved,
        )
        .unwrap();
        (dx, dw, db, dz)
    };
    let first = full(false, 0.0);
    assert_eq!(full(false, 0.0), first, "the mask is only read");
    let acc = full(true, 1.0);
    for (a, b) in acc.1.iter().zip(&first.1) {
        // 1 + the f64 sum, rounded once: within an ulp of 1 + its f32 rounding.
        assert!((a - (1.0 + b)).abs() <= 2.0 * f32::EPSILON * (1.0 + b.abs()));
    }
    // dz alone, dx alone, parameter gradients alone.
    let mut dz = vec![0f32; n];
    let none = Gradients {
        dx: None,
        dweight: None,
        dbias: None,
        accumulate: false,
    };
    fused::backward_training(
        fused::Backward {
            desc: d,
            x: &case.x,
            dy: &case.dy,
            weight: w,
            grads: none,
            epilogue: EpilogueGrad::AddRelu {
                mask: &f.mask,
                dz: Some(&mut dz),
            },
        },
        &saved,
    )
    .unwrap();
    assert_eq!(dz, first.3);
    let mut dx = vec![0f32; n];
    let dx_only = Gradients {
        dx: Some(&mut dx),
        dweight: None,
        dbias: None,
        accumulate: false,
    };
    fused::backward_training(
        fused::Backward {
            desc: d,
            x: &case.x,
            dy: &case.dy,
            weight: w,
            grads: dx_only,
            epilogue: EpilogueGrad::Relu { mask: &f.mask },
        },
        &saved,
    )
    .unwrap();
    assert_eq!(dx, first.0);
    let (mut dw, mut db) = (vec![0f32; c], vec![0f32; c]);
    let params = Gradients {
        dx: None,
        dweight: Some(&mut dw),
        dbias: Some(&mut db),
        accumulate: false,
    };
    fused::backward_training(
        fused::Backward {
            desc: d,
            x: &case.x,
            dy: &case.dy,
            weight: w,
            grads: params,
            epilogue: EpilogueGrad::Relu { mask: &f.mask },
        },
        &saved,
    )
    .unwrap();
    assert_eq!((dw, db), (first.1, first.2));
}

#[test]
fn refused_calls_name_the_buffer_and_change_nothing() {
    let d = desc(&[2, 3, 5], Layout::ChannelsFirst);
    let (n, words) = (d.numel(), mask_words(&d));
    let x = vec![1.0f32; n];
    let (mut mean, mut var) = (vec![0.5f32; 3], vec![2.0f32; 3]);
    let mut y = vec![9.0f32; n];
    let mut mask = vec![9u32; words];
    let mut call = |z: &[f32], y_len: usize, mask_len: usize, eps: f32| {
        fused::forward_training(
            fused::Forward {
                desc: d,
                x: &x,
                weight: None,
                bias: None,
                y: &mut y[..y_len],
                epilogue: Epilogue::AddRelu {
                    z,
                    mask: Some(&mut mask[..mask_len]),
                },
            },
            Some(RunningUpdate::pytorch(&mut mean, &mut var, 0.1)),
            eps,
        )
    };
    let short = vec![0f32; n - 1];
    let z = vec![0f32; n];
    assert!(matches!(
        call(&short, n - 1, words, EPS),
        Err(Error::BufferLength { what: "y", .. })
    ));
    assert!(matches!(
        call(&short, n, words, EPS),
        Err(Error::BufferLength {
            what: "z",
            needed: 30,
            got: 29
        })
    ));
    assert!(matches!(
        call(&z, n, words - 1, -1.0),
        Err(Error::BufferLength {
            what: "mask",
            needed: 1, // 30 values: one word (flat)
            got: 0
        })
    ));
    assert!(matches!(
        call(&z, n, words, -1.0),
        Err(Error::InvalidEps { .. })
    ));
    assert_eq!((mean.clone(), var.clone()), (vec![0.5; 3], vec![2.0; 3]));
    assert!(y.iter().all(|&v| v == 9.0) && mask.iter().all(|&m| m == 9));

    let saved = SavedStats {
        mean: vec![0.0; 3],
        mean_lo: vec![0.0; 3],
        invstd: vec![1.0; 3],
    };
    let mut dx = vec![5.0f32; n];
    let mut dz = vec![5.0f32; n - 1];
    let grads = Gradients {
        dx: Some(&mut dx),
        dweight: None,
        dbias: None,
        accumulate: false,
    };
    let err = fused::backward_training(
        fused::Backward {
            desc: d,
            x: &x,
            dy: &x,
            weight: None,
            grads,
            epilogue: EpilogueGrad::AddRelu {
                mask: &mask,
                dz: Some(&mut dz),
            },
        },
        &saved,
    );
    assert!(matches!(err, Err(Error::BufferLength { what: "dz", .. })));
    let grads = Gradients {
        dx: Some(&mut dx),
        dweight: None,
        dbias: None,
        accumulate: false,
    };
    let err = fused::backward_training(
        fused::Backward {
            desc: d,
            x: &x,
            dy: &x,
            weight: None,
            grads,
            epilogue: EpilogueGrad::Relu { mask: &mask[1..] },
        },
        &saved,
    );
    assert!(matches!(err, Err(Error::BufferLength { what: "mask", .. })));
    assert!(dx.iter().all(|&v| v == 5.0) && dz.iter().all(|&v| v == 5.0));
    // One value per channel in training: refused after the fused buffers, nothing written.
    let single = desc(&[1, 3], Layout::ChannelsFirst);
    let mut y1 = vec![0f32; 3];
    let mut m1 = vec![7u32; mask_words(&single)];
    assert!(matches!(
        fused::forward_training(
            fused::Forward {
                desc: single,
                x: &[1.0f32; 3],
                weight: None,
                bias: None,
                y: &mut y1,
                epilogue: Epilogue::Relu {
                    mask: Some(&mut m1)
                }
            },
            None,
            EPS
        ),
        Err(Error::SingleValuePerChannel { .. })
    ));
    assert_eq!(m1, [7]);
}

/// The layer: forward_relu / forward_add_relu move the counter and running statistics exactly
/// as forward; their outputs are the functional ones; backward_* need the matching forward.
#[test]
fn layer_fused_calls_match_functional_and_plain_layer() {
    for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
        let d = desc(&[4, 3, 5], layout);
        let c = d.channels();
        let case = fused_inputs::<f32>(&d, 900);
        let config = BatchNormConfig::new(c);
        let mut fused_layer = BatchNorm::new(config).unwrap();
        let mut plain_layer = BatchNorm::new(config).unwrap();
        for bn in [&mut fused_layer, &mut plain_layer] {
            bn.set_weight(&case.weight).unwrap();
            bn.set_bias(&case.bias).unwrap();
        }
        for step in 0..3 {
            let training = step < 2;
            for bn in [&mut fused_layer, &mut plain_layer] {
                if training {
                    bn.train()
                } else {
                    bn.eval()
                }
            }
            let residual = step % 2 == 0;
            let (y, mask, cache) = if residual {
                fused_layer.forward_add_relu(&case.x, &case.z, &d).unwrap()
            } else {
                fused_layer.forward_relu(&case.x, &d).unwrap()
            };
            let (plain_y, plain_cache) = plain_layer.forward(&case.x, &d).unwrap();
            assert_eq!(fused_layer.state(), plain_layer.state(), "step {step}");
            assert_eq!(cache.stats(), plain_cache.stats());
            assert_eq!(
                cache.epilogue(),
                Some(EpilogueKind::with_residual(residual))
            );
            assert_eq!(plain_cache.epilogue(), None);
            if !residual {
                let want: Vec<f32> = plain_y.iter().map(|&v| relu(v)).collect();
                assert_eq!(bits(&y), bits(&want));
            }
            assert_eq!(mask, mask_of(&d, &y));

            let dy_eff: Vec<f32> = y
                .iter()
                .zip(&case.dy)
                .map(|(y, &g)| if *y > 0.0 { g } else { 0.0 })
                .collect();
            let want = plain_layer
                .backward(&plain_cache, &case.x, &dy_eff)
                .unwrap();
            let got = if residual {
                let (g, dz) = fused_layer
                    .backward_add_relu(&cache, &case.x, &case.dy, &mask)
                    .unwrap();
                assert_eq!(bits(&dz), bits(&dy_eff));
                g
            } else {
                fused_layer
                    .backward_relu(&cache, &case.x, &case.dy, &mask)
                    .unwrap()
            };
            assert_eq!(got, want, "step {step}");
            // The plain backward takes any forward's cache (dy is then BN's output gradient).
            assert_eq!(
                fused_layer.backward(&cache, &case.x, &dy_eff).unwrap(),
                want
            );
            // A fused backward needs its own fused forward.
            let wrong = if residual {
                fused_layer
                    .backward_relu(&cache, &case.x, &case.dy, &mask)
                    .map(|_| ())
            } else {
                fused_layer
                    .backward_add_relu(&cache, &case.x, &case.dy, &mask)
                    .map(|_| ())
            };
            assert!(matches!(wrong, Err(Error::EpilogueMismatch { .. })));
            assert!(matches!(
                fused_layer.backward_relu(&plain_cache, &case.x, &case.dy, &mask),
                Err(Error::EpilogueMismatch {
                    backward: "backward_relu",
                    ran: "the plain forward",
                    ..
                })
            ));
        }
        assert_eq!(fused_layer.num_batches_tracked(), 2);
    }
}

#[test]
fn empty_batches_write_nothing_and_count() {
    let d = desc(&[0, 3, 4], Layout::ChannelsFirst);
    assert_eq!(mask_words(&d), 0);
    let mut bn = BatchNorm::new(BatchNormConfig::new(3)).unwrap();
    let (y, mask, cache) = bn.forward_add_relu::<f32>(&[], &[], &d).unwrap();
    assert!(y.is_empty() && mask.is_empty());
    assert_eq!(bn.num_batches_tracked(), 1);
    let (grads, dz) = bn.backward_add_relu::<f32>(&cache, &[], &[], &[]).unwrap();
    assert!(grads.dx.is_empty() && dz.is_empty());
    assert_eq!(grads.dweight, Some(vec![0.0; 3]));
}

/// One rounding of each output: an eval forward whose f64 result lies just past a half type's
/// midpoint, plain and through the fused add (`common::eval_halfway`), rounds up, where a result
/// rounded through f32 (or `BN(x)` rounded before the add) would tie down to 1.
#[test]
fn outputs_round_once_past_a_half_way_point() {
    fn check<T: Element>() {
        let case = common::eval_halfway(T::DTYPE);
        let desc = desc(&[1, 1], Layout::ChannelsFirst);
        let (x, z) = ([T::from_f64(0.0)], [T::from_f64(1.0)]);
        let weight = [1.0f32];
        let (mean, bias) = case.plain;
        let running = RunningStats {
            mean: &mean,
            var: &case.running_var,
        };
        let mut y = [T::default()];
        reference::forward_inference(
            &x,
            &desc,
            Some(&weight),
            Some(&bias),
            running,
            case.eps,
            &mut y,
        )
        .unwrap();
        assert_eq!(y[0].to_f64(), case.expected, "{} plain", T::DTYPE);
        let (mean, bias) = case.add;
        let running = RunningStats {
            mean: &mean,
            var: &case.running_var,
        };
        let mut mask = [0u32];
        fused::forward_inference(
            fused::Forward {
                desc,
                x: &x,
                weight: Some(&weight),
                bias: Some(&bias),
                y: &mut y,
                epilogue: Epilogue::AddRelu {
                    z: &z,
                    mask: Some(&mut mask),
                },
            },
            running,
            case.eps,
        )
        .unwrap();
        assert_eq!(y[0].to_f64(), case.expected, "{} fused add", T::DTYPE);
    }
    check::<f16>();
    check::<bf16>();
}
