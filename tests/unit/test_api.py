"""The public Python API as a user meets it: exactly the advertised names, a typed create(),
any os.PathLike for a path (Image.filename always str), InvalidArgumentError (a ValueError and a
Qcow2Error) for bad arguments, and an `import qcow2kit` that stays light."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import qcow2kit
from qcow2kit.ops.create import create as ops_create
from tests.helpers import assert_clean, qemu_img

PUBLIC = {
    "open", "create", "measure", "Image", "CheckResult", "Run", "Kind", "Qcow2Error", "FormatError",
    "UnsupportedFeatureError", "CorruptionError", "ImageStateError", "LockError", "ResizeError",
    "InvalidArgumentError",
}


class _Where(os.PathLike[str]):
    """A path-like that is not a pathlib.Path."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __fspath__(self) -> str:
        return str(self.path)


def test_all_lists_exactly_the_public_names() -> None:
    assert set(qcow2kit.__all__) == PUBLIC
    assert len(qcow2kit.__all__) == len(PUBLIC)
    assert {n for n in dir(qcow2kit) if not n.startswith("_")} == PUBLIC
    for name in ("Any", "TYPE_CHECKING", "annotations", "typing", "os"):
        assert not hasattr(qcow2kit, name), name


def test_every_public_name_resolves() -> None:
    from qcow2kit.image import Image
    from qcow2kit.metadata.check import CheckResult
    from qcow2kit.metadata.l2map import Kind, Run

    assert (qcow2kit.Image, qcow2kit.CheckResult, qcow2kit.Run, qcow2kit.Kind) == (
        Image, CheckResult, Run, Kind)
    for name in qcow2kit.__all__:
        assert getattr(qcow2kit, name) is not None
    with pytest.raises(AttributeError):
        qcow2kit.NoSuchThing  # noqa: B018


def test_import_stays_light() -> None:
    code = ("import sys, qcow2kit\n"
            "heavy = [m for m in ('numpy', 'qcow2kit.image', 'qcow2kit.metadata') "
            "if m in sys.modules]\n"
            "print(heavy)\n"
            "qcow2kit.Kind\n"
            "print('numpy' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert res.stdout.split("\n")[:2] == ["[]", "True"]


def test_create_signature_is_explicit_and_matches_ops() -> None:
    ours = inspect.signature(qcow2kit.create)
    theirs = inspect.signature(ops_create)
    assert list(ours.parameters) == list(theirs.parameters)
    for name, p in ours.parameters.items():
        q = theirs.parameters[name]
        assert p.kind == q.kind and p.default == q.default, name
        assert p.kind != inspect.Parameter.VAR_KEYWORD
    assert [n for n, p in ours.parameters.items()
            if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD] == ["path", "size"]
    assert "cluster_size" in ours.parameters
    with pytest.raises(TypeError):
        qcow2kit.create("x.qcow2", 1 << 20, bogus=1)  # type: ignore[call-arg]


@pytest.mark.parametrize("make", [Path, _Where, str])
def test_paths_may_be_path_like(tmp_path: Path, make: type) -> None:
    target = tmp_path / "p.qcow2"
    qcow2kit.create(make(target), 1 << 20, cluster_size=4096)
    assert_clean(target)
    info = json.loads(qemu_img("info", "--output=json", str(target)).stdout)
    assert (info["virtual-size"], info["cluster-size"]) == (1 << 20, 4096)
    with qcow2kit.open(make(target), "r+") as img:
        assert type(img.filename) is str and img.filename == str(target)
        img.write(0, b"x")


def test_backing_and_data_file_may_be_path_like(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x11" * 4096)
    top = tmp_path / "top.qcow2"
    qcow2kit.create(top, None, backing_file=_Where(base), backing_fmt="raw")
    with qcow2kit.open(top) as img:
        assert img.read(0, 4) == b"\x11" * 4
    ext = tmp_path / "ext.qcow2"
    qcow2kit.create(ext, 1 << 20, data_file=tmp_path / "ext.data")
    assert (tmp_path / "ext.data").exists()
    assert_clean(ext)


def test_size_from_backing_file_rounds_up_like_qemu_img(tmp_path: Path) -> None:
    base = tmp_path / "b.raw"
    base.write_bytes(b"\x22" * 1000)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "b.raw", "-F", "raw", str(tmp_path / "q.qcow2"))
    qcow2kit.create(tmp_path / "o.qcow2", None, backing_file="b.raw", backing_fmt="raw")
    sizes = [json.loads(qemu_img("info", "--output=json", str(tmp_path / n)).stdout)
             ["virtual-size"] for n in ("q.qcow2", "o.qcow2")]
    assert sizes == [1024, 1024]


@pytest.mark.parametrize("kwargs,message", [
    ({"cluster_size": 1000}, "Cluster size must be a power of two"),
    ({"compat": "0.9"}, "Invalid compatibility level"),
    ({"refcount_bits": 3}, "Refcount width must be a power of two"),
    ({"preallocation": "bogus"}, "Invalid preallocation mode"),
    ({"compression_type": "lz4"}, "Invalid compression type"),
    ({"compat": "0.10", "lazy_refcounts": True}, "only supported with compatibility level"),
    ({"extended_l2": True, "cluster_size": 4096}, "at least 16384"),
    ({"data_file_raw": True}, "data-file-raw requires data-file"),
    ({"size": 1000}, "multiple of 512"),
    ({"size": -512}, "non-negative"),
    ({"size": None}, "needs a size"),
    ({"size": 7 << 60}, "too large for file format 'qcow2'"),
])
def test_bad_create_options_raise_invalid_argument(tmp_path: Path, kwargs: dict[str, object],
                                                   message: str) -> None:
    args = {"size": 1 << 20, **kwargs}
    size = args.pop("size")
    path = tmp_path / "bad.qcow2"
    with pytest.raises(qcow2kit.InvalidArgumentError, match=message) as exc:
        qcow2kit.create(path, size, **args)  # type: ignore[arg-type]
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, qcow2kit.Qcow2Error)
    assert not path.exists()


@pytest.mark.parametrize("mode", ["w", "rb", "a", ""])
def test_bad_open_mode(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "m.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(path), "1M")
    with pytest.raises(qcow2kit.InvalidArgumentError, match="mode must be 'r' or 'r\\+'"):
        qcow2kit.open(path, mode)
