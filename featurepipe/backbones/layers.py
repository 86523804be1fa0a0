"""Serializable Keras layers that carry a backbone's preprocessing inside the model itself.

Saved models then load with safe_mode=True (no Lambda layers) and predict/export apply exactly the
training-time preprocessing.
"""

from __future__ import annotations

import keras
from keras import ops

PREPROCESS_MODES = ("caffe", "tf", "torch", "lite", "none")
_CAFFE_MEAN_RGB = (123.68, 116.779, 103.939)
_TORCH_MEAN_RGB = (0.485 * 255.0, 0.456 * 255.0, 0.406 * 255.0)
_IMAGENET_STD_RGB = (0.229 * 255.0, 0.224 * 255.0, 0.225 * 255.0)


def preprocess(x, mode: str):
    """Map RGB pixels in 0..255 to what a backbone was trained on (numpy arrays or tensors)."""
    if mode == "caffe":
        x = x[..., ::-1]
        return x - ops.convert_to_tensor(_CAFFE_MEAN_RGB[::-1], dtype=x.dtype)
    if mode == "tf":
        return x / 127.5 - 1.0
    if mode == "torch":
        mean = ops.convert_to_tensor(_TORCH_MEAN_RGB, dtype=x.dtype)
        std = ops.convert_to_tensor(_IMAGENET_STD_RGB, dtype=x.dtype)
        return (x - mean) / std
    if mode == "lite":
        return (x - 127.0) / 128.0
    if mode == "none":
        return x
    raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of {PREPROCESS_MODES}")


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
