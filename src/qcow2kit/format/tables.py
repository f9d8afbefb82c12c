"""numpy codecs for L1/L2/reftable tables and refcount blocks of every width.

Tables decode to native uint64 arrays; extended L2 tables decode to shape (n, 2).
Sub-byte refcounts are packed least-significant bit first, as the spec says. Refcounts
decode unsigned (a 64-bit refcount may use its top bit). Pure codecs: must never do I/O.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

U64 = npt.NDArray[np.uint64]
UArr = npt.NDArray[np.unsignedinteger]


def decode_table(buf: bytes | bytearray | memoryview, extended: bool = False) -> U64:
    arr = np.frombuffer(buf, dtype=">u8").astype(np.uint64)
    return arr.reshape(-1, 2) if extended else arr


def encode_table(arr: npt.NDArray[np.uint64]) -> bytes:
    return arr.reshape(-1).astype(">u8").tobytes()


def refcount_dtype(order: int) -> type[np.unsignedinteger]:
    if order <= 3:
        return np.uint8
    return {4: np.uint16, 5: np.uint32, 6: np.uint64}[order]  # type: ignore[return-value]


def decode_refblock(buf: bytes | bytearray | memoryview, order: int) -> UArr:
    raw = np.frombuffer(buf, dtype=np.uint8)
    if order == 3:
        return raw.copy()
    if order > 3:
        big = {4: ">u2", 5: ">u4", 6: ">u8"}[order]
        return np.frombuffer(buf, dtype=big).astype(refcount_dtype(order))
    bits = 1 << order
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    mask = np.uint8((1 << bits) - 1)
    return ((raw[:, None] >> shifts) & mask).reshape(-1)


def encode_refblock(values: npt.NDArray[np.unsignedinteger], order: int) -> bytes:
    if order == 3:
        return values.astype(np.uint8).tobytes()
    if order > 3:
        big = {4: ">u2", 5: ">u4", 6: ">u8"}[order]
        return bytes(values.astype(big).tobytes())
    bits = 1 << order
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    v = values.astype(np.uint8).reshape(-1, per_byte) << shifts
    return bytes(np.bitwise_or.reduce(v, axis=1).astype(np.uint8).tobytes())
