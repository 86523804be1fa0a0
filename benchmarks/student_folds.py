"""The student against the vote over K outer folds: every image scored once (issue 22; not a test).

    nice -n 10 python benchmarks/student_folds.py --cache-dir /tmp/student-bench \\
        --sets photos-animals,photos-produce,photos-objects,photos-scenes,fmnist30 --recipes hard-lo,hard
    # more draws (seeds of the folds and the training) of the default recipe:
    nice -n 10 python benchmarks/student_folds.py --cache-dir /tmp/student-bench \\
        --sets photos-animals,photos-produce,photos-objects,photos-scenes,fmnist30 --recipes flip-wise-lo --draws 1,2

benchmarks/student.py scores each recipe on the 20% held out (14-30 images a set: a point is a
fraction of an image, and those images also pick the best epoch). Here each recipe (student.METHODS)
runs what `featurepipe finetune RUN --finetune-folds K` runs before its final fine-tuning: fold k's
student trains without fold k (early stopping on a fifth of the rest) and is scored on it beside the
vote refit without it (training.finetune_folds). The vote is student.py's: EfficientNet-Lite0/1/2,
the logreg head. Beside them, on the same folds, the seeds' recipe (accuracy.seeds_dense: frozen
EfficientNet-Lite0 on squashed images, Dense 256 / Dropout 0.5 / softmax, 50 epochs of RMSprop, batch
16, on the bottleneck features of every image outside fold k, the draw its seed). Per set and recipe:
the vote's, the seeds' and the student's accuracy over every image, the paired 95% interval of the
student's change against the vote and against the seeds, what the held-out rule alone would have
kept, and the time.
Rows are appended to CACHE/student_folds.jsonl as each finishes (a rerun skips them); CPU timings
depend on the load, recorded per row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.student import METHODS, data_folder, evaluated_run  # noqa: E402

import numpy as np  # noqa: E402

SETS = "photos-animals,photos-produce,photos-objects,photos-scenes"


def scored(name: str, run: Path, recipe: str, folds: int, cache: Path, draw: int = 0) -> dict:
    """The fold scores of one recipe on a copy of the set's evaluated run; `draw` is the seed of the
    folds and of the training (0: the draw every earlier table used)."""
    from featurepipe.training.config import FinetuneConfig
    from featurepipe.training.finetune import _prepare, _score_folds

    copy = cache / "runs" / (f"{name}-folds-{recipe}" + (f"-draw{draw}" if draw else ""))
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run, copy)
    config = FinetuneConfig(folds=folds, seed=draw, reuse=False, **METHODS[recipe])
    started = time.perf_counter()
    result, _ = _score_folds(copy, _prepare(copy, config, cache, None), cache, None, ())
    d = result["decision"]
    return {"set": name, "recipe": recipe, "draw": draw, "options": METHODS[recipe], "folds": folds, "images": result["images"],
            "vote": result["frozen"]["val_accuracy"], "student": result["student"]["val_accuracy"],
            "vote_loss": result["frozen"]["val_loss"], "student_loss": result["student"]["val_loss"],
            "holdout_rule": result["holdout_rule"]["val_accuracy"], "gained": d["gained"], "lost": d["lost"],
            "change": d["accuracy_change"], "interval": d["accuracy_change_interval"], "student_wins": d["improved"],
            "per_fold": result["per_fold"], "seconds": round(time.perf_counter() - started, 1),
            "load": os.getloadavg(), **seeds_side_by_side(name, copy, cache, draw)}


def seeds_side_by_side(name: str, copy: Path, cache: Path, draw: int) -> dict:
    """The seeds' recipe on the folds the student was scored on (copy/finetune/folds_predictions.csv:
    each image's fold, label and both models' predictions): fold k's Dense 256 trains on the bottleneck
    features of every image outside fold k (the student's training and early-stopping images) and
    predicts fold k. Returns its accuracy over every image and the paired change of the vote and the
    student against it, with 95% bootstrap intervals (training.compare's, on per-image correctness)."""
    import pandas as pd

    from benchmarks.accuracy import seeds_dense_correct
    from featurepipe.backbones.spec import BackboneSpec
    from featurepipe.data.dataset import scan
    from featurepipe.extraction.extract import extract, open_stores
    from featurepipe.extraction.features import dataset_features
    from featurepipe.training.compare import compare_per_image

    started = time.perf_counter()
    folds = pd.read_csv(copy / "finetune" / "folds_predictions.csv")
    dataset = scan(data_folder(name, cache), cache_dir=cache)
    squash = BackboneSpec(name="efficientnet_lite0", resize="squash").resolved()
    extract(dataset, squash, cache)
    features = dataset_features(dataset, open_stores(squash, cache))
    row_of = {str(Path(p).resolve()): i for i, p in enumerate(features.frame["path"])}
    missing = [p for p in folds["path"] if str(Path(p).resolve()) not in row_of]
    if missing:
        raise SystemExit(f"{copy}: {len(missing)} scored images have no seeds' features, e.g. {missing[0]}")
    rows = np.array([row_of[str(Path(p).resolve())] for p in folds["path"]])
    classes = sorted(set(folds["label"]))
    y = folds["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    X, fold = features.X[rows], folds["fold"].to_numpy()
    correct = np.zeros(len(folds), dtype=bool)
    for k in sorted(set(fold)):
        test = np.flatnonzero(fold == k)
        correct[test] = seeds_dense_correct(X, y, np.flatnonzero(fold != k), test, draw)
    zero = np.zeros(len(folds))
    vote = (folds["frozen_pred"] == folds["label"]).to_numpy()
    student = (folds["student_pred"] == folds["label"]).to_numpy()
    against = {who: compare_per_image(correct, zero, mine, zero, seed=draw)
               for who, mine in (("vote", vote), ("student", student))}
    return {"seeds": float(correct.mean()), "seeds_seconds": round(time.perf_counter() - started, 1),
            **{f"{who}_vs_seeds": d["accuracy_change"] for who, d in against.items()},
            **{f"{who}_vs_seeds_interval": d["accuracy_change_interval"] for who, d in against.items()}}


def summary(rows: list[dict]) -> str:
    lines = ["| set | recipe | draw | images | vote | seeds' recipe | student (gained/lost) | change, 95% interval | "
             "student - seeds | held-out rule | student kept | s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        low, high = r["interval"]
        seeds = f"{r['seeds']:.3f}" if "seeds" in r else "-"
        over = f"{100 * r['student_vs_seeds']:+.1f} pt" if "seeds" in r else "-"
        lines.append(f"| {r['set']} | {r['recipe']} | {r.get('draw', 0)} | {r['images']} | {r['vote']:.3f} | {seeds} | "
                     f"{r['student']:.3f} ({r['gained']}/{r['lost']}) | {100 * r['change']:+.1f} pt "
                     f"({100 * low:+.1f} to {100 * high:+.1f}) | {over} | {r['holdout_rule']:.3f} | "
                     f"{'yes' if r['student_wins'] else 'no'} | {r['seconds']:.0f} |")
    lines += ["", "Mean over the draws measured, per set (accuracy; change in points):", "",
              "| set | recipe | draws | vote | seeds' recipe | student | held-out rule | student - vote | student - seeds | "
              "vote - seeds |", "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["set"], r["recipe"]), []).append(r)
    by_recipe: dict[str, list[dict]] = {}
    for (name, recipe), group in groups.items():
        by_recipe.setdefault(recipe, []).extend(group)
        mean = {k: float(np.mean([r[k] for r in group])) if all(k in r for r in group) else None
                for k in ("vote", "seeds", "student", "holdout_rule")}
        cell = (lambda v, f: "-" if v is None else f.format(v))
        lines.append(f"| {name} | {recipe} | {len(group)} | {cell(mean['vote'], '{:.3f}')} | "
                     f"{cell(mean['seeds'], '{:.3f}')} | {cell(mean['student'], '{:.3f}')} | "
                     f"{cell(mean['holdout_rule'], '{:.3f}')} | {100 * (mean['student'] - mean['vote']):+.1f} | "
                     f"{cell(None if mean['seeds'] is None else 100 * (mean['student'] - mean['seeds']), '{:+.1f}')} | "
                     f"{cell(None if mean['seeds'] is None else 100 * (mean['vote'] - mean['seeds']), '{:+.1f}')} |")
    for recipe, group in by_recipe.items():
        changes = [r["change"] for r in group]
        line = (f"\n{recipe}: mean change against the vote {100 * np.mean(changes):+.1f} pt over {len(group)} set-draws, "
                f"worst {100 * min(changes):+.1f} pt")
        if all("seeds" in r for r in group):
            line += (f"; against the seeds' recipe {100 * np.mean([r['student_vs_seeds'] for r in group]):+.1f} pt "
                     f"(the vote {100 * np.mean([r['vote_vs_seeds'] for r in group]):+.1f})")
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default=SETS)
    parser.add_argument("--recipes", default="hard-lo", help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--draws", default="0", help="comma-separated seeds of the folds and the training")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/featurepipe-student-bench"))
    parser.add_argument("--summary", action="store_true", help="print the table of what was measured, run nothing")
    args = parser.parse_args()

    cache, log = args.cache_dir, args.cache_dir / "student_folds.jsonl"
    cache.mkdir(parents=True, exist_ok=True)
    names = [s for s in args.sets.split(",") if s]
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    if not args.summary:
        done = {(r["set"], r["recipe"], r["folds"], r.get("draw", 0)) for r in rows}
        for draw in [int(d) for d in args.draws.split(",") if d]:
            for recipe in [r for r in args.recipes.split(",") if r]:
                for name in names:
                    if (name, recipe, args.folds, draw) in done:
                        continue
                    row = scored(name, evaluated_run(name, cache), recipe, args.folds, cache, draw)
                    rows.append(row)
                    with open(log, "a") as handle:
                        handle.write(json.dumps(row, default=str) + "\n")
                    print(f"{name} {recipe} draw {draw}: vote {row['vote']:.3f} seeds {row['seeds']:.3f} student "
                          f"{row['student']:.3f} ({row['gained']}/{row['lost']}) {row['seconds']:.0f} s", flush=True)
    print(summary([r for r in rows if r["set"] in names]))


if __name__ == "__main__":
    main()
