#!/usr/bin/env python3
"""Sequential-write benchmark (issue 3): 1 MiB writes through the qcow2kit API against
`qemu-img bench -w` writing the same total with the same request size, in the same run.

    python3 bench/bench_write.py [--total-mib N] [--cluster-size BYTES] [--repeat N] [--dir DIR]

Both sides start from a fresh empty image made by `qemu-img create` and end with the image
closed (flushed and fdatasync'ed). qemu-img runs with cache=writeback (the page cache, as our
FileStorage uses) at queue depth 1 (one request at a time, like a loop of img.write) and at
its default depth 64. Ours is timed in this process (no interpreter start-up); qemu-img as a
whole process. The best of --repeat runs is kept. Prints seconds, MiB/s and the ratio
ours / qemu-img (<= 1.0 means qcow2kit is at least as fast). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import qcow2kit  # noqa: E402

MIB = 1 << 20


def fresh(path: Path, size: int, cluster_size: int) -> None:
    if path.exists():
        path.unlink()
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}",
         str(path), str(size)],
        check=True,
    )


def ours(path: Path, total_mib: int) -> float:
    buf = b"\xa5" * MIB
    t0 = time.perf_counter()
    with qcow2kit.open(str(path), "r+") as img:
        for i in range(total_mib):
            img.write(i * MIB, buf)
    return time.perf_counter() - t0


def qemu(path: Path, total_mib: int, depth: int) -> float:
    argv = ["qemu-img", "bench", "-q", "-w", "-f", "qcow2", "-t", "writeback", "-c", str(total_mib),
            "-s", "1M", "-d", str(depth), "--pattern=165", str(path)]
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--total-mib", type=int, default=512)
    ap.add_argument("--cluster-size", type=int, default=65536)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to put the images (default: a temp dir)")
    args = ap.parse_args()
    if shutil.which("qemu-img") is None:
        sys.exit("qemu-img is required")
    d = Path(args.dir or tempfile.mkdtemp(prefix="qk-bench-write-"))
    d.mkdir(parents=True, exist_ok=True)
    path = d / "bench.qcow2"
    size = args.total_mib * MIB
    best: dict[str, float] = {}
    try:
        for _ in range(args.repeat):
            for name, fn in (
                ("qcow2kit", lambda: ours(path, args.total_mib)),
                ("qemu-img bench -d 1", lambda: qemu(path, args.total_mib, 1)),
                ("qemu-img bench -d 64", lambda: qemu(path, args.total_mib, 64)),
            ):
                fresh(path, size, args.cluster_size)
                best[name] = min(best.get(name, float("inf")), fn())
        # the image we wrote is sane: one last run of ours, then qemu-img check
        fresh(path, size, args.cluster_size)
        ours(path, args.total_mib)
        subprocess.run(["qemu-img", "check", "-q", str(path)], check=True)
    finally:
        if args.dir is None:
            shutil.rmtree(d, ignore_errors=True)
        elif path.exists():
            os.unlink(path)
    print(f"sequential 1 MiB writes, {args.total_mib} MiB total, cluster_size={args.cluster_size}, "
          f"best of {args.repeat}")
    print(f"{'tool':<22}{'seconds':>10}{'MiB/s':>10}{'ratio ours/this':>18}")
    for name, t in best.items():
        ratio = best["qcow2kit"] / t
        print(f"{name:<22}{t:>10.3f}{args.total_mib / t:>10.0f}{ratio:>18.2f}")


if __name__ == "__main__":
    main()
