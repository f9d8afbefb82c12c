"""Reading and patching the metadata of a qcow2 file in place (Poke), and the base images the
damage cases of check_cases.py start from: plain ones made by qemu-img and qemu-io (with
`-o` options), one with compressed clusters, one with an internal snapshot.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from tests.conftest import qemu_img, qemu_io

CS = 65536


# ---- poking helpers ----------------------------------------------------------------------
class Poke:
    """Read and patch the metadata of a qcow2 file in place (big-endian fields)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            head = f.read(112)
        self.cluster_bits = struct.unpack_from(">I", head, 20)[0]
        self.cs = 1 << self.cluster_bits
        self.l1_size, self.l1_offset = struct.unpack_from(">IQ", head, 36)
        self.reftable_offset, self.reftable_clusters = struct.unpack_from(">QI", head, 48)
        self.nb_snapshots, self.snapshots_offset = struct.unpack_from(">IQ", head, 60)
        version = struct.unpack_from(">I", head, 4)[0]
        self.refcount_order = struct.unpack_from(">I", head, 96)[0] if version >= 3 else 4
        incompat = struct.unpack_from(">Q", head, 72)[0] if version >= 3 else 0
        self.ext = bool(incompat & 16)

    def u64(self, offset: int) -> int:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return int(struct.unpack(">Q", f.read(8))[0])

    def put(self, offset: int, data: bytes) -> None:
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def put64(self, offset: int, value: int) -> None:
        self.put(offset, struct.pack(">Q", value))

    def l1(self, i: int) -> int:
        return self.u64(self.l1_offset + 8 * i)

    def l2_addr(self, guest: int) -> int:
        """File offset of the L2 entry that maps guest byte `guest`."""
        entry_bytes = 16 if self.ext else 8
        per = self.cs // entry_bytes
        cluster = guest >> self.cluster_bits
        l2 = self.l1(cluster // per) & 0x00FFFFFFFFFFFE00
        assert l2, "no L2 table there"
        return l2 + (cluster % per) * entry_bytes

    def l2(self, guest: int) -> int:
        return self.u64(self.l2_addr(guest))

    def host(self, guest: int) -> int:
        return self.l2(guest) & 0x00FFFFFFFFFFFE00

    def refblock(self, index: int = 0) -> int:
        return self.u64(self.reftable_offset + 8 * index)

    def set_refcount(self, cluster: int, value: int) -> None:
        assert self.refcount_order == 4
        per = self.cs * 8 // 16
        block = self.refblock(cluster // per)
        self.put(block + (cluster % per) * 2, struct.pack(">H", value))

    def refcount(self, cluster: int) -> int:
        assert self.refcount_order == 4
        per = self.cs * 8 // 16
        block = self.refblock(cluster // per)
        with open(self.path, "rb") as f:
            f.seek(block + (cluster % per) * 2)
            return int(struct.unpack(">H", f.read(2))[0])

    def file_clusters(self) -> int:
        return -(-os.path.getsize(self.path) // self.cs)


# ---- base images ---------------------------------------------------------------------------
def base(path: Path, *opts: str, size: str = "64M", writes: tuple[str, ...] = ()) -> Poke:
    args = ["create", "-f", "qcow2"]
    if opts:
        args += ["-o", ",".join(opts)]
    qemu_img(*args, str(path), size)
    default = ("write -P 0x11 0 192k", "write -P 0x22 1M 64k", "write -P 0x33 40M 128k")
    qemu_io(path, *(writes or default))
    return Poke(path)


def compressed_base(path: Path) -> Poke:
    src = path.with_suffix(".src")
    qemu_img("create", "-f", "qcow2", str(src), "64M")
    qemu_io(src, "write -P 0x44 0 256k", "write -P 0x55 8M 64k")
    qemu_img("convert", "-c", "-O", "qcow2", str(src), str(path))
    src.unlink()
    qemu_io(path, "write -P 0x66 16M 64k")
    return Poke(path)


def snapshot_base(path: Path, *opts: str) -> Poke:
    base(path, *opts)
    qemu_img("snapshot", "-c", "s1", str(path))
    qemu_io(path, "write -P 0x77 64k 64k")
    return Poke(path)
