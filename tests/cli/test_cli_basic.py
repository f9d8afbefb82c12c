"""The info / map / convert / compare verbs from the command line: output, exit codes, and
errors as `qcow2kit: message` without a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qcow2kit.cli.main import main
from tests.conftest import assert_clean, qemu_compare, qemu_img, qemu_io


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qcow2kit", *args], capture_output=True, text=True)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "cli.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "8M")
    qemu_io(p, "write -P 1 0 100k", "write -z 1M 64k", "write -P 2 5M 64k")
    return p


def test_info_json_and_human(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--output=json", str(image)]) == 0
    assert capsys.readouterr().out == qemu_img("info", "--output=json", str(image)).stdout
    assert main(["info", str(image)]) == 0
    assert capsys.readouterr().out == qemu_img("info", str(image)).stdout


def test_info_backing_chain_and_force_share(tmp_path: Path, image: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", image.name, "-F", "qcow2", str(top))
    assert main(["info", "--backing-chain", "-U", "--output=json", str(top)]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(
        qemu_img("info", "--backing-chain", "--output=json", str(top)).stdout)


def test_map_json_and_human(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["map", "--output=json", str(image)]) == 0
    assert capsys.readouterr().out == qemu_img("map", "--output=json", str(image)).stdout
    assert main(["map", str(image)]) == 0
    assert capsys.readouterr().out == qemu_img("map", str(image)).stdout


def test_map_human_compressed_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "c.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "1M")
    qemu_io(p, "write -c 0 64k")
    res = run_cli("map", str(p))
    assert res.returncode == 1
    assert res.stderr == "qcow2kit: File contains external, encrypted or compressed clusters.\n"


def test_convert_verbs(tmp_path: Path, image: Path) -> None:
    raw = tmp_path / "o.raw"
    assert main(["convert", "-O", "raw", str(image), str(raw)]) == 0
    qemu_compare(image, raw)
    q = tmp_path / "o.qcow2"
    assert main(["convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=8",
                 str(raw), str(q)]) == 0
    assert_clean(q)
    qemu_compare(q, raw)
    c = tmp_path / "o.c.qcow2"
    assert main(["convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", str(image),
                 str(c)]) == 0
    assert_clean(c)
    qemu_compare(c, raw)


def test_convert_progress(tmp_path: Path, image: Path) -> None:
    res = run_cli("convert", "-p", "-O", "qcow2", str(image), str(tmp_path / "p.qcow2"))
    assert res.returncode == 0, res.stderr
    assert "100%" in res.stderr
    assert_clean(tmp_path / "p.qcow2")


def test_convert_with_backing(tmp_path: Path, image: Path) -> None:
    out = tmp_path / "b.qcow2"
    raw = tmp_path / "b.raw"
    qemu_img("convert", "-O", "raw", str(image), str(raw))
    with open(raw, "r+b") as f:
        f.seek(3 << 20)
        f.write(b"changed")
    assert main(["convert", "-O", "qcow2", "-B", str(image), "-F", "qcow2", str(raw), str(out)]) == 0
    assert_clean(out)
    qemu_compare(out, raw)
    info = json.loads(qemu_img("info", "--output=json", str(out)).stdout)
    assert info["backing-filename"] == str(image)


def test_compare_exit_codes(tmp_path: Path, image: Path) -> None:
    other = tmp_path / "other.qcow2"
    qemu_img("convert", "-O", "qcow2", str(image), str(other))
    res = run_cli("compare", str(image), str(other))
    assert (res.returncode, res.stdout) == (0, "Images are identical.\n")
    qemu_io(other, "write -P 9 4000 1")
    res = run_cli("compare", "-f", "qcow2", "-F", "qcow2", str(image), str(other))
    assert (res.returncode, res.stdout) == (1, "Content mismatch at offset 3584!\n")
    res = run_cli("compare", str(image), str(tmp_path / "missing.qcow2"))
    assert res.returncode == 2
    assert res.stderr.startswith("qcow2kit: ") and "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["info", "MISSING"],
        ["map", "MISSING"],
        ["convert", "MISSING", "OUT"],
        ["info", "-f", "qcow2", "RAWFILE"],
        ["map", "-f", "qcow2", "RAWFILE"],
        ["convert", "-O", "raw", "-c", "RAWFILE", "OUT"],
        ["convert", "-O", "qcow2", "-o", "cluster_size=1000", "RAWFILE", "OUT"],
        ["convert", "-O", "qcow2", "-o", "bogus=1", "RAWFILE", "OUT"],
    ],
)
def test_errors_are_one_line(tmp_path: Path, argv: list[str],
                             capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "plain.raw"
    raw.write_bytes(b"\1" * 65536)
    subst = {"MISSING": str(tmp_path / "nope.qcow2"), "OUT": str(tmp_path / "out.img"),
             "RAWFILE": str(raw)}
    rc = main([subst.get(a, a) for a in argv])  # an uncaught exception fails the test
    err = capsys.readouterr().err
    assert rc != 0
    assert err.startswith("qcow2kit: "), err
    assert len(err.strip().splitlines()) <= 2


def test_error_in_a_real_process_has_no_traceback(tmp_path: Path) -> None:
    res = run_cli("info", str(tmp_path / "nope.qcow2"))
    assert res.returncode == 1
    assert res.stderr.startswith("qcow2kit: ") and "Traceback" not in res.stderr


def test_info_locked_image_needs_force_share(tmp_path: Path, image: Path) -> None:
    proc = subprocess.Popen(["qemu-io", "-f", "qcow2", str(image)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("read 0 512\n")
        proc.stdin.flush()
        proc.stdout.readline()  # wait until qemu-io holds the image
        res = run_cli("info", str(image))
        assert res.returncode != 0 and "lock" in res.stderr
        res = run_cli("info", "-U", str(image))
        assert res.returncode == 0, res.stderr
    finally:
        proc.kill()
        proc.wait()


def test_convert_sparse_size(tmp_path: Path, image: Path) -> None:
    full = tmp_path / "full.raw"
    assert main(["convert", "-S", "0", str(image), str(full)]) == 0
    assert full.stat().st_blocks * 512 >= 8 << 20  # every byte written, no holes
    qemu_compare(image, full)
    sparse = tmp_path / "sparse.raw"
    assert main(["convert", "-S", "64k", str(image), str(sparse)]) == 0
    assert sparse.stat().st_blocks * 512 < 1 << 20
    qemu_compare(image, sparse)
    q = tmp_path / "full.qcow2"
    assert main(["convert", "-S", "0", "-O", "qcow2", str(image), str(q)]) == 0
    assert_clean(q)
    qemu_compare(q, image, "qcow2", "qcow2")
    res = run_cli("convert", "-S", "1000", str(image), str(tmp_path / "bad.raw"))
    assert res.returncode == 1 and "multiples of 512" in res.stderr


def test_convert_refuses_a_target_in_use(tmp_path: Path, image: Path) -> None:
    target = tmp_path / "busy.qcow2"
    qemu_img("convert", "-O", "qcow2", str(image), str(target))
    before = target.read_bytes()
    proc = subprocess.Popen(["qemu-io", "-f", "qcow2", str(target)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("read 0 512\n")
        proc.stdin.flush()
        proc.stdout.readline()
        for fmt in ("raw", "qcow2"):
            rc = main(["convert", "-O", fmt, str(image), str(target)])
            assert rc == 1
        assert target.read_bytes() == before
    finally:
        proc.kill()
        proc.wait()
