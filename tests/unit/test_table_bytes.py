"""metadata/table_bytes.py: tables gathered in the order asked, whatever their file order."""

from __future__ import annotations

import random

from qcow2kit.io.memory import MemoryStorage
from qcow2kit.metadata.table_bytes import read_tables


class CountingStorage(MemoryStorage):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def pread(self, offset: int, length: int) -> bytes:
        self.reads += 1
        return super().pread(offset, length)


def test_read_tables_order_and_coalescing() -> None:
    size = 512
    st = CountingStorage()
    blob = random.Random(1).randbytes(64 * size)
    st.pwrite(0, blob)
    for offsets in ([3 * size], [0, size, 2 * size], [5 * size, 4 * size, 9 * size, 6 * size, 0],
                    [7 * size, 7 * size], list(range(63 * size, -1, -size))):
        st.reads = 0
        got = read_tables(st, offsets, size)
        assert got == b"".join(blob[o : o + size] for o in offsets)
        runs = 1 + sum(1 for a, b in zip(sorted(offsets), sorted(offsets)[1:], strict=False) if b != a + size)
        assert st.reads == runs
    assert read_tables(st, [], size) == b""
