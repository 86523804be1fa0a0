"""How the frozen base runs on this machine: the batch size on a GPU, and the dtype policy.

Batch size and thread count only change float round-off (tests hold features equal to 1e-5 across
them), so they are chosen per machine. A precision policy other than float32 changes features by
~1e-3 relative, so extract gives it its own store fingerprint (see extraction.features.open_stores) and rows
computed under different policies never mix.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import numpy as np

from featurepipe.core.errors import UsageError

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
CPU_BATCH_SIZE = 32                      # measured: the model's own limit on 2-16 cores is reached by 32
GPU_BATCH_CANDIDATES = (256, 128, 64, 32)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


def gpu_available() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


@contextlib.contextmanager
def precision_policy(precision: str) -> Iterator[None]:
    """Keras' global dtype policy set to `precision` while a model is built; restored afterwards."""
    import keras

    check_precision(precision)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def default_decode_threads() -> int:
    """Decoding threads: one per core up to 4 on a CPU (more steal cycles from TensorFlow's own thread
    pool, which runs the model there); every core when a GPU runs the model and decoding is the CPU's
    only job (camera-sized JPEGs then limit throughput, not the model)."""
    cores = os.cpu_count() or 1
    return cores if gpu_available() else max(1, min(4, cores))


def auto_batch_size(infer: Callable[[np.ndarray], np.ndarray], image_size: int, pending: int) -> int:
    """CPU_BATCH_SIZE on a CPU. On a GPU, the largest of GPU_BATCH_CANDIDATES (no larger than the
    work needs) that runs without exhausting GPU memory, found by running zero images through `infer`."""
    if not gpu_available():
        return CPU_BATCH_SIZE
    import tensorflow as tf

    candidates = [b for b in GPU_BATCH_CANDIDATES if b <= max(CPU_BATCH_SIZE, pending)]
    for batch in candidates:
        try:
            infer(np.zeros((batch, image_size, image_size, 3), np.uint8))
            return batch
        except tf.errors.ResourceExhaustedError:
            continue
    return candidates[-1]
