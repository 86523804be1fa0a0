"""Decoding image files into fixed-size RGB arrays (orientation, colour, resize), decoding them in
batches ahead of use, thumbnails, and perceptual hashes. Augmentation is in featurepipe.data.augment.

Nothing here imports TensorFlow/Keras, so decoding can run (and be tested) without paying a
multi-second framework import and its thread pools.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import os
import re
import stat
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Optional, Sequence, TypeVar

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from featurepipe.backbones.spec import LETTERBOX_FILL, RESIZE_POLICIES
from featurepipe.core.errors import ImageDecodeError, UsageError
from featurepipe.core.hashcache import read_regular_file

T = TypeVar("T")
R = TypeVar("R")

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "RESIZE_POLICIES",
    "LETTERBOX_FILL",
    "decode_ahead",
    "decode_batches",
    "decode_image",
    "decode_variants",
    "decode_views",
    "image_size",
    "thumbnail_png",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)

# Same value as PIL's own default (PIL.Image.MAX_IMAGE_PIXELS, ~89.5 MP = a 24-bit 256 MiB image)
# so the two guards agree: PIL only *warns* between 1x and 2x its limit, and we refuse at 1x. PIL
# still hard-refuses above 2x its own limit inside Image.open, so raising this past
# 2 * PIL.Image.MAX_IMAGE_PIXELS also needs PIL's limit raised.
MAX_PIXELS: int = 89_478_485
# A file whose pixels will be filed under its content hash is read whole before decoding (read_checked).
# Camera photos are a few MB; a 256 MiB image file is beyond any photo this tool is for, and the cap
# keeps a huge non-image file from being read into memory.
MAX_FILE_BYTES: int = 256 * 1024 * 1024
# Why a file was not decoded when its bytes are no longer the ones the scan hashed.
CHANGED_REASON = ("changed since the dataset was scanned (its bytes no longer match the content hash it was "
                  "listed under); nothing was stored for it: run again to use its new content")
# Reasons that describe the file system's state rather than the file's bytes: the next run may find
# the file back, readable, or as it was scanned, so extract and the perceptual hashes never remember
# them as the content hash's failure.
# A file over MAX_FILE_BYTES is not read whole, so its bytes were never checked against the hash either.
TRANSIENT_REASONS = ("file not found", "permission denied", "cannot access file", "is a directory",
                     "not a regular file", "file too large", CHANGED_REASON.split(" (")[0])


def is_transient(reason: str) -> bool:
    """A decode failure that says nothing about the bytes (see TRANSIENT_REASONS)."""
    return str(reason).startswith(TRANSIENT_REASONS)

# RESIZE_POLICIES (the resize modes) is defined beside the backbone spec, whose fingerprint must not
# import PIL; it is implemented here.

# Keras' load_img defaults to "nearest", which aliases badly when shrinking photos. Pillow's
# BILINEAR resize is antialiased (its kernel widens with the downscale factor), so small
# objects and fine texture survive, closer to how ImageNet training images were prepared.
_RESAMPLE = Image.Resampling.BILINEAR

# What PIL's plugins raise on bad data: OSError for truncation and decoder errors,
# SyntaxError/ValueError/struct.error/IndexError/KeyError for malformed structures, EOFError
# for short reads. Listed rather than a bare Exception so MemoryError and our own
# ImageDecodeError pass through untouched.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    TypeError,
    KeyError,
    ZeroDivisionError,
    struct.error,
    Image.DecompressionBombError,
)

_BOMB_MSG = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+)")


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _too_large_reason(width: int, height: int) -> str:
    n = width * height
    return (
        f"image too large: {width:,} x {height:,} = {n:,} pixels, above the limit of "
        f"{MAX_PIXELS:,}; downscale it or raise featurepipe.data.images.MAX_PIXELS"
    )


def _looks_like_text(head: bytes) -> bool:
    head = head.removeprefix(b"\xef\xbb\xbf")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        # Tolerate only a multi-byte character cut off by the read size.
        if e.start < len(head) - 3:
            return False
        text = head[: e.start].decode("utf-8")
    return bool(text) and all(c.isprintable() or c in "\r\n\t" for c in text)


_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"WEBP", 8, "WebP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
)


def _not_image_reason(path: str, head: Optional[bytes] = None) -> str:
    if head is None:
        try:
            with open(path, "rb") as f:
                head = f.read(256)
        except OSError:
            return "not a recognised image format"
    if _looks_like_text(head):
        # The usual culprit in scraped datasets: an HTML error page saved under an image name.
        return (
            "not a recognised image format: the file contains text (e.g. an HTML page from a "
            "failed download); delete or replace it"
        )
    for magic, offset, name in _SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            # Right signature but PIL still gave up: a damaged header (zero or absurd
            # dimensions, cut off mid-header) rather than a wrong file type.
            return (
                f"truncated or corrupt image data: starts like a {name} file but its header "
                "cannot be parsed (cut short, or zero/invalid dimensions); re-export or re-download it"
            )
    return "not a recognised image format; the file may be misnamed, corrupt, or in a format Pillow cannot read"


def _access_error(path: str, error: OSError) -> ImageDecodeError:
    """Why the file system would not let us read `path` (reasons TRANSIENT_REASONS knows)."""
    if isinstance(error, FileNotFoundError):
        return ImageDecodeError(path, "file not found; was it moved or deleted after the dataset was scanned?")
    if isinstance(error, PermissionError):
        return ImageDecodeError(path, "permission denied; check the file's read permissions")
    if isinstance(error, IsADirectoryError):
        return ImageDecodeError(path, "is a directory, not an image file")
    return ImageDecodeError(path, f"cannot access file: {error.strerror or error}")


def read_checked(path: str, expect_sha256: str) -> bytes:
    """The file's bytes, read once, when their sha256 is `expect_sha256`. The stores file every
    decoded image under the content hash the scan gave its path; a file rewritten since (same path,
    other bytes) would file another photo's features under that hash, for every later dataset holding
    the original to reuse. Hashing the very bytes that are decoded rules that out; such a file is
    refused with CHANGED_REASON (a transient reason: the next scan hashes the new bytes)."""
    try:
        data = read_regular_file(path, MAX_FILE_BYTES)
    except OSError as e:
        if e.errno == errno.EFBIG:
            raise ImageDecodeError(path, f"file too large (over {MAX_FILE_BYTES:,} bytes) for an image; "
                                         f"downscale or re-encode it") from None
        raise _access_error(path, e) from None
    if hashlib.sha256(data).hexdigest() != expect_sha256:
        raise ImageDecodeError(path, CHANGED_REASON)
    return data


def _open(path: str, data: Optional[bytes] = None) -> Image.Image:
    """Open lazily (header only), turning every failure into an ImageDecodeError. `data`: the file's
    bytes when the caller already read them (read_checked); the path then only names the file."""
    if data is not None:
        return _open_image(path, io.BytesIO(data), data[:256])
    try:
        st = os.stat(path)
    except OSError as e:
        raise _access_error(path, e) from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageDecodeError(path, "is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageDecodeError(path, "not a regular file")
    if st.st_size == 0:
        raise ImageDecodeError(path, "empty file (0 bytes)")
    return _open_image(path, path)


def _open_image(path: str, source, head: Optional[bytes] = None) -> Image.Image:
    """Image.open(source) for the file `path`, every failure an ImageDecodeError naming it; `head`:
    its first bytes, when they are at hand, for saying what the file is instead of an image."""
    if head is not None and not head:
        raise ImageDecodeError(path, "empty file (0 bytes)")
    try:
        img = Image.open(source)
    except (FileNotFoundError, PermissionError) as e:
        raise _access_error(path, e) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(path, _not_image_reason(path, head)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # PIL refused inside Image.open (above 2x its own limit, or at 1x when warnings are
        # errors), before we could read the dimensions; its message still has the pixel count.
        m = _BOMB_MSG.search(str(e))
        n = f"{int(m.group(1)):,} pixels" if m else "too many pixels"
        raise ImageDecodeError(
            path,
            f"image too large: {n}, above PIL's decompression-bomb limit; downscale it or raise "
            "featurepipe.data.images.MAX_PIXELS and PIL.Image.MAX_IMAGE_PIXELS",
        ) from None
    except DECODE_ERRORS as e:
        raise ImageDecodeError(path, f"truncated or corrupt image data: {e}") from None

    width, height = img.size
    if width <= 0 or height <= 0:
        img.close()
        raise ImageDecodeError(path, f"image has zero width or height ({width} x {height})")
    if width * height > MAX_PIXELS:
        img.close()
        raise ImageDecodeError(path, _too_large_reason(width, height))
    return img


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(width, height) as stored in the file header, before EXIF orientation; pixels are not decoded.

    Raises ImageDecodeError for the same unreadable/not-an-image/too-large cases as decode_image
    (corruption past the header is only found by decode_image).
    """
    p = os.fspath(path)
    with _open(p) as img:
        return img.size


def _to_uint8_gray(arr: np.ndarray, mode: str) -> np.ndarray:
    if mode == "F":
        a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        # Float images carry no declared range; [0, 1] is the convention of most tools that write
        # them, anything larger is taken as 0..255 (what PIL's own F->L conversion assumes).
        if a.size and a.max() <= 1.0:
            a = a * 255.0
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    # "I;16*" and "I": 16-bit data (older Pillow opened 16-bit PNGs as "I"). Dividing by 257 maps
    # 0..65535 exactly onto 0..255; PIL's own convert("L") clips instead, turning most of a
    # 16-bit image white.
    a = np.clip(arr.astype(np.float64), 0, 65535)
    return np.rint(a / 257.0).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def _lab_transform():
    from PIL import ImageCms  # needs Pillow's littlecms2 extension; only LAB files pay for it

    return ImageCms.buildTransform(
        ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
    )


def _lab_to_rgb(img: Image.Image, path: str) -> Image.Image:
    # PIL's plain convert() treats L*a*b* channels as if they were RGB-ish; a colour-managed
    # transform is the only correct path.
    try:
        from PIL import ImageCms

        return ImageCms.applyTransform(img, _lab_transform())
    except ImportError:
        raise ImageDecodeError(
            path, "CIELab image needs Pillow built with littlecms2 (PIL.ImageCms); convert the file to RGB"
        ) from None


def _to_rgb(img: Image.Image, path: str) -> Image.Image:
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in ("F", "I") or mode.startswith("I;16"):
        gray = _to_uint8_gray(np.asarray(img), "F" if mode == "F" else "I")
        return Image.fromarray(gray).convert("RGB")
    if mode == "LAB":
        return _lab_to_rgb(img, path)
    if mode == "La":
        # Premultiplied; PIL has no La->RGBA path, but La->LA un-premultiplies.
        img = img.convert("LA")
    if img.has_transparency_data:
        # Composite on white rather than dropping alpha: transparent regions of product shots and
        # logos are usually meant as white "paper", and dropped alpha often exposes garbage colour.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError:
        raise ImageDecodeError(path, f"unsupported colour mode {mode!r}; convert the file to RGB") from None


def _resize(img: Image.Image, size: int, resize: str) -> Image.Image:
    width, height = img.size
    if resize == "letterbox":
        if width == height:
            return img if width == size else img.resize((size, size), _RESAMPLE)
        # Longer side to size, centred on a square of LETTERBOX_FILL: the same pixels as "pad to a
        # square, then resize", without resampling the padding.
        scale = size / max(width, height)
        new = (max(1, round(width * scale)), max(1, round(height * scale)))
        canvas = Image.new("RGB", (size, size), (LETTERBOX_FILL,) * 3)
        canvas.paste(img.resize(new, _RESAMPLE), ((size - new[0]) // 2, (size - new[1]) // 2))
        return canvas
    if resize == "squash":
        if (width, height) == (size, size):
            return img
        return img.resize((size, size), _RESAMPLE)
    # center_crop: resampling the central square straight to size x size is the same as
    # "shorter side to size, then crop" but in one pass and without rounding the scaled size.
    if (width, height) == (size, size):
        return img
    side = min(width, height)
    left = (width - side) / 2.0
    top = (height - side) / 2.0
    return img.resize((size, size), _RESAMPLE, box=(left, top, left + side, top + side))


@contextlib.contextmanager
def loaded_rgb(p: str, draft_side: int, expect_sha256: Optional[str] = None) -> Iterator[Image.Image]:
    """The file's frame 0 fully decoded, EXIF-oriented and converted to RGB (alpha on white); every
    decoding failure is an ImageDecodeError naming the file. `draft_side`: JPEGs may decode at a
    lower DCT scale as long as both sides stay >= it. `expect_sha256`: decode only bytes with this
    content hash (read_checked)."""
    data = None if expect_sha256 is None else read_checked(p, expect_sha256)
    with _loaded_rgb(p, data, draft_side) as rgb:
        yield rgb


@contextlib.contextmanager
def _loaded_rgb(p: str, data: Optional[bytes], draft_side: int) -> Iterator[Image.Image]:
    """loaded_rgb of the bytes DATA (None: read the file at P)."""
    with _open(p, data) as img:
        if isinstance(img, JpegImagePlugin.JpegImageFile):
            # DCT-domain downscaling by 1/2, 1/4 or 1/8 makes big photos several times cheaper
            # to decode. PIL picks the largest factor that keeps *both* sides >= the request, so
            # the final resize still only shrinks and quality is unaffected.
            img.draft("RGB", (draft_side, draft_side))
        try:
            # Decode fully here so truncation surfaces as an error for this file rather than as
            # silently grey pixels; we deliberately leave ImageFile.LOAD_TRUNCATED_IMAGES alone.
            img.load()
        except DECODE_ERRORS as e:
            raise ImageDecodeError(p, f"truncated or corrupt image data: {e}") from None
        try:
            ImageOps.exif_transpose(img, in_place=True)
        except DECODE_ERRORS:
            # A malformed EXIF block does not make the pixels wrong; keep the stored orientation.
            pass
        try:
            rgb = _to_rgb(img, p)
        except DECODE_ERRORS as e:
            raise ImageDecodeError(p, f"truncated or corrupt image data: {e}") from None
        yield rgb


def decode_image(path: str | os.PathLike[str], size: int, resize: str,
                 expect_sha256: Optional[str] = None) -> np.ndarray:
    """Decode an image file into a (size, size, 3) uint8 RGB array.

    resize: "squash" (whole image to size x size, aspect ratio ignored, as Keras
    flow_from_directory does), "center_crop" (shorter side to size, central square kept) or
    "letterbox" (longer side to size, padded to a square with LETTERBOX_FILL grey).
    EXIF orientation is applied; alpha is composited on white; multi-frame files give frame 0.
    Raises ImageDecodeError (never a raw PIL/OS error) for any file that cannot be decoded.
    `expect_sha256`: the content hash the pixels will be filed under; the file's bytes are read once
    and checked against it (read_checked), so nothing else is decoded in their place.
    """
    size = _checked_request(size, resize)
    p = os.fspath(path)
    with loaded_rgb(p, size, expect_sha256) as rgb:
        return _resized_array(p, rgb, size, resize)


def decode_variants(path: str | os.PathLike[str], wants: Sequence[tuple[int, str]],
                    expect_sha256: Optional[str] = None) -> list[np.ndarray | ImageDecodeError]:
    """decode_image(path, size, resize, expect_sha256) for each (size, resize) of WANTS, the same
    arrays bit for bit, but the file is read once and decoded once per JPEG draft scale (requests
    whose sizes give the same scale, as 224 and 240 usually do, share one decode), so that several
    feature sets can be fed from one decode (featurepipe.extraction.shared).

    A failure of the whole file (unreadable, changed since the scan, not an image) is raised as
    decode_image raises it; one that concerns one decode or one resize only takes that request's
    place in the list."""
    wants = [(_checked_request(size, resize), resize) for size, resize in wants]
    p = os.fspath(path)
    data = None if expect_sha256 is None else read_checked(p, expect_sha256)
    # Grouped by what PIL's draft makes of each size (its reduced size and mode), found from the
    # header alone: the decode is then exactly the one decode_image would run for any of them.
    groups: dict[tuple, list[int]] = {}
    scales: dict[int, tuple] = {}
    for index, (size, _) in enumerate(wants):
        if size not in scales:
            scales[size] = _draft_result(p, data, size)
        groups.setdefault(scales[size], []).append(index)
    out: list = [None] * len(wants)
    for members in groups.values():
        try:
            with _loaded_rgb(p, data, wants[members[0]][0]) as rgb:
                for index in members:
                    try:
                        out[index] = _resized_array(p, rgb, *wants[index])
                    except ImageDecodeError as error:
                        out[index] = error
        except ImageDecodeError as error:
            for index in members:
                out[index] = error
    return out


def _draft_result(p: str, data: Optional[bytes], side: int) -> tuple:
    """(size, mode, DCT scale) a JPEG decodes to under draft_side SIDE (what _loaded_rgb asks PIL
    for); one value for every side of other formats, which are decoded whole."""
    with _open(p, data) as img:
        if isinstance(img, JpegImagePlugin.JpegImageFile):
            img.draft("RGB", (side, side))
        return img.size, img.mode, getattr(img, "decoderconfig", None)


def _checked_request(size, resize: str) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise UsageError(f"size must be a positive int, got {size!r}")
    if resize not in RESIZE_POLICIES:
        raise UsageError(f"resize must be one of {RESIZE_POLICIES}, got {resize!r}")
    return int(size)


def _resized_array(p: str, rgb: Image.Image, size: int, resize: str) -> np.ndarray:
    try:
        arr = np.array(_resize(rgb, size, resize), dtype=np.uint8)
    except DECODE_ERRORS as e:
        raise ImageDecodeError(p, f"truncated or corrupt image data: {e}") from None
    if arr.shape != (size, size, 3):  # pragma: no cover - guards against PIL behaviour changes
        raise ImageDecodeError(p, f"decoded to unexpected shape {arr.shape}")
    return arr


def decode_views(path: str | os.PathLike[str], views: Sequence[tuple[int, str]],
                 expect_sha256: Optional[str] = None) -> list[np.ndarray]:
    """One (size, size, 3) uint8 array per (size, resize) view, each the very pixels decode_image
    gives, the file decoded once per JPEG draft scale for all views (decode_variants): predict's one
    decode for a vote over several backbones and resize policies. Unlike decode_variants, any
    failure fails the whole image (ImageDecodeError naming the file): predict has no use for some
    of an image's views."""
    out = decode_variants(path, views, expect_sha256)
    for item in out:
        if isinstance(item, ImageDecodeError):
            raise item
    return out


def thumbnail_png(path: str | os.PathLike[str], max_side: int) -> bytes:
    """A PNG of the image, oriented and in RGB (alpha on white) like decode_image, no larger than
    max_side on either side with its aspect ratio kept: the report's galleries. ImageDecodeError
    (naming the file) when it cannot be decoded."""
    p = os.fspath(path)
    with loaded_rgb(p, 2 * int(max_side)) as rgb:
        try:
            small = rgb.copy()
            small.thumbnail((max_side, max_side))
            buffer = io.BytesIO()
            small.save(buffer, format="PNG", optimize=True)
        except DECODE_ERRORS as e:
            raise ImageDecodeError(p, f"truncated or corrupt image data: {e}") from None
    return buffer.getvalue()


def decode_ahead(items: Iterable[T], decode: Callable[[T], R], lookahead: int,
                 threads: int) -> Iterator[tuple[T, "Future[R]"]]:
    """(item, future of decode(item)) in `items` order, with up to `lookahead` decodes in flight on
    `threads` threads, so a consumer running a model never waits for pixels and memory stays
    bounded for any number of items. The one decode-ahead loop (extract's local executor, predict).
    Thread count: featurepipe.backbones.accel.default_decode_threads()."""
    todo = iter(items)
    with ThreadPoolExecutor(max_workers=max(1, int(threads)), thread_name_prefix="decode") as pool:
        queue: deque = deque()

        def refill() -> None:
            while len(queue) < lookahead:
                try:
                    item = next(todo)
                except StopIteration:
                    return
                queue.append((item, pool.submit(decode, item)))

        refill()
        while queue:
            item, future = queue.popleft()
            refill()
            yield item, future


def decode_batches(paths: Sequence[str], size: int, resize: str, batch_size: int, errors: dict[str, str],
                   threads: int) -> Iterator[tuple[list[str], np.ndarray]]:
    """(paths, uint8 images of shape (n, size, size, 3)) batches of up to `batch_size`, decoded ahead
    in threads (at most two batches ahead); files that cannot be decoded go to `errors` (path: reason)."""
    batch_paths: list[str] = []
    batch: list[np.ndarray] = []
    lookahead = max(2 * batch_size, 8)
    for path, future in decode_ahead(paths, lambda p: decode_image(p, size, resize), lookahead, threads):
        try:
            batch.append(future.result())
            batch_paths.append(path)
        except ImageDecodeError as error:
            errors[path] = error.reason
        if len(batch) >= batch_size:
            yield batch_paths, np.stack(batch)
            batch_paths, batch = [], []
    if batch:
        yield batch_paths, np.stack(batch)
