"""`featurepipe run`: scan -> extract -> evaluate -> (fine-tune) -> report, as one job; and its
Python face, `featurepipe.run` / `featurepipe.load_run`.

Every stage is incremental on its own (content-hashed features, per-fold CV results on disk), so
running the same command again with nothing changed only refits the best head and rewrites the
report: seconds, and the result says so.

The search is anytime (evaluation.stages): the feature sets are taken in evaluation.search's order,
the first one alone, then the rest in one or two groups, and after each group one evaluate pass over
every set done so far rewrites the whole run directory and reports its nested result through the
progress callback. A Ctrl-C keeps the last finished stage's run (RunInterrupted says where), and
`budget` leaves out the feature sets whose estimated time would not fit.

`run("data/")` with no config searches exactly what `featurepipe run data/` does
(SearchConfig.default(), the function the CLI builds its config with), and its keywords are the
CLI's options (quick=True, finetune=True, heads=..., cache_dir=..., run_dir=...). What it returns, a
RunResult, is what `load_run(RUN)` gives for a run written earlier, by Python or by the CLI: the
run directory, the leaderboard, the nested-CV headline, the report's path and `predict(paths)`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd

from featurepipe.core import csvcells
from featurepipe.core.cachedirs import cache_root, report_charts_dir
from featurepipe.core.digest import digest
from featurepipe.core.errors import FeaturepipeError, UsageError
from featurepipe.core.interrupts import held_interrupt
from featurepipe.core.progress import ProgressCallback, report
from featurepipe.data.dataset import Dataset, scan
from featurepipe.evaluation.config import SearchConfig, feature_set_name
from featurepipe.evaluation.evaluate import EvaluateReport, evaluate_features, merge_extract_reports
from featurepipe.evaluation.search import DEFAULT_BUDGET
from featurepipe.evaluation.stages import (
    Pace, SearchProgress, StageRecord, check_budget, first_stage, fit_budget, next_group, pending_passes,
    stage_message,
)
from featurepipe.extraction.extract import ExtractReport
from featurepipe.extraction.shared import extract_many
from featurepipe.extraction.features import cached_features
from featurepipe.rundir import layout
from featurepipe.rundir.folder import read_json, reusable_run, write_latest
from featurepipe.rundir.run import Run
from featurepipe.training.config import FinetuneConfig

# The leaderboard's text columns: read as text ("NA" or "None" may be a head's params or a feature set).
_TEXT_COLUMNS = ("features", "head", "params", "augment")


@dataclass
class RunResult:
    """A run: what `run` returns, and what `load_run` gives for a run directory written earlier.

    run_dir, leaderboard (one row per feature set x head x params x augment, ranked; leaderboard.csv),
    best (the chosen configuration), report_path (report.html; None for a loaded run that has none),
    nested (the headline: nested.json, the nested-CV estimate of the whole selection, with its 95%
    interval under nested["accuracy"]; None when nested CV did not run) and search_progress (the
    search's stages and what --budget left out) are there either way. The rest
    says what this process did and is empty for a loaded run: stages (stage -> seconds),
    reused_everything, dataset, extract, evaluate, finetune, seconds."""
    run_dir: Path
    leaderboard: pd.DataFrame
    best: dict
    report_path: Optional[Path]
    stages: dict[str, float] = field(default_factory=dict)   # stage -> seconds, in the order they ran
    reused_everything: bool = False      # no image extracted and no CV fold fitted
    dataset: Optional[Dataset] = None
    extract: Optional[ExtractReport] = None
    evaluate: Optional[EvaluateReport] = None
    finetune: Any = None                 # what featurepipe.training.finetune.finetune returned, when it ran
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    nested: Optional[dict] = None        # nested.json: accuracy {mean, std, ...}, metrics, optimism_gap, folds
    cache_dir: Optional[Path] = None     # the cache predict reads features from (None: the one the run records)
    # The anytime search's stages (feature sets added, nested accuracy and seconds after each), the
    # budget and what it left out: config.json's "search_progress" (None for a run `evaluate` wrote).
    search_progress: Optional[dict] = None

    def predict(self, inputs: str | os.PathLike | Sequence[str | os.PathLike], **options) -> pd.DataFrame:
        """Class probabilities for image files and/or folders, with the run's model: one row per image,
        the columns of `featurepipe predict --json` (and of its CSV): path, label, probability,
        label_i/prob_i for the top k, p[<class>] for every class, error (set for an image that could
        not be read; it never stops the others). `options`: featurepipe.predict's (top_k, model,
        batch_size, trust, progress, cache_dir)."""
        from featurepipe.deploy.predict import predict

        if isinstance(inputs, (str, os.PathLike)):
            inputs = [inputs]
        options.setdefault("cache_dir", self.cache_dir)
        return predict(self.run_dir, list(inputs), **options).frame

    @property
    def message(self) -> str:
        if self.evaluate is None or self.extract is None:
            return f"run directory {self.run_dir}"
        if self.reused_everything:
            return "nothing changed: all features and CV folds reused"
        ex, ev = self.extract, self.evaluate
        views = f" + {ex.views_extracted} views" if ex.views_extracted else ""
        return (f"extracted {ex.extracted} images{views} ({ex.reused} reused), fitted {ev.fitted} CV folds "
                f"({ev.reused} reused)")

    def to_dict(self) -> dict:
        finetune = self.finetune
        if finetune is not None and hasattr(finetune, "to_dict"):
            finetune = finetune.to_dict()
        return {
            "run_dir": str(self.run_dir), "report": str(self.report_path) if self.report_path else None,
            "best": self.best, "nested": self.nested,
            "reused_everything": self.reused_everything, "message": self.message,
            "stages": {k: round(v, 3) for k, v in self.stages.items()}, "seconds": round(self.seconds, 3),
            "dataset": {"source": str(self.dataset.source), "images": len(self.dataset),
                        "classes": self.dataset.class_counts(), "splits": self.dataset.splits}
            if self.dataset is not None else None,
            "extract": self.extract.to_dict() if self.extract is not None else None,
            "evaluate": {k: v for k, v in self.evaluate.to_dict().items() if k != "extract"}
            if self.evaluate is not None else None,
            "finetune": json.loads(json.dumps(finetune, default=str)) if finetune is not None else None,
            "warnings": self.warnings, "search_progress": self.search_progress,
        }


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during `run` (a KeyboardInterrupt still): `run_dir` holds the last finished stage's whole
    run (None when no stage had finished), `feature_sets` the sets it searched."""

    def __init__(self, run_dir: Optional[Path], feature_sets: Sequence[str], total: int):
        self.run_dir, self.feature_sets, self.total = run_dir, list(feature_sets), total
        super().__init__(self.message)

    @property
    def message(self) -> str:
        if self.run_dir is None:
            return ("stopped before the first feature set was evaluated; the features extracted so far are "
                    "cached, and running the same command again continues from them")
        return (f"stopped; the {len(self.feature_sets)} finished feature set(s) of {self.total} and their result "
                f"are kept in {self.run_dir} (load_run / predict / report work on it); running the same "
                f"command again continues, reusing the finished features and CV folds")


def run(
    data: str | os.PathLike,
    config: Optional[SearchConfig] = None,
    cache_dir: Optional[str | os.PathLike] = None,
    *,
    quick: bool = False,
    finetune: bool | FinetuneConfig | None = None,
    run_dir: Optional[str | os.PathLike] = None,
    progress: Optional[ProgressCallback] = None,
    n_jobs: int = -1,
    thumbnails: int = 24,
    exclude: Optional[str | os.PathLike] = None,
    relabel: Optional[str | os.PathLike] = None,
    inspect: bool = True,
    groups: Optional[str] = None,
    groups_from: Optional[str | os.PathLike] = None,
    budget: Optional[float] = DEFAULT_BUDGET,
    **search,
) -> RunResult:
    """The whole job on DATA (`featurepipe run DATA`); returns the run (RunResult): where it was
    written, its leaderboard, the nested-CV headline, the report, `predict(paths)`, what each stage cost.

    What is searched: `config` (evaluation.config.SearchConfig), or when it is None exactly what
    `featurepipe run DATA` searches, SearchConfig.default(quick=quick, **search): `quick=True` is
    `--quick`, and `search` takes the CLI's search options by their Python names (heads=("logreg",),
    backbone="efficientnet_lite1", resize="squash", folds=5, seed=1, augment=2, nested=False, ...).
    Each feature set is extracted once, with config.augment's views, and compared on cached features.
    `finetune`: True (`--finetune`: the default FinetuneConfig()) or a training.config.FinetuneConfig
    to also fine-tune the chosen model; None or False: no fine-tuning. `cache_dir`: the cache root
    (default $FEATUREPIPE_CACHE, else ./cache); `run_dir`: where the run is written (default a new
    folder under CACHE/runs/).

    The feature sets are searched in stages, in config.specs' order (evaluation.stages): each stage's
    nested result is reported through `progress` (a "search" event) as soon as it is written, and a
    KeyboardInterrupt becomes RunInterrupted, naming the run the last finished stage left.
    `budget`: seconds for the search (default evaluation.search.DEFAULT_BUDGET; None or 0: no limit):
    a feature set whose extraction and evaluation, estimated from what this run measured, would not
    fit is left out and the result says so (feature sets already cached always fit)."""
    budget = check_budget(budget)
    if config is None:
        config = SearchConfig.default(quick=quick, **search)
    elif quick or search:
        raise UsageError(f"give either config=SearchConfig(...) or the search options "
                         f"({', '.join(sorted(search)) or 'quick'}), not both")
    if finetune is True:
        finetune = FinetuneConfig()
    elif finetune is False:
        finetune = None
    started = time.perf_counter()
    stages: dict[str, float] = {}
    root = cache_root(cache_dir)
    specs = list(dict.fromkeys(s.resolved() for s in config.specs))

    def timed(name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        value = fn(*args, **kwargs)
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - t0
        return value

    searched = SearchProgress(budget, [feature_set_name(s) for s in specs])
    try:
        dataset, reuse_key, reused_run = _dataset(data, config, root, run_dir, finetune, inspect, thumbnails, groups,
                                                  groups_from, exclude, relabel, timed, progress)
        evaluated, extracts, fitted = _search(dataset, specs, config, root, searched, started, timed, progress,
                                              n_jobs, Path(run_dir) if run_dir is not None else reused_run,
                                              reuse_key)
        result = _finish(dataset, specs, config, root, evaluated, extracts, fitted, searched, reused_run,
                         reuse_key, inspect, finetune, thumbnails, n_jobs, timed, progress)
    except KeyboardInterrupt as stop:
        done = [name for stage in searched.stages for name in stage.added]
        raise RunInterrupted(Path(searched.run_dir) if searched.run_dir else None, done, len(specs)) from stop
    result.stages, result.seconds = stages, time.perf_counter() - started
    return result


def _dataset(data, config, root, run_dir, finetune, inspect, thumbnails, groups, groups_from, exclude, relabel,
             timed, progress):
    """The scanned dataset (--groups-from, then --exclude / --relabel applied), the reuse key of this
    run and DATA's latest run when it has that key (else None)."""
    dataset = timed("scan", scan, data, cache_dir=root, progress=progress, groups_pattern=groups)
    if groups_from is not None:   # --groups-from, before --exclude / --relabel (as evaluate and inspect)
        from featurepipe.data.dataset import load_groups

        dataset = load_groups(dataset, groups_from)
    if exclude is not None or relabel is not None:   # --exclude / --relabel (recorded in config.json)
        from featurepipe.data.edits import apply_fixes

        dataset = apply_fixes(dataset, exclude, relabel)
    # A re-run without --run-dir and with nothing changed (the same images by content, labels,
    # splits and groups; the same search, fine-tuning and inspection) writes into DATA's latest run
    # instead of a new folder: it is the same result, and every re-run used to leave one more. A run
    # stopped after a stage is DATA's latest too, so that running it again continues it; the budget is
    # not part of the key, so that a re-run with a larger one adds to the same run.
    reuse_key = reused_run = None
    if run_dir is None:
        frame = dataset.frame[["hash", "label", "split", "group"]].sort_values(["hash", "label"]).reset_index(drop=True)
        reuse_key = digest("run-reuse/1", frame, repr(config), repr(finetune), bool(inspect), thumbnails)
        reused_run = reusable_run(root, dataset.source, reuse_key)
    return dataset, reuse_key, reused_run


def _extract_group(dataset: Dataset, specs: Sequence, root: Path, augment, progress) -> list[ExtractReport]:
    """One stage's extraction: extraction.shared.extract_many, each image decoded once for all of the
    group's feature sets (and each backbone built once for its resize policies)."""
    return extract_many(dataset, list(specs), root, augment=augment, progress=progress)


def _search(dataset, specs, config, root, searched: SearchProgress, started, timed, progress, n_jobs,
            run_dir: Optional[Path], reuse_key) -> tuple[EvaluateReport, list[ExtractReport], int]:
    """The stages of the search (evaluation.stages): extract a group, evaluate every set done so far
    into the run directory, report, price the next group against the budget. Returns the last
    evaluation, every extraction report and the CV folds fitted over all passes."""
    pace = Pace()
    pending = {s: pending_passes(dataset, s, root, config.augment) for s in specs}
    group, remaining = first_stage(specs, pending), list(specs)
    extracts: list[ExtractReport] = []
    done: list = []
    fitted, groups = 0, 1
    while group:
        reports = timed("extract", _extract_group, dataset, group, root, config.augment, progress)
        for spec, extracted in zip(group, reports):
            pace.extracted(spec, extracted.extracted + extracted.views_extracted, extracted.seconds,
                           extracted.build_seconds)
        extracts += reports
        done = [s for s in specs if s in done or s in group]   # the config's order: the first set stays first
        remaining = [s for s in remaining if s not in group]
        evaluating = time.perf_counter()
        # Evaluate works on what the stores now hold: read once, no model built.
        features = timed("evaluate", cached_features, dataset, done, root, config.augment)
        evaluated = timed("evaluate", evaluate_features, dataset, features, config, root, run_dir=run_dir,
                          n_jobs=n_jobs, progress=progress, extracts=extracts, hold_interrupts=True,
                          run_label=specs[0].name if len(specs) == 1 else "search")
        del features   # the arrays are evaluate's; inspect and report read what they need themselves
        pace.evaluated(len(group), time.perf_counter() - evaluating)
        fitted += evaluated.fitted
        run_dir = evaluated.run_dir   # every later stage rewrites this run
        nested = evaluated.nested.to_dict()["accuracy"] if evaluated.nested is not None else None
        record = StageRecord(
            stage=len(searched.stages) + 1, added=[feature_set_name(s) for s in group], feature_sets=len(done),
            nested={k: nested.get(k) for k in ("mean", "ci_low", "ci_high")} if nested else None,
            best_row=float(evaluated.leaderboard["accuracy_mean"].max()), best=str(evaluated.best.get("features")),
            seconds=time.perf_counter() - started, extracted=sum(r.extracted + r.views_extracted for r in reports))
        searched.stages.append(record)
        searched.run_dir = str(run_dir)
        # The next group, less what the budget leaves out (a group left out entirely: the one after).
        group, coming_s = [], 0.0
        while remaining and not group:
            groups += 1
            candidates = next_group(remaining, groups)
            pending.update({s: pending_passes(dataset, s, root, config.augment) for s in candidates})
            left = None if searched.budget is None else searched.budget - (time.perf_counter() - started)
            group, skipped, coming_s = fit_budget(candidates, pending, pace, left)
            searched.skipped += skipped
            remaining = remaining[len(candidates):]
        with held_interrupt():   # config.json and DATA's latest pointer name this stage's run together
            _record_search(run_dir, searched)
            if reuse_key is not None:   # a Ctrl-C from here on leaves DATA's latest run whole: re-runs continue it
                write_latest(root, dataset.source, run_dir, reuse_key)
        report(progress, "search", record.stage, record.stage + (1 if group else 0),
               stage_message(record, [feature_set_name(s) for s in group], coming_s, searched))
    return evaluated, extracts, fitted


def _record_search(run_dir: Path, searched: SearchProgress) -> None:
    """config.json's "search_progress" (the stages so far, the budget, what it left out) and its note."""
    run = Run.open(run_dir)
    config = dict(run.config)
    config["search_progress"] = searched.to_dict()
    note = searched.skipped_note()
    if note and note not in config.get("notes", []):
        config["notes"] = [*config.get("notes", []), note]
    run.write_json(layout.CONFIG, config)


def _finish(dataset, specs, config, root, evaluated: EvaluateReport, extracts, fitted: int, searched: SearchProgress,
            reused_run, reuse_key, inspect, finetune, thumbnails, n_jobs, timed, progress) -> RunResult:
    """After the search: inspect, fine-tune, report, DATA's latest pointer; the RunResult."""
    if reused_run is not None:
        evaluated.notes.append(f"reused run {reused_run}: same data and search as its last run")
    note = searched.skipped_note()
    if note:
        evaluated.notes.append(note)
    # The last pass refitted only the new sets' folds: count every pass's fits as this run's.
    evaluated.reused = max(0, evaluated.fitted + evaluated.reused - fitted)
    evaluated.fitted = fitted
    extracted = merge_extract_reports(extracts)
    inspect_dir = evaluated.run_dir / layout.INSPECT_DIR
    if inspect:   # know-your-data sections of the report, from cached features and the run's OOF
        from featurepipe.inspection.inspect import inspect_dataset, oof_from_run

        # On the feature set the search chose: the one whose out-of-fold predictions the run keeps.
        chosen = next((s for s in specs if feature_set_name(s) == evaluated.best.get("features")), specs[0])
        timed("inspect", inspect_dataset, dataset, chosen, root, out_dir=inspect_dir,
              oof_source=oof_from_run(evaluated.run_dir), folds=evaluated.folds, seed=config.seed, n_jobs=n_jobs,
              progress=progress)
    elif (inspect_dir / layout.INSPECT_JSON).exists():   # --no-inspect into a reused run dir
        import shutil

        shutil.rmtree(inspect_dir)
    finetuned = None
    if finetune is not None:
        from featurepipe.training.finetune import finetune as finetune_fn

        finetuned = timed("finetune", finetune_fn, evaluated.run_dir, finetune, cache_dir=root, progress=progress)
    from featurepipe.report.write import write_report

    written = timed("report", write_report, evaluated.run_dir, thumbnails=thumbnails, progress=progress,
                    chart_cache=report_charts_dir(root))
    if reuse_key is not None:   # DATA's latest run, for `predict DATA` and the next re-run
        write_latest(root, dataset.source, evaluated.run_dir, reuse_key)
    reused_everything = (extracted.extracted == 0 and extracted.views_extracted == 0 and evaluated.fitted == 0
                         and (finetune is None or bool(getattr(finetuned, "reused", False))))
    return RunResult(
        run_dir=evaluated.run_dir, leaderboard=evaluated.leaderboard, best=evaluated.best,
        report_path=written.html_path, reused_everything=reused_everything, dataset=dataset,
        extract=extracted, evaluate=evaluated, finetune=finetuned,
        warnings=list(dataset.warnings), nested=evaluated.nested.to_dict() if evaluated.nested is not None else None,
        cache_dir=root, search_progress=searched.to_dict(),
    )


def load_run(run_dir: str | os.PathLike, cache_dir: Optional[str | os.PathLike] = None) -> RunResult:
    """The run directory RUN, written by `run` or `evaluate` (Python or CLI), as the RunResult `run`
    returned: run_dir, leaderboard, best, nested, report_path (None until `featurepipe report RUN`
    writes one) and `predict(paths)`. `cache_dir`: where predict reads features (default: the cache
    the run records). Nothing is recomputed; what this process did (stages, timings) is empty."""
    run = Run.open(run_dir)
    board_path = run.file(layout.LEADERBOARD)
    if not board_path.exists() or not run.has_head():
        missing = layout.LEADERBOARD if not board_path.exists() else layout.HEAD_META
        raise FeaturepipeError(f"{run.path} has no {missing}: it is not a finished run; re-run `featurepipe run` "
                               f"or `featurepipe evaluate` on its data")
    try:
        # Only empty cells are missing values, as the report reads it ("NA" may be a class or a param).
        leaderboard = csvcells.read(board_path, keep_default_na=False, na_values=[""],
                                    dtype={c: str for c in _TEXT_COLUMNS})
    except (OSError, ValueError, pd.errors.ParserError) as error:
        raise FeaturepipeError(f"{board_path} cannot be read as CSV ({error}); re-run `featurepipe evaluate`") from None
    meta = run.head_meta
    best = {k: meta[k] for k in ("head", "params", "augment", "tta", "features") if k in meta}
    nested_path = run.file(layout.NESTED)
    nested = read_json(nested_path, f"{nested_path} is missing") if nested_path.exists() else None
    report = run.file(layout.REPORT)
    warnings = list((run.config.get("dataset") or {}).get("warnings") or [])
    return RunResult(run_dir=run.path, leaderboard=leaderboard, best=best,
                     report_path=report if report.exists() else None, warnings=warnings, nested=nested,
                     cache_dir=Path(cache_dir).expanduser() if cache_dir is not None else None,
                     search_progress=run.config.get("search_progress"))
