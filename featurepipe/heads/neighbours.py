"""The neighbour heads: k nearest neighbours (knn) and nearest class mean (ncm), both by cosine.

Both sit behind the linear heads' standardize + L2 front, so they compare directions. CosineKNN
and NearestClassMean are pickled inside fitted heads.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.pipeline import Pipeline
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from featurepipe.core.errors import UsageError
from featurepipe.heads.linear import PICKLED_AS, front
from featurepipe.heads.registry import register_head

KNN_MIN_DISTANCE = 1e-6


def _unit_rows(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


class CosineKNN(ClassifierMixin, BaseEstimator):
    """k nearest neighbours by cosine similarity, each neighbour's vote weighted by 1 / distance.

    Rows are L2-normalized first (cosine on pooled CNN features is the usual retrieval metric).
    k is clamped to the training rows, so the head fits folds with very few images. Probabilities
    are the normalized votes (0 for classes with no neighbour).
    """

    __module__ = PICKLED_AS     # see featurepipe.heads.linear

    def __init__(self, n_neighbors: int = 5):
        self.n_neighbors = n_neighbors

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)     # a continuous y would otherwise give one class per value
        if self.n_neighbors < 1:
            raise UsageError(f"n_neighbors must be >= 1, got {self.n_neighbors}")
        self.classes_, codes = np.unique(y, return_inverse=True)
        self.train_ = _unit_rows(X)
        self.onehot_ = np.eye(len(self.classes_))[codes]
        self.k_ = int(min(self.n_neighbors, len(X)))
        return self

    def predict_proba(self, X):
        check_is_fitted(self, "train_")
        X = validate_data(self, X, dtype=np.float64, reset=False)
        sims = _unit_rows(X) @ self.train_.T
        top = np.argpartition(-sims, self.k_ - 1, axis=1)[:, : self.k_]
        # Euclidean distance between unit vectors; the floor keeps an exact duplicate's weight finite.
        dist = np.sqrt(np.maximum(2.0 - 2.0 * np.take_along_axis(sims, top, axis=1), 0.0))
        weights = 1.0 / np.maximum(dist, KNN_MIN_DISTANCE)
        votes = np.einsum("nk,nkc->nc", weights, self.onehot_[top])
        return votes / votes.sum(axis=1, keepdims=True)

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


class NearestClassMean(ClassifierMixin, BaseEstimator):
    """Nearest class mean by cosine: softmax(temperature * cos(x, mean of class c)).

    With a handful of images per class a class mean is the most stable thing one can estimate;
    the fixed temperature only shapes the probabilities (log loss), never the predicted class.
    """

    __module__ = PICKLED_AS     # see featurepipe.heads.linear

    def __init__(self, temperature: float = 10.0):
        self.temperature = temperature

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)     # a continuous y would otherwise give one class per value
        self.classes_, codes = np.unique(y, return_inverse=True)
        means = np.stack([X[codes == c].mean(axis=0) for c in range(len(self.classes_))])
        self.means_ = _unit_rows(means)
        return self

    def decision_function(self, X):
        check_is_fitted(self, "means_")
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return self.temperature * (_unit_rows(X) @ self.means_.T)

    def predict_proba(self, X):
        z = self.decision_function(X)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def predict(self, X):
        return self.classes_[self.decision_function(X).argmax(axis=1)]


def _scaled(final):
    # The same standardize + L2 front as the linear heads: kNN and class means compare directions.
    return Pipeline([*front("standard"), ("clf", final)])


@register_head(
    "knn",
    defaults={"n_neighbors": 5},
    default_grid={"n_neighbors": [3, 9]},
    description="k nearest neighbours by cosine on standardized, L2-normalized features; 1/distance votes.",
    default=True,
    final_step="CosineKNN",
    to_keras="featurepipe.heads.to_keras:knn_to_keras",
)
def _knn(p: Mapping, seed: int):
    return _scaled(CosineKNN(n_neighbors=int(p["n_neighbors"])))


@register_head(
    "ncm",
    defaults={"temperature": 10.0},
    default_grid={"temperature": [10.0]},
    description="Nearest class mean by cosine (softmax over 10 x cosine): for very few images per class.",
    default=True,
    final_step="NearestClassMean",
    to_keras="featurepipe.heads.to_keras:ncm_to_keras",
)
def _ncm(p: Mapping, seed: int):
    return _scaled(NearestClassMean(temperature=float(p["temperature"])))
