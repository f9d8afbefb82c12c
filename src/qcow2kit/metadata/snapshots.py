"""Internal snapshots: the snapshot table's semantics as QEMU 7.2 has them (lookup orders,
ID allocation, name truncation, the entry `qemu-img snapshot -c` writes) and create /
apply / delete expressed as reference changes.

Each operation only computes which references appear and disappear; snapshot_commit.commit
turns that into a whole new state and switches to it with one header write (see its
docstring for the crash-safety argument). This module never writes to storage itself and
must not import qcow2kit.image or anything above it.
"""

from __future__ import annotations

import errno as errnos
import struct
import time
from dataclasses import replace

import numpy as np

from ..errors import ImageStateError, InvalidArgumentError, UnsupportedFeatureError
from ..format import constants as C
from ..format.features import Autoclear
from ..format.snapshot import Snapshot, snapshot_table_bytes
from .l2map import L2Map
from .meta import Metadata
from .refchanges import RefChanges
from .snapshot_commit import (
    RefcountOverflowError,
    TableReader,
    commit,
    read_l1,
    span,
    tree_refs,
)

MAX_NAME_BYTES = 255
_ULONG_MAX = (1 << 64) - 1


class SnapshotError(InvalidArgumentError):
    """A snapshot request QEMU refuses too; `errno` is the error number QEMU reports."""

    errno = errnos.EINVAL


class SnapshotNotFoundError(SnapshotError):
    errno = errnos.ENOENT


class TooManySnapshotsError(SnapshotError):
    errno = errnos.EFBIG


class SnapshotsUnsupportedError(UnsupportedFeatureError):
    """Images with an external data file cannot hold internal snapshots."""

    errno = errnos.ENOTSUP


class ActiveBitmapsError(SnapshotError):
    """QEMU refuses to apply a snapshot while any persistent bitmap exists."""


# every refusal QEMU reports with an error number (`errno`)
REFUSALS = (SnapshotError, SnapshotsUnsupportedError, RefcountOverflowError)

__all__ = [
    "REFUSALS",
    "SnapshotError", "SnapshotNotFoundError", "TooManySnapshotsError",
    "SnapshotsUnsupportedError", "ActiveBitmapsError", "RefcountOverflowError",
    "find", "next_id", "truncate_name", "completed", "create", "apply", "delete", "load_view",
]


# ---- the table's semantics ---------------------------------------------------------------
def find(snapshots: list[Snapshot], key: str, *, id_first: bool) -> int | None:
    """Index of the first entry whose ID (then name), or name (then ID), equals key.
    QEMU's `-a` looks up IDs first and `-d` names first."""
    fields = ("id_str", "name") if id_first else ("name", "id_str")
    for field in fields:
        for i, sn in enumerate(snapshots):
            if getattr(sn, field) == key:
                return i
    return None


def _strtoul(text: str) -> int:
    """C strtoul(text, NULL, 10): leading blanks, a sign, digits; 0 without digits,
    ULONG_MAX on overflow, a minus sign negates modulo 2^64."""
    s = text.lstrip(" \t\n\v\f\r")
    neg = s[:1] == "-"
    if s[:1] in "+-" and s:
        s = s[1:]
    digits = ""
    for ch in s:
        if not "0" <= ch <= "9":
            break
        digits += ch
    if not digits:
        return 0
    value = int(digits)
    if value > _ULONG_MAX:
        return _ULONG_MAX
    return (-value) & _ULONG_MAX if neg else value


def next_id(snapshots: list[Snapshot]) -> str:
    """QEMU's choice: one more than the largest ID read as a number."""
    top = max((_strtoul(sn.id_str) for sn in snapshots), default=0)
    return str((top + 1) & _ULONG_MAX)


def truncate_name(name: str) -> str:
    """Names are cut to 255 bytes silently, as QEMU does (byte-wise; a cut UTF-8 sequence
    keeps its bytes through surrogate escapes)."""
    raw = name.encode("utf-8", "surrogateescape")
    return raw[:MAX_NAME_BYTES].decode("utf-8", "surrogateescape")


def completed(snap: Snapshot, size: int) -> Snapshot:
    """The entry as QEMU 7.2 rewrites it: at least 24 bytes of extra data, a missing disk
    size filled with the current size and a missing icount with -1 (unknown extra data
    beyond the 24 bytes is kept)."""
    extra = snap.extra_data
    if len(extra) >= 24:
        return snap
    fields = [snap.vm_state_size_large, snap.disk_size if snap.disk_size is not None else size,
              (1 << 64) - 1]
    have = len(extra) // 8
    fill = b"".join(struct.pack(">Q", v) for v in fields[have:])
    return replace(snap, extra_data=extra[: have * 8] + fill)


def has_persistent_bitmaps(meta: Metadata) -> bool:
    ext = meta.header.bitmaps
    return bool(meta.header.autoclear_features & Autoclear.BITMAPS) and ext is not None and (
        ext.nb_bitmaps > 0)


def _prepare(meta: Metadata) -> None:
    meta.check_writable()
    if meta.header.has_data_file:
        raise SnapshotsUnsupportedError("Operation not supported")
    # everything cached reaches the disk first: the new state is built from what is there
    meta.release_pending()
    meta.flush()


# ---- operations --------------------------------------------------------------------------
def create(meta: Metadata, name: str, *, now: float | None = None) -> Snapshot:
    """Make a snapshot of the active disk; the old active L1 table becomes the snapshot's."""
    if meta.header.has_data_file:
        raise SnapshotsUnsupportedError("Operation not supported")
    if len(meta.snapshots) >= C.MAX_SNAPSHOTS:
        raise TooManySnapshotsError(f"an image holds at most {C.MAX_SNAPSHOTS} snapshots")
    _prepare(meta)
    stamp = time.time() if now is None else now
    sec = int(stamp)
    usec = int(round((stamp - sec) * 1_000_000)) % 1_000_000
    size = meta.header.size
    extra = struct.pack(">QQQ", 0, size, 0)  # vm_state_size_large, disk_size, icount
    snap = Snapshot(
        meta.l2.l1_offset if meta.l2.l1_size else 0, meta.l2.l1_size, next_id(meta.snapshots),
        truncate_name(name), sec & 0xFFFFFFFF, usec * 1000, 0, 0, extra,
    )
    kept = [completed(sn, size) for sn in meta.snapshots]
    if len(snapshot_table_bytes([*kept, snap])) > C.MAX_SNAPSHOT_TABLE_BYTES:
        raise TooManySnapshotsError("Snapshot table is too big")
    net, reader = RefChanges(meta), TableReader(meta)
    active = meta.l2.l1.copy()
    tables, data = tree_refs(meta, reader, active)
    net.add(tables, 1, referenced="an L2 table")
    net.add(data, 1, referenced="a data cluster")
    commit(meta, net, reader, size=size, active_l1=active, snapshots=[*kept, snap],
           old_l1_kept=True)
    return snap


def delete(meta: Metadata, key: str) -> Snapshot:
    """Delete the first snapshot named key, else the first with ID key."""
    index = find(meta.snapshots, key, id_first=False)
    if index is None:
        raise SnapshotNotFoundError(f"no snapshot named (or with ID) {key!r}")
    _prepare(meta)
    snap = meta.snapshots[index]
    net, reader = RefChanges(meta), TableReader(meta)
    l1 = read_l1(meta, snap.l1_table_offset, snap.l1_size)
    tables, data = tree_refs(meta, reader, l1)
    net.add(tables, -1)
    net.add(data, -1)
    net.add(span(meta, snap.l1_table_offset, snap.l1_size * 8), -1)
    rest = [completed(sn, meta.header.size)
            for sn in meta.snapshots[:index] + meta.snapshots[index + 1 :]]
    commit(meta, net, reader, size=meta.header.size, active_l1=meta.l2.l1.copy(),
           snapshots=rest, old_l1_kept=False)
    return snap


def apply(meta: Metadata, key: str) -> Snapshot:
    """Make the snapshot with ID key (else the first named key) the active disk, at the
    snapshot's disk size."""
    index = find(meta.snapshots, key, id_first=True)
    if meta.header.has_data_file:
        raise SnapshotsUnsupportedError("Operation not supported")
    if index is None:
        raise SnapshotNotFoundError(f"no snapshot with ID (or named) {key!r}")
    if has_persistent_bitmaps(meta):
        raise ActiveBitmapsError("Device has active dirty bitmaps")
    _prepare(meta)
    snap = meta.snapshots[index]
    size = snap.disk_size if snap.disk_size is not None else meta.header.size
    l1 = read_l1(meta, snap.l1_table_offset, snap.l1_size)
    need = meta.geom.l1_entries_for(size)
    if need > len(l1):
        if need * 8 > C.MAX_L1_BYTES:
            raise SnapshotError(f"the L1 table for {size} bytes would exceed its limit")
        l1 = np.concatenate((l1, np.zeros(need - len(l1), dtype=np.uint64)))
    net, reader = RefChanges(meta), TableReader(meta)
    new_tables, new_data = tree_refs(meta, reader, l1)
    old_tables, old_data = tree_refs(meta, reader, meta.l2.l1)
    net.add(new_tables, 1, referenced="an L2 table")
    net.add(new_data, 1, referenced="a data cluster")
    net.add(old_tables, -1)
    net.add(old_data, -1)
    kept = [completed(sn, meta.header.size) for sn in meta.snapshots]
    commit(meta, net, reader, size=size, active_l1=l1, snapshots=kept, old_l1_kept=False)
    return snap



# ---- read-only view ------------------------------------------------------------------------
def _no_writes(*_: object) -> None:
    raise ImageStateError("a snapshot view is read-only")


def load_view(meta: Metadata, index: int) -> Snapshot:
    """Point a read-only Metadata at snapshot `index`'s disk: its L1 table and its disk size
    (QEMU's temporary snapshot load keeps the current size; reading the snapshot's own size
    loses nothing when the image has since been shrunk)."""
    if meta.writable:
        raise ImageStateError("a snapshot can only be viewed through a read-only image")
    snap = meta.snapshots[index]
    size = snap.disk_size if snap.disk_size is not None else meta.header.size
    read_l1(meta, snap.l1_table_offset, snap.l1_size)  # validates the table's place
    meta.l2 = L2Map(
        meta.storage, meta.geom, snap.l1_table_offset, snap.l1_size,
        data_file=meta.header.has_data_file, before_l2_write=_no_writes,
        cache_tables=meta.l2.cache.capacity, zero_flags=meta.l2.zero_flags,
    )
    meta.header = meta.header.replace(size=size, l1_size=snap.l1_size,
                          l1_table_offset=snap.l1_table_offset)
    return snap
