"""The main job on a scratch image: create, write data, show info and map, shrink, check."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import qcow2kit


def run(*argv: str) -> int:
    print("\n$ qcow2kit " + " ".join(argv), flush=True)
    return subprocess.run([sys.executable, "-m", "qcow2kit", *argv], check=False).returncode


def main() -> int:
    work = tempfile.mkdtemp(prefix="qcow2kit-demo-")
    path = os.path.join(work, "demo.qcow2")
    try:
        run("create", path, "1G")
        with qcow2kit.open(path, "r+") as img:
            img.write(0, b"\xaa" * (4 << 20))
            img.write(800 << 20, b"\xbb" * (8 << 20))
        print(f"\nwrote 4 MiB at 0 and 8 MiB at 800 MiB; the file is {os.path.getsize(path):,} bytes")
        run("info", path)
        run("map", path)
        rc = run("resize", "--shrink", path, "-512M")  # relative: 1 GiB - 512 MiB
        print(f"after the shrink the file is {os.path.getsize(path):,} bytes")
        rc |= run("check", path)
        with qcow2kit.open(path) as img:
            ok = img.read(0, 4 << 20) == b"\xaa" * (4 << 20) and img.virtual_size == 512 << 20
        print("data below the new end intact:", ok)
        return 0 if rc == 0 and ok else 1
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    sys.exit(main())
