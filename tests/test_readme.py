"""The README a newcomer reads (issue 23, point 10) stays true and in newcomer order.

- every `featurepipe COMMAND ... --option` that README.md, benchmarks/README.md and docs/*.md show
  exists in the CLI (read from the typer app, so a renamed option fails here, not on a reader);
- the two set-up commands are on the first screen and the data layout on the second, and the
  Makefile still does what the Quickstart says they do;
- measurement tables live in benchmarks/README.md, not in the README;
- relative links (and their #anchors) in README.md and docs/ resolve.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
import typer

from featurepipe.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Options the pages name that are not featurepipe options, each with why.
NOT_FEATUREPIPE = {
    "--logdir": "tensorboard's own option (tensorboard --logdir RUN_DIR/logs)",
    "--cv": "named by the README as not implemented",
}
FIRST_SCREEN = 30      # lines a terminal or a repository page shows before scrolling
SECOND_SCREEN = 70


def _commands() -> tuple[click.Group, dict[tuple[str, ...], click.Command]]:
    root = typer.main.get_command(app)
    found: dict[tuple[str, ...], click.Command] = {}

    def walk(command: click.Command, path: tuple[str, ...]) -> None:
        found[path] = command
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, path + (name,))

    walk(root, ())
    return root, found


def _options(command: click.Command) -> set[str]:
    names: set[str] = set()
    for param in command.params:
        names.update(param.opts)
        names.update(param.secondary_opts)
    return names | {"--help"}


def _command_lines(text: str) -> list[str]:
    """Each `featurepipe ...` invocation: a code-block line or an inline code span."""
    lines, in_code = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif in_code:
            if line.lstrip().startswith(("featurepipe ", "FEATUREPIPE_")) and "featurepipe " in line:
                lines.append(line[line.index("featurepipe "):].split("  #")[0])
        else:
            lines += re.findall(r"`((?:\.venv/bin/)?featurepipe [^`]*)`", line)
    return lines


def test_every_command_and_option_the_docs_show_exists():
    root, commands = _commands()
    problems = []
    for page in DOCS:
        for line in _command_lines(page.read_text()):
            words = line.split()[1:]
            glob = []
            while words and words[0].startswith("--"):
                glob.append(words.pop(0))
            problems += [f"{page.name}: global option {o} in `{line}`" for o in glob if o not in _options(root)]
            if not words or words[0].isupper() or not words[0].isidentifier():
                continue          # `featurepipe COMMAND`, `featurepipe --allow-outside-root COMMAND ...`
            path = (words[0],)
            if path not in commands:
                problems.append(f"{page.name}: no command {words[0]!r} in `{line}`")
                continue
            group = getattr(commands[path], "commands", None)
            if group:
                # `cache ls | verify [--repair] | gc [--dry-run]`: an option of any subcommand named
                named = [w for w in words[1:] if w in group]
                if not named:
                    problems.append(f"{page.name}: `{line}` names no subcommand of {words[0]}")
                    continue
                allowed = set().union(*(_options(group[n]) for n in named))
            else:
                allowed = _options(commands[path])
            for option in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", " ".join(words[1:])):
                if option not in allowed and option not in NOT_FEATUREPIPE:
                    problems.append(f"{page.name}: `featurepipe {' '.join(path)}` has no {option} (`{line}`)")
    assert problems == [], "\n".join(problems)


def test_every_option_the_docs_name_is_some_commands_option():
    _, commands = _commands()
    known = set().union(*(_options(c) for c in commands.values()))
    for page in DOCS:
        text = re.sub(r"pip install[^\n]*|python benchmarks/[^\n`]*|benchmarks/\w+\.(py|sh)[^\n`|]*", "",
                      page.read_text())
        if page.parent.name == "benchmarks":
            continue          # the scripts' own options are theirs
        unknown = sorted({o for o in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text)}
                         - known - set(NOT_FEATUREPIPE))
        assert unknown == [], f"{page.name} names options no featurepipe command has: {unknown}"


def test_quickstart_on_the_first_screen_and_the_data_layout_on_the_second():
    lines = README.read_text().splitlines()
    first = "\n".join(lines[:FIRST_SCREEN])
    assert "make demo" in first and "make test" in first, "the two set-up commands moved off the first screen"
    layout = next(i for i, line in enumerate(lines) if "DATA/<class>/<image>" in line)
    assert layout < SECOND_SCREEN, f"the data layout starts at line {layout + 1}"
    manifest = next(i for i, line in enumerate(lines) if "path,label[,split][,group]" in line)
    assert manifest < SECOND_SCREEN


def test_the_quickstart_says_what_the_makefile_does():
    makefile = (ROOT / "Makefile").read_text()
    readme = README.read_text()
    demo = re.search(r"^demo:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    test = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "featurepipe run data/demo" in demo and "`featurepipe run data/demo`" in readme
    assert "pytest" in test
    installs = re.search(r"pip install --quiet -e '(\.\[[^\]]+\])'", makefile).group(1)
    assert f"`{installs}`" in readme, f"the Quickstart should say both targets install {installs}"
    assert "make test" in (ROOT / ".ci" / "run").read_text() and "`.ci/run`" in readme


def test_measurement_tables_live_in_the_benchmarks_readme():
    rows = [line for line in README.read_text().splitlines() if line.startswith("|")]
    assert rows == [], "move tables to benchmarks/README.md and leave a one-line summary and a link"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target, anchor in re.findall(r"\]\(([^)#:\s]*)(?:#([^)\s]+))?\)", text):
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", path.read_text(), re.M)
            assert anchor in {_anchor(h) for h in headings}, f"{page.name}: no heading #{anchor} in {target}"
