import json
import time

import numpy as np
import pandas as pd
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.datasets import make_classification
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_score

from featurepipe import heads
from featurepipe.evaluation.crossval import FeatureTable, refit, run_cv
from featurepipe.evaluation.folds import fold_plan_id, make_folds
from featurepipe.evaluation.metrics import fold_metrics
from featurepipe.core.errors import DatasetError
from featurepipe.heads import HeadEntry, make_head
from featurepipe.core.progress import ProgressEvent

CLASSES = ["cat", "dog", "fox"]


def make_table(n=90, d=16, k_views=2, seed=0, views=True, view_noise=0.8, key="synthetic") -> FeatureTable:
    X, y = make_classification(
        n_samples=n, n_features=d, n_informative=6, n_redundant=0, n_classes=3,
        n_clusters_per_class=1, class_sep=1.5, flip_y=0.05, random_state=seed,
    )
    rng = np.random.default_rng(seed)
    v = X[:, None, :] + view_noise * rng.standard_normal((n, k_views, d)) if views else None
    return FeatureTable(
        X=X.astype(np.float32), y=y, classes=CLASSES, paths=[f"img/{i:03d}.jpg" for i in range(n)],
        views=None if v is None else v.astype(np.float32), key=key,
    )


# ---------------------------------------------------------------- folds


def test_stratified_folds_partition_every_repeat():
    y = make_table().y
    folds = make_folds(y, n_folds=5, repeats=2, seed=1)
    assert [(f.repeat, f.fold) for f in folds] == [(r, k) for r in range(2) for k in range(5)]
    for r in range(2):
        val = np.concatenate([f.val_idx for f in folds if f.repeat == r])
        assert sorted(val) == list(range(len(y)))
    for f in folds:
        assert not set(f.train_idx) & set(f.val_idx)
        assert len(f.train_idx) + len(f.val_idx) == len(y)
        assert set(np.bincount(y[f.val_idx], minlength=3)) <= {5, 6, 7}  # 30 per class / 5 folds
    assert not np.array_equal(folds[0].val_idx, folds[5].val_idx)


def test_fold_plan_id_follows_the_indices():
    y = make_table().y
    a = fold_plan_id(make_folds(y, n_folds=5, seed=0))
    assert a == fold_plan_id(make_folds(y, n_folds=5, seed=0))
    assert a != fold_plan_id(make_folds(y, n_folds=5, seed=1))
    assert a != fold_plan_id(make_folds(y, n_folds=4, seed=0))


def test_too_few_images_names_class_and_largest_working_k():
    y = np.array([0] * 20 + [1] * 3 + [2] * 10)
    with pytest.raises(DatasetError, match=r"class 'dog' has only 3 images.*5-fold.*largest fold count that works is 3"):
        make_folds(y, n_folds=5, class_names=CLASSES)
    assert len(make_folds(y, n_folds=3, class_names=CLASSES)) == 3
    y1 = np.array([0] * 20 + [1] * 1 + [2] * 10)
    with pytest.raises(DatasetError, match=r"class 'dog' has only 1 image; .*at least 2 images"):
        make_folds(y1, n_folds=5, class_names=CLASSES)
    with pytest.raises(DatasetError, match=r"class 'fox' has only 0 images"):
        make_folds(np.array([0] * 10 + [1] * 10), n_folds=2, class_names=CLASSES)


def test_run_cv_reports_too_few_images():
    t = make_table()
    y = t.y.copy()
    y[np.flatnonzero(y == 2)[3:]] = 0  # leave 'fox' with 3 images
    t2 = FeatureTable(t.X, y, CLASSES, t.paths)
    with pytest.raises(DatasetError, match="class 'fox' has only 3 images.*largest fold count that works is 3"):
        run_cv(t2, ["logreg"], n_folds=5, n_jobs=1)


def test_group_folds_keep_groups_whole():
    t = make_table()
    rng = np.random.default_rng(0)
    # groups of ~3 images of the same class (e.g. burst shots of one animal)
    groups = np.empty(len(t.y), dtype=object)
    for c in range(3):
        idx = rng.permutation(np.flatnonzero(t.y == c))
        for j, i in enumerate(idx):
            groups[i] = f"{CLASSES[c]}-{j // 3}"
    folds = make_folds(t.y, groups, n_folds=5, repeats=2, seed=0)
    assert len(folds) == 10
    for f in folds:
        assert not set(groups[f.train_idx]) & set(groups[f.val_idx])
    for r in range(2):
        assert sorted(np.concatenate([f.val_idx for f in folds if f.repeat == r])) == list(range(len(t.y)))
    assert not all(np.array_equal(a.val_idx, b.val_idx) for a, b in zip(folds[:5], folds[5:]))

    few = groups.copy()
    few[t.y == 1] = np.where(np.arange((t.y == 1).sum()) % 2 == 0, "dog-a", "dog-b")
    with pytest.raises(DatasetError, match="class 'dog' has images from only 2 distinct groups.*largest fold count that works is 2"):
        make_folds(t.y, few, n_folds=5, class_names=CLASSES)

    grouped = FeatureTable(t.X, t.y, CLASSES, t.paths, groups=groups)
    res = run_cv(grouped, ["logreg"], grids={"logreg": {"C": [1.0]}}, n_folds=3, n_jobs=1)
    assert res.leaderboard.loc[0, "accuracy_mean"] > 0.6


# ---------------------------------------------------------------- metrics


def test_fold_metrics_values():
    y = np.array([0, 0, 1, 1, 2, 2])
    perfect = np.eye(3)[y] * 0.97 + 0.01
    m = fold_metrics(y, perfect, CLASSES)
    assert m["accuracy"] == 1.0 and m["balanced_accuracy"] == 1.0 and m["f1_macro"] == 1.0
    assert m["roc_auc"] == 1.0 and m["log_loss"] == pytest.approx(-np.log(0.98))
    assert m["precision[cat]"] == 1.0 and m["recall[fox]"] == 1.0
    assert m["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]

    wrong = np.eye(3)[[1, 0, 0, 1, 2, 2]] * 0.97 + 0.01  # first 'cat' called 'dog', one 'dog' called 'cat'
    m = fold_metrics(y, wrong, CLASSES)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["recall[cat]"] == 0.5 and m["precision[dog]"] == 0.5 and m["precision[fox]"] == 1.0
    assert m["confusion_matrix"][0] == [1, 1, 0]

    missing = fold_metrics(np.array([0, 0, 1]), np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1]]), CLASSES)
    assert np.isnan(missing["roc_auc"]) and np.isnan(missing["recall[fox]"])
    assert np.isfinite(missing["log_loss"])

    yb = np.array([0, 1, 1, 0, 1])
    pb = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.35, 0.65], [0.8, 0.2]])
    mb = fold_metrics(yb, pb, ["neg", "pos"])
    assert mb["roc_auc"] == roc_auc_score(yb, pb[:, 1])


# ---------------------------------------------------------------- run_cv


def test_leaderboard_folds_and_oof_tables():
    t = make_table()
    events: list[ProgressEvent] = []
    res = run_cv(t, ["logreg", "linear_svm"], grids={"linear_svm": {"C": [0.1]}}, n_folds=5, n_jobs=1,
                 progress=events.append)
    lb = res.leaderboard
    # views exist, so every head is shown with and without them
    assert len(lb) == (3 + 1) * 2 and set(lb["augment"]) == {"none", "views"}
    assert list(lb["rank"]) == list(range(1, len(lb) + 1))
    for stat in ("mean", "std", "ci_low", "ci_high"):
        for metric in ("accuracy", "balanced_accuracy", "f1_macro", "log_loss", "roc_auc", "precision[cat]", "recall[fox]"):
            assert f"{metric}_{stat}" in lb.columns
    assert (lb["accuracy_ci_low"] <= lb["accuracy_mean"]).all() and (lb["accuracy_mean"] <= lb["accuracy_ci_high"]).all()
    acc = lb["accuracy_mean"].to_numpy()
    assert np.all(acc[:-1] >= acc[1:])
    assert (lb["n_folds"] == 5).all() and (lb["repeats"] == 1).all() and not lb["tta"].any()
    assert lb.loc[0, "accuracy_mean"] > 0.75
    assert res.best == {"head": lb.loc[0, "head"], "params": json.loads(lb.loc[0, "params"]),
                        "augment": lb.loc[0, "augment"], "tta": False}

    assert len(res.folds) == 8 * 5 and res.fitted == 40 and res.reused == 0
    one = res.folds[(res.folds["head"] == "logreg") & (res.folds["params"] == '{"C": 10.0}') & (res.folds["augment"] == "none")]
    assert one["accuracy"].mean() == lb[(lb["head"] == "logreg") & (lb["params"] == '{"C": 10.0}') & (lb["augment"] == "none")]["accuracy_mean"].item()
    assert np.sum(json.loads(one["confusion_matrix"].iloc[0])) == one["n_val"].iloc[0]

    oof = res.oof
    assert len(oof) == 8 * len(t.y)
    probs = oof[[f"p[{c}]" for c in CLASSES]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0)
    first = oof[(oof["head"] == "logreg") & (oof["params"] == '{"C": 10.0}') & (oof["augment"] == "none")]
    assert list(first["row"]) == list(range(len(t.y)))
    assert list(first["path"]) == t.paths and list(first["true"]) == [CLASSES[i] for i in t.y]
    first_p = first[[f"p[{c}]" for c in CLASSES]].to_numpy()
    assert list(first["pred"]) == list(np.array(CLASSES)[first_p.argmax(axis=1)])

    assert events and all(e.stage == "evaluate" for e in events)
    assert events[-1].done == events[-1].total == 40


def test_logreg_cv_accuracy_matches_plain_sklearn():
    """Honesty check: the leaderboard equals an independent scikit-learn computation."""
    t = make_table(views=False)
    seed = 3
    res = run_cv(t, ["logreg"], n_folds=5, seed=seed, n_jobs=1)
    cv = list(StratifiedKFold(5, shuffle=True, random_state=seed).split(t.X, t.y))
    for _, row in res.leaderboard.iterrows():
        params = json.loads(row["params"])
        scores = cross_val_score(make_head("logreg", params, seed=seed), t.X, t.y, cv=cv, scoring="accuracy")
        assert row["accuracy_mean"] == scores.mean()
        assert row["accuracy_std"] == pytest.approx(scores.std(ddof=1), abs=1e-12)


class RecordingClassifier(ClassifierMixin, BaseEstimator):
    """Remembers the first feature of every row it is fitted on (the row id planted by the leak test)."""

    fits: list = []

    def fit(self, X, y):
        RecordingClassifier.fits.append(np.asarray(X[:, 0]).copy())
        self.classes_ = np.unique(y)
        return self

    def predict_proba(self, X):
        return np.full((len(X), len(self.classes_)), 1.0 / len(self.classes_))


@pytest.fixture
def recording_head(monkeypatch):
    RecordingClassifier.fits = []
    entry = HeadEntry("recording", lambda params, seed: RecordingClassifier(), {}, "test spy", in_process=True)
    monkeypatch.setitem(heads.HEADS, "recording", entry)
    return RecordingClassifier


def test_views_of_validation_images_never_enter_training(recording_head):
    t = make_table(k_views=3)
    n = len(t.y)
    X, views = t.X.copy(), t.views.copy()
    X[:, 0] = np.arange(n)                                        # originals: id i
    views[:, :, 0] = 10_000 + np.arange(n)[:, None] * 10 + np.arange(3)  # views: 10000 + 10 i + k
    table = FeatureTable(X, t.y, CLASSES, t.paths, views=views)
    res = run_cv(table, ["recording"], n_folds=5, augment_modes=("views",), n_jobs=1)
    folds = make_folds(t.y, n_folds=5, seed=0)
    assert res.fitted == len(recording_head.fits) == 5
    for fold, seen in zip(folds, recording_head.fits):
        originals = seen[seen < 10_000].astype(int)
        view_rows = ((seen[seen >= 10_000] - 10_000) // 10).astype(int)
        assert sorted(originals) == sorted(fold.train_idx)
        assert sorted(view_rows) == sorted(np.repeat(fold.train_idx, 3))
        assert not set(view_rows) & set(fold.val_idx)

    recording_head.fits.clear()
    refit(table, "recording", {}, augment="views")
    assert len(recording_head.fits[0]) == n * 4
    refit(table, "recording", {}, augment="none")
    assert sorted(recording_head.fits[1]) == list(range(n))


def test_tta_changes_scores_only_in_views_mode(tmp_path):
    t = make_table()
    kw = dict(heads=["logreg"], grids={"logreg": {"C": [1.0]}}, n_folds=5, n_jobs=1, cache_dir=tmp_path)
    plain = run_cv(t, tta=False, **kw)
    tta = run_cv(t, tta=True, **kw)
    # "none" rows are the same experiment either way (and come from the cache)
    assert tta.reused == 5 and tta.fitted == 5
    lb_p = plain.leaderboard.set_index("augment")
    lb_t = tta.leaderboard.set_index("augment")
    assert not lb_t.loc["none", "tta"] and lb_t.loc["views", "tta"]
    metric_cols = [c for c in lb_p.columns if c.endswith("_mean")]
    assert lb_p.loc["none", metric_cols].equals(lb_t.loc["none", metric_cols])
    assert lb_p.loc["views", "log_loss_mean"] != lb_t.loc["views", "log_loss_mean"]
    pcols = [f"p[{c}]" for c in CLASSES]
    views_p = plain.oof[plain.oof["augment"] == "views"][pcols].to_numpy()
    views_t = tta.oof[tta.oof["augment"] == "views"][pcols].to_numpy()
    assert not np.allclose(views_p, views_t)

    # TTA is the mean of predict_proba over the original and its views
    fold = make_folds(t.y, n_folds=5, seed=0)[0]
    Xtr = np.concatenate([t.X[fold.train_idx], t.views[fold.train_idx].reshape(-1, t.X.shape[1])])
    ytr = np.concatenate([t.y[fold.train_idx], np.repeat(t.y[fold.train_idx], 2)])
    est = make_head("logreg", {"C": 1.0}).fit(Xtr, ytr)
    va = fold.val_idx
    expected = (est.predict_proba(t.X[va]) + est.predict_proba(t.views[va, 0]) + est.predict_proba(t.views[va, 1])) / 3
    got = tta.oof[(tta.oof["augment"] == "views") & (tta.oof["fold"] == 0)].set_index("row").loc[va, pcols].to_numpy()
    assert np.allclose(got, expected, atol=1e-12)


def test_views_mode_needs_views():
    t = make_table(views=False)
    assert set(run_cv(t, ["logreg"], grids={"logreg": {"C": [1.0]}}, n_jobs=1).leaderboard["augment"]) == {"none"}
    with pytest.raises(DatasetError, match="views"):
        run_cv(t, ["logreg"], augment_modes=("none", "views"), n_jobs=1)
    with pytest.raises(DatasetError, match="views"):
        run_cv(t, ["logreg"], tta=True, n_jobs=1)
    with pytest.raises(ValueError, match="valid modes"):
        run_cv(t, ["logreg"], augment_modes=("flip",), n_jobs=1)
    with pytest.raises(ValueError, match="valid heads"):
        run_cv(t, ["resnet"], n_jobs=1)


def test_cache_reuses_results_and_fits_only_new_heads(tmp_path):
    t = make_table(views=False)
    kw = dict(n_folds=3, n_jobs=1, cache_dir=tmp_path)
    grids = {"logreg": {"C": [0.1, 1.0]}, "linear_svm": {"C": [0.1]}}
    first = run_cv(t, ["logreg"], grids={"logreg": grids["logreg"]}, **kw)
    assert (first.fitted, first.reused) == (2 * 3, 0)
    assert len(list(tmp_path.glob("*.json"))) == 6 and not list(tmp_path.glob(".tmp-*"))

    second = run_cv(t, ["logreg"], grids={"logreg": grids["logreg"]}, **kw)
    assert (second.fitted, second.reused) == (0, 6)
    pd.testing.assert_frame_equal(first.leaderboard, second.leaderboard)
    pd.testing.assert_frame_equal(first.oof, second.oof)

    more = run_cv(t, ["logreg", "linear_svm"], grids=grids, **kw)
    assert (more.fitted, more.reused) == (3, 6)
    assert set(more.leaderboard["head"]) == {"logreg", "linear_svm"}

    # a torn file is refitted, not trusted; other seeds or features are different experiments
    victim = sorted(tmp_path.glob("*.json"))[0]
    victim.write_text('{"metrics": {"accura')
    assert run_cv(t, ["logreg", "linear_svm"], grids=grids, **kw).fitted == 1
    assert run_cv(t, ["linear_svm"], grids={"linear_svm": {"C": [0.1]}}, seed=1, **kw).reused == 0
    other = FeatureTable(t.X + 1, t.y, CLASSES, t.paths, key="other")
    assert run_cv(other, ["linear_svm"], grids={"linear_svm": {"C": [0.1]}}, **kw).reused == 0


def test_results_do_not_depend_on_n_jobs():
    t = make_table(views=False)
    kw = dict(heads=["logreg", "linear_svm"], grids={"logreg": {"C": [1.0]}, "linear_svm": {"C": [0.1]}}, n_folds=3, seed=5)
    serial = run_cv(t, n_jobs=1, **kw)
    pooled = run_cv(t, n_jobs=2, **kw)
    pd.testing.assert_frame_equal(serial.leaderboard, pooled.leaderboard)
    pd.testing.assert_frame_equal(serial.oof, pooled.oof)


def test_dense_head_runs_in_process_alongside_the_pool():
    t = make_table()
    grids = {"dense": {"hidden_units": [16], "batch_size": [32], "patience": [5]}, "logreg": {"C": [1.0]}}
    res = run_cv(t, ["dense", "logreg"], grids=grids, n_folds=3, n_jobs=2, tta=True)
    assert len(res.leaderboard) == 4 and res.fitted == 12
    assert res.leaderboard["accuracy_mean"].min() > 0.6
    # same numbers when each head runs alone and serially (the dense trainer is reused, reset)
    for head in ("logreg", "dense"):
        alone = run_cv(t, [head], grids={head: grids[head]}, n_folds=3, n_jobs=1, tta=True)
        pd.testing.assert_frame_equal(alone.oof, res.oof[res.oof["head"] == head].reset_index(drop=True))
    est = refit(t, "dense", {"hidden_units": 16, "epochs": 5}, augment="views")
    assert est.predict_proba(t.X).shape == (len(t.y), 3)


def test_pool_results_are_cached_when_an_in_process_head_fails(tmp_path, monkeypatch):
    class Broken(RecordingClassifier):
        def fit(self, X, y):
            raise RuntimeError("out of memory")

    monkeypatch.setitem(heads.HEADS, "broken", HeadEntry("broken", lambda p, s: Broken(), {}, "fails", in_process=True))
    t = make_table(views=False)
    kw = dict(grids={"logreg": {"C": [1.0]}}, n_folds=3, n_jobs=1, cache_dir=tmp_path)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_cv(t, ["logreg", "broken"], **kw)
    assert run_cv(t, ["logreg"], **kw).reused == 3


def test_pool_results_reach_disk_while_in_process_heads_still_fit(tmp_path, monkeypatch):
    # A killed evaluate keeps every pooled fit that had finished, not only those collected after the
    # in-process (TensorFlow) heads: the in-process head here waits, bounded, for the pooled fits'
    # result files to appear, and records whether they did.
    seen = []

    class Waiting(RecordingClassifier):
        def fit(self, X, y):
            deadline = time.monotonic() + (30 if not seen else 0)
            while len(list(tmp_path.glob("*.json"))) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            seen.append(len(list(tmp_path.glob("*.json"))))
            return super().fit(X, y)

    monkeypatch.setitem(heads.HEADS, "waiting", HeadEntry("waiting", lambda p, s: Waiting(), {}, "spy", in_process=True))
    t = make_table(views=False)
    run_cv(t, ["logreg", "waiting"], grids={"logreg": {"C": [1.0]}}, n_folds=3, n_jobs=2, cache_dir=tmp_path)
    assert seen[0] >= 3      # the 3 logreg folds were written before the first in-process fit ended


def test_interval_is_a_t_interval_clipped_to_the_metric_range():
    from scipy import stats

    from featurepipe.evaluation.metrics import _metric_range, _summary

    folds = [1.0, 1.0, 0.9, 1.0, 0.95]
    mean, std, low, high = _summary(folds, _metric_range("accuracy"))
    half = stats.t.ppf(0.975, 4) * np.std(folds, ddof=1) / np.sqrt(5)
    assert mean == pytest.approx(0.97) and std == pytest.approx(np.std(folds, ddof=1))
    assert low == pytest.approx(0.97 - half)
    assert mean + half > 1.0 and high == 1.0
    # log loss has no upper bound, only a lower one
    assert _summary([0.01, 0.5, 0.02], _metric_range("log_loss"))[2] == 0.0


def test_make_folds_remembers_splits_by_their_inputs(monkeypatch):
    """`run` asks for the same folds once per feature set: the greedy group split runs once, the
    result is the same splits (read-only, so no caller can change another's), and other labels,
    groups, counts or seeds get their own."""
    from sklearn.model_selection import StratifiedGroupKFold

    from featurepipe.evaluation import folds as folds_module

    calls = []
    real_split = StratifiedGroupKFold.split

    def split(self, *args, **kwargs):
        calls.append(1)
        return real_split(self, *args, **kwargs)

    monkeypatch.setattr(StratifiedGroupKFold, "split", split)
    monkeypatch.setattr(folds_module, "_FOLDS_MEMO", {})
    rng = np.random.default_rng(7)
    y = np.repeat([0, 1, 2], 20)
    groups = np.array([f"g{i // 2}" for i in range(60)], dtype=object)
    first = folds_module.make_folds(y, groups, 5, seed=3)
    again = folds_module.make_folds(y.copy(), groups.copy(), 5, seed=3)
    assert len(calls) == 1
    assert [(f.train_idx.tolist(), f.val_idx.tolist()) for f in first] == \
           [(f.train_idx.tolist(), f.val_idx.tolist()) for f in again]
    with pytest.raises(ValueError):
        first[0].val_idx[0] = 99
    fresh = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=3)
    expected = [va.tolist() for _, va in real_split(fresh, np.zeros((60, 1)), y, groups)]
    assert [f.val_idx.tolist() for f in first] == expected          # what sklearn itself gives
    folds_module.make_folds(y, groups, 5, seed=4)
    folds_module.make_folds(y, groups, 4, seed=3)
    folds_module.make_folds(y, np.array([f"g{i // 3}" for i in range(60)], dtype=object), 5, seed=3)
    folds_module.make_folds(rng.permutation(y), groups, 5, seed=3)
    assert len(calls) == 5
