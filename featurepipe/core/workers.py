"""Worker processes that exit with their parent.

joblib's loky workers are separate processes kept for reuse; when the parent is killed (kill -9,
OOM killer, a closed terminal) nothing tells them, and each keeps its memory (hundreds of MB with
a feature table) until its task ends and its idle timeout (300 s) passes. An initializer in each
worker starts a watchdog thread that ends the worker as soon as its parent is gone.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator

POLL_SECONDS = 0.5
IDLE_SECONDS = 60        # idle workers also go sooner than loky's 300 s: they hold the table's memory


def _exit_when_orphaned(parent: int) -> None:
    while True:
        # Re-parented (to init or a subreaper) means the process that started us is gone.
        if os.getppid() != parent:
            os._exit(0)
        time.sleep(POLL_SECONDS)


def watch_parent() -> None:
    """loky worker initializer: start the watchdog (a daemon thread: it never delays a normal exit)."""
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), name="featurepipe-parent-watch",
                     daemon=True).start()


@contextmanager
def workers_exit_with_parent() -> Iterator[None]:
    """Around the creation of a joblib Parallel: its loky workers run `watch_parent`. Leaves any
    other backend the caller chose (threads, dask, sequential) alone."""
    from joblib import parallel_config
    from joblib._parallel_backends import LokyBackend
    from joblib.parallel import get_active_backend

    backend, _ = get_active_backend()
    if type(backend) is not LokyBackend:
        yield
        return
    with parallel_config(backend="loky", initializer=watch_parent, idle_worker_timeout=IDLE_SECONDS):
        yield
