"""The local executor: extract batches in this process, the model built once per call and images
decoded in threads ahead of inference; CV fits under joblib's default backend.

featurepipe.extraction.executors.choose picks it (or the Dask one) and makes it current.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from featurepipe.core.errors import ImageDecodeError
from featurepipe.data.images import decode_ahead
from featurepipe.extraction.batches import BatchOutcome, decode_item, infer_parts
from featurepipe.extraction.executors.base import Executor


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
