"""Stage `evaluate`: k-fold CV of heads on cached features, the best head refit and saved in a run dir.

`evaluate_features` is the stage: it takes the dataset's cached features (one DatasetFeatures per
feature set, read from the stores by featurepipe.extraction.features) and never builds a model, so comparing
heads costs seconds. `evaluate` is the convenience the tests and library users call: it extracts
whatever is missing first (featurepipe.extraction.extract), reads the features back and evaluates them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from featurepipe.rundir import run as rundir
from featurepipe.rundir.heads_io import cached_head, remember_head
from featurepipe.rundir.run import Run
from featurepipe.backbones.fingerprint import library_versions
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.backbones.registry import get_backbone
from featurepipe.evaluation.crossval import FeatureTable, refit, run_cv
from featurepipe.evaluation.folds import auto_folds
from featurepipe.evaluation.metrics import _metric_range, _summary, fold_metrics
from featurepipe.data.dataset import Dataset
from featurepipe.core.digest import digest
from featurepipe.core.errors import FeaturepipeError
from featurepipe.extraction.extract import ExtractReport
from featurepipe.extraction.features import DatasetFeatures, cached_features
from featurepipe.heads import HEADS, revisions
from featurepipe.data.augment import AugmentSpec
from featurepipe.evaluation.nested import ENSEMBLE_SIZE, VOTE, NestedResult, leaderboard_ensemble, nested_cv
from featurepipe.core.cachedirs import cache_root
from featurepipe.core.progress import ProgressCallback

DEFAULT_HEADS = ("linear_svm", "logreg", "dense")   # `evaluate` alone: one feature set, today's heads
# The searched pipeline (`run`): cheap heads only, so nested CV over every feature set stays in seconds.
# The dense head costs ~1 s a fit in TensorFlow and did not beat tuned logreg on the measured sets.
# linear_svm (3 calibration fits per fit) scored like logreg on every measured set at 3x the cost.
SEARCH_HEADS = ("logreg", "knn", "ncm")


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
        raise FeaturepipeError(f"--grid {text!r}: not valid JSON/TOML ({error}); expected "
                               f"{{\"head\": {{\"param\": [values]}}}}") from None
    if not isinstance(grid, dict) or not all(isinstance(v, dict) for v in grid.values()):
        raise FeaturepipeError(f"--grid must map head names to {{param: [values]}}, got {grid!r}")
    unknown = set(grid) - set(HEADS)
    if unknown:
        raise FeaturepipeError(f"--grid names unknown head(s) {', '.join(sorted(unknown))}; "
                               f"heads: {', '.join(HEADS)}")
    return {head: {k: v if isinstance(v, list) else [v] for k, v in params.items()} for head, params in grid.items()}


def _table_key(features: np.ndarray, frame: pd.DataFrame) -> str:
    """Identity of what CV sees: the feature values AND the labels and groups (relabelling changes
    results). The values, not the store's fingerprint: square photos have the very same features
    under squash, center_crop and letterbox (extract copies them), and their CV fits, nested fits and
    refits are then computed once, not three times. `features`: every row the run uses (the refit's
    holdout rows too), ~0.1 s of hashing per 10,000 x 1,280."""
    return digest(np.asarray(features, dtype=np.float32), frame[["hash", "label", "group"]])


def _refit_key(table_key: str, best: dict, seed: int, tta: bool, frame: pd.DataFrame) -> str:
    """Everything the refit head and its holdout scores depend on, including the holdout rows."""
    holdout = frame[frame["split"] != "train"]
    text = json.dumps([table_key, best["head"], revisions(), best["params"], best["augment"], seed, tta,
                       holdout[["hash", "label", "split"]].values.tolist()], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def feature_set_name(spec: BackboneSpec) -> str:
    """How a searched feature set is named in leaderboards: backbone/resize, plus what else differs."""
    info = get_backbone(spec.name)
    extra = "".join([f"@{spec.image_size}" if spec.image_size != info.default_size else "",
                     f":{spec.layer}" if spec.layer else "", f":{spec.pooling}" if spec.pooling != "avg" else ""])
    return f"{spec.name}{extra}/{spec.resize}"


def _class_weight_grid(y: np.ndarray, heads, grids: dict) -> dict:
    """Search class_weight="balanced" too when the classes are imbalanced (largest/smallest >= 1.5)."""
    counts = np.bincount(y)
    counts = counts[counts > 0]
    if len(counts) < 2 or counts.max() / counts.min() < 1.5:
        return grids
    out = dict(grids)
    for head in heads:
        if head in ("logreg", "linear_svm") and "class_weight" not in out.get(head, {}):
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
    spec: BackboneSpec = BackboneSpec(),
    cache_dir: Optional[str | os.PathLike] = None,
    heads: tuple[str, ...] = DEFAULT_HEADS,
    grids: Optional[dict] = None,
    folds: Optional[int] = None,
    repeats: int = 1,
    seed: int = 0,
    augment: AugmentSpec | int = 0,
    tta: bool = False,
    run_dir: Optional[Path] = None,
    n_jobs: int = -1,
    progress: Optional[ProgressCallback] = None,
    specs: Optional[Sequence[BackboneSpec]] = None,
    nested: bool = True,
    ensemble: int = ENSEMBLE_SIZE,
    widen: bool = True,
    dedup_groups: bool = True,
    vote: bool = True,
) -> EvaluateReport:
    """Extract what is missing for every spec in `specs` (default: just `spec`; `augment`: an
    AugmentSpec or a bare view count), then evaluate_features on what the stores hold."""
    from featurepipe.extraction.extract import extract

    started = time.perf_counter()
    _check_heads(heads)
    root = cache_root(cache_dir)
    augment = AugmentSpec.of(augment)
    specs = list(dict.fromkeys(s.resolved() for s in (specs or [spec])))
    extracted = [extract(dataset, s, root, augment=augment, progress=progress) for s in specs]
    result = evaluate_features(dataset, cached_features(dataset, specs, root, augment), root, heads=heads,
                               grids=grids, folds=folds, repeats=repeats, seed=seed, tta=tta, run_dir=run_dir,
                               n_jobs=n_jobs, progress=progress, nested=nested, ensemble=ensemble, widen=widen,
                               dedup_groups=dedup_groups, vote=vote, extracts=extracted)
    result.seconds = time.perf_counter() - started
    return result


def _check_heads(heads: Sequence[str]) -> None:
    unknown = [h for h in heads if h not in HEADS]
    if unknown:
        raise FeaturepipeError(f"unknown head(s) {', '.join(unknown)}; heads: {', '.join(HEADS)}")


def evaluate_features(
    dataset: Dataset,
    features: Sequence[DatasetFeatures],
    cache_dir: Optional[str | os.PathLike] = None,
    heads: tuple[str, ...] = DEFAULT_HEADS,
    grids: Optional[dict] = None,
    folds: Optional[int] = None,
    repeats: int = 1,
    seed: int = 0,
    tta: bool = False,
    run_dir: Optional[Path] = None,
    n_jobs: int = -1,
    progress: Optional[ProgressCallback] = None,
    nested: bool = True,
    ensemble: int = ENSEMBLE_SIZE,
    widen: bool = True,
    dedup_groups: bool = True,
    vote: bool = True,
    extracts: Sequence[ExtractReport] = (),
) -> EvaluateReport:
    """Cross-validate heads on the cached features of each feature set (featurepipe.extraction.features.cached_features:
    one DatasetFeatures per backbone spec, all with the same augmentation), choose the best configuration
    (a soft-vote ensemble of the top ones included when `ensemble` >= 2), refit it on all training
    images and save it; with `nested`, score that whole selection by nested CV. `extracts`: what
    extraction reported for these feature sets (its failed images are recorded in config.json)."""
    started = time.perf_counter()
    _check_heads(heads)
    root = cache_root(cache_dir)
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
    extracted = list(extracts)
    notes = []
    loaded = [(f.stores, replace(f)) for f in features]   # copies: the dedup groups below are ours, not the caller's
    # Every feature set scores the same images: those with features in all of them (a file that
    # failed to decode fails for every backbone, so this only matters for a store damaged meanwhile).
    common = set.intersection(*(set(f.frame["hash"]) for _, f in loaded))
    # ---- issue 11 hook: near-duplicates share a group, so StratifiedGroupKFold keeps them in one fold
    # (merged with the user's groups; frames unchanged when none are found; recorded in config.json).
    # Found once, on the first feature set, and applied to every feature set's rows by content hash.
    from featurepipe.data.dedup import DedupGrouping, apply_duplicate_groups, fold_shortfall
    from featurepipe.core.errors import DatasetError

    dedup = DedupGrouping(False, 0, 0, 0, 0, 0.0, 0)
    if dedup_groups:
        first_features = loaded[0][1]
        grouped, dedup = apply_duplicate_groups(first_features.frame, first_features.X, root, progress=progress)
        if dedup.clusters:
            # (Auto folds count the groups themselves: only a fold count the user chose can fall short.)
            shortfall = fold_shortfall(first_features.frame, grouped, folds) if folds is not None else None
            if shortfall:   # say that the copies, not the user's data, leave a class too few groups
                raise DatasetError(shortfall)
            group_of = dict(zip(grouped["hash"], grouped["group"]))
            for _, features in loaded:
                features.frame = features.frame.assign(group=features.frame["hash"].map(group_of))
        if dedup.message and dedup.message not in dataset.warnings:
            dataset.warnings.append(dedup.message)   # printed by the CLI and kept in config.json
    # ---- end of issue 11 hook
    classes = list(dataset.classes)
    label_index = {label: i for i, label in enumerate(classes)}
    tables = {}
    for name, (stores, features) in zip(names, loaded):
        used = features.frame["hash"].isin(common).to_numpy()
        keep = used & (features.frame["split"] == "train").to_numpy()
        train_frame = features.frame[keep].reset_index(drop=True)
        if train_frame.empty:
            raise FeaturepipeError(f"{dataset.source} has no training images with features; nothing to evaluate")
        groups = train_frame["group"].to_numpy() if train_frame["group"].notna().any() else None
        tables[name] = FeatureTable(
            X=features.X[keep], y=train_frame["label"].map(label_index).to_numpy(), classes=classes,
            paths=train_frame["path"].tolist(), groups=groups,
            views=features.views[keep] if features.views is not None else None,
            key=_table_key(features.X[used], train_frame),
            # The views store is shared by every K (rows hash@0..hash@K-1): K is part of what CV saw.
            views_key=f"{stores.views.fingerprint}:K={stores.augment}" if stores.views is not None else "",
        )
    first = tables[names[0]]
    if folds is None:   # the default: 5, fewer when the smallest class (or its groups) is smaller
        folds, fewer = auto_folds(first.y, first.groups, classes)
        if fewer:
            notes.append(fewer)
    if nested and folds < 3:
        # Said in the result, config.json and the CLI summary: there is no headline to report.
        notes.append(f"nested CV skipped: it needs at least 3 folds (the inner search trains without two of "
                     f"them) and there are {folds}; the leaderboard's best row is optimistic")
        nested = False
    user_grids = dict(grids or {})
    search_grids = _class_weight_grid(first.y, heads, user_grids)
    modes = ("none", "views") if first.views is not None else ("none",)

    def cross_validate(current: dict) -> dict:
        out = {}
        for n, (name, table) in enumerate(tables.items()):
            out[name] = run_cv(table, list(heads), grids=current, n_folds=folds, repeats=repeats, seed=seed,
                               augment_modes=modes, tta=tta, n_jobs=n_jobs, cache_dir=root / "evaluations",
                               progress=progress, nested=nested, stage=f"evaluate {name} ({n + 1}/{len(tables)})")
        return out

    results = cross_validate(search_grids)
    for _ in range(WIDEN_STEPS if widen else 0):
        wider = _widen(results, heads, search_grids, user_grids)
        if wider == search_grids:
            break
        search_grids = wider
        results = cross_validate(search_grids)

    ranked, ensemble_folds = leaderboard_ensemble(results, first.y, classes, ensemble, vote=vote)
    leaderboard, fold_table, oof = _tables(results, ranked, ensemble_folds, folds, repeats)
    best_candidate = ranked[0]
    nested_result = None
    if nested:
        # The optimism gap compares with the best row a best-of-N headline would have shown.
        nested_result = nested_cv(results, first.y, classes, first.paths,
                                  float(leaderboard["accuracy_mean"].max()), ensemble, vote=vote)

    # issue 12: Run.new refuses a user's non-run folder (the CLI passes --overwrite)
    run = Run.new(root, dataset.source, specs[0].name if len(specs) == 1 else "search", run_dir)
    run_dir = run.path
    run.write_csv(rundir.LEADERBOARD, leaderboard)   # issue 12: atomic (no 0-byte file after a kill)
    run.write_csv(rundir.FOLDS, fold_table)
    run.write_csv(rundir.OOF, oof)
    run.remove(rundir.NESTED, rundir.NESTED_FOLDS, rundir.NESTED_OOF)
    if nested_result is not None:
        run.write_json(rundir.NESTED, nested_result.to_dict())
        run.write_csv(rundir.NESTED_FOLDS, nested_result.folds)
        run.write_csv(rundir.NESTED_OOF, nested_result.oof)

    best = {"head": best_candidate.head, "params": json.loads(best_candidate.params),
            "augment": best_candidate.augment, "tta": bool(tta and best_candidate.augment == "views"),
            "features": best_candidate.features}
    # A fine-tuned model in a reused run dir grew from the previous best head: it no longer belongs.
    run.clear_model()
    voting = best_candidate.head == VOTE
    members = best_candidate.members if voting else (best_candidate,)
    run.clear_members()   # an earlier vote's members (or none)
    holdout_parts: dict[str, list] = {}
    for index, member in enumerate(members):
        chosen = names.index(member.features)
        stores, features = loaded[chosen]
        member_best = {"head": member.head, "params": json.loads(member.params), "augment": member.augment,
                       "tta": bool(tta and member.augment == "views"), "features": member.features}
        meta = {**member_best, "tta": tta, "classes": classes, "backbone": specs[chosen].to_dict(),
                "feature_fingerprint": stores.originals.fingerprint}
        target = run.member(index) if voting else run
        rows = features.frame["hash"].isin(common).to_numpy()
        frame = features.frame[rows].reset_index(drop=True)
        holdout_features = DatasetFeatures(frame, features.X[rows],
                                           features.views[rows] if features.views is not None else None, [])
        table = tables[member.features]
        refit_cache = root / "evaluations" / "refits" / _refit_key(table.key, member_best, seed, tta, frame)
        estimator = None
        cached = cached_head(refit_cache, target.path, meta)
        if cached is None:
            estimator = refit(table, member_best["head"], member_best["params"], member_best["augment"], seed)
            target.save_head(estimator, meta)
        elif voting and (frame["split"] != "train").any():
            estimator, _ = target.load_head()    # just copied from this user's signed refit cache
        parts = {} if estimator is None else _holdout_proba(estimator, holdout_features, frame, label_index,
                                                            member_best, tta)
        if cached is None:
            remember_head(refit_cache, target.path, {"holdout": _holdout_metrics(parts, classes)})
        if not voting:
            holdout = cached["holdout"] if cached is not None else _holdout_metrics(parts, classes)
        for split, part in parts.items():
            holdout_parts.setdefault(split, []).append(part)
    if voting:
        run.save_vote({**best, "tta": tta, "classes": classes},
                      [{"features": m.features, "head": m.head, "params": json.loads(m.params),
                        "cv_accuracy": _row_accuracy(results[m.features].leaderboard, m)} for m in members])
        holdout = _holdout_metrics({split: (parts[0][0], np.mean([p for _, p in parts], axis=0))
                                    for split, parts in holdout_parts.items()}, classes)
    run.remove(rundir.HOLDOUT)
    if holdout:
        run.write_csv(rundir.HOLDOUT, pd.DataFrame([{"split": k, **{m: v for m, v in d.items() if not isinstance(v, list)}}
                                                         for k, d in holdout.items()]))
    fingerprints = [s.fingerprint for stores, _ in loaded for s in (stores.originals, stores.views) if s is not None]
    failed = {f.path: f.reason for e in extracted for f in e.failed}
    run.write_json(rundir.CONFIG, {
        "dataset": {"source": str(Path(dataset.source).resolve()), "layout": dataset.layout, "classes": classes,
                    "counts": dataset.class_counts(), "splits": dataset.splits, "warnings": dataset.warnings,
                    "failed": [{"path": p, "reason": r} for p, r in failed.items()]},
        "backbone": None if voting else specs[names.index(best_candidate.features)].to_dict(), "search": {
            "feature_sets": {n: s.to_dict() for n, s in zip(names, specs)}, "heads": list(heads),
            "grids": search_grids, "ensemble": ensemble, "nested": nested, "widen": widen, "vote": vote},
        **augment.to_config(),
        "heads": list(heads), "grids": grids, "folds": folds, "repeats": repeats, "seed": seed, "tta": tta,
        "cache_dir": str(root), "feature_fingerprints": fingerprints, "versions": library_versions(),
        "dedup_groups": dedup.to_dict(), "edits": dataset.edits,   # issue 11: leakage groups, --exclude/--relabel
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "notes": notes,
    })
    fitted = sum(r.fitted for r in results.values())
    return EvaluateReport(run_dir=run_dir, leaderboard=leaderboard, best=best, holdout=holdout,
                          fitted=fitted, reused=sum(r.reused for r in results.values()),
                          extract=merge_extract_reports(extracted) if extracted else None, images_used=len(first.y),
                          images_missing=sorted(set(p for _, f in loaded for p in f.missing)),
                          seconds=time.perf_counter() - started, nested=nested_result, extracts=extracted,
                          notes=notes, folds=folds)


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


def _row_accuracy(board: pd.DataFrame, c) -> float:
    row = board[(board["head"] == c.head) & (board["params"] == c.params) & (board["augment"] == c.augment)]
    return float(row.iloc[0]["accuracy_mean"])


def _holdout_metrics(parts: dict, classes) -> dict[str, dict]:
    return {split: {"images": len(y_true), **fold_metrics(y_true, proba, classes)}
            for split, (y_true, proba) in parts.items()}


def _holdout_proba(estimator, features, frame, label_index, best, tta) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> (true class indices, probabilities) of the refit head on the validation / test images."""
    out = {}
    for split in ("validation", "test"):
        rows = (frame["split"] == split).to_numpy()
        if not rows.any():
            continue
        proba = estimator.predict_proba(features.X[rows])
        if tta and best["augment"] == "views" and features.views is not None:
            views = features.views[rows]
            stacked = [proba] + [estimator.predict_proba(views[:, k]) for k in range(views.shape[1])]
            proba = np.mean(stacked, axis=0)
        out[split] = (frame.loc[rows, "label"].map(label_index).to_numpy(), proba)
    return out
