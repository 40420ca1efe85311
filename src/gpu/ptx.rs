//! The PTX that `build.rs` compiled from `kernels/*.cu`, with each module's entry points.

/// One compiled `kernels/<name>.cu`.
#[derive(Clone, Copy, Debug)]
pub struct PtxModule {
    /// File stem of the source (`bn_stats` for `kernels/bn_stats.cu`).
    pub name: &'static str,
    /// The PTX text (ISA 9.0, compute_80 baseline).
    pub ptx: &'static str,
    /// The `extern "C"` kernels it defines.
    pub entry_points: &'static [&'static str],
}

include!(concat!(env!("OUT_DIR"), "/ptx_registry.rs"));
