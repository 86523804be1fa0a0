"""Decode once, feed every feature set: per-spec `extract` vs `extract_many` (not a test).

    python benchmarks/shared_decode.py --data photos-scenes12:camera --data data/demo

For each data set, in one process, both from a cache-less start (a fresh cache folder each; the
folder is scanned before the clock starts, and the files are read once beforehand so both find them
in the OS page cache): `extract` of each of the 9 default feature sets (EfficientNet-Lite0/1/2 x
squash/center_crop/letterbox) one after the other, then `extract_many` of the same 9. Prints one JSON
line per data set: wall seconds and seconds per image of each, and whether the two caches hold the
same stores bit for bit (fingerprints, keys, every feature value, failures); and, apart, the
milliseconds per image of decoding alone (one thread) both ways. TensorFlow is warmed up first.

Data names: a folder, or benchmarks.datasets' names (`photos-SET[N][:seed]`); `:camera` at the end
makes a photo set camera-sized (3000-4000 px JPEGs, benchmarks/datasets.py --camera).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from featurepipe.cli.quiet import quiet_tensorflow_startup

quiet_tensorflow_startup()

from featurepipe.data.dataset import scan  # noqa: E402
from featurepipe.evaluation.search import search_specs  # noqa: E402
from featurepipe.extraction.extract import extract, open_stores  # noqa: E402
from featurepipe.extraction.shared import extract_many  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def data_set(name: str, scratch: Path) -> Path:
    from benchmarks.datasets import make_photos, named

    if name.endswith(":camera"):
        stem = name.removesuffix(":camera")
        set_name = stem.removeprefix("photos-").rstrip("0123456789")
        out = scratch / f"{stem}-camera"
        if not out.exists():
            make_photos(out, set_name, int(stem[len("photos-") + len(set_name):] or 0), camera=True)
        return out
    return named(name, scratch, REPO / "data" / "demo")


def stores_state(specs, cache: Path) -> list:
    """Every store's fingerprint, keys, feature bits and failures."""
    state = []
    for spec in specs:
        store = open_stores(spec, cache).originals
        keys = sorted(store.keys())
        state.append((store.fingerprint, keys, store.read(keys).view(np.uint32).tobytes(), store.failures()))
    return state


def warm_up() -> None:
    """TensorFlow's one-off start (thread pools, first trace) outside both timings."""
    from featurepipe.backbones.build import build_feature_model, inference_function

    spec = search_specs()[0]
    inference_function(build_feature_model(spec), spec.image_size)(np.zeros((1, spec.image_size,
                                                                              spec.image_size, 3), np.uint8))


def decoding_alone(dataset, specs) -> dict:
    """Milliseconds per image of decoding alone, one thread: decode_image per spec (what per-spec
    extract does) vs one decode_variants for all specs (what extract_many does)."""
    from featurepipe.core.errors import ImageDecodeError
    from featurepipe.data.images import decode_image, decode_variants

    items = list(zip(dataset.frame["path"], dataset.frame["hash"]))
    started = time.perf_counter()
    for path, content_hash in items:
        for spec in specs:
            try:
                decode_image(path, spec.image_size, spec.resize, expect_sha256=content_hash)
            except ImageDecodeError:
                pass
    per_spec = time.perf_counter() - started
    started = time.perf_counter()
    for path, content_hash in items:
        try:
            decode_variants(path, [(spec.image_size, spec.resize) for spec in specs], expect_sha256=content_hash)
        except ImageDecodeError:
            pass
    shared = time.perf_counter() - started
    return {"per_spec_ms_per_image": round(1000 * per_spec / len(items), 1),
            "shared_ms_per_image": round(1000 * shared / len(items), 1)}


def measure(data: Path, scratch: Path) -> dict:
    specs = search_specs()
    files = [p for p in data.rglob("*") if p.is_file()]
    for path in files:           # into the page cache, for both runs alike
        path.read_bytes()
    one, many = scratch / "cache-per-spec", scratch / "cache-shared"
    for cache in (one, many):
        shutil.rmtree(cache, ignore_errors=True)
    dataset = scan(data, cache_dir=one)
    started = time.perf_counter()
    per_spec = [extract(dataset, spec, one) for spec in specs]
    per_spec_seconds = time.perf_counter() - started
    dataset = scan(data, cache_dir=many)
    started = time.perf_counter()
    shared = extract_many(dataset, specs, many)
    shared_seconds = time.perf_counter() - started
    images = per_spec[0].images
    return {
        "data": str(data), "images": images, "feature_sets": len(specs),
        "camera_sized": bool(files) and max(os.path.getsize(p) for p in files) > 1_000_000,
        "per_spec_seconds": round(per_spec_seconds, 1), "shared_seconds": round(shared_seconds, 1),
        "per_spec_s_per_image": round(per_spec_seconds / images, 3),
        "shared_s_per_image": round(shared_seconds / images, 3),
        "speedup": round(per_spec_seconds / shared_seconds, 2),
        "per_spec_build_seconds": round(sum(r.build_seconds for r in per_spec), 1),
        "shared_build_seconds": round(sum(r.build_seconds for r in shared), 1),
        "extracted": [sum(r.extracted for r in per_spec), sum(r.extracted for r in shared)],
        "copied": [sum(r.copied for r in per_spec), sum(r.copied for r in shared)],
        "identical": stores_state(specs, one) == stores_state(specs, many),
        "decoding_alone_1_thread": decoding_alone(dataset, specs),
        "load": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", help="a folder or a benchmarks.datasets name (repeatable)")
    parser.add_argument("--scratch", type=Path, default=None, help="where data sets and caches go (default: temp)")
    args = parser.parse_args()
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="shared-decode-"))
    warm_up()
    for name in args.data or ["photos-scenes12:camera", "data/demo"]:
        print(json.dumps(measure(data_set(name, scratch), scratch)), flush=True)


if __name__ == "__main__":
    main()
