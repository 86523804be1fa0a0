"""The anytime search of `run`: which feature sets each stage takes, what a stage is expected to cost,
and which feature sets a time budget leaves out.

`run` used to extract every feature set and then evaluate them all at once: nothing to see, and
nothing kept on Ctrl-C, until the very end. It now goes in stages (evaluation.search.STAGE_SIZES, in
SEARCH_ORDER): each stage extracts its feature sets, then one evaluate pass over every set done so far
rewrites the run directory. The first result comes after one feature set, and a Ctrl-C keeps the last
finished stage's whole run. This module is the plan and the prices; pipeline.run does the work.

Prices come from what this process measured: seconds per image per Lite0 pass of the extraction done
so far (evaluation.cost.pass_cost prices each feature set in Lite0 passes) and evaluate seconds per
added feature set. Images whose features are cached cost nothing, so a set the cache already holds is
always searched: a re-run with a warm cache never drops what its first run found, whatever the budget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from featurepipe.backbones.spec import BackboneSpec
from featurepipe.core.errors import UsageError
from featurepipe.data.augment import AugmentSpec
from featurepipe.data.dataset import Dataset
from featurepipe.evaluation.config import feature_set_name
from featurepipe.evaluation.cost import pass_cost
from featurepipe.evaluation.search import STAGE_SIZES

# Seconds per image per Lite0 pass until this process has extracted something to measure it by (the
# first stage's feature set was cached and a later one is not): Lite0 ran 30-36 images/s on this
# project's 2-core CPU, its model build included (benchmarks/README, default search, 2,000 images).
PRIOR_SECONDS_PER_PASS = 0.03


def check_budget(budget: Optional[float]) -> Optional[float]:
    """--budget / budget=: seconds (None or 0: no limit, returned as None)."""
    if budget is None or budget == 0:
        return None
    try:
        seconds = float(budget)
    except (TypeError, ValueError):
        raise UsageError(f"--budget must be a number of seconds (0: no limit), not {budget!r}") from None
    if not seconds > 0 or seconds == float("inf"):
        raise UsageError(f"--budget must be a finite number of seconds above 0 (0: no limit), not {budget}")
    return seconds


def pending_passes(dataset: Dataset, spec: BackboneSpec, root: Path, augment: AugmentSpec) -> int:
    """Images and augmented views of `dataset` that `spec` still has to run through its backbone (not in
    its stores, not remembered as undecodable). No model is built and no new store is made."""
    from featurepipe.backbones.fingerprint import backbone_fingerprint
    from featurepipe.extraction.extract import missing_now, unique_images
    from featurepipe.extraction.features import open_stores, store_exists

    images = unique_images(dataset.frame)
    fingerprint, _ = backbone_fingerprint(spec, root)
    if not store_exists(root, fingerprint):
        return len(images) * (1 + augment.count)   # never extracted: everything
    # What extract itself would find missing (originals and views, less remembered failures).
    return sum(len(keys) for keys in missing_now(open_stores(spec, root, augment), images).values())


@dataclass
class Pace:
    """What this process measured: extraction seconds per image per Lite0 pass, seconds to build a
    backbone (its weights converted on first use: a cost per feature set, not per image), and
    evaluate seconds per feature set added by a stage."""
    extract_seconds: float = 0.0       # extraction less the model builds
    passes: float = 0.0                # images + views run, each weighted by its set's pass_cost
    build_seconds: float = 0.0
    builds: int = 0
    evaluate_seconds: float = 0.0
    evaluated_sets: int = 0            # the sets added by the passes measured

    def extracted(self, spec: BackboneSpec, passes: int, seconds: float, build_seconds: float = 0.0) -> None:
        if passes > 0:   # an all-cached set measures nothing about the machine
            self.extract_seconds += max(0.0, seconds - build_seconds)
            self.passes += passes * pass_cost(spec)
            self.build_seconds += build_seconds
            self.builds += 1

    def evaluated(self, added: int, seconds: float) -> None:
        self.evaluate_seconds += seconds
        self.evaluated_sets += added

    @property
    def seconds_per_pass(self) -> float:
        return self.extract_seconds / self.passes if self.passes > 0 else PRIOR_SECONDS_PER_PASS

    def estimate(self, spec: BackboneSpec, pending: int) -> float:
        """Seconds to add `spec` to the search: build its model and extract its `pending` passes (when
        there are any), then evaluate it."""
        per_set = self.evaluate_seconds / self.evaluated_sets if self.evaluated_sets else 0.0
        if pending == 0:
            return per_set
        build = self.build_seconds / self.builds if self.builds else 0.0
        return build + pending * pass_cost(spec) * self.seconds_per_pass + per_set


def first_stage(specs: Sequence[BackboneSpec], pending: dict) -> list[BackboneSpec]:
    """The first feature set, and with it every one the cache already holds (they cost one evaluate
    pass, not a stage of their own: a re-run with nothing changed is one pass, as before)."""
    return [specs[0], *(s for s in specs[1:] if pending[s] == 0)]


def next_group(remaining: Sequence[BackboneSpec], stage: int) -> list[BackboneSpec]:
    """The feature sets stage number `stage` (1-based) would take from `remaining`, in order."""
    size = STAGE_SIZES[stage - 1] if stage <= len(STAGE_SIZES) else len(remaining)
    return list(remaining[:size])


@dataclass
class Skipped:
    """A feature set the budget left out."""
    feature_set: str
    estimate_s: float           # its estimated extraction + evaluation
    left_s: float               # what the budget had left when it was priced

    def to_dict(self) -> dict:
        return {k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(self).items()}


def fit_budget(group: Sequence[BackboneSpec], pending: dict, pace: Pace,
               left: Optional[float]) -> tuple[list[BackboneSpec], list[Skipped], float]:
    """(kept, skipped, estimated seconds of the kept): the sets of `group` whose estimate fits in
    `left` seconds, in order (a cheaper set after one that does not fit may still fit); a set with
    nothing to extract is always kept. left None: no budget."""
    kept, skipped, total = [], [], 0.0
    for spec in group:
        cost = pace.estimate(spec, pending[spec])
        if left is None or pending[spec] == 0 or cost <= left - total:
            kept.append(spec)
            total += cost
        else:
            skipped.append(Skipped(feature_set_name(spec), cost, max(0.0, left - total)))
    return kept, skipped, total


@dataclass
class StageRecord:
    """One finished stage, as the result, config.json, --json and the report show it."""
    stage: int
    added: list[str]                  # the feature sets this stage added
    feature_sets: int                 # searched so far
    nested: Optional[dict]            # nested CV accuracy after the stage: mean, ci_low, ci_high (None: off)
    best_row: float                   # the leaderboard's best CV accuracy (optimistic)
    best: str                         # the chosen model's features ("vote" when one per set)
    seconds: float                    # since the run started, when this stage's run was written
    extracted: int                    # images + views run through a backbone in this stage

    def to_dict(self) -> dict:
        data = asdict(self)
        data["seconds"] = round(self.seconds, 1)
        return data


@dataclass
class SearchProgress:
    """The anytime search as it went: config.json's "search_progress", RunResult.search_progress."""
    budget: Optional[float]
    order: list[str]                          # every feature set asked for, in the order taken
    stages: list[StageRecord] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    run_dir: Optional[str] = None             # the run the last finished stage wrote (not recorded: it is the run)

    def to_dict(self) -> dict:
        return {"budget": self.budget, "order": self.order, "stages": [s.to_dict() for s in self.stages],
                "skipped": [s.to_dict() for s in self.skipped]}

    def skipped_note(self) -> Optional[str]:
        """What the budget left out and why, for the notes (result, config.json, CLI)."""
        if not self.skipped:
            return None
        names = ", ".join(s.feature_set for s in self.skipped)
        need = sum(s.estimate_s for s in self.skipped)
        return (f"--budget {self.budget:g} s: {len(self.skipped)} of {len(self.order)} feature sets not searched "
                f"({names}): their extraction and evaluation were estimated at ~{need:.0f} s more than the budget "
                f"had left; re-run with a larger --budget (0: no limit) to add them: what is done is reused")


def stage_message(record: StageRecord, coming: Sequence[str], coming_s: float, progress: SearchProgress) -> str:
    """The line the CLI prints after a stage: its result, and what comes next."""
    added = ", ".join(record.added)
    sets = f" ({record.feature_sets} feature sets)" if record.feature_sets > len(record.added) else ""
    if record.nested is not None:
        ci = "" if record.nested.get("ci_low") is None else \
            f" ({record.nested['ci_low']:.3f}-{record.nested['ci_high']:.3f})"
        score = f"nested {record.nested['mean']:.3f}{ci}"
    else:
        score = f"best CV row {record.best_row:.3f} (optimistic)"
    if coming:
        more = f"{len(coming)} more feature set{'s' if len(coming) != 1 else ''}"
        after = f"next: {more}, ~{coming_s:.0f} s"
    else:
        after = "search done"
        if progress.skipped:
            after += f", {len(progress.skipped)} left out by --budget {progress.budget:g} s"
    return f"{added}{sets}: {score} after {record.seconds:.0f} s; {after}"
