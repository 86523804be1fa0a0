"""What speed and scale may change and what they may not: features are the same (to round-off)
whatever the batch size, decode threads or precision policy; the store, exports and predict read
in bounded pieces; batch size is chosen per device."""

import json
import platform
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from featurepipe.store import featurestore as store_module
from featurepipe.backbones import accel
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.data.dataset import scan
from featurepipe.core.errors import StoreCorruptError
from featurepipe.extraction.extract import extract, open_stores
from featurepipe.extraction.features import dataset_features, export_dataset_features, export_features
from featurepipe.store.featurestore import FeatureStore

TINY = BackboneSpec(name="tiny", weights="random", image_size=32)


def features_by_path(root, cache, precision="float32"):
    dataset = scan(root, cache_dir=cache)
    features = dataset_features(dataset, open_stores(TINY, cache, precision=precision))
    return dict(zip(features.frame["path"], features.X))


# ---- same features whatever the speed knobs ----------------------------------------------------


def test_features_do_not_depend_on_batch_size_or_decode_threads(image_tree, tmp_path):
    reference = None
    for batch_size, threads in [(32, None), (1, 1), (5, 3), (24, 2)]:
        cache = tmp_path / f"cache-{batch_size}-{threads}"
        result = extract(scan(image_tree, cache_dir=cache), TINY, cache, batch_size=batch_size,
                         decode_threads=threads)
        assert (result.extracted, result.batch_size) == (24, batch_size)
        got = features_by_path(image_tree, cache)
        if reference is None:
            reference = got
            continue
        assert got.keys() == reference.keys()
        for path, row in got.items():
            np.testing.assert_allclose(row, reference[path], rtol=1e-5, atol=1e-6, err_msg=f"batch {batch_size}")


def test_mixed_precision_features_match_float32_to_tolerance_and_live_in_their_own_store(image_tree, cache):
    full = extract(scan(image_tree, cache_dir=cache), TINY, cache)
    half = extract(scan(image_tree, cache_dir=cache), TINY, cache, precision="mixed_float16")
    assert (full.precision, half.precision) == ("float32", "mixed_float16")
    assert half.extracted == 24 and half.fingerprint != full.fingerprint     # never mixed with float32 rows
    assert open_stores(TINY, cache).originals.fingerprint == full.fingerprint
    f32, f16 = features_by_path(image_tree, cache), features_by_path(image_tree, cache, "mixed_float16")
    X32 = np.stack([f32[p] for p in sorted(f32)])
    X16 = np.stack([f16[p] for p in sorted(f16)])
    assert X16.dtype == np.float32
    assert not np.array_equal(X16, X32)                                       # it did run in half precision
    scale = np.abs(X32).max()
    np.testing.assert_allclose(X16, X32, rtol=0, atol=5e-3 * scale)
    # what a head sees: the same nearest neighbours
    assert (np.argmin(((X16[:, None] - X32[None]) ** 2).sum(-1), axis=1) == np.arange(len(X32))).all()


def test_unknown_precision_is_refused_before_any_work(image_tree, cache):
    with pytest.raises(ValueError, match="precision must be one of float32, mixed_float16"):
        extract(scan(image_tree, cache_dir=cache), TINY, cache, precision="float8")


def test_batch_size_is_32_on_a_cpu_and_the_largest_that_fits_on_a_gpu(monkeypatch):
    import tensorflow as tf

    monkeypatch.setattr(accel, "gpu_available", lambda: False)
    assert accel.auto_batch_size(lambda batch: batch, 32, pending=10_000) == 32
    monkeypatch.setattr(accel, "gpu_available", lambda: True)
    tried = []

    def infer(batch):
        tried.append(len(batch))
        if len(batch) > 64:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
        return np.zeros((len(batch), 4), np.float32)

    assert accel.auto_batch_size(infer, 32, pending=10_000) == 64
    assert tried == [256, 128, 64]
    tried.clear()
    assert accel.auto_batch_size(infer, 32, pending=100) == 64 and tried == [64]   # 128 > the work
    assert accel.auto_batch_size(infer, 32, pending=3) == 32


def test_extract_reports_the_auto_chosen_batch_size(image_tree, cache):
    result = extract(scan(image_tree, cache_dir=cache), TINY, cache)
    assert result.batch_size == 32 and result.to_dict()["batch_size"] == 32


# ---- bounded store reads and compaction ------------------------------------------------------


def _fill(store, batches):
    expected = {}
    for keys in batches:
        rows = np.random.default_rng(len(expected)).normal(size=(len(keys), 6)).astype(np.float32)
        with store.writer() as writer:
            writer.add(keys, rows)
        expected.update(zip(keys, rows))
    return expected


@pytest.fixture
def small_shards(tmp_path, monkeypatch):
    """A store whose compacted shards hold 10 rows of 6 floats."""
    monkeypatch.setattr(store_module, "SHARD_BYTES", 10 * 4 * 6)
    monkeypatch.setattr(store_module, "MIN_SHARD_ROWS", 1)
    monkeypatch.setattr(store_module, "COMPACT_AT", 3)
    from featurepipe.backbones.spec import hash_payload

    # A real fingerprint (the hash of its payload): `verify` checks that spec.json was not edited.
    return FeatureStore.open(tmp_path / "features", hash_payload({"test": True}), {"test": True})


def _shard_sizes(store):
    sizes = {}
    for path in store._shard_paths():
        keys, _ = store._read_shard(path)
        sizes[path.name] = len(keys)
    return sizes


def test_compaction_writes_bounded_shards_and_leaves_full_ones_alone(small_shards):
    store = small_shards
    expected = _fill(store, [[f"k{i:03d}" for i in range(j, j + 4)] for j in range(0, 28, 4)])   # 7 shards of 4
    sizes = _shard_sizes(store)
    assert sorted(sizes.values()) == [8, 10, 10]
    full = {name for name, size in sizes.items() if size == 10}
    expected.update(_fill(store, [[f"n{i:03d}"] for i in range(3)]))      # 3 one-row shards: 6 > 3 shards
    sizes = _shard_sizes(store)
    assert full <= set(sizes)                                            # full shards were not rewritten
    assert sorted(sizes.values()) == [1, 10, 10, 10]
    fresh = FeatureStore(store.directory)
    keys = sorted(expected)
    assert fresh.keys() == set(keys)
    np.testing.assert_array_equal(fresh.read(keys), np.stack([expected[k] for k in keys]))
    assert fresh.verify() == []


def test_a_checked_shard_is_read_in_part_and_a_damaged_one_is_still_caught(small_shards, monkeypatch):
    store = small_shards
    expected = _fill(store, [[f"k{i:03d}" for i in range(12)]])
    fresh = FeatureStore(store.directory)
    np.testing.assert_array_equal(fresh.read(["k003"]), expected["k003"][None])   # first touch: checked whole

    def whole_read(*args, **kwargs):
        raise AssertionError("a shard already checked was read whole again")

    monkeypatch.setattr(fresh, "_read_shard", whole_read)
    keys = ["k011", "k000", "k005"]
    np.testing.assert_array_equal(fresh.read(keys), np.stack([expected[k] for k in keys]))
    chunks = list(fresh.iter_read([f"k{i:03d}" for i in range(12)], chunk_rows=5))
    assert [len(c) for c in chunks] == [5, 5, 2]
    np.testing.assert_array_equal(np.concatenate(chunks), np.stack([expected[f"k{i:03d}"] for i in range(12)]))
    # A new reader (another process) checks the shard again and refuses a damaged one.
    shard = store._shard_paths()[0]
    import h5py

    with h5py.File(shard, "r+") as handle:
        handle["features"][0, 0] += 1.0
    with pytest.raises(StoreCorruptError, match="checksum"):
        FeatureStore(store.directory).read(["k000"])


# ---- streaming export ----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npz", ".parquet", ".csv"])
def test_streamed_export_reads_in_chunks_and_writes_what_the_whole_table_would(image_tree, cache, tmp_path,
                                                                               suffix, monkeypatch):
    dataset = scan(image_tree, cache_dir=cache)
    extract(dataset, TINY, cache)
    stores = open_stores(TINY, cache)
    whole = export_features(dataset_features(dataset, stores), tmp_path / f"whole{suffix}")
    sizes = []
    real_read = FeatureStore.read

    def read(self, keys):
        sizes.append(len(keys))
        return real_read(self, keys)

    monkeypatch.setattr(FeatureStore, "read", read)
    written = export_dataset_features(dataset, open_stores(TINY, cache), tmp_path / f"streamed{suffix}",
                                      chunk_rows=5)
    assert (written.rows, written.feature_dim, written.missing) == (24, 24, [])
    assert sizes == [5, 5, 5, 5, 4]                         # never the whole matrix at once
    if suffix == ".npz":
        with np.load(whole) as a, np.load(written.path) as b:
            assert sorted(a.files) == sorted(b.files)
            for name in a.files:
                np.testing.assert_array_equal(a[name], b[name])
            assert b["features"].dtype == np.float32 and b["features"].shape == (24, 24)
    else:
        read_table = pd.read_parquet if suffix == ".parquet" else pd.read_csv
        pd.testing.assert_frame_equal(read_table(whole), read_table(written.path))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


@pytest.mark.parametrize("suffix", [".npz", ".parquet", ".csv"])
def test_streamed_export_holds_what_the_plain_whole_table_writers_would(image_tree, cache, tmp_path, suffix):
    """The same rows, order and values as writing the whole table at once with numpy / pandas (what
    `features export` wrote before it streamed), with a group column whose widest value comes last
    (the .npz string width is the whole column's, not the first chunk's) and missing groups (""
    in .npz: pandas 3 cut a column with a missing value to one character per value)."""
    images = sorted(image_tree.rglob("*.png"))
    groups = ["" if i % 3 else "g" for i in range(len(images) - 1)] + ["a-much-longer-group-name-\u00e9"]
    manifest = image_tree / "manifest.csv"
    manifest.write_text("path,label,group\n" + "".join(f"{p.relative_to(image_tree)},{p.parent.name},{g}\n"
                                                      for p, g in zip(images, groups)), encoding="utf-8")
    dataset = scan(manifest, cache_dir=cache)
    extract(dataset, TINY, cache)
    stores = open_stores(TINY, cache)
    whole = dataset_features(dataset, stores)
    meta, X = whole.frame[["path", "label", "split", "group", "hash"]], whole.X
    written = export_dataset_features(dataset, open_stores(TINY, cache), tmp_path / f"streamed{suffix}", chunk_rows=5)
    assert written.rows == len(images) == 24
    if suffix == ".npz":
        reference = tmp_path / "reference.npz"
        np.savez_compressed(reference, features=X, **{c: np.array(["" if pd.isna(v) else v for v in meta[c].tolist()],
                                                                dtype=str) for c in meta})
        with np.load(reference) as want, np.load(written.path) as got:
            assert sorted(got.files) == sorted(want.files)
            for name in want.files:
                assert got[name].dtype == want[name].dtype, name      # e.g. <U30 for the widest group
                np.testing.assert_array_equal(got[name], want[name])
            assert got["group"][-1] == groups[-1] and got["group"][0] == "g" and got["group"][1] == ""
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        got = pq.read_table(written.path)
        assert got.column_names == list(meta.columns) + ["features"]
        for c in meta.columns:   # strings, missing as null
            assert got.column(c).to_pylist() == [None if pd.isna(v) else v for v in meta[c].tolist()], c
        assert got.column("group").to_pylist()[:2] == ["g", None]
        assert got.schema.field("features").type == pa.list_(pa.float32(), X.shape[1])
        features = np.stack(pd.read_parquet(written.path)["features"].to_numpy())
        assert features.dtype == np.float32
        np.testing.assert_array_equal(features, X)
        # One row group per 5-row chunk; metadata stays small however many groups there are.
        meta_data = pq.ParquetFile(written.path).metadata
        assert [meta_data.row_group(i).num_rows for i in range(meta_data.num_row_groups)] == [5, 5, 5, 5, 4]
        assert meta_data.num_columns == len(meta.columns) + 1
    else:
        table = pd.concat([meta, pd.DataFrame(X, columns=[f"f{i}" for i in range(X.shape[1])])], axis=1)
        assert written.path.read_text() == table.to_csv(index=False)


@pytest.mark.parametrize("chosen, expected", [(None, "system"), ("mimalloc", "mimalloc")])
def test_cli_gives_arrow_the_system_allocator_unless_the_user_chose_one(chosen, expected):
    """featurepipe.cli.memory (called by the CLI): pandas' Arrow strings on the system allocator, which
    returns freed blocks (mimalloc kept ~20 MB after a 70,000-image scan), even when pandas was
    imported first; an ARROW_DEFAULT_MEMORY_POOL the user set wins."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    if chosen:
        env["ARROW_DEFAULT_MEMORY_POOL"] = chosen
    code = ("import pandas as pd\nfrom featurepipe.cli.memory import lean_arrow_allocator\nlean_arrow_allocator()\n"
            "import pyarrow as pa\npd.Series(['a', 'b'], dtype='str')\nprint(pa.default_memory_pool().backend_name)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parents[2]))
    assert out.stdout.strip() == expected


_BLOCKS_CHILD = """
import ctypes, sys
from featurepipe.cli.memory import return_large_blocks
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, (ctypes.c_void_p,)
libc.memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
if sys.argv[1] == "fixed":
    assert return_large_blocks()
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
def block(size):
    address = libc.malloc(size)
    libc.memset(address, 1, size)   # touched, so resident
    return address
libc.free(block(8 << 20))          # a first big block, freed: glibc raises its mmap threshold here
chunks = [block(5 << 20) for _ in range(40)]
held = resident()
for address in chunks[::2]:        # every other chunk freed, its neighbours still in use (as a writer's are)
    libc.free(address)
print(round(held - resident()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's mallopt")
def test_return_large_blocks_gives_freed_chunks_back_to_the_system():
    """featurepipe.cli.memory.return_large_blocks (features export): 20 freed 5 MB chunks between chunks
    still in use go back to the system (~100 MB); with glibc's adaptive threshold they sit on the heap
    between live neighbours and stay resident."""
    import subprocess

    def returned(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _BLOCKS_CHILD, mode], capture_output=True, text=True,
                             check=True, cwd=str(Path(__file__).resolve().parents[2]))
        return int(out.stdout.strip())

    # Without it (a plain process) glibc kept them: 0 MB returned here. (Under the full suite a child
    # sometimes got mapped blocks without it too, for reasons not found, so that side is not asserted.)
    fixed = returned("fixed")
    assert fixed > 80, f"{fixed} MB returned with the fixed threshold, {returned('adaptive')} MB without"
