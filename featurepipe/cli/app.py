"""The `featurepipe` command: a thin typer layer that parses options, calls a stage, prints a summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from featurepipe.core.errors import FeaturepipeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Frozen ImageNet bases, cached features, cross-validated heads and fine-tuning for small image sets.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and maintain the feature cache.")
features_app = typer.Typer(no_args_is_help=True, help="Cached features as tables for other tools.")
app.add_typer(cache_app, name="cache")
app.add_typer(features_app, name="features")

CacheDir = typer.Option(None, "--cache-dir", help="Cache root (default: $FEATUREPIPE_CACHE or ./cache).")
Backbone = typer.Option("efficientnet_lite0", "--backbone", "-b", help="Backbone name; see `featurepipe backbones`.")
ImageSize = typer.Option(None, "--image-size", help="Input size in pixels (default: the backbone's).")
Layer = typer.Option(None, "--layer", help="Take features from this named layer (e.g. block4_pool, fc2).")
Pooling = typer.Option("avg", "--pooling", help="avg | max | flatten, for spatial layers.")
Weights = typer.Option("imagenet", "--weights", help="imagenet | random | PATH to a weights file.")
Resize = typer.Option(None, "--resize", help="squash | center_crop | letterbox (default: the backbone's).")
SearchBackbone = typer.Option(None, "--backbone", "-b",
                              help="Backbone, or a comma-separated list to search (run default: efficientnet_lite0,"
                                   "efficientnet_lite1,efficientnet_lite2; evaluate default: efficientnet_lite0).")
SearchResize = typer.Option(None, "--resize", help="squash | center_crop | letterbox | auto (all three, compared by "
                                                   "CV; the default of `run`).")
Nested = typer.Option(True, "--nested/--no-nested", help="Score the whole selection by nested CV (the headline).")
Ensemble = typer.Option(3, "--ensemble", help="With one feature set (or --no-vote): also try a soft vote of the best N "
                        "heads on the best feature set (0: off).")
Vote = typer.Option(True, "--vote/--no-vote", help="With several feature sets, the model is a vote: each set's best "
                    "logreg, probabilities averaged (measured +1 to +5 points over picking one row). --no-vote picks "
                    "one configuration instead.")
Augment = typer.Option(0, "--augment", help="Also cache K augmented views per image.")
AsJson = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout.")
Heads = typer.Option("logreg,knn,ncm", "--heads", help="Comma-separated head names (default: what `run` searches; "
                                                         "linear_svm and dense on request: 3x and ~20x a logreg fit).")
Folds = typer.Option(5, "--folds")
AutoFolds = typer.Option(None, "--folds", help="Cross-validation folds (default: 5, or as many as the smallest "
                                               "class has images when that is 2-4, said in the summary).")
Repeats = typer.Option(1, "--repeats")
Seed = typer.Option(0, "--seed")
Grid = typer.Option(None, "--grid", help="JSON or a .toml/.json file: {head: {param: [values]}}.")
Tta = typer.Option(False, "--tta", help="Average each validation image over its augmented views.")
Jobs = typer.Option(-1, "--jobs", help="Parallel fits (joblib n_jobs).")
RunDir = typer.Option(None, "--run-dir")
# Scaling out (featurepipe.extraction.executors.local); both need `pip install 'featurepipe[dask]'`.
Scheduler = typer.Option(None, "--scheduler", help="Run on this Dask scheduler, e.g. tcp://host:8786 "
                         "(default: $FEATUREPIPE_SCHEDULER; none: this process).")
Workers = typer.Option(None, "--workers", help="Start a Dask LocalCluster of N worker processes for this run.")
Overwrite = typer.Option(False, "--overwrite", help="Write into an existing folder that is not a featurepipe run.")
Trust = typer.Option(False, "--trust", help="Load a run whose head this user's key did not sign (copied from "
                     "elsewhere). Loading a head can run code it contains: only for runs you trust.")


@app.callback()
def _global_options(
    ctx: typer.Context,
    verbose: bool = typer.Option(False, "--verbose", help="Show TensorFlow's start-up and native log lines "
                                                        "(hidden by default)."),
    allow_outside_root: bool = typer.Option(
        False, "--allow-outside-root", help="Let a CSV manifest name files outside its own folder (absolute "
        "paths or ../); refused by default so a manifest cannot make featurepipe read arbitrary files."),
) -> None:
    """Frozen ImageNet bases, cached features, cross-validated heads and fine-tuning for small image sets."""
    from featurepipe.cli.memory import lean_arrow_allocator

    lean_arrow_allocator()   # before anything imports pandas (issue 14: flat memory)
    from featurepipe.data.dataset import outside_root_allowed

    if not verbose:
        from featurepipe.cli.quiet import quiet_tensorflow_startup

        quiet_tensorflow_startup()
    if allow_outside_root:
        scope = outside_root_allowed(True)
        scope.__enter__()
        ctx.call_on_close(lambda: scope.__exit__(None, None, None))


# issue 11: near-duplicate groups and inspect's fixes fed back into evaluate/run
NoDedupGroups = typer.Option(False, "--no-dedup-groups",
                             help="Do not put near-duplicate images in one CV group (see `featurepipe inspect`).")
Exclude = typer.Option(None, "--exclude", help="CSV with a path column: leave these images out (e.g. inspect's suspects.csv).")
Relabel = typer.Option(None, "--relabel", help="CSV with columns path,label (or inspect's 'suggested'): new labels.")


def _fail(error: Exception) -> None:
    from featurepipe.cli.render import console

    # soft_wrap: one line, however narrow the terminal (rich wraps at 80 columns in a pipe)
    console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _check_run_dir(run_dir: Optional[Path], overwrite: bool) -> None:
    """--run-dir: refuse a folder of the user's that is not a run before any work starts (issue 12)."""
    if run_dir is not None:
        from featurepipe.rundir.folder import prepare_run_dir

        prepare_run_dir(run_dir, overwrite)


def _head_names(heads: str) -> tuple[str, ...]:
    return tuple(h.strip() for h in heads.split(",") if h.strip())


def _search_specs(backbone, resize, quick, image_size, layer, pooling, weights, seed=0):
    from featurepipe.evaluation.search import parse_backbones, search_specs

    return search_specs(parse_backbones(backbone), resize, quick, image_size=image_size, layer=layer,
                        pooling=pooling, weights=weights, seed=seed)


def _best_text(best: dict) -> str:
    from featurepipe.cli.render import params_text

    where = f"{best['features']} " if best.get("features") else ""
    return f"{where}{best['head']} {params_text(json.dumps(best['params']))} ({best['augment']})"


def _spec(backbone, image_size, layer, pooling, weights, resize, seed=0):
    from featurepipe.backbones.spec import BackboneSpec

    return BackboneSpec(name=backbone, weights=weights, layer=layer, pooling=pooling, image_size=image_size,
                        resize=resize, seed=seed).resolved()


@app.command()
def extract(
    data: Path = typer.Argument(..., help="DATA/<class>/*, DATA/<split>/<class>/* or a CSV manifest."),
    backbone: str = Backbone, image_size: Optional[int] = ImageSize, layer: Optional[str] = Layer,
    pooling: str = Pooling, weights: str = Weights, resize: Optional[str] = Resize, augment: int = Augment,
    augment_seed: int = typer.Option(0, "--augment-seed"), seed: int = typer.Option(0, "--seed", help="Seed for --weights random."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per model call (default: 32 on a "
                                             "CPU, the largest of 256/128/64/32 that fits on a GPU)."),
    precision: str = typer.Option("float32", "--precision", help="float32 | mixed_float16 | mixed_bfloat16 (GPU "
                                  "speed-up; features ~1e-3 apart, kept in their own store)."),
    lock_timeout: float = typer.Option(600.0, "--lock-timeout"),
    rehash: bool = typer.Option(False, "--rehash", help="Re-read every file instead of trusting the remembered "
                                "hashes (keyed by path, size, mtime, ctime and inode)."),
    cache_dir: Optional[Path] = CacheDir, as_json: bool = AsJson,
    scheduler: Optional[str] = Scheduler, workers: Optional[int] = Workers,
) -> None:
    """Run the frozen base over every image not yet in the cache and store its features."""
    from featurepipe.cli import render
    from featurepipe.data.dataset import scan
    from featurepipe.extraction.executors.local import executor_scope
    from featurepipe.extraction.extract import extract as run_extract
    from featurepipe.data.augment import AugmentSpec
    from featurepipe.core.cachedirs import cache_root

    try:
        spec = _spec(backbone, image_size, layer, pooling, weights, resize, seed)
        root = cache_root(cache_dir)
        with render.progress_view(False if as_json else None) as progress, render.json_safe_stdout(as_json), \
                executor_scope(scheduler, workers):
            dataset = scan(data, cache_dir=root, progress=progress, rehash=rehash)
            result = run_extract(dataset, spec, root, augment=AugmentSpec(augment, seed=augment_seed),
                                 batch_size=batch_size, lock_timeout=lock_timeout, progress=progress,
                                 precision=precision)
    except (FeaturepipeError, ValueError) as error:
        _fail(error)
    summary = {"dataset": _dataset_summary(dataset), **result.to_dict()}
    if as_json:
        render.print_json(summary)
        return
    for warning in dataset.warnings + result.warnings:
        render.console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    for path, reason in dataset.unreadable:
        render.console.print(f"[yellow]skipped:[/] {path}: {reason}", highlight=False)
    if result.waited_seconds >= 1:
        render.console.print(f"waited {result.waited_seconds:.0f} s for another featurepipe process writing "
                             f"{result.store_dir}; what it extracted is counted as reused", highlight=False)
    render.stdout.print(
        f"{result.backbone}: {result.images} images, [green]{result.extracted} extracted[/], "
        f"{result.reused} reused"
        + (f" ({result.copied} square images from another resize policy's features)" if result.copied else "")
        + f", [red]{len(result.failed)} failed[/] in {result.seconds:.1f} s "
        f"({result.images_per_second:.1f} images/s); {result.feature_dim}-d features in {result.store_dir}",
        highlight=False)
    if augment:
        render.stdout.print(f"views: {result.views_extracted} extracted, {result.views_reused} reused "
                            f"({augment} per image) in {result.views_store_dir}", highlight=False)
    for failure in result.failed:
        render.stdout.print(f"  failed: {failure.path}: {failure.reason}", highlight=False)


def _scan_dataset(data, root, groups, groups_from, exclude, relabel, progress):
    """scan, then --groups-from, then --exclude / --relabel (issue 11), in that order."""
    from featurepipe.data.dataset import load_groups, scan
    from featurepipe.data.edits import apply_fixes

    dataset = scan(data, cache_dir=root, groups_pattern=groups, progress=progress)
    if groups_from is not None:
        dataset = load_groups(dataset, groups_from)
    return apply_fixes(dataset, exclude, relabel)


def _dataset_summary(dataset) -> dict:
    return {"source": str(dataset.source), "layout": dataset.layout, "images": len(dataset),
            "classes": dataset.class_counts(), "splits": dataset.splits, "ignored_files": dataset.ignored,
            "unreadable": [{"path": p, "reason": r} for p, r in dataset.unreadable],
            "warnings": dataset.warnings}


@app.command()
def evaluate(
    data: Path = typer.Argument(..., help="DATA/<class>/*, DATA/<split>/<class>/* or a CSV manifest."),
    heads: str = Heads,
    folds: Optional[int] = AutoFolds, repeats: int = Repeats,
    seed: int = Seed, grid: Optional[str] = Grid,
    augment: int = Augment, augment_seed: int = typer.Option(0, "--augment-seed"),
    tta: bool = Tta,
    groups_from: Optional[Path] = typer.Option(None, "--groups-from", help="CSV with columns path,group."),
    groups: Optional[str] = typer.Option(None, "--groups", help="Regex on file names; its first group is the group id."),
    backbone: Optional[str] = SearchBackbone, image_size: Optional[int] = ImageSize, layer: Optional[str] = Layer,
    pooling: str = Pooling, weights: str = Weights, resize: Optional[str] = SearchResize,
    nested: bool = Nested, ensemble: int = Ensemble, vote: bool = Vote,
    jobs: int = Jobs,
    run_dir: Optional[Path] = RunDir, cache_dir: Optional[Path] = CacheDir,
    no_dedup_groups: bool = NoDedupGroups, exclude: Optional[Path] = Exclude, relabel: Optional[Path] = Relabel,
    as_json: bool = AsJson,
    scheduler: Optional[str] = Scheduler, workers: Optional[int] = Workers,
    overwrite: bool = Overwrite,  # issue 12
) -> None:
    """Cross-validate heads on cached features; refit and save the best head in a run directory."""
    from featurepipe.cli import render
    from featurepipe.extraction.executors.local import executor_scope
    from featurepipe.evaluation.evaluate import evaluate as run_evaluate, parse_grid
    from featurepipe.data.augment import AugmentSpec
    from featurepipe.core.cachedirs import cache_root

    try:
        specs = _search_specs(backbone, resize, True, image_size, layer, pooling, weights)
        root = cache_root(cache_dir)
        _check_run_dir(run_dir, overwrite)  # issue 12
        with render.progress_view(False if as_json else None) as progress, render.json_safe_stdout(as_json), \
                executor_scope(scheduler, workers):
            dataset = _scan_dataset(data, root, groups, groups_from, exclude, relabel, progress)
            result = run_evaluate(dataset, specs[0], root, heads=_head_names(heads),
                                  grids=parse_grid(grid), folds=folds, repeats=repeats, seed=seed, augment=AugmentSpec(augment, seed=augment_seed),
                                  tta=tta, run_dir=run_dir, n_jobs=jobs, progress=progress,
                                  specs=specs, nested=nested, ensemble=ensemble, dedup_groups=not no_dedup_groups,
                                  vote=vote)
    except (FeaturepipeError, ValueError) as error:
        _fail(error)
    if as_json:
        render.print_json(result.to_dict())
        return
    for warning in dataset.warnings:
        render.console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    render.print_leaderboard(result.leaderboard)
    for split, metrics in result.holdout.items():
        render.stdout.print(f"best head on the {split} split ({metrics['images']} images): accuracy "
                            f"{metrics['accuracy']:.3f}, macro F1 {metrics['f1_macro']:.3f}", highlight=False)
    if result.nested is not None:
        render.print_nested(result.nested.to_dict())
    for note in result.notes:
        render.console.print(f"[yellow]note:[/] {note}", highlight=False)
    failed = result.extract.failed if result.extract else []
    render.stdout.print(
        f"best: {_best_text(result.best)}; "
        f"{result.fitted} fits, {result.reused} reused, {len(failed)} images failed, {result.seconds:.1f} s\n"
        f"run: {result.run_dir}", highlight=False)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory written by `featurepipe evaluate`."),
           thumbnails: int = typer.Option(24, "--thumbnails", help="Misclassified images to show."),
           as_json: bool = AsJson) -> None:
    """Write RUN_DIR/report.html (self-contained) and the charts as PNGs in RUN_DIR/report/."""
    from featurepipe.cli import render
    from featurepipe.report.html import write_report

    try:
        with render.progress_view(False if as_json else None) as progress, render.json_safe_stdout(as_json):
            result = write_report(run_dir, thumbnails=thumbnails, progress=progress)
    except FeaturepipeError as error:
        _fail(error)
    if as_json:
        render.print_json(result.to_dict())
        return
    render.stdout.print(f"wrote {result.html_path} ({len(result.png_paths)} charts in {run_dir / 'report'})",
                        highlight=False)


@app.command()
def finetune(
    run_dir: Path = typer.Argument(..., help="A run directory written by `featurepipe evaluate`."),
    unfreeze_blocks: Optional[int] = typer.Option(
        None, "--unfreeze-blocks", help="Top blocks of the base to train (default: the backbone's top, e.g. the "
                                        "last two MBConv stages + head for EfficientNet-Lite, block5 for VGG)."),
    epochs: int = typer.Option(12, "--epochs", help="At most this many epochs (early stopping on validation)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default: 1e-3 adamw, 1e-2 sgd); "
                                                          "fpt pre-trains the head at 10x."),
    optimizer: str = typer.Option("adamw", "--optimizer", help="adamw | sgd (momentum, the seeds' recipe)."),
    momentum: float = typer.Option(0.9, "--momentum", help="SGD momentum."),
    weight_decay: float = typer.Option(1e-4, "--weight-decay", help="AdamW decoupled weight decay."),
    label_smoothing: float = typer.Option(0.0, "--label-smoothing", help="0 by default: measured better on the plain validation loss the decision uses."),
    schedule: str = typer.Option("cosine", "--schedule", help="cosine (linear warm-up, cosine to 0) | constant."),
    warmup_epochs: int = typer.Option(1, "--warmup-epochs"),
    batch_size: int = typer.Option(16, "--batch-size"),
    strategy: str = typer.Option("top-blocks", "--strategy", help="head | top-blocks | fpt | all"),
    patience: int = typer.Option(4, "--patience", help="Early stopping patience on validation loss (epochs)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted fine-tuning with its original options."),
    reuse: bool = typer.Option(True, "--reuse/--no-reuse", help="Return a finished fine-tuning with the same inputs and options."),
    seed: int = typer.Option(0, "--seed"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Cache root (default: the run's)."),
    as_json: bool = AsJson,
) -> None:
    """Fine-tune the run's base and best head on images; it becomes the run's model only if it measurably beats the frozen head."""
    from featurepipe.cli import render
    from featurepipe.training.finetune import finetune as run_finetune

    try:
        with render.progress_view(False if as_json else None) as progress, render.json_safe_stdout(as_json):
            result = run_finetune(run_dir, unfreeze_blocks=unfreeze_blocks, epochs=epochs, lr=lr,
                                  batch_size=batch_size, strategy=strategy, patience=patience, resume=resume,
                                  seed=seed, cache_dir=cache_dir, progress=progress, optimizer=optimizer,
                                  momentum=momentum, weight_decay=weight_decay, label_smoothing=label_smoothing,
                                  warmup_epochs=warmup_epochs, schedule=schedule, reuse=reuse)
    except KeyboardInterrupt:
        render.console.print(f"[yellow]interrupted:[/] continue with `featurepipe finetune {run_dir} --resume`",
                             highlight=False)
        raise typer.Exit(code=130)
    except (FeaturepipeError, ValueError) as error:
        _fail(error)
    if as_json:
        render.print_json(result.to_dict())
        return
    before, after = result.before, result.after
    where = "the validation split" if result.validation == "validation" else "20% of train held out"
    reused = " (reused: nothing changed since the last fine-tuning)" if result.reused else ""
    per_epoch = f", {result.seconds_per_epoch:.1f} s/epoch" if result.seconds_per_epoch else ""
    render.stdout.print(
        f"{result.strategy}: val accuracy {before['val_accuracy']:.3f} -> {after['val_accuracy']:.3f}, "
        f"val loss {before['val_loss']:.4f} -> {after['val_loss']:.4f} ({result.val_images} images, {where}); "
        f"{result.epochs_run} epochs (best {result.best_epoch}), {len(result.unfrozen_layers)} base layers / "
        f"{result.trainable_params:,} weights trained, {result.seconds:.1f} s{per_epoch}{reused}",
        highlight=False)
    for note in result.notes:
        render.console.print(f"[yellow]note:[/] {note}", highlight=False)
    if result.test:
        render.stdout.print(f"test split ({result.test['images']} images, scored once): accuracy frozen "
                            f"{result.test['frozen']['val_accuracy']:.3f}, fine-tuned "
                            f"{result.test['finetuned']['val_accuracy']:.3f}", highlight=False)
    if result.kept == "finetuned":
        render.stdout.print(f"kept the fine-tuned model: {result.reason}\nmodel: {result.model_path}", highlight=False)
    else:
        render.console.print(f"[yellow]kept the frozen head:[/] {result.reason}", highlight=False)


@app.command()
def baseline(
    data: Path = typer.Argument(..., help="DATA/<class>/*, DATA/<split>/<class>/* or a CSV manifest."),
    epochs: int = typer.Option(30, "--epochs"),
    image_size: int = typer.Option(150, "--image-size"),
    batch_size: int = typer.Option(16, "--batch-size"),
    seed: int = typer.Option(0, "--seed"),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Write RUN_DIR/baseline/ (e.g. into an evaluated run)."),
    cache_dir: Optional[Path] = CacheDir,
    as_json: bool = AsJson,
    overwrite: bool = Overwrite,
) -> None:
    """Train the seeds' small convnet from scratch (the yardstick for transfer learning)."""
    from featurepipe.cli import render
    from featurepipe.training.baseline import baseline as run_baseline
    from featurepipe.data.dataset import scan
    from featurepipe.core.cachedirs import cache_root

    try:
        root = cache_root(cache_dir)
        _check_run_dir(run_dir, overwrite)
        with render.progress_view(False if as_json else None) as progress, render.json_safe_stdout(as_json):
            dataset = scan(data, cache_dir=root, progress=progress)
            result = run_baseline(dataset, image_size=image_size, epochs=epochs, batch_size=batch_size, seed=seed,
                                  run_dir=run_dir, progress=progress, cache_dir=root)
    except (FeaturepipeError, ValueError) as error:
        _fail(error)
    if as_json:
        render.print_json(result.to_dict())
        return
    render.stdout.print(
        f"baseline: val accuracy {result.after['val_accuracy']:.3f}, val loss {result.after['val_loss']:.4f} "
        f"({result.val_images} images) after {result.epochs_run} epochs (best {result.best_epoch}), "
        f"{result.seconds:.1f} s\nmodel: {result.model_path}", highlight=False)


RunCacheDir = typer.Option(None, "--cache-dir", help="Cache root (default: the one the run was made with).")
ModelChoice = typer.Option("auto", "--model", help="auto (the fine-tuned model if the run has one) | finetuned | head.")


@app.command()
def predict(
    run_dir: Path = typer.Argument(..., help="A run directory written by `featurepipe evaluate` or `featurepipe run`."),
    inputs: list[Path] = typer.Argument(..., help="Image files and/or folders (walked for images)."),
    top_k: int = typer.Option(3, "--top-k", help="Top classes to list per image."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the predictions: .csv (one row per image) or .json."),
    model: str = ModelChoice, batch_size: int = typer.Option(32, "--batch-size"),
    cache_dir: Optional[Path] = RunCacheDir, as_json: bool = AsJson, trust: bool = Trust,
) -> None:
    """Classify images with a run's model, preprocessed exactly as in training; bad files get an error row."""
    from featurepipe.cli import render
    from featurepipe.deploy.predict import predict as run_predict

    try:
        with render.progress_view(False if as_json else None) as progress, render.json_safe_stdout(as_json):
            result = run_predict(run_dir, inputs, top_k=top_k, cache_dir=cache_dir, batch_size=batch_size,
                                 progress=progress, model=model, trust=trust)
        written = result.save(out) if out is not None else None
    except (FeaturepipeError, OSError) as error:
        _fail(error)
    if as_json:
        render.print_json(result.to_dict())
        return
    for warning in result.warnings:
        render.console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    rows = []
    for record in result.records():
        if record["error"]:
            rows.append([record["path"], "[red]error[/]", "", record["error"]])
        else:
            others = ", ".join(f"{record[f'label_{i}']} {record[f'prob_{i}']:.3f}" for i in range(2, result.top_k + 1))
            rows.append([record["path"], record["label"], f"{record['probability']:.3f}", others])
    render.table(f"predictions ({result.model_kind} model)", ["path", "label", "p", "next"], rows)
    render.stdout.print(
        f"{len(result.frame)} images: {result.reused} features from the cache, {result.computed} computed, "
        f"{result.failed} failed, {result.seconds:.1f} s" + (f"\nwrote {written}" if written else ""), highlight=False)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A run directory written by `featurepipe evaluate` or `featurepipe run`."),
    fmt: str = typer.Option("keras", "--format", "-f", help="keras | savedmodel | tflite."),
    out: Path = typer.Option(..., "--out", help="Folder for the model, labels.txt and export.json."),
    model: str = ModelChoice, cache_dir: Optional[Path] = RunCacheDir, as_json: bool = AsJson,
    trust: bool = Trust,
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into an existing folder that is not an export."),
) -> None:
    """Export the run's model as one network: raw uint8 RGB images in, class probabilities out.

    keras and savedmodel take images of any size (resizing is inside); tflite takes
    (1, size, size, 3) images already resized with the run's resize policy (see export.json).
    """
    from featurepipe.cli import render
    from featurepipe.deploy.export import export as run_export

    try:
        with render.progress_view(False if as_json else None) as progress, render.json_safe_stdout(as_json):
            result = run_export(run_dir, fmt, out, cache_dir=cache_dir, model=model, progress=progress, trust=trust,
                                overwrite=overwrite)
    except (FeaturepipeError, OSError) as error:
        _fail(error)
    if as_json:
        render.print_json(result.to_dict())
        return
    shape = "x".join("N" if d is None else str(d) for d in result.input_shape)
    render.stdout.print(
        f"wrote {result.path} ({result.format}, {result.model_kind} model, {len(result.classes)} classes, "
        f"input uint8 {shape}) with {result.labels_path.name} and {result.meta_path.name} in {result.seconds:.1f} s",
        highlight=False)
    if result.format == "tflite":
        render.stdout.print(f"TFLite takes one image already resized to {result.image_size}x{result.image_size} "
                            f"({result.resize}); the keras and savedmodel formats resize inside", highlight=False)


@app.command("run")
def run_all(
    data: Path = typer.Argument(..., help="DATA/<class>/*, DATA/<split>/<class>/* or a CSV manifest."),
    backbone: Optional[str] = SearchBackbone, image_size: Optional[int] = ImageSize, layer: Optional[str] = Layer,
    pooling: str = Pooling, weights: str = Weights, resize: Optional[str] = SearchResize,
    quick: bool = typer.Option(False, "--quick", help="One backbone (efficientnet_lite0) and its default resize "
                                                      "instead of the whole search."),
    heads: Optional[str] = typer.Option(None, "--heads", help="Comma-separated head names (default: logreg,knn,ncm)."),
    nested: bool = Nested, ensemble: int = Ensemble, vote: bool = Vote,
    folds: Optional[int] = AutoFolds, repeats: int = Repeats,
    seed: int = Seed, grid: Optional[str] = Grid,
    augment: int = Augment, tta: bool = Tta,
    finetune: bool = typer.Option(False, "--finetune", help="Fine-tune the base + best head on the images after evaluating."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Fine-tuning epochs (with --finetune; default 12)."),
    jobs: int = Jobs,
    run_dir: Optional[Path] = RunDir, cache_dir: Optional[Path] = CacheDir,
    no_dedup_groups: bool = NoDedupGroups, exclude: Optional[Path] = Exclude, relabel: Optional[Path] = Relabel,
    no_inspect: bool = typer.Option(False, "--no-inspect", help="Leave the know-your-data sections out of the report."),
    as_json: bool = AsJson,
    scheduler: Optional[str] = Scheduler, workers: Optional[int] = Workers,
    overwrite: bool = Overwrite,  # issue 12
) -> None:
    """The whole job: scan, extract, cross-validate heads, (fine-tune,) report. Re-runs reuse everything unchanged."""
    from featurepipe.cli import render
    from featurepipe.evaluation.evaluate import SEARCH_HEADS, parse_grid
    from featurepipe.extraction.executors.local import executor_scope
    from featurepipe.core.cachedirs import cache_root
    from featurepipe.pipeline import run as run_pipeline

    try:
        specs = _search_specs(backbone, resize, quick, image_size, layer, pooling, weights)
        _check_run_dir(run_dir, overwrite)  # issue 12
        with render.progress_view(False if as_json else None) as progress, render.json_safe_stdout(as_json), \
                executor_scope(scheduler, workers):
            result = run_pipeline(data, specs[0], cache_root(cache_dir),
                                  heads=_head_names(heads) if heads else SEARCH_HEADS,
                                  folds=folds, repeats=repeats, seed=seed, augment=augment, tta=tta, finetune=finetune,
                                  finetune_epochs=epochs, run_dir=run_dir, progress=progress, grids=parse_grid(grid),
                                  n_jobs=jobs, specs=specs, nested=nested, ensemble=ensemble, vote=vote,
                                  dedup_groups=not no_dedup_groups, exclude=exclude, relabel=relabel,
                                  inspect=not no_inspect)
    except (FeaturepipeError, ValueError) as error:
        _fail(error)
    if as_json:
        render.print_json(result.to_dict())
        return
    for warning in result.warnings:
        render.console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    render.print_leaderboard(result.leaderboard)
    for split, metrics in result.evaluate.holdout.items():
        render.stdout.print(f"best head on the {split} split ({metrics['images']} images): accuracy "
                            f"{metrics['accuracy']:.3f}, macro F1 {metrics['f1_macro']:.3f}", highlight=False)
    if result.finetune is not None:
        ft = result.finetune
        render.stdout.print(f"fine-tuned ({ft.strategy}, {ft.epochs_run} epochs): validation accuracy "
                            f"{ft.before['val_accuracy']:.3f} -> {ft.after['val_accuracy']:.3f}; kept {ft.kept}: "
                            f"{ft.reason}{' (reused)' if ft.reused else ''}", highlight=False)
    if result.evaluate.nested is not None:
        render.print_nested(result.evaluate.nested.to_dict())
    for note in result.evaluate.notes:
        render.console.print(f"[yellow]note:[/] {note}", highlight=False)
    stages = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result.stages.items())
    render.stdout.print(
        f"best: {_best_text(result.best)}; "
        f"{result.message}\n{stages}; total {result.seconds:.1f} s\n"
        f"run: {result.run_dir}\nreport: {result.report_path}", highlight=False)


@app.command()
def inspect(
    data: Path = typer.Argument(..., help="DATA/<class>/*, DATA/<split>/<class>/* or a CSV manifest."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Take label-issue probabilities from this run's "
                                           "oof_predictions.csv (its best head) instead of a fixed logreg head."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for inspect.json, the CSVs and inspect.html "
                                       "(default: RUN_DIR/inspect with --run-dir, else CACHE/inspections/<time>-<name>)."),
    top: int = typer.Option(15, "--top", help="Suspects to print."),
    folds: int = Folds, seed: int = Seed,
    dedup_cosine: float = typer.Option(None, "--dedup-cosine", help="Feature cosine at or above which two images are copies."),
    dedup_hamming: int = typer.Option(None, "--dedup-hamming", help="Perceptual-hash bits at or below which two images are copies."),
    groups_from: Optional[Path] = typer.Option(None, "--groups-from", help="CSV with columns path,group."),
    groups: Optional[str] = typer.Option(None, "--groups", help="Regex on file names; its first group is the group id."),
    exclude: Optional[Path] = Exclude, relabel: Optional[Path] = Relabel,
    backbone: str = Backbone, image_size: Optional[int] = ImageSize, layer: Optional[str] = Layer,
    pooling: str = Pooling, weights: str = Weights, resize: Optional[str] = Resize,
    jobs: int = Jobs, cache_dir: Optional[Path] = CacheDir, as_json: bool = AsJson,
) -> None:
    """Know your data: near-duplicates and fold leakage, label issues, outliers, class balance, learning curve
    and an embedding map, all from cached features; writes inspect.html and suspects.csv."""
    from featurepipe.cli import render
    from featurepipe.data.dedup import DEFAULT_COSINE, DEFAULT_HAMMING
    from featurepipe.inspection.inspect import inspect_dataset, oof_from_run
    from featurepipe.core.cachedirs import cache_root
    from featurepipe.report.inspect_sections import write_inspect_report

    try:
        spec = _spec(backbone, image_size, layer, pooling, weights, resize)
        root = cache_root(cache_dir)
        with render.progress_view(False if as_json else None) as progress, render.json_safe_stdout(as_json):
            dataset = _scan_dataset(data, root, groups, groups_from, exclude, relabel, progress)
            result = inspect_dataset(
                dataset, spec, root, out_dir=out if out is not None else (run_dir / "inspect" if run_dir else None),
                oof_source=oof_from_run(run_dir) if run_dir is not None else None, folds=folds, seed=seed,
                cosine_threshold=DEFAULT_COSINE if dedup_cosine is None else dedup_cosine,
                hamming_threshold=DEFAULT_HAMMING if dedup_hamming is None else dedup_hamming,
                n_jobs=jobs, progress=progress)
            html = write_inspect_report(result.out_dir, progress=progress)
    except (FeaturepipeError, ValueError) as error:
        _fail(error)
    if as_json:
        render.print_json({**result.to_dict(), "html": str(html)})
        return
    _print_inspect(render, result, top, html)


def _print_inspect(render, result, top: int, html: Path) -> None:
    s = result.summary
    for failure in result.failed:
        render.stdout.print(f"  in no analysis: {failure['path']}: {failure['reason']}", highlight=False)
    d = s.get("duplicates", {})
    leak = (f"; without groups {d['leaked_folds']} of {d['folds']} folds would leak" if d.get("folds") else "")
    render.stdout.print(f"near-duplicates: {d.get('pairs', 0)} pair(s) in {d.get('clusters', 0)} group(s), "
                        f"{d.get('cross_class_pairs', 0)} across classes{leak}", highlight=False)
    balance = s.get("balance", {})
    render.stdout.print("classes: " + ", ".join(f"{c} {n}" for c, n in balance.get("counts", {}).items())
                        + (f" [yellow](imbalanced, {balance['ratio']:.1f}x)[/]" if balance.get("imbalanced") else ""),
                        highlight=False)
    notes = s.get("notes", {})
    if "margin" in result.suspects.columns:
        rows = [[str(int(r["rank"])), r["path"], r["given"], r["suggested"], f"{r['self_confidence']:.3f}",
                 f"{r['margin']:+.3f}", "yes" if str(r.get("flagged")) in ("True", "true") else ""]
                for r in result.suspects.head(top).to_dict("records")]
        render.table(f"top {len(rows)} label suspects ({s.get('label_source')})",
                     ["#", "path", "given", "suggested", "p(given)", "margin", "confident"], rows)
    else:
        render.stdout.print(f"label issues: {notes.get('label_issues', 'not computed')}", highlight=False)
    outliers = s.get("outliers")
    if outliers:
        render.stdout.print(f"outliers: {outliers['flagged']} above kNN distance {outliers['threshold']:.3f}",
                            highlight=False)
    curve = s.get("learning_curve")
    render.stdout.print(f"learning curve: {curve['reading'] if curve else notes.get('learning_curve', 'not computed')}",
                        highlight=False)
    render.stdout.print(f"{'reused cached result' if s.get('reused') else f'{result.seconds:.1f} s'}; "
                        f"suspects: {result.out_dir / 'suspects.csv'}\nreport: {html}", highlight=False)


@app.command()
def backbones(as_json: bool = AsJson) -> None:
    """List the backbone registry with input sizes and feature dims."""
    from featurepipe.cli import render
    from featurepipe.backbones.registry import BACKBONES

    rows = [[b.name, b.default_size, b.min_size, b.feature_dim, b.preprocess, b.default_resize, b.description]
            for b in BACKBONES.values()]
    if as_json:
        render.print_json([dict(zip(["name", "input_size", "min_size", "feature_dim", "preprocess", "resize",
                                     "description"], row)) for row in rows])
        return
    render.table("backbones", ["name", "size", "min", "dim", "preprocess", "resize", "notes"], rows)


@cache_app.command("ls")
def cache_ls(cache_dir: Optional[Path] = CacheDir, as_json: bool = AsJson) -> None:
    """List the feature stores in the cache."""
    import time

    from featurepipe.cli import render
    from featurepipe.rundir.maintenance import list_cache
    from featurepipe.core.cachedirs import cache_root

    try:
        infos = list_cache(cache_root(cache_dir))
    except FeaturepipeError as error:
        _fail(error)
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


@cache_app.command("verify")
def cache_verify(repair: bool = typer.Option(False, "--repair", help="Delete damaged shards, rebuild wrong specs "
                                             "from their shards, forget remembered decode failures."),
                 cache_dir: Optional[Path] = CacheDir) -> None:
    """Check every shard of every store against its checksum."""
    from featurepipe.cli import render
    from featurepipe.rundir.maintenance import verify_cache
    from featurepipe.core.cachedirs import cache_root

    try:
        result = verify_cache(cache_root(cache_dir), repair=repair)
    except FeaturepipeError as error:
        _fail(error)
    for note in result.repaired:
        render.console.print(f"[yellow]rebuilt:[/] {note}", highlight=False)
    for directory, problems in result.problems.items():
        for problem in problems:
            render.console.print(f"[red]damaged:[/] {problem}", highlight=False)
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


@cache_app.command("gc")
def cache_gc(dry_run: bool = typer.Option(False, "--dry-run"), cache_dir: Optional[Path] = CacheDir) -> None:
    """Remove stores and rows that no dataset or run refers to any more."""
    from featurepipe.cli import render
    from featurepipe.rundir.maintenance import gc_cache
    from featurepipe.core.cachedirs import cache_root

    try:
        result = gc_cache(cache_root(cache_dir), dry_run=dry_run)
    except FeaturepipeError as error:
        _fail(error)
    verb = "would remove" if dry_run else "removed"
    render.stdout.print(f"{verb} {len(result.stores_removed)} store(s), {result.rows_removed} row(s), "
                        f"{result.refs_removed} stale dataset reference(s)", highlight=False)


@features_app.command("export")
def features_export(
    data: Path = typer.Argument(...), out: Path = typer.Option(..., "--out", help="feats.parquet | .npz | .csv"),
    backbone: str = Backbone, image_size: Optional[int] = ImageSize, layer: Optional[str] = Layer,
    pooling: str = Pooling, weights: str = Weights, resize: Optional[str] = Resize,
    cache_dir: Optional[Path] = CacheDir,
) -> None:
    """Export path, label, split and the cached features (extracting whatever is missing first)."""
    from featurepipe.cli import render
    from featurepipe.data.dataset import scan
    from featurepipe.extraction.extract import extract as run_extract, open_stores
    from featurepipe.extraction.features import export_dataset_features, export_format
    from featurepipe.cli.memory import return_large_blocks
    from featurepipe.core.cachedirs import cache_root

    try:
        export_format(out)
        spec = _spec(backbone, image_size, layer, pooling, weights, resize)
        root = cache_root(cache_dir)
        with render.progress_view() as progress:
            dataset = scan(data, cache_dir=root, progress=progress)
            run_extract(dataset, spec, root, progress=progress)
        # Streamed from the store to the file: memory stays flat however many images there are.
        return_large_blocks()
        written = export_dataset_features(dataset, open_stores(spec, root), out)
    except (FeaturepipeError, ValueError) as error:
        _fail(error)
    render.stdout.print(f"wrote {written.rows} rows x {written.feature_dim} features to {written.path}"
                        + (f" ({len(written.missing)} images without features)" if written.missing else ""),
                        highlight=False)


def main() -> None:  # pragma: no cover - console-script entry point alias
    # TF_CPP_MIN_LOG_LEVEL and the start-up line filter are set by the --verbose callback above.
    from featurepipe.core.errors import is_disk_full

    try:
        app()
    except OSError as error:
        # Whatever write ran out of space without its own message: say so plainly, no traceback.
        if not is_disk_full(error):
            raise
        from featurepipe.cli.render import console

        console.print(f"[bold red]error:[/] no space left on the device ({error}); free some space and run again: "
                      f"everything committed before this point is intact", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    main()
