"""Speed of k-fold CV on cached features vs re-extracting features per fold (not a test).

    python benchmarks/evaluate_speed.py --rows 2000 --dim 1280 --folds 5

1. 5-fold CV of linear_svm, logreg and dense with their default grids on a rows x dim feature table
   (class-conditional, non-negative like pooled ReLU features), cold (nothing cached) and warm (a
   re-run: every fold result reused).
2. What re-extracting per fold costs (the Turi Create / fastai habit): the measured per-image cost of
   the default backbone on this machine (efficientnet_lite0, the demo photos, model already built)
   times rows x folds, plus the same CV fits.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from featurepipe.evaluation.crossval import FeatureTable, run_cv
from featurepipe.heads import param_grid

REPO = Path(__file__).resolve().parents[1]


def synthetic_table(rows: int, dim: int, classes: int, seed: int, noise: float) -> FeatureTable:
    rng = np.random.default_rng(seed)
    y = np.arange(rows) % classes
    centres = rng.gamma(1.0, 1.0, (classes, dim))
    X = np.maximum(centres[y] + rng.normal(0, noise, (rows, dim)), 0).astype(np.float32)
    return FeatureTable(X=X, y=y, classes=[f"c{i}" for i in range(classes)], paths=[f"img{i}.jpg" for i in range(rows)],
                        groups=None, views=None, key=f"bench-{rows}-{dim}-{seed}")


def seconds_per_image_extract() -> float:
    from featurepipe.backbones.build import build_feature_model
    from featurepipe.backbones.spec import BackboneSpec
    from featurepipe.data.images import decode_image

    spec = BackboneSpec().resolved()
    model = build_feature_model(spec)
    paths = sorted((REPO / "data" / "demo").glob("*/*.jpg"))
    model.predict_on_batch(np.stack([decode_image(p, spec.image_size, spec.resize) for p in paths[:32]]))
    started = time.perf_counter()
    for start in range(0, len(paths), 32):
        batch = np.stack([decode_image(p, spec.image_size, spec.resize) for p in paths[start:start + 32]])
        model.predict_on_batch(batch)
    return (time.perf_counter() - started) / len(paths)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--heads", default="linear_svm,logreg,dense")
    parser.add_argument("--jobs", type=int, default=-1)
    parser.add_argument("--noise", type=float, default=10.0,
                        help="Feature noise; 10 gives CV accuracy near 0.9, like real small-data features.")
    args = parser.parse_args()
    heads = args.heads.split(",")
    table = synthetic_table(args.rows, args.dim, args.classes, seed=0, noise=args.noise)

    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        cold = run_cv(table, heads, n_folds=args.folds, n_jobs=args.jobs, cache_dir=Path(cache))
        cold_seconds = time.perf_counter() - started
        started = time.perf_counter()
        warm = run_cv(table, heads, n_folds=args.folds, n_jobs=args.jobs, cache_dir=Path(cache))
        warm_seconds = time.perf_counter() - started

    per_head = {}
    for head in heads:
        with tempfile.TemporaryDirectory() as cache:
            started = time.perf_counter()
            run_cv(table, [head], n_folds=args.folds, n_jobs=args.jobs, cache_dir=Path(cache))
            per_head[head] = {"seconds": round(time.perf_counter() - started, 2), "grid_points": len(param_grid(head))}

    per_image = seconds_per_image_extract()
    reextract_seconds = per_image * args.rows * args.folds + cold_seconds
    print(json.dumps({
        "rows": args.rows, "dim": args.dim, "noise": args.noise, "classes": args.classes, "folds": args.folds, "cpus": os.cpu_count(),
        "cv_cold_s": round(cold_seconds, 2), "cv_warm_rerun_s": round(warm_seconds, 3),
        "fits_cold": cold.fitted, "reused_warm": warm.reused, "per_head": per_head,
        "best": cold.best, "best_accuracy": round(float(cold.leaderboard.iloc[0]["accuracy_mean"]), 4),
        "extract_s_per_image_lite0": round(per_image, 4),
        "reextract_per_fold_estimate_s": round(reextract_seconds, 1),
        "speedup_vs_reextract": round(reextract_seconds / cold_seconds, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
