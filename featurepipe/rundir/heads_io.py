"""The run's head, saved safely: the best head (or a soft vote of one head per feature set, in
members/N/), best_head.json describing it, and the copy a no-change re-run takes from the cache.

A scikit-learn head is a joblib file whose sha256 is recorded in best_head.json when it is written,
with an HMAC of (file name, sha256) under this user's key (featurepipe.core.trust). Loading refuses a
file outside the run folder, a file whose hash differs, and a head the key did not sign (joblib
unpickles, so an edited or foreign file could run code) unless the caller trusts the run. The Keras
dense head is saved as .keras, signed the same way, and loaded with safe_mode=True. A vote's
best_head.json signs the list of its members.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import joblib

from featurepipe.backbones.spec import BackboneSpec
from featurepipe.core import atomic, trust
from featurepipe.core.errors import FeaturepipeError, TrustError
from featurepipe.core.hashcache import file_sha256
from featurepipe.rundir.folder import read_json
from featurepipe.rundir.layout import HEAD_HISTORY, HEAD_JOBLIB, HEAD_KERAS, HEAD_META, MEMBERS_DIR, VOTE


def save_head(estimator, run_dir: Path, meta: dict) -> Path:
    """Write the head and best_head.json (meta + file name + sha256); returns the head file."""
    from featurepipe.heads.registry import save_format

    run_dir.mkdir(parents=True, exist_ok=True)
    if save_format(estimator) == "keras":     # the estimator's save_keras; its entry's keras_loader reads it
        path = run_dir / HEAD_KERAS
        with atomic.atomic_path(path) as tmp:      # keeps the .keras suffix Keras insists on
            estimator.save_keras(tmp)
    else:
        path = run_dir / HEAD_JOBLIB
        with atomic.atomic_path(path) as tmp:
            joblib.dump(estimator, tmp)
    digest = file_sha256(path)
    _write_history(estimator, run_dir / HEAD_HISTORY)
    _write_meta(run_dir, {**meta, "file": path.name, "sha256": digest})
    return path


def _write_meta(run_dir: Path, meta: dict) -> None:
    """best_head.json, signed as a whole: the head file's name and hash, and what gives its outputs
    their meaning (classes, backbone and resize, features, params, a vote's members)."""
    atomic.write_json(trust.writable(run_dir, HEAD_META), trust.with_record_signature(HEAD_META, meta))


def is_signed_record(meta: dict) -> bool:
    """Written by a featurepipe that signs the whole JSON (not only the head file's hash)."""
    return isinstance(meta, dict) and meta.get(trust.SIGNATURE) == trust.RECORD_V2


def signed_before_records(meta: dict) -> bool:
    """A best_head.json written before whole records were signed, with a valid signature of this
    user's key (over the head file's name and hash, or a vote's member list)."""
    if not isinstance(meta, dict) or is_signed_record(meta):
        return False
    if meta.get("head") == VOTE:
        members = meta.get("members")
        return isinstance(members, list) and trust.signed(VOTE, _members_digest(members), meta.get("hmac"))
    return isinstance(meta.get("file"), str) and trust.signed(meta["file"], str(meta.get("sha256")), meta.get("hmac"))


def check_meta_signature(path: Path, meta: dict, trust_run: bool, what: str,
                         fix: str = "re-run `featurepipe evaluate`") -> None:
    """Refuse a JSON record whose signature does not cover what it says now (an edited class name,
    backbone, cache, member list...), unless the user trusts the run. `what`: how to name it; `fix`:
    the command that writes it again."""
    if trust_run or trust.signed_record(path.name, meta, meta.get("hmac")):
        return
    raise TrustError(
        f"{path} ({what}) was not signed by your featurepipe key ({trust.key_path()}) as it reads now: the run was "
        f"copied from another user or machine, or the file was edited (its classes, backbone, cache or members "
        f"give the model its meaning). If you trust where this run came from, pass --trust (or {fix}).")


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
    _write_meta(Path(run_dir), {**meta, "head": VOTE, "members": members})


def vote_member_dirs(run_dir: Path, meta: dict, trust_run: bool = False) -> list[Path]:
    """The member folders of a vote's best_head.json, after checking its signature and confinement."""
    members = meta.get("members")
    if not isinstance(members, list) or len(members) < 2 or not all(isinstance(m, dict) for m in members):
        raise FeaturepipeError(f"{Path(run_dir) / HEAD_META} describes a vote without a list of members; "
                               f"re-run `featurepipe evaluate`")
    if is_signed_record(meta):
        check_meta_signature(Path(run_dir) / HEAD_META, meta, trust_run, f"a vote over {len(members)} feature sets")
    elif not trust_run and not trust.signed(VOTE, _members_digest(members), meta.get("hmac")):
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
    data = read_json(path, f"{run_dir} has no trained head ({HEAD_META} missing); run `featurepipe evaluate` first")
    if not isinstance(data, dict):
        raise FeaturepipeError(f"{path} is not a JSON object (it holds a {type(data).__name__}); it was edited or "
                               f"damaged: re-run `featurepipe evaluate`")
    return HeadMeta(data).check(path)


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
    if is_signed_record(meta):
        check_meta_signature(run_dir / HEAD_META, meta, trust_run, f"the description of {path.name}")
    elif not trust_run and not trust.signed(meta["file"], digest, meta.get("hmac")):
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
    atomic.copy_file(source, trust.writable(run_dir, record["file"]))
    _copy_history(cache_dir, run_dir)
    _write_meta(run_dir, {**meta, "file": record["file"], "sha256": record["sha256"]})
    return record


def remember_head(cache_dir: Path, run_dir: Path, extra: dict) -> None:
    """Keep a copy of run_dir's freshly written head for `cached_head`."""
    meta = load_head_meta(run_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic.copy_file(run_dir / meta["file"], cache_dir / meta["file"])
    _copy_history(run_dir, cache_dir)
    atomic.write_json(cache_dir / HEAD_META, {"file": meta["file"], "sha256": meta["sha256"],
                                       "hmac": trust.sign(meta["file"], meta["sha256"]), **extra})


class HeadMeta(dict):
    """best_head.json as read: the dict (same JSON fields as ever), with typed accessors."""

    def check(self, path: Path) -> "HeadMeta":
        """Refuse fields whose type would turn into nonsense: classes as a string would be split into
        letters (14 'classes'), a missing list into none."""
        classes = self.get("classes")
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise FeaturepipeError(f"{path}: `classes` must be a list of class names, not {classes!r}; the file was "
                                   f"edited or damaged: re-run `featurepipe evaluate`")
        return self

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

    def weights(self, path: Path) -> list[float]:
        """A vote's member weights, in member order: each member's recorded "weight" (written when the
        vote's selection added a member more than once), equal when none is recorded (every vote
        saved before member selection, and every selection without replacement). Refuses anything
        but positive numbers summing to 1 (`path`: the file, for the message)."""
        members = self.members
        given = [m.get("weight") for m in members]
        if all(w is None for w in given):
            return [1.0 / len(members)] * len(members) if members else []
        if (any(isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0 for w in given)
                or abs(sum(given) - 1.0) > 1e-6):
            raise FeaturepipeError(f"{path}: a vote's member weights must be positive numbers summing to 1, not "
                                   f"{given}; the file was edited or damaged: re-run `featurepipe evaluate`")
        return [float(w) for w in given]

    def backbone(self, config: Optional[dict] = None) -> Optional[BackboneSpec]:
        """The backbone the head was trained on (older runs record it in config.json only)."""
        data = self.get("backbone") or (config or {}).get("backbone")
        return BackboneSpec.from_dict(data).resolved() if data else None
