//! Loader for the golden cases recorded from PyTorch (`shared/golden/FORMAT.md` and
//! `shared/golden/fold/FORMAT.md`).
//!
//! Cases come from `<CARGO_MANIFEST_DIR>/../shared/golden` when that folder exists, and from the
//! folder named by `BATCHNORM_GOLDEN_DIR` when it is set (drop your own PyTorch cases there:
//! batch-norm cases at its top level, fold cases in its `fold/` subfolder). Finding no case at
//! all is a failure, not a pass.

use batchnorm_cuda::fold::{FoldKind, FoldSpec};
use batchnorm_cuda::{BatchNormConfig, DType, Element, Layout, TensorDesc};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The environment variable naming an extra folder of golden cases.
pub const GOLDEN_DIR_ENV: &str = "BATCHNORM_GOLDEN_DIR";

/// An element type a golden tensor can hold.
pub trait Stored: bytemuck::Pod {
    /// Its safetensors dtype.
    const STORED: Dtype;
}

impl Stored for f32 {
    const STORED: Dtype = Dtype::F32;
}
impl Stored for f64 {
    const STORED: Dtype = Dtype::F64;
}
impl Stored for half::f16 {
    const STORED: Dtype = Dtype::F16;
}
impl Stored for half::bf16 {
    const STORED: Dtype = Dtype::BF16;
}

// Safetensors data is little-endian; the loader reinterprets it in place.
#[cfg(target_endian = "big")]
compile_error!("the golden loader assumes a little-endian host");

/// One stored tensor: dtype, shape and raw little-endian bytes.
#[derive(Clone, Debug)]
pub struct Tensor {
    /// The stored dtype.
    pub dtype: Dtype,
    /// The shape, in memory order.
    pub shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// One golden file: its metadata strings and its tensors.
#[derive(Clone, Debug)]
pub struct Case {
    /// The file stem, e.g. `bn2d_nchw_f32`.
    pub name: String,
    /// Where it was loaded from.
    pub path: PathBuf,
    meta: HashMap<String, String>,
    tensors: HashMap<String, Tensor>,
}

/// The inputs of a batch-norm case, typed: activations in `T`, parameters and statistics in f32.
#[derive(Clone, Debug)]
pub struct BnInputs<T> {
    /// `x`, in the case's memory order.
    pub x: Vec<T>,
    /// `dy`, when the case has a backward part.
    pub dy: Option<Vec<T>>,
    /// `weight`, when affine.
    pub weight: Option<Vec<f32>>,
    /// `bias`, when affine.
    pub bias: Option<Vec<f32>>,
    /// `running_mean` before the call, when tracking.
    pub running_mean: Option<Vec<f32>>,
    /// `running_var` before the call, when tracking.
    pub running_var: Option<Vec<f32>>,
}

/// The inputs of a fold case, typed: the layer's weight and bias in `T`, the batch norm in f32.
#[derive(Clone, Debug)]
pub struct FoldInputs<T> {
    /// The layer's weight, in its memory order.
    pub weight: Vec<T>,
    /// The layer's bias, when it has one.
    pub conv_bias: Option<Vec<T>>,
    /// `bn.weight`, when affine.
    pub bn_weight: Option<Vec<f32>>,
    /// `bn.bias`, when affine.
    pub bn_bias: Option<Vec<f32>>,
    /// `bn.running_mean`.
    pub running_mean: Vec<f32>,
    /// `bn.running_var`.
    pub running_var: Vec<f32>,
}

impl Case {
    /// Reads one safetensors file; panics (naming the file) when it cannot.
    pub fn load(path: &Path) -> Self {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let meta = header.metadata().clone().unwrap_or_default();
        let file =
            SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let tensors = file
            .tensors()
            .into_iter()
            .map(|(name, view)| {
                let tensor = Tensor {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    bytes: view.data().to_vec(),
                };
                (name, tensor)
            })
            .collect();
        let name = path
            .file_stem()
            .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
        Self {
            name,
            path: path.to_path_buf(),
            meta,
            tensors,
        }
    }

    /// Whether `FORMAT.md` leaves the tensor `name` out of this case, so that a value the
    /// crate produces for it has nothing to match: the saved statistics of an empty batch.
    pub fn unspecified(&self, name: &str) -> bool {
        let empty = self.shape("x").is_some_and(|s| s.contains(&0));
        empty && matches!(name, "save_mean" | "save_invstd") && !self.has(&format!("expect.{name}"))
    }

    /// A metadata string.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.meta.get(key).map(String::as_str)
    }

    /// A metadata string that must be there.
    pub fn require(&self, key: &str) -> &str {
        self.meta(key)
            .unwrap_or_else(|| panic!("{}: metadata `{key}` is missing", self.name))
    }

    /// A metadata value parsed as `T`.
    fn parse<T: std::str::FromStr>(&self, key: &str) -> T {
        let text = self.require(key);
        text.parse()
            .unwrap_or_else(|_| panic!("{}: metadata `{key}` = {text:?} does not parse", self.name))
    }

    /// A `true` / `false` metadata flag.
    pub fn flag(&self, key: &str) -> bool {
        match self.require(key) {
            "true" => true,
            "false" => false,
            other => panic!(
                "{}: metadata `{key}` = {other:?} is not a boolean",
                self.name
            ),
        }
    }

    /// Whether the file holds a tensor called `name`.
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The names of the expected tensors (`expect.*`), without the prefix, sorted.
    pub fn expected_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .tensors
            .keys()
            .filter_map(|k| k.strip_prefix("expect."))
            .map(str::to_owned)
            .collect();
        names.sort();
        names
    }

    /// The stored shape of a tensor.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    /// The tensor `name` as `T`, which must be its stored dtype; `None` when absent.
    pub fn values<T: Stored>(&self, name: &str) -> Option<Vec<T>> {
        let tensor = self.tensors.get(name)?;
        assert_eq!(
            tensor.dtype,
            T::STORED,
            "{}: tensor `{name}` dtype",
            self.name
        );
        let mut values = vec![T::zeroed(); tensor.bytes.len() / std::mem::size_of::<T>()];
        bytemuck::cast_slice_mut::<T, u8>(&mut values).copy_from_slice(&tensor.bytes);
        Some(values)
    }

    /// The tensor `name` as `T`; panics when absent.
    pub fn required<T: Stored>(&self, name: &str) -> Vec<T> {
        self.values(name)
            .unwrap_or_else(|| panic!("{}: tensor `{name}` is missing", self.name))
    }

    /// The expected tensor `expect.{name}`, in f64.
    pub fn expect(&self, name: &str) -> Option<Vec<f64>> {
        self.values(&format!("expect.{name}"))
    }

    // ----- batch-norm cases -----

    /// The logical shape and layout of `x`.
    pub fn desc(&self) -> TensorDesc {
        let dims: Vec<usize> = self
            .require("shape")
            .split(',')
            .map(|d| {
                d.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{}: bad shape", self.name))
            })
            .collect();
        let layout = self.layout("layout");
        TensorDesc::new(&dims, layout).unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }

    fn layout(&self, key: &str) -> Layout {
        let name = self.require(key);
        Layout::parse(name).unwrap_or_else(|| panic!("{}: unknown layout {name:?}", self.name))
    }

    /// The dtype of the activations (batch norm) or of the layer's weight (fold).
    pub fn dtype(&self) -> DType {
        let name = self.require("dtype");
        DType::parse(name).unwrap_or_else(|| panic!("{}: unknown dtype {name:?}", self.name))
    }

    /// Whether the call ran in training mode.
    pub fn training(&self) -> bool {
        self.flag("training")
    }

    /// The layer configuration the case was recorded with.
    pub fn config(&self) -> BatchNormConfig {
        let momentum = match self.require("momentum") {
            "none" => None,
            _ => Some(self.parse("momentum")),
        };
        BatchNormConfig::new(self.desc().channels())
            .eps(self.parse("eps"))
            .momentum(momentum)
            .affine(self.flag("affine"))
            .track_running_stats(self.flag("track_running_stats"))
    }

    /// The counter before the call.
    pub fn num_batches_tracked(&self) -> u64 {
        self.parse("num_batches_tracked")
    }

    /// The counter after the call (`None` for an error case).
    pub fn expect_num_batches_tracked(&self) -> Option<u64> {
        self.meta("expect.num_batches_tracked")
            .map(|_| self.parse("expect.num_batches_tracked"))
    }

    /// The error PyTorch raised, e.g. `single_value_per_channel`.
    pub fn expect_error(&self) -> Option<&str> {
        self.meta("expect.error")
    }

    /// The typed inputs of a batch-norm case whose activations are `T`.
    pub fn bn_inputs<T: Element + Stored>(&self) -> BnInputs<T> {
        BnInputs {
            x: self.required("x"),
            dy: self.values("dy"),
            weight: self.values("weight"),
            bias: self.values("bias"),
            running_mean: self.values("running_mean"),
            running_var: self.values("running_var"),
        }
    }

    // ----- fold cases -----

    /// The description of the layer's weight.
    pub fn fold_spec(&self) -> FoldSpec {
        let kind = self.require("kind");
        let kind =
            FoldKind::parse(kind).unwrap_or_else(|| panic!("{}: unknown kind {kind:?}", self.name));
        let shape: Vec<usize> = self
            .require("weight_shape")
            .split(',')
            .map(|d| {
                d.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{}: bad weight_shape", self.name))
            })
            .collect();
        FoldSpec::new(
            kind,
            &shape,
            self.parse("groups"),
            self.layout("weight_layout"),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }

    /// The batch norm's epsilon (both kinds of case).
    pub fn eps(&self) -> f32 {
        self.parse("eps")
    }

    /// The typed inputs of a fold case whose layer weights are `T`.
    pub fn fold_inputs<T: Element + Stored>(&self) -> FoldInputs<T> {
        FoldInputs {
            weight: self.required("weight"),
            conv_bias: self.values("conv_bias"),
            bn_weight: self.values("bn.weight"),
            bn_bias: self.values("bn.bias"),
            running_mean: self.required("bn.running_mean"),
            running_var: self.required("bn.running_var"),
        }
    }
}

/// The folders golden cases are read from: the shared one when it exists, then
/// `$BATCHNORM_GOLDEN_DIR` when set (which must then exist). The same folder is not read twice.
pub fn golden_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/golden");
    if shared.is_dir() {
        dirs.push(shared);
    }
    if let Some(extra) = std::env::var_os(GOLDEN_DIR_ENV) {
        let extra = PathBuf::from(extra);
        assert!(
            extra.is_dir(),
            "{GOLDEN_DIR_ENV}={} is not a folder",
            extra.display()
        );
        dirs.push(extra);
    }
    let mut seen = Vec::new();
    dirs.retain(|dir| {
        let canonical = dir.canonicalize().unwrap_or_else(|_| dir.clone());
        let fresh = !seen.contains(&canonical);
        seen.push(canonical);
        fresh
    });
    dirs
}

/// Every `*.safetensors` file directly in `dir`, sorted by name; none when `dir` does not exist.
fn load_dir(dir: &Path) -> Vec<Case> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .map(|e| {
            e.unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .path()
        })
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    paths.sort();
    paths.iter().map(|p| Case::load(p)).collect()
}

/// Loads the cases of `sub` (`""` or `"fold"`) under every golden folder; panics when none.
fn load_all(sub: &str, what: &str) -> Vec<Case> {
    let dirs = golden_dirs();
    let cases: Vec<Case> = dirs.iter().flat_map(|d| load_dir(&d.join(sub))).collect();
    assert!(
        !cases.is_empty(),
        "no golden {what} case found in {dirs:?} (subfolder {sub:?}): check out shared/golden next to \
         the crate or set {GOLDEN_DIR_ENV}"
    );
    cases
}

/// Every batch-norm case (the `*.safetensors` directly in each golden folder).
pub fn batchnorm_cases() -> Vec<Case> {
    load_all("", "batch-norm")
}

/// Every fold case (the `*.safetensors` in each golden folder's `fold/`).
pub fn fold_cases() -> Vec<Case> {
    load_all("fold", "fold")
}
