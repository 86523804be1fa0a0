"""Where fine-tuning starts: the evaluated head on the frozen base as one Keras model, checked to
give the head's own probabilities before any training step (never a random head on an unfrozen base).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from featurepipe.core.errors import FeaturepipeError
from featurepipe.core.progress import ProgressCallback, report
from featurepipe.data.augment import AugmentSpec, augment_image, view_rng
from featurepipe.heads.combined import combine
from featurepipe.training.finetune_vote import vote_proba
from featurepipe.training.keras_fit import dtype_policy, predict_proba

# The combined model must give the head's probabilities to float32 accuracy before training.
REPRODUCTION_TOLERANCE = 1e-4


def _refit_head(meta: dict, config: dict, feature_model, images, labels, hashes, paths, classes, batch_size):
    """The run's head config refit on the fine-tuning training images only.

    With a held-out validation set carved from train, the run's head has seen the validation
    images; scoring it there would make "before" optimistic. Refitting the same head (same params,
    seed and augmentation mode) without them keeps before/after honest.
    """
    from featurepipe.evaluation.crossval import FeatureTable, refit

    def features(batch):
        return np.asarray(feature_model.predict(batch, batch_size=batch_size, verbose=0), dtype=np.float32)

    views = None
    if meta.get("augment") == "views":
        augment = AugmentSpec.from_config(config)
        views = np.stack([features(np.stack([augment_image(img, augment.policy, view_rng(h, k, augment.seed))
                                             for img, h in zip(images, hashes)]))
                          for k in range(augment.count)], axis=1)
    table = FeatureTable(X=features(images), y=labels.astype(np.int64), classes=classes, paths=list(paths), views=views)
    # float32 whatever the caller's policy: the dense head caches its Keras trainer across fits.
    with dtype_policy(False):
        return refit(table, meta["head"], meta.get("params") or {}, meta.get("augment", "none"),
                     int(config.get("seed", 0)))


def _check_reproduces(model, feature_model, estimator, images, batch_size) -> float:
    """Max |combined - estimator.predict_proba(features)| on `images`; raises if not ~0."""
    if not len(images):
        return 0.0
    features = np.asarray(feature_model.predict(images, batch_size=batch_size, verbose=0), dtype=np.float32)
    expected = estimator.predict_proba(features)
    actual = np.asarray(model.predict(images, batch_size=batch_size, verbose=0), dtype=np.float64)
    diff = float(np.abs(actual - expected).max())
    if not diff <= REPRODUCTION_TOLERANCE:
        raise FeaturepipeError(
            f"the combined Keras model differs from the head by up to {diff:.2e} before training (tolerance "
            f"{REPRODUCTION_TOLERANCE:g}); refusing to fine-tune from a head that is not the evaluated one")
    return diff


def _start_from_head(prep, feature_model, train: tuple, validation: tuple, progress: Optional[ProgressCallback]):
    """(estimator, head_source, model, max_diff, proba_before): the head fine-tuning starts from (the
    run's, or refit without the validation images when they were carved from train), the combined
    model built from it and checked to reproduce it, and the validation probabilities to beat (the
    vote's when the run's model is a vote). `prep` is finetune's _Prepared."""
    (x_train, y_train, train_rows), (x_val, val_rows) = train, validation
    classes, batch_size = prep.classes, prep.options["batch_size"]
    head_source = "run" if prep.split.source == "validation" else "refit"
    estimator = prep.estimator
    if head_source == "refit":
        report(progress, "finetune", 0, 0, "refitting the head without the validation images")
        estimator = _refit_head(prep.meta, prep.config, feature_model, x_train, y_train, train_rows["hash"],
                                train_rows["path"], classes, batch_size)
    if list(np.asarray(estimator.classes_)) != list(range(len(classes))):
        raise FeaturepipeError("the head was not trained on every class; re-run `featurepipe evaluate`")
    model = combine(feature_model, estimator)
    max_diff = _check_reproduces(model, feature_model, estimator, x_val, batch_size)
    proba_before = predict_proba(model, x_val, batch_size)
    if prep.vote is not None:   # the run's model is the vote: that is what fine-tuning must beat
        proba_before = vote_proba(prep.vote, prep.root, val_rows["hash"].tolist(), len(classes),
                                  (train_rows["hash"].tolist(), y_train) if head_source == "refit" else None,
                                  int(prep.config.get("seed", 0)))
    return estimator, head_source, model, max_diff, proba_before
