"""What an executor is: the seam between extract's planned batches and where they run.

An Executor turns the planned extract batches (featurepipe.extraction.batches) into outcomes for
the driver to commit, and names the joblib backend CV fits run under. The local and Dask executors
both subclass it here, so neither has to import the other; featurepipe.extraction.executors.choose
picks one and makes it current.

Another engine (Ray, say) is one more subclass: `map_batches` runs batches.run_batch as its tasks
and yields their outcomes, `cv_backend` returns joblib's backend for that engine, `close` stops
what it started; plus one branch in `choose.open_executor`.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager, Iterator, Mapping, Optional, Sequence

from featurepipe.extraction.batches import Batch, BatchJob, BatchOutcome


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
