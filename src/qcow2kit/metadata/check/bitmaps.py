"""Persistent dirty bitmaps as the check counts them: the bitmap directory, each bitmap
table and the clusters its entries point at are references; malformed table entries are
corruptions (QEMU's qcow2_check_bitmaps_refcounts).

Reads the bitmaps extension and directory only; never writes. Must not import
qcow2kit.image.
"""

from __future__ import annotations

import numpy as np

from ...errors import FormatError
from ...format import constants as C
from ...format.bitmaps import TABLE_ALL_ONES, TABLE_OFFSET_MASK, TABLE_RESERVED_MASK, parse_directory
from ...format.extensions import BitmapsExtension
from ...format.features import Autoclear
from .result import CheckFailedError
from .state import CheckState

_BME_OFFSET_MASK = TABLE_OFFSET_MASK
_BME_RESERVED_MASK = TABLE_RESERVED_MASK
_BME_ALL_ONES = TABLE_ALL_ONES


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
    try:
        entries = parse_directory(directory, ext.nb_bitmaps)
    except FormatError:
        st.res.corruptions += 1
        raise CheckFailedError("Invalid argument") from None
    tables = [(e.bitmap_table_offset, e.bitmap_table_size) for e in entries]
    for t_off, t_size in tables:
        st.inc_region(t_off, t_size * 8)
        table = np.frombuffer(st.storage.pread(t_off, t_size * 8), dtype=">u8").astype(np.uint64)
        offs = table & np.uint64(_BME_OFFSET_MASK)
        bad = (table & np.uint64(_BME_RESERVED_MASK)) != 0
        bad |= (offs != 0) & (((table & np.uint64(_BME_ALL_ONES)) != 0) | ((offs & np.uint64(st.cs - 1)) != 0))
        st.res.corruptions += int(np.count_nonzero(bad))
        for o in offs[~bad & (offs != 0)].tolist():
            st.inc_region(int(o), st.cs)
