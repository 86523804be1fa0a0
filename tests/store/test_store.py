"""The sharded HDF5 feature store: round trips, locking, damage detection and repair, compaction, gc."""

import json
import shutil
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from featurepipe.store import featurestore as store_module
from featurepipe.backbones.spec import BackboneSpec, hash_payload
from featurepipe.rundir.maintenance import gc_cache, list_cache
from featurepipe.data.dataset import scan
from featurepipe.core.errors import StoreCorruptError, StoreError, StoreLockedError
from featurepipe.extraction.extract import extract, open_stores
from featurepipe.store.featurestore import FeatureStore, list_stores
from featurepipe.store.gc import prune_store
from tests.conftest import make_image

FP = hash_payload({"name": "test"})   # a real fingerprint: verify checks it is the payload's hash
TINY = BackboneSpec(name="tiny", weights="random", image_size=32)


@pytest.fixture
def store(tmp_path):
    return FeatureStore.open(tmp_path / "features", FP, {"name": "test"})


def batch(start: int, n: int, d: int = 4, seed: int = 0):
    keys = [f"key{i:04d}" for i in range(start, start + n)]
    features = np.random.default_rng(seed + start).normal(size=(n, d)).astype(np.float32)
    return keys, features


def fill(store, batches):
    """Write each (keys, features) as its own shard; return key -> row."""
    expected = {}
    with store.writer() as writer:
        for keys, features in batches:
            writer.add(keys, features)
            expected.update(zip(keys, features))
    return expected


def shard_files(store):
    return sorted((store.directory / "shards").glob("[!.]*.h5"))


# ---- round trip ----------------------------------------------------------------------------


def test_round_trip_in_any_key_order(store):
    expected = fill(store, [batch(0, 5), batch(5, 3), batch(8, 7)])
    assert len(shard_files(store)) == 3
    order = list(expected)
    np.random.default_rng(1).shuffle(order)
    got = store.read(order)
    assert got.dtype == np.float32 and got.shape == (15, 4)
    np.testing.assert_array_equal(got, np.stack([expected[k] for k in order]))
    # a fresh handle reads the same numbers from disk; feature_dim was persisted in spec.json
    fresh = FeatureStore(store.directory)
    assert fresh.feature_dim == 4
    assert json.loads((store.directory / "spec.json").read_text())["feature_dim"] == 4
    assert fresh.keys() == set(expected)
    np.testing.assert_array_equal(fresh.read(order[::-1]), got[::-1])
    # repeated keys are allowed in a read
    np.testing.assert_array_equal(fresh.read(["key0003", "key0003"]), np.stack([expected["key0003"]] * 2))
    info = fresh.info()
    assert (info.rows, info.feature_dim, info.shards) == (15, 4, 3)


def test_read_of_unknown_key_is_a_keyerror(store):
    fill(store, [batch(0, 2)])
    with pytest.raises(KeyError, match="1 key\\(s\\) not in .*e.g. nope"):
        store.read(["key0000", "nope"])


def test_missing_keeps_order_and_drops_duplicates(store):
    fill(store, [batch(0, 3)])
    assert store.missing(["z", "key0001", "a", "z", "key0002", "b"]) == ["z", "a", "b"]
    assert store.missing(["key0000", "key0001"]) == []


def test_dims_mismatch_is_refused(store):
    fill(store, [batch(0, 2, d=4)])
    with pytest.raises(StoreError, match="features have 5 dims; .* holds 4"):
        fill(store, [batch(2, 2, d=5)])
    # also through a fresh handle that learns the dimension from spec.json
    with pytest.raises(StoreError, match="features have 3 dims"):
        fill(FeatureStore(store.directory), [batch(2, 2, d=3)])
    with pytest.raises(StoreError, match=r"features of shape \(3, 4\) do not match 2 keys"):
        with store.writer() as writer:
            writer.add(["x", "y"], np.zeros((3, 4)))
    assert FeatureStore(store.directory).keys() == {"key0000", "key0001"}
    assert len(shard_files(store)) == 1


def test_a_store_folder_of_another_fingerprint_is_refused(store, tmp_path):
    other = FP[:16] + "f" * 48                       # same folder name, different fingerprint
    with pytest.raises(StoreCorruptError, match="holds features of another fingerprint"):
        FeatureStore.open(tmp_path / "features", other, {})


def test_damaged_spec_json(store):
    (store.directory / "spec.json").write_text("{not json")
    with pytest.raises(StoreCorruptError, match="spec.json is damaged"):
        FeatureStore(store.directory)


def test_a_folder_without_spec_is_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="is not a feature store"):
        FeatureStore(tmp_path)


# ---- locking -------------------------------------------------------------------------------


def test_second_writer_fails_fast_with_a_clear_message(store):
    with store.writer() as first:
        first.add(*batch(0, 2))
        started = time.monotonic()
        with pytest.raises(StoreLockedError) as info:
            with store.writer(timeout=0):
                pass
        assert time.monotonic() - started < 1.0
        message = str(info.value)
        assert "another featurepipe process is writing to" in message and str(store.directory) in message
        assert "--lock-timeout" in message
        # a second handle on the same folder conflicts as well
        with pytest.raises(StoreLockedError):
            with FeatureStore(store.directory).writer(timeout=0.3):
                pass
    # once the first writer is done the lock is free again, and its rows are there
    with store.writer(timeout=0) as writer:
        writer.add(*batch(2, 2))
    assert FeatureStore(store.directory).keys() == {f"key{i:04d}" for i in range(4)}


def test_waiting_writer_proceeds_when_the_lock_is_released(store):
    holding = threading.Event()
    errors = []

    def hold():
        try:
            with FeatureStore(store.directory).writer() as writer:
                writer.add(*batch(0, 2))
                holding.set()
                time.sleep(0.5)
        except Exception as error:  # pragma: no cover - surfaced below
            errors.append(error)
            holding.set()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert holding.wait(10)
        started = time.monotonic()
        with store.writer(timeout=5) as writer:
            waited = time.monotonic() - started
            writer.add(*batch(2, 2))
    finally:
        thread.join(10)
    assert errors == []
    assert 0.2 < waited < 5
    assert FeatureStore(store.directory).keys() == {f"key{i:04d}" for i in range(4)}


# ---- crashes and damage --------------------------------------------------------------------


def test_stray_temporary_shard_is_ignored_by_readers_and_removed_by_the_next_writer(store):
    expected = fill(store, [batch(0, 3)])
    shards = store.directory / "shards"
    # what a writer killed mid-write leaves: a half-written file under a temporary name
    real = shard_files(store)[0].read_bytes()
    stray = shards / ".tmp-00000000000000000001-deadbeef.h5"
    stray.write_bytes(real[: len(real) // 2])
    reader = FeatureStore(store.directory)
    assert reader.keys() == set(expected)
    np.testing.assert_array_equal(reader.read(list(expected)), np.stack(list(expected.values())))
    assert reader.verify() == []
    assert reader.info().shards == 1
    assert stray.exists()                     # readers never delete anything
    with reader.writer():
        pass
    assert not stray.exists()
    assert [p.name for p in shards.iterdir()] == [shard_files(store)[0].name]


def _tamper(shard: Path) -> None:
    with h5py.File(shard, "r+") as handle:
        handle["features"][0, 0] = handle["features"][0, 0] + 1.0


def test_tampered_shard_is_detected_reported_and_repaired(store):
    expected = fill(store, [batch(0, 3), batch(3, 4)])
    first, second = shard_files(store)
    with h5py.File(first, "r") as handle:
        damaged_keys = list(handle["keys"].asstr()[()])
    _tamper(first)
    reader = FeatureStore(store.directory)
    with pytest.raises(StoreCorruptError, match="does not match its checksum") as info:
        reader.read(damaged_keys)
    assert "cache verify --repair" in str(info.value) and first.name in str(info.value)
    good_keys = [k for k in expected if k not in damaged_keys]
    np.testing.assert_array_equal(reader.read(good_keys), np.stack([expected[k] for k in good_keys]))
    problems = reader.verify()
    assert len(problems) == 1 and first.name in problems[0]
    assert first.exists()                                   # verify alone changes nothing
    assert reader.verify(repair=True) == problems
    assert not first.exists() and second.exists()
    fresh = FeatureStore(store.directory)
    assert fresh.keys() == set(good_keys)
    assert fresh.missing(list(expected)) == damaged_keys
    np.testing.assert_array_equal(fresh.read(good_keys), np.stack([expected[k] for k in good_keys]))
    assert fresh.verify() == []


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "no_features"])
def test_unreadable_shard_gives_a_clear_error(store, damage):
    expected = fill(store, [batch(0, 3), batch(3, 2)])
    victim = shard_files(store)[0]
    with h5py.File(victim, "r") as handle:
        lost = set(handle["keys"].asstr()[()])
    if damage == "garbage":
        victim.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:-200])
    elif damage == "empty":
        victim.write_bytes(b"")
    else:
        with h5py.File(victim, "r+") as handle:
            del handle["features"]
    reader = FeatureStore(store.directory)
    with pytest.raises(StoreCorruptError, match="cache verify --repair"):
        reader.read(list(expected))
    problems = reader.verify(repair=True)
    assert len(problems) == 1 and victim.name in problems[0]
    assert not victim.exists()
    fresh = FeatureStore(store.directory)
    assert fresh.keys() == set(expected) - lost
    rest = sorted(fresh.keys())
    np.testing.assert_array_equal(fresh.read(rest), np.stack([expected[k] for k in rest]))


# ---- compaction ----------------------------------------------------------------------------


def test_compaction_keeps_every_row_and_value(store, monkeypatch):
    monkeypatch.setattr(store_module, "COMPACT_AT", 3)
    expected = fill(store, [batch(0, 3)])
    assert len(shard_files(store)) == 1                       # at or below the threshold: untouched
    expected.update(fill(store, [batch(3 + 5 * i, 5) for i in range(5)]))
    assert len(shard_files(store)) == 1                       # 6 shards > 3: merged into one
    fresh = FeatureStore(store.directory)
    assert fresh.keys() == set(expected) and len(expected) == 28
    keys = sorted(expected)
    np.testing.assert_array_equal(fresh.read(keys), np.stack([expected[k] for k in keys]))
    assert fresh.verify() == []
    assert list((store.directory / "shards").glob(".tmp-*")) == []


def test_repair_of_several_damaged_shards_in_a_store_due_for_compaction(store, monkeypatch):
    # e.g. a killed run left many shards (no compaction yet) and two of them got damaged
    expected = fill(store, [batch(2 * i, 2) for i in range(6)])
    shards = shard_files(store)
    for shard in shards[:2]:
        _tamper(shard)
    monkeypatch.setattr(store_module, "COMPACT_AT", 2)
    problems = FeatureStore(store.directory).verify(repair=True)
    assert len(problems) == 2
    fresh = FeatureStore(store.directory)
    assert fresh.verify() == []
    assert len(shard_files(store)) == 1                    # the repair's writer compacted the 4 good shards
    good = sorted(set(expected) - {f"key{i:04d}" for i in range(4)})
    assert sorted(fresh.keys()) == good
    np.testing.assert_array_equal(fresh.read(good), np.stack([expected[k] for k in good]))


def test_prune_store_keeps_only_the_given_keys(store):
    expected = fill(store, [batch(0, 4), batch(4, 4)])
    keep = {"key0001", "key0006", "not-there"}
    assert prune_store(store, keep) == 6
    fresh = FeatureStore(store.directory)
    assert fresh.keys() == {"key0001", "key0006"}
    np.testing.assert_array_equal(fresh.read(["key0006", "key0001"]),
                                  np.stack([expected["key0006"], expected["key0001"]]))
    assert prune_store(fresh, keep) == 0


# ---- gc through featurepipe.rundir.maintenance ---------------------------------------------------------


def _second_tree(root: Path) -> Path:
    for c, colour in enumerate([(250, 250, 0), (0, 250, 250)]):
        for i in range(3):
            make_image(root / f"c{c}" / f"img{i}.png", colour, seed=5000 + 10 * c + i)
    return root


def test_gc_removes_the_store_of_a_dataset_that_is_gone(image_tree, tmp_path, cache):
    other = _second_tree(tmp_path / "other")
    spec_other = BackboneSpec(name="tiny", weights="random", image_size=48)
    extract(scan(image_tree, cache_dir=cache), TINY, cache)
    extract(scan(other, cache_dir=cache), spec_other, cache)
    gone_store = open_stores(TINY, cache).originals.directory
    kept_store = open_stores(spec_other, cache).originals.directory
    refs_before = sorted((cache / "refs").glob("*.json"))
    assert len(refs_before) == 2

    shutil.rmtree(image_tree)
    dry = gc_cache(cache, dry_run=True)
    assert dry.dry_run and dry.stores_removed == [str(gone_store)]
    assert dry.refs_removed == 1 and dry.rows_removed == 0
    assert gone_store.exists() and sorted((cache / "refs").glob("*.json")) == refs_before

    result = gc_cache(cache)
    assert result.stores_removed == [str(gone_store)] and result.refs_removed == 1
    assert not gone_store.exists()
    assert [Path(s.directory) for s in list_stores(cache / "features")] == [kept_store]
    assert len(list((cache / "refs").glob("*.json"))) == 1
    assert [info.rows for info in list_cache(cache)] == [6]
    # a second gc has nothing left to do
    again = gc_cache(cache)
    assert (again.stores_removed, again.rows_removed, again.refs_removed) == ([], 0, 0)


def test_gc_keeps_stores_a_run_refers_to(image_tree, cache):
    extract(scan(image_tree, cache_dir=cache), TINY, cache)
    store_dir = open_stores(TINY, cache).originals.directory
    run = cache / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"feature_fingerprints": [open_stores(TINY, cache).originals.fingerprint]}))
    shutil.rmtree(image_tree)
    result = gc_cache(cache)
    assert result.stores_removed == [] and store_dir.exists()


def test_gc_prunes_rows_of_deleted_images(image_tree, cache):
    first = extract(scan(image_tree, cache_dir=cache), TINY, cache, augment=1)
    assert first.extracted == 24
    stores = open_stores(TINY, cache, augment=1)
    before = stores.originals.keys()
    deleted = [image_tree / "red" / "red0.png", image_tree / "green" / "green5.png", image_tree / "blue" / "blue7.png"]
    deleted_hashes = {scan(image_tree).frame.set_index("path").loc[str(p), "hash"] for p in deleted}
    for path in deleted:
        path.unlink()
    # the dataset's reference is refreshed when it is extracted again (nothing new to compute)
    dataset = scan(image_tree, cache_dir=cache)
    again = extract(dataset, TINY, cache, augment=1)
    assert (again.extracted, again.reused, again.views_extracted) == (0, 21, 0)
    keep = set(dataset.frame["hash"])
    survivors = sorted(keep)
    values = open_stores(TINY, cache).originals.read(survivors)

    dry = gc_cache(cache, dry_run=True)
    assert dry.rows_removed == 6 and dry.stores_removed == []          # 3 originals + 3 views
    assert open_stores(TINY, cache, augment=1).originals.keys() == before

    result = gc_cache(cache)
    assert result.rows_removed == 6 and result.stores_removed == []
    after = open_stores(TINY, cache, augment=1)
    assert after.originals.keys() == keep and not (deleted_hashes & after.originals.keys())
    assert after.views.keys() == {f"{h}@0" for h in keep}
    np.testing.assert_array_equal(after.originals.read(survivors), values)
    assert after.originals.verify() == [] and after.views.verify() == []
