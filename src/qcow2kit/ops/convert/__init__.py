"""convert: copy a virtual disk (qcow2 or raw) to a raw file or a new qcow2 image.

The entry point `convert`: checks the arguments the way qemu-img does, opens the source
and hands it to the raw writer (rawout) or the qcow2 pipeline (qcow2out). The pieces:
- source.py: `Source`, the chunked reader (zero ranges known without I/O), shared with
  compare;
- zeroscan.py: zero-block and backing-difference detection over buffers;
- rawout.py: sparse raw output;
- qcow2out.py: plain, compressed and backing-relative qcow2 output.
Never overwrites a file another process holds as an image, and never writes to the source.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from ...errors import FormatError, InvalidArgumentError, UnsupportedFeatureError
from ...image import Image, RawImage, open_any
from ...io.file import FileStorage
from .qcow2out import Progress, convert_qcow2
from .rawout import convert_raw
from .source import CHUNK_BYTES, Source, iter_chunks
from .zeroscan import nonzero_blocks

SPARSE_BYTES = 4096


def convert(
    src_path: str,
    dst_path: str,
    *,
    src_fmt: str | None = None,
    out_fmt: str = "raw",
    options: dict[str, Any] | None = None,
    compressed: bool = False,
    backing: str | None = None,
    backing_fmt: str | None = None,
    force_share: bool = False,
    progress: Progress | None = None,
    sparse_bytes: int = SPARSE_BYTES,
    cache: str = "unsafe",
    snapshot: tuple[str | None, str | None] | None = None,
) -> None:
    """Copy the virtual disk at src_path into a new raw file or qcow2 image at dst_path.

    snapshot: copy an internal snapshot's disk instead, as (id, name) from
    ops.snapshot.parse_snapshot_option (qemu-img convert -l).

    cache: "unsafe" (qemu-img convert's default) never waits for the disk; "writeback"
    flushes in crash-safe order and at the end.

    sparse_bytes: zero blocks of this size are left as holes / unallocated (qemu-img -S);
    0 writes every byte."""
    if sparse_bytes % 512 or not 0 <= sparse_bytes <= 16 << 20:
        raise InvalidArgumentError(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of "
            "512 up to 16777216."
        )
    if out_fmt not in ("raw", "qcow2"):
        raise FormatError(f"Unknown file format '{out_fmt}'")
    if cache not in ("unsafe", "writeback"):
        raise InvalidArgumentError(f"Invalid cache mode '{cache}' (unsafe or writeback)")
    _check_target_unlocked(dst_path)
    if out_fmt == "raw" and (compressed or backing is not None):
        what = "Compression" if compressed else "Backing files"
        raise FormatError(f"{what} not supported for file format 'raw'")
    if os.path.exists(dst_path) and os.path.exists(src_path) and os.path.samefile(
        src_path, dst_path
    ):
        raise FormatError("source and target are the same file")
    img = open_any(src_path, src_fmt, force_share=force_share)
    try:
        if snapshot is not None:
            _load_snapshot(img, snapshot)
        src = Source(img)
        prog = progress or (lambda n: None)
        if out_fmt == "raw":
            convert_raw(src, dst_path, prog, sparse_bytes)
        else:
            convert_qcow2(
                src, dst_path, options=options or {}, compressed=compressed,
                backing=backing, backing_fmt=backing_fmt, progress=prog,
                sparse_bytes=sparse_bytes, durable=cache != "unsafe",
            )
    finally:
        img.close()


def _load_snapshot(img: Image | RawImage, snapshot: tuple[str | None, str | None]) -> None:
    from ..snapshot import view_snapshot

    if not isinstance(img, Image):
        raise UnsupportedFeatureError(
            "Failed to load snapshot: Block format 'raw' used by device '' does not support "
            "temporarily loading internal snapshots")
    view_snapshot(img, *snapshot)


def _check_target_unlocked(path: str) -> None:
    """Refuse (like qemu-img) to overwrite a regular file another process has open as an
    image: take and drop the write lock before anything truncates it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        return
    FileStorage(path, True).close()


__all__ = ["CHUNK_BYTES", "SPARSE_BYTES", "Source", "convert", "iter_chunks", "nonzero_blocks"]
