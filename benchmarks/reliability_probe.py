"""Adversarial probe of featurepipe's guarantees, counted (issue 12). Not a test: it prints figures.

    python benchmarks/reliability_probe.py [--quick] [--json results.json]

1. kill -9 points during `extract` and `evaluate`: a child process runs the stage with hooks on
   every os.replace / os.fsync / Path.unlink / shard write / compaction / CSV write / progress
   event, and SIGKILLs itself just before or just after the K-th one. After each kill the store must
   open, `verify` clean, the re-run must finish, and the results (features, leaderboard) must equal
   an uninterrupted run's; every row committed before the kill must still be there ("rows lost").
2. `cache gc` racing `extract` of a second dataset, several tries: rows lost must be 0.
3. bad inputs: each must end in a clear one-line message or a correct result with a warning
   (no traceback, no hang), through the CLI.
4. hostile files: each must be refused or skipped (no hang, no code run, nothing read outside).

Everything uses the tiny random backbone of the tests (no downloads); everything lives in a
temporary folder. Prints one JSON object with the counts and each case's outcome.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

N_IMAGES = 36
BATCH = 4

CHILD = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[6])
    import tests.tiny_backbone
    import pandas as pd
    from featurepipe.store import featurestore as store
    from featurepipe.backbones.spec import BackboneSpec
    from featurepipe.data.dataset import scan

    mode, data, cache, run_dir, kill_at = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5])
    count = [0]

    def tick():
        count[0] += 1
        if count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def hook(owner, name):
        real = getattr(owner, name)
        def wrapper(*args, **kwargs):
            tick()
            out = real(*args, **kwargs)
            tick()
            return out
        setattr(owner, name, wrapper)

    for owner, name in [(os, "replace"), (os, "fsync"), (Path, "unlink"), (store.FeatureStore, "_write_shard"),
                        (store.FeatureStore, "_compact"), (pd.DataFrame, "to_csv")]:
        hook(owner, name)
    store.COMPACT_AT = 3          # so that the run compacts its shards before it ends
    spec = BackboneSpec(name="tiny", weights="random", image_size=32)
    progress = lambda event: tick()
    dataset = scan(data, cache_dir=cache)
    if mode == "extract":
        from featurepipe.extraction.extract import extract
        extract(dataset, spec, cache, batch_size=%d, decode_threads=1, progress=progress)
    else:
        from featurepipe.evaluation.config import SearchConfig
        from featurepipe.evaluation.evaluate import evaluate
        evaluate(dataset, SearchConfig(specs=(spec,), heads=("logreg", "linear_svm"), folds=3), cache,
                 run_dir=run_dir, n_jobs=1, progress=progress)
    print(json.dumps({"events": count[0]}))
""" % BATCH)


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO)}


def make_tree(root: Path, n: int = N_IMAGES, seed: int = 0) -> Path:
    from tests.conftest import COLOURS, make_image

    colours = list(COLOURS.values())
    for i in range(n):
        make_image(root / f"class{i % 3}" / f"img{i:03d}.png", colours[i % 3], seed=seed + i)
    return root


def run_child(mode: str, data: Path, cache: Path, run_dir: Path, kill_at: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, mode, str(data), str(cache), str(run_dir), str(kill_at),
                           str(REPO)], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)


def pick(total: int, limit: int) -> list[int]:
    if total <= limit:
        return list(range(1, total + 1))
    step = total / limit
    return sorted({max(1, min(total, round(1 + i * step))) for i in range(limit)})


# ------------------------------------------------------------------------------------------ kill points


def probe_extract_kills(work: Path, limit: int) -> dict:
    import numpy as np

    from featurepipe.backbones.spec import BackboneSpec
    from featurepipe.data.dataset import scan
    from featurepipe.extraction.extract import extract, open_stores
    from featurepipe.extraction.features import dataset_features

    spec = BackboneSpec(name="tiny", weights="random", image_size=32)
    data = make_tree(work / "data")
    clean_cache = work / "clean"
    dry = run_child("extract", data, clean_cache, work / "unused", 0)
    total = json.loads(dry.stdout.strip().splitlines()[-1])["events"]
    want = dataset_features(scan(data, cache_dir=clean_cache), open_stores(spec, clean_cache))
    cases = []
    for k in pick(total, limit):
        cache = work / f"extract-{k}"
        child = run_child("extract", data, cache, work / "unused", k)
        killed = child.returncode == -signal.SIGKILL
        outcome = {"kill_at": k, "of": total, "killed": killed}
        try:
            stores = open_stores(spec, cache)
            problems = stores.originals.verify()
            before = stores.originals.keys()
            resumed = extract(scan(data, cache_dir=cache), spec, cache, batch_size=BATCH)
            stores = open_stores(spec, cache)
            after = stores.originals.keys()
            got = dataset_features(scan(data, cache_dir=cache), stores)
            same = (got.frame["hash"].tolist() == want.frame["hash"].tolist()
                    and np.allclose(got.X, want.X, rtol=0, atol=1e-6))
            temps = list((stores.originals.directory / "shards").glob(".tmp-*"))
            outcome.update(rows_before=len(before), rows_lost=len(before - after), problems=problems,
                           failed=len(resumed.failed), same_features=bool(same), temps_left=len(temps))
            outcome["survived"] = (killed and not problems and not resumed.failed and same and not temps
                                   and not (before - after) and len(after) == N_IMAGES)
        except Exception as error:   # a failure to reopen or resume is exactly what we count
            outcome.update(survived=False, error=f"{type(error).__name__}: {error}", rows_lost=0)
        cases.append(outcome)
        shutil.rmtree(cache, ignore_errors=True)
    return {"tried": len(cases), "survived": sum(c["survived"] for c in cases),
            "rows_lost": sum(c.get("rows_lost", 0) for c in cases), "events": total, "cases": cases}


def _run_dir_whole(run_dir: Path) -> list[str]:
    """Problems with the files a killed evaluate left (before the re-run touches them)."""
    import pandas as pd

    problems = []
    if not run_dir.exists():
        return problems
    for path in run_dir.iterdir():
        if path.name.startswith(".tmp"):
            continue   # a writer's temporary file: never read, replaced on the next write
        if path.is_file() and path.stat().st_size == 0:
            problems.append(f"{path.name} is empty")
        elif path.suffix == ".csv":
            try:
                pd.read_csv(path)
            except Exception as error:
                problems.append(f"{path.name}: {error}")
        elif path.suffix == ".json":
            try:
                json.loads(path.read_text())
            except ValueError as error:
                problems.append(f"{path.name}: {error}")
    return problems


def probe_evaluate_kills(work: Path, limit: int) -> dict:
    import pandas as pd

    from featurepipe.rundir.heads_io import load_head
    from featurepipe.backbones.spec import BackboneSpec
    from featurepipe.data.dataset import scan
    from featurepipe.evaluation.config import SearchConfig
    from featurepipe.evaluation.evaluate import evaluate

    spec = BackboneSpec(name="tiny", weights="random", image_size=32)
    data = make_tree(work / "data", seed=500)
    dry = run_child("evaluate", data, work / "clean", work / "clean-run", 0)
    total = json.loads(dry.stdout.strip().splitlines()[-1])["events"]
    want = pd.read_csv(work / "clean-run" / "leaderboard.csv")
    columns = ["head", "params", "accuracy_mean", "log_loss_mean"]
    cases = []
    for k in pick(total, limit):
        cache, run_dir = work / f"evaluate-{k}", work / f"run-{k}"
        child = run_child("evaluate", data, cache, run_dir, k)
        outcome = {"kill_at": k, "of": total, "killed": child.returncode == -signal.SIGKILL}
        try:
            left = _run_dir_whole(run_dir)
            again = evaluate(scan(data, cache_dir=cache), SearchConfig(specs=(spec,), heads=("logreg", "linear_svm"),
                                                                       folds=3), cache, run_dir=run_dir, n_jobs=1)
            got = pd.read_csv(run_dir / "leaderboard.csv")
            same = got[columns].round(9).equals(want[columns].round(9))
            load_head(run_dir)
            outcome.update(left_broken=left, same_leaderboard=bool(same), reused_fits=again.reused)
            outcome["survived"] = outcome["killed"] and not left and same
        except Exception as error:
            outcome.update(survived=False, error=f"{type(error).__name__}: {error}")
        cases.append(outcome)
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"tried": len(cases), "survived": sum(c["survived"] for c in cases), "events": total, "cases": cases}


GC_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    import tests.tiny_backbone
    from featurepipe.backbones.spec import BackboneSpec
    from featurepipe.data.dataset import scan
    from featurepipe.extraction.extract import extract
    data, cache = Path(sys.argv[1]), Path(sys.argv[2])
    result = extract(scan(data, cache_dir=cache), BackboneSpec(name="tiny", weights="random", image_size=32), cache,
                     batch_size=2, decode_threads=1, progress=lambda e: time.sleep(0.05))
    print(result.extracted)
""")


def probe_gc_race(work: Path, tries: int) -> dict:
    from featurepipe.backbones.spec import BackboneSpec
    from featurepipe.rundir.maintenance import gc_cache
    from featurepipe.data.dataset import scan
    from featurepipe.extraction.extract import extract, open_stores

    spec = BackboneSpec(name="tiny", weights="random", image_size=32)
    lost_total = 0
    cases = []
    for attempt in range(tries):
        cache = work / f"gc-{attempt}"
        first = make_tree(work / f"gc-first-{attempt}", 6, seed=1000 + 100 * attempt)
        second = make_tree(work / f"gc-second-{attempt}", 24, seed=2000 + 100 * attempt)
        extract(scan(first, cache_dir=cache), spec, cache)
        child = subprocess.Popen([sys.executable, "-c", GC_CHILD, str(second), str(cache), str(REPO)], env=_env(),
                                 cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        removed = 0
        while child.poll() is None:
            removed += gc_cache(cache).rows_removed
            time.sleep(0.1)
        out, _ = child.communicate()
        keys = open_stores(spec, cache).originals.keys()
        wanted = set(scan(second, cache_dir=cache).frame["hash"]) | set(scan(first, cache_dir=cache).frame["hash"])
        lost = len(wanted - keys)
        lost_total += lost
        cases.append({"extracted": int(out.strip() or -1), "gc_rows_removed": removed, "rows_lost": lost})
    return {"tried": tries, "rows_lost": lost_total, "cases": cases}


# ------------------------------------------------------------------------------------------ CLI cases


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout()


def cli(*args):
    from typer.testing import CliRunner

    from featurepipe.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


TINY = ["--backbone", "tiny", "--weights", "random", "--image-size", "32"]


def clean_message(result, *phrases) -> tuple[bool, str]:
    """A handled failure: exit 1/2 with a message naming what it should, no traceback."""
    text = result.stdout + result.stderr
    ok = (result.exit_code in (1, 2) and isinstance(result.exception, SystemExit) and "Traceback" not in text
          and all(p.lower() in text.lower() for p in phrases))
    return ok, text.strip().splitlines()[-1][:300] if text.strip() else repr(result.exception)


def ok_with(result, *phrases) -> tuple[bool, str]:
    text = result.stdout + result.stderr
    ok = result.exit_code == 0 and all(p.lower() in text.lower() for p in phrases)
    return ok, (text.strip().splitlines() or [""])[-1][:300] if ok else text[-600:]


def run_cases(cases: dict, work: Path) -> dict:
    results = {}
    for name, case in cases.items():
        folder = work / name
        folder.mkdir(parents=True)
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(120)
        try:
            handled, detail = case(folder)
        except Timeout:
            handled, detail = False, "hung (no answer in 120 s)"
        except Exception as error:
            handled, detail = False, "".join(traceback.format_exception_only(error)).strip()[:300]
        finally:
            signal.alarm(0)
        results[name] = {"handled": bool(handled), "detail": detail}
    return {"tried": len(results), "handled": sum(r["handled"] for r in results.values()), "cases": results}


def _manifest(folder: Path, body: str, header: str = "path,label") -> Path:
    make_tree(folder / "imgs", 6, seed=3000)
    path = folder / "m.csv"
    path.write_text(f"{header}\n{body}")
    return path


GOOD = "".join(f"imgs/class{i % 3}/img{i:03d}.png,c{i % 3}\n" for i in range(6))


def _cases(scope: dict) -> dict:
    """The case functions defined in a *_cases function, in definition order."""
    return {name: fn for name, fn in scope.items() if not name.startswith("_") and not isinstance(fn, type)
            and callable(fn) and getattr(fn, "__module__", None) == __name__}


def bad_input_cases(shared: dict) -> dict:
    import h5py
    import numpy as np

    def ragged(f):
        return clean_message(cli("extract", _manifest(f, "imgs/class0/img000.png,c0,x\n" + GOOD), *TINY,
                                 "--cache-dir", f / "c"), "m.csv:2")

    def blank_label(f):
        return ok_with(cli("extract", _manifest(f, GOOD + "imgs/class0/img000.png,  \n"), *TINY, "--cache-dir",
                           f / "c"), "m.csv:8: empty path or label")

    def duplicates(f):
        r = cli("extract", _manifest(f, GOOD + "imgs/class0/img000.png,c0\n"), *TINY, "--cache-dir", f / "c", "--json")
        return r.exit_code == 0 and json.loads(r.stdout)["dataset"]["images"] == 6 and "already listed" in r.stdout, \
            "6 images, duplicate named"

    def missing_column(f):
        return clean_message(cli("extract", _manifest(f, GOOD, "path,class"), *TINY, "--cache-dir", f / "c"),
                             "missing column")

    def not_utf8_manifest(f):
        m = f / "m.csv"
        m.write_bytes(b"path,label\n\xff\xfe.png,a\n")
        return clean_message(cli("extract", m, *TINY, "--cache-dir", f / "c"), "cannot be read as CSV")

    def empty_manifest(f):
        m = f / "m.csv"
        m.write_text("")
        return clean_message(cli("extract", m, *TINY, "--cache-dir", f / "c"), "m.csv")

    def unknown_split(f):
        return clean_message(cli("extract", _manifest(f, "imgs/class0/img000.png,c0,holdout\n", "path,label,split"),
                                 *TINY, "--cache-dir", f / "c"), "unknown split")

    def all_missing(f):
        return clean_message(cli("extract", _manifest(f, "nope.png,a\nnada.png,b\n"), *TINY, "--cache-dir",
                                 f / "c"), "no images found")

    def bad_image_files(f):
        data = make_tree(f / "d", 6, seed=3100)
        (data / "class0" / "empty.png").write_bytes(b"")
        (data / "class1" / "text.png").write_text("hello")
        png = (data / "class2" / "img002.png").read_bytes()
        (data / "class2" / "cut.png").write_bytes(png[: len(png) // 2])
        (data / "class0" / "folder.png").mkdir()
        r = cli("extract", data, *TINY, "--cache-dir", f / "c", "--json")
        out = json.loads(r.stdout) if r.exit_code == 0 else {}
        return r.exit_code == 0 and len(out["failed"]) == 3 and out["extracted"] == 6, f"{len(out.get('failed', []))} failed rows"

    def non_utf8_name(f):
        data = make_tree(f / "d", 6, seed=3200)
        with open(os.fsencode(data / "class0") + b"/\xff.png", "wb") as h:
            h.write(b"x")
        return ok_with(cli("extract", data, *TINY, "--cache-dir", f / "c"), "not valid UTF-8")

    def one_class(f):
        data = f / "d"
        make_tree(data, 3, seed=3300)
        shutil.rmtree(data / "class1")
        shutil.rmtree(data / "class2")
        return clean_message(cli("extract", data, *TINY, "--cache-dir", f / "c"), "only one class")

    def mixed_layout(f):
        data = make_tree(f / "d", 6, seed=3400)
        (data / "train").mkdir()
        return clean_message(cli("extract", data, *TINY, "--cache-dir", f / "c"), "mixes split folders")

    def damaged_hash_cache(f):
        data = make_tree(f / "d", 6, seed=3500)
        (f / "c").mkdir()
        (f / "c" / "hashes.sqlite").write_bytes(b"garbage" * 500)
        return ok_with(cli("extract", data, *TINY, "--cache-dir", f / "c"), "was damaged", "rebuilt")

    def _extracted(f, seed):
        data = make_tree(f / "d", 6, seed=seed)
        cli("extract", data, *TINY, "--cache-dir", f / "c")
        store = next((f / "c" / "features").iterdir())
        return data, store

    def garbage_spec(f):
        data, store = _extracted(f, 3600)
        (store / "spec.json").write_bytes(b"\x00\x01")
        r = cli("cache", "verify", "--cache-dir", f / "c")
        again = cli("extract", data, *TINY, "--cache-dir", f / "c", "--json")
        return r.exit_code == 0 and json.loads(again.stdout)["reused"] == 6, "rebuilt from shards, rows kept"

    def edited_spec(f):
        _, store = _extracted(f, 3700)
        spec = json.loads((store / "spec.json").read_text())
        (store / "spec.json").write_text(json.dumps({**spec, "feature_dim": 7}))
        caught = clean_message(cli("cache", "verify", "--cache-dir", f / "c"), "feature_dim")
        fixed = cli("cache", "verify", "--repair", "--cache-dir", f / "c").exit_code == 0 and \
            cli("cache", "verify", "--cache-dir", f / "c").exit_code == 0
        return caught[0] and fixed, caught[1]

    def flipped_shard(f):
        data, store = _extracted(f, 3800)
        shard = next((store / "shards").glob("*.h5"))
        with h5py.File(shard, "a") as h:
            h["features"][0, 0] += 1.0
        caught = clean_message(cli("cache", "verify", "--cache-dir", f / "c"), "does not match its checksum",
                               "verify --repair")
        repaired = cli("cache", "verify", "--repair", "--cache-dir", f / "c").exit_code == 0
        again = cli("extract", data, *TINY, "--cache-dir", f / "c", "--json")
        return caught[0] and repaired and json.loads(again.stdout)["extracted"] == 6, caught[1]

    def truncated_shard(f):
        data, store = _extracted(f, 3900)
        shard = next((store / "shards").glob("*.h5"))
        shard.write_bytes(shard.read_bytes()[:500])
        return clean_message(cli("extract", data, *TINY, "--cache-dir", f / "c"), "verify --repair")

    def damaged_failed_json(f):
        data, store = _extracted(f, 4000)
        (store / "failed.json").write_text("{")
        return ok_with(cli("extract", data, *TINY, "--cache-dir", f / "c"), "0 extracted")

    def run_dir_users_folder(f):
        mine = f / "mine"
        mine.mkdir()
        (mine / "config.json").write_text("{}")
        r = cli("evaluate", make_tree(f / "d", 6, seed=4100), *TINY, "--cache-dir", f / "c", "--run-dir", mine)
        ok, detail = clean_message(r, "--overwrite")
        return ok and (mine / "config.json").read_text() == "{}", detail

    def export_out_users_folder(f):
        out = f / "out"
        (out / "saved_model").mkdir(parents=True)
        r = cli("export", shared["run"], "--format", "savedmodel", "--out", out)
        return clean_message(r, "not a featurepipe export")

    def predict_out_folder(f):
        r = cli("predict", shared["run"], shared["image"], "--out", f)
        ok, detail = clean_message(r, "is a folder")
        return ok and list(f.iterdir()) == [], detail

    def bad_grid(f):
        return clean_message(cli("evaluate", make_tree(f / "d", 6, seed=4200), *TINY, "--cache-dir", f / "c",
                                 "--grid", "{not json"), "--grid")

    def same_size_same_mtime(f):
        from PIL import Image

        data = make_tree(f / "d", 6, seed=4300)
        target = data / "class0" / "raw.bmp"       # BMP: no checksum, so a flipped pixel is still an image
        Image.new("RGB", (40, 40), (200, 10, 10)).save(target)
        cli("extract", data, *TINY, "--cache-dir", f / "c")
        st = target.stat()
        raw = bytearray(target.read_bytes())
        raw[-30] ^= 0xFF
        target.write_bytes(bytes(raw))
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))   # `touch -d` the old time back
        r = cli("extract", data, *TINY, "--cache-dir", f / "c", "--json")
        return r.exit_code == 0 and json.loads(r.stdout)["extracted"] == 1, "the rewritten file is extracted again"

    def missing_for_a_moment(f):
        from featurepipe.backbones.spec import BackboneSpec
        from featurepipe.data.dataset import scan
        from featurepipe.extraction.extract import extract

        spec = BackboneSpec(name="tiny", weights="random", image_size=32)
        data = make_tree(f / "d", 6, seed=4400)
        dataset = scan(data, cache_dir=f / "c")
        target = data / "class0" / "img000.png"
        target.rename(f / "aside.png")
        extract(dataset, spec, f / "c")
        (f / "aside.png").rename(target)
        again = extract(scan(data, cache_dir=f / "c"), spec, f / "c")
        return again.extracted == 1 and not again.failed, "retried and extracted on the next run"

    def disk_full_extract(f):
        from featurepipe.store import featurestore as store

        data = make_tree(f / "d", 6, seed=4500)
        real = store.h5py.File

        def full(path, mode="r", *a, **k):
            if mode == "w":
                raise OSError(28, "No space left on device")
            return real(path, mode, *a, **k)

        store.h5py.File = full
        try:
            return clean_message(cli("extract", data, *TINY, "--cache-dir", f / "c"), "no space left")
        finally:
            store.h5py.File = real

    def disk_full_weights(f):
        import h5py as h5

        from featurepipe.backbones.build import build_feature_model
        from featurepipe.backbones.spec import BackboneSpec
        from featurepipe.core.errors import DiskFullError

        real = h5.File

        def full(*a, **k):
            raise OSError(28, "No space left on device")

        h5.File = full
        try:
            build_feature_model(BackboneSpec(name="efficientnet_lite0"), f / "c")
            return False, "no error"
        except DiskFullError as error:
            return "could not be downloaded" not in str(error), str(error)[:200]
        finally:
            h5.File = real

    def stale_weights_temp(f):
        from featurepipe.backbones.efficientnet_lite import remove_stale_temps

        dest = f / "efficientnet_lite0-x.weights.h5"
        stale = f / f".{dest.name}.999999999-dead.tmp"
        stale.write_bytes(b"half")
        remove_stale_temps(dest)
        return not stale.exists(), "the killed conversion's temp file is removed by the next one"

    def json_nan(f):
        data = f / "d"
        from tests.conftest import COLOURS, make_image

        for c, (name, colour) in enumerate(COLOURS.items()):
            for i in range(6):
                make_image(data / "train" / name / f"{i}.png", colour, seed=4600 + 10 * c + i)
        for i in range(2):
            make_image(data / "test" / "red" / f"t{i}.png", COLOURS["red"], seed=4700 + i)
            make_image(data / "test" / "green" / f"t{i}.png", COLOURS["green"], seed=4800 + i)
        r = cli("evaluate", data, *TINY, "--heads", "logreg", "--folds", "2", "--jobs", "1", "--cache-dir", f / "c",
                "--json")
        try:
            json.loads(r.stdout, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
            return r.exit_code == 0, "strict JSON (null for NaN)"
        except ValueError as error:
            return False, f"not strict JSON: {error}"

    def lock_waiter(f):
        from featurepipe.backbones.spec import BackboneSpec
        from featurepipe.data.dataset import scan
        from featurepipe.extraction.extract import extract, open_stores

        spec = BackboneSpec(name="tiny", weights="random", image_size=32)
        data = make_tree(f / "d", 6, seed=4900)
        dataset = scan(data, cache_dir=f / "c")
        done = {}
        store = open_stores(spec, f / "c").originals
        with store.writer() as holder:   # another process's writer: it stores every row while the extract waits
            t = threading.Thread(target=lambda: done.setdefault("r", extract(dataset, spec, f / "c", lock_timeout=60)))
            t.start()
            time.sleep(1)
            holder.add(dataset.frame["hash"].tolist(), np.ones((6, 24), dtype=np.float32))
        t.join(60)
        r = done["r"]
        return (r.extracted, r.reused, r.feature_dim) == (0, 6, 24), f"{r.extracted} extracted, {r.reused} reused, {r.feature_dim}-d"

    return _cases(locals())


def hostile_cases(shared: dict) -> dict:
    import joblib

    from featurepipe.core import trust
    from featurepipe.core.hashcache import file_sha256

    class Payload:
        def __init__(self, marker):
            self.marker = str(marker)

        def __reduce__(self):
            return (open, (self.marker, "w"))

    def _copy_run(f) -> Path:
        run = f / "run"
        shutil.copytree(shared["run"], run)
        return run

    def _point_head(run: Path, name: str, digest: str, sign: bool) -> None:
        meta = json.loads((run / "best_head.json").read_text())
        meta.update(file=name, sha256=digest, hmac=trust.sign(name, digest) if sign else meta["hmac"])
        (run / "best_head.json").write_text(json.dumps(meta))

    def _payload(path: Path, marker: Path) -> str:
        joblib.dump(Payload(marker), path)
        return file_sha256(path)

    def _predict_refused(run: Path, marker: Path, *phrases):
        ok, detail = clean_message(cli("predict", run, shared["image"]), *phrases)
        return ok and not marker.exists(), detail

    def fifo_in_data(f):
        data = make_tree(f / "d", 6, seed=5000)
        os.mkfifo(data / "class0" / "pipe.png")
        return ok_with(cli("extract", data, *TINY, "--cache-dir", f / "c"), "FIFO")

    def symlink_to_dev_zero(f):
        data = make_tree(f / "d", 6, seed=5100)
        (data / "class0" / "zero.png").symlink_to("/dev/zero")
        return ok_with(cli("extract", data, *TINY, "--cache-dir", f / "c"), "character device")

    def symlink_loop(f):
        data = make_tree(f / "d", 6, seed=5200)
        (data / "class0" / "loop.png").symlink_to(data / "class0" / "loop.png")
        return ok_with(cli("extract", data, *TINY, "--cache-dir", f / "c"), "loop.png")

    def fifo_given_to_predict(f):
        os.mkfifo(f / "pipe.png")
        r = cli("predict", shared["run"], f / "pipe.png", "--json")
        return r.exit_code == 0 and "FIFO" in r.stdout, "error row for the FIFO"

    def head_absolute_path(f):
        run, marker = _copy_run(f), f / "ran"
        _point_head(run, str(f / "evil.joblib"), _payload(f / "evil.joblib", marker), sign=True)
        return _predict_refused(run, marker, "not a relative path")

    def head_dotdot_path(f):
        run, marker = _copy_run(f), f / "ran"
        _point_head(run, "../evil.joblib", _payload(f / "evil.joblib", marker), sign=True)
        return _predict_refused(run, marker, "outside the run folder")

    def head_symlink_out(f):
        run, marker = _copy_run(f), f / "ran"
        digest = _payload(f / "evil.joblib", marker)
        (run / "link.joblib").symlink_to(f / "evil.joblib")
        _point_head(run, "link.joblib", digest, sign=True)
        return _predict_refused(run, marker, "outside the run folder")

    def head_replaced_sha_edited(f):
        run, marker = _copy_run(f), f / "ran"
        _point_head(run, "best_head.joblib", _payload(run / "best_head.joblib", marker), sign=False)
        return _predict_refused(run, marker, "--trust")

    def run_from_another_user(f):
        run, marker = _copy_run(f), f / "ran"
        previous = os.environ.get(trust.KEY_ENV)
        os.environ[trust.KEY_ENV] = str(f / "other-key")
        try:
            _point_head(run, "best_head.joblib", _payload(run / "best_head.joblib", marker), sign=True)
        finally:
            if previous is None:
                os.environ.pop(trust.KEY_ENV)
            else:
                os.environ[trust.KEY_ENV] = previous
        return _predict_refused(run, marker, "--trust")

    def run_pointing_at_its_own_cache_key(f):
        # config.json names a cache root the attacker controls; the key is per user, not per cache.
        run, marker = _copy_run(f), f / "ran"
        config = json.loads((run / "config.json").read_text())
        config["cache_dir"] = str(f / "evil-cache")
        (run / "config.json").write_text(json.dumps(config))
        _point_head(run, "best_head.joblib", _payload(run / "best_head.joblib", marker), sign=False)
        return _predict_refused(run, marker, "--trust")

    def keras_head_with_lambda(f):
        import keras

        run = _copy_run(f)
        inputs = keras.Input((24,))
        keras.Model(inputs, keras.layers.Lambda(lambda x: x)(inputs)).save(run / "best_head.keras")
        digest = file_sha256(run / "best_head.keras")
        _point_head(run, "best_head.keras", digest, sign=True)
        return clean_message(cli("predict", run, shared["image"]), "safe_mode")

    def export_of_tampered_run(f):
        run, marker = _copy_run(f), f / "ran"
        _point_head(run, "best_head.joblib", _payload(run / "best_head.joblib", marker), sign=False)
        ok, detail = clean_message(cli("export", run, "--out", f / "out"), "--trust")
        return ok and not marker.exists(), detail

    def model_json_escape(f):
        run = _copy_run(f)
        (f / "m.keras").write_bytes(b"x")
        (run / "model.json").write_text(json.dumps({"kind": "finetuned", "file": "../m.keras",
                                                    "sha256": file_sha256(f / "m.keras"), "classes": ["a", "b", "c"],
                                                    "image_size": 32, "resize": "squash"}))
        return clean_message(cli("predict", run, shared["image"]), "outside the run folder")

    def manifest_reads_etc_passwd(f):
        return clean_message(cli("extract", _manifest(f, GOOD + "/etc/passwd,c0\n"), *TINY, "--cache-dir", f / "c"),
                             "outside the manifest's folder")

    def manifest_dotdot(f):
        return clean_message(cli("extract", _manifest(f, GOOD + "../../../etc/hostname,c0\n"), *TINY, "--cache-dir",
                                 f / "c"), "outside the manifest's folder")

    def decompression_bomb(f):
        from PIL import Image

        data = make_tree(f / "d", 6, seed=5300)
        Image.new("1", (30000, 30000)).save(data / "class0" / "bomb.png", optimize=True)
        r = cli("extract", data, *TINY, "--cache-dir", f / "c", "--json")
        out = json.loads(r.stdout) if r.exit_code == 0 else {}
        return r.exit_code == 0 and len(out["failed"]) == 1, (out.get("failed") or [{}])[0].get("reason", r.stderr)[:200]

    def export_out_is_symlink_to_users_folder(f):
        mine = f / "mine"
        (mine / "saved_model").mkdir(parents=True)
        (f / "out").symlink_to(mine)
        return clean_message(cli("export", shared["run"], "--format", "savedmodel", "--out", f / "out"),
                             "not a featurepipe export")

    return _cases(locals())


def shared_run(work: Path) -> dict:
    from featurepipe.backbones.spec import BackboneSpec
    from featurepipe.data.dataset import scan
    from featurepipe.evaluation.config import SearchConfig
    from featurepipe.evaluation.evaluate import evaluate

    data = make_tree(work / "data", 9, seed=6000)
    spec = BackboneSpec(name="tiny", weights="random", image_size=32)
    evaluate(scan(data, cache_dir=work / "cache"), SearchConfig(specs=(spec,), heads=("logreg",), folds=2),
             work / "cache", run_dir=work / "run", n_jobs=1)
    return {"run": work / "run", "image": data / "class0" / "img000.png"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer kill points and gc tries")
    parser.add_argument("--json", type=Path, help="also write the full results here")
    args = parser.parse_args()
    import tests.tiny_backbone  # noqa: F401

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="featurepipe-probe-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("FEATUREPIPE_KEY_FILE", str(work / "key" / "trust.key"))
        shared = shared_run(work / "shared")
        results = {
            "bad_inputs": run_cases(bad_input_cases(shared), work / "bad"),
            "hostile_files": run_cases(hostile_cases(shared), work / "hostile"),
            "gc_race": probe_gc_race(work / "gc", 2 if args.quick else 3),
            "extract_kills": probe_extract_kills(work / "extract", 12 if args.quick else 40),
            "evaluate_kills": probe_evaluate_kills(work / "evaluate", 6 if args.quick else 12),
        }
    summary = {
        "extract kill points survived / tried": f"{results['extract_kills']['survived']} / {results['extract_kills']['tried']}",
        "evaluate kill points survived / tried": f"{results['evaluate_kills']['survived']} / {results['evaluate_kills']['tried']}",
        "bad inputs handled / tried": f"{results['bad_inputs']['handled']} / {results['bad_inputs']['tried']}",
        "hostile files refused / tried": f"{results['hostile_files']['handled']} / {results['hostile_files']['tried']}",
        "rows lost": results["extract_kills"]["rows_lost"] + results["gc_race"]["rows_lost"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, **results}, indent=2, default=str))
    failures = {section: [c for c, r in results[section]["cases"].items() if not r["handled"]]
                for section in ("bad_inputs", "hostile_files")}
    failures["extract_kills"] = [c for c in results["extract_kills"]["cases"] if not c["survived"]]
    failures["evaluate_kills"] = [c for c in results["evaluate_kills"]["cases"] if not c["survived"]]
    print(json.dumps({"summary": summary, "not_survived": failures}, indent=2, default=str))


if __name__ == "__main__":
    main()
