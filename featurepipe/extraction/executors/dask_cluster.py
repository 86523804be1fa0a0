"""The Dask executor: extract batches as Dask tasks, CV fits through joblib's dask backend.

`DaskExecutor.connect(address)` uses a cluster that already runs (`dask scheduler` + `dask worker`,
Slurm/PBS through dask-jobqueue, Kubernetes, dask-gateway). `DaskExecutor.local_cluster(n)` starts
n worker processes on this machine: bound to 127.0.0.1, spawned rather than forked (TensorFlow is
not fork-safe), one thread and one GPU slot each, each running the caller's `preload` modules
(Dask worker preloads: the CLI's quiet, Ctrl-C-deaf start, cli/worker_start.py) before any task;
`close` shuts them down.

What workers need: featurepipe with the same TensorFlow/Keras/Pillow versions as the driver (they
check, since those are part of the features' fingerprint), and the dataset and the cache directory
at the same paths as the driver (a shared filesystem). Workers build the backbone themselves, once
per process, from the spec and weights on that filesystem; no model is ever pickled.

Workers only publish shards into a store's incoming/ folder; the driver (this process, holding the
store's writer lock) checks and commits them. Run one driver per store: the lock is an flock,
which is not to be trusted across hosts on NFS.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Optional, Sequence

import dask
import distributed
from distributed import Client, LocalCluster, as_completed

from featurepipe.extraction.batches import BatchOutcome, run_batch
from featurepipe.core.errors import FeaturepipeError
from featurepipe.extraction.executors.base import Executor


class _DropSyncCancelBug(logging.Filter):
    """Drops one record: distributed's `sync()` schedules a `cancel` callback when a Ctrl-C lands
    while it waits, and that callback can read its `future` before it is assigned (a NameError in
    distributed/utils.py, seen with distributed 2026.x). Tornado logs it as an ERROR with a traceback
    after featurepipe has already stopped cleanly and said how to resume; nothing else is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, NameError) or error.__traceback__ is None:
            return True
        frame = error.__traceback__
        while frame.tb_next is not None:
            frame = frame.tb_next
        code = frame.tb_frame.f_code
        return not (code.co_name == "cancel" and code.co_filename.replace(os.sep, "/").endswith("distributed/utils.py"))


_SYNC_CANCEL_FILTER = _DropSyncCancelBug()
logging.getLogger("tornado.application").addFilter(_SYNC_CANCEL_FILTER)


def _task(job, batch, paths, tf_threads: int, pin_gpus: bool) -> BatchOutcome:
    """One batch on a worker; the worker's name (0..n-1 in a LocalCluster) picks its GPU."""
    worker = distributed.get_worker()
    slot = worker.name if pin_gpus and isinstance(worker.name, int) else None
    return run_batch(job, batch, paths, gpu_slot=slot, tf_threads=tf_threads, worker=worker.address)


class DaskExecutor(Executor):
    remote = True

    def __init__(self, client: Client, cluster: Optional[LocalCluster] = None, tf_threads: int = 0,
                 pin_gpus: bool = False, config=None):
        self.client = client
        self.cluster = cluster                # only when we started it: then we also stop it
        self.tf_threads = tf_threads
        self.pin_gpus = pin_gpus
        self._config = config

    @classmethod
    def connect(cls, address: str, timeout: float = 10.0) -> "DaskExecutor":
        try:
            client = Client(address, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError) as error:
            raise FeaturepipeError(f"cannot reach the Dask scheduler at {address} ({error}); check the address "
                                   f"(tcp://host:8786) and that `dask scheduler` runs there") from None
        try:
            client.wait_for_workers(1, timeout=timeout)
        except (TimeoutError, OSError):
            client.close()
            raise FeaturepipeError(f"the Dask scheduler at {address} has no workers after {timeout:.0f} s; "
                                   f"start some with `dask worker {address}`") from None
        return cls(client)

    @classmethod
    def local_cluster(cls, n_workers: int, threads_per_worker: int = 1,
                      preload: Sequence[str] = ()) -> "DaskExecutor":
        # Forking a process that may already hold TensorFlow's thread pools deadlocks; spawn instead
        # (dask's default, made certain here for as long as the cluster lives: restarts spawn too).
        config = dask.config.set({"distributed.worker.multiprocessing-method": "spawn"})
        try:
            # No dashboard; the scheduler's small HTTP server (health, metrics) on any free local port:
            # its default 8787 printed a "Port 8787 is already in use" warning whenever it was taken.
            cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                                   host="127.0.0.1", dashboard_address=None, silence_logs=logging.ERROR,
                                   scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                                   preload=list(preload))
        except BaseException:
            config.__exit__(None, None, None)
            raise
        try:
            client = Client(cluster, set_as_default=False)
        except BaseException:
            cluster.close()
            config.__exit__(None, None, None)
            raise
        # Workers share this machine's cores: each TensorFlow gets its share, not all of them.
        tf_threads = max(1, (os.cpu_count() or 1) // n_workers)
        return cls(client, cluster, tf_threads=tf_threads, pin_gpus=True, config=config)

    @property
    def name(self) -> str:
        started = "LocalCluster " if self.cluster is not None else ""
        return f"dask {started}{self.client.scheduler.address} ({self.workers} workers)"

    @property
    def workers(self) -> int:
        return len(self.client.scheduler_info().get("workers", {}))

    def map_batches(self, job, batches, paths):
        # Keys name the stores and the batch: a batch id alone repeats across backbones/augmentations.
        stores = hashlib.sha256(f"{job.originals_incoming}|{job.views_incoming}".encode()).hexdigest()[:12]
        futures = {}
        for batch in batches:
            future = self.client.submit(_task, job, batch, {h: paths[h] for h, _ in batch.items}, self.tf_threads,
                                        self.pin_gpus, key=f"featurepipe-extract-{stores}-{batch.id}", pure=False)
            futures[future] = batch
        try:
            for future in as_completed(futures, loop=self.client.loop):
                try:
                    yield future.result()
                except distributed.KilledWorker as error:
                    raise FeaturepipeError(
                        f"the workers running batch {futures[future].id} kept dying ({error}); "
                        f"a worker may be running out of memory (try a smaller --batch-size); the batches "
                        f"already stored are kept and a re-run only extracts what is missing"
                    ) from None
        finally:
            self.client.cancel([f for f in futures if not f.done()])

    def cv_backend(self, scatter: Optional[list] = None):
        """joblib's dask backend on this client. With `scatter` (e.g. [X, y]) the arrays are sent to
        every worker once up front; without, joblib sends each large argument once per Parallel call."""
        import joblib

        return joblib.parallel_config(backend="dask", client=self.client, scatter=scatter)

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            try:
                if self.cluster is not None:
                    self.cluster.close()
            finally:
                if self._config is not None:
                    self._config.__exit__(None, None, None)
                    self._config = None
