"""What the head tests share: small data, fast params per head, and `head_round_trip`, the path every
registered head must survive (make_head, param_grid, cross-validation, refit, save and load
through its declared format). Parametrised over the registry, so a new head is tested by registering it."""

import numpy as np
from sklearn.datasets import make_classification

from featurepipe.evaluation.crossval import FeatureTable, refit, run_cv
from featurepipe.heads import entry_for_estimator, head_entry, make_head, param_grid

# Small enough that every Keras fit takes a fraction of a second.
FAST_DENSE = dict(hidden_units=32, epochs=40, patience=5, batch_size=32)

# Params a head needs to be fitted quickly in a test (the rest run on their defaults).
FAST_PARAMS = {
    "dense": FAST_DENSE,
    "ensemble": {"members": [{"head": "logreg", "params": {"C": 10.0}}, {"head": "ncm", "params": {}}]},
}


def fast_params(name: str) -> dict:
    return dict(FAST_PARAMS.get(name, {}))


def blobs(n=90, d=24, n_classes=3, seed=0):
    X, y = make_classification(
        n_samples=n, n_features=d, n_informative=8, n_redundant=0, n_classes=n_classes,
        n_clusters_per_class=1, class_sep=2.5, random_state=seed,
    )
    return X.astype(np.float32), y


def tiny_table(n_per_class=10, d=8) -> FeatureTable:
    X, y = blobs(n=3 * n_per_class, d=d, n_classes=3, seed=3)
    return FeatureTable(X=X, y=y, classes=["a", "b", "c"], paths=[f"{i}.png" for i in range(len(y))])


def head_round_trip(name: str, params: dict, tmp_path) -> None:
    """Head `name` through the machinery the product runs it in: built from the registry and matched
    back to its entry, its grid expanded, cross-validated on a tiny feature table, refit, saved into a
    run directory in its declared format and loaded back with the same probabilities."""
    from featurepipe.rundir.heads_io import load_head, save_head

    entry = head_entry(name)
    assert entry_for_estimator(make_head(name, params, seed=0)) is entry
    grid = {key: [value] for key, value in params.items()}
    points = param_grid(name, grid)
    assert points and all(point[key] == value for point in points for key, value in params.items())

    table = tiny_table()
    result = run_cv(table, [name], grids={name: grid}, n_folds=3, n_jobs=1)
    assert set(result.leaderboard["head"]) == {name}
    assert result.fitted == 3 * len(points)

    estimator = refit(table, name, params)
    expected = estimator.predict_proba(table.X)
    np.testing.assert_allclose(expected.sum(axis=1), 1.0, rtol=1e-6)
    path = save_head(estimator, tmp_path / "run", {"head": name, "classes": table.classes})
    assert path.suffix == "." + entry.save_format
    loaded, meta = load_head(tmp_path / "run")
    assert meta["head"] == name
    np.testing.assert_allclose(loaded.predict_proba(table.X), expected, rtol=1e-6, atol=1e-6)
