"""Feature bit sets and the feature-name table. Imports nothing.

The bit sets are plain int constants, not enum.IntFlag: importing enum costs the light
commands start-up time, and with plain ints `bits & ~Incompatible.DIRTY` keeps every other
bit (an IntFlag's complement would drop bits it does not name).
"""

from __future__ import annotations


class Incompatible:
    DIRTY = 1 << 0
    CORRUPT = 1 << 1
    EXTERNAL_DATA_FILE = 1 << 2
    COMPRESSION_TYPE = 1 << 3
    EXTENDED_L2 = 1 << 4


class Compatible:
    LAZY_REFCOUNTS = 1 << 0


class Autoclear:
    BITMAPS = 1 << 0
    DATA_FILE_RAW = 1 << 1


KNOWN_INCOMPATIBLE = 0x1F
KNOWN_COMPATIBLE = 0x1
KNOWN_AUTOCLEAR = 0x3

# (type, bit, name) as QEMU writes its feature-name table
FEATURE_NAMES: tuple[tuple[int, int, str], ...] = (
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
)
