//! [`BatchNorm`]: PyTorch's `nn.BatchNorm1d/2d/3d` as a candle module.

use super::layout::{to_logical, Placement};
use super::ops::{commit_running, ForwardOp, ForwardOutputs, RunningInputs, Statistics};
use crate::config::BatchNormConfig;
use crate::epilogue::EpilogueKind;
use candle_core::{DType, Error, Result, Tensor, Var};
use candle_nn::{Init, ModuleT, VarBuilder};
use std::sync::{Arc, Mutex};

/// Which PyTorch module a [`BatchNorm`] stands for: the ranks its input may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dims {
    /// `BatchNorm1d`: `(N, C)` or `(N, C, L)`.
    One,
    /// `BatchNorm2d`: `(N, C, H, W)`.
    Two,
    /// `BatchNorm3d`: `(N, C, D, H, W)`.
    Three,
}

impl Dims {
    fn accepts(self, rank: usize) -> bool {
        match self {
            Dims::One => rank == 2 || rank == 3,
            Dims::Two => rank == 4,
            Dims::Three => rank == 5,
        }
    }

    fn expected(self) -> &'static str {
        match self {
            Dims::One => "2D or 3D",
            Dims::Two => "4D",
            Dims::Three => "5D",
        }
    }
}

/// The running statistics and their counter, as candle `Var`s.
#[derive(Clone, Debug)]
struct Running {
    mean: Var,
    var: Var,
    num_batches_tracked: Var,
}

/// Batch normalization with PyTorch's semantics for candle tensors: `forward_t(x, train)` is
/// `nn.BatchNorm{1,2,3}d` in `train()` or `eval()` mode, with the gradients of `x`, `weight` and
/// `bias` through candle's autograd.
///
/// - **Training** (`train = true`): normalizes with the batch statistics and, when tracking,
///   updates `running_mean`, `running_var` (unbiased variance) and `num_batches_tracked` in their
///   `Var`s; `momentum = None` is the cumulative average.
/// - **Eval** (`train = false`): the running statistics, or the batch's when the layer does not
///   track them; the backward treats running statistics as constants.
/// - **Tensors**: `x` f32, f16 or bf16, contiguous `(N, C, ...)` or channels-last (a permuted
///   contiguous `(N, ..., C)`, e.g. `nhwc.permute((0, 3, 1, 2))`); the output has the layout of
///   `x`. Parameters, statistics and `eps` are f32 whatever the activation dtype. Other strides
///   are a candle error that names them.
/// - **Fused epilogues**: [`BatchNorm::forward_relu_t`] and [`BatchNorm::forward_add_relu_t`]
///   give `relu(BN(x))` and `relu(BN(x) + z)` in the same pass, with their gradients.
/// - **Devices**: CPU tensors run on the CPU reference ([`crate::reference`], f64 accumulation);
///   CUDA tensors on this crate's kernels on candle's stream (feature `candle-cuda`).
/// - **State**: created or loaded through a [`VarBuilder`] under PyTorch's `state_dict` names,
///   `weight`, `bias`, `running_mean`, `running_var` (f32, `[C]`) and `num_batches_tracked` (i64,
///   shape `[]`, as PyTorch saves it): a `VarMap` builds trainable `Var`s and `VarMap::save`
///   writes a file `torch.nn.Module.load_state_dict` takes; `VarBuilder::from_mmaped_safetensors`
///   loads a PyTorch checkpoint. Half-precision parameters in a checkpoint are widened to f32.
///
/// Errors are candle errors; those of this crate (a channel count that does not match, one value
/// per channel in training...) are wrapped [`crate::Error`]s. A failed call leaves the running
/// statistics and the counter as they were.
///
/// ```
/// use batchnorm_cuda::candle::{BatchNorm, Dims};
/// use batchnorm_cuda::BatchNormConfig;
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{ModuleT, VarBuilder, VarMap};
///
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let bn = BatchNorm::new(Dims::Two, BatchNormConfig::new(3), vb.pp("bn1"))?;
/// let x = Tensor::randn(0f32, 1.0, (4, 3, 5, 5), &Device::Cpu)?;
/// let y = bn.forward_t(&x, true)?;
/// let grads = y.sqr()?.sum_all()?.backward()?;
/// assert!(grads.get(bn.weight().unwrap()).is_some());
/// assert_eq!(bn.num_batches_tracked()?, Some(1));
/// assert!(varmap.data().lock().unwrap().contains_key("bn1.running_var"));
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct BatchNorm {
    dims: Dims,
    config: BatchNormConfig,
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    running: Option<Running>,
}

impl BatchNorm {
    /// A batch norm of `config` whose parameters and statistics `vb` creates (a `VarMap`:
    /// weight 1, bias 0, running mean 0, running variance 1, counter 0) or loads (a checkpoint),
    /// under `weight`, `bias`, `running_mean`, `running_var` and `num_batches_tracked`. Only
    /// what the configuration has is asked for: no `weight`/`bias` without `affine`, no
    /// statistics without `track_running_stats`.
    ///
    /// Errors: an invalid configuration (wrapped [`crate::Error`]), or `vb`'s error for a
    /// missing tensor or one of another shape.
    pub fn new(dims: Dims, config: BatchNormConfig, vb: VarBuilder) -> Result<Self> {
        config.validate().map_err(Error::wrap)?;
        let c = config.num_features;
        let f32_param = |name, init| vb.get_with_hints_dtype(c, name, init, DType::F32);
        let (weight, bias) = match config.affine {
            true => (
                Some(f32_param("weight", Init::Const(1.0))?),
                Some(f32_param("bias", Init::Const(0.0))?),
            ),
            false => (None, None),
        };
        let running = match config.track_running_stats {
            true => Some(Running {
                mean: Var::from_tensor(&f32_param("running_mean", Init::Const(0.0))?)?,
                var: Var::from_tensor(&f32_param("running_var", Init::Const(1.0))?)?,
                num_batches_tracked: Var::from_tensor(&vb.get_with_hints_dtype(
                    (),
                    "num_batches_tracked",
                    Init::Const(0.0),
                    DType::I64,
                )?)?,
            }),
            false => None,
        };
        Ok(Self {
            dims,
            config,
            weight,
            bias,
            running,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BatchNormConfig {
        &self.config
    }

    /// `weight`, `[C]` f32 (a `Var`'s tensor when built from a `VarMap`); `None` without
    /// `affine`.
    pub fn weight(&self) -> Option<&Tensor> {
        self.weight.as_ref()
    }

    /// `bias`, `[C]` f32; `None` without `affine`.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `running_mean`, `[C]` f32; `None` without `track_running_stats`.
    pub fn running_mean(&self) -> Option<&Var> {
        self.running.as_ref().map(|r| &r.mean)
    }

    /// `running_var`, `[C]` f32; `None` without `track_running_stats`.
    pub fn running_var(&self) -> Option<&Var> {
        self.running.as_ref().map(|r| &r.var)
    }

    /// The counter of training forwards (read from its `Var`); `None` without
    /// `track_running_stats`.
    pub fn num_batches_tracked(&self) -> Result<Option<u64>> {
        self.running.as_ref().map(counter).transpose()
    }

    /// The statistics a forward in mode `train` normalizes with, and the running update it makes.
    fn statistics(&self, train: bool) -> Result<Statistics> {
        let Some(running) = &self.running else {
            return Ok(Statistics::Batch { running: None });
        };
        if !train {
            return Ok(Statistics::Running {
                mean: running.mean.as_tensor().clone(),
                var: running.var.as_tensor().clone(),
            });
        }
        // The counter is read only for the cumulative average: on a GPU a read synchronizes.
        let factor = match self.config.momentum {
            Some(momentum) => momentum,
            None => self.config.average_factor(counter(running)? + 1),
        };
        Ok(Statistics::Batch {
            running: Some(RunningInputs {
                mean: running.mean.as_tensor().clone(),
                var: running.var.as_tensor().clone(),
                factor,
                var_update: self.config.running_var_update,
            }),
        })
    }

    /// Sets the running statistics a training forward computed and counts the batch.
    fn commit(&self, outputs: &Mutex<ForwardOutputs>, like: &Tensor) -> Result<()> {
        let Some(running) = &self.running else {
            return Ok(());
        };
        if !commit_running(outputs, like, &running.mean, &running.var)? {
            return Ok(());
        }
        let counter = running.num_batches_tracked.as_tensor();
        let next = (counter + Tensor::ones((), DType::I64, counter.device())?)?.detach();
        running.num_batches_tracked.set(&next)
    }
}

/// The value of a `num_batches_tracked` `Var`, which must be a non-negative integer.
fn counter(running: &Running) -> Result<u64> {
    let value = running
        .num_batches_tracked
        .as_tensor()
        .to_dtype(DType::I64)?;
    let value = value.to_scalar::<i64>()?;
    u64::try_from(value).map_err(|_| {
        Error::Msg(format!(
            "batchnorm-cuda: num_batches_tracked is {value}, not a count"
        ))
        .bt()
    })
}

impl BatchNorm {
    /// `relu(BN(x))` in one pass, its backward from a 1-bit ReLU mask instead of `y`
    /// ([`crate::epilogue`]); otherwise as [`ModuleT::forward_t`].
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_with(x, Some((EpilogueKind::Relu, x)), train)
    }

    /// The ResNet block's `relu(BN(x) + z)` in one pass, with the gradient of `z` too; `z` has
    /// the shape and layout of `x`. `BN(x) + z` is rounded once (within one rounding of the
    /// unfused ops in half precision).
    pub fn forward_add_relu_t(&self, x: &Tensor, z: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_with(x, Some((EpilogueKind::AddRelu, z)), train)
    }

    /// The forward with an optional fused epilogue and its shortcut.
    fn forward_with(
        &self,
        x: &Tensor,
        epilogue: Option<(EpilogueKind, &Tensor)>,
        train: bool,
    ) -> Result<Tensor> {
        if !self.dims.accepts(x.rank()) {
            return Err(Error::Msg(format!(
                "batchnorm-cuda: expected {} input (got {}D input)",
                self.dims.expected(),
                x.rank()
            ))
            .bt());
        }
        let desc = Placement::of(x.layout())?.desc;
        if desc.channels() != self.config.num_features {
            return Err(Error::wrap(crate::Error::ChannelMismatch {
                expected: self.config.num_features,
                got: desc.channels(),
            }));
        }
        let outputs = Arc::new(Mutex::new(ForwardOutputs::default()));
        let op = ForwardOp {
            eps: self.config.eps,
            affine: self.config.affine,
            epilogue: epilogue.map(|(kind, _)| kind),
            stats: self.statistics(train)?,
            outputs: outputs.clone(),
        };
        // The op reads the parameters stacked to [2, C] (`stack` carries their gradients back)
        // and `z`; without them, `x` stands in, unread.
        let params = match (&self.weight, &self.bias) {
            (Some(weight), Some(bias)) => Tensor::stack(&[weight, bias], 0)?,
            _ => x.clone(),
        };
        let z = epilogue.map_or(x, |(_, z)| z);
        let y = x.apply_op3(&params, z, op)?;
        if train {
            self.commit(&outputs, x)?;
        }
        to_logical(y, &desc)
    }
}

impl ModuleT for BatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_with(x, None, train)
    }
}
