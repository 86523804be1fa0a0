"""One unit of cross-validation work: one head configuration fit on one fold and scored, with its
small JSON result cached under a name that covers everything it depends on (so an interrupted or
extended run only fits what is missing)."""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import sklearn

from featurepipe.core import atomic
from featurepipe.evaluation.folds import Fold
from featurepipe.evaluation.metrics import fold_metrics
from featurepipe.heads import make_head, revisions

# Bump when what a cached fold result means changes (metrics, training rows, TTA), so old files are ignored.
CACHE_VERSION = 1


def _training_rows(X, y, views, idx):
    """Rows to fit on: the originals at `idx`, plus their views when `views` is given (and only theirs)."""
    if views is None:
        return X[idx], y[idx]
    k = views.shape[1]
    return (
        np.concatenate([X[idx], views[idx].reshape(-1, X.shape[1])]),
        np.concatenate([y[idx], np.repeat(y[idx], k)]),
    )


def _proba(est, X, n_classes: int) -> np.ndarray:
    # A training fold can lack a class (group folds); its column stays 0 instead of shifting others.
    p = np.asarray(est.predict_proba(X), dtype=np.float64)
    out = np.zeros((len(X), n_classes))
    out[:, np.asarray(est.classes_).astype(int)] = p
    return out


def _fit_fold(X, y, views, classes, head, params, augment, tta, train_idx, val_idx, seed) -> dict:
    """Fit one head configuration on one fold's training rows and score its validation rows."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = make_head(head, params, seed)
        est.fit(*_training_rows(X, y, views if augment == "views" else None, train_idx))
        proba = _proba(est, X[val_idx], len(classes))
        if tta:
            v = views[val_idx]
            pv = _proba(est, v.reshape(-1, v.shape[2]), len(classes)).reshape(len(val_idx), v.shape[1], -1)
            proba = (proba + pv.sum(axis=1)) / (1 + v.shape[1])
    return {
        "metrics": fold_metrics(y[val_idx], proba, classes),
        "val_idx": np.asarray(val_idx).tolist(),
        "proba": proba.tolist(),
        "seconds": time.perf_counter() - start,
        "warnings": sorted({f"{w.category.__name__}: {str(w.message)[:200]}" for w in caught}),
    }


def _fit_fold_and_keep(path: Path | None, *args) -> dict:
    """One fit, its result written to `path` (atomically) as soon as it exists, by whichever process
    ran it: a pooled fit is on disk while in-process heads are still fitting, so a kill loses only
    the fits in flight."""
    rec = _fit_fold(*args)
    if path is not None:
        _write_atomic(path, rec)
    return rec


@dataclass(frozen=True, eq=False)
class _Unit:
    head: str
    params: str   # canonical JSON: the identity in caches and tables
    kwargs: dict  # the same params as given, passed to the head untouched by JSON
    augment: str
    tta: bool
    fold: Fold

    def cache_name(self, table_id: str, classes: Sequence[str], seed: int, plan: str) -> str:
        payload = json.dumps(
            {"v": CACHE_VERSION, "sklearn": sklearn.__version__, "table": table_id, "classes": list(classes),
             "seed": seed, "plan": plan,
             "head": self.head, "heads": revisions(), "params": self.params, "augment": self.augment, "tta": self.tta,
             "repeat": self.fold.repeat, "fold": self.fold.fold},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:32] + ".json"


def _read_cached(path: Path, unit: _Unit, n_classes: int) -> dict | None:
    try:
        rec = json.loads(path.read_text())
        ok = rec["val_idx"] == unit.fold.val_idx.tolist() and all(len(r) == n_classes for r in rec["proba"])
        return rec if ok and len(rec["proba"]) == len(rec["val_idx"]) and "metrics" in rec else None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing, torn or foreign file: fit again


def _write_atomic(path: Path, obj: dict) -> None:
    atomic.write_json(path, obj, indent=None, sort_keys=False, default=None)
