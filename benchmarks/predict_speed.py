"""`featurepipe predict` in whole processes against the seeds' deployed model (not a test).

    python benchmarks/predict_speed.py [--run RUN --cache-dir CACHE] [--repeats 3] [--photos 500]
                                       [--baseline-repo /work/main]

Without --run it first makes the demo's default run (`featurepipe run data/demo`, a vote over
EfficientNet-Lite0/1/2 x squash/center_crop/letterbox today) in CACHE (a temporary folder unless
--cache-dir is given). Then, each in a fresh Python process so that importing TensorFlow counts:

1. one new photo (a demo photo re-saved with one pixel changed, so its bytes and features are new),
   `featurepipe predict RUN photo.jpg`;
2. the same photo again (its features were kept by the first predict: no network is built);
3. the seeds' deployed model: frozen Lite0 + Dense(256) + Dense(classes), the dense layers trained
   briefly on the demo's cached Lite0/squash features, saved as one .keras; a fresh process runs
   `keras.saving.load_model` + `model.predict` on another new photo;
4. with --baseline-repo, step 1 with that checkout's featurepipe (e.g. main before this change);
   steps 1-4 are one round, repeated --repeats times (interleaved: each sees the same load), medians;
5. throughput: --photos new photos (demo photos re-saved with distinct bytes) in one predict, against
   what the members' networks cost alone: the model-only seconds per image of each member's network
   (traced, batch 32, on decoded images) summed over the members, which is the least any predict
   that runs every member on its own view of each image can spend.

Prints one JSON object; `uptime`'s load is recorded beside the figures (shared machines).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"

SEEDS_PREDICT = """
import sys, time
started = time.perf_counter()
import numpy as np, keras
import featurepipe.backbones.layers          # the Preprocess layer inside the saved model
from PIL import Image
model = keras.saving.load_model(sys.argv[1], safe_mode=True, compile=False)
image = np.asarray(Image.open(sys.argv[2]).convert("RGB").resize((224, 224), Image.BILINEAR))[None]
print(int(np.argmax(model.predict(image, verbose=0)[0])), round(time.perf_counter() - started, 2))
"""


def load() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


# Changes every photo this invocation writes, so none is in a cache an earlier invocation filled.
SALT = (time.time_ns() // 1000) % (1 << 24)


def new_photos(folder: Path, count: int, start: int = 0) -> list[Path]:
    """`count` demo photos re-saved with two pixels changed: distinct bytes, so nothing is cached for them."""
    from PIL import Image

    sources = sorted(p for p in DEMO.rglob("*.jpg"))
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + count):
        with Image.open(sources[i % len(sources)]) as image:
            image = image.convert("RGB")
            image.putpixel((i % image.width, (i // image.width) % image.height), (i % 256, 7, 11))
            image.putpixel((image.width - 1, image.height - 1), (SALT & 255, (SALT >> 8) & 255, SALT >> 16))
            path = folder / f"photo{i:05d}.jpg"
            image.save(path, quality=92)
            out.append(path)
    return out


def timed(command: list[str], cwd: Path = REPO) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, CPU seconds, the finished process). On a shared machine under load the wall time
    says mostly how many other jobs ran; the CPU time (user + system) what the command itself cost."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, cpu, done


def summary(timings: list[tuple]) -> dict:
    walls, cpus = [t[0] for t in timings], [t[1] for t in timings]
    return {"wall": [round(w, 2) for w in walls], "cpu": [round(c, 2) for c in cpus],
            "median_wall": round(statistics.median(walls), 2), "median_cpu": round(statistics.median(cpus), 2)}


def predict_command(run: Path, cache: Path, photos: list[Path]) -> list[str]:
    return [sys.executable, "-m", "featurepipe.cli", "predict", str(run), *map(str, photos), "--cache-dir", str(cache),
            "--json"]


def seeds_model(cache: Path, scratch: Path) -> Path:
    """Frozen Lite0 + Dense(256) + Dense(classes), the dense part trained briefly on cached features."""
    import keras
    import numpy as np

    from featurepipe.backbones.build import build_feature_model
    from featurepipe.backbones.spec import BackboneSpec
    from featurepipe.data.dataset import scan
    from featurepipe.extraction.features import dataset_features, open_stores

    spec = BackboneSpec("efficientnet_lite0", resize="squash").resolved()
    features = dataset_features(scan(DEMO, cache_dir=cache), open_stores(spec, cache))
    X, labels = features.X, features.frame["label"].astype(str).to_numpy()
    classes = sorted(set(labels))
    y = np.array([classes.index(c) for c in labels])
    keras.utils.set_random_seed(0)
    hidden = keras.layers.Dense(256, activation="relu")
    output = keras.layers.Dense(len(classes), activation="softmax")
    head = keras.Sequential([keras.Input((X.shape[1],)), hidden, output])
    head.compile("rmsprop", "sparse_categorical_crossentropy")
    head.fit(X, y, epochs=5, batch_size=16, verbose=0)
    base = build_feature_model(spec, cache)
    model = keras.Model(base.input, output(hidden(base.output)))
    path = scratch / "seeds.keras"
    model.save(path)
    return path


def model_only_seconds(run: Path, cache: Path, photos: list[Path]) -> dict[str, dict[str, float]]:
    """Wall and CPU seconds per image of each member's network alone (decoded beforehand, traced, batch 32)."""
    import numpy as np

    from featurepipe.backbones.build import build_feature_model, inference_function
    from featurepipe.data.images import decode_image
    from featurepipe.rundir.run import open_run

    model = open_run(run)
    members = model.members or [model]
    per_network: dict[tuple, float] = {}
    out = {}
    sample = photos[:64]
    for member in members:
        spec = member.spec.resolved()
        key = (spec.name, spec.image_size)
        if key not in per_network:
            infer = inference_function(build_feature_model(spec, cache), spec.image_size)
            images = np.stack([decode_image(p, spec.image_size, spec.resize) for p in sample])
            infer(images[:32])                      # the graph optimiser's first run, not counted
            started, cpu = time.perf_counter(), time.process_time()
            for i in range(0, len(images), 32):
                infer(images[i:i + 32])
            per_network[key] = {"wall": round((time.perf_counter() - started) / len(images), 4),
                                "cpu": round((time.process_time() - cpu) / len(images), 4)}
        out[f"{spec.name}/{spec.resize}"] = per_network[key]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None, help="a run directory (default: make the demo's default run)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--photos", type=int, default=500, help="photos for the throughput figure (0: skip it)")
    parser.add_argument("--baseline-repo", type=Path, default=None,
                        help="also time step 1 with this checkout's featurepipe (e.g. /work/main)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="featurepipe-predict-speed-") as name:
        scratch = Path(name)
        cache = (args.cache_dir or scratch / "cache").resolve()
        figures: dict = {"load_at_start": load()}
        run = args.run
        if run is None:
            run = scratch / "run"
            seconds, _, _ = timed([sys.executable, "-m", "featurepipe.cli", "run", str(DEMO), "--cache-dir", str(cache),
                                   "--run-dir", str(run)])
            figures["run_seconds"] = round(seconds, 1)
        members = json.loads((run / "best_head.json").read_text()).get("members") or [None]
        figures["members"] = len(members)

        # Interleaved, one repeat of each per round, so that each figure sees the same load.
        seeds = seeds_model(cache, scratch) if args.repeats else None
        ours, again, seeds_times, base = [], [], [], []
        for i in range(args.repeats):
            photo = new_photos(scratch / "one", 1, start=i)[0]
            ours.append(timed(predict_command(run, cache, [photo])))
            again.append(timed(predict_command(run, cache, [photo])))
            seeds_times.append(timed([sys.executable, "-c", SEEDS_PREDICT, str(seeds),
                                      str(new_photos(scratch / "seeds", 1, start=1000 + i)[0])]))
            if args.baseline_repo is not None:
                other = new_photos(scratch / "base", 1, start=2000 + i)
                base.append(timed(predict_command(run, cache, other), cwd=args.baseline_repo))
        if ours:                 # --repeats 0: the throughput figure only
            figures["one_new_photo"] = summary(ours)
            figures["same_photo_again"] = summary(again)
            figures["seeds_one_photo"] = summary(seeds_times)
            for kind in ("wall", "cpu"):
                figures[f"one_photo_ratio_to_seeds_{kind}"] = round(
                    figures["one_new_photo"][f"median_{kind}"] / figures["seeds_one_photo"][f"median_{kind}"], 2)
        if base:
            figures["baseline_one_new_photo"] = summary(base)
        figures["load_after_one_photo"] = load()

        if args.photos:
            many = new_photos(scratch / "many", args.photos, start=5000)
            seconds, cpu, done = timed(predict_command(run, cache, [scratch / "many"]))
            result = json.loads(done.stdout)
            alone = model_only_seconds(run, cache, many)
            floor = {kind: sum(m[kind] for m in alone.values()) * args.photos for kind in ("wall", "cpu")}
            figures["throughput"] = {
                "photos": args.photos, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
                "computed": result["computed"], "images_per_second": round(args.photos / seconds, 2),
                "model_only_seconds_per_image": alone,
                "members_model_only_seconds": {k: round(v, 1) for k, v in floor.items()},
                "ratio_to_members_model_only": {"wall": round(seconds / floor["wall"], 2),
                                                "cpu": round(cpu / floor["cpu"], 2)},
            }
            figures["load_at_end"] = load()
        print(json.dumps(figures, indent=1))
        if args.cache_dir is None:
            shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
