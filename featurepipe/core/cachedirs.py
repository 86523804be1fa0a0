"""Where featurepipe keeps its cache: `--cache-dir`, else $FEATUREPIPE_CACHE, else ./cache.

Every cache root holds a small marker file (MARKER), so that a scan recognises featurepipe's own
cache wherever it lies inside a dataset (`cd DATA && featurepipe run .` puts ./cache there) and
leaves it out instead of taking its charts for a class.
"""

from __future__ import annotations

import os
from pathlib import Path

from featurepipe.core import atomic
from featurepipe.core.errors import DiskFullError, NotWritableError, UsageError

CACHE_ENV = "FEATUREPIPE_CACHE"


def cache_root(explicit: str | os.PathLike | None = None) -> Path:
    if explicit is not None:
        root = Path(explicit)
    elif os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV])
    else:
        root = Path("cache")
    root = root.expanduser().resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"the cache root {root} is not a folder; pass --cache-dir (or set ${CACHE_ENV} to) "
                         f"a folder") from None
    mark_cache_root(root)
    return root


# Not one of ENTRIES: it holds nothing to clean or collect; a hidden name, so no scan takes it for
# an image or a class either.
MARKER = ".featurepipe-cache"
MARKER_TEXT = ("This folder is a featurepipe cache root (features, runs, charts...). featurepipe's scans\n"
               "leave it out of any dataset it lies in.\n")


def mark_cache_root(root: Path) -> None:
    """Write the marker in `root` unless it is there. Best effort: a read-only cache root (or a full
    disk) still works as a cache; only a scan of a dataset around it then lacks the hint."""
    marker = Path(root) / MARKER
    if marker.exists():
        return
    try:
        atomic.write_text(marker, MARKER_TEXT)
    except (OSError, DiskFullError, NotWritableError):
        pass


def is_cache_root(folder: Path) -> bool:
    """Whether `folder` is a featurepipe cache root (it holds the marker)."""
    return (Path(folder) / MARKER).is_file()


def features_dir(root: Path) -> Path:
    return Path(root) / FEATURES


def weights_dir(root: Path) -> Path:
    return Path(root) / WEIGHTS


def hash_db(root: Path) -> Path:
    """The cache's SQLite file of content hashes (hashcache) and perceptual hashes (perceptual)."""
    return Path(root) / HASH_DB


def runs_dir(root: Path) -> Path:
    return Path(root) / RUNS


# Everything featurepipe keeps under a cache root, by name. Every module takes its folder from the
# functions here, so `cache gc`, `make clean` and docs/architecture.md can list what exists.
FEATURES = "features"            # one HDF5 feature store per backbone fingerprint (store.featurestore)
WEIGHTS = "weights"              # converted ImageNet weights (backbones.efficientnet_lite)
HASH_DB = "hashes.sqlite"        # content and perceptual hashes (core.hashcache, data.perceptual)
RUNS = "runs"                    # default home of run directories (rundir.run)
REFS = "refs"                    # which scanned datasets use which stores (store.refs), for `cache gc`
EVALUATIONS = "evaluations"      # cross-validation fits and refits, keyed by features and heads (evaluation)
INSPECTIONS = "inspections"      # `inspect` outside a run, and its remembered results (inspection)
DEDUP = "dedup"                  # near-duplicate groupings, keyed by what they depend on (data.dedup)
REPORT_CHARTS = "report-charts"  # charts drawn from the same data, signed (report)
ENTRIES = (FEATURES, WEIGHTS, HASH_DB, RUNS, REFS, EVALUATIONS, INSPECTIONS, DEDUP, REPORT_CHARTS)
# Rebuilt on demand: deleting them costs recomputation, never results.
DERIVED = (EVALUATIONS, INSPECTIONS, DEDUP, REPORT_CHARTS)


def refs_dir(root: Path) -> Path:
    return Path(root) / REFS


def evaluations_dir(root: Path) -> Path:
    """CV fits (crossval's per-fit JSON files) and, under refits/, the refit heads."""
    return Path(root) / EVALUATIONS


def refits_dir(root: Path) -> Path:
    return evaluations_dir(root) / "refits"


def inspections_dir(root: Path) -> Path:
    return Path(root) / INSPECTIONS


def inspection_cache_dir(root: Path) -> Path:
    return inspections_dir(root) / "cache"


def dedup_dir(root: Path) -> Path:
    return Path(root) / DEDUP


def report_charts_dir(root: Path) -> Path:
    return Path(root) / REPORT_CHARTS
