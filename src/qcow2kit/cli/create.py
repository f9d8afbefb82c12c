"""qcow2kit create [-f qcow2] [-o key=value,...] [-b BACKING -F FMT] [-u] FILE [SIZE]"""

from __future__ import annotations

import argparse
from typing import Any

from .common import UsageError, parse_bool, parse_options, parse_size

_INT_OPTS = {"cluster_size": "cluster_size", "refcount_bits": "refcount_bits"}
_BOOL_OPTS = {"lazy_refcounts", "extended_l2", "data_file_raw"}
_STR_OPTS = {"compat", "compression_type", "preallocation", "backing_file", "backing_fmt",
             "data_file"}


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "create",
        help="create a new qcow2 image",
        description="Create a qcow2 image. Options (-o, comma separated): compat=0.10|1.1, "
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
    p.add_argument("size", nargs="?")
    p.set_defaults(run=run)


def options_to_kwargs(opts: dict[str, str]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for key, value in opts.items():
        k = key.replace("-", "_")
        if k == "size":
            continue
        if k in _INT_OPTS:
            kwargs[_INT_OPTS[k]] = parse_size(value)
        elif k in _BOOL_OPTS:
            kwargs[k] = parse_bool(key, value)
        elif k in _STR_OPTS:
            kwargs[k] = value
        else:
            raise UsageError(f"Invalid parameter '{key}'")
    return kwargs


def run(args: argparse.Namespace) -> int:
    from ..ops.create import create

    if args.fmt != "qcow2":
        raise UsageError(f"creating '{args.fmt}' images is not supported (only qcow2)")
    kwargs = options_to_kwargs(parse_options(args.options))
    if args.backing:
        kwargs["backing_file"] = args.backing
    if args.backing_fmt:
        kwargs["backing_fmt"] = args.backing_fmt
    size = parse_size(args.size) if args.size else None
    if args.unsafe and size is None:
        raise UsageError("-u requires a size")
    if size is None and "backing_file" not in kwargs:
        raise UsageError("Image creation needs a size parameter")
    if args.unsafe and "backing_file" in kwargs and "backing_fmt" not in kwargs:
        raise UsageError("-u with a backing file needs -F (the backing format)")
    create(args.filename, size, **kwargs)
    if not args.quiet:
        print(f"Formatting '{args.filename}', fmt=qcow2 size={size if size is not None else '?'}")
    return 0
