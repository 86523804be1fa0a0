"""Serializable Keras layers that carry a backbone's preprocessing inside the model itself.

Saved models then load with safe_mode=True (no Lambda layers) and predict/export apply exactly the
training-time preprocessing. The constants (mean, std, channel order) live in the registry's
PREPROCESSING table, beside the backbones that use them.
"""

from __future__ import annotations

import keras
from keras import ops

from featurepipe.backbones.registry import PREPROCESSING

PREPROCESS_MODES = tuple(PREPROCESSING)


def preprocess(x, mode: str):
    """Map RGB pixels in 0..255 to what a backbone was trained on (numpy arrays or tensors), as
    registry.PREPROCESSING[mode] describes."""
    p = PREPROCESSING.get(mode)
    if p is None:
        raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of {PREPROCESS_MODES}")
    if p.mode == "none":
        return x
    mean, std = p.mean, p.std
    if p.bgr:
        x, mean, std = x[..., ::-1], mean[::-1], std[::-1]
    if p.scale_first:
        return x / ops.convert_to_tensor(std, dtype=x.dtype) - ops.convert_to_tensor(
            [m / s for m, s in zip(mean, std)], dtype=x.dtype)
    x = x - ops.convert_to_tensor(mean, dtype=x.dtype)
    if any(s != 1.0 for s in std):
        x = x / ops.convert_to_tensor(std, dtype=x.dtype)
    return x


@keras.saving.register_keras_serializable(package="featurepipe")
class Preprocess(keras.layers.Layer):
    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESS_MODES:
            raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of {PREPROCESS_MODES}")
        self.mode = mode

    def call(self, inputs):
        return preprocess(ops.cast(inputs, self.compute_dtype), self.mode)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


# Registered under its first name, "InferenceOnly": fine-tuned and exported files written before
# the rename name it so, and must keep loading.
@keras.saving.register_keras_serializable(package="featurepipe", name="InferenceOnly")
class InferenceMode(keras.layers.Wrapper):
    """Runs the wrapped layer/model (the backbone in a combined model, the whole classifier in an
    exported one) with training=False whatever its caller passes.

    Keras 3 functional models hand their own `training` flag to every nested call, overriding a
    `training=False` recorded when the graph was built. Fine-tuning needs the base in inference
    mode while the head trains (stochastic-depth Dropout off; BatchNorm layers are also kept
    non-trainable, which Keras treats as inference mode), so the base sits in this wrapper.
    `call` takes no `training` argument on purpose: Keras then never passes one in.
    """

    def call(self, inputs):
        return self.layer(inputs, training=False)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)
