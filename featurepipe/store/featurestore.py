"""The HDF5 feature store: one directory per backbone fingerprint, immutable shards, atomic commits.

Layout (readable with plain h5py; see the README):

    <cache>/features/<fingerprint[:16]>/
        spec.json                 fingerprint, the payload it hashes, feature_dim
        shards/<name>.h5          datasets "keys" (n,) UTF-8 strings and "features" (n, d) float32;
                                  attribute "sha256" = sha256(keys bytes + features bytes);
                                  <name> is "batch-<id>" for an extract batch (featurepipe.extraction.batches),
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

The store is split by job: this module opens a store, reads and writes its rows; shards.py writes,
checks and publishes shard files; lock.py is the writer lock; compaction.py merges small shards;
integrity.py verifies and repairs; gc.py removes what nothing uses.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import h5py
import numpy as np

from featurepipe.core.atomic import write_json
from featurepipe.core.errors import StoreCorruptError, StoreError, StoreLockedError
from featurepipe.store import compaction, integrity
from featurepipe.store.integrity import parse_spec, rebuild_spec
from featurepipe.store.keyindex import KeyIndex
from featurepipe.store.lock import store_lock
from featurepipe.store.shards import (SCHEMA_VERSION, SHARD_READ_ERRORS, check_shard, committed_shards, move_shard,
                                      publish_shard, read_shard, shard_keys, unreadable_shard)

COMPACT_AT = 32          # shard count above which a writer merges shards when it finishes
# Compaction writes shards of at most this many bytes of features (~3,300 rows of 1,280-d), so
# reading one shard (checksummed whole) and compacting cost bounded memory whatever the store's size.
SHARD_BYTES = 16 * 2**20
MIN_SHARD_ROWS = 256


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
    def __init__(self, directory: Path, fingerprint: Optional[str] = None, payload: Optional[dict] = None):
        """Open the store in `directory`. `fingerprint` and `payload` (what `open` knows) let a damaged
        spec.json be rebuilt; without them it is rebuilt from what the shards record, when they do."""
        self.directory = Path(directory)
        self.repaired: list[str] = []          # what opening had to fix, for the caller to say
        spec_path = self.directory / "spec.json"
        try:
            spec = parse_spec(spec_path)
        except FileNotFoundError:
            if fingerprint is None:
                raise StoreError(f"{self.directory} is not a feature store (no spec.json)") from None
            spec = rebuild_spec(self, fingerprint, payload, "it was missing")
        except StoreCorruptError as error:
            spec = rebuild_spec(self, fingerprint, payload, str(error))
        self.fingerprint: str = spec["fingerprint"]
        self.payload: dict = spec["payload"]
        self.feature_dim: Optional[int] = spec.get("feature_dim")
        self._index: Optional[KeyIndex] = None
        # Shards are immutable once renamed into place (unique names): one whose checksum this process
        # has checked need not be read whole again, so later reads take just the rows they need.
        self._verified: set[str] = set()

    def refresh(self) -> None:
        """Re-read spec.json (another process may have set feature_dim) and forget the key index."""
        try:
            self.feature_dim = parse_spec(self.directory / "spec.json").get("feature_dim")
        except (OSError, StoreError):
            pass
        self._index = None

    # ---- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, features_root: Path, fingerprint: str, payload: dict) -> "FeatureStore":
        directory = Path(features_root) / fingerprint[:16]
        (directory / "shards").mkdir(parents=True, exist_ok=True)
        spec_path = directory / "spec.json"
        if not spec_path.exists():
            write_json(spec_path, {"schema_version": SCHEMA_VERSION, "fingerprint": fingerprint,
                                           "payload": payload, "feature_dim": None})
        store = cls(directory, fingerprint, payload)
        store.sweep_stray_temps()
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
        return committed_shards(self.directory)

    def _load_index(self) -> KeyIndex:
        # A compaction running in another process may delete shards while we list them; the
        # merged shard is already in place by then, so one fresh listing sees every row.
        for attempt in range(3):
            try:
                return KeyIndex.build(self._shard_keys())
            except FileNotFoundError:
                time.sleep(0.05 * (attempt + 1))
        raise StoreError(f"{self.directory} kept changing while being read; try again")

    def _key_index(self) -> KeyIndex:
        if self._index is None:
            self._index = self._load_index()
        return self._index

    def _shard_keys(self) -> Iterator[tuple[str, np.ndarray]]:
        for shard in self._shard_paths():
            # A damaged shard is named here, by every command that reads the store (extract and `cache ls`
            # included), rather than surfacing as a codec error wherever one of its keys is decoded.
            yield shard.name, shard_keys(shard, raw=True)        # UTF-8 bytes, as stored

    def keys(self) -> set[str]:
        return set(self._key_index())

    def has(self, keys: Iterable[str]) -> np.ndarray:
        """One bool per key: is it in the store? (No set of every key, unlike keys().)"""
        return self._key_index().contains(keys)

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys not in the store, in order, each once."""
        keys = list(keys)
        seen: set[str] = set()
        out = []
        for key, present in zip(keys, self.has(keys)):
            if not present and key not in seen:
                seen.add(key)
                out.append(key)
        return out

    def read(self, keys: list[str]) -> np.ndarray:
        """Features for `keys`, in that order; every shard touched is checked against its digest.

        Memory: the result plus one shard (shards are bounded by SHARD_BYTES once compacted).
        """
        index = self._key_index()
        try:
            shards, rows = index.locate(keys)
        except KeyError as error:
            absent = error.args[0]
            raise KeyError(f"{len(absent)} key(s) not in {self.directory}, e.g. {absent[0]}") from None
        out = np.empty((len(keys), self.feature_dim or 0), dtype=np.float32)
        for shard in np.unique(shards).tolist():      # in shard order, as the index lists them
            positions = np.flatnonzero(shards == shard)
            out[positions] = self._shard_rows(self.directory / "shards" / index.names[shard], rows[positions])
        return out

    def iter_read(self, keys: list[str], chunk_rows: int = 4096) -> Iterator[np.ndarray]:
        """`read` in consecutive chunks of `keys`: bounded memory for consumers that stream."""
        for start in range(0, len(keys), chunk_rows):
            yield self.read(keys[start:start + chunk_rows])

    def _shard_rows(self, path: Path, rows: np.ndarray) -> np.ndarray:
        if path.name not in self._verified:
            check_shard(path)
            self._verified.add(path.name)
        # Checked (once per process): read only the rows asked for. A dense run of rows is one span
        # read; rows scattered over a shard are read as a selection, since their span can be the whole
        # 16 MiB shard: rows are stored in content-hash order (extract plans batches by hash), so a
        # 1,024-row export chunk in dataset order took ~50 rows from each of 22 shards at 70,000 images.
        low, high = int(rows.min()), int(rows.max()) + 1
        try:
            with h5py.File(path, "r") as handle:
                if high - low <= 2 * len(rows):
                    span = handle["features"][low:high]
                    return span if high - low == len(rows) and (np.diff(rows) == 1).all() else span[rows - low]
                wanted, where = np.unique(rows, return_inverse=True)   # h5py takes increasing indices
                return handle["features"][wanted][where]
        except SHARD_READ_ERRORS as error:
            raise unreadable_shard(path, error) from None

    def _read_shard(self, path: Path, check: bool = True) -> tuple[np.ndarray, np.ndarray]:
        return read_shard(path, check)

    def failures(self) -> dict[str, str]:
        """content hash -> why that image could not be decoded. Decoding depends only on the bytes
        and the decoder version (part of the fingerprint), so a failure is as permanent as a row."""
        path = self.directory / "failed.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}   # only a cache of failures: losing it just means retrying those files

    def clear_failures(self) -> int:
        """Forget every remembered decode failure (they are tried again); returns how many there were."""
        count = len(self.failures())
        (self.directory / "failed.json").unlink(missing_ok=True)
        return count

    # ---- writing ---------------------------------------------------------------------------

    @contextmanager
    def writer(self, timeout: float = 0.0, on_wait: Optional[Callable[[], None]] = None) -> Iterator["StoreWriter"]:
        """Exclusive write access. Waits up to `timeout` seconds for another writer (calling `on_wait`
        once when it starts waiting), then fails clearly."""
        with store_lock(self.directory, timeout, on_wait):
            try:
                # `cache gc` may have removed the whole store while we waited: start it afresh.
                (self.directory / "shards").mkdir(parents=True, exist_ok=True)
                if not (self.directory / "spec.json").exists():
                    self.feature_dim = None
                    write_json(self.directory / "spec.json", {
                        "schema_version": SCHEMA_VERSION, "fingerprint": self.fingerprint, "payload": self.payload,
                        "feature_dim": None})
                for stray in (self.directory / "shards").glob(".tmp-*"):
                    stray.unlink(missing_ok=True)
                self.refresh()
                writer = StoreWriter(self)
                writer.adopt_incoming()
                yield writer
                writer.adopt_incoming()
                if len(self._shard_paths()) > COMPACT_AT:
                    self._compact()
            finally:
                self._index = None

    def sweep_stray_temps(self) -> int:
        """Delete temporary shards a killed writer left, if no writer is running now (lock free at
        once). Readers ignore them anyway, but a killed compaction's is as big as the whole store,
        and a store nothing is written to again would keep it for ever."""
        strays = list((self.directory / "shards").glob(".tmp-*"))
        if not strays:
            return 0
        try:
            with store_lock(self.directory, 0.0, None):
                for stray in (self.directory / "shards").glob(".tmp-*"):
                    stray.unlink(missing_ok=True)
        except StoreLockedError:
            return 0      # a writer is at work: those files may be its own
        return len(strays)

    def _write_shard(self, keys: list[str], features: np.ndarray, name: Optional[str] = None) -> bool:
        """Write and commit one shard; False when a shard of that NAME was already committed."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[0] != len(keys):
            raise StoreError(f"features of shape {features.shape} do not match {len(keys)} keys")
        self._check_dim(features.shape[1])
        shards = self.directory / "shards"
        name = name or f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.h5"
        return publish_shard(shards, name, keys, features, (self.fingerprint, self.payload))

    def _check_dim(self, dim: int) -> None:
        """The first shard fixes the store's feature_dim; every later one must match it."""
        if self.feature_dim is None:
            self.feature_dim = int(dim)
            spec = json.loads((self.directory / "spec.json").read_text())
            spec["feature_dim"] = self.feature_dim
            write_json(self.directory / "spec.json", spec)
        elif dim != self.feature_dim:
            raise StoreError(f"features have {dim} dims; {self.directory} holds {self.feature_dim}")

    def shard_rows(self) -> int:
        """Rows per compacted shard: SHARD_BYTES of float32 features (at least MIN_SHARD_ROWS rows)."""
        return max(MIN_SHARD_ROWS, SHARD_BYTES // (4 * max(1, self.feature_dim or 1)))

    def _compact(self, keep: Optional[set[str]] = None) -> None:
        """featurepipe.store.compaction.compact on this store; the caller holds the lock."""
        compaction.compact(self, keep)

    # ---- maintenance -----------------------------------------------------------------------

    def verify(self, repair: bool = False) -> list[str]:
        """featurepipe.store.integrity.verify: the problems found (fixed too, with repair)."""
        return integrity.verify(self, repair)

    def spec_problems(self) -> list[str]:
        """featurepipe.store.integrity.spec_problems: how spec.json disagrees with the shards."""
        return integrity.spec_problems(self)

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
            write_json(self._store.directory / "failed.json", {**self._store.failures(), **failures})

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
        if move_shard(path, store.directory / "shards" / path.name):
            self.rows_written += len(shard_keys)
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


def list_stores(features_root: Path, problems: Optional[dict[str, str]] = None) -> list[FeatureStore]:
    """Every store under `features_root`. One whose spec.json is damaged beyond rebuilding is left
    out and described in `problems` (folder -> message) when given, else it raises."""
    if not Path(features_root).exists():
        return []
    stores = []
    for directory in sorted(Path(features_root).iterdir()):
        if not directory.is_dir() or not ((directory / "spec.json").exists() or (directory / "shards").is_dir()):
            continue
        try:
            stores.append(FeatureStore(directory))
        except StoreError as error:
            if problems is None:
                raise
            problems[str(directory)] = str(error)
    return stores
