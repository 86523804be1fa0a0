"""Fine-tuning's options as it records them (resolved from a FinetuneConfig, which owns the
defaults and their checks), its fixed constants, and the report it returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from featurepipe.core.errors import FeaturepipeError, UsageError
from featurepipe.training.config import FinetuneConfig


class StateError(FeaturepipeError):
    """A resumed state.json whose recorded options fine-tuning cannot train with."""


# Early stopping and the best epoch follow the plain validation cross-entropy (val_loss includes
# label smoothing, whose floor depends on the number of classes).
MONITOR = "val_ce"
# The peak rate when --lr is not given (the other defaults are FinetuneConfig's).
# adamw 1e-4: measured against 1e-3 on 5 sets, every image scored once on outer folds
# (benchmarks/student_folds.py): better or equal on each (animals 0.763 vs 0.688, objects 0.932 vs 0.864).
DEFAULT_LR = {"adamw": 1e-4, "sgd": 1e-2}
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
    improved: bool = False            # beyond noise on the same validation images (training.compare)
    failed: list[dict] = field(default_factory=list)
    kept: str = "frozen"              # the run's model now: "finetuned" (model.json) | "frozen" (best head)
    reason: str = ""                  # why it was (not) kept
    decision: dict = field(default_factory=dict)   # training.compare.compare's evidence
    test: Optional[dict] = None       # the test split, scored once at the end (frozen and fine-tuned)
    unfreeze_blocks: Optional[int] = None           # registry blocks trained (None: all)
    seconds_per_epoch: Optional[float] = None       # median over this call's epochs
    reused: bool = False              # a finished fine-tuning with the same key was returned
    notes: list[str] = field(default_factory=list)
    key: str = ""
    # The cost measured before training (training.keras_fit.step_cost): per image per epoch, expected seconds, GPU.
    estimate: Optional[dict] = None
    # The student's targets (training.distill): alpha, temperature, the teacher's folds and out-of-fold accuracy.
    student: Optional[dict] = None
    # --finetune-folds K: the student and the vote scored on K outer folds (training.finetune_folds.pooled).
    folds: Optional[dict] = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(run_dir=str(self.run_dir), model_path=str(self.model_path), seconds=round(self.seconds, 3))
        return data


def _options(config: FinetuneConfig) -> dict:
    """The training options as state.json and the reuse key record them: FinetuneConfig checked
    them when it was built; here the optimizer's default rate fills in a missing --lr."""
    options = config.training_options()
    lr = DEFAULT_LR[config.optimizer] if config.lr is None else config.lr
    return {**options, "unfreeze_blocks": None if config.unfreeze_blocks is None else int(config.unfreeze_blocks),
            "epochs": int(config.epochs), "lr": float(lr), "momentum": float(config.momentum),
            "weight_decay": float(config.weight_decay), "label_smoothing": float(config.label_smoothing),
            "distill_alpha": float(config.distill_alpha), "distill_temperature": float(config.distill_temperature),
            "warmup_epochs": int(config.warmup_epochs), "batch_size": int(config.batch_size),
            "patience": int(config.patience), "seed": int(config.seed),
            "folds": None if config.folds is None else int(config.folds),
            "member": None if config.member is None else str(config.member), "augment": str(config.augment),
            "wise": float(config.wise), "mixup": float(config.mixup)}


# Options a state.json written before they existed lacks, with what that fine-tuning trained with
# (no distillation, no outer folds, the run's own member, the seeds' augmentation, no averaging, no mixup).
# Filled in once where a resumed state is read, so the final fine-tuning and its --finetune-folds
# folds (built from the same options) train alike, and the summary records what was used.
OLDER_STATE_OPTIONS = {"distill_alpha": 0.0, "distill_temperature": 1.0, "folds": 0, "member": None,
                       "augment": "classic", "wise": 1.0, "mixup": 0.0}


def resumed_options(saved: object) -> dict:
    """state.json's options, with what an older version trained with where it did not record it,
    checked as FinetuneConfig checks an option given on the command line: an edited or damaged
    state.json (an unknown augmentation, a --wise outside [0, 1] that would extrapolate the weights,
    a count that is not whole) raises StateError naming the option, and the caller starts over."""
    if not isinstance(saved, dict):
        raise StateError(f"its options are {type(saved).__name__}, not a mapping")
    options = {**OLDER_STATE_OPTIONS, **saved}
    names = FinetuneConfig().training_options()
    missing, unknown = sorted(set(names) - set(options)), sorted(set(options) - set(names))
    if missing or unknown:
        raise StateError("its options " + "; ".join(
            part for part in (f"lack {', '.join(missing)}" if missing else "",
                              f"have unknown {', '.join(unknown)}" if unknown else "") if part))
    try:
        checked = _options(FinetuneConfig(**{name: options[name] for name in names}))
    # TypeError: a value of the wrong type ("3" < 1); OverflowError: an infinite count (JSON's
    # Infinity passes "epochs >= 1" and cannot be made whole).
    except (UsageError, TypeError, OverflowError) as error:
        raise StateError(f"its options were refused: {error}") from None
    # Equal, not merely accepted: a recorded epochs of 2.5 passes the range checks but would train 2.
    changed = [name for name in names if checked[name] != options[name]]
    if changed:
        raise StateError(f"its options {', '.join(f'{name}={options[name]!r}' for name in changed)} are not "
                         f"values the command line gives")
    return checked


def pretrain_epochs(epochs: int) -> int:
    return min(PRETRAIN_MAX_EPOCHS, max(1, epochs // 3))
