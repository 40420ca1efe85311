//! The kernels on a CPU emulator of CUDA, runnable without a GPU (see tests/emulator/README.md).
//!
//! Rewrites every `kernels/*.cu` / `*.cuh` for a host compiler (inline PTX to emulated functions,
//! `__shared__` declarations to registered statics: [`translate`]), compiles
//! tests/emulator/kernels_test.cpp against the rewritten sources, tests/emulator/emu.h and the CUDA
//! headers (the `include/` beside the nvcc that `build.rs` found), once per group of kernels, and
//! runs the binaries, on all cores. Every kernel result is checked there against an f64 host
//! reference.
//!
//! Without g++ (or `$CXX`) or the CUDA headers this says plainly that the emulator was NOT run,
//! and fails under `BATCHNORM_REQUIRE_NVCC=1` (CI). `BATCHNORM_EMU_KERNELS=dir` runs another copy
//! of the kernels, `BATCHNORM_EMU_KEEP=1` keeps the rewritten sources and binaries, `EMU_POLICY=k`
//! pins the emulator's schedule, `BATCHNORM_EMU_GROUPS=normalize,fused` runs only those groups
//! (while iterating on a kernel; CI runs them all).

use batchnorm_cuda::gpu::ptx::{CUDA_INCLUDE, KERNELS_BUILT, MODULES};
use std::collections::BTreeSet;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

const MANIFEST: &str = env!("CARGO_MANIFEST_DIR");
/// -O1: half the compile time of -O2 for the same run time (the runs take about a second; the
/// compiles are the cost). No fast-math at any level: the results do not depend on it.
const OPT: &str = "-O1";

/// What the emulator needs: the C++ compiler and the CUDA headers; `None` after saying plainly
/// what did not run (a failure under `BATCHNORM_REQUIRE_NVCC=1`, as in CI).
struct Toolchain {
    cxx: String,
    cuda_include: &'static str,
}

fn toolchain(what: &str) -> Option<Toolchain> {
    let require = std::env::var("BATCHNORM_REQUIRE_NVCC").as_deref() == Ok("1");
    let not_run = |why: &str| {
        assert!(
            !require,
            "BATCHNORM_REQUIRE_NVCC=1 but the kernel emulator cannot run: {why}"
        );
        // Straight to stderr, past the test harness's capture: this must be seen.
        let _ = writeln!(std::io::stderr(), "{what} NOT run: {why}.");
        None
    };
    let Some(cuda_include) = CUDA_INCLUDE else {
        return not_run("no CUDA headers (cuda_fp16.h beside the nvcc build.rs looks for; run scripts/install-nvcc.sh)");
    };
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".to_owned());
    if Command::new(&cxx).arg("--version").output().is_err() {
        return not_run(&format!("no C++ compiler `{cxx}` (set CXX)"));
    }
    Some(Toolchain { cxx, cuda_include })
}

/// Rewrites every `kernels/*.cu` / `*.cuh` for the host compiler into `dir/kernels`, which it
/// returns. `BATCHNORM_EMU_KERNELS`: another copy of kernels/ (to check that a broken kernel fails).
fn translate_kernels(dir: &Path) -> PathBuf {
    let src_dir = dir.join("kernels");
    fs::create_dir_all(&src_dir).unwrap();
    let kernels = std::env::var_os("BATCHNORM_EMU_KERNELS")
        .map_or_else(|| Path::new(MANIFEST).join("kernels"), PathBuf::from);
    let mut files: Vec<PathBuf> = fs::read_dir(&kernels)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("cu" | "cuh")))
        .collect();
    files.sort();
    let mut errors = Vec::new();
    for path in &files {
        let name = path.file_name().unwrap().to_str().unwrap();
        let text = fs::read_to_string(path).unwrap();
        match translate(&path.display().to_string(), &text) {
            Ok(out) => fs::write(src_dir.join(name), out).unwrap(),
            Err(e) => errors.push(e),
        }
    }
    assert!(
        errors.is_empty(),
        "kernel sources the emulator cannot take:\n{}",
        errors.join("\n")
    );
    src_dir
}

#[test]
fn kernels_pass_the_cpu_emulator() {
    let Some(Toolchain { cxx, cuda_include }) = toolchain(
        "kernel emulator (the kernels' index math, masks and merges were NOT checked on the CPU)",
    ) else {
        return;
    };
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("kernel-emulator-{}", std::process::id()));
    let src_dir = translate_kernels(&dir);

    // Compile kernels_test.cpp once per group (-DEMU_GROUP_<name>: each binary instantiates only
    // its own kernels) and run each binary, on all cores; the longest groups go first.
    let emulator = Path::new(MANIFEST).join("tests/emulator");
    let test_source = emulator.join("kernels_test.cpp");
    let mut groups = groups_of(&fs::read_to_string(&test_source).unwrap());
    if let Ok(only) = std::env::var("BATCHNORM_EMU_GROUPS") {
        let only: Vec<&str> = only.split(',').map(str::trim).collect();
        groups.retain(|g| only.contains(&g.as_str()));
    }
    assert!(
        !groups.is_empty(),
        "no EMU_GROUP_ in {}",
        test_source.display()
    );
    // Longest first (as measured), so the pool ends evenly; a new group ranks as "*".
    let order = ["backward", "normalize", "*", "stats", "core", "fold"];
    groups.sort_by_key(|g| order.iter().position(|h| h == g).unwrap_or(2));
    let includes = [
        src_dir.as_path(),
        emulator.as_path(),
        Path::new(cuda_include),
    ];
    let t0 = Instant::now();
    let results = on_all_cores(&groups, |group| {
        compile_and_run(&cxx, group, &test_source, &includes, &dir)
    });
    let wall_s = t0.elapsed().as_secs_f64();

    // The summary goes straight to stderr, past the test harness's capture: CI logs show it.
    let mut summary = String::new();
    let mut failures = String::new();
    let mut exercised = BTreeSet::new();
    let (mut passed, mut failed) = (0u64, 0u64);
    for GroupRun {
        group,
        output,
        compile_s,
        run_s,
    } in &results
    {
        let text = output.as_ref().unwrap_or_else(|e| e);
        for line in text.lines() {
            if let Some(list) = line.strip_prefix("entry points:") {
                exercised.extend(list.split_whitespace().map(str::to_owned));
            } else if let Some((p, f)) = line.split_once(" passed, ") {
                passed += p.trim().parse::<u64>().unwrap_or(0);
                failed += f.trim_end_matches(" failed").parse::<u64>().unwrap_or(0);
            } else if line.starts_with(&format!("{group}: ")) {
                summary += &format!(
                    "kernel emulator: {line} (compile {compile_s:.1} s, run {run_s:.2} s)\n"
                );
            }
        }
        if output.is_err() {
            failures += &format!("---- group {group} ----\n{text}\n");
        }
    }
    summary += &format!(
        "kernel emulator: {passed} checks passed, {failed} failed; {} entry points exercised; {wall_s:.1} s for {} groups on {} cores\n",
        exercised.len(),
        groups.len(),
        workers()
    );
    if KERNELS_BUILT {
        let missing: Vec<&str> = MODULES
            .iter()
            .flat_map(|m| m.entry_points.iter().copied())
            .filter(|e| !exercised.contains(*e))
            .collect();
        if !missing.is_empty() {
            summary += &format!(
                "NOTE: {} kernel entry points are NOT exercised by the CPU emulator (add them to tests/emulator/kernels_test.cpp): {}\n",
                missing.len(),
                missing.join(" ")
            );
        }
    }
    let _ = std::io::stderr().write_all(summary.as_bytes());
    assert!(
        failures.is_empty(),
        "the kernels failed on the CPU emulator (rewritten sources and binaries kept in {}):\n{failures}",
        dir.display()
    );
    if std::env::var_os("BATCHNORM_EMU_KEEP").is_none() {
        let _ = fs::remove_dir_all(&dir);
    }
}

/// Builds the emulated CUDA driver (tests/emulator/driver.cpp): `libcuda.so.1` holding every
/// kernel of the built PTX, and the emulated NCCL (tests/emulator/nccl.cpp) `libnccl.so`, in `BATCHNORM_EMU_DRIVER_OUT` (default `target/tmp/emulated-driver`).
/// `scripts/emulated-gpu.sh` runs the GPU test binaries against it.
#[test]
fn emulated_driver_builds() {
    let Some(Toolchain { cxx, cuda_include }) =
        toolchain("emulated CUDA driver build (tests/emulator/driver.cpp)")
    else {
        return;
    };
    let out = std::env::var_os("BATCHNORM_EMU_DRIVER_OUT").map_or_else(
        || Path::new(env!("CARGO_TARGET_TMPDIR")).join("emulated-driver"),
        PathBuf::from,
    );
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("emulated-driver-build-{}", std::process::id()));
    let src_dir = translate_kernels(&dir);
    let emulator = Path::new(MANIFEST).join("tests/emulator");
    let includes = [
        src_dir.as_path(),
        emulator.as_path(),
        Path::new(cuda_include),
    ];

    // One translation unit per module: its kernels, and the list that registers them by name.
    // The driver, its self-test's broken kernels, then the modules.
    let selftest_kernels = dir.join("module_selftest.cpp");
    fs::write(
        &selftest_kernels,
        "#define EMU_SELFTEST_PART_kernels\n#include \"driver_selftest.cpp\"\n",
    )
    .unwrap();
    let mut units = vec![emulator.join("driver.cpp"), selftest_kernels];
    for module in MODULES {
        let entries: String = module
            .entry_points
            .iter()
            .map(|e| format!("EMU_DRIVER_ENTRY({e})\n"))
            .collect();
        let unit = dir.join(format!("module_{}.cpp", module.name));
        fs::write(
            &unit,
            format!(
                "#include \"driver_registry.h\"\n#include \"emu.h\"\n#include \"{}.cu\"\nEMU_DRIVER_MODULE(\n{entries})\n",
                module.name
            ),
        )
        .unwrap();
        units.push(unit);
    }
    let t0 = Instant::now();
    let objects: Vec<PathBuf> = on_all_cores(&units, |unit| {
        let object = dir.join(unit.file_stem().unwrap()).with_extension("o");
        let mut compile = Command::new(&cxx);
        compile
            .args(["-std=c++20", OPT, "-fPIC", "-pthread", "-w", "-c"])
            .args(includes.iter().map(|d| format!("-I{}", d.display())))
            .arg(unit)
            .arg("-o")
            .arg(&object);
        run_compiler(compile, &format!("compiling {}", unit.display())).map(|()| object)
    })
    .into_iter()
    .collect::<Result<_, _>>()
    .unwrap_or_else(|e| panic!("{e}"));

    fs::create_dir_all(&out).unwrap();
    let library = out.join("libcuda.so.1");
    let mut link = Command::new(&cxx);
    link.args(["-shared", "-pthread", "-Wl,-soname,libcuda.so.1", "-o"])
        .arg(&library)
        .args(&objects);
    run_compiler(link, "linking libcuda.so.1").unwrap_or_else(|e| panic!("{e}"));
    // cudarc asks for libcuda.so first.
    let alias = out.join("libcuda.so");
    let _ = fs::remove_file(&alias);
    std::os::unix::fs::symlink("libcuda.so.1", &alias).unwrap();
    // The emulated NCCL (ranks as threads of one process), for SyncBatchNorm's NCCL path.
    let mut build = Command::new(&cxx);
    build
        .args([
            "-std=c++20",
            OPT,
            "-fPIC",
            "-shared",
            "-pthread",
            "-w",
            "-o",
        ])
        .arg(out.join("libnccl.so"))
        .arg(emulator.join("nccl.cpp"));
    run_compiler(build, "building libnccl.so").unwrap_or_else(|e| panic!("{e}"));
    driver_selftest(&cxx, cuda_include, &emulator, &out, &dir);
    let _ = fs::remove_dir_all(&dir);
    let _ = writeln!(
        std::io::stderr(),
        "emulated CUDA driver: {} ({} kernel modules, {:.1} s); run the GPU tests on it with scripts/emulated-gpu.sh",
        library.display(),
        MODULES.len(),
        t0.elapsed().as_secs_f64()
    );
}

/// The emulated driver catches what it claims to (tests/emulator/driver_selftest.cpp): a
/// program linked against it launches deliberately broken kernels, one mode per process.
fn driver_selftest(cxx: &str, cuda_include: &str, emulator: &Path, lib: &Path, dir: &Path) {
    use std::os::unix::process::ExitStatusExt;
    let program = dir.join("driver_selftest");
    let mut build = Command::new(cxx);
    build
        .args(["-std=c++20", OPT, "-w", "-DEMU_SELFTEST_PART_program"])
        .arg(format!("-I{cuda_include}"))
        .arg(emulator.join("driver_selftest.cpp"))
        .arg("-o")
        .arg(&program)
        .arg(format!("-L{}", lib.display()))
        .arg("-l:libcuda.so.1")
        .arg(format!("-Wl,-rpath,{}", lib.display()));
    run_compiler(build, "building the driver self-test").unwrap_or_else(|e| panic!("{e}"));
    for mode in ["basic", "capture", "write-past-end", "divergent-barrier"] {
        let run = Command::new(&program).arg(mode).output().unwrap();
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert!(
            run.status.success() && stdout.contains(&format!("selftest {mode}: ok")),
            "emulated driver self-test {mode}: {}\n{stdout}{}",
            run.status,
            String::from_utf8_lossy(&run.stderr)
        );
    }
    let run = Command::new(&program)
        .arg("guard-read")
        .env("EMU_GUARD_PAGES", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.signal() == Some(SIGSEGV) && stderr.contains("EMULATOR CRASH"),
        "emulated driver self-test guard-read: a read past the end must crash the launch, got {}:\n{}{stderr}",
        run.status,
        String::from_utf8_lossy(&run.stdout)
    );
}

/// Threads for the compiles and runs: the cores, up to 8.
fn workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().min(8))
}

/// `f` of every item, on [`workers`] threads taking the items in order (put the longest first),
/// returned in the items' order.
fn on_all_cores<I: Sync, R: Send>(items: &[I], f: impl Fn(&I) -> R + Sync) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let mut done: Vec<(usize, R)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers().min(items.len()))
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break done };
                        done.push((i, f(item)));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    done.sort_by_key(|&(i, _)| i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// Runs a C++ compiler or linker command; on failure, `what` failed and its stderr.
fn run_compiler(mut command: Command, what: &str) -> Result<(), String> {
    let out = command
        .output()
        .map_err(|e| format!("{what}: cannot run {:?}: {e}", command.get_program()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// SIGSEGV's number on Linux, the platform of the emulated driver.
const SIGSEGV: i32 = 11;

/// One group of kernels_test.cpp, compiled and run: its output (Err: a failure).
struct GroupRun {
    group: String,
    output: Result<String, String>,
    compile_s: f64,
    run_s: f64,
}

fn compile_and_run(
    cxx: &str,
    group: &str,
    source: &Path,
    includes: &[&Path],
    dir: &Path,
) -> GroupRun {
    let binary = dir.join(format!("kernels_test_{group}"));
    let t = Instant::now();
    let mut compile = Command::new(cxx);
    compile
        .args(["-std=c++20", OPT, "-pthread", "-w"])
        .arg(format!("-DEMU_GROUP_{group}"))
        .args(includes.iter().map(|d| format!("-I{}", d.display())))
        .arg(source)
        .arg("-o")
        .arg(&binary);
    let compiled = run_compiler(
        compile,
        &format!(
            "compiling {} with -DEMU_GROUP_{group} (rewritten kernels in {})",
            source.display(),
            includes[0].display()
        ),
    );
    let compile_s = t.elapsed().as_secs_f64();
    if let Err(output) = compiled {
        return GroupRun {
            group: group.to_owned(),
            output: Err(output),
            compile_s,
            run_s: 0.0,
        };
    }
    let t = Instant::now();
    let out = Command::new(&binary).output().expect("run the emulator");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text += &String::from_utf8_lossy(&out.stderr);
    let output = if out.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "{text}({} exited with {})\n",
            binary.display(),
            out.status
        ))
    };
    GroupRun {
        group: group.to_owned(),
        output,
        compile_s,
        run_s: t.elapsed().as_secs_f64(),
    }
}

/// The groups of kernels_test.cpp: every `EMU_GROUP_<name>` it mentions, in order of appearance.
fn groups_of(source: &str) -> Vec<String> {
    let mut groups: Vec<String> = Vec::new();
    for word in code_words(source) {
        if let Some(name) = word.strip_prefix("EMU_GROUP_") {
            if !name.is_empty() && !groups.iter().any(|g| g == name) {
                groups.push(name.to_owned());
            }
        }
    }
    groups
}

// ------------------------------------------------------------------------------------------------
// Source rewriting
// ------------------------------------------------------------------------------------------------

/// Rewrites one kernel source for the host compiler, keeping its line numbers (a `#line` names the
/// original file):
/// * `asm [volatile] ("op.x.y %0, %1, ...;" : "=c"(out) : "c"(in), ...);` becomes
///   `(out) = emu_ptx_op_x_y((in), ...);` (emulations in tests/emulator/emu.h); an empty template
///   (a compiler barrier) becomes a no-op. Any other inline assembly is an error naming the line:
///   nothing is left untranslated.
/// * `__shared__ T name[N];` becomes `static T name[N];` plus a function-local static
///   `emu::SharedRegion` that registers it (poisoned before every block);
///   `extern __shared__ T name[];` becomes a pointer to the launch's dynamic shared memory.
///
/// Comments and string literals are left alone.
fn translate(file: &str, src: &str) -> Result<String, String> {
    let b = src.as_bytes();
    let mut out = format!("#line 1 \"{file}\"\n");
    let mut i = 0;
    let mut copied = 0; // b[copied..i] is still to be copied to out
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => i = skip_line_comment(b, i),
            b'/' if b.get(i + 1) == Some(&b'*') => i = skip_block_comment(b, i)?,
            b'"' | b'\'' => i = skip_literal(b, i)?,
            c if is_ident_start(c) && (i == 0 || !is_ident(b[i - 1])) => {
                let start = i;
                while i < b.len() && is_ident(b[i]) {
                    i += 1;
                }
                let word = &src[start..i];
                let line = line_of(src, start);
                match word {
                    "asm" | "__asm__" | "__asm" => {
                        let (end, replacement) = translate_asm(src, start, i)
                            .map_err(|e| format!("{file}:{line}: {e}"))?;
                        out.push_str(&src[copied..start]);
                        out.push_str(&replacement);
                        out.push_str(&line_breaks(&src[start..end]));
                        i = end;
                        copied = end;
                    }
                    // Checked: a cast pointer must be aligned for its type (emu.h).
                    "reinterpret_cast" => {
                        out.push_str(&src[copied..start]);
                        out.push_str("emu_reinterpret_cast");
                        copied = i;
                    }
                    "__shared__" => {
                        let (end, replacement, drop_extern) =
                            translate_shared(src, copied, start, i)
                                .map_err(|e| format!("{file}:{line}: {e}"))?;
                        out.push_str(&src[copied..drop_extern]);
                        out.push_str(&replacement);
                        out.push_str(&line_breaks(&src[drop_extern..end]));
                        i = end;
                        copied = end;
                    }
                    _ => {}
                }
            }
            _ => i += 1,
        }
    }
    out.push_str(&src[copied..]);
    // Defensive: nothing the host compiler would take for inline assembly may remain.
    if let Some(w) = code_words(&out)
        .into_iter()
        .find(|w| matches!(*w, "asm" | "__asm__" | "__asm" | "__shared__"))
    {
        return Err(format!("{file}: `{w}` left after rewriting (emulator bug)"));
    }
    Ok(out)
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_'
}
fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}
fn line_of(src: &str, pos: usize) -> usize {
    src[..pos].matches('\n').count() + 1
}
/// The line breaks of a rewritten span, so the following lines keep their numbers (a span inside
/// a macro keeps its continuation backslashes).
fn line_breaks(span: &str) -> String {
    let lines: Vec<&str> = span.split('\n').collect();
    lines[..lines.len() - 1]
        .iter()
        .map(|l| {
            if l.trim_end().ends_with('\\') {
                " \\\n"
            } else {
                "\n"
            }
        })
        .collect()
}
fn skip_line_comment(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i] != b'\n' {
        i += 1;
    }
    i
}
fn skip_block_comment(b: &[u8], i: usize) -> Result<usize, String> {
    b[i + 2..]
        .windows(2)
        .position(|w| w == b"*/")
        .map(|p| i + 2 + p + 2)
        .ok_or_else(|| "unterminated comment".to_owned())
}
/// Skips a string or character literal starting at b[i] (a quote).
fn skip_literal(b: &[u8], mut i: usize) -> Result<usize, String> {
    let q = b[i];
    i += 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            c if c == q => return Ok(i + 1),
            b'\n' => break,
            _ => i += 1,
        }
    }
    Err("unterminated literal".to_owned())
}
/// The identifiers outside comments and literals.
fn code_words(src: &str) -> Vec<&str> {
    let b = src.as_bytes();
    let mut words = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => i = skip_line_comment(b, i),
            b'/' if b.get(i + 1) == Some(&b'*') => i = skip_block_comment(b, i).unwrap_or(b.len()),
            b'"' | b'\'' => i = skip_literal(b, i).unwrap_or(b.len()),
            c if is_ident(c) => {
                let start = i;
                while i < b.len() && is_ident(b[i]) {
                    i += 1;
                }
                if is_ident_start(b[start]) {
                    words.push(&src[start..i]);
                }
            }
            _ => i += 1,
        }
    }
    words
}
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len()
        && (b[i].is_ascii_whitespace() || (b[i] == b'\\' && b.get(i + 1) == Some(&b'\n')))
    {
        i += 1;
    }
    i
}
/// Index of the bracket closing the one at b[open], skipping literals and comments.
fn matching(b: &[u8], open: usize) -> Result<usize, String> {
    let mut depth = 0i32;
    let mut i = open;
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' => {
                i = skip_literal(b, i)?;
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'/') => {
                i = skip_line_comment(b, i);
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i = skip_block_comment(b, i)?;
                continue;
            }
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Ok(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    Err("unbalanced brackets".to_owned())
}
/// Splits at `sep` outside brackets and literals.
fn split_top(s: &str, sep: u8) -> Result<Vec<&str>, String> {
    let b = s.as_bytes();
    let (mut parts, mut depth, mut start, mut i) = (Vec::new(), 0i32, 0, 0);
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' => {
                i = skip_literal(b, i)?;
                continue;
            }
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            c if c == sep && depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    parts.push(&s[start..]);
    Ok(parts)
}

/// `asm` at src[start..word_end]: returns the end of the statement (past `;`) and its rewrite.
fn translate_asm(src: &str, start: usize, word_end: usize) -> Result<(usize, String), String> {
    let b = src.as_bytes();
    let mut i = skip_ws(b, word_end);
    loop {
        let q = i;
        while i < b.len() && is_ident(b[i]) {
            i += 1;
        }
        match &src[q..i] {
            "" => break,
            "volatile" | "__volatile__" | "__volatile" | "inline" => i = skip_ws(b, i),
            other => return Err(format!("unsupported asm qualifier `{other}`")),
        }
    }
    if b.get(i) != Some(&b'(') {
        return Err("expected `(` after asm".to_owned());
    }
    let close = matching(b, i)?;
    let end = skip_ws(b, close + 1);
    if b.get(end) != Some(&b';') {
        return Err("expected `;` after asm(...)".to_owned());
    }
    let stmt = src[start..=end]
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let unsupported = |why: &str| {
        format!(
            "inline PTX the CPU emulator cannot translate ({why}): `{stmt}`. Supported: `asm(\"op.a.b %0, %1, ...;\" : \"=c\"(out) : \"c\"(in), ...)` \
             (becomes out = emu_ptx_op_a_b(in, ...), defined in tests/emulator/emu.h) and empty barriers `asm volatile(\"\" ...)`. \
             Extend translate_asm in tests/kernel_emulator.rs and emu.h"
        )
    };
    let sections = split_top(&src[i + 1..close], b':')?;
    let template = string_concat(sections[0])
        .ok_or_else(|| unsupported("the template is not a string literal"))?;
    let operands = |k: usize| -> Result<Vec<(String, String)>, String> {
        match sections.get(k).map(|s| s.trim()) {
            None | Some("") => Ok(Vec::new()),
            Some(list) => split_top(list, b',')?
                .into_iter()
                .map(|op| {
                    parse_operand(op)
                        .ok_or_else(|| unsupported(&format!("operand `{}`", op.trim())))
                })
                .collect(),
        }
    };
    let (outputs, inputs) = (operands(1)?, operands(2)?);
    let template = template.trim().trim_end_matches(';').trim();
    if template.is_empty() {
        if outputs.iter().any(|(c, _)| !c.starts_with('+')) {
            return Err(unsupported("an empty template with a write-only output"));
        }
        return Ok((end + 1, "(void)0;".to_owned()));
    }
    let (op, args) = template
        .split_once(char::is_whitespace)
        .ok_or_else(|| unsupported("no operands"))?;
    // A special register: `mov.u32 %0, %%laneid;` -> out = emu_ptx_sreg_laneid().
    if let Some(sreg) = args.replace(char::is_whitespace, "").strip_prefix("%0,%%") {
        let name_ok =
            !sreg.is_empty() && sreg.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_');
        if op != "mov.u32"
            || !name_ok
            || outputs.len() != 1
            || outputs[0].0 != "=r"
            || !inputs.is_empty()
        {
            return Err(unsupported(
                "a special register other than `mov.u32 %0, %%name` with one \"=r\" output",
            ));
        }
        return Ok((
            end + 1,
            format!("({}) = emu_ptx_sreg_{sreg}();", outputs[0].1),
        ));
    }
    let op_ok = op
        .split('.')
        .all(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_alphanumeric()))
        && op.as_bytes()[0].is_ascii_alphabetic();
    let args: Vec<&str> = args.split(',').map(str::trim).collect();
    let numbered = args.iter().enumerate().all(|(k, a)| *a == format!("%{k}"));
    if !op_ok || !numbered || sections.len() > 4 {
        return Err(unsupported("not a single `op %0, %1, ...` instruction"));
    }
    if outputs.len() != 1 || !outputs[0].0.starts_with('=') || inputs.len() + 1 != args.len() {
        return Err(unsupported(
            "not one `=` output followed by the inputs, in order",
        ));
    }
    let call_args: Vec<String> = inputs.iter().map(|(_, e)| format!("({e})")).collect();
    Ok((
        end + 1,
        format!(
            "({}) = emu_ptx_{}({});",
            outputs[0].1,
            op.replace('.', "_"),
            call_args.join(", ")
        ),
    ))
}

/// The concatenation of adjacent string literals (no escapes other than `\n`, `\t`, `\\`, `\"`).
fn string_concat(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = String::new();
    let mut i = skip_ws(b, 0);
    if i >= b.len() {
        return None;
    }
    while i < b.len() {
        if b[i] != b'"' {
            return None;
        }
        let end = skip_literal(b, i).ok()?;
        let body = &s[i + 1..end - 1];
        out.push_str(
            &body
                .replace("\\n", "\n")
                .replace("\\t", "\t")
                .replace("\\\"", "\"")
                .replace("\\\\", "\\"),
        );
        i = skip_ws(b, end);
    }
    Some(out)
}

/// `"constraint"(expression)` -> (constraint, expression).
fn parse_operand(op: &str) -> Option<(String, String)> {
    let op = op.trim();
    let constraint = string_concat(&op[..op.find('(')?])?;
    let open = op.find('(')?;
    let close = matching(op.as_bytes(), open).ok()?;
    (close == op.len() - 1).then(|| (constraint, op[open + 1..close].trim().to_owned()))
}

/// `__shared__` at src[start..word_end]. Returns the end of the declaration (past `;`), its rewrite
/// and where the rewrite starts (before a preceding `extern`).
fn translate_shared(
    src: &str,
    copied: usize,
    start: usize,
    word_end: usize,
) -> Result<(usize, String, usize), String> {
    let b = src.as_bytes();
    // the declaration runs to the next `;` outside brackets
    let mut i = word_end;
    while i < b.len() && b[i] != b';' {
        match b[i] {
            b'(' | b'[' | b'{' => i = matching(b, i)? + 1,
            b'"' | b'\'' => i = skip_literal(b, i)?,
            _ => i += 1,
        }
    }
    if i >= b.len() {
        return Err("`__shared__` declaration without `;`".to_owned());
    }
    let decl = src[word_end..i].trim();
    let end = i + 1;
    if split_top(decl, b',')?.len() > 1 || split_top(decl, b'=')?.len() > 1 {
        return Err(format!(
            "`__shared__ {decl};`: one declarator without initializer per __shared__ declaration, please (the emulator registers it by name)"
        ));
    }
    let db = decl.as_bytes();
    let name_end = decl.find('[').unwrap_or(decl.len());
    let name_end = decl[..name_end].trim_end().len();
    let mut name_start = name_end;
    while name_start > 0 && is_ident(db[name_start - 1]) {
        name_start -= 1;
    }
    let name = &decl[name_start..name_end];
    if name.is_empty() || !is_ident_start(db[name_start]) {
        return Err(format!("cannot find the name in `__shared__ {decl};`"));
    }
    // `extern __shared__`: the rewrite replaces the `extern` too
    let before = src[..start].trim_end();
    let is_extern = before.ends_with("extern")
        && !before[..before.len() - 6]
            .bytes()
            .next_back()
            .is_some_and(is_ident);
    if is_extern {
        let ext = before.len() - 6;
        if ext < copied {
            return Err("`extern` and `__shared__` split across a rewrite".to_owned());
        }
        let ty = decl[..name_start].trim();
        let ty = strip_align(ty);
        if decl[name_end..].replace(char::is_whitespace, "") != "[]" {
            return Err(format!(
                "`extern __shared__ {decl};`: expected an unsized array"
            ));
        }
        return Ok((
            end,
            format!("{ty}* const {name} = reinterpret_cast<{ty}*>(::emu::dynamic_shared());"),
            ext,
        ));
    }
    Ok((
        end,
        format!("static {decl}; static ::emu::SharedRegion emu_shared_region_{name}(&{name}, sizeof({name}));"),
        start,
    ))
}

/// Removes `__align__(n)` / `alignas(n)` from a type (the dynamic area is aligned anyway).
fn strip_align(ty: &str) -> String {
    let mut s = ty.to_owned();
    for kw in ["__align__", "alignas"] {
        while let Some(p) = s.find(kw) {
            let open = p + s[p..].find('(').unwrap_or(kw.len());
            let close = matching(s.as_bytes(), open).map_or(s.len() - 1, |c| c);
            s.replace_range(p..=close, "");
        }
    }
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

// ------------------------------------------------------------------------------------------------
// The rewriting, tested on its own (no compiler needed).
// ------------------------------------------------------------------------------------------------

#[test]
fn translate_rewrites_the_supported_inline_ptx() {
    let src = concat!(
        "float f(float x) {\n",
        "  float r;\n",
        "  asm(\"rsqrt.approx.ftz.f32 %0, %1;\" : \"=f\"(r) : \"f\"(x));\n",
        "  asm volatile(\"rcp.approx.ftz.f64 %0, %1;\"\n",
        "               : \"=d\"(d.y[0]) : \"d\"(bn::b(1, 2)));\n",
        "  __asm__ __volatile__(\"\" ::: \"memory\");\n",
        "  asm volatile(\"\" : \"+f\"(r));\n",
        "  asm(\"mov.u32 %0, %%laneid;\" : \"=r\"(lane));\n",
        "  // asm(\"not code\"); \"asm\"\n",
        "  const char* s = \"asm(\\\"x\\\")\";\n",
        "  return r;\n",
        "}\n"
    );
    let out = translate("k.cu", src).unwrap();
    assert!(out.starts_with("#line 1 \"k.cu\"\n"));
    let body = out.split_once('\n').unwrap().1;
    assert_eq!(
        body.lines().count(),
        src.lines().count(),
        "line numbers kept:\n{body}"
    );
    assert!(
        body.contains("(r) = emu_ptx_rsqrt_approx_ftz_f32((x));"),
        "{body}"
    );
    assert!(
        body.contains("(d.y[0]) = emu_ptx_rcp_approx_ftz_f64((bn::b(1, 2)));"),
        "{body}"
    );
    assert_eq!(body.matches("(void)0;").count(), 2, "{body}");
    assert!(body.contains("(lane) = emu_ptx_sreg_laneid();"), "{body}");
    assert!(
        body.contains("// asm(\"not code\"); \"asm\""),
        "comments untouched"
    );
    assert!(body.contains(r#""asm(\"x\")""#), "strings untouched");
    // the kernels' own asm lines
    let common = fs::read_to_string(Path::new(MANIFEST).join("kernels/common.cuh")).unwrap();
    let out = translate("kernels/common.cuh", &common).unwrap();
    assert_eq!(out.lines().count(), common.lines().count() + 1);
}

#[test]
fn translate_refuses_what_it_cannot_emulate() {
    for bad in [
        "asm(\"mov.u64 %0, %%clock64;\" : \"=l\"(l));",
        "asm(\"mov.b64 {%0, %1}, %2;\" : \"=r\"(lo), \"=r\"(hi) : \"l\"(v));",
        "asm(\"{ .reg .f32 t; add.f32 t, %1, %2; mul.f32 %0, t, t; }\" : \"=f\"(y) : \"f\"(a), \"f\"(b));",
        "asm(\"add.f32 %0, %1, %2;\" : \"=f\"(y) : \"f\"(a));",
        "asm(\"st.global.f32 [%0], %1;\" :: \"l\"(p), \"f\"(v));",
        "asm(\"add.f32 %0, %0, %1;\" : \"+f\"(y) : \"f\"(a));",
        "asm(\"\" : \"=f\"(y));",
        "asm(TEMPLATE : \"=f\"(y) : \"f\"(a));",
        "asm goto(\"bra %l0;\" :::: done);",
    ] {
        let src = format!("void f() {{\n  {bad}\n}}\n");
        let err = translate("k.cu", &src).expect_err(bad);
        assert!(err.starts_with("k.cu:2: "), "{err}");
    }
}

#[test]
fn translate_registers_shared_memory() {
    let src = concat!(
        "template <int N> void f() {\n",
        "  __shared__ float red[N * kWarps];\n",
        "  __shared__ int last_flag;\n",
        "  extern __shared__ __align__(16) unsigned char smem[];\n",
        "}\n",
        "#define DECL \\\n",
        "  __shared__ float m[4]; \\\n",
        "  int z\n",
        "// __shared__ in a comment\n"
    );
    let out = translate("k.cu", src).unwrap();
    let body = out.split_once('\n').unwrap().1;
    assert_eq!(body.lines().count(), src.lines().count(), "{body}");
    assert!(body.contains("static float red[N * kWarps]; static ::emu::SharedRegion emu_shared_region_red(&red, sizeof(red));"), "{body}");
    assert!(body.contains("static int last_flag; static ::emu::SharedRegion emu_shared_region_last_flag(&last_flag, sizeof(last_flag));"));
    assert!(body.contains("  unsigned char* const smem = reinterpret_cast<unsigned char*>(::emu::dynamic_shared());"), "{body}");
    assert!(
        body.contains("emu_shared_region_m(&m, sizeof(m)); \\\n  int z"),
        "{body}"
    );
    assert!(body.contains("// __shared__ in a comment"));
    for bad in [
        "__shared__ float a[4], b[4];",
        "__shared__ int x = 0;",
        "extern __shared__ float s[8];",
    ] {
        let err = translate("k.cu", &format!("void f() {{ {bad} }}\n")).expect_err(bad);
        assert!(err.starts_with("k.cu:1: "), "{err}");
    }
}
