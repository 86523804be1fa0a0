"""How featurepipe turns an image file into model input, in plain Pillow + NumPy, shipped with every
export as OUT/preprocess.py.

An exported model is run where featurepipe is not installed, yet its probabilities should be the
ones `featurepipe predict` gives. predict decodes with featurepipe.data.images.decode_image (JPEG
DCT-scale draft decoding, EXIF orientation, alpha on white, Pillow's antialiased bilinear resize
under the run's resize policy); TensorFlow's in-graph resize is close to that, not identical. So
export copies THIS file (standard library, Pillow and NumPy only: no featurepipe import) beside the
model, and its `sized_image` reproduces decode_image's pixels for the usual RGB/RGBA/greyscale
photos (tests/deploy/test_recipe.py holds it to byte equality). Exotic modes (16-bit, LAB, CMYK
with ICC profiles) go through Pillow's plain convert here, which decode_image handles more carefully.

    python preprocess.py IMAGE SIZE POLICY   prints the array's shape and mean (a smoke test)
"""

import sys

import numpy as np
from PIL import Image, ImageOps

LETTERBOX_FILL = 128          # featurepipe.backbones.spec.LETTERBOX_FILL (the test checks they agree)
RESAMPLE = Image.Resampling.BILINEAR


def _rgb(img):
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def full_image(path):
    """uint8 (H, W, 3): the whole file decoded (EXIF-oriented, RGB, alpha on white), for the models
    that resize inside (keras, savedmodel)."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        return np.asarray(_rgb(img), dtype=np.uint8)


def resized(img, size, policy):
    """A PIL RGB image resized to size x size under featurepipe's resize policy."""
    width, height = img.size
    if policy == "letterbox":
        if width == height:
            return img if width == size else img.resize((size, size), RESAMPLE)
        scale = size / max(width, height)
        new = (max(1, round(width * scale)), max(1, round(height * scale)))
        canvas = Image.new("RGB", (size, size), (LETTERBOX_FILL,) * 3)
        canvas.paste(img.resize(new, RESAMPLE), ((size - new[0]) // 2, (size - new[1]) // 2))
        return canvas
    if (width, height) == (size, size):
        return img
    if policy == "squash":
        return img.resize((size, size), RESAMPLE)
    if policy != "center_crop":
        raise ValueError(f"unknown resize policy {policy!r}; expected squash, center_crop or letterbox")
    side = min(width, height)
    left, top = (width - side) / 2.0, (height - side) / 2.0
    return img.resize((size, size), RESAMPLE, box=(left, top, left + side, top + side))


def sized_image(path, size, policy):
    """uint8 (size, size, 3): the file as featurepipe predict feeds it to a model of that size."""
    with Image.open(path) as img:
        if img.format == "JPEG":
            # predict decodes big JPEGs at 1/2, 1/4 or 1/8 scale while both sides stay >= size
            img.draft("RGB", (size, size))
        img.load()
        img = ImageOps.exif_transpose(img)
        return np.asarray(resized(_rgb(img), int(size), policy), dtype=np.uint8)


if __name__ == "__main__":
    array = sized_image(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    print(array.shape, float(array.mean()))
