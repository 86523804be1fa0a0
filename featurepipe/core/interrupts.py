"""Holding Ctrl-C for the few seconds in which several files that belong together are written.

Each of a run's files is written whole (core.atomic), but a run directory is several files: the
leaderboard, the refit head, nested.json, config.json. When `run` rewrites them for a further stage
of its search, a Ctrl-C between two of them would leave one stage's leaderboard beside another's
head. Inside `held_interrupt()` a first Ctrl-C is remembered and raised when the block ends; a second
one stops at once, as the user asked twice. Only the main thread receives signals, so elsewhere (a
notebook's worker thread) the block runs unguarded.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def held_interrupt() -> Iterator[None]:
    """Run the block with SIGINT held: raised as KeyboardInterrupt after it (a second one: at once)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed: list[int] = []

    def hold(signum, frame) -> None:
        if pressed:
            raise KeyboardInterrupt
        pressed.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt
