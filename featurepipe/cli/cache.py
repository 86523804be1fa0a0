"""`featurepipe cache ls | verify | gc`: look into and maintain the feature cache."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from featurepipe.cli.common import EXIT_FAILURE, Command
from featurepipe.cli.options import AsJson, CacheDir


def cache_ls(cache_dir: Optional[Path] = CacheDir, as_json: bool = AsJson) -> None:
    """List the feature stores in the cache."""
    import time

    from featurepipe.cli import render
    from featurepipe.rundir.maintenance import list_cache
    from featurepipe.core.cachedirs import cache_root

    with Command(as_json):
        infos = list_cache(cache_root(cache_dir))
    if as_json:
        render.print_json([store_entry(info) for info in infos])
        return
    rows = []
    for info in infos:
        entry = store_entry(info)
        rows.append([entry["fingerprint"][:16], entry["backbone"], entry["rows_of"], entry["layer"] or "-",
                     entry["image_size"], entry["resize"] or "-", entry["rows"], entry["feature_dim"],
                     f"{entry['bytes'] / 1e6:.1f}", time.strftime("%Y-%m-%d %H:%M", time.localtime(info.modified))])
    columns = ["fingerprint", "backbone", "rows of", "layer", "size", "resize", "rows", "dim", "MB", "modified"]
    render.table(f"feature stores in {cache_root(cache_dir)}", columns, rows)


def store_entry(info) -> dict:
    """One store as `cache ls --json` lists it: snake_case keys, numbers as numbers, the whole
    fingerprint, and what tells two stores of one backbone apart (resize policy, layer, pooling,
    weights, precision, the augmentation of a views store)."""
    payload = info.payload.get("base_payload", info.payload)
    augment = info.payload.get("augment")
    return {"fingerprint": info.fingerprint, "backbone": payload.get("name"),
            "rows_of": "views" if augment is not None else "images",
            "layer": payload.get("layer"), "pooling": payload.get("pooling"), "image_size": payload.get("image_size"),
            "resize": payload.get("resize"), "weights": payload.get("weights"), "precision": payload.get("precision"),
            "augment": augment, "rows": info.rows, "feature_dim": info.feature_dim, "shards": info.shards,
            "bytes": info.bytes, "modified": info.modified, "directory": str(info.directory)}


def cache_verify(repair: bool = typer.Option(False, "--repair", help="Delete damaged shards, rebuild wrong specs "
                                             "from their shards, forget remembered decode failures."),
                 cache_dir: Optional[Path] = CacheDir, as_json: bool = AsJson) -> None:
    """Check every shard of every store against its checksum (exit 1 when something is damaged and not repaired)."""
    from dataclasses import asdict

    from featurepipe.cli import render
    from featurepipe.rundir.maintenance import verify_cache
    from featurepipe.core.cachedirs import cache_root

    with Command(as_json):
        result = verify_cache(cache_root(cache_dir), repair=repair)
    damaged = bool(result.problems) and not repair
    if as_json:
        render.print_json({**asdict(result), "ok": not result.problems, "repair": repair})
        if damaged:
            raise typer.Exit(code=EXIT_FAILURE)
        return
    for note in result.repaired:
        render.flag("rebuilt", note)
    for directory, problems in result.problems.items():
        for problem in problems:
            render.flag("damaged", problem, style="red")
    if result.problems and not repair:
        render.console.print("run `featurepipe cache verify --repair` to delete the damaged shards (their images are "
                             "re-extracted on the next run) and rebuild wrong specs from their shards", highlight=False)
        raise typer.Exit(code=EXIT_FAILURE)
    state = "repaired" if result.problems else "ok"
    if result.failures_cleared:
        note = f"; forgot {result.failures_cleared} remembered decode failure(s), retried on the next extract"
    elif result.failures_remembered:
        note = (f"; {result.failures_remembered} image(s) remembered as undecodable (`--repair` forgets them so "
                f"they are retried)")
    else:
        note = ""
    render.stdout.print(f"{result.checked} store(s) checked: {state}{note}", highlight=False)


def cache_gc(dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be removed; change nothing."),
             runs: Optional[int] = typer.Option(
                 None, "--runs", min=0, metavar="KEEP",
                 help="Also remove the runs in CACHE/runs beyond the KEEP newest of each dataset (never a "
                      "dataset's latest run, never a --run-dir outside the cache). Without it no run is removed."),
             cache_dir: Optional[Path] = CacheDir, as_json: bool = AsJson) -> None:
    """Remove stores and rows that no dataset or run refers to any more (and, with --runs KEEP, old runs)."""
    from dataclasses import asdict

    from featurepipe.cli import render
    from featurepipe.rundir.maintenance import gc_cache
    from featurepipe.core.cachedirs import cache_root

    with Command(as_json):
        result = gc_cache(cache_root(cache_dir), dry_run=dry_run, keep_runs=runs)
    if as_json:
        render.print_json(asdict(result))
        return
    verb = "would remove" if dry_run else "removed"
    for path in result.runs_removed:
        render.stdout.print(f"{verb} run {path}", highlight=False)
    if runs is not None:
        render.stdout.print(f"{verb} {render.plural(len(result.runs_removed), 'run')}, kept {result.runs_kept}",
                            highlight=False)
    render.stdout.print(f"{verb} {len(result.stores_removed)} store(s), {result.rows_removed} row(s), "
                        f"{result.refs_removed} stale dataset reference(s)", highlight=False)
