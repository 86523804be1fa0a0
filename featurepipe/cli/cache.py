"""`featurepipe cache ls | verify | gc`: look into and maintain the feature cache."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from featurepipe.cli.common import Command
from featurepipe.cli.options import AsJson, CacheDir


def cache_ls(cache_dir: Optional[Path] = CacheDir, as_json: bool = AsJson) -> None:
    """List the feature stores in the cache."""
    import time

    from featurepipe.cli import render
    from featurepipe.rundir.maintenance import list_cache
    from featurepipe.core.cachedirs import cache_root

    with Command():
        infos = list_cache(cache_root(cache_dir))
    rows = []
    for info in infos:
        payload = info.payload.get("base_payload", info.payload)
        kind = "views" if "augment" in info.payload else "images"
        rows.append([info.fingerprint[:16], payload.get("name"), kind, payload.get("layer") or "-",
                     payload.get("image_size"), info.rows, info.feature_dim, f"{info.bytes / 1e6:.1f}",
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(info.modified))])
    columns = ["fingerprint", "backbone", "rows of", "layer", "size", "rows", "dim", "MB", "modified"]
    if as_json:
        render.print_json([dict(zip(columns, row)) for row in rows])
    else:
        render.table(f"feature stores in {cache_root(cache_dir)}", columns, rows)


def cache_verify(repair: bool = typer.Option(False, "--repair", help="Delete damaged shards, rebuild wrong specs "
                                             "from their shards, forget remembered decode failures."),
                 cache_dir: Optional[Path] = CacheDir) -> None:
    """Check every shard of every store against its checksum."""
    from featurepipe.cli import render
    from featurepipe.rundir.maintenance import verify_cache
    from featurepipe.core.cachedirs import cache_root

    with Command():
        result = verify_cache(cache_root(cache_dir), repair=repair)
    for note in result.repaired:
        render.flag("rebuilt", note)
    for directory, problems in result.problems.items():
        for problem in problems:
            render.flag("damaged", problem, style="red")
    if result.problems and not repair:
        render.console.print("run `featurepipe cache verify --repair` to delete the damaged shards (their images are "
                             "re-extracted on the next run) and rebuild wrong specs from their shards", highlight=False)
        raise typer.Exit(code=1)
    state = "repaired" if result.problems else "ok"
    if result.failures_cleared:
        note = f"; forgot {result.failures_cleared} remembered decode failure(s), retried on the next extract"
    elif result.failures_remembered:
        note = (f"; {result.failures_remembered} image(s) remembered as undecodable (`--repair` forgets them so "
                f"they are retried)")
    else:
        note = ""
    render.stdout.print(f"{result.checked} store(s) checked: {state}{note}", highlight=False)


def cache_gc(dry_run: bool = typer.Option(False, "--dry-run"), cache_dir: Optional[Path] = CacheDir) -> None:
    """Remove stores and rows that no dataset or run refers to any more."""
    from featurepipe.cli import render
    from featurepipe.rundir.maintenance import gc_cache
    from featurepipe.core.cachedirs import cache_root

    with Command():
        result = gc_cache(cache_root(cache_dir), dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    render.stdout.print(f"{verb} {len(result.stores_removed)} store(s), {result.rows_removed} row(s), "
                        f"{result.refs_removed} stale dataset reference(s)", highlight=False)
