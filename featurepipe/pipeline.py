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
from typing import Any, Optional, Sequence

import pandas as pd

from featurepipe.backbones.spec import BackboneSpec
from featurepipe.data.dataset import Dataset, scan
from featurepipe.evaluation.evaluate import DEFAULT_HEADS, EvaluateReport, evaluate_features, feature_set_name, merge_extract_reports
from featurepipe.extraction.extract import ExtractReport, extract
from featurepipe.extraction.features import cached_features
from featurepipe.data.augment import AugmentSpec
from featurepipe.evaluation.nested import ENSEMBLE_SIZE
from featurepipe.core.cachedirs import cache_root
from featurepipe.core.progress import ProgressCallback


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
    spec: BackboneSpec = BackboneSpec(),
    cache_dir: Optional[str | os.PathLike] = None,
    heads: tuple[str, ...] = DEFAULT_HEADS,
    folds: Optional[int] = None,
    repeats: int = 1,
    seed: int = 0,
    augment: AugmentSpec | int = 0,
    tta: bool = False,
    finetune: bool = False,
    finetune_epochs: Optional[int] = None,
    run_dir: Optional[str | os.PathLike] = None,
    progress: Optional[ProgressCallback] = None,
    grids: Optional[dict] = None,
    n_jobs: int = -1,
    thumbnails: int = 24,
    specs: Optional[Sequence[BackboneSpec]] = None,
    nested: bool = True,
    ensemble: int = ENSEMBLE_SIZE,
    vote: bool = True,
    dedup_groups: bool = True,
    exclude: Optional[str | os.PathLike] = None,
    relabel: Optional[str | os.PathLike] = None,
    inspect: bool = True,
) -> RunResult:
    """The whole job on DATA; returns where the run was written and what each stage cost.

    `specs` are the feature sets searched (default: just `spec`; `featurepipe run` passes
    featurepipe.evaluation.search.search_specs()), each extracted once and compared on cached features.
    `augment`: the augmented views (an AugmentSpec, or a bare count with the default policy and seed 0)."""
    started = time.perf_counter()
    stages: dict[str, float] = {}
    root = cache_root(cache_dir)
    specs = list(dict.fromkeys(s.resolved() for s in (specs or [spec])))
    augment = AugmentSpec.of(augment)

    def timed(name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        value = fn(*args, **kwargs)
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - t0
        return value

    dataset = timed("scan", scan, data, cache_dir=root, progress=progress)
    if exclude is not None or relabel is not None:   # issue 11: --exclude / --relabel (recorded in config.json)
        from featurepipe.data.edits import apply_fixes

        dataset = apply_fixes(dataset, exclude, relabel)
    extracts = [timed("extract", extract, dataset, s, root, augment=augment, progress=progress) for s in specs]
    # Evaluate works on what the stores now hold: read once, no model built.
    features = timed("evaluate", cached_features, dataset, specs, root, augment)
    evaluated = timed("evaluate", evaluate_features, dataset, features, root, heads=tuple(heads), grids=grids,
                      folds=folds, repeats=repeats, seed=seed, tta=tta,
                      run_dir=Path(run_dir) if run_dir is not None else None, n_jobs=n_jobs, progress=progress,
                      nested=nested, ensemble=ensemble, dedup_groups=dedup_groups, extracts=extracts, vote=vote)
    del features   # the arrays are evaluate's; inspect and report read what they need themselves
    extracted = merge_extract_reports(extracts)
    if inspect:   # issue 11: know-your-data sections of the report, from cached features and the run's OOF
        from featurepipe.inspection.inspect import inspect_dataset, oof_from_run

        # On the feature set the search chose: the one whose out-of-fold predictions the run keeps.
        chosen = next((s for s in specs if feature_set_name(s) == evaluated.best.get("features")), specs[0])
        timed("inspect", inspect_dataset, dataset, chosen, root, out_dir=evaluated.run_dir / "inspect",
              oof_source=oof_from_run(evaluated.run_dir), folds=evaluated.folds, seed=seed, n_jobs=n_jobs, progress=progress)
    elif (evaluated.run_dir / "inspect" / "inspect.json").exists():   # --no-inspect into a reused run dir
        import shutil

        shutil.rmtree(evaluated.run_dir / "inspect")
    finetuned = None
    if finetune:
        from featurepipe.training.finetune import finetune as finetune_fn

        kwargs: dict[str, Any] = {"cache_dir": root, "progress": progress}
        if finetune_epochs is not None:
            kwargs["epochs"] = finetune_epochs
        finetuned = timed("finetune", finetune_fn, evaluated.run_dir, **kwargs)
    from featurepipe.report.html import write_report

    written = timed("report", write_report, evaluated.run_dir, thumbnails=thumbnails, progress=progress,
                    chart_cache=root / "report-charts")
    reused_everything = (extracted.extracted == 0 and extracted.views_extracted == 0 and evaluated.fitted == 0
                         and (not finetune or bool(getattr(finetuned, "reused", False))))
    return RunResult(
        run_dir=evaluated.run_dir, leaderboard=evaluated.leaderboard, best=evaluated.best,
        report_path=written.html_path, stages=stages, reused_everything=reused_everything, dataset=dataset,
        extract=extracted, evaluate=evaluated, finetune=finetuned, seconds=time.perf_counter() - started,
        warnings=list(dataset.warnings),
    )
