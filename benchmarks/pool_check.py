"""The default search's pool against the 9-set search it replaced, on several fold seeds (not a test).

    python benchmarks/pool_check.py --data data/demo --data photos-animals ... --seeds 0,1,2 --cache-dir DIR

vote_selection.py chose the pool on one fold seed, from the 9-set search's own CV results. This runs
each procedure as `run` does (evaluate with that search alone: its own C widening and vote, nested CV)
on every fold seed given, and prints each set's mean over the seeds:
  vote9: Lite0/1/2 x squash/center_crop/letterbox (`run --resize auto`; the default until 2026-12)
  pool3: the default pool (evaluation.search.DEFAULT_POOL)
  pool2: its first two sets (Lite1 center_crop + Lite0 squash)
  quick: its first set alone (`run --quick`)
with the predict cost of each (Lite0 passes per image).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.accuracy import _data  # noqa: E402


def procedures():
    from featurepipe.evaluation import search

    pool = search.search_specs()
    return {"vote9": search.search_specs(resize="auto"), "pool3": pool, "pool2": pool[:2], "quick": pool[:1]}


def one(data: Path, cache: Path, seed: int) -> dict:
    from featurepipe.data.dataset import scan
    from featurepipe.evaluation.config import SearchConfig
    from featurepipe.evaluation.cost import set_cost
    from featurepipe.evaluation.evaluate import evaluate

    dataset = scan(data, cache_dir=cache)
    out = {"accuracy": {}, "cost": {}}
    for name, specs in procedures().items():
        with tempfile.TemporaryDirectory() as run_dir:
            result = evaluate(dataset, SearchConfig(specs=tuple(specs), seed=seed), cache, run_dir=Path(run_dir) / "r")
        out["accuracy"][name] = result.nested.accuracy
        out["cost"][name] = set_cost(specs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cache-dir", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="featurepipe-pool-") as scratch:
        for name in args.data:
            draws = [one(_data(name, Path(scratch)), args.cache_dir, int(s)) for s in args.seeds.split(",")]
            row = {"data": name, "draws": [d["accuracy"] for d in draws], "cost": draws[0]["cost"],
                   "accuracy": {k: float(np.mean([d["accuracy"][k] for d in draws])) for k in draws[0]["accuracy"]}}
            print(json.dumps(row), flush=True)
            rows.append(row)
    names = list(rows[0]["accuracy"])
    print("\n| procedure | " + " | ".join(r["data"] for r in rows) + " | mean | worst vs vote9 | cost |")
    print("|" + " --- |" * (len(rows) + 4))
    for n in names:
        accs = [r["accuracy"][n] for r in rows]
        worst = min(a - r["accuracy"]["vote9"] for a, r in zip(accs, rows))
        print(f"| {n} | " + " | ".join(f"{a:.3f}" for a in accs) + f" | {np.mean(accs):.3f} | {100 * worst:+.1f} |"
              f" {rows[0]['cost'][n]:.2f} |")


if __name__ == "__main__":
    main()
