"""The evaluate stage: run directory, honesty against plain scikit-learn, holdout splits, groups, reuse."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, Normalizer
from typer.testing import CliRunner

from featurepipe.rundir.heads_io import load_head
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.cli.app import app
from featurepipe.data.dataset import scan
from featurepipe.core.errors import DatasetError, FeaturepipeError
from featurepipe.evaluation.evaluate import evaluate, parse_grid
from featurepipe.extraction.extract import open_stores
from featurepipe.extraction.features import dataset_features
from featurepipe.evaluation.config import SearchConfig
from tests.conftest import make_image

TINY = BackboneSpec(name="tiny", weights="random", image_size=32)
# Close colours under heavy noise: CV accuracy well below 1, so equalities below are not trivial.
HARD = {"a": (120, 120, 120), "b": (135, 118, 108), "c": (108, 126, 136)}


@pytest.fixture
def hard_tree(tmp_path):
    root = tmp_path / "hard"
    for c, (name, colour) in enumerate(HARD.items()):
        for i in range(10):
            make_image(root / name / f"{name}_{i}.png", colour, seed=1000 * c + i)
    return root


def _evaluate(tree, cache, run_dir, **kwargs):
    options = dict(heads=("logreg",), folds=5, ensemble=0, widen=False)
    options.update(kwargs)
    return evaluate(scan(tree, cache_dir=cache), SearchConfig(specs=(TINY,), **options), cache, run_dir=run_dir, n_jobs=1)


def test_run_dir_holds_everything_needed_to_reproduce(hard_tree, cache, tmp_path):
    result = _evaluate(hard_tree, cache, tmp_path / "run", heads=("logreg", "linear_svm"))
    run = tmp_path / "run"
    for name in ("config.json", "leaderboard.csv", "folds.csv", "oof_predictions.csv", "best_head.json",
                 "best_head.joblib"):
        assert (run / name).exists(), name
    config = json.loads((run / "config.json").read_text())
    assert config["backbone"]["name"] == "tiny" and config["folds"] == 5 and config["heads"] == ["logreg", "linear_svm"]
    assert config["feature_fingerprints"] == [open_stores(TINY, cache).originals.fingerprint]
    assert config["dataset"]["counts"] == {"a": 10, "b": 10, "c": 10}
    leaderboard = pd.read_csv(run / "leaderboard.csv")
    assert len(leaderboard) == 6 and list(leaderboard["rank"]) == [1, 2, 3, 4, 5, 6]
    assert leaderboard["accuracy_mean"].is_monotonic_decreasing
    assert result.best["head"] == leaderboard.iloc[0]["head"]
    assert len(pd.read_csv(run / "folds.csv")) == 6 * 5
    oof = pd.read_csv(run / "oof_predictions.csv")
    assert len(oof) == 6 * 30 and set(oof["true"]) == set(HARD)
    # the saved head is the refit best one, and it loads only through the hash check
    estimator, meta = load_head(run)
    assert meta["head"] == result.best["head"] and meta["classes"] == ["a", "b", "c"]
    features = dataset_features(scan(hard_tree, cache_dir=cache), open_stores(TINY, cache))
    assert estimator.predict_proba(features.X).shape == (30, 3)


def test_leaderboard_equals_plain_scikit_learn_on_exported_features(hard_tree, cache, tmp_path):
    """The honesty check: the same folds and the same pipeline in plain scikit-learn, from `features export`."""
    _evaluate(hard_tree, cache, tmp_path / "run", grids={"logreg": {"C": [1.0]}}, seed=3)
    exported = tmp_path / "feats.npz"
    outcome = CliRunner().invoke(app, ["features", "export", str(hard_tree), "--out", str(exported),
                                       "--backbone", "tiny", "--weights", "random", "--image-size", "32",
                                       "--cache-dir", str(cache)])
    assert outcome.exit_code == 0, outcome.output
    data = np.load(exported)
    X, labels = data["features"], data["label"]
    classes = sorted(set(labels))
    y = np.array([classes.index(label) for label in labels])
    accuracies, losses = [], []
    for train, val in StratifiedKFold(5, shuffle=True, random_state=3).split(X, y):
        # The default logreg front written out: signed square root, then unit-norm rows.
        signed_sqrt = FunctionTransformer(lambda a: np.sign(a) * np.sqrt(np.abs(a)))
        model = make_pipeline(signed_sqrt, Normalizer(), LogisticRegression(C=1.0, max_iter=1000, random_state=3))
        model.fit(X[train], y[train])
        accuracies.append(accuracy_score(y[val], model.predict(X[val])))
        losses.append(log_loss(y[val], model.predict_proba(X[val]), labels=[0, 1, 2]))
    row = pd.read_csv(tmp_path / "run" / "leaderboard.csv").iloc[0]
    assert 0.2 < row["accuracy_mean"] < 1.0   # a task hard enough for the comparison to mean something
    assert row["accuracy_mean"] == pytest.approx(np.mean(accuracies), abs=1e-12)
    assert row["accuracy_std"] == pytest.approx(np.std(accuracies, ddof=1), abs=1e-12)
    assert row["log_loss_mean"] == pytest.approx(np.mean(losses), rel=1e-6)   # float32 vs float64 probabilities


def test_predefined_splits_cv_on_train_and_score_validation_once(tmp_path, cache):
    root = tmp_path / "split"
    for split, count in (("train", 8), ("validation", 4)):
        for c, (name, colour) in enumerate(HARD.items()):
            for i in range(count):
                make_image(root / split / name / f"{name}_{i}.png", colour, seed=hash((split, c, i)) % 10_000)
    result = evaluate(scan(root, cache_dir=cache), SearchConfig(specs=(TINY,), heads=("logreg",), folds=4),
                      cache, n_jobs=1, run_dir=tmp_path / "run")
    assert result.images_used == 24
    oof = pd.read_csv(tmp_path / "run" / "oof_predictions.csv")
    assert not oof["path"].str.contains("/validation/").any()
    validation = result.holdout["validation"]
    assert validation["images"] == 12
    # the holdout score is the saved head's accuracy on the validation images, nothing else
    dataset = scan(root, cache_dir=cache)
    features = dataset_features(dataset, open_stores(TINY, cache))
    rows = (features.frame["split"] == "validation").to_numpy()
    estimator, meta = load_head(tmp_path / "run")
    y = features.frame.loc[rows, "label"].map({c: i for i, c in enumerate(meta["classes"])}).to_numpy()
    assert validation["accuracy"] == pytest.approx(accuracy_score(y, estimator.predict_proba(features.X[rows]).argmax(1)))
    assert (tmp_path / "run" / "holdout.csv").exists()


def test_groups_never_straddle_train_and_validation(hard_tree, cache, tmp_path):
    # files a_0..a_9 -> groups by the digit's parity within each class: "a_even", "a_odd", ...
    dataset = scan(hard_tree, cache_dir=cache, groups_pattern=r"^([a-c]_\d)")
    dataset.frame["group"] = [f"{g[0]}{int(g[-1]) % 5}" for g in dataset.frame["group"]]
    result = evaluate(dataset, SearchConfig(specs=(TINY,), heads=("logreg",), folds=3),
                      cache, n_jobs=1, run_dir=tmp_path / "run")
    assert result.fitted == 3 * (3 + 3)      # 3 folds and, for nested CV, their 3 pairs, per C
    oof = pd.read_csv(tmp_path / "run" / "oof_predictions.csv")
    groups = dict(zip(dataset.frame["path"], dataset.frame["group"]))
    per_group_folds = oof.assign(group=oof["path"].map(groups)).groupby(["params", "group"])["fold"].nunique()
    assert (per_group_folds == 1).all()


def test_reruns_reuse_fits_adding_a_head_fits_only_it_and_k_changes_refit_views_only(hard_tree, cache, tmp_path):
    # 3 C values x (5 folds + 10 fold pairs for nested CV) = 45 fits per head and augment mode
    first = _evaluate(hard_tree, cache, tmp_path / "r1")
    assert (first.fitted, first.reused) == (45, 0)
    again = _evaluate(hard_tree, cache, tmp_path / "r2")
    assert (again.fitted, again.reused) == (0, 45)
    pd.testing.assert_frame_equal(first.leaderboard, again.leaderboard)
    assert again.nested.accuracy == first.nested.accuracy
    more = _evaluate(hard_tree, cache, tmp_path / "r3", heads=("logreg", "linear_svm"))
    assert (more.fitted, more.reused) == (45, 45)
    with_views = _evaluate(hard_tree, cache, tmp_path / "r4", augment=2)
    assert (with_views.fitted, with_views.reused) == (45, 45)     # only the "views" rows are new
    other_k = _evaluate(hard_tree, cache, tmp_path / "r5", augment=3)
    assert (other_k.fitted, other_k.reused) == (45, 45)           # K changed: views rows refit
    assert set(other_k.leaderboard["augment"]) == {"none", "views"}


def test_too_few_images_for_the_fold_count_names_the_class_and_the_largest_k(tmp_path, cache):
    root = tmp_path / "small"
    for i in range(6):
        make_image(root / "many" / f"m{i}.png", (200, 30, 30), seed=i)
    for i in range(3):
        make_image(root / "few" / f"f{i}.png", (30, 30, 200), seed=50 + i)
    with pytest.raises(DatasetError) as error:
        evaluate(scan(root, cache_dir=cache), SearchConfig(specs=(TINY,), heads=("logreg",), folds=5),
                 cache, run_dir=tmp_path / "run")
    assert "few" in str(error.value) and "3" in str(error.value)


def test_default_folds_shrink_to_the_smallest_class_and_say_so(tmp_path, cache):
    """No --folds: 5 folds, or as many as the smallest class has images (3 here), with a note, the
    nested headline still computed, and the same numbers as asking for 3 folds explicitly; a class of
    one image is still an error."""
    root = tmp_path / "small"
    for i in range(6):
        make_image(root / "many" / f"m{i}.png", (200, 30, 30), seed=i)
    for i in range(3):
        make_image(root / "few" / f"f{i}.png", (30, 30, 200), seed=50 + i)
    auto = evaluate(scan(root, cache_dir=cache), SearchConfig(specs=(TINY,), heads=("logreg",), grids={"logreg": {"C": [10.0]}}, dedup_groups=False),
                    cache, run_dir=tmp_path / "auto", n_jobs=1)
    assert auto.folds == 3 and set(auto.leaderboard["n_folds"]) == {3}
    assert any("3-fold" in n and "'few' has 3 images" in n for n in auto.notes)
    assert auto.nested is not None
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["folds"] == 3
    explicit = evaluate(scan(root, cache_dir=cache), SearchConfig(specs=(TINY,), heads=("logreg",), grids={"logreg": {"C": [10.0]}}, folds=3, dedup_groups=False),
                        cache, run_dir=tmp_path / "explicit", n_jobs=1)
    assert explicit.notes == [] and explicit.fitted == 0      # the very fits auto made
    assert explicit.nested.accuracy == auto.nested.accuracy
    for extra in range(3, 6):   # 5+ images in every class: the default 5 folds, no note
        make_image(root / "few" / f"f{extra}.png", (30, 30, 200), seed=50 + extra)
    full = evaluate(scan(root, cache_dir=cache), SearchConfig(specs=(TINY,), heads=("logreg",), grids={"logreg": {"C": [10.0]}}, dedup_groups=False),
                    cache, run_dir=tmp_path / "full", n_jobs=1)
    assert full.folds == 5 and full.notes == []
    make_image(root / "one" / "o0.png", (30, 200, 30), seed=99)
    with pytest.raises(DatasetError, match="'one' has only 1 image"):
        evaluate(scan(root, cache_dir=cache), SearchConfig(specs=(TINY,), heads=("logreg",), dedup_groups=False),
                 cache, run_dir=tmp_path / "one", n_jobs=1)


def test_unknown_head_and_bad_grid_are_clear_errors(hard_tree, cache, tmp_path):
    with pytest.raises(FeaturepipeError, match="unknown head.*forest"):
        _evaluate(hard_tree, cache, tmp_path / "run", heads=("forest",))
    with pytest.raises(FeaturepipeError, match="not valid JSON"):
        parse_grid("{logreg: C}")
    with pytest.raises(FeaturepipeError, match="unknown head"):
        parse_grid('{"forest": {"n": [1]}}')
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text("[logreg]\nC = [0.5, 2.0]\n")
    assert parse_grid(str(grid_file)) == {"logreg": {"C": [0.5, 2.0]}}


def test_cli_evaluate_json(hard_tree, cache, tmp_path):
    outcome = CliRunner().invoke(app, ["evaluate", str(hard_tree), "--heads", "logreg", "--folds", "3",
                                       "--backbone", "tiny", "--weights", "random", "--image-size", "32",
                                       "--grid", '{"logreg": {"C": [1.0]}}', "--run-dir", str(tmp_path / "run"),
                                       "--cache-dir", str(cache), "--json"])
    assert outcome.exit_code == 0, outcome.output
    summary = json.loads(outcome.stdout)
    assert summary["best"]["head"] == "logreg" and summary["fitted"] == 3 + 3   # 3 folds + 3 pairs (nested)
    assert summary["nested"]["folds"] and 0 < summary["nested"]["accuracy"]["mean"] <= 1
    assert summary["run_dir"] == str(tmp_path / "run") and len(summary["leaderboard"]) == 1


def test_search_over_feature_sets_saves_the_winner_and_a_nested_headline(hard_tree, cache, tmp_path):
    from featurepipe.evaluation.config import SEARCH_HEADS
    from featurepipe.deploy.predict import predict
    from featurepipe.report.write import write_report

    specs = [TINY, BackboneSpec(name="tiny", weights="random", image_size=32, resize="letterbox")]
    run = tmp_path / "run"
    result = evaluate(scan(hard_tree, cache_dir=cache), SearchConfig(heads=SEARCH_HEADS, specs=specs, folds=5),
                      cache, n_jobs=1, run_dir=run)
    board = pd.read_csv(run / "leaderboard.csv")
    assert set(board["features"]) == {"tiny/squash", "tiny/letterbox", "2 feature sets"}
    assert {"logreg", "knn", "ncm", "vote"} <= set(board["head"])
    # Several feature sets: the saved model is the vote of each set's best logreg, ranked first.
    top = board.iloc[0]
    meta = json.loads((run / "best_head.json").read_text())
    assert (meta["features"], meta["head"]) == (top["features"], top["head"]) == (result.best["features"], "vote")
    members = [json.loads((run / m["dir"] / "best_head.json").read_text()) for m in meta["members"]]
    assert [m["backbone"]["resize"] for m in members] == ["squash", "letterbox"]
    for m in members:
        rows = board[(board["features"] == m["features"]) & (board["head"] == "logreg")]
        assert json.dumps(m["params"], sort_keys=True) == rows.iloc[0]["params"]    # each set's best logreg
    nested = json.loads((run / "nested.json").read_text())
    assert len(nested["folds"]) == 5 and 0.0 < nested["accuracy"]["mean"] <= 1.0
    assert all(f["chosen"].startswith("vote of 2 feature sets") for f in nested["folds"])
    # The gap is measured from the best row a best-of-N headline would have shown.
    assert nested["optimism_gap"] == pytest.approx(board["accuracy_mean"].max() - nested["accuracy"]["mean"])
    assert len(pd.read_csv(run / "nested_oof.csv")) == 30
    config = json.loads((run / "config.json").read_text())
    assert sorted(config["search"]["feature_sets"]) == ["tiny/letterbox", "tiny/squash"]
    assert config["backbone"] is None and config["search"]["vote"] is True
    # The saved vote is what predict uses: the mean of its members' probabilities.
    images = sorted(hard_tree.glob("a/*.png"))[:3]
    predicted = predict(run, images, cache_dir=cache)
    assert len(predicted.frame) == 3 and predicted.failed == 0
    from featurepipe.rundir.heads_io import load_head
    from featurepipe.extraction.extract import open_stores
    from featurepipe.extraction.features import dataset_features

    dataset = scan(hard_tree, cache_dir=cache)
    expected = []
    for m, spec in zip(meta["members"], specs):
        head, _ = load_head(run / m["dir"])
        features = dataset_features(dataset, open_stores(spec, cache))
        rows = [features.frame["path"].tolist().index(str(p)) for p in images]
        expected.append(head.predict_proba(features.X[rows]))
    columns = [f"p[{c}]" for c in predicted.classes]
    assert predicted.frame[columns].to_numpy() == pytest.approx(np.mean(expected, axis=0), abs=1e-6)
    html = write_report(run).html_path.read_text()
    assert "Nested cross-validation" in html and "optimism gap" in html
    # A re-run with nothing changed fits nothing.
    again = evaluate(scan(hard_tree, cache_dir=cache), SearchConfig(heads=SEARCH_HEADS, specs=specs, folds=5),
                     cache, n_jobs=1, run_dir=tmp_path / "again")
    assert again.fitted == 0 and again.nested.accuracy == result.nested.accuracy
    # Without the vote, the search picks one row (or the soft vote of the best set's heads).
    single = evaluate(scan(hard_tree, cache_dir=cache), SearchConfig(heads=SEARCH_HEADS, specs=specs, folds=5, vote=False),
                      cache, n_jobs=1, run_dir=tmp_path / "single")
    assert single.fitted == 0 and "ensemble" in set(single.leaderboard["head"]) and single.best["head"] != "vote"
    assert not (tmp_path / "single" / "members").exists()
    assert json.loads((tmp_path / "single" / "best_head.json").read_text())["backbone"]["name"] == "tiny"


def test_a_vote_whose_member_list_was_edited_is_refused(hard_tree, cache, tmp_path):
    from featurepipe.core.errors import TrustError
    from featurepipe.rundir.run import open_run

    specs = [TINY, BackboneSpec(name="tiny", weights="random", image_size=32, resize="letterbox")]
    run = tmp_path / "run"
    evaluate(scan(hard_tree, cache_dir=cache), SearchConfig(heads=("logreg",), specs=specs, folds=3, nested=False),
             cache, n_jobs=1, run_dir=run)
    assert [m.spec.resize for m in open_run(run).members] == ["squash", "letterbox"]
    meta = json.loads((run / "best_head.json").read_text())
    meta["members"] = meta["members"][:1] + meta["members"][:1]      # the same member twice
    (run / "best_head.json").write_text(json.dumps(meta))
    with pytest.raises(TrustError, match="vote over 2 feature sets"):
        open_run(run)
    assert len(open_run(run, trust=True).members) == 2                # --trust: the user vouches for it
    meta["members"][1]["dir"] = "../../elsewhere"
    (run / "best_head.json").write_text(json.dumps(meta))
    with pytest.raises(TrustError, match="outside the run folder"):
        open_run(run, trust=True)


def test_c_sweep_widens_when_the_best_c_wins_at_the_edge(hard_tree, cache, tmp_path):
    result = _evaluate(hard_tree, cache, tmp_path / "run", grids={"logreg": {"C": [0.001, 0.01]}}, widen=True)
    # A user grid is searched as given ...
    assert sorted(json.loads(p)["C"] for p in result.leaderboard["params"]) == [0.001, 0.01]
    from featurepipe.evaluation.evaluate import _widen

    class Board:   # ... the default grid widens when its top C beats its neighbour
        def __init__(self, rows):
            self.leaderboard = pd.DataFrame(rows)

    rows = [{"head": "logreg", "params": json.dumps({"C": c}), "accuracy_mean": a, "log_loss_mean": 0.1}
            for c, a in ((1000.0, 0.9), (100.0, 0.8), (10.0, 0.7))]
    grown = _widen({"x": Board(rows)}, ("logreg",), {}, {})
    assert grown["logreg"]["C"] == [10.0, 100.0, 1000.0, 10000.0]
    plateau = [{**r, "accuracy_mean": 0.9} for r in rows]
    assert _widen({"x": Board(plateau)}, ("logreg",), {}, {}) == {}


def test_search_cli_rejects_a_bad_concatenation_or_resize_with_a_clear_message(hard_tree, cache):
    out = CliRunner().invoke(app, ["evaluate", str(hard_tree), "--backbone", "tiny+tiny", "--cache-dir", str(cache)])
    assert out.exit_code == 2 and "names a backbone twice" in out.output
    out = CliRunner().invoke(app, ["evaluate", str(hard_tree), "--resize", "stretch", "--cache-dir", str(cache)])
    assert out.exit_code == 2 and "auto" in out.output


def test_cli_votes_across_feature_sets_unless_told_not_to(hard_tree, cache, tmp_path):
    common = ["evaluate", str(hard_tree), "--backbone", "tiny", "--weights", "random", "--image-size", "32",
              "--resize", "auto", "--heads", "logreg", "--folds", "3", "--cache-dir", str(cache), "--json"]
    voted = CliRunner().invoke(app, common + ["--run-dir", str(tmp_path / "voted")])
    assert voted.exit_code == 0, voted.output
    assert json.loads((tmp_path / "voted" / "best_head.json").read_text())["head"] == "vote"
    assert len(list((tmp_path / "voted" / "members").iterdir())) == 3       # squash, center_crop, letterbox
    single = CliRunner().invoke(app, common + ["--run-dir", str(tmp_path / "single"), "--no-vote"])
    assert single.exit_code == 0, single.output
    assert json.loads((tmp_path / "single" / "best_head.json").read_text())["head"] == "logreg"
    assert not (tmp_path / "single" / "members").exists()


def test_square_photos_are_cross_validated_once_for_all_three_resize_policies(tmp_path, cache):
    """A square image has the same features under squash, center_crop and letterbox (extract copies
    them), so CV keyed by the feature values fits each configuration once: searching the three
    policies fits no more than searching one, and every policy's leaderboard rows are the same."""
    root = tmp_path / "square"
    for c, (name, colour) in enumerate([("red", (200, 40, 40)), ("blue", (40, 40, 200))]):
        for i in range(9):
            make_image(root / name / f"{name}{i}.png", colour, seed=10 * c + i, size=(36, 36))
    specs = [BackboneSpec(name="tiny", weights="random", image_size=32, resize=r)
             for r in ("squash", "center_crop", "letterbox")]
    one = evaluate(scan(root, cache_dir=tmp_path / "one"), SearchConfig(heads=("logreg", "knn"), specs=specs[:1], folds=3),
                   tmp_path / "one", n_jobs=1, run_dir=tmp_path / "run-one")
    three = evaluate(scan(root, cache_dir=cache), SearchConfig(heads=("logreg", "knn"), specs=specs, folds=3),
                     cache, n_jobs=1, run_dir=tmp_path / "run-three")
    assert three.extract.copied == 2 * 18 and three.extract.extracted == 18
    assert three.fitted == one.fitted > 0
    board = three.leaderboard
    rows = {name: board[board["features"] == name].sort_values(["head", "params"])["accuracy_mean"].tolist()
            for name in ("tiny/squash", "tiny/center_crop", "tiny/letterbox")}
    assert rows["tiny/squash"] == rows["tiny/center_crop"] == rows["tiny/letterbox"]
    # One refit serves the three members, each saved with its own policy (predict decodes new,
    # non-square images by it).
    meta = json.loads((tmp_path / "run-three" / "best_head.json").read_text())
    members = [json.loads((tmp_path / "run-three" / m["dir"] / "best_head.json").read_text()) for m in meta["members"]]
    assert [m["backbone"]["resize"] for m in members] == ["squash", "center_crop", "letterbox"]


def test_select_members_saves_only_the_feature_sets_forward_selection_keeps(hard_tree, cache, tmp_path):
    """--select-members: the saved model keeps the sets that forward selection on the standard CV folds
    keeps (recomputed here from the out-of-fold file and the leaderboard with plain numpy / scikit-learn), nested.json
    records the frontier and the per-fold predict cost, the report shows the frontier."""
    from featurepipe.evaluation.cost import pass_cost
    from featurepipe.evaluation.selection import LAMBDA
    from featurepipe.report.write import write_report

    run = tmp_path / "selected"
    out = CliRunner().invoke(app, ["evaluate", str(hard_tree), "--backbone", "tiny", "--weights", "random",
                                   "--image-size", "32", "--resize", "auto", "--heads", "logreg", "--folds", "3",
                                   "--cache-dir", str(cache), "--json", "--select-members", "--run-dir", str(run)])
    assert out.exit_code == 0, out.output
    assert json.loads((run / "config.json").read_text())["search"]["select_members"] is True
    price = pass_cost(TINY)
    board = pd.read_csv(run / "leaderboard.csv")
    oof = pd.read_csv(run / "oof_predictions.csv")
    sets = ["tiny/squash", "tiny/center_crop", "tiny/letterbox"]
    pool = {}
    for name in sets:
        rows = board[(board["features"] == name) & (board["head"] == "logreg")]
        best = rows.sort_values(["accuracy_mean", "log_loss_mean"], ascending=[False, True], kind="stable").iloc[0]
        pool[name] = oof[(oof["features"] == name) & (oof["head"] == "logreg") & (oof["params"] == best["params"])]
    columns = [c for c in oof.columns if c.startswith("p[")]
    classes = [c[2:-1] for c in columns]

    def value(bag):
        losses = []
        for fold in sorted(pool[sets[0]]["fold"].unique()):
            parts = [pool[n][pool[n]["fold"] == fold].sort_values("row") for n in bag]
            y = parts[0]["true"].map(classes.index).to_numpy()
            losses.append(log_loss(y, np.mean([p[columns].to_numpy() for p in parts], axis=0), labels=range(3)))
        return -np.mean(losses) - LAMBDA * price * len(bag)
    bag, current = [], -np.inf
    while len(bag) < len(sets):
        best = max((n for n in sets if n not in bag), key=lambda n: (value(bag + [n]), -sets.index(n)))
        if bag and value(bag + [best]) <= current + 1e-12:
            break
        bag.append(best)
        current = value(bag)
    meta = json.loads((run / "best_head.json").read_text())
    saved = [m["features"] for m in meta["members"]] if meta["head"] == "vote" else [meta["features"]]
    assert saved == bag
    assert (run / "members").exists() == (len(bag) > 1)
    nested = json.loads((run / "nested.json").read_text())
    assert [f["members"] for f in nested["frontier"]] == [1, 2, 3]
    assert [f["cost"] for f in nested["frontier"]] == pytest.approx([price, 2 * price, 3 * price])
    assert all(0 <= f["nested_accuracy"] <= 1 for f in nested["frontier"])
    assert nested["frontier"][0]["feature_sets"] == bag[:1]
    assert all(f["cost"] == pytest.approx(price * (f["chosen"].count("tiny/") or 1)) for f in nested["folds"])
    assert json.loads(out.stdout)["nested"]["frontier"] == nested["frontier"]     # evaluate --json shows it too
    html = write_report(run).html_path.read_text()
    assert "Vote members" in html and "greedy order" in html
