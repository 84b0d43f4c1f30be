#!/usr/bin/env python3
"""Compile the CUDA C++ that cubecl would compile (written by the `cuda_source` tests of
mamba-kernels, see kernels/src/cube/offline.rs) on a machine without a GPU: NVRTC to PTX with the
options cubecl-cuda uses (sm_90a, -lineinfo, the CUDA and CCCL headers), ptxas -v to SASS
(registers, spills, stack), nvdisasm for the instruction listing, and a count of the global loads,
branches and barriers. Exit status 1 if any file fails to compile.

The tools come from NVIDIA's pip wheels, fetched once (no GPU or CUDA install needed):
    pip download --no-deps -d /tmp/cudapip nvidia-cuda-nvrtc-cu12==12.8.93 \\
        nvidia-cuda-runtime-cu12==12.8.90 nvidia-cuda-cccl-cu12==12.8.90 \\
        nvidia-cuda-nvcc-cu12==12.8.93 nvidia-cuda-nvdisasm
    for f in /tmp/cudapip/*.whl; do unzip -qo "$f" -d /tmp/cudapip/root; done

Usage: scripts/cuda_offline.py [--root /tmp/cudapip/root] [--arch 90a] FILE.cu...
"""
import argparse
import ctypes
import glob
import os
import re
import subprocess
import sys


def find(root, pattern):
    hits = sorted(glob.glob(os.path.join(root, "**", pattern), recursive=True))
    if not hits:
        sys.exit(f"{pattern} not found under {root} (see this script's doc for the wheels)")
    return hits[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=os.environ.get("CUDA_PIP_ROOT", "/tmp/cudapip/root"))
    ap.add_argument("--arch", default="90a")
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    nvrtc = ctypes.CDLL(find(a.root, "libnvrtc.so.1*"))
    ptxas = find(a.root, "ptxas")
    nvdisasm = find(a.root, "nvdisasm")
    # The CUDA headers (runtime wheel), crt/ (nvcc wheel: mma.h includes it), CCCL.
    inc = [os.path.dirname(find(a.root, "cuda_bf16.h")),
           os.path.dirname(os.path.dirname(find(a.root, "crt/mma.h"))),
           os.path.dirname(os.path.dirname(os.path.dirname(find(a.root, "cuda/std/cstdint"))))]
    ok = True
    for path in a.files:
        src = open(path, "rb").read()
        prog = ctypes.c_void_p()
        if nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, path.encode(), 0, None, None) != 0:
            sys.exit("nvrtcCreateProgram failed")
        opts = [f"--gpu-architecture=compute_{a.arch}".encode(), b"-lineinfo"]
        opts += [f"--include-path={d}".encode() for d in inc]
        rc = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        n = ctypes.c_size_t()
        if rc != 0:
            nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
            log = ctypes.create_string_buffer(n.value)
            nvrtc.nvrtcGetProgramLog(prog, log)
            print(f"{path}: NVRTC error {rc}\n{log.value.decode()}")
            ok = False
            continue
        nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(n))
        ptx = ctypes.create_string_buffer(n.value)
        nvrtc.nvrtcGetPTX(prog, ptx)
        stem = path[:-3]
        open(stem + ".ptx", "wb").write(ptx.value)
        r = subprocess.run([ptxas, "-v", f"-arch=sm_{a.arch}", stem + ".ptx", "-o", stem + ".cubin"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{path}: ptxas failed\n{r.stderr}")
            ok = False
            continue
        regs = re.search(r"Used (\d+) registers", r.stderr)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
        sass = subprocess.run([nvdisasm, "-c", stem + ".cubin"], capture_output=True, text=True).stdout
        open(stem + ".sass", "w").write(sass)
        count = lambda op: len(re.findall(op, sass))
        counts = {k: len(re.findall(p, sass)) for k, p in
                  [("LDG", r"LDG"), ("LDG.128", r"LDG[.A-Z0-9]*\.128"), ("BRA", r"\bBRA\b"),
                   ("BAR", r"BAR\.SYNC")]}
        print(f"{os.path.basename(path)}: {regs.group(1) if regs else '?'} registers, spills "
              f"{spill.group(1) + '/' + spill.group(2) if spill else '?'} B, "
              + ", ".join(f"{k} {v}" for k, v in counts.items()))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
