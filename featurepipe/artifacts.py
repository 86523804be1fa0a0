"""Saving and loading a run's trained head, safely.

A scikit-learn head is a joblib file whose sha256 is recorded in best_head.json when it is written,
with an HMAC of (file name, sha256) under this user's key (featurepipe.trust). Loading refuses a
file outside the run folder, a file whose hash differs, and a head the key did not sign (joblib
unpickles, so an edited or foreign file could run code) unless the caller trusts the run.
The Keras dense head is saved as .keras, signed the same way, and loaded with safe_mode=True.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import joblib

from featurepipe import atomic, trust

from featurepipe.errors import FeaturepipeError, TrustError
from featurepipe.hashcache import file_sha256

HEAD_META = "best_head.json"
VOTE = "vote"          # best_head.json's head when the run's model averages heads on several feature sets
MEMBERS_DIR = "members"
MODEL_META = "model.json"   # written by fine-tuning: the run's model, when there is one
# The dense head's training curve (epoch, loss, val_loss on its early-stopping hold-out), beside the
# head when the best head is the dense one; the report draws it.
HEAD_HISTORY = "best_head_history.csv"


def write_json(path: Path, data) -> None:
    atomic.write_json(path, data)


def save_head(estimator, run_dir: Path, meta: dict) -> Path:
    """Write the head and best_head.json (meta + file name + sha256); returns the head file."""
    from featurepipe.dense_head import DenseHeadClassifier

    run_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(estimator, DenseHeadClassifier):
        path = run_dir / "best_head.keras"
        with atomic.atomic_path(path) as tmp:      # keeps the .keras suffix Keras insists on
            estimator.save_keras(tmp)
    else:
        path = run_dir / "best_head.joblib"
        with atomic.atomic_path(path) as tmp:
            joblib.dump(estimator, tmp)
    digest = file_sha256(path)
    _write_history(estimator, run_dir / HEAD_HISTORY)
    write_json(run_dir / HEAD_META, {**meta, "file": path.name, "sha256": digest, "hmac": trust.sign(path.name, digest)})
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
    write_json(Path(run_dir) / HEAD_META, {**meta, "head": VOTE, "members": members,
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


def load_head_meta(run_dir: Path) -> dict:
    path = Path(run_dir) / HEAD_META
    if not path.exists():
        raise FeaturepipeError(f"{run_dir} has no trained head ({HEAD_META} missing); run `featurepipe evaluate` first")
    return json.loads(path.read_text())


def load_head(run_dir: Path, trust_run: bool = False):
    """(estimator, meta) for the run's best head, after checking the file is inside the run, is the
    one that was written, and was signed by this user's key (skipped with `trust_run`)."""
    run_dir = Path(run_dir)
    meta = load_head_meta(run_dir)
    if meta.get("head") == VOTE:
        raise FeaturepipeError(f"{run_dir}'s model is a vote over {len(meta.get('members') or [])} feature sets, "
                               f"not one head; open it with featurepipe.predict.open_run (its `members`)")
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
        from featurepipe.dense_head import DenseHeadClassifier

        try:
            return DenseHeadClassifier.load_keras(path, meta["classes"]), meta
        except Exception as error:  # keras raises ValueError/TypeError for refused or unreadable archives
            raise FeaturepipeError(f"cannot load the dense head {path} with Keras safe_mode "
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
    write_json(run_dir / HEAD_META, {**meta, "file": record["file"], "sha256": record["sha256"],
                                     "hmac": trust.sign(record["file"], record["sha256"])})
    return record


def remember_head(cache_dir: Path, run_dir: Path, extra: dict) -> None:
    """Keep a copy of run_dir's freshly written head for `cached_head`."""
    meta = load_head_meta(run_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic.copy_file(run_dir / meta["file"], cache_dir / meta["file"])
    _copy_history(run_dir, cache_dir)
    write_json(cache_dir / HEAD_META, {"file": meta["file"], "sha256": meta["sha256"],
                                       "hmac": trust.sign(meta["file"], meta["sha256"]), **extra})


def load_run_model(run_dir: Path, meta: Optional[dict] = None):
    """(Keras model, model.json) for a run's fine-tuned model: hash-checked, then loaded with safe_mode."""
    import keras

    # Registers the custom layers a fine-tuned file names (Preprocess, InferenceMode, PlattOneVsRest).
    import featurepipe.head_to_keras  # noqa: F401

    run_dir = Path(run_dir)
    if meta is None:
        meta_path = run_dir / MODEL_META
        if not meta_path.exists():
            raise FeaturepipeError(f"{run_dir} has no {MODEL_META}; run `featurepipe finetune` first")
        meta = json.loads(meta_path.read_text())
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
