"""Removing feature stores and the rows nothing uses (`featurepipe cache gc`), always under the
store's writer lock so that no row written meanwhile is dropped."""

from __future__ import annotations

import shutil
from typing import Callable, Optional

from featurepipe.store.featurestore import FeatureStore


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
    deletion; it returns None to remove the store, else the set of keys to keep.

    A dry run only reads: it takes no writer (whose start and end settle incoming/, sweep temporary
    files and compact a store of many shards), so not a byte or an mtime of the cache changes. Its
    answer is what a gc would do at that moment; rows written meanwhile only make the real gc keep more."""
    if dry_run:
        keep = decide(store)
        return (True, 0) if keep is None else (False, len(store.keys() - keep))
    with store.writer(timeout=timeout):
        keep = decide(store)
        if keep is None:
            _remove_locked(store)
            return True, 0
        before = store.keys()
        dropped = len(before - keep)
        if dropped:
            store._compact(keep=keep)
        return False, dropped
