"""--finetune-folds K: the student and the vote scored on images that chose nothing.

The held-out split scores fine-tuning on a fifth of the training images, and those images also pick
its best epoch. With K outer folds, fold k's student trains on the other folds (early stopping on
a validation part of them, training.split.fold_splits) and is scored on fold k beside the vote refit
without fold k: every training image is scored once, by two models that never saw it, and the paired
comparison over all of them (training.compare) decides which model the run keeps.

This module owns the fold records (RUN/finetune/folds/fold-K/fold.json: one finished fold, signed,
reused while its fine-tuning key is unchanged, so an interrupted run keeps its finished folds), the pooled
comparison and RUN/finetune/folds.json / folds_predictions.csv. The training itself is finetune's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from featurepipe.core import csvcells, trust
from featurepipe.core.atomic import write_json
from featurepipe.training.compare import compare, scores

FOLDS_DIR = "folds"
FOLD_RECORD = "fold.json"
FOLDS_SUMMARY = "folds.json"
FOLDS_PREDICTIONS = "folds_predictions.csv"
RECORD_FORMAT = 1


def fold_dir(finetune_dir: str, fold: int) -> str:
    """The fold's folder inside the run (1-based, as the user reads it)."""
    return f"{finetune_dir}/{FOLDS_DIR}/fold-{fold + 1}"


def read_record(folder: Path, key: str) -> Optional[dict]:
    """The finished fold in `folder` when it was trained with fine-tuning key `key`, else None
    (missing, unreadable, another key: trained again)."""
    try:
        record = json.loads((Path(folder) / FOLD_RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key or record.get("format") != RECORD_FORMAT:
        return None
    # Signed as a whole with this user's key: its probabilities decide which model the run keeps (and
    # model.json is signed on that decision), so a record edited by hand -- key kept -- is trained again.
    if not trust.signed_record(FOLD_RECORD, record, record.get("hmac")):
        return None
    return record


def write_record(folder: Path, key: str, fold: int, trained, seconds: float) -> dict:
    """fold.json of a finished fold: its test images' probabilities (the vote's, the student's and
    the one the held-out rule kept) and how it trained. `trained` is finetune's _Trained."""
    detail = trained.test_detail
    record = {
        "format": RECORD_FORMAT, "key": key, "fold": fold,
        "path": detail["path"], "hash": detail["hash"], "y": np.asarray(detail["y"]).tolist(),
        "frozen": np.asarray(detail["frozen"], dtype=float).tolist(),
        "student": np.asarray(detail["finetuned"], dtype=float).tolist(),
        "holdout_kept": trained.kept, "holdout_decision": trained.decision,
        "train_images": int(trained.x_train_count), "val_images": int(len(trained.y_val)),
        "epochs_run": int(len(trained.history)),
        "best_epoch": None if trained.best is None else int(trained.best["epoch"]) + 1,
        "seconds": round(float(seconds), 3), "failed": trained.failed,
    }
    record = trust.with_record_signature(FOLD_RECORD, record)
    write_json(Path(folder) / FOLD_RECORD, record)
    return record


def pooled(records: Sequence[dict], classes: Sequence[str], seed: int = 0, frozen_name: str = "the vote") -> dict:
    """The comparison over every fold's test images (the student against the frozen model, named
    `frozen_name`: the run's vote or its single head): the decision (training.compare, the winner
    rule: a tie keeps the vote), each model's accuracy and loss, the change with its paired 95%
    bootstrap interval, what the held-out rule alone would have scored (the kept model per fold),
    and a row per fold."""
    y = np.concatenate([np.asarray(r["y"], dtype=np.int64) for r in records])
    vote = np.concatenate([np.asarray(r["frozen"], dtype=np.float64).reshape(-1, len(classes)) for r in records])
    student = np.concatenate([np.asarray(r["student"], dtype=np.float64).reshape(-1, len(classes)) for r in records])
    by_holdout = np.concatenate([np.asarray(r["student" if r["holdout_kept"] == "finetuned" else "frozen"],
                                            dtype=np.float64).reshape(-1, len(classes)) for r in records])
    decision = compare(y, vote, student, seed, frozen_name=frozen_name)
    k, n = len(records), len(y)
    change = decision["accuracy_change"]
    low, high = decision["accuracy_change_interval"]
    headline = (f"over {k} folds ({n} training images, each scored once by models that never saw it): the "
                f"student {scores(y, student)['val_accuracy']:.3f} against {frozen_name} "
                f"{scores(y, vote)['val_accuracy']:.3f}, {100 * change:+.1f} points (95% interval "
                f"{100 * low:+.1f} to {100 * high:+.1f})")
    decision["reason"] = f"{headline}; {decision['reason']}"
    decision["basis"] = "folds"
    return {
        "folds": k, "images": int(n), "decision": decision,
        "frozen": scores(y, vote), "student": scores(y, student), "holdout_rule": scores(y, by_holdout),
        "kept": "finetuned" if decision["improved"] else "frozen", "headline": headline,
        "per_fold": [{"fold": r["fold"] + 1, "images": len(r["y"]), "train_images": r["train_images"],
                      "val_images": r["val_images"], "epochs_run": r["epochs_run"], "best_epoch": r["best_epoch"],
                      "seconds": r["seconds"], "holdout_kept": r["holdout_kept"],
                      "frozen": scores(np.asarray(r["y"]), np.asarray(r["frozen"]).reshape(-1, len(classes)))["val_accuracy"],
                      "student": scores(np.asarray(r["y"]),
                                        np.asarray(r["student"]).reshape(-1, len(classes)))["val_accuracy"]}
                     for r in records],
        "seconds": round(float(sum(r["seconds"] for r in records)), 3),
    }


def write_pooled(out: Path, result: dict, records: Sequence[dict], classes: Sequence[str]) -> None:
    """RUN/finetune/folds.json (the pooled result) and folds_predictions.csv (per image: its fold,
    label and both models' predictions, the evidence behind the decision)."""
    rows = []
    for r in records:
        vote = np.asarray(r["frozen"]).reshape(-1, len(classes))
        student = np.asarray(r["student"]).reshape(-1, len(classes))
        for i, (path, label) in enumerate(zip(r["path"], r["y"])):
            rows.append({"fold": r["fold"] + 1, "path": path, "label": classes[label],
                         "frozen_pred": classes[int(vote[i].argmax())], "student_pred": classes[int(student[i].argmax())],
                         "frozen_p_true": float(vote[i, label]), "student_p_true": float(student[i, label])})
    csvcells.write(Path(out) / FOLDS_PREDICTIONS, pd.DataFrame(rows, columns=[
        "fold", "path", "label", "frozen_pred", "student_pred", "frozen_p_true", "student_p_true"]))
    write_json(Path(out) / FOLDS_SUMMARY, result)
