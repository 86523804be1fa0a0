"""`featurepipe evaluate`: cross-validated heads on cached features, the best one refit in a run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from featurepipe.cli.common import Command, best_text, check_run_dir, head_names, scan_dataset
from featurepipe.cli.options import (
    AsJson, Augment, AugmentSeed, AutoFolds, CacheDir, Ensemble, Exclude, Grid, Groups, GroupsFrom, Heads, ImageSize, Jobs,
    Layer, Nested, NoDedupGroups, Overwrite, Pooling, Relabel, Repeats, RunDir, Scheduler, SearchBackbone,
    SearchResize, Seed, SelectMembers, Tta, Vote, Weights, Workers,
)


def evaluate(
    data: Path = typer.Argument(..., help="DATA/<class>/*, DATA/<split>/<class>/* or a CSV manifest."),
    heads: str = Heads,
    folds: Optional[int] = AutoFolds, repeats: int = Repeats,
    seed: int = Seed, grid: Optional[str] = Grid,
    augment: int = Augment, augment_seed: int = AugmentSeed,
    tta: bool = Tta,
    groups_from: Optional[Path] = GroupsFrom,
    groups: Optional[str] = Groups,
    backbone: Optional[str] = SearchBackbone, image_size: Optional[int] = ImageSize, layer: Optional[str] = Layer,
    pooling: str = Pooling, weights: str = Weights, resize: Optional[str] = SearchResize,
    nested: bool = Nested, ensemble: int = Ensemble, vote: bool = Vote, select_members: bool = SelectMembers,
    jobs: int = Jobs,
    run_dir: Optional[Path] = RunDir, cache_dir: Optional[Path] = CacheDir,
    no_dedup_groups: bool = NoDedupGroups, exclude: Optional[Path] = Exclude, relabel: Optional[Path] = Relabel,
    as_json: bool = AsJson,
    scheduler: Optional[str] = Scheduler, workers: Optional[int] = Workers,
    overwrite: bool = Overwrite,
) -> None:
    """Cross-validate heads on cached features; refit and save the best head in a run directory."""
    from featurepipe.cli import render
    from featurepipe.core.cachedirs import cache_root
    from featurepipe.data.augment import AugmentSpec
    from featurepipe.evaluation.config import SearchConfig
    from featurepipe.evaluation.evaluate import evaluate as run_evaluate, parse_grid

    with Command(as_json, distributed=True, scheduler=scheduler, workers=workers) as command:
        # What `run --quick` searches, from the same function as featurepipe.run(..., quick=True).
        config = SearchConfig.quick(
            backbone=backbone, resize=resize, image_size=image_size, layer=layer, pooling=pooling, weights=weights,
            heads=head_names(heads),
            grids=parse_grid(grid), folds=folds, repeats=repeats, seed=seed,
            augment=AugmentSpec(augment, seed=augment_seed), tta=tta, nested=nested, ensemble=ensemble, vote=vote,
            select_members=select_members,
            dedup_groups=not no_dedup_groups)
        root = cache_root(cache_dir)
        check_run_dir(run_dir, overwrite)
        with command.stage() as progress:
            dataset = scan_dataset(data, root, groups, groups_from, exclude, relabel, progress)
            result = run_evaluate(dataset, config, root, run_dir=run_dir, n_jobs=jobs, progress=progress)
    if as_json:
        render.print_json(result.to_dict())
        return
    for warning in dataset.warnings:
        render.flag("warning", warning)
    render.print_leaderboard(result.leaderboard)
    for split, metrics in result.holdout.items():
        render.stdout.print(f"best head on the {split} split ({render.plural(metrics['images'], 'image')}): accuracy "
                            f"{metrics['accuracy']:.3f}, macro F1 {metrics['f1_macro']:.3f}", highlight=False)
    if result.nested is not None:
        render.print_nested(result.nested.to_dict())
    for note in result.notes:
        render.flag("note", note)
    failed = result.extract.failed if result.extract else []
    render.stdout.print(
        f"best: {best_text(result.best)}; "
        f"{render.plural(result.fitted, 'fit')}, {result.reused} reused, {render.plural(len(failed), 'image')} failed, "
        f"{result.seconds:.1f} s\n"
        f"run: {result.run_dir}", highlight=False)
