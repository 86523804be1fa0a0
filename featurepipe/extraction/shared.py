"""Extract several feature sets in one pass over the images: each photo is read once and decoded once
per JPEG draft scale, and every feature set's backbone is fed from that decode.

Why: `run` searches 9 feature sets (EfficientNet-Lite0/1/2 x squash/center_crop/letterbox), and
extracting them one after the other decoded every photo 9 times; a camera-sized JPEG costs ~25 ms to
decode even in draft mode, about one Lite0 pass.

What it stores is what `extract` run on each spec in turn stores, bit for bit: per spec the same
missing keys (remembered failures left out), the same square images copied from another resize
policy's store instead of extracted (as if the earlier specs had already run), the same batches
(plan_batches' cut, made here as the sorted content hashes go by, so each spec has at most one batch
open), the same model calls and shard names. The pass holds every store's lock; a kill loses at most
the batch each spec has open, and a re-run continues from what was committed.

Only the local executor shares decodes. On a Dask cluster, for a single spec, and for a spec whose
store an earlier spec of the same call fills, `extract` runs per spec.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import pandas as pd

from featurepipe.backbones.spec import RESIZE_POLICIES, BackboneSpec
from featurepipe.core.cachedirs import cache_root, features_dir
from featurepipe.core.errors import ImageDecodeError, writing_to
from featurepipe.core.progress import ProgressCallback, report
from featurepipe.data.augment import AugmentSpec
from featurepipe.data.dataset import Dataset
from featurepipe.data.images import decode_ahead, decode_variants
from featurepipe.extraction.batches import BatchOutcome, infer_parts, item_images, plan_batches
from featurepipe.extraction.executors.base import Executor
from featurepipe.extraction.executors.choose import current_executor
from featurepipe.extraction.executors.local import LocalExecutor
from featurepipe.extraction.extract import (PLAN_BATCH, ExtractReport, FeatureStores, _first_paths, commit_outcome,
                                            copy_originals, extract, is_square, missing_now, prepare, recount)
from featurepipe.extraction.features import other_policy_fingerprints, store_exists
from featurepipe.store.featurestore import FeatureStore


def extract_many(
    dataset: Dataset,
    specs: Sequence[BackboneSpec],
    cache_dir=None,
    augment: AugmentSpec | int = 0,
    batch_size: Optional[int] = None,
    decode_threads: Optional[int] = None,
    lock_timeout: float = 600.0,
    progress: Optional[ProgressCallback] = None,
    executor: Optional[Executor] = None,
    precision: str = "float32",
) -> list[ExtractReport]:
    """`extract` of every spec in SPECS (one report each, in order; the same stores, bit for bit),
    decoding each image that any of them misses once for all of them. Options as `extract`'s."""
    specs = list(specs)
    executor = executor or current_executor()
    if len(specs) <= 1 or type(executor) is not LocalExecutor:
        return [extract(dataset, spec, cache_dir, augment=augment, batch_size=batch_size,
                        decode_threads=decode_threads, lock_timeout=lock_timeout, progress=progress,
                        executor=executor, precision=precision) for spec in specs]
    root = cache_root(cache_dir)
    with writing_to(root):
        reports = _extract_many(dataset, specs, root, AugmentSpec.of(augment), batch_size, decode_threads,
                                lock_timeout, progress, executor, precision)
    return reports


@dataclass
class _Feed:
    """One spec in the pass: its stores and writers, what it misses, and the batch it has open."""
    stores: FeatureStores
    todo: dict[str, list[str]]
    result: ExtractReport
    # The other resize policies' stores it may copy square images from, in RESIZE_POLICIES order, each
    # with the feed of this call that fills it when that feed comes earlier (None: only its rows count).
    siblings: list[tuple[FeatureStore, Optional["_Feed"]]] = field(default_factory=list)
    writers: tuple = (None, None)
    has: dict[str, bool] = field(default_factory=dict)    # hash -> in the store once this spec is done
    items: list = field(default_factory=list)             # the open batch: (hash, keys, images or reason)
    copies: list[tuple[str, FeatureStore]] = field(default_factory=list)
    sources: dict[str, list] = field(default_factory=dict)   # square hash -> who may supply it (_squares_present)
    infer: Optional[Callable] = None
    chunk: int = 0
    pending: int = 0                                      # images it will run (plan_batches' total)
    own_seconds: float = 0.0

    @property
    def spec(self) -> BackboneSpec:
        return self.stores.spec

    @property
    def label(self) -> str:
        return f"{self.spec.name}/{self.spec.resize}"


def _extract_many(dataset: Dataset, specs: list[BackboneSpec], root: Path, augment: AugmentSpec,
                  batch_size: Optional[int], decode_threads: Optional[int], lock_timeout: float,
                  progress: Optional[ProgressCallback], executor: Executor, precision: str) -> list[ExtractReport]:
    started = time.perf_counter()
    # Stores that exist before this call: extract copies square images only from existing stores, and
    # opening this call's stores creates them.
    existed = {fp for spec in specs for fp, _ in other_policy_fingerprints(spec, root, precision)
               if store_exists(root, fp)}
    feeds: dict[int, _Feed] = {}            # spec index -> its feed
    by_store: dict[str, _Feed] = {}
    images = None
    for index, spec in enumerate(specs):
        stores, images, todo, result = prepare(dataset, spec, root, augment, precision, executor.name)
        if stores.originals.fingerprint in by_store:
            continue                        # an earlier spec fills this store: extract it after the pass
        feed = _Feed(stores, todo, result)
        for fingerprint, payload in other_policy_fingerprints(stores.spec, root, precision):
            earlier = by_store.get(fingerprint)
            if earlier is not None or fingerprint in existed:
                store = earlier.stores.originals if earlier else FeatureStore.open(features_dir(root), fingerprint,
                                                                                   payload)
                feed.siblings.append((store, earlier))
        by_store[stores.originals.fingerprint] = feeds[index] = feed
    working = [feed for feed in feeds.values() if feed.todo]
    if working:
        run = _Pass(dataset, images, root, batch_size, progress)
        with ExitStack() as locks:
            _lock(working, locks, lock_timeout, progress)
            run.feed_all(working, decode_threads)
        for feed in working:
            recount(feed.stores, images, feed.result)
    # Each report's seconds: its own building, inference and writing plus an equal share of the rest
    # (decoding, waiting), so that they add up to this call's time as extract's reports do.
    shared = time.perf_counter() - started - sum(feed.own_seconds for feed in feeds.values())
    for feed in feeds.values():
        feed.result.seconds = feed.own_seconds + shared / len(feeds)
    reports = [feeds[index].result if index in feeds else
               extract(dataset, spec, root, augment=augment, batch_size=batch_size, decode_threads=decode_threads,
                       lock_timeout=lock_timeout, progress=progress, executor=executor, precision=precision)
               for index, spec in enumerate(specs)]
    report(progress, "extract", len(images), len(images), "done")
    return reports


def _lock(feeds: list[_Feed], locks: ExitStack, lock_timeout: float, progress: Optional[ProgressCallback]) -> None:
    """Take every feed's store locks, originals then views, feeds in the order of their originals
    store's folder: extract takes a store's originals lock before its views lock too, so no two
    processes wait on each other in a circle."""
    for feed in sorted(feeds, key=lambda f: str(f.stores.originals.directory)):
        started = time.perf_counter()

        def waiting(feed=feed) -> None:
            report(progress, "extract", 0, len(feed.todo),
                   f"waiting for another process writing the {feed.label} store")

        writers = [locks.enter_context(store.writer(timeout=lock_timeout, on_wait=waiting))
                   for store in (feed.stores.originals, feed.stores.views) if store is not None]
        feed.writers = (writers[0], writers[1] if len(writers) > 1 else None)
        feed.result.waited_seconds = time.perf_counter() - started


class _Pass:
    """One pass over the images the feeds miss, under their locks."""

    def __init__(self, dataset: Dataset, images: pd.DataFrame, root: Path, batch_size: Optional[int],
                 progress: Optional[ProgressCallback]):
        self.dataset, self.images, self.root = dataset, images, root
        self.batch_size = batch_size
        self.cut = batch_size or PLAN_BATCH          # images per batch (shard), as extract plans them
        self.progress = progress
        self.models: dict = {}
        self.paths_by_hash: dict[str, list[str]] = {}
        self.done = self.total = 0

    def say(self, message: str) -> None:
        report(self.progress, "extract", self.done, self.total, message)

    def feed_all(self, feeds: list[_Feed], decode_threads: Optional[int]) -> None:
        """Decode every missing image once, feed each spec's batches as they fill, then copy the square
        images each spec takes from another policy's store."""
        from featurepipe.backbones.accel import default_decode_threads

        for feed in feeds:
            feed.todo = missing_now(feed.stores, self.images)
        hashes = sorted(set().union(*(feed.todo for feed in feeds)))
        if not hashes:
            return
        first_path = _first_paths(self.images, set(hashes))
        present = _squares_present(feeds, first_path)
        self.paths_by_hash = self.dataset.frame.groupby("hash")["path"].apply(list).to_dict()
        self.total = len(hashes)
        for feed in feeds:
            feed.sources = present[id(feed)]
            feed.pending = sum(1 for h, keys in feed.todo.items() if keys != [h] or h not in feed.sources)

        threads = decode_threads or default_decode_threads()
        # Each image decoded ahead holds every feed's pixels: about the pixels extract keeps ahead for
        # one spec (two batches), yet enough to keep every decode thread busy.
        lookahead = max(2 * self.cut // len(feeds), 2 * threads, 8)
        ahead = decode_ahead(hashes, lambda h: _decode(h, first_path[h], feeds), lookahead, threads)
        try:
            for content_hash, future in ahead:
                decoded = future.result()
                for feed in feeds:
                    if content_hash in feed.todo:
                        self.take(feed, content_hash, decoded.get(id(feed)))
                self.done += 1
                self.say(_feeding(feeds))
        finally:
            ahead.close()          # stops the decode threads when an error ends the pass early
        for feed in feeds:
            if feed.items:
                self.flush(feed)
        for feed in feeds:
            _copy(feed, self.progress)

    def take(self, feed: _Feed, content_hash: str, decoded) -> None:
        """Add one image to FEED's open batch, less the original when extract would copy it from another
        policy's store (one that holds it, or an earlier feed's that decoded it); run the batch when full."""
        keys = list(feed.todo[content_hash])
        source = next((store for store, ready in feed.sources.get(content_hash, [])
                       if ready is True or ready.has.get(content_hash)), None)
        if source is not None:
            feed.copies.append((content_hash, source))
            keys.remove(content_hash)
            feed.has[content_hash] = True
        if not keys:
            return
        if isinstance(decoded, str):
            feed.has.setdefault(content_hash, False)
        else:
            feed.has[content_hash] = True
            decoded = [(key, pixels) for key, pixels in decoded if key in keys]
        feed.items.append((content_hash, tuple(keys), decoded))
        if len(feed.items) == self.cut:
            self.flush(feed)

    def flush(self, feed: _Feed) -> None:
        """Run FEED's open batch through its backbone and commit it, as extract's local executor would."""
        started = time.perf_counter()
        build_seconds = 0.0
        if feed.infer is None:
            self.say(f"building {feed.spec.name}")
            feed.infer, build_seconds = self.model(feed.spec, feed.result.precision)
            if self.batch_size:
                feed.chunk = self.batch_size
            else:
                from featurepipe.backbones.accel import auto_batch_size

                feed.chunk = auto_batch_size(feed.infer, feed.spec.image_size, feed.pending)
        batch = plan_batches({h: keys for h, keys, _ in feed.items}, len(feed.items))[0]
        decoded = [image for _, _, images in feed.items if not isinstance(images, str) for image in images]
        failures = {h: images for h, _, images in feed.items if isinstance(images, str)}
        feed.items = []
        originals, views = infer_parts(decoded, feed.infer, feed.chunk)
        outcome = BatchOutcome(batch.id, originals, views, failures, build_seconds=build_seconds, chunk=feed.chunk)
        commit_outcome(outcome, batch, *feed.writers, feed.result, self.paths_by_hash)
        feed.own_seconds += time.perf_counter() - started

    def model(self, spec: BackboneSpec, precision: str) -> tuple[Callable, float]:
        """SPEC's inference function, built once per call for every resize policy (the model never sees
        the policy, only the pixels); the seconds it took to build, 0 when already built."""
        from featurepipe.backbones.accel import precision_policy
        from featurepipe.backbones.build import build_feature_model, inference_function

        key = (replace(spec, resize=RESIZE_POLICIES[0]), precision)
        if key in self.models:
            return self.models[key], 0.0
        started = time.perf_counter()
        with precision_policy(precision):
            self.models[key] = inference_function(build_feature_model(spec, self.root), spec.image_size)
        return self.models[key], time.perf_counter() - started


def _squares_present(feeds: list[_Feed], first_path: dict[str, str]) -> dict[int, dict[str, list]]:
    """id(feed) -> square hash whose original it misses -> the sibling stores that may supply it, in
    RESIZE_POLICIES order: (store, True) when the store already holds the row, (store, feed) when an
    earlier feed of this pass will (if that image decodes for it)."""
    square: dict[str, bool] = {}
    out: dict[int, dict[str, list]] = {}
    for feed in feeds:
        wanted = [h for h, keys in feed.todo.items() if h in keys] if feed.siblings else []
        for content_hash in wanted:
            if content_hash not in square:
                square[content_hash] = is_square(first_path[content_hash])
        wanted = [h for h in wanted if square[h]]
        sources: dict[str, list] = {h: [] for h in wanted}
        for store, earlier in feed.siblings:
            if not wanted:
                break
            for content_hash, there in zip(wanted, store.has(wanted)):
                if there:
                    sources[content_hash].append((store, True))
                elif earlier is not None:
                    sources[content_hash].append((store, earlier))
        out[id(feed)] = {h: s for h, s in sources.items() if s}
    return out


def _decode(content_hash: str, path: str, feeds: list[_Feed]) -> dict[int, object]:
    """id(feed) -> its (key, pixels) for the image, or why it did not decode; one read and one decode
    per JPEG draft scale for all feeds. A feed sure to copy the image's only missing row gets nothing."""
    wanting = [feed for feed in feeds if content_hash in feed.todo and not (
        feed.todo[content_hash] == [content_hash]
        and any(ready is True for _, ready in feed.sources.get(content_hash, [])))]
    if not wanting:
        return {}
    try:
        arrays = decode_variants(path, [(f.spec.image_size, f.spec.resize) for f in wanting], content_hash)
    except ImageDecodeError as error:
        return {id(feed): error.reason for feed in wanting}
    out: dict[int, object] = {}
    for feed, image in zip(wanting, arrays):
        if isinstance(image, ImageDecodeError):
            out[id(feed)] = image.reason
        else:
            out[id(feed)] = item_images(image, content_hash, feed.todo[content_hash], feed.stores.policy,
                                        feed.stores.seed)
    return out


def _copy(feed: _Feed, progress: Optional[ProgressCallback]) -> None:
    """The square images FEED takes from other policies' stores, once those hold them (in spec order:
    a copy may come from an earlier feed's copy)."""
    started = time.perf_counter()
    wanted = len(feed.copies)
    by_source: dict[int, tuple[FeatureStore, list[str]]] = {}
    for content_hash, store in feed.copies:
        by_source.setdefault(id(store), (store, []))[1].append(content_hash)
    for store, hashes in by_source.values():
        store.refresh()      # rows committed during this pass
        copy_originals(feed.writers[0], store, hashes, feed.result, progress, wanted)
    feed.copies = []
    feed.own_seconds += time.perf_counter() - started


def _feeding(feeds: list[_Feed]) -> str:
    """The progress line: which backbones this pass feeds."""
    names = [feed.label for feed in feeds if feed.todo]
    more = f" + {len(names) - 1} more" if len(names) > 1 else ""
    return f"extract {names[0]}{more}" if names else "extract"
