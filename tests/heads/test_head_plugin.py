"""A head defined here, in a test module, and registered with `registered_head`: the registry's
machinery (make_head, param_grid, cross-validation on a feature table, refit, saving into a run
directory and loading it back) picks it up with no edit anywhere in featurepipe."""

import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from featurepipe.core.errors import UsageError
from featurepipe.heads import HEADS, HeadEntry, head_names, make_head, param_grid, registered_head, revisions
from tests.head_support import head_round_trip


class EuclideanCentroid(ClassifierMixin, BaseEstimator):
    """Nearest class mean by Euclidean distance; probabilities softmax(-distance / scale)."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def fit(self, X, y):
        X, y = validate_data(self, X, y)
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        self.centroids_ = np.stack([X[codes == c].mean(axis=0) for c in range(len(self.classes_))])
        return self

    def predict_proba(self, X):
        check_is_fitted(self, "centroids_")
        X = validate_data(self, X, reset=False)
        z = -np.linalg.norm(X[:, None, :] - self.centroids_[None], axis=2) / self.scale
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


def _centroid(params, seed):
    return EuclideanCentroid(scale=float(params["scale"]))


CENTROID = HeadEntry("centroid", _centroid, {"scale": [1.0, 4.0]}, "Euclidean nearest class mean (a test head).",
                     defaults={"scale": 1.0}, final_step="EuclideanCentroid")


@pytest.fixture
def centroid_head():
    with registered_head(CENTROID) as entry:
        yield entry
    assert "centroid" not in HEADS


def test_a_registered_head_is_known_everywhere_the_registry_is_asked(centroid_head):
    assert head_names()[-1] == "centroid" and "centroid" in revisions()
    assert param_grid("centroid") == [{"scale": 1.0}, {"scale": 4.0}]
    assert isinstance(make_head("centroid", {"scale": 2.0}), EuclideanCentroid)
    with pytest.raises(UsageError, match="valid parameters: scale"):
        make_head("centroid", {"k": 3})


def test_a_registered_head_runs_through_cv_refit_and_a_run_directory(centroid_head, tmp_path):
    # run_cv with n_jobs=1 fits in this process: a head registered by a test is unknown to workers.
    head_round_trip("centroid", {"scale": 2.0}, tmp_path)


def test_a_registered_head_can_be_an_ensemble_member(centroid_head):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(30, 4)), np.repeat([0, 1, 2], 10)
    vote = make_head("ensemble", {"members": [{"head": "centroid"}, {"head": "ncm"}]}).fit(X, y)
    assert vote.predict_proba(X).shape == (30, 3)
