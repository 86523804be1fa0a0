"""What a fine-tuning will cost, said before it starts: one batch's augmentation and forward + backward pass
timed on this machine (training.keras_fit.step_cost), scaled to the planned epochs, and whether a GPU runs it.

A fine-tuning takes minutes to hours on a CPU; a user deciding whether to wait, or to move to a
machine with a GPU, needs the figure first, not after. It is an estimate: early stopping may end
sooner; the optimizer's update, the epoch backups and a machine whose load changes add to it (on 2
CPU cores shared with other jobs at load 7-16, fine-tunings took 2.5-6x the estimate per epoch before
the graph-building time was counted: benchmarks/README.md, "The student").

Importing this module imports Keras.
"""

from __future__ import annotations

import time
from typing import Optional

from featurepipe.heads.combined import set_trainable
from featurepipe.training.keras_fit import step_cost

# A validation image costs a forward pass only: about a third of a training step's forward + backward.
VALIDATION_SHARE = 1 / 3


def duration_text(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate(model, backbone: str, blocks, sequence, n_val: int, options: dict, gpu: bool,
             timed: Optional[dict] = None) -> dict:
    """{"seconds_per_image_epoch", "expected_seconds", "epochs", "gpu", "text", ...} for training the top
    `blocks` of `model` on `sequence` (keras_fit.AugmentedImages) for options["epochs"] epochs, with
    `n_val` validation images scored after each epoch. When it times a batch it sets the layers'
    trainable flags as the fine-tuning phase does (the phase sets them again itself).

    `timed`: an earlier estimate of the same backbone, blocks and batch size (--finetune-folds' first
    fold) whose per-image cost is used again: the K folds and the final fine-tuning differ only in
    their images, and timing each would build one more training graph per fine-tuning (seconds each)."""
    if timed is not None:
        per_image, tracing, where = timed["seconds_per_image_epoch"], timed["graph_seconds"], timed["timed_on"]
    else:
        set_trainable(model, backbone, blocks, True)
        started = time.perf_counter()
        images, targets = sequence[0]             # augmenting a batch is part of every step's price
        augment = (time.perf_counter() - started) / max(1, len(images))
        step, tracing = step_cost(model, images, targets)
        per_image, where = step + augment, "one batch of this fine-tuning"
    epochs = int(options["epochs"])
    n_train = len(sequence.images)
    # Keras builds its own training graph once, as the timed first call did: counted once.
    seconds = tracing + per_image * epochs * (n_train + VALIDATION_SHARE * n_val)
    device = "on the GPU" if gpu else "on the CPU (no GPU found)"
    # Only the epochs are timed: decoding, the start and the vote's scores, saving and scoring come on
    # top (on the demo's 121 photos on 2 CPU cores about as long again: 28 s of epochs in a 56 s stage).
    text = (f"fine-tuning {n_train} images for up to {epochs} epochs: the epochs expected about "
            f"{duration_text(seconds)} {device}, at {per_image * 1000:.0f} ms per image per epoch timed on {where} "
            f"(early stopping may end them sooner; decoding, scoring and saving add to it)")
    return {"seconds_per_image_epoch": per_image, "graph_seconds": tracing, "expected_seconds": seconds,
            "epochs": epochs, "train_images": n_train, "val_images": int(n_val), "gpu": bool(gpu),
            "timed_on": where, "text": text}
