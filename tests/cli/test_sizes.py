"""Sizes on the command line, judged by qemu-img 7.2: the same arguments give the same exit
code, the same virtual size (qemu-img info of both results) and, for the errors qemu-img words
the same way, the same message with 'qemu-img' read as 'qcow2kit'."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qcow2kit.cli.main import main
from tests.helpers import assert_clean, qemu_compare, qemu_img, qemu_io

M = 1 << 20


def virtual_size(path: Path) -> int | None:
    if not path.exists():
        return None
    res = qemu_img("info", "--output=json", "-U", str(path), check=False)
    return int(json.loads(res.stdout)["virtual-size"]) if res.returncode == 0 else None


def ours(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err


def theirs(argv: list[str]) -> tuple[int, str]:
    res = qemu_img(*argv, check=False)
    return res.returncode, as_ours(res.stderr)


def as_ours(text: str) -> str:
    return text.replace("qemu-img:", "qcow2kit:").replace("'qemu-img --help'", "'qcow2kit --help'")


# size text, and whether qemu-img's message is the one we print too
CREATE_SIZES = [
    ("1000", True), ("1234567", True), ("1.5k", True), ("1.1k", True), ("1.5M", True),
    ("1.00048828125k", True), ("1.0004882812k", True), ("0", True), ("1b", True),
    ("512B", True), ("1K", True), ("1.k", True), ("1.0", True), ("1.", True), ("010", True),
    ("0x100", True), ("0X10", True), ("0x100k", True), ("+1k", True), ("\t1k", True),
    ("0.0000001k", True), ("0.99999999999999999999k", True), ("2P", True),
    ("0.5", True), ("1.5", True), ("1.5b", True), ("1e3", True), ("1.5e3k", True), ("", True),
    ("1024 ", True), ("1kb", True), ("1KiB", True), (".5k", True), ("0x1.8k", True),
    ("00x10", True), ("0x", True), ("1k5", True), ("1 k", True), ("+ 1k", True), ("abc", True),
    ("8E", True), ("16E", True), ("18446744073709551616", True),
    ("9223372036854775807", True),
    ("7E", False), ("2251799813685760", False), ("1e", False), ("1.5e", False),
]


@pytest.mark.parametrize("size,same_message", CREATE_SIZES)
def test_create_positional_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str], size: str,
                                same_message: bool) -> None:
    monkeypatch.chdir(tmp_path)
    q_rc, q_err = theirs(["create", "-q", "-f", "qcow2", "q.qcow2", size])
    rc, err = ours(["create", "-q", "-f", "qcow2", "o.qcow2", size], capsys)
    assert rc == q_rc, (err, q_err)
    assert virtual_size(tmp_path / "o.qcow2") == virtual_size(tmp_path / "q.qcow2")
    if same_message:
        assert err == q_err.replace("q.qcow2", "o.qcow2")
    if rc == 0:
        assert_clean(tmp_path / "o.qcow2")


# (-o arguments, positional arguments after the file name), and whether the message matches
CREATE_OPTION_SIZES = [
    (["-o", "size=1.5M"], [], True),
    (["-o", "size=1000"], [], True),
    (["-o", "size=1234567"], [], True),
    (["-o", "size=1M,size=1000"], [], True),
    (["-o", "size=1M", "-o", "size=2M"], [], True),
    (["-o", "size=1M"], ["2M"], True),
    (["-o", "size=1M"], ["1M"], True),
    (["-o", "size=abc"], [], True),
    (["-o", "size=abc"], ["1M"], True),
    (["-o", "size="], [], True),
    (["-o", "size=1.5"], [], True),
    (["-o", "size=-1"], [], True),
    (["-o", "size=16E"], [], True),
    (["-o", "size=8E"], [], True),
    (["-o", "size=7E"], [], False),
    (["-o", "cluster_size=4k,size=1000"], [], True),
    ([], ["--", "-1"], True),
    ([], ["1M", "2M"], True),
    ([], [], True),
]


@pytest.mark.parametrize("opts,positional,same_message", CREATE_OPTION_SIZES)
def test_create_option_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str], opts: list[str],
                            positional: list[str], same_message: bool) -> None:
    """-o size= is the size when no positional SIZE is given; both at once is an error."""
    monkeypatch.chdir(tmp_path)
    q_rc, q_err = theirs(["create", "-q", "-f", "qcow2", *opts, "q.qcow2", *positional])
    rc, err = ours(["create", "-q", "-f", "qcow2", *opts, "o.qcow2", *positional], capsys)
    assert rc == q_rc, (err, q_err)
    assert virtual_size(tmp_path / "o.qcow2") == virtual_size(tmp_path / "q.qcow2")
    if same_message:
        assert err == q_err.replace("q.qcow2", "o.qcow2")


def test_create_size_from_a_raw_backing_file_rounds_up(tmp_path: Path, monkeypatch:
                                                       pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "b.raw").write_bytes(b"\x07" * 1000)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "b.raw", "-F", "raw", "q.qcow2")
    assert main(["create", "-q", "-f", "qcow2", "-b", "b.raw", "-F", "raw", "o.qcow2"]) == 0
    assert virtual_size(tmp_path / "o.qcow2") == virtual_size(tmp_path / "q.qcow2") == 1024
    assert_clean(tmp_path / "o.qcow2")


RESIZE_ARGS = [
    (["+1.5k"], True), (["+1M"], True), (["20M"], True), (["0x1000000"], True),
    (["+0x100k"], True), (["+0"], True), (["10M"], True),
    (["--shrink", "-2M"], True), (["--shrink", "--", "-2M"], True), (["--", "+1k"], True),
    (["--shrink", "-9.5M"], True), (["--shrink", "-+1k"], True), (["--shrink", "1.5M"], True),
    (["-2M"], True), (["--", "-2M"], True), (["1000"], True), (["-+1"], True),
    (["+1000"], True), (["--shrink", "-1000"], True), (["--shrink", "-1.1k"], True),
    (["20000001"], True), (["+0x100"], True),
    (["-1.5"], True), (["+abc"], True), (["abc"], True), (["+-1"], True), (["1.5"], True),
    ([""], True), (["+"], True),
    (["--shrink", "-10M"], True), (["--shrink", "--", "-10M"], True), (["0"], True),
    (["+8E"], True), (["8E"], True), (["+16E"], True), (["--shrink", "-16E"], True),
    (["+7E"], False), (["--shrink", "-15E"], False), (["2M", "extra"], True),
]


@pytest.mark.parametrize("args,same_message", RESIZE_ARGS)
def test_resize_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                      same_message: bool) -> None:
    q, o = tmp_path / "q.qcow2", tmp_path / "o.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(q), "10M")
    qemu_io(q, "write -P 0x5a 0 1M", "write -P 0xa5 9M 1M")
    shutil.copyfile(q, o)

    def argv(path: Path) -> list[str]:
        # the file name goes after --shrink and before the size (or '--'), as a user types it
        n = 1 if args[0] == "--shrink" else 0
        return ["resize", *args[:n], str(path), *args[n:]]

    q_rc, q_err = theirs(argv(q))
    rc, err = ours(argv(o), capsys)
    assert rc == q_rc, (err, q_err)
    assert virtual_size(o) == virtual_size(q)
    if same_message:
        assert err == q_err.replace(str(q), str(o))
    assert_clean(o)
    qemu_compare(o, q, "qcow2", "qcow2")


def test_resize_shrink_refusal_is_the_clis_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The --shrink hint is command-line text: the CLI refuses before asking the library, so
    the library's message can say what is wrong without naming a command-line option."""
    from qcow2kit.image import Image

    def no_resize(self: object, *a: object, **k: object) -> None:
        raise AssertionError("the library must not be asked to shrink without --shrink")

    img = tmp_path / "r.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "16M")
    before = img.read_bytes()
    q_rc, q_err = theirs(["resize", str(img), "8M"])
    monkeypatch.setattr(Image, "resize", no_resize)
    rc, err = ours(["resize", str(img), "8M"], capsys)
    assert rc == q_rc == 1
    assert err == q_err
    assert err.startswith("qcow2kit: Use the --shrink option to perform a shrink operation.\n")
    assert img.read_bytes() == before


def test_resize_not_enough_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "r.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "1M")
    for argv in (["resize", str(img)], ["resize"]):
        q_rc, q_err = theirs(argv)
        rc, err = ours(argv, capsys)
        assert rc == q_rc == 1
        assert err.splitlines()[0] == q_err.splitlines()[0] == "qcow2kit: Not enough arguments"


@pytest.mark.parametrize("args", [
    ["--start-offset=abc"], ["--max-length=abc"], ["--start-offset=8E"], ["--max-length=16E"],
    ["--start-offset=1.5k", "--max-length=0x400"], ["--start-offset=1000"],
    ["--start-offset=1.5"],
])
def test_map_offsets(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                     args: list[str]) -> None:
    img = tmp_path / "m.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "1M")
    qemu_io(img, "write -P 1 64k 64k")
    argv = ["map", "--output=json", *args, str(img)]
    q = qemu_img(*argv, check=False)
    rc = main(argv)
    out, err = capsys.readouterr()
    assert (rc, out, err) == (q.returncode, q.stdout, as_ours(q.stderr))


@pytest.mark.parametrize("verb,words", [
    ("create", ("k, M, G, T, P, E", "1.5G", "rounded up to the next one", "-o size=")),
    ("resize", ("+512M", "-1G", "-- -1G", "k, M, G, T, P, E", "multiple of 512")),
    ("map", ("k, M, G, T, P, E", "not rounded")),
])
def test_help_explains_sizes(capsys: pytest.CaptureFixture[str], verb: str,
                             words: tuple[str, ...]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([verb, "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for word in words:
        assert word in text, (word, text)


def test_resize_preserves_data_across_a_relative_shrink(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "8M")
    qemu_io(img, "write -P 0x33 0 3M")
    assert main(["resize", "-q", "--shrink", str(img), "--", "-1.5M"]) == 0
    assert virtual_size(img) == 8 * M - 3 * M // 2
    qemu_io(img, "read -P 0x33 0 3M")
    assert_clean(img)
