#!/usr/bin/env python3
"""Compiles every kernels/*.cu to PTX with NVRTC 12.0 into kernels/prebuilt/, which build.rs embeds.

Called by scripts/build-kernels.sh (which installs the pinned NVRTC). The registry of modules and
entry points is not written here: build.rs reads it from the PTX, as for a local nvcc build.

    build-kernels.py NVRTC_LIB CUDA_INCLUDE [--check]

--check compiles into memory and fails if kernels/prebuilt/ differs from what the sources give.
"""
import concurrent.futures
import ctypes
import lzma
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "kernels"
PREBUILT = KERNELS / "prebuilt"
# compute_80: every GPU from the A100 on JIT-compiles it; PTX ISA 8.0 (NVRTC 12.0) loads on every
# CUDA 12.x and 13.x driver.
OPTIONS = ["--gpu-architecture=compute_80", "-std=c++17", "--generate-line-info"]


def sources_hash():
    """FNV-1a 64 over every kernels/*.cu and *.cuh (name, NUL, bytes, NUL), sorted by name.

    build.rs computes the same to warn when kernels/prebuilt/ is older than the sources."""
    h = 0xCBF29CE484222325
    for path in sorted(KERNELS.iterdir()):
        if path.suffix not in (".cu", ".cuh"):
            continue
        for byte in path.name.encode() + b"\0" + path.read_bytes() + b"\0":
            h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


class Nvrtc:
    def __init__(self, lib_path):
        self.lib = ctypes.CDLL(lib_path)
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
        self.version = f"{major.value}.{minor.value}"

    def compile(self, source, include):
        lib = self.lib
        prog = ctypes.c_void_p()
        name = f"kernels/{source.name}".encode()
        if lib.nvrtcCreateProgram(ctypes.byref(prog), source.read_bytes(), name, 0, None, None):
            sys.exit(f"nvrtcCreateProgram failed on {source}")
        options = [o.encode() for o in OPTIONS + ["-Ikernels", f"-I{include}"]]
        status = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        if status:
            sys.exit(f"NVRTC failed on {source}:\n{log.value.decode()}")
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, ptx)
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
        text = ptx.value.decode()
        # NVRTC writes absolute paths into the line info: make them independent of the checkout.
        text = text.replace(f'"{include}/', '"cuda-include/').replace(f'"{ROOT}/', '"')
        # It numbers call sequences in comments from a counter shared by every compile of the
        # process (whose order the pool does not fix): drop the numbers.
        text = re.sub(r"// callseq \d+", "// callseq", text)
        return text


def manifest(nvrtc_version):
    return "".join(
        f"{key} {value}\n"
        for key, value in [
            ("generator", "scripts/build-kernels.sh (do not edit: run it after changing kernels/)"),
            ("compiler", f"NVRTC {nvrtc_version}"),
            ("options", " ".join(OPTIONS)),
            ("sources-fnv1a64", sources_hash()),
        ]
    )


def main():
    lib_path, include = sys.argv[1], str(Path(sys.argv[2]).resolve())
    check = "--check" in sys.argv[3:]
    os.chdir(ROOT)
    nvrtc = Nvrtc(lib_path)
    sources = sorted(KERNELS.glob("*.cu"))
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        ptx = dict(zip((s.stem for s in sources), pool.map(lambda s: nvrtc.compile(s, include), sources)))
    wanted = {f"{name}.ptx.xz" for name in ptx} | {"manifest.txt"}
    present = {p.name for p in PREBUILT.iterdir()} if PREBUILT.is_dir() else set()
    stale = sorted(present ^ wanted)
    committed = lambda name: lzma.decompress((PREBUILT / f"{name}.ptx.xz").read_bytes()).decode()
    for name, text in ptx.items():
        if f"{name}.ptx.xz" in present and committed(name) == text:
            continue  # keep the committed bytes: another liblzma may compress the same PTX differently
        stale.append(f"{name}.ptx.xz")
        if not check:
            (PREBUILT / f"{name}.ptx.xz").write_bytes(lzma.compress(text.encode(), preset=9 | lzma.PRESET_EXTREME))
    if (PREBUILT / "manifest.txt").is_file() and (PREBUILT / "manifest.txt").read_text() != manifest(nvrtc.version):
        stale.append("manifest.txt")
    if check:
        if stale:
            sys.exit(
                f"kernels/prebuilt/ does not match kernels/ ({', '.join(sorted(set(stale)))}): "
                "run `bash scripts/build-kernels.sh` and commit kernels/prebuilt/"
            )
        print(f"kernels/prebuilt/ matches kernels/ ({len(ptx)} modules, NVRTC {nvrtc.version})")
        return
    PREBUILT.mkdir(exist_ok=True)
    for name in present - wanted:
        (PREBUILT / name).unlink()
    (PREBUILT / "manifest.txt").write_text(manifest(nvrtc.version))
    for name, text in ptx.items():
        packed = (PREBUILT / f"{name}.ptx.xz").stat().st_size
        print(f"{name}: PTX {len(text)} B, xz {packed} B")


if __name__ == "__main__":
    main()
