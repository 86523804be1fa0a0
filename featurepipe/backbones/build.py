"""Building the frozen feature extractor for a BackboneSpec: uint8 RGB images in, feature vectors out."""

from __future__ import annotations

import random
import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from featurepipe.backbones.registry import BackboneInfo, get_backbone, keras_name
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.core.errors import BackboneError, DiskFullError, WeightsUnavailableError, disk_full, is_disk_full

_URL_RE = re.compile(r"https?://\S+?\.(?:h5|keras|weights\.h5)")


def _keras_cache_dir() -> Path:
    import os

    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def _weights_unavailable(spec: BackboneSpec, error: Exception) -> WeightsUnavailableError:
    match = _URL_RE.search(str(error))
    if match:
        url = match.group(0)
        where = _keras_cache_dir() / url.rsplit("/", 1)[-1]
        hint = f"download {url} on a machine with internet and place it at {where}"
    else:
        hint = f"place the Keras ImageNet weights file for {spec.name} under {_keras_cache_dir()}"
    return WeightsUnavailableError(
        f"the ImageNet weights for {spec.name} could not be downloaded ({type(error).__name__}); {hint}, "
        f"or use the offline default backbone efficientnet_lite0"
    )


def build_base(info: BackboneInfo, spec: BackboneSpec, include_top: bool, cache_dir: Optional[Path]):
    """The backbone with its weights loaded as the spec says."""
    import keras

    input_shape = (spec.image_size, spec.image_size, 3)
    if include_top and spec.image_size != info.default_size:
        raise BackboneError(
            f"layer {spec.layer!r} of {spec.name} sits in the ImageNet classifier, which only takes "
            f"{info.default_size} px images; pass --image-size {info.default_size}"
        )
    if spec.weights == "imagenet":
        try:
            return info.builder(input_shape, include_top, "imagenet", cache_dir)
        except (WeightsUnavailableError, DiskFullError):
            raise
        except Exception as error:  # keras raises a bare Exception for a failed download
            if is_disk_full(error):
                raise disk_full(error, _keras_cache_dir()) from None
            if "URL fetch failure" in str(error) or isinstance(error, OSError):
                raise _weights_unavailable(spec, error) from None
            raise
    keras.utils.set_random_seed(spec.seed)
    with _private_seed_draws(spec.seed):
        model = info.builder(input_shape, include_top, None, cache_dir)
    if spec.weights != "random":
        path = Path(spec.weights).expanduser()
        try:
            model.load_weights(str(path))
        except Exception as error:
            raise BackboneError(
                f"cannot load weights from {path} into {spec.name} ({error}); the file must come from the "
                f"same backbone and input layout (include_top={include_top})"
            ) from None
    return model


_SEED_LOCK = threading.Lock()


@contextmanager
def _private_seed_draws(seed: int):
    """Keras seeds every initializer from Python's global `random` (make_default_seed in
    keras.src.random.seed_generator), so another thread using `random` during a build (the event
    loop of a Dask worker or client does) changes a weights="random" model. While building, Keras
    draws from a private random.Random(seed) instead: the very numbers the global generator gives
    after set_random_seed(seed) in a quiet process."""
    try:
        from keras.src.random import seed_generator
    except ImportError:      # another Keras layout: nothing to isolate (the single-threaded case is unchanged)
        yield
        return
    if not hasattr(seed_generator, "python_random"):
        yield
        return
    with _SEED_LOCK:
        shared = seed_generator.python_random
        seed_generator.python_random = random.Random(seed)
        try:
            yield
        finally:
            seed_generator.python_random = shared


# Layers that exist only in the ImageNet classifier on top of the conv base (include_top=True).
_TOP_LAYERS = frozenset({"flatten", "fc1", "fc2", "predictions", "avg_pool", "top_dropout", "dropout"})


def build_feature_model(spec: BackboneSpec, cache_dir: Optional[Path] = None):
    """A frozen Keras model: uint8 (n, s, s, 3) RGB -> float32 (n, d) features, preprocessing inside."""
    import keras

    from featurepipe.backbones.layers import Preprocess

    spec = spec.resolved()
    info = get_backbone(spec.name)
    base = build_base(info, spec, spec.layer in _TOP_LAYERS, cache_dir)
    base.trainable = False
    if spec.layer is not None:
        try:
            tap = base.get_layer(spec.layer).output
        except ValueError:
            names = [layer.name for layer in base.layers]
            raise BackboneError(
                f"{spec.name} has no layer named {spec.layer!r}; some of its layers: {', '.join(names[-12:])}"
            ) from None
        base = keras.Model(base.inputs, tap, name=f"{keras_name(spec.name)}_to_{spec.layer}")
    images = keras.Input((spec.image_size, spec.image_size, 3), dtype="uint8", name="images")
    x = Preprocess(info.preprocess, name="preprocess")(images)
    x = base(x, training=False)
    if len(x.shape) == 4:
        pooling = {"avg": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D,
                   "flatten": keras.layers.Flatten}[spec.pooling]
        # float32 pooling: under a mixed precision policy the base's float16 activations are
        # averaged in float32 (one rounding fewer); under float32 this changes nothing.
        x = pooling(name=f"{spec.pooling}_pool", dtype="float32")(x)
    elif len(x.shape) != 2:
        raise BackboneError(f"layer {spec.layer!r} gives outputs of shape {x.shape}; pick a conv or dense layer")
    return keras.Model(images, x, name=f"features_{keras_name(spec.name)}")


def inference_function(model, size: int):
    """A model taking uint8 (n, size, size, 3) images as one graph for any batch size, traced here, once.

    predict_on_batch traces again for every new batch shape (the last, partial batch), which costs
    as much as running dozens of images on a CPU. The concrete function is called, not the
    tf.function: TensorFlow counts traces per Python code object, so one trace per model of this
    closure (a vote's several networks, extract's feature sets) printed "triggered tf.function
    retracing" warnings although nothing was traced twice."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])
    def infer(images):
        return model(images, training=False)

    graph = infer.get_concrete_function()
    graph(tf.zeros([1, size, size, 3], tf.uint8))
    return lambda batch: graph(tf.convert_to_tensor(batch, dtype=tf.uint8)).numpy()
