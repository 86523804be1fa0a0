"""What issue 14's flat-memory rework may not change: the scan's table, warnings and unreadable
list whatever the chunk size; repeats as pandas finds them; the store index's lookups; store reads
of rows scattered over shards; the ref file's text; and `features export`'s files, for odd names,
missing values, repeated images and a store whose rows are in another order than the dataset."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from featurepipe.core import columns

from featurepipe.data import dataset as dataset_module

from featurepipe.store import refs, featurestore as store_module
from featurepipe.backbones.spec import hash_payload
from featurepipe.data.dataset import scan
from featurepipe.extraction.features import FeatureStores, export_dataset_features
from featurepipe.store.keyindex import KeyIndex
from featurepipe.store.featurestore import FeatureStore
from tests.conftest import make_image

# ---- repeats -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["str", object])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 5000, 9000])
def test_duplicated_is_pandas_duplicated(n, dtype, monkeypatch):
    monkeypatch.setattr(columns, "CHUNK_ROWS", 1000)       # several chunks of digests
    values = pd.Series([f"v{x}" for x in np.random.default_rng(n).integers(0, max(1, n // 3), n)], dtype=dtype)
    for keep in ("first", False):
        np.testing.assert_array_equal(columns.duplicated(values, keep), values.duplicated(keep=keep).to_numpy())


def test_duplicated_never_merges_values_whose_digests_collide(monkeypatch):
    values = pd.Series(["a", "b", "a", "c"], dtype="str")
    monkeypatch.setattr(columns, "_digests", lambda v: np.zeros(len(v), dtype=np.uint64))   # every digest equal
    np.testing.assert_array_equal(columns.duplicated(values), [False, False, True, False])
    np.testing.assert_array_equal(columns.duplicated(values, keep=False), [True, False, True, False])


# ---- scan --------------------------------------------------------------------------------------


def _odd_tree(root):
    """Class folders with odd names (spaces, comma, quote, accents), a copy under another class, a
    non-image, a broken image, a dangling symlink, a FIFO and a name that is not UTF-8."""
    names = ["a 1.png", "\u00fc-\u00e9,comma.png", 'quote"x.png', "b.png", "c.png"]
    for c, label in enumerate(["cat", "dog", "bird"]):
        for i, name in enumerate(names):
            make_image(root / label / name, (40 * c, 80, 200 - 30 * i), seed=10 * c + i)
    (root / "dog" / "copy-of-cat-b.png").write_bytes((root / "cat" / "b.png").read_bytes())
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / "broken.png").write_bytes(b"not a png")
    os.symlink(root / "nowhere.png", root / "bird" / "dangling.png")
    os.mkfifo(root / "bird" / "fifo.png")
    (root / "bird" / os.fsdecode(b"bad\xff.png")).write_bytes((root / "bird" / "c.png").read_bytes())
    return names


def _odd_manifest(root, names):
    lines = ["path,label,split,group"]
    for i, (label, name) in enumerate((label, name) for label in ("cat", "dog", "bird") for name in names):
        path = f"{label}/{name}".replace('"', '""')
        split = ["train", "val", "", "test", "TRAIN"][i % 5] if label != "bird" else "train"
        lines.append(f'"{path}",{label},{split},{"" if i % 3 == 0 else f"g{i % 4}"}')
    lines += ["cat/a 1.png,dog,train,",              # a repeat with another label
              "cat/gone.png,cat,train,g9", "cat/gone.png,cat,train,",   # missing, then its repeat
              ",cat,,",                                # empty path
              "dog/broken.png,dog,train,gx", "bird/dangling.png,bird,train,",
              "dog/copy-of-cat-b.png,dog,train,a-much-longer-group-\u00e9"]
    (root / "m.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "m.csv"


def _same_scan(a, b):
    pd.testing.assert_frame_equal(a.frame, b.frame)
    assert a.frame.dtypes.to_dict() == b.frame.dtypes.to_dict()
    assert (a.warnings, a.unreadable, a.ignored, a.classes, a.layout) == (b.warnings, b.unreadable, b.ignored,
                                                                         b.classes, b.layout)


@pytest.mark.parametrize("layout", ["folders", "manifest", "groups"])
def test_scan_gives_the_same_dataset_whatever_the_chunk_size(tmp_path, cache, monkeypatch, layout):
    root = tmp_path / "data"
    names = _odd_tree(root)
    source = _odd_manifest(root, names) if layout == "manifest" else root
    options = {"groups_pattern": r"^(.)"} if layout == "groups" else {}
    whole = scan(source, cache_dir=cache, **options)
    monkeypatch.setattr(dataset_module, "ROWS_CHUNK", 2)       # chunk edges everywhere
    _same_scan(scan(source, cache_dir=cache, **options), whole)
    _same_scan(scan(source, **options), whole)                 # hashing without the cache


def test_a_manifest_scan_keeps_its_rows_warnings_and_missing_groups(tmp_path, cache, monkeypatch):
    """The manifest's repeats and missing files are settled after reading: same words, line order."""
    monkeypatch.setattr(dataset_module, "ROWS_CHUNK", 3)
    root = tmp_path / "data"
    manifest = _odd_manifest(root, _odd_tree(root))
    ds = scan(manifest, cache_dir=cache)
    assert len(ds) == 17 and ds.classes == ["bird", "cat", "dog"]
    listed = [w.split(": ", 1)[0].rsplit(":", 1)[1] for w in ds.warnings if w.startswith(str(manifest))]
    assert listed == ["17", "18", "19", "20", "22"]             # one warning per line, in line order
    repeat = f"{root / 'cat' / 'a 1.png'} is already listed on line 2 (with label 'cat' there, 'dog' here)"
    assert repeat in ds.warnings[0]
    assert "gone.png does not exist" in ds.warnings[1] and "already listed on line 18" in ds.warnings[2]
    assert "empty path or label" in ds.warnings[3] and "dangling.png does not exist" in ds.warnings[4]
    assert "different labels" in ds.warnings[-1] and "copy-of-cat-b.png (dog)" in ds.warnings[-1]
    assert ds.frame["group"].isna().sum() == 5 and ds.frame["group"].iloc[-1] == "a-much-longer-group-\u00e9"
    assert ds.frame.dtypes["group"] == pd.Series(["x", None]).dtype          # text, as pandas makes the list


def test_a_dataset_without_any_group_keeps_an_object_group_column(image_tree, monkeypatch):
    """The dtypes pandas gives the whole lists: text columns as text, no group at all as object Nones."""
    monkeypatch.setattr(dataset_module, "ROWS_CHUNK", 5)
    ds = scan(image_tree)
    text = pd.Series(["x"]).dtype
    assert ds.frame.dtypes.to_dict() == {"path": text, "label": text, "split": text, "group": np.dtype(object),
                                         "hash": text, "bytes": np.dtype("int64")}
    assert ds.frame["group"].isna().all()


# ---- the store's index and reads ---------------------------------------------------------------


def test_key_index_lookups():
    index = KeyIndex.build([("s0", np.array([b"b", b"a", b"c@1"], dtype=object)),
                            ("s1", ["a", "z\u00e9"])])            # "a" again: the later shard wins
    assert len(index) == 4 and sorted(index) == ["a", "b", "c@1", "z\u00e9"]
    np.testing.assert_array_equal(index.contains(iter(["a", "x", "z\u00e9", "c@1", "longer-than-any-key", ""])),
                                  [True, False, True, True, False, False])
    shards, rows = index.locate(["a", "b", "z\u00e9", "a"])
    assert [index.names[s] for s in shards] == ["s1", "s0", "s1", "s1"] and rows.tolist() == [0, 0, 1, 0]
    with pytest.raises(KeyError) as error:
        index.locate(["a", "q"])
    assert error.value.args[0] == ["q"]
    empty = KeyIndex.build([])
    assert len(empty) == 0 and list(empty) == [] and empty.contains(["a"]).tolist() == [False]


def test_reads_of_rows_scattered_over_shards_are_exact(tmp_path, monkeypatch):
    """Rows read as a selection (scattered), as a span (dense) and in any order, repeats included."""
    monkeypatch.setattr(store_module, "COMPACT_AT", 1000)
    store = FeatureStore.open(tmp_path / "features", hash_payload({"t": 1}), {"t": 1})
    rng = np.random.default_rng(0)
    expected = {}
    with store.writer() as writer:
        for shard in range(3):
            keys = [f"k{shard}-{i:03d}" for i in range(100)]
            rows = rng.normal(size=(100, 5)).astype(np.float32)
            writer.add(keys, rows)
            expected.update(zip(keys, rows))
    fresh = FeatureStore(store.directory)
    for keys in (["k0-000", "k2-099", "k1-050", "k0-099", "k2-000"],          # scattered
                 [f"k1-{i:03d}" for i in range(10, 30)],                        # dense, in order
                 [f"k1-{i:03d}" for i in range(30, 10, -1)] + ["k1-015"],       # dense, reversed, a repeat
                 list(rng.permutation(sorted(expected)))):
        np.testing.assert_array_equal(fresh.read(keys), np.stack([expected[k] for k in keys]))
    assert fresh.missing(["k0-001", "nope", "k2-004", "nope", "other"]) == ["nope", "other"]
    assert fresh.keys() == set(expected) and fresh.has(["k1-001", "zz"]).tolist() == [True, False]


# ---- refs --------------------------------------------------------------------------------------


class _Source:
    def __init__(self, source, hashes):
        self.source = source
        self.frame = pd.DataFrame({"hash": pd.Series(hashes, dtype="str")})


class _Store:
    def __init__(self, fingerprint):
        self.fingerprint = fingerprint


def test_a_ref_is_written_as_write_json_would_and_compared_without_rewriting(tmp_path, monkeypatch):
    monkeypatch.setattr(columns, "CHUNK_ROWS", 3)
    hashes = [f"{i:064x}" for i in (9, 3, 3, 7, 1, 12, 5, 3)]
    dataset = _Source(tmp_path, hashes)
    refs.record(tmp_path, dataset, [_Store("fp-b")])
    [path] = list(refs.refs_dir(tmp_path).glob("*.json"))
    data = json.loads(path.read_text())
    assert data["hashes"] == sorted(set(hashes)) and data["stores"] == ["fp-b"]
    assert path.read_text() == json.dumps(data, indent=2, sort_keys=True, default=str)
    written = path.stat().st_mtime_ns
    refs.record(tmp_path, dataset, [_Store("fp-b")])              # nothing new: the file is left alone
    assert path.stat().st_mtime_ns == written and json.loads(path.read_text())["updated"] == data["updated"]
    refs.record(tmp_path, dataset, [_Store("fp-a")])              # another store: added
    assert json.loads(path.read_text())["stores"] == ["fp-a", "fp-b"]
    refs.record(tmp_path, _Source(tmp_path, hashes[:-2]), [_Store("fp-a")])   # a hash less: rewritten
    assert json.loads(path.read_text())["hashes"] == sorted(set(hashes[:-2]))
    # A ref in another layout (an older version's, or edited by hand) is read whole.
    path.write_text(json.dumps({"source": str(tmp_path), "hashes": sorted(set(hashes)), "stores": ["fp-a", "fp-b"],
                                "updated": 1.0}))
    refs.record(tmp_path, dataset, [_Store("fp-a")])
    assert json.loads(path.read_text())["updated"] == 1.0


# ---- features export ---------------------------------------------------------------------------


def _features_of(key: str, dim: int) -> np.ndarray:
    return np.random.default_rng(int(key[:8], 16)).normal(size=dim).astype(np.float32)


def _stores_in_another_order(tmp_path, frame, dim=7):
    """A store holding every image but the broken one, written in reverse hash order, 4 rows per
    shard: every export chunk reads rows scattered over several shards."""
    store = FeatureStore.open(tmp_path / "features", hash_payload({"t": 2}), {"t": 2})
    keys = sorted({h for h, p in zip(frame["hash"], frame["path"]) if not p.endswith("broken.png")}, reverse=True)
    with store.writer() as writer:
        for start in range(0, len(keys), 4):
            part = keys[start:start + 4]
            writer.add(part, np.stack([_features_of(k, dim) for k in part]))
    return FeatureStores(None, FeatureStore(store.directory), None, 0, None)


@pytest.mark.parametrize("suffix", [".npz", ".parquet", ".csv"])
def test_export_holds_the_whole_table_for_odd_names_missing_values_and_repeats(tmp_path, cache, suffix,
                                                                              monkeypatch):
    monkeypatch.setattr(dataset_module, "ROWS_CHUNK", 4)
    root = tmp_path / "data"
    ds = scan(_odd_manifest(root, _odd_tree(root)), cache_dir=cache)
    stores = _stores_in_another_order(tmp_path, ds.frame)
    written = export_dataset_features(ds, stores, tmp_path / f"out{suffix}", chunk_rows=3)
    kept = ~ds.frame["path"].str.endswith("broken.png")
    meta = ds.frame.loc[kept, ["path", "label", "split", "group", "hash"]].reset_index(drop=True)
    X = np.stack([_features_of(h, 7) for h in meta["hash"]])
    assert (written.rows, written.feature_dim) == (len(meta), 7) == (16, 7)
    assert written.missing == [str(root / "dog" / "broken.png")]
    assert meta["hash"].duplicated().sum() == 1                # cat/b.png and its copy: one row read twice
    text = {c: ["" if pd.isna(v) else v for v in meta[c].tolist()] for c in meta}
    if suffix == ".npz":
        reference = tmp_path / "reference.npz"
        np.savez_compressed(reference, features=X, **{c: np.array(v, dtype=str) for c, v in text.items()})
        with np.load(reference) as want, np.load(written.path) as got:
            assert sorted(got.files) == sorted(want.files)
            for name in want.files:
                assert got[name].dtype == want[name].dtype, name
                np.testing.assert_array_equal(got[name], want[name])
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        got = pq.read_table(written.path)
        assert got.column_names == list(meta.columns) + ["features"]
        for c in meta.columns:
            assert got.column(c).to_pylist() == [None if pd.isna(v) else v for v in meta[c].tolist()], c
        features = got.column("features").combine_chunks().flatten().to_numpy().reshape(-1, 7)
        np.testing.assert_array_equal(features, X)
    else:
        table = pd.concat([meta, pd.DataFrame(X, columns=[f"f{i}" for i in range(7)])], axis=1)
        assert written.path.read_text() == table.to_csv(index=False)
