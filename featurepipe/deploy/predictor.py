"""A run's model loaded once and applied to any number of batches of images: what a server keeps.

`featurepipe predict` is one call of a fresh Predictor; a server keeps one and calls `predict` per
request, so heads, feature stores and networks are loaded or built on first need and reused.

What a prediction costs is what its networks cost (issue 21):
- the feature sets of a vote that run on the same network (same backbone, weights, layer, pooling
  and size; only the resize policy differs) share one built network (deploy.networks), and each
  image is decoded once for all of them (data.images.decode_views) and run as one batch of views;
- features already in a member's feature store are read, not computed: the run's own images, and
  every image predicted before, because new images' features are written to the same content-hashed
  store `extract` fills (same fingerprint: same decoding, network and library versions), so
  predicting a photo again builds no network at all. `cache gc` treats these rows like any row no
  scanned dataset refers to: it drops them (they are a cache; a later predict computes them again),
  and keeps the store itself as long as a run uses it. A store that cannot be written (read-only
  cache, another process writing it) only costs that reuse, said in the result's warnings; a cache
  that holds no store for a feature set (moved, cleaned, another one given) gets none created.
- the cache's hash database is used from HASH_DB_FROM files on: a server's uploads (a new temporary
  path each) are hashed directly and leave nothing in it.

A file that cannot be read or decoded gets an error row; it never fails the batch.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from featurepipe.backbones.accel import default_decode_threads
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.core.cachedirs import features_dir, hash_db
from featurepipe.core.errors import FeaturepipeError, ImageDecodeError
from featurepipe.core.hashcache import HashCache
from featurepipe.core.progress import ProgressCallback, report
from featurepipe.data.images import decode_ahead, decode_batches, decode_views
from featurepipe.deploy.networks import Network, Networks, network_key
from featurepipe.deploy.results import PredictResult, _frame, collect_inputs, head_probabilities
from featurepipe.rundir.layout import MODEL_META, NESTED
from featurepipe.rundir.model import RunModel, vote_weights
from featurepipe.rundir.run import open_run



# Stored images' features read and classified per pass: bounds memory (a pass's features plus the
# heads' float64 copies, ~15 MB at 1,280-d per member) while keeping reads few.
READ_CHUNK = 1024
# From this many files a call looks hashes up in (and adds them to) the cache's hash database.
HASH_DB_FROM = 16


@dataclass
class _Member:
    """One feature set of the run's model (the only one for a single head) and its head."""
    name: str                       # the feature set, e.g. "efficientnet_lite0/squash"
    run: RunModel
    spec: BackboneSpec              # resolved
    estimator: object
    fingerprint: str                # of its features (backbones.fingerprint)
    store: object                   # its originals FeatureStore; None when the cache has none (see _load_members)
    missing: set = field(default_factory=set)   # content hashes of this call not in the store

    @property
    def view(self) -> tuple[int, str]:
        return int(self.spec.image_size), str(self.spec.resize)


class Predictor:
    """`Predictor(run_dir).predict(paths)`: a run's class probabilities for image files and folders.

    `cache_dir` overrides the cache root recorded in the run (where features and hashes live);
    `model`: "auto" (the fine-tuned model when the run has one), "finetuned" or "head"; `trust`:
    accept a run this user's key did not sign; `progress`: the core.progress callback. One call at a
    time: a server serialises calls to one Predictor (or keeps one per worker)."""

    def __init__(self, run_dir: str | os.PathLike, cache_dir: Optional[str | os.PathLike] = None,
                 model: Optional[str] = None, trust: bool = False, progress: Optional[ProgressCallback] = None,
                 batch_size: int = 32):
        self.run: RunModel = open_run(run_dir, model or "auto", trust)
        self.run_dir = self.run.run_dir
        self.progress = progress
        self.batch_size = max(1, int(batch_size))
        self._cache_override = cache_dir
        self._members: Optional[list[_Member]] = None
        self._networks: Optional[Networks] = None
        self._finetuned: Optional[Network] = None

    @property
    def classes(self) -> list[str]:
        return list(self.run.classes)

    @property
    def model_kind(self) -> str:
        return self.run.kind

    @property
    def feature_sets(self) -> list[str]:
        """The feature sets the model reads ([] for a fine-tuned model)."""
        if self.run.kind == "finetuned":
            return []
        return [str((run.head_meta or {}).get("features") or run.spec.name) for run in self.run.members or [self.run]]

    @property
    def nested_accuracy(self) -> Optional[dict]:
        """nested.json's accuracy ({mean, std, ci_low, ci_high}), or None (a run without nested CV)."""
        try:
            accuracy = json.loads((Path(self.run_dir) / NESTED).read_text()).get("accuracy")
        except (OSError, ValueError, AttributeError):
            return None
        return accuracy if isinstance(accuracy, dict) and "mean" in accuracy else None

    # ---------------------------------------------------------------------------------- predict

    def predict(self, paths: Sequence[str | os.PathLike] | str | os.PathLike, top_k: int = 3,
                keep_features: bool = False) -> PredictResult:
        """One row per image file in `paths` (files and/or folders), in a stable order.

        keep_features: the result's `.features` maps each feature set's name to the features of the
        images that succeeded, in the frame's row order (head and vote runs; None for a fine-tuned model)."""
        started = time.perf_counter()
        if int(top_k) < 1:
            raise FeaturepipeError(f"top_k must be at least 1, not {top_k}")
        files = collect_inputs(paths)
        top_k = min(int(top_k), len(self.run.classes))
        result = PredictResult(pd.DataFrame(), self.run.kind, self.classes, self.run_dir, top_k)
        errors: dict[str, str] = {}
        proba: dict[str, np.ndarray] = {}
        report(self.progress, "predict", 0, len(files), f"{self.run.kind} model")
        if self.run.kind == "finetuned":
            self._predict_finetuned(files, proba, errors, result)
        else:
            self._predict_heads(files, proba, errors, result, keep_features)
        result.frame = _frame(files, proba, errors, self.run.classes, top_k)
        result.failed = int(result.frame["error"].notna().sum())
        result.seconds = time.perf_counter() - started
        report(self.progress, "predict", len(files), len(files), "done")
        return result

    # ---------------------------------------------------------------------------------- fine-tuned

    def _predict_finetuned(self, files: list[str], proba: dict, errors: dict, result: PredictResult) -> None:
        if self._finetuned is None:
            report(self.progress, "predict", 0, len(files), "loading the fine-tuned model")
            self._finetuned = Network(self.run.load_finetuned(), self.run.image_size)
        done = 0
        for batch_paths, images in decode_batches(files, self.run.image_size, self.run.resize, self.batch_size,
                                                  errors, default_decode_threads()):
            out = np.asarray(self._finetuned(images, self.batch_size), dtype=np.float64)
            if out.shape[1] != len(self.run.classes):
                raise FeaturepipeError(f"the fine-tuned model outputs {out.shape[1]} values but {MODEL_META} lists "
                                       f"{len(self.run.classes)} classes; re-run fine-tuning")
            # float32 softmax rows sum to 1 only to ~1e-7
            out /= out.sum(axis=1, keepdims=True)
            proba.update(zip(batch_paths, out))
            result.computed += len(batch_paths)
            done += len(batch_paths)
            report(self.progress, "predict", done, len(files), f"{len(files) - done} left")

    # ---------------------------------------------------------------------------------- heads

    def _root(self) -> Path:
        return self.run.cache_dir(self._cache_override)

    def _load_members(self) -> list[_Member]:
        if self._members is None:
            from featurepipe.backbones.fingerprint import backbone_fingerprint
            from featurepipe.extraction.features import open_stores

            root = self._root()
            members = []
            for run in self.run.members or [self.run]:
                spec = run.spec.resolved()
                name = str((run.head_meta or {}).get("features") or spec.name)
                fingerprint, _ = backbone_fingerprint(spec, root)
                # Only a store the cache holds (the run's, normally) is read and added to: a cache without
                # it (moved, cleaned, or another one given) gets no store created in it by a prediction.
                exists = (features_dir(root) / fingerprint[:16] / "spec.json").is_file()
                store = open_stores(spec, root).originals if exists else None
                members.append(_Member(name, run, spec, run.load_head(), fingerprint, store))
            self._members = members
            self._networks = Networks(root)
        return self._members

    def _predict_heads(self, files: list[str], proba: dict, errors: dict, result: PredictResult,
                       keep_features: bool) -> None:
        members = self._load_members()
        by_hash = self._hash(files, errors)
        digests = list(by_hash)
        for member in members:
            self._check_store(member, digests, result)
        todo = {h for member in members for h in member.missing}
        result.reused = sum(len(by_hash[h]) for h in digests if h not in todo)
        done = result.reused
        report(self.progress, "predict", done, len(files), f"{result.reused} from the feature store")
        builds = list(dict.fromkeys(network_key(m.spec) for m in members
                                    if m.missing and not self._networks.has(m.spec)))
        kept: dict[str, dict[str, np.ndarray]] = {m.name: {} for m in members}
        # The vote's member weights as export reads them (None: the plain mean the vote was scored with).
        weights = vote_weights(self.run) if self.run.is_vote else None
        # Distinct images in passes, so memory stays flat whatever their number: stored ones
        # READ_CHUNK at a time, then new ones a batch at a time (decoded, run through the networks,
        # written to the stores as one shard per member), each pass classified at once.
        stored, new = [h for h in digests if h not in todo], [h for h in digests if h in todo]
        chunks = ([stored[i:i + READ_CHUNK] for i in range(0, len(stored), READ_CHUNK)]
                  + [new[i:i + self.batch_size] for i in range(0, len(new), self.batch_size)])
        for chunk in chunks:

            def say(message: str, done: int = done) -> None:
                report(self.progress, "predict", done, len(files), message)
            rows = self._chunk_features(members, chunk, by_hash, errors, builds, say, result)
            good = [h for h in chunk if all(h in member_rows for member_rows in rows)]
            if good:
                parts = [head_probabilities(m.estimator, np.stack([r[h] for h in good]), self.run.classes)
                         for m, r in zip(members, rows)]
                for h, row in zip(good, np.average(parts, axis=0, weights=weights)):
                    for path in by_hash[h]:
                        proba[path] = row
                if keep_features:
                    for m, r in zip(members, rows):
                        kept[m.name].update((h, r[h]) for h in good)
            result.computed += sum(len(by_hash[h]) for h in good if h in todo)
            done += sum(len(by_hash[h]) for h in chunk if h in todo)
            report(self.progress, "predict", done, len(files), f"{len(files) - done} images left" if done < len(files) else "")
        if keep_features:
            digest_of = {path: h for h, same in by_hash.items() for path in same}
            succeeded = [digest_of[p] for p in files if p in proba]
            result.features = {m.name: (np.stack([kept[m.name][h] for h in succeeded]) if succeeded else
                                        np.empty((0, 0), dtype=np.float32)) for m in members}

    def _check_store(self, member: _Member, digests: list[str], result: PredictResult) -> None:
        """Which of this call's images the member's store lacks; a warning when its backbone changed."""
        expected = (member.run.head_meta or {}).get("feature_fingerprint")
        if expected and member.fingerprint != expected:
            warning = (f"the backbone's fingerprint changed since the head was trained (library versions or weights "
                       f"differ: {expected[:16]} then, {member.fingerprint[:16]} now); features are computed "
                       f"afresh and may not match what the head was trained on")
            if warning not in result.warnings:
                result.warnings.append(warning)
        if member.store is None:
            member.missing = set(digests)
            if digests:
                result.warnings.append(f"the cache {self._root()} holds no {member.name} features (moved, cleaned, or "
                                       f"another cache): every image is computed, and none kept for next time")
            return
        member.store.refresh()       # another process (or `cache gc`) may have changed it since the last call
        member.missing = set(member.store.missing(digests))

    def _chunk_features(self, members: list[_Member], chunk: list[str], by_hash: dict[str, list[str]],
                        errors: dict, builds: list, say, result: PredictResult) -> list[dict[str, np.ndarray]]:
        """Per member, content hash -> features for the chunk's images: read from its store, or
        computed (each image decoded once for every view it needs, each network run once on all its
        members' views) and written to the store. An image that fails to decode is in none."""
        rows: list[dict[str, np.ndarray]] = [{} for _ in members]
        for member, member_rows in zip(members, rows):
            cached = [h for h in chunk if h not in member.missing]
            if cached:
                member_rows.update(zip(cached, member.store.read(cached)))
        need = [h for h in chunk if any(h in m.missing for m in members)]
        if not need:
            return rows
        views = {h: list(dict.fromkeys(m.view for m in members if h in m.missing)) for h in need}
        decoded: dict[str, dict[tuple[int, str], np.ndarray]] = {}
        threads = default_decode_threads()
        # expect_sha256: the pixels filed under a hash are the bytes that were hashed, never a file
        # rewritten in between.
        for h, future in decode_ahead(need, lambda h: decode_views(by_hash[h][0], views[h], expect_sha256=h),
                                      max(8, 2 * threads), threads):
            try:
                decoded[h] = dict(zip(views[h], future.result()))
            except ImageDecodeError as error:
                for path in by_hash[h]:
                    errors[path] = error.reason
        groups: dict[BackboneSpec, list[int]] = {}
        for i, member in enumerate(members):
            if member.missing:
                groups.setdefault(network_key(member.spec), []).append(i)
        for key, indices in groups.items():
            owners = [(i, h) for i in indices for h in need if h in members[i].missing and h in decoded]
            if not owners:
                continue
            if not self._networks.has(key):
                say(f"building {key.name} ({builds.index(key) + 1} of {len(builds)} networks)"
                    if key in builds else f"building {key.name}")
            network = self._networks.get(members[indices[0]].spec)
            images = np.stack([decoded[h][members[i].view] for i, h in owners])
            for (i, h), features in zip(owners, network(images, self.batch_size)):
                rows[i][h] = features
        for member, member_rows in zip(members, rows):
            fresh = [h for h in need if h in member.missing and h in member_rows]
            if fresh and member.store is not None:
                self._keep(member, fresh, np.stack([member_rows[h] for h in fresh]), result)
        return rows

    def _keep(self, member: _Member, keys: list[str], features: np.ndarray, result: PredictResult) -> None:
        """Write new images' features to the member's store, so that predicting them again reads them.
        Best effort: a store being written by another process (no waiting) or a read-only or full
        cache only costs that reuse."""
        try:
            with member.store.writer(timeout=0) as writer:
                writer.add(keys, features)
        except (FeaturepipeError, OSError) as error:
            warning = (f"the features of new images were not kept in {member.store.directory} ({error}); "
                       f"predicting them again computes them again")
            if warning not in result.warnings:
                result.warnings.append(warning)

    def _hash(self, files: list[str], errors: dict) -> dict[str, list[str]]:
        """content hash -> the input files with that content (unreadable files go to `errors`).

        The cache's hash database (path, size, mtime -> hash) saves reading files again, which pays for
        folders; a few files are hashed directly, so that a server's uploads (a new temporary path
        each request) do not leave a row each in it."""
        cache = HashCache(hash_db(self._root()) if len(files) > HASH_DB_FROM else None)
        try:
            # Keyed by absolute path (as scan keys it), so the run's own images hit it.
            hashed = cache.hash_files([os.path.abspath(p) for p in files])
        finally:
            cache.close()
        by_hash: dict[str, list[str]] = {}
        for path in files:
            digest, _ = hashed[os.path.abspath(path)]
            if digest.startswith("error:"):
                errors[path] = f"cannot be read: {digest[len('error:'):]}"
            else:
                by_hash.setdefault(digest, []).append(path)
        return by_hash


__all__ = ["Predictor"]
