"""Power cut after every write of a compaction (every prefix) and sampled reorderings inside
flush epochs: qemu-img check finds no corruption and the guest data is unchanged."""

from __future__ import annotations

from pathlib import Path

from qcow2kit.image import Image
from qcow2kit.testing.faults import RecordingStorage, check_crash_states
from tests.helpers import qemu_img, qemu_io


def _run(tmp_path: Path, img: Path, snapshot: str | None = None) -> int:
    raw = tmp_path / "before.raw"
    qemu_img("convert", "-O", "raw", str(img), str(raw))
    expect = raw.read_bytes()
    snap_expect = b""
    if snapshot:
        sraw = tmp_path / "snap.raw"
        qemu_img("convert", "-l", f"snapshot.name={snapshot}", "-O", "raw", str(img), str(sraw))
        snap_expect = sraw.read_bytes()
    initial = img.read_bytes()
    storage = RecordingStorage.from_file(img)
    with Image(storage) as image:
        result = image.compact()
    assert result.moved_clusters > 0

    def verify(state: str) -> None:
        out = tmp_path / "state.raw"
        qemu_img("convert", "-O", "raw", state, str(out))
        assert out.read_bytes() == expect, "guest data changed"
        if snapshot:
            qemu_img("convert", "-l", f"snapshot.name={snapshot}", "-O", "raw", state, str(out))
            assert out.read_bytes() == snap_expect, "snapshot data changed"

    (tmp_path / "states").mkdir()
    n = check_crash_states(initial, storage.log, tmp_path / "states", verify=verify,
                           reorder_samples=2, max_states=150)
    assert n >= 6
    return n


def test_crash_compact_data_l2_and_tables(tmp_path: Path) -> None:
    img = tmp_path / "f.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "8M")
    qemu_io(img, "write -P 1 7M 1M", "write -P 2 0 512K", "write -P 3 3M 256K",
            "discard 7M 768K")
    qemu_img("resize", "--shrink", str(img), "7680K")
    _run(tmp_path, img)


def test_crash_compact_shared_and_compressed(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(b"".join(bytes([i % 5]) * 2048 + bytes(range(256)) * 8 for i in range(512)))
    img = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", str(src), str(img))
    qemu_img("resize", str(img), "4M")
    qemu_io(img, "write -P 8 3M 512K", "discard 256K 1M")
    qemu_img("snapshot", "-c", "s", str(img))  # everything is shared with the snapshot now
    qemu_io(img, "write -P 9 3200K 8K")
    _run(tmp_path, img, snapshot="s")
