"""The run report's last section: the command that rebuilds the run's model, rebuilt from config.json,
and config.json itself (folded away: two screens of JSON are for the curious, not the reader).

A run whose config.json has the "search" block (`run` and `evaluate` both write it) is repeated with
`featurepipe run` and every option that block records: the feature sets (backbones x resize policies),
the heads, the vote, the ensemble, nested CV. An `evaluate --heads ...` line would search one feature
set and save a one-feature-set model, not the vote the run saved. Older runs without the block keep
the `featurepipe evaluate` line their keys describe."""

from __future__ import annotations

import json
import shlex
from typing import Optional

from featurepipe.report.context import ReportContext
from featurepipe.report.html import esc
from featurepipe.rundir.layout import CONFIG

RESIZE_POLICIES = ("squash", "center_crop", "letterbox")   # what `--resize auto` searches (evaluation/search.py)


def reproduce_section(context: ReportContext) -> str:
    """The command line that repeats the run, what it cannot repeat, and config.json (collapsed)."""
    config = context.config
    if not config:
        return f'<p class="note">{CONFIG} is missing, so the run cannot be reproduced from this report.</p>'
    notes = []
    for spec in _specs(config):
        if spec.get("weights") == "random" and spec.get("seed"):
            notes.append(f"the backbone used random weights with seed {spec['seed']}, which the command line does "
                         f"not take as an option")
            break
    if (config.get("search") or {}) and config.get("augment") and config.get("augment_seed"):
        notes.append(f"the augmented views used seed {config['augment_seed']}; `featurepipe run` draws them with "
                     f"seed 0 (repeat with `featurepipe evaluate --augment-seed`)")
    notes.append(f"image groups (--groups / --groups-from) are not recorded in {CONFIG}; add the same option "
                 "if the run used one")
    return ('<p class="sub">The command that rebuilds this run\'s model (cached features are reused, so it is '
            'fast):</p>'
            f'<pre class="cmd">{esc(_reproduce_command(config))}</pre>'
            + "".join(f'<p class="note">Note: {esc(n)}.</p>' for n in notes)
            + f'<details class="config"><summary>{CONFIG} (everything the run recorded)</summary>'
            + f"<pre>{esc(json.dumps(config, indent=2, sort_keys=True, default=str))}</pre></details>")


def _reproduce_command(config: dict) -> str:
    """The command line, one option per line with shell continuations (copy-pasteable)."""
    groups = _reproduce_args(config)
    return " \\\n    ".join(" ".join(shlex.quote(a) for a in group) for group in groups)


def _specs(config: dict) -> list[dict]:
    search = config.get("search") or {}
    specs = [s for s in (search.get("feature_sets") or {}).values() if isinstance(s, dict)]
    return specs or ([config["backbone"]] if isinstance(config.get("backbone"), dict) else [])


def _shared(specs: list[dict], key: str) -> Optional[object]:
    """The value every feature set has for `key`, None when they differ or none has one."""
    values = {json.dumps(s.get(key)) for s in specs}
    return specs[0].get(key) if len(values) == 1 else None


def _reproduce_args(config: dict) -> list[list[str]]:
    """The command's words from config.json, grouped as one option and its value per group."""
    dataset = config.get("dataset") or {}
    search = config.get("search") or {}
    specs = _specs(config)
    args = ["featurepipe", "run" if search else "evaluate", str(dataset.get("source", "DATA"))]
    if specs:
        args += ["--backbone", ",".join(dict.fromkeys(str(s.get("name")) for s in specs))]
    weights = _shared(specs, "weights")
    if weights not in (None, "imagenet"):
        args += ["--weights", str(weights)]
    for key, default in (("layer", None), ("pooling", "avg"), ("image_size", None)):
        value = _shared(specs, key)
        if value not in (None, default):
            args += [f"--{key.replace('_', '-')}", str(value)]
    resizes = list(dict.fromkeys(s.get("resize") for s in specs if s.get("resize")))
    if len(resizes) > 1:
        args += ["--resize", "auto"]
    elif resizes:
        args += ["--resize", str(resizes[0])]
    heads = search.get("heads") or config.get("heads")
    if heads:
        args += ["--heads", ",".join(str(h) for h in heads)]
    for option in ("folds", "repeats", "seed"):
        if config.get(option) is not None:
            args += [f"--{option}", str(config[option])]
    grids = search.get("grids") if search else config.get("grids")
    if grids:
        args += ["--grid", json.dumps(grids, separators=(",", ":"))]
    if search:
        if search.get("nested") is False:
            args.append("--no-nested")
        if search.get("vote") is False:
            args.append("--no-vote")
        if search.get("ensemble") is not None:
            args += ["--ensemble", str(search["ensemble"])]
    if config.get("augment"):
        args += ["--augment", str(config["augment"])]
        if config.get("augment_seed") and not search:     # `run` has no --augment-seed (a note says so)
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
