"""How the command line fails: user errors (Qcow2Error, OSError, bad arguments) print
`qcow2kit: <message>` and exit 1 as qemu-img does; anything else is a bug in qcow2kit and says
so (exit 70), with a traceback only under QCOW2KIT_DEBUG=1."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import qcow2kit
from qcow2kit.cli import info as cli_info
from qcow2kit.cli.main import EXIT_INTERNAL, main
from tests.helpers import qemu_img


def _raiser(exc: BaseException) -> Callable[[object], int]:
    """A verb's run() that fails with exc."""

    def run(args: object) -> int:
        raise exc

    return run


@pytest.mark.parametrize("exc", [
    ValueError("a bug that happens to be a ValueError"),
    KeyError("missing"),
    TypeError("unsupported operand"),
    AssertionError(),
    RuntimeError("boom"),
])
def test_other_exceptions_are_reported_as_bugs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str],
                                               exc: BaseException) -> None:
    monkeypatch.delenv("QCOW2KIT_DEBUG", raising=False)
    monkeypatch.setattr(cli_info, "run", _raiser(exc))
    rc = main(["info", str(tmp_path / "x.qcow2")])
    err = capsys.readouterr().err
    assert rc == EXIT_INTERNAL == 70
    assert err.startswith(f"qcow2kit: internal error: {type(exc).__name__}")
    assert "please report this bug" in err and "QCOW2KIT_DEBUG=1" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("exc", [
    qcow2kit.FormatError("bad header"),
    qcow2kit.InvalidArgumentError("bad option"),
    qcow2kit.ResizeError("cannot"),
    FileNotFoundError(2, "No such file or directory", "x.qcow2"),
    PermissionError(13, "Permission denied", "x.qcow2"),
])
def test_user_errors_exit_1(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                            exc: BaseException) -> None:
    monkeypatch.setattr(cli_info, "run", _raiser(exc))
    assert main(["info", "x.qcow2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qcow2kit: ") and "internal error" not in err
    assert len(err.splitlines()) == 1


def test_debug_env_shows_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QCOW2KIT_DEBUG", "1")
    monkeypatch.setattr(cli_info, "run", _raiser(KeyError("missing")))
    with pytest.raises(KeyError, match="missing"):
        main(["info", "x.qcow2"])


def _process(debug: bool) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys\n"
        "import qcow2kit.cli.info as m\n"
        "def run(args): raise ZeroDivisionError('planted bug')\n"
        "m.run = run\n"
        "from qcow2kit.cli.main import main\n"
        "sys.exit(main(['info', 'x.qcow2']))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "QCOW2KIT_DEBUG"}
    if debug:
        env["QCOW2KIT_DEBUG"] = "1"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


def test_bug_in_a_real_process() -> None:
    res = _process(debug=False)
    assert res.returncode == 70
    assert res.stderr == (
        "qcow2kit: internal error: ZeroDivisionError: planted bug; please report this bug "
        "(run with QCOW2KIT_DEBUG=1 for a traceback)\n"
    )
    res = _process(debug=True)
    assert res.returncode == 1  # the interpreter's own exit status for an uncaught exception
    assert "Traceback" in res.stderr and "ZeroDivisionError: planted bug" in res.stderr


def test_library_option_errors_are_user_errors(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A bad -o value that only the library checks is the user's mistake, not a bug."""
    for opts in ("cluster_size=1000", "compat=0.9", "refcount_bits=3", "preallocation=bogus",
                 "compat=0.10,lazy_refcounts=on"):
        q = qemu_img("create", "-q", "-f", "qcow2", "-o", opts, str(tmp_path / "q.qcow2"), "1M",
                     check=False)
        rc = main(["create", "-q", "-f", "qcow2", "-o", opts, str(tmp_path / "o.qcow2"), "1M"])
        err = capsys.readouterr().err
        assert rc == q.returncode == 1, (opts, err)
        assert err.startswith("qcow2kit: ") and "internal error" not in err, err
        assert not (tmp_path / "o.qcow2").exists()


def test_convert_bad_sparse_size_is_a_user_error(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), "1M")
    q = qemu_img("convert", "-S", "1000", str(src), str(tmp_path / "q.raw"), check=False)
    rc = main(["convert", "-S", "1000", str(src), str(tmp_path / "o.raw")])
    err = capsys.readouterr().err
    assert rc == q.returncode == 1
    assert "internal error" not in err


@pytest.mark.parametrize("argv", [
    ["info", "--foo", "F"],
    ["create", "--foo", "F", "1M"],
    ["create", "-f", "qcow2", "F", "1M", "2M"],
    ["check", "-r", "bogus", "F"],
    ["resize", "--foo", "F", "1M"],
    ["resize", "F", "1M", "extra"],
    ["resize", "F"],
    ["info"],
    ["map"],
    ["compare", "F"],
])
def test_bad_arguments_exit_1_like_qemu_img(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            argv: list[str]) -> None:
    path = tmp_path / "f.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(path), "1M")
    before = path.read_bytes()
    argv = [str(path) if a == "F" else a for a in argv]
    q = qemu_img(*argv, check=False)
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors (missing arguments, bad choices)
        rc = int(exc.code or 0)
    err = capsys.readouterr().err
    assert rc == q.returncode == 1, (err, q.stderr)
    assert err.startswith("qcow2kit: ") and "Traceback" not in err
    if "unrecognized option" in q.stderr or "Unexpected argument" in q.stderr or \
            "Expecting image file name and size" in q.stderr:
        assert err == q.stderr.replace("qemu-img", "qcow2kit")
    assert path.read_bytes() == before


def test_a_bug_in_compare_is_not_a_verdict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """compare's exit 2 means 'could not compare'; a bug must not hide behind it."""
    import qcow2kit.ops.compare as ops_compare

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("planted bug")

    a = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(a), "1M")
    monkeypatch.delenv("QCOW2KIT_DEBUG", raising=False)
    monkeypatch.setattr(ops_compare, "compare", broken)
    assert main(["compare", str(a), str(a)]) == 70
    assert "internal error: ValueError: planted bug" in capsys.readouterr().err


@pytest.mark.parametrize("verb", [["info"], ["check"], ["map", "--output=json"]])
def test_closed_standard_output_is_a_user_error(tmp_path: Path, verb: list[str]) -> None:
    """`qcow2kit info f >&-`: Python starts with sys.stdout None; the output cannot be written,
    which is reported like a write to a full disk (exit 1, one line), not as a bug."""
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "1M")
    res = subprocess.run([sys.executable, "-m", "qcow2kit", *verb, str(img)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: os.close(1))
    assert res.returncode == 1
    assert res.stderr == "qcow2kit: cannot write the output: standard output is closed\n"


def test_closed_standard_output_does_not_matter_when_quiet(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "1M")
    res = subprocess.run([sys.executable, "-m", "qcow2kit", "resize", "-q", str(img), "2M"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: os.close(1))
    assert (res.returncode, res.stderr) == (0, "")
    with qcow2kit.open(str(img)) as image:
        assert image.virtual_size == 2 << 20
