"""What the report computes from the best head's out-of-fold predictions: the confusion counts,
per-class precision and recall, and the misclassified images, most confident first."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd


def confusion_counts(oof: pd.DataFrame, classes: list[str]) -> np.ndarray:
    """Counts of (true, predicted) over the rows, in the order of `classes`; other labels are skipped."""
    index = {c: i for i, c in enumerate(classes)}
    counts = np.zeros((len(classes), len(classes)), dtype=int)
    for true, pred in zip(oof["true"], oof["pred"]):
        if true in index and pred in index:
            counts[index[true], index[pred]] += 1
    return counts


def per_class_stats(counts: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Precision, recall, F1, support and times predicted of every class, from confusion counts."""
    tp = np.diag(counts).astype(float)
    predicted = counts.sum(axis=0).astype(float)
    support = counts.sum(axis=1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    return pd.DataFrame({"class": classes, "precision": precision, "recall": recall, "f1": f1,
                         "support": support.astype(int), "predicted": predicted.astype(int)})


@dataclass
class Mistake:
    """One misclassified image, with its most confident wrong prediction over the repeats."""

    path: str
    true: str
    pred: str
    confidence: float      # probability the head gave its (wrong) prediction
    p_true: float          # probability it gave the true class
    wrong: int             # in how many repeats this image was misclassified
    repeats: int


def find_mistakes(oof: pd.DataFrame, repeats: int) -> list[Mistake]:
    """Every misclassified image once, the most confident mistakes first (then by path)."""
    wrong = oof[oof["true"] != oof["pred"]]
    found: dict[str, Mistake] = {}
    for row in wrong.to_dict("records"):
        confidence = row.get(f"p[{row['pred']}]", float("nan"))
        p_true = row.get(f"p[{row['true']}]", float("nan"))
        confidence = float(confidence) if confidence is not None else float("nan")
        previous = found.get(row["path"])
        score = -1.0 if math.isnan(confidence) else confidence
        if previous is None or score > (-1.0 if math.isnan(previous.confidence) else previous.confidence):
            found[row["path"]] = Mistake(row["path"], row["true"], row["pred"], confidence,
                                         float(p_true) if p_true is not None else float("nan"),
                                          (previous.wrong if previous else 0), repeats)
        found[row["path"]].wrong += 1
    return sorted(found.values(), key=lambda m: (-(m.confidence if not math.isnan(m.confidence) else -1.0), m.path))
