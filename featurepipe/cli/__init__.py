"""The command line: a thin typer layer over the stages (one module per command group)."""

from featurepipe.cli import clock  # noqa: F401  (first: the clock starts with the command line)
from featurepipe.cli.app import app, main

__all__ = ["app", "main"]
