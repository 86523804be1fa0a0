"""The extract stage: incremental, content-keyed, robust to bad files, deterministic, with augmented views."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurepipe.backbones import build as build_module
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.data.dataset import scan
from featurepipe.extraction.extract import extract, open_stores
from featurepipe.extraction.features import dataset_features
from featurepipe.data.augment import AugmentSpec
from featurepipe.data.images import decode_image
from tests.conftest import make_image

TINY = BackboneSpec(name="tiny", weights="random", image_size=32)


def run(root, cache, spec=TINY, **kwargs):
    return extract(scan(root, cache_dir=cache), spec, cache, **kwargs)


def store_features(root, cache, spec=TINY):
    """path -> feature row, read back through the public dataset_features API."""
    dataset = scan(root, cache_dir=cache)
    features = dataset_features(dataset, open_stores(spec, cache))
    return dict(zip(features.frame["path"], features.X))


def test_first_run_extracts_everything_and_second_reuses_without_a_model(image_tree, cache, monkeypatch):
    first = run(image_tree, cache)
    assert (first.images, first.extracted, first.reused, first.failed) == (24, 24, 0, [])
    assert first.feature_dim == 24 and first.backbone == "tiny"
    stores = open_stores(TINY, cache)
    assert first.store_dir == str(stores.originals.directory)
    assert first.fingerprint == stores.originals.fingerprint
    info = stores.originals.info()
    assert (info.rows, info.feature_dim) == (24, 24)
    assert stores.originals.keys() == set(scan(image_tree).frame["hash"])

    def refuse(*args, **kwargs):
        raise AssertionError("a re-run with nothing to extract built a model")

    monkeypatch.setattr(build_module, "build_feature_model", refuse)
    second = run(image_tree, cache)
    assert (second.extracted, second.reused, second.failed) == (0, 24, [])
    assert second.feature_dim == 24
    assert open_stores(TINY, cache).originals.info().rows == 24


def test_new_images_are_the_only_ones_extracted(image_tree, cache):
    run(image_tree, cache)
    make_image(image_tree / "red" / "new1.png", (200, 0, 0), seed=7001)
    make_image(image_tree / "blue" / "new2.png", (0, 0, 200), seed=7002)
    result = run(image_tree, cache)
    assert (result.images, result.extracted, result.reused) == (26, 2, 24)
    assert open_stores(TINY, cache).originals.info().rows == 26


def test_rename_and_relabel_recompute_nothing(image_tree, cache, monkeypatch):
    run(image_tree, cache)
    before = store_features(image_tree, cache)
    renamed_from, renamed_to = image_tree / "red" / "red2.png", image_tree / "red" / "renamed.png"
    moved_from, moved_to = image_tree / "green" / "green4.png", image_tree / "blue" / "was_green.png"
    renamed_from.rename(renamed_to)
    moved_from.rename(moved_to)
    monkeypatch.setattr(build_module, "build_feature_model",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("model built")))
    result = run(image_tree, cache)
    assert (result.extracted, result.reused) == (0, 24)
    dataset = scan(image_tree, cache_dir=cache)
    assert dataset.class_counts() == {"blue": 9, "green": 7, "red": 8}
    after = store_features(image_tree, cache)
    np.testing.assert_array_equal(after[str(renamed_to)], before[str(renamed_from)])
    np.testing.assert_array_equal(after[str(moved_to)], before[str(moved_from)])


def _bad_files(root: Path) -> dict[str, str]:
    """Write four undecodable files; return path -> the phrase its failure reason must contain."""
    (root / "red" / "empty.jpg").write_bytes(b"")
    (root / "green" / "page.png").write_text("<html><body>404 Not Found</body></html>\n")
    buffer = root / "blue" / "whole.jpg"
    make_image(root / "blue" / "tmp.png", (0, 0, 250), seed=4242)
    Image.open(root / "blue" / "tmp.png").save(buffer, quality=90)
    (root / "blue" / "tmp.png").unlink()
    data = buffer.read_bytes()
    buffer.unlink()
    (root / "blue" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "red" / "noise.jpg").write_bytes(np.random.default_rng(3).bytes(2000))
    return {
        str(root / "red" / "empty.jpg"): "empty file",
        str(root / "green" / "page.png"): "contains text",
        str(root / "blue" / "truncated.jpg"): "truncated",
        str(root / "red" / "noise.jpg"): "not a recognised image format",
    }


def test_bad_files_are_reported_and_good_ones_extracted(image_tree, cache, monkeypatch):
    bad = _bad_files(image_tree)
    result = run(image_tree, cache, batch_size=5)
    assert result.images == 28
    assert result.extracted == 24 and result.reused == 0
    failed = {f.path: f.reason for f in result.failed}
    assert set(failed) == set(bad)
    for path, phrase in bad.items():
        assert phrase in failed[path], (path, failed[path])
    store = open_stores(TINY, cache).originals
    assert store.info().rows == 24
    good = scan(image_tree)
    good_hashes = set(good.frame.loc[~good.frame["path"].isin(bad), "hash"])
    assert store.keys() == good_hashes
    # a re-run reports them again from the store's failure record, without building a model
    def no_model(*args, **kwargs):
        raise AssertionError("a re-run with only known-bad files must not build the model")

    monkeypatch.setattr(build_module, "build_feature_model", no_model)
    again = run(image_tree, cache)
    assert (again.extracted, again.reused) == (0, 24)
    assert {f.path: f.reason for f in again.failed} == failed
    assert store.info().rows == 24
    # the dataset's feature table lists them as missing, not as rows
    features = dataset_features(scan(image_tree, cache_dir=cache), open_stores(TINY, cache))
    assert sorted(features.missing) == sorted(bad) and len(features.frame) == 24


def test_features_are_deterministic_and_match_the_keras_model(image_tree, tmp_path):
    run(image_tree, tmp_path / "c1", batch_size=7)
    run(image_tree, tmp_path / "c2", batch_size=32)
    a = store_features(image_tree, tmp_path / "c1")
    b = store_features(image_tree, tmp_path / "c2")
    assert a.keys() == b.keys() and len(a) == 24
    paths = sorted(a)
    A = np.stack([a[p] for p in paths])
    np.testing.assert_allclose(A, np.stack([b[p] for p in paths]), rtol=0, atol=1e-6)
    assert np.abs(A).sum() > 0 and np.unique(A.round(5), axis=0).shape[0] == 24

    model = build_module.build_feature_model(TINY)
    resolved = TINY.resolved()
    pixels = np.stack([decode_image(p, resolved.image_size, resolved.resize) for p in paths])
    direct = np.asarray(model.predict(pixels, verbose=0))
    assert direct.shape == (24, 24)
    np.testing.assert_allclose(A, direct, rtol=1e-5, atol=1e-5)


def test_another_spec_gets_another_store(image_tree, cache):
    base = run(image_tree, cache)
    variants = [
        BackboneSpec(name="tiny", weights="random", image_size=48),
        BackboneSpec(name="tiny", weights="random", image_size=32, pooling="max"),
        BackboneSpec(name="tiny", weights="random", image_size=32, seed=7),
    ]
    seen = {base.fingerprint}
    base_values = store_features(image_tree, cache)
    for spec in variants:
        result = run(image_tree, cache, spec=spec)
        assert (result.extracted, result.reused) == (24, 0), spec
        assert result.fingerprint not in seen and result.store_dir != base.store_dir
        seen.add(result.fingerprint)
        values = store_features(image_tree, cache, spec)
        assert not np.allclose(values[str(image_tree / "red" / "red0.png")], base_values[str(image_tree / "red" / "red0.png")])
    assert len(list((cache / "features").iterdir())) == 4


def test_augmented_views(image_tree, cache):
    first = run(image_tree, cache, augment=2)
    assert (first.extracted, first.reused) == (24, 0)
    assert (first.views_per_image, first.views_extracted, first.views_reused) == (2, 48, 0)
    stores = open_stores(TINY, cache, augment=2)
    assert first.views_store_dir == str(stores.views.directory) != first.store_dir
    assert stores.views.info().rows == 48 and stores.originals.info().rows == 24
    dataset = scan(image_tree, cache_dir=cache)
    features = dataset_features(dataset, stores)
    assert features.views.shape == (24, 2, 24)
    # each view differs from its original and from the other view
    assert not np.allclose(features.views[:, 0], features.X)
    assert not np.allclose(features.views[:, 1], features.X)
    assert not np.allclose(features.views[:, 0], features.views[:, 1])

    again = run(image_tree, cache, augment=2)
    assert (again.extracted, again.reused, again.views_extracted, again.views_reused) == (0, 24, 0, 48)

    more = run(image_tree, cache, augment=3)
    assert (more.extracted, more.reused, more.views_extracted, more.views_reused) == (0, 24, 24, 48)
    stores3 = open_stores(TINY, cache, augment=3)
    assert stores3.views.directory == stores.views.directory      # same views store, one more view each
    assert stores3.views.info().rows == 72
    features3 = dataset_features(dataset, stores3)
    np.testing.assert_array_equal(features3.views[:, :2], features.views)
    np.testing.assert_array_equal(features3.X, features.X)

    # another augmentation seed gets other views, but still shares the originals
    other_seed = run(image_tree, cache, augment=AugmentSpec(1, seed=5))
    assert (other_seed.extracted, other_seed.views_extracted) == (0, 24)
    assert other_seed.views_store_dir != first.views_store_dir


def test_duplicates_are_extracted_once(image_tree, cache):
    shutil.copy(image_tree / "red" / "red0.png", image_tree / "red" / "red0_copy.png")
    shutil.copy(image_tree / "blue" / "blue3.png", image_tree / "blue" / "sub_copy.png")
    result = run(image_tree, cache)
    assert (result.images, result.extracted) == (24, 24)
    assert open_stores(TINY, cache).originals.info().rows == 24
    values = store_features(image_tree, cache)
    assert len(values) == 26
    np.testing.assert_array_equal(values[str(image_tree / "red" / "red0_copy.png")],
                                  values[str(image_tree / "red" / "red0.png")])
    np.testing.assert_array_equal(values[str(image_tree / "blue" / "sub_copy.png")],
                                  values[str(image_tree / "blue" / "blue3.png")])


def test_a_damaged_store_stops_extract_with_the_repair_hint(image_tree, cache):
    from featurepipe.core.errors import StoreCorruptError

    run(image_tree, cache, batch_size=8)
    shards = sorted((cache / "features").glob("*/shards/*.h5"))
    shards[0].write_bytes(b"not hdf5")
    with pytest.raises(StoreCorruptError, match="cache verify --repair"):
        run(image_tree, cache)
    assert open_stores(TINY, cache).originals.verify(repair=True)
    again = run(image_tree, cache)
    assert (again.extracted, again.reused) == (8, 16)


def test_view_keys_round_trip():
    from featurepipe.extraction.batches import is_view_key, parse_view_key, view_key

    assert parse_view_key(view_key("ab12", 3)) == ("ab12", 3)
    assert parse_view_key("ab12") == ("ab12", None)
    assert is_view_key(view_key("ab12", 0)) and not is_view_key("ab12")


# ---- square images under the other resize policies ------------------------------------------


def _square_and_oblong(root: Path) -> tuple[list[Path], list[Path]]:
    square = [make_image(root / "a" / f"sq{i}.png", (200, 40, 40), seed=i, size=(40, 40)) for i in range(5)]
    square += [make_image(root / "b" / f"sq{i}.jpg", (40, 40, 200), seed=10 + i, size=(36, 36)) for i in range(3)]
    oblong = [make_image(root / "a" / f"wide{i}.png", (200, 60, 40), seed=20 + i, size=(48, 30)) for i in range(3)]
    oblong += [make_image(root / "b" / f"tall{i}.png", (40, 60, 200), seed=30 + i, size=(30, 48)) for i in range(3)]
    return square, oblong


def test_square_images_are_copied_from_another_policy_not_extracted_again(tmp_path, cache):
    """run searches squash, center_crop and letterbox: a square image is the same pixels under each,
    so only the oblong ones go through the base again, and the copied rows equal what extraction
    under that policy alone computes (a fresh cache), to float round-off."""
    square, oblong = _square_and_oblong(tmp_path / "data")
    dataset = scan(tmp_path / "data", cache_dir=cache)
    squash = extract(dataset, BackboneSpec(**{**TINY.to_dict(), "resize": "squash"}), cache)
    assert (squash.extracted, squash.copied) == (14, 0)
    for policy in ("center_crop", "letterbox"):
        spec = BackboneSpec(**{**TINY.to_dict(), "resize": policy})
        report = extract(dataset, spec, cache)
        assert (report.copied, report.extracted, report.reused) == (8, 6, 8)
        fresh_root = tmp_path / f"fresh-{policy}"
        fresh = scan(tmp_path / "data", cache_dir=fresh_root)
        assert extract(fresh, spec, fresh_root).copied == 0
        got = dataset_features(dataset, open_stores(spec, cache))
        want = dataset_features(fresh, open_stores(spec, fresh_root))
        assert got.frame["path"].tolist() == want.frame["path"].tolist()
        np.testing.assert_allclose(got.X, want.X, rtol=1e-5, atol=1e-6)
    again = extract(dataset, BackboneSpec(**{**TINY.to_dict(), "resize": "letterbox"}), cache)
    assert (again.copied, again.extracted, again.reused) == (0, 0, 14)


def test_square_images_missing_from_the_other_policy_are_extracted(tmp_path, cache):
    """Only rows the other store holds are copied: a square image added since is extracted, and a
    square file whose header cannot be read goes to extraction, which reports it."""
    square, oblong = _square_and_oblong(tmp_path / "data")
    extract(scan(tmp_path / "data", cache_dir=cache), BackboneSpec(**{**TINY.to_dict(), "resize": "squash"}), cache)
    make_image(tmp_path / "data" / "a" / "new.png", (210, 30, 30), seed=99, size=(40, 40))
    (tmp_path / "data" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    dataset = scan(tmp_path / "data", cache_dir=cache)
    report = extract(dataset, BackboneSpec(**{**TINY.to_dict(), "resize": "center_crop"}), cache)
    assert (report.copied, report.extracted) == (8, 7)
    assert [Path(f.path).name for f in report.failed] == ["broken.png"]
