"""How `finetune` trains, as one frozen value: the strategy, the optimiser and its schedule, the
stopping rule, and whether to resume or reuse.

The CLI's `finetune` and `run --finetune` build it from their options; training.finetune.finetune
takes it. Ranges are checked when it is built, with the option to fix named. The defaults are the
measured ones (benchmarks/finetune_gain.py, figures in the README); the seeds' recipe (SGD 1e-4,
momentum 0.9, constant rate, one block) stays available by options. Importing this module does not
import TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from featurepipe.core.errors import UsageError

STRATEGIES = ("head", "top-blocks", "fpt", "all")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class FinetuneConfig:
    # head | top-blocks | fpt | all: what trains (see training.finetune's docstring).
    strategy: str = "top-blocks"
    # Top registry blocks of the base to train; None: the backbone's default top.
    unfreeze_blocks: Optional[int] = None
    # At most this many epochs (early stopping on the validation cross-entropy).
    epochs: int = 12
    # Peak learning rate; None: the optimizer's default (1e-3 adamw, 1e-2 sgd).
    lr: Optional[float] = None
    # adamw | sgd.
    optimizer: str = "adamw"
    # SGD momentum.
    momentum: float = 0.9
    # AdamW decoupled weight decay.
    weight_decay: float = 1e-4
    # 0 by default: measured better on the plain validation loss the decision uses.
    label_smoothing: float = 0.0
    # Linear warm-up epochs before the schedule.
    warmup_epochs: int = 1
    # cosine (to 0 after the warm-up) | constant.
    schedule: str = "cosine"
    # Images per training step.
    batch_size: int = 16
    # Early stopping patience on the validation loss, in epochs.
    patience: int = 4
    # Seed of the split, the augmentation and the weights' initialisation.
    seed: int = 0
    # Continue an interrupted fine-tuning with the options it was started with (these are then ignored).
    resume: bool = False
    # Return a finished fine-tuning with the same inputs and options instead of training again.
    reuse: bool = True

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise UsageError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if (self.epochs < 1 or (self.lr is not None and self.lr <= 0)
                or (self.unfreeze_blocks is not None and self.unfreeze_blocks < 0) or self.patience < 0
                or self.batch_size < 1 or self.warmup_epochs < 0 or self.weight_decay < 0):
            raise UsageError("--epochs and --batch-size must be >= 1, --lr > 0, --unfreeze-blocks, --patience, "
                             "--warmup-epochs and --weight-decay >= 0")
        if not 0 <= self.label_smoothing < 1:
            raise UsageError(f"--label-smoothing must be in [0, 1), not {self.label_smoothing}")
        if self.strategy == "fpt" and self.epochs < 2:
            raise UsageError("strategy fpt needs --epochs 2 or more (head pre-training, then fine-tuning)")

    def training_options(self) -> dict:
        """The options that shape the training (everything but resume/reuse), as finetune's state.json
        and its reuse key record them once resolved."""
        return dict(strategy=self.strategy, unfreeze_blocks=self.unfreeze_blocks, epochs=self.epochs, lr=self.lr,
                    optimizer=self.optimizer, momentum=self.momentum, weight_decay=self.weight_decay,
                    label_smoothing=self.label_smoothing, warmup_epochs=self.warmup_epochs,
                    schedule=self.schedule, batch_size=self.batch_size, patience=self.patience, seed=self.seed)
