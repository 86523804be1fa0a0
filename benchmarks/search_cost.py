"""What a first `featurepipe run` costs and what it scores, next to the seeds' recipe (not a test).

    python benchmarks/search_cost.py --data data/demo --data camera250 [--data photos-produce ...] \
        [--baseline /path/to/older/checkout] [--procedures seeds,quick,default] [--scratch DIR]

Each procedure runs as its own process with a new, empty cache (a first run: every image decoded and
extracted), one after another on the same machine, and is timed whole (interpreter start-up and
imports included):
  seeds:   the seeds' hand recipe: frozen EfficientNet-Lite0 on squashed images (decoded with PIL,
           batches of 32), then 5-fold stratified CV (seed 0) of Dense 256 / Dropout 0.5 / softmax,
           50 epochs, and of StandardScaler + LogisticRegression(C=1), on the same features;
  quick:   `featurepipe run DATA --quick --json`: nested-CV accuracy of its whole selection;
  default: `featurepipe run DATA --json`: the same for the default search.
With --baseline, quick and default also run from that checkout (e.g. a `git worktree add` of an older
commit) in the same script run, so "today's" and the new figures share the machine and its load.
Prints one JSON object per (data, procedure, code) and a table.
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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def seeds_recipe(data: Path, cache: Path) -> dict:
    """The seeds' recipe, in this process (called by the script in a subprocess of its own)."""
    import numpy as np

    from benchmarks.accuracy import plain_logreg, seeds_dense
    from featurepipe.backbones.build import build_feature_model
    from featurepipe.backbones.spec import BackboneSpec
    from featurepipe.data.images import IMAGE_EXTENSIONS, decode_image
    from featurepipe.evaluation.folds import make_folds

    classes = sorted(p.name for p in data.iterdir() if p.is_dir())
    paths, y = [], []
    for i, c in enumerate(classes):
        for p in sorted((data / c).iterdir()):
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(p)
                y.append(i)
    y = np.asarray(y)
    spec = BackboneSpec(name="efficientnet_lite0", resize="squash").resolved()
    model = build_feature_model(spec, cache)
    X = []
    for start in range(0, len(paths), 32):
        batch = np.stack([decode_image(p, spec.image_size, "squash") for p in paths[start:start + 32]])
        X.append(np.asarray(model.predict(batch, verbose=0)))
    X = np.concatenate(X)
    folds = make_folds(y, n_folds=5, seed=0)
    return {"dense": float(np.mean([seeds_dense(X, y, f.train_idx, f.val_idx, 0) for f in folds])),
            "logreg": float(np.mean([plain_logreg(X, y, f.train_idx, f.val_idx) for f in folds]))}


def timed(command: list[str], cwd: Path) -> tuple[float, str]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(cwd)}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def one(data: Path, procedure: str, code: Path, scratch: Path) -> dict:
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=scratch))
    if procedure == "seeds":
        seconds, out = timed([sys.executable, str(REPO / "benchmarks" / "search_cost.py"), "--seeds-recipe",
                              str(data), "--cache-dir", str(cache)], REPO)
        scores = json.loads(out.strip().splitlines()[-1])
        return {"wall_seconds": seconds, "accuracy": max(scores.values()), **scores}
    flags = ["--quick"] if procedure == "quick" else []
    seconds, out = timed([sys.executable, "-m", "featurepipe.cli", "run", str(data), *flags, "--json",
                          "--cache-dir", str(cache)], code)
    result = json.loads(out[out.index("{"):])
    nested = result["nested"]["accuracy"]
    members = (result.get("best") or {}).get("params", {}).get("members")
    return {"wall_seconds": seconds, "accuracy": nested["mean"], "ci": [nested["ci_low"], nested["ci_high"]],
            "stages": result.get("stages"), "members": len(members) if members else 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", default=[])
    parser.add_argument("--baseline", type=Path, default=None, help="an older checkout to time beside this one")
    parser.add_argument("--procedures", default="seeds,quick,default")
    parser.add_argument("--scratch", type=Path, default=None, help="where data sets and caches are made")
    parser.add_argument("--seeds-recipe", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.seeds_recipe is not None:
        print(json.dumps(seeds_recipe(args.seeds_recipe, args.cache_dir)))
        return
    from benchmarks.datasets import named

    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="featurepipe-cost-"))
    scratch.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.data:
        data = named(name, scratch, REPO / "data" / "demo")
        for procedure in args.procedures.split(","):
            codes = [("new", REPO)] + ([("baseline", args.baseline)] if args.baseline and procedure != "seeds" else [])
            for label, code in codes:
                row = {"data": name, "procedure": procedure, "code": label, **one(data, procedure, code, scratch)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    print("\n| data | procedure | code | wall s | nested accuracy | members |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        acc = f"{r['accuracy']:.3f}" + (f" (dense {r['dense']:.3f}, logreg {r['logreg']:.3f})" if "dense" in r else "")
        print(f"| {r['data']} | {r['procedure']} | {r['code']} | {r['wall_seconds']:.1f} | {acc} | {r.get('members', '')} |")


if __name__ == "__main__":
    main()
