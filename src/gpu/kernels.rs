//! The table of loaded kernels: every family, for every dtype and index width, loaded once per
//! context. Names are `&'static str` built by one macro from the same list the CUDA side
//! instantiates, so a missing instantiation fails when the context is created, not at a launch.

use super::ptx::MODULES;
use crate::dtype::DType;
use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;
use std::sync::Arc;

/// Element offsets fit in 32 bits (faster) or need 64.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IndexWidth {
    I32,
    I64,
}

impl IndexWidth {
    /// 32-bit offsets while every element offset (and a vector's end) stays below 2^31.
    pub(crate) fn for_numel(numel: usize) -> Self {
        if numel < (1usize << 31) {
            IndexWidth::I32
        } else {
            IndexWidth::I64
        }
    }
}

macro_rules! kernel_families {
    ($($family:ident => $base:literal),* $(,)?) => {
        /// A kernel family: one entry point per dtype and index width.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub(crate) enum Family { $($family),* }

        impl Family {
            pub(crate) const ALL: &'static [Family] = &[$(Family::$family),*];

            /// Entry-point names indexed by `[dtype][index width]`.
            const fn names(self) -> &'static [[&'static str; 2]; 3] {
                match self {
                    $(Family::$family => &[
                        [concat!($base, "_f32_i32"), concat!($base, "_f32_i64")],
                        [concat!($base, "_f16_i32"), concat!($base, "_f16_i64")],
                        [concat!($base, "_bf16_i32"), concat!($base, "_bf16_i64")],
                    ]),*
                }
            }
        }
    };
}

kernel_families! {
    StatsPlanar => "bn_stats_planar",
    StatsRows => "bn_stats_rows",
    NormalizePlanar => "bn_normalize_planar",
    NormalizeRows => "bn_normalize_rows",
    BackwardReducePlanar => "bn_backward_reduce_planar",
    BackwardReduceRows => "bn_backward_reduce_rows",
    BackwardDxPlanar => "bn_backward_dx_planar",
    BackwardDxRows => "bn_backward_dx_rows",
    // Fused ReLU epilogues (kernels/epilogue.cuh): forward writes the mask, backward reads it.
    NormalizeReluPlanar => "bn_normalize_relu_planar",
    NormalizeReluRows => "bn_normalize_relu_rows",
    NormalizeAddReluPlanar => "bn_normalize_add_relu_planar",
    NormalizeAddReluRows => "bn_normalize_add_relu_rows",
    BackwardReduceReluPlanar => "bn_backward_reduce_relu_planar",
    BackwardReduceReluRows => "bn_backward_reduce_relu_rows",
    BackwardDxReluPlanar => "bn_backward_dx_relu_planar",
    BackwardDxReluRows => "bn_backward_dx_relu_rows",
    BackwardDxAddReluPlanar => "bn_backward_dx_add_relu_planar",
    BackwardDxAddReluRows => "bn_backward_dx_add_relu_rows",
    SyncMomentsPlanar => "bn_sync_moments_planar",
    SyncMomentsRows => "bn_sync_moments_rows",
}

/// The fold kernels are not split by index width: weights are small and always use 64 bits.
const FOLD_NAMES: [&str; 3] = ["bn_fold_f32", "bn_fold_f16", "bn_fold_bf16"];

/// The direct convolution of `gpu::conv` (a test tool): one entry point per dtype, 64-bit offsets.
const CONV_NAMES: [&str; 3] = ["conv_direct_f32", "conv_direct_f16", "conv_direct_bf16"];

/// Kernels over per-channel f32 scalars only: one entry point each, no dtype, no index width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scalar {
    /// `bn_sync_merge`: the fixed-order merge of every rank's moments.
    SyncMerge,
    /// `bn_sync_coefficients`: dx coefficients from the all-reduced backward sums.
    SyncCoefficients,
}

const SCALAR_NAMES: [&str; 2] = ["bn_sync_merge", "bn_sync_coefficients"];

const fn dtype_index(dtype: DType) -> usize {
    match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

/// Every kernel of the crate, loaded into one context.
#[derive(Debug)]
pub(crate) struct Kernels {
    families: Vec<[[CudaFunction; 2]; 3]>,
    fold: [CudaFunction; 3],
    conv: [CudaFunction; 3],
    scalar: [CudaFunction; 2],
}

impl Kernels {
    /// Loads every PTX module and looks up every entry point the crate launches.
    pub(crate) fn load(ctx: &Arc<CudaContext>) -> Result<Self> {
        let modules = MODULES
            .iter()
            .map(|m| Ok((m, ctx.load_module(Ptx::from_src(m.ptx))?)))
            .collect::<Result<Vec<_>>>()?;
        let function = |name: &'static str| -> Result<CudaFunction> {
            let (_, module): &(_, Arc<CudaModule>) = modules
                .iter()
                .find(|(m, _)| m.entry_points.contains(&name))
                .ok_or(Error::MissingKernel { name })?;
            Ok(module.load_function(name)?)
        };
        let families = Family::ALL
            .iter()
            .map(|family| {
                let names = family.names();
                let load_dtype = |d: usize| -> Result<[CudaFunction; 2]> {
                    Ok([function(names[d][0])?, function(names[d][1])?])
                };
                Ok([load_dtype(0)?, load_dtype(1)?, load_dtype(2)?])
            })
            .collect::<Result<Vec<_>>>()?;
        let fold = [
            function(FOLD_NAMES[0])?,
            function(FOLD_NAMES[1])?,
            function(FOLD_NAMES[2])?,
        ];
        let conv = [
            function(CONV_NAMES[0])?,
            function(CONV_NAMES[1])?,
            function(CONV_NAMES[2])?,
        ];
        let scalar = [function(SCALAR_NAMES[0])?, function(SCALAR_NAMES[1])?];
        Ok(Self {
            families,
            fold,
            conv,
            scalar,
        })
    }

    pub(crate) fn get(&self, family: Family, dtype: DType, index: IndexWidth) -> &CudaFunction {
        let index = match index {
            IndexWidth::I32 => 0,
            IndexWidth::I64 => 1,
        };
        &self.families[family as usize][dtype_index(dtype)][index]
    }

    pub(crate) fn fold(&self, dtype: DType) -> &CudaFunction {
        &self.fold[dtype_index(dtype)]
    }

    pub(crate) fn conv(&self, dtype: DType) -> &CudaFunction {
        &self.conv[dtype_index(dtype)]
    }

    pub(crate) fn scalar(&self, kernel: Scalar) -> &CudaFunction {
        &self.scalar[kernel as usize]
    }

    /// Every entry-point name the crate launches, for the registry check.
    #[cfg(test)]
    fn all_names() -> impl Iterator<Item = &'static str> {
        Family::ALL
            .iter()
            .flat_map(|f| f.names().iter().flatten().copied())
            .chain(FOLD_NAMES)
            .chain(CONV_NAMES)
            .chain(SCALAR_NAMES)
            .chain(super::norms::ENTRY_POINTS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::ptx::KERNELS_BUILT;

    #[test]
    fn index_width_switches_at_2_pow_31() {
        assert_eq!(IndexWidth::for_numel((1 << 31) - 1), IndexWidth::I32);
        assert_eq!(IndexWidth::for_numel(1 << 31), IndexWidth::I64);
    }

    /// Every name the Rust side launches exists in the compiled PTX, and nothing compiled is
    /// left unused: catches a typo or a missing instantiation without a GPU.
    #[test]
    fn registry_matches_the_launched_names() {
        if !KERNELS_BUILT {
            eprintln!("nvcc was not found at build time: no PTX to check (GPU kernels NOT built)");
            return;
        }
        let compiled: Vec<&str> = MODULES
            .iter()
            .flat_map(|m| m.entry_points.iter().copied())
            .collect();
        let launched: Vec<&str> = Kernels::all_names().collect();
        for name in &launched {
            assert!(
                compiled.contains(name),
                "{name} is launched but not compiled"
            );
        }
        for name in &compiled {
            assert!(
                launched.contains(name),
                "{name} is compiled but never launched"
            );
        }
    }
}
