"""qcow2kit bitmap (--merge SRC | --add | --remove | --clear | --enable | --disable)...
[-b SRC_IMG [-F FMT]] [-g GRANULARITY] [-f FMT] FILE NAME

Owns the command line of persistent dirty bitmap changes, as qemu-img bitmap: operations run
in command-line order on one read-write open, and each failure is reported as
"Operation OP on bitmap NAME failed: ...". The changes are stored when the image closes;
nothing is stored when an operation fails.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import PROG, UsageError

INCONSISTENT_HINT = "Try block-dirty-bitmap-remove to delete this bitmap from disk"


class _Op(argparse.Action):
    """Collect the operations in the order they were given."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        ops = list(getattr(namespace, "ops", None) or [])
        ops.append((self.const, values if isinstance(values, str) else None))
        namespace.ops = ops


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "bitmap",
        help="add, remove, clear, enable, disable or merge persistent dirty bitmaps",
        description="Change the persistent dirty bitmaps of a qcow2 image, as qemu-img bitmap "
        "does. Operations run in the order given, e.g. '--add --disable'. A new bitmap is "
        "enabled (it records every later write) unless --disable follows. Granularity (-g) is "
        "a power of two from 512 bytes to 2G (suffixes k, M, G); the default is the cluster "
        "size clamped to 4k..64k.",
    )
    for flag in ("add", "remove", "clear", "enable", "disable"):
        p.add_argument(f"--{flag}", action=_Op, nargs=0, const=flag, dest="ops",
                       help=f"{flag} the bitmap NAME")
    p.add_argument("--merge", action=_Op, const="merge", dest="ops", metavar="SRC",
                   help="merge bitmap SRC (of -b SRC_IMG, or of FILE) into NAME")
    p.add_argument("-b", dest="source_image", help="image holding the --merge source bitmap")
    p.add_argument("-F", dest="source_fmt", help="format of the -b image (qcow2)")
    p.add_argument("-g", dest="granularity", help="granularity of a new bitmap (with --add)")
    p.add_argument("-f", dest="fmt", default=None, help="image format (only qcow2)")
    p.add_argument("filename", nargs="?")
    p.add_argument("name", nargs="?")
    p.set_defaults(run=run, ops=None)


def _granularity(text: str | None) -> int | None:
    if text is None:
        return None
    from .common import parse_option_size

    return parse_option_size("granularity", text)


def run(args: argparse.Namespace) -> int:
    import qcow2kit

    ops: list[tuple[str, str | None]] = args.ops or []
    if not ops:
        raise UsageError(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge"
        )
    if args.filename is None or args.name is None:
        raise UsageError("Expecting filename and bitmap name")
    for fmt in (args.fmt, args.source_fmt):
        if fmt not in (None, "qcow2"):
            raise UsageError(f"bitmaps are only supported by qcow2 images, not '{fmt}'")
    granularity = _granularity(args.granularity)
    name: str = args.name
    with qcow2kit.open(args.filename, "r+") as img:
        for op, source in ops:
            try:
                if op == "add":
                    img.bitmaps.add(name, granularity)
                elif op == "remove":
                    img.bitmaps.remove(name)
                elif op == "clear":
                    img.bitmaps.clear(name)
                elif op == "enable":
                    img.bitmaps.enable(name)
                elif op == "disable":
                    img.bitmaps.disable(name)
                else:
                    assert source is not None
                    if args.source_image:
                        with qcow2kit.open(args.source_image, force_share=True) as src:
                            img.bitmaps.merge(name, source, src.bitmaps)
                    else:
                        img.bitmaps.merge(name, source)
            except qcow2kit.Qcow2Error as exc:
                print(f"{PROG}: Operation {op} on bitmap {name} failed: {exc}", file=sys.stderr)
                if "inconsistent" in str(exc):
                    print(INCONSISTENT_HINT, file=sys.stderr)
                return 1
    return 0
