#!/usr/bin/env bash
# Runs the tests (GPU ones included) and the main example on the EMULATED CUDA driver, on a
# machine without a GPU (this one, CI). tests/emulator/driver.cpp and the kernels, compiled for
# the CPU, stand in for libcuda: the crate's own GPU code (cudarc, launchers, layer) and the GPU tests run unchanged,
# the kernels on the fiber emulator of tests/emulator/emu.h. It checks everything except what
# only silicon can show: real timing, real memory ordering between blocks, MUFU accuracy, and
# the driver's own JIT. It is NOT a GPU run: scripts/gpu-run.sh is. The tests run twice: with
# allocations aligned as cudaMalloc aligns them, then ending at guard pages (reads past the end).
#
#     bash scripts/emulated-gpu.sh [test-name filter ...]
#
# Also SyncBatchNorm over the emulated NCCL (tests/emulator/nccl.cpp; `--features nccl`), ranks
# as threads on three emulated devices. Too large for the CPU, skipped here: gpu_scale's
# more_than_2_31_elements_* (2^31 f16 values).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

bash scripts/install-nvcc.sh >/dev/null
export BATCHNORM_REQUIRE_NVCC=1
driver_dir="$root/target/emulated-driver"
logs="$root/target/emulated-gpu-logs"
rm -rf "$logs" && mkdir -p "$logs"

# The driver: tests/kernel_emulator.rs builds libcuda.so.1 from driver.cpp and the kernels.
BATCHNORM_EMU_DRIVER_OUT="$driver_dir" cargo test --release --test kernel_emulator \
  emulated_driver_builds -- --nocapture 2>&1 | grep -E "emulated CUDA driver|test result"

# Every test binary (several hold GPU tests beside CPU ones) but the CPU-only gates and the
# plain gpu_sync, run below with the nccl feature.
mapfile -t binaries < <(cargo test --release --no-run --message-format=json-render-diagnostics \
  | python3 scripts/test-executables.py --skip ptxas_gate kernel_emulator gpu_sync)
[ "${#binaries[@]}" -gt 0 ] || { echo "no test binaries were built" >&2; exit 1; }
cargo build --release --example train_resnet_stage --example gpu_bench 2>/dev/null
# SyncBatchNorm's NCCL path (feature `nccl`) on the emulated NCCL beside the driver.
nccl_sync=$(cargo test --release --features nccl --test gpu_sync --no-run \
  --message-format=json-render-diagnostics | python3 scripts/test-executables.py)

export LD_LIBRARY_PATH="$driver_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# 2 GiB of emulated device memory: the out-of-memory test fills it. Three devices: NCCL ranks
# need one each.
export EMU_DEVICE_MEMORY_MB=2048 EMU_DEVICE_COUNT=3

failed=()
# Twice: allocations aligned to 256 bytes between red zones (as cudaMalloc aligns them), then
# ending at an inaccessible page (EMU_GUARD_PAGES=1), which turns a read past the end of any
# buffer into a crash that names the launch; gpu_scale's out-of-memory test runs once.
for guard in 0 1; do
  for exe in "${binaries[@]}" "$nccl_sync"; do
    name=$(basename "$exe" | sed 's/-[0-9a-f]\{16\}$//')
    [ "$guard" = 1 ] && { [ "$name" = gpu_scale ] && continue; name="$name+guard"; }
    start=$SECONDS
    if EMU_GUARD_PAGES=$guard "$exe" --include-ignored --skip more_than_2_31_elements "$@" \
      >"$logs/$name.log" 2>&1; then
      status=ok
    else
      status=FAILED
      failed+=("$name")
    fi
    printf '%-20s %-6s %4ds  %s\n' "$name" "$status" $((SECONDS - start)) \
      "$(grep -E '^test result' "$logs/$name.log" | tail -1)"
  done
done

# The single-pass forward's fallback: with every cooperative launch refused (as by a device whose
# SMs cannot all hold the grid, or one without cooperative launches), its tests must pass through
# the two passes, and the driver must have refused launches (it counts them at exit).
if [ $# -eq 0 ]; then
  for mode in too-large unsupported; do
    for exe in "${binaries[@]}"; do
      name=$(basename "$exe" | sed 's/-[0-9a-f]\{16\}$//')
      case "$name" in gpu_forward | gpu_golden | gpu_graph) ;; *) continue ;; esac
      log="$logs/$name+refused-$mode.log"
      if EMU_COOPERATIVE=$mode "$exe" --include-ignored single_pass >"$log" 2>&1 &&
        grep -Eq '^emulated driver: [1-9][0-9]* cooperative launches refused' "$log"; then
        status=ok
      else
        status=FAILED
        failed+=("$name+refused-$mode")
      fi
      printf '%-20s %-6s %s; %s\n' "$name" "$status" "$(grep -E '^test result' "$log" | tail -1)" \
        "$(grep -Eo '[0-9]+ cooperative launches refused' "$log")"
    done
  done

  if target/release/examples/train_resnet_stage >"$logs/train_resnet_stage.log" 2>&1; then
    echo "main example         ok     $(tail -1 "$logs/train_resnet_stage.log")"
  else
    failed+=(train_resnet_stage)
    echo "main example         FAILED $(tail -1 "$logs/train_resnet_stage.log")"
  fi
  # The benchmark harness on a few rows (its timings mean nothing here; its checks do).
  # (the quick set's shapes are too large for the emulator: rows of the full suite, every op
  # of an odd-C shape and one CUDA-graph row).
  if target/release/examples/gpu_bench --filter /f16/1024x33/,bn_fwd_graph/f16/8x64x14x14/channels_last --out "$logs/bench" \
    >"$logs/gpu_bench.log" 2>&1; then
    echo "gpu_bench            ok     $(grep -E 'rows in' "$logs/gpu_bench.log")"
  else
    failed+=(gpu_bench)
    echo "gpu_bench            FAILED $(tail -1 "$logs/gpu_bench.log")"
  fi
  # The suites without a GPU (--dry-run), full and quick, and the PyTorch side's suite and
  # table code checked against each (--self-test: fake timings, no torch needed).
  for set in full quick; do
    flag=""
    [ "$set" = quick ] && flag=--quick
    if target/release/examples/gpu_bench --dry-run $flag --out "$logs/dry-$set" >"$logs/dry-$set.log" 2>&1 &&
      python3 bench/pytorch_bench.py --self-test --ours "$logs/dry-$set/ours.json" >>"$logs/dry-$set.log" 2>&1; then
      echo "bench suites ($set)   ok     $(tail -1 "$logs/dry-$set.log")"
    else
      failed+=("dry-$set")
      echo "bench suites ($set)   FAILED $(tail -1 "$logs/dry-$set.log")"
    fi
  done
fi

echo "logs: $logs"
if [ "${#failed[@]}" -gt 0 ]; then
  for name in "${failed[@]}"; do
    echo "---- $name ----"
    grep -E -A30 '^failures:|FAILED|EMULATED DRIVER' "$logs/$name.log" | head -80
  done
  echo "EMULATED GPU RUN FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "Emulated GPU run passed. This was the CPU emulator of the driver and kernels, NOT a GPU."
