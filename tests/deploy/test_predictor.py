"""Predictor: the run's model loaded once; its rows are predict's, its features the store's."""

import json

import numpy as np
import pytest

from featurepipe.backbones import build as build_module
from featurepipe.data.dataset import scan
from featurepipe.deploy.predict import predict
from featurepipe.deploy.predictor import Predictor
from featurepipe.deploy.serve import accuracy_info
from featurepipe.extraction.extract import open_stores
from featurepipe.extraction.features import dataset_features
from tests.conftest import COLOURS, make_image
from tests.serve_support import TINY, TINY2, make_run


@pytest.fixture(scope="module")
def vote_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("predictor"), specs=(TINY, TINY2))


def _no_build(*args, **kwargs):
    raise AssertionError("a network was built again after start-up")


def test_a_vote_predicts_like_predict_without_building_again_and_keeps_each_sets_features(vote_run, tmp_path,
                                                                                           monkeypatch):
    data, cache, run = vote_run
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
    for name, spec in (("tiny/squash", TINY), ("tiny2@32/squash", TINY2)):
        stored = dataset_features(dataset, open_stores(spec, cache))
        rows = {p: x for p, x in zip(stored.frame["path"], stored.X)}
        assert got.features[name].shape == (3, spec_dim(spec))          # the 3 images that succeeded, in order
        np.testing.assert_allclose(got.features[name][1:], [rows[str(p)] for p in new[1:]], rtol=0, atol=1e-5)
    assert predictor.predict(inputs).features is None                    # only when asked


def spec_dim(spec) -> int:
    return {"tiny": 24, "tiny2": 12}[spec.name]
