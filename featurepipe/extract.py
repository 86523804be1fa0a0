"""Stage `extract`: Dataset x BackboneSpec -> FeatureStore, running the frozen base once per image.

Only images whose content hash is missing from the store are decoded and run; each full batch is
committed as its own shard, so a killed run loses at most one batch. Decoding runs in threads
ahead of inference so the model never waits for pixels.
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from featurepipe import refs
from featurepipe.backbones.fingerprint import backbone_fingerprint, views_fingerprint
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.dataset import Dataset
from featurepipe.errors import ImageDecodeError
from featurepipe.hashcache import regular_file_sha256
from featurepipe.images import AugmentPolicy, augment_image, decode_image, view_rng
from featurepipe.paths import cache_root, features_dir
from featurepipe.progress import ProgressCallback, report
from featurepipe.store import FeatureStore


@dataclass
class FailedImage:
    path: str
    reason: str


@dataclass
class ExtractReport:
    backbone: str
    fingerprint: str
    store_dir: str
    feature_dim: int
    images: int                      # unique images (by content) in the dataset
    extracted: int                   # originals run through the base in this call
    reused: int                      # originals already in the store
    failed: list[FailedImage] = field(default_factory=list)
    views_per_image: int = 0
    views_extracted: int = 0
    views_reused: int = 0
    views_fingerprint: Optional[str] = None
    views_store_dir: Optional[str] = None
    seconds: float = 0.0
    build_seconds: float = 0.0       # of `seconds`, spent building the model (0 when nothing was missing)
    waited_seconds: float = 0.0      # of `seconds`, spent waiting for another process's store lock
    warnings: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        """Throughput of decoding + inference, the model's one-off build excluded."""
        running = self.seconds - self.build_seconds
        return self.extracted / running if running > 0 and self.extracted else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["images_per_second"] = round(self.images_per_second, 2)
        return data


@dataclass
class FeatureStores:
    """The stores a spec (and augmentation) maps to, opened without building any model."""
    spec: BackboneSpec
    originals: FeatureStore
    views: Optional[FeatureStore]
    augment: int
    policy: Optional[AugmentPolicy]

    def view_keys(self, content_hash: str) -> list[str]:
        return [view_key(content_hash, k) for k in range(self.augment)]


def view_key(content_hash: str, view_index: int) -> str:
    return f"{content_hash}@{view_index}"


def open_stores(spec: BackboneSpec, root: Path, augment: int = 0, policy: Optional[AugmentPolicy] = None,
                augment_seed: int = 0) -> FeatureStores:
    spec = spec.resolved()
    fingerprint, payload = backbone_fingerprint(spec, root)
    originals = FeatureStore.open(features_dir(root), fingerprint, payload)
    views = None
    if augment > 0:
        policy = policy or AugmentPolicy()
        views_fp, views_payload = views_fingerprint(fingerprint, policy.to_dict(), augment_seed)
        views = FeatureStore.open(features_dir(root), views_fp, {**views_payload, "base_payload": payload})
    return FeatureStores(spec, originals, views, augment if views else 0, policy if views else None)


def extract(
    dataset: Dataset,
    spec: BackboneSpec = BackboneSpec(),
    cache_dir: Optional[str | os.PathLike] = None,
    augment: int = 0,
    augment_policy: Optional[AugmentPolicy] = None,
    augment_seed: int = 0,
    batch_size: int = 32,
    decode_threads: Optional[int] = None,
    lock_timeout: float = 600.0,
    progress: Optional[ProgressCallback] = None,
) -> ExtractReport:
    started = time.perf_counter()
    root = cache_root(cache_dir)
    stores = open_stores(spec, root, augment, augment_policy, augment_seed)
    spec = stores.spec
    first_path = dataset.frame.drop_duplicates("hash").set_index("hash")["path"].to_dict()
    refs.record(root, dataset, [s for s in (stores.originals, stores.views) if s is not None])

    known_failures = remembered_failures(stores.originals)
    todo = _pending(stores, first_path)
    originals_present = len(first_path) - len(stores.originals.missing(first_path))
    views_present = len(first_path) * stores.augment - sum(sum("@" in k for k in keys) for keys in todo.values())
    result = ExtractReport(
        backbone=spec.name, fingerprint=stores.originals.fingerprint, store_dir=str(stores.originals.directory),
        feature_dim=stores.originals.feature_dim or 0, images=len(first_path), extracted=0, reused=0,
        views_per_image=augment,
        views_fingerprint=stores.views.fingerprint if stores.views else None,
        views_store_dir=str(stores.views.directory) if stores.views else None,
    )
    for content_hash in [h for h in todo if h in known_failures]:
        del todo[content_hash]
        result.failed += [FailedImage(p, known_failures[content_hash]) for p in _paths_of(dataset, content_hash)]
    for store in (stores.originals, stores.views):
        if store is not None:
            result.warnings.extend(store.repaired)
    if todo:
        wait_started = time.perf_counter()

        def waiting() -> None:
            report(progress, "extract", 0, len(todo), "waiting for another process writing this store")

        with stores.originals.writer(timeout=lock_timeout, on_wait=waiting) as original_writer:
            if stores.views is not None:
                with stores.views.writer(timeout=lock_timeout, on_wait=waiting) as views_writer:
                    result.waited_seconds = time.perf_counter() - wait_started
                    _run(dataset, stores, first_path, original_writer, views_writer, batch_size,
                         decode_threads, augment_seed, result, progress, root)
            else:
                result.waited_seconds = time.perf_counter() - wait_started
                _run(dataset, stores, first_path, original_writer, None, batch_size,
                     decode_threads, augment_seed, result, progress, root)
        # While we waited for the lock, another process may have written some of these rows (and
        # set the store's dimension): count what is there now, not what was there before.
        stores.originals.refresh()
        originals_present = len(first_path) - len(stores.originals.missing(first_path)) - result.extracted
        if stores.views is not None:
            stores.views.refresh()
            views_present = (len(first_path) * stores.augment - result.views_extracted
                             - len(stores.views.missing(k for h in first_path for k in stores.view_keys(h))))
    result.reused = originals_present
    result.views_reused = views_present
    result.feature_dim = stores.originals.feature_dim or 0
    result.seconds = time.perf_counter() - started
    report(progress, "extract", len(first_path), len(first_path), "done")
    return result


def _paths_of(dataset: Dataset, content_hash: str) -> list[str]:
    return dataset.frame.loc[dataset.frame["hash"] == content_hash, "path"].tolist()


def _pending(stores: FeatureStores, first_path: dict[str, str]) -> dict[str, list[str]]:
    """content hash -> the store keys still missing for it (original and/or views)."""
    missing_originals = set(stores.originals.missing(first_path))
    missing_views = set(stores.views.missing(k for h in first_path for k in stores.view_keys(h))) \
        if stores.views is not None else set()
    todo: dict[str, list[str]] = {}
    for content_hash in first_path:
        keys = [content_hash] if content_hash in missing_originals else []
        keys += [k for k in stores.view_keys(content_hash) if k in missing_views]
        if keys:
            todo[content_hash] = keys
    return todo


def _decode_item(path: str, content_hash: str, keys: list[str], stores: FeatureStores,
                 augment_seed: int) -> list[tuple[str, np.ndarray]]:
    spec = stores.spec
    image = decode_image(path, spec.image_size, spec.resize)
    out = []
    for key in keys:
        if "@" in key:
            view_index = int(key.rsplit("@", 1)[1])
            out.append((key, augment_image(image, stores.policy, view_rng(content_hash, view_index, augment_seed))))
        else:
            out.append((key, image))
    return out


# Reasons decode_image gives for the file system's state rather than the file's bytes: the next run
# may find the file back, readable, or replaced, so they are never remembered.
_IO_REASONS = ("file not found", "permission denied", "cannot access file", "is a directory", "not a regular file")


def remembered_failures(store: FeatureStore) -> dict[str, str]:
    """The store's remembered decode failures, less any I/O failure an older version recorded."""
    return {h: reason for h, reason in store.failures().items() if not str(reason).startswith(_IO_REASONS)}


def failure_is_permanent(path: str, content_hash: str, reason: str) -> bool:
    """Remember a decode failure only when it is a property of the bytes: not an I/O error, and the
    file still holds exactly the bytes that were hashed (else the failure belongs to other bytes)."""
    if reason.startswith(_IO_REASONS):
        return False
    try:
        return regular_file_sha256(path) == content_hash
    except OSError:
        return False


def _run(dataset: Dataset, stores: FeatureStores, first_path: dict[str, str], original_writer,
         views_writer, batch_size: int, decode_threads: Optional[int], augment_seed: int,
         result: ExtractReport, progress: Optional[ProgressCallback], root: Path) -> None:
    from featurepipe.backbones.build import build_feature_model, inference_function

    # Another process may have finished some of this work while we waited for the lock.
    known_failures = remembered_failures(stores.originals)
    todo = {h: keys for h, keys in _pending(stores, first_path).items() if h not in known_failures}
    if not todo:
        return
    report(progress, "extract", 0, len(todo), f"building {stores.spec.name}")
    build_started = time.perf_counter()
    infer = inference_function(build_feature_model(stores.spec, root), stores.spec.image_size)
    result.build_seconds = time.perf_counter() - build_started
    paths_by_hash = dataset.frame.groupby("hash")["path"].apply(list).to_dict()
    # One decode thread per core: more only steal cycles from TensorFlow's own thread pool.
    threads = decode_threads or max(1, min(4, os.cpu_count() or 1))
    lookahead = max(2 * batch_size, 8)
    pending_keys: list[str] = []
    pending_images: list[np.ndarray] = []
    done = 0

    def flush() -> None:
        if not pending_keys:
            return
        features = np.asarray(infer(np.stack(pending_images)), dtype=np.float32)
        originals = [i for i, k in enumerate(pending_keys) if "@" not in k]
        views = [i for i, k in enumerate(pending_keys) if "@" in k]
        original_writer.add([pending_keys[i] for i in originals], features[originals])
        if views:
            views_writer.add([pending_keys[i] for i in views], features[views])
        result.extracted += len(originals)
        result.views_extracted += len(views)
        pending_keys.clear()
        pending_images.clear()

    items = iter(todo.items())
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool:
        queue: deque[tuple[str, list[str], Future]] = deque()

        def refill() -> None:
            while len(queue) < lookahead:
                try:
                    content_hash, keys = next(items)
                except StopIteration:
                    return
                queue.append((content_hash, keys, pool.submit(
                    _decode_item, first_path[content_hash], content_hash, keys, stores, augment_seed)))

        refill()
        while queue:
            content_hash, keys, future = queue.popleft()
            refill()
            try:
                for key, image in future.result():
                    pending_keys.append(key)
                    pending_images.append(image)
            except ImageDecodeError as error:
                if failure_is_permanent(first_path[content_hash], content_hash, error.reason):
                    original_writer.add_failures({content_hash: error.reason})
                for path in paths_by_hash[content_hash]:
                    result.failed.append(FailedImage(path, error.reason))
            done += 1
            if len(pending_keys) >= batch_size:
                flush()
                report(progress, "extract", done, len(todo), "")
        flush()
        report(progress, "extract", done, len(todo), "")
