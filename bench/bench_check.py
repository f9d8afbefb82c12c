#!/usr/bin/env python3
"""check benchmark (issue 5): `qcow2kit check` against `qemu-img check` on the same files,
in the same run.

    python3 bench/bench_check.py [--repeat N] [--keep DIR]

Cases:
  sparse 1 TiB image (64 KiB clusters, a few MiB written at both ends)
  fully written 4 GiB image, 64 KiB clusters
  fully written 1 GiB image, 4 KiB clusters
Each check runs as a separate process (start-up included, as a user sees it) with
--output=json; the best of --repeat runs is kept, and both tools must print the same JSON.
Prints seconds for both tools and the ratio ours / qemu-img (<= 1.0 means qcow2kit is at
least as fast). A process of ours pays for the Python interpreter and the numpy import
(about 0.2-0.5 s on a cold-ish machine) before any work, so the table also shows the time of
the check itself, measured in this process (`engine`), and its ratio to qemu-img's whole
run. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1 << 30
OURS = [sys.executable, "-m", "qcow2kit"]


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def timed(argv: list[str], repeat: int) -> tuple[float, str]:
    best = float("inf")
    out = ""
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        best = min(best, time.perf_counter() - t0)
        out = res.stdout
    return best, out


def full_image(d: Path, name: str, size: int, cluster: str) -> Path:
    """A fully allocated image made by qemu-img convert from a raw file of random data."""
    raw = d / f"{name}.raw"
    block = os.urandom(16 << 20)
    with open(raw, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
    path = d / f"{name}.qcow2"
    sh("qemu-img", "convert", "-O", "qcow2", "-o", f"cluster_size={cluster}", str(raw), str(path))
    raw.unlink()
    return path


def make_images(d: Path) -> dict[str, Path]:
    sparse = d / "sparse1t.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", str(sparse), "1T")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 4M", "-c", "write -P 2 1023G 4M",
       "-c", "write -P 3 512G 1M", str(sparse))
    return {
        "sparse 1 TiB, 64K clusters": sparse,
        "full 4 GiB, 64K clusters": full_image(d, "full4g", 4 * GIB, "64k"),
        "full 1 GiB, 4K clusters": full_image(d, "full1g4k", GIB, "4k"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", help="directory for the images (kept afterwards)")
    args = ap.parse_args()
    d = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_check."))
    d.mkdir(parents=True, exist_ok=True)
    try:
        images = make_images(d)
        from qcow2kit.ops.check import check_path

        t_start, _ = timed([*OURS, "--help"], args.repeat)
        print(f"start-up of `python -m qcow2kit --help`: {t_start:.3f} s")
        print(f"{'case':32s} {'qcow2kit':>10s} {'qemu-img':>10s} {'ratio':>7s} "
              f"{'engine':>8s} {'ratio':>7s}")
        for name, path in images.items():
            t_ours, out_ours = timed([*OURS, "check", "--output=json", str(path)], args.repeat)
            t_qemu, out_qemu = timed(["qemu-img", "check", "--output=json", str(path)], args.repeat)
            t_engine = float("inf")
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                check_path(str(path))
                t_engine = min(t_engine, time.perf_counter() - t0)
            same = json.loads(out_ours) == json.loads(out_qemu)
            note = "" if same else "   (JSON DIFFERS)"
            print(f"{name:32s} {t_ours:10.3f} {t_qemu:10.3f} {t_ours / t_qemu:7.2f} "
                  f"{t_engine:8.3f} {t_engine / t_qemu:7.2f}{note}")
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
