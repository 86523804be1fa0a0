"""What `predict` takes and gives: the image files a list of inputs names, a head's probabilities laid
out over the run's classes, and the result (one row per file, the columns of `predict --json` and of
its CSV). Shared by deploy.predict (the stage) and deploy.predictor (the load-once model that does the
work), so that neither imports the other's module for it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from featurepipe.core import atomic, csvcells
from featurepipe.core.errors import FeaturepipeError
from featurepipe.data.dataset import walk_images
from featurepipe.core.hashcache import path_key
from featurepipe.data.images import IMAGE_EXTENSIONS
from featurepipe.core.strictjson import json_ready


# ------------------------------------------------------------------------------------------ head output


def head_probabilities(estimator, X: np.ndarray, classes: list[str]) -> np.ndarray:
    """predict_proba laid out over all of the run's classes, in the run's order.

    A head's columns follow its `classes_`: class indices for heads refit by evaluate, class names
    for a dense head loaded from .keras, and only the classes it saw in either case.
    """
    proba = np.asarray(estimator.predict_proba(X), dtype=np.float64)
    seen = getattr(estimator, "classes_", None)
    if seen is None:
        return proba
    index = {name: i for i, name in enumerate(classes)}
    try:
        positions = [index[str(c)] if str(c) in index else int(c) for c in np.asarray(seen).tolist()]
    except (TypeError, ValueError):
        raise FeaturepipeError(f"the head's classes {list(seen)} do not match the run's {classes}; "
                               f"re-run `featurepipe evaluate`") from None
    if positions == list(range(len(classes))):
        return proba
    full = np.zeros((len(X), len(classes)), dtype=np.float64)
    full[:, positions] = proba
    return full


# ------------------------------------------------------------------------------------------ inputs


def collect_inputs(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Files as given plus the image files under each folder (hidden ones skipped), in a stable order."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise FeaturepipeError("no inputs given; pass image files and/or folders of images")
    found: list[str] = []
    for item in inputs:
        path = Path(item).expanduser()
        if not path.exists():
            raise FeaturepipeError(f"{path} does not exist; pass image files and/or folders of images")
        if path.is_dir():
            found.extend(str(image) for image in walk_images(path)[0])
        else:
            # A file named explicitly is tried whatever its extension; a failure becomes its error row.
            found.append(str(path))
    found = list(dict.fromkeys(found))
    if not found:
        names = ", ".join(str(i) for i in inputs)
        raise FeaturepipeError(f"no image files found in {names} (image types: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return found


# ------------------------------------------------------------------------------------------ result


@dataclass
class PredictResult:
    frame: pd.DataFrame              # path, label, probability, label_i/prob_i, p[<class>]..., error
    model_kind: str                  # "finetuned" | "head"
    classes: list[str]
    run_dir: Path
    top_k: int
    reused: int = 0                  # images whose features came from the feature store
    computed: int = 0                # images decoded and run through a model
    failed: int = 0                  # rows with an error
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    # With Predictor.predict(keep_features=True): feature set -> (images that succeeded, d) features
    # in the frame's row order (head and vote models; None for a fine-tuned one, and otherwise).
    features: Optional[dict[str, np.ndarray]] = None

    def records(self) -> list[dict[str, Any]]:
        """One plain dict per row, NaN as None (JSON-ready)."""
        out = []
        for row in self.frame.to_dict("records"):
            out.append({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
        return out

    def to_dict(self) -> dict:
        return {"run_dir": str(self.run_dir), "model_kind": self.model_kind, "classes": self.classes,
                "top_k": self.top_k, "images": len(self.frame), "reused": self.reused, "computed": self.computed,
                "failed": self.failed, "seconds": round(self.seconds, 3), "warnings": self.warnings,
                "predictions": self.records()}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the rows as .csv (default) or the whole result as .json; replaces `path` atomically."""
        path = Path(path).expanduser()
        if path.is_dir():
            raise FeaturepipeError(f"--out {path} is a folder; give a file name such as {path / 'predictions.csv'}")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".json":
            atomic.write_json(path, json_ready(self.to_dict()), sort_keys=False, allow_nan=False)
        else:
            csvcells.write(path, self.frame)
        return path


def _frame(paths: list[str], proba: dict[str, np.ndarray], errors: dict[str, str], classes: list[str],
           top_k: int) -> pd.DataFrame:
    """Built column by column from one (n, classes) array: no per-row dicts, so 5,000 rows cost little."""
    n = len(paths)
    probabilities = np.full((n, len(classes)), np.nan)
    ok = np.zeros(n, dtype=bool)
    for i, path in enumerate(paths):
        p = proba.get(path)
        if p is not None:
            probabilities[i], ok[i] = p, True
    order = np.argsort(-np.where(ok[:, None], probabilities, 0.0), axis=1, kind="stable")
    names = np.asarray(classes, dtype=object)

    def label_at(rank: int) -> list:
        return [names[order[i, rank]] if ok[i] else None for i in range(n)]

    def prob_at(rank: int) -> np.ndarray:
        return np.where(ok, probabilities[np.arange(n), order[:, rank]] if n else 0.0, np.nan)

    # A non-UTF-8 name as \\xNN: CSV and JSON can hold it.
    columns: dict[str, Any] = {"path": [path_key(p) for p in paths], "label": label_at(0), "probability": prob_at(0)}
    for i in range(top_k):
        columns[f"label_{i + 1}"], columns[f"prob_{i + 1}"] = label_at(i), prob_at(i)
    for j, c in enumerate(classes):
        columns[f"p[{c}]"] = probabilities[:, j]
    columns["error"] = [None if ok[i] else errors.get(path, "no prediction") for i, path in enumerate(paths)]
    return pd.DataFrame(columns)
