"""create's -o options judged by qemu-img 7.2: same exit code, same virtual size and cluster
size, and (where flagged) qemu-img's message word for word, file-name prefix included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qcow2kit.cli.main import main
from tests.helpers import assert_clean, qemu_img


def info(path: Path) -> tuple[int, int, int] | None:
    if not path.exists():
        return None
    res = qemu_img("info", "--output=json", str(path), check=False)
    if res.returncode != 0:
        return None
    i = json.loads(res.stdout)
    return i["virtual-size"], i["cluster-size"], i["format-specific"]["data"]["refcount-bits"]


@pytest.mark.parametrize("opts,same_message", [
    ("cluster_size=4k", True), ("cluster_size=0x1000", True), ("cluster_size=1.5k", True),
    ("cluster_size=1000", True), ("cluster_size=abc", True), ("cluster_size=16E", True),
    ("refcount_bits=010", True), ("refcount_bits=0x10", True), ("refcount_bits=+16", True),
    ("refcount_bits= 16", True), ("refcount_bits=08", True), ("refcount_bits=abc", True),
    ("refcount_bits=1k", True), ("refcount_bits=-1", True), ("refcount_bits=3", True),
    ("refcount_bits=99999999999999999999", True),
    ("compat=v2", True), ("compat=0.9", True), ("preallocation=bogus", True),
    ("compression_type=lz4", True), ("lazy_refcounts=maybe", True), ("bogus=1", True),
    ("extended_l2=on,cluster_size=4k", True), ("data_file_raw=on", True),
    ("compat=0.10,lazy_refcounts=on", False),
])
def test_option_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                       capsys: pytest.CaptureFixture[str], opts: str,
                       same_message: bool) -> None:
    monkeypatch.chdir(tmp_path)
    q = qemu_img("create", "-q", "-f", "qcow2", "-o", opts, "t", "1M", check=False)
    q_info = info(tmp_path / "t")
    (tmp_path / "t").unlink(missing_ok=True)
    rc = main(["create", "-q", "-f", "qcow2", "-o", opts, "t", "1M"])
    err = capsys.readouterr().err
    assert rc == q.returncode, (err, q.stderr)
    assert info(tmp_path / "t") == q_info
    if same_message:
        assert err == q.stderr.replace("qemu-img:", "qcow2kit:")
    if rc == 0:
        assert_clean(tmp_path / "t")


def test_positional_size_is_read_before_the_options(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["create", "-q", "-f", "qcow2", "-o", "bogus=1", "t", "abc"]
    q = qemu_img(*argv, check=False)
    assert main(argv) == q.returncode == 1
    assert capsys.readouterr().err == q.stderr.replace("qemu-img:", "qcow2kit:")
