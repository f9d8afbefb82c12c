"""The damaged images that test_check.py checks and test_repair.py repairs, against qemu-img.

Every case (a `d_NAME` function, CASES["NAME"]) starts from an image that qemu-img / qemu-io
made (check_poke.py's base images), then pokes bytes into it: a zeroed refcount, a doubled
reference, an L2 entry pointing at the header, a bad snapshot table, extended L2 bitmaps, a
leak, a writer SIGKILLed half way, ... A few are clean on purpose. `make_case` builds one.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import QEMU_IO, qemu_check, qemu_img, qemu_io
from tests.interop.check_poke import CS, Poke, base, compressed_base, snapshot_base


# ---- the damage cases ------------------------------------------------------------------------
def d_clean(path: Path) -> None:
    base(path)


def d_zero_refcount_data(path: Path) -> None:
    p = base(path)
    p.set_refcount(p.host(0) >> 16, 0)


def d_refcount_too_high(path: Path) -> None:
    p = base(path)
    p.set_refcount(p.host(1 << 20) >> 16, 2)


def d_refcount_too_low(path: Path) -> None:
    p = snapshot_base(path)
    # a cluster shared with the snapshot has refcount 2; make it 1
    p.set_refcount(p.host(128 << 10) >> 16, 1)


def d_leak_appended(path: Path) -> None:
    p = base(path)
    n = p.file_clusters()
    with open(path, "ab") as f:
        f.write(b"\xee" * (2 * CS))
    p.set_refcount(n, 1)
    p.set_refcount(n + 1, 1)


def d_leak_in_middle(path: Path) -> None:
    p = base(path, writes=("write -P 1 0 64k", "write -P 2 64k 64k", "write -P 3 128k 64k"))
    # drop the mapping of the middle cluster: its refcount 1 is now a leak
    p.put64(p.l2_addr(64 << 10), 0)


def d_doubled_reference(path: Path) -> None:
    p = base(path)
    p.put64(p.l2_addr(64 << 10), p.l2(0))


def d_l2_points_at_header(path: Path) -> None:
    p = base(path)
    p.put64(p.l2_addr(1 << 20), (1 << 63) | 0)


def d_l2_points_at_reftable(path: Path) -> None:
    p = base(path)
    p.put64(p.l2_addr(1 << 20), (1 << 63) | p.reftable_offset)


def d_l2_points_at_l1(path: Path) -> None:
    p = base(path)
    p.put64(p.l2_addr(1 << 20), (1 << 63) | p.l1_offset)


def d_refblock_outside(path: Path) -> None:
    p = base(path)
    p.put64(p.reftable_offset, (p.file_clusters() + 10) * CS)


def d_refblock_unaligned(path: Path) -> None:
    p = base(path)
    p.put64(p.reftable_offset, p.refblock(0) + 512 * 4)


def d_reftable_reserved_bits(path: Path) -> None:
    p = base(path)
    p.put64(p.reftable_offset, p.refblock(0) | 0x100)


def d_refblock_refcount_zero(path: Path) -> None:
    p = base(path)
    p.set_refcount(p.refblock(0) >> 16, 0)


def d_refblock_refcount_two(path: Path) -> None:
    p = base(path)
    p.set_refcount(p.refblock(0) >> 16, 2)


def d_l1_reserved_bits(path: Path) -> None:
    p = base(path)
    p.put64(p.l1_offset, p.l1(0) | (1 << 60))


def d_l1_unaligned(path: Path) -> None:
    p = base(path)
    p.put64(p.l1_offset, p.l1(0) + 4096)


def d_l1_outside(path: Path) -> None:
    p = base(path)
    p.put64(p.l1_offset, (1 << 63) | ((p.file_clusters() + 4) * CS))


def d_l2_reserved_bits(path: Path) -> None:
    p = base(path)
    p.put64(p.l2_addr(0), p.l2(0) | (1 << 57))


def d_l2_unaligned(path: Path) -> None:
    p = base(path)
    p.put64(p.l2_addr(1 << 20), p.l2(1 << 20) + 1024)


def d_l2_unaligned_prealloc_zero(path: Path) -> None:
    p = base(path)
    p.put64(p.l2_addr(1 << 20), p.l2(1 << 20) + 1024 + 1)


def d_data_outside(path: Path) -> None:
    p = base(path)
    p.put64(p.l2_addr(1 << 20), (1 << 63) | ((p.file_clusters() + 3) * CS))


def d_copied_cleared_l1(path: Path) -> None:
    p = base(path)
    p.put64(p.l1_offset, p.l1(0) & ~(1 << 63))


def d_copied_cleared_l2(path: Path) -> None:
    p = base(path)
    p.put64(p.l2_addr(0), p.l2(0) & ~(1 << 63))


def d_copied_set_shared(path: Path) -> None:
    p = snapshot_base(path)
    p.put64(p.l2_addr(128 << 10), p.l2(128 << 10) | (1 << 63))


def d_compressed_copied(path: Path) -> None:
    p = compressed_base(path)
    p.put64(p.l2_addr(0), p.l2(0) | (1 << 63))


def d_compressed_outside(path: Path) -> None:
    p = compressed_base(path)
    entry = p.l2(64 << 10)
    x = 62 - (p.cluster_bits - 8)
    desc = entry & ~((1 << x) - 1)
    p.put64(p.l2_addr(64 << 10), desc | ((p.file_clusters() + 5) * CS + 100))


def d_compressed_refcount_zero(path: Path) -> None:
    p = compressed_base(path)
    x = 62 - (p.cluster_bits - 8)
    p.set_refcount((p.l2(0) & ((1 << x) - 1)) >> 16, 0)


def d_compressed_clean(path: Path) -> None:
    compressed_base(path)


def d_snapshot_clean(path: Path) -> None:
    snapshot_base(path)


def d_snapshot_l1_refcount_zero(path: Path) -> None:
    p = snapshot_base(path)
    sn_l1 = p.u64(p.snapshots_offset)
    p.set_refcount(sn_l1 >> 16, 0)


def d_snapshot_table_refcount_zero(path: Path) -> None:
    p = snapshot_base(path)
    p.set_refcount(p.snapshots_offset >> 16, 0)


def d_snapshot_incomplete_extra(path: Path) -> None:
    p = snapshot_base(path)
    # shrink extra_data_size to 8 and move id/name so the entry still parses
    off = p.snapshots_offset
    with open(path, "rb") as f:
        f.seek(off)
        entry = f.read(256)
    id_len, name_len = struct.unpack_from(">HH", entry, 12)
    extra = struct.unpack_from(">I", entry, 36)[0]
    names = entry[40 + extra : 40 + extra + id_len + name_len]
    new = entry[:36] + struct.pack(">I", 8) + entry[40:48] + names
    p.put(off, new + b"\0" * (256 - len(new)))


def d_snapshot_l1_unaligned(path: Path) -> None:
    p = snapshot_base(path)
    p.put64(p.snapshots_offset, p.u64(p.snapshots_offset) + 512)


def d_snapshot_l1_outside(path: Path) -> None:
    p = snapshot_base(path)
    p.put64(p.snapshots_offset, (p.file_clusters() + 8) * CS)


def d_snapshot_extra_too_big(path: Path) -> None:
    p = snapshot_base(path)
    off = p.snapshots_offset
    with open(path, "rb") as f:
        f.seek(off)
        entry = f.read(256)
    id_len, name_len = struct.unpack_from(">HH", entry, 12)
    extra = struct.unpack_from(">I", entry, 36)[0]
    known = entry[40 : 40 + extra]
    names = entry[40 + extra : 40 + extra + id_len + name_len]
    big = known + bytes(range(256)) * 8
    p.put(off, entry[:36] + struct.pack(">I", len(big)) + big + names)


def d_snapshot_data_refcount_low(path: Path) -> None:
    p = snapshot_base(path)
    p.set_refcount(p.host(0) >> 16, 1)


def d_extended_l2_bitmap(path: Path) -> None:
    p = base(path, "extended_l2=on")
    addr = p.l2_addr(0)
    bitmap = p.u64(addr + 8)
    p.put64(addr + 8, bitmap | (1 << 32))  # subcluster 0 allocated and zero


def d_extended_l2_unallocated_bits(path: Path) -> None:
    p = base(path, "extended_l2=on")
    addr = p.l2_addr(5 << 20)
    assert p.u64(addr) == 0
    p.put64(addr + 8, 0x3)


def d_extended_l2_refcount_zero(path: Path) -> None:
    p = base(path, "extended_l2=on")
    p.set_refcount(p.host(0) >> 16, 0)


def d_refcount_bits_1_doubled(path: Path) -> None:
    base(path, "refcount_bits=1")
    p = Poke(path)
    p.put64(p.l2_addr(64 << 10), p.l2(0))


def d_small_clusters(path: Path) -> None:
    p = base(path, "cluster_size=4096")
    cluster = p.host(0) >> 12
    per = p.cs * 8 // 16
    block = p.refblock(cluster // per)
    p.put(block + (cluster % per) * 2, b"\0\0")


def d_fragmented_tables(path: Path) -> None:
    """4 KiB clusters (an L2 table maps 2 MiB), written backwards across table boundaries:
    fragmentation is counted per L2 table, as QEMU does."""
    mib = 1 << 20
    first = tuple(f"write -P 7 {t * 2 * mib} 4k" for t in (2, 1, 0))
    rest = tuple(f"write -P 8 {t * 2 * mib + 4096} {2 * mib - 4096}" for t in (0, 1, 2))
    backwards = tuple(f"write -P {i % 250 + 1} {8 * mib - (i + 1) * 12288} 8k" for i in range(100))
    base(path, "cluster_size=4096", writes=first + rest + backwards)


def d_prealloc_metadata_leak(path: Path) -> None:
    p = base(path, "preallocation=metadata", size="32M",
             writes=("write -P 1 1M 100k", "write -z 4M 1M", "discard 8M 1M"))
    p.put64(p.l2_addr(16 << 20), 0)  # an allocated zero cluster loses its mapping: a leak


def d_prealloc_extended_l2(path: Path) -> None:
    base(path, "extended_l2=on,preallocation=metadata", size="32M",
         writes=("write -P 1 1M 100k", "write -z 4M 1M", "discard 8M 1M"))


def d_tiny_clusters(path: Path) -> None:
    p = base(path, "cluster_size=512", size="4M",
             writes=("write -P 1 0 300k", "write -P 2 2M 100k"))
    p.put64(p.l2_addr(0), p.l2(0) & ~(1 << 63))


def d_huge_clusters(path: Path) -> None:
    base(path, "cluster_size=2M", size="64M", writes=("write -P 1 1M 100k", "write -P 2 9M 3M"))


def d_v2_leak(path: Path) -> None:
    p = base(path, "compat=0.10")
    p.put64(p.l2_addr(64 << 10), 0)


def d_bitmaps_refcounts_zeroed(path: Path) -> None:
    qemu_img("create", "-f", "qcow2", str(path), "64M")
    qemu_img("bitmap", "--add", str(path), "b0")
    qemu_img("bitmap", "--add", "-g", "65536", str(path), "b1")
    qemu_io(path, "write -P 1 0 1M", "write -P 2 30M 2M")
    p = Poke(path)
    p.put(p.refblock(0), b"\0" * 64)


def d_bitmaps_leak(path: Path) -> None:
    qemu_img("create", "-f", "qcow2", str(path), "64M")
    qemu_img("bitmap", "--add", str(path), "b0")
    qemu_io(path, "write -P 1 0 1M")
    p = Poke(path)
    n = p.file_clusters()
    with open(path, "ab") as f:
        f.write(b"\0" * CS)
    p.set_refcount(n, 1)


def d_data_file_leak(path: Path) -> None:
    data = path.with_suffix(".data")
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={data}", str(path), "64M")
    qemu_io(path, "write -P 1 0 1M", "write -P 2 30M 64k")
    p = Poke(path)
    n = p.file_clusters()
    with open(path, "ab") as f:
        f.write(b"\0" * CS)
    p.set_refcount(n, 1)
    p.put64(p.l2_addr(1 << 20), (1 << 63) | (1 << 20))  # data file cluster: no refcount


def d_lazy_dirty(path: Path) -> None:
    """Lazy refcounts, writer killed: refcounts on disk lag behind (dirty bit set)."""
    for when in (60, 40, 30, 50, 20, 45, 25, 35):
        if path.exists():
            path.unlink()
        qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4096",
                 str(path), "64M")
        _kill_writer(path, 200, kill_at="pwrite64", when=when)
        if Poke(path).u64(72) & 1 and qemu_check(path).get("corruptions"):
            return


def d_killed_writer(path: Path) -> None:
    """A writer SIGKILLed between a refcount flush and the L2 update: a leaked cluster."""
    for when in (40, 10, 5, 41, 11, 6, 39, 9, 4):
        if path.exists():
            path.unlink()
        qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(path), "64M")
        _kill_writer(path, 200, kill_at="fdatasync", when=when)
        if qemu_check(path).get("leaks"):
            return


def _kill_writer(path: Path, n: int, kill_at: str, when: int) -> None:
    """qemu-io doing n 4 KiB writes, SIGKILLed on entry to its `when`-th `kill_at` system
    call (strace fault injection), or after a short while without strace."""
    assert QEMU_IO is not None
    argv = [QEMU_IO, "-f", "qcow2"]
    for i in range(n):
        argv += ["-c", f"write -P {i % 250 + 1} {(i * 7919 % 16000) * 4096} 4k"]
    argv.append(str(path))
    strace = shutil.which("strace")
    if strace:
        inject = f"inject={kill_at}:signal=KILL:when={when}"
        subprocess.run([strace, "-f", "-o", os.devnull, "-e", inject, *argv],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.1)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


CASES: dict[str, Callable[[Path], None]] = {
    name[2:]: fn for name, fn in sorted(globals().items()) if name.startswith("d_") and callable(fn)
}


def make_case(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.qcow2"
    CASES[name](path)
    return path
