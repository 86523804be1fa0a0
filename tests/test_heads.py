import pickle
import subprocess
import sys

import joblib
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import make_classification
from sklearn.exceptions import NotFittedError
from sklearn.metrics import log_loss
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
from sklearn.utils import check_random_state

from featurepipe.heads.dense import DenseHeadClassifier, _early_stopping_split
from featurepipe.heads import HEADS, HeadEntry, make_head, param_grid

# Small enough that every Keras fit takes a fraction of a second.
FAST_DENSE = dict(hidden_units=32, epochs=40, patience=5, batch_size=32)


def blobs(n=90, d=24, n_classes=3, seed=0):
    X, y = make_classification(
        n_samples=n, n_features=d, n_informative=8, n_redundant=0, n_classes=n_classes,
        n_clusters_per_class=1, class_sep=2.5, random_state=seed,
    )
    return X.astype(np.float32), y


# ---------------------------------------------------------------- registry


def test_registry_has_the_three_heads_with_small_grids():
    assert {"linear_svm", "logreg", "dense"} <= set(HEADS)
    for name, entry in HEADS.items():
        assert isinstance(entry, HeadEntry) and entry.name == name and entry.description
        assert 1 <= len(param_grid(name)) <= 3
    assert HEADS["dense"].in_process and not HEADS["logreg"].in_process


def test_unknown_head_or_param_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown head 'svm'.*valid heads: linear_svm, logreg, knn, ncm, ensemble, dense"):
        make_head("svm")
    with pytest.raises(ValueError, match=r"gamma.*'logreg'.*valid parameters: C, class_weight, front, max_iter"):
        make_head("logreg", {"gamma": 1.0})
    with pytest.raises(ValueError, match="valid parameters:.*hidden_units"):
        param_grid("dense", {"units": [8]})


def test_param_grid_expands_and_overrides():
    assert param_grid("logreg") == [{"C": 10.0}, {"C": 100.0}, {"C": 1000.0}]
    assert param_grid("logreg", {"C": 5}) == [{"C": 5}]
    points = param_grid("linear_svm", {"class_weight": [None, "balanced"]})
    assert len(points) == 6 and {"C": 0.1, "class_weight": "balanced"} in points
    assert param_grid("logreg", {"C": np.array([2.0])}) == [{"C": 2.0}]
    assert type(param_grid("logreg", {"C": np.array([2.0])})[0]["C"]) is float


def test_importing_heads_and_crossval_does_not_load_tensorflow():
    code = "import sys, featurepipe.heads, featurepipe.evaluation.crossval; print('tensorflow' in sys.modules or 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- every head


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("name", ["linear_svm", "logreg", "dense"])
def test_head_fits_and_gives_probabilities(name, n_classes):
    X, y = blobs(n_classes=n_classes)
    params = FAST_DENSE if name == "dense" else {}
    est = make_head(name, params, seed=0).fit(X[:70], y[:70])
    proba = est.predict_proba(X[70:])
    assert proba.shape == (20, n_classes)
    assert np.all(proba >= 0) and np.allclose(proba.sum(axis=1), 1.0)
    assert list(est.classes_) == list(range(n_classes))
    assert np.mean(est.predict(X[70:]) == y[70:]) >= 0.8


def test_linear_svm_calibrates_with_two_training_images_per_class():
    X, y = blobs(n=90)
    idx = np.concatenate([np.flatnonzero(y == c)[:2] for c in range(3)])
    est = make_head("linear_svm", {"C": 1.0}).fit(X[idx], y[idx])
    assert est.predict_proba(X).shape == (90, 3)


# ---------------------------------------------------------------- DenseHeadClassifier contract


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.SkipTestWarning")
def test_dense_passes_sklearn_estimator_checks():
    from sklearn.utils.estimator_checks import check_estimator

    results = check_estimator(DenseHeadClassifier(**{**FAST_DENSE, "batch_size": 64}), on_fail=None)
    failed = [(r["check_name"], repr(r["exception"])[:300]) for r in results if r["status"] == "failed"]
    assert not failed


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


def test_knn_and_class_mean_heads_match_a_plain_recomputation():
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import Normalizer, StandardScaler

    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 6))
    y = np.repeat([0, 1], 20)
    X[y == 1] += 0.8
    test = rng.normal(size=(15, 6)) + 0.4
    scale = StandardScaler().fit(X)
    unit = Normalizer()
    Xs, Ts = unit.transform(scale.transform(X)), unit.transform(scale.transform(test))
    # kNN by cosine with 1/distance weights == sklearn's euclidean kNN on unit rows with weights="distance"
    ours = make_head("knn", {"n_neighbors": 5}).fit(X, y).predict_proba(test)
    plain = KNeighborsClassifier(5, weights="distance").fit(Xs, y).predict_proba(Ts)
    np.testing.assert_allclose(ours, plain, atol=1e-9)
    # Nearest class mean: softmax of 10 x cosine to the unit class means
    means = np.stack([Xs[y == c].mean(axis=0) for c in (0, 1)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    z = 10.0 * Ts @ means.T
    expected = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(make_head("ncm").fit(X, y).predict_proba(test), expected, atol=1e-9)
    # k larger than the training rows is clamped: a fold with 3 images still fits
    assert make_head("knn", {"n_neighbors": 9}).fit(X[:3], [0, 1, 1]).predict_proba(test).shape == (15, 2)


def test_ensemble_is_the_mean_of_its_members_and_refuses_nesting():
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(45, 5)), np.repeat([0, 1, 2], 15)
    members = [{"head": "logreg", "params": {"C": 10.0}}, {"head": "ncm", "params": {}}]
    ensemble = make_head("ensemble", {"members": members}).fit(X, y)
    parts = [make_head(m["head"], m["params"]).fit(X, y).predict_proba(X) for m in members]
    np.testing.assert_allclose(ensemble.predict_proba(X), np.mean(parts, axis=0))
    with pytest.raises(ValueError, match="cannot contain an ensemble"):
        make_head("ensemble", {"members": [{"head": "ensemble"}]})
    with pytest.raises(ValueError, match="at least 2 members"):
        make_head("ensemble", {"members": members[:1]}).fit(X, y)


@pytest.mark.parametrize("head, params", [("knn", {"n_neighbors": 3}), ("ncm", {}),
                                          ("ensemble", {"members": [{"head": "logreg"}, {"head": "knn"}]})])
def test_new_heads_convert_to_keras_with_the_same_probabilities(head, params):
    from featurepipe.heads.to_keras import head_to_keras

    rng = np.random.default_rng(2)
    X, y = rng.normal(size=(30, 8)).astype(np.float32), np.repeat([0, 1, 2], 10)
    X[y == 2] += 1.0
    estimator = make_head(head, params).fit(X, y)
    test = rng.normal(size=(7, 8)).astype(np.float32)
    converted = head_to_keras(estimator, 8)
    np.testing.assert_allclose(converted.predict(test, verbose=0), estimator.predict_proba(test), atol=1e-5)


@pytest.mark.parametrize("name", ["linear_svm", "logreg", "knn", "ncm", "dense"])
def test_each_head_entry_names_its_own_keras_conversion(name):
    from featurepipe.heads import HEADS, entry_for_estimator, make_head

    assert HEADS[name].to_keras is not None
    assert entry_for_estimator(make_head(name, {}, seed=0)) is HEADS[name]


def test_an_estimator_no_head_makes_has_no_entry():
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeClassifier

    from featurepipe.heads import entry_for_estimator

    assert entry_for_estimator(make_pipeline(StandardScaler(), DecisionTreeClassifier())) is None


def test_the_dense_heads_history_is_saved_beside_it_and_follows_it(tmp_path):
    """best_head_history.csv (drawn by the report) is written for a dense best head, removed for a
    head without one, and travels with the head through the refit cache."""
    import pandas as pd

    from featurepipe.rundir.heads_io import cached_head, remember_head, save_head
    from featurepipe.rundir.run import HEAD_HISTORY

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


def test_logreg_fronts_match_plain_sklearn_pipelines():
    """Each front is exactly its plain scikit-learn recomputation; sqrt is the default."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
    from sklearn.pipeline import make_pipeline

    X, y = make_classification(n_samples=90, n_features=12, n_informative=6, n_classes=3, random_state=0)
    X = np.abs(X) * (np.arange(12) + 1)    # non-negative with very unequal scales, like pooled activations
    sqrt = FunctionTransformer(lambda a: np.sign(a) * np.sqrt(np.abs(a)))
    plain = {"sqrt": [sqrt, Normalizer()], "standard": [StandardScaler(), Normalizer()], "l2": [Normalizer()]}
    test = X[::7] + 0.5
    for front, steps in plain.items():
        ours = make_head("logreg", {"C": 30.0, "front": front}).fit(X, y)
        ref = make_pipeline(*steps, LogisticRegression(C=30.0, max_iter=1000, random_state=0)).fit(X, y)
        np.testing.assert_allclose(ours.predict_proba(test), ref.predict_proba(test), atol=1e-6)
    default = make_head("logreg", {"C": 30.0}).fit(X, y).predict_proba(test)
    np.testing.assert_allclose(default, make_head("logreg", {"C": 30.0, "front": "sqrt"}).fit(X, y).predict_proba(test))
    assert not np.allclose(default, make_head("logreg", {"C": 30.0, "front": "standard"}).fit(X, y).predict_proba(test))
    with pytest.raises(ValueError, match="unknown front 'whiten'.*valid fronts: sqrt, standard, l2"):
        make_head("logreg", {"front": "whiten"})


def test_signed_sqrt_keeps_signs_is_zero_at_zero_and_checks_its_input():
    from featurepipe.heads import SignedSqrt

    step = SignedSqrt().fit(np.zeros((2, 3)))
    out = step.transform(np.array([[4.0, 0.0, -9.0], [1e-6, 0.25, -0.25]]))
    np.testing.assert_allclose(out, [[2.0, 0.0, -3.0], [1e-3, 0.5, -0.5]], rtol=1e-12)
    assert out[0, 1] == 0.0
    tiny = step.transform(np.array([[1e-14, -1e-14, 1e-12]]))     # linear below eps = 1e-12: finite slope
    np.testing.assert_allclose(tiny, [[1e-8, -1e-8, 1e-6]], rtol=1e-9)
    with pytest.raises(ValueError, match="3 features"):
        step.transform(np.ones((1, 4)))
    with pytest.raises(NotFittedError):
        SignedSqrt().transform(np.ones((1, 3)))


@pytest.mark.parametrize("front", ["sqrt", "standard", "l2"])
def test_every_logreg_front_converts_to_keras_survives_reload_and_has_finite_gradients(front, tmp_path):
    import keras
    import tensorflow as tf

    from featurepipe.heads.to_keras import head_to_keras

    rng = np.random.default_rng(4)
    X, y = np.abs(rng.normal(size=(45, 10))).astype(np.float32), np.repeat([0, 1, 2], 15)
    X[y == 1, :3] += 1.5
    X[:, 4] = 0.0     # a dead channel: the signed sqrt's slope at 0 must stay finite for fine-tuning
    estimator = make_head("logreg", {"C": 100.0, "front": front}).fit(X, y)
    path = tmp_path / "head.keras"
    head_to_keras(estimator, 10).save(path)
    model = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(model.predict(X, verbose=0), estimator.predict_proba(X), atol=1e-5)
    x = tf.Variable(X)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.math.log(model(x)[:, 0]))
    assert bool(tf.reduce_all(tf.math.is_finite(tape.gradient(loss, x))))


def test_a_heads_revision_is_part_of_every_cached_fit(monkeypatch, tmp_path):
    """Params name only what the grid set: when a head's defaults change, its revision must make
    cached fold results miss instead of serving fits of the old defaults."""
    import dataclasses

    from featurepipe import heads
    from featurepipe.evaluation.crossval import FeatureTable, run_cv

    X, y = make_classification(n_samples=40, n_features=6, n_informative=4, n_classes=2, random_state=1)
    table = FeatureTable(X=X, y=y, classes=["a", "b"], paths=[f"{i}.png" for i in range(40)])
    first = run_cv(table, ["logreg"], n_folds=3, cache_dir=tmp_path, n_jobs=1)
    assert first.fitted > 0 and run_cv(table, ["logreg"], n_folds=3, cache_dir=tmp_path, n_jobs=1).fitted == 0
    bumped = dataclasses.replace(heads.HEADS["logreg"], revision=heads.HEADS["logreg"].revision + 1)
    monkeypatch.setitem(heads.HEADS, "logreg", bumped)
    assert run_cv(table, ["logreg"], n_folds=3, cache_dir=tmp_path, n_jobs=1).fitted == first.fitted
