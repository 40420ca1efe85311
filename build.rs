//! Embeds the kernels and writes a registry of the modules and their entry points into
//! `OUT_DIR/ptx_registry.rs`, which `src/gpu/ptx.rs` includes.
//!
//! By default the PTX is the prebuilt one in `kernels/prebuilt/` (made from `kernels/*.cu` by
//! `scripts/build-kernels.sh` with NVRTC 12.0, PTX ISA 8.0, and committed), so a user needs only
//! a driver. `BATCHNORM_BUILD_KERNELS=1` compiles `kernels/*.cu` here with the local nvcc instead.
//!
//! nvcc is looked for in `NVCC`, `CUDA_HOME`/`CUDA_PATH`, `PATH`, `/usr/local/cuda`, then the
//! project's own `.cuda/` (installed by `scripts/install-nvcc.sh`). Besides a local build, its
//! toolkit gives the tests their tools: ptxas (the kernel gate) and the CUDA headers (the CPU
//! emulator). `BATCHNORM_REQUIRE_NVCC=1` (CI) makes a missing toolkit, or prebuilt kernels older
//! than the sources, an error.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Oldest architecture the PTX targets; the driver JIT-compiles it for newer GPUs (sm_90...).
const PTX_ARCH: &str = "compute_80";

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kernels_dir = manifest.join("kernels");
    let prebuilt_dir = kernels_dir.join("prebuilt");

    println!("cargo:rerun-if-changed={}", kernels_dir.display());
    println!("cargo:rerun-if-changed={}", prebuilt_dir.display());
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "BATCHNORM_REQUIRE_NVCC",
        "BATCHNORM_BUILD_KERNELS",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let sources = kernel_sources(&kernels_dir);

    let require = env::var("BATCHNORM_REQUIRE_NVCC").is_ok_and(|v| v == "1");
    let build_locally = env::var("BATCHNORM_BUILD_KERNELS").is_ok_and(|v| v == "1");
    let nvcc = find_nvcc(&manifest);
    if let Some(nvcc) = nvcc.as_ref().filter(|nvcc| nvcc.is_file()) {
        // A toolkit reinstalled (scripts/install-nvcc.sh) is seen on the next build.
        println!("cargo:rerun-if-changed={}", nvcc.display());
    } else if nvcc.is_none() && (require || build_locally) {
        panic!("no nvcc was found (NVCC, CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda, .cuda/), and {} asks for it: run scripts/install-nvcc.sh",
            if build_locally { "BATCHNORM_BUILD_KERNELS=1" } else { "BATCHNORM_REQUIRE_NVCC=1" });
    }

    let ptx_dir = out.join("ptx");
    fs::create_dir_all(&ptx_dir).unwrap();
    let (modules, origin) = match &nvcc {
        Some(nvcc) if build_locally => (
            compile(nvcc, &kernels_dir, &sources, &ptx_dir),
            format!("compiled by {} (BATCHNORM_BUILD_KERNELS=1)", nvcc.display()),
        ),
        _ => unpack_prebuilt(&sources, &prebuilt_dir, &ptx_dir, require),
    };
    let isa = modules.iter().map(|m| m.isa).max().unwrap_or((0, 0));
    let driver = cuda_version_for_isa(isa);
    if driver.is_none() && !modules.is_empty() {
        println!("cargo:warning=batchnorm-cuda: PTX ISA {}.{} is newer than this build knows; GpuContext::new cannot check the driver's version against it", isa.0, isa.1);
    }
    if let Some((major, minor)) = driver.filter(|&v| v > (12, 0)) {
        println!("cargo:warning=batchnorm-cuda: the kernels are PTX ISA {}.{}, which needs a CUDA {major}.{minor} driver or newer; the prebuilt ones (ISA 8.0, without BATCHNORM_BUILD_KERNELS=1) load on CUDA 12.0 and newer", isa.0, isa.1);
    }

    let ptxas = nvcc.as_ref().map(|nvcc| nvcc.with_file_name("ptxas"));
    // The CUDA headers of that toolkit (`bin/../include`), for the CPU emulator test.
    let include = nvcc
        .as_ref()
        .and_then(|nvcc| nvcc.parent()?.parent().map(|root| root.join("include")))
        .filter(|dir| dir.join("cuda_fp16.h").is_file());
    write_registry(
        &out,
        &Registry {
            modules: &modules,
            origin: &origin,
            isa,
            driver: driver.map_or(0, |(major, minor)| major * 1000 + minor * 10),
            ptxas: ptxas.as_deref().filter(|p| p.is_file()),
            cuda_include: include.as_deref(),
        },
    );
}

struct Module {
    name: String,
    path: PathBuf,
    entries: Vec<String>,
    isa: (u32, u32),
}

impl Module {
    fn read(name: String, path: PathBuf) -> Self {
        let ptx = fs::read_to_string(&path).unwrap();
        Self {
            isa: ptx_isa(&name, &ptx),
            entries: entry_points(&ptx),
            name,
            path,
        }
    }
}

/// Every `kernels/*.cu` and `*.cuh`, sorted: the modules and the headers they include.
fn kernel_sources(kernels_dir: &Path) -> Vec<PathBuf> {
    let mut sources: Vec<PathBuf> = fs::read_dir(kernels_dir)
        .expect("kernels/ exists")
        .map(|entry| entry.unwrap().path())
        .filter(|path| matches!(extension(path), "cu" | "cuh"))
        .collect();
    sources.sort();
    for path in &sources {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    sources
}

fn extension(path: &Path) -> &str {
    path.extension().and_then(|e| e.to_str()).unwrap_or("")
}

fn compile(nvcc: &Path, kernels_dir: &Path, sources: &[PathBuf], ptx_dir: &Path) -> Vec<Module> {
    sources
        .iter()
        .filter(|source| extension(source) == "cu")
        .map(|source| {
            let name = source.file_stem().unwrap().to_str().unwrap().to_owned();
            let ptx_path = ptx_dir.join(format!("{name}.ptx"));
            let status = Command::new(nvcc)
                .args(["-ptx", "-arch", PTX_ARCH, "-std=c++17", "-O3", "-lineinfo"])
                .arg("-I")
                .arg(kernels_dir)
                .arg("-o")
                .arg(&ptx_path)
                .arg(source)
                .status()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
            assert!(status.success(), "nvcc failed on {}", source.display());
            Module::read(name, ptx_path)
        })
        .collect()
}

/// Decompresses `kernels/prebuilt/*.ptx.xz` into `ptx_dir`; warns (errors when `require`) when
/// they were built from other sources than the `kernels/` beside them.
fn unpack_prebuilt(
    sources: &[PathBuf],
    prebuilt_dir: &Path,
    ptx_dir: &Path,
    require: bool,
) -> (Vec<Module>, String) {
    let regenerate = "run `bash scripts/build-kernels.sh` (and commit kernels/prebuilt/), or build with BATCHNORM_BUILD_KERNELS=1 and a local nvcc";
    let Ok(manifest) = fs::read_to_string(prebuilt_dir.join("manifest.txt")) else {
        println!("cargo:warning=batchnorm-cuda: kernels/prebuilt/ is missing: GPU kernels were NOT built, only the CPU reference works; {regenerate}");
        return (Vec::new(), "none".into());
    };
    let field = |key: &str| {
        manifest
            .lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("kernels/prebuilt/manifest.txt has no `{key}` line"))
    };
    let recorded = field("sources-fnv1a64");
    let actual = format!("{:016x}", sources_hash(sources));
    if recorded != actual {
        let message = format!("kernels/prebuilt/ was built from other sources than kernels/ (hash {recorded}, sources {actual}): {regenerate}");
        assert!(!require, "{message} (BATCHNORM_REQUIRE_NVCC=1)");
        println!("cargo:warning=batchnorm-cuda: {message}");
    }
    let mut packed: Vec<PathBuf> = fs::read_dir(prebuilt_dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.to_str().is_some_and(|p| p.ends_with(".ptx.xz")))
        .collect();
    packed.sort();
    let modules = packed
        .into_iter()
        .map(|path| {
            let file = path.file_name().unwrap().to_str().unwrap();
            let name = file.trim_end_matches(".ptx.xz").to_owned();
            let mut ptx = Vec::new();
            lzma_rs::xz_decompress(&mut &fs::read(&path).unwrap()[..], &mut ptx)
                .unwrap_or_else(|e| panic!("kernels/prebuilt/{file} is not valid xz: {e:?}"));
            let ptx_path = ptx_dir.join(format!("{name}.ptx"));
            fs::write(&ptx_path, ptx).unwrap();
            Module::read(name, ptx_path)
        })
        .collect();
    (
        modules,
        format!("prebuilt by {} (kernels/prebuilt/)", field("compiler")),
    )
}

/// FNV-1a 64 over the sources (name, NUL, bytes, NUL) in name order; the same as
/// `scripts/build-kernels.py` records in `kernels/prebuilt/manifest.txt`.
fn sources_hash(sources: &[PathBuf]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for path in sources {
        let name = path.file_name().unwrap().to_str().unwrap().as_bytes();
        let bytes = fs::read(path).unwrap();
        for &byte in [name, &[0], &bytes, &[0]].concat().iter() {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

fn find_nvcc(manifest: &Path) -> Option<PathBuf> {
    let exe = |dir: PathBuf| Some(dir.join("nvcc")).filter(|p| p.is_file());
    if let Some(path) = env::var_os("NVCC").map(PathBuf::from) {
        return Some(path);
    }
    ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(env::var_os)
        .find_map(|home| exe(PathBuf::from(home).join("bin")))
        .or_else(|| env::var_os("PATH").and_then(|paths| env::split_paths(&paths).find_map(exe)))
        .or_else(|| exe(PathBuf::from("/usr/local/cuda/bin")))
        .or_else(|| exe(manifest.join(".cuda/nvidia/cu13/bin")))
}

/// The `.version` of a PTX module.
fn ptx_isa(name: &str, ptx: &str) -> (u32, u32) {
    let version = ptx
        .lines()
        .find_map(|l| l.trim().strip_prefix(".version "))
        .unwrap_or_else(|| panic!("{name}.ptx has no .version line"));
    let (major, minor) = version
        .trim()
        .split_once('.')
        .expect("PTX version is MAJOR.MINOR");
    (major.parse().unwrap(), minor.parse().unwrap())
}

/// The CUDA release that introduced a PTX ISA (NVIDIA's PTX ISA release history): the oldest
/// driver that loads it. ISA 8.6 came with 12.7, so 12.8 and 12.9 are 8.7 and 8.8.
fn cuda_version_for_isa(isa: (u32, u32)) -> Option<(u32, u32)> {
    match isa {
        (7, minor @ 0..=8) => Some((11, minor)),
        (8, minor @ 0..=5) => Some((12, minor)),
        (8, minor @ 6..=8) => Some((12, minor + 1)),
        (9, minor @ 0..=2) => Some((13, minor)),
        _ => None,
    }
}

fn entry_points(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|l| l.trim().strip_prefix(".visible .entry "))
        .map(|rest| rest.split('(').next().unwrap().trim().to_owned())
        .collect()
}

struct Registry<'a> {
    modules: &'a [Module],
    origin: &'a str,
    isa: (u32, u32),
    /// `cuDriverGetVersion`'s encoding (1000 * major + 10 * minor); 0 when unknown.
    driver: u32,
    ptxas: Option<&'a Path>,
    cuda_include: Option<&'a Path>,
}

fn write_registry(out: &Path, r: &Registry) {
    let path_const = |p: Option<&Path>| format!("{:?}", p.map(|p| p.display().to_string()));
    let mut code = String::new();
    let mut item = |doc: &str, decl: String| writeln!(code, "/// {doc}\n{decl}").unwrap();
    item(
        "Whether this build embeds the kernels (prebuilt, or compiled with `BATCHNORM_BUILD_KERNELS=1`).",
        format!("pub const KERNELS_BUILT: bool = {};", !r.modules.is_empty()),
    );
    item(
        "Where the embedded PTX comes from: the prebuilt kernels and their compiler, or the local nvcc.",
        format!("pub const KERNEL_ORIGIN: &str = {:?};", r.origin),
    );
    item(
        "The newest PTX ISA of the embedded modules, `(major, minor)`.",
        format!("pub const PTX_ISA: (u32, u32) = {:?};", r.isa),
    );
    item(
        "The oldest driver that loads that PTX, as `cuDriverGetVersion` gives it (12000 is CUDA 12.0); 0 when unknown.",
        format!("pub const MIN_DRIVER_VERSION: i32 = {};", r.driver),
    );
    item(
        "The ptxas beside the nvcc found at build time, for the kernel quality gate.",
        format!("pub const PTXAS: Option<&str> = {};", path_const(r.ptxas)),
    );
    item(
        "The CUDA headers beside that nvcc (`cuda_fp16.h`...), for the CPU emulator test.",
        format!(
            "pub const CUDA_INCLUDE: Option<&str> = {};",
            path_const(r.cuda_include)
        ),
    );
    writeln!(code, "/// Every embedded module, one per `kernels/*.cu`.").unwrap();
    writeln!(code, "pub const MODULES: &[PtxModule] = &[").unwrap();
    for m in r.modules {
        writeln!(
            code,
            "    PtxModule {{ name: {:?}, ptx: include_str!({:?}), entry_points: &{:?} }},",
            m.name,
            m.path.display().to_string(),
            m.entries
        )
        .unwrap();
    }
    writeln!(code, "];").unwrap();
    fs::write(out.join("ptx_registry.rs"), code).unwrap();
}
