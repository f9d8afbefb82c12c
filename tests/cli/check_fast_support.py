"""Shared by the tests of the numpy-free fast path of `qcow2kit check` (ops/check_plain.py),
test_check_fast.py and test_check_fast_proof.py.

- `cli` runs `qcow2kit check` in a new process and says whether numpy was imported (whether
  the fast path declined); `full` is what the full check prints;
- the images, each made by qemu-img / qemu-io: CLEAN (plain clean images, the fast path
  answers), UNUSUAL (clean, but with something the fast path leaves to the full check) and
  DAMAGED (hand-made damage: wrong refcounts, bad L1 / L2 entries, header bits, leaks, a
  truncated file, ...); `make` builds one of them;
- `patch` writes bytes into a file in place.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from qcow2kit.ops.check import check_path, to_human, to_json
from tests.helpers import layout, pattern, qemu_img, qemu_io

# runs one command; reports on its last stderr line whether numpy was imported
_PROBE = (
    "import sys\n"
    "from qcow2kit.cli.main import main\n"
    "rc = main(sys.argv[1:])\n"
    "sys.stdout.flush()\n"
    "sys.stderr.write('\\nNUMPY=%d\\n' % ('numpy' in sys.modules))\n"
    "sys.exit(rc)\n"
)


def cli(*args: str) -> tuple[int, str, str, bool]:
    """(exit code, stdout, stderr, numpy imported) of `qcow2kit check ARGS` in a new process."""
    res = subprocess.run([sys.executable, "-c", _PROBE, "check", *args], capture_output=True,
                         text=True)
    err, _, flag = res.stderr.rstrip("\n").rpartition("\n")
    assert flag.startswith("NUMPY="), res.stderr
    return res.returncode, res.stdout, err.rstrip("\n"), flag == "NUMPY=1"


def full(path: Path, output: str) -> tuple[int, str]:
    """What the full check (never the fast path) prints on stdout, and its exit code."""
    result = check_path(str(path))
    text = to_json(result, str(path)) if output == "json" else to_human(result)
    rc = 1 if result.check_errors or result.error is not None else result.exit_code
    return rc, text


# ---- images ---------------------------------------------------------------------------------
def create(path: Path, size: str, *opts: str) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", *(["-o", ",".join(opts)] if opts else []), str(path), size)
    return path


def dense(path: Path, cluster: str, size: int) -> Path:
    raw = path.with_suffix(".raw")
    raw.write_bytes(pattern(size, size))
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={cluster}", str(raw),
             str(path))
    raw.unlink()
    return path


def written(path: Path, size: str, cmds: list[str], *opts: str) -> Path:
    create(path, size, *opts)
    qemu_io(path, *cmds)
    return path


SCATTER = ["write -q -P 1 0 64k", "write -q -P 2 1M 3k", "write -q -P 3 7M 200k", "write -q -P 4 33M 1M",
           "write -q -P 5 63M 1M"]
# written backwards: every chunk lands before the previous one in the guest, after it on disk
REVERSE = [f"write -q -P {i + 1} {(15 - i) * 64}k 64k" for i in range(16)]

Maker = Callable[[Path], Path]

CLEAN: dict[str, Maker] = {
    "empty": lambda p: create(p, "64M"),
    "empty_zero_size": lambda p: create(p, "0"),
    "dense_512": lambda p: dense(p, "512", 2 << 20),
    "dense_4k": lambda p: dense(p, "4k", 8 << 20),
    "dense_64k": lambda p: dense(p, "64k", 8 << 20),
    "dense_2m": lambda p: dense(p, "2M", 8 << 20),
    "sparse": lambda p: written(p, "64M", SCATTER),
    "sparse_4k": lambda p: written(p, "64M", SCATTER, "cluster_size=4k"),
    "fragmented": lambda p: written(p, "1M", REVERSE, "cluster_size=4k"),
    "fragmented_512": lambda p: written(p, "1M", REVERSE, "cluster_size=512"),
    "refcount_8": lambda p: written(p, "64M", SCATTER, "refcount_bits=8"),
    "refcount_32": lambda p: written(p, "64M", SCATTER, "refcount_bits=32"),
    "refcount_64": lambda p: written(p, "64M", SCATTER, "refcount_bits=64", "cluster_size=4k"),
    "sparse_1t": lambda p: written(p, "1T", ["write -q -P 1 0 4M", "write -q -P 2 1023G 4M",
                                             "write -q -P 3 512G 1M"]),
    "l2_per_gib": lambda p: written(p, "64G", [f"write -q -P {i + 1} {i}G 64k" for i in range(64)]),
    "discarded": lambda p: written(p, "64M", ["write -q -P 1 0 8M", "discard -q 1M 2M",
                                              "discard -q 5M 64k", "write -q -P 2 2M 128k"]),
    "zero_clusters": lambda p: written(p, "64M", ["write -q -P 1 0 4M", "write -q -z 1M 1M",
                                                  "write -q -z -u 2M 1M", "write -q -z 32M 1M"]),
    "compat_0_10": lambda p: written(p, "64M", SCATTER, "compat=0.10"),
    "prealloc_metadata": lambda p: create(p, "16M", "preallocation=metadata"),
    "prealloc_full": lambda p: create(p, "4M", "preallocation=full", "cluster_size=4k"),
    "unaligned_size": lambda p: written(p, "10000001", ["write -q -P 1 9M 512"]),
}


def _overlay(p: Path) -> Path:
    base = written(p.with_name("base.qcow2"), "64M", ["write -q -P 9 0 8M"])
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(p))
    qemu_io(p, "write -q -P 1 1M 1M")
    return p


def _trailing_zeros(p: Path) -> Path:
    written(p, "64M", SCATTER)
    with open(p, "ab") as f:
        f.write(bytes(3 * 65536 + 100))  # clusters nothing references, refcount 0: clean
    return p


def _refcount_past_the_end(p: Path) -> Path:
    """A refcount of 1 for a cluster past the end of the file: qemu-img (and the full check)
    compare only the clusters of the file, so the image is clean."""
    written(p, "64M", SCATTER)
    lay = layout(p)
    patch(p, _refcount_at(p, -(-lay["file_size"] // lay["cluster_size"]) + 3), (1).to_bytes(2, "big"))
    return p


def _dense_zero_alloc(p: Path) -> Path:
    """A whole L2 table of preallocated zero clusters (offset, COPIED and the zero flag)."""
    dense(p, "4k", 4 << 20)
    qemu_io(p, "write -q -z 0 2M")
    return p


CLEAN["backing_file"] = _overlay
CLEAN["dense_zero_alloc"] = _dense_zero_alloc
CLEAN["trailing_zeros"] = _trailing_zeros
CLEAN["refcount_past_the_end"] = _refcount_past_the_end

# clean, but with something the fast path leaves to the full check
UNUSUAL: dict[str, Maker] = {
    "refcount_1": lambda p: written(p, "64M", SCATTER, "refcount_bits=1"),
    "refcount_4": lambda p: written(p, "64M", SCATTER, "refcount_bits=4"),
    "lazy_refcounts": lambda p: written(p, "64M", SCATTER, "lazy_refcounts=on"),
    "extended_l2": lambda p: written(p, "64M", SCATTER, "extended_l2=on"),
}


def _snapshot(p: Path) -> Path:
    written(p, "64M", SCATTER)
    qemu_img("snapshot", "-c", "s1", str(p))
    qemu_io(p, "write -q -P 7 0 64k")
    return p


def _compressed(p: Path) -> Path:
    src = written(p.with_name("src.qcow2"), "8M", ["write -q -P 1 0 1M", "write -q -P 2 3M 64k"])
    qemu_img("convert", "-q", "-c", "-O", "qcow2", str(src), str(p))
    return p


def _bitmap(p: Path) -> Path:
    written(p, "64M", SCATTER)
    qemu_img("bitmap", "--add", str(p), "b0")
    return p


def _data_file(p: Path) -> Path:
    create(p, "16M", f"data_file={p.with_name('data.raw')}")
    qemu_io(p, "write -q -P 1 0 1M")
    return p


UNUSUAL.update(snapshot=_snapshot, compressed=_compressed, bitmap=_bitmap, data_file=_data_file)


# ---- hand-made damage -----------------------------------------------------------------------
def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return int(struct.unpack(">Q", f.read(8))[0])


def _refcount_at(path: Path, cluster: int) -> int:
    """File offset of a cluster's refcount entry (refcount widths of 8 bits or more)."""
    lay = layout(path)
    cs, width = lay["cluster_size"], (1 << lay["refcount_order"]) // 8
    per = cs // width
    block = lay["reftable"][cluster // per] & ~0x1FF
    return int(block + cluster % per * width)


def _first_l2_entry(path: Path) -> int:
    """File offset of the first allocated entry of the first L2 table."""
    lay = layout(path)
    l2 = next(e for e in lay["l1"] if e) & 0x00FFFFFFFFFFFE00
    i = 0
    while not _u64(path, l2 + 8 * i):
        i += 1
    return int(l2 + 8 * i)


def _base(p: Path) -> Path:
    return written(p, "64M", SCATTER)


def _set_refcount(p: Path, value: int, which: str) -> Path:
    _base(p)
    lay = layout(p)
    cluster = {"data": (_u64(p, _first_l2_entry(p)) & 0x00FFFFFFFFFFFE00) // lay["cluster_size"],
               "l1": lay["l1_offset"] // lay["cluster_size"],
               "free": lay["file_size"] // lay["cluster_size"] - 1}[which]
    if which == "free":  # a cluster past the end of the file that nothing references: a leak
        cluster += 1
        with open(p, "ab") as f:
            f.write(bytes(-lay["file_size"] % lay["cluster_size"] + lay["cluster_size"]))
    patch(p, _refcount_at(p, cluster), value.to_bytes(2, "big"))
    return p


def _l2_entry(p: Path, change: Callable[[Path, int], int]) -> Path:
    _base(p)
    at = _first_l2_entry(p)
    patch(p, at, struct.pack(">Q", change(p, _u64(p, at))))
    return p


def _l1_entry(p: Path, change: Callable[[int], int]) -> Path:
    _base(p)
    at = layout(p)["l1_offset"]
    patch(p, at, struct.pack(">Q", change(_u64(p, at))))
    return p


def _header_bit(p: Path, bit: int) -> Path:
    _base(p)
    patch(p, 72, struct.pack(">Q", _u64(p, 72) | 1 << bit))
    return p


DAMAGED: dict[str, Maker] = {
    "data_refcount_2": lambda p: _set_refcount(p, 2, "data"),
    "data_refcount_0": lambda p: _set_refcount(p, 0, "data"),
    "l1_refcount_0": lambda p: _set_refcount(p, 0, "l1"),
    "leaked_cluster": lambda p: _set_refcount(p, 1, "free"),
    "l2_copied_cleared": lambda p: _l2_entry(p, lambda _p, e: e & ~(1 << 63)),
    "l2_points_at_l1": lambda p: _l2_entry(p, lambda q, e: e & ~0x00FFFFFFFFFFFE00 | layout(q)["l1_offset"]),
    "l2_past_the_end": lambda p: _l2_entry(p, lambda q, e: e & ~0x00FFFFFFFFFFFE00 | layout(q)["file_size"]
                                           + (1 << 20)),
    "l2_unaligned": lambda p: _l2_entry(p, lambda _p, e: e + 512),
    "l2_reserved_bit": lambda p: _l2_entry(p, lambda _p, e: e | 1 << 57),
    "l1_copied_cleared": lambda p: _l1_entry(p, lambda e: e & ~(1 << 63)),
    "l1_reserved_bit": lambda p: _l1_entry(p, lambda e: e | 1 << 60),
    "dirty_bit": lambda p: _header_bit(p, 0),
    "corrupt_bit": lambda p: _header_bit(p, 1),
}


def _leak_by_qemu(p: Path) -> Path:
    """A real leak: clusters appended with refcount 1 (qemu-img check -r would drop them)."""
    _base(p)
    lay = layout(p)
    end = lay["file_size"] // lay["cluster_size"]
    with open(p, "ab") as f:
        f.write(bytes(-lay["file_size"] % lay["cluster_size"] + 2 * lay["cluster_size"]))
    for c in (end, end + 1):
        patch(p, _refcount_at(p, c), (1).to_bytes(2, "big"))
    return p


def _truncated(p: Path) -> Path:
    _base(p)
    os.truncate(p, layout(p)["file_size"] - 70000)  # the last data clusters are gone
    return p


def _l1_twice(p: Path) -> Path:
    """Two L1 entries naming one L2 table."""
    written(p, "2G", ["write -q -P 1 0 64k", "write -q -P 2 1G 64k"])
    at = layout(p)["l1_offset"]
    patch(p, at + 8, struct.pack(">Q", _u64(p, at)))
    return p


def _refblock_on_l1(p: Path) -> Path:
    """A refcount table entry naming the L1 table's cluster (after the real blocks)."""
    _base(p)
    lay = layout(p)
    patch(p, lay["reftable_offset"] + 8 * (len(lay["reftable"]) - 1), struct.pack(">Q", lay["l1_offset"]))
    return p


def _dense_copied_cleared(p: Path) -> Path:
    """COPIED cleared in every entry of a whole L2 table of contiguous clusters."""
    dense(p, "4k", 4 << 20)
    l2 = next(e for e in layout(p)["l1"] if e) & 0x00FFFFFFFFFFFE00
    table = bytearray(p.read_bytes()[l2 : l2 + 4096])
    for i in range(0, 4096, 8):
        table[i] &= 0x7F
    patch(p, l2, bytes(table))
    return p


DAMAGED.update(dense_copied_cleared=_dense_copied_cleared, leak_appended=_leak_by_qemu,
               truncated=_truncated, l1_twice=_l1_twice, refblock_on_l1=_refblock_on_l1)


def make(tmp_path: Path, table: dict[str, Maker], name: str) -> Path:
    return table[name](tmp_path / f"{name}.qcow2")
