"""Whole-or-nothing file writes: write a temporary sibling, fsync it, rename it over the target,
fsync the folder. A process killed at any moment leaves either the old file or the new one, never
a truncated or empty one, and at most a `.tmp-*` sibling that readers ignore.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from featurepipe.core.errors import disk_full, is_disk_full


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


TMP_PREFIX = ".tmp-"     # readers skip these names; cleaners remove them


def temp_sibling(path: Path) -> Path:
    """A hidden name next to `path` (same file system, so the rename is atomic); keeps the suffix,
    which some writers (Keras: `.keras`) insist on."""
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{path.name}")


@contextmanager
def atomic_path(path: str | os.PathLike, tmp: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a temporary path to write `path` through; on success it is fsynced and renamed into place,
    on any failure (or a kill) the target is untouched and the temporary file removed. `tmp` names
    the temporary file when a writer needs its own scheme (it must be a sibling of `path`)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "is a folder; expected a file name", str(path))
    tmp = temp_sibling(path) if tmp is None else Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as error:
        if is_disk_full(error):
            raise disk_full(error, path) from None
        raise
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data, **dump_options) -> None:
    options = {"indent": 2, "sort_keys": True, "default": str, **dump_options}
    write_text(path, json.dumps(data, **options))


def write_csv(path: str | os.PathLike, frame, **to_csv_options) -> None:
    """A pandas DataFrame as CSV, atomically (a killed run never leaves a 0-byte leaderboard.csv)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, **{"index": False, **to_csv_options})


def copy_file(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """A copy of `source` at `target`, whole or not at all."""
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move the finished folder `tmp` (a sibling of `final`) into place, replacing `final` (a folder
    this program wrote earlier), then fsync the parent. A kill between the removal and the rename
    leaves no `final` (never a half one): readers then rebuild it."""
    tmp, final = Path(tmp), Path(final)
    for path in sorted(tmp.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    if final.is_dir() and not final.is_symlink():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
