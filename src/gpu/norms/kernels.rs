//! The normalization kernels: their parameter structs (mirrors of `kernels/norm_*.cu`), one
//! typed handle per entry point (a kernel can only be launched with its own struct), the grids,
//! and the choice between one block per row and the split reduction.

use super::super::ptx::MODULES;
use super::super::GpuContext;
use crate::error::{Error, Result};
use cudarc::driver::{CudaFunction, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use std::marker::PhantomData;

/// Threads per block of every normalization kernel (`__launch_bounds__(256)`).
pub(crate) const BLOCK: u32 = 256;
/// CUDA's limit on `gridDim.x`.
pub(crate) const MAX_GRID_X: u32 = i32::MAX as u32;
/// Blocks per SM a launch aims for.
const BLOCKS_PER_SM: u64 = 8;
/// Rows up to this long always run one block per row (a block holds them in a few passes
/// through L1), however few they are.
const SHORT_ROW: usize = 8192;
/// Values each thread of a split block should get at least.
const MIN_VALUES_PER_THREAD: u64 = 16;
/// Most blocks one row is split over.
pub const MAX_SPLITS: u32 = 1024;

/// How a forward or backward covers the rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowPlan {
    /// One block per row, `blocks` blocks striding over the rows, one launch.
    PerRow {
        /// Blocks launched.
        blocks: u32,
    },
    /// Every row split over `splits` blocks: a partial reduction, then a pass that merges the
    /// partials in order and writes the outputs.
    Split {
        /// Blocks per row, at least 2.
        splits: u32,
    },
}

/// The plan for `rows` rows of `row_len` values on a GPU of `sm_count` SMs: one block per row
/// for short rows or when the rows alone fill the GPU, else as many splits as fill it (at most
/// [`MAX_SPLITS`], each with enough values for its threads).
pub fn row_plan(rows: usize, row_len: usize, sm_count: u32) -> RowPlan {
    let target = u64::from(sm_count) * BLOCKS_PER_SM;
    let (rows_u, len) = (rows as u64, row_len as u64);
    let useful = len / (u64::from(BLOCK) * MIN_VALUES_PER_THREAD);
    let splits = target
        .div_ceil(rows_u.max(1))
        .min(useful)
        .min(u64::from(MAX_SPLITS));
    if row_len <= SHORT_ROW || rows_u >= target || splits < 2 {
        RowPlan::PerRow {
            blocks: rows_u.min(u64::from(MAX_GRID_X)) as u32,
        }
    } else {
        RowPlan::Split {
            splits: splits as u32,
        }
    }
}

/// A launch shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Grid {
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
}

impl Grid {
    /// `blocks` 1-D blocks of 256.
    pub(crate) fn blocks(blocks: u32) -> Self {
        Self {
            grid: (blocks, 1, 1),
            block: (BLOCK, 1, 1),
        }
    }

    /// `(rows, splits)` blocks of 256.
    pub(crate) fn rows_by_splits(rows: u32, splits: u32) -> Self {
        Self {
            grid: (rows, splits, 1),
            block: (BLOCK, 1, 1),
        }
    }

    /// One thread per item.
    pub(crate) fn flat(items: u64) -> Self {
        Self::blocks(items.div_ceil(u64::from(BLOCK)) as u32)
    }
}

/// Most splits of a channel's values in `norm_param_grads` (its merge adds them one by one).
const MAX_PARAM_SPLITS: u64 = 256;
/// Values per block of `norm_param_grads` at least: 32 per thread row of a (32, 8) block over
/// columns, 8 per thread of a block over planes.
const PARAM_COLUMN_VALUES: u64 = 8 * 32;
const PARAM_PLANE_VALUES: u64 = 256 * 8;

/// How `norm_param_grads` covers each channel's `values` = N * S values: over planes (a block
/// per channel, channels-first with S > 1) or over columns (32 channels per block), each
/// channel's values cut into `splits` ranges so that the blocks fill the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ParamPlan {
    pub grid: Grid,
    /// Ranges per channel; more than one needs `norm_param_grads_merge` and `2 * C * splits`
    /// floats of partials.
    pub splits: u32,
}

impl ParamPlan {
    pub(crate) fn new(channels: u64, values: u64, planes: bool, sm_count: u32) -> Self {
        let target = u64::from(sm_count) * BLOCKS_PER_SM;
        let (tiles, per_block, block) = if planes {
            (channels, PARAM_PLANE_VALUES, (BLOCK, 1, 1))
        } else {
            (channels.div_ceil(32), PARAM_COLUMN_VALUES, (32, 8, 1))
        };
        let splits = target
            .div_ceil(tiles.max(1))
            .min(values.div_ceil(per_block))
            .clamp(1, MAX_PARAM_SPLITS);
        Self {
            grid: Grid {
                grid: (tiles as u32, splits as u32, 1),
                block,
            },
            splits: splits as u32,
        }
    }

    /// Floats of partials.
    pub(crate) fn scratch(&self, channels: usize) -> usize {
        if self.splits > 1 {
            2 * channels * self.splits as usize
        } else {
            0
        }
    }
}

/// `struct NormShape` of `kernels/norm_rows.cuh`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ShapeParams {
    pub batch: u64,
    pub channels: u64,
    pub groups: u64,
    pub spatial: u64,
    pub channels_last: i32,
    pub centered: i32,
}

/// `struct NormForwardParams` of `kernels/norm_forward.cu` (device pointers as u64, 0 = null).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ForwardParams {
    pub x: u64,
    pub residual: u64,
    pub sum: u64,
    pub y: u64,
    pub weight: u64,
    pub bias: u64,
    pub mean: u64,
    pub mean_lo: u64,
    pub rstd: u64,
    pub row_var: u64,
    pub partials: u64,
    pub shape: ShapeParams,
    pub eps: f32,
    pub epilogue: i32,
    pub splits: i32,
    pub stats_given: i32,
}

/// `struct NormRunningParams` of `kernels/norm_forward.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RunningParams {
    pub running_mean: u64,
    pub running_var: u64,
    pub mean: u64,
    pub mean_lo: u64,
    pub rstd: u64,
    pub row_var: u64,
    pub shape: ShapeParams,
    pub eps: f32,
    pub momentum: f32,
}

/// `struct NormBackwardParams` of `kernels/norm_backward.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct BackwardParams {
    pub x: u64,
    pub dy: u64,
    pub dx: u64,
    pub weight: u64,
    pub bias: u64,
    pub mean: u64,
    pub mean_lo: u64,
    pub rstd: u64,
    pub dweight: u64,
    pub dbias: u64,
    pub partials: u64,
    pub shape: ShapeParams,
    pub epilogue: i32,
    pub splits: i32,
    pub constant_stats: i32,
    pub accumulate: i32,
}

// SAFETY: plain-old-data structs of integers and floats with the C layout the kernels declare
// (sizes checked below); the pointers they carry are checked by the functional layer.
unsafe impl DeviceRepr for ForwardParams {}
unsafe impl DeviceRepr for RunningParams {}
unsafe impl DeviceRepr for BackwardParams {}

/// An entry point that takes exactly one `P`.
#[derive(Debug)]
pub(crate) struct Kernel<P> {
    function: CudaFunction,
    params: PhantomData<fn(P)>,
}

impl<P: DeviceRepr> Kernel<P> {
    /// Queues the kernel on `stream`.
    ///
    /// # Safety
    /// Every device pointer in `params` must be null where the kernel allows it, or point to a
    /// live allocation at least as large as the shape in `params` implies, kept alive and
    /// ordered until the kernel has run; `grid` must be the grid the kernel's comment asks for.
    pub(crate) unsafe fn launch(&self, stream: &CudaStream, grid: Grid, params: &P) -> Result<()> {
        let config = LaunchConfig {
            grid_dim: grid.grid,
            block_dim: grid.block,
            shared_mem_bytes: 0,
        };
        // SAFETY: the kernel's single parameter is `P` (its C mirror); the caller vouches for
        // the pointers and the grid.
        unsafe {
            stream
                .launch_builder(&self.function)
                .arg(params)
                .launch(config)
        }?;
        Ok(())
    }
}

/// Entry points instantiated per dtype (f32, f16, bf16).
pub(crate) type PerDtype<P> = [Kernel<P>; 3];

/// Every normalization kernel, loaded into one context.
#[derive(Debug)]
pub(crate) struct NormKernels {
    pub forward_row: PerDtype<ForwardParams>,
    pub stats_split: PerDtype<ForwardParams>,
    pub apply_split: PerDtype<ForwardParams>,
    pub running_rows: Kernel<RunningParams>,
    pub running_update: Kernel<RunningParams>,
    pub backward_row: PerDtype<BackwardParams>,
    pub backward_split: PerDtype<BackwardParams>,
    pub dx_split: PerDtype<BackwardParams>,
    pub param_grads: PerDtype<BackwardParams>,
    pub param_grads_merge: Kernel<BackwardParams>,
}

/// The modules that hold the normalization kernels.
const MODULE_NAMES: [&str; 2] = ["norm_forward", "norm_backward"];

/// Every entry point [`NormKernels`] loads, for the registry check.
pub(crate) const ENTRY_POINTS: [&str; 24] = [
    "norm_forward_row_f32",
    "norm_forward_row_f16",
    "norm_forward_row_bf16",
    "norm_stats_split_f32",
    "norm_stats_split_f16",
    "norm_stats_split_bf16",
    "norm_apply_split_f32",
    "norm_apply_split_f16",
    "norm_apply_split_bf16",
    "norm_running_rows",
    "norm_running_update",
    "norm_backward_row_f32",
    "norm_backward_row_f16",
    "norm_backward_row_bf16",
    "norm_backward_split_f32",
    "norm_backward_split_f16",
    "norm_backward_split_bf16",
    "norm_dx_split_f32",
    "norm_dx_split_f16",
    "norm_dx_split_bf16",
    "norm_param_grads_f32",
    "norm_param_grads_f16",
    "norm_param_grads_bf16",
    "norm_param_grads_merge",
];

impl NormKernels {
    pub(crate) fn load(gpu: &GpuContext) -> Result<Self> {
        let modules = MODULES
            .iter()
            .filter(|m| MODULE_NAMES.contains(&m.name))
            .map(|m| Ok((m, gpu.cuda().load_module(Ptx::from_src(m.ptx))?)))
            .collect::<Result<Vec<_>>>()?;
        let one = |name: &'static str| -> Result<CudaFunction> {
            let (_, module) = modules
                .iter()
                .find(|(m, _)| m.entry_points.contains(&name))
                .ok_or(Error::MissingKernel { name })?;
            Ok(module.load_function(name)?)
        };
        fn typed<P>(function: CudaFunction) -> Kernel<P> {
            Kernel {
                function,
                params: PhantomData,
            }
        }
        // The three dtypes of the family whose f32 entry is ENTRY_POINTS[base].
        fn family<P>(
            one: &dyn Fn(&'static str) -> Result<CudaFunction>,
            base: usize,
        ) -> Result<PerDtype<P>> {
            Ok([
                typed(one(ENTRY_POINTS[base])?),
                typed(one(ENTRY_POINTS[base + 1])?),
                typed(one(ENTRY_POINTS[base + 2])?),
            ])
        }
        Ok(Self {
            forward_row: family(&one, 0)?,
            stats_split: family(&one, 3)?,
            apply_split: family(&one, 6)?,
            running_rows: typed(one(ENTRY_POINTS[9])?),
            running_update: typed(one(ENTRY_POINTS[10])?),
            backward_row: family(&one, 11)?,
            backward_split: family(&one, 14)?,
            dx_split: family(&one, 17)?,
            param_grads: family(&one, 20)?,
            param_grads_merge: typed(one(ENTRY_POINTS[23])?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_structs_have_the_c_layout() {
        // 4 u64 + 2 i32; 11 pointers + shape + 4 x 4 bytes; 6 pointers + shape + 2 floats.
        assert_eq!(std::mem::size_of::<ShapeParams>(), 40);
        assert_eq!(std::mem::size_of::<ForwardParams>(), 88 + 40 + 16);
        assert_eq!(std::mem::size_of::<BackwardParams>(), 88 + 40 + 16);
        assert_eq!(std::mem::size_of::<RunningParams>(), 48 + 40 + 8);
    }

    #[test]
    fn param_plans_fill_the_gpu_with_enough_values_per_block() {
        const H100: u32 = 132;
        // LayerNorm backward on (8192, 4096): 128 column tiles, 9 ranges of ~911 rows.
        let plan = ParamPlan::new(4096, 8192, false, H100);
        assert_eq!(plan.splits, 9);
        assert_eq!(plan.grid.grid, (128, 9, 1));
        assert_eq!(plan.grid.block, (32, 8, 1));
        assert_eq!(plan.scratch(4096), 2 * 4096 * 9);
        // GroupNorm(32, 320) on 2 x 320 x 64 x 64, channels-first: a block per channel and
        // range of 2048 values.
        let plan = ParamPlan::new(320, 2 * 64 * 64, true, H100);
        assert_eq!(
            (plan.grid.grid, plan.grid.block),
            ((320, 4, 1), (BLOCK, 1, 1))
        );
        // Few values: one range, no merge, no scratch.
        let plan = ParamPlan::new(1000, 9, false, H100);
        assert_eq!((plan.splits, plan.scratch(1000)), (1, 0));
        for channels in [1u64, 3, 64, 4096, 100_000] {
            for values in [0u64, 1, 100, 5000, 1 << 20] {
                for planes in [false, true] {
                    let plan = ParamPlan::new(channels, values, planes, H100);
                    let per_block = if planes {
                        PARAM_PLANE_VALUES
                    } else {
                        PARAM_COLUMN_VALUES
                    };
                    assert!((1..=MAX_PARAM_SPLITS as u32).contains(&plan.splits));
                    assert!(plan.splits == 1 || values / u64::from(plan.splits) >= per_block / 2);
                }
            }
        }
    }

    #[test]
    fn plans_fill_the_gpu_and_keep_short_rows_whole() {
        const H100: u32 = 132;
        // Transformer rows: one block each.
        assert!(matches!(
            row_plan(8192, 4096, H100),
            RowPlan::PerRow { blocks: 8192 }
        ));
        // GroupNorm(32) on a 2 x 320 x 64 x 64 U-Net activation: 64 rows of 40960 values.
        let RowPlan::Split { splits } = row_plan(64, 40_960, H100) else {
            panic!("long rows should split")
        };
        assert!(64 * splits >= H100 && splits <= 10);
        // Rows that fill the GPU by themselves are not split.
        assert!(matches!(
            row_plan(4096, 1 << 20, H100),
            RowPlan::PerRow { .. }
        ));
        for rows in [1usize, 3, 64, 1000, 1 << 20] {
            for len in [0usize, 1, 300, 8193, 100_000, 1 << 23] {
                match row_plan(rows, len, H100) {
                    RowPlan::PerRow { blocks } => assert_eq!(blocks as usize, rows),
                    RowPlan::Split { splits } => {
                        assert!((2..=MAX_SPLITS).contains(&splits));
                        assert!(len as u64 / splits as u64 >= 256 * MIN_VALUES_PER_THREAD);
                    }
                }
            }
        }
    }
}
