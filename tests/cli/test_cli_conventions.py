"""The command line's conventions (issue 23, points 8 and 9): help that reads like other tools' help,
the same option named the same in every command, --json everywhere a script needs it, exit codes that
tell a usage error (2) from a runtime or data failure (1), and summaries that count what they say."""

import json
import os
import subprocess
import sys
import time

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from featurepipe.cli.app import app
from tests.conftest import COLOURS, make_image

TINY_ARGS = ["--backbone", "tiny", "--weights", "random", "--image-size", "32"]


def _commands(group=None, path=()):
    """(path, click command) for every command of the CLI, subcommand groups walked."""
    group = group or get_command(app)
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


COMMANDS = list(_commands())
IDS = [" ".join(path) for path, _ in COMMANDS]


def _invoke(*args, expect=0):
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400"})
    if expect is not None:
        assert result.exit_code == expect, (result.exit_code, result.stdout, result.stderr, result.exception)
    return result


def _flat(text: str) -> str:
    return " ".join(text.split())


# ---- help ----------------------------------------------------------------------------------


def test_the_walk_finds_every_command():
    assert {" ".join(p) for p, _ in COMMANDS} >= {"extract", "evaluate", "run", "inspect", "finetune", "baseline",
                                                  "predict", "export", "report", "backbones", "cache ls",
                                                  "cache verify", "cache gc", "features export"}


@pytest.mark.parametrize("path, command", COMMANDS, ids=IDS)
def test_every_argument_and_option_of_every_command_has_help(path, command):
    missing = [param.name for param in command.params
               if not getattr(param, "hidden", False) and not (getattr(param, "help", None) or "").strip()]
    assert missing == [], f"`featurepipe {' '.join(path)}`: no help text for {missing}"


@pytest.mark.parametrize("path, command", COMMANDS, ids=IDS)
def test_h_is_help_and_the_usage_names_arguments_in_capitals_without_type_tags(path, command):
    short = _invoke(*path, "-h")
    assert short.stdout == _invoke(*path, "--help").stdout
    usage = short.stdout.strip().splitlines()[0]
    assert usage.startswith("Usage:") and "{" not in usage, usage
    for param in command.params:
        if param.param_type_name == "argument":
            assert param.name.upper() in usage, (param.name, usage)
    for tag in ("<str>", "<bool>", "<int", "<float", "<path>", "<list"):
        assert tag not in short.stdout, (tag, short.stdout)


def test_usage_line_of_evaluate_and_predict():
    assert "evaluate [OPTIONS] DATA" in _invoke("evaluate", "-h").stdout
    assert "predict [OPTIONS] RUN_DIR INPUTS..." in _invoke("predict", "-h").stdout


def test_version():
    from featurepipe import __version__

    assert _invoke("--version").stdout.strip() == f"featurepipe {__version__}"


def test_the_grid_help_keeps_its_values_and_options_show_a_metavar():
    text = _flat(_invoke("evaluate", "--help").stdout)
    assert "{head: {param: [values]}}" in text
    assert "--lock-timeout SECONDS" in _flat(_invoke("extract", "--help").stdout)
    assert "in seconds" in _flat(_invoke("extract", "--help").stdout)
    assert "--folds FOLDS" in text and "--nested / --no-nested" in text


def test_no_undefined_jargon_in_help():
    texts = {" ".join(path): _flat(_invoke(*path, "--help").stdout) for path, _ in COMMANDS}
    assert not [name for name, text in texts.items() if "seeds'" in text]
    assert "fpt (freeze, pre-train, fine-tune" in texts["finetune"]


def test_a_subcommands_help_imports_neither_pandas_nor_numpy_nor_tensorflow():
    # In a fresh interpreter: this one has imported them all already.
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom featurepipe.cli.app import app\n"
            "r = CliRunner().invoke(app, ['evaluate', '--help'])\nassert r.exit_code == 0, r.output\n"
            "print(sorted(m for m in ('pandas', 'numpy', 'tensorflow', 'keras') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


# ---- the same option under the same name --------------------------------------------------


def _options(path):
    command = dict(COMMANDS)[tuple(path)]
    return {opt: param for param in command.params for opt in param.opts}


def test_run_takes_groups_like_evaluate_and_inspect():
    for path in (["run"], ["evaluate"], ["inspect"]):
        assert {"--groups", "--groups-from"} <= set(_options(path)), path


def test_top_is_one_name_with_the_old_one_hidden():
    for path in (["predict"], ["inspect"]):
        options = _options(path)
        assert "--top" in options and "--top-k" in options and options["--top-k"].hidden, path
        assert "--top-k" not in _invoke(*path, "--help").stdout


def _tree(root, sizes):
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(sizes[name]):
            make_image(root / name / f"{name}{i}.png", colour, seed=100 * c + i)
    return root


def test_inspect_folds_default_is_evaluates(tmp_path):
    from featurepipe.cli.inspect import inspect_folds
    from featurepipe.data.dataset import scan

    small = scan(_tree(tmp_path / "small", {"red": 8, "green": 8, "blue": 3}))
    assert inspect_folds(small, None)[0] == 3 and "class 'blue' has 3 images" in inspect_folds(small, None)[1]
    assert inspect_folds(scan(_tree(tmp_path / "big", {"red": 8, "green": 8, "blue": 8})), None) == (5, None)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"folds": 4}))
    assert inspect_folds(small, run) == (4, None)


@pytest.fixture
def evaluated(image_tree, cache, tmp_path):
    run = tmp_path / "run"
    _invoke("evaluate", image_tree, *TINY_ARGS, "--cache-dir", cache, "--heads", "logreg", "--folds", "2",
            "--jobs", "1", "--no-nested", "--run-dir", run, "--json")
    return image_tree, cache, run


def test_predict_takes_top_and_still_top_k_and_fails_when_every_input_failed(evaluated, tmp_path):
    data, cache, run = evaluated
    image = data / "red" / "red0.png"
    assert json.loads(_invoke("predict", run, image, "--top", "2", "--json").stdout)["top_k"] == 2
    assert json.loads(_invoke("predict", run, image, "--top-k", "1", "--json").stdout)["top_k"] == 1
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    some = _invoke("predict", run, image, broken, "--json")
    assert json.loads(some.stdout)["failed"] == 1
    none = _invoke("predict", run, broken, expect=1)
    assert "error:" in none.stderr and "none of the 1 input(s)" in _flat(none.stderr)
    none_json = _invoke("predict", run, broken, "--json", expect=1)
    assert json.loads(none_json.stdout)["failed"] == 1


# ---- --json where scripts need it ------------------------------------------------------------


def test_cache_ls_json_is_machine_readable_and_tells_resize_stores_apart(image_tree, cache):
    for resize in ("squash", "letterbox"):
        _invoke("extract", image_tree, *TINY_ARGS, "--resize", resize, "--cache-dir", cache, "--json")
    rows = json.loads(_invoke("cache", "ls", "--cache-dir", cache, "--json").stdout)
    assert len(rows) == 2 and {row["resize"] for row in rows} == {"squash", "letterbox"}
    for row in rows:
        assert all(key == key.lower() and " " not in key for key in row), row
        assert row["rows_of"] == "images" and row["backbone"] == "tiny"
        assert isinstance(row["rows"], int) and row["rows"] == 24 and isinstance(row["bytes"], int)
        assert isinstance(row["image_size"], int) and isinstance(row["feature_dim"], int)
        assert len(row["fingerprint"]) > 16


def test_cache_verify_gc_and_features_export_speak_json(image_tree, cache, tmp_path):
    _invoke("extract", image_tree, *TINY_ARGS, "--cache-dir", cache, "--json")
    verified = json.loads(_invoke("cache", "verify", "--cache-dir", cache, "--json").stdout)
    assert verified["ok"] is True and verified["checked"] == 1 and verified["problems"] == {}
    collected = json.loads(_invoke("cache", "gc", "--dry-run", "--cache-dir", cache, "--json").stdout)
    assert collected["dry_run"] is True and collected["stores_removed"] == [] and collected["rows_removed"] == 0
    out = tmp_path / "feats.npz"
    exported = json.loads(_invoke("features", "export", image_tree, "--out", out, *TINY_ARGS, "--cache-dir", cache,
                                  "--json").stdout)
    assert (exported["rows"], exported["feature_dim"], exported["path"]) == (24, 24, str(out))


# ---- exit codes ------------------------------------------------------------------------------


def test_exit_codes_tell_usage_errors_from_data_failures(image_tree, cache, tmp_path):
    # data / runtime: 1
    missing = _invoke("extract", tmp_path / "nope", *TINY_ARGS, "--cache-dir", cache, expect=1)
    assert "does not exist" in missing.stderr
    (tmp_path / "bad.csv").write_text("path\nnope.png\n")
    _invoke("evaluate", image_tree, *TINY_ARGS, "--cache-dir", cache, "--exclude", tmp_path / "bad.csv", expect=1)
    # usage: 2, from click and from featurepipe's own checks of option values
    _invoke("extract", image_tree, *TINY_ARGS, "--batch-size", "lots", expect=2)
    unknown = _invoke("extract", image_tree, "--backbone", "resnet9000", "--cache-dir", cache, expect=2)
    assert "unknown backbone 'resnet9000'" in unknown.stderr
    _invoke("evaluate", image_tree, "--backbone", "tiny+tiny", "--cache-dir", cache, expect=2)
    both = _invoke("evaluate", image_tree, *TINY_ARGS, "--scheduler", "tcp://127.0.0.1:1", "--workers", "2",
                   "--cache-dir", cache, expect=2)
    assert "exclude each other" in both.stderr
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    _invoke("evaluate", image_tree, *TINY_ARGS, "--cache-dir", cache, "--run-dir", folder, expect=2)


# ---- wording ---------------------------------------------------------------------------------


def test_plurals_and_the_views_word():
    from featurepipe.cli.common import best_text
    from featurepipe.cli.render import plural

    assert (plural(1, "image"), plural(0, "image"), plural(2, "epoch")) == ("1 image", "0 images", "2 epochs")
    plain = best_text({"features": "tiny", "head": "logreg", "params": {"C": 1.0}, "augment": "none"})
    assert plain == "tiny logreg C=1.0" and "none" not in plain
    views = best_text({"head": "logreg", "params": {"C": 1.0}, "augment": "views"})
    assert "augmented views" in views and "(views)" not in views


def test_a_fine_tuning_that_is_all_warm_up_says_so():
    from featurepipe.cli.common import warmup_note
    from featurepipe.training.config import FinetuneConfig

    note = warmup_note(FinetuneConfig(epochs=1, warmup_epochs=1))
    assert note and "1-epoch fine-tuning is warm-up" in note and "--warmup-epochs" in note
    assert warmup_note(FinetuneConfig(epochs=12, warmup_epochs=1)) is None
    assert warmup_note(FinetuneConfig(epochs=1, warmup_epochs=1, schedule="constant")) is None


def test_run_counts_photos_and_feature_sets_apart_and_its_total_includes_start_up(image_tree, cache, tmp_path,
                                                                                  monkeypatch):
    from featurepipe.cli import clock, render

    # The process "started" 1000 s ago: the printed total is the wall time since then, not the stages' sum.
    monkeypatch.setattr(render, "process_seconds", lambda: time.time() - (clock.STARTED - 1000.0))
    args = ["run", image_tree, *TINY_ARGS, "--resize", "auto", "--heads", "logreg", "--folds", "2", "--no-nested",
            "--no-inspect", "--jobs", "1", "--cache-dir", cache, "--run-dir", tmp_path / "run"]
    out = _flat(_invoke(*args).stdout)
    assert "features: 24 images x 3 feature sets: 72 extracted, 0 reused" in out, out
    assert "(none)" not in out and "1 images" not in out
    total = float(out.split("total ")[1].split(" s")[0])
    assert total >= 1000 and "(start-up included)" in out
    again = _flat(_invoke(*args).stdout)
    assert "nothing changed: all features and CV folds reused" in again


def test_run_uses_groups_and_groups_from(image_tree, cache, tmp_path):
    # One group per class (the regex takes the class name from the file name): CV cannot split it, and
    # `run` says so -- before, run had no --groups and never grouped.
    args = ["run", image_tree, *TINY_ARGS, "--quick", "--heads", "logreg", "--folds", "2", "--no-inspect", "--jobs",
            "1", "--cache-dir", cache, "--run-dir", tmp_path / "run"]
    grouped = _invoke(*args, "--groups", r"^([a-z]+)[0-9]", expect=1)
    assert "1 distinct group" in grouped.stderr
    manifest = tmp_path / "groups.csv"
    manifest.write_text("path,group\n" + "".join(f"{c}/{c}{i}.png,{c}\n" for c in COLOURS for i in range(8)))
    assert "1 distinct group" in _invoke(*args, "--groups-from", manifest, expect=1).stderr
    missing = _invoke(*args, "--groups-from", tmp_path / "nope.csv", expect=1)
    assert "--groups-from" in missing.stderr and "nope.csv" in missing.stderr


def test_the_total_counts_from_the_process_start_not_from_the_first_stage():
    from featurepipe.cli import clock, render

    # psutil's process start precedes every import of featurepipe (the clock's fallback comes later still).
    assert render.process_seconds() >= time.time() - clock.STARTED - 0.05
