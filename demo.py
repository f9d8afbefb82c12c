"""The main job on a scratch image: create, write data, show info and map."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import qcow2kit


def run(*argv: str) -> None:
    print("$ qcow2kit " + " ".join(argv), flush=True)
    subprocess.run([sys.executable, "-m", "qcow2kit", *argv], check=False)


def main() -> None:
    work = tempfile.mkdtemp(prefix="qcow2kit-demo-")
    path = os.path.join(work, "demo.qcow2")
    try:
        run("create", path, "1G")
        with qcow2kit.open(path, "r+") as img:
            img.write(0, b"\xaa" * (4 << 20))
            img.write(800 << 20, b"\xbb" * (1 << 20))
        print(f"wrote 4 MiB at 0 and 1 MiB at 800 MiB; file is {os.path.getsize(path)} bytes")
        for verb in ("info", "map", "resize", "check"):
            if verb == "resize":
                run("resize", "--shrink", path, "512M")
                print(f"after shrink the file is {os.path.getsize(path)} bytes")
            else:
                run(verb, path)
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
