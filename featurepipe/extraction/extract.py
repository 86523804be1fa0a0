"""Stage `extract`: Dataset x BackboneSpec -> FeatureStore, running the frozen base once per image.

Only images whose content hash is missing from the store are decoded and run; the missing hashes are
cut into batches (featurepipe.extraction.batches.plan_batches) and each batch is committed as its own shard,
so a killed run loses at most the batches in flight. Batches run on an executor: this process by
default, where decoding runs in threads ahead of inference so the model never waits for pixels, or
a Dask cluster (featurepipe.extraction.executors.choose picks one).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd

from featurepipe.core import columns

from featurepipe.store import refs
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.extraction.batches import Batch, BatchJob, BatchOutcome, is_view_key, plan_batches
from featurepipe.data.dataset import Dataset
from featurepipe.extraction.executors.base import Executor
from featurepipe.extraction.executors.choose import current_executor
# FeatureStores/open_stores live in features.py (reading the stores needs no extraction); imported
# here too because extract fills exactly those stores, and callers open them through either module.
from featurepipe.extraction.features import FeatureStores, open_stores  # noqa: F401
from featurepipe.data.augment import AugmentSpec
from featurepipe.data.images import is_transient
from featurepipe.core.cachedirs import cache_root
from featurepipe.core.errors import writing_to
from featurepipe.core.progress import ProgressCallback, report
from featurepipe.store.featurestore import FeatureStore


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
    reused: int                      # originals already in the store (copied ones included)
    failed: list[FailedImage] = field(default_factory=list)
    views_per_image: int = 0
    views_extracted: int = 0
    views_reused: int = 0
    views_fingerprint: Optional[str] = None
    views_store_dir: Optional[str] = None
    seconds: float = 0.0
    build_seconds: float = 0.0       # of `seconds`, spent building the model (0 when nothing was missing)
    executor: str = "local"          # the executor this call used (featurepipe.extraction.executors.choose)
    batch_size: int = 0              # images per model call (auto-chosen unless given; 0: no model ran)
    precision: str = "float32"       # Keras dtype policy the base ran under
    waited_seconds: float = 0.0      # of `seconds`, spent waiting for another process's store lock
    copied: int = 0                  # square images' originals copied from another resize policy's store
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


def extract(
    dataset: Dataset,
    spec: BackboneSpec = BackboneSpec(),
    cache_dir: Optional[str | os.PathLike] = None,
    augment: AugmentSpec | int = 0,
    batch_size: Optional[int] = None,
    decode_threads: Optional[int] = None,
    lock_timeout: float = 600.0,
    progress: Optional[ProgressCallback] = None,
    executor: Optional[Executor] = None,
    precision: str = "float32",
) -> ExtractReport:
    """Extract what is missing; batches run on EXECUTOR (default: the current one, see
    featurepipe.extraction.executors.choose), and only this process commits them to the store.
    batch_size None: 32 on a CPU, the largest of 256/128/64/32 that fits on a GPU (see accel).
    precision: a Keras dtype policy ("mixed_float16" is ~2x faster on recent GPUs), stored apart.
    A full disk or a read-only cache root is one line naming the file (core.errors.writing_to); the
    batches committed before it stay."""
    root = cache_root(cache_dir)
    with writing_to(root):
        return _extract(dataset, spec, root, augment, batch_size, decode_threads, lock_timeout, progress, executor,
                        precision)


def _extract(dataset: Dataset, spec: BackboneSpec, root: Path, augment: AugmentSpec | int,
             batch_size: Optional[int], decode_threads: Optional[int], lock_timeout: float,
             progress: Optional[ProgressCallback], executor: Optional[Executor], precision: str) -> ExtractReport:
    started = time.perf_counter()
    executor = executor or current_executor()
    stores, images, todo, result = prepare(dataset, spec, root, augment, precision, executor.name)
    if todo:
        wait_started = time.perf_counter()

        def waiting() -> None:
            report(progress, "extract", 0, len(todo), "waiting for another process writing this store")

        with stores.originals.writer(timeout=lock_timeout, on_wait=waiting) as original_writer:
            if stores.views is not None:
                with stores.views.writer(timeout=lock_timeout, on_wait=waiting) as views_writer:
                    result.waited_seconds = time.perf_counter() - wait_started
                    _run(dataset, stores, images, original_writer, views_writer, batch_size,
                         decode_threads, result, progress, root, executor)
            else:
                result.waited_seconds = time.perf_counter() - wait_started
                _run(dataset, stores, images, original_writer, None, batch_size,
                     decode_threads, result, progress, root, executor)
        recount(stores, images, result)
    result.seconds = time.perf_counter() - started
    report(progress, "extract", len(images), len(images), "done")
    return result


def prepare(dataset: Dataset, spec: BackboneSpec, root: Path, augment: AugmentSpec | int, precision: str,
            executor_name: str) -> tuple[FeatureStores, pd.DataFrame, dict[str, list[str]], ExtractReport]:
    """Open SPEC's stores (recording DATASET's use of them) and say what is missing: (the stores, the
    unique images, content hash -> its missing keys less remembered failures, the report so far with
    those failures and the rows already there). Read without the store lock: `_run` looks again
    under it."""
    augment = AugmentSpec.of(augment)   # count, policy and seed of the views (a bare int: the count)
    stores = open_stores(spec, root, augment, precision)
    spec = stores.spec
    images = unique_images(dataset.frame)
    refs.record(root, dataset, [s for s in (stores.originals, stores.views) if s is not None])

    known_failures = remembered_failures(stores.originals)
    todo = _pending(stores, images["hash"])
    result = ExtractReport(
        backbone=spec.name, fingerprint=stores.originals.fingerprint, store_dir=str(stores.originals.directory),
        feature_dim=stores.originals.feature_dim or 0, images=len(images), extracted=0,
        reused=len(images) - sum(h in keys for h, keys in todo.items()),
        views_per_image=augment.count, executor=executor_name,
        views_fingerprint=stores.views.fingerprint if stores.views else None,
        views_store_dir=str(stores.views.directory) if stores.views else None, precision=precision,
        views_reused=len(images) * stores.augment - sum(sum(is_view_key(k) for k in keys) for keys in todo.values()),
    )
    for content_hash in [h for h in todo if h in known_failures]:
        del todo[content_hash]
        result.failed += [FailedImage(p, known_failures[content_hash]) for p in _paths_of(dataset, content_hash)]
    for store in (stores.originals, stores.views):
        if store is not None:
            result.warnings.extend(store.repaired)
    return stores, images, todo, result


def recount(stores: FeatureStores, images: pd.DataFrame, result: ExtractReport) -> None:
    """The rows RESULT reused, counted after the writing: while we waited for the lock, another process
    may have written some of them (and set the store's dimension), so count what is there now."""
    stores.originals.refresh()
    result.reused = int(stores.originals.has(columns.each(images["hash"])).sum()) - result.extracted
    if stores.views is not None:
        stores.views.refresh()
        result.views_reused = (int(stores.views.has(_view_keys(stores, images["hash"])).sum())
                               - result.views_extracted)
    result.feature_dim = stores.originals.feature_dim or 0


def _paths_of(dataset: Dataset, content_hash: str) -> list[str]:
    return dataset.frame.loc[dataset.frame["hash"] == content_hash, "path"].tolist()


def unique_images(frame: pd.DataFrame) -> pd.DataFrame:
    """hash and path of each content hash's first row, in dataset order (duplicates share one row).

    A table, not a dict: a hash -> path dict of 70,000 images cost ~18 MB of Python objects, kept
    through a run that finds everything cached."""
    repeat = columns.duplicated(frame["hash"])
    images = frame[["hash", "path"]]
    return images[~repeat].reset_index(drop=True) if repeat.any() else images


def _view_keys(stores: FeatureStores, hashes: pd.Series):
    return (key for content_hash in columns.each(hashes) for key in stores.view_keys(content_hash))


def _pending(stores: FeatureStores, hashes: pd.Series) -> dict[str, list[str]]:
    """content hash -> the store keys still missing for it (original and/or views), in `hashes`'
    order; looked up a key at a time in the store's index (no set of every key, no list of hashes)."""
    lacking = ~stores.originals.has(columns.each(hashes))
    views_lacking = None
    if stores.views is not None:
        views_lacking = ~stores.views.has(_view_keys(stores, hashes)).reshape(len(hashes), stores.augment)
    wanted = lacking if views_lacking is None else lacking | views_lacking.any(axis=1)
    todo: dict[str, list[str]] = {}
    if not wanted.any():
        return todo
    for row, content_hash in enumerate(columns.each(hashes)):
        if wanted[row]:
            keys = [content_hash] if lacking[row] else []
            if views_lacking is not None:
                keys += [k for k, absent in zip(stores.view_keys(content_hash), views_lacking[row]) if absent]
            todo[content_hash] = keys
    return todo


def _first_paths(images: pd.DataFrame, hashes) -> dict[str, str]:
    """content hash -> its first path, for `hashes` only (those still to extract)."""
    return {h: p for h, p in zip(columns.each(images["hash"]), columns.each(images["path"])) if h in hashes}


def remembered_failures(store: FeatureStore) -> dict[str, str]:
    """The store's remembered decode failures, less any transient one an older version recorded."""
    return {h: reason for h, reason in store.failures().items() if not is_transient(reason)}


def missing_now(stores: FeatureStores, images: pd.DataFrame) -> dict[str, list[str]]:
    """content hash -> missing keys, less remembered failures, looked up again under the store lock:
    another process may have finished some of the work while we waited for it."""
    known_failures = remembered_failures(stores.originals)
    return {h: keys for h, keys in _pending(stores, images["hash"]).items() if h not in known_failures}


def _run(dataset: Dataset, stores: FeatureStores, images: pd.DataFrame, original_writer,
         views_writer, batch_size: int, decode_threads: Optional[int],
         result: ExtractReport, progress: Optional[ProgressCallback], root: Path, executor: Executor) -> None:
    todo = missing_now(stores, images)
    if not todo:
        return
    first_path = _first_paths(images, todo)
    _copy_square_images(stores, todo, first_path, original_writer, result, progress, root)
    if not todo:
        return
    # Shards (the batches) hold a fixed number of images so that local and distributed runs agree;
    # how many go through the model at once (chunk) is the executor's to choose when not given.
    batches = {batch.id: batch for batch in plan_batches(todo, batch_size or PLAN_BATCH)}
    for store in (stores.originals, stores.views):
        if store is not None and executor.remote:
            store.incoming.mkdir(exist_ok=True)
    spec = stores.spec
    job = BatchJob(
        spec=spec, root=str(root), payload=stores.originals.payload,
        originals_incoming=str(stores.originals.incoming),
        views_incoming=str(stores.views.incoming) if stores.views is not None else None,
        policy=stores.policy, augment_seed=stores.seed, chunk=batch_size or 0, decode_threads=decode_threads or 0,
        precision=result.precision,
        registry_module=_registry_module(spec.name),
    )
    paths_by_hash = dataset.frame.groupby("hash")["path"].apply(list).to_dict()
    report(progress, "extract", 0, len(todo), f"{len(batches)} batches on {executor.name}" if executor.remote
           else f"building {spec.name}")
    done = 0
    for outcome in executor.map_batches(job, list(batches.values()), {h: first_path[h] for h in todo}):
        batch = batches[outcome.batch_id]
        commit_outcome(outcome, batch, original_writer, views_writer, result, paths_by_hash)
        done += len(batch.items)
        report(progress, "extract", done, len(todo), "")


def commit_outcome(outcome: BatchOutcome, batch: Batch, original_writer, views_writer, result: ExtractReport,
                   paths_by_hash: dict[str, list[str]]) -> None:
    """Commit one batch's rows (as the batch's shard) and permanent failures; count them in RESULT."""
    for part, writer in ((outcome.originals, original_writer), (outcome.views, views_writer)):
        if part is None:
            continue
        if part.published is not None:
            writer.commit_published(Path(part.published), part.keys)
        else:
            writer.add(part.keys, part.features, name=batch.shard_name)
    if outcome.failures:
        permanent = {h: reason for h, reason in outcome.failures.items()
                     if not is_transient(reason)}
        if permanent:
            original_writer.add_failures(permanent)
        for content_hash, reason in outcome.failures.items():
            result.failed += [FailedImage(path, reason) for path in paths_by_hash[content_hash]]
    result.extracted += len(outcome.originals.keys) if outcome.originals else 0
    result.views_extracted += len(outcome.views.keys) if outcome.views else 0
    # Workers build in parallel: the longest build is what the run waited for.
    result.build_seconds = max(result.build_seconds, outcome.build_seconds)
    result.batch_size = outcome.chunk or result.batch_size


COPY_ROWS = 1024   # rows copied from another policy's store per shard


def _copy_square_images(stores: FeatureStores, todo: dict[str, list[str]], first_path: dict[str, str],
                        original_writer, result: ExtractReport, progress: Optional[ProgressCallback],
                        root: Path) -> None:
    """Fill square images' originals from the same backbone's store under another resize policy,
    taking them out of `todo`: squash, center_crop and letterbox give a square image the same pixels,
    so `run`'s three policies cost one extraction on square photos (augmented views are drawn per
    policy and are always computed). A header that cannot be read leaves the image to extraction,
    which reports it."""
    from featurepipe.extraction.features import other_policy_stores

    wanted = [h for h, keys in todo.items() if h in keys]
    if not wanted:
        return
    others = other_policy_stores(stores.spec, root, result.precision)
    if not others:
        return
    square = [h for h in wanted if is_square(first_path[h])]
    for other in others:
        if not square:
            break
        found = other.has(square)
        there = [h for h, present in zip(square, found) if present]
        copy_originals(original_writer, other, there, result, progress, len(wanted))
        for content_hash in there:
            todo[content_hash].remove(content_hash)
            if not todo[content_hash]:
                del todo[content_hash]
        square = [h for h, present in zip(square, found) if not present]


def is_square(path: str) -> bool:
    """Whether the file's header says width == height (False when it cannot be read: extraction then
    reports the file)."""
    from featurepipe.core.errors import ImageDecodeError
    from featurepipe.data.images import image_size

    try:
        width, height = image_size(path)
    except (ImageDecodeError, OSError):
        return False
    return width == height


def copy_originals(original_writer, other: FeatureStore, hashes: list[str], result: ExtractReport,
                   progress: Optional[ProgressCallback], total: int) -> None:
    """Copy the original-image rows HASHES from OTHER (another resize policy's store), COPY_ROWS per shard."""
    for start in range(0, len(hashes), COPY_ROWS):
        keys = hashes[start:start + COPY_ROWS]
        original_writer.add(keys, other.read(keys))
        result.copied += len(keys)
        report(progress, "extract", result.copied, total,
               f"square images copied from the {other.payload.get('resize', 'other')} features")


PLAN_BATCH = 32   # images per batch (shard) when --batch-size is not given


def _registry_module(name: str) -> Optional[str]:
    """The module that registers backbone NAME when it is not one of featurepipe's own (a plugin, or
    the tests' tiny one): workers import it, since a registry entry is not something to pickle."""
    from featurepipe.backbones.registry import get_backbone

    module = get_backbone(name).builder.__module__
    return None if module.startswith("featurepipe.") else module
