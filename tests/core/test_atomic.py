"""featurepipe.core.atomic: the one way the package writes files."""

import re

import pytest

from featurepipe.core import atomic
from tests.conftest import REPO


def test_copy_file_is_whole_and_leaves_no_temporary(tmp_path):
    source = tmp_path / "a.bin"
    source.write_bytes(b"x" * 10_000)
    atomic.copy_file(source, tmp_path / "b.bin")
    assert (tmp_path / "b.bin").read_bytes() == source.read_bytes()
    assert not list(tmp_path.glob(f"{atomic.TMP_PREFIX}*"))


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "t.json"
    atomic.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == '{\n  "v": 1\n}'
    assert not list(tmp_path.glob(f"{atomic.TMP_PREFIX}*"))


def test_replace_dir_swaps_a_finished_folder_in(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    staging = atomic.temp_sibling(final)
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    atomic.replace_dir(staging, final)
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert not staging.exists()


def test_a_named_temporary_file_is_used_and_removed_on_failure(tmp_path):
    named = tmp_path / ".dest.123.tmp"
    with pytest.raises(ValueError):
        with atomic.atomic_path(tmp_path / "dest", tmp=named) as tmp:
            assert tmp == named
            tmp.write_bytes(b"part")
            raise ValueError
    assert not named.exists() and not (tmp_path / "dest").exists()


def test_no_module_renames_files_into_place_by_itself():
    """Every temp-then-rename write goes through atomic.py; the store's shard publishing (hard link or
    checked rename, then its own fsync of the folder) is the one deliberate exception."""
    offenders = []
    for path in sorted((REPO / "featurepipe").rglob("*.py")):
        if path.relative_to(REPO).as_posix() in ("featurepipe/core/atomic.py", "featurepipe/store/shards.py"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"os\.replace\(|\.replace\(tmp|os\.rename\(|\.rename\(", line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []
