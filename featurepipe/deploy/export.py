"""Stage `export`: a run's model as ONE deployable network, raw RGB images in, class probabilities out.

The network carries everything predict applies: the backbone's pixel preprocessing, the frozen base
and pooling, and the head (rebuilt as Keras layers by featurepipe.heads.to_keras), or the fine-tuned
model when the run has one; a vote averages its members inside (weighted when the vote lists
weights). featurepipe.deploy.plain then rewrites it with Keras' built-in layers and ops only, so
no format needs featurepipe to load.

    keras       OUT/model.keras      input uint8 (batch, H, W, 3), any H and W, resized inside
                                     (TensorFlow's antialiased bilinear); keras.saving.load_model(path)
    savedmodel  OUT/saved_model/     same input; tf.saved_model.load(path).serve(images)
    tflite      OUT/model.tflite     input(s) uint8 (1, size, size, 3): images ALREADY resized by
                                     OUT/preprocess.py exactly as predict does (fixed shapes keep the
                                     interpreter on builtin ops; LiteRT has no antialiased resize, see
                                     benchmarks/README.md). A vote has one input per distinct member
                                     size and resize policy, named images_<size>_<policy>. Run with
                                     LiteRT (ai-edge-litert), checked right after writing

Every format also writes OUT/labels.txt (one class per line, output index order), OUT/preprocess.py
(featurepipe.deploy.recipe: predict's decoding in plain Pillow) and OUT/export.json describing
inputs, outputs, labels, size and the measured agreement with predict (deploy.agreement).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from featurepipe.core import atomic
from featurepipe.core.atomic import write_json
from featurepipe.backbones.fingerprint import package_version
from featurepipe.backbones.registry import keras_name
from featurepipe.backbones.spec import LETTERBOX_FILL
from featurepipe.core.errors import FeaturepipeError
from featurepipe.core.hashcache import file_sha256
from featurepipe.rundir.layout import EXPORT_KERAS, EXPORT_META, MODEL_META
from featurepipe.rundir.model import RunModel, vote_weights
from featurepipe.rundir.run import open_run
from featurepipe.core.progress import ProgressCallback, report
from featurepipe.deploy.agreement import DEFAULT_IMAGES
from featurepipe.deploy.tflite import sized_input_name, tflite_interpreter

FORMATS = ("keras", "savedmodel", "tflite")
ARTEFACTS = {"keras": EXPORT_KERAS, "savedmodel": "saved_model", "tflite": "model.tflite"}
LABELS = "labels.txt"


@dataclass
class ExportResult:
    path: Path                       # the model artefact (file, or directory for savedmodel)
    labels_path: Path
    meta_path: Path
    format: str
    model_kind: str                  # "finetuned" | "head"
    classes: list[str]
    image_size: int
    resize: str
    input_shape: list                # None for dimensions of any size
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "labels": str(self.labels_path), "meta": str(self.meta_path),
                "format": self.format, "model_kind": self.model_kind, "classes": self.classes,
                "image_size": self.image_size, "resize": self.resize, "input_shape": self.input_shape,
                "seconds": round(self.seconds, 3), "agreement": self.meta.get("agreement")}


# ------------------------------------------------------------------------------------------ building


def fixed_size_model(run: RunModel, cache_dir: Optional[str | os.PathLike] = None):
    """uint8 (n, size, size, 3) RGB -> probabilities: exactly what predict computes on decoded images."""
    if run.kind == "finetuned":
        return run.load_finetuned()
    from featurepipe.backbones.build import build_feature_model
    from featurepipe.heads.combined import combine   # the same model fine-tuning starts from

    features = build_feature_model(run.spec, run.cache_dir(cache_dir))
    return combine(features, run.load_head(), name=f"featurepipe_{keras_name(run.spec.name)}")


def _resized(run: RunModel, images, prefix: str = ""):
    """The run's resize policy applied to any-size uint8 images inside the graph, rounded like PIL."""
    import keras

    # float pixels in: resizing computes in float anyway, and Keras' letterbox padding of uint8
    # images fails when called eagerly (it builds its float fill in the input's dtype).
    images = keras.ops.cast(images, "float32")
    # antialias: PIL's bilinear (what training decoded with) widens its kernel when shrinking;
    # without it TF's bilinear aliases and drifts by a few grey levels on downscaled photos.
    x = keras.layers.Resizing(run.image_size, run.image_size, interpolation="bilinear",
                              crop_to_aspect_ratio=run.resize == "center_crop",
                              pad_to_aspect_ratio=run.resize == "letterbox", fill_mode="constant",
                              fill_value=float(LETTERBOX_FILL), antialias=True, name=f"{prefix}resize")(images)
    # Training saw uint8 pixels (PIL rounds). The inner model's uint8 input casts by truncation,
    # so +0.5 first makes it round-half-up; bilinear output stays within 0..255, so no overflow.
    return keras.layers.Rescaling(1.0, offset=0.5, name=f"{prefix}round_to_uint8")(x)


def any_size_model(run: RunModel, inner):
    """uint8 (n, H, W, 3) of any H, W -> probabilities, the run's resize policy inside the graph."""
    import keras

    from featurepipe.backbones.layers import InferenceMode

    images = keras.Input((None, None, 3), dtype="uint8", name="images")
    x = _resized(run, images)
    # Keras' image preprocessing layers default to training=True, and the first layer to resolve
    # the flag sets it for the whole call: model(x) and the SavedModel's serve() would then run
    # the head's Dropout. The wrapper pins everything after resizing to inference (and export's
    # plain rewrite, which drops it, removes the Dropout layers and freezes the rest instead).
    return keras.Model(images, InferenceMode(inner, name="classifier")(x), name="featurepipe_classifier")


def vote_model(run: RunModel, cache_dir: Optional[str | os.PathLike] = None, sized: bool = False):
    """A vote run as one network: the (weighted) average of every member's probabilities, one copy
    of each backbone's weights, shared by the members that use it.

    sized=False: one input uint8 (n, H, W, 3), each member resizing the image its own way inside.
    sized=True (TFLite): one input (1, size, size, 3) per distinct size and resize policy of the
    members, named by sized_input_name, each fed an image already resized that way (recipe.py)."""
    import keras

    from featurepipe.backbones.build import build_feature_model
    from featurepipe.backbones.layers import InferenceMode
    from featurepipe.heads.to_keras import head_to_keras

    root = run.cache_dir(cache_dir)
    images = None if sized else keras.Input((None, None, 3), dtype="uint8", name="images")
    inputs: dict[str, object] = {}
    bases: dict[str, object] = {}
    outputs = []
    for index, member in enumerate(run.members):
        if sized:
            name = sized_input_name(member)
            if name not in inputs:
                inputs[name] = keras.Input((member.image_size, member.image_size, 3), batch_size=1,
                                           dtype="uint8", name=name)
            x = inputs[name]
        else:
            x = _resized(member, images, prefix=f"member_{index}_")
        # The same backbone at the same size is the same network whatever the resize policy: one layer,
        # called once per member that uses it (a shared layer saves once; a shared nested Model does not).
        shared = json.dumps({**member.spec.to_dict(), "resize": None}, sort_keys=True, default=str)
        if shared not in bases:
            bases[shared] = InferenceMode(build_feature_model(member.spec, root), name=f"backbone_{len(bases)}")
        features = bases[shared](x)
        head = head_to_keras(member.load_head(), int(features.shape[-1]), name=f"head_{index}")
        # InferenceMode as in any_size_model: a dense head's Dropout stays off however the model is called.
        outputs.append(InferenceMode(head, name=f"classifier_{index}")(features))
    weights = vote_weights(run)
    if weights is None:
        voted = keras.layers.Average(name="vote")(outputs)
    else:
        voted = keras.layers.Add(name="vote")([keras.layers.Rescaling(w, name=f"weight_{i}")(p)
                                               for i, (w, p) in enumerate(zip(weights, outputs))])
    return keras.Model(list(inputs.values()) if sized else images, voted, name="featurepipe_vote")


def sized_model(run: RunModel, inner):
    """TFLite's network for a one-feature-set run: uint8 (1, size, size, 3), already resized."""
    import keras

    from featurepipe.backbones.layers import InferenceMode

    images = keras.Input((run.image_size, run.image_size, 3), batch_size=1, dtype="uint8", name="images")
    return keras.Model(images, InferenceMode(inner, name="classifier")(images), name="featurepipe_classifier")


def export_network(run: RunModel, fmt: str, cache_dir: Optional[str | os.PathLike] = None):
    """The network `fmt` writes, with Keras' built-in layers and ops only (featurepipe.deploy.plain)."""
    from featurepipe.deploy.plain import plain_model

    if fmt == "tflite":
        network = vote_model(run, cache_dir, sized=True) if run.is_vote else sized_model(
            run, fixed_size_model(run, cache_dir))
    else:
        network = vote_model(run, cache_dir) if run.is_vote else any_size_model(run, fixed_size_model(run, cache_dir))
    return plain_model(network)


# ------------------------------------------------------------------------------------------ writing


# Every artefact goes through featurepipe.core.atomic: readers never see half a model.


def _save_keras(model, path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    with atomic.atomic_path(path) as tmp:     # keeps the .keras suffix Keras insists on
        model.save(str(tmp))


def _save_savedmodel(model, path: Path) -> None:
    tmp = atomic.temp_sibling(path)
    try:
        model.export(str(tmp), format="tf_saved_model", verbose=False)
        atomic.replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_tflite(model, path: Path) -> None:
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="featurepipe-tflite-") as staging:
        # Converting from a SavedModel written by Keras 3 itself: the converter's Keras entry point
        # targets tf.keras graphs and is not reliable with Keras 3 models.
        saved = Path(staging) / "saved_model"
        model.export(str(saved), format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        try:
            flatbuffer = converter.convert()
        except Exception as error:  # the converter raises ConverterError and friends with long logs
            raise FeaturepipeError(f"TFLite conversion failed: {str(error).strip().splitlines()[0]}") from None
    atomic.write_bytes(path, flatbuffer)


def _check_tflite(path: Path, inputs: list[tuple[str, int, str]], n_classes: int) -> str:
    """Run the written file once on grey images; returns the runtime that ran it."""
    import numpy as np

    interpreter, runtime = tflite_interpreter(path)
    runner = interpreter.get_signature_runner("serving_default")
    out = np.asarray(runner(**{name: np.full((1, size, size, 3), 128, np.uint8) for name, size, _ in inputs})["output_0"])
    if out.shape != (1, n_classes) or not np.isfinite(out).all() or abs(float(out.sum()) - 1.0) > 1e-3:
        raise FeaturepipeError(f"the TFLite file {path} does not run correctly under {runtime} (output "
                               f"{out.shape}, sum {float(out.sum()):.4f}); export to keras or savedmodel instead")
    return runtime


RECIPE = "preprocess.py"     # featurepipe.deploy.recipe, copied beside every export


def _tflite_run(inputs: list[tuple[str, int, str]]) -> str:
    """How to run model.tflite, written into export.json: LiteRT is the maintained runtime."""
    feeds = ", ".join(f"{name}=sized_image(path, {size}, '{policy}')[None]" for name, size, policy in inputs)
    return (
        "pip install ai-edge-litert pillow numpy; then in Python, beside preprocess.py: "
        "from ai_edge_litert.interpreter import Interpreter; from preprocess import sized_image; "
        "runner = Interpreter(model_path='model.tflite').get_signature_runner('serving_default'); "
        f"p = runner({feeds})['output_0'][0]  "
        "(p[i] is the probability of line i+1 of labels.txt; one image per call). "
        "tf.lite.Interpreter takes the same calls but is deprecated."
    )


def _describe(run: RunModel, fmt: str, artefact: Path, inputs: list[dict]) -> dict:
    n = len(run.classes)
    resize_text = {"squash": "the whole image squashed to size x size (aspect ratio not kept)",
                   "center_crop": "the central square (side = the shorter side) resized to size x size",
                   "letterbox": f"the longer side resized to size, centred on a size x size square of grey "
                                f"{LETTERBOX_FILL}"}
    layout = "RGB, channels last, 0..255 (no scaling: the backbone's preprocessing is inside)"
    for given in inputs:
        given.update({"dtype": "uint8", "layout": layout})
        if fmt == "tflite":
            given["resizing"] = (f"NOT inside the model: {RECIPE}'s sized_image(path, {given['image_size']}, "
                                 f"'{given['resize']}') ({resize_text[given['resize']]}, Pillow bilinear, exactly as "
                                 f"featurepipe predict decodes)")
        elif run.is_vote:
            given["resizing"] = ("inside the model (TensorFlow bilinear, antialiased), once per member as listed in "
                                 f"`members`; feed {RECIPE}'s full_image(path)")
        else:
            given["resizing"] = (f"inside the model (TensorFlow bilinear, antialiased): {resize_text[run.resize]}; "
                                 f"feed {RECIPE}'s full_image(path)")
    meta = {
        "format": fmt,
        "artefact": artefact.name,
        "model_kind": run.kind,
        "labels": LABELS,
        "preprocess": RECIPE,
        "classes": run.classes,
        "image_size": None if run.is_vote else run.image_size,
        "resize": None if run.is_vote else run.resize,
        "inputs": inputs,
        "input": inputs[0],        # the first (the only one, but for a TFLite vote): what older readers read
        "output": {"dtype": "float32", "shape": [inputs[0]["shape"][0], n],
                   "meaning": f"class probabilities (softmax, rows sum to 1), index i = line i+1 of {LABELS}"},
        "layers": "Keras built-in layers and keras.ops only: no featurepipe code is needed to load or run it",
        "source_run": str(run.run_dir.resolve()),
        "featurepipe_version": package_version("featurepipe"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if fmt == "savedmodel":
        meta["endpoint"] = "serve"
        meta["load"] = "tf.saved_model.load(path).serve(images)"
    elif fmt == "keras":
        meta["load"] = "keras.saving.load_model(path) (safe_mode stays on; no featurepipe import needed)"
    else:
        meta["load"] = "ai_edge_litert.interpreter.Interpreter(model_path=path) (pip install ai-edge-litert)"
        meta["run"] = _tflite_run([(i["name"], i["image_size"], i["resize"]) for i in inputs])
    if run.is_vote:
        weights = vote_weights(run)
        meta["head"] = {"head": "vote", "meaning": "the average of the members' class probabilities" if weights is None
                        else "the members' class probabilities averaged with `weight`"}
        meta["members"] = [{"backbone": m.spec.to_dict(), "image_size": m.image_size, "resize": m.resize,
                            "weight": 1.0 / len(run.members) if weights is None else weights[i],
                            "head": {k: (m.head_meta or {}).get(k) for k in ("head", "params", "augment", "file", "sha256")}}
                           for i, m in enumerate(run.members)]
        if fmt == "tflite":
            for m, member in zip(meta["members"], run.members):
                m["input"] = sized_input_name(member)
    elif run.kind == "head":
        head = run.head_meta or {}
        meta["backbone"] = run.spec.to_dict()
        meta["head"] = {k: head.get(k) for k in ("head", "params", "augment", "file", "sha256")}
    else:
        meta["finetuned"] = {k: (run.model_meta or {}).get(k) for k in ("file", "sha256")}
        meta["finetuned"]["meta"] = MODEL_META
    return meta


def check_export_folder(out: Path, overwrite: bool) -> None:
    """Refuse to write into a user's folder that is not an earlier export, unless told to."""
    if overwrite or not out.is_dir() or not any(out.iterdir()):
        return
    try:
        earlier = json.loads((out / EXPORT_META).read_text())
        if isinstance(earlier, dict) and earlier.get("format") in FORMATS:
            return
    except (OSError, ValueError):
        pass
    raise FeaturepipeError(f"--out {out} already holds files and is not a featurepipe export (no {EXPORT_META}); "
                           f"pick a new or empty folder, or pass --overwrite to write into it anyway")


def export(
    run_dir: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike,
    cache_dir: Optional[str | os.PathLike] = None,
    model: str = "auto",
    progress: Optional[ProgressCallback] = None,
    trust: bool = False,
    overwrite: bool = False,
    check_images: int = DEFAULT_IMAGES,
) -> ExportResult:
    """Write the run's model to the folder `out` as `fmt` ("keras" | "savedmodel" | "tflite").

    `out` may be new, empty, or an earlier export (whose artefact is replaced); any other folder
    with files in it is refused unless `overwrite`. `check_images`: how many of the run's training
    images the written artefact is compared with predict on (export.json's `agreement`; 0: none)."""
    from featurepipe.deploy import agreement, recipe

    started = time.perf_counter()
    if fmt not in FORMATS:
        raise FeaturepipeError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if int(check_images) < 0:
        raise FeaturepipeError(f"check_images must be 0 or more, not {check_images}")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise FeaturepipeError(f"--out {out} is a file; export writes a folder (model, {LABELS}, {EXPORT_META})")
    check_export_folder(out, overwrite)
    run = open_run(run_dir, model, trust)
    steps = 4
    what = f"a vote over {len(run.members)} feature sets" if run.is_vote else f"the {run.kind} model"
    report(progress, "export", 0, steps, f"building {what} with built-in Keras layers")
    network = export_network(run, fmt, cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    artefact = out / ARTEFACTS[fmt]
    report(progress, "export", 1, steps, {"keras": f"writing {artefact.name}",
                                          "savedmodel": f"writing {artefact.name}/ (tracing the graph: the slow step)",
                                          "tflite": f"converting to {artefact.name} (via a SavedModel: the slow step)"}[fmt])
    if fmt == "tflite":
        _save_tflite(network, artefact)
        sized = agreement.tflite_inputs(run)
        checked_with = _check_tflite(artefact, sized, len(run.classes))
        inputs = [{"name": name, "shape": [1, size, size, 3], "image_size": size, "resize": policy}
                  for name, size, policy in sized]
    else:
        if fmt == "keras":
            _save_keras(network, artefact)
        else:
            _save_savedmodel(network, artefact)
        inputs = [{"name": "images", "shape": [None, None, None, 3]}]
    report(progress, "export", 2, steps, f"comparing {artefact.name} with predict")
    labels = out / LABELS
    atomic.write_text(labels, "".join(f"{c}\n" for c in run.classes))
    atomic.write_text(out / RECIPE, Path(recipe.__file__).read_text())
    measured = agreement.measure(run, fmt, artefact, int(check_images), cache_dir, model, trust, progress)
    report(progress, "export", 3, steps, "writing labels and metadata")
    meta = _describe(run, fmt, artefact, inputs)
    meta["agreement"] = measured
    if fmt == "tflite":
        meta["checked_with"] = checked_with
    if artefact.is_file():
        meta["sha256"] = file_sha256(artefact)
    write_json(out / EXPORT_META, meta)
    report(progress, "export", steps, steps, "done")
    return ExportResult(artefact, labels, out / EXPORT_META, fmt, run.kind, run.classes, run.image_size,
                        run.resize, inputs[0]["shape"], time.perf_counter() - started, meta)
