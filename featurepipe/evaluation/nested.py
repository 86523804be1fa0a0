"""Nested cross-validation of the whole selection procedure, from fits the CV engine already made.

The search (feature sets x heads x params x augment modes, plus a soft-vote ensemble) picks one
configuration by mean CV accuracy. Its best leaderboard row is optimistic: it was chosen on the very
folds that score it. Nested CV scores the *procedure* instead: for each outer fold k, the selection
runs on the other folds only (an inner (k-1)-fold CV of k's training set) and the chosen
configuration, trained without fold k, is scored on fold k.

Every fit it needs already exists (crossval.run_cv(nested=True)): the inner fit for (outer k,
inner j) is the pair fit trained without folds j and k, and the outer fit is the standard fold fit.
No model is trained here; this is bookkeeping over probabilities, and fast.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from featurepipe.evaluation.crossval import CVResult
from featurepipe.evaluation.metrics import _metric_range, _summary, fold_metrics
from featurepipe.evaluation.selection import Fold, Picked, Rule, select_members

ENSEMBLE_SIZE = 3
# With several feature sets searched, the procedure is a soft vote across them: each feature set's best
# `VOTE_HEAD` (its C chosen by CV), probabilities averaged. Measured (benchmarks/accuracy.py and
# subsets of 8-30 images per class): +1 to +5 points over choosing one configuration on 10 of 12 sets,
# because picking among ~50 near-equal rows on small folds costs what the search gains, while
# averaging backbones and resize policies cancels much of each one's error. It is always chosen (not
# compared with single rows), so the inner search has nothing to overfit but C. With a selection Rule
# (SearchConfig.select_members) which sets vote is chosen too, by forward selection on the same folds
# priced by predict cost (evaluation.selection); measured to lose accuracy, so not by default.
VOTE = "vote"
VOTE_HEAD = "logreg"


@dataclass(frozen=True)
class Candidate:
    """One point of the search space; `members` makes it a soft-vote ensemble of other candidates."""
    features: str
    head: str
    params: str                     # canonical JSON
    augment: str
    members: tuple = ()             # (Candidate, ...) for the ensemble
    weights: tuple = ()             # a vote's member weights (summing to 1); () means equal

    @property
    def label(self) -> str:
        if self.head == VOTE:
            shares = [f" x{w:.2f}" for w in self.weights] if self.weights else [""] * len(self.members)
            return f"vote of {len(self.members)} feature sets (" + ", ".join(
                f"{m.features} {m.head} {m.params}{w}" for m, w in zip(self.members, shares)) + ")"
        if self.members:
            return f"{self.features} ensemble(" + ", ".join(f"{m.head} {m.params}" for m in self.members) + ")"
        return f"{self.features} {self.head} {self.params}" + (f" {self.augment}" if self.augment != "none" else "")

    def to_dict(self) -> dict:
        out = {"features": self.features, "head": self.head, "params": json.loads(self.params), "augment": self.augment}
        if self.members:
            out["members"] = [m.to_dict() for m in self.members]
        if self.weights:
            out["weights"] = list(self.weights)
        return out


@dataclass
class NestedResult:
    folds: pd.DataFrame              # one row per outer fold: what the inner search chose and its outer score
    oof: pd.DataFrame                # nested out-of-fold predictions, one row per image and repeat
    summary: dict                    # accuracy etc.: mean, std, 95% interval over outer folds
    best_inner_accuracy: float       # the best leaderboard row's mean (what a best-of-N headline would say)
    choices: dict = field(default_factory=dict)   # candidate label -> outer folds that chose it
    # With a vote: for k = 1..N members in forward selection's greedy order, the nested accuracy of the
    # vote capped at k members and the predict cost (Lite0 passes per image) of the full-data order's first k.
    frontier: list = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.summary["accuracy"]["mean"]

    @property
    def optimism_gap(self) -> float:
        return self.best_inner_accuracy - self.accuracy

    def to_dict(self) -> dict:
        return {"accuracy": self.summary["accuracy"], "metrics": self.summary,
                "best_inner_accuracy": self.best_inner_accuracy, "optimism_gap": self.optimism_gap,
                "choices": self.choices, "frontier": self.frontier,
                "folds": json.loads(self.folds.to_json(orient="records"))}


def candidates(results: Mapping[str, CVResult]) -> list[Candidate]:
    """Every leaderboard row of every feature set, in a fixed order (feature sets as given)."""
    out = []
    for features, result in results.items():
        for row in result.leaderboard.sort_values(["head", "params", "augment"]).itertuples():
            out.append(Candidate(features, row.head, row.params, row.augment))
    return out


def _proba(results, c: Candidate, repeat: int, fold) -> tuple[np.ndarray, np.ndarray]:
    if c.members:
        parts = [_proba(results, m, repeat, fold) for m in c.members]
        if any(not np.array_equal(rows, parts[0][0]) for rows, _ in parts[1:]):
            # Every feature set's table holds the same images in the same order (evaluate builds them so).
            raise ValueError(f"the members of {c.label} scored different rows on fold {fold}")
        if c.weights:
            return parts[0][0], np.sum([w * p for w, (_, p) in zip(c.weights, parts)], axis=0)
        return parts[0][0], np.mean([p for _, p in parts], axis=0)
    return results[c.features].proba[(c.head, c.params, c.augment, repeat, fold)]


def _score(y, results, c: Candidate, repeat: int, outer: int, inner: Sequence[int], fold_rows) -> tuple[float, float]:
    """Mean accuracy and log loss of candidate c over the inner folds of outer fold `outer`."""
    accs, losses = [], []
    for j in inner:
        rows, proba = _proba(results, c, repeat, (min(j, outer), max(j, outer)))
        keep = np.isin(rows, fold_rows[j])
        p, t = proba[keep], y[rows[keep]]
        accs.append(float(np.mean(p.argmax(axis=1) == t)))
        losses.append(float(-np.mean(np.log(np.clip(p[np.arange(len(t)), t], 1e-15, 1.0)))))
    return float(np.mean(accs)), float(np.mean(losses))


def ensemble_of(ranked: Sequence[Candidate], size: int = ENSEMBLE_SIZE) -> Candidate | None:
    """Soft vote of up to `size` candidates that share the top candidate's feature set and augment mode
    (so the ensemble is one head on one feature set): the best of each head, best heads first (a vote
    of one head at three C values would agree with itself)."""
    if not ranked or size < 2:
        return None
    top = ranked[0]
    members, heads = [], set()
    for c in ranked:
        if c.features == top.features and c.augment == top.augment and not c.members and c.head not in heads:
            members.append(c)
            heads.add(c.head)
    members = members[:size]
    if len(members) < 2:
        return None
    params = json.dumps({"members": [{"head": m.head, "params": json.loads(m.params)} for m in members]},
                        sort_keys=True)
    return Candidate(top.features, "ensemble", params, top.augment, tuple(members))


def vote_pool(ranked: Sequence[Candidate], feature_sets: Sequence[str], head: str = VOTE_HEAD) -> list[Candidate]:
    """What may vote: the best-ranked `head` candidate of each feature set (the best candidate of any
    head where a set has none of `head`), in the feature sets' order."""
    members = []
    for name in feature_sets:
        own = [c for c in ranked if c.features == name and not c.members]
        best = next((c for c in own if c.head == head), own[0] if own else None)
        if best is not None:
            members.append(best)
    return members


def as_vote(members: Sequence[Candidate], weights: Sequence[float] = ()) -> Candidate:
    """The soft vote of `members` (equal weights unless `weights` differ)."""
    weights = tuple(float(w) for w in weights)
    if weights and np.allclose(weights, weights[0]):
        weights = ()
    params = {"members": [m.to_dict() for m in members]}
    if weights:
        params["weights"] = list(weights)
    return Candidate(f"{len(members)} feature sets", VOTE, json.dumps(params, sort_keys=True), "none",
                     tuple(members), weights)


def vote_of(ranked: Sequence[Candidate], feature_sets: Sequence[str], head: str = VOTE_HEAD) -> Candidate | None:
    """Soft vote of every feature set's vote_pool member. None with fewer than two feature sets."""
    members = vote_pool(ranked, feature_sets, head)
    return as_vote(members) if len(members) >= 2 else None


def _member_folds(results, pool: Sequence[Candidate], y: np.ndarray, keys) -> list[Fold]:
    """Each pool member's probabilities on the folds `keys` ((repeat, fold or pair, rows kept or None)):
    the selection's data."""
    out = []
    for repeat, fold, keep_rows in keys:
        parts = [results[m.features].proba[(m.head, m.params, m.augment, repeat, fold)] for m in pool]
        rows = parts[0][0]
        if any(not np.array_equal(r, rows) for r, _ in parts[1:]):
            raise ValueError(f"the vote's members scored different rows on fold {fold}")
        keep = np.ones(len(rows), bool) if keep_rows is None else np.isin(rows, keep_rows)
        out.append(Fold(np.stack([p[keep] for _, p in parts]), y[rows[keep]]))
    return out


def selected_vote(pool: Sequence[Candidate], folds: Sequence[Fold], costs: Mapping[str, float], rule: Rule,
                  **limits) -> tuple[Candidate, Picked]:
    """The vote forward selection keeps from `pool` on `folds` (one member: that member alone)."""
    picked = select_members(folds, [costs.get(m.features, 1.0) for m in pool], objective=rule.objective,
                            lam=rule.lam, replace=rule.replace, **limits)
    members = [pool[i] for i in picked.members]
    return (members[0] if len(members) == 1 else as_vote(members, picked.weights)), picked


def select(scored: Sequence[tuple[Candidate, float, float]]) -> list[Candidate]:
    """Candidates ranked by accuracy (desc), then log loss (asc), then their fixed order: deterministic."""
    order = sorted(range(len(scored)), key=lambda i: (-scored[i][1], scored[i][2], i))
    return [scored[i][0] for i in order]


def nested_cv(results: Mapping[str, CVResult], y: np.ndarray, classes: Sequence[str], paths: Sequence[str],
              best_inner_accuracy: float, ensemble_size: int = ENSEMBLE_SIZE, vote: bool = True,
              costs: Optional[Mapping[str, float]] = None, rule: Optional[Rule] = None) -> NestedResult:
    """Nested CV over the candidates of every feature set (each run with run_cv(nested=True) on the
    same folds and rows). See the module docstring. With `vote` and several feature sets the procedure
    is the cross-feature-set vote, its members' C chosen on the inner folds, and with a `rule` its
    members too: forward selection priced by `costs` (feature set -> Lite0 passes per image; missing:
    1); rule=None: every set votes (vote_of). The frontier (the greedy order's prefixes, ordered by
    `rule` or the default Rule) is recorded whenever there is a vote."""
    y = np.asarray(y)
    costs = dict(costs or {})
    pool = candidates(results)
    plan = next(iter(results.values())).plan
    by_repeat: dict[int, dict[int, np.ndarray]] = {}
    for f in plan:
        by_repeat.setdefault(f.repeat, {})[f.fold] = np.asarray(f.val_idx)
    ordering = rule or Rule()
    rows, oof_parts, per_fold = [], [], []
    choices: dict[str, list] = {}
    capped: dict[int, list[float]] = {}     # k -> outer accuracy of the procedure capped at k members
    for repeat, fold_rows in by_repeat.items():
        for outer in sorted(fold_rows):
            inner = [j for j in sorted(fold_rows) if j != outer]
            scored = [(c, *_score(y, results, c, repeat, outer, inner, fold_rows)) for c in pool]
            ranked = select(scored)
            voted = vote_of(ranked, list(results)) if vote else None
            if voted is not None:
                members = vote_pool(ranked, list(results))
                folds = _member_folds(results, members, y,
                                      [(repeat, (min(j, outer), max(j, outer)), fold_rows[j]) for j in inner])
                if rule is not None:
                    voted, _ = selected_vote(members, folds, costs, rule)
                order = selected_vote(members, folds, costs, ordering, stop=False)[1].members
                for k in range(1, len(order) + 1):
                    val, proba = _proba(results, as_vote([members[i] for i in order[:k]]), repeat, outer)
                    capped.setdefault(k, []).append(float(np.mean(proba.argmax(axis=1) == y[val])))
            ensemble = None if voted is not None else ensemble_of(ranked, ensemble_size)
            if voted is not None:
                scored.append((voted, *_score(y, results, voted, repeat, outer, inner, fold_rows)))
                ranked = [voted] + ranked
            elif ensemble is not None:
                scored.append((ensemble, *_score(y, results, ensemble, repeat, outer, inner, fold_rows)))
                ranked = select(scored)
            chosen = ranked[0]
            inner_acc = next(a for c, a, _ in scored if c == chosen)
            val, proba = _proba(results, chosen, repeat, outer)
            metrics = fold_metrics(y[val], proba, classes)
            per_fold.append(metrics)
            choices.setdefault(chosen.label, []).append(f"{repeat}/{outer}")
            rows.append({"repeat": repeat, "fold": outer, "n_val": len(val), "chosen": chosen.label,
                         "chosen_config": json.dumps(chosen.to_dict(), sort_keys=True),
                         "inner_accuracy": inner_acc, "accuracy": metrics["accuracy"],
                         "log_loss": metrics["log_loss"], "f1_macro": metrics["f1_macro"],
                         "cost": _cost(chosen, costs)})
            part = pd.DataFrame({"repeat": repeat, "fold": outer, "row": val,
                                 "path": np.asarray(paths, dtype=object)[val],
                                 "true": np.asarray(classes, dtype=object)[y[val]],
                                 "pred": np.asarray(classes, dtype=object)[proba.argmax(axis=1)]})
            for j, c in enumerate(classes):
                part[f"p[{c}]"] = proba[:, j]
            oof_parts.append(part)
    summary = {}
    for name in ("accuracy", "balanced_accuracy", "f1_macro", "log_loss", "roc_auc"):
        mean, std, low, high = _summary([m[name] for m in per_fold], _metric_range(name))
        summary[name] = {"mean": mean, "std": std, "ci_low": low, "ci_high": high}
    oof = pd.concat(oof_parts, ignore_index=True).sort_values(["repeat", "row"], kind="mergesort").reset_index(drop=True)
    frontier = _frontier(results, y, costs, ordering, capped) if capped else []
    return NestedResult(pd.DataFrame(rows), oof, summary, float(best_inner_accuracy), choices, frontier)


def _cost(c: Candidate, costs: Mapping[str, float]) -> float:
    """Predict cost of a candidate in Lite0 passes per image (one pass per distinct feature set)."""
    return float(sum(costs.get(name, 1.0) for name in dict.fromkeys(m.features for m in (c.members or (c,)))))


def _frontier(results, y, costs, rule: Rule, capped: dict) -> list[dict]:
    """One row per k: the full-data greedy order's first k feature sets, their predict cost, and the
    nested accuracy of the procedure capped at k members (chosen on each outer fold's inner folds)."""
    members, folds = _standard_pool(results, y)
    order = selected_vote(members, folds, costs, rule, stop=False)[1].members
    out = []
    for k in range(1, len(order) + 1):
        first = [members[i] for i in order[:k]]
        out.append({"members": k, "feature_sets": [m.features for m in first],
                    "cost": _cost(as_vote(first), costs),
                    "nested_accuracy": float(np.mean(capped[k])) if k in capped else None})
    return out


def _standard_ranked(results: Mapping[str, CVResult]) -> tuple[list, list[Candidate]]:
    """Every candidate scored by its standard-CV fold means (already on the leaderboards), and ranked."""
    means = {(name, row.head, row.params, row.augment): (float(row.accuracy_mean), float(row.log_loss_mean))
             for name, result in results.items() for row in result.leaderboard.itertuples()}
    scored = [(c, *means[(c.features, c.head, c.params, c.augment)]) for c in candidates(results)]
    return scored, select(scored)


def _standard_pool(results: Mapping[str, CVResult], y: np.ndarray) -> tuple[list[Candidate], list[Fold]]:
    """The vote's pool as the full-data search ranks it, and its members' standard-CV probabilities."""
    members = vote_pool(_standard_ranked(results)[1], list(results))
    plan = next(iter(results.values())).plan
    return members, _member_folds(results, members, y, [(f.repeat, f.fold, None) for f in plan])


def leaderboard_ensemble(results: Mapping[str, CVResult], y: np.ndarray, classes: Sequence[str],
                         ensemble_size: int = ENSEMBLE_SIZE, vote: bool = True,
                         costs: Optional[Mapping[str, float]] = None,
                         rule: Optional[Rule] = None) -> tuple[list[Candidate], pd.DataFrame]:
    """The full-data selection (what gets refit and saved): every candidate and the ensemble of the top
    ones ranked by their standard-CV scores, or with `vote` and several feature sets the vote across
    them (with a `rule`, its members selected on the standard folds, priced by `costs`), first. Returns the
    ranking and the ensemble's (or vote's) per-fold metrics (none when the selection keeps one set)."""
    y = np.asarray(y)
    plan = next(iter(results.values())).plan

    def standard(c: Candidate) -> tuple[float, float, list[dict]]:
        metrics = []
        for f in plan:
            rows, proba = _proba(results, c, f.repeat, f.fold)
            metrics.append(fold_metrics(y[rows], proba, classes))
        return (float(np.mean([m["accuracy"] for m in metrics])), float(np.mean([m["log_loss"] for m in metrics])),
                metrics)

    scored, ranked = _standard_ranked(results)
    voted = vote_of(ranked, list(results)) if vote else None
    if voted is not None and rule is not None:
        members, folds = _standard_pool(results, y)
        voted, _ = selected_vote(members, folds, dict(costs or {}), rule)
        if not voted.members:   # one feature set kept: its own row leads, and there is no vote row
            return [voted] + [c for c in ranked if c != voted], pd.DataFrame()
    ensemble = voted if voted is not None else ensemble_of(ranked, ensemble_size)
    ensemble_folds = pd.DataFrame()
    if ensemble is not None:
        acc, loss, metrics = standard(ensemble)
        scored.append((ensemble, acc, loss))
        ranked = [voted] + ranked if voted is not None else select(scored)
        ensemble_folds = pd.DataFrame([{"repeat": f.repeat, "fold": f.fold, **{k: v for k, v in m.items()}}
                                       for f, m in zip(plan, metrics)])
    return ranked, ensemble_folds
