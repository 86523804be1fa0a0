"""Shard files of the feature store: writing one (checksummed, fsynced, published without clobbering),
reading one back against its checksum, and listing what a store directory has committed.

A shard is an HDF5 file with datasets "keys" (n,) UTF-8 strings and "features" (n, d) float32, and
attribute "sha256" = sha256(keys bytes + features bytes). Publishing (a hard link, else a checked
rename) and committing a worker's shard are the two places the package renames a file into place
without featurepipe.core.atomic: a shard must never clobber one of the same name.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from featurepipe.core.atomic import fsync_dir
from featurepipe.core.errors import StoreCorruptError, StoreError, disk_full, is_disk_full

SCHEMA_VERSION = 1
_STRING = h5py.string_dtype("utf-8")


def shard_digest(keys: np.ndarray, features: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update("\n".join(keys.tolist()).encode())
    digest.update(np.ascontiguousarray(features, dtype=np.float32))   # the buffer itself: no bytes copy
    return digest.hexdigest()


# What h5py (and decoding the keys) raises on a damaged file: OSError for most broken structures, KeyError
# for a lost dataset, ValueError (UnicodeDecodeError among them) for keys that are not UTF-8 any more,
# RuntimeError / TypeError / IndexError for metadata that no longer makes sense. Reading a shard is
# only ever one of the small blocks below, so each becomes "this shard is damaged", naming it.
SHARD_READ_ERRORS = (OSError, KeyError, ValueError, RuntimeError, TypeError, IndexError)


def unreadable_shard(path: Path, error: Exception) -> StoreCorruptError:
    if isinstance(error, UnicodeDecodeError):
        why = "a key is not valid UTF-8 any more: damaged bytes"
    else:
        why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return StoreCorruptError(f"{path} is damaged and cannot be read ({why}); run `featurepipe cache verify --repair` "
                             f"to drop it, and its images are re-extracted on the next run")


def read_keys(handle: h5py.File, path: Path, raw: bool = False) -> np.ndarray:
    """The shard's keys, checked to be UTF-8 (str objects, or with `raw` the stored UTF-8 bytes, which is
    what the key index takes). A damaged byte inside a key is a damaged shard, named, not a codec error
    from wherever the key happens to be decoded later."""
    try:
        if not raw:
            return np.asarray(handle["keys"].asstr()[()], dtype=object)
        keys = handle["keys"][()]
        b"".join(keys.tolist()).decode("utf-8")    # one call checks every key
        return keys
    except SHARD_READ_ERRORS as error:
        raise unreadable_shard(path, error) from None


def damaged_shard(path: Path) -> StoreCorruptError:
    return StoreCorruptError(f"{path} does not match its checksum (damaged or edited); run `featurepipe cache verify "
                             f"--repair` to drop it, and its images are re-extracted on the next run")


def committed_shards(directory: Path) -> list[Path]:
    # pathlib's "*" also matches dot-files: skip the ".tmp-*" files of writers in flight or killed.
    return sorted(p for p in (directory / "shards").glob("*.h5") if not p.name.startswith("."))


def fingerprint_from_shards(directory: Path) -> Optional[tuple[str, dict]]:
    """(fingerprint, payload) as recorded in the shards' attributes (shards written since they are)."""
    for shard in committed_shards(directory):
        try:
            with h5py.File(shard, "r") as handle:
                fingerprint = handle.attrs.get("fingerprint")
                payload = handle.attrs.get("payload")
            if isinstance(fingerprint, str) and isinstance(payload, str):
                return fingerprint, json.loads(payload)
        except SHARD_READ_ERRORS:
            continue      # a damaged shard records nothing; verify names it
    return None


def shard_dims(directory: Path) -> set[int]:
    dims = set()
    for shard in committed_shards(directory):
        try:
            with h5py.File(shard, "r") as handle:
                dims.add(int(handle["features"].shape[1]))
        except SHARD_READ_ERRORS:
            continue
    return dims


def shard_keys(path: Path, raw: bool = False) -> np.ndarray:
    """The keys of the shard at PATH (see read_keys); a damaged shard is a StoreCorruptError naming it.
    FileNotFoundError passes: a compaction may have removed the shard since it was listed."""
    try:
        with h5py.File(path, "r") as handle:
            return read_keys(handle, path, raw)
    except FileNotFoundError:
        raise
    except SHARD_READ_ERRORS as error:
        raise unreadable_shard(path, error) from None


def shard_len(path: Path) -> int:
    try:
        with h5py.File(path, "r") as handle:
            return int(handle["keys"].shape[0])
    except SHARD_READ_ERRORS as error:
        raise unreadable_shard(path, error) from None


def read_shard(path: Path, check: bool = True) -> tuple[np.ndarray, np.ndarray]:
    try:
        with h5py.File(path, "r") as handle:
            keys = read_keys(handle, path)
            features = handle["features"][()]
            expected = handle.attrs.get("sha256")
    except SHARD_READ_ERRORS as error:
        raise unreadable_shard(path, error) from None
    if check and expected != shard_digest(keys, features):
        raise damaged_shard(path)
    return keys, features


def check_shard(path: Path, block_rows: int = 256) -> None:
    """read_shard's checksum test, reading the features `block_rows` at a time (the digest is
    over the same bytes in the same order), so a reader never holds a whole 16 MiB shard (nor,
    with 256-row blocks, more than 1.3 MB of it at 1,280-d)."""
    try:
        with h5py.File(path, "r") as handle:
            keys = read_keys(handle, path)
            expected = handle.attrs.get("sha256")
            digest = hashlib.sha256()
            digest.update("\n".join(keys.tolist()).encode())
            dataset = handle["features"]
            for start in range(0, dataset.shape[0], block_rows):
                digest.update(np.ascontiguousarray(dataset[start:start + block_rows], dtype=np.float32))
    except SHARD_READ_ERRORS as error:
        raise unreadable_shard(path, error) from None
    if expected != digest.hexdigest():
        raise damaged_shard(path)


def _write_h5(path: Path, keys: np.ndarray, features: np.ndarray, origin: Optional[tuple[str, dict]] = None) -> None:
    with h5py.File(path, "w") as handle:
        handle.create_dataset("keys", data=keys, dtype=_STRING)
        handle.create_dataset("features", data=features)
        handle.attrs["sha256"] = shard_digest(keys, features)
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
    fsync_dir(directory)
    return published


def move_shard(path: Path, final: Path) -> bool:
    """Move a checked, whole shard (one a worker published) to FINAL; False, and the copy at PATH
    dropped, when a shard of that name is already there (it wins)."""
    if final.exists():
        path.unlink()
        moved = False
    else:
        os.replace(path, final)
        moved = True
    fsync_dir(final.parent)
    return moved
