"""Fine-tuning's training phases: the combined model compiled and fit one phase at a time (fpt's
head-only pre-training, then fine-tuning), each resumable from its crash-safe epoch backup, with
early stopping and the best epoch's weights kept across interruptions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import keras
import numpy as np

from featurepipe.core import trust
from featurepipe.core.atomic import write_json
from featurepipe.heads.combined import set_trainable
from featurepipe.rundir.layout import BACKUP_DIR, BEST_WEIGHTS, HISTORY, LOGS_DIR, PRETRAINED_WEIGHTS
from featurepipe.training.checkpoints import (BestWeights, EpochBackup, load_arrays, read_backup, restore_backup,
                                              save_arrays_atomic)
from featurepipe.training.finetune_options import MONITOR, PRETRAIN_LR_FACTOR, pretrain_epochs
from featurepipe.training.keras_fit import (
    EpochHooks, EpochTimer, HistoryLogger, ResumableEarlyStopping, best_row, lr_schedule, make_optimizer,
    read_history, tensorboard_callbacks,
)


@dataclass
class _Fitting:
    """What every phase of one fine-tuning trains with; `unfrozen` is the last phase's trained layers."""

    model: Any                       # the combined model
    backbone: str                    # its registry name (which blocks are "top")
    options: dict
    sequence: Any                    # the augmented training images (keras_fit.AugmentedImages)
    x_val: np.ndarray
    y_val: np.ndarray                # one-hot (n, classes), as the training targets are laid out
    out: Path                        # RUN_DIR/finetune
    run_dir: Path
    hooks: EpochHooks
    timer: EpochTimer
    callbacks: Sequence              # the caller's extra Keras callbacks
    loss: Any
    jit: bool
    unfrozen: list[str] = field(default_factory=list)

    @property
    def history_path(self) -> Path:
        return self.out / HISTORY

    @property
    def best_path(self) -> Path:
        return self.out / BEST_WEIGHTS

    def compile_model(self, rate) -> None:
        self.model.compile(optimizer=make_optimizer(self.options, rate), loss=self.loss, jit_compile=self.jit,
                           # Targets are distributions (training.distill); on the one-hot validation labels
                           # "ce" is the plain cross-entropy early stopping follows.
                           metrics=["accuracy", keras.metrics.CategoricalCrossentropy(name="ce")])

    def fit(self, phase: str, phase_blocks: Optional[int], train_head: bool, rate: float, first: int, last: int,
            early_stop: bool, schedule_kind: str) -> None:
        """Train epochs [first, last) of one phase, continuing from its backup when there is one."""
        model, options = self.model, self.options
        self.unfrozen = set_trainable(model, self.backbone, phase_blocks, train_head)
        self.compile_model(lr_schedule(rate, len(self.sequence), last - first, options["warmup_epochs"], schedule_kind))
        # Beside this fine-tuning's other files (RUN/finetune, or one fold's folder of --finetune-folds):
        # a fold's backup left where the final fine-tuning looks would be "resumed" as the final's.
        backup = trust.writable(self.run_dir, (self.out / BACKUP_DIR / phase).relative_to(self.run_dir).as_posix(),
                                folder=True)
        record, _ = read_backup(backup)
        start = restore_backup(model, backup, record) if record else first
        history = read_history(self.history_path)
        history = history[history["epoch"] < start] if len(history) else history
        best_so_far = best_row(history, monitor=MONITOR)
        cbs = [self.hooks, self.timer]
        if early_stop:
            phase_best = best_row(history, first, monitor=MONITOR)
            resumed = None
            if phase_best is not None:
                resumed = (float(phase_best[MONITOR]), int(phase_best["epoch"]), int(start - 1 - phase_best["epoch"]))
                if resumed[2] >= options["patience"]:
                    return          # it had already stopped early when it was interrupted
            cbs.append(ResumableEarlyStopping(monitor=MONITOR, patience=options["patience"], state=resumed))
        cbs += [
            BestWeights(self.best_path, MONITOR, None if best_so_far is None else float(best_so_far[MONITOR])),
            HistoryLogger(self.history_path, append=True),
            *tensorboard_callbacks(trust.writable(self.run_dir, LOGS_DIR)),
            # Last, so an epoch counts as done only once its best weights and history row exist.
            EpochBackup(backup),
            *self.callbacks,
        ]
        if start < last:
            # shuffle=False: the sequence already orders each epoch by (seed, epoch). Keras's own shuffle
            # of the batch order draws from the global random state, which no backup holds, so a resumed
            # fit drew other batches than an uninterrupted one from its first resumed epoch on.
            model.fit(self.sequence, validation_data=(self.x_val, self.y_val),
                      validation_batch_size=options["batch_size"], epochs=last, initial_epoch=start, callbacks=cbs,
                      verbose=0, shuffle=False)


def _run_phases(fitting: _Fitting, prep, blocks: Optional[int]) -> None:
    """The strategy's phases: fpt pre-trains the head alone (once: its weights are kept and state.json
    says so), then the top `blocks` train with the head. `prep` is finetune's _Prepared."""
    options = fitting.options
    total = options["epochs"]
    if options["strategy"] == "fpt":
        warm = pretrain_epochs(total)
        pretrained = prep.out / PRETRAINED_WEIGHTS
        if prep.state.get("pretrain_done") and pretrained.exists():
            fitting.model.set_weights(load_arrays(pretrained))
        else:
            fitting.fit("pretrain", 0, True, options["lr"] * PRETRAIN_LR_FACTOR, 0, warm, False, "constant")
            save_arrays_atomic(fitting.model.get_weights(), pretrained)
            prep.state["pretrain_done"] = True
            write_json(prep.state_path, prep.state)
        fitting.fit("finetune", blocks, True, options["lr"], warm, total, True, options["schedule"])
    else:
        fitting.fit("finetune", blocks, True, options["lr"], 0, total, True, options["schedule"])


def weight_average(start: Sequence[np.ndarray], tuned: Sequence[np.ndarray], alpha: float) -> list[np.ndarray]:
    """--wise: alpha x the fine-tuned weights + (1 - alpha) x the starting ones, array by array (the
    frozen layers' are equal in both, so only what trained moves). Integer arrays (none in these
    models; a step counter would be one) are taken from the fine-tuned side as they are."""
    if len(start) != len(tuned):
        raise ValueError(f"{len(start)} starting weight arrays against {len(tuned)} fine-tuned ones")
    out = []
    for a, b in zip(start, tuned):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            raise ValueError(f"a starting weight of shape {a.shape} against a fine-tuned one of shape {b.shape}")
        out.append(((1.0 - alpha) * a + alpha * b).astype(b.dtype) if b.dtype.kind == "f" else b)
    return out

