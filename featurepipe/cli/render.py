"""Terminal rendering for the CLI: a rich progress bar on a TTY, nothing under CI or in a pipe."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from typing import Iterator, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from featurepipe.core.progress import ProgressCallback, ProgressEvent
from featurepipe.core.strictjson import json_ready

# In a pipe or under CI rich would wrap at 80 columns; tables and paths read better unwrapped.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
stdout = Console(width=None if sys.stdout.isatty() else 160)


def interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


@contextmanager
def progress_view(enabled: Optional[bool] = None) -> Iterator[Optional[ProgressCallback]]:
    if not (interactive() if enabled is None else enabled):
        yield None
        return
    columns = [TextColumn("[bold]{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), TextColumn("{task.fields[note]}")]
    with Progress(*columns, console=console, transient=False) as bar:
        tasks: dict[str, int] = {}

        def on_event(event: ProgressEvent) -> None:
            if event.stage not in tasks:
                tasks[event.stage] = bar.add_task(event.stage, total=event.total or None, rate="", note="")
            task_id = tasks[event.stage]
            elapsed = bar.tasks[task_id].elapsed or 0.0
            rate = f"{event.done / elapsed:6.1f}/s" if elapsed > 0 and event.done else ""
            bar.update(task_id, completed=event.done, total=event.total or None, rate=rate, note=event.message[:40])

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
    view = Table(title=title, title_justify="left")
    for column in columns:
        view.add_column(column)
    for row in rows:
        view.add_row(*[str(cell) for cell in row])
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
    stdout.print(f"[bold]nested CV accuracy {acc['mean']:.3f}[/]{interval}: the whole search scored on folds it never "
                 f"saw; best leaderboard row {nested['best_inner_accuracy']:.3f}, optimism gap "
                 f"{nested['optimism_gap']:+.3f}", highlight=False)


def print_leaderboard(leaderboard, limit: int = 20) -> None:
    rows = []
    with_features = "features" in leaderboard.columns and leaderboard["features"].nunique() > 1
    for record in leaderboard.head(limit).to_dict("records"):
        params = params_text(record["params"])
        head = f"{record['features']} {record['head']}" if with_features else record["head"]
        rows.append([record.get("rank", ""), head, params, record["augment"],
                     f"{record['accuracy_mean']:.3f} ± {record['accuracy_std']:.3f}",
                     f"[{record['accuracy_ci_low']:.3f}, {record['accuracy_ci_high']:.3f}]",
                     f"{record['f1_macro_mean']:.3f}", f"{record['log_loss_mean']:.3f}"])
    table("leaderboard (k-fold CV on train)", ["#", "head", "params", "views", "accuracy", "95% CI", "macro F1",
                                               "log loss"], rows)
