"""Adversarial probe of featurepipe's guarantees, counted (issues 12 and 24). Not a test: it prints figures.

    python benchmarks/reliability_probe.py [--quick] [--json results.json] [--sections S,...] [--families F,...]

1. kill -9 points during `extract` and `evaluate`: a child process runs the stage with hooks on
   every os.replace / os.fsync / Path.unlink / shard write / compaction / CSV write / progress
   event, and SIGKILLs itself just before or just after the K-th one. After each kill the store must
   open, `verify` clean, the re-run must finish, and the results (features, leaderboard) must equal
   an uninterrupted run's; every row committed before the kill must still be there ("rows lost").
2. `cache gc` racing `extract` of a second dataset, several tries: rows lost must be 0.
3. bad inputs: each must end in a clear one-line message or a correct result with a warning
   (no traceback, no hang), through the CLI.
4. hostile files: each must be refused or skipped (no hang, no code run, nothing read outside).
5. round three (`--sections round3`; issue 24), one family per function, each case HELD or not:
   concurrency with rewrites (photos rewritten after the scan and after the first shard is committed,
   checked row by row against a clean cache; two `run`s started at the same instant; two `finetune`s
   of one run), signing of metadata (edited classes, config.json's cache_dir, model.json, vote
   members: predict must refuse), write confinement (report/, inspect/, finetune/ linked to a user's
   folder: nothing there may change), fuzzed shard bytes (40 offsets, a quarter in the `keys`
   dataset and a quarter in the key strings it points to: `cache ls|verify|verify --repair|extract`
   without a traceback, repair then re-extract), disk full at every sqlite write (sqlite3.connect
   wrapped in a child so no database can grow: one line saying the disk is full and where), console
   markup in names (`blue[`, `x].png`, `x[/y]`, `nope[/x]`) and the issue's low items, one case each.
   A read-only cache root cannot be simulated as root (chmod is ignored); the output says so.
   The tried/held table is printed as markdown at the end. `--families` picks some by name.

`--sections` picks sections (bad_inputs, hostile_files, gc_race, extract_kills, evaluate_kills,
round3, or `earlier` for the first five; default all). Everything uses the tiny random backbone of
the tests (no downloads); everything lives in a temporary folder. Prints one JSON object with the
counts and each case's outcome.
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
        if sign and "signature" in meta:
            # A signed head record covers the whole best_head.json: sign it as featurepipe would, so that
            # the check behind the signature (safe_mode, the confinement) is what answers.
            meta = trust.with_record_signature("best_head.json", meta)
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
        # its only input failed: exit 1 (every input failed), the FIFO named, nothing read or hung
        return r.exit_code == 1 and "FIFO" in r.stdout + r.stderr, "error row for the FIFO, exit 1"

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
        meta = {"kind": "finetuned", "file": "../m.keras", "sha256": file_sha256(f / "m.keras"),
                "classes": ["a", "b", "c"], "image_size": 32, "resize": "squash"}
        # signed with the user's own key, so that the confinement check is what answers
        (run / "model.json").write_text(json.dumps(trust.with_record_signature("model.json", meta)))
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


# ------------------------------------------------------------------------------------------ round three
# The families of the reliability issue, round three (issue 24). Each family is one function returning
# {"tried", "held", "cases": {name: {"held", "detail"}}}; a case that does not hold is counted, never a
# crash of the probe. Commands run through the real CLI: in this process (CliRunner) where only the
# output matters, in a child process where the attack needs timing or a hook inside the command.

R3_CASE_SECONDS = 300
CLI_CHILD = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, os.environ["PROBE_REPO"])
    import tests.tiny_backbone
    exec(os.environ.get("PROBE_PRELUDE", ""))
    from featurepipe.cli import main
    sys.argv[0] = "featurepipe"
    main()
""")


def cli_child(*args, prelude: str = "", env: dict | None = None, cwd: Path | None = None, timeout: int = 240,
              popen: bool = False):
    """The CLI in a child process, `prelude` (Python) run first; a CompletedProcess (rc -9 on timeout)."""
    child_env = {**_env(), "PROBE_REPO": str(REPO), "PROBE_PRELUDE": textwrap.dedent(prelude), **(env or {})}
    command = [sys.executable, "-c", CLI_CHILD, *[str(a) for a in args]]
    if popen:
        return subprocess.Popen(command, env=child_env, cwd=cwd or REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        return subprocess.run(command, env=child_env, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        return subprocess.CompletedProcess(command, -9, error.stdout or "", f"{error.stderr or ''}\n(timed out)")


def _text(result) -> str:
    if isinstance(result, subprocess.CompletedProcess):
        return (result.stdout or "") + (result.stderr or "")
    return result.stdout + result.stderr


def _rc(result) -> int:
    return result.returncode if isinstance(result, subprocess.CompletedProcess) else result.exit_code


def crashed(result) -> bool:
    """A traceback: printed (child) or an exception other than SystemExit escaping the command (CliRunner)."""
    if "Traceback" in _text(result):
        return True
    if isinstance(result, subprocess.CompletedProcess):
        return result.returncode not in (0, 1, 2, 130)
    return result.exception is not None and not isinstance(result.exception, SystemExit)


def _last(result, n: int = 240) -> str:
    if not isinstance(result, subprocess.CompletedProcess) and crashed(result):
        return f"rc {_rc(result)}: {type(result.exception).__name__}: {str(result.exception)[:n]}"
    lines = [line for line in _text(result).strip().splitlines() if line.strip()]
    return f"rc {_rc(result)}: " + (lines[-1][:n] if lines else "(no output)")


def snapshot(folder: Path) -> dict:
    """Names, bytes and mtimes of everything under `folder` (links not followed)."""
    import hashlib

    out = {}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            out[str(path.relative_to(folder))] = ("link", os.readlink(path), st.st_mtime_ns)
        elif path.is_file():
            out[str(path.relative_to(folder))] = (hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns)
        else:
            out[str(path.relative_to(folder)) + "/"] = ("dir",)
    return out


def run_held(cases: dict, work: Path, seconds: int = R3_CASE_SECONDS) -> dict:
    """Like run_cases, but the outcome is `held`, each case is bounded by SIGALRM and its folder removed."""
    results = {}
    for name, case in cases.items():
        folder = work / name
        folder.mkdir(parents=True)
        started = time.perf_counter()
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(seconds)
        try:
            held, detail = case(folder)
        except Timeout:
            held, detail = False, f"hung (no answer in {seconds} s)"
        except Exception as error:
            held, detail = False, "probe could not finish the case: " + "".join(
                traceback.format_exception_only(error)).strip()[:300]
        finally:
            signal.alarm(0)
            shutil.rmtree(folder, ignore_errors=True)
        results[name] = {"held": bool(held), "detail": str(detail)[:600],
                         "seconds": round(time.perf_counter() - started, 1)}
    return {"tried": len(results), "held": sum(r["held"] for r in results.values()), "cases": results}


def _colour_tree(root: Path, per_class: int, seed: int, classes=("red", "green", "blue")) -> Path:
    from tests.conftest import COLOURS, make_image

    for c, name in enumerate(classes):
        colour = COLOURS[name] if name in COLOURS else list(COLOURS.values())[c % len(COLOURS)]
        for i in range(per_class):
            make_image(root / name / f"{name}{i:02d}.png", colour, seed=seed + 100 * c + i)
    return root


def _store_rows(spec, cache: Path) -> dict:
    from featurepipe.extraction.extract import open_stores

    store = open_stores(spec, cache).originals
    keys = sorted(store.keys())
    return dict(zip(keys, store.read(keys))) if keys else {}


def _tiny_spec(resize: str = "squash"):
    from featurepipe.backbones.spec import BackboneSpec

    return BackboneSpec(name="tiny", weights="random", image_size=32, resize=resize).resolved()


# ---- 1. concurrency with rewrites


REWRITE_AFTER_SCAN = """
    import json, os
    from featurepipe.extraction import extract as _m
    _swaps, _real = json.loads(os.environ["SWAPS"]), _m.extract
    def _rewritten(*a, **k):
        for target, source in _swaps:
            info = os.stat(target)
            with open(source, "rb") as f, open(target, "wb") as g:
                g.write(f.read())
            os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
        return _real(*a, **k)
    _m.extract = _rewritten
"""

REWRITE_MID_EXTRACT = """
    import json, os
    from featurepipe.store import featurestore as _fs
    _swaps, _real, _done = json.loads(os.environ["SWAPS"]), _fs.FeatureStore._write_shard, []
    def _write_then_rewrite(self, *a, **k):
        out = _real(self, *a, **k)
        if not _done:                      # the first shard is committed: now the photos change
            _done.append(1)
            for target, source in _swaps:
                info = os.stat(target)
                with open(source, "rb") as f, open(target, "wb") as g:
                    g.write(f.read())
                os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
        return out
    _fs.FeatureStore._write_shard = _write_then_rewrite
"""

SAME_MOMENT = """
    import time
    import tensorflow, pandas, sklearn                       # the slow imports done before the start line
    import featurepipe.pipeline, featurepipe.cli.run         # noqa
    time.sleep(max(0.0, float(os.environ["START_AT"]) - time.time()))
"""


def concurrency_cases(shared: dict) -> dict:
    import numpy as np

    from featurepipe.data.dataset import scan
    from featurepipe.extraction.extract import extract

    def _rewrite_attack(f, prelude: str, batch: list[str]):
        spec = _tiny_spec()
        data = _colour_tree(f / "d", 20, seed=7000, classes=("red", "blue"))
        # the blue photos are overwritten with red photos' bytes (last in the scan's order, so that
        # the mid-extract rewrite lands after the first shard)
        targets = sorted((data / "blue").iterdir())[-5:]
        swaps = [[str(t), str(data / "red" / f"red{i:02d}.png")] for i, t in enumerate(targets)]
        clean_data = f / "clean-d"
        shutil.copytree(data, clean_data)
        extract(scan(clean_data, cache_dir=f / "clean"), spec, f / "clean")
        clean = _store_rows(spec, f / "clean")
        from featurepipe.core.hashcache import file_sha256

        old_hash = {Path(t).name: file_sha256(t) for t, _ in swaps}
        r = cli_child("extract", data, *TINY, "--cache-dir", f / "c", "--json", *batch,
                      env={"SWAPS": json.dumps(swaps)}, prelude=prelude)
        if crashed(r) or r.returncode != 0:
            return False, _last(r)
        got = _store_rows(spec, f / "c")
        wrong = [k for k, v in got.items() if k not in clean or not np.allclose(v, clean[k], rtol=0, atol=1e-5)]
        out = json.loads(r.stdout)
        reported = {Path(x["path"]).name for x in out.get("failed", [])}
        # a rewritten photo is either reported, or was read before the rewrite: then its row is its own
        unreported = sorted(n for n, h in old_hash.items() if n not in reported and h not in got)
        return (not wrong and not unreported,
                f"{len(wrong)} of {len(got)} rows differ from a clean cache's; rewritten files not reported: "
                f"{unreported or 'none'}")

    def rewrite_after_scan(f):
        return _rewrite_attack(f, REWRITE_AFTER_SCAN, [])

    def rewrite_mid_extract(f):
        return _rewrite_attack(f, REWRITE_MID_EXTRACT, ["--batch-size", "2"])

    def two_runs_same_moment(f):
        # Both children import everything, then wait for the same instant just after a whole second; the
        # run folder is named mid-run, so a try may still straddle a second: up to 3 tries.
        data = make_tree(f / "d", 9, seed=7100)
        extract(scan(data, cache_dir=f / "c"), _tiny_spec(), f / "c")   # both runs then only reuse features
        detail = ""
        for attempt in range(3):
            start = str(int(time.time()) + 26 + 0.02)
            kids = [cli_child("run", data, *TINY, "--resize", "squash", "--heads", head, "--no-nested", "--folds",
                              "2", "--seed", seed, "--jobs", "1", "--cache-dir", f / "c", "--json",
                              prelude=SAME_MOMENT, env={"START_AT": start}, popen=True)
                    for head, seed in (("logreg", "1"), ("knn", "2"))]
            outs = []
            for kid in kids:
                try:
                    out, err = kid.communicate(timeout=200)
                except subprocess.TimeoutExpired:
                    kid.kill()
                    out, err = kid.communicate()
                outs.append(subprocess.CompletedProcess(kid.args, kid.returncode, out, err))
            if any(crashed(o) or o.returncode != 0 for o in outs):
                return False, " | ".join(_last(o) for o in outs)
            dirs = [Path(json.loads(o.stdout)["run_dir"]) for o in outs]
            own = []
            for d, (head, seed) in zip(dirs, (("logreg", 1), ("knn", 2))):
                config = json.loads((d / "config.json").read_text())
                meta = json.loads((d / "best_head.json").read_text())
                own.append(meta.get("head") == head and f'"seed": {seed}' in json.dumps(config))
            same_second = dirs[0].name[:15] == dirs[1].name[:15]
            detail = f"run folders {[d.name for d in dirs]}; each its own: {own}"
            if same_second or dirs[0] == dirs[1]:
                return dirs[0] != dirs[1] and all(own), f"{detail} (named in the same second, try {attempt + 1})"
        return dirs[0] != dirs[1] and all(own), f"{detail} (inconclusive: never named in the same second in 3 tries)"

    def two_finetunes_of_one_run(f):
        # the race is a matter of timing: 3 tries, held only if every one is refused or consistent
        details = []
        for attempt in range(3):
            held, detail = _two_finetunes(f / f"try{attempt}")
            details.append(f"try {attempt + 1}: {detail}")
            if not held:
                return False, " | ".join(details)
        return True, " | ".join(details)

    def _two_finetunes(f):
        # started at the same instant: one keeps its model (--strategy head publishes model.json), the
        # other trains a block and keeps the frozen head (and removes model.json) -- without a lock
        # their files interleave
        from featurepipe.core.hashcache import file_sha256

        run = f / "run"
        shutil.copytree(shared["run"], run)
        start = str(time.time() + 15)
        options = (["--strategy", "head"], ["--strategy", "top-blocks", "--epochs", "1"])
        kids = [cli_child("finetune", run, "--batch-size", "2", "--no-reuse", "--json", *extra,
                          prelude=SAME_MOMENT.replace("featurepipe.pipeline, featurepipe.cli.run",
                                                      "featurepipe.training.finetune, featurepipe.cli.finetune"),
                          env={"START_AT": start}, popen=True) for extra in options]
        outs = []
        for kid in kids:
            try:
                out, err = kid.communicate(timeout=200)
            except subprocess.TimeoutExpired:
                kid.kill()
                out, err = kid.communicate()
            outs.append(subprocess.CompletedProcess(kid.args, kid.returncode, out, err))
        if any(crashed(o) for o in outs):
            return False, " | ".join(_last(o) for o in outs)
        refused = [o for o in outs if o.returncode != 0]
        if len(refused) == 1:
            text = _text(refused[0]).lower()
            return any(w in text for w in ("another", "lock", "running", "busy", "wait")), _last(refused[0])
        if refused:
            return False, " | ".join(_last(o) for o in outs)
        summary = json.loads((run / "finetune" / "summary.json").read_text())
        state = json.loads((run / "finetune" / "state.json").read_text())
        model = json.loads((run / "model.json").read_text()) if (run / "model.json").exists() else None
        problems = []
        if (summary.get("kept") == "finetuned") != (model is not None):
            problems.append(f"summary.json keeps {summary.get('kept')} but model.json "
                            f"{'names a fine-tuned model' if model else 'is absent'}")
        if model is not None:
            sha = file_sha256(run / model["file"]) if (run / model["file"]).exists() else "missing"
            if sha != model.get("sha256"):
                problems.append(f"model.json's sha256 {model.get('sha256', '')[:12]} is not its file's {sha[:12]}")
            if (summary.get("model_json") or {}).get("sha256") != model.get("sha256"):
                problems.append("summary.json names another model than model.json")
        if state.get("key") != summary.get("key"):
            problems.append("state.json and summary.json are of different fine-tunings")
        return not problems, "both finished; " + ("; ".join(problems) or "summary, state and model.json agree")

    return _cases(locals())


# ---- 2. signing of metadata


def _refused_edit(result) -> tuple[bool, str]:
    text = _text(result).lower()
    return (_rc(result) not in (0,) and not crashed(result) and ("edited" in text or "--trust" in text)), _last(result)


def signing_cases(shared: dict) -> dict:
    import numpy as np

    from featurepipe.data.dataset import scan
    from featurepipe.extraction.extract import open_stores

    def _copy(f, key: str = "run") -> Path:
        run = f / "run"
        shutil.copytree(shared[key], run, symlinks=True)
        return run

    def _predict(run: Path):
        r = cli("predict", run, shared["image"], "--json")
        held, detail = _refused_edit(r)
        if _rc(r) == 0:
            try:
                rows = json.loads(r.stdout)
                rows = rows["predictions"] if isinstance(rows, dict) else rows
                detail = (f"rc 0, no refusal; printed as the prediction for a {shared['image'].parent.name} photo: "
                          f"{rows[0].get('label')} ({rows[0].get('probability', 0):.3f})")
            except (ValueError, KeyError, TypeError, IndexError, AttributeError):
                detail = f"rc 0, no refusal; printed: {r.stdout[:200]}"
        elif not held:
            detail += " (refused, but not as an edited run)"
        return held, detail

    def head_classes_swapped(f):
        run = _copy(f)
        meta = json.loads((run / "best_head.json").read_text())
        meta["classes"][0], meta["classes"][1] = meta["classes"][1], meta["classes"][0]
        (run / "best_head.json").write_text(json.dumps(meta))
        return _predict(run)

    def config_cache_dir_forged(f):
        run = _copy(f)
        forged = f / "forged"
        dataset = scan(shared["data"], cache_dir=shared["cache"])
        frame = dataset.frame
        real = _store_rows(shared["spec"], shared["cache"])
        labels = sorted(frame["label"].unique())
        # every photo's row replaced by a row of the next class's photos: checksums recomputed by the writer
        donors = {lab: frame[frame["label"] == labels[(i + 1) % len(labels)]]["hash"].iloc[0]
                  for i, lab in enumerate(labels)}
        keys = frame["hash"].tolist()
        rows = np.stack([real[donors[lab]] for lab in frame["label"]])
        store = open_stores(shared["spec"], forged).originals
        with store.writer() as writer:
            writer.add(keys, rows)
        config = json.loads((run / "config.json").read_text())
        config["cache_dir"] = str(forged)
        (run / "config.json").write_text(json.dumps(config))
        return _predict(run)

    def finetuned_model_json_classes(f):
        run = _copy(f, "finetuned")
        meta = json.loads((run / "model.json").read_text())
        meta["classes"][0], meta["classes"][1] = meta["classes"][1], meta["classes"][0]
        (run / "model.json").write_text(json.dumps(meta))
        return _predict(run)

    def vote_member_classes_edited(f):
        # every member's classes swapped the same way (and the vote's), so no consistency check can tell
        run = _copy(f, "vote")
        for path in [run / "best_head.json", *sorted((run / "members").glob("*/best_head.json"))]:
            meta = json.loads(path.read_text())
            meta["classes"][0], meta["classes"][1] = meta["classes"][1], meta["classes"][0]
            path.write_text(json.dumps(meta))
        return _predict(run)

    def vote_member_resize_edited(f):
        run = _copy(f, "vote")
        member = run / "members" / "0" / "best_head.json"
        meta = json.loads(member.read_text())
        meta["backbone"]["resize"] = "letterbox" if meta["backbone"]["resize"] != "letterbox" else "squash"
        member.write_text(json.dumps(meta))
        return _predict(run)

    return _cases(locals())


# ---- 3. write confinement


def confinement_cases(shared: dict) -> dict:
    def _linked_run(f) -> tuple[Path, Path, dict]:
        run = f / "run"
        shutil.copytree(shared["run"], run, symlinks=True)
        mine = f / "mine"
        mine.mkdir()
        for name, body in (("folds.png", b"my own picture"), ("suspects.csv", b"mine,1\n"), ("notes.txt", b"keep")):
            (mine / name).write_bytes(body)
        for sub in ("report", "inspect", "finetune"):
            if (run / sub).is_symlink() or (run / sub).is_file():
                (run / sub).unlink()
            elif (run / sub).exists():
                shutil.rmtree(run / sub)
            (run / sub).symlink_to(mine, target_is_directory=True)
        return run, mine, snapshot(mine)

    def _untouched(r, mine: Path, before: dict) -> tuple[bool, str]:
        after = snapshot(mine)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        return not changed and not crashed(r), f"{_last(r, 160)}; changed in the user's folder: {changed[:8] or 'nothing'}"

    def report_through_links(f):
        run, mine, before = _linked_run(f)
        return _untouched(cli("report", run), mine, before)

    def inspect_through_links(f):
        run, mine, before = _linked_run(f)
        return _untouched(cli("inspect", shared["data"], "--run-dir", run, *TINY, "--resize", "squash", "--folds", "2",
                              "--jobs", "1", "--cache-dir", shared["cache"]), mine, before)

    def finetune_through_links(f):
        run, mine, before = _linked_run(f)
        return _untouched(cli("finetune", run, "--epochs", "1", "--batch-size", "2", "--no-reuse"), mine, before)

    return _cases(locals())


# ---- 4. fuzzed shard bytes


def fuzz_regions(shard: Path) -> dict:
    """Where a shard's key bytes are: the `keys` dataset's own bytes (h5py's .id.get_offset(); for
    variable-length strings these are references into the global heap) and the key strings in the heap
    (found by searching the file for each key)."""
    import h5py

    raw = shard.read_bytes()
    with h5py.File(shard, "r") as handle:
        start, length = handle["keys"].id.get_offset(), handle["keys"].id.get_storage_size()
        keys = [k.decode() if isinstance(k, bytes) else str(k) for k in handle["keys"][()]]
    strings = sorted(i for i in (raw.find(k.encode()) for k in keys) if i >= 0)
    return {"size": len(raw), "keys_dataset": [start, length] if start is not None else None,
            "key_strings": [[i, len(keys[0])] for i in strings]}


def fuzz_offsets(regions: dict, count: int) -> list[int]:
    """`count` offsets: a quarter in the `keys` dataset, a quarter in the key strings, the rest spread over
    the whole file."""
    size, quarter = regions["size"], max(1, count // 4)
    inside = []
    if regions["keys_dataset"]:
        start, length = regions["keys_dataset"]
        inside += [start + (i * length) // quarter + 1 for i in range(quarter)]
    strings = regions["key_strings"]
    inside += [strings[(i * len(strings)) // quarter][0] + (7 * i) % strings[0][1] for i in range(quarter)
               if strings]
    rest = count - len(inside)
    spread = [(i * size) // max(1, rest) + 7 for i in range(rest)]
    return sorted({min(size - 1, o) for o in inside + spread})


def _region_of(regions: dict, offset: int) -> str:
    if regions["keys_dataset"] and 0 <= offset - regions["keys_dataset"][0] < regions["keys_dataset"][1]:
        return "keys dataset"
    if any(0 <= offset - start < length for start, length in regions["key_strings"]):
        return "key string"
    return "other"


def fuzz_cases(shared: dict, count: int) -> tuple[dict, dict]:
    from featurepipe.data.dataset import scan
    from featurepipe.extraction.extract import extract, open_stores

    spec = _tiny_spec()
    base = shared["work"] / "fuzz-base"
    data = make_tree(base / "d", 12, seed=7300)
    extract(scan(data, cache_dir=base / "c"), spec, base / "c")
    store_dir = open_stores(spec, base / "c").originals.directory
    shard = sorted((store_dir / "shards").glob("*.h5"))[0]
    regions = fuzz_regions(shard)
    offsets = fuzz_offsets(regions, count)
    info = {"shard_bytes": regions["size"], "keys_dataset": regions["keys_dataset"],
            "key_strings_at": [start for start, _ in regions["key_strings"]], "offsets": offsets}

    def make(offset: int):
        def case(f):
            cache = f / "c"
            shutil.copytree(base / "c", cache)
            target = cache / shard.relative_to(base / "c")
            raw = bytearray(target.read_bytes())
            raw[offset] ^= 0xFF
            target.write_bytes(bytes(raw))
            steps = [("cache ls", cli("cache", "ls", "--cache-dir", cache)),
                     ("cache verify", cli("cache", "verify", "--cache-dir", cache)),
                     ("cache verify --repair", cli("cache", "verify", "--repair", "--cache-dir", cache))]
            for name, r in steps:
                if crashed(r):
                    return False, f"byte {offset} ({_region_of(regions, offset)}): {name} crashed: {_last(r)}"
            after = cli("cache", "verify", "--cache-dir", cache)
            if crashed(after) or after.exit_code != 0:
                return False, f"cache verify after --repair: {_last(after)}"
            try:
                kept = len(open_stores(spec, cache).originals.keys())
            except Exception as error:
                return False, f"store does not open after repair: {type(error).__name__}: {error}"[:300]
            again = cli("extract", data, *TINY, "--cache-dir", cache, "--json")
            if crashed(again) or again.exit_code != 0:
                return False, f"extract after repair: {_last(again)}"
            extracted = json.loads(again.stdout)["extracted"]
            final = cli("cache", "verify", "--cache-dir", cache)
            ok = extracted == 12 - kept and final.exit_code == 0 and not crashed(final)
            return ok, (f"byte {offset} ({_region_of(regions, offset)})"
                        f": {steps[1][1].exit_code}/{steps[2][1].exit_code} verify/repair rc, {kept} rows kept, "
                        f"{extracted} re-extracted")
        return case

    return {f"offset_{o:06d}": make(o) for o in offsets}, info


# ---- 5. disk full at every sqlite write


DISK_FULL = """
    import sqlite3
    _connect = sqlite3.connect
    def _full_connect(*a, **k):
        db = _connect(*a, **k)
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {max(1, pages)}")   # the database can no longer grow
        return db
    sqlite3.connect = _full_connect
"""


def disk_full_cases(shared: dict) -> tuple[dict, list]:
    from featurepipe.data.dataset import scan
    from featurepipe.extraction.extract import extract

    notes = []
    if os.geteuid() == 0:
        notes.append("read-only cache root not probed: this probe runs as root, for whom chmod does not stop writes")

    def _one_line_full(r, cache: Path) -> tuple[bool, str]:
        text = _text(r).replace(str(cache.parent), "CASE")     # no word of a path counts as "full"
        errors = [line for line in text.splitlines() if line.lower().startswith("error")]
        says = any(("full" in e.lower() or "no space" in e.lower()) and (str(cache) in e or "sqlite" in e)
                   for e in errors)
        if r.returncode == 0 and not crashed(r):
            # the work done without remembering: held only if a warning says the disk is full
            warned = [line for line in text.splitlines() if "full" in line.lower() or "no space" in line.lower()]
            return bool(warned), f"rc 0; warning: {warned[0][:240]}" if warned else "rc 0, no word of the full disk"
        return r.returncode == 1 and not crashed(r) and len(errors) == 1 and says, _last(r, 300)

    def _prepared(f, seed: int) -> tuple[Path, Path]:
        data = make_tree(f / "d", 9, seed=seed)
        extract(scan(data, cache_dir=f / "c"), _tiny_spec(), f / "c")   # hashes known; perceptual hashes not yet
        return data, f / "c"

    def scan_extract(f):
        data = make_tree(f / "d", 9, seed=7400)
        return _one_line_full(cli_child("extract", data, *TINY, "--cache-dir", f / "c", prelude=DISK_FULL), f / "c")

    def rescan_new_images(f):
        data, cache = _prepared(f, 7450)
        make_tree(data / "more", 90, seed=7460)   # 90 new files: remembering their hashes needs new pages
        return _one_line_full(cli_child("extract", data, *TINY, "--cache-dir", cache, prelude=DISK_FULL), cache)

    def evaluate_dedup(f):
        data, cache = _prepared(f, 7500)
        return _one_line_full(cli_child("evaluate", data, *TINY, "--heads", "logreg", "--folds", "2", "--jobs", "1",
                                        "--no-nested", "--cache-dir", cache, prelude=DISK_FULL), cache)

    def inspect_phash(f):
        data, cache = _prepared(f, 7600)
        return _one_line_full(cli_child("inspect", data, *TINY, "--folds", "2", "--jobs", "1", "--cache-dir", cache,
                                        prelude=DISK_FULL), cache)

    return _cases(locals()), notes


# ---- 6. console markup in names


def markup_cases(shared: dict) -> dict:
    def _data(f) -> Path:
        data = _colour_tree(f / "d", 4, seed=7700, classes=("red", "green", "blue["))
        (data / "blue[" / "x].png").write_bytes(b"not an image at all")
        return data

    def _manifest_labels(f) -> Path:
        data = _colour_tree(f / "m", 4, seed=7800)
        rows = [f"{p.relative_to(data)},{'x[/y]' if p.parent.name == 'red' else p.parent.name}"
                for p in sorted(data.rglob("*.png"))]
        (data / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
        return data / "m.csv"

    def _check(r, rc: int, *names) -> tuple[bool, str]:
        text = _text(r)
        missing = [n for n in names if n not in text]
        ok = _rc(r) == rc and not crashed(r) and not missing and "MarkupError" not in text
        return ok, _last(r, 200) + (f"; not printed verbatim: {missing}" if missing else "")

    def extract_folder(f):
        return _check(cli("extract", _data(f), *TINY, "--cache-dir", f / "c"), 0, "x].png")

    def extract_manifest_labels(f):
        return _check(cli("extract", _manifest_labels(f), *TINY, "--cache-dir", f / "c"), 0)

    def evaluate_folder(f):
        return _check(cli("evaluate", _data(f), *TINY, "--heads", "logreg", "--folds", "2", "--jobs", "1",
                          "--no-nested", "--cache-dir", f / "c", "--run-dir", f / "r"), 0)   # prints a count of failures, no names

    def evaluate_manifest_labels(f):
        return _check(cli("evaluate", _manifest_labels(f), *TINY, "--heads", "logreg", "--folds", "2", "--jobs", "1",
                          "--no-nested", "--cache-dir", f / "c", "--run-dir", f / "r"), 0)

    def run_folder(f):
        return _check(cli("run", _data(f), *TINY, "--resize", "squash", "--heads", "logreg", "--folds", "2", "--jobs",
                          "1", "--no-nested", "--cache-dir", f / "c", "--run-dir", f / "r"), 0)   # prints a count of failures, no names

    def predict_bad_file(f):
        data = _data(f)
        return _check(cli("predict", shared["run"], data / "blue[" / "x].png", data / "red" / "red00.png"), 0, "x].png")

    def inspect_manifest_labels(f):
        return _check(cli("inspect", _manifest_labels(f), *TINY, "--folds", "2", "--jobs", "1", "--cache-dir",
                          f / "c"), 0)

    def inspect_folder(f):
        return _check(cli("inspect", _data(f), *TINY, "--folds", "2", "--jobs", "1", "--cache-dir", f / "c"), 0)

    def cache_ls_after(f):
        data = _data(f)
        cli("extract", data, *TINY, "--cache-dir", f / "c")
        return _check(cli("cache", "ls", "--cache-dir", f / "c"), 0)

    def extract_missing_path_with_markup(f):
        # a DATA that does not exist is a data failure (exit 1) since the CLI's exit-code convention
        return _check(cli("extract", "nope[/x]", *TINY, "--cache-dir", f / "c"), 1, "nope[/x]")

    return _cases(locals())


# ---- 7. the low items


def low_item_cases(shared: dict) -> dict:
    import csv
    import io

    def _refused(r, option: str, seconds: float, limit: float) -> tuple[bool, str]:
        text = _text(r).lower()
        named = option.lower() in text or option.lstrip("-").replace("-", "_") in text
        ok = _rc(r) == 2 and not crashed(r) and named and seconds < limit
        return ok, f"{_last(r, 200)} ({seconds:.1f} s)"

    def _timed(*args):
        started = time.perf_counter()
        r = cli(*args)
        return r, time.perf_counter() - started

    def _data(f):
        return make_tree(f / "d", 9, seed=7900)

    def image_size_100000(f):
        # in a child with a 6 GiB address-space limit: accepted, it would try to allocate tens of GiB
        started = time.perf_counter()
        r = cli_child("extract", _data(f), "--backbone", "tiny", "--weights", "random", "--image-size", "100000",
                      "--cache-dir", f / "c", timeout=120,
                      prelude="import resource; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))")
        return _refused(r, "--image-size", time.perf_counter() - started, 30)

    def image_size_0(f):
        r, s = _timed("extract", _data(f), "--backbone", "tiny", "--weights", "random", "--image-size", "0",
                      "--cache-dir", f / "c")
        return _refused(r, "--image-size", s, 5)

    def augment_negative(f):
        r, s = _timed("evaluate", _data(f), *TINY, "--augment", "-2", "--heads", "logreg", "--folds", "2", "--jobs", "1",
                      "--cache-dir", f / "c", "--run-dir", f / "r")
        return _refused(r, "--augment", s, 5)

    def ensemble_negative(f):
        r, s = _timed("evaluate", _data(f), *TINY, "--ensemble", "-1", "--heads", "logreg", "--folds", "2", "--jobs",
                      "1", "--cache-dir", f / "c", "--run-dir", f / "r")
        return _refused(r, "--ensemble", s, 5)

    def lock_timeout_nan(f):
        r, s = _timed("extract", _data(f), *TINY, "--lock-timeout", "nan", "--cache-dir", f / "c")
        return _refused(r, "--lock-timeout", s, 5)

    def thumbnails_negative(f):
        run = f / "run"
        shutil.copytree(shared["run"], run)
        r, s = _timed("report", run, "--thumbnails", "-5")
        return _refused(r, "--thumbnails", s, 5)

    def dedup_cosine_nan(f):
        r, s = _timed("inspect", _data(f), *TINY, "--dedup-cosine", "nan", "--folds", "2", "--jobs", "1",
                      "--cache-dir", f / "c")
        return _refused(r, "--dedup-cosine", s, 5)

    def inspect_folds_0(f):
        r, s = _timed("inspect", _data(f), *TINY, "--folds", "0", "--jobs", "1", "--cache-dir", f / "c")
        return _refused(r, "--folds", s, 5)

    def gc_dry_run_changes_nothing(f):
        from featurepipe.data.dataset import scan
        from featurepipe.extraction.extract import extract

        first, second = make_tree(f / "a", 6, seed=8000), make_tree(f / "b", 6, seed=8100)
        for data in (first, second):
            extract(scan(data, cache_dir=f / "c"), _tiny_spec(), f / "c", batch_size=2)
        shutil.rmtree(first)                  # its rows are garbage now
        from featurepipe.extraction.extract import open_stores

        (open_stores(_tiny_spec(), f / "c").originals.directory / "shards" / ".tmp-dead.h5").write_bytes(b"half")
        before = snapshot(f / "c")
        r = cli("cache", "gc", "--dry-run", "--cache-dir", f / "c")
        after = snapshot(f / "c")
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        return r.exit_code == 0 and not changed, f"{_last(r, 160)}; changed: {changed[:6] or 'nothing'}"

    def run_dot_twice_in_data(f):
        data = _data(f)
        previous, cwd = os.environ.pop("FEATUREPIPE_CACHE", None), os.getcwd()
        try:
            os.chdir(data)
            outs = [cli("run", ".", *TINY, "--resize", "squash", "--heads", "logreg", "--folds", "2", "--jobs", "1",
                        "--no-nested", "--no-inspect", "--json") for _ in range(2)]
        finally:
            os.chdir(cwd)
            if previous is not None:
                os.environ["FEATUREPIPE_CACHE"] = previous
        if any(crashed(o) or o.exit_code != 0 for o in outs):
            return False, " | ".join(_last(o) for o in outs)
        classes = sorted(json.loads(outs[1].stdout)["dataset"]["classes"])
        return "cache" not in classes, f"second run's classes: {classes}"

    def csv_formula_injection(f):
        from tests.conftest import COLOURS, make_image

        data = make_tree(f / "d", 9, seed=8200)
        evil = ["=HYPERLINK(x)", "+cmd", "-cmd", "@cmd"]
        # labels that are formulas, and files named like formulas at the manifest's top level
        rows = [f"{p.relative_to(data)},{evil[int(p.parent.name[-1])]}" for p in sorted(data.rglob("*.png"))]
        for i, name in enumerate(evil):
            make_image(data / f"{name}.png", list(COLOURS.values())[i % 3], seed=8300 + i)
            rows.append(f"{name}.png,{evil[3]}")
        (data / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")   # relative paths, as written
        r1 = cli("evaluate", data / "m.csv", *TINY, "--heads", "logreg", "--folds", "2", "--jobs", "1", "--no-nested",
                 "--cache-dir", f / "c", "--run-dir", f / "r")
        r2 = cli("inspect", data / "m.csv", *TINY, "--run-dir", f / "r", "--folds", "2", "--jobs", "1", "--cache-dir",
                 f / "c")
        cwd = os.getcwd()
        try:
            os.chdir(data)
            r3 = cli("predict", f / "r", *sorted(str(p.relative_to(data)) for p in data.rglob("*.png")), "--out",
                     f / "p.csv")
        finally:
            os.chdir(cwd)
        if any(crashed(r) for r in (r1, r2, r3)):
            return False, " | ".join(_last(r) for r in (r1, r2, r3))
        bad, seen = [], 0
        for path in [f / "p.csv", f / "r" / "oof_predictions.csv", f / "r" / "inspect" / "suspects.csv"]:
            if not path.exists():
                continue
            for row in csv.reader(io.StringIO(path.read_text())):
                for cell in row:
                    if "cmd" in cell or "HYPERLINK" in cell:
                        seen += 1
                        if cell[:1] in "=+-@":
                            bad.append(f"{path.name}: {cell[:40]}")
        return seen > 0 and not bad, f"{seen} cells with the names or labels, {len(bad)} start with = + - @: {bad[:3]}"

    def newline_in_class_name(f):
        import pandas as pd

        data = _colour_tree(f / "d", 4, seed=8400, classes=("red", "green", "blue"))
        (data / "blue").rename(data / "blu\ne")
        r1 = cli("evaluate", data, *TINY, "--heads", "logreg", "--folds", "2", "--jobs", "1", "--no-nested",
                 "--cache-dir", f / "c", "--run-dir", f / "r")
        if not crashed(r1) and r1.exit_code == 1 and "control character" in _text(r1):
            return True, _last(r1)   # refused at scan, naming the character: nothing can be corrupted
        if crashed(r1) or r1.exit_code != 0:
            return False, _last(r1)
        r2 = cli("export", f / "r", "--out", f / "x")
        if crashed(r2) or r2.exit_code != 0:
            return False, "export: " + _last(r2)
        labels = [p for p in (f / "x").rglob("labels.txt")]
        lines = labels[0].read_text().splitlines() if labels else []
        oof = pd.read_csv(f / "r" / "oof_predictions.csv")
        cells = {str(v) for v in oof.astype(str).to_numpy().ravel()}
        broken = sorted(cells & {"blu", "e", "nan"})
        rows_ok = len(oof) % 12 == 0 and not broken
        return len(lines) == 3 and rows_ok, (f"labels.txt has {len(lines)} lines for 3 classes; oof_predictions.csv "
                                             f"{len(oof)} rows, split cells: {broken or 'none'}")

    def manifest_symlink_outside(f):
        from tests.conftest import make_image
        from featurepipe.core.hashcache import file_sha256

        data = make_tree(f / "m" / "imgs", 9, seed=8500)
        private = make_image(f / "private" / "secret.png", (255, 0, 255), seed=8600)
        (data / "class0" / "innocent.png").symlink_to(private)
        (data / "class1" / "shadow.png").symlink_to("/etc/shadow")
        rows = [f"imgs/{p.relative_to(data)},{p.parent.name}" for p in sorted(data.rglob("*.png"))]
        (f / "m" / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
        r = cli("run", f / "m" / "m.csv", *TINY, "--resize", "squash", "--heads", "logreg", "--folds", "2", "--jobs",
                "1", "--no-nested", "--cache-dir", f / "c", "--run-dir", f / "r", "--json")
        if crashed(r):
            return False, _last(r)
        secret = file_sha256(private)
        in_store = secret in _store_rows(_tiny_spec(), f / "c")
        html = (f / "r" / "report.html").read_text(errors="replace") if (f / "r" / "report.html").exists() else ""
        text = _text(r)
        # the scan stops at the first link out, naming it (either may be met first)
        named = ("innocent.png" in text or "shadow.png" in text) and "outside" in text.lower()
        return (not in_store and named and "innocent.png" not in html,
                f"rc {r.exit_code}; the private photo's features in the store: {in_store}; links named as outside: "
                f"{named}; innocent.png in report.html: {'innocent.png' in html}")

    def cache_dir_is_a_file(f):
        (f / "file").write_text("not a folder")
        r = cli("extract", _data(f), *TINY, "--cache-dir", f / "file")
        return _rc(r) == 2 and not crashed(r) and "file" in _text(r), _last(r)

    def long_dataset_folder_name(f):
        data = make_tree(f / ("d" * 245), 9, seed=8700)
        r = cli("run", data, *TINY, "--resize", "squash", "--heads", "logreg", "--folds", "2", "--jobs", "1",
                "--no-nested", "--no-inspect", "--cache-dir", f / "c")
        return r.exit_code == 0 and not crashed(r), _last(r)

    return _cases(locals())


# ---- the round's shared runs, the families and the table

ROUND_THREE = ("concurrency with rewrites", "signing of metadata", "write confinement", "fuzzed shard bytes",
               "disk full at every sqlite write", "console markup", "low items")


def shared_round_three(work: Path, shared: dict) -> dict:
    """Adds to shared_run's run: its data and cache, a vote run and a run with a fine-tuned model.json."""
    out = dict(shared, work=work, data=shared["image"].parents[1], cache=shared["run"].parent / "cache",
               spec=_tiny_spec_of_shared())
    vote = cli("run", out["data"], *TINY, "--heads", "logreg", "--folds", "2", "--jobs", "1", "--no-nested",
               "--no-inspect", "--cache-dir", work / "vote-cache", "--run-dir", work / "vote")
    if vote.exit_code != 0:
        raise RuntimeError(f"the vote run failed: {_last(vote)}")
    out["vote"] = work / "vote"
    shutil.copytree(shared["run"], work / "finetuned")
    tuned = cli("finetune", work / "finetuned", "--strategy", "head", "--batch-size", "2")
    if tuned.exit_code != 0 or not (work / "finetuned" / "model.json").exists():
        raise RuntimeError(f"the fine-tuned run failed: {_last(tuned)}")
    out["finetuned"] = work / "finetuned"
    return out


def _tiny_spec_of_shared():
    from featurepipe.backbones.spec import BackboneSpec

    return BackboneSpec(name="tiny", weights="random", image_size=32)


def round_three(work: Path, shared: dict, quick: bool, only: tuple[str, ...] = ()) -> dict:
    """The families (all, or those whose name contains one of `only`), in the issue's order."""
    shared = shared_round_three(work / "shared3", shared)

    def fuzz():
        cases, info = fuzz_cases(shared, 12 if quick else 40)
        return {**run_held(cases, work / "fuzz", 120), **info}

    def full():
        cases, notes = disk_full_cases(shared)
        return {**run_held(cases, work / "sqlite"), "not_probed": notes}

    runners = {
        "concurrency with rewrites": lambda: run_held(concurrency_cases(shared), work / "concurrency"),
        "signing of metadata": lambda: run_held(signing_cases(shared), work / "signing"),
        "write confinement": lambda: run_held(confinement_cases(shared), work / "confinement"),
        "fuzzed shard bytes": fuzz,
        "disk full at every sqlite write": full,
        "console markup": lambda: run_held(markup_cases(shared), work / "markup"),
        "low items": lambda: run_held(low_item_cases(shared), work / "low"),
    }
    families = {}
    for name, runner in runners.items():
        if not only or any(word.lower() in name for word in only):
            started = time.perf_counter()
            families[name] = {**runner(), "seconds": round(time.perf_counter() - started, 1)}
    return families


def held_table(families: dict) -> str:
    rows = ["| family | tried | held |", "|---|---:|---:|"]
    for name, result in families.items():
        rows.append(f"| {name} | {result['tried']} | {result['held']} |")
    rows.append(f"| **total** | {sum(r['tried'] for r in families.values())} | "
                f"{sum(r['held'] for r in families.values())} |")
    return "\n".join(rows)


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
    parser.add_argument("--quick", action="store_true", help="fewer kill points, gc tries and fuzzed offsets")
    parser.add_argument("--json", type=Path, help="also write the full results here")
    parser.add_argument("--sections", default="all",
                        help="comma-separated: bad_inputs, hostile_files, gc_race, extract_kills, evaluate_kills, "
                             "round3 (or 'earlier' for the first five); default all")
    parser.add_argument("--families", default="",
                        help="with round3: only the families whose name contains one of these comma-separated words "
                             "(concurrency, signing, confinement, fuzzed, disk, markup, low)")
    args = parser.parse_args()
    earlier = ("bad_inputs", "hostile_files", "gc_race", "extract_kills", "evaluate_kills")
    wanted = set()
    for word in (w.strip() for w in args.sections.split(",") if w.strip()):
        wanted |= set(earlier) | {"round3"} if word == "all" else set(earlier) if word == "earlier" else {word}
    unknown = wanted - set(earlier) - {"round3"}
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    import tests.tiny_backbone  # noqa: F401

    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="featurepipe-probe-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("FEATUREPIPE_KEY_FILE", str(work / "key" / "trust.key"))
        shared = shared_run(work / "shared")
        if "bad_inputs" in wanted:
            results["bad_inputs"] = run_cases(bad_input_cases(shared), work / "bad")
        if "hostile_files" in wanted:
            results["hostile_files"] = run_cases(hostile_cases(shared), work / "hostile")
        if "gc_race" in wanted:
            results["gc_race"] = probe_gc_race(work / "gc", 2 if args.quick else 3)
        if "extract_kills" in wanted:
            results["extract_kills"] = probe_extract_kills(work / "extract", 12 if args.quick else 40)
        if "evaluate_kills" in wanted:
            results["evaluate_kills"] = probe_evaluate_kills(work / "evaluate", 6 if args.quick else 12)
        if "round3" in wanted:
            only = tuple(w.strip() for w in args.families.split(",") if w.strip())
            results["round_three"] = round_three(work / "round3", shared, args.quick, only)
    summary = {}
    if "extract_kills" in results:
        summary["extract kill points survived / tried"] = \
            f"{results['extract_kills']['survived']} / {results['extract_kills']['tried']}"
    if "evaluate_kills" in results:
        summary["evaluate kill points survived / tried"] = \
            f"{results['evaluate_kills']['survived']} / {results['evaluate_kills']['tried']}"
    if "bad_inputs" in results:
        summary["bad inputs handled / tried"] = f"{results['bad_inputs']['handled']} / {results['bad_inputs']['tried']}"
    if "hostile_files" in results:
        summary["hostile files refused / tried"] = \
            f"{results['hostile_files']['handled']} / {results['hostile_files']['tried']}"
    if "extract_kills" in results or "gc_race" in results:
        summary["rows lost"] = (results.get("extract_kills", {}).get("rows_lost", 0)
                                + results.get("gc_race", {}).get("rows_lost", 0))
    for name, family in results.get("round_three", {}).items():
        summary[f"round three, {name}: held / tried"] = f"{family['held']} / {family['tried']}"
    summary["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, **results}, indent=2, default=str))
    failures = {section: [c for c, r in results[section]["cases"].items() if not r["handled"]]
                for section in ("bad_inputs", "hostile_files") if section in results}
    for section in ("extract_kills", "evaluate_kills"):
        if section in results:
            failures[section] = [c for c in results[section]["cases"] if not c["survived"]]
    for name, family in results.get("round_three", {}).items():
        failures[f"round three, {name}"] = {c: r["detail"] for c, r in family["cases"].items() if not r["held"]}
    notes = [n for family in results.get("round_three", {}).values() for n in family.get("not_probed", [])]
    print(json.dumps({"summary": summary, "not_survived": failures, "not_probed": notes}, indent=2, default=str))
    if "round_three" in results:
        print()
        print(held_table(results["round_three"]))

if __name__ == "__main__":
    main()
