"""qcow2kit info [--output=human|json] [--backing-chain] [-f FMT] [-U] FILE

Owns the command-line side of info (ops/info.py builds the facts and qemu-img's layouts);
never opens an image for writing.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

from .common import add_output, plain_command_line

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time
if TYPE_CHECKING:
    import argparse
    from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "info",
        help="show information about an image (like qemu-img info)",
        description="Show the facts qemu-img info reports; --output=json gives the same JSON value.",
    )
    add_output(p)
    p.add_argument("--backing-chain", action="store_true", help="also show every backing file")
    p.add_argument("-f", dest="fmt", choices=("qcow2", "raw"), help="image format (probed if omitted)")
    p.add_argument("-U", "--force-share", dest="force_share", action="store_true",
                   help="open the image even if another process has it open for writing")
    p.add_argument("filename")
    p.set_defaults(run=run)


_FLAGS = {"--backing-chain": ("backing_chain", True), "-U": ("force_share", True),
          "--force-share": ("force_share", True)}
_VALUED = {"--output": ("output", ("human", "json")), "-f": ("fmt", ("qcow2", "raw"))}


def fast_args(rest: list[str]) -> SimpleNamespace | None:
    """Plain command lines without argparse (cli/common.plain_command_line)."""
    args = SimpleNamespace(verb="info", output="human", backing_chain=False, fmt=None,
                           force_share=False, filename=None, run=run)
    return plain_command_line(rest, args, ("filename",), _FLAGS, _VALUED)


def _write(text: str) -> None:
    # snapshot names may hold bytes that are not UTF-8: print them as they are, like qemu-img
    sys.stdout.flush()
    sys.stdout.buffer.write(text.encode("utf-8", "surrogateescape"))
    sys.stdout.buffer.flush()


def run(args: argparse.Namespace) -> int:
    from ..ops.info import chain_info, human, human_chain, image_info, qemu_json

    if args.backing_chain:
        infos = chain_info(args.filename, args.fmt, force_share=args.force_share)
        if args.output == "json":
            print(qemu_json(infos))
        else:
            _write(human_chain(infos))
        return 0
    info = image_info(args.filename, args.fmt, force_share=args.force_share)
    if args.output == "json":
        print(qemu_json(info))
    else:
        _write(human(info))
    return 0
