"""A featurepipe Keras model re-expressed with Keras' own layers and ops only, for export.

featurepipe's models carry a few custom layers (Preprocess, InferenceMode, PlattOneVsRest,
NeighbourVote, SignedSqrt). Keras can only load a file naming them after featurepipe registered
them, so an exported `.keras` built from them fails in a plain Keras/TensorFlow process
("Could not locate class 'InferenceMode'"). Featurepipe itself keeps using them (fine-tuning needs
InferenceMode, saved runs name them); export rewrites the graph instead:

- every custom layer is inlined: its `call` (written with keras.ops only) is traced on the new
  graph's tensors, so the file records built-in ops (keras.src.ops.*) that any Keras 3 loads with
  safe_mode=True;
- InferenceMode is dropped and its wrapped model rebuilt in place;
- Dropout-like layers (noise, stochastic depth) become nothing (the identity they are at
  inference) and the whole network is frozen (trainable=False, so BatchNormalization normalises
  with its moving statistics), which makes the output independent of any `training` flag a caller
  or a preprocessing layer passes;
- nested functional models are rebuilt the same way, each once: a backbone shared by several vote
  members stays one shared sub-model (its weights saved once).

Built-in layers are reused as they are (same weights, no copy).
"""

from __future__ import annotations

from typing import Optional

import keras

from featurepipe.core.errors import FeaturepipeError


# Layers that only act when training (random noise or dropping): the identity at inference. Named,
# not imported: keras.applications' StochasticDepth (ConvNeXt) is not public API.
_TRAINING_ONLY = frozenset({"Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "AlphaDropout",
                            "GaussianDropout", "GaussianNoise", "StochasticDepth"})


def _builtin(operation) -> bool:
    return type(operation).__module__.startswith("keras.")


def _identity(x, *args, **kwargs):
    return x


def _inlined(layer):
    """The custom layer's computation traced straight into the caller's graph as keras ops."""

    def call(*args, **kwargs):
        # featurepipe's layers take no training/mask arguments (and behave the same either way)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("training", "mask")}
        return layer.call(*args, **kwargs)

    return call


class _Rewriter:
    def __init__(self):
        self.rebuilt: dict[int, object] = {}       # id(source model) -> its plain model, built once

    def operation(self, op):
        from featurepipe.backbones.layers import InferenceMode

        if isinstance(op, InferenceMode):
            # the wrapper goes; a model it wrapped keeps the wrapper's name (unique in its graph)
            inner = op.layer
            return self.model(inner, name=op.name) if isinstance(inner, keras.Model) else self.operation(inner)
        if isinstance(op, keras.layers.Dropout) or type(op).__name__ in _TRAINING_ONLY:
            return _identity
        if isinstance(op, keras.Model):
            return self.model(op)
        if _builtin(op):
            return op
        if isinstance(op, keras.layers.Layer) and not op.weights:
            return _inlined(op)
        raise FeaturepipeError(f"cannot export layer {op.name!r} ({type(op).__module__}.{type(op).__name__}) "
                               f"with built-in Keras layers only: it holds weights of its own")

    def model(self, model, name: Optional[str] = None):
        if id(model) in self.rebuilt:
            return self.rebuilt[id(model)]
        if not hasattr(model, "_run_through_graph") or not getattr(model, "_nodes_by_depth", None):
            raise FeaturepipeError(f"cannot export {model.name!r}: only functional Keras models can be rewritten "
                                   f"with built-in layers ({type(model).__name__} is not one)")
        inputs = [keras.Input(batch_shape=x.shape, dtype=x.dtype, name=_input_name(x, i))
                  for i, x in enumerate(model.inputs)]
        outputs = model._run_through_graph(inputs, operation_fn=self.operation)
        plain = keras.Model(inputs[0] if len(inputs) == 1 else inputs, outputs, name=name or model.name)
        self.rebuilt[id(model)] = plain
        return plain


def _input_name(tensor, index: int) -> str:
    name = getattr(tensor, "name", None) or f"input_{index}"
    return name.split(":")[0]


def plain_model(model):
    """`model` (functional) rebuilt with built-in Keras layers and ops only, frozen for inference."""
    plain = _Rewriter().model(model)
    plain.trainable = False
    check_builtin(plain)
    return plain


def check_builtin(model) -> None:
    """Raise if anything in `model` (nested models included) is not Keras' own."""
    stack = [model]
    while stack:
        current = stack.pop()
        for op in getattr(current, "operations", None) or getattr(current, "layers", []):
            if not _builtin(op):
                raise FeaturepipeError(f"the exported network still holds {type(op).__module__}.{type(op).__name__} "
                                       f"({op.name}); plain Keras could not load it")
            if isinstance(op, keras.Model):
                stack.append(op)
