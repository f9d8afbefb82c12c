"""rebase against qemu-img rebase on twin copies of the same chains: the same exit code and
words; the overlay clean by qemu-img check, equal to QEMU's by compare and by the shape of
qemu-img map (the same sectors copied, whole clusters allocated), cluster 0 (header,
extensions, backing name) byte for byte QEMU's; in safe mode the overlay's disk reads as
before. Where QEMU copies data and then refuses (-b without -F), ours refuses with the same
words having written nothing."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from qcow2kit.cli.main import main
from tests.helpers import QEMU_IMG, assert_clean, map_shape, qemu_img, qemu_io

Build = Callable[[Path], None]


def run_ours(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], cwd: Path,
             *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    monkeypatch.chdir(cwd)
    rc = main(["rebase", *args])
    out, err = capsys.readouterr()
    return rc, out, err.replace("qcow2kit", "qemu-img")


def run_qemu(cwd: Path, *args: str) -> tuple[int, str, str]:
    assert QEMU_IMG is not None
    res = subprocess.run([QEMU_IMG, "rebase", *args], cwd=cwd, capture_output=True, text=True)
    return res.returncode, res.stdout, res.stderr


def guest(path: Path, scratch: Path) -> bytes:
    qemu_img("convert", "-U", "-O", "raw", str(path), str(scratch))
    return scratch.read_bytes()


def old_new(d: Path, top_opts: str = "cluster_size=4k", *, new_size: str = "4M",
            old_size: str = "4M", top_size: str = "") -> None:
    qemu_img("create", "-f", "qcow2", str(d / "old.qcow2"), old_size)
    qemu_io(d / "old.qcow2", "write -P 1 0 2M",
            *(["write -P 3 3M 100k", "write -z 2M 64k"] if old_size == "4M" else []))
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512", str(d / "new.qcow2"), new_size)
    qemu_io(d / "new.qcow2", "write -P 1 0 1M", "write -P 2 1536k 1k", "write -P 1 1537k 1k",
            *(["write -P 3 3M 50k"] if new_size == "4M" else []))
    args = ["create", "-f", "qcow2", "-F", "qcow2", "-b", "old.qcow2", "-o", top_opts,
            str(d / "top.qcow2")]
    qemu_img(*args, *([top_size] if top_size else []))
    qemu_io(d / "top.qcow2", "write -P 5 1M 4k", "write -z 3M 16k")


def raw_old(d: Path) -> None:
    raw = d / "old.raw"
    with open(raw, "wb") as f:
        f.truncate(3 << 20)
        f.seek(100 << 10)
        f.write(b"\x07" * 300000)
    qemu_img("create", "-f", "qcow2", str(d / "new.qcow2"), "5M")
    qemu_io(d / "new.qcow2", "write -P 7 128k 64k", "write -P 9 4M 4k")
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", "old.raw", "-o",
             "cluster_size=2k,extended_l2=off", str(d / "top.qcow2"), "6M")
    qemu_io(d / "top.qcow2", "write -P 5 4M 2k")


def chain3(d: Path) -> None:
    qemu_img("create", "-f", "qcow2", str(d / "base.qcow2"), "4M")
    qemu_io(d / "base.qcow2", "write -P 1 0 4M")
    qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2", "-o",
             "cluster_size=16k", str(d / "mid.qcow2"))
    qemu_io(d / "mid.qcow2", "write -P 2 1M 20k", "write -z 2M 32k")
    qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", "mid.qcow2", str(d / "top.qcow2"))
    qemu_io(d / "top.qcow2", "write -P 3 1M 4k")


def with_bitmap(d: Path) -> None:
    old_new(d, "cluster_size=64k")
    qemu_img("bitmap", "--add", str(d / "top.qcow2"), "b0")


CASES: dict[str, tuple[Build, list[str]]] = {
    "safe": (old_new, ["-b", "new.qcow2", "-F", "qcow2"]),
    "safe_64k": (lambda d: old_new(d, "cluster_size=64k"), ["-b", "new.qcow2", "-F", "qcow2"]),
    "safe_512": (lambda d: old_new(d, "cluster_size=512"), ["-b", "new.qcow2", "-F", "qcow2"]),
    "safe_ext_l2": (lambda d: old_new(d, "cluster_size=32k,extended_l2=on"),
                    ["-b", "new.qcow2", "-F", "qcow2"]),
    "safe_v2": (lambda d: old_new(d, "compat=0.10"), ["-b", "new.qcow2", "-F", "qcow2"]),
    "new_shorter": (lambda d: old_new(d, new_size="2M", top_size="5M"),
                    ["-b", "new.qcow2", "-F", "qcow2"]),
    "old_shorter": (lambda d: old_new(d, old_size="2M", top_size="4M"),
                    ["-b", "new.qcow2", "-F", "qcow2"]),
    "flatten": (old_new, ["-b", ""]),
    "flatten_progress": (old_new, ["-p", "-b", ""]),
    "unsafe": (old_new, ["-u", "-b", "new.qcow2", "-F", "qcow2"]),
    "unsafe_missing": (old_new, ["-u", "-b", "nope.qcow2", "-F", "raw"]),
    "unsafe_unlink": (old_new, ["-u", "-b", ""]),
    "unsafe_alone": (old_new, ["-u"]),
    "raw_old": (raw_old, ["-b", "new.qcow2", "-F", "qcow2"]),
    "raw_new": (raw_old, ["-b", "old.raw", "-F", "raw"]),
    "prefix": (chain3, ["-b", "base.qcow2", "-F", "qcow2"]),
    "prefix_unsafe": (chain3, ["-u", "-b", "base.qcow2", "-F", "qcow2"]),
    "same_backing": (old_new, ["-b", "old.qcow2", "-F", "qcow2"]),
    "bitmap_kept": (with_bitmap, ["-b", "new.qcow2", "-F", "qcow2"]),
    # refusals: same words; ours writes nothing (QEMU copies first for the -F one)
    "no_b": (old_new, []),
    "no_F": (old_new, ["-b", "new.qcow2"]),
    "no_F_unsafe": (old_new, ["-u", "-b", "new.qcow2"]),
    "missing_new": (old_new, ["-b", "nope.qcow2", "-F", "qcow2"]),
    "bad_F": (old_new, ["-b", "new.qcow2", "-F", "foo"]),
    "wrong_F": (old_new, ["-b", "new.qcow2", "-F", "qcow2"]),
}


def with_unknown_extension(d: Path) -> None:
    """An overlay whose header carries an extension neither tool knows."""

    from qcow2kit.format.extensions import Extension
    from qcow2kit.format.header import Header

    old_new(d, "cluster_size=64k")
    path = d / "top.qcow2"
    data = bytearray(path.read_bytes())
    h = Header.from_bytes(bytes(data[:65536]))
    h = h.replace(extensions=(*h.extensions, Extension(0x12345678, b"kept verbatim!"))).relayout()
    raw = h.to_bytes()
    data[: len(raw)] = raw
    path.write_bytes(bytes(data))


CASES["bitmap_missing_new"] = (with_bitmap, ["-b", "nope.qcow2", "-F", "qcow2"])
CASES["bitmap_no_F"] = (with_bitmap, ["-b", "new.qcow2"])
CASES["unknown_extension"] = (with_unknown_extension, ["-b", "new.qcow2", "-F", "qcow2"])
CASES["unknown_extension_flatten"] = (with_unknown_extension, ["-u", "-b", ""])


@pytest.mark.parametrize("case", sorted(CASES))
def test_rebase_like_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str], case: str) -> None:
    build, args = CASES[case]
    a, b = tmp_path / "qemu", tmp_path / "ours"
    for d in (a, b):
        d.mkdir()
        build(d)
        if case == "wrong_F":
            (d / "new.qcow2").write_bytes(b"not an image" * 100)
    top_a, top_b = a / "top.qcow2", b / "top.qcow2"
    before = top_b.read_bytes()
    view = guest(top_b, tmp_path / "v.raw")
    want = run_qemu(a, *args, "top.qcow2")
    got = run_ours(monkeypatch, capsys, b, *args, "top.qcow2")
    want = (want[0], want[1].replace("\r", "\n"), want[2])
    got = (got[0], got[1].replace("\r", "\n"), got[2])
    if case == "flatten_progress":
        assert got[1].startswith("    (0.00/100%)") and got[1].endswith("(100.00/100%)\n\n")
        got, want = got[:1] + got[2:], want[:1] + want[2:]
    assert got == want
    if got[0] != 0:
        assert top_b.read_bytes() == before  # a refusal writes nothing
        return
    if case != "unsafe_missing":
        assert_clean(top_b)
    cs = int(qemu_img("info", "--output=json", "-U", str(top_b)).stdout.split(
        '"cluster-size": ')[1].split(",")[0])
    assert top_a.read_bytes()[:cs] == top_b.read_bytes()[:cs]
    if "-u" not in args:
        assert map_shape(top_a) == map_shape(top_b)
        assert guest(top_b, tmp_path / "w.raw") == view
    elif case != "unsafe_missing":
        res = qemu_img("compare", "-U", str(top_a), str(top_b), check=False)
        assert res.returncode in (0, 1) and "Could not" not in res.stderr


def test_relative_names_from_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """-b is opened relative to the overlay's directory and stored as written."""
    for name in ("qemu", "ours"):
        (tmp_path / name).mkdir()
        old_new(tmp_path / name)
    view = guest(tmp_path / "ours" / "top.qcow2", tmp_path / "v.raw")
    want = run_qemu(tmp_path, "-b", "new.qcow2", "-F", "qcow2", "qemu/top.qcow2")
    got = run_ours(monkeypatch, capsys, tmp_path, "-b", "new.qcow2", "-F", "qcow2",
                   "ours/top.qcow2")
    assert got == want == (0, "", "")
    assert ((tmp_path / "qemu/top.qcow2").read_bytes()[:4096]
            == (tmp_path / "ours/top.qcow2").read_bytes()[:4096])
    assert guest(tmp_path / "ours" / "top.qcow2", tmp_path / "w.raw") == view
    want = run_qemu(tmp_path, "-b", "gone.qcow2", "-F", "qcow2", "qemu/top.qcow2")
    got = run_ours(monkeypatch, capsys, tmp_path, "-b", "gone.qcow2", "-F", "qcow2",
                   "ours/top.qcow2")
    got = (got[0], got[1], got[2].replace("'ours/", "'qemu/"))
    assert got == want and got[0] == 1

