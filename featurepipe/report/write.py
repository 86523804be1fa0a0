"""Stage `report`: one self-contained HTML page (plus its PNG charts) describing an evaluate run.

Reads what `featurepipe evaluate` wrote in a run directory (leaderboard.csv, folds.csv,
oof_predictions.csv, holdout.csv, best_head.json, config.json) and, when present, what fine-tuning
wrote (finetune/, baseline/, best_head_history.csv) and what inspect wrote (inspect/). Writes
RUN_DIR/report.html, where every chart and thumbnail is embedded as a base64 data URI so the file can
be mailed or archived on its own, and the same charts as PNG files in RUN_DIR/report/.

The page is SECTIONS, in page order: each entry a heading and a function (context) -> HTML, so a new
section is one function and one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

from featurepipe.core import atomic, trust
from featurepipe.core.progress import ProgressCallback, report
from featurepipe.report.context import ReportContext, load_context
from featurepipe.report.html import render_page
from featurepipe.report.inspect_sections import inspect_sections
from featurepipe.report.reproduce import reproduce_section
from featurepipe.report.search_sections import search_progress_section
from featurepipe.report.sections import (
    confusion_section, folds_section, frontier_section, holdout_section, leaderboard_section, mistakes_section,
    nested_section, per_class_section, run_section,
)
from featurepipe.report.training_sections import baseline_section, dense_section, finetune_section
from featurepipe.rundir.layout import (
    BASELINE_DIR, CONFIG, FINETUNE_DIR, FOLDS, HEAD_HISTORY, HEAD_META, HISTORY, HOLDOUT, INSPECT_DIR, INSPECT_JSON,
    OOF, REPORT, SUMMARY,
)

S_RUN = "Run"
S_NESTED = "Nested cross-validation"
S_SEARCH = "Search progress"
S_VOTE = "Vote members"
S_LEADERBOARD = "Leaderboard"
S_FOLDS = "Fold scores"
S_CONFUSION = "Confusion matrix"
S_PER_CLASS = "Per-class precision and recall"
S_MISTAKES = "Misclassified images"
S_HOLDOUT = "Holdout scores"
S_FINETUNE = "Fine-tuning"
S_BASELINE = "Baseline trained from scratch"
S_DENSE = "Dense head training"
S_INSPECT = "Data quality"      # the progress label of the inspect sections, which bring their own headings
S_REPRODUCE = "Reproduce"

OPTIONAL_INPUTS = (CONFIG, FOLDS, OOF, HEAD_META, HOLDOUT, f"{FINETUNE_DIR}/{HISTORY}", f"{FINETUNE_DIR}/{SUMMARY}",
                   f"{BASELINE_DIR}/{HISTORY}", f"{BASELINE_DIR}/{SUMMARY}", HEAD_HISTORY)


@dataclass
class ReportResult:
    html_path: Path
    png_paths: list[Path] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)   # headings of the sections written, in order
    missing: list[str] = field(default_factory=list)    # optional inputs (relative to the run dir) that were absent

    def to_dict(self) -> dict:
        return {"html": str(self.html_path), "pngs": [str(p) for p in self.png_paths],
                "sections": self.sections, "missing": self.missing}


@dataclass(frozen=True)
class Section:
    """One heading of the page and the function that writes its body (None: the run has nothing for it,
    and the section is left out). `step`: the section is one tick of the progress bar, written or not."""

    title: str
    render: Callable[[ReportContext], Optional[str]]
    step: bool = True

    def written(self, context: ReportContext) -> list[tuple[str, str]]:
        body = self.render(context)
        return [] if body is None else [(self.title, body)]


@dataclass(frozen=True)
class SectionGroup:
    """Several headings written by one function, as (title, html) pairs."""

    title: str
    render: Callable[[ReportContext], list[tuple[str, str]]]
    step: bool = False

    def written(self, context: ReportContext) -> list[tuple[str, str]]:
        return self.render(context)


def data_quality_sections(context: ReportContext) -> list[tuple[str, str]]:
    """The know-your-data sections, when the run has an inspect/ folder (featurepipe run writes one)."""
    inspect_dir = context.run_dir / INSPECT_DIR
    if not (inspect_dir / INSPECT_JSON).exists():
        return []
    return inspect_sections(inspect_dir, context.charts, context.source, context.thumbnails, context.progress,
                            failed_listed_elsewhere=True, run_dir=context.run_dir)


# The page, top to bottom. The nested headline, the baseline and the inspect sections are not steps of the
# progress bar of their own (the baseline is drawn within fine-tuning's step).
SECTIONS: tuple[Union[Section, SectionGroup], ...] = (
    Section(S_RUN, run_section),
    Section(S_NESTED, nested_section, step=False),
    Section(S_SEARCH, search_progress_section, step=False),
    Section(S_VOTE, frontier_section, step=False),
    Section(S_LEADERBOARD, leaderboard_section),
    Section(S_FOLDS, folds_section),
    Section(S_CONFUSION, confusion_section),
    Section(S_PER_CLASS, per_class_section),
    Section(S_MISTAKES, mistakes_section),
    Section(S_HOLDOUT, holdout_section),
    Section(S_FINETUNE, finetune_section),
    Section(S_BASELINE, baseline_section, step=False),
    Section(S_DENSE, dense_section),
    SectionGroup(S_INSPECT, data_quality_sections),
    Section(S_REPRODUCE, reproduce_section),
)


def write_report(run_dir: Path, thumbnails: int = 24, progress: Optional[ProgressCallback] = None,
                 chart_cache: Optional[Path] = None) -> ReportResult:
    """Write RUN_DIR/report.html (self-contained) and the charts as PNGs in RUN_DIR/report/.
    `chart_cache`: a folder where charts are kept by what they are drawn from (`run` passes one in its
    cache root), so a re-run whose numbers did not change copies them instead of drawing them."""
    run_dir = Path(run_dir)
    context = load_context(run_dir, thumbnails, progress, chart_cache)
    missing = [name for name in OPTIONAL_INPUTS if not (run_dir / name).exists()]
    steps = sum(entry.step for entry in SECTIONS)
    step = 0
    sections: list[tuple[str, str]] = []
    for entry in SECTIONS:
        if entry.step:
            step += 1
            report(progress, "report", step, steps, entry.title)
        sections += entry.written(context)

    html_path = trust.writable(run_dir, REPORT)
    page = render_page(context.config, run_dir, sections, missing)
    atomic.write_text(html_path, page)
    return ReportResult(html_path=html_path, png_paths=list(context.charts.paths), sections=[t for t, _ in sections],
                        missing=missing)
