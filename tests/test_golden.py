"""Run directories written by featurepipe 0.1.0 before the package was reorganised into stage folders
(tests/golden/v0_1_0, made by tests/golden/make_golden.py) still predict the same numbers and export:
their pickled heads name classes by their old import paths, their `.keras` files name registered
layers, and their signatures were made with the key kept beside them. Fingerprints and cache keys
are pinned too, so an upgrade never re-extracts or re-fits what an older version cached."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

GOLDEN = Path(__file__).parent / "golden" / "v0_1_0"
RUNS = ("logreg", "dense", "ensemble", "vote", "finetuned")


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """A private copy (runs, images, the key that signed them), the key file made private as git cannot keep modes."""
    base = tmp_path_factory.mktemp("golden")
    shutil.copytree(GOLDEN, base / "g")
    key = base / "g" / "trust.key"
    os.chmod(key, 0o600)
    return base / "g"


@pytest.fixture
def golden_key(golden, monkeypatch):
    monkeypatch.setenv("FEATUREPIPE_KEY_FILE", str(golden / "trust.key"))
    return golden


@pytest.mark.parametrize("name", RUNS)
def test_an_old_run_predicts_what_it_predicted_when_written(golden_key, tmp_path, name):
    from featurepipe.deploy.predict import predict

    expected = json.loads((golden_key / "expected.json").read_text())
    result = predict(golden_key / name, [golden_key / "data"], cache_dir=tmp_path / "cache")
    assert result.failed == 0
    assert result.model_kind == expected["_model_kind"][name]
    columns = [c for c in result.frame.columns if c.startswith("p[")]
    got = {Path(p).name: row for p, row in zip(result.frame["path"], result.frame[columns].to_numpy(dtype=float))}
    assert sorted(got) == sorted(expected[name])
    for image, row in expected[name].items():
        np.testing.assert_allclose(got[image], row, rtol=0, atol=1e-5, err_msg=f"{name}: {image}")


def test_a_dense_head_pickled_by_the_previous_version_loads_and_predicts_the_same():
    """0.1.0 pickled the dense head (in ensembles and cached refits) as featurepipe.dense_head.*."""
    import joblib

    estimator = joblib.load(GOLDEN / "dense_head.joblib")
    assert type(estimator).__name__ == "DenseHeadClassifier"
    X = np.load(GOLDEN / "dense_head_X.npy")
    expected = json.loads((GOLDEN / "dense_head_proba.json").read_text())
    np.testing.assert_allclose(estimator.predict_proba(X), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ("logreg", "vote", "finetuned"))
def test_an_old_run_exports(golden_key, tmp_path, name):
    from featurepipe.deploy.export import export

    result = export(golden_key / name, "keras", tmp_path / "out", cache_dir=tmp_path / "cache")
    assert (tmp_path / "out" / "labels.txt").read_text().split() == ["blue", "green", "red"]
    assert Path(result.path).is_file()


def test_an_edited_old_run_is_still_refused(golden_key, tmp_path):
    """The golden key really is what lets the runs above load: a run whose head changed is refused."""
    from featurepipe.core.errors import FeaturepipeError
    from featurepipe.deploy.predict import predict

    run = tmp_path / "logreg"
    shutil.copytree(golden_key / "logreg", run)
    with open(run / "best_head.joblib", "ab") as f:
        f.write(b"\0")
    with pytest.raises(FeaturepipeError):
        predict(run, [golden_key / "data"], cache_dir=tmp_path / "cache")


PINNED_VERSIONS = {"keras": "3.0.0", "tensorflow": "2.16.0", "pillow": "10.2.0"}
FINGERPRINTS = {  # computed by featurepipe 0.1.0 with PINNED_VERSIONS
    ("tiny", None, 32): "d06bdda6eecd79e1bbd6f541e68f632c4ef4af27e41ed7bd16db712471e3b568",
    ("tiny+tiny2", None, None): "da478faad425f10309e8a50fb08a4a517249da86b4207a0513234b1fe98ab650",
    ("efficientnet_lite0", None, None): "d6c1aa469e187f0281473a6e353164e6e34383a1e50aa5e89214e6c4a759b98b",
    ("efficientnet_lite2", "letterbox", None): "542d118376aa30e7d1a8d0188f2c87d31ed0be23c4dbb67e8d516404bee03d47",
}


@pytest.mark.parametrize("key", FINGERPRINTS)
def test_store_fingerprints_are_those_of_the_previous_version(key, monkeypatch):
    from featurepipe.backbones import fingerprint
    from featurepipe.backbones.spec import BackboneSpec

    monkeypatch.setattr(fingerprint, "library_versions", lambda: PINNED_VERSIONS)
    name, resize, size = key
    weights = "random" if name.startswith("tiny") else "imagenet"
    spec = BackboneSpec(name=name, weights=weights, resize=resize, image_size=size)
    assert fingerprint.backbone_fingerprint(spec)[0] == FINGERPRINTS[key]


def test_cache_keys_and_head_revisions_are_those_of_the_previous_version():
    from featurepipe.backbones.fingerprint import views_fingerprint
    from featurepipe.heads import revisions

    assert views_fingerprint("abc", {"flip": True}, 3)[0] == \
        "efd64f551880cb5e969e218d20a9e90e0c0be61b225c0a9ff6ebbdce48890282"
    from featurepipe.core.digest import digest

    assert digest(5, 1, 0, np.array([0, 1, 2]), None, np.array(["a", "b"], dtype=object),
                  pd.DataFrame({"a": [1, 2]})) == "e6512c369a4491d0f3db808df1d518749bb57a18e1e84364d3902485913b9bdf"
    assert revisions() == {"dense": 1, "ensemble": 1, "knn": 1, "linear_svm": 1, "logreg": 3, "ncm": 1}
