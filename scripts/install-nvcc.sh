#!/usr/bin/env bash
# Installs NVIDIA's nvcc 13.0 wheels from PyPI into .cuda/ (git-ignored) when no nvcc is on this machine.
# Pinned to 13.0: the GPU machines run driver 580 (CUDA 13.0), which rejects PTX from a newer nvcc.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/.cuda"
if [ -x "$dest/nvidia/cu13/bin/nvcc" ]; then
  echo "nvcc already installed: $dest/nvidia/cu13/bin/nvcc"
  exit 0
fi
python3 -m pip install --quiet --disable-pip-version-check --target "$dest" \
  'nvidia-cuda-nvcc==13.0.*' 'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-crt==13.0.*' \
  'nvidia-nvvm==13.0.*' 'nvidia-cuda-cccl==13.0.*'
"$dest/nvidia/cu13/bin/nvcc" --version | tail -n 2
