#!/usr/bin/env bash
# Records a GPU run in bench/results/YYYY-MM-DD-<gpu>/: give it the output folders of the device
# calls of one session (the `files_at` of each `bash .gpu-run/run.sh ...` call: tests, sanitizer
# tools, bench), in the order they ran. It copies what scripts/gpu-remote.sh and the benchmark wrote,
# concatenating the logs and summaries of several calls, and writes run.txt: the date, the
# device and driver, the commit the binaries were built from, and each call's summary lines.
#     bash scripts/record-gpu-run.sh [--dest DIR] OUT_DIR [OUT_DIR ...]
# Then commit the folder and put the table's headline numbers in README's Results.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=""
if [ "${1:-}" = --dest ]; then
  dest=$2
  shift 2
fi
[ $# -gt 0 ] || { echo "usage: $0 [--dest DIR] OUT_DIR [OUT_DIR ...]" >&2; exit 2; }

device_file=""
for dir in "$@"; do
  if [ -f "$dir/device.txt" ]; then
    device_file="$dir/device.txt"
    break
  fi
done
[ -n "$device_file" ] || { echo "no device.txt in $*: not the output of gpu-remote.sh" >&2; exit 1; }
date=$(head -1 "$device_file" | cut -c1-10)
gpu=$(sed -n 2p "$device_file" | cut -d, -f1 | tr 'A-Z ' 'a-z-' | tr -cd 'a-z0-9-')
dest=${dest:-$root/bench/results/$date-${gpu:-unknown-gpu}}
mkdir -p "$dest"

# device.txt: date, nvidia-smi's GPU line, the kernel (runtime), libnccl, and the commit gpu-run.sh built from.
{
  cat "$device_file"
  echo
} >"$dest/run.txt"
for dir in "$@"; do
  # Single files: the last call that wrote one wins (a session benchmarks once).
  for f in device.txt ours.json ours.md comparison.json comparison.md; do
    if [ -f "$dir/$f" ]; then cp "$dir/$f" "$dest/$f"; fi
  done
  # Logs and summaries: every call's, in the order given.
  for f in tests.log tests-summary.txt sanitizer.log sanitizer-summary.txt bench.log; do
    if [ -f "$dir/$f" ]; then cat "$dir/$f" >>"$dest/$f"; fi
  done
  {
    echo "call $(basename "$dir"):"
    cat "$dir/tests-summary.txt" "$dir/sanitizer-summary.txt" 2>/dev/null | sed 's/^/  /' || true
    if [ -f "$dir/bench.log" ]; then grep -E "rows in|geomean|speedup" "$dir/bench.log" | sed 's/^/  /' || true; fi
  } >>"$dest/run.txt"
done
echo "recorded in $dest:"
ls "$dest"
