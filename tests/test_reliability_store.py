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
    assert listed.returncode == 2 and "cache verify --repair" in listed.stderr
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
        assert done.returncode == 2 and str(shard) in message and "cache verify --repair" in message, _said(done)
    assert shard.exists()

    assert _cli("cache", "verify", "--repair", "--cache-dir", cache).returncode == 0
    assert not shard.exists()
    done = _cli("extract", data, *TINY_ARGS, "--cache-dir", cache, "--json")
    assert done.returncode == 0 and '"extracted": 8' in done.stdout, _said(done)

