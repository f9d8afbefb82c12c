#!/usr/bin/env python3
"""Read-path benchmark (issue 2): qcow2kit against qemu-img on the same files, same run.

    python3 bench/bench_read.py [--repeat N] [--keep DIR]

Cases:
  convert -O raw  of a 1 GiB fully allocated image
  convert -O raw  of a 1 GiB image that is half unallocated
  convert -O raw  of a 1 TiB sparse image
  map --output=json of the 1 TiB sparse image
Each command runs as a separate process (start-up included, as a user sees it); the best of
--repeat runs is kept. Prints seconds for both tools and the ratio ours / qemu-img
(<= 1.0 means qcow2kit is at least as fast). Not part of the test suite.
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

GIB = 1 << 30
OURS = [sys.executable, "-m", "qcow2kit"]


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


ENV = dict(os.environ)


def timed(argv: list[str], cleanup: Path | None, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        if cleanup is not None and cleanup.exists():
            cleanup.unlink()
        os.sync()  # write back the previous run's output outside the timed region
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=ENV)
        best = min(best, time.perf_counter() - t0)
    if cleanup is not None and cleanup.exists():
        cleanup.unlink()
    return best


def timed_inprocess(argv: list[str], cleanup: Path | None, repeat: int) -> float:
    """The operation through the Python API, imports already done."""
    from qcow2kit.ops.convert import convert
    from qcow2kit.ops.map import format_json, map_path

    best = float("inf")
    for _ in range(repeat):
        if cleanup is not None and cleanup.exists():
            cleanup.unlink()
        os.sync()
        t0 = time.perf_counter()
        if argv[0] == "convert":
            convert(argv[-2], argv[-1], out_fmt="raw")
        else:
            format_json(map_path(argv[-1]))
        best = min(best, time.perf_counter() - t0)
    if cleanup is not None and cleanup.exists():
        cleanup.unlink()
    return best


def make_images(d: Path) -> dict[str, Path]:
    names = {k: d / f"{k}.qcow2" for k in ("full", "half", "sparse")}
    if all(p.exists() for p in names.values()):
        return names  # --keep directory from an earlier run
    block = os.urandom(16 << 20)
    full_raw = d / "full.raw"
    with open(full_raw, "wb") as f:
        for _ in range(GIB // len(block)):
            f.write(block)
    full = d / "full.qcow2"
    sh("qemu-img", "convert", "-O", "qcow2", str(full_raw), str(full))
    full_raw.unlink()
    half_raw = d / "half.raw"
    with open(half_raw, "wb") as f:
        f.truncate(GIB)
        step = 2 << 20  # 1 MiB of data, then 1 MiB never written
        for pos in range(0, GIB, step):
            f.seek(pos)
            k = (pos // step) % 16
            f.write(block[k << 20 : (k + 1) << 20])
    half = d / "half.qcow2"
    sh("qemu-img", "convert", "-O", "qcow2", str(half_raw), str(half))
    half_raw.unlink()
    sparse = d / "sparse.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", str(sparse), "1T")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 4M", "-c", "write -P 2 300G 1M",
       "-c", "write -P 3 700G 64k", "-c", "write -z 800G 1G", "-c", "write -P 4 1023G 2M",
       str(sparse))
    return {"full": full, "half": half, "sparse": sparse}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", help="use/keep images in this directory instead of a temp dir")
    ap.add_argument("--out-dir", default="/dev/shm" if os.access("/dev/shm", os.W_OK) else None,
                    help="where the converted raw output goes (default /dev/shm: keeps disk "
                    "write-back noise out of the comparison)")
    args = ap.parse_args()
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            print(f"{tool} is required", file=sys.stderr)
            return 1
    d = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qcow2kit-bench-"))
    d.mkdir(parents=True, exist_ok=True)
    # byte-compiled modules, as an installed package has them (PYTHONDONTWRITEBYTECODE would
    # make every run compile qcow2kit from source); kept out of the source tree
    ENV.pop("PYTHONDONTWRITEBYTECODE", None)
    ENV["PYTHONPYCACHEPREFIX"] = str(d / "pycache")
    try:
        t0 = time.perf_counter()
        imgs = make_images(d)
        print(f"images ready in {time.perf_counter() - t0:.1f}s under {d}")
        timed([*OURS, "--help"], None, 1)  # warm the bytecode cache
        out = Path(args.out_dir or d) / f"qcow2kit-bench-{os.getpid()}.raw"
        cases = [
            (f"convert -O raw {name}", ["convert", "-O", "raw", str(imgs[name]), str(out)], out)
            for name in ("full", "half", "sparse")
        ]
        cases.append(("map --output=json sparse", ["map", "--output=json", str(imgs["sparse"])],
                      None))
        print(f"{'case':<30}{'qemu-img s':>12}{'qcow2kit s':>12}{'ratio':>8}"
              f"{'in-proc s':>11}{'ratio':>8}")
        for label, argv, cleanup in cases:
            theirs = timed(["qemu-img", *argv], cleanup, args.repeat)
            ours = timed([*OURS, *argv], cleanup, args.repeat)
            inproc = timed_inprocess(argv, cleanup, args.repeat)
            print(f"{label:<30}{theirs:>12.3f}{ours:>12.3f}{ours / theirs:>8.2f}"
                  f"{inproc:>11.3f}{inproc / theirs:>8.2f}")
        print("(in-proc: the same operation called in this process, without interpreter "
              "start-up and imports)")
        start = timed([sys.executable, "-c", "import qcow2kit.ops.convert"], None, args.repeat)
        bare = timed([sys.executable, "-c", "pass"], None, args.repeat)
        print(f"(python start-up alone: {bare:.3f}s)")
        print(f"(python start-up + imports of qcow2kit.ops.convert alone: {start:.3f}s)")
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
