"""Which feature sets the vote keeps: forward selection on out-of-fold probabilities, priced by cost.

A vote of every searched feature set's best logreg pays one backbone pass per member and image at
predict time, whether or not a member carries any of the vote's gain. Caruana et al.'s ensemble
selection (ICML 2004) keeps only what adds: start with the best member, add the one that most
improves the objective, stop when none does. The objective is a score of the averaged out-of-fold
probabilities minus `lam` times the predict cost of the distinct members (featurepipe.evaluation.cost:
Lite0 passes per image), so a member that only adds cost is never taken, and a copy of a member
already in the vote (which changes no probability) neither.

Pure bookkeeping over probabilities the CV engine already made: nested.py runs it on the inner folds
of each outer fold (the headline scores the selection, not its result) and on the standard folds for
the saved model. Deterministic: ties go to the cheaper member, then the earlier one.

Measured (benchmarks/vote_selection.py, README "Which feature sets vote"): it cuts predict cost by
~80% but costs 0.8 points of nested accuracy on average (up to 3 on one set) against the plain vote of
every set on the benchmark sets, whose inner folds are too small to tell members apart; so it runs
only on request (SearchConfig.select_members, `--select-members`), while nested.json always records
its frontier. The defaults below are the best of the measured variants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

# What the selection maximises per fold, averaged over the selection's folds, before the cost term:
# "log_loss" (its negative) or "accuracy", which is too coarse on small folds (measured: 1 point worse).
OBJECTIVES = ("log_loss", "accuracy")
OBJECTIVE = "log_loss"
# Objective units given up per Lite0 pass of predict cost (log loss: nats; accuracy: a fraction).
LAMBDA = 0.005
# With replacement a member may be added again, which raises its weight in the average (measured: no
# better than without, and without keeps the saved vote an equal average).
REPLACE = False
# With replacement, a bound on the additions (Caruana's bags stay small; this only stops a loop).
MAX_STEPS = 50


@dataclass(frozen=True)
class Fold:
    """One selection fold: each pool member's probabilities for the same rows, and their true classes."""
    proba: np.ndarray      # (members, rows, classes)
    y: np.ndarray          # (rows,) class indices


@dataclass(frozen=True)
class Picked:
    """A selection: `order` is the sequence of additions (member indices; repeats with replacement)."""
    order: tuple[int, ...]

    @property
    def members(self) -> tuple[int, ...]:
        """The distinct members, in the order they were first picked."""
        return tuple(dict.fromkeys(self.order))

    @property
    def weights(self) -> tuple[float, ...]:
        """Each member's share of the average (how often it was added), in `members` order."""
        return tuple(self.order.count(m) / len(self.order) for m in self.members)


@dataclass(frozen=True)
class Rule:
    """How the vote's members are selected (`--select-members` uses the defaults)."""
    objective: str = OBJECTIVE
    lam: float = LAMBDA
    replace: bool = REPLACE


def _fold_score(proba: np.ndarray, y: np.ndarray, objective: str) -> float:
    if objective == "accuracy":
        return float(np.mean(proba.argmax(axis=1) == y))
    return float(np.mean(np.log(np.clip(proba[np.arange(len(y)), y], 1e-15, 1.0))))   # minus log loss


def select_members(folds: Sequence[Fold], costs: Sequence[float], *, objective: str = OBJECTIVE,
                   lam: float = LAMBDA, replace: bool = REPLACE, max_members: Optional[int] = None,
                   stop: bool = True) -> Picked:
    """Forward selection over the pool (the members of every fold's `proba`, priced by `costs`).

    `max_members` caps the distinct members; `stop=False` keeps adding the best new member even when
    it does not improve the objective (the greedy order the frontier reports), until the cap or the
    pool is exhausted."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")
    n = len(costs)
    if not folds or n == 0:
        raise ValueError("forward selection needs at least one fold and one member")
    if any(f.proba.shape[0] != n for f in folds):
        raise ValueError(f"every fold must give probabilities for all {n} members")
    cap = n if max_members is None else max(1, min(int(max_members), n))
    costs = np.asarray(costs, dtype=float)
    sums = [np.zeros(f.proba.shape[1:]) for f in folds]
    order: list[int] = []
    current = -np.inf

    def value(extra: int) -> float:
        chosen = set(order) | {extra}
        score = np.mean([_fold_score((s + f.proba[extra]) / (len(order) + 1), f.y, objective)
                         for s, f in zip(sums, folds)])
        return float(score - lam * costs[sorted(chosen)].sum())

    for _ in range(MAX_STEPS if replace else n):
        distinct = set(order)
        if len(distinct) >= cap:
            options = sorted(distinct) if replace else []
        else:
            options = [m for m in range(n) if replace or m not in distinct]
        if not options:
            break
        scored = [(value(m), -costs[m], -m) for m in options]
        best = max(range(len(options)), key=lambda i: scored[i])
        gain = scored[best][0] - current
        forced = not stop and len(distinct) < cap
        if order and gain <= 1e-12:
            if not forced:
                break
            # Forced on: the best *new* member (re-adding an old one cannot extend the order).
            new = [i for i, m in enumerate(options) if m not in distinct]
            if not new:
                break
            best = max(new, key=lambda i: scored[i])
        m = options[best]
        order.append(m)
        current = scored[best][0]
        for s, f in zip(sums, folds):
            s += f.proba[m]
    return Picked(tuple(order))


def eliminate_members(folds: Sequence[Fold], costs: Sequence[float], *, objective: str = OBJECTIVE,
                      lam: float = LAMBDA) -> Picked:
    """Backward elimination, for comparison: start from the equal vote of the whole pool and drop the
    member whose removal most improves the objective, until none does."""
    n = len(costs)
    costs = np.asarray(costs, dtype=float)
    kept = list(range(n))

    def value(members: list[int]) -> float:
        score = np.mean([_fold_score(f.proba[members].mean(axis=0), f.y, objective) for f in folds])
        return float(score - lam * costs[members].sum())

    current = value(kept)
    while len(kept) > 1:
        options = [(value([m for m in kept if m != drop]), costs[drop], -drop) for drop in kept]
        best = max(range(len(kept)), key=lambda i: options[i])
        if options[best][0] - current <= 1e-12:
            break
        current = options[best][0]
        kept.pop(best)
    return Picked(tuple(kept))
