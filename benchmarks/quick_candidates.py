"""Which procedure `run --quick` should be, by measurement (not a test): candidates beyond one
feature set with the default heads, next to the seeds' recipe on the same folds.

    python benchmarks/quick_candidates.py --data data/demo --data photos-animals ... [--cache-dir DIR]

quick_choice.py showed that no single feature set with logreg/knn/ncm beats the seeds' recipe (frozen
Lite0 on squashed images, Dense 256, 50 epochs) on every set. The candidates here are cheap ways past
it, each scored by nested CV of its whole procedure on the same 5 stratified folds (seed 0):
- l0sq: Lite0 squash, default heads (the best mean single Lite0 set)
- l0sq+dense: Lite0 squash, default heads + the seeds' own Dense head (the selection may pick it)
- l0 vote2: soft vote of Lite0 squash + Lite0 center_crop (one backbone, two passes, decode shared)
- l1cc: Lite1 center_crop, default heads (the best worst case of quick_choice.py)
- l0sq+l1cc vote: soft vote of Lite0 squash + Lite1 center_crop
with the evaluate stage's seconds (features cached: the fits and the selection only) and each set's
extraction seconds per image. One JSON object per data set, then a table.
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
from benchmarks.quick_choice import print_against_seeds  # noqa: E402

L0, L1 = "efficientnet_lite0", "efficientnet_lite1"
CANDIDATES = {
    "l0sq": [(L0, "squash")],
    "l0sq+dense": [(L0, "squash")],
    "l0 vote2": [(L0, "squash"), (L0, "center_crop")],
    "l1cc": [(L1, "center_crop")],
    "l0sq+l1cc vote": [(L0, "squash"), (L1, "center_crop")],
}


def one(data: Path, cache: Path, seed: int = 0) -> dict:
    from featurepipe.backbones.spec import BackboneSpec
    from featurepipe.data.dataset import scan
    from featurepipe.evaluation.config import DEFAULT_HEADS, SearchConfig, feature_set_name
    from featurepipe.evaluation.evaluate import evaluate
    from featurepipe.evaluation.folds import make_folds
    from featurepipe.extraction.extract import extract, open_stores
    from featurepipe.extraction.features import dataset_features

    dataset = scan(data, cache_dir=cache)
    out = {"data": str(data), "images": len(dataset), "classes": len(dataset.classes), "procedures": {},
           "evaluate_seconds": {}, "extract_seconds_per_image": {}}
    for spec in dict.fromkeys(BackboneSpec(name=n, resize=r).resolved() for pairs in CANDIDATES.values()
                              for n, r in pairs):
        started = time.perf_counter()
        report = extract(dataset, spec, cache)
        if report.extracted:
            out["extract_seconds_per_image"][feature_set_name(spec)] = (time.perf_counter() - started) / report.extracted
    seeds = BackboneSpec(name=L0, resize="squash").resolved()
    features = dataset_features(dataset, open_stores(seeds, cache))
    classes = list(dataset.classes)
    y = features.frame["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    folds = make_folds(y, n_folds=5, seed=seed)
    out["seeds_dense"] = float(np.mean([seeds_dense(features.X, y, f.train_idx, f.val_idx, seed) for f in folds]))
    for name, pairs in CANDIDATES.items():
        specs = tuple(BackboneSpec(name=n, resize=r).resolved() for n, r in pairs)
        heads = DEFAULT_HEADS + (("dense",) if "dense" in name else ())
        config = SearchConfig(specs=specs, heads=heads, seed=seed, folds=5)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as run_dir:
            result = evaluate(dataset, config, cache, run_dir=Path(run_dir) / "run")
        out["evaluate_seconds"][name] = time.perf_counter() - started
        out["procedures"][name] = result.nested.accuracy
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", required=True,
                        help="a folder, fmnistN[:seed], demoN:seed or photos-SET[N][:seed] (see datasets.named)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--seeds", default="0", help="fold seeds, comma-separated: each set's figures are their mean")
    parser.add_argument("--only", default=None, help="candidates to score, comma-separated (default: all)")
    args = parser.parse_args()
    if args.only:
        for name in set(CANDIDATES) - set(args.only.split(",")):
            del CANDIDATES[name]
    with tempfile.TemporaryDirectory(prefix="featurepipe-quickc-") as scratch:
        cache = args.cache_dir or Path(scratch) / "cache"
        rows = []
        for name in args.data:
            draws = [one(_data(name, Path(scratch)), cache, int(seed)) for seed in args.seeds.split(",")]
            row = {**draws[0], "data": name, "draws": len(draws),
                   "seeds_dense": float(np.mean([d["seeds_dense"] for d in draws])),
                   "procedures": {k: float(np.mean([d["procedures"][k] for d in draws])) for k in CANDIDATES}}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print_against_seeds(rows, "procedure", "procedures")


if __name__ == "__main__":
    main()
