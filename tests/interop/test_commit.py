"""commit against qemu-img commit on copies of the same chains: the same exit code and words,
the base equal by qemu-img compare AND by qemu-img map (same clusters copied, zero clusters
as zero clusters), both images clean by qemu-img check, the overlay emptied (byte for byte
QEMU's file for v3 images without snapshots) unless -d / -b."""

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
    rc = main(["commit", *args])
    out, err = capsys.readouterr()
    return rc, out, err.replace("qcow2kit:", "qemu-img:")


def run_qemu(cwd: Path, *args: str) -> tuple[int, str, str]:
    assert QEMU_IMG is not None
    res = subprocess.run([QEMU_IMG, "commit", *args], cwd=cwd, capture_output=True, text=True)
    return res.returncode, res.stdout, res.stderr


def twins(tmp_path: Path, build: Build) -> tuple[Path, Path]:
    a, b = tmp_path / "qemu", tmp_path / "ours"
    for d in (a, b):  # built twice: a copy would fill the holes of raw files
        d.mkdir()
        build(d)
    return a, b


def compare_dirs(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        pa, pb = a / name, b / name
        fmt = "raw" if name.endswith(".raw") else "qcow2"
        res = qemu_img("compare", "-f", fmt, "-F", fmt, str(pa), str(pb), check=False)
        assert res.returncode == 0, (name, res.stdout)
        if fmt == "qcow2":
            assert_clean(pb)
            assert map_shape(pa) == map_shape(pb), name


def chain2(d: Path, base_opts: str = "cluster_size=65536", top_opts: str = "cluster_size=4096",
           size: str = "8M") -> None:
    qemu_img("create", "-f", "qcow2", "-o", base_opts, str(d / "base.qcow2"), size)
    qemu_io(d / "base.qcow2", "write -P 1 0 3M", "write -P 7 6M 1M")
    qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2", "-o", top_opts,
             str(d / "top.qcow2"))
    qemu_io(d / "top.qcow2", "write -P 2 100k 3k", "write -z 1M 512k", "write -z 3M 1k",
            "write -P 3 5M 1M", "write -c -P 4 7M 64k", "write -z 2M 8k")


CASES: dict[str, tuple[Build, list[str], list[str]]] = {
    "basic": (chain2, [], ["base.qcow2", "top.qcow2"]),
    "drop": (chain2, ["-d"], ["base.qcow2", "top.qcow2"]),
    "small_base_clusters": (
        lambda d: chain2(d, "cluster_size=512,refcount_bits=1", "cluster_size=65536"), [],
        ["base.qcow2", "top.qcow2"]),
    "big_base_clusters": (
        lambda d: chain2(d, "cluster_size=1M,extended_l2=on", "cluster_size=65536"), [],
        ["base.qcow2", "top.qcow2"]),
    "v2": (lambda d: chain2(d, "compat=0.10", "compat=0.10"), [], ["base.qcow2", "top.qcow2"]),
    "lazy_top": (lambda d: chain2(d, "cluster_size=65536", "lazy_refcounts=on"), [],
                 ["base.qcow2", "top.qcow2"]),
}


def with_snapshot(d: Path) -> None:
    chain2(d)
    qemu_img("snapshot", "-c", "s", str(d / "top.qcow2"))
    qemu_io(d / "top.qcow2", "write -P 9 4M 64k")


def three(d: Path) -> None:
    raw = d / "root.raw"
    with open(raw, "wb") as f:
        f.truncate(8 << 20)
        f.seek(1 << 20)
        f.write(b"\x05" * (1 << 20))
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", "root.raw", str(d / "base.qcow2"))
    qemu_io(d / "base.qcow2", "write -P 1 0 1536k")
    qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2", "-o",
             "cluster_size=16k", str(d / "mid.qcow2"))
    qemu_io(d / "mid.qcow2", "write -P 2 1M 100k", "write -z 4M 64k")
    qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", "mid.qcow2", str(d / "top.qcow2"))
    qemu_io(d / "top.qcow2", "write -P 3 1050k 4k", "write -P 4 6M 64k")


def snapshot_base(d: Path) -> None:
    """The base shares its clusters with an internal snapshot (refcount 2): the copy must not
    write them in place, or the snapshot would change."""
    chain2(d)
    qemu_img("snapshot", "-c", "s", str(d / "base.qcow2"))
    qemu_io(d / "base.qcow2", "write -P 8 2M 64k")


def windows(d: Path) -> None:
    """Bigger than the in-place windows (64 MiB), pieces that cross a window's end, a base
    partly allocated, partly compressed and partly shared with a snapshot, so that in-place
    writes and ordinary writes alternate."""
    qemu_img("create", "-f", "qcow2", str(d / "base.qcow2"), "160M")
    qemu_io(d / "base.qcow2", "write -P 1 0 40M", "write -c -P 2 40M 1M", "write -P 3 60M 70M")
    qemu_img("snapshot", "-c", "s", str(d / "base.qcow2"))
    qemu_io(d / "base.qcow2", "write -P 4 100M 8M")
    qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2", "-o",
             "cluster_size=16k", str(d / "top.qcow2"))
    qemu_io(d / "top.qcow2", *[f"write -P {5 + i % 50} {off}k 1040k"
                                for i, off in enumerate(range(0, 160 * 1024 - 1040, 2880))],
            "write -z 63M 2M", "write -P 99 131008k 1M")


CASES["snapshot_top"] = (with_snapshot, [], ["base.qcow2", "top.qcow2"])
CASES["snapshot_base"] = (snapshot_base, [], ["base.qcow2", "top.qcow2"])
CASES["windows"] = (windows, [], ["base.qcow2", "top.qcow2"])
CASES["three_into_mid"] = (three, [], ["root.raw", "base.qcow2", "mid.qcow2", "top.qcow2"])
CASES["three_b_base"] = (three, ["-b", "base.qcow2"],
                         ["root.raw", "base.qcow2", "mid.qcow2", "top.qcow2"])
CASES["three_b_raw"] = (three, ["-b", "root.raw"],
                        ["root.raw", "base.qcow2", "mid.qcow2", "top.qcow2"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_commit_like_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str], case: str) -> None:
    build, extra, names = CASES[case]
    a, b = twins(tmp_path, build)
    before = qemu_img("convert", "-O", "raw", str(b / "top.qcow2"), str(tmp_path / "v.raw"))
    assert before.returncode == 0
    view = (tmp_path / "v.raw").read_bytes()
    want = run_qemu(a, *extra, "top.qcow2")
    got = run_ours(monkeypatch, capsys, b, *extra, "top.qcow2")
    assert got == want
    compare_dirs(a, b, names)
    if not extra and case not in ("snapshot_top", "v2"):
        # make_completely_empty: QEMU's very bytes
        assert (a / "top.qcow2").read_bytes() == (b / "top.qcow2").read_bytes()
    qemu_img("convert", "-O", "raw", str(b / "top.qcow2"), str(tmp_path / "w.raw"))
    assert (tmp_path / "w.raw").read_bytes() == view  # the overlay's disk never changes
    if case in ("snapshot_base", "windows"):  # the base's snapshot is left as it was
        for d in (a, b):
            qemu_img("convert", "-l", "snapshot.name=s", "-O", "raw", str(d / "base.qcow2"),
                     str(d / "s.raw"))
        assert (a / "s.raw").read_bytes() == (b / "s.raw").read_bytes()


def test_progress_and_quiet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    chain2(tmp_path)
    rc, out, _ = run_ours(monkeypatch, capsys, tmp_path, "-p", "-d", "top.qcow2")
    assert rc == 0
    assert out.startswith("    (0.00/100%)\r") and out.endswith("    (100.00/100%)\r\nImage committed.\n")
    rc, out, err = run_ours(monkeypatch, capsys, tmp_path, "-q", "-p", "top.qcow2")
    assert (rc, out, err) == (0, "", "")


@pytest.mark.parametrize("args", [["base.qcow2"], ["-b", "nope", "top.qcow2"],
                                  ["-f", "raw", "top.qcow2"],
                                  ["missing.qcow2"], ["-b", "top.qcow2", "top.qcow2"]])
def test_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                  capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    a, b = twins(tmp_path, chain2)
    before = {name: (b / name).read_bytes() for name in ("base.qcow2", "top.qcow2")}
    want = run_qemu(a, *args)
    got = run_ours(monkeypatch, capsys, b, *args)
    assert got[0] == want[0] == 1
    if "missing" not in args[0]:
        assert got == want
    for name, data in before.items():
        assert (b / name).read_bytes() == data, name
