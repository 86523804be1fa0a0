"""Tiny random conv bases registered as backbones "tiny" and "tiny2", so tests extract real features in
milliseconds ("tiny+tiny2" concatenates two)."""

from featurepipe.backbones.registry import BackboneInfo, PretrainedConfig, register_backbone


def _conv_stack(name: str, input_shape, weights, convs, batchnorm_after: int | None = None):
    """blockN_conv layers of (filters, stride), 3x3 ReLU, a block2_bn after block `batchnorm_after`."""
    import keras

    if weights == "imagenet":
        raise ValueError("the tiny test backbones have no ImageNet weights")
    inputs = x = keras.Input(input_shape)
    for block, (filters, stride) in enumerate(convs, start=1):
        x = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", activation="relu",
                                name=f"block{block}_conv")(x)
        if block == batchnorm_after:
            x = keras.layers.BatchNormalization(name=f"block{block}_bn")(x)
    return keras.Model(inputs, x, name=name)


def build_tiny(input_shape, include_top, weights, cache_dir=None):
    return _conv_stack("tiny", input_shape, weights, [(8, 2), (16, 2), (24, 2)], batchnorm_after=2)


def build_tiny2(input_shape, include_top, weights, cache_dir=None):
    """A second tiny base (other widths and strides), so tests can concatenate two: "tiny+tiny2"."""
    return _conv_stack("tiny2", input_shape, weights, [(6, 2), (12, 4)])


TINY = register_backbone(BackboneInfo(
    name="tiny", builder=build_tiny, feature_dim=24, block_key=r"^(block\d+)_", description="test only",
    pretrained=PretrainedConfig(input_size=32, min_size=16, preprocess="tf"),
))
TINY2 = register_backbone(BackboneInfo(
    name="tiny2", builder=build_tiny2, feature_dim=12, block_key=r"^(block\d+)_", description="test only",
    pretrained=PretrainedConfig(input_size=40, min_size=16, preprocess="tf"),
))
