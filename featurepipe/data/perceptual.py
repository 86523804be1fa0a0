"""Perceptual hashes of a dataset's images, computed once per content hash and kept in the cache.

The hash itself is `phash.perceptual_hash` (decoding through data.images); this module only
remembers it in a small table of the cache's hashes.sqlite, keyed by content hash, so a second
`inspect` or `evaluate` decodes nothing. A file that fails to decode is remembered with its
reason and gets no hash (it appears in no analysis).
"""

from __future__ import annotations

import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from featurepipe.core.errors import ImageDecodeError, not_writable, writing_to
from featurepipe.data.images import is_transient
from featurepipe.data.phash import perceptual_hash
from featurepipe.core.cachedirs import hash_db
from featurepipe.core.progress import ProgressCallback, report

# Bump when perceptual_hash changes what it computes (the hash, the crops): old rows are then ignored.
PHASH_VERSION = 4    # 3: + the 16 off-centre trims; 4: a flat image gets no hash
_SCHEMA = ("CREATE TABLE IF NOT EXISTS phashes (sha256 TEXT, version INTEGER, phash TEXT, error TEXT, "
           "PRIMARY KEY (sha256, version))")


@dataclass
class PerceptualHashes:
    hashes: dict[str, tuple[int, ...]]                      # content hash -> pHash of the image, its 90%/80% crop, its trims; () = flat image, no hash
    failed: dict[str, str] = field(default_factory=dict)    # content hash -> why it could not be decoded
    computed: int = 0                                       # decoded in this call (the rest came from the cache)


def _compute(item: tuple[str, str]) -> tuple[Optional[tuple[int, ...]], Optional[str]]:
    digest, path = item
    try:
        # Only the bytes the scan hashed: the result is remembered under their content hash.
        return perceptual_hash(path, expect_sha256=digest), None
    except ImageDecodeError as error:
        return None, error.reason


def _open(db_path: Path) -> sqlite3.Connection:
    """The table, created if need be; a full disk or a read-only cache root is one line naming the file
    (DiskFullError / NotWritableError from core.errors), not a sqlite traceback."""
    try:
        db = sqlite3.connect(str(db_path), timeout=60)
    except sqlite3.OperationalError as error:
        if not os.access(db_path.parent, os.W_OK):
            raise not_writable(error, db_path.parent) from None   # sqlite cannot create it in a read-only folder
        raise
    try:
        with writing_to(db_path):
            db.execute(_SCHEMA)
    except BaseException:
        db.close()
        raise
    return db


def perceptual_hashes(paths_by_hash: Mapping[str, str], cache_root: Optional[Path] = None,
                      threads: Optional[int] = None, progress: Optional[ProgressCallback] = None) -> PerceptualHashes:
    """pHash of one file per content hash; cached in CACHE/hashes.sqlite when `cache_root` is given."""
    result = PerceptualHashes({})
    db = None
    if cache_root is not None:
        db_path = hash_db(cache_root)
        Path(cache_root).mkdir(parents=True, exist_ok=True)
        db = _open(db_path)
    try:
        todo = dict(paths_by_hash)
        if db is not None and todo:
            keys = list(todo)
            for start in range(0, len(keys), 500):     # sqlite caps the number of bound parameters
                chunk = keys[start:start + 500]
                rows = db.execute(f"SELECT sha256, phash, error FROM phashes WHERE version = ? AND sha256 IN "
                                  f"({','.join('?' * len(chunk))})", [PHASH_VERSION, *chunk]).fetchall()
                for digest, phash, error in rows:
                    if phash is None and is_transient(error or ""):
                        continue     # an older version remembered a missing or rewritten file: ask again
                    if phash is not None:
                        result.hashes[digest] = tuple(int(h, 16) for h in phash.split(",") if h)   # "": flat
                    else:
                        result.failed[digest] = error or "cannot be decoded"
                    todo.pop(digest, None)
        if todo:
            report(progress, "phash", 0, len(todo), "perceptual hashes")
            workers = threads or max(1, min(4, os.cpu_count() or 1))
            items = list(todo.items())
            fresh = []
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="phash") as pool:
                for n, ((digest, _), (phash, error)) in enumerate(
                        zip(items, pool.map(_compute, items)), 1):
                    if phash is not None:
                        result.hashes[digest] = phash
                    else:
                        result.failed[digest] = error
                    if phash is not None or not is_transient(error):   # a missing or rewritten file: ask again next time
                        fresh.append((digest, PHASH_VERSION, None if phash is None else ",".join(f"{h:016x}" for h in phash), error))
                    if n % 64 == 0:
                        report(progress, "phash", n, len(items), "")
            result.computed = len(items)
            if db is not None:
                with writing_to(db_path), db:
                    db.executemany("INSERT OR REPLACE INTO phashes VALUES (?, ?, ?, ?)", fresh)
            report(progress, "phash", len(items), len(items), "done")
    finally:
        if db is not None:
            db.close()
    return result
