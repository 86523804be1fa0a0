"""Backbone fingerprints, computed without importing TensorFlow so that a re-run with nothing to
extract never pays for building a model."""

from __future__ import annotations

from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Optional

from featurepipe.backbones.registry import get_backbone
from featurepipe.backbones.spec import BackboneSpec, fingerprint_payload, hash_payload
from featurepipe.core.errors import BackboneError
from featurepipe.core.hashcache import HashCache
from featurepipe.core.cachedirs import hash_db


def package_version(*distributions: str) -> Optional[str]:
    """The installed version of the first of `distributions` that is installed; None if none is."""
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


@lru_cache(maxsize=1)
def library_versions() -> dict:
    """Versions of the libraries whose upgrades can change the numbers."""
    return {
        "keras": package_version("keras"),
        "tensorflow": package_version("tensorflow", "tensorflow-cpu", "tensorflow-macos"),
        "pillow": package_version("pillow"),
    }


def weights_id(spec: BackboneSpec, cache_dir: Optional[Path] = None) -> str:
    """What identifies the weights: a seed, a file's content hash, or the published ImageNet set."""
    if spec.weights == "random":
        return f"random:{spec.seed}"
    if spec.weights == "imagenet":
        # The entry's pretrained config says what identifies its weights.
        return get_backbone(spec.name).imagenet_weights_id()
    path = Path(spec.weights).expanduser()
    if not path.is_file():
        raise BackboneError(
            f"weights file {path} does not exist; pass --weights imagenet, --weights random, or a path to a "
            f".weights.h5 / .keras file saved from the same backbone"
        )
    cache = HashCache(hash_db(cache_dir) if cache_dir is not None else None)
    try:
        digest, _ = cache.hash_files([str(path.resolve())])[str(path.resolve())]
    finally:
        cache.close()
    return f"file-sha256:{digest}"


def backbone_fingerprint(spec: BackboneSpec, cache_dir: Optional[Path] = None) -> tuple[str, dict]:
    spec = spec.resolved()
    info = get_backbone(spec.name)
    payload = fingerprint_payload(spec, weights_id(spec, cache_dir), info.preprocess, library_versions())
    return hash_payload(payload), payload


def views_fingerprint(base_fingerprint: str, augment_policy: dict, seed: int) -> tuple[str, dict]:
    """Augmented views get their own store: the originals stay shared whatever the augmentation."""
    payload = {"base": base_fingerprint, "augment": augment_policy, "augment_seed": seed}
    return hash_payload(payload), payload
