"""What a run directory may make featurepipe do: artefacts are confined to the run folder,
signed with this user's key, and loaded only when the signature holds (or --trust); folders of the
user's are never written into unasked; --json and --out files are strict and whole."""

import json
import math
import os
import shutil
import stat
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from featurepipe.core import trust
from featurepipe.rundir.heads_io import load_head
from featurepipe.rundir.model import load_run_model
from featurepipe.rundir.run import HEAD_META
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.cli.app import app
from featurepipe.data.dataset import scan
from featurepipe.core.errors import FeaturepipeError, TrustError
from featurepipe.evaluation.evaluate import evaluate
from featurepipe.core.hashcache import file_sha256
from featurepipe.deploy.predict import PredictResult
from featurepipe.cli.render import print_json
from featurepipe.rundir.folder import prepare_run_dir
from featurepipe.evaluation.config import SearchConfig
from tests.conftest import COLOURS, make_image

TINY = BackboneSpec(name="tiny", weights="random", image_size=32)
TINY_ARGS = ["--backbone", "tiny", "--weights", "random", "--image-size", "32"]


class Payload:
    """Unpickling this creates `marker`: proof that loading ran code the file chose."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data dir, cache dir, run dir) of one real evaluate run (logreg head, a signed joblib)."""
    base = tmp_path_factory.mktemp("trust")
    data, cache = base / "data", base / "cache"
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(6):
            make_image(data / name / f"{name}{i}.png", colour, seed=300 * c + i)
    evaluate(scan(data, cache_dir=cache), SearchConfig(specs=(TINY,), heads=("logreg",), folds=2),
             cache, run_dir=base / "run", n_jobs=1)
    return data, cache, base / "run"


@pytest.fixture
def run_copy(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained[2], copy)
    return copy


def _meta(run: Path) -> dict:
    return json.loads((run / HEAD_META).read_text())


def _write_meta(run: Path, meta: dict) -> None:
    (run / HEAD_META).write_text(json.dumps(meta))


def test_the_head_evaluate_writes_is_signed_and_loads(trained):
    meta = _meta(trained[2])
    assert meta["file"] == "best_head.joblib" and len(meta["hmac"]) == 64
    estimator, _ = load_head(trained[2])
    assert hasattr(estimator, "predict_proba")


def test_the_key_is_created_private_and_reused(tmp_path, monkeypatch):
    key = tmp_path / "cfg" / "trust.key"
    monkeypatch.setenv(trust.KEY_ENV, str(key))
    first = trust.sign("a.joblib", "0" * 64)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert trust.sign("a.joblib", "0" * 64) == first != trust.sign("b.joblib", "0" * 64)
    key.chmod(0o644)
    with pytest.raises(TrustError, match="chmod 600"):
        trust.sign("a.joblib", "0" * 64)


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink"])
def test_an_artefact_outside_the_run_is_never_loaded(run_copy, tmp_path, where):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "elsewhere" / "evil.joblib"
    evil.parent.mkdir()
    joblib.dump(Payload(marker), evil)
    digest = file_sha256(evil)
    name = {"absolute": str(evil), "dotdot": "../elsewhere/evil.joblib", "symlink": "linked.joblib"}[where]
    if where == "symlink":
        (run_copy / "linked.joblib").symlink_to(evil)
    # The attacker can even sign with the victim's own scheme, but not with the victim's key:
    # here the signature is valid, and the path alone must stop it.
    _write_meta(run_copy, {**_meta(run_copy), "file": name, "sha256": digest, "hmac": trust.sign(name, digest)})
    with pytest.raises(TrustError, match="outside the run folder|not a relative path"):
        load_head(run_copy)
    assert not marker.exists()


def test_an_edited_head_with_a_matching_sha256_is_refused(run_copy, tmp_path):
    marker = tmp_path / "code-ran"
    joblib.dump(Payload(marker), run_copy / "best_head.joblib")
    meta = _meta(run_copy)
    _write_meta(run_copy, {**meta, "sha256": file_sha256(run_copy / "best_head.joblib")})   # JSON edited to match
    with pytest.raises(TrustError, match="not signed by your featurepipe key.*--trust"):
        load_head(run_copy)
    assert not marker.exists()


def test_a_run_signed_with_another_key_is_refused_unless_trusted(run_copy, tmp_path, monkeypatch):
    monkeypatch.setenv(trust.KEY_ENV, str(tmp_path / "other-user" / "trust.key"))
    with pytest.raises(TrustError, match="copied from another user or machine"):
        load_head(run_copy)
    estimator, _ = load_head(run_copy, trust_run=True)
    assert hasattr(estimator, "predict_proba")


def test_predict_and_export_refuse_a_foreign_run_with_one_line_and_predict_accepts_trust(trained, run_copy, tmp_path,
                                                                                       monkeypatch):
    data = trained[0]
    monkeypatch.setenv(trust.KEY_ENV, str(tmp_path / "other-user" / "trust.key"))
    runner = CliRunner()
    image = str(data / "red" / "red0.png")
    refused = runner.invoke(app, ["predict", str(run_copy), image])
    assert refused.exit_code == 1 and isinstance(refused.exception, SystemExit)   # refused data, not usage
    assert "--trust" in refused.stderr and "Traceback" not in refused.stderr
    exported = runner.invoke(app, ["export", str(run_copy), "--out", str(tmp_path / "exp")])
    assert exported.exit_code == 1 and "--trust" in exported.stderr
    trusted = runner.invoke(app, ["predict", str(run_copy), image, "--trust", "--json"])
    assert trusted.exit_code == 0, trusted.stderr
    assert json.loads(trusted.stdout)["predictions"][0]["label"] == "red"


def test_a_keras_head_that_safe_mode_refuses_gives_a_message_not_a_traceback(run_copy):
    import keras

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    path = run_copy / "best_head.keras"
    model.save(path)
    digest = file_sha256(path)
    # Signed with the user's own key: even then, Keras's safe_mode refuses the lambda.
    _write_meta(run_copy, trust.with_record_signature(HEAD_META, {**_meta(run_copy), "file": path.name, "sha256": digest}))
    with pytest.raises(FeaturepipeError, match="cannot load the dense head .*safe_mode"):
        load_head(run_copy)


def test_model_json_naming_a_file_outside_the_run_is_refused(run_copy, tmp_path):
    outside = tmp_path / "m.keras"
    outside.write_bytes(b"not really")
    meta = {"kind": "finetuned", "file": "../m.keras", "sha256": file_sha256(outside), "classes": ["a", "b"],
            "image_size": 32, "resize": "squash"}
    (run_copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(TrustError, match="outside the run folder"):
        load_run_model(run_copy)


# ---- folders of the user's --------------------------------------------------------------------


def test_run_dir_that_is_a_users_folder_is_refused_unless_overwrite(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text('{"mine": true}')
    with pytest.raises(FeaturepipeError, match="not a featurepipe run.*--overwrite"):
        prepare_run_dir(folder)
    assert prepare_run_dir(folder, overwrite=True) == folder
    assert prepare_run_dir(folder) == folder          # marked as a run now: re-runs are fine
    assert prepare_run_dir(tmp_path / "new") == tmp_path / "new"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare_run_dir(empty) == empty


def test_evaluate_cli_leaves_a_users_folder_untouched(image_tree, cache, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "config.json").write_text('{"mine": true}')
    (folder / "model.json").write_text('{"also": "mine"}')
    result = CliRunner().invoke(app, ["evaluate", str(image_tree), *TINY_ARGS, "--heads", "logreg", "--folds", "2",
                                      "--jobs", "1", "--cache-dir", str(cache), "--run-dir", str(folder)])
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert (folder / "config.json").read_text() == '{"mine": true}'
    assert (folder / "model.json").read_text() == '{"also": "mine"}'
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.json"]


def test_an_earlier_run_can_be_reused_as_run_dir(trained, run_copy):
    data, cache, _ = trained
    again = evaluate(scan(data, cache_dir=cache), SearchConfig(specs=(TINY,), heads=("logreg",), folds=2),
                     cache, run_dir=run_copy, n_jobs=1)
    assert again.run_dir == run_copy and (run_copy / ".featurepipe-run").is_file()


def test_export_out_that_is_a_users_folder_is_refused(trained, tmp_path):
    out = tmp_path / "deploy"
    (out / "saved_model").mkdir(parents=True)
    (out / "saved_model" / "saved_model.pb").write_bytes(b"the user's model")
    result = CliRunner().invoke(app, ["export", str(trained[2]), "--format", "savedmodel", "--out", str(out)])
    assert result.exit_code == 2 and "not a featurepipe export" in result.stderr and "--overwrite" in result.stderr
    assert (out / "saved_model" / "saved_model.pb").read_bytes() == b"the user's model"


def _predict_result(tmp_path) -> PredictResult:
    frame = pd.DataFrame({"path": ["a.png", "b.png"], "label": ["x", None], "probability": [0.9, np.nan],
                          "error": [None, "cannot be decoded"]})
    return PredictResult(frame, "head", ["x", "y"], tmp_path, 1)


def test_predict_out_that_is_a_folder_is_refused_and_leaves_no_temporary_file(tmp_path):
    folder = tmp_path / "preds"
    folder.mkdir()
    with pytest.raises(FeaturepipeError, match="is a folder"):
        _predict_result(tmp_path).save(folder)
    assert list(folder.iterdir()) == [] and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_predict_out_json_is_strict_and_written_whole(tmp_path, monkeypatch):
    out = tmp_path / "p.json"
    _predict_result(tmp_path).save(out)
    data = json.loads(out.read_text(), parse_constant=lambda name: pytest.fail(f"bare {name} in JSON"))
    assert data["predictions"][1]["probability"] is None
    # a failure half-way through leaves the previous file as it was
    before = out.read_bytes()

    def broken(self, path, *args, **kwargs):
        Path(path).write_text("path,lab")
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken)
    csv_out = tmp_path / "p.csv"
    csv_out.write_text("old,complete\n")
    with pytest.raises(OSError):
        _predict_result(tmp_path).save(csv_out)
    assert csv_out.read_text() == "old,complete\n" and out.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


# ---- --json --------------------------------------------------------------------------------


def test_print_json_never_prints_bare_nan(capsys):
    print_json({"holdout": {"test": {"f1": float("nan"), "auc": np.float64("nan"), "ll": math.inf,
                                     "per_class": np.array([0.5, np.nan]), "n": np.int64(3)}}})
    text = capsys.readouterr().out
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name}"))
    assert data == {"holdout": {"test": {"f1": None, "auc": None, "ll": None, "per_class": [0.5, None], "n": 3}}}


def test_evaluate_json_with_a_holdout_split_missing_a_class_is_strict(tmp_path, cache):
    data = tmp_path / "data"
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(6):
            make_image(data / "train" / name / f"{name}{i}.png", colour, seed=700 * c + i)
    for i in range(2):   # the test split lacks "blue": per-class metrics of blue are NaN
        make_image(data / "test" / "red" / f"t{i}.png", COLOURS["red"], seed=800 + i)
        make_image(data / "test" / "green" / f"u{i}.png", COLOURS["green"], seed=900 + i)
    result = CliRunner().invoke(app, ["evaluate", str(data), *TINY_ARGS, "--heads", "logreg", "--folds", "2",
                                      "--jobs", "1", "--cache-dir", str(cache), "--json"])
    assert result.exit_code == 0, result.stderr
    assert "NaN" not in result.stdout
    json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"bare {name}"))
