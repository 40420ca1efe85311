#!/usr/bin/env bash
# Link stubs for the CUDA libraries that candle's `cuda` feature links (cudarc's dynamic linking):
# libcuda, libnvrtc, libcurand, libcublas, libcublasLt, each a shared library with the real one's
# soname (CUDA 13: what the GPU machine's driver and PyTorch cu130 wheels provide) and an empty
# function for every symbol of that library the already-compiled crates reference. libcudart is
# the real one from the pinned nvcc wheels (scripts/install-nvcc.sh). A binary linked against
# them runs only where the real libraries are found (LD_LIBRARY_PATH on the GPU machine:
# scripts/gpu-remote.sh); here nothing calls them.
#
# Usage: cuda-link-stubs.sh OUT_DIR   (after the crates are compiled into target/release), then
# link with LIBRARY_PATH=OUT_DIR.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$1
mkdir -p "$out"
cudart=$(ls "$root"/.cuda/nvidia/cu13/lib/libcudart.so.13)
ln -sf "$cudart" "$out/libcudart.so"

# Every undefined symbol of the compiled Rust crates and the static libraries build scripts made.
shopt -s nullglob
nm -u "$root"/target/release/deps/*.rlib "$root"/target/release/build/*/out/*.a 2>/dev/null \
  | awk 'NF == 2 && $1 == "U" { print $2 }' | sort -u >"$out/undefined.txt"

stub() { # name soname prefix-regex exclude-regex
  local name=$1 soname=$2 take=$3 skip=$4
  grep -E "$take" "$out/undefined.txt" | { grep -Ev "$skip" || true; } \
    | sed 's/.*/void &(void) {}/' >"$out/$name.c"
  gcc -shared -fPIC -o "$out/lib$name.so" "$out/$name.c" -Wl,-soname,"$soname"
  echo "lib$name.so ($soname): $(wc -l <"$out/$name.c") symbols"
}
stub cuda libcuda.so.1 '^cu[A-Z]' '^$'
stub nvrtc libnvrtc.so.13 '^nvrtc' '^$'
stub curand libcurand.so.10 '^curand' '^$'
stub cublas libcublas.so.13 '^cublas' '^cublasLt'
stub cublasLt libcublasLt.so.13 '^cublasLt' '^$'
