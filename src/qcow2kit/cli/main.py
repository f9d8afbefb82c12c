"""Entry point: dispatch `qcow2kit VERB` to cli/<verb>.py and turn failures into exit codes.

Only the errors a user can cause become `qcow2kit: <message>` and a qemu-img exit code: bad
arguments (UsageError, argparse errors: exit 1), Qcow2Error and OSError. Any other exception is
a bug in qcow2kit and is reported as one (exit 70, EX_SOFTWARE), with a traceback only when
QCOW2KIT_DEBUG=1. Never interprets sizes or options itself (cli/common.py does). argparse is
only imported when a command needs it (cli/parser.py): start-up time.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys

from ..errors import Qcow2Error
from .common import PROG, UsageError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from typing import Any

# qcow2kit never calls BLAS, but numpy's OpenBLAS starts a pool of worker threads when numpy
# is imported; on a busy machine creating (and spinning) them costs a command tens of
# milliseconds. Set before any verb imports numpy; a value the user set is kept.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

VERBS = ("create", "info", "map", "convert", "compare", "resize", "check", "compact", "snapshot", "bitmap",
         "serve", "amend", "measure", "rebase", "commit")
EXIT_USAGE = 1
EXIT_INTERNAL = 70  # sysexits.h EX_SOFTWARE: distinct from every exit code qemu-img uses
DEBUG_ENV = "QCOW2KIT_DEBUG"


TRY_HELP = f"Try '{PROG} --help' for more information"


def _unexpected(verb: str, extra: list[str]) -> UsageError:
    """qemu-img's words for arguments left over after parsing."""
    first = extra[0]
    if first.startswith("-") and first != "-":
        return UsageError(f"unrecognized option '{first}'\n{TRY_HELP}")
    if verb == "resize":
        return UsageError(f"Expecting image file name and size\n{TRY_HELP}")
    return UsageError(f"Unexpected argument: {first}\n{TRY_HELP}")


def build_parser(verbs: Sequence[str] = VERBS) -> argparse.ArgumentParser:
    """The argparse parser (cli/parser.py), with only these verbs' modules imported."""
    from .parser import build_parser as build

    return build(verbs)


def _fast_args(argv: list[str]) -> Any:
    """The parsed arguments without argparse, when the verb's module offers `fast_args` and
    the command line is one it recognises (plain, well-formed: exactly what argparse would
    return for it); None otherwise. Importing and running argparse is a good part of the
    start-up of a command as small as `info`."""
    try:
        module = importlib.import_module(f"qcow2kit.cli.{argv[0]}")
    except ModuleNotFoundError as exc:
        if exc.name == f"qcow2kit.cli.{argv[0]}":
            return None
        raise
    fast = getattr(module, "fast_args", None)
    return fast(argv[1:]) if fast is not None else None


def _resize_argv(argv: list[str]) -> list[str]:
    """Like qemu-img, resize takes its last argument as the size before reading options, so a
    relative size such as -2M is never mistaken for an option, with or without `--`."""
    rest = argv[1:]
    if any(a in ("-h", "--help") for a in rest[:-1]) or rest[-1:] in (["-h"], ["--help"]):
        return argv
    if len(rest) < 2:
        raise UsageError(f"Not enough arguments\n{TRY_HELP}")
    size = rest.pop()
    return [argv[0], *rest, size] if "--" in rest else [argv[0], *rest, "--", size]


def _report_bug(exc: BaseException) -> int:
    if os.environ.get(DEBUG_ENV) == "1":
        raise exc
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    print(f"{PROG}: internal error: {text}; please report this bug "
          f"(run with {DEBUG_ENV}=1 for a traceback)", file=sys.stderr)
    return EXIT_INTERNAL


def _exit_now(code: int) -> None:
    """End the process without the interpreter's teardown (unloading numpy and every module
    costs a short command ~10% of its time), but only when nothing is left for that teardown
    to do: output flushed, no other thread, no logging, no profiler or tracer. Otherwise
    return, and the process ends the usual way."""
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        return
    if "logging" in sys.modules or sys.getprofile() is not None or sys.gettrace() is not None:
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # e.g. a closed pipe: the usual exit reports it, as before
        return
    os._exit(code)


class _ClosedOutput:
    """Stands for a standard stream the process was started without (Python leaves it None,
    and every print would then fail as a bug): writing output fails as an OSError, which
    _run reports as a user-visible error (exit 1), like a write to a full disk. Messages to a
    closed standard error are dropped (quiet=True): there is nowhere to show them."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    @property
    def buffer(self) -> _ClosedOutput:
        return self

    def write(self, data: str | bytes) -> int:
        if self.quiet:
            return len(data)
        raise OSError(errno.EBADF, "cannot write the output: standard output is closed")

    def flush(self) -> None:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit code. Called without arguments (the `qcow2kit` program,
    `python -m qcow2kit`), the process ends here once the command is done (see _exit_now);
    called with a list (tests, other Python code), it returns."""
    if argv is not None:
        return _run(list(argv))
    if sys.stdout is None:  # started with standard output closed (`qcow2kit info f >&-`)
        sys.stdout = _ClosedOutput()
    if sys.stderr is None:
        sys.stderr = _ClosedOutput(quiet=True)
    code = _run(sys.argv[1:])
    _exit_now(code)
    return code


def _run(argv: list[str]) -> int:
    try:
        known = bool(argv[:1]) and argv[0] in VERBS
        fast = _fast_args(argv) if known else None
        if fast is not None:
            return int(fast.run(fast))
        # a known verb first: only its module is needed (the others are never reached, since
        # argparse dispatches on the first positional); anything else needs the full table
        # (help, or an invalid choice listing every verb)
        parser = build_parser(argv[:1] if known else VERBS)
        if argv[:1] == ["resize"]:
            argv = _resize_argv(argv)
        args, extra = parser.parse_known_args(argv)
        if extra:
            raise _unexpected(argv[0], extra)
        if not getattr(args, "run", None):
            parser.print_help()
            return EXIT_USAGE
        return int(args.run(args))
    except (UsageError, Qcow2Error) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        name = f" '{exc.filename}'" if exc.filename else ""
        print(f"{PROG}:{name} {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # anything else is a bug in qcow2kit, never a user error
        return _report_bug(exc)


if __name__ == "__main__":
    sys.exit(main())
