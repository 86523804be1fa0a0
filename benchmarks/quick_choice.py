"""Which single feature set `run --quick` should search, by measurement (not a test).

    python benchmarks/quick_choice.py --data data/demo --data photos-animals --data photos-scenes \
        --data photos-produce --data photos-objects --data fmnist30 [--cache-dir DIR]

For each data set: nested-CV accuracy of `featurepipe run --quick`'s procedure (logreg, knn and ncm
searched, their soft vote tried, all scored by nested CV) on each of the default search's feature sets
on its own (EfficientNet-Lite0/1/2 x squash, center_crop, letterbox), next to the seeds' recipe (frozen
Lite0 on squashed images, Dense 256 trained 50 epochs; benchmarks/accuracy.py's (a)) on the same
5 stratified folds, seed 0. Also how long each backbone's extraction took per image here. Prints one
JSON object per set and a table; the mean over sets is what the choice should rest on, with the worst
set beside it (a default must not lose badly anywhere).
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

import numpy as np  # noqa: E402

from benchmarks.accuracy import _data, seeds_dense  # noqa: E402


def one(data: Path, cache: Path, seed: int = 0) -> dict:
    from featurepipe.backbones.spec import BackboneSpec
    from featurepipe.data.dataset import scan
    from featurepipe.evaluation.config import SearchConfig, feature_set_name
    from featurepipe.evaluation.evaluate import evaluate
    from featurepipe.evaluation.folds import make_folds
    from featurepipe.evaluation.search import search_specs
    from featurepipe.extraction.extract import extract, open_stores
    from featurepipe.extraction.features import dataset_features

    dataset = scan(data, cache_dir=cache)
    seeds = BackboneSpec(name="efficientnet_lite0", resize="squash").resolved()
    extract(dataset, seeds, cache)
    features = dataset_features(dataset, open_stores(seeds, cache))
    classes = list(dataset.classes)
    y = features.frame["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    folds = make_folds(y, n_folds=5, seed=seed)
    out = {"data": str(data), "images": len(y), "classes": len(classes),
           "seeds_dense": float(np.mean([seeds_dense(features.X, y, f.train_idx, f.val_idx, seed) for f in folds])),
           "feature_sets": {}, "extract_seconds_per_image": {}}
    for spec in search_specs():
        started = time.perf_counter()
        report = extract(dataset, spec, cache)
        if report.extracted:
            out["extract_seconds_per_image"][feature_set_name(spec)] = (time.perf_counter() - started) / report.extracted
        with tempfile.TemporaryDirectory() as run_dir:
            config = SearchConfig.quick(backbone=spec.name, resize=spec.resize, seed=seed)
            result = evaluate(dataset, config, cache, run_dir=Path(run_dir) / "run")
        out["feature_sets"][feature_set_name(spec)] = result.nested.accuracy
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", required=True,
                        help="a folder, fmnistN[:seed], demoN:seed or photos-SET[N][:seed] (see datasets.named)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="featurepipe-quick-") as scratch:
        cache = args.cache_dir or Path(scratch) / "cache"
        rows = []
        for name in args.data:
            row = one(_data(name, Path(scratch)), cache)
            row["data"] = name
            print(json.dumps(row), flush=True)
            rows.append(row)
    print_against_seeds(rows, "feature set", "feature_sets")


def print_against_seeds(rows: list[dict], title: str, key: str) -> None:
    """The markdown table: one line per procedure (rows[i][key]), one column per data set, the seeds'
    recipe first, the mean and the worst shortfall against the seeds' recipe last."""
    print(f"\n| {title} | " + " | ".join(r["data"] for r in rows) + " | mean | worst vs seeds |")
    print("|" + " --- |" * (len(rows) + 3))
    print("| seeds' recipe (Lite0 squash, Dense 256) | " + " | ".join(f"{r['seeds_dense']:.3f}" for r in rows)
          + f" | {np.mean([r['seeds_dense'] for r in rows]):.3f} | |")
    for name in rows[0][key]:
        accs = [r[key][name] for r in rows]
        worst = min(a - r["seeds_dense"] for a, r in zip(accs, rows))
        print(f"| {name} | " + " | ".join(f"{a:.3f}" for a in accs) + f" | {np.mean(accs):.3f} | {worst:+.3f} |")


if __name__ == "__main__":
    main()
