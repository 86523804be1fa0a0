"""What every command shares: the one wrapper that turns a FeaturepipeError into a one-line message
(anything else is a bug and keeps its traceback), shows progress unless --json, keeps stdout clean
for JSON and opens the executor; plus the small parsers several commands use.

Exit codes, as most command-line tools use them: 0 done, 1 a runtime or data failure (a missing or
damaged file, a refused dataset, a full disk, an untrusted run), 2 a usage error (a bad option or a
bad combination of options: click's own, and every core.errors.UsageError), 130 interrupted. Scripts
can tell "fix the command line" from "fix the data or the machine".

Heavy imports stay inside the functions: `featurepipe --help` must not import TensorFlow or pandas.
"""

from __future__ import annotations

import json
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer

from featurepipe.core.errors import FeaturepipeError, UsageError

# The exit codes (see the module docstring).
EXIT_FAILURE = 1
EXIT_USAGE = 2


def exit_code(error: BaseException) -> int:
    """2 for a usage error (the command line must change), 1 for everything else."""
    return EXIT_USAGE if isinstance(error, UsageError) else EXIT_FAILURE


def fail(error: BaseException) -> None:
    from featurepipe.cli.render import flag

    # soft_wrap: one line, however narrow the terminal (rich wraps at 80 columns in a pipe)
    flag("error", str(error), style="bold red", soft_wrap=True)
    raise typer.Exit(code=exit_code(error))


@contextmanager
def parsing_options() -> Iterator[None]:
    """Around code that only turns option values into objects (a BackboneSpec, the feature sets to
    search, the --run-dir check): whatever it refuses is a bad option, a usage error, whichever
    FeaturepipeError subclass the library chose (an unknown backbone is a BackboneError)."""
    from featurepipe.core.errors import DiskFullError, NotWritableError

    try:
        yield
    except (UsageError, DiskFullError, NotWritableError):
        raise   # a full disk or a read-only folder is the machine's state, not the command line's
    except FeaturepipeError as error:
        raise UsageError(str(error)) from error


class Command:
    """One command's run, as `with Command(as_json) as command:` around its work.

    A FeaturepipeError (and the exception types in `also`) raised inside becomes `error: MESSAGE` on
    stderr and exit code 2 (a UsageError) or 1 (anything else); with `interrupted` (the hint to print), Ctrl-C becomes that hint and exit
    code 130. `command.stage()` is the part that reports progress: the progress bar (never under
    --json), library prints sent to stderr under --json, and with `distributed` the executor chosen
    by --scheduler / --workers / $FEATUREPIPE_SCHEDULER."""

    def __init__(self, as_json: bool = False, *, distributed: bool = False, scheduler: Optional[str] = None,
                 workers: Optional[int] = None, also: tuple[type[BaseException], ...] = (),
                 interrupted: Optional[str] = None):
        self.as_json = as_json
        self.distributed = distributed
        self.scheduler = scheduler
        self.workers = workers
        self.caught = (FeaturepipeError, *also)
        self.interrupted = interrupted

    def __enter__(self) -> "Command":
        if self.scheduler and self.workers:
            # Checked here, before any work, so that it is the usage error it is (the executor says
            # the same, later, as a runtime failure).
            fail(UsageError("--scheduler and --workers exclude each other: --scheduler uses an existing "
                            "cluster, --workers starts one on this machine"))
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if kind is KeyboardInterrupt and self.interrupted is not None:
            from featurepipe.cli.render import flag

            flag("interrupted", self.interrupted)
            raise typer.Exit(code=130)
        if error is not None and isinstance(error, self.caught):
            fail(error)
        return False

    @contextmanager
    def stage(self) -> Iterator:
        """Yields the progress callback; with no bar (under --json, in a pipe, under CI) it only prints
        notices (core.progress.NOTICE) on stderr."""
        from featurepipe.cli import render

        with ExitStack() as stack:
            callback = stack.enter_context(render.progress_view(False if self.as_json else None))
            stack.enter_context(render.json_safe_stdout(self.as_json))
            if self.distributed:
                from featurepipe.cli.worker_start import worker_preload
                from featurepipe.extraction.executors.choose import executor_scope

                stack.enter_context(executor_scope(self.scheduler, self.workers, preload=worker_preload()))
            yield callback


def check_run_dir(run_dir: Optional[Path], overwrite: bool) -> None:
    """--run-dir: refuse a folder of the user's that is not a run before any work starts."""
    if run_dir is not None:
        from featurepipe.rundir.folder import prepare_run_dir

        with parsing_options():
            prepare_run_dir(run_dir, overwrite)


def head_names(heads: str) -> tuple[str, ...]:
    return tuple(h.strip() for h in heads.split(",") if h.strip())


def spec(backbone, image_size, layer, pooling, weights, resize, seed=0):
    from featurepipe.backbones.spec import BackboneSpec

    with parsing_options():
        return BackboneSpec(name=backbone, weights=weights, layer=layer, pooling=pooling, image_size=image_size,
                            resize=resize, seed=seed).resolved()


def best_text(best: dict) -> str:
    """The chosen configuration in one line; "trained with the augmented views" only when it was (the
    files' `augment: none` is no news to a reader, and "views" is the CLI's word for them)."""
    from featurepipe.cli.render import params_text

    where = f"{best['features']} " if best.get("features") else ""
    views = " (trained with the augmented views)" if best.get("augment") == "views" else ""
    return f"{where}{best['head']} {params_text(json.dumps(best['params']))}{views}"


def warmup_note(config) -> Optional[str]:
    """A fine-tuning whose every epoch is warm-up never reaches its peak rate nor decays: say so."""
    if config is None or config.schedule != "cosine" or config.strategy == "head" or config.warmup_epochs < config.epochs:
        return None
    from featurepipe.cli.render import plural

    whole = "this 1-epoch fine-tuning is" if config.epochs == 1 else f"all {plural(config.epochs, 'epoch')} of this fine-tuning are"
    return (f"{whole} warm-up (--warmup-epochs {config.warmup_epochs}): the learning rate climbs from a tenth of "
            f"its peak for the whole fit and never decays; pass --epochs above --warmup-epochs (or --warmup-epochs 0) "
            f"for the full schedule")


def scan_dataset(data, root, groups, groups_from, exclude, relabel, progress):
    """scan, then --groups-from, then --exclude / --relabel, in that order."""
    from featurepipe.data.dataset import load_groups, scan
    from featurepipe.data.edits import apply_fixes

    dataset = scan(data, cache_dir=root, groups_pattern=groups, progress=progress)
    if groups_from is not None:
        dataset = load_groups(dataset, groups_from)
    return apply_fixes(dataset, exclude, relabel)


def dataset_summary(dataset) -> dict:
    return {"source": str(dataset.source), "layout": dataset.layout, "images": len(dataset),
            "classes": dataset.class_counts(), "splits": dataset.splits, "ignored_files": dataset.ignored,
            "unreadable": [{"path": p, "reason": r} for p, r in dataset.unreadable],
            "warnings": dataset.warnings}


def resolve_run(run_dir: Path, cache_dir: Optional[Path] = None) -> Path:
    """RUN of predict / export / report: a run directory, or DATA (a dataset folder or manifest) for
    its latest run in the cache (--cache-dir, $FEATUREPIPE_CACHE or ./cache). Says on stderr which
    run DATA meant, and which cache a moved run uses (rundir.folder.run_cache_root); refuses DATA
    without a run, listing the runs there are (exit 1)."""
    import json

    from featurepipe.cli.render import flag
    from featurepipe.core.cachedirs import cache_root
    from featurepipe.rundir.folder import resolve_run_arg, run_cache_root
    from featurepipe.rundir.layout import CONFIG

    path = Path(run_dir).expanduser()
    if path.exists() and not (path / CONFIG).exists():   # not a run: maybe DATA (cache_root creates ./cache)
        path, note = resolve_run_arg(path, cache_root(cache_dir))
        if note:
            flag("note", note)
    try:
        recorded = json.loads((path / CONFIG).read_text()).get("cache_dir")
    except (OSError, ValueError, AttributeError):
        return path   # Run.open says what is wrong
    used, note = run_cache_root(path, recorded, cache_dir)
    if note:   # a note when the run's own cache is used, a warning when it may be the wrong one
        flag("note" if used != recorded else "warning", note)
    return path


def winner_text(result) -> str:
    """Which model won on the held-out images (or, with --finetune-folds, on every training image over
    the folds), by how much, with the paired interval (compare's)."""
    from featurepipe.cli.render import plural

    decision, student = result.decision or {}, result.student or {}
    rival = "the vote" if len(student.get("teacher") or []) > 1 else "the frozen head"
    low, high = decision.get("accuracy_change_interval") or [float("nan"), float("nan")]
    what = (f"student ({student.get('backbone')}, distilled with alpha {student.get('distill_alpha'):g})"
            if student.get("distill_alpha") else "fine-tuned model")
    winner = what.split(" (")[0] if result.kept == "finetuned" else rival
    # --finetune-folds: the decision is the pooled one, over every training image scored once.
    folds = getattr(result, "folds", None)
    after, before = ((folds["student"], folds["frozen"]) if folds else (result.after, result.before))
    where = (f"{plural(folds['images'], 'training image')} over {folds['folds']} folds" if folds else
             plural(result.val_images, 'held-out image'))
    return (f"{what} {after['val_accuracy']:.3f} vs {rival} {before['val_accuracy']:.3f} on the same "
            f"{where}: {100 * decision.get('accuracy_change', 0.0):+.1f} "
            f"points (95% paired interval {100 * low:+.1f} to {100 * high:+.1f}; {decision.get('gained', 0)} gained, "
            f"{decision.get('lost', 0)} lost); the run's model is {winner}")

