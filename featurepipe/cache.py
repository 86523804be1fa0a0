"""Cache maintenance behind `featurepipe cache ls | verify | gc`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from featurepipe.paths import features_dir, runs_dir
from featurepipe.refs import live_refs
from featurepipe.store import StoreInfo, list_stores, prune_store, remove_store


def list_cache(root: Path) -> list[StoreInfo]:
    return [store.info() for store in list_stores(features_dir(root))]


@dataclass
class VerifyResult:
    checked: int = 0
    problems: dict[str, list[str]] = field(default_factory=dict)   # store dir -> problems


def verify_cache(root: Path, repair: bool = False) -> VerifyResult:
    result = VerifyResult()
    for store in list_stores(features_dir(root)):
        result.checked += 1
        problems = store.verify(repair=repair)
        if problems:
            result.problems[str(store.directory)] = problems
    return result


@dataclass
class GcResult:
    stores_removed: list[str] = field(default_factory=list)
    rows_removed: int = 0
    refs_removed: int = 0
    dry_run: bool = False


def _fingerprints_used_by_runs(root: Path) -> set[str]:
    used: set[str] = set()
    for config in runs_dir(root).glob("*/config.json"):
        try:
            data = json.loads(config.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        used.update(data.get("feature_fingerprints", []))
    return used


def gc_cache(root: Path, dry_run: bool = False) -> GcResult:
    """Remove stores no live dataset or run refers to, and rows of images no dataset holds any more."""
    result = GcResult(dry_run=dry_run)
    live, stale = live_refs(root)
    result.refs_removed = len(stale)
    if not dry_run:
        for path in stale:
            path.unlink(missing_ok=True)
    used = _fingerprints_used_by_runs(root) | {fp for ref in live for fp in ref["stores"]}
    live_hashes = {h for ref in live for h in ref["hashes"]}
    for store in list_stores(features_dir(root)):
        if store.fingerprint not in used:
            result.stores_removed.append(str(store.directory))
            if not dry_run:
                remove_store(store)
            continue
        keep = {key for key in store.keys() if key.split("@", 1)[0] in live_hashes}
        if dry_run:
            result.rows_removed += len(store.keys() - keep)
        else:
            result.rows_removed += prune_store(store, keep)
    return result
