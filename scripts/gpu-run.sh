#!/usr/bin/env bash
# Builds the GPU test and benchmark binaries here (a machine with Rust and nvcc, no GPU needed)
# and stages them, with the golden cases and the scripts they need, in .gpu-run/ (git-ignored),
# ready to copy to a GPU machine that has no Rust toolchain. Then run there, from the repo root,
# the two calls of bench/results/README.md's plan (scripts/gpu-remote.sh says what each does):
#     bash .gpu-run/run.sh verify      then, if the machine is warm and 4 minutes are left,
#     bash .gpu-run/run.sh sanitize
# With the project's device tool: run(command="bash .gpu-run/run.sh verify", carry=[".gpu-run"],
# timeout_s=540); results land in $OUT, and scripts/record-gpu-run.py records them.
# Every binary embeds the PTX (~12 MB; the candle ones also candle's kernels), so the staged files
# (~840 MB) are packed into one xz archive (~29 MB; what a device call carries is capped at
# 64 MiB; building it takes ~25 minutes on 2 cores), which
# .gpu-run/run.sh unpacks with Python's lzma (no xz binary needed there) before running.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
stage=target/gpu-stage
bundle=.gpu-run

bash scripts/install-nvcc.sh >/dev/null
export BATCHNORM_REQUIRE_NVCC=1

rm -rf "$stage" "$bundle"
mkdir -p "$stage/tests" "$stage/bench" "$bundle"

# Test binaries (release: a debug one is ~25 MB and what travels is capped at 64 MiB), but the
# ptxas gate and the kernel emulator: they are CI's (they need this machine's toolchain).
cargo test --release --no-run --message-format=json-render-diagnostics \
  | python3 scripts/test-executables.py --skip ptxas_gate kernel_emulator \
  | while read -r exe; do
    cp "$exe" "$stage/tests/$(basename "$exe" | sed 's/-[0-9a-f]\{16\}$//')"
  done

# gpu_sync again with the `nccl` feature (its plain tests plus SyncBatchNorm over NCCL), in place
# of the plain build. gpu-remote.sh finds libnccl on the GPU machine (PyTorch's wheel ships it).
cargo test --release --features nccl --test gpu_sync --no-run \
  --message-format=json-render-diagnostics | python3 scripts/test-executables.py \
  | while read -r exe; do cp "$exe" "$stage/tests/gpu_sync"; done

# The candle adapter's tests and benchmark with its CUDA path (feature candle-cuda). candle
# compiles its kernels with nvcc for sm_90 (H100, H200) and links CUDA's libraries (libcuda,
# cudart, cublas, cublasLt, curand, nvrtc), which this machine lacks: compile the crates first,
# then link against stubs with the real sonames (scripts/cuda-link-stubs.sh). gpu-remote.sh
# puts the real ones (PyTorch's nvidia wheels) on LD_LIBRARY_PATH for these binaries only.
candle_env=(env PATH="$root/.cuda/nvidia/cu13/bin:$PATH" CUDA_COMPUTE_CAP=90)
"${candle_env[@]}" cargo build --release --features candle-cuda --lib
bash scripts/cuda-link-stubs.sh target/cuda-link-stubs
mkdir -p "$stage/candle"
"${candle_env[@]}" LIBRARY_PATH="$root/target/cuda-link-stubs" \
  cargo test --release --features candle-cuda --test candle --test candle_norms --no-run \
  --message-format=json-render-diagnostics | python3 scripts/test-executables.py \
  | while read -r exe; do
    cp "$exe" "$stage/candle/$(basename "$exe" | sed 's/-[0-9a-f]\{16\}$//')"
  done
"${candle_env[@]}" LIBRARY_PATH="$root/target/cuda-link-stubs" \
  cargo build --release --features candle-cuda --example candle_bench
cp target/release/examples/candle_bench "$stage/candle/"

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
cp scripts/gpu-remote.sh "$stage/run-staged.sh"
# The commit the binaries are built from (and whether the tree had uncommitted changes).
echo "$(git rev-parse HEAD)$(git diff --quiet HEAD || echo ' + uncommitted changes')" >"$stage/commit.txt"
strip "$stage"/tests/* "$stage"/candle/* "$stage"/bench/gpu_bench 2>/dev/null || true

# xz -9 single-threaded: its 64 MiB window spans several binaries, whose embedded PTX is the same.
tar -cf - -C "$stage" . | xz -9 -T1 > "$bundle/bundle.tar.xz"
cat > "$bundle/run.sh" <<'LAUNCHER'
#!/usr/bin/env bash
# Unpacks the staged bundle and runs scripts/gpu-remote.sh from it; arguments pass through.
set -euo pipefail
# The call's budget counts from here: the unpacking is part of it.
export BATCHNORM_RUN_T0=$(date +%s)
here=$(cd "$(dirname "$0")" && pwd)
dest=${BATCHNORM_GPU_STAGE:-/tmp/batchnorm-gpu-run}
rm -rf "$dest" && mkdir -p "$dest"
python3 - "$here/bundle.tar.xz" "$dest" <<'PY'
import sys, tarfile
with tarfile.open(sys.argv[1]) as archive:
    kwargs = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
    archive.extractall(sys.argv[2], **kwargs)
PY
exec bash "$dest/run-staged.sh" "$@"
LAUNCHER

du -sh "$stage" "$bundle"
echo "staged in $bundle/ (carry it). On the GPU machine, from the repo root:"
echo "    bash $bundle/run.sh verify     (then, warm and with 4 minutes left: bash $bundle/run.sh sanitize)"
