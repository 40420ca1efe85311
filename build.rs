//! Compiles every `kernels/*.cu` to PTX with nvcc and writes a registry of the modules and their
//! entry points into `OUT_DIR/ptx_registry.rs`, which `src/gpu/ptx.rs` includes.
//!
//! nvcc is looked for in `NVCC`, `CUDA_HOME`/`CUDA_PATH`, `PATH`, `/usr/local/cuda`, then the
//! project's own `.cuda/` (installed by `scripts/install-nvcc.sh`). Without nvcc the crate still
//! builds (CPU reference only) and says so loudly; `BATCHNORM_REQUIRE_NVCC=1` makes that an error.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Oldest architecture the PTX targets; the driver JIT-compiles it for newer GPUs (sm_90...).
const PTX_ARCH: &str = "compute_80";
/// Newest PTX ISA the GPU machines' driver (580, CUDA 13.0) accepts.
const MAX_PTX_ISA: (u32, u32) = (9, 0);

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kernels_dir = manifest.join("kernels");

    println!("cargo:rerun-if-changed={}", kernels_dir.display());
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "BATCHNORM_REQUIRE_NVCC",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let mut sources = Vec::new();
    for entry in fs::read_dir(&kernels_dir).expect("kernels/ exists") {
        let path = entry.unwrap().path();
        // Headers are inputs too: a change to common.cuh must rebuild every module.
        if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("cu" | "cuh")
        ) {
            println!("cargo:rerun-if-changed={}", path.display());
        }
        if path.extension().and_then(|e| e.to_str()) == Some("cu") {
            sources.push(path);
        }
    }
    sources.sort();

    let require = env::var("BATCHNORM_REQUIRE_NVCC").is_ok_and(|v| v == "1");
    let Some(nvcc) = find_nvcc(&manifest) else {
        if require {
            panic!("BATCHNORM_REQUIRE_NVCC=1 but no nvcc was found (NVCC, CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda, .cuda/); run scripts/install-nvcc.sh");
        }
        println!("cargo:warning=batchnorm-cuda: nvcc not found: GPU kernels were NOT built, only the CPU reference works. Run scripts/install-nvcc.sh (or set NVCC) to build them.");
        write_registry(&out, &[], None, None);
        return;
    };

    let ptx_dir = out.join("ptx");
    fs::create_dir_all(&ptx_dir).unwrap();
    let mut modules = Vec::new();
    for source in &sources {
        let name = source.file_stem().unwrap().to_str().unwrap().to_owned();
        let ptx_path = ptx_dir.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["-ptx", "-arch", PTX_ARCH, "-std=c++17", "-O3", "-lineinfo"])
            .arg("-I")
            .arg(&kernels_dir)
            .arg("-o")
            .arg(&ptx_path)
            .arg(source)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
        assert!(status.success(), "nvcc failed on {}", source.display());
        let ptx = fs::read_to_string(&ptx_path).unwrap();
        check_isa(&name, &ptx);
        modules.push(Module {
            name,
            path: ptx_path,
            entries: entry_points(&ptx),
        });
    }
    let ptxas = nvcc.with_file_name("ptxas");
    // The CUDA headers of that toolkit (`bin/../include`), for the CPU emulator test.
    let include = nvcc
        .parent()
        .and_then(Path::parent)
        .map(|root| root.join("include"));
    let include = include.filter(|dir| dir.join("cuda_fp16.h").is_file());
    write_registry(
        &out,
        &modules,
        ptxas.is_file().then_some(ptxas.as_path()),
        include.as_deref(),
    );
}

struct Module {
    name: String,
    path: PathBuf,
    entries: Vec<String>,
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

/// Rejects PTX the GPU machines' driver would refuse at load time, with a message that says why.
fn check_isa(name: &str, ptx: &str) {
    let version = ptx
        .lines()
        .find_map(|l| l.trim().strip_prefix(".version "))
        .unwrap_or_else(|| panic!("{name}.ptx has no .version line"));
    let (major, minor) = version
        .trim()
        .split_once('.')
        .expect("PTX version is MAJOR.MINOR");
    let isa = (major.parse().unwrap(), minor.parse().unwrap());
    assert!(
        isa <= MAX_PTX_ISA,
        "{name}.ptx is PTX ISA {version}, newer than {}.{}: the GPU machines' driver (CUDA 13.0) rejects it. Use nvcc 13.0 (scripts/install-nvcc.sh).",
        MAX_PTX_ISA.0,
        MAX_PTX_ISA.1
    );
}

fn entry_points(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|l| l.trim().strip_prefix(".visible .entry "))
        .map(|rest| rest.split('(').next().unwrap().trim().to_owned())
        .collect()
}

fn write_registry(
    out: &Path,
    modules: &[Module],
    ptxas: Option<&Path>,
    cuda_include: Option<&Path>,
) {
    let mut code = String::new();
    writeln!(
        code,
        "/// Whether nvcc was found and the kernels were compiled into this build."
    )
    .unwrap();
    writeln!(
        code,
        "pub const KERNELS_BUILT: bool = {};",
        !modules.is_empty()
    )
    .unwrap();
    writeln!(
        code,
        "/// The ptxas beside the nvcc that built the kernels, for the kernel quality gate."
    )
    .unwrap();
    writeln!(
        code,
        "pub const PTXAS: Option<&str> = {:?};",
        ptxas.map(|p| p.display().to_string())
    )
    .unwrap();
    writeln!(
        code,
        "/// The CUDA headers beside that nvcc (`cuda_fp16.h`...), for the CPU emulator test."
    )
    .unwrap();
    writeln!(
        code,
        "pub const CUDA_INCLUDE: Option<&str> = {:?};",
        cuda_include.map(|p| p.display().to_string())
    )
    .unwrap();
    writeln!(code, "/// Every compiled module, one per `kernels/*.cu`.").unwrap();
    writeln!(code, "pub const MODULES: &[PtxModule] = &[").unwrap();
    for m in modules {
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
