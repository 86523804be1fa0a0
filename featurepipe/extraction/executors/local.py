"""Where extract batches and CV fits run: in this process (the default) or on a Dask cluster.

An Executor turns the planned extract batches (featurepipe.extraction.batches) into outcomes for the driver
to commit, and names the joblib backend CV fits run under. `executor_scope` opens one from the
CLI's --scheduler / --workers / $FEATUREPIPE_SCHEDULER and makes it current, so the stages called
inside (evaluate's own extract, every stage of `run`) use it without growing new parameters.

Another engine (Ray, say) is one more subclass: `map_batches` runs batches.run_batch as its tasks
and yields their outcomes, `cv_backend` returns joblib's backend for that engine, `close` stops
what it started; plus one branch in `open_executor`.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from pathlib import Path
from typing import ContextManager, Iterator, Mapping, Optional, Sequence

import numpy as np

from featurepipe.extraction.batches import Batch, BatchJob, BatchOutcome, decode_item, infer_parts
from featurepipe.core.errors import FeaturepipeError, ImageDecodeError
from featurepipe.data.images import decode_ahead

SCHEDULER_ENV = "FEATUREPIPE_SCHEDULER"


class Executor:
    name = "local"
    workers = 1
    remote = False      # True: batches run in other processes, which publish shards into the stores' incoming/

    def map_batches(self, job: BatchJob, batches: Sequence[Batch], paths: Mapping[str, str]
                    ) -> Iterator[BatchOutcome]:
        """Run every batch; yield each outcome as it completes (any order). Stopping the iteration
        early (an error, Ctrl-C) must cancel what has not run."""
        raise NotImplementedError

    def cv_backend(self, scatter: Optional[list] = None) -> ContextManager:
        """The joblib backend CV fits run under while this executor is current."""
        return nullcontext()

    def close(self) -> None:
        """Stop whatever this executor started."""


class LocalExecutor(Executor):
    """This process: the model built once per call, images decoded in threads ahead of inference."""

    def map_batches(self, job, batches, paths):
        from featurepipe.backbones.accel import auto_batch_size, default_decode_threads, precision_policy
        from featurepipe.backbones.build import build_feature_model, inference_function

        if not batches:
            return
        started = time.perf_counter()
        with precision_policy(job.precision):
            infer = inference_function(build_feature_model(job.spec, Path(job.root)), job.spec.image_size)
        pending = sum(len(batch.items) for batch in batches)
        chunk = job.chunk or auto_batch_size(infer, job.spec.image_size, pending)
        build_seconds = time.perf_counter() - started
        threads = job.decode_threads or default_decode_threads()
        items = ((content_hash, keys) for batch in batches for content_hash, keys in batch.items)

        def decode(item):
            content_hash, keys = item
            return decode_item(paths[content_hash], content_hash, keys, job.spec, job.policy, job.augment_seed)

        ahead = decode_ahead(items, decode, max(2 * chunk, 8), threads)
        try:
            for batch in batches:
                t0 = time.perf_counter()
                decoded: list[tuple[str, np.ndarray]] = []
                failures: dict[str, str] = {}
                for _ in batch.items:
                    (content_hash, _keys), future = next(ahead)
                    try:
                        decoded.extend(future.result())
                    except ImageDecodeError as error:
                        failures[content_hash] = error.reason
                t1 = time.perf_counter()
                originals, views = infer_parts(decoded, infer, chunk)
                yield BatchOutcome(batch.id, originals, views, failures, build_seconds=build_seconds,
                                   decode_seconds=t1 - t0, infer_seconds=time.perf_counter() - t1, chunk=chunk)
                build_seconds = 0.0
        finally:
            ahead.close()        # stops the decode threads when the consumer stops early


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
                  connect_timeout: float = 10.0) -> Executor:
    """--scheduler ADDRESS: an existing Dask cluster; --workers N: a LocalCluster for this run;
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
        return DaskExecutor.local_cluster(workers)
    return DaskExecutor.connect(scheduler, timeout=connect_timeout)


@contextmanager
def executor_scope(scheduler: Optional[str] = None, workers: Optional[int] = None,
                   connect_timeout: float = 10.0) -> Iterator[Executor]:
    """Open an executor, make it current, and close it at the end, also on Ctrl-C or an error."""
    executor = open_executor(scheduler, workers, connect_timeout)
    try:
        with use_executor(executor):
            yield executor
    finally:
        executor.close()
