"""Nested CV of the searched pipeline, recomputed independently with plain scikit-learn."""

import json

import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, Normalizer

from featurepipe.evaluation.crossval import FeatureTable, make_folds, pair_folds, run_cv
from featurepipe.core.errors import DatasetError
from featurepipe.evaluation.nested import VOTE, ensemble_of, leaderboard_ensemble, nested_cv, vote_of

CLASSES = ["a", "b", "c"]
GRID = [0.3, 3.0, 30.0]


def _feature_sets(n=75, seed=3):
    # Two "backbones" over the same images: one informative, one mostly noise; hard enough that
    # accuracies differ between C values and folds (no trivial 1.0 everywhere).
    X, y = make_classification(n_samples=n, n_features=12, n_informative=4, n_redundant=0, n_classes=3,
                               n_clusters_per_class=1, class_sep=0.9, flip_y=0.08, random_state=seed)
    rng = np.random.default_rng(seed)
    noisy = np.hstack([X[:, :2], rng.standard_normal((n, 10))])
    paths = [f"img/{i:03d}.png" for i in range(n)]
    return {name: FeatureTable(X=x.astype(np.float32), y=y, classes=CLASSES, paths=paths, key=f"set-{name}")
            for name, x in (("good", X), ("noisy", noisy))}, y


def test_pair_folds_train_on_everything_but_the_pair():
    y = np.repeat([0, 1, 2], 10)
    folds = make_folds(y, n_folds=5, seed=0)
    pairs = pair_folds(folds)
    assert len(pairs) == 10
    for p in pairs:
        j, k = p.pair
        val = np.concatenate([folds[j].val_idx, folds[k].val_idx])
        assert sorted(p.val_idx) == sorted(val)
        assert sorted(np.concatenate([p.train_idx, p.val_idx])) == list(range(30))


def test_nested_needs_three_folds():
    tables, _ = _feature_sets()
    with pytest.raises(DatasetError, match="at least 3 folds"):
        run_cv(tables["good"], ["logreg"], grids={"logreg": {"C": GRID}}, n_folds=2, nested=True, n_jobs=1)


def _signed_sqrt(a):
    return np.sign(a) * np.sqrt(np.abs(a))


def _plain_logreg(C, seed):
    # The default logreg front, written out: signed square root, then unit-norm rows.
    return make_pipeline(FunctionTransformer(_signed_sqrt), Normalizer(),
                         LogisticRegression(C=C, max_iter=1000, random_state=seed))


def test_nested_score_matches_plain_scikit_learn(tmp_path):
    seed = 0
    tables, y = _feature_sets()
    results = {name: run_cv(t, ["logreg"], grids={"logreg": {"C": GRID}}, n_folds=5, seed=seed, n_jobs=1,
                            cache_dir=tmp_path / "cv", nested=True) for name, t in tables.items()}
    best_row = max(float(r.leaderboard["accuracy_mean"].max()) for r in results.values())
    nested = nested_cv(results, y, CLASSES, tables["good"].paths, best_row, ensemble_size=0, vote=False)

    # Independently: the same outer folds, an inner CV on the other folds for every candidate, the
    # winner (accuracy, then log loss, then candidate order) refit without the outer fold.
    outer = list(StratifiedKFold(5, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
    candidates = [(name, C) for name in tables for C in GRID]   # features in order, params sorted as JSON
    expected, chosen = [], []
    for k, (train_k, test_k) in enumerate(outer):
        scores = []
        for name, C in candidates:
            X = tables[name].X.astype(np.float64)
            accs, losses = [], []
            for j, (_, val_j) in enumerate(outer):
                if j == k:
                    continue
                fit_rows = np.setdiff1d(train_k, val_j)
                model = _plain_logreg(C, seed).fit(X[fit_rows], y[fit_rows])
                proba = model.predict_proba(X[val_j])
                accs.append(accuracy_score(y[val_j], proba.argmax(axis=1)))
                losses.append(log_loss(y[val_j], proba, labels=[0, 1, 2]))
            scores.append((-np.mean(accs), np.mean(losses)))
        best = min(range(len(candidates)), key=lambda i: (*scores[i], i))
        name, C = candidates[best]
        X = tables[name].X.astype(np.float64)
        model = _plain_logreg(C, seed).fit(X[train_k], y[train_k])
        expected.append(accuracy_score(y[test_k], model.predict(X[test_k])))
        chosen.append(f"{name} logreg {json.dumps({'C': C})}")
    assert list(nested.folds["chosen"]) == chosen
    assert nested.folds["accuracy"].tolist() == pytest.approx(expected)
    assert nested.accuracy == pytest.approx(np.mean(expected))
    assert nested.optimism_gap == pytest.approx(best_row - np.mean(expected))
    assert 0.4 < nested.accuracy < 1.0          # a real, imperfect estimate: nothing trivial was compared
    # Each image is scored once per repeat, by the model its outer fold chose.
    assert sorted(nested.oof["row"]) == list(range(len(y)))


def test_ensemble_is_one_head_per_member_on_the_top_feature_set(tmp_path):
    tables, y = _feature_sets()
    results = {name: run_cv(t, ["logreg", "knn", "ncm"], grids={"logreg": {"C": GRID}}, n_folds=5, n_jobs=1,
                            cache_dir=tmp_path / "cv", nested=True) for name, t in tables.items()}
    ranked, folds = leaderboard_ensemble(results, y, CLASSES, 3, vote=False)
    ensemble = next(c for c in ranked if c.members)
    top_single = next(c for c in ranked if not c.members)
    assert ensemble.features == top_single.features
    assert sorted(m.head for m in ensemble.members) == ["knn", "logreg", "ncm"]
    # Its fold scores are the mean of its members' fold probabilities, recomputed here.
    for f, row in zip(results[ensemble.features].plan, folds.itertuples()):
        probas = [results[m.features].proba[(m.head, m.params, m.augment, f.repeat, f.fold)][1] for m in ensemble.members]
        rows = results[ensemble.features].proba[(ensemble.members[0].head, ensemble.members[0].params, "none",
                                                  f.repeat, f.fold)][0]
        assert row.accuracy == pytest.approx(accuracy_score(y[rows], np.mean(probas, axis=0).argmax(axis=1)))
    assert ensemble_of(ranked[:1], 3) is None     # one candidate alone is no ensemble


def _inner_choice(X, y, train_k, outer, k, seed):
    """C for one feature set by an inner CV on outer fold k's training rows (accuracy, log loss, order)."""
    scores = []
    for C in GRID:
        accs, losses = [], []
        for j, (_, val_j) in enumerate(outer):
            if j == k:
                continue
            fit_rows = np.setdiff1d(train_k, val_j)
            proba = _plain_logreg(C, seed).fit(X[fit_rows], y[fit_rows]).predict_proba(X[val_j])
            accs.append(accuracy_score(y[val_j], proba.argmax(axis=1)))
            losses.append(log_loss(y[val_j], proba, labels=[0, 1, 2]))
        scores.append((-np.mean(accs), np.mean(losses)))
    return GRID[min(range(len(GRID)), key=lambda i: (*scores[i], i))]


def test_nested_vote_matches_plain_scikit_learn(tmp_path):
    """The default procedure with several feature sets: each set's logreg C chosen on the inner folds,
    the sets' probabilities averaged; recomputed here with plain scikit-learn on the same folds."""
    seed = 0
    tables, y = _feature_sets()
    results = {name: run_cv(t, ["logreg", "ncm"], grids={"logreg": {"C": GRID}}, n_folds=5, seed=seed, n_jobs=1,
                            cache_dir=tmp_path / "cv", nested=True) for name, t in tables.items()}
    best_row = max(float(r.leaderboard["accuracy_mean"].max()) for r in results.values())
    nested = nested_cv(results, y, CLASSES, tables["good"].paths, best_row)

    outer = list(StratifiedKFold(5, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
    expected, chosen = [], []
    for k, (train_k, test_k) in enumerate(outer):
        probas, labels = [], []
        for name, table in tables.items():
            X = table.X.astype(np.float64)
            C = _inner_choice(X, y, train_k, outer, k, seed)
            probas.append(_plain_logreg(C, seed).fit(X[train_k], y[train_k]).predict_proba(X[test_k]))
            labels.append(f"{name} logreg {json.dumps({'C': C})}")
        expected.append(accuracy_score(y[test_k], np.mean(probas, axis=0).argmax(axis=1)))
        chosen.append(f"vote of 2 feature sets ({', '.join(labels)})")
    assert list(nested.folds["chosen"]) == chosen
    assert nested.folds["accuracy"].tolist() == pytest.approx(expected)
    assert nested.accuracy == pytest.approx(np.mean(expected))
    assert 0.4 < nested.accuracy < 1.0
    # Not the same number as picking one configuration: the vote is really what was scored.
    single = nested_cv(results, y, CLASSES, tables["good"].paths, best_row, vote=False)
    assert list(single.folds["chosen"]) != chosen


def test_vote_leads_the_leaderboard_with_one_member_per_feature_set(tmp_path):
    tables, y = _feature_sets()
    results = {name: run_cv(t, ["logreg", "knn"], grids={"logreg": {"C": GRID}}, n_folds=5, n_jobs=1,
                            cache_dir=tmp_path / "cv", nested=True) for name, t in tables.items()}
    ranked, folds = leaderboard_ensemble(results, y, CLASSES, 3)
    vote = ranked[0]
    assert vote.head == VOTE and [m.features for m in vote.members] == ["good", "noisy"]
    assert all(m.head == "logreg" for m in vote.members)
    # Each member is its feature set's best logreg row by CV accuracy.
    for m in vote.members:
        board = results[m.features].leaderboard
        assert m.params == board[board["head"] == "logreg"].iloc[0]["params"]
    for f, row in zip(results["good"].plan, folds.itertuples()):
        probas = [results[m.features].proba[(m.head, m.params, m.augment, f.repeat, f.fold)] for m in vote.members]
        rows = probas[0][0]
        assert row.accuracy == pytest.approx(accuracy_score(y[rows], np.mean([p for _, p in probas], axis=0).argmax(axis=1)))
    # Without a head named logreg on a set, that set's best candidate of any head votes.
    only_knn = vote_of([c for c in ranked if c.head == "knn"], ["good", "noisy"])
    assert [m.head for m in only_knn.members] == ["knn", "knn"]
    assert vote_of(ranked[1:], ["good"]) is None       # one feature set: no vote


def _forward(inner: dict, ys: list, costs: dict, lam: float) -> list[str]:
    """Forward selection written out independently: inner[name][j] = that set's probabilities on inner
    fold j; start with the best set, add the one that most improves mean(-log loss) - lam * cost."""
    def value(bag):
        losses = [log_loss(ys[j], np.mean([inner[n][j] for n in bag], axis=0), labels=[0, 1, 2]) for j in range(len(ys))]
        return -np.mean(losses) - lam * sum(costs[n] for n in bag)
    bag, current = [], -np.inf
    while len(bag) < len(inner):
        options = [n for n in inner if n not in bag]
        best = max(options, key=lambda n: (value(bag + [n]), -costs[n], -list(inner).index(n)))
        if bag and value(bag + [best]) <= current + 1e-12:
            break
        bag.append(best)
        current = value(bag)
    return bag


def _split_views(n=75, seed=3):
    """Three "backbones" over the same images: left and right each see half the informative features
    (their vote helps on some folds), twin is a copy of left (it can add nothing to it)."""
    X, y = make_classification(n_samples=n, n_features=8, n_informative=4, n_redundant=0, n_classes=3,
                               n_clusters_per_class=1, class_sep=0.9, flip_y=0.08, random_state=seed)
    rng = np.random.default_rng(seed)
    left = np.hstack([X[:, :2], rng.standard_normal((n, 4))])
    right = np.hstack([X[:, 2:4], rng.standard_normal((n, 4))])
    paths = [f"img/{i:03d}.png" for i in range(n)]
    return {name: FeatureTable(X=x.astype(np.float32), y=y, classes=CLASSES, paths=paths, key=f"split-{name}")
            for name, x in (("left", left), ("right", right), ("twin", left.copy()))}, y


def test_nested_selected_vote_matches_plain_scikit_learn(tmp_path):
    """With member selection, each outer fold's vote keeps the sets forward selection adds on the inner
    folds (each set's C chosen there too), recomputed here with plain scikit-learn; a copy of a set
    adds nothing and is never kept with it; the frontier's last row is the vote of every set."""
    from featurepipe.evaluation.selection import Rule

    seed, lam = 0, 0.005
    tables, y = _split_views()
    costs = {"left": 1.0, "right": 1.5, "twin": 1.0}
    results = {name: run_cv(t, ["logreg"], grids={"logreg": {"C": GRID}}, n_folds=5, seed=seed, n_jobs=1,
                            cache_dir=tmp_path / "cv", nested=True) for name, t in tables.items()}
    paths = tables["left"].paths
    nested = nested_cv(results, y, CLASSES, paths, 1.0, costs=costs, rule=Rule(lam=lam))

    outer = list(StratifiedKFold(5, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
    expected, kept = [], []
    for k, (train_k, test_k) in enumerate(outer):
        inner, chosen_c = {}, {}
        for name in ("left", "right"):
            X = tables[name].X.astype(np.float64)
            chosen_c[name] = C = _inner_choice(X, y, train_k, outer, k, seed)
            inner[name] = [_plain_logreg(C, seed).fit(X[np.setdiff1d(train_k, val_j)], y[np.setdiff1d(train_k, val_j)])
                           .predict_proba(X[val_j]) for j, (_, val_j) in enumerate(outer) if j != k]
        inner["twin"], chosen_c["twin"] = inner["left"], chosen_c["left"]    # the same features: the same fits
        ys = [y[val_j] for j, (_, val_j) in enumerate(outer) if j != k]
        bag = _forward(inner, ys, costs, lam)
        kept.append(bag)
        probas = [_plain_logreg(chosen_c[n], seed).fit(tables[n].X.astype(np.float64)[train_k], y[train_k])
                  .predict_proba(tables[n].X.astype(np.float64)[test_k]) for n in bag]
        expected.append(accuracy_score(y[test_k], np.mean(probas, axis=0).argmax(axis=1)))
    assert nested.folds["accuracy"].tolist() == pytest.approx(expected)
    assert nested.accuracy == pytest.approx(np.mean(expected))
    assert {len(bag) for bag in kept} == {1, 2}       # one set on some folds, a vote of two on others
    for bag, config, cost in zip(kept, nested.folds["chosen_config"], nested.folds["cost"]):
        config = json.loads(config)
        assert [m["features"] for m in config.get("members", [config])] == bag
        assert cost == pytest.approx(sum(costs[n] for n in bag))
        assert not {"left", "twin"} <= set(bag)          # the copy adds nothing
    # The frontier ends with every set voting: the nested accuracy of the equal vote, at full cost.
    plain = nested_cv(results, y, CLASSES, paths, 1.0)
    assert [f["members"] for f in nested.frontier] == [1, 2, 3]
    assert nested.frontier[-1]["nested_accuracy"] == pytest.approx(plain.accuracy)
    assert nested.frontier[-1]["cost"] == pytest.approx(3.5)
    assert sorted(nested.frontier[-1]["feature_sets"]) == ["left", "right", "twin"]
    assert nested.to_dict()["frontier"] == nested.frontier

    # The saved model keeps the selection made on the standard folds, nothing more.
    ranked, _ = leaderboard_ensemble(results, y, CLASSES, 3, costs=costs, rule=Rule(lam=lam))
    top = ranked[0]
    assert not {"left", "twin"} <= {m.features for m in top.members} | {top.features}
    assert len(ranked) == len(set(ranked))
    everyone, _ = leaderboard_ensemble(results, y, CLASSES, 3)
    assert [m.features for m in everyone[0].members] == ["left", "right", "twin"]
