"""Label issues and outliers from out-of-fold probabilities and cached features: arrays in, tables out.

Label issues follow confident learning (Northcutt et al., the method behind cleanlab): every image
gets the out-of-fold probability of its given label (self-confidence) and the normalized margin
p(given) - max p(other). An image is flagged when some other class k is "confidently" predicted:
p(k) >= t_k, the mean p(k) over images labelled k (the per-class threshold), and k beats the given
label. Suspects are ranked by the normalized margin, lowest (most negative) first.

Where the probabilities come from is up to the caller (`label_issues` takes a matrix): inspect uses
a fixed logistic-regression head's out-of-fold probabilities, or a run's oof_predictions.csv.

Outliers: mean cosine distance to the k nearest other images in feature space (centred,
L2-normalised; copies of the image itself excluded). An outlier is above Q3 + 3 IQR of that score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from featurepipe.data.dedup import normalized

OUTLIER_NEIGHBOURS = 5
OUTLIER_IQR = 3.0


@dataclass
class LabelIssues:
    table: pd.DataFrame     # one row per image: row, given, suggested, self_confidence, margin, flagged, rank
    thresholds: np.ndarray  # (classes,) per-class confidence thresholds t_k

    def suspects(self, top: Optional[int] = None) -> pd.DataFrame:
        """Flagged images first (most negative margin first), then the rest by margin; `top` rows."""
        ranked = self.table.sort_values("rank")
        return ranked if top is None else ranked.head(top)


def label_issues(proba: np.ndarray, y: np.ndarray, classes: Sequence[str]) -> LabelIssues:
    """Confident-learning scores of each image's given label from out-of-fold `proba` (n, classes)."""
    proba = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y, dtype=int)
    n, k = proba.shape if proba.ndim == 2 else (len(proba), 0)
    if proba.ndim != 2 or k != len(classes) or len(y) != n:
        raise ValueError(f"proba must be (n_images, {len(classes)}) with one label per row; got {proba.shape} "
                         f"and {len(y)} labels")
    rows = np.arange(n)
    self_conf = proba[rows, y]
    others = proba.copy()
    others[rows, y] = -np.inf
    best_other = others.argmax(axis=1) if k > 1 else np.zeros(n, dtype=int)
    margin = self_conf - others[rows, best_other]
    thresholds = np.array([proba[y == c, c].mean() if np.any(y == c) else 1.0 for c in range(k)])
    # Confident off-class predictions: p(j) >= t_j for some j != given; the most probable such j wins.
    confident = proba >= thresholds[None, :]
    confident[rows, y] = False
    masked = np.where(confident, proba, -np.inf)
    confident_class = masked.argmax(axis=1)
    flagged = confident.any(axis=1) & (proba[rows, confident_class] > self_conf)
    suggested = np.where(flagged, confident_class, best_other)
    order = np.lexsort((rows, margin, ~flagged))          # flagged first, then by margin ascending
    rank = np.empty(n, dtype=int)
    rank[order] = np.arange(1, n + 1)
    names = np.asarray(classes, dtype=object)
    table = pd.DataFrame({"row": rows, "given": names[y] if n else [], "suggested": names[suggested] if n else [],
                          "self_confidence": self_conf, "margin": margin, "p_suggested": proba[rows, suggested],
                          "flagged": flagged, "rank": rank})
    return LabelIssues(table, thresholds)


@dataclass
class Outliers:
    score: np.ndarray        # (n,) mean cosine distance to the k nearest other images
    threshold: float         # Q3 + OUTLIER_IQR * IQR of the scores
    neighbours: int

    @property
    def flagged(self) -> np.ndarray:
        return self.score > self.threshold


def knn_outliers(X: np.ndarray, cluster: Optional[np.ndarray] = None, k: int = OUTLIER_NEIGHBOURS) -> Outliers:
    """kNN-distance outlier scores; rows sharing a `cluster` id (copies) are not each other's neighbours."""
    X = np.asarray(X)
    n = len(X)
    if n < 3:
        return Outliers(np.zeros(n), float("inf"), 0)
    k = max(1, min(k, n - 2))
    Z = normalized(X)
    distance = 1.0 - Z @ Z.T
    np.fill_diagonal(distance, np.inf)
    if cluster is not None:
        cluster = np.asarray(cluster)
        distance[cluster[:, None] == cluster[None, :]] = np.inf
    nearest = np.sort(distance, axis=1)[:, :k]
    # A row whose every other row is a copy has no neighbours left: it is no outlier.
    finite = np.where(np.isfinite(nearest), nearest, np.nan)
    score = np.nan_to_num(np.nanmean(np.where(np.isnan(finite).all(axis=1, keepdims=True), 0.0, finite), axis=1))
    q1, q3 = np.percentile(score, [25, 75])
    return Outliers(score, float(q3 + OUTLIER_IQR * (q3 - q1)), k)
