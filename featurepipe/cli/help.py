"""How `--help` reads: the usual command-line conventions, in one place.

- `-h` works wherever `--help` does (click inherits the help option names from the parent context);
- `featurepipe --version` prints the installed version;
- usage lines name arguments in capitals, `featurepipe evaluate [OPTIONS] DATA` (typer 0.2x writes
  `{data}`, a notation no other tool uses);
- an option that takes a value shows a metavar (`--folds FOLDS`, `--lock-timeout SECONDS`) rather
  than typer's `<int range>` / `<str>` type tags; flags show none.

Importing this module imports typer only (which carries its own copy of click): `--help` must stay quick (no pandas, no TensorFlow).
"""

from __future__ import annotations

from typing import Optional

import typer
from typer.core import TyperCommand

# Inherited by every subcommand's context.
CONTEXT = {"help_option_names": ["-h", "--help"]}


def version_callback(value: Optional[bool]) -> None:
    if value:
        from featurepipe import __version__

        typer.echo(f"featurepipe {__version__}")
        raise typer.Exit()


def metavar_of(param) -> str:
    """An argument's or option's name in capitals (`run_dir` -> `RUN_DIR`), the usual metavar."""
    return (param.name or "value").upper()


class HelpCommand(TyperCommand):
    """A typer command whose help and usage follow the conventions in the module docstring."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            flag = getattr(param, "is_flag", False) or getattr(param, "count", False)
            if param.metavar is None and not flag:
                param.metavar = metavar_of(param)
            if param.param_type_name == "argument":
                # typer lists an argument as `DATA <path>`: the name is enough.
                param.display_type_rich = lambda ctx: None

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar or metavar_of(param)
                name = name if param.required else f"[{name}]"
                pieces.append(name + ("..." if param.nargs != 1 else ""))
        return pieces
