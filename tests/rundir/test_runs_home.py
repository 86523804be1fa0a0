"""Runs have a stable home (issue 23, point 6): DATA's latest run, re-runs that change nothing reuse
it, `predict DATA`, `cache gc --runs KEEP`, and a project copied with its cache uses its own cache."""

import json
import os
import shutil
import time


from featurepipe import pipeline
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.deploy.predict import predict
from featurepipe.evaluation.config import SearchConfig
from featurepipe.rundir.folder import latest_pointer, latest_pointers, run_cache_root
from tests.conftest import COLOURS, make_image
from tests.cli.test_cli import cli  # noqa: F401  (the fixture: the CLI in-process, its exit code checked)

TINY = BackboneSpec(name="tiny", weights="random", image_size=32)


def _run(data, cache, run_dir=None):
    return pipeline.run(data, SearchConfig(specs=(TINY,), heads=("logreg",), folds=2), cache, run_dir=run_dir,
                        n_jobs=1, inspect=False, thumbnails=0)


def _runs(cache):
    return sorted(p.name for p in (cache / "runs").iterdir() if p.is_dir())


def test_a_rerun_with_nothing_changed_reuses_the_latest_run_and_a_change_makes_a_new_one(image_tree, cache):
    first = _run(image_tree, cache)
    pointer = latest_pointer(cache.resolve(), image_tree)
    assert pointer.parent == (cache / "runs").resolve() and pointer.name.startswith("latest-data-")
    assert json.loads(pointer.read_text())["run"] == first.run_dir.name

    second = _run(image_tree, cache)
    assert second.run_dir == first.run_dir and _runs(cache) == [first.run_dir.name]
    assert any(n.startswith(f"reused run {first.run_dir}") for n in second.evaluate.notes)
    assert predict(second.run_dir, [image_tree / "red"]).failed == 0

    make_image(image_tree / "blue" / "blue_extra.png", COLOURS["blue"], seed=777)
    third = _run(image_tree, cache)
    assert third.run_dir != first.run_dir and len(_runs(cache)) == 2
    assert json.loads(pointer.read_text())["run"] == third.run_dir.name
    assert not any(n.startswith("reused run") for n in third.evaluate.notes)


def test_an_explicit_run_dir_is_never_replaced_by_the_latest_run(image_tree, cache, tmp_path):
    first = _run(image_tree, cache)
    mine = _run(image_tree, cache, tmp_path / "mine")
    assert mine.run_dir == tmp_path / "mine" and first.run_dir != mine.run_dir
    # --run-dir does not move the latest pointer
    assert json.loads(latest_pointer(cache.resolve(), image_tree).read_text())["run"] == first.run_dir.name


def test_predict_export_report_take_data_for_its_latest_run(image_tree, cache, cli, tmp_path, monkeypatch):
    run = _run(image_tree, cache)
    result = cli("predict", image_tree, image_tree / "red", "--cache-dir", cache, "--json")
    payload = json.loads(result.stdout)
    assert payload["run_dir"] == str(run.run_dir) and payload["images"] == 8 and payload["failed"] == 0
    assert f"using {run.run_dir}, the latest run of {image_tree}" in " ".join(result.stderr.split())
    exported = cli("export", image_tree, "--out", tmp_path / "exported", "--cache-dir", cache, "--json")
    assert (tmp_path / "exported" / "labels.txt").exists() and "the latest run of" in exported.stderr
    # report has no --cache-dir: DATA is looked up in $FEATUREPIPE_CACHE (else ./cache)
    monkeypatch.setenv("FEATUREPIPE_CACHE", str(cache))
    report = cli("report", image_tree, "--json")
    assert json.loads(report.stdout)["html"] == str(run.run_dir / "report.html")

    other = tmp_path / "other"
    make_image(other / "a" / "a0.png", COLOURS["red"], seed=1)
    missing = cli("predict", other, image_tree / "red", "--cache-dir", cache, expect=1)
    message = " ".join(missing.stderr.split())
    assert "no run of it was found" in message and run.run_dir.name in message and "featurepipe run" in message


def test_cache_gc_runs_keeps_the_newest_of_each_dataset_and_every_latest(image_tree, cache, cli, tmp_path):
    run = _run(image_tree, cache)
    outside = _run(image_tree, cache, tmp_path / "mine")
    runs = cache / "runs"
    old = []
    for i, age in enumerate((3000, 2000)):   # two older copies of the run, as earlier re-runs left them
        copy = runs / f"20200101-00000{i}-data-tiny"
        shutil.copytree(run.run_dir, copy)
        os.utime(copy / "config.json", (time.time() - age, time.time() - age))
        old.append(copy)
    # the latest run is the oldest by mtime here: --runs 0 still keeps it, because the pointer names it
    os.utime(run.run_dir / "config.json", (time.time() - 9000, time.time() - 9000))

    dry = cli("cache", "gc", "--runs", "0", "--dry-run", "--cache-dir", cache, "--json")
    listed = json.loads(dry.stdout)
    assert sorted(listed["runs_removed"]) == sorted(str(p) for p in old) and listed["dry_run"] is True
    assert all(p.exists() for p in old)

    text = cli("cache", "gc", "--runs", "1", "--dry-run", "--cache-dir", cache).stdout
    assert f"would remove run {old[0]}" in " ".join(text.split()) and str(old[1]) not in text

    cli("cache", "gc", "--runs", "0", "--cache-dir", cache)
    assert _runs(cache) == [run.run_dir.name]
    assert outside.run_dir.exists() and set(latest_pointers(cache.resolve()).values()) == {run.run_dir}
    cli("cache", "gc", "--runs", "-1", "--cache-dir", cache, expect=2)


def test_a_copied_project_uses_its_own_cache(tmp_path, cli):
    project = tmp_path / "project"
    data, cache = project / "data", project / "cache"
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(8):
            make_image(data / name / f"{name}{i}.png", colour, seed=100 * c + i)
    run = _run(data, cache)
    copy = tmp_path / "copy"
    shutil.copytree(project, copy)
    # the original's cache loses its features: a copy that read it would extract again
    shutil.rmtree(cache / "features")
    copied_run = copy / "cache" / "runs" / run.run_dir.name
    result = predict(copied_run, [copy / "data" / "red"])
    assert (result.reused, result.computed, result.failed) == (8, 0, 0)
    assert not (cache / "features").exists()

    out = cli("predict", copied_run, copy / "data" / "red", "--json")
    note = " ".join(out.stderr.split())
    assert f"was made with the cache {cache.resolve()}" in note and str((copy / "cache").resolve()) in note
    assert not (cache / "features").exists()
    # DATA of the copy finds the copy's run in the copy's cache
    found = cli("predict", copy / "data", copy / "data" / "red", "--cache-dir", copy / "cache", "--json")
    assert f"using {copied_run}" in " ".join(found.stderr.split())
    # and a re-run of the copy with nothing changed reuses the copy's run, in the copy's cache
    again = _run(copy / "data", copy / "cache")
    assert again.run_dir == copied_run and not (cache / "features").exists()


def test_a_run_outside_any_cache_warns_when_its_recorded_cache_is_gone(tmp_path):
    recorded = tmp_path / "gone" / "cache"
    used, warning = run_cache_root(tmp_path / "myrun", str(recorded))
    assert used == str(recorded) and str(recorded) in warning and "--cache-dir" in warning
    assert run_cache_root(tmp_path / "myrun", str(recorded), override=tmp_path / "c") == (tmp_path / "c", None)


def test_a_run_outside_any_cache_warns_when_the_cache_here_is_another(tmp_path, monkeypatch):
    recorded, here = tmp_path / "original" / "cache", tmp_path / "here" / "cache"
    for root in (recorded, here):
        root.mkdir(parents=True)
        (root / ".featurepipe-cache").write_text("")
    monkeypatch.setenv("FEATUREPIPE_CACHE", str(here))
    used, warning = run_cache_root(tmp_path / "myrun", str(recorded))
    assert used == str(recorded) and str(recorded) in warning and f"--cache-dir {here}" in warning
    # a run in the runs/ of the cache it records: nothing to say
    assert run_cache_root(recorded / "runs" / "r", str(recorded)) == (str(recorded), None)


def test_the_cli_says_which_run_it_reused(image_tree, cache, cli):
    args = ["run", image_tree, "--backbone", "tiny", "--weights", "random", "--image-size", "32", "--heads", "logreg",
            "--no-inspect", "--cache-dir", cache]
    first = cli(*args)
    second = cli(*args)
    assert len(_runs(cache)) == 1
    assert f"reused run {cache.resolve() / 'runs' / _runs(cache)[0]}" in " ".join((second.stdout + second.stderr).split())
    assert "reused run" not in first.stdout + first.stderr
