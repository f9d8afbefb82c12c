"""qcow2kit measure [--output=human|json] [-O FMT] [-o OPTS] [--size N | [-f FMT] [-l SNAP] FILE]

Owns the command line of measure (qemu-img's syntax, output layout and refusals) and
`print_errors`, the one way the amend / measure / rebase / commit commands print a possibly
multi-line qemu-img message. Never opens an image for writing.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .common import PROG, UsageError, parse_bool, parse_option_number, parse_option_size, parse_size

_SIZE_KEYS = ("size", "cluster_size", "extent_size_hint")
_NUMBER_KEYS = ("refcount_bits",)
_BOOL_KEYS = ("lazy_refcounts", "extended_l2", "data_file_raw", "encryption", "nocow")


def print_errors(message: str) -> int:
    """qemu-img prefixes every line of a multi-line error; exit code 1."""
    for line in message.split("\n"):
        print(f"{PROG}: {line}", file=sys.stderr)
    return 1


def typed_options(items: list[str] | None, target: str) -> dict[str, object]:
    """-o key=value,... with each value read as qemu's option parser reads its type; a bad
    value fails like qemu_opts_do_parse, naming the format."""
    out: dict[str, object] = {}
    for item in items or []:
        for part in item.split(","):
            if not part:
                continue
            key, sep, value = part.partition("=")
            try:
                if key in _SIZE_KEYS:
                    out[key] = parse_option_size(key, value)
                elif key in _NUMBER_KEYS:
                    out[key] = parse_option_number(key, value)
                elif key in _BOOL_KEYS:
                    out[key] = parse_bool(key, value if sep else "on")
                else:
                    out[key] = value
            except UsageError as exc:
                # two reports: the value's (its own lines unprefixed), then the format's
                raise UsageError(f"{exc}\n{PROG}: Invalid options for file format '{target}'") \
                    from None
    return out


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "measure",
        help="how large a new image would be",
        description="Compute the size a new image of format -O (default raw) needs: for "
        "an empty disk of --size bytes, or holding FILE's disk (its whole backing chain). "
        "Prints 'required size' (what the data needs), 'fully allocated size' and, for qcow2 "
        "v3 targets of a qcow2 v3 source, 'bitmaps size', with qemu-img's numbers.",
    )
    p.add_argument("--output", default="human", help="human or json")
    p.add_argument("-O", dest="out_fmt", default="raw", help="target format (raw, qcow2)")
    p.add_argument("-o", dest="options", action="append", help="target create options")
    p.add_argument("--size", help="measure an empty disk of this size")
    p.add_argument("-f", dest="fmt", help="format of FILE")
    p.add_argument("-l", dest="snapshot", help="measure an internal snapshot of FILE")
    p.add_argument("-U", "--force-share", dest="force_share", action="store_true",
                   help="open FILE even if another process is using it")
    p.add_argument("files", nargs="*", metavar="FILE")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import Qcow2Error
    from ..ops.measure import measure

    if args.output not in ("human", "json"):
        return print_errors("--output must be used with human or json as argument.")
    size = parse_size(args.size, "image size") if args.size is not None else None
    if len(args.files) > 1:
        return print_errors("At most one filename argument is allowed.")
    path = args.files[0] if args.files else None
    if path is not None and size is not None:
        return print_errors("--size N cannot be used together with a filename.")
    if path is None and size is None:
        return print_errors("Either --size N or one filename must be specified.")
    try:
        options = typed_options(args.options, args.out_fmt)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    try:
        result = measure(path, size=size, out_format=args.out_fmt, fmt=args.fmt,
                         snapshot=args.snapshot, force_share=args.force_share, **options)
    except Qcow2Error as exc:
        return print_errors(str(exc))
    if args.output == "json":
        body: dict[str, int] = {}
        if result.bitmaps is not None:
            body["bitmaps"] = result.bitmaps
        body["required"] = result.required
        body["fully-allocated"] = result.fully_allocated
        print(json.dumps(body, indent=4))
    else:
        print(f"required size: {result.required}")
        print(f"fully allocated size: {result.fully_allocated}")
        if result.bitmaps is not None:
            print(f"bitmaps size: {result.bitmaps}")
    return 0
