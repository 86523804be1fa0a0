"""`featurepipe serve`'s latency and memory (not a test).

    python benchmarks/serve_latency.py [--data data/demo] [--runs quick,default] [--requests 100]
                                       [--memory 10,1000] [--cache-dir DIR]

For each run kind, `featurepipe run DATA --quick` (one feature set: Lite0 and one head) and the default
`featurepipe run DATA` (a vote of one head per feature set) are made in a fresh cache (or reused from
--cache-dir / --run-dir-KIND), then `featurepipe serve RUN` is started as its own process, exactly as a
user starts it. One photo per POST /predict (the page's way), from one client with keep-alive, cycling
through the data set's photos. Measured: the server's start-up (process start to /health answering),
the median and 90th percentile of a request's wall time over --requests requests after 3 warm-up ones,
and the server process's resident memory (VmRSS) after the first and the last of the --memory counts.
Prints one JSON object per run kind, then a summary object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "featurepipe.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def make_run(kind: str, data: str, cache: Path, env: dict) -> tuple[Path, float]:
    run_dir = cache / f"serve-bench-{kind}"
    started = time.perf_counter()
    command = [*CLI, "run", data, "--run-dir", str(run_dir), "--cache-dir", str(cache), "--overwrite"]
    subprocess.run(command + (["--quick"] if kind == "quick" else []), check=True, env=env, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    return run_dir, time.perf_counter() - started


def measure(kind: str, run_dir: Path, photos: list[Path], args, env: dict) -> dict:
    import httpx

    port = free_port()
    started = time.perf_counter()
    server = subprocess.Popen([*CLI, "serve", str(run_dir), "--port", str(port)], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"serve exited: {server.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("serve did not answer within 600 s")
            try:
                health = httpx.get(f"{base}/health", timeout=5).json()
                break
            except httpx.TransportError:
                time.sleep(0.2)
        startup = time.perf_counter() - started
        contents = [(p.name, p.read_bytes()) for p in photos]
        times, rss, sent = [], {}, 0
        checkpoints = sorted(set(args.memory))
        with httpx.Client(base_url=base, timeout=120) as client:
            def post() -> float:
                nonlocal sent
                name, data = contents[sent % len(contents)]
                t0 = time.perf_counter()
                answer = client.post("/predict", files=[("files", (name, data, "image/jpeg"))])
                elapsed = time.perf_counter() - t0
                if answer.status_code != 200:
                    raise RuntimeError(f"{name}: HTTP {answer.status_code} {answer.text[:300]}")
                sent += 1
                if sent in checkpoints:
                    rss[sent] = round(rss_mb(server.pid), 1)
                return elapsed

            for _ in range(3):
                post()
            for _ in range(args.requests):
                times.append(post())
            while sent < max(checkpoints):
                post()
    finally:
        server.terminate()
        server.wait(timeout=60)
    ordered = sorted(times)
    first, last = rss[checkpoints[0]], rss[checkpoints[-1]]
    return {"run": kind, "run_dir": str(run_dir), "model_kind": health["model_kind"],
            "feature_set_for_similar": health["similar"]["feature_set"],
            "nested_accuracy": health["nested_accuracy"], "startup_seconds": round(startup, 2),
            "requests": len(times), "median_seconds": round(statistics.median(times), 4),
            "p90_seconds": round(ordered[int(0.9 * (len(ordered) - 1))], 4),
            "rss_mb": {str(k): v for k, v in rss.items()},
            "rss_growth": round(last / first - 1, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO / "data" / "demo"))
    parser.add_argument("--runs", default="quick,default", help="comma-separated: quick, default")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--memory", default="10,1000", help="request counts after which the server's RSS is read")
    parser.add_argument("--cache-dir", default=None, help="default: a new temporary folder")
    parser.add_argument("--run-dir-quick", default=None, help="an existing `run --quick` of --data")
    parser.add_argument("--run-dir-default", default=None, help="an existing default `run` of --data")
    args = parser.parse_args()
    args.memory = [int(n) for n in args.memory.split(",")]
    cache = Path(args.cache_dir or tempfile.mkdtemp(prefix="serve-bench-"))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
    from featurepipe.data.dataset import walk_images

    photos = [Path(p) for p in walk_images(Path(args.data))[0]]
    results = []
    for kind in [k.strip() for k in args.runs.split(",") if k.strip()]:
        given = getattr(args, f"run_dir_{kind}")
        run_dir, seconds = (Path(given), None) if given else make_run(kind, args.data, cache, env)
        row = {**measure(kind, run_dir, photos, args, env), "run_seconds": None if seconds is None else round(seconds, 1)}
        results.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"load_average": os.getloadavg(), "photos": len(photos),
                      "summary": {r["run"]: {"median_s": r["median_seconds"], "rss_growth": r["rss_growth"]}
                                  for r in results}}))


if __name__ == "__main__":
    main()
