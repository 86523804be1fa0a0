"""When the command line started: the origin of a run's printed total where the process table cannot
be read (cli.render.process_seconds). featurepipe/cli/__init__.py imports this module first."""

import time

STARTED = time.time()
