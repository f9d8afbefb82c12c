"""Shrink benchmark: qcow2kit vs qemu-img resize --shrink on copies of the same image, in one
run. Prints time ratio (ours / qemu), fdatasync counts (strace) and final file sizes.

    python bench/bench_shrink.py [--workdir DIR] [--quick]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

M = 1 << 20
G = 1 << 30


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def run_case(work: str, name: str, make: list[list[str]], new_size: str) -> None:
    base = os.path.join(work, f"{name}.qcow2")
    for cmd in make:
        sh(*[c.replace("IMG", base) for c in cmd])
    results = {}
    for tool in ("qemu", "ours"):
        for mode in ("time", "strace"):
            img = os.path.join(work, f"{name}-{tool}.qcow2")
            shutil.copyfile(base, img)
            os.sync()  # neither tool should pay for writing back the copy
            if tool == "qemu":
                argv = ["qemu-img", "resize", "-q", "--shrink", img, new_size]
            else:
                argv = [sys.executable, "-m", "qcow2kit", "resize", "-q", "--shrink", img, new_size]
            if mode == "time":
                t0 = time.perf_counter()
                sh(*argv)
                elapsed = time.perf_counter() - t0
                size = os.path.getsize(img)
            else:
                trace = img + ".strace"
                sh("strace", "-f", "-c", "-o", trace, "-e", "trace=fdatasync,fsync", *argv)
                syncs = 0
                for line in open(trace):
                    parts = line.split()
                    if parts and parts[-1] in ("fdatasync", "fsync"):
                        syncs += int(parts[3])
            os.unlink(img)
        results[tool] = (elapsed, syncs, size)
    q, o = results["qemu"], results["ours"]
    print(f"{name:28s} time qemu {q[0]:7.3f}s ours {o[0]:7.3f}s ratio {o[0] / q[0]:5.2f} | "
          f"fdatasync qemu {q[1]:5d} ours {o[1]:3d} | size qemu {q[2]:>11,} ours {o[2]:>11,}")
    os.unlink(base)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--quick", action="store_true", help="smaller fully-written image")
    args = ap.parse_args()
    work = tempfile.mkdtemp(dir=args.workdir, prefix="qcow2kit-bench-")
    try:
        run_case(work, "sparse 1T (1M data) -> 1G", [
            ["qemu-img", "create", "-q", "-f", "qcow2", "IMG", "1T"],
            ["qemu-io", "-c", "write -P 1 0 512K", "-c", "write -P 2 1023G 512K", "IMG"],
        ], "1G")
        full = "1G" if args.quick else "4G"
        run_case(work, f"full {full} -> {'256M' if args.quick else '1G'}", [
            ["qemu-img", "create", "-q", "-f", "qcow2", "IMG", full],
            ["qemu-io", *sum((["-c", f"write -P 3 {i}G 1G"] for i in range(int(full[0]))), []),
             "IMG"],
        ], "256M" if args.quick else "1G")
        offs = list(range(0, 128 * M, 16 * M))
        random.Random(163).shuffle(offs)
        run_case(work, "163 random 128M -> 10M", [
            ["qemu-img", "create", "-q", "-f", "qcow2", "IMG", "128M"],
            ["qemu-io", *sum((["-c", f"write -P 255 {o} 16M"] for o in offs), []), "IMG"],
        ], "10M")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
