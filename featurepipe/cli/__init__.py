"""The command line: a thin typer layer over the stages (one module per command group)."""

import time

# When the command line was first imported: the start of a run's printed total where the process
# table cannot be read (cli.render.process_seconds).
STARTED = time.time()

from featurepipe.cli.app import app, main  # noqa: E402  (STARTED first)

__all__ = ["app", "main"]
