"""`featurepipe run`: scan, extract, search, (fine-tune,) report, as one job.

The search goes in stages (evaluation.stages): each finished stage is one line on stderr ("search:
efficientnet_lite1/center_crop: nested 0.976 (...) after 14 s; next: 2 more feature sets, ~30 s"), in a
pipe too, since it is a result and not a progress bar. Ctrl-C exits 130 with where the finished stages'
run is kept, and no traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from featurepipe.evaluation.search import QUICK_BACKBONE
from featurepipe.cli.common import Command, best_text, check_run_dir, head_names, warmup_note, winner_text
from featurepipe.cli.options import (
    AsJson, Augment, AutoFolds, Budget, CacheDir, Ensemble, Exclude, FinetuneFolds, Grid, Groups, GroupsFrom, Heads, ImageSize, Jobs,
    Layer, Nested, NoDedupGroups,
    Overwrite, Pooling, Relabel, Repeats, RunDir, Scheduler, SearchBackbone, SearchResize, Seed, SelectMembers, StudentMember, TrainAugment, Tta, Wise, Mixup,
    Vote,
    Weights, Workers,
)


def run_all(
    data: Path = typer.Argument(..., help="DATA/<class>/*, DATA/<split>/<class>/* or a CSV manifest."),
    backbone: Optional[str] = SearchBackbone, image_size: Optional[int] = ImageSize, layer: Optional[str] = Layer,
    pooling: str = Pooling, weights: str = Weights, resize: Optional[str] = SearchResize,
    quick: bool = typer.Option(False, "--quick", help=f"One feature set ({QUICK_BACKBONE} at its default resize, the "
                                                      f"search's first stage) instead of the whole search."),
    heads: str = Heads,
    nested: bool = Nested, ensemble: int = Ensemble, vote: bool = Vote, select_members: bool = SelectMembers,
    folds: Optional[int] = AutoFolds, repeats: int = Repeats,
    seed: int = Seed, grid: Optional[str] = Grid,
    augment: int = Augment, tta: bool = Tta,
    groups_from: Optional[Path] = GroupsFrom,
    groups: Optional[str] = Groups,
    finetune: bool = typer.Option(False, "--finetune", help="Fine-tune the base + best head on the images after evaluating."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Fine-tuning epochs (with --finetune; default 12)."),
    finetune_folds: Optional[int] = FinetuneFolds,
    student: Optional[str] = StudentMember,
    train_augment: Optional[str] = TrainAugment,
    wise: Optional[float] = Wise,
    mixup: Optional[float] = Mixup,
    jobs: int = Jobs,
    run_dir: Optional[Path] = RunDir, cache_dir: Optional[Path] = CacheDir,
    no_dedup_groups: bool = NoDedupGroups, exclude: Optional[Path] = Exclude, relabel: Optional[Path] = Relabel,
    no_inspect: bool = typer.Option(False, "--no-inspect", help="Leave the know-your-data sections out of the report."),
    as_json: bool = AsJson,
    scheduler: Optional[str] = Scheduler, workers: Optional[int] = Workers,
    overwrite: bool = Overwrite,
    budget: float = Budget,
) -> None:
    """The whole job: scan, extract, cross-validate heads, (fine-tune,) report. Re-runs reuse everything unchanged."""
    from featurepipe.cli import render
    from featurepipe.core.cachedirs import cache_root
    from featurepipe.evaluation.config import SearchConfig
    from featurepipe.evaluation.evaluate import parse_grid
    from featurepipe.pipeline import RunInterrupted, run as run_pipeline
    from featurepipe.training.config import FinetuneConfig

    with Command(as_json, distributed=True, scheduler=scheduler, workers=workers,
                 interrupted="stopped before any feature set was searched; nothing was written") as command:
        # The same function as featurepipe.run() in Python: one source of defaults for both.
        config = SearchConfig.default(
            quick=quick, backbone=backbone, resize=resize, image_size=image_size, layer=layer, pooling=pooling,
            weights=weights, heads=head_names(heads), grids=parse_grid(grid), folds=folds,
            repeats=repeats, seed=seed, augment=augment, tta=tta, nested=nested, ensemble=ensemble, vote=vote,
            select_members=select_members,
            dedup_groups=not no_dedup_groups)
        # --epochs alone keeps the fine-tuning default; only --finetune fine-tunes.
        given = {k: v for k, v in {"epochs": epochs, "folds": finetune_folds, "member": student,
                                    "augment": train_augment, "wise": wise, "mixup": mixup}.items() if v is not None}
        if given and not finetune:
            flags = {"epochs": "--epochs", "folds": "--finetune-folds", "member": "--student",
                     "augment": "--train-augment", "wise": "--wise", "mixup": "--mixup"}
            render.flag("note", f"{', '.join(flags[k] for k in given)} has no effect without --finetune")
        tuning = FinetuneConfig(**given) if finetune else None
        check_run_dir(run_dir, overwrite)
        with command.stage() as bar:
            try:
                result = run_pipeline(data, config, cache_root(cache_dir), finetune=tuning, run_dir=run_dir,
                                      progress=bar if as_json else stage_lines(bar), n_jobs=jobs, exclude=exclude,
                                      relabel=relabel, inspect=not no_inspect, groups=groups, groups_from=groups_from,
                                      budget=budget)
            except RunInterrupted as stop:
                render.flag("interrupted", stop.message, soft_wrap=True)
                raise typer.Exit(code=130) from None
    if as_json:
        render.print_json(result.to_dict())
        return
    for warning in result.warnings:
        render.flag("warning", warning)
    render.print_leaderboard(result.leaderboard)
    for split, metrics in result.evaluate.holdout.items():
        render.stdout.print(f"best head on the {split} split ({render.plural(metrics['images'], 'image')}): accuracy "
                            f"{metrics['accuracy']:.3f}, macro F1 {metrics['f1_macro']:.3f}", highlight=False)
    if result.finetune is not None:
        ft = result.finetune
        note = warmup_note(tuning)
        if note:
            render.flag("note", note)
        render.stdout.print(f"fine-tuned ({ft.strategy}, {render.plural(ft.epochs_run, 'epoch')}): validation accuracy "
                            f"{ft.before['val_accuracy']:.3f} -> {ft.after['val_accuracy']:.3f}; kept {ft.kept}: "
                            f"{ft.reason}{' (reused)' if ft.reused else ''}", highlight=False)
        render.stdout.print(winner_text(ft), highlight=False)
    if result.evaluate.nested is not None:
        render.print_nested(result.evaluate.nested.to_dict())
    for note in result.evaluate.notes:
        render.flag("note", note)
    stages = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result.stages.items())
    render.stdout.print(
        f"best: {best_text(result.best)}\n{work_text(result, searched_sets(result, config))}\n"
        f"{stages}; total {render.process_seconds():.1f} s (start-up included)\n"
        f"run: {result.run_dir}\nreport: {result.report_path}", highlight=False)


def stage_lines(bar):
    """The progress callback `run` gets: a finished stage of the search is a line on stderr (bar or no
    bar), everything else goes to the bar when there is one."""
    from featurepipe.cli import render

    def on_event(event) -> None:
        if event.stage == "search":
            render.flag("search", event.message, style="cyan", soft_wrap=True)
        elif bar is not None:
            bar(event)

    return on_event


def searched_sets(result, config) -> int:
    """How many feature sets the search took: those asked for, less any --budget left out."""
    stages = (result.search_progress or {}).get("stages") or []
    return stages[-1]["feature_sets"] if stages else len(set(config.specs))


def work_text(result, feature_sets: int) -> str:
    """What was computed and what was reused, counting photos and feature sets apart: 24 photos searched
    over 8 feature sets are "24 images x 8 feature sets: 168 extracted, 24 reused", not "192 images"."""
    from featurepipe.cli.render import plural

    if result.reused_everything:
        return "nothing changed: all features and CV folds reused"
    ex, ev = result.extract, result.evaluate
    sets = f" x {plural(feature_sets, 'feature set')}" if feature_sets > 1 else ""
    views = f", {plural(ex.views_extracted, 'augmented view')} extracted" if ex.views_extracted else ""
    return (f"features: {plural(ex.images, 'image')}{sets}: {ex.extracted} extracted, {ex.reused} reused{views}; "
            f"CV: {plural(ev.fitted, 'fold')} fitted, {ev.reused} reused")
