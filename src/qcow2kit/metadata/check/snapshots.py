"""The snapshot table as the check sees it: read with qemu-img check's tolerance (limits
reported as check errors, too much extra data discarded when repairing), incomplete v3
entries reported, and the table rewritten with complete entries by `-r all`.

Entry decoding is format.snapshot's; this module owns only the check's verdicts and the
rewrite's ordering: new table written and flushed, the header switched with one write,
flushed, and only then the old table freed. Must not import qcow2kit.image.
"""

from __future__ import annotations

import struct
from dataclasses import replace

import numpy as np

from ...format import constants as C
from ...format.snapshot import (
    RawSnapshotEntry,
    SnapshotExtraTooLargeError,
    iter_snapshot_entries,
    parse_snapshots,
)
from .result import FIX_ERRORS, CheckFailedError, Counts
from .state import CheckState


def read_snapshot_table(st: CheckState, res: Counts) -> None:
    """Read the table into st.snapshots, counting its problems in `res`; raises
    CheckFailedError where qemu-img's check fails ("Check failed")."""
    header = st.meta.header
    nb = header.nb_snapshots
    offset = header.snapshots_offset
    reduced = 0
    if nb > C.MAX_SNAPSHOTS and st.fix & FIX_ERRORS:
        st.msgs.append(f"Discarding {nb - C.MAX_SNAPSHOTS} overhanging snapshots")
        reduced += nb - C.MAX_SNAPSHOTS
        nb = C.MAX_SNAPSHOTS
    problem = None
    if nb > C.MAX_SNAPSHOTS:
        problem = "snapshot table too large"
    elif (1 << 63) - 1 - nb * 40 < offset or offset & (st.cs - 1):
        problem = "snapshot table offset invalid"
    if problem is not None:
        res.check_errors += 1
        st.msgs.append(f"qcow2kit: ERROR {problem}")
        if nb > C.MAX_SNAPSHOTS:
            st.msgs.append(
                f"You can force-remove all {nb - C.MAX_SNAPSHOTS} overhanging snapshots with "
                "qemu-img check -r all"
            )
        raise CheckFailedError("File too large" if "large" in problem else "Invalid argument")
    if nb == 0:
        return
    if st.fix & FIX_ERRORS and nb != header.nb_snapshots:
        raise CheckFailedError("repairing an oversized snapshot table is not supported")
    dropped = 0
    table: list[RawSnapshotEntry] = []
    entries = iter_snapshot_entries(st.storage.pread, offset, nb, trim_extra=bool(st.fix & FIX_ERRORS))
    try:
        for i, sn in enumerate(entries):
            if sn.extra_data_size > C.MAX_SNAPSHOT_EXTRA_BYTES:
                st.msgs.append(
                    f"Discarding too much extra metadata in snapshot table entry {i} "
                    f"({sn.extra_data_size} > {C.MAX_SNAPSHOT_EXTRA_BYTES})"
                )
                dropped += 1
            if sn.end - offset > C.MAX_SNAPSHOT_TABLE_BYTES:
                res.check_errors += 1
                st.msgs.append("qcow2kit: ERROR failed to read the snapshot table: Snapshot table is too big")
                st.msgs.append(
                    f"You can force-remove all {nb - i} overhanging snapshots with qemu-img check -r all"
                )
                raise CheckFailedError("File too large")
            table.append(sn)
    except SnapshotExtraTooLargeError as exc:
        res.check_errors += 1
        st.msgs.append(
            "qcow2kit: ERROR failed to read the snapshot table: Too much extra metadata in "
            f"snapshot table entry {exc.index}"
        )
        st.msgs.append("You can force-remove this extra metadata with qemu-img check -r all")
        raise CheckFailedError("File too large") from None
    st.snapshots = table
    st.snapshots_offset = offset
    st.snapshots_size = table[-1].end - offset
    res.corruptions += reduced + dropped
    if header.version >= 3:
        for i, sn in enumerate(table):
            if sn.extra_data_size < 16:
                res.corruptions += 1
                word = "Repairing" if st.fix & FIX_ERRORS else "ERROR"
                st.msgs.append(f"{word} snapshot table entry {i} is incomplete")


def _completed(sn: RawSnapshotEntry, disk_size_now: int) -> RawSnapshotEntry:
    """The entry with the v3 extra data QEMU requires: 64-bit VM state size, disk size
    (the current one when unknown) and icount (-1 when unknown)."""
    ex = sn.extra_data
    vm_size = int.from_bytes(ex[0:8], "big") if len(ex) >= 8 else sn.vm_state_size
    disk = int.from_bytes(ex[8:16], "big") if len(ex) >= 16 else disk_size_now
    icount = ex[16:24] if len(ex) >= 24 else b"\xff" * 8
    extra = vm_size.to_bytes(8, "big") + disk.to_bytes(8, "big") + icount + ex[24:]
    return replace(
        sn,
        extra_data=extra,
        extra_data_size=len(extra),
        vm_state_size=vm_size if vm_size <= 0xFFFFFFFF else 0,
    )


def rewrite_snapshot_table(st: CheckState) -> None:
    """Write the snapshot table anew with complete entries (new table, flush, switch
    the header with one write, flush, free the old table)."""
    meta = st.meta
    cs, cb = st.cs, st.cb
    size_now = meta.header.size
    parts = [_completed(sn, size_now).to_bytes() for sn in st.snapshots]
    table = b"".join(parts)
    clusters = -(-len(table) // cs)
    rc = meta.refcounts
    start = rc.allocate(clusters)
    rc.sync()  # the new table's refcounts are durable before anything points at it
    st.storage.event("snapshot_table_write")
    st.storage.pwrite(start << cb, table + b"\0" * (clusters * cs - len(table)))
    st.storage.flush()
    st.storage.event("header_update")
    st.storage.pwrite(C.HEADER_SNAPSHOTS_OFFSET, struct.pack(">IQ", len(parts), start << cb))
    st.storage.flush()
    old_off, old_size = st.snapshots_offset, st.snapshots_size
    meta.header = meta.header.replace(nb_snapshots=len(parts), snapshots_offset=start << cb)
    if old_size:
        first, last = old_off >> cb, (old_off + old_size - 1) >> cb
        freed = rc.adjust(np.arange(first, last + 1, dtype=np.int64), -1)
        rc.sync()
        meta.forget_freed(freed, punch=True)
    try:
        meta.snapshots = parse_snapshots(table, len(parts), cs)
    except ValueError:
        pass
