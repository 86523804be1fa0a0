"""The student (issue 22): soft targets from the vote's out-of-fold probabilities, never from a
held-out image; alpha 0 is hard-label training; the winner rule; the cost said before training."""

import json
from unittest import mock
import shutil

import keras
import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, Normalizer

from featurepipe.backbones.spec import BackboneSpec
from featurepipe.core.progress import NOTICE
from featurepipe.data.dataset import scan
from featurepipe.evaluation.config import SearchConfig
from featurepipe.evaluation.evaluate import evaluate
from featurepipe.extraction.extract import open_stores
from featurepipe.extraction.features import dataset_features
from featurepipe.training import distill, finetune_cost
from featurepipe.training.config import FinetuneConfig
from featurepipe.training.finetune import finetune
from tests.conftest import COLOURS, make_image

SPECS = [BackboneSpec(name="tiny", weights="random", image_size=32),
         BackboneSpec(name="tiny", weights="random", image_size=24, resize="letterbox")]
FAST = dict(batch_size=8, lr=1e-3, seed=0, epochs=1)


@pytest.fixture(scope="module")
def vote_run(tmp_path_factory):
    """A vote over two tiny feature sets on 3 colours x 10 noisy photos (no validation split: the
    fine-tuning holds out 20% of train)."""
    root = tmp_path_factory.mktemp("student")
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(10):
            make_image(root / "data" / name / f"{name}{i}.png", colour, seed=300 * c + i)
    cache = root / "cache"
    evaluate(scan(root / "data", cache_dir=cache), SearchConfig(heads=("logreg",), specs=tuple(SPECS), folds=2),
             cache, run_dir=root / "vote", n_jobs=1)
    return root, root / "vote"


@pytest.fixture(scope="module")
def student(vote_run, tmp_path_factory):
    """One 1-epoch student (alpha 0.5, temperature 2) of the vote, with every progress event recorded."""
    root, run = vote_run
    run = shutil.copytree(run, tmp_path_factory.mktemp("student_run") / "run")
    events = []
    result = finetune(run, FinetuneConfig(distill_alpha=0.5, distill_temperature=2.0, **FAST),
                      cache_dir=root / "cache", progress=events.append)
    return root, run, result, events


def _plain_logreg(C: float):
    """The run's logreg head (signed sqrt, L2, multinomial lbfgs), written with scikit-learn alone."""
    return make_pipeline(FunctionTransformer(lambda X: np.sign(X) * np.sqrt(np.abs(X))), Normalizer(),
                         LogisticRegression(C=C, max_iter=1000, random_state=0))


def test_soft_targets_never_used_a_held_out_image(student):
    """teacher_targets.csv holds the training images only, and each one's teacher probabilities are
    recomputed here from the cached features with plain scikit-learn: for its fold, every member's
    logreg fitted on the OTHER folds of the training images (no held-out image anywhere), averaged."""
    root, run, result, _ = student
    table = pd.read_csv(run / "finetune" / "teacher_targets.csv")
    split = json.loads((run / "finetune" / "split.json").read_text())
    held_out = {row[2] for row in split["validation"]}
    assert set(table["hash"]) == {row[2] for row in split["train"]} and not set(table["hash"]) & held_out
    assert len(table) == result.train_images and sorted(table["fold"].unique()) == list(range(5))
    meta = json.loads((run / "best_head.json").read_text())
    classes = meta["classes"]
    y = np.array([classes.index(c) for c in table["label"]])
    dataset = scan(root / "data", cache_dir=root / "cache")
    teacher = np.zeros((len(table), len(classes)))
    for member, spec in zip(meta["members"], SPECS):
        features = dataset_features(dataset, open_stores(spec, root / "cache"))
        index = {h: i for i, h in enumerate(features.frame["hash"])}
        X = features.X[[index[h] for h in table["hash"]]]
        for k in range(5):
            fit_on, predict = table["fold"].to_numpy() != k, table["fold"].to_numpy() == k
            head = _plain_logreg(member["params"]["C"]).fit(X[fit_on], y[fit_on])
            teacher[predict] += head.predict_proba(X[predict]) / len(meta["members"])
    np.testing.assert_allclose(table[[f"teacher_{c}" for c in classes]].to_numpy(), teacher, atol=1e-5)
    # target = 0.5 * teacher at temperature 2 + 0.5 * one-hot, recomputed with numpy from the teacher
    # the table recorded (checked against the independent refit just above). Not from the refit itself:
    # the square root magnifies lbfgs's 1e-5 run-to-run wobble on small probabilities (a clean install
    # once missed 1e-5 by 2.4e-5 at p = 0.01), so that tolerance would test the solver, not the formula.
    recorded = table[[f"teacher_{c}" for c in classes]].to_numpy(np.float64)
    softened = np.sqrt(recorded) / np.sqrt(recorded).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(table[[f"target_{c}" for c in classes]].to_numpy(),
                               0.5 * softened + 0.5 * np.eye(len(classes))[y], atol=1e-6)
    assert result.student["teacher"] == [m["features"] for m in meta["members"]]
    assert result.student["oof_accuracy"] == pytest.approx(np.mean(teacher.argmax(axis=1) == y))


def test_alpha_zero_is_hard_label_training():
    """alpha 0: the targets are the one-hot labels exactly (label-smoothed as Keras smooths them),
    and the categorical loss on them is the sparse loss hard-label training used."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=30)
    teacher = rng.dirichlet(np.ones(4), size=30)
    assert np.array_equal(distill.mix(teacher, y, 4, 0.0, 3.0), np.eye(4, dtype=np.float32)[y])
    assert np.array_equal(distill.mix(None, y, 4, 0.7, 1.0), np.eye(4, dtype=np.float32)[y])
    np.testing.assert_allclose(distill.mix(teacher, y, 4, 0.0, 1.0, smoothing=0.1), np.eye(4)[y] * 0.9 + 0.025)
    np.testing.assert_allclose(distill.mix(teacher, y, 4, 1.0, 1.0), teacher, atol=1e-6)
    predicted = rng.dirichlet(np.ones(4), size=30).astype(np.float32)
    categorical = keras.losses.CategoricalCrossentropy()(distill.one_hot(y, 4), predicted)
    sparse = keras.losses.SparseCategoricalCrossentropy()(y, predicted)
    assert float(categorical) == pytest.approx(float(sparse), rel=1e-6)
    # Temperature: softmax(log p / T); T = 1 leaves the probabilities as they are.
    np.testing.assert_allclose(distill.soften(teacher, 1.0), teacher, atol=1e-9)
    np.testing.assert_allclose(distill.soften(teacher, 0.5), teacher ** 2 / (teacher ** 2).sum(axis=1, keepdims=True))
    warm = distill.soften(teacher, 4.0)
    assert np.array_equal(warm.argmax(axis=1), teacher.argmax(axis=1)) and (warm.max(axis=1) < teacher.max(axis=1)).all()


def test_alpha_zero_run_trains_on_the_labels(vote_run, tmp_path):
    root, run = vote_run
    run = shutil.copytree(run, tmp_path / "run")
    result = finetune(run, FinetuneConfig(distill_alpha=0.0, **FAST), cache_dir=root / "cache")
    table = pd.read_csv(run / "finetune" / "teacher_targets.csv")
    classes = json.loads((run / "best_head.json").read_text())["classes"]
    y = np.array([classes.index(c) for c in table["label"]])
    assert np.array_equal(table[[f"target_{c}" for c in classes]].to_numpy(), np.eye(len(classes))[y])
    assert table[[f"teacher_{c}" for c in classes]].isna().all().all() and result.student["folds"] == 0


def test_teacher_folds_are_stratified_and_need_two_images_a_class():
    y = np.array([0] * 7 + [1] * 3 + [2] * 12)
    folds = distill.teacher_folds(y, seed=1)
    assert folds.max() + 1 == 3                       # the smallest class has 3 images: 3 folds
    assert all(set(y[folds == k]) == {0, 1, 2} for k in range(3))
    assert np.array_equal(folds, distill.teacher_folds(y, seed=1))
    assert distill.teacher_folds(np.array([0, 0, 1, 2, 2]), seed=0) is None
    assert distill.teacher_folds(y, seed=1, folds=5).max() + 1 == 3


def test_the_winner_is_the_better_of_the_two_on_the_same_images():
    """compare() on the same images both ways: the better one wins, with a paired interval of the
    accuracy change that holds the change and excludes 0 only when every flip goes one way."""
    from featurepipe.training.compare import compare

    y = np.array([0, 1, 2] * 10)
    right = np.eye(3)[y] * 0.7 + 0.1
    worse = right.copy()
    worse[:6] = np.roll(worse[:6], 1, axis=1)          # 6 images wrong
    better = compare(y, worse, right)                   # vote wrong on 6, student right
    assert better["improved"] and better["gained"] == 6 and better["accuracy_change"] == pytest.approx(0.2)
    low, high = better["accuracy_change_interval"]
    assert 0 < low <= 0.2 <= high <= 1
    assert not compare(y, right, worse)["improved"]
    assert compare(y, right, worse)["accuracy_change_interval"][1] < 0
    mixed = right.copy()
    mixed[6:9] = np.roll(mixed[6:9], 1, axis=1)         # 3 others wrong: 6 gained, 3 lost on worse
    both = compare(y, worse, mixed)
    assert both["improved"] and (both["gained"], both["lost"]) == (6, 3)
    low, high = both["accuracy_change_interval"]
    assert low < 0.1 < high and low < 0                  # a net gain of 3 images of 30 is within noise


def test_the_cost_is_said_before_training_and_progress_comes_per_batch(student):
    _, _, result, events = student
    notices = [i for i, e in enumerate(events) if e.stage == NOTICE]
    batches = [i for i, e in enumerate(events) if e.stage == "finetune" and "batch" in e.message]
    assert len(notices) == 1 and batches and notices[0] < batches[0]
    text = events[notices[0]].message
    assert "the epochs expected about" in text and "on the CPU" in text and f"{result.train_images} images" in text
    assert "decoding, scoring and saving add to it" in text     # the figure is the epochs', not the stage's
    assert result.estimate["gpu"] is False and result.estimate["seconds_per_image_epoch"] > 0
    assert result.estimate["graph_seconds"] >= 0 and result.estimate["expected_seconds"] == pytest.approx(
        result.estimate["graph_seconds"]
        + result.estimate["seconds_per_image_epoch"] * (result.train_images + result.val_images / 3))
    steps = -(-result.train_images // FAST["batch_size"])
    assert len(batches) == steps and events[batches[-1]].done == steps and events[batches[-1]].total == steps


# ------------------------------------------------------------------------------------------------
# --finetune-folds: the student and the vote scored on images that chose nothing


@pytest.fixture(scope="module")
def folded(vote_run, tmp_path_factory):
    """The vote fine-tuned with --finetune-folds 3 (one epoch a fold), every progress event recorded."""
    root, run = vote_run
    run = shutil.copytree(run, tmp_path_factory.mktemp("folded_run") / "run")
    events = []
    # Counted: the cost is timed once (fold 1), the other folds and the final fine-tuning use it again.
    with mock.patch.object(finetune_cost, "step_cost", wraps=finetune_cost.step_cost) as timing:
        result = finetune(run, FinetuneConfig(folds=3, **FAST), cache_dir=root / "cache", progress=events.append)
    return root, run, result, events, timing.call_count


def test_folds_score_every_training_image_once_by_models_that_never_saw_it(folded):
    """Each training image is in exactly one fold's test images, which neither trained nor picked the
    epoch of that fold's student; the vote's probabilities on them are recomputed here with plain
    scikit-learn from the cached features, every member refit on that fold's training images only;
    the pooled accuracies are recomputed from the per-image predictions."""
    root, run, result, *_ = folded
    dataset = scan(root / "data", cache_dir=root / "cache")
    table = pd.read_csv(run / "finetune" / "folds_predictions.csv")
    assert sorted(table["path"]) == sorted(map(str, dataset.frame["path"])) and sorted(table["fold"].unique()) == [1, 2, 3]
    meta = json.loads((run / "best_head.json").read_text())
    classes = meta["classes"]
    members = [dataset_features(dataset, open_stores(spec, root / "cache")) for spec in SPECS]
    y_all, frozen_all, student_all = [], [], []
    for k in (1, 2, 3):
        folder = run / "finetune" / "folds" / f"fold-{k}"
        split = json.loads((folder / "split.json").read_text())
        record = json.loads((folder / "fold.json").read_text())
        test = {row[2] for row in split["test"]}
        assert test == set(record["hash"]) and not test & {row[2] for row in split["train"] + split["validation"]}
        train_hashes = [row[2] for row in split["train"]]
        y_train = np.array([classes.index(row[1]) for row in split["train"]])
        frozen = np.zeros((len(record["hash"]), len(classes)))
        for member, features in zip(meta["members"], members):
            index = {h: i for i, h in enumerate(features.frame["hash"])}
            head = _plain_logreg(member["params"]["C"]).fit(features.X[[index[h] for h in train_hashes]], y_train)
            frozen += head.predict_proba(features.X[[index[h] for h in record["hash"]]]) / len(meta["members"])
        np.testing.assert_allclose(np.asarray(record["frozen"]), frozen, atol=1e-5)
        y_all += record["y"]
        frozen_all.append(frozen)
        student_all.append(np.asarray(record["student"]))
    y_all = np.asarray(y_all)
    frozen_all, student_all = np.concatenate(frozen_all), np.concatenate(student_all)
    assert result.folds["images"] == len(dataset.frame) == len(y_all)
    assert result.folds["frozen"]["val_accuracy"] == pytest.approx(np.mean(frozen_all.argmax(axis=1) == y_all))
    assert result.folds["student"]["val_accuracy"] == pytest.approx(np.mean(student_all.argmax(axis=1) == y_all))
    gained = int(((frozen_all.argmax(axis=1) != y_all) & (student_all.argmax(axis=1) == y_all)).sum())
    assert result.decision["basis"] == "folds" and result.decision["gained"] == gained
    assert result.decision["images"] == len(y_all) and "holdout" in result.decision


def test_the_pooled_comparison_decides_which_model_the_run_keeps(folded):
    """The run keeps the student exactly when it won over the folds (not on the held-out fifth), and
    summary.json, the report object and model.json say the same."""
    root, run, result, *_ = folded
    assert result.kept == ("finetuned" if result.decision["improved"] else "frozen")
    # Every fold and the final fine-tuning trained their own epoch from the run's head: none of them
    # "resumed" another's epoch backup (each keeps its own, removed once it finished).
    for k in (1, 2, 3):
        assert json.loads((run / "finetune" / "folds" / f"fold-{k}" / "fold.json").read_text())["epochs_run"] == 1
    assert result.epochs_run == 1 and result.resumed_from_epoch is None
    assert result.train_images + result.val_images == 30 and not (run / "finetune" / "backup").exists()
    assert not list((run / "finetune" / "folds").glob("*/backup"))
    summary = json.loads((run / "finetune" / "summary.json").read_text())
    assert summary["kept"] == result.kept and summary["folds"]["folds"] == 3
    assert summary["decision"]["holdout"]["images"] == result.val_images
    # The held-out images picked the best epoch, so a gain there must be beyond noise; the fold images
    # picked nothing, so the plain winner rule decides on them.
    assert summary["decision"]["holdout"]["picked_here"] is True and result.decision["picked_here"] is False
    # The run's model is a vote: the reasons name it, not "the frozen head".
    assert "frozen head" not in result.reason + summary["decision"]["holdout"]["reason"]
    assert (run / "model.json").exists() == (result.kept == "finetuned")
    pooled = json.loads((run / "finetune" / "folds.json").read_text())
    assert pooled["decision"]["improved"] == result.decision["improved"]
    assert [f["fold"] for f in pooled["per_fold"]] == [1, 2, 3]
    from featurepipe.cli.common import winner_text
    from featurepipe.report.write import write_report

    said = winner_text(result)
    assert f"on the same {result.folds['images']} training images over 3 folds" in said
    assert f"{result.folds['student']['val_accuracy']:.3f}" in said
    page = write_report(run, thumbnails=0).html_path.read_text()
    assert f"Scored over 3 folds: {result.folds['images']} training images, each once" in page
    assert f"{result.folds['frozen']['val_accuracy']:.3f}" in page
    assert ("the run keeps the vote as its model" in page) == (result.kept == "frozen")


def test_the_folds_time_the_cost_once_and_say_what_is_left(folded):
    """One training graph is built to time the cost, on fold 1; fold 2, fold 3 and the final
    fine-tuning reuse that figure for their own images, and after fold 1 the run says how long the
    rest should take from what fold 1 took."""
    root, run, result, events, timings = folded
    assert timings == 1
    said = [e.message for e in events if e.stage == NOTICE]
    estimates = [m for m in said if "the epochs expected about" in m]
    assert len(estimates) == 4 and "timed on one batch of this fine-tuning" in estimates[0]
    assert all("timed on fold 1" in m for m in estimates[1:])
    assert result.estimate["timed_on"] == "fold 1" and result.estimate["train_images"] == result.train_images
    took = [i for i, m in enumerate(said) if m.startswith("fold 1 took ")]
    first = json.loads((run / "finetune" / "folds" / "fold-1" / "fold.json").read_text())["seconds"]
    assert len(took) == 1 and said.index(estimates[0]) < took[0] < said.index(estimates[1])
    assert said[took[0]].endswith(f"2 more folds and the final fine-tuning, about "
                                  f"{finetune_cost.duration_text(first * (2 + 3 / 2))}")


def test_finished_folds_are_reused_and_a_changed_option_trains_them_again(folded, tmp_path):
    """A rerun (the final fine-tuning not reused) reuses every finished fold; another seed trains each
    fold again. A damaged or hand-edited fold record is trained again, never trusted."""
    root, run, first, *_ = folded
    run = shutil.copytree(run, tmp_path / "run")
    (run / "finetune" / "folds" / "fold-2" / "fold.json").write_text("{not json")
    # Hand-edited, key kept: the student now "right" on every image of fold 3. The signature no longer
    # matches, so the fold is trained again rather than trusted.
    third = run / "finetune" / "folds" / "fold-3" / "fold.json"
    edited = json.loads(third.read_text())
    edited["student"] = np.eye(3)[edited["y"]].tolist()
    third.write_text(json.dumps(edited))
    events = []
    again = finetune(run, FinetuneConfig(folds=3, reuse=False, **FAST), cache_dir=root / "cache",
                     progress=events.append)
    notices = [e.message for e in events if e.stage == NOTICE and e.message.startswith("fold ")]
    assert [n.split(":")[0] for n in notices if "reused" in n] == ["fold 1 of 3"]
    assert [n.split(":")[0] for n in notices if "training without" in n] == ["fold 2 of 3", "fold 3 of 3"]
    assert json.loads(third.read_text())["student"] != edited["student"]
    assert again.folds["images"] == first.folds["images"]
    events.clear()
    finetune(run, FinetuneConfig(folds=3, reuse=False, **{**FAST, "seed": 1}), cache_dir=root / "cache",
             progress=events.append)
    assert sum("training without" in e.message for e in events if e.stage == NOTICE) == 3


def test_folds_option_is_checked_and_defaults_to_folds_on_a_gpu_only():
    assert FinetuneConfig().folds_for(gpu=True) == 5 and FinetuneConfig().folds_for(gpu=False) == 0
    assert FinetuneConfig(folds=3).folds_for(gpu=False) == 3 and FinetuneConfig(folds=0).folds_for(gpu=True) == 0
    with pytest.raises(Exception, match="--finetune-folds must be 0"):
        FinetuneConfig(folds=1)
    with pytest.raises(Exception, match="strategy that trains"):
        FinetuneConfig(folds=3, strategy="head")


def test_ctrl_c_in_a_fold_keeps_the_finished_folds_and_resume_finishes(vote_run, tmp_path):
    """A KeyboardInterrupt while fold 2 trains leaves fold 1's record; --resume reuses fold 1, trains
    folds 2 and 3 from the run's head (no leftover backup resumed) and then the final fine-tuning."""
    root, run = vote_run
    run = shutil.copytree(run, tmp_path / "run")
    fits = []

    class StopInSecondFit(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            fits.append(1)
            if len(fits) == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(run, FinetuneConfig(folds=3, **FAST), cache_dir=root / "cache", callbacks=[StopInSecondFit()])
    assert (run / "finetune" / "folds" / "fold-1" / "fold.json").exists()
    assert not (run / "finetune" / "folds" / "fold-2" / "fold.json").exists()
    events = []
    result = finetune(run, FinetuneConfig(resume=True), cache_dir=root / "cache", progress=events.append)
    notices = [e.message.split(":")[0] for e in events if e.stage == NOTICE and e.message.startswith("fold ")]
    # Fold 1 was reused, so fold 2 is the first trained: it times the cost and says what is left.
    assert notices == ["fold 1 of 3", "fold 2 of 3", "fold 2 took " + notices[2].split("took ")[-1], "fold 3 of 3"]
    assert "1 more fold and the final fine-tuning, about " in next(e.message for e in events if "took" in e.message)
    assert "reused" in next(e.message for e in events if e.stage == NOTICE and e.message.startswith("fold 1"))
    for k in (1, 2, 3):
        assert json.loads((run / "finetune" / "folds" / f"fold-{k}" / "fold.json").read_text())["epochs_run"] == 1
    assert result.epochs_run == 1 and result.folds["images"] == 30 and result.decision["basis"] == "folds"


def test_the_student_member_is_chosen_by_name(vote_run, tmp_path):
    """--student names the vote member to train (a backbone only one member has, or a feature-set
    name); an unknown or ambiguous name is refused before anything is written, naming the members."""
    from featurepipe.core.errors import UsageError
    from featurepipe.training.finetune_vote import best_member

    root, run = vote_run
    run = shutil.copytree(run, tmp_path / "run")
    meta = json.loads((run / "best_head.json").read_text())
    names = [m["features"] for m in meta["members"]]
    with pytest.raises(UsageError, match="2 members use that backbone"):
        finetune(run, FinetuneConfig(member="tiny", **FAST), cache_dir=root / "cache")
    with pytest.raises(UsageError, match=f"no such member; choose one of {names[0]}"):
        finetune(run, FinetuneConfig(member="resnet50", **FAST), cache_dir=root / "cache")
    assert not (run / "finetune" / "state.json").exists()
    other = 1 - best_member(meta)
    result = finetune(run, FinetuneConfig(member=names[other], **FAST), cache_dir=root / "cache")
    summary = json.loads((run / "finetune" / "summary.json").read_text())
    assert summary["backbone"]["image_size"] == SPECS[other].image_size
    assert summary["member"] == names[other] and "chosen with --student" in " ".join(result.notes)


def test_too_many_folds_is_refused_before_the_last_fine_tuning_is_touched(vote_run, tmp_path):
    """10 images a class cannot make 11 folds: refused naming the option and the class, with the
    finished fine-tuning's files as they were."""
    root, run = vote_run
    run = shutil.copytree(run, tmp_path / "run")
    finetune(run, FinetuneConfig(**FAST), cache_dir=root / "cache")
    before = {p.name: p.read_bytes() for p in (run / "finetune").iterdir() if p.is_file()}
    with pytest.raises(Exception, match=r"--finetune-folds 11: class '\w+' has only 10 images, too few for 11-fold"):
        finetune(run, FinetuneConfig(folds=11, **FAST), cache_dir=root / "cache")
    assert {p.name: p.read_bytes() for p in (run / "finetune").iterdir() if p.is_file()} == before
    assert not (run / "finetune" / "folds").exists()
