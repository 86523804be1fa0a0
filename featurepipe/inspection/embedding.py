"""2-D maps of cached features (PCA and t-SNE) for the report's embedding map."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from featurepipe.data.dedup import normalized

TSNE_MAX_POINTS = 3000    # t-SNE is O(n log n) per iteration but still ~a minute at a few thousand on 2 cores


@dataclass
class EmbeddingMap:
    rows: np.ndarray                 # indices of the input rows that were mapped
    pca: np.ndarray                  # (len(rows), 2)
    tsne: Optional[np.ndarray]       # (len(rows), 2) or None when too few points
    pca_variance: tuple[float, float]
    note: str = ""


def embed(X: np.ndarray, seed: int = 0, max_points: int = TSNE_MAX_POINTS) -> EmbeddingMap:
    """PCA of the centred, L2-normalised features, and t-SNE when there are at least 5 points.

    Above `max_points` a random subset (fixed by `seed`) is mapped and the note says so.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    X = np.asarray(X, dtype=np.float64)
    n = len(X)
    if n < 3:
        raise ValueError(f"an embedding map needs at least 3 images with features, got {n}")
    rows = np.arange(n)
    note = ""
    if n > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))
        note = f"{max_points} of {n} images, drawn at random (seed {seed})"
    Z = normalized(X[rows])
    # Copies have equal features. With fewer than 3 distinct points there is nothing to map (PCA's
    # explained variance is 0/0), and t-SNE on such input computes NaNs and crashed the process
    # (a segfault in scikit-learn's Barnes-Hut code, seen with a dataset of copies of one image).
    distinct = len(np.unique(np.round(Z, 9), axis=0))
    if distinct < 3:
        raise ValueError(f"an embedding map needs at least 3 distinct images; these {n} have only {distinct} "
                         f"distinct feature vector(s) (they are copies of each other)")
    pca = PCA(n_components=2, random_state=seed).fit(Z)
    points = pca.transform(Z)
    tsne = None
    # A row equal to the mean is all zeros after centring: no cosine distance to anything (NaN).
    zero_rows = int(np.sum(~np.any(Z != 0, axis=1)))
    if len(rows) >= 5 and distinct >= 5 and not zero_rows:
        perplexity = float(min(30.0, (len(rows) - 1) / 3.0))
        # The usual t-SNE recipe: first PCA to at most 50 dimensions (keeps the neighbourhoods, makes
        # the pairwise distances ~25x cheaper on 1280-d features). One thread: its joblib threads only
        # fight each other on small inputs.
        reduced = PCA(n_components=min(50, len(rows), Z.shape[1]), random_state=seed).fit_transform(Z)
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", metric="cosine", random_state=seed,
                    max_iter=1000, n_jobs=1).fit_transform(reduced)
    else:
        why = ("t-SNE needs at least 5 images" if len(rows) < 5 else
               f"t-SNE needs at least 5 distinct images (there are {distinct})" if distinct < 5 else
               f"no t-SNE: {zero_rows} image(s) have features equal to the mean of all, with no direction")
        note = (note + "; " if note else "") + why
    variance = tuple(float(v) for v in pca.explained_variance_ratio_[:2])
    return EmbeddingMap(rows, points, tsne, variance, note)
