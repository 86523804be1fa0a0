"""Stage `baseline`: the seeds' small convnet trained from scratch, as the yardstick for transfer.

The Keras blog's "cats vs dogs" network (3 x [Conv 3x3 relu + MaxPool 2x2] with 32/32/64 filters,
Flatten, Dense(64) relu, Dropout(0.5), softmax; RMSprop; pixels scaled by 1/255) on the same
augmented images and the same validation split as `featurepipe finetune`, so its val accuracy and
loss compare directly with the fine-tuned model's.

Files under RUN_DIR/baseline/: split.json, history.csv, best.weights.h5, baseline.keras (uint8
images in, probabilities out, loads with safe_mode=True) and summary.json.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import keras
import numpy as np

from featurepipe.core import trust
from featurepipe.core.atomic import write_json
from featurepipe.backbones.accel import gpu_available
from featurepipe.data.dataset import Dataset
from featurepipe.core.errors import FeaturepipeError
from featurepipe.training.split import decode_split, make_split
from featurepipe.training.keras_fit import (
    AugmentedImages, EpochHooks, HistoryLogger, best_row, check_batch_size, dtype_policy, evaluate_model,
    quiet_retracing, save_model_atomic, tensorboard_callbacks, tidy_history,
)
from featurepipe.core.cachedirs import cache_root
from featurepipe.rundir.layout import BASELINE_DIR, BASELINE_MODEL, BASELINE_WEIGHTS, HISTORY, LOGS_DIR, SPLIT, SUMMARY
from featurepipe.rundir.folder import new_run_dir
from featurepipe.core.progress import ProgressCallback

LEARNING_RATE = 1e-3   # RMSprop's default, as in the blog post
# Three valid 3x3 convs each followed by a 2x2 pool need at least this many pixels.
MIN_IMAGE_SIZE = 22


@dataclass
class BaselineReport:
    run_dir: Path
    after: dict                       # {"val_accuracy", "val_loss"} of the best epoch (by val_loss)
    epochs_run: int
    best_epoch: Optional[int]         # 1-based
    model_path: Path
    seconds: float
    image_size: int
    train_images: int = 0
    val_images: int = 0
    validation: str = "validation"    # "validation": the dataset's split; "holdout": 20% of train
    trainable_params: int = 0
    failed: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(run_dir=str(self.run_dir), model_path=str(self.model_path), seconds=round(self.seconds, 3))
        return data


def build_small_convnet(image_size: int, n_classes: int, name: str = "baseline"):
    layers = keras.layers
    images = keras.Input((image_size, image_size, 3), dtype="uint8", name="images")
    x = layers.Rescaling(1.0 / 255, name="rescale")(images)
    for index, filters in enumerate((32, 32, 64), start=1):
        x = layers.Conv2D(filters, 3, activation="relu", name=f"conv{index}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{index}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(64, activation="relu", name="fc")(x)
    x = layers.Dropout(0.5, name="dropout")(x)
    # float32 output under mixed precision: a float16 softmax underflows and the loss goes NaN.
    outputs = layers.Dense(n_classes, activation="softmax", name="probabilities", dtype="float32")(x)
    return keras.Model(images, outputs, name=name)


@quiet_retracing()
def baseline(
    dataset: Dataset,
    image_size: int = 150,
    epochs: int = 30,
    batch_size: int = 16,
    seed: int = 0,
    run_dir: Optional[str | os.PathLike] = None,
    progress: Optional[ProgressCallback] = None,
    cache_dir=None,
    callbacks: Sequence = (),
) -> BaselineReport:
    """Train the small convnet from scratch on `dataset` (squash-resized to image_size) and save it.

    Without run_dir, a new run directory is made under the cache's runs/ folder.
    """
    started = time.perf_counter()
    if image_size < MIN_IMAGE_SIZE:
        raise FeaturepipeError(f"the baseline convnet needs --image-size {MIN_IMAGE_SIZE} or more, not {image_size}")
    if epochs < 1:
        raise FeaturepipeError(f"--epochs must be at least 1, not {epochs}")
    classes = list(dataset.classes)
    split = make_split(dataset, seed)
    (x_train, y_train, train_rows), (x_val, y_val, _), failed = decode_split(
        split, classes, image_size, "squash", progress)
    check_batch_size(len(x_train), batch_size)

    run_dir = new_run_dir(cache_root(cache_dir), dataset.source, "baseline", run_dir)  # refuses a user's folder
    out = trust.writable(run_dir, BASELINE_DIR, folder=True)   # refused when it links out of the run
    for stale in (HISTORY, BASELINE_WEIGHTS):
        (out / stale).unlink(missing_ok=True)
    write_json(out / SPLIT, split.to_json())

    mixed = gpu_available()
    keras.utils.set_random_seed(seed)
    with dtype_policy(mixed):
        model = build_small_convnet(image_size, len(classes))
        model.compile(optimizer=keras.optimizers.RMSprop(learning_rate=LEARNING_RATE),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"], jit_compile=bool(mixed))
        sequence = AugmentedImages(x_train, y_train, train_rows["hash"], batch_size, seed)
        best_path = out / BASELINE_WEIGHTS
        model.fit(sequence, validation_data=(x_val, y_val), validation_batch_size=batch_size, epochs=epochs,
                  verbose=0, callbacks=[
                      EpochHooks(sequence, progress, "baseline", epochs),
                      keras.callbacks.ModelCheckpoint(str(best_path), monitor="val_loss", save_best_only=True,
                                                      save_weights_only=True),
                      HistoryLogger(str(out / HISTORY)),
                      *tensorboard_callbacks(trust.writable(run_dir, f"{LOGS_DIR}/{BASELINE_DIR}")),
                      *callbacks,
                  ])
        if best_path.exists():
            model.load_weights(str(best_path))
        after = evaluate_model(model, x_val, y_val, batch_size)
        weights = model.get_weights()
        n_trainable = int(sum(np.prod(v.shape) for v in model.trainable_weights))
    with dtype_policy(False):
        twin = build_small_convnet(image_size, len(classes))
        twin.set_weights(weights)
    model_path = out / BASELINE_MODEL
    digest = save_model_atomic(twin, model_path)
    history = tidy_history(out / HISTORY)
    best = best_row(history)
    result = BaselineReport(
        run_dir=run_dir, after=after, epochs_run=int(len(history)),
        best_epoch=None if best is None else int(best["epoch"]) + 1, model_path=model_path,
        seconds=time.perf_counter() - started, image_size=image_size, train_images=int(len(x_train)),
        val_images=int(len(x_val)), validation=split.source, trainable_params=n_trainable, failed=failed,
    )
    write_json(out / SUMMARY, {
        "after": after, "epochs": epochs, "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
        "image_size": image_size, "resize": "squash", "batch_size": batch_size, "seed": seed,
        "optimizer": "rmsprop", "lr": LEARNING_RATE, "train_images": result.train_images,
        "val_images": result.val_images, "validation": split.source, "classes": classes,
        "dataset": str(Path(dataset.source)), "trainable_params": n_trainable, "mixed_precision": mixed,
        "model": f"{BASELINE_DIR}/{BASELINE_MODEL}", "sha256": digest,
        "failed": failed, "seconds": round(result.seconds, 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    return result
