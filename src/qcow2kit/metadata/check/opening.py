"""Opening an image for check and repair only: the header may lack a refcount table
(refcount_table_clusters 0, or offset 0), which QEMU reports and `-r all` rebuilds, and a
snapshot table that fails strict parsing is left for the check to judge.

Everything else about the header is validated as for any open. Every other way of opening
keeps refusing such images (header_io and Metadata without `for_check`). Must never write.
"""

from __future__ import annotations

import struct

from ...errors import FormatError
from ...format import constants as C
from ...format.header import Header
from ...io.storage import Storage
from .. import header_io
from ..meta import Metadata

_REFTABLE_FIELDS = struct.Struct(">QI")  # refcount_table_offset, refcount_table_clusters


def read_header_for_check(storage: Storage) -> Header:
    """The header; one whose refcount table is missing is validated like any other, the
    missing table apart, instead of refused."""
    try:
        return header_io.read_header(storage)
    except FormatError as exc:
        refused = exc
    size = storage.size()
    head = bytearray(storage.pread(0, min(size, 1 << C.MAX_CLUSTER_BITS)))
    if len(head) < C.HEADER_REFTABLE_OFFSET + _REFTABLE_FIELDS.size:
        raise refused
    rt_offset, rt_clusters = _REFTABLE_FIELDS.unpack_from(head, C.HEADER_REFTABLE_OFFSET)
    if rt_offset and rt_clusters:
        raise refused
    # validate the rest with a one-cluster stand-in table, then put the real fields back
    _REFTABLE_FIELDS.pack_into(head, C.HEADER_REFTABLE_OFFSET, rt_offset, max(rt_clusters, 1))
    try:
        header = Header.from_bytes(bytes(head))
    except FormatError:
        raise refused from None
    cs = header.cluster_size
    if rt_offset + rt_clusters * cs > size:
        raise refused
    # the other tables must lie inside the file as for any open (the stand-in has no size)
    header.replace(refcount_table_offset=cs, refcount_table_clusters=0).check_fits(size)
    return header.replace(refcount_table_offset=rt_offset, refcount_table_clusters=rt_clusters)


def open_for_check(storage: Storage) -> Metadata:
    """Metadata for check_image: a missing refcount table and a snapshot table that does
    not parse are reported by the check, not refused here."""
    header = read_header_for_check(storage)
    try:
        return Metadata(storage, header, for_check=True)
    except FormatError:
        if not header.nb_snapshots:
            raise
    # like QEMU in check mode: the snapshot table is read (and judged) by the check
    meta = Metadata(storage, header.replace(nb_snapshots=0), for_check=True)
    meta.header = header
    return meta
