"""The logreg head's feature front, compared inside the default vote (not a test).

    python benchmarks/fronts.py --data data/demo --data demo10:1 --data demo10:2 --data demo15:3 \\
        --data demo15:4 --data fmnist12:1 --data fmnist30 --data fmnist100 [--cache-dir DIR]

For each data set and each front (`sqrt`: signed square root + L2, the default; `standard`:
standardize + L2, the previous default; `l2`: L2 only), `evaluate` runs the default search restricted
to logreg (every EfficientNet-Lite x resize feature set, C by CV, the vote of each set's best logreg)
with nested 5-fold CV, seed 0, the same folds for every front. Prints one JSON line per data set
and front, then a table of nested accuracies.

Data names: a folder; `fmnistN[:seed]` (Debian's dataset-fashion-mnist, N per class, see datasets.py);
`demoN:seed` (N photos per class drawn from data/demo with that seed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
FRONTS = ("standard", "l2", "sqrt")


def _data(name: str, scratch: Path) -> Path:
    from benchmarks.datasets import named

    return named(name, scratch, REPO / "data" / "demo")


def one(data: Path, cache: Path, front: str, seed: int = 0) -> dict:
    from featurepipe.data.dataset import scan
    from featurepipe.evaluation.config import SearchConfig
    from featurepipe.evaluation.evaluate import evaluate
    from featurepipe.evaluation.search import search_specs

    dataset = scan(data, cache_dir=cache)
    specs = search_specs()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        result = evaluate(dataset, SearchConfig(specs=specs, heads=("logreg",), seed=seed,
                                                grids={"logreg": {"front": [front]}}, vote=True),
                          cache, run_dir=Path(run_dir) / "run")
    return {"data": str(data), "front": front, "images": len(dataset.frame), "nested": result.nested.accuracy,
            "best_row": result.nested.best_inner_accuracy, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", default=None)
    parser.add_argument("--front", action="append", default=None, choices=FRONTS)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    names = args.data or [str(REPO / "data" / "demo"), "fmnist30"]
    fronts = args.front or list(FRONTS)
    table = {}
    with tempfile.TemporaryDirectory(prefix="featurepipe-fronts-") as scratch:
        cache = args.cache_dir or Path(scratch) / "cache"
        for name in names:
            data = _data(name, Path(scratch))
            for front in fronts:
                figures = one(data, cache, front)
                print(json.dumps(figures), flush=True)
                table[name, front] = figures["nested"]
    print(f"\n{'data':<12}" + "".join(f"{f:>10}" for f in fronts))
    for name in names:
        print(f"{Path(name).name:<12}" + "".join(f"{table[name, f]:10.3f}" for f in fronts))
    print(f"{'mean':<12}" + "".join(f"{sum(table[n, f] for n in names) / len(names):10.3f}" for f in fronts))


if __name__ == "__main__":
    main()
