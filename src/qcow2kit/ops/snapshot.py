"""snapshot: list, create, apply and delete internal snapshots as `qemu-img snapshot` does,
with its table layout and messages; and the Image-level calls the Python API delegates to.

Listing stays light (header and snapshot table through format/ codecs; no numpy). The table
changes live in metadata.snapshots (imported lazily) and are crash-safe there; this module
only opens images and turns errors into qemu-img's words. Must not import qcow2kit.cli.
"""

from __future__ import annotations

import os
import time

from ..chain import probe_format
from ..errors import FormatError, Qcow2Error
from ..format import constants as C
from ..format.features import Autoclear
from ..format.snapshot import Snapshot, parse_snapshots
from ..io.file import FileStorage
from ..metadata.header_io import read_header
from .info import size_to_str

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time
if TYPE_CHECKING:
    from ..image import Image


class SnapshotCommandError(Qcow2Error):
    """A `snapshot` command failed; the message is qemu-img's."""


# ---- listing -----------------------------------------------------------------------------
def read_snapshots(path: str, *, force_share: bool = False) -> list[Snapshot]:
    """The snapshot table of a qcow2 image ([] for raw files and data-file images, which
    cannot hold snapshots)."""
    if probe_format(path) != "qcow2":
        return []
    storage = FileStorage(path, False, force_share=force_share)
    try:
        header = read_header(storage)
        if header.has_data_file or header.nb_snapshots == 0:
            return []
        if header.nb_snapshots > C.MAX_SNAPSHOTS:
            raise FormatError(f"Could not open '{path}': Snapshot table too large")
        size = storage.size()
        if header.snapshots_offset == 0 or header.snapshots_offset >= size:
            raise FormatError(f"snapshots_offset {header.snapshots_offset:#x} lies outside the file")
        nbytes = min(C.MAX_SNAPSHOT_TABLE_BYTES, size - header.snapshots_offset)
        buf = storage.pread(header.snapshots_offset, nbytes)
        return parse_snapshots(buf, header.nb_snapshots, header.cluster_size)
    finally:
        storage.close()


def _b(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _left(raw: bytes, width: int) -> bytes:
    # C's %-Ns pads by bytes and never truncates
    return raw + b" " * max(0, width - len(raw))


def _right(raw: bytes, width: int) -> bytes:
    return b" " * max(0, width - len(raw)) + raw


def list_row(sn: Snapshot) -> bytes:
    """One row of qemu-img's snapshot table ("%-9s %-16s %8s%20s%13s%11s")."""
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn.date_sec))
    secs = sn.vm_clock_nsec // 1_000_000_000
    ms = (sn.vm_clock_nsec // 1_000_000) % 1000
    clock = f"{secs // 3600:02d}:{(secs // 60) % 60:02d}:{secs % 60:02d}.{ms:03d}"
    icount = sn.icount
    if icount is None or icount == (1 << 64) - 1:
        icount_text = ""
    else:
        icount_text = str(icount - (1 << 64) if icount >> 63 else icount)  # printed as int64
    return (
        _left(_b(sn.id_str), 9) + b" " + _left(_b(sn.name), 16) + b" "
        + _right(size_to_str(sn.vm_state_size_large).encode(), 8)
        + _right(date.encode(), 20) + _right(clock.encode(), 13) + _right(icount_text.encode(), 11)
    )


def list_table(snapshots: list[Snapshot]) -> bytes:
    """`qemu-img snapshot -l` output: nothing at all when there are no snapshots."""
    if not snapshots:
        return b""
    head = f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"
    lines = [b"Snapshot list:", head.encode(), *(list_row(sn) for sn in snapshots)]
    return b"\n".join(lines) + b"\n"


# ---- the Image-level calls -----------------------------------------------------------------
def create_snapshot(img: Image, name: str) -> Snapshot:
    """Snapshot the active disk under `name` (cut to 255 bytes); returns the new entry."""
    return img.create_snapshot(name)


def delete_snapshot(img: Image, name_or_id: str) -> Snapshot:
    """Delete the first snapshot named name_or_id, else the first with that ID."""
    return img.delete_snapshot(name_or_id)


def apply_snapshot(img: Image, id_or_name: str) -> Snapshot:
    """Revert the active disk (and its size) to the snapshot with ID id_or_name, else the
    first one with that name."""
    return img.apply_snapshot(id_or_name)


# ---- read-only views -------------------------------------------------------------------------
SNAPSHOT_OPT_BASE = "snapshot."


def parse_snapshot_option(text: str) -> tuple[str | None, str | None]:
    """`convert -l`: "snapshot.id=ID[,snapshot.name=NAME]" (either or both; ",," is a
    literal comma) gives (id, name); a plain NAME gives (NAME, NAME), meaning "the ID,
    else the name", as qemu-img."""
    if not text.startswith(SNAPSHOT_OPT_BASE):
        return text, text
    ident: str | None = None
    name: str | None = None
    parts, cur, i = [], "", 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    parts.append(cur)
    for part in parts:
        key, sep, value = part.partition("=")
        if key == "snapshot.id" and sep:
            ident = value
        elif key == "snapshot.name" and sep:
            name = value
        else:
            raise SnapshotCommandError(
                f"Invalid parameter '{key}'\nFailed in parsing snapshot param '{text}'")
    return ident, name


def find_view(snapshots: list[Snapshot], ident: str | None, name: str | None) -> int | None:
    """Index of the snapshot `convert -l` means: both given, the first matching both; a
    plain name (ident == name), the first with that ID, else the first with that name."""
    if ident is not None and ident == name:
        for field in ("id_str", "name"):
            for i, sn in enumerate(snapshots):
                if getattr(sn, field) == ident:
                    return i
        return None
    for i, sn in enumerate(snapshots):
        if (ident is None or sn.id_str == ident) and (name is None or sn.name == name):
            return i
    return None


def view_snapshot(img: Image, ident: str | None, name: str | None = None) -> Snapshot:
    """Turn a read-only Image into a view of one snapshot's disk (see find_view for how
    ident / name select it); read, as_file, map and convert then see that disk."""
    from ..metadata import snapshots

    index = find_view(img.snapshots, ident, name)
    if index is None:
        raise SnapshotCommandError("Failed to load snapshot: Can't find snapshot")
    return snapshots.load_view(img.meta, index)


def open_snapshot(path: str, id_or_name: str, *, force_share: bool = False,
                  backing: bool = True) -> Image:
    """Open a read-only view of one snapshot's disk: the first snapshot with that ID,
    else the first with that name."""
    from ..image import Image

    img = Image.open_path(path, writable=False, force_share=force_share, backing=backing)
    try:
        view_snapshot(img, id_or_name, id_or_name)
    except BaseException:
        img.close()
        raise
    return img


# ---- the command -------------------------------------------------------------------------
def _strerror(code: int) -> str:
    return os.strerror(code)


def _has_bitmaps(path: str) -> bool:
    storage = FileStorage(path, False)
    try:
        header = read_header(storage)
    finally:
        storage.close()
    ext = header.bitmaps
    return bool(header.autoclear_features & Autoclear.BITMAPS) and ext is not None and (
        ext.nb_bitmaps > 0)


def _open_rw(path: str) -> Image:
    from ..image import Image

    return Image.open_path(path, writable=True, backing=False)


def create_command(path: str, name: str) -> None:
    from ..metadata import snapshots

    if probe_format(path) != "qcow2":
        raise SnapshotCommandError(f"Could not create snapshot '{name}': -95 (Operation not supported)")
    with _open_rw(path) as img:
        try:
            create_snapshot(img, name)
        except snapshots.REFUSALS as exc:
            code = exc.errno
            raise SnapshotCommandError(
                f"Could not create snapshot '{name}': -{code} ({_strerror(code)})"
            ) from None


def delete_command(path: str, name: str) -> None:
    from ..metadata import snapshots

    if probe_format(path) != "qcow2":
        raise SnapshotCommandError(f"Could not delete snapshot '{name}': snapshot not found")
    with _open_rw(path) as img:
        try:
            delete_snapshot(img, name)
        except snapshots.SnapshotNotFoundError:
            raise SnapshotCommandError(
                f"Could not delete snapshot '{name}': snapshot not found") from None
        except snapshots.REFUSALS as exc:
            raise SnapshotCommandError(f"Could not delete snapshot '{name}': {exc}") from None


def apply_command(path: str, name: str) -> None:
    from ..metadata import snapshots

    if probe_format(path) != "qcow2":
        raise SnapshotCommandError(
            f"Could not apply snapshot '{name}': Block driver does not support snapshots")
    if _has_bitmaps(path):
        # refused before a read-write open could touch anything
        raise SnapshotCommandError(f"Could not apply snapshot '{name}': Device has active "
                                   "dirty bitmaps")
    with _open_rw(path) as img:
        try:
            apply_snapshot(img, name)
        except snapshots.ActiveBitmapsError as exc:
            raise SnapshotCommandError(f"Could not apply snapshot '{name}': {exc}") from None
        except snapshots.REFUSALS as exc:
            raise SnapshotCommandError(
                f"Could not apply snapshot '{name}': Failed to load snapshot: "
                f"{_strerror(exc.errno)}"
            ) from None


__all__ = [
    "SnapshotCommandError", "parse_snapshot_option", "find_view", "view_snapshot",
    "open_snapshot", "read_snapshots", "list_row", "list_table", "create_snapshot",
    "delete_snapshot", "apply_snapshot", "create_command", "delete_command", "apply_command",
]
