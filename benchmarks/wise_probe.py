"""--wise A replayed on finished --finetune-folds runs: which A (issue 22; not a test).

    nice python benchmarks/wise_probe.py --cache-dir /tmp/student-bench --recipe light-lo \\
        --sets photos-produce,photos-animals,photos-objects,photos-scenes,fmnist30

benchmarks/student_folds.py keeps each fold's best epoch (RUN/finetune/folds/fold-K/best.weights.npz).
Here, per fold, the starting model is rebuilt exactly as fine-tuning builds it (the member's head refit
on the fold's training images, on the frozen base: finetune_start) and the student's weights are
replaced by A x the best epoch + (1 - A) x that start (training.finetune_fit.weight_average, what
`--wise A` saves) for each A, then the fold's test images are scored. A = 1 must reproduce the fold
record's student probabilities exactly (checked, printed per fold). No training: minutes a set.
Per set and A: accuracy and mean log loss over every training image, against the vote on the same
images. Results go to CACHE/wise_probe.jsonl (a row per set and recipe) and a table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def probe(name: str, recipe: str, cache: Path, draw: int = 0) -> dict:
    import numpy as np

    from featurepipe.backbones.build import build_feature_model
    from featurepipe.training import finetune_folds
    from featurepipe.training.checkpoints import load_arrays
    from featurepipe.training.config import FinetuneConfig
    from featurepipe.training.finetune import _prepare
    from featurepipe.training.finetune_fit import weight_average
    from featurepipe.training.finetune_options import resumed_options
    from featurepipe.training.finetune_start import _start_from_head
    from featurepipe.training.keras_fit import dtype_policy, predict_proba
    from featurepipe.training.split import decode_frame, decode_split, fold_splits

    done = cache / "runs" / (f"{name}-folds-{recipe}" + (f"-draw{draw}" if draw else ""))
    scratch = cache / "runs" / f"{name}-wise-scratch"      # _prepare clears a fold's files: work on a copy
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(done, scratch)
    options = resumed_options(json.loads((done / "finetune" / "state.json").read_text())["options"])
    k_folds, seed = int(options["folds"]), int(options["seed"])
    # The fold records hold the student as the recipe saved it: its --wise (1 before --wise existed).
    recorded = float(options["wise"])
    config = FinetuneConfig(**{**options, "folds": 0, "resume": False, "reuse": False, "wise": 1.0})
    ys, votes, probs, checks = [], [], {a: [] for a in ALPHAS}, []
    for k in range(k_folds):
        folder = finetune_folds.fold_dir("finetune", k)
        tuned = load_arrays(done / folder / "best.weights.npz")
        record = json.loads((done / folder / "fold.json").read_text())
        prep = _prepare(scratch, config, cache, None, split_for=lambda d, k=k: fold_splits(d, k_folds, seed)[k],
                        fold_dir=folder)
        spec = prep.spec
        (x_train, y_train, train_rows), (x_val, _, val_rows), _ = decode_split(prep.split, prep.classes, spec.image_size,
                                                                           spec.resize, None)
        x_test, _, _ = decode_frame(prep.split.test, spec.image_size, spec.resize, None, "decode test")
        with dtype_policy(False):
            _, _, model, _, _ = _start_from_head(prep, build_feature_model(spec, prep.root),
                                                 (x_train, y_train, train_rows), (x_val, val_rows), None)
            start = model.get_weights()
            for alpha in ALPHAS:
                model.set_weights(weight_average(start, tuned, alpha))
                probs[alpha].append(predict_proba(model, x_test, 16))
        y = np.asarray(record["y"])
        ys.append(y)
        votes.append(np.asarray(record["frozen"]).reshape(len(y), -1))
        checks.append(float(np.abs(probs[recorded][-1] - np.asarray(record["student"]).reshape(len(y), -1)).max()))
        print(f"{name} {recipe} fold {k + 1}: A={recorded:g} against the fold record's student, max |diff| "
              f"{checks[-1]:.1e}", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    y, vote = np.concatenate(ys), np.concatenate(votes)

    def loss(p):
        return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-7, 1)).mean())

    row = {"set": name, "recipe": recipe, "draw": draw, "images": int(len(y)), "vote": float((vote.argmax(1) == y).mean()),
           "vote_loss": loss(vote), "max_check": max(checks), "alphas": {}}
    for alpha in ALPHAS:
        p = np.concatenate(probs[alpha])
        row["alphas"][str(alpha)] = {"accuracy": float((p.argmax(1) == y).mean()), "loss": loss(p)}
    return row


def summary(rows: list[dict]) -> str:
    lines = ["| set | recipe | images | vote | " + " | ".join(f"A={a:g}" for a in ALPHAS) + " |",
             "|---|---|---|---|" + "---|" * len(ALPHAS)]
    for r in rows:
        cells = [f"{v['accuracy']:.3f} ({v['loss']:.3f})" for v in r["alphas"].values()]
        lines.append(f"| {r['set']} | {r['recipe']} | {r['images']} | {r['vote']:.3f} ({r['vote_loss']:.3f}) | "
                     + " | ".join(cells) + " |")
    for recipe, draw in dict.fromkeys((r["recipe"], r.get("draw", 0)) for r in rows):
        mine = [r for r in rows if r["recipe"] == recipe and r.get("draw", 0) == draw]
        for alpha in ALPHAS:
            change = [100 * (r["alphas"][str(alpha)]["accuracy"] - r["vote"]) for r in mine]
            lines.append(f"\n{recipe} draw {draw} A={alpha:g}: mean change {sum(change) / len(change):+.1f} pt over {len(mine)} "
                         f"sets, worst {min(change):+.1f} pt")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="photos-produce,photos-animals,photos-objects,photos-scenes,fmnist30")
    parser.add_argument("--recipe", default="light-lo", help="a recipe student_folds.py has run on these sets")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/featurepipe-student-bench"))
    parser.add_argument("--draw", type=int, default=0, help="the draw student_folds.py ran (--draws)")
    parser.add_argument("--summary", action="store_true", help="print the table of what was measured, run nothing")
    args = parser.parse_args()
    log = args.cache_dir / "wise_probe.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    names = [s for s in args.sets.split(",") if s]
    if not args.summary:
        done = {(r["set"], r["recipe"], r.get("draw", 0)) for r in rows}
        for name in names:
            if (name, args.recipe, args.draw) not in done:
                row = probe(name, args.recipe, args.cache_dir, args.draw)
                rows.append(row)
                with open(log, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
    print(summary([r for r in rows if r["set"] in names]))


if __name__ == "__main__":
    main()
