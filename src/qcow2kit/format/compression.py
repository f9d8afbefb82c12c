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
