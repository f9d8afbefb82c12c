"""convert: copy a virtual disk (qcow2 or raw) to a raw file or a new qcow2 image.

The entry point `convert`: checks the arguments the way qemu-img does, opens the source
and hands it to the raw writer (rawout) or the qcow2 pipeline (qcow2out). The pieces:
- early.py, rawpump.py, planned.py: raw -> plain qcow2 and plain qcow2 -> raw (the common
  cases): the data is copied on two threads (for qcow2 output at a layout planned up
  front, whose metadata is written after), without numpy or the image code in the process
  (this module imports neither at start-up);
- compressor.py: the compression jobs of -c; for a raw source, reading and compressing
  start before the image code is imported;
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
from collections.abc import Callable

from ...errors import FormatError, InvalidArgumentError, UnsupportedFeatureError
from ...io.file import FileStorage
from .early import finish_raw, start_compressed, start_to_qcow2, start_to_raw

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time
if TYPE_CHECKING:
    from typing import Any

    from ...image import Image, RawImage
    from .compressor import CompressPump
    from .source import CHUNK_BYTES, Source, iter_chunks
    from .zeroscan import nonzero_blocks

Progress = Callable[[int], None]

SPARSE_BYTES = 4096


def __getattr__(name: str) -> Any:
    # the source side and the zero scan import numpy: loaded on first use only
    if name in ("CHUNK_BYTES", "Source", "iter_chunks"):
        from . import source

        return getattr(source, name)
    if name == "nonzero_blocks":
        from .zeroscan import nonzero_blocks

        return nonzero_blocks
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    opts = options or {}
    if not compressed and backing is None and snapshot is None and progress is None and (
            cache == "unsafe"):
        if out_fmt == "qcow2":
            early = start_to_qcow2(src_path, dst_path, src_fmt, opts, force_share, sparse_bytes)
            if early is not None:
                from .planned import finish

                finish(early)
                return
        else:
            early = start_to_raw(src_path, dst_path, src_fmt, force_share, sparse_bytes)
            if early is not None:
                finish_raw(early)
                return
    pump = None
    if compressed and out_fmt == "qcow2" and backing is None and snapshot is None and (
            progress is None):
        # the source is read and compressed while the image code is imported
        pump = start_compressed(src_path, dst_path, src_fmt, opts, force_share, sparse_bytes)
    try:
        _convert_general(
            src_path, dst_path, src_fmt=src_fmt, out_fmt=out_fmt, options=opts,
            compressed=compressed, backing=backing, backing_fmt=backing_fmt,
            force_share=force_share, progress=progress or (lambda n: None),
            sparse_bytes=sparse_bytes, cache=cache, snapshot=snapshot, early=pump,
        )
    finally:
        if pump is not None:
            pump.close()
            pump.source.close()


def _convert_general(
    src_path: str,
    dst_path: str,
    *,
    src_fmt: str | None,
    out_fmt: str,
    options: dict[str, Any],
    compressed: bool,
    backing: str | None,
    backing_fmt: str | None,
    force_share: bool,
    progress: Progress,
    sparse_bytes: int,
    cache: str,
    snapshot: tuple[str | None, str | None] | None,
    early: CompressPump | None,
) -> None:
    from ...image import open_any
    from .qcow2out import convert_qcow2
    from .rawout import convert_raw
    from .source import Source

    img = open_any(src_path, src_fmt, force_share=force_share)
    try:
        if snapshot is not None:
            _load_snapshot(img, snapshot)
        src = Source(img)
        if out_fmt == "raw":
            convert_raw(src, dst_path, progress, sparse_bytes)
        else:
            convert_qcow2(
                src, dst_path, options=options, compressed=compressed,
                backing=backing, backing_fmt=backing_fmt, progress=progress,
                sparse_bytes=sparse_bytes, durable=cache != "unsafe", early=early,
            )
    finally:
        img.close()


def _load_snapshot(img: Image | RawImage, snapshot: tuple[str | None, str | None]) -> None:
    from ...image import Image
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
