"""Predictor: a vote predicts at the cost of its networks (each built once, shared by its resize
policies), keeps new images' features for the next call, and matches the members computed one by one."""

import json
import shutil

import numpy as np
import pytest

from featurepipe.backbones import build as build_module
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.core.errors import StoreLockedError
from featurepipe.data.dataset import scan
from featurepipe.data.images import decode_image
from featurepipe.deploy import networks as networks_module
from featurepipe.deploy.predict import predict
from featurepipe.deploy.predictor import Predictor
from featurepipe.evaluation.config import SearchConfig
from featurepipe.evaluation.evaluate import evaluate
from featurepipe.extraction.features import open_stores
from featurepipe.rundir.heads_io import load_head
from featurepipe.rundir.maintenance import gc_cache
from featurepipe.store.featurestore import FeatureStore
from featurepipe.deploy.serve import accuracy_info
from featurepipe.extraction.features import dataset_features
from tests.conftest import COLOURS, make_image
from tests.serve_support import TINY as SERVE_TINY, TINY2 as SERVE_TINY2, make_run

# 4 feature sets on 3 networks: tiny at 32 px under two policies, tiny at 40 px, tiny2 at 40 px.
SPECS = (BackboneSpec(name="tiny", weights="random", image_size=32, resize="squash"),
         BackboneSpec(name="tiny", weights="random", image_size=32, resize="letterbox"),
         BackboneSpec(name="tiny", weights="random", image_size=40, resize="center_crop"),
         BackboneSpec(name="tiny2", weights="random", image_size=40, resize="squash"))


@pytest.fixture(scope="module")
def vote_run(tmp_path_factory):
    """(data, cache, run) of a real evaluate whose model is a vote over SPECS."""
    base = tmp_path_factory.mktemp("predictor")
    data, cache = base / "data", base / "cache"
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(6):
            make_image(data / name / f"{name}{i}.png", colour, seed=100 * c + i)
    evaluate(scan(data, cache_dir=cache), SearchConfig(specs=SPECS, heads=("logreg",), folds=2, nested=False),
             cache, run_dir=base / "run", n_jobs=1)
    assert json.loads((base / "run" / "best_head.json").read_text())["head"] == "vote"
    return data, cache, base / "run"


@pytest.fixture
def builds(monkeypatch):
    """Every feature model built, as (name, image size)."""
    built = []
    real = build_module.build_feature_model

    def counting(spec, cache_dir=None):
        built.append((spec.name, spec.image_size))
        return real(spec, cache_dir)
    monkeypatch.setattr(build_module, "build_feature_model", counting)
    return built


def _new_images(folder, count, seed=0, corrupt=False):
    paths = [make_image(folder / f"new{seed + i}.{'jpg' if i % 2 else 'png'}", list(COLOURS.values())[i % 3],
                        seed=7000 + seed + i, size=(45 + 3 * i, 30 + 5 * i)) for i in range(count)]
    if corrupt:
        good = paths[0].read_bytes()
        (folder / "broken.png").write_bytes(good[: len(good) // 3])
    return paths


def _members_one_by_one(run_dir, paths):
    """Each member's features and probabilities computed alone, the plain way (fresh model, decode_image)."""
    meta = json.loads((run_dir / "best_head.json").read_text())
    features, proba = {}, []
    for member in meta["members"]:
        head, head_meta = load_head(run_dir / member["dir"])
        spec = BackboneSpec.from_dict(head_meta["backbone"])
        model = build_module.build_feature_model(spec)
        X = np.asarray(model.predict_on_batch(np.stack([decode_image(p, spec.image_size, spec.resize) for p in paths])))
        features[member["features"]] = X
        proba.append(head.predict_proba(X))
    return features, np.mean(proba, axis=0), meta["classes"]


def _proba(frame, classes):
    return frame[[f"p[{c}]" for c in classes]].to_numpy(dtype=float)


def test_a_vote_builds_each_network_once_and_matches_its_members_computed_alone(vote_run, tmp_path, builds, caplog):
    data, cache, run_dir = vote_run
    paths = _new_images(tmp_path / "new", 5, corrupt=True)
    events = []
    predictor = Predictor(run_dir, cache_dir=cache, progress=events.append)
    result = predictor.predict([tmp_path / "new"], top_k=2, keep_features=True)
    # One build per network, not per feature set; the corrupt file is an error row among good ones.
    assert sorted(builds) == [("tiny", 32), ("tiny", 40), ("tiny2", 40)]
    built = len(builds)
    assert (result.computed, result.reused, result.failed) == (5, 0, 1)
    assert "retracing" not in caplog.text          # one trace per network, none repeated
    rows = result.frame.set_index("path")
    broken = rows.loc[[p for p in rows.index if p.endswith("broken.png")][0]]
    assert "truncated" in broken["error"] or "corrupt" in broken["error"]
    messages = [e.message for e in events]
    assert [m for m in messages if m.startswith("building")] == [
        "building tiny (1 of 3 networks)", "building tiny (2 of 3 networks)", "building tiny2 (3 of 3 networks)"]
    # The same numbers as every member computed alone with a fresh model, in the frame's order.
    good = [p for p in result.frame["path"] if not p.endswith("broken.png")]
    assert sorted(good) == sorted(map(str, paths))
    features, expected, classes = _members_one_by_one(run_dir, good)
    got = _proba(result.frame[result.frame["error"].isna()], classes)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert list(result.features) == ["tiny/squash", "tiny/letterbox", "tiny@40/center_crop", "tiny2/squash"]
    for name, X in features.items():
        np.testing.assert_allclose(result.features[name], X, rtol=0, atol=1e-5)
    assert predictor.classes == classes and predictor.nested_accuracy is None     # evaluated with nested=False

    # The same Predictor on other new images builds nothing more; on the same ones it computes nothing.
    more = _new_images(tmp_path / "more", 2, seed=50)
    again = predictor.predict(more)
    assert (again.computed, again.failed, len(builds)) == (2, 0, built + 4)      # + _members_one_by_one's 4
    monkeypatch_raise = pytest.MonkeyPatch()
    monkeypatch_raise.setattr(build_module, "build_feature_model", _no_build)
    try:
        # A fresh process (a fresh Predictor) too: the features were kept in the members' stores.
        third = Predictor(run_dir, cache_dir=cache).predict([tmp_path / "new"], keep_features=True)
    finally:
        monkeypatch_raise.undo()
    assert (third.computed, third.reused, third.failed) == (0, 5, 1)
    np.testing.assert_allclose(_proba(third.frame, classes), _proba(result.frame, classes), rtol=0, atol=1e-6)
    for name in features:
        np.testing.assert_allclose(third.features[name], result.features[name], rtol=0, atol=1e-6)


def _no_build(*args, **kwargs):
    raise AssertionError("a feature model was built although every image's features are stored")


def test_one_image_runs_eagerly_and_many_through_a_graph_with_the_same_numbers(vote_run, tmp_path):
    _, _, run_dir = vote_run
    paths = _new_images(tmp_path / "imgs", 6, seed=100)
    # Fresh caches: every feature is computed; one image is 2 rows on tiny@32 (eager), six are 12 (graph).
    alone = [Predictor(run_dir, cache_dir=tmp_path / f"c{i}").predict([p]).frame for i, p in enumerate(paths)]
    together = Predictor(run_dir, cache_dir=tmp_path / "all").predict(paths).frame
    assert 2 <= networks_module.EAGER_ROWS < 12
    classes = sorted(COLOURS)
    np.testing.assert_allclose(np.concatenate([_proba(f, classes) for f in alone]), _proba(together, classes),
                               rtol=0, atol=1e-5)


def test_a_store_that_cannot_be_written_costs_only_the_reuse(vote_run, tmp_path, monkeypatch):
    _, cache, run_dir = vote_run
    paths = _new_images(tmp_path / "locked", 2, seed=200)

    def locked(self, timeout=0.0, on_wait=None):
        raise StoreLockedError(f"{self.directory} is being written by another process")
    monkeypatch.setattr(FeatureStore, "writer", locked)
    first = predict(run_dir, paths, cache_dir=cache)
    assert first.failed == 0 and first.computed == 2
    assert len(first.warnings) == len(SPECS) and all("not kept" in w for w in first.warnings)
    assert predict(run_dir, paths, cache_dir=cache).computed == 2          # nothing was kept


def test_cache_gc_drops_predicted_features_and_keeps_the_runs_stores(vote_run, tmp_path):
    data, _, run_dir = vote_run
    cache = tmp_path / "cache"
    shutil.copytree(vote_run[1], cache)
    paths = _new_images(tmp_path / "gc", 3, seed=300)
    assert predict(run_dir, paths, cache_dir=cache).computed == 3
    stores = [open_stores(spec, cache).originals for spec in SPECS]
    before = [len(store.keys()) for store in stores]
    dataset = set(scan(data, cache_dir=cache).frame["hash"])
    gc = gc_cache(cache)
    # No scanned dataset refers to predicted images: their rows go (these and any earlier test's),
    # the dataset's rows and the run's stores stay.
    assert not gc.stores_removed and gc.rows_removed == sum(before) - len(SPECS) * len(dataset) >= 3 * len(SPECS)
    for store in stores:
        store.refresh()
        assert store.keys() == dataset
    assert predict(run_dir, paths, cache_dir=cache).computed == 3


def test_nested_accuracy_is_read_from_the_run(vote_run, tmp_path):
    _, cache, run_dir = vote_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    accuracy = {"mean": 0.8, "std": 0.05, "ci_low": 0.7, "ci_high": 0.9}
    (copy / "nested.json").write_text(json.dumps({"accuracy": accuracy}))
    assert Predictor(copy, cache_dir=cache).nested_accuracy == accuracy
    (copy / "nested.json").write_text("{not json")
    assert Predictor(copy, cache_dir=cache).nested_accuracy is None


def test_cli_predict_of_a_vote_prints_nothing_on_stderr(vote_run, tmp_path):
    """Whole process, as a user runs it: networks built and run (eagerly and traced), a bad file among
    good ones, and not one line of TensorFlow on stderr (start-up lines, retracing warnings)."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    _, cache, run_dir = vote_run
    _new_images(tmp_path / "cli", 3, seed=400, corrupt=True)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    cli = "import tests.tiny_backbone; from featurepipe.cli.app import main; main()"
    done = subprocess.run([sys.executable, "-c", cli, "predict", str(run_dir), str(tmp_path / "cli"), "--cache-dir",
                           str(cache), "--json"], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**env, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    summary = json.loads(done.stdout)
    assert (summary["computed"], summary["failed"]) == (3, 1)


# ---- the API serve relies on (predict, classes, nested_accuracy, keep_features), as serve wrote it


@pytest.fixture(scope="module")
def serve_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("predictor_api"), specs=(SERVE_TINY, SERVE_TINY2))


def test_a_vote_predicts_like_predict_without_building_again_and_keeps_each_sets_features(serve_run, tmp_path,
                                                                                           monkeypatch):
    data, cache, run = serve_run
    predictor = Predictor(run)
    # Only the agreed API (predict, classes, nested_accuracy): any Predictor with it passes this test.
    assert predictor.classes == ["blue", "green", "red"]
    assert json.loads((run / "best_head.json").read_text())["head"] == "vote"
    nested = json.loads((run / "nested.json").read_text())["accuracy"]
    assert accuracy_info(predictor.nested_accuracy)["mean"] == pytest.approx(nested["mean"])

    new = [make_image(tmp_path / "a.png", COLOURS["green"], seed=7, size=(70, 50)),
           data / "blue" / "blue3.png", data / "red" / "red6.png"]
    (tmp_path / "bad.png").write_bytes(b"not a png")
    inputs = [*map(str, new), str(tmp_path / "bad.png")]
    expected = predict(run, inputs, top_k=2)
    monkeypatch.setattr(build_module, "build_feature_model", _no_build)
    for _ in range(2):
        got = predictor.predict(inputs, top_k=2, keep_features=True)
        assert list(got.frame.columns) == list(expected.frame.columns)
        assert got.frame["path"].tolist() == expected.frame["path"].tolist()
        assert got.frame["label"].tolist()[:3] == expected.frame["label"].tolist()[:3] == ["green", "blue", "red"]
        columns = [f"p[{c}]" for c in got.classes]
        np.testing.assert_allclose(got.frame[columns].to_numpy(float), expected.frame[columns].to_numpy(float),
                                   rtol=0, atol=1e-6)
        assert got.failed == 1 and "not a recognised image format" in got.frame["error"].iloc[3]

    assert set(got.features) == {"tiny/squash", "tiny2@32/squash"}
    dataset = scan(data, cache_dir=cache)
    for name, spec in (("tiny/squash", SERVE_TINY), ("tiny2@32/squash", SERVE_TINY2)):
        stored = dataset_features(dataset, open_stores(spec, cache))
        rows = {p: x for p, x in zip(stored.frame["path"], stored.X)}
        assert got.features[name].shape == (3, spec_dim(spec))          # the 3 images that succeeded, in order
        np.testing.assert_allclose(got.features[name][1:], [rows[str(p)] for p in new[1:]], rtol=0, atol=1e-5)
    assert predictor.predict(inputs).features is None                    # only when asked


def spec_dim(spec) -> int:
    return {"tiny": 24, "tiny2": 12}[spec.name]
