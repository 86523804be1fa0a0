"""The HDF5 feature store: one directory per backbone fingerprint, immutable shards, atomic commits.

Layout (readable with plain h5py; see the README):

    <cache>/features/<fingerprint[:16]>/
        spec.json                 fingerprint, the payload it hashes, feature_dim
        shards/<name>.h5          datasets "keys" (n,) UTF-8 strings and "features" (n, d) float32;
                                  attribute "sha256" = sha256(keys bytes + features bytes);
                                  <name> is "batch-<id>" for an extract batch (featurepipe.batches),
                                  a timestamp for anything else (a compaction)
        incoming/<name>.h5        shards published by distributed workers, not yet committed
        .lock                     writers hold an exclusive flock on it

Each committed batch is one shard written to a temporary name, fsynced and renamed into place,
so a process killed at any moment leaves only whole shards (plus a stray temporary file that the
next writer deletes). Rows are keyed by image content hash (or "hash@view" for augmented views).

The index is the set of files in shards/: whatever sits there is committed. Distributed workers
therefore never write there: they publish into incoming/ and only the process holding the writer
lock (the driver) moves a checked shard into shards/. The lock is an flock, which is not to be
trusted across hosts on NFS: a store must have ONE driver at a time; workers never take the lock.
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

from featurepipe.errors import StoreCorruptError, StoreError, StoreLockedError

SCHEMA_VERSION = 1
COMPACT_AT = 32          # shard count above which a writer merges shards when it finishes
# Compaction writes shards of at most this many bytes of features (~3,300 rows of 1,280-d), so
# reading one shard (checksummed whole) and compacting cost bounded memory whatever the store's size.
SHARD_BYTES = 16 * 2**20
MIN_SHARD_ROWS = 256
_STRING = h5py.string_dtype("utf-8")


def _shard_digest(keys: np.ndarray, features: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update("\n".join(keys.tolist()).encode())
    digest.update(np.ascontiguousarray(features, dtype=np.float32))   # the buffer itself: no bytes copy
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_h5(path: Path, keys: np.ndarray, features: np.ndarray) -> None:
    with h5py.File(path, "w") as handle:
        handle.create_dataset("keys", data=keys, dtype=_STRING)
        handle.create_dataset("features", data=features)
        handle.attrs["sha256"] = _shard_digest(keys, features)
        handle.attrs["schema_version"] = SCHEMA_VERSION
    with open(path, "rb") as raw:
        os.fsync(raw.fileno())


def publish_shard(directory: Path, name: str, keys: list[str], features: np.ndarray) -> bool:
    """Write one shard as DIRECTORY/NAME, never clobbering: False when NAME already existed.

    The file is written under a temporary name unique to this attempt, fsynced, then hard-linked
    to NAME, which fails atomically if another attempt (a retried task whose first run was not
    dead after all) got there first; that copy is then discarded. Either way NAME ends up whole.
    """
    directory = Path(directory)
    features = np.ascontiguousarray(features, dtype=np.float32)
    if features.ndim != 2 or features.shape[0] != len(keys):
        raise StoreError(f"features of shape {features.shape} do not match {len(keys)} keys")
    final = directory / name
    tmp = directory / f".tmp-{uuid.uuid4().hex[:8]}-{name}"
    try:
        _write_h5(tmp, np.asarray(keys, dtype=object), features)
        try:
            os.link(tmp, final)
            published = True
        except FileExistsError:
            published = False
        except OSError:
            # A filesystem without hard links: a checked rename. Two attempts racing here both
            # hold the same whole shard, so whichever rename wins leaves a complete file.
            published = not final.exists()
            if published:
                os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(directory)
    return published


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


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
        # Shards are immutable once renamed into place (unique names): one whose checksum this process
        # has checked need not be read whole again, so later reads take just the rows they need.
        self._verified: set[str] = set()

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

    @property
    def incoming(self) -> Path:
        """Where distributed workers publish shards for the driver to commit (see the module doc)."""
        return self.directory / "incoming"

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
        """Features for `keys`, in that order; every shard touched is checked against its digest.

        Memory: the result plus one shard (shards are bounded by SHARD_BYTES once compacted).
        """
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
            positions, rows = (np.asarray(v) for v in zip(*pairs))
            out[positions] = self._shard_rows(self.directory / "shards" / shard, rows)
        return out

    def iter_read(self, keys: list[str], chunk_rows: int = 4096) -> Iterator[np.ndarray]:
        """`read` in consecutive chunks of `keys`: bounded memory for consumers that stream."""
        for start in range(0, len(keys), chunk_rows):
            yield self.read(keys[start:start + chunk_rows])

    def _shard_rows(self, path: Path, rows: np.ndarray) -> np.ndarray:
        if path.name not in self._verified:
            features = self._read_shard(path)[1]
            self._verified.add(path.name)
            return features[rows]
        # Checked earlier in this process: read only the span of rows asked for.
        low, high = int(rows.min()), int(rows.max()) + 1
        try:
            with h5py.File(path, "r") as handle:
                span = handle["features"][low:high]
        except (OSError, KeyError) as error:
            raise StoreCorruptError(
                f"{path} cannot be read ({error}); run `featurepipe cache verify --repair` to drop it"
            ) from None
        return span[rows - low]

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
            writer.adopt_incoming()
            yield writer
            writer.adopt_incoming()
            if len(self._shard_paths()) > COMPACT_AT:
                self._compact()
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
            self._index = None

    def _write_shard(self, keys: list[str], features: np.ndarray, name: Optional[str] = None) -> bool:
        """Write and commit one shard; False when a shard of that NAME was already committed."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[0] != len(keys):
            raise StoreError(f"features of shape {features.shape} do not match {len(keys)} keys")
        self._check_dim(features.shape[1])
        shards = self.directory / "shards"
        name = name or f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.h5"
        return publish_shard(shards, name, keys, features)

    def _check_dim(self, dim: int) -> None:
        """The first shard fixes the store's feature_dim; every later one must match it."""
        if self.feature_dim is None:
            self.feature_dim = int(dim)
            spec = json.loads((self.directory / "spec.json").read_text())
            spec["feature_dim"] = self.feature_dim
            _write_json_atomic(self.directory / "spec.json", spec)
        elif dim != self.feature_dim:
            raise StoreError(f"features have {dim} dims; {self.directory} holds {self.feature_dim}")

    def shard_rows(self) -> int:
        """Rows per compacted shard: SHARD_BYTES of float32 features (at least MIN_SHARD_ROWS rows)."""
        return max(MIN_SHARD_ROWS, SHARD_BYTES // (4 * max(1, self.feature_dim or 1)))

    def _shard_len(self, path: Path) -> int:
        try:
            with h5py.File(path, "r") as handle:
                return int(handle["keys"].shape[0])
        except (OSError, KeyError) as error:
            raise StoreCorruptError(
                f"{path} cannot be read ({error}); run `featurepipe cache verify --repair` to drop it"
            ) from None

    def _compact(self, keep: Optional[set[str]] = None) -> None:
        """Merge the shards that are not full into shards of shard_rows() rows (with `keep`: rewrite every
        shard, keeping only those keys); the caller holds the lock.

        Streaming: at most one input shard and one output shard in memory, so compacting a store of
        any size costs bounded memory, and full shards are left alone (no quadratic rewriting as a
        store grows). New shards are in place before old ones go: a kill leaves duplicates, not gaps.
        """
        target = self.shard_rows()
        shards = self._shard_paths()
        if keep is None:
            old = [p for p in shards if self._shard_len(p) < target]
            if len(old) < 2:
                return
            seen = set()
            for shard in shards:
                if shard not in old:
                    with h5py.File(shard, "r") as handle:
                        seen.update(handle["keys"].asstr()[()].tolist())
        else:
            old, seen = shards, set()
        keys: list[str] = []
        buffer: Optional[np.ndarray] = None        # one output shard, filled in place
        for shard in old:
            shard_keys, features = self._read_shard(shard)
            mask = np.array([k not in seen and (keep is None or k in keep) for k in shard_keys], dtype=bool)
            seen.update(shard_keys.tolist())
            kept_keys, kept = shard_keys[mask].tolist(), features[mask]
            if buffer is None:
                buffer = np.empty((target, features.shape[1]), dtype=np.float32)
            start = 0
            while start < len(kept):
                take = min(target - len(keys), len(kept) - start)
                buffer[len(keys):len(keys) + take] = kept[start:start + take]
                keys.extend(kept_keys[start:start + take])
                start += take
                if len(keys) == target:
                    self._write_shard(keys, buffer)
                    keys = []
        if keys:
            self._write_shard(keys, buffer[:len(keys)])
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

    def add(self, keys: list[str], features: np.ndarray, name: Optional[str] = None) -> None:
        """Commit one batch as one shard (named NAME, e.g. its batch's): after this returns the rows
        survive any crash. A shard of that name already committed is kept and this copy dropped."""
        if keys and self._store._write_shard(keys, features, name):
            self.rows_written += len(keys)

    def commit_published(self, path: Path, keys: Optional[list[str]] = None) -> int:
        """Move a shard a worker published (in the store's incoming/) into the index; returns its rows.

        The shard is checked first: its checksum, its feature dims, and when KEYS is given that it
        holds exactly those rows in that order (what its batch planned). A shard of the same name
        already committed wins; the published copy is dropped."""
        store = self._store
        path = Path(path)
        if path.parent.resolve() != store.incoming.resolve():
            raise StoreError(f"{path} is not in {store.incoming}; only published shards can be committed")
        shard_keys, features = store._read_shard(path)
        if keys is not None and shard_keys.tolist() != list(keys):
            raise StoreCorruptError(f"{path} does not hold the rows its batch planned ({len(shard_keys)} rows, "
                                    f"{len(keys)} expected); delete it and run extract again")
        store._check_dim(features.shape[1])
        final = store.directory / "shards" / path.name
        if final.exists():
            path.unlink()
        else:
            os.replace(path, final)
            self.rows_written += len(shard_keys)
        _fsync_dir(final.parent)
        store._index = None
        return len(shard_keys)

    def adopt_incoming(self) -> None:
        """Settle what workers left in incoming/: half-written temporaries are deleted, whole shards
        whose rows the store lacks are committed (a driver that died after its workers published),
        the rest (damaged, or rows already committed) deleted. Runs whenever a writer starts and ends."""
        store = self._store
        if not store.incoming.is_dir():
            return
        for stray in store.incoming.glob(".tmp-*"):
            stray.unlink(missing_ok=True)
        for path in sorted(store.incoming.glob("*.h5")):
            try:
                shard_keys, _ = store._read_shard(path)
                if not set(shard_keys.tolist()) <= store.keys():
                    self.commit_published(path)
                    continue
            except StoreError:
                pass          # damaged, or features of other dims: not rows of this store
            path.unlink(missing_ok=True)


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
