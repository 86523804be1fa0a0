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
the logreg head. Per set and recipe: the vote's and the student's accuracy over every image, the
paired 95% interval of the change, what the held-out rule alone would have kept, and the time.
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

from benchmarks.student import METHODS, evaluated_run  # noqa: E402

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
            "load": os.getloadavg()}


def summary(rows: list[dict]) -> str:
    lines = ["| set | recipe | draw | images | vote | student (gained/lost) | change, 95% interval | held-out rule | "
             "student kept | s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        low, high = r["interval"]
        lines.append(f"| {r['set']} | {r['recipe']} | {r.get('draw', 0)} | {r['images']} | {r['vote']:.3f} | "
                     f"{r['student']:.3f} ({r['gained']}/{r['lost']}) | {100 * r['change']:+.1f} pt "
                     f"({100 * low:+.1f} to {100 * high:+.1f}) | {r['holdout_rule']:.3f} | "
                     f"{'yes' if r['student_wins'] else 'no'} | {r['seconds']:.0f} |")
    by_recipe: dict[str, list[float]] = {}
    for r in rows:
        by_recipe.setdefault(f"{r['recipe']} draw {r.get('draw', 0)}", []).append(r["change"])
    for recipe, changes in by_recipe.items():
        lines.append(f"\n{recipe}: mean change {100 * sum(changes) / len(changes):+.1f} pt over {len(changes)} "
                     f"sets, worst {100 * min(changes):+.1f} pt")
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
                    print(f"{name} {recipe} draw {draw}: vote {row['vote']:.3f} student {row['student']:.3f} "
                          f"({row['gained']}/{row['lost']}) {row['seconds']:.0f} s", flush=True)
    print(summary([r for r in rows if r["set"] in names]))


if __name__ == "__main__":
    main()
