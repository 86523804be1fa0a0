"""Content hashes of files, remembered by (path, size, mtime) so an unchanged tree is never re-read."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path
from typing import Iterable, Optional

_SCHEMA = "CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, sha256 TEXT)"


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class HashCache:
    """A sqlite table under the cache root; sqlite's own journaling keeps it intact through a kill."""

    def __init__(self, db_path: Optional[Path]):
        self._db: Optional[sqlite3.Connection] = None
        if db_path is not None:
            db_path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(db_path), timeout=60)
            self._db.execute(_SCHEMA)

    def hash_files(self, paths: Iterable[str]) -> dict[str, tuple[str, int]]:
        """Map each readable path to (sha256, size). Unreadable paths map to their OSError text."""
        results: dict[str, tuple[str, int]] = {}
        fresh: list[tuple[str, int, int, str]] = []
        for path in paths:
            try:
                stat = os.stat(path)
            except OSError as error:
                results[path] = (f"error:{error.strerror or error}", -1)
                continue
            known = self._lookup(path, stat.st_size, stat.st_mtime_ns)
            if known is None:
                try:
                    known = file_sha256(path)
                except OSError as error:
                    results[path] = (f"error:{error.strerror or error}", -1)
                    continue
                fresh.append((path, stat.st_size, stat.st_mtime_ns, known))
            results[path] = (known, stat.st_size)
        if fresh and self._db is not None:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?)", fresh)
        return results

    def _lookup(self, path: str, size: int, mtime_ns: int) -> Optional[str]:
        if self._db is None:
            return None
        row = self._db.execute(
            "SELECT sha256 FROM hashes WHERE path = ? AND size = ? AND mtime_ns = ?", (path, size, mtime_ns)
        ).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
