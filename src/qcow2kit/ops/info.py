"""info: the facts `qemu-img info` reports about an image, as the same JSON value, and
qemu-img's human layout.

Start-up must stay light: this module reads the header through metadata.header_io and the
snapshot / bitmap directories through format/ codecs only. It must not import numpy (so
not image.py, metadata.meta or format.tables). json and re are imported where used: the
human layout needs neither, and each costs start-up time.
"""

from __future__ import annotations

import os
import stat
import time

from ..chain import probe_format
from ..errors import FormatError, UnsupportedFeatureError
from ..format import constants as C
from ..format.features import Autoclear, Incompatible
from ..format.header import Header
from ..io.file import FileStorage
from ..metadata.header_io import read_header

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time
if TYPE_CHECKING:
    from typing import Any

    from ..format.snapshot import Snapshot

_MAX_BACKING_DEPTH = 64  # as image.MAX_BACKING_DEPTH (not imported: this module stays light)


def full_backing_filename(image_filename: str, backing: str) -> str:
    """The backing name resolved the way QEMU combines paths: relative names are taken
    relative to the directory part of the overlay's name, as given (not made absolute)."""
    if backing.startswith("/") or not backing:
        return backing
    slash = image_filename.rfind("/")
    if slash < 0:
        return backing
    return image_filename[: slash + 1] + backing


def _actual_size(path: str) -> int:
    return os.stat(path).st_blocks * 512


def _snapshot_json(sn: Snapshot) -> dict[str, Any]:
    out: dict[str, Any] = {}
    icount = sn.icount
    if icount is not None and icount != (1 << 64) - 1:
        out["icount"] = icount - (1 << 64) if icount >> 63 else icount  # QEMU's int64
    out["vm-clock-nsec"] = sn.vm_clock_nsec % 1_000_000_000
    out["name"] = sn.name
    out["date-sec"] = sn.date_sec
    out["date-nsec"] = sn.date_nsec
    out["vm-clock-sec"] = sn.vm_clock_nsec // 1_000_000_000
    out["id"] = sn.id_str
    out["vm-state-size"] = sn.vm_state_size_large
    return out


def _bitmaps(storage: FileStorage, header: Header) -> list[dict[str, Any]] | None:
    if not header.autoclear_features & Autoclear.BITMAPS:
        return None
    ext = header.bitmaps
    if ext is None or ext.nb_bitmaps == 0:
        return None
    from ..format.bitmaps import parse_directory  # only images with bitmaps pay for it

    entries = parse_directory(storage.pread(ext.directory_offset, ext.directory_size), ext.nb_bitmaps)
    out: list[dict[str, Any]] = []
    for e in entries:
        names = (["in-use"] if e.in_use else []) + (["auto"] if e.enabled else [])
        out.append({"flags": names, "name": e.name, "granularity": e.granularity})
    return out


def _qcow2_specific(storage: FileStorage, header: Header) -> dict[str, Any]:
    data: dict[str, Any] = {}
    ctype = C.COMPRESSION_NAMES.get(header.compression_type, "zlib")
    if header.version < 3:
        data["compat"] = "0.10"
        data["compression-type"] = ctype
        data["refcount-bits"] = header.refcount_bits
        return data
    data["compat"] = "1.1"
    data["compression-type"] = ctype
    data["lazy-refcounts"] = bool(header.compatible_features & 1)
    bitmaps = _bitmaps(storage, header)
    if bitmaps is not None:
        data["bitmaps"] = bitmaps
    data["refcount-bits"] = header.refcount_bits
    if header.has_data_file:
        if header.data_file is not None:
            data["data-file"] = header.data_file
        data["data-file-raw"] = header.data_file_raw
    data["corrupt"] = bool(header.incompatible_features & Incompatible.CORRUPT)
    data["extended-l2"] = header.extended_l2
    return data


def image_info(path: str, fmt: str | None = None, *, force_share: bool = False) -> dict[str, Any]:
    """One image's `qemu-img info --output=json` value (backing files are not opened)."""
    fmt = fmt or probe_format(path)
    storage = FileStorage(path, False, force_share=force_share)
    try:
        if fmt == "raw":
            size = storage.size()
            return {
                "virtual-size": -(-size // 512) * 512,
                "filename": path,
                "format": "raw",
                "actual-size": _actual_size(path),
                "dirty-flag": False,
            }
        if fmt != "qcow2":
            raise FormatError(f"unsupported image format '{fmt}'")
        header = read_header(storage)
        info: dict[str, Any] = {}
        if header.backing_file is not None and header.backing_format is not None:
            info["backing-filename-format"] = header.backing_format
        if header.nb_snapshots:
            size = storage.size()
            if header.snapshots_offset == 0 or header.snapshots_offset >= size:
                raise FormatError(
                    f"snapshots_offset {header.snapshots_offset:#x} lies outside the file"
                )
            nbytes = min(C.MAX_SNAPSHOT_TABLE_BYTES, size - header.snapshots_offset)
            buf = storage.pread(header.snapshots_offset, nbytes)
            from ..format.snapshot import parse_snapshots  # only images with snapshots need it

            snaps = parse_snapshots(buf, header.nb_snapshots, header.cluster_size)
            info["snapshots"] = [_snapshot_json(s) for s in snaps]
        info["virtual-size"] = header.size
        info["filename"] = path
        info["cluster-size"] = header.cluster_size
        info["format"] = "qcow2"
        info["actual-size"] = _actual_size(path)
        info["format-specific"] = {"type": "qcow2", "data": _qcow2_specific(storage, header)}
        if header.backing_file is not None:
            info["full-backing-filename"] = full_backing_filename(path, header.backing_file)
            info["backing-filename"] = header.backing_file
        info["dirty-flag"] = bool(header.incompatible_features & Incompatible.DIRTY)
        return info
    finally:
        storage.close()


def chain_info(
    path: str, fmt: str | None = None, *, force_share: bool = False
) -> list[dict[str, Any]]:
    """`qemu-img info --backing-chain`: the image, then each backing file in turn."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    cur: str | None = path
    cur_fmt = fmt
    while cur is not None:
        real = os.path.realpath(cur)
        if real in seen:
            raise FormatError(f"Backing file '{cur}' creates an infinite loop.")
        seen.add(real)
        info = image_info(cur, cur_fmt, force_share=force_share)
        out.append(info)
        cur = info.get("full-backing-filename")
        cur_fmt = info.get("backing-filename-format")
        if cur is not None and not os.path.exists(cur):
            raise FormatError(f"Could not open '{cur}': No such file or directory")
        if cur is not None and not stat.S_ISREG(os.stat(cur).st_mode):
            # never a FIFO (opening it would block), a device or a directory
            raise UnsupportedFeatureError(
                f"backing file '{cur}' is not a regular file; only plain files are opened"
            )
        if cur is not None and len(out) >= _MAX_BACKING_DEPTH:
            raise FormatError(f"backing chain deeper than {_MAX_BACKING_DEPTH} images")
    return out


# ---- JSON as qemu-img prints it -------------------------------------------------------------
def qemu_json(value: Any, level: int = 0) -> str:
    """JSON in qemu-img's pretty layout (4-space indent; empty lists as "[" newline "]")."""
    import json

    pad = " " * (4 * (level + 1))
    end = " " * (4 * level)
    if isinstance(value, dict):
        if not value:
            return "{\n" + end + "}"
        items = [f"{pad}{json.dumps(k)}: {qemu_json(v, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + end + "}"
    if isinstance(value, list):
        if not value:
            return "[\n" + end + "]"
        return "[\n" + ",\n".join(pad + qemu_json(v, level + 1) for v in value) + "\n" + end + "]"
    if isinstance(value, str):
        # names keep undecodable bytes as surrogate escapes; JSON shows them as U+FFFD
        value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return _upper_escapes(json.dumps(value))


_ESCAPE = r"(?<!\\)((?:\\\\)*)\\u([0-9a-f]{4})"


def _upper_escapes(text: str) -> str:
    """QEMU writes \\uXXXX escapes with capital hex digits."""
    if "\\u" not in text:
        return text
    import re

    return re.sub(_ESCAPE, lambda m: m.group(1) + "\\u" + m.group(2).upper(), text)


# ---- human layout ----------------------------------------------------------------------
def size_to_str(value: int) -> str:
    """qemu's size_to_str: three significant digits, binary units, switching unit at 1000."""
    suffixes = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
    # frexp's exponent of the scaled value, for a whole number of bytes (no math module to
    # load at start-up): the bit length of its integer part
    exp = int(value / (1000.0 / 1024.0)).bit_length()
    i = int((exp - 1) / 10)
    div = 1 << (i * 10)
    return "%0.3g %sB" % (value / div, suffixes[i])  # noqa: UP031 - C printf semantics


def _left(text: str, width: int) -> str:
    # C's %-Ns pads by bytes, not characters
    return text + " " * max(0, width - len(text.encode("utf-8", "surrogateescape")))


def _snapshot_row(sn: dict[str, Any]) -> str:
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn["date-sec"]))
    secs = sn["vm-clock-sec"]
    ms = sn["vm-clock-nsec"] // 1_000_000
    clock = f"{secs // 3600:02d}:{(secs // 60) % 60:02d}:{secs % 60:02d}.{ms % 1000:03d}"
    icount = str(sn["icount"]) if "icount" in sn else ""
    return (
        f"{_left(sn['id'], 9)} {_left(sn['name'], 16)} {size_to_str(sn['vm-state-size']):>8}"
        f"{date:>20}{clock:>13}{icount:>11}"
    )


def _dump_value(lines: list[str], value: Any, indent: int, key: str | None) -> None:
    pad = " " * (indent * 4)
    label = key.replace("-", " ") if key is not None else None
    if isinstance(value, dict):
        if label is not None:
            lines.append(f"{pad}{label}:")
            indent += 1
        for k, v in value.items():
            _dump_value(lines, v, indent, k)
    elif isinstance(value, list):
        if label is not None:
            lines.append(f"{pad}{label}:")
        inner = " " * ((indent + 1) * 4)
        for i, item in enumerate(value):
            if isinstance(item, dict | list):
                lines.append(f"{inner}[{i}]:")
                _dump_value(lines, item, indent + 2, None)
            else:
                lines.append(f"{inner}[{i}]: {_scalar(item)}")
    else:
        lines.append(f"{pad}{label}: {_scalar(value)}")


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def human(info: dict[str, Any]) -> str:
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)",
        f"disk size: {size_to_str(info['actual-size'])}",
    ]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full is not None and full != info["backing-filename"]:
            line += f" (actual path: {full})"
        lines.append(line)
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        lines.append("Snapshot list:")
        lines.append(
            f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"
        )
        for sn in info["snapshots"]:
            lines.append(_snapshot_row(sn))
    spec = info.get("format-specific")
    if spec:
        lines.append("Format specific information:")
        _dump_value(lines, spec["data"], 1, None)
    return "\n".join(lines) + "\n"


def human_chain(infos: list[dict[str, Any]]) -> str:
    return "\n".join(human(i) for i in infos)


__all__ = ["image_info", "chain_info", "human", "human_chain", "size_to_str",
           "full_backing_filename", "qemu_json"]
