"""Stage `predict`: a run's model applied to image files and folders, one row of probabilities per file.

The model is the run's fine-tuned network when RUN_DIR/model.json names one, else the frozen
backbone plus the best head (or the vote of one head per feature set). Either way the preprocessing
(image size, resize policy, the backbone's pixel scaling) is read from the run, never re-specified,
so predictions use exactly what training used. This module holds the inputs, the result and its
layout; deploy.predictor does the work (images whose content is already in a feature store are not
decoded at all; a network is built only when some image is missing from its stores, and once).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from featurepipe.core.errors import FeaturepipeError
from featurepipe.core.progress import ProgressCallback
# The inputs, the result and its layout live in deploy.results; imported here under the names
# callers have always used (featurepipe.deploy.predict.PredictResult, collect_inputs, ...).
from featurepipe.deploy.results import PredictResult, _frame, collect_inputs, head_probabilities  # noqa: F401


# ------------------------------------------------------------------------------------------ predict


def predict(
    run_dir: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    top_k: int = 3,
    cache_dir: Optional[str | os.PathLike] = None,
    batch_size: int = 32,
    progress: Optional[ProgressCallback] = None,
    model: str = "auto",
    trust: bool = False,
) -> PredictResult:
    """Class probabilities for every image file in `inputs` (files and/or folders): one call of a
    fresh deploy.predictor.Predictor (which a server keeps instead, to load and build things once).

    `cache_dir` overrides the cache root recorded in the run (where features and hashes live).
    A file that cannot be read or decoded gets a row whose `error` says why; it never stops the run.
    """
    from featurepipe.deploy.predictor import Predictor

    if int(top_k) < 1:
        raise FeaturepipeError(f"top_k must be at least 1, not {top_k}")
    predictor = Predictor(run_dir, cache_dir=cache_dir, model=model, trust=trust, progress=progress,
                          batch_size=batch_size)
    return predictor.predict(inputs, top_k=top_k)
