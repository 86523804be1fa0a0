"""The perceptual hash of an image (pHash): what near-duplicate detection (data.dedup) compares.

Decoding goes through data.images (EXIF orientation, alpha on white, frame 0, the same refusals);
data.perceptual remembers the hashes of a dataset by content hash.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
from PIL import Image

from featurepipe.core.errors import ImageDecodeError, UsageError
from featurepipe.data.images import DECODE_ERRORS, loaded_rgb


# 32x32 grey thumbnail -> 2-D DCT -> the 8x8 lowest frequencies, each bit "above the median".
# Resizing, re-encoding and mild colour changes barely move the low frequencies, so copies of
# one photo land within a few bits of each other whatever backbone extracted the features.
# A crop moves them more: the hash of the central 90% and 80% is kept as well, so a copy cropped
# by ~10-20% matches one of its original's inner hashes (benchmarks/dedup.py measures this).
# A crop that is not centred (5% off the left, 12% off the right) moves the frame off every central
# crop; on data/demo a frame 3% off already costs ~4 bits (median; 8 at the 90th percentile) and 5%
# off ~8 (12). So the hashes of the 16 trims that cut 5% or 11% off each side are kept too: any
# trim of ~2-14% per side is then within ~3% of one of them (benchmarks/dedup.py).
_PHASH_SIDE = 32
_PHASH_BITS_SIDE = 8
PHASH_CROPS: tuple[float, ...] = (1.0, 0.9, 0.8)
PHASH_TRIM_STEPS: tuple[float, ...] = (0.05, 0.11)
# Grey levels between the darkest and lightest pixel below which an image counts as flat (no hash).
_PHASH_FLAT_RANGE = 2
# (left, top, right, bottom) fractions cut off, every combination of PHASH_TRIM_STEPS.
PHASH_TRIMS: tuple[tuple[float, float, float, float], ...] = tuple(
    (left, top, right, bottom) for left in PHASH_TRIM_STEPS for top in PHASH_TRIM_STEPS
    for right in PHASH_TRIM_STEPS for bottom in PHASH_TRIM_STEPS)


def _phash_of(grey: Image.Image) -> int:
    from scipy.fft import dctn

    small = grey.resize((_PHASH_SIDE, _PHASH_SIDE), Image.Resampling.BOX)
    low = dctn(np.asarray(small, dtype=np.float64), type=2, norm="ortho")[:_PHASH_BITS_SIDE, :_PHASH_BITS_SIDE].ravel()
    # The DC term (overall brightness) is left out of the median so it cannot skew every other bit.
    bits = low > np.median(low[1:])
    return int(sum(1 << i for i, bit in enumerate(bits) if bit))


def perceptual_hash(path: str | os.PathLike[str], crops: tuple[float, ...] = PHASH_CROPS,
                    trims: tuple[tuple[float, float, float, float], ...] = PHASH_TRIMS,
                    expect_sha256: Optional[str] = None) -> tuple[int, ...]:
    """64-bit DCT perceptual hashes (pHash) of an image file, its central crops and trims, as unsigned ints.

    One hash per fraction in `crops` (1.0 = the whole image), then one per (left, top, right,
    bottom) fractions cut off in `trims`. Decoding follows decode_image (EXIF orientation, alpha on
    white, frame 0) and raises ImageDecodeError for the same files.
    Compare two hashes with ``bin(a ^ b).count("1")``.

    A flat image (one colour, whatever the colour) has no structure to hash: every flat image would
    get the same hash and look like a copy of every other. It gets the empty tuple: no hash.
    `expect_sha256`: as for decode_image (the hashes are remembered by content hash).
    """
    p = os.fspath(path)
    with loaded_rgb(p, _PHASH_SIDE * 4, expect_sha256) as rgb:   # DCT-domain downscale: a cheap decode
        try:
            grey = rgb.convert("L")
        except DECODE_ERRORS as e:
            raise ImageDecodeError(p, f"truncated or corrupt image data: {e}") from None
    width, height = grey.size
    lo, hi = grey.getextrema()
    if hi - lo < _PHASH_FLAT_RANGE:
        return ()
    out = []
    for fraction in crops:
        if not 0 < fraction <= 1:
            raise UsageError(f"crop fractions must be in (0, 1], got {fraction}")
        w, h = width * fraction, height * fraction
        left, top = (width - w) / 2.0, (height - h) / 2.0
        region = grey if fraction == 1 else grey.crop((int(left), int(top), int(round(left + w)), int(round(top + h))))
        out.append(_phash_of(region))
    for cut in trims:
        left, top, right, bottom = cut
        if not (all(0 <= f < 1 for f in cut) and left + right < 1 and top + bottom < 1):
            raise UsageError(f"trims cut fractions in [0, 1) off each side, leaving something; got {cut}")
        box = (int(left * width), int(top * height), int(round(width * (1 - right))), int(round(height * (1 - bottom))))
        out.append(_phash_of(grey.crop(box)))
    return tuple(out)
