"""The student's training targets: the vote's out-of-fold probabilities mixed with the true label.

Fine-tuning one backbone on hard labels throws away what the vote knows (several feature sets'
heads agree on which training images look like which other class). Knowledge distillation keeps it:
each training image's target is

    target = alpha * soften(teacher, T) + (1 - alpha) * one_hot(label)

and the loss is the cross-entropy against that distribution (alpha = 0: hard-label training's
targets exactly; with --label-smoothing the one-hot part is smoothed first, as before).

Honesty: the teacher's probability for a training image must not come from a head that saw it (its
own label would leak back in, a confident copy of one_hot) nor from one that saw a held-out image
(the held-out images score the student against the vote and must have chosen nothing). So the
teacher is re-fitted K-fold on the fine-tuning's TRAINING images only: for fold k, every vote member's
head (its head type and params, as the run chose them) is fitted on the other folds' cached features
and predicts fold k; the members' probabilities are averaged, as the vote averages them. Cheap: a
logreg on cached features per member and fold, no backbone pass.

A run whose model is one head is its own teacher (self-distillation: the same out-of-fold recipe).
With a class of fewer than 2 training images there are no out-of-fold probabilities to give; the
targets are then the hard labels and the caller says so.

Plain numpy and scikit-learn: importing this module does not import TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

# K of the teacher's K-fold (fewer when the smallest class has fewer training images).
TEACHER_FOLDS = 5


@dataclass
class Targets:
    """The training targets and where they came from."""

    targets: np.ndarray                 # (n, classes) float32, rows sum to 1
    teacher: Optional[np.ndarray]       # (n, classes) out-of-fold teacher probabilities (before softening)
    folds: Optional[np.ndarray]         # (n,) the fold each image was predicted in; None without a teacher
    note: str = ""                      # why there is no teacher, when there is none

    def info(self, labels: np.ndarray) -> dict:
        """What summary.json records about the teacher (its out-of-fold accuracy on the training images)."""
        if self.teacher is None:
            return {"folds": 0, "note": self.note}
        return {"folds": int(self.folds.max()) + 1,
                "oof_accuracy": float(np.mean(self.teacher.argmax(axis=1) == labels)), "note": self.note}


def one_hot(labels: np.ndarray, n_classes: int, smoothing: float = 0.0) -> np.ndarray:
    """One-hot rows, label-smoothed as Keras does (1 - s on the label, s / n_classes spread over all)."""
    rows = np.eye(n_classes, dtype=np.float64)[np.asarray(labels, dtype=np.int64)]
    return rows * (1.0 - smoothing) + smoothing / n_classes


def soften(proba: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities at temperature T: softmax(log p / T), i.e. p ** (1/T) renormalised (T = 1: unchanged)."""
    logits = np.log(np.clip(np.asarray(proba, dtype=np.float64), 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def mix(teacher: Optional[np.ndarray], labels: np.ndarray, n_classes: int, alpha: float, temperature: float,
        smoothing: float = 0.0) -> np.ndarray:
    """alpha * soften(teacher, T) + (1 - alpha) * one_hot(labels) as float32; alpha 0 (or no teacher):
    exactly the hard (label-smoothed) targets."""
    hard = one_hot(labels, n_classes, smoothing)
    if teacher is None or alpha == 0:
        return hard.astype(np.float32)
    return (alpha * soften(teacher, temperature) + (1.0 - alpha) * hard).astype(np.float32)


def teacher_folds(labels: np.ndarray, seed: int, folds: int = TEACHER_FOLDS) -> Optional[np.ndarray]:
    """(n,) fold index per training image: stratified, shuffled with `seed`; None when a class has
    fewer than 2 images (no fold split leaves it in every fold's training part)."""
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels, dtype=np.int64)
    present = np.unique(labels)
    smallest = int(min((labels == c).sum() for c in present)) if len(present) else 0
    k = min(folds, smallest)
    if k < 2:
        return None
    fold = np.empty(len(labels), dtype=np.int64)
    for index, (_, test) in enumerate(StratifiedKFold(k, shuffle=True, random_state=seed).split(labels, labels)):
        fold[test] = index
    return fold


def oof_teacher(member_features: Sequence[np.ndarray], heads: Sequence[tuple[str, dict]], labels: np.ndarray,
                n_classes: int, fold: np.ndarray, seed: int, weights: Optional[Sequence[float]] = None) -> np.ndarray:
    """The teacher's out-of-fold probabilities: for each fold, each member's head (name, params) fitted
    on the other folds' features, predicting this fold; averaged over the members as the vote averages
    them (`weights`: the vote's member weights; None: equal)."""
    from featurepipe.deploy.predict import head_probabilities
    from featurepipe.heads import make_head

    labels = np.asarray(labels, dtype=np.int64)
    classes = [str(i) for i in range(n_classes)]
    proba = np.zeros((len(labels), n_classes), dtype=np.float64)
    for k in np.unique(fold):
        test, train = fold == k, fold != k
        parts = [head_probabilities(make_head(name, params, seed).fit(X[train], labels[train]), X[test], classes)
                 for X, (name, params) in zip(member_features, heads)]
        proba[test] = np.average(parts, axis=0, weights=weights)
    return proba


def soft_targets(prep, hashes: Sequence[str], labels: np.ndarray, alpha: float, temperature: float,
                 smoothing: float, seed: int) -> Targets:
    """The fine-tuning's training targets for the training images `hashes` (content hashes, in the
    order of `labels`). `prep` is finetune's _Prepared: its vote (or its single head) is the teacher,
    its cache root holds every member's features. Only these images are read or fitted on."""
    from featurepipe.training.finetune_vote import member_features, teacher_members

    n_classes = len(prep.classes)
    labels = np.asarray(labels, dtype=np.int64)
    if alpha == 0:
        return Targets(mix(None, labels, n_classes, 0.0, temperature, smoothing), None, None)
    fold = teacher_folds(labels, seed)
    if fold is None:
        return Targets(mix(None, labels, n_classes, 0.0, temperature, smoothing), None, None,
                       "a class has fewer than 2 training images: no out-of-fold teacher, trained on hard labels")
    members = teacher_members(prep)
    features = [member_features(m, Path(prep.root), list(hashes)) for m in members]
    heads = [(m.meta["head"], m.meta.get("params") or {}) for m in members]
    weights = prep.vote.weights if prep.vote is not None else None
    teacher = oof_teacher(features, heads, labels, n_classes, fold, seed, weights)
    return Targets(mix(teacher, labels, n_classes, alpha, temperature, smoothing), teacher, fold)
