//! The embedded PTX (`kernels/prebuilt/`, or compiled by `build.rs` with
//! `BATCHNORM_BUILD_KERNELS=1`), with each module's entry points.

/// One compiled `kernels/<name>.cu`.
#[derive(Clone, Copy, Debug)]
pub struct PtxModule {
    /// File stem of the source (`bn_stats` for `kernels/bn_stats.cu`).
    pub name: &'static str,
    /// The PTX text (compute_80 baseline; ISA in [`PTX_ISA`]).
    pub ptx: &'static str,
    /// The `extern "C"` kernels it defines.
    pub entry_points: &'static [&'static str],
}

include!(concat!(env!("OUT_DIR"), "/ptx_registry.rs"));
