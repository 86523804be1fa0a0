"""Images for training: the train / validation / test split of a dataset, and decoding it.

Plain pandas and numpy (no Keras): finetune and baseline both train on these images, and the split
is written to split.json so a resumed call trains on exactly the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

from featurepipe.data.dataset import Dataset
from featurepipe.core.errors import FeaturepipeError, ImageDecodeError
from featurepipe.data.images import decode_image
from featurepipe.core.progress import ProgressCallback, report

VALIDATION_FRACTION = 0.2
# ImageSplit.source of one outer fold of --finetune-folds: its test images are a fold of the training images.
FOLDS_SOURCE = "folds"


@dataclass
class ImageSplit:
    source: str                 # "validation" (the dataset's own split) | "holdout" | FOLDS_SOURCE
    seed: int
    fraction: float
    train: pd.DataFrame         # path, label, hash
    validation: pd.DataFrame
    # The dataset's test split: scored once, after every choice is made (never for choices).
    test: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["path", "label", "hash"]))

    def to_json(self) -> dict:
        cols = ["path", "label", "hash"]
        return {"source": self.source, "seed": self.seed, "fraction": self.fraction,
                "train": self.train[cols].values.tolist(), "validation": self.validation[cols].values.tolist(),
                "test": self.test[cols].values.tolist()}

    @classmethod
    def from_json(cls, data: dict) -> "ImageSplit":
        cols = ["path", "label", "hash"]
        return cls(data["source"], int(data["seed"]), float(data["fraction"]),
                   pd.DataFrame(data["train"], columns=cols), pd.DataFrame(data["validation"], columns=cols),
                   pd.DataFrame(data.get("test") or [], columns=cols))


def _holdout(frame: pd.DataFrame, classes: list[str], seed: int, fraction: float) -> np.ndarray:
    """Boolean mask of held-out rows: about `fraction` of each class, at least one, never all.

    Rows sharing a group (manifest groups) are held out together, so no group straddles the split.
    """
    rng = np.random.default_rng(seed)
    labels = frame["label"].to_numpy()
    counts = {c: int((labels == c).sum()) for c in classes}
    for label, count in counts.items():
        if count < 2:
            raise FeaturepipeError(
                f"class {label!r} has {count} training image(s): at least 2 are needed to hold one out for "
                f"validation; add images, or give the dataset a validation split (DATA/validation/<class>/)")
    target = {c: max(1, int(round(fraction * n))) for c, n in counts.items()}
    groups = frame["group"].where(frame["group"].notna(), frame["path"]).astype(str).to_numpy()
    unique = np.unique(groups)
    held = np.zeros(len(frame), dtype=bool)
    taken = dict.fromkeys(classes, 0)
    for group in unique[rng.permutation(len(unique))]:
        rows = groups == group
        group_counts = pd.Series(labels[rows]).value_counts().to_dict()
        wanted = any(taken[c] < target[c] for c in group_counts)
        keeps_training = all(counts[c] - taken[c] - k >= 1 for c, k in group_counts.items())
        if wanted and keeps_training:
            held |= rows
            for c, k in group_counts.items():
                taken[c] += k
    return held


def make_split(dataset: Dataset, seed: int = 0, fraction: float = VALIDATION_FRACTION) -> ImageSplit:
    """The dataset's validation split if it has one, else a stratified held-out `fraction` of train."""
    frame = dataset.frame
    classes = list(dataset.classes)
    train = frame[frame["split"] == "train"].reset_index(drop=True)
    validation = frame[frame["split"] == "validation"].reset_index(drop=True)
    test = frame[frame["split"] == "test"].reset_index(drop=True)
    if len(validation):
        missing = [c for c in classes if not (validation["label"] == c).any()]
        if missing:
            raise FeaturepipeError(
                f"the validation split has no image of class(es) {', '.join(map(repr, missing))}; every class "
                f"needs at least one validation image to measure fine-tuning: add some under "
                f"{dataset.source}/validation/<class>/")
        return ImageSplit("validation", seed, 0.0, train, validation, test)
    held = _holdout(train, classes, seed, fraction)
    return ImageSplit("holdout", seed, fraction, train[~held].reset_index(drop=True),
                      train[held].reset_index(drop=True), test)


def fold_splits(dataset: Dataset, folds: int, seed: int = 0, fraction: float = VALIDATION_FRACTION) -> list[ImageSplit]:
    """--finetune-folds: K splits whose test images are the K stratified (group) folds of the
    training images, so every training image is scored once by a model that never saw it. Each
    fold's validation images (early stopping, the best epoch) are the dataset's validation split if
    it has one, else `fraction` of the other folds held out as make_split holds them out. The
    dataset's own test split is left out: it is scored by the final fine-tuning, once."""
    from featurepipe.evaluation.folds import make_folds

    frame, classes = dataset.frame, list(dataset.classes)
    train = frame[frame["split"] == "train"].reset_index(drop=True)
    validation = frame[frame["split"] == "validation"].reset_index(drop=True)
    groups = train["group"].where(train["group"].notna(), train["path"]).astype(str).to_numpy()
    grouped = bool(train["group"].notna().any())
    splits = []
    y = train["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
    for fold in make_folds(y, groups if grouped else None, folds, 1, seed, class_names=classes):
        rest, test = train.iloc[fold.train_idx].reset_index(drop=True), train.iloc[fold.val_idx].reset_index(drop=True)
        if len(validation):
            splits.append(ImageSplit(FOLDS_SOURCE, seed, 0.0, rest, validation, test))
            continue
        held = _holdout(rest, classes, seed + fold.fold, fraction)
        splits.append(ImageSplit(FOLDS_SOURCE, seed, fraction, rest[~held].reset_index(drop=True),
                                 rest[held].reset_index(drop=True), test))
    return splits


def decode_frame(frame: pd.DataFrame, size: int, resize: str, progress: Optional[ProgressCallback] = None,
                 stage: str = "decode") -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(uint8 images, kept row mask, failures) for every row of `frame`; undecodable files are skipped."""
    images, kept, failed = [], np.zeros(len(frame), dtype=bool), []
    for i, path in enumerate(frame["path"]):
        try:
            images.append(decode_image(path, size, resize))
            kept[i] = True
        except ImageDecodeError as error:
            failed.append({"path": str(path), "reason": error.reason})
        if (i + 1) % 64 == 0:
            report(progress, stage, i + 1, len(frame), "")
    report(progress, stage, len(frame), len(frame), f"{len(failed)} failed" if failed else "")
    stacked = np.stack(images) if images else np.zeros((0, size, size, 3), dtype=np.uint8)
    return stacked, kept, failed


def decode_split(split: ImageSplit, classes: list[str], size: int, resize: str,
                 progress: Optional[ProgressCallback] = None):
    """((x, y, rows) for train, the same for validation, failures); every class must keep a
    validation image."""
    both = pd.concat([split.train, split.validation], ignore_index=True)
    images, kept, failed = decode_frame(both, size, resize, progress)
    label_index = {c: i for i, c in enumerate(classes)}
    n_train = len(split.train)
    positions = np.cumsum(kept) - 1           # row -> index into `images` (for kept rows)
    parts = []
    for rows in (np.arange(n_train), np.arange(n_train, len(both))):
        rows = rows[kept[rows]]
        frame = both.iloc[rows].reset_index(drop=True)
        parts.append((images[positions[rows]], frame["label"].map(label_index).to_numpy(np.int32), frame))
    missing = [c for c in classes if not (parts[1][2]["label"] == c).any()]
    if missing:
        raise FeaturepipeError(f"no validation image of class(es) {', '.join(map(repr, missing))} could be decoded")
    return parts[0], parts[1], failed

