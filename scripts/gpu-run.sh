#!/usr/bin/env bash
# Builds the GPU test and benchmark binaries here (a machine with Rust and nvcc, no GPU needed)
# and stages them, with the golden cases and the scripts they need, in .gpu-run/ (git-ignored),
# ready to copy to a GPU machine that has no Rust toolchain. Then run there, from the repo root:
#     bash .gpu-run/run.sh [--quick] [--sanitize] [--bench]
# With the project's device tool: run(command="bash .gpu-run/run.sh --sanitize --bench",
# carry=[".gpu-run"]); results land in $OUT.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
stage=.gpu-run

bash scripts/install-nvcc.sh >/dev/null
export BATCHNORM_REQUIRE_NVCC=1

rm -rf "$stage"
mkdir -p "$stage/tests" "$stage/bench"

# Test binaries (release: a debug one is ~25 MB and what travels is capped at 64 MiB).
cargo test --release --no-run --message-format=json-render-diagnostics \
  | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])
' | while read -r exe; do
    name=$(basename "$exe" | sed 's/-[0-9a-f]\{16\}$//')
    # The ptxas gate and the kernel emulator are CI's (they need this machine's toolchain).
    case "$name" in ptxas_gate|kernel_emulator) continue ;; esac
    cp "$exe" "$stage/tests/$name"
  done

# The GPU benchmark (examples/gpu_bench.rs) and the PyTorch side of the comparison.
if [ -f examples/gpu_bench.rs ]; then
  cargo build --release --example gpu_bench
  cp target/release/examples/gpu_bench "$stage/bench/"
fi
[ -f bench/pytorch_bench.py ] && cp bench/pytorch_bench.py "$stage/bench/"

# Golden cases recorded from PyTorch (../shared does not travel to the GPU machine).
if [ -d ../shared/golden ]; then
  cp -r ../shared/golden "$stage/golden"
fi
cp scripts/gpu-remote.sh "$stage/run.sh"
strip "$stage"/tests/* "$stage"/bench/gpu_bench 2>/dev/null || true

du -sh "$stage"
echo "staged in $stage/. On the GPU machine, from the repo root:"
echo "    bash $stage/run.sh [--quick] [--sanitize] [--bench]"
