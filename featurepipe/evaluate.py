"""Stage `evaluate`: k-fold CV of heads on cached features, the best head refit and saved in a run dir.

Whatever features are missing are extracted first (through the store); after that only cached
features are touched, so comparing heads costs seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from featurepipe.atomic import write_csv  # issue 12
from featurepipe.rundir import prepare_run_dir  # issue 12
from featurepipe.artifacts import cached_head, remember_head, save_head, write_json
from featurepipe.backbones.fingerprint import library_versions
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.crossval import FeatureTable, fold_metrics, refit, run_cv
from featurepipe.dataset import Dataset
from featurepipe.errors import FeaturepipeError
from featurepipe.extract import ExtractReport, extract, open_stores
from featurepipe.features import dataset_features
from featurepipe.heads import HEADS
from featurepipe.images import AugmentPolicy
from featurepipe.paths import cache_root, runs_dir
from featurepipe.progress import ProgressCallback

DEFAULT_HEADS = ("linear_svm", "logreg", "dense")


@dataclass
class EvaluateReport:
    run_dir: Path
    leaderboard: pd.DataFrame
    best: dict
    holdout: dict[str, dict] = field(default_factory=dict)    # split -> metrics of the refit best head
    fitted: int = 0
    reused: int = 0
    extract: Optional[ExtractReport] = None
    images_used: int = 0
    images_missing: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        columns = [c for c in self.leaderboard.columns if not c.endswith(("_ci_low", "_ci_high")) or "accuracy" in c]
        return {
            "run_dir": str(self.run_dir), "best": self.best, "holdout": self.holdout,
            "leaderboard": json.loads(self.leaderboard[columns].to_json(orient="records")),
            "fitted": self.fitted, "reused": self.reused, "images_used": self.images_used,
            "images_missing": self.images_missing, "seconds": round(self.seconds, 3),
            "extract": self.extract.to_dict() if self.extract else None,
        }


def parse_grid(text: Optional[str]) -> Optional[dict]:
    """--grid: inline JSON ('{"logreg": {"C": [0.1, 1]}}') or a .toml / .json file with that shape."""
    if not text:
        return None
    path = Path(text)
    try:
        if path.suffix.lower() == ".toml" and path.exists():
            import tomllib

            grid = tomllib.loads(path.read_text())
        elif path.suffix.lower() == ".json" and path.exists():
            grid = json.loads(path.read_text())
        else:
            grid = json.loads(text)
    except (ValueError, OSError) as error:
        raise FeaturepipeError(f"--grid {text!r}: not valid JSON/TOML ({error}); expected "
                               f"{{\"head\": {{\"param\": [values]}}}}") from None
    if not isinstance(grid, dict) or not all(isinstance(v, dict) for v in grid.values()):
        raise FeaturepipeError(f"--grid must map head names to {{param: [values]}}, got {grid!r}")
    unknown = set(grid) - set(HEADS)
    if unknown:
        raise FeaturepipeError(f"--grid names unknown head(s) {', '.join(sorted(unknown))}; "
                               f"heads: {', '.join(HEADS)}")
    return {head: {k: v if isinstance(v, list) else [v] for k, v in params.items()} for head, params in grid.items()}


def _table_key(fingerprints: list[str], frame: pd.DataFrame) -> str:
    """Identity of what CV sees: the features AND the labels and groups (relabelling changes results)."""
    digest = hashlib.sha256("|".join(fingerprints).encode())
    for row in frame[["hash", "label", "group"]].itertuples(index=False):
        digest.update(f"{row.hash}:{row.label}:{row.group}\n".encode())
    return digest.hexdigest()


def _refit_key(table_key: str, best: dict, seed: int, tta: bool, frame: pd.DataFrame) -> str:
    """Everything the refit head and its holdout scores depend on, including the holdout rows."""
    holdout = frame[frame["split"] != "train"]
    text = json.dumps([table_key, best["head"], best["params"], best["augment"], seed, tta,
                       holdout[["hash", "label", "split"]].values.tolist()], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _new_run_dir(root: Path, dataset: Dataset, spec: BackboneSpec, explicit: Optional[Path]) -> Path:
    if explicit is not None:
        run_dir = Path(explicit)
    else:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{Path(dataset.source).stem}-{spec.name}")
        run_dir = runs_dir(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
    return prepare_run_dir(run_dir)   # issue 12: refuses a user's non-run folder (the CLI passes --overwrite)


def evaluate(
    dataset: Dataset,
    spec: BackboneSpec = BackboneSpec(),
    cache_dir: Optional[str | os.PathLike] = None,
    heads: tuple[str, ...] = DEFAULT_HEADS,
    grids: Optional[dict] = None,
    folds: int = 5,
    repeats: int = 1,
    seed: int = 0,
    augment: int = 0,
    augment_seed: int = 0,
    tta: bool = False,
    run_dir: Optional[Path] = None,
    n_jobs: int = -1,
    progress: Optional[ProgressCallback] = None,
) -> EvaluateReport:
    started = time.perf_counter()
    unknown = [h for h in heads if h not in HEADS]
    if unknown:
        raise FeaturepipeError(f"unknown head(s) {', '.join(unknown)}; heads: {', '.join(HEADS)}")
    root = cache_root(cache_dir)
    spec = spec.resolved()
    extracted = extract(dataset, spec, root, augment=augment, augment_seed=augment_seed, progress=progress)
    stores = open_stores(spec, root, augment, AugmentPolicy() if augment else None, augment_seed)
    features = dataset_features(dataset, stores)
    frame = features.frame
    classes = list(dataset.classes)
    label_index = {label: i for i, label in enumerate(classes)}
    train = (frame["split"] == "train").to_numpy()
    if not train.any():
        raise FeaturepipeError(f"{dataset.source} has no training images with features; nothing to evaluate")
    fingerprints = [s.fingerprint for s in (stores.originals, stores.views) if s is not None]
    train_frame = frame[train].reset_index(drop=True)
    groups = train_frame["group"].to_numpy() if train_frame["group"].notna().any() else None
    table = FeatureTable(
        X=features.X[train], y=train_frame["label"].map(label_index).to_numpy(), classes=classes,
        paths=train_frame["path"].tolist(), groups=groups,
        views=features.views[train] if features.views is not None else None,
        key=_table_key([stores.originals.fingerprint], train_frame),
        # The views store is shared by every K (rows hash@0..hash@K-1): K is part of what CV saw.
        views_key=f"{stores.views.fingerprint}:K={stores.augment}" if stores.views is not None else "",
    )
    modes = ("none", "views") if table.views is not None else ("none",)
    result = run_cv(table, list(heads), grids=grids, n_folds=folds, repeats=repeats, seed=seed,
                    augment_modes=modes, tta=tta, n_jobs=n_jobs, cache_dir=root / "evaluations", progress=progress)
    run_dir = _new_run_dir(root, dataset, spec, run_dir)
    write_csv(run_dir / "leaderboard.csv", result.leaderboard)   # issue 12: atomic (no 0-byte file after a kill)
    write_csv(run_dir / "folds.csv", result.folds)
    write_csv(run_dir / "oof_predictions.csv", result.oof)

    best = dict(result.best)
    meta = {"head": best["head"], "params": best["params"], "augment": best["augment"], "tta": tta,
            "classes": classes, "backbone": spec.to_dict(), "feature_fingerprint": stores.originals.fingerprint}
    # A fine-tuned model in a reused run dir grew from the previous best head: it no longer belongs.
    (run_dir / "model.json").unlink(missing_ok=True)
    refit_cache = root / "evaluations" / "refits" / _refit_key(table.key, best, seed, tta, frame)
    cached = cached_head(refit_cache, run_dir, meta)
    if cached is not None:
        holdout = cached["holdout"]
    else:
        estimator = refit(table, best["head"], best["params"], best["augment"], seed)
        holdout = _score_holdout(estimator, features, frame, classes, label_index, best, tta)
        save_head(estimator, run_dir, meta)
        remember_head(refit_cache, run_dir, {"holdout": holdout})
    if holdout:
        write_csv(run_dir / "holdout.csv", pd.DataFrame([{"split": k, **{m: v for m, v in d.items() if not isinstance(v, list)}}
                                                         for k, d in holdout.items()]))
    write_json(run_dir / "config.json", {
        "dataset": {"source": str(Path(dataset.source).resolve()), "layout": dataset.layout, "classes": classes,
                    "counts": dataset.class_counts(), "splits": dataset.splits, "warnings": dataset.warnings,
                    "failed": [{"path": f.path, "reason": f.reason} for f in extracted.failed]},
        "backbone": spec.to_dict(), "augment": augment, "augment_seed": augment_seed,
        "augment_policy": AugmentPolicy().to_dict() if augment else None,
        "heads": list(heads), "grids": grids, "folds": folds, "repeats": repeats, "seed": seed, "tta": tta,
        "cache_dir": str(root), "feature_fingerprints": fingerprints, "versions": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    return EvaluateReport(run_dir=run_dir, leaderboard=result.leaderboard, best=best, holdout=holdout,
                          fitted=result.fitted, reused=result.reused, extract=extracted,
                          images_used=int(train.sum()), images_missing=features.missing,
                          seconds=time.perf_counter() - started)


def _score_holdout(estimator, features, frame, classes, label_index, best, tta) -> dict[str, dict]:
    scores = {}
    for split in ("validation", "test"):
        rows = (frame["split"] == split).to_numpy()
        if not rows.any():
            continue
        proba = estimator.predict_proba(features.X[rows])
        if tta and best["augment"] == "views" and features.views is not None:
            views = features.views[rows]
            stacked = [proba] + [estimator.predict_proba(views[:, k]) for k in range(views.shape[1])]
            proba = np.mean(stacked, axis=0)
        y_true = frame.loc[rows, "label"].map(label_index).to_numpy()
        scores[split] = {"images": int(rows.sum()), **fold_metrics(y_true, proba, classes)}
    return scores
