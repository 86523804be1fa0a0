"""A photo rewritten between `scan` (which hashes it) and extraction (which decodes it) must never
be filed under its old content hash: the store is content-addressed, so a row is only as good as
the bytes it was computed from. extract reads each file once, hashes exactly the bytes it decodes,
and skips (and reports, without remembering) a file whose bytes no longer match the scan's hash; a
later dataset holding the original photos then extracts them afresh instead of reusing another
photo's features. The perceptual hashes that dedup keeps by content hash obey the same rule."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from featurepipe.backbones.spec import BackboneSpec
from featurepipe.core.errors import ImageDecodeError
from featurepipe.core.hashcache import file_sha256
from featurepipe.data.dataset import scan
from featurepipe.data.images import decode_image
from featurepipe.data.phash import perceptual_hash
from featurepipe.extraction.extract import extract, open_stores
from tests.conftest import COLOURS, REPO, make_image

TINY = BackboneSpec(name="tiny", weights="random", image_size=32)
TINY_ARGS = ["--backbone", "tiny", "--weights", "random", "--image-size", "32"]
CHILD_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}

# The CLI in a child process, with one fault: once `extract` has scanned (hashed) the dataset and
# before it decodes anything, every red photo is overwritten with a blue photo's bytes, and its
# mtime put back, as in the reported attack.
CHILD = textwrap.dedent("""
    import json, os, sys
    import tests.tiny_backbone
    from featurepipe.extraction import extract as extract_module

    swaps = json.loads(os.environ["SWAPS"])
    real = extract_module.extract

    def extract_after_rewrite(*args, **kwargs):
        for target, source in swaps:
            info = os.stat(target)
            with open(source, "rb") as f, open(target, "wb") as g:
                g.write(f.read())
            os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
        return real(*args, **kwargs)

    extract_module.extract = extract_after_rewrite
    from featurepipe.cli import main
    main()
""")


def _photos(root: Path) -> Path:
    for c, name in enumerate(("red", "blue")):
        for i in range(5):
            make_image(root / name / f"{name}{i}.png", COLOURS[name], seed=100 * c + i)
    return root


def _store_rows(cache: Path) -> dict[str, np.ndarray]:
    store = open_stores(TINY, cache).originals
    keys = sorted(store.keys())
    return dict(zip(keys, store.read(keys)))


def test_a_photo_rewritten_after_the_scan_is_not_filed_under_its_old_hash(tmp_path):
    data, cache = _photos(tmp_path / "data"), tmp_path / "cache"
    originals = {p: p.read_bytes() for p in sorted((data / "red").iterdir())}
    old_hashes = {file_sha256(p) for p in originals}
    swaps = [[str(p), str(data / "blue" / p.name.replace("red", "blue"))] for p in originals]

    done = subprocess.run([sys.executable, "-c", CHILD, "extract", str(data), *TINY_ARGS, "--cache-dir", str(cache),
                           "--json"], env={**CHILD_ENV, "SWAPS": json.dumps(swaps)}, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    failed = {Path(f["path"]).name: f["reason"] for f in report["failed"]}
    assert sorted(failed) == [f"red{i}.png" for i in range(5)]
    assert all("changed since" in reason for reason in failed.values()), failed

    rows = _store_rows(cache)
    assert not old_hashes & set(rows), "a rewritten photo's decode was filed under the hash of its old bytes"
    # Nothing about the old bytes is remembered as undecodable either: they decode fine.
    store = open_stores(TINY, cache).originals
    assert not old_hashes & set(store.failures())

    # The original photos come back (another copy of the dataset, say): extracted afresh, and the
    # rows equal a clean cache's, computed from exactly those bytes.
    for path, content in originals.items():
        path.write_bytes(content)
    again = extract(scan(data, cache_dir=cache), TINY, cache)
    assert (again.extracted, again.failed) == (5, [])
    clean = tmp_path / "clean"
    extract(scan(data, cache_dir=clean), TINY, clean)
    fresh, reference = _store_rows(cache), _store_rows(clean)
    for digest in old_hashes:
        np.testing.assert_allclose(fresh[digest], reference[digest], rtol=0, atol=1e-6)

    verify = subprocess.run([sys.executable, "-c", "import tests.tiny_backbone; from featurepipe.cli import main; "
                             "main()", "cache", "verify", "--cache-dir", str(cache)],
                            env=CHILD_ENV, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_decode_checks_the_bytes_it_decodes_against_the_expected_hash(tmp_path):
    path = make_image(tmp_path / "a.png", COLOURS["red"], seed=1)
    digest = file_sha256(path)
    expected = decode_image(path, 32, "squash")
    np.testing.assert_array_equal(decode_image(path, 32, "squash", expect_sha256=digest), expected)
    shutil.copyfile(make_image(tmp_path / "b.png", COLOURS["blue"], seed=2), path)
    with pytest.raises(ImageDecodeError, match="changed since"):
        decode_image(path, 32, "squash", expect_sha256=digest)
    with pytest.raises(ImageDecodeError, match="changed since"):
        perceptual_hash(path, expect_sha256=digest)


def test_perceptual_hashes_of_a_rewritten_photo_are_not_remembered_under_its_old_hash(tmp_path):
    from featurepipe.data.perceptual import perceptual_hashes

    cache = tmp_path / "cache"
    cache.mkdir()
    path = make_image(tmp_path / "a.png", COLOURS["red"], seed=1)
    digest = file_sha256(path)
    shutil.copyfile(make_image(tmp_path / "b.png", COLOURS["blue"], seed=2), path)
    first = perceptual_hashes({digest: str(path)}, cache_root=cache)
    assert digest not in first.hashes and "changed since" in first.failed[digest]
    # Put back, the photo gets its own hash: the failure above was not remembered.
    make_image(path, COLOURS["red"], seed=1)
    assert file_sha256(path) == digest
    second = perceptual_hashes({digest: str(path)}, cache_root=cache)
    assert second.hashes[digest] == perceptual_hash(path) and not second.failed
