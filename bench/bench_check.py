#!/usr/bin/env python3
"""check benchmark (issues 5 and 16): `qcow2kit check` against `qemu-img check` on the same
files, in the same run.

    python3 bench/bench_check.py [--repeat N] [--keep DIR] [--only SUBSTRING ...]

Cases:
  sparse 1 TiB image (64 KiB clusters, a few MiB written at both ends)
  1 TiB image with 1,024 L2 tables (64 KiB written at the start of every GiB)
  fully written 4 GiB image, 64 KiB clusters
  fully written 1 GiB image, 4 KiB clusters
  fully written 1 GiB image, 512 B clusters
Each check runs as a separate process (start-up included, as a user sees it) with
--output=json; the best of --repeat runs is kept, and both tools must print the same JSON.
Prints seconds for both tools and the ratio ours / qemu-img (<= 1.0 means qcow2kit is at
least as fast). A process of ours pays for the Python interpreter and the numpy import
before any work, so the table also shows the time of the check itself, measured in this
process (`engine`), and its ratio to qemu-img's whole run; and the floor every process of
ours pays: `python -c pass`, `python -c "import numpy"` and the import of the check's
modules, each the best of --repeat runs. Python runs with bytecode caches (as an installed
package does; PYTHONDONTWRITEBYTECODE is dropped, the caches go to the temporary
directory). Not part of the test suite.
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


ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(argv: list[str], repeat: int) -> tuple[float, str]:
    best = float("inf")
    out = ""
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
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


def make_images(d: Path, only: list[str]) -> dict[str, Path]:
    sparse = d / "sparse1t.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", str(sparse), "1T")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 4M", "-c", "write -P 2 1023G 4M",
       "-c", "write -P 3 512G 1M", str(sparse))
    tables = d / "l2x1024.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", str(tables), "1T")
    script = "".join(f"write -q -P {1 + i % 255} {i}G 64k\n" for i in range(1024))
    subprocess.run(["qemu-io", "-f", "qcow2", str(tables)], input=script, text=True, check=True,
                   stdout=subprocess.DEVNULL)
    makers = {
        "sparse 1 TiB, 64K clusters": lambda: sparse,
        "1 TiB, 1,024 L2 tables": lambda: tables,
        "full 4 GiB, 64K clusters": lambda: full_image(d, "full4g", 4 * GIB, "64k"),
        "full 1 GiB, 4K clusters": lambda: full_image(d, "full1g4k", GIB, "4k"),
        "full 1 GiB, 512 B clusters": lambda: full_image(d, "full1g512", GIB, "512"),
    }
    return {name: make() for name, make in makers.items() if not only or any(o in name for o in only)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", help="directory for the images (kept afterwards)")
    ap.add_argument("--only", action="append", default=[], help="cases whose name contains this")
    args = ap.parse_args()
    d = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_check."))
    d.mkdir(parents=True, exist_ok=True)
    ENV["PYTHONPYCACHEPREFIX"] = str(d / "pycache")
    try:
        images = make_images(d, args.only)
        from qcow2kit.ops.check import check_path

        py = sys.executable
        for what, argv in (("python -c pass", [py, "-c", "pass"]),
                           ("python -c 'import numpy'", [py, "-c", "import numpy"]),
                           ("python -c 'import qcow2kit.ops.check'", [py, "-c", "import qcow2kit.ops.check"]),
                           ("python -m qcow2kit --help", [*OURS, "--help"])):
            timed(argv, 1)  # fills the bytecode cache
            print(f"start-up, {what}: {timed(argv, args.repeat)[0]:.3f} s")
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
