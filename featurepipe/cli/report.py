"""`featurepipe report`: a run's self-contained HTML report and its charts."""

from __future__ import annotations

from pathlib import Path

import typer

from featurepipe.cli.common import Command, resolve_run
from featurepipe.cli.options import AsJson


def report(run_dir: Path = typer.Argument(..., help="A run directory written by `featurepipe evaluate`, or DATA for its latest run."),
           thumbnails: int = typer.Option(24, "--thumbnails", min=0, help="Misclassified images to show."),
           as_json: bool = AsJson) -> None:
    """Write RUN_DIR/report.html (self-contained) and the charts as PNGs in RUN_DIR/report/."""
    from featurepipe.cli import render
    from featurepipe.report.write import write_report
    from featurepipe.rundir.layout import REPORT_DIR

    with Command(as_json) as command, command.stage() as progress:
        run_dir = resolve_run(run_dir)   # DATA: its latest run
        result = write_report(run_dir, thumbnails=thumbnails, progress=progress)
    if as_json:
        render.print_json(result.to_dict())
        return
    render.stdout.print(f"wrote {result.html_path} ({len(result.png_paths)} charts in {run_dir / REPORT_DIR})",
                        highlight=False)
