"""Python and the CLI search with one set of defaults (issue 23, point 3).

`SearchConfig()` / `SearchConfig.default()` is what `featurepipe run DATA` searches and
`SearchConfig.quick()` what `run DATA --quick` and `evaluate DATA` search: the CLI's config is
compared with them field by field, and `--help` shows the default the code uses. `featurepipe.run`
with no config uses the same defaults, returns a RunResult (predict -> the DataFrame `predict --json`
prints, report_path, run_dir, nested, leaderboard), and `featurepipe.load_run` gives the same object
back. The README's "From Python" examples are executed as written, on a tiny copy of the demo's
layout with the tiny test backbone put in place of the search's feature sets (the only override).
"""

import json
import re
from dataclasses import fields

import pandas as pd
import pytest
from typer.testing import CliRunner

import featurepipe
from featurepipe.backbones.spec import RESIZE_POLICIES, BackboneSpec
from featurepipe.cli.app import app
from featurepipe.core.errors import FeaturepipeError, UsageError
from featurepipe.evaluation import search
from featurepipe.evaluation.config import SearchConfig
from tests.conftest import COLOURS, REPO, make_image

TINY = BackboneSpec(name="tiny", weights="random").resolved()
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Captured(Exception):
    """Raised by a stand-in stage once it has the config it was given."""


def _same_fields(got: SearchConfig, want: SearchConfig) -> None:
    for f in fields(SearchConfig):
        assert getattr(got, f.name) == getattr(want, f.name), f.name
    assert got == want


def _cli_config(monkeypatch, module: str, name: str, args: list[str]) -> SearchConfig:
    """The SearchConfig the CLI hands to `module.name` for these arguments (the stage is not run)."""
    seen = []

    def stand_in(*a, **k):
        seen.append(next(v for v in (*a, *k.values()) if isinstance(v, SearchConfig)))
        raise Captured

    monkeypatch.setattr(f"{module}.{name}", stand_in)
    outcome = CliRunner().invoke(app, args)
    assert seen, outcome.output
    return seen[0]


def test_search_config_defaults_are_what_run_searches():
    default = SearchConfig()
    _same_fields(default, SearchConfig.default())
    from featurepipe.heads import default_heads

    assert default.heads == search.DEFAULT_HEADS == default_heads() == ("logreg", "knn", "ncm")
    assert [(s.name, s.resize) for s in default.specs] == list(search.DEFAULT_POOL)
    # One set per Lite size: the vote's measured gain comes from different backbones.
    assert sorted(s.name for s in default.specs) == sorted(search.DEFAULT_BACKBONES)
    wide = SearchConfig.default(resize="auto")
    assert {(s.name, s.resize) for s in wide.specs} == {(b, p) for b in search.DEFAULT_BACKBONES
                                                        for p in RESIZE_POLICIES}
    quick = SearchConfig.quick()
    assert [s.name for s in quick.specs] == [search.QUICK_BACKBONE] and quick.heads == default.heads
    assert SearchConfig.quick(heads=("logreg",), folds=3) == SearchConfig(specs=quick.specs, heads=("logreg",), folds=3)
    with pytest.raises(UsageError, match="bogus"):
        SearchConfig.default(bogus=1)
    with pytest.raises(UsageError, match="not both"):
        SearchConfig.default(specs=(TINY,), resize="squash")


def test_the_cli_builds_the_same_config_as_python(image_tree, tmp_path, monkeypatch):
    cache = ["--cache-dir", str(tmp_path / "cache")]
    _same_fields(_cli_config(monkeypatch, "featurepipe.pipeline", "run", ["run", str(image_tree), *cache]),
                 SearchConfig.default())
    _same_fields(_cli_config(monkeypatch, "featurepipe.pipeline", "run", ["run", str(image_tree), "--quick", *cache]),
                 SearchConfig.quick())
    _same_fields(_cli_config(monkeypatch, "featurepipe.evaluation.evaluate", "evaluate",
                             ["evaluate", str(image_tree), *cache]), SearchConfig.quick())
    # An option given on the command line is the same keyword in Python.
    _same_fields(_cli_config(monkeypatch, "featurepipe.pipeline", "run",
                             ["run", str(image_tree), "--quick", "--heads", "logreg", "--folds", "3", "--resize",
                              "squash", *cache]),
                 SearchConfig.quick(heads=("logreg",), folds=3, resize="squash"))


@pytest.mark.parametrize("command", ["run", "evaluate"])
def test_help_shows_the_defaults_the_code_uses(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    text = ANSI.sub("", CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400"}).output)
    # help wraps at its own width: a continuation line starts with spaces; join them back to one line
    flat = re.sub(r"\n\s+", "", text)
    assert f"[default: {','.join(SearchConfig().heads)}]" in flat
    assert ",".join(search.DEFAULT_BACKBONES) in flat and search.QUICK_BACKBONE in flat


def test_python_run_with_no_config_searches_what_the_cli_does(image_tree, tmp_path, monkeypatch):
    """featurepipe.run(DATA) hands evaluate the same config as `featurepipe run DATA` (the feature sets
    put on the tiny backbone for both, so that the test extracts in milliseconds)."""
    monkeypatch.setattr(search, "search_specs", lambda *a, **k: [TINY])
    cli = _cli_config(monkeypatch, "featurepipe.pipeline", "run",
                      ["run", str(image_tree), "--cache-dir", str(tmp_path / "cache")])
    monkeypatch.undo()
    monkeypatch.setattr(search, "search_specs", lambda *a, **k: [TINY])
    seen = []

    def evaluate_features(dataset, features, config, *a, **k):
        seen.append(config)
        raise Captured

    monkeypatch.setattr("featurepipe.pipeline.evaluate_features", evaluate_features)
    with pytest.raises(Captured):
        featurepipe.run(image_tree, cache_dir=tmp_path / "cache", finetune=False)
    _same_fields(seen[0], cli)
    _same_fields(seen[0], SearchConfig())
    with pytest.raises(UsageError, match="not both"):
        featurepipe.run(image_tree, SearchConfig(), quick=True)


def _readme_python_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## From Python\n", 1)[1]
    section = re.split(r"\n## ", section, maxsplit=1)[0]
    section = section.split("\n### ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "README.md's From Python section has no python example"
    return blocks


@pytest.fixture
def demo_like(tmp_path):
    """The demo's layout in miniature: data/demo/<class>/<class>N.jpg, 3 classes x 8 images."""
    root = tmp_path / "data" / "demo"
    for c, (name, colour) in enumerate(zip(("fish", "monument", "tool"), COLOURS.values())):
        for i in range(1, 9):
            make_image(root / name / f"{name}{i}.jpg", colour, seed=100 * c + i)
    return root


def test_the_readme_python_examples_run_and_match_the_cli(demo_like, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                    # "data/demo" and the default ./cache are the test's own
    monkeypatch.delenv("FEATUREPIPE_CACHE", raising=False)
    monkeypatch.setattr(search, "search_specs", lambda *a, **k: [TINY])   # the tiny backbone for every search
    namespace: dict = {}
    for block in _readme_python_blocks():
        exec(compile(block, "README.md", "exec"), namespace)

    result = namespace["result"]
    assert isinstance(result, featurepipe.RunResult)
    assert result.run_dir.is_dir() and result.report_path.is_file()
    recorded = json.loads((result.run_dir / "config.json").read_text())
    assert recorded["heads"] == list(SearchConfig().heads)          # quick=True: the CLI's default heads
    assert recorded["search"]["ensemble"] == SearchConfig().ensemble and recorded["search"]["vote"] is True
    assert result.nested is not None and 0.0 <= result.nested["accuracy"]["mean"] <= 1.0
    assert result.nested == json.loads((result.run_dir / "nested.json").read_text())
    assert result.leaderboard.iloc[0]["accuracy_mean"] == result.leaderboard["accuracy_mean"].max()

    # predict: a DataFrame with the columns (and rows) `featurepipe predict --json` prints
    predictions = namespace["predictions"]
    assert isinstance(predictions, pd.DataFrame) and len(predictions) == 8
    assert predictions["error"].isna().all()
    outcome = CliRunner().invoke(app, ["predict", str(result.run_dir), "data/demo/fish", "--json"])
    assert outcome.exit_code == 0, outcome.output
    printed = json.loads(outcome.stdout)["predictions"]
    assert list(predictions.columns) == list(printed[0])
    assert list(predictions["label"]) == [row["label"] for row in printed]

    # load_run: the same object for the run on disk
    again = namespace["again"]
    assert type(again) is type(result)
    assert (again.run_dir, again.report_path, again.best, again.nested) == (
        result.run_dir, result.report_path, result.best, result.nested)
    pd.testing.assert_frame_equal(again.leaderboard.reset_index(drop=True), result.leaderboard.reset_index(drop=True),
                                  check_dtype=False)
    pd.testing.assert_frame_equal(again.predict("data/demo/fish"), predictions)


def test_load_run_names_what_is_missing(tmp_path):
    with pytest.raises(FeaturepipeError, match="does not exist"):
        featurepipe.load_run(tmp_path / "nope")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(FeaturepipeError, match="leaderboard.csv"):
        featurepipe.load_run(tmp_path / "run")
