"""featurepipe.rundir.run owns the run directory; stages take each other's values, not each other's internals."""

import ast
import json
import re
import time
from dataclasses import replace
from pathlib import Path

import pytest

from featurepipe.rundir import run as rundir
from featurepipe.backbones.fingerprint import views_fingerprint
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.data.dataset import scan
from featurepipe.core.errors import FeaturepipeError
from featurepipe.evaluation.evaluate import evaluate, evaluate_features
from featurepipe.extraction.extract import extract
from featurepipe.extraction.features import cached_features, open_stores
from featurepipe.data.augment import AugmentPolicy, AugmentSpec
from featurepipe.rundir.folder import default_run_dir, fingerprints_used_by_runs, read_json
from featurepipe.rundir.heads_io import HeadMeta
from featurepipe.rundir.model import ModelMeta
from featurepipe.rundir.run import Run
from featurepipe.evaluation.config import SearchConfig

TINY = BackboneSpec(name="tiny", weights="random", image_size=32)
PACKAGE = Path(__file__).resolve().parents[2] / "featurepipe"


def _imported_modules(module: str) -> set[str]:
    """Every featurepipe module `module`'s source imports, at any depth of the file (lazy imports too)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.startswith("featurepipe")}


def test_stages_do_not_reach_into_each_other():
    assert "featurepipe.deploy.predict" not in _imported_modules("deploy/export")
    assert "featurepipe.extraction.extract" not in _imported_modules("deploy/predict")
    assert "featurepipe.training.finetune" not in _imported_modules("training/baseline")
    # the run directory has one owner: nobody names the module it was once split into
    for path in PACKAGE.rglob("*.py"):
        assert "featurepipe.artifacts" not in _imported_modules(str(path.relative_to(PACKAGE).with_suffix(""))), path


def test_no_module_but_run_reads_or_deletes_run_files_by_their_literal_names():
    # evaluate deleted "model.json" by literal while the constant existed; finetune, predict and
    # report each had their own _read_json
    for name in ("evaluation/evaluate", "deploy/predict", "deploy/export", "training/finetune", "training/baseline",
                 "rundir/maintenance"):
        source = (PACKAGE / f"{name}.py").read_text()
        assert not re.search(r"""["'](model\.json|best_head\.json|config\.json)["']\)?\.unlink""", source), name
        assert "def _read_json" not in source, name


def test_open_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(FeaturepipeError, match="does not exist"):
        Run.open(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeaturepipeError, match="no config.json"):
        Run.open(tmp_path / "empty")
    (tmp_path / "empty" / rundir.CONFIG).write_text("{not json")
    run = Run.open(tmp_path / "empty")
    with pytest.raises(FeaturepipeError, match=r"config\.json is damaged or unreadable.*featurepipe evaluate"):
        run.config
    with pytest.raises(FeaturepipeError, match="has no trained head"):
        run.head_meta


def test_read_json_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(FeaturepipeError, match="run fine-tuning first"):
        read_json(tmp_path / "model.json", "run fine-tuning first")
    (tmp_path / "x.json").write_text("[1,")
    with pytest.raises(FeaturepipeError, match=r"x\.json is damaged or unreadable .*re-run fine-tuning"):
        read_json(tmp_path / "x.json", fix="fine-tuning")
    (tmp_path / "y.json").write_text('{"a": 1}')
    assert read_json(tmp_path / "y.json") == {"a": 1}


def test_run_dir_names_are_written_once(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-120000")
    assert default_run_dir(tmp_path, "/data/My Photos", "baseline") == \
        tmp_path / "runs" / "20260101-120000-My_Photos-baseline"
    made = Run.new(tmp_path, "/data/flowers.csv", "efficientnet_lite0")
    assert made.path == tmp_path / "runs" / "20260101-120000-flowers-efficientnet_lite0"
    assert (made.path / rundir.MARKER).is_file()
    assert Run.new(tmp_path, "/data/x", "search", explicit=tmp_path / "mine").path == tmp_path / "mine"
    # a user's folder is still refused (issue 12)
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("keep")
    with pytest.raises(FeaturepipeError, match="not a featurepipe run"):
        Run.new(tmp_path, "/data/x", "search", explicit=tmp_path / "theirs")


def test_fingerprints_used_by_runs_skip_unreadable_configs(tmp_path):
    for name, text in (("a", json.dumps({"feature_fingerprints": ["f1", "f2"]})), ("b", "{broken"),
                       ("c", json.dumps(["not", "a", "dict"])), ("d", json.dumps({"feature_fingerprints": ["f3"]}))):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / rundir.CONFIG).write_text(text)
    assert fingerprints_used_by_runs(tmp_path) == {"f1", "f2", "f3"}


def test_typed_metadata_keeps_the_json_fields():
    meta = HeadMeta({"head": "logreg", "params": {"C": 1.0}, "classes": ["a", 2], "backbone": TINY.to_dict(),
                     "feature_fingerprint": "abc"})
    assert (meta.head, meta.params, meta.classes, meta.is_vote) == ("logreg", {"C": 1.0}, ["a", "2"], False)
    assert meta.backbone().name == "tiny" and meta.backbone().image_size == 32
    assert json.loads(json.dumps(meta))["feature_fingerprint"] == "abc"     # still written as plain JSON
    assert HeadMeta({"head": "vote"}).is_vote
    # older runs recorded the backbone in config.json only
    assert HeadMeta({"head": "knn"}).backbone({"backbone": TINY.to_dict()}).name == "tiny"
    assert HeadMeta({"head": "knn"}).backbone({}) is None
    good = {"kind": "finetuned", "file": "f.keras", "sha256": "0", "classes": ["a"], "image_size": "64",
            "resize": "squash"}
    checked = ModelMeta(good).check(Path("model.json"))
    assert (checked.image_size, checked.resize, checked.classes) == (64, "squash", ["a"])
    with pytest.raises(FeaturepipeError, match="missing image_size"):
        ModelMeta({k: v for k, v in good.items() if k != "image_size"}).check(Path("model.json"))


def test_augment_spec_is_one_value_with_the_old_fingerprints(tmp_path):
    assert AugmentSpec.of(3) == AugmentSpec(3) and AugmentSpec.of(None) == AugmentSpec()
    assert AugmentSpec().resolved_policy is None and AugmentSpec(2).resolved_policy == AugmentPolicy()
    spec = AugmentSpec(2, AugmentPolicy(rotation_range=10.0), seed=7)
    config = spec.to_config()
    assert config == {"augment": 2, "augment_seed": 7, "augment_policy": AugmentPolicy(rotation_range=10.0).to_dict()}
    assert AugmentSpec.from_config(config) == spec
    assert AugmentSpec.from_config({}).count == 0           # runs without augmentation fields
    # the views store is named exactly as before: base fingerprint + policy + seed
    stores = open_stores(TINY, tmp_path, AugmentSpec(1, seed=5))
    assert stores.views.fingerprint == views_fingerprint(stores.originals.fingerprint,
                                                         AugmentPolicy().to_dict(), 5)[0]
    assert stores.augment_spec == AugmentSpec(1, AugmentPolicy(), 5)
    assert open_stores(TINY, tmp_path, 1).views.fingerprint != stores.views.fingerprint   # seed 0


def test_evaluate_features_takes_cached_features_and_never_extracts(image_tree, cache, tmp_path, monkeypatch):
    dataset = scan(image_tree, cache_dir=cache)
    config = SearchConfig(specs=(TINY,), heads=("logreg",), folds=3, ensemble=0, widen=False, nested=False)
    evaluate(dataset, config, cache, run_dir=tmp_path / "whole", n_jobs=1)
    features = cached_features(dataset, [TINY.resolved()], cache)
    frame_before = features[0].frame.copy()

    def no_extraction(*args, **kwargs):
        raise AssertionError("evaluate_features extracted")
    monkeypatch.setattr("featurepipe.extraction.extract.extract", no_extraction)
    monkeypatch.setattr("featurepipe.extraction.shared.extract_many", no_extraction)
    staged = evaluate_features(dataset, features, config, cache, run_dir=tmp_path / "staged", n_jobs=1)
    assert staged.extract is None and staged.extracts == []
    for name in (rundir.LEADERBOARD, rundir.OOF, rundir.FOLDS):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "staged" / name).read_bytes(), name
    assert features[0].frame.equals(frame_before)           # the caller's features are not edited
    config = json.loads((tmp_path / "staged" / rundir.CONFIG).read_text())
    assert (config["augment"], config["augment_seed"], config["augment_policy"]) == (0, 0, None)
    with pytest.raises(FeaturepipeError, match="the same feature set is given twice"):
        evaluate_features(dataset, features * 2, config, cache, run_dir=tmp_path / "twice", n_jobs=1)
    letterbox = BackboneSpec(name="tiny", weights="random", image_size=32, resize="letterbox")
    other = replace(features[0], stores=open_stores(letterbox, cache, AugmentSpec(1)))
    with pytest.raises(FeaturepipeError, match="different augmentation"):
        evaluate_features(dataset, features + [other], config, cache, run_dir=tmp_path / "mixed", n_jobs=1)


def test_members_of_a_vote_are_runs_that_share_the_parent_config(tmp_path):
    run = Run.create(tmp_path / "run")
    run.write_json(rundir.CONFIG, {"cache_dir": str(tmp_path / "cache"), "backbone": None})
    member = run.member(1)
    assert member.path == tmp_path / "run" / rundir.MEMBERS_DIR / "1" and member.parent is run
    assert member.config["cache_dir"] == str(tmp_path / "cache")
    assert not (member.path / rundir.CONFIG).exists()
    run.write_json(rundir.MODEL_META, {"kind": "finetuned"})
    run.clear_model()
    assert not (tmp_path / "run" / rundir.MODEL_META).exists()


def test_extract_takes_the_augment_spec(image_tree, cache):
    dataset = scan(image_tree, cache_dir=cache)
    report = extract(dataset, TINY, cache, augment=AugmentSpec(1, seed=3))
    assert report.views_per_image == 1 and report.views_extracted == len(dataset.frame["hash"].unique())
    assert report.views_fingerprint == open_stores(TINY, cache, AugmentSpec(1, seed=3)).views.fingerprint
