#!/usr/bin/env bash
# Regenerates kernels/prebuilt/ (the PTX the crate embeds) from kernels/*.cu. Run it after any
# change to kernels/ and commit kernels/prebuilt/; `--check` only verifies that they match (CI).
#
# The compiler is pinned to NVRTC 12.0 (PTX ISA 8.0) so the PTX loads on every CUDA 12.x and
# 13.x driver; NVIDIA publishes no nvcc executable in its 12.x wheels, but NVRTC is the same
# front end. It is installed from PyPI into .cuda12/ (git-ignored).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/.cuda12"
if [ ! -f "$dest/nvidia/cuda_nvrtc/lib/libnvrtc.so.12" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$dest" \
    'nvidia-cuda-nvrtc-cu12==12.0.140' 'nvidia-cuda-runtime-cu12==12.0.146'
fi
exec python3 "$root/scripts/build-kernels.py" \
  "$dest/nvidia/cuda_nvrtc/lib/libnvrtc.so.12" "$dest/nvidia/cuda_runtime/include" "$@"
