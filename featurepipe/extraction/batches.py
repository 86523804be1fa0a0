"""Extract batches: the one plan every executor follows, and what running one batch means.

`plan_batches` cuts the sorted content hashes still missing from the store into fixed batches
whose ids hash their keys. Local and distributed runs on the same store state therefore make the
same batches, name their shards alike ("batch-<id>.h5") and write rows in the same order; a retried
batch can only ever produce a shard of its own name.

`run_batch` is what a (remote) worker does with one batch: decode the images, run the backbone it
built once per process, and publish the shard(s) into the stores' incoming/ folders for the driver
to commit (featurepipe.store.featurestore). It never touches a store's index and never takes its lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from featurepipe.backbones.spec import BackboneSpec
from featurepipe.core.errors import BackboneError, DatasetError, ImageDecodeError, StoreError, UsageError
from featurepipe.data.augment import AugmentPolicy, augment_image, view_rng
from featurepipe.data.images import decode_image
from featurepipe.store.shards import publish_shard


def view_key(content_hash: str, view_index: int) -> str:
    return f"{content_hash}@{view_index}"


def is_view_key(key: str) -> bool:
    return "@" in key


def parse_view_key(key: str) -> tuple[str, Optional[int]]:
    """(content hash, view index) of a store key; the index is None for an original image's key."""
    content_hash, _, index = key.partition("@")
    return content_hash, (int(index) if index else None)


@dataclass(frozen=True)
class Batch:
    id: str                                          # sha256 of its keys (24 hex digits)
    items: tuple[tuple[str, tuple[str, ...]], ...]   # (content hash, its missing store keys), hashes sorted

    @property
    def keys(self) -> list[str]:
        return [key for _, keys in self.items for key in keys]

    @property
    def shard_name(self) -> str:
        """The name of this batch's shard in each store it writes to."""
        return f"batch-{self.id}.h5"


def plan_batches(todo: Mapping[str, Sequence[str]], batch_size: int) -> list[Batch]:
    """Cut content hash -> missing keys into batches of `batch_size` images (hashes), in hash order.

    The order and the ids depend only on what is missing, never on the dataset's file order or on
    which executor runs them, so every executor commits the same shards."""
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, not {batch_size}")
    hashes = sorted(h for h, keys in todo.items() if keys)
    batches = []
    for start in range(0, len(hashes), batch_size):
        items = tuple((h, tuple(todo[h])) for h in hashes[start:start + batch_size])
        digest = hashlib.sha256("\n".join(k for _, keys in items for k in keys).encode()).hexdigest()
        batches.append(Batch(digest[:24], items))
    return batches


@dataclass(frozen=True)
class BatchJob:
    """What every batch of one extract call shares; small, picklable, no model inside."""
    spec: BackboneSpec                    # resolved
    root: str                             # the cache root (converted weights live under it)
    payload: dict                         # the originals store's fingerprint payload, as the driver computed it
    originals_incoming: str               # where workers publish originals shards
    views_incoming: Optional[str]         # ... and views shards (None without augmentation)
    policy: Optional[AugmentPolicy]
    augment_seed: int
    chunk: int                            # images per inference call (the CLI's --batch-size); 0: auto (accel)
    decode_threads: int = 1
    precision: str = "float32"            # Keras dtype policy the base is built under (accel.precision_policy)
    registry_module: Optional[str] = None  # imported on workers that do not know spec.name (a plugin backbone)


@dataclass
class BatchPart:
    """The rows one batch adds to one store: in memory (local) or a published shard file (workers)."""
    keys: list[str]
    features: Optional[np.ndarray] = None
    published: Optional[str] = None


@dataclass
class BatchOutcome:
    batch_id: str
    originals: Optional[BatchPart]
    views: Optional[BatchPart]
    failures: dict[str, str] = field(default_factory=dict)     # content hash -> why it did not decode
    worker: str = "local"
    build_seconds: float = 0.0        # building the model, when this batch was the first on its process
    decode_seconds: float = 0.0
    infer_seconds: float = 0.0
    publish_seconds: float = 0.0
    chunk: int = 0                    # images per inference call that ran


def decode_item(path: str, content_hash: str, keys: Sequence[str], spec: BackboneSpec,
                policy: Optional[AugmentPolicy], augment_seed: int) -> list[tuple[str, np.ndarray]]:
    """The images of one content hash: the original and/or its augmented views, as (key, pixels)."""
    image = decode_image(path, spec.image_size, spec.resize, expect_sha256=content_hash)
    return item_images(image, content_hash, keys, policy, augment_seed)


def item_images(image: np.ndarray, content_hash: str, keys: Sequence[str], policy: Optional[AugmentPolicy],
                augment_seed: int) -> list[tuple[str, np.ndarray]]:
    """(key, pixels) of each of KEYS from the decoded original IMAGE: itself, or an augmented view."""
    out = []
    for key in keys:
        if is_view_key(key):
            view_index = parse_view_key(key)[1]
            out.append((key, augment_image(image, policy, view_rng(content_hash, view_index, augment_seed))))
        else:
            out.append((key, image))
    return out


def infer_parts(decoded: list[tuple[str, np.ndarray]], infer: Callable, chunk: int
                ) -> tuple[Optional[BatchPart], Optional[BatchPart]]:
    """Features of the decoded images, `chunk` at a time, split into originals and views rows."""
    if not decoded:
        return None, None
    keys = [key for key, _ in decoded]
    blocks = [np.asarray(infer(np.stack([image for _, image in decoded[i:i + chunk]])), dtype=np.float32)
              for i in range(0, len(decoded), chunk)]
    features = np.concatenate(blocks)

    def part(rows: list[int]) -> Optional[BatchPart]:
        return BatchPart([keys[i] for i in rows], features[rows]) if rows else None

    return (part([i for i, k in enumerate(keys) if not is_view_key(k)]),
            part([i for i, k in enumerate(keys) if is_view_key(k)]))


# ---- the worker side ----------------------------------------------------------------------------

_MODELS: "OrderedDict[str, Callable]" = OrderedDict()
_MODELS_LOCK = threading.Lock()
_MODELS_KEPT = 2                  # a worker serving two specs in turn keeps both warm, no more
_TF_CONFIGURED = False


def _configure_tensorflow(gpu_slot: Optional[int], tf_threads: int) -> None:
    """Once per process, before TensorFlow touches a device: memory growth on, and optionally one GPU
    per process (slot modulo the GPUs it sees) and a thread budget (workers sharing a machine)."""
    global _TF_CONFIGURED
    if _TF_CONFIGURED:
        return
    import tensorflow as tf

    _TF_CONFIGURED = True
    try:
        if tf_threads > 0:
            tf.config.threading.set_intra_op_parallelism_threads(tf_threads)
            tf.config.threading.set_inter_op_parallelism_threads(min(tf_threads, 2))
        gpus = tf.config.list_physical_devices("GPU")
        if gpu_slot is not None and gpus:
            gpus = [gpus[gpu_slot % len(gpus)]]
            tf.config.set_visible_devices(gpus, "GPU")
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:
        # TensorFlow was already initialised in this process (a worker reused for other work):
        # its device settings can no longer change, and they do not change the numbers.
        pass


def _check_same_backbone(job: BatchJob) -> None:
    """A worker must compute what the driver's fingerprint promises: same weights, same library
    versions. Otherwise its rows would be filed under a fingerprint they do not belong to."""
    from featurepipe.backbones.fingerprint import backbone_fingerprint

    _, payload = backbone_fingerprint(job.spec, None)
    if payload != job.payload:
        differ = sorted(k for k in set(payload) | set(job.payload) if payload.get(k) != job.payload.get(k))
        detail = "; ".join(f"{k}: driver {job.payload.get(k)!r}, worker {payload.get(k)!r}" for k in differ)
        raise BackboneError(
            f"worker {socket.gethostname()} would compute different features than the driver ({detail}); "
            f"install the same versions and weights on every worker"
        )


def _inference(job: BatchJob, gpu_slot: Optional[int], tf_threads: int) -> tuple[Callable, float]:
    """This process's model for the job's spec, built the first time (never shipped pickled)."""
    # The payload identifies the numbers (weights, versions); any cache root gives the same model.
    key = json.dumps([job.spec.to_dict(), job.payload, job.precision], sort_keys=True, default=str)
    with _MODELS_LOCK:
        if key in _MODELS:
            _MODELS.move_to_end(key)
            return _MODELS[key], 0.0
        started = time.perf_counter()
        if job.registry_module:
            from featurepipe.backbones.registry import BACKBONES

            if job.spec.name not in BACKBONES:
                import importlib

                importlib.import_module(job.registry_module)
            if job.spec.name not in BACKBONES:
                raise BackboneError(f"backbone {job.spec.name!r} is registered in {job.registry_module}, which "
                                    f"does not register it on a worker; register it in an importable module")
        if job.spec.weights not in ("imagenet", "random") and not Path(job.spec.weights).expanduser().is_file():
            raise BackboneError(f"weights file {job.spec.weights} does not exist on worker {socket.gethostname()}; "
                                f"workers need the same path (a shared filesystem, or a copy at that path)")
        _configure_tensorflow(gpu_slot, tf_threads)
        _check_same_backbone(job)
        from featurepipe.backbones.accel import precision_policy
        from featurepipe.backbones.build import build_feature_model, inference_function

        with precision_policy(job.precision):
            infer = inference_function(build_feature_model(job.spec, Path(job.root)), job.spec.image_size)
        _MODELS[key] = infer
        while len(_MODELS) > _MODELS_KEPT:
            _MODELS.popitem(last=False)
        return infer, time.perf_counter() - started


def run_batch(job: BatchJob, batch: Batch, paths: Mapping[str, str], gpu_slot: Optional[int] = None,
              tf_threads: int = 0, worker: str = "") -> BatchOutcome:
    """Decode, infer and publish one batch; returns what the driver needs to commit it.

    Safe to run twice (a retry after a lost worker): the shard names are the batch's, and
    publishing never replaces a shard already there."""
    for incoming in (job.originals_incoming, job.views_incoming):
        if incoming is not None and not Path(incoming).is_dir():
            raise StoreError(f"{incoming} does not exist on worker {socket.gethostname()}; workers must see the "
                             f"cache directory at the same path as the driver (a shared filesystem)")
    infer, build_seconds = _inference(job, gpu_slot, tf_threads)
    started = time.perf_counter()
    decoded: list[tuple[str, np.ndarray]] = []
    failures: dict[str, str] = {}

    def decode(item):
        content_hash, keys = item
        if not os.path.exists(paths[content_hash]):
            # Not a decode failure (those are remembered as permanent): this worker cannot see the file.
            raise DatasetError(f"{paths[content_hash]} does not exist on worker {socket.gethostname()}; "
                                    f"workers must see the dataset at the same path as the driver (a shared "
                                    f"filesystem)")
        try:
            return decode_item(paths[content_hash], content_hash, keys, job.spec, job.policy, job.augment_seed)
        except ImageDecodeError as error:
            failures[content_hash] = error.reason
            return []

    if job.decode_threads > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(job.decode_threads, thread_name_prefix="decode") as pool:
            results = list(pool.map(decode, batch.items))
    else:
        results = [decode(item) for item in batch.items]
    for images in results:
        decoded.extend(images)
    decoded_at = time.perf_counter()
    # A worker's batch is one shard's worth of images (32 unless --batch-size): one model call.
    originals, views = infer_parts(decoded, infer, job.chunk or max(1, len(decoded)))
    inferred_at = time.perf_counter()
    for part, incoming in ((originals, job.originals_incoming), (views, job.views_incoming)):
        if part is None:
            continue
        if incoming is None:
            raise StoreError("a batch produced views rows but the job has no views store")
        publish_shard(Path(incoming), batch.shard_name, part.keys, part.features)
        part.published = str(Path(incoming) / batch.shard_name)
        part.features = None          # the driver reads the shard; no need to ship the array back
    return BatchOutcome(batch.id, originals, views, failures, worker=worker or f"{socket.gethostname()}:{os.getpid()}",
                        build_seconds=build_seconds, decode_seconds=decoded_at - started,
                        infer_seconds=inferred_at - decoded_at, publish_seconds=time.perf_counter() - inferred_at)
