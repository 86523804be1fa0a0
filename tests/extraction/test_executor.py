"""The executor seam without Dask: one batch plan for every executor, idempotent publishing, the driver's
commit of published shards, and what a worker does with one batch (run in-process here)."""

import sys

import h5py
import numpy as np
import pytest

from featurepipe.backbones.fingerprint import backbone_fingerprint
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.extraction.batches import BatchJob, plan_batches, run_batch
from featurepipe.data.dataset import scan
from featurepipe.core.errors import BackboneError, DatasetError, FeaturepipeError, StoreCorruptError, StoreError
from featurepipe.extraction.executors.choose import current_executor, executor_scope, open_executor, use_executor
from featurepipe.extraction.executors.local import LocalExecutor
from featurepipe.extraction.extract import extract, open_stores
from featurepipe.store.featurestore import FeatureStore
from featurepipe.store.shards import publish_shard
from tests.conftest import make_image

TINY = BackboneSpec(name="tiny", weights="random", image_size=32)
FP = "fedcba9876543210" * 4


# ---- planning ------------------------------------------------------------------------------------


def test_plan_cuts_sorted_hashes_into_fixed_batches_with_content_ids():
    todo = {h: [h, f"{h}@0"] for h in ["c3", "a1", "b2", "e5", "d4"]}
    batches = plan_batches(todo, 2)
    assert [[h for h, _ in b.items] for b in batches] == [["a1", "b2"], ["c3", "d4"], ["e5"]]
    assert batches[0].keys == ["a1", "a1@0", "b2", "b2@0"]
    # the same missing set in another order gives the same batches; other content, other ids
    again = plan_batches(dict(reversed(list(todo.items()))), 2)
    assert [b.id for b in again] == [b.id for b in batches]
    assert len({b.id for b in batches}) == 3 and all(len(b.id) == 24 for b in batches)
    other = plan_batches({**todo, "a1": ["a1"]}, 2)
    assert other[0].id != batches[0].id and other[1:] == batches[1:]
    assert batches[2].shard_name == f"batch-{batches[2].id}.h5"
    assert plan_batches({}, 4) == [] and plan_batches({"x": []}, 4) == []
    with pytest.raises(ValueError, match="at least 1"):
        plan_batches(todo, 0)


def test_local_extract_names_shards_by_batch_in_hash_order(image_tree, tmp_path):
    results = {}
    for name in ("a", "b"):
        cache = tmp_path / name
        extract(scan(image_tree, cache_dir=cache), TINY, cache, batch_size=5)
        store = open_stores(TINY, cache).originals
        results[name] = {p.name: h5py.File(p, "r")["keys"].asstr()[()].tolist()
                         for p in sorted((store.directory / "shards").glob("*.h5"))}
    hashes = sorted(set(scan(image_tree).frame["hash"]))
    want = {b.shard_name: b.keys for b in plan_batches({h: [h] for h in hashes}, 5)}
    assert results["a"] == results["b"] == want
    assert [len(keys) for keys in want.values()] == [5, 5, 5, 5, 4]


# ---- publishing and committing -------------------------------------------------------------------


def test_publish_never_clobbers_and_leaves_no_temporary(tmp_path):
    first = np.ones((2, 3), np.float32)
    assert publish_shard(tmp_path, "batch-x.h5", ["a", "b"], first) is True
    assert publish_shard(tmp_path, "batch-x.h5", ["a", "b"], first * 7) is False     # a retry: discarded
    with h5py.File(tmp_path / "batch-x.h5", "r") as handle:
        np.testing.assert_array_equal(handle["features"][()], first)
    assert [p.name for p in tmp_path.iterdir()] == ["batch-x.h5"]
    with pytest.raises(StoreError, match="do not match 3 keys"):
        publish_shard(tmp_path, "batch-y.h5", ["a", "b", "c"], first)
    assert [p.name for p in tmp_path.iterdir()] == ["batch-x.h5"]


@pytest.fixture
def store(tmp_path):
    store = FeatureStore.open(tmp_path / "features", FP, {"name": "test"})
    store.incoming.mkdir()
    return store


def test_driver_commits_a_published_shard_once_and_checks_it(store):
    keys, features = ["k1", "k2"], np.arange(8, dtype=np.float32).reshape(2, 4)
    with store.writer() as writer:
        publish_shard(store.incoming, "batch-1.h5", keys, features)       # a worker, while the driver writes
        with pytest.raises(StoreCorruptError, match="rows its batch planned"):
            writer.commit_published(store.incoming / "batch-1.h5", ["k1", "k3"])
        assert writer.commit_published(store.incoming / "batch-1.h5", keys) == 2
        # a retried task published the same batch again after the first copy was committed: dropped
        publish_shard(store.incoming, "batch-1.h5", keys, features)
        writer.commit_published(store.incoming / "batch-1.h5", keys)
        assert writer.rows_written == 2
        elsewhere = store.directory / "batch-2.h5"
        publish_shard(store.directory, "batch-2.h5", ["k9"], features[:1])
        with pytest.raises(StoreError, match="only published shards"):
            writer.commit_published(elsewhere)
    assert [p.name for p in (store.directory / "shards").iterdir()] == ["batch-1.h5"]
    assert list(store.incoming.iterdir()) == []
    np.testing.assert_array_equal(FeatureStore(store.directory).read(keys), features)


def test_a_writer_settles_what_workers_left_in_incoming(store):
    features = np.ones((1, 4), np.float32)
    with store.writer() as writer:
        writer.add(["done"], features, name="batch-0.h5")
    publish_shard(store.incoming, "batch-orphan.h5", ["orphan"], features * 2)    # driver died before commit
    publish_shard(store.incoming, "batch-dup.h5", ["done"], features)             # rows already committed
    (store.incoming / "batch-torn.h5").write_bytes(b"\x89HDF\r\n half a file")     # cannot happen, but
    (store.incoming / ".tmp-1234abcd-batch-9.h5").write_bytes(b"partial")          # a worker killed mid-write
    publish_shard(store.incoming, "batch-alien.h5", ["alien"], np.ones((1, 7), np.float32))   # other dims
    with store.writer():
        pass
    assert list(store.incoming.iterdir()) == []
    assert sorted(p.name for p in (store.directory / "shards").iterdir()) == ["batch-0.h5", "batch-orphan.h5"]
    np.testing.assert_array_equal(FeatureStore(store.directory).read(["orphan", "done"]), [[2] * 4, [1] * 4])


# ---- one batch, as a worker runs it --------------------------------------------------------------


def _job(cache, stores, **overrides):
    values = dict(spec=stores.spec, root=str(cache), payload=stores.originals.payload,
                  originals_incoming=str(stores.originals.incoming), views_incoming=None, policy=None,
                  augment_seed=0, chunk=3, registry_module="tests.tiny_backbone")
    return BatchJob(**{**values, **overrides})


def test_run_batch_publishes_the_same_rows_as_a_local_extract(image_tree, tmp_path):
    dataset = scan(image_tree)
    paths = dataset.frame.drop_duplicates("hash").set_index("hash")["path"].to_dict()
    (batch,) = plan_batches({h: [h] for h in sorted(paths)[:4]}, 4)
    cache = tmp_path / "cache"
    stores = open_stores(TINY, cache)
    stores.originals.incoming.mkdir()
    outcome = run_batch(_job(cache, stores), batch, paths)
    assert outcome.failures == {} and outcome.views is None
    published = stores.originals.incoming / batch.shard_name
    assert outcome.originals.published == str(published) and outcome.originals.features is None
    with h5py.File(published, "r") as handle:
        assert handle["keys"].asstr()[()].tolist() == batch.keys
        remote = handle["features"][()]
    local_cache = tmp_path / "local"
    extract(dataset, TINY, local_cache, batch_size=4)
    np.testing.assert_allclose(remote, open_stores(TINY, local_cache).originals.read(batch.keys), atol=1e-6)


def test_a_worker_that_cannot_see_a_file_fails_loudly_instead_of_recording_a_bad_image(image_tree, tmp_path):
    cache = tmp_path / "cache"
    stores = open_stores(TINY, cache)
    stores.originals.incoming.mkdir()
    (batch,) = plan_batches({"h1": ["h1"]}, 1)
    with pytest.raises(DatasetError, match="does not exist on worker .* shared"):
        run_batch(_job(cache, stores), batch, {"h1": str(tmp_path / "elsewhere.png")})


def test_a_worker_that_cannot_see_the_cache_says_so(image_tree, tmp_path):
    cache = tmp_path / "cache"
    stores = open_stores(TINY, cache)          # no incoming/: as on a worker without the shared filesystem
    path = make_image(tmp_path / "one.png", (1, 2, 3), seed=1)
    (batch,) = plan_batches({"h1": ["h1"]}, 1)
    with pytest.raises(StoreError, match="incoming does not exist on worker .* same path"):
        run_batch(_job(cache, stores), batch, {"h1": str(path)})


def test_a_worker_with_other_library_versions_refuses_to_compute(image_tree, tmp_path):
    cache = tmp_path / "cache"
    stores = open_stores(TINY, cache)
    stores.originals.incoming.mkdir()
    payload = {**stores.originals.payload, "versions": {**stores.originals.payload["versions"], "keras": "0.0.1"}}
    path = make_image(tmp_path / "one.png", (1, 2, 3), seed=1)
    (batch,) = plan_batches({"h1": ["h1"]}, 1)
    with pytest.raises(BackboneError, match="different features than the driver.*versions.*0.0.1"):
        run_batch(_job(cache, stores, payload=payload), batch, {"h1": str(path)})
    assert backbone_fingerprint(stores.spec, cache)[1] == stores.originals.payload


# ---- choosing an executor ------------------------------------------------------------------------


def test_open_executor_options(monkeypatch):
    monkeypatch.delenv("FEATUREPIPE_SCHEDULER", raising=False)
    assert isinstance(open_executor(), LocalExecutor)
    with pytest.raises(FeaturepipeError, match="exclude each other"):
        open_executor("tcp://127.0.0.1:8786", 2)
    with pytest.raises(FeaturepipeError, match="at least 1"):
        open_executor(workers=0)
    assert isinstance(current_executor(), LocalExecutor)
    marker = LocalExecutor()
    with use_executor(marker):
        assert current_executor() is marker
    assert current_executor() is not marker


def test_without_the_dask_extra_the_message_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "featurepipe.extraction.executors.dask_cluster", None)      # import fails as if not installed
    for kwargs in ({"workers": 2}, {"scheduler": "tcp://127.0.0.1:8786"}):
        with pytest.raises(FeaturepipeError, match=r"pip install 'featurepipe\[dask\]'"):
            with executor_scope(**kwargs):
                pass
    monkeypatch.setenv("FEATUREPIPE_SCHEDULER", "tcp://127.0.0.1:8786")
    with pytest.raises(FeaturepipeError, match="dask extra"):
        open_executor()


def test_random_weights_do_not_depend_on_other_threads_using_random():
    """A Dask worker's event loop draws from Python's `random` while a task builds a model; Keras seeds
    its initializers from that same generator, so without isolation the weights changed run to run."""
    import random
    import threading

    from featurepipe.backbones.build import build_feature_model

    quiet = build_feature_model(TINY).get_weights()
    stop = threading.Event()

    def noisy():
        while not stop.is_set():
            random.random()

    thread = threading.Thread(target=noisy, daemon=True)
    thread.start()
    try:
        busy = [build_feature_model(TINY).get_weights() for _ in range(3)]
    finally:
        stop.set()
        thread.join()
    for weights in busy:
        for a, b in zip(quiet, weights):
            np.testing.assert_array_equal(a, b)


def test_only_distributeds_sync_cancel_bug_is_dropped_from_tornados_log():
    """The one known record (distributed/utils.py's `cancel` reading `future` before it is set, after
    a Ctrl-C) is dropped; any other error, even a NameError elsewhere, still reaches the log."""
    import logging

    pytest.importorskip("distributed", reason="the dask extra is not installed")
    from featurepipe.extraction.executors.dask_cluster import _SYNC_CANCEL_FILTER

    def record_from(filename: str, name: str, error_code: str) -> logging.LogRecord:
        scope: dict = {}
        exec(compile(f"def {name}():\n    {error_code}\n", filename, "exec"), scope)
        try:
            scope[name]()
        except Exception:
            import sys
            info = sys.exc_info()
        return logging.LogRecord("tornado.application", logging.ERROR, __file__, 1, "callback", None, info)

    bug = record_from("/venv/site-packages/distributed/utils.py", "cancel", "future")
    assert logging.getLogger("tornado.application").filters.count(_SYNC_CANCEL_FILTER) == 1
    assert not _SYNC_CANCEL_FILTER.filter(bug)
    assert _SYNC_CANCEL_FILTER.filter(record_from("/app/mine.py", "cancel", "future"))
    assert _SYNC_CANCEL_FILTER.filter(record_from("/venv/site-packages/distributed/utils.py", "cancel", "1 / 0"))
    assert _SYNC_CANCEL_FILTER.filter(logging.LogRecord("x", logging.ERROR, __file__, 1, "plain", None, None))
