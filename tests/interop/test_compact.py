"""compact against QEMU as the oracle: after compaction the file is at most (clusters in use
+ 1) x cluster size, qemu-img check is clean with no leaks, qemu-img compare equals the image
before, and snapshots still read their own data."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

import qcow2kit
from tests.helpers import assert_clean, qemu_compare, qemu_img, qemu_io, used_clusters

M = 1 << 20


def _compact_and_verify(tmp_path: Path, img: Path, *, snapshots: tuple[str, ...] = (),
                        discard_zeroes: bool = False) -> None:
    before = tmp_path / "before.raw"
    qemu_img("convert", "-O", "raw", str(img), str(before))
    snap_raws = []
    for name in snapshots:
        out = tmp_path / f"snap-{name}.raw"
        qemu_img("convert", "-l", f"snapshot.name={name}", "-O", "raw", str(img), str(out))
        snap_raws.append((name, out))
    old_size = img.stat().st_size
    with qcow2kit.open(str(img), "r+") as image:
        cs = image.cluster_size
        result = image.compact(discard_zeroes=discard_zeroes)
    assert result.new_file_bytes == img.stat().st_size <= old_size
    assert_clean(img)
    qemu_compare(img, before)
    in_use = used_clusters(img)
    assert img.stat().st_size <= (in_use + 1) * cs, (img.stat().st_size, in_use, cs)
    for name, raw in snap_raws:
        out = tmp_path / f"after-{name}.raw"
        qemu_img("convert", "-l", f"snapshot.name={name}", "-O", "raw", str(img), str(out))
        assert out.read_bytes() == raw.read_bytes(), f"snapshot {name} changed"


def test_issue_example_tail_written_first(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "1G")
    qemu_io(img, "write -P 0xbb 1023M 1M", "write -P 0xaa 0 1M")
    qemu_img("resize", "--shrink", str(img), "512M")
    assert img.stat().st_size == 2490368  # QEMU keeps the high-water mark
    _compact_and_verify(tmp_path, img)
    assert img.stat().st_size == 1376256


@pytest.mark.parametrize("cluster_size", [4096, 65536])
def test_reverse_and_random_writes_with_discards(tmp_path: Path, cluster_size: int) -> None:
    img = tmp_path / "f.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", str(img), "64M")
    rnd = random.Random(cluster_size)
    cmds = [f"write -P {i % 250 + 1} {off}K 256K" for i, off in
            enumerate(range(63 * 1024, -1, -1024))]
    qemu_io(img, *cmds)
    offs = list(range(0, 64 * 1024, 512))
    rnd.shuffle(offs)
    qemu_io(img, *[f"discard {o}K 256K" for o in offs[:40]])
    qemu_io(img, *[f"write -P 7 {o}K 64K" for o in offs[40:60]])
    _compact_and_verify(tmp_path, img)


def test_with_snapshots_taken_in_between(tmp_path: Path) -> None:
    img = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=16384", str(img), "32M")
    qemu_io(img, "write -P 1 16M 8M", "write -P 2 0 4M")
    qemu_img("snapshot", "-c", "one", str(img))
    qemu_io(img, "write -P 3 1M 2M", "discard 16M 8M", "write -P 4 30M 1M")
    qemu_img("snapshot", "-c", "two", str(img))
    qemu_io(img, "write -P 5 0 1M", "discard 30M 1M")
    qemu_img("snapshot", "-d", "one", str(img))
    _compact_and_verify(tmp_path, img, snapshots=("two",))


def test_compressed_clusters(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    rnd = random.Random(5)
    src.write_bytes(b"".join(bytes([rnd.randrange(3)]) * 4096 + os.urandom(512) * 0
                             for _ in range(4096)))
    img = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", str(src), str(img))
    qemu_io(img, "discard 0 4M", "write -P 9 12M 64K")
    _compact_and_verify(tmp_path, img)


def test_extended_l2_and_shrink(tmp_path: Path) -> None:
    img = tmp_path / "x.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=65536", str(img), "64M")
    qemu_io(img, "write -P 1 60M 4M", "write -P 2 0 100K", "write -P 3 8M 3K")
    qemu_img("resize", "--shrink", str(img), "32M")
    _compact_and_verify(tmp_path, img)


def test_discard_zeroes(tmp_path: Path) -> None:
    img = tmp_path / "z.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "16M")
    qemu_io(img, "write -P 0 0 8M", "write -P 1 8M 64K", "write -P 0 12M 1M")
    _compact_and_verify(tmp_path, img, discard_zeroes=True)
    assert img.stat().st_size <= 7 * 65536


def test_cli_compact_and_resize_compact(tmp_path: Path) -> None:
    img = tmp_path / "c.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "1G")
    qemu_io(img, "write -P 0xbb 1023M 1M", "write -P 0xaa 0 1M")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    res = subprocess.run(["python3", "-m", "qcow2kit", "resize", "--shrink", "--compact",
                          str(img), "512M"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert img.stat().st_size == 1376256
    assert_clean(img)
    res = subprocess.run(["python3", "-m", "qcow2kit", "compact", str(img)],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "Image compacted" in res.stdout


def test_snapshot_l1_and_table_move_down(tmp_path: Path) -> None:
    from qcow2kit.image import Image
    from qcow2kit.testing.faults import RecordingStorage, check_crash_states

    img = tmp_path / "snap.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "4M")
    qemu_io(img, "write -P 1 0 2M")
    qemu_img("snapshot", "-c", "late", str(img))  # its L1 and the table land at the end
    qemu_io(img, "discard 0 2M")  # the active disk lets go of the data...
    qemu_img("snapshot", "-c", "empty", str(img))
    qemu_img("snapshot", "-d", "late", str(img))  # ...and its snapshot goes: holes below
    qemu_io(img, "write -P 2 1M 8K")
    qemu_img("snapshot", "-c", "last", str(img))
    before = tmp_path / "b.raw"
    qemu_img("convert", "-l", "snapshot.name=last", "-O", "raw", str(img), str(before))
    initial = img.read_bytes()
    storage = RecordingStorage.from_file(img)
    with Image(storage) as image:
        image.compact()
    events = {op[1] for op in storage.log if op[0] == "event"}
    assert "snapshot_l1_move" in events, events
    img.write_bytes(storage.contents())
    assert_clean(img)
    after = tmp_path / "a.raw"
    qemu_img("convert", "-l", "snapshot.name=last", "-O", "raw", str(img), str(after))
    assert after.read_bytes() == before.read_bytes()

    def verify(state: str) -> None:
        qemu_img("convert", "-l", "snapshot.name=last", "-O", "raw", state, str(after))
        assert after.read_bytes() == before.read_bytes()

    (tmp_path / "states").mkdir()
    assert check_crash_states(initial, storage.log, tmp_path / "states", verify=verify,
                              reorder_samples=1, max_states=60) > 5


def test_refcount_block_at_the_end_moves_down(tmp_path: Path) -> None:
    import struct

    img = tmp_path / "rb.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "16M")
    qemu_io(img, "write -P 3 0 1M")
    data = bytearray(img.read_bytes())
    cs = 65536
    data += bytes(-len(data) % cs)
    rt_off = struct.unpack_from(">Q", data, 48)[0]
    rb_off = struct.unpack_from(">Q", data, rt_off)[0]
    new = len(data)
    block = bytearray(data[rb_off : rb_off + cs])
    struct.pack_into(">H", block, 2 * (rb_off // cs), 0)  # the old place is free...
    struct.pack_into(">H", block, 2 * (new // cs), 1)  # ...the block now counts itself here
    data += block
    struct.pack_into(">Q", data, rt_off, new)
    data[rb_off : rb_off + cs] = bytes(cs)
    img.write_bytes(bytes(data))
    assert_clean(img)  # a valid image with its only refcount block at the very end
    from qcow2kit.image import Image
    from qcow2kit.testing.faults import RecordingStorage, check_crash_states

    storage = RecordingStorage.from_file(img)
    with Image(storage) as image:
        image.compact()
    assert any(op[:2] == ("event", "refblock_move") for op in storage.log)
    expect = tmp_path / "expect.raw"
    qemu_img("convert", "-O", "raw", str(img), str(expect))

    def verify(state: str) -> None:
        out = tmp_path / "state.raw"
        qemu_img("convert", "-O", "raw", state, str(out))
        assert out.read_bytes() == expect.read_bytes()

    (tmp_path / "states").mkdir()
    assert check_crash_states(bytes(data), storage.log, tmp_path / "states", verify=verify,
                              reorder_samples=2, max_states=60) > 3
    _compact_and_verify(tmp_path, img)
    assert struct.unpack_from(">Q", img.read_bytes(), rt_off)[0] < new
