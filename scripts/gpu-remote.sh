#!/usr/bin/env bash
# Runs on the GPU machine (no cargo there), from the bundle scripts/gpu-run.sh staged and
# .gpu-run/run.sh unpacked. One session has 15 minutes of GPU time in all (machine start
# included, 10 minutes a call, 8 files back), so the work is two prepared calls, each under a
# wall-clock budget it enforces itself (bench/results/README.md gives the plan and its timings):
#
#   bash .gpu-run/run.sh verify     call 1, <= 8 min: the kernels' JIT, every binary that holds
#                                   GPU tests (golden cases included), then the quick benchmark
#                                   beside PyTorch and cuDNN on an otherwise idle GPU
#   bash .gpu-run/run.sh sanitize   call 2, <= 4 min, only on a warm machine with 4 minutes left:
#                                   compute-sanitizer memcheck and racecheck on the key binaries
#
# Options: --only=GLOB (test binaries, e.g. to rerun a failing one), --budget=SECONDS (the call's
# wall-clock budget; parts left when it runs out are reported as not run), --full-bench (verify:
# the whole benchmark suite instead of --quick, for a call of its own).
# What comes back ($OUT, at most 8 files): device.txt and summary.txt (every part's time and
# result) always; verify adds tests.log, bench.log, ours.json, comparison.json and tables.md;
# sanitize adds sanitizer.log.
set -uo pipefail
stage=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$stage/out}
mkdir -p "$out"
plan=${1:-}
case "$plan" in
  verify) budget=450 ;;
  sanitize) budget=210 ;;
  *) echo "usage: run.sh verify|sanitize [--only=GLOB] [--budget=SECONDS] [--full-bench]" >&2; exit 2 ;;
esac
shift
only="" bench_set=--quick
for arg in "$@"; do
  case "$arg" in
    --only=*) only=${arg#--only=} ;;
    --budget=*) budget=${arg#--budget=} ;;
    --full-bench) bench_set="" ;;
    *) echo "unknown argument $arg" >&2; exit 2 ;;
  esac
done
work=$stage/work
rm -rf "$work" && mkdir -p "$work/tests" "$work/bench"

export BATCHNORM_GOLDEN_DIR="$stage/golden" BATCHNORM_REQUIRE_GOLDEN=1 RUST_BACKTRACE=1
# The driver's JIT cache (sm_90 code for the embedded PTX), shared by every binary of both calls
# while the machine stays warm: only the first process pays the JIT.
export CUDA_CACHE_PATH=/tmp/batchnorm-cuda-jit CUDA_CACHE_MAXSIZE=4294967296
summary=$out/summary.txt
failed=0
# Deadlines in seconds since t0 (wall clock, so the parallel test runners below share them),
# which .gpu-run/run.sh sets before it unpacks the bundle.
t0=${BATCHNORM_RUN_T0:-$(date +%s)}
now() { echo $(($(date +%s) - t0)); }
left() { echo $((budget - $(now))); }
note() { echo "$*" | tee -a "$summary"; }

# Runs "$@" with at most $1 seconds (killed after), logging to $2; prints the part's time.
# Returns the command's status, 124 when it ran out of time.
timed() {
  local limit=$1 log=$2 name=$3 start code
  start=$(now)
  shift 3
  if [ "$limit" -le 0 ]; then
    note "$(printf '%-28s NOT RUN (budget spent)' "$name")"
    return 124
  fi
  timeout --kill-after=5 "$limit" "$@" >>"$log" 2>&1
  code=$?
  local status=ok
  [ "$code" = 0 ] || status="FAILED (exit $code)"
  [ "$code" = 124 ] && status="TIMED OUT after ${limit}s"
  note "$(printf '%-28s %4ds  %s  %s' "$name" $(($(now) - start)) "$status" \
    "$(grep -E '^test result' "$log" 2>/dev/null | tail -1 | sed 's/; finished.*//')")"
  return "$code"
}

# libnccl for SyncBatchNorm's NCCL tests: cudarc loads "libnccl.so" (not NCCL's soname
# libnccl.so.2), so link the first one found (PyTorch's nvidia-nccl wheel, then the system's).
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

# CUDA's libraries for the candle-cuda binaries (linked here against stubs with these sonames:
# scripts/cuda-link-stubs.sh): the directories of PyTorch's nvidia wheels that hold them.
cuda_libs=$(python3 - 2>/dev/null <<'PY'
import glob, os, site
names = ["libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libnvrtc.so.13"]
roots = site.getsitepackages() + [site.getusersitepackages()]
dirs = []
for name in names:
    for root in roots:
        found = sorted(glob.glob(os.path.join(root, "nvidia", "**", name), recursive=True))
        if found:
            d = os.path.dirname(found[0])
            if d not in dirs:
                dirs.append(d)
            break
    else:
        dirs = None
        break
print(":".join(dirs) if dirs else "")
PY
)
if [ -n "$cuda_libs" ]; then
  export LD_LIBRARY_PATH="$cuda_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

{
  date -u +%Y-%m-%dT%H:%MZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
    || echo "no nvidia-smi (not a GPU machine?)"
  echo "kernel: $(uname -r) (Firecracker: *-fc-*; gVisor reports 4.4.0, where compute-sanitizer and ncu do not run)"
  echo "libnccl: ${nccl:-not found: the NCCL tests of SyncBatchNorm will fail}"
  echo "CUDA libraries for candle: ${cuda_libs:-not all found: the candle-cuda binaries cannot start}"
  echo "commit: $(cat "$stage/commit.txt" 2>/dev/null || echo unknown)"
  echo "plan: $plan, budget ${budget}s"
} | tee "$out/device.txt"
: >"$summary"
note "$(printf '%-28s %4ds  ok' "unpack the bundle" "$(now)")"

# The staged binaries that hold GPU tests (the CPU-only ones are CI's), in a fixed order.
gpu_binaries=()
for t in "$stage"/tests/${only:-*} "$stage"/candle/${only:-*}; do
  [ -x "$t" ] || continue
  case "$(basename "$t")" in *_bench) continue ;; esac
  if "$t" --list --ignored 2>/dev/null | grep -q ': test$'; then
    gpu_binaries+=("$t")
  elif [ "$(basename "$(dirname "$t")")" = candle ]; then
    note "$(printf '%-28s NOT RUN (cannot start: %s)' "$(basename "$t")" \
      "$("$t" --list 2>&1 | tail -1 | cut -c1-120)")"
    failed=1
  fi
done

if [ "$plan" = verify ]; then
  # 1. JIT: the first context loads (and the driver compiles) every module; timed on its own.
  timed $(( $(left) - 300 )) "$work/tests/jit.log" jit \
    "$stage/tests/gpu_forward" --include-ignored --exact gpu_context_loads_every_kernel --nocapture \
    || failed=1
  # 2. Every GPU test binary, four at a time (16 CPU cores: the CPU reference is the slow part),
  # but gpu_scale, whose out-of-memory test fills the device, alone after them. Each binary gets
  # what is left of the tests' share of the budget (the benchmark keeps its 170 s).
  parallel=() alone=()
  for t in "${gpu_binaries[@]}"; do
    case "$(basename "$t")" in gpu_scale) alone+=("$t") ;; *) parallel+=("$t") ;; esac
  done
  tests_end=$((budget - 170))
  run_binary() {
    local t=$1 name
    name=$(basename "$t")
    timed $((tests_end - $(now))) "$work/tests/$name.log" "$name" "$t" --include-ignored || return 1
  }
  export -f run_binary timed note now
  export work summary tests_end t0
  printf '%s\n' "${parallel[@]}" | xargs -P 4 -I{} bash -c 'run_binary "$1"' _ {} || failed=1
  for t in "${alone[@]}"; do run_binary "$t" || failed=1; done
  for t in jit "${parallel[@]}" "${alone[@]}"; do
    name=$(basename "$t")
    { echo "=== $name"; cat "$work/tests/$name.log" 2>/dev/null; } >>"$out/tests.log"
  done
  note "tests: $(grep -c '^test .* ok$' "$out/tests.log") passed, $(grep -c '^test .* FAILED$' "$out/tests.log") failed"

  # 3. The benchmark on an idle GPU: ours (checked against the CPU reference first), then PyTorch.
  if [ -x "$stage/bench/gpu_bench" ]; then
    timed $(( $(left) - 90 )) "$out/bench.log" "gpu_bench $bench_set" \
      "$stage/bench/gpu_bench" --out "$work/bench" $bench_set || failed=1
    if [ -f "$work/bench/ours.json" ]; then
      timed $(( $(left) - 10 )) "$out/bench.log" "pytorch_bench $bench_set" \
        python3 "$stage/bench/pytorch_bench.py" --ours "$work/bench/ours.json" --out "$work/bench" $bench_set \
        || failed=1
    fi
    for f in ours.json comparison.json; do
      [ -f "$work/bench/$f" ] && cp "$work/bench/$f" "$out/"
    done
    if ls "$work"/bench/*.md >/dev/null 2>&1; then
      cat "$work/bench/ours.md" "$work/bench/comparison.md" >"$out/tables.md" 2>/dev/null
    fi
    grep -E "rows in|geomean" "$out/bench.log" | tee -a "$summary"
  fi
  # candle-nn's BatchNorm against the adapter inside candle (examples/candle_bench.rs).
  if [ -x "$stage/candle/candle_bench" ]; then
    timed $(( $(left) - 5 )) "$out/candle_bench.log" candle_bench "$stage/candle/candle_bench" 32 256 56 56 20 \
      || failed=1
    cat "$out/candle_bench.log" >>"$out/bench.log"
    rm -f "$out/candle_bench.log"
  fi
else
  # compute-sanitizer (10-100x slower): the binaries whose kernels hold the split reductions and
  # the fused passes, few property cases, not the tests of 2^31 elements or the one that fills
  # the device (its memory is what the sanitizer's own allocations need). Half the budget a tool.
  export PROPTEST_CASES=4
  command -v compute-sanitizer >/dev/null || { note "compute-sanitizer not found on PATH"; exit 1; }
  key=(gpu_forward gpu_backward gpu_fused gpu_concurrency gpu_norms)
  [ -n "$only" ] && key=("${gpu_binaries[@]##*/}")
  for tool in memcheck racecheck; do
    tool_end=$(($(now) + ($(left) - 10) / 2))
    [ "$tool" = racecheck ] && tool_end=$((budget - 10))
    for name in "${key[@]}"; do
      { echo "=== $tool $name"; } >>"$out/sanitizer.log"
      timed $((tool_end - $(now))) "$out/sanitizer.log" "$tool $name" \
        compute-sanitizer --tool "$tool" --error-exitcode 9 "$stage/tests/$name" --include-ignored \
        --skip more_than_2_31_elements --skip failed_allocations_are_errors || failed=1
    done
  done
  # "Device not supported": this machine's runtime refuses the sanitizer (not a kernel bug).
  grep -E "(ERROR|RACECHECK) SUMMARY|Device not supported" "$out/sanitizer.log" | sort | uniq -c | tee -a "$summary"
fi
note "GPU run ($plan) finished in $(now)s of ${budget}s; failures: $failed"
exit $failed
