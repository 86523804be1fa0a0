"""`featurepipe inspect`: know your data (near-duplicates, label issues, outliers, balance, learning
curve, embedding map) from cached features."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from featurepipe.cli.common import Command, scan_dataset, spec as make_spec
from featurepipe.cli.options import (
    number_in, top_alias, top_value, AsJson, Backbone, CacheDir, Exclude, Groups, GroupsFrom, ImageSize, Jobs, Layer,
    Pooling, Relabel, Resize, Seed, Weights,
)


def inspect(
    data: Path = typer.Argument(..., help="DATA/<class>/*, DATA/<split>/<class>/* or a CSV manifest."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Take label-issue probabilities from this run's "
                                           "oof_predictions.csv (its best head) instead of a fixed logreg head."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for inspect.json, the CSVs and inspect.html "
                                       "(default: RUN_DIR/inspect with --run-dir, else CACHE/inspections/<time>-<name>)."),
    top: int = typer.Option(15, "--top", min=0, help="Suspects to print."), top_k: Optional[int] = top_alias(0),
    folds: Optional[int] = typer.Option(None, "--folds", min=2, help="Cross-validation folds of the label-issue "
                                        "probabilities and the learning curve (default: the run's with --run-dir, "
                                        "else as `evaluate` chooses: 5, or as many as the smallest class has images "
                                        "when that is 2-4)."),
    seed: int = Seed,
    dedup_cosine: float = typer.Option(None, "--dedup-cosine", callback=number_in(-1, 1), help="Feature cosine at or above which two images are copies."),
    dedup_hamming: int = typer.Option(None, "--dedup-hamming", min=0, max=64, help="Perceptual-hash bits at or below which two images are copies."),
    groups_from: Optional[Path] = GroupsFrom,
    groups: Optional[str] = Groups,
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
    from featurepipe.rundir.layout import INSPECT_DIR

    with Command(as_json) as command:
        spec = make_spec(backbone, image_size, layer, pooling, weights, resize)
        root = cache_root(cache_dir)
        with command.stage() as progress:
            dataset = scan_dataset(data, root, groups, groups_from, exclude, relabel, progress)
            folds, fewer = inspect_folds(dataset, run_dir) if folds is None else (folds, None)
            result = inspect_dataset(
                dataset, spec, root, out_dir=out if out is not None else (run_dir / INSPECT_DIR if run_dir else None),
                oof_source=oof_from_run(run_dir) if run_dir is not None else None, folds=folds, seed=seed,
                cosine_threshold=DEFAULT_COSINE if dedup_cosine is None else dedup_cosine,
                hamming_threshold=DEFAULT_HAMMING if dedup_hamming is None else dedup_hamming,
                n_jobs=jobs, progress=progress)
            html = write_inspect_report(result.out_dir, progress=progress)
    if as_json:
        render.print_json({**result.to_dict(), "folds": folds, "html": str(html)})
        return
    if fewer:
        render.flag("note", fewer)
    _print_inspect(render, result, top_value(top, top_k), html)


def inspect_folds(dataset, run_dir: Optional[Path]) -> tuple[int, Optional[str]]:
    """--folds left out: the run's fold count with --run-dir (its out-of-fold predictions used it),
    else evaluate's own default (evaluation.folds.auto_folds on the training images: 5, or fewer for
    a small class), so that `inspect` and `evaluate` on the same images cut the same number of folds.
    Returns (folds, the note saying why fewer than 5, or None)."""
    import json

    import numpy as np

    from featurepipe.evaluation.folds import auto_folds
    from featurepipe.rundir.layout import CONFIG

    if run_dir is not None:
        try:
            recorded = json.loads((Path(run_dir) / CONFIG).read_text()).get("folds")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if isinstance(recorded, int) and recorded >= 2:
            return recorded, None
    train = dataset.frame[dataset.frame["split"] == "train"]
    classes = list(dataset.classes)
    y = train["label"].map({label: i for i, label in enumerate(classes)}).to_numpy()
    groups = train["group"] if "group" in train.columns and train["group"].notna().any() else None
    return auto_folds(y, None if groups is None else np.asarray(groups.astype(str)), classes)


def _print_inspect(render, result, top: int, html: Path) -> None:
    from featurepipe.rundir.layout import SUSPECTS

    s = result.summary
    for failure in result.failed:
        render.stdout.print(f"  in no analysis: {failure['path']}: {failure['reason']}", highlight=False)
    d = s.get("duplicates", {})
    leak = (f"; without groups {d['leaked_folds']} of {d['folds']} folds would leak" if d.get("folds") else "")
    render.stdout.print(f"near-duplicates: {d.get('pairs', 0)} pair(s) in {d.get('clusters', 0)} group(s), "
                        f"{d.get('cross_class_pairs', 0)} across classes{leak}", highlight=False)
    balance = s.get("balance", {})
    render.say("classes: " + ", ".join(f"{c} {n}" for c, n in balance.get("counts", {}).items()),
               (f" (imbalanced, {balance['ratio']:.1f}x)", "yellow") if balance.get("imbalanced") else "")
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
                        f"suspects: {result.out_dir / SUSPECTS}\nreport: {html}", highlight=False)
