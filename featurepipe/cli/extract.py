"""`featurepipe extract`: the frozen base over every image not yet in the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from featurepipe.cli.common import Command, dataset_summary, spec as make_spec
from featurepipe.cli.options import (
    SEED_MAX, AsJson, Augment, AugmentSeed, Backbone, CacheDir, ImageSize, Layer, LockTimeout, Pooling, Resize,
    Scheduler, Weights, Workers,
)

# Every shard is committed whole as its batch completes (the store's writer), so a stop loses only
# the batches in flight.
INTERRUPTED = ("stopped; the features committed so far stay in the cache: run the same command again to "
               "extract only what is missing")


def extract(
    data: Path = typer.Argument(..., help="DATA/<class>/*, DATA/<split>/<class>/* or a CSV manifest."),
    backbone: str = Backbone, image_size: Optional[int] = ImageSize, layer: Optional[str] = Layer,
    pooling: str = Pooling, weights: str = Weights, resize: Optional[str] = Resize, augment: int = Augment,
    augment_seed: int = AugmentSeed,
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Seed for --weights random."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per model call (default: 32 on a "
                                             "CPU, the largest of 256/128/64/32 that fits on a GPU)."),
    precision: str = typer.Option("float32", "--precision", help="float32 | mixed_float16 | mixed_bfloat16 (GPU "
                                  "speed-up; features ~1e-3 apart, kept in their own store)."),
    lock_timeout: float = LockTimeout,
    rehash: bool = typer.Option(False, "--rehash", help="Re-read every file instead of trusting the remembered "
                                "hashes (keyed by path, size, mtime, ctime and inode)."),
    cache_dir: Optional[Path] = CacheDir, as_json: bool = AsJson,
    scheduler: Optional[str] = Scheduler, workers: Optional[int] = Workers,
) -> None:
    """Run the frozen base over every image not yet in the cache and store its features."""
    from featurepipe.cli import render
    from featurepipe.core.cachedirs import cache_root
    from featurepipe.data.dataset import scan
    from featurepipe.data.augment import AugmentSpec
    from featurepipe.extraction.extract import extract as run_extract

    with Command(as_json, distributed=True, scheduler=scheduler, workers=workers, interrupted=INTERRUPTED) as command:
        spec = make_spec(backbone, image_size, layer, pooling, weights, resize, seed)
        root = cache_root(cache_dir)
        with command.stage() as progress:
            dataset = scan(data, cache_dir=root, progress=progress, rehash=rehash)
            result = run_extract(dataset, spec, root, augment=AugmentSpec(augment, seed=augment_seed),
                                 batch_size=batch_size, lock_timeout=lock_timeout, progress=progress,
                                 precision=precision)
    summary = {"dataset": dataset_summary(dataset), **result.to_dict()}
    if as_json:
        render.print_json(summary)
        return
    for warning in dataset.warnings + result.warnings:
        render.flag("warning", warning)
    for path, reason in dataset.unreadable:
        render.flag("skipped", f"{path}: {reason}")
    if result.waited_seconds >= 1:
        render.console.print(f"waited {result.waited_seconds:.0f} s for another featurepipe process writing "
                             f"{result.store_dir}; what it extracted is counted as reused", highlight=False)
    render.say(
        f"{result.backbone}: {render.plural(result.images, 'image')}, ", (f"{result.extracted} extracted", "green"),
        f", {result.reused} reused"
        + (f" ({render.plural(result.copied, 'square image')} from another resize policy's features)" if result.copied else "")
        + ", ", (f"{len(result.failed)} failed", "red"), f" in {result.seconds:.1f} s "
        f"({result.images_per_second:.1f} images/s); {result.feature_dim}-d features in {result.store_dir}")
    if augment:
        render.stdout.print(f"views: {result.views_extracted} extracted, {result.views_reused} reused "
                            f"({augment} per image) in {result.views_store_dir}", highlight=False)
    for failure in result.failed:
        render.stdout.print(f"  failed: {failure.path}: {failure.reason}", highlight=False)
