"""The training photos most like a new one: cosine similarity against a run's cached training features.

Loaded once (serve's start-up) from the cache the run's features live in: the run's dataset is
scanned again (content hashes come from the cache's hash database, so nothing is decoded), its
images' features read from the feature set's store, and the rows L2-normalised, so a query is one
matrix product. The photos are the run's training images as its out-of-fold table lists them (with
the labels it was evaluated with, after any --exclude / --relabel), when that table is there.

A run whose cache or dataset has gone cannot show similar photos: `load_similar` then returns an
index that says why instead of failing, and writes nothing (no store or hash database is created).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np

from featurepipe.backbones.fingerprint import backbone_fingerprint
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.core.cachedirs import features_dir
from featurepipe.core.errors import FeaturepipeError
from featurepipe.rundir.layout import OOF
from featurepipe.rundir.run import Run

TOP = 5
THUMB_PX = 160


@dataclass
class SimilarIndex:
    """Training photos (paths, labels) and their unit-length features of one feature set, or the reason there are none."""
    feature_set: Optional[str] = None
    paths: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    source: Optional[str] = None
    unit: Optional[np.ndarray] = None          # (n, d) float32, rows of length 1
    unavailable: Optional[str] = None          # why there are no similar photos

    @property
    def available(self) -> bool:
        return self.unavailable is None and self.unit is not None and len(self.paths) > 0

    def query(self, features: np.ndarray, top: int = TOP) -> list[list[tuple[int, float]]]:
        """For each row of `features`: (training photo id, cosine similarity) of the `top` most similar, best first."""
        if not self.available or len(features) == 0:
            return [[] for _ in range(len(features))]
        X = np.asarray(features, dtype=np.float32)
        norms = np.linalg.norm(X, axis=1, keepdims=True)
        scores = (X / np.where(norms > 0, norms, 1.0)) @ self.unit.T
        k = min(top, scores.shape[1])
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return [[(int(j), float(scores[i, j])) for j in row] for i, row in enumerate(best)]

    def name(self, photo: int) -> str:
        """The photo's path relative to the dataset folder when it lies inside it."""
        path = self.paths[photo]
        if self.source:
            try:
                return str(Path(path).relative_to(self.source))
            except ValueError:
                pass
        return path

    def thumbnail(self, photo: int) -> bytes:
        """PNG of training photo `photo` (an id from `query`, never a path); IndexError for an unknown id."""
        if not 0 <= int(photo) < len(self.paths):
            raise IndexError(photo)
        return _thumbnail(self.paths[int(photo)])


@lru_cache(maxsize=512)
def _thumbnail(path: str) -> bytes:
    from featurepipe.data.images import thumbnail_png

    return thumbnail_png(path, THUMB_PX)


def load_similar(run_dir: str | os.PathLike, feature_set: Optional[str],
                 cache_dir: Optional[str | os.PathLike] = None) -> SimilarIndex:
    """The training photos of `run_dir` on `feature_set` (a name from config.json's search, as the
    run's heads name it); an index saying why when they cannot be had (never an exception for a
    missing cache, dataset or store)."""
    if not feature_set:
        return SimilarIndex(unavailable="the run's model is a fine-tuned network, which keeps no features to compare")
    run = Run.open(run_dir)
    config = run.config
    spec_dict = ((config.get("search") or {}).get("feature_sets") or {}).get(feature_set) or config.get("backbone")
    source = (config.get("dataset") or {}).get("source")
    if not spec_dict or not source:
        return SimilarIndex(feature_set, unavailable=f"{run.path / 'config.json'} records no feature set "
                                                     f"{feature_set!r} or no dataset")
    root = run.cache_dir(cache_dir)
    spec = BackboneSpec.from_dict(spec_dict).resolved()
    fingerprint, _ = backbone_fingerprint(spec, root)
    store_dir = features_dir(root) / fingerprint[:16]
    if not (store_dir / "spec.json").is_file():
        return SimilarIndex(feature_set, unavailable=f"the run's cached features ({store_dir}) are gone; "
                                                     f"run `featurepipe extract` on {source} to bring them back")
    if not Path(source).exists():
        return SimilarIndex(feature_set, unavailable=f"the run's dataset {source} is gone")
    return _read(run, feature_set, spec, root, source)


def _read(run: Run, feature_set: str, spec: BackboneSpec, root: Path, source: str) -> SimilarIndex:
    from featurepipe.data.dataset import scan
    from featurepipe.extraction.features import dataset_features, open_stores

    try:
        dataset = scan(source, cache_dir=root)
        features = dataset_features(dataset, open_stores(spec, root))
    except (FeaturepipeError, OSError) as error:
        return SimilarIndex(feature_set, unavailable=f"cannot read the run's training photos: {error}")
    frame = features.frame.assign(row=np.arange(len(features.frame)))
    labels = _evaluated_labels(run.path / OOF)
    if labels is not None:
        frame = frame[frame["path"].isin(labels.index)]
        frame = frame.assign(label=labels.reindex(frame["path"]).to_numpy())
    if not len(frame):
        return SimilarIndex(feature_set, unavailable=f"none of the run's training photos has cached {feature_set} features")
    X = features.X[frame["row"].to_numpy()].astype(np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return SimilarIndex(feature_set, frame["path"].astype(str).tolist(), frame["label"].astype(str).tolist(),
                        str(source), X / np.where(norms > 0, norms, 1.0))


def _evaluated_labels(oof: Path):
    """path -> label the run was evaluated with (its out-of-fold table's `true`), or None without the table."""
    from featurepipe.core import csvcells

    try:
        table = csvcells.read(oof, usecols=["path", "true"], dtype=str, keep_default_na=False)
    except (OSError, ValueError):
        return None
    return table.drop_duplicates("path").set_index("path")["true"]
