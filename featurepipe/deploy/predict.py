"""Stage `predict`: a run's model applied to image files and folders, one row of probabilities per file.

The model is the run's fine-tuned network when RUN_DIR/model.json names one, else the frozen
backbone plus the best head. Either way the preprocessing (image size, resize policy, the
backbone's pixel scaling) is read from the run, never re-specified, so predictions use exactly
what training used. With the head, images whose content is already in the run's feature store
are not decoded at all, and the backbone is only built when some image is missing from it.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from featurepipe.core import atomic, csvcells
from featurepipe.backbones.accel import default_decode_threads
from featurepipe.core.errors import FeaturepipeError
from featurepipe.data.dataset import walk_images
from featurepipe.core.hashcache import HashCache, path_key
from featurepipe.data.images import IMAGE_EXTENSIONS, decode_batches
from featurepipe.core.cachedirs import hash_db
from featurepipe.core.progress import ProgressCallback, ProgressEvent, report
from featurepipe.rundir.layout import MODEL_META
from featurepipe.rundir.model import RunModel
from featurepipe.rundir.run import open_run
from featurepipe.core.strictjson import json_ready


# ------------------------------------------------------------------------------------------ head output


def head_probabilities(estimator, X: np.ndarray, classes: list[str]) -> np.ndarray:
    """predict_proba laid out over all of the run's classes, in the run's order.

    A head's columns follow its `classes_`: class indices for heads refit by evaluate, class names
    for a dense head loaded from .keras, and only the classes it saw in either case.
    """
    proba = np.asarray(estimator.predict_proba(X), dtype=np.float64)
    seen = getattr(estimator, "classes_", None)
    if seen is None:
        return proba
    index = {name: i for i, name in enumerate(classes)}
    try:
        positions = [index[str(c)] if str(c) in index else int(c) for c in np.asarray(seen).tolist()]
    except (TypeError, ValueError):
        raise FeaturepipeError(f"the head's classes {list(seen)} do not match the run's {classes}; "
                               f"re-run `featurepipe evaluate`") from None
    if positions == list(range(len(classes))):
        return proba
    full = np.zeros((len(X), len(classes)), dtype=np.float64)
    full[:, positions] = proba
    return full


# ------------------------------------------------------------------------------------------ inputs


def collect_inputs(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Files as given plus the image files under each folder (hidden ones skipped), in a stable order."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise FeaturepipeError("no inputs given; pass image files and/or folders of images")
    found: list[str] = []
    for item in inputs:
        path = Path(item).expanduser()
        if not path.exists():
            raise FeaturepipeError(f"{path} does not exist; pass image files and/or folders of images")
        if path.is_dir():
            found.extend(str(image) for image in walk_images(path)[0])
        else:
            # A file named explicitly is tried whatever its extension; a failure becomes its error row.
            found.append(str(path))
    found = list(dict.fromkeys(found))
    if not found:
        names = ", ".join(str(i) for i in inputs)
        raise FeaturepipeError(f"no image files found in {names} (image types: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return found


# ------------------------------------------------------------------------------------------ result


@dataclass
class PredictResult:
    frame: pd.DataFrame              # path, label, probability, label_i/prob_i, p[<class>]..., error
    model_kind: str                  # "finetuned" | "head"
    classes: list[str]
    run_dir: Path
    top_k: int
    reused: int = 0                  # images whose features came from the feature store
    computed: int = 0                # images decoded and run through a model
    failed: int = 0                  # rows with an error
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def records(self) -> list[dict[str, Any]]:
        """One plain dict per row, NaN as None (JSON-ready)."""
        out = []
        for row in self.frame.to_dict("records"):
            out.append({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
        return out

    def to_dict(self) -> dict:
        return {"run_dir": str(self.run_dir), "model_kind": self.model_kind, "classes": self.classes,
                "top_k": self.top_k, "images": len(self.frame), "reused": self.reused, "computed": self.computed,
                "failed": self.failed, "seconds": round(self.seconds, 3), "warnings": self.warnings,
                "predictions": self.records()}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the rows as .csv (default) or the whole result as .json; replaces `path` atomically."""
        path = Path(path).expanduser()
        if path.is_dir():
            raise FeaturepipeError(f"--out {path} is a folder; give a file name such as {path / 'predictions.csv'}")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".json":
            atomic.write_json(path, json_ready(self.to_dict()), sort_keys=False, allow_nan=False)
        else:
            csvcells.write(path, self.frame)
        return path


def _frame(paths: list[str], proba: dict[str, np.ndarray], errors: dict[str, str], classes: list[str],
           top_k: int) -> pd.DataFrame:
    """Built column by column from one (n, classes) array: no per-row dicts, so 5,000 rows cost little."""
    n = len(paths)
    probabilities = np.full((n, len(classes)), np.nan)
    ok = np.zeros(n, dtype=bool)
    for i, path in enumerate(paths):
        p = proba.get(path)
        if p is not None:
            probabilities[i], ok[i] = p, True
    order = np.argsort(-np.where(ok[:, None], probabilities, 0.0), axis=1, kind="stable")
    names = np.asarray(classes, dtype=object)

    def label_at(rank: int) -> list:
        return [names[order[i, rank]] if ok[i] else None for i in range(n)]

    def prob_at(rank: int) -> np.ndarray:
        return np.where(ok, probabilities[np.arange(n), order[:, rank]] if n else 0.0, np.nan)

    # A non-UTF-8 name as \\xNN: CSV and JSON can hold it.
    columns: dict[str, Any] = {"path": [path_key(p) for p in paths], "label": label_at(0), "probability": prob_at(0)}
    for i in range(top_k):
        columns[f"label_{i + 1}"], columns[f"prob_{i + 1}"] = label_at(i), prob_at(i)
    for j, c in enumerate(classes):
        columns[f"p[{c}]"] = probabilities[:, j]
    columns["error"] = [None if ok[i] else errors.get(path, "no prediction") for i, path in enumerate(paths)]
    return pd.DataFrame(columns)


# ------------------------------------------------------------------------------------------ predict


def predict(
    run_dir: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    top_k: int = 3,
    cache_dir: Optional[str | os.PathLike] = None,
    batch_size: int = 32,
    progress: Optional[ProgressCallback] = None,
    model: str = "auto",
    trust: bool = False,
) -> PredictResult:
    """Class probabilities for every image file in `inputs` (files and/or folders).

    `cache_dir` overrides the cache root recorded in the run (where features and hashes live).
    A file that cannot be read or decoded gets a row whose `error` says why; it never stops the run.
    """
    started = time.perf_counter()
    if int(top_k) < 1:
        raise FeaturepipeError(f"top_k must be at least 1, not {top_k}")
    run = open_run(run_dir, model, trust)
    paths = collect_inputs(inputs)
    top_k = min(int(top_k), len(run.classes))
    result = PredictResult(pd.DataFrame(), run.kind, run.classes, run.run_dir, top_k)
    errors: dict[str, str] = {}
    proba: dict[str, np.ndarray] = {}
    report(progress, "predict", 0, len(paths), f"{run.kind} model")
    if run.kind == "finetuned":
        _predict_finetuned(run, paths, batch_size, proba, errors, result, progress)
    elif run.is_vote:
        _predict_vote(run, paths, cache_dir, batch_size, proba, errors, result, progress)
    else:
        _predict_head(run, paths, cache_dir, batch_size, proba, errors, result, progress)
    result.frame = _frame(paths, proba, errors, run.classes, top_k)
    result.failed = int(result.frame["error"].notna().sum())
    result.seconds = time.perf_counter() - started
    report(progress, "predict", len(paths), len(paths), "done")
    return result


def _predict_finetuned(run: RunModel, paths: list[str], batch_size: int, proba: dict, errors: dict,
                       result: PredictResult, progress) -> None:
    from featurepipe.backbones.build import inference_function

    network = inference_function(run.load_finetuned(), run.image_size)
    done = 0
    for batch_paths, images in decode_batches(paths, run.image_size, run.resize, batch_size, errors,
                                                     default_decode_threads()):
        out = np.asarray(network(images), dtype=np.float64)
        if out.shape[1] != len(run.classes):
            raise FeaturepipeError(f"the fine-tuned model outputs {out.shape[1]} values but {MODEL_META} lists "
                                   f"{len(run.classes)} classes; re-run fine-tuning")
        # float32 softmax rows sum to 1 only to ~1e-7
        out /= out.sum(axis=1, keepdims=True)
        proba.update(zip(batch_paths, out))
        result.computed += len(batch_paths)
        done += len(batch_paths)
        report(progress, "predict", done, len(paths), "")


def _predict_vote(run: RunModel, paths: list[str], cache_dir, batch_size: int, proba: dict, errors: dict,
                  result: PredictResult, progress) -> None:
    """The average of every member's probabilities (each on its own feature set, from the store when cached)."""
    parts, reused, computed = [], [], []
    for index, member in enumerate(run.members):
        own: dict[str, np.ndarray] = {}
        counts = PredictResult(pd.DataFrame(), "head", run.classes, member.run_dir, 1)

        def relay(event: ProgressEvent, index: int = index) -> None:
            report(progress, event.stage, event.done, event.total,
                   f"feature set {index + 1}/{len(run.members)} {event.message}".strip())
        _predict_head(member, paths, cache_dir, batch_size, own, errors, counts, relay)
        parts.append(own)
        reused.append(counts.reused)
        computed.append(counts.computed)
        result.warnings.extend(w for w in counts.warnings if w not in result.warnings)
    # An image counts as reused when every feature set had it, as computed when any had to run a model.
    result.reused, result.computed = min(reused), max(computed)
    weights = run.weights
    for path in paths:
        if path not in errors and all(path in own for own in parts):
            proba[path] = np.average([own[path] for own in parts], axis=0, weights=weights)


def _predict_head(run: RunModel, paths: list[str], cache_dir, batch_size: int, proba: dict, errors: dict,
                  result: PredictResult, progress) -> None:
    from featurepipe.extraction.features import open_stores

    estimator = run.load_head()
    root = run.cache_dir(cache_dir)
    cache = HashCache(hash_db(root))
    try:
        # The hash cache is keyed by absolute path (as scan keys it), so the run's own images hit it.
        hashed = cache.hash_files([os.path.abspath(p) for p in paths])
    finally:
        cache.close()
    by_hash: dict[str, list[str]] = {}
    for path in paths:
        digest, _ = hashed[os.path.abspath(path)]
        if digest.startswith("error:"):
            errors[path] = f"cannot be read: {digest[len('error:'):]}"
        else:
            by_hash.setdefault(digest, []).append(path)

    stores = open_stores(run.spec, root)
    store = stores.originals
    expected = (run.head_meta or {}).get("feature_fingerprint")
    if expected and store.fingerprint != expected:
        result.warnings.append(
            f"the backbone's fingerprint changed since the head was trained (library versions or weights differ: "
            f"{expected[:16]} then, {store.fingerprint[:16]} now); features are computed afresh and may not match "
            f"what the head was trained on")
    have = store.keys()
    cached = [h for h in by_hash if h in have]
    missing = [h for h in by_hash if h not in have]

    def classify(digests: list[str], features: np.ndarray) -> None:
        for digest, row in zip(digests, head_probabilities(estimator, features, run.classes)):
            for path in by_hash[digest]:
                proba[path] = row

    # In chunks, so memory stays flat for any number of images: the store checksums each shard once
    # per process and then reads only the rows a chunk needs.
    chunk_rows = 1024     # bounds memory: a chunk's features plus the head's float64 copies (~15 MB at 1,280-d)
    for start, features in zip(range(0, len(cached), chunk_rows), store.iter_read(cached, chunk_rows)):
        classify(cached[start:start + chunk_rows], features)
    result.reused = sum(len(by_hash[h]) for h in cached)
    report(progress, "predict", result.reused, len(paths), f"{result.reused} from the feature store")
    if missing:
        from featurepipe.backbones.build import build_feature_model, inference_function

        report(progress, "predict", result.reused, len(paths), f"building {run.spec.name}")
        network = inference_function(build_feature_model(run.spec, root), run.image_size)
        first = {by_hash[h][0]: h for h in missing}
        decode_errors: dict[str, str] = {}
        done = result.reused
        for batch_paths, images in decode_batches(list(first), run.image_size, run.resize, batch_size,
                                                  decode_errors, default_decode_threads()):
            classify([first[p] for p in batch_paths],
                     np.asarray(network(images), dtype=np.float32))
            result.computed += sum(len(by_hash[first[p]]) for p in batch_paths)
            done += len(batch_paths)
            report(progress, "predict", done, len(paths), "")
        for path, reason in decode_errors.items():
            for same in by_hash[first[path]]:
                errors[same] = reason
