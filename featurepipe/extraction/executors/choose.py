"""Which executor runs extract batches and CV fits: this process (the default) or a Dask cluster.

`executor_scope` opens one from the CLI's --scheduler / --workers / $FEATUREPIPE_SCHEDULER and
makes it current, so the stages called inside (evaluate's own extract, every stage of `run`) use
it without growing new parameters. This module is the only one that knows both executors: the
local one and the Dask one (imported only when asked for, since Dask is an optional extra) do not
import each other.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Optional, Sequence

from featurepipe.core.errors import FeaturepipeError
from featurepipe.extraction.executors.base import Executor
from featurepipe.extraction.executors.local import LocalExecutor

SCHEDULER_ENV = "FEATUREPIPE_SCHEDULER"

_CURRENT: ContextVar[Optional[Executor]] = ContextVar("featurepipe_executor", default=None)


def current_executor() -> Executor:
    """The executor of the innermost `use_executor` / `executor_scope`, else a local one."""
    return _CURRENT.get() or LocalExecutor()


@contextmanager
def use_executor(executor: Executor) -> Iterator[Executor]:
    """Make EXECUTOR current: extract sends its batches there, joblib (CV fits) its tasks."""
    token = _CURRENT.set(executor)
    try:
        with executor.cv_backend():
            yield executor
    finally:
        _CURRENT.reset(token)


def open_executor(scheduler: Optional[str] = None, workers: Optional[int] = None,
                  connect_timeout: float = 10.0, preload: Sequence[str] = ()) -> Executor:
    """--scheduler ADDRESS: an existing Dask cluster; --workers N: a LocalCluster for this run, whose
    workers run the `preload` modules first (Dask worker preloads: a module with `dask_setup(worker)`);
    neither: $FEATUREPIPE_SCHEDULER if set, else this process. The caller closes it."""
    if scheduler and workers:
        raise FeaturepipeError("--scheduler and --workers exclude each other: --scheduler uses an existing "
                               "cluster, --workers starts one on this machine")
    if workers is not None and workers < 1:
        raise FeaturepipeError(f"--workers must be at least 1, not {workers}")
    if not workers:
        scheduler = scheduler or os.environ.get(SCHEDULER_ENV) or None
    if not scheduler and not workers:
        return LocalExecutor()
    try:
        from featurepipe.extraction.executors.dask_cluster import DaskExecutor
    except ImportError as error:
        raise FeaturepipeError(f"running on Dask needs the dask extra ({error}); install it with "
                               f"pip install 'featurepipe[dask]'") from None
    if workers:
        return DaskExecutor.local_cluster(workers, preload=preload)
    return DaskExecutor.connect(scheduler, timeout=connect_timeout)


@contextmanager
def executor_scope(scheduler: Optional[str] = None, workers: Optional[int] = None,
                   connect_timeout: float = 10.0, preload: Sequence[str] = ()) -> Iterator[Executor]:
    """Open an executor, make it current, and close it at the end, also on Ctrl-C or an error."""
    executor = open_executor(scheduler, workers, connect_timeout, preload)
    try:
        with use_executor(executor):
            yield executor
    finally:
        executor.close()
