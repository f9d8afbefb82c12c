"""Opening what an image refers to: format probing, the backing chain's files, the
external data file, and RawImage (a raw file seen as a virtual disk).

Owns: the one format probe (`probe_format`), the path-safety rules for file names found
inside an image (relative to the image's directory; plain regular files only, never a
protocol URL, directory, FIFO or device; no NUL bytes), backing-chain loop and depth limits.
Opening a qcow2 file itself is Image's job (image.py builds on this module); nothing here
parses qcow2 metadata or writes to any file.
"""

from __future__ import annotations

import os
import stat

from .errors import FormatError, UnsupportedFeatureError
from .format.header import Header
from .io.file import FileStorage
from .io.storage import Storage

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time
if TYPE_CHECKING:
    from typing import Protocol
else:
    Protocol = object  # only type checkers need the protocol machinery

MAX_BACKING_DEPTH = 64
QCOW2_MAGIC = b"QFI\xfb"


class Readable(Protocol):
    """What a backing file offers its overlay: a size and reads."""

    @property
    def virtual_size(self) -> int: ...

    @property
    def filename(self) -> str: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


class RawImage:
    """A raw file seen as a virtual disk."""

    format_name = "raw"

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.filename = storage.name
        self.virtual_size = storage.size()

    def read(self, offset: int, length: int) -> bytes:
        return self.storage.pread(offset, length)

    def close(self) -> None:
        self.storage.close()


def probe_format(path: str) -> str:
    """"qcow2" when the file starts with the qcow2 magic, else "raw" (as qemu-img probes)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    return "qcow2" if magic == QCOW2_MAGIC else "raw"


def open_raw(path: str, *, writable: bool = False, force_share: bool = False) -> RawImage:
    return RawImage(FileStorage(path, writable, force_share=force_share))


def relative_to(owner: str, name: str) -> str:
    """A name stored in an image, resolved against the image's directory."""
    if os.path.isabs(name) or not owner:
        return name
    return os.path.join(os.path.dirname(owner), name)


def plain_file_path(owner: str, name: str, what: str) -> str:
    """The path of a file named inside the image `owner`, refused unless it is a regular
    file: never a protocol URL, a directory, a FIFO (which would block), or a device."""
    if "\0" in name:
        raise FormatError(f"{what} name {name!r} contains a NUL byte")
    path = relative_to(owner, name)
    if ":" in name.split("/")[0] and not os.path.lexists(path):
        raise UnsupportedFeatureError(
            f"{what} '{name}' looks like a protocol URL; only plain files are opened"
        )
    try:
        st = os.stat(path)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise FormatError(f"Could not open {what} '{path}': {reason}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise UnsupportedFeatureError(
            f"{what} '{path}' is not a regular file; only plain files are opened"
        )
    return path


def open_data_file(owner: str, header: Header, writable: bool) -> Storage:
    """The external data file of an image whose header says it has one. It is not locked
    separately: the image's own lock covers it, as in QEMU."""
    name = header.data_file
    if name is None:
        raise FormatError("'data-file' is required for this image (no data file extension)")
    path = plain_file_path(owner, name, "data file")
    try:
        return FileStorage(path, writable, lock=False)
    except OSError as exc:
        raise FormatError(f"Could not open data file '{path}': {exc.strerror}") from exc


def backing_path(owner: str, header: Header, chain: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """The backing file's path and the chain to open it with, refusing loops and chains
    deeper than MAX_BACKING_DEPTH."""
    assert header.backing_file is not None
    path = plain_file_path(owner, header.backing_file, "backing file")
    real = os.path.realpath(path)
    me = os.path.realpath(owner)
    if real in chain or real == me:
        raise FormatError(f"backing chain loops back to '{header.backing_file}'")
    if len(chain) >= MAX_BACKING_DEPTH:
        raise FormatError(f"backing chain deeper than {MAX_BACKING_DEPTH} images")
    return path, chain + (me,)


__all__ = [
    "MAX_BACKING_DEPTH",
    "Readable",
    "RawImage",
    "probe_format",
    "open_raw",
    "relative_to",
    "plain_file_path",
    "open_data_file",
    "backing_path",
]
