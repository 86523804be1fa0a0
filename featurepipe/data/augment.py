"""Augmentation: random affine views of decoded images, re-implementing the Keras
``ImageDataGenerator`` transform set with PIL/numpy so a given (image, view, seed) always yields the
same pixels, independently of batch order. AugmentSpec carries the views' count, policy and seed
through extract, evaluate and `run`.

Nothing here imports TensorFlow/Keras (see featurepipe.data.images).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from PIL import Image

from featurepipe.core.errors import UsageError

__all__ = [
    "FILL_MODES",
    "TRAINING_POLICIES",
    "AugmentPolicy",
    "AugmentParams",
    "AugmentSpec",
    "apply_augment",
    "augment_image",
    "sample_augment_params",
    "view_rng",
]

FILL_MODES: tuple[str, ...] = ("nearest", "constant", "reflect", "wrap")


@dataclass(frozen=True)
class AugmentPolicy:
    """Random affine augmentation with Keras ImageDataGenerator semantics.

    rotation_range: degrees, angle uniform in [-r, r].
    width_shift_range / height_shift_range: fraction of width / height, uniform in [-f, f].
    shear_range: shear angle in DEGREES, uniform in [-s, s] (Keras 2+ semantics; the seeds'
        0.2 is therefore a tiny 0.2 degree shear, kept for parity).
    zoom_range: zx and zy drawn independently from [1 - z, 1 + z]; as in Keras, > 1 zooms out.
    horizontal_flip: mirror with probability 0.5.
    fill_mode: how pixels sampled from outside the image are filled: "nearest" (edge
        replication), "constant" (black), "reflect" (abcd|dcba) or "wrap" (abcd|abcd).
    """

    rotation_range: float = 40.0
    width_shift_range: float = 0.2
    height_shift_range: float = 0.2
    shear_range: float = 0.2
    zoom_range: float = 0.2
    horizontal_flip: bool = True
    fill_mode: str = "nearest"

    def __post_init__(self) -> None:
        limits = {
            "rotation_range": (0.0, 180.0, True),
            "width_shift_range": (0.0, 1.0, False),
            "height_shift_range": (0.0, 1.0, False),
            "shear_range": (0.0, 90.0, False),
            "zoom_range": (0.0, 1.0, False),
        }
        for name, (lo, hi, hi_inclusive) in limits.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise UsageError(f"AugmentPolicy.{name} must be a number, got {value!r}")
            value = float(value)
            ok = lo <= value <= hi if hi_inclusive else lo <= value < hi
            if not math.isfinite(value) or not ok:
                bracket = "]" if hi_inclusive else ")"
                raise UsageError(f"AugmentPolicy.{name} must be in [{lo:g}, {hi:g}{bracket}, got {value!r}")
            # Normalise to float so 40 and 40.0 give the same to_dict() fingerprint.
            object.__setattr__(self, name, value)
        if not isinstance(self.horizontal_flip, (bool, np.bool_)):
            raise UsageError(f"AugmentPolicy.horizontal_flip must be a bool, got {self.horizontal_flip!r}")
        object.__setattr__(self, "horizontal_flip", bool(self.horizontal_flip))
        if self.fill_mode not in FILL_MODES:
            raise UsageError(f"AugmentPolicy.fill_mode must be one of {FILL_MODES}, got {self.fill_mode!r}")

    @property
    def is_identity(self) -> bool:
        return (
            self.rotation_range == 0
            and self.width_shift_range == 0
            and self.height_shift_range == 0
            and self.shear_range == 0
            and self.zoom_range == 0
            and not self.horizontal_flip
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AugmentPolicy":
        """Missing fields take their defaults; unknown ones are an error, so a typo cannot
        silently fall back to a default."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"unknown AugmentPolicy field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**dict(data))


# Fine-tuning's augmentation of its training images, by name (FinetuneConfig.augment, --train-augment).
# "classic" is the seeds' Keras ImageDataGenerator (rotation 40, shifts and zoom 0.2, flips); "light" keeps
# flips and a tenth shift/zoom without rotation; "flip" mirrors only; "none" trains on the pixels.
TRAINING_POLICIES: dict[str, AugmentPolicy] = {
    "classic": AugmentPolicy(),
    "light": AugmentPolicy(rotation_range=0.0, width_shift_range=0.1, height_shift_range=0.1, shear_range=0.0,
                           zoom_range=0.1, horizontal_flip=True),
    "flip": AugmentPolicy(rotation_range=0.0, width_shift_range=0.0, height_shift_range=0.0, shear_range=0.0,
                          zoom_range=0.0, horizontal_flip=True),
    "none": AugmentPolicy(rotation_range=0.0, width_shift_range=0.0, height_shift_range=0.0, shear_range=0.0,
                          zoom_range=0.0, horizontal_flip=False),
}


@dataclass(frozen=True)
class AugmentSpec:
    """The augmented views of every image, as one value through extract, evaluate and `run`: how
    many per image (`count`, 0: none), drawn with which `policy` (None: AugmentPolicy's defaults)
    from which `seed`. The views store's fingerprint covers policy and seed; config.json records
    all three (to_config), and fine-tuning reads them back (from_config)."""

    count: int = 0
    policy: AugmentPolicy | None = None
    seed: int = 0

    @classmethod
    def of(cls, augment: "AugmentSpec | int | None") -> "AugmentSpec":
        """An AugmentSpec as given, or a bare view count (default policy, seed 0)."""
        if isinstance(augment, AugmentSpec):
            return augment
        return cls(int(augment or 0))

    @property
    def resolved_policy(self) -> AugmentPolicy | None:
        """The policy views are drawn with; None without views."""
        return (self.policy or AugmentPolicy()) if self.count > 0 else None

    def to_config(self) -> dict[str, Any]:
        policy = self.resolved_policy
        return {"augment": self.count, "augment_seed": self.seed,
                "augment_policy": policy.to_dict() if policy else None}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "AugmentSpec":
        """What a run's config.json recorded (older runs without these fields: no views)."""
        return cls(int(config.get("augment") or 0), AugmentPolicy.from_dict(config.get("augment_policy") or {}),
                   int(config.get("augment_seed", 0) or 0))


@dataclass(frozen=True)
class AugmentParams:
    """One concrete draw of the random transform (names as in Keras' get_random_transform)."""

    theta: float = 0.0  # rotation, degrees
    tx: float = 0.0  # horizontal shift, pixels
    ty: float = 0.0  # vertical shift, pixels
    shear: float = 0.0  # degrees
    zx: float = 1.0
    zy: float = 1.0
    flip_horizontal: bool = False


def sample_augment_params(
    policy: AugmentPolicy, rng: np.random.Generator, height: int, width: int
) -> AugmentParams:
    """Draw transform parameters in the same order and from the same ranges as Keras.

    Deviation: Keras multiplies its row shift by the height but then applies it along the
    columns (and vice versa), a long-standing quirk. Here width_shift_range moves the image
    horizontally and height_shift_range vertically; for square inputs the distribution is the
    same as Keras'.
    """
    theta = rng.uniform(-policy.rotation_range, policy.rotation_range) if policy.rotation_range else 0.0
    dy = rng.uniform(-policy.height_shift_range, policy.height_shift_range) * height if policy.height_shift_range else 0.0
    dx = rng.uniform(-policy.width_shift_range, policy.width_shift_range) * width if policy.width_shift_range else 0.0
    shear = rng.uniform(-policy.shear_range, policy.shear_range) if policy.shear_range else 0.0
    if policy.zoom_range:
        zx, zy = rng.uniform(1.0 - policy.zoom_range, 1.0 + policy.zoom_range, 2)
    else:
        zx, zy = 1.0, 1.0
    # Drawn even when flipping is off, as Keras does, so the draw sequence has a fixed shape.
    flip = bool(rng.random() < 0.5) and policy.horizontal_flip
    return AugmentParams(float(theta), float(dx), float(dy), float(shear), float(zx), float(zy), flip)


def _affine_matrix(params: AugmentParams, height: int, width: int) -> np.ndarray:
    """3x3 matrix mapping output (x, y) to input (x, y), in PIL's continuous pixel coordinates.

    Built like Keras' apply_affine_transform (rotation . shift . shear . zoom, about the image
    centre; output->input like scipy.ndimage.affine_transform), followed by the horizontal flip
    that Keras applies to the transformed image.
    """
    m = np.eye(3)
    if params.theta:
        t = np.deg2rad(params.theta)
        m = m @ np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])
    if params.tx or params.ty:
        m = m @ np.array([[1.0, 0.0, params.tx], [0.0, 1.0, params.ty], [0.0, 0.0, 1.0]])
    if params.shear:
        s = np.deg2rad(params.shear)
        m = m @ np.array([[1.0, -np.sin(s), 0.0], [0.0, np.cos(s), 0.0], [0.0, 0.0, 1.0]])
    if params.zx != 1.0 or params.zy != 1.0:
        m = m @ np.array([[params.zx, 0.0, 0.0], [0.0, params.zy, 0.0], [0.0, 0.0, 1.0]])
    # PIL samples pixel i at i + 0.5, so the geometric centre is (w/2, h/2) -- the same point as
    # Keras' (n/2 - 0.5) in integer-index coordinates.
    cx, cy = width / 2.0, height / 2.0
    to_centre = np.array([[1.0, 0.0, -cx], [0.0, 1.0, -cy], [0.0, 0.0, 1.0]])
    from_centre = np.array([[1.0, 0.0, cx], [0.0, 1.0, cy], [0.0, 0.0, 1.0]])
    m = from_centre @ m @ to_centre
    if params.flip_horizontal:
        m = m @ np.array([[-1.0, 0.0, float(width)], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return m


# "wrap" is truly periodic (abcd|abcd, as Keras documents it); scipy's own "wrap", which Keras
# calls, has a period of n - 1 pixels, a known scipy quirk not worth reproducing.
_NUMPY_PAD_MODE = {"nearest": "edge", "reflect": "symmetric", "wrap": "wrap"}


def augment_image(image: np.ndarray, policy: AugmentPolicy, rng: np.random.Generator) -> np.ndarray:
    """Apply one random augmentation drawn from ``rng``; returns a new uint8 array of the same shape."""
    _check_image(image)
    params = sample_augment_params(policy, rng, image.shape[0], image.shape[1])
    return apply_augment(image, params, policy.fill_mode)


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"expected a uint8 HxWx3 array, got "
            f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}"
        )


def apply_augment(image: np.ndarray, params: AugmentParams, fill_mode: str = "nearest") -> np.ndarray:
    """Apply one concrete transform (one bilinear resampling); returns a new uint8 array."""
    _check_image(image)
    if fill_mode not in FILL_MODES:
        raise ValueError(f"fill_mode must be one of {FILL_MODES}, got {fill_mode!r}")
    height, width = image.shape[:2]
    m = _affine_matrix(params, height, width)
    if np.allclose(m, np.eye(3), rtol=0.0, atol=1e-12):
        return image.copy()

    if fill_mode == "constant":
        # PIL's own fill is close to scipy's (hence Keras') "constant": black once the sample
        # point leaves the image, no blending across the edge; the two only disagree about
        # border pixels whose sample point lies within half a pixel of the edge.
        src = Image.fromarray(np.ascontiguousarray(image))
        pad_x = pad_y = 0
    else:
        # PIL can only fill with a constant, so extend the image by exactly as much as the
        # transform reaches outside it (plus bilinear's one-pixel footprint) and sample from
        # that; edge replication is then precisely scipy's "nearest", "symmetric" its "reflect".
        corners = np.array([[0.0, width, 0.0, width], [0.0, 0.0, height, height], [1.0, 1.0, 1.0, 1.0]])
        xs, ys, _ = m @ corners
        pad_x = int(math.ceil(max(0.0, -xs.min(), xs.max() - width))) + 2
        pad_y = int(math.ceil(max(0.0, -ys.min(), ys.max() - height))) + 2
        padded = np.pad(image, ((pad_y, pad_y), (pad_x, pad_x), (0, 0)), mode=_NUMPY_PAD_MODE[fill_mode])
        src = Image.fromarray(padded)
    shifted = np.array([[1.0, 0.0, pad_x], [0.0, 1.0, pad_y], [0.0, 0.0, 1.0]]) @ m
    data = tuple(float(v) for v in shifted[:2].ravel())
    out = src.transform(
        (width, height), Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0)
    )
    return np.array(out, dtype=np.uint8)


def view_rng(content_hash: str, view_index: int, seed: int) -> np.random.Generator:
    """A Generator determined only by (content_hash, view_index, seed).

    Hashing the triple (rather than e.g. seed + index arithmetic) keeps streams for different
    images/views/seeds independent and makes a view's pixels independent of processing order,
    batch composition and worker count. PCG64 is named explicitly because default_rng's
    bit generator is not guaranteed to stay the same across numpy versions.
    """
    if not isinstance(content_hash, str) or not content_hash:
        raise ValueError(f"content_hash must be a non-empty str, got {content_hash!r}")
    for name, value in (("view_index", view_index), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if view_index < 0:
        raise ValueError(f"view_index must be >= 0, got {view_index}")
    key = f"featurepipe.augment.v1\0{content_hash}\0{int(view_index)}\0{int(seed)}".encode("utf-8")
    entropy = int.from_bytes(hashlib.sha256(key).digest(), "little")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
