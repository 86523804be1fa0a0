"""Classifier heads trained on cached features: a registry (featurepipe.heads.registry) and the
built-in heads, one module per family, each registering its heads beside their builders.

    linear      logreg, linear_svm (and the feature fronts in front of them)
    neighbours  knn, ncm
    ensemble    ensemble (a soft vote of other heads)
    dense       dense (Keras; TensorFlow is imported only when one is fitted or loaded)

Adding a head is one module in this folder with one `@register_head(...)` on its builder (see the
registry's docstring): every module here that is not the registry's machinery is imported below, the
four families first (the order in which heads are listed), then any other in name order. A head of
your own, outside featurepipe, is registered the same way from your module. Converting fitted heads to Keras lives in featurepipe.heads.to_keras, which the
registry names but never imports, so `import featurepipe.heads` stays free of TensorFlow.

The estimator classes are re-exported here: pickled heads name them `featurepipe.heads.<Class>`.
"""

import pkgutil
from importlib import import_module

from featurepipe.heads.registry import (
    HEADS,
    HeadEntry,
    default_heads,
    entry_for_estimator,
    expensive_heads,
    head_entry,
    head_names,
    make_head,
    param_grid,
    register_head,
    registered_head,
    revisions,
    unregister_head,
)
from featurepipe.heads.linear import FRONTS, SQRT_EPS, CalibrationFolds, SignedSqrt, signed_sqrt
from featurepipe.heads.neighbours import KNN_MIN_DISTANCE, CosineKNN, NearestClassMean
from featurepipe.heads.ensemble import SoftVoteClassifier
from featurepipe.heads.dense import DenseHeadClassifier

# Modules of this folder that hold no heads: the registry's machinery and the Keras side.
_MACHINERY = {"registry", "to_keras", "combined", "linear", "neighbours", "ensemble", "dense"}
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _MACHINERY):
    import_module(f"{__name__}.{_module}")

__all__ = [
    "HEADS", "HeadEntry", "default_heads", "entry_for_estimator", "expensive_heads", "head_entry", "head_names",
    "make_head", "param_grid", "register_head", "registered_head", "revisions", "unregister_head",
    "FRONTS", "SQRT_EPS", "CalibrationFolds", "SignedSqrt", "signed_sqrt",
    "KNN_MIN_DISTANCE", "CosineKNN", "NearestClassMean", "SoftVoteClassifier", "DenseHeadClassifier",
]
