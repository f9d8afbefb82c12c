"""Persistent dirty bitmaps as the check counts them: the bitmap directory, each bitmap
table and the clusters its entries point at are references; malformed table entries are
corruptions (QEMU's qcow2_check_bitmaps_refcounts).

Reads the bitmaps extension and directory only; never writes. Must not import
qcow2kit.image.
"""

from __future__ import annotations

import struct

import numpy as np

from ...format import constants as C
from ...format.extensions import BitmapsExtension
from ...format.features import Autoclear
from .result import CheckFailedError
from .state import CheckState

_BME_OFFSET_MASK = 0x00FFFFFFFFFFFE00
_BME_RESERVED_MASK = 0xFF000000000001FE
_BME_ALL_ONES = 1
_BITMAP_DIR_ENTRY = struct.Struct(">QIIBBHI")


def check_bitmaps(st: CheckState) -> None:
    header = st.meta.header
    data = header.extension(C.EXT_BITMAPS)
    if data is None or not header.autoclear_features & Autoclear.BITMAPS:
        return
    try:
        ext = BitmapsExtension.from_bytes(data)
    except ValueError:
        return
    if ext.nb_bitmaps == 0:
        return
    st.inc_region(ext.directory_offset, ext.directory_size)
    directory = st.storage.pread(ext.directory_offset, ext.directory_size)
    pos = 0
    tables: list[tuple[int, int]] = []
    for _ in range(ext.nb_bitmaps):
        if pos + _BITMAP_DIR_ENTRY.size > len(directory):
            st.res.corruptions += 1
            raise CheckFailedError("Invalid argument")
        t_off, t_size, _flags, _typ, _gran, name_size, extra = _BITMAP_DIR_ENTRY.unpack_from(directory, pos)
        pos += _BITMAP_DIR_ENTRY.size + extra + name_size
        pos += -pos % 8
        tables.append((t_off, t_size))
    for t_off, t_size in tables:
        st.inc_region(t_off, t_size * 8)
        table = np.frombuffer(st.storage.pread(t_off, t_size * 8), dtype=">u8").astype(np.uint64)
        offs = table & np.uint64(_BME_OFFSET_MASK)
        bad = (table & np.uint64(_BME_RESERVED_MASK)) != 0
        bad |= (offs != 0) & (((table & np.uint64(_BME_ALL_ONES)) != 0) | ((offs & np.uint64(st.cs - 1)) != 0))
        st.res.corruptions += int(np.count_nonzero(bad))
        for o in offs[~bad & (offs != 0)].tolist():
            st.inc_region(int(o), st.cs)
