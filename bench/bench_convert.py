"""convert benchmark: qcow2kit vs qemu-img convert on the same inputs, side by side.

    python bench/bench_convert.py [--pairs N] [--dir DIR] [--only NAME ...]

Each command is a separate process (start-up included). The two tools run alternately
(qcow2kit first in even pairs, qemu-img first in odd ones) with os.sync() before every
timed run, so that neither pays for the other's write-back; the figure that counts is the
median of the per-pair ratios qcow2kit / qemu-img (the machine's load changes between
pairs far more than within one). Also prints both tools' median CPU time (user + system).

Cases: -O qcow2 of a 1 GiB random raw file and of a 1 GiB file of alternating 1 MiB data
and zero blocks; -O raw of a 1 GiB fully allocated qcow2; -c (zlib, zstd) of a 256 MiB
compressible file. Every output is checked once with qemu-img compare.
bench/compare.py runs the same convert workloads among all of issue 16's.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

M = 1 << 20
CASES = ("random", "half", "raw", "zlib", "zstd")


def timed(argv: list[str], out: str) -> tuple[float, float]:
    """(wall, CPU) seconds of one run into a fresh output."""
    if os.path.exists(out):
        os.unlink(out)
    os.sync()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime


def make_inputs(work: str, chosen: set[str]) -> dict[str, str]:
    """Build only the inputs the chosen cases read."""
    paths = {name: os.path.join(work, name)
             for name in ("random.raw", "half.raw", "comp.raw", "full.qcow2")}
    if chosen & {"random", "raw"}:
        with open(paths["random.raw"], "wb") as f:
            for _ in range(1024):
                f.write(os.urandom(M))
    if "raw" in chosen:
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2",
                        paths["random.raw"], paths["full.qcow2"]], check=True)
    if "half" in chosen:
        with open(paths["half.raw"], "wb") as f:
            for i in range(1024):
                f.write(os.urandom(M) if i % 2 else bytes(M))
    if chosen & {"zlib", "zstd"}:
        r = random.Random(1)
        with open(paths["comp.raw"], "wb") as f:
            for _ in range(256):
                f.write(b"".join(bytes([r.randrange(8)]) * 512 for _ in range(2048)))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--only", action="append", default=[], choices=CASES,
                    help="run only this case (repeatable)")
    args = ap.parse_args()
    work = tempfile.mkdtemp(dir=args.dir, prefix="qcow2kit-bench-convert-")
    try:
        chosen = set(args.only or CASES)
        p = make_inputs(work, chosen)
        qc = ["-f", "raw", "-O", "qcow2"]
        cases = [
            ("random", "-O qcow2, 1 GiB random", qc, p["random.raw"], "qcow2"),
            ("half", "-O qcow2, 1 GiB half zero", qc, p["half.raw"], "qcow2"),
            ("raw", "-O raw, 1 GiB full qcow2", ["-f", "qcow2", "-O", "raw"], p["full.qcow2"],
             "raw"),
            ("zlib", "-c zlib, 256 MiB", [*qc, "-c"], p["comp.raw"], "qcow2"),
            ("zstd", "-c zstd, 256 MiB", [*qc, "-c", "-o", "compression_type=zstd"],
             p["comp.raw"], "qcow2"),
        ]
        ours = [sys.executable, "-m", "qcow2kit", "convert", "-q"]
        print(f"# {args.pairs} pairs, alternating, os.sync() before each run; load average "
              f"{os.getloadavg()[0]:.2f}")
        print(f"{'case':26s} {'qemu-img':>9s} {'qcow2kit':>9s} {'ratio':>6s} {'range':>11s}  "
              f"{'cpu qemu':>8s} {'cpu ours':>8s}")
        for key, name, opts, src, fmt in cases:
            if key not in chosen:
                continue
            out = os.path.join(work, "out." + fmt)
            tq_argv = ["qemu-img", "convert", "-q", *opts, src, out]
            to_argv = [*ours, *opts, src, out]
            timed(to_argv, out)  # warm the page cache and Python's bytecode cache
            subprocess.run(["qemu-img", "compare", "-q", "-f", opts[1], src, out], check=True)
            q: list[tuple[float, float]] = []
            o: list[tuple[float, float]] = []
            for i in range(args.pairs):
                if i % 2:
                    q.append(timed(tq_argv, out))
                    o.append(timed(to_argv, out))
                else:
                    o.append(timed(to_argv, out))
                    q.append(timed(tq_argv, out))
            ratios = [a[0] / b[0] for a, b in zip(o, q, strict=True)]
            print(f"{name:26s} {statistics.median(t for t, _ in q):8.3f}s "
                  f"{statistics.median(t for t, _ in o):8.3f}s {statistics.median(ratios):6.2f} "
                  f"{min(ratios):5.2f}-{max(ratios):<5.2f}  "
                  f"{statistics.median(c for _, c in q):7.3f}s {statistics.median(c for _, c in o):7.3f}s",
                  flush=True)
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
