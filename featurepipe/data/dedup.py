"""Exact and near-duplicate images, clustered into groups that cross-validation keeps in one fold.

Two copies of one photo in different folds inflate every score: the head is validated on an image
it was trained on. Three kinds of evidence mark a pair of images as copies:

- the same content hash (byte-identical files);
- cosine similarity of their cached features (centred, L2-normalised) >= `cosine_threshold`, and
  their feature distance (1 - cosine) at most FEATURE_RELATIVE x the median nearest-neighbour
  distance of the dataset: a weak or saturated backbone (every photo of a class at cosine 0.99)
  must not turn whole classes into one "copy" group;
- Hamming distance of their 64-bit perceptual hashes <= `hamming_threshold`, which catches
  resized / re-encoded copies whatever backbone extracted the features; the distance is the
  smallest between one image's whole-image hash and the other's hashes of its central 100/90/80%
  and of its 16 off-centre trims (phash.PHASH_TRIMS), so cropped copies match too, centred or not;
- both moderately close (Hamming <= JOINT_HAMMING and cosine >= JOINT_COSINE) and each other's
  nearest neighbour in feature space: heavily degraded copies (shrunk, cropped and re-encoded at
  once) that neither test alone is sure of; here too the feature distance must be below
  JOINT_RELATIVE x the median nearest-neighbour distance. The nearest-neighbour condition is what
  keeps this rule from pairing two distinct photos of one scene type: a copy's nearest neighbour
  is its original, while a look-alike photo usually has a closer partner (its own copy, or
  another look-alike); with 19 hashes per image distinct photos come within 16 bits far more
  often than with 3 (on data/demo: 54 pairs instead of 14), so the rule needs that extra test.

Closeness alone is not evidence when the dataset is crowded (false positives on low-detail
images): on Fashion-MNIST (small objects on a black background) the background fixes
most DCT bits, so distinct sneakers sit 2-10 bits apart and similar products at cosine 0.85-0.9;
the absolute thresholds found 3,191 "copy" pairs among 1,000 distinct photos. So each test is also
judged against the two images' own neighbourhoods, which generalises to any photo set:

- a perceptual-hash match also needs a gap: the pair must be at least HASH_GAP bits closer than
  either image is to its GAP_NEIGHBOURS-th nearest other image (the pair itself left out), i.e.
  it must stand out from the image's look-alikes; the joint rule needs JOINT_HASH_GAP;
- a features match also needs 1 - cosine <= FEATURE_RATIO x either image's distance to its
  GAP_NEIGHBOURS-th nearest other image;
- near-identical on both (<= NEAR_IDENTICAL bits and cosine >= its cosine) needs no gap: two
  independent signals both at re-encoding level; this keeps groups of more than GAP_NEIGHBOURS + 1
  copies of one photo (where the neighbourhood is the copies themselves) together.

Pairs are joined into groups by complete linkage: strongest pair first, two groups merge only if
every image of one is a flagged copy of every image of the other. Union-find (single linkage) let
a~b, b~c, c~d... chain 634 distinct Fashion-MNIST photos into one group, which StratifiedGroupKFold
cannot balance. A pair left out of a group by this stays in `pairs` with grouped=False. The groups
are merged with the user's own groups. Pure functions on arrays; the only I/O is
`duplicate_groups`, which asks perceptual.py for the (cached) hashes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from featurepipe.core.cachedirs import dedup_dir

# Measured on data/demo with 20 planted copies, 8 seeds (benchmarks/dedup.py, see README "inspect"):
# distinct demo photos reach at most cosine 0.79 and at least Hamming 12 (10 between a planted copy
# and a look-alike of its original); with the off-centre trims every planted copy is within 8 bits
# of its original (re-encodes 0-2, crops 2-8, shrunk+cropped+re-encoded 2-8; without the trims the
# last reached 26 bits and was missed), at cosine 0.28-0.99.
DEFAULT_COSINE = 0.85
DEFAULT_HAMMING = 10
JOINT_HAMMING = 12
JOINT_COSINE = 0.60
# On data/demo the median nearest-neighbour distance is ~0.46 and the closest distinct photos sit at
# 0.44-0.47 of it; the absolute thresholds above correspond to ~0.33 (0.85) and ~0.87 (0.60) of it.
FEATURE_RELATIVE = 0.35
JOINT_RELATIVE = 0.9
# The local-density tests, against false positives on low-detail images.
# Planted demo copies (8 seeds, 160 pairs) stand >= 10 bits clear of the 3rd-nearest other image of
# either side, except two shrunk+cropped+re-encoded ones at 8 and 6 bits, whose features agree (mutual
# nearest neighbours, cosine 0.75-0.80: the joint rule); on Fashion-MNIST 1,000 distinct photos
# reach at most 10 and hash-close look-alikes mostly 0-6.
GAP_NEIGHBOURS = 3          # the neighbourhood: groups of up to GAP_NEIGHBOURS + 1 copies still stand out
HASH_GAP = 8
JOINT_HASH_GAP = 4
FEATURE_RATIO = 0.4         # planted copies at cosine >= 0.85: <= 0.32; Fashion-MNIST look-alikes there: 0.36-0.82
NEAR_IDENTICAL = (4, 0.9)   # (max bits, min cosine): re-encodes sit 0-2 bits (cosine 0.82-0.99) from their original, so two re-encodes of one photo <= 4 apart
BLOCK = 1024   # rows per block of the pairwise comparison: memory stays O(BLOCK * n)


@dataclass
class DuplicateReport:
    pairs: pd.DataFrame          # one row per pair i<j: i, j, cosine, hamming, evidence
    cluster: np.ndarray          # (n,) int: rows sharing a value are copies of each other
    cosine_threshold: float
    hamming_threshold: int
    phash_failed: int = 0        # images whose perceptual hash could not be computed (features-only test)

    @property
    def clusters(self) -> list[np.ndarray]:
        """Row indices of every cluster with more than one member, largest first."""
        ids, counts = np.unique(self.cluster, return_counts=True)
        multi = ids[counts > 1]
        groups = [np.flatnonzero(self.cluster == c) for c in multi]
        return sorted(groups, key=lambda g: (-len(g), g[0]))

    @property
    def duplicated_rows(self) -> int:
        return int(sum(len(c) for c in self.clusters))


def normalized(X: np.ndarray) -> np.ndarray:
    """Rows centred on the dataset mean and scaled to unit length.

    Pooled CNN features are non-negative, so raw cosines of unrelated photos are already ~0.7;
    centring spreads them out so one threshold means "copy" across backbones.
    """
    X = np.asarray(X, dtype=np.float64)
    if len(X) == 0:
        return X
    centred = X - X.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    return centred / np.where(norms > 0, norms, 1.0)


def hamming_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise bit differences between two arrays of uint64 hashes."""
    return np.bitwise_count(np.asarray(a, np.uint64)[:, None] ^ np.asarray(b, np.uint64)[None, :]).astype(np.int16)


def phash_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Crop-tolerant distance between rows of (n, k) and (m, k) hash arrays, column 0 = whole image:
    the smallest Hamming distance of a whole-image hash to any hash of the other image."""
    d = hamming_matrix(a[:, 0], b[:, 0])
    for k in range(1, a.shape[1]):
        d = np.minimum(d, hamming_matrix(a[:, 0], b[:, k]))
        d = np.minimum(d, hamming_matrix(a[:, k], b[:, 0]))
    return d


def find_duplicates(
    X: np.ndarray,
    content_hashes: Sequence[str],
    phashes: Optional[Sequence[Optional[Sequence[int]]]] = None,
    cosine_threshold: float = DEFAULT_COSINE,
    hamming_threshold: int = DEFAULT_HAMMING,
    joint: Optional[tuple[int, float]] = (JOINT_HAMMING, JOINT_COSINE),
) -> DuplicateReport:
    """Every pair of rows that are copies by content hash, feature cosine or perceptual hash.

    `phashes[i]` is row i's hashes (whole image first, then central crops and trims; see
    phash.perceptual_hash) or None / () when it has none (the perceptual tests are skipped for it).
    `joint` = (max Hamming, min cosine) for pairs close on both; None turns that rule off.
    """
    X = np.asarray(X)
    n = len(X)
    hashes = np.asarray([str(h) for h in content_hashes], dtype=object)
    if len(hashes) != n:
        raise ValueError(f"{len(hashes)} content hashes for {n} feature rows")
    have_ph = np.zeros(n, dtype=bool)
    width = max([1] + [len(v) for v in (phashes or []) if v is not None])
    ph = np.zeros((n, width), dtype=np.uint64)
    if phashes is not None:
        if len(phashes) != n:
            raise ValueError(f"{len(phashes)} perceptual hashes for {n} feature rows")
        for i, value in enumerate(phashes):
            if value is not None and len(value):     # None: not decodable; (): a flat image, nothing to hash
                values = [int(v) for v in value]
                have_ph[i] = True
                ph[i] = values + [values[0]] * (width - len(values))   # missing crops: the whole image
    Z = normalized(X)
    typical, nearest = nearest_neighbours(Z, hashes)
    feature_scale = neighbourhood(hashes, lambda a, b: 1.0 - Z[a:b] @ Z.T)
    hash_scale = neighbourhood(hashes, lambda a, b: np.where(have_ph[a:b, None] & have_ph[None, :],
                                                             phash_distances(ph[a:b], ph), np.inf))
    rows_i, rows_j, cos_out, ham_out, kinds = [], [], [], [], []
    for start in range(0, n, BLOCK):
        stop = min(n, start + BLOCK)
        rows, cols = np.arange(start, stop), np.arange(n)
        cos = Z[start:stop] @ Z.T                       # (block, n)
        ham = phash_distances(ph[start:stop], ph)
        both = have_ph[start:stop, None] & have_ph[None, :]
        same = hashes[start:stop, None] == hashes[None, :]
        # How far each image's neighbourhood is, the partner left out: the yardstick of the gap tests.
        hash_around = np.minimum(_without_partner(hash_scale, rows, ham, axis=0),
                                 _without_partner(hash_scale, cols, ham, axis=1))
        feature_around = np.minimum(_without_partner(feature_scale, rows, 1.0 - cos, axis=0),
                                    _without_partner(feature_scale, cols, 1.0 - cos, axis=1))
        with np.errstate(invalid="ignore"):          # inf - inf where a tiny dataset has no neighbourhood
            gap = np.where(np.isfinite(hash_around), hash_around - ham, np.inf)
        in_typical = 1 - cos <= FEATURE_RELATIVE * typical
        by_cos = (cos >= cosine_threshold) & in_typical & (1 - cos <= FEATURE_RATIO * feature_around)
        by_ham = both & (ham <= hamming_threshold) & (gap >= HASH_GAP)
        by_near = both & (ham <= NEAR_IDENTICAL[0]) & (cos >= NEAR_IDENTICAL[1]) & in_typical
        mutual = (nearest[rows][:, None] == cols[None, :]) & (nearest[cols][None, :] == rows[:, None])
        by_joint = (both & mutual & (ham <= joint[0]) & (cos >= joint[1]) & (1 - cos <= JOINT_RELATIVE * typical)
                    & (gap >= JOINT_HASH_GAP) if joint is not None else np.zeros_like(by_cos))
        hit = same | by_cos | by_ham | by_near | by_joint
        upper = rows[:, None] < cols[None, :]
        bi, j = np.nonzero(hit & upper)
        for b, jj in zip(bi, j):
            if same[b, jj]:
                kind = "content hash"
            else:
                kind = "+".join(k for k, on in (("features", by_cos[b, jj]), ("perceptual hash", by_ham[b, jj]))
                                if on)
                if not kind:
                    kind = ("features and perceptual hash, both near-identical" if by_near[b, jj]
                            else "features and perceptual hash, both moderately close")
            rows_i.append(start + b)
            rows_j.append(int(jj))
            cos_out.append(float(cos[b, jj]))
            ham_out.append(int(ham[b, jj]) if both[b, jj] else -1)
            kinds.append(kind)
    pairs = pd.DataFrame({"i": np.asarray(rows_i, dtype=int), "j": np.asarray(rows_j, dtype=int),
                          "cosine": np.asarray(cos_out, dtype=float), "hamming": np.asarray(ham_out, dtype=int),
                          "evidence": kinds})
    # Strongest first: byte-identical, then by the closer of the two distances, each as a fraction of
    # its largest value (64 bits; 1 - cosine <= 2).
    strength = np.minimum(np.where(pairs["hamming"] >= 0, pairs["hamming"] / 64.0, 1.0), (1.0 - pairs["cosine"]) / 2.0)
    strength = np.where(pairs["evidence"] == "content hash", -1.0, strength)
    order = np.argsort(strength, kind="stable")
    cluster = complete_linkage(n, zip(pairs["i"].to_numpy()[order], pairs["j"].to_numpy()[order]))
    pairs["grouped"] = cluster[pairs["i"].to_numpy(dtype=int)] == cluster[pairs["j"].to_numpy(dtype=int)]
    return DuplicateReport(pairs, cluster, float(cosine_threshold), int(hamming_threshold))


def nearest_neighbours(Z: np.ndarray, hashes: np.ndarray) -> tuple[float, np.ndarray]:
    """The median over rows of 1 - cosine to the nearest other row with different content (inf if
    < 3 rows), and each row's nearest such row (-1 where there is none)."""
    n = len(Z)
    index = np.full(n, -1, dtype=int)
    if n < 2:
        return float("inf"), index
    nearest = np.empty(n)
    for start in range(0, n, BLOCK):
        stop = min(n, start + BLOCK)
        distance = 1.0 - Z[start:stop] @ Z.T
        distance[hashes[start:stop, None] == hashes[None, :]] = np.inf     # itself and byte-identical copies
        index[start:stop] = distance.argmin(axis=1)
        nearest[start:stop] = distance.min(axis=1)
    index[~np.isfinite(nearest)] = -1
    finite = nearest[np.isfinite(nearest)]
    typical = float(np.median(finite)) if len(finite) and n >= 3 else float("inf")
    return typical, index


def neighbourhood(hashes: np.ndarray, distances, k: int = GAP_NEIGHBOURS) -> np.ndarray:
    """(n, 2): each row's distance to its k-th and (k+1)-th nearest row with different content (inf
    where there are not that many). `distances(start, stop)` gives the (stop - start, n) block."""
    n = len(hashes)
    out = np.full((n, 2), np.inf)
    for start in range(0, n, BLOCK):
        stop = min(n, start + BLOCK)
        d = np.array(distances(start, stop), dtype=np.float64)
        d[hashes[start:stop, None] == hashes[None, :]] = np.inf          # itself and byte-identical copies
        if n > k:
            part = np.partition(d, (k - 1, k), axis=1) if n > k + 1 else np.partition(d, k - 1, axis=1)
            out[start:stop, 0] = part[:, k - 1]
            if n > k + 1:
                out[start:stop, 1] = part[:, k]
    return out


def _without_partner(scale: np.ndarray, index: np.ndarray, distance: np.ndarray, axis: int) -> np.ndarray:
    """The k-th nearest distance of the rows (axis 0) or columns (axis 1) of a pair block, the pair's
    other image left out: if the partner is itself among the k nearest, the (k+1)-th."""
    kth, next_ = scale[index, 0], scale[index, 1]
    if axis == 0:
        kth, next_ = kth[:, None], next_[:, None]
    else:
        kth, next_ = kth[None, :], next_[None, :]
    return np.where(distance <= kth, next_, kth)


def complete_linkage(n: int, edges) -> np.ndarray:
    """Groups of `n` nodes from `edges` taken in order (strongest first): two groups merge only when
    every node of one has an edge to every node of the other, so a~b and b~c without a~c never make
    one group and look-alikes cannot chain. Labels are the smallest member index."""
    edges = [(int(a), int(b)) for a, b in edges]
    linked = {(min(a, b), max(a, b)) for a, b in edges}
    members = {i: [i] for i in range(n)}
    label = list(range(n))
    for a, b in edges:
        la, lb = label[a], label[b]
        if la == lb:
            continue
        if all((min(x, y), max(x, y)) in linked for x in members[la] for y in members[lb]):
            keep, gone = min(la, lb), max(la, lb)
            for x in members[gone]:
                label[x] = keep
            members[keep] += members.pop(gone)
    return np.asarray(label, dtype=int)


def union_find(n: int, edges) -> np.ndarray:
    """Connected components of `n` nodes joined by `edges`; labels are the smallest member index."""
    parent = list(range(n))

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in edges:
        ra, rb = root(int(a)), root(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.asarray([root(i) for i in range(n)], dtype=int)


def merge_groups(cluster: np.ndarray, user_groups: Optional[Sequence] = None) -> np.ndarray:
    """Group ids (strings) that keep both the duplicate clusters and the user's groups whole.

    Rows without a user group (None/NaN) are their own group unless a cluster joins them to others;
    a cluster touching two user groups merges them (a copy in each would otherwise leak).
    """
    cluster = np.asarray(cluster, dtype=int)
    n = len(cluster)
    edges = [(i, int(c)) for i, c in enumerate(cluster) if c != i]
    if user_groups is not None:
        first: dict[str, int] = {}
        for i, g in enumerate(user_groups):
            if g is None or (isinstance(g, float) and np.isnan(g)):
                continue
            key = str(g)
            if key in first:
                edges.append((i, first[key]))
            else:
                first[key] = i
    labels = union_find(n, edges)
    names = {}
    if user_groups is not None:
        for i, g in enumerate(user_groups):
            if g is not None and not (isinstance(g, float) and np.isnan(g)):
                names.setdefault(labels[i], str(g))
    return np.asarray([names.get(labels[i], f"dup:{labels[i]}") for i in range(n)], dtype=object)


def straddling_pairs(pairs: pd.DataFrame, folds) -> list[int]:
    """For each fold, how many duplicate pairs have one image in training and one in validation."""
    out = []
    for fold in folds:
        val = np.zeros(int(max(pairs[["i", "j"]].to_numpy().max(initial=-1) + 1,
                               max(np.max(fold.val_idx, initial=-1), np.max(fold.train_idx, initial=-1)) + 1)),
                       dtype=np.int8)
        val[np.asarray(fold.train_idx, dtype=int)] = 1
        val[np.asarray(fold.val_idx, dtype=int)] = 2
        a = val[pairs["i"].to_numpy(dtype=int)]
        b = val[pairs["j"].to_numpy(dtype=int)]
        out.append(int(np.sum(((a == 1) & (b == 2)) | ((a == 2) & (b == 1)))))
    return out


# ------------------------------------------------------------------------------ the evaluate hook


@dataclass
class DedupGrouping:
    enabled: bool
    clusters: int                 # duplicate clusters (2+ images) among the rows
    images_in_clusters: int
    groups: int                   # distinct groups CV will see (0 when folds stay ungrouped)
    pairs: int
    cosine_threshold: float
    hamming_threshold: int
    phash_failed: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @property
    def message(self) -> str:
        """What the user is told when grouping changed the folds ("" when it did not)."""
        if not (self.enabled and self.clusters):
            return ""
        return (f"{self.clusters} group(s) of near-duplicate images ({self.images_in_clusters} images) are kept in "
                f"one CV fold each (see `featurepipe inspect`; --no-dedup-groups turns this off)")


def apply_duplicate_groups(frame: pd.DataFrame, X: np.ndarray, cache_root: Optional[Path],
                           cosine_threshold: float = DEFAULT_COSINE, hamming_threshold: int = DEFAULT_HAMMING,
                           progress=None) -> tuple[pd.DataFrame, DedupGrouping]:
    """The frame with its "group" column set so that near-duplicates share a group (merged with user groups).

    When no duplicates are found the frame is returned unchanged (same folds as without the hook).
    The grouping is kept in CACHE/dedup/ by what it depends on (the rows' content hashes, user groups,
    features and thresholds): finding the pairs was 33 s of a 41 s `evaluate` of 10,000 images that
    had nothing else to compute.
    """
    key = _grouping_key(frame, X, cosine_threshold, hamming_threshold)
    remembered = _remembered_grouping(cache_root, key, len(frame))
    if remembered is not None:
        groups, info = remembered
    else:
        groups, report = duplicate_groups(frame, X, cache_root, cosine_threshold, hamming_threshold, progress)
        info = DedupGrouping(True, len(report.clusters), report.duplicated_rows, 0, len(report.pairs),
                             report.cosine_threshold, report.hamming_threshold, report.phash_failed)
        if report.clusters:
            info.groups = int(pd.Series(groups).nunique())
        _remember_grouping(cache_root, key, groups if report.clusters else None, info)
    if not info.clusters:
        return frame, info
    frame = frame.copy()
    frame["group"] = groups
    return frame, info


# Bump when finding duplicates or merging groups changes: remembered groupings are then not reused.
GROUPING_VERSION = 1


def _grouping_key(frame: pd.DataFrame, X: np.ndarray, cosine_threshold: float, hamming_threshold: int) -> str:
    from featurepipe.core.digest import digest

    user = frame["group"].to_numpy(dtype=object) if "group" in frame.columns else None
    return digest(GROUPING_VERSION, float(cosine_threshold), int(hamming_threshold), frame["hash"].tolist(), user,
                  np.asarray(X, dtype=np.float32))[:40]


def _remembered_grouping(cache_root: Optional[Path], key: str, rows: int):
    """(groups or None, DedupGrouping) kept for `key`; None when there is none or it does not fit."""
    import json

    if cache_root is None:
        return None
    try:
        data = json.loads((dedup_dir(cache_root) / f"{key}.json").read_text())
        info = DedupGrouping(**data["info"])
        groups = data["groups"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    counts = (info.clusters, info.images_in_clusters, info.groups, info.pairs, info.phash_failed)
    if not (info.enabled is True and all(type(c) is int and c >= 0 for c in counts)
            and all(isinstance(t, (int, float)) for t in (info.cosine_threshold, info.hamming_threshold))):
        return None   # not what _remember_grouping writes: found again
    if groups is None and info.clusters == 0:
        return None, info
    if info.clusters and isinstance(groups, list) and len(groups) == rows and all(isinstance(g, str) for g in groups):
        return np.asarray(groups, dtype=object), info
    return None


def _remember_grouping(cache_root: Optional[Path], key: str, groups, info: DedupGrouping) -> None:
    from featurepipe.core import atomic

    if cache_root is None:
        return
    try:
        dedup_dir(cache_root).mkdir(parents=True, exist_ok=True)
        atomic.write_json(dedup_dir(cache_root) / f"{key}.json",
                          {"groups": None if groups is None else [str(g) for g in groups], "info": info.to_dict()})
    except OSError:
        pass   # not kept: found again next time


def fold_shortfall(frame: pd.DataFrame, grouped: pd.DataFrame, folds: Optional[int]) -> Optional[str]:
    """What to tell the user when duplicate grouping, and only it, leaves a class of the training split
    with fewer groups than `folds` (None: the automatic fold count, which goes down to 2 folds, so a
    class falls short only below 2 groups); None when none does.

    Without this, k-fold CV fails on a dataset the user never grouped with "class 'x' has images from
    only 1 distinct group ... add groups", which blames groups the user never set (1,000 classes of 2
    photos, one pair of copies) and does not say where they came from or what to do.
    """
    needed = 2 if folds is None else folds
    train = (frame["split"] == "train").to_numpy()
    before_frame, after_frame = frame[train], grouped[train]
    user = before_frame["group"] if "group" in before_frame.columns else pd.Series(np.nan, index=before_frame.index)
    before = user.astype(object).where(user.notna(), [f"row:{i}" for i in before_frame.index])
    for label in sorted(before_frame["label"].unique(), key=str):
        rows = (before_frame["label"] == label).to_numpy()
        had, has = before[rows].nunique(), after_frame["group"][rows].nunique()
        if has < needed <= had:
            members = after_frame[rows].groupby("group")["path"].apply(list)
            copies = [" ~ ".join(Path(p).name for p in paths) for paths in members if len(paths) > 1]
            shown = "; ".join(copies[:3]) + (f"; and {len(copies) - 3} more" if len(copies) > 3 else "")
            too_few = (f"too few for {folds}-fold cross-validation. Use --folds {max(2, has)}, remove the copies, "
                       if folds is not None and has >= 2 else
                       "too few for cross-validation, which needs 2 per class. Remove the copies, ")
            return (f"class '{label}' has {had} training images (or groups), but the automatic near-duplicate "
                    f"grouping keeps the copies among them ({shown}) in one fold each, which leaves {has}: "
                    f"{too_few}or pass --no-dedup-groups (the copies may then straddle folds and inflate the scores)")
    return None


def duplicate_groups(frame: pd.DataFrame, X: np.ndarray, cache_root: Optional[Path],
                     cosine_threshold: float = DEFAULT_COSINE, hamming_threshold: int = DEFAULT_HAMMING,
                     progress=None) -> tuple[np.ndarray, DuplicateReport]:
    """Group ids for `frame`'s rows (user groups merged with duplicate clusters) and the duplicates found."""
    from featurepipe.data.perceptual import perceptual_hashes

    first_path = frame.drop_duplicates("hash").set_index("hash")["path"].to_dict()
    ph = perceptual_hashes(first_path, cache_root, progress=progress)
    report = find_duplicates(X, frame["hash"].tolist(), [ph.hashes.get(h) for h in frame["hash"]],
                             cosine_threshold, hamming_threshold)
    report.phash_failed = len(ph.failed)
    user = frame["group"].tolist() if "group" in frame.columns and frame["group"].notna().any() else None
    return merge_groups(report.cluster, user), report
