"""qcow2kit resize [--shrink] [--preallocation=MODE] [-q] FILE [+|-]SIZE"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import UsageError, parse_size


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "resize",
        help="grow or shrink the virtual disk",
        description="Change the virtual size of a qcow2 image. SIZE may be absolute (1G) or "
        "relative (+512M, -1G); suffixes k, M, G, T. Shrinking needs --shrink and frees every "
        "cluster past the new end, drops the L1 entries and refcount blocks that fall out of "
        "use, zeroes the tail of the last cluster, and truncates the file; a crash at any "
        "point leaves a consistent image (at worst with leaked clusters).",
    )
    p.add_argument("--shrink", action="store_true",
                   help="allow reducing the size (data past the new end is deleted)")
    p.add_argument("--preallocation", choices=("off", "metadata", "falloc", "full"),
                   default="off", help="preallocate the added range (growing only)")
    p.add_argument("--compact", action="store_true",
                   help="after the resize, move clusters down so the file shrinks to what it uses")
    p.add_argument("-f", dest="fmt", default="qcow2", help="image format (only qcow2)")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing on success")
    p.add_argument("filename")
    p.add_argument("size", help="new size, or +SIZE / -SIZE relative to the current one")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import qcow2kit

    if args.fmt != "qcow2":
        raise UsageError(f"resizing '{args.fmt}' images is not supported (only qcow2)")
    text: str = args.size
    relative = 0
    if text[:1] in "+-":
        relative = 1 if text[0] == "+" else -1
        text = text[1:]
    amount = parse_size(text)
    with qcow2kit.open(args.filename, "r+") as img:
        new_size = img.virtual_size + relative * amount if relative else amount
        if new_size <= 0:
            raise UsageError("New image size must be positive")
        try:
            img.resize(new_size, shrink=args.shrink, preallocation=args.preallocation)
        except qcow2kit.ResizeError as exc:
            lines = str(exc).split("\n")
            for line in lines:
                print(f"qcow2kit: {line}", file=sys.stderr)
            return 1
        if args.compact:
            img.compact()
    if not args.quiet:
        print("Image resized.")
    return 0
