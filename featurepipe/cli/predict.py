"""`featurepipe predict` and `featurepipe export`: a run's model on new images, or as one network.

Both also report an OSError as one line (an unreadable input, a full or read-only --out): what they
read and write is the user's, not featurepipe's own files. predict exits 1 when no input could be
classified (every file failed), so a script notices; some failures among successes keep exit 0 and
their error rows."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from featurepipe.cli.common import EXIT_FAILURE, Command, parsing_options, resolve_run
from featurepipe.cli.options import AsJson, ModelChoice, RunCacheDir, Trust, top_alias, top_value

TopClasses = typer.Option(3, "--top", min=1, help="Top classes to list per image.")


def predict(
    run_dir: Path = typer.Argument(..., help="A run directory written by `featurepipe evaluate` or `featurepipe run`, or DATA (a dataset folder or manifest) for its latest run."),
    inputs: list[Path] = typer.Argument(..., help="Image files and/or folders (walked for images)."),
    top: int = TopClasses, top_k: Optional[int] = top_alias(1),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the predictions: .csv (one row per image) or .json."),
    model: str = ModelChoice,
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per model call (smaller if memory runs out)."),
    cache_dir: Optional[Path] = RunCacheDir, as_json: bool = AsJson, trust: bool = Trust,
) -> None:
    """Classify images with a run's model, preprocessed exactly as in training; bad files get an error row."""
    from featurepipe.cli import render
    from featurepipe.deploy.predict import predict as run_predict

    with Command(as_json, also=(OSError,)) as command:
        run_dir = resolve_run(run_dir, cache_dir)
        with command.stage() as progress:
            result = run_predict(run_dir, inputs, top_k=top_value(top, top_k), cache_dir=cache_dir, batch_size=batch_size,
                                 progress=progress, model=model, trust=trust)
        written = result.save(out) if out is not None else None
    nothing = len(result.frame) > 0 and result.failed == len(result.frame)
    if as_json:
        render.print_json(result.to_dict())
        if nothing:
            raise typer.Exit(code=EXIT_FAILURE)
        return
    for warning in result.warnings:
        render.flag("warning", warning)
    rows = []
    for record in result.records():
        if record["error"]:
            rows.append([record["path"], render.styled(("error", "red")), "", record["error"]])
        else:
            others = ", ".join(f"{record[f'label_{i}']} {record[f'prob_{i}']:.3f}" for i in range(2, result.top_k + 1))
            rows.append([record["path"], record["label"], f"{record['probability']:.3f}", others])
    render.table(f"predictions ({result.model_kind} model)", ["path", "label", "p", "next"], rows)
    render.stdout.print(
        f"{render.plural(len(result.frame), 'image')}: {result.reused} features from the cache, {result.computed} computed, "
        f"{result.failed} failed, {result.seconds:.1f} s" + (f"\nwrote {written}" if written else ""), highlight=False)
    if nothing:
        render.flag("error", f"none of the {len(result.frame)} input(s) could be classified (see the error column)",
                    style="bold red", soft_wrap=True)
        raise typer.Exit(code=EXIT_FAILURE)


def export(
    run_dir: Path = typer.Argument(..., help="A run directory written by `featurepipe evaluate` or `featurepipe run`, or DATA (a dataset folder or manifest) for its latest run."),
    fmt: str = typer.Option("keras", "--format", "-f", help="keras | savedmodel | tflite."),
    out: Path = typer.Option(..., "--out", help="Folder for the model, labels.txt and export.json."),
    model: str = ModelChoice, cache_dir: Optional[Path] = RunCacheDir, as_json: bool = AsJson,
    trust: bool = Trust,
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into an existing folder that is not an export."),
    check_images: int = typer.Option(64, "--check-images", min=0,
                                     help="Compare the written model with predict on this many of the run's "
                                          "training images (export.json's agreement); 0: skip."),
) -> None:
    """Export the run's model as one network: raw uint8 RGB images in, class probabilities out.

    Every format loads without featurepipe (built-in Keras layers only). keras and savedmodel take
    images of any size (resizing is inside); tflite takes (1, size, size, 3) images already resized
    by the preprocess.py written beside it (a vote: one such input per member size and policy).
    """
    from featurepipe.cli import render
    from featurepipe.deploy.export import check_export_folder, export as run_export

    with Command(as_json, also=(OSError,)):
        with parsing_options():   # --out: a folder of the user's is a bad option, refused before any work
            check_export_folder(out, overwrite)
    with Command(as_json, also=(OSError,)):
        run_dir = resolve_run(run_dir, cache_dir)
    with Command(as_json, also=(OSError,)) as command, command.stage() as progress:
        result = run_export(run_dir, fmt, out, cache_dir=cache_dir, model=model, progress=progress, trust=trust,
                            overwrite=overwrite, check_images=check_images)
    if as_json:
        render.print_json(result.to_dict())
        return
    shape = ", ".join("x".join("N" if d is None else str(d) for d in given["shape"])
                      for given in result.meta.get("inputs") or [{"shape": result.input_shape}])
    render.stdout.print(
        f"wrote {result.path} ({result.format}, {result.model_kind} model, {len(result.classes)} classes, "
        f"input uint8 {shape}) with {result.labels_path.name} and {result.meta_path.name} in {result.seconds:.1f} s",
        highlight=False)
    if result.format == "tflite":
        inputs = result.meta["inputs"]
        render.stdout.print(f"TFLite takes {len(inputs)} input(s), each one image already resized by preprocess.py "
                            f"({', '.join(i['name'] for i in inputs)}); keras and savedmodel resize inside",
                            highlight=False)
    measured = result.meta.get("agreement") or {}
    if measured.get("max_abs_diff") is not None:
        verdict = "within" if measured["within_tolerance"] else "OUTSIDE"
        render.stdout.print(f"vs predict on {measured['images']} training images: max |difference in probability| "
                            f"{measured['max_abs_diff']:.2g}, {verdict} the tolerance {measured['tolerance']:g}",
                            highlight=False)
    elif measured:
        render.stdout.print(f"agreement with predict {measured.get('note', 'not measured')}", highlight=False)
