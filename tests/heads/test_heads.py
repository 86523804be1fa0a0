"""The head registry and every registered head: parametrised over `head_names()`, so a head added
to the registry is fitted, converted to Keras and saved through its format here without editing
this file. DenseHeadClassifier's own contract is in tests/heads/test_head_dense.py, the scikit-learn
estimator checks in tests/heads/test_head_checks.py, a test-local head in tests/heads/test_head_plugin.py."""

import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.exceptions import NotFittedError

from featurepipe.core.errors import UsageError
from featurepipe.heads import (
    HEADS, HeadEntry, default_heads, entry_for_estimator, expensive_heads, head_entry, head_names, make_head,
    param_grid, register_head, registered_head, revisions, unregister_head,
)
from featurepipe.heads.registry import SAVE_FORMATS, save_format
from tests.head_support import blobs, fast_params, head_round_trip


# ---------------------------------------------------------------- registry


@pytest.mark.parametrize("name", head_names())
def test_every_head_declares_itself_completely(name):
    entry = HEADS[name]
    assert isinstance(entry, HeadEntry) and entry.name == name and entry.description
    assert 1 <= len(param_grid(name)) <= 3
    assert set(entry.default_grid) <= set(entry.defaults), "the grid may only set parameters the head takes"
    assert entry.save_format in SAVE_FORMATS
    assert entry.final_step and entry.to_keras and ":" in entry.to_keras   # named, not imported


def test_the_registry_keeps_todays_heads_order_and_flags():
    assert head_names() == ("linear_svm", "logreg", "knn", "ncm", "ensemble", "dense")
    assert default_heads() == ("logreg", "knn", "ncm")      # what `featurepipe run` searches
    assert expensive_heads() == ("dense",)
    assert [n for n in head_names() if HEADS[n].class_weight] == ["linear_svm", "logreg"]
    assert [n for n in head_names() if HEADS[n].in_process] == ["dense"]
    assert [n for n in head_names() if HEADS[n].save_format == "keras"] == ["dense"]


def test_the_search_and_inspect_read_their_heads_from_the_registry():
    from featurepipe.evaluation.config import SEARCH_HEADS
    from featurepipe.evaluation.evaluate import _class_weight_grid
    from featurepipe.inspection.inspect import run_curve_head

    assert SEARCH_HEADS == default_heads()
    imbalanced = np.array([0] * 9 + [1] * 3)
    grids = _class_weight_grid(imbalanced, head_names(), {})
    assert sorted(grids) == ["linear_svm", "logreg"]
    assert all(grid == {"class_weight": [None, "balanced"]} for grid in grids.values())
    assert run_curve_head({"head": "dense", "params": {}})[0] is None
    assert run_curve_head({"head": "knn", "params": {}})[0] == "knn"


def test_unknown_head_or_param_names_the_valid_ones():
    with pytest.raises(UsageError, match="unknown head 'svm'.*valid heads: linear_svm, logreg, knn, ncm, ensemble, dense"):
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


def test_registering_refuses_a_second_head_under_a_name_unless_replacing():
    def build(params, seed):
        return make_head("ncm", params, seed)

    entry = HeadEntry("twin", build, {}, "a copy of ncm", defaults={"temperature": 10.0}, final_step="")
    try:
        assert register_head(entry) is entry and register_head(entry) is entry    # the same entry: a no-op
        other = HeadEntry("twin", build, {}, "another", defaults={"temperature": 10.0})
        with pytest.raises(UsageError, match="already registered.*replace=True"):
            register_head(other)
        assert register_head(other, replace=True) is other and head_entry("twin") is other
    finally:
        assert unregister_head("twin") is not None
    assert "twin" not in HEADS and unregister_head("twin") is None


def test_registered_head_puts_back_what_it_replaced_and_the_decorator_returns_the_builder():
    original = HEADS["knn"]
    stand_in = HeadEntry("knn", lambda params, seed: None, {}, "stand-in")
    with registered_head(stand_in):
        assert head_entry("knn") is stand_in and list(HEADS).index("knn") == 2
    assert HEADS["knn"] is original

    def build(params, seed):
        return make_head("logreg", params, seed)

    try:
        assert register_head("decorated", defaults={"C": 1.0}, default_grid={"C": [1.0]},
                             description="logreg again")(build) is build
        assert head_entry("decorated").build is build and param_grid("decorated") == [{"C": 1.0}]
        assert "decorated" in revisions()
    finally:
        unregister_head("decorated")
    assert "decorated" not in revisions()


def test_an_entry_must_say_how_a_keras_saved_head_is_read_back():
    with pytest.raises(UsageError, match="keras_loader"):
        HeadEntry("k", lambda p, s: None, {}, "no loader", save_format="keras")
    with pytest.raises(UsageError, match="save_format"):
        HeadEntry("p", lambda p, s: None, {}, "unknown format", save_format="onnx")


def test_a_keras_head_file_is_read_by_its_heads_loader_or_the_one_that_writes_such_files():
    from featurepipe.heads.registry import keras_file_entry

    assert keras_file_entry("dense") is HEADS["dense"]
    # Only the dense head writes .keras files: one under another name is handed to its loader,
    # which refuses what is not a dense head (as before the registry).
    assert keras_file_entry("logreg") is HEADS["dense"] and keras_file_entry(None) is HEADS["dense"]


def test_importing_heads_and_crossval_does_not_load_tensorflow():
    # Building the dense head (and its grid) must not either: joblib workers build every head.
    code = ("import sys, featurepipe.heads, featurepipe.evaluation.crossval\n"
            "from featurepipe.heads import make_head, param_grid\n"
            "make_head('dense'); param_grid('dense')\n"
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- every head


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("name", head_names())
def test_head_fits_and_gives_probabilities(name, n_classes):
    X, y = blobs(n_classes=n_classes)
    est = make_head(name, fast_params(name), seed=0).fit(X[:70], y[:70])
    proba = est.predict_proba(X[70:])
    assert proba.shape == (20, n_classes)
    assert np.all(proba >= 0) and np.allclose(proba.sum(axis=1), 1.0)
    assert list(est.classes_) == list(range(n_classes))
    assert np.mean(est.predict(X[70:]) == y[70:]) >= 0.8


@pytest.mark.parametrize("name", head_names())
def test_every_head_runs_through_cv_and_a_run_directory_in_its_save_format(name, tmp_path):
    head_round_trip(name, fast_params(name), tmp_path)


@pytest.mark.parametrize("name", head_names())
def test_every_head_converts_to_keras_with_the_same_probabilities(name):
    from featurepipe.heads.to_keras import head_to_keras

    rng = np.random.default_rng(2)
    X, y = rng.normal(size=(30, 8)).astype(np.float32), np.repeat([0, 1, 2], 10)
    X[y == 2] += 1.0
    estimator = make_head(name, fast_params(name)).fit(X, y)
    assert entry_for_estimator(estimator) is HEADS[name]
    test = rng.normal(size=(7, 8)).astype(np.float32)
    converted = head_to_keras(estimator, 8)
    np.testing.assert_allclose(converted.predict(test, verbose=0), estimator.predict_proba(test), atol=1e-5)


def test_an_estimator_no_head_makes_has_no_entry_and_is_pickled():
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeClassifier

    other = make_pipeline(StandardScaler(), DecisionTreeClassifier())
    assert entry_for_estimator(other) is None and save_format(other) == "joblib"


def test_a_keras_saved_head_inside_a_pipeline_or_vote_is_pickled_whole():
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    dense = make_head("dense")
    assert save_format(dense) == "keras"
    assert save_format(make_pipeline(StandardScaler(), dense)) == "joblib"
    assert save_format(make_head("ensemble", {"members": [{"head": "dense"}, {"head": "logreg"}]})) == "joblib"


def test_pickled_classes_keep_the_names_old_runs_use():
    import featurepipe.heads as heads

    for name in ("SignedSqrt", "CalibrationFolds", "CosineKNN", "NearestClassMean", "SoftVoteClassifier"):
        cls = getattr(heads, name)
        assert f"{cls.__module__}.{cls.__qualname__}" == f"featurepipe.heads.{name}"


def test_linear_svm_calibrates_with_two_training_images_per_class():
    X, y = blobs(n=90)
    idx = np.concatenate([np.flatnonzero(y == c)[:2] for c in range(3)])
    est = make_head("linear_svm", {"C": 1.0}).fit(X[idx], y[idx])
    assert est.predict_proba(X).shape == (90, 3)


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
    with pytest.raises(UsageError, match="cannot contain an ensemble"):
        make_head("ensemble", {"members": [{"head": "ensemble"}]})
    with pytest.raises(UsageError, match="at least 2 members"):
        make_head("ensemble", {"members": members[:1]}).fit(X, y)
    with pytest.raises(NotFittedError):
        make_head("ensemble", {"members": members}).predict(X)


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


def test_two_heads_cannot_end_in_the_same_class():
    """A fitted estimator finds its entry by its last step's class: a second head ending in the same
    class would take the first one's converter and save format."""
    entry = HeadEntry("logreg_twin", lambda params, seed: None, {}, "ends like logreg",
                      final_step=HEADS["logreg"].final_step)
    with pytest.raises(UsageError, match="ends in LogisticRegression, as head 'logreg' does"):
        register_head(entry)
    assert "logreg_twin" not in HEADS


def test_a_module_dropped_into_the_heads_folder_is_a_head_with_no_other_edit(tmp_path):
    """Adding a built-in head is one file with one decorator: featurepipe.heads imports every module of
    its folder. Checked on a copy of the package with one more file, in a fresh process."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import featurepipe

    package = Path(featurepipe.__file__).parent
    shutil.copytree(package, tmp_path / "featurepipe", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "featurepipe" / "heads" / "extra.py").write_text(
        "from sklearn.dummy import DummyClassifier\n"
        "from featurepipe.heads.registry import register_head\n\n\n"
        "@register_head('extra', default_grid={}, description='a head from a file dropped into the folder')\n"
        "def _extra(params, seed):\n"
        "    return DummyClassifier(strategy='prior')\n")
    code = "import featurepipe.heads as h; print(h.__file__); print(h.head_names())"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={"PATH": "", "PYTHONPATH": str(tmp_path)}).stdout.splitlines()
    assert out[0].startswith(str(tmp_path))
    assert out[1] == str((*head_names(), "extra"))
