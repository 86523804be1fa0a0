"""The run report's sections about training images end to end: fine-tuning (before and after, what was
trained, the curves, the validation images whose answer changed, side by side with the frozen head),
the baseline convnet trained from scratch, and the dense head's training curve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from featurepipe.report.charts import Charts, curves_chart
from featurepipe.report.context import ReportContext, read_csv
from featurepipe.report.html import esc, html_table, kv_table, num
from featurepipe.report.thumbnails import short_path
from featurepipe.rundir.layout import (
    BASELINE_DIR, FINETUNE_DIR, HEAD_HISTORY, HISTORY, SUMMARY, VALIDATION_PREDICTIONS,
)
from featurepipe.rundir.folder import read_json


def _summary_block(summary: dict) -> str:
    parts = []
    before, after = summary.get("before"), summary.get("after")
    if isinstance(before, dict) or isinstance(after, dict):
        before, after = before or {}, after or {}
        rows = []
        for metric in list(dict.fromkeys([*before, *after])):
            b, a = before.get(metric), after.get(metric)
            try:
                change = f"{float(a) - float(b):+.3f}"
            except (TypeError, ValueError):
                change = "–"
            rows.append([esc(metric), num(b), num(a), change])
        parts.append(html_table(["metric", "before", "after", "change"], rows, numeric={1, 2, 3}))
    other = [(k, v) for k, v in summary.items() if k not in ("before", "after")]
    if other:
        pairs = []
        for key, value in other:
            text = value if isinstance(value, (str, int, float, bool)) or value is None else json.dumps(value)
            text = str(text)
            pairs.append((key, esc(text if len(text) <= 300 else text[:300] + "…")))
        parts.append(kv_table(pairs))
    return "".join(parts)


def _training(charts: Charts, directory: Path, png_name: str, title: str) -> str:
    """A training's outcome (summary.json) and curves (history.csv) from its folder; "" when it has neither."""
    history_path, summary_path = directory / HISTORY, directory / SUMMARY
    if not history_path.exists() and not summary_path.exists():
        return ""
    parts = []
    if summary_path.exists():
        summary = read_json(summary_path)
        if isinstance(summary, dict):
            parts.append(_summary_block(summary))
    if history_path.exists():
        image = curves_chart(charts, read_csv(history_path), png_name, title)
        if image:
            parts.append(image)
    else:
        parts.append(f'<p class="note">{esc(history_path.name)} missing: no curves.</p>')
    return "".join(parts)


def _comparison(run_dir: Path, best_row) -> str:
    """Frozen features vs fine-tuning vs from scratch, on one line each, when the numbers exist."""
    rows = []
    if best_row is not None:
        rows.append(["frozen base + best head (CV accuracy on train)", num(best_row["accuracy_mean"])])
    for name, label in ((FINETUNE_DIR, "fine-tuned (validation accuracy after)"),
                        (BASELINE_DIR, "small convnet from scratch (validation accuracy)")):
        path = run_dir / name / SUMMARY
        if path.exists():
            summary = read_json(path)
            after = summary.get("after") if isinstance(summary, dict) else None
            if isinstance(after, dict) and "val_accuracy" in after:
                rows.append([esc(label), num(after["val_accuracy"])])
    if len(rows) < 2:
        return ""
    return "<h3>Side by side</h3>" + html_table(["approach", "accuracy"], rows, numeric={1}) + \
        '<p class="note">CV and validation accuracies are measured on different images; compare with care.</p>'


_FINETUNE_SETTINGS = ("strategy", "unfreeze_blocks", "trainable_params", "optimizer", "lr", "schedule",
                      "warmup_epochs", "label_smoothing", "augment", "wise", "weight_decay", "momentum",
                      "batch_size", "epochs", "patience", "epochs_run", "best_epoch", "seed", "validation",
                      "train_images", "val_images", "mixed_precision", "jit_compile")


def _folds(folds: dict) -> str:
    """--finetune-folds: the student and the frozen model on every training image (each scored once,
    by models that never saw it), what the held-out rule alone would have scored, and a row per fold.
    The decision table below is then the pooled one."""
    rows = [[esc(label), num(folds[key].get("val_accuracy")), num(folds[key].get("val_loss"), 4)]
            for key, label in (("frozen", "frozen (the run's vote or head, refit without the fold)"),
                               ("student", "fine-tuned student"),
                               ("holdout_rule", "the model the held-out 20% would have kept, per fold"))
            if isinstance(folds.get(key), dict)]
    per_fold = [[esc(f.get("fold")), esc(f.get("images")), esc(f.get("train_images")), esc(f.get("val_images")),
                 num(f.get("frozen")), num(f.get("student")), esc(f.get("holdout_kept")), esc(f.get("best_epoch")),
                 num(f.get("seconds"), 0)] for f in folds.get("per_fold") or []]
    return (f"<h3>Scored over {esc(folds.get('folds'))} folds: {esc(folds.get('images'))} training images, each once, "
            f"by models that never saw it</h3>" + html_table(["model", "accuracy", "loss"], rows, numeric={1, 2})
            + html_table(["fold", "scored", "trained on", "early stopping on", "frozen", "student",
                          "held-out rule kept", "best epoch", "s"], per_fold, numeric={1, 2, 3, 4, 5, 8}))


def _finetune(charts: Charts, directory: Path, source: Optional[str]) -> str:
    """Fine-tuning: before/after on the same validation images and what was kept, what was unfrozen,
    the time it took, the curves, and the validation images whose answer changed."""
    history_path, summary_path = directory / HISTORY, directory / SUMMARY
    if not history_path.exists() and not summary_path.exists():
        return ""
    summary = read_json(summary_path) if summary_path.exists() else {}
    summary = summary if isinstance(summary, dict) else {}
    parts = []
    kept, decision = summary.get("kept"), summary.get("decision") or {}
    if kept:
        verdict = ("the fine-tuned model is the run's model" if kept == "finetuned"
                   else "the run keeps the vote as its model" if summary.get("vote")
                   else "the run keeps the frozen best head as its model")
        parts.append(f'<p class="sub"><b>{esc(verdict)}</b>: {esc(summary.get("reason", ""))}</p>')
    folds = summary.get("folds")
    if isinstance(folds, dict) and isinstance(folds.get("student"), dict):
        parts.append(_folds(folds))
    if summary.get("before") or summary.get("after"):
        images = summary.get("val_images")
        parts.append(f'<h3>Before and after, on the same {esc(images) if images else ""} validation images</h3>'
                     + _summary_block({"before": summary.get("before"), "after": summary.get("after")}))
    if decision:
        low, high = (decision.get("loss_change_interval") or [None, None])[:2]
        parts.append(kv_table([
            ("images gained / lost", f"{esc(decision.get('gained'))} / {esc(decision.get('lost'))}"),
            *([("accuracy change, 95% paired interval",
                f"{num(decision.get('accuracy_change'), 3)} ({num(acc[0], 3)} to {num(acc[1], 3)})")]
              if (acc := decision.get("accuracy_change_interval")) else []),
            ("loss change, 95% bootstrap interval", f"{num(decision.get('loss_change'), 4)} "
                                                    f"({num(low, 4)} to {num(high, 4)})"),
            ("McNemar p (gained vs lost)", num(decision.get("mcnemar_p"), 3)),
        ]))
    unfrozen = summary.get("unfrozen_layers") or []
    settings = [(key, esc(summary[key])) for key in _FINETUNE_SETTINGS if key in summary]
    if unfrozen:
        settings.insert(2, ("base layers trained", esc(f"{len(unfrozen)}: {unfrozen[0]} … {unfrozen[-1]}"
                                                       if len(unfrozen) > 1 else unfrozen[0])))
    for key, label in (("seconds", "time (s)"), ("seconds_per_epoch", "time per epoch (s)")):
        if summary.get(key) is not None:
            settings.append((label, num(summary[key], 1)))
    student = summary.get("student")
    if isinstance(student, dict):   # the training targets (training.distill)
        teacher = ", ".join(map(str, student.get("teacher") or []))
        settings.append(("targets", esc(f"{student.get('distill_alpha')} x out-of-fold teacher ({teacher}; "
                                        f"{student.get('folds')} folds, temperature {student.get('distill_temperature')})"
                                        f" + the rest the true label") if student.get("folds") else "the true labels"))
    for note in summary.get("notes") or []:
        settings.append(("note", esc(note)))
    if settings:
        parts.append("<h3>What was trained</h3>" + kv_table(settings))
    test = summary.get("test")
    if isinstance(test, dict) and test.get("frozen"):
        rows = [[esc(name), num(test[name].get("val_accuracy")), num(test[name].get("val_loss"), 4)]
                for name in ("frozen", "finetuned") if isinstance(test.get(name), dict)]
        parts.append(f"<h3>Test split ({esc(test.get('images'))} images, scored once after every choice)</h3>"
                     + html_table(["model", "accuracy", "loss"], rows, numeric={1, 2}))
    if history_path.exists():
        image = curves_chart(charts, read_csv(history_path), "finetune_curves.png", "fine-tuning")
        if image:
            parts.append(image)
    else:
        parts.append(f'<p class="note">{esc(history_path.name)} missing: no curves.</p>')
    predictions = directory / VALIDATION_PREDICTIONS
    if predictions.exists():
        frame = read_csv(predictions)
        if {"path", "label", "before_pred", "after_pred"} <= set(frame.columns):
            right_before = frame["before_pred"].astype(str) == frame["label"].astype(str)
            right_after = frame["after_pred"].astype(str) == frame["label"].astype(str)
            changed = frame[right_before != right_after]
            if len(changed):
                rows = [[esc(short_path(str(r.path), source)), esc(r.label), esc(r.before_pred), esc(r.after_pred),
                         "gained" if r.after_pred == r.label else "lost"] for r in changed.itertuples()]
                parts.append("<h3>Validation images whose answer changed</h3>"
                             + html_table(["image", "label", "frozen head", "fine-tuned", ""], rows))
    return "".join(parts)


def finetune_section(context: ReportContext) -> Optional[str]:
    """Fine-tuning (RUN/finetune/), then the frozen head, fine-tuning and baseline side by side."""
    body = _finetune(context.charts, context.run_dir / FINETUNE_DIR, context.source)
    return body + _comparison(context.run_dir, context.best_row) if body else None


def baseline_section(context: ReportContext) -> Optional[str]:
    """The small convnet trained from scratch (RUN/baseline/)."""
    return _training(context.charts, context.run_dir / BASELINE_DIR, "baseline_curves.png", "baseline") or None


def dense_section(context: ReportContext) -> Optional[str]:
    """The training curve of the dense head (best_head_history.csv, written when it is the best head)."""
    path = context.run_dir / HEAD_HISTORY
    if not path.exists():
        return None
    image = curves_chart(context.charts, read_csv(path), "dense_curves.png", "dense head")
    if not image:
        return None
    return ('<p class="sub">Training curve of the dense head refit on the whole '
            'training split (validation: its early-stopping hold-out).</p>' + image)
