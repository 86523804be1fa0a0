"""Registry of classifier heads trained on bottleneck features.

A head is a function (params, seed) -> unfitted scikit-learn classifier with `predict_proba`,
plus a small default grid, and how its fitted estimator becomes a Keras model (`to_keras`, for
fine-tuning and export). Adding a head means adding one `HeadEntry` to `HEADS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import ParameterGrid, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import LinearSVC
from sklearn.utils.validation import check_is_fitted, validate_data


SQRT_EPS = 1e-12


@dataclass(frozen=True)
class HeadEntry:
    name: str
    build: Callable[[dict, int], Any]   # (params, seed) -> unfitted estimator; rejects unknown params
    default_grid: dict[str, list]
    description: str
    # Heads that load TensorFlow run sequentially in the calling process: a joblib worker each
    # would import TensorFlow (seconds and hundreds of MB apiece) and fight over the same cores.
    in_process: bool = False
    # The class name of the fitted estimator's last step (a Pipeline's final step, or the estimator
    # itself): how a loaded head is matched to its entry.
    final_step: str = ""
    # (fitted estimator, n_features, name) -> keras.Model with the same predict_proba; None: this
    # head cannot be fine-tuned or exported. Imports Keras only when called.
    to_keras: Optional[Callable[[Any, int, str], Any]] = None
    # Bump when what the head fits for given params changes (a default, a transform): cached CV fold
    # results and refit heads are keyed on it, since their params name only what the grid set.
    revision: int = 1


def _keras_converter(name: str) -> Callable[[Any, int, str], Any]:
    """featurepipe.heads.to_keras.<name>, imported when called (this module stays free of Keras)."""

    def convert(estimator, n_features: int, model_name: str):
        from featurepipe.heads import to_keras as head_to_keras

        return getattr(head_to_keras, name)(estimator, n_features, model_name)

    convert.__name__ = name
    return convert


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
        *_front("standard"),
        # Platt scaling on 3 inner folds, averaging the 3 calibrated SVMs (ensemble=True): 3 fits on
        # 2/3 of the rows, a third cheaper than ensemble=False (3 inner fits + 1 on all rows).
        ("svm", CalibratedClassifierCV(svm, method="sigmoid", cv=CalibrationFolds(3), ensemble=True)),
    ])


def signed_sqrt(X: np.ndarray, eps: float) -> np.ndarray:
    """sign(x) * sqrt(|x|), linear below |x| = eps (slope 1/sqrt(eps) instead of infinite)."""
    a = np.abs(X)
    return np.sign(X) * np.where(a >= eps, np.sqrt(np.maximum(a, eps)), a / np.sqrt(eps))


class SignedSqrt(TransformerMixin, BaseEstimator):
    """Power normalization of pooled CNN features: sign(x) * sqrt(|x|), so a few large activations
    stop dominating each row (see FRONTS for what it was measured against).

    Below |x| = eps (1e-12) it is linear, which changes no feature that matters but keeps the slope
    finite at 0, where pooled ReLU features often sit: the converted Keras head
    (head_to_keras.SignedSqrt, the same formula) can be fine-tuned through. Stateless."""

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


def _front(name: str) -> list:
    """sqrt: signed square root + L2; standard: standardize + L2; l2: L2 only."""
    if name == "sqrt":
        return [("sqrt", SignedSqrt()), ("l2", Normalizer())]
    if name == "standard":
        return [("scale", StandardScaler()), ("l2", Normalizer())]
    if name == "l2":
        return [("l2", Normalizer())]
    raise ValueError(f"unknown front {name!r} for head 'logreg'; valid fronts: {', '.join(FRONTS)}")


def _logreg(params: Mapping, seed: int):
    p = _resolve("logreg", params, {"C": 1.0, "class_weight": None, "max_iter": 1000, "front": FRONTS[0]})
    # lbfgs fits the multinomial (softmax) model for 3+ classes. Unit-norm rows (as for the SVM)
    # condition the problem far better than standardization alone: 2-4x fewer lbfgs iterations.
    clf = LogisticRegression(C=p["C"], class_weight=p["class_weight"], max_iter=p["max_iter"], solver="lbfgs", random_state=seed)
    return Pipeline([*_front(p["front"]), ("logreg", clf)])


class CosineKNN(ClassifierMixin, BaseEstimator):
    """k nearest neighbours by cosine similarity, each neighbour's vote weighted by 1 / distance.

    Rows are L2-normalized first (cosine on pooled CNN features is the usual retrieval metric).
    k is clamped to the training rows, so the head fits folds with very few images. Probabilities
    are the normalized votes (0 for classes with no neighbour).
    """

    def __init__(self, n_neighbors: int = 5):
        self.n_neighbors = n_neighbors

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float64)
        if self.n_neighbors < 1:
            raise ValueError(f"n_neighbors must be >= 1, got {self.n_neighbors}")
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


KNN_MIN_DISTANCE = 1e-6


class NearestClassMean(ClassifierMixin, BaseEstimator):
    """Nearest class mean by cosine: softmax(temperature * cos(x, mean of class c)).

    With a handful of images per class a class mean is the most stable thing one can estimate;
    the fixed temperature only shapes the probabilities (log loss), never the predicted class.
    """

    def __init__(self, temperature: float = 10.0):
        self.temperature = temperature

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float64)
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


def _unit_rows(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


class SoftVoteClassifier(ClassifierMixin, BaseEstimator):
    """The mean of its members' predict_proba: the ensemble head of the searched pipeline.

    members: [(head name, params), ...] from this registry; all are fitted on the same rows.
    """

    def __init__(self, members=(), random_state: int = 0):
        self.members = members
        self.random_state = random_state

    def fit(self, X, y):
        if len(self.members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(self.members)}")
        self.estimators_ = [make_head(name, params, self.random_state).fit(X, y) for name, params in self.members]
        self.classes_ = self.estimators_[0].classes_
        self.n_features_in_ = self.estimators_[0].n_features_in_
        return self

    def predict_proba(self, X):
        check_is_fitted(self, "estimators_")
        return np.mean([e.predict_proba(X) for e in self.estimators_], axis=0)

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


def _scaled(final):
    # The same standardize + L2 front as the linear heads: kNN and class means compare directions.
    return Pipeline([*_front("standard"), ("clf", final)])


def _knn(params: Mapping, seed: int):
    p = _resolve("knn", params, {"n_neighbors": 5})
    return _scaled(CosineKNN(n_neighbors=int(p["n_neighbors"])))


def _ncm(params: Mapping, seed: int):
    p = _resolve("ncm", params, {"temperature": 10.0})
    return _scaled(NearestClassMean(temperature=float(p["temperature"])))


def _ensemble(params: Mapping, seed: int):
    p = _resolve("ensemble", params, {"members": []})
    members = [(str(m["head"]), dict(m.get("params") or {})) for m in p["members"]]
    for name, _ in members:
        if name == "ensemble":
            raise ValueError("an ensemble cannot contain an ensemble")
        head_entry(name)
    return SoftVoteClassifier(members=members, random_state=seed)


# DenseHeadClassifier's defaults except batch_size: 128 rather than 32 halves the head's CV time on
# a few thousand rows at the same accuracy (per-step optimizer overhead dominates on CPU), and on
# tens of images both are nearly full-batch anyway.
_DENSE_DEFAULTS = {
    "hidden_units": 256, "dropout": 0.5, "learning_rate": 1e-3, "epochs": 100,
    "batch_size": 128, "patience": 10, "validation_fraction": 0.15,
}


def _dense(params: Mapping, seed: int):
    from featurepipe.heads.dense import DenseHeadClassifier  # keeps TF out of sklearn-only imports

    return DenseHeadClassifier(**_resolve("dense", params, _DENSE_DEFAULTS), random_state=seed)


HEADS: dict[str, HeadEntry] = {
    e.name: e
    for e in [
        # C grids: rows are standardized and then L2-normalized, which shrinks each feature by ~sqrt(d),
        # so useful C values are large (measured on 1280-d EfficientNet-Lite features of 4 photo and
        # clothing sets: logreg plateaus from C~10, C=0.1 collapses to the majority class). Decade
        # steps; evaluate widens a grid whose best C sits at an edge and beats its neighbour.
        HeadEntry(
            name="linear_svm",
            build=_linear_svm,
            default_grid={"C": [0.1, 1.0, 10.0]},
            description="Linear SVM on standardized, L2-normalized features; Platt-calibrated probabilities.",
            final_step="CalibratedClassifierCV",
            to_keras=_keras_converter("calibrated_linear_to_keras"),
        ),
        HeadEntry(
            name="logreg",
            build=_logreg,
            default_grid={"C": [10.0, 100.0, 1000.0]},
            description="Multinomial logistic regression (lbfgs) on signed-sqrt, L2-normalized features (front: sqrt | standard | l2).",
            final_step="LogisticRegression",
            to_keras=_keras_converter("logistic_to_keras"),
            revision=3,    # 2: signed sqrt + L2 front by default (was standardize + L2); 3: exact sqrt above 1e-12
        ),
        HeadEntry(
            name="knn",
            build=_knn,
            default_grid={"n_neighbors": [3, 9]},
            description="k nearest neighbours by cosine on standardized, L2-normalized features; 1/distance votes.",
            final_step="CosineKNN",
            to_keras=_keras_converter("knn_to_keras"),
        ),
        HeadEntry(
            name="ncm",
            build=_ncm,
            default_grid={"temperature": [10.0]},
            description="Nearest class mean by cosine (softmax over 10 x cosine): for very few images per class.",
            final_step="NearestClassMean",
            to_keras=_keras_converter("ncm_to_keras"),
        ),
        HeadEntry(
            name="ensemble",
            build=_ensemble,
            default_grid={"members": [[]]},
            description="Soft vote (mean probabilities) of the search's top configurations on one feature set.",
            final_step="SoftVoteClassifier",
            to_keras=_keras_converter("soft_vote_to_keras"),
        ),
        HeadEntry(
            name="dense",
            build=_dense,
            default_grid={"hidden_units": [256]},
            description="Keras Dense(256, relu) -> Dropout(0.5) -> softmax, Adam, early-stopped on a stratified holdout.",
            in_process=True,
            final_step="DenseHeadClassifier",
            to_keras=_keras_converter("dense_head_to_keras"),
        ),
    ]
}


def entry_for_estimator(estimator) -> Optional[HeadEntry]:
    """The entry whose fitted estimators look like `estimator` (by its last step's class); None if
    no head makes such an estimator."""
    final = estimator
    while isinstance(final, Pipeline):
        steps = [step for _, step in final.steps if step is not None and step != "passthrough"]
        if not steps:
            return None
        final = steps[-1]
    return next((e for e in HEADS.values() if e.final_step and type(final).__name__ == e.final_step), None)


def revisions() -> dict[str, int]:
    """Every head's revision: part of each cached fit's key (an ensemble fits other heads, so one
    head's new revision invalidates them all; revisions change rarely)."""
    return {name: entry.revision for name, entry in sorted(HEADS.items())}


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
