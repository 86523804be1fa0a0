"""Stage `finetune`: the run's frozen base + its best head as ONE Keras model, trained on images.

The combined model starts as the evaluated head on the frozen base (checked numerically before any
training step), so fine-tuning never starts from a random head on an unfrozen base. Strategies:

- ``head``: no training; the combined model is evaluated and saved (a one-file export).
- ``top-blocks``: the top N blocks of the base (registry block boundaries) and the head train.
- ``fpt``: freeze, pre-train, fine-tune: the head alone trains end to end on augmented images at
  10x the rate for a few epochs, then the top blocks are unfrozen as in ``top-blocks``.
- ``all``: every base layer trains (keep the rate small).

BatchNormalization layers stay frozen everywhere (non-trainable = inference mode in Keras 3) and
the whole base runs with training=False (InferenceOnly wrapper): a few hundred images cannot
re-estimate ImageNet batch statistics, and their drift would wreck the pre-trained features.

Files under RUN_DIR/finetune/: split.json (train/validation images), state.json (options, for
--resume), history.csv, best.weights.h5 (best epoch by val_loss), backup/ (BackupAndRestore while
training), finetuned.keras and summary.json; RUN_DIR/model.json marks the fine-tuned model as the
run's model and RUN_DIR/logs holds TensorBoard logs (when tensorboard is installed).

Importing this module imports TensorFlow/Keras.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
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
from featurepipe.hashcache import file_sha256
from featurepipe.head_to_keras import InferenceOnly, head_to_keras
from featurepipe.images import AugmentPolicy, augment_image, decode_image, view_rng
from featurepipe.paths import cache_root
from featurepipe.progress import ProgressCallback, report

STRATEGIES = ("head", "top-blocks", "fpt", "all")
VALIDATION_FRACTION = 0.2
FINETUNE_DIR = "finetune"
MODEL_FILE = "finetuned.keras"
HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]
# fpt: the head-only phase runs this many times the fine-tuning rate, for at most this many epochs.
PRETRAIN_LR_FACTOR = 10.0
PRETRAIN_MAX_EPOCHS = 5
# The combined model must give the head's probabilities to float32 accuracy before training.
REPRODUCTION_TOLERANCE = 1e-4


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
    improved: bool = False            # after.val_loss < before.val_loss
    failed: list[dict] = field(default_factory=list)

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

    def to_json(self) -> dict:
        cols = ["path", "label", "hash"]
        return {"source": self.source, "seed": self.seed, "fraction": self.fraction,
                "train": self.train[cols].values.tolist(), "validation": self.validation[cols].values.tolist()}

    @classmethod
    def from_json(cls, data: dict) -> "ImageSplit":
        cols = ["path", "label", "hash"]
        return cls(data["source"], int(data["seed"]), float(data["fraction"]),
                   pd.DataFrame(data["train"], columns=cols), pd.DataFrame(data["validation"], columns=cols))


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
    if len(validation):
        missing = [c for c in classes if not (validation["label"] == c).any()]
        if missing:
            raise FeaturepipeError(
                f"the validation split has no image of class(es) {', '.join(map(repr, missing))}; every class "
                f"needs at least one validation image to measure fine-tuning: add some under "
                f"{dataset.source}/validation/<class>/")
        return ImageSplit("validation", seed, 0.0, train, validation)
    held = _holdout(train, classes, seed, fraction)
    return ImageSplit("holdout", seed, fraction, train[~held].reset_index(drop=True),
                      train[held].reset_index(drop=True))


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


class HistoryLogger(keras.callbacks.CSVLogger):
    """CSVLogger with the columns in HISTORY_COLUMNS order, and appending under an existing header
    in that header's order (CSVLogger would assume its own sorted order)."""

    def on_train_begin(self, logs=None):
        path = Path(self.filename)
        if self.append and path.exists() and path.stat().st_size:
            with open(path) as handle:
                header = handle.readline().strip().split(self.sep)
            self.keys = header[1:] if header and header[0] == "epoch" else None
        super().on_train_begin(logs)

    def on_epoch_end(self, epoch, logs=None):
        if self.keys is None and logs:
            self.keys = ([k for k in HISTORY_COLUMNS[1:] if k in logs]
                         + sorted(k for k in logs if k not in HISTORY_COLUMNS))
        super().on_epoch_end(epoch, logs)


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
    table = pd.read_csv(path)
    # A resumed fit re-logs the epoch that was running when it was interrupted: keep the last row.
    table = table.drop_duplicates("epoch", keep="last").sort_values("epoch").reset_index(drop=True)
    return table[[c for c in HISTORY_COLUMNS if c in table] + [c for c in table if c not in HISTORY_COLUMNS]]


def tidy_history(path: Path) -> pd.DataFrame:
    table = read_history(path)
    if len(table):
        table.to_csv(path, index=False)
    return table


def best_row(history: pd.DataFrame, since_epoch: int = 0) -> Optional[pd.Series]:
    rows = history[history["epoch"] >= since_epoch].dropna(subset=["val_loss"]) if len(history) else history
    if not len(rows):
        return None
    return rows.loc[rows["val_loss"].idxmin()]


def save_model_atomic(model, path: Path) -> str:
    """Write a .keras file atomically; returns its sha256."""
    tmp = path.with_name(f".tmp-{time.time_ns() % 10**8}-{path.name}")
    model.save(str(tmp))
    digest = file_sha256(tmp)
    tmp.replace(path)
    return digest


def evaluate_model(model, images: np.ndarray, labels: np.ndarray, batch_size: int) -> dict:
    scores = model.evaluate(images, labels.astype(np.int32), batch_size=batch_size, verbose=0, return_dict=True)
    return {"val_accuracy": float(scores["accuracy"]), "val_loss": float(scores["loss"])}


# ------------------------------------------------------------------------------------------------
# finetune


def _read_json(path: Path, missing: str) -> dict:
    if not path.exists():
        raise FeaturepipeError(missing)
    return json.loads(path.read_text())


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


def _options(strategy, unfreeze_blocks, epochs, lr, momentum, batch_size, patience, seed) -> dict:
    if strategy not in STRATEGIES:
        raise FeaturepipeError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if epochs < 1 or lr <= 0 or unfreeze_blocks < 0 or patience < 0 or batch_size < 1:
        raise FeaturepipeError("--epochs and --batch-size must be >= 1, --lr > 0, "
                               "--unfreeze-blocks and --patience >= 0")
    if strategy == "fpt" and epochs < 2:
        raise FeaturepipeError("strategy fpt needs --epochs 2 or more (head pre-training, then fine-tuning)")
    return {"strategy": strategy, "unfreeze_blocks": int(unfreeze_blocks), "epochs": int(epochs), "lr": float(lr),
            "momentum": float(momentum), "batch_size": int(batch_size), "patience": int(patience), "seed": int(seed)}


def pretrain_epochs(epochs: int) -> int:
    return min(PRETRAIN_MAX_EPOCHS, max(1, epochs // 3))


@quiet_retracing()
def finetune(
    run_dir,
    unfreeze_blocks: int = 1,
    epochs: int = 30,
    lr: float = 1e-4,
    momentum: float = 0.9,
    batch_size: int = 16,
    strategy: str = "top-blocks",
    patience: int = 5,
    resume: bool = False,
    seed: int = 0,
    cache_dir=None,
    progress: Optional[ProgressCallback] = None,
    callbacks: Sequence = (),
) -> FinetuneReport:
    """Fine-tune the run's base + best head on images; see the module docstring.

    resume=True continues an interrupted call with the options it was started with (from
    finetune/state.json; the options passed now are ignored). `callbacks` are extra Keras callbacks
    added to every fit (tests, custom logging).
    """
    from featurepipe.backbones.build import build_feature_model
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

    if resume:
        state = _read_json(state_path, f"nothing to resume in {out} (no interrupted fine-tuning found); "
                                       f"run without --resume")
        if state.get("status") == "done":
            raise FeaturepipeError(f"the fine-tuning in {out} already finished; run without --resume to start over")
        options = state["options"]
        split = ImageSplit.from_json(_read_json(split_path, f"{split_path} is missing; run without --resume"))
    else:
        options = _options(strategy, unfreeze_blocks, epochs, lr, momentum, batch_size, patience, seed)
        dataset = scan(config["dataset"]["source"], cache_dir=root, progress=progress)
        if list(dataset.classes) != classes:
            raise FeaturepipeError(
                f"the classes in {dataset.source} ({', '.join(dataset.classes)}) are not the run's "
                f"({', '.join(classes)}); re-run `featurepipe evaluate` first")
        split = make_split(dataset, options["seed"])
        state = {"options": options, "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    strategy, batch_size, seed = options["strategy"], options["batch_size"], options["seed"]
    training = strategy != "head"

    (x_train, y_train, train_rows), (x_val, y_val, val_rows), failed = decode_split(
        split, classes, spec.image_size, spec.resize, progress)
    if training:
        check_batch_size(len(x_train), batch_size)

    if not resume:
        out.mkdir(parents=True, exist_ok=True)
        _clear(out, ["backup", "history.csv", "best.weights.h5", "pretrained.weights.h5", "state.json", "split.json"])
        write_json(split_path, split.to_json())

    mixed = gpu_available()
    keras.utils.set_random_seed(seed)
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

        def compile_model(rate: float) -> None:
            model.compile(optimizer=keras.optimizers.SGD(learning_rate=rate, momentum=options["momentum"]),
                          loss="sparse_categorical_crossentropy", metrics=["accuracy"], jit_compile=jit)

        set_trainable(model, spec.name, 0, train_head=False)
        compile_model(options["lr"])
        if "before" not in state:
            state["before"] = evaluate_model(model, x_val, y_val, batch_size)
            state["head_source"] = head_source
            state["reproduction_max_abs_diff"] = max_diff
            write_json(state_path, state)
        before = state["before"]

        history_path = out / "history.csv"
        best_path = out / "best.weights.h5"
        sequence = AugmentedImages(x_train, y_train, train_rows["hash"], batch_size, seed) if training else None
        hooks = EpochHooks(sequence, progress, "finetune", options["epochs"])
        unfrozen: list[str] = []

        def fit(phase: str, blocks: Optional[int], train_head: bool, rate: float, first: int, last: int,
                early_stop: bool) -> None:
            nonlocal unfrozen
            unfrozen = set_trainable(model, spec.name, blocks, train_head)
            compile_model(rate)
            history = read_history(history_path)
            done_here = history[history["epoch"] >= first] if len(history) else history
            best_so_far = best_row(history)
            cbs = [hooks]
            if early_stop:
                phase_best = best_row(history, first)
                resumed = None
                if resume and phase_best is not None:
                    resumed = (float(phase_best["val_loss"]), int(phase_best["epoch"]),
                               int(done_here["epoch"].max() - phase_best["epoch"]))
                cbs.append(_ResumableEarlyStopping(monitor="val_loss", patience=options["patience"],
                                                   restore_best_weights=True, state=resumed))
            cbs += [
                keras.callbacks.ModelCheckpoint(
                    str(best_path), monitor="val_loss", save_best_only=True, save_weights_only=True,
                    initial_value_threshold=None if best_so_far is None else float(best_so_far["val_loss"])),
                HistoryLogger(str(history_path), append=True),
                *tensorboard_callbacks(run_dir / "logs"),
                # Last, so an epoch counts as done only once its checkpoint and history row exist.
                keras.callbacks.BackupAndRestore(str(out / "backup" / phase)),
                *callbacks,
            ]
            model.fit(sequence, validation_data=(x_val, y_val), validation_batch_size=batch_size,
                      epochs=last, initial_epoch=first, callbacks=cbs, verbose=0)

        total = options["epochs"]
        blocks = None if strategy == "all" else options["unfreeze_blocks"]
        if strategy == "fpt":
            warm = pretrain_epochs(total)
            pretrained = out / "pretrained.weights.h5"
            if state.get("pretrain_done") and pretrained.exists():
                model.load_weights(str(pretrained))
            else:
                fit("pretrain", 0, True, options["lr"] * PRETRAIN_LR_FACTOR, 0, warm, early_stop=False)
                model.save_weights(str(pretrained))
                state["pretrain_done"] = True
                write_json(state_path, state)
            fit("finetune", blocks, True, options["lr"], warm, total, early_stop=True)
        elif training:
            fit("finetune", blocks, True, options["lr"], 0, total, early_stop=True)
        else:
            unfrozen = []

        history = tidy_history(history_path) if training else pd.DataFrame(columns=HISTORY_COLUMNS)
        best = best_row(history)
        if training and best_path.exists():
            model.load_weights(str(best_path))
        after = evaluate_model(model, x_val, y_val, batch_size) if training else dict(before)
        n_trainable = trainable_params(model) if training else 0

    # Saved from a float32 twin: no optimizer state in the file, and a file trained under
    # mixed precision still runs in float32 where it is deployed (often a CPU). Strategy "head"
    # exports the run's own head (fitted on every training image); the refit one only scored it.
    with dtype_policy(False):
        twin = build_finetune_model(spec, estimator if training else run_estimator, root)
        if training:
            twin.set_weights(model.get_weights())
    model_path = out / MODEL_FILE
    digest = save_model_atomic(twin, model_path)
    resumed_from = (hooks.epochs[0] + 1) if resume and hooks.epochs else None
    result = FinetuneReport(
        run_dir=run_dir, strategy=strategy, before=before, after=after, epochs_run=int(len(history)),
        best_epoch=None if best is None else int(best["epoch"]) + 1, model_path=model_path,
        seconds=time.perf_counter() - started, unfrozen_layers=unfrozen, trainable_params=n_trainable,
        train_images=int(len(x_train)), val_images=int(len(x_val)), validation=split.source,
        head_source=state.get("head_source", head_source), resumed_from_epoch=resumed_from,
        improved=bool(after["val_loss"] < before["val_loss"]), failed=failed,
    )
    write_json(out / "summary.json", {
        "before": before, "after": after, **options, "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
        "pretrain_epochs": pretrain_epochs(options["epochs"]) if strategy == "fpt" else 0,
        "pretrain_lr": options["lr"] * PRETRAIN_LR_FACTOR if strategy == "fpt" else None,
        "improved": result.improved, "unfrozen_layers": unfrozen, "trainable_params": n_trainable,
        "train_images": result.train_images, "val_images": result.val_images, "validation": split.source,
        "head": {"name": meta["head"], "params": meta.get("params"), "augment": meta.get("augment"),
                 "source": result.head_source},
        "reproduction_max_abs_diff": state.get("reproduction_max_abs_diff"), "mixed_precision": mixed,
        "jit_compile": jit, "optimizer": "sgd", "backbone": spec.to_dict(), "classes": classes, "failed": failed,
        "model": f"{FINETUNE_DIR}/{MODEL_FILE}", "seconds": round(result.seconds, 3),
        "tensorboard": tensorboard_available() and training,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    write_json(run_dir / MODEL_META, {
        "kind": "finetuned", "file": f"{FINETUNE_DIR}/{MODEL_FILE}", "sha256": digest, "classes": classes,
        "image_size": spec.image_size, "resize": spec.resize, "backbone": spec.to_dict(), "strategy": strategy,
        "input": "uint8 RGB images (n, image_size, image_size, 3) from featurepipe.images.decode_image",
        "output": "class probabilities (n, len(classes)) in `classes` order",
    })
    state["status"] = "done"
    write_json(state_path, state)
    _clear(out, ["backup"])
    return result
