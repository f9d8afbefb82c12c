"""Shared by the tests of `map`'s numpy-free fast path (ops/map_plain.py, issue 16):
test_map_fast.py, test_map_fast_command.py and test_map_fast_hostile.py.

- the images, each made by qemu-img / qemu-io: PLAIN (plain images of every cluster size and
  shape, zero clusters among them: the fast path answers) and FALLBACK (what it declines,
  with a word of its reason); `images` is the module-scoped fixture that builds them once;
- `create` and `written` make images, `v2` a version 2 one and `raw` a raw file;
- `patch_u64` and `u64` write and read a big-endian 64-bit field in place; COPIED is an L1 /
  L2 entry's COPIED flag;
- `run` runs the command in this process and returns its exit code, stdout and stderr.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qcow2kit.cli.main import main
from tests.helpers import layout, qemu_img, qemu_io

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30

Maker = Callable[[Path], Path]


def create(p: Path, size: str, *opts: str) -> Path:
    args = ["create", "-q", "-f", "qcow2"]
    for o in opts:
        args += ["-o", o]
    qemu_img(*args, str(p), size)
    return p


def written(size: str, cluster: str, *cmds: str, opts: tuple[str, ...] = ()) -> Maker:
    def make(p: Path) -> Path:
        create(p, size, f"cluster_size={cluster}", *opts)
        if cmds:
            qemu_io(p, *cmds)
        return p
    return make


def _reverse(p: Path) -> Path:
    """4 KiB clusters written in 64 KiB chunks from the end (bench/compare.py's map-reverse4k,
    small): every chunk its own extent."""
    create(p, "4M", "cluster_size=4k")
    qemu_io(p, *(f"write -q -P {i % 250 + 1} {off} 64k"
                 for i, off in enumerate(range(4 * MIB - 64 * KIB, -1, -64 * KIB))))
    return p


def _fragmented(cluster: str) -> Maker:
    def make(p: Path) -> Path:
        create(p, "3M", f"cluster_size={cluster}")
        chunks = list(range(0, 3 * MIB, 16 * KIB))
        random.Random(16).shuffle(chunks)
        qemu_io(p, *(f"write -q -P {i % 250 + 1} {off} {16 * KIB}"
                     for i, off in enumerate(chunks[: len(chunks) * 2 // 3])))
        return p
    return make


def _unaligned_size(cut: int) -> Maker:
    """A virtual size that ends inside a cluster (the header is patched: qemu-img create
    rounds to 512): the last extent is cut."""
    def make(p: Path) -> Path:
        create(p, "1M", "cluster_size=64k")
        qemu_io(p, "write -q -P 7 960k 64k", "write -q 0 4k")
        patch_u64(p, 24, 1 * MIB - cut)
        return p
    return make


def _copied_cleared(p: Path) -> Path:
    """Data clusters without the COPIED flag (as if shared with a snapshot once): a check
    error, but map reads them as any data cluster."""
    create(p, "8M", "cluster_size=4k")
    qemu_io(p, "write -q 0 1M", "write -q 4M 64k")
    table = layout(p)["l1"][0] & 0x00FFFFFFFFFFFE00
    for index in (3, 4, 200, 1024):
        patch_u64(p, table + 8 * index, u64(p, table + 8 * index) & ~COPIED)
    return p


def _zero_mixed(cluster: str, size: int) -> Maker:
    """Data, allocated zero clusters (write -z over data), plain zero clusters (write -z -u
    over data, and over nothing), at odd places in an image of `size` bytes."""
    def make(p: Path) -> Path:
        create(p, str(size), f"cluster_size={cluster}")
        chunks = list(range(0, size, 16 * KIB))
        rng = random.Random(size + len(cluster))
        rng.shuffle(chunks)
        cmds = [f"write -q -P {i % 250 + 1} {off} {16 * KIB}"
                for i, off in enumerate(chunks[: len(chunks) * 3 // 4])]
        for i, off in enumerate(chunks[: len(chunks) // 2]):
            length = rng.choice([16 * KIB, 48 * KIB, 160 * KIB])
            if off + length <= size:
                cmds.append(f"write -q -z{' -u' if i % 3 == 0 else ''} {off} {length}")
        qemu_io(p, *cmds)
        return p
    return make


def _prealloc_zeroed(prealloc: str, *cmds: str) -> Maker:
    """A preallocated image, then `cmds`: data clusters turned into allocated zero ones."""
    return written("8M", "64k", *cmds, opts=(f"preallocation={prealloc}",))


def v2(p: Path) -> Path:
    create(p, "64M", "compat=0.10")
    qemu_io(p, "write -q 1M 3M", "write -q 40M 64k")
    return p


def _backing(p: Path) -> Path:
    base = p.with_name(p.name + ".base")
    create(base, "64M")
    qemu_io(base, "write -q 0 8M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(p))
    qemu_io(p, "write -q 4M 1M")
    return p


def _data_file(p: Path) -> Path:
    create(p, "16M", f"data_file={p}.data")  # (a relative name is made in the cwd)
    qemu_io(p, "write -q 0 1M")
    return p


def _snapshot(p: Path) -> Path:
    create(p, "16M")
    qemu_io(p, "write -q 0 1M")
    qemu_img("snapshot", "-c", "s1", str(p))
    return p


def _bitmap(p: Path) -> Path:
    create(p, "16M")
    qemu_io(p, "write -q 0 1M")
    qemu_img("bitmap", "--add", str(p), "b0")
    return p


def raw(p: Path) -> Path:
    with open(p, "wb") as f:
        f.truncate(4 * MIB)
        f.write(b"x" * 4096)
    return p


# name -> (maker, None if the fast path answers, else a word of its reason)
PLAIN: dict[str, Maker] = {
    "empty": written("64M", "64k"),
    "zero-size": written("0", "64k"),
    "dense": written("8M", "64k", "write -q -P 1 0 8M"),
    "sparse": written("1G", "64k", "write -q 0 64k", "write -q 300M 1M", "write -q 1023M 1M"),
    "reverse-4k": _reverse,
    "fragmented-512": _fragmented("512"),
    "fragmented-4k": _fragmented("4k"),
    "fragmented-64k": _fragmented("64k"),
    "clusters-2m": written("64M", "2M", "write -q 0 5M", "write -q 33M 2M"),
    "clusters-512-many-tables": written("40M", "512", "write -q 0 20M", "write -q 30M 4k"),
    "unaligned-size": _unaligned_size(1536),
    "odd-size": _unaligned_size(1000),
    "l1-holes": written("2G", "64k", "write -q 0 64k", "write -q 1536M 1M"),
    "l1-holes-512": written("1M", "512", "write -q 0 4k", "write -q 100k 4k",
                             "write -q 1020k 4k"),
    "huge-sparse-1t": written("1T", "64k", "write -q 0 4M", "write -q 512G 1M",
                               "write -q 1023G 4M"),
    "falloc": written("8M", "64k", opts=("preallocation=falloc",)),
    "v2": v2,
    "copied-cleared": _copied_cleared,
    "backing": _backing,  # through the chain (tests/cli/test_map_fast_chain.py)
    # zero clusters
    "zero-plain-1t": written("1T", "64k", "write -q -z 800G 1G"),  # whole L2 tables of them
    "zero-alloc": written("8M", "64k", "write -q -P 5 0 2M", "write -q -z 256k 128k",
                           "write -q -z 1M 1M"),
    "zero-unmapped": written("16M", "64k", "write -q -P 3 0 8M", "write -q -z -u 1M 2M",
                              "write -q -z 4M 1M", "write -q -z 12M 64k"),
    "zero-whole-table-512": written("1M", "512", "write -q -P 1 0 256k",
                                     "write -q -z 32k 32k", "write -q -z -u 96k 32k",
                                     "write -q -z 512k 64k"),
    "zero-whole-table-64k": written("1G", "64k", "write -q -P 1 500M 24M",
                                     "write -q -z 0 512M", "write -q -z -u 520M 2M"),
    "zero-mixed-512": _zero_mixed("512", 2 * MIB),
    "zero-mixed-4k": _zero_mixed("4k", 3 * MIB),
    "zero-mixed-64k": _zero_mixed("64k", 6 * MIB),
    "zero-mixed-2m": _zero_mixed("2M", 24 * MIB),
    "metadata-prealloc-zeroed": _prealloc_zeroed("metadata", "write -q -z 0 8M"),
    "metadata-prealloc-unmapped": _prealloc_zeroed("metadata", "write -q -z -u 0 8M"),
    "falloc-zeroed": _prealloc_zeroed("falloc", "write -q -P 9 1M 1M", "write -q -z 0 1536k",
                                      "write -q -z -u 6M 1M"),
}
# qemu counts the disk in whole 512-byte sectors; ops/map.py (and so the fast path) maps the
# header's size exactly
QEMU_ROUNDS_SIZE = {"odd-size"}
FALLBACK: dict[str, tuple[Maker, str]] = {
    "compressed": (written("8M", "64k", "write -q -c 0 128k", "write -q 1M 64k"), "compressed"),
    # the human table stops at the first compressed extent, data after it is not listed
    "compressed-between-data": (written("8M", "64k", "write -q 0 64k", "write -q -c 1M 64k",
                                         "write -q 2M 64k", "write -q -c 3M 64k"), "compressed"),
    # data clusters among the allocated zero ones of a sparse host file that looks
    # preallocated: ops/map.py splits them by the file's holes
    "metadata-prealloc-part-zeroed": (_prealloc_zeroed("metadata", "write -q -z 1M 2M"),
                                      "sparse"),
    "extended-l2": (written("8M", "64k", "write -q 0 1M", opts=("extended_l2=on",)),
                    "extended"),
    "data-file": (_data_file, "data file"),
    "snapshot": (_snapshot, "snapshot"),
    "bitmap": (_bitmap, "bitmap"),
    "raw": (raw, "qcow2"),
    "metadata-prealloc": (written("8M", "64k", opts=("preallocation=metadata",)), "sparse"),
    "missing": (lambda p: p, "cannot open"),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Path]]:
    root = tmp_path_factory.mktemp("map_fast")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            maker = PLAIN[name] if name in PLAIN else FALLBACK[name][0]
            built[name] = maker(root / f"{name}.qcow2")
        return built[name]
    yield get


def patch_u64(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))


def u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return int(struct.unpack(">Q", f.read(8))[0])


COPIED = 1 << 63


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err
