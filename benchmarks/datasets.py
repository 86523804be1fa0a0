"""Benchmark data sets assembled from what this machine can reach (not a test).

    python benchmarks/datasets.py fmnist --per-class 30 --out /tmp/fmnist30
    python benchmarks/datasets.py subset --src data/demo --per-class 10 --seed 1 --out /tmp/demo10s1

`fmnist`: Debian's `dataset-fashion-mnist` (apt-get install dataset-fashion-mnist), 10 classes of
28x28 grey clothing photos. A seeded subsample of N images per class is written as RGB PNG files in
DATA/<class>/ (what featurepipe and the seeds' flow_from_directory both read). Optionally each
image is placed on a random non-square canvas (--aspect), so resize policies actually differ, as
they do on real photos.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_fmnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    images, labels = FMNIST_DIR / f"{prefix}-images-idx3-ubyte.gz", FMNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists():
        raise SystemExit(f"{images} is missing: apt-get install dataset-fashion-mnist")
    return _idx(images), _idx(labels)


def make_fmnist(out: Path, per_class: int, seed: int = 0, size: int = 96, aspect: bool = False,
                split: str = "train", offset: int = 0) -> Path:
    """N images per class as RGB PNGs (upscaled to `size`), DATA/<class>/<index>.png. `offset` skips the
    first draws of each class, so two calls with different offsets give disjoint sets."""
    x, y = load_fmnist(split)
    rng = np.random.default_rng(seed)
    out = Path(out)
    for c, name in enumerate(FMNIST_CLASSES):
        idx = rng.permutation(np.flatnonzero(y == c))[offset: offset + per_class]
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in idx:
            img = Image.fromarray(x[i]).convert("RGB").resize((size, size), Image.BICUBIC)
            if aspect:
                # A random wider or taller canvas in a random grey, the item off-centre: like a product
                # photo that was not cropped square.
                w, h = (int(size * rng.uniform(1.0, 1.8)), size) if rng.random() < 0.5 else (size, int(size * rng.uniform(1.0, 1.8)))
                canvas = Image.new("RGB", (w, h), tuple([int(rng.integers(0, 60))] * 3))
                canvas.paste(img, (int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))))
                img = canvas
            img.save(out / name / f"{i:05d}.png")
    return out


def make_subset(src: Path, out: Path, per_class: int, seed: int = 0) -> Path:
    """A seeded draw of N images per class of DATA/<class>/* (hard links where possible, else copies):
    smaller versions of a photo set, e.g. the demo at 10 or 15 photos per class."""
    import random
    import shutil

    rng = random.Random(seed)
    src, out = Path(src), Path(out)
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.is_file())
        (out / folder.name).mkdir(parents=True, exist_ok=True)
        for path in rng.sample(files, min(per_class, len(files))):
            try:
                (out / folder.name / path.name).hardlink_to(path)
            except OSError:
                shutil.copy2(path, out / folder.name / path.name)
    return out


def named(name: str, scratch: Path, demo: Path) -> Path:
    """A benchmark data set by name, made under `scratch` on first use: `fmnistN[:seed]` (N per class),
    `demoN:seed` (N photos per class drawn from `demo`), anything else a folder as given."""
    stem, _, seed = name.partition(":")
    out = Path(scratch) / name.replace(":", "s")
    if stem.startswith("fmnist"):
        if not out.exists():
            make_fmnist(out, int(stem.removeprefix("fmnist") or 30), seed=int(seed or 0))
        return out
    if stem.startswith("demo") and stem != "demo":
        if not out.exists():
            make_subset(demo, out, int(stem.removeprefix("demo")), seed=int(seed or 0))
        return out
    return Path(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=["fmnist", "subset"])
    parser.add_argument("--src", type=Path, help="subset: the DATA/<class>/* folder to draw from")
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--aspect", action="store_true")
    args = parser.parse_args()
    if args.name == "subset":
        if args.src is None:
            parser.error("subset needs --src DATA")
        make_subset(args.src, args.out, args.per_class, args.seed)
    else:
        make_fmnist(args.out, args.per_class, args.seed, args.size, args.aspect)
    print(args.out)


if __name__ == "__main__":
    main()
