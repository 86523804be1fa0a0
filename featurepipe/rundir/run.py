"""The run directory: the one contract between `evaluate` and every later stage.

A run directory is written by `evaluate` (and `run`), then read and extended by finetune, predict,
export, report, inspect and baseline. This module owns it: what makes a folder a run (its marker),
its name, the names of its files, reading its JSON, and its model: the best head (or a soft vote of
one head per feature set, in members/N/) and the fine-tuned network model.json names.
docs/architecture.md lists every file and who writes and reads it.

Heads are saved safely. A scikit-learn head is a joblib file whose sha256 is recorded in
best_head.json when it is written, with an HMAC of (file name, sha256) under this user's key
(featurepipe.core.trust). Loading refuses a file outside the run folder, a file whose hash differs, and a
head the key did not sign (joblib unpickles, so an edited or foreign file could run code) unless
the caller trusts the run. The Keras dense head is saved as .keras, signed the same way, and loaded
with safe_mode=True. A vote's best_head.json signs the list of its members.

`--run-dir` may name a new folder, an empty one, or an earlier run (which is updated in place).
A folder that already holds other files is refused unless the user passes --overwrite: writing a
run there would replace a config.json or leaderboard.csv of theirs and delete a model.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import joblib

from featurepipe.core import atomic, trust
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.core.errors import FeaturepipeError, TrustError
from featurepipe.core.hashcache import file_sha256
from featurepipe.core.cachedirs import cache_root, runs_dir

# ------------------------------------------------------------------------------------------ file names

# The file names are rundir.layout's; imported here too because every stage has always found them here.
from featurepipe.rundir.layout import (  # noqa: F401
    MARKER, CONFIG, LEADERBOARD, FOLDS, OOF, NESTED, NESTED_FOLDS, NESTED_OOF, HOLDOUT,
    HEAD_META, VOTE, MEMBERS_DIR, MODEL_META, HEAD_HISTORY, INSPECT_DIR, FINETUNE_DIR, BASELINE_DIR, REPORT,
)

MODEL_CHOICES = ("auto", "finetuned", "head")


def read_json(path: Path, missing: Optional[str] = None, fix: str = "`featurepipe evaluate`") -> Any:
    """A JSON file of the run. `missing`: the message when it does not exist (else the OSError's);
    a file that cannot be read or parsed names itself and `fix`, the command that writes it again."""
    path = Path(path)
    if missing is not None and not path.exists():
        raise FeaturepipeError(missing)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise FeaturepipeError(f"{path} is damaged or unreadable ({error}); re-run {fix}") from None


# ------------------------------------------------------------------------------------------ the folder


def is_run_dir(path: Path) -> bool:
    """A folder featurepipe made: its marker, or (runs made before the marker) a config.json of ours."""
    path = Path(path)
    if (path / MARKER).is_file():
        return True
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "feature_fingerprints" in config and "backbone" in config


def prepare_run_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Create (or accept) the run folder `path` and mark it as a run; refuse a folder with other
    people's files in it unless `overwrite`."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise FeaturepipeError(f"--run-dir {path} is a file; give a folder for the run")
    if path.is_dir() and not overwrite and not is_run_dir(path) and any(path.iterdir()):
        raise FeaturepipeError(
            f"--run-dir {path} already holds files and is not a featurepipe run; writing a run there would replace "
            f"files such as config.json or leaderboard.csv. Pick a new or empty folder, or pass --overwrite")
    path.mkdir(parents=True, exist_ok=True)
    if not (path / MARKER).is_file():
        atomic.write_json(path / MARKER, {"featurepipe": "run", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return path


def dated_name(source: str | os.PathLike, label: str) -> str:
    """<date-time>-<dataset folder>-<label>, safe as a folder name: how runs (and inspections) are named."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{Path(source).stem}-{label}")
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"


def default_run_dir(root: Path, source: str | os.PathLike, label: str) -> Path:
    """CACHE/runs/<date-time>-<dataset folder>-<label>: where a run goes without --run-dir."""
    return runs_dir(root) / dated_name(source, label)


def new_run_dir(root: Path, source: str | os.PathLike, label: str,
                explicit: Optional[str | os.PathLike] = None) -> Path:
    """The run folder a stage writes: `explicit` (--run-dir) or a new default one, prepared (marked;
    a user's non-run folder refused)."""
    return prepare_run_dir(Path(explicit) if explicit is not None else default_run_dir(root, source, label))


def run_configs(root: Path) -> Iterable[tuple[Path, dict]]:
    """(run dir, config.json) of every readable run under the cache's runs/ folder."""
    for path in sorted(runs_dir(root).glob(f"*/{CONFIG}")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict):
            yield path.parent, data


def fingerprints_used_by_runs(root: Path) -> set[str]:
    """The feature stores the runs under the cache read (config.json's feature_fingerprints)."""
    used: set[str] = set()
    for _, config in run_configs(root):
        used.update(config.get("feature_fingerprints", []))
    return used


# ------------------------------------------------------------------------------------------ heads and models


def save_head(estimator, run_dir: Path, meta: dict) -> Path:
    """Write the head and best_head.json (meta + file name + sha256); returns the head file."""
    from featurepipe.heads.registry import save_format

    run_dir.mkdir(parents=True, exist_ok=True)
    if save_format(estimator) == "keras":     # the estimator's save_keras; its entry's keras_loader reads it
        path = run_dir / "best_head.keras"
        with atomic.atomic_path(path) as tmp:      # keeps the .keras suffix Keras insists on
            estimator.save_keras(tmp)
    else:
        path = run_dir / "best_head.joblib"
        with atomic.atomic_path(path) as tmp:
            joblib.dump(estimator, tmp)
    digest = file_sha256(path)
    _write_history(estimator, run_dir / HEAD_HISTORY)
    atomic.write_json(run_dir / HEAD_META, {**meta, "file": path.name, "sha256": digest, "hmac": trust.sign(path.name, digest)})
    return path


def _members_digest(members: list) -> str:
    return hashlib.sha256(json.dumps(members, sort_keys=True).encode()).hexdigest()


def member_dir(run_dir: Path, index: int) -> Path:
    """Where member `index` of a vote keeps its own head and best_head.json (saved by save_head)."""
    return Path(run_dir) / MEMBERS_DIR / str(index)


def save_vote(run_dir: Path, meta: dict, members: list[dict]) -> None:
    """best_head.json of a soft vote over feature sets: each member's head is saved (signed) in its
    member_dir; this file lists them, and its signature covers the list, so editing which members vote
    (or pointing one elsewhere) is refused like an edited head."""
    members = [{"dir": f"{MEMBERS_DIR}/{i}", **m} for i, m in enumerate(members)]
    atomic.write_json(Path(run_dir) / HEAD_META, {**meta, "head": VOTE, "members": members,
                                           "hmac": trust.sign(VOTE, _members_digest(members))})


def vote_member_dirs(run_dir: Path, meta: dict, trust_run: bool = False) -> list[Path]:
    """The member folders of a vote's best_head.json, after checking its signature and confinement."""
    members = meta.get("members")
    if not isinstance(members, list) or len(members) < 2 or not all(isinstance(m, dict) for m in members):
        raise FeaturepipeError(f"{Path(run_dir) / HEAD_META} describes a vote without a list of members; "
                               f"re-run `featurepipe evaluate`")
    if not trust_run and not trust.signed(VOTE, _members_digest(members), meta.get("hmac")):
        raise TrustError(
            f"{Path(run_dir) / HEAD_META} (a vote over {len(members)} feature sets) was not signed by your featurepipe "
            f"key ({trust.key_path()}): copied from elsewhere or edited. If you trust where this run came from, "
            f"pass --trust (or re-run `featurepipe evaluate`).")
    return [trust.confined(Path(run_dir), f"{m.get('dir')}/{HEAD_META}").parent for m in members]


def _write_history(estimator, path: Path) -> None:
    """The dense head's per-epoch history_ as CSV; any other head has none (an older file goes)."""
    history = getattr(estimator, "history_", None) or {}
    if not history.get("loss"):
        path.unlink(missing_ok=True)
        return
    import pandas as pd

    frame = pd.DataFrame(history)
    frame.insert(0, "epoch", range(1, len(frame) + 1))
    atomic.write_csv(path, frame)


def _copy_history(source_dir: Path, target_dir: Path) -> None:
    """best_head_history.csv follows the head it belongs to (or goes, when that head has none)."""
    if (source_dir / HEAD_HISTORY).is_file():
        atomic.copy_file(source_dir / HEAD_HISTORY, target_dir / HEAD_HISTORY)
    else:
        (target_dir / HEAD_HISTORY).unlink(missing_ok=True)


def load_head_meta(run_dir: Path) -> "HeadMeta":
    path = Path(run_dir) / HEAD_META
    return HeadMeta(read_json(path, f"{run_dir} has no trained head ({HEAD_META} missing); run `featurepipe evaluate` first"))


def load_head(run_dir: Path, trust_run: bool = False):
    """(estimator, meta) for the run's best head, after checking the file is inside the run, is the
    one that was written, and was signed by this user's key (skipped with `trust_run`)."""
    run_dir = Path(run_dir)
    meta = load_head_meta(run_dir)
    if meta.get("head") == VOTE:
        raise FeaturepipeError(f"{run_dir}'s model is a vote over {len(meta.get('members') or [])} feature sets, "
                               f"not one head; open it with featurepipe.rundir.run.open_run (its `members`)")
    path = trust.confined(run_dir, meta.get("file"))
    if not path.exists():
        raise FeaturepipeError(f"{path} is missing; re-run `featurepipe evaluate` to write it again")
    digest = file_sha256(path)
    if digest != meta.get("sha256"):
        raise FeaturepipeError(
            f"{path} does not match the hash recorded in {HEAD_META} when it was written; refusing to load it "
            f"(it may have been edited). Re-run `featurepipe evaluate` to rebuild it."
        )
    if not trust_run and not trust.signed(meta["file"], digest, meta.get("hmac")):
        raise TrustError(
            f"{path} was not signed by your featurepipe key ({trust.key_path()}): the run was copied from another "
            f"user or machine, written by an older featurepipe, or edited. Loading a head can run code it "
            f"contains; if you trust where this run came from, pass --trust (or re-run `featurepipe evaluate`).")
    if path.suffix == ".keras":
        from featurepipe.heads.registry import keras_file_entry, keras_loader

        entry = keras_file_entry(meta.get("head"))
        try:
            return keras_loader(entry)(path, meta["classes"]), meta
        except Exception as error:  # keras raises ValueError/TypeError for refused or unreadable archives
            raise FeaturepipeError(f"cannot load the {entry.name} head {path} with Keras safe_mode "
                                   f"({str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}); "
                                   f"re-run `featurepipe evaluate` to rebuild it") from None
    return joblib.load(path), meta


def cached_head(cache_dir: Path, run_dir: Path, meta: dict) -> Optional[dict]:
    """Copy a head refit earlier on exactly the same inputs into run_dir; None if there is none.

    Copying bytes (after the hash check) instead of loading the model keeps a no-change re-run
    free of TensorFlow start-up when the best head is the Keras one."""
    record_path = cache_dir / HEAD_META
    if not record_path.exists():
        return None
    try:
        record = json.loads(record_path.read_text())
        source = trust.confined(cache_dir, record["file"])
        # Signed too: whatever is copied from here into a run gets signed there.
        if file_sha256(source) != record["sha256"] or not trust.signed(record["file"], record["sha256"],
                                                                      record.get("hmac")):
            return None
    except (OSError, KeyError, TypeError, json.JSONDecodeError, FeaturepipeError):
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic.copy_file(source, run_dir / record["file"])
    _copy_history(cache_dir, run_dir)
    atomic.write_json(run_dir / HEAD_META, {**meta, "file": record["file"], "sha256": record["sha256"],
                                     "hmac": trust.sign(record["file"], record["sha256"])})
    return record


def remember_head(cache_dir: Path, run_dir: Path, extra: dict) -> None:
    """Keep a copy of run_dir's freshly written head for `cached_head`."""
    meta = load_head_meta(run_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic.copy_file(run_dir / meta["file"], cache_dir / meta["file"])
    _copy_history(run_dir, cache_dir)
    atomic.write_json(cache_dir / HEAD_META, {"file": meta["file"], "sha256": meta["sha256"],
                                       "hmac": trust.sign(meta["file"], meta["sha256"]), **extra})


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


# ------------------------------------------------------------------------------------------ typed metadata


class HeadMeta(dict):
    """best_head.json as read: the dict (same JSON fields as ever), with typed accessors."""

    @property
    def head(self) -> str:
        return str(self.get("head"))

    @property
    def is_vote(self) -> bool:
        return self.get("head") == VOTE

    @property
    def params(self) -> dict:
        return dict(self.get("params") or {})

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.get("classes") or []]

    @property
    def features(self) -> Optional[str]:
        return self.get("features")

    @property
    def feature_fingerprint(self) -> Optional[str]:
        return self.get("feature_fingerprint")

    @property
    def members(self) -> list[dict]:
        return list(self.get("members") or [])

    def backbone(self, config: Optional[dict] = None) -> Optional[BackboneSpec]:
        """The backbone the head was trained on (older runs record it in config.json only)."""
        data = self.get("backbone") or (config or {}).get("backbone")
        return BackboneSpec.from_dict(data).resolved() if data else None


class ModelMeta(dict):
    """model.json (fine-tuning's published model) as read, with typed accessors and its check."""
    REQUIRED = frozenset({"file", "sha256", "classes", "image_size", "resize"})

    def check(self, path: Path) -> "ModelMeta":
        missing = self.REQUIRED - set(self)
        if self.get("kind") != "finetuned" or missing:
            raise FeaturepipeError(f"{path} does not describe a fine-tuned model (kind {self.get('kind')!r}, "
                                   f"missing {', '.join(sorted(missing)) or 'nothing'}); re-run fine-tuning")
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


# ------------------------------------------------------------------------------------------ the run


class Run:
    """A run directory. `Run.create` makes (or accepts) one for writing; `Run.open` reads an existing
    one (it must have config.json). Files are named by this module's constants."""

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
            self._config = read_json(self.path / CONFIG, f"{self.path} has no {CONFIG}; pass a run directory "
                                                         f"written by `featurepipe evaluate`")
        return self._config

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
        return ModelMeta(read_json(path, f"{self.path} has no fine-tuned model ({MODEL_META} missing); run "
                                         f"fine-tuning first or predict with the best head", "fine-tuning")).check(path)

    def cache_dir(self, override: Optional[str | os.PathLike] = None) -> Path:
        """The cache root the run's features live in: `override`, else the one config.json records."""
        return cache_root(override if override is not None else self.config.get("cache_dir"))

    # ---- writing
    def write_json(self, name: str, data) -> Path:
        atomic.write_json(self.path / name, data)
        return self.path / name

    def write_csv(self, name: str, frame) -> Path:
        atomic.write_csv(self.path / name, frame)
        return self.path / name

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
        return Run(member_dir(self.path, index), self)

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

    def cache_dir(self, override: Optional[str | os.PathLike] = None) -> Path:
        explicit = override if override is not None else self.config.get("cache_dir")
        return cache_root(explicit)

    def load_head(self):
        """The best head (scikit-learn estimator or dense head), hash-checked before unpickling."""
        estimator, _ = load_head(self.run_dir, trust_run=self.trust)
        return estimator

    def load_finetuned(self):
        """The fine-tuned Keras model (uint8 (n, s, s, 3) -> probabilities), hash-checked, safe_mode."""
        return load_run_model(self.run_dir, self.model_meta)[0]


def open_run(run_dir: str | os.PathLike, model: str = "auto", trust: bool = False) -> RunModel:
    """Read a run directory's model description (see Run.model)."""
    if model not in MODEL_CHOICES:
        raise FeaturepipeError(f"model must be one of {', '.join(MODEL_CHOICES)}, not {model!r}")
    return Run.open(run_dir).model(model, trust)


def _head_model(folder: Path, config: dict, meta: HeadMeta, trust: bool) -> RunModel:
    spec = meta.backbone(config)
    if spec is None:
        raise FeaturepipeError(f"{folder / HEAD_META} does not record the backbone it was trained on; "
                               f"re-run `featurepipe evaluate`")
    return RunModel(folder, "head", meta.classes, int(spec.image_size), str(spec.resize),
                    config, spec=spec, head_meta=meta, trust=trust)
