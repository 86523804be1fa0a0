"""The `featurepipe` command: a thin typer layer that parses options, calls a stage, prints a summary.

This module holds the typer app, its global options and main(); each command group lives in its own
module (cli/extract.py, cli/evaluate.py, ...) and is registered here, in the order `--help` lists them.
"""

from __future__ import annotations

import typer

from featurepipe.cli import backbones, cache, evaluate, extract, features, finetune, inspect, predict, report, run

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Frozen ImageNet bases, cached features, cross-validated heads and fine-tuning for small image sets.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and maintain the feature cache.")
features_app = typer.Typer(no_args_is_help=True, help="Cached features as tables for other tools.")
app.add_typer(cache_app, name="cache")
app.add_typer(features_app, name="features")


@app.callback()
def _global_options(
    ctx: typer.Context,
    verbose: bool = typer.Option(False, "--verbose", help="Show TensorFlow's start-up and native log lines "
                                                        "(hidden by default)."),
    allow_outside_root: bool = typer.Option(
        False, "--allow-outside-root", help="Let a CSV manifest name files outside its own folder (absolute "
        "paths or ../); refused by default so a manifest cannot make featurepipe read arbitrary files."),
) -> None:
    """Frozen ImageNet bases, cached features, cross-validated heads and fine-tuning for small image sets."""
    from featurepipe.cli.memory import lean_arrow_allocator

    lean_arrow_allocator()   # before anything imports pandas: flat memory
    from featurepipe.data.dataset import outside_root_allowed

    if not verbose:
        from featurepipe.cli.quiet import quiet_tensorflow_startup

        quiet_tensorflow_startup()
    if allow_outside_root:
        scope = outside_root_allowed(True)
        scope.__enter__()
        ctx.call_on_close(lambda: scope.__exit__(None, None, None))


app.command()(extract.extract)
app.command()(evaluate.evaluate)
app.command()(report.report)
app.command()(finetune.finetune)
app.command()(finetune.baseline)
app.command()(predict.predict)
app.command()(predict.export)
app.command("run")(run.run_all)
app.command()(inspect.inspect)
app.command()(backbones.backbones)
cache_app.command("ls")(cache.cache_ls)
cache_app.command("verify")(cache.cache_verify)
cache_app.command("gc")(cache.cache_gc)
features_app.command("export")(features.features_export)


def main() -> None:  # pragma: no cover - console-script entry point alias
    # TF_CPP_MIN_LOG_LEVEL and the start-up line filter are set by the --verbose callback above.
    from featurepipe.core.errors import is_disk_full

    try:
        app()
    except OSError as error:
        # Whatever write ran out of space without its own message: say so plainly, no traceback.
        if not is_disk_full(error):
            raise
        from featurepipe.cli.render import flag

        flag("error", f"no space left on the device ({error}); free some space and run again: everything "
                      f"committed before this point is intact", style="bold red", soft_wrap=True)
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    main()
