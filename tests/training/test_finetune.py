"""Fine-tuning from the best head: exact head conversion, freezing by blocks, training, resume, export."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from featurepipe.rundir.heads_io import load_head
from featurepipe.backbones.build import build_feature_model
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.training.baseline import baseline
from featurepipe.data.dataset import scan
from featurepipe.rundir.model import load_run_model
from featurepipe.core.errors import FeaturepipeError
from featurepipe.evaluation.evaluate import evaluate
from featurepipe.extraction.extract import open_stores
from featurepipe.extraction.features import dataset_features
from featurepipe.heads.combined import base_model, build_finetune_model, set_trainable
from featurepipe.training.finetune import finetune
from featurepipe.training.split import decode_split, make_split
from featurepipe.core.hashcache import file_sha256
from featurepipe.backbones.layers import InferenceMode
from featurepipe.heads.to_keras import head_to_keras
from featurepipe.heads import make_head
from featurepipe.data.images import decode_image
from featurepipe.training.config import FinetuneConfig
from featurepipe.evaluation.config import SearchConfig
from tests.conftest import COLOURS, REPO, make_image

SPEC = BackboneSpec(name="tiny", weights="random", image_size=32)
FAST = dict(batch_size=8, lr=1e-3, seed=0)
IMPROVE = dict(FAST, lr=1e-2, epochs=3)   # the `improving` run's options


# ------------------------------------------------------------------------------------------------
# fixtures: one small dataset and one evaluated run per head, copied by the tests that change them


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(8):
            make_image(root / "data" / name / f"{name}{i}.png", colour, seed=100 * c + i)
    return root


def _evaluated(workdir, head: str):
    run = workdir / f"run_{head}"
    if not run.exists():
        cache = workdir / "cache"
        evaluate(scan(workdir / "data", cache_dir=cache), SearchConfig(specs=(SPEC,), heads=(head,), folds=2),
                 cache, run_dir=run, n_jobs=1)
    return run


@pytest.fixture(scope="module")
def logreg_run(workdir):
    return _evaluated(workdir, "logreg")


@pytest.fixture
def run_copy(logreg_run, tmp_path):
    """A private copy of the evaluated run (its config still points at the shared cache)."""
    return shutil.copytree(logreg_run, tmp_path / "run")


@pytest.fixture(scope="module")
def improving(logreg_run, workdir, tmp_path_factory):
    """A run whose best head leaves room (logreg with C=1e-5: nearly uniform probabilities), so a
    short fine-tuning measurably lowers the validation loss and becomes the run's model."""
    from featurepipe.rundir.heads_io import load_head_meta, save_head

    run = shutil.copytree(logreg_run, tmp_path_factory.mktemp("improving") / "run")
    meta = {k: v for k, v in load_head_meta(run).items() if k not in ("file", "sha256")}
    # Standardized front: centred features let a short fine-tuning separate the classes quickly (on the
    # uncentred sqrt front every row points nearly the same way and 1-2 epochs move the loss too little).
    meta["params"] = {"C": 1e-5, "front": "standard"}
    stored = dataset_features(scan(workdir / "data", cache_dir=workdir / "cache"), open_stores(SPEC, workdir / "cache"))
    labels = stored.frame["label"].map({c: i for i, c in enumerate(sorted(COLOURS))}).to_numpy()
    save_head(make_head("logreg", meta["params"], seed=0).fit(stored.X, labels), run, meta)
    return run, finetune(run, FinetuneConfig(**IMPROVE))


@pytest.fixture(scope="module")
def trained(logreg_run, tmp_path_factory):
    """One top-blocks fine-tuning (1 epoch) shared by the checks on its outputs."""
    run = shutil.copytree(logreg_run, tmp_path_factory.mktemp("trained") / "run")
    return run, finetune(run, FinetuneConfig(epochs=1, unfreeze_blocks=1, **FAST))


def _decoded(paths):
    return np.stack([decode_image(p, 32, "squash") for p in paths])


def _saved(run):
    """The fine-tuned file, whether or not the run kept it as its model."""
    import featurepipe.heads.to_keras  # noqa: F401  (registers the custom layers)

    return keras.saving.load_model(run / "finetune" / "finetuned.keras", safe_mode=True)


# ------------------------------------------------------------------------------------------------
# head_to_keras


def _features(n_classes: int, n=48, d=20, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    return (rng.normal(size=(n, d)) * 2 + y[:, None] * 0.6 + 3).astype(np.float32), y


@pytest.mark.parametrize("head,n_classes", [("logreg", 3), ("logreg", 2), ("linear_svm", 3), ("linear_svm", 2),
                                            ("dense", 3)])
def test_head_conversion_is_exact(head, n_classes):
    X, y = _features(n_classes)
    estimator = make_head(head, {}, seed=0).fit(X, y)
    model = head_to_keras(estimator, X.shape[1])
    np.testing.assert_allclose(model.predict(X, verbose=0), estimator.predict_proba(X), atol=1e-5, rtol=0)


def test_converted_svm_head_survives_safe_mode_reload(tmp_path):
    X, y = _features(3)
    estimator = make_head("linear_svm", {}, seed=0).fit(X, y)
    path = tmp_path / "head.keras"
    head_to_keras(estimator, X.shape[1]).save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(reloaded.predict(X, verbose=0), estimator.predict_proba(X), atol=1e-5, rtol=0)


def test_unsupported_estimator_is_a_clear_error():
    from sklearn.tree import DecisionTreeClassifier

    X, y = _features(2)
    with pytest.raises(FeaturepipeError, match="cannot convert DecisionTreeClassifier"):
        head_to_keras(DecisionTreeClassifier().fit(X, y), X.shape[1])
    with pytest.raises(FeaturepipeError, match="fitted on 20 features"):
        head_to_keras(make_head("logreg").fit(X, y), 7)


def test_inference_mode_keeps_the_name_files_were_saved_under():
    # Fine-tuned and exported .keras files written before the rename name the layer "InferenceOnly".
    assert keras.saving.get_registered_name(InferenceMode) == "featurepipe>InferenceOnly"
    assert keras.saving.get_registered_object("featurepipe>InferenceOnly") is InferenceMode


def test_inference_only_ignores_training_flag():
    inputs = keras.Input((64,))
    noisy = keras.Model(inputs, keras.layers.Dropout(0.5)(inputs))
    outer_in = keras.Input((64,))
    outer = keras.Model(outer_in, InferenceMode(noisy)(outer_in))
    x = np.ones((2, 64), np.float32)
    np.testing.assert_array_equal(outer(x, training=True), x)


# ------------------------------------------------------------------------------------------------
# the combined model and freezing


def test_combined_model_reproduces_the_head_before_training(workdir, logreg_run):
    for run in (logreg_run, _evaluated(workdir, "linear_svm")):
        estimator, meta = load_head(run)
        dataset = scan(workdir / "data", cache_dir=workdir / "cache")
        stored = dataset_features(dataset, open_stores(SPEC, workdir / "cache"))
        model = build_finetune_model(BackboneSpec.from_dict(meta["backbone"]), estimator, workdir / "cache")
        expected = estimator.predict_proba(stored.X)
        actual = model.predict(_decoded(stored.frame["path"]), verbose=0)
        np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)
        # Nothing in the base reacts to training=True: BatchNorm frozen, base wrapped in InferenceMode.
        images = _decoded(stored.frame["path"][:4])
        np.testing.assert_allclose(model(images, training=True), model(images, training=False), atol=1e-6)


def test_freezing_by_blocks(logreg_run, workdir):
    estimator, _ = load_head(logreg_run)
    model = build_finetune_model(SPEC, estimator, workdir / "cache")
    base = base_model(model)

    def trainable():
        return {layer.name for layer in base.layers if layer.trainable and layer.trainable_weights}

    assert set_trainable(model, "tiny", 1) == ["block3_conv"] and trainable() == {"block3_conv"}
    assert set(set_trainable(model, "tiny", 2)) == {"block2_conv", "block3_conv"}
    assert set(set_trainable(model, "tiny", None)) == {"block1_conv", "block2_conv", "block3_conv"}
    assert set_trainable(model, "tiny", 0) == []
    for blocks in (1, 2, None):
        set_trainable(model, "tiny", blocks)
        assert not base.get_layer("block2_bn").trainable
        assert not base.get_layer("block2_bn").trainable_weights
    head_weights = {id(w) for w in model.get_layer("head").trainable_weights}
    assert head_weights and head_weights <= {id(w) for w in model.trainable_weights}
    set_trainable(model, "tiny", 1, train_head=False)
    assert {w.path.split("/")[-2] for w in model.trainable_weights} == {"block3_conv"}


def test_refit_without_holdout_uses_the_runs_augmented_views(workdir, monkeypatch):
    """A "views" head is refit on views drawn exactly as extract drew the cached ones."""
    import featurepipe.evaluation.crossval as crossval
    from featurepipe.training.finetune_start import _refit_head
    from featurepipe.data.augment import AugmentPolicy, AugmentSpec

    cache = workdir / "cache"
    dataset = scan(workdir / "data", cache_dir=cache)
    evaluate(dataset, SearchConfig(specs=(SPEC,), heads=("logreg",), folds=2, augment=2),
             cache, run_dir=workdir / "run_views", n_jobs=1)
    stored = dataset_features(dataset, open_stores(SPEC, cache, AugmentSpec(2, AugmentPolicy(), 0)))
    config = json.loads((workdir / "run_views" / "config.json").read_text())
    seen = {}
    monkeypatch.setattr(crossval, "refit", lambda table, *args: seen.setdefault("table", table))
    rows = stored.frame.iloc[:5]
    _refit_head({"head": "logreg", "params": {}, "augment": "views"}, config, build_feature_model(SPEC, cache),
                _decoded(rows["path"]), np.zeros(5, np.int64), rows["hash"], rows["path"], sorted(COLOURS), 8)
    np.testing.assert_allclose(seen["table"].views, stored.views[:5], atol=1e-5)
    np.testing.assert_allclose(seen["table"].X, stored.X[:5], atol=1e-5)


# ------------------------------------------------------------------------------------------------
# finetune runs


def _base_weights(model) -> dict[str, list[np.ndarray]]:
    return {layer.name: [np.asarray(w) for w in layer.get_weights()] for layer in base_model(model).layers
            if layer.weights}


def test_strategy_head_changes_no_weights(run_copy, workdir):
    result = finetune(run_copy, FinetuneConfig(strategy="head", **FAST))
    assert result.epochs_run == 0 and result.best_epoch is None and result.trainable_params == 0
    assert result.after == result.before
    saved, _ = load_run_model(run_copy)
    fresh = build_feature_model(SPEC, workdir / "cache")
    fresh_base = next(layer for layer in fresh.layers if isinstance(layer, keras.Model))
    original = {layer.name: layer.get_weights() for layer in fresh_base.layers}
    for name, weights in _base_weights(saved).items():
        for a, b in zip(weights, original[name]):
            np.testing.assert_array_equal(a, b)
    # "head" exports the run's own head: the file is the evaluated head on the frozen base.
    estimator, _ = load_head(run_copy)
    dataset = scan(workdir / "data", cache_dir=workdir / "cache")
    stored = dataset_features(dataset, open_stores(SPEC, workdir / "cache"))
    np.testing.assert_allclose(saved.predict(_decoded(stored.frame["path"]), verbose=0),
                               estimator.predict_proba(stored.X), atol=1e-5, rtol=0)


def test_training_changes_only_unfrozen_weights(trained, workdir):
    run, result = trained
    assert result.unfrozen_layers == ["block3_conv"] and result.epochs_run == 1 and result.best_epoch == 1
    assert result.validation == "holdout" and result.head_source == "refit"
    after = _base_weights(_saved(run))
    before = _base_weights(build_finetune_model(SPEC, load_head(run)[0], workdir / "cache"))
    for name in ("block1_conv", "block2_conv", "block2_bn"):   # frozen, BatchNorm statistics included
        for a, b in zip(after[name], before[name]):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(after["block3_conv"][0], before["block3_conv"][0])


def test_outputs_split_history_and_summary(trained):
    run, result = trained
    out = run / "finetune"
    split = json.loads((out / "split.json").read_text())
    train, val = {r[0] for r in split["train"]}, {r[0] for r in split["validation"]}
    assert split["source"] == "holdout" and not train & val and len(train) + len(val) == 24
    assert {r[1] for r in split["validation"]} == set(COLOURS)
    assert result.val_images == len(val) and result.train_images == len(train)
    header = (out / "history.csv").read_text().splitlines()[0].split(",")
    assert header[:7] == ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "ce", "val_ce"]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["before"]) == set(summary["after"]) == {"val_accuracy", "val_loss"}
    assert summary["strategy"] == "top-blocks" and summary["epochs"] == 1 and summary["unfreeze_blocks"] == 1
    assert summary["optimizer"] == "adamw" and summary["schedule"] == "cosine" and summary["label_smoothing"] == 0.0
    assert summary["reproduction_max_abs_diff"] < 1e-5
    assert not (out / "backup").exists()


def test_model_json_and_hash(improving):
    run, _ = improving
    meta = json.loads((run / "model.json").read_text())
    assert meta["kind"] == "finetuned" and meta["file"] == "finetune/finetuned.keras"
    assert meta["sha256"] == file_sha256(run / meta["file"])
    assert meta["classes"] == sorted(COLOURS) and meta["image_size"] == 32 and meta["resize"] == "squash"


def test_saved_model_reloads_in_a_fresh_process(improving, tmp_path):
    run, _ = improving
    paths = [r[0] for r in json.loads((run / "finetune" / "split.json").read_text())["validation"]]
    images = _decoded(paths)
    np.save(tmp_path / "images.npy", images)
    child = textwrap.dedent(f"""
        import sys, numpy as np, keras
        import featurepipe.heads.to_keras
        model = keras.saving.load_model(sys.argv[1], safe_mode=True)
        np.save(sys.argv[3], model.predict(np.load(sys.argv[2]), verbose=0))
    """)
    subprocess.run([sys.executable, "-c", child, str(run / "finetune" / "finetuned.keras"),
                    str(tmp_path / "images.npy"), str(tmp_path / "proba.npy")],
                   check=True, cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    model, _ = load_run_model(run)
    np.testing.assert_allclose(np.load(tmp_path / "proba.npy"), model.predict(images, verbose=0), atol=1e-6)


def test_tampered_model_is_refused(run_copy):
    assert finetune(run_copy, FinetuneConfig(strategy="head", **FAST)).kept == "finetuned"
    with open(run_copy / "finetune" / "finetuned.keras", "ab") as handle:
        handle.write(b"x")
    with pytest.raises(FeaturepipeError, match="sha256"):
        load_run_model(run_copy)


class Interrupt(keras.callbacks.Callback):
    def __init__(self, at_epoch: int):
        super().__init__()
        self.at_epoch = at_epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at_epoch:
            raise KeyboardInterrupt("simulated Ctrl-C")


class Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


def test_resume_continues_an_interrupted_training(run_copy):
    with pytest.raises(KeyboardInterrupt):
        finetune(run_copy, FinetuneConfig(epochs=3, **FAST), callbacks=[Interrupt(at_epoch=1)])
    out = run_copy / "finetune"
    assert (out / "backup").is_dir() and not (out / "summary.json").exists()
    first = (out / "history.csv").read_text().splitlines()
    assert len(first) == 2   # header + epoch 0

    recorder = Recorder()
    # The interrupted call's options win (epochs=3), whatever is passed with resume=True.
    result = finetune(run_copy, FinetuneConfig(resume=True, epochs=30), callbacks=[recorder])
    assert recorder.epochs == [1, 2]
    assert result.resumed_from_epoch == 2 and result.epochs_run == 3
    lines = (out / "history.csv").read_text().splitlines()
    assert lines[:2] == first and [line.split(",")[0] for line in lines[1:]] == ["0", "1", "2"]
    assert not (out / "backup").exists()
    # The learning-rate schedule continued where it stopped: the optimizer's step counter came back.
    assert json.loads((out / "summary.json").read_text())["report"]["epochs_run"] == 3
    # Resuming a finished fine-tuning returns it (a kill after its last write leaves nothing to do).
    again = finetune(run_copy, FinetuneConfig(resume=True), callbacks=[recorder := Recorder()])
    assert again.reused and recorder.epochs == [] and again.after == result.after


def test_an_interrupted_fine_tuning_of_the_previous_version_resumes_as_it_started(run_copy):
    """A state.json written before --train-augment and --wise has neither: it resumes with the seeds'
    augmentation and the trained weights, what it started with, and the summary says so."""
    with pytest.raises(KeyboardInterrupt):
        finetune(run_copy, FinetuneConfig(epochs=2, **FAST), callbacks=[Interrupt(at_epoch=1)])
    state_path = run_copy / "finetune" / "state.json"
    state = json.loads(state_path.read_text())
    assert (state["options"].pop("augment"), state["options"].pop("wise")) == ("flip", 0.5)
    state_path.write_text(json.dumps(state))
    result = finetune(run_copy, FinetuneConfig(resume=True))
    summary = json.loads((run_copy / "finetune" / "summary.json").read_text())
    assert result.resumed_from_epoch == 2 and (summary["augment"], summary["wise"]) == ("classic", 1.0)


@pytest.mark.parametrize("damage, named", [
    # A --wise of 1.5 would extrapolate the weights past the fine-tuned epoch without a word.
    (("state.json", lambda state: {**state, "options": {**state["options"], "wise": 1.5}}),
     "state.json cannot be resumed (its options were refused: --wise must be in [0, 1], not 1.5)"),
    (("split.json", lambda split: {"source": split["source"]}), "split.json cannot be resumed (damaged: KeyError"),
])
def test_an_edited_resume_state_starts_over_and_says_what(run_copy, damage, named):
    """The resume refuses what it cannot train with, starts over with the options passed, and the
    note names the file and what was wrong (no traceback, no silent change)."""
    with pytest.raises(KeyboardInterrupt):
        finetune(run_copy, FinetuneConfig(epochs=2, **FAST), callbacks=[Interrupt(at_epoch=1)])
    name, edit = damage
    path = run_copy / "finetune" / name
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    result = finetune(run_copy, FinetuneConfig(resume=True, epochs=1, wise=0.25, **FAST))
    summary = json.loads((run_copy / "finetune" / "summary.json").read_text())
    assert result.resumed_from_epoch is None and result.epochs_run == 1 and summary["wise"] == 0.25
    assert any(named in note and "started over" in note for note in result.notes), result.notes


@pytest.mark.parametrize("edit, named", [
    ({"augment": "heavy"}, "unknown --train-augment 'heavy'"),
    ({"wise": float("nan")}, "--wise must be in [0, 1]"),
    ({"epochs": "3"}, "options were refused"),          # a string where a count belongs
    ({"epochs": 2.5}, "epochs=2.5"),                    # in range, but would train 2
    ({"epochs": float("inf")}, "cannot convert float infinity"),   # JSON's Infinity: in range, never whole
    ({"member": 7}, "member=7"),
    ({"lr": None}, "lr=None"),                          # resolved when recorded: None is not a rate
    ({"dropout": 0.5}, "unknown dropout"),
    ({"__delete__": "seed"}, "lack seed"),
])
def test_resumed_options_refuse_what_the_command_line_would(edit, named):
    from featurepipe.training.finetune_options import StateError, _options, resumed_options

    recorded = _options(FinetuneConfig())
    assert resumed_options(dict(recorded)) == recorded
    edited = dict(recorded)
    if "__delete__" in edit:
        del edited[edit["__delete__"]]
    else:
        edited.update(edit)
    with pytest.raises(StateError, match=re.escape(named)):
        resumed_options(edited)
    with pytest.raises(StateError, match="not a mapping"):
        resumed_options(["wise", 1.5])


def test_fpt_pretrains_the_head_then_fine_tunes(run_copy):
    recorder = Recorder()
    result = finetune(run_copy, FinetuneConfig(strategy="fpt", epochs=2, **FAST), callbacks=[recorder])
    assert recorder.epochs == [0, 1] and result.epochs_run == 2
    summary = json.loads((run_copy / "finetune" / "summary.json").read_text())
    assert summary["pretrain_epochs"] == 1 and summary["pretrain_lr"] == pytest.approx(1e-2)
    assert result.unfrozen_layers == ["block3_conv"]


# ------------------------------------------------------------------------------------------------
# clear errors


def test_too_little_data_for_the_batch_size(run_copy):
    message = r"only 18 training image\(s\), fewer than the batch size 64.*--batch-size 16"
    with pytest.raises(FeaturepipeError, match=message):
        finetune(run_copy, FinetuneConfig(batch_size=64))


def test_run_without_a_best_head(run_copy, tmp_path):
    with pytest.raises(FeaturepipeError, match="config.json"):
        finetune(tmp_path / "nothing")
    # Killed before state.json was written: --resume starts over with the options passed, and says so.
    started = finetune(run_copy, FinetuneConfig(resume=True, strategy="head", **FAST))
    assert started.notes and "started over" in started.notes[0] and started.kept == "finetuned"
    (run_copy / "best_head.json").unlink()
    with pytest.raises(FeaturepipeError, match="best_head.json missing"):
        finetune(run_copy)


def test_validation_split_must_cover_every_class(tmp_path):
    data = tmp_path / "data"
    for name, colour in COLOURS.items():
        for i in range(3):
            make_image(data / "train" / name / f"{i}.png", colour, seed=i)
    make_image(data / "validation" / "red" / "v.png", COLOURS["red"], seed=9)
    with pytest.raises(FeaturepipeError, match="validation split has no image of class.*'blue'"):
        make_split(scan(data))
    single = tmp_path / "single"
    for name, count in (("a", 1), ("b", 4)):
        for i in range(count):
            make_image(single / name / f"{i}.png", (10 * i, 50, 90), seed=i)
    with pytest.raises(FeaturepipeError, match="class 'a' has 1 training image"):
        make_split(scan(single))


def test_holdout_is_stratified_seeded_and_keeps_groups(workdir, tmp_path):
    dataset = scan(workdir / "data")
    a, b = make_split(dataset, seed=3), make_split(dataset, seed=3)
    assert a.validation["path"].tolist() == b.validation["path"].tolist()
    assert a.validation["label"].value_counts().to_dict() == {c: 2 for c in COLOURS}
    names = [Path(p).stem for p in dataset.frame["path"]]   # red0 .. red7
    dataset.frame = dataset.frame.assign(group=[f"{n[:-1]}{int(n[-1]) // 2}" for n in names])   # pairs
    split = make_split(dataset, seed=1)
    assert not set(split.validation["group"]) & set(split.train["group"])


def test_undecodable_images_are_skipped_and_reported(workdir, tmp_path):
    data = shutil.copytree(workdir / "data", tmp_path / "data")
    (data / "red" / "red7.png").write_text("<html>not found</html>")
    split = make_split(scan(data), seed=0)
    (x_train, y_train, train_rows), (x_val, y_val, _), failed = decode_split(split, sorted(COLOURS), 32, "squash")
    assert [Path(f["path"]).name for f in failed] == ["red7.png"] and "text" in failed[0]["reason"]
    assert len(x_train) + len(x_val) == 23 and len(x_train) == len(y_train) == len(train_rows)
    assert x_train.dtype == np.uint8 and x_train.shape[1:] == (32, 32, 3)


# ------------------------------------------------------------------------------------------------
# baseline


def test_baseline_trains_and_writes_its_files(workdir, tmp_path):
    result = baseline(scan(workdir / "data"), image_size=32, epochs=2, batch_size=8, run_dir=tmp_path / "run")
    out = tmp_path / "run" / "baseline"
    assert result.epochs_run == 2 and result.validation == "holdout" and result.val_images == 6
    header = (out / "history.csv").read_text().splitlines()
    assert header[0].split(",")[:5] == ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"] and len(header) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["after"]) == {"val_accuracy", "val_loss"} and summary["epochs"] == 2
    model = keras.saving.load_model(out / "baseline.keras", safe_mode=True)
    assert model.output_shape == (None, 3)
    assert [layer.name for layer in model.layers if layer.weights] == ["conv1", "conv2", "conv3", "fc", "probabilities"]


def test_strategy_all_trains_every_block_but_batchnorm(run_copy):
    result = finetune(run_copy, FinetuneConfig(strategy="all", epochs=1, **FAST))
    assert set(result.unfrozen_layers) == {"block1_conv", "block2_conv", "block3_conv"}


def test_gpu_path_mixed_precision_saves_a_float32_model(run_copy, monkeypatch):
    import featurepipe.training.finetune as module

    monkeypatch.setattr(module, "gpu_available", lambda: True)
    result = finetune(run_copy, FinetuneConfig(strategy="head", **FAST))
    assert json.loads((run_copy / "finetune" / "summary.json").read_text())["mixed_precision"] is True
    assert keras.config.dtype_policy().name == "float32"
    saved, _ = load_run_model(run_copy)
    assert {layer.dtype_policy.name for layer in base_model(saved).layers} == {"float32"}
    assert result.before["val_accuracy"] == pytest.approx(result.after["val_accuracy"])


def test_a_validation_split_is_used_as_is_with_the_runs_own_head(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(8):
            split = "validation" if i < 2 else "train"
            make_image(data / split / name / f"{name}{i}.png", colour, seed=100 * c + i)
    evaluated = evaluate(scan(data, cache_dir=cache), SearchConfig(specs=(SPEC,), heads=("logreg",), folds=2),
                         cache, run_dir=tmp_path / "run", n_jobs=1)
    result = finetune(tmp_path / "run", FinetuneConfig(strategy="head", **FAST))
    assert result.validation == "validation" and result.head_source == "run" and result.val_images == 6
    # The same head on the same images as evaluate's hold-out scoring.
    assert result.before["val_accuracy"] == pytest.approx(evaluated.holdout["validation"]["accuracy"])
    assert result.before["val_loss"] == pytest.approx(evaluated.holdout["validation"]["log_loss"], abs=1e-4)


# ------------------------------------------------------------------------------------------------
# did it pay off: the decision, reuse, defaults and the schedule


def test_a_fine_tuning_that_cannot_help_keeps_the_frozen_head(trained):
    """The colour head is already right on every validation image: one epoch cannot do better, so the
    run keeps the frozen head (no model.json) and says why."""
    run, result = trained
    assert result.before["val_accuracy"] == 1.0 and not result.improved and result.kept == "frozen"
    assert "keeping the frozen head" in result.reason
    assert not (run / "model.json").exists()
    summary = json.loads((run / "finetune" / "summary.json").read_text())
    assert summary["kept"] == "frozen" and summary["decision"]["gained"] == 0 and summary["decision"]["lost"] == 0
    assert predict_kind(run) == "head"


def predict_kind(run):
    from featurepipe.deploy.predict import predict

    return predict(run, [Path(r[0]) for r in json.loads((run / "finetune" / "split.json").read_text())["validation"]][:2]
                   ).model_kind


def test_a_fine_tuning_that_pays_off_becomes_the_runs_model(improving):
    run, result = improving
    assert result.improved and result.kept == "finetuned"
    assert result.after["val_loss"] < result.before["val_loss"] - 0.05
    assert result.decision["loss_change_interval"][1] < 0 and result.after["val_accuracy"] >= result.before["val_accuracy"]
    assert predict_kind(run) == "finetuned"
    rows = (run / "finetune" / "validation_predictions.csv").read_text().splitlines()
    assert rows[0] == "path,label,before_pred,after_pred,before_p_true,after_p_true" and len(rows) == 1 + result.val_images
    from featurepipe.report.write import write_report

    page = write_report(run, thumbnails=0).html_path.read_text()
    assert "the fine-tuned model is the run&#x27;s model" in page and "What was trained" in page
    assert f"on the same {result.val_images} validation images" in page and "time per epoch" in page


def test_the_decision_rule():
    from featurepipe.training.compare import compare, mcnemar_p

    y = np.array([0, 1] * 10)
    sure = np.eye(2)[y] * 0.8 + 0.1                        # right, p_true 0.9
    flip = sure.copy()
    flip[:3] = flip[:3, ::-1]                              # 3 images wrong
    assert compare(y, flip, sure)["improved"] and compare(y, flip, sure)["gained"] == 3
    assert not compare(y, sure, flip)["improved"] and "fewer" in compare(y, sure, flip)["reason"]
    shift = np.where(np.random.default_rng(0).permutation(20) < 10, 0.05, -0.05)[:, None]
    jitter = sure + np.eye(2)[y] * shift - (1 - np.eye(2)[y]) * shift           # p_true 0.9 +- 0.05: noise
    assert not compare(y, sure, jitter)["improved"] and "no change beyond noise" in compare(y, sure, jitter)["reason"]
    surer = np.eye(2)[y] * 0.98 + 0.01
    # A consistent but tiny loss fall (the 0.8265 -> 0.8259) is not an improvement.
    hair = np.eye(2)[y] * 0.802 + 0.099
    assert not compare(y, sure, hair)["improved"] and compare(y, sure, hair)["loss_change_interval"][1] < 0
    assert compare(y, sure, surer)["improved"] and not compare(y, surer, sure)["improved"]
    one_more = sure.copy()
    one_more[0] = one_more[0, ::-1]
    # One more image right but much less sure on all the others: the loss rose, not an improvement.
    vague = np.eye(2)[y] * 0.1 + 0.45
    assert not compare(y, one_more, vague)["improved"] and "higher beyond noise" in compare(y, one_more, vague)["reason"]
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(6, 0) == pytest.approx(2 / 64) and mcnemar_p(3, 3) == 1.0
    # When the same images picked the best epoch, 3 of 20 more right is within noise (a resample without
    # any of them: 0.85^20 = 3.9% > 2.5%), 5 of 20 is not (0.75^20 = 0.3%); the loss rule still counts.
    picked = compare(y, flip, sure, picked_here=True)
    assert not picked["improved"] and "within noise" in picked["reason"] and picked["accuracy_change_interval"][0] == 0
    five = sure.copy()
    five[:5] = five[:5, ::-1]
    assert compare(y, five, sure, picked_here=True)["improved"] and compare(y, five, sure, picked_here=True)[
        "accuracy_change_interval"][0] > 0
    assert compare(y, sure, surer, picked_here=True)["improved"]


def test_rerun_with_nothing_changed_reuses_the_fine_tuned_model(improving):
    run, first = improving
    recorder = Recorder()
    again = finetune(run, FinetuneConfig(**IMPROVE), callbacks=[recorder])
    assert again.reused and recorder.epochs == [] and again.key == first.key and again.after == first.after
    # evaluate removes model.json when it rewrites a run; the reused result puts it back.
    (run / "model.json").unlink()
    assert finetune(run, FinetuneConfig(**IMPROVE)).reused and (run / "model.json").exists()
    changed = finetune(run, FinetuneConfig(**{**IMPROVE, "seed": 1}), callbacks=[recorder])
    assert not changed.reused and changed.key != first.key and recorder.epochs == [0, 1, 2]


def test_default_top_blocks_per_backbone():
    from featurepipe.heads.combined import default_unfreeze_blocks

    # EfficientNet-Lite0: the last two MBConv stages (blocks_11..14: 192 filters, blocks_15: 320) + head.
    assert default_unfreeze_blocks("efficientnet_lite0", []) == 6
    assert default_unfreeze_blocks("efficientnet_lite2", []) == 7          # its 192-filter stage has 5 blocks
    assert default_unfreeze_blocks("vgg16", []) == 1 and default_unfreeze_blocks("resnet50", []) == 1
    assert default_unfreeze_blocks("efficientnet_b0", []) == 2
    from featurepipe.backbones.efficientnet_lite import build_efficientnet_lite
    from featurepipe.backbones.registry import block_starts, get_backbone

    names = [layer.name for layer in build_efficientnet_lite("lite0", (32, 32, 3), weights=None).layers]
    starts = block_starts(get_backbone("efficientnet_lite0"), names)
    assert names[starts[-6]] == "blocks_11_expand_conv" and names[starts[-1]] == "head_conv"


def test_warmup_then_cosine_schedule():
    from featurepipe.training.keras_fit import lr_schedule

    schedule = lr_schedule(1e-3, steps_per_epoch=10, epochs=5, warmup_epochs=1, kind="cosine")
    rate = [float(schedule(step)) for step in (0, 5, 10, 30, 50)]
    assert rate[0] == pytest.approx(1e-4) and rate[1] == pytest.approx(5.5e-4)   # linear warm-up from lr/10
    assert rate[2] == pytest.approx(1e-3)                                          # peak after one epoch
    assert rate[3] == pytest.approx(5e-4, rel=1e-3) and rate[4] == pytest.approx(0, abs=1e-9)   # cosine to 0
    assert lr_schedule(1e-3, 10, 5, 1, "constant") == 1e-3
    assert float(lr_schedule(1e-3, 10, 5, 0, "cosine")(0)) == pytest.approx(1e-3)


def test_bad_options_are_clear_errors(run_copy):
    with pytest.raises(FeaturepipeError, match="unknown optimizer 'rmsprop'"):
        finetune(run_copy, FinetuneConfig(optimizer="rmsprop"))
    with pytest.raises(FeaturepipeError, match="label-smoothing"):
        finetune(run_copy, FinetuneConfig(label_smoothing=1.0))


def test_seeds_recipe_stays_available(run_copy):
    result = finetune(run_copy, FinetuneConfig(optimizer="sgd", lr=1e-4, schedule="constant", label_smoothing=0.0,
                                               unfreeze_blocks=1, epochs=1, batch_size=8, mixup=0.0))
    summary = json.loads((run_copy / "finetune" / "summary.json").read_text())
    assert summary["mixup"] == 0.0 and FinetuneConfig().mixup == 0.4     # off for the seeds, on by default
    assert (summary["optimizer"], summary["lr"], summary["schedule"], summary["momentum"]) == ("sgd", 1e-4, "constant", 0.9)
    assert result.unfrozen_layers == ["block3_conv"]


def test_test_split_is_scored_once_at_the_end(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(8):
            split = "validation" if i < 2 else "test" if i < 4 else "train"
            make_image(data / split / name / f"{name}{i}.png", colour, seed=100 * c + i)
    evaluate(scan(data, cache_dir=cache), SearchConfig(specs=(SPEC,), heads=("logreg",), folds=2),
             cache, run_dir=tmp_path / "run", n_jobs=1)
    result = finetune(tmp_path / "run", FinetuneConfig(epochs=1, **FAST))
    assert result.val_images == 6 and result.train_images == 12
    assert result.test["images"] == 6 and set(result.test) == {"images", "frozen", "finetuned", "kept"}
    assert result.test["frozen"]["val_accuracy"] == 1.0
    split = json.loads((tmp_path / "run" / "finetune" / "split.json").read_text())
    assert len(split["test"]) == 6 and not {r[0] for r in split["test"]} & {r[0] for r in split["train"] + split["validation"]}


def test_a_vote_run_fine_tunes_its_best_member_against_the_vote(workdir, tmp_path):
    """A run whose model is a vote over feature sets: fine-tuning trains the member that scored best
    alone, and 'before' is the vote's probabilities on the validation images (members refit without
    them), recomputed here from the cached features with plain scikit-learn heads."""
    cache = workdir / "cache"
    specs = [SPEC, BackboneSpec(name="tiny", weights="random", image_size=24, resize="letterbox")]
    run = tmp_path / "vote"
    evaluate(scan(workdir / "data", cache_dir=cache), SearchConfig(heads=("logreg",), specs=specs, folds=2),
             cache, run_dir=run, n_jobs=1)
    meta = json.loads((run / "best_head.json").read_text())
    assert meta["head"] == "vote"
    with pytest.raises(FeaturepipeError, match="vote over 2 feature sets.*featurepipe export"):
        finetune(run, FinetuneConfig(strategy="head"), cache_dir=cache)
    result = finetune(run, FinetuneConfig(epochs=1, **FAST), cache_dir=cache)
    summary = json.loads((run / "finetune" / "summary.json").read_text())
    best = max(range(2), key=lambda i: (meta["members"][i]["cv_accuracy"], -i))
    assert summary["vote"]["started_from"] == meta["members"][best]["features"]
    assert summary["backbone"]["image_size"] == specs[best].image_size
    assert any("vote over 2 feature sets" in n for n in result.notes)

    split = json.loads((run / "finetune" / "split.json").read_text())
    assert split["source"] != "validation"          # no validation split in the data: carved from train
    train = [row for row in split["train"]]
    val = pd.read_csv(run / "finetune" / "validation_predictions.csv")
    classes = meta["classes"]
    dataset = scan(workdir / "data", cache_dir=cache)
    probas = []
    for m, spec in zip(meta["members"], specs):
        features = dataset_features(dataset, open_stores(spec, cache))
        index = {p: i for i, p in enumerate(features.frame["path"])}
        X_train = features.X[[index[row[0]] for row in train]]
        y_train = np.array([classes.index(row[1]) for row in train])
        head = make_head("logreg", m["params"], 0).fit(X_train, y_train)
        probas.append(head.predict_proba(features.X[[index[p] for p in val["path"]]]))
    expected = np.mean(probas, axis=0)
    y_val = np.array([classes.index(c) for c in val["label"]])
    np.testing.assert_allclose(val["before_p_true"], expected[np.arange(len(y_val)), y_val], atol=1e-6)
    assert result.before["val_accuracy"] == pytest.approx(np.mean(expected.argmax(axis=1) == y_val))
    # Kept only when it beats the vote; otherwise predict keeps using the vote.
    assert (run / "model.json").exists() == (result.kept == "finetuned")


def test_train_augment_names_the_policy_the_training_images_are_drawn_with(trained, run_copy, monkeypatch):
    """--train-augment: every training batch is drawn with the named policy (data.augment.TRAINING_POLICIES),
    summary.json records it, and it is part of the reuse key (another policy is another fine-tuning)."""
    from featurepipe.data.augment import TRAINING_POLICIES, augment_image
    from featurepipe.training import keras_fit

    seen = []

    def spy(image, policy, rng):
        seen.append(policy)
        out = augment_image(image, policy, rng)
        if policy == TRAINING_POLICIES["none"]:
            assert np.array_equal(out, image)     # "none" trains on the pixels as decoded
        return out

    monkeypatch.setattr(keras_fit, "augment_image", spy)
    _, seeds = trained
    result = finetune(run_copy, FinetuneConfig(epochs=1, unfreeze_blocks=1, augment="none", **FAST))
    assert seen and all(policy == TRAINING_POLICIES["none"] for policy in seen)
    assert json.loads((run_copy / "finetune" / "summary.json").read_text())["augment"] == "none"
    assert result.key != seeds.key and not result.reused
    with pytest.raises(FeaturepipeError, match="unknown --train-augment 'heavy'; choose one of classic, light"):
        FinetuneConfig(augment="heavy")


def test_training_policies_are_what_their_names_say():
    from featurepipe.data.augment import TRAINING_POLICIES, augment_image, view_rng
    from featurepipe.training.config import TRAIN_AUGMENTS

    assert tuple(TRAINING_POLICIES) == TRAIN_AUGMENTS       # the config's names, kept light for the CLI

    image = np.random.default_rng(0).integers(0, 256, (24, 32, 3)).astype(np.uint8)
    flips = [augment_image(image, TRAINING_POLICIES["flip"], view_rng(f"h{k}", 0, 0)) for k in range(20)]
    assert all(np.array_equal(f, image) or np.array_equal(f, image[:, ::-1]) for f in flips)
    assert any(np.array_equal(f, image[:, ::-1]) for f in flips) and any(np.array_equal(f, image) for f in flips)
    light, seeds = TRAINING_POLICIES["light"], TRAINING_POLICIES["classic"]
    assert light.rotation_range == 0 and light.zoom_range == 0.1 and light.horizontal_flip
    assert seeds.rotation_range == 40 and seeds.zoom_range == 0.2     # the seeds' ImageDataGenerator


def test_wise_saves_the_weight_average_of_the_start_and_the_fine_tuned_epoch(logreg_run, tmp_path):
    """--wise A: the saved (and scored) student is A x the best epoch's weights + (1 - A) x the linear
    probe it started from. A = 0 is the starting head itself: the same validation scores as before."""
    from featurepipe.training.checkpoints import load_arrays

    options = dict(epochs=2, unfreeze_blocks=1, **{**FAST, "lr": 1e-2})
    start_run = shutil.copytree(logreg_run, tmp_path / "start")
    start = finetune(start_run, FinetuneConfig(wise=0.0, **options))
    assert start.after["val_accuracy"] == start.before["val_accuracy"]
    assert start.after["val_loss"] == pytest.approx(start.before["val_loss"], abs=1e-5)
    start_weights = _saved(start_run).get_weights()

    half_run = shutil.copytree(logreg_run, tmp_path / "half")
    half = finetune(half_run, FinetuneConfig(wise=0.5, **options))
    tuned = load_arrays(half_run / "finetune" / "best.weights.npz")
    saved = _saved(half_run).get_weights()
    moved = [i for i, (a, b) in enumerate(zip(start_weights, tuned)) if not np.allclose(a, b)]
    assert moved, "the fine-tuning trained nothing: the test cannot tell an average from either end"
    for a, b, s in zip(start_weights, tuned, saved):
        np.testing.assert_allclose(s, 0.5 * a + 0.5 * b, rtol=1e-5, atol=1e-6)
    assert json.loads((half_run / "finetune" / "summary.json").read_text())["wise"] == 0.5
    assert half.key != start.key
    with pytest.raises(FeaturepipeError, match=r"--wise must be in \[0, 1\], not 1.5"):
        FinetuneConfig(wise=1.5)


def test_weight_average_refuses_mismatched_weights():
    from featurepipe.training.finetune_fit import weight_average

    a, b = [np.zeros((2, 3), np.float32), np.array([1, 2])], [np.ones((2, 3), np.float32), np.array([5, 6])]
    out = weight_average(a, b, 0.25)
    assert out[0].dtype == np.float32 and np.allclose(out[0], 0.25) and out[1].tolist() == [5, 6]
    with pytest.raises(ValueError, match="shape"):
        weight_average([np.zeros(3)], [np.zeros(4)], 0.5)
    with pytest.raises(ValueError, match="2 starting weight arrays against 1"):
        weight_average(a, b[:1], 0.5)


def test_mix_batch_blends_pixels_and_targets_alike():
    """mixup: each image is lam x itself + (1 - lam) x a partner of its batch, its target likewise,
    recomputed here independently from the same draws (Beta(A, A), a permutation)."""
    from featurepipe.training.keras_fit import AugmentedImages, mix_batch

    images = np.random.default_rng(0).integers(0, 256, (6, 4, 5, 3)).astype(np.uint8)
    targets = np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1, 2]]
    pixels, mixed = mix_batch(images, targets, 0.4, np.random.default_rng(7))
    rng = np.random.default_rng(7)
    lam = rng.beta(0.4, 0.4, size=6)
    partner = rng.permutation(6)
    for i in range(6):
        expected = lam[i] * images[i].astype(float) + (1 - lam[i]) * images[partner[i]].astype(float)
        assert pixels.dtype == np.uint8 and np.abs(pixels[i] - expected).max() <= 0.5 + 1e-4
        assert np.allclose(mixed[i], lam[i] * targets[i] + (1 - lam[i]) * targets[partner[i]], atol=1e-6)
    assert np.allclose(mixed.sum(axis=1), 1.0) and not np.array_equal(pixels, images)
    # The blend depends only on (seed, epoch, batch): a resumed epoch draws the batches it would have.
    from featurepipe.data.augment import TRAINING_POLICIES
    hashes = [f"h{i}" for i in range(6)]

    def batch(epoch):
        sequence = AugmentedImages(images, targets, hashes, 3, 5, TRAINING_POLICIES["none"], mixup=0.4)
        sequence.epoch = epoch
        return sequence[1]

    assert all(np.array_equal(a, b) for a, b in zip(batch(2), batch(2)))
    assert not np.array_equal(batch(2)[1], batch(3)[1])
    # Class indices cannot be blended: the sequence refuses them rather than train on wrong targets.
    with pytest.raises(ValueError, match="mixup blends target distributions"):
        AugmentedImages(images, np.array([0, 1, 2, 0, 1, 2]), [f"h{i}" for i in range(6)], 2, 0, mixup=0.4)


def test_mixup_trains_on_blended_batches_and_is_recorded(trained, run_copy, monkeypatch):
    """--mixup A: the training batches carry blended targets, summary.json records A, and it is part of
    the reuse key (another A is another fine-tuning)."""
    from featurepipe.training import keras_fit

    batches = []
    real = keras_fit.AugmentedImages.__getitem__

    def spy(self, index):
        x, y = real(self, index)
        batches.append((self.epoch, index, x.copy(), np.asarray(y).copy()))
        return x, y

    monkeypatch.setattr(keras_fit.AugmentedImages, "__getitem__", spy)
    plain_run, plain = trained
    # The `trained` fixture ran with the default A (0.4); another A is another fine-tuning.
    assert json.loads((plain_run / "finetune" / "summary.json").read_text())["mixup"] == 0.4
    result = finetune(run_copy, FinetuneConfig(epochs=1, unfreeze_blocks=1, mixup=1.0, **FAST))
    trained_batches = [b for b in batches if b[3].ndim == 2]
    assert trained_batches
    targets = np.concatenate([b[3] for b in trained_batches])
    assert np.allclose(targets.sum(axis=1), 1.0) and (targets.max(axis=1) < 1.0 - 1e-6).any()
    assert json.loads((run_copy / "finetune" / "summary.json").read_text())["mixup"] == 1.0
    assert result.key != plain.key and not result.reused
    with pytest.raises(FeaturepipeError, match=r"--mixup must be a finite number >= 0, not -1"):
        FinetuneConfig(mixup=-1)
