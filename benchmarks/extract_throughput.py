"""Extraction throughput: featurepipe vs the seeds' recipe vs the model alone (not a test).

    python benchmarks/extract_throughput.py --copies 4 --backbone efficientnet_lite0
    python benchmarks/extract_throughput.py --copies 1 --upscale 3000     # camera-sized photos
    python benchmarks/extract_throughput.py --copies 25 --upscale 3000 --backbones efficientnet_lite0,resnet50 \
        --weights random --precisions float32,mixed_float16 --no-seed-recipe --json-out results.jsonl   # GPU (gpu.sh)

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

import numpy as np

from featurepipe.cli.quiet import quiet_tensorflow_startup

quiet_tensorflow_startup()

from featurepipe.backbones.build import build_feature_model
from featurepipe.backbones.spec import BackboneSpec
from featurepipe.data.dataset import scan
from featurepipe.extraction.extract import extract
from featurepipe.data.images import decode_image

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


def make_dataset(target: Path, copies: int, upscale: int = 0, limit: int = 0) -> Path:
    sources = [p for p in sorted((REPO / "data" / "demo").glob("*/*")) if p.suffix.lower() in {".jpg", ".jpeg", ".png"}]
    if limit:   # every class still represented: take photos round-robin over the class folders
        by_class: dict[str, list[Path]] = {}
        for path in sources:
            by_class.setdefault(path.parent.name, []).append(path)
        sources = [p for i in range(len(sources)) for c in sorted(by_class) if i < len(by_class[c])
                   for p in [by_class[c][i]]][:limit]
    for source in sources:
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


def time_compute_limit(model, images: np.ndarray, batch_size: int, jit: bool = False) -> float:
    """The model alone at its best: one graph for every batch shape, traced outside the timing;
    uint8 batches from host memory, as extract feeds it."""
    import tensorflow as tf

    size = images.shape[1]

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)], jit_compile=jit)
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


def decode_breakdown(paths: list[str], size: int, resize: str, sample: int = 48) -> dict:
    """Milliseconds per image, one thread, of featurepipe's decode_image split in its two halves:
    JPEG/PNG decoding (with draft-mode DCT downscaling) and the rest (orientation, RGB, resize, array)."""
    from PIL import Image, ImageOps, JpegImagePlugin

    from featurepipe.data.images import _resize, _to_rgb

    decode = resize_s = 0.0
    chosen = paths[:sample]
    for path in chosen:
        t0 = time.perf_counter()
        with Image.open(path) as image:
            if isinstance(image, JpegImagePlugin.JpegImageFile):
                image.draft("RGB", (size, size))
            image.load()
            t1 = time.perf_counter()
            ImageOps.exif_transpose(image, in_place=True)
            np.array(_resize(_to_rgb(image, path), size, resize), dtype=np.uint8)
        t2 = time.perf_counter()
        decode += t1 - t0
        resize_s += t2 - t1
    n = max(1, len(chosen))
    return {"decode_ms_per_image_1thread": round(1000 * decode / n, 3),
            "resize_ms_per_image_1thread": round(1000 * resize_s / n, 3)}


def device_breakdown(model, images: np.ndarray, batch_size: int) -> dict:
    """On a GPU: host->device copy of uint8 batches, and the model on batches already on the device."""
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        return {"host_to_device_ms_per_batch": None, "compute_on_device_ms_per_batch": None,
                "note": "no GPU: the model runs where the pixels are"}
    size = images.shape[1]

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])
    def infer(batch):
        return model(batch, training=False)

    batches = [images[s:s + batch_size] for s in range(0, len(images) - batch_size + 1, batch_size)] or [images]
    with tf.device("/GPU:0"):
        infer(tf.identity(tf.constant(batches[0])))
        started = time.perf_counter()
        on_device = [tf.identity(tf.constant(b)) for b in batches]
        float(tf.reduce_sum(tf.stack([tf.cast(t[0, 0, 0, 0], tf.float32) for t in on_device])))
        copy_s = time.perf_counter() - started
        started = time.perf_counter()
        for tensor in on_device:
            out = infer(tensor)
        out.numpy()
        compute_s = time.perf_counter() - started
    return {"host_to_device_ms_per_batch": round(1000 * copy_s / len(batches), 3),
            "compute_on_device_ms_per_batch": round(1000 * compute_s / len(batches), 3),
            "batch_size": int(len(batches[0]))}


def measure(data_dir: Path, work: Path, backbone: str, image_size, weights: str, precision: str,
            batch_size, seed_recipe: bool, xla: bool) -> dict:
    import tensorflow as tf

    from featurepipe.backbones.accel import default_decode_threads, precision_policy

    spec = BackboneSpec(name=backbone, image_size=image_size, weights=weights).resolved()
    cache = work / f"cache-{backbone}-{precision}"
    dataset = scan(data_dir, cache_dir=cache)
    n = len(dataset)
    started = time.perf_counter()
    first = extract(dataset, spec, cache, batch_size=batch_size, precision=precision)
    featurepipe_seconds = time.perf_counter() - started
    started = time.perf_counter()
    again = extract(scan(data_dir, cache_dir=cache), spec, cache, batch_size=batch_size, precision=precision)
    rerun_seconds = time.perf_counter() - started

    started = time.perf_counter()
    with precision_policy(precision):
        model = build_feature_model(spec, cache)
    build_seconds = time.perf_counter() - started
    images = np.stack([decode_image(p, spec.image_size, spec.resize) for p in dataset.frame["path"]])
    used_batch = first.batch_size or batch_size or 32
    compute_seconds = time_compute_limit(model, images, used_batch)
    steady = featurepipe_seconds - first.build_seconds
    gpu = bool(tf.config.list_physical_devices("GPU"))
    threads = default_decode_threads()
    breakdown = decode_breakdown(dataset.frame["path"].tolist(), spec.image_size, spec.resize)
    per_image_ms = breakdown["decode_ms_per_image_1thread"] + breakdown["resize_ms_per_image_1thread"]
    breakdown["decode_threads"] = threads
    breakdown["decode_resize_limit_img_per_s"] = round(1000 * threads / per_image_ms, 1) if per_image_ms else None
    breakdown.update(device_breakdown(model, images, used_batch))
    breakdown["model_only_ms_per_batch_from_host"] = round(1000 * compute_seconds / max(1, -(-n // used_batch)), 3)
    figures = {
        "backbone": spec.name, "image_size": spec.image_size, "weights": weights, "precision": precision,
        "device": "GPU " + ", ".join(d.name for d in tf.config.list_physical_devices("GPU")) if gpu else "CPU",
        "images": n, "mean_file_kb": round(sum(dataset.frame["bytes"]) / n / 1024, 1), "cpus": os.cpu_count(),
        "batch_size": used_batch, "batch_size_auto": batch_size is None,
        "model_build_s": round(build_seconds, 2), "featurepipe_model_build_s": round(first.build_seconds, 2),
        "compute_limit_s": round(compute_seconds, 2), "compute_limit_img_per_s": round(n / compute_seconds, 1),
        "featurepipe_first_run_s": round(featurepipe_seconds, 2),
        "featurepipe_img_per_s_incl_build": round(n / featurepipe_seconds, 1),
        "featurepipe_img_per_s_excl_build": round(n / steady, 1),
        "share_of_model_only": round(compute_seconds / steady, 3),
        "rerun_s": round(rerun_seconds, 3), "extracted_first": first.extracted, "extracted_rerun": again.extracted,
        "where_time_goes": breakdown,
    }
    if xla and gpu:
        xla_seconds = time_compute_limit(model, images, used_batch, jit=True)
        figures["compute_limit_xla_img_per_s"] = round(n / xla_seconds, 1)
    if seed_recipe:
        seed_seconds = time_seed_recipe(model, data_dir, spec, used_batch)
        figures.update(seed_recipe_s=round(seed_seconds, 2), seed_recipe_img_per_s=round(n / seed_seconds, 1),
                       featurepipe_speedup_vs_seed_recipe_excl_build=round(seed_seconds / steady, 3))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--backbones", default=None, help="Comma-separated; overrides --backbone.")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--weights", default="imagenet", help="imagenet | random (no download needed)")
    parser.add_argument("--precisions", default="float32", help="Comma-separated: float32, mixed_float16, ...")
    parser.add_argument("--batch-size", type=int, default=None, help="Default: extract's automatic choice.")
    parser.add_argument("--upscale", type=int, default=0,
                        help="Re-encode each photo as a JPEG with this longer side (e.g. 3000 for ~6 MP).")
    parser.add_argument("--limit", type=int, default=0, help="Use only this many demo photos (before copies).")
    parser.add_argument("--no-seed-recipe", action="store_true", help="Skip the ImageDataGenerator comparison.")
    parser.add_argument("--xla", action="store_true", help="Also time the model alone under XLA (GPU only).")
    parser.add_argument("--json-out", type=Path, default=None, help="Append one JSON line per measurement here.")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fp-bench-"))
    try:
        data_dir = make_dataset(work / "data", args.copies, args.upscale, args.limit)
        warm_up_tensorflow()
        for backbone in (args.backbones or args.backbone).split(","):
            for precision in args.precisions.split(","):
                figures = measure(data_dir, work, backbone.strip(), args.image_size, args.weights, precision.strip(),
                                  args.batch_size, not args.no_seed_recipe, args.xla)
                figures["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                print(json.dumps(figures, indent=2), flush=True)
                if args.json_out is not None:
                    with open(args.json_out, "a") as handle:
                        handle.write(json.dumps(figures) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
