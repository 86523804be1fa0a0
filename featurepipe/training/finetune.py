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
the whole base runs with training=False (InferenceMode wrapper): a few hundred images cannot
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
while training, featurepipe.training.checkpoints), finetuned.keras, validation_predictions.csv (per image,
before and after) and summary.json; RUN_DIR/logs holds TensorBoard logs (when tensorboard is
installed). --resume continues from the last finished epoch after a kill at any point, and starts
over (saying so) when there is nothing usable to continue from.

Importing this module imports TensorFlow/Keras.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import keras
import numpy as np
import pandas as pd

from featurepipe.core import atomic
from featurepipe.core.atomic import write_json
from featurepipe.training.finetune_vote import Vote, open_vote, vote_proba
from featurepipe.rundir.run import CONFIG, FINETUNE_DIR, MODEL_META, load_head, read_json
from featurepipe.backbones.accel import gpu_available
from featurepipe.backbones.registry import CONCAT
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.heads.combined import (
    base_model, build_finetune_model, combine, default_unfreeze_blocks, set_trainable, trainable_params,
)
from featurepipe.core.errors import FeaturepipeError
from featurepipe.training.compare import compare, scores
from featurepipe.core.hashcache import file_sha256
from featurepipe.training.split import ImageSplit, decode_frame, decode_split, make_split
from featurepipe.data.augment import AugmentSpec, augment_image, view_rng
from featurepipe.core.cachedirs import cache_root
from featurepipe.core.progress import ProgressCallback, report
from featurepipe.training.keras_fit import (
    HISTORY_COLUMNS, AugmentedImages, EpochHooks, EpochTimer, HistoryLogger, ResumableEarlyStopping, best_row,
    check_batch_size, dtype_policy, lr_schedule, make_optimizer, predict_proba, quiet_retracing,
    read_history, save_model_atomic, smoothed_crossentropy, tensorboard_available, tensorboard_callbacks,
    tidy_history,
)

STRATEGIES = ("head", "top-blocks", "fpt", "all")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
MODEL_FILE = "finetuned.keras"
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
# finetune


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
    from featurepipe.evaluation.crossval import FeatureTable, refit

    def features(batch):
        return np.asarray(feature_model.predict(batch, batch_size=batch_size, verbose=0), dtype=np.float32)

    views = None
    if meta.get("augment") == "views":
        augment = AugmentSpec.from_config(config)
        views = np.stack([features(np.stack([augment_image(img, augment.policy, view_rng(h, k, augment.seed))
                                             for img, h in zip(images, hashes)]))
                          for k in range(augment.count)], axis=1)
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



# ------------------------------------------------------------------------------------------------
# the stage: prepare (what to start from), train (the combined model), save (files + decision)


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

    @property
    def out(self) -> Path:
        return self.run_dir / FINETUNE_DIR

    @property
    def state_path(self) -> Path:
        return self.out / "state.json"


@dataclass
class _Trained:
    """What training produced (validation and test scores included), before anything is saved."""

    model: Any                       # the trained (or, for strategy head, untouched) combined model
    estimator: Any                   # the head it started from (refit without the holdout, or the run's)
    head_source: str
    x_train_count: int
    y_val: np.ndarray
    val_rows: pd.DataFrame
    proba_before: np.ndarray
    proba_after: np.ndarray
    before: dict
    after: dict
    history: pd.DataFrame
    best: Optional[pd.Series]
    blocks: Optional[int]
    unfrozen: list[str]
    n_trainable: int
    decision: dict
    kept: str
    test: Optional[dict]
    failed: list[dict]
    max_diff: float
    mixed: bool
    jit: bool
    epoch_seconds: list[float]
    trained_epochs: list[int]        # 0-based epochs this call ran


def _prepare(run_dir: Path, requested: dict, resume: bool, reuse: bool, cache_dir,
             progress: Optional[ProgressCallback]) -> Union["_Prepared", FinetuneReport]:
    """Read the run, choose or restore the split and options; a FinetuneReport when a finished
    fine-tuning with the same key is reused. Writes split.json and state.json for a fresh start."""
    from featurepipe.training.checkpoints import read_backup, remove_temporaries
    from featurepipe.data.dataset import scan

    out = run_dir / FINETUNE_DIR
    config = read_json(run_dir / CONFIG,
                        f"{run_dir} has no config.json; pass a run directory written by `featurepipe evaluate`")
    notes: list[str] = []
    vote = open_vote(run_dir)
    if vote is None:
        estimator, meta = load_head(run_dir)
    else:
        if requested.get("strategy") == "head":
            raise FeaturepipeError(f"{run_dir}'s model is a vote over {len(vote.members)} feature sets; strategy "
                                   f"'head' would replace it with one frozen member. `featurepipe export` writes "
                                   f"the vote itself as one model")
        estimator, meta = vote.started_from.estimator, vote.started_from.meta
        notes.append(vote.note())
    classes = list(meta["classes"])
    spec = BackboneSpec.from_dict(meta["backbone"]).resolved()
    if CONCAT in spec.name:
        raise FeaturepipeError(f"{run_dir}'s model stands on {spec.name}, a concatenation of backbones; fine-tuning "
                               f"trains one backbone's top blocks, so fine-tune a run of one of its parts (e.g. "
                               f"`featurepipe run DATA --backbone {spec.name.split(CONCAT)[0]}`)")
    root = cache_root(cache_dir if cache_dir is not None else config.get("cache_dir"))
    state_path, split_path = out / "state.json", out / "split.json"
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
        options = _options(**requested)
        dataset = scan(config["dataset"]["source"], cache_dir=root, progress=progress)
        if list(dataset.classes) != classes:
            raise FeaturepipeError(
                f"the classes in {dataset.source} ({', '.join(dataset.classes)}) are not the run's "
                f"({', '.join(classes)}); re-run `featurepipe evaluate` first")
        split = make_split(dataset, options["seed"])
        # A vote's fine-tuning is judged against the vote: a different vote is a different fine-tuning.
        key_meta = meta if vote is None else {**meta, "sha256": f"{meta.get('sha256')}+vote:{vote.meta.get('hmac')}"}
        key = finetune_key(key_meta, config, split, options, spec, root)
        if reuse:
            finished = _reusable(run_dir, key)
            if finished is not None:
                return finished
        state = {"options": options, "key": key, "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        out.mkdir(parents=True, exist_ok=True)
        _clear(out, ["backup", "history.csv", "best.weights.npz", "best.weights.h5", "pretrained.weights.npz",
                     "pretrained.weights.h5", "state.json", "split.json", "summary.json",
                     "validation_predictions.csv"])
        write_json(split_path, split.to_json())
        write_json(state_path, state)   # from here on --resume continues this call
    return _Prepared(run_dir, config, estimator, meta, classes, spec, root, split, options, key, state, resuming,
                     notes, vote)


def _train(prep: _Prepared, progress: Optional[ProgressCallback], callbacks: Sequence) -> _Trained:
    """Decode the split, build the combined model from the head (checked to reproduce it), train it
    as the strategy says (with crash-safe epoch backups), restore the best epoch, and score it
    before/after on the validation images and, once, on the test split."""
    from featurepipe.backbones.build import build_feature_model
    from featurepipe.training.checkpoints import BestWeights, EpochBackup, load_arrays, read_backup, restore_backup, save_arrays_atomic

    options, split, classes, spec, out = prep.options, prep.split, prep.classes, prep.spec, prep.out
    strategy, batch_size, seed = options["strategy"], options["batch_size"], options["seed"]
    training = strategy != "head"
    (x_train, y_train, train_rows), (x_val, y_val, val_rows), failed = decode_split(
        split, classes, spec.image_size, spec.resize, progress)
    if training:
        check_batch_size(len(x_train), batch_size)

    mixed = gpu_available()
    keras.utils.set_random_seed(seed)
    epoch_seconds: list[float] = []
    with dtype_policy(mixed):
        feature_model = build_feature_model(spec, prep.root)
        head_source = "run" if split.source == "validation" else "refit"
        estimator = prep.estimator
        if head_source == "refit":
            report(progress, "finetune", 0, 0, "refitting the head without the validation images")
            estimator = _refit_head(prep.meta, prep.config, feature_model, x_train, y_train, train_rows["hash"],
                                    train_rows["path"], classes, batch_size)
        if list(np.asarray(estimator.classes_)) != list(range(len(classes))):
            raise FeaturepipeError("the head was not trained on every class; re-run `featurepipe evaluate`")
        model = combine(feature_model, estimator)
        max_diff = _check_reproduces(model, feature_model, estimator, x_val, batch_size)
        jit = bool(mixed)
        proba_before = predict_proba(model, x_val, batch_size)
        if prep.vote is not None:   # the run's model is the vote: that is what fine-tuning must beat
            proba_before = vote_proba(prep.vote, prep.root, val_rows["hash"].tolist(), len(classes),
                                      (train_rows["hash"].tolist(), y_train) if head_source == "refit" else None,
                                      int(prep.config.get("seed", 0)))
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
        timer = EpochTimer(epoch_seconds)
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
                cbs.append(ResumableEarlyStopping(monitor=MONITOR, patience=options["patience"], state=resumed))
            cbs += [
                BestWeights(best_path, MONITOR, None if best_so_far is None else float(best_so_far[MONITOR])),
                HistoryLogger(history_path, append=True),
                *tensorboard_callbacks(prep.run_dir / "logs"),
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
            if prep.state.get("pretrain_done") and pretrained.exists():
                model.set_weights(load_arrays(pretrained))
            else:
                fit("pretrain", 0, True, options["lr"] * PRETRAIN_LR_FACTOR, 0, warm, False, "constant")
                save_arrays_atomic(model.get_weights(), pretrained)
                prep.state["pretrain_done"] = True
                write_json(prep.state_path, prep.state)
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
            if prep.vote is not None:
                frozen = vote_proba(prep.vote, prep.root, split.test["hash"][kept_test].tolist(), len(classes))
            else:
                frozen = predict_proba(combine(feature_model, prep.estimator, name="frozen"), x_test, batch_size)
            test = {"images": int(len(y_test)),
                    "frozen": scores(y_test, frozen),
                    "finetuned": scores(y_test, predict_proba(model, x_test, batch_size)), "kept": kept}
    return _Trained(model, estimator, head_source, int(len(x_train)), y_val, val_rows, proba_before, proba_after,
                    before, after, history, best, blocks, unfrozen, n_trainable, decision, kept, test, failed,
                    max_diff, mixed, jit, epoch_seconds, hooks.epochs)


def _save(prep: _Prepared, trained: _Trained, started: float) -> FinetuneReport:
    """finetuned.keras (float32), validation_predictions.csv and summary.json; model.json when the
    fine-tuned model is kept; then state.json says done and the epoch backups go."""
    options, classes, spec, out, split = prep.options, prep.classes, prep.spec, prep.out, prep.split
    strategy = options["strategy"]
    training = strategy != "head"
    t = trained
    # Saved from a float32 twin: no optimizer state in the file, and a file trained under
    # mixed precision still runs in float32 where it is deployed (often a CPU). Strategy "head"
    # exports the run's own head (fitted on every training image); the refit one only scored it.
    with dtype_policy(False):
        twin = build_finetune_model(spec, t.estimator if training else prep.estimator, prep.root)
        if training:
            twin.set_weights(t.model.get_weights())
    model_path = out / MODEL_FILE
    digest = save_model_atomic(twin, model_path)
    resumed_from = (t.trained_epochs[0] + 1) if prep.resuming and t.trained_epochs else None
    result = FinetuneReport(
        run_dir=prep.run_dir, strategy=strategy, before=t.before, after=t.after, epochs_run=int(len(t.history)),
        best_epoch=None if t.best is None else int(t.best["epoch"]) + 1, model_path=model_path,
        seconds=time.perf_counter() - started, unfrozen_layers=t.unfrozen, trainable_params=t.n_trainable,
        train_images=t.x_train_count, val_images=int(len(t.y_val)), validation=split.source,
        head_source=t.head_source, resumed_from_epoch=resumed_from, improved=bool(t.decision["improved"]),
        failed=t.failed, kept=t.kept, reason=t.decision["reason"], decision=t.decision, test=t.test,
        unfreeze_blocks=t.blocks, seconds_per_epoch=float(np.median(t.epoch_seconds)) if t.epoch_seconds else None,
        notes=prep.notes, key=prep.key,
    )
    y_val, proba_before, proba_after = t.y_val, t.proba_before, t.proba_after
    atomic.write_csv(out / "validation_predictions.csv", pd.DataFrame({
        "path": t.val_rows["path"], "label": t.val_rows["label"],
        "before_pred": [classes[i] for i in proba_before.argmax(axis=1)],
        "after_pred": [classes[i] for i in proba_after.argmax(axis=1)],
        "before_p_true": proba_before[np.arange(len(y_val)), y_val],
        "after_p_true": proba_after[np.arange(len(y_val)), y_val]}))
    model_json = {
        "kind": "finetuned", "file": f"{FINETUNE_DIR}/{MODEL_FILE}", "sha256": digest, "classes": classes,
        "image_size": spec.image_size, "resize": spec.resize, "backbone": spec.to_dict(), "strategy": strategy,
        "input": "uint8 RGB images (n, image_size, image_size, 3) from featurepipe.images.decode_image",
        "output": "class probabilities (n, len(classes)) in `classes` order",
    }
    summary = {
        "before": t.before, "after": t.after, **options, "unfreeze_blocks": t.blocks,
        "unfreeze_blocks_option": options["unfreeze_blocks"], "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch, "improved": result.improved, "kept": t.kept, "reason": t.decision["reason"],
        "decision": t.decision, "test": t.test,
        "pretrain_epochs": pretrain_epochs(options["epochs"]) if strategy == "fpt" else 0,
        "pretrain_lr": options["lr"] * PRETRAIN_LR_FACTOR if strategy == "fpt" else None,
        "unfrozen_layers": t.unfrozen, "trainable_params": t.n_trainable,
        "train_images": result.train_images, "val_images": result.val_images, "validation": split.source,
        "head": {"name": prep.meta["head"], "params": prep.meta.get("params"), "augment": prep.meta.get("augment"),
                 "source": result.head_source},
        "vote": None if prep.vote is None else {
            "members": [m.features for m in prep.vote.members], "started_from": prep.vote.started_from.features,
            "before_is": "the vote's probabilities (the run's model), not the started-from member's"},
        "reproduction_max_abs_diff": t.max_diff, "mixed_precision": t.mixed, "jit_compile": t.jit,
        "backbone": spec.to_dict(), "classes": classes, "failed": t.failed,
        "model": f"{FINETUNE_DIR}/{MODEL_FILE}", "sha256": digest, "seconds": round(result.seconds, 3),
        "seconds_per_epoch": result.seconds_per_epoch, "notes": prep.notes,
        "tensorboard": tensorboard_available() and training, "key": prep.key, "model_json": model_json,
        "report": json.loads(json.dumps(result.to_dict(), default=str)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(out / "summary.json", summary)
    _publish(prep.run_dir, summary)
    prep.state["status"] = "done"
    write_json(prep.state_path, prep.state)
    _clear(out, ["backup"])
    return result


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
    Three steps: _prepare (the run, the split, the options; reuse), _train, _save.
    """
    started = time.perf_counter()
    requested = dict(strategy=strategy, unfreeze_blocks=unfreeze_blocks, epochs=epochs, lr=lr, optimizer=optimizer,
                     momentum=momentum, weight_decay=weight_decay, label_smoothing=label_smoothing,
                     warmup_epochs=warmup_epochs, schedule=schedule, batch_size=batch_size, patience=patience,
                     seed=seed)
    prepared = _prepare(Path(run_dir), requested, resume, reuse, cache_dir, progress)
    if isinstance(prepared, FinetuneReport):
        return prepared
    return _save(prepared, _train(prepared, progress, callbacks), started)
