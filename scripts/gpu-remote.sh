#!/usr/bin/env bash
# Runs on the GPU machine (no cargo there): every staged test binary with the GPU tests included,
# optionally under compute-sanitizer, and the benchmark comparison with PyTorch. Staged by
# scripts/gpu-run.sh into .gpu-run/bundle.tar.xz and started by .gpu-run/run.sh, which unpacks it.
# Logs go to $OUT (or out/ beside this script).
#   bash .gpu-run/run.sh [--no-tests] [--sanitize[=memcheck,racecheck,...]] [--only=GLOB]
#                        [--bench] [--quick]
# --only=GLOB picks the staged test binaries (default: every one for the tests, the gpu_* ones
# for the sanitizer). One device call is limited to 10 minutes: split tests, sanitizer tools
# and bench over calls, e.g. --no-tests --sanitize=memcheck,initcheck then =racecheck,synccheck.
set -uo pipefail
stage=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$stage/out}
mkdir -p "$out"
tests=1 sanitize=0 bench=0 quick=0 tools="memcheck racecheck initcheck synccheck" only=""
for arg in "$@"; do
  case "$arg" in
    --no-tests) tests=0 ;;
    --sanitize) sanitize=1 ;;
    --sanitize=*) sanitize=1 tools=${arg#--sanitize=} tools=${tools//,/ } ;;
    --only=*) only=${arg#--only=} ;;
    --bench) bench=1 ;;
    --quick) quick=1 ;;
    *) echo "unknown argument $arg" >&2; exit 2 ;;
  esac
done
export BATCHNORM_GOLDEN_DIR="$stage/golden"
export RUST_BACKTRACE=1
[ "$quick" = 1 ] && export PROPTEST_CASES=16

# libnccl for SyncBatchNorm's NCCL tests: cudarc loads "libnccl.so" (not NCCL's soname
# libnccl.so.2), so link the first one found (PyTorch's nvidia-nccl wheel, then the system's).
# (nvidia/nccl/lib/ in the cu12 wheels; the cu13 ones may nest it deeper: search nvidia/ whole.)
nccl=$(python3 - 2>/dev/null <<'PY'
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
for root in roots:
    found = sorted(glob.glob(os.path.join(root, "nvidia", "**", "libnccl.so.2"), recursive=True))
    found += sorted(glob.glob(os.path.join(root, "torch", "lib", "libnccl.so*")))
    if found:
        print(found[0])
        break
PY
)
[ -n "$nccl" ] || nccl=$(ls /usr/lib/x86_64-linux-gnu/libnccl.so.2 /usr/local/lib/libnccl.so.2 2>/dev/null | head -1)
if [ -n "$nccl" ] && [ -f "$nccl" ]; then
  mkdir -p "$stage/nccl" && ln -sf "$nccl" "$stage/nccl/libnccl.so"
  export LD_LIBRARY_PATH="$stage/nccl${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

{
  date -u +%Y-%m-%dT%H:%MZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  echo "kernel: $(uname -r) (Firecracker: *-fc-*; gVisor reports 4.4.0, where compute-sanitizer and ncu do not run)"
  echo "libnccl: ${nccl:-not found: the NCCL tests of SyncBatchNorm will fail}"
  echo "commit: $(cat "$stage/commit.txt" 2>/dev/null || echo unknown)"
} | tee "$out/device.txt"

failed=0
if [ "$tests" = 1 ]; then
  for t in "$stage"/tests/${only:-*}; do
    echo "=== $(basename "$t")" | tee -a "$out/tests.log"
    "$t" --include-ignored --test-threads=1 2>&1 | tee -a "$out/tests.log"
    [ "${PIPESTATUS[0]}" = 0 ] || failed=1
  done
  grep -E "^test result|^=== " "$out/tests.log" > "$out/tests-summary.txt"
fi

if [ "$sanitize" = 1 ]; then
  # A smaller set under the sanitizer (10-100x slower): few property cases, not the two tests
  # of more than 2^31 elements (too slow there), and not the out-of-memory test, which fills the
  # device's memory that the sanitizer's own allocations need. The plain test run covers them.
  export PROPTEST_CASES=8
  for tool in $tools; do
    for t in "$stage"/tests/${only:-gpu_*}; do
      echo "=== $tool $(basename "$t")" | tee -a "$out/sanitizer.log"
      compute-sanitizer --tool "$tool" --error-exitcode 9 "$t" --include-ignored --test-threads=1 \
        --skip more_than_2_31_elements --skip failed_allocations_are_errors >>"$out/sanitizer.log" 2>&1
      code=$?
      echo "exit $code" | tee -a "$out/sanitizer.log"
      [ "$code" = 0 ] || failed=1
    done
  done
  # "Device not supported": this machine's runtime refuses the sanitizer (not a kernel bug).
  grep -E "^=== |^exit |ERROR SUMMARY|Device not supported" "$out/sanitizer.log" > "$out/sanitizer-summary.txt"
fi

if [ "$bench" = 1 ] && [ -x "$stage/bench/gpu_bench" ]; then
  # --quick benchmarks a small subset; PyTorch times the rows of ours.json (its own copy of the
  # suite, quick or not, only when gpu_bench wrote none).
  bench_quick=""
  [ "$quick" = 1 ] && bench_quick=--quick
  "$stage/bench/gpu_bench" --out "$out" $bench_quick 2>&1 | tee "$out/bench.log"
  [ "${PIPESTATUS[0]}" = 0 ] || failed=1  # a row that errored or failed its reference check
  if [ -f "$stage/bench/pytorch_bench.py" ]; then
    python3 "$stage/bench/pytorch_bench.py" --ours "$out/ours.json" --out "$out" $bench_quick 2>&1 \
      | tee -a "$out/bench.log"
  fi
fi
echo "GPU run finished; failures: $failed"
exit $failed
