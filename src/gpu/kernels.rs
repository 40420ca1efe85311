//! The table of loaded kernels: every family, for every dtype and index width, loaded once per
//! context. Names are `&'static str` built by one macro from the same list the CUDA side
//! instantiates, so a missing instantiation fails when the context is created, not at a launch.
//!
//! Each family is declared with the parameter struct its kernels take ([`Family<P>`],
//! [`PerDtype<P>`], [`Single<P>`]), and the only launch of the crate is [`Kernel::launch`] on a `Kernel<P>` that
//! only a typed family hands out: a kernel cannot be launched with another family's struct.

use super::launch::{Launch, Traversal, BLOCK_THREADS};
#[cfg(feature = "test-tools")]
use super::params::ConvDirectParams;
use super::params::{
    BackwardElementwiseParams, BackwardElementwiseReluParams, BackwardEvalParams,
    BackwardReduceParams, BackwardReduceReluParams, FoldParams, NormalizeParams,
    NormalizeReluParams, OnchipParams, StatsParams, SyncCoefficientsParams, SyncMergeParams,
    SyncMomentsParams,
};
use super::ptx::MODULES;
use crate::dtype::DType;
use crate::error::{Error, Result};
use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaModule, CudaStream, DeviceRepr, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use std::marker::PhantomData;
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

/// A family of kernels over activations: one entry point per traversal, dtype and index width,
/// every one taking a `P`.
pub(crate) struct Family<P> {
    index: usize,
    params: PhantomData<fn(P)>,
}

/// A kernel of one entry point per dtype, taking a `P`.
pub(crate) struct PerDtype<P> {
    index: usize,
    params: PhantomData<fn(P)>,
}

/// A kernel of one entry point (per-channel f32 scalars only), taking a `P`.
pub(crate) struct Single<P> {
    index: usize,
    params: PhantomData<fn(P)>,
}

// Not derived: a derive would ask `P: Copy`.
macro_rules! copy_handle {
    ($($handle:ident),*) => {$(
        impl<P> Clone for $handle<P> {
            fn clone(&self) -> Self {
                *self
            }
        }
        impl<P> Copy for $handle<P> {}
    )*};
}
copy_handle!(Family, PerDtype, Single);

macro_rules! kernel_table {
    (
        families { $($family:ident: $fparams:ty => $fbase:literal),* $(,)? }
        per_dtype { $($(#[$tattr:meta])* $typed:ident: $tparams:ty => $tbase:literal),* $(,)? }
        single { $($single:ident: $sparams:ty => $sname:literal),* $(,)? }
    ) => {
        kernel_table!(@consts Family 0usize; $($family: $fparams,)*);
        kernel_table!(@consts PerDtype 0usize; $($(#[$tattr])* $typed: $tparams,)*);
        kernel_table!(@consts Single 0usize; $($single: $sparams,)*);

        /// Entry-point names of the families, indexed by `[family][traversal][dtype][width]`.
        const FAMILY_NAMES: &[[[[&str; 2]; 3]; 2]] = &[$(kernel_table!(@family $fbase)),*];

        /// Entry-point names of the per-dtype kernels, indexed by `[kernel][dtype]`.
        const PER_DTYPE_NAMES: &[[&str; 3]] = &[$($(#[$tattr])* [
            concat!($tbase, "_f32"), concat!($tbase, "_f16"), concat!($tbase, "_bf16"),
        ]),*];

        /// Entry-point names of the single kernels (per-channel f32 scalars only).
        const SINGLE_NAMES: &[&str] = &[$($sname),*];
    };
    (@consts $kind:ident $index:expr; $(#[$attr:meta])* $name:ident: $params:ty, $($rest:tt)*) => {
        $(#[$attr])*
        pub(crate) const $name: $kind<$params> = $kind { index: $index, params: PhantomData };
        kernel_table!(@consts $kind $index + 1; $($rest)*);
    };
    (@consts $kind:ident $index:expr;) => {};
    (@family $base:literal) => {
        [
            kernel_table!(@dtypes concat!($base, "_planar")),
            kernel_table!(@dtypes concat!($base, "_rows")),
        ]
    };
    (@dtypes $base:expr) => {
        [
            [concat!($base, "_f32_i32"), concat!($base, "_f32_i64")],
            [concat!($base, "_f16_i32"), concat!($base, "_f16_i64")],
            [concat!($base, "_bf16_i32"), concat!($base, "_bf16_i64")],
        ]
    };
}

kernel_table! {
    families {
        STATS: StatsParams => "bn_stats",
        NORMALIZE: NormalizeParams => "bn_normalize",
        BACKWARD_REDUCE: BackwardReduceParams => "bn_backward_reduce",
        BACKWARD_DX: BackwardElementwiseParams => "bn_backward_dx",
        // Fused ReLU epilogues (kernels/epilogue.cuh): forward writes the mask, backward reads it.
        NORMALIZE_RELU: NormalizeReluParams => "bn_normalize_relu",
        NORMALIZE_ADD_RELU: NormalizeReluParams => "bn_normalize_add_relu",
        BACKWARD_REDUCE_RELU: BackwardReduceReluParams => "bn_backward_reduce_relu",
        BACKWARD_DX_RELU: BackwardElementwiseReluParams => "bn_backward_dx_relu",
        BACKWARD_DX_ADD_RELU: BackwardElementwiseReluParams => "bn_backward_dx_add_relu",
        // The eval backward in one pass (dx and the parameter sums from one read of x and dy).
        BACKWARD_EVAL: BackwardEvalParams => "bn_backward_eval",
        SYNC_MOMENTS: SyncMomentsParams => "bn_sync_moments",
    }
    // Weights are small: no index-width split, always 64-bit offsets.
    per_dtype {
        FOLD: FoldParams => "bn_fold",
        // The direct convolution of `conv::gpu` (a test tool, last: the indices before it do
        // not depend on the feature).
        #[cfg(feature = "test-tools")]
        CONV_DIRECT: ConvDirectParams => "conv_direct",
    }
    single {
        // The fixed-order merge of every rank's moments.
        SYNC_MERGE: SyncMergeParams => "bn_sync_merge",
        // dx coefficients from the all-reduced backward sums.
        SYNC_COEFFICIENTS: SyncCoefficientsParams => "bn_sync_coefficients",
    }
}

/// Entry-point names of the single-pass forward (`kernels/bn_onchip.cu`, rows traversal only),
/// indexed by `[dtype][width]`.
const ONCHIP_NAMES: [[&str; 2]; 3] = kernel_table!(@dtypes "bn_onchip_rows");

/// Static shared memory of `bn_onchip_rows_*` at most (ptxas: 12 KB f32, 20.5 KB f16/bf16;
/// `tests/ptxas_gate.rs` checks it): the dynamic shared memory a block may ask for is the
/// device's per-block opt-in limit less this.
pub(crate) const ONCHIP_STATIC_SHARED: usize = 24 * 1024;

const fn dtype_index(dtype: DType) -> usize {
    match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

/// One loaded entry point and the parameter struct it takes.
pub(crate) struct Kernel<'k, P> {
    function: &'k CudaFunction,
    params: PhantomData<fn(P)>,
}

/// An entry point of a family and its occupancy: blocks of [`BLOCK_THREADS`] threads one SM
/// holds at once, by the driver's count for its registers and shared memory (at least 1).
#[derive(Debug)]
struct Loaded {
    function: CudaFunction,
    blocks_per_sm: u32,
}

impl Loaded {
    fn new(function: CudaFunction) -> Result<Self> {
        let blocks_per_sm = function
            .occupancy_max_active_blocks_per_multiprocessor(BLOCK_THREADS, 0, None)?
            .max(1);
        Ok(Self {
            function,
            blocks_per_sm,
        })
    }
}

impl<P: DeviceRepr> Kernel<'_, P> {
    /// The one launch of the crate: `params` by value as the kernel's only argument.
    ///
    /// The caller validated every buffer length the pointers in `params` cover, took the
    /// pointers through [`super::ops::Guards`] (which keep the buffers alive and ordered until
    /// after the launch), and got `shape` from [`super::launch`].
    pub(crate) fn launch(&self, stream: &CudaStream, shape: Launch, params: &P) -> Result<()> {
        // SAFETY: `P` is the #[repr(C)] mirror of the struct this entry point takes (the family
        // tables above pair them; layouts checked in params.rs); the pointers it carries were
        // checked against the descriptor by the caller and are held by its guards; the launch
        // shape keeps the kernels' assumptions (256 threads, channel tiles covering C,
        // splits <= MAX_SPLITS).
        unsafe {
            stream
                .launch_builder(self.function)
                .arg(params)
                .launch(shape.config())
        }?;
        Ok(())
    }
}

/// The single-pass forward's entry point: launched cooperatively (every block resident at once)
/// with dynamic shared memory, which decides how many blocks an SM holds.
pub(crate) struct OnchipKernel<'k> {
    function: &'k CudaFunction,
    /// Dynamic shared memory a block may ask for (the attribute set at load).
    pub max_shared: usize,
}

impl OnchipKernel<'_> {
    /// Blocks one SM holds with `shared_bytes` of dynamic shared memory each (the driver's
    /// occupancy; 0 when that is more than an SM has).
    pub(crate) fn blocks_per_sm(&self, shared_bytes: usize) -> Result<u32> {
        Ok(self
            .function
            .occupancy_max_active_blocks_per_multiprocessor(BLOCK_THREADS, shared_bytes, None)?)
    }

    /// The cooperative launch (cuLaunchCooperativeKernel) with `shared_bytes` of dynamic shared
    /// memory. A grid the device cannot hold at once is the driver's
    /// `CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE`, returned before anything is queued.
    pub(crate) fn launch(
        &self,
        stream: &CudaStream,
        shape: Launch,
        shared_bytes: u32,
        params: &OnchipParams,
    ) -> Result<()> {
        let config = cudarc::driver::LaunchConfig {
            shared_mem_bytes: shared_bytes,
            ..shape.config()
        };
        // SAFETY: as `Kernel::launch`; besides, the grid is one the occupancy says is resident
        // (the kernel's grid barrier needs every block running) and shared_bytes covers every
        // thread's rows (launch::on_chip), within the attribute set at load.
        unsafe {
            stream
                .launch_builder(self.function)
                .arg(params)
                .launch_cooperative(config)
        }?;
        Ok(())
    }
}

/// Every kernel of the crate, loaded into one context.
#[derive(Debug)]
pub(crate) struct Kernels {
    families: Vec<[[[Loaded; 2]; 3]; 2]>,
    per_dtype: Vec<[CudaFunction; 3]>,
    single: Vec<CudaFunction>,
    onchip: [[CudaFunction; 2]; 3],
    onchip_max_shared: usize,
}

impl Kernels {
    /// Loads every PTX module and looks up every entry point the crate launches.
    pub(crate) fn load(ctx: &Arc<CudaContext>) -> Result<Self> {
        // Only the modules that hold a kernel of the tables: a test tool's module (compiled in
        // every build) stays out of a product context.
        let launched: Vec<&str> = Self::all_names().collect();
        let modules = MODULES
            .iter()
            .filter(|m| m.entry_points.iter().any(|e| launched.contains(e)))
            .map(|m| Ok((m, ctx.load_module(Ptx::from_src(m.ptx))?)))
            .collect::<Result<Vec<_>>>()?;
        let function = |name: &'static str| -> Result<CudaFunction> {
            let (_, module): &(_, Arc<CudaModule>) = modules
                .iter()
                .find(|(m, _)| m.entry_points.contains(&name))
                .ok_or(Error::MissingKernel { name })?;
            Ok(module.load_function(name)?)
        };
        let load_dtypes = |names: &[&'static str; 3]| -> Result<[CudaFunction; 3]> {
            Ok([
                function(names[0])?,
                function(names[1])?,
                function(names[2])?,
            ])
        };
        let families = FAMILY_NAMES
            .iter()
            .map(|traversals| {
                let load = |names: &[[&'static str; 2]; 3]| -> Result<[[Loaded; 2]; 3]> {
                    let loaded = |name| Loaded::new(function(name)?);
                    let width =
                        |d: usize| Ok::<_, Error>([loaded(names[d][0])?, loaded(names[d][1])?]);
                    Ok([width(0)?, width(1)?, width(2)?])
                };
                Ok([load(&traversals[0])?, load(&traversals[1])?])
            })
            .collect::<Result<Vec<_>>>()?;
        let per_dtype = PER_DTYPE_NAMES
            .iter()
            .map(load_dtypes)
            .collect::<Result<Vec<_>>>()?;
        let single = SINGLE_NAMES
            .iter()
            .map(|&name| function(name))
            .collect::<Result<Vec<_>>>()?;
        // The single pass may ask for the device's opt-in shared memory per block (past the
        // default 48 KB), less its static shared memory.
        let optin = ctx.attribute(
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )?;
        let onchip_max_shared = (optin.max(0) as usize).saturating_sub(ONCHIP_STATIC_SHARED);
        let onchip_width = |d: usize| -> Result<[CudaFunction; 2]> {
            let load = |name| -> Result<CudaFunction> {
                let f = function(name)?;
                f.set_attribute(
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    onchip_max_shared as i32,
                )?;
                Ok(f)
            };
            Ok([load(ONCHIP_NAMES[d][0])?, load(ONCHIP_NAMES[d][1])?])
        };
        let onchip = [onchip_width(0)?, onchip_width(1)?, onchip_width(2)?];
        Ok(Self {
            families,
            per_dtype,
            single,
            onchip,
            onchip_max_shared,
        })
    }

    /// The entry point of `family` for a traversal, dtype and index width.
    pub(crate) fn family<P>(
        &self,
        family: Family<P>,
        traversal: Traversal,
        dtype: DType,
        index: IndexWidth,
    ) -> Kernel<'_, P> {
        Kernel {
            function: &self.loaded(family, traversal, dtype, index).function,
            params: PhantomData,
        }
    }

    /// Blocks of that entry point one SM runs at once (the driver's occupancy, asked at load).
    pub(crate) fn blocks_per_sm<P>(
        &self,
        family: Family<P>,
        traversal: Traversal,
        dtype: DType,
        index: IndexWidth,
    ) -> u32 {
        self.loaded(family, traversal, dtype, index).blocks_per_sm
    }

    fn loaded<P>(
        &self,
        family: Family<P>,
        traversal: Traversal,
        dtype: DType,
        index: IndexWidth,
    ) -> &Loaded {
        let traversal = match traversal {
            Traversal::Planar => 0,
            Traversal::Rows => 1,
        };
        let index = match index {
            IndexWidth::I32 => 0,
            IndexWidth::I64 => 1,
        };
        &self.families[family.index][traversal][dtype_index(dtype)][index]
    }

    /// The entry point of a per-dtype kernel ([`FOLD`], [`CONV_DIRECT`]).
    pub(crate) fn per_dtype<P>(&self, kernel: PerDtype<P>, dtype: DType) -> Kernel<'_, P> {
        Kernel {
            function: &self.per_dtype[kernel.index][dtype_index(dtype)],
            params: PhantomData,
        }
    }

    /// The entry point of a single kernel ([`SYNC_MERGE`], [`SYNC_COEFFICIENTS`]).
    pub(crate) fn single<P>(&self, kernel: Single<P>) -> Kernel<'_, P> {
        Kernel {
            function: &self.single[kernel.index],
            params: PhantomData,
        }
    }

    /// The single-pass forward's entry point for a dtype and index width.
    pub(crate) fn onchip(&self, dtype: DType, index: IndexWidth) -> OnchipKernel<'_> {
        let index = match index {
            IndexWidth::I32 => 0,
            IndexWidth::I64 => 1,
        };
        OnchipKernel {
            function: &self.onchip[dtype_index(dtype)][index],
            max_shared: self.onchip_max_shared,
        }
    }

    /// Every entry-point name the crate launches.
    fn all_names() -> impl Iterator<Item = &'static str> {
        FAMILY_NAMES
            .iter()
            .flat_map(|f| f.iter().flatten().flatten().copied())
            .chain(PER_DTYPE_NAMES.iter().flatten().copied())
            .chain(SINGLE_NAMES.iter().copied())
            .chain(ONCHIP_NAMES.iter().flatten().copied())
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
        // The batch-norm tables and the norms' own (gpu::norms loads those modules itself).
        let launched: Vec<&str> = Kernels::all_names()
            .chain(crate::gpu::norms::ENTRY_POINTS)
            .collect();
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
