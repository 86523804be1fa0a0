"""`featurepipe run`: scan -> extract -> evaluate -> (fine-tune) -> report, as one job.

Every stage is incremental on its own (content-hashed features, per-fold CV results on disk), so
running the same command again with nothing changed only refits the best head and rewrites the
report: seconds, and the result says so.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from featurepipe.core.cachedirs import cache_root, report_charts_dir
from featurepipe.core.progress import ProgressCallback
from featurepipe.data.dataset import Dataset, scan
from featurepipe.evaluation.config import SearchConfig, feature_set_name
from featurepipe.evaluation.evaluate import EvaluateReport, evaluate_features, merge_extract_reports
from featurepipe.extraction.extract import ExtractReport, extract
from featurepipe.extraction.features import cached_features
from featurepipe.rundir import layout
from featurepipe.training.config import FinetuneConfig


@dataclass
class RunResult:
    run_dir: Path
    leaderboard: pd.DataFrame
    best: dict
    report_path: Path
    stages: dict[str, float]             # stage -> seconds, in the order they ran
    reused_everything: bool              # no image extracted and no CV fold fitted
    dataset: Dataset
    extract: ExtractReport
    evaluate: EvaluateReport
    finetune: Any = None                 # what featurepipe.training.finetune.finetune returned, when it ran
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
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
            "run_dir": str(self.run_dir), "report": str(self.report_path), "best": self.best,
            "nested": self.evaluate.nested.to_dict() if self.evaluate.nested is not None else None,
            "reused_everything": self.reused_everything, "message": self.message,
            "stages": {k: round(v, 3) for k, v in self.stages.items()}, "seconds": round(self.seconds, 3),
            "dataset": {"source": str(self.dataset.source), "images": len(self.dataset),
                        "classes": self.dataset.class_counts(), "splits": self.dataset.splits},
            "extract": self.extract.to_dict(),
            "evaluate": {k: v for k, v in self.evaluate.to_dict().items() if k != "extract"},
            "finetune": json.loads(json.dumps(finetune, default=str)) if finetune is not None else None,
            "warnings": self.warnings,
        }


def run(
    data: str | os.PathLike,
    config: SearchConfig,
    cache_dir: Optional[str | os.PathLike] = None,
    *,
    finetune: Optional[FinetuneConfig] = None,
    run_dir: Optional[str | os.PathLike] = None,
    progress: Optional[ProgressCallback] = None,
    n_jobs: int = -1,
    thumbnails: int = 24,
    exclude: Optional[str | os.PathLike] = None,
    relabel: Optional[str | os.PathLike] = None,
    inspect: bool = True,
    groups: Optional[str] = None,
    groups_from: Optional[str | os.PathLike] = None,
) -> RunResult:
    """The whole job on DATA; returns where the run was written and what each stage cost.

    `config` says what is searched (evaluation.config.SearchConfig; `featurepipe run` passes
    featurepipe.evaluation.search.search_specs() as its specs): each feature set is extracted once,
    with config.augment's views, and compared on cached features. `finetune`: also fine-tune the
    chosen model with these options (training.config.FinetuneConfig); None: no fine-tuning."""
    started = time.perf_counter()
    stages: dict[str, float] = {}
    root = cache_root(cache_dir)
    specs = list(dict.fromkeys(s.resolved() for s in config.specs))

    def timed(name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        value = fn(*args, **kwargs)
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - t0
        return value

    dataset = timed("scan", scan, data, cache_dir=root, progress=progress, groups_pattern=groups)
    if groups_from is not None:   # --groups-from, before --exclude / --relabel (as evaluate and inspect)
        from featurepipe.data.dataset import load_groups

        dataset = load_groups(dataset, groups_from)
    if exclude is not None or relabel is not None:   # --exclude / --relabel (recorded in config.json)
        from featurepipe.data.edits import apply_fixes

        dataset = apply_fixes(dataset, exclude, relabel)
    extracts = [timed("extract", extract, dataset, s, root, augment=config.augment, progress=progress) for s in specs]
    # Evaluate works on what the stores now hold: read once, no model built.
    features = timed("evaluate", cached_features, dataset, specs, root, config.augment)
    evaluated = timed("evaluate", evaluate_features, dataset, features, config, root,
                      run_dir=Path(run_dir) if run_dir is not None else None, n_jobs=n_jobs, progress=progress,
                      extracts=extracts)
    del features   # the arrays are evaluate's; inspect and report read what they need themselves
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
    reused_everything = (extracted.extracted == 0 and extracted.views_extracted == 0 and evaluated.fitted == 0
                         and (finetune is None or bool(getattr(finetuned, "reused", False))))
    return RunResult(
        run_dir=evaluated.run_dir, leaderboard=evaluated.leaderboard, best=evaluated.best,
        report_path=written.html_path, stages=stages, reused_everything=reused_everything, dataset=dataset,
        extract=extracted, evaluate=evaluated, finetune=finetuned, seconds=time.perf_counter() - started,
        warnings=list(dataset.warnings),
    )
