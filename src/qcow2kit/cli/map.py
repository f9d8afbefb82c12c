"""qcow2kit map [--output=human|json] [-f FMT] [-U] [--start-offset=N] [--max-length=N]
[--no-backing] FILE

Owns the command-line side of map (offsets in qemu-img's size grammar, its wording for bad
ones) and the choice between ops/map_plain.py's fast path and ops/map.py; never writes to the
image. Plain command lines are parsed without argparse (fast_args) and plain images are mapped
without numpy: both are start-up time, most of what a map of a small image costs.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

from .common import add_output, parse_size, plain_command_line

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time
if TYPE_CHECKING:
    import argparse
    from typing import Any

    from ..ops.map import Extents
    from ..ops.map_plain import PlainExtents


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "map",
        help="show where each guest range lives (like qemu-img map)",
        description="Dump the allocation of the virtual disk through the backing chain; "
        "--output=json gives the same JSON value as qemu-img map. Offsets and lengths are "
        "bytes or a number with a suffix k, M, G, T, P, E (powers of 1024, 1.5M works); they "
        "are used as given, not rounded.",
    )
    add_output(p)
    p.add_argument("-f", dest="fmt", choices=("qcow2", "raw"), help="image format (probed if omitted)")
    p.add_argument("-U", "--force-share", dest="force_share", action="store_true",
                   help="open the image even if another process has it open for writing")
    p.add_argument("--start-offset", dest="start", default="0", help="first guest byte to map")
    p.add_argument("--max-length", dest="length", help="map at most this many bytes")
    p.add_argument("--no-backing", dest="backing", action="store_false",
                   help="do not open the backing file the image names (inspect untrusted images)")
    p.add_argument("filename")
    p.set_defaults(run=run)


_FLAGS: dict[str, tuple[str, object]] = {
    "-U": ("force_share", True), "--force-share": ("force_share", True),
    "--no-backing": ("backing", False)}
# option -> (dest, allowed values or None for any value not starting with '-')
_VALUED: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "--output": ("output", ("human", "json")), "-f": ("fmt", ("qcow2", "raw")),
    "--start-offset": ("start", None), "--max-length": ("length", None)}


def fast_args(rest: list[str]) -> SimpleNamespace | None:
    """Plain command lines without argparse (cli/common.plain_command_line)."""
    args = SimpleNamespace(verb="map", output="human", fmt=None, force_share=False, start="0",
                           length=None, backing=True, filename=None, run=run)
    return plain_command_line(rest, args, ("filename",), _FLAGS, _VALUED)


def run(args: argparse.Namespace) -> int:
    # (the default "0" is 0: parse_size would first compile its patterns, 4 ms of a run)
    start = 0 if args.start == "0" else parse_size(args.start, "start offset")
    length = parse_size(args.length, "max length") if args.length is not None else None
    from ..ops.map_plain import plain_map

    found = plain_map(args.filename, args.fmt, force_share=args.force_share,
                      backing=args.backing, start=start, length=length)
    if not isinstance(found, str):
        return _print(args.output, found)
    from ..ops.map import map_path_extents

    entries = map_path_extents(args.filename, args.fmt, force_share=args.force_share, start=start,
                               length=length, backing=args.backing)
    return _print(args.output, entries)


def _print(output: str, extents: Extents | PlainExtents) -> int:
    if output == "json":
        sys.stdout.write(extents.json())
        return 0
    text, err = extents.human()
    sys.stdout.write(text)
    if err:
        sys.stdout.flush()
        print(f"qcow2kit: {err}", file=sys.stderr)
        return 1
    return 0
