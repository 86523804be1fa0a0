"""Crash-safe training checkpoints for `finetune` (and the history file `baseline` shares).

Keras's BackupAndRestore and ModelCheckpoint write their .h5 file in place: a kill in the middle of
a write leaves a half-written file, and every later resume died on it with a raw h5py error. Here
every file is written through featurepipe.core.atomic (temporary name in the same folder, fsync, rename,
fsync the folder), so a file that has its final name is complete; a record (latest.json) naming the epoch's file and its sha256
is written after the file itself, so a backup is either the last finished epoch or the one before.
A record whose file is missing or does not match its hash (a disk fault, a hand edit) is reported
as damaged, never loaded; the caller falls back (finetune starts over and says so).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import keras
import numpy as np

from featurepipe.core import atomic
from featurepipe.core.atomic import write_json
from featurepipe.core.atomic import TMP_PREFIX
from featurepipe.core.hashcache import file_sha256
from featurepipe.rundir.layout import BACKUP_RECORD


def save_weights_atomic(model, path: Path) -> str:
    """model.save_weights (weights + optimizer state) to `path` via a temporary file; returns its sha256."""
    with atomic.atomic_path(path) as tmp:
        model.save_weights(str(tmp))
        digest = file_sha256(tmp)
    return digest


def save_arrays_atomic(arrays: list[np.ndarray], path: Path) -> None:
    """A model's get_weights() as an .npz (no optimizer state, loads without pickle), atomically."""
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, *arrays)


def load_arrays(path: Path) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


def remove_temporaries(directory: Path) -> None:
    """Temporary files a killed writer left behind (never a finished file)."""
    if directory.is_dir():
        for path in directory.rglob(f"{TMP_PREFIX}*"):
            if path.is_file():
                path.unlink(missing_ok=True)


class EpochBackup(keras.callbacks.Callback):
    """After each finished epoch: epoch-NNNN.weights.h5 (weights + optimizer state, so the learning
    rate schedule and Adam moments continue), then latest.json naming it, then older epochs removed.

    Put it last among the callbacks, so an epoch counts as done only once its history row and best
    checkpoint are written.
    """

    def __init__(self, directory: Path):
        super().__init__()
        self.directory = Path(directory)

    def on_epoch_end(self, epoch, logs=None):
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"epoch-{epoch:04d}.weights.h5"
        digest = save_weights_atomic(self.model, self.directory / name)
        write_json(self.directory / BACKUP_RECORD, {"epoch": int(epoch), "file": name, "sha256": digest})
        for old in self.directory.glob("epoch-*.weights.h5"):
            if old.name != name:
                old.unlink(missing_ok=True)


def read_backup(directory: Path) -> tuple[Optional[dict], Optional[str]]:
    """(record, None) for a usable backup; (None, None) when there is none (no epoch finished yet);
    (None, reason) when it is damaged."""
    latest = Path(directory) / BACKUP_RECORD
    if not latest.exists():
        return None, None
    try:
        record = json.loads(latest.read_text())
        path = Path(directory) / str(record["file"])
        int(record["epoch"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return None, f"{latest} is unreadable ({error})"
    if path.name != record["file"] or not path.is_file():
        return None, f"{path} named by {latest} is missing"
    if file_sha256(path) != record.get("sha256"):
        return None, f"{path} does not match the sha256 recorded in {latest} (damaged)"
    return record, None


def restore_backup(model, directory: Path, record: dict) -> int:
    """Load the backup into a compiled `model`; returns the epoch to continue from (0-based)."""
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.load_weights(str(Path(directory) / record["file"]))
    return int(record["epoch"]) + 1


class BestWeights(keras.callbacks.Callback):
    """Keeps the weights of the epoch with the lowest `monitor` in an .npz, written atomically.

    `threshold`: the best value of earlier (interrupted) fits, so a resumed fit only saves a better one.
    """

    def __init__(self, path: Path, monitor: str, threshold: Optional[float] = None):
        super().__init__()
        self.path, self.monitor = Path(path), monitor
        self.best = np.inf if threshold is None else float(threshold)

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is not None and np.isfinite(value) and float(value) < self.best:
            self.best = float(value)
            save_arrays_atomic(self.model.get_weights(), self.path)
