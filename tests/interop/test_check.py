"""check against qemu-img check on damaged images.

Every case starts from an image that qemu-img / qemu-io made, then pokes bytes into it (a
zeroed refcount, a doubled reference, an L2 entry pointing at the header, ...). On the
same file, `qcow2kit check --output=json` must print the same JSON as
`qemu-img check --output=json`, exit with the same code, and print the same per-cluster
diagnostics on stderr; the human output too, for a few cases. The API's check counts the
leaks of a case; a huge sparse image is checked fast; a byte copy gets the same verdict.

The cases are in check_cases.py (the poking helpers and base images in check_poke.py), the
runs of both tools in check_runs.py. test_repair.py and tests/cli/test_cli_check.py use the
same cases and runs.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import qemu_img, qemu_io
from tests.interop.check_cases import CASES, make_case
from tests.interop.check_runs import run_ours, run_ours_process, run_qemu


# ---- tests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_check_json_matches_qemu(tmp_path: Path, name: str) -> None:
    path = make_case(tmp_path, name)
    before = path.read_bytes()
    theirs = run_qemu(path, "--output=json")
    ours = run_ours(path, "--output=json")
    assert path.read_bytes() == before, "a plain check must not write"
    assert ours.rc == theirs.rc, (ours, theirs)
    assert ours.json == theirs.json
    assert ours.stderr == theirs.stderr


@pytest.mark.parametrize(
    "name", ["clean", "zero_refcount_data", "leak_appended", "compressed_clean", "l2_unaligned",
             "refblock_unaligned"]
)
def test_check_human_matches_qemu(tmp_path: Path, name: str) -> None:
    path = make_case(tmp_path, name)
    theirs = run_qemu(path)
    ours = run_ours(path)
    assert ours.rc == theirs.rc
    assert ours.stdout == theirs.stdout
    assert ours.stderr == theirs.stderr


def test_api_check_counts(tmp_path: Path) -> None:
    import qcow2kit

    path = make_case(tmp_path, "leak_appended")
    with qcow2kit.open(str(path)) as img:
        res = img.check()
    assert res.leaks == 2 and res.corruptions == 0 and res.exit_code == 3
    assert res.total_clusters == 1024
    assert res.messages[0].startswith("Leaked cluster")


def test_sparse_huge_image_is_fast(tmp_path: Path) -> None:
    path = tmp_path / "huge.qcow2"
    qemu_img("create", "-f", "qcow2", str(path), "4T")
    qemu_io(path, "write -P 1 0 64k", "write -P 2 3T 64k")
    start = time.perf_counter()
    ours = run_ours_process(path, "--output=json")
    elapsed = time.perf_counter() - start
    assert ours.json == run_qemu(path, "--output=json").json
    assert elapsed < 10


def test_copy_is_judged_like_qemu_judges_it(tmp_path: Path) -> None:
    """A byte copy under another name (checked right after the original) gets qemu-img's
    verdict, file name included: nothing in our check depends on the path or on an earlier
    check."""
    a = make_case(tmp_path, "doubled_reference")
    b = tmp_path / "copy.qcow2"
    shutil.copy(a, b)
    for path in (a, b):
        theirs = run_qemu(path, "--output=json")
        assert theirs.json.get("corruptions", 0) > 0  # the case is broken, for QEMU too
        assert run_ours(path, "--output=json").json == theirs.json
