"""What persistent dirty bitmaps cost (issue 12's targets), measured in one process:

- 4 KiB random writes and 1 MiB sequential writes to an image with two enabled bitmaps
  against the same workload on the same image without bitmaps (target: at most 5 % more),
  alternating runs, median of the per-pair ratios;
- storing the bitmaps of a 1 TiB image on close (target: under 0.1 s).

Usage: python bench/bench_bitmaps.py [--pairs N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import qcow2kit


def _make(path: Path, size: int, bitmaps: int) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    for i in range(bitmaps):
        subprocess.run(["qemu-img", "bitmap", "--add", str(path), f"b{i}"], check=True)


def _random_4k(path: Path) -> None:
    rng = random.Random(7)
    block = os.urandom(4096)
    with qcow2kit.open(str(path), "r+") as img:
        span = img.virtual_size // 4096
        for _ in range(4000):
            img.write(rng.randrange(span) * 4096, block)


def _sequential_1m(path: Path) -> None:
    block = os.urandom(1 << 20)
    with qcow2kit.open(str(path), "r+") as img:
        for i in range(256):
            img.write(i << 20, block)


def _timed(fn: Callable[[Path], None], template: Path, work: Path) -> float:
    shutil.copyfile(template, work)
    os.sync()
    t0 = time.perf_counter()
    fn(work)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench-bitmaps-"))
    try:
        plain, marked = tmp / "plain.qcow2", tmp / "marked.qcow2"
        _make(plain, 1 << 30, 0)
        _make(marked, 1 << 30, 2)
        for label, fn in (("4 KiB random writes (4000)", _random_4k),
                          ("1 MiB sequential writes (256 MiB)", _sequential_1m)):
            ratios, with_b, without = [], [], []
            for _ in range(args.pairs):
                a = _timed(fn, plain, tmp / "w.qcow2")
                b = _timed(fn, marked, tmp / "w.qcow2")
                without.append(a)
                with_b.append(b)
                ratios.append(b / a)
            print(f"{label}: without {statistics.median(without):.3f} s, with two bitmaps "
                  f"{statistics.median(with_b):.3f} s, ratio {statistics.median(ratios):.3f} "
                  f"(target <= 1.05)")
        big = tmp / "big.qcow2"
        _make(big, 1 << 40, 2)
        times = []
        for _ in range(args.pairs):
            with qcow2kit.open(str(big), "r+") as img:
                for i in range(0, 1 << 40, 1 << 34):  # scattered dirty granules
                    img.write(i, b"x" * 512)
                t0 = time.perf_counter()
                img.bitmaps.store()
                times.append(time.perf_counter() - t0)
        print(f"store two bitmaps of a 1 TiB image: median {statistics.median(times):.4f} s "
              "(target < 0.1 s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
