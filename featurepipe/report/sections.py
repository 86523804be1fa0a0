"""The run report's sections about the frozen-feature search: the run header, the nested-CV headline,
the leaderboard, the fold scores, and the best head's confusion matrix, per-class scores, misclassified
images and holdout scores. Each is a function (context) -> HTML, None when the run has nothing for it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from featurepipe.core.progress import report
from featurepipe.report.analysis import find_mistakes, per_class_stats
from featurepipe.report.charts import confusion_chart, folds_chart, leaderboard_axis, leaderboard_chart, per_class_chart
from featurepipe.report.configs import member_label, members, params_text, short_label
from featurepipe.report.context import ReportContext, read_csv
from featurepipe.report.html import BEST_COLOUR, OTHER_COLOUR, cell, data_uri, esc, html_table, kv_table, num
from featurepipe.report.thumbnails import resolve_image, short_path, thumbnail
from featurepipe.rundir.layout import FOLDS, HOLDOUT, NESTED
from featurepipe.rundir.folder import read_json

METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "log_loss", "roc_auc")
METRIC_LABELS = {"accuracy": "accuracy", "balanced_accuracy": "balanced acc.", "f1_macro": "macro F1",
                 "log_loss": "log loss", "roc_auc": "ROC AUC"}


def run_section(context: ReportContext) -> str:
    """Headline cards, the dataset and backbone, the class counts, unusable files and warnings."""
    config, dataset, best_key, best_row, board = (context.config, context.dataset, context.best_key,
                                                  context.best_row, context.board)
    parts = []
    cards = []
    nested = _nested(context)
    acc = (nested or {}).get("accuracy") or {}
    if acc.get("mean") is not None:
        # The honest number first: nested CV scored the whole search on folds it never saw.
        interval = (f"95% interval {num(acc['ci_low'])} – {num(acc['ci_high'])}"
                    if acc.get("ci_low") is not None else "")
        cards.append(f'<div class="card best headline"><div class="k">expected accuracy on new photos '
                     f'(nested CV)</div><div class="v">{num(acc["mean"])}</div><div>{esc(interval)}</div></div>')
    if best_row is not None:
        ci = ""
        if "accuracy_ci_low" in best_row.index:
            ci = f" [{num(best_row['accuracy_ci_low'])}, {num(best_row['accuracy_ci_high'])}]"
        klass = "card" if cards else "card best headline"
        cards.append(f'<div class="{klass}"><div class="k">best leaderboard row<span class="long"> (CV accuracy, '
                     f'95% interval)</span>: optimistic<span class="long">, chosen on the folds that score it</span>'
                     f'</div>'
                     f'<div class="v">{num(best_row["accuracy_mean"])}<span class="ci">{esc(ci)}</span></div>'
                     f'<div class="name">{esc(short_label(best_key))}</div></div>')
    counts = dict(dataset.get("counts") or {})
    order = [c for c in (dataset.get("classes") or []) if c in counts]
    counts = {**{c: counts[c] for c in order}, **counts}       # the classes' own order, not the JSON's
    if counts:
        cards.append(f'<div class="card"><div class="k">images / classes</div>'
                     f'<div class="v">{sum(int(v) for v in counts.values())} / {len(counts)}</div></div>')
    if config.get("folds"):
        cards.append(f'<div class="card"><div class="k">folds × repeats</div>'
                     f'<div class="v">{esc(config.get("folds"))} × {esc(config.get("repeats", 1))}</div></div>')
    cards.append(f'<div class="card"><div class="k">configurations compared</div>'
                 f'<div class="v">{len(board)}</div></div>')
    parts.append(f'<div class="cards">{"".join(cards)}</div>')
    found = members(best_key[1])
    if found:
        # The saved model's members, listed once on the page; everywhere else it is "a vote of N feature sets".
        what = ("each feature set's best logistic regression, their probabilities averaged"
                if any(m.get("features") for m in found) else "the best heads, their probabilities averaged")
        parts.append(f'<p class="members">The saved model is <b>{esc(short_label(best_key))}</b>: {esc(what)}.</p>'
                     f'<ul class="members">{"".join(f"<li>{esc(member_label(m))}</li>" for m in found)}</ul>')
    else:
        parts.append(f'<p class="members">The saved model: <b>{esc(short_label(best_key))}</b>.</p>')

    left = []
    info = [("source", f'<span class="path">{esc(dataset.get("source", "–"))}</span>'),
            ("layout", esc(dataset.get("layout", "–"))),
            ("created", esc(config.get("created", "–")))]
    splits = dataset.get("splits") or {}
    if splits:
        info.append(("splits", esc(", ".join(f"{k}: {v}" for k, v in splits.items()))))
    if config.get("augment"):
        info.append(("augmented views", esc(f"{config['augment']} per image (seed {config.get('augment_seed', 0)})")))
    info.append(("TTA", esc("yes" if config.get("tta") else "no")))
    left.append("<h3>Dataset</h3>" + kv_table(info))
    backbone = config.get("backbone") or {}
    if backbone:
        left.append("<h3>Backbone</h3>" + kv_table([(k, esc("–" if v is None else v)) for k, v in backbone.items()]))
    right = []
    if counts:
        total = max(1, max(int(v) for v in counts.values()))
        rows = [[esc(name), str(int(n)),
                 f'<span style="display:inline-block;height:9px;width:{int(120 * int(n) / total)}px;'
                 f'background:{OTHER_COLOUR};border-radius:2px"></span>'] for name, n in counts.items()]
        right.append(f"<h3>Classes ({len(counts)})</h3>" + html_table(["class", "images", ""], rows, numeric={1}))
    elif dataset.get("classes"):
        right.append("<h3>Classes</h3><p>" + esc(", ".join(dataset["classes"])) + "</p>")
    parts.append(f'<div class="grid2"><div>{"".join(left)}</div><div>{"".join(right)}</div></div>')

    failed = dataset.get("failed") or []
    if failed:
        rows = [[f'<span class="path">{esc(f.get("path", ""))}</span>', esc(f.get("reason", ""))] for f in failed]
        parts.append(f"<h3>Files that could not be used ({len(failed)})</h3>" + html_table(["path", "reason"], rows))
    warnings = dataset.get("warnings") or []
    if warnings:
        parts.append(f"<h3>Warnings ({len(warnings)})</h3><ul class=\"warn\">"
                     + "".join(f"<li>{esc(w)}</li>" for w in warnings) + "</ul>")
    return "".join(parts)


def _nested(context: ReportContext) -> Optional[dict]:
    """nested.json, None when the run has none."""
    if not (context.run_dir / NESTED).exists():
        return None
    nested = read_json(context.run_dir / NESTED)
    return nested if isinstance(nested, dict) else None


def _chosen(fold: dict) -> str:
    """What an outer fold's inner search chose, a vote by its size and its members' parameters."""
    chosen = str(fold.get("chosen", ""))
    if not chosen.startswith("vote of "):
        return esc(chosen)
    try:
        found = members(json.loads(fold.get("chosen_config") or "{}").get("params") or {})
    except (ValueError, AttributeError):
        found = []
    name = chosen.split(" (", 1)[0]
    detail = "; ".join(params_text(m.get("params") or {}) for m in found)
    return esc(name) + (f' <span class="muted">({esc(detail)})</span>' if detail else "")


def nested_section(context: ReportContext) -> Optional[str]:
    """Nested cross-validation of the whole search (nested.json): its headline is the Run section's first card."""
    nested = _nested(context)
    if nested is None:
        return None
    acc = nested.get("accuracy") or {}
    if acc.get("mean") is None:
        return f'<p class="note">{NESTED} holds no accuracy; re-run `featurepipe evaluate`.</p>'
    interval = ""
    if acc.get("ci_low") is not None:
        interval = f" (95% interval {num(acc['ci_low'])} – {num(acc['ci_high'])})"
    text = (f'<p>Nested CV accuracy <b>{num(acc["mean"])}</b>{esc(interval)}; the best leaderboard row scored '
            f'{num(nested.get("best_inner_accuracy"))}, an optimism gap of {num(nested.get("optimism_gap"))}.</p>'
            '<p class="sub">For each outer fold, the whole search (feature set, head, parameters, ensemble) ran '
            'on the other folds only; the configuration it chose, trained without the outer fold, was scored on '
            'it. That estimates what the saved model will score on new photos; the best leaderboard row was '
            'chosen on the folds that score it, and is optimistic by about the gap.</p>')
    if any(str(f.get("chosen", "")).startswith("vote of ") for f in nested.get("folds") or []):
        text += ('<p class="sub">With several feature sets the procedure is a vote: each feature set\'s best '
                 'logistic regression (its C chosen by the inner folds), their probabilities averaged, never one row '
                 'picked among many near-equal ones, which is what made picking optimistic on small folds. Which '
                 'feature sets vote is chosen on the inner folds too (see Vote members).</p>')
    rows = [[esc(f"{f.get('repeat', 0)}/{f.get('fold')}"), _chosen(f), num(f.get("inner_accuracy")),
             num(f.get("accuracy"))] for f in nested.get("folds") or []]
    table = html_table(["outer fold", "chosen by the inner search", "inner CV accuracy", "outer accuracy"], rows,
                       numeric={2, 3})
    return text + table


def frontier_section(context: ReportContext) -> Optional[str]:
    """The vote's members in the order forward selection adds them, each prefix's nested accuracy and
    predict cost (nested.json's frontier; absent without a vote and in runs made before it was recorded)."""
    nested = _nested(context) or {}
    frontier = nested.get("frontier")
    if not isinstance(frontier, list) or not frontier:
        return None
    chosen = [f.get("cost") for f in nested.get("folds") or [] if f.get("cost") is not None]
    text = ('<p class="sub">Each member of the vote costs one more backbone pass per image at predict time. '
            'Forward selection orders the feature sets: each step adds the one that most improves the CV log '
            'loss net of its cost (with --select-members the saved vote stops where none pays for itself). Row '
            'k: the first k feature sets of that order on all training images, their predict cost in '
            'EfficientNet-Lite0 passes per image, and the nested CV accuracy of the vote of the first k '
            '(ordered on each outer fold\'s inner folds).'
            + (f' The model as searched cost {num(float(np.mean(chosen)))} passes per image on average over the '
               f'outer folds.' if chosen else '') + '</p>')
    rows = [[esc(str(f.get("members"))), esc(", ".join(f.get("feature_sets") or [])), num(f.get("cost")),
             num(f.get("nested_accuracy"))] for f in frontier if isinstance(f, dict)]
    return text + html_table(["members", "feature sets (greedy order)", "predict cost (Lite0 passes)",
                              "nested accuracy"], rows, numeric={2, 3})


def leaderboard_section(context: ReportContext) -> str:
    """Every configuration compared: the chart of the best 40 and the table of all."""
    charts, board, best_key = context.charts, context.board, context.best_key
    limit = 40
    low, high = leaderboard_axis(board.head(limit))
    intro = ('<p class="sub">Every feature set, head, parameter set and augmentation mode, scored by k-fold '
             'cross-validation on the training split. Bars: mean accuracy over folds; whiskers: 95% interval over '
             f'folds; the accuracy axis runs from {low:.3f} to {high:.3f} (zoomed to the data, not 0 to 1). '
             f'The best (refit and saved) is <span style="color:{BEST_COLOUR};font-weight:600">highlighted</span>.</p>')
    image = leaderboard_chart(charts, board, best_key, limit)
    if len(board) > limit:
        image += f'<p class="note">Chart shows the best {limit} of {len(board)}; the table lists all.</p>'
    # The accuracy comes right after the name (rank, feature set, head), so a narrow screen shows it before
    # the table scrolls; the feature set is a column: a searched run compares the same head on several.
    columns = ["#", "feature set", "head", "accuracy", "95% interval", "params", "views"]
    extra = [m for m in METRICS[1:] if f"{m}_mean" in board.columns]
    columns += [METRIC_LABELS[m] for m in extra] + ["folds"]
    rows, classes = [], []
    for position, record in enumerate(board.to_dict("records"), 1):
        interval = "–"
        if "accuracy_ci_low" in record:
            interval = f"{num(record['accuracy_ci_low'])} – {num(record['accuracy_ci_high'])}"
        accuracy = num(record["accuracy_mean"])
        if "accuracy_std" in record:
            accuracy += f" ± {num(record['accuracy_std'])}"
        folds = num(record.get("n_folds", ""), 0)
        if record.get("repeats") not in (None, "") and str(record.get("repeats")) not in ("1", "1.0", "nan"):
            folds += f" × {num(record['repeats'], 0)}"
        rank = record.get("rank", position)
        found = members(record.get("params", "{}"))
        params = (f"{len(found)} members (listed in Run)" if found else
                  f"<code>{esc(params_text(record.get('params', '{}')))}</code>")
        features = record.get("features", "")
        rows.append([num(rank, 0), esc("" if features is None or features != features else features),
                     esc(record["head"]), f'<span class="acc">{accuracy}</span>', interval, params,
                     esc(record.get("augment", "none"))]
                    + [num(record[f"{m}_mean"]) for m in extra] + [folds])
        classes.append("best" if record["_key"] == best_key else "")
    numeric = {0, 3, 4, *range(7, 7 + len(extra) + 1)}
    wide = {5, 6, *range(7, 7 + len(extra) + 1)}      # params, views, the other metrics, folds
    return intro + image + html_table(columns, rows, numeric=numeric, row_classes=classes, cls="leaderboard",
                                      wide=wide)


def folds_section(context: ReportContext) -> Optional[str]:
    """The accuracy of every validation fold per configuration (folds.csv)."""
    folds = context.folds
    if folds is None or "accuracy" not in folds.columns or folds.empty:
        return None
    charts, board, best_key = context.charts, context.board, context.best_key
    order = [k for k in board["_key"] if (folds["_key"] == k).any()]
    note = ""
    if len(order) > 12:
        # Too many grid points for one readable chart: keep the best configuration of each head and mode.
        seen, kept = set(), []
        for key in order:
            if (key[0], key[2]) not in seen or key == best_key:
                seen.add((key[0], key[2]))
                kept.append(key)
        note = (f'<p class="note">{len(order)} configurations were scored; the chart shows the best of each '
                f'head and augmentation mode ({len(kept)}).</p>')
        order = kept
    if not order:
        return f'<p class="note">{FOLDS} has no rows matching the leaderboard.</p>'
    image = folds_chart(charts, folds, order, best_key)
    rows = []
    for key in order:
        values = folds.loc[folds["_key"] == key, "accuracy"].dropna().to_numpy(dtype=float)
        rows.append([esc(short_label(key)), str(len(values)), num(values.min() if len(values) else np.nan),
                     num(np.median(values) if len(values) else np.nan), num(values.max() if len(values) else np.nan)])
    table = html_table(["configuration", "folds", "worst", "median", "best"], rows, numeric={1, 2, 3, 4},
                       row_classes=["best" if k == best_key else "" for k in order])
    return ('<p class="sub">Accuracy of every validation fold: a wide spread means the ranking above is '
            'less certain than the means suggest.</p>' + note + image + table)


def _best_head_shown(context: ReportContext) -> bool:
    """The best head's sections need its out-of-fold rows and the class names."""
    return context.best_oof is not None and bool(context.classes)


def confusion_section(context: ReportContext) -> Optional[str]:
    """The best head's out-of-fold confusion matrix, as a table and a chart."""
    if not _best_head_shown(context):
        return None
    charts, counts, classes, best_name, repeats = (context.charts, context.counts, context.classes,
                                                   context.best_name, context.repeats)
    totals = counts.sum(axis=1)
    pooled = (f" Counts are summed over {repeats} repeats, so each image is counted {repeats} times."
              if repeats > 1 else "")
    intro = (f'<p class="sub">Out-of-fold predictions of the best head, <b>{esc(best_name)}</b>: each training '
             f'image predicted by the model that did not see it. Rows: true class; columns: predicted class; '
             f'shading: share of the row.{esc(pooled)}</p>')
    head = '<th class="corner">true ↓ / predicted →</th>' + "".join(f'<th class="cls">{esc(c)}</th>' for c in classes) \
        + '<th class="num">total</th><th class="num">recall</th>'
    body = []
    for i, name in enumerate(classes):
        cells = []
        for j in range(len(classes)):
            share = counts[i, j] / totals[i] if totals[i] else 0.0
            colour = "#fff" if share > 0.6 else "inherit"
            tint = "31,119,180" if i == j else "207,34,46"
            if counts[i, j] == 0:
                cells.append(f'<td class="cm zero" data-true="{esc(name)}" data-pred="{esc(classes[j])}"><b>0</b></td>')
                continue
            cells.append(f'<td class="cm" data-true="{esc(name)}" data-pred="{esc(classes[j])}" '
                         f'style="background:rgba({tint},{max(share, 0.06) * 0.85:.3f});color:{colour}">'
                         f"<b>{int(counts[i, j])}</b><span>{share * 100:.0f}%</span></td>")
        recall = counts[i, i] / totals[i] if totals[i] else float("nan")
        body.append(f"<tr><th>{esc(name)}</th>{''.join(cells)}<td class=\"num\">{int(totals[i])}</td>"
                    f"<td class=\"num\">{num(recall)}</td></tr>")
    table = (f'<div class="scroll"><table class="confusion"><thead><tr>{head}</tr></thead>'
             f'<tbody>{"".join(body)}</tbody></table></div>')
    accuracy = np.trace(counts) / counts.sum() if counts.sum() else float("nan")
    summary = f'<p>{int(np.trace(counts))} of {int(counts.sum())} predictions correct (accuracy {num(accuracy)}).</p>'
    image = confusion_chart(charts, counts, classes)
    return intro + table + summary + image


def per_class_section(context: ReportContext) -> Optional[str]:
    """The best head's out-of-fold precision and recall of every class."""
    if not _best_head_shown(context):
        return None
    charts, counts, classes, best_name, repeats = (context.charts, context.counts, context.classes,
                                                   context.best_name, context.repeats)
    stats = per_class_stats(counts, classes)
    rows = [[esc(r["class"]), num(r["precision"]), num(r["recall"]), num(r["f1"]), str(r["support"]),
             str(r["predicted"])] for r in stats.to_dict("records")]
    table = html_table(["class", "precision", "recall", "F1", "true images", "predicted as"], rows,
                       numeric={1, 2, 3, 4, 5})
    return (f'<p class="sub">Computed from the out-of-fold predictions of <b>{esc(best_name)}</b>'
            + (f" (pooled over {repeats} repeats)" if repeats > 1 else "")
            + '. Precision: of the images predicted as the class, the share that are; recall: of the images '
              'of the class, the share found.</p>' + table + per_class_chart(charts, stats))


def mistakes_section(context: ReportContext) -> Optional[str]:
    """The best head's misclassified images with thumbnails, most confident mistakes first."""
    if not _best_head_shown(context):
        return None
    best_oof, repeats, limit, source, best_name, progress = (context.best_oof, context.repeats, context.thumbnails,
                                                             context.source, context.best_name, context.progress)
    mistakes = find_mistakes(best_oof, repeats)
    if not mistakes:
        return f'<p>No training image was misclassified by <b>{esc(best_name)}</b> out of fold.</p>'
    shown = mistakes[:max(0, limit)]
    figures, absent = [], []
    for index, mistake in enumerate(shown, 1):
        report(progress, "thumbnails", index, len(shown), Path(mistake.path).name)
        image_path = resolve_image(mistake.path, source)
        png = thumbnail(image_path) if image_path is not None else None
        if png is not None:
            picture = f'<img src="{data_uri(png)}" alt="{esc(Path(mistake.path).name)}">'
        else:
            reason = "file not found" if image_path is None else "cannot be decoded"
            picture = f'<div class="noimg">no thumbnail<br>({esc(reason)})</div>'
            absent.append((mistake.path, reason))
        wrong = f" · wrong in {mistake.wrong} of {repeats} repeats" if repeats > 1 else ""
        figures.append(
            f'<figure class="miss" data-confidence="{mistake.confidence:.6f}">'
            f'<div class="thumb">{picture}</div><figcaption>'
            f'<span class="lab true">true: {esc(mistake.true)}</span><br>'
            f'<span class="lab pred">predicted: {esc(mistake.pred)}</span> '
            f'<span class="conf">p={num(mistake.confidence)}</span>'
            f'<br><span class="muted">p(true)={num(mistake.p_true)}{esc(wrong)}</span>'
            f'<span class="path" title="{esc(mistake.path)}">{esc(short_path(mistake.path, source))}</span>'
            f'</figcaption></figure>')
    intro = (f'<p class="sub">{len(mistakes)} training image(s) misclassified out of fold by <b>{esc(best_name)}</b>; '
             f'showing {len(shown)}, most confident mistakes first (p = probability of the wrong prediction). '
             'Confident mistakes are often mislabelled images.</p>')
    parts = [intro, f'<div class="gallery">{"".join(figures)}</div>']
    if absent:
        rows = [[f'<span class="path">{esc(p)}</span>', esc(r)] for p, r in absent]
        parts.append(f"<h3>Images without a thumbnail ({len(absent)})</h3>" + html_table(["path", "reason"], rows))
    if len(mistakes) > len(shown):
        parts.append(f'<p class="note">{len(mistakes) - len(shown)} more not shown '
                     f'(<code>featurepipe report --thumbnails N</code> shows more).</p>')
    return "".join(parts)


def holdout_section(context: ReportContext) -> Optional[str]:
    """The refit best head scored once on the held-out split(s) (holdout.csv)."""
    if not (context.run_dir / HOLDOUT).exists():
        return None
    holdout, best_name = read_csv(context.run_dir / HOLDOUT), context.best_name
    if holdout.empty:
        return f'<p class="note">{HOLDOUT} is empty.</p>'
    columns = list(holdout.columns)
    rows = [[cell(v) if c not in METRICS else num(v) for c, v in zip(columns, record)]
            for record in holdout.itertuples(index=False)]
    numeric = {i for i, c in enumerate(columns) if pd.api.types.is_numeric_dtype(holdout[c])}
    return (f'<p class="sub"><b>{esc(best_name)}</b> refit on the whole training split and scored once on the '
            f'held-out split(s): an estimate not used to choose the head.</p>'
            + html_table([METRIC_LABELS.get(c, c) for c in columns], rows, numeric=numeric))
