"""`run`'s anytime search on one data set (not a test): when each stage's result arrives, what it is,
and what the stages cost against evaluating everything in one pass.

    python benchmarks/anytime.py [--data data/demo] [--budget 0] [--compare] [--folds 5]

Runs `featurepipe.run` with the default search in a fresh temporary cache and notes the wall time of
every stage's "search" progress event (its line in the CLI). With --compare it runs again in another
fresh cache with the search in one stage (every feature set extracted, then one evaluate pass: what
`run` did before the anytime search), so the two totals show what the extra evaluate passes cost.
Prints one JSON object. Timings depend on the machine's load: note `uptime` next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one(data: str, cache: Path, budget: float, folds: int, staged: bool) -> dict:
    from featurepipe import pipeline
    from featurepipe.evaluation.config import SearchConfig

    started = time.perf_counter()
    lines = []

    def progress(event) -> None:
        if event.stage == "search":
            lines.append({"at_s": round(time.perf_counter() - started, 1), "line": event.message})

    real = pipeline.first_stage
    if not staged:   # the search before it was anytime: every feature set in the first (only) stage
        pipeline.first_stage = lambda specs, pending: list(specs)
    try:
        result = pipeline.run(data, SearchConfig.default(folds=folds), cache, budget=budget, progress=progress,
                              inspect=False)
    finally:
        pipeline.first_stage = real
    return {
        "total_s": round(time.perf_counter() - started, 1),
        "stages_s": {k: round(v, 1) for k, v in result.stages.items()},
        "search_lines": lines,
        "stages": [{k: s[k] for k in ("added", "feature_sets", "nested", "seconds")}
                   for s in result.search_progress["stages"]],
        "skipped": result.search_progress["skipped"],
        "nested": result.nested["accuracy"]["mean"] if result.nested else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO / "data" / "demo"), help="a folder, or a benchmarks/datasets.py name")
    parser.add_argument("--budget", type=float, default=0.0, help="run's --budget (0: no limit)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--compare", action="store_true", help="also run the search as one stage, in a fresh cache")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    data = args.data
    with tempfile.TemporaryDirectory(prefix="featurepipe-anytime-") as scratch:
        if not Path(data).exists():   # a named benchmark set
            from benchmarks.datasets import named

            data = str(named(data, Path(scratch) / "data", REPO / "data" / "demo"))
        out = {"data": args.data, "budget": args.budget, "load": os.getloadavg(),
               "anytime": one(data, Path(scratch) / "cache-anytime", args.budget, args.folds, staged=True)}
        if args.compare:
            out["one_stage"] = one(data, Path(scratch) / "cache-one-stage", args.budget, args.folds, staged=False)
        out["load_after"] = os.getloadavg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
