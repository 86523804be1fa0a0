"""Cross-validation folds: stratified (group) k-fold splits, remembered by their inputs; the fold count
when the user gives none; nested CV's pair fits; and the id of a fold plan (part of every fit's cache key).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from sklearn.model_selection import RepeatedStratifiedKFold, StratifiedGroupKFold, StratifiedKFold

from featurepipe.core.digest import digest
from featurepipe.core.errors import DatasetError, UsageError


@dataclass(frozen=True, eq=False)
class Fold:
    repeat: int
    fold: int
    train_idx: np.ndarray
    val_idx: np.ndarray
    # Nested CV's inner fits: trained without folds j and k of the same repeat, validated on both.
    # Scored on fold j it is the inner fit of outer fold k, and the other way round (see nested.py).
    pair: tuple[int, int] | None = None


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
        raise UsageError(f"n_folds must be >= 2, got {n_folds}")
    if repeats < 1:
        raise UsageError(f"repeats must be >= 1, got {repeats}")
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
