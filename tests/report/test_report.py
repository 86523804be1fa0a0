"""featurepipe report: a self-contained HTML page built from a synthetic evaluate run directory."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from featurepipe.core.errors import FeaturepipeError
from featurepipe.report.write import ReportResult, write_report

CLASSES = ["cat", "dog", "b&w"]          # "&" checks that names are escaped
HEADS = {"logreg": {"C": 1.0}, "linear_svm": {"C": 0.1}}
BEST = "logreg"
METRICS = ["accuracy", "balanced_accuracy", "f1_macro", "log_loss", "roc_auc"]
# Mistakes of the best head: image -> (predicted class, probability of that prediction).
BEST_MISTAKES = {"cat_0": ("dog", 0.90), "b&w_2": ("dog", 0.75), "dog_1": ("cat", 0.60), "cat_3": ("b&w", 0.50)}
OTHER_MISTAKES = {"dog_4": ("b&w", 0.80)}
MISSING_IMAGE = "cat_3"                  # its file is deleted after the run: listed without a thumbnail
SECTIONS = ["Run", "Leaderboard", "Fold scores", "Confusion matrix", "Per-class precision and recall",
            "Misclassified images", "Reproduce"]


def _proba(true: str, pred: str, confidence: float) -> dict[str, float]:
    rest = [c for c in CLASSES if c != pred]
    probs = {pred: confidence, **{c: (1 - confidence) / len(rest) for c in rest}}
    return {f"p[{c}]": round(probs[c], 6) for c in CLASSES}


def make_run(root: Path, repeats: int = 1) -> Path:
    """A run directory in the format featurepipe evaluate writes, with real PNG images."""
    run = root / "run"
    data = root / "data"
    run.mkdir(parents=True)
    images = {}
    for c, label in enumerate(CLASSES):
        for i in range(5):
            name = f"{label}_{i}"
            path = data / label / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            colour = np.array([(200, 40, 40), (40, 200, 40), (40, 40, 200)][c], dtype=np.uint8)
            Image.fromarray(np.tile(colour, (60 + i, 80, 1))).save(path)
            images[name] = (str(path), label)

    oof, folds, board = [], [], []
    for h, (head, params) in enumerate(HEADS.items()):
        mistakes = BEST_MISTAKES if head == BEST else OTHER_MISTAKES
        for repeat in range(repeats):
            for k, (name, (path, label)) in enumerate(images.items()):
                pred, confidence = mistakes.get(name, (label, 0.85))
                oof.append({"path": path, "head": head, "params": json.dumps(params), "augment": "none",
                            "repeat": repeat, "fold": k % 5, "true": label, "pred": pred,
                            **_proba(label, pred, confidence)})
            for fold in range(5):
                folds.append({"head": head, "params": json.dumps(params), "augment": "none", "repeat": repeat,
                              "fold": fold, "accuracy": 0.8 - 0.1 * h + 0.02 * fold, "balanced_accuracy": 0.78,
                              "f1_macro": 0.77, "log_loss": 0.5, "roc_auc": 0.9,
                              **{f"precision[{c}]": 0.8 for c in CLASSES}, **{f"recall[{c}]": 0.8 for c in CLASSES}})
        row = {"head": head, "params": json.dumps(params), "augment": "none", "tta": False, "n_folds": 5,
               "repeats": repeats, "rank": h + 1}
        for m in METRICS:
            mean = 0.84 - 0.1 * h
            row.update({f"{m}_mean": mean, f"{m}_std": 0.03, f"{m}_ci_low": mean - 0.05, f"{m}_ci_high": mean + 0.05})
        board.append(row)
    pd.DataFrame(board).to_csv(run / "leaderboard.csv", index=False)
    pd.DataFrame(folds).to_csv(run / "folds.csv", index=False)
    pd.DataFrame(oof).to_csv(run / "oof_predictions.csv", index=False)
    backbone = {"name": "efficientnet_lite0", "weights": "imagenet", "layer": None, "pooling": "avg",
                "image_size": 224, "resize": "squash", "seed": 0}
    (run / "best_head.json").write_text(json.dumps({
        "head": BEST, "params": HEADS[BEST], "augment": "none", "tta": False, "classes": CLASSES,
        "backbone": backbone, "feature_fingerprint": "f" * 64, "file": "best_head.joblib", "sha256": "0" * 64}))
    (run / "config.json").write_text(json.dumps({
        "dataset": {"source": str(data), "layout": "folders", "classes": CLASSES,
                    "counts": {c: 5 for c in CLASSES}, "splits": {"train": 15},
                    "warnings": ["class folder <empty> has no images; it is left out"],
                    "failed": [{"path": str(data / "cat" / "broken.jpg"), "reason": "truncated JPEG"}]},
        "backbone": backbone, "augment": 0, "augment_seed": 0, "augment_policy": None,
        "heads": list(HEADS), "grids": None, "folds": 5, "repeats": repeats, "seed": 7, "tta": False,
        "cache_dir": str(root / "cache"), "feature_fingerprints": ["f" * 64], "versions": {"numpy": "2"},
        "created": "2024-05-01T12:00:00+0000"}, indent=2))
    (Path(images[MISSING_IMAGE][0])).unlink()
    return run


def expected_confusion(run: Path) -> dict[tuple[str, str], int]:
    oof = pd.read_csv(run / "oof_predictions.csv", keep_default_na=False)
    best = oof[oof["head"] == BEST]
    counts = Counter(zip(best["true"], best["pred"]))
    return {(t, p): counts.get((t, p), 0) for t in CLASSES for p in CLASSES}


def html_confusion(page: str) -> dict[tuple[str, str], int]:
    cells = re.findall(r'<td class="cm[^"]*" data-true="([^"]*)" data-pred="([^"]*)"[^>]*><b>(\d+)</b>', page)
    unescape = lambda s: s.replace("&amp;", "&")  # noqa: E731
    return {(unescape(t), unescape(p)): int(n) for t, p, n in cells}


def gallery(page: str) -> list[str]:
    return re.findall(r'<figure class="miss".*?</figure>', page, flags=re.S)


def check_self_contained(page: str) -> None:
    assert 'src="http' not in page and "src='http" not in page
    assert "<link" not in page
    assert "<script" not in page
    images = re.findall(r"<img\b[^>]*>", page)
    assert images
    for tag in images:
        assert 'src="data:image/png;base64,' in tag, tag[:120]


def test_report_core_sections(tmp_path):
    run = make_run(tmp_path)
    result = write_report(run)
    assert isinstance(result, ReportResult)
    assert result.html_path == run / "report.html" and result.html_path.exists()
    page = result.html_path.read_text(encoding="utf-8")
    check_self_contained(page)

    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page
    assert result.sections == SECTIONS
    for optional in ("Holdout scores", "Fine-tuning", "Baseline trained from scratch", "Dense head training"):
        assert f"<h2>{optional}</h2>" not in page
    assert {"holdout.csv", "finetune/history.csv", "finetune/summary.json", "baseline/history.csv",
            "best_head_history.csv"} <= set(result.missing)
    assert "leaderboard.csv" not in result.missing and "oof_predictions.csv" not in result.missing

    # best head: named and highlighted in the leaderboard table
    assert re.search(r'<tr class="best"><td class="num">1</td><td></td><td>logreg</td>', page)
    assert "linear_svm" in page
    # header: failed files with reasons, warnings escaped, class counts
    assert "truncated JPEG" in page and "broken.jpg" in page
    assert "class folder &lt;empty&gt; has no images" in page and "<empty>" not in page
    assert "b&amp;w" in page and ">b&w<" not in page

    # confusion counts equal those computed from the OOF rows of the best head
    expected = expected_confusion(run)
    assert html_confusion(page) == expected
    assert expected[("cat", "dog")] == 1 and expected[("cat", "cat")] == 3

    # gallery: every mistake of the best head (4 < 24), most confident first
    items = gallery(page)
    assert len(items) == len(BEST_MISTAKES)
    confidences = [float(re.search(r'data-confidence="([0-9.]+)"', item).group(1)) for item in items]
    assert confidences == sorted(confidences, reverse=True) == [0.9, 0.75, 0.6, 0.5]
    assert "cat_0.png" in items[0] and "predicted: dog" in items[0] and "p=0.900" in items[0]
    # the deleted image: listed by path, no thumbnail, no crash
    assert f"{MISSING_IMAGE}.png" in items[-1] and "<img" not in items[-1] and "file not found" in items[-1]
    assert all("<img" in item for item in items[:-1])
    assert "Images without a thumbnail (1)" in page

    # the other head's mistake is not in the best head's gallery
    assert not any("dog_4.png" in item for item in items)

    # reproduce: the command and the config
    assert ("featurepipe evaluate " + str(tmp_path / "data")) in page
    for flag in ("--backbone efficientnet_lite0", "--heads logreg,linear_svm", "--folds 5", "--repeats 1",
                 "--seed 7", "--image-size 224", "--resize squash"):
        assert flag in page
    assert "--tta" not in page and "--augment " not in page
    assert "&quot;feature_fingerprints&quot;" in page

    names = {p.name for p in result.png_paths}
    assert names == {"leaderboard.png", "folds.png", "confusion.png", "per_class.png"}
    for path in result.png_paths:
        assert path.parent == run / "report"
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 100


def test_optional_sections_present_when_files_are(tmp_path):
    run = make_run(tmp_path)
    pd.DataFrame([{"split": "test", "images": 9, "accuracy": 0.777, "balanced_accuracy": 0.75, "f1_macro": 0.74,
                   "log_loss": 0.6, "roc_auc": 0.91}]).to_csv(run / "holdout.csv", index=False)
    (run / "finetune").mkdir()
    history = pd.DataFrame({"epoch": range(1, 7), "loss": np.linspace(1.0, 0.3, 6),
                            "accuracy": np.linspace(0.5, 0.9, 6), "val_loss": np.linspace(1.1, 0.5, 6),
                            "val_accuracy": np.linspace(0.45, 0.86, 6)})
    history.to_csv(run / "finetune" / "history.csv", index=False)
    (run / "finetune" / "summary.json").write_text(json.dumps({
        "before": {"val_accuracy": 0.80, "val_loss": 0.62}, "after": {"val_accuracy": 0.86, "val_loss": 0.48},
        "strategy": "unfreeze_top", "epochs": 6, "augment": "flip", "wise": 0.5,
        "decision": {"gained": 3, "lost": 0, "accuracy_change": 0.06, "accuracy_change_interval": [0.02, 0.12]},
        "student": {"distill_alpha": 0.5, "distill_temperature": 2.0, "teacher": ["lite0", "lite2"], "folds": 5}}))
    (run / "baseline").mkdir()
    history.assign(val_accuracy=history["val_accuracy"] - 0.2).to_csv(run / "baseline" / "history.csv", index=False)
    history.to_csv(run / "best_head_history.csv", index=False)

    result = write_report(run, thumbnails=2)
    page = result.html_path.read_text(encoding="utf-8")
    check_self_contained(page)
    for title in ("Holdout scores", "Fine-tuning", "Baseline trained from scratch", "Dense head training"):
        assert f"<h2>{title}</h2>" in page and title in result.sections
    assert "0.777" in page                          # holdout accuracy
    assert "unfreeze_top" in page and "+0.060" in page   # fine-tuning before/after and its change
    settings = dict(re.findall(r"<tr><th>(augment|wise)</th><td>([^<]*)</td></tr>", page))
    assert settings == {"augment": "flip", "wise": "0.5"}   # how the student trained and was averaged
    assert "accuracy change, 95% paired interval" in page and "(0.020 to 0.120)" in page
    assert "0.5 x out-of-fold teacher (lite0, lite2; 5 folds, temperature 2.0)" in page
    assert "baseline/summary.json" in result.missing and "finetune/history.csv" not in result.missing
    assert "holdout.csv" not in result.missing
    names = {p.name for p in result.png_paths}
    assert {"finetune_curves.png", "baseline_curves.png", "dense_curves.png"} <= names
    for path in result.png_paths:
        with Image.open(path) as image:
            image.verify()

    # thumbnails=2: only the two most confident mistakes, the rest counted
    items = gallery(page)
    assert len(items) == 2
    assert "cat_0.png" in items[0] and "b&amp;w_2.png" in items[1]
    assert "2 more not shown" in page


def test_repeats_pool_counts_and_deduplicate_gallery(tmp_path):
    run = make_run(tmp_path, repeats=2)
    page = write_report(run).html_path.read_text(encoding="utf-8")
    expected = expected_confusion(run)
    assert sum(expected.values()) == 30            # 15 images x 2 repeats
    assert html_confusion(page) == expected
    items = gallery(page)
    assert len(items) == len(BEST_MISTAKES)         # one card per image, not per repeat
    assert "wrong in 2 of 2 repeats" in items[0]


def test_missing_leaderboard_is_a_clear_error(tmp_path):
    run = make_run(tmp_path)
    (run / "leaderboard.csv").unlink()
    with pytest.raises(FeaturepipeError, match=r"leaderboard\.csv.*featurepipe evaluate"):
        write_report(run)
    assert not (run / "report.html").exists()
    with pytest.raises(FeaturepipeError, match="featurepipe evaluate"):
        write_report(tmp_path / "no-such-run")


def test_tolerates_a_partial_run(tmp_path):
    """Only leaderboard.csv: the page still renders, and says what it could not show."""
    run = make_run(tmp_path)
    for name in ("folds.csv", "oof_predictions.csv", "config.json", "best_head.json"):
        (run / name).unlink()
    events = []
    result = write_report(run, progress=events.append)
    page = result.html_path.read_text(encoding="utf-8")
    assert result.sections == ["Run", "Leaderboard", "Reproduce"]
    assert {"folds.csv", "oof_predictions.csv", "config.json", "best_head.json"} <= set(result.missing)
    assert "config.json is missing" in page
    assert re.search(r'<tr class="best"><td class="num">1</td><td></td><td>logreg</td>', page)   # rank 1 taken as best
    assert events and events[-1].stage == "report" and events[-1].done == events[-1].total


def test_relative_image_paths_and_odd_class_names(tmp_path, monkeypatch):
    """Paths written relative to the cwd of `evaluate` still find their images; "NA" and "$" stay names."""
    run = make_run(tmp_path)
    oof = pd.read_csv(run / "oof_predictions.csv", keep_default_na=False)
    oof["path"] = [str(Path(p).relative_to(tmp_path)) for p in oof["path"]]     # "data/cat/cat_0.png"
    rename = {"cat": "NA", "dog": "$dog$"}
    for column in ("true", "pred"):
        oof[column] = oof[column].replace(rename)
    oof = oof.rename(columns={f"p[{old}]": f"p[{new}]" for old, new in rename.items()})
    oof.to_csv(run / "oof_predictions.csv", index=False)
    config = json.loads((run / "config.json").read_text())
    config["dataset"]["classes"] = ["NA", "$dog$", "b&w"]
    config["dataset"]["counts"] = {"NA": 5, "$dog$": 5, "b&w": 5}
    (run / "config.json").write_text(json.dumps(config))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)            # the report runs from another directory than evaluate did

    result = write_report(run)
    page = result.html_path.read_text(encoding="utf-8")
    items = gallery(page)
    assert len(items) == len(BEST_MISTAKES)
    assert all("<img" in item for item in items[:-1]) and "<img" not in items[-1]
    assert "predicted: $dog$" in items[0] and "true: NA" in items[0]
    assert html_confusion(page)[("NA", "$dog$")] == 1 and html_confusion(page)[("NA", "NA")] == 3
    for path in result.png_paths:
        with Image.open(path) as image:
            image.verify()


def test_chart_labels_are_cut_and_the_table_keeps_the_whole_label():
    """A vote lists all its members in its label (~600 characters for run's nine feature sets): the
    charts name it by its size ("a vote of 9 feature sets"; its members are listed once, in Run), other
    long labels are cut to CHART_LABEL_CHARS (the charts were ~3,700 px wide, the bars squeezed into a
    corner), short labels are left alone."""
    from featurepipe.report.charts import CHART_LABEL_CHARS, _chart_label
    from featurepipe.report.configs import config_label

    members = [{"features": f"efficientnet_lite{i % 3}/squash", "head": "logreg", "params": {"C": 1000.0}}
               for i in range(9)]
    key = ("vote", json.dumps({"members": members}), "none")
    assert len(config_label(key)) > 3 * CHART_LABEL_CHARS
    assert _chart_label(key) == "a vote of 9 feature sets"
    long = ("logreg", json.dumps({f"option_{i}": "x" * 10 for i in range(8)}), "none")
    full, short = config_label(long), _chart_label(long)
    assert len(short) == CHART_LABEL_CHARS and short.endswith("\u2026") and full.startswith(short[:-1].rstrip())
    plain = ("logreg", json.dumps({"C": 10.0}), "none")
    assert _chart_label(plain) == config_label(plain)


def test_charts_drawn_from_the_same_data_are_copied_not_drawn_again(tmp_path, monkeypatch):
    """write_report(chart_cache=...) (what `run` passes): a second report on the same numbers draws no
    chart and writes the very same PNGs; changed numbers are drawn; a cache entry whose file name,
    bytes (signed with the user's key) or record were tampered with is ignored, never followed."""
    import shutil

    from matplotlib.figure import Figure

    first = make_run(tmp_path / "a")
    cache = tmp_path / "charts"
    write_report(first, chart_cache=cache)
    drawn = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (drawn.append(1), real_savefig(self, *a, **k))[1])
    second = tmp_path / "b" / "run"
    shutil.copytree(first, second)
    shutil.rmtree(second / "report")
    page = write_report(second, chart_cache=cache).html_path.read_text(encoding="utf-8")
    assert drawn == []
    names = sorted(p.name for p in (first / "report").glob("*.png"))
    assert names and names == sorted(p.name for p in (second / "report").glob("*.png"))
    assert all((first / "report" / n).read_bytes() == (second / "report" / n).read_bytes() for n in names)
    assert page.count('<img class="chart"') >= len(names)

    board = pd.read_csv(second / "leaderboard.csv")
    board.loc[0, "accuracy_mean"] = 0.5                 # other numbers: the leaderboard chart is drawn
    board.to_csv(second / "leaderboard.csv", index=False)
    write_report(second, chart_cache=cache)
    assert len(drawn) == 1

    for record in cache.glob("*.json"):                 # tampered entries: drawn again, nothing followed
        data = json.loads(record.read_text())
        record.write_text(json.dumps({**data, "name": "../../escaped.png"}))
    drawn.clear()
    write_report(second, chart_cache=cache)
    assert len(drawn) == len(names) and not (tmp_path / "escaped.png").exists()
    assert not list(tmp_path.rglob("escaped.png"))
    for png in cache.glob("*.png"):                     # other bytes, same records: not what was signed
        png.write_bytes(png.read_bytes() + b"tampered")
    drawn.clear()
    write_report(second, chart_cache=cache)
    assert len(drawn) == len(names)
    assert not any((second / "report" / n).read_bytes().endswith(b"tampered") for n in names)
    import hashlib

    for record in cache.glob("*.json"):                 # other bytes with their hash written beside: refused
        png = record.with_suffix(".png")
        png.write_bytes(png.read_bytes() + b"forged")
        data = json.loads(record.read_text())
        digest = hashlib.sha256(png.read_bytes()).hexdigest()
        record.write_text(json.dumps({**data, "sha256": digest, "hmac": digest}))
    drawn.clear()
    write_report(second, chart_cache=cache)
    assert len(drawn) == len(names)
    assert not any((second / "report" / n).read_bytes().endswith(b"forged") for n in names)
    for record in cache.glob("*.json"):                 # not even an object: drawn again, no crash
        record.write_text("[]")
    drawn.clear()
    write_report(second, chart_cache=cache)
    assert len(drawn) == len(names)


def test_a_section_is_one_function_and_one_entry(tmp_path, monkeypatch):
    """The page is write.SECTIONS in order: an entry added there is written (heading, link, progress
    step) where it stands, and an entry whose function returns None is left out without a heading."""
    from featurepipe.report import write

    run = make_run(tmp_path)
    extra = write.Section("Extra", lambda context: f"<p>{len(context.board)} rows</p>")
    absent = write.Section("Never", lambda context: None)
    at = [entry.title for entry in write.SECTIONS].index("Leaderboard") + 1
    monkeypatch.setattr(write, "SECTIONS", (*write.SECTIONS[:at], extra, absent, *write.SECTIONS[at:]))
    events = []
    result = write_report(run, progress=events.append)
    page = result.html_path.read_text(encoding="utf-8")
    assert result.sections == [*SECTIONS[:2], "Extra", *SECTIONS[2:]]
    assert '<section id="extra"><h2>Extra</h2><p>2 rows</p></section>' in page and 'href="#extra"' in page
    assert "Never" not in page
    steps = [e.message for e in events if e.stage == "report"]
    assert steps[2:4] == ["Extra", "Never"] and events[-1].done == events[-1].total == 12
