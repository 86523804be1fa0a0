"""`run`: the whole job, and a no-change re-run that reuses every feature and CV fold."""

import json

import pytest

from featurepipe import pipeline
from featurepipe.backbones import build as build_module
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.core.errors import FeaturepipeError
from featurepipe.deploy.predict import predict
from featurepipe.evaluation.config import SearchConfig
from featurepipe.training.config import FinetuneConfig
from tests.conftest import COLOURS, make_image

TINY = BackboneSpec(name="tiny", weights="random", image_size=32)


def _run(data, cache, run_dir, **kwargs):
    return pipeline.run(data, SearchConfig(specs=(TINY,), heads=("logreg",), folds=2),
                        cache, run_dir=run_dir, n_jobs=1, **kwargs)


def test_second_run_with_nothing_changed_reuses_everything(image_tree, cache, tmp_path, monkeypatch):
    first = _run(image_tree, cache, tmp_path / "run1")
    assert first.extract.extracted == 24 and first.evaluate.fitted > 0
    assert not first.reused_everything and "extracted 24 images" in first.message
    assert first.report_path == tmp_path / "run1" / "report.html" and first.report_path.exists()
    assert list(first.stages) == ["scan", "extract", "evaluate", "inspect", "report"]
    assert first.best["head"] == "logreg" and len(first.leaderboard) == 3
    assert (first.run_dir / "best_head.joblib").exists()

    def no_model(*args, **kwargs):
        raise AssertionError("a re-run with nothing changed must not build the backbone")

    monkeypatch.setattr(build_module, "build_feature_model", no_model)
    second = _run(image_tree, cache, tmp_path / "run2")
    assert (second.extract.extracted, second.extract.reused) == (0, 24)
    assert (second.evaluate.fitted, second.evaluate.reused) == (0, first.evaluate.fitted)
    assert second.reused_everything and second.message == "nothing changed: all features and CV folds reused"
    assert second.best == first.best
    assert second.report_path.exists()
    summary = json.loads(json.dumps(second.to_dict()))
    assert summary["reused_everything"] is True and summary["run_dir"] == str(tmp_path / "run2")
    assert set(summary["stages"]) == {"scan", "extract", "evaluate", "inspect", "report"}
    # The run it wrote predicts without any further setup.
    assert predict(second.run_dir, [image_tree / "red"]).reused == 8


def test_a_new_image_is_extracted_and_the_folds_refitted(image_tree, cache, tmp_path):
    _run(image_tree, cache, tmp_path / "run1")
    make_image(image_tree / "blue" / "blue_extra.png", COLOURS["blue"], seed=777)
    again = _run(image_tree, cache, tmp_path / "run2")
    assert (again.extract.extracted, again.extract.reused) == (1, 24)
    assert again.evaluate.fitted > 0 and not again.reused_everything


def test_finetune_runs_between_evaluate_and_report_and_is_reused_on_a_rerun(image_tree, cache, tmp_path):
    result = _run(image_tree, cache, tmp_path / "run", finetune=FinetuneConfig(epochs=1))
    assert list(result.stages) == ["scan", "extract", "evaluate", "inspect", "finetune", "report"]
    assert result.finetune.epochs_run == 1 and not result.reused_everything and not result.finetune.reused
    assert json.loads(json.dumps(result.to_dict()))["finetune"]["strategy"] == "top-blocks"
    # The colour head is already right on every validation image: one epoch cannot beat it, so the
    # run keeps the frozen head as its model.
    assert result.finetune.kept == "frozen" and not (tmp_path / "run" / "model.json").exists()
    assert predict(result.run_dir, [image_tree / "green"]).model_kind == "head"
    assert "Fine-tuning" in result.report_path.read_text()
    # Nothing changed: the fine-tuning is reused, not trained again.
    again = _run(image_tree, cache, tmp_path / "run", finetune=FinetuneConfig(epochs=1))
    assert again.finetune.reused and again.reused_everything and again.finetune.key == result.finetune.key
    # A different fine-tuning option trains again.
    longer = _run(image_tree, cache, tmp_path / "run", finetune=FinetuneConfig(epochs=2))
    assert not longer.finetune.reused and longer.finetune.epochs_run == 2


def test_bad_data_fails_clearly(tmp_path, cache):
    with pytest.raises(FeaturepipeError, match="does not exist"):
        _run(tmp_path / "missing", cache, tmp_path / "run")
