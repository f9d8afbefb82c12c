"""qcow2kit resize [--shrink] [--preallocation=MODE] [--compact] [-q] FILE [+|-]SIZE

Owns the command-line side of a resize: the size grammar (absolute or relative), qemu-img's
refusal of an unannounced shrink and its wording, and when a shrink's early discard
(ops/shrink_discard.py) runs: started right after the file is opened and locked, before the
heavy modules load, and waited for before the shrink writes anything. Never changes an image
it refused to resize.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

from ..errors import ResizeError
from ..io.file import FileStorage
from .common import INT64_MAX, PROG, SIZE_HELP, UsageError, parse_option_size, plain_command_line

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time
if TYPE_CHECKING:
    import argparse
    from typing import Any

    from ..image import Image
    from ..ops.shrink_discard import EarlyDiscard

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


_FLAGS = {"--shrink": ("shrink", True), "--compact": ("compact", True), "-q": ("quiet", True)}
_VALUED = {"--preallocation": ("preallocation", ("off", "metadata", "falloc", "full")),
           "-f": ("fmt", None)}


def fast_args(rest: list[str]) -> SimpleNamespace | None:
    """Plain command lines without argparse (cli/common.plain_command_line); the last word is
    the size, as for argparse after cli.main's _resize_argv."""
    if len(rest) < 2 or rest[-1] in ("-h", "--help"):
        return None
    args = SimpleNamespace(verb="resize", shrink=False, preallocation="off", compact=False,
                           fmt="qcow2", quiet=False, filename=None, size=rest[-1], run=run)
    return plain_command_line(rest[:-1], args, ("filename",), _FLAGS, _VALUED)


def _new_size(current: int, sign: int, amount: int) -> int:
    return _as_int64(current + sign * amount if sign else amount)


def run(args: argparse.Namespace) -> int:
    if args.fmt != "qcow2":
        raise UsageError(f"resizing '{args.fmt}' images is not supported (only qcow2)")
    text: str = args.size
    sign = {"+": 1, "-": -1}.get(text[:1], 0)
    amount = parse_option_size("size", text[1:] if sign else text)  # before opening, as qemu-img
    storage = FileStorage(args.filename, True)  # opened and locked as qcow2kit.open(..., "r+")
    discard = None
    try:
        if args.shrink and args.preallocation == "off":
            discard = _early_discard(storage, sign, amount)
        from ..image import Image

        img = Image(storage)
    except BaseException:
        if discard is not None:
            discard.wait()
        storage.close()
        raise
    with img:
        try:
            code = _resize(img, args, sign, amount, discard)
        finally:
            if discard is not None:
                discard.wait()  # before the file is closed
    if code == 0 and not args.quiet:
        print("Image resized.")
    return code


def _early_discard(storage: FileStorage, sign: int, amount: int) -> EarlyDiscard | None:
    from ..metadata.header_io import read_header
    from ..ops import shrink_discard

    try:
        current = read_header(storage).size
    except Exception:  # opening the image reports it
        return None
    return shrink_discard.start(storage, _new_size(current, sign, amount))


def _resize(img: Image, args: argparse.Namespace, sign: int, amount: int,
            discard: EarlyDiscard | None) -> int:
    current = img.virtual_size
    new_size = _new_size(current, sign, amount)
    if new_size <= 0:
        raise UsageError("New image size must be positive")
    if new_size < current and not args.shrink:
        for line in SHRINK_REFUSAL.split("\n"):
            print(f"{PROG}: {line}", file=sys.stderr)
        return 1
    if discard is not None:
        discard.wait()  # nothing is written while its holes are being punched
    try:
        img.resize(new_size, shrink=args.shrink, preallocation=args.preallocation)
    except ResizeError as exc:
        for line in str(exc).split("\n"):
            print(f"{PROG}: {line}", file=sys.stderr)
        return 1
    if args.compact:
        img.compact()
    return 0
