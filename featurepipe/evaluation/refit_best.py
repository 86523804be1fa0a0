"""The search's winner refit on all training images and saved in the run: one head, or each member
of a vote, reused from this user's signed refit cache when nothing it depends on changed, and scored
on the validation / test splits (never used for a choice)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from featurepipe.backbones.spec import BackboneSpec
from featurepipe.core.cachedirs import refits_dir
from featurepipe.evaluation.crossval import FeatureTable, refit
from featurepipe.evaluation.metrics import fold_metrics
from featurepipe.evaluation.nested import VOTE
from featurepipe.extraction.features import DatasetFeatures, FeatureStores
from featurepipe.heads import revisions
from featurepipe.rundir.layout import HOLDOUT
from featurepipe.rundir.heads_io import cached_head, remember_head
from featurepipe.rundir.run import Run


@dataclass
class SearchedSet:
    """One feature set as the search saw it."""

    name: str                    # its leaderboard name (evaluate.feature_set_name)
    spec: BackboneSpec           # resolved
    stores: FeatureStores        # the stores its features were read from
    features: DatasetFeatures    # every row, dedup groups applied
    table: FeatureTable          # the training rows CV used


def refit_key(table_key: str, best: dict, seed: int, tta: bool, frame: pd.DataFrame) -> str:
    """Everything the refit head and its holdout scores depend on, including the holdout rows."""
    holdout = frame[frame["split"] != "train"]
    text = json.dumps([table_key, best["head"], revisions(), best["params"], best["augment"], seed, tta,
                       holdout[["hash", "label", "split"]].values.tolist()], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def refit_best(run: Run, candidate, best: dict, searched: list[SearchedSet], results: dict, common: set,
               classes: list[str], config, root) -> dict[str, dict]:
    """Refit `candidate` (the search's top row; a vote refits each member in its own member run) and
    save it in `run`; returns split -> metrics of the saved model on the holdout images. `config`:
    the SearchConfig as the search resolved it (its seed and tta)."""
    seed, tta = config.seed, config.tta
    by_name = {s.name: s for s in searched}
    label_index = {label: i for i, label in enumerate(classes)}
    # A fine-tuned model in a reused run dir grew from the previous best head: it no longer belongs.
    run.clear_model()
    voting = candidate.head == VOTE
    members = candidate.members if voting else (candidate,)
    run.clear_members()   # an earlier vote's members (or none)
    holdout_parts: dict[str, list] = {}
    holdout = {}
    for index, member in enumerate(members):
        chosen = by_name[member.features]
        features = chosen.features
        member_best = {"head": member.head, "params": json.loads(member.params), "augment": member.augment,
                       "tta": bool(tta and member.augment == "views"), "features": member.features}
        meta = {**member_best, "tta": tta, "classes": classes, "backbone": chosen.spec.to_dict(),
                "feature_fingerprint": chosen.stores.originals.fingerprint}
        target = run.member(index) if voting else run
        rows = features.frame["hash"].isin(common).to_numpy()
        frame = features.frame[rows].reset_index(drop=True)
        holdout_features = DatasetFeatures(frame, features.X[rows],
                                           features.views[rows] if features.views is not None else None, [])
        refit_cache = refits_dir(root) / refit_key(chosen.table.key, member_best, seed, tta, frame)
        estimator = None
        cached = cached_head(refit_cache, target.path, meta)
        if cached is None:
            estimator = refit(chosen.table, member_best["head"], member_best["params"], member_best["augment"], seed)
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
        # Weights only where the selection made them unequal: an equal vote's file reads as before.
        weights = list(candidate.weights) or [None] * len(members)
        run.save_vote({**best, "tta": tta, "classes": classes},
                      [{"features": m.features, "head": m.head, "params": json.loads(m.params),
                        "cv_accuracy": _row_accuracy(results[m.features].leaderboard, m),
                        **({"weight": w} if w is not None else {})} for m, w in zip(members, weights)])
        shares = candidate.weights or None
        holdout = _holdout_metrics({split: (parts[0][0], np.average([p for _, p in parts], axis=0, weights=shares))
                                    for split, parts in holdout_parts.items()}, classes)
    run.remove(HOLDOUT)
    if holdout:
        run.write_csv(HOLDOUT, pd.DataFrame([{"split": k, **{m: v for m, v in d.items() if not isinstance(v, list)}}
                                             for k, d in holdout.items()]))
    return holdout


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
