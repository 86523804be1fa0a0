"""The report's "Search progress" section: how `run`'s anytime search went, stage by stage.

A run searches its feature sets in stages (evaluation.stages), each one a whole run written before the
next began, and a --budget may leave some out. The stages' nested accuracy says what each further
feature set bought and at what time; the feature sets left out say what was not tried, and why. Read
from config.json's "search_progress"; a run with one stage and nothing left out has no section.
"""

from __future__ import annotations

from typing import Optional

from featurepipe.report.context import ReportContext
from featurepipe.report.html import esc, html_table, num


def search_progress_section(context: ReportContext) -> Optional[str]:
    """The stages (feature sets added, nested accuracy after each, seconds) and what the budget left out."""
    progress = context.config.get("search_progress")
    if not isinstance(progress, dict):
        return None
    stages = [s for s in progress.get("stages") or [] if isinstance(s, dict)]
    skipped = [s for s in progress.get("skipped") or [] if isinstance(s, dict)]
    if len(stages) < 2 and not skipped:
        return None
    rows = []
    for stage in stages:
        nested = stage.get("nested") or {}
        interval = (f" ({num(nested['ci_low'])} – {num(nested['ci_high'])})"
                    if nested.get("ci_low") is not None else "")
        rows.append([esc(stage.get("stage")), esc(", ".join(stage.get("added") or [])), esc(stage.get("feature_sets")),
                     f"{num(nested.get('mean'))}{interval}" if nested else "–", num(stage.get("best_row")),
                     num(stage.get("seconds"), 0)])
    text = ('<p class="sub">The feature sets were searched in stages, in order of expected gain per second: after '
            'each stage the whole run (leaderboard, model, nested CV) was written, so an interrupted run keeps the '
            'last finished stage. Nested accuracy after each stage: what the feature sets added so far bought.</p>')
    text += html_table(["stage", "feature sets added", "searched", "nested accuracy (95% interval)", "best CV row",
                        "seconds from start"], rows, numeric={0, 2, 4, 5}, wide={4})
    budget = progress.get("budget")
    if skipped:
        items = "".join(f"<li>{esc(s.get('feature_set'))}: estimated {num(s.get('estimate_s'), 0)} s, "
                        f"{num(s.get('left_s'), 0)} s of the budget left</li>" for s in skipped)
        text += (f'<p class="note">Not searched: {len(skipped)} feature set(s) whose extraction and evaluation, '
                 f'estimated from this run\'s own speed, did not fit the budget of {num(budget, 0)} s. Run again with '
                 f'a larger <code>--budget</code> (0: no limit) to add them; everything done is reused.</p>'
                 f'<ul>{items}</ul>')
    return text
