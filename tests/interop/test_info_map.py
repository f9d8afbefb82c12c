"""`info` and `map` against qemu-img 7.2: the same JSON value (map: the same bytes), the
same human layout; for images QEMU made and for images we made."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import qcow2kit
from qcow2kit.ops.info import chain_info, human, human_chain, image_info, qemu_json, size_to_str
from qcow2kit.ops.map import format_human, format_json, map_path
from tests.helpers import qemu_img, qemu_io


def qemu_info(path: Path, *extra: str) -> Any:
    return json.loads(qemu_img("info", "--output=json", *extra, str(path)).stdout)


def assert_info_same(path: Path, *, chain: bool = False) -> None:
    p = str(path)
    if chain:
        assert chain_info(p) == qemu_info(path, "--backing-chain")
        assert human_chain(chain_info(p)) == qemu_img("info", "--backing-chain", p).stdout
        text = qemu_img("info", "--output=json", "--backing-chain", p).stdout
        assert qemu_json(chain_info(p)) + "\n" == text  # byte for byte, too
    else:
        assert image_info(p) == qemu_info(path)
        assert human(image_info(p)) == qemu_img("info", p).stdout
        assert qemu_json(image_info(p)) + "\n" == qemu_img("info", "--output=json", p).stdout


def assert_map_same(path: Path) -> None:
    ours = map_path(str(path))
    theirs = qemu_img("map", "--output=json", str(path)).stdout
    assert format_json(ours) == theirs
    assert [e.to_json() for e in ours] == json.loads(theirs)
    res = qemu_img("map", str(path), check=False)
    text, err = format_human(ours)
    assert text == res.stdout
    assert (err is not None) == (res.returncode != 0)


def check_both(path: Path) -> None:
    assert_info_same(path)
    assert_map_same(path)


# ---- images QEMU made -----------------------------------------------------------------
def _qemu_plain(tmp: Path) -> Path:
    p = tmp / "plain.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "64M")
    qemu_io(p, "write -P 1 0 128k", "write -z 64k 64k", "write -z 1M 64k",
            "write -c -P 2 2M 64k", "write -c -P 3 2112k 64k", "write -P 4 40M 3M")
    return p


def _qemu_v2(tmp: Path) -> Path:
    p = tmp / "v2.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", str(p), "16M")
    qemu_io(p, "write -P 1 0 100k", "write -z 0 64k", "write -P 2 5M 1M")
    qemu_img("snapshot", "-c", "first", str(p))
    return p


def _qemu_extended(tmp: Path) -> Path:
    p = tmp / "ext.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on", str(p), "8M")
    qemu_io(p, "write -P 1 2k 2k", "write -P 1 64k 64k", "write -z 8k 2k",
            "write -c -P 5 1M 64k", "write -P 6 3M 1k")
    return p


def _qemu_prealloc_metadata(tmp: Path) -> Path:
    p = tmp / "pm.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "preallocation=metadata", str(p), "3M")
    qemu_io(p, "write -P 1 128k 4k", "write -P 1 1M 300k")
    return p


def _qemu_prealloc_falloc(tmp: Path) -> Path:
    p = tmp / "pf.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "preallocation=falloc,cluster_size=4k", str(p), "2M")
    return p


def _qemu_snap_bitmaps(tmp: Path) -> Path:
    p = tmp / "sb.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=on,refcount_bits=8", str(p), "4M")
    qemu_io(p, "write -P 1 0 1M")
    qemu_img("snapshot", "-c", "snap one", str(p))
    qemu_img("bitmap", "--add", str(p), "b1")
    qemu_img("bitmap", "--add", "--disable", "-g", "128k", str(p), "b2")
    qemu_io(p, "write -P 2 512k 1M")
    qemu_img("snapshot", "-c", "s2", str(p))
    return p


def _qemu_zstd_small_clusters(tmp: Path) -> Path:
    p = tmp / "z.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compression_type=zstd,cluster_size=512,refcount_bits=1",
             str(p), "1M")
    qemu_io(p, "write -P 1 0 3000", "write -c -P 2 4096 512", "write -z 8192 1024",
            "write -P 3 40000 20000")
    return p


def _qemu_data_file(tmp: Path) -> Path:
    p = tmp / "df.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp / 'df.data'}", str(p), "4M")
    qemu_io(p, "write 0 64k", "write -z 128k 64k", "write -P 3 1M 100k")
    return p


def _qemu_data_file_raw(tmp: Path) -> Path:
    p = tmp / "dr.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp / 'dr.data'},data_file_raw=on",
             str(p), "4M")
    qemu_io(p, "write 0 64k", "write -z 128k 64k")
    return p


QEMU_BUILDERS: list[Callable[[Path], Path]] = [
    _qemu_plain, _qemu_v2, _qemu_extended, _qemu_prealloc_metadata, _qemu_prealloc_falloc,
    _qemu_snap_bitmaps, _qemu_zstd_small_clusters, _qemu_data_file, _qemu_data_file_raw,
]


@pytest.mark.parametrize("build", QEMU_BUILDERS, ids=lambda b: b.__name__[6:])
def test_qemu_made(tmp_path: Path, build: Callable[[Path], Path]) -> None:
    check_both(build(tmp_path))


def test_backing_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("sub").mkdir()
    qemu_img("create", "-f", "raw", "base.raw", "8M")
    qemu_io("base.raw", "write -P 1 0 1M", "write -z 2M 1M", fmt="raw")
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", "base.raw", "mid.qcow2")
    qemu_io("mid.qcow2", "write -P 2 512k 1M", "write -z 4M 64k", "write -z -u 5M 128k")
    qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", "../mid.qcow2", "sub/top.qcow2", "12M")
    qemu_io("sub/top.qcow2", "write -P 3 6M 64k", "write -z 7M 64k", "write -P 4 10M 64k")
    for name in ("sub/top.qcow2", "mid.qcow2", "base.raw"):
        check_both(Path(name))
    assert_info_same(Path("sub/top.qcow2"), chain=True)
    # absolute name of the overlay: full-backing-filename follows it
    assert_info_same(tmp_path / "sub" / "top.qcow2", chain=True)
    assert_map_same(tmp_path / "sub" / "top.qcow2")


def test_our_overlay_over_qemu_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-f", "qcow2", "b.qcow2", "1M")
    qemu_io("b.qcow2", "write -P 9 0 100k")
    qcow2kit.create("t.qcow2", 1 << 20, backing_file="b.qcow2")  # format probed
    check_both(Path("t.qcow2"))
    assert_info_same(Path("t.qcow2"), chain=True)


@pytest.mark.parametrize("bit,key", [(0, "dirty-flag"), (1, "corrupt")])
def test_dirty_and_corrupt_bits(tmp_path: Path, bit: int, key: str) -> None:
    p = tmp_path / "bits.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=on", str(p), "1M")
    with open(p, "r+b") as f:
        f.seek(72)
        (bits,) = struct.unpack(">Q", f.read(8))
        f.seek(72)
        f.write(struct.pack(">Q", bits | (1 << bit)))
    ours = image_info(str(p))
    assert ours == qemu_info(p, "-U")
    flag = ours[key] if key == "dirty-flag" else ours["format-specific"]["data"][key]
    assert flag is True
    assert human(ours) == qemu_img("info", "-U", str(p)).stdout


def test_sparse_1t_map(tmp_path: Path) -> None:
    p = tmp_path / "big.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "1T")
    qemu_io(p, "write 0 1M", "write 500G 1M", "write -z 700G 64k", "write 1023G 64k")
    check_both(p)


def test_raw_image(tmp_path: Path) -> None:
    p = tmp_path / "r.raw"
    with open(p, "wb") as f:
        f.truncate(4 << 20)
        f.seek(1 << 20)
        f.write(b"x" * 10000)
    check_both(p)


# ---- images we made -------------------------------------------------------------------
OUR_OPTIONS: list[dict[str, Any]] = [
    {},
    {"cluster_size": 512},
    {"cluster_size": 2 << 20},
    {"refcount_bits": 1},
    {"refcount_bits": 64, "cluster_size": 4096},
    {"compat": "0.10"},
    {"extended_l2": True},
    {"lazy_refcounts": True},
    {"compression_type": "zstd"},
    {"preallocation": "metadata"},
    {"preallocation": "falloc", "cluster_size": 4096},
    {"preallocation": "full"},
    {"data_file": "DATA"},
    {"data_file": "DATA", "data_file_raw": True},
    {"backing_file": "BACKING", "backing_fmt": "qcow2"},
    {"backing_file": "BACKING", "backing_fmt": "qcow2", "extended_l2": True},
]


def _ids(o: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in o.items()) or "default"


@pytest.mark.parametrize("opts", OUR_OPTIONS, ids=_ids)
def test_our_images(tmp_path: Path, opts: dict[str, Any]) -> None:
    opts = dict(opts)
    size = 6 << 20
    if opts.get("data_file") == "DATA":
        opts["data_file"] = str(tmp_path / "our.data")
    if opts.get("backing_file") == "BACKING":
        base = tmp_path / "ourbase.qcow2"
        qemu_img("create", "-f", "qcow2", str(base), str(size))
        qemu_io(base, "write -P 0x42 0 3M")
        opts["backing_file"] = str(base)
    p = tmp_path / "our.qcow2"
    qcow2kit.create(str(p), size, **opts)
    check_both(p)
    with qcow2kit.open(str(p), "r+") as img:
        img.write(100_000, b"\x17" * 300_000)
        img.write(4 << 20, b"\x18" * 4096)
        img.write_zeroes(2 << 20, 128 << 10)
    check_both(p)


def test_size_to_str_matches_qemu() -> None:
    assert size_to_str(0) == "0 B"
    assert size_to_str(999) == "999 B"
    assert size_to_str(1023) == "0.999 KiB"  # qemu switches unit at 1000, not 1024
    assert size_to_str(1000 * 1024) == "0.977 MiB"
    assert size_to_str(208896) == "204 KiB"
    assert size_to_str(1 << 40) == "1 TiB"


def test_info_does_not_import_numpy(tmp_path: Path) -> None:
    import subprocess
    import sys

    p = tmp_path / "n.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "1M")
    code = (
        "import sys, qcow2kit.cli.main as m; rc = m.main(['info', '--output=json', sys.argv[1]]);"
        "assert 'numpy' not in sys.modules, 'numpy imported'; sys.exit(rc)"
    )
    res = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True,
                         env={**os.environ})
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("seed", range(6))
def test_random_chains(tmp_path: Path, seed: int) -> None:
    """Random cluster sizes, chain depths, raw bottoms and qemu-io operations."""
    import random
    import subprocess

    rng = random.Random(seed)
    cs = rng.choice([512, 4096, 16384, 65536, 1 << 21])
    ext = cs >= 16384 and rng.random() < 0.5
    size = rng.choice([1 << 20, 3 << 20, (5 << 20) + 512 * rng.randrange(1, 100)])
    chain: list[Path] = []
    for li in range(rng.randrange(1, 4)):
        if li == 0 and rng.random() < 0.3:
            p = tmp_path / "l0.raw"
            qemu_img("create", "-f", "raw", str(p), str(size))
            qemu_io(p, f"write -P 5 0 {size // 2}", fmt="raw")
            chain.append(p)
            continue
        p = tmp_path / f"l{li}.qcow2"
        lsize = rng.choice([size, max(512, size // 2 // 512 * 512), size * 2])
        args = ["create", "-f", "qcow2", "-o", f"cluster_size={cs},extended_l2={'on' if ext else 'off'}"]
        if chain:
            args += ["-b", chain[-1].name, "-F", "raw" if chain[-1].suffix == ".raw" else "qcow2"]
        qemu_img(*args, str(p), str(lsize))
        cmds = []
        for _ in range(rng.randrange(1, 10)):
            off = rng.randrange(0, lsize) // 512 * 512
            n = min(lsize - off, rng.choice([512, 4096, cs, 2 * cs + 512, 100000]))
            k = rng.random()
            if k < 0.5:
                cmds.append(f"write -P {rng.randrange(256)} {off} {n}")
            elif k < 0.7:
                cmds.append(f"write -z {off} {n}")
            elif k < 0.8:
                cmds.append(f"write -z -u {off} {n}")
            elif k < 0.9:
                cmds.append(f"discard {off} {n}")
            elif off // cs * cs + cs <= lsize:
                cmds.append(f"write -c -P {rng.randrange(1, 256)} {off // cs * cs} {cs}")
        if cmds:  # a compressed write over allocated data fails in qemu-io: that is fine
            argv = ["qemu-io", "-f", "qcow2"]
            for c in cmds:
                argv += ["-c", c]
            subprocess.run([*argv, str(p)], capture_output=True, check=False)
        chain.append(p)
    top = chain[-1]
    assert_map_same(top)
    assert chain_info(str(top)) == qemu_info(top, "--backing-chain")


@pytest.mark.parametrize(
    "window", [("100000", "5000000"), ("1M", None), ("7777", "3"), ("100M", None), ("0", "0")]
)
def test_map_window(tmp_path: Path, window: tuple[str, str | None]) -> None:
    from qcow2kit.cli.common import parse_size

    p = _qemu_extended(tmp_path)
    start, length = window
    args = ["map", "--output=json", f"--start-offset={start}"]
    if length is not None:
        args.append(f"--max-length={length}")
    theirs = qemu_img(*args, str(p)).stdout
    ours = map_path(str(p), start=parse_size(start),
                    length=parse_size(length) if length is not None else None)
    assert format_json(ours) == theirs


def test_raw_of_odd_size_counts_whole_sectors(tmp_path: Path) -> None:
    p = tmp_path / "odd.raw"
    p.write_bytes(b"\x5a" * 1000)
    check_both(p)
    ov = tmp_path / "oddov.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", p.name, "-F", "raw", str(ov), "4k")
    check_both(ov)
