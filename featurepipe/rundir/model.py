"""What a run predicts with: the fine-tuned model model.json names (ModelMeta, load_run_model), or
the best head (or vote of heads), described by RunModel without loading anything heavy yet."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from featurepipe.backbones.spec import BackboneSpec
from featurepipe.core import trust
from featurepipe.core.cachedirs import cache_root
from featurepipe.core.errors import FeaturepipeError
from featurepipe.core.hashcache import file_sha256
from featurepipe.rundir.folder import read_json, run_cache_root
from featurepipe.rundir.heads_io import HeadMeta, load_head
from featurepipe.rundir.layout import HEAD_META, MODEL_META

MODEL_CHOICES = ("auto", "finetuned", "head")


def load_run_model(run_dir: Path, meta: Optional[dict] = None):
    """(Keras model, model.json) for a run's fine-tuned model: hash-checked, then loaded with safe_mode."""
    import keras

    # Registers the custom layers a fine-tuned file names (Preprocess, InferenceMode, PlattOneVsRest).
    import featurepipe.heads.to_keras  # noqa: F401

    run_dir = Path(run_dir)
    if meta is None:
        meta = read_json(run_dir / MODEL_META, f"{run_dir} has no {MODEL_META}; run `featurepipe finetune` first",
                         "fine-tuning")
    path = trust.confined(run_dir, meta.get("file"))
    if not path.exists():
        raise FeaturepipeError(f"{path} is missing although {MODEL_META} names it; re-run fine-tuning, "
                               f"or delete {run_dir / MODEL_META} to predict with the best head")
    if file_sha256(path) != meta.get("sha256"):
        raise FeaturepipeError(
            f"{path} does not match the hash (sha256) recorded in {MODEL_META} when it was written; refusing to "
            f"load it (it may have been edited). Re-run fine-tuning to rebuild it.")
    try:
        return keras.saving.load_model(str(path), safe_mode=True, compile=False), meta
    except Exception as error:  # keras raises plain ValueError/TypeError for unreadable archives
        raise FeaturepipeError(f"cannot load the fine-tuned model {path}: {error}") from None


class ModelMeta(dict):
    """model.json (fine-tuning's published model) as read, with typed accessors and its check."""
    REQUIRED = frozenset({"file", "sha256", "classes", "image_size", "resize"})

    def check(self, path: Path) -> "ModelMeta":
        missing = self.REQUIRED - set(self)
        if self.get("kind") != "finetuned" or missing:
            raise FeaturepipeError(f"{path} does not describe a fine-tuned model (kind {self.get('kind')!r}, "
                                   f"missing {', '.join(sorted(missing)) or 'nothing'}); re-run fine-tuning")
        classes = self["classes"]
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise FeaturepipeError(f"{path}: `classes` must be a list of class names, not {classes!r}; the file was "
                                   f"edited or damaged: re-run fine-tuning")
        return self

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self["classes"]]

    @property
    def image_size(self) -> int:
        return int(self["image_size"])

    @property
    def resize(self) -> str:
        return str(self["resize"])


@dataclass
class RunModel:
    """What a run predicts with, as recorded in its directory (nothing heavy is loaded yet)."""
    run_dir: Path
    kind: str                        # "finetuned" | "head"
    classes: list[str]
    image_size: int
    resize: str
    config: dict
    spec: Optional[BackboneSpec] = None        # the backbone the head was trained on ("head" only)
    head_meta: Optional[dict] = None
    model_meta: Optional[dict] = None          # model.json ("finetuned" only)
    trust: bool = False                        # load a head this user's key did not sign (--trust)
    members: list["RunModel"] = field(default_factory=list)   # a vote: one head per feature set, averaged

    @property
    def is_vote(self) -> bool:
        return bool(self.members)

    @property
    def weights(self) -> list[float]:
        """A vote's member weights (equal unless its selection recorded others); [] for one head."""
        return self.head_meta.weights(self.run_dir / HEAD_META) if self.is_vote else []

    def cache_dir(self, override: Optional[str | os.PathLike] = None) -> Path:
        # The recorded cache, or the one the run was moved into with it (rundir.folder.run_cache_root).
        return cache_root(run_cache_root(self.run_dir, self.config.get("cache_dir"), override)[0])

    def load_head(self):
        """The best head (scikit-learn estimator or dense head), hash-checked before unpickling."""
        estimator, _ = load_head(self.run_dir, trust_run=self.trust)
        return estimator

    def load_finetuned(self):
        """The fine-tuned Keras model (uint8 (n, s, s, 3) -> probabilities), hash-checked, safe_mode."""
        return load_run_model(self.run_dir, self.model_meta)[0]


def _head_model(folder: Path, config: dict, meta: HeadMeta, trust: bool) -> RunModel:
    spec = meta.backbone(config)
    if spec is None:
        raise FeaturepipeError(f"{folder / HEAD_META} does not record the backbone it was trained on; "
                               f"re-run `featurepipe evaluate`")
    return RunModel(folder, "head", meta.classes, int(spec.image_size), str(spec.resize),
                    config, spec=spec, head_meta=meta, trust=trust)


def vote_weights(run: RunModel) -> Optional[list[float]]:
    """The members' weights in the vote (RunModel.weights: best_head.json's members' `weight`, checked
    there to be positive and sum to 1); None when they count equally (the default)."""
    weights = list(run.weights)
    return None if max(weights) - min(weights) < 1e-12 else weights
