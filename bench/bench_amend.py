#!/usr/bin/env python3
"""amend / rebase / commit benchmark (issue 14): the qcow2kit CLI against qemu-img 7.2 on the
same inputs, each a separate process (start-up included).

    python bench/bench_amend.py [--pairs N] [--quick] [--dir DIR] [--only NAME ...]

Workloads (sizes at full scale; --quick divides them by 16):
- rebase: safe mode, a 1 GiB overlay with 50 % written (every other MiB) over a fully
  written 1 GiB base, onto a new base that differs from the old one in half of the range the
  overlay does not hold;
- commit: a 1 GiB overlay half written (every other MiB) into a fully written 1 GiB base;
- amend: `-o refcount_bits=64` of a 4 GiB image whose every cluster is allocated
  (preallocation=metadata, so the file stays sparse).
Each timed run starts from fresh copies of the inputs (made untimed with `cp --sparse`);
the tools run in alternating pairs (qcow2kit first in even pairs), `os.sync()` before each
timed run. Prints both medians and the median of the per-pair ratios qcow2kit / qemu-img
(below 1: qcow2kit is faster). After every run the results are checked: qemu-img check
clean, and for rebase and commit qemu-img compare equal between the two tools' outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

MIB = 1 << 20
GIB = 1 << 30
VENV = Path(__file__).resolve().parent.parent / ".venv" / "bin"
QCOW2KIT = [str(VENV / "python"), "-m", "qcow2kit"]


def sh(*argv: str, cwd: Path | None = None) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, cwd=cwd)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {res.stderr[-1000:]}")
    return res.stdout


def io_writes(path: Path, cmds: list[str]) -> None:
    for i in range(0, len(cmds), 256):  # qemu-io argv in batches
        argv: list[str] = []
        for c in cmds[i : i + 256]:
            argv += ["-c", c]
        sh("qemu-io", "-f", "qcow2", *argv, str(path))


def build(root: Path, size: int) -> None:
    sh("qemu-img", "create", "-f", "qcow2", str(root / "base.qcow2"), str(size))
    io_writes(root / "base.qcow2", [f"write -P 1 0 {size}"])
    shutil.copy(root / "base.qcow2", root / "newbase.qcow2")
    # the new base differs in half of what the overlay does not hold (odd MiBs)
    io_writes(root / "newbase.qcow2",
              [f"write -P 2 {off} {MIB}" for off in range(MIB, size, 4 * MIB)])
    sh("qemu-img", "create", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2",
       str(root / "top.qcow2"))
    io_writes(root / "top.qcow2", [f"write -P 3 {off} {MIB}" for off in range(0, size, 2 * MIB)])
    sh("qemu-img", "create", "-f", "qcow2", "-o", "preallocation=metadata",
       str(root / "big.qcow2"), str(4 * size))


def fresh(root: Path, work: Path, names: list[str]) -> None:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    for name in names:
        sh("cp", "--sparse=always", str(root / name), str(work / name))


WORKLOADS = {
    "rebase": (["base.qcow2", "newbase.qcow2", "top.qcow2"],
               ["rebase", "-b", "newbase.qcow2", "-F", "qcow2", "top.qcow2"], "top.qcow2"),
    "commit": (["base.qcow2", "top.qcow2"], ["commit", "top.qcow2"], "base.qcow2"),
    "amend": (["big.qcow2"], ["amend", "-o", "refcount_bits=64", "big.qcow2"], "big.qcow2"),
}


def timed(argv: list[str], cwd: Path) -> float:
    os.sync()
    t0 = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, cwd=cwd)
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {res.stderr.decode()[-1000:]}")
    return elapsed


def run(root: Path, name: str, pairs: int) -> tuple[float, float, float]:
    inputs, args, result = WORKLOADS[name]
    ours: list[float] = []
    theirs: list[float] = []
    ratios: list[float] = []
    for i in range(pairs):
        order = ("qcow2kit", "qemu-img") if i % 2 == 0 else ("qemu-img", "qcow2kit")
        got: dict[str, float] = {}
        for tool in order:
            work = root / tool
            fresh(root, work, inputs)
            base = QCOW2KIT if tool == "qcow2kit" else ["qemu-img"]
            got[tool] = timed([*base, *args], work)
            check = json.loads(sh("qemu-img", "check", "--output=json", str(work / result)))
            if check.get("corruptions") or check.get("leaks") or check.get("check-errors"):
                raise RuntimeError(f"{tool} {name}: not clean: {check}")
        if name != "amend":
            sh("qemu-img", "compare", str(root / "qcow2kit" / result),
               str(root / "qemu-img" / result))
        ours.append(got["qcow2kit"])
        theirs.append(got["qemu-img"])
        ratios.append(got["qcow2kit"] / got["qemu-img"])
    return statistics.median(ours), statistics.median(theirs), statistics.median(ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="sizes / 16, 3 pairs")
    ap.add_argument("--dir", default=None, help="where to build the inputs")
    ap.add_argument("--only", nargs="*", choices=sorted(WORKLOADS), default=sorted(WORKLOADS))
    args = ap.parse_args()
    pairs = 3 if args.quick else args.pairs
    size = GIB // 16 if args.quick else GIB
    root = Path(tempfile.mkdtemp(prefix="bench-amend-", dir=args.dir or "/work"))
    try:
        build(root, size)
        print(f"{'workload':10} {'qcow2kit':>10} {'qemu-img':>10} {'ratio':>7}")
        for name in args.only:
            a, b, r = run(root, name, pairs)
            print(f"{name:10} {a:9.3f}s {b:9.3f}s {r:7.2f}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
