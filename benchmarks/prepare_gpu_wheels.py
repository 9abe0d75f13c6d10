#!/usr/bin/env python
"""Download the wheels the GPU machine lacks (gguf, bitsandbytes) into the ignored folder `.whl/`, so that
`benchmarks/gpu_check.sh` can install them there offline (the machine reaches no package registry).

    python benchmarks/prepare_gpu_wheels.py            # .whl/: gguf + a slimmed bitsandbytes (~7 MiB in all)
    python benchmarks/prepare_gpu_wheels.py --full     # the unmodified bitsandbytes wheel (41 MiB)

Target: CPython 3.12, manylinux x86-64 (the GPU machine: torch 2.11+cu130). The versions are the ones this repo's
tests run against. bitsandbytes' wheel carries one native library per CUDA / ROCm / XPU toolkit (41 MiB); torch cu130
loads only `libbitsandbytes_cuda130.so`, so by default the wheel is rewritten keeping the CUDA 13.x and CPU libraries
(its RECORD updated to match): about 7 MiB instead of 41 MiB. `--full` keeps the original file.
Then checks what would travel to the device machine (tracked + untracked-not-ignored files + `.whl/`) stays under the
64 MiB limit, and prints the `run` call (see the header of benchmarks/gpu_check.sh).
"""
from __future__ import annotations

import argparse
import base64
import glob
import hashlib
import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEELS = {"bitsandbytes": "0.50.2", "gguf": "0.19.0"}  # the versions the tests use; their deps are on the machine
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "any"]
KEEP_LIBS = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so")
LIMIT = 64 * 2 ** 20


def download(dest: str) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "-d", dest]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    cmd += [f"{n}=={v}" for n, v in WHEELS.items()]
    subprocess.run(cmd, check=True)
    return sorted(glob.glob(os.path.join(dest, "*.whl")))


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def slim_bitsandbytes(path: str) -> tuple[int, int]:
    """Rewrite the wheel without the native libraries torch cu130 never loads; returns (bytes before, after)."""
    before = os.path.getsize(path)
    tmp = path + ".tmp"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        names = src.namelist()
        drop = {n for n in names if os.path.basename(n).startswith("libbitsandbytes_")
                and os.path.basename(n) not in KEEP_LIBS}
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        for n in names:
            if n in drop or n == record:
                continue
            dst.writestr(src.getinfo(n), src.read(n))
        lines = [ln for ln in src.read(record).decode().splitlines() if ln and ln.split(",")[0] not in drop]
        dst.writestr(record, "\n".join(lines) + "\n")
    os.replace(tmp, path)
    return before, os.path.getsize(path)


def travelling_bytes(extra_dir: str) -> int:
    """Bytes the device tool would send: tracked + untracked-not-ignored files, plus the carried folder."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                         check=True).stdout.decode().split("\0")
    total = sum(os.path.getsize(os.path.join(ROOT, f)) for f in out if f and os.path.isfile(os.path.join(ROOT, f)))
    return total + sum(os.path.getsize(f) for f in glob.glob(os.path.join(extra_dir, "*")))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", default=os.path.join(ROOT, ".whl"), help="wheel folder (must be git-ignored)")
    ap.add_argument("--full", action="store_true", help="keep the bitsandbytes wheel unmodified (41 MiB)")
    a = ap.parse_args(argv)
    os.makedirs(a.dest, exist_ok=True)
    if subprocess.run(["git", "check-ignore", "-q", a.dest], cwd=ROOT).returncode != 0:
        raise SystemExit(f"{a.dest} is not git-ignored; add it to .gitignore (it must travel only through `carry`)")
    for old in glob.glob(os.path.join(a.dest, "*.whl")):  # one version of each: two would stop the install
        os.remove(old)
    wheels = download(a.dest)
    for w in wheels:
        if os.path.basename(w).startswith("bitsandbytes-") and not a.full:
            b, s = slim_bitsandbytes(w)
            print(f"slimmed {os.path.basename(w)}: {b / 2**20:.1f} MiB -> {s / 2**20:.1f} MiB (kept {KEEP_LIBS})")
    for w in wheels:
        print(f"{os.path.getsize(w) / 2**20:8.2f} MiB  {os.path.relpath(w, ROOT)}")
    total = travelling_bytes(a.dest)
    print(f"travelling tree with the wheels: {total / 2**20:.1f} MiB (limit {LIMIT / 2**20:.0f} MiB)")
    if total > LIMIT:
        print("over the limit: use the slimmed wheel (drop --full) or carry less", file=sys.stderr)
        return 1
    rel = os.path.relpath(a.dest, ROOT)
    print(f'device call: run(command="bash benchmarks/gpu_check.sh", carry=["{rel}"], timeout_s=580)')
    return 0


if __name__ == "__main__":
    sys.exit(main())
