"""DenseHeadClassifier's own contract: parameters, early stopping, determinism, pickling and its
.keras file, and the training history a run keeps beside it. What every head shares (fitting,
the estimator checks, saving through the registry's format) is in tests/heads/test_heads.py and
tests/heads/test_head_checks.py."""

import pickle

import joblib
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import log_loss
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
from sklearn.utils import check_random_state

from featurepipe.heads import make_head
from featurepipe.heads.dense import DenseHeadClassifier, _early_stopping_split
from tests.head_support import FAST_DENSE, blobs


def test_dense_params_and_clone():
    est = DenseHeadClassifier(hidden_units=8, dropout=0.25)
    assert est.get_params() == {
        "hidden_units": 8, "dropout": 0.25, "learning_rate": 1e-3, "epochs": 100,
        "batch_size": 32, "patience": 10, "validation_fraction": 0.15, "random_state": 0,
    }
    X, y = blobs()
    est.set_params(**FAST_DENSE).fit(X, y)
    fresh = clone(est)
    assert fresh.get_params() == est.get_params()
    assert not hasattr(fresh, "model_") and not hasattr(fresh, "classes_")


def test_dense_inside_grid_search_and_cross_val_score():
    X, y = blobs()
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    search = GridSearchCV(DenseHeadClassifier(**FAST_DENSE), {"hidden_units": [8, 32]}, cv=cv).fit(X, y)
    assert search.best_params_["hidden_units"] in (8, 32)
    assert len(search.cv_results_["mean_test_score"]) == 2
    assert search.predict_proba(X).shape == (90, 3)
    scores = cross_val_score(DenseHeadClassifier(**FAST_DENSE), X, y, cv=cv, scoring="neg_log_loss")
    assert scores.shape == (3,) and np.all(np.isfinite(scores))
    assert cross_val_score(DenseHeadClassifier(**FAST_DENSE), X, y, cv=cv).mean() >= 0.8


def test_dense_fit_attributes_and_early_stopping():
    X, y = blobs()
    est = DenseHeadClassifier(**FAST_DENSE).fit(X, y)
    assert est.n_features_in_ == 24
    assert set(est.history_) == {"loss", "val_loss"}
    n_epochs = len(est.history_["loss"])
    assert n_epochs == len(est.history_["val_loss"]) <= FAST_DENSE["epochs"]
    assert est.best_epoch_ == int(np.argmin(est.history_["val_loss"]))
    if n_epochs < FAST_DENSE["epochs"]:
        assert n_epochs == est.best_epoch_ + FAST_DENSE["patience"] + 1
    # Restore-best-weights: the kept model's loss on the early-stopping holdout is the best epoch's.
    seed = check_random_state(0).randint(np.iinfo(np.int32).max)
    _, holdout = _early_stopping_split(y.astype(np.int32), 0.15, seed)
    holdout_loss = log_loss(y[holdout], est.predict_proba(X[holdout]), labels=[0, 1, 2])
    assert holdout_loss == pytest.approx(min(est.history_["val_loss"]), rel=1e-4)


def test_dense_is_deterministic_under_random_state():
    X, y = blobs()
    a = DenseHeadClassifier(**FAST_DENSE, random_state=7).fit(X, y).predict_proba(X)
    b = DenseHeadClassifier(**FAST_DENSE, random_state=7).fit(X, y).predict_proba(X)
    c = DenseHeadClassifier(**FAST_DENSE, random_state=8).fit(X, y).predict_proba(X)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_dense_binary_with_string_labels():
    X, y = blobs(n_classes=2)
    labels = np.array(["cat", "dog"])[y]
    est = DenseHeadClassifier(**FAST_DENSE).fit(X, labels)
    assert est.predict_proba(X).shape == (90, 2)
    assert set(est.predict(X)) <= {"cat", "dog"}
    assert est.model_.get_layer("output").units == 2


def test_dense_tiny_training_set_falls_back_to_training_loss():
    X, y = blobs()
    idx = np.concatenate([np.flatnonzero(y == c)[:1] for c in range(3)])  # one image per class
    est = DenseHeadClassifier(**FAST_DENSE).fit(X[idx], y[idx])
    assert est.predict_proba(X).shape == (90, 3)


def test_dense_errors():
    X, y = blobs()
    with pytest.raises(NotFittedError):
        DenseHeadClassifier().predict_proba(X)
    with pytest.raises(ValueError, match="1 class"):
        DenseHeadClassifier(**FAST_DENSE).fit(X, np.zeros(len(X), int))
    est = DenseHeadClassifier(**FAST_DENSE).fit(X, y)
    with pytest.raises(ValueError, match="features"):
        est.predict(X[:, :10])
    with pytest.raises(ValueError, match="dropout"):
        DenseHeadClassifier(dropout=1.0).fit(X, y)


def test_dense_pickle_round_trip_stores_weights_not_keras(tmp_path):
    X, y = blobs()
    est = DenseHeadClassifier(**FAST_DENSE).fit(X, y)
    state = est.__getstate__()
    assert "model_" not in state and len(state["_model_weights"]) == 4
    assert all(isinstance(w, np.ndarray) for w in state["_model_weights"])
    assert hasattr(est, "model_")  # pickling must not strip the live estimator
    joblib.dump(est, tmp_path / "head.joblib")
    loaded = joblib.load(tmp_path / "head.joblib")
    assert np.array_equal(loaded.predict_proba(X), est.predict_proba(X))
    assert loaded.get_params() == est.get_params() and loaded.history_ == est.history_
    again = pickle.loads(pickle.dumps(loaded))
    assert np.array_equal(again.predict_proba(X), est.predict_proba(X))


def test_dense_keras_file_round_trip(tmp_path):
    X, y = blobs()
    labels = np.array(["a", "b", "c"])[y]
    est = DenseHeadClassifier(**FAST_DENSE).fit(X, labels)
    path = tmp_path / "head.keras"
    est.save_keras(path)
    loaded = DenseHeadClassifier.load_keras(path, classes=est.classes_)
    assert np.array_equal(loaded.predict_proba(X), est.predict_proba(X))
    assert list(loaded.predict(X)) == list(est.predict(X))
    assert loaded.hidden_units == 32 and loaded.n_features_in_ == 24
    with pytest.raises(ValueError, match="2 classes"):
        DenseHeadClassifier.load_keras(path, classes=["a", "b"])



def test_the_dense_heads_history_is_saved_beside_it_and_follows_it(tmp_path):
    """best_head_history.csv (drawn by the report) is written for a dense best head, removed for a
    head without one, and travels with the head through the refit cache."""
    import pandas as pd

    from featurepipe.rundir.heads_io import cached_head, remember_head, save_head
    from featurepipe.rundir.layout import HEAD_HISTORY

    X, y = blobs()
    dense = DenseHeadClassifier(**FAST_DENSE).fit(X, y)
    run, cache, again = tmp_path / "run", tmp_path / "cache", tmp_path / "again"
    meta = {"head": "dense", "classes": ["a", "b", "c"]}
    save_head(dense, run, meta)
    table = pd.read_csv(run / HEAD_HISTORY)
    assert list(table.columns) == ["epoch", "loss", "val_loss"]
    assert table["epoch"].tolist() == list(range(1, len(dense.history_["loss"]) + 1))
    np.testing.assert_allclose(table["val_loss"], dense.history_["val_loss"], rtol=1e-12)
    remember_head(cache, run, {})
    assert cached_head(cache, again, meta) is not None
    assert (again / HEAD_HISTORY).read_bytes() == (run / HEAD_HISTORY).read_bytes()
    save_head(make_head("logreg").fit(X, y), run, {**meta, "head": "logreg"})
    assert not (run / HEAD_HISTORY).exists()
