"""The run directory under attack (issue 24): its metadata signed with the head, writes confined to
it like reads, a default folder of its own for every run, one fine-tuning at a time, and odd contents
refused with the file named. The medium items go through the real CLI in a child process, with the
tests' tiny backbone, as the reliability suite does."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from featurepipe.core import trust
from featurepipe.core.errors import FeaturepipeError, TrustError
from tests.conftest import COLOURS, REPO, make_image

TINY_ARGS = ["--backbone", "tiny", "--weights", "random", "--image-size", "32"]
CHILD_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
CLI = "import tests.tiny_backbone; from featurepipe.cli import main; main()"


def cli(*args, env=None, code=CLI) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=REPO, env=env or CHILD_ENV,
                          capture_output=True, text=True, timeout=600)


def said(result: subprocess.CompletedProcess) -> str:
    return " ".join((result.stdout + result.stderr).split())


def _photos(root: Path, n: int = 6) -> Path:
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(n):
            make_image(root / name / f"{name}{i}.png", colour, seed=100 * c + i)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One dataset, one cache; a run whose model is one logreg head, and a `run` (vote over three
    resizes, with inspect/ and report/)."""
    base = tmp_path_factory.mktemp("rundir")
    data = _photos(base / "data")
    cache = base / "cache"
    single = cli("evaluate", data, *TINY_ARGS, "--resize", "squash", "--heads", "logreg", "--ensemble", "0",
                 "--no-nested", "--cache-dir", cache, "--run-dir", base / "single")
    assert single.returncode == 0, said(single)
    voted = cli("run", data, *TINY_ARGS, "--heads", "logreg", "--cache-dir", cache, "--run-dir", base / "vote")
    assert voted.returncode == 0, said(voted)
    return {"data": data, "cache": cache, "single": base / "single", "vote": base / "vote"}


@pytest.fixture
def copy_run(runs, tmp_path):
    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(runs[name], target, symlinks=True)
        return target
    return copy


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


# ---- medium 2: the metadata that gives the model its meaning is signed with the head -----------------


def test_swapped_class_names_in_best_head_json_are_refused_unless_trusted(runs, copy_run):
    run = copy_run("single")
    red = runs["data"] / "red"
    before = cli("predict", run, red, "--json")
    assert before.returncode == 0, said(before)

    def swap(meta):
        classes = meta["classes"]
        i, j = classes.index("red"), classes.index("green")
        classes[i], classes[j] = classes[j], classes[i]
    _edit_json(run / "best_head.json", swap)
    refused = cli("predict", run, red)
    assert refused.returncode == 1, said(refused)
    text = said(refused)
    assert "best_head.json" in text and "--trust" in text and "Traceback" not in text
    trusted = cli("predict", run, red, "--trust")      # the user's word overrides, as for an edited head
    assert trusted.returncode == 0, said(trusted)


def test_config_pointing_at_another_cache_is_refused(runs, copy_run, tmp_path):
    run = copy_run("single")
    forged = tmp_path / "forged-cache"
    shutil.copytree(runs["cache"], forged)
    _edit_json(run / "config.json", lambda c: c.update(cache_dir=str(forged)))
    refused = cli("predict", run, runs["data"] / "red")
    assert refused.returncode == 1, said(refused)
    assert "config.json" in said(refused) and "--trust" in said(refused)


def test_a_stripped_signature_is_refused_not_taken_for_an_old_run(runs, copy_run):
    run = copy_run("single")

    def strip(config):
        config.pop("signature", None)
        config.pop("hmac", None)
        config["cache_dir"] = "/somewhere/else"
    _edit_json(run / "config.json", strip)
    refused = cli("predict", run, runs["data"] / "red")
    assert refused.returncode == 1 and "config.json" in said(refused), said(refused)


def test_an_edited_vote_member_list_is_refused(runs, copy_run):
    run = copy_run("vote")
    _edit_json(run / "best_head.json", lambda m: m["members"].reverse())
    refused = cli("predict", run, runs["data"] / "red")
    assert refused.returncode == 1, said(refused)
    assert "best_head.json" in said(refused) and "--trust" in said(refused)


def test_an_edited_model_json_is_refused(runs, copy_run):
    """model.json as fine-tuning publishes it (signed), then one class name swapped."""
    from featurepipe.training.finetune_state import _publish

    run = copy_run("single")
    meta = json.loads((run / "best_head.json").read_text())
    _publish(run, {"kept": "finetuned", "model_json": {
        "kind": "finetuned", "file": "finetune/finetuned.keras", "sha256": "0" * 64, "classes": meta["classes"],
        "image_size": 32, "resize": "squash", "backbone": meta["backbone"], "strategy": "top-blocks"}})
    signed = cli("predict", run, runs["data"] / "red")
    assert "not signed" not in said(signed)           # signed as written: on to the (absent) model file
    _edit_json(run / "model.json", lambda m: m["classes"].reverse())
    refused = cli("predict", run, runs["data"] / "red")
    assert refused.returncode == 1, said(refused)
    assert "model.json" in said(refused) and "not signed" in said(refused)
    # Stripped to look like a run from before signing (model.json predicts without loading the head,
    # so the head's marker is stripped too): still refused, the head carries no old-style signature.
    for name in ("model.json", "best_head.json"):
        _edit_json(run / name, lambda m: [m.pop("signature", None), m.pop("hmac", None) if name == "model.json" else 0])
    stripped = cli("predict", run, runs["data"] / "red")
    assert stripped.returncode == 1 and "model.json" in said(stripped) and "not signed" in said(stripped), \
        said(stripped)


# ---- medium 3: writes are confined to the run like reads ------------------------------------------


def _users_folder(path: Path) -> dict:
    path.mkdir(parents=True)
    for name in ("folds.png", "suspects.csv", "history.csv", "split.json"):
        (path / name).write_text(f"the user's own {name}\n")
    return {p.name: p.read_text() for p in path.iterdir()}


def _link_out(run: Path, name: str, target: Path) -> None:
    shutil.rmtree(run / name, ignore_errors=True)
    (run / name).symlink_to(target, target_is_directory=True)


@pytest.mark.parametrize("folder", ["report", "inspect", "inspect/report"])
def test_report_and_inspect_refuse_a_subfolder_linked_out_of_the_run(runs, copy_run, tmp_path, folder):
    run = copy_run("vote")
    users = tmp_path / "users-folder"
    before = _users_folder(users)
    _link_out(run, folder, users)
    if folder == "report":
        result = cli("report", run)
    else:
        result = cli("inspect", runs["data"], *TINY_ARGS, "--resize", "squash", "--cache-dir", runs["cache"],
                     "--run-dir", run)
    text = said(result)
    assert result.returncode == 1, text
    assert f"{run / folder} is a symbolic link" in text and f"rm {run / folder}" in text and "Traceback" not in text
    assert {p.name: p.read_text() for p in users.iterdir()} == before     # nothing written there


def test_run_refuses_an_inspect_folder_linked_out_and_writes_nothing_there(runs, copy_run, tmp_path):
    run = copy_run("vote")
    users = tmp_path / "users-folder"
    before = _users_folder(users)
    _link_out(run, "inspect", users)
    result = cli("run", runs["data"], *TINY_ARGS, "--heads", "logreg", "--cache-dir", runs["cache"], "--run-dir", run)
    assert result.returncode == 1, said(result)
    assert str(run / "inspect") in said(result)
    assert {p.name: p.read_text() for p in users.iterdir()} == before


def test_finetune_refuses_a_finetune_folder_linked_out_and_clears_nothing_there(copy_run, tmp_path):
    run = copy_run("single")
    users = tmp_path / "users-folder"
    before = _users_folder(users)
    (users / "backup").mkdir()
    _link_out(run, "finetune", users)
    result = cli("finetune", run, "--epochs", "1")
    assert result.returncode == 1, said(result)
    assert str(run / "finetune") in said(result) and "rm " in said(result)
    assert {p.name: p.read_text() for p in users.iterdir() if p.is_file()} == before
    assert (users / "backup").is_dir()


def test_a_file_linked_out_of_a_run_folder_is_refused_before_anything_is_written(copy_run, tmp_path):
    """Keras and the history logger open their files themselves: a link at a file name would be followed."""
    run = copy_run("single")
    users = tmp_path / "users-folder"
    _users_folder(users)
    (run / "finetune").mkdir()
    (run / "finetune" / "history.csv").symlink_to(users / "history.csv")
    with pytest.raises(TrustError, match="history.csv"):
        trust.writable(run, "finetune", folder=True)
    assert (users / "history.csv").read_text() == "the user's own history.csv\n"


def test_vote_members_folder_linked_out_is_refused(copy_run, tmp_path):
    from featurepipe.rundir.run import Run

    run = copy_run("vote")
    users = tmp_path / "users-folder"
    users.mkdir()
    _link_out(run, "members", users)
    with pytest.raises(TrustError, match="members"):
        Run(run).member(0)
    assert list(users.iterdir()) == []


# ---- medium 4: two runs started in the same second ---------------------------------------------------

# The CLI with the clock stopped: every run started in this child believes it is the same second.
SAME_SECOND = textwrap.dedent("""
    import time
    real = time.strftime
    time.strftime = lambda fmt, *a: "20260101-000000" if fmt == "%Y%m%d-%H%M%S" else real(fmt, *a)
    import tests.tiny_backbone
    from featurepipe.cli import main
    main()
""")


def test_two_runs_started_in_the_same_second_get_a_folder_each(runs, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(runs["cache"] / "features", cache / "features")
    args = [sys.executable, "-c", SAME_SECOND, "evaluate", str(runs["data"]), *TINY_ARGS, "--resize", "squash",
            "--heads", "logreg", "--ensemble", "0", "--no-nested", "--cache-dir", str(cache)]
    children = [subprocess.Popen(args + ["--seed", str(seed)], cwd=REPO, env=CHILD_ENV, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for seed in (1, 2)]
    outputs = [child.communicate(timeout=600)[0] for child in children]
    assert [child.returncode for child in children] == [0, 0], outputs
    folders = sorted((cache / "runs").iterdir())
    assert len(folders) == 2, folders
    said_dirs = set()
    for output in outputs:
        line = next(line for line in output.splitlines() if "20260101-000000" in line)
        said_dirs.add(next(str(f) for f in folders if str(f) in " ".join(output.split()) and
                           (str(f) + "-") not in line))
    assert len(said_dirs) == 2
    seeds = sorted(json.loads((f / "config.json").read_text())["seed"] for f in folders)
    assert seeds == [1, 2]          # each run's config is its own; neither replaced the other's


# ---- low: long dataset names, one fine-tuning at a time, resume said, odd contents ---------------------


def test_a_245_byte_dataset_folder_name_gives_a_short_unique_run_folder(tmp_path):
    from featurepipe.rundir.folder import dated_name, new_run_dir

    long_a, long_b = "a" * 240 + "-one", "a" * 240 + "-two"
    first = new_run_dir(tmp_path, tmp_path / long_a, "tiny")
    second = new_run_dir(tmp_path, tmp_path / long_b, "tiny")
    assert first != second and first.is_dir() and second.is_dir()
    assert all(len(p.name.encode()) <= 150 for p in (first, second))
    assert dated_name(long_a, "tiny").endswith("-tiny")


def test_inspect_without_run_dir_takes_a_245_byte_dataset_name(runs, tmp_path):
    data = tmp_path / ("d" * 245)
    shutil.copytree(runs["data"], data)
    result = cli("inspect", data, *TINY_ARGS, "--resize", "squash", "--cache-dir", tmp_path / "cache")
    assert result.returncode == 0, said(result)


def test_a_second_finetune_of_one_run_at_once_is_refused(copy_run):
    import fcntl

    from featurepipe.training.config import FinetuneConfig
    from featurepipe.training.finetune import finetune

    run = copy_run("single")
    (run / "finetune").mkdir()
    with open(run / "finetune" / ".lock", "a+") as held:       # the first fine-tuning, still running
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(FeaturepipeError, match="another `featurepipe finetune` is fine-tuning"):
            finetune(run, FinetuneConfig(epochs=1))
    assert sorted(p.name for p in (run / "finetune").iterdir()) == [".lock"]   # nothing of the first's touched


def test_config_json_that_is_not_an_object_is_named(copy_run):
    run = copy_run("single")
    (run / "config.json").write_text("[1, 2, 3]")
    for args in (("report", run), ("predict", run, run)):
        result = cli(*args)
        assert result.returncode == 1 and "config.json" in said(result) and "Traceback" not in said(result), \
            said(result)


def test_classes_that_are_a_string_are_named_not_split_into_letters(copy_run):
    from featurepipe.rundir.run import Run

    run = copy_run("single")
    _edit_json(run / "best_head.json", lambda m: m.update(classes="blue,green,red"))
    with pytest.raises(FeaturepipeError, match="best_head.json"):
        Run.open(run).model("head", trust=True)


def test_a_non_numeric_accuracy_in_the_leaderboard_is_named(copy_run):
    from featurepipe.report.write import write_report

    run = copy_run("single")
    lines = (run / "leaderboard.csv").read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[1].split(",")
    # The params cell is quoted JSON with commas: replace the accuracy by its column from the right.
    cells[len(cells) - len(header) + header.index("accuracy_mean")] = "lots"
    (run / "leaderboard.csv").write_text("\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n")
    with pytest.raises(FeaturepipeError, match="leaderboard.csv.*accuracy_mean"):
        write_report(run)


def test_a_garbage_folds_csv_is_named(copy_run):
    from featurepipe.report.write import write_report

    run = copy_run("single")
    (run / "folds.csv").write_text("features,head,params,augment\n\x00\x01garbage;;,x,y,z\nnot,a,fold,\n")
    with pytest.raises(FeaturepipeError, match="folds.csv.*accuracy"):
        write_report(run)
    folds = (run / "folds.csv")
    shutil.copyfile(copy_run("vote") / "folds.csv", folds)
    folds.write_text(folds.read_text().replace(",1.0,", ",nonsense,", 1))
    with pytest.raises(FeaturepipeError, match="folds.csv.*nonsense"):
        write_report(run)


@pytest.mark.slow
def test_a_resumed_fine_tuning_says_so_and_matches_an_uninterrupted_one(copy_run, tmp_path):
    """Interrupted at the start of epoch 2, then resumed: the same per-epoch losses as one call that
    ran all three (Keras reshuffled the batch order from the global random state, which no backup
    holds), and the result, summary.json and CLI notes say it was resumed and from which epoch."""
    import keras
    import pandas as pd

    from featurepipe.training.config import FinetuneConfig
    from featurepipe.training.finetune import finetune

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt("simulated Ctrl-C")

    options = dict(epochs=3, batch_size=8, lr=1e-3, seed=0)
    whole = copy_run("single")
    parted = shutil.copytree(whole, tmp_path / "parted")
    finetune(whole, FinetuneConfig(**options))
    with pytest.raises(KeyboardInterrupt):
        finetune(parted, FinetuneConfig(**options), callbacks=[Interrupt()])
    resumed = finetune(parted, FinetuneConfig(resume=True, **options))

    assert resumed.resumed_from_epoch == 2
    assert any("resumed from epoch 2" in note for note in resumed.notes)
    summary = json.loads((parted / "finetune" / "summary.json").read_text())
    assert summary["resumed_from_epoch"] == 2 and any("resumed from epoch 2" in n for n in summary["notes"])
    columns = ["epoch", "loss", "val_loss"]
    a = pd.read_csv(whole / "finetune" / "history.csv")[columns]
    b = pd.read_csv(parted / "finetune" / "history.csv")[columns]
    pd.testing.assert_frame_equal(a, b, rtol=1e-5, atol=1e-7)
