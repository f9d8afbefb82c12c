"""convert-to-qcow2 benchmark (issue 3): qcow2kit vs qemu-img convert on the same inputs, in
one run. Each command is a separate process (start-up included); best of --repeat.

    python bench/bench_convert.py [--repeat N] [--dir DIR]

Cases: -O qcow2 of a 1 GiB random raw file and of a 1 GiB half-zero file; -c (zlib, zstd) of
a 256 MiB compressible file. Prints seconds and the ratio ours / qemu-img.
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


def timed(argv: list[str], out: str, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        if os.path.exists(out):
            os.unlink(out)
        os.sync()
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    work = tempfile.mkdtemp(dir=args.dir, prefix="qcow2kit-bench-convert-")
    try:
        rnd = os.path.join(work, "random.raw")
        with open(rnd, "wb") as f:
            for _ in range(1024):
                f.write(os.urandom(M))
        half = os.path.join(work, "half.raw")
        with open(half, "wb") as f:
            for i in range(1024):
                f.write(os.urandom(M) if i % 2 else bytes(M))
        comp = os.path.join(work, "comp.raw")
        r = random.Random(1)
        with open(comp, "wb") as f:
            for _ in range(256):
                f.write(b"".join(bytes([r.randrange(8)]) * 512 for _ in range(2048)))
        out = os.path.join(work, "out.qcow2")
        ours = [sys.executable, "-m", "qcow2kit", "convert", "-q"]
        cases = [
            ("-O qcow2, 1 GiB random", ["-f", "raw", "-O", "qcow2"], rnd),
            ("-O qcow2, 1 GiB half zero", ["-f", "raw", "-O", "qcow2"], half),
            ("-c zlib, 256 MiB", ["-f", "raw", "-O", "qcow2", "-c"], comp),
            ("-c zstd, 256 MiB", ["-f", "raw", "-O", "qcow2", "-c", "-o",
                                   "compression_type=zstd"], comp),
        ]
        print(f"{'case':28s} {'qemu-img':>9s} {'qcow2kit':>9s} {'ratio':>6s}")
        for name, opts, src in cases:
            tq = timed(["qemu-img", "convert", *opts, src, out], out, args.repeat)
            tq_size = os.path.getsize(out)
            to = timed([*ours, *opts, src, out], out, args.repeat)
            subprocess.run(["qemu-img", "compare", "-f", "raw", src, out], check=True,
                           capture_output=True)
            print(f"{name:28s} {tq:8.2f}s {to:8.2f}s {to / tq:6.2f}   "
                  f"(sizes: qemu {tq_size:,}, ours {os.path.getsize(out):,})")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
