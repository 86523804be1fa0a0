"""Which held-out rule keeps the student only when it pays: replayed on the outer folds that
benchmarks/student_folds.py trained (issue 22; not a test).

    python benchmarks/holdout_rule.py --cache-dir /tmp/student-bench

In each fold of student_folds.py the student was also judged on its own held-out fifth (the images
that picked its best epoch), as `finetune` without --finetune-folds judges it, and then scored on the
fold's images, which chose nothing. This replays, per set and recipe, what the run's model would have
been on those unseen images under each rule:

- vote:    never the student;
- one-up:  the rule before issue 22: one image more right (net) and the loss not risen beyond noise,
           or the loss fallen beyond noise with no image fewer right;
- beyond:  the shipped rule (training.compare, picked_here): the accuracy gain beyond noise (its 95%
           paired bootstrap interval above 0), or the loss fallen beyond noise with no image fewer;
- student: always the student.

The interval is recomputed from the fold's held-out counts (gained, lost, images) with compare's
bootstrap; the loss interval is the one the fold recorded.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

LOSS = re.compile(r"loss change ([-+0-9.]+) \(95% interval ([-+0-9.]+) to ([-+0-9.]+)\)")


def accuracy_low(gained: int, lost: int, images: int, seed: int = 0) -> float:
    """The 2.5th percentile of the paired bootstrap accuracy change, as training.compare draws it."""
    flips = np.array([1.0] * gained + [-1.0] * lost + [0.0] * (images - gained - lost))
    draws = np.random.default_rng(seed).integers(0, images, size=(2000, images))
    return float(np.percentile(flips[draws].mean(axis=1), 2.5))


def loss_fell_rose(decision: dict) -> tuple[bool, bool]:
    """(fell beyond noise, rose beyond noise) of the held-out loss, from the fold's record."""
    if "loss_change_interval" in decision:
        mean, (low, high) = decision["loss_change"], decision["loss_change_interval"]
    else:   # records written before fold.json kept the whole decision: the reason says it
        found = LOSS.search(decision.get("reason", ""))
        if not found:
            return False, False
        mean, low, high = map(float, found.groups())
    return high < 0 and mean <= -0.01, low > 0 and mean >= 0.01


def replay(folder: Path) -> dict:
    records = [json.loads(f.read_text()) for f in sorted(folder.glob("finetune/folds/fold-*/fold.json"))]
    if not records:             # a benchmark still in its first fold
        return {"folds": 0}
    right = dict.fromkeys(("vote", "one-up", "beyond", "student"), 0)
    kept = {"one-up": 0, "beyond": 0}
    images = 0
    for r in records:
        y = np.asarray(r["y"])
        vote = np.asarray(r["frozen"]).argmax(axis=1) == y
        student = np.asarray(r["student"]).argmax(axis=1) == y
        d = r["holdout_decision"]
        net = d["gained"] - d["lost"]
        fell, rose = loss_fell_rose(d)
        rules = {"one-up": (net >= 1 and not rose) or (fell and net >= 0),
                 "beyond": (net >= 1 and not rose and accuracy_low(d["gained"], d["lost"], d["images"]) > 0)
                 or (fell and net >= 0)}
        right["vote"] += int(vote.sum())
        right["student"] += int(student.sum())
        for name, keep in rules.items():
            right[name] += int((student if keep else vote).sum())
            kept[name] += int(keep)
        images += len(y)
    return {"folds": len(records), "images": images, **{k: v / images for k, v in right.items()}, "kept": kept}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/featurepipe-student-bench"))
    args = parser.parse_args()
    print("| set | recipe | images | vote | one-up (kept) | beyond noise (kept) | student |\n|---|---|---|---|---|---|---|")
    for folder in sorted((args.cache_dir / "runs").glob("*-folds-*")):
        name, recipe = folder.name.split("-folds-")
        r = replay(folder)
        if not r["folds"]:
            continue
        print(f"| {name} | {recipe} | {r['images']} | {r['vote']:.3f} | {r['one-up']:.3f} ({r['kept']['one-up']}/"
              f"{r['folds']}) | {r['beyond']:.3f} ({r['kept']['beyond']}/{r['folds']}) | {r['student']:.3f} |")


if __name__ == "__main__":
    main()
