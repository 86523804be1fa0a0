"""The feature store's writer lock: an exclusive flock on <store>/.lock.

An flock is not to be trusted across hosts on NFS: a store must have ONE driver at a time, and
distributed workers never take the lock (see featurepipe.store.featurestore).
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from featurepipe.core.errors import StoreLockedError


@contextmanager
def store_lock(directory: Path, timeout: float, on_wait: Optional[Callable[[], None]]) -> Iterator[None]:
    """Hold the flock on DIRECTORY/.lock for the block (StoreLockedError after `timeout` seconds)."""
    handle = _lock(directory, timeout, on_wait)
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _lock(directory: Path, timeout: float, on_wait: Optional[Callable[[], None]]):
    """An open handle on .lock holding its flock. The lock file itself may be deleted by a gc that
    removes the store while we wait; then the lock we got is on a file no one else sees, so we
    check it is still the one at the path and start over if not."""
    deadline = time.monotonic() + timeout
    waited = False
    while True:
        directory.mkdir(parents=True, exist_ok=True)
        handle = open(directory / ".lock", "a+")
        try:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise StoreLockedError(
                            f"another featurepipe process is writing to {directory}; wait for it to "
                            f"finish (or pass a longer --lock-timeout) and run again") from None
                    if not waited and on_wait is not None:
                        on_wait()
                    waited = True
                    time.sleep(0.2)
            held = os.fstat(handle.fileno())
            try:
                current = os.stat(directory / ".lock")
            except FileNotFoundError:
                current = None
            if current is not None and (current.st_ino, current.st_dev) == (held.st_ino, held.st_dev):
                return handle
        except BaseException:
            handle.close()
            raise
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
