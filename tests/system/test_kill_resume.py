"""SIGKILL a real extract process mid-run: committed shards survive intact and the next run resumes."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from featurepipe.backbones.fingerprint import backbone_fingerprint
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.data.dataset import scan
from featurepipe.extraction.extract import extract, open_stores
from featurepipe.extraction.features import dataset_features
from featurepipe.store.featurestore import FeatureStore
from tests.conftest import COLOURS, REPO, make_image

N_IMAGES = 60
BATCH = 4
SPEC = BackboneSpec(name="tiny", weights="random", image_size=32)

CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import tests.tiny_backbone
    from featurepipe.backbones.spec import BackboneSpec
    from featurepipe.data.dataset import scan
    from featurepipe.extraction.extract import extract

    data, cache = Path(sys.argv[1]), Path(sys.argv[2])

    def slow(event):
        time.sleep(0.15)

    dataset = scan(data, cache_dir=cache)
    extract(dataset, BackboneSpec(name="tiny", weights="random", image_size=32), cache,
            batch_size=4, decode_threads=1, progress=slow)
    print("FINISHED", flush=True)
    """
)


def _tree(root: Path) -> Path:
    colours = list(COLOURS.values())
    for i in range(N_IMAGES):
        make_image(root / f"class{i % 3}" / f"img{i:02d}.png", colours[i % 3], seed=9000 + i)
    return root


def _committed(shards_dir: Path) -> list[Path]:
    return sorted(p for p in shards_dir.glob("*.h5") if not p.name.startswith(".")) if shards_dir.exists() else []


def test_sigkill_mid_extract_then_resume(tmp_path):
    data = _tree(tmp_path / "data")
    cache = tmp_path / "cache"
    fingerprint, _ = backbone_fingerprint(SPEC, cache)
    shards_dir = cache / "features" / fingerprint[:16] / "shards"

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(data), str(cache)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        seen = 0
        while time.monotonic() < deadline:
            seen = len(_committed(shards_dir))
            if seen >= 3 or child.poll() is not None:
                break
            time.sleep(0.02)
        if child.poll() is not None:
            out, err = child.communicate()
            raise AssertionError(f"the child exited (rc={child.returncode}) before it was killed, with {seen} "
                                 f"shard(s) seen\nstdout:\n{out}\nstderr:\n{err[-3000:]}")
        assert seen >= 3, f"only {seen} shard(s) after 60 s"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        assert child.returncode == -signal.SIGKILL
        out = child.stdout.read()
        assert "FINISHED" not in out
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()

    # what was committed survives, whole
    store = FeatureStore(shards_dir.parent)
    assert store.fingerprint == fingerprint and store.feature_dim == 24
    assert store.verify() == []
    shards_after = len(_committed(shards_dir))
    assert shards_after >= seen
    rows_before = len(store.keys())
    assert rows_before >= BATCH * seen
    assert rows_before == BATCH * shards_after            # every committed shard is one full batch
    assert rows_before < N_IMAGES, "the child finished before it was killed; nothing to resume"

    # the next run extracts exactly what is missing, and ends with every image
    dataset = scan(data, cache_dir=cache)
    resumed = extract(dataset, SPEC, cache, batch_size=BATCH)
    assert resumed.failed == []
    assert (resumed.extracted, resumed.reused) == (N_IMAGES - rows_before, rows_before)
    assert list(shards_dir.glob(".tmp-*")) == []
    stores = open_stores(SPEC, cache)
    assert stores.originals.info().rows == N_IMAGES
    assert stores.originals.verify() == []

    # and the numbers equal those of a run that was never interrupted
    clean_cache = tmp_path / "clean"
    clean = extract(scan(data, cache_dir=clean_cache), SPEC, clean_cache, batch_size=16)
    assert clean.extracted == N_IMAGES
    got = dataset_features(dataset, stores)
    want = dataset_features(dataset, open_stores(SPEC, clean_cache))
    assert got.frame["hash"].tolist() == want.frame["hash"].tolist() and len(got.frame) == N_IMAGES
    np.testing.assert_allclose(got.X, want.X, rtol=0, atol=1e-6)
