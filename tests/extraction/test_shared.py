"""extract_many: one decode per image (per JPEG draft scale) for several feature sets, and stores that are
bit for bit what per-spec extract writes (rows, fingerprints, failures, batch shards, copied squares)."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurepipe.backbones.spec import BackboneSpec
from featurepipe.core.errors import StoreLockedError
from featurepipe.data import images as images_module
from featurepipe.data.dataset import scan
from featurepipe.extraction import shared
from featurepipe.extraction.executors.base import Executor
from featurepipe.extraction.extract import extract, open_stores
from featurepipe.extraction.shared import extract_many
from tests.conftest import make_image


def tiny(size: int, resize: str, name: str = "tiny") -> BackboneSpec:
    return BackboneSpec(name=name, weights="random", image_size=size, resize=resize)


# 32 and 40 px give the big JPEGs the same draft scale (1/4), 64 px another (1/2).
SPECS = [tiny(32, "squash"), tiny(32, "center_crop"), tiny(32, "letterbox"), tiny(40, "squash", "tiny2"),
         tiny(64, "squash"), tiny(64, "letterbox")]


def _jpeg(path: Path, colour, seed: int, size, orientation: int = 0) -> Path:
    make_image(path.with_suffix(".png"), colour, seed, size)
    img = Image.open(path.with_suffix(".png")).convert("RGB")
    path.with_suffix(".png").unlink()
    exif = img.getexif()
    if orientation:
        exif[0x0112] = orientation
    img.save(path, quality=90, exif=exif)
    return path


def _first_half(root: Path) -> None:
    """Non-square JPEGs big enough for draft mode, PNGs, squares, corrupt JPEGs and a text file."""
    for c, colour in enumerate([(210, 40, 40), (40, 190, 60)]):
        for i in range(5):
            _jpeg(root / f"c{c}" / f"wide{i}.jpg", colour, seed=10 * c + i, size=(330 + 11 * i, 200 + 3 * i))
        _jpeg(root / f"c{c}" / "tall.jpg", colour, seed=50 + c, size=(200, 330), orientation=6)
        make_image(root / f"c{c}" / "small.png", colour, seed=60 + c)                  # 48 x 40
        make_image(root / f"c{c}" / "square.png", colour, seed=70 + c, size=(40, 40))
        _jpeg(root / f"c{c}" / "square.jpg", colour, seed=80 + c, size=(256, 256))
    good = (root / "c0" / "wide0.jpg").read_bytes()
    (root / "c0" / "cut.jpg").write_bytes(good[: len(good) // 2])
    # Square by its header, so later policies would copy it, but it fails to decode under each of them.
    square = (root / "c1" / "square.jpg").read_bytes()
    (root / "c1" / "cut_square.jpg").write_bytes(square[: len(square) // 2])
    (root / "c1" / "page.jpg").write_text("<html>not found</html>")


def _second_half(root: Path) -> None:
    for c, colour in enumerate([(200, 60, 30), (30, 170, 90)]):
        for i in range(4):
            _jpeg(root / f"c{c}" / f"more{i}.jpg", colour, seed=100 + 10 * c + i, size=(400, 260 + 9 * i))
        make_image(root / f"c{c}" / "more.png", colour, seed=130 + c, size=(60, 44))
        make_image(root / f"c{c}" / "square2.png", colour, seed=140 + c, size=(36, 36))
        _jpeg(root / f"c{c}" / "square2.jpg", colour, seed=150 + c, size=(300, 300))
    shutil.copy(root / "c0" / "wide1.jpg", root / "c1" / "same_as_wide1.jpg")


def _stores_state(cache: Path, spec: BackboneSpec, augment: int) -> dict:
    stores = open_stores(spec, cache, augment)
    state = {}
    for name, store in (("originals", stores.originals), ("views", stores.views)):
        if store is None:
            continue
        keys = sorted(store.keys())
        state[name] = {
            "fingerprint": store.fingerprint, "payload": store.payload, "feature_dim": store.feature_dim,
            "keys": keys, "rows": store.read(keys).view(np.uint32).tobytes(),    # bit for bit
            "failures": store.failures(),
            "batch shards": sorted(p.name for p in (store.directory / "shards").glob("batch-*.h5")),
        }
    return state


def _report_state(report, cache: Path) -> tuple:
    """What a report says, its store folders relative to the cache."""
    folders = [None if d is None else str(Path(d).relative_to(cache)) for d in (report.store_dir,
                                                                               report.views_store_dir)]
    return (report.fingerprint, folders, report.feature_dim, report.images, report.extracted, report.reused,
            report.copied, report.views_extracted, report.views_reused, report.views_fingerprint,
            report.batch_size, sorted((f.path, f.reason) for f in report.failed))


@pytest.mark.parametrize("augment", [0, 2])
def test_stores_are_bit_for_bit_those_of_per_spec_extract(tmp_path, augment):
    data, one, many = tmp_path / "data", tmp_path / "one", tmp_path / "many"
    _first_half(data)
    # Both caches start from the same earlier work: one policy's store, holding squares to copy and
    # a remembered failure.
    for cache in (one, many):
        extract(scan(data, cache_dir=cache), SPECS[2], cache, augment=augment, batch_size=4)
    _second_half(data)
    per_spec = [extract(scan(data, cache_dir=one), spec, one, augment=augment, batch_size=4) for spec in SPECS]
    events = []
    shared_reports = extract_many(scan(data, cache_dir=many), SPECS, many, augment=augment, batch_size=4,
                                  progress=events.append)

    assert [_report_state(r, many) for r in shared_reports] == [_report_state(r, one) for r in per_spec]
    for spec in SPECS:
        assert _stores_state(many, spec, augment) == _stores_state(one, spec, augment), spec
    # The work was real: every spec extracted, squares were copied, both bad files failed for each.
    assert all(r.extracted > 0 for r in shared_reports)
    assert sum(r.copied for r in shared_reports) >= 8
    for r in shared_reports:
        assert {Path(f.path).name for f in r.failed} == {"cut.jpg", "cut_square.jpg", "page.jpg"}
    assert {e.message for e in events} >= {"extract tiny/squash + 5 more", "done"}


def test_each_image_is_read_once_and_decoded_once_per_draft_scale(tmp_path, cache, monkeypatch):
    data = tmp_path / "data"
    _jpeg(data / "a" / "wide.jpg", (200, 30, 30), 1, (330, 200))
    _jpeg(data / "a" / "tall.jpg", (200, 30, 30), 2, (200, 330))
    make_image(data / "b" / "small.png", (30, 30, 200), 3)
    make_image(data / "b" / "other.png", (30, 30, 200), 4)
    decodes, reads = [], []
    real_decode, real_read = images_module._loaded_rgb, images_module.read_checked

    def counting_decode(p, data_, draft_side):
        decodes.append((Path(p).name, draft_side))
        return real_decode(p, data_, draft_side)

    def counting_read(p, expect):
        reads.append(Path(p).name)
        return real_read(p, expect)

    monkeypatch.setattr(images_module, "_loaded_rgb", counting_decode)
    monkeypatch.setattr(images_module, "read_checked", counting_read)
    reports = extract_many(scan(data, cache_dir=cache), SPECS, cache)
    assert [r.extracted for r in reports] == [4] * len(SPECS)
    assert sorted(reads) == ["other.png", "small.png", "tall.jpg", "wide.jpg"]
    # JPEGs: one decode at 1/4 scale for the 32 and 40 px specs, one at 1/2 for the 64 px ones.
    assert sorted(decodes) == [("other.png", 32), ("small.png", 32), ("tall.jpg", 32), ("tall.jpg", 64),
                               ("wide.jpg", 32), ("wide.jpg", 64)]


def test_a_killed_pass_keeps_its_committed_batches_and_a_rerun_finishes(tmp_path, monkeypatch):
    data, one, many = tmp_path / "data", tmp_path / "one", tmp_path / "many"
    _first_half(data)
    _second_half(data)
    specs = SPECS[:3]
    calls = []
    real = shared.infer_parts

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(shared, "infer_parts", dying)
    with pytest.raises(KeyboardInterrupt):
        extract_many(scan(data, cache_dir=many), specs, many, batch_size=4)
    stores = [open_stores(s, many).originals for s in specs]
    committed = [store.info().rows for store in stores]
    # The four batches run before the kill are stored, nothing else (a batch lacks its failed images).
    assert sum(len(list((store.directory / "shards").glob("batch-*.h5"))) for store in stores) == 4
    assert 12 <= sum(committed) <= 16
    monkeypatch.setattr(shared, "infer_parts", real)
    rerun = extract_many(scan(data, cache_dir=many), specs, many, batch_size=4)
    assert [r.reused - r.copied for r in rerun] == committed     # copied squares count as reused
    reference = [extract(scan(data, cache_dir=one), s, one, batch_size=4) for s in specs]
    for spec, r, ref in zip(specs, rerun, reference):
        assert r.reused + r.extracted == ref.extracted + ref.copied
        a, b = open_stores(spec, many).originals, open_stores(spec, one).originals
        keys = sorted(b.keys())
        assert sorted(a.keys()) == keys and a.failures() == b.failures()
        # Other batches after the kill: each image's features agree to float rounding.
        np.testing.assert_allclose(a.read(keys), b.read(keys), rtol=1e-5, atol=1e-6)


def test_other_executors_and_a_single_spec_extract_per_spec(image_tree, cache, monkeypatch):
    calls = []
    monkeypatch.setattr(shared, "extract", lambda dataset, spec, *a, **k: calls.append((spec, k["executor"])))

    class Elsewhere(Executor):
        name = "elsewhere"

    dataset = scan(image_tree, cache_dir=cache)
    elsewhere = Elsewhere()
    extract_many(dataset, SPECS[:2], cache, executor=elsewhere)
    assert calls == [(SPECS[0], elsewhere), (SPECS[1], elsewhere)]
    calls.clear()
    extract_many(dataset, SPECS[:1], cache)
    assert [spec for spec, _ in calls] == [SPECS[0]]


def test_a_spec_twice_and_nothing_missing(image_tree, cache, monkeypatch):
    dataset = scan(image_tree, cache_dir=cache)
    first = extract_many(dataset, [SPECS[0], SPECS[3], SPECS[0]], cache)
    assert [(r.extracted, r.reused) for r in first] == [(24, 0), (24, 0), (0, 24)]
    assert first[0].fingerprint == first[2].fingerprint

    def refuse(*args, **kwargs):
        raise AssertionError("nothing was missing, yet an image was decoded")

    monkeypatch.setattr(shared, "decode_variants", refuse)
    again = extract_many(dataset, [SPECS[3], SPECS[0]], cache)
    assert [(r.extracted, r.reused, r.failed) for r in again] == [(0, 24, []), (0, 24, [])]


def test_a_store_locked_elsewhere_times_out_naming_it(image_tree, cache):
    dataset = scan(image_tree, cache_dir=cache)
    held = open_stores(SPECS[1], cache).originals
    with held.writer():
        with pytest.raises(StoreLockedError):
            extract_many(dataset, SPECS[:3], cache, lock_timeout=0.2)
    # Nothing was half done: a later call extracts everything.
    assert [r.extracted for r in extract_many(dataset, SPECS[:3], cache)] == [24, 24, 24]
