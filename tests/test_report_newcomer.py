"""The report as a newcomer reads it (issue 23): the Reproduce command rebuilds the same model, the page
opens on the nested-CV estimate, names the vote once, shows empty states plainly, and fits a phone."""

from __future__ import annotations

import html
import json
import re
import shlex

import pytest
from typer.testing import CliRunner

from featurepipe.cli.app import app

TINY_ARGS = ["--backbone", "tiny", "--weights", "random", "--image-size", "32"]


def _invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def _printed_command(page: str) -> list[str]:
    """The Reproduce section's command as argv (its shell continuations joined)."""
    match = re.search(r'<pre class="cmd">(.*?)</pre>', page, re.S)
    assert match, "no command in the Reproduce section"
    return shlex.split(html.unescape(match.group(1)).replace("\\\n", " "))


def _model(run_dir) -> dict:
    meta = json.loads((run_dir / "best_head.json").read_text())
    return {key: meta.get(key) for key in ("head", "params", "features", "members")}


def test_reproduce_command_rebuilds_the_same_model(image_tree, cache, tmp_path):
    first = tmp_path / "first"
    _invoke("run", image_tree, *TINY_ARGS, "--cache-dir", cache, "--run-dir", first)
    argv = _printed_command((first / "report.html").read_text(encoding="utf-8"))
    assert argv[:2] == ["featurepipe", "run"]          # the whole search, not `evaluate --heads ...`
    assert "--groups" not in argv
    second = tmp_path / "second"
    _invoke(*argv[1:], "--run-dir", second)
    before, after = _model(first), _model(second)
    assert before["head"] == "vote" and len(before["members"]) == 3      # tiny x 3 resize policies
    assert after == before
