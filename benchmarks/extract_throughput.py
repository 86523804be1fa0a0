"""Extraction throughput: featurepipe vs the seeds' recipe vs the model alone (not a test).

    python benchmarks/extract_throughput.py --copies 4 --backbone efficientnet_lite0
    python benchmarks/extract_throughput.py --copies 1 --upscale 3000     # camera-sized photos

On the same images and backbone, in one process:
  (b) compute limit: the feature model on pre-decoded uint8 tensors, batches of 32;
  (a) the seeds' recipe: keras ImageDataGenerator.flow_from_directory + model.predict;
  featurepipe: extract() into a fresh cache, then again with nothing changed.
The demo photos are copied `--copies` times with one distinguishing trailing byte each, so every
copy has its own content hash (JPEG decoders ignore bytes after the end marker).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from featurepipe.backbones.build import build_feature_model
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.dataset import scan
from featurepipe.extract import extract
from featurepipe.images import decode_image

REPO = Path(__file__).resolve().parents[1]


def camera_sized(source: Path, longer_side: int) -> bytes:
    """The photo re-encoded as a camera-sized JPEG: users' photos are megapixels, the demo's are small."""
    from PIL import Image

    with Image.open(source) as image:
        image = image.convert("RGB")
        scale = longer_side / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def make_dataset(target: Path, copies: int, upscale: int = 0) -> Path:
    for source in sorted((REPO / "data" / "demo").glob("*/*")):
        if source.suffix.lower() not in {".jpg", ".jpeg", ".png"}:
            continue
        (target / source.parent.name).mkdir(parents=True, exist_ok=True)
        data = camera_sized(source, upscale) if upscale else source.read_bytes()
        source = source.with_suffix(".jpg") if upscale else source
        for copy in range(copies):
            name = f"{source.stem}_{copy}{source.suffix}"
            (target / source.parent.name / name).write_bytes(data + bytes([copy % 256]) * (copy + 1))
    return target


def warm_up_tensorflow() -> None:
    """Start TensorFlow's runtime (thread pools, kernels) outside every timing, so that whichever
    contender runs first is not charged for it."""
    import keras

    tiny = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(4, 3), keras.layers.GlobalAveragePooling2D()])
    tiny.predict_on_batch(np.zeros((2, 32, 32, 3), np.float32))


def time_compute_limit(model, images: np.ndarray, batch_size: int) -> float:
    """The model alone at its best: one graph for every batch shape, traced outside the timing."""
    import tensorflow as tf

    size = images.shape[1]

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])
    def infer(batch):
        return model(batch, training=False)

    infer(tf.convert_to_tensor(images[:1]))
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        infer(tf.convert_to_tensor(images[start:start + batch_size])).numpy()
    return time.perf_counter() - started


def time_seed_recipe(model, data_dir: Path, spec: BackboneSpec, batch_size: int) -> float:
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    started = time.perf_counter()
    generator = ImageDataGenerator().flow_from_directory(
        str(data_dir), target_size=(spec.image_size, spec.image_size), batch_size=batch_size,
        class_mode=None, shuffle=False)
    model.predict(generator, verbose=0)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--upscale", type=int, default=0,
                        help="Re-encode each photo as a JPEG with this longer side (e.g. 3000 for ~6 MP).")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fp-bench-"))
    try:
        data_dir = make_dataset(work / "data", args.copies, args.upscale)
        spec = BackboneSpec(name=args.backbone, image_size=args.image_size).resolved()
        cache = work / "cache"
        dataset = scan(data_dir, cache_dir=cache)
        n = len(dataset)

        warm_up_tensorflow()
        started = time.perf_counter()
        first = extract(dataset, spec, cache, batch_size=args.batch_size)
        featurepipe_seconds = time.perf_counter() - started
        started = time.perf_counter()
        rerun_dataset = scan(data_dir, cache_dir=cache)
        again = extract(rerun_dataset, spec, cache, batch_size=args.batch_size)
        rerun_seconds = time.perf_counter() - started

        started = time.perf_counter()
        model = build_feature_model(spec, cache)
        build_seconds = time.perf_counter() - started
        images = np.stack([decode_image(p, spec.image_size, spec.resize) for p in dataset.frame["path"]])
        compute_seconds = time_compute_limit(model, images, args.batch_size)
        seed_seconds = time_seed_recipe(model, data_dir, spec, args.batch_size)

        steady = featurepipe_seconds - first.build_seconds
        figures = {
            "images": n, "longer_side_px": args.upscale or "demo originals",
            "mean_file_kb": round(sum(dataset.frame["bytes"]) / n / 1024, 1), "backbone": spec.name, "image_size": spec.image_size, "cpus": os.cpu_count(),
            "model_build_s": round(build_seconds, 2),
            "featurepipe_model_build_s": round(first.build_seconds, 2),
            "compute_limit_s": round(compute_seconds, 2),
            "compute_limit_img_per_s": round(n / compute_seconds, 1),
            "seed_recipe_s": round(seed_seconds, 2),
            "seed_recipe_img_per_s": round(n / seed_seconds, 1),
            "seed_recipe_incl_build_s": round(seed_seconds + build_seconds, 2),
            "featurepipe_first_run_s": round(featurepipe_seconds, 2),
            "featurepipe_img_per_s_incl_build": round(n / featurepipe_seconds, 1),
            "featurepipe_img_per_s_excl_build": round(n / steady, 1),
            "featurepipe_vs_compute_limit_excl_build": round(compute_seconds / steady, 3),
            "featurepipe_speedup_vs_seed_recipe_incl_build": round((seed_seconds + build_seconds) / featurepipe_seconds, 3),
            "featurepipe_speedup_vs_seed_recipe_excl_build": round(seed_seconds / steady, 3),
            "rerun_s": round(rerun_seconds, 3),
            "rerun_fraction_of_first": round(rerun_seconds / featurepipe_seconds, 4),
            "extracted_first": first.extracted, "extracted_rerun": again.extracted, "reused_rerun": again.reused,
        }
        print(json.dumps(figures, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
