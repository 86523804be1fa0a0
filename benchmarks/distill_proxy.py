"""Choosing the student's alpha and temperature cheaply: distillation into a linear head (not a test).

    nice -n 10 python benchmarks/distill_proxy.py --cache-dir /tmp/student-bench --draws 3

A full fine-tuning per (alpha, temperature) does not fit this machine's CPU, so the grid is measured
on a proxy that keeps everything but the backbone's training: the student is the vote's best member's
head (its own type and params) on that member's CACHED features, fitted on the soft targets (each
training image once per class, weighted by its target: the cross-entropy against a distribution),
and scored on the held-out 20% (make_split, the fine-tuning's own split per seed) against the vote
refit without them. The teacher is training.distill's out-of-fold vote on the training part only.
Runs are the ones benchmarks/student.py evaluated (CACHE/runs/SET). Prints a Markdown table: mean
held-out accuracy and cross-entropy per (alpha, temperature) over sets and draws.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ALPHAS = (0.0, 0.25, 0.5, 0.75, 0.9)
TEMPERATURES = (1.0, 2.0, 4.0)


def measure(run: Path, cache: Path, seed: int) -> list[dict]:
    from featurepipe.data.dataset import scan
    from featurepipe.deploy.predict import head_probabilities
    from featurepipe.heads import make_head
    from featurepipe.training.compare import scores
    from featurepipe.training.distill import mix, oof_teacher, teacher_folds
    from featurepipe.training.finetune_vote import member_features, open_vote, vote_proba
    from featurepipe.training.split import make_split

    vote = open_vote(run)
    config = json.loads((run / "config.json").read_text())
    classes = list(vote.meta["classes"])
    split = make_split(scan(config["dataset"]["source"], cache_dir=cache), seed)
    index = {c: i for i, c in enumerate(classes)}
    y_train = split.train["label"].map(index).to_numpy()
    y_val = split.validation["label"].map(index).to_numpy()
    train, val = split.train["hash"].tolist(), split.validation["hash"].tolist()
    fold = teacher_folds(y_train, seed)
    heads = [(m.meta["head"], m.meta.get("params") or {}) for m in vote.members]
    teacher = oof_teacher([member_features(m, cache, train) for m in vote.members], heads, y_train, len(classes),
                          fold, seed)
    vote_val = vote_proba(vote, cache, val, len(classes), (train, y_train), seed)
    student = vote.started_from
    X_train, X_val = member_features(student, cache, train), member_features(student, cache, val)
    n, k = len(y_train), len(classes)
    rows = [{"alpha": "vote", "temperature": "", **scores(y_val, vote_val)}]
    for alpha, temperature in itertools.product(ALPHAS, TEMPERATURES):
        if alpha == 0 and temperature != TEMPERATURES[0]:
            continue
        targets = mix(teacher, y_train, k, alpha, temperature)
        head = make_head(student.meta["head"], student.meta.get("params") or {}, seed)
        last = head.steps[-1][0]
        head.fit(np.repeat(X_train, k, axis=0), np.tile(np.arange(k), n),
                 **{f"{last}__sample_weight": targets.reshape(-1).astype(np.float64)})
        rows.append({"alpha": alpha, "temperature": temperature,
                     **scores(y_val, head_probabilities(head, X_val, [str(i) for i in range(k)]))})
    return [{"set": run.name, "draw": seed, **r} for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/featurepipe-student-bench"))
    parser.add_argument("--sets", default="demo,photos-animals,photos-produce,photos-scenes")
    parser.add_argument("--draws", type=int, default=3)
    args = parser.parse_args()

    rows = []
    for name in args.sets.split(","):
        for seed in range(args.draws):
            rows += measure(args.cache_dir / "runs" / name, args.cache_dir, seed)
            # Kept as measured: a later failure loses nothing.
            (args.cache_dir / "distill_proxy.json").write_text(json.dumps(rows, default=str))
    print(table(rows))


def table(rows: list[dict]) -> str:
    """Markdown: mean held-out accuracy per (alpha, temperature) and set, and the means over sets."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    frame["key"] = frame["alpha"].astype(str) + " / " + frame["temperature"].astype(str)
    per_set = frame.pivot_table(index="key", columns="set", values="val_accuracy", aggfunc="mean", sort=False)
    sets = list(per_set.columns)
    mean_ce = frame.groupby("key", sort=False)["val_loss"].mean()
    lines = ["| alpha / T | " + " | ".join(sets) + " | mean acc | mean CE |", "|---" * (len(sets) + 3) + "|"]
    for key, row in per_set.iterrows():
        lines.append(f"| {key} | " + " | ".join(f"{row[s]:.3f}" for s in sets)
                     + f" | {row.mean():.3f} | {mean_ce[key]:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
