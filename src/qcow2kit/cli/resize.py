"""qcow2kit resize [--shrink] [--preallocation=MODE] [--compact] [-q] FILE [+|-]SIZE

Owns the command-line side of a resize: the size grammar (absolute or relative), qemu-img's
refusal of an unannounced shrink and its wording. Never changes an image it refused to resize.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import INT64_MAX, PROG, SIZE_HELP, UsageError, parse_option_size

SHRINK_REFUSAL = (
    "Use the --shrink option to perform a shrink operation.\n"
    "warning: Shrinking an image will delete all data beyond the shrunken image's end. Before "
    "performing such an operation, make sure there is no important data there."
)


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "resize",
        help="grow or shrink the virtual disk",
        usage="%(prog)s [-h] [--shrink] [--preallocation MODE] [--compact] [-q] filename "
        "[+|-]size",
        description="Change the virtual size of a qcow2 image. SIZE is absolute (1G) or "
        "relative to the current size (+512M, -1G); the last argument is always the size, so "
        "'resize --shrink img -1G' and 'resize --shrink img -- -1G' both work. "
        + SIZE_HELP.replace("is rounded up to the next one, as qemu-img does",
                            "is refused, as qemu-img does")
        + " Shrinking needs --shrink and frees every cluster past the new end, drops the L1 "
        "entries and refcount blocks that fall out of use, zeroes the tail of the last "
        "cluster, and truncates the file; a crash at any point leaves a consistent image (at "
        "worst with leaked clusters).",
    )
    p.add_argument("--shrink", action="store_true",
                   help="allow reducing the size (data past the new end is deleted)")
    p.add_argument("--preallocation", choices=("off", "metadata", "falloc", "full"),
                   default="off", metavar="MODE",
                   help="preallocate the added range (growing only): off, metadata, falloc, "
                   "full")
    p.add_argument("--compact", action="store_true",
                   help="after the resize, move clusters down so the file shrinks to what it uses")
    p.add_argument("-f", dest="fmt", default="qcow2", help="image format (only qcow2)")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing on success")
    p.add_argument("filename")
    p.add_argument("size", help="new size, or +SIZE / -SIZE relative to the current one")
    p.set_defaults(run=run)


def _as_int64(value: int) -> int:
    """qemu-img computes the new size in a signed 64-bit integer; a size past 2**63 wraps
    (and is then refused as not positive), so it does here."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value > INT64_MAX else value


def run(args: argparse.Namespace) -> int:
    import qcow2kit

    if args.fmt != "qcow2":
        raise UsageError(f"resizing '{args.fmt}' images is not supported (only qcow2)")
    text: str = args.size
    sign = {"+": 1, "-": -1}.get(text[:1], 0)
    amount = parse_option_size("size", text[1:] if sign else text)  # before opening, as qemu-img
    with qcow2kit.open(args.filename, "r+") as img:
        current = img.virtual_size
        new_size = _as_int64(current + sign * amount if sign else amount)
        if new_size <= 0:
            raise UsageError("New image size must be positive")
        if new_size < current and not args.shrink:
            for line in SHRINK_REFUSAL.split("\n"):
                print(f"{PROG}: {line}", file=sys.stderr)
            return 1
        try:
            img.resize(new_size, shrink=args.shrink, preallocation=args.preallocation)
        except qcow2kit.ResizeError as exc:
            for line in str(exc).split("\n"):
                print(f"{PROG}: {line}", file=sys.stderr)
            return 1
        if args.compact:
            img.compact()
    if not args.quiet:
        print("Image resized.")
    return 0
