"""Cross-validation of classifier heads on in-memory features: arrays in, tables out.

Every (head, params, augment mode, fold) is one unit of work with its own small JSON result in the
cache directory, so an interrupted or extended run only fits what is missing. The pieces: folds.py
(the splits), metrics.py (per-fold scores and their summary), fits.py (one unit of work and its
cached result); this module holds the feature table, runs the units and assembles the tables.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from joblib import Parallel, delayed

from featurepipe.core.errors import DatasetError, UsageError
from featurepipe.core.progress import ProgressCallback, report
from featurepipe.core.workers import workers_exit_with_parent
from featurepipe.evaluation.fits import _fit_fold_and_keep, _read_cached, _training_rows, _Unit
from featurepipe.evaluation.folds import fold_plan_id, make_folds, pair_folds
from featurepipe.evaluation.metrics import _metric_range, _summary, metric_names
from featurepipe.heads import head_entry, make_head, param_grid

AUGMENT_MODES = ("none", "views")


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


# ---------------------------------------------------------------- run


def _augment_modes(table: FeatureTable, augment_modes, tta: bool) -> tuple[str, ...]:
    if augment_modes is None:
        modes = AUGMENT_MODES if table.views is not None else ("none",)
    else:
        modes = tuple(dict.fromkeys([augment_modes] if isinstance(augment_modes, str) else augment_modes))
    bad = [m for m in modes if m not in AUGMENT_MODES]
    if bad or not modes:
        raise UsageError(f"unknown augment mode(s) {bad}; valid modes: {', '.join(AUGMENT_MODES)}")
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
        raise UsageError("no heads to evaluate")
    grids = dict(grids or {})
    for name in [*heads, *grids]:
        head_entry(name)
    stray = sorted(set(grids) - set(heads))
    if stray:
        raise UsageError(f"grids given for head(s) not being evaluated: {', '.join(stray)}")
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
    with workers_exit_with_parent():   # a killed evaluate leaves no workers behind
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
        raise UsageError(f"unknown augment mode '{augment}'; valid modes: {', '.join(AUGMENT_MODES)}")
    if augment == "views" and table.views is None:
        raise DatasetError("augment mode 'views' needs features of augmented views, and this feature table has none")
    X, y = _training_rows(table.X, table.y, table.views if augment == "views" else None, np.arange(len(table.y)))
    return make_head(head, params, seed).fit(X, y)
