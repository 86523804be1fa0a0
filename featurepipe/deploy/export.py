"""Stage `export`: a run's model as ONE deployable network, raw RGB images in, class probabilities out.

The network carries everything predict applies: resizing to the run's image size with its resize
policy, the backbone's pixel preprocessing, the frozen base and pooling, and the head (rebuilt
as Keras layers by featurepipe.heads.to_keras), or the fine-tuned model when the run has one.

    keras       OUT/model.keras      input uint8 (batch, H, W, 3), any H and W; load with
                                     keras.saving.load_model(path, safe_mode=True) after
                                     `import featurepipe.heads.to_keras` (registers featurepipe's
                                     layers: Preprocess, PlattOneVsRest, InferenceMode)
    savedmodel  OUT/saved_model/     same input; tf.saved_model.load(path).serve(images); no
                                     featurepipe or Keras code needed to load it
    tflite      OUT/model.tflite     input uint8 (1, size, size, 3): images ALREADY resized to the
                                     run's size with its resize policy (fixed shapes keep the
                                     interpreter on builtin ops and preallocated tensors); run with
                                     LiteRT (ai-edge-litert), checked right after writing

Every format also writes OUT/labels.txt (one class per line, output index order) and
OUT/export.json describing inputs, outputs, labels and size.
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
from featurepipe.rundir.model import RunModel
from featurepipe.rundir.run import open_run
from featurepipe.core.progress import ProgressCallback, report

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
                "seconds": round(self.seconds, 3)}


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
    # the head's Dropout. The wrapper pins everything after resizing to inference.
    return keras.Model(images, InferenceMode(inner, name="classifier")(x), name="featurepipe_classifier")


def vote_model(run: RunModel, cache_dir: Optional[str | os.PathLike] = None):
    """A vote run as one network: uint8 (n, H, W, 3) -> the average of every member's probabilities,
    each member resizing the image its own way and running its own backbone (one copy of each
    backbone's weights, shared by the members that use it)."""
    import keras

    from featurepipe.backbones.build import build_feature_model
    from featurepipe.backbones.layers import InferenceMode
    from featurepipe.heads.to_keras import head_to_keras

    root = run.cache_dir(cache_dir)
    images = keras.Input((None, None, 3), dtype="uint8", name="images")
    bases: dict[str, object] = {}
    outputs = []
    for index, member in enumerate(run.members):
        # The same backbone at the same size is the same network whatever the resize policy: one layer,
        # called once per member that uses it (a shared layer saves once; a shared nested Model does not).
        shared = json.dumps({**member.spec.to_dict(), "resize": None}, sort_keys=True, default=str)
        if shared not in bases:
            bases[shared] = InferenceMode(build_feature_model(member.spec, root), name=f"backbone_{len(bases)}")
        features = bases[shared](_resized(member, images, prefix=f"member_{index}_"))
        head = head_to_keras(member.load_head(), int(features.shape[-1]), name=f"head_{index}")
        # InferenceMode as in any_size_model: a dense head's Dropout stays off however the model is called.
        outputs.append(InferenceMode(head, name=f"classifier_{index}")(features))
    weights = run.weights
    if len(set(weights)) > 1:
        # A weighted vote (its selection added a member more than once): built-in layers only, so the
        # exported file still loads with safe_mode=True (a Lambda would not).
        outputs = [keras.layers.Rescaling(w, name=f"weight_{i}")(o) for i, (w, o) in enumerate(zip(weights, outputs))]
        return keras.Model(images, keras.layers.Add(name="vote")(outputs), name="featurepipe_vote")
    return keras.Model(images, keras.layers.Average(name="vote")(outputs), name="featurepipe_vote")


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


def tflite_interpreter(path: str | os.PathLike):
    """(interpreter, runtime name) for a .tflite file: LiteRT (`ai-edge-litert`, TensorFlow's successor
    to tf.lite.Interpreter) where installed, else TensorFlow's own copy of the same runtime."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter(model_path=str(path)), f"ai-edge-litert {package_version('ai-edge-litert')}"
    except ImportError:
        import warnings

        import tensorflow as tf

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # its deprecation notice points at LiteRT, which is absent
            return tf.lite.Interpreter(model_path=str(path)), f"tf.lite.Interpreter (tensorflow {tf.__version__})"


def _check_tflite(path: Path, image_size: int, n_classes: int) -> str:
    """Run the written file once on a grey image; returns the runtime that ran it."""
    import numpy as np

    interpreter, runtime = tflite_interpreter(path)
    interpreter.allocate_tensors()
    given, taken = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.set_tensor(given["index"], np.full((1, image_size, image_size, 3), 128, np.uint8))
    interpreter.invoke()
    out = interpreter.get_tensor(taken["index"])
    if out.shape != (1, n_classes) or not np.isfinite(out).all() or abs(float(out.sum()) - 1.0) > 1e-3:
        raise FeaturepipeError(f"the TFLite file {path} does not run correctly under {runtime} (output "
                               f"{out.shape}, sum {float(out.sum()):.4f}); export to keras or savedmodel instead")
    return runtime


# How to run model.tflite, written into export.json: LiteRT is the maintained runtime.
TFLITE_RUN = (
    "pip install ai-edge-litert; then in Python: from ai_edge_litert.interpreter import Interpreter; "
    "it = Interpreter(model_path='model.tflite'); it.allocate_tensors(); "
    "it.set_tensor(it.get_input_details()[0]['index'], image[None]); it.invoke(); "
    "p = it.get_tensor(it.get_output_details()[0]['index'])[0]  "
    "(image: uint8 (size, size, 3) RGB resized as 'input.resizing' says; p[i] is the probability of line i+1 "
    "of labels.txt). tf.lite.Interpreter takes the same calls but is deprecated."
)


def _describe(run: RunModel, fmt: str, artefact: Path, input_shape: list) -> dict:
    n = len(run.classes)
    resize_text = {"squash": "the whole image squashed to size x size (aspect ratio not kept)",
                   "center_crop": "the central square (side = the shorter side) resized to size x size",
                   "letterbox": f"the longer side resized to size, centred on a size x size square of grey "
                                f"{LETTERBOX_FILL}"}[run.resize]
    if fmt == "tflite":
        resizing = (f"NOT inside the model: resize every image to {run.image_size} x {run.image_size} first "
                    f"({resize_text}, bilinear), then feed one image at a time")
    else:
        resizing = f"inside the model (bilinear, antialiased): {resize_text}"
    meta = {
        "format": fmt,
        "artefact": artefact.name,
        "model_kind": run.kind,
        "labels": LABELS,
        "classes": run.classes,
        "image_size": run.image_size,
        "resize": run.resize,
        "input": {"name": "images", "dtype": "uint8", "shape": input_shape,
                  "layout": "RGB, channels last, 0..255 (no scaling: the backbone's preprocessing is inside)",
                  "resizing": resizing},
        "output": {"dtype": "float32", "shape": [input_shape[0], n],
                   "meaning": f"class probabilities (softmax, rows sum to 1), index i = line i+1 of {LABELS}"},
        "source_run": str(run.run_dir.resolve()),
        "featurepipe_version": package_version("featurepipe"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if fmt == "savedmodel":
        meta["endpoint"] = "serve"
        meta["load"] = "tf.saved_model.load(path).serve(images)"
    elif fmt == "keras":
        meta["load"] = "import featurepipe.heads.to_keras; keras.saving.load_model(path, safe_mode=True)"
    else:
        meta["load"] = "ai_edge_litert.interpreter.Interpreter(model_path=path) (pip install ai-edge-litert)"
        meta["run"] = TFLITE_RUN
    if run.is_vote:
        meta["image_size"] = meta["resize"] = None
        meta["input"]["resizing"] = "inside the model (bilinear, antialiased), once per member as listed in `members`"
        meta["head"] = {"head": "vote", "meaning": "the average of the members' class probabilities"}
        meta["members"] = [{"backbone": m.spec.to_dict(), "image_size": m.image_size, "resize": m.resize,
                            "head": {k: (m.head_meta or {}).get(k) for k in ("head", "params", "augment", "file", "sha256")}}
                           for m in run.members]
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
) -> ExportResult:
    """Write the run's model to the folder `out` as `fmt` ("keras" | "savedmodel" | "tflite").

    `out` may be new, empty, or an earlier export (whose artefact is replaced); any other folder
    with files in it is refused unless `overwrite`."""
    started = time.perf_counter()
    if fmt not in FORMATS:
        raise FeaturepipeError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise FeaturepipeError(f"--out {out} is a file; export writes a folder (model, {LABELS}, {EXPORT_META})")
    check_export_folder(out, overwrite)
    run = open_run(run_dir, model, trust)
    if run.is_vote and fmt == "tflite":
        raise FeaturepipeError(
            f"{run.run_dir}'s model averages {len(run.members)} feature sets, each resizing the image its own way "
            f"({', '.join(sorted({f'{m.image_size} px {m.resize}' for m in run.members}))}); TFLite takes one fixed "
            f"input size, so the vote cannot be one .tflite file. Export --format keras or savedmodel (any image "
            f"size, resizing inside), or make a one-feature-set run for TFLite: `featurepipe run DATA --quick` "
            f"or `--backbone NAME --resize POLICY`")
    report(progress, "export", 0, 3, f"building the {run.kind} model")
    inner = None if run.is_vote else fixed_size_model(run, cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    artefact = out / ARTEFACTS[fmt]
    report(progress, "export", 1, 3, f"writing {artefact.name}")
    if fmt == "tflite":
        import keras

        from featurepipe.backbones.layers import InferenceMode

        images = keras.Input((run.image_size, run.image_size, 3), batch_size=1, dtype="uint8", name="images")
        network = keras.Model(images, InferenceMode(inner, name="classifier")(images), name="featurepipe_classifier")
        _save_tflite(network, artefact)
        checked_with = _check_tflite(artefact, run.image_size, len(run.classes))
        input_shape = [1, run.image_size, run.image_size, 3]
    else:
        network = vote_model(run, cache_dir) if run.is_vote else any_size_model(run, inner)
        if fmt == "keras":
            _save_keras(network, artefact)
        else:
            _save_savedmodel(network, artefact)
        input_shape = [None, None, None, 3]
    report(progress, "export", 2, 3, "writing labels and metadata")
    labels = out / LABELS
    atomic.write_text(labels, "".join(f"{c}\n" for c in run.classes))
    meta = _describe(run, fmt, artefact, input_shape)
    if fmt == "tflite":
        meta["checked_with"] = checked_with
    if artefact.is_file():
        meta["sha256"] = file_sha256(artefact)
    write_json(out / EXPORT_META, meta)
    report(progress, "export", 3, 3, "done")
    return ExportResult(artefact, labels, out / EXPORT_META, fmt, run.kind, run.classes, run.image_size,
                        run.resize, input_shape, time.perf_counter() - started, meta)
