"""What makes a fine-tuning resumable and reusable: its key (finetune_key), the files of RUN_DIR/finetune/
read back (state.json for --resume, summary.json of a finished one), and publishing the run's model.json.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from featurepipe.backbones.spec import BackboneSpec
from featurepipe.core.atomic import write_json
from featurepipe.core.trust import with_record_signature
from featurepipe.core.hashcache import file_sha256
from featurepipe.rundir.layout import FINETUNE_DIR, FINETUNED_MODEL, MODEL_META, STATE, SUMMARY
from featurepipe.training.finetune_options import FinetuneReport
from featurepipe.training.finetune_vote import Vote
from featurepipe.training.split import ImageSplit

# Bump when a change here changes what a fine-tuning produces: finished runs are then not reused.
FINETUNE_FORMAT = 4       # 4: soft targets (the vote's out-of-fold probabilities, training.distill), categorical loss


def _read_optional_json(path: Path) -> Optional[dict]:
    """A JSON file written by this module, or None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _clear(directory: Path, names: Sequence[str]) -> None:
    for name in names:
        target = directory / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()



def finetune_key(head_meta: dict, config: dict, split: ImageSplit, options: dict, spec: BackboneSpec,
                 root: Path) -> str:
    """Everything that changes what a fine-tuning produces: the run's best head (its file's sha256
    and what it was fit with), the images and labels (content hashes, per split), the options and
    seed, the backbone (fingerprint: spec, weights, preprocessing, library versions), this module's
    format and numpy's version. Paths are left out: moving a folder changes nothing."""
    from featurepipe.backbones.fingerprint import backbone_fingerprint, package_version
    from featurepipe.backbones.spec import hash_payload

    def rows(frame):
        return sorted([str(h), str(label)] for h, label in zip(frame["hash"], frame["label"]))

    version = package_version("featurepipe")
    payload = {
        "format": FINETUNE_FORMAT,
        "head": {k: head_meta.get(k) for k in ("head", "params", "augment", "tta", "classes", "sha256",
                                                "feature_fingerprint")},
        "head_fit": {k: config.get(k) for k in ("seed", "augment", "augment_seed", "augment_policy")},
        "split": {"source": split.source, "seed": split.seed, "fraction": split.fraction,
                  "train": rows(split.train), "validation": rows(split.validation), "test": rows(split.test)},
        "options": options, "backbone": backbone_fingerprint(spec, root)[0],
        "versions": {"numpy": np.__version__, "featurepipe": version},
    }
    return hash_payload(payload)


def _publish(run_dir: Path, summary: dict) -> None:
    """model.json names the fine-tuned model only when it is kept; else the frozen head is the model."""
    meta_path = run_dir / MODEL_META
    if summary.get("kept") == "finetuned":
        # Signed as a whole: its classes, image size and resize give the model's outputs their meaning.
        write_json(meta_path, with_record_signature(MODEL_META, summary["model_json"]))
    else:
        current = _read_optional_json(meta_path)
        if meta_path.exists() and (current is None or current.get("kind") == "finetuned"):
            meta_path.unlink()


def _reusable(run_dir: Path, key: str) -> Optional[FinetuneReport]:
    """The finished fine-tuning with the same key, when its files are intact; republishes model.json
    (evaluate removes it when it rewrites the run)."""
    out = run_dir / FINETUNE_DIR
    summary = _read_optional_json(out / SUMMARY)
    state = _read_optional_json(out / STATE)
    if not summary or not state or summary.get("key") != key or state.get("status") != "done":
        return None
    model_path = out / FINETUNED_MODEL
    if not model_path.is_file() or file_sha256(model_path) != summary.get("sha256"):
        return None
    _publish(run_dir, summary)
    data = dict(summary["report"])
    data.update(run_dir=run_dir, model_path=model_path, seconds=0.0, reused=True, resumed_from_epoch=None)
    fields = FinetuneReport.__dataclass_fields__
    return FinetuneReport(**{k: v for k, v in data.items() if k in fields})


@dataclass
class _Prepared:
    """What a fine-tuning starts from: the run's head and config, the image split, the options and
    key, and state.json's content (written before training so --resume can continue)."""

    run_dir: Path
    config: dict
    estimator: Any                   # the run's best head
    meta: dict                       # best_head.json
    classes: list[str]
    spec: BackboneSpec               # resolved
    root: Path                       # the cache root
    split: ImageSplit
    options: dict
    key: str
    state: dict
    resuming: bool
    notes: list[str]
    vote: Optional[Vote] = None      # the run's model is a vote: fine-tuning starts from one member
    # One outer fold of --finetune-folds trains in its own folder (training.finetune_folds) and publishes nothing.
    out_dir: Optional[Path] = None
    # --finetune-folds' pooled comparison (training.finetune_folds.pooled): it, not the held-out split, decides.
    evidence: Optional[dict] = None

    @property
    def frozen_name(self) -> str:
        """What the student is judged against, as the reasons name it."""
        return "the vote" if self.vote is not None else "the frozen head"

    @property
    def out(self) -> Path:
        return self.out_dir if self.out_dir is not None else self.run_dir / FINETUNE_DIR

    @property
    def state_path(self) -> Path:
        return self.out / STATE
