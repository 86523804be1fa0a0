"""Benchmark data sets assembled from what this machine can reach (not a test).

    python benchmarks/datasets.py fmnist --per-class 30 --out /tmp/fmnist30
    python benchmarks/datasets.py subset --src data/demo --per-class 10 --seed 1 --out /tmp/demo10s1
    python benchmarks/datasets.py photos --set animals --per-class 10 --seed 1 --out /tmp/animals10s1
    python benchmarks/datasets.py photos --set scenes --camera --out /tmp/scenes-camera
    python benchmarks/datasets.py photos --list

`fmnist`: Debian's `dataset-fashion-mnist` (apt-get install dataset-fashion-mnist), 10 classes of
28x28 grey clothing photos. A seeded subsample of N images per class is written as RGB PNG files in
DATA/<class>/ (what featurepipe and the seeds' flow_from_directory both read). Optionally each
image is placed on a random non-square canvas (--aspect), so resize policies actually differ, as
they do on real photos.

`photos`: real photographs in real categories, from two Debian packages (README "Photo sets"):
`animals`, `produce` and `objects` are Tux Paint's photographic stamps (apt-get install
tuxpaint-stamps-default: PNG cut-outs with transparency), each composited on a white (or, with
--background light, a random near-white) canvas of random aspect 0.6-1.8, the object scaled to
45-85% of it and placed off-centre at random; `scenes` are GCompris's full-frame photos (apt-get
install gcompris-qt-data; read out of its Qt resource files). Every written image is a different
source photo: a class has as many images as it has sources (--per-class draws up to N of them, all by
default). Images are JPEG quality 90, a few hundred pixels on the long side, or with --camera
3000-4000 px (upscaled: camera-sized files, not camera detail).
"""

from __future__ import annotations

import argparse
import gzip
import math
import shutil
import struct
import sys
import tempfile
import zlib
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


STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
GCOMPRIS_RCC = Path("/usr/share/gcompris-qt/rcc")
_CAT = "gcompris/src/activities/categorization/resource/images/"

# Photo sets: set -> (package, {class: [globs]}). Stamp globs are relative to STAMPS_DIR; GCompris globs
# are paths inside its .rcc files (rcc:<file.rcc>:<glob>). A stamp whose PNG has an SVG beside it is a
# rendering of a vector drawing and is skipped; PHOTO_EXCLUDE lists the drawings and paintings among the
# remaining PNGs (found by looking at every candidate), and duplicates (a mirrored copy of one photo).
PHOTO_SETS: dict[str, tuple[str, dict[str, list[str]]]] = {
    "animals": ("tuxpaint-stamps-default", {
        "bird": ["animals/birds/*.png"],
        "bovid": ["animals/mammals/bovines/*.png"],  # cattle, bison, yak, sheep, goats, gnus, blackbuck
        "carnivore": ["animals/mammals/cats/*.png", "animals/mammals/dogs/*.png", "animals/mammals/bears/*.png",
                      "animals/mammals/badger.png", "animals/mammals/ferret.png"],
        "hoofed": ["animals/mammals/deer/*.png", "animals/mammals/equines/*.png", "animals/mammals/camel/*.png",
                   "animals/mammals/giraffe.png", "animals/mammals/hippopotamus.png", "animals/mammals/pig*.png",
                   "animals/mammals/rhino_black.png", "animals/mammals/wildboar.png"],  # ungulates, not bovids
        "sea_life": ["animals/fish/*.png", "animals/shellfish/*.png", "animals/mammals/aquatic/*.png"],
    }),
    "produce": ("tuxpaint-stamps-default", {
        "flower": ["plants/flowers/*.png"],
        "fruit": ["food/fruit/*.png"],
        "vegetable": ["food/vegetables/*.png"],
    }),
    "objects": ("tuxpaint-stamps-default", {
        "coin": ["symbols/money/*/coins/*.png", "symbols/money/japanese/*.png"],
        "gravestone": ["seasonal/halloween/grave-*.png"],
        "instrument": ["hobbies/music/*/*.png"],
        "tool": ["household/tools/*.png"],
    }),
    "scenes": ("gcompris-qt-data", {
        "animal": ["rcc:explore_farm_animals.rcc:*/animals/*.webp",
                   "rcc:explore_world_animals.rcc:*/animals/*.webp"],
        "fish": ["rcc:categorization.rcc:" + _CAT + "fishes/*.webp"],
        "monument": ["rcc:categorization.rcc:" + _CAT + "monuments/*.webp"],
        "renewable_energy": ["rcc:categorization.rcc:" + _CAT + "renewable/*.webp"],  # wind, solar, dams
        "tool": ["rcc:categorization.rcc:" + _CAT + "tools/*.webp"],
    }),
}
# Source detail: in `produce` and `objects` some classes come from much smaller stamps than others (fruit
# and vegetables ~50-70 px on the long side, flowers ~140; coins ~55-110, instruments ~300), so sharpness
# alone would tell the classes apart. There every source is first reduced to at most this many pixels on its
# long side, so all classes are upscaled from the same detail (--detail overrides; 0 keeps sources as are).
PHOTO_DETAIL = {"produce": 64, "objects": 96}
PHOTO_EXCLUDE = {
    "animals/birds/adelaide-rosella.png", "animals/birds/quetzal.png",  # illustrations
    "animals/fish/shrimp.png", "animals/mammals/aquatic/whale.png",  # drawing, painting
    "household/tools/measuring_tape_mirror.png",  # measuring_tape.png mirrored
    "plants/flowers/yellow-flower.png",  # drawing
    "explore_world_animals.rcc:narwhal.webp",  # under water: would pass for the fish class
}


def _rcc_files(path: Path):
    """(name, bytes) of every file in a Qt resource file (rcc format 1-3, zlib-compressed or stored)."""
    b = path.read_bytes()
    if b[:4] != b"qres":
        raise SystemExit(f"{path} is not a Qt resource file")
    version, tree, data, names = struct.unpack(">IIII", b[4:20])
    node = 22 if version >= 2 else 14

    def name(off: int) -> str:
        n = struct.unpack(">H", b[names + off: names + off + 2])[0]
        return b[names + off + 6: names + off + 6 + 2 * n].decode("utf-16-be")

    def walk(i: int, prefix: str):
        o = tree + i * node
        name_off, flags = struct.unpack(">IH", b[o: o + 6])
        here = prefix + name(name_off) if i else ""
        if flags & 2:  # directory
            count, first = struct.unpack(">II", b[o + 6: o + 14])
            for j in range(first, first + count):
                yield from walk(j, here + "/" if i else "")
            return
        off = data + struct.unpack(">I", b[o + 10: o + 14])[0]
        raw = b[off + 4: off + 4 + struct.unpack(">I", b[off: off + 4])[0]]
        if flags & 4:
            raise SystemExit(f"{path}: zstd-compressed entries are not supported")
        yield here, zlib.decompress(raw[4:]) if flags & 1 else raw

    yield from walk(0, "")


def photo_sources(set_name: str) -> dict[str, list[tuple[str, object]]]:
    """{class: [(source id, opener)]} of a photo set, sorted by source id; each opener gives a PIL image.
    Exits naming the apt package when the source is not installed."""
    import fnmatch
    import io

    package, classes = PHOTO_SETS[set_name]
    out: dict[str, list[tuple[str, object]]] = {}
    if package == "tuxpaint-stamps-default":
        if not STAMPS_DIR.is_dir():
            raise SystemExit(f"{STAMPS_DIR} is missing: apt-get install tuxpaint-stamps-default")
        for cls, globs in classes.items():
            files = {p for g in globs for p in STAMPS_DIR.glob(g)}
            out[cls] = [(str(p.relative_to(STAMPS_DIR)), lambda p=p: Image.open(p)) for p in sorted(files)
                        if not p.with_suffix(".svg").exists() and str(p.relative_to(STAMPS_DIR)) not in PHOTO_EXCLUDE]
        return out
    if not GCOMPRIS_RCC.is_dir():
        raise SystemExit(f"{GCOMPRIS_RCC} is missing: apt-get install gcompris-qt-data")
    cache: dict[str, dict[str, bytes]] = {}
    for cls, globs in classes.items():
        found: dict[str, bytes] = {}
        for g in globs:
            _, rcc, pattern = g.split(":", 2)
            if rcc not in cache:
                cache[rcc] = dict(_rcc_files(GCOMPRIS_RCC / rcc))
            for name, blob in cache[rcc].items():
                if fnmatch.fnmatch(name, pattern) and f"{rcc}:{name.rsplit('/', 1)[-1]}" not in PHOTO_EXCLUDE:
                    found[f"{rcc}:{name}"] = blob
        out[cls] = [(k, lambda v=v: Image.open(io.BytesIO(v))) for k, v in sorted(found.items())]
    return out


def _stems(keys: list[str]) -> list[str]:
    """File stems for source ids: the file name, with as many parent folders as it takes to be unique."""
    parts = [k.replace(":", "/").rsplit(".", 1)[0].split("/") for k in keys]
    for depth in range(1, max(map(len, parts)) + 1):
        stems = ["-".join(p[-depth:]) for p in parts]
        if len(set(stems)) == len(stems):
            return stems
    raise ValueError("duplicate source ids")


def _canvas_size(rng: np.random.Generator, long_side: int) -> tuple[int, int]:
    aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.8)))  # width / height
    return (long_side, round(long_side / aspect)) if aspect >= 1 else (round(long_side * aspect), long_side)


def photo_image(img: Image.Image, rng: np.random.Generator, camera: bool = False,
                background: str = "white", detail: int = 0) -> Image.Image:
    """One source photo as a benchmark image. A cut-out (an image with transparency) is trimmed to its
    opaque part, scaled so it fills 45-85% of a random non-square canvas and placed at a random spot; a
    full-frame photo keeps its own frame and is only resized. Long side 256-512 px, or 3000-4000 px."""
    long_side = int(rng.integers(3000, 4001) if camera else rng.integers(256, 513))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        box = img.getchannel("A").point(lambda a: 255 if a > 16 else 0).getbbox()
        img = img.crop(box) if box else img
        if detail and max(img.size) > detail:
            img.thumbnail((detail, detail), Image.LANCZOS)
        w, h = _canvas_size(rng, long_side)
        s = rng.uniform(0.45, 0.85) * min(w / img.width, h / img.height)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.LANCZOS)
        colour = (255, 255, 255) if background == "white" else tuple(int(c) for c in rng.integers(225, 256, 3))
        canvas = Image.new("RGBA", (w, h), colour + (255,))
        canvas.alpha_composite(img, (int(rng.integers(0, w - img.width + 1)), int(rng.integers(0, h - img.height + 1))))
        return canvas.convert("RGB")
    img = img.convert("RGB")
    if detail and max(img.size) > detail:
        img.thumbnail((detail, detail), Image.LANCZOS)
    s = long_side / max(img.size)
    return img.resize((round(img.width * s), round(img.height * s)), Image.LANCZOS)


def make_photos(out: Path, set_name: str, per_class: int = 0, seed: int = 0, camera: bool = False,
                background: str = "white", detail: int | None = None) -> Path:
    """DATA/<class>/<source>.jpg for a photo set: a seeded draw of up to `per_class` source photos per class
    (0: all), one image per source photo, JPEG quality 90. `detail`: PHOTO_DETAIL's value for the set
    when None."""
    detail = PHOTO_DETAIL.get(set_name, 0) if detail is None else detail
    rng = np.random.default_rng(seed)
    out = Path(out)
    for cls, sources in photo_sources(set_name).items():
        picked = rng.permutation(len(sources))[: per_class or len(sources)]
        if per_class and len(picked) < per_class:
            print(f"{set_name}/{cls}: only {len(sources)} source photos (asked {per_class})", file=sys.stderr)
        (out / cls).mkdir(parents=True, exist_ok=True)
        stems = _stems([key for key, _ in sources])
        for i in sorted(picked):
            photo_image(sources[i][1](), rng, camera, background, detail).save(out / cls / f"{stems[i]}.jpg", quality=90)
    return out


def make_camera250(out: Path, seed: int = 0) -> Path:
    """250 camera-sized photos (long side 3000-4000 px) in 11 classes: every animals and scenes photo
    (93 + 146) and objects' 11 instruments, classes named set_class (both sets have a "tool")."""
    with tempfile.TemporaryDirectory() as scratch:
        for set_name in ("animals", "scenes", "objects"):
            made = make_photos(Path(scratch) / set_name, set_name, seed=seed, camera=True)
            for folder in sorted(p for p in made.iterdir() if p.is_dir()):
                if set_name == "objects" and folder.name != "instrument":
                    continue
                shutil.copytree(folder, Path(out) / f"{set_name}_{folder.name}")
    return Path(out)


def named(name: str, scratch: Path, demo: Path) -> Path:
    """A benchmark data set by name, made under `scratch` on first use: `fmnistN[:seed]` (N per class),
    `demoN:seed` (N photos per class drawn from `demo`), `photos-SET[N][:seed]` (a photo set, all its
    photos or N per class), `camera250[:seed]` (make_camera250), anything else a folder as given."""
    stem, _, seed = name.partition(":")
    out = Path(scratch) / name.replace(":", "s")
    if stem == "camera250":
        if not out.exists():
            make_camera250(out, seed=int(seed or 0))
        return out
    if stem.startswith("photos-"):
        set_name = stem.removeprefix("photos-").rstrip("0123456789")
        if not out.exists():
            make_photos(out, set_name, int(stem[len("photos-") + len(set_name):] or 0), seed=int(seed or 0))
        return out
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
    parser.add_argument("name", choices=["fmnist", "subset", "photos"])
    parser.add_argument("--src", type=Path, help="subset: the DATA/<class>/* folder to draw from")
    parser.add_argument("--set", choices=sorted(PHOTO_SETS), help="photos: which photo set")
    parser.add_argument("--list", action="store_true", help="photos: print each set's classes and photo counts")
    parser.add_argument("--camera", action="store_true", help="photos: camera-sized JPEGs (long side 3000-4000 px)")
    parser.add_argument("--background", choices=["white", "light"], default="white",
                        help="photos: behind cut-outs, white or a random near-white colour per image")
    parser.add_argument("--detail", type=int, default=None,
                        help="photos: reduce each source to at most PX on its long side first (default per set: "
                             + ", ".join(f"{k} {v}" for k, v in PHOTO_DETAIL.items()) + ", others 0 = as they are)")
    parser.add_argument("--per-class", type=int, default=None, help="fmnist 30, subset 30, photos all")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--aspect", action="store_true")
    args = parser.parse_args()
    if args.name == "photos" and args.list:
        for set_name in sorted(PHOTO_SETS) if args.set is None else [args.set]:
            counts = {cls: len(v) for cls, v in photo_sources(set_name).items()}
            print(f"{set_name} ({PHOTO_SETS[set_name][0]}): {sum(counts.values())} photos, "
                  + ", ".join(f"{cls} {n}" for cls, n in counts.items()))
        return
    if args.out is None:
        parser.error("--out DIR is required")
    if args.name == "subset":
        if args.src is None:
            parser.error("subset needs --src DATA")
        make_subset(args.src, args.out, args.per_class or 30, args.seed)
    elif args.name == "photos":
        if args.set is None:
            parser.error("photos needs --set " + "|".join(sorted(PHOTO_SETS)))
        make_photos(args.out, args.set, args.per_class or 0, args.seed, args.camera, args.background,
                    args.detail)
    else:
        make_fmnist(args.out, args.per_class or 30, args.seed, args.size, args.aspect)
    print(args.out)


if __name__ == "__main__":
    main()
