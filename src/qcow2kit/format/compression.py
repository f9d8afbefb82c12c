"""Compression of one cluster: raw deflate (window bits 12) and zstd."""

from __future__ import annotations

import io
import zlib

from ..errors import CorruptionError
from . import constants as C


def decompress(data: bytes, cluster_size: int, compression_type: int) -> bytes:
    try:
        if compression_type == C.COMPRESSION_ZLIB:
            out = zlib.decompressobj(-12).decompress(data, cluster_size)
        else:
            import zstandard

            reader = zstandard.ZstdDecompressor().stream_reader(
                io.BytesIO(data), read_across_frames=False
            )
            out = reader.read(cluster_size)
    except (zlib.error, Exception) as exc:  # zstandard raises its own ZstdError
        raise CorruptionError(f"compressed cluster does not decompress: {exc}") from None
    if len(out) != cluster_size:
        raise CorruptionError(
            f"compressed cluster decompresses to {len(out)} bytes, expected {cluster_size}"
        )
    return out


def compress(data: bytes, compression_type: int) -> bytes:
    if compression_type == C.COMPRESSION_ZLIB:
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        return c.compress(data) + c.flush()
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


def compress_clusters(data: memoryview, cluster_size: int, compression_type: int) -> tuple[
    list[tuple[int, bytes]], list[int]
]:
    """Compress each cluster of data (the last may be short: it is zero-padded). Returns
    (offset, compressed bytes) for clusters that shrink below the cluster size, and the
    offsets of those that do not (QEMU stores those uncompressed)."""
    packed: list[tuple[int, bytes]] = []
    plain: list[int] = []
    for pos in range(0, len(data), cluster_size):
        cluster = bytes(data[pos : pos + cluster_size])
        out = compress(cluster + bytes(cluster_size - len(cluster)), compression_type)
        if len(out) < cluster_size:
            packed.append((pos, out))
        else:
            plain.append(pos)
    return packed, plain
