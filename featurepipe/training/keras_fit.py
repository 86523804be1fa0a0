"""Keras training plumbing shared by `finetune` and `baseline`: the augmented training sequence,
callbacks (progress, crash-safe history.csv, resumable early stopping, epoch timing), the dtype
policy, learning-rate schedules and optimizers, and saving a trained model.

Importing this module imports Keras.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import keras
import numpy as np
import pandas as pd

from featurepipe.core import atomic
from featurepipe.core.errors import FeaturepipeError
from featurepipe.training.compare import scores
from featurepipe.core.hashcache import file_sha256
from featurepipe.data.augment import AugmentPolicy, augment_image, view_rng
from featurepipe.core.progress import report

HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "ce", "val_ce"]


class AugmentedImages(keras.utils.PyDataset):
    """Batches of augmented training images: order and pixels depend only on (seed, epoch, image).

    The epoch is set by `EpochHooks.on_epoch_begin`, so a resumed run draws the same batches as an
    uninterrupted one would have from the resumed epoch on.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, hashes: Sequence[str], batch_size: int,
                 seed: int, policy: Optional[AugmentPolicy] = None, mixup: float = 0.0):
        super().__init__()
        # Class indices (n,), or target distributions (n, classes) for soft-target training (training.distill).
        labels = np.asarray(labels)
        self.labels = labels.astype(np.int32) if labels.ndim == 1 else labels.astype(np.float32)
        # --mixup A (FinetuneConfig.mixup): blends need targets that can be blended, i.e. distributions.
        if mixup and self.labels.ndim != 2:
            raise ValueError("mixup blends target distributions (n, classes), not class indices")
        self.mixup = float(mixup)
        self.images, self.hashes = images, list(hashes)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.policy = policy or AugmentPolicy()
        self.epoch = 0
        self._order: tuple[int, np.ndarray] = (-1, np.arange(0))

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch_size)

    def order(self) -> np.ndarray:
        if self._order[0] != self.epoch:
            self._order = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(len(self.images)))
        return self._order[1]

    def __getitem__(self, index: int):
        rows = self.order()[index * self.batch_size:(index + 1) * self.batch_size]
        batch = np.stack([augment_image(self.images[i], self.policy, view_rng(self.hashes[i], self.epoch, self.seed))
                          for i in rows])
        if self.mixup:
            return mix_batch(batch, self.labels[rows], self.mixup,
                             np.random.default_rng([self.seed, self.epoch, index, MIXUP_STREAM]))
        return batch, self.labels[rows]


# Keeps mixup's draws apart from the epoch order's, which use [seed, epoch] of the same generator.
MIXUP_STREAM = 0x6D6978


def mix_batch(images: np.ndarray, targets: np.ndarray, concentration: float,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """mixup: image i becomes lam_i x image i + (1 - lam_i) x image partner(i), its target likewise, with
    lam_i ~ Beta(A, A) and the partners a permutation of the batch. Pixels are blended before the
    model's own scaling, which is linear, and rounded back to uint8 (the model's input type), so this is
    the blend of the scaled images to within half a grey level."""
    lam = rng.beta(concentration, concentration, size=len(images)).astype(np.float32)
    partner = rng.permutation(len(images))
    weight = lam[:, None, None, None]
    pixels = weight * images.astype(np.float32) + (1.0 - weight) * images[partner].astype(np.float32)
    return (np.clip(np.rint(pixels), 0, 255).astype(np.uint8),
            (lam[:, None] * targets + (1.0 - lam[:, None]) * targets[partner]).astype(np.float32))


def check_batch_size(n_train: int, batch_size: int) -> None:
    if batch_size < 1:
        raise FeaturepipeError(f"--batch-size must be at least 1, not {batch_size}")
    if n_train < batch_size:
        suggestion = 2 ** int(math.log2(n_train)) if n_train >= 1 else 1
        raise FeaturepipeError(
            f"only {n_train} training image(s), fewer than the batch size {batch_size}: too little data for "
            f"one batch; pass --batch-size {suggestion} (or add images)")


@contextlib.contextmanager
def dtype_policy(mixed: bool):
    """mixed_float16 while building/training on a GPU; the global policy is restored afterwards."""
    previous = keras.config.dtype_policy()
    if mixed:
        keras.config.set_dtype_policy("mixed_float16")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


class _DropRetracingWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


@contextlib.contextmanager
def quiet_retracing():
    """Drop TensorFlow's "triggered tf.function retracing" warnings while a stage runs.

    A stage builds several small models and predicts on a last, smaller batch, which retraces a few
    times by design; the warning would only alarm CLI users. Other TF warnings pass through.
    """
    import tensorflow as tf

    logger, dropper = tf.get_logger(), _DropRetracingWarnings()
    logger.addFilter(dropper)
    try:
        yield
    finally:
        logger.removeFilter(dropper)


class EpochHooks(keras.callbacks.Callback):
    """Sets the sequence's epoch, and reports progress: per batch with `per_batch` (done/total in
    batches over every planned epoch: a fine-tuning epoch takes minutes on a CPU), else per epoch."""

    def __init__(self, sequence: Optional[AugmentedImages], progress, stage: str, total: int,
                 per_batch: bool = False):
        super().__init__()
        self.sequence, self.progress, self.stage, self.total = sequence, progress, stage, total
        self.per_batch = per_batch and sequence is not None
        self.epochs: list[int] = []
        self._epoch = 0

    @property
    def _steps(self) -> int:
        return len(self.sequence) if self.per_batch else 1

    def on_epoch_begin(self, epoch, logs=None):
        if self.sequence is not None:
            self.sequence.epoch = epoch
        self.epochs.append(epoch)
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.per_batch:
            report(self.progress, self.stage, self._epoch * self._steps + batch + 1, self.total * self._steps,
                   f"epoch {self._epoch + 1}/{self.total} batch {batch + 1}/{self._steps}")

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        report(self.progress, self.stage, (epoch + 1) * self._steps, self.total * self._steps,
               f"val_accuracy {logs.get('val_accuracy', float('nan')):.3f} "
               f"val_loss {logs.get('val_loss', float('nan')):.4f}")


def step_cost(model, images: np.ndarray, targets: np.ndarray, repeats: int = 2) -> tuple[float, float]:
    """(seconds per image of one training step's forward + backward pass, seconds the first call
    spent building the graph): no update, the weights are untouched. Timed on `images` as one batch:
    the first call traces, the fastest of `repeats` later calls is the step."""
    import tensorflow as tf

    loss_fn = keras.losses.CategoricalCrossentropy()
    x, y = tf.convert_to_tensor(images), tf.convert_to_tensor(targets, dtype=tf.float32)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return tape.gradient(loss, model.trainable_variables)

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return min(times) / max(1, len(images)), max(0.0, first - min(times))


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping that continues the patience count of an interrupted fit (from history.csv)."""

    def __init__(self, *args, state: Optional[tuple[float, int, int]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.state = state

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.state is not None:
            self.best, self.best_epoch, self.wait = self.state


class HistoryLogger(keras.callbacks.Callback):
    """history.csv in HISTORY_COLUMNS order, rewritten whole (featurepipe.core.atomic) after each
    epoch, so a kill never leaves a torn row. append=True keeps the rows of earlier (interrupted)
    fits; an epoch that runs again replaces its row."""

    def __init__(self, filename, append: bool = False):
        super().__init__()
        self.path, self.append = Path(filename), append

    def on_train_begin(self, logs=None):
        if not self.append:
            self.path.unlink(missing_ok=True)

    def on_epoch_end(self, epoch, logs=None):
        table = read_history(self.path)
        row = {"epoch": int(epoch), **{k: float(v) for k, v in (logs or {}).items() if np.ndim(v) == 0}}
        table = pd.concat([table[table["epoch"] != epoch], pd.DataFrame([row])], ignore_index=True)
        table = table.sort_values("epoch").reset_index(drop=True)
        columns = [c for c in HISTORY_COLUMNS if c in table] + sorted(c for c in table if c not in HISTORY_COLUMNS)
        atomic.write_csv(self.path, table[columns])


def tensorboard_available() -> bool:
    # tensorflow no longer pulls tensorboard in, and without it tf.summary raises at the first epoch.
    return importlib.util.find_spec("tensorboard") is not None


def tensorboard_callbacks(log_dir: Path) -> list:
    if not tensorboard_available():
        return []
    return [keras.callbacks.TensorBoard(str(log_dir), write_graph=False, profile_batch=0)]


def read_history(path: Path) -> pd.DataFrame:
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame(columns=HISTORY_COLUMNS)
    table = pd.read_csv(path, on_bad_lines="skip")
    if "epoch" not in table:
        return pd.DataFrame(columns=HISTORY_COLUMNS)
    # A resumed fit re-logs the epoch that was running when it was interrupted: keep the last row.
    table = table.dropna(subset=["epoch"]).astype({"epoch": int})
    table = table.drop_duplicates("epoch", keep="last").sort_values("epoch").reset_index(drop=True)
    return table[[c for c in HISTORY_COLUMNS if c in table] + [c for c in table if c not in HISTORY_COLUMNS]]


def tidy_history(path: Path) -> pd.DataFrame:
    table = read_history(path)
    if len(table):
        atomic.write_csv(path, table)
    return table


def best_row(history: pd.DataFrame, since_epoch: int = 0, monitor: str = "val_loss") -> Optional[pd.Series]:
    if monitor not in history:
        monitor = "val_loss"
    rows = history[history["epoch"] >= since_epoch].dropna(subset=[monitor]) if len(history) else history
    if not len(rows):
        return None
    return rows.loc[rows[monitor].idxmin()]


def save_model_atomic(model, path: Path) -> str:
    """Write a .keras file atomically; returns its sha256."""
    with atomic.atomic_path(path) as tmp:
        model.save(str(tmp))
        digest = file_sha256(tmp)
    return digest


def predict_proba(model, images: np.ndarray, batch_size: int) -> np.ndarray:
    if not len(images):
        return np.zeros((0, int(model.output_shape[-1])))
    return np.asarray(model.predict(images, batch_size=batch_size, verbose=0), dtype=np.float64)


def evaluate_model(model, images: np.ndarray, labels: np.ndarray, batch_size: int) -> dict:
    """{"val_accuracy", "val_loss"}: accuracy and plain cross-entropy (whatever loss the model trains on)."""
    return scores(labels, predict_proba(model, images, batch_size))


def lr_schedule(lr: float, steps_per_epoch: int, epochs: int, warmup_epochs: int, kind: str):
    """The learning rate per optimizer step: "cosine" warms up linearly from lr/10 to lr over
    `warmup_epochs`, then decays along a cosine to 0 at the last planned epoch; "constant" is lr.

    It is a function of the optimizer's step counter, which the epoch backup restores, so a resumed
    fit continues on the same curve.
    """
    if kind == "constant":
        return float(lr)
    total = max(1, steps_per_epoch * epochs)
    warmup = min(max(0, steps_per_epoch * warmup_epochs), total - 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=lr / 10 if warmup else lr, decay_steps=max(1, total - warmup), alpha=0.0,
        warmup_target=float(lr) if warmup else None, warmup_steps=warmup)


def make_optimizer(options: dict, rate):
    if options["optimizer"] == "sgd":
        return keras.optimizers.SGD(learning_rate=rate, momentum=options["momentum"])
    return keras.optimizers.AdamW(learning_rate=rate, weight_decay=options["weight_decay"])


class EpochTimer(keras.callbacks.Callback):
    """Wall seconds of each epoch (training + validation), for the report's time per epoch."""

    def __init__(self, sink: list[float]):
        super().__init__()
        self.sink, self._t0 = sink, 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.sink.append(time.perf_counter() - self._t0)
