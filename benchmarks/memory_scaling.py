"""Peak memory and time of featurepipe's commands from 1,000 to 70,000 real images (not a test).

    apt-get install -y dataset-fashion-mnist          # Debian: 70,000 28x28 grey images, 10 classes
    python benchmarks/memory_scaling.py setup --work /tmp/fp-scale
    python benchmarks/memory_scaling.py extract --work /tmp/fp-scale --sizes 1000,10000,70000
    python benchmarks/memory_scaling.py export  --work /tmp/fp-scale --sizes 1000,10000,70000
    python benchmarks/memory_scaling.py predict --work /tmp/fp-scale --sizes 500,5000
    python benchmarks/memory_scaling.py evaluate --work /tmp/fp-scale --rows 10000
    python benchmarks/memory_scaling.py scan    --work /tmp/fp-scale
    python benchmarks/memory_scaling.py run     --work /tmp/fp-scale
    python benchmarks/memory_scaling.py add10   --work /tmp/fp-scale
    python benchmarks/memory_scaling.py nested  --work /tmp/fp-scale   # hook: evaluate with FP_NESTED_ARGS
    python benchmarks/memory_scaling.py search  --work /tmp/fp-scale --images 2000   # the default search, real weights

`setup` writes the 70,000 images as PNG files under WORK/fashion/<class>/ plus CSV manifests of
nested subsets (the first N of a class-interleaved order, so every subset has all 10 classes).
Every other step runs the real command line (`python -m featurepipe ...`) in a child process and
reads that child's peak resident set size from the kernel (wait4 rusage), with wall time.

Features come from efficientnet_lite0 (1,280-d, the default backbone) with `--weights random` at
`--image-size 32` (its minimum): the model's cost per image is ~50x lower than at 224 px while the
feature rows, shards, store index and tables have the real sizes, which is what memory scaling is
about. Throughput at the real size is benchmarks/extract_throughput.py's job.
Results are printed as JSON lines and appended to WORK/results.jsonl.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CODE = REPO            # the featurepipe checkout the children run (--code: e.g. an older commit, for before/after)
FASHION = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
BACKBONE = ["--backbone", "efficientnet_lite0", "--weights", "random", "--image-size", "32"]


# ------------------------------------------------------------------------------------------ set-up


def _idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), dtype=np.uint8, offset=offset)


def setup(work: Path, source: Path = FASHION) -> dict:
    """PNG files + manifests; idempotent (an existing tree is kept)."""
    from PIL import Image

    root = work / "fashion"
    done = work / "fashion.done"
    started = time.perf_counter()
    if not done.exists():
        if not (source / "train-images-idx3-ubyte.gz").exists():
            sys.exit(f"{source} has no Fashion-MNIST files: apt-get install -y dataset-fashion-mnist")
        rows = []
        for part in ("train", "t10k"):
            images = _idx(source / f"{part}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
            labels = _idx(source / f"{part}-labels-idx1-ubyte.gz", 8)
            for i, (image, label) in enumerate(zip(images, labels)):
                path = root / CLASSES[label] / f"{part}-{i:05d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(path)
                rows.append((str(path), CLASSES[label]))
        # Interleave classes so that every prefix is balanced.
        by_class: dict[str, list[str]] = {c: [] for c in CLASSES}
        for path, label in rows:
            by_class[label].append(path)
        order = [(by_class[c][i], c) for i in range(max(map(len, by_class.values()))) for c in CLASSES
                 if i < len(by_class[c])]
        (work / "order.csv").write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in order))
        done.write_text("ok")
    return {"step": "setup", "images": sum(1 for _ in root.rglob("*.png")), "seconds": round(time.perf_counter() - started, 1)}


def subset(work: Path, n: int, skip: int = 0) -> Path:
    """A CSV manifest of images skip..skip+n of the balanced order."""
    lines = (work / "order.csv").read_text().splitlines()[1:]
    path = work / f"subset_{skip}_{n}.csv"
    if not path.exists():
        path.write_text("path,label\n" + "\n".join(lines[skip:skip + n]) + "\n")
    return path


def folder_of(work: Path, n: int, skip: int) -> Path:
    """A folder of n symlinks (predict takes folders of images)."""
    folder = work / f"images_{skip}_{n}"
    if not folder.exists():
        tmp = folder.with_name(folder.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for line in (work / "order.csv").read_text().splitlines()[1 + skip:1 + skip + n]:
            path = Path(line.split(",")[0])
            (tmp / f"{path.parent.name}-{path.name}").symlink_to(path)
        tmp.rename(folder)
    return folder


# ------------------------------------------------------------------------------------------ measuring


def _run_child(args: list[str], work: Path) -> tuple[str, str, int, float, float]:
    """(stdout, stderr, exit code, peak RSS MiB, seconds) of one CLI child."""
    # -P: the child's sys.path starts with CODE only (never the working directory's checkout).
    env = {**os.environ, "PYTHONPATH": str(CODE)}
    started = time.perf_counter()
    with open(work / ".out", "w+") as out, open(work / ".err", "w+") as err:
        child = subprocess.Popen([sys.executable, "-P", "-m", "featurepipe", *args], env=env, cwd=work,
                                 stdout=out, stderr=err)
        # Reap it ourselves: wait4 gives this child's own peak RSS (Popen.wait would discard it).
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        return out.read(), err.read(), child.returncode, usage.ru_maxrss / 1024, seconds


def cli(args: list[str], label: str, work: Path, **extra) -> dict:
    out, err, code, rss, seconds = _run_child(args, work)
    if code != 0:
        raise RuntimeError(f"featurepipe {' '.join(args)} failed ({code}):\n{err[-3000:]}")
    result = {"step": label, "code": str(CODE), "peak_rss_mb": round(rss, 1), "seconds": round(seconds, 2), **extra,
              "load_1min": round(os.getloadavg()[0], 2)}
    try:
        result["summary"] = json.loads(out)
    except json.JSONDecodeError:
        result["stdout"] = out.strip()[-300:]
    return result


def emit(work: Path, result: dict) -> dict:
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": f"{platform.node()} "
              f"{os.cpu_count()} cpus", **result}
    brief = {k: v for k, v in result.items() if k != "summary"}
    print(json.dumps(brief), flush=True)
    with open(work / "results.jsonl", "a") as handle:
        handle.write(json.dumps(result) + "\n")
    return result


def ratios(results: list[dict], key: str = "peak_rss_mb") -> dict:
    base = results[0][key]
    return {f"{r['images']}_vs_{results[0]['images']}": round(r[key] / base, 3) for r in results[1:]}


# ------------------------------------------------------------------------------------------ steps


def step_extract(work: Path, sizes: list[int]) -> None:
    found = []
    for n in sizes:
        cache = work / f"cache_{n}"
        result = cli(["extract", str(subset(work, n)), *BACKBONE, "--cache-dir", str(cache), "--json"],
                     "extract", work, images=n)
        summary = result.pop("summary", {})
        result.update(extracted=summary.get("extracted"), images_per_s=summary.get("images_per_second"),
                      shards=len(list((Path(summary["store_dir"]) / "shards").glob("*.h5"))) if summary else None)
        found.append(emit(work, result))
    if len(found) > 1:
        emit(work, {"step": "extract-growth", "peak_rss_ratio": ratios(found)})


def step_export(work: Path, sizes: list[int], fmt: str) -> None:
    found = []
    for n in sizes:
        cache = work / f"cache_{n}"
        out = work / f"export_{n}.{fmt}"
        result = cli(["features", "export", str(subset(work, n)), "--out", str(out), *BACKBONE,
                      "--cache-dir", str(cache)], f"features export .{fmt}", work, images=n,
                     file_mb=None)
        result["file_mb"] = round(out.stat().st_size / 2**20, 1)
        found.append(emit(work, result))
        out.unlink()
    if len(found) > 1:
        emit(work, {"step": f"export-{fmt}-growth", "peak_rss_ratio": ratios(found)})


def _trained_run(work: Path) -> Path:
    """A run (logreg head) on the first 1,000 images, features in cache_10000 (which holds the first 10,000)."""
    run_dir = work / "run_1000"
    if not (run_dir / "config.json").exists():
        cli(["evaluate", str(subset(work, 1000)), *BACKBONE, "--heads", "logreg", "--folds", "2",
             "--grid", '{"logreg": {"C": [1.0]}}', "--run-dir", str(run_dir),
             "--cache-dir", str(work / "cache_10000"), "--json"], "train head", work)
    return run_dir


def step_predict(work: Path, sizes: list[int]) -> None:
    run_dir = _trained_run(work)
    for kind, skip in (("cached", 0), ("computed", 20000)):
        found = []
        for n in sizes:
            folder = folder_of(work, n, skip)
            result = cli(["predict", str(run_dir), str(folder), "--json"], f"predict ({kind} features)", work,
                         images=n)
            summary = result.pop("summary", {})
            result.update(reused=summary.get("reused"), computed=summary.get("computed"))
            found.append(emit(work, result))
        emit(work, {"step": f"predict-{kind}-growth", "peak_rss_ratio": ratios(found)})


def step_evaluate(work: Path, rows: int, heads: str, folds: int, grid: str) -> None:
    cache = work / f"cache_{max(rows, 10000)}"
    args = ["evaluate", str(subset(work, rows)), *BACKBONE, "--heads", heads, "--folds", str(folds),
            "--run-dir", str(work / f"eval_{rows}"), "--cache-dir", str(cache), "--json"]
    if grid:
        args += ["--grid", grid]
    for attempt in ("cold", "warm"):
        result = cli(args, f"evaluate {heads} {folds}-fold ({attempt})", work, images=rows)
        summary = result.pop("summary", {})
        result.update(fitted=summary.get("fitted"), reused=summary.get("reused"), best=summary.get("best"))
        emit(work, result)


def step_scan(work: Path) -> None:
    """Scanning the 70,000-file folder tree, in-process: cold (hashing every file) then warm."""
    sys.path.insert(0, str(CODE))
    from featurepipe.data.dataset import scan

    import resource

    cache = work / "cache_scan"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for attempt in ("cold", "warm"):
        started = time.perf_counter()
        dataset = scan(work / "fashion", cache_dir=cache)
        seconds = time.perf_counter() - started
        # this process's peak so far: what one scan of the tree (and its Dataset) costs on top of imports
        emit(work, {"step": f"scan 70k tree ({attempt} hash cache)", "images": len(dataset),
                    "seconds": round(seconds, 2), "rss_before_mb": round(before, 1),
                    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                    "load_1min": round(os.getloadavg()[0], 2)})
        del dataset


# `run` on the whole tree: the stem's 32-d features keep CV on 70,000 rows to minutes on 2 cores.
RUN_ARGS = ["--backbone", "efficientnet_lite0", "--weights", "random", "--image-size", "32", "--layer",
            "stem_relu", "--heads", "logreg", "--folds", "2", "--grid", '{"logreg": {"C": [1.0]}}']


def step_run(work: Path) -> None:
    cache = work / "cache_run"
    args = ["run", str(work / "fashion"), *RUN_ARGS, "--run-dir", str(work / "run_70k"), "--cache-dir", str(cache),
            "--json"]
    for attempt in ("first", "no-change re-run"):
        result = cli(args, f"run 70k ({attempt})", work, images=70000)
        summary = result.pop("summary", {})
        result.update(stages=summary.get("stages"), message=summary.get("message"))
        emit(work, result)


def step_add10(work: Path) -> None:
    cache = work / "cache_add10"
    for n in (2000, 2010):
        result = cli(["extract", str(subset(work, n)), *BACKBONE, "--cache-dir", str(cache), "--json"],
                     f"extract {n}", work, images=n)
        summary = result.pop("summary", {})
        result.update(extracted=summary.get("extracted"), reused=summary.get("reused"),
                      extract_s=summary.get("seconds"), build_s=summary.get("build_seconds"))
        emit(work, result)


def step_nested(work: Path) -> None:
    """Hook for the accuracy issue's default search (nested CV) on 2,000 images; not run by default."""
    cache = work / "cache_add10"
    args = ["evaluate", str(subset(work, 2000)), "--cache-dir", str(cache), "--run-dir", str(work / "nested_2000"),
            "--json", *os.environ.get("FP_NESTED_ARGS", "").split()]
    result = cli(args, "evaluate default search on 2,000 images", work, images=2000)
    summary = result.pop("summary", {})
    result.update(fitted=summary.get("fitted"), best=summary.get("best"))
    emit(work, result)


def step_search(work: Path, images: int, jobs: str) -> None:
    """The accuracy issue's default search (`featurepipe run`: Lite0/1/2 x squash/center_crop/letterbox,
    ImageNet weights, heads logreg/knn/ncm + ensemble, nested CV) on `images` Fashion-MNIST images.

    Extraction is timed per feature set (one `extract` each, into WORK/cache_search), then `run` is
    timed on those cached features with no CV fit cached: a fresh cache root whose features/ and
    weights/ are hard links to cache_search's (so evaluate, nested, inspect and report all run cold).
    """
    import shutil

    sys.path.insert(0, str(CODE))
    from featurepipe.evaluation.search import search_specs

    manifest = subset(work, images)
    cache = work / "cache_search"
    for spec in search_specs():
        result = cli(["extract", str(manifest), "--backbone", spec.name, "--resize", spec.resize, "--cache-dir",
                      str(cache), "--json"], f"extract {spec.name}/{spec.resize}", work, images=images)
        summary = result.pop("summary", {})
        result.update(extracted=summary.get("extracted"), reused=summary.get("reused"),
                      images_per_s=summary.get("images_per_second"), build_s=summary.get("build_seconds"))
        emit(work, result)
    cold = work / "cache_search_cold"
    shutil.rmtree(cold, ignore_errors=True)
    cold.mkdir()
    for name in ("features", "weights"):
        if (cache / name).exists():
            shutil.copytree(cache / name, cold / name, copy_function=os.link)
    run_dir = work / f"search_run_{images}"
    shutil.rmtree(run_dir, ignore_errors=True)
    result = cli(["run", str(manifest), "--cache-dir", str(cold), "--run-dir", str(run_dir), "--jobs", jobs, "--json"],
                 f"run default search on {images} images (cached features, cold fits, --jobs {jobs})", work,
                 images=images)
    summary = result.pop("summary", {})
    evaluate = summary.get("evaluate", {})
    result.update(stages=summary.get("stages"), fitted=evaluate.get("fitted"), reused=evaluate.get("reused"),
                  best=summary.get("best"), nested_accuracy=((summary.get("nested") or {}).get("accuracy") or {}).get("mean"))
    emit(work, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=["setup", "extract", "export", "predict", "evaluate", "scan", "run", "add10",
                                         "nested", "search"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/fp-scale"))
    parser.add_argument("--sizes", default="")
    parser.add_argument("--format", default="npz", help="features export format: npz | parquet | csv")
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--heads", default="logreg,knn,ncm")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--grid", default="", help="evaluate --grid (default: the heads' default grids)")
    parser.add_argument("--images", type=int, default=2000, help="search: images of the balanced order")
    parser.add_argument("--jobs", default="-1", help="search: run --jobs")
    parser.add_argument("--code", type=Path, default=REPO, help="featurepipe checkout to run (default: this one)")
    args = parser.parse_args()
    global CODE
    CODE = args.code.absolute()
    work = args.work.expanduser().absolute()
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.step == "setup":
        emit(work, setup(work))
        return
    if not (work / "fashion.done").exists():
        sys.exit(f"run `python {Path(__file__).name} setup --work {work}` first")
    {"extract": lambda: step_extract(work, sizes or [1000, 10000, 70000]),
     "export": lambda: step_export(work, sizes or [1000, 10000, 70000], args.format),
     "predict": lambda: step_predict(work, sizes or [500, 5000]),
     "evaluate": lambda: step_evaluate(work, args.rows, args.heads, args.folds, args.grid),
     "scan": lambda: step_scan(work),
     "run": lambda: step_run(work),
     "add10": lambda: step_add10(work),
     "nested": lambda: step_nested(work),
     "search": lambda: step_search(work, args.images, args.jobs)}[args.step]()


if __name__ == "__main__":
    main()
