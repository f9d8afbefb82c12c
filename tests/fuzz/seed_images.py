"""Seed images for the fuzzer (see harness.py): valid qcow2 images made by qemu-img /
qemu-io with several option sets (v2 and v3, cluster sizes from 512 B to 16 KiB, refcount
widths 1 and 64, lazy refcounts, extended L2, zlib / zstd compressed clusters, qcow2 and raw
backing files, bitmaps, an external data file), each read into regions by regions.py.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.fuzz.regions import Region, find_regions

QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
QEMU_IO = shutil.which("qemu-io") or "qemu-io"


@dataclass
class Seed:
    name: str
    image: bytes
    aux: dict[str, bytes] = field(default_factory=dict)  # other files next to the image
    regions: list[Region] = field(default_factory=list)


def _run(argv: list[str], cwd: Path) -> None:
    res = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0 or "failed" in res.stdout:
        raise RuntimeError(f"{argv} failed: {res.stdout}{res.stderr}")


def _img(cwd: Path, *args: str) -> None:
    _run([QEMU_IMG, *args], cwd)


def _io(cwd: Path, path: str, *cmds: str, extra: tuple[str, ...] = ()) -> None:
    argv = [QEMU_IO, "-f", "qcow2", *extra]
    for c in cmds:
        argv += ["-c", c]
    argv.append(path)
    _run(argv, cwd)


_WRITES = (
    "write -P 0x11 0 4k",
    "write -P 0x22 8k 12k",
    "write -P 0x33 1M 4k",
    "write -z 64k 8k",
    "write -P 0x44 3M 512",
)


def _build(name: str, d: Path) -> tuple[str, list[str]]:
    """Make one seed in directory d; return (image file name, aux file names)."""
    img = "seed.qcow2"
    if name == "v3-4k-snap":
        _img(d, "create", "-f", "qcow2", "-o", "cluster_size=4096", img, "4M")
        _io(d, img, *_WRITES)
        _img(d, "snapshot", "-c", "snap1", img)
        _io(d, img, "write -P 0x55 0 4k", "write -P 0x66 2M 8k")
        return img, []
    if name == "v2-512-snap":
        _img(d, "create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=512", img, "1M")
        _io(d, img, "write -P 0x11 0 4k", "write -P 0x22 100k 3k", "write -P 0x33 1020k 4k")
        _img(d, "snapshot", "-c", "s", img)
        _io(d, img, "write -P 0x44 0 1k")
        return img, []
    if name == "v3-refbits1-lazy":
        _img(d, "create", "-f", "qcow2", "-o",
             "cluster_size=4096,refcount_bits=1,lazy_refcounts=on", img, "4M")
        _io(d, img, *_WRITES)
        return img, []
    if name == "v3-refbits64":
        _img(d, "create", "-f", "qcow2", "-o", "cluster_size=1024,refcount_bits=64", img, "2M")
        _io(d, img, "write -P 0x11 0 4k", "write -P 0x22 700k 9k", "write -z 1M 64k")
        return img, []
    if name == "extl2":
        _img(d, "create", "-f", "qcow2", "-o", "cluster_size=16k,extended_l2=on", img, "4M")
        _io(d, img, "write -P 0x11 0 512", "write -P 0x22 20k 1k", "write -z 40k 2k",
            "write -P 0x33 1M 64k", "write -P 0x44 3M 16k")
        return img, []
    if name in ("compressed-zlib", "compressed-zstd"):
        raw = d / "src.raw"
        with open(raw, "wb") as f:
            f.truncate(2 << 20)
            for i, off in enumerate((0, 4096, 65536, 1 << 20, (2 << 20) - 8192)):
                f.seek(off)
                f.write(bytes([i + 1]) * 3000 + random.Random(i).randbytes(200) + b"abc" * 300)
        ctype = "zstd" if name.endswith("zstd") else "zlib"
        _img(d, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
             f"cluster_size=4096,compression_type={ctype}", "src.raw", img)
        raw.unlink()
        _io(d, img, "write -P 0x77 4k 1k")
        return img, []
    if name == "backing":
        _img(d, "create", "-f", "qcow2", "-o", "cluster_size=4096", "base.qcow2", "4M")
        _io(d, "base.qcow2", "write -P 0xa1 0 64k", "write -P 0xa2 2M 8k")
        _img(d, "create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.qcow2",
             "-F", "qcow2", img, "4M")
        _io(d, img, "write -P 0x11 4k 4k", "write -P 0x22 2M 1k", "write -z 32k 4k")
        return img, ["base.qcow2"]
    if name == "backing-raw":
        with open(d / "base.raw", "wb") as f:
            f.write(b"\xb1" * 8192)
            f.truncate(1 << 20)
        _img(d, "create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.raw",
             "-F", "raw", img, "2M")
        _io(d, img, "write -P 0x11 1k 2k", "write -P 0x22 1536k 1k")
        return img, ["base.raw"]
    if name == "bitmap":
        _img(d, "create", "-f", "qcow2", "-o", "cluster_size=4096", img, "4M")
        _img(d, "bitmap", "--add", img, "b0")
        _img(d, "bitmap", "--add", "-g", "64k", img, "b1")
        _io(d, img, *_WRITES)
        return img, []
    if name == "datafile":
        _img(d, "create", "-f", "qcow2", "-o", "cluster_size=4096,data_file=data.raw", img, "2M")
        _io(d, img, "write -P 0x11 0 4k", "write -P 0x22 1M 6k")
        return img, ["data.raw"]
    raise ValueError(name)


SEED_NAMES = (
    "v3-4k-snap",
    "v2-512-snap",
    "v3-refbits1-lazy",
    "v3-refbits64",
    "extl2",
    "compressed-zlib",
    "compressed-zstd",
    "backing",
    "backing-raw",
    "bitmap",
    "datafile",
)


def build_seeds(root: Path, names: tuple[str, ...] = SEED_NAMES) -> list[Seed]:
    seeds = []
    for name in names:
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        img, aux = _build(name, d)
        seed = Seed(name, (d / img).read_bytes(), {a: (d / a).read_bytes() for a in aux})
        seed.regions = find_regions(seed.image)
        seeds.append(seed)
    return seeds
