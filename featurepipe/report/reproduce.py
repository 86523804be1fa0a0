"""The run report's last section: the `featurepipe evaluate` command that repeats the run, rebuilt from
config.json, and config.json itself."""

from __future__ import annotations

import json
import shlex
from featurepipe.report.context import ReportContext
from featurepipe.report.html import esc
from featurepipe.rundir.layout import CONFIG


def reproduce_section(context: ReportContext) -> str:
    """The command line that repeats the run, what it cannot repeat, and config.json."""
    config = context.config
    if not config:
        return f'<p class="note">{CONFIG} is missing, so the run cannot be reproduced from this report.</p>'
    notes = []
    backbone = config.get("backbone") or {}
    if backbone.get("weights") == "random" and backbone.get("seed"):
        notes.append(f"the backbone used random weights with seed {backbone['seed']}, which `featurepipe "
                     f"evaluate` does not take as an option")
    notes.append(f"image groups (--groups / --groups-from) are not recorded in {CONFIG}; add the same option "
                 "if the run used one")
    return ('<p class="sub">The command that repeats this run (cached features are reused, so it is fast):</p>'
            f'<pre class="cmd">{esc(_reproduce_command(config))}</pre>'
            + "".join(f'<p class="note">Note: {esc(n)}.</p>' for n in notes)
            + f"<h3>{CONFIG}</h3>"
            + f"<pre>{esc(json.dumps(config, indent=2, sort_keys=True, default=str))}</pre>")


def _reproduce_command(config: dict) -> str:
    """The evaluate command line, one option per line with shell continuations (copy-pasteable)."""
    groups = _reproduce_args(config)
    return " \\\n    ".join(" ".join(shlex.quote(a) for a in group) for group in groups)


def _reproduce_args(config: dict) -> list[list[str]]:
    """The evaluate command's words from config.json, grouped as one option and its value per group."""
    dataset = config.get("dataset") or {}
    backbone = config.get("backbone") or {}
    args = ["featurepipe", "evaluate", str(dataset.get("source", "DATA"))]
    if backbone.get("name"):
        args += ["--backbone", str(backbone["name"])]
    if backbone.get("weights") not in (None, "imagenet"):
        args += ["--weights", str(backbone["weights"])]
    if backbone.get("layer"):
        args += ["--layer", str(backbone["layer"])]
    if backbone.get("pooling") not in (None, "avg"):
        args += ["--pooling", str(backbone["pooling"])]
    if backbone.get("image_size"):
        args += ["--image-size", str(backbone["image_size"])]
    if backbone.get("resize"):
        args += ["--resize", str(backbone["resize"])]
    if config.get("heads"):
        args += ["--heads", ",".join(str(h) for h in config["heads"])]
    for option in ("folds", "repeats", "seed"):
        if config.get(option) is not None:
            args += [f"--{option}", str(config[option])]
    if config.get("grids"):
        args += ["--grid", json.dumps(config["grids"], separators=(",", ":"))]
    if config.get("augment"):
        args += ["--augment", str(config["augment"])]
        if config.get("augment_seed"):
            args += ["--augment-seed", str(config["augment_seed"])]
    if config.get("tta"):
        args.append("--tta")
    if config.get("cache_dir"):
        args += ["--cache-dir", str(config["cache_dir"])]
    # Runs from before duplicate grouping (no key) or with it off must not gain it when repeated
    if not (config.get("dedup_groups") or {}).get("enabled", False):
        args.append("--no-dedup-groups")
    for edit in ("exclude", "relabel"):
        if (config.get("edits") or {}).get(edit):
            args += [f"--{edit}", str(config["edits"][edit]["csv"])]
    groups, index = [args[:3]], 3
    while index < len(args):
        takes_value = index + 1 < len(args) and not args[index + 1].startswith("--")
        groups.append(args[index:index + 2] if takes_value else args[index:index + 1])
        index += 2 if takes_value else 1
    return groups
