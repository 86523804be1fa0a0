"""predict: the run's own preprocessing and head, features reused from the store, bad files as error rows."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from featurepipe.rundir.heads_io import load_head
from featurepipe.backbones import build as build_module
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.data.dataset import scan
from featurepipe.core.errors import FeaturepipeError
from featurepipe.evaluation.evaluate import evaluate
from featurepipe.extraction.extract import extract, open_stores
from featurepipe.extraction.features import dataset_features
from featurepipe.core.hashcache import file_sha256
from featurepipe.data.images import decode_image
from featurepipe.deploy.predict import predict
from featurepipe.evaluation.config import SearchConfig
from tests.conftest import COLOURS, make_image

TINY = BackboneSpec(name="tiny", weights="random", image_size=32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data dir, cache dir, run dir) of one real evaluate run on 3 colour classes x 8 PNGs."""
    base = tmp_path_factory.mktemp("predict")
    data, cache = base / "data", base / "cache"
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(8):
            make_image(data / name / f"{name}{i}.png", colour, seed=100 * c + i)
    evaluate(scan(data, cache_dir=cache), SearchConfig(specs=(TINY,), heads=("logreg",), folds=2),
             cache, run_dir=base / "run", n_jobs=1)
    return data, cache, base / "run"


def _no_model(*args, **kwargs):
    raise AssertionError("the feature model was built although every image is in the store")


def _proba(frame, classes):
    return frame[[f"p[{c}]" for c in classes]].to_numpy(dtype=float)


def test_training_images_reuse_stored_features_and_match_the_refit_head(trained, monkeypatch):
    data, cache, run_dir = trained
    monkeypatch.setattr(build_module, "build_feature_model", _no_model)
    result = predict(run_dir, [data], top_k=2)
    assert (result.model_kind, result.reused, result.computed, result.failed) == ("head", 24, 0, 0)
    assert list(result.frame.columns) == ["path", "label", "probability", "label_1", "prob_1", "label_2", "prob_2",
                                          "p[blue]", "p[green]", "p[red]", "error"]

    estimator, meta = load_head(run_dir)
    dataset = scan(data, cache_dir=cache)
    features = dataset_features(dataset, open_stores(TINY, cache))
    expected = dict(zip(features.frame["path"], estimator.predict_proba(features.X)))
    got = _proba(result.frame, meta["classes"])
    for path, row in zip(result.frame["path"], got):
        np.testing.assert_allclose(row, expected[path], rtol=0, atol=1e-9)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)
    # top-1 is the argmax, top-k sorted, and the colour classes are learnt
    assert (result.frame["label"] == result.frame["label_1"]).all()
    assert (result.frame["prob_1"] >= result.frame["prob_2"]).all()
    truth = [p.split("/")[-2] for p in result.frame["path"]]
    assert (result.frame["label"] == truth).mean() >= 0.9


def test_new_images_features_are_kept_as_extract_computes_them_and_reused(trained, tmp_path, monkeypatch):
    _, cache, run_dir = trained
    new = tmp_path / "new"
    make_image(new / "red" / "fresh_red.png", COLOURS["red"], seed=4242, size=(57, 31))
    make_image(new / "blue" / "fresh_blue.jpg", COLOURS["blue"], seed=4343, size=(40, 64))
    before = predict(run_dir, [new])
    assert (before.reused, before.computed, before.failed) == (0, 2, 0)

    # What predict kept is what extract computes for the same files (in a cache of its own).
    dataset = scan(new, cache_dir=tmp_path / "other")
    assert extract(dataset, TINY, tmp_path / "other").extracted == 2
    hashes = list(dataset.frame["hash"])
    kept = open_stores(TINY, cache).originals
    np.testing.assert_allclose(kept.read(hashes), open_stores(TINY, tmp_path / "other").originals.read(hashes),
                               rtol=0, atol=1e-5)
    # ... so extract finds them in the run's cache, and predicting again builds nothing.
    assert extract(scan(new, cache_dir=cache), TINY, cache).extracted == 0
    monkeypatch.setattr(build_module, "build_feature_model", _no_model)
    after = predict(run_dir, [new])
    assert (after.reused, after.computed) == (2, 0)
    assert list(before.frame["path"]) == list(after.frame["path"])
    np.testing.assert_allclose(_proba(before.frame, before.classes), _proba(after.frame, after.classes),
                               rtol=0, atol=1e-6)
    assert list(after.frame["label"]) == ["blue", "red"]


def test_corrupt_and_unreadable_files_get_error_rows_and_duplicates_share_a_prediction(trained, tmp_path):
    data, _, run_dir = trained
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(data / "green" / "green0.png", mixed / "a.png")
    shutil.copy(data / "green" / "green0.png", mixed / "a_copy.png")
    (mixed / "page.jpg").write_text("<html><body>404 not found</body></html>")
    png = (data / "red" / "red0.png").read_bytes()
    (mixed / "cut.png").write_bytes(png[: len(png) // 3])
    (mixed / ".hidden.png").write_bytes(png)
    (mixed / "notes.txt").write_text("not an image")
    locked = mixed / "locked.png"
    locked.write_bytes(png)
    locked.chmod(0)
    try:
        locked_unreadable = _unreadable(locked)   # root reads it anyway
        result = predict(run_dir, [mixed, data / "blue" / "blue1.png"], top_k=5)
    finally:
        locked.chmod(0o644)
    rows = result.frame.set_index("path")
    names = sorted(p.rsplit("/", 1)[-1] for p in rows.index)
    assert names == ["a.png", "a_copy.png", "blue1.png", "cut.png", "locked.png", "page.jpg"]
    assert result.top_k == 3 and "label_3" in rows.columns and "label_4" not in rows.columns
    errors = {p.rsplit("/", 1)[-1]: e for p, e in rows["error"].items() if isinstance(e, str)}
    assert set(errors) == {"cut.png", "page.jpg"} | ({"locked.png"} if locked_unreadable else set())
    assert "text" in errors["page.jpg"]
    assert "truncated" in errors["cut.png"] or "corrupt" in errors["cut.png"]
    assert result.failed == len(errors)
    bad = rows.loc[[p for p in rows.index if p.endswith("page.jpg")][0]]
    assert pd.isna(bad["label"]) and np.isnan(bad["probability"])
    good = rows[rows["error"].isna()]
    assert (good["label"].notna()).all()
    a, a_copy = (rows.loc[[p for p in rows.index if p.endswith(n)][0]] for n in ("/a.png", "/a_copy.png"))
    assert a["label"] == a_copy["label"] == "green" and a["probability"] == a_copy["probability"]
    assert json.loads(json.dumps(result.to_dict()))["failed"] == len(errors)
    record = [r for r in result.records() if r["path"].endswith("page.jpg")][0]
    assert record["label"] is None and record["probability"] is None and record["error"] == errors["page.jpg"]


def _unreadable(path) -> bool:
    try:
        path.open("rb").close()
        return False
    except OSError:
        return True


def test_bad_arguments_fail_clearly(trained, tmp_path):
    data, _, run_dir = trained
    with pytest.raises(FeaturepipeError, match="does not exist"):
        predict(run_dir, [data / "nope.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeaturepipeError, match="no image files"):
        predict(run_dir, [tmp_path / "empty"])
    with pytest.raises(FeaturepipeError, match="does not exist"):
        predict(tmp_path / "no_such_run", [data])
    with pytest.raises(FeaturepipeError, match="top_k"):
        predict(run_dir, [data], top_k=0)


def test_run_dir_without_a_head_is_refused(trained, tmp_path):
    data, _, run_dir = trained
    headless = tmp_path / "headless"
    shutil.copytree(run_dir, headless)
    (headless / "best_head.json").unlink()
    with pytest.raises(FeaturepipeError, match="no trained head"):
        predict(headless, [data])
    not_a_run = tmp_path / "plain"
    not_a_run.mkdir()
    with pytest.raises(FeaturepipeError, match="not a featurepipe run"):
        predict(not_a_run, [data])


def test_tampered_head_is_refused(trained, tmp_path):
    data, _, run_dir = trained
    copy = tmp_path / "tampered"
    shutil.copytree(run_dir, copy)
    with open(copy / "best_head.joblib", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(FeaturepipeError, match="does not match the hash"):
        predict(copy, [data])


def _write_finetuned(run_dir, classes):
    """A stand-in for fine-tuning's output: RUN_DIR/model.json naming a uint8-in, probabilities-out model."""
    import keras

    features = build_module.build_feature_model(TINY)
    outputs = keras.layers.Dense(len(classes), activation="softmax", name="classifier")(features.output)
    model = keras.Model(features.input, outputs)
    path = run_dir / "finetune" / "finetuned.keras"
    path.parent.mkdir(exist_ok=True)
    model.save(path)
    meta = {"kind": "finetuned", "file": "finetune/finetuned.keras", "sha256": file_sha256(path),
            "classes": classes, "image_size": 32, "resize": "squash"}
    from featurepipe.core.trust import with_record_signature   # signed, as fine-tuning publishes it

    (run_dir / "model.json").write_text(json.dumps(with_record_signature("model.json", meta)))
    return model, path


def test_finetuned_model_is_used_when_the_run_has_one(trained, tmp_path, monkeypatch):
    data, _, run_dir = trained
    copy = tmp_path / "finetuned_run"
    shutil.copytree(run_dir, copy)
    classes = json.loads((copy / "best_head.json").read_text())["classes"]
    model, path = _write_finetuned(copy, classes)
    monkeypatch.setattr(build_module, "build_feature_model", _no_model)
    files = [data / "red" / "red3.png", data / "blue" / "blue5.png"]
    result = predict(copy, files)
    assert result.model_kind == "finetuned" and result.computed == 2
    images = np.stack([decode_image(f, 32, "squash") for f in files])
    expected = np.asarray(model.predict_on_batch(images), dtype=np.float64)
    np.testing.assert_allclose(_proba(result.frame, classes), expected, rtol=0, atol=1e-6)
    # The head stays reachable on demand.
    assert predict(copy, files, model="head").model_kind == "head"

    with open(path, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(FeaturepipeError, match="does not match the hash"):
        predict(copy, files)
