"""Zero clusters in the L2 tables of internal snapshots, turned into what qcow2 v2 can say
(the snapshot half of QEMU's qcow2_expand_zero_clusters, for amend compat=0.10).

Owns one rule, for images without a backing file (the only ones it accepts): a zero cluster
without a host cluster becomes unallocated (it reads as zeros either way), and a zero cluster
with one becomes a data cluster once that cluster holds zeros (only where every reference
to the host cluster comes through that table: nothing else shows its bytes). Each entry change reads the
same before and after and changes no refcount, so the order is simply: zeros written into
the host clusters, flush, L2 tables rewritten in place, flush; a crash anywhere (a torn table
write included) leaves a consistent image reading the same. Never allocates or frees, never
touches the active L1's tables (the caller expands those through the write path first);
must not import qcow2kit.image or anything above it.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..errors import UnsupportedFeatureError
from ..format import constants as C
from ..io.storage import Storage
from . import header_io
from .meta import Metadata
from .snapshot_commit import read_l1

U64 = npt.NDArray[np.uint64]
_OFFSET = np.uint64(C.OFFSET_MASK)
_ZERO = np.uint64(C.OFLAG_ZERO)
_COMPRESSED = np.uint64(C.OFLAG_COMPRESSED)


def _snapshot_l2_offsets(meta: Metadata) -> list[int]:
    offsets: set[int] = set()
    for sn in meta.snapshots:
        l1 = read_l1(meta, sn.l1_table_offset, sn.l1_size)
        offsets.update(int(o) for o in (l1 & _OFFSET).tolist() if o)
    return sorted(offsets)


def _zero_entries(table: U64) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """(zero clusters without a host cluster, zero clusters with one)."""
    zero = ((table & _ZERO) != 0) & ((table & _COMPRESSED) == 0)
    has_host = (table & _OFFSET) != 0
    return zero & ~has_host, zero & has_host


def _plan(storage: Storage, *, sharing: bool = True) -> tuple[Metadata, list[tuple[int, U64, list[int]]]]:
    """(table offset, new entries, host clusters to zero) for every snapshot L2 table with
    zero clusters; refuses, writing nothing, what this module cannot do. sharing=False skips
    the shared-host test (its answer changes once the active disk's zero clusters, which may
    share those hosts, have been expanded)."""
    header = header_io.read_header(storage)
    if header.extended_l2:
        raise UnsupportedFeatureError("extended L2 entries have no v2 form")
    meta = Metadata(storage, header)
    cs = meta.geom.cluster_size
    out: list[tuple[int, U64, list[int]]] = []
    for off in _snapshot_l2_offsets(meta):
        table = np.frombuffer(storage.pread(off, cs), dtype=">u8").astype(np.uint64)
        plain, alloc = _zero_entries(table)
        if not (plain.any() or alloc.any()):
            continue
        if plain.any() and header.backing_file:
            raise UnsupportedFeatureError(
                "downgrading an image with a backing file whose snapshots hold zero clusters "
                "is not supported")
        hosts = (table[alloc] & _OFFSET).astype(np.int64)
        if len(hosts) and sharing:
            # zeros may only go into a cluster no other table shows as data: every
            # reference to it comes through this table
            counts = meta.refcounts.values(np.unique(hosts // cs))
            if (counts != np.uint64(meta.refcounts.get(off // cs))).any():
                raise UnsupportedFeatureError(
                    "downgrading an image whose snapshots share a zero cluster's host "
                    "cluster with other tables is not supported")
        new = table.copy()
        new[plain] = 0
        new[alloc] &= ~_ZERO
        out.append((off, new, hosts.tolist()))
    return meta, out


def check_snapshot_zero_clusters(storage: Storage) -> None:
    """Refuse now (reading only) what expand_snapshot_zero_clusters would refuse whatever
    happens to the active disk first."""
    _plan(storage, sharing=False)


def expand_snapshot_zero_clusters(storage: Storage) -> None:
    """Rewrite the zero clusters of every snapshot's L2 tables (see the module docstring)."""
    meta, changed = _plan(storage)
    if not changed:
        return
    cs = meta.geom.cluster_size
    for _, _, hosts in changed:
        for host in hosts:
            storage.event("cluster_zero")
            storage.pwrite(host, bytes(cs))
    # the host clusters hold zeros before any entry says they hold data
    storage.flush()
    for off, new, _ in changed:
        storage.event("l2_update")
        storage.pwrite(off, new.astype(">u8").tobytes())
    storage.flush()


__all__ = ["check_snapshot_zero_clusters", "expand_snapshot_zero_clusters"]
