"""Exports of the demo's default run, loaded where featurepipe is not, against `featurepipe predict`.

Makes (or reuses) the default run of data/demo (`featurepipe run data/demo --cache-dir CACHE
--run-dir RUN`: a soft vote over the run's feature sets), exports it to each format with the CLI
(timed, with --check-images 0 so the time is the export alone), then in a FRESH Python process
that never imports featurepipe (asserted) loads each artefact and predicts all 121 demo photos
the way export.json says: keras gets preprocess.py's full_image (resizing inside the model),
tflite gets preprocess.py's sized_image per input. Prints one JSON line per format: file size,
export seconds, load seconds, seconds per photo, max and mean |difference in probability| vs
`featurepipe predict --out predictions.json`, and top-1 agreement.

    python benchmarks/export_check.py [--cache-dir /tmp/ex-cache] [--formats keras,tflite]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"

# Runs where featurepipe is not: only the export folder (model, preprocess.py, export.json).
FRESH = textwrap.dedent("""
    import json, os, sys, time
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import numpy as np
    folder, fmt, paths, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    sys.path.insert(0, folder)
    from preprocess import full_image, sized_image
    meta = json.load(open(os.path.join(folder, "export.json")))
    started = time.perf_counter()
    if fmt == "keras":
        import keras
        model = keras.saving.load_model(os.path.join(folder, "model.keras"))
        run = lambda p: np.asarray(model(full_image(p)[None]))[0]
    else:
        from ai_edge_litert.interpreter import Interpreter
        runner = Interpreter(model_path=os.path.join(folder, "model.tflite")).get_signature_runner("serving_default")
        run = lambda p: runner(**{i["name"]: sized_image(p, i["image_size"], i["resize"])[None]
                                  for i in meta["inputs"]})["output_0"][0]
    loaded = time.perf_counter()
    rows = {p: run(p).tolist() for p in paths}
    done = time.perf_counter()
    assert not any(m.startswith("featurepipe") for m in sys.modules), "featurepipe was imported"
    json.dump({"rows": rows, "load_s": loaded - started, "predict_s": done - loaded}, open(out, "w"))
""")


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "featurepipe.cli", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"featurepipe {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default="/tmp/ex-cache")
    parser.add_argument("--run-dir", default=None, help="default: CACHE/demo-run (made when absent)")
    parser.add_argument("--formats", default="keras,tflite")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    run_dir = Path(args.run_dir or Path(args.cache_dir) / "demo-run")
    if not (run_dir / "best_head.json").exists():
        started = time.perf_counter()
        cli("run", str(DEMO), "--cache-dir", args.cache_dir, "--run-dir", str(run_dir), env=env)
        print(json.dumps({"made_run": str(run_dir), "seconds": round(time.perf_counter() - started, 1)}), flush=True)
    head = json.loads((run_dir / "best_head.json").read_text())
    with tempfile.TemporaryDirectory(prefix="export-check-") as scratch:
        scratch = Path(scratch)
        cli("predict", str(run_dir), str(DEMO), "--out", str(scratch / "predictions.json"), env=env)
        predicted = json.loads((scratch / "predictions.json").read_text())
        classes = predicted["classes"]
        expected = {row["path"]: [row[f"p[{c}]"] for c in classes] for row in predicted["predictions"]}
        paths = sorted(expected)
        for fmt in args.formats.split(","):
            out = scratch / fmt
            started = time.perf_counter()
            cli("export", str(run_dir), "--format", fmt, "--out", str(out), "--check-images", "0", env=env)
            export_s = time.perf_counter() - started
            meta = json.loads((out / "export.json").read_text())
            artefact = out / meta["artefact"]
            size = sum(f.stat().st_size for f in artefact.rglob("*")) if artefact.is_dir() else artefact.stat().st_size
            done = subprocess.run([sys.executable, "-c", FRESH, str(out), fmt, json.dumps(paths), str(scratch / "got.json")],
                                  capture_output=True, text=True, cwd=scratch,
                                  env={**os.environ, "PYTHONPATH": "", "TF_CPP_MIN_LOG_LEVEL": "2"})
            if done.returncode != 0:
                raise SystemExit(f"{fmt}: the fresh process failed:\n{done.stderr[-3000:]}")
            got = json.loads((scratch / "got.json").read_text())
            diff = np.abs(np.array([got["rows"][p] for p in paths]) - np.array([expected[p] for p in paths]))
            same_top = np.mean([np.argmax(got["rows"][p]) == np.argmax(expected[p]) for p in paths])
            print(json.dumps({
                "format": fmt, "model": head.get("head"), "members": len(head.get("members") or []) or 1,
                "inputs": [i["name"] for i in meta["inputs"]], "photos": len(paths),
                "size_mb": round(size / 1e6, 1), "export_s": round(export_s, 1),
                "load_s": round(got["load_s"], 1), "s_per_photo": round(got["predict_s"] / len(paths), 3),
                "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                "same_top1": float(same_top), "tolerance": meta["agreement"]["tolerance"],
            }), flush=True)


if __name__ == "__main__":
    main()
