"""`featurepipe finetune` (the run's base and best head trained on images) and `featurepipe baseline`
(the small convnet of the Keras blog's "very little data" tutorial, trained from scratch: the yardstick)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from featurepipe.cli.common import Command, check_run_dir, warmup_note, winner_text
from featurepipe.backbones.spec import MAX_IMAGE_SIZE
from featurepipe.cli.options import (SEED_MAX, AsJson, CacheDir, FinetuneFolds, Overwrite, StudentMember,
                                     TrainAugment, Wise, Mixup, number_in)
from featurepipe.training.config import FinetuneConfig

# The options' defaults are the config's (light: importing it does not import TensorFlow).
DEFAULTS = FinetuneConfig()
# The baseline convnet's three 3x3 convolutions and 2x2 poolings leave nothing of a smaller image.
BASELINE_MIN_SIZE = 22


def finetune(
    run_dir: Path = typer.Argument(..., help="A run directory written by `featurepipe evaluate`."),
    unfreeze_blocks: Optional[int] = typer.Option(
        DEFAULTS.unfreeze_blocks, "--unfreeze-blocks", min=0, help="Top blocks of the base to train (default: the backbone's top, e.g. the "
                                        "last two MBConv stages + head for EfficientNet-Lite, block5 for VGG)."),
    epochs: int = typer.Option(DEFAULTS.epochs, "--epochs", min=1, help="At most this many epochs (early stopping on validation)."),
    lr: Optional[float] = typer.Option(DEFAULTS.lr, "--lr", callback=number_in(0, low_open=True), help="Peak learning rate (default: 1e-4 adamw, 1e-2 sgd); "
                                                          "--strategy fpt pre-trains the head at 10x."),
    optimizer: str = typer.Option(DEFAULTS.optimizer, "--optimizer", help="adamw | sgd (SGD with momentum: the Keras blog's original fine-tuning recipe, "
                                  "with --lr 1e-4 --schedule constant)."),
    momentum: float = typer.Option(DEFAULTS.momentum, "--momentum", callback=number_in(0, 1, high_open=True), help="SGD momentum."),
    weight_decay: float = typer.Option(DEFAULTS.weight_decay, "--weight-decay", callback=number_in(0), help="AdamW decoupled weight decay."),
    label_smoothing: float = typer.Option(DEFAULTS.label_smoothing, "--label-smoothing", callback=number_in(0, 1, high_open=True), help="0 by default: measured better on the plain validation loss the decision uses."),
    distill_alpha: float = typer.Option(DEFAULTS.distill_alpha, "--distill-alpha", callback=number_in(0, 1),
                                        help="Weight of the vote's out-of-fold probabilities in the training targets "
                                             "(knowledge distillation); 0: hard labels (measured better so far)."),
    distill_temperature: float = typer.Option(DEFAULTS.distill_temperature, "--distill-temperature",
                                              callback=number_in(0, low_open=True),
                                              help="Temperature the teacher's probabilities are softened at (1: as "
                                                   "they are)."),
    schedule: str = typer.Option(DEFAULTS.schedule, "--schedule", help="cosine (linear warm-up, cosine to 0) | constant."),
    warmup_epochs: int = typer.Option(DEFAULTS.warmup_epochs, "--warmup-epochs", min=0,
                                      help="Epochs of linear warm-up (lr/10 up to --lr) before the cosine decay "
                                           "(with --schedule cosine)."),
    batch_size: int = typer.Option(DEFAULTS.batch_size, "--batch-size", min=1,
                                   help="Images per training step (smaller if the GPU runs out of memory)."),
    strategy: str = typer.Option(DEFAULTS.strategy, "--strategy",
                                 help="What trains: head (nothing; the base + head saved as one model) | "
                                      "top-blocks (the top blocks of the base and the head) | fpt (freeze, "
                                      "pre-train, fine-tune: the head alone first at 10x the rate, then the top "
                                      "blocks) | all (every layer of the base; keep --lr small)."),
    patience: int = typer.Option(DEFAULTS.patience, "--patience", min=0, help="Early stopping patience on validation loss (epochs)."),
    resume: bool = typer.Option(DEFAULTS.resume, "--resume", help="Continue an interrupted fine-tuning with its original options."),
    reuse: bool = typer.Option(DEFAULTS.reuse, "--reuse/--no-reuse", help="Return a finished fine-tuning with the same inputs and options."),
    seed: int = typer.Option(DEFAULTS.seed, "--seed", min=0, max=SEED_MAX,
                             help="Seed of the held-out split, the augmentation and the weight updates."),
    finetune_folds: Optional[int] = FinetuneFolds,
    student: Optional[str] = StudentMember,
    train_augment: Optional[str] = TrainAugment,
    wise: Optional[float] = Wise,
    mixup: Optional[float] = Mixup,
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Cache root (default: the run's)."),
    as_json: bool = AsJson,
) -> None:
    """Fine-tune the run's base and best head on images; it becomes the run's model only if it measurably beats the frozen head."""
    from featurepipe.cli import render
    from featurepipe.training.finetune import finetune as run_finetune

    with Command(as_json, interrupted=f"continue with `featurepipe finetune {run_dir} --resume`") as command:
        config = FinetuneConfig(strategy=strategy, unfreeze_blocks=unfreeze_blocks, epochs=epochs, lr=lr,
                                optimizer=optimizer, momentum=momentum, weight_decay=weight_decay,
                                label_smoothing=label_smoothing, distill_alpha=distill_alpha,
                                distill_temperature=distill_temperature, warmup_epochs=warmup_epochs, schedule=schedule,
                                batch_size=batch_size, patience=patience, seed=seed, resume=resume, reuse=reuse,
                                folds=finetune_folds, member=student, augment=train_augment or DEFAULTS.augment,
                                wise=DEFAULTS.wise if wise is None else wise,
                                mixup=DEFAULTS.mixup if mixup is None else mixup)
        with command.stage() as progress:
            result = run_finetune(run_dir, config, cache_dir=cache_dir, progress=progress)
    if as_json:
        render.print_json(result.to_dict())
        return
    before, after = result.before, result.after
    where = "the validation split" if result.validation == "validation" else "20% of train held out"
    reused = " (reused: nothing changed since the last fine-tuning)" if result.reused else ""
    per_epoch = f", {result.seconds_per_epoch:.1f} s/epoch" if result.seconds_per_epoch else ""
    render.stdout.print(
        f"{result.strategy}: val accuracy {before['val_accuracy']:.3f} -> {after['val_accuracy']:.3f}, "
        f"val loss {before['val_loss']:.4f} -> {after['val_loss']:.4f} ({render.plural(result.val_images, 'image')}, {where}); "
        f"{render.plural(result.epochs_run, 'epoch')} (best {result.best_epoch}), {len(result.unfrozen_layers)} base layers / "
        f"{result.trainable_params:,} weights trained, {result.seconds:.1f} s{per_epoch}{reused}",
        highlight=False)
    for note in result.notes + [n for n in [warmup_note(config)] if n]:
        render.flag("note", note)
    if result.test:
        render.stdout.print(f"test split ({render.plural(result.test['images'], 'image')}, scored once): accuracy frozen "
                            f"{result.test['frozen']['val_accuracy']:.3f}, fine-tuned "
                            f"{result.test['finetuned']['val_accuracy']:.3f}", highlight=False)
    render.stdout.print(winner_text(result), highlight=False)
    if result.kept == "finetuned":
        render.stdout.print(f"kept the fine-tuned model: {result.reason}\nmodel: {result.model_path}", highlight=False)
    else:
        render.flag("kept the frozen head", result.reason)


def baseline(
    data: Path = typer.Argument(..., help="DATA/<class>/*, DATA/<split>/<class>/* or a CSV manifest."),
    epochs: int = typer.Option(30, "--epochs", min=1, help="At most this many epochs (early stopping on validation)."),
    image_size: int = typer.Option(150, "--image-size", min=BASELINE_MIN_SIZE, max=MAX_IMAGE_SIZE,
                                   help="Images are resized to this many pixels square."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per training step."),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX,
                             help="Seed of the held-out split, the augmentation and the initial weights."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Write RUN_DIR/baseline/ (e.g. into an evaluated run)."),
    cache_dir: Optional[Path] = CacheDir,
    as_json: bool = AsJson,
    overwrite: bool = Overwrite,
) -> None:
    """Train a small convnet from scratch (the Keras blog's "very little data" network): the yardstick for transfer learning."""
    from featurepipe.cli import render
    from featurepipe.training.baseline import baseline as run_baseline
    from featurepipe.data.dataset import scan
    from featurepipe.core.cachedirs import cache_root

    with Command(as_json) as command:
        root = cache_root(cache_dir)
        check_run_dir(run_dir, overwrite)
        with command.stage() as progress:
            dataset = scan(data, cache_dir=root, progress=progress)
            result = run_baseline(dataset, image_size=image_size, epochs=epochs, batch_size=batch_size, seed=seed,
                                  run_dir=run_dir, progress=progress, cache_dir=root)
    if as_json:
        render.print_json(result.to_dict())
        return
    render.stdout.print(
        f"baseline: val accuracy {result.after['val_accuracy']:.3f}, val loss {result.after['val_loss']:.4f} "
        f"({render.plural(result.val_images, 'image')}) after {render.plural(result.epochs_run, 'epoch')} (best {result.best_epoch}), "
        f"{result.seconds:.1f} s\nmodel: {result.model_path}", highlight=False)
