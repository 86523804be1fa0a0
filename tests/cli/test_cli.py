"""The typer CLI in-process: JSON summaries, cache maintenance, exports, and one-line errors for bad input."""

import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from featurepipe.backbones.spec import BackboneSpec
from featurepipe.cli.app import app
from featurepipe.data.dataset import scan
from featurepipe.extraction.extract import open_stores
from featurepipe.extraction.features import dataset_features

TINY_ARGS = ["--backbone", "tiny", "--weights", "random", "--image-size", "32"]
TINY = BackboneSpec(name="tiny", weights="random", image_size=32)


@pytest.fixture
def cli():
    runner = CliRunner()

    def invoke(*args, expect=0):
        result = runner.invoke(app, [str(a) for a in args])
        if expect is not None:
            assert result.exit_code == expect, (result.exit_code, result.stdout, result.stderr, result.exception)
        return result

    return invoke


def extract_json(cli, data, cache, *extra):
    result = cli("extract", data, *TINY_ARGS, "--cache-dir", cache, "--json", *extra)
    return json.loads(result.stdout)


def assert_one_line_error(result, *phrases):
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])


# ---- extract -------------------------------------------------------------------------------


def test_extract_json_then_rerun(cli, image_tree, cache):
    first = extract_json(cli, image_tree, cache)
    assert (first["extracted"], first["reused"], first["failed"]) == (24, 0, [])
    assert first["seconds"] > 0 and first["feature_dim"] == 24 and first["backbone"] == "tiny"
    assert first["dataset"]["images"] == 24 and first["dataset"]["layout"] == "folders"
    assert first["dataset"]["classes"] == {"blue": 8, "green": 8, "red": 8}
    assert first["dataset"]["source"] == str(image_tree)
    assert first["store_dir"] == str(open_stores(TINY, cache).originals.directory)
    again = extract_json(cli, image_tree, cache)
    assert (again["extracted"], again["reused"]) == (0, 24)
    assert again["fingerprint"] == first["fingerprint"]


def test_extract_text_summary_lists_failures(cli, image_tree, cache):
    (image_tree / "red" / "broken.jpg").write_text("<html>oops</html>")
    result = cli("extract", image_tree, *TINY_ARGS, "--cache-dir", cache, "--augment", "1")
    out = result.stdout
    assert "tiny: 25 images, 24 extracted, 0 reused, 1 failed" in " ".join(out.split())
    assert "views: 24 extracted, 0 reused" in " ".join(out.split())
    assert f"failed: {image_tree / 'red' / 'broken.jpg'}:" in out.replace("\n", "")


def test_extract_reports_dataset_warnings_in_json(cli, image_tree, cache):
    (image_tree / "empty_class").mkdir()
    (image_tree / "red" / "notes.txt").write_text("x")
    summary = extract_json(cli, image_tree, cache)
    assert summary["dataset"]["ignored_files"] == 1
    assert any("empty_class" in w for w in summary["dataset"]["warnings"])


# ---- backbones -----------------------------------------------------------------------------


def test_backbones_json(cli):
    entries = json.loads(cli("backbones", "--json").stdout)
    names = [entry["name"] for entry in entries]
    assert len(entries) >= 17 and len(set(names)) == len(names)
    assert {"efficientnet_lite0", "vgg16", "resnet50", "convnext_tiny"} <= set(names)
    vgg = next(e for e in entries if e["name"] == "vgg16")
    assert (vgg["input_size"], vgg["feature_dim"], vgg["preprocess"]) == (224, 512, "caffe")
    lite = next(e for e in entries if e["name"] == "efficientnet_lite0")
    assert (lite["input_size"], lite["feature_dim"], lite["resize"]) == (224, 1280, "center_crop")


def test_backbones_table(cli):
    out = cli("backbones").stdout
    assert "vgg16" in out and "resnet50" in out and "caffe" in out


# ---- cache ---------------------------------------------------------------------------------


def test_cache_ls_json(cli, image_tree, cache):
    assert json.loads(cli("cache", "ls", "--cache-dir", cache, "--json").stdout) == []
    extract_json(cli, image_tree, cache, "--augment", "2")
    rows = json.loads(cli("cache", "ls", "--cache-dir", cache, "--json").stdout)
    by_kind = {row["rows_of"]: row for row in rows}
    assert set(by_kind) == {"images", "views"}
    images, views = by_kind["images"], by_kind["views"]
    assert (images["backbone"], images["rows"], images["feature_dim"]) == ("tiny", 24, 24)
    assert (views["backbone"], views["rows"], views["image_size"]) == ("tiny", 48, 32)
    assert images["fingerprint"] == open_stores(TINY, cache).originals.fingerprint
    assert images["augment"] is None and views["augment"] is not None and images["resize"] == views["resize"]


def test_cache_verify_detects_tampering_and_repairs(cli, image_tree, cache):
    extract_json(cli, image_tree, cache, "--batch-size", "8")
    ok = cli("cache", "verify", "--cache-dir", cache)
    assert "1 store(s) checked: ok" in ok.stdout
    shard = sorted((cache / "features").glob("*/shards/*.h5"))[1]
    with h5py.File(shard, "r+") as handle:
        handle["features"][3, 5] = handle["features"][3, 5] * 2 + 1
    bad = cli("cache", "verify", "--cache-dir", cache, expect=1)
    assert "damaged:" in bad.stderr and shard.name in bad.stderr.replace("\n", "")
    assert "--repair" in bad.stderr
    assert shard.exists()
    fixed = cli("cache", "verify", "--repair", "--cache-dir", cache)
    assert "1 store(s) checked: repaired" in fixed.stdout
    assert not shard.exists()
    assert "checked: ok" in cli("cache", "verify", "--cache-dir", cache).stdout
    resumed = extract_json(cli, image_tree, cache)
    assert (resumed["extracted"], resumed["reused"]) == (8, 16)


def test_cache_gc(cli, image_tree, cache):
    extract_json(cli, image_tree, cache)
    store_dir = open_stores(TINY, cache).originals.directory
    kept = cli("cache", "gc", "--cache-dir", cache)
    assert "removed 0 store(s), 0 row(s), 0 stale dataset reference(s)" in kept.stdout
    (image_tree / "red" / "red0.png").unlink()
    extract_json(cli, image_tree, cache)                      # refreshes the dataset's reference
    pruned = cli("cache", "gc", "--cache-dir", cache)
    assert "removed 0 store(s), 1 row(s)" in pruned.stdout
    shutil.rmtree(image_tree)
    dry = cli("cache", "gc", "--dry-run", "--cache-dir", cache)
    assert "would remove 1 store(s), 0 row(s), 1 stale dataset reference(s)" in dry.stdout
    assert store_dir.exists()
    gone = cli("cache", "gc", "--cache-dir", cache)
    assert "removed 1 store(s)" in gone.stdout
    assert not store_dir.exists()
    assert json.loads(cli("cache", "ls", "--cache-dir", cache, "--json").stdout) == []


def test_cache_commands_on_a_damaged_store_fail_without_traceback(cli, image_tree, cache):
    extract_json(cli, image_tree, cache)
    shard = sorted((cache / "features").glob("*/shards/*.h5"))[0]
    shard.write_bytes(b"\0garbage")
    assert_one_line_error(cli("cache", "ls", "--cache-dir", cache, expect=None), "cache verify --repair")
    assert_one_line_error(cli("cache", "gc", "--cache-dir", cache, expect=None), "cache verify --repair")
    assert_one_line_error(cli("extract", image_tree, *TINY_ARGS, "--cache-dir", cache, expect=None),
                          "cache verify --repair")
    (next((cache / "features").iterdir()) / "spec.json").write_text("{")
    # A spec that cannot be rebuilt (its only shard is garbage too) is reported like a damaged shard,
    # without stopping verify of the other stores (issue 12).
    verify = cli("cache", "verify", "--cache-dir", cache, expect=None)
    assert verify.exit_code == 1 and "Traceback" not in verify.stdout + verify.stderr
    assert "spec.json is damaged" in verify.stderr and "cache verify --repair" in verify.stderr


# ---- features export -----------------------------------------------------------------------


def _store_table(image_tree, cache):
    features = dataset_features(scan(image_tree, cache_dir=cache), open_stores(TINY, cache))
    return features.frame.set_index("path"), features.X


@pytest.mark.parametrize("suffix", [".parquet", ".npz", ".csv"])
def test_features_export_round_trips(cli, image_tree, cache, tmp_path, suffix):
    out = tmp_path / "out" / f"feats{suffix}"
    result = cli("features", "export", image_tree, "--out", out, *TINY_ARGS, "--cache-dir", cache)
    assert f"wrote 24 rows x 24 features to {out}" in result.stdout.replace("\n", "")
    frame, X = _store_table(image_tree, cache)
    expected = dict(zip(frame.index, X))
    if suffix == ".npz":
        with np.load(out) as npz:
            paths, labels, features = list(npz["path"]), list(npz["label"]), npz["features"]
            assert set(npz.files) == {"features", "path", "label", "split", "group", "hash"}
            assert list(npz["hash"]) == [frame.loc[p, "hash"] for p in paths]
    else:
        table = pd.read_parquet(out) if suffix == ".parquet" else pd.read_csv(out)
        assert list(table.columns[:5]) == ["path", "label", "split", "group", "hash"]
        paths, labels = table["path"].tolist(), table["label"].tolist()
        if suffix == ".parquet":   # one fixed-size-list column, as the .npz's `features` matrix
            assert list(table.columns[5:]) == ["features"]
            features = np.stack(table["features"].to_numpy())
        else:
            assert list(table.columns[5:]) == [f"f{i}" for i in range(24)]
            features = table[[f"f{i}" for i in range(24)]].to_numpy()
        assert table["hash"].tolist() == [frame.loc[p, "hash"] for p in paths]
    assert sorted(paths) == sorted(expected) and len(paths) == 24
    assert labels == [frame.loc[p, "label"] for p in paths]
    got = np.asarray(features)
    want = np.stack([expected[p] for p in paths])
    if suffix == ".csv":
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    else:
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)


def test_features_export_unknown_format(cli, image_tree, cache, tmp_path):
    result = cli("features", "export", image_tree, "--out", tmp_path / "feats.xlsx", *TINY_ARGS,
                 "--cache-dir", cache, expect=None)
    assert_one_line_error(result, "unknown export format .xlsx")


# ---- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("args, phrase", [
    (["--backbone", "resnet9000"], "unknown backbone 'resnet9000'"),
    (["--backbone", "tiny", "--weights", "random", "--pooling", "foo"], "pooling must be one of avg, max, flatten"),
    (["--backbone", "tiny", "--weights", "random", "--image-size", "8"], "at least 16 px"),
    (["--backbone", "tiny", "--weights", "/no/such/weights.h5"], "/no/such/weights.h5 does not exist"),
])
def test_bad_options_give_one_line_errors(cli, image_tree, cache, args, phrase):
    result = cli("extract", image_tree, *args, "--cache-dir", cache, expect=None)
    assert_one_line_error(result, phrase)
    assert not (cache / "features").exists() or not any((cache / "features").iterdir())


def test_missing_data_dir_gives_a_one_line_error(cli, tmp_path, cache):
    missing = tmp_path / "a_rather_long_folder_name_that_does_not_exist" / "with" / "some" / "more" / "levels"
    result = cli("extract", missing, *TINY_ARGS, "--cache-dir", cache, expect=None)
    assert_one_line_error(result, f"{missing} does not exist")


def test_typer_rejects_malformed_numbers(cli, image_tree, cache):
    result = cli("extract", image_tree, *TINY_ARGS, "--batch-size", "lots", "--cache-dir", cache, expect=None)
    assert result.exit_code == 2 and "Traceback" not in result.stdout + result.stderr


# ---- finetune ------------------------------------------------------------------------------


def test_finetune_says_which_model_it_kept_and_reuses_on_rerun(cli, image_tree, cache, tmp_path):
    cli("evaluate", image_tree, *TINY_ARGS, "--cache-dir", cache, "--heads", "logreg", "--folds", "2",
        "--run-dir", tmp_path / "run", "--json")
    args = ["finetune", tmp_path / "run", "--epochs", "1", "--batch-size", "8"]
    first = cli(*args)
    assert "kept the frozen head" in first.stdout + first.stderr and "s/epoch" in first.stdout
    # The cost is said before training (on stderr, no bar in a pipe), the winner after it.
    assert "note: fine-tuning" in first.stderr and "expected about" in first.stderr and "on the CPU" in first.stderr
    said = " ".join(first.stdout.split())           # the console folds long lines
    assert "fine-tuned model" in said and "95% paired interval" in said and "the run's model is the frozen head" in said
    again = json.loads(cli(*args, "--json").stdout)
    assert again["reused"] and again["kept"] == "frozen" and again["epochs_run"] == 1
    distilled = json.loads(cli(*args, "--distill-alpha", "0.5", "--json").stdout)
    assert not distilled["reused"] and distilled["student"]["distill_alpha"] == 0.5
    assert distilled["student"]["folds"] >= 2 and distilled["estimate"]["gpu"] is False
    assert_one_line_error(cli(*args, "--optimizer", "rmsprop", expect=None), "unknown optimizer 'rmsprop'")
    assert_one_line_error(cli(*args, "--finetune-folds", "1", expect=None), "--finetune-folds must be 0 (off) or 2")
    folded = cli(*args, "--finetune-folds", "2")
    said = " ".join(folded.stdout.split())
    assert "over 2 folds" in said and "fold 1 of 2" in folded.stderr and "fold 2 of 2" in folded.stderr


# ---- run: the anytime search ------------------------------------------------------------------

RUN_TWO_SETS = ["--backbone", "tiny,tiny2", "--weights", "random", "--resize", "squash", "--heads", "logreg",
                "--folds", "3", "--no-inspect", "--jobs", "1"]


def test_run_prints_each_stage_and_ctrl_c_in_a_later_stage_exits_130_keeping_the_run(cli, image_tree, cache, tmp_path,
                                                                                     monkeypatch):
    from featurepipe import pipeline

    calls = []
    real = pipeline._extract_group

    def extract_then_stop(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:   # Ctrl-C while stage 2 extracts
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_extract_group", extract_then_stop)
    run = tmp_path / "run"
    result = cli("run", image_tree, *RUN_TWO_SETS, "--budget", "0", "--cache-dir", cache, "--run-dir", run, expect=130)
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("search: tiny/squash: nested ") and "next: 1 more feature set, ~" in lines[0]
    assert lines[-1].startswith("interrupted: stopped; the 1 finished feature set(s) of 2 and their result are kept "
                                f"in {run}") and "again continues" in lines[-1]
    board = cli("predict", run, image_tree / "red", "--json")
    assert [row["label"] for row in json.loads(board.stdout)["predictions"]] == ["red"] * 8
    # Running it again continues: stage 1 is cached (no extraction), stage 2 extracts tiny2 only.
    monkeypatch.setattr(pipeline, "_extract_group", real)
    again = json.loads(cli("run", image_tree, *RUN_TWO_SETS, "--budget", "0", "--cache-dir", cache, "--run-dir", run,
                           "--json").stdout)
    stages = again["search_progress"]["stages"]
    assert [s["added"] for s in stages] == [["tiny/squash"], ["tiny2/squash"]]
    assert [s["extracted"] for s in stages] == [0, 24] and again["search_progress"]["budget"] is None


def test_run_budget_is_checked_and_what_it_leaves_out_is_said(cli, image_tree, cache, tmp_path):
    assert "--budget" in cli("run", image_tree, "--budget", "-1", expect=2).stderr
    result = cli("run", image_tree, *RUN_TWO_SETS, "--budget", "0.001", "--cache-dir", cache, "--run-dir",
                 tmp_path / "run")
    assert "search done, 1 left out by --budget 0.001 s" in result.stderr
    assert "note: --budget 0.001 s: 1 of 2 feature sets not searched (tiny2/squash)" in result.stderr
    assert "features: 24 images: 24 extracted, 0 reused;" in result.stdout   # one feature set searched, not two
