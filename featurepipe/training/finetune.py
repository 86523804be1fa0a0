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

Defaults (chosen by measurement, benchmarks/finetune_gain.py, student_folds.py and wise_probe.py): AdamW (lr 1e-4,
weight decay 1e-4), one warm-up epoch then a cosine decay to 0, no label smoothing (--label-smoothing; 0.1 measured
worse), training images mirrored at random (--train-augment flip), at most 12 epochs with early stopping (patience 4)
on the plain validation cross-entropy, the best epoch restored and averaged half and half with the starting
weights (--wise 0.5). The seeds'
recipe (SGD 1e-4, momentum 0.9, constant rate, one block) stays available by options. Mixed
precision and XLA are used on a GPU only.

BatchNormalization layers stay frozen everywhere (non-trainable = inference mode in Keras 3) and
the whole base runs with training=False (InferenceMode wrapper): a few hundred images cannot
re-estimate ImageNet batch statistics, and their drift would wreck the pre-trained features.

Honest before/after: the frozen head and the fine-tuned model score the SAME validation images
(the dataset's validation split, or 20% of train held out, with the head refit without them) and
training.compare decides, image by image, whether the change is beyond noise. Only then does the
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

The stage's pieces: finetune_options (options, defaults, FinetuneReport), finetune_state (the key,
resume state, reuse of a finished fine-tuning), finetune_start (the combined model from the head),
finetune_fit (the training phases); this module prepares, trains, scores and saves.

Importing this module imports TensorFlow/Keras.
"""

from __future__ import annotations

import fcntl
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import keras
import numpy as np
import pandas as pd

from featurepipe.core import csvcells, trust
from featurepipe.core.atomic import write_json
from featurepipe.training.finetune_vote import choose_student, open_vote, vote_proba
from featurepipe.rundir.layout import (BACKUP_DIR, BEST_WEIGHTS, CONFIG, FINETUNE_DIR, FINETUNED_MODEL, HISTORY,
                                       OLD_FINETUNE_WEIGHTS, PRETRAINED_WEIGHTS, SPLIT, STATE, SUMMARY,
                                       TEACHER_TARGETS, VALIDATION_PREDICTIONS)
from featurepipe.rundir.folder import read_json
from featurepipe.rundir.heads_io import load_head
from featurepipe.rundir.run import Run
from featurepipe.backbones.accel import gpu_available
from featurepipe.backbones.registry import CONCAT
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.heads.combined import (
    base_model, build_finetune_model, combine, default_unfreeze_blocks, trainable_params,
)
from featurepipe.core.errors import FeaturepipeError
from featurepipe.training.compare import compare, scores
from featurepipe.training.config import AUTO_FOLDS, FinetuneConfig
from featurepipe.training.finetune_fit import _Fitting, _run_phases, weight_average
from featurepipe.training.finetune_options import (
    MONITOR, PRETRAIN_LR_FACTOR, FinetuneReport, StateError, _options, pretrain_epochs, resumed_options,
)
from featurepipe.training.finetune_start import _start_from_head
from featurepipe.training.finetune_state import (
    _Prepared, _clear, _publish, _read_optional_json, _reusable, finetune_key,
)
from featurepipe.training import finetune_folds
from featurepipe.training.split import FOLDS_SOURCE, ImageSplit, decode_frame, decode_split, fold_splits, make_split
from featurepipe.core.cachedirs import cache_root
from featurepipe.rundir.folder import run_cache_root
from featurepipe.core.progress import NOTICE, ProgressCallback, report
from featurepipe.training import finetune_cost
from featurepipe.data.augment import TRAINING_POLICIES
from featurepipe.training.distill import one_hot, soft_targets
from featurepipe.training.keras_fit import (
    HISTORY_COLUMNS, AugmentedImages, EpochHooks, EpochTimer, best_row, check_batch_size, dtype_policy,
    predict_proba, quiet_retracing, save_model_atomic, tensorboard_available, tidy_history,
)


# ------------------------------------------------------------------------------------------------
# the stage: prepare (what to start from), train (the combined model), save (files + decision)


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
    targets: Any = None              # training.distill.Targets the training images were trained on
    train_rows: Any = None           # the training images (path, label, hash), in the targets' order
    train_labels: Any = None
    estimate: Optional[dict] = None  # training.finetune_cost.estimate, said before training
    # Per test image: hash, label index and both models' probabilities (what --finetune-folds pools).
    test_detail: Optional[dict] = None



def _prepare(run_dir: Path, requested: FinetuneConfig, cache_dir,
             progress: Optional[ProgressCallback], split_for: Optional[Callable] = None,
             fold_dir: Optional[str] = None) -> Union["_Prepared", FinetuneReport]:
    """Read the run, choose or restore the split and options; a FinetuneReport when a finished
    fine-tuning with the same key is reused. Writes split.json and state.json for a fresh start.

    One outer fold of --finetune-folds (training.finetune_folds) passes `split_for` (dataset -> its
    ImageSplit) and `fold_dir` (its folder inside the run, e.g. finetune/folds/fold-1): it trains and
    writes there, and is never resumed or reused here (the fold runner keeps finished folds)."""
    from featurepipe.training.checkpoints import read_backup, remove_temporaries
    from featurepipe.data.dataset import scan

    # Refused before anything is cleared or written when finetune/ (or a file in it) links out of the run.
    out = trust.writable(run_dir, FINETUNE_DIR, folder=True)
    if fold_dir is not None:
        out = trust.writable(run_dir, fold_dir, folder=True)
    config = read_json(run_dir / CONFIG,
                        f"{run_dir} has no config.json; pass a run directory written by `featurepipe evaluate`")
    Run(run_dir).check_signatures(names=(CONFIG,))    # which cache and images: refused when edited
    notes: list[str] = []
    vote = open_vote(run_dir)
    # --student: the member to train (a resumed call keeps the one it started with).
    member = requested.member
    if requested.resume:
        interrupted = _read_optional_json(out / STATE)
        if interrupted is not None and isinstance(interrupted.get("options"), dict):
            member = interrupted["options"].get("member")
    if member and vote is None:
        raise FeaturepipeError(f"--student {member}: {run_dir}'s model is one head, not a vote; there is no member "
                               f"to choose")
    if member:
        vote = choose_student(vote, member)
    if vote is None:
        estimator, meta = load_head(run_dir)
    else:
        if requested.strategy == "head":
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
    # The cache the run lives in when it was copied with its project (rundir.folder.run_cache_root).
    chosen, cache_note = run_cache_root(run_dir, config.get("cache_dir"), cache_dir)
    root = cache_root(chosen)
    state_path, split_path = out / STATE, out / SPLIT
    remove_temporaries(out)

    state = _read_optional_json(state_path) if requested.resume else None
    if requested.resume and state is not None and state.get("status") == "done":
        finished = _reusable(run_dir, state.get("key", ""))
        if finished is not None:
            return finished
        notes.append("the finished fine-tuning's files were incomplete: started over")
        state = None
    split = None
    if state is not None:
        split_data = _read_optional_json(split_path)
        damaged = [reason for phase in ("pretrain", "finetune") for reason in [read_backup(out / BACKUP_DIR / phase)[1]]
                   if reason]
        if split_data is None or "options" not in state or "key" not in state:
            notes.append(f"{state_path} or {split_path} was incomplete: started over")
            state = None
        elif damaged:
            notes.append(f"the epoch backup is damaged ({damaged[0]}): started over")
            state = None
        else:
            try:
                state = {**state, "options": resumed_options(state["options"])}
                split = ImageSplit.from_json(split_data)
            except StateError as error:
                notes.append(f"{state_path} cannot be resumed ({error}): started over")
                state = None
            # resumed_options raises StateError only: these are split.json's.
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                notes.append(f"{split_path} cannot be resumed (damaged: {type(error).__name__} {error}): started over")
                state = None
    elif requested.resume:
        notes.append("no interrupted fine-tuning state found (it was stopped before writing state.json): started over")
    resuming = state is not None

    if resuming:
        options, key = state["options"], state["key"]
    else:
        options = _options(requested)
        if options["folds"] is None:
            options["folds"] = requested.folds_for(gpu_available())
            notes.append(f"--finetune-folds {AUTO_FOLDS} by default on a GPU: the student and the vote scored on every "
                         f"training image" if options["folds"] else
                         "the validation images decided (the default on a CPU); `--finetune-folds 5` scores the "
                         "student and the frozen model on every training image instead, at 5 more fine-tunings' time")
        dataset = scan(config["dataset"]["source"], cache_dir=root, progress=progress)
        if list(dataset.classes) != classes:
            raise FeaturepipeError(
                f"the classes in {dataset.source} ({', '.join(dataset.classes)}) are not the run's "
                f"({', '.join(classes)}); re-run `featurepipe evaluate` first")
        split = make_split(dataset, options["seed"]) if split_for is None else split_for(dataset)
        if split_for is None and options["folds"]:
            # Cut now, before the last fine-tuning's files are cleared: a class too small for K folds
            # is refused with that fine-tuning still in place.
            try:
                fold_splits(dataset, options["folds"], options["seed"])
            except FeaturepipeError as error:
                raise type(error)(f"--finetune-folds {options['folds']}: {error}") from None
        # A vote's fine-tuning is judged against the vote: a different vote is a different fine-tuning.
        key_meta = meta if vote is None else {**meta, "sha256": f"{meta.get('sha256')}+vote:{vote.meta.get('hmac')}"}
        key = finetune_key(key_meta, config, split, options, spec, root)
        if requested.reuse and fold_dir is None:
            finished = _reusable(run_dir, key)
            if finished is not None:
                return finished
        state = {"options": options, "key": key, "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        out.mkdir(parents=True, exist_ok=True)
        _clear(out, [BACKUP_DIR, HISTORY, BEST_WEIGHTS, *OLD_FINETUNE_WEIGHTS, PRETRAINED_WEIGHTS, STATE, SPLIT,
                     SUMMARY, VALIDATION_PREDICTIONS, TEACHER_TARGETS])
        write_json(split_path, split.to_json())
        write_json(state_path, state)   # from here on --resume continues this call
    if cache_note:   # after what happened to the fine-tuning itself: that is what a reader looks for first
        notes.append(cache_note)
    return _Prepared(run_dir, config, estimator, meta, classes, spec, root, split, options, key, state, resuming,
                     notes, vote, out_dir=None if fold_dir is None else out)



def _train(prep: _Prepared, progress: Optional[ProgressCallback], callbacks: Sequence,
           timed: Optional[dict] = None) -> _Trained:
    """Decode the split, build the combined model from the head (checked to reproduce it), train it
    as the strategy says (with crash-safe epoch backups), restore the best epoch, and score it
    before/after on the validation images and, once, on the test split."""
    from featurepipe.backbones.build import build_feature_model
    from featurepipe.training.checkpoints import load_arrays

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
        # The starting point: the head on the frozen base, and the scores it (or the vote) gets.
        feature_model = build_feature_model(spec, prep.root)
        estimator, head_source, model, max_diff, proba_before = _start_from_head(
            prep, feature_model, (x_train, y_train, train_rows), (x_val, val_rows), progress)
        jit = bool(mixed)
        before = scores(y_val, proba_before)
        wise = float(options["wise"])
        start_weights = model.get_weights() if training and wise < 1.0 else None
        blocks = options["unfreeze_blocks"]
        if blocks is None:
            blocks = default_unfreeze_blocks(spec.name, [layer.name for layer in base_model(model).layers])
        if strategy == "all":
            blocks = None

        # The targets: the vote's out-of-fold probabilities mixed with the labels (training.distill);
        # validation is always scored against the plain labels (one-hot).
        targets = soft_targets(prep, train_rows["hash"].tolist(), y_train, options.get("distill_alpha", 0.0),
                               options.get("distill_temperature", 1.0), options["label_smoothing"],
                               seed) if training else None
        n_classes = len(classes)
        policy = TRAINING_POLICIES[options["augment"]]
        sequence = (AugmentedImages(x_train, targets.targets, train_rows["hash"], batch_size, seed, policy,
                                     options["mixup"])
                    if training else None)
        hooks = EpochHooks(sequence, progress, "finetune", options["epochs"], per_batch=True)
        fitting = _Fitting(model, spec.name, options, sequence, x_val, one_hot(y_val, n_classes).astype(np.float32),
                           out, prep.run_dir, hooks, EpochTimer(epoch_seconds), callbacks,
                           keras.losses.CategoricalCrossentropy(), jit)
        estimate = None
        if training:
            estimate = finetune_cost.estimate(model, spec.name, blocks, sequence, len(x_val), options, mixed, timed)
            report(progress, NOTICE, 0, 0, estimate["text"])
            _run_phases(fitting, prep, blocks)

        # The best epoch, scored on the same validation images, and the decision.
        history = tidy_history(fitting.history_path) if training else pd.DataFrame(columns=HISTORY_COLUMNS)
        best = best_row(history, monitor=MONITOR)
        if training and fitting.best_path.exists():
            model.set_weights(load_arrays(fitting.best_path))
            if start_weights is not None:
                # best.weights.npz stays the trained epoch; the model scored and saved is the average.
                model.set_weights(weight_average(start_weights, model.get_weights(), wise))
        proba_after = predict_proba(model, x_val, batch_size) if training else proba_before
        after = scores(y_val, proba_after)
        n_trainable = trainable_params(model) if training else 0
        # Early stopping restored the epoch with the lowest loss on these very images: a gain on them
        # must be beyond noise to count (compare's picked_here).
        decision = compare(y_val, proba_before, proba_after, seed, picked_here=training, frozen_name=prep.frozen_name)
        if not training:
            decision.update(improved=False, reason="strategy head: no training, the frozen head exported as one model")
        elif prep.evidence is not None:
            # --finetune-folds: every training image scored once beats a fifth of them; the held-out
            # split's own comparison is kept beside it for the record.
            decision = {**prep.evidence, "holdout": decision}
        kept = "finetuned" if decision["improved"] or not training else "frozen"
        test, test_detail = None, None
        if len(split.test):
            test, test_failed, test_detail = _score_test(prep, feature_model, model, estimator, kept,
                                                         (train_rows, y_train), progress)
            failed = failed + test_failed
    return _Trained(model, estimator, head_source, int(len(x_train)), y_val, val_rows, proba_before, proba_after,
                    before, after, history, best, blocks, fitting.unfrozen, n_trainable, decision, kept, test, failed,
                    max_diff, mixed, jit, epoch_seconds, hooks.epochs, targets=targets, estimate=estimate,
                    train_rows=train_rows, train_labels=y_train, test_detail=test_detail)


def _score_test(prep: _Prepared, feature_model, model, estimator, kept: str, train: tuple,
                progress: Optional[ProgressCallback]) -> tuple[dict, list[dict], dict]:
    """(scores, decode failures, per-image detail) of the frozen model and the fine-tuned one on the
    test split: scored once, after every choice was made on the validation images.

    The frozen side never saw a test image: a dataset's own test split was never in the run's fits,
    and a fold of the training images (--finetune-folds) is scored by the head -- or every vote
    member -- refit on this fine-tuning's training images only (`estimator`, `train`), as the
    validation images are."""
    split, spec, classes, batch_size = prep.split, prep.spec, prep.classes, prep.options["batch_size"]
    x_test, kept_test, test_failed = decode_frame(split.test, spec.image_size, spec.resize, progress,
                                                  "decode test")
    y_test = split.test["label"][kept_test].map({c: i for i, c in enumerate(classes)}).to_numpy(np.int32)
    hashes = split.test["hash"][kept_test].tolist()
    carved = split.source == FOLDS_SOURCE
    if prep.vote is not None:
        train_rows, y_train = train
        frozen = vote_proba(prep.vote, prep.root, hashes, len(classes),
                            (train_rows["hash"].tolist(), y_train) if carved else None,
                            int(prep.config.get("seed", 0)))
    else:
        frozen = predict_proba(combine(feature_model, estimator if carved else prep.estimator, name="frozen"),
                               x_test, batch_size)
    finetuned = predict_proba(model, x_test, batch_size)
    test = {"images": int(len(y_test)),
            "frozen": scores(y_test, frozen),
            "finetuned": scores(y_test, finetuned), "kept": kept}
    detail = {"path": split.test["path"][kept_test].astype(str).tolist(), "hash": hashes, "y": y_test,
              "frozen": frozen, "finetuned": finetuned}
    return test, test_failed, detail


def _save(prep: _Prepared, trained: _Trained, started: float, folds: Optional[dict] = None) -> FinetuneReport:
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
    model_path = out / FINETUNED_MODEL
    digest = save_model_atomic(twin, model_path)
    resumed_from = (t.trained_epochs[0] + 1) if prep.resuming and t.trained_epochs else None
    if prep.resuming:
        # Said wherever the outcome is shown (CLI, summary.json, the report): the epochs before it were
        # trained by an interrupted call, restored from its epoch backup.
        prep.notes.append(f"resumed from epoch {resumed_from}: the epochs before it were trained by the interrupted "
                          f"call and restored from its epoch backup" if resumed_from is not None else
                          "resumed: the interrupted call had already trained every epoch")
    result = FinetuneReport(
        run_dir=prep.run_dir, strategy=strategy, before=t.before, after=t.after, epochs_run=int(len(t.history)),
        best_epoch=None if t.best is None else int(t.best["epoch"]) + 1, model_path=model_path,
        seconds=time.perf_counter() - started, unfrozen_layers=t.unfrozen, trainable_params=t.n_trainable,
        train_images=t.x_train_count, val_images=int(len(t.y_val)), validation=split.source,
        head_source=t.head_source, resumed_from_epoch=resumed_from, improved=bool(t.decision["improved"]),
        failed=t.failed, kept=t.kept, reason=t.decision["reason"], decision=t.decision, test=t.test,
        unfreeze_blocks=t.blocks, seconds_per_epoch=float(np.median(t.epoch_seconds)) if t.epoch_seconds else None,
        notes=prep.notes, key=prep.key, estimate=t.estimate, student=_student_info(prep, t),
        folds=None if folds is None else {k: v for k, v in folds.items() if k != "decision"},
    )
    if t.targets is not None:
        if t.targets.note:
            prep.notes.append(t.targets.note)
        _write_targets(out / TEACHER_TARGETS, t, classes)
    y_val, proba_before, proba_after = t.y_val, t.proba_before, t.proba_after
    csvcells.write(out / VALIDATION_PREDICTIONS, pd.DataFrame({
        "path": t.val_rows["path"], "label": t.val_rows["label"],
        "before_pred": [classes[i] for i in proba_before.argmax(axis=1)],
        "after_pred": [classes[i] for i in proba_after.argmax(axis=1)],
        "before_p_true": proba_before[np.arange(len(y_val)), y_val],
        "after_p_true": proba_after[np.arange(len(y_val)), y_val]}))
    model_json = {
        "kind": "finetuned", "file": f"{FINETUNE_DIR}/{FINETUNED_MODEL}", "sha256": digest, "classes": classes,
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
        "student": result.student, "estimate": t.estimate, "folds": result.folds,
        "vote": None if prep.vote is None else {
            "members": [m.features for m in prep.vote.members], "started_from": prep.vote.started_from.features,
            "before_is": "the vote's probabilities (the run's model), not the started-from member's"},
        "reproduction_max_abs_diff": t.max_diff, "mixed_precision": t.mixed, "jit_compile": t.jit,
        "backbone": spec.to_dict(), "classes": classes, "failed": t.failed,
        "model": f"{FINETUNE_DIR}/{FINETUNED_MODEL}", "sha256": digest, "seconds": round(result.seconds, 3),
        "seconds_per_epoch": result.seconds_per_epoch, "notes": prep.notes, "resumed_from_epoch": resumed_from,
        "tensorboard": tensorboard_available() and training, "key": prep.key, "model_json": model_json,
        "report": json.loads(json.dumps(result.to_dict(), default=str)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(out / SUMMARY, summary)
    _publish(prep.run_dir, summary)
    prep.state["status"] = "done"
    write_json(prep.state_path, prep.state)
    _clear(out, [BACKUP_DIR])
    return result


def _student_info(prep: _Prepared, t: _Trained) -> Optional[dict]:
    """The student's recipe and teacher for the report: alpha, temperature, the teacher's members,
    folds and out-of-fold accuracy on the training images, and which backbone the student is."""
    if t.targets is None:
        return None
    options = prep.options
    members = [m.features for m in prep.vote.members] if prep.vote is not None else [prep.meta.get("features")]
    return {"distill_alpha": options.get("distill_alpha", 0.0), "distill_temperature": options.get(
                "distill_temperature", 1.0), "teacher": members, "backbone": prep.spec.name,
            **t.targets.info(np.asarray(t.train_labels))}


def _write_targets(path: Path, t: _Trained, classes: list[str]) -> None:
    """teacher_targets.csv: per training image its fold, the teacher's out-of-fold probabilities and
    the target it trained on (the evidence that no held-out image taught the student)."""
    rows = t.train_rows
    frame = pd.DataFrame({"path": rows["path"], "hash": rows["hash"], "label": rows["label"],
                          "fold": t.targets.folds if t.targets.folds is not None else -1})
    for i, name in enumerate(classes):
        frame[f"teacher_{name}"] = t.targets.teacher[:, i] if t.targets.teacher is not None else np.nan
    for i, name in enumerate(classes):
        frame[f"target_{name}"] = t.targets.targets[:, i]
    csvcells.write(path, frame)


@quiet_retracing()
def finetune(
    run_dir,
    config: FinetuneConfig = FinetuneConfig(),
    *,
    cache_dir=None,
    progress: Optional[ProgressCallback] = None,
    callbacks: Sequence = (),
) -> FinetuneReport:
    """Fine-tune the run's base + best head on images as `config` says; see the module docstring.

    config.unfreeze_blocks=None trains the backbone's default top (default_unfreeze_blocks);
    config.lr=None the optimizer's default rate. config.resume continues an interrupted call with the
    options it was started with (finetune/state.json; the options passed now are ignored); with
    nothing to resume (killed before state.json was written, or a damaged backup) it starts over with
    the options passed and says so. config.reuse returns a finished fine-tuning with the same key
    (finetune_key) without training. `callbacks` are extra Keras callbacks added to every fit (tests,
    logging). Three steps: _prepare (the run, the split, the options; reuse), _train, _save.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    with _finetune_lock(run_dir):
        prepared = _prepare(run_dir, config, cache_dir, progress)
        if isinstance(prepared, FinetuneReport):
            return prepared
        folds, timed = None, None
        if prepared.options.get("folds"):
            # Scored first: the pooled comparison decides which model the final fine-tuning leaves.
            folds, timed = _score_folds(run_dir, prepared, cache_dir, progress, callbacks)
            prepared.evidence = folds["decision"]
        return _save(prepared, _train(prepared, progress, callbacks, timed), started, folds)


def _score_folds(run_dir: Path, final: _Prepared, cache_dir,
                 progress: Optional[ProgressCallback], callbacks: Sequence) -> tuple[dict, Optional[dict]]:
    """--finetune-folds K (training.finetune_folds): fold k's student trains without fold k of the
    training images and is scored on it beside the frozen model refit without it. Finished folds are
    reused while their key is unchanged; the pooled result is written to finetune/folds.json.
    Returns it with the cost the first fold trained timed (finetune_cost.estimate), which the later
    folds and the final fine-tuning use again."""
    k_folds, seed = int(final.options["folds"]), int(final.options["seed"])
    # The folds train with the final's options (resumed ones included), one fold at a time.
    fold_config = FinetuneConfig(**{**final.options, "folds": 0, "resume": False, "reuse": False})
    records, timed = [], None
    for k in range(k_folds):
        began = time.perf_counter()
        prep = _prepare(run_dir, fold_config, cache_dir, progress,
                        split_for=lambda dataset, k=k: fold_splits(dataset, k_folds, seed)[k],
                        fold_dir=finetune_folds.fold_dir(FINETUNE_DIR, k))
        record = finetune_folds.read_record(prep.out, prep.key)
        if record is None:
            report(progress, NOTICE, 0, 0, f"fold {k + 1} of {k_folds}: training without {len(prep.split.test)} "
                                           f"images, then scoring them (the final fine-tuning follows the folds)")
            trained = _train(prep, progress, callbacks, timed)
            record = finetune_folds.write_record(prep.out, prep.key, k, trained, time.perf_counter() - began)
            _clear(prep.out, [BACKUP_DIR])
            if timed is None and trained.estimate is not None:
                timed = {**trained.estimate, "timed_on": f"fold {k + 1}"}
                left = k_folds - k - 1
                # The final fine-tuning trains on K/(K-1) times a fold's images; the folds like this one.
                more = record["seconds"] * (left + k_folds / (k_folds - 1))
                rest = f"{left} more fold{'' if left == 1 else 's'} and the final fine-tuning" if left else \
                    "the final fine-tuning"
                report(progress, NOTICE, 0, 0, f"fold {k + 1} took {finetune_cost.duration_text(record['seconds'])}: "
                                               f"{rest}, about {finetune_cost.duration_text(more)}")
        else:
            report(progress, NOTICE, 0, 0, f"fold {k + 1} of {k_folds}: finished earlier, reused")
        records.append(record)
    result = finetune_folds.pooled(records, final.classes, seed, final.frozen_name)
    finetune_folds.write_pooled(final.out, result, records, final.classes)
    report(progress, NOTICE, 0, 0, result["headline"])
    return result, timed


@contextmanager
def _finetune_lock(run_dir: Path) -> Iterator[None]:
    """An exclusive flock on RUN/finetune/.lock while one fine-tuning prepares, trains and saves: a
    second one at once would clear the first's state and backups and publish a summary that is not
    what the first reports. Refused at once, not waited for (a fine-tuning takes minutes)."""
    if not (run_dir / CONFIG).is_file():
        yield                       # not a run: _prepare says so
        return
    lock_path = trust.writable(run_dir, FINETUNE_DIR, folder=True) / ".lock"
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FeaturepipeError(
                f"another `featurepipe finetune` is fine-tuning {run_dir} now (it holds {lock_path}); wait for it "
                f"to finish, or stop it and continue with `featurepipe finetune {run_dir} --resume`") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
