"""The combined model: a run's feature model (frozen base + preprocessing + pooling) and its head as
ONE Keras model (uint8 images in, class probabilities out), and which of its layers train.

finetune trains it; export writes it for a run without a fine-tuned model.
"""

from __future__ import annotations

import math
from typing import Optional

import keras

from featurepipe.backbones.registry import block_starts, get_backbone
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.core.errors import FeaturepipeError
from featurepipe.backbones.layers import InferenceMode
from featurepipe.heads.to_keras import head_to_keras
from featurepipe.core.cachedirs import cache_root


def combine(feature_model, estimator, name: str = "finetune"):
    """uint8 images -> class probabilities: the feature model (in inference mode) + the head."""
    n_features = int(feature_model.output_shape[-1])
    head = head_to_keras(estimator, n_features, name="head")
    images = keras.Input(feature_model.input_shape[1:], dtype="uint8", name="images")
    features = InferenceMode(feature_model, name="backbone")(images)
    return keras.Model(images, head(features), name=name)


def build_finetune_model(spec: BackboneSpec, estimator, cache_dir=None):
    """The run's feature model (see build_feature_model) with `estimator` converted on top."""
    from featurepipe.backbones.build import build_feature_model

    return combine(build_feature_model(spec, cache_root(cache_dir)), estimator)


def base_model(model):
    """The conv base inside a combined model (the nested keras.Model in its feature model)."""
    feature_model = model.get_layer("backbone").layer
    for layer in feature_model.layers:
        if isinstance(layer, keras.Model):
            return layer
    raise FeaturepipeError(f"{feature_model.name} has no nested base model")


def _freeze_batchnorm(layer) -> None:
    if isinstance(layer, keras.layers.BatchNormalization):
        layer.trainable = False
    for child in getattr(layer, "layers", []) or []:
        _freeze_batchnorm(child)


def set_trainable(model, backbone: str, unfreeze_blocks: Optional[int], train_head: bool = True) -> list[str]:
    """Freeze the base below its top `unfreeze_blocks` blocks (None: unfreeze every block, 0: none).

    BatchNormalization layers stay frozen wherever they sit. Returns the names of the base layers
    that now have trainable weights.
    """
    base = base_model(model)
    model.trainable = True                  # propagates; the cut below re-freezes what it must
    layers = base.layers
    if unfreeze_blocks is None:
        cut = 0
    elif unfreeze_blocks <= 0:
        cut = len(layers)
    else:
        starts = block_starts(get_backbone(backbone), [layer.name for layer in layers])
        cut = starts[-min(unfreeze_blocks, len(starts))]
    for index, layer in enumerate(layers):
        layer.trainable = index >= cut
    _freeze_batchnorm(base)
    model.get_layer("head").trainable = train_head
    return [layer.name for layer in layers if layer.trainable and layer.trainable_weights]


def trainable_params(model) -> int:
    return int(sum(math.prod(v.shape) for v in model.trainable_weights))


def default_unfreeze_blocks(backbone: str, layer_names: list[str]) -> int:
    """How many registry blocks (counted from the top) the default fine-tuning trains.

    "Top block" must mean enough layers to matter. EfficientNet-Lite's last registry block is its
    1x1 head conv alone (training it moved nothing), so there it is the last two MBConv
    stages + the head conv (Lite0: blocks_11..15 + head_conv: 6 registry blocks, 2.6M weights).
    Measured on 500 Fashion-MNIST images (benchmarks/finetune_gain.py, validation accuracy from
    0.71 frozen): head conv + last stage 0.78, two stages 0.80, three stages 0.81 at 1.6x the time.
    Keras EfficientNet B*: block6 + block7 (+ top conv). MobileNetV2: its last two stages (block_13
    to block_16 + Conv_1). Everything else: the last registry block, which is already a whole stage
    (VGG block5, ResNet conv5, DenseNet conv5, Xception block14, ConvNeXt stage_3).
    """
    return get_backbone(backbone).default_top_blocks()   # the registry entry's top_blocks


