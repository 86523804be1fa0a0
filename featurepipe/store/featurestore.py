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
from typing import Callable, Iterable, Iterator, Optional

import h5py
import numpy as np

from featurepipe.core.atomic import fsync_dir, write_json
from featurepipe.backbones.spec import hash_payload
from featurepipe.core.errors import StoreCorruptError, StoreError, StoreLockedError, disk_full, is_disk_full
from featurepipe.store.keyindex import KeyIndex

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


_fsync_dir = fsync_dir


def _unreadable_shard(path: Path, error: Exception) -> StoreCorruptError:
    return StoreCorruptError(f"{path} cannot be read ({error}); run `featurepipe cache verify --repair` to drop it")


def _damaged_shard(path: Path) -> StoreCorruptError:
    return StoreCorruptError(f"{path} does not match its checksum (damaged or edited); run `featurepipe cache verify "
                             f"--repair` to drop it, and its images are re-extracted on the next run")


def _parse_spec(path: Path) -> dict:
    """spec.json's content, or StoreCorruptError when it is not a spec (FileNotFoundError passes)."""
    try:
        spec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StoreCorruptError(f"not JSON: {error}") from None
    if (not isinstance(spec, dict) or not isinstance(spec.get("fingerprint"), str)
            or not isinstance(spec.get("payload"), dict)
            or not (spec.get("feature_dim") is None or isinstance(spec.get("feature_dim"), int))):
        raise StoreCorruptError("not a featurepipe store spec (fingerprint, payload, feature_dim)")
    return spec


def payload_matches(fingerprint: str, payload: dict) -> bool:
    """Is `fingerprint` the hash of `payload`? (A views store also keeps its base's payload beside it.)"""
    own = {k: v for k, v in payload.items() if k != "base_payload"}
    return hash_payload(payload) == fingerprint or hash_payload(own) == fingerprint


def _committed_shards(directory: Path) -> list[Path]:
    # pathlib's "*" also matches dot-files: skip the ".tmp-*" files of writers in flight or killed.
    return sorted(p for p in (directory / "shards").glob("*.h5") if not p.name.startswith("."))


def _fingerprint_from_shards(directory: Path) -> Optional[tuple[str, dict]]:
    """(fingerprint, payload) as recorded in the shards' attributes (shards written since they are)."""
    for shard in _committed_shards(directory):
        try:
            with h5py.File(shard, "r") as handle:
                fingerprint = handle.attrs.get("fingerprint")
                payload = handle.attrs.get("payload")
            if isinstance(fingerprint, str) and isinstance(payload, str):
                return fingerprint, json.loads(payload)
        except (OSError, ValueError):
            continue
    return None


def _shard_dims(directory: Path) -> set[int]:
    dims = set()
    for shard in _committed_shards(directory):
        try:
            with h5py.File(shard, "r") as handle:
                dims.add(int(handle["features"].shape[1]))
        except (OSError, KeyError, IndexError):
            continue
    return dims


def _write_h5(path: Path, keys: np.ndarray, features: np.ndarray, origin: Optional[tuple[str, dict]] = None) -> None:
    with h5py.File(path, "w") as handle:
        handle.create_dataset("keys", data=keys, dtype=_STRING)
        handle.create_dataset("features", data=features)
        handle.attrs["sha256"] = _shard_digest(keys, features)
        handle.attrs["schema_version"] = SCHEMA_VERSION
        if origin is not None:
            # What the rows are features of, so a lost or damaged spec.json can be rebuilt from them.
            handle.attrs["fingerprint"] = origin[0]
            handle.attrs["payload"] = json.dumps(origin[1], sort_keys=True)
    with open(path, "rb") as raw:
        os.fsync(raw.fileno())


def publish_shard(directory: Path, name: str, keys: list[str], features: np.ndarray,
                  origin: Optional[tuple[str, dict]] = None) -> bool:
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
        try:
            _write_h5(tmp, np.asarray(keys, dtype=object), features, origin)
        except OSError as error:
            if is_disk_full(error):
                raise disk_full(error, directory) from None
            raise
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
    def __init__(self, directory: Path, fingerprint: Optional[str] = None, payload: Optional[dict] = None):
        """Open the store in `directory`. `fingerprint` and `payload` (what `open` knows) let a damaged
        spec.json be rebuilt; without them it is rebuilt from what the shards record, when they do."""
        self.directory = Path(directory)
        self.repaired: list[str] = []          # what opening had to fix, for the caller to say
        spec_path = self.directory / "spec.json"
        try:
            spec = _parse_spec(spec_path)
        except FileNotFoundError:
            if fingerprint is None:
                raise StoreError(f"{self.directory} is not a feature store (no spec.json)") from None
            spec = self._rebuild_spec(fingerprint, payload, "it was missing")
        except StoreCorruptError as error:
            spec = self._rebuild_spec(fingerprint, payload, str(error))
        self.fingerprint: str = spec["fingerprint"]
        self.payload: dict = spec["payload"]
        self.feature_dim: Optional[int] = spec.get("feature_dim")
        self._index: Optional[KeyIndex] = None
        # Shards are immutable once renamed into place (unique names): one whose checksum this process
        # has checked need not be read whole again, so later reads take just the rows they need.
        self._verified: set[str] = set()

    def _rebuild_spec(self, fingerprint: Optional[str], payload: Optional[dict], why: str) -> dict:
        """A spec from the caller's fingerprint or from the shards' own record; the rows stay."""
        recorded = _fingerprint_from_shards(self.directory)
        if fingerprint is None and recorded is not None:
            fingerprint, payload = recorded
        if fingerprint is None or payload is None or not payload_matches(fingerprint, payload):
            raise StoreCorruptError(
                f"{self.directory / 'spec.json'} is damaged ({why}) and its shards do not record which backbone "
                f"they hold; its rows stay untouched: run `featurepipe extract` with the same backbone options to "
                f"rebuild it, or delete {self.directory} to drop them") from None
        if not self.directory.name or not fingerprint.startswith(self.directory.name):
            raise StoreCorruptError(f"{self.directory} is not named after fingerprint {fingerprint[:16]}; "
                                    f"delete it and run extract again")
        dims = _shard_dims(self.directory)
        spec = {"schema_version": SCHEMA_VERSION, "fingerprint": fingerprint, "payload": payload,
                "feature_dim": dims.pop() if len(dims) == 1 else None}
        if recorded is not None and recorded[0] != fingerprint:
            raise StoreCorruptError(f"{self.directory}'s shards hold features of fingerprint {recorded[0][:16]}, "
                                    f"not {fingerprint[:16]}; delete that folder and run extract again")
        (self.directory / "shards").mkdir(parents=True, exist_ok=True)
        _write_json_atomic(self.directory / "spec.json", spec)
        self.repaired.append(f"{self.directory / 'spec.json'} was damaged ({why}); rebuilt from the shards "
                             f"({spec['feature_dim']}-d features), no row was lost")
        return spec

    def refresh(self) -> None:
        """Re-read spec.json (another process may have set feature_dim) and forget the key index."""
        try:
            self.feature_dim = _parse_spec(self.directory / "spec.json").get("feature_dim")
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
            _write_json_atomic(spec_path, {"schema_version": SCHEMA_VERSION, "fingerprint": fingerprint,
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
        return _committed_shards(self.directory)

    def _load_index(self) -> KeyIndex:
        # A compaction running in another process may delete shards while we list them; the
        # merged shard is already in place by then, so one fresh listing sees every row.
        for attempt in range(3):
            try:
                return KeyIndex.build(self._shard_keys())
            except FileNotFoundError:
                time.sleep(0.05 * (attempt + 1))
            except (OSError, KeyError) as error:
                raise StoreCorruptError(
                    f"a shard of {self.directory} cannot be read ({error}); run `featurepipe cache verify --repair` "
                    f"to drop damaged shards (their images are re-extracted on the next run)"
                ) from None
        raise StoreError(f"{self.directory} kept changing while being read; try again")

    def _key_index(self) -> KeyIndex:
        if self._index is None:
            self._index = self._load_index()
        return self._index

    def _shard_keys(self) -> Iterator[tuple[str, np.ndarray]]:
        for shard in self._shard_paths():
            with h5py.File(shard, "r") as handle:
                yield shard.name, handle["keys"][()]        # UTF-8 bytes, as stored

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
            self._check_shard(path)
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
        except (OSError, KeyError) as error:
            raise _unreadable_shard(path, error) from None

    def _check_shard(self, path: Path, block_rows: int = 256) -> None:
        """_read_shard's checksum test, reading the features `block_rows` at a time (the digest is
        over the same bytes in the same order), so a reader never holds a whole 16 MiB shard (nor,
        with 256-row blocks, more than 1.3 MB of it at 1,280-d)."""
        try:
            with h5py.File(path, "r") as handle:
                keys = handle["keys"].asstr()[()]
                expected = handle.attrs.get("sha256")
                digest = hashlib.sha256()
                digest.update("\n".join(np.asarray(keys, dtype=object).tolist()).encode())
                dataset = handle["features"]
                for start in range(0, dataset.shape[0], block_rows):
                    digest.update(np.ascontiguousarray(dataset[start:start + block_rows], dtype=np.float32))
        except (OSError, KeyError) as error:
            raise _unreadable_shard(path, error) from None
        if expected != digest.hexdigest():
            raise _damaged_shard(path)

    def _read_shard(self, path: Path, check: bool = True) -> tuple[np.ndarray, np.ndarray]:
        try:
            with h5py.File(path, "r") as handle:
                keys = handle["keys"].asstr()[()]
                features = handle["features"][()]
                expected = handle.attrs.get("sha256")
        except (OSError, KeyError) as error:
            raise _unreadable_shard(path, error) from None
        keys = np.asarray(keys, dtype=object)
        if check and expected != _shard_digest(keys, features):
            raise _damaged_shard(path)
        return keys, features

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
        handle = self._lock(timeout, on_wait)
        try:
            # `cache gc` may have removed the whole store while we waited: start it afresh.
            (self.directory / "shards").mkdir(parents=True, exist_ok=True)
            if not (self.directory / "spec.json").exists():
                self.feature_dim = None
                _write_json_atomic(self.directory / "spec.json", {
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
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
            self._index = None

    def sweep_stray_temps(self) -> int:
        """Delete temporary shards a killed writer left, if no writer is running now (lock free at
        once). Readers ignore them anyway, but a killed compaction's is as big as the whole store,
        and a store nothing is written to again would keep it for ever."""
        strays = list((self.directory / "shards").glob(".tmp-*"))
        if not strays:
            return 0
        try:
            handle = self._lock(0.0, None)
        except StoreLockedError:
            return 0      # a writer is at work: those files may be its own
        try:
            for stray in (self.directory / "shards").glob(".tmp-*"):
                stray.unlink(missing_ok=True)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        return len(strays)

    def _lock(self, timeout: float, on_wait: Optional[Callable[[], None]]):
        """An open handle on .lock holding its flock. The lock file itself may be deleted by a gc that
        removes the store while we wait; then the lock we got is on a file no one else sees, so we
        check it is still the one at the path and start over if not."""
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            self.directory.mkdir(parents=True, exist_ok=True)
            handle = open(self.directory / ".lock", "a+")
            try:
                while True:
                    try:
                        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise StoreLockedError(
                                f"another featurepipe process is writing to {self.directory}; wait for it to "
                                f"finish (or pass a longer --lock-timeout) and run again") from None
                        if not waited and on_wait is not None:
                            on_wait()
                        waited = True
                        time.sleep(0.2)
                held = os.fstat(handle.fileno())
                try:
                    current = os.stat(self.directory / ".lock")
                except FileNotFoundError:
                    current = None
                if current is not None and (current.st_ino, current.st_dev) == (held.st_ino, held.st_dev):
                    return handle
            except BaseException:
                handle.close()
                raise
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

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
        """Check spec.json against the shards and every shard against its digest; return the problems.
        With repair, damaged shards are removed, a wrong spec is rebuilt from the shards where they
        record their fingerprint, and remembered decode failures are forgotten (so they are retried)."""
        problems = self.spec_problems()
        damaged = []
        for shard in self._shard_paths():
            try:
                self._read_shard(shard)
            except StoreCorruptError as error:
                problems.append(str(error))
                damaged.append(shard)
        if repair:
            # All at once: a writer may compact on exit, and compaction must not meet a damaged shard.
            with self.writer(timeout=60):
                for shard in damaged:
                    shard.unlink(missing_ok=True)
                if self.spec_problems():
                    recorded = _fingerprint_from_shards(self.directory)
                    if recorded is not None:
                        self._rebuild_spec(*recorded, "it disagreed with its shards")
                        spec = _parse_spec(self.directory / "spec.json")
                        self.fingerprint, self.payload = spec["fingerprint"], spec["payload"]
                        self.feature_dim = spec["feature_dim"]
                    else:
                        problems.append(f"{self.directory / 'spec.json'} cannot be rebuilt: its shards do not "
                                        f"record their fingerprint; delete {self.directory} and run extract again")
                self.clear_failures()
        self._index = None
        return problems

    def spec_problems(self) -> list[str]:
        """Ways spec.json disagrees with itself or with the shards (an edited fingerprint or dim)."""
        spec_path = self.directory / "spec.json"
        problems = []
        if not payload_matches(self.fingerprint, self.payload):
            problems.append(f"{spec_path}: the fingerprint is not the hash of the recorded payload (edited?)")
        if not self.fingerprint.startswith(self.directory.name):
            problems.append(f"{spec_path}: fingerprint {self.fingerprint[:16]} does not match the folder name "
                            f"{self.directory.name} (edited or moved?)")
        recorded = _fingerprint_from_shards(self.directory)
        if recorded is not None and recorded[0] != self.fingerprint:
            problems.append(f"{spec_path}: fingerprint {self.fingerprint[:16]} differs from the one its shards "
                            f"record ({recorded[0][:16]})")
        dims = _shard_dims(self.directory)
        if dims and dims != {self.feature_dim}:
            problems.append(f"{spec_path}: feature_dim {self.feature_dim} but the shards hold "
                            f"{', '.join(map(str, sorted(dims)))}-d features")
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


def _remove_locked(store: FeatureStore) -> None:
    """Delete the store; the caller holds its lock. The lock file goes last, still held: a process
    waiting for it then finds it is no longer the lock at that path and starts a fresh store."""
    for path in sorted(store.directory.iterdir()):
        if path.name == ".lock":
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    (store.directory / ".lock").unlink(missing_ok=True)
    try:
        store.directory.rmdir()
    except OSError:
        pass   # something new appeared in it: leave it


def remove_store(store: FeatureStore) -> None:
    with store.writer(timeout=60):
        _remove_locked(store)


def prune_store(store: FeatureStore, keep) -> int:
    """Drop rows whose keys are not kept; returns how many were dropped.

    `keep` is a set of keys, or a function called under the store's lock that returns it: deciding
    under the same lock as deleting means no row written in between can be dropped."""
    with store.writer(timeout=60):
        before = store.keys()
        kept = keep() if callable(keep) else keep
        dropped = len(before - kept)
        if dropped:
            store._compact(keep=kept)
    return dropped


def gc_store(store: FeatureStore, decide: Callable[[FeatureStore], Optional[set[str]]],
             dry_run: bool = False, timeout: float = 60) -> tuple[bool, int]:
    """(removed whole store?, rows dropped) with the decision taken under the store's lock.

    `decide(store)` runs while the lock is held, so no writer can add rows between it and the
    deletion; it returns None to remove the store, else the set of keys to keep."""
    with store.writer(timeout=timeout):
        keep = decide(store)
        if keep is None:
            if not dry_run:
                _remove_locked(store)
            return True, 0
        before = store.keys()
        dropped = len(before - keep)
        if dropped and not dry_run:
            store._compact(keep=keep)
        return False, dropped
