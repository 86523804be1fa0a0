"""The run directory: the one contract between `evaluate` and every later stage.

A run directory is written by `evaluate` (and `run`), then read and extended by finetune, predict,
export, report, inspect and baseline. `Run` is its handle: creating or opening one, its config, and
its model: the best head (or a soft vote of one head per feature set, in members/N/) and the
fine-tuned network model.json names. The pieces: rundir.layout names every file,
rundir.folder makes and names the folder, rundir.heads_io saves and loads heads (signed),
rundir.model describes what the run predicts with.
docs/architecture.md lists every file and who writes and reads it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from featurepipe.core import atomic, csvcells, trust
from featurepipe.core.cachedirs import cache_root
from featurepipe.core.errors import FeaturepipeError
from featurepipe.rundir.folder import new_run_dir, prepare_run_dir, read_json, run_cache_root
from featurepipe.rundir.heads_io import (
    HeadMeta, check_meta_signature, is_signed_record, load_head, load_head_meta, member_dir, save_head, save_vote,
    signed_before_records, vote_member_dirs,
)
from featurepipe.rundir.model import MODEL_CHOICES, ModelMeta, RunModel, _head_model, load_run_model

# The file names are rundir.layout's; imported here too because every stage has always found them here.
from featurepipe.rundir.layout import (  # noqa: F401
    MARKER, CONFIG, LEADERBOARD, FOLDS, OOF, NESTED, NESTED_FOLDS, NESTED_OOF, HOLDOUT,
    HEAD_META, VOTE, MEMBERS_DIR, MODEL_META, HEAD_HISTORY, INSPECT_DIR, FINETUNE_DIR, BASELINE_DIR, REPORT,
)


class Run:
    """A run directory. `Run.create` makes (or accepts) one for writing; `Run.open` reads an existing
    one (it must have config.json). Files are named by rundir.layout's constants."""

    def __init__(self, path: str | os.PathLike, parent: Optional["Run"] = None):
        self.path = Path(path).expanduser()
        self.parent = parent            # a vote member's run: config.json is the parent's
        self._config: Optional[dict] = None

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @classmethod
    def create(cls, path: str | os.PathLike, overwrite: bool = False) -> "Run":
        return cls(prepare_run_dir(path, overwrite))

    @classmethod
    def new(cls, root: Path, source: str | os.PathLike, label: str,
            explicit: Optional[str | os.PathLike] = None) -> "Run":
        """The run a stage writes: --run-dir when given, else CACHE/runs/<date-time>-<dataset>-<label>."""
        return cls(new_run_dir(root, source, label, explicit))

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Run":
        path = Path(path).expanduser()
        if not path.is_dir():
            raise FeaturepipeError(f"run directory {path} does not exist; `featurepipe evaluate` and "
                                   f"`featurepipe run` print the run directory they wrote")
        if not (path / CONFIG).exists():
            raise FeaturepipeError(f"{path} is not a featurepipe run directory (no config.json); point at a "
                                   f"directory written by `featurepipe evaluate` or `featurepipe run`")
        return cls(path)

    def file(self, name: str) -> Path:
        return self.path / name

    # ---- metadata
    @property
    def config(self) -> dict:
        if self.parent is not None:
            return self.parent.config
        if self._config is None:
            config = read_json(self.path / CONFIG, f"{self.path} has no {CONFIG}; pass a run directory "
                                                   f"written by `featurepipe evaluate`")
            if not isinstance(config, dict):
                raise FeaturepipeError(f"{self.path / CONFIG} is not a JSON object (it holds a "
                                       f"{type(config).__name__}); it was damaged or edited: re-run `featurepipe evaluate`")
            self._config = config
        return self._config

    def check_signatures(self, trust_run: bool = False, names: tuple[str, ...] = (CONFIG, MODEL_META)) -> None:
        """Refuse a config.json (which cache, backbone, augmentation) or model.json (the fine-tuned
        model's classes, size, resize) that this user's key did not sign as they read now.

        Runs written before these files were signed are taken as they are when their best_head.json
        carries this user's signature of that time (`signed_before_records`); otherwise an unsigned
        file is refused like an unsigned head, since a signature could have been stripped (a model.json
        predicts without its head being loaded, so the head's own check would never run)."""
        if trust_run or self.parent is not None:
            return
        if not self.has_head() and not self.has_model():
            return              # nothing to load; the caller says what is missing
        head = self.head_meta if self.has_head() else None
        old_own_run = head is not None and signed_before_records(head)
        for name, what, fix in (
                (CONFIG, "which cache, backbone and augmentation the run uses", "re-run `featurepipe evaluate`"),
                (MODEL_META, "the fine-tuned model's classes, size and resize",
                 f"re-run `featurepipe finetune`, or delete {self.path / MODEL_META} to predict with the best head")):
            path = self.path / name
            if name not in names or not path.exists():
                continue
            data = self.config if name == CONFIG else self.model_meta
            if is_signed_record(data) or not old_own_run:
                check_meta_signature(path, data, trust_run, what, fix)

    def has_head(self) -> bool:
        return (self.path / HEAD_META).exists()

    def has_model(self) -> bool:
        return (self.path / MODEL_META).exists()

    @property
    def head_meta(self) -> HeadMeta:
        return load_head_meta(self.path)

    @property
    def model_meta(self) -> ModelMeta:
        path = self.path / MODEL_META
        data = read_json(path, f"{self.path} has no fine-tuned model ({MODEL_META} missing); run fine-tuning first "
                               f"or predict with the best head", "fine-tuning")
        if not isinstance(data, dict):
            raise FeaturepipeError(f"{path} is not a JSON object (it holds a {type(data).__name__}); re-run fine-tuning "
                                   f"or delete it to predict with the best head")
        return ModelMeta(data).check(path)

    def cache_dir(self, override: Optional[str | os.PathLike] = None) -> Path:
        """The cache root the run's features live in: `override`, else the one config.json records, or
        the cache the run now lives in when it was moved with it (rundir.folder.run_cache_root)."""
        return cache_root(run_cache_root(self.path, self.config.get("cache_dir"), override)[0])

    # ---- writing
    def write_json(self, name: str, data) -> Path:
        """A JSON file of the run; config.json is signed (it names the cache and backbone)."""
        path = trust.writable(self.path, name)
        if name == CONFIG and isinstance(data, dict):
            data = trust.with_record_signature(CONFIG, data)
            self._config = None
        atomic.write_json(path, data)
        return path

    def write_csv(self, name: str, frame) -> Path:
        path = trust.writable(self.path, name)
        csvcells.write(path, frame)   # user text (paths, labels) safe in a spreadsheet
        return path

    def remove(self, *names: str) -> None:
        for name in names:
            (self.path / name).unlink(missing_ok=True)

    def clear_model(self) -> None:
        """A fine-tuned model grew from the previous best head: when the head changes it no longer belongs."""
        self.remove(MODEL_META)

    def clear_members(self) -> None:
        """An earlier vote's member heads (or nothing)."""
        shutil.rmtree(self.path / MEMBERS_DIR, ignore_errors=True)

    def member(self, index: int) -> "Run":
        """Member `index` of a vote: a folder with its own best_head.json (the parent's config)."""
        relative = member_dir(self.path, index).relative_to(self.path)
        return Run(trust.writable(self.path, str(relative), folder=True), self)

    def save_head(self, estimator, meta: dict) -> Path:
        return save_head(estimator, self.path, meta)

    def save_vote(self, meta: dict, members: list[dict]) -> None:
        save_vote(self.path, meta, members)

    # ---- loading
    def members(self, trust_run: bool = False) -> list["Run"]:
        """A vote's members (signature and confinement checked); [] when the model is one head."""
        meta = self.head_meta
        if not meta.is_vote:
            return []
        return [Run(folder, self) for folder in vote_member_dirs(self.path, meta, trust_run)]

    def load_head(self, trust_run: bool = False):
        """(estimator, meta) of the best head, hash- and signature-checked before unpickling."""
        return load_head(self.path, trust_run)

    def load_model(self, meta: Optional[dict] = None):
        """(Keras model, model.json) of the fine-tuned model, hash-checked, safe_mode."""
        return load_run_model(self.path, meta)

    def model(self, model: str = "auto", trust: bool = False) -> "RunModel":
        """What the run predicts with. `model`: "auto" (fine-tuned if present), "finetuned", "head";
        `trust`: accept a head that this user's key did not sign (a run copied from elsewhere)."""
        if model not in MODEL_CHOICES:
            raise FeaturepipeError(f"model must be one of {', '.join(MODEL_CHOICES)}, not {model!r}")
        config = self.config
        self.check_signatures(trust)
        if model == "finetuned" and not self.has_model():
            raise FeaturepipeError(f"{self.path} has no fine-tuned model ({MODEL_META} missing); run fine-tuning "
                                   f"first or predict with the best head")
        if self.has_model() and model != "head":
            meta = self.model_meta
            return RunModel(self.path, "finetuned", meta.classes, meta.image_size, meta.resize, config,
                            model_meta=meta, trust=trust)
        if not self.has_head():
            raise FeaturepipeError(f"{self.path} has no trained head ({HEAD_META} missing) and no fine-tuned model; "
                                   f"run `featurepipe evaluate` (or `featurepipe run`) to train one")
        meta = self.head_meta
        if meta.is_vote:
            members = [_head_model(m.path, config, m.head_meta, trust) for m in self.members(trust)]
            if any(m.classes != meta.classes for m in members):
                raise FeaturepipeError(f"the members of {self.path / HEAD_META} disagree on the classes; "
                                       f"re-run `featurepipe evaluate`")
            first = members[0]
            return RunModel(self.path, "head", first.classes, first.image_size, first.resize, config, spec=None,
                            head_meta=meta, trust=trust, members=members)
        return _head_model(self.path, config, meta, trust)


def open_run(run_dir: str | os.PathLike, model: str = "auto", trust: bool = False) -> RunModel:
    """Read a run directory's model description (see Run.model)."""
    if model not in MODEL_CHOICES:
        raise FeaturepipeError(f"model must be one of {', '.join(MODEL_CHOICES)}, not {model!r}")
    return Run.open(run_dir).model(model, trust)
