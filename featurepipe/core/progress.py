"""Progress reporting: library code calls a callback; only the CLI renders it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class ProgressEvent:
    stage: str          # "scan", "extract", "evaluate", ...
    done: int           # units finished so far in this stage
    total: int          # units expected in this stage (0 when unknown)
    message: str = ""   # short human-readable note, e.g. the file just skipped


# The stage of an event that is a message to show once, in full (e.g. a fine-tuning's expected time
# before it starts), not a bar's progress: the CLI prints it.
NOTICE = "notice"

ProgressCallback = Callable[[ProgressEvent], None]


def report(callback: Optional[ProgressCallback], stage: str, done: int, total: int, message: str = "") -> None:
    if callback is not None:
        callback(ProgressEvent(stage, done, total, message))
