"""Where featurepipe keeps its cache: `--cache-dir`, else $FEATUREPIPE_CACHE, else ./cache."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "FEATUREPIPE_CACHE"


def cache_root(explicit: str | os.PathLike | None = None) -> Path:
    if explicit is not None:
        root = Path(explicit)
    elif os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV])
    else:
        root = Path("cache")
    root = root.expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def features_dir(root: Path) -> Path:
    return root / "features"


def weights_dir(root: Path) -> Path:
    return root / "weights"


def hash_db(root: Path) -> Path:
    """The cache's SQLite file of content hashes (hashcache) and perceptual hashes (perceptual)."""
    return Path(root) / "hashes.sqlite"


def runs_dir(root: Path) -> Path:
    return root / "runs"
