"""Stage `finetune`: the run's frozen base + its best head as ONE Keras model, trained on images.

The combined model starts as the evaluated head on the frozen base (checked numerically before any
training step), so fine-tuning never starts from a random head on an unfrozen base. Strategies:

- ``head``: no training; the combined model is evaluated and saved (a one-file export).
- ``top-blocks`` (default): the top blocks of the base and the head train. How many registry
  blocks "top" means is per backbone (default_unfreeze_blocks): the last two MBConv stages + head
  conv for EfficientNet-Lite, block5 for VGG, conv5 for ResNet; --unfreeze-blocks overrides it.
- ``fpt``: freeze, pre-train, fine-tune: the head alone trains end to end on augmented images at
  10x the rate for a few epochs, then the top blocks are unfrozen as in ``top-blocks``.
- ``all``: every base layer trains (keep the rate small).

Defaults (chosen by measurement, benchmarks/finetune_gain.py): AdamW (lr 1e-3, weight decay 1e-4),
one warm-up epoch then a cosine decay to 0, no label smoothing (--label-smoothing; 0.1 measured worse), at most 12 epochs with early
stopping (patience 4) on the plain validation cross-entropy, the best epoch restored. The seeds'
recipe (SGD 1e-4, momentum 0.9, constant rate, one block) stays available by options. Mixed
precision and XLA are used on a GPU only.

BatchNormalization layers stay frozen everywhere (non-trainable = inference mode in Keras 3) and
the whole base runs with training=False (InferenceOnly wrapper): a few hundred images cannot
re-estimate ImageNet batch statistics, and their drift would wreck the pre-trained features.

Honest before/after: the frozen head and the fine-tuned model score the SAME validation images
(the dataset's validation split, or 20% of train held out, with the head refit without them) and
finetune_compare decides, image by image, whether the change is beyond noise. Only then does the
fine-tuned model become the run's model (RUN_DIR/model.json); otherwise the frozen best head stays
the run's model and the summary says why. A test split is scored once at the end, never for a choice.

A finished fine-tuning is reused when everything that changes it is unchanged (finetune_key:
the best head, the images and labels, the options and seed, the backbone and library versions).

Files under RUN_DIR/finetune/: split.json (train/validation/test images), state.json (options and
key, for --resume), history.csv, best.weights.npz (best epoch), backup/ (crash-safe epoch backups
while training, featurepipe.checkpoints), finetuned.keras, validation_predictions.csv (per image,
before and after) and summary.json; RUN_DIR/logs holds TensorBoard logs (when tensorboard is
installed). --resume continues from the last finished epoch after a kill at any point, and starts
over (saying so) when there is nothing usable to continue from.

Importing this module imports TensorFlow/Keras.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import keras
import numpy as np
import pandas as pd

from featurepipe.artifacts import MODEL_META, load_head, write_json
from featurepipe.backbones.registry import block_starts, get_backbone
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.dataset import Dataset
from featurepipe.errors import FeaturepipeError, ImageDecodeError
from featurepipe.finetune_compare import compare, scores
from featurepipe.hashcache import file_sha256
from featurepipe.head_to_keras import InferenceOnly, head_to_keras
from featurepipe.images import AugmentPolicy, augment_image, decode_image, view_rng
from featurepipe.paths import cache_root
from featurepipe.progress import ProgressCallback, report

STRATEGIES = ("head", "top-blocks", "fpt", "all")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
VALIDATION_FRACTION = 0.2
FINETUNE_DIR = "finetune"
MODEL_FILE = "finetuned.keras"
HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "ce", "val_ce"]
# Early stopping and the best epoch follow the plain validation cross-entropy (val_loss includes
# label smoothing, whose floor depends on the number of classes).
MONITOR = "val_ce"
# Defaults chosen by measurement (benchmarks/finetune_gain.py; figures in the README). The seeds'
# VGG recipe (SGD 1e-4 momentum 0.9, constant rate, one block) stays available by options.
DEFAULT_OPTIMIZER = "adamw"
DEFAULT_LR = {"adamw": 1e-3, "sgd": 1e-2}
DEFAULT_WEIGHT_DECAY = 1e-4
DEFAULT_LABEL_SMOOTHING = 0.0
DEFAULT_SCHEDULE = "cosine"
DEFAULT_WARMUP_EPOCHS = 1
DEFAULT_EPOCHS = 12
DEFAULT_PATIENCE = 4
# fpt: the head-only phase runs this many times the fine-tuning rate, for at most this many epochs.
PRETRAIN_LR_FACTOR = 10.0
PRETRAIN_MAX_EPOCHS = 5
# The combined model must give the head's probabilities to float32 accuracy before training.
REPRODUCTION_TOLERANCE = 1e-4
# Bump when a change here changes what a fine-tuning produces: finished runs are then not reused.
FINETUNE_FORMAT = 2


@dataclass
class FinetuneReport:
    run_dir: Path
    strategy: str
    before: dict                      # {"val_accuracy", "val_loss"} of the starting model
    after: dict                       # the same for the saved (best-epoch) model
    epochs_run: int                   # epochs trained in total (across resumed calls)
    best_epoch: Optional[int]         # 1-based; None when nothing was trained
    model_path: Path
    seconds: float
    unfrozen_layers: list[str]        # base layers whose weights trained (BatchNorm never)
    trainable_params: int
    train_images: int = 0
    val_images: int = 0
    validation: str = "validation"    # "validation": the dataset's split; "holdout": 20% of train
    head_source: str = "run"          # "run": the run's best head; "refit": refit without the holdout
    resumed_from_epoch: Optional[int] = None   # 1-based first epoch of this call when resuming
    improved: bool = False            # beyond noise on the same validation images (finetune_compare)
    failed: list[dict] = field(default_factory=list)
    kept: str = "frozen"              # the run's model now: "finetuned" (model.json) | "frozen" (best head)
    reason: str = ""                  # why it was (not) kept
    decision: dict = field(default_factory=dict)   # finetune_compare.compare's evidence
    test: Optional[dict] = None       # the test split, scored once at the end (frozen and fine-tuned)
    unfreeze_blocks: Optional[int] = None           # registry blocks trained (None: all)
    seconds_per_epoch: Optional[float] = None       # median over this call's epochs
    reused: bool = False              # a finished fine-tuning with the same key was returned
    notes: list[str] = field(default_factory=list)
    key: str = ""

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(run_dir=str(self.run_dir), model_path=str(self.model_path), seconds=round(self.seconds, 3))
        return data


# ------------------------------------------------------------------------------------------------
# the combined model


def combine(feature_model, estimator, name: str = "finetune"):
    """uint8 images -> class probabilities: the feature model (in inference mode) + the head."""
    n_features = int(feature_model.output_shape[-1])
    head = head_to_keras(estimator, n_features, name="head")
    images = keras.Input(feature_model.input_shape[1:], dtype="uint8", name="images")
    features = InferenceOnly(feature_model, name="backbone")(images)
    return keras.Model(images, head(features), name=name)


def build_finetune_model(spec: BackboneSpec, estimator, cache_dir=None):
    """The run's feature model (see build_feature_model) with `estimator` converted on top."""
    from featurepipe.backbones.build import build_feature_model

    return combine(build_feature_model(spec, cache_root(cache_dir)), estimator)


def base_model(model):
    """The conv base inside a combined model (the nested keras.Model in its feature model)."""
    feature_model = model.get_layer("backbone").layer
    for layer in feature_model.layers:
        if isinstance(layer, keras.Model):
            return layer
    raise FeaturepipeError(f"{feature_model.name} has no nested base model")


def _freeze_batchnorm(layer) -> None:
    if isinstance(layer, keras.layers.BatchNormalization):
        layer.trainable = False
    for child in getattr(layer, "layers", []) or []:
        _freeze_batchnorm(child)


def set_trainable(model, backbone: str, unfreeze_blocks: Optional[int], train_head: bool = True) -> list[str]:
    """Freeze the base below its top `unfreeze_blocks` blocks (None: unfreeze every block, 0: none).

    BatchNormalization layers stay frozen wherever they sit. Returns the names of the base layers
    that now have trainable weights.
    """
    base = base_model(model)
    model.trainable = True                  # propagates; the cut below re-freezes what it must
    layers = base.layers
    if unfreeze_blocks is None:
        cut = 0
    elif unfreeze_blocks <= 0:
        cut = len(layers)
    else:
        starts = block_starts(get_backbone(backbone), [layer.name for layer in layers])
        cut = starts[-min(unfreeze_blocks, len(starts))]
    for index, layer in enumerate(layers):
        layer.trainable = index >= cut
    _freeze_batchnorm(base)
    model.get_layer("head").trainable = train_head
    return [layer.name for layer in layers if layer.trainable and layer.trainable_weights]


def trainable_params(model) -> int:
    return int(sum(math.prod(v.shape) for v in model.trainable_weights))


# ------------------------------------------------------------------------------------------------
# images: the split, decoding and the augmented training sequence


@dataclass
class ImageSplit:
    source: str                 # "validation" (the dataset's own split) | "holdout"
    seed: int
    fraction: float
    train: pd.DataFrame         # path, label, hash
    validation: pd.DataFrame
    # The dataset's test split: scored once, after every choice is made (never for choices).
    test: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["path", "label", "hash"]))

    def to_json(self) -> dict:
        cols = ["path", "label", "hash"]
        return {"source": self.source, "seed": self.seed, "fraction": self.fraction,
                "train": self.train[cols].values.tolist(), "validation": self.validation[cols].values.tolist(),
                "test": self.test[cols].values.tolist()}

    @classmethod
    def from_json(cls, data: dict) -> "ImageSplit":
        cols = ["path", "label", "hash"]
        return cls(data["source"], int(data["seed"]), float(data["fraction"]),
                   pd.DataFrame(data["train"], columns=cols), pd.DataFrame(data["validation"], columns=cols),
                   pd.DataFrame(data.get("test") or [], columns=cols))


def _holdout(frame: pd.DataFrame, classes: list[str], seed: int, fraction: float) -> np.ndarray:
    """Boolean mask of held-out rows: about `fraction` of each class, at least one, never all.

    Rows sharing a group (manifest groups) are held out together, so no group straddles the split.
    """
    rng = np.random.default_rng(seed)
    labels = frame["label"].to_numpy()
    counts = {c: int((labels == c).sum()) for c in classes}
    for label, count in counts.items():
        if count < 2:
            raise FeaturepipeError(
                f"class {label!r} has {count} training image(s): at least 2 are needed to hold one out for "
                f"validation; add images, or give the dataset a validation split (DATA/validation/<class>/)")
    target = {c: max(1, int(round(fraction * n))) for c, n in counts.items()}
    groups = frame["group"].where(frame["group"].notna(), frame["path"]).astype(str).to_numpy()
    unique = np.unique(groups)
    held = np.zeros(len(frame), dtype=bool)
    taken = dict.fromkeys(classes, 0)
    for group in unique[rng.permutation(len(unique))]:
        rows = groups == group
        group_counts = pd.Series(labels[rows]).value_counts().to_dict()
        wanted = any(taken[c] < target[c] for c in group_counts)
        keeps_training = all(counts[c] - taken[c] - k >= 1 for c, k in group_counts.items())
        if wanted and keeps_training:
            held |= rows
            for c, k in group_counts.items():
                taken[c] += k
    return held


def make_split(dataset: Dataset, seed: int = 0, fraction: float = VALIDATION_FRACTION) -> ImageSplit:
    """The dataset's validation split if it has one, else a stratified held-out `fraction` of train."""
    frame = dataset.frame
    classes = list(dataset.classes)
    train = frame[frame["split"] == "train"].reset_index(drop=True)
    validation = frame[frame["split"] == "validation"].reset_index(drop=True)
    test = frame[frame["split"] == "test"].reset_index(drop=True)
    if len(validation):
        missing = [c for c in classes if not (validation["label"] == c).any()]
        if missing:
            raise FeaturepipeError(
                f"the validation split has no image of class(es) {', '.join(map(repr, missing))}; every class "
                f"needs at least one validation image to measure fine-tuning: add some under "
                f"{dataset.source}/validation/<class>/")
        return ImageSplit("validation", seed, 0.0, train, validation, test)
    held = _holdout(train, classes, seed, fraction)
    return ImageSplit("holdout", seed, fraction, train[~held].reset_index(drop=True),
                      train[held].reset_index(drop=True), test)


def decode_frame(frame: pd.DataFrame, size: int, resize: str, progress: Optional[ProgressCallback] = None,
                 stage: str = "decode") -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(uint8 images, kept row mask, failures) for every row of `frame`; undecodable files are skipped."""
    images, kept, failed = [], np.zeros(len(frame), dtype=bool), []
    for i, path in enumerate(frame["path"]):
        try:
            images.append(decode_image(path, size, resize))
            kept[i] = True
        except ImageDecodeError as error:
            failed.append({"path": str(path), "reason": error.reason})
        if (i + 1) % 64 == 0:
            report(progress, stage, i + 1, len(frame), "")
    report(progress, stage, len(frame), len(frame), f"{len(failed)} failed" if failed else "")
    stacked = np.stack(images) if images else np.zeros((0, size, size, 3), dtype=np.uint8)
    return stacked, kept, failed


def decode_split(split: ImageSplit, classes: list[str], size: int, resize: str,
                 progress: Optional[ProgressCallback] = None):
    """((x, y, rows) for train, the same for validation, failures); every class must keep a
    validation image."""
    both = pd.concat([split.train, split.validation], ignore_index=True)
    images, kept, failed = decode_frame(both, size, resize, progress)
    label_index = {c: i for i, c in enumerate(classes)}
    n_train = len(split.train)
    positions = np.cumsum(kept) - 1           # row -> index into `images` (for kept rows)
    parts = []
    for rows in (np.arange(n_train), np.arange(n_train, len(both))):
        rows = rows[kept[rows]]
        frame = both.iloc[rows].reset_index(drop=True)
        parts.append((images[positions[rows]], frame["label"].map(label_index).to_numpy(np.int32), frame))
    missing = [c for c in classes if not (parts[1][2]["label"] == c).any()]
    if missing:
        raise FeaturepipeError(f"no validation image of class(es) {', '.join(map(repr, missing))} could be decoded")
    return parts[0], parts[1], failed


class AugmentedImages(keras.utils.PyDataset):
    """Batches of augmented training images: order and pixels depend only on (seed, epoch, image).

    The epoch is set by `EpochHooks.on_epoch_begin`, so a resumed run draws the same batches as an
    uninterrupted one would have from the resumed epoch on.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, hashes: Sequence[str], batch_size: int,
                 seed: int, policy: Optional[AugmentPolicy] = None):
        super().__init__()
        self.images, self.labels, self.hashes = images, labels.astype(np.int32), list(hashes)
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
        return batch, self.labels[rows]


def check_batch_size(n_train: int, batch_size: int) -> None:
    if batch_size < 1:
        raise FeaturepipeError(f"--batch-size must be at least 1, not {batch_size}")
    if n_train < batch_size:
        suggestion = 2 ** int(math.log2(n_train)) if n_train >= 1 else 1
        raise FeaturepipeError(
            f"only {n_train} training image(s), fewer than the batch size {batch_size}: too little data for "
            f"one batch; pass --batch-size {suggestion} (or add images)")


# ------------------------------------------------------------------------------------------------
# training plumbing shared with featurepipe.baseline


def gpu_available() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


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
    def __init__(self, sequence: Optional[AugmentedImages], progress, stage: str, total: int):
        super().__init__()
        self.sequence, self.progress, self.stage, self.total = sequence, progress, stage, total
        self.epochs: list[int] = []

    def on_epoch_begin(self, epoch, logs=None):
        if self.sequence is not None:
            self.sequence.epoch = epoch
        self.epochs.append(epoch)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        report(self.progress, self.stage, epoch + 1, self.total,
               f"val_accuracy {logs.get('val_accuracy', float('nan')):.3f} "
               f"val_loss {logs.get('val_loss', float('nan')):.4f}")


class _ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping that continues the patience count of an interrupted fit (from history.csv)."""

    def __init__(self, *args, state: Optional[tuple[float, int, int]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.state = state

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.state is not None:
            self.best, self.best_epoch, self.wait = self.state


class HistoryLogger(keras.callbacks.Callback):
    """history.csv in HISTORY_COLUMNS order, rewritten whole (temporary file + rename) after each
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
        tmp = self.path.with_name(f".tmp-{os.getpid()}-{self.path.name}")
        table[columns].to_csv(tmp, index=False)
        os.replace(tmp, self.path)


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
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        table.to_csv(tmp, index=False)
        os.replace(tmp, path)
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
    tmp = path.with_name(f".tmp-{time.time_ns() % 10**8}-{path.name}")
    model.save(str(tmp))
    digest = file_sha256(tmp)
    tmp.replace(path)
    return digest


def predict_proba(model, images: np.ndarray, batch_size: int) -> np.ndarray:
    if not len(images):
        return np.zeros((0, int(model.output_shape[-1])))
    return np.asarray(model.predict(images, batch_size=batch_size, verbose=0), dtype=np.float64)


def evaluate_model(model, images: np.ndarray, labels: np.ndarray, batch_size: int) -> dict:
    """{"val_accuracy", "val_loss"}: accuracy and plain cross-entropy (whatever loss the model trains on)."""
    return scores(labels, predict_proba(model, images, batch_size))


# ------------------------------------------------------------------------------------------------
# what is trained, and how


def default_unfreeze_blocks(backbone: str, layer_names: list[str]) -> int:
    """How many registry blocks (counted from the top) the default fine-tuning trains.

    "Top block" must mean enough layers to matter. EfficientNet-Lite's last registry block is its
    1x1 head conv alone (training it moved nothing, issue 9), so there it is the last two MBConv
    stages + the head conv (Lite0: blocks_11..15 + head_conv: 6 registry blocks, 2.6M weights).
    Measured on 500 Fashion-MNIST images (benchmarks/finetune_gain.py, validation accuracy from
    0.71 frozen): head conv + last stage 0.78, two stages 0.80, three stages 0.81 at 1.6x the time.
    Keras EfficientNet B*: block6 + block7 (+ top conv). MobileNetV2: its last two stages (block_13
    to block_16 + Conv_1). Everything else: the last registry block, which is already a whole stage
    (VGG block5, ResNet conv5, DenseNet conv5, Xception block14, ConvNeXt stage_3).
    """
    if backbone.startswith("efficientnet_lite"):
        from featurepipe.backbones.efficientnet_lite import block_specs

        outs = [spec[-1] for spec in block_specs(backbone.removeprefix("efficientnet_"))]
        stages = [outs[0]] + [o for prev, o in zip(outs, outs[1:]) if o != prev]
        top_two = sum(1 for o in outs if o in stages[-2:])
        return top_two + 1
    if backbone.startswith("efficientnet_b"):
        return 2
    if backbone == "mobilenet_v2":
        return 4
    return 1


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


def smoothed_crossentropy(n_classes: int, smoothing: float):
    """Sparse cross-entropy against labels smoothed by `smoothing` (Keras's sparse loss has no option)."""
    if smoothing <= 0:
        return "sparse_categorical_crossentropy"

    def loss(y_true, y_pred):
        onehot = keras.ops.one_hot(keras.ops.reshape(keras.ops.cast(y_true, "int32"), (-1,)), n_classes)
        target = onehot * (1.0 - smoothing) + smoothing / n_classes
        return keras.losses.categorical_crossentropy(target, y_pred)

    return loss


# ------------------------------------------------------------------------------------------------
# finetune


def _read_json(path: Path, missing: str) -> dict:
    if not path.exists():
        raise FeaturepipeError(missing)
    return json.loads(path.read_text())


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


def _refit_head(meta: dict, config: dict, feature_model, images, labels, hashes, paths, classes, batch_size):
    """The run's head config refit on the fine-tuning training images only.

    With a held-out validation set carved from train, the run's head has seen the validation
    images; scoring it there would make "before" optimistic. Refitting the same head (same params,
    seed and augmentation mode) without them keeps before/after honest.
    """
    from featurepipe.crossval import FeatureTable, refit

    def features(batch):
        return np.asarray(feature_model.predict(batch, batch_size=batch_size, verbose=0), dtype=np.float32)

    views = None
    if meta.get("augment") == "views":
        policy = AugmentPolicy.from_dict(config.get("augment_policy") or {})
        seed = int(config.get("augment_seed", 0))
        views = np.stack([features(np.stack([augment_image(img, policy, view_rng(h, k, seed))
                                             for img, h in zip(images, hashes)]))
                          for k in range(int(config.get("augment", 0)))], axis=1)
    table = FeatureTable(X=features(images), y=labels.astype(np.int64), classes=classes, paths=list(paths), views=views)
    # float32 whatever the caller's policy: the dense head caches its Keras trainer across fits.
    with dtype_policy(False):
        return refit(table, meta["head"], meta.get("params") or {}, meta.get("augment", "none"),
                     int(config.get("seed", 0)))


def _check_reproduces(model, feature_model, estimator, images, batch_size) -> float:
    """Max |combined - estimator.predict_proba(features)| on `images`; raises if not ~0."""
    if not len(images):
        return 0.0
    features = np.asarray(feature_model.predict(images, batch_size=batch_size, verbose=0), dtype=np.float32)
    expected = estimator.predict_proba(features)
    actual = np.asarray(model.predict(images, batch_size=batch_size, verbose=0), dtype=np.float64)
    diff = float(np.abs(actual - expected).max())
    if not diff <= REPRODUCTION_TOLERANCE:
        raise FeaturepipeError(
            f"the combined Keras model differs from the head by up to {diff:.2e} before training (tolerance "
            f"{REPRODUCTION_TOLERANCE:g}); refusing to fine-tune from a head that is not the evaluated one")
    return diff


def _options(strategy, unfreeze_blocks, epochs, lr, optimizer, momentum, weight_decay, label_smoothing,
             warmup_epochs, schedule, batch_size, patience, seed) -> dict:
    if strategy not in STRATEGIES:
        raise FeaturepipeError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if optimizer not in OPTIMIZERS:
        raise FeaturepipeError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if schedule not in SCHEDULES:
        raise FeaturepipeError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    lr = DEFAULT_LR[optimizer] if lr is None else lr
    if (epochs < 1 or lr <= 0 or (unfreeze_blocks is not None and unfreeze_blocks < 0) or patience < 0
            or batch_size < 1 or warmup_epochs < 0 or weight_decay < 0):
        raise FeaturepipeError("--epochs and --batch-size must be >= 1, --lr > 0, --unfreeze-blocks, --patience, "
                               "--warmup-epochs and --weight-decay >= 0")
    if not 0 <= label_smoothing < 1:
        raise FeaturepipeError(f"--label-smoothing must be in [0, 1), not {label_smoothing}")
    if strategy == "fpt" and epochs < 2:
        raise FeaturepipeError("strategy fpt needs --epochs 2 or more (head pre-training, then fine-tuning)")
    return {"strategy": strategy, "unfreeze_blocks": None if unfreeze_blocks is None else int(unfreeze_blocks),
            "epochs": int(epochs), "lr": float(lr), "optimizer": optimizer, "momentum": float(momentum),
            "weight_decay": float(weight_decay), "label_smoothing": float(label_smoothing),
            "warmup_epochs": int(warmup_epochs), "schedule": schedule, "batch_size": int(batch_size),
            "patience": int(patience), "seed": int(seed)}


def pretrain_epochs(epochs: int) -> int:
    return min(PRETRAIN_MAX_EPOCHS, max(1, epochs // 3))


def finetune_key(head_meta: dict, config: dict, split: ImageSplit, options: dict, spec: BackboneSpec,
                 root: Path) -> str:
    """Everything that changes what a fine-tuning produces: the run's best head (its file's sha256
    and what it was fit with), the images and labels (content hashes, per split), the options and
    seed, the backbone (fingerprint: spec, weights, preprocessing, library versions), this module's
    format and numpy's version. Paths are left out: moving a folder changes nothing."""
    from importlib import metadata

    from featurepipe.backbones.fingerprint import backbone_fingerprint
    from featurepipe.backbones.spec import hash_payload

    def rows(frame):
        return sorted([str(h), str(label)] for h, label in zip(frame["hash"], frame["label"]))

    try:
        version = metadata.version("featurepipe")
    except metadata.PackageNotFoundError:
        version = None
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
        write_json(meta_path, summary["model_json"])
    else:
        current = _read_optional_json(meta_path)
        if meta_path.exists() and (current is None or current.get("kind") == "finetuned"):
            meta_path.unlink()


def _reusable(run_dir: Path, key: str) -> Optional["FinetuneReport"]:
    """The finished fine-tuning with the same key, when its files are intact; republishes model.json
    (evaluate removes it when it rewrites the run)."""
    out = run_dir / FINETUNE_DIR
    summary = _read_optional_json(out / "summary.json")
    state = _read_optional_json(out / "state.json")
    if not summary or not state or summary.get("key") != key or state.get("status") != "done":
        return None
    model_path = out / MODEL_FILE
    if not model_path.is_file() or file_sha256(model_path) != summary.get("sha256"):
        return None
    _publish(run_dir, summary)
    data = dict(summary["report"])
    data.update(run_dir=run_dir, model_path=model_path, seconds=0.0, reused=True, resumed_from_epoch=None)
    fields = FinetuneReport.__dataclass_fields__
    return FinetuneReport(**{k: v for k, v in data.items() if k in fields})


@quiet_retracing()
def finetune(
    run_dir,
    unfreeze_blocks: Optional[int] = None,
    epochs: int = DEFAULT_EPOCHS,
    lr: Optional[float] = None,
    momentum: float = 0.9,
    batch_size: int = 16,
    strategy: str = "top-blocks",
    patience: int = DEFAULT_PATIENCE,
    resume: bool = False,
    seed: int = 0,
    cache_dir=None,
    progress: Optional[ProgressCallback] = None,
    callbacks: Sequence = (),
    optimizer: str = DEFAULT_OPTIMIZER,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
    warmup_epochs: int = DEFAULT_WARMUP_EPOCHS,
    schedule: str = DEFAULT_SCHEDULE,
    reuse: bool = True,
) -> FinetuneReport:
    """Fine-tune the run's base + best head on images; see the module docstring.

    unfreeze_blocks=None trains the backbone's default top (default_unfreeze_blocks); lr=None the
    optimizer's default rate. resume=True continues an interrupted call with the options it was
    started with (finetune/state.json; the options passed now are ignored); with nothing to resume
    (killed before state.json was written, or a damaged backup) it starts over with the options
    passed and says so. reuse=True returns a finished fine-tuning with the same key (finetune_key)
    without training. `callbacks` are extra Keras callbacks added to every fit (tests, logging).
    """
    from featurepipe.backbones.build import build_feature_model
    from featurepipe.checkpoints import (
        BestWeights, EpochBackup, load_arrays, read_backup, remove_temporaries, restore_backup, save_arrays_atomic,
    )
    from featurepipe.dataset import scan

    started = time.perf_counter()
    run_dir = Path(run_dir)
    out = run_dir / FINETUNE_DIR
    config = _read_json(run_dir / "config.json",
                        f"{run_dir} has no config.json; pass a run directory written by `featurepipe evaluate`")
    estimator, meta = load_head(run_dir)
    classes = list(meta["classes"])
    spec = BackboneSpec.from_dict(meta["backbone"]).resolved()
    root = cache_root(cache_dir if cache_dir is not None else config.get("cache_dir"))
    state_path, split_path = out / "state.json", out / "split.json"
    notes: list[str] = []
    remove_temporaries(out)

    state = _read_optional_json(state_path) if resume else None
    if resume and state is not None and state.get("status") == "done":
        finished = _reusable(run_dir, state.get("key", ""))
        if finished is not None:
            return finished
        notes.append("the finished fine-tuning's files were incomplete: started over")
        state = None
    split = None
    if state is not None:
        split_data = _read_optional_json(split_path)
        damaged = [reason for phase in ("pretrain", "finetune") for reason in [read_backup(out / "backup" / phase)[1]]
                   if reason]
        if split_data is None or "options" not in state or "key" not in state:
            notes.append(f"{state_path} or {split_path} was incomplete: started over")
            state = None
        elif damaged:
            notes.append(f"the epoch backup is damaged ({damaged[0]}): started over")
            state = None
        else:
            split = ImageSplit.from_json(split_data)
    elif resume:
        notes.append("no interrupted fine-tuning state found (it was stopped before writing state.json): started over")
    resuming = state is not None

    if resuming:
        options, key = state["options"], state["key"]
    else:
        options = _options(strategy, unfreeze_blocks, epochs, lr, optimizer, momentum, weight_decay,
                           label_smoothing, warmup_epochs, schedule, batch_size, patience, seed)
        dataset = scan(config["dataset"]["source"], cache_dir=root, progress=progress)
        if list(dataset.classes) != classes:
            raise FeaturepipeError(
                f"the classes in {dataset.source} ({', '.join(dataset.classes)}) are not the run's "
                f"({', '.join(classes)}); re-run `featurepipe evaluate` first")
        split = make_split(dataset, options["seed"])
        key = finetune_key(meta, config, split, options, spec, root)
        if reuse:
            finished = _reusable(run_dir, key)
            if finished is not None:
                return finished
        state = {"options": options, "key": key, "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    strategy, batch_size, seed = options["strategy"], options["batch_size"], options["seed"]
    training = strategy != "head"

    if not resuming:
        out.mkdir(parents=True, exist_ok=True)
        _clear(out, ["backup", "history.csv", "best.weights.npz", "best.weights.h5", "pretrained.weights.npz",
                     "pretrained.weights.h5", "state.json", "split.json", "summary.json",
                     "validation_predictions.csv"])
        write_json(split_path, split.to_json())
        write_json(state_path, state)   # from here on --resume continues this call

    (x_train, y_train, train_rows), (x_val, y_val, val_rows), failed = decode_split(
        split, classes, spec.image_size, spec.resize, progress)
    if training:
        check_batch_size(len(x_train), batch_size)

    mixed = gpu_available()
    keras.utils.set_random_seed(seed)
    epoch_seconds: list[float] = []
    with dtype_policy(mixed):
        feature_model = build_feature_model(spec, root)
        head_source = "run" if split.source == "validation" else "refit"
        run_estimator = estimator
        if head_source == "refit":
            report(progress, "finetune", 0, 0, "refitting the head without the validation images")
            estimator = _refit_head(meta, config, feature_model, x_train, y_train, train_rows["hash"],
                                    train_rows["path"], classes, batch_size)
        if list(np.asarray(estimator.classes_)) != list(range(len(classes))):
            raise FeaturepipeError("the head was not trained on every class; re-run `featurepipe evaluate`")
        model = combine(feature_model, estimator)
        max_diff = _check_reproduces(model, feature_model, estimator, x_val, batch_size)
        jit = bool(mixed)
        proba_before = predict_proba(model, x_val, batch_size)
        before = scores(y_val, proba_before)
        blocks = options["unfreeze_blocks"]
        if blocks is None:
            blocks = default_unfreeze_blocks(spec.name, [layer.name for layer in base_model(model).layers])
        if strategy == "all":
            blocks = None

        history_path = out / "history.csv"
        best_path = out / "best.weights.npz"
        sequence = AugmentedImages(x_train, y_train, train_rows["hash"], batch_size, seed) if training else None
        hooks = EpochHooks(sequence, progress, "finetune", options["epochs"])
        timer = _EpochTimer(epoch_seconds)
        unfrozen: list[str] = []
        loss = smoothed_crossentropy(len(classes), options["label_smoothing"])

        def compile_model(rate) -> None:
            model.compile(optimizer=make_optimizer(options, rate), loss=loss, jit_compile=jit,
                          metrics=["accuracy", keras.metrics.SparseCategoricalCrossentropy(name="ce")])

        def fit(phase: str, phase_blocks: Optional[int], train_head: bool, rate: float, first: int, last: int,
                early_stop: bool, schedule_kind: str) -> None:
            nonlocal unfrozen
            unfrozen = set_trainable(model, spec.name, phase_blocks, train_head)
            compile_model(lr_schedule(rate, len(sequence), last - first, options["warmup_epochs"], schedule_kind))
            backup = out / "backup" / phase
            record, _ = read_backup(backup)
            start = restore_backup(model, backup, record) if record else first
            history = read_history(history_path)
            history = history[history["epoch"] < start] if len(history) else history
            best_so_far = best_row(history, monitor=MONITOR)
            cbs = [hooks, timer]
            if early_stop:
                phase_best = best_row(history, first, monitor=MONITOR)
                resumed = None
                if phase_best is not None:
                    resumed = (float(phase_best[MONITOR]), int(phase_best["epoch"]), int(start - 1 - phase_best["epoch"]))
                    if resumed[2] >= options["patience"]:
                        return          # it had already stopped early when it was interrupted
                cbs.append(_ResumableEarlyStopping(monitor=MONITOR, patience=options["patience"], state=resumed))
            cbs += [
                BestWeights(best_path, MONITOR, None if best_so_far is None else float(best_so_far[MONITOR])),
                HistoryLogger(history_path, append=True),
                *tensorboard_callbacks(run_dir / "logs"),
                # Last, so an epoch counts as done only once its best weights and history row exist.
                EpochBackup(backup),
                *callbacks,
            ]
            if start < last:
                model.fit(sequence, validation_data=(x_val, y_val), validation_batch_size=batch_size,
                          epochs=last, initial_epoch=start, callbacks=cbs, verbose=0)

        total = options["epochs"]
        if strategy == "fpt":
            warm = pretrain_epochs(total)
            pretrained = out / "pretrained.weights.npz"
            if state.get("pretrain_done") and pretrained.exists():
                model.set_weights(load_arrays(pretrained))
            else:
                fit("pretrain", 0, True, options["lr"] * PRETRAIN_LR_FACTOR, 0, warm, False, "constant")
                save_arrays_atomic(model.get_weights(), pretrained)
                state["pretrain_done"] = True
                write_json(state_path, state)
            fit("finetune", blocks, True, options["lr"], warm, total, True, options["schedule"])
        elif training:
            fit("finetune", blocks, True, options["lr"], 0, total, True, options["schedule"])

        history = tidy_history(history_path) if training else pd.DataFrame(columns=HISTORY_COLUMNS)
        best = best_row(history, monitor=MONITOR)
        if training and best_path.exists():
            model.set_weights(load_arrays(best_path))
        proba_after = predict_proba(model, x_val, batch_size) if training else proba_before
        after = scores(y_val, proba_after)
        n_trainable = trainable_params(model) if training else 0
        decision = compare(y_val, proba_before, proba_after, seed)
        if not training:
            decision.update(improved=False, reason="strategy head: no training, the frozen head exported as one model")
        kept = "finetuned" if decision["improved"] or not training else "frozen"
        test = None
        if len(split.test):
            # Scored once, after every choice above was made on the validation images.
            x_test, kept_test, test_failed = decode_frame(split.test, spec.image_size, spec.resize, progress,
                                                          "decode test")
            failed = failed + test_failed
            y_test = split.test["label"][kept_test].map({c: i for i, c in enumerate(classes)}).to_numpy(np.int32)
            frozen_model = combine(feature_model, run_estimator, name="frozen")
            test = {"images": int(len(y_test)),
                    "frozen": scores(y_test, predict_proba(frozen_model, x_test, batch_size)),
                    "finetuned": scores(y_test, predict_proba(model, x_test, batch_size)), "kept": kept}

    # Saved from a float32 twin: no optimizer state in the file, and a file trained under
    # mixed precision still runs in float32 where it is deployed (often a CPU). Strategy "head"
    # exports the run's own head (fitted on every training image); the refit one only scored it.
    with dtype_policy(False):
        twin = build_finetune_model(spec, estimator if training else run_estimator, root)
        if training:
            twin.set_weights(model.get_weights())
    model_path = out / MODEL_FILE
    digest = save_model_atomic(twin, model_path)
    resumed_from = (hooks.epochs[0] + 1) if resuming and hooks.epochs else None
    result = FinetuneReport(
        run_dir=run_dir, strategy=strategy, before=before, after=after, epochs_run=int(len(history)),
        best_epoch=None if best is None else int(best["epoch"]) + 1, model_path=model_path,
        seconds=time.perf_counter() - started, unfrozen_layers=unfrozen, trainable_params=n_trainable,
        train_images=int(len(x_train)), val_images=int(len(x_val)), validation=split.source,
        head_source=head_source, resumed_from_epoch=resumed_from, improved=bool(decision["improved"]),
        failed=failed, kept=kept, reason=decision["reason"], decision=decision, test=test,
        unfreeze_blocks=blocks, seconds_per_epoch=float(np.median(epoch_seconds)) if epoch_seconds else None,
        notes=notes, key=key,
    )
    pd.DataFrame({"path": val_rows["path"], "label": val_rows["label"],
                  "before_pred": [classes[i] for i in proba_before.argmax(axis=1)],
                  "after_pred": [classes[i] for i in proba_after.argmax(axis=1)],
                  "before_p_true": proba_before[np.arange(len(y_val)), y_val],
                  "after_p_true": proba_after[np.arange(len(y_val)), y_val]}).to_csv(
        out / "validation_predictions.csv", index=False)
    model_json = {
        "kind": "finetuned", "file": f"{FINETUNE_DIR}/{MODEL_FILE}", "sha256": digest, "classes": classes,
        "image_size": spec.image_size, "resize": spec.resize, "backbone": spec.to_dict(), "strategy": strategy,
        "input": "uint8 RGB images (n, image_size, image_size, 3) from featurepipe.images.decode_image",
        "output": "class probabilities (n, len(classes)) in `classes` order",
    }
    summary = {
        "before": before, "after": after, **options, "unfreeze_blocks": blocks,
        "unfreeze_blocks_option": options["unfreeze_blocks"], "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch, "improved": result.improved, "kept": kept, "reason": decision["reason"],
        "decision": decision, "test": test,
        "pretrain_epochs": pretrain_epochs(options["epochs"]) if strategy == "fpt" else 0,
        "pretrain_lr": options["lr"] * PRETRAIN_LR_FACTOR if strategy == "fpt" else None,
        "unfrozen_layers": unfrozen, "trainable_params": n_trainable,
        "train_images": result.train_images, "val_images": result.val_images, "validation": split.source,
        "head": {"name": meta["head"], "params": meta.get("params"), "augment": meta.get("augment"),
                 "source": result.head_source},
        "reproduction_max_abs_diff": max_diff, "mixed_precision": mixed, "jit_compile": jit,
        "backbone": spec.to_dict(), "classes": classes, "failed": failed,
        "model": f"{FINETUNE_DIR}/{MODEL_FILE}", "sha256": digest, "seconds": round(result.seconds, 3),
        "seconds_per_epoch": result.seconds_per_epoch, "notes": notes,
        "tensorboard": tensorboard_available() and training, "key": key, "model_json": model_json,
        "report": json.loads(json.dumps(result.to_dict(), default=str)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(out / "summary.json", summary)
    _publish(run_dir, summary)
    state["status"] = "done"
    write_json(state_path, state)
    _clear(out, ["backup"])
    return result


class _EpochTimer(keras.callbacks.Callback):
    """Wall seconds of each epoch (training + validation), for the report's time per epoch."""

    def __init__(self, sink: list[float]):
        super().__init__()
        self.sink, self._t0 = sink, 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.sink.append(time.perf_counter() - self._t0)
