"""Cache maintenance behind `featurepipe cache ls | verify | gc`."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from featurepipe.extraction.batches import parse_view_key
from featurepipe.core.cachedirs import features_dir
from featurepipe.core.errors import UsageError, writing_to
from featurepipe.rundir.layout import CONFIG
from featurepipe.store.refs import live_refs
from featurepipe.rundir.folder import fingerprints_used_by_runs, latest_pointers, run_configs
from featurepipe.store.featurestore import FeatureStore, StoreInfo, list_stores
from featurepipe.store.gc import gc_store


def list_cache(root: Path) -> list[StoreInfo]:
    return [store.info() for store in list_stores(features_dir(root))]


@dataclass
class VerifyResult:
    checked: int = 0
    problems: dict[str, list[str]] = field(default_factory=dict)   # store dir -> problems
    failures_remembered: int = 0     # images remembered as undecodable (not retried by extract)
    repaired: list[str] = field(default_factory=list)   # what opening the stores rebuilt (a damaged spec.json)
    failures_cleared: int = 0        # of those, forgotten by --repair (retried next time)


def verify_cache(root: Path, repair: bool = False) -> VerifyResult:
    # --repair deletes and rewrites: a read-only or full cache is one line (core.errors.writing_to).
    with writing_to(root):
        return _verify_cache(root, repair)


def _verify_cache(root: Path, repair: bool) -> VerifyResult:
    result = VerifyResult()
    unopenable: dict[str, str] = {}
    for store in list_stores(features_dir(root), problems=unopenable):
        result.checked += 1
        result.repaired.extend(store.repaired)
        failures = len(store.failures())
        problems = store.verify(repair=repair)
        if problems:
            result.problems[str(store.directory)] = problems
        if failures:
            result.failures_remembered += failures
            if repair:
                result.failures_cleared += failures
    # A store whose spec cannot be read or rebuilt is reported, and no longer hides the others.
    for directory, problem in unopenable.items():
        result.checked += 1
        result.problems[directory] = [problem]
    return result


@dataclass
class GcResult:
    stores_removed: list[str] = field(default_factory=list)
    rows_removed: int = 0
    refs_removed: int = 0
    dry_run: bool = False
    runs_removed: list[str] = field(default_factory=list)   # run folders (with --runs KEEP)
    runs_kept: int = 0


def gc_cache(root: Path, dry_run: bool = False, keep_runs: Optional[int] = None) -> GcResult:
    """Remove stores no live dataset or run refers to, and rows of images no dataset holds any more.
    The rows `predict` adds for images outside every dataset (deploy.predictor) are such rows: they
    are a cache of predictions' features, dropped here and computed again by a later predict; the
    store itself stays while a run uses its fingerprint.
    With `keep_runs` (--runs KEEP), first the runs beyond the KEEP newest of each dataset in
    CACHE/runs (never one a latest pointer names; see `old_runs`), so their stores go in the same pass.

    Each store's fate is decided while holding its write lock, from the references as they are at
    that moment: `extract` records its dataset's reference before it takes the lock, so every row
    written before the decision is referred to, and none can be written between decision and deletion.
    A read-only or full cache is one line naming where (core.errors.writing_to); `dry_run` writes nothing."""
    with writing_to(root):
        return _gc_cache(root, dry_run, keep_runs)


def _gc_cache(root: Path, dry_run: bool, keep_runs: Optional[int] = None) -> GcResult:
    result = GcResult(dry_run=dry_run)
    if keep_runs is not None:
        removed, result.runs_kept = old_runs(root, keep_runs)
        result.runs_removed = [str(path) for path in removed]
        if not dry_run:
            for path in removed:
                shutil.rmtree(path)
    _, stale = live_refs(root)
    result.refs_removed = len(stale)
    if not dry_run:
        for path in stale:
            path.unlink(missing_ok=True)

    def decide(store: FeatureStore):
        live, _ = live_refs(root)
        used = fingerprints_used_by_runs(root) | {fp for ref in live for fp in ref["stores"]}
        if store.fingerprint not in used:
            return None
        live_hashes = {h for ref in live for h in ref["hashes"]}
        return {key for key in store.keys() if parse_view_key(key)[0] in live_hashes}

    for store in list_stores(features_dir(root)):
        removed, rows = gc_store(store, decide, dry_run=dry_run)
        if removed:
            result.stores_removed.append(str(store.directory))
        result.rows_removed += rows
    return result


def old_runs(root: Path, keep: int) -> tuple[list[Path], int]:
    """(the runs `cache gc --runs KEEP` removes, how many runs it keeps).

    Only runs featurepipe made in CACHE/runs are candidates (a --run-dir elsewhere is the user's and
    never listed there); grouped by the dataset config.json records, the KEEP newest of each (by
    when config.json was last written, so a reused run counts as new) stay, and so does every run a
    latest pointer names whatever KEEP is. A run whose config.json cannot be read or names no
    dataset is kept: what cannot be told apart is not deleted."""
    if keep < 0:
        raise UsageError(f"--runs takes how many runs of each dataset to keep (0 or more), not {keep}")
    pointed = {path.resolve() for path in latest_pointers(root).values()}
    by_dataset: dict[str, list[Path]] = {}
    total = 0
    for path, config in run_configs(root):
        total += 1
        source = (config.get("dataset") or {}).get("source") if isinstance(config.get("dataset"), dict) else None
        if isinstance(source, str):
            by_dataset.setdefault(source, []).append(path)
    removed = []
    for runs in by_dataset.values():
        runs.sort(key=lambda p: (p / CONFIG).stat().st_mtime, reverse=True)
        removed.extend(p for p in runs[keep:] if p.resolve() not in pointed)
    return sorted(removed), total - len(removed)
