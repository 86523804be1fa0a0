"""A tiny random conv base registered as backbone "tiny", so tests extract real features in milliseconds."""

from featurepipe.backbones.registry import BackboneInfo, PretrainedConfig, register_backbone


def build_tiny(input_shape, include_top, weights, cache_dir=None):
    import keras

    if weights == "imagenet":
        raise ValueError("the tiny test backbone has no ImageNet weights")
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="block1_conv")(inputs)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="block2_conv")(x)
    x = keras.layers.BatchNormalization(name="block2_bn")(x)
    x = keras.layers.Conv2D(24, 3, strides=2, padding="same", activation="relu", name="block3_conv")(x)
    return keras.Model(inputs, x, name="tiny")


TINY = register_backbone(BackboneInfo(
    name="tiny", builder=build_tiny, feature_dim=24, block_key=r"^(block\d+)_", description="test only",
    pretrained=PretrainedConfig(input_size=32, min_size=16, preprocess="tf"),
))


def build_tiny2(input_shape, include_top, weights, cache_dir=None):
    """A second tiny base (other widths), so tests can concatenate two: "tiny+tiny2"."""
    import keras

    if weights == "imagenet":
        raise ValueError("the tiny test backbone has no ImageNet weights")
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(6, 3, strides=2, padding="same", activation="relu", name="block1_conv")(inputs)
    x = keras.layers.Conv2D(12, 3, strides=4, padding="same", activation="relu", name="block2_conv")(x)
    return keras.Model(inputs, x, name="tiny2")


TINY2 = register_backbone(BackboneInfo(
    name="tiny2", builder=build_tiny2, feature_dim=12, block_key=r"^(block\d+)_", description="test only",
    pretrained=PretrainedConfig(input_size=40, min_size=16, preprocess="tf"),
))
