"""Extract and cross-validation on a Dask LocalCluster (2 workers x 1 thread): the local run's numbers,
shard names and row order; a worker killed mid-extract survived; CV through joblib's dask backend."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

distributed = pytest.importorskip("distributed", reason="the dask extra is not installed")

from typer.testing import CliRunner  # noqa: E402

from featurepipe.backbones.spec import BackboneSpec  # noqa: E402
from featurepipe.extraction.batches import plan_batches  # noqa: E402
from featurepipe.cli.app import app  # noqa: E402
from featurepipe.extraction.executors.dask_cluster import DaskExecutor  # noqa: E402
from featurepipe.data.dataset import scan  # noqa: E402
from featurepipe.evaluation.evaluate import evaluate  # noqa: E402
from featurepipe.core.errors import FeaturepipeError  # noqa: E402
from featurepipe.extraction.executors.choose import open_executor, use_executor  # noqa: E402
from featurepipe.extraction.extract import extract, open_stores  # noqa: E402
from featurepipe.extraction.features import dataset_features  # noqa: E402
from featurepipe.evaluation.config import SearchConfig
from tests.conftest import COLOURS, REPO, make_image  # noqa: E402

TINY = BackboneSpec(name="tiny", weights="random", image_size=32)
TINY_ARGS = ["--backbone", "tiny", "--weights", "random", "--image-size", "32"]


@pytest.fixture(scope="module")
def dask_executor():
    """One LocalCluster for the module: starting one and importing TensorFlow on its workers is the slow part."""
    executor = DaskExecutor.local_cluster(2)
    yield executor
    executor.close()


def _tree(root: Path, n: int) -> Path:
    colours = list(COLOURS.values())
    for i in range(n):
        make_image(root / f"class{i % 3}" / f"img{i:03d}.png", colours[i % 3], seed=5000 + i)
    return root


def _shards(store) -> dict[str, tuple[list[str], np.ndarray]]:
    out = {}
    for path in sorted((store.directory / "shards").glob("*.h5")):
        with h5py.File(path, "r") as handle:
            out[path.name] = (handle["keys"].asstr()[()].tolist(), handle["features"][()])
    return out


def _leftovers(cache: Path) -> list[str]:
    """Temporary files and uncommitted shards anywhere in the cache's stores."""
    features = cache / "features"
    return sorted(str(p) for p in [*features.rglob(".tmp-*"), *features.glob("*/incoming/*")])


def _assert_same_stores(spec_stores_a, spec_stores_b):
    for a, b in ((spec_stores_a.originals, spec_stores_b.originals), (spec_stores_a.views, spec_stores_b.views)):
        if a is None:
            assert b is None
            continue
        shards_a, shards_b = _shards(a), _shards(b)
        assert list(shards_a) == list(shards_b) and shards_a
        for name, (keys, features) in shards_a.items():
            assert shards_b[name][0] == keys, name
            np.testing.assert_allclose(shards_b[name][1], features, rtol=0, atol=1e-5)


def test_the_cluster_we_start_listens_on_localhost_only(dask_executor):
    import psutil

    here = psutil.Process(os.getpid())
    listening = [(p.pid, c.laddr.ip) for p in [here, *here.children(recursive=True)]
                 for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    workers = set(dask_executor.client.run(os.getpid).values())
    assert workers <= {pid for pid, _ in listening} and len(workers) == 2     # scheduler + nannies live here
    assert {ip for _, ip in listening} == {"127.0.0.1"}, listening


def test_distributed_extract_equals_local_shard_for_shard(image_tree, tmp_path, dask_executor):
    (image_tree / "red" / "broken.png").write_text("<html>not an image</html>")
    (image_tree / "blue" / "copy.png").write_bytes((image_tree / "blue" / "blue0.png").read_bytes())
    local_cache, remote_cache = tmp_path / "local", tmp_path / "remote"
    local = extract(scan(image_tree, cache_dir=local_cache), TINY, local_cache, batch_size=5, augment=2)
    remote = extract(scan(image_tree, cache_dir=remote_cache), TINY, remote_cache, batch_size=5, augment=2,
                     executor=dask_executor)
    assert remote.executor.startswith("dask LocalCluster tcp://127.0.0.1:") and local.executor == "local"
    for field in ("images", "extracted", "reused", "views_extracted", "feature_dim", "fingerprint"):
        assert getattr(remote, field) == getattr(local, field), field
    assert (remote.images, remote.extracted, remote.views_extracted) == (25, 24, 48)
    assert [(f.path, f.reason) for f in remote.failed] == [(f.path, f.reason) for f in local.failed]
    assert [f.path for f in remote.failed] == [str(image_tree / "red" / "broken.png")]
    # same shards, same names, same rows in the same order, same numbers
    local_stores, remote_stores = open_stores(TINY, local_cache, augment=2), open_stores(TINY, remote_cache, augment=2)
    _assert_same_stores(local_stores, remote_stores)
    dataset = scan(image_tree, cache_dir=remote_cache)
    np.testing.assert_allclose(dataset_features(dataset, remote_stores).X,
                               dataset_features(dataset, local_stores).X, rtol=0, atol=1e-5)
    assert remote_stores.originals.failures() == local_stores.originals.failures()
    assert _leftovers(remote_cache) == []

    # a re-run schedules only what is missing: nothing, then exactly the rows of two dropped shards
    again = extract(dataset, TINY, remote_cache, batch_size=5, augment=2, executor=dask_executor)
    assert (again.extracted, again.views_extracted, again.reused) == (0, 0, 24)
    dropped = sorted((remote_stores.originals.directory / "shards").glob("*.h5"))[:2]
    rows = sum(len(_shards(remote_stores.originals)[p.name][0]) for p in dropped)
    for path in dropped:
        path.unlink()
    refill = extract(dataset, TINY, remote_cache, batch_size=5, augment=2, executor=dask_executor)
    assert (refill.extracted, refill.views_extracted, refill.reused) == (rows, 0, 24 - rows)
    assert open_stores(TINY, remote_cache).originals.verify() == [] and _leftovers(remote_cache) == []


def test_cv_through_the_dask_backend_scores_exactly_like_local(image_tree, tmp_path, dask_executor):
    cache = tmp_path / "cache"
    dataset = scan(image_tree, cache_dir=cache)
    options = dict(heads=("logreg", "linear_svm"), folds=3, seed=3)
    local = evaluate(dataset, SearchConfig(specs=(TINY,), **options), cache, run_dir=tmp_path / "local", n_jobs=1)
    shutil.rmtree(cache / "evaluations")        # or the second run would only reuse the first one's folds
    with use_executor(dask_executor), distributed.get_task_stream(client=dask_executor.client) as stream:
        remote = evaluate(dataset, SearchConfig(specs=(TINY,), **options),
                          cache, run_dir=tmp_path / "remote", n_jobs=-1)
    fits = [t for t in stream.data if "_fit_fold" in str(t["key"])]
    assert fits, "no CV fit ran on the cluster"
    assert {t["worker"] for t in fits} <= set(dask_executor.client.scheduler_info()["workers"])
    assert remote.fitted == local.fitted > 0 and remote.reused == 0
    assert remote.best == local.best
    for name in ("folds.csv", "oof_predictions.csv", "leaderboard.csv"):
        want, got = pd.read_csv(tmp_path / "local" / name), pd.read_csv(tmp_path / "remote" / name)
        want = want.drop(columns=[c for c in ("fit_seconds",) if c in want])
        got = got.drop(columns=[c for c in ("fit_seconds",) if c in got])
        pd.testing.assert_frame_equal(got, want, check_exact=True)


def test_cli_reaches_an_existing_scheduler_by_option_and_by_environment(image_tree, tmp_path, dask_executor,
                                                                          monkeypatch):
    runner = CliRunner()
    address = dask_executor.client.scheduler.address
    cache = tmp_path / "cache"
    result = runner.invoke(app, ["extract", str(image_tree), *TINY_ARGS, "--cache-dir", str(cache), "--json",
                                 "--scheduler", address])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    summary = json.loads(result.stdout)
    assert summary["extracted"] == 24 and summary["executor"] == f"dask {address} (2 workers)"

    monkeypatch.setenv("FEATUREPIPE_SCHEDULER", address)
    fresh = tmp_path / "fresh"
    result = runner.invoke(app, ["evaluate", str(image_tree), *TINY_ARGS, "--cache-dir", str(fresh), "--json",
                                 "--heads", "logreg", "--folds", "3"])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    summary = json.loads(result.stdout)
    assert summary["extract"]["executor"].startswith("dask ") and summary["extract"]["extracted"] == 24
    assert summary["fitted"] > 0
    # the scheduler the user runs stays up: the CLI only closes its own client
    assert len(dask_executor.client.scheduler_info()["workers"]) == 2


def test_an_unreachable_scheduler_and_conflicting_options_are_clear_errors(image_tree, tmp_path):
    with pytest.raises(FeaturepipeError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:1 "):
        open_executor("tcp://127.0.0.1:1", connect_timeout=1)
    result = CliRunner().invoke(app, ["evaluate", str(image_tree), *TINY_ARGS, "--cache-dir", str(tmp_path),
                                      "--scheduler", "tcp://127.0.0.1:1", "--workers", "2"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--scheduler and --workers exclude each other" in lines[0]


def test_a_worker_killed_mid_extract_is_survived_with_one_shard_per_batch(tmp_path, dask_executor):
    data = _tree(tmp_path / "data", 30)          # 30 one-image batches: under the store's compaction threshold
    cache = tmp_path / "cache"
    client = dask_executor.client
    client.wait_for_workers(2, timeout=120)
    before = client.run(os.getpid)
    killed = {}

    def kill_a_busy_worker(event):
        # After the first batch is committed: SIGKILL a worker that has batches in hand.
        if killed or event.stage != "extract" or event.done == 0:
            return
        busy = {address: keys for address, keys in client.processing().items() if keys and address in before}
        assert busy, "no worker had a batch in hand: the run finished before it could be disrupted"
        address = sorted(busy)[0]
        killed.update(address=address, pid=before[address], batches=len(busy[address]), at=event.done)
        os.kill(before[address], signal.SIGKILL)

    dataset = scan(data, cache_dir=cache)
    result = extract(dataset, TINY, cache, batch_size=1, executor=dask_executor, progress=kill_a_busy_worker)
    assert killed and killed["batches"] >= 1 and killed["at"] < 30, killed
    assert (result.extracted, result.failed) == (30, [])

    # exactly one shard per planned batch, whole, and nothing half-written left behind
    store = open_stores(TINY, cache).originals
    planned = plan_batches({h: [h] for h in set(dataset.frame["hash"])}, 1)
    assert sorted(_shards(store)) == sorted(b.shard_name for b in planned)
    assert store.verify() == [] and len(store.keys()) == 30
    assert _leftovers(cache) == []
    local_cache = tmp_path / "local"
    extract(scan(data, cache_dir=local_cache), TINY, local_cache, batch_size=1)
    _assert_same_stores(open_stores(TINY, local_cache), open_stores(TINY, cache))

    # the nanny replaced the killed process (this test runs last: the new one still has to import TensorFlow)
    client.wait_for_workers(2, timeout=120)
    assert killed["pid"] not in client.run(os.getpid).values()


CHILD = "import tests.tiny_backbone; from featurepipe.cli.app import main; main()"


def _ctrl_c_reaches_python() -> None:
    # A child inherits an ignored SIGINT, and Python then never installs its KeyboardInterrupt handler:
    # CI runs the suite from a non-interactive shell that ignores SIGINT, so the extract used to finish
    # undisturbed there (exit 0). A user's terminal delivers Ctrl-C with the default disposition.
    # The signal mask is inherited through exec as well: a SIGINT blocked in the forking thread (some
    # libraries block it around spawning helpers) would stay pending in the child for ever.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _signal_masks(pid: int) -> str:
    """The child's blocked / ignored / caught signal masks, for the failure message."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return "(no /proc)"
    return " ".join(line.replace("\t", "") for line in lines if line.startswith(("SigBlk", "SigIgn", "SigCgt")))


@pytest.mark.slow
def test_ctrl_c_shuts_the_local_cluster_down(tmp_path):
    import psutil

    # Enough one-image batches that the job is still running when Ctrl-C arrives on a fast machine.
    data = _tree(tmp_path / "data", 400)
    cache = tmp_path / "cache"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    child = subprocess.Popen([sys.executable, "-c", CHILD, "extract", str(data), *TINY_ARGS, "--cache-dir",
                              str(cache), "--workers", "2", "--batch-size", "1"], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=_ctrl_c_reaches_python)
    try:
        process = psutil.Process(child.pid)
        deadline = time.monotonic() + 120
        # The driver makes incoming/ just before it hands the batches to the cluster.
        while not list((cache / "features").glob("*/incoming")) and time.monotonic() < deadline:
            assert child.poll() is None, child.communicate()
            time.sleep(0.05)
        workers = process.children(recursive=True)
        assert len(workers) >= 2, workers
        masks = _signal_masks(child.pid)
        # Ctrl-C, repeated once a second as an impatient user would, until the CLI has exited.
        deadline = time.monotonic() + 60
        while child.poll() is None and time.monotonic() < deadline:
            child.send_signal(signal.SIGINT)
            try:
                child.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        assert child.returncode not in (None, 0), (child.returncode, masks, child.communicate())
        stored = len(open_stores(TINY, cache).originals.keys())
        assert stored < 400, stored     # it really was interrupted, not finished
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert alive == [], f"still running after Ctrl-C: {alive}"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
        for stream in (child.stdout, child.stderr):
            stream.close()
