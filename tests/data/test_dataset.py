"""scan(): folder / split / manifest layouts, what is ignored, user-facing errors and warnings, the hash cache."""

import hashlib
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from featurepipe.core import hashcache
from featurepipe.data.dataset import load_groups, scan
from featurepipe.core.errors import DatasetError
from tests.conftest import COLOURS, make_image


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_class(root: Path, name: str, n: int, seed: int, prefix: str = "") -> list[Path]:
    colour = list(COLOURS.values())[seed % 3]
    return [make_image(root / name / f"{prefix}{name}{i}.png", colour, seed=seed * 100 + i) for i in range(n)]


# ---- layouts -----------------------------------------------------------------------------


def test_folder_layout_classes_counts_split_and_hashes(image_tree):
    ds = scan(image_tree)
    assert ds.layout == "folders"
    assert ds.classes == ["blue", "green", "red"]
    assert len(ds) == 24
    assert ds.class_counts() == {"blue": 8, "green": 8, "red": 8}
    assert ds.splits == {"train": 24}
    assert ds.warnings == [] and ds.ignored == 0 and ds.unreadable == []
    assert list(ds.frame.columns) == ["path", "label", "split", "group", "hash", "bytes"]
    for row in ds.frame.itertuples():
        path = Path(row.path)
        assert path.is_file()
        assert row.label == path.parent.name
        assert row.hash == sha256(path)
        assert row.bytes == path.stat().st_size
    assert ds.frame["hash"].nunique() == 24


def test_split_layout_keeps_splits(tmp_path):
    root = tmp_path / "data"
    for split, n in (("train", 3), ("validation", 2), ("test", 1)):
        make_class(root / split, "cat", n, seed=1, prefix=split)
        make_class(root / split, "dog", n, seed=2, prefix=split)
    ds = scan(root)
    assert ds.layout == "splits"
    assert ds.classes == ["cat", "dog"]
    assert ds.splits == {"train": 6, "validation": 4, "test": 2}
    assert ds.class_counts("validation") == {"cat": 2, "dog": 2}
    assert ds.class_counts("test") == {"cat": 1, "dog": 1}
    for row in ds.frame.itertuples():
        assert Path(row.path).parts[-3] == row.split
    train = ds.subset("train")
    assert len(train) == 6 and set(train.frame["split"]) == {"train"}


def test_split_layout_accepts_val_alias(tmp_path):
    root = tmp_path / "data"
    make_class(root / "train", "a", 2, seed=1)
    make_class(root / "train", "b", 2, seed=2)
    make_class(root / "val", "a", 1, seed=3)
    ds = scan(root)
    assert ds.splits == {"train": 4, "validation": 1}
    assert any("validation split has no images of b" in w for w in ds.warnings)


def test_split_folders_mixed_with_class_folders_is_an_error(tmp_path):
    root = tmp_path / "data"
    make_class(root / "train", "a", 2, seed=1)
    make_class(root, "b", 2, seed=2)
    with pytest.raises(DatasetError, match=r"mixes split folders \(train\) with other folders \(b\)"):
        scan(root)


def test_csv_manifest(tmp_path):
    images = tmp_path / "imgs"
    a = make_class(images, "a", 3, seed=1)
    b = make_class(images, "b", 3, seed=2)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "path,label,split,group\n"
        f"imgs/a/{a[0].name},a,train,g1\n"
        f"imgs/a/{a[1].name},a,train,g1\n"
        f"{a[2]},a,val,g2\n"                                  # absolute path, 'val' alias
        f"imgs/b/{b[0].name},b,train,g3\n"
        f"imgs/b/{b[1].name},b,,g3\n"                         # empty split -> train
        f"imgs/b/{b[2].name},b,test,\n"                       # empty group -> None
        "imgs/b/gone.png,b,train,g4\n"                        # missing file
    )
    ds = scan(manifest)
    assert ds.layout == "manifest"
    assert ds.classes == ["a", "b"]
    assert len(ds) == 6
    # relative paths are resolved against the manifest's folder, not the working directory
    assert set(ds.frame["path"]) == {str(images / "a" / p.name) for p in a} | {str(images / "b" / p.name) for p in b}
    by_name = ds.frame.set_index(ds.frame["path"].map(lambda p: Path(p).name))
    assert by_name.loc[a[2].name, "split"] == "validation"
    assert by_name.loc[b[1].name, "split"] == "train"
    assert by_name.loc[b[2].name, "split"] == "test"
    assert by_name.loc[a[0].name, "group"] == "g1"
    assert pd.isna(by_name.loc[b[2].name, "group"])
    assert by_name.loc[a[0].name, "hash"] == sha256(a[0])
    missing = [w for w in ds.warnings if "gone.png" in w]
    assert len(missing) == 1
    assert str(tmp_path / "imgs" / "b" / "gone.png") in missing[0] and "does not exist" in missing[0]
    assert f"{manifest}:8" in missing[0]   # line number of the bad row (header is line 1)


def test_manifest_relative_paths_do_not_depend_on_cwd(tmp_path, monkeypatch):
    sub = tmp_path / "set"
    make_class(sub, "a", 2, seed=1)
    make_class(sub, "b", 2, seed=2)
    (sub / "m.csv").write_text("path,label\na/a0.png,a\na/a1.png,a\nb/b0.png,b\nb/b1.png,b\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ds = scan(sub / "m.csv")
    assert len(ds) == 4 and ds.warnings == []
    assert all(Path(p).is_file() for p in ds.frame["path"])


def test_manifest_missing_column_is_named(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,class\na.png,a\n")
    with pytest.raises(DatasetError, match=r"missing column\(s\) label") as info:
        scan(manifest)
    assert "found path, class" in str(info.value)


def test_manifest_unknown_split_is_an_error(tmp_path):
    make_class(tmp_path, "a", 1, seed=1)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,split\na/a0.png,a,holdout\n")
    with pytest.raises(DatasetError, match=r"m.csv:2: unknown split 'holdout'"):
        scan(manifest)


def test_a_file_that_is_not_csv_is_refused(tmp_path):
    other = tmp_path / "list.txt"
    other.write_text("a.png,a\n")
    with pytest.raises(DatasetError, match="not a .csv manifest"):
        scan(other)


def test_hidden_files_and_non_images_are_ignored_and_counted(image_tree):
    (image_tree / "red" / ".DS_Store").write_bytes(b"\0\1")
    shutil.copy(image_tree / "red" / "red0.png", image_tree / "red" / ".hidden.png")
    (image_tree / "red" / "notes.txt").write_text("hello")
    (image_tree / "README.md").write_text("about")                      # a file beside the class folders
    make_image(image_tree / "green" / ".thumbs" / "t.png", (0, 0, 0), seed=5)   # hidden sub-folder
    make_image(image_tree / "__MACOSX" / "x.png", (0, 0, 0), seed=6)           # hidden class folder
    make_image(image_tree / "blue" / "nested" / "deep.PNG", (1, 2, 3), seed=7)  # nested, upper-case ext
    ds = scan(image_tree)
    assert ds.ignored == 4
    assert ds.classes == ["blue", "green", "red"]
    assert len(ds) == 25
    assert ds.class_counts() == {"blue": 9, "green": 8, "red": 8}
    names = {Path(p).name for p in ds.frame["path"]}
    assert {".hidden.png", "t.png", "x.png", "notes.txt"}.isdisjoint(names)
    assert "deep.PNG" in names


def test_dangling_symlink_is_reported_unreadable(image_tree):
    link = image_tree / "red" / "broken.png"
    link.symlink_to(image_tree / "nowhere.png")
    ds = scan(image_tree)
    assert len(ds) == 24
    assert [p for p, _ in ds.unreadable] == [str(link)]
    assert "No such file" in ds.unreadable[0][1]


# ---- errors and warnings -------------------------------------------------------------------


def test_missing_dir(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan(tmp_path / "nope")


def test_no_images(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.txt").write_text("not an image")
    with pytest.raises(DatasetError, match="no images found in .*expected DATA/<class>/<image>"):
        scan(root)


def test_empty_folder(tmp_path):
    with pytest.raises(DatasetError, match="no images found"):
        scan(tmp_path)


def test_manifest_whose_files_are_all_missing(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nx.png,a\ny.png,b\n")
    with pytest.raises(DatasetError, match="no images found"):
        scan(manifest)


def test_only_one_class(tmp_path):
    make_class(tmp_path / "data", "solo", 3, seed=1)
    with pytest.raises(DatasetError, match=r"only one class \('solo'\).*at least two class folders"):
        scan(tmp_path / "data")


def test_empty_class_dir_is_warned_about_and_left_out(image_tree):
    (image_tree / "purple").mkdir()
    ds = scan(image_tree)
    assert ds.classes == ["blue", "green", "red"]
    assert any(str(image_tree / "purple") in w and "has no images" in w for w in ds.warnings)


def test_same_image_under_two_classes_names_both_paths(image_tree):
    original = image_tree / "red" / "red0.png"
    copy = image_tree / "green" / "copy.png"
    shutil.copy(original, copy)
    ds = scan(image_tree)
    dup = [w for w in ds.warnings if "different labels" in w]
    assert len(dup) == 1
    assert str(original) in dup[0] and str(copy) in dup[0]
    assert len(ds) == 25 and ds.frame["hash"].nunique() == 24


def test_same_image_in_two_splits_is_warned_about(tmp_path):
    root = tmp_path / "data"
    a = make_class(root / "train", "a", 2, seed=1)
    make_class(root / "train", "b", 2, seed=2)
    (root / "test" / "a").mkdir(parents=True)
    shutil.copy(a[0], root / "test" / "a" / "leak.png")
    ds = scan(root)
    leak = [w for w in ds.warnings if "several splits" in w]
    assert len(leak) == 1 and str(a[0]) in leak[0] and "leak.png" in leak[0]


def test_validation_class_missing_from_train_is_an_error(tmp_path):
    root = tmp_path / "data"
    make_class(root / "train", "a", 2, seed=1)
    make_class(root / "train", "b", 2, seed=2)
    make_class(root / "validation", "a", 1, seed=3)
    make_class(root / "validation", "c", 1, seed=4)
    with pytest.raises(DatasetError, match=r"validation split has class\(es\) c that train lacks"):
        scan(root)


def test_class_with_single_image_is_warned_about(image_tree):
    make_class(image_tree, "lonely", 1, seed=9)
    ds = scan(image_tree)
    assert ds.class_counts()["lonely"] == 1
    single = [w for w in ds.warnings if "single training image" in w]
    assert single == ["class 'lonely' has a single training image; cross-validation needs at least 2 per class"]


# ---- the hash cache ------------------------------------------------------------------------


@pytest.fixture
def hash_calls(monkeypatch):
    calls: list[str] = []
    real = hashcache.regular_file_sha256

    def counting(path, *args):
        calls.append(str(path))
        return real(path, *args)

    monkeypatch.setattr(hashcache, "regular_file_sha256", counting)
    return calls


def test_second_scan_reads_no_file(image_tree, cache, hash_calls):
    first = scan(image_tree, cache_dir=cache)
    assert len(hash_calls) == 24
    assert (cache / "hashes.sqlite").is_file()
    hash_calls.clear()
    second = scan(image_tree, cache_dir=cache)
    assert hash_calls == []
    assert second.frame["hash"].tolist() == first.frame["hash"].tolist()


def test_without_a_cache_every_scan_rehashes(image_tree, hash_calls):
    scan(image_tree)
    scan(image_tree)
    assert len(hash_calls) == 48


def test_changed_file_is_rehashed_alone(image_tree, cache, hash_calls):
    first = scan(image_tree, cache_dir=cache)
    before = dict(zip(first.frame["path"], first.frame["hash"]))
    changed = image_tree / "red" / "red3.png"
    stat = changed.stat()
    make_image(changed, (0, 0, 0), seed=999)
    # force a distinct mtime: a rewrite within the same filesystem timestamp tick could keep it
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    touched = image_tree / "blue" / "blue1.png"
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))   # same content, new mtime
    hash_calls.clear()
    second = scan(image_tree, cache_dir=cache)
    assert sorted(hash_calls) == sorted([str(changed), str(touched)])
    after = dict(zip(second.frame["path"], second.frame["hash"]))
    assert after[str(changed)] == sha256(changed) != before[str(changed)]
    assert after[str(touched)] == before[str(touched)]
    assert {p: h for p, h in after.items() if p != str(changed)} == {p: h for p, h in before.items() if p != str(changed)}
    hash_calls.clear()
    scan(image_tree, cache_dir=cache)
    assert hash_calls == []


# ---- groups --------------------------------------------------------------------------------


def test_groups_pattern(tmp_path):
    root = tmp_path / "data"
    for i, (label, patient) in enumerate([("a", "p01"), ("a", "p01"), ("a", "p02"), ("b", "p02"), ("b", "p03")]):
        make_image(root / label / f"{patient}_scan{i}.png", (10 * i, 0, 0), seed=i)
    make_image(root / "b" / "unnamed.png", (0, 0, 0), seed=50)
    ds = scan(root, groups_pattern=r"^(p\d+)_")
    groups = dict(zip(ds.frame["path"].map(lambda p: Path(p).name), ds.frame["group"]))
    assert groups == {"p01_scan0.png": "p01", "p01_scan1.png": "p01", "p02_scan2.png": "p02",
                      "p02_scan3.png": "p02", "p03_scan4.png": "p03", "unnamed.png": "unnamed.png"}
    # without a capture group the whole match is the group
    ds = scan(root, groups_pattern=r"p\d+")
    assert sorted(set(ds.frame["group"])) == ["p01", "p02", "p03", "unnamed.png"]


def test_invalid_groups_pattern(image_tree):
    with pytest.raises(DatasetError, match=r"--groups pattern '\(unclosed' is not a valid regular expression"):
        scan(image_tree, groups_pattern="(unclosed")


def test_load_groups_from_manifest(image_tree, tmp_path):
    ds = scan(image_tree)
    groups_csv = tmp_path / "groups.csv"
    groups_csv.write_text(
        "path,group\n"
        "data/red/red0.png,r-early\n"                              # relative to the manifest
        f"{image_tree / 'red' / 'red1.png'},r-early\n"             # absolute
        "green0.png,g\n"                                           # bare file name
    )
    grouped = load_groups(ds, groups_csv)
    groups = dict(zip(grouped.frame["path"], grouped.frame["group"]))
    assert groups[str(image_tree / "red" / "red0.png")] == "r-early"
    assert groups[str(image_tree / "red" / "red1.png")] == "r-early"
    assert groups[str(image_tree / "green" / "green0.png")] == "g"
    # every other image is its own group (its path), and the user is told how many
    other = str(image_tree / "blue" / "blue5.png")
    assert groups[other] == other
    assert any(w.startswith("21 image(s) have no group") for w in grouped.warnings)
    assert ds.frame["group"].isna().all()   # the original dataset is left untouched


def test_load_groups_needs_group_column(image_tree, tmp_path):
    ds = scan(image_tree)
    bad = tmp_path / "g.csv"
    bad.write_text("path,team\nx.png,1\n")
    with pytest.raises(DatasetError, match="needs columns path,group; found path, team"):
        load_groups(ds, bad)
