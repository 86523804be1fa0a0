"""Label-issue benchmark: flip the labels of 10 demo images and count them among the top 15 suspects.

    PYTHONPATH=. python benchmarks/label_issues.py [--flips 10] [--seeds 0,1,2,3,4] [--C 1,10,30,50,100,300]

Each seed copies data/demo, moves `flips` random images into another (random) class folder, and
ranks label suspects from the out-of-fold probabilities of logreg(C) (inspect's label head), with
near-duplicate groups as inspect uses them. Prints flips found in the top 15 per C and seed, and the
CV accuracy of that head on the flipped data (how well it fits at all).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def flip(source: Path, target: Path, flips: int, seed: int) -> list[tuple[str, str, str]]:
    """Copy `source` to `target` and move `flips` images to another class folder: (new path, true, given)."""
    shutil.copytree(source, target)
    rng = np.random.default_rng(seed)
    classes = sorted(p.name for p in target.iterdir() if p.is_dir())
    images = sorted(p for c in classes for p in (target / c).iterdir() if p.is_file())
    flipped = []
    for index in rng.choice(len(images), size=flips, replace=False):
        image = images[int(index)]
        true = image.parent.name
        given = str(rng.choice([c for c in classes if c != true]))
        moved = target / given / f"flipped_{image.name}"
        image.rename(moved)
        flipped.append((str(moved), true, given))
    return flipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flips", type=int, default=10)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--C", default="1,10,30,50,100,300")
    parser.add_argument("--cache-dir", default=str(REPO / "cache"))
    args = parser.parse_args()

    from featurepipe.backbones.spec import BackboneSpec
    from featurepipe.evaluation.crossval import FeatureTable
    from featurepipe.data.dataset import scan
    from featurepipe.data.dedup import duplicate_groups
    from featurepipe.extraction.extract import extract, open_stores
    from featurepipe.extraction.features import dataset_features
    from featurepipe.inspection.inspect import oof_from_cv
    from featurepipe.inspection.label_issues import label_issues
    from featurepipe.core.cachedirs import cache_root

    root = cache_root(args.cache_dir)
    spec = BackboneSpec().resolved()
    values = [float(c) for c in args.C.split(",")]
    results: dict[str, dict] = {f"C={c:g}": {"found": [], "cv_accuracy": []} for c in values}
    for seed in (int(s) for s in args.seeds.split(",")):
        with tempfile.TemporaryDirectory(prefix="fp-flip-") as tmp:
            data = Path(tmp) / "demo_flipped"
            flipped = flip(REPO / "data" / "demo", data, args.flips, seed)
            dataset = scan(data, cache_dir=root)
            extract(dataset, spec, root)
            features = dataset_features(dataset, open_stores(spec, root))
            frame = features.frame
            groups, dups = duplicate_groups(frame, features.X, root)
            y = frame["label"].map({c: i for i, c in enumerate(dataset.classes)}).to_numpy()
            table = FeatureTable(features.X, y, dataset.classes, frame["path"].tolist(),
                                 groups=groups if dups.clusters else None)
            flipped_paths = {p for p, _, _ in flipped}
            for c in values:
                proba = oof_from_cv(None, C=c)(table)   # no result cache: the benchmark measures, not reuses
                ranked = label_issues(proba, y, dataset.classes).suspects(args.top)
                top_paths = set(frame["path"].to_numpy()[ranked["row"].to_numpy()])
                accuracy = float(np.mean(proba.argmax(axis=1) == y))
                results[f"C={c:g}"]["found"].append(len(top_paths & flipped_paths))
                results[f"C={c:g}"]["cv_accuracy"].append(round(accuracy, 3))
    for record in results.values():
        record["mean_found"] = round(float(np.mean(record["found"])), 2)
    print(json.dumps({"flips": args.flips, "top": args.top, "seeds": args.seeds, "results": results}, indent=1))


if __name__ == "__main__":
    main()
