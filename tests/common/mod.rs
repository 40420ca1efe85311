//! Shared by the integration tests, CPU and GPU: the golden-case loader ([`golden`]), the
//! tolerance table of `shared/golden/FORMAT.md` (in one place: [`tolerance`]), a comparator
//! that reports the worst error ([`compare`], [`assert_close`], [`Checks`]) and the GPU tests'
//! device helpers ([`gpu`]).
//!
//! Each test crate uses a part of this module.
#![allow(dead_code)]

pub mod conv;
pub mod golden;
pub mod gpu;
pub mod norms;
pub mod offset;

#[allow(unused_imports)] // each test crate uses some
pub use golden::{batchnorm_cases, fold_cases, norm_cases, BnInputs, Case, FoldInputs, Stored};

use batchnorm_cuda::{DType, Element, LayerState};
use std::collections::BTreeSet;
use std::fmt::Write as _;

/// Calls a generic function with the element type of a run-time [`DType`]:
/// `with_dtype!(case.dtype(), check(case, checks))` calls `check::<f32>`, `check::<f16>` or
/// `check::<bf16>`.
#[allow(unused_macros)] // each test crate uses some of this module
macro_rules! with_dtype {
    ($dtype:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $dtype {
            batchnorm_cuda::DType::F32 => $f::<f32>($($arg),*),
            batchnorm_cuda::DType::F16 => $f::<half::f16>($($arg),*),
            batchnorm_cuda::DType::BF16 => $f::<half::bf16>($($arg),*),
        }
    };
}
#[allow(unused_imports)]
pub(crate) use with_dtype;

/// An acceptance bound for one element of a result.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Tol {
    /// `|got - expect| <= atol + rtol * |expect|`.
    Elementwise { atol: f64, rtol: f64 },
    /// `|got - expect| <= atol + rtol * max |expect|` over the whole tensor (sums over a channel,
    /// whose small entries are differences of large terms).
    OfMax { atol: f64, rtol: f64 },
    /// `got` within one unit in the last place of `dtype` of `expect`: one rounding of the exact
    /// value.
    OneRounding(DType),
}

/// What a compared tensor is, for [`tolerance`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantity {
    /// `y` or `dx`: stored in the activation dtype.
    Activation,
    /// Running or saved statistics (f32).
    Statistic,
    /// `dweight`, `dbias` (f32 sums over a channel).
    ParamGrad,
    /// A folded weight or bias, stored in the layer's dtype.
    Folded,
}

impl Quantity {
    /// The quantity of a golden batch-norm tensor, by its name without `expect.`.
    pub fn of(name: &str) -> Self {
        match name {
            "y" | "dx" => Quantity::Activation,
            "dweight" | "dbias" => Quantity::ParamGrad,
            _ => Quantity::Statistic,
        }
    }
}

/// The tolerance table of `shared/golden/FORMAT.md` and `shared/golden/fold/FORMAT.md`.
pub fn tolerance(dtype: DType, quantity: Quantity) -> Tol {
    match (quantity, dtype) {
        (Quantity::Activation, DType::F32) => Tol::Elementwise {
            atol: 1e-4,
            rtol: 1e-4,
        },
        (Quantity::Activation, DType::F16) => Tol::Elementwise {
            atol: 4e-3,
            rtol: 2e-3,
        },
        (Quantity::Activation, DType::BF16) => Tol::Elementwise {
            atol: 3e-2,
            rtol: 1.6e-2,
        },
        // Statistics are accumulated in f32 whatever the activation dtype.
        (Quantity::Statistic, _) => Tol::Elementwise {
            atol: 1e-4,
            rtol: 1e-4,
        },
        (Quantity::ParamGrad, _) => Tol::OfMax {
            atol: 1e-4,
            rtol: 1e-4,
        },
        (Quantity::Folded, DType::F32) => Tol::Elementwise {
            atol: 1e-7,
            rtol: 1e-6,
        },
        (Quantity::Folded, half) => Tol::OneRounding(half),
    }
}

/// The tolerance for the golden batch-norm tensor `name` of a case with activations `dtype`.
pub fn tolerance_for(name: &str, dtype: DType) -> Tol {
    tolerance(dtype, Quantity::of(name))
}

/// One unit in the last place of `dtype` at `x` (the spacing of the binade, subnormals included).
pub fn ulp(dtype: DType, x: f64) -> f64 {
    let (mantissa_bits, min_exponent) = match dtype {
        DType::F32 => (23, -126),
        DType::F16 => (10, -14),
        DType::BF16 => (7, -126),
    };
    let exponent = if x == 0.0 {
        min_exponent
    } else {
        (x.abs().log2().floor() as i32).max(min_exponent)
    };
    2f64.powi(exponent - mantissa_bits)
}

/// Widens activations (or anything [`Element`]) to f64.
pub fn widen<T: Element>(values: &[T]) -> Vec<f64> {
    values.iter().map(|v| v.to_f64()).collect()
}

/// Widens f32 values to f64.
pub fn widen_f32(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&v| f64::from(v)).collect()
}

/// The outcome of a successful comparison.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Report {
    /// Largest `|got - expect|` over the finite elements.
    pub worst: f64,
    /// Largest `|got - expect| / bound`: how much of the tolerance was used (at most 1).
    pub worst_ratio: f64,
    /// Elements compared.
    pub len: usize,
}

/// Compares `got` with `expect` element by element under `tol`. A NaN expected must be a NaN, an
/// infinity the same infinity, a finite value a finite value within the bound. On failure the
/// message names the number of bad elements and the first few, and the worst error.
pub fn compare(got: &[f64], expect: &[f64], tol: Tol) -> Result<Report, String> {
    if got.len() != expect.len() {
        return Err(format!("{} elements, expected {}", got.len(), expect.len()));
    }
    let max_abs = expect
        .iter()
        .filter(|e| e.is_finite())
        .fold(0.0f64, |m, e| m.max(e.abs()));
    let bound = |e: f64| match tol {
        Tol::Elementwise { atol, rtol } => atol + rtol * e.abs(),
        Tol::OfMax { atol, rtol } => atol + rtol * max_abs,
        Tol::OneRounding(dtype) => ulp(dtype, e),
    };
    let mut report = Report {
        len: got.len(),
        ..Report::default()
    };
    let (mut bad, mut first) = (0usize, String::new());
    for (i, (&g, &e)) in got.iter().zip(expect).enumerate() {
        let ok = if e.is_nan() {
            g.is_nan()
        } else if e.is_infinite() {
            g == e
        } else if g.is_finite() {
            let err = (g - e).abs();
            report.worst = report.worst.max(err);
            report.worst_ratio = report.worst_ratio.max(err / bound(e));
            err <= bound(e)
        } else {
            false
        };
        if !ok {
            bad += 1;
            if bad <= 5 {
                let _ = write!(first, " [{i}] got {g:e} expected {e:e};");
            }
        }
    }
    if bad == 0 {
        Ok(report)
    } else {
        Err(format!(
            "{bad} of {} elements outside {tol:?}:{first} worst |err| {:.3e} ({:.2}x the bound)",
            got.len(),
            report.worst,
            report.worst_ratio
        ))
    }
}

/// [`compare`], panicking with `what` and the message on failure; returns the report.
#[track_caller]
pub fn assert_close(what: &str, got: &[f64], expect: &[f64], tol: Tol) -> Report {
    compare(got, expect, tol).unwrap_or_else(|msg| panic!("{what}: {msg}"))
}

/// The checks of one golden case: every comparison records its worst error, failures are
/// collected rather than panicking at once, and [`Checks::finish`] fails a case whose expected
/// tensors were not all compared.
#[derive(Debug)]
pub struct Checks {
    label: String,
    expected: BTreeSet<String>,
    checked: BTreeSet<String>,
    lines: Vec<String>,
    failures: Vec<String>,
}

impl Checks {
    /// Checks for `case`, labelled `label` (e.g. `functional`, `layer`).
    pub fn new(case: &Case, label: &str) -> Self {
        Self {
            label: format!("{label} {}", case.name),
            expected: case.expected_names().into_iter().collect(),
            checked: BTreeSet::new(),
            lines: Vec::new(),
            failures: Vec::new(),
        }
    }

    /// Compares a result with `expect.{name}` under `tol`. A result with no expectation is a
    /// failure (the case should have recorded one) unless `FORMAT.md` says the quantity is
    /// absent there ([`Case::unspecified`]), and an expectation with no result is a failure.
    pub fn compare(&mut self, case: &Case, name: &str, got: Option<Vec<f64>>, tol: Tol) {
        self.checked.insert(name.to_owned());
        match (got, case.expect(name)) {
            (Some(got), Some(expect)) => match compare(&got, &expect, tol) {
                Ok(report) => self.lines.push(format!(
                    "{name} {:.2e} ({:.2} of tol)",
                    report.worst, report.worst_ratio
                )),
                Err(msg) => self.failures.push(format!("{name}: {msg}")),
            },
            (None, Some(_)) => self
                .failures
                .push(format!("{name}: expected, but not produced")),
            (Some(_), None) if case.unspecified(name) => {
                self.lines.push(format!("{name} unspecified"))
            }
            (Some(_), None) => self.failures.push(format!(
                "{name}: produced, but the case has no expect.{name}"
            )),
            (None, None) => {}
        }
    }

    /// [`Checks::compare`] of the golden batch-norm tensor `name` with its tolerance from the
    /// table; for `y` and `dx` the line also gives the worst error in units in the last place of
    /// the case's dtype at `max(|expected|, 1)` (half an ulp is one correct rounding of an output
    /// of at least unit size; smaller outputs are differences of terms of about unit size, whose
    /// rounding is what bounds them).
    pub fn compare_golden(&mut self, case: &Case, name: &str, got: Option<Vec<f64>>) {
        let dtype = case.dtype();
        let ulps = match (&got, case.expect(name), Quantity::of(name)) {
            (Some(got), Some(expect), Quantity::Activation) if got.len() == expect.len() => Some(
                got.iter()
                    .zip(&expect)
                    .filter(|(g, e)| g.is_finite() && e.is_finite())
                    .map(|(g, e)| (g - e).abs() / ulp(dtype, e.abs().max(1.0)))
                    .fold(0.0, f64::max),
            ),
            _ => None,
        };
        self.compare(case, name, got, tolerance_for(name, dtype));
        if let Some(ulps) = ulps {
            self.lines.push(format!("{name} {ulps:.2} ulp"));
        }
    }

    /// Records that the API under test does not hand out `expect.{name}` (the candle adapter
    /// keeps the saved statistics inside its op), saying why, so that [`Checks::finish`] does
    /// not count it as forgotten.
    pub fn not_exposed(&mut self, name: &str, why: &str) {
        self.checked.insert(name.to_owned());
        self.lines.push(format!("{name} not exposed ({why})"));
    }

    /// Records an exact (integer) comparison.
    pub fn equal<V: PartialEq + std::fmt::Debug>(&mut self, name: &str, got: V, expect: V) {
        if got == expect {
            self.lines.push(format!("{name} = {got:?}"));
        } else {
            self.failures
                .push(format!("{name}: got {got:?}, expected {expect:?}"));
        }
    }

    /// Records a failure.
    pub fn fail(&mut self, message: impl Into<String>) {
        self.failures.push(message.into());
    }

    /// Records a passing check that compares no tensor (an expected error, say).
    pub fn note(&mut self, message: impl Into<String>) {
        self.lines.push(message.into());
    }

    /// The case's summary line and its failures (empty when it passed).
    pub fn finish(mut self) -> (String, Vec<String>) {
        let unchecked: Vec<&String> = self.expected.difference(&self.checked).collect();
        if !unchecked.is_empty() {
            self.failures
                .push(format!("expected tensors never compared: {unchecked:?}"));
        }
        if self.lines.is_empty() && self.failures.is_empty() {
            self.failures.push("nothing was checked".into());
        }
        let status = if self.failures.is_empty() {
            "ok  "
        } else {
            "FAIL"
        };
        let line = format!("{status} {}: {}", self.label, self.lines.join(", "));
        (
            line,
            self.failures
                .iter()
                .map(|f| format!("{}: {f}", self.label))
                .collect(),
        )
    }
}

/// Runs `check` on every case, prints one line per case (each compared tensor with its worst
/// error) and panics at the end listing every failure, so one bad case does not hide the
/// others. A case whose check panics fails too.
pub fn run_all(cases: &[Case], label: &str, check: impl Fn(&Case, &mut Checks)) {
    let (mut lines, mut failures) = (Vec::new(), Vec::new());
    for case in cases {
        let mut checks = Checks::new(case, label);
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(case, &mut checks)));
        if let Err(panic) = outcome {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            checks.fail(format!("panicked: {msg}"));
        }
        let (line, case_failures) = checks.finish();
        lines.push(line);
        failures.extend(case_failures);
    }
    println!(
        "{}\n{label}: {} cases, {} failures",
        lines.join("\n"),
        cases.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} golden failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Bit patterns of an optional buffer.
fn bits(values: &Option<Vec<f32>>) -> Option<Vec<u32>> {
    values
        .as_ref()
        .map(|v| v.iter().map(|x| x.to_bits()).collect())
}

/// The state as bits: equal exactly when every value is bitwise equal (NaN payloads included).
fn state_bits(state: &LayerState) -> [Option<Vec<u32>>; 4] {
    [
        bits(&state.weight),
        bits(&state.bias),
        bits(&state.running_mean),
        bits(&state.running_var),
    ]
}

/// `None` when `after` is bitwise `before`, else what changed.
pub fn state_change(before: &LayerState, after: &LayerState) -> Option<String> {
    let names = ["weight", "bias", "running_mean", "running_var"];
    let mut changed: Vec<&str> = names
        .iter()
        .zip(state_bits(before).iter().zip(state_bits(after).iter()))
        .filter(|(_, (b, a))| b != a)
        .map(|(name, _)| *name)
        .collect();
    if before.num_batches_tracked != after.num_batches_tracked {
        changed.push("num_batches_tracked");
    }
    (!changed.is_empty()).then(|| format!("changed: {changed:?}"))
}

/// Inputs whose exact result lies just past a rounding midpoint of a half type: a result
/// rounded once lands on the upper neighbour, one rounded to f32 first lands exactly on the
/// midpoint and ties to even, the lower one. For `dtype` (F16 or BF16) with `h` the half ulp
/// at 1 (2^-11, 2^-8): `1 + h + tiny` must round to `1 + 2h`, never to 1.
pub struct Halfway {
    /// `h`, the distance from 1 to the midpoint above it.
    pub half_ulp: f64,
    /// The result a single rounding gives: `1 + 2h`.
    pub once: f64,
}

pub fn halfway(dtype: DType) -> Halfway {
    let half_ulp = match dtype {
        DType::F16 => 2f64.powi(-11),
        DType::BF16 => 2f64.powi(-8),
        DType::F32 => unreachable!("f32 outputs are rounded from f64 once by construction"),
    };
    Halfway {
        half_ulp,
        once: 1.0 + 2.0 * half_ulp,
    }
}

/// A fold whose folded weight and bias land just past a midpoint (see [`Halfway`]): one output
/// channel, a 1x1 conv with weight 1 and bias 0, `eps = 2^-30`, `running_var = 1 - 2^-24`
/// (so `s = bn_weight / sqrt(1 - 2^-24 + 2^-30)` is `(1 + h)(1 + ~2^-25)`, below f32's half ulp
/// past the midpoint), `bn_weight = bn_bias = 1 + h` and `running_mean = -2^-40` (so
/// `b' = 2^-40 * s + 1 + h`). Both must fold to [`Halfway::once`].
pub struct FoldHalfway {
    pub eps: f32,
    pub running_mean: [f32; 1],
    pub running_var: [f32; 1],
    pub bn_weight: [f32; 1],
    pub bn_bias: [f32; 1],
    pub expected: f64,
}

pub fn fold_halfway(dtype: DType) -> FoldHalfway {
    let h = halfway(dtype);
    let past = (1.0 + h.half_ulp) as f32;
    FoldHalfway {
        eps: 2f32.powi(-30),
        running_mean: [-(2f32.powi(-40))],
        running_var: [1.0 - 2f32.powi(-24)],
        bn_weight: [past],
        bn_bias: [past],
        expected: h.once,
    }
}

/// An eval-mode batch norm of one value whose `y` lands just past a midpoint of a half type
/// (see [`Halfway`]): `x = 0`, `running_var = 1 - 2^-20` with `eps = 2^-20` (so `invstd` is 1
/// exactly, in f32 and in f64), weight 1.
/// - `running_mean = -2^-40`, `bias = 1 + h`: `y = 1 + h + 2^-40` exactly, only in f64; the
///   reference, which rounds its f64 result once, must give [`Halfway::once`].
/// - `running_mean = 0`, `bias = h + 2^-23` and a residual `z = 1`: `BN(x) + z = 1 + h + 2^-23`,
///   exact in f32; the fused add, which rounds the f32 sum once (GPU) or the f64 one (CPU), must
///   give [`Halfway::once`] (rounding `BN(x)` to the half type first gives `h`, then a tie).
pub struct EvalHalfway {
    pub eps: f32,
    pub running_var: [f32; 1],
    /// `(running_mean, bias)` of the f64-only case.
    pub plain: ([f32; 1], [f32; 1]),
    /// `(running_mean, bias)` of the fused-add case (with `z = 1`).
    pub add: ([f32; 1], [f32; 1]),
    pub expected: f64,
}

pub fn eval_halfway(dtype: DType) -> EvalHalfway {
    let h = halfway(dtype);
    EvalHalfway {
        eps: 2f32.powi(-20),
        running_var: [1.0 - 2f32.powi(-20)],
        plain: ([-(2f32.powi(-40))], [(1.0 + h.half_ulp) as f32]),
        add: ([0.0], [(h.half_ulp + 2f64.powi(-23)) as f32]),
        expected: h.once,
    }
}
