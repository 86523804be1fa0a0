"""Stage `evaluate`: k-fold CV of heads on cached features, the best head refit and saved in a run dir.

`evaluate_features` is the stage: it takes the dataset's cached features (one DatasetFeatures per
feature set, read from the stores by featurepipe.extraction.features) and never builds a model, so comparing
heads costs seconds. `evaluate` is the convenience the tests and library users call: it extracts
whatever is missing first (featurepipe.extraction.extract), reads the features back and evaluates them.
Both take what to search as one evaluation.config.SearchConfig (annotated by name only: config.py
builds on this module's defaults, so importing it here would make a cycle). The steps of the stage
are the helpers below it; the refit of the winner is evaluation.refit_best.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from featurepipe.rundir import layout
from featurepipe.rundir.run import Run
from featurepipe.backbones.fingerprint import library_versions
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.evaluation.config import SearchConfig, feature_set_name
from featurepipe.evaluation.cost import pass_cost
from featurepipe.evaluation.crossval import FeatureTable, run_cv
from featurepipe.evaluation.folds import auto_folds
from featurepipe.evaluation.metrics import _metric_range, _summary
from featurepipe.evaluation.refit_best import SearchedSet, refit_best
from featurepipe.evaluation.selection import Rule
from featurepipe.data.dataset import Dataset, require_usable_images
from featurepipe.core.digest import digest
from featurepipe.core.errors import FeaturepipeError, UsageError
from featurepipe.extraction.extract import ExtractReport
from featurepipe.extraction.features import DatasetFeatures, cached_features
from featurepipe.heads import HEADS
from featurepipe.data.augment import AugmentSpec
from featurepipe.evaluation.nested import VOTE, NestedResult, leaderboard_ensemble, nested_cv
from featurepipe.core.cachedirs import cache_root, evaluations_dir
from featurepipe.core.interrupts import held_interrupt
from featurepipe.core.progress import ProgressCallback



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
    nested: Optional[NestedResult] = None            # the headline: nested CV of the whole selection
    extracts: list[ExtractReport] = field(default_factory=list)   # one per searched spec
    notes: list[str] = field(default_factory=list)                # what the caller should be told
    folds: int = 0                                   # the fold count used (auto: 5 or the smallest class)

    def to_dict(self) -> dict:
        columns = [c for c in self.leaderboard.columns if not c.endswith(("_ci_low", "_ci_high")) or "accuracy" in c]
        return {
            "run_dir": str(self.run_dir), "best": self.best, "holdout": self.holdout,
            "leaderboard": json.loads(self.leaderboard[columns].to_json(orient="records")),
            "fitted": self.fitted, "reused": self.reused, "images_used": self.images_used,
            "images_missing": self.images_missing, "seconds": round(self.seconds, 3),
            "extract": self.extract.to_dict() if self.extract else None,
            "nested": self.nested.to_dict() if self.nested is not None else None, "notes": self.notes,
            "folds": self.folds,
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
        raise UsageError(f"--grid {text!r}: not valid JSON/TOML ({error}); expected "
                         f"{{\"head\": {{\"param\": [values]}}}}") from None
    if not isinstance(grid, dict) or not all(isinstance(v, dict) for v in grid.values()):
        raise UsageError(f"--grid must map head names to {{param: [values]}}, got {grid!r}")
    unknown = set(grid) - set(HEADS)
    if unknown:
        raise UsageError(f"--grid names unknown head(s) {', '.join(sorted(unknown))}; "
                         f"heads: {', '.join(HEADS)}")
    return {head: {k: v if isinstance(v, list) else [v] for k, v in params.items()} for head, params in grid.items()}


def _table_key(features: np.ndarray, frame: pd.DataFrame) -> str:
    """Identity of what CV sees: the feature values AND the labels and groups (relabelling changes
    results). The values, not the store's fingerprint: square photos have the very same features
    under squash, center_crop and letterbox (extract copies them), and their CV fits, nested fits and
    refits are then computed once, not three times. `features`: every row the run uses (the refit's
    holdout rows too), ~0.1 s of hashing per 10,000 x 1,280."""
    return digest(np.asarray(features, dtype=np.float32), frame[["hash", "label", "group"]])


def _class_weight_grid(y: np.ndarray, heads, grids: dict) -> dict:
    """Search class_weight="balanced" too when the classes are imbalanced (largest/smallest >= 1.5)."""
    counts = np.bincount(y)
    counts = counts[counts > 0]
    if len(counts) < 2 or counts.max() / counts.min() < 1.5:
        return grids
    out = dict(grids)
    for head in heads:
        if head in HEADS and HEADS[head].class_weight and "class_weight" not in out.get(head, {}):
            out[head] = {**out.get(head, {}), "class_weight": [None, "balanced"]}
    return out


# The C sweep widens by a decade while its best value sits at an edge of the grid and scores better
# than its neighbour (a plateau is no reason to go further), within these limits.
C_LIMITS = (1e-4, 1e5)
WIDEN_STEPS = 3


def _widen(results: dict, heads, grids: dict, user_grids: dict) -> dict:
    """Grids extended by one decade of C beyond the edge where the head's best C sits, if it wins there."""
    out = dict(grids)
    for head in heads:
        if "C" in (user_grids.get(head) or {}):
            continue   # the user's own grid is searched as given
        values = sorted({float(v) for v in out.get(head, {}).get("C", HEADS[head].default_grid.get("C", []))})
        if len(values) < 2:
            continue
        # The head's best row over the whole search decides: with many feature sets one of them will
        # sit at an edge by chance.
        boards = [(r.leaderboard, r.leaderboard[r.leaderboard["head"] == head]) for r in results.values()]
        boards = [b for _, b in boards if not b.empty]
        if not boards:
            continue
        top = max(boards, key=lambda b: (b.iloc[0]["accuracy_mean"], -b.iloc[0]["log_loss_mean"]))
        by_c: dict[float, float] = {}
        for row in top.itertuples():
            c = float(json.loads(row.params).get("C", np.nan))
            by_c[c] = max(by_c.get(c, -np.inf), float(row.accuracy_mean))
        best_c = float(json.loads(top.iloc[0]["params"]).get("C", np.nan))
        grow = set()
        if best_c == values[-1] and by_c[values[-1]] > by_c.get(values[-2], -np.inf) and values[-1] * 10 <= C_LIMITS[1]:
            grow.add(values[-1] * 10)
        if best_c == values[0] and by_c[values[0]] > by_c.get(values[1], -np.inf) and values[0] / 10 >= C_LIMITS[0]:
            grow.add(float(f"{values[0] / 10:.6g}"))
        if grow:
            out[head] = {**out.get(head, {}), "C": sorted(set(values) | grow)}
    return out


def evaluate(
    dataset: Dataset,
    config: Optional[SearchConfig] = None,
    cache_dir: Optional[str | os.PathLike] = None,
    *,
    run_dir: Optional[Path] = None,
    n_jobs: int = -1,
    progress: Optional[ProgressCallback] = None,
) -> EvaluateReport:
    """Extract what is missing for every feature set in `config.specs` (with config.augment's views),
    then evaluate_features on what the stores hold. `config`: an evaluation.config.SearchConfig;
    None: SearchConfig.quick(), what `featurepipe evaluate DATA` searches."""
    from featurepipe.extraction.shared import extract_many

    if config is None:
        config = SearchConfig.quick()
    started = time.perf_counter()
    root = cache_root(cache_dir)
    specs = list(dict.fromkeys(s.resolved() for s in config.specs))
    extracted = extract_many(dataset, specs, root, augment=config.augment, progress=progress)
    result = evaluate_features(dataset, cached_features(dataset, specs, root, config.augment), config, root,
                               run_dir=run_dir, n_jobs=n_jobs, progress=progress, extracts=extracted)
    result.seconds = time.perf_counter() - started
    return result


def evaluate_features(
    dataset: Dataset,
    features: Sequence[DatasetFeatures],
    config: SearchConfig,
    cache_dir: Optional[str | os.PathLike] = None,
    *,
    run_dir: Optional[Path] = None,
    n_jobs: int = -1,
    progress: Optional[ProgressCallback] = None,
    extracts: Sequence[ExtractReport] = (),
    hold_interrupts: bool = False,
    run_label: Optional[str] = None,
) -> EvaluateReport:
    """Cross-validate config.heads on the cached features of each feature set
    (featurepipe.extraction.features.cached_features: one DatasetFeatures per backbone spec, all with
    the same augmentation; they, not config.specs and config.augment, say what is searched), choose the best configuration (a soft-vote ensemble of the
    top ones included when config.ensemble >= 2), refit it on all training images and save it; with
    config.nested, score that whole selection by nested CV. `extracts`: what extraction reported for
    these feature sets (its failed images are recorded in config.json). `hold_interrupts`: hold a
    Ctrl-C while the run directory is written (core.interrupts), so that it stays one search's whole
    result (run's later stages rewrite a run that is already complete). `run_label`: what a new run
    folder is named after (default: the one backbone searched, or "search"); run's first stage
    evaluates one feature set of a wider search, and its folder is the whole search's.)"""
    started = time.perf_counter()
    root = cache_root(cache_dir)
    specs, names, augment = _feature_sets(features)
    extracted = list(extracts)
    notes = []
    loaded = [(f.stores, replace(f)) for f in features]   # copies: the dedup groups below are ours, not the caller's
    # Every feature set scores the same images: those with features in all of them (a file that
    # failed to decode fails for every backbone, so this only matters for a store damaged meanwhile).
    common = set.intersection(*(set(f.frame["hash"]) for _, f in loaded))
    require_usable_images(dataset, common, {f.path: f.reason for e in extracted for f in e.failed})
    dedup = _group_duplicates(dataset, loaded, root, config, progress)
    classes = list(dataset.classes)
    label_index = {label: i for i, label in enumerate(classes)}
    tables = {name: _feature_table(dataset, stores, features, common, label_index)
              for name, (stores, features) in zip(names, loaded)}
    first = tables[names[0]]
    folds, nested = config.folds, config.nested
    if folds is None:   # the default: 5, fewer when the smallest class (or its groups) is smaller
        folds, fewer = auto_folds(first.y, first.groups, classes)
        if fewer:
            notes.append(fewer)
    if nested and folds < 3:
        # Said in the result, config.json and the CLI summary: there is no headline to report.
        notes.append(f"nested CV skipped: it needs at least 3 folds (the inner search trains without two of "
                     f"them) and there are {folds}; the leaderboard's best row is optimistic")
        nested = False
    # The search as it ran: what config.json records and what every later step reads.
    config = replace(config, specs=tuple(specs), augment=augment, folds=folds, nested=nested)
    results, search_grids = _search(tables, config, root, n_jobs, progress)

    # Each feature set's predict price (Lite0 passes per image): what member selection (on request)
    # weighs each member's gain against, and what the frontier in nested.json reports.
    costs = {name: pass_cost(spec) for name, spec in zip(names, specs)}
    rule = Rule() if config.select_members else None
    ranked, ensemble_folds = leaderboard_ensemble(results, first.y, classes, config.ensemble, vote=config.vote,
                                                  costs=costs, rule=rule)
    leaderboard, fold_table, oof = _tables(results, ranked, ensemble_folds, folds, config.repeats)
    best_candidate = ranked[0]
    nested_result = None
    if nested:
        # The optimism gap compares with the best row a best-of-N headline would have shown.
        nested_result = nested_cv(results, first.y, classes, first.paths,
                                  float(leaderboard["accuracy_mean"].max()), config.ensemble, vote=config.vote,
                                  costs=costs, rule=rule)

    with held_interrupt() if hold_interrupts else nullcontext():
        # Run.new refuses a user's non-run folder (the CLI passes --overwrite)
        label = run_label or (specs[0].name if len(specs) == 1 else "search")
        run = Run.new(root, dataset.source, label, run_dir)
        _write_cv_tables(run, leaderboard, fold_table, oof, nested_result)
        best = {"head": best_candidate.head, "params": json.loads(best_candidate.params),
                "augment": best_candidate.augment, "tta": bool(config.tta and best_candidate.augment == "views"),
                "features": best_candidate.features}
        searched = [SearchedSet(name, spec, stores, features, tables[name])
                    for name, spec, (stores, features) in zip(names, specs, loaded)]
        holdout = refit_best(run, best_candidate, best, searched, results, common, classes, config, root)
        fingerprints = [s.fingerprint for stores, _ in loaded for s in (stores.originals, stores.views) if s is not None]
        failed = {f.path: f.reason for e in extracted for f in e.failed}
        voting = best_candidate.head == VOTE
        run.write_json(layout.CONFIG, {
            "dataset": {"source": str(Path(dataset.source).resolve()), "layout": dataset.layout, "classes": classes,
                        "counts": dataset.class_counts(), "splits": dataset.splits, "warnings": dataset.warnings,
                        "failed": [{"path": p, "reason": r} for p, r in failed.items()]},
            "backbone": None if voting else specs[names.index(best_candidate.features)].to_dict(),
            **config.to_dict(search_grids),
            "cache_dir": str(root), "feature_fingerprints": fingerprints, "versions": library_versions(),
            "dedup_groups": dedup.to_dict(), "edits": dataset.edits,   # leakage groups, --exclude/--relabel
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "notes": notes,
        })
    fitted = sum(r.fitted for r in results.values())
    return EvaluateReport(run_dir=run.path, leaderboard=leaderboard, best=best, holdout=holdout,
                          fitted=fitted, reused=sum(r.reused for r in results.values()),
                          extract=merge_extract_reports(extracted) if extracted else None, images_used=len(first.y),
                          images_missing=sorted(set(p for _, f in loaded for p in f.missing)),
                          seconds=time.perf_counter() - started, nested=nested_result, extracts=extracted,
                          notes=notes, folds=folds)


def _feature_sets(features: Sequence[DatasetFeatures]) -> tuple[list[BackboneSpec], list[str], AugmentSpec]:
    """The specs, leaderboard names and (shared) augmentation of the feature sets given, checked."""
    if not features or any(f.stores is None for f in features):
        raise FeaturepipeError("evaluate needs each feature set's features as read from its stores "
                               "(featurepipe.extraction.features.cached_features)")
    specs = [f.stores.spec for f in features]
    names = [feature_set_name(s) for s in specs]
    if len(set(names)) != len(names):
        raise FeaturepipeError(f"the same feature set is given twice ({', '.join(names)}); pass each spec once")
    augment = features[0].stores.augment_spec
    if any(f.stores.augment_spec != augment for f in features):
        raise FeaturepipeError("the feature sets were read with different augmentation; read them all with "
                               "one AugmentSpec")
    return specs, names, augment


def _group_duplicates(dataset: Dataset, loaded: list, root: Path, config: SearchConfig, progress):
    """Near-duplicates share a group, so StratifiedGroupKFold keeps them in one fold (merged with the
    user's groups; frames unchanged when none are found; recorded in config.json). Found once, on the
    first feature set, and applied to every feature set's rows (`loaded`: edited in place) by content
    hash. Returns the DedupGrouping."""
    from featurepipe.data.dedup import DedupGrouping, apply_duplicate_groups, fold_shortfall
    from featurepipe.core.errors import DatasetError

    dedup = DedupGrouping(False, 0, 0, 0, 0, 0.0, 0)
    if config.dedup_groups:
        first_features = loaded[0][1]
        grouped, dedup = apply_duplicate_groups(first_features.frame, first_features.X, root, progress=progress)
        if dedup.clusters:
            shortfall = fold_shortfall(first_features.frame, grouped, config.folds)   # None: auto folds (>= 2)
            if shortfall:   # say that the copies, not the user's data, leave a class too few groups
                raise DatasetError(shortfall)
            group_of = dict(zip(grouped["hash"], grouped["group"]))
            for _, features in loaded:
                features.frame = features.frame.assign(group=features.frame["hash"].map(group_of))
        if dedup.message and dedup.message not in dataset.warnings:
            dataset.warnings.append(dedup.message)   # printed by the CLI and kept in config.json
    return dedup


def _feature_table(dataset: Dataset, stores, features: DatasetFeatures, common: set, label_index: dict) -> FeatureTable:
    """What CV sees of one feature set: its training rows among the images every set has."""
    used = features.frame["hash"].isin(common).to_numpy()
    keep = used & (features.frame["split"] == "train").to_numpy()
    train_frame = features.frame[keep].reset_index(drop=True)
    if train_frame.empty:
        raise FeaturepipeError(f"{dataset.source} has no training images with features; nothing to evaluate")
    groups = train_frame["group"].to_numpy() if train_frame["group"].notna().any() else None
    return FeatureTable(
        X=features.X[keep], y=train_frame["label"].map(label_index).to_numpy(), classes=list(dataset.classes),
        paths=train_frame["path"].tolist(), groups=groups,
        views=features.views[keep] if features.views is not None else None,
        key=_table_key(features.X[used], train_frame),
        # The views store is shared by every K (rows hash@0..hash@K-1): K is part of what CV saw.
        views_key=f"{stores.views.fingerprint}:K={stores.augment}" if stores.views is not None else "",
    )


def _search(tables: dict, config: SearchConfig, root: Path, n_jobs: int, progress) -> tuple[dict, dict]:
    """CV of every head x grid point on every feature set, the C sweep widened while it wins at an
    edge; returns the per-set CV results and the grids searched last."""
    first = next(iter(tables.values()))
    user_grids = dict(config.grids or {})
    search_grids = _class_weight_grid(first.y, config.heads, user_grids)
    modes = ("none", "views") if first.views is not None else ("none",)

    def cross_validate(current: dict) -> dict:
        out = {}
        for n, (name, table) in enumerate(tables.items()):
            out[name] = run_cv(table, list(config.heads), grids=current, n_folds=config.folds,
                               repeats=config.repeats, seed=config.seed, augment_modes=modes, tta=config.tta,
                               n_jobs=n_jobs, cache_dir=evaluations_dir(root), progress=progress,
                               nested=config.nested, stage=f"evaluate {name} ({n + 1}/{len(tables)})")
        return out

    results = cross_validate(search_grids)
    for _ in range(WIDEN_STEPS if config.widen else 0):
        wider = _widen(results, config.heads, search_grids, user_grids)
        if wider == search_grids:
            break
        search_grids = wider
        results = cross_validate(search_grids)
    return results, search_grids


def _write_cv_tables(run: Run, leaderboard, fold_table, oof, nested_result: Optional[NestedResult]) -> None:
    """The leaderboard, per-fold scores, out-of-fold predictions and the nested headline (atomic
    writes: no 0-byte file after a kill); a previous headline goes when nested CV did not run."""
    run.write_csv(layout.LEADERBOARD, leaderboard)
    run.write_csv(layout.FOLDS, fold_table)
    run.write_csv(layout.OOF, oof)
    run.remove(layout.NESTED, layout.NESTED_FOLDS, layout.NESTED_OOF)
    if nested_result is not None:
        run.write_json(layout.NESTED, nested_result.to_dict())
        run.write_csv(layout.NESTED_FOLDS, nested_result.folds)
        run.write_csv(layout.NESTED_OOF, nested_result.oof)


def merge_extract_reports(reports: list[ExtractReport]) -> ExtractReport:
    """One summary of every searched spec's extraction (the first spec's identity, summed counts)."""
    first = reports[0]
    if len(reports) == 1:
        return first
    failed = {f.path: f for r in reports for f in r.failed}
    return replace(first, extracted=sum(r.extracted for r in reports), reused=sum(r.reused for r in reports),
                   failed=list(failed.values()), views_extracted=sum(r.views_extracted for r in reports),
                   views_reused=sum(r.views_reused for r in reports), seconds=sum(r.seconds for r in reports),
                   build_seconds=sum(r.build_seconds for r in reports), copied=sum(r.copied for r in reports))


def _tables(results: dict, ranked: list, ensemble_folds: pd.DataFrame, folds: int, repeats: int):
    """Leaderboard, per-fold table and out-of-fold predictions of every feature set, with a `features`
    column, and the ensemble's row; ranked as the selection ranked them."""
    boards, fold_parts, oof_parts = [], [], []
    for name, result in results.items():
        boards.append(result.leaderboard.drop(columns="rank").assign(features=name))
        fold_parts.append(result.folds.assign(features=name))
        oof_parts.append(result.oof.assign(features=name))
    board = pd.concat(boards, ignore_index=True)
    ensemble = next((c for c in ranked if c.members), None)
    if ensemble is not None and not ensemble_folds.empty:
        row = {"head": ensemble.head, "params": ensemble.params, "augment": ensemble.augment, "tta": False,
               "n_folds": folds, "repeats": repeats, "features": ensemble.features}
        for column in ensemble_folds.columns:
            if column in ("repeat", "fold", "confusion_matrix"):
                continue
            row[f"{column}_mean"], row[f"{column}_std"], row[f"{column}_ci_low"], row[f"{column}_ci_high"] = _summary(
                ensemble_folds[column], _metric_range(column))
        board = pd.concat([board, pd.DataFrame([row])], ignore_index=True)
        fold_parts.append(ensemble_folds.assign(head=ensemble.head, params=ensemble.params, augment=ensemble.augment,
                                                tta=False, features=ensemble.features))
        member_oof = [results[m.features].oof.query("head == @m.head and params == @m.params and augment == @m.augment")
                      .reset_index(drop=True) for m in ensemble.members]
        part = member_oof[0].copy()
        pcols = [c for c in part.columns if c.startswith("p[")]
        part[pcols] = np.mean([m[pcols].to_numpy() for m in member_oof], axis=0)
        part["pred"] = np.asarray([c[2:-1] for c in pcols], dtype=object)[part[pcols].to_numpy().argmax(axis=1)]
        oof_parts.append(part.assign(head=ensemble.head, params=ensemble.params, features=ensemble.features))
    order = {(c.features, c.head, c.params, c.augment): i for i, c in enumerate(ranked)}
    # A stable sort by search rank without adding a column: inserting one into the wide board made
    # pandas warn that the frame is fragmented (printed to the user's terminal).
    keys = [order.get(k, len(order)) for k in zip(board["features"], board["head"], board["params"], board["augment"])]
    board = board.iloc[np.argsort(np.asarray(keys), kind="stable")].reset_index(drop=True)
    board = pd.concat([pd.DataFrame({"rank": np.arange(1, len(board) + 1), "features": board["features"]}),
                       board.drop(columns="features")], axis=1)
    fold_table = pd.concat(fold_parts, ignore_index=True)
    fold_table.insert(0, "features", fold_table.pop("features"))
    oof = pd.concat(oof_parts, ignore_index=True)
    oof.insert(0, "features", oof.pop("features"))
    return board, fold_table, oof
