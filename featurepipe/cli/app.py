"""The `featurepipe` command: a thin typer layer that parses options, calls a stage, prints a summary.

This module holds the typer app, its global options and main(); each command group lives in its own
module (cli/extract.py, cli/evaluate.py, ...) and is registered here, in the order `--help` lists them.

Help follows the usual command-line conventions (cli/help.py): `-h` as well as `--help`, `--version`,
usage lines that name arguments in capitals (`DATA`), options shown with a metavar instead of a type
tag, and help text printed as written (plain formatting: a `[values]` in a help text is not rich
markup). Nothing heavy is imported before a command runs: `featurepipe evaluate --help` stays quick.
"""

from __future__ import annotations

import typer

from typing import Optional

from featurepipe.cli import backbones, cache, evaluate, extract, features, finetune, inspect, predict, report, run, serve
from featurepipe.cli.help import CONTEXT, HelpCommand, version_callback

# rich_markup_mode=None: click's plain help, whose text is never read as markup (see the docstring).
_TYPER = dict(no_args_is_help=True, rich_markup_mode=None, context_settings=CONTEXT)
app = typer.Typer(add_completion=False, **_TYPER,
                  help="Frozen ImageNet bases, cached features, cross-validated heads and fine-tuning for small image sets.")
cache_app = typer.Typer(**_TYPER, help="Inspect and maintain the feature cache.")
features_app = typer.Typer(**_TYPER, help="Cached features as tables for other tools.")
app.add_typer(cache_app, name="cache")
app.add_typer(features_app, name="features")


@app.callback()
def _global_options(
    ctx: typer.Context,
    version: Optional[bool] = typer.Option(None, "--version", callback=version_callback, is_eager=True,
                                           help="Print featurepipe's version and exit."),
    verbose: bool = typer.Option(False, "--verbose", help="Show TensorFlow's start-up and native log lines "
                                                        "(hidden by default)."),
    allow_outside_root: bool = typer.Option(
        False, "--allow-outside-root", help="Let a CSV manifest name files outside its own folder (absolute "
        "paths or ../); refused by default so a manifest cannot make featurepipe read arbitrary files."),
) -> None:
    """Frozen ImageNet bases, cached features, cross-validated heads and fine-tuning for small image sets."""
    from featurepipe.cli.memory import lean_arrow_allocator

    lean_arrow_allocator()   # before anything imports pandas: flat memory
    if not verbose:
        from featurepipe.cli.quiet import quiet_tensorflow_startup

        quiet_tensorflow_startup()
    if allow_outside_root:
        # Imported only when asked: data.dataset imports pandas, and this callback also runs before
        # a subcommand's --help.
        from featurepipe.data.dataset import outside_root_allowed

        scope = outside_root_allowed(True)
        scope.__enter__()
        ctx.call_on_close(lambda: scope.__exit__(None, None, None))


app.command(cls=HelpCommand)(extract.extract)
app.command(cls=HelpCommand)(evaluate.evaluate)
app.command(cls=HelpCommand)(report.report)
app.command(cls=HelpCommand)(finetune.finetune)
app.command(cls=HelpCommand)(finetune.baseline)
app.command(cls=HelpCommand)(predict.predict)
app.command(cls=HelpCommand)(predict.export)
app.command(cls=HelpCommand)(serve.serve)
app.command("run", cls=HelpCommand)(run.run_all)
app.command(cls=HelpCommand)(inspect.inspect)
app.command(cls=HelpCommand)(backbones.backbones)
cache_app.command("ls", cls=HelpCommand)(cache.cache_ls)
cache_app.command("verify", cls=HelpCommand)(cache.cache_verify)
cache_app.command("gc", cls=HelpCommand)(cache.cache_gc)
features_app.command("export", cls=HelpCommand)(features.features_export)


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
        raise SystemExit(1) from None   # a runtime failure, not a usage error (cli/common.py's exit codes)


if __name__ == "__main__":  # pragma: no cover
    main()
