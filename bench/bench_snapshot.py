#!/usr/bin/env python3
"""Internal snapshot benchmark (issue 13): `qcow2kit snapshot -c / -a / -d` against
`qemu-img snapshot` on the same images, each a separate process (start-up included).

    python bench/bench_snapshot.py [--pairs N] [--quick] [--dir DIR] [--keep]

Images: 4 GiB fully written with 64 KiB clusters, and 1 GiB fully written with 4 KiB
clusters (--quick: 256 MiB and 64 MiB). For every operation the two tools run in
alternating pairs (qcow2kit first in even pairs, qemu-img first in odd ones), `os.sync()`
before each timed run; each timed run starts from the same state, prepared untimed with
qemu-img (-c: no snapshot; -a and -d: one snapshot just made of the whole disk). Prints both
medians and the median of the per-pair ratios qcow2kit / qemu-img (below 1: qcow2kit is
faster), and the median time of the same operation measured inside a Python process that
has already started and imported qcow2kit (in-process). After the runs, `qemu-img check`
must find the image clean.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1 << 20
GIB = 1 << 30
VENV = Path(__file__).resolve().parent.parent / ".venv" / "bin"
QCOW2KIT = [str(VENV / "python"), "-m", "qcow2kit"]
# the same work timed inside the process: what start-up (Python, numpy) costs is the rest
IN_PROCESS = """
import sys, time
from qcow2kit.image import Image
from qcow2kit.ops import snapshot as ops
import qcow2kit.metadata.snapshots  # imported lazily by ops: not part of the timed work
op, path = sys.argv[1], sys.argv[2]
img = Image.open_path(path, writable=True, backing=False)
t0 = time.perf_counter()
{"-c": ops.create_snapshot, "-a": ops.apply_snapshot, "-d": ops.delete_snapshot}[op](img, "bench")
img.close()
print(time.perf_counter() - t0)
"""


def sh(*argv: str) -> str:
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {res.stderr[-1000:]}")
    return res.stdout


def build(path: Path, size: int, cluster_size: int) -> None:
    sh("qemu-img", "create", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", str(path),
       str(size))
    step = min(size, GIB)
    cmds: list[str] = []
    for i, off in enumerate(range(0, size, step)):
        cmds += ["-c", f"write -P {i % 200 + 1} {off} {step}"]
    sh("qemu-io", "-f", "qcow2", *cmds, str(path))


def timed(argv: list[str]) -> float:
    os.sync()
    t0 = time.perf_counter()
    res = subprocess.run(argv, capture_output=True)
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {res.stderr.decode()[-1000:]}")
    return elapsed


def run_op(path: Path, op: str, tool: str) -> float:
    """Prepare (untimed), then time one `snapshot op` by tool."""
    if op in ("-a", "-d"):
        sh("qemu-img", "snapshot", "-c", "bench", str(path))
    if tool == "in-process":
        os.sync()
        t = float(sh(str(VENV / "python"), "-c", IN_PROCESS, op, str(path)))
    else:
        base = QCOW2KIT if tool == "qcow2kit" else ["qemu-img"]
        t = timed([*base, "snapshot", op, "bench", str(path)])
    if op in ("-c", "-a"):
        sh("qemu-img", "snapshot", "-d", "bench", str(path))
    return t


def bench_image(path: Path, pairs: int) -> list[tuple[str, float, float, float, float]]:
    rows = []
    for op in ("-c", "-a", "-d"):
        ours: list[float] = []
        theirs: list[float] = []
        ratios: list[float] = []
        inside: list[float] = []
        for i in range(pairs):
            order = ("qcow2kit", "qemu-img") if i % 2 == 0 else ("qemu-img", "qcow2kit")
            got = {tool: run_op(path, op, tool) for tool in order}
            ours.append(got["qcow2kit"])
            theirs.append(got["qemu-img"])
            ratios.append(got["qcow2kit"] / got["qemu-img"])
            inside.append(run_op(path, op, "in-process"))
        rows.append((op, statistics.median(ours), statistics.median(theirs),
                     statistics.median(ratios), statistics.median(inside)))
    check = json.loads(sh("qemu-img", "check", "--output=json", str(path)))
    if check.get("corruptions") or check.get("leaks") or check.get("check-errors"):
        raise RuntimeError(f"{path} is not clean after the runs: {check}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="small images, 3 pairs")
    ap.add_argument("--dir", default=None, help="where to build the images")
    ap.add_argument("--keep", action="store_true", help="keep the images")
    args = ap.parse_args()
    pairs = 3 if args.quick else args.pairs
    scale = 16 if args.quick else 1
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="qcow2kit-bench-snapshot-"))
    cases = [(f"{4 * GIB // scale // MIB} MiB, 64 KiB clusters", 4 * GIB // scale, 65536),
             (f"{GIB // scale // MIB} MiB, 4 KiB clusters", GIB // scale, 4096)]
    try:
        print(f"qemu-img: {sh('qemu-img', '--version').splitlines()[0]}; python {sys.version.split()[0]}; "
              f"{pairs} pairs")
        print(f"{'image':30s} {'op':3s} {'qcow2kit':>9s} {'qemu-img':>9s} {'ratio':>6s} "
              f"{'in-process':>10s}")
        for label, size, cs in cases:
            path = work / f"img-{cs}.qcow2"
            build(path, size, cs)
            for op, t_ours, t_theirs, ratio, t_in in bench_image(path, pairs):
                print(f"{label:30s} {op:3s} {t_ours:8.3f}s {t_theirs:8.3f}s {ratio:6.2f} "
                      f"{t_in:9.3f}s", flush=True)
            if not args.keep:
                path.unlink()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
