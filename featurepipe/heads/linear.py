"""The linear heads (logreg, linear_svm) and the feature transforms in front of them.

A "front" is the transform a head applies to pooled CNN features before its classifier: signed
square root + L2, standardize + L2, or L2 alone (`front`). The neighbour heads reuse the standardize
+ L2 front. SignedSqrt and CalibrationFolds are pickled inside fitted heads.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import LinearSVC
from sklearn.utils.validation import check_is_fitted, validate_data

from featurepipe.core.errors import UsageError
from featurepipe.heads.registry import register_head

# Pickles name a class by its __module__: these classes keep the name they were pickled under
# before the heads were split into families (featurepipe.heads re-exports them), so a head written
# now is byte-for-byte what the previous version wrote, and both versions read each other's runs.
PICKLED_AS = "featurepipe.heads"

SQRT_EPS = 1e-12


class CalibrationFolds:
    """Stratified k-fold for Platt scaling with k shrunk to the smallest class (never below 2).

    Small datasets are the point of this project: a CV training fold may hold only 2 images of a
    class, where CalibratedClassifierCV(cv=3) would refuse to fit. It has no `n_splits` attribute on
    purpose, so CalibratedClassifierCV does not apply its fixed-k class-count check.
    """

    __module__ = PICKLED_AS

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


def signed_sqrt(X: np.ndarray, eps: float) -> np.ndarray:
    """sign(x) * sqrt(|x|), linear below |x| = eps (slope 1/sqrt(eps) instead of infinite)."""
    a = np.abs(X)
    return np.sign(X) * np.where(a >= eps, np.sqrt(np.maximum(a, eps)), a / np.sqrt(eps))


class SignedSqrt(TransformerMixin, BaseEstimator):
    """Power normalization of pooled CNN features: sign(x) * sqrt(|x|), so a few large activations
    stop dominating each row (see FRONTS for what it was measured against).

    Below |x| = eps (1e-12) it is linear, which changes no feature that matters but keeps the slope
    finite at 0, where pooled ReLU features often sit: the converted Keras head
    (to_keras.SignedSqrt, the same formula) can be fine-tuned through. Stateless."""

    __module__ = PICKLED_AS

    def __init__(self, eps: float = SQRT_EPS):
        self.eps = eps

    def fit(self, X, y=None):
        validate_data(self, X)
        return self

    def transform(self, X):
        check_is_fitted(self, "n_features_in_")
        return signed_sqrt(validate_data(self, X, reset=False), self.eps)


# The feature transform in front of the logreg head. Measured with nested CV of the default vote
# (9 feature sets; benchmarks/fronts.py, table in the README): "sqrt" scored at least "standard" on
# all 8 sets tried (the demo, 4 demo draws of 10-15 photos per class, Fashion-MNIST 12/30/100 per
# class), higher on 5 (+0.3 to +2.5 points), +1.0 point on average.
FRONTS = ("sqrt", "standard", "l2")


def front(name: str) -> list:
    """Pipeline steps for a front. sqrt: signed square root + L2; standard: standardize + L2; l2: L2 only."""
    if name == "sqrt":
        return [("sqrt", SignedSqrt()), ("l2", Normalizer())]
    if name == "standard":
        return [("scale", StandardScaler()), ("l2", Normalizer())]
    if name == "l2":
        return [("l2", Normalizer())]
    raise UsageError(f"unknown front {name!r} for head 'logreg'; valid fronts: {', '.join(FRONTS)}")


# C grids: rows are standardized and then L2-normalized, which shrinks each feature by ~sqrt(d),
# so useful C values are large (measured on 1280-d EfficientNet-Lite features of 4 photo and
# clothing sets: logreg plateaus from C~10, C=0.1 collapses to the majority class). Decade
# steps; evaluate widens a grid whose best C sits at an edge and beats its neighbour.


@register_head(
    "linear_svm",
    defaults={"C": 1.0, "class_weight": None, "max_iter": 2000},
    default_grid={"C": [0.1, 1.0, 10.0]},
    description="Linear SVM on standardized, L2-normalized features; Platt-calibrated probabilities.",
    class_weight=True,
    # Not searched by default: it scored like logreg on every measured set at 3x the cost (3
    # calibration fits per fit).
    final_step="CalibratedClassifierCV",
    to_keras="featurepipe.heads.to_keras:calibrated_linear_to_keras",
)
def _linear_svm(p: Mapping, seed: int):
    svm = LinearSVC(C=p["C"], class_weight=p["class_weight"], dual="auto", max_iter=p["max_iter"], random_state=seed)
    return Pipeline([
        # Standardize, then L2-normalize: pooled CNN features vary in overall magnitude from image
        # to image, and unit-norm rows make C comparable across backbones and keep liblinear fast.
        *front("standard"),
        # Platt scaling on 3 inner folds, averaging the 3 calibrated SVMs (ensemble=True): 3 fits on
        # 2/3 of the rows, a third cheaper than ensemble=False (3 inner fits + 1 on all rows).
        ("svm", CalibratedClassifierCV(svm, method="sigmoid", cv=CalibrationFolds(3), ensemble=True)),
    ])


@register_head(
    "logreg",
    defaults={"C": 1.0, "class_weight": None, "max_iter": 1000, "front": FRONTS[0]},
    default_grid={"C": [10.0, 100.0, 1000.0]},
    description="Multinomial logistic regression (lbfgs) on signed-sqrt, L2-normalized features (front: sqrt | standard | l2).",
    class_weight=True,
    default=True,
    final_step="LogisticRegression",
    to_keras="featurepipe.heads.to_keras:logistic_to_keras",
    revision=3,    # 2: signed sqrt + L2 front by default (was standardize + L2); 3: exact sqrt above 1e-12
)
def _logreg(p: Mapping, seed: int):
    # lbfgs fits the multinomial (softmax) model for 3+ classes. Unit-norm rows (as for the SVM)
    # condition the problem far better than standardization alone: 2-4x fewer lbfgs iterations.
    clf = LogisticRegression(C=p["C"], class_weight=p["class_weight"], max_iter=p["max_iter"], solver="lbfgs", random_state=seed)
    return Pipeline([*front(p["front"]), ("logreg", clf)])
