"""BackboneSpec: everything that changes the numbers a frozen base produces, and its fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Optional

from featurepipe.core.errors import UsageError

POOLINGS = ("avg", "max", "flatten")
# How images become squares (featurepipe.data.images implements them; also images.RESIZE_MODES).
RESIZE_POLICIES = ("squash", "center_crop", "letterbox")
# letterbox pads to a square with this grey before resizing: mid-grey is ~0 after every backbone's
# preprocessing, so the padding carries as little signal as a constant can. One value (not an RGB
# triple) because Keras' Resizing(pad_to_aspect_ratio=True) in exported models takes one fill value.
# Recorded in the fingerprint payload of letterbox specs.
LETTERBOX_FILL = 128
# The largest --image-size accepted: 3.4x the largest default input (299). Beyond it one batch of
# activations outgrows any machine's memory (100000 px ended in an out-of-memory traceback after
# 20 s), and ImageNet bases give no better features at sizes so far from the ones they learnt at.
MAX_IMAGE_SIZE = 1024
# Bump when decoding, resizing or the store layout changes in a way that changes the numbers.
PIPELINE_VERSION = 1


@dataclass(frozen=True)
class BackboneSpec:
    name: str = "efficientnet_lite0"
    weights: str = "imagenet"            # "imagenet" | "random" | path to a weights file
    layer: Optional[str] = None          # None: the conv base output; else any named layer
    pooling: str = "avg"                 # applied when the chosen layer's output is spatial
    image_size: Optional[int] = None     # None: the backbone's default
    resize: Optional[str] = None         # None: the backbone's default policy
    seed: int = 0                        # only used by weights="random"

    def resolved(self) -> "BackboneSpec":
        """Fill the backbone's defaults in, validating every option."""
        from featurepipe.backbones.registry import CONCAT, get_backbone

        info = get_backbone(self.name)
        if CONCAT in self.name and (self.layer is not None or self.pooling != "avg"):
            raise UsageError(f"{self.name}: a concatenated backbone gives each part's average-pooled features; "
                             f"--layer and --pooling apply to single backbones only")
        if self.pooling not in POOLINGS:
            raise UsageError(f"pooling must be one of {', '.join(POOLINGS)}, not {self.pooling!r}")
        # `is None`, not `or`: an explicit 0 is a mistake to report, not a request for the default.
        size = info.default_size if self.image_size is None else self.image_size
        if size < info.min_size:
            raise UsageError(f"--image-size: {self.name} needs images of at least {info.min_size} px, not {size} "
                             f"(valid: {info.min_size} to {MAX_IMAGE_SIZE}; leave it out for the backbone's own "
                             f"{info.default_size})")
        if size > MAX_IMAGE_SIZE:
            raise UsageError(f"--image-size must be at most {MAX_IMAGE_SIZE} px, not {size} (valid for {self.name}: "
                             f"{info.min_size} to {MAX_IMAGE_SIZE}; leave it out for the backbone's own "
                             f"{info.default_size})")
        resize = self.resize or info.default_resize
        if resize not in RESIZE_POLICIES:
            raise UsageError(f"resize must be one of {', '.join(RESIZE_POLICIES)}, not {resize!r}")
        return replace(self, image_size=size, resize=resize)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BackboneSpec":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def fingerprint_payload(spec: BackboneSpec, weights_id: str, preprocess_id: str, versions: dict) -> dict:
    spec = spec.resolved()
    payload = spec.to_dict()
    payload.pop("weights")
    if spec.weights != "random":
        payload.pop("seed")
    payload.update(
        weights_id=weights_id,
        preprocess=preprocess_id,
        pipeline_version=PIPELINE_VERSION,
        versions=versions,
    )
    if spec.resize == "letterbox":
        payload["letterbox_fill"] = LETTERBOX_FILL
    return payload


def hash_payload(payload: dict) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
