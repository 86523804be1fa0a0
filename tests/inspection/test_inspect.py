"""Know your data: near-duplicates, label issues, outliers, learning curve, embedding map, fixes, and
how evaluate/run use them."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from typer.testing import CliRunner

from featurepipe import pipeline
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.cli.app import app
from featurepipe.evaluation.crossval import FeatureTable
from featurepipe.evaluation.folds import Fold
from featurepipe.data.dataset import scan
from featurepipe.data.dedup import (DEFAULT_HAMMING, complete_linkage, find_duplicates, merge_groups, normalized,
                              phash_distances, straddling_pairs, union_find)
from featurepipe.core.errors import DatasetError, ImageDecodeError
from featurepipe.evaluation.evaluate import evaluate
from featurepipe.data.edits import apply_fixes
from featurepipe.core.hashcache import file_sha256
from featurepipe.data.phash import perceptual_hash
from featurepipe.inspection.inspect import LABEL_C, inspect_dataset, oof_from_cv, oof_from_run
from featurepipe.inspection.label_issues import knn_outliers, label_issues
from featurepipe.inspection.learning_curve import learning_curve
from featurepipe.data.perceptual import perceptual_hashes
from featurepipe.evaluation.config import SearchConfig
from tests.conftest import COLOURS, make_image

TINY = BackboneSpec(name="tiny", weights="random", image_size=32)


def _photo(path, seed, size=(160, 120)):
    """A structured picture (shapes on a gradient): what perceptual hashes are made for."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, size[0])[None, :, None]
    y = np.linspace(0, 1, size[1])[:, None, None]
    base = (rng.uniform(0, 255, 3) * x + rng.uniform(0, 255, 3) * y) / 2 + rng.uniform(0, 80, 3)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, size[0] - 20), rng.integers(0, size[1] - 20)
        draw.ellipse([x0, y0, x0 + rng.integers(15, 60), y0 + rng.integers(15, 50)],
                     fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _bits(a, b):
    return bin(a ^ b).count("1")


# ------------------------------------------------------------------------------ perceptual hash


def test_perceptual_hash_survives_resize_reencode_and_crop_but_tells_photos_apart(tmp_path):
    original = _photo(tmp_path / "a.png", 1)
    with Image.open(original) as im:
        im.resize((80, 60)).save(tmp_path / "small.png")
        im.save(tmp_path / "low.jpg", quality=40)
        im.crop((10, 7, 150, 112)).save(tmp_path / "crop.png")   # ~12% off: only the crop hashes match
    hashes = {p.stem: perceptual_hash(p) for p in tmp_path.iterdir()}
    others = [perceptual_hash(_photo(tmp_path / f"other{i}.png", 100 + i)) for i in range(8)]
    table = np.asarray([hashes[k] for k in ("a", "small", "low", "crop")] + others, dtype=np.uint64)
    d = phash_distances(table, table)
    assert d[0, 1] <= 4 and d[0, 2] <= 6          # resize and re-encode barely move the hash
    assert d[0, 3] <= 10                          # the crop matches the original's 90%/80% hash
    assert _bits(hashes["a"][0], hashes["crop"][0]) > d[0, 3]   # ...better than the whole-image hash does
    assert d[0, 4:].min() > 14 and len(hashes["a"]) == 19     # whole, central 90%/80%, 16 trims


def test_perceptual_hash_matches_an_off_centre_crop_that_is_also_shrunk_and_reencoded(tmp_path):
    # The copy the central crops missed (issue 11): 11% off the left, 4% off the right, then shrunk
    # and saved at JPEG quality 40. Its frame sits off every centred crop of the original.
    original = _photo(tmp_path / "a.png", 2)
    with Image.open(original) as im:
        w, h = im.size
        copy = im.crop((int(0.11 * w), int(0.05 * h), int(0.96 * w), int(0.89 * h))).resize((70, 52))
        copy.convert("RGB").save(tmp_path / "copy.jpg", quality=40)
    table = np.asarray([perceptual_hash(original), perceptual_hash(tmp_path / "copy.jpg")]
                       + [perceptual_hash(_photo(tmp_path / f"other{i}.png", 100 + i)) for i in range(8)], dtype=np.uint64)
    d = phash_distances(table, table)
    centred_only = phash_distances(table[:, :3], table[:, :3])   # whole image + central 90% / 80%, as before
    assert centred_only[0, 1] > 10 >= d[0, 1]                    # only an off-centre trim brings it under the threshold
    assert d[0, 1] <= 4
    assert d[0, 2:].min() > 14 and d[1, 2:].min() > 14           # and the trims do not bring distinct photos close


def test_flat_images_get_no_perceptual_hash_and_are_not_copies_of_each_other(tmp_path):
    # Every one-colour image has the same pHash (no structure): without this, a red and a green
    # placeholder were reported as copies across classes.
    for name, colour in (("red", (255, 0, 0)), ("green", (0, 255, 0)), ("px", (9, 9, 9))):
        Image.new("RGB", (40, 30) if name != "px" else (1, 1), colour).save(tmp_path / f"{name}.png")
    # keyed by content hash, as scan gives them (the hashes are checked against the bytes decoded)
    digest = {n: file_sha256(tmp_path / f"{n}.png") for n in ("red", "green", "px")}
    hashes = perceptual_hashes({digest[n]: str(tmp_path / f"{n}.png") for n in digest}, tmp_path / "cache")
    assert hashes.hashes == {digest[n]: () for n in digest} and not hashes.failed
    again = perceptual_hashes({digest["red"]: str(tmp_path / "red.png")}, tmp_path / "cache")   # () survives the cache
    assert again.hashes == {digest["red"]: ()} and again.computed == 0
    X = np.random.default_rng(0).normal(size=(3, 16))                                   # features: unrelated
    report = find_duplicates(X, ["a", "b", "c"], [(), (), ()])
    assert report.pairs.empty
    assert len(perceptual_hash(_photo(tmp_path / "photo.png", 1))) == 19                # a photo is not flat


def test_perceptual_hash_rejects_bad_files_like_decode_image(tmp_path):
    bad = tmp_path / "page.jpg"
    bad.write_text("<html>not found</html>")
    with pytest.raises(ImageDecodeError, match="text"):
        perceptual_hash(bad)


def test_perceptual_hashes_are_cached_per_content_and_failures_remembered(tmp_path, monkeypatch):
    good = _photo(tmp_path / "a.png", 1)
    bad = tmp_path / "b.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    h1, h2 = file_sha256(good), file_sha256(bad)
    first = perceptual_hashes({h1: str(good), h2: str(bad)}, tmp_path / "cache")
    assert set(first.hashes) == {h1} and set(first.failed) == {h2} and first.computed == 2
    import featurepipe.data.perceptual as perceptual

    monkeypatch.setattr(perceptual, "perceptual_hash", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded")))
    second = perceptual_hashes({h1: str(good), h2: str(bad)}, tmp_path / "cache")
    assert second.hashes == first.hashes and second.failed == first.failed and second.computed == 0


# ------------------------------------------------------------------------------ duplicates (pure)


def test_find_duplicates_by_hash_cosine_and_phash_never_chains_a_group():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(6, 32))
    X[1] = X[0] + rng.normal(scale=0.01, size=32)     # near copy of 0 in feature space
    X[4] = X[3]                                       # byte-identical files
    hashes = ["a", "b", "c", "d", "d", "f"]
    r = [int(v) for v in rng.integers(0, 2**63, size=18)]             # random hashes: ~32 bits apart
    ph = [tuple(r[0:3]), tuple(r[3:6]), (r[0] ^ 0b11, r[6], r[7]), tuple(r[9:12]), tuple(r[9:12]), tuple(r[15:18])]
    # row 2's whole-image hash is 2 bits from row 0's; every other pair is far apart
    report = find_duplicates(X, hashes, ph, cosine_threshold=0.95, hamming_threshold=3, joint=None)
    pairs = {(i, j): e for i, j, e in zip(report.pairs["i"], report.pairs["j"], report.pairs["evidence"])}
    assert pairs[(3, 4)] == "content hash"
    assert "features" in pairs[(0, 1)] and pairs[(0, 2)] == "perceptual hash"
    # 1~0~2 but 1 and 2 are not copies of each other: no chain. 0 goes with its closest copy, 1
    # (features near-identical); 0~2 stays listed as a pair, but outside the group.
    assert [list(c) for c in report.clusters] == [[0, 1], [3, 4]]
    assert len({report.cluster[2], report.cluster[5], report.cluster[0], report.cluster[3]}) == 4
    grouped = {(int(i), int(j)): bool(g) for i, j, g in zip(report.pairs["i"], report.pairs["j"], report.pairs["grouped"])}
    assert grouped == {(0, 1): True, (0, 2): False, (3, 4): True}
    off = find_duplicates(X, hashes, None, cosine_threshold=1.1, hamming_threshold=-1, joint=None)
    assert [(int(i), int(j)) for i, j in zip(off.pairs["i"], off.pairs["j"])] == [(3, 4)]


def _flip(value: int, bits: int) -> int:
    return value ^ ((1 << bits) - 1)          # the lowest `bits` bits flipped: exactly `bits` apart


def test_joint_rule_pairs_only_mutual_nearest_neighbours():
    # Rows 0~1 and 2~4 are both "moderately close" (cosine ~0.7, 12 bits apart), but row 2's nearest
    # neighbour is its own near-copy 3, so 4 is a look-alike of 2, not a copy: only 0~1 is joined.
    rng = np.random.default_rng(3)
    X = rng.normal(size=(40, 64))                         # background: unrelated photos, cosine ~0
    X[1] = 0.7 * X[0] + np.sqrt(1 - 0.49) * rng.normal(size=64)
    X[3] = X[2] + rng.normal(scale=0.05, size=64)         # a near copy of 2 (cosine ~0.998)
    X[4] = 0.7 * X[2] + np.sqrt(1 - 0.49) * rng.normal(size=64)
    Z = normalized(X)
    cos = Z @ Z.T
    assert 0.6 < cos[0, 1] < 0.85 and 0.6 < cos[2, 4] < 0.85 and cos[3, 4] < cos[2, 3]
    ph = [(int(v),) for v in rng.integers(0, 2**63, size=40)]
    ph[1] = (_flip(ph[0][0], 12),)
    ph[4] = (_flip(ph[2][0], 12),)
    ph[3] = (_flip(ph[2][0], 40),)                        # 3 is caught by features alone
    report = find_duplicates(X, [str(i) for i in range(40)], ph)
    pairs = {(int(i), int(j)): e for i, j, e in zip(report.pairs["i"], report.pairs["j"], report.pairs["evidence"])}
    assert pairs == {(0, 1): "features and perceptual hash, both moderately close", (2, 3): "features"}
    # ...and without the nearest-neighbour test (the rule as it was) 2~4 would have been joined too.
    nearest = np.argmax(cos - 2 * np.eye(40), axis=1)
    assert nearest[4] == 2 and nearest[2] == 3 and nearest[0] == 1 and nearest[1] == 0


def _garment(path, n, seed):
    """A low-detail product shot: one light silhouette (n picks shape and size) with three small marks
    on a black background, like Fashion-MNIST. The background fixes most of its pHash bits."""
    import itertools

    rng = np.random.default_rng(seed)
    shape, w, h = list(itertools.product((0, 1), (24, 29, 34, 39, 44), (28, 34, 40, 46)))[n]
    image = Image.new("L", (64, 64), 0)
    draw = ImageDraw.Draw(image)
    x0, y0 = 32 - w // 2, 32 - h // 2
    (draw.ellipse if shape else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=200)
    for _ in range(3):
        x, y = x0 + int(rng.integers(3, w - 8)), y0 + int(rng.integers(3, h - 8))
        draw.rectangle([x, y, x + 4, y + 4], fill=90)
    image.save(path)
    return image


def test_distinct_low_detail_images_do_not_chain_into_groups_but_a_planted_copy_is_found(tmp_path):
    # 40 distinct silhouettes on black plus a shrunk, re-encoded copy of #7. Features: 16x16 pixels,
    # a weak "backbone" under which similar silhouettes are close too (as for similar products).
    images = [_garment(tmp_path / f"g{i}.png", i, i) for i in range(40)]
    images[7].resize((48, 48), Image.Resampling.BILINEAR).convert("RGB").save(tmp_path / "copy.jpg", quality=50)
    paths = [tmp_path / f"g{i}.png" for i in range(40)] + [tmp_path / "copy.jpg"]
    ph = [perceptual_hash(p) for p in paths]
    X = np.stack([np.asarray(Image.open(p).convert("L").resize((16, 16)), dtype=float).ravel() for p in paths])
    H = np.asarray([list(v) for v in ph], dtype=np.uint64)
    D = phash_distances(H, H)
    upper = np.triu(np.ones((40, 40), dtype=bool), 1)
    # The data reproduces the failure: by the absolute threshold alone the distinct images chain into
    # one big "copy" group (single linkage), as 634 Fashion-MNIST photos did.
    close = D[:40, :40] <= DEFAULT_HAMMING
    assert (close & upper).sum() >= 20
    assert np.bincount(union_find(40, zip(*np.nonzero(close & upper)))).max() >= 10
    report = find_duplicates(X, [p.name for p in paths], ph)
    assert report.cluster[7] == report.cluster[40]                      # the planted copy is found
    assert max(len(c) for c in report.clusters) == 2                    # no chains
    lookalikes = [(int(i), int(j)) for i, j in zip(report.pairs["i"], report.pairs["j"]) if (i, j) != (7, 40)]
    assert len(lookalikes) <= 2, lookalikes                             # of 780 distinct pairs


def test_a_hash_match_must_stand_out_from_the_images_neighbourhood():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(30, 32))                                       # features: unrelated
    base = int(rng.integers(0, 2**63))
    others = [(int(v),) for v in rng.integers(0, 2**63, size=30)]
    ph = list(others)
    ph[0], ph[1] = (base,), (base ^ 0b1111,)                            # 0~1: 4 bits apart
    alone = find_duplicates(X, [str(i) for i in range(30)], ph)
    assert [(int(i), int(j)) for i, j in zip(alone.pairs["i"], alone.pairs["j"])] == [(0, 1)]
    # Now 0 sits in a crowd: three look-alikes 6-8 bits from it (as similar sneakers on black are),
    # so 4 bits no longer says "copy" and the hash alone pairs nothing.
    for row, bits in ((2, 0b111111 << 8), (3, 0b1111111 << 20), (4, 0b11111111 << 40)):
        ph[row] = (base ^ bits,)
    crowd = find_duplicates(X, [str(i) for i in range(30)], ph)
    assert crowd.pairs.empty


def test_many_reencoded_copies_of_one_photo_stay_one_group():
    # Six near-identical copies are each other's whole neighbourhood, so the gap tests cannot see
    # them stand out; near-identity on both features and hash still groups them.
    rng = np.random.default_rng(6)
    X = rng.normal(size=(40, 64))
    X[1:6] = X[0] + rng.normal(scale=0.02, size=(5, 64))
    ph = [(int(v),) for v in rng.integers(0, 2**63, size=40)]
    for row in range(1, 6):
        ph[row] = (ph[0][0] ^ (0b11 << (2 * row)) if row % 2 else ph[0][0],)   # 0 or 2 bits
    report = find_duplicates(X, [str(i) for i in range(40)], ph)
    assert [list(c) for c in report.clusters] == [[0, 1, 2, 3, 4, 5]]


def test_complete_linkage_joins_only_groups_that_are_copies_throughout():
    chain = complete_linkage(6, [(0, 1), (1, 2), (2, 3), (3, 4)])      # a~b~c~d~e, nothing else
    assert np.bincount(chain).max() == 2
    assert chain[0] == chain[1] and chain[1] != chain[2] and chain[2] == chain[3] and chain[4] == 4
    clique = complete_linkage(5, [(0, 1), (1, 2), (0, 2), (2, 3)])     # 0, 1, 2 all copies of each other
    assert list(clique) == [0, 0, 0, 3, 4]
    assert list(complete_linkage(3, [])) == [0, 1, 2]


def test_merge_groups_keeps_user_groups_and_joins_them_through_copies():
    cluster = union_find(6, [(0, 3)])
    groups = merge_groups(cluster, ["u1", "u1", "u2", None, None, "u2"])
    assert groups[0] == groups[1] == groups[3]              # user group u1 plus 3, a copy of 0
    assert groups[2] == groups[5] and groups[2] != groups[0]
    assert groups[4] not in (groups[0], groups[2])          # no user group, no copy: its own
    joined = merge_groups(union_find(4, [(0, 2)]), ["x", "x", "y", "y"])
    assert len(set(joined)) == 1                             # a copy in x and in y merges x and y


def test_straddling_pairs_counts_pairs_split_across_train_and_validation():
    pairs = pd.DataFrame({"i": [0, 2], "j": [1, 3]})
    folds = [Fold(0, 0, np.array([1, 2, 3]), np.array([0])), Fold(0, 1, np.array([0, 1]), np.array([2, 3]))]
    assert straddling_pairs(pairs, folds) == [1, 0]


# ------------------------------------------------------------------------------ label issues


def test_label_issue_ranking_matches_an_independent_sklearn_numpy_computation():
    """Recompute OOF probabilities with plain scikit-learn and the confident-learning scores with numpy."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(3, 20)) * 2
    y = np.repeat(np.arange(3), 20)
    X = centres[y] + rng.normal(size=(60, 20))
    flipped = [0, 25, 47]
    y_given = y.copy()
    y_given[flipped] = (y[flipped] + 1) % 3
    classes = ["a", "b", "c"]
    table = FeatureTable(X, y_given, classes, [f"img{i}" for i in range(60)])
    proba = oof_from_cv(None, C=LABEL_C, folds=5, seed=0, n_jobs=1)(table)

    model = make_pipeline(StandardScaler(), Normalizer(),
                          LogisticRegression(C=LABEL_C, max_iter=1000, random_state=0))
    expected = cross_val_predict(model, X, y_given, cv=StratifiedKFold(5, shuffle=True, random_state=0),
                                 method="predict_proba")
    np.testing.assert_allclose(proba, expected, atol=1e-6)

    p_given = expected[np.arange(60), y_given]
    other = expected.copy()
    other[np.arange(60), y_given] = -1
    margin = p_given - other.max(axis=1)
    t = np.array([expected[y_given == k, k].mean() for k in range(3)])
    flagged = np.array([any(expected[i, k] >= t[k] and k != y_given[i] and expected[i, k] > p_given[i]
                            for k in range(3)) for i in range(60)])
    order = sorted(range(60), key=lambda i: (not flagged[i], margin[i], i))

    issues = label_issues(proba, y_given, classes)
    assert issues.suspects()["row"].tolist() == order
    np.testing.assert_allclose(issues.thresholds, t, atol=1e-9)
    assert set(issues.suspects(5)["row"]) >= set(flipped)     # the flips are the top suspects
    top = issues.table.set_index("row").loc[flipped]
    assert list(top["suggested"]) == [classes[k] for k in y[flipped]]


def test_label_issues_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="proba must be"):
        label_issues(np.ones((4, 2)) / 2, np.zeros(4, dtype=int), ["a", "b", "c"])


def test_knn_outliers_flags_the_far_image_and_ignores_copies():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 16)) * 0.1 + 1.0
    X[7] = -5 * np.ones(16) + rng.normal(size=16)       # far from everything
    result = knn_outliers(X)
    assert result.flagged[7] and result.flagged.sum() <= 2 and int(np.argmax(result.score)) == 7
    X2 = np.vstack([X, X[7]])                            # a copy of the outlier: still an outlier
    cluster = np.arange(41)
    cluster[40] = 7
    assert knn_outliers(X2, cluster).flagged[7]
    assert not knn_outliers(X[:2]).flagged.any()         # too few images: nothing flagged, no crash


# ------------------------------------------------------------------------------ learning curve


def test_learning_curve_points_and_plain_reading():
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(2), 30)
    X = rng.normal(size=(60, 8)) + y[:, None] * 0.8

    def head():
        return LogisticRegression(C=1.0, max_iter=500)

    curve = learning_curve(X, y, head, sizes=(5, 10, 20), draws=2, folds=3)
    assert curve.points["label"].tolist()[:3] == ["5", "10", "all (~20)"]   # 20 is not below the fold's 20
    assert curve.points["fits"].tolist() == [6, 6, 3]
    assert curve.reading.startswith(("accuracy is still rising", "flat"))
    assert (curve.points["accuracy_mean"] > 0.5).all()


def test_learning_curve_on_a_tiny_dataset_explains_instead_of_crashing():
    X = np.random.default_rng(0).normal(size=(6, 4))
    with pytest.raises(ValueError, match="smallest class has only"):
        learning_curve(X, np.array([0, 0, 0, 1, 1, 1]), lambda: LogisticRegression(), folds=3)


def test_learning_curve_explains_empty_and_one_class_data_and_names_classes():
    with pytest.raises(ValueError, match="at least 2 classes; there are 0 image"):
        learning_curve(np.zeros((0, 4)), np.zeros(0, dtype=int), lambda: LogisticRegression())
    with pytest.raises(ValueError, match="at least 2 classes; there are 6 image.* in 1 class"):
        learning_curve(np.zeros((6, 4)), np.ones(6, dtype=int), lambda: LogisticRegression())
    # groups that put a whole class in one group: the error names the class, not its index
    X = np.random.default_rng(0).normal(size=(12, 4))
    y = np.repeat([0, 2], 6)                                  # class 1 ("empty") has no images: left out
    groups = np.array(["g"] * 6 + [f"h{i}" for i in range(6)])
    with pytest.raises(DatasetError, match="class 'cat' has images from only 1 distinct group"):
        learning_curve(X, y, lambda: LogisticRegression(), groups=groups, folds=3, class_names=["cat", "empty", "dog"])


def test_embedding_of_copies_is_explained_instead_of_crashing_the_process():
    # t-SNE on identical rows used to kill the Python process (segfault): run it in a child process.
    import subprocess
    import sys

    code = ("import numpy as np\nfrom featurepipe.inspection.embedding import embed\n"
            "X = np.tile(np.random.default_rng(0).normal(size=(1, 32)), (10, 1))\n"
            "try:\n    embed(X)\nexcept ValueError as e:\n    print('explained:', e)\n"
            "X[:5] += 1.0\ntry:\n    embed(X)\nexcept ValueError as e:\n    print('two points:', e)\n"
            "X[:2] += np.eye(2, 32)\nm = embed(X)\nprint('four points:', m.tsne is None, m.note)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1000:]
    assert "explained: an embedding map needs at least 3 distinct images; these 10 have only 1" in done.stdout
    assert "two points: an embedding map needs at least 3 distinct images; these 10 have only 2" in done.stdout
    assert "four points: True t-SNE needs at least 5 distinct images (there are 4)" in done.stdout   # PCA only


# ------------------------------------------------------------------------------ fixes


def test_exclude_and_relabel_change_only_the_table_and_record_it(image_tree, cache, tmp_path):
    dataset = scan(image_tree, cache_dir=cache)
    (tmp_path / "out.csv").write_text(f"path\n{image_tree / 'red' / 'red0.png'}\nred/red1.png\n")
    (tmp_path / "fix.csv").write_text("path,given,suggested\nblue/blue0.png,blue,green\n")
    fixed = apply_fixes(dataset, tmp_path / "out.csv", tmp_path / "fix.csv")
    assert len(fixed) == len(dataset) - 2
    assert fixed.frame.set_index("path").loc[str(image_tree / "blue" / "blue0.png"), "label"] == "green"
    assert fixed.edits["relabel"]["column"] == "suggested"
    assert fixed.edits["relabel"]["changed"] == [{"path": str(image_tree / "blue" / "blue0.png"),
                                                 "from": "blue", "to": "green"}]
    assert len(fixed.edits["exclude"]["paths"]) == 2
    assert dataset.frame["label"].tolist().count("blue") == 8        # the scanned dataset is untouched

    (tmp_path / "typo.csv").write_text("path\nred/rde0.png\n")
    with pytest.raises(DatasetError, match="match no image.*rde0"):
        apply_fixes(dataset, exclude=tmp_path / "typo.csv")
    (tmp_path / "newclass.csv").write_text("path,label\nred/red2.png,purple\n")
    with pytest.raises(DatasetError, match="purple.*not classes"):
        apply_fixes(dataset, relabel=tmp_path / "newclass.csv")
    (tmp_path / "nocol.csv").write_text("file\nred/red2.png\n")
    with pytest.raises(DatasetError, match="no 'path' column"):
        apply_fixes(dataset, exclude=tmp_path / "nocol.csv")


# ------------------------------------------------------------------------------ the stage, end to end


@pytest.fixture
def dup_tree(image_tree):
    """image_tree plus a resized copy of red0 (in red), a copy of green0 filed as blue, and a broken file."""
    with Image.open(image_tree / "red" / "red0.png") as im:
        im.resize((96, 80)).save(image_tree / "red" / "red0_big.png")
    with Image.open(image_tree / "green" / "green0.png") as im:
        im.save(image_tree / "blue" / "green0_as_blue.jpg", quality=95)
    (image_tree / "blue" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    return image_tree


def test_inspect_finds_copies_label_errors_and_lists_the_broken_file_once(dup_tree, cache, tmp_path):
    dataset = scan(dup_tree, cache_dir=cache)
    result = inspect_dataset(dataset, TINY, cache, out_dir=tmp_path / "insp", folds=3, n_jobs=1)
    out = tmp_path / "insp"
    for name in ("inspect.json", "duplicates.csv", "suspects.csv", "embedding.csv"):
        assert (out / name).exists(), name
    assert [f["path"] for f in result.failed] == [str(dup_tree / "blue" / "broken.png")]
    everywhere = pd.concat([pd.read_csv(out / "label_scores.csv")["path"], pd.read_csv(out / "embedding.csv")["path"],
                            result.duplicates["path_a"], result.duplicates["path_b"]])
    assert not everywhere.str.contains("broken").any()                  # in no analysis
    pairs = {frozenset((a.split("/")[-1], b.split("/")[-1])) for a, b in
             zip(result.duplicates["path_a"], result.duplicates["path_b"])}
    assert frozenset(("red0.png", "red0_big.png")) in pairs
    assert frozenset(("green0.png", "green0_as_blue.jpg")) in pairs
    cross = result.duplicates[result.duplicates["cross_class"]]
    assert len(cross) == 1 and {cross.iloc[0]["label_a"], cross.iloc[0]["label_b"]} == {"green", "blue"}
    summary = json.loads((out / "inspect.json").read_text())
    assert summary["duplicates"]["cross_class_pairs"] == 1 and summary["duplicates"]["clusters"] == 2
    d = summary["duplicates"]
    assert d["folds"] == 3 and 0 <= d["pairs_leaking"] <= 2 and sum(d["pairs_straddling"]) == 2 * d["pairs_leaking"]
    assert d["leaked_folds"] == len({f for f, n in enumerate(d["pairs_straddling"]) if n})
    assert summary["images"] == 26 and summary["balance"]["counts"] == {"blue": 9, "green": 8, "red": 9}
    scores = pd.read_csv(out / "label_scores.csv")
    assert scores.iloc[0]["path"].endswith("green0_as_blue.jpg")   # filed as blue, looks green
    assert scores.iloc[0]["suggested"] == "green"
    assert len(scores) == 26 and scores["rank"].tolist() == list(range(1, 27))
    suspects = pd.read_csv(out / "suspects.csv")                   # the short, editable list
    assert suspects["path"].tolist() == scores["path"].tolist()[:len(suspects)] and 15 <= len(suspects) < 26
    # 3-fold training parts hold 5-6 images per class: too few for the curve's smallest size, 5
    assert "fewer than the smallest size" in summary["notes"]["learning_curve"]
    assert not (out / "learning_curve.csv").exists()
    assert summary["embedding"]["tsne"] is True
    # a second call with nothing changed reuses the whole result
    again = inspect_dataset(dataset, TINY, cache, out_dir=tmp_path / "insp2", folds=3, n_jobs=1)
    assert again.summary["reused"] is True and again.summary["duplicates"] == summary["duplicates"]


def test_inspect_on_a_tiny_dataset_explains_every_section(tmp_path, cache):
    root = tmp_path / "tiny"
    for c, (name, colour) in enumerate(list(COLOURS.items())[:2]):
        for i in range(2):
            make_image(root / name / f"{name}{i}.png", colour, seed=10 * c + i)
    result = inspect_dataset(scan(root, cache_dir=cache), TINY, cache, out_dir=tmp_path / "insp", n_jobs=1)
    notes = result.summary["notes"]
    assert "learning_curve" in notes and "embedding" not in notes      # 4 images: a map, no curve
    from featurepipe.report.inspect_sections import SECTIONS, write_inspect_report

    page = write_inspect_report(tmp_path / "insp").read_text()
    for title in SECTIONS:
        assert f">{title}</h2>" in page
    assert "Not computed:" not in page and "too few images to tell" in page   # no curve: its reading (issue 23)


def test_oof_from_run_reads_the_best_configuration_and_refuses_foreign_runs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best_head.json").write_text(json.dumps({"head": "logreg", "params": {"C": 1.0}, "augment": "none"}))
    rows = []
    for head, params, p in (("logreg", '{"C": 1.0}', 0.9), ("linear_svm", '{"C": 1.0}', 0.1)):
        for repeat, shift in ((0, 0.0), (1, -0.1)):
            rows += [{"head": head, "params": params, "augment": "none", "repeat": repeat, "path": "x.png",
                      "p[a]": p + shift, "p[b]": 1 - p - shift}]
    pd.DataFrame(rows).to_csv(run / "oof_predictions.csv", index=False)
    table = FeatureTable(np.zeros((1, 2)), np.array([0]), ["a", "b"], ["x.png"])
    np.testing.assert_allclose(oof_from_run(run)(table), [[0.85, 0.15]])    # logreg only, mean of repeats
    with pytest.raises(Exception, match="no prediction for 1 image"):
        oof_from_run(run)(FeatureTable(np.zeros((1, 2)), np.array([0]), ["a", "b"], ["y.png"]))


def test_learning_curve_uses_the_runs_selected_head_and_records_it(tmp_path, cache):
    root = tmp_path / "data"
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(14):                          # 3 folds leave 9-10 per class: sizes 5 fit
            make_image(root / name / f"{name}{i}.png", colour, seed=100 * c + i)
    dataset = scan(root, cache_dir=cache)
    run = evaluate(dataset, SearchConfig(specs=(TINY,), heads=("knn",), folds=3, nested=False),
                   cache, n_jobs=1, run_dir=tmp_path / "run")
    best = json.loads((tmp_path / "run" / "best_head.json").read_text())
    assert best["head"] == "knn" and run.best["head"] == "knn"
    result = inspect_dataset(dataset, TINY, cache, out_dir=tmp_path / "insp", folds=3, n_jobs=1,
                             oof_source=oof_from_run(tmp_path / "run"))
    info = result.summary["learning_curve"]
    assert info["head_config"] == {"head": "knn", "params": best["params"]}
    assert info["head_source"] == "the run's selected head"
    # Recomputed independently: the same curve with that head built directly.
    from featurepipe.extraction.extract import open_stores
    from featurepipe.extraction.features import dataset_features
    from featurepipe.heads import make_head

    features = dataset_features(dataset, open_stores(TINY.resolved(), cache))
    y = features.frame["label"].map({c: i for i, c in enumerate(dataset.classes)}).to_numpy()
    expected = learning_curve(features.X, y, lambda: make_head("knn", best["params"], 0), folds=3, draws=3)
    got = pd.read_csv(tmp_path / "insp" / "learning_curve.csv")
    np.testing.assert_allclose(got["accuracy_mean"], expected.points["accuracy_mean"])
    assert got["label"].tolist() == expected.points["label"].tolist() == ["5", "all (~9)"]
    # Without a run (or with a head too slow to refit ~65 times) the curve keeps logreg C=50 and says why.
    plain = inspect_dataset(dataset, TINY, cache, out_dir=tmp_path / "insp2", folds=3, n_jobs=1)
    assert plain.summary["learning_curve"]["head_config"] == {"head": "logreg", "params": {"C": LABEL_C, "front": "standard"}}
    assert plain.summary["learning_curve"]["head_source"].startswith("fixed head")
    from featurepipe.inspection.inspect import run_curve_head

    assert run_curve_head({"head": "dense", "params": {}})[0] is None
    assert "too slow" in run_curve_head({"head": "dense", "params": {}})[2]
    members = {"members": [{"head": "logreg", "params": {"C": 1.0}}, {"head": "knn", "params": {}}]}
    assert run_curve_head({"head": "ensemble", "params": members})[:2] == ("ensemble", members)
    assert run_curve_head({"head": "ensemble", "params": {"members": [{"head": "dense"}]}})[0] is None


# ------------------------------------------------------------------------------ evaluate / run / CLI


def _evaluate(tree, cache, run_dir, **kwargs):
    return evaluate(scan(tree, cache_dir=cache), SearchConfig(specs=(TINY,), heads=("logreg",), folds=3, **kwargs),
                    cache, n_jobs=1, run_dir=run_dir)


@pytest.mark.parametrize("folds", [3, None])      # None: the default (auto) fold count
def test_evaluate_groups_copies_by_default_and_says_so(dup_tree, cache, tmp_path, folds):
    evaluate(scan(dup_tree, cache_dir=cache), SearchConfig(specs=(TINY,), heads=("logreg",), folds=folds),
             cache, n_jobs=1, run_dir=tmp_path / "on")
    config = json.loads((tmp_path / "on" / "config.json").read_text())
    assert config["dedup_groups"]["enabled"] is True and config["dedup_groups"]["clusters"] == 2
    assert config["dedup_groups"]["groups"] == 26 - 2                  # two pairs became two groups
    oof = pd.read_csv(tmp_path / "on" / "oof_predictions.csv")
    assert set(oof["fold"]) == set(range(config["folds"]))
    folds = dict(zip(oof["path"].str.split("/").str[-1], oof["fold"]))
    assert folds["red0.png"] == folds["red0_big.png"] and folds["green0.png"] == folds["green0_as_blue.jpg"]
    _evaluate(dup_tree, cache, tmp_path / "off", dedup_groups=False)
    config = json.loads((tmp_path / "off" / "config.json").read_text())
    assert config["dedup_groups"]["enabled"] is False


def test_the_duplicate_grouping_is_remembered_and_a_damaged_record_is_found_again(dup_tree, cache, tmp_path,
                                                                                monkeypatch):
    """Finding the pairs costs seconds at 10,000 images: a second evaluate of the same rows reads the
    grouping kept in CACHE/dedup/ (the same folds), and a damaged record is recomputed, not trusted."""
    from featurepipe.data import dedup

    calls = []
    real = dedup.duplicate_groups
    monkeypatch.setattr(dedup, "duplicate_groups", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    _evaluate(dup_tree, cache, tmp_path / "first")
    _evaluate(dup_tree, cache, tmp_path / "second")
    assert len(calls) == 1
    first, second = (pd.read_csv(tmp_path / r / "oof_predictions.csv") for r in ("first", "second"))
    assert first[["path", "fold"]].equals(second[["path", "fold"]])
    assert (json.loads((tmp_path / "first" / "config.json").read_text())["dedup_groups"]
            == json.loads((tmp_path / "second" / "config.json").read_text())["dedup_groups"])
    records = list((cache / "dedup").glob("*.json"))
    good = json.loads(records[0].read_text())
    damaged = ['{"groups": ["a"], "info": {"enabled": true}}', "[]",
               json.dumps({**good, "info": {**good["info"], "clusters": "2"}}),
               json.dumps({**good, "groups": good["groups"][:-1]}),
               json.dumps({**good, "groups": None})]
    for n, text in enumerate(damaged):
        for record in records:
            record.write_text(text)
        _evaluate(dup_tree, cache, tmp_path / f"damaged{n}")
        assert len(calls) == 2 + n, text
        again = pd.read_csv(tmp_path / f"damaged{n}" / "oof_predictions.csv")
        assert first[["path", "fold"]].equals(again[["path", "fold"]]), text


def test_evaluate_says_when_copies_leave_a_class_too_few_groups_for_the_folds(tmp_path, cache):
    root = tmp_path / "data"
    for c, name in enumerate(("red", "green", "blue")):
        for i in range(5):
            _photo(root / name / f"{name}{i}.png", 10 * c + i)
    with Image.open(root / "red" / "red0.png") as im:
        im.resize((80, 60)).save(root / "red" / "red4.png")            # red: 5 images, 4 distinct photos
    dataset = scan(root, cache_dir=cache)
    with pytest.raises(DatasetError, match=r"class 'red' has 5 training images .*\(red0.png ~ red4.png\).* leaves 4: "
                                           r"too few for 5-fold.*--folds 4.*--no-dedup-groups"):
        evaluate(dataset, SearchConfig(specs=(TINY,), heads=("logreg",), folds=5, nested=False),
                 cache, n_jobs=1, run_dir=tmp_path / "r5")
    ok = evaluate(dataset, SearchConfig(specs=(TINY,), heads=("logreg",), folds=4, nested=False),
                  cache, n_jobs=1, run_dir=tmp_path / "r4")
    assert json.loads((tmp_path / "r4" / "config.json").read_text())["dedup_groups"]["clusters"] == 1
    assert len(ok.leaderboard) >= 1
    off = evaluate(dataset, SearchConfig(specs=(TINY,), heads=("logreg",), folds=5, nested=False, dedup_groups=False),
                   cache, n_jobs=1, run_dir=tmp_path / "off")              # the user's choice: copies may leak
    assert len(off.leaderboard) >= 1


def test_evaluate_without_copies_gives_the_same_results_as_before(image_tree, cache, tmp_path):
    on = _evaluate(image_tree, cache, tmp_path / "on")
    off = _evaluate(image_tree, cache, tmp_path / "off", dedup_groups=False)
    assert off.fitted == 0                                              # same folds: every fold reused
    pd.testing.assert_frame_equal(on.leaderboard, off.leaderboard)
    assert json.loads((tmp_path / "on" / "config.json").read_text())["dedup_groups"]["clusters"] == 0


def test_run_relabel_reuses_features_and_the_report_has_the_inspect_sections(dup_tree, cache, tmp_path):
    first = pipeline.run(dup_tree, SearchConfig(specs=(TINY,), heads=("logreg",), folds=3),
                         cache, run_dir=tmp_path / "run1", n_jobs=1)
    assert list(first.stages) == ["scan", "extract", "evaluate", "inspect", "report"]
    page = first.report_path.read_text()
    for title in ("Near-duplicates and leakage", "Label issues", "Outliers", "Class balance", "Learning curve",
                  "Embedding map"):
        assert f">{title}</h2>" in page
    assert page.count("broken.png</span>") == 1       # listed once (run section; config.json dump aside)
    suspects = pd.read_csv(tmp_path / "run1" / "inspect" / "suspects.csv")
    suspects.head(1)[["path", "suggested"]].to_csv(tmp_path / "fixes.csv", index=False)
    second = pipeline.run(dup_tree, SearchConfig(specs=(TINY,), heads=("logreg",), folds=3),
                          cache, run_dir=tmp_path / "run2", n_jobs=1, relabel=tmp_path / "fixes.csv")
    assert second.extract.extracted == 0 and second.evaluate.fitted > 0
    config = json.loads((tmp_path / "run2" / "config.json").read_text())
    assert config["edits"]["relabel"]["changed"][0]["to"] == "green"
    assert "--relabel" in second.report_path.read_text()


def test_cli_inspect_json_and_evaluate_flags(dup_tree, cache, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", str(dup_tree), "--backbone", "tiny", "--weights", "random",
                                 "--image-size", "32", "--folds", "3", "--jobs", "1", "--cache-dir", str(cache),
                                 "--out", str(tmp_path / "insp"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["duplicates"]["pairs"] == 2 and summary["html"].endswith("inspect.html")
    assert len(summary["failed"]) == 1
    text = runner.invoke(app, ["inspect", str(dup_tree), "--backbone", "tiny", "--weights", "random",
                               "--image-size", "32", "--folds", "3", "--jobs", "1", "--cache-dir", str(cache),
                               "--out", str(tmp_path / "insp2"), "--top", "3"])
    assert text.exit_code == 0, text.output
    # The table wraps a long path inside its column (160 columns off a terminal): under pytest-xdist's
    # longer temporary folders "green0_as_blue.jpg" broke as "...blue.jp" / "g", so the stem is matched.
    assert "near-duplicates: 2 pair(s)" in text.stdout and "green0_as_blue" in text.stdout
    (tmp_path / "bad.csv").write_text("path\nnope.png\n")
    bad = runner.invoke(app, ["evaluate", str(dup_tree), "--backbone", "tiny", "--weights", "random",
                              "--image-size", "32", "--heads", "logreg", "--folds", "3", "--cache-dir", str(cache),
                              "--exclude", str(tmp_path / "bad.csv")])
    assert bad.exit_code == 1 and "match no image" in bad.output   # a data failure (2: usage errors)


def test_inspect_reports_copies_across_splits_and_scores_only_training_images(tmp_path, cache):
    root = tmp_path / "splits"
    for split, n in (("train", 6), ("test", 2)):
        for c, (name, colour) in enumerate(list(COLOURS.items())[:2]):
            for i in range(n):
                make_image(root / split / name / f"{split}_{name}{i}.png", colour, seed=1000 * c + 10 * i + len(split))
    with Image.open(root / "train" / "red" / "train_red0.png") as im:
        im.resize((60, 50)).save(root / "test" / "red" / "leaked.png")
    result = inspect_dataset(scan(root, cache_dir=cache), TINY, cache, out_dir=tmp_path / "insp", folds=3, n_jobs=1)
    leaked = result.duplicates[result.duplicates["cross_split"]]
    assert len(leaked) == 1 and set(leaked.iloc[0][["split_a", "split_b"]]) == {"train", "test"}
    assert result.summary["duplicates"]["cross_split_pairs"] == 1
    assert result.summary["train_images"] == 12 and len(result.suspects) == 12
    assert not result.suspects["path"].str.contains("/test/").any()


def test_report_marks_inspect_results_of_an_earlier_evaluation_stale(image_tree, cache, tmp_path):
    from featurepipe.report.write import write_report

    run = tmp_path / "run"
    pipeline.run(image_tree, SearchConfig(specs=(TINY,), heads=("logreg",), folds=3), cache, run_dir=run, n_jobs=1)
    assert "earlier evaluation" not in (run / "report.html").read_text()
    (tmp_path / "fix.csv").write_text("path,label\nred/red0.png,blue\n")
    evaluate(apply_fixes(scan(image_tree, cache_dir=cache), relabel=tmp_path / "fix.csv"),
             SearchConfig(specs=(TINY,), heads=("logreg",), folds=3), cache, n_jobs=1, run_dir=run)  # new OOF, old inspect/
    assert "earlier evaluation" in write_report(run).html_path.read_text()
    pipeline.run(image_tree, SearchConfig(specs=(TINY,), heads=("logreg",), folds=3),
                 cache, run_dir=run, n_jobs=1, inspect=False)
    assert not (run / "inspect").exists() and "Label issues" not in (run / "report.html").read_text()
