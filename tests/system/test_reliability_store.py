"""The store, the caches and the disks under attack (issue 24, "Reliability, round three"): fuzzed shard
bytes (inside the keys too), a full disk at every sqlite write, a read-only cache root, `cache gc
--dry-run`, and cache options that name the wrong kind of file. Each command must answer with one
message naming the file and the fix, never a traceback, and never lose what was committed."""

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from featurepipe.backbones.spec import BackboneSpec
from featurepipe.data.dataset import scan
from featurepipe.extraction.extract import extract, open_stores
from tests.conftest import COLOURS, REPO, make_image

TINY = BackboneSpec(name="tiny", weights="random", image_size=32)
TINY_ARGS = ["--backbone", "tiny", "--weights", "random", "--image-size", "32"]
CHILD_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
CLI = "import tests.tiny_backbone; from featurepipe.cli import main; main()"


def _cli(*args, child: str = CLI, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", child, *map(str, args)], env={**CHILD_ENV, **(env or {})}, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _said(done: subprocess.CompletedProcess) -> str:
    return done.stdout + done.stderr


def _no_traceback(done: subprocess.CompletedProcess) -> None:
    said = _said(done)
    assert "Traceback" not in said and "Error:" not in said.replace("error:", ""), said[-3000:]


def _photos(root: Path, n: int = 4, seed: int = 0) -> Path:
    for c, name in enumerate(("red", "blue")):
        for i in range(n):
            make_image(root / name / f"{name}{i}.png", COLOURS[name], seed=seed + 100 * c + i)
    return root


def _one_shard_store(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(data, cache, its one shard): 8 photos extracted as one batch."""
    data, cache = _photos(tmp_path / "data"), tmp_path / "cache"
    extract(scan(data, cache_dir=cache), TINY, cache)
    shards = sorted((cache / "features").glob("*/shards/*.h5"))
    assert len(shards) == 1
    return data, cache, shards[0]


# ---- item 6: damaged bytes in a shard, its keys included ---------------------------------------------------


def _shard_content(path: Path):
    """What a shard holds, read with plain h5py (keys decoded), or None when it cannot be read."""
    try:
        with h5py.File(path, "r") as handle:
            return (handle["keys"].asstr()[()].tolist(), handle["features"][()].tobytes(),
                    handle.attrs.get("sha256"))
    except Exception:
        return None


def _key_offsets(shard: Path) -> list[int]:
    """Byte offsets inside the stored keys (content hashes are ASCII hex, stored as is)."""
    raw = shard.read_bytes()
    with h5py.File(shard, "r") as handle:
        keys = handle["keys"].asstr()[()].tolist()
    offsets = []
    for key in keys[:4]:
        at = raw.find(key.encode())
        assert at >= 0
        offsets += [at, at + 21, at + len(key) - 1]
    return offsets


@pytest.mark.slow
def test_fuzzed_shard_bytes_are_named_by_verify_and_dropped_by_repair(tmp_path):
    """One byte flipped at ~60 offsets of a real shard (12 inside its keys), each damaged copy committed
    beside the good one. The old code crashed `cache ls` / `verify` / `verify --repair` with a
    UnicodeDecodeError traceback for flips inside the keys."""
    _, cache, shard = _one_shard_store(tmp_path)
    clean = shard.read_bytes()
    expected = _shard_content(shard)
    offsets = sorted(set(range(0, len(clean), max(1, len(clean) // 48))) | set(_key_offsets(shard)))
    damaged = []
    for offset in offsets:
        copy = shard.parent / f"fuzz-{offset:06d}.h5"
        flipped = bytearray(clean)
        flipped[offset] ^= 0xFF
        copy.write_bytes(bytes(flipped))
        if _shard_content(copy) != expected:
            damaged.append(copy)
    key_copies = [shard.parent / f"fuzz-{offset:06d}.h5" for offset in _key_offsets(shard)]
    assert set(key_copies) <= set(damaged) and len(damaged) >= 12

    listed = _cli("cache", "ls", "--cache-dir", cache)
    _no_traceback(listed)
    assert listed.returncode == 1 and "cache verify --repair" in listed.stderr
    assert any(str(path) in listed.stderr.replace("\n", "") for path in damaged), listed.stderr

    checked = _cli("cache", "verify", "--cache-dir", cache)
    _no_traceback(checked)
    assert checked.returncode == 1
    said = _said(checked).replace("\n", "")
    unnamed = [path.name for path in damaged if str(path) not in said]
    assert not unnamed, f"verify did not name {unnamed}"
    assert str(shard) not in said, "the intact shard was called damaged"

    repaired = _cli("cache", "verify", "--repair", "--cache-dir", cache)
    _no_traceback(repaired)
    assert repaired.returncode == 0, _said(repaired)[-2000:]
    # (The intact shard and the harmless copies may have been merged by then: over 32 shards, a writer compacts.)
    assert not any(path.exists() for path in damaged)
    again = _cli("cache", "verify", "--cache-dir", cache)
    assert again.returncode == 0 and "ok" in again.stdout, _said(again)
    assert _cli("cache", "ls", "--cache-dir", cache).returncode == 0
    store = open_stores(TINY, cache).originals
    np.testing.assert_array_equal(store.read(expected[0]), np.frombuffer(expected[1], np.float32).reshape(8, -1))


def test_damaged_keys_are_named_by_extract_and_run_with_the_fix(tmp_path):
    """A byte flipped inside a key: the old code's `extract` kept the shard and said nothing, and `run`
    printed a bare codec message. Both now name the shard and `cache verify --repair`, and after the
    repair `extract` re-extracts that shard's images."""
    data, cache, shard = _one_shard_store(tmp_path)
    flipped = bytearray(shard.read_bytes())
    flipped[_key_offsets(shard)[1]] ^= 0xFF
    shard.write_bytes(bytes(flipped))

    for args in (["extract", data, *TINY_ARGS], ["run", data, *TINY_ARGS, "--quick", "--run-dir", tmp_path / "run"]):
        done = _cli(*args, "--cache-dir", cache)
        _no_traceback(done)
        message = done.stderr.replace("\n", "")
        assert done.returncode == 1 and str(shard) in message and "cache verify --repair" in message, _said(done)
    assert shard.exists()

    assert _cli("cache", "verify", "--repair", "--cache-dir", cache).returncode == 0
    assert not shard.exists()
    done = _cli("extract", data, *TINY_ARGS, "--cache-dir", cache, "--json")
    assert done.returncode == 0 and '"extracted": 8' in done.stdout, _said(done)



# ---- item 7: a full disk at every sqlite write, a read-only cache root ---------------------------------------

# The CLI with sqlite's writes failing as on a full disk: every connection is wrapped so that the
# statements whose verbs are in $FULL_AT raise what sqlite raises then ("database or disk is full").
FULL_SQLITE = """
import os, sqlite3
verbs = set(os.environ["FULL_AT"].split(","))
real = sqlite3.connect

def full(sql):
    if sql.split()[0].upper() in verbs:
        raise sqlite3.OperationalError("database or disk is full")

class Full:
    def __init__(self, db): self._db = db
    def __getattr__(self, name): return getattr(self._db, name)
    def __enter__(self): self._db.__enter__(); return self
    def __exit__(self, *exc): return self._db.__exit__(*exc)
    def execute(self, sql, *args): full(sql); return self._db.execute(sql, *args)
    def executemany(self, sql, *args): full(sql); return self._db.executemany(sql, *args)

sqlite3.connect = lambda *args, **kwargs: Full(real(*args, **kwargs))
""" + CLI

# The CLI with the cache root read-only, as a read-only mount makes it (root ignores chmod, so the
# tests cannot rely on it): an audit hook refuses every write, rename, link and removal under it with
# EROFS, and h5py (whose C library opens files itself) may only read there.
READ_ONLY = """
import errno, os, sys
root = os.path.realpath(os.environ["READ_ONLY"])

def inside(path):
    try:
        return os.path.realpath(os.fsdecode(path)).startswith(root)
    except TypeError:
        return False

def refuse(path):
    raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))

WRITES = {"os.remove", "os.rename", "os.link", "os.mkdir", "os.rmdir", "os.utime", "os.chmod", "os.symlink", "os.truncate"}

def hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)) and inside(args[0]):
        mode, flags = args[1], args[2]
        if (mode and any(c in mode for c in "wax+")) or (mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
            refuse(args[0])
    elif event in WRITES and args and isinstance(args[0], (str, bytes, os.PathLike)) and inside(args[0]):
        if not (event == "os.mkdir" and os.path.isdir(os.fsdecode(args[0]))):
            refuse(args[0])

sys.addaudithook(hook)
import h5py
real = h5py.File
def read_only_file(name, mode="r", *args, **kwargs):
    if mode != "r" and inside(name):
        refuse(name)
    return real(name, mode, *args, **kwargs)
h5py.File = read_only_file
""" + CLI


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("full_at", ["CREATE,DROP", "INSERT"])
def test_a_full_disk_at_every_sqlite_write_is_one_line_and_keeps_the_features(tmp_path, full_at):
    """Creating the tables (a new cache) or adding rows: the old code's scan died with a sqlite traceback
    when the hash cache's table could not be created, and dedup's perceptual hashes whenever theirs
    could not be written. The content-hash cache only warns (hashes are still right, just not
    remembered); the perceptual one stops with the one line, and the features committed stay."""
    data, cache = _photos(tmp_path / "data"), tmp_path / "cache"
    scanned = _cli("extract", data, *TINY_ARGS, "--cache-dir", cache, child=FULL_SQLITE, env={"FULL_AT": full_at})
    _no_traceback(scanned)
    assert scanned.returncode == 0, _said(scanned)[-3000:]
    done = _cli("run", data, *TINY_ARGS, "--quick", "--run-dir", tmp_path / "run", "--cache-dir", cache,
                child=FULL_SQLITE, env={"FULL_AT": full_at})
    _no_traceback(done)
    said = done.stderr.replace("\n", "")
    assert done.returncode == 1, _said(done)[-3000:]   # a full disk: a runtime failure
    assert f"no space left on the disk holding {cache / 'hashes.sqlite'}" in said and "intact" in said, said
    store = open_stores(TINY, cache).originals
    assert len(store.keys()) == 8 and store.verify() == []


def test_a_read_only_cache_root_is_one_line_for_gc_and_extract_and_changes_nothing(tmp_path):
    """Extracting new images into, and `cache gc` of, a read-only cache root: tracebacks before."""
    data, cache, _ = _one_shard_store(tmp_path)
    scan(_photos(tmp_path / "more", seed=7), cache_dir=cache)    # hashes of the new photos, remembered
    before = _snapshot(cache)
    for args in (["extract", tmp_path / "more", *TINY_ARGS], ["cache", "gc"]):
        done = _cli(*args, "--cache-dir", cache, child=READ_ONLY, env={"READ_ONLY": str(cache)})
        _no_traceback(done)
        said = done.stderr.replace("\n", "")
        assert done.returncode == 1 and f"cannot write to {cache}" in said and "intact" in said, _said(done)[-3000:]
    assert _snapshot(cache) == before


# ---- low: gc --dry-run, --cache-dir FILE, --groups-from missing ----------------------------------------------


def test_gc_dry_run_changes_nothing_on_disk(tmp_path):
    """The old dry run took the writer: it settled incoming/, swept temporaries and compacted a store of
    over 32 shards. Now not a byte nor an mtime of the cache changes, and the answer is the real gc's."""
    from typer.testing import CliRunner

    from featurepipe.cli.app import app

    data, cache = _photos(tmp_path / "data", n=20), tmp_path / "cache"
    extract(scan(data, cache_dir=cache), TINY, cache, batch_size=1)
    for path in sorted((data / "red").iterdir())[:5]:
        path.unlink()                                                       # 5 rows nothing uses now
    extract(scan(data, cache_dir=cache), TINY, cache)                       # the ref now holds 35 images
    store = open_stores(TINY, cache).originals
    (store.directory / "shards" / ".tmp-killed-writer.h5").write_bytes(b"half a shard")   # a writer sweeps it
    before = _snapshot(cache)
    result = CliRunner().invoke(app, ["cache", "gc", "--dry-run", "--cache-dir", str(cache)])
    assert result.exit_code == 0 and "would remove 0 store(s), 5 row(s)" in result.stdout, result.output
    assert _snapshot(cache) == before
    result = CliRunner().invoke(app, ["cache", "gc", "--cache-dir", str(cache)])
    assert result.exit_code == 0 and "removed 0 store(s), 5 row(s)" in result.stdout, result.output


def test_a_cache_dir_that_is_a_file_is_a_usage_error(tmp_path):
    from typer.testing import CliRunner

    from featurepipe.cli.app import app

    not_a_folder = tmp_path / "cache.txt"
    not_a_folder.write_text("mine")
    for args in (["cache", "ls"], ["cache", "gc"], ["cache", "verify"]):
        result = CliRunner().invoke(app, [*args, "--cache-dir", str(not_a_folder)])
        assert result.exit_code == 2 and "is not a folder" in result.stderr, (args, result.output, result.exception)
    assert not_a_folder.read_text() == "mine"


def test_a_missing_groups_from_file_is_named(tmp_path):
    from featurepipe.core.errors import FeaturepipeError
    from featurepipe.data.dataset import load_groups

    dataset = scan(_photos(tmp_path / "data"), cache_dir=tmp_path / "cache")
    with pytest.raises(FeaturepipeError, match=r"--groups-from .*nope\.csv: no such file"):
        load_groups(dataset, tmp_path / "nope.csv")
