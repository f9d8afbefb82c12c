"""measure against qemu-img measure, number by number: --size and source images (qcow2 with
data, zero and compressed clusters, backing chains ending in a sparse raw file, snapshots,
bitmaps, metadata preallocation, raw files) for raw and qcow2 targets over cluster sizes,
refcount widths, extended L2, preallocation, backing and compat; and the refusals, same
words and exit code."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

import qcow2kit
from qcow2kit.cli.main import main
from tests.helpers import qemu_img, qemu_io


def ours(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["measure", *args])
    out, err = capsys.readouterr()
    return rc, out, err.replace("qcow2kit:", "qemu-img:")


def same(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    res = qemu_img("measure", *args, check=False)
    rc, out, err = ours(capsys, *args)
    assert (rc, out, err) == (res.returncode, res.stdout, res.stderr), args
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("measure")
    raw = d / "base.raw"
    with open(raw, "wb") as f:
        f.truncate(9 << 20)
        f.seek(3 << 20)
        f.write(b"\x11" * (200 << 10))
    mid = d / "mid.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", "base.raw", "-o", "cluster_size=4k",
             str(mid), "10M")
    qemu_io(mid, "write -P 2 100k 3k", "write -z 3M 64k", "write -P 3 9500k 300k")
    top = d / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", "mid.qcow2", str(top), "11M")
    qemu_io(top, "write -P 4 1M 1k", "write -z 0 128k", "write -c -P 5 6M 64k",
            "write -P 6 10M 512k")
    plain = d / "plain.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=16k,extended_l2=on", str(plain),
             "7M")
    qemu_io(plain, "write -P 1 0 5k", "write -P 2 33k 1k", "write -z 1M 100k",
            "write -P 3 2M 1M")
    qemu_img("snapshot", "-c", "s1", str(plain))
    qemu_io(plain, "write -P 4 4M 1M", "discard 2M 1M")
    qemu_img("bitmap", "--add", "-g", "512", str(plain), "fine")
    qemu_img("bitmap", "--add", "-g", "1M", str(plain), "a-longer-bitmap-name")
    prealloc = d / "prealloc.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "preallocation=metadata", str(prealloc), "5M")
    qemu_io(prealloc, "write -P 1 1M 64k")
    v2 = d / "v2.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", str(v2), "3M")
    qemu_io(v2, "write -P 1 512 512")
    empty = d / "empty.qcow2"
    qemu_img("create", "-f", "qcow2", str(empty), "0")
    return {"raw": raw, "mid": mid, "top": top, "plain": plain, "prealloc": prealloc,
            "v2": v2, "empty": empty}


TARGET_OPTIONS = [
    "cluster_size=512", "cluster_size=4k,refcount_bits=1", "refcount_bits=64",
    "cluster_size=2M,refcount_bits=8", "extended_l2=on,cluster_size=16k",
    "extended_l2=on", "preallocation=metadata", "preallocation=falloc",
    "preallocation=full,cluster_size=8k", "backing_file=x,backing_fmt=raw", "compat=0.10",
    "lazy_refcounts=on,data_file=d.raw",
]


@pytest.mark.parametrize("opts", TARGET_OPTIONS)
@pytest.mark.parametrize("name", ["raw", "mid", "top", "plain", "prealloc", "v2", "empty"])
def test_source_matrix(capsys: pytest.CaptureFixture[str], sources: dict[str, Path],
                       name: str, opts: str) -> None:
    out = same(capsys, "--output=json", "-O", "qcow2", "-o", opts, str(sources[name]))
    assert json.loads(out)["required"] > 0


@pytest.mark.parametrize("name", ["raw", "top", "plain"])
def test_source_formats(capsys: pytest.CaptureFixture[str], sources: dict[str, Path],
                        name: str) -> None:
    same(capsys, str(sources[name]))
    same(capsys, "-O", "qcow2", str(sources[name]))
    same(capsys, "-f", "raw", "-O", "qcow2", str(sources[name]))


def test_snapshot_source(capsys: pytest.CaptureFixture[str], sources: dict[str, Path]) -> None:
    plain = str(sources["plain"])
    for snap in ("s1", "1", "snapshot.name=s1", "snapshot.id=1", "nope"):
        same(capsys, "-O", "qcow2", "-l", snap, plain)


SIZES = ["0", "1", "511", "1000", "64k", "1G", "100G", "3T"]
SIZE_OPTIONS = ["cluster_size=512", "cluster_size=64k", "refcount_bits=1,cluster_size=1k",
                "refcount_bits=64,cluster_size=2M", "extended_l2=on", "compat=v2"]


@pytest.mark.parametrize(("size", "opts"), list(itertools.product(SIZES, SIZE_OPTIONS)))
def test_size_matrix(capsys: pytest.CaptureFixture[str], size: str, opts: str) -> None:
    same(capsys, "-O", "qcow2", "-o", opts, "--size", size)


@pytest.mark.parametrize("size", SIZES)
def test_size_raw(capsys: pytest.CaptureFixture[str], size: str) -> None:
    same(capsys, "--output=json", "--size", size)


@pytest.mark.parametrize("args", [
    [], ["--size", "1M", "FILE"], ["--output=xml", "--size", "1M"], ["-O", "vmdk", "--size", "1"],
    ["-O", "qcow2", "-o", "nosuch=1", "--size", "1M"], ["-o", "cluster_size=1k", "--size", "1M"],
    ["-O", "qcow2", "-o", "cluster_size=3k", "--size", "1M"],
    ["-O", "qcow2", "-o", "cluster_size=abc", "--size", "1M"],
    ["-O", "qcow2", "-o", "compat=2.0", "--size", "1M"],
    ["-O", "qcow2", "-o", "refcount_bits=3", "--size", "1M"],
    ["-O", "qcow2", "-o", "refcount_bits=8,compat=0.10", "--size", "1M"],
    ["-O", "qcow2", "-o", "extended_l2=on,cluster_size=4k", "--size", "1M"],
    ["-O", "qcow2", "-o", "preallocation=bogus", "--size", "1M"],
    ["-O", "qcow2", "-o", "cluster_size=512", "--size", "2000T"],
    ["--size", "1M", "-O", "qcow2", "-o", "lazy_refcounts=maybe"],
])
def test_refusals(capsys: pytest.CaptureFixture[str], sources: dict[str, Path],
                  args: list[str]) -> None:
    args = [str(sources["raw"]) if a == "FILE" else a for a in args]
    same(capsys, *args)


def test_python_api(sources: dict[str, Path]) -> None:
    m = qcow2kit.measure(sources["top"], out_format="qcow2", cluster_size=4096)
    want = json.loads(qemu_img("measure", "--output=json", "-O", "qcow2", "-o",
                               "cluster_size=4k", str(sources["top"])).stdout)
    assert (m.required, m.fully_allocated, m.bitmaps) == (
        want["required"], want["fully-allocated"], want["bitmaps"])
    with pytest.raises(qcow2kit.InvalidArgumentError):
        qcow2kit.measure(size=1 << 20, out_format="qcow2", refcount_bits=3)


# ---- the numpy-free path (ops/measure.measure_light) ------------------------------------------
@pytest.fixture(scope="module")
def light_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Plain qcow2 images (and a chain of them) that the light path answers."""
    d = tmp_path_factory.mktemp("measure-light")
    flat = d / "flat.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=16k", str(flat), str((5 << 20) + 512))
    qemu_io(flat, "write -P 1 0 40k", "write -P 2 1M 3k", "write -z 2M 64k",
            "write -P 3 2112k 16k", "write -P 4 5M 512")
    over = d / "over.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", "flat.qcow2", str(over), "6M")
    qemu_io(over, "write -P 5 8k 4k", "write -z 1M 64k", "write -P 6 5632k 100k")
    return {"flat": flat, "over": over}


@pytest.mark.parametrize("opts", [*TARGET_OPTIONS, None])
@pytest.mark.parametrize("name", ["flat", "over"])
def test_light_path_like_qemu(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                              light_sources: dict[str, Path], name: str, opts: str | None) -> None:
    from qcow2kit.ops import measure as ops_measure

    answered: list[object] = []
    real = ops_measure.measure_light

    def spy(*args: object) -> object:
        answered.append(real(*args))  # type: ignore[arg-type]
        return answered[-1]

    monkeypatch.setattr(ops_measure, "measure_light", spy)
    args = ["-O", "qcow2", "-o", opts] if opts else ["-O", "raw"]
    same(capsys, "--output=json", *args, str(light_sources[name]))
    assert answered and answered[0] is not None, "the light path declined"


@pytest.mark.parametrize("opts", TARGET_OPTIONS)
def test_light_path_equals_the_full_path(monkeypatch: pytest.MonkeyPatch,
                                         light_sources: dict[str, Path],
                                         sources: dict[str, Path], opts: str) -> None:
    from qcow2kit.cli.measure import typed_options
    from qcow2kit.ops import measure as ops_measure

    options = typed_options([opts], "qcow2")
    for path in [*light_sources.values(), *sources.values()]:
        light = ops_measure.measure(str(path), out_format="qcow2", **options)
        with monkeypatch.context() as m:
            m.setattr(ops_measure, "measure_light", lambda *a: None)
            full = ops_measure.measure(str(path), out_format="qcow2", **options)
        assert light == full, (path.name, opts)
