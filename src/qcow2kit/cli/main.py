"""Entry point: dispatch `qcow2kit VERB` to cli/<verb>.py; turn every qcow2kit error or
OSError into `qcow2kit: <message>` and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ..errors import Qcow2Error
from .common import UsageError

VERBS = ("create", "info", "map", "convert", "compare", "resize", "check", "compact")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qcow2kit",
        description="Create, inspect, convert, resize (and shrink), check and compact qcow2 "
        "disk images, compatible with QEMU's qemu-img.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND")
    for verb in VERBS:
        try:
            module = importlib.import_module(f"qcow2kit.cli.{verb}")
        except ModuleNotFoundError as exc:
            if exc.name == f"qcow2kit.cli.{verb}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "resize":
        # a relative size like -1G must not be taken for an option
        for i, a in enumerate(argv):
            if a[:1] == "-" and a[1:2].isdigit():
                argv = argv[:i] + ["--"] + argv[i:]
                break
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 1
    try:
        return int(args.run(args))
    except UsageError as exc:
        print(f"qcow2kit: {exc}", file=sys.stderr)
        return 1
    except (Qcow2Error, ValueError) as exc:
        print(f"qcow2kit: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        name = f" '{exc.filename}'" if exc.filename else ""
        print(f"qcow2kit:{name} {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("qcow2kit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
