"""qcow2kit map [--output=human|json] [-f FMT] [-U] [--start-offset=N] [--max-length=N]
[--no-backing] FILE

Owns the command-line side of map (offsets in qemu-img's size grammar, its wording for bad
ones); never writes to the image.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import add_output, parse_size


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


def run(args: argparse.Namespace) -> int:
    from ..ops.map import format_human, format_json, map_path_extents

    start = parse_size(args.start, "start offset")
    length = parse_size(args.length, "max length") if args.length is not None else None
    entries = map_path_extents(args.filename, args.fmt, force_share=args.force_share, start=start,
                               length=length, backing=args.backing)
    if args.output == "json":
        sys.stdout.write(format_json(entries))
        return 0
    text, err = format_human(entries)
    sys.stdout.write(text)
    if err:
        sys.stdout.flush()
        print(f"qcow2kit: {err}", file=sys.stderr)
        return 1
    return 0
