"""Learning curve from cached features: accuracy against training images per class.

For every cross-validation fold and every size n (images per class), `draws` random subsets of n
training images per class are fitted with the same head and scored on the fold's whole validation
part, so every size is judged on the same images. "all" is the full training fold.

The reading compares the full fold with the largest size at most half of it: a gain larger than
its standard error means more photos will likely help. Without such a size the answer is "too few
images to tell", whatever the head: on 24 photos of 3 classes the curve had two points, 5 and
"all (~6)", and `inspect` (logreg) and `inspect --run-dir` (the run's head) read opposite advice
from the noise between them (issue 23). One rule, in `read_curve`, for every caller.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd

from featurepipe.evaluation.folds import make_folds

SIZES = (5, 10, 20, 40)
# A trend is read only across at least a doubling of the images per class: between 5 and ~6 the
# difference is noise, not a slope.
MIN_SPAN = 2.0
TOO_FEW = "too few images to tell"
VERDICTS = ("rising", "flat", "too_few")


@dataclass
class LearningCurve:
    points: pd.DataFrame       # per_class (int, -1 = all), label, images_per_class, accuracy_mean, accuracy_sem, fits
    reading: str               # plain words
    rising: Optional[bool]     # None when too few images to say
    verdict: str = "too_few"   # one of VERDICTS: rising / flat / too_few (what the reading says, for a report)


def learning_curve(X: np.ndarray, y: np.ndarray, make_head: Callable[[], object], groups=None,
                   sizes: Sequence[int] = SIZES, draws: int = 3, folds: int = 5, seed: int = 0,
                   class_names: Optional[Sequence[str]] = None) -> LearningCurve:
    """Accuracy vs images per class; raises ValueError when the data is too small for a curve.

    `class_names[k]` names class k in those messages."""
    X, y = np.asarray(X), np.asarray(y, dtype=int)
    counts = np.bincount(y) if len(y) else np.zeros(0, dtype=int)
    if len(counts[counts > 0]) < 2:
        raise ValueError(f"a learning curve needs training images with features in at least 2 classes; "
                         f"there are {len(y)} image(s) in {len(counts[counts > 0])} class(es)")
    n_folds = int(min(folds, counts[counts > 0].min()))
    if n_folds < 2:
        raise ValueError("too few images per class for a learning curve (each class needs at least 2)")
    if class_names is not None:   # named in make_folds' errors; classes without images are left out
        present = np.flatnonzero(counts)
        splits = make_folds(np.searchsorted(present, y), groups, n_folds=n_folds, seed=seed,
                            class_names=[str(class_names[k]) for k in present])
    else:
        splits = make_folds(y, groups, n_folds=n_folds, seed=seed)
    smallest = min(int(np.bincount(y[f.train_idx], minlength=len(counts))[counts > 0].min()) for f in splits)
    usable = [s for s in sorted(set(int(s) for s in sizes)) if 2 <= s < smallest]
    if not usable:
        raise ValueError(f"the smallest class has only {smallest} training images per fold, fewer than the "
                         f"smallest size ({min(sizes)}) of the curve; add photos or read the CV accuracy instead")
    rng = np.random.default_rng(seed)
    rows = []
    for size in [*usable, -1]:
        scores = []
        for fold in splits:
            for _ in range(draws if size > 0 else 1):
                train = fold.train_idx
                if size > 0:
                    train = np.concatenate([rng.choice(train[y[train] == c], size=size, replace=False)
                                            for c in np.unique(y[fold.train_idx])])
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = make_head().fit(X[train], y[train])
                scores.append(float(np.mean(model.predict(X[fold.val_idx]) == y[fold.val_idx])))
        scores = np.asarray(scores)
        per_class = size if size > 0 else int(np.round(np.mean([len(f.train_idx) for f in splits]) / len(np.unique(y))))
        rows.append({"per_class": size, "label": str(size) if size > 0 else f"all (~{per_class})",
                     "images_per_class": per_class, "accuracy_mean": float(scores.mean()),
                     "accuracy_sem": float(scores.std(ddof=1) / np.sqrt(len(scores))) if len(scores) > 1 else float("nan"),
                     "fits": len(scores)})
    points = pd.DataFrame(rows)
    return LearningCurve(points, *read_curve(points))


def read_curve(points: pd.DataFrame) -> tuple[str, Optional[bool], str]:
    """(reading, rising, verdict) of a curve whose last point is the full training fold."""
    if len(points) < 2:
        return f"{TOO_FEW}: only one size could be fitted", None, "too_few"
    last = points.iloc[-1]
    before_all = points.iloc[:-1]
    spans = before_all[before_all["images_per_class"] * MIN_SPAN <= last["images_per_class"]]
    if spans.empty:
        sizes = ", ".join(str(v) for v in points["label"])
        smallest = int(points["images_per_class"].min())
        return (f"{TOO_FEW}: the curve has only {sizes} training images per class, too close together for a "
                f"trend (it needs a fold's training part to hold at least {int(MIN_SPAN * smallest)} images per "
                f"class); read the cross-validated accuracy instead, and add photos to see whether more help"), \
            None, "too_few"
    before = spans.iloc[-1]
    gain = last["accuracy_mean"] - before["accuracy_mean"]
    noise = float(np.nan_to_num(np.hypot(last["accuracy_sem"], before["accuracy_sem"]), nan=0.0))
    step = (f"from {before['label']} to {last['label']} images per class accuracy goes "
            f"{before['accuracy_mean']:.3f} -> {last['accuracy_mean']:.3f} ({gain:+.3f}, noise ±{noise:.3f})")
    if gain > max(noise, 0.005):
        return f"accuracy is still rising ({step}): more photos per class will likely help", True, "rising"
    return (f"flat ({step}): more photos of the same kind will likely not help much; better labels, "
            f"a different backbone or harder examples will"), False, "flat"
