"""A run's model loaded once and kept, for callers that predict again and again (`featurepipe serve`).

`deploy.predict.predict` opens the run, unpickles the head and builds the backbone on every call:
right for one command, far too slow per request of a server. `Predictor` does that work once and
keeps the networks; each `.predict` then only decodes and runs them. The rows are the same as
`predict`'s (the same `_frame`, the same head_probabilities, the vote's plain average), and with
`keep_features` it hands back the features it computed, which a caller can compare with a run's
cached training features (serve's similar photos).

Unlike `predict`, it does not look uploads up in the feature store, nor record their hashes in the
cache's hash database: the files it is given are usually temporary, and every image is run through
the network (the same features the store would hold, to float32 rounding).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from featurepipe.backbones.accel import default_decode_threads
from featurepipe.core.errors import FeaturepipeError
from featurepipe.core.progress import ProgressCallback, report
from featurepipe.data.images import decode_batches
from featurepipe.deploy.predict import PredictResult, _frame, collect_inputs, head_probabilities
from featurepipe.rundir.layout import NESTED
from featurepipe.rundir.run import open_run

BATCH_SIZE = 32


@dataclass
class PredictorResult(PredictResult):
    """predict's result plus, with keep_features, feature-set name -> (n_ok, d) features of the
    images that succeeded, in the frame's order (None for a fine-tuned model)."""
    features: Optional[dict[str, np.ndarray]] = None


@dataclass
class _Member:
    name: str                 # the feature set's name, as best_head.json and config.json's search name it
    image_size: int
    resize: str
    estimator: object
    network: object           # uint8 (n, s, s, 3) -> float32 (n, d)


class Predictor:
    """`Predictor(run_dir, cache_dir=None, model=None, trust=False, progress=None)`: the run's model
    (the fine-tuned network, the best head or a vote of heads; `model` as predict's --model, None
    for auto), its heads unpickled and its networks built here, once."""

    def __init__(self, run_dir: str | os.PathLike, cache_dir: Optional[str | os.PathLike] = None,
                 model: Optional[str] = None, trust: bool = False, progress: Optional[ProgressCallback] = None):
        from featurepipe.backbones.build import build_feature_model, inference_function

        self._run = run = open_run(run_dir, model or "auto", trust)
        self.run_dir = run.run_dir
        self.classes: list[str] = list(run.classes)
        self.model_kind = run.kind
        self.nested_accuracy: Optional[dict] = _nested_accuracy(Path(run.run_dir))
        self._finetuned = None
        self._members: list[_Member] = []
        if run.kind == "finetuned":
            report(progress, "load", 0, 1, "fine-tuned model")
            self._finetuned = inference_function(run.load_finetuned(), run.image_size)
            report(progress, "load", 1, 1, "")
            return
        root = run.cache_dir(cache_dir)
        heads = run.members or [run]
        for index, head in enumerate(heads):
            name = str((head.head_meta or {}).get("features") or head.spec.name)
            report(progress, "load", index, len(heads), f"building {name}")
            network = inference_function(build_feature_model(head.spec, root), head.image_size)
            self._members.append(_Member(name, head.image_size, head.resize, head.load_head(), network))
        report(progress, "load", len(heads), len(heads), "")

    @property
    def feature_sets(self) -> list[str]:
        """The feature sets the model reads ([] for a fine-tuned model)."""
        return [m.name for m in self._members]

    def predict(self, paths: Sequence[str | os.PathLike], top_k: int = 3, keep_features: bool = False) -> PredictorResult:
        """Rows as `deploy.predict.predict` writes them; a file that cannot be decoded gets its error row."""
        started = time.perf_counter()
        if int(top_k) < 1:
            raise FeaturepipeError(f"top_k must be at least 1, not {top_k}")
        paths = collect_inputs(paths)
        top_k = min(int(top_k), len(self.classes))
        errors: dict[str, str] = {}
        proba: dict[str, np.ndarray] = {}
        features: dict[str, dict[str, np.ndarray]] = {m.name: {} for m in self._members}
        if self._finetuned is not None:
            for batch_paths, images in decode_batches(paths, self._run.image_size, self._run.resize, BATCH_SIZE,
                                                      errors, default_decode_threads()):
                out = np.asarray(self._finetuned(images), dtype=np.float64)
                out /= out.sum(axis=1, keepdims=True)   # float32 softmax rows sum to 1 only to ~1e-7
                proba.update(zip(batch_paths, out))
        else:
            parts = self._run_members(paths, errors, features if keep_features else None)
            for path in paths:
                if path not in errors and all(path in own for own in parts):
                    proba[path] = np.mean([own[path] for own in parts], axis=0)
        frame = _frame(paths, proba, errors, self.classes, top_k)
        result = PredictorResult(frame, self.model_kind, self.classes, Path(self.run_dir), top_k)
        result.computed = len(proba)
        result.failed = int(frame["error"].notna().sum())
        if keep_features and self._finetuned is None:
            ok = [p for p in paths if p in proba]
            result.features = {name: np.stack([rows[p] for p in ok]) if ok else np.zeros((0, 0), np.float32)
                               for name, rows in features.items()}
        result.seconds = time.perf_counter() - started
        return result

    def _run_members(self, paths: list[str], errors: dict[str, str],
                     features: Optional[dict[str, dict[str, np.ndarray]]]) -> list[dict[str, np.ndarray]]:
        """Each member's probabilities per path; images are decoded once per (size, resize) the members share."""
        parts: list[dict[str, np.ndarray]] = [{} for _ in self._members]
        groups: dict[tuple[int, str], list[int]] = {}
        for index, member in enumerate(self._members):
            groups.setdefault((member.image_size, member.resize), []).append(index)
        for (size, resize), indices in groups.items():
            for batch_paths, images in decode_batches(paths, size, resize, BATCH_SIZE, errors,
                                                      default_decode_threads()):
                for index in indices:
                    member = self._members[index]
                    X = np.asarray(member.network(images), dtype=np.float32)
                    parts[index].update(zip(batch_paths, head_probabilities(member.estimator, X, self.classes)))
                    if features is not None:
                        features[member.name].update(zip(batch_paths, X))
        return parts


def _nested_accuracy(run_dir: Path) -> Optional[dict]:
    """nested.json's accuracy ({mean, std, ci_low, ci_high}), or None (run without nested CV)."""
    try:
        accuracy = json.loads((run_dir / NESTED).read_text()).get("accuracy")
    except (OSError, ValueError, AttributeError):
        return None
    return accuracy if isinstance(accuracy, dict) and "mean" in accuracy else None


__all__ = ["Predictor", "PredictorResult"]
