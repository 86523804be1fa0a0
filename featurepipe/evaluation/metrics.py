"""Per-fold metrics of a head's validation probabilities, and their summary over folds (mean, std and a
95% t-interval clipped to the metric's range)."""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import sklearn
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "log_loss", "roc_auc")


def metric_names(classes: Sequence[str]) -> list[str]:
    return [*SUMMARY_METRICS, *(f"precision[{c}]" for c in classes), *(f"recall[{c}]" for c in classes)]


def fold_metrics(y_true, proba, classes: Sequence[str]) -> dict:
    """Scalar metrics (NaN where undefined for this fold) plus the confusion matrix as nested lists."""
    y_true = np.asarray(y_true).astype(int)
    proba = np.asarray(proba, dtype=np.float64)
    labels = np.arange(len(classes))
    y_pred = proba.argmax(axis=1)
    all_present = len(np.unique(y_true)) == len(classes)
    # Parameter validation costs more than the metrics themselves on small folds; inputs are ours.
    with warnings.catch_warnings(), sklearn.config_context(skip_parameter_validation=True):
        # A fold missing a class makes sklearn warn about ill-defined recall/AUC; NaN says it instead.
        warnings.simplefilter("ignore")
        out: dict[str, Any] = {
            "accuracy": accuracy_score(y_true, y_pred),
            "balanced_accuracy": balanced_accuracy_score(y_true, y_pred),
            "f1_macro": f1_score(y_true, y_pred, average="macro", zero_division=0),
            "log_loss": log_loss(y_true, proba, labels=labels),
        }
        if not all_present:
            out["roc_auc"] = np.nan
        elif len(classes) == 2:
            out["roc_auc"] = roc_auc_score(y_true, proba[:, 1])
        else:
            out["roc_auc"] = roc_auc_score(y_true, proba, multi_class="ovr", average="macro", labels=labels)
        precision, recall, _, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=np.nan)
    out = {k: float(v) for k, v in out.items()}
    for c, p, r in zip(classes, precision, recall):
        out[f"precision[{c}]"] = float(p)
        out[f"recall[{c}]"] = float(r)
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return out


def _metric_range(name: str) -> tuple[float, float]:
    return (0.0, np.inf) if name == "log_loss" else (0.0, 1.0)


def _summary(values, bounds: tuple[float, float] = (-np.inf, np.inf)) -> tuple[float, float, float, float]:
    """Mean, sample std and 95% t-interval over folds, ignoring folds where the metric is undefined.

    The interval is clipped to the metric's range: a t-interval is symmetric, an accuracy is not above 1."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return (np.nan,) * 4
    mean = float(v.mean())
    if len(v) < 2:
        return mean, np.nan, np.nan, np.nan
    std = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.975, len(v) - 1)) * std / np.sqrt(len(v))
    return mean, std, max(mean - half, bounds[0]), min(mean + half, bounds[1])
