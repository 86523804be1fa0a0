"""Registry of classifier heads trained on bottleneck features.

A head is a function (params, seed) -> unfitted scikit-learn classifier with `predict_proba`,
plus a small default grid. Adding a head means adding one `HeadEntry` to `HEADS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import ParameterGrid, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import LinearSVC


@dataclass(frozen=True)
class HeadEntry:
    name: str
    build: Callable[[dict, int], Any]   # (params, seed) -> unfitted estimator; rejects unknown params
    default_grid: dict[str, list]
    description: str
    # Heads that load TensorFlow run sequentially in the calling process: a joblib worker each
    # would import TensorFlow (seconds and hundreds of MB apiece) and fight over the same cores.
    in_process: bool = False


def _resolve(head: str, params: Mapping | None, defaults: dict) -> dict:
    params = dict(params or {})
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for head '{head}'; "
            f"valid parameters: {', '.join(sorted(defaults))}"
        )
    return {**defaults, **params}


class CalibrationFolds:
    """Stratified k-fold for Platt scaling with k shrunk to the smallest class (never below 2).

    Small datasets are the point of this project: a CV training fold may hold only 2 images of a
    class, where CalibratedClassifierCV(cv=3) would refuse to fit. It has no `n_splits` attribute on
    purpose, so CalibratedClassifierCV does not apply its fixed-k class-count check.
    """

    def __init__(self, max_splits: int = 3):
        self.max_splits = max_splits

    def _k(self, y) -> int:
        counts = np.unique(np.asarray(y), return_counts=True)[1]
        return int(max(2, min(self.max_splits, counts.min())))

    def get_n_splits(self, X=None, y=None, groups=None) -> int:
        return self.max_splits if y is None else self._k(y)

    def split(self, X, y, groups=None):
        return StratifiedKFold(n_splits=self._k(y)).split(X, y)

    def __repr__(self) -> str:
        return f"CalibrationFolds(max_splits={self.max_splits})"


def _linear_svm(params: Mapping, seed: int):
    p = _resolve("linear_svm", params, {"C": 1.0, "class_weight": None, "max_iter": 2000})
    svm = LinearSVC(C=p["C"], class_weight=p["class_weight"], dual="auto", max_iter=p["max_iter"], random_state=seed)
    return Pipeline([
        # Standardize, then L2-normalize: pooled CNN features vary in overall magnitude from image
        # to image, and unit-norm rows make C comparable across backbones and keep liblinear fast.
        ("scale", StandardScaler()),
        ("l2", Normalizer()),
        # Platt scaling on 3 inner folds, averaging the 3 calibrated SVMs (ensemble=True): 3 fits on
        # 2/3 of the rows, a third cheaper than ensemble=False (3 inner fits + 1 on all rows).
        ("svm", CalibratedClassifierCV(svm, method="sigmoid", cv=CalibrationFolds(3), ensemble=True)),
    ])


def _logreg(params: Mapping, seed: int):
    p = _resolve("logreg", params, {"C": 1.0, "class_weight": None, "max_iter": 1000})
    # lbfgs fits the multinomial (softmax) model for 3+ classes. Unit-norm rows (as for the SVM)
    # condition the problem far better than standardization alone: 2-4x fewer lbfgs iterations.
    clf = LogisticRegression(C=p["C"], class_weight=p["class_weight"], max_iter=p["max_iter"], solver="lbfgs", random_state=seed)
    return Pipeline([("scale", StandardScaler()), ("l2", Normalizer()), ("logreg", clf)])


# DenseHeadClassifier's defaults except batch_size: 128 rather than 32 halves the head's CV time on
# a few thousand rows at the same accuracy (per-step optimizer overhead dominates on CPU), and on
# tens of images both are nearly full-batch anyway.
_DENSE_DEFAULTS = {
    "hidden_units": 256, "dropout": 0.5, "learning_rate": 1e-3, "epochs": 100,
    "batch_size": 128, "patience": 10, "validation_fraction": 0.15,
}


def _dense(params: Mapping, seed: int):
    from featurepipe.dense_head import DenseHeadClassifier  # keeps TF out of sklearn-only imports

    return DenseHeadClassifier(**_resolve("dense", params, _DENSE_DEFAULTS), random_state=seed)


HEADS: dict[str, HeadEntry] = {
    e.name: e
    for e in [
        HeadEntry(
            name="linear_svm",
            build=_linear_svm,
            default_grid={"C": [0.01, 0.1, 1.0]},
            description="Linear SVM on standardized, L2-normalized features; Platt-calibrated probabilities.",
        ),
        HeadEntry(
            name="logreg",
            build=_logreg,
            default_grid={"C": [0.1, 1.0, 10.0]},
            description="Multinomial logistic regression (lbfgs) on standardized, L2-normalized features.",
        ),
        HeadEntry(
            name="dense",
            build=_dense,
            default_grid={"hidden_units": [256]},
            description="Keras Dense(256, relu) -> Dropout(0.5) -> softmax, Adam, early-stopped on a stratified holdout.",
            in_process=True,
        ),
    ]
}


def head_entry(name: str) -> HeadEntry:
    try:
        return HEADS[name]
    except KeyError:
        raise ValueError(f"unknown head '{name}'; valid heads: {', '.join(HEADS)}") from None


def make_head(name: str, params: Mapping | None = None, seed: int = 0):
    """An unfitted estimator for head `name` with `params` over its defaults."""
    return head_entry(name).build(dict(params or {}), seed)


def param_grid(name: str, override: Mapping | None = None) -> list[dict]:
    """Expand the head's default grid, with `override` replacing or adding parameters.

    Scalars in `override` count as one-point lists. Every point is validated by building it.
    """
    entry = head_entry(name)
    grid = dict(entry.default_grid)
    for key, values in (override or {}).items():
        grid[key] = list(values) if isinstance(values, (list, tuple, np.ndarray)) else [values]
    points = [_plain(p) for p in ParameterGrid(grid)]
    for point in points:
        entry.build(point, 0)
    return points


def _plain(params: Mapping) -> dict:
    # numpy scalars would make the params JSON (cache key, leaderboard) depend on how they were typed.
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in sorted(params.items())}
