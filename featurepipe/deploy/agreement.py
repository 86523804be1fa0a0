"""How closely an exported artefact reproduces `featurepipe predict`, measured at export time.

export.json states the measured maximum absolute difference in probability between the written
artefact (loaded back from its file, fed the way export.json tells users to feed it) and predict,
on a capped, evenly spaced sample of the run's own training images, beside the tolerance
featurepipe promises for that format:

- tflite is fed images resized by the shipped preprocess.py (featurepipe.deploy.recipe), which
  reproduces predict's decoding byte for byte: only float arithmetic differs (TOLERANCE_SIZED);
- keras and savedmodel take the whole decoded image and resize inside the graph with TensorFlow's
  antialiased bilinear, which is close to Pillow's (and skips predict's JPEG draft decoding), so a
  photo moves by a few 1e-3 (TOLERANCE_ANY_SIZE, measured on the demo in benchmarks/README.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from featurepipe.core.progress import ProgressCallback, report
from featurepipe.deploy import recipe
from featurepipe.rundir.model import RunModel

DEFAULT_IMAGES = 64
TOLERANCE_SIZED = 1e-4
TOLERANCE_ANY_SIZE = 2e-2


def tolerance(fmt: str) -> float:
    return TOLERANCE_SIZED if fmt == "tflite" else TOLERANCE_ANY_SIZE


def sample_images(run: RunModel, limit: int) -> tuple[list[str], str]:
    """Up to `limit` of the run's training images, evenly spaced in sorted order, and where from."""
    from featurepipe.deploy.predict import collect_inputs

    source = ((run.config or {}).get("dataset") or {}).get("source")
    if not source or not Path(source).is_dir():
        return [], f"the run's dataset folder {source!r} is not at hand"
    paths = sorted(collect_inputs([source]))
    if len(paths) > limit:
        paths = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, limit).round()]
    return paths, source


def tflite_inputs(run: RunModel) -> list[tuple[str, int, str]]:
    """(input name, size, resize policy) of each input of the run's .tflite, in first-use order."""
    from featurepipe.deploy.tflite import sized_input_name

    if not run.is_vote:
        return [("images", run.image_size, run.resize)]
    seen: dict[str, tuple[str, int, str]] = {}
    for member in run.members:
        seen.setdefault(sized_input_name(member), (sized_input_name(member), member.image_size, member.resize))
    return list(seen.values())


def artefact_runner(fmt: str, artefact: Path, run: RunModel) -> Callable[[str], np.ndarray]:
    """path -> probabilities (n_classes,) computed by the artefact on disk, as a user would run it."""
    if fmt == "keras":
        import keras
        import tensorflow as tf

        model = keras.saving.load_model(str(artefact))    # safe_mode: the file holds built-ins only
        # traced once for any image size: eager calls of a vote's backbones cost twice as much
        call = tf.function(lambda x: model(x, training=False),
                           input_signature=[tf.TensorSpec([1, None, None, 3], tf.uint8)])
        return lambda path: call(tf.constant(recipe.full_image(path)[None])).numpy()[0]
    if fmt == "savedmodel":
        import tensorflow as tf

        loaded = tf.saved_model.load(str(artefact))
        return lambda path: loaded.serve(tf.constant(recipe.full_image(path)[None])).numpy()[0]
    from featurepipe.deploy.tflite import tflite_interpreter

    interpreter, _ = tflite_interpreter(artefact)
    runner = interpreter.get_signature_runner("serving_default")
    inputs = tflite_inputs(run)

    def run_one(path: str) -> np.ndarray:
        fed = {name: recipe.sized_image(path, size, policy)[None] for name, size, policy in inputs}
        return np.asarray(runner(**fed)["output_0"])[0]

    return run_one


def measure(run: RunModel, fmt: str, artefact: Path, limit: int = DEFAULT_IMAGES,
            cache_dir: Optional[str | os.PathLike] = None, model: str = "auto", trust: bool = False,
            progress: Optional[ProgressCallback] = None) -> dict:
    """export.json's `agreement`: the artefact vs predict on up to `limit` training images."""
    from featurepipe.deploy.predict import predict

    promised = tolerance(fmt)
    fed = ("images resized by preprocess.py (sized_image), as predict decodes them" if fmt == "tflite"
           else "whole images decoded by preprocess.py (full_image), resized inside the model")
    paths, source = sample_images(run, limit) if limit > 0 else ([], "not asked for (--check-images 0)")
    base = {"tolerance": promised, "fed": fed, "compared_with": "featurepipe predict"}
    if not paths:
        return {**base, "images": 0, "max_abs_diff": None, "within_tolerance": None, "note": f"not measured: {source}"}
    expected = predict(run.run_dir, paths, cache_dir=cache_dir, model=model, trust=trust).frame
    columns = [f"p[{c}]" for c in run.classes]
    run_one = artefact_runner(fmt, artefact, run)
    worst, diffs, compared = None, [], 0
    for index, (path, row) in enumerate(zip(paths, expected[columns].to_numpy())):
        report(progress, "check", index, len(paths), f"{fmt} vs predict")
        if not np.isfinite(row).all():
            continue                      # predict could not decode it: nothing to compare
        diff = float(np.max(np.abs(run_one(path) - row)))
        diffs.append(diff)
        compared += 1
        if worst is None or diff > worst[1]:
            worst = (path, diff)
    report(progress, "check", len(paths), len(paths), "done")
    if not compared:
        return {**base, "images": 0, "max_abs_diff": None, "within_tolerance": None,
                "note": "not measured: predict decoded none of the sampled images"}
    return {**base, "images": compared, "sample": f"{compared} of the training images in {source}, evenly spaced",
            "max_abs_diff": worst[1], "mean_abs_diff": float(np.mean(diffs)), "worst_image": worst[0],
            "within_tolerance": bool(worst[1] <= promised)}
