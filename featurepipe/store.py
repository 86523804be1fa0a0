"""The HDF5 feature store: one directory per backbone fingerprint, immutable shards, atomic commits.

Layout (readable with plain h5py; see the README):

    <cache>/features/<fingerprint[:16]>/
        spec.json                 fingerprint, the payload it hashes, feature_dim
        shards/<seq>.h5           datasets "keys" (n,) UTF-8 strings and "features" (n, d) float32;
                                  attribute "sha256" = sha256(keys bytes + features bytes)
        .lock                     writers hold an exclusive flock on it

Each committed batch is one shard written to a temporary name, fsynced and renamed into place,
so a process killed at any moment leaves only whole shards (plus a stray temporary file that the
next writer deletes). Rows are keyed by image content hash (or "hash@view" for augmented views).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import h5py
import numpy as np

from featurepipe.atomic import fsync_dir, write_json
from featurepipe.errors import StoreCorruptError, StoreError, StoreLockedError, disk_full, is_disk_full

SCHEMA_VERSION = 1
COMPACT_AT = 32          # shard count above which a writer merges shards when it finishes
_STRING = h5py.string_dtype("utf-8")


def _shard_digest(keys: np.ndarray, features: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update("\n".join(keys.tolist()).encode())
    digest.update(np.ascontiguousarray(features, dtype=np.float32).tobytes())
    return digest.hexdigest()


_fsync_dir = fsync_dir


def _write_json_atomic(path: Path, data: dict) -> None:
    write_json(path, data)


@dataclass
class StoreInfo:
    directory: Path
    fingerprint: str
    payload: dict
    rows: int
    feature_dim: int
    shards: int
    bytes: int
    modified: float


class FeatureStore:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        spec_path = self.directory / "spec.json"
        try:
            spec = json.loads(spec_path.read_text())
        except FileNotFoundError:
            raise StoreError(f"{self.directory} is not a feature store (no spec.json)") from None
        except json.JSONDecodeError as error:
            raise StoreCorruptError(
                f"{spec_path} is damaged ({error}); delete {self.directory} and run extract again"
            ) from None
        self.fingerprint: str = spec["fingerprint"]
        self.payload: dict = spec["payload"]
        self.feature_dim: Optional[int] = spec.get("feature_dim")
        self._index: Optional[dict[str, tuple[str, int]]] = None

    # ---- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, features_root: Path, fingerprint: str, payload: dict) -> "FeatureStore":
        directory = Path(features_root) / fingerprint[:16]
        (directory / "shards").mkdir(parents=True, exist_ok=True)
        spec_path = directory / "spec.json"
        if not spec_path.exists():
            _write_json_atomic(spec_path, {"schema_version": SCHEMA_VERSION, "fingerprint": fingerprint,
                                           "payload": payload, "feature_dim": None})
        store = cls(directory)
        if store.fingerprint != fingerprint:
            raise StoreCorruptError(
                f"{directory} holds features of another fingerprint ({store.fingerprint[:16]}...); "
                f"delete that folder and run extract again"
            )
        return store

    # ---- reading ---------------------------------------------------------------------------

    def _shard_paths(self) -> list[Path]:
        # pathlib's "*" also matches dot-files: skip the ".tmp-*" files of writers in flight or killed.
        return sorted(p for p in (self.directory / "shards").glob("*.h5") if not p.name.startswith("."))

    def _load_index(self) -> dict[str, tuple[str, int]]:
        # A compaction running in another process may delete shards while we list them; the
        # merged shard is already in place by then, so one fresh listing sees every row.
        for attempt in range(3):
            index: dict[str, tuple[str, int]] = {}
            try:
                for shard in self._shard_paths():
                    with h5py.File(shard, "r") as handle:
                        for row, key in enumerate(handle["keys"].asstr()[()]):
                            index[key] = (shard.name, row)
                return index
            except FileNotFoundError:
                time.sleep(0.05 * (attempt + 1))
            except (OSError, KeyError) as error:
                raise StoreCorruptError(
                    f"a shard of {self.directory} cannot be read ({error}); run `featurepipe cache verify --repair` "
                    f"to drop damaged shards (their images are re-extracted on the next run)"
                ) from None
        raise StoreError(f"{self.directory} kept changing while being read; try again")

    def keys(self) -> set[str]:
        if self._index is None:
            self._index = self._load_index()
        return set(self._index)

    def missing(self, keys: Iterable[str]) -> list[str]:
        have = self.keys()
        seen: set[str] = set()
        out = []
        for key in keys:
            if key not in have and key not in seen:
                seen.add(key)
                out.append(key)
        return out

    def read(self, keys: list[str]) -> np.ndarray:
        """Features for `keys`, in that order; every shard touched is checked against its digest."""
        if self._index is None:
            self._index = self._load_index()
        absent = [k for k in keys if k not in self._index]
        if absent:
            raise KeyError(f"{len(absent)} key(s) not in {self.directory}, e.g. {absent[0]}")
        out = np.empty((len(keys), self.feature_dim or 0), dtype=np.float32)
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for position, key in enumerate(keys):
            shard, row = self._index[key]
            by_shard.setdefault(shard, []).append((position, row))
        for shard, pairs in by_shard.items():
            features = self._read_shard(self.directory / "shards" / shard)[1]
            positions, rows = zip(*pairs)
            out[list(positions)] = features[list(rows)]
        return out

    def _read_shard(self, path: Path, check: bool = True) -> tuple[np.ndarray, np.ndarray]:
        try:
            with h5py.File(path, "r") as handle:
                keys = handle["keys"].asstr()[()]
                features = handle["features"][()]
                expected = handle.attrs.get("sha256")
        except (OSError, KeyError) as error:
            raise StoreCorruptError(
                f"{path} cannot be read ({error}); run `featurepipe cache verify --repair` to drop it"
            ) from None
        keys = np.asarray(keys, dtype=object)
        if check and expected != _shard_digest(keys, features):
            raise StoreCorruptError(
                f"{path} does not match its checksum (damaged or edited); run `featurepipe cache verify --repair` "
                f"to drop it, and its images are re-extracted on the next run"
            )
        return keys, features

    def failures(self) -> dict[str, str]:
        """content hash -> why that image could not be decoded. Decoding depends only on the bytes
        and the decoder version (part of the fingerprint), so a failure is as permanent as a row."""
        path = self.directory / "failed.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError:
            return {}   # only a cache of failures: losing it just means retrying those files

    # ---- writing ---------------------------------------------------------------------------

    @contextmanager
    def writer(self, timeout: float = 0.0) -> Iterator["StoreWriter"]:
        """Exclusive write access. Waits up to `timeout` seconds for another writer, then fails clearly."""
        lock_path = self.directory / ".lock"
        handle = open(lock_path, "a+")
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise StoreLockedError(
                            f"another featurepipe process is writing to {self.directory}; wait for it to finish "
                            f"(or pass a longer --lock-timeout) and run again"
                        ) from None
                    time.sleep(0.2)
            for stray in (self.directory / "shards").glob(".tmp-*"):
                stray.unlink(missing_ok=True)
            self._index = None
            writer = StoreWriter(self)
            yield writer
            if len(self._shard_paths()) > COMPACT_AT:
                self._compact()
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
            self._index = None

    def _write_shard(self, keys: list[str], features: np.ndarray) -> Path:
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[0] != len(keys):
            raise StoreError(f"features of shape {features.shape} do not match {len(keys)} keys")
        if self.feature_dim is None:
            self.feature_dim = int(features.shape[1])
            spec = json.loads((self.directory / "spec.json").read_text())
            spec["feature_dim"] = self.feature_dim
            _write_json_atomic(self.directory / "spec.json", spec)
        elif features.shape[1] != self.feature_dim:
            raise StoreError(f"features have {features.shape[1]} dims; {self.directory} holds {self.feature_dim}")
        key_array = np.asarray(keys, dtype=object)
        shards = self.directory / "shards"
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.h5"
        tmp = shards / f".tmp-{name}"
        with h5py.File(tmp, "w") as handle:
            handle.create_dataset("keys", data=key_array, dtype=_STRING)
            handle.create_dataset("features", data=features)
            handle.attrs["sha256"] = _shard_digest(key_array, features)
            handle.attrs["schema_version"] = SCHEMA_VERSION
        with open(tmp, "rb") as raw:
            os.fsync(raw.fileno())
        final = shards / name
        os.replace(tmp, final)
        _fsync_dir(shards)
        return final

    def _compact(self, keep: Optional[set[str]] = None) -> None:
        """Merge every shard into one (optionally keeping only `keep`); the caller holds the lock."""
        old = self._shard_paths()
        keys, blocks = [], []
        seen: set[str] = set()
        for shard in old:
            shard_keys, features = self._read_shard(shard)
            mask = [k not in seen and (keep is None or k in keep) for k in shard_keys]
            seen.update(shard_keys.tolist())
            keys.extend(shard_keys[mask].tolist())
            blocks.append(features[mask])
        if keys:
            self._write_shard(keys, np.concatenate(blocks))
        for shard in old:
            shard.unlink()
        _fsync_dir(self.directory / "shards")
        self._index = None

    # ---- maintenance -----------------------------------------------------------------------

    def verify(self, repair: bool = False) -> list[str]:
        """Check every shard; return the problems found. With repair, damaged shards are removed."""
        problems = []
        damaged = []
        for shard in self._shard_paths():
            try:
                self._read_shard(shard)
            except StoreCorruptError as error:
                problems.append(str(error))
                damaged.append(shard)
        if repair and damaged:
            # All at once: a writer may compact on exit, and compaction must not meet a damaged shard.
            with self.writer(timeout=60):
                for shard in damaged:
                    shard.unlink(missing_ok=True)
        self._index = None
        return problems

    def info(self) -> StoreInfo:
        shards = self._shard_paths()
        size = sum(p.stat().st_size for p in self.directory.rglob("*") if p.is_file())
        modified = max([p.stat().st_mtime for p in shards] + [(self.directory / "spec.json").stat().st_mtime])
        return StoreInfo(self.directory, self.fingerprint, self.payload, len(self.keys()),
                         self.feature_dim or 0, len(shards), size, modified)


class StoreWriter:
    def __init__(self, store: FeatureStore):
        self._store = store
        self.rows_written = 0

    def add_failures(self, failures: dict[str, str]) -> None:
        if failures:
            _write_json_atomic(self._store.directory / "failed.json", {**self._store.failures(), **failures})

    def add(self, keys: list[str], features: np.ndarray) -> None:
        """Commit one batch as one shard: after this returns the rows survive any crash."""
        if keys:
            self._store._write_shard(keys, features)
            self.rows_written += len(keys)


def list_stores(features_root: Path) -> list[FeatureStore]:
    if not Path(features_root).exists():
        return []
    stores = []
    for directory in sorted(Path(features_root).iterdir()):
        if (directory / "spec.json").exists():
            stores.append(FeatureStore(directory))
    return stores


def remove_store(store: FeatureStore) -> None:
    with store.writer(timeout=60):
        shutil.rmtree(store.directory / "shards")
    shutil.rmtree(store.directory)


def prune_store(store: FeatureStore, keep: set[str]) -> int:
    """Drop rows whose keys are not in `keep`; returns how many were dropped."""
    with store.writer(timeout=60):
        before = store.keys()
        dropped = len(before - keep)
        if dropped:
            store._compact(keep=keep)
    return dropped
