"""How the Dask workers that `--workers N` starts on this machine begin: run by Dask as a worker
preload (`dask_setup`), in each worker process before its first task.

The workers belong to the command that started them. Ctrl-C at a terminal reaches the whole
foreground process group, the spawned workers included, and each died with a KeyboardInterrupt
traceback on the user's terminal while the command was shutting them down anyway. So a worker
leaves SIGINT to its driver (which cancels the batches not yet run, keeps the committed shards and
closes the cluster). And unless --verbose, a worker imports TensorFlow through the same start-up
line filter as the command itself (cli/quiet.py), so its oneDNN/absl lines do not leak either.
"""

from __future__ import annotations

import signal


def worker_preload() -> tuple[str, ...]:
    """The preload modules for a LocalCluster the CLI starts: this one, and the start-up line filter
    when this command hides TensorFlow's start-up lines (no --verbose)."""
    from featurepipe.cli.quiet import quiet_active

    return (__name__, "featurepipe.cli.quiet") if quiet_active() else (__name__,)


def dask_setup(worker) -> None:
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:       # not the worker process's main thread: leave the default
        pass
