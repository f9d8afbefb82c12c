"""Persistent dirty bitmaps (issue 12), with QEMU as the oracle both ways: qemu-nbd -B + nbdinfo
read back exactly the granules qcow2kit's writes dirtied; qemu-img reads what `qcow2kit bitmap`
made; crash states of the in-use marking and of the store are never corrupt and never call a
visible write clean."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import qcow2kit
from qcow2kit.cli.main import main as cli_main
from qcow2kit.errors import FormatError, ImageStateError
from qcow2kit.image import Image
from qcow2kit.testing.faults import RecordingStorage, check_crash_states
from tests.helpers import assert_clean, qemu_img, qemu_io

NBDINFO = shutil.which("nbdinfo")
QEMU_NBD = shutil.which("qemu-nbd")


def _info_bitmaps(path: Path) -> list[dict[str, object]]:
    info = json.loads(qemu_img("info", "--output=json", "-U", str(path)).stdout)
    return list(info.get("format-specific", {}).get("data", {}).get("bitmaps", []))


def _qemu_dirty(tmp_path: Path, image: Path, name: str) -> list[tuple[int, int]]:
    """Dirty extents of bitmap `name` as qemu-nbd exports them and nbdinfo reads them."""
    if NBDINFO is None or QEMU_NBD is None:
        pytest.fail("nbdinfo (libnbd-bin) and qemu-nbd (qemu-utils) are required")
    sock = tmp_path / f"nbd-{name}.sock"
    server = subprocess.Popen([QEMU_NBD, "-r", "-f", "qcow2", "-k", str(sock), "-B", name, str(image)],
                              stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(200):
            if sock.exists():
                break
            if server.poll() is not None:
                raise AssertionError(f"qemu-nbd failed: {server.stderr.read() if server.stderr else ''}")
            time.sleep(0.02)
        # the socket file appears at bind(), a moment before qemu-nbd listens: retry briefly
        for attempt in range(50):
            res = subprocess.run(
                [NBDINFO, "--json", f"--map=qemu:dirty-bitmap:{name}", f"nbd+unix:///?socket={sock}"],
                capture_output=True, text=True, timeout=30,
            )
            if res.returncode == 0 or attempt == 49:
                break
            time.sleep(0.05)
        assert res.returncode == 0, res.stderr
        out = res.stdout
    finally:
        server.terminate()
        server.wait(timeout=10)
    return [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1]


def _granules(ranges: list[tuple[int, int]], gran: int, size: int) -> set[int]:
    out: set[int] = set()
    for off, n in ranges:
        if n > 0:
            out.update(range(off // gran, (min(off + n, size) - 1) // gran + 1))
    return out


@pytest.mark.parametrize("cluster_size", [65536, 4096])
def test_writes_mark_exactly_their_granules(tmp_path: Path, cluster_size: int) -> None:
    img = tmp_path / "a.qcow2"
    size = 32 << 20
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", str(img), str(size))
    qemu_io(img, "write -P 5 0 2M")
    qemu_img("bitmap", "--add", "-g", "64k", str(img), "b64k")
    qemu_img("bitmap", "--add", "-g", "4k", str(img), "b4k")
    qemu_img("bitmap", "--add", "--disable", str(img), "off")
    rng = random.Random(cluster_size)
    ops: list[tuple[int, int]] = []
    with qcow2kit.open(str(img), "r+") as disk:
        for i in range(12):
            off = rng.randrange(0, size - 300_000)
            n = rng.randrange(1, 300_000)
            kind = i % 3
            if kind == 0:
                disk.write(off, bytes([i + 1]) * n)
            elif kind == 1:
                disk.write_zeroes(off, n)
            else:
                disk.discard(off, n)
            ops.append((off, n))
        # our own reading agrees before anything is stored
        ours = [(o, n) for o, n, d in disk.bitmaps.dirty_runs("b4k", 0, size) if d]
    assert _granules(ours, 4096, size) == _granules(ops, 4096, size)
    flags = {b["name"]: b["flags"] for b in _info_bitmaps(img)}
    assert flags == {"b64k": ["auto"], "b4k": ["auto"], "off": []}
    assert_clean(img)
    for name, gran in (("b64k", 65536), ("b4k", 4096)):
        assert _granules(_qemu_dirty(tmp_path, img, name), gran, size) == _granules(ops, gran, size)
    assert _qemu_dirty(tmp_path, img, "off") == []


def test_bitmap_command_results_read_by_qemu(tmp_path: Path) -> None:
    img = tmp_path / "c.qcow2"
    other = tmp_path / "o.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "8M")
    qemu_img("create", "-f", "qcow2", str(other), "8M")
    qemu_img("bitmap", "--add", "-g", "512", str(other), "src")
    qemu_io(other, "write 1M 4k", "write 6M 1k")
    assert cli_main(["bitmap", "--add", "--disable", "-g", "65536", str(img), "dst"]) == 0
    assert cli_main(["bitmap", "--merge", "src", "-b", str(other), str(img), "dst"]) == 0
    assert cli_main(["bitmap", "--add", str(img), "second"]) == 0
    assert cli_main(["bitmap", "--enable", str(img), "dst"]) == 0
    bms = {b["name"]: b for b in _info_bitmaps(img)}
    assert bms["dst"]["flags"] == ["auto"] and bms["dst"]["granularity"] == 65536
    assert bms["second"]["flags"] == ["auto"]
    assert_clean(img)
    assert _qemu_dirty(tmp_path, img, "dst") == [(1 << 20, 65536), (6 << 20, 65536)]
    assert cli_main(["bitmap", "--clear", str(img), "dst"]) == 0
    assert _qemu_dirty(tmp_path, img, "dst") == []
    assert cli_main(["bitmap", "--remove", str(img), "dst"]) == 0
    assert cli_main(["bitmap", "--remove", str(img), "second"]) == 0
    assert _info_bitmaps(img) == []
    assert_clean(img)  # the last removal drops the extension without leaking its clusters


def test_bitmaps_made_by_qemu_read_back(tmp_path: Path) -> None:
    img = tmp_path / "q.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "16M")
    qemu_img("bitmap", "--add", "-g", "128k", str(img), "x")
    qemu_io(img, "write 3M 200k", "discard 10M 1M")
    with qcow2kit.open(str(img)) as disk:
        infos = list(disk.bitmaps)
        assert [(b.name, b.granularity, b.enabled, b.in_use) for b in infos] == [
            ("x", 131072, True, False)
        ]
        dirty = [(o, n) for o, n, d in disk.bitmaps.dirty_runs("x", 0, 16 << 20) if d]
    assert dirty == _qemu_dirty(tmp_path, img, "x")


def test_in_use_bitmap_left_alone(tmp_path: Path) -> None:
    img = tmp_path / "u.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "8M")
    qemu_img("bitmap", "--add", str(img), "stale")
    qemu_img("bitmap", "--add", str(img), "good")
    # a qcow2kit session that dies without closing leaves both in use
    storage = RecordingStorage.from_file(img)
    disk = Image(storage)
    disk.write(0, b"a" * 4096)
    img.write_bytes(storage.contents())
    assert all(b["flags"] == ["in-use", "auto"] for b in _info_bitmaps(img))
    assert qemu_img("check", str(img), check=False).returncode == 0  # QEMU says nothing
    with qcow2kit.open(str(img), "r+") as disk2:
        with pytest.raises(ImageStateError, match="inconsistent"):
            disk2.bitmaps.clear("stale")
        disk2.write(1 << 20, b"b" * 512)
        disk2.bitmaps.remove("good")
    assert [b["flags"] for b in _info_bitmaps(img)] == [["in-use", "auto"]]
    assert_clean(img)


def test_hostile_directory_names_the_field(tmp_path: Path) -> None:
    img = tmp_path / "h.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "8M")
    qemu_img("bitmap", "--add", str(img), "b")
    data = bytearray(img.read_bytes())
    info = json.loads(qemu_img("info", "--output=json", str(img)).stdout)
    assert info["format-specific"]["data"]["bitmaps"]
    # find the directory through the extension: type 0x23852875, dir_offset at +16
    at = data.index(bytes.fromhex("23852875"))
    dir_off = int.from_bytes(data[at + 8 + 16 : at + 8 + 24], "big")
    data[dir_off + 17] = 40  # granularity_bits
    img.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="granularity"):
        qcow2kit.open(str(img))


def test_v2_images_cannot_hold_bitmaps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "v2.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", str(img), "8M")
    assert cli_main(["bitmap", "--add", str(img), "b"]) == 1
    assert "Cannot store dirty bitmaps in qcow2 v2 files" in capsys.readouterr().err


def test_store_is_crash_safe(tmp_path: Path) -> None:
    img = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "4M")
    qemu_io(img, "write -P 3 0 256k")
    qemu_img("bitmap", "--add", "-g", "4k", str(img), "b0")
    qemu_img("bitmap", "--add", "--disable", str(img), "b1")
    initial = img.read_bytes()
    storage = RecordingStorage.from_file(img)
    with Image(storage) as disk:
        disk.write(8192, b"q" * 8192)
    final = tmp_path / "final.qcow2"
    final.write_bytes(storage.contents())
    assert _info_bitmaps(final)[0]["flags"] == ["auto"]

    judged = []

    def verify(state: str) -> None:
        # a bitmap that claims to be valid while our write is visible must show it dirty
        path = Path(state)
        if qemu_img("compare", "-U", str(final), state, check=False).returncode != 0:
            return
        for bm in _info_bitmaps(path):
            if bm["name"] == "b0" and "in-use" not in bm["flags"]:  # type: ignore[operator]
                with qcow2kit.open(state) as d:
                    runs = [(o, n) for o, n, dirty in d.bitmaps.dirty_runs("b0", 0, 4 << 20) if dirty]
                assert runs == [(8192, 8192)], runs
                judged.append(state)

    (tmp_path / "states").mkdir()
    n = check_crash_states(initial, storage.log, tmp_path / "states", verify=verify,
                           reorder_samples=2, max_states=150)
    assert n >= 8 and judged, "no state where the stored bitmap could be judged"


@pytest.mark.parametrize("new_size", ["6M", "20M"])
def test_resize_keeps_bitmaps_as_qemu_does(tmp_path: Path, new_size: str) -> None:
    img = tmp_path / "r.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "12M")
    qemu_io(img, "write -P 1 0 12M")
    qemu_img("bitmap", "--add", "-g", "64k", str(img), "b")
    with qcow2kit.open(str(img), "r+") as disk:
        disk.write(1 << 20, b"w" * 100_000)
        disk.write(10 << 20, b"v" * 4096)  # past a shrink: dropped
        disk.resize({"6M": 6 << 20, "20M": 20 << 20}[new_size], shrink=True)
        if new_size == "20M":
            disk.write(19 << 20, b"g" * 512)  # the grown range is clean until written
    size = {"6M": 6 << 20, "20M": 20 << 20}[new_size]
    assert json.loads(qemu_img("info", "--output=json", str(img)).stdout)["virtual-size"] == size
    assert_clean(img)
    expected = [(1 << 20, 2 * 65536)]
    if new_size == "20M":
        expected += [(10 << 20, 65536), (19 << 20, 65536)]
    assert _qemu_dirty(tmp_path, img, "b") == expected


def test_compact_with_bitmaps(tmp_path: Path) -> None:
    img = tmp_path / "k.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "8M")
    qemu_io(img, "write -P 1 0 8M")
    qemu_img("bitmap", "--add", str(img), "b")
    qemu_io(img, "write -P 2 4M 8k")  # recorded by QEMU
    qemu_io(img, "discard 0 4M")  # recorded too
    before = img.stat().st_size
    with qcow2kit.open(str(img), "r+") as disk:
        disk.write(7 << 20, b"z" * 512)
        disk.compact()
    assert img.stat().st_size < before
    assert_clean(img)
    # granularity: the 4 KiB cluster size
    assert _qemu_dirty(tmp_path, img, "b") == [(0, (4 << 20) + 8192), (7 << 20, 4096)]


@pytest.mark.parametrize("operation", ["shrink", "compact"])
def test_shrink_and_compact_with_bitmaps_are_crash_safe(tmp_path: Path, operation: str) -> None:
    img = tmp_path / "x.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "4M")
    qemu_io(img, "write -P 1 0 4M", "discard 512k 1M")
    qemu_img("bitmap", "--add", str(img), "b")
    qemu_io(img, "write -P 2 64k 4k")
    expect = tmp_path / "expect.raw"
    initial = img.read_bytes()
    storage = RecordingStorage.from_file(img)
    with Image(storage) as disk:
        if operation == "shrink":
            disk.resize(3 << 20, shrink=True)
        else:
            disk.compact()
    final = tmp_path / "final.qcow2"
    final.write_bytes(storage.contents())
    assert_clean(final)
    qemu_img("convert", "-O", "raw", str(final), str(expect))
    assert _qemu_dirty(tmp_path, final, "b") == [(64 << 10, 4096)]

    def verify(state: str) -> None:
        # the data reads as before (or shrunk); a bitmap that claims to be valid is the
        # stored one with exactly the recorded granule
        out = Path(state).with_suffix(".raw")
        qemu_img("convert", "-U", "-O", "raw", state, str(out))
        data = out.read_bytes()
        assert data[: 3 << 20] == expect.read_bytes()[: 3 << 20]
        for bm in _info_bitmaps(Path(state)):
            if "in-use" not in bm["flags"]:  # type: ignore[operator]
                with qcow2kit.open(state) as d:
                    runs = [(o, n) for o, n, dirty in d.bitmaps.dirty_runs("b", 0, d.virtual_size)
                            if dirty]
                assert runs == [(64 << 10, 4096)], runs

    (tmp_path / "states").mkdir()
    n = check_crash_states(initial, storage.log, tmp_path / "states", verify=verify,
                           reorder_samples=2, max_states=120)
    assert n >= 8


@pytest.mark.parametrize("op", ["first add", "last remove"])
def test_adding_the_first_and_removing_the_last_bitmap_are_crash_safe(tmp_path: Path, op: str) -> None:
    """These rewrite the header (the extension appears or goes), with autoclear bit 0 set
    only by a separate write once the new header is durable."""
    img = tmp_path / "e.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "4M")
    qemu_io(img, "write -P 6 0 128k")
    if op == "last remove":
        qemu_img("bitmap", "--add", str(img), "b")
    initial = img.read_bytes()
    storage = RecordingStorage.from_file(img)
    with Image(storage) as disk:
        if op == "first add":
            disk.bitmaps.add("b")
            disk.write(8192, b"n" * 4096)
        else:
            disk.bitmaps.remove("b")
    final = tmp_path / "final.qcow2"
    final.write_bytes(storage.contents())
    assert_clean(final)
    assert len(_info_bitmaps(final)) == (1 if op == "first add" else 0)

    def verify(state: str) -> None:
        # a bitmap a reader trusts is the stored new one (recording exactly our write), or,
        # for the removal, the old one (which recorded nothing)
        for bm in _info_bitmaps(Path(state)):
            if "in-use" in bm["flags"]:  # type: ignore[operator]
                continue
            with qcow2kit.open(state) as d:
                runs = [(o, n) for o, n, dirty in d.bitmaps.dirty_runs("b", 0, d.virtual_size) if dirty]
            assert runs == ([(8192, 4096)] if op == "first add" else []), runs

    (tmp_path / "states").mkdir()
    n = check_crash_states(initial, storage.log, tmp_path / "states", verify=verify,
                           reorder_samples=2, max_states=120)
    assert n >= 4
