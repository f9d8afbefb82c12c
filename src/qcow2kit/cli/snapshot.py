"""qcow2kit snapshot [-U] [-q] [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] FILE

Owns the command line of internal snapshots with qemu-img's syntax: one action at most (none
prints nothing), exactly one file, qemu-img's messages. The work is in ops/snapshot.py.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

from .common import PROG, UsageError, plain_command_line

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time
if TYPE_CHECKING:
    import argparse
    from typing import Any

_TRY = f"Try '{PROG} --help' for more information"


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "snapshot",
        help="list, create, apply or delete internal snapshots (like qemu-img snapshot)",
        description="Internal snapshots, as qemu-img snapshot: -l lists them, -c creates one "
        "of the current disk, -a reverts the disk (and its size) to one, -d deletes one. "
        "-a looks SNAPSHOT up as an ID first, then as a name; -d as a name first, then as an "
        "ID. Every change is crash-safe: the new tables are written beside the old ones and "
        "one header write switches to them.",
    )
    p.add_argument("-l", dest="list", action="count", default=0, help="list the snapshots")
    p.add_argument("-a", dest="apply", action="append", metavar="SNAPSHOT",
                   help="apply (revert the disk to) a snapshot")
    p.add_argument("-c", dest="create", action="append", metavar="SNAPSHOT",
                   help="create a snapshot")
    p.add_argument("-d", dest="delete", action="append", metavar="SNAPSHOT",
                   help="delete a snapshot")
    p.add_argument("-U", "--force-share", dest="force_share", action="store_true",
                   help="open the image even if another process has it open for writing "
                   "(-l only)")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("files", nargs="*", metavar="filename")
    p.set_defaults(run=run)


_FLAGS = {"-l": ("list", 1), "-U": ("force_share", True), "--force-share": ("force_share", True),
          "-q": ("quiet", True)}
_VALUED: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "-a": ("apply", None), "-c": ("create", None), "-d": ("delete", None)}


def fast_args(rest: list[str]) -> SimpleNamespace | None:
    """Plain command lines without argparse (cli/common.plain_command_line): one file, -l at
    most once (argparse counts it), snapshot names that do not start with '-'."""
    if rest.count("-l") > 1:
        return None
    args = SimpleNamespace(verb="snapshot", list=0, apply=None, create=None, delete=None,
                           force_share=False, quiet=False, files=None, run=run)
    parsed = plain_command_line(rest, args, ("files",), _FLAGS, _VALUED,
                                repeated=("apply", "create", "delete"))
    if parsed is not None:
        parsed.files = [parsed.files]
    return parsed


def run(args: argparse.Namespace) -> int:
    from ..ops import snapshot as ops

    actions: list[tuple[str, str]] = [("l", "")] * args.list
    for key in ("apply", "create", "delete"):
        actions += [(key, value) for value in getattr(args, key) or []]
    if len(actions) > 1:
        raise UsageError(f"Cannot mix '-l', '-a', '-c', '-d'\n{_TRY}")
    if len(args.files) != 1:
        raise UsageError(f"Expecting one image file name\n{_TRY}")
    path = args.files[0]
    if not actions:
        ops.read_snapshots(path, force_share=args.force_share)  # qemu-img still opens it
        return 0
    action, name = actions[0]
    if action != "l" and args.force_share:
        raise UsageError(f"Could not open '{path}': force-share=on can only be used with read-only images")
    if action == "l":
        table = ops.list_table(ops.read_snapshots(path, force_share=args.force_share))
        sys.stdout.flush()
        sys.stdout.buffer.write(table)
        sys.stdout.buffer.flush()
    elif action == "create":
        ops.create_command(path, name)
    elif action == "delete":
        ops.delete_command(path, name)
    else:
        ops.apply_command(path, name)
    return 0
