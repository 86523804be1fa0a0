"""Cross-validation of classifier heads on in-memory features: arrays in, tables out.

Every (head, params, augment mode, fold) is one unit of work with its own small JSON result in the
cache directory, so an interrupted or extended run only fits what is missing.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import sklearn
from joblib import Parallel, delayed
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)
from sklearn.model_selection import RepeatedStratifiedKFold, StratifiedGroupKFold, StratifiedKFold

from featurepipe.core import atomic
from featurepipe.core.digest import digest
from featurepipe.core.workers import workers_exit_with_parent  # issue 12
from featurepipe.core.errors import DatasetError
from featurepipe.heads import head_entry, make_head, param_grid, revisions
from featurepipe.core.progress import ProgressCallback, report

# Bump when what a cached fold result means changes (metrics, training rows, TTA), so old files are ignored.
CACHE_VERSION = 1
AUGMENT_MODES = ("none", "views")
SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "log_loss", "roc_auc")


@dataclass(eq=False)
class FeatureTable:
    X: np.ndarray                      # (n, d) features of the original images
    y: np.ndarray                      # (n,) class indices into `classes`
    classes: list[str]
    paths: list[str]
    groups: np.ndarray | None = None   # (n,) ids; images sharing one never straddle train and validation
    views: np.ndarray | None = None    # (n, K, d) features of K augmented views, rows aligned with X
    key: str = ""                      # identity of the features for result caching ("" = hash the arrays)
    views_key: str = ""                # identity of the views; "" = hash them (only "views" results use it)

    def __post_init__(self) -> None:
        self.X = np.asarray(self.X)
        self.y = np.asarray(self.y)
        self.classes = [str(c) for c in self.classes]
        self.paths = [str(p) for p in self.paths]
        n = len(self.X)
        if self.X.ndim != 2:
            raise ValueError(f"X must be (n_images, n_features), got shape {self.X.shape}")
        if self.y.shape != (n,) or not np.issubdtype(self.y.dtype, np.integer):
            raise ValueError(f"y must be {n} integer class indices, got shape {self.y.shape} dtype {self.y.dtype}")
        if len(self.classes) < 2:
            raise DatasetError(f"need at least 2 classes to train a classifier, got {len(self.classes)}")
        if n and (self.y.min() < 0 or self.y.max() >= len(self.classes)):
            raise ValueError(f"y holds indices outside 0..{len(self.classes) - 1}")
        if len(self.paths) != n:
            raise ValueError(f"{len(self.paths)} paths for {n} images")
        if self.groups is not None:
            self.groups = np.asarray(self.groups)
            if self.groups.shape != (n,):
                raise ValueError(f"groups must have shape ({n},), got {self.groups.shape}")
        if self.views is not None:
            self.views = np.asarray(self.views)
            if self.views.ndim != 3 or self.views.shape[0] != n or self.views.shape[2] != self.X.shape[1]:
                raise ValueError(f"views must be (n_images, K, n_features) = ({n}, K, {self.X.shape[1]}), got {self.views.shape}")

    @property
    def identity(self) -> str:
        if self.key:
            return self.key
        h = hashlib.sha256()
        for arr in (self.X, self.y, self.views, self.groups):
            if arr is not None:
                h.update(str((arr.dtype.str, arr.shape)).encode())
                h.update(np.ascontiguousarray(arr).tobytes())
        h.update(json.dumps([self.classes, self.paths]).encode())
        return "sha256:" + h.hexdigest()

    def identity_for(self, augment: str) -> str:
        """What a result in this augment mode depends on: no-view fits never see the views, so adding
        or changing augmentation must not invalidate them."""
        if augment == "none" or self.views is None:
            return self.identity
        views = self.views_key or "sha256:" + hashlib.sha256(np.ascontiguousarray(self.views).tobytes()).hexdigest()
        return f"{self.identity}|views:{views}"


@dataclass(frozen=True, eq=False)
class Fold:
    repeat: int
    fold: int
    train_idx: np.ndarray
    val_idx: np.ndarray
    # Nested CV's inner fits: trained without folds j and k of the same repeat, validated on both.
    # Scored on fold j it is the inner fit of outer fold k, and the other way round (see nested.py).
    pair: tuple[int, int] | None = None


@dataclass
class CVResult:
    leaderboard: pd.DataFrame
    folds: pd.DataFrame
    oof: pd.DataFrame
    fitted: int
    reused: int
    best: dict
    fold_plan_id: str = ""
    # (head, params JSON, augment, repeat, fold or pair) -> (validation rows, probabilities): every fit's
    # raw output, pair fits included, for nested CV.
    proba: dict = field(default_factory=dict)
    plan: list = field(default_factory=list)   # the standard folds, in order


# ---------------------------------------------------------------- folds


DEFAULT_FOLDS = 5


def _smallest_class(y: np.ndarray, groups, class_names: Sequence[str] | None) -> tuple[int, str]:
    """(images -- or groups, with groups -- of the smallest class, its name): the most folds that work."""
    labels = np.arange(len(class_names)) if class_names is not None else np.unique(y)
    if groups is None:
        counts = [int(np.sum(y == c)) for c in labels]
    else:
        # Group folds keep a group whole, so a class can reach at most as many folds as it has groups.
        groups = np.asarray(groups)
        counts = [len(np.unique(groups[y == c])) for c in labels]
    i = int(np.argmin(counts))
    return counts[i], class_names[i] if class_names is not None else str(labels[i])


def auto_folds(y: np.ndarray, groups, class_names: Sequence[str] | None) -> tuple[int, str | None]:
    """The fold count when the user gave none: DEFAULT_FOLDS, or fewer when the smallest class has fewer
    images (groups), so that a set with a 3- or 4-photo class still gets a model and an estimate rather
    than an error; with a note saying so (None at DEFAULT_FOLDS). Below 2 the usual error follows
    from make_folds."""
    m, name = _smallest_class(np.asarray(y), groups, class_names)
    if m >= DEFAULT_FOLDS or m < 2:
        return DEFAULT_FOLDS, None
    unit = "images" if groups is None else "distinct groups"
    return m, (f"{m}-fold cross-validation: class '{name}' has {m} {unit}, too few for the default "
               f"{DEFAULT_FOLDS} folds (pass --folds to choose; more photos of '{name}' make the estimate firmer)")


def _check_class_sizes(y: np.ndarray, groups, n_folds: int, class_names: Sequence[str] | None) -> None:
    m, name = _smallest_class(y, groups, class_names)
    if m >= n_folds:
        return
    unit = "images" if groups is None else "groups"
    plural = "" if m == 1 else "s"
    has = f"only {m} image{plural}" if groups is None else f"images from only {m} distinct group{plural}"
    if m >= 2:
        raise DatasetError(
            f"class '{name}' has {has}, too few for {n_folds}-fold cross-validation "
            f"(each class needs at least {n_folds} {unit}); the largest fold count that works is {m}"
        )
    raise DatasetError(
        f"class '{name}' has {has}; cross-validation needs at least 2 {unit} per class: "
        f"add {unit} to '{name}' or leave the class out"
    )


def make_folds(
    y,
    groups=None,
    n_folds: int = 5,
    repeats: int = 1,
    seed: int = 0,
    *,
    class_names: Sequence[str] | None = None,
) -> list[Fold]:
    """Stratified (group) k-fold splits, `repeats` times reshuffled. `class_names` names classes in errors
    and makes a class with no images at all count as too small."""
    y = np.asarray(y)
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    _check_class_sizes(y, groups, n_folds, class_names)
    key = digest(n_folds, repeats, seed, y, None if groups is None else np.asarray(groups, dtype=object))
    if key in _FOLDS_MEMO:
        return list(_FOLDS_MEMO[key])
    dummy = np.zeros((len(y), 1))
    folds: list[Fold] = []
    if groups is not None:
        for r in range(repeats):
            splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed + r)
            for f, (tr, va) in enumerate(splitter.split(dummy, y, np.asarray(groups))):
                folds.append(Fold(r, f, tr, va))
    else:
        if repeats > 1:
            splitter = RepeatedStratifiedKFold(n_splits=n_folds, n_repeats=repeats, random_state=seed)
        else:
            splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        for i, (tr, va) in enumerate(splitter.split(dummy, y)):
            folds.append(Fold(i // n_folds, i % n_folds, tr, va))
    if any(len(f.val_idx) == 0 for f in folds):
        raise DatasetError(f"{n_folds}-fold cross-validation left a fold empty; use fewer folds")
    for array in (a for f in folds for a in (f.train_idx, f.val_idx)):
        array.flags.writeable = False    # shared by every caller with the same inputs (_FOLDS_MEMO)
    _FOLDS_MEMO[key] = folds
    while len(_FOLDS_MEMO) > FOLDS_MEMO_SIZE:
        _FOLDS_MEMO.pop(next(iter(_FOLDS_MEMO)))
    return list(folds)


# make_folds is called once per feature set with the very same labels and groups (`run` searches nine,
# twice when the C grid widens): StratifiedGroupKFold's greedy assignment is pure Python, ~0.1 s per
# call at 1,000 images and more at 10,000, so the splits are remembered by their inputs.
FOLDS_MEMO_SIZE = 8
_FOLDS_MEMO: dict[str, list] = {}



def pair_folds(folds: Sequence[Fold]) -> list[Fold]:
    """Per repeat, one fit for every pair of folds {j, k}: trained on the other folds, validated on both.

    Within a repeat the folds partition the images, so for outer fold k the other folds form a
    (k-1)-fold inner CV of k's training set, and the inner fit for (outer k, inner j) trains on
    everything but j and k: the same fit as for (outer j, inner k). Nested CV therefore costs
    k(k-1)/2 extra fits per configuration and repeat instead of k(k-1)."""
    out = []
    by_repeat: dict[int, list[Fold]] = {}
    for f in folds:
        by_repeat.setdefault(f.repeat, []).append(f)
    for r, members in by_repeat.items():
        n = len(members)
        everything = np.concatenate([m.val_idx for m in members])
        for a in range(n):
            for b in range(a + 1, n):
                val = np.concatenate([members[a].val_idx, members[b].val_idx])
                train = np.setdiff1d(everything, val)
                out.append(Fold(r, n + len(out), train, val, pair=(members[a].fold, members[b].fold)))
    return out


def fold_plan_id(folds: Sequence[Fold]) -> str:
    h = hashlib.sha256()
    for f in folds:
        h.update(f"{f.repeat}/{f.fold}:".encode())
        h.update(np.asarray(f.train_idx, np.int64).tobytes())
        h.update(b"|")
        h.update(np.asarray(f.val_idx, np.int64).tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- metrics


def metric_names(classes: Sequence[str]) -> list[str]:
    return [*SUMMARY_METRICS, *(f"precision[{c}]" for c in classes), *(f"recall[{c}]" for c in classes)]


def fold_metrics(y_true, proba, classes: Sequence[str]) -> dict:
    """Scalar metrics (NaN where undefined for this fold) plus the confusion matrix as nested lists."""
    y_true = np.asarray(y_true).astype(int)
    proba = np.asarray(proba, dtype=np.float64)
    labels = np.arange(len(classes))
    y_pred = proba.argmax(axis=1)
    all_present = len(np.unique(y_true)) == len(classes)
    # Parameter validation costs more than the metrics themselves on small folds; inputs are ours.
    with warnings.catch_warnings(), sklearn.config_context(skip_parameter_validation=True):
        # A fold missing a class makes sklearn warn about ill-defined recall/AUC; NaN says it instead.
        warnings.simplefilter("ignore")
        out: dict[str, Any] = {
            "accuracy": accuracy_score(y_true, y_pred),
            "balanced_accuracy": balanced_accuracy_score(y_true, y_pred),
            "f1_macro": f1_score(y_true, y_pred, average="macro", zero_division=0),
            "log_loss": log_loss(y_true, proba, labels=labels),
        }
        if not all_present:
            out["roc_auc"] = np.nan
        elif len(classes) == 2:
            out["roc_auc"] = roc_auc_score(y_true, proba[:, 1])
        else:
            out["roc_auc"] = roc_auc_score(y_true, proba, multi_class="ovr", average="macro", labels=labels)
        precision, recall, _, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=np.nan)
    out = {k: float(v) for k, v in out.items()}
    for c, p, r in zip(classes, precision, recall):
        out[f"precision[{c}]"] = float(p)
        out[f"recall[{c}]"] = float(r)
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return out


def _metric_range(name: str) -> tuple[float, float]:
    return (0.0, np.inf) if name == "log_loss" else (0.0, 1.0)


def _summary(values, bounds: tuple[float, float] = (-np.inf, np.inf)) -> tuple[float, float, float, float]:
    """Mean, sample std and 95% t-interval over folds, ignoring folds where the metric is undefined.

    The interval is clipped to the metric's range: a t-interval is symmetric, an accuracy is not above 1."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return (np.nan,) * 4
    mean = float(v.mean())
    if len(v) < 2:
        return mean, np.nan, np.nan, np.nan
    std = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.975, len(v) - 1)) * std / np.sqrt(len(v))
    return mean, std, max(mean - half, bounds[0]), min(mean + half, bounds[1])


# ---------------------------------------------------------------- one unit of work


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


# ---------------------------------------------------------------- run


def _augment_modes(table: FeatureTable, augment_modes, tta: bool) -> tuple[str, ...]:
    if augment_modes is None:
        modes = AUGMENT_MODES if table.views is not None else ("none",)
    else:
        modes = tuple(dict.fromkeys([augment_modes] if isinstance(augment_modes, str) else augment_modes))
    bad = [m for m in modes if m not in AUGMENT_MODES]
    if bad or not modes:
        raise ValueError(f"unknown augment mode(s) {bad}; valid modes: {', '.join(AUGMENT_MODES)}")
    if table.views is None and ("views" in modes or tta):
        raise DatasetError("augment mode 'views' and test-time augmentation need features of augmented views, "
                           "and this feature table has none")
    return modes


def run_cv(
    table: FeatureTable,
    heads: Sequence[str],
    grids: Mapping[str, Mapping] | None = None,
    n_folds: int = 5,
    repeats: int = 1,
    seed: int = 0,
    augment_modes: Sequence[str] | None = None,
    tta: bool = False,
    n_jobs: int = -1,
    cache_dir: Path | None = None,
    progress: ProgressCallback | None = None,
    nested: bool = False,
    stage: str = "evaluate",
) -> CVResult:
    """Cross-validate every head x grid point x augment mode on the same folds.

    `nested=True` also fits every configuration on each pair of folds (see `pair_folds`), so that
    `featurepipe.evaluation.nested` can score the whole selection procedure; the leaderboard is unchanged.

    `augment_modes=None` means ("none", "views") when the table has views, else ("none",).
    `grids` maps a head to overrides of its default grid (see `heads.param_grid`).
    With `tta`, "views" rows score each validation image by the mean probability over it and its views.
    """
    heads = list(dict.fromkeys(heads))
    if not heads:
        raise ValueError("no heads to evaluate")
    grids = dict(grids or {})
    for name in [*heads, *grids]:
        head_entry(name)
    stray = sorted(set(grids) - set(heads))
    if stray:
        raise ValueError(f"grids given for head(s) not being evaluated: {', '.join(stray)}")
    modes = _augment_modes(table, augment_modes, tta)
    if nested and n_folds < 3:
        raise DatasetError(f"nested cross-validation needs at least 3 folds (the inner search trains without "
                           f"two of them), got {n_folds}; use --folds 3 or more, or --no-nested")
    folds = make_folds(table.y, table.groups, n_folds, repeats, seed, class_names=table.classes)
    plan = fold_plan_id(folds)
    fits = folds + pair_folds(folds) if nested else folds
    units = [
        _Unit(h, json.dumps(p, sort_keys=True), p, mode, bool(tta) and mode == "views", f)
        for h in heads for p in param_grid(h, grids.get(h)) for mode in modes for f in fits
    ]

    records: dict[int, dict] = {}
    paths: dict[int, Path] = {}
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        for i, u in enumerate(units):
            paths[i] = cache_dir / u.cache_name(table.identity_for(u.augment), table.classes, seed, plan)
            rec = _read_cached(paths[i], u, len(table.classes))
            if rec is not None:
                records[i] = rec
    reused = len(records)
    total = len(units)
    report(progress, stage, reused, total, f"reused {reused} cached fold results" if reused else "")

    def task(i: int):
        u = units[i]
        views = table.views if u.augment == "views" else None
        return delayed(_fit_fold_and_keep)(paths.get(i), table.X, table.y, views, table.classes, u.head, u.kwargs,
                                           u.augment, u.tta, u.fold.train_idx, u.fold.val_idx, seed)

    def store(i: int, rec: dict) -> None:
        records[i] = rec      # already on disk (see _fit_fold_and_keep)
        u = units[i]
        report(progress, stage, len(records), total,
               f"{u.head} {u.params} augment={u.augment} repeat {u.fold.repeat} fold {u.fold.pair or u.fold.fold}")

    pending = [i for i in range(total) if i not in records]
    pooled = [i for i in pending if not head_entry(units[i].head).in_process]
    local = [i for i in pending if head_entry(units[i].head).in_process]
    # joblib starts dispatching as soon as the generator exists, so the in-process heads below run
    # while the pool works: TensorFlow's import and tracing are mostly single-threaded and would
    # otherwise leave a core idle for seconds. (With n_jobs=1 the pool runs lazily, after them.)
    with workers_exit_with_parent():   # issue 12: a killed evaluate leaves no workers behind
        pool = Parallel(n_jobs=n_jobs, return_as="generator")(task(i) for i in pooled) if pooled else iter(())
    try:
        for i in local:
            fn, args, kwargs = task(i)
            store(i, fn(*args, **kwargs))
    except Exception:
        # Keep what the pool computes even when an in-process fit failed, so a re-run resumes from it.
        # (Not on Ctrl-C: that should stop now, and joblib cancels the pool when it is dropped.)
        for i, rec in zip(pooled, pool):
            store(i, rec)
        raise
    for i, rec in zip(pooled, pool):
        store(i, rec)

    standard = [i for i, u in enumerate(units) if u.fold.pair is None]
    result = _assemble(table, [units[i] for i in standard], {n: records[i] for n, i in enumerate(standard)},
                       n_folds, repeats, plan, fitted=len(pending), reused=reused)
    result.plan = folds
    for i, u in enumerate(units):
        rec = records[i]
        result.proba[(u.head, u.params, u.augment, u.fold.repeat, u.fold.pair or u.fold.fold)] = (
            np.asarray(rec["val_idx"], dtype=int),
            np.asarray(rec["proba"], dtype=np.float64).reshape(len(rec["val_idx"]), len(table.classes)))
    return result


def _assemble(table, units, records, n_folds, repeats, plan, *, fitted, reused) -> CVResult:
    classes = table.classes
    names = metric_names(classes)
    fold_rows = []
    for i, u in enumerate(units):
        rec = records[i]
        m = rec["metrics"]
        fold_rows.append({
            "head": u.head, "params": u.params, "augment": u.augment, "tta": u.tta,
            "repeat": u.fold.repeat, "fold": u.fold.fold,
            "n_train": len(u.fold.train_idx), "n_val": len(u.fold.val_idx),
            **{k: m[k] for k in names},
            "confusion_matrix": json.dumps(m["confusion_matrix"]),
            "fit_seconds": rec["seconds"], "warnings": "; ".join(rec["warnings"]),
        })
    folds_df = pd.DataFrame(fold_rows)

    config = ["head", "params", "augment", "tta"]
    board_rows = []
    for key, grp in folds_df.groupby(config, sort=False):
        row = dict(zip(config, key), n_folds=n_folds, repeats=repeats)
        for k in names:
            row[f"{k}_mean"], row[f"{k}_std"], row[f"{k}_ci_low"], row[f"{k}_ci_high"] = _summary(grp[k], _metric_range(k))
        board_rows.append(row)
    board = pd.DataFrame(board_rows).sort_values(
        ["accuracy_mean", "log_loss_mean", "head", "params", "augment"],
        ascending=[False, True, True, True, True], kind="mergesort", na_position="last",
    ).reset_index(drop=True)
    board.insert(0, "rank", np.arange(1, len(board) + 1))

    oof_parts = []
    paths = np.asarray(table.paths, dtype=object)
    class_arr = np.asarray(classes, dtype=object)
    for i, u in enumerate(units):
        idx = np.asarray(records[i]["val_idx"], dtype=int)
        proba = np.asarray(records[i]["proba"], dtype=np.float64).reshape(len(idx), len(classes))
        part = pd.DataFrame({
            "head": u.head, "params": u.params, "augment": u.augment, "tta": u.tta,
            "repeat": u.fold.repeat, "fold": u.fold.fold, "row": idx, "path": paths[idx],
            "true": class_arr[table.y[idx]], "pred": class_arr[proba.argmax(axis=1)],
        })
        for j, c in enumerate(classes):
            part[f"p[{c}]"] = proba[:, j]
        oof_parts.append(part)
    oof = pd.concat(oof_parts, ignore_index=True)
    order = {(u.head, u.params, u.augment): n for n, u in enumerate(units)}
    oof["_config"] = [order[k] for k in zip(oof["head"], oof["params"], oof["augment"])]
    oof = oof.sort_values(["_config", "repeat", "row"], kind="mergesort").drop(columns="_config").reset_index(drop=True)

    top = board.iloc[0]
    best = {"head": top["head"], "params": json.loads(top["params"]), "augment": top["augment"], "tta": bool(top["tta"])}
    return CVResult(board, folds_df, oof, fitted, reused, best, plan)


def refit(table: FeatureTable, head: str, params: Mapping | None = None, augment: str = "none", seed: int = 0):
    """The head fitted on every image (plus every image's views when augment == "views")."""
    if augment not in AUGMENT_MODES:
        raise ValueError(f"unknown augment mode '{augment}'; valid modes: {', '.join(AUGMENT_MODES)}")
    if augment == "views" and table.views is None:
        raise DatasetError("augment mode 'views' needs features of augmented views, and this feature table has none")
    X, y = _training_rows(table.X, table.y, table.views if augment == "views" else None, np.arange(len(table.y)))
    return make_head(head, params, seed).fit(X, y)
