//! Layer state in PyTorch's `state_dict` format, through safetensors (`src/state.rs`): round
//! trips, dtype conversion, one typed error per bad input, and a checkpoint written by PyTorch.
//!
//! `tests/data/pytorch_bn_state.safetensors` and its expected values
//! `tests/data/pytorch_bn_state.json` come from `scripts/make_pytorch_checkpoint.py`; the
//! committed pair was written by real PyTorch (`--backend torch`, torch 2.15.0 on the CPU: see
//! the JSON's `generator` field). The script's `--backend numpy` fallback writes the same
//! names, dtypes and shapes from a numpy emulation for machines without PyTorch; its
//! `generator` then says so.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use batchnorm_cuda::state::StateFile;
use batchnorm_cuda::{BatchNormConfig, Error, LayerState};
use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

// ------------------------------------------------------------------------------------ helpers

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A safetensors file of `(name, dtype, shape, bytes)`, without metadata.
fn file(tensors: &[(&str, Dtype, &[usize], Vec<u8>)]) -> Vec<u8> {
    let views = tensors.iter().map(|(name, dtype, shape, bytes)| {
        (
            name.to_string(),
            TensorView::new(*dtype, shape.to_vec(), bytes).unwrap(),
        )
    });
    safetensors::serialize(views, None).unwrap()
}

/// The tensors of a valid 3-channel layer at prefix `bn.`, each replaceable by name.
fn valid_layer() -> Vec<(&'static str, Dtype, &'static [usize], Vec<u8>)> {
    vec![
        ("bn.weight", Dtype::F32, &[3], f32_bytes(&[1.0, 2.0, 3.0])),
        ("bn.bias", Dtype::F32, &[3], f32_bytes(&[0.1, 0.2, 0.3])),
        (
            "bn.running_mean",
            Dtype::F32,
            &[3],
            f32_bytes(&[-1.0, 0.0, 1.0]),
        ),
        (
            "bn.running_var",
            Dtype::F32,
            &[3],
            f32_bytes(&[0.5, 1.0, 2.0]),
        ),
        (
            "bn.num_batches_tracked",
            Dtype::I64,
            &[],
            5i64.to_le_bytes().to_vec(),
        ),
    ]
}

/// `valid_layer()` with the tensor `name` replaced (`Some`) or removed (`None`).
fn layer_with(name: &str, replacement: Option<(Dtype, &'static [usize], Vec<u8>)>) -> Vec<u8> {
    let mut tensors = valid_layer();
    let index = tensors.iter().position(|(n, ..)| *n == name).unwrap();
    match replacement {
        Some((dtype, shape, bytes)) => tensors[index] = (tensors[index].0, dtype, shape, bytes),
        None => {
            tensors.remove(index);
        }
    }
    file(&tensors)
}

fn load(bytes: &[u8], config: &BatchNormConfig) -> Result<LayerState, Error> {
    LayerState::from_safetensors(bytes, "bn.", config)
}

#[track_caller]
fn assert_missing(result: Result<impl std::fmt::Debug, Error>, expected_key: &str) {
    match result {
        Err(Error::StateKeyMissing { key }) => assert_eq!(key, expected_key),
        other => panic!("expected StateKeyMissing {{ key: {expected_key} }}, got {other:?}"),
    }
}

#[track_caller]
fn assert_malformed(
    result: Result<impl std::fmt::Debug, Error>,
    expected_key: &str,
    reason_has: &str,
) {
    match result {
        Err(Error::StateKeyMalformed { key, reason }) => {
            assert_eq!(key, expected_key);
            assert!(
                reason.contains(reason_has),
                "reason `{reason}` lacks `{reason_has}`"
            );
        }
        other => panic!("expected StateKeyMalformed {{ key: {expected_key} }}, got {other:?}"),
    }
}

fn bits(values: Option<&[f32]>) -> Option<Vec<u32>> {
    values.map(|v| v.iter().map(|x| x.to_bits()).collect())
}

/// Bitwise equality: loading must not change a single bit (and `-0.0 == 0.0` would hide it).
#[track_caller]
fn assert_same(got: &LayerState, expected: &LayerState) {
    assert_eq!(
        bits(got.weight.as_deref()),
        bits(expected.weight.as_deref()),
        "weight"
    );
    assert_eq!(
        bits(got.bias.as_deref()),
        bits(expected.bias.as_deref()),
        "bias"
    );
    assert_eq!(
        bits(got.running_mean.as_deref()),
        bits(expected.running_mean.as_deref()),
        "running_mean"
    );
    assert_eq!(
        bits(got.running_var.as_deref()),
        bits(expected.running_var.as_deref()),
        "running_var"
    );
    assert_eq!(
        got.num_batches_tracked, expected.num_batches_tracked,
        "num_batches_tracked"
    );
}

/// The configuration a state was made for.
fn config_of(state: &LayerState, channels: usize) -> BatchNormConfig {
    BatchNormConfig::new(channels)
        .affine(state.weight.is_some())
        .track_running_stats(state.running_mean.is_some())
}

/// Layers of every kind, with awkward values: `-0.0`, a subnormal, `f32::MAX`, a zero variance,
/// a counter beyond `u32`.
fn model() -> Vec<(&'static str, LayerState, usize)> {
    let full = LayerState {
        weight: Some(vec![1.5, -0.0, f32::MAX]),
        bias: Some(vec![f32::MIN_POSITIVE / 2.0, -3.25, 0.0]),
        running_mean: Some(vec![-7.0, 1e-30, 12.5]),
        running_var: Some(vec![0.0, 1e30, 0.25]),
        num_batches_tracked: 12_345_678_901,
    };
    let no_affine = LayerState {
        running_mean: Some(vec![0.75]),
        running_var: Some(vec![2.0]),
        num_batches_tracked: 1,
        ..Default::default()
    };
    let no_running = LayerState {
        weight: Some(vec![0.5, 1.0, 2.0, 4.0, 8.0]),
        bias: Some(vec![-1.0, -0.5, 0.0, 0.5, 1.0]),
        ..Default::default()
    };
    let fresh = LayerState {
        weight: Some(vec![1.0; 2]),
        bias: Some(vec![0.0; 2]),
        running_mean: Some(vec![0.0; 2]),
        running_var: Some(vec![1.0; 2]),
        num_batches_tracked: 0,
    };
    vec![
        ("layer1.0.bn1.", full, 3),
        ("layer1.0.bn2.", no_affine, 1),
        ("layer2.0.bn1.", no_running, 5),
        ("layer2.0.bn2.", LayerState::default(), 4),
        ("", fresh, 2),
    ]
}

fn as_layers<'a>(
    model: &'a [(&'static str, LayerState, usize)],
) -> Vec<(&'static str, &'a LayerState)> {
    model
        .iter()
        .map(|(prefix, state, _)| (*prefix, state))
        .collect()
}

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn temp_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("state-{}-{name}", std::process::id()))
}

// ---------------------------------------------------------------------------------- round trips

#[test]
fn round_trip_through_bytes_keeps_every_layer_bitwise() {
    let model = model();
    let bytes = StateFile::to_bytes(&as_layers(&model)).unwrap();
    let file = StateFile::from_bytes(bytes.clone()).unwrap();
    for (prefix, state, channels) in &model {
        let config = config_of(state, *channels);
        assert_same(&file.layer(prefix, &config).unwrap(), state);
        assert_same(
            &LayerState::from_safetensors(&bytes, prefix, &config).unwrap(),
            state,
        );
    }
}

#[test]
fn round_trip_through_a_file() {
    let model = model();
    let path = temp_path("round_trip.safetensors");
    StateFile::save(&path, &as_layers(&model)).unwrap();
    let file = StateFile::open(&path);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let file = file.unwrap();
    for (prefix, state, channels) in &model {
        let config = config_of(state, *channels);
        assert_same(&file.layer(prefix, &config).unwrap(), state);
    }
    assert_eq!(
        bytes,
        StateFile::to_bytes(&as_layers(&model)).unwrap(),
        "save and to_bytes differ"
    );
}

#[test]
fn written_file_has_pytorch_state_dict_layout() {
    let model = model();
    let bytes = StateFile::to_bytes(&as_layers(&model)).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    assert_eq!(header.metadata().as_ref(), Some(&metadata));

    let mut expected = HashMap::new();
    for (prefix, state, channels) in &model {
        let present = [
            ("weight", state.weight.is_some()),
            ("bias", state.bias.is_some()),
            ("running_mean", state.running_mean.is_some()),
            ("running_var", state.running_var.is_some()),
        ];
        for (name, _) in present.iter().filter(|(_, present)| *present) {
            expected.insert(format!("{prefix}{name}"), (Dtype::F32, vec![*channels]));
        }
        if state.running_mean.is_some() {
            expected.insert(format!("{prefix}num_batches_tracked"), (Dtype::I64, vec![]));
        }
    }
    let got: HashMap<_, _> = header
        .tensors()
        .into_iter()
        .map(|(key, info)| (key, (info.dtype, info.shape.clone())))
        .collect();
    assert_eq!(got, expected);
    assert!(
        !got.keys().any(|key| key.starts_with("layer2.0.bn2.")),
        "a layer with no state writes no key"
    );

    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let counter = tensors.tensor("layer1.0.bn1.num_batches_tracked").unwrap();
    assert_eq!(counter.data(), 12_345_678_901i64.to_le_bytes());
}

// ----------------------------------------------------------------------------- dtype conversion

#[test]
fn half_bfloat_and_double_parameters_convert_to_f32() {
    let weight = [0.5f32, -1.25, 65504.0, 1e-3];
    let bias = [1.0f32, -3.0, 0.0078125, 0.1];
    let mean = [0.1f64, -1e-3, 1e40, 7.0];
    let var = [0.25f32, 1.0, 3.0, 1e-3];
    let weight_f16: Vec<u8> = weight
        .iter()
        .flat_map(|&v| f16::from_f32(v).to_le_bytes())
        .collect();
    let bias_bf16: Vec<u8> = bias
        .iter()
        .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
        .collect();
    let mean_f64: Vec<u8> = mean.iter().flat_map(|v| v.to_le_bytes()).collect();
    let var_f16: Vec<u8> = var
        .iter()
        .flat_map(|&v| f16::from_f32(v).to_le_bytes())
        .collect();
    let bytes = file(&[
        ("w", Dtype::F16, &[4], weight_f16),
        ("b", Dtype::BF16, &[4], bias_bf16),
        ("running_mean", Dtype::F64, &[4], mean_f64),
        ("running_var", Dtype::F16, &[4], var_f16),
        (
            "num_batches_tracked",
            Dtype::I32,
            &[],
            7i32.to_le_bytes().to_vec(),
        ),
    ]);
    let config = BatchNormConfig::new(4).affine(false);
    let state = LayerState::from_safetensors(&bytes, "", &config).unwrap();
    let expected = LayerState {
        weight: None,
        bias: None,
        running_mean: Some(mean.iter().map(|&v| v as f32).collect()),
        running_var: Some(var.iter().map(|&v| f16::from_f32(v).to_f32()).collect()),
        num_batches_tracked: 7,
    };
    assert_same(&state, &expected);
    assert_eq!(
        state.running_mean.as_ref().unwrap()[2],
        f32::INFINITY,
        "f64 beyond f32 rounds to inf"
    );

    // The same tensors as affine parameters.
    let bytes = file(&[
        (
            "weight",
            Dtype::F16,
            &[4],
            weight
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
        ),
        (
            "bias",
            Dtype::BF16,
            &[4],
            bias.iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
        ),
    ]);
    let config = BatchNormConfig::new(4).track_running_stats(false);
    let state = LayerState::from_safetensors(&bytes, "", &config).unwrap();
    let expected = LayerState {
        weight: Some(weight.iter().map(|&v| f16::from_f32(v).to_f32()).collect()),
        bias: Some(bias.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()),
        ..Default::default()
    };
    assert_same(&state, &expected);
}

#[test]
fn checkpoint_without_num_batches_tracked_loads_with_zero() {
    let bytes = layer_with("bn.num_batches_tracked", None);
    let state = load(&bytes, &BatchNormConfig::new(3)).unwrap();
    assert_eq!(state.num_batches_tracked, 0);
    assert_eq!(state.running_var, Some(vec![0.5, 1.0, 2.0]));
}

// ----------------------------------------------------------------------------- reading errors

#[test]
fn a_missing_key_is_named_with_its_prefix() {
    let config = BatchNormConfig::new(3);
    assert!(load(&file(&valid_layer()), &config).is_ok());
    for name in ["bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"] {
        assert_missing(load(&layer_with(name, None), &config), name);
    }
    assert_missing(
        LayerState::from_safetensors(&file(&valid_layer()), "bn2.", &config),
        "bn2.weight",
    );
}

#[test]
fn a_wrong_shape_is_malformed_and_says_expected_and_got() {
    let config = BatchNormConfig::new(3);
    let column = layer_with(
        "bn.weight",
        Some((Dtype::F32, &[3, 1], f32_bytes(&[1.0; 3]))),
    );
    assert_malformed(
        load(&column, &config),
        "bn.weight",
        "expected shape [3], got [3, 1]",
    );
    let four = layer_with(
        "bn.running_mean",
        Some((Dtype::F32, &[4], f32_bytes(&[0.0; 4]))),
    );
    assert_malformed(
        load(&four, &config),
        "bn.running_mean",
        "expected shape [3], got [4]",
    );
    let scalar = layer_with("bn.bias", Some((Dtype::F32, &[], f32_bytes(&[0.0]))));
    assert_malformed(
        load(&scalar, &config),
        "bn.bias",
        "expected shape [3], got []",
    );
    let vector = layer_with(
        "bn.num_batches_tracked",
        Some((Dtype::I64, &[1], 5i64.to_le_bytes().to_vec())),
    );
    assert_malformed(
        load(&vector, &config),
        "bn.num_batches_tracked",
        "expected shape [], got [1]",
    );
}

#[test]
fn an_unsupported_dtype_is_malformed_and_says_expected_and_got() {
    let config = BatchNormConfig::new(3);
    let int_weight = layer_with("bn.weight", Some((Dtype::I64, &[3], vec![0; 24])));
    assert_malformed(
        load(&int_weight, &config),
        "bn.weight",
        "expected dtype F32, F16, BF16 or F64, got I64",
    );
    let byte_var = layer_with("bn.running_var", Some((Dtype::U8, &[3], vec![1; 3])));
    assert_malformed(load(&byte_var, &config), "bn.running_var", "got U8");
    let float_counter = layer_with(
        "bn.num_batches_tracked",
        Some((Dtype::F32, &[], f32_bytes(&[5.0]))),
    );
    assert_malformed(
        load(&float_counter, &config),
        "bn.num_batches_tracked",
        "expected dtype I64 or I32, got F32",
    );
}

#[test]
fn a_negative_counter_is_malformed() {
    let config = BatchNormConfig::new(3);
    for bytes in [
        layer_with(
            "bn.num_batches_tracked",
            Some((Dtype::I64, &[], (-1i64).to_le_bytes().to_vec())),
        ),
        layer_with(
            "bn.num_batches_tracked",
            Some((Dtype::I32, &[], i32::MIN.to_le_bytes().to_vec())),
        ),
    ] {
        assert_malformed(
            load(&bytes, &config),
            "bn.num_batches_tracked",
            "expected a batch count >= 0",
        );
    }
}

#[test]
fn a_nan_or_negative_running_var_is_invalid() {
    let config = BatchNormConfig::new(3);
    for bad in [f32::NAN, -0.5, f32::INFINITY] {
        let bytes = layer_with(
            "bn.running_var",
            Some((Dtype::F32, &[3], f32_bytes(&[1.0, bad, 1.0]))),
        );
        match load(&bytes, &config) {
            Err(Error::InvalidRunningVar { channel: 1, value }) => {
                assert_eq!(value.to_bits(), bad.to_bits())
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
    // f16 storage too: -1 in half precision.
    let half = f16::from_f32(-1.0).to_le_bytes().repeat(3);
    let bytes = layer_with("bn.running_var", Some((Dtype::F16, &[3], half)));
    assert!(matches!(
        load(&bytes, &config),
        Err(Error::InvalidRunningVar { channel: 0, .. })
    ));
}

#[test]
fn a_key_the_layer_does_not_have_is_refused_like_strict_load_state_dict() {
    let bytes = file(&valid_layer());
    assert_malformed(
        load(&bytes, &BatchNormConfig::new(3).affine(false)),
        "bn.weight",
        "affine = false",
    );
    assert_malformed(
        load(&bytes, &BatchNormConfig::new(3).track_running_stats(false)),
        "bn.running_mean",
        "track_running_stats = false",
    );
    let only_counter = file(&[(
        "bn.num_batches_tracked",
        Dtype::I64,
        &[],
        2i64.to_le_bytes().to_vec(),
    )]);
    let neither = BatchNormConfig::new(3)
        .affine(false)
        .track_running_stats(false);
    assert_malformed(
        load(&only_counter, &neither),
        "bn.num_batches_tracked",
        "is 2",
    );
}

#[test]
fn bytes_that_are_not_safetensors_are_a_state_file_error() {
    let config = BatchNormConfig::new(3);
    let valid = file(&valid_layer());
    let truncated = &valid[..valid.len() - 1];
    let mut bad_header = valid.clone();
    bad_header[8] = b'[';
    for bytes in [
        &b""[..],
        b"PK\x03\x04 a zip, not safetensors",
        truncated,
        &bad_header,
    ] {
        assert!(matches!(load(bytes, &config), Err(Error::StateFile(_))));
        assert!(matches!(
            StateFile::from_bytes(bytes.to_vec()),
            Err(Error::StateFile(_))
        ));
    }

    let path = temp_path("not_safetensors.safetensors");
    std::fs::write(&path, b"\x00\x01\x02").unwrap();
    let result = StateFile::open(&path);
    std::fs::remove_file(&path).unwrap();
    match result {
        Err(Error::StateFile(reason)) => assert!(reason.contains("not_safetensors"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        StateFile::open(temp_path("missing.safetensors")),
        Err(Error::Io(_))
    ));
}

// ------------------------------------------------------------------------------ check and save

#[test]
fn check_names_each_mismatch_with_its_own_error() {
    let config = BatchNormConfig::new(2);
    let good = LayerState {
        weight: Some(vec![1.0; 2]),
        bias: Some(vec![0.0; 2]),
        running_mean: Some(vec![0.0; 2]),
        running_var: Some(vec![1.0; 2]),
        num_batches_tracked: 4,
    };
    assert!(good.check(&config).is_ok());
    let short_bias = LayerState {
        bias: Some(vec![0.0]),
        ..good.clone()
    };
    assert_malformed(
        short_bias.check(&config),
        "bias",
        "expected shape [2], got [1]",
    );
    let no_mean = LayerState {
        running_mean: None,
        ..good.clone()
    };
    assert_missing(no_mean.check(&config), "running_mean");
    assert_malformed(
        good.check(&config.affine(false)),
        "weight",
        "affine = false",
    );
    let no_running = LayerState {
        running_mean: None,
        running_var: None,
        ..good.clone()
    };
    let untracked = config.track_running_stats(false);
    assert_malformed(no_running.check(&untracked), "num_batches_tracked", "is 4");
    assert!(LayerState {
        num_batches_tracked: 0,
        ..no_running
    }
    .check(&untracked)
    .is_ok());
    let negative = LayerState {
        running_var: Some(vec![1.0, -1.0]),
        ..good
    };
    assert!(matches!(
        negative.check(&config),
        Err(Error::InvalidRunningVar {
            channel: 1,
            value: -1.0
        })
    ));
}

#[test]
fn save_refuses_states_that_would_not_read_back() {
    let good = LayerState {
        weight: Some(vec![1.0; 3]),
        bias: Some(vec![0.0; 3]),
        running_mean: Some(vec![0.0; 3]),
        running_var: Some(vec![1.0; 3]),
        num_batches_tracked: 1,
    };
    let lengths = LayerState {
        running_var: Some(vec![1.0; 2]),
        ..good.clone()
    };
    assert_malformed(
        StateFile::to_bytes(&[("bn.", &lengths)]),
        "bn.running_var",
        "expected shape [3], got [2]",
    );
    let weight_only = LayerState {
        bias: None,
        ..good.clone()
    };
    assert_missing(StateFile::to_bytes(&[("bn.", &weight_only)]), "bn.bias");
    let mean_only = LayerState {
        running_var: None,
        ..good.clone()
    };
    assert_missing(
        StateFile::to_bytes(&[("bn.", &mean_only)]),
        "bn.running_var",
    );
    let counter_only = LayerState {
        num_batches_tracked: 3,
        ..Default::default()
    };
    assert_malformed(
        StateFile::to_bytes(&[("bn.", &counter_only)]),
        "bn.num_batches_tracked",
        "is 3",
    );
    let nan = LayerState {
        running_var: Some(vec![1.0, f32::NAN, 1.0]),
        ..good.clone()
    };
    assert!(matches!(
        StateFile::to_bytes(&[("bn.", &nan)]),
        Err(Error::InvalidRunningVar { channel: 1, .. })
    ));

    let huge = LayerState {
        num_batches_tracked: u64::MAX,
        ..good.clone()
    };
    assert!(matches!(
        StateFile::to_bytes(&[("bn.", &huge)]),
        Err(Error::StateFile(_))
    ));
    match StateFile::to_bytes(&[("bn.", &good), ("bn.", &good)]) {
        Err(Error::StateFile(reason)) => assert!(reason.contains("bn.weight"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let no_dir = temp_path("no/such/dir/bn.safetensors");
    assert!(matches!(
        StateFile::save(no_dir, &[("bn.", &good)]),
        Err(Error::Io(_))
    ));
}

// ------------------------------------------------------------------------- PyTorch checkpoint

/// The expected values PyTorch printed for the committed checkpoint.
struct Expected {
    generator: String,
    layers: Vec<(String, Value)>,
}

fn expected_values() -> Expected {
    let text = std::fs::read_to_string(data("pytorch_bn_state.json")).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    Expected {
        generator: json["generator"].as_str().unwrap().to_string(),
        layers: json["layers"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

fn expected_config(layer: &Value) -> BatchNormConfig {
    BatchNormConfig::new(layer["num_features"].as_u64().unwrap() as usize)
        .affine(layer["affine"].as_bool().unwrap())
        .track_running_stats(layer["track_running_stats"].as_bool().unwrap())
        .momentum(
            layer
                .get("momentum")
                .and_then(Value::as_f64)
                .map(|m| m as f32),
        )
}

fn expected_state(layer: &Value) -> LayerState {
    // PyTorch printed f32 (or f16) values as Python floats: each is exactly an f32.
    let values = |name: &str| {
        layer.get(name).map(|v| {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
    };
    LayerState {
        weight: values("weight"),
        bias: values("bias"),
        running_mean: values("running_mean"),
        running_var: values("running_var"),
        num_batches_tracked: layer
            .get("num_batches_tracked")
            .map_or(0, |n| n.as_u64().unwrap()),
    }
}

#[test]
fn committed_pytorch_checkpoint_loads_the_values_pytorch_printed() {
    let expected = expected_values();
    eprintln!("checkpoint written by: {}", expected.generator);
    let bytes = std::fs::read(data("pytorch_bn_state.safetensors")).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let file = StateFile::open(data("pytorch_bn_state.safetensors")).unwrap();
    assert_eq!(expected.layers.len(), 4);

    let mut stored_dtypes = Vec::new();
    for (prefix, layer) in &expected.layers {
        let config = expected_config(layer);
        let state = file.layer(prefix, &config).unwrap();
        assert_same(&state, &expected_state(layer));
        assert_same(
            &LayerState::from_safetensors(&bytes, prefix, &config).unwrap(),
            &state,
        );

        let stored = layer["dtype"].as_str().unwrap();
        let key = format!(
            "{prefix}{}",
            if config.affine {
                "weight"
            } else {
                "running_mean"
            }
        );
        assert_eq!(
            header.info(&key).unwrap().dtype.to_string(),
            stored,
            "{key}"
        );
        stored_dtypes.push(stored.to_string());
        if config.track_running_stats {
            let counter = header
                .info(&format!("{prefix}num_batches_tracked"))
                .unwrap();
            assert_eq!(
                (counter.dtype, counter.shape.as_slice()),
                (Dtype::I64, &[][..])
            );
            assert!(
                state.num_batches_tracked > 0,
                "{prefix}: trained, so the counter moved"
            );
        }
    }
    assert!(
        stored_dtypes.contains(&"F16".to_string()) && stored_dtypes.contains(&"F32".to_string())
    );
}

#[test]
fn rewriting_the_pytorch_checkpoint_reproduces_its_keys_shapes_and_metadata() {
    let expected = expected_values();
    let file = StateFile::open(data("pytorch_bn_state.safetensors")).unwrap();
    let states: Vec<(&str, LayerState)> = expected
        .layers
        .iter()
        .map(|(prefix, layer)| {
            (
                prefix.as_str(),
                file.layer(prefix, &expected_config(layer)).unwrap(),
            )
        })
        .collect();
    let layers: Vec<(&str, &LayerState)> = states
        .iter()
        .map(|(prefix, state)| (*prefix, state))
        .collect();
    let ours = StateFile::to_bytes(&layers).unwrap();

    let theirs = std::fs::read(data("pytorch_bn_state.safetensors")).unwrap();
    let (_, theirs) = SafeTensors::read_metadata(&theirs).unwrap();
    let (_, ours) = SafeTensors::read_metadata(&ours).unwrap();
    assert_eq!(ours.metadata(), theirs.metadata());
    let layout = |header: &safetensors::tensor::Metadata| -> HashMap<String, (Dtype, Vec<usize>)> {
        header
            .tensors()
            .into_iter()
            .map(|(key, info)| {
                // The crate writes f32 whatever PyTorch stored.
                let dtype = if info.dtype == Dtype::F16 {
                    Dtype::F32
                } else {
                    info.dtype
                };
                (key, (dtype, info.shape.clone()))
            })
            .collect()
    };
    assert_eq!(layout(&ours), layout(&theirs));
}
