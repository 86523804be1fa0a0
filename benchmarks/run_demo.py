"""`featurepipe run` on data/demo, cold and then with nothing changed (not a test).

    python benchmarks/run_demo.py [--quick] [--backbone efficientnet_lite0] [--heads logreg,knn,ncm] [--folds 5]

Each run happens in its own fresh Python process, as two invocations of the CLI would, so the
figures include importing TensorFlow. The cache is a new temporary folder (pass --cache-dir to
keep it), so the first run pays for everything: weights conversion, extraction, every CV fit.
Prints one JSON object: per-stage seconds of both runs, process wall times, and what was reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def single(args) -> None:
    """One run in this process; prints its figures as JSON on the last line of stdout."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    started = time.perf_counter()
    from featurepipe.evaluation.config import SearchConfig
    from featurepipe.evaluation.config import SEARCH_HEADS
    from featurepipe.pipeline import run
    from featurepipe.evaluation.search import parse_backbones, search_specs

    imported = time.perf_counter() - started
    specs = search_specs(parse_backbones(args.backbone), quick=args.quick)
    heads = tuple(h for h in args.heads.split(",") if h) if args.heads else SEARCH_HEADS
    result = run(args.data, SearchConfig(specs=specs, heads=heads, folds=args.folds), args.cache_dir,
                 run_dir=args.run_dir)
    best = result.leaderboard.iloc[0]
    print(json.dumps({
        "import_seconds": round(imported, 2),
        "run_seconds": round(result.seconds, 2),
        "stages": {k: round(v, 2) for k, v in result.stages.items()},
        "images": len(result.dataset),
        "extracted": result.extract.extracted, "features_reused": result.extract.reused,
        "extract_images_per_second": round(result.extract.images_per_second, 1),
        "cv_fits": result.evaluate.fitted, "cv_reused": result.evaluate.reused,
        "reused_everything": result.reused_everything, "message": result.message,
        "best": f"{best['head']} {best['params']}",
        "best_cv_accuracy": round(float(best["accuracy_mean"]), 4),
        "nested_accuracy": round(result.evaluate.nested.accuracy, 4) if result.evaluate.nested else None,
        "report": str(result.report_path),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO / "data" / "demo"))
    parser.add_argument("--backbone", default=None, help="default: run's search (Lite0/1/2)")
    parser.add_argument("--heads", default=None, help="default: run's search heads")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        single(args)
        return

    with tempfile.TemporaryDirectory(prefix="featurepipe-run-demo-") as scratch:
        cache_dir = args.cache_dir or str(Path(scratch) / "cache")
        figures = {}
        for name in ("first_run", "no_change_rerun"):
            command = [sys.executable, __file__, "--single", "--data", args.data, "--folds", str(args.folds),
                       "--cache-dir", cache_dir, "--run-dir", str(Path(scratch) / name)]
            command += (["--backbone", args.backbone] if args.backbone else []) + (["--heads", args.heads] if args.heads else [])
            command += ["--quick"] if args.quick else []
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
            wall = time.perf_counter() - started
            if done.returncode != 0:
                sys.stderr.write(done.stderr)
                raise SystemExit(f"{name} failed with exit code {done.returncode}")
            figures[name] = {"process_wall_seconds": round(wall, 2), **json.loads(done.stdout.strip().splitlines()[-1])}
        first, second = figures["first_run"], figures["no_change_rerun"]
        figures["setup"] = {"data": args.data, "backbone": args.backbone, "heads": args.heads, "folds": args.folds,
                            "quick": args.quick, "cpus": os.cpu_count(), "load": os.getloadavg()}
        figures["rerun_speedup"] = round(first["process_wall_seconds"] / second["process_wall_seconds"], 1)
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
