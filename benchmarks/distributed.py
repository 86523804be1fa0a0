"""Local vs Dask LocalCluster extraction on the same images, and a paper estimate of N-worker scaling
(not a test).

    python benchmarks/distributed.py --copies 2 --workers 1,2
    python benchmarks/distributed.py --copies 1 --backbone tiny     # plumbing only, no real model

For each contender, into a fresh feature store (converted weights are shared, so no one pays for
the .pth conversion):
  local:      extract() in this process (threads decode ahead of one TensorFlow);
  dask N:     a LocalCluster of N spawned worker processes (1 thread each, cores split between
              their TensorFlows) started, extract() through it, the cluster closed.
Measured: cluster start-up, the workers' first-batch cost (TensorFlow import + model build),
per-batch time on a worker (decode, inference, publishing the shard), the driver's time per
committed batch, throughput, and the cluster's shutdown.

The estimate: with B batches, the wall time t_b per batch of a warm worker (gaps included), the
driver's commit time t_c, start-up S, warm-up W and shutdown D, N workers on N machines take about
    T(N) = S + W + max(ceil(B / N) * t_b, B * t_c) + D
(the driver commits batches one after another, so it bounds the rate at t_c per batch). Cores are
not shared across machines, so t_b is measured with one worker owning the whole machine's cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = Path(__file__).resolve().parent
# This file is named like the `distributed` package it measures: keep its folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

from featurepipe.backbones.spec import BackboneSpec  # noqa: E402
from featurepipe.data.dataset import scan  # noqa: E402
from featurepipe.extraction.executors.local import Executor, LocalExecutor  # noqa: E402
from featurepipe.extraction.extract import extract  # noqa: E402


def _make_dataset(target: Path, copies: int) -> Path:
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("extract_throughput", HERE / "extract_throughput.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.make_dataset(target, copies)


class Recording(Executor):
    """Passes batches through another executor, noting each outcome and how long the driver spent
    on it (committing the shard) before asking for the next."""

    def __init__(self, inner: Executor):
        self.inner = inner
        self.name = inner.name
        self.remote = inner.remote
        self.outcomes = []
        self.driver_seconds = []

    def map_batches(self, job, batches, paths):
        for outcome in self.inner.map_batches(job, batches, paths):
            handed = time.perf_counter()
            yield outcome
            self.outcomes.append(outcome)
            self.driver_seconds.append(time.perf_counter() - handed)


def _median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else 0.0


def _fresh_cache(work: Path, name: str, weights_from: Path) -> Path:
    cache = work / name
    if (weights_from / "weights").exists():
        shutil.copytree(weights_from / "weights", cache / "weights")
    return cache


def run_local(dataset, spec, cache, batch_size):
    recording = Recording(LocalExecutor())
    started = time.perf_counter()
    result = extract(dataset, spec, cache, batch_size=batch_size, executor=recording)
    seconds = time.perf_counter() - started
    per_batch = [o.decode_seconds + o.infer_seconds for o in recording.outcomes]
    return {
        "seconds": round(seconds, 2), "build_s": round(result.build_seconds, 2),
        "batch_s_median": round(_median(per_batch), 4),
        "driver_commit_s_median": round(_median(recording.driver_seconds), 4),
        "img_per_s_excl_build": round(result.images_per_second, 1),
        "extracted": result.extracted,
    }


def run_dask(dataset, spec, cache, batch_size, workers):
    from featurepipe.extraction.executors.dask_cluster import DaskExecutor

    started = time.perf_counter()
    executor = DaskExecutor.local_cluster(workers)
    startup = time.perf_counter() - started
    recording = Recording(executor)
    try:
        started = time.perf_counter()
        result = extract(dataset, spec, cache, batch_size=batch_size, executor=recording)
        seconds = time.perf_counter() - started
    finally:
        started = time.perf_counter()
        executor.close()
        shutdown = time.perf_counter() - started
    warm = [o for o in recording.outcomes if o.build_seconds == 0]
    per_batch = [o.decode_seconds + o.infer_seconds + o.publish_seconds for o in warm]
    builds = [o.build_seconds for o in recording.outcomes if o.build_seconds > 0]
    steady = seconds - max(builds, default=0.0)
    return {
        "workers": workers, "startup_s": round(startup, 2), "extract_s": round(seconds, 2),
        "shutdown_s": round(shutdown, 2), "total_s": round(startup + seconds + shutdown, 2),
        "worker_first_batch_build_s": [round(b, 2) for b in builds],
        "batch_s_median": round(_median(per_batch), 4),
        "decode_s_median": round(_median([o.decode_seconds for o in warm]), 4),
        "infer_s_median": round(_median([o.infer_seconds for o in warm]), 4),
        "publish_s_median": round(_median([o.publish_seconds for o in warm]), 4),
        "driver_commit_s_median": round(_median(recording.driver_seconds), 4),
        "img_per_s_excl_build": round(result.extracted / steady, 1) if steady > 0 else None,
        # wall time per batch once warm, gaps and stragglers included (what the estimate uses)
        "batch_s_effective": round(steady * workers / len(recording.outcomes), 4) if recording.outcomes else 0.0,
        "extracted": result.extracted,
    }


def estimate(batches: int, batch_s: float, commit_s: float, startup_s: float, warmup_s: float,
             shutdown_s: float, local_s: float) -> list[dict]:
    rows = []
    for n in (1, 2, 4, 8, 16, 32, 64):
        compute = math.ceil(batches / n) * batch_s
        total = startup_s + warmup_s + max(compute, batches * commit_s) + shutdown_s
        rows.append({"workers": n, "estimated_s": round(total, 2), "vs_local": round(local_s / total, 2),
                     "driver_bound": batches * commit_s > compute})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=2, help="Copies of the 120 demo photos.")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", default="1,2", help="LocalCluster sizes to measure, e.g. 1,2.")
    parser.add_argument("--estimate-images", type=int, default=100_000, help="Also estimate a data set this large.")
    args = parser.parse_args()
    if args.backbone == "tiny":
        import tests.tiny_backbone  # noqa: F401
    spec = BackboneSpec(name=args.backbone, weights="random" if args.backbone == "tiny" else "imagenet").resolved()

    work = Path(tempfile.mkdtemp(prefix="fp-dist-bench-"))
    try:
        data_dir = _make_dataset(work / "data", args.copies)
        dataset = scan(data_dir)
        local_cache = work / "local"
        local = run_local(dataset, spec, local_cache, args.batch_size)
        runs = [run_dask(dataset, spec, _fresh_cache(work, f"dask{n}", local_cache), args.batch_size, n)
                for n in (int(w) for w in args.workers.split(","))]
        one = next((r for r in runs if r["workers"] == 1), runs[0])
        batches = math.ceil(len(set(dataset.frame["hash"])) / args.batch_size)
        figures = {
            "images": len(dataset), "batches": batches, "backbone": spec.name, "image_size": spec.image_size,
            "batch_size": args.batch_size, "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
            "local": local, "dask": runs,
            # A paper estimate from the one-worker run (one worker owning the cores, as on its own machine).
            "estimate_from": {"batch_s": one["batch_s_effective"], "commit_s": one["driver_commit_s_median"],
                              "startup_s": one["startup_s"], "warmup_s": max(one["worker_first_batch_build_s"],
                                                                             default=0.0),
                              "shutdown_s": one["shutdown_s"], "local_s": local["seconds"]},
        }
        costs = (one["batch_s_effective"], one["driver_commit_s_median"], one["startup_s"],
                 figures["estimate_from"]["warmup_s"], one["shutdown_s"])
        figures["estimate"] = estimate(batches, *costs, local["seconds"])
        # The local run's time scaled to the large set: its per-image cost times the images, plus its build.
        big_batches = math.ceil(args.estimate_images / args.batch_size)
        local_big = local["build_s"] + args.estimate_images / local["img_per_s_excl_build"]
        figures[f"estimate_{args.estimate_images}_images"] = {
            "local_s": round(local_big, 1), "workers": estimate(big_batches, *costs, local_big)}
        print(json.dumps(figures, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
