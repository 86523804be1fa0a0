"""Backbone registry, spec validation, fingerprints, weights from files / offline ImageNet, and --layer taps."""

import inspect
import json
import os
import re
import subprocess
import sys
import urllib.error

import h5py
import numpy as np
import pytest

from featurepipe.backbones import efficientnet_lite
from featurepipe.backbones.build import build_base, build_feature_model
from featurepipe.backbones.fingerprint import backbone_fingerprint
from featurepipe.backbones.layers import PREPROCESS_MODES
from featurepipe.backbones.registry import BACKBONES, block_starts, get_backbone
from featurepipe.backbones.spec import POOLINGS, RESIZE_POLICIES, BackboneSpec
from featurepipe.data.dataset import scan
from featurepipe.core.errors import BackboneError, WeightsUnavailableError
from featurepipe.extraction.extract import extract
from tests.conftest import REPO

TINY = BackboneSpec(name="tiny", weights="random", image_size=32)
REAL = sorted(name for name in BACKBONES if name not in ("tiny", "tiny2"))   # the tests' own bases


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ---- registry ------------------------------------------------------------------------------


def test_every_registry_entry_has_a_constructor_and_sane_settings():
    import keras

    assert len(REAL) >= 17
    assert {"efficientnet_lite0", "vgg16", "resnet50", "mobilenet_v2", "convnext_tiny"} <= set(REAL)
    for name in REAL:
        info = BACKBONES[name]
        assert info.name == name
        closure = inspect.getclosurevars(info.builder).nonlocals
        if "constructor_name" in closure:
            constructor = getattr(keras.applications, closure["constructor_name"], None)
            assert callable(constructor), f"{name}: keras.applications.{closure['constructor_name']} is missing"
        else:
            assert closure["variant"] in efficientnet_lite.VARIANTS, name
            assert callable(efficientnet_lite.build_efficientnet_lite)
        assert info.preprocess in PREPROCESS_MODES, name
        assert info.default_resize in RESIZE_POLICIES, name
        assert 0 < info.min_size <= info.default_size, name
        assert info.feature_dim > 0
        assert (info.block_key is None) != (info.block_end is None), name
        re.compile(info.block_key or info.block_end)


def test_block_starts_on_vgg16():
    import keras

    model = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    names = [layer.name for layer in model.layers]
    starts = block_starts(get_backbone("vgg16"), names)
    assert starts == sorted(starts) and starts[0] == 0 and len(set(starts)) == len(starts)
    first = [names[i] for i in starts]
    # block 0 ("the stem") is the input layer with block1; then one block per VGG block
    assert first == [names[0], "block2_conv1", "block3_conv1", "block4_conv1", "block5_conv1"]
    assert names[starts[-1]] == "block5_conv1"
    assert names[1:starts[1]] == ["block1_conv1", "block1_conv2", "block1_pool"]
    assert names[starts[-1]:] == ["block5_conv1", "block5_conv2", "block5_conv3", "block5_pool"]


def test_block_starts_keeps_the_first_block_apart_from_an_unnamed_stem():
    import keras

    model = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(32, 32, 3))
    names = [layer.name for layer in model.layers]
    first = [names[i] for i in block_starts(get_backbone("mobilenet_v2"), names)]
    assert first[1] == "block_1_expand"


def test_block_starts_with_block_end():
    info = get_backbone("inception_v3")
    names = ["input", "conv2d", "mixed0", "conv2d_1", "mixed1", "conv2d_2", "mixed2"]
    assert block_starts(info, names) == [0, 3, 5]


def test_unknown_backbone_lists_the_known_names():
    with pytest.raises(BackboneError) as info:
        get_backbone("resnet9000")
    message = str(info.value)
    assert "unknown backbone 'resnet9000'" in message
    for name in REAL:
        assert name in message
    with pytest.raises(BackboneError, match="known backbones: .*vgg16"):
        BackboneSpec(name="alexnet").resolved()


# ---- spec ----------------------------------------------------------------------------------


def test_spec_resolves_backbone_defaults():
    assert BackboneSpec(name="vgg16", weights="random").resolved().image_size == 224
    assert BackboneSpec(name="vgg16", weights="random").resolved().resize == "squash"
    lite = BackboneSpec().resolved()
    assert (lite.name, lite.image_size, lite.resize) == ("efficientnet_lite0", 224, "center_crop")
    assert BackboneSpec(name="vgg16", image_size=150, resize="center_crop").resolved().image_size == 150


@pytest.mark.parametrize("kwargs, message", [
    ({"pooling": "median"}, "pooling must be one of avg, max, flatten, not 'median'"),
    ({"image_size": 8}, "tiny needs images of at least 16 px, not 8"),
    ({"resize": "stretch"}, "resize must be one of squash, center_crop, letterbox, not 'stretch'"),
])
def test_spec_validation(kwargs, message):
    spec = BackboneSpec(**{"name": "tiny", "weights": "random", **kwargs})
    with pytest.raises(ValueError, match=re.escape(message)):
        spec.resolved()
    with pytest.raises(ValueError, match=re.escape(message)):
        backbone_fingerprint(spec)
    assert set(POOLINGS) == {"avg", "max", "flatten"}


def test_inception_minimum_size():
    with pytest.raises(ValueError, match="inception_v3 needs images of at least 75 px, not 64"):
        BackboneSpec(name="inception_v3", image_size=64).resolved()


# ---- fingerprint ---------------------------------------------------------------------------


def test_fingerprint_is_stable_and_tracks_every_option(tmp_path):
    base = BackboneSpec(name="vgg16", weights="random", image_size=64)
    fp, payload = backbone_fingerprint(base)
    assert re.fullmatch(r"[0-9a-f]{64}", fp)
    assert backbone_fingerprint(base) == (fp, payload)
    assert backbone_fingerprint(BackboneSpec(name="vgg16", weights="random", image_size=64, resize="squash"))[0] == fp
    assert payload["weights_id"] == "random:0" and payload["preprocess"] == "caffe"
    assert payload["versions"]["keras"] and payload["versions"]["pillow"]
    variants = {
        "layer": BackboneSpec(name="vgg16", weights="random", image_size=64, layer="block4_pool"),
        "pooling": BackboneSpec(name="vgg16", weights="random", image_size=64, pooling="max"),
        "size": BackboneSpec(name="vgg16", weights="random", image_size=96),
        "resize": BackboneSpec(name="vgg16", weights="random", image_size=64, resize="center_crop"),
        "weights": BackboneSpec(name="vgg16", weights="imagenet", image_size=64),
        "seed": BackboneSpec(name="vgg16", weights="random", image_size=64, seed=1),
        "backbone": BackboneSpec(name="vgg19", weights="random", image_size=64),
    }
    prints = {what: backbone_fingerprint(spec)[0] for what, spec in variants.items()}
    assert fp not in prints.values()
    assert len(set(prints.values())) == len(prints)
    # the seed only matters for random weights
    imagenet = variants["weights"]
    assert backbone_fingerprint(BackboneSpec(name="vgg16", image_size=64, seed=5))[0] == backbone_fingerprint(imagenet)[0]


def test_fingerprint_of_a_weights_file_follows_its_content(tmp_path):
    path = tmp_path / "w.weights.h5"
    path.write_bytes(b"one")
    spec = BackboneSpec(name="tiny", weights=str(path), image_size=32)
    fp1, payload = backbone_fingerprint(spec, tmp_path / "cache")
    assert payload["weights_id"] == "file-sha256:" + __import__("hashlib").sha256(b"one").hexdigest()
    assert backbone_fingerprint(BackboneSpec(name="tiny", weights=str(path), image_size=32, seed=9), tmp_path / "cache")[0] == fp1
    path.write_bytes(b"two, longer")
    assert backbone_fingerprint(spec, tmp_path / "cache")[0] != fp1


def test_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "model.weights.h5"
    spec = BackboneSpec(name="tiny", weights=str(missing), image_size=32)
    with pytest.raises(BackboneError, match=re.escape(str(missing)) + " does not exist"):
        backbone_fingerprint(spec)
    with pytest.raises(BackboneError, match=re.escape(str(missing))):
        build_feature_model(spec)


def test_fingerprint_and_a_cached_rerun_never_import_tensorflow(image_tree, cache):
    expected = {
        "tiny": backbone_fingerprint(TINY)[0],
        "vgg": backbone_fingerprint(BackboneSpec(name="vgg16", weights="random"))[0],
        "lite": backbone_fingerprint(BackboneSpec())[0],          # the default: ImageNet efficientnet_lite0
    }
    extract(scan(image_tree, cache_dir=cache), TINY, cache)
    code = (
        "import sys, json\n"
        "from pathlib import Path\n"
        "import tests.tiny_backbone\n"
        "import featurepipe.backbones.fingerprint as f\n"
        "from featurepipe.backbones.spec import BackboneSpec\n"
        "HEAVY = ('tensorflow', 'keras', 'torch')\n"
        "out = {'tiny': f.backbone_fingerprint(BackboneSpec(name='tiny', weights='random', image_size=32))[0],\n"
        "       'vgg': f.backbone_fingerprint(BackboneSpec(name='vgg16', weights='random'))[0],\n"
        "       'lite': f.backbone_fingerprint(BackboneSpec())[0]}\n"
        "out['heavy_after_fingerprints'] = sorted(m for m in sys.modules if m.split('.')[0] in HEAVY)[:5]\n"
        "from featurepipe.data.dataset import scan\n"
        "from featurepipe.extraction.extract import extract\n"
        "r = extract(scan(Path(sys.argv[1]), cache_dir=Path(sys.argv[2])),"
        " BackboneSpec(name='tiny', weights='random', image_size=32), Path(sys.argv[2]))\n"
        "out.update(extracted=r.extracted, reused=r.reused,\n"
        "           heavy_after_rerun=sorted(m for m in sys.modules if m.split('.')[0] in HEAVY)[:5])\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(image_tree), str(cache)], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {**expected, "heavy_after_fingerprints": [], "extracted": 0, "reused": 24,
                      "heavy_after_rerun": []}


# ---- weights from a file -------------------------------------------------------------------


def test_weights_from_a_file_equal_those_of_the_seed_they_were_saved_from(tmp_path):
    seeded = BackboneSpec(name="tiny", weights="random", image_size=32, seed=3)
    base = build_base(get_backbone("tiny"), seeded.resolved(), False, None)
    path = tmp_path / "tiny.weights.h5"
    base.save_weights(str(path))
    x = images(5, 32)
    from_seed = build_feature_model(seeded).predict(x, verbose=0)
    from_file = build_feature_model(BackboneSpec(name="tiny", weights=str(path), image_size=32)).predict(x, verbose=0)
    seed0 = build_feature_model(TINY).predict(x, verbose=0)
    np.testing.assert_allclose(from_file, from_seed, rtol=1e-6, atol=1e-6)
    assert not np.allclose(from_file, seed0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_weights_file_of_the_wrong_shape_is_a_clear_error(tmp_path):
    import keras

    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    path = tmp_path / "other.weights.h5"
    other.save_weights(str(path))
    with pytest.raises(BackboneError, match=re.escape(f"cannot load weights from {path} into tiny")):
        build_feature_model(BackboneSpec(name="tiny", weights=str(path), image_size=32))
    garbage = tmp_path / "garbage.weights.h5"
    garbage.write_bytes(b"\0" * 64)
    with pytest.raises(BackboneError, match="cannot load weights from"):
        build_feature_model(BackboneSpec(name="tiny", weights=str(garbage), image_size=32))


# ---- --layer -------------------------------------------------------------------------------


def test_vgg16_fc2_gives_4096_features():
    model = build_feature_model(BackboneSpec(name="vgg16", weights="random", image_size=224, layer="fc2"))
    features = np.asarray(model.predict_on_batch(images(1, 224)))
    assert features.shape == (1, 4096) and np.isfinite(features).all()
    assert (features >= 0).all() and (features > 0).any()          # fc2 is a ReLU layer


def test_vgg16_block4_pool_with_each_pooling():
    x = images(2, 64, seed=1)
    outputs = {}
    for pooling in ("avg", "max", "flatten"):
        spec = BackboneSpec(name="vgg16", weights="random", image_size=64, layer="block4_pool", pooling=pooling)
        outputs[pooling] = np.asarray(build_feature_model(spec).predict(x, verbose=0))
    assert outputs["avg"].shape == (2, 512) and outputs["max"].shape == (2, 512)
    assert outputs["flatten"].shape == (2, 4 * 4 * 512)
    # same seed -> same weights: the pooled vectors are reductions of the flattened 4x4x512 map
    grid = outputs["flatten"].reshape(2, 4, 4, 512)
    np.testing.assert_allclose(outputs["avg"], grid.mean(axis=(1, 2)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(outputs["max"], grid.max(axis=(1, 2)), rtol=1e-5, atol=1e-5)


def test_unknown_layer_lists_layer_names():
    with pytest.raises(BackboneError) as info:
        build_feature_model(BackboneSpec(name="vgg16", weights="random", image_size=32, layer="block9_conv1"))
    message = str(info.value)
    assert "vgg16 has no layer named 'block9_conv1'" in message
    assert "block5_pool" in message and "block4_conv3" in message


def test_classifier_layers_need_the_native_size():
    with pytest.raises(BackboneError, match="only takes 224 px images; pass --image-size 224"):
        build_feature_model(BackboneSpec(name="vgg16", weights="random", image_size=64, layer="fc1"))


# ---- offline ImageNet weights -------------------------------------------------------------

MOBILENET_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5"


@pytest.fixture
def offline_keras_home(tmp_path, monkeypatch):
    """Point Keras' cache at tmp_path and make every download fail the way it fails without a network."""
    from keras.src.backend import config
    from keras.src.utils import file_utils

    home = tmp_path / "keras_home"
    home.mkdir()
    # keras reads $KERAS_HOME once, at import; featurepipe's hint reads it when an error happens
    monkeypatch.setattr(config, "_KERAS_DIR", str(home))
    monkeypatch.setenv("KERAS_HOME", str(home))
    attempts = []

    def no_network(url, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(file_utils, "urlretrieve", no_network)
    return home, attempts


def test_missing_imagenet_file_names_the_file_and_where_to_put_it(offline_keras_home):
    home, attempts = offline_keras_home
    spec = BackboneSpec(name="mobilenet_v2", weights="imagenet", image_size=96)
    with pytest.raises(WeightsUnavailableError) as info:
        build_feature_model(spec)
    message = str(info.value)
    assert len(attempts) == 1 and attempts[0].endswith(MOBILENET_FILE)
    assert MOBILENET_FILE in message
    assert str(home / "models" / MOBILENET_FILE) in message
    assert "https://storage.googleapis.com/" in message and "efficientnet_lite0" in message
    assert not (home / "models" / MOBILENET_FILE).exists()


def test_pre_placed_imagenet_file_builds_offline(offline_keras_home):
    import keras

    home, attempts = offline_keras_home
    keras.utils.set_random_seed(123)
    reference = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(96, 96, 3))
    target = home / "models" / MOBILENET_FILE
    target.parent.mkdir(parents=True)
    # keras loads ".h5" (not ".weights.h5") files with its legacy HDF5 reader, so write that layout;
    # model.save_weights only writes the new ".weights.h5" format
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(target, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, reference)
    model = build_feature_model(BackboneSpec(name="mobilenet_v2", weights="imagenet", image_size=96))
    assert attempts == []
    # every weight of the frozen base is the pre-placed file's
    base = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    loaded, saved = base.get_weights(), reference.get_weights()
    assert len(loaded) == len(saved) > 200
    for a, b in zip(loaded, saved):
        np.testing.assert_array_equal(a, b)
    x = images(3, 96, seed=4)
    expected = np.asarray(reference(x.astype(np.float32) / 127.5 - 1.0, training=False)).mean(axis=(1, 2))
    got = np.asarray(model(x, training=False))
    assert got.shape == (3, 1280)
    # a randomly initialised MobileNetV2 has tiny activations, so compare relative to their scale
    scale = np.abs(expected).max()
    assert scale > 0 and np.count_nonzero(expected) > 1000
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * scale)


def test_register_backbone_adds_refuses_a_clash_and_unregisters():
    from featurepipe.backbones.registry import (
        BackboneInfo, PretrainedConfig, register_backbone, registered_backbone, unregister_backbone,
    )
    from tests.tiny_backbone import TINY, build_tiny

    other = BackboneInfo(name="tiny_plugin", builder=build_tiny, feature_dim=24, block_key=r"^(block\d+)_",
                         pretrained=PretrainedConfig(input_size=40, min_size=16, resize="letterbox", preprocess="lite"))
    try:
        assert register_backbone(other) is other and register_backbone(other) is other     # same entry: no-op
        assert BackboneSpec(name="tiny_plugin", weights="random").resolved().image_size == 40
        assert get_backbone("tiny_plugin").default_resize == "letterbox"
        with pytest.raises(BackboneError, match="already registered"):
            register_backbone(BackboneInfo(name="tiny_plugin", builder=build_tiny, feature_dim=1, block_key="x",
                                           pretrained=PretrainedConfig(input_size=32)))
    finally:
        assert unregister_backbone("tiny_plugin") is other
    with pytest.raises(BackboneError, match="unknown backbone 'tiny_plugin'"):
        get_backbone("tiny_plugin")
    # registered_backbone: for a `with` block, then what was there before is back
    with registered_backbone(other):
        assert get_backbone("tiny_plugin") is other
    assert "tiny_plugin" not in BACKBONES
    with registered_backbone(BackboneInfo(name="tiny", builder=build_tiny, feature_dim=24, block_end=r"_conv$",
                                          pretrained=PretrainedConfig(input_size=32, min_size=16))):
        assert get_backbone("tiny").block_end == r"_conv$"
    assert get_backbone("tiny") is TINY


def test_a_registry_entry_checks_its_preprocessing_and_blocks():
    from featurepipe.backbones.registry import BackboneInfo, PretrainedConfig

    with pytest.raises(BackboneError, match="unknown preprocessing 'yuv'"):
        BackboneInfo(name="x", builder=print, feature_dim=1, block_key="a",
                     pretrained=PretrainedConfig(input_size=32, preprocess="yuv"))
    with pytest.raises(BackboneError, match="exactly one of block_key and block_end"):
        BackboneInfo(name="x", builder=print, feature_dim=1, pretrained=PretrainedConfig(input_size=32))


def test_the_entry_says_what_identifies_its_imagenet_weights():
    from featurepipe.backbones.efficientnet_lite import lite_weights_id
    from featurepipe.backbones.fingerprint import weights_id

    lite = BackboneSpec(name="efficientnet_lite1")
    assert weights_id(lite) == f"pth-sha256:{lite_weights_id('lite1')}"
    assert weights_id(BackboneSpec(name="vgg16")) == "keras-applications-imagenet:vgg16"
