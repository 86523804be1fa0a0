"""Did fine-tuning pay off? Frozen head vs fine-tuned model on the SAME validation images.

Validation sets here are small (tens to a few hundred images), so a change of a hair is noise.
The decision is paired, image by image:

- accuracy: `gained` images the fine-tuned model gets right and the frozen head got wrong, `lost`
  the reverse. Net change = gained - lost (in images).
- loss: d_i = CE_after_i - CE_before_i per image (plain cross-entropy, no label smoothing). A
  seeded paired bootstrap of mean(d) gives a 95% interval: the loss "fell" when the interval lies
  below 0 and the mean change is at least LOSS_MARGIN, "rose" when it lies above 0 and the mean is
  at least LOSS_MARGIN; else the change is within noise (or too small to matter).

`improved` is true when
  (a) the fine-tuned model gets at least one image more right (net) and its loss did not rise, or
  (b) its loss fell beyond noise and it gets no image fewer right (net).
When the same images also picked the fine-tuned model's best epoch (`picked_here`: the held-out
split, where early stopping restores the epoch with the lowest loss on them), its score there is
optimistic, so (a) asks for an accuracy gain beyond noise: the 95% paired interval above 0.
Measured (benchmarks/student_folds.py, 5 sets, every image scored once on outer folds): "one image
more" on ~11-60 held-out images kept a student that then lost 6 points on unseen images of one set.
Otherwise the run keeps the frozen head (or the vote): a tie goes to the model already in place.
This is the winner rule: the better of the two on the same images, more images right first, the
loss guarding against a gain of an image bought with confidence lost everywhere. The accuracy change
comes with a paired bootstrap interval (the same resampled images for both models). The exact McNemar p-value on (gained, lost) is reported as
well (for information: with ~25 validation images no single-image gain can be significant).
"""

from __future__ import annotations

import math

import numpy as np

BOOTSTRAP_SAMPLES = 2000
# A loss change must also be at least this large (mean nats per image) to count: a consistent but
# tiny shift (the issue's 0.8265 -> 0.8259; the seeds' recipe on the demo, -0.0017) is not a gain.
LOSS_MARGIN = 0.01
CONFIDENCE = 0.95
EPS = 1e-7


def per_image(y: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(correct: bool per image, cross-entropy per image) for class indices `y`."""
    proba = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    p_true = np.clip(proba[np.arange(len(y)), y], EPS, 1.0)
    return proba.argmax(axis=1) == y, -np.log(p_true)


def scores(y: np.ndarray, proba: np.ndarray) -> dict:
    """{"val_accuracy", "val_loss"} (plain cross-entropy) for probabilities `proba`."""
    correct, loss = per_image(y, proba)
    if not len(y):
        return {"val_accuracy": float("nan"), "val_loss": float("nan")}
    return {"val_accuracy": float(correct.mean()), "val_loss": float(loss.mean())}


def mcnemar_p(gained: int, lost: int) -> float:
    """Two-sided exact McNemar test (binomial on the discordant pairs)."""
    n = gained + lost
    if n == 0:
        return 1.0
    k = min(gained, lost)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return float(min(1.0, 2 * tail))


def compare(y: np.ndarray, before: np.ndarray, after: np.ndarray, seed: int = 0, picked_here: bool = False,
            frozen_name: str = "the frozen head") -> dict:
    """The decision and its evidence; see the module docstring. `frozen_name` names the model kept
    when fine-tuning does not pay (the run's vote, or its frozen head) in the reason."""
    return compare_per_image(*per_image(y, before), *per_image(y, after), seed=seed, picked_here=picked_here,
                             frozen_name=frozen_name)


def compare_per_image(correct_b: np.ndarray, loss_b: np.ndarray, correct_a: np.ndarray, loss_a: np.ndarray,
                      seed: int = 0, picked_here: bool = False, frozen_name: str = "the frozen head") -> dict:
    """compare() from per-image correctness and cross-entropy (e.g. validation_predictions.csv)."""
    correct_b, correct_a = np.asarray(correct_b, bool), np.asarray(correct_a, bool)
    loss_b, loss_a = np.asarray(loss_b, np.float64), np.asarray(loss_a, np.float64)
    n = len(correct_b)
    gained, lost = int((~correct_b & correct_a).sum()), int((correct_b & ~correct_a).sum())
    change = loss_a - loss_b                  # per image; negative = the fine-tuned model is better
    # Per image: +1 gained, -1 lost, 0 unchanged; its mean is the accuracy change.
    flips = correct_a.astype(np.float64) - correct_b.astype(np.float64)
    if n:
        rng = np.random.default_rng(seed)
        draws = rng.integers(0, n, size=(BOOTSTRAP_SAMPLES, n))   # the same resampled images for both
        tail = (1 - CONFIDENCE) / 2 * 100
        low, high = (float(v) for v in np.percentile(change[draws].mean(axis=1), [tail, 100 - tail]))
        acc_low, acc_high = (float(v) for v in np.percentile(flips[draws].mean(axis=1), [tail, 100 - tail]))
        mean = float(change.mean())
    else:
        low = high = mean = acc_low = acc_high = 0.0
    loss_fell, loss_rose = high < 0 and mean <= -LOSS_MARGIN, low > 0 and mean >= LOSS_MARGIN
    net = gained - lost
    loss_text = f"validation loss change {mean:+.4f} (95% interval {low:+.4f} to {high:+.4f})"
    counts = f"{gained} image(s) gained, {lost} lost"
    accuracy_text = f"accuracy change {100 * net / n if n else 0.0:+.1f} points (95% interval {100 * acc_low:+.1f} to " \
                    f"{100 * acc_high:+.1f})"
    if net >= 1 and not loss_rose and (acc_low > 0 or not picked_here):
        improved, reason = True, f"{net} more validation image(s) right ({counts}); {loss_text}"
    elif loss_fell and net >= 0:
        improved, reason = True, f"{loss_text}: lower beyond noise, with no image fewer right ({counts})"
    elif net >= 1 and not loss_rose:
        improved, reason = False, (f"{net} more validation image(s) right ({counts}), but within noise: {accuracy_text} "
                                   f"includes 0, and these images also picked the fine-tuned model's best epoch, so "
                                   f"its score on them is optimistic; keeping {frozen_name}")
    elif net < 0:
        improved, reason = False, f"{-net} fewer validation image(s) right ({counts}); keeping {frozen_name}"
    elif loss_rose:
        improved, reason = False, f"{loss_text}: higher beyond noise ({counts}); keeping {frozen_name}"
    else:
        improved, reason = False, (f"no change beyond noise: accuracy unchanged ({counts}), {loss_text} includes 0 "
                                   f"or is smaller than {LOSS_MARGIN}; keeping {frozen_name}")
    return {
        "improved": improved, "reason": reason, "images": int(n), "gained": gained, "lost": lost,
        "accuracy_change": float(net / n) if n else 0.0, "accuracy_change_interval": [acc_low, acc_high],
        "loss_change": mean, "loss_change_interval": [low, high],
        "loss_margin": LOSS_MARGIN, "confidence": CONFIDENCE, "bootstrap_samples": BOOTSTRAP_SAMPLES,
        "mcnemar_p": mcnemar_p(gained, lost), "picked_here": bool(picked_here),
    }
