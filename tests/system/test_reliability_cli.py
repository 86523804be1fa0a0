"""The command line under attack, round three: user text that looks like console markup, Ctrl-C
during a distributed extract, and numeric options that make no sense.

- Paths, class names and messages are printed verbatim on every printing path: rich read `[...]` in
  them as markup (a class folder `blue[` with a failed `x].png` crashed the "failed:" line with a
  MarkupError after the work was done; even the error printer crashed on `extract 'nope[/x]'`).
- Ctrl-C stops `extract --workers N` with exit 130, keeps every committed shard, says that a re-run
  resumes, and neither the workers' TensorFlow start-up lines nor their tracebacks reach stderr.
- Every numeric option is range-checked when the command line is parsed: exit 2 and a message that
  names the option and its valid range, before any work.
"""

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from featurepipe.backbones.spec import MAX_IMAGE_SIZE, BackboneSpec
from featurepipe.cli.app import app
from featurepipe.cli.quiet import is_startup_noise
from featurepipe.core.errors import UsageError
from featurepipe.evaluation.config import SearchConfig
from featurepipe.training.config import FinetuneConfig
from tests.conftest import COLOURS, REPO, make_image

TINY_ARGS = ["--backbone", "tiny", "--weights", "random", "--image-size", "32"]
CHILD = "import tests.tiny_backbone; from featurepipe.cli import main; main()"
CHILD_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "",
             "COLUMNS": "400"}


def _cli(*args, timeout=300, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], cwd=cwd, env=CHILD_ENV,
                          capture_output=True, text=True, timeout=timeout)


def _clean(result: subprocess.CompletedProcess) -> None:
    """No traceback, and in particular no MarkupError, whatever the exit code."""
    assert "Traceback" not in result.stderr and "MarkupError" not in result.stderr, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------
# console markup (and emoji codes) in user text


# Markup-laden names: an unclosed tag, a closing tag that closes nothing, a real style tag, an emoji code.
BRACKET_CLASS = "blue["                 # with the file below, the path reads ".../blue[/x].png"
BROKEN_FILE = "x].png"
LABEL_CLOSE = "x[/y]"                  # a manifest label: a folder name cannot hold "/"
LABEL_STYLE = "[bold red]hot[/]"
LABEL_EMOJI = ":red_circle:"


def _markup_dataset(root: Path) -> Path:
    """A manifest with three markup-laden labels; one class folder `blue[` also holds an undecodable `x].png`."""
    rows = []
    folders = {LABEL_CLOSE: BRACKET_CLASS, LABEL_STYLE: "style[b]", LABEL_EMOJI: ":smile:"}
    for c, (label, folder) in enumerate(folders.items()):
        colour = list(COLOURS.values())[c]
        for i in range(4):
            path = make_image(root / folder / f"[i]{i}.png", colour, seed=40 * c + i)
            rows.append((path.relative_to(root).as_posix(), label))
    broken = root / BRACKET_CLASS / BROKEN_FILE
    broken.write_bytes(b"not an image at all")
    rows.append((broken.relative_to(root).as_posix(), LABEL_CLOSE))
    manifest = root / "labels.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return manifest


@pytest.mark.slow
def test_markup_in_paths_labels_and_messages_prints_verbatim_on_every_path(tmp_path):
    data = tmp_path / "d[/x]ata"
    manifest = _markup_dataset(data)
    cache = tmp_path / "c[/c]ache"
    run_dir = tmp_path / "r[/r]un"
    broken = f"{BRACKET_CLASS}/{BROKEN_FILE}"

    # extract: the "failed:" line names blue[/x].png
    extract = _cli("extract", manifest, *TINY_ARGS, "--cache-dir", cache)
    _clean(extract)
    assert extract.returncode == 0, extract.stderr[-3000:]
    assert "12 extracted" in extract.stdout and "1 failed" in extract.stdout, extract.stdout
    assert f"failed: {data / broken}" in extract.stdout, extract.stdout

    # evaluate: leaderboard, best line and the run's path (its folder name is markup too)
    evaluate = _cli("evaluate", manifest, *TINY_ARGS, "--heads", "ncm", "--folds", "2", "--no-nested",
                    "--cache-dir", cache, "--run-dir", run_dir)
    _clean(evaluate)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert "leaderboard" in evaluate.stdout and "best: " in evaluate.stdout
    assert f"run: {run_dir}" in evaluate.stdout, evaluate.stdout

    # predict: the table's path and label columns, and an error row for the broken file (paths relative
    # to the data folder, short enough for the table to show whole)
    images = [f"{BRACKET_CLASS}/[i]0.png", "style[b]/[i]0.png", ":smile:/[i]0.png", broken]
    predict = _cli("predict", run_dir, *images, "--top-k", "3", cwd=data)
    _clean(predict)
    assert predict.returncode == 0, predict.stderr[-3000:]
    for name in (LABEL_CLOSE, LABEL_STYLE, LABEL_EMOJI, *images):
        assert name in predict.stdout, (name, predict.stdout)

    # inspect: the failed file and the class counts
    inspect = _cli("inspect", manifest, *TINY_ARGS, "--folds", "2", "--cache-dir", cache, "--out",
                   tmp_path / "i[/i]nspect")
    _clean(inspect)
    assert inspect.returncode == 0, inspect.stderr[-3000:]
    assert f"in no analysis: {data / broken}" in inspect.stdout, inspect.stdout
    for label in (LABEL_CLOSE, LABEL_STYLE, LABEL_EMOJI):
        assert f"{label} 4" in inspect.stdout, (label, inspect.stdout)
    assert str(tmp_path / "i[/i]nspect") in inspect.stdout

    # cache ls: the table's title names the cache root
    listing = _cli("cache", "ls", "--cache-dir", cache)
    _clean(listing)
    assert listing.returncode == 0, listing.stderr[-3000:]
    assert f"feature stores in {cache}" in listing.stdout, listing.stdout

    # errors: the error printer itself, with the real message
    missing = _cli("extract", tmp_path / "nope[/x]", *TINY_ARGS, "--cache-dir", cache)
    _clean(missing)
    assert missing.returncode == 1, missing.stderr   # missing data: a data failure (2: usage errors)
    assert "error:" in missing.stderr and str(tmp_path / "nope[/x]") in missing.stderr, missing.stderr


def test_the_consoles_print_any_string_as_it_is(capsys):
    """The mechanism itself, in-process: every helper and a table, with markup and emoji codes."""
    from featurepipe.cli import render

    text = "a [/b] c [bold]d[/] :smile: e["
    render.say(text)
    render.say(("label:", "green"), " ", text)
    render.tell(text)
    render.flag("warning", text)
    render.stdout.print(text)
    render.console.print(text)
    render.table(f"title {text}", ["col [/x]"], [[text], [render.styled(("[red]cell[/]", "red"))]])
    out, err = capsys.readouterr()
    # four lines and one cell (the title wraps at the table's width, between words)
    assert out.count(text) == 5 - 1 and "title a [/b] c [bold]d[/] :smile:" in out, out
    assert "col [/x]" in out and "[red]cell[/]" in out, out
    assert err.count(text) == 3 and f"warning: {text}" in err, err


# ---------------------------------------------------------------------------------------------------
# Ctrl-C during `extract --workers N`


def _ctrl_c_reaches_python() -> None:
    # As tests/system/test_distributed.py: a child inherits an ignored SIGINT from a non-interactive shell;
    # a user's terminal delivers Ctrl-C with the default disposition.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@pytest.mark.slow
def test_ctrl_c_stops_a_distributed_extract_keeps_its_shards_and_says_how_to_resume(tmp_path):
    pytest.importorskip("distributed", reason="the dask extra is not installed")
    from featurepipe.extraction.extract import open_stores

    colours = list(COLOURS.values())
    n = 300
    for i in range(n):
        make_image(tmp_path / "data" / f"class{i % 3}" / f"img{i:03d}.png", colours[i % 3], seed=7000 + i)
    cache = tmp_path / "cache"
    env = {**CHILD_ENV}
    env.pop("TF_CPP_MIN_LOG_LEVEL")          # the CLI's own quiet start must hide the workers' lines
    # A session of its own, so that Ctrl-C can go to the whole process group as a terminal sends it.
    child = subprocess.Popen([sys.executable, "-c", CHILD, "extract", str(tmp_path / "data"), *TINY_ARGS,
                              "--cache-dir", str(cache), "--workers", "2", "--batch-size", "1"],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=_ctrl_c_reaches_python, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list((cache / "features").glob("*/shards/*.h5")):
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "no shard committed in time"
            time.sleep(0.05)
        os.killpg(child.pid, signal.SIGINT)
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
    assert child.returncode == 130, (child.returncode, out, err)
    assert "interrupted:" in err and "run the same command again" in err, err
    noise = [line for line in err.splitlines() if is_startup_noise(line)]
    assert noise == [], noise
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "Port 8787" not in err, err
    store = open_stores(BackboneSpec(name="tiny", weights="random", image_size=32), cache).originals
    kept = len(store.keys())
    assert 0 < kept < n, kept            # interrupted, and what was committed is still there
    assert store.verify() == []


# ---------------------------------------------------------------------------------------------------
# numeric options


NAN = "nan"

# (command line, the option the message must name): each refused at once with exit 2.
BAD_OPTIONS = [
    (["extract", "{data}", "--image-size", "100000"], "--image-size"),
    (["extract", "{data}", "--image-size", "0"], "--image-size"),
    (["extract", "{data}", "--image-size", "8"], "--image-size"),
    (["extract", "{data}", "--augment", "-2"], "--augment"),
    (["extract", "{data}", "--augment-seed", "-1"], "--augment-seed"),
    (["extract", "{data}", "--seed", "-1"], "--seed"),
    (["extract", "{data}", "--batch-size", "0"], "--batch-size"),
    (["extract", "{data}", "--lock-timeout", NAN], "--lock-timeout"),
    (["extract", "{data}", "--lock-timeout", "-1"], "--lock-timeout"),
    (["extract", "{data}", "--lock-timeout", "inf"], "--lock-timeout"),
    (["extract", "{data}", "--workers", "0"], "--workers"),
    (["evaluate", "{data}", "--ensemble", "-1"], "--ensemble"),
    (["evaluate", "{data}", "--folds", "1"], "--folds"),
    (["evaluate", "{data}", "--repeats", "0"], "--repeats"),
    (["evaluate", "{data}", "--seed", "-3"], "--seed"),
    (["evaluate", "{data}", "--augment", "-2"], "--augment"),
    (["evaluate", "{data}", "--augment-seed", "-2"], "--augment-seed"),
    (["evaluate", "{data}", "--jobs", "0"], "--jobs"),
    (["evaluate", "{data}", "--image-size", "0"], "--image-size"),
    (["run", "{data}", "--ensemble", "-1"], "--ensemble"),
    (["run", "{data}", "--image-size", "100000"], "--image-size"),
    (["run", "{data}", "--folds", "0"], "--folds"),
    (["run", "{data}", "--epochs", "0", "--finetune"], "--epochs"),
    (["run", "{data}", "--augment", "-2"], "--augment"),
    (["run", "{data}", "--budget", "-5"], "--budget"),
    (["run", "{data}", "--budget", NAN], "--budget"),
    (["inspect", "{data}", "--folds", "0"], "--folds"),
    (["inspect", "{data}", "--dedup-cosine", NAN], "--dedup-cosine"),
    (["inspect", "{data}", "--dedup-cosine", "1.5"], "--dedup-cosine"),
    (["inspect", "{data}", "--dedup-hamming", "-1"], "--dedup-hamming"),
    (["inspect", "{data}", "--dedup-hamming", "65"], "--dedup-hamming"),
    (["inspect", "{data}", "--top", "-1"], "--top"),
    (["inspect", "{data}", "--image-size", "100000"], "--image-size"),
    (["report", "{run}", "--thumbnails", "-5"], "--thumbnails"),
    (["predict", "{run}", "{data}", "--top-k", "0"], "--top-k"),
    (["predict", "{run}", "{data}", "--batch-size", "0"], "--batch-size"),
    (["finetune", "{run}", "--epochs", "0"], "--epochs"),
    (["finetune", "{run}", "--lr", NAN], "--lr"),
    (["finetune", "{run}", "--lr", "0"], "--lr"),
    (["finetune", "{run}", "--momentum", NAN], "--momentum"),
    (["finetune", "{run}", "--momentum", "1"], "--momentum"),
    (["finetune", "{run}", "--weight-decay", NAN], "--weight-decay"),
    (["finetune", "{run}", "--label-smoothing", NAN], "--label-smoothing"),
    (["finetune", "{run}", "--warmup-epochs", "-1"], "--warmup-epochs"),
    (["finetune", "{run}", "--batch-size", "0"], "--batch-size"),
    (["finetune", "{run}", "--patience", "-1"], "--patience"),
    (["finetune", "{run}", "--unfreeze-blocks", "-1"], "--unfreeze-blocks"),
    (["finetune", "{run}", "--seed", "-1"], "--seed"),
    (["finetune", "{run}", "--mixup", "-1"], "--mixup"),
    (["finetune", "{run}", "--mixup", NAN], "--mixup"),
    (["run", "{data}", "--finetune", "--mixup", "-0.5"], "--mixup"),
    (["baseline", "{data}", "--image-size", "100000"], "--image-size"),
    (["baseline", "{data}", "--image-size", "0"], "--image-size"),
    (["baseline", "{data}", "--epochs", "0"], "--epochs"),
    (["baseline", "{data}", "--batch-size", "0"], "--batch-size"),
    (["baseline", "{data}", "--seed", "-1"], "--seed"),
    (["features", "export", "{data}", "--out", "{out}", "--image-size", "0"], "--image-size"),
]


@pytest.mark.parametrize("args, option", BAD_OPTIONS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_OPTIONS])
def test_nonsense_numeric_options_are_refused_at_once_naming_the_option(args, option, tmp_path, monkeypatch):
    # Nothing exists: a refused option must be refused before the data, the run or the cache is looked at.
    values = {"{data}": str(tmp_path / "data"), "{run}": str(tmp_path / "run"), "{out}": str(tmp_path / "f.csv")}
    monkeypatch.setenv("FEATUREPIPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "400")
    result = CliRunner().invoke(app, [values.get(a, a) for a in args])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    message = result.stderr if result.stderr else result.output
    assert option in message, message
    # the valid range is named: a bound or the word "must"/"range"
    assert any(word in message for word in ("range", "must be", "should be", "at least", "at most")), message
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_the_configs_check_their_ranges_for_library_callers_too():
    for kwargs, option in [({"lr": math.nan}, "--lr"), ({"momentum": math.nan}, "--momentum"),
                           ({"weight_decay": math.nan}, "--weight-decay"), ({"momentum": 1.0}, "--momentum"),
                           ({"label_smoothing": math.nan}, "--label-smoothing"), ({"seed": -1}, "--seed"),
                           ({"epochs": 0}, "--epochs"), ({"mixup": math.inf}, "--mixup")]:
        with pytest.raises(UsageError, match=option):
            FinetuneConfig(**kwargs)
    with pytest.raises(UsageError, match="--seed"):
        SearchConfig(seed=-1)
    for size in (0, MAX_IMAGE_SIZE + 1, 100000):
        with pytest.raises(UsageError, match="--image-size"):
            BackboneSpec(name="tiny", weights="random", image_size=size).resolved()
    assert BackboneSpec(name="tiny", weights="random", image_size=MAX_IMAGE_SIZE).resolved().image_size == MAX_IMAGE_SIZE


def test_valid_edge_values_are_still_accepted():
    FinetuneConfig(lr=1e-5, momentum=0.0, weight_decay=0.0, label_smoothing=0.0, warmup_epochs=0, patience=0,
                   unfreeze_blocks=0, seed=0)
    SearchConfig(seed=0, ensemble=0, folds=2, repeats=1)
