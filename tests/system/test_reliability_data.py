"""Data and the files users read, under the third adversarial probe (issue 24): symlinks out of a
dataset, the default cache inside the dataset it scans, line breaks and formulas in names written
to CSVs, labels that differ only by Unicode normalisation or case, a class whose every file fails,
and near-duplicate grouping blamed as the user's "groups". The medium items go through the real
CLI in a child process; the low ones in-process."""

import csv
import json
import os
import subprocess
import sys
import textwrap
import unicodedata
from pathlib import Path

import pandas as pd
import pytest

from featurepipe.backbones.spec import BackboneSpec
from featurepipe.core.errors import DatasetError
from featurepipe.data.dataset import scan
from featurepipe.data.edits import apply_fixes
from featurepipe.evaluation.config import SearchConfig
from featurepipe.evaluation.evaluate import evaluate
from tests.conftest import COLOURS, REPO, make_image

TINY = BackboneSpec(name="tiny", weights="random", image_size=32)
TINY_ARGS = ["--backbone", "tiny", "--weights", "random", "--image-size", "32"]
CHILD_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
CHILD_ENV.pop("FEATUREPIPE_CACHE", None)

# The CLI in a child process that records every open() of a path resolving to $WATCHED (a file that
# a refused symlink points at) in $OPENED: a refused link's target must never be opened.
CHILD = textwrap.dedent("""
    import builtins, io, os
    import tests.tiny_backbone

    watched = {os.path.realpath(p) for p in os.environ.get("WATCHED", "").split(os.pathsep) if p}
    log = os.environ.get("OPENED")

    def note(path):
        try:
            if log and isinstance(path, (str, bytes, os.PathLike)) and os.path.realpath(path) in watched:
                with real_open(log, "a") as handle:
                    handle.write(os.fspath(path) + "\\n")
        except (OSError, TypeError, ValueError):
            pass

    real_open, real_os_open = builtins.open, os.open

    def open_(file, *args, **kwargs):
        note(file)
        return real_open(file, *args, **kwargs)

    def os_open(path, *args, **kwargs):
        note(path)
        return real_os_open(path, *args, **kwargs)

    builtins.open = io.open = open_
    os.open = os_open
    from featurepipe.cli import main
    main()
""")


def _cli(*args, cwd=REPO, env=None, timeout=300):
    return subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], env={**CHILD_ENV, **(env or {})},
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _photos(root: Path, classes=("red", "blue"), n=4, seed=0) -> Path:
    for c, name in enumerate(classes):
        for i in range(n):
            make_image(root / name / f"{name}{i}.png", list(COLOURS.values())[c % 3], seed=seed + 100 * c + i)
    return root


# ---- MEDIUM 5: symlinks out of a manifest's folder, or out of DATA --------------------------------

def _private(tmp_path: Path) -> Path:
    return make_image(tmp_path / "private" / "holiday.png", COLOURS["green"], seed=999)


def test_a_manifest_row_that_links_outside_its_folder_is_refused_and_never_opened(tmp_path):
    data, secret = _photos(tmp_path / "data" / "imgs"), _private(tmp_path)
    (data / "red" / "innocent.png").symlink_to(secret)
    rows = [f"imgs/{c}/{c}{i}.png,{c}" for c in ("red", "blue") for i in range(4)] + ["imgs/red/innocent.png,red"]
    manifest = tmp_path / "data" / "manifest.csv"
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n")
    opened, cache = tmp_path / "opened.log", tmp_path / "cache"

    refused = _cli("extract", manifest, *TINY_ARGS, "--cache-dir", cache,
                   env={"WATCHED": str(secret), "OPENED": str(opened)})
    assert refused.returncode == 1, refused.stderr[-2000:]   # a refused dataset: a data failure
    message = refused.stderr
    assert "innocent.png" in message and str(secret) in message and "--allow-outside-root" in message
    assert not opened.exists(), opened.read_text()                # the target was never opened
    assert not (cache / "features").exists() or not any((cache / "features").rglob("*.h5"))

    allowed = _cli("--allow-outside-root", "extract", manifest, *TINY_ARGS, "--cache-dir", cache, "--json")
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert json.loads(allowed.stdout)["dataset"]["images"] == 9


def test_a_manifest_row_linking_to_a_system_file_is_refused(tmp_path):
    data = _photos(tmp_path / "data")
    (data / "red" / "shadow.png").symlink_to("/etc/passwd")
    manifest = tmp_path / "data" / "m.csv"
    manifest.write_text("path,label\n" + "".join(f"{c}/{c}{i}.png,{c}\n" for c in ("red", "blue") for i in range(4))
                        + "red/shadow.png,red\n")
    refused = _cli("extract", manifest, *TINY_ARGS, "--cache-dir", tmp_path / "cache",
                   env={"WATCHED": "/etc/passwd", "OPENED": str(tmp_path / "opened.log")})
    assert refused.returncode == 1, refused.stderr[-2000:]   # a refused dataset: a data failure
    assert "m.csv:10" in refused.stderr and "/etc/passwd" in refused.stderr
    assert not (tmp_path / "opened.log").exists()


def test_a_folder_dataset_does_not_follow_links_out_of_data(tmp_path):
    data, secret = _photos(tmp_path / "data"), _private(tmp_path)
    (data / "red" / "innocent.png").symlink_to(secret)
    opened = tmp_path / "opened.log"
    refused = _cli("extract", data, *TINY_ARGS, "--cache-dir", tmp_path / "cache",
                   env={"WATCHED": str(secret), "OPENED": str(opened)})
    assert refused.returncode == 1, refused.stderr[-2000:]   # a refused dataset: a data failure
    assert "innocent.png" in refused.stderr and str(secret) in refused.stderr
    assert "--allow-outside-root" in refused.stderr
    assert not opened.exists()
    allowed = _cli("--allow-outside-root", "extract", data, *TINY_ARGS, "--cache-dir", tmp_path / "cache", "--json")
    assert allowed.returncode == 0 and json.loads(allowed.stdout)["dataset"]["images"] == 9


def test_a_linked_class_folder_outside_data_is_refused_but_links_inside_data_are_fine(tmp_path):
    data = _photos(tmp_path / "data")
    elsewhere = _photos(tmp_path / "elsewhere", classes=("green",), seed=50)
    (data / "green").symlink_to(elsewhere / "green", target_is_directory=True)
    with pytest.raises(DatasetError, match=r"green.*elsewhere.*--allow-outside-root"):
        scan(data)
    assert sorted(scan(data, allow_outside_root=True).classes) == ["blue", "green", "red"]
    (data / "green").unlink()
    (data / "red" / "again.png").symlink_to(data / "blue" / "blue0.png")      # inside DATA: followed
    assert len(scan(data)) == 9


# ---- MEDIUM 9: `cd DATA && featurepipe run .` -----------------------------------------------------

@pytest.mark.slow
def test_the_default_cache_inside_the_dataset_is_never_scanned_as_a_class(tmp_path):
    data = _photos(tmp_path / "data", classes=("red", "green", "blue"), n=4)
    first = _cli("run", ".", *TINY_ARGS, "--heads", "knn", "--folds", "2", "--no-inspect", "--json", cwd=data)
    assert first.returncode == 0, first.stderr[-3000:]
    assert any((data / "cache").rglob("*.png"))          # the cache now holds featurepipe's own charts
    again = _cli("extract", ".", *TINY_ARGS, "--json", cwd=data)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["dataset"]["images"] == 12
    said = json.dumps(json.loads(again.stdout)["dataset"])                  # said, not silent
    assert "featurepipe's cache" in said and "--cache-dir" in said
    second = _cli("run", ".", *TINY_ARGS, "--heads", "knn", "--folds", "2", "--no-inspect", "--json", cwd=data)
    assert second.returncode == 0, second.stderr[-3000:]
    run_dir = Path(json.loads(second.stdout)["run_dir"])
    assert json.loads((run_dir / "config.json").read_text())["dataset"]["classes"] == ["blue", "green", "red"]


def test_a_cache_anywhere_inside_data_is_skipped_by_its_marker(tmp_path):
    from featurepipe.core.cachedirs import cache_root

    data = _photos(tmp_path / "data" / "train")
    _photos(tmp_path / "data" / "test", n=2)
    cache = cache_root(data / "red" / "cache")           # --cache-dir inside a class folder
    make_image(cache / "report-charts" / "chart.png", COLOURS["green"], seed=7)
    make_image(tmp_path / "data" / "cache" / "x.png", COLOURS["green"], seed=8)
    cache_root(tmp_path / "data" / "cache")              # beside the split folders: not a split, not a class
    dataset = scan(tmp_path / "data")
    assert dataset.layout == "splits" and len(dataset) == 12 and dataset.classes == ["blue", "red"]
    assert sum("featurepipe's cache" in w for w in dataset.warnings) == 2


# ---- LOW: line breaks and formulas in names; CSV round trips ---------------------------------------

@pytest.mark.parametrize("name", ["bad\nname", "bad\rname", "tab\tname"])
def test_a_class_name_with_a_line_break_is_refused_at_scan(tmp_path, name):
    data = _photos(tmp_path / "data", classes=("red", name))
    with pytest.raises(DatasetError, match=r"control character.*rename"):
        scan(data)


def test_a_manifest_label_with_a_line_break_is_refused_naming_the_line(tmp_path):
    data = _photos(tmp_path / "data")
    manifest = tmp_path / "data" / "m.csv"
    manifest.write_text('path,label\nred/red0.png,red\nred/red1.png,red\nblue/blue0.png,"blue\r\nx"\n'
                        'blue/blue1.png,"blue\r\nx"\n', newline="")
    with pytest.raises(DatasetError, match=r"m.csv:[45]: .*control character"):
        scan(manifest)


@pytest.mark.slow
def test_formulas_and_line_breaks_in_names_are_neutralised_and_read_back(tmp_path, monkeypatch):
    from featurepipe.deploy.predict import predict
    from featurepipe.inspection.inspect import inspect_dataset, oof_from_run
    from featurepipe.report.context import read_csv

    data = _photos(tmp_path / "data", classes=("red", "@green", "blue"), n=4)
    for name, seed in (("=HYPERLINK(\"http://x\",\"y\").png", 1), ("+cmd|' calc'!A0.png", 2), ("a\rb.png", 3)):
        make_image(data / "red" / name, COLOURS["red"], seed=seed)
    cache = tmp_path / "cache"
    dataset = scan(data, cache_dir=cache)
    evaluate(dataset, SearchConfig(specs=(TINY,), heads=("knn",), folds=2, nested=False), cache, n_jobs=1,
             run_dir=tmp_path / "run")
    oof_path = tmp_path / "run" / "oof_predictions.csv"
    with open(oof_path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    assert all(len(row) == len(header) for row in body)      # the \r did not split a row
    assert len(body) % len(dataset) == 0
    assert not [cell for row in body for cell in row if cell[:1] in ("=", "+", "-", "@")]
    assert any(cell.endswith("a\rb.png") for row in body for cell in row)
    assert set(read_csv(oof_path)["true"]) == {"red", "@green", "blue"}     # the report reads the labels back

    inspect_dataset(dataset, TINY, cache, out_dir=tmp_path / "insp", folds=2, n_jobs=1,
                    oof_source=oof_from_run(tmp_path / "run"))
    scores = tmp_path / "insp" / "label_scores.csv"
    raw = scores.read_text(encoding="utf-8")
    assert "'@green" in raw and ",@green" not in raw
    relabelled = apply_fixes(dataset, relabel=scores)         # every path and label matches after the trip
    assert relabelled.edits["relabel"]["listed"] == len(dataset)
    with open(scores, newline="", encoding="utf-8") as handle:
        lines = list(csv.reader(handle))
    exclude = tmp_path / "exclude.csv"
    with open(exclude, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([lines[0][:1]] + [row[:1] for row in lines[1:] if "HYPERLINK" in row[0]
                                                   or "@green" in row[lines[0].index("given")]][:3])
    assert len(apply_fixes(dataset, exclude=exclude)) == len(dataset) - 3

    monkeypatch.chdir(data / "red")
    out = predict(tmp_path / "run", ["=HYPERLINK(\"http://x\",\"y\").png", "a\rb.png"], top_k=1).save(tmp_path / "p.csv")
    with open(out, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert len(rows) == 3 and rows[1][0].startswith("'=HYPERLINK") and rows[2][0] == "a\rb.png"


# ---- LOW: labels equal but for Unicode normalisation or case ---------------------------------------

def test_labels_that_differ_only_by_unicode_normalisation_are_an_error_naming_both(tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    data = _photos(tmp_path / "data", classes=("red", nfc, nfd))
    with pytest.raises(DatasetError) as error:
        scan(data)
    assert str(data / nfc) in str(error.value) and str(data / nfd) in str(error.value)
    assert "normalis" in str(error.value) and "rename" in str(error.value)


def test_labels_that_differ_only_by_case_are_warned_about(tmp_path):
    data = _photos(tmp_path / "data", classes=("Cat", "cat", "dog"))
    dataset = scan(data)
    assert dataset.classes == ["Cat", "cat", "dog"]           # kept apart (EMNIST-like letters are real classes)
    [warning] = [w for w in dataset.warnings if "case" in w]
    assert str(data / "Cat") in warning and str(data / "cat") in warning


# ---- LOW: a class whose every file fails; near-duplicate groups the user never set -----------------

def test_a_class_whose_files_all_fail_names_the_files_and_why(tmp_path):
    data = _photos(tmp_path / "data", classes=("red", "blue"))
    for i in range(3):
        (data / "green").mkdir(exist_ok=True)
        (data / "green" / f"green{i}.png").write_bytes(b"not a png at all %d" % i)
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError) as error:
        evaluate(scan(data, cache_dir=cache), SearchConfig(specs=(TINY,), heads=("knn",), nested=False), cache,
                 n_jobs=1, run_dir=tmp_path / "run")
    message = str(error.value)
    assert "'green'" in message and "green0.png" in message and "only 0" not in message
    assert "the file contains text" in message                               # the reason, not just a count


def test_near_duplicate_grouping_is_named_not_blamed_on_the_users_groups(tmp_path):
    data = _photos(tmp_path / "data", classes=("red", "blue", "green"), n=2)
    (data / "green" / "green1.png").write_bytes((data / "green" / "green0.png").read_bytes())   # a copy
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError) as error:
        evaluate(scan(data, cache_dir=cache), SearchConfig(specs=(TINY,), heads=("knn",), nested=False), cache,
                 n_jobs=1, run_dir=tmp_path / "run")
    message = str(error.value)
    assert "near-duplicate" in message and "--no-dedup-groups" in message and "'green'" in message
    with_off = evaluate(scan(data, cache_dir=cache), SearchConfig(specs=(TINY,), heads=("knn",), nested=False,
                                                                  dedup_groups=False),
                        cache, n_jobs=1, run_dir=tmp_path / "run2")
    assert with_off.folds == 2
