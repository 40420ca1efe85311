//! Issue 8, bad input: one table of refused calls, each with its own typed [`Error`], driven
//! through the CPU layer (`reference::BatchNorm`, runs everywhere) and the GPU layer
//! (`gpu::BatchNorm`, the ignored twin), each row checking that the layer's parameters, running
//! statistics and counter are bitwise what they were before the call and that the layer still
//! works after it. Then the inputs that look bad but are not errors: empty batches (N = 0 or a
//! spatial size of 0: empty output, statistics unchanged, counter incremented as in PyTorch),
//! views whose start is one element off (16-byte alignment broken: the kernels fall back to
//! scalar code), a counter at `u64::MAX`; and a context without a driver or device.
//!
//! `cargo test --release --test bad_input -- --nocapture` prints every row with its message.

mod common;

use batchnorm_cuda::fold::{FoldKind, FoldSpec};
use batchnorm_cuda::gpu::{self, GpuContext};
use batchnorm_cuda::reference;
use batchnorm_cuda::state::{StateFile, StatefulLayer};
use batchnorm_cuda::{
    BatchNormConfig, DType, Element, Error, LayerState, Layout, Result, TensorDesc,
};
use common::state_change;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use half::f16;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

const CF: Layout = Layout::ChannelsFirst;
const CL: Layout = Layout::ChannelsLast;

// ------------------------------------------------------------------------- the layers, unified

/// Which implementation a row runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Cpu,
    Gpu,
}

/// Where a row applies, and why not everywhere.
#[derive(Clone, Copy, Debug)]
enum Applies {
    Both,
    /// Only the GPU layer can express the call; the reason says why.
    GpuOnly(&'static str),
}

impl Applies {
    fn to(self, path: Path) -> bool {
        matches!(
            (self, path),
            (Applies::Both, _) | (Applies::GpuOnly(_), Path::Gpu)
        )
    }
}

/// Activations on the host, in one of the dtypes.
#[derive(Clone, Debug, PartialEq)]
enum Acts {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl Acts {
    fn len(&self) -> usize {
        match self {
            Acts::F32(v) => v.len(),
            Acts::F16(v) => v.len(),
        }
    }

    fn to_f16(&self) -> Acts {
        match self {
            Acts::F32(v) => Acts::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
            Acts::F16(v) => Acts::F16(v.clone()),
        }
    }
}

/// `n` deterministic values that are not constant per channel.
fn acts(n: usize) -> Acts {
    Acts::F32(
        (0..n)
            .map(|i| ((i * 7 + 3) % 11) as f32 * 0.25 - 1.0)
            .collect(),
    )
}

/// A second set of values, for `dy`.
fn grads(n: usize) -> Acts {
    Acts::F32((0..n).map(|i| ((i * 5) % 9) as f32 * 0.125 - 0.5).collect())
}

/// What a forward hands to its backward, on either path.
enum Cache {
    Cpu(reference::ForwardCache),
    Gpu(gpu::ForwardCache),
}

/// Gradients a backward returns: `dx`, and the layer's parameter gradients (the CPU layer
/// returns them per call, the GPU layer accumulates them; a fresh GPU layer starts at 0).
#[derive(Debug)]
struct Grads {
    dx: Acts,
    dweight: Option<Vec<f32>>,
    dbias: Option<Vec<f32>>,
}

/// A batch-norm layer under test, CPU or GPU, driven with host data.
trait Subject {
    fn path(&self) -> Path;
    /// The layer's state and mode, through the trait both layers implement.
    fn layer(&self) -> &dyn StatefulLayer;
    fn layer_mut(&mut self) -> &mut dyn StatefulLayer;
    /// Builds (and drops) another layer with `config` on the same path.
    fn build(&self, config: BatchNormConfig) -> Result<()>;
    /// A forward; `y_len` (GPU only: the CPU layer allocates `y`) gives `y` another length.
    fn forward_sized(
        &mut self,
        desc: &TensorDesc,
        x: &Acts,
        y_len: Option<usize>,
    ) -> Result<(Acts, Cache)>;
    /// A backward; `dx_len` (GPU only) gives `dx` another length.
    fn backward_sized(
        &mut self,
        cache: &Cache,
        x: &Acts,
        dy: &Acts,
        dx_len: Option<usize>,
    ) -> Result<Grads>;
    /// Folds into a conv / linear weight, returning the folded weight and bias.
    fn fold(
        &self,
        spec: &FoldSpec,
        weight: &[f32],
        bias: Option<&[f32]>,
    ) -> Result<(Vec<f32>, Vec<f32>)>;

    fn forward(&mut self, desc: &TensorDesc, x: &Acts) -> Result<(Acts, Cache)> {
        self.forward_sized(desc, x, None)
    }

    fn config(&self) -> BatchNormConfig {
        *self.layer().config()
    }

    fn state(&self) -> LayerState {
        self.layer().state().expect("layer state")
    }

    fn load_state(&mut self, state: &LayerState) -> Result<()> {
        self.layer_mut().load_state(state)
    }

    fn eval(&mut self) {
        self.layer_mut().eval()
    }

    fn set_weight(&mut self, weight: &[f32]) -> Result<()> {
        self.layer_mut().set_weight(weight)
    }

    fn set_running_var(&mut self, var: &[f32]) -> Result<()> {
        self.layer_mut().set_running_var(var)
    }

    fn set_num_batches_tracked(&mut self, count: u64) -> Result<()> {
        self.layer_mut().set_num_batches_tracked(count)
    }

    fn backward(&mut self, cache: &Cache, x: &Acts, dy: &Acts) -> Result<Grads> {
        self.backward_sized(cache, x, dy, None)
    }
}

struct Cpu(reference::BatchNorm);

impl Cpu {
    fn boxed(config: BatchNormConfig) -> Box<dyn Subject> {
        Box::new(Cpu(reference::BatchNorm::new(config).expect("CPU layer")))
    }
}

impl Subject for Cpu {
    fn path(&self) -> Path {
        Path::Cpu
    }

    fn layer(&self) -> &dyn StatefulLayer {
        &self.0
    }

    fn layer_mut(&mut self) -> &mut dyn StatefulLayer {
        &mut self.0
    }

    fn build(&self, config: BatchNormConfig) -> Result<()> {
        reference::BatchNorm::new(config).map(drop)
    }

    fn forward_sized(
        &mut self,
        desc: &TensorDesc,
        x: &Acts,
        y_len: Option<usize>,
    ) -> Result<(Acts, Cache)> {
        assert!(y_len.is_none(), "the CPU layer allocates y: a GPU-only row");
        Ok(match x {
            Acts::F32(x) => {
                let (y, cache) = self.0.forward(x, desc)?;
                (Acts::F32(y), Cache::Cpu(cache))
            }
            Acts::F16(x) => {
                let (y, cache) = self.0.forward(x, desc)?;
                (Acts::F16(y), Cache::Cpu(cache))
            }
        })
    }

    fn backward_sized(
        &mut self,
        cache: &Cache,
        x: &Acts,
        dy: &Acts,
        dx_len: Option<usize>,
    ) -> Result<Grads> {
        assert!(
            dx_len.is_none(),
            "the CPU layer allocates dx: a GPU-only row"
        );
        let Cache::Cpu(cache) = cache else {
            panic!("a GPU cache on the CPU path")
        };
        Ok(match (x, dy) {
            (Acts::F32(x), Acts::F32(dy)) => {
                let g = self.0.backward(cache, x, dy)?;
                Grads {
                    dx: Acts::F32(g.dx),
                    dweight: g.dweight,
                    dbias: g.dbias,
                }
            }
            (Acts::F16(x), Acts::F16(dy)) => {
                let g = self.0.backward(cache, x, dy)?;
                Grads {
                    dx: Acts::F16(g.dx),
                    dweight: g.dweight,
                    dbias: g.dbias,
                }
            }
            _ => panic!("x and dy of different dtypes"),
        })
    }

    fn fold(
        &self,
        spec: &FoldSpec,
        weight: &[f32],
        bias: Option<&[f32]>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let folded = self.0.fold_into(spec, weight, bias)?;
        Ok((folded.weight, folded.bias))
    }
}

/// A device buffer holding `len` elements from element `offset` on (an offset of 1 breaks the
/// 16-byte alignment of the start). Never a zero-length allocation.
struct DevBuf<T> {
    buf: CudaSlice<T>,
    offset: usize,
    len: usize,
}

impl<T: Element> DevBuf<T> {
    fn zeros(gpu: &GpuContext, len: usize, offset: usize) -> Self {
        let buf = gpu
            .stream()
            .alloc_zeros::<T>((offset + len).max(1))
            .expect("device allocation");
        Self { buf, offset, len }
    }

    fn upload(gpu: &GpuContext, host: &[T], offset: usize) -> Self {
        let mut buffer = Self::zeros(gpu, host.len(), offset);
        if !host.is_empty() {
            gpu.stream()
                .memcpy_htod(host, &mut buffer.view_mut())
                .expect("host to device copy");
        }
        buffer
    }

    fn view(&self) -> CudaView<'_, T> {
        self.buf.slice(self.offset..self.offset + self.len)
    }

    fn view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.buf.slice_mut(self.offset..self.offset + self.len)
    }

    fn download(&self, gpu: &GpuContext) -> Vec<T> {
        if self.len == 0 {
            return Vec::new();
        }
        gpu.stream()
            .clone_dtoh(&self.view())
            .expect("device to host copy")
    }
}

struct Gpu {
    gpu: GpuContext,
    bn: gpu::BatchNorm,
}

impl Gpu {
    fn boxed(gpu: &GpuContext, config: BatchNormConfig) -> Box<dyn Subject> {
        let bn = gpu::BatchNorm::new(gpu, config).expect("GPU layer");
        Box::new(Gpu {
            gpu: gpu.clone(),
            bn,
        })
    }

    fn forward_typed<T: Element>(
        &mut self,
        desc: &TensorDesc,
        x: &[T],
        y_len: Option<usize>,
    ) -> Result<(Vec<T>, Cache)> {
        let x = DevBuf::upload(&self.gpu, x, 0);
        let mut y = DevBuf::<T>::zeros(&self.gpu, y_len.unwrap_or(desc.numel()), 0);
        let cache = self.bn.forward(desc, &x.view(), &mut y.view_mut())?;
        Ok((y.download(&self.gpu), Cache::Gpu(cache)))
    }

    /// The backward; returns `dx` (the parameter gradients stay in the layer).
    fn backward_typed<T: Element>(
        &mut self,
        cache: &gpu::ForwardCache,
        x: &[T],
        dy: &[T],
        dx_len: Option<usize>,
    ) -> Result<Vec<T>> {
        let x = DevBuf::upload(&self.gpu, x, 0);
        let dy = DevBuf::upload(&self.gpu, dy, 0);
        let mut dx = DevBuf::<T>::zeros(&self.gpu, dx_len.unwrap_or(cache.desc().numel()), 0);
        self.bn
            .backward(cache, &x.view(), &dy.view(), Some(dx.view_mut()))?;
        Ok(dx.download(&self.gpu))
    }
}

impl Subject for Gpu {
    fn path(&self) -> Path {
        Path::Gpu
    }

    fn layer(&self) -> &dyn StatefulLayer {
        &self.bn
    }

    fn layer_mut(&mut self) -> &mut dyn StatefulLayer {
        &mut self.bn
    }

    fn build(&self, config: BatchNormConfig) -> Result<()> {
        gpu::BatchNorm::new(&self.gpu, config).map(drop)
    }

    fn forward_sized(
        &mut self,
        desc: &TensorDesc,
        x: &Acts,
        y_len: Option<usize>,
    ) -> Result<(Acts, Cache)> {
        Ok(match x {
            Acts::F32(x) => {
                let (y, cache) = self.forward_typed(desc, x, y_len)?;
                (Acts::F32(y), cache)
            }
            Acts::F16(x) => {
                let (y, cache) = self.forward_typed(desc, x, y_len)?;
                (Acts::F16(y), cache)
            }
        })
    }

    fn backward_sized(
        &mut self,
        cache: &Cache,
        x: &Acts,
        dy: &Acts,
        dx_len: Option<usize>,
    ) -> Result<Grads> {
        let Cache::Gpu(cache) = cache else {
            panic!("a CPU cache on the GPU path")
        };
        let dx = match (x, dy) {
            (Acts::F32(x), Acts::F32(dy)) => Acts::F32(self.backward_typed(cache, x, dy, dx_len)?),
            (Acts::F16(x), Acts::F16(dy)) => Acts::F16(self.backward_typed(cache, x, dy, dx_len)?),
            _ => panic!("x and dy of different dtypes"),
        };
        Ok(Grads {
            dx,
            dweight: self.bn.grad_weight()?,
            dbias: self.bn.grad_bias()?,
        })
    }

    fn fold(
        &self,
        spec: &FoldSpec,
        weight: &[f32],
        bias: Option<&[f32]>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let gpu = &self.gpu;
        let weight_in = DevBuf::upload(gpu, weight, 0);
        let conv_bias = bias.map(|b| DevBuf::upload(gpu, b, 0));
        let mut weight_out = DevBuf::<f32>::zeros(gpu, weight.len(), 0);
        let mut bias_out = DevBuf::<f32>::zeros(gpu, spec.c_out(), 0);
        self.bn.fold_into(
            spec,
            Some(&weight_in.view()),
            &mut weight_out.view_mut(),
            conv_bias.as_ref().map(|b| b.view()).as_ref(),
            &mut bias_out.view_mut(),
        )?;
        Ok((weight_out.download(gpu), bias_out.download(gpu)))
    }
}

// ------------------------------------------------------------------------------- state checks

/// A state no fresh layer has, so that any partial write shows: distinct weights, biases,
/// running statistics per channel, and a counter of 7.
fn distinctive_state(config: &BatchNormConfig) -> LayerState {
    let c = config.num_features;
    let per_channel = |a: f32, b: f32| (0..c).map(|i| a + b * (i % 13) as f32).collect::<Vec<_>>();
    let track = config.track_running_stats;
    LayerState {
        weight: config.affine.then(|| per_channel(0.5, 0.25)),
        bias: config.affine.then(|| per_channel(0.3, -0.125)),
        running_mean: track.then(|| per_channel(-0.2, 0.1)),
        running_var: track.then(|| per_channel(0.75, 0.5)),
        num_batches_tracked: if track { 7 } else { 0 },
    }
}

// --------------------------------------------------------------------------------- state files

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A safetensors file of `(name, dtype, shape, bytes)`, written without this crate (whose
/// writer refuses bad states).
fn file(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let views = tensors.iter().map(|(name, dtype, shape, bytes)| {
        (
            name.to_string(),
            TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
        )
    });
    safetensors::serialize(views, None).unwrap()
}

/// A valid 3-channel layer at prefix `bn.` with the tensor `name` replaced (`Some`) or removed
/// (`None`).
fn state_file_with(name: &str, replacement: Option<(Dtype, Vec<usize>, Vec<u8>)>) -> Vec<u8> {
    let mut tensors = vec![
        (
            "bn.weight",
            Dtype::F32,
            vec![3],
            f32_bytes(&[1.0, 2.0, 3.0]),
        ),
        ("bn.bias", Dtype::F32, vec![3], f32_bytes(&[0.1, 0.2, 0.3])),
        (
            "bn.running_mean",
            Dtype::F32,
            vec![3],
            f32_bytes(&[-1.0, 0.0, 1.0]),
        ),
        (
            "bn.running_var",
            Dtype::F32,
            vec![3],
            f32_bytes(&[0.5, 1.0, 2.0]),
        ),
        (
            "bn.num_batches_tracked",
            Dtype::I64,
            vec![],
            5i64.to_le_bytes().to_vec(),
        ),
    ];
    let index = tensors.iter().position(|(n, ..)| *n == name).unwrap();
    match replacement {
        Some((dtype, shape, bytes)) => tensors[index] = (tensors[index].0, dtype, shape, bytes),
        None => {
            tensors.remove(index);
        }
    }
    file(&tensors)
}

/// Reads layer `bn.` from `bytes` for this layer's configuration and loads it.
fn load_file(layer: &mut dyn Subject, bytes: Vec<u8>) -> Result<()> {
    let state = StateFile::from_bytes(bytes)?.layer("bn.", &layer.config())?;
    layer.load_state(&state)
}

// -------------------------------------------------------------------------------- the table

/// The layer of a row, with the state its failing call must leave alone.
struct Probe {
    layer: Box<dyn Subject>,
    before: LayerState,
}

impl Probe {
    /// The state now is the one the failing call must keep (after a row's successful setup,
    /// e.g. the forward before a failing backward).
    fn mark(&mut self) {
        self.before = self.layer.state();
    }
}

struct Row {
    name: &'static str,
    applies: Applies,
    config: BatchNormConfig,
    call: fn(&mut Probe) -> Result<()>,
    expect: fn(&Error) -> bool,
    expected: &'static str,
}

macro_rules! row {
    ($name:literal, $applies:expr, $config:expr, $call:expr, $pat:pat $(if $guard:expr)?) => {
        Row {
            name: $name,
            applies: $applies,
            config: $config,
            call: $call,
            expect: |e| matches!(e, $pat $(if $guard)?),
            expected: stringify!($pat $(if $guard)?),
        }
    };
}

fn bn(c: usize) -> BatchNormConfig {
    BatchNormConfig::new(c)
}

fn desc(dims: &[usize], layout: Layout) -> TensorDesc {
    TensorDesc::new(dims, layout).expect("a valid descriptor")
}

/// A training forward of (2, 3, 5) that succeeds, for rows whose failing call is a backward.
fn forward_ok(p: &mut Probe, x: &Acts) -> Cache {
    let d = desc(&[2, 3, 5], CF);
    p.layer.forward(&d, x).expect("setup forward").1
}

const CPU_ALLOCATES_Y: &str = "the CPU layer allocates y itself";
const CPU_ALLOCATES_DX: &str = "the CPU layer allocates dx itself";

fn rows() -> Vec<Row> {
    use Applies::*;
    vec![
        // Shapes the descriptor refuses: no layer call can be made with them.
        row!(
            "rank 1",
            Both,
            bn(3),
            |p| {
                p.layer.forward(&TensorDesc::new(&[6], CF)?, &acts(6))?;
                Ok(())
            },
            Error::Rank { got: 1 }
        ),
        row!(
            "rank 6",
            Both,
            bn(3),
            |p| {
                let d = TensorDesc::new(&[2, 3, 2, 2, 2, 2], CF)?;
                p.layer.forward(&d, &acts(96))?;
                Ok(())
            },
            Error::Rank { got: 6 }
        ),
        row!(
            "zero channels in the input",
            Both,
            bn(3),
            |p| {
                p.layer
                    .forward(&TensorDesc::new(&[4, 0, 5], CF)?, &acts(0))?;
                Ok(())
            },
            Error::ZeroChannels
        ),
        row!("element count overflows usize", Both, bn(3), |p| {
            p.layer.forward(&TensorDesc::new(&[usize::MAX, 3, 2], CF)?, &acts(6))?;
            Ok(())
        }, Error::TooLarge { dims } if dims == &[usize::MAX, 3, 2]),
        // Channel count of the input against the layer.
        row!(
            "channel mismatch, training",
            Both,
            bn(3),
            |p| {
                p.layer.forward(&desc(&[2, 4, 5], CF), &acts(40))?;
                Ok(())
            },
            Error::ChannelMismatch {
                expected: 3,
                got: 4
            }
        ),
        row!(
            "channel mismatch, eval, channels-last",
            Both,
            bn(3),
            |p| {
                p.layer.eval();
                p.layer.forward(&desc(&[2, 2, 5], CL), &acts(20))?;
                Ok(())
            },
            Error::ChannelMismatch {
                expected: 3,
                got: 2
            }
        ),
        // Buffers of the wrong length.
        row!(
            "x one element short",
            Both,
            bn(3),
            |p| {
                p.layer.forward(&desc(&[2, 3, 5], CF), &acts(29))?;
                Ok(())
            },
            Error::BufferLength {
                what: "x",
                needed: 30,
                got: 29
            }
        ),
        row!(
            "x one element long, eval",
            Both,
            bn(3),
            |p| {
                p.layer.eval();
                p.layer.forward(&desc(&[2, 3, 5], CL), &acts(31))?;
                Ok(())
            },
            Error::BufferLength {
                what: "x",
                needed: 30,
                got: 31
            }
        ),
        row!(
            "y one element short",
            GpuOnly(CPU_ALLOCATES_Y),
            bn(3),
            |p| {
                p.layer
                    .forward_sized(&desc(&[2, 3, 5], CF), &acts(30), Some(29))?;
                Ok(())
            },
            Error::BufferLength {
                what: "y",
                needed: 30,
                got: 29
            }
        ),
        row!(
            "dy one element short",
            Both,
            bn(3),
            |p| {
                let cache = forward_ok(p, &acts(30));
                p.mark();
                p.layer.backward(&cache, &acts(30), &grads(29))?;
                Ok(())
            },
            Error::BufferLength {
                what: "dy",
                needed: 30,
                got: 29
            }
        ),
        // The layers take dy's shape and layout from the forward (no descriptor of its own), so
        // a dy of another shape is one of another length; another layout with the same shape
        // cannot be expressed (validate::same_tensor has its unit tests).
        row!(
            "dy of another shape (2, 3, 6)",
            Both,
            bn(3),
            |p| {
                let cache = forward_ok(p, &acts(30));
                p.mark();
                p.layer.backward(&cache, &acts(30), &grads(36))?;
                Ok(())
            },
            Error::BufferLength {
                what: "dy",
                needed: 30,
                got: 36
            }
        ),
        row!(
            "x of the backward one element short",
            Both,
            bn(3),
            |p| {
                let cache = forward_ok(p, &acts(30));
                p.mark();
                p.layer.backward(&cache, &acts(29), &grads(30))?;
                Ok(())
            },
            Error::BufferLength {
                what: "x",
                needed: 30,
                got: 29
            }
        ),
        row!(
            "dx one element short",
            GpuOnly(CPU_ALLOCATES_DX),
            bn(3),
            |p| {
                let cache = forward_ok(p, &acts(30));
                p.mark();
                p.layer
                    .backward_sized(&cache, &acts(30), &grads(30), Some(29))?;
                Ok(())
            },
            Error::BufferLength {
                what: "dx",
                needed: 30,
                got: 29
            }
        ),
        row!(
            "backward in another dtype than its forward",
            GpuOnly(
                "the CPU layer is generic per call and its cache holds the f32 statistics \
                 themselves, not a dtype: an f16 backward of an f32 forward is a valid call \
                 there (the CPU check of dtypes is the state-file row `running_mean stored as I32`)"
            ),
            bn(3),
            |p| {
                let cache = forward_ok(p, &acts(30));
                p.mark();
                p.layer.backward(&cache, &acts(30).to_f16(), &grads(30).to_f16())?;
                Ok(())
            },
            Error::DTypeMismatch { what: "x", expected: DType::F32, got: DType::F16 }
        ),
        row!(
            "backward of a forward that is not the last",
            GpuOnly(
                "the GPU layer keeps the saved statistics of its last forward only; a CPU \
                 cache holds its own statistics, so an older cache is valid there"
            ),
            bn(3),
            |p| {
                let first = forward_ok(p, &acts(30));
                forward_ok(p, &acts(30));
                p.mark();
                p.layer.backward(&first, &acts(30), &grads(30))?;
                Ok(())
            },
            Error::MissingSavedStats { .. }
        ),
        // One value per channel (PyTorch: "Expected more than 1 value per channel when training").
        row!("one value per channel, (1, 3)", Both, bn(3), |p| {
            p.layer.forward(&desc(&[1, 3], CF), &acts(3))?;
            Ok(())
        }, Error::SingleValuePerChannel { dims } if dims == &[1, 3]),
        row!("one value per channel, (1, 3, 1, 1) channels-last", Both, bn(3), |p| {
            p.layer.forward(&desc(&[1, 3, 1, 1], CL), &acts(3))?;
            Ok(())
        }, Error::SingleValuePerChannel { dims } if dims == &[1, 3, 1, 1]),
        row!(
            "one value per channel, eval without running stats",
            Both,
            bn(3).track_running_stats(false),
            |p| {
                p.layer.eval();
                p.layer.forward(&desc(&[1, 3, 1], CF), &acts(3))?;
                Ok(())
            },
            Error::SingleValuePerChannel { dims } if dims == &[1, 3, 1]
        ),
        // Configurations no layer can be built with (there is no setter for eps or momentum).
        row!("eps negative", Both, bn(3), |p| p.layer.build(bn(3).eps(-1e-5)),
            Error::InvalidEps { eps } if *eps == -1e-5),
        row!("eps NaN", Both, bn(3), |p| p.layer.build(bn(3).eps(f32::NAN)),
            Error::InvalidEps { eps } if eps.is_nan()),
        row!("eps infinite", Both, bn(3), |p| p.layer.build(bn(3).eps(f32::INFINITY)),
            Error::InvalidEps { eps } if *eps == f32::INFINITY),
        row!("momentum negative", Both, bn(3), |p| p.layer.build(bn(3).momentum(Some(-0.1))),
            Error::InvalidMomentum { momentum } if *momentum == -0.1),
        row!("momentum above 1", Both, bn(3), |p| p.layer.build(bn(3).momentum(Some(1.5))),
            Error::InvalidMomentum { momentum } if *momentum == 1.5),
        row!("momentum NaN", Both, bn(3), |p| p.layer.build(bn(3).momentum(Some(f32::NAN))),
            Error::InvalidMomentum { momentum } if momentum.is_nan()),
        row!(
            "a layer of zero channels",
            Both,
            bn(3),
            |p| p.layer.build(bn(0)),
            Error::ZeroChannels
        ),
        // Running variance that is not a variance.
        row!("running_var negative in a state file", Both, bn(3), |p| {
            let bad = (Dtype::F32, vec![3], f32_bytes(&[0.5, -1.0, 2.0]));
            load_file(p.layer.as_mut(), state_file_with("bn.running_var", Some(bad)))
        }, Error::InvalidRunningVar { channel: 1, value } if *value == -1.0),
        row!("running_var NaN in a state file", Both, bn(3), |p| {
            let bad = (Dtype::F32, vec![3], f32_bytes(&[0.5, 1.0, f32::NAN]));
            load_file(p.layer.as_mut(), state_file_with("bn.running_var", Some(bad)))
        }, Error::InvalidRunningVar { channel: 2, value } if value.is_nan()),
        row!("running_var negative in a LayerState", Both, bn(3), |p| {
            let mut state = p.layer.state();
            state.running_var = Some(vec![1.0, 1.0, -0.5]);
            p.layer.load_state(&state)
        }, Error::InvalidRunningVar { channel: 2, value } if *value == -0.5),
        row!("running_var infinite through the setter", Both, bn(3), |p| {
            p.layer.set_running_var(&[1.0, f32::INFINITY, 1.0])
        }, Error::InvalidRunningVar { channel: 1, value } if *value == f32::INFINITY),
        // State files with missing or malformed keys.
        row!("state file without running_var", Both, bn(3), |p| {
            load_file(p.layer.as_mut(), state_file_with("bn.running_var", None))
        }, Error::StateKeyMissing { key } if key == "bn.running_var"),
        row!("state file with weight of shape [4]", Both, bn(3), |p| {
            let bad = (Dtype::F32, vec![4], f32_bytes(&[1.0; 4]));
            load_file(p.layer.as_mut(), state_file_with("bn.weight", Some(bad)))
        }, Error::StateKeyMalformed { key, .. } if key == "bn.weight"),
        row!("state file with running_mean stored as I32", Both, bn(3), |p| {
            let bad = (Dtype::I32, vec![3], [1i32, 2, 3].iter().flat_map(|v| v.to_le_bytes()).collect());
            load_file(p.layer.as_mut(), state_file_with("bn.running_mean", Some(bad)))
        }, Error::StateKeyMalformed { key, .. } if key == "bn.running_mean"),
        row!("state file with a negative counter", Both, bn(3), |p| {
            let bad = (Dtype::I64, vec![], (-2i64).to_le_bytes().to_vec());
            load_file(p.layer.as_mut(), state_file_with("bn.num_batches_tracked", Some(bad)))
        }, Error::StateKeyMalformed { key, .. } if key == "bn.num_batches_tracked"),
        row!("state file with weight for a layer without affine", Both, bn(3).affine(false), |p| {
            // A valid file of an affine layer (the counter replaced by itself).
            let counter = (Dtype::I64, vec![], 5i64.to_le_bytes().to_vec());
            load_file(p.layer.as_mut(), state_file_with("bn.num_batches_tracked", Some(counter)))
        }, Error::StateKeyMalformed { key, .. } if key == "bn.weight"),
        row!(
            "state file that is not safetensors",
            Both,
            bn(3),
            |p| {
                load_file(
                    p.layer.as_mut(),
                    b"\x10\0\0\0\0\0\0\0{\"bn.weight\":".to_vec(),
                )
            },
            Error::StateFile(_)
        ),
        row!("LayerState with a running_mean of 2 values", Both, bn(3), |p| {
            let mut state = p.layer.state();
            state.running_mean = Some(vec![0.0; 2]);
            p.layer.load_state(&state)
        }, Error::StateKeyMalformed { key, .. } if key == "running_mean"),
        row!("LayerState with a counter, layer without running stats", Both,
            bn(3).track_running_stats(false), |p| {
            let mut state = p.layer.state();
            state.num_batches_tracked = 3;
            p.layer.load_state(&state)
        }, Error::StateKeyMalformed { key, .. } if key == "num_batches_tracked"),
        // Setters.
        row!(
            "set_weight with 2 values",
            Both,
            bn(3),
            |p| p.layer.set_weight(&[1.0, 2.0]),
            Error::BufferLength {
                what: "weight",
                needed: 3,
                got: 2
            }
        ),
        row!(
            "set_weight without affine",
            Both,
            bn(3).affine(false),
            |p| { p.layer.set_weight(&[1.0, 2.0, 3.0]) },
            Error::NotAffine { what: "set_weight" }
        ),
        row!(
            "set_num_batches_tracked without running stats",
            Both,
            bn(3).track_running_stats(false),
            |p| p.layer.set_num_batches_tracked(4),
            Error::NoRunningStats {
                what: "set_num_batches_tracked"
            }
        ),
        // Folding.
        row!(
            "fold a training-mode layer",
            Both,
            bn(3),
            |p| {
                let spec = FoldSpec::new(FoldKind::Conv, &[3, 2, 1, 1], 1, CF)?;
                p.layer.fold(&spec, &[1.0; 6], None)?;
                Ok(())
            },
            Error::TrainingMode { what: "fold" }
        ),
        row!(
            "fold a layer without running stats",
            Both,
            bn(3).track_running_stats(false),
            |p| {
                p.layer.eval();
                let spec = FoldSpec::new(FoldKind::Conv, &[3, 2, 1, 1], 1, CF)?;
                p.layer.fold(&spec, &[1.0; 6], None)?;
                Ok(())
            },
            Error::NoRunningStats { what: "fold" }
        ),
        row!(
            "fold into a conv of 4 output channels",
            Both,
            bn(3),
            |p| {
                p.layer.eval();
                let spec = FoldSpec::new(FoldKind::Conv, &[4, 2, 1, 1], 1, CF)?;
                p.layer.fold(&spec, &[1.0; 8], None)?;
                Ok(())
            },
            Error::ChannelMismatch {
                expected: 3,
                got: 4
            }
        ),
    ]
}

/// After a refused call the layer still works: a training step (or an eval one) on (4, C).
fn still_usable(layer: &mut dyn Subject) -> std::result::Result<(), String> {
    let c = layer.config().num_features;
    let d = desc(&[4, c], CF);
    let x = acts(4 * c);
    let (y, cache) = layer
        .forward(&d, &x)
        .map_err(|e| format!("forward after the error: {e}"))?;
    layer
        .backward(&cache, &x, &grads(4 * c))
        .map_err(|e| format!("backward after the error: {e}"))?;
    match y {
        Acts::F32(y) if y.iter().all(|v| v.is_finite()) => Ok(()),
        other => Err(format!("non-finite output after the error: {other:?}")),
    }
}

/// Runs every row that applies to `path` on a fresh layer from `make`, prints each with its
/// message, and panics at the end listing every failure.
fn run_table(path: Path, make: &dyn Fn(BatchNormConfig) -> Box<dyn Subject>) {
    let rows = rows();
    assert!(
        rows.len() >= 20,
        "the issue asks for at least 20 bad inputs"
    );
    let (mut ran, mut failures) = (0, Vec::new());
    for row in &rows {
        if !row.applies.to(path) {
            if let Applies::GpuOnly(why) = row.applies {
                println!("skip {:<56} GPU only: {why}", row.name);
            }
            continue;
        }
        ran += 1;
        let mut layer = make(row.config);
        assert_eq!(layer.path(), path);
        layer
            .load_state(&distinctive_state(&row.config))
            .expect("the distinctive state loads");
        let before = layer.state();
        let mut probe = Probe { layer, before };
        let outcome = (row.call)(&mut probe);
        let mut fail = |what: String| failures.push(format!("{path:?} `{}`: {what}", row.name));
        match &outcome {
            Ok(()) => fail(format!("succeeded, expected {}", row.expected)),
            Err(e) if !(row.expect)(e) => {
                fail(format!("got {e:?} ({e}), expected {}", row.expected))
            }
            Err(e) => println!("ok   {:<56} {e}", row.name),
        }
        if let Some(change) = state_change(&probe.before, &probe.layer.state()) {
            fail(format!("the refused call changed the state: {change}"));
        }
        if let Err(e) = still_usable(probe.layer.as_mut()) {
            fail(e);
        }
    }
    println!(
        "{path:?}: {ran} of {} rows ran, {} failures",
        rows.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The table's state check is not vacuous: a successful training forward changes the running
/// statistics and the counter, and the check names exactly those.
#[test]
fn the_state_check_sees_a_successful_forward() {
    let mut probe = Probe {
        layer: Cpu::boxed(bn(3)),
        before: LayerState::default(),
    };
    probe.layer.load_state(&distinctive_state(&bn(3))).unwrap();
    probe.mark();
    forward_ok(&mut probe, &acts(30));
    assert_eq!(
        state_change(&probe.before, &probe.layer.state()).as_deref(),
        Some(r#"changed: ["running_mean", "running_var", "num_batches_tracked"]"#)
    );
}

#[test]
fn cpu_bad_inputs_give_typed_errors_and_leave_the_layer_unchanged() {
    run_table(Path::Cpu, &Cpu::boxed);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_bad_inputs_give_typed_errors_and_leave_the_layer_unchanged() {
    let gpu = common::gpu::gpu();
    run_table(Path::Gpu, &|config| Gpu::boxed(&gpu, config));
}

// ------------------------------------------------------------------ inputs that are not errors

/// Empty batches (N = 0, or a spatial size of 0) in every rank and layout, in f32 and f16:
/// success, an empty output, statistics bitwise unchanged, the counter incremented by a
/// training forward (PyTorch's semantics) and not by an eval one, zero parameter gradients.
fn check_empty_batches(make: &dyn Fn(BatchNormConfig) -> Box<dyn Subject>) {
    let shapes: [(&[usize], Layout); 6] = [
        (&[0, 3], CF),
        (&[0, 3, 4, 4], CF),
        (&[0, 3, 4, 4], CL),
        (&[2, 3, 0], CF),
        (&[2, 3, 0, 5], CL),
        (&[2, 3, 4, 0, 2], CF),
    ];
    for config in [
        bn(3),
        bn(3).momentum(None),
        bn(3).track_running_stats(false),
    ] {
        for (dims, layout) in shapes {
            for half in [false, true] {
                let d = desc(dims, layout);
                let label = format!("{d} half={half} {config:?}");
                let mut layer = make(config);
                let start = distinctive_state(&config);
                layer.load_state(&start).unwrap();
                let x = if half { acts(0).to_f16() } else { acts(0) };

                let (y, cache) = layer
                    .forward(&d, &x)
                    .unwrap_or_else(|e| panic!("{label}: training forward: {e}"));
                assert_eq!(y.len(), 0, "{label}");
                let after = layer.state();
                let step = u64::from(config.track_running_stats);
                assert_eq!(
                    after.num_batches_tracked,
                    start.num_batches_tracked + step,
                    "{label}: a training forward counts an empty batch"
                );
                let same = LayerState {
                    num_batches_tracked: start.num_batches_tracked,
                    ..after
                };
                assert_eq!(state_change(&start, &same), None, "{label}");

                let g = layer
                    .backward(&cache, &x, &x)
                    .unwrap_or_else(|e| panic!("{label}: backward: {e}"));
                assert_eq!(g.dx.len(), 0, "{label}");
                for grad in [&g.dweight, &g.dbias] {
                    let grad = grad.as_ref().expect("affine layer");
                    assert_eq!(grad, &vec![0.0; 3], "{label}: sums over nothing");
                }

                layer.eval();
                let (y, _) = layer
                    .forward(&d, &x)
                    .unwrap_or_else(|e| panic!("{label}: eval forward: {e}"));
                assert_eq!(y.len(), 0, "{label}");
                let after_eval = layer.state();
                assert_eq!(
                    after_eval.num_batches_tracked,
                    start.num_batches_tracked + step,
                    "{label}: eval does not count"
                );
                assert_eq!(
                    state_change(
                        &start,
                        &LayerState {
                            num_batches_tracked: start.num_batches_tracked,
                            ..after_eval
                        }
                    ),
                    None,
                    "{label}"
                );
            }
        }
    }
    println!("empty batches: 3 configurations x 6 shapes x 2 dtypes passed");
}

#[test]
fn cpu_empty_batch_is_not_an_error() {
    check_empty_batches(&Cpu::boxed);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_empty_batch_is_not_an_error() {
    let gpu = common::gpu::gpu();
    check_empty_batches(&|config| Gpu::boxed(&gpu, config));
}

/// A counter at `u64::MAX` with the cumulative average: the next training forward saturates
/// it (factor `1 / u64::MAX`, not `1 / 0` after a wrap) and succeeds. By hand: the factor is
/// ~5.4e-20, and `(1 - f) * r + f * batch` rounds back to `r` in f32 for every `|r| >= 1e-3`
/// (the batch statistics here are below 10), so the running statistics keep their bits.
fn check_saturated_counter(make: &dyn Fn(BatchNormConfig) -> Box<dyn Subject>) {
    let config = bn(3).momentum(None);
    let mut layer = make(config);
    let start = LayerState {
        weight: Some(vec![0.5, 1.0, 2.0]),
        bias: Some(vec![0.25, -0.5, 0.0]),
        running_mean: Some(vec![0.5, -1.0, 2.0]),
        running_var: Some(vec![0.75, 1.25, 3.0]),
        num_batches_tracked: u64::MAX,
    };
    layer.load_state(&start).unwrap();
    let d = desc(&[4, 3, 5], CF);
    layer
        .forward(&d, &acts(60))
        .unwrap_or_else(|e| panic!("forward at the counter's maximum: {e}"));
    let after = layer.state();
    assert_eq!(after.num_batches_tracked, u64::MAX, "the counter saturates");
    assert_eq!(state_change(&start, &after), None);
}

#[test]
fn cpu_counter_at_its_maximum_saturates() {
    check_saturated_counter(&Cpu::boxed);
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_counter_at_its_maximum_saturates() {
    let gpu = common::gpu::gpu();
    check_saturated_counter(&|config| Gpu::boxed(&gpu, config));
}

/// Forward and backward of the GPU layer with `x`, `y`, `dy` and `dx` views that start one
/// element after a 16-byte aligned allocation, against the CPU reference on the same values.
fn offset_views<T: Element>(gpu: &GpuContext, d: &TensorDesc, offset: usize) -> [f64; 5] {
    use common::gpu::{random, random_f32, ratio};
    use common::{tolerance, widen, widen_f32, Quantity};
    let (n, c) = (d.numel(), d.channels());
    let x: Vec<T> = random(11, n, 0.5, 2.0);
    let dy: Vec<T> = random(12, n, 0.0, 1.0);
    let state = LayerState {
        weight: Some(random_f32(13, c, 0.5, 1.5)),
        bias: Some(random_f32(14, c, -0.5, 0.5)),
        running_mean: Some(random_f32(15, c, -0.2, 0.2)),
        running_var: Some(random_f32(16, c, 0.5, 2.0)),
        num_batches_tracked: 2,
    };

    let mut cpu = reference::BatchNorm::new(bn(c)).unwrap();
    cpu.load_state(&state).unwrap();
    let (y_ref, cache_ref) = cpu.forward(&x, d).unwrap();
    let g_ref = cpu.backward(&cache_ref, &x, &dy).unwrap();

    let mut layer = gpu::BatchNorm::new(gpu, bn(c)).unwrap();
    layer.load_state(&state).unwrap();
    let xd = DevBuf::upload(gpu, &x, offset);
    let dyd = DevBuf::upload(gpu, &dy, offset);
    let mut yd = DevBuf::<T>::zeros(gpu, n, offset);
    let mut dxd = DevBuf::<T>::zeros(gpu, n, offset);
    let cache = layer
        .forward(d, &xd.view(), &mut yd.view_mut())
        .unwrap_or_else(|e| panic!("{d} offset {offset}: forward: {e}"));
    layer
        .backward(&cache, &xd.view(), &dyd.view(), Some(dxd.view_mut()))
        .unwrap_or_else(|e| panic!("{d} offset {offset}: backward: {e}"));
    let got = layer.state().unwrap();
    let want = cpu.state();
    let act = tolerance(T::DTYPE, Quantity::Activation);
    let stat = tolerance(T::DTYPE, Quantity::Statistic);
    let param = tolerance(T::DTYPE, Quantity::ParamGrad);
    let stats = |s: &LayerState| {
        let mut all = s.running_mean.clone().unwrap();
        all.extend(s.running_var.as_ref().unwrap());
        widen_f32(&all)
    };
    [
        ratio(&widen(&yd.download(gpu)), &widen(&y_ref), act),
        ratio(&widen(&dxd.download(gpu)), &widen(&g_ref.dx), act),
        ratio(&stats(&got), &stats(&want), stat),
        ratio(
            &widen_f32(&layer.grad_weight().unwrap().unwrap()),
            &widen_f32(g_ref.dweight.as_ref().unwrap()),
            param,
        ),
        ratio(
            &widen_f32(&layer.grad_bias().unwrap().unwrap()),
            &widen_f32(g_ref.dbias.as_ref().unwrap()),
            param,
        ),
    ]
}

#[test]
#[ignore = "needs a CUDA device"]
fn gpu_views_offset_by_one_element_fall_back_and_stay_right() {
    let gpu = common::gpu::gpu();
    // Shapes whose aligned views take the 16-byte vector path (inner or C a multiple of the
    // vector width), so the offset view must take the scalar one.
    let shapes = [
        desc(&[2, 3, 8, 8], CF),
        desc(&[4, 16, 4, 4], CL),
        desc(&[64, 32], CF),
        desc(&[3, 8, 40], CF),
    ];
    let mut failures = Vec::new();
    for d in &shapes {
        for offset in [0, 1] {
            let worst = [
                ("f32", offset_views::<f32>(&gpu, d, offset)),
                ("f16", offset_views::<f16>(&gpu, d, offset)),
                ("bf16", offset_views::<half::bf16>(&gpu, d, offset)),
            ];
            for (dtype, ratios) in worst {
                println!(
                    "{d} {dtype} offset {offset}: y, dx, running, dweight, dbias {ratios:.2?}"
                );
                if ratios.iter().any(|r| r.is_nan() || *r > 1.0) {
                    failures.push(format!("{d} {dtype} offset {offset}: {ratios:?}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "outside tolerance:\n{}",
        failures.join("\n")
    );
}

// -------------------------------------------------------------------------------- the context

/// A context for a device that does not exist is a typed error, never a panic: here (no driver,
/// or a build without nvcc) and on a GPU machine (no device `usize::MAX`).
#[test]
fn a_context_without_driver_or_device_is_a_typed_error() {
    match GpuContext::new(usize::MAX) {
        Ok(_) => panic!("a context for device usize::MAX"),
        Err(e @ (Error::NoDriver | Error::KernelsNotBuilt)) => println!("usize::MAX: {e}"),
        Err(e @ Error::NoDevice { ordinal, .. }) => {
            assert_eq!(ordinal, usize::MAX);
            println!("usize::MAX: {e}");
        }
        Err(other) => panic!("expected NoDriver, NoDevice or KernelsNotBuilt, got {other:?}"),
    }
    // Device 0: a context where there is a GPU, the same typed errors where there is none.
    match GpuContext::new(0) {
        Ok(gpu) => println!("device 0: {}", gpu.device_name().unwrap_or_default()),
        Err(e @ (Error::NoDriver | Error::KernelsNotBuilt | Error::NoDevice { .. })) => {
            println!("device 0: {e}")
        }
        Err(other) => panic!("expected NoDriver, NoDevice or KernelsNotBuilt, got {other:?}"),
    }
}
