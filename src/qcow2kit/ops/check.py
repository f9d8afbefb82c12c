"""check: open an image file for checking (or repairing) and render the result the way
`qemu-img check` does (human summary, JSON).

Opening goes through the metadata layer directly rather than Image, because a check must
work on images that Image refuses to open (corrupt bit set, no refcount table, a snapshot
table that does not parse) and must not run the automatic dirty-bit repair first: it is the
repair. Imports metadata, format and io only, and those only inside check_path: the
rendering serves the numpy-free fast path too (ops/check_plain.py), whose results it prints
exactly as the full check's.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time
if TYPE_CHECKING:
    from typing import Protocol

    from ..metadata.check import CheckResult

    class Summary(Protocol):
        """What rendering reads: CheckResult, or check_plain's CleanResult."""

        @property
        def corruptions(self) -> int: ...
        @property
        def leaks(self) -> int: ...
        @property
        def check_errors(self) -> int: ...
        @property
        def corruptions_fixed(self) -> int: ...
        @property
        def leaks_fixed(self) -> int: ...
        @property
        def image_end_offset(self) -> int: ...
        @property
        def total_clusters(self) -> int: ...
        @property
        def allocated_clusters(self) -> int: ...
        @property
        def fragmented_clusters(self) -> int: ...
        @property
        def compressed_clusters(self) -> int: ...

# qemu-img prints its JSON in QDict bucket order; these are the keys in that order
_JSON_ORDER = (
    ("image-end-offset", "image_end_offset"),
    ("compressed-clusters", "compressed_clusters"),
    ("total-clusters", "total_clusters"),
    ("corruptions", "corruptions"),
    ("corruptions-fixed", "corruptions_fixed"),
    ("check-errors", "check_errors"),
    ("leaks", "leaks"),
    ("leaks-fixed", "leaks_fixed"),
    ("allocated-clusters", "allocated_clusters"),
    ("filename", None),
    ("format", None),
    ("fragmented-clusters", "fragmented_clusters"),
)


def check_path(path: str, repair: str | None = None, *, force_share: bool = False) -> CheckResult:
    """Check (or repair) the qcow2 image at path. Raises UnsupportedFeatureError for raw."""
    from ..chain import probe_format
    from ..errors import UnsupportedFeatureError
    from ..io.file import FileStorage
    from ..metadata.check import check_image
    from ..metadata.check.opening import open_for_check

    if probe_format(path) != "qcow2":
        raise UnsupportedFeatureError("This image format does not support checks")
    storage = FileStorage(path, repair is not None, force_share=force_share)
    try:
        return check_image(open_for_check(storage), repair)
    finally:
        storage.close()


def to_json_dict(result: Summary, filename: str, fmt: str = "qcow2") -> dict[str, object]:
    """The keys qemu-img check --output=json prints (optional ones only when non-zero)."""
    out: dict[str, object] = {}
    for key, attr in _JSON_ORDER:
        if attr is None:
            out[key] = filename if key == "filename" else fmt
        elif key == "check-errors":
            out[key] = result.check_errors
        else:
            value = getattr(result, attr)
            if value:
                out[key] = value
    return out


def to_json(result: Summary, filename: str, fmt: str = "qcow2") -> str:
    """json.dumps(..., indent=4) of to_json_dict, plus a newline."""
    d = to_json_dict(result, filename, fmt)
    if all(type(v) is int or (type(v) is str and _PLAIN.issuperset(v)) for v in d.values()):
        # the usual case, written directly: importing json (and compiling its regular
        # expressions) is a measurable part of a small check's start-up
        body = ",\n".join(f'    "{k}": "{v}"' if type(v) is str else f'    "{k}": {v}' for k, v in d.items())
        return "{\n" + body + "\n}\n"
    import json  # names with characters JSON escapes

    return json.dumps(d, indent=4) + "\n"


# characters json.dumps (ensure_ascii) writes unchanged inside a string
_PLAIN = frozenset(chr(c) for c in range(0x20, 0x7F)) - {'"', "\\"}


def repair_banner(result: CheckResult) -> str:
    return (
        "The following inconsistencies were found and repaired:\n\n"
        f"    {result.leaks_fixed} leaked clusters\n"
        f"    {result.corruptions_fixed} corruptions\n\n"
        "Double checking the fixed image now...\n"
    )


def to_human(result: Summary) -> str:
    """The summary qemu-img check prints on stdout."""
    parts: list[str] = []
    if not (result.corruptions or result.leaks or result.check_errors):
        parts.append("No errors were found on the image.\n")
    else:
        if result.corruptions:
            parts.append(
                f"\n{result.corruptions} errors were found on the image.\n"
                "Data may be corrupted, or further writes to the image may corrupt it.\n"
            )
        if result.leaks:
            parts.append(
                f"\n{result.leaks} leaked clusters were found on the image.\n"
                "This means waste of disk space, but no harm to data.\n"
            )
        if result.check_errors:
            parts.append(f"\n{result.check_errors} internal errors have occurred during the check.\n")
    if result.total_clusters and result.allocated_clusters:
        a, t = result.allocated_clusters, result.total_clusters
        parts.append(
            f"{a}/{t} = {a * 100.0 / t:0.2f}% allocated, "
            f"{result.fragmented_clusters * 100.0 / a:0.2f}% fragmented, "
            f"{result.compressed_clusters * 100.0 / a:0.2f}% compressed clusters\n"
        )
    if result.image_end_offset:
        parts.append(f"Image end offset: {result.image_end_offset}\n")
    return "".join(parts)
