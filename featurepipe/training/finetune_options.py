"""Fine-tuning's options and their defaults, checked in one place, and the report it returns.

The defaults were chosen by measurement (benchmarks/finetune_gain.py; figures in the README);
featurepipe.training.finetune describes the strategies.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from featurepipe.core.errors import FeaturepipeError

STRATEGIES = ("head", "top-blocks", "fpt", "all")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
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
