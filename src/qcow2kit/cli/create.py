"""qcow2kit create [-f qcow2] [-o key=value,...] [-b BACKING -F FMT] [-u] FILE [SIZE]

Owns the command-line side of create: the -o option list, where the size comes from
(positional SIZE, -o size=, or the backing file) and qemu-img's rounding of it up to 512 bytes.
Never writes an image itself: ops/create.py does, after every argument has been checked.
"""

from __future__ import annotations

import argparse
from typing import Any

from .common import (
    INT64_MAX,
    SIZE_HELP,
    UsageError,
    parse_bool,
    parse_option_number,
    parse_option_size,
    parse_options,
    parse_size,
    round_to_sector,
)

_SIZE_OPTS = {"cluster_size"}
_NUMBER_OPTS = {"refcount_bits"}
_BOOL_OPTS = {"lazy_refcounts", "extended_l2", "data_file_raw"}
_STR_OPTS = {"backing_file", "backing_fmt", "data_file"}
# option -> (the name qemu-img's message uses, the values it accepts)
_CHOICE_OPTS = {
    "compat": ("version", ("0.10", "v2", "1.1", "v3")),
    "preallocation": ("preallocation", ("off", "metadata", "falloc", "full")),
    "compression_type": ("compression-type", ("zlib", "zstd")),
}


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "create",
        help="create a new qcow2 image",
        description="Create a qcow2 image of SIZE bytes. " + SIZE_HELP + " The size may "
        "instead be given as -o size=SIZE (not both), or left out when there is a backing "
        "file (its size is used). Options (-o, comma separated): size=SIZE, compat=0.10|1.1, "
        "cluster_size=SIZE, refcount_bits=1..64, lazy_refcounts=on|off, extended_l2=on|off, "
        "compression_type=zlib|zstd, preallocation=off|metadata|falloc|full, "
        "backing_file=FILE, backing_fmt=FMT, data_file=FILE, data_file_raw=on|off.",
    )
    p.add_argument("-f", dest="fmt", default="qcow2", help="image format (only qcow2)")
    p.add_argument("-o", dest="options", action="append", help="key=value[,key=value...]")
    p.add_argument("-b", dest="backing", help="backing file")
    p.add_argument("-F", dest="backing_fmt", help="backing file format (qcow2 or raw)")
    p.add_argument("-u", dest="unsafe", action="store_true",
                   help="do not open the backing file (SIZE is then required)")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("filename")
    p.add_argument("size", nargs="?",
                   help="virtual size, e.g. 10G or 1.5M (rounded up to a multiple of 512)")
    p.set_defaults(run=run)


def options_to_kwargs(opts: dict[str, str]) -> dict[str, Any]:
    """-o options (except size, which the caller handles) -> ops.create keyword arguments."""
    kwargs: dict[str, Any] = {}
    for key, value in opts.items():
        k = key.replace("-", "_")
        if k == "size":
            continue
        if k in _SIZE_OPTS:
            kwargs[k] = parse_option_size(key, value)
        elif k in _NUMBER_OPTS:
            kwargs[k] = parse_option_number(key, value)
        elif k in _CHOICE_OPTS:
            name, allowed = _CHOICE_OPTS[k]
            if value not in allowed:
                raise UsageError(f"Parameter '{name}' does not accept value '{value}'")
            kwargs[k] = value
        elif k in _BOOL_OPTS:
            kwargs[k] = parse_bool(key, value)
        elif k in _STR_OPTS:
            kwargs[k] = value
        else:
            raise UsageError(f"Invalid parameter '{key}'")
    return kwargs


def _requested_size(args: argparse.Namespace, opts: dict[str, str],
                    size: int | None) -> int | None:
    """The size as the user wrote it (not yet rounded), in qemu-img's order of checks."""
    text = opts.get("size")
    if text is None:
        return size
    try:
        opt_size = parse_option_size("size", text)
    except UsageError as exc:
        raise UsageError(f"{args.filename}: {exc}") from None
    if size is not None:
        raise UsageError(f"{args.filename}: The image size must be specified only once")
    return opt_size


def run(args: argparse.Namespace) -> int:
    from ..errors import InvalidArgumentError
    from ..ops.create import create

    # like qemu-img: the positional size is read with the arguments, before any -o option
    size = parse_size(args.size) if args.size is not None else None
    if args.fmt != "qcow2":
        raise UsageError(f"creating '{args.fmt}' images is not supported (only qcow2)")
    opts = parse_options(args.options)
    try:
        kwargs = options_to_kwargs(opts)
    except UsageError as exc:
        raise UsageError(f"{args.filename}: {exc}") from None
    if args.backing:
        kwargs["backing_file"] = args.backing
    if args.backing_fmt:
        kwargs["backing_fmt"] = args.backing_fmt
    size = _requested_size(args, opts, size)
    if args.unsafe and size is None:
        raise UsageError("-u requires a size")
    if size is None and "backing_file" not in kwargs:
        raise UsageError(f"{args.filename}: Image creation needs a size parameter")
    if args.unsafe and "backing_file" in kwargs and "backing_fmt" not in kwargs:
        raise UsageError("-u with a backing file needs -F (the backing format)")
    rounded = round_to_sector(size) if size is not None else None
    if rounded is not None and rounded > INT64_MAX:
        # -o size= takes values up to 2**64-1; qemu-img's signed size then goes negative
        raise UsageError(f"{args.filename}: Could not resize image: Image size cannot be negative")
    try:
        create(args.filename, rounded, **kwargs)
    except InvalidArgumentError as exc:
        raise UsageError(f"{args.filename}: {exc}") from None
    if not args.quiet:
        print(f"Formatting '{args.filename}', fmt=qcow2 size={size if size is not None else '?'}")
    return 0
