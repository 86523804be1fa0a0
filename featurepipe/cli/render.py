"""Terminal rendering for the CLI: a rich progress bar on a TTY, nothing under CI or in a pipe.

Everything printed here carries the user's text (paths, class names, reasons, messages), and rich
would read `[...]` in it as console markup and `:name:` as an emoji code: a class folder `blue[`
holding `x].png` made the "failed:" line raise MarkupError after the work was done. So neither
console ever interprets a string: both are built with markup, emoji and highlighting off, and
featurepipe's own colours are explicit style spans (`say`/`tell` take `(text, style)` pairs; a table
cell may be a rich Text). Plain strings, whatever they hold, print exactly as they are.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from typing import Iterator, Optional, Union

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from featurepipe.core.progress import NOTICE, ProgressCallback, ProgressEvent
from featurepipe.core.strictjson import json_ready

# In a pipe or under CI rich would wrap at 80 columns; tables and paths read better unwrapped.
# Never markup, emoji codes or highlighting: user text must print verbatim (see the module docstring).
_LITERAL = dict(markup=False, emoji=False, highlight=False)
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160, **_LITERAL)
stdout = Console(width=None if sys.stdout.isatty() else 160, **_LITERAL)

# A piece of a printed line: plain text (printed as is), a (text, style) pair, or a rich Text.
Part = Union[str, tuple[str, str], Text]


def styled(*parts: Part) -> Text:
    """One line from parts; only the styles given as pairs colour it, nothing inside a text does."""
    return Text.assemble(*parts)


def say(*parts: Part, **options) -> None:
    """A line of the command's result, on stdout."""
    stdout.print(styled(*parts), **options)


def tell(*parts: Part, **options) -> None:
    """A line about the run (warnings, notes, errors), on stderr."""
    console.print(styled(*parts), **options)


def flag(label: str, message: str, style: str = "yellow", **options) -> None:
    """`label: message` on stderr, the label coloured (warning:, note:, skipped:, damaged:...)."""
    tell((f"{label}:", style), " ", str(message), **options)


def plural(count: int, word: str, many: Optional[str] = None) -> str:
    """`1 image`, `2 images`, `0 images` (`many` where adding an s is wrong)."""
    return f"{count} {word if count == 1 else (many or word + 's')}"


def process_seconds() -> float:
    """Wall time since this process started (interpreter and imports included), as the user timed it:
    what a run's printed total means. The stages' own times leave out start-up."""
    import time

    try:
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:   # no psutil, or no process table: from when featurepipe.cli was imported
        from featurepipe.cli.clock import STARTED

        return max(0.0, time.time() - STARTED)


def interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


@contextmanager
def progress_view(enabled: Optional[bool] = None) -> Iterator[Optional[ProgressCallback]]:
    if not (interactive() if enabled is None else enabled):
        # No bar, but a notice (core.progress.NOTICE: e.g. the expected time of a fine-tuning) is
        # still said on stderr, before the work it announces.
        def notices_only(event: ProgressEvent) -> None:
            if event.stage == NOTICE:
                flag("note", event.message)

        yield notices_only
        return
    # markup=False: a stage's note may name a user's file.
    columns = [TextColumn("{task.description:<9}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}", markup=False), TimeRemainingColumn(),
               TextColumn("{task.fields[note]}", markup=False)]
    with Progress(*columns, console=console, transient=False) as bar:
        tasks: dict[str, int] = {}

        def on_event(event: ProgressEvent) -> None:
            if event.stage == NOTICE:   # printed above the bars, in full
                bar.console.print(Text.assemble(("note:", "yellow"), " ", event.message))
                return
            if event.stage not in tasks:
                tasks[event.stage] = bar.add_task(event.stage, total=event.total or None, rate="", note="")
            task_id = tasks[event.stage]
            elapsed = bar.tasks[task_id].elapsed or 0.0
            rate = f"{event.done / elapsed:6.1f}/s" if elapsed > 0 and event.done else ""
            # 48: room for predict's "building efficientnet_lite1 (2 of 3 networks)".
            bar.update(task_id, completed=event.done, total=event.total or None, rate=rate, note=event.message[:48])

        yield on_event


@contextmanager
def json_safe_stdout(as_json: bool) -> Iterator[None]:
    """Under --json, anything a library prints (Keras's download bar) goes to stderr, not into the JSON."""
    if not as_json:
        yield
        return
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):
        yield


def print_json(data) -> None:
    """The one place --json output is written: strict JSON (allow_nan=False), NaN printed as null."""
    sys.stdout.write(json.dumps(json_ready(data), indent=2, default=str, allow_nan=False) + "\n")


def table(title: str, columns: list[str], rows: list[list]) -> None:
    """Cells print as they are (a rich Text keeps its style); no cell or title is read as markup, and
    none is cut short: a path longer than its column folds onto the next line instead of ending in "…"."""
    view = Table(title=Text(title), title_justify="left")
    for column in columns:
        view.add_column(Text(column), overflow="fold")
    for row in rows:
        view.add_row(*[cell if isinstance(cell, Text) else Text(str(cell)) for cell in row])
    stdout.print(view)


def params_text(params: str) -> str:
    """key=value pairs; an ensemble lists its members as head(key=value)."""
    parsed = json.loads(params)
    if "members" in parsed and all("features" in m for m in parsed["members"]):
        # A vote across feature sets: one head per set; members sharing a head and params are grouped.
        groups: dict[str, int] = {}
        for m in parsed["members"]:
            key = f"{m['head']}(" + ", ".join(f"{k}={v}" for k, v in (m.get("params") or {}).items()) + ")"
            groups[key] = groups.get(key, 0) + 1
        return "one per feature set: " + ", ".join(f"{key} x{n}" if n > 1 else key for key, n in groups.items())
    if "members" in parsed:
        return " + ".join(f"{m['head']}(" + ", ".join(f"{k}={v}" for k, v in (m.get("params") or {}).items()) + ")"
                          for m in parsed["members"])
    return ", ".join(f"{k}={v}" for k, v in parsed.items())


def print_nested(nested: dict) -> None:
    """The headline: nested-CV accuracy of the whole search, and how optimistic the best row is."""
    acc = nested["accuracy"]
    interval = "" if acc.get("ci_low") is None else f" (95% CI {acc['ci_low']:.3f}-{acc['ci_high']:.3f})"
    say((f"nested CV accuracy {acc['mean']:.3f}", "bold"),
        f"{interval}: the whole search scored on folds it never saw; best leaderboard row "
        f"{nested['best_inner_accuracy']:.3f}, optimism gap {nested['optimism_gap']:+.3f}")


def print_leaderboard(leaderboard, limit: int = 20) -> None:
    rows = []
    with_features = "features" in leaderboard.columns and leaderboard["features"].nunique() > 1
    for record in leaderboard.head(limit).to_dict("records"):
        params = params_text(record["params"])
        head = f"{record['features']} {record['head']}" if with_features else record["head"]
        # "views" is the CLI's word (--augment K caches K augmented views); files keep the key `augment`.
        rows.append([record.get("rank", ""), head, params, "yes" if record["augment"] == "views" else "no",
                     f"{record['accuracy_mean']:.3f} ± {record['accuracy_std']:.3f}",
                     f"[{record['accuracy_ci_low']:.3f}, {record['accuracy_ci_high']:.3f}]",
                     f"{record['f1_macro_mean']:.3f}", f"{record['log_loss_mean']:.3f}"])
    table("leaderboard (k-fold CV on train)", ["#", "head", "params", "views", "accuracy", "95% CI", "macro F1",
                                               "log loss"], rows)
