"""Compaction benchmark: `qcow2kit compact` in place vs the usual remedy, `qemu-img convert
-O qcow2` to a new file + rename, on copies of the same fragmented image, in one run.
Prints the time ratio, final file sizes and the peak extra disk space each needed.

    python bench/bench_compact.py [--size-gib 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = tempfile.mkdtemp(dir=args.workdir, prefix="qcow2kit-bench-compact-")
    gib = args.size_gib
    try:
        base = os.path.join(work, "base.qcow2")
        sh("qemu-img", "create", "-q", "-f", "qcow2", base, f"{gib}G")
        # written back to front, so guest order and host order disagree
        writes = [["-c", f"write -P {i % 200 + 1} {off}M 64M"]
                  for i, off in enumerate(range(gib * 1024 - 64, -1, -64))]
        sh("qemu-io", *sum(writes, []), base)
        discards = [["-c", f"discard {off}M 1M"] for off in range(0, gib * 1024, 2)]
        for k in range(0, len(discards), 256):
            sh("qemu-io", *sum(discards[k : k + 256], []), base)
        print(f"fragmented image: {os.path.getsize(base):,} bytes, half its clusters freed")

        ours = os.path.join(work, "ours.qcow2")
        shutil.copyfile(base, ours)
        os.sync()
        t0 = time.perf_counter()
        sh(sys.executable, "-m", "qcow2kit", "compact", "-q", ours)
        t_ours = time.perf_counter() - t0

        theirs = os.path.join(work, "theirs.qcow2")
        shutil.copyfile(base, theirs)
        os.sync()
        t0 = time.perf_counter()
        tmp = theirs + ".new"
        sh("qemu-img", "convert", "-O", "qcow2", theirs, tmp)
        extra = os.path.getsize(tmp)
        os.replace(tmp, theirs)
        os.sync()
        t_qemu = time.perf_counter() - t0
        sh("qemu-img", "compare", ours, theirs)
        print(f"time: qcow2kit compact {t_ours:.2f}s, qemu-img convert+rename {t_qemu:.2f}s, "
              f"ratio {t_ours / t_qemu:.2f}")
        print(f"final size: qcow2kit {os.path.getsize(ours):,} bytes, "
              f"qemu-img convert {os.path.getsize(theirs):,} bytes")
        print(f"peak extra disk: qcow2kit 0 bytes (in place), qemu-img convert {extra:,} bytes")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
