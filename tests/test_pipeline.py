"""`run`: the whole job, and a no-change re-run that reuses every feature and CV fold."""

import json

import pandas as pd
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


# ---- the anytime search: stages, Ctrl-C, --budget -----------------------------------------------

# Four feature sets: 1 + 2 + 1 in stages (evaluation.search.STAGE_SIZES); 48x40 images, so no resize
# policy copies another's features.
SETS = tuple(BackboneSpec(name=n, weights="random", resize=r).resolved()
             for n, r in (("tiny", "squash"), ("tiny", "center_crop"), ("tiny2", "squash"), ("tiny2", "letterbox")))
NAMES = ["tiny/squash", "tiny/center_crop", "tiny2/squash", "tiny2/letterbox"]


def _staged(data, cache, progress=None, **kwargs):
    return pipeline.run(data, SearchConfig(specs=SETS, heads=("logreg",), folds=3), cache, n_jobs=1,
                        inspect=False, progress=progress, **kwargs)


@pytest.fixture
def close_colours(tmp_path):
    """3 classes x 8 images whose colours differ by 5 of 255 under noise of 25: no feature set scores
    1.0, so each stage's result is its own number (0.42-0.67 nested on these sets alone)."""
    root = tmp_path / "close"
    for c, colour in enumerate(((120, 120, 120), (125, 120, 120), (120, 125, 120))):
        for i in range(8):
            make_image(root / f"c{c}" / f"c{c}_{i}.png", colour, seed=100 * c + i)
    return root


class Lines:
    """A progress callback keeping the search's stage lines; raises KeyboardInterrupt after `stop` of them."""

    def __init__(self, stop=None):
        self.lines, self.stop = [], stop

    def __call__(self, event):
        if event.stage == "search":
            self.lines.append(event.message)
            if self.stop is not None and len(self.lines) >= self.stop:
                raise KeyboardInterrupt


def test_run_searches_in_stages_each_a_whole_run_and_says_each_result(close_colours, cache, tmp_path, monkeypatch):
    from featurepipe.evaluation.evaluate import evaluate

    passes = []
    real = pipeline.evaluate_features
    monkeypatch.setattr(pipeline, "evaluate_features", lambda *a, **k: passes.append(len(a[1])) or real(*a, **k))
    lines = Lines()
    result = _staged(close_colours, cache, lines, budget=None, run_dir=tmp_path / "run")
    assert passes == [1, 3, 4]   # one evaluate pass per stage, over every set done so far
    stages = result.search_progress["stages"]
    assert [s["added"] for s in stages] == [NAMES[:1], NAMES[1:3], NAMES[3:]]
    assert [s["feature_sets"] for s in stages] == [1, 3, 4] and [s["extracted"] for s in stages] == [24, 48, 24]
    assert result.search_progress["order"] == NAMES and result.search_progress["skipped"] == []
    assert len(lines.lines) == 3
    assert lines.lines[0].startswith(f"tiny/squash: nested {stages[0]['nested']['mean']:.3f} (")
    assert "; next: 2 more feature sets, ~" in lines.lines[0] and "; next: 1 more feature set, ~" in lines.lines[1]
    assert lines.lines[1].startswith("tiny/center_crop, tiny2/squash (3 feature sets): nested ")
    assert lines.lines[2].startswith("tiny2/letterbox (4 feature sets): nested ") and lines.lines[2].endswith("search done")
    # The last stage is the whole search: its nested result is the run's, and the run records the stages.
    assert stages[-1]["nested"]["mean"] == result.nested["accuracy"]["mean"]
    assert set(result.leaderboard["features"]) >= set(NAMES)
    recorded = json.loads((result.run_dir / "config.json").read_text())
    assert recorded["search_progress"] == json.loads(json.dumps(result.search_progress))
    assert pipeline.load_run(result.run_dir).search_progress == recorded["search_progress"]
    assert json.loads(json.dumps(result.to_dict()))["search_progress"]["stages"][0]["added"] == NAMES[:1]
    page = result.report_path.read_text()
    assert "Search progress" in page and "tiny/center_crop, tiny2/squash" in page and "Not searched" not in page
    # Stage 1 is the first feature set alone: its nested result is that set's, evaluated by itself.
    alone = evaluate(result.dataset, SearchConfig(specs=SETS[:1], heads=("logreg",), folds=3), cache,
                     run_dir=tmp_path / "alone", n_jobs=1)
    assert stages[0]["nested"] == {k: alone.nested.to_dict()["accuracy"][k] for k in ("mean", "ci_low", "ci_high")}
    assert stages[0]["nested"]["mean"] < 0.9   # a number of its own, not every stage's 1.0
    # A re-run with everything cached is one stage again (one evaluate pass), as before.
    passes.clear()
    again = _staged(close_colours, cache, budget=None, run_dir=tmp_path / "run")
    assert passes == [4] and again.reused_everything and len(again.search_progress["stages"]) == 1


def test_ctrl_c_after_stage_one_keeps_a_loadable_run_and_a_rerun_continues_it(image_tree, cache, monkeypatch):
    with pytest.raises(pipeline.RunInterrupted) as stopped:
        _staged(image_tree, cache, Lines(stop=1), budget=None)
    run_dir = stopped.value.run_dir
    assert isinstance(stopped.value, KeyboardInterrupt) and stopped.value.feature_sets == NAMES[:1]
    # The folder is the whole search's from its first stage on, not named after the one set done.
    assert run_dir.name.endswith("-search"), run_dir.name
    assert str(run_dir) in stopped.value.message and "again continues" in stopped.value.message
    loaded = pipeline.load_run(run_dir)
    assert set(loaded.leaderboard["features"]) == {"tiny/squash"} and loaded.nested is not None
    assert [s["added"] for s in loaded.search_progress["stages"]] == [NAMES[:1]]
    assert loaded.predict(image_tree / "red")["label"].tolist() == ["red"] * 8
    # Running it again continues in the same run folder: the first set's features and folds are reused.
    fits = []
    real = pipeline.evaluate_features
    monkeypatch.setattr(pipeline, "evaluate_features", lambda *a, **k: fits.append(r := real(*a, **k)) or r)
    again = _staged(image_tree, cache, budget=None)
    assert again.run_dir == run_dir
    assert (again.evaluate.extracts[0].extracted, again.evaluate.extracts[0].reused) == (0, 24)
    assert fits[0].fitted == 0 and fits[0].reused > 0   # stage 1 of the re-run: every fold reused
    assert set(again.leaderboard["features"]) >= set(NAMES)


def test_a_budget_leaves_out_what_would_not_fit_and_a_warm_rerun_keeps_its_choice(image_tree, cache, tmp_path):
    def staged(budget, name):
        return pipeline.run(image_tree, SearchConfig(specs=SETS[:3], heads=("logreg",), folds=2), cache, n_jobs=1,
                            inspect=False, budget=budget, run_dir=tmp_path / name)

    # A budget already spent when stage 1 ends: every set still to extract is left out, and said so.
    tight = staged(1e-3, "tight")
    assert [s["feature_set"] for s in tight.search_progress["skipped"]] == NAMES[1:3]
    assert set(tight.leaderboard["features"]) == {"tiny/squash"}
    assert any("--budget 0.001 s: 2 of 3 feature sets not searched" in n for n in tight.evaluate.notes)
    recorded = json.loads((tight.run_dir / "config.json").read_text())
    assert any("2 of 3 feature sets not searched" in n for n in recorded["notes"])
    assert recorded["search_progress"]["budget"] == 1e-3
    page = tight.report_path.read_text()
    assert "Search progress" in page and "Not searched: 2 feature set(s)" in page and "<li>tiny2/squash: " in page
    # With no limit every set is searched; after that, the same tight budget keeps them all: cached sets cost ~0.
    full = staged(0, "full")
    assert full.search_progress["skipped"] == [] and full.search_progress["budget"] is None
    warm = staged(1e-3, "warm")
    assert warm.search_progress["skipped"] == [] and warm.best == full.best
    assert set(warm.leaderboard["features"]) == set(full.leaderboard["features"]) >= set(NAMES[:3])
    pd.testing.assert_frame_equal(warm.leaderboard, full.leaderboard)
