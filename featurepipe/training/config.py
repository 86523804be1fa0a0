"""How `finetune` trains, as one frozen value: the strategy, the optimiser and its schedule, the
stopping rule, and whether to resume or reuse.

The CLI's `finetune` and `run --finetune` build it from their options; training.finetune.finetune
takes it. Ranges are checked when it is built, with the option to fix named. The defaults are the
measured ones (benchmarks/finetune_gain.py, figures in the README); the seeds' recipe (SGD 1e-4,
momentum 0.9, constant rate, one block, classic augmentation, no weight averaging) stays available by
options. Importing this module does not import TensorFlow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from featurepipe.core.errors import UsageError

STRATEGIES = ("head", "top-blocks", "fpt", "all")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
# The training images' augmentation by name: data.augment.TRAINING_POLICIES's keys, written out here
# because importing it would bring numpy and PIL into every CLI start-up (a test keeps them equal).
TRAIN_AUGMENTS = ("classic", "light", "flip", "none")
# --finetune-folds when it is not given and a GPU is in use (training.finetune resolves it).
AUTO_FOLDS = 5


@dataclass(frozen=True)
class FinetuneConfig:
    # head | top-blocks | fpt | all: what trains (see training.finetune's docstring).
    strategy: str = "top-blocks"
    # Top registry blocks of the base to train; None: the backbone's default top.
    unfreeze_blocks: Optional[int] = None
    # At most this many epochs (early stopping on the validation cross-entropy).
    epochs: int = 12
    # Peak learning rate; None: the optimizer's default (1e-4 adamw, 1e-2 sgd; finetune_options.DEFAULT_LR).
    lr: Optional[float] = None
    # adamw | sgd.
    optimizer: str = "adamw"
    # SGD momentum.
    momentum: float = 0.9
    # AdamW decoupled weight decay.
    weight_decay: float = 1e-4
    # 0 by default: measured better on the plain validation loss the decision uses.
    label_smoothing: float = 0.0
    # Knowledge distillation (training.distill): the training targets are alpha * the vote's out-of-fold
    # probabilities (at the temperature) + (1 - alpha) * the true label; 0: hard labels. 0 by default:
    # measured (benchmarks/README.md, "The student"): distilled into the member's linear head, every
    # alpha > 0 scored below hard labels (4 sets x 3 splits); fully fine-tuned, alpha 0.5 tied hard
    # labels on average (0.906 both, 4 sets x 3 splits); temperatures above 1 raised the held-out loss.
    distill_alpha: float = 0.0
    distill_temperature: float = 1.0
    # Linear warm-up epochs before the schedule.
    warmup_epochs: int = 1
    # cosine (to 0 after the warm-up) | constant.
    schedule: str = "cosine"
    # --train-augment: how the training images are augmented each epoch (data.augment.TRAINING_POLICIES).
    # flip by default: measured on 5 sets x 5 outer folds (benchmarks/README.md, "Augmentation and
    # --wise"), mirroring alone was +1.0 points on the vote on average (worst -1.5), light +0.7 (-3.0),
    # the seeds' rotation/shift/zoom +0.1 (-6.0: it cost a cut-out produce set 4 images).
    augment: str = "flip"
    # --wise A: the saved student's weights are A x the fine-tuned best epoch + (1 - A) x where it started
    # (the linear probe on the frozen base): a weight-space ensemble (WiSE-FT, Wortsman et al. 2022) of
    # the frozen member and the fine-tuned one, still one network. 1: the fine-tuned weights as trained.
    # 0.5 by default: on the same 5 sets x 5 folds it gave a lower log loss than the trained weights on
    # every set (each augmentation policy), and as much accuracy or more on average.
    wise: float = 0.5
    # --mixup A: each training image is blended with another of its batch, pixels and targets alike, in a
    # proportion drawn from Beta(A, A) (mixup, Zhang et al. 2018): targets the linear probe it starts from
    # cannot already fit, so the base keeps a loss to learn from. 0: off. 0.4 by default: on 5 sets x 5
    # outer folds x 3 draws (benchmarks/README.md, "Mixup"), +0.3 points on the vote on average against
    # -0.4 without it (the same folds), better on 3 sets, equal on 1, worse on 1; worst set -3.0 both.
    mixup: float = 0.4
    # Images per training step.
    batch_size: int = 16
    # Early stopping patience on the validation loss, in epochs.
    patience: int = 4
    # --student: which member of a vote fine-tuning trains (a feature-set name, or a backbone only one
    # member has); None: the member that scored best alone.
    member: Optional[str] = None
    # Seed of the split, the augmentation and the weights' initialisation.
    seed: int = 0
    # --finetune-folds K: before the final fine-tuning, train K students, each without one outer fold of
    # the training images, and score each against the vote (refit without that fold) on its fold: every
    # image scored once by models that never saw it. The pooled comparison then decides which model the
    # run keeps. 0: the held-out split alone decides. None (the default): AUTO_FOLDS on a GPU, where a
    # fine-tuning of a few hundred images takes seconds, 0 on a CPU, where K more of them take minutes.
    folds: Optional[int] = None
    # Continue an interrupted fine-tuning with the options it was started with (these are then ignored).
    resume: bool = False
    # Return a finished fine-tuning with the same inputs and options instead of training again.
    reuse: bool = True

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise UsageError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.augment not in TRAIN_AUGMENTS:
            raise UsageError(f"unknown --train-augment {self.augment!r}; choose one of {', '.join(TRAIN_AUGMENTS)}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        # Each range names its option; NaN fails every comparison, so each test is written as "inside".
        checks = [
            ("--epochs", self.epochs, self.epochs >= 1, "1 or more"),
            ("--batch-size", self.batch_size, self.batch_size >= 1, "1 or more"),
            ("--lr", self.lr, self.lr is None or (math.isfinite(self.lr) and self.lr > 0), "a finite number > 0"),
            ("--unfreeze-blocks", self.unfreeze_blocks, self.unfreeze_blocks is None or self.unfreeze_blocks >= 0,
             "0 or more"),
            ("--patience", self.patience, self.patience >= 0, "0 or more"),
            ("--warmup-epochs", self.warmup_epochs, self.warmup_epochs >= 0, "0 or more"),
            ("--weight-decay", self.weight_decay, math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             "a finite number >= 0"),
            ("--momentum", self.momentum, 0 <= self.momentum < 1, "in [0, 1)"),
            ("--label-smoothing", self.label_smoothing, 0 <= self.label_smoothing < 1, "in [0, 1)"),
            ("--distill-alpha", self.distill_alpha, 0 <= self.distill_alpha <= 1, "in [0, 1]"),
            ("--distill-temperature", self.distill_temperature,
             math.isfinite(self.distill_temperature) and self.distill_temperature > 0, "a finite number > 0"),
            ("--wise", self.wise, 0 <= self.wise <= 1, "in [0, 1]"),
            ("--mixup", self.mixup, math.isfinite(self.mixup) and self.mixup >= 0, "a finite number >= 0"),
            ("--seed", self.seed, self.seed >= 0, "0 or more"),
            ("--finetune-folds", self.folds, self.folds is None or self.folds == 0 or self.folds >= 2,
             "0 (off) or 2 or more"),
        ]
        for option, value, inside, wanted in checks:
            if not inside:
                raise UsageError(f"{option} must be {wanted}, not {value}")
        if self.folds and self.strategy == "head":
            raise UsageError("--finetune-folds needs a strategy that trains (strategy head trains nothing to score)")
        if self.strategy == "fpt" and self.epochs < 2:
            raise UsageError("strategy fpt needs --epochs 2 or more (head pre-training, then fine-tuning)")

    def folds_for(self, gpu: bool) -> int:
        """The outer folds to score the student on: --finetune-folds when given, else AUTO_FOLDS on a
        GPU and none (the validation images decide) on a CPU."""
        if self.folds is not None:
            return int(self.folds)
        return AUTO_FOLDS if gpu else 0

    def training_options(self) -> dict:
        """The options that shape the training (everything but resume/reuse), as finetune's state.json
        and its reuse key record them once resolved."""
        return dict(strategy=self.strategy, unfreeze_blocks=self.unfreeze_blocks, epochs=self.epochs, lr=self.lr,
                    optimizer=self.optimizer, momentum=self.momentum, weight_decay=self.weight_decay,
                    label_smoothing=self.label_smoothing, distill_alpha=self.distill_alpha,
                    distill_temperature=self.distill_temperature, warmup_epochs=self.warmup_epochs,
                    schedule=self.schedule, batch_size=self.batch_size, patience=self.patience, seed=self.seed,
                    folds=self.folds, member=self.member, augment=self.augment, wise=self.wise,
                    mixup=self.mixup)
