"""Content hashes of files, remembered by (path, size, mtime, ctime, inode) so an unchanged tree is never re-read.

Why ctime and the inode too: `touch -d` (or a tool that restores timestamps) can give a rewritten
file its old size and mtime, but not its old ctime, which the kernel sets on every write; a file
replaced by rename gets a new inode. `extract --rehash` ignores the remembered hashes altogether.

Only regular files are read: a FIFO or a symlink to /dev/zero in a data folder would block or
never end, so such paths get an error (a reason) instead of a hash, like unreadable files.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import sqlite3
import stat as stat_module
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Optional

from featurepipe.core.errors import not_writable, write_failure

_TABLE = "file_hashes"
_SCHEMA = (f"CREATE TABLE IF NOT EXISTS {_TABLE} (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
           f"ctime_ns INTEGER, inode INTEGER, sha256 TEXT)")
_CORRUPT = {11, 26}   # SQLITE_CORRUPT, SQLITE_NOTADB


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def not_regular_reason(mode: int) -> Optional[str]:
    """Why a file of this st_mode is not read (None for a regular file)."""
    if stat_module.S_ISREG(mode):
        return None
    if stat_module.S_ISDIR(mode):
        return "is a folder, not a file"
    kind = ("a FIFO (named pipe)" if stat_module.S_ISFIFO(mode) else
            "a character device" if stat_module.S_ISCHR(mode) else
            "a block device" if stat_module.S_ISBLK(mode) else
            "a socket" if stat_module.S_ISSOCK(mode) else "not a regular file")
    return f"{kind}, not a regular file (reading it could block or never end); skipped"


@contextlib.contextmanager
def _regular_file(path: str | os.PathLike, expected: Optional[os.stat_result] = None) -> Iterator[BinaryIO]:
    """A regular file opened for reading, refusing anything else without blocking: O_NONBLOCK makes
    opening a FIFO return at once, and the check runs on the opened descriptor, so a path swapped for
    a FIFO or a device between stat and open is refused too."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        reason = not_regular_reason(info.st_mode)
        if reason:
            raise OSError(0, reason)
        if expected is not None and (info.st_ino, info.st_dev) != (expected.st_ino, expected.st_dev):
            raise OSError(0, "the file was replaced while it was being read; run again")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            yield handle
    finally:
        os.close(fd)


def regular_file_sha256(path: str | os.PathLike, expected: Optional[os.stat_result] = None) -> str:
    """sha256 of a regular file (anything else refused without blocking, see _regular_file)."""
    with _regular_file(path, expected) as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def read_regular_file(path: str | os.PathLike, limit: int) -> bytes:
    """The whole content of a regular file, in one read, so that what is hashed and what is decoded
    are the same bytes. OSError for anything but a regular file, and for one over `limit` bytes."""
    with _regular_file(path) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit:,} bytes")
    return data


def path_key(path: str) -> str:
    """The path as text sqlite, JSON and terminals accept. A name that is not valid UTF-8 arrives from
    os.walk with surrogate escapes, which no encoder takes; its undecodable bytes become \\xNN."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class HashCache:
    """A sqlite table under the cache root; sqlite's own journaling keeps it intact through a kill.

    It is only a cache: a damaged file is deleted and rebuilt (said in `warnings`), and a write that
    fails for lack of space or permission (a full disk, a read-only cache root), creating the table
    included, is skipped and said once in `warnings` (the hashes are still right, just not remembered)."""

    def __init__(self, db_path: Optional[Path], rehash: bool = False):
        self._db: Optional[sqlite3.Connection] = None
        self._path = Path(db_path) if db_path is not None else None
        self.rehash = rehash
        self.warnings: list[str] = []
        if self._path is not None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._connect()
            except sqlite3.DatabaseError as error:
                if not self._unwritable(error):
                    self._recover(error)

    def _connect(self) -> None:
        self._db = sqlite3.connect(str(self._path), timeout=60)
        with self._db:
            # The first schema keyed by (path, size, mtime) only; its rows cannot be trusted under the new rule.
            self._db.execute("DROP TABLE IF EXISTS hashes")
            self._db.execute(_SCHEMA)

    def _unwritable(self, error: sqlite3.DatabaseError) -> bool:
        """A full disk or a read-only cache root (creating the table, or remembering hashes): the hashes
        are still right, only not remembered, so hashing goes on without the table and says so once."""
        failure = write_failure(error, self._path)
        if failure is None and "unable to open database file" in str(error) and not os.access(self._path.parent, os.W_OK):
            failure = not_writable(error, self._path.parent)     # sqlite cannot create the file in a read-only folder
        if failure is None:
            return False
        if self._db is not None:
            self._db.close()
            self._db = None
        self.warnings.append(f"file hashes are not remembered this time (computed again next time): {failure}")
        return True

    def _recover(self, error: sqlite3.DatabaseError) -> None:
        if getattr(error, "sqlite_errorcode", None) not in _CORRUPT and type(error) is not sqlite3.DatabaseError:
            raise error   # "database is locked" and friends are not damage
        if self._db is not None:
            self._db.close()
            self._db = None
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(f"{self._path}{suffix}").unlink(missing_ok=True)
        self.warnings.append(f"the hash cache {self._path} was damaged ({error}); it was deleted and is rebuilt "
                             f"(files are hashed again once)")
        try:
            self._connect()
        except sqlite3.DatabaseError as again:
            self._db = None
            self.warnings.append(f"the hash cache {self._path} cannot be recreated ({again}); hashing without it")

    def hash_files(self, paths: Iterable[str]) -> dict[str, tuple[str, int]]:
        """Map each readable regular file to (sha256, size); any other path to ("error:<reason>", -1)."""
        results: dict[str, tuple[str, int]] = {}
        fresh: list[tuple[str, int, int, int, int, str]] = []
        for path in paths:
            try:
                info = os.stat(path)
            except OSError as error:
                results[path] = (f"error:{error.strerror or error}", -1)
                continue
            reason = not_regular_reason(info.st_mode)
            if reason:
                results[path] = (f"error:{reason}", -1)
                continue
            key = (path_key(path), info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)
            known = None if self.rehash else self._lookup(key)
            if known is None:
                try:
                    known = regular_file_sha256(path, info)
                except OSError as error:
                    results[path] = (f"error:{error.strerror or error}", -1)
                    continue
                fresh.append((*key, known))
            results[path] = (known, info.st_size)
        if fresh:
            self._store(fresh)
        return results

    def _lookup(self, key: tuple) -> Optional[str]:
        if self._db is None:
            return None
        try:
            row = self._db.execute(
                f"SELECT sha256 FROM {_TABLE} WHERE path = ? AND size = ? AND mtime_ns = ? AND ctime_ns = ? "
                f"AND inode = ?", key).fetchone()
        except sqlite3.DatabaseError as error:
            self._recover(error)
            return None
        return row[0] if row else None

    def _store(self, rows: list[tuple]) -> None:
        if self._db is None:
            return
        try:
            with self._db:
                self._db.executemany(f"INSERT OR REPLACE INTO {_TABLE} VALUES (?, ?, ?, ?, ?, ?)", rows)
        except sqlite3.DatabaseError as error:
            if self._unwritable(error):
                return
            self._recover(error)
            if self._db is not None:
                self._store(rows)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
