"""Accuracy of featurepipe's defaults against the seeds' hand recipes, on the same folds (not a test).

    python benchmarks/accuracy.py --data data/demo --data fmnist30 --data fmnist100 [--cache-dir DIR]

`fmnistN` is assembled by benchmarks/datasets.py (Debian's dataset-fashion-mnist, N images per class,
RGB PNGs). For each data set, with 5-fold stratified CV, seed 0, the same folds everywhere:

  (a) the seeds' recipe: frozen efficientnet_lite0 on squashed images, Dense 256 / Dropout 0.5 /
      softmax trained 50 epochs (RMSprop, batch 16) on the raw bottleneck features;
  (b) StandardScaler + LogisticRegression(C=1) on the same squash features;
  (c) `featurepipe run --quick`: nested-CV accuracy (one backbone, its default resize);
  (d) `featurepipe run` with its defaults: nested-CV accuracy of the whole search (the headline; with
      several feature sets the procedure is the vote of each set's best logreg);
  (e) (d)'s best leaderboard row (optimistic: chosen on the folds that score it); gap = (e) - (d);
  (d0) for comparison, `featurepipe run --no-vote`: the search picks one configuration (the previous
      default procedure), nested-CV accuracy on the same folds.

Prints one JSON object per data set and a table at the end.
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

REPO = Path(__file__).resolve().parents[1]


def _data(name: str, scratch: Path) -> Path:
    from benchmarks.datasets import named

    return named(name, scratch, REPO / "data" / "demo")


def seeds_dense(X, y, train, test, seed: int = 0) -> float:
    return float(np.mean(seeds_dense_correct(X, y, train, test, seed)))


def seeds_dense_correct(X, y, train, test, seed: int = 0) -> np.ndarray:
    """Per test image, whether the seeds' Dense 256 head trained on `train` classifies it right."""
    import keras

    keras.utils.set_random_seed(seed)
    n_classes = int(y.max()) + 1
    model = keras.Sequential([keras.Input((X.shape[1],)), keras.layers.Dense(256, activation="relu"),
                              keras.layers.Dropout(0.5), keras.layers.Dense(n_classes, activation="softmax")])
    model.compile(optimizer="rmsprop", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(X[train], y[train], epochs=50, batch_size=16, verbose=0)
    return model.predict(X[test], verbose=0).argmax(axis=1) == y[test]


def plain_logreg(X, y, train, test) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000)).fit(X[train], y[train])
    return float(np.mean(model.predict(X[test]) == y[test]))


def one(data: Path, cache: Path, seed: int = 0) -> dict:
    from featurepipe.backbones.spec import BackboneSpec
    from featurepipe.evaluation.crossval import make_folds
    from featurepipe.data.dataset import scan
    from featurepipe.evaluation.config import SearchConfig
    from featurepipe.evaluation.config import SEARCH_HEADS
    from featurepipe.evaluation.evaluate import evaluate
    from featurepipe.extraction.extract import extract, open_stores
    from featurepipe.extraction.features import dataset_features
    from featurepipe.evaluation.search import search_specs

    dataset = scan(data, cache_dir=cache)
    squash = BackboneSpec(name="efficientnet_lite0", resize="squash").resolved()
    extract(dataset, squash, cache)
    features = dataset_features(dataset, open_stores(squash, cache))
    classes = list(dataset.classes)
    y = features.frame["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    folds = make_folds(y, n_folds=5, seed=seed)     # the folds evaluate uses for this seed
    a = np.mean([seeds_dense(features.X, y, f.train_idx, f.val_idx, seed) for f in folds])
    b = np.mean([plain_logreg(features.X, y, f.train_idx, f.val_idx) for f in folds])
    out = {"data": str(data), "images": len(y), "classes": len(classes), "a_seeds_dense": a, "b_plain_logreg": b}
    for name, quick, vote in (("quick", True, True), ("default", False, True), ("no_vote", False, False)):
        specs = search_specs(quick=quick)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as run_dir:
            result = evaluate(dataset, SearchConfig(specs=specs, heads=SEARCH_HEADS, seed=seed, vote=vote), cache,
                              run_dir=Path(run_dir) / "run")
        out[name] = {"nested": result.nested.accuracy, "nested_ci": [result.nested.summary["accuracy"]["ci_low"],
                                                                     result.nested.summary["accuracy"]["ci_high"]],
                     "best_row": result.nested.best_inner_accuracy, "gap": result.nested.optimism_gap,
                     "best": result.best, "feature_sets": len(specs), "evaluate_seconds": time.perf_counter() - started}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", default=None, help="a folder, fmnistN[:seed], demoN:seed or photos-SET[N][:seed] (see datasets.named)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    names = args.data or [str(REPO / "data" / "demo"), "fmnist30", "fmnist100"]
    with tempfile.TemporaryDirectory(prefix="featurepipe-accuracy-") as scratch:
        cache = args.cache_dir or Path(scratch) / "cache"
        rows = []
        for name in names:
            figures = one(_data(name, Path(scratch)), cache)
            print(json.dumps(figures, default=float), flush=True)
            rows.append((name, figures))
    print(f"\n{'data':<12} {'(a) seeds':>9} {'(b) LR C=1':>10} {'(c) quick':>9} {'(d) run':>8} {'(e) best row':>12} "
          f"{'gap':>6} {'(d0) no-vote':>12}")
    for name, f in rows:
        print(f"{Path(name).name:<12} {f['a_seeds_dense']:9.3f} {f['b_plain_logreg']:10.3f} {f['quick']['nested']:9.3f} "
              f"{f['default']['nested']:8.3f} {f['default']['best_row']:12.3f} {f['default']['gap']:+6.3f} "
              f"{f['no_vote']['nested']:12.3f}")


if __name__ == "__main__":
    main()
